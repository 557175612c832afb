//! The `shapesync` command line: `run`, `validate`, `checkpoints`, `reset`.
//!
//! Plugins ship their own binary by building a [`Registry`] (usually
//! [`builtin_registry`] plus their own types) and calling [`run_with`]. The built-in sinks
//! are cargo features (`memory`, `redis`, `sqlite`, `postgres`, all default): a plugin
//! binary that depends on this crate with `default-features = false` links only the sinks
//! it enables.

mod serve;
mod status;

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use clap::{Parser, Subcommand, ValueEnum};
use shapesync_core::{Config, Fleet, PipelineStatus, Registry, RunMode};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

/// The registry of the stock binary: the `electric` source, every built-in transform, and
/// the built-in sinks this crate was built with (cargo features `memory`, `redis`,
/// `sqlite`, `postgres`; all on by default).
pub fn builtin_registry() -> Registry {
    let mut registry = Registry::new();
    registry.source::<shapesync_electric::ElectricSourceConfig>("electric");
    #[cfg(feature = "memory")]
    shapesync_sink_memory::register(&mut registry);
    #[cfg(feature = "redis")]
    shapesync_sink_redis::register(&mut registry);
    #[cfg(feature = "sqlite")]
    shapesync_sink_sqlite::register(&mut registry);
    #[cfg(feature = "postgres")]
    shapesync_sink_postgres::register(&mut registry);
    shapesync_transforms::register(&mut registry);
    registry
}

#[derive(Parser)]
#[command(
    name = "shapesync",
    version,
    about = "Keep caches in sync with Postgres through ElectricSQL shapes"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Human, env = "SHAPESYNC_LOG_FORMAT")]
    log_format: LogFormat,
    /// Log filter (tracing `EnvFilter` syntax), e.g. `info` or `shapesync_core=debug`.
    #[arg(long, global = true, default_value = "info", env = "SHAPESYNC_LOG")]
    log: String,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Human,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run pipelines until stopped (SIGINT/SIGTERM finish the commit in flight, then exit 0).
    ///
    /// Given no files, runs the embedded demo: a synthetic `items` shape served in-process
    /// (`--demo-rows` rows, a few live transactions a second) synced into Redis at
    /// `$REDIS_URL` (default redis://127.0.0.1:6379) under the prefix `shapesync-demo:`,
    /// or, when no Redis answers there, into the SQLite file `--demo-db`.
    Run {
        /// Pipeline files (YAML). Several files merge; each may hold several pipelines.
        files: Vec<PathBuf>,
        /// Rows of the embedded demo's synthetic shape (only without files).
        #[arg(long, default_value_t = 100_000)]
        demo_rows: u64,
        /// Where the embedded demo syncs (only without files): `auto` is Redis when one
        /// answers at `$REDIS_URL`, otherwise a SQLite file.
        #[arg(long, value_enum, default_value_t = DemoSink::Auto)]
        demo_sink: DemoSink,
        /// The SQLite file of the embedded demo (only without files, with the SQLite sink).
        #[arg(long, default_value = "shapesync-demo.db")]
        demo_db: PathBuf,
        /// Sync every pipeline to up-to-date, commit, and exit 0 (warm-ups, cron, tests).
        #[arg(long)]
        once: bool,
    },
    /// Check pipeline files without side effects; exits non-zero on any problem.
    Validate {
        /// Pipeline files (YAML).
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Also check that every source's server answers and accepts the shape, and that
        /// every sink connects and its stored checkpoint is readable (reads only).
        #[arg(long)]
        connect: bool,
    },
    /// Print each pipeline's stored position (handle, offset) as its sink holds it.
    Checkpoints {
        /// Pipeline files (YAML).
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Print JSON lines instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Remove a pipeline's rows and checkpoint from its sink (it resyncs on next run).
    Reset {
        /// Pipeline files (YAML).
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// The pipeline to reset.
        #[arg(long)]
        pipeline: String,
        /// Do not ask for confirmation.
        #[arg(long)]
        yes: bool,
    },
    /// Print what a running instance is doing: each pipeline's state, rows/s, lag, last
    /// commit and last error (from its `/status` on `metrics.listen`). Exits 1 when a
    /// pipeline is not ready, 2 when the instance cannot be reached.
    Status {
        /// Pipeline files whose `metrics.listen` names the instance (or give `--url`).
        files: Vec<PathBuf>,
        /// The instance's metrics listener, e.g. `http://127.0.0.1:9464`.
        #[arg(long)]
        url: Option<String>,
        /// Print the instance's `/status` JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Print a shell completion script, e.g. `shapesync completions bash > /etc/bash_completion.d/shapesync`.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff), e.g. `shapesync man > /usr/local/share/man/man1/shapesync.1`.
    Man,
    /// Serve a synthetic shape over the Electric protocol (for trying pipelines and benchmarks without Postgres).
    TestkitServer(shapesync_shape_server::cli::SyntheticServerArgs),
}

/// The embedded default pipeline files, run by `shapesync run` without files (they live in
/// this crate, so the published package holds them): into Redis, or into a SQLite file.
const DEMO_PIPELINE: &str = include_str!("../pipelines/demo.yaml");
const DEMO_SQLITE_PIPELINE: &str = include_str!("../pipelines/demo-sqlite.yaml");

/// Where the embedded demo syncs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum DemoSink {
    /// Redis if one answers at `$REDIS_URL`, else SQLite.
    Auto,
    /// Redis at `$REDIS_URL` (retried until it answers).
    Redis,
    /// A SQLite file (`--demo-db`): nothing to install.
    Sqlite,
}

