//! Several instances of `shapesync run` on the same pipeline file — a rolling deploy, a
//! standby, an operator's second `run` — against Redis, SQLite and Postgres. Only the
//! lease holder writes: while the shape changes (and rotates once), the owner is
//! SIGKILLed again and again and a standby takes over; a reader watching the sink the
//! whole time never sees a row of the shape go missing, nor the stored checkpoint move
//! backwards; at the end the sink holds exactly the shape's rows. A paused owner
//! (SIGSTOP past its lease) that wakes up writes nothing.

mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;
use shapesync_testkit::{Column, ServerOptions, TableDef, TableHandle, TestServer};
use support::{Lease, Progress, Target, spawn_run};

const DEADLINE: Duration = Duration::from_secs(60);
/// Rows 1..=STABLE are only ever updated, so every reader must see all of them at all
/// times once the first sync is done.
const STABLE: u64 = 1_500;
const TTL_MS: u64 = 600;
const POLL_MS: u64 = 100;

fn seed_rng(name: &str) -> StdRng {
    let seed =
        std::env::var("SHAPESYNC_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random);
    eprintln!("{name}: seed {seed} (set SHAPESYNC_TEST_SEED={seed} to replay)");
    StdRng::seed_from_u64(seed)
}

fn signal(child: &Child, signal: &str) {
    let status = std::process::Command::new("kill").args([signal, &child.id().to_string()]).status().unwrap();
    assert!(status.success(), "kill {signal}");
}

/// The shape under test and what it should hold.
struct Shape {
    table: TableHandle,
    expected: BTreeMap<u64, String>,
    next_id: u64,
    tx: u64,
}

impl Shape {
    fn new(server: &TestServer) -> Shape {
        let table = server.create_table(
            TableDef::new("shared_items")
                .column(Column::new("id", "int8").primary_key().not_null())
                .column(Column::new("title", "text")),
        );
        let expected: BTreeMap<u64, String> = (1..=STABLE).map(|i| (i, format!("title {i}"))).collect();
        table.seed(expected.iter().map(|(i, t)| json!({"id": i.to_string(), "title": t})));
        Shape { table, expected, next_id: 1_000_001, tx: 0 }
    }

    /// One transaction: a few updates of stable rows, an insert, and a delete of a row
    /// inserted earlier.
    fn change(&mut self, rng: &mut StdRng) {
        self.tx += 1;
        let mut tx = self.table.transaction();
        for _ in 0..3 {
            let id = rng.random_range(1..=STABLE);
            let title = format!("title {id} tx {}", self.tx);
            tx = tx.update(json!({"id": id.to_string(), "title": title}));
            self.expected.insert(id, title);
        }
        let title = format!("title {} tx {}", self.next_id, self.tx);
        tx = tx.insert(json!({"id": self.next_id.to_string(), "title": title}));
        self.expected.insert(self.next_id, title);
        self.next_id += 1;
        let churn: Vec<u64> = self.expected.range(STABLE + 1..).map(|(id, _)| *id).collect();
        if churn.len() > 5 {
            let id = churn[rng.random_range(0..churn.len())];
            tx = tx.delete(json!({"id": id.to_string()}));
            self.expected.remove(&id);
        }
        tx.commit();
    }
}

/// Watches the sink from its own connection until stopped: once all stable rows are
/// there, all of them must stay there at every look; the checkpoint and the lease epoch
/// never move backwards. Returns how many looks it took.
fn watch(mut reader: Target, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<u64> {
    tokio::task::spawn_blocking(move || {
        let mut looks = 0;
        let mut synced = false;
        let mut progress: Option<Progress> = None;
        let mut epoch = 0;
        while !stop.load(Ordering::Relaxed) {
            looks += 1;
            if let Some(cp) = reader.checkpoint() {
                let now = Progress::of(&cp);
                if let Some(before) = &progress {
                    before.assert_not_behind(&now);
                }
                progress = Some(now);
            }
            if let Some(lease) = reader.lease() {
                assert!(lease.epoch >= epoch, "the lease epoch went back: {epoch} -> {}", lease.epoch);
                epoch = lease.epoch;
            }
            let present = reader.present(STABLE);
            if synced {
                assert_eq!(present, STABLE, "look {looks}: a row that exists in the shape went missing");
            } else {
                synced = present == STABLE;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        looks
    })
}

/// The instances, each with its log.
struct Instances {
    file: PathBuf,
    dir: PathBuf,
    children: Vec<(Child, PathBuf)>,
    started: usize,
}

impl Instances {
    fn start(file: &Path, dir: &Path, n: usize) -> Instances {
        let mut me = Instances { file: file.into(), dir: dir.into(), children: Vec::new(), started: 0 };
        for _ in 0..n {
            me.add();
        }
        me
    }

    fn add(&mut self) {
        self.started += 1;
        let log = self.dir.join(format!("instance-{}.log", self.started));
        self.children.push((spawn_run(&self.file, &log), log));
    }

    /// The index of the child holding `lease`, if one does.
    fn holder(&self, lease: &Lease) -> Option<usize> {
        let pid = lease.owner_pid()?;
        self.children.iter().position(|(c, _)| c.id() == pid)
    }

    fn remove(&mut self, i: usize) -> (Child, PathBuf) {
        self.children.remove(i)
    }
}

impl Drop for Instances {
    fn drop(&mut self) {
        // A failed test must not leave instances running.
        for (child, _) in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Waits until a live instance holds the lease with an epoch of at least `min_epoch`;
/// returns which one, the lease and how long it took.
async fn wait_for_holder(
    target: &mut Target,
    instances: &Instances,
    min_epoch: u64,
) -> (usize, Lease, Duration) {
    let started = Instant::now();
    loop {
        if let Some(lease) = target.lease().filter(|l| l.held && l.epoch >= min_epoch)
            && let Some(i) = instances.holder(&lease)
        {
            return (i, lease, started.elapsed());
        }
        if started.elapsed() > DEADLINE {
            for (child, log) in &instances.children {
                let text = std::fs::read_to_string(log).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(15).collect();
                eprintln!(
                    "--- instance pid {}:\n{}",
                    child.id(),
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                );
            }
            panic!("no instance took the lease over; lease: {:?}", target.lease());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn pipeline_file(dir: &Path, server: &TestServer, target: &Target) -> PathBuf {
    let file = dir.join("shared.yaml");
    std::fs::write(
        &file,
        format!(
            "lease: {{ttl_ms: {TTL_MS}, poll_ms: {POLL_MS}}}\npipelines:\n  shared:\n    source: {{type: electric, url: '{}', table: shared_items}}\n    sink: {}\n",
            server.url(),
            target.sink_yaml()
        ),
    )
    .unwrap();
    file
}

async fn server() -> TestServer {
    TestServer::start(ServerOptions {
        chunk_bytes: 16 * 1024, // many snapshot chunks: kills land mid-snapshot too
        long_poll_timeout: Duration::from_millis(200),
        ..Default::default()
    })
    .await
    .unwrap()
}

async fn converge(target: &mut Target, shape: &Shape) {
    let started = Instant::now();
    loop {
        let rows = target.rows();
        if rows == shape.expected {
            return;
        }
        assert!(
            started.elapsed() < DEADLINE,
            "the sink did not converge: {} rows, {} expected",
            rows.len(),
            shape.expected.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn owners_killed_again_and_again(mut target: Target, reader: Target, name: &str, count: usize) {
    let mut rng = seed_rng(name);
    let server = server().await;
    let mut shape = Shape::new(&server);
    let dir = tempfile::tempdir().unwrap();
    let file = pipeline_file(dir.path(), &server, &target);
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = watch(reader, stop.clone());
    let mut instances = Instances::start(&file, dir.path(), count);

    let mut epoch = 0;
    let mut takeovers = Vec::new();
    for round in 0..5 {
        let (owner, lease, _) = wait_for_holder(&mut target, &instances, epoch).await;
        epoch = lease.epoch;
        // Let the owner work (and the shape move) for a while, then kill it.
        let until = Instant::now() + Duration::from_millis(rng.random_range(150..600));
        while Instant::now() < until {
            shape.change(&mut rng);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if round == 2 {
            shape.table.rotate(); // a 409 in the middle: resync by whoever owns it
        }
        let (mut killed, _) = instances.remove(owner);
        signal(&killed, "-KILL");
        killed.wait().unwrap();
        let killed_at = Instant::now();
        instances.add();
        let (_, lease, _) = wait_for_holder(&mut target, &instances, epoch + 1).await;
        takeovers.push(killed_at.elapsed());
        eprintln!(
            "{name} x{count} round {round}: epoch {} -> {} after SIGKILL in {:?}",
            epoch,
            lease.epoch,
            killed_at.elapsed()
        );
        epoch = lease.epoch;
    }
    converge(&mut target, &shape).await;

    // An orderly stop hands over at once: the owner releases its lease.
    let (owner, lease, _) = wait_for_holder(&mut target, &instances, 0).await;
    let (mut stopped, _) = instances.remove(owner);
    signal(&stopped, "-TERM");
    let termed_at = Instant::now();
    let (_, next, _) = wait_for_holder(&mut target, &instances, lease.epoch + 1).await;
    let handover = termed_at.elapsed();
    assert!(stopped.wait().unwrap().success(), "SIGTERM stops cleanly");
    eprintln!(
        "{name} x{count}: takeover after SIGKILL {:?} (TTL {TTL_MS} ms, poll {POLL_MS} ms); after SIGTERM {handover:?} (epoch {} -> {})",
        takeovers, lease.epoch, next.epoch
    );
    shape.change(&mut rng);
    converge(&mut target, &shape).await;

    stop.store(true, Ordering::Relaxed);
    let looks = watcher.await.expect("the reader saw no row go missing and no checkpoint go back");
    assert!(looks > 50, "the reader looked often enough ({looks})");
    for (mut child, log) in std::mem::take(&mut instances.children) {
        signal(&child, "-TERM");
        assert!(child.wait().unwrap().success(), "{}", std::fs::read_to_string(log).unwrap_or_default());
    }
    target.check_bookkeeping(shape.expected.len());
    target.cleanup();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_and_three_instances_of_a_redis_pipeline_hand_it_over_and_stay_exact() {
    for count in [2, 3] {
        let target = Target::redis("shared", "shared_items", &format!("instances{count}"));
        let reader = target.reader();
        owners_killed_again_and_again(target, reader, "redis", count).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_and_three_instances_of_a_sqlite_pipeline_hand_it_over_and_stay_exact() {
    for count in [2, 3] {
        let dir = tempfile::tempdir().unwrap();
        let target = Target::sqlite("shared", "shared_items", dir.path());
        let reader = target.reader();
        owners_killed_again_and_again(target, reader, "sqlite", count).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_and_three_instances_of_a_postgres_pipeline_hand_it_over_and_stay_exact() {
    for count in [2, 3] {
        let target = Target::postgres("shared", "shared_items", &format!("instances{count}")).await;
        let reader = target.reader();
        owners_killed_again_and_again(target, reader, "postgres", count).await;
    }
}

/// A paused owner that wakes up after another instance took its lease over writes
/// nothing: its first commit (or renewal) is refused by the fence, and it stands by.
async fn a_paused_owner_is_fenced(mut target: Target, reader: Target, name: &str) {
    let mut rng = seed_rng(name);
    let server = server().await;
    let mut shape = Shape::new(&server);
    let dir = tempfile::tempdir().unwrap();
    let file = pipeline_file(dir.path(), &server, &target);
    let mut instances = Instances::start(&file, dir.path(), 1);
    let (_, first, _) = wait_for_holder(&mut target, &instances, 0).await;
    converge(&mut target, &shape).await;
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = watch(reader, stop.clone());
    instances.add();

    // Pause the owner while it waits for changes, past its lease. A pause that lands
    // inside one of its transactions (a lease renewal) holds that store's lock: SQLite
    // lets no one write until the owner resumes, Postgres ends the idle session after
    // 10 s. Then wake it briefly and pause it again.
    let (paused, paused_log) = instances.remove(0);
    let mut pauses = 0;
    let (second, waited) = loop {
        signal(&paused, "-STOP");
        pauses += 1;
        let started = Instant::now();
        loop {
            if let Some(lease) = target.lease().filter(|l| l.held && l.epoch > first.epoch)
                && instances.holder(&lease).is_some()
            {
                break;
            }
            if started.elapsed() > Duration::from_secs(3) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        match target.lease().filter(|l| l.held && l.epoch > first.epoch) {
            Some(lease) => break (lease, started.elapsed()),
            None => {
                assert!(pauses < 5, "the standby never took over from the paused owner");
                signal(&paused, "-CONT");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    eprintln!("{name}: the standby took over {waited:?} after the owner was paused ({pauses} pause(s))");
    for _ in 0..10 {
        shape.change(&mut rng);
    }
    converge(&mut target, &shape).await;
    let checkpoint = target.checkpoint();

    // Wake it: the changes it missed reach it, and its writes are refused.
    signal(&paused, "-CONT");
    let started = Instant::now();
    let log = loop {
        let log = std::fs::read_to_string(&paused_log).unwrap();
        if log.contains("lease is no longer ours") || log.contains("lost the pipeline's lease") {
            break log;
        }
        assert!(started.elapsed() < DEADLINE, "the woken owner never noticed it was fenced:\n{log}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(log.contains(&format!("epoch {}", second.epoch)), "it names the new owner's epoch:\n{log}");
    assert_eq!(target.checkpoint(), checkpoint, "the fenced instance stored nothing");
    assert_eq!(target.rows(), shape.expected, "and wrote no row");
    let lease = target.lease().unwrap();
    assert_eq!(lease.epoch, second.epoch, "the lease stayed with the new owner");

    // It stands by; the new owner goes on.
    shape.change(&mut rng);
    converge(&mut target, &shape).await;
    stop.store(true, Ordering::Relaxed);
    watcher.await.expect("the reader saw no row go missing and no checkpoint go back");
    let mut all = std::mem::take(&mut instances.children);
    all.push((paused, paused_log));
    for (mut child, log) in all {
        signal(&child, "-TERM");
        assert!(child.wait().unwrap().success(), "{}", std::fs::read_to_string(log).unwrap_or_default());
    }
    target.cleanup();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_redis_owner_that_wakes_up_is_fenced() {
    let target = Target::redis("shared", "shared_items", "paused");
    let reader = target.reader();
    a_paused_owner_is_fenced(target, reader, "redis").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_sqlite_owner_that_wakes_up_is_fenced() {
    let dir = tempfile::tempdir().unwrap();
    let target = Target::sqlite("shared", "shared_items", dir.path());
    let reader = target.reader();
    a_paused_owner_is_fenced(target, reader, "sqlite").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_postgres_owner_that_wakes_up_is_fenced() {
    let target = Target::postgres("shared", "shared_items", "paused").await;
    let reader = target.reader();
    a_paused_owner_is_fenced(target, reader, "postgres").await;
}

/// Four instances given the same twelve pipelines own three each; when one dies, the
/// other three take its pipelines over, four each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_share_pipelines_and_spread_a_dead_ones_over_the_rest() {
    const PIPELINES: usize = 12;
    let server = server().await;
    let table = server.create_table(
        TableDef::new("spread_items")
            .column(Column::new("id", "int8").primary_key().not_null())
            .column(Column::new("title", "text")),
    );
    table.seed((1..=20).map(|i| json!({"id": i.to_string(), "title": format!("t{i}")})));
    let dir = tempfile::tempdir().unwrap();
    let mut targets: Vec<Target> = (0..PIPELINES)
        .map(|i| Target::redis(&format!("p{i}"), "spread_items", &format!("spread{i}")))
        .collect();
    let mut yaml = format!("lease: {{ttl_ms: {TTL_MS}, poll_ms: {POLL_MS}}}\npipelines:\n");
    for target in &targets {
        yaml += &format!(
            "  {}:\n    source: {{type: electric, url: '{}', table: spread_items}}\n    sink: {}\n",
            target.pipeline,
            server.url(),
            target.sink_yaml()
        );
    }
    let file = dir.path().join("spread.yaml");
    std::fs::write(&file, yaml).unwrap();
    let mut instances = Instances::start(&file, dir.path(), 4);

    // Who owns what, by instance index, once every pipeline is held by a live instance.
    let owned = |targets: &mut Vec<Target>, instances: &Instances| -> Option<Vec<usize>> {
        let mut counts = vec![0; instances.children.len()];
        for target in targets.iter_mut() {
            let lease = target.lease().filter(|l| l.held)?;
            counts[instances.holder(&lease)?] += 1;
        }
        Some(counts)
    };
    let started = Instant::now();
    let spread = loop {
        if owned(&mut targets, &instances).is_some_and(|c| c.iter().all(|n| *n == 3)) {
            break started.elapsed();
        }
        assert!(
            started.elapsed() < DEADLINE,
            "four instances never settled on three pipelines each: {:?}",
            owned(&mut targets, &instances)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let (mut dead, _) = instances.remove(0);
    signal(&dead, "-KILL");
    dead.wait().unwrap();
    let killed = Instant::now();
    let respread = loop {
        if owned(&mut targets, &instances).is_some_and(|c| c.iter().all(|n| *n == 4)) {
            break killed.elapsed();
        }
        assert!(
            killed.elapsed() < DEADLINE,
            "three instances never took the dead one's pipelines over: {:?}",
            owned(&mut targets, &instances)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    eprintln!(
        "12 pipelines: 3 each over 4 instances after {spread:?}; 4 each over 3 after a SIGKILL in {respread:?}"
    );
    for (mut child, log) in std::mem::take(&mut instances.children) {
        signal(&child, "-TERM");
        assert!(child.wait().unwrap().success(), "{}", std::fs::read_to_string(log).unwrap_or_default());
    }
    for target in &mut targets {
        assert_eq!(target.rows().len(), 20, "pipeline {} is in sync", target.pipeline);
        target.cleanup();
    }
}

/// `run --once` does not take a pipeline over from a running instance: it says which
/// instance runs it and exits 1; once that instance stops, `run --once` syncs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_once_leaves_a_running_pipeline_to_its_owner() {
    let server = server().await;
    let shape = Shape::new(&server);
    let mut target = Target::redis("shared", "shared_items", "once");
    let dir = tempfile::tempdir().unwrap();
    let file = pipeline_file(dir.path(), &server, &target);
    let mut instances = Instances::start(&file, dir.path(), 1);
    let (_, lease, _) = wait_for_holder(&mut target, &instances, 0).await;
    let once = || {
        std::process::Command::new(env!("CARGO_BIN_EXE_shapesync"))
            .args(["run", "--once"])
            .arg(&file)
            .output()
            .unwrap()
    };
    let out = once();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains(&lease.owner) && stderr.contains("keeps renewing its lease"), "{stderr}");

    let (mut owner, _) = instances.remove(0);
    signal(&owner, "-TERM");
    assert!(owner.wait().unwrap().success());
    let out = once();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(target.rows(), shape.expected);
    target.cleanup();
}
