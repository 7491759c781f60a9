//! Text from token ids as they arrive, and stop strings matched across token boundaries.
//!
//! [`IncrementalDetokenizer`] follows vLLM's offsets scheme: decode a short window of recent tokens
//! with and without the newest ones and emit the difference, holding text back while it ends in an
//! incomplete UTF-8 sequence (U+FFFD). The window starts inside the prompt, so a decoder that strips
//! a leading space at the start of a sequence does not strip the first generated word's.
//!
//! [`StopStrings`] finds the earliest stop string in the generated text and, while streaming, holds
//! back the tail that could still turn into one, so a client never sees part of a stop string.

use tokenizers::Tokenizer;

pub struct IncrementalDetokenizer {
    tokens: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
    skip_special: bool,
}

impl IncrementalDetokenizer {
    /// `prompt` supplies context only; its text is never emitted.
    pub fn new(prompt: &[u32], skip_special: bool) -> IncrementalDetokenizer {
        let start = prompt.len().saturating_sub(5);
        IncrementalDetokenizer { tokens: prompt[start..].to_vec(), prefix_offset: 0, read_offset: prompt.len() - start, skip_special }
    }

    /// Adds one token and returns the text it completes (possibly empty).
    pub fn push(&mut self, tok: &Tokenizer, token: u32) -> String {
        self.tokens.push(token);
        let decode = |ids: &[u32]| tok.decode(ids, self.skip_special).unwrap_or_default();
        let prefix = decode(&self.tokens[self.prefix_offset..self.read_offset]);
        let full = decode(&self.tokens[self.prefix_offset..]);
        if full.len() <= prefix.len() || full.ends_with('\u{FFFD}') {
            return String::new();
        }
        let Some(delta) = full.get(prefix.len()..) else { return String::new() };
        let delta = delta.to_string();
        self.prefix_offset = self.read_offset;
        self.read_offset = self.tokens.len();
        // Keep the window short: drop tokens before the prefix.
        if self.prefix_offset > 64 {
            self.tokens.drain(..self.prefix_offset);
            self.read_offset -= self.prefix_offset;
            self.prefix_offset = 0;
        }
        delta
    }
}

/// Stop-string state of one choice.
pub struct StopStrings {
    stops: Vec<String>,
    include: bool,
    /// Generated text so far (after any stop truncation).
    text: String,
    /// Bytes of `text` already handed out.
    sent: usize,
    longest: usize,
}

/// Where a stop string ended generation.
#[derive(Debug, Clone, PartialEq)]
pub struct StopHit {
    pub stop: String,
}

impl StopStrings {
    pub fn new(stops: Vec<String>, include_in_output: bool) -> StopStrings {
        let longest = stops.iter().map(|s| s.len()).max().unwrap_or(0);
        StopStrings { stops, include: include_in_output, text: String::new(), sent: 0, longest }
    }

    /// Appends generated text. `check` is false before `min_tokens`. Returns the text that may be sent
    /// now, and the stop string if one matched (generation must end).
    pub fn push(&mut self, delta: &str, check: bool) -> (String, Option<StopHit>) {
        let searched_from = self.text.len().saturating_sub(self.longest.saturating_sub(1));
        self.text.push_str(delta);
        if check && let Some((at, stop)) = self.find(searched_from) {
            let end = if self.include { at + stop.len() } else { at };
            self.text.truncate(end);
            return (self.flush(), Some(StopHit { stop }));
        }
        // Hold back a tail that could be the start of a stop string.
        let mut safe = if check { self.text.len().saturating_sub(self.longest.saturating_sub(1)) } else { self.text.len() };
        while !self.text.is_char_boundary(safe) {
            safe -= 1;
        }
        let out = if safe > self.sent { self.text[self.sent..safe].to_string() } else { String::new() };
        self.sent = self.sent.max(safe);
        (out, None)
    }

    /// Everything not yet sent (at the end of generation).
    pub fn flush(&mut self) -> String {
        let out = self.text[self.sent.min(self.text.len())..].to_string();
        self.sent = self.text.len();
        out
    }

    pub fn text(&self) -> &str {
        &self.text
    }

    fn find(&self, from: usize) -> Option<(usize, String)> {
        let mut from = from;
        while !self.text.is_char_boundary(from) {
            from -= 1;
        }
        self.stops.iter().filter_map(|s| self.text[from..].find(s.as_str()).map(|i| (from + i, s.clone()))).min_by_key(|(i, _)| *i)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_string_split_across_deltas_is_never_sent() {
        let mut s = StopStrings::new(vec!["STOP".into()], false);
        let mut sent = String::new();
        for d in ["Hello S", "T", "O", "P and more"] {
            let (out, hit) = s.push(d, true);
            sent.push_str(&out);
            if hit.is_some() {
                break;
            }
        }
        assert_eq!(sent, "Hello ");
        assert_eq!(s.text(), "Hello ");
    }

    #[test]
    fn held_back_text_is_released_when_it_cannot_be_a_stop() {
        let mut s = StopStrings::new(vec!["abc".into()], false);
        assert_eq!(s.push("xxab", true).0, "xx");
        // Only the last two bytes (one less than the stop's length) are ever held back.
        assert_eq!(s.push("d", true).0, "a");
        assert_eq!(s.flush(), "bd");
        let mut s = StopStrings::new(vec!["é!".into()], true);
        let (out, hit) = s.push("caféé!x", true);
        assert_eq!((out.as_str(), hit.map(|h| h.stop)), ("caféé!", Some("é!".to_string())));
    }

    #[test]
    fn before_min_tokens_stops_are_ignored() {
        let mut s = StopStrings::new(vec!["a".into()], false);
        assert_eq!(s.push("a", false), ("a".to_string(), None));
        assert_eq!(s.push("ba", true).1, Some(StopHit { stop: "a".into() }));
        assert_eq!(s.text(), "ab");
    }
}
