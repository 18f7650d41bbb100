//! The regular expressions tokenizer.json files split text with (GPT-2's, Llama 3's, Qwen2's,
//! o200k's, ...): a small backtracking matcher with Perl's leftmost-first semantics, enough
//! for `Split` pre-tokenizers and `Replace` normalizers without a general regex engine.
//!
//! Supported: literals and escapes (`\r \n \t \f \v \xHH \x{H..} \u{H..}`), `.`, classes
//! (`[...]`, `[^...]`, ranges, `\s \S \d \D \w \W \p{..} \P{..}` inside and out), groups
//! (`(...)`, `(?:...)`, `(?i:...)`, `(?i)`, named groups), lookahead (`(?=...)`, `(?!...)`),
//! greedy, lazy and possessive quantifiers, `^ $ \A \z`. Anything else (lookbehind,
//! backreferences, word boundaries, scripts such as `\p{Han}`) is refused when the pattern is
//! compiled, so a tokenizer never silently splits differently from its reference.

use std::cell::Cell;

use super::unicode::{self, Categories};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("pattern {pattern:?}: {message} at offset {offset}")]
pub struct PatternError {
    pattern: String,
    offset: usize,
    message: String,
}

#[derive(Clone, Debug)]
enum ClassItem {
    Range(char, char),
    Categories(Categories, bool),
    Space(bool),
    Digit(bool),
    Word(bool),
}

impl ClassItem {
    fn matches(&self, c: char) -> bool {
        match *self {
            ClassItem::Range(lo, hi) => lo <= c && c <= hi,
            ClassItem::Categories(set, negated) => set.contains(c) != negated,
            ClassItem::Space(negated) => unicode::is_space(c) != negated,
            ClassItem::Digit(negated) => unicode::is_digit(c) != negated,
            ClassItem::Word(negated) => unicode::is_word(c) != negated,
        }
    }
}

#[derive(Clone, Debug)]
struct Class {
    items: Vec<ClassItem>,
    negated: bool,
    fold: bool,
}

impl Class {
    fn matches(&self, c: char) -> bool {
        let hit = if self.fold {
            unicode::case_variants(c).any(|v| self.items.iter().any(|i| i.matches(v)))
        } else {
            self.items.iter().any(|i| i.matches(c))
        };
        hit != self.negated
    }
}

#[derive(Clone, Debug)]
enum Node {
    Empty,
    Literal(char),
    /// Case-insensitive literal, stored folded.
    LiteralFold(char),
    Class(Class),
    /// `.`: any char but `\n`.
    AnyButNewline,
    Concat(Vec<Node>),
    Alternation(Vec<Node>),
    Repeat {
        node: Box<Node>,
        min: u32,
        max: Option<u32>,
        kind: RepeatKind,
    },
    Lookahead {
        node: Box<Node>,
        negated: bool,
    },
    Start,
    End,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RepeatKind {
    Greedy,
    Lazy,
    Possessive,
}

impl Node {
    /// The char test of a node that always consumes exactly one char.
    fn single_char(&self, c: char) -> Option<bool> {
        match self {
            Node::Literal(l) => Some(c == *l),
            Node::LiteralFold(l) => Some(unicode::fold(c) == *l),
            Node::Class(class) => Some(class.matches(c)),
            Node::AnyButNewline => Some(c != '\n'),
            _ => None,
        }
    }

