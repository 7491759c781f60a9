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

mod py;

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
