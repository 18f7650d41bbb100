//! Zero-shot multiple-choice accuracy (ARC-Easy/Challenge, PIQA, HellaSwag) scored as
//! EleutherAI's lm-evaluation-harness does, so figures are comparable with its `acc` and
//! `acc_norm`:
//!
//! - each choice is the continuation `" " + choice` (lm-eval's target delimiter) of the
//!   task's context, and its score is the sum of `log p` of the continuation's tokens;
//! - context and continuation are tokenized as lm-eval's `_encode_pair`: trailing whitespace
//!   of the context moves to the continuation, `context + continuation` is tokenized whole and
//!   the continuation's tokens are the tail beyond the separately tokenized context's tokens
//!   (BOS is prepended per the model's tokenizer spec, `add_bos`);
//! - `acc` takes the choice of highest log-likelihood; `acc_norm` the highest log-likelihood
//!   divided by the choice's length in characters (lm-eval's `len(choice)`, which for the
//!   ASCII data of these tasks is also its length in bytes);
//! - the standard error is lm-eval's `sqrt(p (1 - p) / (n - 1))`.
//!
//! Data files are JSON Lines in the Hugging Face `datasets` layout of each task (see
//! [`Task`]). The context is run once per example and shared by its choices through the KV
//! cache, which is truncated back to the context before each choice.

use std::path::Path;
use std::str::FromStr;
use std::time::Instant;

use serde_json::Value;

use super::{EvalError, log_sum_exp, proportion_stderr};
use pocketlm_runtime::model::{KvCache, Logits, Model};

/// lm-eval's `target_delimiter`: put between the context and each choice.
pub const TARGET_DELIMITER: &str = " ";

/// What is wrong with one JSON record of a task's data file ([`Task::parse_record`]).
/// `path` is the field's dotted path in the record (`choices.text`).
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum RecordError {
    #[error("missing field '{path}'")]
    MissingField { path: String },
    #[error("field '{path}' is not a string")]
    NotAString { path: String },
    #[error("field '{path}' is not a list")]
    NotAList { path: String },
    #[error("field '{path}' has a non-string entry {entry}")]
    NonStringEntry { path: String, entry: Value },
    #[error("field '{path}' is not an answer index: {value}")]
    NotAnIndex { path: String, value: Value },
    #[error("'choices.text' has {texts} entries but 'choices.label' has {labels}")]
    ChoiceLabelCount { texts: usize, labels: usize },
    #[error("answerKey {key:?} is not one of the labels {labels:?}")]
    UnknownAnswerKey { key: String, labels: Vec<String> },
    #[error("no choices")]
    NoChoices,
    #[error("gold answer index {gold} is out of range for {choices} choices")]
    GoldOutOfRange { gold: usize, choices: usize },
}

/// Why a line of a task's data file was rejected (the file and line are named by
/// [`EvalError::Data`]).
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("not a JSON object: {0}")]
    Json(#[source] serde_json::Error),
    #[error("not a JSON object")]
    NotAnObject,
    #[error("{task} record: {source}")]
    Record {
        task: Task,
        #[source]
        source: RecordError,
    },
}

/// A task name that is not one of [`Task::ALL`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown task {name:?} (expected one of {})", task_names())]
pub struct UnknownTask {
    pub name: String,
}

fn task_names() -> String {
    let names: Vec<_> = Task::ALL.iter().map(|t| t.name()).collect();
    names.join(", ")
}

/// A zero-shot task and the JSON Lines layout it reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Task {
    /// `allenai/ai2_arc` ARC-Easy: `question`, `choices.text`, `choices.label`, `answerKey`.
    ArcEasy,
    /// `allenai/ai2_arc` ARC-Challenge, same layout as ARC-Easy.
    ArcChallenge,
    /// `piqa`: `goal`, `sol1`, `sol2`, `label` (0 or 1).
    Piqa,
    /// `hellaswag`: `activity_label`, `ctx_a`, `ctx_b`, `endings`, `label`.
    Hellaswag,
}

