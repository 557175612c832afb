//! Synthetic tables for benchmarks: row `i` is computed from `i`, so a snapshot of a
//! million rows is generated chunk by chunk and never stored.

use crate::store::Row;
use crate::table::{Column, TableDef};

/// The definition of a synthetic table named `name`:
/// `id int8 PK, title text, amount numeric, flag bool, tags text[], data jsonb`.
pub fn synthetic_table_def(name: &str) -> TableDef {
    TableDef::new(name)
        .column(Column::new("id", "int8").primary_key())
        .column(Column::new("title", "text").not_null())
        .column(Column::new("amount", "numeric").schema_field("precision", 12).schema_field("scale", 2))
        .column(Column::new("flag", "bool"))
        .column(Column::new("tags", "text").dims(1))
        .column(Column::new("data", "jsonb"))
}

/// Column names of a synthetic table, in the order of [`synthetic_row`]'s values.
pub const SYNTHETIC_COLUMNS: [&str; 6] = ["id", "title", "amount", "flag", "tags", "data"];

/// Row `id` (1-based) of a synthetic table as Postgres text values (`None` = NULL),
/// in [`SYNTHETIC_COLUMNS`] order: benchmarks use it to write the same rows directly.
pub fn synthetic_row(id: u64) -> Vec<Option<String>> {
    row(id)
}

/// Row `id` (1-based) of a synthetic table, in Postgres text format.
pub(crate) fn row(id: u64) -> Row {
    vec![
        Some(id.to_string()),
        Some(format!("item number {id}")),
        Some(format!("{}.{:02}", id % 100_000, id % 100)),
        if id.is_multiple_of(7) {
            None
        } else {
            Some(if id.is_multiple_of(2) { "t" } else { "f" }.to_string())
        },
        Some(format!("{{alpha,\"b {}\",NULL}}", id % 10)),
        Some(format!("{{\"n\": {id}, \"even\": {}, \"label\": \"row {id}\"}}", id.is_multiple_of(2))),
    ]
}
