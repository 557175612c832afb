//! The SQLite sink: each batch, its sweep and its checkpoint in one SQLite transaction.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rusqlite::types::{ToSqlOutput, ValueRef};
use rusqlite::{Connection, ErrorCode, OptionalExtension, ToSql, Transaction, TransactionBehavior};
use shapesync_core::table::{self, CHECKPOINT_TABLE, GENERATION_COLUMN, TablePlan};
use shapesync_core::{
    Acquisition, Batch, Change, Checkpoint, ColumnType, Fence, LeaseInfo, LeaseRequest, Operation, Row,
    Schema, Sink, SinkContext, SinkError, Value, async_trait,
};

use crate::config::SqliteSinkConfig;

/// A SQLite table kept exactly in sync with a shape; see the crate docs.
pub struct SqliteSink {
    pub(crate) path: PathBuf,
    table: String,
    pub(crate) pipeline: String,
    busy_timeout: Duration,
    state: Arc<Mutex<State>>,
}

/// The open connection, and the schema the table was last brought up to.
#[derive(Default)]
pub(crate) struct State {
    pub(crate) conn: Option<Connection>,
    table_schema: Option<Schema>,
}

/// `ident` as a quoted SQL identifier: any name, however hostile, stays one identifier.
pub(crate) fn quote(ident: &str) -> String {
    format!("\"{}\"", ident.replace('"', "\"\""))
}

/// The declared type of a column, chosen so that SQLite keeps every value exactly:
/// integers (and booleans, as 0/1) `INTEGER`, floats `REAL`, everything else `TEXT` —
/// `numeric` included, since SQLite's `NUMERIC` would round it to a double.
fn declared_type(column: &ColumnType) -> &'static str {
    if column.dims > 0 {
        return "TEXT";
    }
    match column.type_name.as_str() {
        "int2" | "int4" | "int8" | "oid" | "bool" => "INTEGER",
        "float4" | "float8" => "REAL",
        _ => "TEXT",
    }
}

/// A value bound as a statement parameter, by the rules in the crate docs.
struct Bound<'a>(&'a Value);

impl ToSql for Bound<'_> {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(match self.0 {
            Value::Null => ToSqlOutput::Borrowed(ValueRef::Null),
            Value::Bool(b) => ToSqlOutput::Borrowed(ValueRef::Integer(i64::from(*b))),
            Value::Int(i) => ToSqlOutput::Borrowed(ValueRef::Integer(*i)),
            // SQLite turns a NaN into NULL; its text keeps it.
            Value::Float(f) if f.is_nan() => ToSqlOutput::Borrowed(ValueRef::Text(b"NaN")),
            Value::Float(f) => ToSqlOutput::Borrowed(ValueRef::Real(*f)),
            Value::Numeric(s) | Value::Json(s) | Value::Text(s) => {
                ToSqlOutput::Borrowed(ValueRef::Text(s.as_bytes()))
            }
            Value::Array(_) => {
                let text = self.0.render().map(|t| t.into_owned()).unwrap_or_default();
                ToSqlOutput::Owned(rusqlite::types::Value::Text(text))
            }
        })
    }
}

/// Maps a SQLite failure to the runner's retry classes.
pub(crate) fn classify(e: rusqlite::Error, path: &Path) -> SinkError {
    let path = path.display();
    let error = match e.sqlite_error_code() {
        Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) => {
            SinkError::unavailable(format!("SQLite database `{path}` is locked by another connection: {e}"))
        }
        Some(ErrorCode::DiskFull | ErrorCode::SystemIoFailure | ErrorCode::OutOfMemory) => {
            SinkError::unavailable(format!("SQLite database `{path}`: {e}"))
        }
        Some(ErrorCode::CannotOpen) => SinkError::rejected(format!(
            "cannot open SQLite database `{path}` ({e}); check that its directory exists and is writable"
        )),
        Some(ErrorCode::ReadOnly | ErrorCode::PermissionDenied) => SinkError::rejected(format!(
            "SQLite database `{path}` is read-only ({e}); give shapesync write access to it and its directory"
        )),
        _ => SinkError::rejected(format!("SQLite database `{path}` refused a statement: {e}")),
    };
    let error = match &e {
        rusqlite::Error::SqliteFailure(failure, _) => {
            error.with_code(shapesync_core::ErrorCode::Sqlite(failure.extended_code))
        }
        _ => error,
    };
    error.with_source(e)
}

/// Runs blocking SQLite work without stalling the async runtime's other tasks where the
/// runtime allows it (a multi-threaded one).
fn blocking<T>(work: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(handle) if handle.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(work)
        }
        _ => work(),
    }
}

