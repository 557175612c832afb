//! Integration tests against the real Postgres at 127.0.0.1:5432 (database `test`). Each
//! test owns a schema of its own, dropped at the end.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use shapesync_core::{Change, ErrorCode, ShapeInfo, Sink, SinkConfig, SinkContext, SinkErrorKind, Value};
use shapesync_sink_postgres::{CHECKPOINT_TABLE, GENERATION_COLUMN, PostgresSink, PostgresSinkConfig};
use shapesync_testkit::compliance::{SinkUnderTest, StoredRows, check_sink};
use shapesync_testkit::fixtures::{batch, checkpoint, item, items_schema, live, row, schema};
use sqlx::postgres::PgPool;
use sqlx::{AssertSqlSafe, Row as _};

const URL: &str = "postgres://postgres@127.0.0.1:5432/test";

/// A schema of the test's own in the shared database.
struct TestSchema {
    pool: PgPool,
    name: String,
}

impl TestSchema {
    async fn new(test: &str) -> TestSchema {
        let pool = PgPool::connect(URL).await.expect("local Postgres on 5432, database `test`");
        let name = format!("shapesync_t_{}_{test}", std::process::id());
        let sql = format!("DROP SCHEMA IF EXISTS \"{name}\" CASCADE; CREATE SCHEMA \"{name}\"");
        sqlx::raw_sql(AssertSqlSafe(sql)).execute(&pool).await.unwrap();
        TestSchema { pool, name }
    }

    fn config(&self) -> PostgresSinkConfig {
        PostgresSinkConfig { schema: self.name.clone(), ..PostgresSinkConfig::new(URL) }
    }

    fn sink(&self, table: &str, pipeline: &str) -> PostgresSink {
        let ctx = SinkContext {
            pipeline: pipeline.into(),
            shape: ShapeInfo { table: table.into(), ..Default::default() },
        };
        PostgresSink::new(&self.config(), ctx).unwrap()
    }

    /// Every row of `table` as Postgres prints it, ordered by its first column.
    async fn dump(&self, table: &str) -> Vec<String> {
        let sql =
            format!("SELECT t::text FROM \"{}\".\"{}\" t ORDER BY 1", self.name, table.replace('"', "\"\""));
        sqlx::query_scalar(AssertSqlSafe(sql)).fetch_all(&self.pool).await.unwrap()
    }

    /// Column `column` of each row as text (NULL as `None`), ordered by `id`.
    async fn column(&self, table: &str, column: &str) -> Vec<Option<String>> {
        let sql = format!("SELECT \"{column}\"::text FROM \"{}\".\"{table}\" ORDER BY id", self.name);
        sqlx::query_scalar(AssertSqlSafe(sql)).fetch_all(&self.pool).await.unwrap()
    }

    async fn drop(self) {
        let sql = format!("DROP SCHEMA \"{}\" CASCADE", self.name);
        sqlx::raw_sql(AssertSqlSafe(sql)).execute(&self.pool).await.unwrap();
    }
}

struct PostgresUnderTest {
    schema: TestSchema,
}

#[shapesync_core::async_trait]
impl SinkUnderTest for PostgresUnderTest {
    async fn open(&self) -> Arc<dyn Sink> {
        let ctx = SinkContext {
            pipeline: "compliance".into(),
            shape: ShapeInfo { table: "public.items".into(), ..Default::default() },
        };
        self.schema.config().build(ctx).await.expect("postgres sink")
    }

    async fn rows(&self) -> StoredRows {
        let sql = format!(
            "SELECT (to_jsonb(t) - '{GENERATION_COLUMN}')::text FROM \"{}\".items t",
            self.schema.name
        );
        let exists: Option<String> = sqlx::query_scalar(AssertSqlSafe(format!(
            "SELECT to_regclass('\"{}\".items')::text",
            self.schema.name
        )))
        .fetch_one(&self.schema.pool)
        .await
        .unwrap();
        if exists.is_none() {
            return StoredRows::new();
        }
        let rows: Vec<String> =
            sqlx::query_scalar(AssertSqlSafe(sql)).fetch_all(&self.schema.pool).await.unwrap();
        rows.iter()
            .map(|r| {
                let columns =
                    shapesync_testkit::compliance::columns_from_json(&serde_json::from_str(r).unwrap());
                (columns["id"].clone(), columns)
            })
            .collect()
    }

