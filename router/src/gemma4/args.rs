//! Gemma 4's tool-call argument syntax, and the JSON that vLLM's `gemma4` tool parser makes of it.
//!
//! The model writes `call:NAME{key:value,...}` with bare keys, strings wrapped in `<|"|>` (taken raw,
//! with no unescaping), nested `{...}` and `[...]`, and bare scalars. vLLM 0.32 keeps every bare
//! scalar as a string, then types it from the tool's JSON schema (`integer`, `number`, `boolean`,
//! `null`, ...), and serialises with Python's `json.dumps(..., ensure_ascii=False)`: `", "` and
//! `": "` separators, keys in the order the model wrote them, Python's float spelling. This module
//! reproduces that output byte for byte, because clients compare `arguments` strings.
//!
//! Integers beyond 64 bits that reach us through an `object`/`array`-typed string are the one place
//! we differ (serde_json reads them as floats; Python keeps them exact).

use serde_json::Value;

pub const STRING_DELIM: &str = "<|\"|>";

/// A parsed argument value: what the Gemma 4 syntax gives (strings, objects, lists) plus what schema
/// typing turns strings into.
#[derive(Clone, Debug, PartialEq)]
pub enum Arg {
    Str(String),
    Obj(Vec<(String, Arg)>),
    List(Vec<Arg>),
    Null,
    Bool(bool),
    /// Decimal digits, normalised as Python's `int` prints them.
    Int(String),
    Float(f64),
}

/// Inserts like a Python dict: a repeated key keeps its first position and takes the last value.
fn put(obj: &mut Vec<(String, Arg)>, key: String, value: Arg) {
    match obj.iter_mut().find(|(k, _)| *k == key) {
        Some(slot) => slot.1 = value,
        None => obj.push((key, value)),
    }
}

fn is_space(b: u8) -> bool {
    matches!(b, b' ' | b'\n' | b'\t')
}

/// Drops a trailing prefix of `<|"|>` (a delimiter still arriving).
fn strip_partial_delim(v: &str) -> &str {
    for k in (1..=STRING_DELIM.len()).rev() {
        if v.ends_with(&STRING_DELIM[..k]) {
            return &v[..v.len() - k];
        }
    }
    v
}

/// Index just past the bracket that closes the one opened before `i` (depth 1), skipping `<|"|>`
/// strings; `(end, closed)`. Works on bytes: the text may hold any UTF-8 between the brackets.
fn match_bracket(s: &str, mut i: usize, open: u8, close: u8) -> (usize, bool) {
    let b = s.as_bytes();
    let d = STRING_DELIM.as_bytes();
    let mut depth = 1;
    while i < b.len() && depth > 0 {
        if b[i..].starts_with(d) {
            i += d.len();
            i = find_bytes(&b[i..], d).map_or(b.len(), |p| i + p + d.len());
            continue;
        }
        if b[i] == open {
            depth += 1;
        } else if b[i] == close {
            depth -= 1;
        }
        i += 1;
    }
    (i, depth == 0)
}

