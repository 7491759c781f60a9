//! Gemma 4's output format, as vLLM's `gemma4` reasoning and tool-call parsers read it:
//!
//! ```text
//! <|channel>thought\n...reasoning...<channel|>answer<|tool_call>call:NAME{key:<|"|>v<|"|>}<tool_call|>
//! ```
//!
//! [`OutputParser`] is one state machine fed with text deltas (decoded with special tokens kept). It
//! can be fed any split of the text, down to single bytes inside a delimiter or a `<|"|>` quote: text
//! that could still become a delimiter is held back until it is decided. It yields
//! [`Delta`]s: reasoning first, then content and tool calls (name first, then argument fragments whose
//! concatenation is the final `arguments` JSON). [`parse_complete`] is the non-streaming form.

pub mod args;

use std::sync::atomic::{AtomicU64, Ordering};

use serde_json::Value;

use args::Arg;

pub const CHANNEL_START: &str = "<|channel>";
pub const CHANNEL_END: &str = "<channel|>";
pub const TOOL_CALL_START: &str = "<|tool_call>";
pub const TOOL_CALL_END: &str = "<tool_call|>";
const THOUGHT_PREFIX: &str = "thought\n";
/// Arguments longer than this are not re-parsed per delta (each parse reads them whole).
const MAX_STREAMED_ARGS: usize = 64 << 10;

/// What ends or interrupts content: the four delimiters, then special tokens that never belong in
/// content, should the model write them (absorbed as the content's terminals, so that they are held
/// back and dropped however the text is split).
const CONTENT_TERMINALS: [&str; 14] = [
    CHANNEL_START,
    CHANNEL_END,
    TOOL_CALL_START,
    TOOL_CALL_END,
    "<|turn>",
    "<turn|>",
    "<|tool>",
    "<tool|>",
    "<|tool_response>",
    "<tool_response|>",
    "<|think|>",
    "<|image|>",
    "<|audio|>",
    "<|video|>",
];

/// Which parts of the format a request parses.
#[derive(Clone, Debug, Default)]
pub struct ParseOptions {
    /// `--reasoning-parser gemma4`: channel text becomes `reasoning`.
    pub reasoning: bool,
    /// Tool calls become `tool_calls` (tools given, `tool_choice` not `none`, tool parsing enabled).
    pub tools: bool,
    /// The request's tools, whose schemas type the arguments.
    pub tool_specs: Vec<Value>,
    /// The prompt ends inside an open `<|channel>` block: output starts as reasoning.
    pub starts_in_reasoning: bool,
    /// `parallel_tool_calls: false`: only the first call is returned, as vLLM does.
    pub single_call: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Content,
    Reasoning,
    /// After `<|tool_call>`, before `call:`.
    Preamble,
    Name,
    Args,
}

/// One streamed tool-call fragment, as in OpenAI's `delta.tool_calls[]`.
#[derive(Clone, Debug, PartialEq)]
pub struct CallDelta {
    pub index: usize,
    /// With the first fragment of a call only.
    pub id: Option<String>,
    pub name: Option<String>,
    pub arguments: String,
}

/// What one feed produced.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Delta {
    pub reasoning: String,
    pub content: String,
    pub calls: Vec<CallDelta>,
}

impl Delta {
    pub fn is_empty(&self) -> bool {
        self.reasoning.is_empty() && self.content.is_empty() && self.calls.is_empty()
    }
}

/// A finished tool call.
#[derive(Clone, Debug, PartialEq)]
pub struct ToolCall {
    pub id: String,
    pub name: String,
    pub arguments: String,
}

#[derive(Debug, Default)]
struct Call {
    id: String,
    name: String,
    raw_args: String,
    /// Argument JSON already streamed.
    sent: String,
    /// Streaming stopped because a later parse was not an extension of what was sent.
    diverged: bool,
    /// The arguments JSON of the whole call, once it has ended.
    args: Option<String>,
    name_sent: bool,
    /// Content bytes before this call.
    content_at: usize,
    /// The index streamed deltas carry, when the call is returned: vLLM drops a call without a name,
    /// and with `parallel_tool_calls: false` every call after the first. Its streamed index counts the
    /// dropped calls before it (a client may see index 1 first), as vLLM's does.
    out_index: Option<usize>,
}

/// `chatcmpl-tool-` ids, unique within the process.
pub fn tool_call_id() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    format!("chatcmpl-tool-{:016x}{:08x}", t ^ n.rotate_left(32), n as u32)
}

