//! The SQLite sink: a table in a SQLite database file kept exactly in sync with a shape,
//! for services that read their cache with SQL (or from another process) instead of
//! asking Postgres.
//!
//! # The table (`table:`, default: the shape's table name without its schema)
//! Created on the first batch from the shape's schema: one column per shape column, the
//! shape's primary key as the table's, and a column `_shapesync_generation` that the
//! sink uses to sweep rows after a resync. Types are declared so that SQLite keeps every
//! value exactly:
//! - `int2`, `int4`, `int8`, `oid` → `INTEGER` (all 64 bits); `bool` → `INTEGER` 0/1;
//! - `float4`, `float8` → `REAL` (±Infinity included; NaN is stored as the text `NaN`,
//!   which SQLite would otherwise turn into NULL);
//! - `numeric` → `TEXT`, its exact Postgres text (SQLite's `NUMERIC` would round it);
//! - `json`, `jsonb` → `TEXT`, the original JSON; arrays → `TEXT`, a JSON array;
//! - every other type (text, uuid, timestamps, bytea, …) → `TEXT`, Postgres' text output.
//!
//! A column that appears in the shape later is added (`ALTER TABLE … ADD COLUMN`); one
//! that leaves it stays in the table with its last values. A table that exists with
//! another primary key, or without the generation column (another program's table), is
//! a `Rejected` error that says what to do. Indexes you add for your readers are kept,
//! also by `shapesync reset`, which deletes the rows but not the table.
//!
//! # Progress and atomicity
//! Every batch is one SQLite transaction (`BEGIN IMMEDIATE`): its rows, the sweep of a
//! resync (`DELETE … WHERE _shapesync_generation < ?`) and the checkpoint, stored as
//! JSON in the table `_shapesync_checkpoints` (`pipeline`, `checkpoint`) of the same file.
//! Nothing else stores progress. The database runs in WAL mode, so readers keep reading
//! the last commit while a batch is written, and never see part of one. Inserts are
//! upserts and updates write just the columns they carry (`replica: default` merges), so
//! replaying a batch changes nothing.
//!
//! Several pipelines may share one file, each with its own table. A write that finds the
//! database locked by another connection waits up to `busy_timeout_ms`, then is retried
//! by the runner (`Unavailable`), as are a full disk and I/O errors; a file that cannot be
//! opened or written, and statements SQLite refuses, stop the pipeline (`Rejected`).
//! Every identifier is quoted, so any column or table name is safe.

mod config;
mod dialect;
mod lease;
mod sink;

pub use config::{SqliteSinkConfig, defaults};
pub use shapesync_sql_table::{CHECKPOINT_TABLE, GENERATION_COLUMN};
pub use sink::SqliteSink;

use shapesync_core::Registry;

/// Registers the sink under `type: sqlite`.
pub fn register(registry: &mut Registry) {
    registry.sink::<SqliteSinkConfig>("sqlite");
}