fn find_bytes(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Nesting deeper than this is kept as raw text (parsing recurses once per level).
const MAX_DEPTH: usize = 64;

/// Parses the inside of `{...}`. With `partial` (streaming), a trailing bare value that may still
/// grow is left out, so its type cannot flip between deltas.
pub fn parse_object(s: &str, partial: bool) -> Vec<(String, Arg)> {
    object_at(s, partial, 0)
}

fn object_at(s: &str, partial: bool, depth: usize) -> Vec<(String, Arg)> {
    let mut out = Vec::new();
    if s.trim().is_empty() {
        return out;
    }
    let b = s.as_bytes();
    let n = b.len();
    let mut i = 0;
    while i < n {
        while i < n && (is_space(b[i]) || b[i] == b',') {
            i += 1;
        }
        if i >= n {
            break;
        }
        let key_start = i;
        while i < n && b[i] != b':' {
            i += 1;
        }
        if i >= n {
            break;
        }
        let mut key = s[key_start..i].trim();
        if key.starts_with(STRING_DELIM) && key.ends_with(STRING_DELIM) {
            let d = STRING_DELIM.len();
            key = if key.len() >= 2 * d { &key[d..key.len() - d] } else { "" };
        }
        let key = key.to_string();
        i += 1;
        while i < n && is_space(b[i]) {
            i += 1;
        }
        if i >= n {
            if !partial {
                put(&mut out, key, Arg::Str(String::new()));
            }
            break;
        }
        if b[i..].starts_with(STRING_DELIM.as_bytes()) {
            i += STRING_DELIM.len();
            match s[i..].find(STRING_DELIM) {
                None => {
                    let v = if partial { strip_partial_delim(&s[i..]) } else { &s[i..] };
                    put(&mut out, key, Arg::Str(v.to_string()));
                    break;
                }
                Some(p) => {
                    put(&mut out, key, Arg::Str(s[i..i + p].to_string()));
                    i += p + STRING_DELIM.len();
                }
            }
        } else if b[i] == b'{' {
            let start = i + 1;
            let (end, closed) = match_bracket(s, start, b'{', b'}');
            i = end;
            let inner = if closed { &s[start..end - 1] } else { &s[start..end] };
            put(&mut out, key, nested(inner, !closed, depth, true));
        } else if b[i] == b'[' {
            let start = i + 1;
            let (end, closed) = match_bracket(s, start, b'[', b']');
            i = end;
            let inner = if closed { &s[start..end - 1] } else { &s[start..end] };
            put(&mut out, key, nested(inner, !closed, depth, false));
        } else {
            let start = i;
            while i < n && !matches!(b[i], b',' | b'}' | b']') {
                i += 1;
            }
            if (partial && i >= n) || i == start {
                break;
            }
            let raw = s[start..i].trim();
            if partial && raw.ends_with('.') {
                break;
            }
            put(&mut out, key, Arg::Str(raw.to_string()));
        }
    }
    out
}

/// Parses the inside of `[...]`.
pub fn parse_list(s: &str, partial: bool) -> Vec<Arg> {
    list_at(s, partial, 0)
}

fn list_at(s: &str, partial: bool, depth: usize) -> Vec<Arg> {
    let mut out = Vec::new();
    let b = s.as_bytes();
    let n = b.len();
    let mut i = 0;
    while i < n {
        while i < n && (is_space(b[i]) || b[i] == b',') {
            i += 1;
        }
        if i >= n {
            break;
        }
        if b[i..].starts_with(STRING_DELIM.as_bytes()) {
            i += STRING_DELIM.len();
            match s[i..].find(STRING_DELIM) {
                None => {
                    out.push(Arg::Str(s[i..].to_string()));
                    break;
                }
                Some(p) => {
                    out.push(Arg::Str(s[i..i + p].to_string()));
                    i += p + STRING_DELIM.len();
                }
            }
        } else if b[i] == b'{' {
            let start = i + 1;
            let (end, closed) = match_bracket(s, start, b'{', b'}');
            i = end;
            out.push(nested(if closed { &s[start..end - 1] } else { &s[start..end] }, !closed, depth, true));
        } else if b[i] == b'[' {
            let start = i + 1;
            let (end, closed) = match_bracket(s, start, b'[', b']');
            i = end;
            out.push(nested(if closed { &s[start..end - 1] } else { &s[start..end] }, !closed, depth, false));
        } else {
            let start = i;
            while i < n && !matches!(b[i], b',' | b']') {
                i += 1;
            }
            if (partial && i >= n) || i == start {
                break;
            }
            let raw = s[start..i].trim();
            if partial && raw.ends_with('.') {
                break;
            }
            out.push(Arg::Str(raw.to_string()));
        }
    }
    out
}

/// A nested `{...}` (`object`) or `[...]`; past [`MAX_DEPTH`] its text is kept as a string.
fn nested(inner: &str, partial: bool, depth: usize, object: bool) -> Arg {
    if depth + 1 >= MAX_DEPTH {
        return Arg::Str(inner.to_string());
    }
    if object { Arg::Obj(object_at(inner, partial, depth + 1)) } else { Arg::List(list_at(inner, partial, depth + 1)) }
}

/// The arguments text of one call (everything after `call:NAME{`, up to `<tool_call|>`) as parsed
/// arguments: a closing `}` (or an unbalanced `)`) is dropped first.
pub fn parse_call_args(raw: &str, partial: bool) -> Vec<(String, Arg)> {
    let mut text = raw.trim();
    let unbalanced_paren = text.ends_with(')') && text.matches('(').count() < text.matches(')').count();
    if text.ends_with('}') || unbalanced_paren {
        text = &text[..text.len() - 1];
    }
    parse_object(text, partial)
}

// ---- Typing from the tool's schema ----

/// The JSON-schema types a value may take (`type`, `enum` values, `anyOf`/`oneOf`/`allOf`), or
/// `["string"]` when the schema says nothing.
pub fn schema_types(schema: &Value) -> Vec<String> {
    let Some(obj) = schema.as_object() else { return vec!["string".into()] };
    let mut types: Vec<String> = Vec::new();
    let mut add = |t: &str| {
        if !types.iter().any(|x| x == t) {
            types.push(t.to_string());
        }
    };
    match obj.get("type") {
        Some(Value::String(t)) => add(t),
        Some(Value::Array(ts)) => ts.iter().filter_map(Value::as_str).for_each(&mut add),
        _ => {}
    }
    if let Some(Value::Array(values)) = obj.get("enum") {
        for v in values {
            add(match v {
                Value::Null => "null",
                Value::Bool(_) => "boolean",
                Value::Number(n) if n.is_f64() => "number",
                Value::Number(_) => "integer",
                Value::String(_) => "string",
                Value::Array(_) => "array",
                Value::Object(_) => "object",
            });
        }
    }
    for k in ["anyOf", "oneOf", "allOf"] {
        if let Some(Value::Array(choices)) = obj.get(k) {
            for c in choices {
                for t in schema_types(c) {
                    add(&t);
                }
            }
        }
    }
    if types.is_empty() { vec!["string".into()] } else { types }
}

fn normalise_type(t: &str) -> String {
    let t = t.trim().to_lowercase();
    let alias = match t.as_str() {
        "str" | "text" | "varchar" | "char" | "enum" => "string",
        "int" | "int32" | "int64" | "uint" | "uint32" | "uint64" | "long" | "short" | "unsigned" => "integer",
        "float" | "float32" | "float64" | "double" => "number",
        "bool" => "boolean",
        "dict" => "object",
        "arr" | "list" | "sequence" => "array",
        _ => return t,
    };
    alias.to_string()
}

/// Python's `int(s)`: surrounding whitespace, a sign, digits with single `_` between them.
fn py_int(s: &str) -> Option<String> {
    let t = s.trim();
    let (neg, digits) = match t.as_bytes().first()? {
        b'-' => (true, &t[1..]),
        b'+' => (false, &t[1..]),
        _ => (false, t),
    };
    let clean = py_digits(digits)?;
    let clean = clean.trim_start_matches('0');
    Some(match (clean.is_empty(), neg) {
        (true, _) => "0".to_string(),
        (false, true) => format!("-{clean}"),
        (false, false) => clean.to_string(),
    })
}

/// ASCII digits with single underscores between them, underscores removed.
fn py_digits(s: &str) -> Option<String> {
    let b = s.as_bytes();
    if b.is_empty() || !b[0].is_ascii_digit() || !b[b.len() - 1].is_ascii_digit() {
        return None;
    }
    let mut out = String::with_capacity(s.len());
    for (i, &c) in b.iter().enumerate() {
        if c == b'_' {
            if !b[i - 1].is_ascii_digit() || !b[i + 1].is_ascii_digit() {
                return None;
            }
        } else if c.is_ascii_digit() {
            out.push(c as char);
        } else {
            return None;
        }
    }
    Some(out)
}

/// Python's `float(s)` for finite results (inf and nan are refused, as vLLM refuses them).
fn py_float(s: &str) -> Option<f64> {
    let t = s.trim();
    let b = t.as_bytes();
    // Underscores only between digits; Rust's parser takes none.
    let mut clean = String::with_capacity(t.len());
    for (i, &c) in b.iter().enumerate() {
        if c == b'_' {
            let ok = i > 0 && i + 1 < b.len() && b[i - 1].is_ascii_digit() && b[i + 1].is_ascii_digit();
            if !ok {
                return None;
            }
        } else {
            clean.push(c as char);
        }
    }
    let v: f64 = clean.parse().ok()?;
    v.is_finite().then_some(v)
}

/// A finite float as Python's `int(v)` prints it.
fn float_as_int(v: f64) -> String {
    let s = format!("{v:.0}");
    if s == "-0" { "0".into() } else { s }
}

/// `vllm.tool_parsers.utils.coerce_to_schema_type`: `None` when the value stays the same string.
fn coerce_str(value: &str, types: &[String]) -> Option<Arg> {
    let types: Vec<String> = types.iter().map(|t| normalise_type(t)).collect();
    let has = |t: &str| types.iter().any(|x| x == t);
    for cand in ["null", "integer", "number", "boolean", "object", "array", "string"] {
        if !has(cand) {
            continue;
        }
        match cand {
            "null" if value.to_lowercase() == "null" => return Some(Arg::Null),
            "string" => return None,
            "integer" => {
                if let Some(i) = py_int(value) {
                    return Some(Arg::Int(i));
                }
            }
            "number" => {
                if let Some(v) = py_float(value) {
                    return Some(if v.fract() == 0.0 { Arg::Int(float_as_int(v)) } else { Arg::Float(v) });
                }
            }
            "boolean" => match value.trim().to_lowercase().as_str() {
                "true" | "1" => return Some(Arg::Bool(true)),
                "false" | "0" => return Some(Arg::Bool(false)),
                _ => {}
            },
            "object" | "array" => {
                if let Some(v) = json_loads(value) {
                    return Some(v);
                }
            }
            _ => {}
        }
    }
    json_loads(value)
}

/// Python's `json.loads` for finite JSON.
fn json_loads(s: &str) -> Option<Arg> {
    let v: Value = serde_json::from_str(s.trim_matches(|c: char| c == ' ' || c == '\t' || c == '\n' || c == '\r')).ok()?;
    Some(from_json(&v))
}

fn from_json(v: &Value) -> Arg {
    match v {
        Value::Null => Arg::Null,
        Value::Bool(b) => Arg::Bool(*b),
        Value::Number(n) => match (n.as_i64(), n.as_u64()) {
            (Some(i), _) => Arg::Int(i.to_string()),
            (None, Some(u)) => Arg::Int(u.to_string()),
            _ => Arg::Float(n.as_f64().unwrap_or(0.0)),
        },
        Value::String(s) => Arg::Str(s.clone()),
        Value::Array(a) => Arg::List(a.iter().map(from_json).collect()),
        Value::Object(o) => Arg::Obj(o.iter().map(|(k, v)| (k.clone(), from_json(v))).collect()),
    }
}

/// `ParserEngine._coerce_value`: strings are typed from the schema; objects and lists are walked when
/// the schema describes their `properties` / `items`.
fn coerce(value: &mut Arg, schema: &Value) {
    match value {
        Arg::Str(s) => {
            if let Some(v) = coerce_str(s, &schema_types(schema)) {
                *value = v;
            }
        }
        Arg::Obj(fields) => {
            if let Some(Value::Object(props)) = schema.get("properties") {
                coerce_fields(fields, props);
            }
        }
        Arg::List(items) => {
            if let Some(item_schema @ Value::Object(_)) = schema.get("items") {
                items.iter_mut().for_each(|i| coerce(i, item_schema));
            }
        }
        _ => {}
    }
}

/// Types every field that `properties` describes.
pub fn coerce_fields(fields: &mut [(String, Arg)], properties: &serde_json::Map<String, Value>) {
    for (k, v) in fields.iter_mut() {
        if let Some(schema @ Value::Object(_)) = properties.get(k) {
            coerce(v, schema);
        }
    }
}

// ---- Python's json.dumps ----

/// Python's `repr(float)` for a finite value.
fn py_float_repr(v: f64) -> String {
    // `{:e}` gives the shortest round-trip digits: "1.5e-7", "1e16".
    let e = format!("{v:e}");
    let (mantissa, exp) = e.split_once('e').unwrap_or((&e, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    if (-4..16).contains(&exp) {
        let s = format!("{v}");
        if s.contains('.') { s } else { format!("{s}.0") }
    } else {
        let sign = if exp < 0 { '-' } else { '+' };
        format!("{mantissa}e{sign}{:02}", exp.abs())
    }
}

/// Appends `json.dumps(value, ensure_ascii=False)`.
pub fn dumps_into(out: &mut String, a: &Arg) {
    match a {
        Arg::Str(s) => out.push_str(&serde_json::to_string(s).unwrap_or_default()),
        Arg::Null => out.push_str("null"),
        Arg::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Arg::Int(i) => out.push_str(i),
        Arg::Float(f) => out.push_str(&py_float_repr(*f)),
        Arg::List(items) => {
            out.push('[');
            for (i, v) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                dumps_into(out, v);
            }
            out.push(']');
        }
        Arg::Obj(fields) => dumps_fields_into(out, fields),
    }
}

pub fn dumps_fields_into(out: &mut String, fields: &[(String, Arg)]) {
    out.push('{');
    for (i, (k, v)) in fields.iter().enumerate() {
        if i > 0 {
            out.push_str(", ");
        }
        out.push_str(&serde_json::to_string(k).unwrap_or_default());
        out.push_str(": ");
        dumps_into(out, v);
    }
    out.push('}');
}

pub fn dumps_fields(fields: &[(String, Arg)]) -> String {
    let mut s = String::new();
    dumps_fields_into(&mut s, fields);
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn s(v: &str) -> Arg {
        Arg::Str(v.into())
    }

    #[test]
    fn the_syntax_parses_as_vllm_parses_it() {
        let a = parse_call_args(r#"location:<|"|>Paris, "FR" {x}<|"|>,days:2,ok:true,n:null,nest:{a:[1,<|"|>b<|"|>,{c:x}]}}"#, false);
        assert_eq!(
            a,
            vec![
                ("location".into(), s(r#"Paris, "FR" {x}"#)),
                ("days".into(), s("2")),
                ("ok".into(), s("true")),
                ("n".into(), s("null")),
                ("nest".into(), Arg::Obj(vec![("a".into(), Arg::List(vec![s("1"), s("b"), Arg::Obj(vec![("c".into(), s("x"))])]))])),
            ]
        );
        assert_eq!(
            dumps_fields(&a),
            r#"{"location": "Paris, \"FR\" {x}", "days": "2", "ok": "true", "n": "null", "nest": {"a": ["1", "b", {"c": "x"}]}}"#
        );
        // Quoted keys, a repeated key, empty arguments.
        assert_eq!(parse_call_args(r#"<|"|>k<|"|>:1,k:2,j:3}"#, false), vec![("k".into(), s("2")), ("j".into(), s("3"))]);
        assert!(parse_call_args("}", false).is_empty());
    }

    #[test]
    fn any_text_and_any_depth_parse_without_panicking() {
        let a = parse_call_args("filters:{city:München,tags:[日本,é]},x:<|\"|>ü{<|\"|>}", false);
        assert_eq!(dumps_fields(&a), r#"{"filters": {"city": "München", "tags": ["日本", "é"]}, "x": "ü{"}"#);
        let deep = format!("a:{}1{}", "[".repeat(100_000), "]".repeat(100_000));
        for partial in [false, true] {
            let v = parse_object(&deep, partial);
            let s = dumps_fields(&v);
            assert!(s.starts_with(r#"{"a": [[["#) && s.len() < 300_000, "{}", &s[..40]);
        }
        // Every prefix of a messy call, streamed: never a panic.
        let messy = "q:{ü:[<|\"|>a,b<|\"|>,{c:ö}],d:-1.5e3},r:<|\"|>日<|\"";
        for (i, _) in messy.char_indices() {
            let _ = dumps_fields(&parse_object(&messy[..i], true));
        }
    }

    #[test]
    fn partial_parses_hold_back_what_may_still_change() {
        assert_eq!(parse_object("a:12", true), vec![]);
        assert_eq!(parse_object("a:12,b:1.", true), vec![("a".into(), s("12"))]);
        assert_eq!(parse_object(r#"a:<|"|>Par<|"#, true), vec![("a".into(), s("Par"))]);
        assert_eq!(parse_object("a:{b:1,c:<|\"|>x", true), vec![("a".into(), Arg::Obj(vec![("b".into(), s("1")), ("c".into(), s("x"))]))]);
        assert_eq!(parse_object("a:", false), vec![("a".into(), s(""))]);
        assert_eq!(parse_object("a:", true), vec![]);
    }

    #[test]
    fn values_are_typed_from_the_schema_as_vllm_types_them() {
        let props = json!({
            "i": {"type": "integer"}, "f": {"type": "number"}, "g": {"type": "number"}, "b": {"type": "boolean"},
            "n": {"type": ["string", "null"]}, "s": {"type": "string"}, "e": {"enum": [1, 2]},
            "o": {"type": "object"}, "l": {"type": "array", "items": {"type": "integer"}}, "bad": {"type": "integer"},
            "deep": {"type": "object", "properties": {"x": {"type": "boolean"}}}, "tiny": {"type": "number"}
        });
        let mut a = parse_call_args(
            r#"i: 0_42 ,f:2.50,g:3.0,b:1,n:NULL,s:12,e:2,o:<|"|>{"k": [1.0, 2]}<|"|>,l:[1,x],bad:1.5,deep:{x:false},tiny:0.00001,free:7}"#,
            false,
        );
        coerce_fields(&mut a, props.as_object().unwrap());
        assert_eq!(
            dumps_fields(&a),
            r#"{"i": 42, "f": 2.5, "g": 3, "b": true, "n": null, "s": "12", "e": 2, "o": {"k": [1.0, 2]}, "l": [1, "x"], "bad": 1.5, "deep": {"x": false}, "tiny": 1e-05, "free": "7"}"#
        );
    }

    #[test]
    fn floats_are_spelled_as_python_spells_them() {
        for (v, want) in [
            (0.1, "0.1"),
            (1.0, "1.0"),
            (1e16, "1e+16"),
            (1.5e-7, "1.5e-07"),
            (123.456, "123.456"),
            (0.0001, "0.0001"),
            (-2.5e20, "-2.5e+20"),
        ] {
            assert_eq!(py_float_repr(v), want);
        }
        assert_eq!(float_as_int(1e20), "100000000000000000000");
    }
}
