//! The Redis sink: rows, membership and checkpoint, written in units — one per live
//! transaction, one per snapshot part or sweep step — each one fenced Lua script call.
//! How rows are laid out is the `layout` module's; how a batch becomes units, the
//! `unit` module's; this module reads what the units need, runs them, and keeps the
//! lease.

use std::time::Duration;

use futures::StreamExt;
use futures::stream::FuturesOrdered;
use redis::{FromRedisValue, RedisError, Value};
use shapesync_core::{
    Acquisition, Batch, Change, Checkpoint, Fence, LeaseInfo, LeaseRequest, Operation, Schema, Sink,
    SinkConfig, SinkContext, SinkError, async_trait,
};

use crate::cache::CacheKeeper;
use crate::config::RedisSinkConfig;
use crate::connection::Connection;
use crate::error::{classify, rejected};
use crate::layout::{self, StoredRows};
use crate::lease::{Scripts, UnitOutcome};
use crate::template::KeyTemplate;
use crate::unit::{self, Unit, UnitBuilder, command, row_key};

/// Snapshot parts sent before the previous ones have answered.
const PARTS_IN_FLIGHT: usize = 4;

/// A Redis cache kept exactly in sync with a shape; see the crate docs for the layout.
pub struct RedisSink {
    conn: Connection,
    scripts: Scripts,
    /// Builds units, writing rows by the configured layout.
    units: UnitBuilder,
    template: Option<KeyTemplate>,
    primary_key: Option<Vec<String>>,
    full_rows: bool,
    table: String,
    part_size: usize,
    keys: KeyNames,
    keyspace: std::sync::Mutex<Keyspace>,
    /// A unit failed without an answer (a timeout, a dropped connection): whether it
    /// committed is unknown, so the next batch first asks the lease (see `apply`).
    uncertain: std::sync::atomic::AtomicBool,
    /// Refuse an evicting `maxmemory-policy` (false: only warn about it).
    refuse_eviction: bool,
    /// The store's settings were checked (see [`RedisSink::check_store`]).
    store_checked: tokio::sync::OnceCell<()>,
    /// `mode: invalidate` / `refresh`: keeps an application's cache instead of a mirror.
    cache: Option<CacheKeeper>,
    /// The pipeline id, for the cache modes' metrics.
    pipeline: String,
}

/// What the sink knows about its keys being empty, which lets an initial snapshot into
/// an empty keyspace skip the `DEL` that otherwise precedes every row it writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Keyspace {
    /// Not looked at yet.
    Unknown,
    /// No checkpoint and no membership existed when this generation's snapshot began,
    /// so no row it writes can already exist.
    EmptyFor(u64),
    /// Rows may exist: every full-row write replaces the row.
    Populated,
}

/// What every key the sink keeps for itself starts with, after the base.
pub(crate) fn internal_prefix(pipeline: &str) -> String {
    format!("shapesync:{pipeline}:")
}

/// The names of every key a pipeline owns.
pub(crate) struct KeyNames {
    /// `prefix` plus the hash tag: the start of every key.
    pub(crate) base: String,
    /// The checkpoint's JSON.
    pub(crate) checkpoint: String,
    /// The membership hash: row key → the generation that last wrote it.
    pub(crate) members: String,
    /// The pipeline's lease (see the `lease` module).
    pub(crate) lease: String,
    /// The shape's hash under the `table` layout.
    pub(crate) table: String,
}

impl KeyNames {
    pub(crate) fn new(prefix: &str, hash_tag: bool, pipeline: &str, table: &str) -> Self {
        let base = if hash_tag { format!("{prefix}{{{pipeline}}}:") } else { prefix.to_owned() };
        KeyNames {
            checkpoint: format!("{base}{}checkpoint", internal_prefix(pipeline)),
            members: format!("{base}{}members", internal_prefix(pipeline)),
            lease: format!("{base}{}lease", internal_prefix(pipeline)),
            table: format!("{base}{table}"),
            base,
        }
    }
}

