//! The first run on a machine with nothing installed: `shapesync run` without files and
//! without a Redis syncs the embedded demo into a SQLite file in the working directory,
//! says where to look, and live changes keep arriving.

mod support;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const DEADLINE: Duration = Duration::from_secs(60);

fn count(db: &std::path::Path) -> Option<i64> {
    let conn = rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY).ok()?;
    conn.busy_timeout(Duration::from_secs(5)).ok()?;
    conn.query_row("SELECT count(*) FROM items", [], |r| r.get(0)).ok()
}

#[test]
fn without_files_or_redis_the_demo_syncs_into_a_sqlite_file_and_keeps_following() {
    let dir = tempfile::tempdir().unwrap();
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let log = dir.path().join("run.log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_shapesync"))
        .args(["run", "--demo-rows", "50"])
        .current_dir(dir.path())
        .env("REDIS_URL", format!("redis://127.0.0.1:{closed}"))
        .env("SHAPESYNC_METRICS_LISTEN", "127.0.0.1:0")
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let db = dir.path().join("shapesync-demo.db");
    let started = Instant::now();
    let mut wait_for = |what: &str, done: &dyn Fn(i64) -> bool| loop {
        if let Some(n) = count(&db).filter(|n| done(*n)) {
            return n;
        }
        if started.elapsed() > DEADLINE {
            let _ = child.kill();
            panic!("{what}: {}", std::fs::read_to_string(&log).unwrap());
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    // The snapshot, then a row the demo server inserts live after it.
    let synced = wait_for("the demo never synced its snapshot", &|n| n >= 50);
    wait_for("no live change reached the SQLite file", &|n| n > synced);
    child.kill().unwrap();
    child.wait().unwrap();
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("no Redis answers there"), "it says why it did not use Redis: {text}");
    assert!(text.contains("sqlite3 shapesync-demo.db"), "it says where to look: {text}");
}

/// `shapesync --log-format json run` for a pipeline file holding `yaml`, its log written
/// to `run.log` in `dir`.
fn run_logged(dir: &std::path::Path, yaml: &str) -> (std::process::Child, std::path::PathBuf) {
    let file = dir.join("pipelines.yaml");
    std::fs::write(&file, yaml).unwrap();
    let log = dir.join("run.log");
    (support::spawn_run(&file, &log), log)
}

/// A sink that does not answer at start is named once with its address, then the log
/// stays quiet: at most one line per backoff period (30 s by default), not one per retry.
#[test]
fn an_unreachable_sink_is_reported_once_not_once_per_retry() {
    let dir = tempfile::tempdir().unwrap();
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let (mut child, log) = run_logged(
        dir.path(),
        &format!(
            "pipelines:\n  unreachable:\n    source: {{type: electric, url: 'http://127.0.0.1:9/v1/shape', table: items}}\n    sink: {{type: redis, url: 'redis://127.0.0.1:{closed}', prefix: 'x:'}}\n"
        ),
    );
    // Retries start 100 ms apart: over three seconds an unthrottled log has a dozen lines.
    let started = Instant::now();
    let retried = |text: &str| text.lines().filter(|l| l.contains("cannot reach the sink")).count();
    while retried(&std::fs::read_to_string(&log).unwrap()) == 0 {
        assert!(started.elapsed() < DEADLINE, "the unreachable sink was never reported");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_secs(3)); // the window the count covers, not a wait for an event
    child.kill().unwrap();
    child.wait().unwrap();
    let text = std::fs::read_to_string(&log).unwrap();
    assert_eq!(retried(&text), 1, "one line, not one per retry: {text}");
    let address = format!("127.0.0.1:{closed}");
    assert_eq!(text.lines().filter(|l| l.contains(&address)).count(), 1, "the address is named once: {text}");
}

/// With two pipelines failing the same way (a dead shape server), every `shapesync_*`
/// line but the process-wide ones names its pipeline — the runner's and the Electric
/// source's retries, logged from the source's own task, through the pipeline's span.
#[test]
fn every_line_of_a_pipeline_carries_its_id() {
    let dir = tempfile::tempdir().unwrap();
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let dead_source = format!("http://127.0.0.1:{closed}/v1/shape");
    let (mut child, log) = run_logged(
        dir.path(),
        &format!(
            "pipelines:\n  first:\n    source: {{type: electric, url: '{dead_source}', table: items}}\n    sink: {{type: memory}}\n  second:\n    source: {{type: electric, url: '{dead_source}', table: items}}\n    sink: {{type: memory}}\n"
        ),
    );
    let started = Instant::now();
    let source_warnings = |text: &str| {
        text.lines()
            .filter(|l| l.contains("\"target\":\"shapesync_electric"))
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    // Both pipelines' sources retry the dead server, with warnings.
    loop {
        let lines = source_warnings(&std::fs::read_to_string(&log).unwrap());
        let named = |p: &str| lines.iter().any(|l| l.contains(&format!("\"pipeline\":\"{p}\"")));
        if named("first") && named("second") {
            break;
        }
        assert!(started.elapsed() < DEADLINE, "no source warnings for both pipelines: {lines:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let text = std::fs::read_to_string(&log).unwrap();
    for line in text.lines().filter(|l| l.contains("\"target\":\"shapesync_")) {
        let ours = line.contains("\"target\":\"shapesync_cli\"") && !line.contains("\"pipeline\":");
        assert!(
            ours || line.contains("\"pipeline\":\"first\"") || line.contains("\"pipeline\":\"second\""),
            "a line without its pipeline: {line}"
        );
    }
}
