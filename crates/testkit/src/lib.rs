//! Test tools for shapesync: the sink compliance suite, batch builders for sink tests, and
//! (re-exported from [`shapesync_shape_server`]) the in-process Electric Shape protocol
//! server with its scripted tables and fault injection.
//!
//! - [`compliance::check_sink`]: the sink compliance suite, for built-in and plugin sinks.
//! - [`table_sink::check_table_sink`]: what SQL-table sinks (SQLite, Postgres, a MySQL or
//!   DuckDB plugin) promise beyond it: replay, atomicity, hostile names, sweeping under
//!   a reader, schema changes, shared stores, reset, key moves, foreign tables.
//! - [`fixtures`]: hand-made schemas, rows, checkpoints and batches of a shape `items`.
//! - The server: everything [`shapesync_shape_server`] exports, under the names tests have
//!   always used — [`TestServer`] is [`shapesync_shape_server::ShapeServer`] and
//!   [`TestkitError`] is [`shapesync_shape_server::ShapeServerError`]. Products (the CLI,
//!   the devserver, benchmarks) depend on `shapesync-shape-server` directly.
//!
//! ```no_run
//! # async fn demo() -> Result<(), shapesync_testkit::TestkitError> {
//! use serde_json::json;
//! use shapesync_testkit::{Column, Fault, ServerOptions, TableDef, TestServer};
//!
//! let server = TestServer::start(ServerOptions::default()).await?;
//! let items = server.create_table(TableDef::new("items").column(Column::new("id", "int8").primary_key()));
//! items.seed([json!({"id": "1"})]);
//! server.inject(Fault::InternalError); // the next request gets a 500
//! # Ok(()) }
//! ```

pub mod compliance;
pub mod fixtures;
pub mod table_sink;

pub use shapesync_shape_server::*;
pub use shapesync_shape_server::{ShapeServer as TestServer, ShapeServerError as TestkitError};
