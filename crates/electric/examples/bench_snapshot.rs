//! Measures how fast a `ShapeStream` takes in a large snapshot: an in-process testkit
//! server serves a synthetic table (int8, text, numeric, bool, text[], jsonb) and the
//! stream fetches, parses and types every row.
//!
//! ```text
//! cargo run --release -p shapesync-electric --example bench_snapshot -- 1000000
//! ```

use std::time::Instant;

use shapesync_electric::{ShapeEvent, ShapeOptions, ShapeStream};
use shapesync_testkit::{ServerOptions, TestServer};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let rows: u64 = std::env::args().nth(1).map(|a| a.parse()).transpose()?.unwrap_or(1_000_000);
    let server = TestServer::start(ServerOptions::default()).await?;
    server.create_synthetic_table("items", rows);
    let mut stream = ShapeStream::new(ShapeOptions::new(server.url().parse()?, "items"))?;
    let started = Instant::now();
    let (mut changes, mut responses) = (0u64, 0u64);
    loop {
        match stream.next_event().await? {
            ShapeEvent::Response(r) => {
                changes += r.changes.len() as u64;
                responses += 1;
                if r.up_to_date {
                    break;
                }
            }
            ShapeEvent::MustRefetch { .. } => return Err("unexpected must-refetch".into()),
        }
    }
    let secs = started.elapsed().as_secs_f64();
    assert_eq!(changes, rows, "every row arrived once");
    println!(
        "{changes} rows in {responses} responses in {secs:.2} s: {:.0} rows/s (server and client share this process)",
        changes as f64 / secs
    );
    Ok(())
}
