//! The statements a SQL-table sink runs, as text, for a [`Dialect`]: its shape's table
//! ([`TableSql`]: create / alter, upsert, delete, sweep, checkpoints) and its lease
//! ([`LeaseSql`]). Every identifier is [`quote`]d; values are always parameters, except
//! where a dialect writes the batch's generation as a literal. The statements name
//! their parameters in order: each method says which values it expects.

use shapesync_core::{ColumnType, Schema};

use crate::rules::{CHECKPOINT_TABLE, GENERATION_COLUMN, LEASE_TABLE, STANDBY_TABLE, TablePlan};

/// `ident` as a quoted SQL identifier (`"…"`, quotes doubled): any name, however hostile,
/// stays one identifier.
pub fn quote(ident: &str) -> String {
    format!("\"{}\"", ident.replace('"', "\"\""))
}

/// What SQL databases spell differently, for the statements of [`TableSql`] and
/// [`LeaseSql`]. The provided methods are the forms SQLite and Postgres share.
pub trait Dialect {
    /// Statement parameter `n`, counted from 1: `?1` (SQLite), `$1` (Postgres).
    fn placeholder(&self, n: usize) -> String;

    /// Parameter `n` read as a value of `sql_type` (a type name of this dialect), for a
    /// sink that binds every value as text: `$1::int8` (Postgres). By default the
    /// placeholder alone.
    fn typed_placeholder(&self, n: usize, sql_type: &str) -> String {
        let _ = sql_type;
        self.placeholder(n)
    }

    /// The type a shape column gets in the table.
    fn column_type(&self, column: &ColumnType) -> String;

    /// The type of the sink's own text columns (pipeline, checkpoint, owner), and of a
    /// column the shape's schema does not describe: `TEXT`, `text`.
    fn text_type(&self) -> &'static str;

    /// The type of the sink's 64-bit integer columns (generation, epoch, commit count,
    /// times in ms): `INTEGER`, `int8`.
    fn integer_type(&self) -> &'static str;

    /// The function giving the larger of two values: `greatest` by default, `max` in
    /// SQLite.
    fn greatest(&self) -> &'static str {
        "greatest"
    }

    /// The rows an upsert of columns typed `types` inserts, each row followed by its
    /// generation `generation`. By default one row of parameters, the generation bound
    /// as the parameter after the columns: `VALUES (?1, ?2, ?3)`. A dialect may instead
    /// take many rows per statement (Postgres: one array parameter per column through
    /// `unnest`, the generation as a literal); its sink binds values accordingly.
    fn upsert_rows(&self, types: &[String], generation: i64) -> String {
        let _ = generation;
        let params: Vec<String> = (1..=types.len() + 1).map(|n| self.placeholder(n)).collect();
        format!("VALUES ({})", params.join(", "))
    }

    /// The clause that turns an insert meeting an existing `key` into an update of
    /// `columns` with the inserted values (all quoted): `ON CONFLICT (k) DO UPDATE SET
    /// c = excluded.c`.
    fn on_conflict_update(&self, key: &[String], columns: &[String]) -> String {
        let set: Vec<String> = columns.iter().map(|c| format!("{c} = excluded.{c}")).collect();
        format!("ON CONFLICT ({}) DO UPDATE SET {}", key.join(", "), set.join(", "))
    }
}

/// `name` (quoted) in the namespace `schema` (quoted), or alone without one.
fn qualified(schema: Option<&str>, name: &str) -> String {
    match schema {
        Some(schema) => format!("{}.{}", quote(schema), quote(name)),
        None => quote(name),
    }
}

/// The statements over one shape's table and the checkpoints table beside it.
#[derive(Debug, Clone)]
pub struct TableSql<D> {
    dialect: D,
    table: String,
    checkpoints: String,
}

impl<D: Dialect> TableSql<D> {
    /// Statements for `table` in the namespace `schema` (Postgres' schema; `None` where
    /// there is none, as in SQLite), whose checkpoints table is in the same namespace.
    pub fn new(dialect: D, schema: Option<&str>, table: &str) -> Self {
        TableSql {
            dialect,
            table: qualified(schema, table),
            checkpoints: qualified(schema, CHECKPOINT_TABLE),
        }
    }

    /// The dialect the statements are written for.
    pub fn dialect(&self) -> &D {
        &self.dialect
    }

    /// The shape's table as SQL: quoted, qualified by its namespace.
    pub fn table(&self) -> &str {
        &self.table
    }

