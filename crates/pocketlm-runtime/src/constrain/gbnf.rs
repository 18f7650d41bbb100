//! GBNF (llama.cpp's grammar format) to llguidance's Lark dialect. llguidance reads Lark
//! only; GBNF differs mostly in spelling (`::=`, `root`, hyphenated names, bare character
//! classes, `{m,n}`), so it is translated token by token through a small recursive-descent
//! parser.

use super::ConstraintError;

fn invalid(message: impl Into<String>) -> ConstraintError {
    ConstraintError::Invalid {
        kind: "GBNF grammar",
        message: message.into(),
    }
}

/// Longest accepted GBNF source; real grammars are a few KiB.
const MAX_GBNF_LEN: usize = 1 << 20;
/// Deepest parenthesis nesting accepted (the parser recurses once per level).
const MAX_NESTING: usize = 64;
/// Largest `{m,n}` bound accepted.
const MAX_REPEAT: u32 = 10_000;

#[derive(Clone, Debug, PartialEq)]
enum Token {
    /// `name ::=`
    Define(String),
    Ref(String),
    /// A literal, decoded.
    Literal(String),
    /// A character class, already as a Lark regex (`/[...]/`).
    Class(String),
    Any,
    LParen,
    RParen,
    Pipe,
    Star,
    Plus,
    Question,
    Repeat(u32, Option<u32>),
}

/// Translates a GBNF grammar to a Lark grammar whose `start` is GBNF's `root`.
pub fn gbnf_to_lark(source: &str) -> Result<String, ConstraintError> {
    if source.len() > MAX_GBNF_LEN {
        return Err(invalid(format!(
            "grammar is {} bytes, more than the {} KiB limit",
            source.len(),
            MAX_GBNF_LEN >> 10
        )));
    }
    let tokens = tokenize(source)?;
    let mut parser = Parser {
        tokens: &tokens,
        at: 0,
        depth: 0,
    };
    let mut out = String::new();
    let mut has_root = false;
    while let Some(token) = parser.next() {
        let Token::Define(name) = token else {
            return Err(invalid(format!(
                "expected a rule (`name ::= ...`), found {token:?}"
            )));
        };
        has_root |= name == "root";
        let body = parser.alternatives()?;
        out.push_str(&format!("{}: {}\n", lark_name(&name), body));
    }
    if !has_root {
        return Err(invalid("no `root` rule"));
    }
    out.insert_str(0, &format!("start: {}\n", lark_name("root")));
    Ok(out)
}

/// GBNF names may hold `-` and capitals, Lark rule names may not. An injective spelling:
/// lowercase letters and digits stay, `-` → `__`, `_` → `_0`, `X` → `_x`, after a `g_`
/// prefix that keeps them clear of Lark's keywords.
fn lark_name(name: &str) -> String {
    let mut out = String::from("g_");
    for c in name.chars() {
        match c {
            'a'..='z' | '0'..='9' => out.push(c),
            'A'..='Z' => {
                out.push('_');
                out.push(c.to_ascii_lowercase());
            }
            '-' => out.push_str("__"),
            _ => out.push_str("_0"),
        }
    }
    out
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '-' || c == '_'
}

/// One char of a literal or class, after `\` when `escaped`.
fn read_escape(chars: &mut std::iter::Peekable<std::str::Chars>) -> Result<char, ConstraintError> {
    let hex = |chars: &mut std::iter::Peekable<std::str::Chars>, n: usize| {
        let digits: String = (0..n).filter_map(|_| chars.next()).collect();
        u32::from_str_radix(&digits, 16)
            .ok()
            .filter(|_| digits.len() == n)
            .and_then(char::from_u32)
            .ok_or_else(|| invalid(format!("bad escape digits {digits:?}")))
    };
    match chars.next() {
        Some('n') => Ok('\n'),
        Some('t') => Ok('\t'),
        Some('r') => Ok('\r'),
        Some('x') => hex(chars, 2),
        Some('u') => hex(chars, 4),
        Some('U') => hex(chars, 8),
        Some(c @ ('\\' | '"' | '[' | ']' | '-' | '^' | '/' | '\'')) => Ok(c),
        Some(c) => Err(invalid(format!("unknown escape \\{c}"))),
        None => Err(invalid("escape at end of input")),
    }
}

/// A class char as a regex atom: alphanumerics as they are, everything else as `\x{..}`.
fn class_char(c: char) -> String {
    if c.is_ascii_alphanumeric() || c == ' ' {
        c.to_string()
    } else {
        format!("\\x{{{:X}}}", c as u32)
    }
}

