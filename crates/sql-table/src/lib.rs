//! What every sink that mirrors a shape as a SQL table shares — the SQLite and Postgres
//! sinks, and plugins of the same kind (MySQL, DuckDB, …) — apart from the driver that
//! runs it:
//!
//! - [`rules`] (re-exported here): the names the sink keeps for itself
//!   ([`GENERATION_COLUMN`], [`CHECKPOINT_TABLE`], [`LEASE_TABLE`], [`STANDBY_TABLE`]),
//!   which table a shape goes to ([`table_name`]), whether an existing table can hold the
//!   shape ([`plan_table`]) and which key a change addresses ([`key_values`],
//!   [`moved_from`]);
//! - [`sql`]: the statements, as text — [`quote`], [`TableSql`] (create / alter, upsert,
//!   delete, sweep, checkpoints) and [`LeaseSql`] (lease and standby tables) — written
//!   for a [`Dialect`], the handful of things SQL databases spell differently
//!   (placeholders, type names, casts, how many rows one upsert carries, `ON CONFLICT`).
//!
//! Running the statements (rusqlite, sqlx, …), binding values and classifying errors
//! stay in each sink's crate. The test suite every SQL-table sink passes is
//! `shapesync_testkit::table_sink::check_table_sink`.

pub mod rules;
pub mod sql;

pub use rules::{
    CHECKPOINT_TABLE, GENERATION_COLUMN, LEASE_TABLE, RESERVED_PREFIX, STANDBY_TABLE, TablePlan, check_names,
    key_values, moved_from, plan_table, table_name,
};
pub use sql::{Dialect, LeaseSql, TableSql, quote};
