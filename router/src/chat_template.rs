//! Chat-template rendering: the prompt text HF transformers 5.23 `apply_chat_template(tokenize=False)` renders,
//! byte for byte, from the checkpoint's own Jinja template.
//!
//! transformers renders with Python jinja2 in `ImmutableSandboxedEnvironment(trim_blocks=True,
//! lstrip_blocks=True, extensions=[loopcontrols])` plus its own globals (`raise_exception`, `strftime_now`) and a
//! `tojson` filter that is plain `json.dumps`. Here the same template runs on minijinja with the contrib `pycompat`
//! methods (`.get()`, `.split()`, `.items()`, ...), and the places where minijinja's defaults differ from jinja2 are
//! replaced: how values print (`str()`), `trim` and `.strip()` (Python whitespace), `dictsort` (Python `lower()`),
//! the `sequence` and `number` tests, and `tojson`. The inputs get the same normalisation transformers applies
//! before rendering (`None` keys dropped, reasoning aliased to `reasoning_content`).
//!
//! Templates come with checkpoints, so they are treated as untrusted: there is no loader (no `include` or
//! `import` of files), and every render runs under a fuel budget and an output-size cap.

use std::collections::BTreeMap;
use std::io;
use std::path::Path;

use minijinja::value::{Kwargs, Rest, Tuple, ValueKind};
use minijinja::{AutoEscape, Environment, Error, ErrorKind, State, Value as MjValue, syntax::SyntaxConfig};
use serde_json::{Map, Value};

/// The named special tokens a template sees as variables (`bos_token`, `eos_token`, ...).
pub type SpecialTokens = BTreeMap<String, String>;

const TEMPLATE_NAME: &str = "chat_template";

/// Message fields transformers treats as the same reasoning text; the first present one wins.
const REASONING_FIELDS: [&str; 3] = ["reasoning_content", "thinking", "reasoning"];

/// Names `apply_chat_template` passes itself; `chat_template_kwargs` may not replace them.
const RESERVED_NAMES: [&str; 4] = ["messages", "tools", "documents", "add_generation_prompt"];

#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    #[error("the chat template does not compile: {0}")]
    Syntax(String),
    /// The template called `raise_exception(message)`: it rejects this conversation.
    #[error("{0}")]
    Raised(String),
    #[error("the chat template used up its fuel ({0} units) before finishing")]
    FuelExhausted(u64),
    #[error("the rendered prompt is larger than {0} bytes")]
    OutputTooLarge(usize),
    #[error("the chat template failed: {0}")]
    Render(String),
    #[error("{0}")]
    InvalidInput(String),
}

/// Bounds on one render, so a hostile template cannot loop forever or exhaust memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RenderLimits {
    /// minijinja fuel: about one unit per instruction plus one per 64 bytes created.
    pub fuel: u64,
    pub max_output_bytes: usize,
}

impl Default for RenderLimits {
    /// Generous for real conversations yet about two seconds of CPU at most: the Gemma 4 templates scan forward
    /// from every message, so their fuel grows with the square of the message count (1000 messages take 4.6M,
    /// 3000 about 40M).
    fn default() -> Self {
        Self { fuel: 50_000_000, max_output_bytes: 64 << 20 }
    }
}

/// One render: the fields transformers' `apply_chat_template` takes, minus the ones a server does not expose.
#[derive(Clone, Copy, Debug)]
pub struct RenderRequest<'a> {
    /// The conversation: an array of message objects.
    pub messages: &'a Value,
    /// OpenAI function specs; `None` renders as Python's `None`, as transformers passes it.
    pub tools: Option<&'a Value>,
    pub add_generation_prompt: bool,
    /// `chat_template_kwargs`: extra template variables such as `enable_thinking`.
    pub kwargs: &'a Map<String, Value>,
}

/// A compiled chat template together with the special tokens it is rendered with.
pub struct ChatTemplate {
    env: Environment<'static>,
    special: SpecialTokens,
    limits: RenderLimits,
}

