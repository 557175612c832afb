//! `shapesync-bench`: benchmark commands that print their figures.
//!
//! - `client`: a synthetic N-row shape through the Electric client alone (messages/s,
//!   peak RSS). The server runs in a child process so the RSS is the client's own.
//!
//! - `redis`: the same shape into Redis through the whole pipeline, raw pipelined HSETs
//!   of the same rows for comparison, live latency, and reader stalls.
//!
//! - `sqlite`: the same shape into a SQLite file through the whole pipeline, raw
//!   prepared inserts of the same rows for comparison, and a concurrent reader.
//!
//! - `postgres`: the same shape into a table of a Postgres database, and a concurrent
//!   reader.
//!
//! Build with `--release`; figures and the machine go into `docs/PERFORMANCE.md`.

/// The same allocator as the `shapesync` binary, so figures carry over.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod invalidate_bench;
mod postgres_bench;
mod procfs;
mod redis_bench;
mod sqlite_bench;
mod stats;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::thread;
use std::time::Instant;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use shapesync_core::{Pipeline, RunMode, ShapeInfo, Sink, SinkContext};
use shapesync_electric::{ShapeEvent, ShapeOptions, ShapeStream};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(name = "shapesync-bench", about = "shapesync benchmarks")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Sync a synthetic shape through the Electric client alone; print messages/s and peak RSS.
    Client {
        /// Rows in the synthetic shape.
        #[arg(long, default_value_t = 1_000_000)]
        rows: u64,
        /// Server chunk size in bytes (Electric's default is 10 MiB).
        #[arg(long, default_value_t = 10 * 1024 * 1024)]
        chunk_bytes: usize,
    },
    /// Sync a synthetic shape into Redis through the whole pipeline; compare with raw
    /// pipelined HSETs; measure live latency and the stalls a concurrent reader sees.
    Redis {
        /// Redis URL.
        #[arg(long, default_value = "redis://127.0.0.1:6379")]
        url: String,
        /// Rows in the synthetic shape.
        #[arg(long, default_value_t = 1_000_000)]
        rows: u64,
        /// Rows that vanish across the refetch (swept).
        #[arg(long, default_value_t = 100_000)]
        vanish: u64,
        /// Single-row transactions timed for live latency.
        #[arg(long, default_value_t = 1_000)]
        live_txs: usize,
        /// Server chunk size in bytes.
        #[arg(long, default_value_t = 10 * 1024 * 1024)]
        chunk_bytes: usize,
        /// Redis sink part size (rows per atomic unit during snapshots).
        #[arg(long, default_value_t = shapesync_sink_redis::defaults::PART_SIZE)]
        part_size: usize,
        /// Source responses buffered ahead of the sink (the pipeline's `buffer`).
        #[arg(long, default_value_t = shapesync_core::config::defaults::BUFFER)]
        buffer: usize,
        /// Pin the reader process to this CPU (see docs/PERFORMANCE.md).
        #[arg(long)]
        reader_cpu: Option<usize>,
        /// Run a Redis server of the benchmark's own (`redis-server` from PATH) alone on
        /// the last CPU, with the reader beside it and the load on the other CPUs: what
        /// Redis makes readers wait, without the load generators competing for its CPU.
        #[arg(long, conflicts_with_all = ["url", "reader_cpu"])]
        isolate: bool,
    },
    /// Sync a synthetic shape into a SQLite file through the whole pipeline; compare
    /// with raw prepared inserts; time a concurrent reader.
    Sqlite {
        /// Rows in the synthetic shape.
        #[arg(long, default_value_t = 1_000_000)]
        rows: u64,
        /// Server chunk size in bytes.
        #[arg(long, default_value_t = 10 * 1024 * 1024)]
        chunk_bytes: usize,
        /// Directory for the database files (removed afterwards); default: the system's
        /// temporary directory.
        #[arg(long)]
        dir: Option<std::path::PathBuf>,
    },
    /// Sync a synthetic shape into a table of a Postgres database through the whole
    /// pipeline; time a concurrent reader.
    Postgres {
        /// The target database (a schema of the benchmark's own is created and dropped).
        #[arg(long, default_value = "postgres://postgres@127.0.0.1:5432/test")]
        url: String,
        /// Rows in the synthetic shape.
        #[arg(long, default_value_t = 1_000_000)]
        rows: u64,
        /// Server chunk size in bytes.
        #[arg(long, default_value_t = 10 * 1024 * 1024)]
        chunk_bytes: usize,
    },
    /// Apply live transactions to the Redis sink in `mode: invalidate`, `refresh` and
    /// `mirror`, beside the same keys' UNLINKs pipelined raw; print changes/s.
    Invalidate {
        /// Redis URL.
        #[arg(long, default_value = "redis://127.0.0.1:6379")]
        url: String,
        /// Rows cached (and changed).
        #[arg(long, default_value_t = 100_000)]
        rows: u64,
        /// Transactions applied.
        #[arg(long, default_value_t = 2_000)]
        txs: u64,
        /// Changes per transaction.
        #[arg(long, default_value_t = 10)]
        tx_size: u64,
    },
    /// (internal) the cache reader process of `redis`.
    #[command(hide = true)]
    ReadLoop {
        /// Redis URL.
        #[arg(long)]
        url: String,
        /// Hash to read.
        #[arg(long)]
        key: String,
    },
    /// (internal) serve a synthetic shape; used as the benchmarks' child process.
    #[command(hide = true)]
    Serve(shapesync_shape_server::cli::SyntheticServerArgs),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Cmd::ReadLoop { url, key } = &cli.command {
        return redis_bench::read_loop(url, key);
    }
    let mut redis_cpu = None;
    if let Cmd::Redis { isolate: true, .. } = cli.command {
        // Pin before the runtime starts: its threads, and the servers this process
        // spawns, inherit the main thread's CPUs.
        let cpus = thread::available_parallelism()?.get();
        if cpus < 2 {
            bail!("--isolate needs at least 2 CPUs, this process may use {cpus}");
        }
        let load = if cpus == 2 { "0".to_owned() } else { format!("0-{}", cpus - 2) };
        let pinned = Command::new("taskset")
            .args(["-p", "-c", &load, &std::process::id().to_string()])
            .stdout(Stdio::null())
            .status();
        if !pinned.is_ok_and(|s| s.success()) {
            bail!("cannot pin the benchmark to CPUs {load} with taskset");
        }
        redis_cpu = Some(cpus - 1);
    }
    if matches!(cli.command, Cmd::Redis { .. }) {
        // The load (this process's threads and the synthetic server it spawns) yields to
        // Redis and the reader process; threads inherit the main thread's niceness.
        let reniced = Command::new("renice")
            .args(["-n", "10", "-p", &std::process::id().to_string()])
            .stdout(Stdio::null())
            .status();
        if !reniced.is_ok_and(|s| s.success()) {
            eprintln!(
                "warning: could not lower the benchmark's priority; reader figures include CPU contention"
            );
        }
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async {
        match cli.command {
            Cmd::Client { rows, chunk_bytes } => client(rows, chunk_bytes).await,
            Cmd::Redis {
                url, rows, vanish, live_txs, chunk_bytes, part_size, buffer, reader_cpu, ..
            } => {
                let dedicated = redis_cpu.map(redis_bench::DedicatedRedis::start).transpose()?;
                redis_bench::run(redis_bench::RedisBench {
                    url: dedicated.as_ref().map_or(url, |d| d.url.clone()),
                    rows,
                    vanish: vanish.min(rows),
                    live_txs,
                    chunk_bytes,
                    part_size,
                    buffer,
                    reader_cpu: reader_cpu.or(redis_cpu),
                    dedicated,
                })
                .await
            }
            Cmd::Sqlite { rows, chunk_bytes, dir } => {
                sqlite_bench::run(rows, chunk_bytes, &sqlite_bench::directory(dir)?).await
            }
            Cmd::Postgres { url, rows, chunk_bytes } => postgres_bench::run(&url, rows, chunk_bytes).await,
            Cmd::Invalidate { url, rows, txs, tx_size } => {
                invalidate_bench::run(invalidate_bench::InvalidateBench {
                    url,
                    rows,
                    txs,
                    tx_size: tx_size.max(1),
                })
                .await
            }
            Cmd::Serve(args) => Ok(shapesync_shape_server::cli::run_synthetic_server(args).await?),
            Cmd::ReadLoop { .. } => unreachable!("handled before the runtime starts"),
        }
    })
}

