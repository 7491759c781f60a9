//! The Gemma 4 reasoning and tool-call parsers against vLLM 0.32's own results
//! (`tests/fixtures/parsers/gemma4.json`, made by `tests/fixtures/make_parser_fixtures.py`, which runs
//! vLLM's serving code on each output). Each case is checked non-streaming, streamed one token at a
//! time through our detokenizer exactly as the server streams it, and streamed in arbitrary splits:
//! the first token's text, then the rest cut at every character (inside delimiters and `<|"|>`
//! quotes too), and character by character.

use serde_json::{Value, json};
use switchyard_router::detokenize::IncrementalDetokenizer;
use switchyard_router::gemma4::{self, Delta, OutputParser, ParseOptions};
use tokenizers::Tokenizer;

fn root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn fixture() -> Value {
    let text = std::fs::read_to_string(root().join("tests/fixtures/parsers/gemma4.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

fn cases(fx: &Value, tok: &Tokenizer) -> Vec<(String, Value, ParseOptions, bool)> {
    let tools = fx["tools"].as_array().unwrap().clone();
    fx["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            let has_tools = c["tools"].as_bool().unwrap();
            let choice = c["tool_choice"].as_str();
            // The fixture server ran --reasoning-parser gemma4 --enable-auto-tool-choice --tool-call-parser gemma4.
            let parse_tools = has_tools && choice != Some("none");
            let prompt = ids(&c["prompt_token_ids"]);
            let opts = ParseOptions {
                reasoning: true,
                tools: parse_tools,
                tool_specs: if has_tools { tools.clone() } else { Vec::new() },
                starts_in_reasoning: gemma4::prompt_ends_in_open_channel(&prompt, |t| tok.token_to_id(t)),
                single_call: c["parallel_tool_calls"] == json!(false),
            };
            (c["name"].as_str().unwrap().to_string(), c.clone(), opts, choice == Some("required"))
        })
        .collect()
}

/// What a stream's deltas add up to, in the fixture's shape.
#[derive(Default)]
struct Sum {
    reasoning: Option<String>,
    content: Option<String>,
    /// (index, name, arguments), in order of first appearance.
    calls: Vec<(usize, String, String)>,
    kinds: Vec<&'static str>,
    ids: Vec<String>,
}

impl Sum {
    fn add(&mut self, d: &Delta) {
        let mut kind = |k: &'static str| {
            if self.kinds.last() != Some(&k) {
                self.kinds.push(k);
            }
        };
        if !d.reasoning.is_empty() {
            kind("reasoning");
            self.reasoning.get_or_insert_default().push_str(&d.reasoning);
        }
        if !d.content.is_empty() {
            kind("content");
            self.content.get_or_insert_default().push_str(&d.content);
        }
        for c in &d.calls {
            kind("tool_call");
            let slot = match self.calls.iter().position(|s| s.0 == c.index) {
                Some(i) => i,
                None => {
                    assert!(self.calls.last().is_none_or(|s| s.0 < c.index), "call indices only grow");
                    self.calls.push((c.index, String::new(), String::new()));
                    self.calls.len() - 1
                }
            };
            if let Some(n) = &c.name {
                assert!(self.calls[slot].1.is_empty(), "a call's name is sent once");
                self.calls[slot].1 = n.clone();
            }
            if let Some(id) = &c.id {
                self.ids.push(id.clone());
            }
            self.calls[slot].2.push_str(&c.arguments);
        }
    }

    fn json(&self, finish: &str) -> Value {
        let calls: Vec<Value> = self.calls.iter().map(|(i, n, a)| json!({"index": i, "name": n, "arguments": a})).collect();
        json!({"reasoning": self.reasoning, "content": self.content, "tool_calls": calls, "kinds": self.kinds, "finish_reason": finish})
    }
}

fn expected_stream(c: &Value) -> Value {
    let e = &c["expected_stream"];
    json!({"reasoning": e["reasoning"], "content": e["content"], "tool_calls": e["tool_calls"], "kinds": e["kinds"], "finish_reason": e["finish_reason"]})
}

fn stream(opts: &ParseOptions, chunks: &[String], raw_finish: &'static str) -> Value {
    let mut p = OutputParser::new(opts.clone());
    let mut sum = Sum::default();
    for ch in chunks {
        sum.add(&p.feed(ch));
    }
    sum.add(&p.finish());
    assert_eq!(sum.ids.len(), sum.calls.len(), "every call gets one id");
    sum.json(gemma4::finish_reason(raw_finish, p.has_tool_calls(), false, true))
}

fn raw_finish(c: &Value) -> &'static str {
    match c["finish_reason"].as_str().unwrap() {
        "stop" => "stop",
        "length" => "length",
        other => panic!("unexpected raw finish {other}"),
    }
}