impl ChatTemplate {
    /// Compiles `source` (a `chat_template.jinja`, or the `chat_template` string of `tokenizer_config.json`).
    pub fn new(source: &str, special: SpecialTokens) -> Result<Self, TemplateError> {
        let mut env = hf_environment()?;
        env.add_template_owned(TEMPLATE_NAME, source.to_owned()).map_err(|e| TemplateError::Syntax(e.to_string()))?;
        Ok(Self { env, special, limits: RenderLimits::default() }.with_limits(RenderLimits::default()))
    }

    pub fn with_limits(mut self, limits: RenderLimits) -> Self {
        self.set_limits(limits);
        self
    }

    fn set_limits(&mut self, limits: RenderLimits) {
        self.env.set_fuel(Some(limits.fuel));
        self.limits = limits;
    }

    pub fn special_tokens(&self) -> &SpecialTokens {
        &self.special
    }

    /// Renders the prompt text, exactly as transformers would for the same inputs.
    pub fn render(&self, req: &RenderRequest<'_>) -> Result<String, TemplateError> {
        let ctx = self.context(req)?;
        let template = self.env.get_template(TEMPLATE_NAME).map_err(|e| TemplateError::Syntax(e.to_string()))?;
        let mut out = CappedWriter { buf: Vec::new(), cap: self.limits.max_output_bytes, overflowed: false };
        match template.render_captured_to(ctx, &mut out) {
            Ok(_) => String::from_utf8(out.buf).map_err(|_| TemplateError::Render("the output is not UTF-8".into())),
            Err(_) if out.overflowed => Err(TemplateError::OutputTooLarge(self.limits.max_output_bytes)),
            Err(e) => Err(self.classify(e)),
        }
    }

    /// The variables transformers hands the template: special tokens, then `chat_template_kwargs`, then the
    /// arguments of `render_jinja_template` itself.
    fn context(&self, req: &RenderRequest<'_>) -> Result<MjValue, TemplateError> {
        let mut ctx: BTreeMap<String, MjValue> = self.special.iter().map(|(k, v)| (k.clone(), MjValue::from(v.as_str()))).collect();
        // Unlike transformers, a request may not replace the special tokens: a client must not be able to
        // change what `bos_token` renders as.
        for (k, v) in req.kwargs {
            if !RESERVED_NAMES.contains(&k.as_str()) && !self.special.contains_key(k) {
                ctx.insert(k.clone(), to_template_value(v));
            }
        }
        ctx.insert("messages".into(), template_messages(req.messages)?);
        ctx.insert("tools".into(), req.tools.map_or(MjValue::from(()), to_template_value));
        ctx.insert("documents".into(), MjValue::from(()));
        ctx.insert("add_generation_prompt".into(), req.add_generation_prompt.into());
        Ok(MjValue::from(ctx))
    }

    fn classify(&self, err: Error) -> TemplateError {
        if err.kind() == ErrorKind::OutOfFuel {
            return TemplateError::FuelExhausted(self.limits.fuel);
        }
        let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&err);
        while let Some(e) = source {
            if let Some(Raised(msg)) = e.downcast_ref::<Raised>() {
                return TemplateError::Raised(msg.clone());
            }
            source = e.source();
        }
        TemplateError::Render(err.to_string())
    }
}

/// Reads the named special tokens from a checkpoint's `tokenizer_config.json`; a missing or unreadable file
/// gives none (the tokenizer load reports a broken checkpoint directory).
pub fn special_tokens_from_config(path: impl AsRef<Path>) -> SpecialTokens {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|text| serde_json::from_str::<Value>(&text).ok())
        .map(|config| special_tokens_from_json(&config))
        .unwrap_or_default()
}

