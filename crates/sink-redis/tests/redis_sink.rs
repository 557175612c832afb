//! Integration tests against the real Redis at 127.0.0.1:6379 (and, for the restart
//! test, a `redis-server` of their own). Each test owns a unique key prefix.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use redis::AsyncCommands;
use redis::aio::MultiplexedConnection;
use shapesync_core::{
    Batch, Change, Checkpoint, LogPosition, Row, Schema, ShapeInfo, Sink, SinkContext, SinkErrorKind, Value,
};
use shapesync_sink_redis::{Layout, RedisSink, RedisSinkConfig};

mod common;
use common::{URL, unique};

fn schema() -> Schema {
    serde_json::from_str(
        r#"{"id":{"type":"int8","pk_index":0},"name":{"type":"text"},"note":{"type":"text"},
            "tags":{"type":"int4","dims":1},"meta":{"type":"jsonb"},"score":{"type":"float8"},
            "amount":{"type":"numeric"},"flag":{"type":"bool"}}"#,
    )
    .unwrap()
}

fn composite_schema() -> Schema {
    serde_json::from_str(
        r#"{"org":{"type":"text","pk_index":0},"id":{"type":"int4","pk_index":1},"name":{"type":"text"}}"#,
    )
    .unwrap()
}

/// [`schema`] with `name` declared NOT NULL, so a template may key by it.
fn not_null_name_schema() -> Schema {
    let mut schema = schema();
    schema.0.get_mut("name").unwrap().not_null = true;
    schema
}

fn cp(offset: &str, generation: u64, resyncing: bool) -> Checkpoint {
    Checkpoint {
        shape_hash: "shape".into(),
        handle: "h-1".into(),
        offset: offset.parse().unwrap(),
        schema: schema(),
        generation,
        resyncing,
    }
}

fn batch(changes: Vec<Change>, checkpoint: Checkpoint) -> Batch {
    Batch::new(changes, checkpoint, false, true)
}

fn row(pairs: &[(&str, Value)]) -> Row {
    pairs.iter().map(|(k, v)| ((*k).to_owned(), v.clone())).collect()
}

fn live(mut change: Change, lsn: u64, op: u64) -> Change {
    change.position = Some(LogPosition { lsn, op_position: op });
    change
}

const BIG: i64 = 9_007_199_254_740_993;

