//! Chat templates: the minijinja environment a model's template renders in (nesting and
//! output limits for hostile templates, the Python string methods templates call), and
//! how its errors are worded.

use super::*;

/// minijinja's Display carries the kind and detail ("invalid operation: <msg>"); add the
/// template location and any source errors.
pub(super) fn describe_jinja_error(err: &JinjaError) -> String {
    let mut msg = err.to_string();
    let mut source = std::error::Error::source(err);
    while let Some(s) = source {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        source = s.source();
    }
    msg
}

/// Deepest nesting a chat template may use. minijinja's parser and renderer recurse once per
/// level of brackets, unary operators and block tags, so a template from a hostile model file
/// nested thousands of levels deep would overflow the stack (found by fuzzing); real
/// templates nest a handful of levels.
pub(super) const MAX_TEMPLATE_NESTING: usize = 64;

/// The deepest of: bracket nesting (`(`, `[`, `{`), the longest run of unary operators (`-`,
/// `+`, `not`), and block-tag nesting (`{% if %}` … `{% endif %}` and the other blocks).
/// Counted over the whole source, strings included: an over-estimate is harmless here.
pub(super) fn template_nesting(source: &str) -> usize {
    let (mut brackets, mut deepest) = (0usize, 0usize);
    for c in source.chars() {
        match c {
            '(' | '[' | '{' => {
                brackets += 1;
                deepest = deepest.max(brackets);
            }
            ')' | ']' | '}' => brackets = brackets.saturating_sub(1),
            _ => {}
        }
    }
    let mut unary = 0usize;
    for word in source.split(|c: char| c.is_whitespace() || c == '(' || c == ')') {
        if word.is_empty() {
            continue;
        }
        let signs = word.len() - word.trim_start_matches(['-', '+']).len();
        unary += if word == "not" { 1 } else { signs };
        deepest = deepest.max(unary);
        if word != "not" && signs < word.len() {
            unary = 0;
        }
    }
    let mut blocks = 0usize;
    let mut rest = source;
    while let Some(at) = rest.find("{%") {
        rest = &rest[at + 2..];
        let tag = rest.trim_start_matches(['-', '+']).trim_start();
        let word = tag
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .next()
            .unwrap_or("");
        if word.starts_with("end") {
            blocks = blocks.saturating_sub(1);
        } else if matches!(
            word,
            "if" | "for" | "macro" | "call" | "filter" | "with" | "block" | "autoescape" | "raw"
        ) {
            blocks += 1;
            deepest = deepest.max(blocks);
        }
    }
    deepest
}

pub(super) fn build_template_env(source: &str) -> Result<Environment<'static>, TokenizerError> {
    if source.len() > MAX_CHAT_TEMPLATE_LEN {
        return Err(TokenizerError::Template(format!(
            "chat template is {} bytes, more than the {} KiB limit",
            source.len(),
            MAX_CHAT_TEMPLATE_LEN >> 10
        )));
    }
    let nesting = template_nesting(source);
    if nesting > MAX_TEMPLATE_NESTING {
        return Err(TokenizerError::Template(format!(
            "chat template nests {nesting} levels deep (brackets, unary operators or block \
             tags), more than the {MAX_TEMPLATE_NESTING} allowed"
        )));
    }
    let mut env = Environment::new();
    // transformers renders with trim_blocks and lstrip_blocks; templates are written for that.
    let syntax = minijinja::syntax::SyntaxConfig::builder()
        .trim_blocks(true)
        .lstrip_blocks(true)
        .build()
        .map_err(|e| TokenizerError::Template(describe_jinja_error(&e)))?;
    namespace_guard::check_namespace_use(source, TEMPLATE_NAME, syntax.clone())
        .map_err(TokenizerError::Template)?;
    env.set_syntax(syntax);
    env.set_fuel(Some(TEMPLATE_FUEL));
    env.add_function(
        "raise_exception",
        |msg: String| -> Result<Value, JinjaError> {
            Err(JinjaError::new(JinjaErrorKind::InvalidOperation, msg))
        },
    );
    env.set_unknown_method_callback(python_method);
    env.add_template_owned(TEMPLATE_NAME, source.to_string())
        .map_err(|e| TokenizerError::Template(describe_jinja_error(&e)))?;
    Ok(env)
}