/// transformers 5.23's `special_tokens_map`: every top-level `*_token` key holding a string (or an `AddedToken`
/// object's `content`), plus the named entries of `extra_special_tokens` when that is an object.
pub fn special_tokens_from_json(config: &Value) -> SpecialTokens {
    let token_text = |v: &Value| v.as_str().or_else(|| v.get("content").and_then(Value::as_str)).map(str::to_owned);
    let Some(obj) = config.as_object() else { return SpecialTokens::new() };
    let named = obj.iter().filter(|(k, _)| k.ends_with("_token"));
    let extra = obj.get("extra_special_tokens").and_then(Value::as_object).into_iter().flatten();
    named.chain(extra).filter_map(|(k, v)| Some((k.clone(), token_text(v)?))).collect()
}

/// transformers' normalisation of the conversation before it renders (`apply_chat_template` and
/// `_alias_reasoning_fields`): keys whose value is `None` are dropped, and a message with reasoning under any of
/// its names becomes `{"thinking": r, **message, "reasoning_content": r}` (key order included).
fn template_messages(messages: &Value) -> Result<MjValue, TemplateError> {
    let Some(list) = messages.as_array() else { return Err(TemplateError::InvalidInput("`messages` must be an array".into())) };
    let mut out = Vec::with_capacity(list.len());
    for (i, message) in list.iter().enumerate() {
        let Some(obj) = message.as_object() else {
            return Err(TemplateError::InvalidInput(format!("messages[{i}] must be an object")));
        };
        let mut msg: Map<String, Value> = obj.iter().filter(|(_, v)| !v.is_null()).map(|(k, v)| (k.clone(), v.clone())).collect();
        if let Some(reasoning) = REASONING_FIELDS.iter().find_map(|k| msg.get(*k)).cloned() {
            let mut aliased = Map::new();
            aliased.insert("thinking".into(), reasoning.clone());
            aliased.extend(msg);
            aliased.insert("reasoning_content".into(), reasoning);
            msg = aliased;
        }
        out.push(object_to_template_value(&msg));
    }
    Ok(MjValue::from(out))
}

/// JSON to a template value, keeping map order (Python dicts iterate in insertion order).
fn to_template_value(v: &Value) -> MjValue {
    match v {
        Value::Null => MjValue::from(()),
        Value::Bool(b) => MjValue::from(*b),
        Value::Number(n) => match (n.as_i64(), n.as_u64()) {
            (Some(i), _) => MjValue::from(i),
            (None, Some(u)) => MjValue::from(u),
            _ => MjValue::from(n.as_f64().unwrap_or(f64::NAN)),
        },
        Value::String(s) => MjValue::from(s.as_str()),
        Value::Array(items) => MjValue::from(items.iter().map(to_template_value).collect::<Vec<_>>()),
        Value::Object(obj) => object_to_template_value(obj),
    }
}

fn object_to_template_value(obj: &Map<String, Value>) -> MjValue {
    MjValue::from_pairs(obj.iter().map(|(k, v)| (k.as_str(), to_template_value(v))))
}

/// Collects the output and refuses to grow past `cap`.
struct CappedWriter {
    buf: Vec<u8>,
    cap: usize,
    overflowed: bool,
}

impl io::Write for CappedWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if self.buf.len() + data.len() > self.cap {
            self.overflowed = true;
            return Err(io::Error::other("output cap reached"));
        }
        self.buf.extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The error `raise_exception` carries, so `render` can tell it from an engine failure.
#[derive(Debug)]
struct Raised(String);

