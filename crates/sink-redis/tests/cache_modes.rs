//! `mode: invalidate` and `mode: refresh` against the real Redis at 127.0.0.1:6379:
//! which keys a change removes or rewrites, the tombstones that refuse a stale fill,
//! and the full invalidation when continuity with the shape is lost. Each test owns a
//! unique key prefix.

use redis::AsyncCommands;
use redis::aio::MultiplexedConnection;
use shapesync_core::{
    Batch, Change, Checkpoint, LogPosition, ResyncReason, Row, Schema, ShapeInfo, Sink, SinkContext,
    SinkErrorKind, Value,
};
use shapesync_sink_redis::guard::{self, FillOptions, FillValue};
use shapesync_sink_redis::{Layout, Mode, RedisSink, RedisSinkConfig};

mod common;
use common::{URL, unique};

fn schema() -> Schema {
    serde_json::from_str(
        r#"{"id":{"type":"int8","pk_index":0},"org_id":{"type":"int8"},"name":{"type":"text"}}"#,
    )
    .unwrap()
}

fn cp(offset: &str) -> Checkpoint {
    Checkpoint {
        shape_hash: "shape".into(),
        handle: "h-1".into(),
        offset: offset.parse().unwrap(),
        schema: schema(),
        generation: 1,
        resyncing: false,
    }
}

fn row(id: i64, org: Option<i64>, name: &str) -> Row {
    [
        ("id".to_owned(), Value::Int(id)),
        ("org_id".to_owned(), org.map_or(Value::Null, Value::Int)),
        ("name".to_owned(), Value::Text(name.into())),
    ]
    .into()
}

fn live(mut change: Change, lsn: u64, op: u64) -> Change {
    change.position = Some(LogPosition { lsn, op_position: op });
    change.last_in_tx = true;
    change
}

/// An update under `replica: full`: the whole new row, and the old values of what changed.
fn moved(id: i64, from_org: i64, to_org: i64, lsn: u64) -> Change {
    let mut change = Change::update(format!("\"public\".\"projects\"/\"{id}\""), row(id, Some(to_org), "p"));
    change.old_value = Some([("org_id".to_owned(), Value::Int(from_org))].into());
    live(change, lsn, 0)
}

struct Setup {
    prefix: String,
    config: RedisSinkConfig,
    ctx: SinkContext,
}

impl Setup {
    fn new(name: &str, mode: Mode, keys: &[&str]) -> Self {
        let prefix = format!("{}:", unique(name));
        let mut config = RedisSinkConfig::new(URL);
        config.mode = mode;
        config.prefix = prefix.clone();
        config.keys = keys.iter().map(|k| (*k).to_owned()).collect();
        config.part_size = 100;
        config.notify = Some(format!("{prefix}changes"));
        let ctx = SinkContext {
            pipeline: "p".into(),
            shape: ShapeInfo {
                table: "projects".into(),
                full_rows: true,
                changes_only: true,
                ..Default::default()
            },
        };
        Setup { prefix, config, ctx }
    }

    async fn sink(&self) -> RedisSink {
        RedisSink::connect(self.config.clone(), self.ctx.clone()).await.unwrap()
    }

    fn key(&self, rest: &str) -> String {
        format!("{}{rest}", self.prefix)
    }

    fn fill_options(&self) -> FillOptions<'_> {
        FillOptions { prefix: &self.prefix, ..FillOptions::default() }
    }
}

async fn redis() -> MultiplexedConnection {
    redis::Client::open(URL).unwrap().get_multiplexed_async_connection().await.unwrap()
}

async fn exists(conn: &mut MultiplexedConnection, key: &str) -> bool {
    conn.exists(key).await.unwrap()
}