pub struct OutputParser {
    opts: ParseOptions,
    state: State,
    /// Text not yet classified (it may be the start of a delimiter).
    held: String,
    /// Nothing has been fed yet (decides the missing-opener rule).
    first: bool,
    /// Reasoning seen so far, while the `thought\n` label may still be stripped.
    reasoning_head: Option<String>,
    /// Trailing whitespace of the reasoning: sent only if more reasoning follows.
    reasoning_ws: String,
    /// Trailing whitespace of the content: sent once more content or a call follows, dropped if
    /// nothing but whitespace came since the reasoning.
    content_ws: String,
    content_len: usize,
    calls: Vec<Call>,
}

impl OutputParser {
    pub fn new(opts: ParseOptions) -> OutputParser {
        let state = if opts.starts_in_reasoning { State::Reasoning } else { State::Content };
        OutputParser {
            opts,
            state,
            held: String::new(),
            first: true,
            reasoning_head: Some(String::new()),
            reasoning_ws: String::new(),
            content_ws: String::new(),
            content_len: 0,
            calls: Vec::new(),
        }
    }

    /// The delimiters that change state from the current one.
    fn terminals(&self) -> &'static [&'static str] {
        match self.state {
            State::Content => &CONTENT_TERMINALS,
            State::Reasoning => &[CHANNEL_START, CHANNEL_END, TOOL_CALL_START],
            State::Preamble => &[TOOL_CALL_END, "call:", ":"],
            State::Name => &["{", "(", TOOL_CALL_END],
            State::Args => &[TOOL_CALL_END],
        }
    }

    /// Feeds the next text delta: one token's text when streaming, the whole output otherwise.
    pub fn feed(&mut self, text: &str) -> Delta {
        let mut d = Delta::default();
        if std::mem::take(&mut self.first) && self.opts.reasoning && self.state == State::Content {
            // The first delta decides, as in vLLM: output that starts with the channel's `thought\n`
            // label, or closes a channel it never opened, wrote the channel without its opener.
            let opened = !text.contains(CHANNEL_START)
                && (text.contains(CHANNEL_END) || text.starts_with(THOUGHT_PREFIX) || text == THOUGHT_PREFIX.trim_end());
            if opened {
                self.held.push_str(CHANNEL_START);
            }
        }
        self.held.push_str(text);
        self.run(&mut d, false);
        d
    }

    /// Feeds a streamed piece; on the last one (`last`) also ends the output, in one delta.
    pub fn feed_piece(&mut self, text: &str, last: bool) -> Delta {
        let mut d = self.feed(text);
        if last {
            let end = self.finish();
            d.reasoning.push_str(&end.reasoning);
            d.content.push_str(&end.content);
            d.calls.extend(end.calls);
        }
        d
    }

    /// Ends the output: held text is released and an unfinished tool call is closed.
    pub fn finish(&mut self) -> Delta {
        let mut d = Delta::default();
        self.run(&mut d, true);
        match self.state {
            State::Reasoning => self.end_reasoning(),
            State::Name | State::Args | State::Preamble => self.end_call(&mut d),
            State::Content => {}
        }
        self.state = State::Content;
        self.flush_content_ws(&mut d);
        d
    }

    fn run(&mut self, d: &mut Delta, last: bool) {
        loop {
            let terms = self.terminals();
            let found = terms.iter().filter_map(|t| self.held.find(t).map(|at| (at, *t))).min_by_key(|(at, t)| (*at, usize::MAX - t.len()));
            match found {
                Some((at, term)) => {
                    let before: String = self.held.drain(..at).collect();
                    self.held.drain(..term.len());
                    self.text(d, &before);
                    self.transition(d, term);
                }
                None => {
                    // Hold back a tail that could still become a delimiter.
                    let keep = if last { 0 } else { partial_suffix(&self.held, terms) };
                    let cut = self.held.len() - keep;
                    let ready: String = self.held.drain(..cut).collect();
                    self.text(d, &ready);
                    return;
                }
            }
        }
    }

    fn text(&mut self, d: &mut Delta, t: &str) {
        if t.is_empty() {
            return;
        }
        match self.state {
            State::Content => self.content(d, t),
            State::Reasoning => self.reasoning(d, t),
            State::Preamble => {}
            State::Name => {
                if let Some(c) = self.calls.last_mut() {
                    c.name.push_str(t);
                }
            }
            State::Args => {
                if let Some(c) = self.calls.last_mut() {
                    c.raw_args.push_str(t);
                }
                // As vLLM: a new fragment only when structure arrives (each parse reads the whole call).
                if t.contains([',', ':', '{', '}', '[', ']', '<']) {
                    self.stream_args(d);
                }
            }
        }
    }

    /// Content, holding back trailing whitespace (dropped if a tool call follows).
    fn content(&mut self, d: &mut Delta, t: &str) {
        self.content_ws.push_str(t);
        let body = self.content_ws.trim_end().len();
        if body > 0 {
            let out: String = self.content_ws.drain(..body).collect();
            self.content_len += out.len();
            d.content.push_str(&out);
        }
    }

    fn flush_content_ws(&mut self, d: &mut Delta) {
        let ws = std::mem::take(&mut self.content_ws);
        self.content_len += ws.len();
        d.content.push_str(&ws);
    }

    /// Reasoning text, without the channel's `thought\n` label and without trailing whitespace.
    fn reasoning(&mut self, d: &mut Delta, t: &str) {
        let t = match self.reasoning_head.as_mut() {
            None => t.to_string(),
            Some(head) => {
                head.push_str(t);
                if let Some(rest) = head.strip_prefix(THOUGHT_PREFIX) {
                    let rest = rest.to_string();
                    self.reasoning_head = None;
                    rest
                } else if !THOUGHT_PREFIX.starts_with(head.as_str()) {
                    self.reasoning_head.take().unwrap_or_default()
                } else {
                    return; // may still be the label
                }
            }
        };
        self.reasoning_ws.push_str(&t);
        let body = self.reasoning_ws.trim_end().len();
        if body > 0 {
            let out: String = self.reasoning_ws.drain(..body).collect();
            if self.opts.reasoning {
                d.reasoning.push_str(&out);
            } else {
                self.content(d, &out);
            }
        }
    }

    /// Reasoning ends: a held label (`thought` alone) and trailing whitespace are dropped.
    fn end_reasoning(&mut self) {
        self.reasoning_head = Some(String::new());
        self.reasoning_ws.clear();
    }

    fn transition(&mut self, d: &mut Delta, term: &str) {
        self.state = match (self.state, term) {
            (State::Content, CHANNEL_START) => {
                self.flush_content_ws(d);
                State::Reasoning
            }
            (State::Reasoning, CHANNEL_END) => {
                self.end_reasoning();
                State::Content
            }
            (State::Content | State::Reasoning, TOOL_CALL_START) => {
                if self.state == State::Reasoning {
                    self.end_reasoning();
                }
                if self.content_len > 0 {
                    self.flush_content_ws(d); // vLLM streams it; the non-streaming result trims it
                } else {
                    self.content_ws.clear();
                }
                self.calls.push(Call { id: tool_call_id(), content_at: self.content_len, ..Call::default() });
                State::Preamble
            }
            (State::Preamble, "call:" | ":") => State::Name,
            (State::Name, "{" | "(") => {
                self.announce(d);
                State::Args
            }
            (State::Preamble | State::Name | State::Args, TOOL_CALL_END) => {
                self.end_call(d);
                State::Content
            }
            // `<|channel>` inside reasoning, a stray `<channel|>` or `<tool_call|>` in content, a special
            // token that does not belong in content: absorbed.
            (s, _) => s,
        };
    }

    /// The call's name is known: decide whether the client gets it, and send it (with its id and
    /// empty arguments).
    fn announce(&mut self, d: &mut Delta) {
        let returned = self.calls.iter().filter(|c| c.out_index.is_some()).count();
        let index = self.calls.len() - 1;
        let c = &mut self.calls[index];
        c.name = c.name.trim().to_string();
        c.name_sent = true;
        if self.opts.tools && !c.name.is_empty() && !(self.opts.single_call && returned > 0) {
            c.out_index = Some(index);
            d.calls.push(CallDelta { index, id: Some(c.id.clone()), name: Some(c.name.clone()), arguments: String::new() });
        }
    }

    fn properties(&self, name: &str) -> Option<&serde_json::Map<String, Value>> {
        self.opts.tool_specs.iter().find_map(|t| {
            let f = t.get("function")?;
            (f.get("name")?.as_str()? == name).then_some(())?;
            f.get("parameters")?.get("properties")?.as_object()
        })
    }

    fn typed_args(&self, index: usize, partial: bool) -> Vec<(String, Arg)> {
        let c = &self.calls[index];
        // The partial parse drops what the final one will (surrounding whitespace, the call's closing `}`)
        // as if the call ended here: inside an unterminated string they would otherwise be streamed as its
        // content, and the final arguments would no longer extend what was sent.
        let mut a = args::parse_call_args(&c.raw_args, partial);
        if let Some(props) = self.properties(&c.name) {
            args::coerce_fields(&mut a, props);
        }
        a
    }

    /// Streams the part of the arguments JSON that later text cannot change.
    fn stream_args(&mut self, d: &mut Delta) {
        let index = self.calls.len() - 1;
        let Some(out) = self.calls[index].out_index else { return };
        if self.calls[index].diverged || self.calls[index].raw_args.len() > MAX_STREAMED_ARGS {
            return; // past the cap, the rest comes in one piece when the call ends
        }
        let parsed = self.typed_args(index, true);
        let json = args::dumps_fields(&parsed);
        let string_keys = self
            .properties(&self.calls[index].name)
            .map(|p| p.iter().filter(|(_, s)| args::schema_types(s) == ["string"]).map(|(k, _)| k.clone()).collect::<Vec<_>>());
        let safe = safe_prefix(&json, string_keys.as_deref());
        let c = &mut self.calls[index];
        if safe.len() > c.sent.len() {
            if safe.starts_with(c.sent.as_str()) {
                let more = safe[c.sent.len()..].to_string();
                c.sent.push_str(&more);
                push_args(d, out, &more);
            } else {
                c.diverged = true;
            }
        }
    }

    /// The call is complete: send the rest of its arguments.
    fn end_call(&mut self, d: &mut Delta) {
        let index = self.calls.len() - 1;
        if !self.calls[index].name_sent {
            self.announce(d);
        }
        let Some(out) = self.calls[index].out_index else { return };
        let json = args::dumps_fields(&self.typed_args(index, false));
        let c = &mut self.calls[index];
        let rest = json.strip_prefix(c.sent.as_str()).unwrap_or_default().to_string();
        c.sent.push_str(&rest);
        c.args = Some(json);
        if !rest.is_empty() {
            push_args(d, out, &rest);
        }
    }

    /// The calls so far, with their final arguments (none unless tool calls are parsed): the whole
    /// call's arguments once it has ended, what was streamed before. The two differ only where a later
    /// parse rewrote what had been streamed (a repeated key, whose last value wins, as in vLLM): the
    /// stream then stops short, and the non-streaming answer still has the call's real arguments.
    pub fn tool_calls(&self) -> Vec<ToolCall> {
        self.calls
            .iter()
            .filter(|c| c.out_index.is_some())
            .map(|c| ToolCall { id: c.id.clone(), name: c.name.clone(), arguments: c.args.clone().unwrap_or_else(|| c.sent.clone()) })
            .collect()
    }

    pub fn has_tool_calls(&self) -> bool {
        self.calls.iter().any(|c| c.out_index.is_some())
    }

    /// Content bytes before the first returned call (the non-streaming content, once trimmed).
    fn content_before_call(&self) -> Option<usize> {
        self.calls.iter().find(|c| c.out_index.is_some()).map(|c| c.content_at)
    }
}

