//! The chat template renders exactly what transformers 5.23 renders (golden cases from
//! tests/fixtures/make_chat_fixtures.py), and a hostile template is stopped by its limits.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde_json::{Map, Value, json};
use switchyard_router::chat_template::{
    ChatTemplate, RenderLimits, RenderRequest, SpecialTokens, TemplateError, special_tokens_from_config, special_tokens_from_json,
};

fn fixtures() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures"))
}

fn gemma_special() -> SpecialTokens {
    SpecialTokens::from([("bos_token".to_string(), "<bos>".to_string()), ("eos_token".to_string(), "<eos>".to_string())])
}

fn render(source: &str, messages: Value, kwargs: Value) -> Result<String, TemplateError> {
    let kwargs = kwargs.as_object().cloned().unwrap_or_default();
    let template = ChatTemplate::new(source, gemma_special())?;
    template.render(&RenderRequest { messages: &messages, tools: None, add_generation_prompt: false, kwargs: &kwargs })
}

/// Where two renders first differ, with a little context on each side, escaped so whitespace shows.
fn first_difference(expected: &str, actual: &str) -> String {
    let at = expected.bytes().zip(actual.bytes()).position(|(a, b)| a != b).unwrap_or(expected.len().min(actual.len()));
    let boundary = |s: &str, mut i: usize| {
        while !s.is_char_boundary(i) {
            i -= 1;
        }
        i
    };
    let window = |s: &str| format!("{:?}", &s[boundary(s, at.saturating_sub(60))..boundary(s, (at + 60).min(s.len()))]);
    let line = expected[..boundary(expected, at)].matches('\n').count() + 1;
    format!(
        "first difference at byte {at} (line {line}; lengths {} vs {})\n  expected: {}\n  actual:   {}",
        expected.len(),
        actual.len(),
        window(expected),
        window(actual)
    )
}

/// One golden case: `Ok(())` when the render matches transformers byte for byte (or fails with its message).
fn check_case(templates: &BTreeMap<String, ChatTemplate>, case: &Value) -> Result<(), String> {
    let template = &templates[case["template"].as_str().unwrap()];
    let empty = Map::new();
    let req = RenderRequest {
        messages: &case["messages"],
        tools: Some(&case["tools"]).filter(|t| !t.is_null()),
        add_generation_prompt: case["add_generation_prompt"].as_bool().unwrap(),
        kwargs: case["kwargs"].as_object().unwrap_or(&empty),
    };
    match (template.render(&req), case.get("expected").and_then(Value::as_str), case.get("error").and_then(Value::as_str)) {
        (Ok(actual), Some(expected), _) if actual == expected => Ok(()),
        (Ok(actual), Some(expected), _) => Err(first_difference(expected, &actual)),
        (Err(TemplateError::Raised(msg)), None, Some(error)) if msg == error => Ok(()),
        (Ok(_), None, Some(error)) => Err(format!("rendered, but transformers raised {error:?}")),
        (Err(e), _, expected_error) => Err(format!("failed with {e:?}; transformers: {:?}", expected_error.unwrap_or("rendered"))),
        (Ok(_), None, None) => Err("the fixture has neither `expected` nor `error`".into()),
    }
}

#[test]
fn renders_exactly_what_transformers_renders() {
    let dir = fixtures().join("chat");
    let doc: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    let special: SpecialTokens = serde_json::from_value(doc["special_tokens"].clone()).unwrap();
    let cases = doc["cases"].as_array().unwrap();
    let mut templates = BTreeMap::new();
    for case in cases {
        let name = case["template"].as_str().unwrap().to_string();
        if !templates.contains_key(&name) {
            let source = std::fs::read_to_string(dir.join(&name)).unwrap();
            templates.insert(name.clone(), ChatTemplate::new(&source, special.clone()).unwrap_or_else(|e| panic!("{name}: {e}")));
        }
    }
    let mut passed = BTreeMap::<&str, usize>::new();
    let mut failures = Vec::new();
    for case in cases {
        let (template, name) = (case["template"].as_str().unwrap(), case["name"].as_str().unwrap());
        match check_case(&templates, case) {
            Ok(()) => *passed.entry(template).or_default() += 1,
            Err(why) => failures.push(format!("{template} / {name}: {why}")),
        }
    }
    eprintln!("passed per template: {passed:?}");
    assert!(failures.is_empty(), "{} of {} cases differ from transformers:\n{}", failures.len(), cases.len(), failures.join("\n"));
    assert!(passed.len() == 3 && passed.values().all(|&n| n >= 1), "expected cases for all three templates: {passed:?}");
}

#[test]
fn the_fixture_templates_are_the_reference_ones() {
    let reference = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/reference/chat_templates"));
    if !reference.exists() {
        eprintln!("skipped: {} is not present (a fresh clone)", reference.display());
        return;
    }
    for name in ["gemma4-26b-2026-04.jinja", "gemma4-26b-2026-07.jinja"] {
        let copied = std::fs::read_to_string(fixtures().join("chat").join(name)).unwrap();
        assert_eq!(copied, std::fs::read_to_string(reference.join(name)).unwrap(), "{name}: rerun make_chat_fixtures.py");
    }
}

