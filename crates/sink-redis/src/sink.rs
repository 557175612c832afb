//! The Redis sink: rows, membership and checkpoint, written in units — one per live
//! transaction, one per snapshot part or sweep step — each one fenced Lua script call.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use futures::StreamExt;
use futures::stream::FuturesOrdered;
use redis::{Arg, Cmd, FromRedisValue, RedisError, Value};
use serde_json::value::RawValue;
use shapesync_core::{
    Acquisition, Batch, Change, Checkpoint, Fence, LeaseInfo, LeaseRequest, Operation, Row, Schema, Sink,
    SinkConfig, SinkContext, SinkError, async_trait,
};

use crate::config::{Layout, RedisSinkConfig};
use crate::connection::Connection;
use crate::error::{classify, rejected};
use crate::lease::{Scripts, UnitOutcome};
use crate::template::{KeyError, KeyTemplate};

/// Snapshot parts sent before the previous ones have answered.
const PARTS_IN_FLIGHT: usize = 4;

/// Membership entries per `HSET`/`HDEL`. Each command runs alone in Redis, so it is kept
/// short (~0.4 ms on a million-entry hash) for readers; it must also stay under the 8000
/// values Redis' Lua `unpack` takes.
const MEMBERS_PER_COMMAND: usize = 250;

/// A Redis cache kept exactly in sync with a shape; see the crate docs for the layout.
pub struct RedisSink {
    conn: Connection,
    scripts: Scripts,
    layout: Layout,
    template: Option<KeyTemplate>,
    primary_key: Option<Vec<String>>,
    full_rows: bool,
    table: String,
    notify: Option<String>,
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
    checkpoint: String,
    members: String,
    /// The pipeline's lease (see the `lease` module).
    lease: String,
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

/// The commands of one unit and the membership changes it makes (row key → `true` to
/// tag it with the unit's generation, `false` to remove it), written as few `HSET`s and
/// `HDEL`s: only the unit's final membership of each row is ever written.
#[derive(Default)]
struct Unit {
    commands: Vec<Cmd>,
    members: BTreeMap<String, bool>,
}

impl Unit {
    fn push(&mut self, command: Cmd) {
        self.commands.push(command);
    }

    fn set_member(&mut self, id: &str, current: bool) {
        self.members.insert(id.to_owned(), current);
    }
}

/// A command from its name and arguments.
fn command<const N: usize>(parts: [&str; N]) -> Cmd {
    let mut cmd = Cmd::new();
    for part in parts {
        cmd.arg(part);
    }
    cmd
}

/// Merges `columns` into a stored JSON row without re-parsing any value, so numbers
/// keep every digit; keys stay sorted, so the output is byte-stable.
fn merge_json(stored: Option<&str>, columns: &Row) -> Result<String, String> {
    let mut row: BTreeMap<String, Box<RawValue>> = match stored {
        Some(text) => {
            serde_json::from_str(text).map_err(|e| format!("stored row is not a JSON object: {e}"))?
        }
        None => BTreeMap::new(),
    };
    for (column, value) in columns {
        row.insert(column.to_owned(), serde_json::value::to_raw_value(value).map_err(|e| e.to_string())?);
    }
    serde_json::to_string(&row).map_err(|e| e.to_string())
}

fn row_json(row: &Row) -> String {
    serde_json::to_string(row).expect("rows always serialize")
}

/// The stored JSON of rows touched in this batch: `None` once deleted.
type RowState = HashMap<String, Option<String>>;

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
        Ok(RedisSink {
            conn,
            scripts: Scripts::new(),
            layout: config.layout,
            template: config.template().map_err(rejected)?,
            primary_key: config.primary_key,
            full_rows: ctx.shape.full_rows,
            keys: KeyNames::new(&config.prefix, config.hash_tag, &ctx.pipeline, &ctx.shape.table),
            table: ctx.shape.table,
            notify: config.notify,
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
            None if self.layout == Layout::Table => Ok(KeyTemplate::joined("", &pk)),
            None => Ok(KeyTemplate::joined(&format!("{}:", self.table), &pk)),
        }
    }