/// The Redis the demo would use: `$REDIS_URL`, default `redis://127.0.0.1:6379`.
fn demo_redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// Whether a Redis answers `PING` at `url` within half a second (any reply counts, an
/// error for a missing password too: someone set that server up). Only plain `redis://`
/// URLs are probed; for others (TLS, sockets) the user chose Redis on purpose.
async fn redis_answers(url: &str) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(parsed) = url::Url::parse(url) else { return true };
    if parsed.scheme() != "redis" {
        return true;
    }
    let host = parsed.host_str().unwrap_or("127.0.0.1").to_owned();
    let port = parsed.port().unwrap_or(6379);
    let probe = async {
        let mut stream = tokio::net::TcpStream::connect((host.as_str(), port)).await.ok()?;
        stream.write_all(b"PING\r\n").await.ok()?;
        let mut first = [0u8; 1];
        stream.read_exact(&mut first).await.ok()?;
        Some(matches!(first[0], b'+' | b'-'))
    };
    tokio::time::timeout(Duration::from_millis(500), probe).await.ok().flatten().unwrap_or(false)
}

/// Starts the demo's synthetic server and loads the embedded pipeline against it.
async fn demo_config(
    rows: u64,
    sink: DemoSink,
    db: &std::path::Path,
) -> anyhow::Result<(Config, shapesync_shape_server::ShapeServer)> {
    let redis_url = demo_redis_url();
    let into_redis = match sink {
        DemoSink::Redis => true,
        DemoSink::Sqlite => false,
        DemoSink::Auto => {
            let answers = redis_answers(&redis_url).await;
            if !answers {
                let at = url::Url::parse(&redis_url).map_or_else(
                    |_| "$REDIS_URL".to_owned(),
                    |u| format!("{}:{}", u.host_str().unwrap_or("?"), u.port().unwrap_or(6379)),
                );
                info!(redis = %at, "no Redis answers there, so the demo syncs into a SQLite file instead (start Redis, or pass --demo-sink redis, to use Redis)");
            }
            answers
        }
    };
    let server = shapesync_shape_server::ShapeServer::start(shapesync_shape_server::ServerOptions::default())
        .await
        .context("cannot start the demo's synthetic shape server")?;
    let table = server.create_synthetic_table("items", rows);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        loop {
            tick.tick().await;
            table.append_generated();
        }
    });
    let url = server.url();
    let db_text = db.display().to_string();
    let (file, text) = if into_redis {
        info!(%url, rows, "no pipeline file given: running the embedded demo (pipelines/demo.yaml) into Redis");
        info!(
            "look at the rows with: redis-cli HGETALL shapesync-demo:item:1 ; watch changes arrive with: redis-cli SUBSCRIBE shapesync-demo:changes"
        );
        ("pipelines/demo.yaml", DEMO_PIPELINE)
    } else {
        info!(%url, rows, db = %db_text, "no pipeline file given: running the embedded demo (pipelines/demo-sqlite.yaml) into a SQLite file");
        info!(
            "look at the rows with: sqlite3 {db_text} 'SELECT count(*), max(id) FROM items' ; a new row arrives every 250 ms, so run it again to watch them come in"
        );
        ("pipelines/demo-sqlite.yaml", DEMO_SQLITE_PIPELINE)
    };
    let mut config = Config::default();
    let env = |name: &str| match name {
        "SHAPESYNC_DEMO_URL" => Some(url.clone()),
        "SHAPESYNC_DEMO_DB" => Some(db_text.clone()),
        other => std::env::var(other).ok(),
    };
    config.merge(std::path::Path::new(file), text, &env)?;
    Ok((config, server))
}

