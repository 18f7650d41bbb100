//! What a session does when a prompt would not fit its context, and which turns of a
//! conversation it keeps when it must shorten one.

use crate::tokenizer::ChatMessage;

/// What to do when a prompt (with room for the reply) does not fit the session's context.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ContextPolicy {
    /// Refuse with [`crate::ModelError::ContextFull`] when the prompt itself does not fit;
    /// a reply that runs into the end stops with `ContextFull`. The default for raw text.
    Error,
    /// Chat: keep the leading system messages and the latest turns that fit (a turn starts
    /// at a user message), re-render, and reuse whatever cached prefix remains. The default
    /// for chat. Raw text has no turns: there it refuses like `Error`.
    DropOldestTurns,
    /// Raw text: keep BOS and the end of the text that fits; the cache is recomputed from
    /// the new start. In chat it drops whole turns, like `DropOldestTurns`, so the template's
    /// structure stays intact.
    TruncateStart,
}

/// [`ContextPolicy`]'s name was not one of [`ContextPolicy::NAMES`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown context policy '{0}' (expected one of: error, drop-oldest-turns, truncate-start)")]
pub struct UnknownContextPolicy(pub String);

impl ContextPolicy {
    pub const NAMES: [&'static str; 3] = ["error", "drop-oldest-turns", "truncate-start"];

    pub fn name(self) -> &'static str {
        match self {
            ContextPolicy::Error => "error",
            ContextPolicy::DropOldestTurns => "drop-oldest-turns",
            ContextPolicy::TruncateStart => "truncate-start",
        }
    }
}

impl std::str::FromStr for ContextPolicy {
    type Err = UnknownContextPolicy;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().replace('_', "-").as_str() {
            "error" => Ok(ContextPolicy::Error),
            "drop-oldest-turns" => Ok(ContextPolicy::DropOldestTurns),
            "truncate-start" => Ok(ContextPolicy::TruncateStart),
            _ => Err(UnknownContextPolicy(s.to_string())),
        }
    }
}

/// Positions a shortening policy keeps free for the reply: the reply's token budget, but at
/// most a quarter of the context, so a large `max_tokens` does not empty the prompt.
pub fn reply_reserve(max_tokens: usize, capacity: usize) -> usize {
    max_tokens.min(capacity / 4).max(1)
}

/// The shortest tail of `messages` worth trying first and every later one: the indices at
/// which a kept suffix may start (each user message after the leading system messages),
/// oldest first. The last user message always stays.
fn turn_starts(messages: &[ChatMessage]) -> (usize, Vec<usize>) {
    let system_len = messages.iter().take_while(|m| m.role == "system").count();
    let starts = messages
        .iter()
        .enumerate()
        .skip(system_len)
        .filter(|(_, m)| m.role == "user")
        .map(|(i, _)| i)
        .collect();
    (system_len, starts)
}

/// The conversation with its oldest turns dropped until `fits` accepts it: the leading
/// system messages plus the longest suffix that starts at a user message. Returns the kept
/// messages and how many were dropped, or `None` when even the last turn alone does not fit.
/// `fits` is asked about the whole conversation first.
pub fn drop_oldest_turns<E>(
    messages: &[ChatMessage],
    mut fits: impl FnMut(&[ChatMessage]) -> Result<bool, E>,
) -> Result<Option<(Vec<ChatMessage>, usize)>, E> {
    if fits(messages)? {
        return Ok(Some((messages.to_vec(), 0)));
    }
    let (system_len, starts) = turn_starts(messages);
    for &start in &starts {
        if start == system_len {
            continue; // the whole conversation, already refused
        }
        let mut kept = messages[..system_len].to_vec();
        kept.extend_from_slice(&messages[start..]);
        if fits(&kept)? {
            return Ok(Some((kept, start - system_len)));
        }
    }
    Ok(None)
}

/// Keeps BOS (when `tokens` starts with it) and as much of the end of `tokens` as fits in
/// `budget` positions.
pub fn truncate_start(tokens: &[u32], bos: Option<u32>, budget: usize) -> Vec<u32> {
    if tokens.len() <= budget {
        return tokens.to_vec();
    }
    let keep_bos = bos.is_some() && tokens.first() == bos.as_ref() && budget > 1;
    let tail = budget - usize::from(keep_bos);
    let mut out = Vec::with_capacity(budget);
    if keep_bos {
        out.push(tokens[0]);
    }
    out.extend_from_slice(&tokens[tokens.len() - tail..]);
    out
}