    /// The checkpoints table as SQL: quoted, qualified by its namespace.
    pub fn checkpoints(&self) -> &str {
        &self.checkpoints
    }

    /// The type of `column` of `schema` in the table; text for a column the schema
    /// does not hold.
    pub fn type_of(&self, schema: &Schema, column: &str) -> String {
        schema
            .0
            .get(column)
            .map_or_else(|| self.dialect.text_type().to_owned(), |ty| self.dialect.column_type(ty))
    }

    /// Creates the checkpoints table if missing: `pipeline` (key), `checkpoint` (JSON).
    pub fn create_checkpoints(&self) -> String {
        let text = self.dialect.text_type();
        format!(
            "CREATE TABLE IF NOT EXISTS {} (pipeline {text} PRIMARY KEY, checkpoint {text} NOT NULL)",
            self.checkpoints
        )
    }

    /// The statements carrying out `plan` for rows of `schema`: one `CREATE TABLE`
    /// (the schema's columns, the generation column, the primary key), or one
    /// `ALTER TABLE … ADD COLUMN` per column to add.
    pub fn prepare_table(&self, schema: &Schema, plan: &TablePlan<'_>) -> Vec<String> {
        match plan {
            TablePlan::Create => {
                let columns: Vec<String> = schema
                    .0
                    .iter()
                    .map(|(name, ty)| format!("{} {}", quote(name), self.dialect.column_type(ty)))
                    .collect();
                let key: Vec<String> = schema.primary_key().iter().map(|c| quote(c)).collect();
                vec![format!(
                    "CREATE TABLE {} ({}, {} {} NOT NULL, PRIMARY KEY ({}))",
                    self.table,
                    columns.join(", "),
                    quote(GENERATION_COLUMN),
                    self.dialect.integer_type(),
                    key.join(", ")
                )]
            }
            TablePlan::AddColumns(columns) => columns
                .iter()
                .map(|(name, ty)| {
                    format!(
                        "ALTER TABLE {} ADD COLUMN {} {}",
                        self.table,
                        quote(name),
                        self.dialect.column_type(ty)
                    )
                })
                .collect(),
        }
    }

    /// Writes `columns` of rows of `schema` (the key columns `pk` among them) and the
    /// generation: a new row is inserted, an existing one gets just these columns and
    /// the generation replaced. Parameters: as [`Dialect::upsert_rows`] says.
    pub fn upsert(&self, schema: &Schema, pk: &[&str], columns: &[&str], generation: i64) -> String {
        let generation_column = quote(GENERATION_COLUMN);
        let names: Vec<String> = columns.iter().map(|c| quote(c)).collect();
        let types: Vec<String> = columns.iter().map(|c| self.type_of(schema, c)).collect();
        let mut replaced: Vec<String> =
            columns.iter().filter(|c| !pk.contains(c)).map(|c| quote(c)).collect();
        replaced.push(generation_column.clone());
        let key: Vec<String> = pk.iter().map(|c| quote(c)).collect();
        format!(
            "INSERT INTO {} ({}, {generation_column}) {} {}",
            self.table,
            names.join(", "),
            self.dialect.upsert_rows(&types, generation),
            self.dialect.on_conflict_update(&key, &replaced)
        )
    }

    /// Deletes the row whose key columns `pk` (of `schema`) hold the parameters, in
    /// `pk`'s order.
    pub fn delete_row(&self, schema: &Schema, pk: &[&str]) -> String {
        let condition: Vec<String> = pk
            .iter()
            .enumerate()
            .map(|(i, c)| {
                format!("{} = {}", quote(c), self.dialect.typed_placeholder(i + 1, &self.type_of(schema, c)))
            })
            .collect();
        format!("DELETE FROM {} WHERE {}", self.table, condition.join(" AND "))
    }

    /// Deletes the rows of generations older than the parameter (mark and sweep).
    pub fn sweep(&self) -> String {
        format!(
            "DELETE FROM {} WHERE {} < {}",
            self.table,
            quote(GENERATION_COLUMN),
            self.dialect.typed_placeholder(1, self.dialect.integer_type())
        )
    }

    /// Deletes every row of the table (`reset`; the table and its indexes stay).
    pub fn delete_all(&self) -> String {
        format!("DELETE FROM {}", self.table)
    }