impl RedisSink {
    /// Validates `config` and connects. An unreachable server is `Unavailable`.
    pub async fn connect(config: RedisSinkConfig, ctx: SinkContext) -> Result<Self, SinkError> {
        let sink = Self::connect_lazy(config, ctx)?;
        let mut conn = sink.conn.clone();
        redis::cmd("PING").query_async::<()>(&mut conn).await.map_err(classify)?;
        Ok(sink)
    }

    /// Validates `config` without connecting: the first command connects, and an
    /// unreachable server surfaces as `Unavailable` then, which the runner retries.
    pub fn connect_lazy(config: RedisSinkConfig, ctx: SinkContext) -> Result<Self, SinkError> {
        config.check(&ctx).map_err(rejected)?;
        let info = config.connection_info().map_err(rejected)?;
        let timeout = Duration::from_millis(config.timeout_ms);
        let conn = Connection::lazy(info, config.cluster, config.ca_file.as_deref(), timeout)?;
        Self::with_connection(config, ctx, conn)
    }

    fn with_connection(
        config: RedisSinkConfig,
        ctx: SinkContext,
        conn: Connection,
    ) -> Result<Self, SinkError> {
        let keys = KeyNames::new(&config.prefix, config.hash_tag, &ctx.pipeline, &ctx.shape.table);
        let cache = match config.mode.keeps_a_cache() {
            true => Some(CacheKeeper::new(&config, ctx.shape.full_rows).map_err(rejected)?),
            false => None,
        };
        Ok(RedisSink {
            cache,
            pipeline: ctx.pipeline.clone(),
            conn,
            scripts: Scripts::new(),
            template: config.template().map_err(rejected)?,
            units: UnitBuilder::new(layout::for_layout(config.layout, &keys), config.notify),
            primary_key: config.primary_key,
            full_rows: ctx.shape.full_rows,
            keys,
            table: ctx.shape.table,
            part_size: config.part_size,
            keyspace: std::sync::Mutex::new(Keyspace::Unknown),
            uncertain: std::sync::atomic::AtomicBool::new(false),
            refuse_eviction: !config.allow_eviction,
            store_checked: tokio::sync::OnceCell::new(),
        })
    }

    /// Whether the rows of this snapshot batch land in an empty keyspace (see [`Keyspace`]).
    /// Only the first generation seen can qualify; anything else makes the answer `false`
    /// for the rest of the sink's life.
    async fn lands_in_empty_keyspace(&self, conn: &mut Connection, batch: &Batch) -> Result<bool, SinkError> {
        let generation = batch.checkpoint.generation;
        let known = *self.keyspace.lock().unwrap_or_else(|e| e.into_inner());
        let state = match known {
            Keyspace::Unknown => {
                let existing: u64 = redis::cmd("EXISTS")
                    .arg(&self.keys.checkpoint)
                    .arg(&self.keys.members)
                    .query_async(conn)
                    .await
                    .map_err(classify)?;
                if existing == 0 { Keyspace::EmptyFor(generation) } else { Keyspace::Populated }
            }
            Keyspace::EmptyFor(g) if g == generation => known,
            _ => Keyspace::Populated,
        };
        *self.keyspace.lock().unwrap_or_else(|e| e.into_inner()) = state;
        Ok(state == Keyspace::EmptyFor(generation))
    }

    /// Under `refresh`, the row's own key template as far as it is known without the
    /// shape's schema: `key`, or the default over `primary_key` (neither: `None`, and
    /// only the `keys` templates are scanned).
    fn cache_own_template(&self) -> Result<Option<KeyTemplate>, SinkError> {
        if !self.cache.as_ref().is_some_and(CacheKeeper::refreshes) {
            return Ok(None);
        }
        Ok(self.template.clone().or_else(|| {
            let pk: Vec<&str> = self.primary_key.iter().flatten().map(String::as_str).collect();
            (!pk.is_empty()).then(|| self.units.layout().default_template(&self.table, &pk))
        }))
    }

    /// The key holding the pipeline's checkpoint JSON.
    pub fn checkpoint_key(&self) -> &str {
        &self.keys.checkpoint
    }

    /// The hash mapping each stored row's key to the generation that last wrote it.
    pub fn members_key(&self) -> &str {
        &self.keys.members
    }

