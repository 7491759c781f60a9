//! Structured output, as a property: for random JSON schemas of bounded depth, decoding that picks a
//! random token among those the constraint allows (the worst a model can do) always ends, and always
//! ends with JSON that validates against the schema. Schemas that cannot be compiled are errors, not
//! panics.

use rand_chacha::ChaCha8Rng;
use rand_chacha::rand_core::{RngCore, SeedableRng};
use serde_json::{Map, Value, json};
use switchyard_engine_api::{GrammarRequest, GrammarSpec, TokenConstraint};
use switchyard_grammar::GrammarEnv;

const EOS: [u32; 3] = [1, 106, 50];

fn fixture(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tiny-bf16").join(name)
}

fn env() -> (GrammarEnv, tokenizers::Tokenizer) {
    let text = std::fs::read_to_string(fixture("tokenizer.json")).unwrap();
    let env = GrammarEnv::from_tokenizer_json(&text, 512, &EOS).unwrap();
    (env, tokenizers::Tokenizer::from_file(fixture("tokenizer.json")).unwrap())
}

struct Gen(ChaCha8Rng);

impl Gen {
    fn below(&mut self, n: u32) -> u32 {
        self.0.next_u32() % n
    }

    fn name(&mut self) -> String {
        let names = ["a", "b", "id", "name", "tags", "ok", "x_1", "value", "é"];
        names[self.below(names.len() as u32) as usize].to_string()
    }

    /// A schema whose every value has a bounded length, so a valid output always fits.
    fn schema(&mut self, depth: u32) -> Value {
        let leaf = depth == 0;
        match self.below(if leaf { 6 } else { 9 }) {
            0 => json!({"type": "string", "maxLength": self.below(6), "minLength": 0}),
            1 => {
                let lo = self.below(50) as i64 - 25;
                json!({"type": "integer", "minimum": lo, "maximum": lo + self.below(1000) as i64})
            }
            2 => json!({"type": "boolean"}),
            3 => json!({"type": "null"}),
            4 => json!({"enum": ["red", "green", 3, null, true]}),
            5 => json!({"const": "fixed"}),
            6 | 7 => {
                let mut props = Map::new();
                let mut required = Vec::new();
                for _ in 0..1 + self.below(3) {
                    let k = self.name();
                    if self.below(2) == 0 {
                        required.push(Value::String(k.clone()));
                    }
                    props.insert(k, self.schema(depth - 1));
                }
                required.dedup();
                required.retain(|r| props.contains_key(r.as_str().unwrap()));
                json!({"type": "object", "properties": props, "required": required, "additionalProperties": false})
            }
            _ => {
                if self.below(3) == 0 {
                    json!({"anyOf": [self.schema(depth - 1), self.schema(depth - 1)]})
                } else {
                    let max = self.below(4);
                    json!({"type": "array", "items": self.schema(depth - 1), "minItems": self.below(max + 1), "maxItems": max})
                }
            }
        }
    }
}

/// The subset of JSON Schema the generator writes, checked independently of the grammar engine.
fn valid(v: &Value, s: &Value) -> bool {
    if let Some(any) = s.get("anyOf").and_then(Value::as_array) {
        return any.iter().any(|a| valid(v, a));
    }
    if let Some(c) = s.get("const") {
        return v == c;
    }
    if let Some(e) = s.get("enum").and_then(Value::as_array) {
        return e.contains(v);
    }
    let n = |k: &str| s.get(k).and_then(Value::as_i64);
    match s.get("type").and_then(Value::as_str) {
        Some("string") => v.as_str().is_some_and(|x| {
            let len = x.chars().count() as i64;
            n("maxLength").is_none_or(|m| len <= m) && n("minLength").is_none_or(|m| len >= m)
        }),
        Some("integer") => v.as_i64().is_some_and(|x| n("minimum").is_none_or(|m| x >= m) && n("maximum").is_none_or(|m| x <= m)),
        Some("boolean") => v.is_boolean(),
        Some("null") => v.is_null(),
        Some("array") => v.as_array().is_some_and(|a| {
            let len = a.len() as i64;
            n("maxItems").is_none_or(|m| len <= m) && n("minItems").is_none_or(|m| len >= m) && a.iter().all(|x| valid(x, &s["items"]))
        }),
        Some("object") => v.as_object().is_some_and(|o| {
            let props = s["properties"].as_object().unwrap();
            let required = s["required"].as_array().unwrap();
            required.iter().all(|r| o.contains_key(r.as_str().unwrap())) && o.iter().all(|(k, x)| props.get(k).is_some_and(|p| valid(x, p)))
        }),
        other => panic!("generator wrote an unknown type {other:?}"),
    }
}

