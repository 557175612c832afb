//! Micro-benchmark: rows/s for snapshot rows applied through the Redis sink (in parts of
//! `part_size`, with membership and checkpoint) versus the same rows written as raw
//! pipelined `HSET`s. Uses keys under a unique prefix and deletes them afterwards.
//!
//! `cargo run --release -p shapesync-sink-redis --example snapshot_bench -- [rows] [redis-url]`

use std::time::{Duration, Instant};

use redis::AsyncCommands;
use shapesync_core::{Batch, Change, Checkpoint, Row, ShapeInfo, Sink, SinkContext, Value};
use shapesync_sink_redis::{RedisSink, RedisSinkConfig};

/// Rows per batch, like one Electric snapshot chunk.
const CHUNK: usize = 10_000;
/// Commands per round trip for the raw baseline (the sink's default part size).
const PIPELINE: usize = 500;

fn row(i: usize) -> Row {
    [
        ("id", Value::Int(i as i64)),
        ("name", Value::Text(format!("project {i}"))),
        ("score", Value::Float(i as f64 / 7.0)),
        ("active", Value::Bool(i.is_multiple_of(2))),
        ("note", Value::Null),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect()
}

fn rate(rows: usize, took: Duration) -> String {
    format!("{rows} rows in {:.2}s = {:.0} rows/s", took.as_secs_f64(), rows as f64 / took.as_secs_f64())
}

async fn delete_prefix(conn: &mut redis::aio::MultiplexedConnection, prefix: &str) {
    let mut cursor = 0u64;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{prefix}*"))
            .arg("COUNT")
            .arg(1000)
            .query_async(conn)
            .await
            .unwrap();
        if !keys.is_empty() {
            let _: () = conn.unlink(keys).await.unwrap();
        }
        if next == 0 {
            return;
        }
        cursor = next;
    }
}

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let rows: usize = args.next().map_or(1_000_000, |n| n.parse().expect("rows is a number"));
    let url = args.next().unwrap_or_else(|| "redis://127.0.0.1:6379".into());
    let prefix = format!("bench-{}:", std::process::id());
    let schema: shapesync_core::Schema = serde_json::from_str(
        r#"{"id":{"type":"int8","pk_index":0},"name":{"type":"text"},"score":{"type":"float8"},"active":{"type":"bool"},"note":{"type":"text"}}"#,
    )
    .unwrap();
    let mut config = RedisSinkConfig::new(url.clone());
    config.prefix = format!("{prefix}sink:");
    let ctx = SinkContext {
        pipeline: "bench".into(),
        shape: ShapeInfo { table: "projects".into(), ..Default::default() },
    };
    let sink = RedisSink::connect(config, ctx).await.expect("redis is reachable");
    let mut conn = redis::Client::open(url).unwrap().get_multiplexed_async_connection().await.unwrap();

    let mut took = Duration::ZERO;
    let chunks = rows.div_ceil(CHUNK);
    for n in 0..chunks {
        let changes: Vec<Change> =
            (n * CHUNK..rows.min((n + 1) * CHUNK)).map(|i| Change::insert(format!("k{i}"), row(i))).collect();
        let offset = if n + 1 == chunks { "0_inf".to_owned() } else { format!("0_{n}") };
        let batch = Batch {
            changes,
            checkpoint: Checkpoint {
                shape_hash: "bench".into(),
                handle: "h".into(),
                offset: offset.parse().unwrap(),
                schema: schema.clone(),
                generation: 1,
                resyncing: false,
            },
            sweep: false,
            up_to_date: n + 1 == chunks,
        };
        let start = Instant::now();
        sink.apply(&batch).await.unwrap();
        took += start.elapsed();
    }
    println!("sink (parts of {}): {}", shapesync_sink_redis::defaults::PART_SIZE, rate(rows, took));

    let start = Instant::now();
    for first in (0..rows).step_by(PIPELINE) {
        let mut pipe = redis::pipe();
        for i in first..rows.min(first + PIPELINE) {
            let fields: Vec<(String, String)> = row(i)
                .into_iter()
                .filter_map(|(k, v)| v.render().map(|v| (k.to_string(), v.into_owned())))
                .collect();
            pipe.hset_multiple(format!("{prefix}raw:projects:{i}"), &fields).ignore();
        }
        let _: () = pipe.query_async(&mut conn).await.unwrap();
    }
    println!("raw pipelined HSET ({PIPELINE} per round trip): {}", rate(rows, start.elapsed()));

    delete_prefix(&mut conn, &prefix).await;
}