    /// The template in force for rows of `schema`, checked against its primary key.
    fn key_template(&self, schema: &Schema) -> Result<KeyTemplate, SinkError> {
        let pk = schema.primary_key();
        if let Some(configured) = &self.primary_key
            && configured.iter().map(String::as_str).ne(pk.iter().copied())
        {
            return Err(SinkError::rejected(format!(
                "sink `primary_key` is {configured:?} but the table's primary key is {pk:?}; fix `primary_key`"
            )));
        }
        match &self.template {
            Some(template) => {
                for c in template.columns().filter(|c| !pk.contains(c)) {
                    let Some(column) = schema.0.get(c) else {
                        return Err(SinkError::rejected(format!(
                            "key template uses `{c}`, which is not among the shape's columns; add it to the source's `columns` or fix `key`"
                        )));
                    };
                    if !self.full_rows {
                        return Err(SinkError::rejected(format!(
                            "key template uses `{c}`, which is not a primary-key column (the primary key is {pk:?}); updates carry only the primary key and changed columns, so set `replica: full` on the source or key by primary-key columns only"
                        )));
                    }
                    if !column.not_null {
                        return Err(SinkError::rejected(format!(
                            "key template uses `{c}`, which is neither in the primary key nor NOT NULL in table `{}`; a row with NULL there would have no key and stop the pipeline, so key by primary-key or NOT NULL columns (or add a NOT NULL constraint)",
                            self.table
                        )));
                    }
                }
                Ok(template.clone())
            }
            None if pk.is_empty() => Err(SinkError::rejected(format!(
                "table `{}` has no primary key, so there is no default key; set `key` on the sink",
                self.table
            ))),
            None => Ok(self.units.layout().default_template(&self.table, &pk)),
        }
    }

    /// Reads the stored JSON of every row an update will merge into (layouts that
    /// merge stored JSON; nothing for the others). The sink is its keys' only writer, so
    /// they cannot change before the unit runs.
    async fn stored_rows(
        &self,
        conn: &mut Connection,
        template: &KeyTemplate,
        changes: &[Change],
    ) -> Result<StoredRows, SinkError> {
        let mut rows = StoredRows::new();
        let Some(stored_json) = self.units.layout().stored_json() else {
            return Ok(rows);
        };
        let mut ids = Vec::new();
        for change in changes.iter().filter(|c| c.op == Operation::Update) {
            let id = row_key(template, &change.value, change)?;
            if !rows.contains_key(&id) {
                rows.insert(id.clone(), None);
                ids.push(id);
            }
        }
        for chunk in ids.chunks(self.part_size) {
            let values: Vec<Option<String>> =
                stored_json.read(chunk).query_async(conn).await.map_err(classify)?;
            rows.extend(chunk.iter().cloned().zip(values));
        }
        Ok(rows)
    }

    /// Runs `unit` as one fenced script call (see [`Unit::into_call`]), storing
    /// `checkpoint` last if given. Redis runs a script alone, so readers never see half
    /// a unit; a failing command stops the script before the checkpoint.
    async fn run(
        &self,
        conn: &mut Connection,
        unit: Unit,
        generation: &str,
        checkpoint: Option<&str>,
        fence: Option<&Fence>,
    ) -> Result<UnitOutcome, SinkError> {
        self.run_counted(conn, unit, generation, checkpoint, fence).await.map(|(outcome, _)| outcome)
    }

    /// [`RedisSink::run`], also saying how many of the unit's guards passed (keys that
    /// existed and were refreshed).
    async fn run_counted(
        &self,
        conn: &mut Connection,
        unit: Unit,
        generation: &str,
        checkpoint: Option<&str>,
        fence: Option<&Fence>,
    ) -> Result<(UnitOutcome, u64), SinkError> {
        let Some(call) = unit.into_call(&self.scripts.unit, &self.keys, generation, checkpoint, fence) else {
            return Ok((UnitOutcome::Applied, 0));
        };
        let answer = call.invoke_async::<Value>(conn).await.map_err(|e| self.classify_unit(e))?;
        let passed = crate::lease::guards_passed(&answer);
        match fence {
            Some(f) => Ok((crate::lease::unit_outcome(answer, f, checkpoint.is_some())?, passed)),
            None => Ok((UnitOutcome::Applied, passed)),
        }
    }

