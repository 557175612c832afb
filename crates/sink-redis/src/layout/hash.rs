//! `layout: hash`: one Redis hash per row (`<base><key>`), one field per non-NULL
//! column, rendered by `Value::render`. Updates merge inside Redis (`HSET` of the given
//! columns, `HDEL` of the ones set to NULL), so nothing is read first.

use redis::Cmd;
use shapesync_core::{Operation, Row, SinkError, Space};

use super::{RowLayout, StoredRows, own_keys_space};
use crate::template::KeyTemplate;
use crate::unit::{Unit, command};

/// Rows as hashes of their own, keyed `<base><key>`.
pub(crate) struct HashRows {
    base: String,
}

impl HashRows {
    pub(crate) fn new(base: &str) -> Self {
        HashRows { base: base.to_owned() }
    }

    fn key(&self, id: &str) -> String {
        format!("{}{id}", self.base)
    }
}

impl RowLayout for HashRows {
    fn default_template(&self, table: &str, primary_key: &[&str]) -> KeyTemplate {
        KeyTemplate::joined(&format!("{table}:"), primary_key)
    }

    fn key_space(&self, template: Option<&KeyTemplate>, table: &str) -> Space {
        own_keys_space(&self.base, template, table)
    }

    fn notice(&self, op: Operation, id: &str) -> serde_json::Value {
        serde_json::json!({ "op": op.as_str(), "key": self.key(id) })
    }

    fn put(&self, unit: &mut Unit, id: &str, row: &Row, replace: bool, _: &mut StoredRows) {
        let key = self.key(id);
        let mut fields = Vec::new();
        for (column, value) in row {
            if let Some(text) = value.render() {
                fields.push((column, text));
            }
        }
        if replace {
            // Inside the unit's script: no reader sees the row missing in between.
            unit.push(command(["DEL", &key]));
        }
        if !fields.is_empty() {
            // (A row of NULLs is an empty hash, which Redis does not keep.)
            let mut hset = command(["HSET", &key]);
            for (column, text) in &fields {
                hset.arg(*column).arg(&**text);
            }
            unit.push(hset);
        }
    }

    fn merge(&self, unit: &mut Unit, id: &str, columns: &Row, _: &mut StoredRows) -> Result<(), SinkError> {
        for cmd in merge_commands(&self.key(id), columns) {
            unit.push(cmd);
        }
        Ok(())
    }

    fn delete(&self, unit: &mut Unit, id: &str, _: &mut StoredRows) {
        unit.push(command(["UNLINK", &self.key(id)]));
    }
}

/// The commands that merge `columns` into the hash at `key`: an `HSET` of the non-NULL
/// ones (rendered by `Value::render`) and an `HDEL` of the NULL ones (either left out
/// when empty). With every column of a row, the hash becomes that row.
pub(crate) fn merge_commands(key: &str, columns: &Row) -> Vec<Cmd> {
    let mut commands = Vec::new();
    let (nulls, set): (Vec<_>, Vec<_>) = columns.iter().partition(|(_, v)| v.is_null());
    if !set.is_empty() {
        let mut hset = command(["HSET", key]);
        for (column, value) in set {
            if let Some(text) = value.render() {
                hset.arg(column).arg(&*text);
            }
        }
        commands.push(hset);
    }
    if !nulls.is_empty() {
        let mut hdel = command(["HDEL", key]);
        for (column, _) in nulls {
            hdel.arg(column);
        }
        commands.push(hdel);
    }
    commands
}
