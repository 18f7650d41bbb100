//! The BPE model: a piece of text starts as one symbol per char (or per byte, through
//! `<0xAB>` byte-fallback tokens) and the lowest-ranked adjacent pair is merged until no
//! merge applies, leftmost first among equal ranks.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Mutex;

use super::config::{BpeConfig, MergeEntry};

/// Pieces shorter than this (bytes) are cached; the cache stops growing at `CACHE_CAPACITY`.
const CACHE_MAX_PIECE: usize = 256;
const CACHE_CAPACITY: usize = 10_000;

/// Hasher for packed id pairs: one multiply, as the merge table is looked up once per
/// adjacent pair and SipHash would dominate.
#[derive(Default)]
struct PairHasher(u64);

impl Hasher for PairHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(5) ^ u64::from(b)).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = (n ^ (n >> 29)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

type PairMap = HashMap<u64, (u32, u32), BuildHasherDefault<PairHasher>>;

fn pair(left: u32, right: u32) -> u64 {
    (u64::from(left) << 32) | u64::from(right)
}

pub(super) struct Bpe {
    pub vocab: HashMap<String, u32>,
    /// Id → text (the longest vocabulary id + 1 entries; gaps are `None`).
    pub vocab_r: Vec<Option<String>>,
    /// (left, right) → (rank, merged id).
    merges: PairMap,
    unk: Option<u32>,
    continuing_subword_prefix: Option<String>,
    end_of_word_suffix: Option<String>,
    fuse_unk: bool,
    byte_fallback: bool,
    ignore_merges: bool,
    /// `<0xAB>` ids, when the vocabulary has them.
    byte_ids: [Option<u32>; 256],
    cache: Mutex<HashMap<String, Vec<u32>>>,
}

impl Bpe {
    pub(super) fn new(config: BpeConfig) -> Result<Bpe, String> {
        if config.dropout.is_some_and(|d| d > 0.0) {
            log::warn!("tokenizer.json asks for BPE dropout; it is a training aid and not applied");
        }
        let vocab = config.vocab;
        let max_id = vocab.values().copied().max().map_or(0, |m| m as usize + 1);
        if max_id > (1 << 24) {
            return Err(format!("BPE vocabulary ids reach {max_id}, more than 2^24"));
        }
        let mut vocab_r = vec![None; max_id];
        for (text, &id) in &vocab {
            vocab_r[id as usize] = Some(text.clone());
        }
        let prefix_len = config
            .continuing_subword_prefix
            .as_ref()
            .map_or(0, String::len);
        let mut merges = PairMap::default();
        for (rank, entry) in config.merges.into_iter().enumerate() {
            let (left, right) = match entry {
                MergeEntry::Pair(left, right) => (left, right),
                MergeEntry::Joined(joined) => {
                    let mut parts = joined.split(' ');
                    match (parts.next(), parts.next(), parts.next()) {
                        (Some(l), Some(r), None) => (l.to_string(), r.to_string()),
                        _ => return Err(format!("merge #{rank} {joined:?} is not two tokens")),
                    }
                }
            };
            let id = |token: &str| {
                vocab.get(token).copied().ok_or_else(|| {
                    format!("merge #{rank} uses {token:?}, which is not in the vocabulary")
                })
            };
            let merged = format!("{left}{}", right.get(prefix_len..).unwrap_or(""));
            // Later duplicates of a pair replace earlier ones, as in HF.
            merges.insert(pair(id(&left)?, id(&right)?), (rank as u32, id(&merged)?));
        }
        let unk = match &config.unk_token {
            Some(token) => Some(
                *vocab
                    .get(token)
                    .ok_or_else(|| format!("unk_token {token:?} is not in the vocabulary"))?,
            ),
            None => None,
        };
        let mut byte_ids = [None; 256];
        for (b, slot) in byte_ids.iter_mut().enumerate() {
            *slot = vocab.get(&format!("<0x{b:02X}>")).copied();
        }
        Ok(Bpe {
            vocab,
            vocab_r,
            merges,
            unk,
            continuing_subword_prefix: config.continuing_subword_prefix,
            end_of_word_suffix: config.end_of_word_suffix,
            fuse_unk: config.fuse_unk,
            byte_fallback: config.byte_fallback,
            ignore_merges: config.ignore_merges,
            byte_ids,
            cache: Mutex::new(HashMap::new()),
        })
    }

    pub(super) fn id_to_token(&self, id: u32) -> Option<&str> {
        self.vocab_r.get(id as usize)?.as_deref()
    }

    /// Appends the ids of one pre-tokenized piece.
    pub(super) fn tokenize(&self, piece: &str, ids: &mut Vec<u32>) {
        if piece.is_empty() {
            return;
        }
        if self.ignore_merges
            && let Some(&id) = self.vocab.get(piece)
        {
            ids.push(id);
            return;
        }
        let cacheable = piece.len() < CACHE_MAX_PIECE;
        if cacheable
            && let Ok(cache) = self.cache.lock()
            && let Some(hit) = cache.get(piece)
        {
            ids.extend_from_slice(hit);
            return;
        }
        let start = ids.len();
        self.merge_piece(piece, ids);
        if cacheable
            && let Ok(mut cache) = self.cache.lock()
            && cache.len() < CACHE_CAPACITY
        {
            cache.insert(piece.to_string(), ids[start..].to_vec());
        }
    }

    /// The initial symbols of `piece`: one per char found in the vocabulary, else its UTF-8
    /// bytes as `<0xAB>` tokens (with `byte_fallback`), else the unknown token (consecutive
    /// unknowns fused into one with `fuse_unk`); chars with none of these are dropped.
    fn initial_symbols(&self, piece: &str) -> Vec<u32> {
        let mut symbols = Vec::with_capacity(piece.len());
        let mut pending_unk = false;
        let mut scratch = String::new();
        let mut chars = piece.char_indices().peekable();
        while let Some((i, c)) = chars.next() {
            let char_text = &piece[i..i + c.len_utf8()];
            let is_first = i == 0;
            let is_last = chars.peek().is_none();
            let decorated = (!is_first && self.continuing_subword_prefix.is_some())
                || (is_last && self.end_of_word_suffix.is_some());
            let text = if decorated {
                scratch.clear();
                if !is_first && let Some(prefix) = &self.continuing_subword_prefix {
                    scratch.push_str(prefix);
                }
                scratch.push_str(char_text);
                if is_last && let Some(suffix) = &self.end_of_word_suffix {
                    scratch.push_str(suffix);
                }
                scratch.as_str()
            } else {
                char_text
            };
            if let Some(&id) = self.vocab.get(text) {
                pending_unk = false;
                symbols.push(id);
                continue;
            }
            if self.byte_fallback {
                let bytes: Option<Vec<u32>> = text
                    .bytes()
                    .map(|b| self.byte_ids[usize::from(b)])
                    .collect();
                if let Some(bytes) = bytes {
                    pending_unk = false;
                    symbols.extend(bytes);
                    continue;
                }
            }
            if let Some(unk) = self.unk {
                if !(self.fuse_unk && pending_unk) {
                    symbols.push(unk);
                }
                pending_unk = true;
            }
        }
        symbols
    }

    fn merge_piece(&self, piece: &str, ids: &mut Vec<u32>) {
        let mut symbols = self.initial_symbols(piece);
        let n = symbols.len();
        if n < 2 {
            ids.extend_from_slice(&symbols);
            return;
        }
        // A doubly linked list over `symbols`; merged-away entries are marked dead.
        let mut prev: Vec<usize> = (0..n).map(|i| i.wrapping_sub(1)).collect();
        let mut next: Vec<usize> = (1..=n).collect();
        let mut alive = vec![true; n];
        let mut queue: BinaryHeap<Reverse<(u32, usize, u32)>> = BinaryHeap::new();
        for i in 0..n - 1 {
            if let Some(&(rank, merged)) = self.merges.get(&pair(symbols[i], symbols[i + 1])) {
                queue.push(Reverse((rank, i, merged)));
            }
        }
        while let Some(Reverse((_, at, merged))) = queue.pop() {
            // Skip entries made stale by an earlier merge.
            if !alive[at] || next[at] >= n {
                continue;
            }
            let right = next[at];
            match self.merges.get(&pair(symbols[at], symbols[right])) {
                Some(&(_, id)) if id == merged => {}
                _ => continue,
            }
            symbols[at] = merged;
            alive[right] = false;
            next[at] = next[right];
            if next[at] < n {
                prev[next[at]] = at;
            }
            if prev[at] < n
                && let Some(&(rank, id)) = self.merges.get(&pair(symbols[prev[at]], merged))
            {
                queue.push(Reverse((rank, prev[at], id)));
            }
            if next[at] < n
                && let Some(&(rank, id)) = self.merges.get(&pair(merged, symbols[next[at]]))
            {
                queue.push(Reverse((rank, at, id)));
            }
        }
        ids.extend((0..n).filter(|&i| alive[i]).map(|i| symbols[i]));
    }
}