    fn is_single_char(&self) -> bool {
        self.single_char('a').is_some()
    }
}

/// A compiled pattern.
#[derive(Clone, Debug)]
pub struct Pattern {
    root: Node,
}

/// Bounds backtracking: a search may take this many steps per byte of text (plus a floor)
/// before it gives up and leaves the rest of the text unmatched, so a hostile pattern costs
/// time linear in the text instead of exponential. Real pre-tokenizer patterns take a few
/// steps per byte.
const STEPS_PER_BYTE: usize = 4096;
const STEP_FLOOR: usize = 1 << 20;

/// Deepest nesting of match calls (each iteration of a repeated group nests one level): a
/// match attempt that would go deeper fails instead of overflowing the stack. Real
/// pre-tokenizer patterns nest a few dozen levels (one-char repeats are iterative).
const MAX_DEPTH: usize = 2000;

/// Deepest group nesting a pattern may have.
const MAX_GROUP_NESTING: usize = 64;

impl Pattern {
    pub fn new(pattern: &str) -> Result<Pattern, PatternError> {
        let mut parser = Parser {
            pattern,
            chars: pattern.char_indices().collect(),
            at: 0,
            nesting: 0,
            fold: false,
        };
        let root = parser.alternation()?;
        if parser.at < parser.chars.len() {
            return Err(parser.error("unbalanced ')'"));
        }
        Ok(Pattern { root })
    }

    /// A pattern matching `literal` exactly; an empty literal matches nothing (as in HF).
    pub fn literal(literal: &str) -> Pattern {
        let root = if literal.is_empty() {
            Node::Class(Class {
                items: Vec::new(),
                negated: false,
                fold: false,
            })
        } else {
            Node::Concat(literal.chars().map(Node::Literal).collect())
        };
        Pattern { root }
    }

    /// Non-overlapping matches, leftmost first, as byte ranges. An empty match advances the
    /// search by one char.
    pub fn find_iter(&self, text: &str) -> Vec<(usize, usize)> {
        let matcher = Matcher {
            text,
            steps: Cell::new(0),
            depth: Cell::new(0),
            budget: STEP_FLOOR.saturating_add(text.len().saturating_mul(STEPS_PER_BYTE)),
        };
        let mut matches = Vec::new();
        let mut start = 0;
        while let Some((s, e)) = matcher.find_at(&self.root, start) {
            matches.push((s, e));
            start = if e > s {
                e
            } else {
                match text[e..].chars().next() {
                    Some(c) => e + c.len_utf8(),
                    None => break,
                }
            };
        }
        matches
    }
}

struct Matcher<'t> {
    text: &'t str,
    steps: Cell<usize>,
    depth: Cell<usize>,
    budget: usize,
}

type Continuation<'k> = dyn FnMut(usize) -> bool + 'k;

