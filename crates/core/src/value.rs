//! Typed column values, parsed from Postgres text output as described by `electric-schema`.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;

use serde::ser::{SerializeSeq, Serializer};
use serde::{Deserialize, Serialize};

/// One column value.
///
/// Integers keep full 64-bit precision, `numeric` stays exact text, and JSON keeps
/// its original text so no number inside it is ever rounded. Types without a
/// dedicated variant (uuid, timestamps, bytea, …) keep Postgres' text form.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    /// SQL NULL.
    Null,
    /// `bool`.
    Bool(bool),
    /// `int2`, `int4`, `int8`, `oid`.
    Int(i64),
    /// `float4`, `float8` (including NaN and ±Infinity).
    Float(f64),
    /// `numeric`, kept as its exact decimal text.
    Numeric(String),
    /// `json` / `jsonb`, kept as validated JSON text.
    Json(String),
    /// Text and every type without a variant of its own.
    Text(String),
    /// An array of any dimension; nested arrays are `Array`s of `Array`s.
    Array(Vec<Value>),
}

impl Value {
    /// The value as one string, or `None` for NULL; the rule sinks use when a store
    /// holds strings (Redis hash fields, key templates):
    /// booleans are `true`/`false`, numbers their shortest exact decimal form,
    /// numeric, text and JSON their own text, arrays a JSON array.
    pub fn render(&self) -> Option<Cow<'_, str>> {
        Some(match self {
            Value::Null => return None,
            Value::Bool(b) => Cow::Borrowed(if *b { "true" } else { "false" }),
            Value::Int(i) => Cow::Owned(i.to_string()),
            Value::Float(f) => Cow::Owned(render_float(*f)),
            Value::Numeric(s) | Value::Json(s) | Value::Text(s) => Cow::Borrowed(s.as_str()),
            Value::Array(_) => Cow::Owned(serde_json::to_string(self).expect("values always serialize")),
        })
    }

    /// True for SQL NULL.
    pub fn is_null(&self) -> bool {
        matches!(self, Value::Null)
    }
}

fn render_float(f: f64) -> String {
    if f.is_nan() {
        "NaN".into()
    } else if f.is_infinite() {
        if f > 0.0 { "Infinity".into() } else { "-Infinity".into() }
    } else {
        f.to_string()
    }
}

/// Serializes as JSON without losing anything: int8 as an exact JSON number,
/// numeric as a string (as Electric's own client does), JSON inline, non-finite
/// floats as the strings `NaN`, `Infinity`, `-Infinity`.
impl Serialize for Value {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Value::Null => s.serialize_unit(),
            Value::Bool(b) => s.serialize_bool(*b),
            Value::Int(i) => s.serialize_i64(*i),
            Value::Float(f) if f.is_finite() => s.serialize_f64(*f),
            Value::Float(f) => s.serialize_str(&render_float(*f)),
            Value::Numeric(t) | Value::Text(t) => s.serialize_str(t),
            Value::Json(t) => match serde_json::value::RawValue::from_string(t.clone()) {
                Ok(raw) => raw.serialize(s),
                Err(_) => s.serialize_str(t),
            },
            Value::Array(items) => {
                let mut seq = s.serialize_seq(Some(items.len()))?;
                for item in items {
                    seq.serialize_element(item)?;
                }
                seq.end()
            }
        }
    }
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.render().as_deref().unwrap_or("NULL"))
    }
}

/// One column's description from `electric-schema`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ColumnType {
    /// Postgres type name; for arrays, the element type.
    #[serde(rename = "type")]
    pub type_name: String,
    /// Array dimensions; 0 for scalars.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub dims: u32,
    /// Position in the primary key, when the column is part of it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pk_index: Option<u32>,
    /// The column is `NOT NULL`: a null value is a protocol error.
    #[serde(default, skip_serializing_if = "is_false")]
    pub not_null: bool,
    /// Other fields (`max_length`, `precision`, `scale`, …), kept as received.
    #[serde(flatten)]
    pub extra: BTreeMap<String, serde_json::Value>,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}
fn is_false(b: &bool) -> bool {
    !*b
}

impl ColumnType {
    /// A scalar column of `type_name`.
    pub fn scalar(type_name: &str) -> Self {
        ColumnType {
            type_name: type_name.into(),
            dims: 0,
            pk_index: None,
            not_null: false,
            extra: BTreeMap::new(),
        }
    }
}