    /// Applies `batch` in a cache mode (see the `cache` module): one unit for its
    /// changes (none for a snapshot's rows), then, with `sweep`, a full invalidation;
    /// the checkpoint with the last unit.
    async fn apply_cache(
        &self,
        cache: &CacheKeeper,
        batch: &Batch,
        checkpoint: &str,
        fence: Option<&Fence>,
    ) -> Result<(), SinkError> {
        let mut conn = self.conn.clone();
        let schema = batch.schema();
        cache.check_schema(schema)?;
        let own = match cache.refreshes() {
            true => Some(self.key_template(schema)?),
            false => None,
        };
        let changes: &[Change] = if batch.is_snapshot() { &[] } else { &batch.changes };
        let (unit, removed) = cache.unit(changes, own.as_ref())?;
        let with_checkpoint = (!batch.sweep).then_some(checkpoint);
        let (outcome, refreshed) = self.run_counted(&mut conn, unit, "", with_checkpoint, fence).await?;
        if outcome == UnitOutcome::AlreadyCommitted {
            return Ok(());
        }
        self.count_cache(removed, refreshed);
        if batch.sweep {
            let reason = batch.resync_reason;
            self.invalidate_all(cache, own.as_ref(), Some(checkpoint), fence, reason).await?;
        }
        Ok(())
    }

    /// Invalidates every key the templates can name: the flush stamp first, then each
    /// pattern `SCAN`ned and what it finds `UNLINK`ed, one fenced unit per page; the
    /// notice and the checkpoint (if given) with a last unit once all are gone.
    async fn invalidate_all(
        &self,
        cache: &CacheKeeper,
        own: Option<&KeyTemplate>,
        checkpoint: Option<&str>,
        fence: Option<&Fence>,
        reason: Option<shapesync_core::ResyncReason>,
    ) -> Result<(), SinkError> {
        let mut conn = self.conn.clone();
        let patterns = cache.patterns(own);
        let why = reason.map_or("reset", shapesync_core::ResyncReason::as_str);
        tracing::info!(pipeline = %self.pipeline, reason = why, ?patterns, "continuity with the shape was lost, so the changes in between are unknown: invalidating every key the templates can name");
        if self.run(&mut conn, cache.flush_unit(), "", None, fence).await? == UnitOutcome::AlreadyCommitted {
            return Ok(());
        }
        let mut removed = 0;
        for pattern in &patterns {
            let mut cursor = "0".to_owned();
            loop {
                let (next, page): (String, Vec<String>) = redis::cmd("SCAN")
                    .arg(&cursor)
                    .arg("MATCH")
                    .arg(pattern)
                    .arg("COUNT")
                    .arg(self.part_size)
                    .query_async(&mut conn)
                    .await
                    .map_err(classify)?;
                if !page.is_empty()
                    && self.run(&mut conn, cache.scan_step(&page), "", None, fence).await?
                        == UnitOutcome::AlreadyCommitted
                {
                    return Ok(());
                }
                removed += page.len() as u64;
                if next == "0" {
                    break;
                }
                cursor = next;
            }
        }
        self.run(&mut conn, cache.flushed_unit(&patterns, reason), "", checkpoint, fence).await?;
        self.count_cache(removed, 0);
        if let Some(reason) = reason {
            let labels = [("pipeline", self.pipeline.clone()), ("reason", reason.as_str().to_owned())];
            metrics::counter!("shapesync_sink_full_invalidations_total", &labels).increment(1);
        }
        tracing::info!(pipeline = %self.pipeline, keys = removed, "full invalidation done");
        Ok(())
    }

    /// Counts keys a cache mode removed and refreshed.
    fn count_cache(&self, invalidated: u64, refreshed: u64) {
        let labels = [("pipeline", self.pipeline.clone())];
        if invalidated > 0 {
            metrics::counter!("shapesync_sink_keys_invalidated_total", &labels).increment(invalidated);
        }
        if refreshed > 0 {
            metrics::counter!("shapesync_sink_keys_refreshed_total", &labels).increment(refreshed);
        }
    }