impl Task {
    pub const ALL: [Task; 4] = [
        Task::ArcEasy,
        Task::ArcChallenge,
        Task::Piqa,
        Task::Hellaswag,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Task::ArcEasy => "arc-easy",
            Task::ArcChallenge => "arc-challenge",
            Task::Piqa => "piqa",
            Task::Hellaswag => "hellaswag",
        }
    }

    /// Turns one JSON record into an [`Example`] (with `line` 0; see [`parse_examples`]).
    pub fn parse_record(self, record: &Value) -> Result<Example, RecordError> {
        match self {
            Task::ArcEasy | Task::ArcChallenge => {
                let question = string_field(record, "question")?;
                let texts = string_list(record, "choices.text")?;
                let labels = string_list(record, "choices.label")?;
                if texts.len() != labels.len() {
                    return Err(RecordError::ChoiceLabelCount {
                        texts: texts.len(),
                        labels: labels.len(),
                    });
                }
                let key = string_field(record, "answerKey")?;
                let gold = labels.iter().position(|l| l == key).ok_or_else(|| {
                    RecordError::UnknownAnswerKey {
                        key: key.to_string(),
                        labels: labels.clone(),
                    }
                })?;
                Example::new(format!("Question: {question}\nAnswer:"), texts, gold)
            }
            Task::Piqa => {
                let goal = string_field(record, "goal")?;
                let choices = vec![
                    string_field(record, "sol1")?.to_string(),
                    string_field(record, "sol2")?.to_string(),
                ];
                let gold = index_field(record, "label")?;
                Example::new(format!("Question: {goal}\nAnswer:"), choices, gold)
            }
            Task::Hellaswag => {
                let ctx = format!(
                    "{} {}",
                    string_field(record, "ctx_a")?,
                    python_capitalize(string_field(record, "ctx_b")?)
                );
                let activity = string_field(record, "activity_label")?;
                let query = hellaswag_preprocess(&format!("{activity}: {ctx}"));
                let endings = string_list(record, "endings")?
                    .iter()
                    .map(|e| hellaswag_preprocess(e))
                    .collect();
                let gold = index_field(record, "label")?;
                Example::new(query, endings, gold)
            }
        }
    }
}

impl std::fmt::Display for Task {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Task {
    type Err = UnknownTask;

    fn from_str(s: &str) -> Result<Task, UnknownTask> {
        let key = s.trim().to_ascii_lowercase().replace('_', "-");
        Task::ALL
            .into_iter()
            .find(|t| t.name() == key)
            .ok_or_else(|| UnknownTask {
                name: s.to_string(),
            })
    }
}

/// One multiple-choice question.
#[derive(Clone, Debug, PartialEq)]
pub struct Example {
    /// Line of the data file it came from (1-based; 0 when not read from a file).
    pub line: usize,
    pub context: String,
    /// Choice texts without the delimiter.
    pub choices: Vec<String>,
    /// Index of the correct choice.
    pub gold: usize,
}

impl Example {
    fn new(context: String, choices: Vec<String>, gold: usize) -> Result<Example, RecordError> {
        if choices.is_empty() {
            return Err(RecordError::NoChoices);
        }
        if gold >= choices.len() {
            return Err(RecordError::GoldOutOfRange {
                gold,
                choices: choices.len(),
            });
        }
        Ok(Example {
            line: 0,
            context,
            choices,
            gold,
        })
    }

    /// The continuations scored for this example: `TARGET_DELIMITER + choice`.
    pub fn continuations(&self) -> Vec<String> {
        self.choices
            .iter()
            .map(|c| format!("{TARGET_DELIMITER}{c}"))
            .collect()
    }
}

/// Parses JSON Lines `text` (named `source_name` in errors) into at most `limit` examples.
/// Blank lines are skipped; a malformed line is an [`EvalError::Data`] naming its line.
pub fn parse_examples(
    task: Task,
    text: &str,
    source_name: &str,
    limit: Option<usize>,
) -> Result<Vec<Example>, EvalError> {
    let mut examples = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if limit.is_some_and(|l| examples.len() >= l) {
            break;
        }
        if line.trim().is_empty() {
            continue;
        }
        let error = |source: DataError| EvalError::Data {
            source_name: source_name.to_string(),
            line: i + 1,
            source: Box::new(source),
        };
        let record: Value = serde_json::from_str(line).map_err(|e| error(DataError::Json(e)))?;
        if !record.is_object() {
            return Err(error(DataError::NotAnObject));
        }
        let mut example = task
            .parse_record(&record)
            .map_err(|source| error(DataError::Record { task, source }))?;
        example.line = i + 1;
        examples.push(example);
    }
    Ok(examples)
}