impl Matcher<'_> {
    fn find_at(&self, root: &Node, from: usize) -> Option<(usize, usize)> {
        let mut pos = from;
        while pos <= self.text.len() && self.steps.get() <= self.budget {
            let mut end = None;
            if self.at(root, pos, &mut |e| {
                end = Some(e);
                true
            }) {
                return end.map(|e| (pos, e));
            }
            pos += self.next_char(pos).map_or(1, char::len_utf8);
        }
        None
    }

    fn next_char(&self, pos: usize) -> Option<char> {
        self.text[pos..].chars().next()
    }

    /// Whether `node` matches at `pos` with a continuation `k` that accepts where it ends.
    fn at(&self, node: &Node, pos: usize, k: &mut Continuation) -> bool {
        let steps = self.steps.get() + 1;
        self.steps.set(steps);
        let depth = self.depth.get();
        if steps > self.budget || depth >= MAX_DEPTH {
            return false;
        }
        self.depth.set(depth + 1);
        let matched = self.at_inner(node, pos, k);
        self.depth.set(depth);
        matched
    }

    fn at_inner(&self, node: &Node, pos: usize, k: &mut Continuation) -> bool {
        match node {
            Node::Empty => k(pos),
            Node::Literal(_) | Node::LiteralFold(_) | Node::Class(_) | Node::AnyButNewline => {
                match self.next_char(pos) {
                    Some(c) if node.single_char(c) == Some(true) => k(pos + c.len_utf8()),
                    _ => false,
                }
            }
            Node::Concat(nodes) => self.concat(nodes, pos, k),
            Node::Alternation(alternatives) => alternatives.iter().any(|a| self.at(a, pos, k)),
            Node::Repeat {
                node,
                min,
                max,
                kind,
            } => {
                if node.is_single_char() {
                    self.repeat_chars(node, *min, *max, *kind, pos, k)
                } else if *kind == RepeatKind::Possessive {
                    self.repeat_possessive(node, *min, *max, pos, k)
                } else {
                    self.repeat(node, *min, *max, *kind == RepeatKind::Greedy, 0, pos, k)
                }
            }
            Node::Lookahead { node, negated } => {
                let found = self.at(node, pos, &mut |_| true);
                found != *negated && k(pos)
            }
            Node::Start => pos == 0 && k(pos),
            Node::End => pos == self.text.len() && k(pos),
        }
    }

    fn concat(&self, nodes: &[Node], pos: usize, k: &mut Continuation) -> bool {
        match nodes.split_first() {
            None => k(pos),
            Some((first, rest)) => self.at(first, pos, &mut |p| self.concat(rest, p, k)),
        }
    }

    /// Repetition of a one-char node: find the longest run, then offer ends longest first
    /// (greedy), shortest first (lazy), or only the longest (possessive).
    fn repeat_chars(
        &self,
        node: &Node,
        min: u32,
        max: Option<u32>,
        kind: RepeatKind,
        pos: usize,
        k: &mut Continuation,
    ) -> bool {
        let mut ends = vec![pos];
        let mut end = pos;
        for c in self.text[pos..].chars() {
            if max.is_some_and(|m| ends.len() as u32 > m) || node.single_char(c) != Some(true) {
                break;
            }
            end += c.len_utf8();
            ends.push(end);
        }
        let count = ends.len() as u32 - 1;
        if count < min {
            return false;
        }
        let candidates = &ends[min as usize..];
        match kind {
            RepeatKind::Greedy => candidates.iter().rev().any(|&e| k(e)),
            RepeatKind::Lazy => candidates.iter().any(|&e| k(e)),
            RepeatKind::Possessive => k(end),
        }
    }

    /// Possessive repetition of a general node: as many iterations as match (each taking its
    /// first way to match), never given back.
    fn repeat_possessive(
        &self,
        node: &Node,
        min: u32,
        max: Option<u32>,
        pos: usize,
        k: &mut Continuation,
    ) -> bool {
        let mut end = pos;
        let mut count = 0;
        while max.is_none_or(|m| count < m) {
            let mut next = None;
            self.at(node, end, &mut |e| {
                next = Some(e);
                true
            });
            match next {
                Some(e) if e != end => end = e,
                _ => break,
            }
            count += 1;
        }
        count >= min && k(end)
    }

    #[allow(clippy::too_many_arguments)]
    fn repeat(
        &self,
        node: &Node,
        min: u32,
        max: Option<u32>,
        greedy: bool,
        count: u32,
        pos: usize,
        k: &mut Continuation,
    ) -> bool {
        let can_stop = count >= min;
        if !greedy && can_stop && k(pos) {
            return true;
        }
        // An iteration that matches empty would repeat forever; it counts as stopping.
        if max.is_none_or(|m| count < m)
            && self.at(node, pos, &mut |p| {
                p != pos && self.repeat(node, min, max, greedy, count + 1, p, k)
            })
        {
            return true;
        }
        greedy && can_stop && k(pos)
    }
}

struct Parser<'p> {
    pattern: &'p str,
    chars: Vec<(usize, char)>,
    at: usize,
    /// Groups open around the current position.
    nesting: usize,
    /// Inside `(?i...)`: literals and classes match case-insensitively.
    fold: bool,
}

