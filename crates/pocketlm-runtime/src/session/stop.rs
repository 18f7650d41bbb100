//! Stop strings in streamed text.

/// Holds back text that could be the start of a stop string, so a stop string is never
/// streamed out before it is recognised.
pub(crate) struct StopMatcher {
    stops: Vec<String>,
    pending: String,
}

impl StopMatcher {
    pub(crate) fn new(stops: &[String]) -> Self {
        StopMatcher {
            stops: stops.to_vec(),
            pending: String::new(),
        }
    }

    /// Returns the text that is safe to emit, and whether a stop string was found.
    pub(crate) fn push(&mut self, piece: &str) -> (String, bool) {
        self.pending.push_str(piece);
        let found = self
            .stops
            .iter()
            .filter(|s| !s.is_empty())
            .filter_map(|s| self.pending.find(s.as_str()))
            .min();
        if let Some(at) = found {
            let emit = self.pending[..at].to_string();
            self.pending.clear();
            return (emit, true);
        }
        // Longest suffix of `pending` that is a proper prefix of some stop string.
        let hold = self
            .stops
            .iter()
            .map(|s| {
                (1..s.len().min(self.pending.len() + 1))
                    .rev()
                    .find(|&k| s.is_char_boundary(k) && self.pending.ends_with(&s[..k]))
                    .unwrap_or(0)
            })
            .max()
            .unwrap_or(0);
        let cut = self.pending.len() - hold;
        let emit = self.pending[..cut].to_string();
        self.pending.drain(..cut);
        (emit, false)
    }

    pub(crate) fn flush(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn stop_matcher_holds_back_partial_stop_strings() {
        let stops = vec!["<END>".to_string(), "\n\n".to_string()];
        let mut m = StopMatcher::new(&stops);
        assert_eq!(m.push("Hello <"), ("Hello ".to_string(), false));
        assert_eq!(m.push("EN"), (String::new(), false));
        assert_eq!(m.push("X"), ("<ENX".to_string(), false));
        assert_eq!(m.push(" a\n"), (" a".to_string(), false));
        assert_eq!(m.push("\nrest"), (String::new(), true));
        let mut m = StopMatcher::new(&stops);
        assert_eq!(m.push("abc<EN"), ("abc".to_string(), false));
        assert_eq!(m.flush(), "<EN");
    }

    #[test]
    fn stop_matcher_without_stops_passes_everything() {
        let mut m = StopMatcher::new(&[]);
        assert_eq!(m.push("é<"), ("é<".to_string(), false));
    }
}
