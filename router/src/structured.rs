//! Structured outputs: `response_format` (OpenAI) and `structured_outputs` (vLLM's extension: `json`,
//! `regex`, `choice`, `grammar`, `json_object`) become a [`GrammarRequest`]; `tool_choice: "required"`
//! or a named function becomes a grammar of Gemma 4's own call syntax, so the model must call.
//!
//! Grammars are compiled here, off the engine thread and under a deadline, so a schema or regex that
//! cannot be compiled, or would take too long, is a 400 that costs other requests nothing.

use serde_json::Value;
use switchyard_engine_api::{GrammarRequest, GrammarSpec};
use switchyard_grammar::{CompileError, GRAMMAR_COMPILE_TIMEOUT as COMPILE_TIMEOUT};

use crate::chat::ToolChoice;
use crate::error::ApiError;
use crate::server::{AppState, ChoiceJob};

/// The grammar a request's `response_format` / `structured_outputs` asks for.
pub fn requested(response_format: Option<&Value>, structured: Option<&Value>) -> Result<Option<GrammarSpec>, ApiError> {
    let from_format = match response_format {
        None | Some(Value::Null) => None,
        Some(f) => match f.get("type").and_then(Value::as_str) {
            Some("text") => None,
            Some("json_object") => Some(GrammarSpec::JsonObject),
            Some("json_schema") => {
                let schema = f.pointer("/json_schema/schema").or_else(|| f.pointer("/json_schema/json_schema"));
                match schema {
                    Some(s @ (Value::Object(_) | Value::Bool(_))) => Some(GrammarSpec::JsonSchema { schema: s.clone() }),
                    _ => return Err(ApiError::invalid("response_format.json_schema.schema", "a JSON schema object is required")),
                }
            }
            _ => return Err(ApiError::invalid("response_format.type", "use `text`, `json_object` or `json_schema`")),
        },
    };
    let from_structured = match structured {
        None | Some(Value::Null) => None,
        Some(Value::Object(o)) => {
            let mut specs = Vec::new();
            for (k, v) in o {
                let spec = match (k.as_str(), v) {
                    (_, Value::Null) => continue,
                    ("json", Value::String(s)) => GrammarSpec::JsonSchema {
                        schema: serde_json::from_str(s)
                            .map_err(|e| ApiError::invalid("structured_outputs.json", format!("not a JSON schema: {e}")))?,
                    },
                    ("json", s @ (Value::Object(_) | Value::Bool(_))) => GrammarSpec::JsonSchema { schema: s.clone() },
                    ("regex", Value::String(r)) => GrammarSpec::Regex { regex: r.clone() },
                    ("choice", Value::Array(a)) => GrammarSpec::Choice {
                        choices: a
                            .iter()
                            .map(|c| c.as_str().map(str::to_string))
                            .collect::<Option<_>>()
                            .ok_or_else(|| ApiError::invalid("structured_outputs.choice", "choices must be strings"))?,
                    },
                    ("grammar", Value::String(g)) => GrammarSpec::Lark { grammar: g.clone() },
                    ("json_object", Value::Bool(true)) => GrammarSpec::JsonObject,
                    ("json_object", Value::Bool(false)) => continue,
                    ("disable_fallback" | "disable_any_whitespace" | "disable_additional_properties" | "whitespace_pattern", _) => continue,
                    (k, _) => {
                        return Err(ApiError::invalid(format!("structured_outputs.{k}"), "unsupported or mistyped structured output"));
                    }
                };
                specs.push(spec);
            }
            if specs.len() > 1 {
                return Err(ApiError::invalid("structured_outputs", "give only one of json, regex, choice, grammar, json_object"));
            }
            specs.pop()
        }
        Some(_) => return Err(ApiError::invalid("structured_outputs", "must be an object")),
    };
    let compact = structured.and_then(|s| s.get("disable_any_whitespace")).and_then(Value::as_bool).unwrap_or(false);
    match (from_format, from_structured) {
        (Some(_), Some(_)) => {
            Err(ApiError::invalid("structured_outputs", "give either `response_format` or `structured_outputs`, not both"))
        }
        (a, b) => Ok(a.or(b).map(|s| if compact { without_free_whitespace(s) } else { s })),
    }
}

/// `disable_any_whitespace`: JSON with no whitespace between tokens (llguidance's
/// `whitespace_flexible: false`, as vLLM's guidance backend sets it).
fn without_free_whitespace(spec: GrammarSpec) -> GrammarSpec {
    let schema = match spec {
        GrammarSpec::JsonObject => serde_json::json!({"type": "object"}),
        GrammarSpec::JsonSchema { schema: Value::Bool(true) } => serde_json::json!({}),
        GrammarSpec::JsonSchema { schema } => schema,
        other => return other,
    };
    let mut schema = schema;
    if let Some(o) = schema.as_object_mut() {
        o.entry("x-guidance").or_insert(serde_json::json!({"whitespace_flexible": false}));
    }
    GrammarSpec::JsonSchema { schema }
}

