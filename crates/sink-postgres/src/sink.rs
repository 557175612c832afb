//! The Postgres sink: each batch, its sweep and its checkpoint in one Postgres transaction.

use std::sync::Mutex;

use shapesync_core::{
    Acquisition, Batch, Change, Checkpoint, ErrorCode, Fence, LeaseInfo, LeaseRequest, Operation, Row,
    Schema, Sink, SinkContext, SinkError, SinkErrorKind, Value, async_trait,
};
use shapesync_sql_table::{self as sql_table, LeaseSql, TableSql};
use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::{AssertSqlSafe, Postgres, Row as _, Transaction};

use crate::config::PostgresSinkConfig;
use crate::dialect::PostgresDialect;

/// Rows per upsert statement of a snapshot batch.
const ROWS_PER_STATEMENT: usize = 5_000;

/// A table of a second Postgres database kept exactly in sync with a shape; see the
/// crate docs.
pub struct PostgresSink {
    pub(crate) pool: PgPool,
    pub(crate) schema: String,
    /// The statements over the table and its checkpoints.
    sql: TableSql<PostgresDialect>,
    /// The statements over the lease tables.
    pub(crate) lease_sql: LeaseSql<PostgresDialect>,
    table: String,
    pub(crate) pipeline: String,
    /// The shape schema the table was last brought up to in this process.
    table_schema: Mutex<Option<Schema>>,
    /// The lease tables are known to exist.
    pub(crate) lease_tables_ready: std::sync::atomic::AtomicBool,
}

/// A value of `column` as Postgres' text input for the column's type; `None` for NULL.
fn column_text(schema: &Schema, column: &str, value: &Value) -> Option<String> {
    let delimiter = schema.0.get(column).map_or(b',', |ty| shapesync_core::array_delimiter(&ty.type_name));
    pg_text(value, char::from(delimiter))
}

/// A value as Postgres' text input; arrays separate elements with `delimiter` (`;` for
/// `box[]`, `,` otherwise: `pg_type.typdelim`). `None` for NULL.
fn pg_text(value: &Value, delimiter: char) -> Option<String> {
    match value {
        Value::Null => None,
        Value::Bool(b) => Some(if *b { "t" } else { "f" }.to_owned()),
        Value::Array(items) => {
            let mut out = String::new();
            array_literal(items, delimiter, &mut out);
            Some(out)
        }
        other => other.render().map(|t| t.into_owned()),
    }
}

/// Writes a Postgres array literal: `{"a",NULL,{"b"}}`, every element quoted.
fn array_literal(items: &[Value], delimiter: char, out: &mut String) {
    out.push('{');
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            out.push(delimiter);
        }
        match item {
            Value::Null => out.push_str("NULL"),
            Value::Array(inner) => array_literal(inner, delimiter, out),
            scalar => {
                let text = pg_text(scalar, delimiter).unwrap_or_default();
                out.push('"');
                for c in text.chars() {
                    if c == '"' || c == '\\' {
                        out.push('\\');
                    }
                    out.push(c);
                }
                out.push('"');
            }
        }
    }
    out.push('}');
}

/// JSON text holds the escape `\u0000` (not an escaped backslash followed by `u0000`).
fn escapes_nul(json: &str) -> bool {
    let bytes = json.as_bytes();
    bytes.windows(6).enumerate().any(|(i, w)| {
        w == b"\\u0000" && bytes[..i].iter().rev().take_while(|b| **b == b'\\').count() % 2 == 0
    })
}