fn push_args(d: &mut Delta, index: usize, more: &str) {
    match d.calls.last_mut() {
        Some(c) if c.index == index => c.arguments.push_str(more),
        _ => d.calls.push(CallDelta { index, id: None, name: None, arguments: more.to_string() }),
    }
}

/// Length of the longest tail of `s` that is a proper prefix of one of `terms`.
fn partial_suffix(s: &str, terms: &[&str]) -> usize {
    let mut best = 0;
    for t in terms {
        for k in (1..t.len()).rev() {
            if k <= best {
                break;
            }
            if s.ends_with(&t[..k]) {
                best = k;
                break;
            }
        }
    }
    best
}

/// The prefix of a partial arguments JSON object that no later text can change: everything up to the
/// last top-level `:`, plus the unterminated content of a trailing string value whose key is a plain
/// string in the schema (or any key when there is no schema).
fn safe_prefix<'a>(json: &'a str, string_keys: Option<&[String]>) -> &'a str {
    let b = json.as_bytes();
    let (mut in_str, mut esc, mut depth) = (false, false, 0i32);
    let (mut str_start, mut last_colon, mut pending, mut last_key) = (0usize, None, None::<&str>, None::<&str>);
    for (i, &c) in b.iter().enumerate() {
        if esc {
            esc = false;
            continue;
        }
        if in_str {
            if c == b'\\' {
                esc = true;
            } else if c == b'"' {
                in_str = false;
                if depth == 1 {
                    pending = Some(&json[str_start + 1..i]);
                }
            }
            continue;
        }
        match c {
            b'"' => {
                in_str = true;
                str_start = i;
            }
            b'{' | b'[' => depth += 1,
            b'}' | b']' => depth -= 1,
            b':' if depth == 1 => {
                last_colon = Some(i);
                last_key = pending.take();
            }
            _ => {}
        }
    }
    let Some(colon) = last_colon else { return "" };
    let mut end = colon + 1;
    while end < b.len() && matches!(b[end], b' ' | b'\t' | b'\n' | b'\r') {
        end += 1;
    }
    if end >= b.len() || b[end] != b'"' {
        return &json[..end];
    }
    if let (Some(keys), Some(k)) = (string_keys, last_key)
        && !keys.iter().any(|x| x == k)
    {
        return &json[..end];
    }
    let mut esc = false;
    for i in end + 1..b.len() {
        if esc {
            esc = false;
        } else if b[i] == b'\\' {
            esc = true;
        } else if b[i] == b'"' {
            return &json[..i];
        }
    }
    json
}

