//! The reliability suite, short: a few SIGKILLs with 409s, lost sink state and protocol
//! faults against Redis, SQLite and Postgres at once (`shapesync-reliability --kills 100`
//! is the long run, figures in docs/RELIABILITY.md). SHAPESYNC_TEST_SEED replays a run.

use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_short_reliability_run_keeps_every_promise() {
    let seed =
        std::env::var("SHAPESYNC_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random);
    eprintln!("seed {seed} (set SHAPESYNC_TEST_SEED={seed} to replay)");
    let report = shapesync_reliability::run(shapesync_reliability::Options {
        shapesync: env!("CARGO_BIN_EXE_shapesync").into(),
        kills: 6,
        seed,
        instances: 2,
        deadline: Duration::from_secs(90),
    })
    .await
    .expect("the suite runs");
    eprintln!("{report}");
    assert!(report.passed(), "{report}");
    assert!(report.looks > 100, "the reader looked often enough: {report}");
}