    fn row_key(template: &KeyTemplate, row: &Row, change: &Change) -> Result<String, SinkError> {
        template.render(row).map_err(|e| {
            SinkError::rejected(match e {
                KeyError::Missing(c) => format!(
                    "the {} of row {} has no value for key column `{c}`; key by columns every change carries (the primary key), or set `replica: full`",
                    change.op.as_str(),
                    change.key
                ),
                KeyError::Null(c) => {
                    format!("key column `{c}` is NULL in row {}; key by non-null columns", change.key)
                }
            })
        })
    }

    fn data_key(&self, id: &str) -> String {
        format!("{}{id}", self.keys.base)
    }

    fn publish(&self, unit: &mut Unit, op: Operation, id: &str) {
        let Some(channel) = &self.notify else { return };
        let message = match self.layout {
            Layout::Table => serde_json::json!({ "op": op.as_str(), "key": self.keys.table, "field": id }),
            Layout::Hash | Layout::Json => serde_json::json!({ "op": op.as_str(), "key": self.data_key(id) }),
        };
        unit.push(command(["PUBLISH", channel, &message.to_string()]));
    }

    /// Stores `json` as row `id` (JSON layouts).
    fn put_json(&self, unit: &mut Unit, id: &str, json: String, rows: &mut RowState) {
        match self.layout {
            Layout::Table => unit.push(command(["HSET", &self.keys.table, id, &json])),
            _ => unit.push(command(["SET", &self.data_key(id), &json])),
        }
        rows.insert(id.to_owned(), Some(json));
    }

    /// Writes `row` as the whole of row `id`; `replace` removes what was stored first
    /// (only a row known not to exist may skip it).
    fn put(&self, unit: &mut Unit, id: &str, row: &Row, rows: &mut RowState, replace: bool) {
        match self.layout {
            Layout::Hash => {
                let key = self.data_key(id);
                let mut fields = Vec::new();
                for (column, value) in row {
                    if let Some(text) = value.render() {
                        fields.push((column, text));
                    }
                }
                if replace {
                    // Inside the unit's script: no reader sees the row missing in between.
                    unit.push(command(["DEL", &key]));
                }
                if !fields.is_empty() {
                    // (A row of NULLs is an empty hash, which Redis does not keep.)
                    let mut hset = command(["HSET", &key]);
                    for (column, text) in &fields {
                        hset.arg(*column).arg(&**text);
                    }
                    unit.push(hset);
                }
            }
            Layout::Json | Layout::Table => self.put_json(unit, id, row_json(row), rows),
        }
    }

    /// Merges the given columns into row `id`.
    fn merge(&self, unit: &mut Unit, id: &str, columns: &Row, rows: &mut RowState) -> Result<(), SinkError> {
        match self.layout {
            Layout::Hash => {
                let key = self.data_key(id);
                let (nulls, set): (Vec<_>, Vec<_>) = columns.iter().partition(|(_, v)| v.is_null());
                if !set.is_empty() {
                    let mut hset = command(["HSET", &key]);
                    for (column, value) in set {
                        if let Some(text) = value.render() {
                            hset.arg(column).arg(&*text);
                        }
                    }
                    unit.push(hset);
                }
                if !nulls.is_empty() {
                    let mut hdel = command(["HDEL", &key]);
                    for (column, _) in nulls {
                        hdel.arg(column);
                    }
                    unit.push(hdel);
                }
            }
            Layout::Json | Layout::Table => {
                let stored = rows.get(id).cloned().flatten();
                let merged = merge_json(stored.as_deref(), columns).map_err(|m| {
                    SinkError::rejected(format!(
                        "cannot merge an update into row key `{id}`: {m}; another writer uses this key, give the sink its own `prefix`"
                    ))
                })?;
                self.put_json(unit, id, merged, rows);
            }
        }
        Ok(())
    }

    /// Removes row `id` and its membership.
    fn remove(&self, unit: &mut Unit, id: &str, rows: &mut RowState) {
        match self.layout {
            Layout::Table => unit.push(command(["HDEL", &self.keys.table, id])),
            Layout::Hash | Layout::Json => unit.push(command(["UNLINK", &self.data_key(id)])),
        }
        unit.set_member(id, false);
        rows.insert(id.to_owned(), None);
        self.publish(unit, Operation::Delete, id);
    }

