//! `shapesync-bench redis`: a synthetic shape into Redis through the whole pipeline,
//! next to raw pipelined HSETs of the same rows; live latency; reader stalls.

use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use shapesync_core::{Pipeline, RunMode, Sink, SinkConfig};
use shapesync_electric::{ShapeOptions, ShapeStream};
use shapesync_shape_server::{ServerOptions, ShapeServer};
use shapesync_sink_redis::RedisSinkConfig;
use tokio_util::sync::CancellationToken;

use crate::stats::Stats;
use crate::{ChildServer, procfs};

/// Settings of one run.
pub struct RedisBench {
    /// Redis URL.
    pub url: String,
    /// Rows in the synthetic shape.
    pub rows: u64,
    /// Rows removed before the refetch, so the sweep has work.
    pub vanish: u64,
    /// Single-row transactions timed for live latency.
    pub live_txs: usize,
    /// Server chunk size.
    pub chunk_bytes: usize,
    /// Sink part size.
    pub part_size: usize,
    /// Source responses buffered ahead of the sink.
    pub buffer: usize,
    /// Pin the reader process to this CPU (pin Redis there too, and the benchmark
    /// elsewhere, to see what Redis makes readers wait without CPU contention).
    pub reader_cpu: Option<usize>,
    /// The benchmark's own Redis server (`--isolate`), restarted before the initial
    /// sync with a reader, so that phase includes the server's first growth.
    pub dedicated: Option<DedicatedRedis>,
}

/// A Redis server of the benchmark's own for `--isolate`, stopped on drop. Its main
/// thread runs alone on one CPU; its background threads (lazy freeing of `UNLINK`ed
/// keys) run with the load, so they never take that CPU from the main thread. It keeps
/// nothing on disk.
pub struct DedicatedRedis {
    child: Child,
    cpu: usize,
    port: u16,
    /// Where it listens.
    pub url: String,
}

impl DedicatedRedis {
    /// Starts `redis-server` on a free loopback port, its main thread on `cpu` and its
    /// background threads on the CPUs below, and returns once it answers `PING`.
    pub fn start(cpu: usize) -> anyhow::Result<DedicatedRedis> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let dedicated = Self::start_on(cpu, port)?;
        println!(
            "dedicated Redis at {} (main thread on CPU {cpu}), load on CPUs {}",
            dedicated.url,
            Self::other_cpus(cpu)
        );
        Ok(dedicated)
    }

    /// Replaces the server with a fresh one on the same port: a phase that should see a
    /// server's first growth of memory (an initial sync) gets one.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        let _ = self.child.kill();
        let _ = self.child.wait();
        *self = Self::start_on(self.cpu, self.port)?;
        Ok(())
    }

    fn other_cpus(cpu: usize) -> String {
        if cpu == 1 { "0".to_owned() } else { format!("0-{}", cpu - 1) }
    }

    fn start_on(cpu: usize, port: u16) -> anyhow::Result<DedicatedRedis> {
        let child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
            .args(["--save", "", "--appendonly", "no"])
            .args(["--server_cpulist", &cpu.to_string(), "--bio_cpulist", &Self::other_cpus(cpu)])
            .stdout(Stdio::null())
            .spawn()
            .context("cannot start redis-server (is it on PATH?)")?;
        let dedicated = DedicatedRedis { child, cpu, port, url: format!("redis://127.0.0.1:{port}") };
        let client = redis::Client::open(dedicated.url.as_str())?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let answered =
                client.get_connection().and_then(|mut con| redis::cmd("PING").query::<String>(&mut con));
            match answered {
                Ok(_) => return Ok(dedicated),
                Err(e) if Instant::now() > deadline => {
                    bail!("the dedicated redis-server did not answer: {e}")
                }
                Err(_) => thread::sleep(Duration::from_millis(20)),
            }
        }
    }
}