impl std::fmt::Display for Raised {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Raised {}

/// The jinja2 environment transformers builds in `_cached_compile_jinja_template`, in minijinja terms.
fn hf_environment() -> Result<Environment<'static>, TemplateError> {
    let mut env = Environment::new();
    let syntax = SyntaxConfig::builder().trim_blocks(true).lstrip_blocks(true).keep_trailing_newline(false).build();
    env.set_syntax(syntax.map_err(|e| TemplateError::Syntax(e.to_string()))?);
    env.set_auto_escape_callback(|_| AutoEscape::None);
    env.set_unknown_method_callback(py_methods);
    env.set_formatter(|out, _state, value| out.write_str(&py::str(value)).map_err(|_| Error::from(ErrorKind::WriteFailure)));
    env.add_function("raise_exception", |msg: MjValue| -> Result<MjValue, Error> {
        Err(Error::new(ErrorKind::InvalidOperation, "raise_exception").with_source(Raised(py::str(&msg))))
    });
    env.add_function("strftime_now", |format: &str| py::strftime(format, std::time::SystemTime::now()));
    env.add_filter("tojson", tojson);
    env.add_filter("trim", |value: MjValue, chars: Option<String>| py::strip(&py::str(&value), chars.as_deref(), true, true).to_owned());
    env.add_filter("string", |value: MjValue| py::str(&value));
    env.add_filter("upper", |value: MjValue| py::str(&value).to_uppercase());
    env.add_filter("lower", |value: MjValue| py::str(&value).to_lowercase());
    env.add_filter("dictsort", dictsort);
    // jinja2's `sequence` is "has len() and []": strings and dicts too; its `number` is `isinstance(x, Number)`,
    // which includes booleans.
    env.add_test("sequence", |v: MjValue| {
        matches!(v.kind(), ValueKind::Undefined | ValueKind::String | ValueKind::Seq | ValueKind::Map | ValueKind::Iterable)
    });
    env.add_test("number", |v: MjValue| matches!(v.kind(), ValueKind::Number | ValueKind::Bool));
    Ok(env)
}

/// Python's `str.strip` family use Python's whitespace; everything else comes from minijinja-contrib.
fn py_methods(state: &mut State, value: &MjValue, method: &str, args: &[MjValue]) -> Result<MjValue, Error> {
    let (left, right) = match method {
        "strip" => (true, true),
        "lstrip" => (true, false),
        "rstrip" => (false, true),
        _ => return minijinja_contrib::pycompat::unknown_method_callback(state, value, method, args),
    };
    let Some(s) = value.as_str() else { return minijinja_contrib::pycompat::unknown_method_callback(state, value, method, args) };
    let (chars,): (Option<&str>,) = minijinja::value::from_args(args)?;
    Ok(MjValue::from(py::strip(s, chars, left, right)))
}

/// HF's `tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False)`, i.e. `json.dumps`.
fn tojson(state: &State, value: &MjValue, positional: Rest<MjValue>, kwargs: Kwargs) -> Result<MjValue, Error> {
    let mut opts = py::JsonOptions::default();
    let names = ["ensure_ascii", "indent", "separators", "sort_keys"];
    for (i, arg) in positional.iter().enumerate() {
        let name = names.get(i).ok_or_else(|| Error::from(ErrorKind::TooManyArguments))?;
        opts.set(name, arg.clone())?;
    }
    for name in names {
        if let Some(arg) = kwargs.get::<Option<MjValue>>(name)? {
            opts.set(name, arg)?;
        }
    }
    kwargs.assert_all_used()?;
    let text = py::json_dumps(value, &opts)?;
    state.consume_fuel(text.len() as u64 / 64)?;
    Ok(MjValue::from(text))
}

/// jinja2's `dictsort(case_sensitive=False, by='key', reverse=False)`: a stable sort, strings compared by
/// `str.lower()`, equal keys keeping their order even when reversed.
fn dictsort(state: &State, value: &MjValue, kwargs: Kwargs) -> Result<MjValue, Error> {
    let case_sensitive = kwargs.get::<Option<bool>>("case_sensitive")?.unwrap_or(false);
    let by_value = match kwargs.get::<Option<&str>>("by")? {
        None | Some("key") => false,
        Some("value") => true,
        Some(_) => return Err(Error::new(ErrorKind::InvalidOperation, "You can only sort by either \"key\" or \"value\"")),
    };
    let reverse = kwargs.get::<Option<bool>>("reverse")?.unwrap_or(false);
    kwargs.assert_all_used()?;
    if value.kind() != ValueKind::Map {
        return Err(Error::new(ErrorKind::InvalidOperation, "dictsort expects a mapping"));
    }
    let mut pairs = Vec::new();
    for key in value.try_iter()? {
        let item = value.get_item(&key)?;
        pairs.push((key, item));
    }
    state.consume_fuel(pairs.len() as u64)?;
    let sort_key = |pair: &(MjValue, MjValue)| {
        let v = if by_value { &pair.1 } else { &pair.0 };
        match v.as_str() {
            Some(s) if !case_sensitive => MjValue::from(s.to_lowercase()),
            _ => v.clone(),
        }
    };
    let mut keyed: Vec<_> = pairs.into_iter().map(|p| (sort_key(&p), p)).collect();
    keyed.sort_by(|a, b| if reverse { b.0.cmp(&a.0) } else { a.0.cmp(&b.0) });
    Ok(keyed.into_iter().map(|(_, (k, v))| MjValue::from(Tuple::from([k, v]))).collect())
}

