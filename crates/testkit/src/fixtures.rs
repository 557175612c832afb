//! Builders for hand-made batches in sink tests: a shape `items` (`id int8` primary key,
//! `name text`, `note text`), checkpoints, snapshot and live changes.

use shapesync_core::{Batch, Change, Checkpoint, LogPosition, Row, Schema, Value};

/// A schema from Electric's `electric-schema` JSON.
pub fn schema(json: &str) -> Schema {
    serde_json::from_str(json).expect("valid schema JSON")
}

/// The `items` shape's schema.
pub fn items_schema() -> Schema {
    schema(
        r#"{"id":{"type":"int8","pk_index":0,"not_null":true},"name":{"type":"text"},"note":{"type":"text"}}"#,
    )
}

/// A row of `items` with no note.
pub fn item(id: i64, name: &str) -> Row {
    row(&[("id", Value::Int(id)), ("name", Value::Text(name.into())), ("note", Value::Null)])
}

/// A row from column–value pairs.
pub fn row(pairs: &[(&str, Value)]) -> Row {
    pairs.iter().map(|(k, v)| ((*k).to_owned(), v.clone())).collect()
}

/// A settled checkpoint (not resyncing) of handle `h-1` at `offset`.
pub fn checkpoint(schema: Schema, offset: &str, generation: u64) -> Checkpoint {
    Checkpoint {
        shape_hash: "shape".into(),
        handle: "h-1".into(),
        offset: offset.parse().expect("valid offset"),
        schema,
        generation,
        resyncing: false,
    }
}

/// A batch that ends up to date, without a sweep.
pub fn batch(changes: Vec<Change>, checkpoint: Checkpoint) -> Batch {
    Batch::new(changes, checkpoint, false, true)
}

/// `change` as a replicated change at log position `lsn`/`op`.
pub fn live(mut change: Change, lsn: u64, op: u64) -> Change {
    change.position = Some(LogPosition { lsn, op_position: op });
    change
}