#[test]
fn raise_exception_surfaces_its_message() {
    let err = render("{{ raise_exception('only ' ~ messages | length ~ ' message') }}", json!([{"role": "user"}]), json!({})).unwrap_err();
    assert!(matches!(&err, TemplateError::Raised(m) if m == "only 1 message"), "{err:?}");
    assert_eq!(err.to_string(), "only 1 message");
}

#[test]
fn an_endless_loop_runs_out_of_fuel() {
    let source = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}";
    let err = render(source, json!([]), json!({})).unwrap_err();
    assert!(matches!(err, TemplateError::FuelExhausted(n) if n == RenderLimits::default().fuel), "{err:?}");
}

#[test]
fn doubling_a_string_runs_out_of_fuel() {
    let source = "{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s | length }}";
    let err = render(source, json!([]), json!({})).unwrap_err();
    assert!(matches!(err, TemplateError::FuelExhausted(_)), "{err:?}");
}

#[test]
fn output_past_the_cap_is_refused() {
    let template = ChatTemplate::new("{% for i in range(1000) %}{{ 'x' * 1000 }}{% endfor %}", gemma_special())
        .unwrap()
        .with_limits(RenderLimits { fuel: 10_000_000, max_output_bytes: 100_000 });
    let empty = Map::new();
    let req = RenderRequest { messages: &json!([]), tools: None, add_generation_prompt: false, kwargs: &empty };
    assert!(matches!(template.render(&req), Err(TemplateError::OutputTooLarge(100_000))));
}

#[test]
fn runaway_recursion_is_an_error_not_a_crash() {
    let err = render("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", json!([]), json!({})).unwrap_err();
    assert!(matches!(err, TemplateError::Render(_)), "{err:?}");
}

#[test]
fn templates_cannot_load_files() {
    let err = render("{% include '/etc/passwd' %}", json!([]), json!({})).unwrap_err();
    assert!(matches!(err, TemplateError::Render(_)), "{err:?}");
}

#[test]
fn a_syntax_error_is_reported_at_construction() {
    let err = ChatTemplate::new("{% for m in messages %}{{ m }}", gemma_special()).err().unwrap();
    assert!(matches!(err, TemplateError::Syntax(_)), "{err:?}");
}

#[test]
fn bos_token_comes_from_the_special_tokens_and_kwargs_cannot_replace_it() {
    let source = "{{ bos_token }}{{ messages | length }}{{ add_generation_prompt }}|{{ enable_thinking }}|{{ tools }}";
    let kwargs = json!({"bos_token": "<evil>", "messages": [], "add_generation_prompt": true, "enable_thinking": true});
    assert_eq!(render(source, json!([{"role": "user", "content": "hi"}]), kwargs).unwrap(), "<bos>1False|True|None");
}

#[test]
fn messages_are_normalised_as_transformers_does() {
    // None-valued keys vanish; reasoning under any name becomes `thinking` (first) and `reasoning_content`.
    let source = "{% for m in messages %}{{ m | tojson }}\n{% endfor %}";
    let messages = json!([
        {"role": "assistant", "content": null, "reasoning": "r1"},
        {"role": "assistant", "reasoning_content": "r2", "thinking": "t2", "content": "c"},
    ]);
    let expected = concat!(
        "{\"thinking\": \"r1\", \"role\": \"assistant\", \"reasoning\": \"r1\", \"reasoning_content\": \"r1\"}\n",
        "{\"thinking\": \"t2\", \"role\": \"assistant\", \"reasoning_content\": \"r2\", \"content\": \"c\"}\n",
    );
    assert_eq!(render(source, messages, json!({})).unwrap(), expected);
}

#[test]
fn bad_inputs_are_rejected() {
    assert!(matches!(render("x", json!({"role": "user"}), json!({})), Err(TemplateError::InvalidInput(_))));
    assert!(matches!(render("x", json!(["hi"]), json!({})), Err(TemplateError::InvalidInput(_))));
}

#[test]
fn special_tokens_are_read_like_transformers() {
    let config = json!({
        "bos_token": "<bos>",
        "eos_token": {"__type": "AddedToken", "content": "<eos>", "special": true},
        "add_bos_token": true,
        "image_token": "<|image|>",
        "pad_token": null,
        "extra_special_tokens": {"video_token": "<|video|>"},
    });
    let special = special_tokens_from_json(&config);
    let expected = [("bos_token", "<bos>"), ("eos_token", "<eos>"), ("image_token", "<|image|>"), ("video_token", "<|video|>")];
    assert_eq!(special, expected.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<SpecialTokens>());

    let from_checkpoint = special_tokens_from_config(fixtures().join("tiny-f32/tokenizer_config.json"));
    assert_eq!(from_checkpoint.get("bos_token").map(String::as_str), Some("<bos>"));
    assert_eq!(from_checkpoint.get("think_token").map(String::as_str), Some("<|think|>"));
    assert!(special_tokens_from_config(fixtures().join("no-such-file.json")).is_empty());
}

#[test]
fn strftime_now_is_available() {
    let year = render("{{ strftime_now('%Y') }}", json!([]), json!({})).unwrap();
    assert!(year.len() == 4 && year.chars().all(|c| c.is_ascii_digit()) && year.as_str() >= "2025", "{year}");
}
