//! Fuzz targets for the inputs a client or a peer controls. Each is a pure function of arbitrary bytes
//! that runs the real code and panics only on a defect: a Rust panic inside it, an overflow or debug
//! assertion (the fuzz build turns both on), or a broken invariant checked here.
//!
//! - [`http_request`]: a request (method, path, headers, body) through the router's real axum app over
//!   a stub engine; no 5xx, every error OpenAI-shaped JSON, every body well formed.
//! - [`chat_template`]: a conversation through the chat path (message checks, the checkpoint's Gemma 4
//!   template, special-text protection, tokenizer); client text never becomes a control token.
//! - [`output_parser`]: model output through the Gemma 4 reasoning and tool-call parser, streamed and
//!   whole; any split of the stream gives the same result, arguments are JSON objects.
//! - [`dispatch_frame`]: protobuf bytes as an expert worker's `LayerRequest` (frame checks, then the
//!   experts of the tiny checkpoint) and as an attention worker's `GenerateRequest` sampling parameters.
//!
//! `tests/replay.rs` runs every file under `fuzz/corpus/<target>/` and `fuzz/regressions/<target>/`
//! through these functions; `scripts/fuzz.sh` builds them into libFuzzer binaries (`fuzz/libfuzzer/`).
//! docs/testing.md ("Fuzzing") has the details.

mod app;
mod chat;
mod frame;
mod http;
mod parser;

/// A fuzz target: takes any bytes, panics only on a defect.
pub type Target = fn(&[u8]);

/// The targets by name, as `scripts/fuzz.sh`, the corpus folders and the libFuzzer binaries name them.
pub const TARGETS: [(&str, Target); 4] = [
    ("http_request", http_request),
    ("chat_template", chat_template),
    ("output_parser", output_parser),
    ("dispatch_frame", dispatch_frame),
];

/// One HTTP request, as a client's bytes make it (format in `src/http.rs`).
pub fn http_request(data: &[u8]) {
    http::run(data)
}

/// One conversation and its options (format in `src/chat.rs`).
pub fn chat_template(data: &[u8]) {
    chat::run(data)
}

/// One model output and the parser's options and stream splits (format in `src/parser.rs`).
pub fn output_parser(data: &[u8]) {
    parser::run(data)
}

/// One protobuf message as a dispatch frame and as generation parameters (`src/frame.rs`).
pub fn dispatch_frame(data: &[u8]) {
    frame::run(data)
}

/// The committed fixtures the targets run on.
pub(crate) fn fixture_dir() -> std::path::PathBuf {
    std::path::PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/tiny-bf16"))
}

/// Reads a fuzz input front to back. Reads past the end give zeros and empty slices, so every input
/// means something and a longer one only adds to it.
pub(crate) struct Input<'a> {
    data: &'a [u8],
}

impl<'a> Input<'a> {
    pub(crate) fn new(data: &'a [u8]) -> Input<'a> {
        Input { data }
    }

    pub(crate) fn byte(&mut self) -> u8 {
        match self.data.split_first() {
            Some((&b, rest)) => {
                self.data = rest;
                b
            }
            None => 0,
        }
    }

    pub(crate) fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.byte(), self.byte()])
    }

    /// Up to and without the next `sep` (which is consumed), or everything left.
    pub(crate) fn until(&mut self, sep: u8) -> &'a [u8] {
        match self.data.iter().position(|&b| b == sep) {
            Some(at) => {
                let (head, rest) = self.data.split_at(at);
                self.data = &rest[1..];
                head
            }
            None => std::mem::take(&mut self.data),
        }
    }

    pub(crate) fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.data)
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.data.is_empty()
    }
}

/// Text from bytes: invalid UTF-8 becomes U+FFFD, as any text a client sends has been decoded by then.
pub(crate) fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}
