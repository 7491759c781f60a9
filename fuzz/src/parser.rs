//! `output_parser`: model output through the Gemma 4 reasoning and tool-call parser
//! (`gemma4::OutputParser`), whole (`parse_complete`, the non-streaming answer) and streamed.
//!
//! Input: byte 0 is the options (bit 0 reasoning, bit 1 tool calls, bit 2 the prompt left the channel
//! open, bit 3 `parallel_tool_calls: false`, bit 4 tool schemas that type the arguments); byte 1 how
//! many characters the first streamed delta has (it decides the missing-opener rule, as vLLM's first
//! delta does, so it is held fixed); byte 2 how many more cuts split the rest, then two bytes per cut;
//! the rest is the output text (at most 4 KiB; invalid UTF-8 is replaced, as the detokenizer does).
//!
//! Invariants: the stream sums to the same reasoning, content and calls however the text after the
//! first delta is split (in one piece, at the fuzzed cuts, and character by character for short
//! texts); each call's index only grows, its id and name come once, and its streamed arguments add up
//! to its final `arguments`, a JSON object, as do the non-streaming calls'; no calls are returned
//! unless tool calls are parsed. One exception, by design (vLLM's): a key the model writes twice takes
//! its last value, which may rewrite a value already streamed; the stream then stops short of the final
//! arguments (checked to happen only where a key repeats), and split invariance is not asked of it.

use serde_json::{Value, json};
use switchyard_router::gemma4::{self, Delta, OutputParser, ParseOptions};

use crate::{Input, text};

const MAX_TEXT: usize = 4 << 10;
const CHAR_BY_CHAR_BELOW: usize = 512;

pub(crate) fn run(data: &[u8]) {
    let mut input = Input::new(data);
    let flags = input.byte();
    let first_chars = input.byte() as usize;
    let cuts: Vec<usize> = (0..input.byte() % 8).map(|_| input.u16() as usize).collect();
    let bytes = input.rest();
    let out = text(&bytes[..bytes.len().min(MAX_TEXT)]);
    let specs = if flags & 16 != 0 { tool_specs() } else { Vec::new() };
    let opts = ParseOptions {
        reasoning: flags & 1 != 0,
        tools: flags & 2 != 0,
        tool_specs: specs,
        starts_in_reasoning: flags & 4 != 0,
        single_call: flags & 8 != 0,
    };

    let whole = gemma4::parse_complete(opts.clone(), &out);
    assert!(opts.tools || whole.tool_calls.is_empty(), "calls returned while tool calls are not parsed: {out:?}");
    for c in &whole.tool_calls {
        assert!(!c.name.is_empty(), "a call without a name: {out:?}");
        check_arguments(&c.arguments, &out);
    }
    if opts.single_call {
        assert!(whole.tool_calls.len() <= 1, "parallel_tool_calls: false, yet {} calls: {out:?}", whole.tool_calls.len());
    }

    let split = out.char_indices().nth(first_chars).map_or(out.len(), |(at, _)| at);
    let (first, rest) = out.split_at(split);
    let Some(reference) = stream(&opts, first, &[rest], &out) else { return };
    let mut points: Vec<usize> = cuts.iter().map(|&c| floor_char(rest, c % (rest.len() + 1))).collect();
    points.sort_unstable();
    points.dedup();
    let mut pieces = Vec::new();
    let mut from = 0;
    for &p in &points {
        pieces.push(&rest[from..p]);
        from = p;
    }
    pieces.push(&rest[from..]);
    if let Some(split) = stream(&opts, first, &pieces, &out) {
        assert_eq!(split, reference, "split at {points:?} after {first:?}: {out:?}");
    }
    if rest.len() < CHAR_BY_CHAR_BELOW {
        let chars: Vec<&str> = rest.char_indices().map(|(i, c)| &rest[i..i + c.len_utf8()]).collect();
        if let Some(singles) = stream(&opts, first, &chars, &out) {
            assert_eq!(singles, reference, "char by char after {first:?}: {out:?}");
        }
    }
}