/// Python semantics the template engine needs: `str()`, `repr()`, `str.strip`, `json.dumps`, `strftime`.
mod py {
    use minijinja::value::ValueKind;
    use minijinja::{Error, ErrorKind, Value};

    /// Python's `str(x)` of a template value (what `{{ x }}` prints in jinja2).
    pub fn str(value: &Value) -> String {
        match value.kind() {
            ValueKind::Undefined => String::new(),
            ValueKind::String => value.as_str().unwrap_or_default().to_owned(),
            _ => repr(value),
        }
    }

    /// Python's `repr(x)`: lists, dicts and tuples print their items this way.
    pub fn repr(value: &Value) -> String {
        match value.kind() {
            ValueKind::Undefined => String::new(),
            ValueKind::String => repr_str(value.as_str().unwrap_or_default()),
            ValueKind::Number if !value.is_integer() => f64::try_from(value.clone()).map(float_repr).unwrap_or_else(|_| value.to_string()),
            // A slice is a lazy iterable in minijinja but a list in Python.
            ValueKind::Seq | ValueKind::Iterable => {
                let items: Vec<String> = value.try_iter().into_iter().flatten().map(|v| repr(&v)).collect();
                match (value.is_tuple(), items.len()) {
                    (true, 1) => format!("({},)", items[0]),
                    (true, _) => format!("({})", items.join(", ")),
                    (false, _) => format!("[{}]", items.join(", ")),
                }
            }
            ValueKind::Map => {
                let items = value.try_iter().into_iter().flatten().map(|k| {
                    let v = value.get_item(&k).unwrap_or_default();
                    format!("{}: {}", repr(&k), repr(&v))
                });
                format!("{{{}}}", items.collect::<Vec<_>>().join(", "))
            }
            _ => value.to_string(),
        }
    }

    fn repr_str(s: &str) -> String {
        let quote = if s.contains('\'') && !s.contains('"') { '"' } else { '\'' };
        let mut out = String::with_capacity(s.len() + 2);
        out.push(quote);
        for c in s.chars() {
            match c {
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\t' => out.push_str("\\t"),
                c if c == quote => {
                    out.push('\\');
                    out.push(c);
                }
                // Approximates `str.isprintable()`: controls and whitespace other than the space.
                c if c.is_control() || (c.is_whitespace() && c != ' ') => out.push_str(&match c as u32 {
                    n @ 0..=0xff => format!("\\x{n:02x}"),
                    n @ 0x100..=0xffff => format!("\\u{n:04x}"),
                    n => format!("\\U{n:08x}"),
                }),
                c => out.push(c),
            }
        }
        out.push(quote);
        out
    }