#[tokio::test]
async fn invalidate_removes_the_keys_of_the_old_and_the_new_values() {
    let s = Setup::new("inv-move", Mode::Invalidate, &["project:{id}", "org:{org_id}:projects"]);
    let sink = s.sink().await;
    let mut conn = redis().await;
    for key in ["project:1", "project:2", "org:1:projects", "org:2:projects", "org:3:projects"] {
        let _: () = conn.set(s.key(key), "cached").await.unwrap();
    }
    let mut notices = redis::Client::open(URL).unwrap().get_async_pubsub().await.unwrap();
    notices.subscribe(s.key("changes")).await.unwrap();

    // Project 1 moves from org 1 to org 2.
    sink.apply(&Batch::new(vec![moved(1, 1, 2, 10)], cp("10_0"), false, true)).await.unwrap();

    for gone in ["project:1", "org:1:projects", "org:2:projects"] {
        assert!(!exists(&mut conn, &s.key(gone)).await, "{gone} is invalidated");
        let ttl: i64 = conn.pttl(guard::tombstone_key(&s.key(gone))).await.unwrap();
        assert!(
            ttl > 0 && ttl <= s.config.tombstone_ms as i64,
            "{gone} has a tombstone living the window: {ttl}"
        );
    }
    for kept in ["project:2", "org:3:projects"] {
        assert!(exists(&mut conn, &s.key(kept)).await, "{kept} is not named by the change");
    }
    let stored = sink.checkpoint().await.unwrap().unwrap();
    assert_eq!(stored.offset.to_string(), "10_0", "the checkpoint is stored with the invalidations");

    let mut seen = Vec::new();
    let mut stream = notices.on_message();
    while seen.len() < 3 {
        use futures::StreamExt;
        let message = tokio::time::timeout(std::time::Duration::from_secs(5), stream.next())
            .await
            .expect("a notice per invalidated key")
            .unwrap();
        let body: serde_json::Value =
            serde_json::from_str(&message.get_payload::<String>().unwrap()).unwrap();
        seen.push(body["key"].as_str().unwrap().to_owned());
    }
    seen.sort();
    assert_eq!(seen, [s.key("org:1:projects"), s.key("org:2:projects"), s.key("project:1")]);

    // A delete names the keys of the row as it was; an insert those of the new row.
    let delete = live(Change::delete("k", row(2, Some(3), "p")), 11, 0);
    sink.apply(&Batch::new(vec![delete], cp("11_0"), false, true)).await.unwrap();
    assert!(!exists(&mut conn, &s.key("project:2")).await);
    assert!(!exists(&mut conn, &s.key("org:3:projects")).await);
}

#[tokio::test]
async fn a_stale_fill_is_refused_and_a_fresh_one_accepted() {
    let s = Setup::new("inv-fill", Mode::Invalidate, &["project:{id}"]);
    let sink = s.sink().await;
    let mut conn = redis().await;
    let script = redis::Script::new(guard::FILL_SCRIPT);
    let key = s.key("project:7");
    let options = s.fill_options();

    // A reader takes its ticket and reads the database (the old row)…
    let before = guard::ticket(&mut conn).await.unwrap();
    // …the row changes and the invalidation lands…
    let change = live(Change::update("k", row(7, Some(1), "new")), 20, 0);
    sink.apply(&Batch::new(vec![change], cp("20_0"), false, true)).await.unwrap();
    // …and the reader's fill of the old row is refused.
    let wrote =
        guard::fill(&mut conn, &script, &key, before, FillValue::String("old"), options).await.unwrap();
    assert!(!wrote, "a fill whose database read may predate the invalidation is refused");
    assert!(!exists(&mut conn, &key).await);

    // A reader that took its ticket after the invalidation read the new row: accepted.
    let after = guard::ticket(&mut conn).await.unwrap();
    let wrote =
        guard::fill(&mut conn, &script, &key, after, FillValue::String("new"), options).await.unwrap();
    assert!(wrote);
    let cached: String = conn.get(&key).await.unwrap();
    assert_eq!(cached, "new");

    // A ticket older than the window is refused whatever happened (its tombstone may be gone).
    let old = guard::ticket(&mut conn).await.unwrap() - options.window_ms * 1000 - 1;
    let other = s.key("project:8");
    let wrote = guard::fill(&mut conn, &script, &other, old, FillValue::String("x"), options).await.unwrap();
    assert!(!wrote, "a ticket older than the window is refused");

    // A hash fill replaces the key, with an expiry when asked.
    let fresh = guard::ticket(&mut conn).await.unwrap();
    let fields = [("id", "8"), ("name", "eight")];
    let with_expiry = FillOptions { expire_ms: 60_000, ..options };
    assert!(
        guard::fill(&mut conn, &script, &other, fresh, FillValue::Hash(&fields), with_expiry).await.unwrap()
    );
    let name: String = conn.hget(&other, "name").await.unwrap();
    assert_eq!(name, "eight");
    let ttl: i64 = conn.pttl(&other).await.unwrap();
    assert!(ttl > 0, "the expiry was set");
}

