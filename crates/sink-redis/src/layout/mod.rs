//! The three row layouts (`layout:`), one [`RowLayout`] strategy each: how a row is
//! keyed (its default key template and the key space it claims), written and deleted
//! inside a unit's script, read back before an update is merged, and named in `notify`
//! messages. The sink, the unit builder and the config's key claims only call the
//! strategy; [`for_layout`] is the one place that looks at [`Layout`].
//!
//! A trait rather than an enum with a method per concern: each layout's whole behaviour
//! reads in one file, with no `match` to keep in step across methods, and the one
//! layout-specific state (its key base, or the shape's hash) lives in its own struct.
//! `json` and `table` differ only in where the JSON text lives ([`StoredJson`]), so
//! they share their put and merge code.
//!
//! - [`hash::HashRows`]: one hash per row, one field per non-NULL column.
//! - [`json::JsonRows`]: one string per row holding its JSON.
//! - [`table::TableRows`]: one hash per shape, one field per row holding its JSON.

mod hash;
mod json;
mod table;

use std::collections::HashMap;

use redis::Cmd;
use shapesync_core::{Operation, Row, SinkError, Space};

use crate::config::Layout;
use crate::sink::KeyNames;
use crate::template::KeyTemplate;
use crate::unit::Unit;

pub(crate) use hash::merge_commands;
#[cfg(test)]
pub(crate) use json::merge_json;

/// The stored JSON of rows a batch touches, by row key (`None`: absent or deleted), so
/// that an update merges into what the batch's earlier changes left. Only layouts that
/// keep rows as JSON fill it ([`RowLayout::stored_json`]).
pub(crate) type StoredRows = HashMap<String, Option<String>>;

/// How one layout stores rows. Every method that writes adds commands to a [`Unit`],
/// which runs them inside one fenced script; membership and notifications are the unit
/// builder's, so a layout only says what happens to the row itself.
pub(crate) trait RowLayout: Send + Sync {
    /// The key template when `key:` is not set, over the table's primary-key columns.
    fn default_template(&self, table: &str, primary_key: &[&str]) -> KeyTemplate;

    /// The keys this layout's rows occupy (for [`shapesync_core::SinkConfig::claims`]),
    /// keyed by `template` (the configured key template; `None`: the default).
    fn key_space(&self, template: Option<&KeyTemplate>, table: &str) -> Space;

    /// The `notify` message announcing `op` on row `id` (the crate docs, "Notifications").
    fn notice(&self, op: Operation, id: &str) -> serde_json::Value;

    /// Writes `row` as the whole of row `id`; `replace` removes what was stored first
    /// (only a row known not to exist may skip it).
    fn put(&self, unit: &mut Unit, id: &str, row: &Row, replace: bool, rows: &mut StoredRows);

    /// Merges the given columns (an update under `replica: default`) into row `id`.
    fn merge(&self, unit: &mut Unit, id: &str, columns: &Row, rows: &mut StoredRows)
    -> Result<(), SinkError>;

    /// Removes row `id`.
    fn delete(&self, unit: &mut Unit, id: &str, rows: &mut StoredRows);

    /// For a layout that merges updates into stored JSON in Rust: where that JSON
    /// lives, so the sink reads it before building a batch's units. `None` (the
    /// default): updates merge inside Redis and nothing is read.
    fn stored_json(&self) -> Option<&dyn StoredJson> {
        None
    }
}

/// Where a JSON layout keeps each row's JSON text.
pub(crate) trait StoredJson: Send + Sync {
    /// The command reading the stored JSON of rows `ids`: one value (or nil) per id,
    /// in order.
    fn read(&self, ids: &[String]) -> Cmd;

    /// Stores `json` as row `id`.
    fn store(&self, unit: &mut Unit, id: &str, json: &str);
}

/// The keys of rows stored under keys of their own, `<base><key>`: those starting with
/// the template's fixed start, or `<table>:` for the default key.
fn own_keys_space(base: &str, template: Option<&KeyTemplate>, table: &str) -> Space {
    match template {
        Some(template) => Space::Prefix(format!("{base}{}", template.literal_prefix())),
        None => Space::Prefix(format!("{base}{table}:")),
    }
}

/// The strategy for `layout`, writing under the pipeline's `keys`.
pub(crate) fn for_layout(layout: Layout, keys: &KeyNames) -> Box<dyn RowLayout> {
    match layout {
        Layout::Hash => Box::new(hash::HashRows::new(&keys.base)),
        Layout::Json => Box::new(json::JsonRows::new(&keys.base)),
        Layout::Table => Box::new(table::TableRows::new(&keys.table)),
    }
}
