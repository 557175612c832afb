//! SQLite's spelling of the SQL-table statements.

use shapesync_core::ColumnType;
use shapesync_sql_table::Dialect;

/// SQLite: `?N` parameters, one row per upsert, `max`, and declared types chosen so that
/// SQLite keeps every value exactly.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SqliteDialect;

impl Dialect for SqliteDialect {
    fn placeholder(&self, n: usize) -> String {
        format!("?{n}")
    }

    /// Integers (and booleans, as 0/1) `INTEGER`, floats `REAL`, everything else `TEXT`
    /// — `numeric` included, since SQLite's `NUMERIC` would round it to a double.
    fn column_type(&self, column: &ColumnType) -> String {
        if column.dims > 0 {
            return "TEXT".into();
        }
        match column.type_name.as_str() {
            "int2" | "int4" | "int8" | "oid" | "bool" => "INTEGER",
            "float4" | "float8" => "REAL",
            _ => "TEXT",
        }
        .into()
    }

    fn text_type(&self) -> &'static str {
        "TEXT"
    }

    fn integer_type(&self) -> &'static str {
        "INTEGER"
    }

    fn greatest(&self) -> &'static str {
        "max"
    }
}
