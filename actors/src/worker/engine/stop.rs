//! Stop sequences matched on the generated text, even when they span tokens.
//!
//! Text that could be the start of a stop sequence is held back until it is clear: either
//! the stop sequence completes (generation ends and the stop text is never emitted) or the
//! text turns out to be ordinary and is released.

/// Watches generated text for stop sequences.
#[derive(Debug, Clone)]
pub struct StopMatcher {
    stops: Vec<String>,
    held: String,
}

/// What to do with a piece of generated text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StopCheck {
    /// Text safe to send to the client now.
    pub emit: String,
    /// A stop sequence completed: end generation with finish reason `stop`.
    pub stopped: bool,
}

impl StopMatcher {
    /// A matcher for `stops`; empty strings are ignored.
    pub fn new(stops: impl IntoIterator<Item = String>) -> Self {
        StopMatcher {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            held: String::new(),
        }
    }

    /// Takes the next piece of generated text.
    pub fn push(&mut self, text: &str) -> StopCheck {
        self.held.push_str(text);
        let first_stop = self
            .stops
            .iter()
            .filter_map(|stop| self.held.find(stop.as_str()))
            .min();
        if let Some(at) = first_stop {
            let emit = self.held[..at].to_string();
            self.held.clear();
            return StopCheck {
                emit,
                stopped: true,
            };
        }
        let keep_from = self.partial_match_start();
        let emit = self.held[..keep_from].to_string();
        self.held.drain(..keep_from);
        StopCheck {
            emit,
            stopped: false,
        }
    }

    /// Generation ended for another reason: the held-back text is ordinary text.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }

    /// Where the longest tail of the held text that begins some stop sequence starts
    /// (the held text's length if none does).
    fn partial_match_start(&self) -> usize {
        self.held
            .char_indices()
            .map(|(i, _)| i)
            .find(|&i| {
                let tail = &self.held[i..];
                self.stops.iter().any(|stop| stop.starts_with(tail))
            })
            .unwrap_or(self.held.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], pieces: &[&str]) -> (String, bool) {
        let mut m = StopMatcher::new(stops.iter().map(|s| s.to_string()));
        let mut out = String::new();
        for p in pieces {
            let check = m.push(p);
            out.push_str(&check.emit);
            if check.stopped {
                return (out, true);
            }
        }
        out.push_str(&m.finish());
        (out, false)
    }

    #[test]
    fn a_stop_spanning_two_tokens_ends_without_being_emitted() {
        assert_eq!(
            run(&["<|im_end|>"], &["Hello", " world<|im", "_end|>", "more"]),
            ("Hello world".into(), true)
        );
    }

    #[test]
    fn a_false_start_is_released() {
        assert_eq!(run(&["STOP"], &["ST", "OP"]), ("".into(), true));
        assert_eq!(run(&["STOP"], &["ST", "ART"]), ("START".into(), false));
        assert_eq!(
            run(&["\n\n"], &["a\n", "b\n", "\n", "c"]),
            ("a\nb".into(), true)
        );
    }

    #[test]
    fn the_earliest_of_several_stops_wins() {
        assert_eq!(run(&["cd", "b"], &["abcd"]), ("a".into(), true));
    }

    #[test]
    fn text_is_emitted_as_soon_as_it_cannot_begin_a_stop() {
        let mut m = StopMatcher::new(["END".to_string()]);
        assert_eq!(m.push("abc").emit, "abc");
        assert_eq!(m.push("xE").emit, "x");
        assert_eq!(m.push("N").emit, "");
        assert_eq!(m.push("d").emit, "ENd");
    }

    #[test]
    fn multibyte_text_is_split_on_character_boundaries() {
        assert_eq!(run(&["é!"], &["café", "é", "?"]), ("caféé?".into(), false));
        assert_eq!(run(&["é!"], &["caf", "é", "!"]), ("caf".into(), true));
    }

    #[test]
    fn no_stops_means_everything_passes_through() {
        assert_eq!(run(&[], &["a", "b"]), ("ab".into(), false));
        assert_eq!(run(&[""], &["a"]), ("a".into(), false));
    }
}
