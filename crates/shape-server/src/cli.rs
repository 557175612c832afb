//! `shapesync-testkit-server`: a synthetic shape served over HTTP, for benchmarks and demos.

use std::net::SocketAddr;
use std::time::Duration;

use crate::server::{ServerOptions, ShapeServer, ShapeServerError};

/// Command-line options of the synthetic server; `#[command(flatten)]` them into another CLI.
#[derive(Clone, Debug, clap::Args)]
pub struct SyntheticServerArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:3000")]
    pub listen: SocketAddr,
    /// Table name (schema `public`).
    #[arg(long, default_value = "items")]
    pub table: String,
    /// Number of generated rows in the snapshot.
    #[arg(long, default_value_t = 1_000_000)]
    pub rows: u64,
    /// Chunk threshold in bytes.
    #[arg(long, default_value_t = 10 * 1024 * 1024)]
    pub chunk_bytes: usize,
    /// Live load: single-row insert transactions per second (none if absent).
    #[arg(long)]
    pub tx_per_second: Option<f64>,
    /// Long-poll timeout in milliseconds.
    #[arg(long, default_value_t = 20_000)]
    pub long_poll_ms: u64,
    /// Require `secret=<this>` on every request (401 otherwise).
    #[arg(long, env = "SHAPESYNC_TESTKIT_SECRET", hide_env_values = true)]
    pub secret: Option<String>,
}

/// Serves a synthetic table until Ctrl-C, printing the shape URL on stdout.
pub async fn run_synthetic_server(args: SyntheticServerArgs) -> Result<(), ShapeServerError> {
    let options = ServerOptions {
        chunk_bytes: args.chunk_bytes,
        long_poll_timeout: Duration::from_millis(args.long_poll_ms),
        secret: args.secret.clone(),
        ..ServerOptions::default()
    };
    let server = ShapeServer::start_on(args.listen, options).await?;
    let table = server.create_synthetic_table(&args.table, args.rows);
    println!(
        "serving {} synthetic rows of table {} at {}?table={}",
        args.rows,
        args.table,
        server.url(),
        args.table
    );
    let load = args.tx_per_second.filter(|r| *r > 0.0).map(|rate| {
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
            loop {
                tick.tick().await;
                table.append_generated();
            }
        })
    });
    let _ = tokio::signal::ctrl_c().await;
    if let Some(load) = load {
        load.abort();
    }
    server.shutdown().await;
    Ok(())
}
