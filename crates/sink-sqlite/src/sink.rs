//! The SQLite sink: each batch, its sweep and its checkpoint in one SQLite transaction.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rusqlite::types::{ToSqlOutput, ValueRef};
use rusqlite::{Connection, ErrorCode, OptionalExtension, ToSql, Transaction, TransactionBehavior};
use shapesync_core::{
    Acquisition, Batch, Change, Checkpoint, Fence, LeaseInfo, LeaseRequest, Operation, Row, Schema, Sink,
    SinkContext, SinkError, Value, async_trait,
};
use shapesync_sql_table::{self as sql_table, CHECKPOINT_TABLE, LeaseSql, TableSql};

use crate::config::SqliteSinkConfig;
use crate::dialect::SqliteDialect;

/// A SQLite table kept exactly in sync with a shape; see the crate docs.
pub struct SqliteSink {
    pub(crate) path: PathBuf,
    table: String,
    /// The statements over the table and its checkpoints.
    sql: TableSql<SqliteDialect>,
    /// The statements over the lease tables.
    pub(crate) lease_sql: LeaseSql<SqliteDialect>,
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
        let table = config.table_name(&ctx.shape.table);
        SqliteSink {
            sql: TableSql::new(SqliteDialect, None, &table),
            lease_sql: LeaseSql::new(SqliteDialect, None),
            table,
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
        tx.execute_batch(&self.sql.create_checkpoints()).map_err(|e| classify(e, &self.path))?;
        let existing = self.table_columns(tx)?;
        let plan = sql_table::plan_table(schema, &existing).map_err(|m| self.rejected(m))?;
        for sql in self.sql.prepare_table(schema, &plan) {
            tx.execute_batch(&sql).map_err(|e| classify(e, &self.path))?;
        }
        Ok(())
    }

    /// [`Sink::check_rows`]: the file can be written (its directory exists; an existing
    /// file opens for writing) and an existing table can hold rows of `schema`. Creates
    /// nothing.
    fn check_rows_blocking(&self, schema: &Schema) -> Result<(), SinkError> {
        let parent = self.path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        if !parent.is_dir() {
            return Err(self.rejected(format!(
                "the directory of `path` ({}) does not exist or is not a directory; create it or fix `path`",
                parent.display()
            )));
        }
        if !self.path.exists() {
            return Ok(()); // created with the table on the first batch
        }
        std::fs::OpenOptions::new().read(true).write(true).open(&self.path).map_err(|e| {
            self.rejected(format!("cannot open it for writing ({e}); fix `path` or the file's permissions"))
                .with_source(e)
        })?;
        let conn = Connection::open_with_flags(&self.path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .map_err(|e| classify(e, &self.path))?;
        let existing = self.table_columns(&conn)?;
        sql_table::plan_table(schema, &existing).map_err(|m| self.rejected(m))?;
        Ok(())
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

    /// Runs an upsert statement from [`TableSql::upsert`] with `values` and `generation`.
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
    fn delete(
        &self,
        tx: &Transaction<'_>,
        schema: &Schema,
        pk: &[&str],
        row: &Row,
        change: &Change,
    ) -> Result<(), SinkError> {
        let key = self.key_values(pk, row, change)?;
        let mut stmt =
            tx.prepare_cached(&self.sql.delete_row(schema, pk)).map_err(|e| classify(e, &self.path))?;
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
        sql_table::key_values(pk, row, change).map_err(|m| self.rejected(m))
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
                if let Some(before) = sql_table::moved_from(pk, change).map_err(|m| self.rejected(m))? {
                    self.delete(tx, schema, pk, &before, change)?;
                }
                self.key_values(pk, &change.value, change)?;
                let sql = self.sql.upsert(schema, pk, &change.value.keys().collect::<Vec<_>>(), generation);
                self.upsert(tx, &sql, change.value.values(), generation)
            }
            Operation::Delete => self.delete(tx, schema, pk, &change.value, change),
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
        let columns: Vec<&str> = schema.0.keys().map(|c| &**c).collect();
        let insert_sql = self.sql.upsert(schema, &pk, &columns, generation);
        for change in &batch.changes {
            self.write_change(&tx, schema, &pk, &insert_sql, change, generation)?;
        }
        if batch.sweep {
            tx.execute(&self.sql.sweep(), [generation]).map_err(|e| classify(e, &self.path))?;
        }
        tx.execute(&self.sql.store_checkpoint(), [&self.pipeline, &batch.checkpoint.to_json()])
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
            .query_row(&self.sql.read_checkpoint(), [&self.pipeline], |r| r.get(0))
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
            tx.execute_batch(&self.sql.delete_all()).map_err(|e| classify(e, &self.path))?;
        }
        if Self::exists(&tx, CHECKPOINT_TABLE).map_err(|e| classify(e, &self.path))? {
            tx.execute(&self.sql.delete_checkpoint(), [&self.pipeline])
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

    async fn check_rows(&self, schema: &Schema) -> Result<(), SinkError> {
        blocking(|| self.check_rows_blocking(schema))
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