impl Drop for DedicatedRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A cache reader: a separate process issuing `HGET` in a loop on its own connection,
/// recording each command's latency while a phase runs. It runs at normal priority
/// while the benchmark's load (pipeline, synthetic server) runs at nice 10, so on a
/// small machine its figures show what Redis makes readers wait, not CPU starvation
/// by the load generators.
struct Reader {
    child: Child,
}

impl Reader {
    fn start(url: &str, key: String, cpu: Option<usize>) -> anyhow::Result<Reader> {
        let mut command = match cpu {
            Some(cpu) => {
                let mut c = Command::new("taskset");
                c.args(["-c", &cpu.to_string(), "nice", "-n", "-10"]);
                c
            }
            None => {
                let mut c = Command::new("nice");
                c.args(["-n", "-10"]);
                c
            }
        };
        let child = command
            .arg(std::env::current_exe()?)
            .args(["read-loop", "--url", url, "--key", &key])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("cannot start the reader process")?;
        Ok(Reader { child })
    }

    fn finish(mut self) -> anyhow::Result<Stats> {
        drop(self.child.stdin.take()); // EOF: stop reading
        let out = self.child.wait_with_output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        let nanos: Vec<u64> = text.split_whitespace().map(str::parse).collect::<Result<_, _>>()?;
        let [count, p50, p99, p999, max] = nanos[..] else { bail!("reader printed {text:?}") };
        let d = Duration::from_nanos;
        Ok(Stats { count: count as usize, p50: d(p50), p99: d(p99), p999: d(p999), max: d(max) })
    }
}

/// The reader process: `HGET key title` until stdin closes, then prints
/// `count p50 p99 p99.9 max` in nanoseconds.
pub fn read_loop(url: &str, key: &str) -> anyhow::Result<()> {
    let mut con = redis::Client::open(url)?.get_connection()?;
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    thread::spawn(move || {
        let _ = std::io::copy(&mut std::io::stdin(), &mut std::io::sink());
        flag.store(true, Ordering::Relaxed);
    });
    let mut lat = Vec::with_capacity(1 << 20);
    while !stop.load(Ordering::Relaxed) {
        let t = Instant::now();
        let _: Option<String> = redis::cmd("HGET").arg(key).arg("title").query(&mut con)?;
        lat.push(t.elapsed());
    }
    let s = Stats::of(lat);
    let ns = |d: Duration| d.as_nanos();
    println!("{} {} {} {} {}", s.count, ns(s.p50), ns(s.p99), ns(s.p999), ns(s.max));
    Ok(())
}

async fn sink(b: &RedisBench, prefix: &str, notify: Option<String>) -> anyhow::Result<Arc<dyn Sink>> {
    let mut config = RedisSinkConfig::new(b.url.clone());
    config.prefix = prefix.to_owned();
    config.key = Some("item:{id}".into());
    config.part_size = b.part_size;
    config.notify = notify;
    Ok(config.build(crate::bench_context()).await?)
}

async fn sync_once(url: &str, sink: Arc<dyn Sink>, buffer: usize) -> anyhow::Result<()> {
    let source = ShapeStream::new(ShapeOptions::new(url.parse()?, "items"))?;
    Pipeline::new("bench", Box::new(source), sink)
        .with_buffer(buffer)
        .run(RunMode::UntilUpToDate, CancellationToken::new())
        .await?;
    Ok(())
}

fn count_keys(con: &mut redis::Connection, pattern: &str) -> anyhow::Result<u64> {
    let mut n = 0;
    let mut cursor = 0u64;
    loop {
        let (next, keys): (u64, Vec<String>) =
            redis::cmd("SCAN").arg(cursor).arg("MATCH").arg(pattern).arg("COUNT").arg(10_000).query(con)?;
        n += keys.len() as u64;
        if next == 0 {
            return Ok(n);
        }
        cursor = next;
    }
}

