//! Prompt-prefix affinity: which worker most likely holds a request's prompt prefix in its
//! prefix cache.
//!
//! The queen does not tokenize, so it fingerprints prompts by their text: a chat by each
//! prefix of its messages (a second turn repeats the first turn's messages and answer),
//! raw text by each 256-byte prefix. A worker remembers the fingerprints of the requests it
//! was given (the most recent [`REMEMBERED`]); a new request goes to the worker that knows
//! its longest fingerprint when that worker has room and is not much busier than the least
//! busy one ([`Registry::pick`](super::registry::Registry::pick)).

use std::collections::{HashMap, VecDeque};
use std::hash::{DefaultHasher, Hash, Hasher};

use crate::worker::api::Prompt;

/// Fingerprints a worker remembers.
pub const REMEMBERED: usize = 4096;

/// Most fingerprints of one request (its longest prefixes).
const PER_REQUEST: usize = 64;

/// Bytes between two fingerprints of a raw text prompt.
const TEXT_STEP: usize = 256;

/// Fingerprints of the prefixes of `prompt`, shortest first.
pub fn fingerprints(prompt: &Prompt) -> Vec<u64> {
    let mut hasher = DefaultHasher::new();
    let mut prints = Vec::new();
    match prompt {
        Prompt::Chat(messages) => {
            0u8.hash(&mut hasher);
            for m in messages {
                m.role.hash(&mut hasher);
                m.content.hash(&mut hasher);
                prints.push(hasher.finish());
            }
        }
        Prompt::Text(text) => {
            1u8.hash(&mut hasher);
            for chunk in text.as_bytes().chunks(TEXT_STEP) {
                hasher.write(chunk);
                prints.push(hasher.finish());
            }
        }
    }
    let skip = prints.len().saturating_sub(PER_REQUEST);
    prints.drain(..skip);
    prints
}

/// The fingerprints one worker was given, oldest forgotten first.
#[derive(Debug, Default)]
pub struct Affinity {
    /// Fingerprint → when it was last given (a counter).
    seen: HashMap<u64, u64>,
    order: VecDeque<(u64, u64)>,
    clock: u64,
}

impl Affinity {
    /// Remembers a request's fingerprints.
    pub fn record(&mut self, prints: &[u64]) {
        for &p in prints {
            self.clock += 1;
            self.seen.insert(p, self.clock);
            self.order.push_back((p, self.clock));
        }
        // Entries superseded by a later record of the same fingerprint are skipped.
        while self.seen.len() > REMEMBERED
            && let Some((p, at)) = self.order.pop_front()
        {
            if self.seen.get(&p) == Some(&at) {
                self.seen.remove(&p);
            }
        }
        if self.order.len() > 4 * REMEMBERED {
            let seen = &self.seen;
            self.order.retain(|(p, at)| seen.get(p) == Some(at));
        }
    }

    /// How many of `prints` (a prefix of them) this worker was given: 0 for none.
    pub fn depth(&self, prints: &[u64]) -> usize {
        prints
            .iter()
            .rposition(|p| self.seen.contains_key(p))
            .map_or(0, |i| i + 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::worker::api::ChatMessage;

    fn chat(turns: &[&str]) -> Prompt {
        Prompt::Chat(
            turns
                .iter()
                .enumerate()
                .map(|(i, t)| ChatMessage {
                    role: if i % 2 == 0 { "user" } else { "assistant" }.into(),
                    content: t.to_string(),
                })
                .collect(),
        )
    }

    #[test]
    fn a_second_turn_matches_the_whole_first_turn() {
        let first = fingerprints(&chat(&["hello", "hi there", "how are you"]));
        let second = fingerprints(&chat(&["hello", "hi there", "how are you", "fine", "and?"]));
        assert_eq!(second[..3], first[..]);
        let mut worker = Affinity::default();
        worker.record(&first);
        assert_eq!(worker.depth(&second), 3);
        assert_eq!(worker.depth(&fingerprints(&chat(&["bye"]))), 0);
        // Raw text: a shared 600-byte beginning matches two 256-byte steps.
        let base = "x".repeat(600);
        let mut text = Affinity::default();
        text.record(&fingerprints(&Prompt::Text(format!("{base}A"))));
        assert_eq!(
            text.depth(&fingerprints(&Prompt::Text(format!("{base}B")))),
            2
        );
    }

    #[test]
    fn a_worker_forgets_its_oldest_fingerprints_first() {
        let mut worker = Affinity::default();
        let old = fingerprints(&chat(&["old"]));
        worker.record(&old);
        for i in 0..REMEMBERED {
            worker.record(&fingerprints(&chat(&[&format!("m{i}")])));
        }
        assert_eq!(worker.depth(&old), 0);
        assert_eq!(worker.seen.len(), REMEMBERED);
        assert!(worker.order.len() <= 4 * REMEMBERED + 1);
        assert_eq!(worker.depth(&fingerprints(&chat(&["m7"]))), 1);
    }
}
