//! The Redis sink: a Redis cache that is never stale and needs no TTL.
//!
//! # Layouts (`layout:`)
//! - `hash` (default): one hash per row, one field per column. A SQL NULL is an absent
//!   field. Values are rendered by [`shapesync_core::Value::render`]: `bool` as
//!   `true`/`false`; integers as exact decimals (an int8 keeps all 64 bits); floats in
//!   their shortest exact decimal form, or `NaN`, `Infinity`, `-Infinity`; `numeric` as its
//!   exact Postgres text; `json`/`jsonb` as their original text; text and every other type
//!   (uuid, timestamps, bytea, …) as Postgres' text output; arrays as a JSON array.
//! - `json`: one string per row holding the row as a JSON object with sorted keys,
//!   serialized by `Value`'s `Serialize`: int8 as an exact JSON number (9007199254740993
//!   survives), `numeric` as a string, JSON inline, NULL as `null`.
//! - `table`: one hash per shape, named `<prefix><table>`; one field per row key, holding
//!   the row's JSON as in `json` (Electric's own Redis example).
//!
//! Partial updates (`replica: default`) are merged: in `hash` with `HSET`/`HDEL` of the
//! given columns; in `json`/`table` the stored JSON is read first and merged in Rust with
//! every value kept as raw text (never through Lua's cjson, which would round numbers).
//!
//! # Keys
//! `key:` is a template over column values (`project:{id}`, `{org}:{id}`; `{{` and `}}`
//! are literal braces), rendered with the rules above. The default is
//! `<table>:<primary-key values joined by ':'>` (`table` layout: just the joined values, as
//! the field), with every value escaped: `\` becomes `\\` and `:` becomes `\:`, so two
//! distinct primary keys never share a key (`("a:b","c")` is `t:a\:b:c`, `("a","b:c")` is
//! `t:a:b\:c`). Readers build a default key by applying the same two replacements to each
//! value.
//!
//! Values in a user template are not escaped: `project:{id}` gives `project:7`, the key a
//! reader naturally writes. Such a template is unambiguous when it has one column, or
//! when no value can contain the literal text between its columns (integers, uuids);
//! otherwise two rows may get one key and overwrite each other, so key by the default or
//! put a separator between columns that the values cannot contain.
//!
//! A template may use a column outside the primary key only with `replica: full`, and
//! only if the schema marks it `not_null`: a row without a key value could never be
//! written, which would stop the pipeline. `check` enforces the first rule when
//! `primary_key:` is configured; every batch (so the first one, before anything is
//! written) enforces both against the shape's schema, as a `Rejected` error naming the
//! column. A NULL or missing key value that gets past this (a schema that lies) is a
//! `Rejected` error at that row. Under `replica: full` an update that changes a key
//! column moves the row.
//!
//! Every key starts with `prefix`; with `hash_tag: true` it is followed by the Redis
//! Cluster hash tag `{<pipeline>}:`, so all of a pipeline's keys share one slot.
//! Two pipelines whose row keys could collide (the same `prefix` and table, or templates
//! whose fixed starts overlap, on one server and database, without `hash_tag`) would
//! overwrite and sweep away each other's rows, so `validate` and `run` refuse them
//! ([`shapesync_core::SinkConfig::claims`]). The sink's own keys (checkpoint, membership,
//! lease) live under `<prefix>[{pipeline}:]shapesync:<pipeline>:`; a template that could
//! render a key there — one starting with a column — is refused.
//!
//! # Progress and atomicity
//! The checkpoint ([`shapesync_core::Checkpoint::to_json`]) lives at
//! `<prefix>[{pipeline}:]shapesync:<pipeline>:checkpoint`; nothing else stores progress.
//! Row membership lives in the hash `<prefix>[{pipeline}:]shapesync:<pipeline>:members`
//! (row key → generation that last wrote it), and the pipeline's lease in the hash
//! `…:lease` (see [`shapesync_core::lease`]: owner, epoch, expiry by Redis' clock, the
//! commit count `seq`, the highest generation written, and the standbys).
//!
//! Everything is written in units, each one Lua script call that first checks the
//! batch's fence against the lease and writes nothing if another instance took it over
//! (`Fenced`) or the lease is gone or older (`StateLost`: the runner resyncs), then runs
//! the unit's commands in order. Redis runs a script alone, so readers never see half a
//! unit; a failing command aborts the script before the checkpoint (Redis does not roll
//! back the commands before it, but replay from the checkpoint rewrites them).
//! - A live batch (a transaction) is one unit, checkpoint last. It runs alone in Redis
//!   however large, so size `timeout_ms` for your largest transaction; a unit that
//!   timed out but committed is recognised by the lease's `seq` on the retry and not run
//!   again.
//! - A snapshot batch — every change is an insert without a log position, and the
//!   checkpoint offset is `-1`, `0_N` or `0_inf` — is not a transaction, so it is written
//!   in units of `part_size` rows (at most 10,000), a few in flight at once; rows may land
//!   ahead of the checkpoint (replay is idempotent). The unit with the checkpoint is sent
//!   only after every earlier one has succeeded. A `hash` row that may already exist is
//!   replaced by `DEL` + `HSET` in its unit, so a reader never sees it missing.
//! - A batch with `sweep` writes its changes, then `HSCAN`s the membership `part_size`
//!   entries at a time and `UNLINK`s rows of older generations, one unit per step, the
//!   checkpoint with the last. For the duration of the sweep readers may see a partly
//!   swept cache (some rows that left the shape still present), but never miss a row that
//!   is still in the shape, since every such row was rewritten with the current
//!   generation before the sweep began. A sweep cut short leaves the old checkpoint, so
//!   the runner retries the batch.
//!
//! Within every unit, new memberships are written before the rows, and removed ones after,
//! so a unit cut short never leaves a row that the next sweep cannot find.
//!
//! At start the sink reads `maxmemory-policy` (`INFO memory`) and refuses an `allkeys-*`
//! policy, which could evict rows behind the checkpoint's back, unless `allow_eviction`.
//!
//! # Notifications
//! With `notify: <channel>`, every unit `PUBLISH`es one message per changed row, delivered
//! when the unit commits: `{"op":"insert"|"update"|"delete","key":"<redis key>"}`, plus
//! `"field":"<row key>"` in the `table` layout (where `key` is the shape's hash). Rows
//! removed by a sweep or a reset are published as `delete`.
//!
//! # Keeping an application's cache: `mode: invalidate` and `mode: refresh`
//! Instead of a mirror, the sink keeps the keys an application caches honest: every
//! committed change removes the keys its `keys` templates name for the row (rendered
//! with its new and, for updates, its old values), and `refresh` rewrites the row's own
//! key (`key`) in place when it exists; each such key gets a tombstone, and a full
//! invalidation (continuity lost) scans the templates' patterns. Readers fill through
//! [`guard`], which refuses a fill that read the database before an invalidation. See
//! the `cache` module for the units, and docs/CONFIG.md.
//!
//! # Redis Cluster
//! With `cluster: true`, `url` is one node of a cluster; the sink discovers the others and
//! follows slot moves. It needs `hash_tag: true`: every key of a pipeline then lives in
//! one slot, so its scripts and pipelines run on one node, as on a single server.
//!
//! # TLS
//! `rediss://` URLs connect over TLS (rustls; the default `tls` feature), verifying the
//! server's certificate against the system's root certificates, or against `ca_file` (a
//! PEM file with a private CA). A certificate that fails verification is `Rejected`.
//!
//! # Errors
//! Connection failures, timeouts, `LOADING`, `BUSY`, `OOM`, `READONLY`, `TRYAGAIN` and
//! cluster-down replies are `SinkError::unavailable` (the runner retries the idempotent
//! batch); other refusals (e.g. `WRONGTYPE` on a key another program owns) and bad
//! settings are `Rejected`. No error or log line contains the URL.

mod cache;
mod config;
mod connection;
mod error;
pub mod guard;
mod layout;
mod lease;
mod sink;
mod template;
mod unit;

pub use config::{Layout, Mode, RedisSinkConfig, defaults};
pub use sink::RedisSink;

use shapesync_core::Registry;

/// Registers the sink under `type: redis`.
pub fn register(registry: &mut Registry) {
    registry.sink::<RedisSinkConfig>("redis");
}