    async fn lose_state(&self) -> bool {
        // A database restored empty: every table of the schema is gone.
        let name = &self.schema.name;
        let sql = format!("DROP SCHEMA \"{name}\" CASCADE; CREATE SCHEMA \"{name}\"");
        sqlx::raw_sql(AssertSqlSafe(sql)).execute(&self.schema.pool).await.unwrap();
        true
    }
}

#[tokio::test]
async fn postgres_sink_passes_the_compliance_suite() {
    let target = PostgresUnderTest { schema: TestSchema::new("compliance").await };
    check_sink(&target).await;
    target.schema.drop().await;
}

#[tokio::test]
async fn every_type_is_stored_exactly_in_a_column_of_its_type() {
    let db = TestSchema::new("types").await;
    let sink = db.sink("public.things", "types");
    let schema = schema(
        r#"{"id":{"type":"int8","pk_index":0,"not_null":true},"flag":{"type":"bool"},"ratio":{"type":"float8"},
            "nan":{"type":"float8"},"inf":{"type":"float4"},"price":{"type":"numeric","precision":30,"scale":9},
            "doc":{"type":"jsonb"},"tags":{"type":"text","dims":1},"uid":{"type":"uuid"},
            "at":{"type":"timestamptz"},"mood":{"type":"mood"},"gone":{"type":"text"}}"#,
    );
    const BIG: i64 = 9_007_199_254_740_993;
    let values = row(&[
        ("id", Value::Int(BIG)),
        ("flag", Value::Bool(true)),
        ("ratio", Value::Float(0.1)),
        ("nan", Value::Float(f64::NAN)),
        ("inf", Value::Float(f64::NEG_INFINITY)),
        ("price", Value::Numeric("12345678901234567890.123456789".into())),
        ("doc", Value::Json(r#"{"n": 9007199254740993}"#.into())),
        ("tags", Value::Array(vec![Value::Text("a \"b\"".into()), Value::Null, Value::Text("c,d".into())])),
        ("uid", Value::Text("5f0c7d8e-3f6a-4a8b-9d7e-2b1c0a9f8e7d".into())),
        ("at", Value::Text("2026-11-26 10:00:00+00".into())),
        ("mood", Value::Text("happy".into())),
        ("gone", Value::Null),
    ]);
    sink.apply(&batch(vec![Change::insert("k", values)], checkpoint(schema, "0_inf", 7))).await.unwrap();

    let sql = format!(
        "SELECT id, flag, ratio, nan::text, inf::text, price::text, doc->>'n', tags, uid::text, at = '2026-11-26T10:00:00Z'::timestamptz, mood, gone, \"{GENERATION_COLUMN}\" FROM \"{}\".things",
        db.name
    );
    let r = sqlx::query(AssertSqlSafe(sql)).fetch_one(&db.pool).await.unwrap();
    assert_eq!(r.get::<i64, _>(0), BIG);
    assert!(r.get::<bool, _>(1));
    assert_eq!(r.get::<f64, _>(2), 0.1);
    assert_eq!(r.get::<String, _>(3), "NaN");
    assert_eq!(r.get::<String, _>(4), "-Infinity");
    assert_eq!(r.get::<String, _>(5), "12345678901234567890.123456789");
    assert_eq!(r.get::<String, _>(6), "9007199254740993", "jsonb keeps the big integer");
    assert_eq!(r.get::<Vec<Option<String>>, _>(7), vec![Some("a \"b\"".into()), None, Some("c,d".into())]);
    assert_eq!(r.get::<String, _>(8), "5f0c7d8e-3f6a-4a8b-9d7e-2b1c0a9f8e7d");
    assert!(r.get::<bool, _>(9));
    assert_eq!(r.get::<String, _>(10), "happy", "a type the target may lack is text");
    assert_eq!(r.get::<Option<String>, _>(11), None);
    assert_eq!(r.get::<i64, _>(12), 7);

    let sql = format!(
        "SELECT column_name::text || ':' || udt_name::text FROM information_schema.columns WHERE table_schema = '{}' AND table_name = 'things' ORDER BY 1",
        db.name
    );
    let types: Vec<String> = sqlx::query_scalar(AssertSqlSafe(sql)).fetch_all(&db.pool).await.unwrap();
    for want in
        ["id:int8", "price:numeric", "doc:jsonb", "tags:_text", "uid:uuid", "at:timestamptz", "mood:text"]
    {
        assert!(types.iter().any(|t| t == want), "{want} in {types:?}");
    }
    db.drop().await;
}

#[tokio::test]
async fn replaying_committed_batches_leaves_the_table_and_checkpoint_identical() {
    let db = TestSchema::new("replay").await;
    let sink = db.sink("items", "replay");
    let snapshot = batch(
        (1..=3).map(|i| Change::insert(format!("k{i}"), item(i, "a"))).collect(),
        checkpoint(items_schema(), "0_inf", 1),
    );
    let tx = batch(
        vec![
            live(
                Change::update("k1", row(&[("id", Value::Int(1)), ("note", Value::Text("n".into()))])),
                5,
                0,
            ),
            live(Change::delete("k2", row(&[("id", Value::Int(2))])), 5, 2),
            live(Change::insert("k4", item(4, "d")), 5, 4),
            live(
                Change::update("k4", row(&[("id", Value::Int(4)), ("name", Value::Text("d2".into()))])),
                5,
                6,
            ),
        ],
        checkpoint(items_schema(), "5_6", 1),
    );
    sink.apply(&snapshot).await.unwrap();
    sink.apply(&tx).await.unwrap();
    let before = (db.dump("items").await, sink.checkpoint().await.unwrap());
    sink.apply(&tx).await.unwrap();
    assert_eq!((db.dump("items").await, sink.checkpoint().await.unwrap()), before);
    assert_eq!(db.sink("items", "replay").checkpoint().await.unwrap(), before.1, "a restart reads it back");
    assert_eq!(db.column("items", "name").await, vec![Some("a".into()), Some("a".into()), Some("d2".into())]);
    assert_eq!(db.column("items", "note").await, vec![Some("n".into()), None, None], "partial update merged");
    db.drop().await;
}

#[tokio::test]
async fn a_batch_that_fails_part_way_leaves_rows_and_checkpoint_as_they_were() {
    let db = TestSchema::new("atomic").await;
    let sink = db.sink("items", "atomic");
    let first = batch(vec![Change::insert("k1", item(1, "a"))], checkpoint(items_schema(), "0_inf", 1));
    sink.apply(&first).await.unwrap();
    let before = db.dump("items").await;
    let broken = batch(
        vec![
            live(Change::insert("k2", item(2, "b")), 9, 0),
            live(Change::update("k3", row(&[("name", Value::Text("x".into()))])), 9, 2),
        ],
        checkpoint(items_schema(), "9_2", 1),
    );
    let err = sink.apply(&broken).await.unwrap_err();
    assert!(
        matches!(&err, e if e.kind() == SinkErrorKind::Rejected && e.message().contains("`id`")),
        "{err}"
    );
    assert_eq!(db.dump("items").await, before, "no row of the failed batch is visible");
    assert_eq!(sink.checkpoint().await.unwrap(), Some(first.checkpoint));
    db.drop().await;
}

#[tokio::test]
async fn hostile_table_and_column_names_stay_identifiers() {
    let db = TestSchema::new("hostile").await;
    let table = r#"it"ems; DROP TABLE x; --"#;
    let sink = db.sink(table, "hostile");
    let hostile_column = r#"na me"); DELETE FROM "_shapesync_checkpoints"; --"#;
    let schema = schema(
        r#"{"id":{"type":"int8","pk_index":0},"na me\"); DELETE FROM \"_shapesync_checkpoints\"; --":{"type":"text"}}"#,
    );
    let r = row(&[("id", Value::Int(1)), (hostile_column, Value::Text("v".into()))]);
    sink.apply(&batch(vec![Change::insert("k", r.clone())], checkpoint(schema.clone(), "0_inf", 1)))
        .await
        .unwrap();
    sink.apply(&batch(vec![live(Change::update("k", r), 3, 0)], checkpoint(schema.clone(), "3_0", 1)))
        .await
        .unwrap();
    assert_eq!(db.dump(table).await.len(), 1);
    assert_eq!(sink.checkpoint().await.unwrap(), Some(checkpoint(schema, "3_0", 1)));
    db.drop().await;
}

#[tokio::test]
async fn a_resync_sweeps_exactly_the_vanished_rows_while_readers_always_see_the_kept_ones() {
    let db = TestSchema::new("resync").await;
    let sink = db.sink("items", "resync");
    let initial = batch(
        (1..=2_000).map(|i| Change::insert(format!("k{i}"), item(i, "old"))).collect(),
        checkpoint(items_schema(), "0_inf", 1),
    );
    sink.apply(&initial).await.unwrap();

    // A reader polls while the resync runs: rows 1..=1500 exist before and after.
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let (pool, stop) = (db.pool.clone(), stop.clone());
        let sql = format!("SELECT count(*) FROM \"{}\".items WHERE id <= 1500", db.name);
        tokio::spawn(async move {
            let (mut polls, mut bad) = (0u64, Vec::new());
            while !stop.load(Ordering::Relaxed) || polls == 0 {
                let n: i64 = sqlx::query_scalar(AssertSqlSafe(sql.clone())).fetch_one(&pool).await.unwrap();
                if n != 1500 {
                    bad.push(n);
                }
                polls += 1;
                tokio::task::yield_now().await;
            }
            (polls, bad)
        })
    };
    for chunk in 0..3i64 {
        let ids = (chunk * 500 + 1)..=(chunk * 500 + 500);
        let mut b = batch(
            ids.map(|i| Change::insert(format!("k{i}"), item(i, "new"))).collect(),
            checkpoint(items_schema(), &format!("0_{chunk}"), 2),
        );
        b.checkpoint.resyncing = true;
        b.up_to_date = false;
        sink.apply(&b).await.unwrap();
    }
    let mut end = batch(vec![], checkpoint(items_schema(), "0_inf", 2));
    end.sweep = true;
    sink.apply(&end).await.unwrap();
    stop.store(true, Ordering::Relaxed);
    let (polls, bad) = reader.await.unwrap();
    assert!(bad.is_empty(), "a reader saw {bad:?} of 1500 kept rows");
    assert!(polls > 0);
    let names = db.column("items", "name").await;
    assert_eq!(names.len(), 1_500, "rows 1501..=2000 left the shape and are swept");
    assert!(names.iter().all(|n| n.as_deref() == Some("new")));
    assert_eq!(sink.checkpoint().await.unwrap(), Some(end.checkpoint));
    db.drop().await;
}