fn floor_char(s: &str, mut i: usize) -> usize {
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

fn tool_specs() -> Vec<Value> {
    vec![
        json!({"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {
            "city": {"type": "string"}, "days": {"type": "integer"}, "units": {"type": "string", "enum": ["c", "f"]},
            "detail": {"type": "boolean"}, "at": {"type": "number"}, "tags": {"type": "array", "items": {"type": "string"}},
            "where": {"type": "object", "properties": {"lat": {"type": "number"}}}, "any": {"type": ["string", "null"]}}}}}),
        json!({"type": "function", "function": {"name": "search", "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}}}),
    ]
}

fn check_arguments(args: &str, out: &str) {
    let v: Value = serde_json::from_str(args).unwrap_or_else(|e| panic!("arguments that are not JSON ({e}): {args:?} from {out:?}"));
    assert!(v.is_object(), "arguments that are not an object: {args:?} from {out:?}");
}

/// What a stream added up to: reasoning, content and, per call index, its name and arguments.
#[derive(Debug, Default, PartialEq)]
struct Sum {
    reasoning: String,
    content: String,
    calls: Vec<(usize, String, String)>,
}

/// Streams the text in these pieces and checks the stream; `None` when a call's streamed arguments
/// stopped short of its final ones, which a repeated key causes (its last value wins, as in vLLM, and
/// rewrites a value already streamed): how far the stream got then depends on the split.
fn stream(opts: &ParseOptions, first: &str, rest: &[&str], out: &str) -> Option<Sum> {
    let mut p = OutputParser::new(opts.clone());
    let mut sum = Sum::default();
    let mut ids = 0;
    let mut add = |d: Delta, sum: &mut Sum| {
        sum.reasoning.push_str(&d.reasoning);
        sum.content.push_str(&d.content);
        for c in d.calls {
            let slot = match sum.calls.iter().position(|s| s.0 == c.index) {
                Some(i) => i,
                None => {
                    assert!(sum.calls.last().is_none_or(|s| s.0 < c.index), "a call index went back: {out:?}");
                    sum.calls.push((c.index, String::new(), String::new()));
                    sum.calls.len() - 1
                }
            };
            if let Some(name) = c.name {
                assert!(sum.calls[slot].1.is_empty(), "a call's name was sent twice: {out:?}");
                assert!(c.id.is_some(), "a call's name came without its id: {out:?}");
                sum.calls[slot].1 = name;
            }
            ids += usize::from(c.id.is_some());
            sum.calls[slot].2.push_str(&c.arguments);
        }
    };
    add(p.feed(first), &mut sum);
    for piece in rest {
        add(p.feed(piece), &mut sum);
    }
    add(p.finish(), &mut sum);
    assert_eq!(ids, sum.calls.len(), "every call gets one id: {out:?}");
    assert!(opts.tools || sum.calls.is_empty(), "calls streamed while tool calls are not parsed: {out:?}");
    let finals = p.tool_calls();
    assert_eq!(finals.len(), sum.calls.len(), "streamed and returned calls differ: {out:?}");
    let mut complete = true;
    for (f, (_, name, args)) in finals.iter().zip(&sum.calls) {
        assert_eq!(&f.name, name, "a call's streamed name is not its name: {out:?}");
        check_arguments(&f.arguments, out);
        if *args == f.arguments {
            continue;
        }
        // Only a key written twice may rewrite what was streamed (an empty key is written as a bare `:`).
        let v: Value = serde_json::from_str(&f.arguments).unwrap_or_default();
        let keys = v.as_object().map(|o| o.keys().cloned().collect::<Vec<_>>()).unwrap_or_default();
        let twice = |k: &str| out.matches(if k.is_empty() { ":" } else { k }).count() >= 2;
        assert!(
            keys.iter().any(|k| twice(k)),
            "a call's stream does not add up to it, and no key repeats: streamed {args:?}, final {:?}, from {out:?}",
            f.arguments
        );
        complete = false;
    }
    complete.then_some(sum)
}
