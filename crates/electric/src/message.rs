//! Parsing a response body (a JSON array of messages) straight into typed changes.
//!
//! This is the hot path. Messages deserialize into borrowed strings (no
//! `serde_json::Value` trees); each value is typed once, through the schema, into
//! the core [`Row`].

use std::borrow::Cow;
use std::fmt;

use serde::Deserialize;
use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::error::Category;
use shapesync_core::{Change, LogPosition, Operation, Row, Schema, Value};

use crate::tags::{Mark, MoveEvent, MovePattern, TagHeaders};

/// What one body held.
#[derive(Debug, Default)]
pub(crate) struct ParsedBody {
    /// Changes in log order.
    pub changes: Vec<Change>,
    /// The body ended with an `up-to-date` control message.
    pub up_to_date: bool,
    /// The body held a `must-refetch` control message.
    pub must_refetch: bool,
    /// Tag headers and move events (subquery shapes only), each at the index of the
    /// change it belongs to or comes before, in order.
    pub marks: Vec<(usize, Mark)>,
}

/// Why a body could not be used.
#[derive(Debug, PartialEq)]
pub(crate) enum BodyError {
    /// Not JSON at all, or cut short: may be a transient fault (a proxy page, a drop).
    Malformed(String),
    /// Well-formed JSON that breaks the protocol or the schema: retrying cannot help.
    Invalid(String),
}

/// A string borrowed from the body when it has no escapes.
struct Str<'a>(Cow<'a, str>);

impl<'de: 'a, 'a> Deserialize<'de> for Str<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Cow<'de, str>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Cow::Borrowed(v))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Cow::Owned(v.to_owned()))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
                Ok(Cow::Owned(v))
            }
        }
        d.deserialize_str(V).map(Str)
    }
}

/// Deserializes a `value` / `old_value` object straight into a typed [`Row`].
struct RowSeed<'s>(&'s Schema);

impl<'de> DeserializeSeed<'de> for RowSeed<'_> {
    type Value = Row;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Row, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for RowSeed<'_> {
    type Value = Row;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an object of column values (strings or null)")
    }
    fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<Row, M::Error> {
        let mut row = Row::with_capacity(self.0.0.len());
        while let Some(column) = map.next_key::<Str<'de>>()? {
            let value = map.next_value_seed(ValueSeed { schema: self.0, column: &column.0 })?;
            row.insert(self.0.intern(&column.0), value);
        }
        Ok(row)
    }
}

/// Types one column value straight from the JSON string (or null), so even an
/// escaped string is only copied once.
struct ValueSeed<'s> {
    schema: &'s Schema,
    column: &'s str,
}

impl<'de> DeserializeSeed<'de> for ValueSeed<'_> {
    type Value = Value;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_option(self)
    }
}

impl<'de> Visitor<'de> for ValueSeed<'_> {
    type Value = Value;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a column value (a string or null)")
    }
    fn visit_none<E: de::Error>(self) -> Result<Value, E> {
        self.schema.parse(self.column, None).map_err(E::custom)
    }
    fn visit_unit<E: de::Error>(self) -> Result<Value, E> {
        self.visit_none()
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_str(self)
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Value, E> {
        self.schema.parse(self.column, Some(v)).map_err(E::custom)
    }
}

/// `lsn` / `op_position`: the server sends a decimal string or a number.
struct Num(u64);

impl<'de> Deserialize<'de> for Num {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = u64;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a non-negative integer or a decimal string")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<u64, E> {
                Ok(v)
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<u64, E> {
                v.parse().map_err(|_| E::custom("expected a decimal integer string"))
            }
        }
        d.deserialize_any(V).map(Num)
    }
}

#[derive(Deserialize, Default)]
struct Headers<'a> {
    #[serde(borrow)]
    operation: Option<Str<'a>>,
    #[serde(borrow)]
    control: Option<Str<'a>>,
    #[serde(borrow)]
    event: Option<Str<'a>>,
    patterns: Option<Vec<Pattern>>,
    tags: Option<Vec<String>>,
    removed_tags: Option<Vec<String>>,
    active_conditions: Option<Vec<bool>>,
    lsn: Option<Num>,
    op_position: Option<Num>,
    last: Option<bool>,
    global_last_seen_lsn: Option<Num>,
}