/// Parses the command line and runs it with `registry`. Exit codes: 0 success,
/// 1 a pipeline or command failed, 2 bad usage or configuration.
pub fn run_with(registry: Registry) -> ExitCode {
    let cli = Cli::parse();
    if let Err(e) = init_logging(cli.log_format, &cli.log) {
        eprintln!(
            "error: --log (or SHAPESYNC_LOG): {e}; expected a filter such as `info` or `shapesync_core=debug,info`"
        );
        return ExitCode::from(2);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = runtime.block_on(execute(cli.command, registry));
    // A second signal leaves commits in flight behind: don't wait for their threads.
    runtime.shutdown_background();
    code
}

/// Runs a command line (`args[0]` is the program name) inside an existing runtime,
/// without installing a logger: for tests and embedding.
pub async fn run_args<I, T>(args: I, registry: Registry) -> ExitCode
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    match Cli::try_parse_from(args) {
        Ok(cli) => execute(cli.command, registry).await,
        Err(e) => {
            let _ = e.print();
            ExitCode::from(2)
        }
    }
}

async fn execute(command: Command, registry: Registry) -> ExitCode {
    match dispatch(command, registry).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", shapesync_core::report(e.as_ref()));
            ExitCode::FAILURE
        }
    }
}

fn init_logging(format: LogFormat, filter: &str) -> Result<(), tracing_subscriber::filter::ParseError> {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)?;
    let color = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let builder =
        tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(color);
    let _ = match format {
        LogFormat::Human => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
    Ok(())
}

/// Loads and checks the files; on failure prints every problem and returns exit code 2.
fn load(
    files: &[PathBuf],
    registry: &Registry,
) -> Result<(Config, Vec<shapesync_core::PreparedPipeline>), ExitCode> {
    let config = Config::load(files).map_err(|e| {
        eprintln!("error: {e}");
        ExitCode::from(2)
    })?;
    if config.pipelines.is_empty() {
        eprintln!("error: no pipelines defined in {}", display_files(files));
        return Err(ExitCode::from(2));
    }
    let prepared = registry.prepare(&config).map_err(|errors| {
        for e in errors {
            eprintln!("error: {e}");
        }
        ExitCode::from(2)
    })?;
    Ok((config, prepared))
}

fn display_files(files: &[PathBuf]) -> String {
    files.iter().map(|f| f.display().to_string()).collect::<Vec<_>>().join(", ")
}

