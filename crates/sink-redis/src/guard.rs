//! The stale-fill guard: what makes cache-aside safe next to `mode: invalidate` and
//! `mode: refresh`.
//!
//! # The race
//! A reader misses the cache, reads the row from Postgres, and writes it into the cache.
//! If the row changes between the reader's database read and its cache write, and the
//! invalidation lands in between too, the reader writes the *old* row into the cache
//! after the invalidation removed it, and it stays there. TTLs exist to bound that.
//!
//! # The mechanism: tickets and tombstones
//! - The sink, for every key it invalidates or refreshes, writes a **tombstone**
//!   `shapesync.tomb:<key>` holding Redis' clock (µs) at the time, living `tombstone_ms`
//!   (default [`DEFAULT_WINDOW_MS`]), in the same atomic unit as the invalidation. A
//!   full invalidation (continuity with the shape lost) writes one stamp for every key
//!   under the sink's `prefix`, `<prefix>shapesync.flush` ([`flush_key`]).
//! - A reader takes a **ticket** before it reads the database: Redis' clock, `TIME`, in
//!   µs ([`ticket`]).
//! - The reader fills with [`FILL_SCRIPT`] ([`fill`]), which refuses the write when the
//!   key's tombstone or the flush stamp is at or after the ticket (an invalidation came
//!   in after the reader's database read may have begun), or when the ticket is older
//!   than the window (its tombstone may be gone). A refused fill just leaves the key
//!   empty; the next read fills it.
//!
//! Why this is exact: a stale fill needs a database read before a change committed, so
//! a ticket taken before that commit; the sink invalidates after the commit, so its
//! tombstone is newer than the ticket. Either the fill comes within the window — the
//! tombstone (which lives the whole window after the invalidation) is still there and
//! refuses it — or later, and the ticket is too old. Both clocks are the same Redis.
//! Keep the reader's window at or below the sink's `tombstone_ms`.
//!
//! # The recipe in any language
//! ```text
//! value = GET key                          # a hit: done
//! t = TIME                                 # before the database read
//! ticket = t[0] * 1000000 + t[1]
//! row = SELECT … FROM projects WHERE id = …
//! EVALSHA <sha1 of FILL_SCRIPT> 3 key "shapesync.tomb:"..key <prefix>.."shapesync.flush"
//!         ticket 10000 string 0 <row as stored>
//! ```
//! (`<prefix>` is the sink's `prefix`, empty by default.)
//! (`hash` instead of `string`, followed by field/value pairs, for a hash; the `0`
//! is an expiry in ms for the filled key, 0 for none.)

use redis::aio::ConnectionLike;
use redis::{RedisResult, Script};

/// What every key the guard uses starts with (tombstones and the flush stamp); no row
/// key may start with it.
pub const NAMESPACE: &str = "shapesync.";

/// The prefix of a key's tombstone: `shapesync.tomb:<key>`.
pub const TOMBSTONE_PREFIX: &str = "shapesync.tomb:";

/// The stamp of the last full invalidation, after the sink's `prefix` (a string of µs,
/// living the window).
pub const FLUSH_SUFFIX: &str = "shapesync.flush";

/// The default window, in ms: how long tombstones live, and the oldest ticket a fill
/// accepts.
pub const DEFAULT_WINDOW_MS: u64 = 10_000;

/// Fills one cache key unless an invalidation came in after the ticket (the text of
/// `crates/sink-redis/src/fill.lua`, for applications in any language). KEYS: the key,
/// its tombstone, the flush stamp. ARGV: the ticket (µs of Redis' clock, taken before
/// the database read), the window in ms, `string` or `hash`, an expiry in ms for the key
/// (0: none), then the value (`string`) or field/value pairs (`hash`). Answers 1 when
/// it wrote the key, 0 when it refused.
pub const FILL_SCRIPT: &str = include_str!("fill.lua");

/// The tombstone of `key` (the whole key, with any prefix).
pub fn tombstone_key(key: &str) -> String {
    format!("{TOMBSTONE_PREFIX}{key}")
}

/// The flush stamp of the sinks writing under `prefix` (their `prefix` setting).
pub fn flush_key(prefix: &str) -> String {
    format!("{prefix}{FLUSH_SUFFIX}")
}

/// A ticket: Redis' clock now, in µs. Take it before reading the database.
pub async fn ticket<C: ConnectionLike>(conn: &mut C) -> RedisResult<u64> {
    let (secs, micros): (u64, u64) = redis::cmd("TIME").query_async(conn).await?;
    Ok(secs * 1_000_000 + micros)
}

/// What a fill writes.
#[derive(Clone, Copy, Debug)]
pub enum FillValue<'a> {
    /// A string (the `json` layout, or any text the application caches).
    String(&'a str),
    /// A hash, replacing what the key held (the `hash` layout).
    Hash(&'a [(&'a str, &'a str)]),
}

/// How a fill is made.
#[derive(Clone, Copy, Debug)]
pub struct FillOptions<'a> {
    /// The oldest ticket accepted, in ms: at most the sink's `tombstone_ms`.
    pub window_ms: u64,
    /// An expiry for the filled key in ms (a memory bound, not a staleness bound); 0
    /// for none.
    pub expire_ms: u64,
    /// The `prefix` of the sinks that invalidate the key (empty by default): where
    /// their flush stamp lives.
    pub prefix: &'a str,
}

impl Default for FillOptions<'_> {
    fn default() -> Self {
        FillOptions { window_ms: DEFAULT_WINDOW_MS, expire_ms: 0, prefix: "" }
    }
}

/// Writes `value` under `key` unless an invalidation of it (or of everything) came in
/// at or after `ticket`, or the ticket is older than the window: `Ok(true)` when it
/// wrote. Build the [`Script`] once (`Script::new(FILL_SCRIPT)`); it is sent by its hash.
pub async fn fill<C: ConnectionLike>(
    conn: &mut C,
    script: &Script,
    key: &str,
    ticket: u64,
    value: FillValue<'_>,
    options: FillOptions<'_>,
) -> RedisResult<bool> {
    let mut call = script.key(key);
    call.key(tombstone_key(key)).key(flush_key(options.prefix)).arg(ticket).arg(options.window_ms);
    match value {
        FillValue::String(text) => {
            call.arg("string").arg(options.expire_ms).arg(text);
        }
        FillValue::Hash(pairs) => {
            call.arg("hash").arg(options.expire_ms);
            for (field, text) in pairs {
                call.arg(*field).arg(*text);
            }
        }
    }
    let wrote: i64 = call.invoke_async(conn).await?;
    Ok(wrote == 1)
}
