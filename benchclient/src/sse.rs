//! Incremental server-sent-events decoding: bytes as they arrive from the socket in, `data` payloads out.
//!
//! Follows the WHATWG event-stream rules that OpenAI-style servers rely on: lines end in `\n`, `\r\n` or
//! `\r`; a blank line ends an event; `data:` lines of one event are joined with `\n`; lines starting with `:`
//! are comments (keep-alive pings); other fields (`event:`, `id:`, `retry:`) do not matter here. Network reads
//! may split a line or a UTF-8 sequence anywhere, so bytes are buffered until a whole line is present.

/// Turns a byte stream into the `data` payloads of its events.
#[derive(Debug, Default)]
pub struct SseDecoder {
    /// Bytes of the current, unfinished line.
    line: Vec<u8>,
    /// `data` lines of the current, unfinished event.
    data: Option<String>,
    /// The previous byte was a `\r`, so a `\n` right after it ends nothing new.
    after_cr: bool,
}

impl SseDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds the next bytes; returns the payloads of the events they complete, in order.
    pub fn push(&mut self, bytes: &[u8]) -> Vec<String> {
        let mut events = Vec::new();
        for &b in bytes {
            match b {
                b'\n' if self.after_cr => self.after_cr = false,
                b'\n' | b'\r' => {
                    self.after_cr = b == b'\r';
                    self.end_line(&mut events);
                }
                _ => {
                    self.after_cr = false;
                    self.line.push(b);
                }
            }
        }
        events
    }

    /// Ends the stream: an event the server did not close with a blank line still counts, as in vLLM's client.
    pub fn finish(mut self) -> Option<String> {
        if !self.line.is_empty() {
            // A non-empty line only ever adds to `data`; it cannot complete an event by itself.
            self.end_line(&mut Vec::new());
        }
        self.data
    }

    fn end_line(&mut self, events: &mut Vec<String>) {
        let line = String::from_utf8_lossy(&self.line).into_owned();
        self.line.clear();
        if line.is_empty() {
            events.extend(self.data.take());
            return;
        }
        if line.starts_with(':') {
            return;
        }
        let (field, value) = match line.split_once(':') {
            Some((field, value)) => (field, value.strip_prefix(' ').unwrap_or(value)),
            None => (line.as_str(), ""),
        };
        if field == "data" {
            match &mut self.data {
                Some(data) => {
                    data.push('\n');
                    data.push_str(value);
                }
                None => self.data = Some(value.to_owned()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_in_pieces(input: &str, piece: usize) -> Vec<String> {
        let mut decoder = SseDecoder::new();
        let mut out = Vec::new();
        for chunk in input.as_bytes().chunks(piece) {
            out.extend(decoder.push(chunk));
        }
        out.extend(decoder.finish());
        out
    }

    #[test]
    fn events_survive_any_split() {
        let input = "data: {\"a\":\"é\"}\n\n: ping\n\ndata: [DONE]\n\n";
        for piece in 1..input.len() {
            assert_eq!(decode_in_pieces(input, piece), ["{\"a\":\"é\"}", "[DONE]"], "piece size {piece}");
        }
    }

    #[test]
    fn crlf_and_bare_cr_line_endings() {
        assert_eq!(decode_in_pieces("data: 1\r\n\r\ndata: 2\r\rdata:3\n\n", 3), ["1", "2", "3"]);
    }

    #[test]
    fn multi_line_data_joins_and_other_fields_are_ignored() {
        assert_eq!(decode_in_pieces("event: x\nid: 4\ndata: a\ndata: b\n\n", 5), ["a\nb"]);
    }

    #[test]
    fn unterminated_last_event_is_kept() {
        assert_eq!(decode_in_pieces("data: 1\n\ndata: 2", 4), ["1", "2"]);
        assert_eq!(decode_in_pieces("data: 1\n\ndata: 2\n", 4), ["1", "2"]);
    }

    #[test]
    fn comments_alone_yield_nothing() {
        assert!(decode_in_pieces(": keep-alive\n\n:\n\n", 2).is_empty());
    }
}
