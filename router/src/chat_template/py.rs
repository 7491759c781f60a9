//! Python semantics the template engine needs: `str()`, `repr()`, `str.strip`, `json.dumps`, `strftime`.

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
