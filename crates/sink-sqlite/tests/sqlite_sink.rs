//! Integration tests against real SQLite database files, each in its own temporary
//! directory.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rusqlite::Connection;
use rusqlite::types::{Value as Sql, ValueRef};
use shapesync_core::{Change, ErrorCode, ShapeInfo, Sink, SinkConfig, SinkContext, SinkErrorKind, Value};
use shapesync_sink_sqlite::{CHECKPOINT_TABLE, GENERATION_COLUMN, SqliteSink, SqliteSinkConfig};
use shapesync_testkit::fixtures::{batch, checkpoint, item, items_schema, live, row, schema};
use shapesync_testkit::table_sink::{TableSinkUnderTest, check_table_sink};

fn sink_at(path: &Path, table: &str, pipeline: &str) -> SqliteSink {
    let ctx = SinkContext {
        pipeline: pipeline.into(),
        shape: ShapeInfo { table: table.into(), ..Default::default() },
    };
    SqliteSink::new(SqliteSinkConfig::new(path), ctx)
}

/// Every row of `table` with every column (the generation included), as SQLite holds
/// them, ordered by rowid-independent primary key text.
fn dump(path: &Path, table: &str) -> Vec<Vec<(String, Sql)>> {
    let conn = Connection::open(path).unwrap();
    let quoted = format!("\"{}\"", table.replace('"', "\"\""));
    let mut stmt = conn.prepare(&format!("SELECT * FROM {quoted} ORDER BY 1")).unwrap();
    let names: Vec<String> = stmt.column_names().into_iter().map(str::to_owned).collect();
    stmt.query_map([], |r| (0..names.len()).map(|i| Ok((names[i].clone(), r.get::<_, Sql>(i)?))).collect())
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

fn column<'a>(row: &'a [(String, Sql)], name: &str) -> &'a Sql {
    &row.iter().find(|(n, _)| n == name).unwrap_or_else(|| panic!("no column {name}")).1
}

/// A database file, read and written by connections of the test's own.
struct SqliteFile {
    path: PathBuf,
}

#[shapesync_core::async_trait]
impl TableSinkUnderTest for SqliteFile {
    async fn open(&self, pipeline: &str, shape: ShapeInfo) -> Arc<dyn Sink> {
        Arc::new(SqliteSink::new(
            SqliteSinkConfig::new(&self.path),
            SinkContext { pipeline: pipeline.into(), shape },
        ))
    }

    fn table(&self, table: &str) -> String {
        shapesync_sql_table::quote(table)
    }

    async fn execute(&self, sql: &str) -> Result<(), String> {
        Connection::open(&self.path).unwrap().execute_batch(sql).map_err(|e| e.to_string())
    }

