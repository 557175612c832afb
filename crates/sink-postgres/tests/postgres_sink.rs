//! Integration tests against the real Postgres at 127.0.0.1:5432 (database `test`). Each
//! test owns a schema of its own, dropped at the end.

use std::sync::Arc;

use shapesync_core::{Change, ErrorCode, ShapeInfo, Sink, SinkConfig, SinkContext, SinkErrorKind, Value};
use shapesync_sink_postgres::{CHECKPOINT_TABLE, GENERATION_COLUMN, PostgresSink, PostgresSinkConfig};
use shapesync_testkit::compliance::{SinkUnderTest, StoredRows, check_sink};
use shapesync_testkit::fixtures::{batch, checkpoint, item, items_schema, row, schema};
use shapesync_testkit::table_sink::{TableSinkUnderTest, check_table_sink};
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

#[shapesync_core::async_trait]
impl TableSinkUnderTest for TestSchema {
    async fn open(&self, pipeline: &str, shape: ShapeInfo) -> Arc<dyn Sink> {
        Arc::new(PostgresSink::new(&self.config(), SinkContext { pipeline: pipeline.into(), shape }).unwrap())
    }

    fn table(&self, table: &str) -> String {
        format!("{}.{}", shapesync_sql_table::quote(&self.name), shapesync_sql_table::quote(table))
    }

    async fn execute(&self, sql: &str) -> Result<(), String> {
        sqlx::raw_sql(AssertSqlSafe(sql.to_owned()))
            .execute(&self.pool)
            .await
            .map(drop)
            .map_err(|e| e.to_string())
    }

    async fn query(&self, sql: &str) -> Vec<Vec<Option<String>>> {
        let rows = sqlx::query(AssertSqlSafe(sql.to_owned())).fetch_all(&self.pool).await.unwrap();
        rows.iter().map(|r| (0..r.len()).map(|i| r.get::<Option<String>, _>(i)).collect()).collect()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_sink_passes_the_table_sink_suite() {
    let db = Arc::new(TestSchema::new("table_suite").await);
    check_table_sink(db.clone()).await;
    Arc::into_inner(db).expect("the suite's reader ended").drop().await;
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