    /// Stores a pipeline's checkpoint. Parameters: pipeline, checkpoint JSON.
    pub fn store_checkpoint(&self) -> String {
        let columns = ["pipeline", "checkpoint"].map(str::to_owned);
        format!(
            "INSERT INTO {} (pipeline, checkpoint) VALUES ({}, {}) {}",
            self.checkpoints,
            self.dialect.placeholder(1),
            self.dialect.placeholder(2),
            self.dialect.on_conflict_update(&columns[..1], &columns[1..])
        )
    }

    /// Reads a pipeline's checkpoint JSON. Parameter: pipeline.
    pub fn read_checkpoint(&self) -> String {
        format!(
            "SELECT checkpoint FROM {} WHERE pipeline = {}",
            self.checkpoints,
            self.dialect.placeholder(1)
        )
    }

    /// Deletes a pipeline's checkpoint. Parameter: pipeline.
    pub fn delete_checkpoint(&self) -> String {
        format!("DELETE FROM {} WHERE pipeline = {}", self.checkpoints, self.dialect.placeholder(1))
    }
}

/// The statements over the lease tables ([`LEASE_TABLE`]: `pipeline`, `owner`, `epoch`,
/// `seq`, `expires_at_ms`; [`STANDBY_TABLE`]: `pipeline`, `instance`, `expires_at_ms`).
/// Times are milliseconds on a clock the sink picks: expressions it passes in (`?5`, a
/// parameter of the machine's clock; `clock_timestamp()` arithmetic, the database's).
#[derive(Debug, Clone)]
pub struct LeaseSql<D> {
    dialect: D,
    leases: String,
    standbys: String,
}

impl<D: Dialect> LeaseSql<D> {
    /// Statements for the lease tables in the namespace `schema` (`None`: none).
    pub fn new(dialect: D, schema: Option<&str>) -> Self {
        LeaseSql {
            dialect,
            leases: qualified(schema, LEASE_TABLE),
            standbys: qualified(schema, STANDBY_TABLE),
        }
    }

    /// The leases table as SQL: quoted, qualified.
    pub fn leases(&self) -> &str {
        &self.leases
    }

    /// The standbys table as SQL: quoted, qualified.
    pub fn standbys(&self) -> &str {
        &self.standbys
    }

    /// Creates the leases table, then the standbys table, if missing.
    pub fn create_tables(&self) -> [String; 2] {
        let (text, int) = (self.dialect.text_type(), self.dialect.integer_type());
        [
            format!(
                "CREATE TABLE IF NOT EXISTS {} (pipeline {text} PRIMARY KEY, owner {text} NOT NULL, epoch {int} NOT NULL, seq {int} NOT NULL, expires_at_ms {int} NOT NULL)",
                self.leases
            ),
            format!(
                "CREATE TABLE IF NOT EXISTS {} (pipeline {text} NOT NULL, instance {text} NOT NULL, expires_at_ms {int} NOT NULL, PRIMARY KEY (pipeline, instance))",
                self.standbys
            ),
        ]
    }

    /// Reads a pipeline's lease: `owner`, `epoch`, `seq` and `expiry` (an expression
    /// over `expires_at_ms`), the row locked until the transaction ends when `lock`
    /// (`FOR UPDATE`). Parameter: pipeline.
    pub fn read_lease(&self, expiry: &str, lock: bool) -> String {
        format!(
            "SELECT owner, epoch, seq, {expiry} FROM {} WHERE pipeline = {}{}",
            self.leases,
            self.dialect.placeholder(1),
            if lock { " FOR UPDATE" } else { "" }
        )
    }

    /// Stores a pipeline's lease, expiring at `expires_at` (an expression). Parameters:
    /// pipeline, owner, epoch, seq.
    pub fn store_lease(&self, expires_at: &str) -> String {
        let int = self.dialect.integer_type();
        let replaced = ["owner", "epoch", "seq", "expires_at_ms"].map(str::to_owned);
        format!(
            "INSERT INTO {} (pipeline, owner, epoch, seq, expires_at_ms) VALUES ({}, {}, {}, {}, {expires_at}) {}",
            self.leases,
            self.dialect.placeholder(1),
            self.dialect.placeholder(2),
            self.dialect.typed_placeholder(3, int),
            self.dialect.typed_placeholder(4, int),
            self.dialect.on_conflict_update(&["pipeline".to_owned()], &replaced)
        )
    }

    /// Moves a pipeline's expiry out to `expires_at` (an expression; never earlier), and
    /// counts one more commit when `count_commit`. Parameter: pipeline.
    pub fn extend_lease(&self, expires_at: &str, count_commit: bool) -> String {
        format!(
            "UPDATE {} SET {}expires_at_ms = {}(expires_at_ms, {expires_at}) WHERE pipeline = {}",
            self.leases,
            if count_commit { "seq = seq + 1, " } else { "" },
            self.dialect.greatest(),
            self.dialect.placeholder(1)
        )
    }

