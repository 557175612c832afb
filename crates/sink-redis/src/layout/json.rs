//! `layout: json`: one Redis string per row (`<base><key>`) holding the row as a JSON
//! object with sorted keys; and the JSON handling it shares with `layout: table`. An
//! update reads the stored JSON first and merges in Rust, every value kept as raw text
//! (never through Lua's cjson, which would round numbers).

use std::collections::BTreeMap;

use redis::Cmd;
use serde_json::value::RawValue;
use shapesync_core::{Operation, Row, SinkError, Space};

use super::{RowLayout, StoredJson, StoredRows, own_keys_space};
use crate::template::KeyTemplate;
use crate::unit::{Unit, command};

/// Rows as JSON strings of their own, keyed `<base><key>`.
pub(crate) struct JsonRows {
    base: String,
}

impl JsonRows {
    pub(crate) fn new(base: &str) -> Self {
        JsonRows { base: base.to_owned() }
    }

    fn key(&self, id: &str) -> String {
        format!("{}{id}", self.base)
    }
}

impl StoredJson for JsonRows {
    fn read(&self, ids: &[String]) -> Cmd {
        let mut cmd = redis::cmd("MGET");
        for id in ids {
            cmd.arg(self.key(id));
        }
        cmd
    }

    fn store(&self, unit: &mut Unit, id: &str, json: &str) {
        unit.push(command(["SET", &self.key(id), json]));
    }
}

impl RowLayout for JsonRows {
    fn default_template(&self, table: &str, primary_key: &[&str]) -> KeyTemplate {
        KeyTemplate::joined(&format!("{table}:"), primary_key)
    }

    fn key_space(&self, template: Option<&KeyTemplate>, table: &str) -> Space {
        own_keys_space(&self.base, template, table)
    }

    fn notice(&self, op: Operation, id: &str) -> serde_json::Value {
        serde_json::json!({ "op": op.as_str(), "key": self.key(id) })
    }

    fn put(&self, unit: &mut Unit, id: &str, row: &Row, _replace: bool, rows: &mut StoredRows) {
        put(self, unit, id, row, rows);
    }

    fn merge(
        &self,
        unit: &mut Unit,
        id: &str,
        columns: &Row,
        rows: &mut StoredRows,
    ) -> Result<(), SinkError> {
        merge(self, unit, id, columns, rows)
    }

    fn delete(&self, unit: &mut Unit, id: &str, rows: &mut StoredRows) {
        unit.push(command(["UNLINK", &self.key(id)]));
        rows.insert(id.to_owned(), None);
    }

    fn stored_json(&self) -> Option<&dyn StoredJson> {
        Some(self)
    }
}

/// Stores `row` as the whole of row `id` in `place` (a `SET` or `HSET` replaces what
/// was there, so nothing is deleted first).
pub(super) fn put(place: &dyn StoredJson, unit: &mut Unit, id: &str, row: &Row, rows: &mut StoredRows) {
    store(place, unit, id, row_json(row), rows);
}

/// Merges `columns` into the stored JSON of row `id` in `place`.
pub(super) fn merge(
    place: &dyn StoredJson,
    unit: &mut Unit,
    id: &str,
    columns: &Row,
    rows: &mut StoredRows,
) -> Result<(), SinkError> {
    let stored = rows.get(id).cloned().flatten();
    let merged = merge_json(stored.as_deref(), columns).map_err(|m| {
        SinkError::rejected(format!(
            "cannot merge an update into row key `{id}`: {m}; another writer uses this key, give the sink its own `prefix`"
        ))
    })?;
    store(place, unit, id, merged, rows);
    Ok(())
}

fn store(place: &dyn StoredJson, unit: &mut Unit, id: &str, json: String, rows: &mut StoredRows) {
    place.store(unit, id, &json);
    rows.insert(id.to_owned(), Some(json));
}

fn row_json(row: &Row) -> String {
    serde_json::to_string(row).expect("rows always serialize")
}

/// Merges `columns` into a stored JSON row without re-parsing any value, so numbers
/// keep every digit; keys stay sorted, so the output is byte-stable.
pub(crate) fn merge_json(stored: Option<&str>, columns: &Row) -> Result<String, String> {
    let mut row: BTreeMap<String, Box<RawValue>> = match stored {
        Some(text) => {
            serde_json::from_str(text).map_err(|e| format!("stored row is not a JSON object: {e}"))?
        }
        None => BTreeMap::new(),
    };
    for (column, value) in columns {
        row.insert(column.to_owned(), serde_json::value::to_raw_value(value).map_err(|e| e.to_string())?);
    }
    serde_json::to_string(&row).map_err(|e| e.to_string())
}