/// Column name → type, as sent in `electric-schema` for the selected columns.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Schema(pub BTreeMap<crate::ColumnName, ColumnType>);

impl Schema {
    /// The shared name of a column: the schema's own copy when it lists the column,
    /// so rows parsed against it allocate no names.
    pub fn intern(&self, column: &str) -> crate::ColumnName {
        match self.0.get_key_value(column) {
            Some((name, _)) => name.clone(),
            None => column.into(),
        }
    }

    /// Primary-key column names in key order.
    pub fn primary_key(&self) -> Vec<&str> {
        let mut pk: Vec<(u32, &str)> =
            self.0.iter().filter_map(|(name, c)| c.pk_index.map(|i| (i, &**name))).collect();
        pk.sort();
        pk.into_iter().map(|(_, n)| n).collect()
    }

    /// Types one column value from its Postgres text form.
    ///
    /// Columns missing from the schema pass through as text, as the official client does.
    pub fn parse(&self, column: &str, text: Option<&str>) -> Result<Value, TypeError> {
        match self.0.get(column) {
            Some(ty) => parse_value(column, ty, text),
            None => Ok(text.map_or(Value::Null, |t| Value::Text(t.to_owned()))),
        }
    }
}

/// A value that does not match its column type.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TypeError {
    /// NULL arrived for a `NOT NULL` column.
    #[error("column {column:?} is NOT NULL but the server sent null; the shape's schema and data disagree")]
    NullInNotNull {
        /// The column.
        column: String,
    },
    /// The text is not a valid value of the column type.
    #[error("column {column:?} of type {type_name} cannot hold {found:?}: {reason}")]
    Invalid {
        /// The column.
        column: String,
        /// The declared type.
        type_name: String,
        /// The start of the offending text.
        found: String,
        /// Why it was rejected.
        reason: &'static str,
    },
}

/// Types a Postgres text value according to its column type.
pub fn parse_value(column: &str, ty: &ColumnType, text: Option<&str>) -> Result<Value, TypeError> {
    let Some(text) = text else {
        return if ty.not_null {
            Err(TypeError::NullInNotNull { column: column.into() })
        } else {
            Ok(Value::Null)
        };
    };
    let invalid = |reason| TypeError::Invalid {
        column: column.into(),
        type_name: ty.type_name.clone(),
        found: text.chars().take(40).collect(),
        reason,
    };
    if ty.dims > 0 {
        let mut parser =
            ArrayParser { input: text.as_bytes(), pos: 0, delim: array_delimiter(&ty.type_name) };
        let parsed = parser.parse_top().map_err(invalid)?;
        return convert_array(parsed, &|elem| parse_scalar(&ty.type_name, elem)).map_err(invalid);
    }
    parse_scalar(&ty.type_name, text).map_err(invalid)
}

fn parse_scalar(type_name: &str, text: &str) -> Result<Value, &'static str> {
    Ok(match type_name {
        "bool" => match text {
            "t" | "true" => Value::Bool(true),
            "f" | "false" => Value::Bool(false),
            _ => return Err("expected t or f"),
        },
        "int2" | "int4" | "int8" | "oid" => Value::Int(text.parse().map_err(|_| "expected an integer")?),
        "float4" | "float8" => Value::Float(match text {
            "NaN" => f64::NAN,
            "Infinity" => f64::INFINITY,
            "-Infinity" => f64::NEG_INFINITY,
            _ => text.parse().map_err(|_| "expected a floating-point number")?,
        }),
        "numeric" => Value::Numeric(text.to_owned()),
        "json" | "jsonb" => {
            serde_json::from_str::<serde::de::IgnoredAny>(text).map_err(|_| "expected JSON text")?;
            Value::Json(text.to_owned())
        }
        _ => Value::Text(text.to_owned()),
    })
}

/// An array element before typing: NULL, a string, or a nested array.
enum RawElem {
    Null,
    Str(String),
    Nested(Vec<RawElem>),
}

/// Types a parsed array literal; recursive, but [`ArrayParser`] never nests deeper
/// than [`MAX_ARRAY_DIMS`].
fn convert_array(
    elem: RawElem,
    scalar: &dyn Fn(&str) -> Result<Value, &'static str>,
) -> Result<Value, &'static str> {
    Ok(match elem {
        RawElem::Null => Value::Null,
        RawElem::Str(s) => scalar(&s)?,
        RawElem::Nested(items) => {
            Value::Array(items.into_iter().map(|e| convert_array(e, scalar)).collect::<Result<_, _>>()?)
        }
    })
}