/// One `{pos, value}` of a move event (TypeScript client `types.ts`: `MovePattern`).
#[derive(Deserialize)]
struct Pattern {
    pos: u16,
    value: String,
}

/// One message, as far as the stream cares.
#[derive(Debug)]
pub(crate) enum Message {
    /// A row change, with its tag headers when the shape has subqueries.
    Change(Change, Option<TagHeaders>),
    /// A `move-in` or `move-out` event.
    Move(MoveEvent),
    /// `up-to-date`, with its `global_last_seen_lsn` when present.
    UpToDate(Option<u64>),
    /// `must-refetch`.
    MustRefetch,
    /// Any other control or event message.
    Ignored,
}

/// Deserializes one message, typing its rows on the way (fields may come in any order).
struct MessageSeed<'s>(&'s Schema);

impl<'de> DeserializeSeed<'de> for MessageSeed<'_> {
    type Value = Message;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Message, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for MessageSeed<'_> {
    type Value = Message;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a shape message object")
    }
    fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<Message, M::Error> {
        let (mut key, mut value, mut old_value, mut headers) = (None, None, None, None);
        while let Some(field) = map.next_key::<Str<'de>>()? {
            match field.0.as_ref() {
                "key" => key = Some(map.next_value::<Str<'de>>()?.0.into_owned()),
                "value" => value = map.next_value_seed(OptionalRow(self.0))?,
                "old_value" => old_value = map.next_value_seed(OptionalRow(self.0))?,
                "headers" => headers = Some(map.next_value::<Headers<'de>>()?),
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        let h = headers.unwrap_or_default();
        if let Some(control) = &h.control {
            return Ok(match control.0.as_ref() {
                "up-to-date" => Message::UpToDate(h.global_last_seen_lsn.as_ref().map(|n| n.0)),
                "must-refetch" => Message::MustRefetch,
                other => {
                    tracing::trace!(control = other, "ignoring control message");
                    Message::Ignored
                }
            });
        }
        if let Some(event) = &h.event {
            let out = match event.0.as_ref() {
                "move-out" => true,
                "move-in" => false,
                other => {
                    tracing::debug!(event = other, "ignoring an unknown event message");
                    return Ok(Message::Ignored);
                }
            };
            let patterns = h.patterns.ok_or_else(|| de::Error::custom("a move event has no patterns"))?;
            let patterns = patterns.into_iter().map(|p| MovePattern { pos: p.pos, value: p.value }).collect();
            return Ok(Message::Move(MoveEvent { out, patterns }));
        }
        let Some(operation) = &h.operation else {
            tracing::debug!("ignoring a message with neither operation nor control");
            return Ok(Message::Ignored);
        };
        let op = match operation.0.as_ref() {
            "insert" => Operation::Insert,
            "update" => Operation::Update,
            "delete" => Operation::Delete,
            other => {
                return Err(de::Error::custom(format_args!(
                    "unknown operation {:?}; upgrade shapesync-electric",
                    other.chars().take(32).collect::<String>()
                )));
            }
        };
        let key = key.ok_or_else(|| de::Error::custom("a change message has no key"))?;
        let position =
            h.lsn.map(|lsn| LogPosition { lsn: lsn.0, op_position: h.op_position.map_or(0, |o| o.0) });
        let tags =
            (h.tags.is_some() || h.removed_tags.is_some() || h.active_conditions.is_some()).then(|| {
                TagHeaders {
                    tags: h.tags.unwrap_or_default(),
                    removed_tags: h.removed_tags.unwrap_or_default(),
                    active_conditions: h.active_conditions,
                }
            });
        let change = Change {
            op,
            key,
            value: value.unwrap_or_default(),
            old_value,
            position,
            last_in_tx: h.last == Some(true),
        };
        Ok(Message::Change(change, tags))
    }
}

/// `value` / `old_value`, which may be `null`.
struct OptionalRow<'s>(&'s Schema);

impl<'de> DeserializeSeed<'de> for OptionalRow<'_> {
    type Value = Option<Row>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Option<Row>, D::Error> {
        d.deserialize_option(self)
    }
}