/// Reads a JSON Lines file with [`parse_examples`].
pub fn load_examples(
    task: Task,
    path: &Path,
    limit: Option<usize>,
) -> Result<Vec<Example>, EvalError> {
    let text = std::fs::read_to_string(path).map_err(|source| EvalError::Io {
        path: path.display().to_string(),
        source,
    })?;
    parse_examples(task, &text, &path.display().to_string(), limit)
}

fn field<'a>(record: &'a Value, path: &str) -> Result<&'a Value, RecordError> {
    let mut v = record;
    for key in path.split('.') {
        v = v.get(key).ok_or_else(|| RecordError::MissingField {
            path: path.to_string(),
        })?;
    }
    Ok(v)
}

fn string_field<'a>(record: &'a Value, path: &str) -> Result<&'a str, RecordError> {
    field(record, path)?
        .as_str()
        .ok_or_else(|| RecordError::NotAString {
            path: path.to_string(),
        })
}

fn string_list(record: &Value, path: &str) -> Result<Vec<String>, RecordError> {
    let items = field(record, path)?
        .as_array()
        .ok_or_else(|| RecordError::NotAList {
            path: path.to_string(),
        })?;
    items
        .iter()
        .map(|v| {
            v.as_str()
                .map(str::to_string)
                .ok_or_else(|| RecordError::NonStringEntry {
                    path: path.to_string(),
                    entry: v.clone(),
                })
        })
        .collect()
}

/// An answer index given as a JSON integer or a string of digits (HellaSwag's `"2"`).
fn index_field(record: &Value, path: &str) -> Result<usize, RecordError> {
    let v = field(record, path)?;
    let index = match v {
        Value::Number(n) => n.as_u64(),
        Value::String(s) => s.trim().parse::<u64>().ok(),
        _ => None,
    };
    index
        .and_then(|i| usize::try_from(i).ok())
        .ok_or_else(|| RecordError::NotAnIndex {
            path: path.to_string(),
            value: v.clone(),
        })
}

/// Python's `str.capitalize()`: the first character upper-cased, the rest lower-cased.
pub fn python_capitalize(s: &str) -> String {
    let mut chars = s.chars();
    match chars.next() {
        None => String::new(),
        Some(first) => first
            .to_uppercase()
            .chain(chars.as_str().to_lowercase().chars())
            .collect(),
    }
}

/// lm-eval's HellaSwag `preprocess`: strip, `" [title]"` → `". "`, drop `[...]` tags (the
/// regex `\[.*?\]`, which does not cross a newline), then `"  "` → `" "` (one pass).
pub fn hellaswag_preprocess(text: &str) -> String {
    let text = text.trim().replace(" [title]", ". ");
    remove_bracketed(&text).replace("  ", " ")
}