    /// Writes `batch`'s changes as its units (see [`unit::parts`]), the one with the
    /// checkpoint last. Parts before the last are replayable snapshot rows, so a few stay
    /// in flight to overlap building with Redis work; the last part is sent only after
    /// every earlier one has committed. `AlreadyCommitted` when a unit found the batch
    /// committed by an earlier attempt (the rest is then not sent).
    async fn write_parts(
        &self,
        conn: &mut Connection,
        batch: &Batch,
        template: &KeyTemplate,
        checkpoint: &str,
        fence: Option<&Fence>,
    ) -> Result<UnitOutcome, SinkError> {
        let mut rows = self.stored_rows(conn, template, &batch.changes).await?;
        let snapshot = batch.is_snapshot();
        let new_rows = if snapshot {
            self.lands_in_empty_keyspace(conn, batch).await?
        } else {
            *self.keyspace.lock().unwrap_or_else(|e| e.into_inner()) = Keyspace::Populated;
            false
        };
        let generation = batch.checkpoint.generation.to_string();
        let mut in_flight = FuturesOrdered::new();
        let mut already = false;
        for part in unit::parts(batch, self.part_size) {
            let mut unit = Unit::default();
            for change in part.changes {
                self.units.write_change(&mut unit, template, change, &mut rows, new_rows)?;
            }
            if snapshot {
                rows.clear(); // inserts only: no later change reads what this part wrote
            }
            if part.last {
                while let Some(outcome) = in_flight.next().await {
                    already |= outcome? == UnitOutcome::AlreadyCommitted;
                }
                if already {
                    return Ok(UnitOutcome::AlreadyCommitted);
                }
            }
            let with_checkpoint = part.checkpoint.then_some(checkpoint);
            let mut conn = self.conn.clone();
            let generation = generation.as_str();
            in_flight.push_back(async move {
                self.run(&mut conn, unit, generation, with_checkpoint, fence).await
            });
            if (part.last || in_flight.len() >= PARTS_IN_FLIGHT)
                && let Some(outcome) = in_flight.next().await
            {
                already |= outcome? == UnitOutcome::AlreadyCommitted;
            }
            if already {
                while let Some(outcome) = in_flight.next().await {
                    outcome?;
                }
                return Ok(UnitOutcome::AlreadyCommitted);
            }
        }
        Ok(UnitOutcome::Applied)
    }

    /// Classifies a unit's failure; one that may have committed without our knowing
    /// makes the next batch ask first (see `apply`).
    fn classify_unit(&self, e: RedisError) -> SinkError {
        let error = classify(e);
        if error.is_transient() {
            self.uncertain.store(true, std::sync::atomic::Ordering::Relaxed);
        }
        error
    }

    /// Deletes every member whose generation is below `generation`, `part_size` entries
    /// per step, each step a fenced unit; the last step also stores `checkpoint`, if
    /// given.
    async fn sweep(
        &self,
        conn: &mut Connection,
        generation: u64,
        checkpoint: Option<&str>,
        fence: Option<&Fence>,
    ) -> Result<UnitOutcome, SinkError> {
        let mut cursor = "0".to_owned();
        loop {
            let (next, flat): (String, Vec<String>) = redis::cmd("HSCAN")
                .arg(&self.keys.members)
                .arg(&cursor)
                .arg("COUNT")
                .arg(self.part_size)
                .query_async(conn)
                .await
                .map_err(classify)?;
            let unit = self.units.sweep_step(&flat, generation);
            let done = next == "0";
            let outcome = self.run(conn, unit, "", checkpoint.filter(|_| done), fence).await?;
            if done || outcome == UnitOutcome::AlreadyCommitted {
                return Ok(outcome);
            }
            cursor = next;
        }
    }

    /// Calls the lease script in `mode` for `owner`.
    async fn lease_call(
        &self,
        mode: &str,
        owner: &str,
        ttl_ms: u64,
        fence: Option<&Fence>,
    ) -> Result<Value, SinkError> {
        let mut conn = self.conn.clone();
        let mut invocation = self.scripts.lease.key(&self.keys.lease);
        invocation.arg(mode).arg(owner).arg(ttl_ms);
        if let Some(f) = fence {
            invocation.arg(f.epoch).arg(f.seq);
        }
        invocation.invoke_async::<Value>(&mut conn).await.map_err(classify)
    }

