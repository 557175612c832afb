//! `shapesync-devserver`: serve tables of a Postgres over the Electric protocol.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use shapesync_devserver::{DevServer, DevServerOptions};

/// Serve whole tables of a Postgres database (wal_level = logical) over the Electric
/// shape protocol, following every change through a temporary replication slot.
#[derive(Parser)]
#[command(name = "shapesync-devserver", version)]
struct Args {
    /// The database, e.g. postgres://postgres@127.0.0.1:5432/test.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    database_url: String,
    /// A table to serve (`table` in schema public, or `schema.table`); repeat for more.
    #[arg(long = "table", required = true)]
    tables: Vec<String>,
    /// Where to listen.
    #[arg(long, default_value = "127.0.0.1:3000")]
    listen: SocketAddr,
    /// How often to read new changes, in milliseconds.
    #[arg(long, default_value_t = 20)]
    poll_ms: u64,
    /// The most changes a shape keeps in memory; past it the shape gets a new handle over
    /// the current rows, and its clients refetch.
    #[arg(long, default_value_t = shapesync_devserver::DEFAULT_MAX_LOG_ENTRIES)]
    max_log_entries: usize,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt().with_writer(std::io::stderr).init();
    let args = Args::parse();
    let mut options = DevServerOptions::new(args.database_url, args.tables);
    options.listen = args.listen;
    options.poll_interval = Duration::from_millis(args.poll_ms);
    options.server.max_log_entries = Some(args.max_log_entries.max(1));
    let mut server = DevServer::start(options).await?;
    println!("serving the Electric shape protocol at {}", server.url());
    tokio::select! {
        _ = tokio::signal::ctrl_c() => server.stop().await?,
        e = server.failed() => return Err(e.into()),
    }
    Ok(())
}