/// Maps a Postgres failure to the runner's retry classes. Messages never hold the URL.
/// Postgres' failures are classified by their structure: the `sqlx::Error` variant,
/// the SQLSTATE (kept as the error's [`ErrorCode::Sqlstate`]), and for a TLS handshake
/// the rustls error inside the I/O error; the `sqlx::Error` is the error's source.
pub(crate) fn classify(e: sqlx::Error) -> SinkError {
    let tls_refused =
        matches!(e, sqlx::Error::Tls(_)) || matches!(&e, sqlx::Error::Io(io) if certificate_refused(io));
    let error = match &e {
        // A failed TLS handshake (an unverifiable certificate, a server without TLS under
        // `sslmode=require`): retrying cannot fix it.
        _ if tls_refused => SinkError::rejected(format!(
            "postgres: {e}; check `sslmode` in `url`, and `sslrootcert` for a private CA"
        )),
        sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed => {
            SinkError::unavailable(format!("postgres: {e}"))
        }
        sqlx::Error::Database(db) => {
            let code = db.code().unwrap_or_default().into_owned();
            // SQLSTATE classes (the first two characters) and codes, as Postgres
            // documents them in "PostgreSQL Error Codes".
            let transient = code.starts_with("08") // connection exceptions
                || code.starts_with("53") // insufficient resources
                || code.starts_with("57P") // shutdown, cannot connect now
                || matches!(code.as_str(), "40001" | "40P01" | "55P03");
            let error = if transient {
                SinkError::unavailable(format!("postgres ({code}): {}", db.message()))
            } else if code.starts_with("28") {
                SinkError::rejected(format!(
                    "postgres refused the login ({code}): {}; check the user and password in `url`",
                    db.message()
                ))
            } else {
                SinkError::rejected(format!("postgres refused a statement ({code}): {}", db.message()))
            };
            error.with_code(ErrorCode::Sqlstate(code))
        }
        _ => SinkError::rejected(format!("postgres: {e}")),
    };
    error.with_source(e)
}

/// The SQLSTATE of a failure `classify` made of a Postgres error, if it had one.
pub(crate) fn sqlstate(e: &SinkError) -> Option<&str> {
    match e.code() {
        Some(ErrorCode::Sqlstate(code)) => Some(code),
        _ => None,
    }
}

/// SQLSTATE 42P01: the table does not exist.
pub(crate) const UNDEFINED_TABLE: &str = "42P01";
/// SQLSTATE 3F000: the schema does not exist.
const INVALID_SCHEMA_NAME: &str = "3F000";

/// The TLS handshake failed on the server's certificate (unverifiable, for another
/// host, revoked, or none sent): sqlx returns rustls' error inside an `io::Error`.
#[cfg(feature = "tls")]
fn certificate_refused(io: &std::io::Error) -> bool {
    shapesync_core::find_cause::<rustls::Error>(io).is_some_and(|tls| {
        matches!(
            tls,
            rustls::Error::InvalidCertificate(_)
                | rustls::Error::NoCertificatesPresented
                | rustls::Error::InvalidCertRevocationList(_)
        )
    })
}

/// Without TLS no handshake fails.
#[cfg(not(feature = "tls"))]
fn certificate_refused(_: &std::io::Error) -> bool {
    false
}

/// Runs `sql` with text parameters.
pub(crate) async fn execute(
    tx: &mut Transaction<'static, Postgres>,
    sql: String,
    params: impl IntoIterator<Item = Option<String>>,
) -> Result<(), SinkError> {
    let mut query = sqlx::query(AssertSqlSafe(sql));
    for param in params {
        query = query.bind(param);
    }
    query.execute(&mut **tx).await.map_err(classify)?;
    Ok(())
}