    fn mark(&self, unit: &mut Unit, id: &str, op: Operation) {
        unit.set_member(id, true);
        self.publish(unit, op, id);
    }

    fn write_change(
        &self,
        unit: &mut Unit,
        template: &KeyTemplate,
        change: &Change,
        rows: &mut RowState,
        new_row: bool,
    ) -> Result<(), SinkError> {
        let id = Self::row_key(template, &change.value, change)?;
        match change.op {
            Operation::Insert => {
                self.put(unit, &id, &change.value, rows, !new_row);
                self.mark(unit, &id, Operation::Insert);
            }
            Operation::Delete => self.remove(unit, &id, rows),
            Operation::Update => {
                // Under `replica: full` an update may change a key column: the row moves.
                if let Some(old) = &change.old_value {
                    let mut before = change.value.clone();
                    before.merge(old);
                    let old_id = Self::row_key(template, &before, change)?;
                    if old_id != id {
                        self.remove(unit, &old_id, rows);
                        self.put(unit, &id, &change.value, rows, true);
                        self.mark(unit, &id, Operation::Insert);
                        return Ok(());
                    }
                }
                self.merge(unit, &id, &change.value, rows)?;
                self.mark(unit, &id, Operation::Update);
            }
        }
        Ok(())
    }

    /// Reads the stored JSON of every row an update will merge into (JSON layouts).
    /// The sink is its keys' only writer, so they cannot change before the unit runs.
    async fn stored_rows(
        &self,
        conn: &mut Connection,
        template: &KeyTemplate,
        changes: &[Change],
    ) -> Result<RowState, SinkError> {
        let mut rows = RowState::new();
        if self.layout == Layout::Hash {
            return Ok(rows);
        }
        let mut ids = Vec::new();
        for change in changes.iter().filter(|c| c.op == Operation::Update) {
            let id = Self::row_key(template, &change.value, change)?;
            if !rows.contains_key(&id) {
                rows.insert(id.clone(), None);
                ids.push(id);
            }
        }
        for chunk in ids.chunks(self.part_size) {
            let mut cmd = match self.layout {
                Layout::Table => redis::cmd("HMGET").arg(&self.keys.table).to_owned(),
                _ => redis::cmd("MGET"),
            };
            for id in chunk {
                match self.layout {
                    Layout::Table => cmd.arg(id),
                    _ => cmd.arg(self.data_key(id)),
                };
            }
            let values: Vec<Option<String>> = cmd.query_async(conn).await.map_err(classify)?;
            rows.extend(chunk.iter().cloned().zip(values));
        }
        Ok(rows)
    }