pub(super) fn bad_arg(msg: impl Into<String>) -> JinjaError {
    JinjaError::new(JinjaErrorKind::InvalidOperation, msg.into())
}

/// Python `str`/`dict` methods that HF chat templates call (minijinja has no methods on
/// strings, and `minijinja-contrib`'s pycompat is not a dependency).
pub(super) fn python_method(
    state: &mut minijinja::State,
    value: &Value,
    method: &str,
    args: &[Value],
) -> Result<Value, JinjaError> {
    if let Some(s) = value.as_str() {
        return string_method(s, method, args);
    }
    if value.kind() == ValueKind::Map {
        match method {
            "items" => {
                let () = from_args(args)?;
                return state.apply_filter("items", std::slice::from_ref(value));
            }
            "keys" => {
                let () = from_args(args)?;
                return Ok(Value::from(value.try_iter()?.collect::<Vec<_>>()));
            }
            "values" => {
                let () = from_args(args)?;
                let values = value
                    .try_iter()?
                    .map(|k| value.get_item(&k))
                    .collect::<Result<Vec<_>, _>>()?;
                return Ok(Value::from(values));
            }
            "get" => {
                let (key, default): (&Value, Option<&Value>) = from_args(args)?;
                let item = value.get_item(key)?;
                return Ok(if item.is_undefined() {
                    default.cloned().unwrap_or(Value::from(()))
                } else {
                    item
                });
            }
            _ => {}
        }
    }
    Err(JinjaError::from(JinjaErrorKind::UnknownMethod))
}

/// Errors unless `size` (bytes or items) is within [`MAX_TEMPLATE_METHOD_OUTPUT`].
pub(super) fn check_output_size(method: &str, size: Option<usize>) -> Result<(), JinjaError> {
    match size {
        Some(n) if n <= MAX_TEMPLATE_METHOD_OUTPUT => Ok(()),
        _ => Err(bad_arg(format!(
            "{method}: result would exceed {} MiB",
            MAX_TEMPLATE_METHOD_OUTPUT >> 20
        ))),
    }
}