#[tokio::test]
async fn new_columns_are_added_and_a_changed_primary_key_is_refused_with_advice() {
    let db = TestSchema::new("evolve").await;
    let sink = db.sink("items", "evolve");
    sink.apply(&batch(vec![Change::insert("k1", item(1, "a"))], checkpoint(items_schema(), "0_inf", 1)))
        .await
        .unwrap();
    let wider = schema(
        r#"{"id":{"type":"int8","pk_index":0},"name":{"type":"text"},"note":{"type":"text"},"score":{"type":"int4"}}"#,
    );
    let mut r = item(2, "b");
    r.insert("score", Value::Int(42));
    sink.apply(&batch(vec![Change::insert("k2", r)], checkpoint(wider, "0_inf", 2))).await.unwrap();
    assert_eq!(db.column("items", "score").await, vec![None, Some("42".into())]);

    let other_key = schema(r#"{"id":{"type":"int8"},"name":{"type":"text","pk_index":0}}"#);
    let err = db
        .sink("items", "evolve")
        .apply(&batch(vec![Change::insert("k3", item(3, "c"))], checkpoint(other_key, "0_inf", 3)))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, e if e.kind() == SinkErrorKind::Rejected && e.message().contains("drop the table")),
        "{err}"
    );
    db.drop().await;
}

