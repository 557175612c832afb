//! The rules every SQL-table sink follows, whatever its database: the names it keeps for
//! itself, which table a shape goes to, whether an existing table can hold the shape's
//! rows, and which key a change addresses. Errors are messages for
//! `SinkError::rejected`.

use shapesync_core::relation::parse_relation;
use shapesync_core::{Change, ColumnType, ConfigError, Row, Schema, ShapeInfo, Value};

/// The column recording which generation last wrote a row, for mark-and-sweep.
pub const GENERATION_COLUMN: &str = "_shapesync_generation";

/// The table holding each pipeline's checkpoint beside its rows.
pub const CHECKPOINT_TABLE: &str = "_shapesync_checkpoints";

/// The table holding each pipeline's lease (see [`shapesync_core::lease`]): `pipeline`, `owner`,
/// `epoch`, `seq`, `expires_at_ms`.
pub const LEASE_TABLE: &str = "_shapesync_leases";

/// The table recording which instances stand by for each pipeline: `pipeline`,
/// `instance`, `expires_at_ms`.
pub const STANDBY_TABLE: &str = "_shapesync_standbys";

/// Every table a sink keeps for itself starts with this.
pub const RESERVED_PREFIX: &str = "_shapesync_";

/// The table a sink writes: `configured`, or the shape's table — without its schema
/// when that is `public` (`public.items`, `items` → `items`), prefixed by it otherwise
/// (`sales.items` → `sales_items`), so that two shapes of same-named tables in two
/// schemas do not share one table by default. Names are read as Postgres (and Electric's
/// `table` parameter) reads them: unquoted parts in lower case, quoted ones exactly
/// (`public."We.ird ""t"""` → `We.ird "t"`).
pub fn table_name(configured: Option<&str>, shape_table: &str) -> String {
    if let Some(table) = configured {
        return table.to_owned();
    }
    match parse_relation(shape_table) {
        Some((None, table)) => table,
        Some((Some(schema), table)) if schema == "public" => table,
        Some((Some(schema), table)) => format!("{schema}_{table}"),
        None => shape_table.to_owned(), // not a relation name; the source reports it
    }
}

/// Checks, without I/O, that `table` and the shape's selected columns leave the sink's
/// own names free. Error keys are relative to `sink`.
pub fn check_names(table: &str, shape: &ShapeInfo) -> Result<(), ConfigError> {
    if table.is_empty() {
        return Err(ConfigError::new("table", "expected a table name"));
    }
    if table.starts_with(RESERVED_PREFIX) {
        return Err(ConfigError::new(
            "table",
            format!(
                "names starting with `{RESERVED_PREFIX}` are the sink's own (checkpoints, leases); pick another table name"
            ),
        ));
    }
    if shape.columns.iter().flatten().any(|c| c == GENERATION_COLUMN) {
        return Err(ConfigError::new(
            "table",
            format!(
                "the shape selects a column named `{GENERATION_COLUMN}`, which the sink keeps for itself"
            ),
        ));
    }
    Ok(())
}

/// What a sink does to its table before writing rows of a schema.
#[derive(Debug, PartialEq)]
pub enum TablePlan<'s> {
    /// The table does not exist: create it with the schema's columns, primary key and
    /// [`GENERATION_COLUMN`].
    Create,
    /// The table exists; add these columns, which joined the shape since (none: nothing
    /// to do). Columns that left the shape stay.
    AddColumns(Vec<(&'s str, &'s ColumnType)>),
}

/// Decides how a table whose columns are `existing` — each with its position in the
/// primary key, 0 if not in it; empty when the table does not exist — can hold rows of
/// `schema`, or says why it cannot and what to do.
pub fn plan_table<'s>(schema: &'s Schema, existing: &[(String, i64)]) -> Result<TablePlan<'s>, String> {
    let pk = schema.primary_key();
    if pk.is_empty() {
        return Err(
            "the shape's table has no primary key, which the sink keys rows by; give the source table a primary key"
                .into(),
        );
    }
    if schema.0.contains_key(GENERATION_COLUMN) {
        return Err(format!(
            "the shape has a column named `{GENERATION_COLUMN}`, which the sink keeps for itself; leave it out with the source's `columns`"
        ));
    }
    if existing.is_empty() {
        return Ok(TablePlan::Create);
    }
    let mut stored_pk: Vec<(i64, &str)> =
        existing.iter().filter(|(_, pos)| *pos > 0).map(|(name, pos)| (*pos, name.as_str())).collect();
    stored_pk.sort();
    let stored_pk: Vec<&str> = stored_pk.into_iter().map(|(_, name)| name).collect();
    if stored_pk != pk {
        return Err(format!(
            "the table exists with primary key {stored_pk:?}, but the shape's is {pk:?}; drop the table (shapesync recreates it) and restart"
        ));
    }
    if !existing.iter().any(|(name, _)| name == GENERATION_COLUMN) {
        return Err(format!(
            "the table exists without the `{GENERATION_COLUMN}` column, so another program owns it; set the sink's `table` to a table of its own"
        ));
    }
    Ok(TablePlan::AddColumns(
        schema
            .0
            .iter()
            .filter(|(name, _)| !existing.iter().any(|(have, _)| have == &***name))
            .map(|(name, ty)| (&**name, ty))
            .collect(),
    ))
}