/// Token ids of Gemma 4's call syntax, for grammars that force a call.
struct CallTokens {
    call_start: u32,
    call_end: u32,
    quote: u32,
}

fn call_tokens(state: &AppState) -> Option<CallTokens> {
    let id = |s: &str| state.tokenizer.token_to_id(s);
    Some(CallTokens { call_start: id("<|tool_call>")?, call_end: id("<tool_call|>")?, quote: id("<|\"|>")? })
}

/// `tool_choice: "required"` (any of the tools, one call or, with `parallel_tool_calls`, several) or
/// a named function (exactly one call to it), as a Lark grammar of Gemma 4's call syntax:
/// `<|tool_call>call:NAME{key:value,...}<tool_call|>`, strings quoted with `<|"|>`. The arguments
/// follow the tool's JSON schema: its properties in the order the chat template writes them
/// (sorted), the `required` ones present, each value of its declared type (string, integer, number,
/// boolean, null, an `enum`, arrays of typed items, objects with typed properties, `anyOf` of
/// these); a parameter without a type takes any value, a tool without properties any keys.
pub fn forced_call(state: &AppState, choice: &ToolChoice, tools: &[Value], parallel: bool) -> Result<Option<GrammarSpec>, ApiError> {
    let chosen: Vec<&Value> = match choice {
        ToolChoice::None | ToolChoice::Auto => return Ok(None),
        ToolChoice::Named(n) => tools.iter().filter(|t| t.pointer("/function/name").and_then(Value::as_str) == Some(n)).collect(),
        ToolChoice::Required => tools.iter().collect(),
    };
    let t = call_tokens(state).ok_or_else(|| ApiError::invalid("tool_choice", "this model's vocabulary has no tool-call tokens"))?;
    let repeat = parallel && matches!(choice, ToolChoice::Required);
    Ok(Some(GrammarSpec::Lark { grammar: call_grammar(&chosen, repeat, t.call_start, t.call_end, t.quote) }))
}

/// The grammar of [`forced_call`], from the chosen tools and the call tokens' ids.
pub fn call_grammar(tools: &[&Value], repeat: bool, call_start: u32, call_end: u32, quote: u32) -> String {
    let mut g = CallGrammar { rules: Vec::new(), next: 0, quote };
    let mut alternatives = Vec::new();
    for tool in tools {
        let name = tool.pointer("/function/name").and_then(Value::as_str).unwrap_or_default();
        let args = match tool.pointer("/function/parameters") {
            Some(p) if p.get("properties").and_then(Value::as_object).is_some_and(|m| !m.is_empty()) => g.object(p, 0),
            _ => "object".to_string(),
        };
        alternatives.push(format!("{} {args}", lark_str(name)));
    }
    format!(
        r#"start: call{repeat}
call: <[{call_start}]> "call:" ({tools}) <[{call_end}]>
{rules}
fields: field ("," field)*
field: KEY ":" value
value: string | object | array | SCALAR
object: "{{" fields? "}}"
array: "[" (value ("," value)*)? "]"
string: <[{quote}]> TEXT? <[{quote}]>
KEY: /[A-Za-z_][A-Za-z0-9_]{{0,63}}/
SCALAR: /-?[0-9]{{1,18}}(\.[0-9]{{1,18}})?([eE][-+]?[0-9]{{1,3}})?|true|false|null/
INT: /-?[0-9]{{1,18}}/
NUMBER: /-?[0-9]{{1,18}}(\.[0-9]{{1,18}})?([eE][-+]?[0-9]{{1,3}})?/
TEXT: /[^\x00]+/
"#,
        repeat = if repeat { "+" } else { "" },
        tools = alternatives.join(" | "),
        rules = g.rules.join("\n"),
    )
}

/// A Lark string literal (JSON's quoting is Lark's).
fn lark_str(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_default()
}

/// Rules for typed values, numbered as they are made.
struct CallGrammar {
    rules: Vec<String>,
    next: usize,
    quote: u32,
}

/// Nesting deeper than this takes any value.
const MAX_SCHEMA_DEPTH: usize = 6;

impl CallGrammar {
    fn rule(&mut self, body: String) -> String {
        let name = format!("typed{}", self.next);
        self.next += 1;
        self.rules.push(format!("{name}: {body}"));
        name
    }