#[tokio::test]
async fn pipelines_share_a_schema_with_tables_and_checkpoints_of_their_own_and_reset_clears_one() {
    let db = TestSchema::new("shared").await;
    let a = db.sink("items", "a");
    let b = db.sink("public.other", "b");
    assert_eq!(a.checkpoint().await.unwrap(), None, "no checkpoints table yet");
    let ba = batch(vec![Change::insert("k1", item(1, "a"))], checkpoint(items_schema(), "0_inf", 1));
    let bb = batch(vec![Change::insert("k1", item(1, "b"))], checkpoint(items_schema(), "0_inf", 2));
    a.apply(&ba).await.unwrap();
    b.apply(&bb).await.unwrap();
    assert_eq!(a.checkpoint().await.unwrap(), Some(ba.checkpoint.clone()));

    let sql = format!("CREATE INDEX items_by_name ON \"{}\".items (name)", db.name);
    sqlx::raw_sql(AssertSqlSafe(sql)).execute(&db.pool).await.unwrap();
    a.reset().await.unwrap();
    assert_eq!(a.checkpoint().await.unwrap(), None);
    assert!(db.dump("items").await.is_empty());
    assert_eq!(db.dump("other").await.len(), 1, "the other pipeline keeps its rows");
    assert_eq!(b.checkpoint().await.unwrap(), Some(bb.checkpoint));
    let sql = format!(
        "SELECT count(*) FROM pg_indexes WHERE schemaname = '{}' AND indexname = 'items_by_name'",
        db.name
    );
    let indexes: i64 = sqlx::query_scalar(AssertSqlSafe(sql)).fetch_one(&db.pool).await.unwrap();
    assert_eq!(indexes, 1, "a reader's index survives reset");
    let sql = format!("SELECT count(*) FROM \"{}\".{CHECKPOINT_TABLE}", db.name);
    let checkpoints: i64 = sqlx::query_scalar(AssertSqlSafe(sql)).fetch_one(&db.pool).await.unwrap();
    assert_eq!(checkpoints, 1);
    db.drop().await;
}