/// The non-streaming result.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Parsed {
    pub reasoning: Option<String>,
    pub content: Option<String>,
    pub tool_calls: Vec<ToolCall>,
}

/// Parses a complete output as vLLM's non-streaming path does: the prompt is not consulted, and
/// with tool calls the content is the text before the first call, trimmed.
pub fn parse_complete(opts: ParseOptions, text: &str) -> Parsed {
    let mut p = OutputParser::new(ParseOptions { starts_in_reasoning: false, ..opts });
    let mut all = p.feed(text);
    let end = p.finish();
    all.reasoning.push_str(&end.reasoning);
    all.content.push_str(&end.content);
    let tool_calls = p.tool_calls();
    let content = match p.content_before_call() {
        Some(n) => all.content[..n.min(all.content.len())].trim().to_string(),
        None => all.content,
    };
    Parsed {
        reasoning: (!all.reasoning.is_empty()).then_some(all.reasoning),
        content: (!content.is_empty()).then_some(content),
        tool_calls,
    }
}

/// Whether a prompt ends inside an open `<|channel>` block (the continuation after a tool response,
/// with thinking on), so that output starts as reasoning: scanning back, the opener comes before any
/// closer, tool call or turn boundary. `id` looks a token up by its text.
pub fn prompt_ends_in_open_channel(prompt: &[u32], id: impl Fn(&str) -> Option<u32>) -> bool {
    let Some(open) = id(CHANNEL_START) else { return false };
    let boundaries: Vec<u32> = [CHANNEL_END, TOOL_CALL_START, "<|turn>", "<|tool_response>"].iter().filter_map(|s| id(s)).collect();
    for &t in prompt.iter().rev() {
        if t == open {
            return true;
        }
        if boundaries.contains(&t) {
            return false;
        }
    }
    false
}