/// The context every benchmark sink runs in: pipeline `bench`, table `items`.
pub fn bench_context() -> SinkContext {
    SinkContext { pipeline: "bench".into(), shape: ShapeInfo { table: "items".into(), ..Default::default() } }
}

/// One sync of a fresh synthetic server's rows into a sink: how fast, and the CPU each
/// side spent.
pub struct TimedSync {
    /// Rows per second.
    pub rate: f64,
    rows: u64,
    secs: f64,
    own_cpu: f64,
    server_cpu: f64,
}

impl TimedSync {
    /// Syncs `rows` synthetic rows into `sink` until up to date.
    pub async fn run(rows: u64, chunk_bytes: usize, sink: Arc<dyn Sink>) -> anyhow::Result<TimedSync> {
        let server = ChildServer::start("items", rows, chunk_bytes)?;
        let (cpu0, server_cpu0) = (procfs::cpu_seconds(None), procfs::cpu_seconds(Some(server.pid())));
        let started = Instant::now();
        let source = ShapeStream::new(ShapeOptions::new(server.url.parse()?, "items"))?;
        Pipeline::new("bench", Box::new(source), sink)
            .run(RunMode::UntilUpToDate, CancellationToken::new())
            .await?;
        let secs = started.elapsed().as_secs_f64();
        Ok(TimedSync {
            rate: rows as f64 / secs,
            rows,
            secs,
            own_cpu: procfs::cpu_seconds(None) - cpu0,
            server_cpu: procfs::cpu_seconds(Some(server.pid())) - server_cpu0,
        })
    }