fn tokenize(source: &str) -> Result<Vec<Token>, ConstraintError> {
    let mut tokens = Vec::new();
    let mut chars = source.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            c if c.is_whitespace() => {}
            '#' => {
                for c in chars.by_ref() {
                    if c == '\n' {
                        break;
                    }
                }
            }
            '"' => {
                let mut literal = String::new();
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some('\\') => literal.push(read_escape(&mut chars)?),
                        Some(c) => literal.push(c),
                        None => return Err(invalid("unterminated string literal")),
                    }
                }
                tokens.push(Token::Literal(literal));
            }
            '[' => {
                let mut class = String::from("/[");
                if chars.peek() == Some(&'^') {
                    chars.next();
                    class.push('^');
                }
                let mut items = 0;
                loop {
                    let c = match chars.next() {
                        Some(']') if items > 0 => break,
                        Some('\\') => read_escape(&mut chars)?,
                        Some(c) => c,
                        None => return Err(invalid("unterminated character class")),
                    };
                    items += 1;
                    class.push_str(&class_char(c));
                    // A range `a-z`, unless the `-` is last (then it is a literal `-`).
                    if chars.peek() == Some(&'-') {
                        let mut ahead = chars.clone();
                        ahead.next();
                        if ahead.peek().is_some_and(|&c| c != ']') {
                            chars.next();
                            let hi = match chars.next() {
                                Some('\\') => read_escape(&mut chars)?,
                                Some(c) => c,
                                None => return Err(invalid("unterminated character class")),
                            };
                            if hi < c {
                                return Err(invalid(format!("empty range {c:?}-{hi:?}")));
                            }
                            class.push('-');
                            class.push_str(&class_char(hi));
                        }
                    }
                }
                class.push_str("]/");
                tokens.push(Token::Class(class));
            }
            '.' => tokens.push(Token::Any),
            '(' => tokens.push(Token::LParen),
            ')' => tokens.push(Token::RParen),
            '|' => tokens.push(Token::Pipe),
            '*' => tokens.push(Token::Star),
            '+' => tokens.push(Token::Plus),
            '?' => tokens.push(Token::Question),
            '{' => {
                let mut spec = String::new();
                loop {
                    match chars.next() {
                        Some('}') => break,
                        Some(c) if c.is_ascii_digit() || c == ',' || c == ' ' => spec.push(c),
                        _ => return Err(invalid("bad repetition `{m,n}`")),
                    }
                }
                let number = |s: &str| {
                    s.trim()
                        .parse::<u32>()
                        .ok()
                        .filter(|&n| n <= MAX_REPEAT)
                        .ok_or_else(|| invalid(format!("bad repetition count {s:?}")))
                };
                let (min, max) = match spec.split_once(',') {
                    None => (number(&spec)?, Some(number(&spec)?)),
                    Some((min, max)) if max.trim().is_empty() => (number(min)?, None),
                    Some((min, max)) => (number(min)?, Some(number(max)?)),
                };
                if max.is_some_and(|max| max < min) {
                    return Err(invalid(format!("repetition {{{spec}}} has max < min")));
                }
                tokens.push(Token::Repeat(min, max));
            }
            c if is_name_char(c) => {
                let mut name = c.to_string();
                while let Some(&c) = chars.peek().filter(|&&c| is_name_char(c)) {
                    name.push(c);
                    chars.next();
                }
                // `name ::=` starts a rule (whitespace allowed before `::=`).
                let mut ahead = chars.clone();
                while ahead.peek().is_some_and(|c| c.is_whitespace()) {
                    ahead.next();
                }
                if ahead.clone().take(3).collect::<String>() == "::=" {
                    for _ in 0..3 {
                        ahead.next();
                    }
                    chars = ahead;
                    tokens.push(Token::Define(name));
                } else {
                    tokens.push(Token::Ref(name));
                }
            }
            c => return Err(invalid(format!("unexpected character {c:?}"))),
        }
    }
    Ok(tokens)
}

struct Parser<'t> {
    tokens: &'t [Token],
    at: usize,
    depth: usize,
}