fn delete_prefix(con: &mut redis::Connection, prefix: &str) -> anyhow::Result<()> {
    let mut cursor = 0u64;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{prefix}*"))
            .arg("COUNT")
            .arg(10_000)
            .query(con)?;
        if !keys.is_empty() {
            redis::cmd("UNLINK").arg(&keys).query::<()>(con)?;
        }
        if next == 0 {
            return Ok(());
        }
        cursor = next;
    }
}

/// What a phase cost each process, and Redis' slowest commands during it.
struct PhaseProbe {
    redis_cpu: f64,
    own_cpu: f64,
    server: Option<(u32, f64)>,
    steal: f64,
}

impl PhaseProbe {
    /// Starts measuring; `server` is the synthetic server's process, if the phase has one.
    fn start(con: &mut redis::Connection, server: Option<u32>) -> anyhow::Result<PhaseProbe> {
        redis::cmd("CONFIG").arg("SET").arg("slowlog-log-slower-than").arg(1000).query::<()>(con)?;
        redis::cmd("SLOWLOG").arg("RESET").query::<()>(con)?;
        Ok(PhaseProbe {
            redis_cpu: redis_cpu(con)?,
            own_cpu: procfs::cpu_seconds(None),
            server: server.map(|pid| (pid, procfs::cpu_seconds(Some(pid)))),
            steal: procfs::steal_seconds(),
        })
    }

    /// "CPU per row: server a µs, shapesync b µs, Redis c µs; slowest Redis command z ms".
    /// Call before the server process ends.
    fn finish(self, con: &mut redis::Connection, rows: u64) -> anyhow::Result<String> {
        let cpu = redis_cpu(con)? - self.redis_cpu;
        let steal = procfs::steal_seconds() - self.steal;
        let own = procfs::cpu_seconds(None) - self.own_cpu;
        let per_row = |secs: f64| secs * 1e6 / rows.max(1) as f64;
        let server = self
            .server
            .map(|(pid, start)| format!("server {:.2} µs, ", per_row(procfs::cpu_seconds(Some(pid)) - start)))
            .unwrap_or_default();
        let entries: Vec<redis::Value> = redis::cmd("SLOWLOG").arg("GET").arg(128).query(con)?;
        let (slowest_us, slowest_cmd) = entries
            .iter()
            .filter_map(|e| match e {
                redis::Value::Array(fields) => match (fields.get(2), fields.get(3)) {
                    (Some(redis::Value::Int(us)), Some(redis::Value::Array(args))) => {
                        let name = match args.first() {
                            Some(redis::Value::BulkString(b)) => String::from_utf8_lossy(b).into_owned(),
                            _ => String::new(),
                        };
                        Some((*us, name))
                    }
                    _ => None,
                },
                _ => None,
            })
            .max()
            .unwrap_or_default();
        redis::cmd("CONFIG").arg("SET").arg("slowlog-log-slower-than").arg(10_000).query::<()>(con)?;
        Ok(format!(
            "CPU per row: {server}this process {:.2} µs, Redis {:.2} µs; stolen by the hypervisor {:.0} ms; slowest Redis command {} (slowlog threshold 1 ms)",
            per_row(own),
            per_row(cpu),
            steal * 1000.0,
            if slowest_us == 0 {
                "< 1 ms".to_owned()
            } else {
                format!("{:.2} ms ({slowest_cmd})", slowest_us as f64 / 1000.0)
            }
        ))
    }
}

fn redis_cpu(con: &mut redis::Connection) -> anyhow::Result<f64> {
    let info: String = redis::cmd("INFO").arg("cpu").query(con)?;
    let field = |name: &str| -> f64 {
        info.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(':')?.trim().parse().ok()).unwrap_or(0.0)
    };
    Ok(field("used_cpu_user") + field("used_cpu_sys"))
}

