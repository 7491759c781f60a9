//! The grammar that forces a tool call follows the tool's JSON schema: typed values, enums, required
//! keys, nested objects and arrays. Checked by stepping the compiled grammar over the tiny fixture's
//! tokens for calls the model could write.

use serde_json::json;
use switchyard_engine_api::{GrammarRequest, GrammarSpec, TokenConstraint};
use switchyard_grammar::GrammarEnv;
use switchyard_router::structured::call_grammar;
use tokenizers::Tokenizer;

fn fixture(f: &str) -> std::path::PathBuf {
    std::path::PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/tiny-bf16")).join(f)
}

struct Checker {
    tok: Tokenizer,
    env: GrammarEnv,
    grammar: String,
}

impl Checker {
    fn new(tools: &[serde_json::Value], repeat: bool) -> Checker {
        let tok = Tokenizer::from_file(fixture("tokenizer.json")).unwrap();
        let id = |s: &str| tok.token_to_id(s).unwrap();
        let refs: Vec<&serde_json::Value> = tools.iter().collect();
        let grammar = call_grammar(&refs, repeat, id("<|tool_call>"), id("<tool_call|>"), id("<|\"|>"));
        let env = GrammarEnv::from_tokenizer_json(&std::fs::read_to_string(fixture("tokenizer.json")).unwrap(), 512, &[1, 106]).unwrap();
        Checker { tok, env, grammar }
    }

    /// Whether the grammar takes this output whole (every token accepted, and complete at the end).
    fn takes(&self, text: &str) -> bool {
        let req = GrammarRequest {
            spec: GrammarSpec::Lark { grammar: self.grammar.clone() },
            after_token: None,
            also_after: vec![],
            start_tokens: vec![],
        };
        let mut c = self.env.compile(&req).unwrap_or_else(|e| panic!("{e}\n{}", self.grammar));
        let ids = self.tok.encode(text, false).unwrap().get_ids().to_vec();
        ids.iter().all(|&t| c.accept(t).is_ok()) && c.is_complete()
    }
}

const Q: &str = "<|\"|>";

fn weather() -> serde_json::Value {
    json!({"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object",
        "properties": {
            "location": {"type": "string"},
            "days": {"type": "integer"},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            "tags": {"type": "array", "items": {"type": "string"}},
            "opts": {"type": "object", "properties": {"deep": {"type": "boolean"}, "ratio": {"type": ["number", "null"]}}, "required": ["deep"]}
        },
        "required": ["location"]
    }}})
}

fn call(args: &str) -> String {
    format!("<|tool_call>call:get_weather{{{args}}}<tool_call|>")
}

#[test]
fn typed_arguments_are_taken() {
    let c = Checker::new(&[weather()], false);
    for args in [
        format!("location:{Q}Paris{Q}"),
        format!("days:3,location:{Q}Paris{Q},unit:{Q}celsius{Q}"),
        format!("days:-2,location:{Q}Oslo{Q},opts:{{deep:true,ratio:0.5}},tags:[{Q}a{Q},{Q}b{Q}],unit:{Q}fahrenheit{Q}"),
        format!("location:{Q}Rome{Q},opts:{{deep:false,ratio:null}},tags:[]"),
    ] {
        assert!(c.takes(&call(&args)), "{args}");
    }
}

#[test]
fn wrong_types_missing_required_keys_and_unknown_values_are_not() {
    let c = Checker::new(&[weather()], false);
    for args in [
        "location:{}".to_string(),                          // a string parameter as an object
        format!("days:{Q}3{Q},location:{Q}Paris{Q}"),       // an integer as a string
        "days:3".to_string(),                               // the required key missing
        format!("location:{Q}Paris{Q},unit:{Q}kelvin{Q}"),  // outside the enum
        format!("location:{Q}Paris{Q},days:1.5"),           // a number for an integer
        format!("location:{Q}Paris{Q},opts:{{ratio:1}}"),   // a nested required key missing
        format!("location:{Q}Paris{Q},tags:[1]"),           // items of the wrong type
        format!("location:{Q}Paris{Q},city:{Q}x{Q}"),       // a key the schema does not have
        format!("unit:{Q}celsius{Q},location:{Q}Paris{Q}"), // out of the template's (sorted) order
    ] {
        assert!(!c.takes(&call(&args)), "{args}");
    }
}

#[test]
fn tools_without_properties_take_any_keys_and_required_may_repeat() {
    let free = json!({"type": "function", "function": {"name": "ping", "parameters": {"type": "object"}}});
    let c = Checker::new(&[weather(), free], true);
    assert!(c.takes(&format!("<|tool_call>call:ping{{anything:{Q}x{Q},n:2}}<tool_call|>")));
    assert!(c.takes(&format!("{}<|tool_call>call:ping{{}}<tool_call|>", call(&format!("location:{Q}Paris{Q}")))));
    assert!(!c.takes("<|tool_call>call:nope{}<tool_call|>"));
}