impl Parser<'_> {
    fn peek(&self) -> Option<&Token> {
        self.tokens.get(self.at)
    }

    fn next(&mut self) -> Option<Token> {
        let token = self.tokens.get(self.at).cloned();
        self.at += 1;
        token
    }

    /// `seq (| seq)*`, up to `)`, the next rule or the end.
    fn alternatives(&mut self) -> Result<String, ConstraintError> {
        let mut alternatives = vec![self.sequence()?];
        while self.peek() == Some(&Token::Pipe) {
            self.at += 1;
            alternatives.push(self.sequence()?);
        }
        Ok(alternatives.join(" | "))
    }

    fn sequence(&mut self) -> Result<String, ConstraintError> {
        let mut items = Vec::new();
        loop {
            let atom = match self.peek() {
                None | Some(Token::Pipe | Token::RParen | Token::Define(_)) => break,
                Some(_) => self.atom()?,
            };
            items.push(self.postfix(atom)?);
        }
        // An empty alternative matches the empty string.
        Ok(if items.is_empty() {
            "\"\"".into()
        } else {
            items.join(" ")
        })
    }

    fn atom(&mut self) -> Result<String, ConstraintError> {
        Ok(match self.next() {
            Some(Token::Literal(text)) => serde_json::Value::from(text).to_string(),
            Some(Token::Class(regex)) => regex,
            Some(Token::Any) => "/(?s:.)/".into(),
            Some(Token::Ref(name)) => lark_name(&name),
            Some(Token::LParen) => {
                self.depth += 1;
                if self.depth > MAX_NESTING {
                    return Err(invalid(format!(
                        "parentheses nest more than {MAX_NESTING} deep"
                    )));
                }
                let inner = self.alternatives()?;
                if self.next() != Some(Token::RParen) {
                    return Err(invalid("unbalanced `(`"));
                }
                self.depth -= 1;
                format!("({inner})")
            }
            other => return Err(invalid(format!("unexpected {other:?}"))),
        })
    }

    /// The atom with its `* + ? {m,n}` suffixes, grouped so each applies to it whole.
    fn postfix(&mut self, mut atom: String) -> Result<String, ConstraintError> {
        loop {
            atom = match self.peek() {
                Some(Token::Star) => format!("({atom})*"),
                Some(Token::Plus) => format!("({atom})+"),
                Some(Token::Question) => format!("({atom})?"),
                Some(&Token::Repeat(min, max)) => repeat(&atom, min, max),
                _ => return Ok(atom),
            };
            self.at += 1;
        }
    }
}

/// `atom{min,max}` in Lark: `min` copies then `max - min` optional ones (or a star).
fn repeat(atom: &str, min: u32, max: Option<u32>) -> String {
    let mut parts: Vec<String> = Vec::new();
    if min > 0 {
        parts.push(format!("({atom}) ~ {min}"));
    }
    match max {
        None => parts.push(format!("({atom})*")),
        Some(max) if max > min => parts.push(format!("(({atom}) ~ 0..{})", max - min)),
        Some(_) => {}
    }
    if parts.is_empty() {
        return "\"\"".into();
    }
    format!("({})", parts.join(" "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn translates_rules_names_classes_and_repeats() {
        let lark = gbnf_to_lark(
            "root ::= answer-Word ws\n# comment\nanswer-Word ::= (\"yes\" | \"no\\n\")\n\
             ws ::= [ \\t\\n]* [^a-z\\]]{2,3} .",
        )
        .unwrap();
        let lines: Vec<&str> = lark.lines().collect();
        assert_eq!(lines[0], "start: g_root");
        assert_eq!(lines[1], "g_root: g_answer___word g_ws");
        assert_eq!(lines[2], r#"g_answer___word: ("yes" | "no\n")"#);
        assert_eq!(
            lines[3],
            r"g_ws: (/[ \x{9}\x{A}]/)* ((/[^a-z\x{5D}]/) ~ 2 ((/[^a-z\x{5D}]/) ~ 0..1)) /(?s:.)/"
        );
    }

    #[test]
    fn bad_gbnf_is_an_error_not_a_panic() {
        for src in [
            "",
            "word ::= \"x\"",
            "root ::= \"unterminated",
            "root ::= [abc",
            "root ::= (\"a\"",
            "root ::= \"a\")",
            "root ::= [z-a]",
            "root ::= \"a\"{3,1}",
            "root ::= \"a\"{99999999999}",
            "root ::= \"\\q\"",
            "root ::= \"\\x4\"",
            "\"x\" ::= root",
            "root ::= @",
            &format!("root ::= {}\"a\"{}", "(".repeat(10_000), ")".repeat(10_000)),
        ] {
            let err = gbnf_to_lark(src).unwrap_err();
            assert!(
                matches!(err, ConstraintError::Invalid { .. }),
                "{src:?}: {err}"
            );
        }
    }
}