    /// Python's `repr(float)`: shortest round-trip digits, positional for exponents in [-4, 16).
    pub fn float_repr(v: f64) -> String {
        if v.is_nan() {
            return "nan".into();
        }
        if v.is_infinite() {
            return if v < 0.0 { "-inf" } else { "inf" }.into();
        }
        let sci = format!("{v:e}");
        let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
        let exp: i32 = exp.parse().unwrap_or(0);
        let (sign, mantissa) = mantissa.strip_prefix('-').map_or(("", mantissa), |m| ("-", m));
        let digits = mantissa.replace('.', "");
        if (-4..16).contains(&exp) {
            let point = exp + 1;
            let body = if point <= 0 {
                format!("0.{}{digits}", "0".repeat(point.unsigned_abs() as usize))
            } else if point as usize >= digits.len() {
                format!("{digits}{}.0", "0".repeat(point as usize - digits.len()))
            } else {
                format!("{}.{}", &digits[..point as usize], &digits[point as usize..])
            };
            return format!("{sign}{body}");
        }
        let (first, rest) = digits.split_at(1);
        let frac = if rest.is_empty() { String::new() } else { format!(".{rest}") };
        format!("{sign}{first}{frac}e{}{:02}", if exp < 0 { '-' } else { '+' }, exp.unsigned_abs())
    }

    /// Python's `str.isspace()` set: Rust's `char::is_whitespace` plus the ASCII separators U+001C..U+001F.
    fn is_space(c: char) -> bool {
        c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
    }

