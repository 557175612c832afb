//! Property tests of the parsers that read what a server or a user sends: offsets,
//! Postgres array literals, `${VAR}` interpolation and pipeline files. Whatever the input,
//! they answer (a value or an error) and never panic; what they print they read back.
//! A fixed budget of cases per property keeps CI's time bounded; proptest keeps any
//! failing case in `proptest-regressions/` (committed), replayed first on every run.

use proptest::prelude::*;
use shapesync_core::{ColumnType, Config, Offset, Value, parse_value};

fn budget() -> ProptestConfig {
    ProptestConfig { cases: 512, ..ProptestConfig::default() }
}

/// A text array element: anything, including the characters the literal escapes.
fn element() -> impl Strategy<Value = Option<String>> {
    prop_oneof![1 => Just(None), 6 => "[a-z{},\"\\\\ NUL]{0,8}".prop_map(Some)]
}

/// A nested array of up to Postgres' 6 dimensions.
fn array() -> impl Strategy<Value = Value> {
    let leaf = proptest::collection::vec(element(), 0..4).prop_map(|items| {
        Value::Array(items.into_iter().map(|e| e.map_or(Value::Null, Value::Text)).collect())
    });
    leaf.prop_recursive(5, 64, 3, |inner| proptest::collection::vec(inner, 1..3).prop_map(Value::Array))
}

/// Postgres' text output of an array of text (every element quoted; NULL unquoted).
fn literal(value: &Value) -> String {
    match value {
        Value::Null => "NULL".into(),
        Value::Text(t) => format!("\"{}\"", t.replace('\\', "\\\\").replace('"', "\\\"")),
        Value::Array(items) => format!("{{{}}}", items.iter().map(literal).collect::<Vec<_>>().join(",")),
        other => panic!("not generated: {other:?}"),
    }
}

fn dims(value: &Value) -> u32 {
    match value {
        Value::Array(items) => 1 + items.first().map_or(0, dims),
        _ => 0,
    }
}

proptest! {
    #![proptest_config(budget())]

    #[test]
    fn any_text_is_an_offset_or_an_error(text in "\\PC{0,40}") {
        let _ = text.parse::<Offset>();
    }

    #[test]
    fn offsets_print_and_read_back_in_order(a in (0u64..u64::MAX, 0u64..u64::MAX), b in (0u64..u64::MAX, 0u64..u64::MAX)) {
        let (x, y) = (Offset::new(a.0, a.1), Offset::new(b.0, b.1));
        prop_assert_eq!(x.to_string().parse::<Offset>().unwrap(), x);
        prop_assert_eq!(x.cmp(&y), a.cmp(&b));
    }

    #[test]
    fn any_text_in_an_array_column_is_a_value_or_an_error(text in "[{}\",\\\\ aNUL\\[\\]:=0-9]{0,64}") {
        let column = ColumnType { dims: 1, ..ColumnType::scalar("text") };
        let _ = parse_value("c", &column, Some(&text));
        let column = ColumnType { dims: 2, ..ColumnType::scalar("int4") };
        let _ = parse_value("c", &column, Some(&text));
    }

    #[test]
    fn array_literals_read_back_exactly(value in array()) {
        let column = ColumnType { dims: dims(&value).max(1), ..ColumnType::scalar("text") };
        prop_assert_eq!(parse_value("c", &column, Some(&literal(&value))).unwrap(), value);
    }

    #[test]
    fn any_text_interpolates_or_says_why(text in "\\PC{0,40}") {
        let _ = shapesync_core::config::interpolate(&text, &|name| (name == "SET").then(|| "v".to_owned()));
    }

    #[test]
    fn any_pipeline_file_loads_or_names_a_problem_without_echoing_values(
        key in "[a-z_]{1,12}",
        value in "[ -~]{0,24}",
    ) {
        let secret = "s3cr3t-value";
        let text = format!(
            "pipelines:\n  p:\n    source: {{type: electric, url: 'http://h/v1/shape?secret={secret}', table: t, {key}: '{value}'}}\n    sink: {{type: memory}}\n"
        );
        let mut config = Config::default();
        if let Err(e) = config.merge(std::path::Path::new("f.yaml"), &text, &|_| None) {
            prop_assert!(!e.to_string().contains(secret), "{}", e);
        }
    }
}