    /// Prints rows/s, peak RSS and CPU per row; `own` names what this process ran.
    pub fn print(&self, own: &str) {
        let per_row = |s: f64| s * 1e6 / self.rows as f64;
        println!(
            "pipeline: {} rows in {:.2} s = {:.0} rows/s; peak RSS {:.1} MiB",
            self.rows,
            self.secs,
            self.rate,
            procfs::mib(procfs::peak_rss_bytes())
        );
        println!(
            "  CPU per row: server {:.2} µs, this process ({own}) {:.2} µs",
            per_row(self.server_cpu),
            per_row(self.own_cpu)
        );
    }
}

/// A synthetic shape server in a child process, killed on drop.
pub struct ChildServer {
    child: Child,
    /// The shape endpoint.
    pub url: String,
}

impl ChildServer {
    /// Starts `shapesync-bench serve` with `rows` rows and returns once it listens.
    pub fn start(table: &str, rows: u64, chunk_bytes: usize) -> anyhow::Result<Self> {
        let mut child = Command::new(std::env::current_exe()?)
            .args(["serve", "--listen", "127.0.0.1:0", "--table", table, "--rows", &rows.to_string()])
            .args(["--chunk-bytes", &chunk_bytes.to_string()])
            .stdout(Stdio::piped())
            .spawn()
            .context("cannot start the synthetic server")?;
        let stdout = child.stdout.take().context("server stdout")?;
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        let Some(url) = line.split_whitespace().find(|w| w.starts_with("http://")) else {
            let _ = child.kill();
            bail!("the synthetic server did not print its URL: {line:?}");
        };
        let url = url.split('?').next().unwrap_or(url).to_owned();
        Ok(ChildServer { child, url })
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for ChildServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn client(rows: u64, chunk_bytes: usize) -> anyhow::Result<()> {
    let server = ChildServer::start("items", rows, chunk_bytes)?;
    let rss_before = procfs::peak_rss_bytes();
    let mut stream = ShapeStream::new(ShapeOptions::new(server.url.parse()?, "items"))?;
    let started = Instant::now();
    let (mut messages, mut responses) = (0u64, 0u64);
    loop {
        match stream.next_event().await? {
            ShapeEvent::Response(r) => {
                responses += 1;
                messages += r.changes.len() as u64;
                if r.up_to_date {
                    break;
                }
            }
            ShapeEvent::MustRefetch { .. } => bail!("unexpected must-refetch from the synthetic server"),
        }
    }
    let secs = started.elapsed().as_secs_f64();
    if messages != rows {
        bail!("expected {rows} messages, got {messages}");
    }
    println!("client: {messages} messages in {responses} responses, {secs:.2} s");
    println!("client: {:.0} messages/s", messages as f64 / secs);
    println!(
        "client: peak RSS {:.1} MiB (before streaming {:.1} MiB), chunk size {:.1} MiB",
        procfs::mib(procfs::peak_rss_bytes()),
        procfs::mib(rss_before),
        chunk_bytes as f64 / 1048576.0
    );
    Ok(())
}