async fn dispatch(command: Command, registry: Registry) -> anyhow::Result<ExitCode> {
    match command {
        Command::Validate { files, connect } => {
            let (config, prepared) = match load(&files, &registry) {
                Ok(x) => x,
                Err(code) => return Ok(code),
            };
            if connect {
                let mut failed = 0;
                for p in prepared {
                    let id = p.id.clone();
                    let file = config
                        .pipelines
                        .get(&id)
                        .map(|spec| spec.file.display().to_string())
                        .unwrap_or_default();
                    match check_connections(p).await {
                        Ok(()) => println!(
                            "{id}: source answers, sink connects, the shape's rows fit transforms and sink"
                        ),
                        Err(e) => {
                            failed += 1;
                            eprintln!(
                                "error: {file}: pipelines.{id}: {}",
                                shapesync_core::report(e.as_ref())
                            );
                        }
                    }
                }
                if failed > 0 {
                    return Ok(ExitCode::FAILURE);
                }
            }
            let ids: Vec<&str> = config.pipelines.keys().map(String::as_str).collect();
            println!("ok: {} pipeline(s): {}", ids.len(), ids.join(", "));
            Ok(ExitCode::SUCCESS)
        }
        Command::Run { files, once, demo_rows, demo_sink, demo_db } => {
            if files.is_empty() {
                let (config, _server) = demo_config(demo_rows, demo_sink, &demo_db).await?;
                let prepared = match registry.prepare(&config) {
                    Ok(p) => p,
                    Err(errors) => bail!("the embedded demo pipeline is invalid: {}", errors[0]),
                };
                return run(config, prepared, once).await;
            }
            let (config, prepared) = match load(&files, &registry) {
                Ok(x) => x,
                Err(code) => return Ok(code),
            };
            run(config, prepared, once).await
        }
        Command::TestkitServer(args) => {
            shapesync_shape_server::cli::run_synthetic_server(args).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Status { files, url, json } => status::print(&files, url, json).await,
        Command::Completions { shell } => {
            use clap::CommandFactory;
            clap_complete::generate(shell, &mut Cli::command(), "shapesync", &mut std::io::stdout());
            Ok(ExitCode::SUCCESS)
        }
        Command::Man => {
            use clap::CommandFactory;
            clap_mangen::Man::new(Cli::command())
                .render(&mut std::io::stdout())
                .context("cannot write the man page")?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Checkpoints { files, json } => {
            let (config, _) = match load(&files, &registry) {
                Ok(x) => x,
                Err(code) => return Ok(code),
            };
            if !json {
                println!(
                    "{:<24} {:<28} {:<24} {:>17}  {:<10} {:<32} {:>5}  LEASE",
                    "PIPELINE", "HANDLE", "OFFSET", "GENERATION", "STATE", "OWNER", "EPOCH"
                );
            }
            for (id, spec) in &config.pipelines {
                let sink = registry
                    .prepare_sink(id, spec)?
                    .build()
                    .await
                    .with_context(|| format!("pipeline {id}"))?;
                let cp = sink.checkpoint().await.with_context(|| format!("pipeline {id}"))?;
                let lease = sink.lease().await.with_context(|| format!("pipeline {id}"))?;
                let expiry = |l: &shapesync_core::LeaseInfo| {
                    if l.is_held() {
                        format!("held, expires in {:.1}s", l.expires_in_ms as f64 / 1000.0)
                    } else {
                        "free".to_owned()
                    }
                };
                if json {
                    let value = serde_json::json!({
                        "pipeline": id,
                        "handle": cp.as_ref().map(|c| c.handle.clone()),
                        "offset": cp.as_ref().map(|c| c.offset.to_string()),
                        "generation": cp.as_ref().map(|c| c.generation),
                        "resyncing": cp.as_ref().map(|c| c.resyncing),
                        "owner": lease.as_ref().map(|l| l.owner.clone()),
                        "epoch": lease.as_ref().map(|l| l.epoch),
                        "lease_expires_in_ms": lease.as_ref().map(|l| l.expires_in_ms),
                        "standbys": lease.as_ref().map(|l| l.standbys.clone()),
                    });
                    println!("{value}");
                } else {
                    let (owner, epoch, held) = match &lease {
                        Some(l) => (l.owner.clone(), l.epoch.to_string(), expiry(l)),
                        None => ("-".to_owned(), "-".to_owned(), "none".to_owned()),
                    };
                    match cp {
                        Some(c) => println!(
                            "{:<24} {:<28} {:<24} {:>17}  {:<10} {:<32} {:>5}  {held}",
                            id,
                            c.handle,
                            c.offset.to_string(),
                            c.generation,
                            if c.resyncing { "resyncing" } else { "synced" },
                            owner,
                            epoch,
                        ),
                        None => println!(
                            "{id:<24} {:<28} {:<24} {:>17}  {:<10} {owner:<32} {epoch:>5}  {held}",
                            "-", "-", "-", "never"
                        ),
                    }
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Reset { files, pipeline, yes } => {
            let (config, _) = match load(&files, &registry) {
                Ok(x) => x,
                Err(code) => return Ok(code),
            };
            let Some(spec) = config.pipelines.get(&pipeline) else {
                eprintln!(
                    "error: no pipeline `{pipeline}` in {}; known: {}",
                    display_files(&files),
                    config.pipelines.keys().cloned().collect::<Vec<_>>().join(", ")
                );
                return Ok(ExitCode::from(2));
            };
            if !yes {
                confirm(&pipeline)?;
            }
            let sink = registry.prepare_sink(&pipeline, spec)?.build().await?;
            sink.reset().await?;
            println!("reset {pipeline}: rows and checkpoint removed; the next run resyncs it");
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `validate --connect` for one pipeline, a dry run of its start: probe the source (which
/// says the shape's columns), connect the sink and read its checkpoint, then check the
/// transforms against those columns and the sink against the rows they give — what the
/// first batch would hit. Reads only. The source and the sink are both checked, whatever
/// the other answers; errors name the part of the pipeline (`source`, `transforms[i]`,
/// `sink`).
async fn check_connections(p: shapesync_core::PreparedPipeline) -> anyhow::Result<()> {
    let source = async {
        let mut source = p.source.build().await?;
        source.probe().await
    };
    let sink = async {
        let sink = p.sink.build().await?;
        sink.checkpoint().await.map(|_| sink)
    };
    let (source, sink) = tokio::join!(source, sink);
    let (schema, sink) = match (source, sink) {
        (Ok(schema), Ok(sink)) => (schema, sink),
        (Err(e), Ok(_)) => return Err(anyhow!(e).context("source")),
        (Ok(_), Err(e)) => return Err(anyhow!(e).context("sink")),
        (Err(source), Err(sink)) => return Err(anyhow!("source: {source}; sink: {sink}")),
    };
    let Some(mut schema) = schema else { return Ok(()) };
    for (i, transform) in p.transforms.iter().enumerate() {
        if let Some(next) =
            transform.schema(&schema).map_err(|e| anyhow!(e).context(format!("transforms[{i}]")))?
        {
            schema = next;
        }
    }
    sink.check_rows(&schema).await.map_err(|e| anyhow!(e).context("sink"))
}

fn confirm(pipeline: &str) -> anyhow::Result<()> {
    if !std::io::stdin().is_terminal() {
        bail!("refusing to reset `{pipeline}` without confirmation: pass --yes");
    }
    eprint!(
        "This deletes every row and the checkpoint of pipeline `{pipeline}` from its sink. Type the pipeline id to confirm: "
    );
    std::io::stderr().flush()?;
    let mut answer = String::new();
    std::io::stdin().read_line(&mut answer)?;
    if answer.trim() != pipeline {
        bail!("not confirmed; nothing was changed");
    }
    Ok(())
}

async fn run(
    config: Config,
    prepared: Vec<shapesync_core::PreparedPipeline>,
    once: bool,
) -> anyhow::Result<ExitCode> {
    let shutdown = CancellationToken::new();
    let abort = CancellationToken::new();
    spawn_signal_handler(shutdown.clone(), abort.clone());
    tokio::select! {
        code = run_until_stopped(config, prepared, once, shutdown) => code,
        _ = abort.cancelled() => Ok(ExitCode::from(130)),
    }
}

async fn run_until_stopped(
    config: Config,
    prepared: Vec<shapesync_core::PreparedPipeline>,
    once: bool,
    shutdown: CancellationToken,
) -> anyhow::Result<ExitCode> {
    // The metrics port first: a port in use is reported before any sink connects.
    let listener = match &config.metrics {
        Some(m) => Some(serve::bind(m.listen).await?),
        None => None,
    };
    let instance = config.lease.instance.clone().unwrap_or_else(shapesync_core::lease::instance_id);
    // `run --once` syncs every pipeline it can; a service shares them with its peers.
    let fleet =
        Arc::new(Fleet::new(instance, prepared.len(), config.lease.spread && !once, config.lease.timing()));
    info!(instance = %fleet.instance(), "instance id in pipeline leases");
    let mut statuses: Vec<(String, Arc<PipelineStatus>)> = Vec::new();
    let mut pipelines = Vec::new();
    let mut failed = 0;
    for p in prepared {
        let id = p.id.clone();
        let built = tokio::select! {
            built = p.build() => built,
            _ = shutdown.cancelled() => return Ok(ExitCode::SUCCESS),
        };
        match built {
            Ok(pipeline) => {
                let pipeline = pipeline.with_fleet(fleet.clone());
                statuses.push((id, pipeline.status()));
                pipelines.push(pipeline);
            }
            // Like a pipeline failing later: the others run, unless `fail_fast`.
            Err(e) if !config.fail_fast => {
                failed += 1;
                error!(pipeline = %id, error = %e, "pipeline cannot start");
            }
            Err(e) => return Err(anyhow::Error::new(e).context(format!("pipeline {id}: cannot start"))),
        }
    }
    if let (Some(m), Some(listener)) = (&config.metrics, listener) {
        serve::start(listener, Duration::from_millis(m.ready_grace_ms), statuses.clone(), shutdown.clone())
            .await?;
    }
    let progress = tokio::spawn(report_progress(statuses.clone(), shutdown.clone()));
    let mode = if once { RunMode::UntilUpToDate } else { RunMode::Follow };
    let mut tasks = tokio::task::JoinSet::new();
    for p in pipelines {
        let id = p.id().to_owned();
        let token = shutdown.clone();
        tasks.spawn(async move { (id, p.run(mode, token).await) });
    }
    while let Some(joined) = tasks.join_next().await {
        let (id, result) = joined.context("a pipeline task panicked")?;
        match result {
            Ok(()) if once => info!(pipeline = %id, "up to date"),
            Ok(()) => info!(pipeline = %id, "stopped"),
            Err(e) => {
                failed += 1;
                error!(pipeline = %id, error = %e, "pipeline failed");
                if config.fail_fast {
                    warn!("fail_fast is set: stopping every pipeline");
                    shutdown.cancel();
                }
            }
        }
    }
    shutdown.cancel();
    let _ = progress.await;
    Ok(if failed == 0 { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

/// SIGINT/SIGTERM: the first cancels `shutdown` (commits in flight finish), the second
/// cancels `abort` (the command returns 130 at once).
fn spawn_signal_handler(shutdown: CancellationToken, abort: CancellationToken) {
    tokio::spawn(async move {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(e) => {
                warn!(error = %e, "cannot listen for SIGTERM");
                return;
            }
        };
        for round in 0..2 {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            if round == 0 {
                info!("stopping: finishing commits in flight (signal again to exit at once)");
                shutdown.cancel();
            } else {
                warn!("second signal: exiting now; uncommitted changes will be re-read on restart");
                abort.cancel();
            }
        }
    });
}

/// Shows initial-sync progress: spinners on a terminal, periodic log lines otherwise.
async fn report_progress(statuses: Vec<(String, Arc<PipelineStatus>)>, shutdown: CancellationToken) {
    let tty = std::io::stderr().is_terminal();
    let started = Instant::now();
    let multi = indicatif::MultiProgress::new();
    let bars: Vec<_> = statuses
        .iter()
        .map(|(id, _)| {
            let bar = multi.add(indicatif::ProgressBar::new_spinner());
            bar.set_style(
                indicatif::ProgressStyle::with_template("{spinner} {prefix}: {msg}")
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
            );
            bar.set_prefix(id.clone());
            bar
        })
        .collect();
    if !tty {
        multi.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let mut tick =
        tokio::time::interval(if tty { Duration::from_millis(200) } else { Duration::from_secs(10) });
    tick.tick().await;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.cancelled() => break,
        }
        let mut syncing = 0;
        for ((id, status), bar) in statuses.iter().zip(&bars) {
            if bar.is_finished() {
                continue;
            }
            let n = status.changes_committed();
            let rate = n as f64 / started.elapsed().as_secs_f64().max(0.001);
            if status.has_reached_up_to_date() {
                bar.finish_with_message(format!("up to date ({n} changes in {:.1?})", started.elapsed()));
                if !tty {
                    info!(pipeline = %id, changes = n, "initial sync complete");
                }
            } else if let Some(f) = status.failure() {
                bar.abandon_with_message(format!("failed: {f}"));
            } else if !status.is_owned() {
                let holder = status.holder().unwrap_or_else(|| "nobody yet".to_owned());
                bar.set_message(format!("standing by (lease held by {holder})"));
                bar.tick();
            } else {
                syncing += 1;
                bar.set_message(format!("syncing: {n} changes committed ({rate:.0}/s)"));
                bar.tick();
                if !tty {
                    info!(pipeline = %id, changes = n, rate = rate as u64, "initial sync in progress");
                }
            }
        }
        if syncing == 0 && bars.iter().all(|b| b.is_finished()) {
            break;
        }
    }
    for bar in &bars {
        if !bar.is_finished() {
            bar.abandon();
        }
    }
}
