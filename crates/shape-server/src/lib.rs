//! An in-process Electric Shape protocol server (`GET /v1/shape`): the protocol engine behind
//! the devserver, the CLI's `testkit-server` command and embedded demo, benchmarks and the
//! test suites (which reach it through `shapesync-testkit`, re-exporting this crate).
//!
//! It follows the server behaviour described in `electric-protocol.md`: snapshot chunks
//! `0_0..0_N` ending in `snapshot-end`, log offsets `<lsn>_<op>`, exclusive request offsets,
//! byte-threshold chunking at fixed log positions, `up-to-date` only at the head (never for `offset=-1`), live
//! long-polls with strictly increasing cursors, 409 must-refetch on rotation or handle
//! mismatch, validation 400s in Electric's order, 401 with a secret, out-of-bounds 400s,
//! `replica=full`, `columns`, `log=changes_only`, `offset=now`, `If-None-Match` 304s, subset snapshots and SSE.
//!
//! # API
//! - [`ShapeServer::start`]`(`[`ServerOptions`]`)` binds 127.0.0.1 on an ephemeral port;
//!   [`ShapeServer::url`] is `http://127.0.0.1:PORT/v1/shape`. Dropping the server (or
//!   [`ShapeServer::shutdown`]) stops it.
//! - [`ShapeServer::create_table`]`(`[`TableDef`]`)` returns a [`TableHandle`] that scripts the table:
//!   [`TableHandle::seed`] (snapshot rows), [`TableHandle::transaction`] →
//!   [`Transaction`]`::{insert, update, delete, change_key, lsn, txid, commit}`,
//!   [`TableHandle::rotate`] (409 with the new handle), [`TableHandle::truncate`] (409 without a
//!   handle), [`TableHandle::register_where`] (a Rust predicate for a `where` string, giving
//!   move-in/move-out), [`TableHandle::handle`].
//!   Row values are JSON objects of column -> Postgres text string or `null`.
//! - Subquery shapes (scripted, not SQL): [`TableHandle::register_subquery_where`]`(where,
//!   positions, members)` makes `where=<where>` a disjunction `positions[p] IN (subquery p)`
//!   whose subqueries currently return `members[p]`;
//!   [`TableHandle::register_subquery_where_all`] makes it one conjunction (composite tags
//!   `"<hash a>/<hash b>"`), [`TableHandle::register_subquery_dnf`] takes any disjuncts.
//!   Messages of such shapes carry `headers.tags` (one string per disjunct, `/`-separated
//!   slots per position, empty outside the disjunct; flat with one position) and
//!   `headers.active_conditions` (one bool per position), updates also `removed_tags`; slot
//!   values are [`tag_hash`] of the column value. [`TableHandle::move_out`]`(where, pos,
//!   values)` appends only a `{"headers":{"event":"move-out","patterns":[{"pos","value"}],
//!   "txids"}}` event; [`TableHandle::move_in`] appends the `move-in` event, inserts
//!   (`is_move_in: true`, with tags) of rows that enter the shape and a `snapshot-end`.
//!   Each move takes a new LSN and txid. Log entries keep the tags and active conditions of
//!   their commit time; snapshots (and [`TableHandle::rotate`]) use the members of their
//!   creation time.
//! - [`ShapeServer::create_synthetic_table`] + [`TableHandle::append_generated`]: a generated
//!   table whose snapshot is produced on the fly (benchmarks of 1,000,000 rows).
//! - Faults: [`ShapeServer::inject`] / [`ShapeServer::inject_times`] queue a [`Fault`] for the
//!   next requests (503 + `retry-after`, 500, 409, dropped connection, malformed JSON,
//!   missing header, end mid-transaction, trickled body). Faults are misbehaviour the server
//!   itself scripts while it answers (deep in chunking and SSE), so the queue lives here;
//!   with none queued (the demo, the devserver) every request is answered faithfully.
//! - Request log: [`ShapeServer::requests`] gives every request's query, arrival
//!   [`std::time::Instant`], status and fault; [`ShapeServer::wait_for`] /
//!   [`ShapeServer::wait_for_requests`] wait on it with a deadline.
//! - [`cli::run_synthetic_server`]: the `shapesync-testkit-server` binary as a function.
//!
//! ```no_run
//! # async fn demo() -> Result<(), shapesync_shape_server::ShapeServerError> {
//! use std::time::Duration;
//! use serde_json::json;
//! use shapesync_shape_server::{Column, ServerOptions, TableDef, ShapeServer};
//!
//! let server = ShapeServer::start(ServerOptions {
//!     chunk_bytes: 1024,
//!     long_poll_timeout: Duration::from_millis(200),
//!     ..ServerOptions::default()
//! })
//! .await?;
//! let items = server.create_table(
//!     TableDef::new("items")
//!         .column(Column::new("id", "int8").primary_key())
//!         .column(Column::new("title", "text")),
//! );
//! items.seed([json!({"id": "1", "title": "a"})]);
//! // GET {server.url()}?table=items&offset=-1 now returns the snapshot.
//! let offset = items
//!     .transaction()
//!     .insert(json!({"id": "2", "title": "b"}))
//!     .update(json!({"id": "1", "title": "c"}))
//!     .commit(); // "24008184_2"
//! # let _ = offset; Ok(()) }
//! ```
//!
//! Server LSNs start at 24008184 and grow by 8 per transaction unless
//! [`Transaction::lsn`] is given; txids start at 751. Shape handles are
//! `<hash of the shape definition>-<µs>` and never repeat.
//!
//! Subset snapshots (§4.4): `subset__where/params/order_by/limit/offset` query parameters
//! or a POST JSON body give `{"metadata":…,"data":[…]}` with `electric-snapshot: true`,
//! taken from the table's current rows (a `where` needs [`TableHandle::register_where`];
//! predicates read `$n` values with [`RowView::param`]).
//!
//! Log chunks end at fixed positions of each shape's log (after the message that brings
//! a chunk to [`ServerOptions::chunk_bytes`]), whatever the request offset, so a response
//! may end short of the head without `up-to-date`. `last: true` marks the last change of a
//! transaction in the requesting shape.
//!
//! SSE (`live=true&live_sse=true`): a request with a backlog gets it, up to the end of its
//! chunk, as one `text/event-stream` response that then closes (`up-to-date` only if the
//! chunk reaches the head); a request at the head streams `data:` frames as changes arrive,
//! with `: keep-alive` comments, and ends after [`ServerOptions::sse_timeout`] (no final
//! message) or silently on rotation. An offset beyond the log is held for
//! [`ServerOptions::out_of_bounds_wait`], then long-polls get a 400 and SSE streams close
//! silently. Only the [`Fault::MissingHeader`] fault applies to SSE responses.

pub mod cli;
mod fault;
mod handle;
mod server;
mod shape;
mod sse;
mod store;
mod subquery;
mod synthetic;
mod table;

pub use fault::{ElectricHeader, Fault};
pub use handle::{TableHandle, Tables, Transaction};
pub use server::{Availability, RequestRecord, ServerOptions, ShapeServer, ShapeServerError};
pub use shapesync_core::Offset;
pub use subquery::tag_hash;
pub use synthetic::{SYNTHETIC_COLUMNS, synthetic_row, synthetic_table_def};
pub use table::{Column, RowView, TableDef};