impl SqliteSink {
    /// A sink for `ctx`'s pipeline; the database is opened on first use.
    pub fn new(config: SqliteSinkConfig, ctx: SinkContext) -> Self {
        SqliteSink {
            table: config.table_name(&ctx.shape.table),
            path: config.path,
            pipeline: ctx.pipeline,
            busy_timeout: Duration::from_millis(config.busy_timeout_ms),
            state: Arc::default(),
        }
    }

    /// The table holding the shape's rows.
    pub fn table(&self) -> &str {
        &self.table
    }

    pub(crate) fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn rejected(&self, message: String) -> SinkError {
        SinkError::rejected(format!("SQLite table `{}` in `{}`: {message}", self.table, self.path.display()))
    }

    /// The open connection, opening (and creating) the database first if needed.
    pub(crate) fn connection<'s>(&self, state: &'s mut State) -> Result<&'s mut Connection, SinkError> {
        if state.conn.is_none() {
            let conn = Connection::open(&self.path).map_err(|e| classify(e, &self.path))?;
            conn.busy_timeout(self.busy_timeout).map_err(|e| classify(e, &self.path))?;
            // WAL: readers keep reading the last commit while a batch is written.
            let mode: String = conn
                .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
                .map_err(|e| classify(e, &self.path))?;
            if !mode.eq_ignore_ascii_case("wal") {
                // WAL is unavailable on some file systems; the sink still works.
                tracing::warn!(
                    path = %self.path.display(),
                    %mode,
                    "SQLite runs without WAL: readers wait while a batch commits"
                );
            }
            conn.execute_batch("PRAGMA synchronous = NORMAL").map_err(|e| classify(e, &self.path))?;
            state.table_schema = None;
            state.conn = Some(conn);
        }
        Ok(state.conn.as_mut().expect("opened above"))
    }

    /// Creates the table for `schema`, or brings an existing one up to it: new columns
    /// are added; a primary key that differs is an error.
    fn ensure_table(&self, tx: &Transaction<'_>, schema: &Schema) -> Result<(), SinkError> {
        let sql = format!(
            "CREATE TABLE IF NOT EXISTS {} (pipeline TEXT PRIMARY KEY, checkpoint TEXT NOT NULL)",
            quote(CHECKPOINT_TABLE)
        );
        tx.execute_batch(&sql).map_err(|e| classify(e, &self.path))?;
        let table = quote(&self.table);
        let existing = self.table_columns(tx)?;
        match table::plan_table(schema, &existing).map_err(|m| self.rejected(m))? {
            TablePlan::Create => {
                let columns: Vec<String> = schema
                    .0
                    .iter()
                    .map(|(name, ty)| format!("{} {}", quote(name), declared_type(ty)))
                    .collect();
                let key: Vec<String> = schema.primary_key().iter().map(|c| quote(c)).collect();
                let sql = format!(
                    "CREATE TABLE {table} ({}, {} INTEGER NOT NULL, PRIMARY KEY ({}))",
                    columns.join(", "),
                    quote(GENERATION_COLUMN),
                    key.join(", ")
                );
                tx.execute_batch(&sql).map_err(|e| classify(e, &self.path))
            }
            TablePlan::AddColumns(columns) => {
                for (name, ty) in columns {
                    let sql = format!("ALTER TABLE {table} ADD COLUMN {} {}", quote(name), declared_type(ty));
                    tx.execute_batch(&sql).map_err(|e| classify(e, &self.path))?;
                }
                Ok(())
            }
        }
    }

    /// Whether the database has a table named `table`.
    pub(crate) fn exists(conn: &Connection, table: &str) -> rusqlite::Result<bool> {
        conn.query_row(
            "SELECT count(*) > 0 FROM sqlite_schema WHERE type = 'table' AND name = ?1",
            [table],
            |r| r.get(0),
        )
    }

    /// The table's columns with their position in the primary key (0: not in it); empty
    /// when the table does not exist.
    fn table_columns(&self, conn: &Connection) -> Result<Vec<(String, i64)>, SinkError> {
        let mut stmt = conn
            .prepare("SELECT name, pk FROM pragma_table_info(?1)")
            .map_err(|e| classify(e, &self.path))?;
        let rows = stmt
            .query_map([&self.table], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))
            .map_err(|e| classify(e, &self.path))?;
        rows.collect::<Result<_, _>>().map_err(|e| classify(e, &self.path))
    }

    /// The statement writing `columns` of a row (its key columns among them) and its
    /// generation: a new row is inserted, an existing one gets just these columns
    /// replaced.
    fn upsert_sql(&self, pk: &[&str], columns: &[&str]) -> String {
        let generation_column = quote(GENERATION_COLUMN);
        let names: Vec<String> = columns.iter().map(|c| quote(c)).collect();
        let mut set: Vec<String> = columns
            .iter()
            .filter(|c| !pk.contains(c))
            .map(|c| format!("{0} = excluded.{0}", quote(c)))
            .collect();
        set.push(format!("{generation_column} = excluded.{generation_column}"));
        let placeholders: Vec<String> = (1..=names.len() + 1).map(|i| format!("?{i}")).collect();
        let key: Vec<String> = pk.iter().map(|c| quote(c)).collect();
        format!(
            "INSERT INTO {} ({}, {generation_column}) VALUES ({}) ON CONFLICT ({}) DO UPDATE SET {}",
            quote(&self.table),
            names.join(", "),
            placeholders.join(", "),
            key.join(", "),
            set.join(", ")
        )
    }

    /// Runs an upsert statement from [`Self::upsert_sql`] with `values` and `generation`.
    fn upsert<'v>(
        &self,
        tx: &Transaction<'_>,
        sql: &str,
        values: impl Iterator<Item = &'v Value>,
        generation: i64,
    ) -> Result<(), SinkError> {
        let mut stmt = tx.prepare_cached(sql).map_err(|e| classify(e, &self.path))?;
        let bound: Vec<Bound<'_>> = values.map(Bound).collect();
        let mut params: Vec<&dyn ToSql> = bound.iter().map(|b| b as &dyn ToSql).collect();
        params.push(&generation);
        stmt.execute(params.as_slice()).map_err(|e| classify(e, &self.path))?;
        Ok(())
    }

    /// Deletes the row whose key columns hold the values in `row`.
    fn delete(&self, tx: &Transaction<'_>, pk: &[&str], row: &Row, change: &Change) -> Result<(), SinkError> {
        let key = self.key_values(pk, row, change)?;
        let condition: Vec<String> =
            pk.iter().enumerate().map(|(i, c)| format!("{} = ?{}", quote(c), i + 1)).collect();
        let sql = format!("DELETE FROM {} WHERE {}", quote(&self.table), condition.join(" AND "));
        let mut stmt = tx.prepare_cached(&sql).map_err(|e| classify(e, &self.path))?;
        let bound: Vec<Bound<'_>> = key.into_iter().map(Bound).collect();
        let params: Vec<&dyn ToSql> = bound.iter().map(|b| b as &dyn ToSql).collect();
        stmt.execute(params.as_slice()).map_err(|e| classify(e, &self.path))?;
        Ok(())
    }

    fn key_values<'r>(
        &self,
        pk: &[&str],
        row: &'r Row,
        change: &Change,
    ) -> Result<Vec<&'r Value>, SinkError> {
        table::key_values(pk, row, change).map_err(|m| self.rejected(m))
    }

    fn write_change(
        &self,
        tx: &Transaction<'_>,
        schema: &Schema,
        pk: &[&str],
        insert_sql: &str,
        change: &Change,
        generation: i64,
    ) -> Result<(), SinkError> {
        match change.op {
            Operation::Insert => {
                // A whole row: every column of the shape, NULL where the row has none.
                self.key_values(pk, &change.value, change)?;
                let values = schema.0.keys().map(|c| change.value.get(c).unwrap_or(&Value::Null));
                self.upsert(tx, insert_sql, values, generation)
            }
            Operation::Update => {
                // Under `replica: full` an update may change the key: the row moves.
                if let Some(before) = table::moved_from(pk, change).map_err(|m| self.rejected(m))? {
                    self.delete(tx, pk, &before, change)?;
                }
                self.key_values(pk, &change.value, change)?;
                let sql = self.upsert_sql(pk, &change.value.keys().collect::<Vec<_>>());
                self.upsert(tx, &sql, change.value.values(), generation)
            }
            Operation::Delete => self.delete(tx, pk, &change.value, change),
        }
    }

    fn apply_blocking(&self, batch: &Batch) -> Result<(), SinkError> {
        let mut state = self.state();
        let known = state.table_schema.clone();
        let conn = self.connection(&mut state)?;
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(|e| classify(e, &self.path))?;
        if let Some(fence) = &batch.fence
            && !self.check_fence(&tx, fence)?
        {
            return Ok(()); // committed by an attempt whose answer was lost
        }
        let schema = batch.schema();
        if known.as_ref() != Some(schema) {
            self.ensure_table(&tx, schema)?;
        }
        let pk = schema.primary_key();
        let generation = i64::try_from(batch.checkpoint.generation).unwrap_or(i64::MAX);
        let insert_sql = self.upsert_sql(&pk, &schema.0.keys().map(|c| &**c).collect::<Vec<_>>());
        for change in &batch.changes {
            self.write_change(&tx, schema, &pk, &insert_sql, change, generation)?;
        }
        if batch.sweep {
            let sql = format!("DELETE FROM {} WHERE {} < ?1", quote(&self.table), quote(GENERATION_COLUMN));
            tx.execute(&sql, [generation]).map_err(|e| classify(e, &self.path))?;
        }
        tx.execute(
            &format!(
                "INSERT INTO {} (pipeline, checkpoint) VALUES (?1, ?2) ON CONFLICT (pipeline) DO UPDATE SET checkpoint = excluded.checkpoint",
                quote(CHECKPOINT_TABLE)
            ),
            [&self.pipeline, &batch.checkpoint.to_json()],
        )
        .map_err(|e| classify(e, &self.path))?;
        if let Some(fence) = &batch.fence {
            self.count_commit(&tx, fence)?;
        }
        tx.commit().map_err(|e| classify(e, &self.path))?;
        state.table_schema = Some(schema.clone());
        Ok(())
    }

    fn checkpoint_blocking(&self) -> Result<Option<Checkpoint>, SinkError> {
        let mut state = self.state();
        if state.conn.is_none() && !self.path.exists() {
            // Nothing written yet, and reading must not create the file; but a file that
            // could never be created is worth saying now (`validate --connect`).
            let dir = self.path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
            if !dir.is_dir() {
                return Err(SinkError::rejected(format!(
                    "cannot create SQLite database `{}`: directory `{}` does not exist; create it or fix `path`",
                    self.path.display(),
                    dir.display()
                )));
            }
            return Ok(None);
        }
        let conn = self.connection(&mut state)?;
        if !Self::exists(conn, CHECKPOINT_TABLE).map_err(|e| classify(e, &self.path))? {
            return Ok(None); // a database no pipeline has written to yet
        }
        let stored: Option<String> = conn
            .query_row(
                &format!("SELECT checkpoint FROM {} WHERE pipeline = ?1", quote(CHECKPOINT_TABLE)),
                [&self.pipeline],
                |r| r.get(0),
            )
            .optional()
            .map_err(|e| classify(e, &self.path))?;
        stored.map(|json| Checkpoint::from_json(&json)).transpose().map_err(|e| {
            SinkError::corrupt_checkpoint(format!(
                "pipeline `{}` in table `{CHECKPOINT_TABLE}` of `{}`: {e}",
                self.pipeline,
                self.path.display()
            ))
            .with_source(e)
        })
    }

    fn reset_blocking(&self) -> Result<(), SinkError> {
        let mut state = self.state();
        if state.conn.is_none() && !self.path.exists() {
            return Ok(());
        }
        let conn = self.connection(&mut state)?;
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(|e| classify(e, &self.path))?;
        self.take_for_reset(&tx)?;
        if !self.table_columns(&tx)?.is_empty() {
            tx.execute_batch(&format!("DELETE FROM {}", quote(&self.table)))
                .map_err(|e| classify(e, &self.path))?;
        }
        if Self::exists(&tx, CHECKPOINT_TABLE).map_err(|e| classify(e, &self.path))? {
            tx.execute(
                &format!("DELETE FROM {} WHERE pipeline = ?1", quote(CHECKPOINT_TABLE)),
                [&self.pipeline],
            )
            .map_err(|e| classify(e, &self.path))?;
        }
        tx.commit().map_err(|e| classify(e, &self.path))
    }
}

