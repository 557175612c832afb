//! `shapesync-bench invalidate`: the Redis sink's cache modes on the same live
//! transactions, side by side — `mode: invalidate` (two templates, one over a column
//! outside the key, so updates that move a row name three keys), `mode: refresh`,
//! `mode: mirror`, and the raw limit: the same `UNLINK`s and tombstone `SET`s pipelined
//! without a script or a fence. The changes go straight to the sink (no shape server), so
//! this is the sink's cost alone.

use std::sync::Arc;
use std::time::Instant;

use shapesync_core::{
    Batch, Change, Checkpoint, Fence, LogPosition, Row, Schema, ShapeInfo, Sink, SinkConfig, SinkContext,
    Value,
};
use shapesync_sink_redis::{Mode, RedisSinkConfig, guard};

/// Settings of one run.
pub struct InvalidateBench {
    /// Redis URL.
    pub url: String,
    /// Rows cached (and changed).
    pub rows: u64,
    /// Transactions applied.
    pub txs: u64,
    /// Changes per transaction.
    pub tx_size: u64,
}

fn schema() -> Schema {
    serde_json::from_str(r#"{"id":{"type":"int8","pk_index":0},"org":{"type":"int8","not_null":true},"title":{"type":"text"}}"#)
        .expect("a valid schema")
}

/// Change `n` of the run: an update of row `n % rows` that moves it to another org.
fn change(n: u64, rows: u64) -> Change {
    let id = (n % rows) as i64;
    let org = (n % 7) as i64;
    let row: Row = [
        ("id".to_owned(), Value::Int(id)),
        ("org".to_owned(), Value::Int(org)),
        ("title".to_owned(), Value::Text(format!("item {id} v{n}"))),
    ]
    .into();
    let mut c = Change::update(format!("\"public\".\"items\"/\"{id}\""), row);
    c.old_value = Some([("org".to_owned(), Value::Int((org + 1) % 7))].into());
    c.position = Some(LogPosition { lsn: n + 1, op_position: 0 });
    c
}

/// Applies the run's transactions to a sink in `mode`; changes per second.
async fn through_sink(b: &InvalidateBench, mode: Mode, prefix: &str) -> anyhow::Result<f64> {
    let mut config = RedisSinkConfig::new(&b.url);
    config.mode = mode;
    config.prefix = prefix.to_owned();
    match mode {
        Mode::Invalidate => config.keys = vec!["item:{id}".into(), "org:{org}:items".into()],
        Mode::Refresh => {
            config.layout = shapesync_sink_redis::Layout::Json; // the cache holds JSON strings
            config.key = Some("item:{id}".into());
            config.keys = vec!["org:{org}:items".into()];
        }
        Mode::Mirror => {
            config.layout = shapesync_sink_redis::Layout::Json;
            config.key = Some("item:{id}".into());
        }
    }
    let ctx = SinkContext {
        pipeline: "bench".into(),
        shape: ShapeInfo {
            table: "items".into(),
            full_rows: true,
            changes_only: mode != Mode::Mirror,
            ..Default::default()
        },
    };
    let sink: Arc<dyn Sink> = config.build(ctx).await?;
    let shapesync_core::Acquisition::Owned { fence, .. } = sink
        .acquire(&shapesync_core::LeaseRequest { owner: "bench".into(), ttl_ms: 60_000, take: true })
        .await?
    else {
        anyhow::bail!("the benchmark's pipeline lease is held elsewhere");
    };
    let started = Instant::now();
    for t in 0..b.txs {
        let mut changes: Vec<Change> = (0..b.tx_size).map(|i| change(t * b.tx_size + i, b.rows)).collect();
        if let Some(last) = changes.last_mut() {
            last.last_in_tx = true;
        }
        let offset = changes.last().and_then(|c| c.position).map_or(0, |p| p.lsn);
        let checkpoint = Checkpoint {
            shape_hash: "bench".into(),
            handle: "h".into(),
            offset: shapesync_core::Offset::new(offset, 0),
            schema: schema(),
            generation: 1,
            resyncing: false,
        };
        let mut batch = Batch::new(changes, checkpoint, false, true);
        batch.fence = Some(Fence { seq: fence.seq + t, ..fence.clone() });
        sink.apply(&batch).await?;
    }
    let secs = started.elapsed().as_secs_f64();
    sink.reset().await?;
    Ok((b.txs * b.tx_size) as f64 / secs)
}

/// The same keys' `UNLINK`s and tombstones, one pipeline per transaction; changes/s.
async fn raw(b: &InvalidateBench, prefix: &str) -> anyhow::Result<f64> {
    let mut conn = redis::Client::open(b.url.as_str())?.get_multiplexed_async_connection().await?;
    let started = Instant::now();
    for t in 0..b.txs {
        let mut pipe = redis::pipe();
        for i in 0..b.tx_size {
            let n = t * b.tx_size + i;
            let (id, org) = (n % b.rows, n % 7);
            for key in [
                format!("{prefix}item:{id}"),
                format!("{prefix}org:{org}:items"),
                format!("{prefix}org:{}:items", (org + 1) % 7),
            ] {
                pipe.cmd("UNLINK").arg(&key).ignore();
                pipe.cmd("SET").arg(guard::tombstone_key(&key)).arg(n).arg("PX").arg(10_000).ignore();
            }
        }
        pipe.query_async::<()>(&mut conn).await?;
    }
    Ok((b.txs * b.tx_size) as f64 / started.elapsed().as_secs_f64())
}

/// Fills the cache the sinks invalidate: one string per row.
async fn fill(b: &InvalidateBench, prefix: &str) -> anyhow::Result<()> {
    let mut conn = redis::Client::open(b.url.as_str())?.get_multiplexed_async_connection().await?;
    for chunk in (0..b.rows).collect::<Vec<_>>().chunks(10_000) {
        let mut pipe = redis::pipe();
        for id in chunk {
            pipe.cmd("SET").arg(format!("{prefix}item:{id}")).arg(r#"{"cached":true}"#).ignore();
        }
        pipe.query_async::<()>(&mut conn).await?;
    }
    Ok(())
}

/// Runs every variant on the same transactions and prints changes/s and the ratios.
pub async fn run(b: InvalidateBench) -> anyhow::Result<()> {
    let prefix = format!("bench-invalidate-{}:", std::process::id());
    println!("{} transactions of {} changes over {} cached rows at {}", b.txs, b.tx_size, b.rows, b.url);
    fill(&b, &prefix).await?;
    let raw_rate = raw(&b, &prefix).await?;
    println!("raw pipelined UNLINK + tombstone SET (no script, no fence): {raw_rate:.0} changes/s");
    for (name, mode) in
        [("invalidate", Mode::Invalidate), ("refresh", Mode::Refresh), ("mirror", Mode::Mirror)]
    {
        fill(&b, &prefix).await?;
        let rate = through_sink(&b, mode, &prefix).await?;
        println!("mode {name}: {rate:.0} changes/s ({:.0}% of raw)", 100.0 * rate / raw_rate);
    }
    let mut conn = redis::Client::open(b.url.as_str())?.get_multiplexed_async_connection().await?;
    let mut cursor = 0u64;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("*{prefix}*"))
            .arg("COUNT")
            .arg(10_000)
            .query_async(&mut conn)
            .await?;
        if !keys.is_empty() {
            redis::cmd("UNLINK").arg(&keys).query_async::<()>(&mut conn).await?;
        }
        if next == 0 {
            break;
        }
        cursor = next;
    }
    Ok(())
}
