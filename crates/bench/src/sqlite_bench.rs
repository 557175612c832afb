//! `shapesync-bench sqlite`: a synthetic shape into a SQLite file through the whole
//! pipeline, next to raw prepared inserts of the same rows, with a concurrent reader.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use shapesync_core::SinkConfig;
use shapesync_sink_sqlite::SqliteSinkConfig;

use crate::stats::Stats;
use crate::{TimedSync, bench_context};

/// A reader in its own connection and thread, timing a primary-key lookup in a loop
/// until stopped.
fn start_reader(path: &Path, stop: Arc<AtomicBool>) -> thread::JoinHandle<anyhow::Result<Vec<Duration>>> {
    let path = path.to_owned();
    thread::spawn(move || {
        let conn = rusqlite::Connection::open(&path)?;
        let mut lat = Vec::with_capacity(1 << 20);
        let mut table_exists = false;
        while !stop.load(Ordering::Relaxed) {
            let t = Instant::now();
            if !table_exists {
                // The table appears with the first batch; until then, look for it.
                table_exists = conn.query_row(
                    "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'items')",
                    [],
                    |r| r.get::<_, bool>(0),
                )?;
            }
            if table_exists {
                match conn.query_row("SELECT title FROM items WHERE id = 1", [], |r| r.get::<_, String>(0)) {
                    Ok(_) | Err(rusqlite::Error::QueryReturnedNoRows) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            lat.push(t.elapsed());
        }
        Ok(lat)
    })
}

/// Syncs a fresh synthetic server into the file at `path`, with a reader if asked,
/// checks the row count, prints the figures and returns rows/s.
async fn sync(path: &Path, rows: u64, chunk_bytes: usize, with_reader: bool) -> anyhow::Result<f64> {
    let sink = SqliteSinkConfig::new(path).build(bench_context()).await?;
    let stop = Arc::new(AtomicBool::new(false));
    let reader = with_reader.then(|| start_reader(path, stop.clone()));
    let timed = TimedSync::run(rows, chunk_bytes, sink).await?;
    stop.store(true, Ordering::Relaxed);
    let reads = reader.map(|r| r.join().expect("reader thread")).transpose()?;
    let conn = rusqlite::Connection::open(path)?;
    let synced: i64 = conn.query_row("SELECT count(*) FROM items", [], |r| r.get(0))?;
    if synced as u64 != rows {
        bail!("expected {rows} rows in SQLite, found {synced}");
    }
    match reads {
        None => timed.print("pipeline and SQLite"),
        Some(lat) => println!(
            "reader during a sync ({:.0} rows/s; primary-key lookup in its own connection): {}",
            timed.rate,
            Stats::of(lat)
        ),
    }
    Ok(timed.rate)
}

/// Runs the phases and prints the figures.
pub async fn run(rows: u64, chunk_bytes: usize, dir: &Path) -> anyhow::Result<()> {
    let path = dir.join(format!("shapesync-bench-{}.db", std::process::id()));
    let raw_path = dir.join(format!("shapesync-bench-{}-raw.db", std::process::id()));
    let cleanup = |p: &Path| {
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", p.display()));
        }
    };
    cleanup(&path);
    cleanup(&raw_path);
    println!("sqlite bench: {rows} rows into {}", path.display());

    // Phase 1: the whole pipeline alone, for throughput and peak RSS.
    let rate = sync(&path, rows, chunk_bytes, false).await?;
    cleanup(&path);
    // Phase 2: the same with a reader polling a row in another connection.
    sync(&path, rows, chunk_bytes, true).await?;

    // Phase 2: raw prepared inserts of the same rows into the same table shape, one
    // transaction per 10,000 rows.
    let mut conn = rusqlite::Connection::open(&raw_path)?;
    conn.query_row("PRAGMA journal_mode = WAL", [], |_| Ok(()))?;
    conn.execute_batch(
        "PRAGMA synchronous = NORMAL;
         CREATE TABLE items (id INTEGER PRIMARY KEY, title TEXT, amount TEXT, flag INTEGER, tags TEXT, data TEXT)",
    )?;
    let started = Instant::now();
    let mut id = 1;
    while id <= rows {
        let tx = conn.transaction()?;
        {
            let mut stmt = tx.prepare_cached("INSERT INTO items VALUES (?1, ?2, ?3, ?4, ?5, ?6)")?;
            for _ in 0..10_000 {
                if id > rows {
                    break;
                }
                let row = shapesync_shape_server::synthetic_row(id);
                let flag = row[3].as_deref().map(|f| i64::from(f == "t"));
                stmt.execute(rusqlite::params![id as i64, row[1], row[2], flag, row[4], row[5]])?;
                id += 1;
            }
        }
        tx.commit()?;
    }
    let raw = rows as f64 / started.elapsed().as_secs_f64();
    println!("raw prepared INSERT: {raw:.0} rows/s; pipeline reaches {:.0}% of it", 100.0 * rate / raw);
    drop(conn);
    cleanup(&path);
    cleanup(&raw_path);
    Ok(())
}

/// The directory for the benchmark's files: `dir`, or the system's temporary directory.
pub fn directory(dir: Option<std::path::PathBuf>) -> anyhow::Result<std::path::PathBuf> {
    let dir = dir.unwrap_or_else(std::env::temp_dir);
    if !dir.is_dir() {
        return Err(anyhow::anyhow!("{} is not a directory", dir.display())).context("--dir");
    }
    Ok(dir)
}