/// The element delimiter of arrays of `type_name`: `;` for `box` (whose values contain
/// commas: `(1,1),(0,0)`), `,` for every other built-in type (Postgres' `pg_type.typdelim`).
/// Parsing reads arrays with it, and a sink writing Postgres array literals must too.
pub fn array_delimiter(type_name: &str) -> u8 {
    if type_name == "box" { b';' } else { b',' }
}

/// Postgres' `MAXDIM`: no array value has more dimensions. The parser refuses deeper
/// nesting, so server-sent text can never drive its recursion (or `convert_array`'s)
/// deep enough to overflow the stack.
const MAX_ARRAY_DIMS: usize = 6;

/// Parser for Postgres array literals: `{1,NULL}`, `{{1,2},{3,4}}`, `{"a,b","q\"x"}`,
/// and `{(1,1),(0,0);(2,2),(1,1)}` for `box[]`, whose delimiter is `;`.
struct ArrayParser<'a> {
    input: &'a [u8],
    pos: usize,
    /// The element delimiter ([`array_delimiter`]).
    delim: u8,
}

impl ArrayParser<'_> {
    fn parse_top(&mut self) -> Result<RawElem, &'static str> {
        // Optional dimension decoration: `[1:2]={...}`.
        if self.input.first() == Some(&b'[') {
            let eq = self.input.iter().position(|&b| b == b'=').ok_or("malformed array dimensions")?;
            self.pos = eq + 1;
        }
        self.skip_ws();
        let value = self.parse_array(1)?;
        self.skip_ws();
        if self.pos != self.input.len() {
            return Err("trailing characters after array literal");
        }
        Ok(value)
    }

    fn skip_ws(&mut self) {
        while self.pos < self.input.len() && self.input[self.pos].is_ascii_whitespace() {
            self.pos += 1;
        }
    }

    /// Parses the array opening at `pos`, which is nested `depth` levels deep (1 = the
    /// outermost).
    fn parse_array(&mut self, depth: usize) -> Result<RawElem, &'static str> {
        if self.input.get(self.pos) != Some(&b'{') {
            return Err("expected '{' to open an array literal");
        }
        if depth > MAX_ARRAY_DIMS {
            return Err("array nested deeper than Postgres' 6 dimensions");
        }
        self.pos += 1;
        let mut items = Vec::new();
        self.skip_ws();
        if self.input.get(self.pos) == Some(&b'}') {
            self.pos += 1;
            return Ok(RawElem::Nested(items));
        }
        loop {
            self.skip_ws();
            items.push(match self.input.get(self.pos) {
                Some(b'{') => self.parse_array(depth + 1)?,
                Some(b'"') => RawElem::Str(self.parse_quoted()?),
                Some(_) => self.parse_unquoted()?,
                None => return Err("unterminated array literal"),
            });
            self.skip_ws();
            match self.input.get(self.pos) {
                Some(&b) if b == self.delim => self.pos += 1,
                Some(b'}') => {
                    self.pos += 1;
                    return Ok(RawElem::Nested(items));
                }
                _ if self.delim == b';' => return Err("expected ';' or '}' in box array literal"),
                _ => return Err("expected ',' or '}' in array literal"),
            }
        }
    }

    fn parse_quoted(&mut self) -> Result<String, &'static str> {
        self.pos += 1; // opening quote
        let mut out = Vec::new();
        loop {
            match self.input.get(self.pos) {
                None => return Err("unterminated quoted array element"),
                Some(b'"') => {
                    self.pos += 1;
                    return String::from_utf8(out).map_err(|_| "array element is not UTF-8");
                }
                Some(b'\\') => {
                    let escaped = *self.input.get(self.pos + 1).ok_or("dangling escape in array element")?;
                    out.push(escaped);
                    self.pos += 2;
                }
                Some(&b) => {
                    out.push(b);
                    self.pos += 1;
                }
            }
        }
    }

    fn parse_unquoted(&mut self) -> Result<RawElem, &'static str> {
        let start = self.pos;
        let mut out = Vec::new();
        while let Some(&b) = self.input.get(self.pos) {
            match b {
                b'}' => break,
                _ if b == self.delim => break,
                b'{' | b'"' => return Err("unexpected character in unquoted array element"),
                b'\\' => {
                    out.push(*self.input.get(self.pos + 1).ok_or("dangling escape in array element")?);
                    self.pos += 2;
                    continue;
                }
                _ => out.push(b),
            }
            self.pos += 1;
        }
        let had_escape = self.input[start..self.pos].contains(&b'\\');
        while out.last().is_some_and(|b| b.is_ascii_whitespace()) {
            out.pop();
        }
        if out.is_empty() {
            return Err("empty unquoted array element");
        }
        if !had_escape && out.eq_ignore_ascii_case(b"NULL") {
            return Ok(RawElem::Null);
        }
        String::from_utf8(out).map(RawElem::Str).map_err(|_| "array element is not UTF-8")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn col(ty: &str, dims: u32, not_null: bool) -> ColumnType {
        ColumnType { dims, not_null, ..ColumnType::scalar(ty) }
    }

    fn parse(ty: &str, dims: u32, text: &str) -> Value {
        parse_value("c", &col(ty, dims, false), Some(text)).unwrap()
    }

    #[test]
    fn int8_keeps_full_precision() {
        assert_eq!(parse("int8", 0, "9007199254740993"), Value::Int(9_007_199_254_740_993));
        assert_eq!(parse("int8", 0, "-9223372036854775808"), Value::Int(i64::MIN));
        let json = serde_json::to_string(&Value::Int(9_007_199_254_740_993)).unwrap();
        assert_eq!(json, "9007199254740993");
    }

    #[test]
    fn bools_from_t_and_f() {
        assert_eq!(parse("bool", 0, "t"), Value::Bool(true));
        assert_eq!(parse("bool", 0, "f"), Value::Bool(false));
        assert!(parse_value("c", &col("bool", 0, false), Some("yes")).is_err());
    }

    #[test]
    fn text_arrays_with_quotes_and_nulls() {
        assert_eq!(
            parse("text", 1, r#"{"a,b",NULL}"#),
            Value::Array(vec![Value::Text("a,b".into()), Value::Null])
        );
        assert_eq!(
            parse("text", 1, r#"{"q\"x","back\\slash","NULL",plain , {}"#.replace(" , {}", "}").as_str()),
            Value::Array(vec![
                Value::Text("q\"x".into()),
                Value::Text("back\\slash".into()),
                Value::Text("NULL".into()),
                Value::Text("plain".into())
            ])
        );
        assert_eq!(parse("text", 1, "{}"), Value::Array(vec![]));
    }

    #[test]
    fn nested_int_arrays_are_typed() {
        assert_eq!(
            parse("int4", 2, "{{1,2},{3,NULL}}"),
            Value::Array(vec![
                Value::Array(vec![Value::Int(1), Value::Int(2)]),
                Value::Array(vec![Value::Int(3), Value::Null]),
            ])
        );
        assert_eq!(parse("int4", 1, "[0:1]={7,8}"), Value::Array(vec![Value::Int(7), Value::Int(8)]));
    }

    #[test]
    fn box_arrays_use_semicolons_between_elements() {
        // `select array['((1,1),(0,0))'::box, '((3,3),(2,2))', null]::text` in Postgres.
        assert_eq!(
            parse("box", 1, "{(1,1),(0,0);(3,3),(2,2);NULL}"),
            Value::Array(vec![
                Value::Text("(1,1),(0,0)".into()),
                Value::Text("(3,3),(2,2)".into()),
                Value::Null
            ])
        );
        assert_eq!(
            parse("box", 2, "{{(1,1),(0,0)};{(2,2),(1,1)}}"),
            Value::Array(vec![
                Value::Array(vec![Value::Text("(1,1),(0,0)".into())]),
                Value::Array(vec![Value::Text("(2,2),(1,1)".into())]),
            ])
        );
        assert_eq!(
            parse("box", 1, "{\"(1,1),(0,0)\"}"),
            Value::Array(vec![Value::Text("(1,1),(0,0)".into())])
        );
        // Other geometric types keep `,`: `point[]` elements are quoted by Postgres.
        assert_eq!(
            parse("point", 1, r#"{"(1,2)","(3,4)"}"#),
            Value::Array(vec![Value::Text("(1,2)".into()), Value::Text("(3,4)".into())])
        );
        let e = parse_value("c", &col("box", 1, false), Some("{(1,1),(0,0),(3,3),(2,2)}"));
        assert!(e.is_ok(), "one element: a box array cannot be split on commas");
        assert!(parse_value("c", &col("box", 1, false), Some("{(1,1),(0,0);}")).is_err());
    }

    #[test]
    fn malformed_arrays_are_errors() {
        for bad in ["{1,2", "1,2}", "{1,,2}", "{\"a}", "{1}x", "{a\"b}"] {
            assert!(parse_value("c", &col("text", 1, false), Some(bad)).is_err(), "{bad}");
        }
    }

    #[test]
    fn arrays_nested_beyond_postgres_limit_are_errors_not_crashes() {
        // Before the depth bound these overflowed the stack and aborted the process.
        for depth in [4_000, 100_000, 7] {
            let text = format!("{}{}", "{".repeat(depth), "}".repeat(depth));
            match parse_value("c", &col("text", 1, false), Some(&text)) {
                Err(TypeError::Invalid { reason, .. }) => {
                    assert_eq!(reason, "array nested deeper than Postgres' 6 dimensions", "depth {depth}")
                }
                other => panic!("depth {depth}: {other:?}"),
            }
            let unclosed = "{".repeat(depth);
            assert!(parse_value("c", &col("text", 1, false), Some(&unclosed)).is_err(), "depth {depth}");
        }
        let six = format!("{}1{}", "{".repeat(6), "}".repeat(6));
        let mut value = parse("int4", 6, &six);
        for _ in 0..6 {
            let Value::Array(mut items) = value else { panic!("expected an array: {value:?}") };
            assert_eq!(items.len(), 1);
            value = items.pop().unwrap();
        }
        assert_eq!(value, Value::Int(1), "six dimensions are Postgres' limit and are accepted");
    }

    #[test]
    fn json_is_parsed_and_kept_exact() {
        let v = parse("jsonb", 0, r#"{"big": 123456789012345678901234567890, "a": [1]}"#);
        assert_eq!(
            serde_json::to_string(&v).unwrap(),
            r#"{"big": 123456789012345678901234567890, "a": [1]}"#
        );
        assert!(parse_value("c", &col("json", 0, false), Some("{nope")).is_err());
    }

    #[test]
    fn numeric_stays_exact_text() {
        assert_eq!(parse("numeric", 0, "12.30"), Value::Numeric("12.30".into()));
        assert_eq!(serde_json::to_string(&parse("numeric", 0, "12.30")).unwrap(), "\"12.30\"");
    }

    #[test]
    fn floats_including_special_values() {
        assert_eq!(parse("float8", 0, "1.5"), Value::Float(1.5));
        assert!(matches!(parse("float8", 0, "NaN"), Value::Float(f) if f.is_nan()));
        assert_eq!(parse("float4", 0, "-Infinity").render().unwrap(), "-Infinity");
    }

    #[test]
    fn other_types_stay_text_and_null_is_checked() {
        assert_eq!(parse("uuid", 0, "a0ee"), Value::Text("a0ee".into()));
        assert_eq!(parse("bpchar", 0, "ab  "), Value::Text("ab  ".into()));
        assert_eq!(parse_value("c", &col("text", 0, false), None).unwrap(), Value::Null);
        assert_eq!(
            parse_value("c", &col("text", 0, true), None),
            Err(TypeError::NullInNotNull { column: "c".into() })
        );
    }

    #[test]
    fn schema_gives_pk_in_order_and_passes_unknown_columns() {
        let schema: Schema = serde_json::from_str(
            r#"{"b":{"type":"int4","pk_index":1},"a":{"type":"text","pk_index":0,"not_null":true},"n":{"type":"numeric","precision":10,"scale":2}}"#,
        )
        .unwrap();
        assert_eq!(schema.primary_key(), vec!["a", "b"]);
        assert_eq!(schema.parse("zzz", Some("x")).unwrap(), Value::Text("x".into()));
        assert_eq!(schema.0["n"].extra["precision"], 10);
        let round: Schema = serde_json::from_str(&serde_json::to_string(&schema).unwrap()).unwrap();
        assert_eq!(round, schema);
    }

    #[test]
    fn render_rules() {
        assert_eq!(Value::Bool(true).render().unwrap(), "true");
        assert_eq!(Value::Int(-3).render().unwrap(), "-3");
        assert_eq!(Value::Array(vec![Value::Int(1), Value::Null]).render().unwrap(), "[1,null]");
        assert!(Value::Null.render().is_none());
    }
}
