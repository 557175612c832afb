//! `shapesync-bench postgres`: a synthetic shape into a table of a second Postgres
//! through the whole pipeline, with a concurrent reader.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::bail;
use shapesync_core::SinkConfig;
use shapesync_sink_postgres::PostgresSinkConfig;
use sqlx::AssertSqlSafe;

use crate::stats::Stats;
use crate::{TimedSync, bench_context};

/// Runs the phases into a schema of the benchmark's own (dropped afterwards) and prints
/// the figures.
pub async fn run(url: &str, rows: u64, chunk_bytes: usize) -> anyhow::Result<()> {
    let pool = sqlx::PgPool::connect(url).await?;
    let schema = format!("shapesync_bench_{}", std::process::id());
    println!("postgres bench: {rows} rows into schema {schema}");
    for with_reader in [false, true] {
        let sql = format!("DROP SCHEMA IF EXISTS {schema} CASCADE; CREATE SCHEMA {schema}");
        sqlx::raw_sql(AssertSqlSafe(sql)).execute(&pool).await?;
        let config = PostgresSinkConfig { schema: schema.clone(), ..PostgresSinkConfig::new(url) };
        let sink = config.build(bench_context()).await?;
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
                lat
            })
        });
        let timed = TimedSync::run(rows, chunk_bytes, sink).await?;
        stop.store(true, Ordering::Relaxed);
        let synced: i64 = sqlx::query_scalar(AssertSqlSafe(format!("SELECT count(*) FROM {schema}.items")))
            .fetch_one(&pool)
            .await?;
        if synced as u64 != rows {
            bail!("expected {rows} rows in Postgres, found {synced}");
        }
        match reader {
            None => timed.print("pipeline; Postgres' own CPU is not counted"),
            Some(reader) => println!(
                "reader during a sync ({:.0} rows/s; primary-key lookup): {}",
                timed.rate,
                Stats::of(reader.await?)
            ),
        }
    }
    sqlx::raw_sql(AssertSqlSafe(format!("DROP SCHEMA {schema} CASCADE"))).execute(&pool).await?;
    Ok(())
}