/// Whether the prompt has left the reasoning channel (so a structured-output grammar applies from the
/// first output token), as vLLM's `is_reasoning_end` judges it. Scanning back: a closer or a tool
/// call means ended, an opener means not; a turn or tool-response boundary means ended unless
/// thinking is on (`enable_thinking`); a prompt with none of them has ended.
pub fn prompt_reasoning_ended(prompt: &[u32], thinking: bool, id: impl Fn(&str) -> Option<u32>) -> bool {
    let ended: Vec<u32> = [CHANNEL_END, TOOL_CALL_START].iter().filter_map(|s| id(s)).collect();
    let open = id(CHANNEL_START);
    let boundary: Vec<u32> = ["<|turn>", "<|tool_response>"].iter().filter_map(|s| id(s)).collect();
    for &t in prompt.iter().rev() {
        if ended.contains(&t) {
            return true;
        }
        if Some(t) == open {
            return false;
        }
        if boundary.contains(&t) {
            return !thinking;
        }
    }
    true
}

/// The `finish_reason` vLLM reports. Non-streaming: any parsed call, and every `tool_choice:
/// "required"` request, report `tool_calls`. Streaming: a call turns `stop` into `tool_calls`.
pub fn finish_reason(raw: &'static str, called: bool, required: bool, streaming: bool) -> &'static str {
    match (streaming, called, required, raw) {
        (false, true, _, _) | (false, _, true, _) => "tool_calls",
        (true, true, _, "stop") => "tool_calls",
        _ => raw,
    }
}
