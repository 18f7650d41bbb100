//! The pattern parser: regex syntax to the matcher's [`Node`] tree.

use super::{
    Categories, Class, ClassItem, MAX_GROUP_NESTING, Node, PatternError, RepeatKind, unicode,
};

pub(super) struct Parser<'p> {
    pub(super) pattern: &'p str,
    pub(super) chars: Vec<(usize, char)>,
    pub(super) at: usize,
    /// Groups open around the current position.
    pub(super) nesting: usize,
    /// Inside `(?i...)`: literals and classes match case-insensitively.
    pub(super) fold: bool,
}

impl Parser<'_> {
    pub(super) fn error(&self, message: impl Into<String>) -> PatternError {
        PatternError {
            pattern: self.pattern.to_string(),
            offset: self
                .chars
                .get(self.at)
                .map_or(self.pattern.len(), |&(i, _)| i),
            message: message.into(),
        }
    }

    fn peek(&self) -> Option<char> {
        self.chars.get(self.at).map(|&(_, c)| c)
    }

    fn next(&mut self) -> Result<char, PatternError> {
        let c = self.peek().ok_or_else(|| self.error("unexpected end"))?;
        self.at += 1;
        Ok(c)
    }

    fn eat(&mut self, c: char) -> bool {
        if self.peek() == Some(c) {
            self.at += 1;
            true
        } else {
            false
        }
    }

    fn eat_str(&mut self, s: &str) -> bool {
        let n = s.chars().count();
        let matches = self.chars.len() >= self.at + n
            && self.chars[self.at..self.at + n]
                .iter()
                .map(|&(_, c)| c)
                .eq(s.chars());
        if matches {
            self.at += n;
        }
        matches
    }

    pub(super) fn alternation(&mut self) -> Result<Node, PatternError> {
        let outer_fold = self.fold;
        let mut alternatives = vec![self.concat()?];
        while self.eat('|') {
            alternatives.push(self.concat()?);
        }
        // A `(?i)` inside a group ends with the group.
        self.fold = outer_fold;
        Ok(if alternatives.len() == 1 {
            alternatives.pop().unwrap_or(Node::Empty)
        } else {
            Node::Alternation(alternatives)
        })
    }

    fn concat(&mut self) -> Result<Node, PatternError> {
        let mut nodes = Vec::new();
        while let Some(c) = self.peek() {
            if c == '|' || c == ')' {
                break;
            }
            if let Some(atom) = self.atom()? {
                let node = self.quantifier(atom)?;
                nodes.push(node);
            }
        }
        Ok(if nodes.len() == 1 {
            nodes.pop().unwrap_or(Node::Empty)
        } else {
            Node::Concat(nodes)
        })
    }

    fn quantifier(&mut self, atom: Node) -> Result<Node, PatternError> {
        let (min, max) = match self.peek() {
            Some('?') => (0, Some(1)),
            Some('*') => (0, None),
            Some('+') => (1, None),
            Some('{') => {
                let save = self.at;
                self.at += 1;
                match self.counted()? {
                    Some(bounds) => {
                        self.at -= 1; // the common `self.at += 1` below eats the '}'
                        bounds
                    }
                    None => {
                        // Not a counted repetition: a literal '{'.
                        self.at = save;
                        return Ok(atom);
                    }
                }
            }
            _ => return Ok(atom),
        };
        self.at += 1;
        if matches!(atom, Node::Start | Node::End | Node::Lookahead { .. }) {
            return Err(self.error("quantifier on an assertion"));
        }
        let kind = if self.eat('?') {
            RepeatKind::Lazy
        } else if self.eat('+') {
            RepeatKind::Possessive
        } else {
            RepeatKind::Greedy
        };
        if matches!(self.peek(), Some('?' | '*' | '+')) {
            return Err(self.error("repeated quantifier"));
        }
        Ok(Node::Repeat {
            node: Box::new(atom),
            min,
            max,
            kind,
        })
    }

    /// After `{`: `n}`, `n,}` or `n,m}` (leaving the position on the `}`), or `None`.
    fn counted(&mut self) -> Result<Option<(u32, Option<u32>)>, PatternError> {
        let number = |p: &mut Self| {
            let start = p.at;
            while p.peek().is_some_and(|c| c.is_ascii_digit()) {
                p.at += 1;
            }
            let digits: String = p.chars[start..p.at].iter().map(|&(_, c)| c).collect();
            if digits.is_empty() {
                Ok(None)
            } else {
                digits
                    .parse::<u32>()
                    .map(Some)
                    .map_err(|_| p.error("repetition count too large"))
            }
        };
        let Some(min) = number(self)? else {
            return Ok(None);
        };
        let max = if self.eat(',') {
            number(self)?
        } else {
            Some(min)
        };
        if self.peek() != Some('}') {
            return Ok(None);
        }
        self.at += 1;
        if max.is_some_and(|m| m < min) {
            return Err(self.error("repetition {n,m} with m < n"));
        }
        Ok(Some((min, max)))
    }

    fn literal(&self, c: char) -> Node {
        if self.fold {
            Node::LiteralFold(unicode::fold(c))
        } else {
            Node::Literal(c)
        }
    }

    fn class_node(&self, items: Vec<ClassItem>, negated: bool) -> Node {
        Node::Class(Class {
            items,
            negated,
            fold: self.fold,
        })
    }

    /// One atom, or `None` for a flag group such as `(?i)` that only changes what follows.
    fn atom(&mut self) -> Result<Option<Node>, PatternError> {
        let c = self.next()?;
        Ok(Some(match c {
            '(' => return self.group(),
            '[' => {
                let (items, negated) = self.class()?;
                self.class_node(items, negated)
            }
            '.' => Node::AnyButNewline,
            '^' => Node::Start,
            '$' => Node::End,
            '\\' => match self.escape(false)? {
                Escaped::Char(c) => self.literal(c),
                Escaped::Item(item) => self.class_node(vec![item], false),
                Escaped::Start => Node::Start,
                Escaped::End => Node::End,
            },
            '?' | '*' | '+' => return Err(self.error("quantifier without an atom")),
            c => self.literal(c),
        }))
    }

    fn group(&mut self) -> Result<Option<Node>, PatternError> {
        if self.eat('?') {
            if self.eat(':') {
                return self.group_body(None).map(Some);
            }
            if self.eat('=') || self.eat('!') {
                let negated = self.chars[self.at - 1].1 == '!';
                let node = self.group_body(None)?;
                return Ok(Some(Node::Lookahead {
                    node: Box::new(node),
                    negated,
                }));
            }
            if self.eat_str("<=") || self.eat_str("<!") {
                return Err(self.error("lookbehind is not supported"));
            }
            if self.eat('P') || self.peek() == Some('<') {
                // Named group: (?P<name>...) or (?<name>...).
                if !self.eat('<') {
                    return Err(self.error("expected '<' after (?P"));
                }
                while self.next()? != '>' {}
                return self.group_body(None).map(Some);
            }
            // Flags: (?i) or (?i:...); only `i` is understood.
            let mut fold = self.fold;
            loop {
                match self.next()? {
                    'i' => fold = true,
                    '-' if self.eat('i') => fold = false,
                    ')' => {
                        self.fold = fold;
                        return Ok(None);
                    }
                    ':' => return self.group_body(Some(fold)).map(Some),
                    other => {
                        return Err(self.error(format!("flag '{other}' is not supported")));
                    }
                }
            }
        }
        self.group_body(None).map(Some)
    }

    fn group_body(&mut self, fold: Option<bool>) -> Result<Node, PatternError> {
        if self.nesting >= MAX_GROUP_NESTING {
            return Err(self.error("groups nested too deeply"));
        }
        let outer = self.fold;
        if let Some(fold) = fold {
            self.fold = fold;
        }
        self.nesting += 1;
        let node = self.alternation()?;
        self.nesting -= 1;
        self.fold = outer;
        if !self.eat(')') {
            return Err(self.error("unclosed group"));
        }
        Ok(node)
    }

    /// After `[`: the items up to the closing `]`, and whether the class is negated.
    fn class(&mut self) -> Result<(Vec<ClassItem>, bool), PatternError> {
        if self.nesting >= MAX_GROUP_NESTING {
            return Err(self.error("classes nested too deeply"));
        }
        let negated = self.eat('^');
        let mut items = Vec::new();
        let mut first = true;
        loop {
            let c = self.next()?;
            if c == ']' && !first {
                break;
            }
            first = false;
            let low = match c {
                '[' if self.peek() == Some(':') => {
                    return Err(self.error("POSIX classes are not supported"));
                }
                '[' => {
                    self.nesting += 1;
                    let nested = self.class();
                    self.nesting -= 1;
                    let (nested, nested_negated) = nested?;
                    if nested_negated {
                        return Err(self.error("negated nested classes are not supported"));
                    }
                    items.extend(nested);
                    continue;
                }
                '\\' => match self.escape(true)? {
                    Escaped::Char(c) => c,
                    Escaped::Item(item) => {
                        items.push(item);
                        continue;
                    }
                    Escaped::Start | Escaped::End => unreachable!("anchors are not class escapes"),
                },
                '&' if self.peek() == Some('&') => {
                    return Err(self.error("class intersection is not supported"));
                }
                c => c,
            };
            // A range `a-z`, unless the '-' ends the class.
            if self.peek() == Some('-')
                && self.chars.get(self.at + 1).is_some_and(|&(_, c)| c != ']')
            {
                self.at += 1;
                let high = match self.next()? {
                    '\\' => match self.escape(true)? {
                        Escaped::Char(c) => c,
                        _ => return Err(self.error("a class escape cannot end a range")),
                    },
                    c => c,
                };
                if high < low {
                    return Err(self.error("range out of order"));
                }
                items.push(ClassItem::Range(low, high));
            } else {
                items.push(ClassItem::Range(low, low));
            }
        }
        Ok((items, negated))
    }

    /// After `{`: the text up to the closing `}` (which is consumed).
    fn up_to_brace(&mut self) -> Result<String, PatternError> {
        let mut text = String::new();
        loop {
            match self.next()? {
                '}' => return Ok(text),
                c => text.push(c),
            }
        }
    }

    /// After `\`.
    fn escape(&mut self, in_class: bool) -> Result<Escaped, PatternError> {
        let c = self.next()?;
        Ok(match c {
            'n' => Escaped::Char('\n'),
            'r' => Escaped::Char('\r'),
            't' => Escaped::Char('\t'),
            'f' => Escaped::Char('\u{C}'),
            'v' => Escaped::Char('\u{B}'),
            'a' => Escaped::Char('\u{7}'),
            'e' => Escaped::Char('\u{1B}'),
            '0' => Escaped::Char('\0'),
            's' | 'S' => Escaped::Item(ClassItem::Space(c == 'S')),
            'd' | 'D' => Escaped::Item(ClassItem::Digit(c == 'D')),
            'w' | 'W' => Escaped::Item(ClassItem::Word(c == 'W')),
            'p' | 'P' => {
                let name: String = if self.eat('{') {
                    self.up_to_brace()?
                } else {
                    self.next()?.to_string()
                };
                let (name, negated) = match name.strip_prefix('^') {
                    Some(rest) => (rest.to_string(), c == 'p'),
                    None => (name, c == 'P'),
                };
                let set = Categories::by_name(&name).ok_or_else(|| {
                    self.error(format!("Unicode class \\p{{{name}}} is not supported"))
                })?;
                Escaped::Item(ClassItem::Categories(set, negated))
            }
            'x' | 'u' => {
                let hex: String = if self.eat('{') {
                    self.up_to_brace()?
                } else {
                    let n = if c == 'x' { 2 } else { 4 };
                    (0..n).map(|_| self.next()).collect::<Result<_, _>>()?
                };
                let code = u32::from_str_radix(&hex, 16)
                    .ok()
                    .and_then(char::from_u32)
                    .ok_or_else(|| self.error(format!("bad code point {hex:?}")))?;
                Escaped::Char(code)
            }
            'A' if !in_class => Escaped::Start,
            'z' if !in_class => Escaped::End,
            c if c.is_ascii_alphanumeric() => {
                return Err(self.error(format!("escape \\{c} is not supported")));
            }
            c => Escaped::Char(c),
        })
    }
}

enum Escaped {
    Char(char),
    Item(ClassItem),
    Start,
    End,
}