/// Syncs a fresh synthetic server of `rows` rows into the sink under `prefix`, with a
/// reader polling if `with_reader`, and checks Redis then holds exactly `rows` rows.
/// Returns the seconds taken, the reader's latencies and the server-side view.
async fn measured_sync(
    b: &RedisBench,
    con: &mut redis::Connection,
    prefix: &str,
    rows: u64,
    with_reader: bool,
) -> anyhow::Result<(f64, Option<Stats>, String)> {
    let server = ChildServer::start("items", rows, b.chunk_bytes)?;
    let reader =
        with_reader.then(|| Reader::start(&b.url, format!("{prefix}item:1"), b.reader_cpu)).transpose()?;
    let probe = PhaseProbe::start(con, Some(server.pid()))?;
    let started = Instant::now();
    sync_once(&server.url, sink(b, prefix, None).await?, b.buffer).await?;
    let secs = started.elapsed().as_secs_f64();
    let stalls = reader.map(Reader::finish).transpose()?;
    let server_view = probe.finish(con, rows)?;
    let synced = count_keys(con, &format!("{prefix}item:*"))?;
    if synced != rows {
        bail!("expected {rows} rows in Redis, found {synced}");
    }
    Ok((secs, stalls, server_view))
}

/// With a dedicated server, replaces it with a fresh one and reconnects `con`.
fn fresh_server(b: &mut RedisBench, con: &mut redis::Connection) -> anyhow::Result<()> {
    if let Some(dedicated) = &mut b.dedicated {
        dedicated.restart()?;
        *con = redis::Client::open(b.url.as_str())?.get_connection()?;
    }
    Ok(())
}

/// Runs every phase and prints the figures.
pub async fn run(mut b: RedisBench) -> anyhow::Result<()> {
    let prefix = format!("shapesync-bench:{}:", std::process::id());
    let mut con = redis::Client::open(b.url.as_str())?.get_connection().context("cannot connect to Redis")?;
    println!(
        "redis bench: {} rows, part_size {}, buffer {}, chunk {} MiB, prefix {prefix}",
        b.rows,
        b.part_size,
        b.buffer,
        b.chunk_bytes >> 20
    );

    // Phase 1: throughput and memory of the full pipeline, nothing else competing; the
    // server runs in a child process so the RSS is ours.
    let (secs, _, server_view) = measured_sync(&b, &mut con, &prefix, b.rows, false).await?;
    let pipeline_rate = b.rows as f64 / secs;
    println!(
        "pipeline: {} rows in {secs:.2} s = {pipeline_rate:.0} rows/s; peak RSS {:.1} MiB",
        b.rows,
        procfs::mib(procfs::peak_rss_bytes())
    );
    println!("  {server_view}");

    // Phase 2: refetch sweep, with a reader. A new server incarnation (the old handle is
    // unknown to it: 409) holds fewer rows, so the resync must sweep `vanish` rows.
    let kept = b.rows - b.vanish;
    let (secs, stalls, server_view) = measured_sync(&b, &mut con, &prefix, kept, true).await?;
    println!("refetch: resync of {kept} rows + sweep of {} in {secs:.2} s", b.vanish);
    println!("reader during refetch and sweep: {}", stalls.expect("with a reader"));
    println!("  {server_view}");
    delete_prefix(&mut con, &prefix)?;

    // Phase 3: the initial sync again, into an empty keyspace, with a reader.
    fresh_server(&mut b, &mut con)?;
    let (_, stalls, server_view) = measured_sync(&b, &mut con, &prefix, b.rows, true).await?;
    println!("reader during initial sync: {}", stalls.expect("with a reader"));
    println!("  {server_view}");
    delete_prefix(&mut con, &prefix)?;

    // Phase 4: raw pipelined HSETs of the same rows, same part size, same program, into
    // a fresh server as in phase 1.
    fresh_server(&mut b, &mut con)?;
    let raw_prefix = format!("{prefix}raw:");
    let probe = PhaseProbe::start(&mut con, None)?;
    let started = Instant::now();
    let mut pipe = redis::pipe();
    for id in 1..=b.rows {
        let row = shapesync_shape_server::synthetic_row(id);
        let cmd = pipe.cmd("HSET").arg(format!("{raw_prefix}item:{id}"));
        for (name, value) in shapesync_shape_server::SYNTHETIC_COLUMNS.iter().zip(&row) {
            if let Some(v) = value {
                cmd.arg(*name).arg(v);
            }
        }
        if id % b.part_size as u64 == 0 || id == b.rows {
            pipe.query::<()>(&mut con)?;
            pipe = redis::pipe();
        }
    }
    let raw_rate = b.rows as f64 / started.elapsed().as_secs_f64();
    println!(
        "raw pipelined HSET: {raw_rate:.0} rows/s; pipeline reaches {:.0}% of it",
        100.0 * pipeline_rate / raw_rate
    );
    println!("  {}", probe.finish(&mut con, b.rows)?);
    delete_prefix(&mut con, &raw_prefix)?;

    // Phase 5: live latency, append on the server → key visible (notify received).
    live_latency(&b, &prefix).await?;
    delete_prefix(&mut con, &prefix)?;
    Ok(())
}