/// Length of the longest common prefix of two token sequences.
pub fn common_prefix_len(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(role: &str, content: &str) -> ChatMessage {
        ChatMessage::new(role, content)
    }

    fn total_len(messages: &[ChatMessage]) -> usize {
        messages.iter().map(|m| m.content.len()).sum()
    }

    #[test]
    fn policies_parse_by_name() {
        for name in ContextPolicy::NAMES {
            assert_eq!(name.parse::<ContextPolicy>().unwrap().name(), name);
        }
        assert_eq!(
            "DROP_OLDEST_TURNS".parse::<ContextPolicy>(),
            Ok(ContextPolicy::DropOldestTurns)
        );
        let err = "oldest".parse::<ContextPolicy>().unwrap_err();
        assert!(err.to_string().contains("'oldest'"), "{err}");
    }

    #[test]
    fn dropping_keeps_system_and_latest_turns() {
        let conversation = vec![
            msg("system", "ssss"),
            msg("user", "u1u1u1"),
            msg("assistant", "a1a1a1"),
            msg("user", "u2"),
            msg("assistant", "a2"),
            msg("user", "u3u3"),
        ];
        // Everything fits: nothing dropped.
        let (kept, dropped) =
            drop_oldest_turns(&conversation, |m| Ok::<_, ()>(total_len(m) <= 100))
                .unwrap()
                .unwrap();
        assert_eq!((kept.len(), dropped), (6, 0));
        // Room for the system message and the last two turns only.
        let (kept, dropped) = drop_oldest_turns(&conversation, |m| Ok::<_, ()>(total_len(m) <= 12))
            .unwrap()
            .unwrap();
        assert_eq!(dropped, 2);
        let roles: Vec<&str> = kept.iter().map(|m| m.role.as_str()).collect();
        assert_eq!(roles, ["system", "user", "assistant", "user"]);
        assert_eq!(kept[1].content, "u2");
        // Only the last turn.
        let (kept, dropped) = drop_oldest_turns(&conversation, |m| Ok::<_, ()>(total_len(m) <= 8))
            .unwrap()
            .unwrap();
        assert_eq!((kept.len(), dropped), (2, 4));
        assert_eq!(kept[1].content, "u3u3");
        // Not even that.
        assert!(
            drop_oldest_turns(&conversation, |m| Ok::<_, ()>(total_len(m) <= 7))
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn dropping_never_splits_a_turn_or_loses_the_last_message() {
        // No system message; the conversation ends with an assistant prefill.
        let conversation = vec![
            msg("user", "aaaa"),
            msg("assistant", "bbbb"),
            msg("user", "cc"),
            msg("assistant", "d"),
        ];
        let (kept, dropped) = drop_oldest_turns(&conversation, |m| Ok::<_, ()>(total_len(m) <= 5))
            .unwrap()
            .unwrap();
        assert_eq!(dropped, 2);
        assert_eq!(kept, conversation[2..]);
        // The fit check's error passes through.
        assert_eq!(
            drop_oldest_turns(&conversation, |_| Err::<bool, _>("render failed")),
            Err("render failed")
        );
    }

    #[test]
    fn truncating_keeps_bos_and_the_end() {
        let tokens = [1, 10, 11, 12, 13, 14];
        assert_eq!(truncate_start(&tokens, Some(1), 3), [1, 13, 14]);
        assert_eq!(truncate_start(&tokens, None, 3), [12, 13, 14]);
        assert_eq!(truncate_start(&tokens, Some(2), 3), [12, 13, 14]);
        assert_eq!(truncate_start(&tokens, Some(1), 1), [14]);
        assert_eq!(truncate_start(&tokens, Some(1), 9), tokens);
    }

    #[test]
    fn reserve_is_bounded_by_a_quarter_of_the_context() {
        assert_eq!(reply_reserve(256, 2048), 256);
        assert_eq!(reply_reserve(4096, 2048), 512);
        assert_eq!(reply_reserve(0, 2048), 1);
        assert_eq!(reply_reserve(100, 2), 1);
        assert_eq!(common_prefix_len(&[1, 2, 3], &[1, 2, 4, 5]), 2);
        assert_eq!(common_prefix_len(&[], &[1]), 0);
    }
}