/// Decodes with uniformly random choices among the allowed tokens until an end token.
fn random_decode(env: &GrammarEnv, tok: &tokenizers::Tokenizer, spec: GrammarSpec, rng: &mut ChaCha8Rng) -> String {
    let mut c = env.compile(&GrammarRequest { spec, after_token: None, also_after: vec![], start_tokens: vec![] }).unwrap();
    let mut out = Vec::new();
    for _ in 0..600 {
        let mut logits = vec![0f32; 512];
        c.mask(&mut logits).unwrap();
        let allowed: Vec<u32> = (0..512u32).filter(|&i| logits[i as usize].is_finite()).collect();
        assert!(!allowed.is_empty(), "the mask allows nothing after {out:?}");
        let t = allowed[(rng.next_u32() as usize) % allowed.len()];
        if EOS.contains(&t) {
            assert!(c.is_complete(), "an end token was allowed before the output was complete");
            return tok.decode(&out, false).unwrap();
        }
        c.accept(t).unwrap();
        out.push(t);
    }
    panic!("no end after 600 tokens: {:?}", tok.decode(&out, false).unwrap());
}

#[test]
fn random_schemas_always_give_valid_json() {
    let (env, tok) = env();
    let mut g = Gen(ChaCha8Rng::seed_from_u64(7));
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let (mut bytes, mut kinds) = (0, std::collections::BTreeSet::new());
    for i in 0..150 {
        let mut schema = g.schema(1 + i % 3);
        // No free whitespace (vLLM's `disable_any_whitespace`): with it, a random walk may pad forever.
        schema.as_object_mut().unwrap().insert("x-guidance".into(), json!({"whitespace_flexible": false}));
        let text = random_decode(&env, &tok, GrammarSpec::JsonSchema { schema: schema.clone() }, &mut rng);
        let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("schema {schema}: {text:?} is not JSON: {e}"));
        schema.as_object_mut().unwrap().remove("x-guidance");
        assert!(valid(&v, &schema), "schema {schema}: {text} does not validate");
        if std::env::var_os("SHOW").is_some() {
            eprintln!("{schema}\n  -> {text}");
        }
        bytes += text.len();
        kinds.insert(match &v {
            Value::Null => 0,
            Value::Bool(_) => 1,
            Value::Number(_) => 2,
            Value::String(_) => 3,
            Value::Array(_) => 4,
            Value::Object(_) => 5,
        });
    }
    // The walk really explored: long outputs, and every JSON kind at the top level.
    assert!(bytes > 800 && kinds.len() >= 5, "{bytes} bytes, {} kinds", kinds.len());
}

#[test]
fn regex_choice_and_lark_constrain_exactly() {
    let (env, tok) = env();
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    for _ in 0..20 {
        let s = random_decode(&env, &tok, GrammarSpec::Regex { regex: "[a-c]{2,4}-(x|yz)".into() }, &mut rng);
        let (l, r) = s.split_once('-').unwrap();
        assert!((2..=4).contains(&l.len()) && l.chars().all(|c| "abc".contains(c)) && (r == "x" || r == "yz"), "{s}");
        let s = random_decode(&env, &tok, GrammarSpec::Choice { choices: vec!["yes".into(), "no (really)".into()] }, &mut rng);
        assert!(s == "yes" || s == "no (really)", "{s}");
    }
    // Special tokens by id: the grammar forces Gemma 4's reasoning channel and a tool call.
    let lark = r#"start: <[100]> "thought\nok" <[101]> <[48]> "call:f{a:" <[52]> "b" <[52]> "}" <[49]>"#;
    let s = random_decode(&env, &tok, GrammarSpec::Lark { grammar: lark.into() }, &mut rng);
    assert_eq!(s, "<|channel>thought\nok<channel|><|tool_call>call:f{a:<|\"|>b<|\"|>}<tool_call|>");
}