    /// Checks, once per sink, that Redis keeps every row: an evicting
    /// `maxmemory-policy` would drop rows silently while the checkpoint says they are
    /// there, so it is refused (or, with `allow_eviction`, logged).
    async fn check_store(&self) -> Result<(), SinkError> {
        self.store_checked
            .get_or_try_init(|| async {
                let mut conn = self.conn.clone();
                let info: Value = match redis::cmd("INFO").arg("memory").query_async(&mut conn).await.map_err(classify) {
                    Ok(info) => info,
                    Err(e) if e.is_transient() => return Err(e),
                    Err(e) => {
                        // A managed Redis may refuse INFO to this user: say what to check instead.
                        tracing::warn!(error = %e, "cannot read Redis' maxmemory-policy; make sure it is noeviction (or volatile-*), or the cache may lose rows");
                        return Ok(());
                    }
                };
                if let Some(policy) = evicting_policy(&info) {
                    if self.refuse_eviction {
                        return Err(SinkError::rejected(format!(
                            "redis evicts keys under memory pressure (maxmemory-policy {policy}), which would drop cached rows while the checkpoint says they are there; set maxmemory-policy to noeviction (or a volatile-* policy) for this database, or set `allow_eviction: true` on the sink to run anyway"
                        )));
                    }
                    tracing::warn!(policy = %policy, "redis may evict this pipeline's rows (maxmemory-policy); the cache can then miss rows until the next resync");
                }
                Ok(())
            })
            .await
            .map(|_| ())
    }
}

/// The evicting `maxmemory-policy` an `INFO memory` answer names, if any (a cluster
/// answers per node: any evicting node counts).
fn evicting_policy(info: &Value) -> Option<String> {
    let texts: Vec<String> = match info {
        Value::Map(nodes) => {
            nodes.iter().filter_map(|(_, v)| String::from_redis_value(v.clone()).ok()).collect()
        }
        other => String::from_redis_value(other.clone()).ok().into_iter().collect(),
    };
    texts.iter().flat_map(|t| t.lines()).find_map(|line| {
        let policy = line.strip_prefix("maxmemory_policy:")?.trim();
        policy.starts_with("allkeys-").then(|| policy.to_owned())
    })
}

#[async_trait]
impl Sink for RedisSink {
    /// The key template can key rows of `schema` (its columns, `replica`, NOT NULL).
    async fn check_rows(&self, schema: &Schema) -> Result<(), SinkError> {
        if let Some(cache) = &self.cache {
            cache.check_schema(schema)?;
            if !cache.refreshes() {
                return Ok(()); // no row key of its own
            }
        }
        self.key_template(schema).map(drop)
    }

    async fn checkpoint(&self) -> Result<Option<Checkpoint>, SinkError> {
        self.check_store().await?;
        let mut conn = self.conn.clone();
        let stored: Option<String> =
            redis::cmd("GET").arg(&self.keys.checkpoint).query_async(&mut conn).await.map_err(classify)?;
        stored.map(|json| Checkpoint::from_json(&json)).transpose().map_err(|e| {
            SinkError::corrupt_checkpoint(format!("key `{}`: {e}", self.keys.checkpoint)).with_source(e)
        })
    }

    async fn apply(&self, batch: &Batch) -> Result<(), SinkError> {
        let fence = batch.fence.as_ref();
        if let Some(f) = fence
            && self.uncertain.swap(false, std::sync::atomic::Ordering::Relaxed)
        {
            // The last attempt got no answer: if it committed, do not run it again (a
            // big transaction re-run would block readers again for nothing).
            let answer = self.lease_call("check", &f.owner, f.ttl_ms, Some(f)).await?;
            if crate::lease::unit_outcome(answer, f, true)? == UnitOutcome::AlreadyCommitted {
                return Ok(());
            }
        }
        let checkpoint = batch.checkpoint.to_json();
        if let Some(cache) = &self.cache {
            return self.apply_cache(cache, batch, &checkpoint, fence).await;
        }
        let mut conn = self.conn.clone();
        let template = self.key_template(batch.schema())?;
        let outcome = self.write_parts(&mut conn, batch, &template, &checkpoint, fence).await?;
        if outcome == UnitOutcome::Applied && batch.sweep {
            self.sweep(&mut conn, batch.checkpoint.generation, Some(&checkpoint), fence).await?;
        }
        Ok(())
    }