#[tokio::test]
async fn an_update_that_changes_the_key_moves_the_row() {
    let db = TestSchema::new("move").await;
    let sink = db.sink("items", "move");
    sink.apply(&batch(vec![Change::insert("k1", item(1, "a"))], checkpoint(items_schema(), "0_inf", 1)))
        .await
        .unwrap();
    let mut moved = live(Change::update("k9", item(9, "a")), 3, 0);
    moved.old_value = Some(row(&[("id", Value::Int(1))]));
    sink.apply(&batch(vec![moved], checkpoint(items_schema(), "3_0", 1))).await.unwrap();
    assert_eq!(db.column("items", "id").await, vec![Some("9".into())]);
    db.drop().await;
}

#[tokio::test]
async fn unreachable_servers_missing_schemas_and_bad_settings_are_reported_clearly() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    let config = PostgresSinkConfig {
        connect_timeout_ms: 500,
        ..PostgresSinkConfig::new(format!("postgres://postgres:s3cret@127.0.0.1:{port}/test"))
    };
    let ctx = SinkContext {
        pipeline: "p".into(),
        shape: ShapeInfo { table: "items".into(), ..Default::default() },
    };
    let sink = config.clone().build(ctx.clone()).await.expect("building does not connect");
    let err = sink.checkpoint().await.unwrap_err();
    assert_eq!(err.kind(), SinkErrorKind::Unavailable, "{err}");
    assert!(!err.to_string().contains("s3cret"), "{err}");
    // The driver's error is kept as the source (and it names no password either).
    let source = std::error::Error::source(&err).expect("the driver's error is the source");
    assert!(source.downcast_ref::<sqlx::Error>().is_some(), "{source:?}");
    assert!(!format!("{source} {source:?}").contains("s3cret"), "{source:?}");

    let missing = PostgresSinkConfig { schema: "no_such_schema_here".into(), ..PostgresSinkConfig::new(URL) };
    let sink = missing.build(ctx.clone()).await.unwrap();
    let err = sink
        .apply(&batch(vec![Change::insert("k1", item(1, "a"))], checkpoint(items_schema(), "0_inf", 1)))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, e if e.kind() == SinkErrorKind::Rejected && e.message().contains("CREATE SCHEMA")),
        "{err}"
    );
    // A refused statement carries its SQLSTATE (3F000: invalid schema name) and the
    // driver's error.
    assert_eq!(err.code(), Some(&ErrorCode::Sqlstate("3F000".into())), "{err}");
    let source = std::error::Error::source(&err).and_then(|s| s.downcast_ref::<sqlx::Error>());
    assert!(matches!(source, Some(sqlx::Error::Database(_))), "{source:?}");

    for (config, key) in [
        (PostgresSinkConfig::new("mysql://localhost/db"), "url"),
        (
            PostgresSinkConfig { table: Some(CHECKPOINT_TABLE.into()), ..PostgresSinkConfig::new(URL) },
            "table",
        ),
        (PostgresSinkConfig { schema: String::new(), ..PostgresSinkConfig::new(URL) }, "schema"),
    ] {
        assert_eq!(config.check(&ctx).unwrap_err().key, key);
    }
    let err = PostgresSinkConfig::new("postgres://u:s3cret@host:notaport/db").check(&ctx).unwrap_err();
    assert_eq!(err.key, "url");
    assert!(!err.to_string().contains("s3cret"), "{err}");
}