/// The values of the primary-key columns `pk` in `row`, or why `change` has none.
pub fn key_values<'r>(pk: &[&str], row: &'r Row, change: &Change) -> Result<Vec<&'r Value>, String> {
    pk.iter()
        .map(|c| match row.get(c) {
            Some(Value::Null) | None => Err(format!(
                "the {} of row {} carries no value for primary-key column `{c}`",
                change.op.as_str(),
                change.key
            )),
            Some(v) => Ok(v),
        })
        .collect()
}

/// For an update that changes the primary key (under `replica: full`, whose old values
/// tell): the row as it was, whose key the sink deletes before writing the new one.
pub fn moved_from(pk: &[&str], change: &Change) -> Result<Option<Row>, String> {
    let Some(old) = &change.old_value else { return Ok(None) };
    if !pk.iter().any(|c| old.contains_key(c)) {
        return Ok(None);
    }
    let mut before = change.value.clone();
    before.merge(old);
    let moved = key_values(pk, &before, change)? != key_values(pk, &change.value, change)?;
    Ok(moved.then_some(before))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schema() -> Schema {
        serde_json::from_str(
            r#"{"id":{"type":"int8","pk_index":0},"name":{"type":"text"},"n":{"type":"int4"}}"#,
        )
        .unwrap()
    }

    #[test]
    fn an_existing_table_gets_the_new_columns_or_a_reason_it_cannot_hold_the_shape() {
        let s = schema();
        assert_eq!(plan_table(&s, &[]), Ok(TablePlan::Create));
        let ours = |extra: &[(&str, i64)]| {
            let mut cols = vec![("id".to_owned(), 1), (GENERATION_COLUMN.to_owned(), 0)];
            cols.extend(extra.iter().map(|(n, p)| ((*n).to_owned(), *p)));
            cols
        };
        let added: Vec<&str> = match plan_table(&s, &ours(&[("name", 0)])).unwrap() {
            TablePlan::AddColumns(cols) => cols.into_iter().map(|(n, _)| n).collect(),
            other => panic!("{other:?}"),
        };
        assert_eq!(added, ["n"]);
        assert!(
            plan_table(&s, &[("name".into(), 1), (GENERATION_COLUMN.into(), 0)])
                .unwrap_err()
                .contains("drop the table")
        );
        assert!(plan_table(&s, &[("id".into(), 1)]).unwrap_err().contains("another program"));
    }

    #[test]
    fn default_table_names_keep_non_public_schemas_and_read_quotes_as_postgres_does() {
        assert_eq!(table_name(None, "items"), "items");
        assert_eq!(table_name(None, "public.items"), "items");
        assert_eq!(table_name(None, "Items"), "items", "unquoted names fold to lower case");
        assert_eq!(table_name(None, "s1.items"), "s1_items");
        assert_eq!(table_name(None, "s2.items"), "s2_items", "two schemas' `items` get two tables");
        assert_eq!(table_name(None, r#"public."we.ird ""t""""#), r#"we.ird "t""#);
        assert_eq!(table_name(None, r#""My Schema"."T""#), "My Schema_T");
        assert_eq!(table_name(Some("mine"), "s1.items"), "mine");
        assert_eq!(
            table_name(None, "it\"ems; DROP TABLE x"),
            "it\"ems; DROP TABLE x",
            "not a relation: kept as given"
        );
    }

    #[test]
    fn names_the_sink_keeps_are_refused_in_config() {
        let shape = ShapeInfo { table: "public.items".into(), ..Default::default() };
        assert_eq!(table_name(None, &shape.table), "items");
        assert!(check_names("items", &shape).is_ok());
        assert_eq!(check_names(CHECKPOINT_TABLE, &shape).unwrap_err().key, "table");
        let narrowed = ShapeInfo { columns: Some(vec![GENERATION_COLUMN.into()]), ..shape };
        assert!(check_names("items", &narrowed).is_err());
    }
}