    /// An expression for a value of `schema`.
    fn value(&mut self, schema: &Value, depth: usize) -> String {
        if depth > MAX_SCHEMA_DEPTH {
            return "value".into();
        }
        let mut alts: Vec<String> = Vec::new();
        if let Some(options) =
            schema.get("enum").and_then(Value::as_array).map(Vec::as_slice).or_else(|| schema.get("const").map(std::slice::from_ref))
        {
            alts.extend(options.iter().map(|v| self.literal(v)));
        } else if let Some(any) = schema.get("anyOf").or_else(|| schema.get("oneOf")).and_then(Value::as_array) {
            alts.extend(any.iter().map(|s| self.value(s, depth + 1)));
        } else {
            let types: Vec<&str> = match schema.get("type") {
                Some(Value::String(t)) => vec![t.as_str()],
                Some(Value::Array(ts)) => ts.iter().filter_map(Value::as_str).collect(),
                _ => Vec::new(),
            };
            if types.is_empty() {
                return "value".into();
            }
            for t in types {
                alts.push(match t {
                    "string" => "string".into(),
                    "integer" => "INT".into(),
                    "number" => "NUMBER".into(),
                    "boolean" => r#"("true" | "false")"#.into(),
                    "null" => r#""null""#.into(),
                    "array" => {
                        let item = match schema.get("items") {
                            Some(items) if items.is_object() => self.value(items, depth + 1),
                            _ => "value".into(),
                        };
                        format!(r#"("[" ({item} ("," {item})*)? "]")"#)
                    }
                    "object" if schema.get("properties").and_then(Value::as_object).is_some_and(|m| !m.is_empty()) => {
                        self.object(schema, depth + 1)
                    }
                    "object" => "object".into(),
                    _ => "value".into(),
                });
            }
        }
        if schema.get("nullable").and_then(Value::as_bool) == Some(true) {
            alts.push(r#""null""#.into());
        }
        if alts.len() == 1 { alts.remove(0) } else { format!("({})", alts.join(" | ")) }
    }

    /// A literal value as the model writes it: strings in `<|"|>` quotes (the quote is the rule
    /// `string`'s delimiter, so a literal string is its own rule), the rest bare.
    fn literal(&mut self, v: &Value) -> String {
        match v {
            Value::String(s) => {
                let q = self.quote;
                self.rule(format!("<[{q}]> {} <[{q}]>", lark_str(s)))
            }
            other => lark_str(&other.to_string()),
        }
    }

    /// `{key:value,...}` for an object schema with properties: sorted keys, each optional unless
    /// `required`, commas only between the keys present.
    fn object(&mut self, schema: &Value, depth: usize) -> String {
        let props = schema.get("properties").and_then(Value::as_object).cloned().unwrap_or_default();
        let required: Vec<&str> =
            schema.get("required").and_then(Value::as_array).map(|r| r.iter().filter_map(Value::as_str).collect()).unwrap_or_default();
        let mut keys: Vec<&String> = props.keys().collect();
        keys.sort();
        let items: Vec<(String, bool)> = keys
            .iter()
            .map(|k| {
                let v = self.value(&props[k.as_str()], depth + 1);
                (format!("{} \":\" {v}", lark_str(k)), required.contains(&k.as_str()))
            })
            .collect();
        // rest[k]: the items from k on, each after a comma; first[k]: the same with no comma before
        // the first one present.
        let n = items.len();
        let mut rest = vec![String::new(); n + 1];
        let mut first = vec![String::new(); n + 1];
        for k in (0..n).rev() {
            let (item, req) = &items[k];
            let tail = rest[k + 1].clone();
            rest[k] = if *req { format!("\",\" {item} {tail}") } else { format!("(\",\" {item})? {tail}") };
            rest[k] = self.rule(rest[k].trim().to_string());
            let own = format!("{item} {tail}");
            first[k] = if *req {
                own
            } else if first[k + 1].is_empty() {
                format!("({own})?")
            } else {
                format!("({own} | {})", first[k + 1])
            };
            first[k] = self.rule(first[k].trim().to_string());
        }
        format!("(\"{{\" {} \"}}\")", first[0])
    }
}

/// Compiles each job's grammar (once per distinct grammar) under [`COMPILE_TIMEOUT`]; any failure is
/// the request's 400.
pub async fn attach(state: &AppState, jobs: &mut [ChoiceJob]) -> Result<(), ApiError> {
    let mut compiled: Vec<(GrammarRequest, switchyard_grammar::Constraint)> = Vec::new();
    for j in jobs.iter_mut() {
        let Some(g) = j.params.grammar.clone() else { continue };
        if let Some((_, c)) = compiled.iter().find(|(r, _)| *r == g) {
            j.constraint = Some(c.clone());
            continue;
        }
        let env = state.grammar.clone().ok_or_else(|| {
            ApiError::invalid("response_format", "structured output needs the checkpoint's tokenizer.json, which this server does not have")
        })?;
        let c = env.compile_off_thread(g.clone(), COMPILE_TIMEOUT).await.map_err(|e| match e {
            CompileError::Busy => ApiError::overloaded("Too many structured outputs are being compiled; retry later."),
            CompileError::Refused(e) => ApiError::invalid(param(&g), format!("the structured output could not be compiled: {e}")),
        })?;
        j.constraint = Some(c.clone());
        compiled.push((g, c));
    }
    Ok(())
}

fn param(g: &GrammarRequest) -> &'static str {
    match g.spec {
        GrammarSpec::JsonSchema { .. } | GrammarSpec::JsonObject => "response_format",
        _ => "structured_outputs",
    }
}