#[tokio::test]
async fn a_resync_invalidates_every_key_the_templates_can_name() {
    let s = Setup::new("inv-all", Mode::Invalidate, &["project:{id}", "org:{org_id}:projects"]);
    let sink = s.sink().await;
    let mut conn = redis().await;
    let mut pipe = redis::pipe();
    for i in 0..450 {
        pipe.set(s.key(&format!("project:{i}")), "cached").ignore();
        pipe.set(s.key(&format!("org:{i}:projects")), "cached").ignore();
    }
    for kept in ["projects-count", "org:1:members", "user:1"] {
        pipe.set(s.key(kept), "unrelated").ignore();
    }
    let _: () = pipe.query_async(&mut conn).await.unwrap();
    let script = redis::Script::new(guard::FILL_SCRIPT);
    let before = guard::ticket(&mut conn).await.unwrap();

    // A snapshot writes nothing (with `log: full` in a cache mode, its rows say nothing changed).
    let snapshot = Batch::new(vec![Change::insert("k", row(1000, Some(1), "s"))], cp("0_0"), false, false);
    sink.apply(&snapshot).await.unwrap();
    assert!(!exists(&mut conn, &s.key("project:1000")).await);
    assert!(exists(&mut conn, &s.key("project:1")).await, "a snapshot invalidates nothing by itself");

    // The batch that completes the resync invalidates everything the templates can name.
    let mut end = Batch::new(vec![], cp("0_inf"), true, true);
    end.resync_reason = Some(ResyncReason::MustRefetch);
    sink.apply(&end).await.unwrap();
    for i in [0, 1, 99, 100, 449] {
        assert!(!exists(&mut conn, &s.key(&format!("project:{i}"))).await, "project:{i}");
        assert!(!exists(&mut conn, &s.key(&format!("org:{i}:projects"))).await, "org:{i}:projects");
    }
    for kept in ["projects-count", "org:1:members", "user:1"] {
        assert!(exists(&mut conn, &s.key(kept)).await, "{kept} matches no template");
    }
    assert_eq!(sink.checkpoint().await.unwrap().unwrap().offset.to_string(), "0_inf");
    // A fill that read the database before the full invalidation is refused, even for a
    // key that was not cached when it ran.
    let wrote = guard::fill(
        &mut conn,
        &script,
        &s.key("project:5000"),
        before,
        FillValue::String("x"),
        s.fill_options(),
    )
    .await
    .unwrap();
    assert!(!wrote, "the flush stamp refuses fills older than it");
}