impl<'de> Visitor<'de> for OptionalRow<'_> {
    type Value = Option<Row>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an object of column values, or null")
    }
    fn visit_none<E: de::Error>(self) -> Result<Option<Row>, E> {
        Ok(None)
    }
    fn visit_unit<E: de::Error>(self) -> Result<Option<Row>, E> {
        Ok(None)
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Option<Row>, D::Error> {
        RowSeed(self.0).deserialize(d).map(Some)
    }
}

/// Deserializes the whole body (an array of messages) into a [`ParsedBody`].
struct BodySeed<'s>(&'s Schema);

impl<'de> DeserializeSeed<'de> for BodySeed<'_> {
    type Value = ParsedBody;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<ParsedBody, D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for BodySeed<'_> {
    type Value = ParsedBody;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an array of shape messages")
    }
    fn visit_seq<S: SeqAccess<'de>>(self, mut seq: S) -> Result<ParsedBody, S::Error> {
        let mut parsed =
            ParsedBody { changes: Vec::with_capacity(seq.size_hint().unwrap_or(0)), ..Default::default() };
        while let Some(message) = seq.next_element_seed(MessageSeed(self.0))? {
            match message {
                Message::Change(change, tags) => {
                    // A change after up-to-date would be odd; it simply reopens the batch.
                    parsed.up_to_date = false;
                    if let Some(tags) = tags {
                        parsed.marks.push((parsed.changes.len(), Mark::Tags(tags)));
                    }
                    parsed.changes.push(change);
                }
                Message::Move(event) => {
                    parsed.up_to_date = false;
                    parsed.marks.push((parsed.changes.len(), Mark::Move(event)));
                }
                Message::UpToDate(_) => parsed.up_to_date = true,
                Message::MustRefetch => parsed.must_refetch = true,
                Message::Ignored => {}
            }
        }
        Ok(parsed)
    }
}

/// Parses one message (an SSE `data:` payload).
pub(crate) fn parse_message(data: &[u8], schema: &Schema) -> Result<Message, BodyError> {
    let mut de = serde_json::Deserializer::from_slice(data);
    let parsed = MessageSeed(schema).deserialize(&mut de).and_then(|m| de.end().map(|()| m));
    parsed.map_err(classify)
}

fn classify(e: serde_json::Error) -> BodyError {
    match e.classify() {
        Category::Syntax | Category::Eof | Category::Io => {
            BodyError::Malformed(format!("the body is not valid JSON ({e})"))
        }
        Category::Data => BodyError::Invalid(format!("the body breaks the shape protocol: {e}")),
    }
}

/// Parses a body. An empty body is `[]`.
pub(crate) fn parse_body(body: &[u8], schema: &Schema) -> Result<ParsedBody, BodyError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(ParsedBody::default());
    }
    let mut de = serde_json::Deserializer::from_slice(body);
    let parsed = BodySeed(schema).deserialize(&mut de).and_then(|p| de.end().map(|()| p));
    parsed.map_err(classify)
}

#[cfg(test)]
mod tests {
    use shapesync_core::Value;

    use super::*;