#[async_trait]
impl Sink for SqliteSink {
    async fn checkpoint(&self) -> Result<Option<Checkpoint>, SinkError> {
        blocking(|| self.checkpoint_blocking())
    }

    async fn apply(&self, batch: &Batch) -> Result<(), SinkError> {
        let result = blocking(|| self.apply_blocking(batch));
        if result.is_err() {
            // The transaction rolled back; the next attempt re-checks the table.
            self.state().table_schema = None;
        }
        result
    }

    async fn reset(&self) -> Result<(), SinkError> {
        blocking(|| self.reset_blocking())
    }

    fn keeps_leases(&self) -> bool {
        true
    }

    async fn acquire(&self, request: &LeaseRequest) -> Result<Acquisition, SinkError> {
        blocking(|| self.acquire_blocking(request))
    }

    async fn renew(&self, fence: &Fence) -> Result<LeaseInfo, SinkError> {
        blocking(|| self.renew_blocking(fence))
    }

    async fn release(&self, fence: &Fence) -> Result<(), SinkError> {
        blocking(|| self.release_blocking(fence))
    }

    async fn lease(&self) -> Result<Option<LeaseInfo>, SinkError> {
        blocking(|| self.lease_blocking())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_are_quoted_whatever_they_hold() {
        assert_eq!(quote("items"), "\"items\"");
        assert_eq!(quote("we\"ird; DROP TABLE x; --"), "\"we\"\"ird; DROP TABLE x; --\"");
    }
}