/// `re.sub(r"\[.*?\]", "", s)`: removes each `[` up to the nearest `]` on the same line.
fn remove_bracketed(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(open) = rest.find('[') {
        let after = &rest[open + 1..];
        match after.find([']', '\n']) {
            Some(i) if after.as_bytes()[i] == b']' => {
                out.push_str(&rest[..open]);
                rest = &after[i + 1..];
            }
            _ => {
                out.push_str(&rest[..=open]);
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

/// Log-likelihood of one continuation.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ChoiceScore {
    /// `Σ log p(token | prefix)` over the continuation's tokens (nats).
    pub loglik: f64,
    /// Number of continuation tokens.
    pub tokens: usize,
}

/// Tokenizes a (context, continuation) pair as lm-eval's `_encode_pair` (see the module
/// docs): returns the context's tokens and the continuation's. An empty context becomes the
/// BOS token (or EOS when the model has no BOS), lm-eval's prefix token.
pub fn encode_pair(
    model: &Model,
    context: &str,
    continuation: &str,
) -> Result<(Vec<u32>, Vec<u32>), EvalError> {
    let (context, moved) = context.split_at(context.trim_end().len());
    let add_bos = model.tokenizer_spec().add_bos;
    let tokenizer = model.tokenizer();
    let context_tokens = tokenizer.encode(context, add_bos)?;
    let whole = tokenizer.encode(&format!("{context}{moved}{continuation}"), add_bos)?;
    let continuation_tokens = whole[context_tokens.len().min(whole.len())..].to_vec();
    if context_tokens.is_empty() {
        let prefix = tokenizer
            .bos_token_id()
            .or_else(|| tokenizer.eos_token_ids().first().copied())
            .ok_or_else(|| {
                EvalError::Invalid("empty context and the model has no BOS or EOS token".into())
            })?;
        return Ok((vec![prefix], continuation_tokens));
    }
    Ok((context_tokens, continuation_tokens))
}

/// Scores continuations of a shared context, reusing one KV cache across calls.
pub struct Scorer<'m> {
    model: &'m Model,
    cache: Option<KvCache>,
    /// Contexts cut from the left to fit the model's context window so far.
    pub truncated: usize,
}

impl<'m> Scorer<'m> {
    pub fn new(model: &'m Model) -> Scorer<'m> {
        Scorer {
            model,
            cache: None,
            truncated: 0,
        }
    }

    /// Log-likelihood of each continuation after `context`. The context runs once; each
    /// continuation runs from the cache truncated back to it. When context plus the longest
    /// continuation exceed the model's context window, the context loses its first tokens
    /// (lm-eval truncates from the left too).
    pub fn score(
        &mut self,
        context: &str,
        continuations: &[String],
    ) -> Result<Vec<ChoiceScore>, EvalError> {
        let model = self.model;
        let mut context_tokens = Vec::new();
        let mut conts = Vec::with_capacity(continuations.len());
        for (i, continuation) in continuations.iter().enumerate() {
            let (ctx, cont) = encode_pair(model, context, continuation)?;
            if cont.is_empty() {
                return Err(EvalError::Invalid(format!(
                    "choice {i} ({continuation:?}) adds no tokens to the context"
                )));
            }
            context_tokens = ctx;
            conts.push(cont);
        }
        let longest = conts.iter().map(Vec::len).max().unwrap_or(0);
        let window = model.config().max_position_embeddings;
        // The last continuation token is predicted, never fed.
        let needed = context_tokens.len() + longest - 1;
        if needed > window {
            let drop = needed - window;
            if drop >= context_tokens.len() {
                return Err(EvalError::Invalid(format!(
                    "a continuation of {longest} tokens does not fit the model's context of \
                     {window} tokens"
                )));
            }
            log::warn!(
                "context of {} tokens cut by {drop} to fit the model's {window}-token window",
                context_tokens.len()
            );
            context_tokens.drain(..drop);
            self.truncated += 1;
        }
        let needed = context_tokens.len() + longest - 1;
        let cache = match &mut self.cache {
            Some(cache) if cache.capacity() >= needed => cache,
            slot => slot.insert(model.new_cache(needed.next_power_of_two().max(256))?),
        };
        cache.clear();
        let vocab = model.config().vocab_size;
        let first = model.forward(&context_tokens, cache, Logits::Last)?;
        let prefix_len = cache.len();
        let mut scores = Vec::with_capacity(conts.len());
        for cont in &conts {
            if cache.can_truncate_to(prefix_len) {
                cache.truncate(prefix_len);
            } else {
                // A sliding-window ring buffer overwrote positions the context needs.
                cache.clear();
                model.forward(&context_tokens, cache, Logits::Last)?;
            }
            let mut loglik = log_prob(&first, cont[0]);
            if cont.len() > 1 {
                let logits = model.forward(&cont[..cont.len() - 1], cache, Logits::All)?;
                for (row, &target) in logits.chunks_exact(vocab).zip(&cont[1..]) {
                    loglik += log_prob(row, target);
                }
            }
            scores.push(ChoiceScore {
                loglik,
                tokens: cont.len(),
            });
        }
        Ok(scores)
    }
}

fn log_prob(logits: &[f32], target: u32) -> f64 {
    logits[target as usize] as f64 - log_sum_exp(logits)
}

/// Index of the first maximum (numpy's `argmax`).
fn first_argmax(values: impl IntoIterator<Item = f64>) -> usize {
    let mut best = (0, f64::NEG_INFINITY);
    for (i, v) in values.into_iter().enumerate() {
        if v > best.1 || (i == 0 && v.is_nan()) {
            best = (i, v);
        }
    }
    best.0
}

/// How one example was scored.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct ExampleScore {
    pub line: usize,
    pub gold: usize,
    /// Per choice, the continuation's log-likelihood.
    pub logliks: Vec<f64>,
    /// Highest log-likelihood (acc).
    pub pred: usize,
    /// Highest log-likelihood per character of the choice (acc_norm).
    pub pred_norm: usize,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct ZeroShotResult {
    pub task: &'static str,
    pub examples: usize,
    /// lm-eval `acc`.
    pub accuracy: f64,
    pub accuracy_stderr: f64,
    /// lm-eval `acc_norm`.
    pub accuracy_norm: f64,
    pub accuracy_norm_stderr: f64,
    pub correct: usize,
    pub correct_norm: usize,
    /// Continuation tokens scored over all choices.
    pub tokens_scored: usize,
    /// Examples whose context was cut to fit the model's context window.
    pub truncated: usize,
    pub seconds: f64,
    /// Per example (not serialized).
    #[serde(skip)]
    pub details: Vec<ExampleScore>,
}

/// Scores every example; `progress(done, total, accuracy_so_far)` after each.
pub fn evaluate(
    model: &Model,
    task: Task,
    examples: &[Example],
    mut progress: impl FnMut(usize, usize, f64),
) -> Result<ZeroShotResult, EvalError> {
    let started = Instant::now();
    let mut scorer = Scorer::new(model);
    let mut details = Vec::with_capacity(examples.len());
    let (mut correct, mut correct_norm, mut tokens) = (0, 0, 0);
    for (done, ex) in examples.iter().enumerate() {
        let scores = scorer
            .score(&ex.context, &ex.continuations())
            .map_err(|e| match e {
                EvalError::Invalid(m) => EvalError::Invalid(format!(
                    "{task} example {} (line {}): {m}",
                    done + 1,
                    ex.line
                )),
                other => other,
            })?;
        let logliks: Vec<f64> = scores.iter().map(|s| s.loglik).collect();
        tokens += scores.iter().map(|s| s.tokens).sum::<usize>();
        let pred = first_argmax(logliks.iter().copied());
        let pred_norm = first_argmax(
            logliks
                .iter()
                .zip(&ex.choices)
                .map(|(ll, c)| ll / c.chars().count() as f64),
        );
        correct += usize::from(pred == ex.gold);
        correct_norm += usize::from(pred_norm == ex.gold);
        details.push(ExampleScore {
            line: ex.line,
            gold: ex.gold,
            logliks,
            pred,
            pred_norm,
        });
        progress(done + 1, examples.len(), correct as f64 / (done + 1) as f64);
    }
    let n = examples.len();
    let accuracy = correct as f64 / n.max(1) as f64;
    let accuracy_norm = correct_norm as f64 / n.max(1) as f64;
    Ok(ZeroShotResult {
        task: task.name(),
        examples: n,
        accuracy,
        accuracy_stderr: proportion_stderr(accuracy, n),
        accuracy_norm,
        accuracy_norm_stderr: proportion_stderr(accuracy_norm, n),
        correct,
        correct_norm,
        tokens_scored: tokens,
        truncated: scorer.truncated,
        seconds: started.elapsed().as_secs_f64(),
        details,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hellaswag_preprocess_matches_lm_eval() {
        // Expected values computed with lm-eval's `preprocess` in Python.
        assert_eq!(
            hellaswag_preprocess("  Drying hair: [header] How to dry hair [title] Towel it.  "),
            "Drying hair: How to dry hair. Towel it."
        );
        assert_eq!(hellaswag_preprocess("a [step] b [substeps] c"), "a b c");
        // Lazy: each tag ends at the nearest bracket; an unclosed one stays.
        assert_eq!(hellaswag_preprocess("x [a] y [b] z [c"), "x y z [c");
        // The tag pattern does not cross a newline.
        assert_eq!(hellaswag_preprocess("p [a\nb] q"), "p [a\nb] q");
        // "  " → " " is a single pass: three spaces become two.
        assert_eq!(hellaswag_preprocess("a   b"), "a  b");
        assert_eq!(hellaswag_preprocess(""), "");
    }

    #[test]
    fn python_capitalize_lowercases_the_rest() {
        assert_eq!(
            python_capitalize("then, the MAN jumps"),
            "Then, the man jumps"
        );
        assert_eq!(python_capitalize(""), "");
        assert_eq!(python_capitalize("élan VITAL"), "Élan vital");
    }

    #[test]
    fn hellaswag_record_becomes_query_and_endings() {
        let record = serde_json::json!({
            "activity_label": "Removing ice from car",
            "ctx_a": "Then, the man writes over the snow covering the window of a car, and a woman wearing winter clothes smiles.",
            "ctx_b": "then",
            "endings": [", the man adds wax to the windshield and cuts it.", ", a person board a ski lift, while two men supporting the head of the person wearing winter clothes snow as the we girls sled.", ", the man puts on a christmas coat, knitted with netting.", ", the man continues removing the snow on his car."],
            "label": "3"
        });
        let ex = Task::Hellaswag.parse_record(&record).unwrap();
        assert_eq!(
            ex.context,
            "Removing ice from car: Then, the man writes over the snow covering the window of a \
             car, and a woman wearing winter clothes smiles. Then"
        );
        assert_eq!(ex.gold, 3);
        assert_eq!(
            ex.choices[3],
            ", the man continues removing the snow on his car."
        );
        assert_eq!(
            ex.continuations()[0],
            " , the man adds wax to the windshield and cuts it."
        );
        // WikiHow-style tags inside the query.
        let record = serde_json::json!({
            "activity_label": "Home and Garden",
            "ctx_a": "[header] How to grow basil [title] Choose a sunny spot.",
            "ctx_b": "",
            "endings": ["[step] Water it.", "b"],
            "label": 0
        });
        let ex = Task::Hellaswag.parse_record(&record).unwrap();
        assert_eq!(
            ex.context,
            "Home and Garden: How to grow basil. Choose a sunny spot."
        );
        // Stripped before the tag goes, so the space after it stays (as in lm-eval).
        assert_eq!(ex.choices[0], " Water it.");
    }

    #[test]
    fn arc_and_piqa_records() {
        let arc = serde_json::json!({"question": "Q?", "choices": {"text": ["a", "b", "c"],
            "label": ["1", "2", "3"]}, "answerKey": "2"});
        let ex = Task::ArcEasy.parse_record(&arc).unwrap();
        assert_eq!(ex.context, "Question: Q?\nAnswer:");
        assert_eq!(ex.gold, 1);
        let bad = serde_json::json!({"question": "Q?", "choices": {"text": ["a"],
            "label": ["A"]}, "answerKey": "B"});
        let err = Task::ArcChallenge
            .parse_record(&bad)
            .unwrap_err()
            .to_string();
        assert!(err.contains("answerKey \"B\""), "{err}");
        let piqa = serde_json::json!({"goal": "g", "sol1": "x", "sol2": "y", "label": 1});
        let ex = Task::Piqa.parse_record(&piqa).unwrap();
        assert_eq!((ex.gold, ex.choices.len()), (1, 2));
        let piqa = serde_json::json!({"goal": "g", "sol1": "x", "sol2": "y", "label": 2});
        assert!(
            Task::Piqa
                .parse_record(&piqa)
                .unwrap_err()
                .to_string()
                .contains("out of range")
        );
    }

    #[test]
    fn malformed_lines_are_named() {
        let text =
            "{\"goal\": \"g\", \"sol1\": \"x\", \"sol2\": \"y\", \"label\": 0}\n\n{\"goal\": 1}\n";
        let err = parse_examples(Task::Piqa, text, "piqa.jsonl", None).unwrap_err();
        assert_eq!(
            err.to_string(),
            "piqa.jsonl:3: piqa record: field 'goal' is not a string"
        );
        let err = parse_examples(Task::Piqa, "{oops", "p", None).unwrap_err();
        assert!(
            err.to_string().starts_with("p:1: not a JSON object"),
            "{err}"
        );
        // The limit stops before the bad line.
        let ok = parse_examples(Task::Piqa, text, "piqa.jsonl", Some(1)).unwrap();
        assert_eq!(ok.len(), 1);
        assert_eq!(ok[0].line, 1);
    }

    #[test]
    fn task_names_parse() {
        for t in Task::ALL {
            assert_eq!(t.name().parse::<Task>().unwrap(), t);
        }
        assert_eq!("ARC_Easy".parse::<Task>().unwrap(), Task::ArcEasy);
        assert_eq!(
            "mmlu".parse::<Task>().unwrap_err().to_string(),
            "unknown task \"mmlu\" (expected one of arc-easy, arc-challenge, piqa, hellaswag)"
        );
    }

    #[test]
    fn argmax_takes_the_first_maximum() {
        assert_eq!(first_argmax([1.0, 3.0, 3.0]), 1);
        assert_eq!(first_argmax([-1.0, f64::NEG_INFINITY]), 0);
    }
}