pub(super) fn string_method(s: &str, method: &str, args: &[Value]) -> Result<Value, JinjaError> {
    let strip_set = |chars: Option<&str>| -> Vec<char> {
        chars.map(|c| c.chars().collect()).unwrap_or_default()
    };
    let is_strip = |set: &[char], c: char| {
        if set.is_empty() {
            c.is_whitespace()
        } else {
            set.contains(&c)
        }
    };
    Ok(match method {
        "strip" | "lstrip" | "rstrip" => {
            let (chars,): (Option<&str>,) = from_args(args)?;
            let set = strip_set(chars);
            let f = |c: char| is_strip(&set, c);
            Value::from(match method {
                "strip" => s.trim_matches(f),
                "lstrip" => s.trim_start_matches(f),
                _ => s.trim_end_matches(f),
            })
        }
        "startswith" | "endswith" => {
            let (prefix,): (&Value,) = from_args(args)?;
            let test = |p: &str| {
                if method == "startswith" {
                    s.starts_with(p)
                } else {
                    s.ends_with(p)
                }
            };
            // Python accepts a tuple of alternatives.
            let hit = if let Some(p) = prefix.as_str() {
                test(p)
            } else if matches!(prefix.kind(), ValueKind::Seq) {
                let mut any = false;
                for p in prefix.try_iter()? {
                    let p = p
                        .as_str()
                        .ok_or_else(|| bad_arg(format!("{method}: expected strings")))?
                        .to_string();
                    any |= test(&p);
                }
                any
            } else {
                return Err(bad_arg(format!("{method}: expected a string or tuple")));
            };
            Value::from(hit)
        }
        "split" | "rsplit" => {
            let (sep, maxsplit): (Option<&str>, Option<i64>) = from_args(args)?;
            let max = maxsplit.filter(|&m| m >= 0).map(|m| m as usize);
            // Each part costs a String and a template value however short it is.
            let pieces = match sep {
                Some(sep) if !sep.is_empty() => s.matches(sep).count() + 1,
                _ => s.split_whitespace().count() + 1,
            };
            check_output_size(method, Some(pieces.min(max.unwrap_or(usize::MAX)) * 64))?;
            let parts: Vec<String> = match sep {
                Some("") => return Err(bad_arg("split: empty separator")),
                Some(sep) => match (max, method) {
                    (Some(m), "split") => s.splitn(m + 1, sep).map(str::to_string).collect(),
                    (Some(m), _) => {
                        let mut v: Vec<String> =
                            s.rsplitn(m + 1, sep).map(str::to_string).collect();
                        v.reverse();
                        v
                    }
                    (None, _) => s.split(sep).map(str::to_string).collect(),
                },
                // Python's sep=None: split on whitespace runs, dropping empty parts.
                None => match max {
                    // Like CPython: after `m` splits the rest (leading whitespace skipped,
                    // trailing kept) is the last part.
                    Some(m) if method == "split" => {
                        let mut v = Vec::new();
                        let mut rest = s.trim_start();
                        while !rest.is_empty() {
                            if v.len() == m {
                                v.push(rest.to_string());
                                break;
                            }
                            let (word, tail) =
                                rest.split_once(char::is_whitespace).unwrap_or((rest, ""));
                            v.push(word.to_string());
                            rest = tail.trim_start();
                        }
                        v
                    }
                    // rsplit(None, m) is treated as a full split (rare in templates).
                    _ => s.split_whitespace().map(str::to_string).collect(),
                },
            };
            Value::from(parts)
        }
        "lower" => {
            let () = from_args(args)?;
            Value::from(s.to_lowercase())
        }
        "upper" => {
            let () = from_args(args)?;
            Value::from(s.to_uppercase())
        }
        "capitalize" => {
            let () = from_args(args)?;
            let mut chars = s.chars();
            Value::from(match chars.next() {
                Some(first) => first
                    .to_uppercase()
                    .chain(chars.flat_map(char::to_lowercase))
                    .collect(),
                None => String::new(),
            })
        }
        "replace" => {
            let (old, new, count): (&str, &str, Option<i64>) = from_args(args)?;
            let found = if old.is_empty() {
                s.chars().count() + 1
            } else {
                s.matches(old).count()
            };
            let n = match count {
                Some(c) if c >= 0 => found.min(c as usize),
                _ => found,
            };
            let size = n
                .checked_mul(new.len())
                .and_then(|grow| (s.len() - n * old.len()).checked_add(grow));
            check_output_size(method, size)?;
            Value::from(match count {
                Some(n) if n >= 0 => s.replacen(old, new, n as usize),
                _ => s.replace(old, new),
            })
        }
        "find" => {
            let (needle,): (&str,) = from_args(args)?;
            // Python returns a character index.
            Value::from(s.find(needle).map_or(-1, |b| s[..b].chars().count() as i64))
        }
        "count" => {
            let (needle,): (&str,) = from_args(args)?;
            Value::from(if needle.is_empty() {
                s.chars().count() + 1
            } else {
                s.matches(needle).count()
            })
        }
        "join" => {
            let (items,): (&Value,) = from_args(args)?;
            let mut parts = Vec::new();
            let mut size = Some(0usize);
            for item in items.try_iter()? {
                let part = item.to_string();
                size = size
                    .and_then(|n| n.checked_add(part.len()))
                    .and_then(|n| n.checked_add(if parts.is_empty() { 0 } else { s.len() }));
                check_output_size(method, size)?;
                parts.push(part);
            }
            Value::from(parts.join(s))
        }
        _ => return Err(JinjaError::from(JinjaErrorKind::UnknownMethod)),
    })
}
