//! shapesync embedded in a Rust service as an auto-invalidated in-process cache.
//!
//! ```sh
//! # against a real Electric:
//! ELECTRIC_URL=http://localhost:3000/v1/shape TABLE=projects cargo run -p shapesync-sink-memory --example embedded_cache
//! # or self-contained (serves a small synthetic `items` shape in-process):
//! cargo run -p shapesync-sink-memory --example embedded_cache
//! ```
//!
//! The pipeline runs in the background; the service reads rows straight from the
//! `MemoryStore`, which is always consistent (whole transactions only) and fresh.

use std::sync::Arc;
use std::time::Duration;

use shapesync_core::{Pipeline, RunMode};
use shapesync_electric::{ShapeOptions, ShapeStream};
use shapesync_sink_memory::{MemorySink, MemoryStore};
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Where the shape comes from: a real Electric, or a synthetic one served here.
    let (url, table, _server) = match std::env::var("ELECTRIC_URL") {
        Ok(url) => (url, std::env::var("TABLE").unwrap_or_else(|_| "projects".into()), None),
        Err(_) => {
            let server = shapesync_testkit::TestServer::start(Default::default()).await?;
            let items = server.create_synthetic_table("items", 1_000);
            let url = server.url();
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    items.append_generated();
                }
            });
            (url, "items".to_owned(), Some(server))
        }
    };

    // 1. The cache: a store your code reads, and the sink the pipeline writes through.
    let store = MemoryStore::new();
    let source = ShapeStream::new(ShapeOptions::new(url.parse()?, table))?;
    let pipeline = Pipeline::new("cache", Box::new(source), Arc::new(MemorySink::new(store.clone())));

    // 2. Run it in the background until shutdown.
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(pipeline.run(RunMode::Follow, shutdown.clone()));

    // 3. Read from it. Wait for the first complete sync, then watch commits.
    store.wait_up_to_date().await;
    println!("cache warm: {} rows", store.len());
    let mut commits = store.subscribe();
    for _ in 0..3 {
        let commit = commits.recv().await?;
        for change in &commit.changes {
            println!(
                "{} {} -> now cached: {:?}",
                change.op.as_str(),
                change.key,
                store.get(&change.key).is_some()
            );
        }
    }

    shutdown.cancel();
    task.await??;
    Ok(())
}
