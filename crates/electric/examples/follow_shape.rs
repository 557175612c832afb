//! Follows one Electric shape and prints what arrives.
//!
//! ```text
//! cargo run -p shapesync-electric --example follow_shape -- http://localhost:3000/v1/shape items
//! ```
//! Optional third argument: a `where` clause. Set `ELECTRIC_SECRET` to send `secret`.

use shapesync_electric::{ShapeEvent, ShapeOptions, ShapeStream};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let (Some(url), Some(table)) = (args.next(), args.next()) else {
        eprintln!("usage: follow_shape <shape-url> <table> [where]");
        std::process::exit(2);
    };
    let mut options = ShapeOptions::new(url.parse()?, table);
    options.where_clause = args.next();
    options.secret = std::env::var("ELECTRIC_SECRET").ok();
    let mut stream = ShapeStream::new(options)?;
    loop {
        match stream.next_event().await? {
            ShapeEvent::Response(response) => {
                for change in &response.changes {
                    let row = serde_json::to_string(&change.value)?;
                    println!("{} {} {row}", change.op.as_str(), change.key);
                }
                if response.up_to_date {
                    println!("-- up to date at {} (handle {})", response.offset, response.handle);
                }
            }
            ShapeEvent::MustRefetch { new_handle } => {
                println!("-- must refetch (new handle {new_handle:?}): dropping local state");
            }
        }
    }
}