    fn schema() -> Schema {
        serde_json::from_str(
            r#"{"id":{"type":"int8","pk_index":0,"not_null":true},
                "ok":{"type":"bool"},"tags":{"type":"text","dims":1},
                "doc":{"type":"jsonb"},"amt":{"type":"numeric","precision":10,"scale":2},
                "title":{"type":"text"}}"#,
        )
        .unwrap()
    }

    fn parse(body: &str) -> Result<ParsedBody, BodyError> {
        parse_body(body.as_bytes(), &schema())
    }

    #[test]
    fn types_values_through_the_schema() {
        let body = r#"[{"key":"\"public\".\"t\"/\"9007199254740993\"",
            "value":{"id":"9007199254740993","ok":"t","tags":"{\"a,b\",NULL}","doc":"{\"n\":1.50}",
                     "amt":"12.30","title":"say \"hi\"","extra":"kept"},
            "headers":{"operation":"insert","relation":["public","t"]}}]"#;
        let p = parse(body).unwrap();
        let c = &p.changes[0];
        assert_eq!(c.op, Operation::Insert);
        assert_eq!(c.key, "\"public\".\"t\"/\"9007199254740993\"");
        assert_eq!(c.value["id"], Value::Int(9_007_199_254_740_993));
        assert_eq!(c.value["ok"], Value::Bool(true));
        assert_eq!(c.value["tags"], Value::Array(vec![Value::Text("a,b".into()), Value::Null]));
        assert_eq!(c.value["doc"], Value::Json("{\"n\":1.50}".into()));
        assert_eq!(c.value["amt"], Value::Numeric("12.30".into()));
        assert_eq!(c.value["title"], Value::Text("say \"hi\"".into()));
        assert_eq!(c.value["extra"], Value::Text("kept".into()));
        assert_eq!(c.position, None);
        assert!(!c.last_in_tx);
        assert!(!p.up_to_date);
    }

    #[test]
    fn positions_last_flags_and_old_values() {
        let body = r#"[
          {"key":"k1","value":{"id":"1","title":"b"},"old_value":{"title":"a"},
           "headers":{"operation":"update","txids":[7],"lsn":"24008184","op_position":0}},
          {"key":"k2","value":{"id":"2"},"headers":{"operation":"delete","lsn":24008184,"op_position":2,"last":true}},
          {"headers":{"control":"up-to-date","global_last_seen_lsn":"24008184"}}]"#;
        let p = parse(body).unwrap();
        assert!(p.up_to_date);
        let [a, b] = &p.changes[..] else { panic!() };
        assert_eq!(a.position, Some(LogPosition { lsn: 24_008_184, op_position: 0 }));
        assert_eq!(a.old_value.as_ref().unwrap()["title"], Value::Text("a".into()));
        assert!(!a.last_in_tx);
        assert_eq!(b.op, Operation::Delete);
        assert_eq!(b.position, Some(LogPosition { lsn: 24_008_184, op_position: 2 }));
        assert!(b.last_in_tx);
    }

    #[test]
    fn empty_bodies_and_unknown_messages_are_harmless() {
        assert!(parse("").unwrap().changes.is_empty());
        assert!(parse(" \n").unwrap().changes.is_empty());
        assert!(parse("[]").unwrap().changes.is_empty());
        let p = parse(
            r#"[{"headers":{"control":"snapshot-end","xmin":"1","xmax":"2","xip_list":[]}},
                {"headers":{"event":"move-in","patterns":[{"pos":0,"value":"h"}]}},
                {"headers":{"control":"brand-new-thing"}},
                {"headers":{"control":"up-to-date"}}]"#,
        )
        .unwrap();
        assert!(p.changes.is_empty());
        assert!(p.up_to_date);
    }

    #[test]
    fn single_messages_parse_for_sse() {
        let m =
            parse_message(br#"{"headers":{"control":"up-to-date","global_last_seen_lsn":"77"}}"#, &schema());
        assert!(matches!(m, Ok(Message::UpToDate(Some(77)))), "{m:?}");
        let m = parse_message(
            br#"{"key":"k","value":{"id":"1"},"headers":{"operation":"insert","lsn":"5","op_position":2}}"#,
            &schema(),
        );
        let Ok(Message::Change(c, None)) = m else { panic!("{m:?}") };
        assert_eq!(c.position, Some(LogPosition { lsn: 5, op_position: 2 }));
        assert!(matches!(parse_message(b"{\"key\"", &schema()), Err(BodyError::Malformed(_))));
    }

    #[test]
    fn tags_and_move_events_are_marked_where_they_sit() {
        // Wire form: log_items.ex `from_change` (tags, removed_tags, active_conditions)
        // and move_broadcast.ex `make` (event, patterns, txids).
        let p = parse(
            r#"[{"key":"k1","value":{"id":"1"},"headers":{"operation":"insert","tags":["ha/","/hb"],"active_conditions":[true,false]}},
                {"headers":{"event":"move-out","patterns":[{"pos":0,"value":"ha"}],"txids":[9]}},
                {"key":"k1","value":{"id":"1"},"headers":{"operation":"update","tags":["hc"],"removed_tags":["ha/"]}},
                {"key":"k2","value":{"id":"2"},"headers":{"operation":"insert"}},
                {"headers":{"event":"move-in","patterns":[{"pos":1,"value":"hb"}]}},
                {"headers":{"event":"something-new"}}]"#,
        )
        .unwrap();
        assert_eq!(p.changes.len(), 3);
        let marks: Vec<String> = p
            .marks
            .iter()
            .map(|(at, m)| match m {
                Mark::Tags(t) => {
                    format!("{at}:tags{:?}{:?}{:?}", t.tags, t.removed_tags, t.active_conditions)
                }
                Mark::Move(e) => format!("{at}:{}{}", if e.out { "out" } else { "in" }, e.patterns.len()),
            })
            .collect();
        assert_eq!(
            marks,
            [r#"0:tags["ha/", "/hb"][]Some([true, false])"#, "1:out1", r#"1:tags["hc"]["ha/"]None"#, "3:in1"]
        );
        assert!(matches!(parse(r#"[{"headers":{"event":"move-out"}}]"#), Err(BodyError::Invalid(_))));
        assert!(matches!(
            parse(r#"[{"headers":{"event":"move-out","patterns":[{"pos":-1,"value":"h"}]}}]"#),
            Err(BodyError::Invalid(_))
        ));
    }

    #[test]
    fn must_refetch_in_a_body_is_reported() {
        assert!(parse(r#"[{"headers":{"control":"must-refetch"}}]"#).unwrap().must_refetch);
    }

    #[test]
    fn broken_json_is_malformed_but_wrong_shapes_are_invalid() {
        assert!(matches!(parse("[{\"key\":"), Err(BodyError::Malformed(_))));
        assert!(matches!(parse("<html>502</html>"), Err(BodyError::Malformed(_))));
        assert!(matches!(parse("{\"metadata\":{}}"), Err(BodyError::Invalid(_))));
        assert!(matches!(
            parse(r#"[{"key":"k","value":{"id":1},"headers":{"operation":"insert"}}]"#),
            Err(BodyError::Invalid(_))
        ));
        assert!(matches!(
            parse(r#"[{"key":"k","value":{"id":"1"},"headers":{"operation":"upsert"}}]"#),
            Err(BodyError::Invalid(_))
        ));
    }

    #[test]
    fn deeply_nested_json_anywhere_is_an_answer_not_a_stack_overflow() {
        // serde_json's default recursion limit (128) is never disabled in this crate,
        // and ignored values are skipped without recursion.
        let deep = |n: usize| format!("{}{}", "[".repeat(n), "]".repeat(n));
        let nested = deep(100_000);
        let ignored = format!(r#"[{{"headers":{{"control":"up-to-date"}},"extra":{nested}}}]"#);
        assert!(parse(&ignored).is_ok_and(|p| p.up_to_date));
        let in_headers = format!(r#"[{{"headers":{{"operation":{nested}}}}}]"#);
        assert!(parse(&in_headers).is_err());
        let in_value = format!(r#"[{{"key":"k","value":{nested},"headers":{{"operation":"insert"}}}}]"#);
        assert!(parse(&in_value).is_err());
        let jsonb = serde_json::to_string(&nested).unwrap();
        let in_jsonb = format!(
            r#"[{{"key":"k","value":{{"id":"1","doc":{jsonb}}},"headers":{{"operation":"insert"}}}}]"#
        );
        let p = parse(&in_jsonb).unwrap();
        let doc = &p.changes[0].value["doc"];
        assert_eq!(serde_json::to_string(doc).unwrap(), nested, "JSON values are kept as raw text");
        let tags = format!(
            r#"[{{"key":"k","value":{{"id":"1","tags":"{}"}},"headers":{{"operation":"insert"}}}}]"#,
            "{".repeat(100_000)
        );
        assert!(matches!(parse(&tags), Err(BodyError::Invalid(_))));
        let schema_header = format!(r#"{{"id":{{"type":"int8","extra":{nested}}}}}"#);
        assert!(serde_json::from_str::<Schema>(&schema_header).is_err(), "the schema header is bounded too");
    }

    #[test]
    fn null_in_a_not_null_column_is_invalid() {
        let e = parse(r#"[{"key":"k","value":{"id":null},"headers":{"operation":"insert"}}]"#).unwrap_err();
        let BodyError::Invalid(msg) = e else { panic!("{e:?}") };
        assert!(msg.contains("NOT NULL"), "{msg}");
    }
}

/// Property tests: whatever a server sends as a body or an SSE event, the parser answers
/// (messages or an error) and never panics. A fixed budget keeps CI's time bounded;
/// proptest keeps failing cases in `proptest-regressions/` (committed).
#[cfg(test)]
mod properties {
    use proptest::prelude::*;
    use shapesync_core::Schema;

    use super::*;

    fn schema() -> Schema {
        serde_json::from_str(
            r#"{"id":{"type":"int8","pk_index":0,"not_null":true},"tags":{"type":"text","dims":1},
                "doc":{"type":"jsonb"},"n":{"type":"numeric"},"f":{"type":"float8"},"b":{"type":"bool"}}"#,
        )
        .unwrap()
    }

    /// A value in a message: well-formed for its column, or not.
    fn value() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("null".to_owned()),
            "-?[0-9]{1,20}".prop_map(|n| format!("\"{n}\"")),
            "[{}\",\\\\a-z0-9 ]{0,16}".prop_map(|t| serde_json::to_string(&t).unwrap()),
            "[-0-9.eE]{0,8}",
            Just("true".to_owned()),
            Just("[]".to_owned()),
        ]
    }

    /// A message of Electric's shape with arbitrary parts, or a control message.
    fn message() -> impl Strategy<Value = String> {
        let op = prop_oneof![Just("insert"), Just("update"), Just("delete"), Just("nope")];
        let change = (op, value(), value(), value(), value(), any::<bool>(), 0u64..u64::MAX).prop_map(
            |(op, id, tags, doc, n, last, lsn)| {
                format!(
                    r#"{{"key":"k","value":{{"id":{id},"tags":{tags},"doc":{doc},"n":{n}}},"headers":{{"operation":"{op}","lsn":"{lsn}","op_position":0,"last":{last}}}}}"#
                )
            },
        );
        let control = prop_oneof![
            Just(r#"{"headers":{"control":"up-to-date"}}"#.to_owned()),
            Just(r#"{"headers":{"control":"must-refetch"}}"#.to_owned()),
            "[a-z-]{0,12}".prop_map(|c| format!(r#"{{"headers":{{"control":"{c}"}}}}"#)),
        ];
        prop_oneof![4 => change, 1 => control]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

        #[test]
        fn any_bytes_are_a_body_or_an_error(body in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = parse_body(&body, &schema());
            let _ = parse_message(&body, &schema());
        }

        #[test]
        fn any_list_of_messages_is_a_body_or_an_error(messages in proptest::collection::vec(message(), 0..8)) {
            let body = format!("[{}]", messages.join(","));
            let _ = parse_body(body.as_bytes(), &schema());
            for m in &messages {
                let _ = parse_message(m.as_bytes(), &schema());
            }
        }
    }
}