#[tokio::test]
async fn sslmode_in_the_url_encrypts_the_connection_and_verifies_when_asked() {
    // The local Postgres serves TLS with a self-signed certificate.
    let db = TestSchema::new("tls").await;
    let ssl_on: String = sqlx::query_scalar("SHOW ssl").fetch_one(&db.pool).await.unwrap();
    assert_eq!(ssl_on, "on", "the test needs the local Postgres to offer TLS");
    let ctx = SinkContext {
        pipeline: "tls".into(),
        shape: ShapeInfo { table: "items".into(), ..Default::default() },
    };
    let app = format!("shapesync-tls-{}", std::process::id());
    let config = |query: &str| PostgresSinkConfig {
        schema: db.name.clone(),
        ..PostgresSinkConfig::new(format!("{URL}?application_name={app}&{query}"))
    };
    let sink = config("sslmode=require").build(ctx.clone()).await.unwrap();
    let b = batch(vec![Change::insert("k1", item(1, "a"))], checkpoint(items_schema(), "0_inf", 1));
    sink.apply(&b).await.unwrap();
    let encrypted: Option<bool> = sqlx::query_scalar(
        "SELECT bool_and(s.ssl) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) WHERE a.application_name = $1",
    )
    .bind(&app)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(encrypted, Some(true), "the sink's connections use TLS");

    // verify-full against a certificate no root vouches for is refused, with advice.
    let err = config("sslmode=verify-full").build(ctx.clone()).await.unwrap().checkpoint().await.unwrap_err();
    assert!(
        matches!(&err, e if e.kind() == SinkErrorKind::Rejected && e.message().contains("sslrootcert")),
        "{err}"
    );
    let source = std::error::Error::source(&err).and_then(|s| s.downcast_ref::<sqlx::Error>());
    assert!(matches!(source, Some(sqlx::Error::Io(_) | sqlx::Error::Tls(_))), "{source:?}");
    db.drop().await;
}

#[tokio::test]
async fn a_value_postgres_cannot_store_is_refused_naming_its_row_and_column() {
    let db = TestSchema::new("nul").await;
    let sink = db.sink("public.docs", "nul");
    let schema = schema(
        r#"{"id":{"type":"int8","pk_index":0,"not_null":true},"doc":{"type":"jsonb"},"title":{"type":"text"}}"#,
    );
    let good = row(&[("id", Value::Int(1)), ("doc", Value::Json(r#"{"a":"x\\u0000"}"#.into()))]);
    sink.apply(&batch(
        vec![Change::insert("\"public\".\"docs\"/\"1\"", good)],
        checkpoint(schema.clone(), "0_0", 1),
    ))
    .await
    .expect("an escaped backslash before u0000 is no NUL");
    for (column, value) in
        [("doc", Value::Json(r#"{"a":"x\u0000y"}"#.into())), ("title", Value::Text("a\0b".into()))]
    {
        let bad = row(&[("id", Value::Int(2)), (column, value)]);
        let snapshot = batch(
            vec![Change::insert("\"public\".\"docs\"/\"2\"", bad)],
            checkpoint(schema.clone(), "0_1", 1),
        );
        match sink.apply(&snapshot).await {
            Err(e) if e.kind() == SinkErrorKind::Rejected => {
                let m = e.message();
                assert!(m.contains(r#""public"."docs"/"2""#) && m.contains(&format!("`{column}`")), "{m}")
            }
            other => panic!("{column}: {other:?}"),
        }
    }
    assert_eq!(db.dump("docs").await.len(), 1, "nothing of the refused batches was written");
    db.drop().await;
}