    async fn reset(&self) -> Result<(), SinkError> {
        // Take the lease from any running owner first: its writes are refused from now
        // on, so none lands between the steps below; it resyncs once it takes the lease
        // back. The checkpoint goes first: a reset cut short leaves rows but no progress,
        // so the next run resyncs instead of trusting rows that are partly gone.
        let owner = format!("reset-{}", shapesync_core::lease::instance_id());
        let ttl_ms = shapesync_core::config::defaults::LEASE_TTL_MS;
        let answer = self.lease_call("force", &owner, ttl_ms, None).await?;
        let Acquisition::Owned { fence, .. } = crate::lease::acquisition(answer, &owner, ttl_ms)? else {
            return Err(SinkError::rejected("redis did not hand the lease to `reset`"));
        };
        let mut conn = self.conn.clone();
        let mut unit = Unit::default();
        unit.push(command(["DEL", &self.keys.checkpoint]));
        self.run(&mut conn, unit, "", None, Some(&fence)).await?;
        if let Some(cache) = &self.cache {
            // Nothing of the cache can be vouched for any more. (The row's own key under
            // `refresh` is the default `<table>:…` one unless `key` is set.)
            let own = self.cache_own_template()?;
            self.invalidate_all(cache, own.as_ref(), None, Some(&fence), None).await?;
            return self.release(&fence).await;
        }
        self.sweep(&mut conn, u64::MAX, None, Some(&fence)).await?;
        let mut unit = Unit::default();
        unit.push(command(["UNLINK", &self.keys.members]));
        self.run(&mut conn, unit, "", None, Some(&fence)).await?;
        self.release(&fence).await
    }

    fn keeps_leases(&self) -> bool {
        true
    }

    async fn acquire(&self, request: &LeaseRequest) -> Result<Acquisition, SinkError> {
        self.check_store().await?;
        let mode = if request.take { "take" } else { "ask" };
        let answer = self.lease_call(mode, &request.owner, request.ttl_ms, None).await?;
        crate::lease::acquisition(answer, &request.owner, request.ttl_ms)
    }

    async fn renew(&self, fence: &Fence) -> Result<LeaseInfo, SinkError> {
        let answer = self.lease_call("renew", &fence.owner, fence.ttl_ms, Some(fence)).await?;
        crate::lease::renewal(answer, fence)
    }

    async fn release(&self, fence: &Fence) -> Result<(), SinkError> {
        self.lease_call("release", &fence.owner, fence.ttl_ms, Some(fence)).await.map(|_| ())
    }

    async fn lease(&self) -> Result<Option<LeaseInfo>, SinkError> {
        let answer = self.lease_call("read", "", 0, None).await?;
        crate::lease::stored_lease(answer)
    }
}

#[cfg(test)]
mod tests {
    use shapesync_core::{Row, Value};

    use super::*;

    #[test]
    fn json_merge_keeps_big_numbers_and_sorted_keys() {
        let stored = r#"{"a":9007199254740993,"j":{"x":1.10},"z":"keep"}"#;
        let mut update = Row::new();
        update.insert("b", Value::Int(i64::MAX));
        update.insert("z", Value::Null);
        assert_eq!(
            layout::merge_json(Some(stored), &update).unwrap(),
            r#"{"a":9007199254740993,"b":9223372036854775807,"j":{"x":1.10},"z":null}"#
        );
        assert!(layout::merge_json(Some("[1]"), &update).is_err());
    }

    #[test]
    fn key_names_carry_prefix_and_hash_tag() {
        let k = KeyNames::new("app:", true, "projects", "items");
        assert_eq!(k.checkpoint, "app:{projects}:shapesync:projects:checkpoint");
        assert_eq!(k.table, "app:{projects}:items");
        let k = KeyNames::new("", false, "p", "items");
        assert_eq!(k.members, "shapesync:p:members");
    }
}