    /// Runs `unit` as one fenced script call (see `lease::UNIT_SCRIPT`): new
    /// memberships (tagged `generation`) first, so a write cut short never leaves a row
    /// the sweep cannot find, then the unit's commands, then removed memberships, then
    /// `checkpoint`. Redis runs a script alone, so readers never see half a unit. A
    /// failing command stops the script before the checkpoint.
    async fn run(
        &self,
        conn: &mut Connection,
        unit: Unit,
        generation: &str,
        checkpoint: Option<&str>,
        fence: Option<&Fence>,
    ) -> Result<UnitOutcome, SinkError> {
        let Unit { commands, members } = unit;
        let (joined, left): (Vec<_>, Vec<_>) = members.into_iter().partition(|(_, current)| *current);
        let mut ordered = Vec::with_capacity(commands.len() + 4);
        for chunk in joined.chunks(MEMBERS_PER_COMMAND) {
            let mut hset = command(["HSET", &self.keys.members]);
            for (id, _) in chunk {
                hset.arg(id).arg(generation);
            }
            ordered.push(hset);
        }
        ordered.extend(commands);
        for chunk in left.chunks(MEMBERS_PER_COMMAND) {
            let mut hdel = command(["HDEL", &self.keys.members]);
            for (id, _) in chunk {
                hdel.arg(id);
            }
            ordered.push(hdel);
        }
        ordered.extend(checkpoint.map(|json| command(["SET", &self.keys.checkpoint, json])));
        if ordered.is_empty() && fence.is_none() {
            return Ok(UnitOutcome::Applied);
        }
        let mut invocation = self.scripts.unit.key(&self.keys.lease);
        match fence {
            Some(f) => invocation.arg(&f.owner).arg(f.epoch).arg(f.seq).arg(f.ttl_ms),
            None => invocation.arg("").arg(0).arg(0).arg(0),
        };
        invocation.arg(if checkpoint.is_some() { "1" } else { "0" }).arg(generation);
        for cmd in &ordered {
            invocation.arg(cmd.args_iter().len());
            for arg in cmd.args_iter() {
                if let Arg::Simple(bytes) = arg {
                    invocation.arg(bytes);
                }
            }
        }
        let answer = invocation.invoke_async::<Value>(conn).await.map_err(|e| self.classify_unit(e))?;
        match fence {
            Some(f) => crate::lease::unit_outcome(answer, f, checkpoint.is_some()),
            None => Ok(UnitOutcome::Applied),
        }
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
            let mut unit = Unit::default();
            let mut scratch = RowState::new();
            for pair in flat.chunks_exact(2) {
                // An unreadable generation cannot be current, so the row goes.
                if pair[1].parse::<u64>().map_or(true, |g| g < generation) {
                    self.remove(&mut unit, &pair[0], &mut scratch);
                }
            }
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
        let mut conn = self.conn.clone();
        let template = self.key_template(batch.schema())?;
        let generation = batch.checkpoint.generation.to_string();
        let checkpoint = batch.checkpoint.to_json();
        let mut rows = self.stored_rows(&mut conn, &template, &batch.changes).await?;
        let snapshot = batch.is_snapshot();
        let new_rows = if snapshot {
            self.lands_in_empty_keyspace(&mut conn, batch).await?
        } else {
            *self.keyspace.lock().unwrap_or_else(|e| e.into_inner()) = Keyspace::Populated;
            false
        };
        let parts: Vec<&[Change]> = if batch.changes.is_empty() {
            vec![&[]]
        } else if snapshot {
            batch.changes.chunks(self.part_size).collect()
        } else {
            vec![&batch.changes]
        };
        // Parts before the last are replayable snapshot rows, so a few stay in flight to
        // overlap building with Redis work. The last part carries the checkpoint and is
        // sent only after every earlier part has committed.
        let mut in_flight = FuturesOrdered::new();
        let count = parts.len();
        let mut already = false;
        for (i, part) in parts.into_iter().enumerate() {
            let mut unit = Unit::default();
            for change in part {
                self.write_change(&mut unit, &template, change, &mut rows, new_rows)?;
            }
            if snapshot {
                rows.clear(); // inserts only: no later change reads what this part wrote
            }
            let last = i + 1 == count;
            if last {
                while let Some(outcome) = in_flight.next().await {
                    already |= outcome? == UnitOutcome::AlreadyCommitted;
                }
                if already {
                    return Ok(());
                }
            }
            let checkpoint = checkpoint.as_str();
            let with_checkpoint = (last && !batch.sweep).then_some(checkpoint);
            let mut conn = self.conn.clone();
            let generation = generation.as_str();
            in_flight.push_back(async move {
                self.run(&mut conn, unit, generation, with_checkpoint, fence).await
            });
            if (last || in_flight.len() >= PARTS_IN_FLIGHT)
                && let Some(outcome) = in_flight.next().await
            {
                already |= outcome? == UnitOutcome::AlreadyCommitted;
            }
            if already {
                while let Some(outcome) = in_flight.next().await {
                    outcome?;
                }
                return Ok(());
            }
        }
        if batch.sweep {
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
    use shapesync_core::Value;

    use super::*;

    #[test]
    fn json_merge_keeps_big_numbers_and_sorted_keys() {
        let stored = r#"{"a":9007199254740993,"j":{"x":1.10},"z":"keep"}"#;
        let mut update = Row::new();
        update.insert("b", Value::Int(i64::MAX));
        update.insert("z", Value::Null);
        assert_eq!(
            merge_json(Some(stored), &update).unwrap(),
            r#"{"a":9007199254740993,"b":9223372036854775807,"j":{"x":1.10},"z":null}"#
        );
        assert!(merge_json(Some("[1]"), &update).is_err());
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
