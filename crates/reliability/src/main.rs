//! `shapesync-reliability`: the reliability suite as a command. Prints its figures and
//! exits 1 if any promise broke.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;

/// SIGKILLs, 409s, lost sink state and protocol faults against Redis, SQLite and Postgres
/// at once, with a reader that checks no committed row disappears and no transaction is
/// seen half-applied, and an exact comparison at the end. Needs `redis-server` on PATH and
/// Postgres at 127.0.0.1:5432 (database `test`, as `bash .ci/run` sets up).
#[derive(Parser)]
#[command(name = "shapesync-reliability", version)]
struct Args {
    /// Rounds, each ending with an instance SIGKILLed.
    #[arg(long, default_value_t = 100)]
    kills: u32,
    /// Random seed (printed; pass it again to replay the same choices).
    #[arg(long)]
    seed: Option<u64>,
    /// `shapesync run` instances sharing the pipelines.
    #[arg(long, default_value_t = 2)]
    instances: usize,
    /// The `shapesync` binary; default: the one beside this program.
    #[arg(long)]
    shapesync: Option<PathBuf>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let seed = args.seed.unwrap_or_else(rand::random);
    let shapesync = args.shapesync.unwrap_or_else(|| {
        let me = std::env::current_exe().unwrap_or_default();
        me.with_file_name("shapesync")
    });
    eprintln!(
        "seed {seed}: {} kills over {} instances, shapesync at {}",
        args.kills,
        args.instances,
        shapesync.display()
    );
    let options = shapesync_reliability::Options {
        shapesync,
        kills: args.kills,
        seed,
        instances: args.instances,
        deadline: Duration::from_secs(120),
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(shapesync_reliability::run(options)) {
        Ok(report) => {
            print!("{report}");
            if report.passed() { ExitCode::SUCCESS } else { ExitCode::FAILURE }
        }
        Err(e) => {
            eprintln!("error: {}", shapesync_core::report(e.as_ref()));
            ExitCode::FAILURE
        }
    }
}