#[test]
fn non_streaming_results_equal_vllm() {
    let fx = fixture();
    let tok = Tokenizer::from_file(root().join("tests/fixtures/tiny-bf16/tokenizer.json")).unwrap();
    let mut checked = 0;
    for (name, c, opts, required) in cases(&fx, &tok) {
        let mut p = gemma4::parse_complete(opts, c["output_text"].as_str().unwrap());
        if required {
            p.content.get_or_insert_default();
        }
        let calls: Vec<Value> = p.tool_calls.iter().map(|t| json!({"name": t.name, "arguments": t.arguments})).collect();
        let got = json!({
            "reasoning": p.reasoning, "content": p.content, "tool_calls": calls,
            "finish_reason": gemma4::finish_reason(raw_finish(&c), !p.tool_calls.is_empty(), required, false),
        });
        let e = &c["expected"];
        let want_calls: Vec<Value> =
            e["tool_calls"].as_array().unwrap().iter().map(|t| json!({"name": t["name"], "arguments": t["arguments"]})).collect();
        let want =
            json!({"reasoning": e["reasoning"], "content": e["content"], "tool_calls": want_calls, "finish_reason": e["finish_reason"]});
        assert_eq!(got, want, "case {name}: non-streaming");
        checked += 1;
    }
    assert!(checked >= 40, "only {checked} cases");
}

/// Token by token, as the server streams: our detokenizer (special tokens kept) makes each delta,
/// and the stop token that ended generation adds an empty one.
#[test]
fn token_streams_equal_vllm() {
    let fx = fixture();
    let tok = Tokenizer::from_file(root().join("tests/fixtures/tiny-bf16/tokenizer.json")).unwrap();
    for (name, c, opts, _) in cases(&fx, &tok) {
        let prompt = ids(&c["prompt_token_ids"]);
        // Where a structured-output grammar starts: vLLM's judgement of the prompt.
        let ended = gemma4::prompt_reasoning_ended(&prompt, c["enable_thinking"].as_bool().unwrap(), |t| tok.token_to_id(t));
        assert_eq!(Some(ended), c["prompt_is_reasoning_end"].as_bool(), "case {name}: reasoning ended in the prompt");
        let mut detok = IncrementalDetokenizer::new(&prompt, false);
        let mut deltas: Vec<String> = ids(&c["output_token_ids"]).into_iter().map(|t| detok.push(&tok, t)).collect();
        assert_eq!(deltas.concat(), c["output_text"].as_str().unwrap(), "case {name}: detokenized text");
        if !c["stop_token_id"].is_null() {
            deltas.push(String::new());
        }
        let got = stream(&opts, &deltas, raw_finish(&c));
        assert_eq!(got, expected_stream(&c), "case {name}: token stream");
    }
}

/// Any split of the text after the first token gives the same stream result (vLLM decides the
/// missing-opener rule on the first delta, so that one is kept as the server sees it). One delta
/// may carry several kinds at once, so only the token-stream test checks their order.
#[test]
fn every_split_gives_the_same_stream() {
    let fx = fixture();
    let tok = Tokenizer::from_file(root().join("tests/fixtures/tiny-bf16/tokenizer.json")).unwrap();
    let mut splits = 0;
    for (name, c, opts, _) in cases(&fx, &tok) {
        let prompt = ids(&c["prompt_token_ids"]);
        let out = ids(&c["output_token_ids"]);
        let text = c["output_text"].as_str().unwrap();
        let first = match out.first() {
            Some(&t) => IncrementalDetokenizer::new(&prompt, false).push(&tok, t),
            None => String::new(),
        };
        let rest = &text[first.len()..];
        let mut want = expected_stream(&c);
        want["kinds"] = Value::Null;
        let stream = |chunks: &[String], finish| {
            let mut v = stream(&opts, chunks, finish);
            v["kinds"] = Value::Null;
            v
        };
        let cuts: Vec<usize> = (0..=rest.len()).filter(|&i| rest.is_char_boundary(i)).collect();
        for &i in &cuts {
            let chunks = vec![first.clone(), rest[..i].to_string(), rest[i..].to_string()];
            assert_eq!(stream(&chunks, raw_finish(&c)), want, "case {name}: split at byte offset {i} of {rest:?}");
            splits += 1;
        }
        let mut singles = vec![first.clone()];
        singles.extend(rest.chars().map(String::from));
        assert_eq!(stream(&singles, raw_finish(&c)), want, "case {name}: char by char");
    }
    assert!(splits > 1000, "only {splits} splits");
}