impl PostgresSink {
    /// A sink for `ctx`'s pipeline; connects on first use.
    pub fn new(config: &PostgresSinkConfig, ctx: SinkContext) -> Result<Self, SinkError> {
        let options =
            config.connect_options().map_err(|e| SinkError::rejected(e.to_string()).with_source(e))?;
        let pool = PgPoolOptions::new()
            .max_connections(2)
            .acquire_timeout(config.connect_timeout())
            .connect_lazy_with(options);
        let table = config.table_name(&ctx.shape.table);
        Ok(PostgresSink {
            pool,
            sql: TableSql::new(PostgresDialect, Some(&config.schema), &table),
            lease_sql: LeaseSql::new(PostgresDialect, Some(&config.schema)),
            schema: config.schema.clone(),
            table,
            pipeline: ctx.pipeline,
            table_schema: Mutex::new(None),
            lease_tables_ready: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// The table holding the shape's rows, schema-qualified and quoted.
    pub fn qualified_table(&self) -> String {
        self.sql.table().to_owned()
    }

    fn rejected(&self, message: String) -> SinkError {
        SinkError::rejected(format!("postgres table {}: {message}", self.qualified_table()))
    }

    /// The table's columns with their position in the primary key (0: not in it);
    /// empty when the table does not exist.
    async fn table_columns(
        &self,
        tx: &mut Transaction<'static, Postgres>,
    ) -> Result<Vec<(String, i64)>, SinkError> {
        let rows = sqlx::query(
            "SELECT c.column_name::text, coalesce(k.ordinal_position, 0)::int8
             FROM information_schema.columns c
             LEFT JOIN information_schema.table_constraints t
               ON t.table_schema = c.table_schema AND t.table_name = c.table_name
              AND t.constraint_type = 'PRIMARY KEY'
             LEFT JOIN information_schema.key_column_usage k
               ON k.constraint_schema = t.constraint_schema AND k.constraint_name = t.constraint_name
              AND k.column_name = c.column_name
             WHERE c.table_schema = $1 AND c.table_name = $2",
        )
        .bind(&self.schema)
        .bind(&self.table)
        .fetch_all(&mut **tx)
        .await
        .map_err(classify)?;
        rows.iter().map(|r| Ok((r.try_get(0).map_err(classify)?, r.try_get(1).map_err(classify)?))).collect()
    }

    /// Creates the table (and the checkpoints table) for `schema`, or brings an
    /// existing one up to it: new columns are added; a primary key that differs is an
    /// error.
    async fn ensure_table(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        schema: &Schema,
    ) -> Result<(), SinkError> {
        self.lock_ddl(tx).await?;
        let existing = self.table_columns(tx).await?;
        let plan = sql_table::plan_table(schema, &existing).map_err(|m| self.rejected(m))?;
        execute(tx, self.sql.create_checkpoints(), []).await.map_err(|e| self.schema_hint(e))?;
        for sql in self.sql.prepare_table(schema, &plan) {
            execute(tx, sql, []).await?;
        }
        Ok(())
    }

    /// Serialises creating and altering tables in the sink's schema until the end of the
    /// transaction: `CREATE TABLE IF NOT EXISTS` run by two sessions at once fails in
    /// one of them (23505 on `pg_type`), which happens when instances or pipelines start
    /// together on a fresh schema.
    pub(crate) async fn lock_ddl(&self, tx: &mut Transaction<'static, Postgres>) -> Result<(), SinkError> {
        sqlx::query("SELECT pg_advisory_xact_lock(hashtext('shapesync ddl ' || $1))")
            .bind(&self.schema)
            .execute(&mut **tx)
            .await
            .map_err(classify)?;
        Ok(())
    }

    /// A missing schema gets advice instead of Postgres' bare message.
    pub(crate) fn schema_hint(&self, e: SinkError) -> SinkError {
        if e.kind() == SinkErrorKind::Rejected && sqlstate(&e) == Some(INVALID_SCHEMA_NAME) {
            let message = format!(
                "{}; create the schema `{}` (CREATE SCHEMA) or set the sink's `schema`",
                e.message(),
                self.schema
            );
            e.with_message(message)
        } else {
            e
        }
    }

    /// Runs an upsert from [`TableSql::upsert`] with each column's values (one `text[]` each).
    async fn upsert(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        sql: String,
        columns: Vec<Vec<Option<String>>>,
    ) -> Result<(), SinkError> {
        let mut query = sqlx::query(AssertSqlSafe(sql));
        for values in columns {
            query = query.bind(values);
        }
        query.execute(&mut **tx).await.map_err(classify)?;
        Ok(())
    }

    /// Refuses, naming the row and column, a value Postgres cannot store: a NUL character
    /// (in any text), or `\u0000` in a `jsonb` column. Postgres itself never sends one,
    /// so a server that does is broken or hostile; Postgres' own error (22021, 22P05)
    /// would not say which row.
    fn storable(&self, schema: &Schema, change: &Change) -> Result<(), SinkError> {
        fn has_nul(value: &Value, jsonb: bool) -> bool {
            match value {
                Value::Text(t) | Value::Numeric(t) => t.contains('\0'),
                Value::Json(t) => t.contains('\0') || (jsonb && escapes_nul(t)),
                Value::Array(items) => items.iter().any(|v| has_nul(v, jsonb)),
                _ => false,
            }
        }
        for (column, value) in &change.value {
            let jsonb = schema.0.get(column).is_some_and(|ty| ty.type_name == "jsonb");
            if has_nul(value, jsonb) {
                return Err(self.rejected(format!(
                    "row {} holds a NUL character (\\u0000) in column `{column}`, which Postgres cannot store{}; the source sent a value no Postgres table holds, so check the server behind `url`",
                    change.key,
                    if jsonb { " in jsonb" } else { "" }
                )));
            }
        }
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

    async fn delete(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        schema: &Schema,
        pk: &[&str],
        row: &Row,
        change: &Change,
    ) -> Result<(), SinkError> {
        let key = self.key_values(pk, row, change)?;
        let sql = self.sql.delete_row(schema, pk);
        let texts: Vec<Option<String>> =
            pk.iter().zip(&key).map(|(c, v)| column_text(schema, c, v)).collect();
        execute(tx, sql, texts).await?;
        Ok(())
    }

    /// Writes the inserts of a snapshot batch, many rows per statement.
    async fn insert_snapshot(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        schema: &Schema,
        pk: &[&str],
        changes: &[Change],
        generation: i64,
    ) -> Result<(), SinkError> {
        let columns: Vec<&str> = schema.0.keys().map(|c| &**c).collect();
        let sql = self.sql.upsert(schema, pk, &columns, generation);
        for part in changes.chunks(ROWS_PER_STATEMENT) {
            let mut values = vec![Vec::with_capacity(part.len()); columns.len()];
            for change in part {
                self.key_values(pk, &change.value, change)?;
                self.storable(schema, change)?;
                for (column, values) in columns.iter().zip(&mut values) {
                    values.push(change.value.get(column).and_then(|v| column_text(schema, column, v)));
                }
            }
            self.upsert(tx, sql.clone(), values).await?;
        }
        Ok(())
    }

    async fn write_change(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        schema: &Schema,
        pk: &[&str],
        change: &Change,
        generation: i64,
    ) -> Result<(), SinkError> {
        match change.op {
            Operation::Insert => {
                self.insert_snapshot(tx, schema, pk, std::slice::from_ref(change), generation).await
            }
            Operation::Update => {
                // Under `replica: full` an update may change the key: the row moves.
                if let Some(before) = sql_table::moved_from(pk, change).map_err(|m| self.rejected(m))? {
                    self.delete(tx, schema, pk, &before, change).await?;
                }
                self.key_values(pk, &change.value, change)?;
                self.storable(schema, change)?;
                let columns: Vec<&str> = change.value.keys().collect();
                let sql = self.sql.upsert(schema, pk, &columns, generation);
                let values = change.value.iter().map(|(c, v)| vec![column_text(schema, c, v)]).collect();
                self.upsert(tx, sql, values).await
            }
            Operation::Delete => self.delete(tx, schema, pk, &change.value, change).await,
        }
    }

    async fn apply_in(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        batch: &Batch,
    ) -> Result<(), SinkError> {
        if let Some(fence) = &batch.fence
            && !self.check_fence(tx, fence).await?
        {
            return Ok(()); // committed by an attempt whose answer was lost
        }
        let schema = batch.schema();
        let known = self.table_schema.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if known.as_ref() != Some(schema) {
            self.ensure_table(tx, schema).await?;
        }
        let pk = schema.primary_key();
        let generation = i64::try_from(batch.checkpoint.generation).unwrap_or(i64::MAX);
        // A snapshot batch holds each row once: its inserts go many per statement. Any
        // other batch is applied change by change, in order.
        let snapshot = batch.is_snapshot();
        if snapshot {
            self.insert_snapshot(tx, schema, &pk, &batch.changes, generation).await?;
        } else {
            for change in &batch.changes {
                self.write_change(tx, schema, &pk, change, generation).await?;
            }
        }
        if batch.sweep {
            execute(tx, self.sql.sweep(), [Some(generation.to_string())]).await?;
        }
        execute(
            tx,
            self.sql.store_checkpoint(),
            [Some(self.pipeline.clone()), Some(batch.checkpoint.to_json())],
        )
        .await?;
        if let Some(fence) = &batch.fence {
            self.count_commit(tx, fence).await?;
        }
        Ok(())
    }
}

#[async_trait]
impl Sink for PostgresSink {
    /// The sink's schema exists and an existing table can hold rows of `schema`;
    /// reads only.
    async fn check_rows(&self, schema: &Schema) -> Result<(), SinkError> {
        let exists: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM information_schema.schemata WHERE schema_name = $1)",
        )
        .bind(&self.schema)
        .fetch_one(&self.pool)
        .await
        .map_err(classify)?;
        if !exists {
            return Err(SinkError::rejected(format!(
                "schema `{}` does not exist in the target database; create it (CREATE SCHEMA) or set the sink's `schema`",
                self.schema
            )));
        }
        let mut tx = self.pool.begin().await.map_err(classify)?;
        let existing = self.table_columns(&mut tx).await?;
        tx.rollback().await.map_err(classify)?;
        sql_table::plan_table(schema, &existing).map_err(|m| self.rejected(m))?;
        Ok(())
    }

    async fn checkpoint(&self) -> Result<Option<Checkpoint>, SinkError> {
        let stored = match sqlx::query_scalar::<_, String>(AssertSqlSafe(self.sql.read_checkpoint()))
            .bind(&self.pipeline)
            .fetch_optional(&self.pool)
            .await
        {
            Ok(stored) => stored,
            // No checkpoints table yet: nothing was ever written.
            Err(sqlx::Error::Database(db)) if db.code().as_deref() == Some(UNDEFINED_TABLE) => None,
            Err(e) => return Err(classify(e)),
        };
        stored.map(|json| Checkpoint::from_json(&json)).transpose().map_err(|e| {
            SinkError::corrupt_checkpoint(format!(
                "pipeline `{}` in {}: {e}",
                self.pipeline,
                self.sql.checkpoints()
            ))
            .with_source(e)
        })
    }

    async fn apply(&self, batch: &Batch) -> Result<(), SinkError> {
        let mut tx = self.pool.begin().await.map_err(classify)?;
        match self.apply_in(&mut tx, batch).await {
            Ok(()) => {
                tx.commit().await.map_err(classify)?;
                *self.table_schema.lock().unwrap_or_else(|e| e.into_inner()) = Some(batch.schema().clone());
                Ok(())
            }
            Err(e) => {
                // Dropping the transaction rolls it back; the next attempt re-checks the table.
                *self.table_schema.lock().unwrap_or_else(|e| e.into_inner()) = None;
                Err(e)
            }
        }
    }

    async fn reset(&self) -> Result<(), SinkError> {
        let mut tx = self.pool.begin().await.map_err(classify)?;
        self.take_for_reset(&mut tx).await?;
        if !self.table_columns(&mut tx).await?.is_empty() {
            execute(&mut tx, self.sql.delete_all(), []).await?;
        }
        match execute(&mut tx, self.sql.delete_checkpoint(), [Some(self.pipeline.clone())]).await {
            Ok(()) => {}
            Err(e) if sqlstate(&e) == Some(UNDEFINED_TABLE) => {} // never written
            Err(e) => return Err(e),
        }
        tx.commit().await.map_err(classify)?;
        *self.table_schema.lock().unwrap_or_else(|e| e.into_inner()) = None;
        Ok(())
    }

    fn keeps_leases(&self) -> bool {
        true
    }

    async fn acquire(&self, request: &LeaseRequest) -> Result<Acquisition, SinkError> {
        self.acquire_tracked(request).await
    }

    async fn renew(&self, fence: &Fence) -> Result<LeaseInfo, SinkError> {
        self.renew_lease(fence).await
    }

    async fn release(&self, fence: &Fence) -> Result<(), SinkError> {
        self.release_lease(fence).await
    }

    async fn lease(&self) -> Result<Option<LeaseInfo>, SinkError> {
        self.read_lease().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(feature = "tls")]
    #[test]
    fn a_refused_certificate_is_recognised_by_its_rustls_error_not_its_words() {
        use rustls::{CertificateError, Error as TlsError};
        // sqlx hands rustls' handshake error back inside an `io::Error`.
        let io = |tls: TlsError| sqlx::Error::Io(std::io::Error::new(std::io::ErrorKind::InvalidData, tls));
        let refused = classify(io(TlsError::InvalidCertificate(CertificateError::UnknownIssuer)));
        assert_eq!(refused.kind(), SinkErrorKind::Rejected, "{refused}");
        assert!(refused.message().contains("sslrootcert"), "{refused}");
        assert!(std::error::Error::source(&refused).is_some_and(|s| s.is::<sqlx::Error>()));
        let other = classify(io(TlsError::DecryptError));
        assert_eq!(other.kind(), SinkErrorKind::Unavailable, "{other}");
        let words = sqlx::Error::Io(std::io::Error::new(std::io::ErrorKind::ConnectionReset, "certificate"));
        assert_eq!(classify(words).kind(), SinkErrorKind::Unavailable);
    }

    #[test]
    fn pool_timeouts_are_unavailable_with_the_driver_error_as_source() {
        let e = classify(sqlx::Error::PoolTimedOut);
        assert_eq!(e.kind(), SinkErrorKind::Unavailable);
        assert_eq!(e.code(), None);
        assert!(std::error::Error::source(&e).is_some_and(|s| s.is::<sqlx::Error>()));
    }

    #[test]
    fn arrays_become_postgres_array_literals_with_every_element_quoted() {
        let v = Value::Array(vec![
            Value::Text("a \"q\" \\ b".into()),
            Value::Null,
            Value::Array(vec![Value::Int(1), Value::Bool(false)]),
        ]);
        assert_eq!(pg_text(&v, ',').unwrap(), r#"{"a \"q\" \\ b",NULL,{"1","f"}}"#);
        let boxes = Value::Array(vec![Value::Text("(3,4),(1,2)".into()), Value::Text("(7,8),(5,6)".into())]);
        assert_eq!(pg_text(&boxes, ';').unwrap(), r#"{"(3,4),(1,2)";"(7,8),(5,6)"}"#, "box[] uses `;`");
    }

    #[test]
    fn only_a_real_nul_escape_counts() {
        assert!(escapes_nul(r#"{"a":"x\u0000y"}"#));
        assert!(!escapes_nul(r#"{"a":"x\\u0000y"}"#), "an escaped backslash, then text");
        assert!(escapes_nul(r#"{"a":"x\\\u0000y"}"#));
        assert!(!escapes_nul(r#"{"a":"u0000"}"#));
    }
}