#[test]
fn bad_grammars_are_errors() {
    let (env, _) = env();
    let bad = [
        GrammarSpec::JsonSchema { schema: json!({"type": "nope"}) },
        GrammarSpec::JsonSchema { schema: json!({"$ref": "#/definitions/missing"}) },
        GrammarSpec::Regex { regex: "(unclosed".into() },
        GrammarSpec::Lark { grammar: "start: undefined_rule".into() },
        GrammarSpec::Choice { choices: vec![] },
    ];
    for spec in bad {
        let r = env.compile(&GrammarRequest { spec: spec.clone(), after_token: None, also_after: vec![], start_tokens: vec![] });
        assert!(r.is_err(), "{spec:?} compiled");
    }
}

#[test]
fn a_constraint_can_wait_for_the_end_of_reasoning() {
    let (env, tok) = env();
    let mut c = env
        .compile(&GrammarRequest {
            spec: GrammarSpec::Regex { regex: "ok".into() },
            after_token: Some(101),
            also_after: vec![],
            start_tokens: vec![],
        })
        .unwrap();
    // Anything goes until `<channel|>` (101) ...
    let mut logits = vec![0f32; 512];
    c.mask(&mut logits).unwrap();
    assert!(logits.iter().all(|l| l.is_finite()));
    for t in tok.encode("thinking", false).unwrap().get_ids() {
        c.accept(*t).unwrap();
    }
    c.accept(101).unwrap();
    // ... then only the grammar.
    let mut logits = vec![0f32; 512];
    c.mask(&mut logits).unwrap();
    let allowed: Vec<u32> = (0..512u32).filter(|&i| logits[i as usize].is_finite()).collect();
    assert!(!allowed.is_empty());
    assert!(allowed.iter().all(|&t| tok.decode(&[t], false).unwrap().starts_with('o')), "{allowed:?}");
}

/// vLLM also judges reasoning ended at a call opened straight out of the channel: `also_after` ends
/// the wait like `after_token`, and a `start_tokens` token ends it and is the grammar's first token.
#[test]
fn a_call_opened_in_the_channel_ends_the_wait() {
    let (env, tok) = env();
    let call = tok.token_to_id("<|tool_call>").expect("the call opener");
    let think = tok.encode("thinking", false).unwrap().get_ids().to_vec();
    // A structured output starts after the opener.
    let after = GrammarRequest {
        spec: GrammarSpec::Regex { regex: "ok".into() },
        after_token: Some(101),
        also_after: vec![call],
        start_tokens: vec![],
    };
    let mut c = env.compile(&after).unwrap();
    think.iter().for_each(|&t| c.accept(t).unwrap());
    c.accept(call).unwrap();
    assert!(!c.is_waiting());
    let ok = tok.encode("ok", false).unwrap().get_ids().to_vec();
    ok.iter().for_each(|&t| c.accept(t).unwrap());
    assert!(c.is_complete());
    // A forced call's grammar starts with it.
    let lark = format!("start: <[{call}]> \"x\"");
    let forced =
        GrammarRequest { spec: GrammarSpec::Lark { grammar: lark }, after_token: Some(101), also_after: vec![], start_tokens: vec![call] };
    let mut c = env.compile(&forced).unwrap();
    think.iter().for_each(|&t| c.accept(t).unwrap());
    c.accept(call).unwrap();
    assert!(!c.is_waiting());
    let x = tok.encode("x", false).unwrap().get_ids().to_vec();
    x.iter().for_each(|&t| c.accept(t).unwrap());
    assert!(c.is_complete());
    // After `<channel|>` instead, the opener must still come.
    let mut c = env.compile(&forced).unwrap();
    c.accept(101).unwrap();
    assert!(c.accept(x[0]).is_err(), "the grammar wants its opener first");
}
