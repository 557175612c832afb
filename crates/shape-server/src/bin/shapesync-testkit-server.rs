//! Serves a synthetic Electric shape; see `shapesync_shape_server::cli`.

use clap::Parser;
use shapesync_shape_server::cli::{SyntheticServerArgs, run_synthetic_server};

/// In-process Electric Shape protocol server with a generated table.
#[derive(Parser)]
#[command(name = "shapesync-testkit-server", version)]
struct Cli {
    #[command(flatten)]
    args: SyntheticServerArgs,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    run_synthetic_server(Cli::parse().args).await?;
    Ok(())
}