#[tokio::test]
async fn refresh_rewrites_only_keys_that_exist() {
    for layout in [Layout::Hash, Layout::Json] {
        let mut s = Setup::new("refresh", Mode::Refresh, &["org:{org_id}:projects"]);
        s.config.layout = layout;
        s.config.key = Some("project:{id}".into());
        let sink = s.sink().await;
        let mut conn = redis().await;
        let (hot, cold) = (s.key("project:1"), s.key("project:2"));
        match layout {
            Layout::Hash => {
                let _: () =
                    conn.hset_multiple(&hot, &[("id", "1"), ("org_id", "1"), ("name", "old")]).await.unwrap();
            }
            _ => {
                let _: () = conn.set(&hot, r#"{"id":1,"name":"old","org_id":1}"#).await.unwrap();
            }
        }
        let _: () = conn.pexpire(&hot, 600_000).await.unwrap();
        let _: () = conn.set(s.key("org:1:projects"), "[1]").await.unwrap();

        let changes = vec![
            live(Change::update("k1", row(1, Some(1), "new")), 30, 0),
            live(Change::update("k2", row(2, Some(1), "cold")), 30, 1),
        ];
        sink.apply(&Batch::new(changes, cp("30_1"), false, true)).await.unwrap();
        match layout {
            Layout::Hash => {
                let name: String = conn.hget(&hot, "name").await.unwrap();
                assert_eq!(name, "new", "{layout:?}: the hot key is rewritten in place");
            }
            _ => {
                let json: String = conn.get(&hot).await.unwrap();
                assert_eq!(json, r#"{"id":1,"name":"new","org_id":1}"#, "{layout:?}");
            }
        }
        let ttl: i64 = conn.pttl(&hot).await.unwrap();
        assert!(ttl > 0, "{layout:?}: the application's expiry stays");
        assert!(!exists(&mut conn, &cold).await, "{layout:?}: a cold row is not loaded into the cache");
        assert!(!exists(&mut conn, &s.key("org:1:projects")).await, "{layout:?}: `keys` are invalidated");
        assert!(
            conn.exists::<_, bool>(guard::tombstone_key(&cold)).await.unwrap(),
            "a cold key still gets a tombstone"
        );

        let delete = live(Change::delete("k1", row(1, Some(1), "new")), 31, 0);
        sink.apply(&Batch::new(vec![delete], cp("31_0"), false, true)).await.unwrap();
        assert!(!exists(&mut conn, &hot).await, "{layout:?}: a delete removes the key");
    }
}

#[tokio::test]
async fn templates_over_other_columns_need_full_rows() {
    let mut s = Setup::new("inv-replica", Mode::Invalidate, &["project:{id}", "org:{org_id}:projects"]);
    s.ctx.shape.full_rows = false;
    let sink = s.sink().await;
    let e = sink.check_rows(&schema()).await.unwrap_err();
    assert_eq!(e.kind(), SinkErrorKind::Rejected);
    assert!(e.message().contains("`org:{org_id}:projects`") && e.message().contains("`org_id`"), "{e}");
    assert!(e.message().contains("replica: full"), "{e}");
    // The first batch refuses it too, before anything is written.
    let change = live(Change::update("k", row(1, Some(1), "x")), 40, 0);
    let e = sink.apply(&Batch::new(vec![change], cp("40_0"), false, true)).await.unwrap_err();
    assert_eq!(e.kind(), SinkErrorKind::Rejected);
    assert!(sink.checkpoint().await.unwrap().is_none());
    // Primary-key templates work without it.
    let pk_only = Setup::new("inv-pk", Mode::Invalidate, &["project:{id}"]);
    let sink = RedisSink::connect(pk_only.config.clone(), s.ctx.clone()).await.unwrap();
    sink.check_rows(&schema()).await.unwrap();
}

#[tokio::test]
async fn reset_invalidates_everything_and_forgets_the_checkpoint() {
    let s = Setup::new("inv-reset", Mode::Invalidate, &["project:{id}"]);
    let sink = s.sink().await;
    let mut conn = redis().await;
    sink.apply(&Batch::new(vec![], cp("50_0"), false, true)).await.unwrap();
    let _: () = conn.set(s.key("project:3"), "cached").await.unwrap();
    sink.reset().await.unwrap();
    assert!(sink.checkpoint().await.unwrap().is_none());
    assert!(!exists(&mut conn, &s.key("project:3")).await);
}
