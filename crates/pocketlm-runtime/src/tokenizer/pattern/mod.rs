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
use parse::Parser;

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

mod parse;
#[cfg(test)]
mod tests;