impl Parser<'_> {
    fn error(&self, message: impl Into<String>) -> PatternError {
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

    fn alternation(&mut self) -> Result<Node, PatternError> {
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
                    let mut name = String::new();
                    loop {
                        match self.next()? {
                            '}' => break,
                            c => name.push(c),
                        }
                    }
                    name
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
                    let mut hex = String::new();
                    loop {
                        match self.next()? {
                            '}' => break,
                            c => hex.push(c),
                        }
                    }
                    hex
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

#[cfg(test)]
mod tests {
    use super::*;

    fn pieces<'t>(pattern: &str, text: &'t str) -> Vec<&'t str> {
        Pattern::new(pattern)
            .unwrap()
            .find_iter(text)
            .into_iter()
            .map(|(s, e)| &text[s..e])
            .collect()
    }

    const GPT2: &str =
        r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";
    const LLAMA3: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

    #[test]
    fn gpt2_split() {
        assert_eq!(
            pieces(GPT2, "Hello world's  end 123!!\n\n x"),
            [
                "Hello", " world", "'s", " ", " end", " 123", "!!", "\n\n", " x"
            ]
        );
    }

    #[test]
    fn llama3_split() {
        assert_eq!(
            pieces(LLAMA3, "I'LL pay 12345 dollars.\n\n  Ok"),
            [
                "I", "'LL", " pay", " ", "123", "45", " dollars", ".\n\n", " ", " Ok"
            ]
        );
        // (?i:'s) also matches the long s, as Unicode simple case folding says.
        assert_eq!(pieces(LLAMA3, "it'ſ IT'S"), ["it", "'ſ", " IT", "'S"]);
    }

    #[test]
    fn quantifiers_and_lookahead() {
        assert_eq!(pieces(r"a{2,3}", "aaaaaaa"), ["aaa", "aaa"]);
        assert_eq!(pieces(r"a+?", "aaa"), ["a", "a", "a"]);
        assert_eq!(pieces(r"(?:ab)+c", "ababcabc"), ["ababc", "abc"]);
        assert_eq!(pieces(r"\s+(?!\S)", "a   b"), ["  "]);
        assert_eq!(pieces(r"x(?=y)", "xyxz"), ["x"]);
        assert_eq!(pieces(r"a++a", "aaa"), Vec::<&str>::new());
        assert_eq!(pieces(r"(?:a|ab)(?:c|bcd)", "abcd"), ["abcd"]);
        assert_eq!(pieces(r"[a-c-]+", "xa-bq"), ["a-b"]);
        assert_eq!(pieces(r"\x41\u{42}[\x{43}]", "ABC"), ["ABC"]);
        assert_eq!(pieces(r"(?i)ab|c", "AB c C"), ["AB", "c", "C"]);
        assert_eq!(pieces(r"(?i:a)b", "Ab AB"), ["Ab"]);
        assert_eq!(pieces(r"x{a", "x{a"), ["x{a"]);
        assert_eq!(pieces(r"^a|b$", "aab"), ["a", "b"]);
    }

    #[test]
    fn refusals_name_the_construct() {
        for (pattern, needle) in [
            (r"(?<=a)b", "lookbehind"),
            (r"\p{Han}", "\\p{Han}"),
            (r"\bword", "\\b"),
            (r"(a", "unclosed"),
            (r"a)", "unbalanced"),
            (r"*a", "quantifier"),
            (r"[[:alpha:]]", "POSIX"),
        ] {
            let error = Pattern::new(pattern).unwrap_err().to_string();
            assert!(error.contains(needle), "{pattern}: {error}");
        }
    }

    #[test]
    fn deep_patterns_fail_instead_of_overflowing() {
        // A repeated group nests one level per iteration: long runs stop matching.
        let text = "ab".repeat(50_000);
        let matches = pieces(r"(?:ab)+", &text);
        assert!(
            matches.iter().all(|m| m.len() < 2 * MAX_DEPTH),
            "{}",
            matches.len()
        );
        let nested = format!("{}a{}", "(".repeat(100), ")".repeat(100));
        assert!(
            Pattern::new(&nested)
                .unwrap_err()
                .to_string()
                .contains("nested")
        );
        let classes = format!("{}a{}", "[".repeat(100), "]".repeat(100));
        assert!(Pattern::new(&classes).is_err());
    }

    #[test]
    fn hostile_patterns_stop() {
        // Exponential backtracking is cut off by the step budget instead of hanging.
        let text = "a".repeat(64);
        assert!(pieces(r"(?:a|a)*(?:a|a)*b", &text).is_empty());
    }
}