    /// `str.strip(chars)` / `lstrip` / `rstrip`.
    pub fn strip<'a>(s: &'a str, chars: Option<&str>, left: bool, right: bool) -> &'a str {
        let strip_it = |c: char| chars.map_or_else(|| is_space(c), |set| set.contains(c));
        let s = if left { s.trim_start_matches(strip_it) } else { s };
        if right { s.trim_end_matches(strip_it) } else { s }
    }

    /// The arguments of `json.dumps` that HF's `tojson` exposes.
    #[derive(Default)]
    pub struct JsonOptions {
        ensure_ascii: bool,
        indent: Option<String>,
        separators: Option<(String, String)>,
        sort_keys: bool,
    }

    impl JsonOptions {
        pub fn set(&mut self, name: &str, value: Value) -> Result<(), Error> {
            let bad = |what: &str| Error::new(ErrorKind::InvalidOperation, format!("tojson: bad {what}"));
            match name {
                "ensure_ascii" => self.ensure_ascii = value.is_true(),
                "sort_keys" => self.sort_keys = value.is_true(),
                // An int indents by that many spaces (none when negative), a string by itself.
                "indent" if value.is_none() => self.indent = None,
                "indent" if value.kind() == ValueKind::String => self.indent = value.as_str().map(str::to_owned),
                "indent" => self.indent = Some(" ".repeat(value.as_i64().ok_or_else(|| bad("indent"))?.max(0) as usize)),
                "separators" if value.is_none() => self.separators = None,
                "separators" => {
                    let parts: Vec<Value> = value.try_iter().map_err(|_| bad("separators"))?.collect();
                    let [item, key] = parts.as_slice() else { return Err(bad("separators")) };
                    self.separators = Some((str(item), str(key)));
                }
                _ => return Err(bad(name)),
            }
            Ok(())
        }
    }

    /// `json.dumps(value, ...)` with Python's defaults: `", "`/`": "` separators (`","` once indenting), keys in
    /// insertion order, floats as `repr`, NaN/Infinity allowed.
    pub fn json_dumps(value: &Value, opts: &JsonOptions) -> Result<String, Error> {
        let default_item = if opts.indent.is_some() { "," } else { ", " };
        let (item_sep, key_sep) = opts.separators.clone().unwrap_or_else(|| (default_item.into(), ": ".into()));
        let mut w = JsonWriter { out: String::new(), opts, item_sep, key_sep };
        w.value(value, 0)?;
        Ok(w.out)
    }

    struct JsonWriter<'a> {
        out: String,
        opts: &'a JsonOptions,
        item_sep: String,
        key_sep: String,
    }

    impl JsonWriter<'_> {
        fn value(&mut self, value: &Value, depth: usize) -> Result<(), Error> {
            if let Some(text) = scalar(value) {
                self.out.push_str(&text);
                return Ok(());
            }
            let items: Vec<(Option<Value>, Value)> = match value.kind() {
                ValueKind::String => {
                    self.string(value.as_str().unwrap_or_default());
                    return Ok(());
                }
                ValueKind::Seq | ValueKind::Iterable => value.try_iter()?.map(|item| (None, item)).collect(),
                ValueKind::Map => {
                    let mut keys: Vec<Value> = value.try_iter()?.collect();
                    if self.opts.sort_keys {
                        keys.sort();
                    }
                    keys.into_iter().map(|k| Ok((Some(k.clone()), value.get_item(&k)?))).collect::<Result<_, Error>>()?
                }
                kind => return Err(Error::new(ErrorKind::BadSerialization, format!("Object of type {kind} is not JSON serializable"))),
            };
            let brackets = if value.kind() == ValueKind::Map { ['{', '}'] } else { ['[', ']'] };
            self.container(depth, brackets, &items)
        }

        /// A list (keys `None`) or an object, one item per line when indenting.
        fn container(&mut self, depth: usize, [open, close]: [char; 2], items: &[(Option<Value>, Value)]) -> Result<(), Error> {
            self.out.push(open);
            for (i, (key, item)) in items.iter().enumerate() {
                if i > 0 {
                    self.out.push_str(&self.item_sep);
                }
                self.newline(depth + 1);
                if let Some(key) = key {
                    self.key(key)?;
                    self.out.push_str(&self.key_sep);
                }
                self.value(item, depth + 1)?;
            }
            if !items.is_empty() {
                self.newline(depth);
            }
            self.out.push(close);
            Ok(())
        }

        fn newline(&mut self, depth: usize) {
            if let Some(indent) = &self.opts.indent {
                self.out.push('\n');
                self.out.push_str(&indent.repeat(depth));
            }
        }

        /// Keys must be strings, numbers, booleans or None, as in Python, and are written as strings.
        fn key(&mut self, key: &Value) -> Result<(), Error> {
            match (key.as_str(), scalar(key)) {
                (Some(s), _) => self.string(s),
                (None, Some(text)) => self.string(&text),
                _ => {
                    return Err(Error::new(
                        ErrorKind::BadSerialization,
                        format!("keys must be str, int, float, bool or None, not {}", key.kind()),
                    ));
                }
            }
            Ok(())
        }

        fn string(&mut self, s: &str) {
            self.out.push('"');
            for c in s.chars() {
                match c {
                    '"' => self.out.push_str("\\\""),
                    '\\' => self.out.push_str("\\\\"),
                    '\n' => self.out.push_str("\\n"),
                    '\r' => self.out.push_str("\\r"),
                    '\t' => self.out.push_str("\\t"),
                    '\u{8}' => self.out.push_str("\\b"),
                    '\u{c}' => self.out.push_str("\\f"),
                    c if (c as u32) < 0x20 || (self.opts.ensure_ascii && !(' '..='~').contains(&c)) => {
                        let mut units = [0u16; 2];
                        for unit in c.encode_utf16(&mut units) {
                            self.out.push_str(&format!("\\u{unit:04x}"));
                        }
                    }
                    c => self.out.push(c),
                }
            }
            self.out.push('"');
        }
    }

    /// The JSON text of `None`, a boolean or a number; `None` for anything else.
    fn scalar(value: &Value) -> Option<String> {
        Some(match value.kind() {
            ValueKind::None => "null".into(),
            ValueKind::Bool => if value.is_true() { "true" } else { "false" }.into(),
            ValueKind::Number if value.is_integer() => value.to_string(),
            ValueKind::Number => match f64::try_from(value.clone()) {
                Ok(v) if v.is_nan() => "NaN".into(),
                Ok(v) if v.is_infinite() => if v < 0.0 { "-Infinity" } else { "Infinity" }.into(),
                Ok(v) => float_repr(v),
                Err(_) => value.to_string(),
            },
            _ => return None,
        })
    }

    /// `datetime.now().strftime(fmt)` for the common directives, in UTC (the server clock; Python would use the
    /// local zone, which is UTC in a container). Unknown directives are kept literally.
    pub fn strftime(fmt: &str, now: std::time::SystemTime) -> String {
        const MONTHS: [&str; 12] =
            ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October", "November", "December"];
        const DAYS: [&str; 7] = ["Sunday", "Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday"];
        let secs = now.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs()) as i64;
        let (days, tod) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
        let (year, month, day) = civil_from_days(days);
        let (hour, minute, second) = (tod / 3600, tod / 60 % 60, tod % 60);
        let weekday = (days + 4).rem_euclid(7) as usize;
        let yday = days - days_from_civil(year, 1, 1) + 1;
        let mut out = String::new();
        let mut chars = fmt.chars();
        while let Some(c) = chars.next() {
            if c != '%' {
                out.push(c);
                continue;
            }
            let mut spec = chars.next();
            let pad = spec != Some('-');
            if !pad {
                spec = chars.next();
            }
            let num = |n: i64, width: usize| if pad { format!("{n:0width$}") } else { n.to_string() };
            let text = match spec {
                Some('Y') => year.to_string(),
                Some('y') => num(year.rem_euclid(100), 2),
                Some('m') => num(month, 2),
                Some('d') => num(day, 2),
                Some('e') => format!("{day:2}"),
                Some('H') => num(hour, 2),
                Some('I') => num((hour + 11) % 12 + 1, 2),
                Some('M') => num(minute, 2),
                Some('S') => num(second, 2),
                Some('j') => num(yday, 3),
                Some('p') => if hour < 12 { "AM" } else { "PM" }.into(),
                Some('B') => MONTHS[month as usize - 1].into(),
                Some('b') | Some('h') => MONTHS[month as usize - 1][..3].into(),
                Some('A') => DAYS[weekday].into(),
                Some('a') => DAYS[weekday][..3].into(),
                Some('%') => "%".into(),
                Some(other) => format!("%{}{other}", if pad { "" } else { "-" }),
                None => "%".into(),
            };
            out.push_str(&text);
        }
        out
    }

    /// Howard Hinnant's `civil_from_days`: days since 1970-01-01 to (year, month, day).
    fn civil_from_days(days: i64) -> (i64, i64, i64) {
        let z = days + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z - era * 146_097;
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = doy - (153 * mp + 2) / 5 + 1;
        let month = if mp < 10 { mp + 3 } else { mp - 9 };
        (yoe + era * 400 + i64::from(month <= 2), month, day)
    }

    fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
        let y = if month <= 2 { year - 1 } else { year };
        let era = y.div_euclid(400);
        let yoe = y - era * 400;
        let mp = (month + 9) % 12;
        let doy = (153 * mp + 2) / 5 + day - 1;
        era * 146_097 + yoe * 365 + yoe / 4 - yoe / 100 + doy - 719_468
    }
}

#[cfg(test)]
mod tests {
    use super::py;
    use std::time::{Duration, UNIX_EPOCH};

    #[test]
    fn floats_print_like_python_repr() {
        let cases = [(1.5, "1.5"), (100.0, "100.0"), (1e-7, "1e-07"), (1e-4, "0.0001"), (1e16, "1e+16"), (-0.0, "-0.0"), (1e300, "1e+300")];
        for (v, want) in cases {
            assert_eq!(py::float_repr(v), want, "{v:e}");
        }
    }

    #[test]
    fn strftime_formats_utc() {
        // 2024-02-29T13:05:09Z, a Thursday, day 60 of a leap year.
        let t = UNIX_EPOCH + Duration::from_secs(1_709_211_909);
        assert_eq!(
            py::strftime("%Y-%m-%d %H:%M:%S %j %a %A %b %B %I%p %y %-d %e %% %Q", t),
            "2024-02-29 13:05:09 060 Thu Thursday Feb February 01PM 24 29 29 % %Q"
        );
        assert_eq!(py::strftime("%d %b %Y", UNIX_EPOCH), "01 Jan 1970");
    }
}
