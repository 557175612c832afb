//! `layout: table`: one Redis hash per shape (`<base><table>`), one field per row key
//! holding the row's JSON as in `layout: json` (Electric's own Redis example).

use redis::Cmd;
use shapesync_core::{Operation, Row, SinkError, Space};

use super::{RowLayout, StoredJson, StoredRows, json};
use crate::template::KeyTemplate;
use crate::unit::{Unit, command};

/// Rows as fields of the shape's hash.
pub(crate) struct TableRows {
    /// The shape's hash.
    table_key: String,
}

impl TableRows {
    pub(crate) fn new(table_key: &str) -> Self {
        TableRows { table_key: table_key.to_owned() }
    }
}

impl StoredJson for TableRows {
    fn read(&self, ids: &[String]) -> Cmd {
        let mut cmd = redis::cmd("HMGET");
        cmd.arg(&self.table_key);
        for id in ids {
            cmd.arg(id);
        }
        cmd
    }

    fn store(&self, unit: &mut Unit, id: &str, json: &str) {
        unit.push(command(["HSET", &self.table_key, id, json]));
    }
}

impl RowLayout for TableRows {
    /// Just the primary-key values: the field names the shape's hash.
    fn default_template(&self, _table: &str, primary_key: &[&str]) -> KeyTemplate {
        KeyTemplate::joined("", primary_key)
    }

    /// Exactly the shape's hash, whatever the template.
    fn key_space(&self, _template: Option<&KeyTemplate>, _table: &str) -> Space {
        Space::Exact(self.table_key.clone())
    }

    fn notice(&self, op: Operation, id: &str) -> serde_json::Value {
        serde_json::json!({ "op": op.as_str(), "key": self.table_key, "field": id })
    }

    fn put(&self, unit: &mut Unit, id: &str, row: &Row, _replace: bool, rows: &mut StoredRows) {
        json::put(self, unit, id, row, rows);
    }

    fn merge(
        &self,
        unit: &mut Unit,
        id: &str,
        columns: &Row,
        rows: &mut StoredRows,
    ) -> Result<(), SinkError> {
        json::merge(self, unit, id, columns, rows)
    }

    fn delete(&self, unit: &mut Unit, id: &str, rows: &mut StoredRows) {
        unit.push(command(["HDEL", &self.table_key, id]));
        rows.insert(id.to_owned(), None);
    }

    fn stored_json(&self) -> Option<&dyn StoredJson> {
        Some(self)
    }
}