    async fn query(&self, sql: &str) -> Vec<Vec<Option<String>>> {
        let conn = Connection::open(&self.path).unwrap();
        let mut stmt = conn.prepare(sql).unwrap();
        let width = stmt.column_count();
        let text = |v: ValueRef<'_>| match v {
            ValueRef::Null => None,
            other => Some(other.as_str().expect("the suite casts to text").to_owned()),
        };
        stmt.query_map([], |r| (0..width).map(|i| Ok(text(r.get_ref(i)?))).collect())
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_sink_passes_the_table_sink_suite() {
    let dir = tempfile::tempdir().unwrap();
    check_table_sink(Arc::new(SqliteFile { path: dir.path().join("suite.db") })).await;
}

#[tokio::test]
async fn every_type_is_stored_exactly_with_the_declared_affinity() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("types.db");
    let sink = sink_at(&path, "public.things", "types");
    let schema = schema(
        r#"{"id":{"type":"int8","pk_index":0,"not_null":true},"flag":{"type":"bool"},"ratio":{"type":"float8"},
            "nan":{"type":"float8"},"inf":{"type":"float4"},"price":{"type":"numeric"},"doc":{"type":"jsonb"},
            "tags":{"type":"text","dims":1},"uid":{"type":"uuid"},"gone":{"type":"text"}}"#,
    );
    const BIG: i64 = 9_007_199_254_740_993;
    let values = row(&[
        ("id", Value::Int(BIG)),
        ("flag", Value::Bool(true)),
        ("ratio", Value::Float(0.1)),
        ("nan", Value::Float(f64::NAN)),
        ("inf", Value::Float(f64::NEG_INFINITY)),
        ("price", Value::Numeric("12345678901234567890.123456789".into())),
        ("doc", Value::Json(r#"{"n": 9007199254740993, "x": [1.10]}"#.into())),
        ("tags", Value::Array(vec![Value::Text("a".into()), Value::Null, Value::Text("c,d".into())])),
        ("uid", Value::Text("5f0c7d8e-3f6a-4a8b-9d7e-2b1c0a9f8e7d".into())),
        ("gone", Value::Null),
    ]);
    sink.apply(&batch(vec![Change::insert("k", values)], checkpoint(schema, "0_inf", 7))).await.unwrap();

    let rows = dump(&path, "things");
    assert_eq!(rows.len(), 1);
    let r = &rows[0];
    assert_eq!(column(r, "id"), &Sql::Integer(BIG));
    assert_eq!(column(r, "flag"), &Sql::Integer(1));
    assert_eq!(column(r, "ratio"), &Sql::Real(0.1));
    assert_eq!(column(r, "nan"), &Sql::Text("NaN".into()));
    assert_eq!(column(r, "inf"), &Sql::Real(f64::NEG_INFINITY));
    assert_eq!(column(r, "price"), &Sql::Text("12345678901234567890.123456789".into()));
    assert_eq!(column(r, "doc"), &Sql::Text(r#"{"n": 9007199254740993, "x": [1.10]}"#.into()));
    assert_eq!(column(r, "tags"), &Sql::Text(r#"["a",null,"c,d"]"#.into()));
    assert_eq!(column(r, "uid"), &Sql::Text("5f0c7d8e-3f6a-4a8b-9d7e-2b1c0a9f8e7d".into()));
    assert_eq!(column(r, "gone"), &Sql::Null);
    assert_eq!(column(r, GENERATION_COLUMN), &Sql::Integer(7));

    let conn = Connection::open(&path).unwrap();
    let declared: Vec<(String, String)> = conn
        .prepare("SELECT name, type FROM pragma_table_info('things') ORDER BY cid")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let declared_of = |c: &str| declared.iter().find(|(n, _)| n == c).unwrap().1.clone();
    assert_eq!(declared_of("id"), "INTEGER");
    assert_eq!(declared_of("flag"), "INTEGER");
    assert_eq!(declared_of("ratio"), "REAL");
    assert_eq!(declared_of("price"), "TEXT", "numeric stays exact text");
    assert_eq!(declared_of("tags"), "TEXT");
    let mode: String = conn.query_row("PRAGMA journal_mode", [], |r| r.get(0)).unwrap();
    assert_eq!(mode, "wal");
}

#[tokio::test]
async fn a_locked_database_is_unavailable_and_the_retry_succeeds_once_released() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("locked.db");
    let ctx = SinkContext {
        pipeline: "locked".into(),
        shape: ShapeInfo { table: "items".into(), ..Default::default() },
    };
    let mut config = SqliteSinkConfig::new(&path);
    config.busy_timeout_ms = 20;
    let sink = SqliteSink::new(config, ctx);
    let b = batch(vec![Change::insert("k1", item(1, "a"))], checkpoint(items_schema(), "0_inf", 1));
    sink.apply(&b).await.unwrap();

    let holder = Connection::open(&path).unwrap();
    holder.execute_batch("BEGIN IMMEDIATE").unwrap();
    let next =
        batch(vec![live(Change::insert("k2", item(2, "b")), 4, 0)], checkpoint(items_schema(), "4_0", 1));
    let locked = sink.apply(&next).await.unwrap_err();
    assert_eq!(locked.kind(), SinkErrorKind::Unavailable, "{locked}");
    // SQLITE_BUSY (5), with the driver's error as the source.
    assert_eq!(locked.code(), Some(&ErrorCode::Sqlite(5)), "{locked:?}");
    assert!(std::error::Error::source(&locked).is_some_and(|s| s.is::<rusqlite::Error>()), "{locked:?}");
    holder.execute_batch("ROLLBACK").unwrap();
    sink.apply(&next).await.unwrap();
    assert_eq!(dump(&path, "items").len(), 2);
    assert_eq!(sink.checkpoint().await.unwrap(), Some(next.checkpoint));
}

#[tokio::test]
async fn unusable_files_and_settings_are_reported_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let missing_dir = dir.path().join("no/such/dir/cache.db");
    let sink = sink_at(&missing_dir, "items", "missing");
    let err = sink.checkpoint().await.unwrap_err();
    assert!(
        matches!(&err, e if e.kind() == SinkErrorKind::Rejected && e.message().contains("does not exist")),
        "{err}"
    );
    let err = sink
        .apply(&batch(vec![Change::insert("k1", item(1, "a"))], checkpoint(items_schema(), "0_inf", 1)))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, e if e.kind() == SinkErrorKind::Rejected && e.message().contains("directory exists")),
        "{err}"
    );
    assert_eq!(err.code(), Some(&ErrorCode::Sqlite(14)), "SQLITE_CANTOPEN: {err:?}");

    let ctx = SinkContext {
        pipeline: "p".into(),
        shape: ShapeInfo { table: "items".into(), ..Default::default() },
    };
    for (config, key) in [
        (SqliteSinkConfig::new(":memory:"), "path"),
        (SqliteSinkConfig { table: Some(CHECKPOINT_TABLE.into()), ..SqliteSinkConfig::new("x.db") }, "table"),
        (SqliteSinkConfig { busy_timeout_ms: 0, ..SqliteSinkConfig::new("x.db") }, "busy_timeout_ms"),
    ] {
        assert_eq!(config.check(&ctx).unwrap_err().key, key);
    }
}

#[tokio::test]
async fn reading_the_checkpoint_writes_nothing_to_an_existing_database() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("app.db");
    assert_eq!(sink_at(&path, "items", "reader").checkpoint().await.unwrap(), None);
    assert!(!path.exists(), "reading a checkpoint creates no file");
    Connection::open(&path).unwrap().execute_batch("CREATE TABLE app_data (x INTEGER)").unwrap();
    let sink = sink_at(&path, "items", "reader");
    assert_eq!(sink.checkpoint().await.unwrap(), None);
    let tables: Vec<String> = Connection::open(&path)
        .unwrap()
        .prepare("SELECT name FROM sqlite_schema WHERE type = 'table'")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(tables, ["app_data"], "validate --connect and checkpoints only read");
    sink.reset().await.unwrap();
    assert_eq!(sink.checkpoint().await.unwrap(), None);
}
