//! `shapesync-bench postgres`: a synthetic shape into a table of a second Postgres
//! through the whole pipeline, with a concurrent reader.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::bail;
use shapesync_core::{Pipeline, RunMode, ShapeInfo, SinkConfig, SinkContext};
use shapesync_electric::{ShapeOptions, ShapeStream};
use shapesync_sink_postgres::PostgresSinkConfig;
use sqlx::AssertSqlSafe;
use tokio_util::sync::CancellationToken;

use crate::{ChildServer, procfs};

/// Runs the phases into a schema of the benchmark's own (dropped afterwards) and prints
/// the figures.
pub async fn run(url: &str, rows: u64, chunk_bytes: usize) -> anyhow::Result<()> {
    let pool = sqlx::PgPool::connect(url).await?;
    let schema = format!("shapesync_bench_{}", std::process::id());
    println!("postgres bench: {rows} rows into schema {schema}");
    for with_reader in [false, true] {
        let sql = format!("DROP SCHEMA IF EXISTS {schema} CASCADE; CREATE SCHEMA {schema}");
        sqlx::raw_sql(AssertSqlSafe(sql)).execute(&pool).await?;
        let server = ChildServer::start("items", rows, chunk_bytes)?;
        let config = PostgresSinkConfig { schema: schema.clone(), ..PostgresSinkConfig::new(url) };
        let ctx = SinkContext {
            pipeline: "bench".into(),
            shape: ShapeInfo { table: "items".into(), ..Default::default() },
        };
        let sink = config.build(ctx).await?;
        let stop = Arc::new(AtomicBool::new(false));
        let reader = with_reader.then(|| {
            let (pool, stop) = (pool.clone(), stop.clone());
            let sql = format!("SELECT title FROM {schema}.items WHERE id = 1");
            tokio::spawn(async move {
                let mut lat = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let t = Instant::now();
                    // The table appears with the first batch; until then the query fails.
                    let _ = sqlx::query_scalar::<_, String>(AssertSqlSafe(sql.clone()))
                        .fetch_optional(&pool)
                        .await;
                    lat.push(t.elapsed());
                }
                lat.sort();
                let p99 = lat.get(lat.len() * 99 / 100).copied().unwrap_or_default();
                (lat.len(), p99, lat.last().copied().unwrap_or(Duration::ZERO))
            })
        });
        let (cpu0, server_cpu0) = (procfs::cpu_seconds(None), procfs::cpu_seconds(Some(server.pid())));
        let started = Instant::now();
        let source = ShapeStream::new(ShapeOptions::new(server.url.parse()?, "items"))?;
        Pipeline::new("bench", Box::new(source), sink)
            .run(RunMode::UntilUpToDate, CancellationToken::new())
            .await?;
        let secs = started.elapsed().as_secs_f64();
        let (own_cpu, server_cpu) =
            (procfs::cpu_seconds(None) - cpu0, procfs::cpu_seconds(Some(server.pid())) - server_cpu0);
        stop.store(true, Ordering::Relaxed);
        let synced: i64 = sqlx::query_scalar(AssertSqlSafe(format!("SELECT count(*) FROM {schema}.items")))
            .fetch_one(&pool)
            .await?;
        if synced as u64 != rows {
            bail!("expected {rows} rows in Postgres, found {synced}");
        }
        let rate = rows as f64 / secs;
        let per_row = |s: f64| s * 1e6 / rows as f64;
        match reader {
            None => {
                println!(
                    "pipeline: {rows} rows in {secs:.2} s = {rate:.0} rows/s; peak RSS {:.1} MiB",
                    procfs::mib(procfs::peak_rss_bytes())
                );
                println!(
                    "  CPU per row: server {:.2} µs, this process {:.2} µs (Postgres' own CPU is not counted)",
                    per_row(server_cpu),
                    per_row(own_cpu)
                );
            }
            Some(reader) => {
                let (count, p99, max) = reader.await?;
                println!(
                    "reader during a sync ({rate:.0} rows/s; primary-key lookup): n={count} p99={:.3} ms max={:.3} ms",
                    p99.as_secs_f64() * 1000.0,
                    max.as_secs_f64() * 1000.0
                );
            }
        }
    }
    sqlx::raw_sql(AssertSqlSafe(format!("DROP SCHEMA {schema} CASCADE"))).execute(&pool).await?;
    Ok(())
}
