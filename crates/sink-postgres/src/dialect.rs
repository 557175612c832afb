//! Postgres' spelling of the SQL-table statements.

use shapesync_core::ColumnType;
use shapesync_sql_table::Dialect;

/// Built-in types a column keeps in the target table; any other type (an enum, a
/// domain, an extension's type, which the target database may not have) becomes `text`.
const KEPT_TYPES: &[&str] = &[
    "bool",
    "int2",
    "int4",
    "int8",
    "oid",
    "float4",
    "float8",
    "numeric",
    "money",
    "text",
    "varchar",
    "bpchar",
    "name",
    "char",
    "uuid",
    "json",
    "jsonb",
    "xml",
    "date",
    "time",
    "timetz",
    "timestamp",
    "timestamptz",
    "interval",
    "bytea",
    "inet",
    "cidr",
    "macaddr",
    "macaddr8",
    "bit",
    "varbit",
    "tsvector",
    "point",
    "line",
    "lseg",
    "box",
    "path",
    "polygon",
    "circle",
    "int4range",
    "int8range",
    "numrange",
    "tsrange",
    "tstzrange",
    "daterange",
];

/// Postgres: `$N` parameters bound as text and cast to the column's type, the source's
/// built-in types kept (see [`KEPT_TYPES`]), and snapshot upserts of many rows through
/// `unnest` of one `text[]` per column.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PostgresDialect;

impl Dialect for PostgresDialect {
    fn placeholder(&self, n: usize) -> String {
        format!("${n}")
    }

    fn typed_placeholder(&self, n: usize, sql_type: &str) -> String {
        format!("${n}::{sql_type}")
    }

    fn column_type(&self, column: &ColumnType) -> String {
        let name = column.type_name.as_str();
        let base = if KEPT_TYPES.contains(&name) { name } else { "text" };
        if column.dims > 0 { format!("{base}[]") } else { base.to_owned() }
    }

    fn text_type(&self) -> &'static str {
        "text"
    }

    fn integer_type(&self) -> &'static str {
        "int8"
    }

    /// `SELECT u.c0::type, …, generation FROM unnest($1::text[], …) AS u(c0, …)`: one
    /// `text[]` parameter per column holds that column's values for every row. The
    /// statement's text depends only on the columns and the generation, so Postgres
    /// plans it once per connection and resync.
    fn upsert_rows(&self, types: &[String], generation: i64) -> String {
        let selected: Vec<String> = types.iter().enumerate().map(|(i, ty)| format!("u.c{i}::{ty}")).collect();
        let arrays: Vec<String> = (1..=types.len()).map(|n| format!("${n}::text[]")).collect();
        let aliases: Vec<String> = (0..types.len()).map(|i| format!("c{i}")).collect();
        format!(
            "SELECT {}, {generation} FROM unnest({}) AS u({})",
            selected.join(", "),
            arrays.join(", "),
            aliases.join(", ")
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_types_become_text_and_arrays_keep_their_brackets() {
        let ty = |name: &str, dims: u32| ColumnType {
            type_name: name.into(),
            dims,
            pk_index: None,
            not_null: false,
            extra: Default::default(),
        };
        assert_eq!(PostgresDialect.column_type(&ty("int8", 0)), "int8");
        assert_eq!(PostgresDialect.column_type(&ty("mood", 0)), "text");
        assert_eq!(PostgresDialect.column_type(&ty("uuid", 1)), "uuid[]");
    }
}
