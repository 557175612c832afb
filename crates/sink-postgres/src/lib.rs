//! The Postgres sink: a table in a second Postgres database (a read replica of just the
//! shape, a reporting database, another service's database) kept exactly in sync with a
//! shape.
//!
//! # The table (`schema:` default `public`, `table:` default the shape's table name)
//! Created on the first batch from the shape's schema: one column per shape column, the
//! shape's primary key as the table's, and a column `_shapesync_generation` that the sink
//! uses to sweep rows after a resync. Built-in types keep their type (`int8`, `numeric`,
//! `jsonb`, `timestamptz`, `uuid`, arrays of them, …; length and precision modifiers are
//! dropped); any other type — an enum, a domain, an extension's type, which the target
//! database may not define — becomes `text` holding the source's text form. Values travel
//! as Postgres text and are cast to the column type, so nothing is rounded.
//!
//! A column that appears in the shape later is added (`ALTER TABLE … ADD COLUMN`); one
//! that leaves it stays with its last values. A table that exists with another primary
//! key, or without the generation column (another program's table), is a `Rejected` error
//! that says what to do. Indexes you add for your readers are kept, also by
//! `shapesync reset`, which deletes the rows but not the table.
//!
//! # Progress and atomicity
//! Every batch is one Postgres transaction: its rows (a snapshot batch as upserts of up
//! to 5,000 rows from one `text[]` per column through `unnest`, a live transaction
//! change by change), the sweep of a
//! resync (`DELETE … WHERE _shapesync_generation < …`) and the checkpoint, stored as JSON
//! in the table `_shapesync_checkpoints` (`pipeline`, `checkpoint`) of the same schema.
//! Nothing else stores progress. Readers see whole transactions only, and never an
//! emptied table. Inserts are upserts and updates write just the columns they carry
//! (`replica: default` merges), so replaying a batch changes nothing.
//!
//! # TLS
//! `sslmode` in the URL (`require`, `verify-ca`, `verify-full`, with `sslrootcert` for a
//! private CA) connects over TLS (rustls; the default `tls` feature).
//!
//! # Errors
//! Connection failures, timeouts, serialization failures, deadlocks, lock timeouts and
//! a database that is starting or shutting down are `Unavailable` (the runner retries the
//! batch); a refused login, a certificate that fails verification, a missing schema or
//! database, missing privileges and other refused statements are `Rejected`. No error or
//! log line contains the URL. Every identifier is quoted, so any column, table or schema
//! name is safe.

mod config;
mod dialect;
mod lease;
mod sink;

pub use config::{PostgresSinkConfig, defaults};
pub use shapesync_sql_table::{CHECKPOINT_TABLE, GENERATION_COLUMN};
pub use sink::PostgresSink;

use shapesync_core::Registry;

/// Registers the sink under `type: postgres`.
pub fn register(registry: &mut Registry) {
    registry.sink::<PostgresSinkConfig>("postgres");
}