/// A row exercising every render rule: int8 beyond 2^53, NULL, array, JSON, float, numeric, bool.
fn full_row(id: i64, name: &str) -> Row {
    row(&[
        ("id", Value::Int(id)),
        ("name", Value::Text(name.into())),
        ("note", Value::Null),
        ("tags", Value::Array(vec![Value::Int(1), Value::Null, Value::Int(3)])),
        ("meta", Value::Json(r#"{"big": 123456789012345678901234567890, "x": [1.50]}"#.into())),
        ("score", Value::Float(1.5)),
        ("amount", Value::Numeric("12.30".into())),
        ("flag", Value::Bool(true)),
    ])
}

struct Setup {
    prefix: String,
    config: RedisSinkConfig,
    ctx: SinkContext,
}

impl Setup {
    fn new(name: &str, layout: Layout) -> Self {
        let prefix = format!("{}:", unique(name));
        let mut config = RedisSinkConfig::new(URL);
        config.layout = layout;
        config.prefix = prefix.clone();
        let ctx = SinkContext {
            pipeline: "p".into(),
            shape: ShapeInfo { table: "items".into(), ..Default::default() },
        };
        Setup { prefix, config, ctx }
    }

    async fn sink(&self) -> RedisSink {
        RedisSink::connect(self.config.clone(), self.ctx.clone()).await.unwrap()
    }

    fn key(&self, id: &str) -> String {
        format!("{}items:{id}", self.prefix)
    }
}

async fn redis() -> MultiplexedConnection {
    redis_at(URL).await
}

async fn redis_at(url: &str) -> MultiplexedConnection {
    redis::Client::open(url).unwrap().get_multiplexed_async_connection().await.unwrap()
}

async fn keys_with_prefix(conn: &mut MultiplexedConnection, prefix: &str) -> Vec<String> {
    // The shared Redis may hold many other keys: scan in large steps.
    let (mut keys, mut cursor) = (Vec::new(), 0u64);
    loop {
        let (next, found): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{prefix}*"))
            .arg("COUNT")
            .arg(10_000)
            .query_async(conn)
            .await
            .unwrap();
        keys.extend(found);
        if next == 0 {
            keys.sort();
            keys.dedup();
            return keys;
        }
        cursor = next;
    }
}

/// The exact stored form of every key under `prefix`: equal maps mean byte-identical data.
///
/// That is `DUMP`, except for hashes in Redis's `hashtable` encoding: their `DUMP` lists
/// fields in bucket order, which Redis's incremental rehashing changes even on reads, so
/// for them it is the encoding plus every field and value, byte for byte, in sorted order.
async fn dump_all(conn: &mut MultiplexedConnection, prefix: &str) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    for key in keys_with_prefix(conn, prefix).await {
        let encoding: String =
            redis::cmd("OBJECT").arg("ENCODING").arg(&key).query_async(conn).await.unwrap();
        let bytes = if encoding == "hashtable" {
            let fields: BTreeMap<Vec<u8>, Vec<u8>> = conn.hgetall(&key).await.unwrap();
            let mut bytes = encoding.into_bytes();
            for (field, value) in fields {
                for part in [field, value] {
                    bytes.extend((part.len() as u64).to_le_bytes());
                    bytes.extend(part);
                }
            }
            bytes
        } else {
            redis::cmd("DUMP").arg(&key).query_async(conn).await.unwrap()
        };
        out.insert(key, bytes);
    }
    out
}

async fn hgetall(conn: &mut MultiplexedConnection, key: &str) -> BTreeMap<String, String> {
    conn.hgetall(key).await.unwrap()
}

async fn cleanup(prefix: &str) {
    let mut conn = redis().await;
    for key in keys_with_prefix(&mut conn, prefix).await {
        let _: () = conn.del(key).await.unwrap();
    }
}

#[tokio::test]
async fn hash_layout_insert_update_delete_with_nulls_partial_updates_and_exact_values() {
    let setup = Setup::new("hash", Layout::Hash);
    let sink = setup.sink().await;
    let mut conn = redis().await;
    sink.apply(&batch(vec![Change::insert("k1", full_row(BIG, "one"))], cp("0_0", 1, true))).await.unwrap();
    let stored = hgetall(&mut conn, &setup.key(&BIG.to_string())).await;
    let expected: BTreeMap<String, String> = [
        ("id", "9007199254740993"),
        ("name", "one"),
        ("tags", "[1,null,3]"),
        ("meta", r#"{"big": 123456789012345678901234567890, "x": [1.50]}"#),
        ("score", "1.5"),
        ("amount", "12.30"),
        ("flag", "true"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    assert_eq!(stored, expected, "NULL `note` is an absent field");

    // Partial updates: set a column, fill a NULL, null a column; the rest survives.
    let update = Change::update(
        "k1",
        row(&[("id", Value::Int(BIG)), ("note", Value::Text("n".into())), ("name", Value::Null)]),
    );
    sink.apply(&batch(vec![live(update, 10, 0)], cp("10_0", 1, false))).await.unwrap();
    let stored = hgetall(&mut conn, &setup.key(&BIG.to_string())).await;
    assert_eq!(stored.get("note").map(String::as_str), Some("n"));
    assert!(!stored.contains_key("name"));
    assert_eq!(stored.get("amount").map(String::as_str), Some("12.30"));
    assert_eq!(stored.len(), 7);

    let delete = Change::delete("k1", row(&[("id", Value::Int(BIG))]));
    sink.apply(&batch(vec![live(delete, 11, 0)], cp("11_0", 1, false))).await.unwrap();
    let left = keys_with_prefix(&mut conn, &setup.prefix).await;
    assert_eq!(left, vec![sink.checkpoint_key().to_owned()], "row and membership are gone");
    assert_eq!(sink.checkpoint().await.unwrap(), Some(cp("11_0", 1, false)));
    cleanup(&setup.prefix).await;
}

#[tokio::test]
async fn json_layout_keeps_int8_precision_and_merges_partial_updates_exactly() {
    let setup = Setup::new("json", Layout::Json);
    let sink = setup.sink().await;
    let mut conn = redis().await;
    let key = setup.key(&BIG.to_string());
    sink.apply(&batch(vec![Change::insert("k1", full_row(BIG, "one"))], cp("0_0", 1, true))).await.unwrap();
    let stored: String = conn.get(&key).await.unwrap();
    assert_eq!(
        stored,
        r#"{"amount":"12.30","flag":true,"id":9007199254740993,"meta":{"big": 123456789012345678901234567890, "x": [1.50]},"name":"one","note":null,"score":1.5,"tags":[1,null,3]}"#
    );

    let update = Change::update(
        "k1",
        row(&[("id", Value::Int(BIG)), ("name", Value::Null), ("score", Value::Float(f64::INFINITY))]),
    );
    let second = Change::update("k1", row(&[("id", Value::Int(BIG)), ("note", Value::Text("n".into()))]));
    sink.apply(&batch(vec![live(update, 10, 0), live(second, 10, 1)], cp("10_1", 1, false))).await.unwrap();
    let stored: String = conn.get(&key).await.unwrap();
    assert_eq!(
        stored,
        r#"{"amount":"12.30","flag":true,"id":9007199254740993,"meta":{"big": 123456789012345678901234567890, "x": [1.50]},"name":null,"note":"n","score":"Infinity","tags":[1,null,3]}"#,
        "both updates of one batch merge; nothing is rounded"
    );

    let delete = Change::delete("k1", row(&[("id", Value::Int(BIG))]));
    sink.apply(&batch(vec![live(delete, 11, 0)], cp("11_0", 1, false))).await.unwrap();
    assert!(!conn.exists::<_, bool>(&key).await.unwrap());
    cleanup(&setup.prefix).await;
}

#[tokio::test]
async fn table_layout_stores_row_json_per_field_and_merges_updates() {
    let setup = Setup::new("table", Layout::Table);
    let sink = setup.sink().await;
    let mut conn = redis().await;
    let table = format!("{}items", setup.prefix);
    let inserts = vec![Change::insert("k1", full_row(BIG, "one")), Change::insert("k2", full_row(2, "two"))];
    sink.apply(&batch(inserts, cp("0_0", 1, true))).await.unwrap();
    let fields = hgetall(&mut conn, &table).await;
    assert_eq!(fields.keys().collect::<Vec<_>>(), ["2", "9007199254740993"]);
    assert_eq!(
        fields["9007199254740993"],
        r#"{"amount":"12.30","flag":true,"id":9007199254740993,"meta":{"big": 123456789012345678901234567890, "x": [1.50]},"name":"one","note":null,"score":1.5,"tags":[1,null,3]}"#
    );

    let update =
        Change::update("k1", row(&[("id", Value::Int(BIG)), ("amount", Value::Numeric("1e400".into()))]));
    let delete = Change::delete("k2", row(&[("id", Value::Int(2))]));
    sink.apply(&batch(vec![live(update, 5, 0), live(delete, 5, 1)], cp("5_1", 1, false))).await.unwrap();
    let fields = hgetall(&mut conn, &table).await;
    assert_eq!(fields.len(), 1);
    assert_eq!(
        fields["9007199254740993"],
        r#"{"amount":"1e400","flag":true,"id":9007199254740993,"meta":{"big": 123456789012345678901234567890, "x": [1.50]},"name":"one","note":null,"score":1.5,"tags":[1,null,3]}"#,
        "the partial update merged; every other value kept byte for byte"
    );
    cleanup(&setup.prefix).await;
}

#[tokio::test]
async fn composite_keys_follow_the_template_and_the_default() {
    let mut setup = Setup::new("composite", Layout::Hash);
    let mut conn = redis().await;
    let mut checkpoint = cp("0_0", 1, true);
    checkpoint.schema = composite_schema();
    let acme =
        row(&[("org", Value::Text("acme".into())), ("id", Value::Int(7)), ("name", Value::Text("x".into()))]);

    let default_sink = setup.sink().await;
    default_sink.apply(&batch(vec![Change::insert("k", acme.clone())], checkpoint.clone())).await.unwrap();
    assert_eq!(hgetall(&mut conn, &setup.key("acme:7")).await["name"], "x");

    setup.config.key = Some("org:{org}:project:{id}".into());
    setup.config.prefix = format!("{}t:", setup.prefix);
    let templated = setup.sink().await;
    templated.apply(&batch(vec![Change::insert("k", acme)], checkpoint)).await.unwrap();
    let key = format!("{}org:acme:project:7", setup.config.prefix);
    assert_eq!(hgetall(&mut conn, &key).await["name"], "x");
    cleanup(&setup.prefix).await;
}

#[tokio::test]
async fn template_on_a_non_key_column_is_rejected_without_full_rows_and_moves_rows_with_them() {
    let mut setup = Setup::new("nonpk", Layout::Json);
    setup.config.key = Some("name:{name}".into());
    let sink = setup.sink().await;
    let err = sink.apply(&batch(vec![Change::insert("k", full_row(1, "a"))], cp("0_0", 1, true))).await;
    match err {
        Err(e) if e.kind() == SinkErrorKind::Rejected => {
            let m = e.message();
            assert!(m.contains("`name`") && m.contains("replica: full"), "{m}")
        }
        other => panic!("expected Rejected, got {other:?}"),
    }

    setup.ctx.shape.full_rows = true;
    let sink = setup.sink().await;
    let mut conn = redis().await;
    let checkpoint = |offset: &str, resyncing: bool| {
        let mut checkpoint = cp(offset, 1, resyncing);
        checkpoint.schema = not_null_name_schema();
        checkpoint
    };
    sink.apply(&batch(vec![Change::insert("k", full_row(1, "a"))], checkpoint("0_0", true))).await.unwrap();
    let mut rename = live(Change::update("k", full_row(1, "b")), 3, 0);
    rename.old_value = Some(row(&[("name", Value::Text("a".into()))]));
    sink.apply(&batch(vec![rename], checkpoint("3_0", false))).await.unwrap();
    let old = format!("{}name:a", setup.prefix);
    let new = format!("{}name:b", setup.prefix);
    assert!(!conn.exists::<_, bool>(&old).await.unwrap(), "the row left its old key");
    let moved: String = conn.get(&new).await.unwrap();
    assert!(moved.contains(r#""name":"b""#));
    let members: BTreeMap<String, String> = conn.hgetall(sink.members_key()).await.unwrap();
    assert_eq!(members.keys().collect::<Vec<_>>(), ["name:b"]);
    cleanup(&setup.prefix).await;
}

#[tokio::test]
async fn default_composite_keys_escape_separators_so_distinct_rows_never_collide() {
    let schema: Schema = serde_json::from_str(
        r#"{"a":{"type":"text","pk_index":0},"b":{"type":"text","pk_index":1},"name":{"type":"text"}}"#,
    )
    .unwrap();
    let text = |a: &str, b: &str, name: &str| {
        row(&[("a", Value::Text(a.into())), ("b", Value::Text(b.into())), ("name", Value::Text(name.into()))])
    };
    // Unescaped, the first two would both be `items:a:b:c`, the last two `items:x\:y`.
    let rows = [
        text("a:b", "c", "first"),
        text("a", "b:c", "second"),
        text(r"x\", "y", "third"),
        text("x", r"\y", "fourth"),
    ];
    let expected_ids = [r"a\:b:c", r"a:b\:c", r"x\\:y", r"x:\\y"];
    for layout in [Layout::Hash, Layout::Json, Layout::Table] {
        let setup = Setup::new("escape", layout);
        let sink = setup.sink().await;
        let mut conn = redis().await;
        let mut checkpoint = cp("0_inf", 1, false);
        checkpoint.schema = schema.clone();
        let changes =
            rows.iter().enumerate().map(|(i, r)| Change::insert(format!("k{i}"), r.clone())).collect();
        sink.apply(&batch(changes, checkpoint)).await.unwrap();

        let members: BTreeMap<String, String> = conn.hgetall(sink.members_key()).await.unwrap();
        let table = if layout == Layout::Table { "" } else { "items:" };
        let mut ids: Vec<String> = expected_ids.iter().map(|id| format!("{table}{id}")).collect();
        ids.sort();
        assert_eq!(members.into_keys().collect::<Vec<_>>(), ids, "{layout:?}");
        for (id, r) in expected_ids.iter().zip(&rows) {
            let name = match layout {
                Layout::Hash => hgetall(&mut conn, &setup.key(id)).await["name"].clone(),
                Layout::Json => conn.get::<_, String>(setup.key(id)).await.unwrap(),
                Layout::Table => {
                    conn.hget::<_, _, String>(format!("{}items", setup.prefix), id).await.unwrap()
                }
            };
            let Value::Text(want) = r.get("name").unwrap() else { unreachable!() };
            assert!(name.contains(want.as_str()), "{layout:?}: row {id} holds {name}, expected {want}");
        }
        cleanup(&setup.prefix).await;
    }
}

#[tokio::test]
async fn a_template_over_a_nullable_non_key_column_is_rejected_at_the_first_batch() {
    let mut setup = Setup::new("nullable", Layout::Hash);
    setup.config.key = Some("name:{name}".into());
    setup.ctx.shape.full_rows = true;
    let sink = setup.sink().await;
    // The first row has a name: without the check it would be written, and the first
    // row with a NULL name, whenever it came, would stop the pipeline for good.
    let first = batch(vec![Change::insert("k", full_row(1, "a"))], cp("0_0", 1, true));
    match sink.apply(&first).await {
        Err(e) if e.kind() == SinkErrorKind::Rejected => {
            let m = e.message();
            assert!(m.contains("`name`") && m.contains("NOT NULL"), "{m}")
        }
        other => panic!("expected Rejected, got {other:?}"),
    }
    let mut conn = redis().await;
    assert_eq!(keys_with_prefix(&mut conn, &setup.prefix).await, Vec::<String>::new(), "nothing written");

    let mut not_null = first.clone();
    not_null.checkpoint.schema = not_null_name_schema();
    sink.apply(&not_null).await.unwrap();
    assert_eq!(hgetall(&mut conn, &format!("{}name:a", setup.prefix)).await["id"], "1");
    cleanup(&setup.prefix).await;
}

#[tokio::test]
async fn part_size_above_the_cap_is_rejected_before_connecting() {
    let mut setup = Setup::new("partcap", Layout::Hash);
    setup.config.part_size = shapesync_sink_redis::defaults::MAX_PART_SIZE + 1;
    match RedisSink::connect(setup.config.clone(), setup.ctx.clone()).await {
        Err(e) if e.kind() == SinkErrorKind::Rejected => {
            let m = e.message();
            assert!(m.contains("part_size") && m.contains("10000"), "{m}")
        }
        Err(e) => panic!("expected Rejected, got {e:?}"),
        Ok(_) => panic!("a part_size above the cap was accepted"),
    }
    setup.config.part_size = shapesync_sink_redis::defaults::MAX_PART_SIZE;
    let sink = setup.sink().await;
    sink.apply(&batch(vec![Change::insert("k", full_row(1, "a"))], cp("0_inf", 1, false))).await.unwrap();
    assert_eq!(hgetall(&mut redis().await, &setup.key("1")).await["name"], "a");
    cleanup(&setup.prefix).await;
}

#[tokio::test]
async fn pipelines_sharing_a_prefix_keep_their_rows_apart_with_hash_tag() {
    let mut first = Setup::new("shared", Layout::Hash);
    first.config.hash_tag = true;
    let mut second = Setup::new("shared", Layout::Hash);
    second.config = first.config.clone();
    second.ctx.pipeline = "q".into();
    let (p, q) = (first.sink().await, second.sink().await);
    p.apply(&batch(vec![Change::insert("k", full_row(1, "from p"))], cp("0_inf", 1, false))).await.unwrap();
    q.apply(&batch(vec![Change::insert("k", full_row(1, "from q"))], cp("0_inf", 1, false))).await.unwrap();
    // q refetches an empty shape: its sweep removes its own row only.
    let mut refetch = batch(vec![], cp("0_inf", 2, false));
    refetch.sweep = true;
    q.apply(&refetch).await.unwrap();

    let mut conn = redis().await;
    let row_of = |pipeline: &str| format!("{}{{{pipeline}}}:items:1", first.prefix);
    assert_eq!(hgetall(&mut conn, &row_of("p")).await["name"], "from p");
    assert!(!conn.exists::<_, bool>(row_of("q")).await.unwrap(), "q's sweep removed q's row");
    cleanup(&first.prefix).await;
}

#[tokio::test]
async fn replaying_a_committed_batch_leaves_redis_byte_identical() {
    for layout in [Layout::Hash, Layout::Json, Layout::Table] {
        let mut setup = Setup::new("replay", layout);
        setup.config.part_size = 3;
        let sink = setup.sink().await;
        let mut conn = redis().await;
        let snapshot: Vec<Change> =
            (0..10).map(|i| Change::insert(format!("k{i}"), full_row(i, &format!("n{i}")))).collect();
        let snapshot = batch(snapshot, cp("0_0", 1, true));
        let tx = batch(
            vec![
                live(
                    Change::update("k1", row(&[("id", Value::Int(1)), ("note", Value::Text("x".into()))])),
                    7,
                    0,
                ),
                live(Change::update("k2", row(&[("id", Value::Int(2)), ("name", Value::Null)])), 7, 1),
                live(Change::delete("k3", row(&[("id", Value::Int(3))])), 7, 2),
                live(Change::insert("k20", full_row(20, "new")), 7, 3),
            ],
            cp("7_3", 1, false),
        );
        for b in [&snapshot, &tx] {
            sink.apply(b).await.unwrap();
            let before = dump_all(&mut conn, &setup.prefix).await;
            sink.apply(b).await.unwrap();
            assert_eq!(dump_all(&mut conn, &setup.prefix).await, before, "{layout:?} replay changed bytes");
        }
        let mut sweep = batch(vec![], cp("7_3", 2, false));
        sweep.sweep = true;
        sink.apply(&sweep).await.unwrap();
        let before = dump_all(&mut conn, &setup.prefix).await;
        sink.apply(&sweep).await.unwrap();
        assert_eq!(dump_all(&mut conn, &setup.prefix).await, before, "{layout:?} sweep replay");
        cleanup(&setup.prefix).await;
    }
}

#[tokio::test]
async fn a_new_sink_resumes_from_the_checkpoint_the_crashed_one_wrote() {
    let setup = Setup::new("resume", Layout::Hash);
    let first = setup.sink().await;
    assert_eq!(first.checkpoint().await.unwrap(), None);
    let b1 = batch(vec![Change::insert("k1", full_row(1, "a"))], cp("0_inf", 1, true));
    first.apply(&b1).await.unwrap();
    drop(first); // the process dies between two batches

    let second = setup.sink().await;
    assert_eq!(second.checkpoint().await.unwrap(), Some(b1.checkpoint.clone()));
    let b2 = batch(vec![live(Change::insert("k2", full_row(2, "b")), 9, 0)], cp("9_0", 1, false));
    second.apply(&b2).await.unwrap();
    assert_eq!(setup.sink().await.checkpoint().await.unwrap(), Some(b2.checkpoint));
    let mut conn = redis().await;
    assert_eq!(hgetall(&mut conn, &setup.key("1")).await["name"], "a");
    assert_eq!(hgetall(&mut conn, &setup.key("2")).await["name"], "b");
    cleanup(&setup.prefix).await;
}

/// Reads rows the way a cache reader would, whatever the layout.
#[derive(Clone)]
struct RowProbe {
    layout: Layout,
    prefix: String,
}

impl RowProbe {
    /// How many of the rows `ids` exist right now (one command, so one instant).
    async fn present(&self, conn: &mut MultiplexedConnection, ids: &[i64]) -> usize {
        match self.layout {
            Layout::Table => {
                let values: Vec<Option<String>> = redis::cmd("HMGET")
                    .arg(format!("{}items", self.prefix))
                    .arg(ids)
                    .query_async(conn)
                    .await
                    .unwrap();
                values.iter().flatten().count()
            }
            _ => {
                let keys: Vec<String> = ids.iter().map(|i| format!("{}items:{i}", self.prefix)).collect();
                redis::cmd("EXISTS").arg(keys).query_async(conn).await.unwrap()
            }
        }
    }

    /// The stored `name` of row `id`.
    async fn name(&self, conn: &mut MultiplexedConnection, id: i64) -> String {
        let json: String = match self.layout {
            Layout::Hash => {
                return hgetall(conn, &format!("{}items:{id}", self.prefix)).await["name"].clone();
            }
            Layout::Json => conn.get(format!("{}items:{id}", self.prefix)).await.unwrap(),
            Layout::Table => conn.hget(format!("{}items", self.prefix), id).await.unwrap(),
        };
        serde_json::from_str::<serde_json::Value>(&json).unwrap()["name"].as_str().unwrap().to_owned()
    }
}

#[tokio::test]
async fn refetch_sweeps_exactly_the_vanished_rows_while_readers_always_see_kept_rows() {
    for layout in [Layout::Hash, Layout::Json, Layout::Table] {
        let mut setup = Setup::new("sweep", layout);
        setup.config.part_size = 50;
        let probe = RowProbe { layout, prefix: setup.prefix.clone() };
        let sink = Arc::new(setup.sink().await);
        let mut conn = redis().await;
        let first: Vec<Change> =
            (0..2000).map(|i| Change::insert(format!("k{i}"), full_row(i, "old"))).collect();
        let mut initial = batch(first, cp("0_inf", 1, false));
        initial.sweep = true;
        sink.apply(&initial).await.unwrap();

        // must-refetch: generation 2 rewrites rows 0..1500 (new values); 1500..2000 vanished.
        let kept: Vec<i64> = (0..1500).collect();
        let stop = Arc::new(AtomicBool::new(false));
        let started = Arc::new(tokio::sync::Notify::new());
        let reader = {
            let (stop, started, kept, probe) = (stop.clone(), started.clone(), kept.clone(), probe.clone());
            tokio::spawn(async move {
                let mut conn = redis().await;
                let mut rounds = 0u64;
                loop {
                    let present = probe.present(&mut conn, &kept).await;
                    assert_eq!(
                        present,
                        kept.len(),
                        "{layout:?}: a reader saw a kept row missing (round {rounds})"
                    );
                    rounds += 1;
                    started.notify_one();
                    if stop.load(Ordering::Relaxed) {
                        return rounds;
                    }
                }
            })
        };
        started.notified().await;
        for chunk in 0..3 {
            let rows = (chunk * 500..(chunk + 1) * 500)
                .map(|i| Change::insert(format!("k{i}"), full_row(i, "new")))
                .collect();
            let offset = if chunk == 2 { "0_inf".to_owned() } else { format!("0_{chunk}") };
            let mut b = batch(rows, cp(&offset, 2, chunk < 2));
            b.sweep = chunk == 2;
            sink.apply(&b).await.unwrap();
        }
        stop.store(true, Ordering::Relaxed);
        assert!(reader.await.unwrap() >= 1);

        let members: BTreeMap<String, String> = conn.hgetall(sink.members_key()).await.unwrap();
        assert_eq!(members.len(), 1500, "{layout:?}");
        assert!(members.values().all(|g| g == "2"));
        assert_eq!(probe.present(&mut conn, &kept).await, 1500);
        let gone: Vec<i64> = (1500..2000).collect();
        assert_eq!(probe.present(&mut conn, &gone).await, 0, "{layout:?}: vanished rows are swept");
        assert_eq!(probe.name(&mut conn, 7).await, "new");
        assert_eq!(sink.checkpoint().await.unwrap(), Some(cp("0_inf", 2, false)));
        cleanup(&setup.prefix).await;
    }
}

#[tokio::test]
async fn notify_publishes_every_committed_change() {
    for layout in [Layout::Hash, Layout::Json, Layout::Table] {
        let mut setup = Setup::new("notify", layout);
        let channel = format!("{}events", setup.prefix);
        setup.config.notify = Some(channel.clone());
        let sink = setup.sink().await;
        let mut pubsub = redis::Client::open(URL).unwrap().get_async_pubsub().await.unwrap();
        pubsub.subscribe(&channel).await.unwrap();
        let mut messages = pubsub.on_message();

        let changes = vec![
            live(Change::insert("k1", full_row(1, "a")), 4, 0),
            live(
                Change::update("k1", row(&[("id", Value::Int(1)), ("name", Value::Text("b".into()))])),
                4,
                1,
            ),
            live(Change::delete("k2", row(&[("id", Value::Int(2))])), 4, 2),
        ];
        sink.apply(&batch(changes, cp("4_2", 1, false))).await.unwrap();
        let mut got = Vec::new();
        for _ in 0..3 {
            let msg = tokio::time::timeout(Duration::from_secs(10), messages.next()).await.unwrap().unwrap();
            got.push(
                serde_json::from_str::<serde_json::Value>(&msg.get_payload::<String>().unwrap()).unwrap(),
            );
        }
        let expected: Vec<serde_json::Value> = ["insert", "update", "delete"]
            .iter()
            .zip(["1", "1", "2"])
            .map(|(op, id)| match layout {
                Layout::Table => {
                    serde_json::json!({"op": op, "key": format!("{}items", setup.prefix), "field": id})
                }
                _ => serde_json::json!({"op": op, "key": setup.key(id)}),
            })
            .collect();
        assert_eq!(got, expected, "{layout:?}");
        cleanup(&setup.prefix).await;
    }
}

#[tokio::test]
async fn reset_removes_rows_membership_and_checkpoint() {
    for layout in [Layout::Hash, Layout::Table] {
        let mut setup = Setup::new("reset", layout);
        setup.config.part_size = 7;
        let sink = setup.sink().await;
        let rows: Vec<Change> = (0..40).map(|i| Change::insert(format!("k{i}"), full_row(i, "a"))).collect();
        sink.apply(&batch(rows, cp("0_inf", 1, false))).await.unwrap();
        let mut conn = redis().await;
        assert!(keys_with_prefix(&mut conn, &setup.prefix).await.len() >= 2);
        sink.reset().await.unwrap();
        // Only the lease stays, released, so epochs keep rising across the reset.
        let lease = format!("{}shapesync:p:lease", setup.prefix);
        assert_eq!(keys_with_prefix(&mut conn, &setup.prefix).await, vec![lease]);
        assert_eq!(sink.checkpoint().await.unwrap(), None);
        let stored = sink.lease().await.unwrap().expect("a lease record");
        assert!(!stored.is_held(), "reset releases the lease it took: {stored:?}");
    }
}

#[tokio::test]
async fn hash_tag_puts_every_key_of_the_pipeline_in_one_slot() {
    let mut setup = Setup::new("tag", Layout::Hash);
    setup.config.hash_tag = true;
    let sink = setup.sink().await;
    sink.apply(&batch(vec![Change::insert("k1", full_row(1, "a"))], cp("0_0", 1, true))).await.unwrap();
    let mut conn = redis().await;
    let keys = keys_with_prefix(&mut conn, &setup.prefix).await;
    assert_eq!(keys.len(), 3);
    let tag = format!("{}{{p}}:", setup.prefix);
    assert!(keys.iter().all(|k| k.starts_with(&tag)), "{keys:?}");
    cleanup(&setup.prefix).await;
}

#[tokio::test]
async fn corrupt_checkpoint_is_reported_and_foreign_keys_are_rejected_without_advancing() {
    let setup = Setup::new("corrupt", Layout::Hash);
    let sink = setup.sink().await;
    let mut conn = redis().await;
    // Another program owns the row's key as a string: the script fails before the checkpoint.
    let _: () = conn.set(setup.key("1"), "foreign").await.unwrap();
    let b = batch(vec![live(Change::update("k1", row(&[("id", Value::Int(1))])), 3, 0)], cp("3_0", 1, false));
    assert!(matches!(sink.apply(&b).await, Err(ref e) if e.kind() == SinkErrorKind::Rejected));
    assert_eq!(sink.checkpoint().await.unwrap(), None, "checkpoint must not pass failed data");

    let _: () = conn.set(sink.checkpoint_key(), "{not json").await.unwrap();
    assert!(matches!(sink.checkpoint().await, Err(ref e) if e.kind() == SinkErrorKind::CorruptCheckpoint));
    cleanup(&setup.prefix).await;
}

#[tokio::test]
async fn a_snapshot_part_redis_rejects_keeps_the_checkpoint_back() {
    // Snapshot parts are plain pipelines, not scripts: the checkpoint is stored only after
    // every command of the last part succeeded.
    let setup = Setup::new("snapfail", Layout::Hash);
    let sink = setup.sink().await;
    let mut conn = redis().await;
    let _: () = conn.set(setup.key("3"), "foreign").await.unwrap();
    let rows = || (1..=3).map(|id| Change::insert(format!("k{id}"), full_row(id, "x"))).collect();
    let snapshot = batch(rows(), cp("0_inf", 1, false));
    assert!(matches!(sink.apply(&snapshot).await, Err(ref e) if e.kind() == SinkErrorKind::Rejected));
    assert_eq!(sink.checkpoint().await.unwrap(), None, "checkpoint must not pass failed data");

    let _: () = conn.del(setup.key("3")).await.unwrap();
    sink.apply(&snapshot).await.unwrap();
    assert_eq!(sink.checkpoint().await.unwrap(), Some(cp("0_inf", 1, false)));
    assert_eq!(hgetall(&mut conn, &setup.key("3")).await.get("name").map(String::as_str), Some("x"));
    cleanup(&setup.prefix).await;
}

#[tokio::test]
async fn connecting_to_a_closed_port_is_unavailable() {
    let port = free_port();
    let mut config = RedisSinkConfig::new(format!("redis://user:s3cret@127.0.0.1:{port}"));
    config.timeout_ms = 500;
    let ctx = SinkContext { pipeline: "p".into(), ..SinkContext::default() };
    match RedisSink::connect(config, ctx).await {
        Err(e) if e.kind() == SinkErrorKind::Unavailable => {
            assert!(!e.to_string().contains("s3cret"), "{e}");
            // The client's error is the source, with its kind as the code.
            let source = std::error::Error::source(&e).expect("the client's error is the source");
            assert!(
                source.downcast_ref::<redis::RedisError>().is_some_and(|r| r.is_io_error()),
                "{source:?}"
            );
            assert!(!format!("{source} {source:?}").contains("s3cret"), "{source:?}");
            assert!(matches!(e.code(), Some(shapesync_core::ErrorCode::Redis(_))), "{e:?}");
        }
        Err(e) => panic!("expected Unavailable, got {e}"),
        Ok(_) => panic!("nothing listens on {port}"),
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A `redis-server` of the test's own, with an append-only file fsynced before every
/// reply, so whatever Redis acknowledged survives a SIGKILL. (Under the default
/// `appendfsync everysec`, Redis postpones writing the file for up to two seconds while
/// a slow background fsync runs, yet still answers: on a busy disk a kill then loses
/// acknowledged writes, the store's fault rather than the sink's.)
struct OwnRedis {
    port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

impl OwnRedis {
    async fn start() -> Self {
        let dir = std::env::temp_dir().join(unique("redis-dir"));
        std::fs::create_dir_all(&dir).unwrap();
        let mut server = OwnRedis { port: free_port(), dir, child: None };
        server.restart().await;
        server
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    async fn restart(&mut self) {
        let child = Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--dir",
            ])
            .arg(&self.dir)
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server is on PATH");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(client) = redis::Client::open(self.url())
                && let Ok(mut conn) = client.get_multiplexed_async_connection().await
                && redis::cmd("PING").query_async::<String>(&mut conn).await.is_ok()
            {
                return;
            }
            assert!(Instant::now() < deadline, "redis-server did not come up");
            tokio::time::sleep(Duration::from_millis(20)).await; // poll interval
        }
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Retries like the runner: only `Unavailable` is retried, until a deadline.
async fn apply_with_retry(sink: &dyn Sink, b: &Batch) -> u32 {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut failures = 0;
    loop {
        match sink.apply(b).await {
            Ok(()) => return failures,
            Err(e) if e.is_transient() && Instant::now() < deadline => {
                failures += 1;
                tokio::time::sleep(Duration::from_millis(50)).await; // backoff, not synchronisation
            }
            Err(e) => panic!("apply failed for good: {e}"),
        }
    }
}

/// Reads the checkpoint, retrying while the sink reconnects.
async fn checkpoint_with_retry(sink: &RedisSink) -> Option<Checkpoint> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match sink.checkpoint().await {
            Ok(cp) => return cp,
            Err(e) if e.is_transient() && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await; // backoff
            }
            Err(e) => panic!("checkpoint unreadable: {e}"),
        }
    }
}

#[tokio::test]
async fn redis_killed_and_restarted_mid_sync_loses_nothing() {
    let mut server = OwnRedis::start().await;
    let mut config = RedisSinkConfig::new(server.url());
    config.part_size = 10;
    config.timeout_ms = 2000;
    let ctx = SinkContext {
        pipeline: "p".into(),
        shape: ShapeInfo { table: "items".into(), ..Default::default() },
    };
    let sink = Arc::new(RedisSink::connect(config.clone(), ctx.clone()).await.unwrap());
    let mut conn = redis_at(&server.url()).await;

    // Killed while a multi-part snapshot is being written: parts may have landed, the
    // checkpoint must not have moved.
    let snapshot: Vec<Change> =
        (0..3000).map(|i| Change::insert(format!("k{i}"), full_row(i, "a"))).collect();
    let b1 = batch(snapshot, cp("0_inf", 1, false));
    let writer = tokio::spawn({
        let (sink, b1) = (sink.clone(), b1.clone());
        async move { sink.apply(&b1).await }
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    while conn.hlen::<_, usize>(sink.members_key()).await.unwrap() < 100 {
        assert!(Instant::now() < deadline, "the snapshot parts never started landing");
        tokio::time::sleep(Duration::from_millis(1)).await; // poll interval
    }
    server.kill();
    let interrupted = writer.await.unwrap();
    server.restart().await;
    if let Err(e) = &interrupted {
        assert!(e.is_transient(), "{e}");
        assert_eq!(checkpoint_with_retry(&sink).await, None, "checkpoint moved past unwritten parts");
        let landed: usize = redis_at(&server.url()).await.hlen(sink.members_key()).await.unwrap();
        assert!(landed >= 100, "committed parts survive the kill ({landed} rows)");
    }
    apply_with_retry(&*sink, &b1).await;
    assert_eq!(sink.checkpoint().await.unwrap(), Some(b1.checkpoint.clone()));

    server.kill();
    let b2 = batch(
        vec![
            live(
                Change::update("k1", row(&[("id", Value::Int(1)), ("name", Value::Text("b".into()))])),
                8,
                0,
            ),
            live(Change::delete("k2", row(&[("id", Value::Int(2))])), 8, 1),
        ],
        cp("8_1", 1, false),
    );
    let down = sink.apply(&b2).await;
    assert!(matches!(down, Err(ref e) if e.kind() == SinkErrorKind::Unavailable), "{down:?}");

    server.restart().await;
    apply_with_retry(&*sink, &b2).await;
    assert_eq!(sink.checkpoint().await.unwrap(), Some(b2.checkpoint.clone()));

    // Kill again after the commit: everything acknowledged survives the restart.
    server.kill();
    server.restart().await;
    let fresh = RedisSink::connect(config, ctx).await.unwrap();
    assert_eq!(checkpoint_with_retry(&fresh).await, Some(b2.checkpoint));
    let mut conn = redis_at(&server.url()).await;
    assert_eq!(hgetall(&mut conn, "items:1").await["name"], "b");
    assert!(!conn.exists::<_, bool>("items:2").await.unwrap());
    let present: usize = redis::cmd("EXISTS")
        .arg((3..3000).map(|i| format!("items:{i}")).collect::<Vec<_>>())
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(present, 2997);
    let members: usize = conn.hlen(fresh.members_key()).await.unwrap();
    assert_eq!(members, 2999);
}

/// A source type that only describes its shape, so pipeline files can be prepared.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ShapeOnlySource {
    table: String,
    #[serde(default)]
    full_rows: bool,
}

#[shapesync_core::async_trait]
impl shapesync_core::SourceConfig for ShapeOnlySource {
    fn shape(&self) -> ShapeInfo {
        ShapeInfo { table: self.table.clone(), full_rows: self.full_rows, ..Default::default() }
    }
    async fn build(
        self,
        _ctx: shapesync_core::SourceContext,
    ) -> Result<Box<dyn shapesync_core::Source>, shapesync_core::SourceError> {
        Err(shapesync_core::SourceError::setup("a test source never runs"))
    }
}

fn prepare(yaml: &str) -> Result<Vec<shapesync_core::PreparedPipeline>, Vec<shapesync_core::ConfigError>> {
    let mut registry = shapesync_core::Registry::new();
    registry.source::<ShapeOnlySource>("shape-only");
    shapesync_sink_redis::register(&mut registry);
    let mut config = shapesync_core::Config::default();
    config.merge(std::path::Path::new("p.yaml"), yaml, &|_| None).unwrap();
    registry.prepare(&config)
}

#[tokio::test]
async fn pipeline_files_name_type_redis_and_bad_settings_are_reported_by_key() {
    let prefix = format!("{}:", unique("registry"));
    let yaml = format!(
        "pipelines:\n  items:\n    source: {{type: shape-only, table: items}}\n    sink: {{type: redis, url: '{URL}', layout: json, key: 'item:{{id}}', primary_key: [id], prefix: '{prefix}'}}\n"
    );
    let mut pipelines = prepare(&yaml).unwrap_or_else(|e| panic!("{e:?}"));
    let sink = pipelines.remove(0).sink;
    assert_eq!(sink.type_name, "redis");
    let sink = sink.build().await.unwrap();
    sink.apply(&batch(vec![Change::insert("k", full_row(5, "a"))], cp("0_0", 1, true))).await.unwrap();
    let stored: String = redis().await.get(format!("{prefix}item:5")).await.unwrap();
    assert!(stored.contains(r#""name":"a""#));
    cleanup(&prefix).await;

    let unknown = yaml.replace("layout: json", "layout: json, ttl: 60");
    let errors = prepare(&unknown).err().unwrap();
    assert!(errors[0].to_string().contains("ttl"), "{}", errors[0]);

    let non_key = yaml.replace("item:{id}", "item:{name}");
    let errors = prepare(&non_key).err().unwrap();
    assert_eq!(errors[0].key, "pipelines.items.sink.key", "{}", errors[0]);
    assert!(prepare(&non_key.replace("table: items}", "table: items, full_rows: true}")).is_ok());
}

#[tokio::test]
async fn a_pipeline_starts_while_redis_is_down_and_reports_unavailable_until_it_is_up() {
    let mut server = OwnRedis::start().await;
    server.kill();
    let yaml = format!(
        "pipelines:\n  items:\n    source: {{type: shape-only, table: items}}\n    sink: {{type: redis, url: '{}', timeout_ms: 1000}}\n",
        server.url()
    );
    let mut pipelines = prepare(&yaml).unwrap_or_else(|e| panic!("{e:?}"));
    let sink = pipelines.remove(0).sink.build().await.expect("an unreachable Redis does not fail the build");
    assert!(matches!(sink.checkpoint().await, Err(ref e) if e.kind() == SinkErrorKind::Unavailable));

    server.restart().await;
    let b = batch(vec![Change::insert("k", full_row(1, "a"))], cp("0_inf", 1, false));
    apply_with_retry(&*sink, &b).await;
    assert_eq!(sink.checkpoint().await.unwrap(), Some(b.checkpoint));
}

#[tokio::test]
async fn database_setting_selects_the_redis_database() {
    let mut setup = Setup::new("database", Layout::Hash);
    setup.config.database = Some(3);
    let sink = setup.sink().await;
    sink.apply(&batch(vec![Change::insert("k", full_row(1, "a"))], cp("0_inf", 1, false))).await.unwrap();
    assert_eq!(keys_with_prefix(&mut redis().await, &setup.prefix).await, Vec::<String>::new());
    let mut db3 = redis_at(&format!("{URL}/3")).await;
    assert_eq!(hgetall(&mut db3, &setup.key("1")).await["name"], "a");
    sink.reset().await.unwrap();
    let lease = format!("{}shapesync:p:lease", setup.prefix);
    assert_eq!(keys_with_prefix(&mut db3, &setup.prefix).await, vec![lease]);
}

#[tokio::test]
async fn a_live_transaction_of_ten_thousand_rows_commits_atomically() {
    // One live unit with 10,000 inserts and then 10,000 deletes: more membership entries
    // than one Lua `unpack` can take (8000 values) must still commit, with its checkpoint.
    let setup = Setup::new("bigtx", Layout::Hash);
    let sink = setup.sink().await;
    let inserts: Vec<Change> = (0..10_000)
        .map(|i| live(Change::insert(format!("k{i}"), full_row(i, "x")), 10, 2 * i as u64))
        .collect();
    sink.apply(&batch(inserts, cp("10_19998", 1, false))).await.unwrap();
    let mut conn = redis().await;
    let members: u64 = redis::cmd("HLEN").arg(sink.members_key()).query_async(&mut conn).await.unwrap();
    assert_eq!(members, 10_000);
    assert_eq!(hgetall(&mut conn, &setup.key("9999")).await["name"], "x");

    let deletes: Vec<Change> = (0..10_000)
        .map(|i| live(Change::delete(format!("k{i}"), row(&[("id", Value::Int(i))])), 11, 2 * i as u64))
        .collect();
    sink.apply(&batch(deletes, cp("11_19998", 1, false))).await.unwrap();
    assert_eq!(sink.checkpoint().await.unwrap().unwrap().offset.to_string(), "11_19998");
    let members: u64 = redis::cmd("HLEN").arg(sink.members_key()).query_async(&mut conn).await.unwrap();
    assert_eq!(members, 0);
    assert!(keys_with_prefix(&mut conn, &format!("{}items:", setup.prefix)).await.is_empty());
    cleanup(&setup.prefix).await;
}

/// Runs `openssl` with `args` in `dir`.
fn openssl(dir: &std::path::Path, args: &[&str]) {
    let out = Command::new("openssl").args(args).current_dir(dir).output().expect("openssl is on PATH");
    assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

#[tokio::test]
async fn rediss_urls_connect_over_tls_verifying_the_server_against_ca_file() {
    // A private CA, and a certificate it signs for 127.0.0.1.
    let dir = std::env::temp_dir().join(unique("redis-tls"));
    std::fs::create_dir_all(&dir).unwrap();
    let quiet = ["-days", "1", "-nodes"];
    openssl(
        &dir,
        &[
            &["req", "-x509", "-newkey", "rsa:2048", "-keyout", "ca.key", "-out", "ca.crt"][..],
            &quiet,
            &["-subj", "/CN=shapesync test CA"],
        ]
        .concat(),
    );
    openssl(
        &dir,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=127.0.0.1",
        ],
    );
    std::fs::write(dir.join("san.ext"), "subjectAltName=IP:127.0.0.1\n").unwrap();
    openssl(
        &dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.crt",
            "-days",
            "1",
            "-extfile",
            "san.ext",
        ],
    );

    let port = free_port();
    let mut child = Command::new("redis-server")
        .args(["--port", "0", "--tls-port", &port.to_string(), "--save", "", "--appendonly", "no"])
        .args([
            "--tls-cert-file",
            "server.crt",
            "--tls-key-file",
            "server.key",
            "--tls-ca-cert-file",
            "ca.crt",
        ])
        .args(["--tls-auth-clients", "no"])
        .current_dir(&dir)
        .stdout(Stdio::null())
        .spawn()
        .expect("redis-server is on PATH");
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "redis-server with TLS did not come up");
        tokio::time::sleep(Duration::from_millis(20)).await; // poll interval
    }

    let ctx = SinkContext {
        pipeline: "tls".into(),
        shape: ShapeInfo { table: "items".into(), ..Default::default() },
    };
    let mut config = RedisSinkConfig::new(format!("rediss://127.0.0.1:{port}"));
    config.ca_file = Some(dir.join("ca.crt"));
    let sink =
        RedisSink::connect(config.clone(), ctx.clone()).await.expect("TLS connection verified by ca_file");
    let b = batch(vec![Change::insert("k1", full_row(1, "a"))], cp("0_inf", 1, false));
    sink.apply(&b).await.unwrap();
    assert_eq!(sink.checkpoint().await.unwrap(), Some(b.checkpoint));

    // Without the CA the server's certificate is unknown: refused, with advice.
    config.ca_file = None;
    let err = match RedisSink::connect(config.clone(), ctx.clone()).await {
        Err(e) => e,
        Ok(sink) => sink.checkpoint().await.unwrap_err(),
    };
    assert!(
        matches!(&err, e if e.kind() == SinkErrorKind::Rejected && e.message().contains("ca_file")),
        "{err}"
    );
    assert!(std::error::Error::source(&err).is_some_and(|s| s.is::<redis::RedisError>()), "{err:?}");
    // `ca_file` on a plain redis:// URL is a settings error.
    config.url = URL.into();
    config.ca_file = Some(dir.join("ca.crt"));
    assert_eq!(shapesync_core::SinkConfig::check(&config, &ctx).unwrap_err().key, "ca_file");

    child.kill().unwrap();
    child.wait().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_transaction_that_timed_out_but_committed_is_not_run_again() {
    // A live transaction Redis needs far longer than `timeout_ms` for: the first call
    // times out on the client's side but commits; the retry must learn so from the lease
    // and not run the whole unit again (every run would block readers as long again).
    // Each run publishes one message per row, so the messages count the runs.
    const ROWS: i64 = 20_000; // well past 20 ms of Redis' time on any machine
    let mut setup = Setup::new("timedout", Layout::Hash);
    let channel = format!("{}events", setup.prefix);
    setup.config.notify = Some(channel.clone());
    setup.config.timeout_ms = 20;
    let sink = setup.sink().await;
    let request = shapesync_core::LeaseRequest { owner: "me".into(), ttl_ms: 60_000, take: true };
    let fence = match sink.acquire(&request).await.unwrap() {
        shapesync_core::Acquisition::Owned { fence, .. } => fence,
        other => panic!("{other:?}"),
    };
    let mut pubsub = redis::Client::open(URL).unwrap().get_async_pubsub().await.unwrap();
    pubsub.subscribe(&channel).await.unwrap();
    let mut messages = pubsub.on_message();

    let changes =
        (0..ROWS).map(|i| live(Change::insert(format!("k{i}"), full_row(i, "a")), 9, i as u64)).collect();
    let tx = Batch { fence: Some(fence), ..batch(changes, cp("9_0", 1, false)) };
    let failures = apply_with_retry(&sink, &tx).await;
    assert!(failures > 0, "the transaction outlasted the 20 ms timeout at least once");

    // A marker published after the retries returned: every message of every run is before it.
    let _: () = redis().await.publish(&channel, "marker").await.unwrap();
    let mut published = 0;
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(30), messages.next()).await.unwrap().unwrap();
        if msg.get_payload::<String>().unwrap() == "marker" {
            break;
        }
        published += 1;
    }
    assert_eq!(published, ROWS, "the unit ran exactly once ({failures} timed-out attempts)");
    assert_eq!(sink.checkpoint().await.unwrap(), Some(tx.checkpoint.clone()));
    cleanup(&setup.prefix).await;
}