async fn live_latency(b: &RedisBench, prefix: &str) -> anyhow::Result<()> {
    let server = ShapeServer::start(ServerOptions::default()).await?;
    let table = server.create_synthetic_table("items", 1_000);
    let channel = format!("{prefix}changes");
    let sink = sink(b, prefix, Some(channel.clone())).await?;

    // Subscriber on its own thread: forwards (key, arrival) of each notification.
    let (tx, rx) = mpsc::channel::<(String, Instant)>();
    let mut sub = redis::Client::open(b.url.as_str())?.get_connection()?;
    let subscribed = Arc::new(Mutex::new(false));
    let ready = subscribed.clone();
    thread::spawn(move || -> anyhow::Result<()> {
        let mut pubsub = sub.as_pubsub();
        pubsub.subscribe(&channel)?;
        *ready.lock().unwrap() = true;
        loop {
            let msg = pubsub.get_message()?;
            let at = Instant::now();
            let payload: String = msg.get_payload()?;
            if tx.send((payload, at)).is_err() {
                return Ok(());
            }
        }
    });
    while !*subscribed.lock().unwrap() {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }

    let source = ShapeStream::new(ShapeOptions::new(server.url().parse()?, "items"))?;
    let pipeline = Pipeline::new("bench-live", Box::new(source), sink);
    let status = pipeline.status();
    let stop = CancellationToken::new();
    let task = tokio::spawn(pipeline.run(RunMode::Follow, stop.clone()));
    while !status.has_reached_up_to_date() {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Drain the snapshot's notifications.
    let rx = Arc::new(Mutex::new(rx));
    let drain =
        |rx: &mpsc::Receiver<(String, Instant)>| while rx.recv_timeout(Duration::from_millis(200)).is_ok() {};
    drain(&rx.lock().unwrap());

    let mut latencies = Vec::with_capacity(b.live_txs);
    for i in 0..b.live_txs as u64 {
        let id = 1_001 + i;
        let want = format!("\"{prefix}item:{id}\"");
        let t0 = Instant::now();
        table.append_generated();
        let rx2 = rx.clone();
        let arrival = tokio::task::spawn_blocking(move || -> anyhow::Result<Instant> {
            let rx = rx2.lock().unwrap();
            loop {
                let (payload, at) =
                    rx.recv_timeout(Duration::from_secs(10)).context("no notification within 10 s")?;
                if payload.contains(&want) {
                    return Ok(at);
                }
            }
        })
        .await??;
        latencies.push(arrival - t0);
    }
    stop.cancel();
    task.await??;
    println!(
        "live latency (append on server → committed in Redis, notify received): {}",
        Stats::of(latencies)
    );
    Ok(())
}