    /// Lets a pipeline's lease expire now if `owner` still holds it at `epoch`.
    /// Parameters: pipeline, owner, epoch.
    pub fn release_lease(&self) -> String {
        format!(
            "UPDATE {} SET expires_at_ms = 0 WHERE pipeline = {} AND owner = {} AND epoch = {}",
            self.leases,
            self.dialect.placeholder(1),
            self.dialect.placeholder(2),
            self.dialect.typed_placeholder(3, self.dialect.integer_type())
        )
    }

    /// Records an instance standing by for a pipeline until `expires_at` (an
    /// expression). Parameters: pipeline, instance.
    pub fn store_standby(&self, expires_at: &str) -> String {
        let key = ["pipeline", "instance"].map(str::to_owned);
        format!(
            "INSERT INTO {} (pipeline, instance, expires_at_ms) VALUES ({}, {}, {expires_at}) {}",
            self.standbys,
            self.dialect.placeholder(1),
            self.dialect.placeholder(2),
            self.dialect.on_conflict_update(&key, &["expires_at_ms".to_owned()])
        )
    }

    /// Forgets an instance standing by for a pipeline. Parameters: pipeline, instance.
    pub fn remove_standby(&self) -> String {
        format!(
            "DELETE FROM {} WHERE pipeline = {} AND instance = {}",
            self.standbys,
            self.dialect.placeholder(1),
            self.dialect.placeholder(2)
        )
    }

    /// Forgets a pipeline's standbys that expired by `now` (an expression). Parameter:
    /// pipeline.
    pub fn prune_standbys(&self, now: &str) -> String {
        format!(
            "DELETE FROM {} WHERE pipeline = {} AND expires_at_ms <= {now}",
            self.standbys,
            self.dialect.placeholder(1)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SQLite's spelling, as far as these tests need it.
    struct Numbered;

    impl Dialect for Numbered {
        fn placeholder(&self, n: usize) -> String {
            format!("?{n}")
        }
        fn column_type(&self, _: &ColumnType) -> String {
            "TEXT".into()
        }
        fn text_type(&self) -> &'static str {
            "TEXT"
        }
        fn integer_type(&self) -> &'static str {
            "INTEGER"
        }
    }

    fn schema() -> Schema {
        serde_json::from_str(r#"{"id":{"type":"int8","pk_index":0},"name":{"type":"text"}}"#).unwrap()
    }

    #[test]
    fn identifiers_are_quoted_whatever_they_hold() {
        assert_eq!(quote("items"), "\"items\"");
        assert_eq!(quote("we\"ird; DROP TABLE x; --"), "\"we\"\"ird; DROP TABLE x; --\"");
        assert_eq!(qualified(Some("s\""), "t"), "\"s\"\"\".\"t\"");
    }

    #[test]
    fn an_upsert_replaces_only_the_columns_it_writes_and_the_generation() {
        let sql = TableSql::new(Numbered, None, "items");
        assert_eq!(
            sql.upsert(&schema(), &["id"], &["id", "name"], 7),
            "INSERT INTO \"items\" (\"id\", \"name\", \"_shapesync_generation\") VALUES (?1, ?2, ?3) \
             ON CONFLICT (\"id\") DO UPDATE SET \"name\" = excluded.\"name\", \"_shapesync_generation\" = excluded.\"_shapesync_generation\""
        );
        assert_eq!(sql.delete_row(&schema(), &["id"]), "DELETE FROM \"items\" WHERE \"id\" = ?1");
        assert_eq!(sql.sweep(), "DELETE FROM \"items\" WHERE \"_shapesync_generation\" < ?1");
    }

    #[test]
    fn a_new_table_gets_the_generation_column_and_the_shapes_key() {
        let sql = TableSql::new(Numbered, Some("s"), "items");
        let schema = schema();
        assert_eq!(
            sql.prepare_table(&schema, &TablePlan::Create),
            [
                "CREATE TABLE \"s\".\"items\" (\"id\" TEXT, \"name\" TEXT, \"_shapesync_generation\" INTEGER NOT NULL, PRIMARY KEY (\"id\"))"
            ]
        );
        assert_eq!(sql.checkpoints(), "\"s\".\"_shapesync_checkpoints\"");
    }
}
