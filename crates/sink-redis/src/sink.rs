//! The Redis sink: rows, membership and checkpoint, written by one Lua script per live
//! transaction and by plain pipelines for snapshot parts and sweep steps.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use futures::stream::FuturesOrdered;
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::{Arg, Client, Cmd, ErrorKind, Pipeline, RedisError, RedisFuture, Script, ServerErrorKind, Value};
use serde_json::value::RawValue;
use shapesync_core::{
    Batch, Change, Checkpoint, Operation, Row, Schema, Sink, SinkConfig, SinkContext, SinkError, async_trait,
};

use crate::config::{Layout, RedisSinkConfig};
use crate::template::{KeyError, KeyTemplate};

/// Runs a live transaction's commands atomically. ARGV holds, per command, its argument
/// count and then its arguments. A failing command aborts the script, so the checkpoint
/// (always the last command) is never written past data that failed. KEYS[1] is the
/// checkpoint key, declared so that a cluster routes the script to the pipeline's slot.
const APPLY_SCRIPT: &str = r"
local i, n = 1, #ARGV
while i <= n do
  local argc = tonumber(ARGV[i])
  redis.call(unpack(ARGV, i + 1, i + argc))
  i = i + 1 + argc
end
return n
";

/// Replaces a row's hash in one step (KEYS[1]; ARGV: field, value, …): a reader never
/// sees the row missing between its `DEL` and `HSET`, which a plain pipeline allows
/// (Redis serves other clients between any two commands of one). Sent with `EVAL`, so
/// no script cache has to be loaded first; inside a live transaction's script the two
/// commands run as they are.
const REPLACE_SCRIPT: &str = "redis.call('DEL', KEYS[1]) redis.call('HSET', KEYS[1], unpack(ARGV)) return 1";

/// Snapshot parts sent before the previous ones have answered.
const PARTS_IN_FLIGHT: usize = 4;

/// Membership entries per `HSET`/`HDEL`. Each command runs alone in Redis, so it is kept
/// short (~0.4 ms on a million-entry hash) for readers; it must also stay under the 8000
/// values Redis' Lua `unpack` takes.
const MEMBERS_PER_COMMAND: usize = 250;

/// How long to wait for a TCP connection before calling Redis unavailable.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// The sink's connection: to one server (reconnecting by itself), or to a Redis Cluster
/// (connected on first use, then following slot moves). Cheap to clone.
#[derive(Clone)]
enum Conn {
    Single(ConnectionManager),
    Cluster(Arc<ClusterClient>, Arc<tokio::sync::OnceCell<ClusterConnection>>),
}

impl Conn {
    async fn cluster(
        client: &ClusterClient,
        cell: &tokio::sync::OnceCell<ClusterConnection>,
    ) -> redis::RedisResult<ClusterConnection> {
        cell.get_or_try_init(|| client.get_async_connection()).await.cloned()
    }
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(conn) => conn.req_packed_command(cmd),
            Conn::Cluster(client, cell) => {
                Box::pin(async move { Self::cluster(client, cell).await?.req_packed_command(cmd).await })
            }
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(conn) => conn.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(client, cell) => Box::pin(async move {
                Self::cluster(client, cell).await?.req_packed_commands(pipeline, offset, count).await
            }),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(conn) => conn.get_db(),
            Conn::Cluster(..) => 0,
        }
    }
}

/// A Redis cache kept exactly in sync with a shape; see the crate docs for the layout.
pub struct RedisSink {
    conn: Conn,
    script: Script,
    layout: Layout,
    template: Option<KeyTemplate>,
    primary_key: Option<Vec<String>>,
    full_rows: bool,
    table: String,
    notify: Option<String>,
    part_size: usize,
    keys: KeyNames,
    keyspace: std::sync::Mutex<Keyspace>,
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

/// The names of every key a pipeline owns.
struct KeyNames {
    /// `prefix` plus the hash tag: the start of every key.
    base: String,
    checkpoint: String,
    members: String,
    /// The shape's hash under the `table` layout.
    table: String,
}

impl KeyNames {
    fn new(prefix: &str, hash_tag: bool, pipeline: &str, table: &str) -> Self {
        let base = if hash_tag { format!("{prefix}{{{pipeline}}}:") } else { prefix.to_owned() };
        KeyNames {
            checkpoint: format!("{base}shapesync:{pipeline}:checkpoint"),
            members: format!("{base}shapesync:{pipeline}:members"),
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
    /// The unit runs as one script (a live transaction), not as a plain pipeline.
    atomic: bool,
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

fn rejected(e: shapesync_core::ConfigError) -> SinkError {
    SinkError::Rejected(e.to_string())
}

/// Maps a Redis failure to the runner's retry classes.
fn classify(e: RedisError) -> SinkError {
    let transient = e.is_io_error()
        || e.is_timeout()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || matches!(
            e.kind(),
            ErrorKind::Server(
                ServerErrorKind::BusyLoading
                    | ServerErrorKind::TryAgain
                    | ServerErrorKind::ClusterDown
                    | ServerErrorKind::MasterDown
                    | ServerErrorKind::ReadOnly
            )
        )
        || matches!(e.code(), Some("BUSY" | "OOM" | "MISCONF" | "NOREPLICAS"));
    if e.to_string().contains("certificate") {
        // A TLS handshake that failed verification: retrying cannot fix it.
        SinkError::Rejected(format!(
            "redis: {e}; check that the server's certificate matches the host in `url`, or set `ca_file` to the CA that signed it"
        ))
    } else if transient {
        SinkError::Unavailable(format!("redis: {e}"))
    } else {
        SinkError::Rejected(format!("redis refused a command: {e}"))
    }
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
        #[cfg(feature = "tls")]
        let _ = rustls::crypto::ring::default_provider().install_default();
        let root_cert = match &config.ca_file {
            Some(path) => Some(std::fs::read(path).map_err(|e| {
                SinkError::Rejected(format!("cannot read `ca_file` {}: {e}", path.display()))
            })?),
            None => None,
        };
        let bad_ca = |e: RedisError| {
            let path = config.ca_file.as_deref().unwrap_or(std::path::Path::new("")).display();
            SinkError::Rejected(format!("`ca_file` {path} holds no usable certificate: {e}"))
        };
        let timeout = Duration::from_millis(config.timeout_ms);
        let conn = if config.cluster {
            let mut builder = ClusterClient::builder([info])
                .connection_timeout(CONNECT_TIMEOUT)
                .response_timeout(timeout)
                .retries(1);
            #[cfg(feature = "tls")]
            if root_cert.is_some() {
                builder =
                    builder.certs(redis::TlsCertificates { client_tls: None, root_cert: root_cert.clone() });
            }
            let client =
                builder.build().map_err(|e| if root_cert.is_some() { bad_ca(e) } else { classify(e) })?;
            Conn::Cluster(Arc::new(client), Arc::default())
        } else {
            let client = match root_cert {
                #[cfg(feature = "tls")]
                Some(pem) => {
                    let certs = redis::TlsCertificates { client_tls: None, root_cert: Some(pem) };
                    Client::build_with_tls(info, certs).map_err(bad_ca)?
                }
                _ => Client::open(info).map_err(classify)?,
            };
            let manager_config = ConnectionManagerConfig::new()
                .set_connection_timeout(Some(CONNECT_TIMEOUT))
                .set_response_timeout(Some(timeout))
                .set_number_of_retries(1);
            Conn::Single(ConnectionManager::new_lazy_with_config(client, manager_config).map_err(classify)?)
        };
        Self::with_connection(config, ctx, conn)
    }

    fn with_connection(config: RedisSinkConfig, ctx: SinkContext, conn: Conn) -> Result<Self, SinkError> {
        Ok(RedisSink {
            conn,
            script: Script::new(APPLY_SCRIPT),
            layout: config.layout,
            template: config.template().map_err(rejected)?,
            primary_key: config.primary_key,
            full_rows: ctx.shape.full_rows,
            keys: KeyNames::new(&config.prefix, config.hash_tag, &ctx.pipeline, &ctx.shape.table),
            table: ctx.shape.table,
            notify: config.notify,
            part_size: config.part_size,
            keyspace: std::sync::Mutex::new(Keyspace::Unknown),
        })
    }

    /// Whether the rows of this snapshot batch land in an empty keyspace (see [`Keyspace`]).
    /// Only the first generation seen can qualify; anything else makes the answer `false`
    /// for the rest of the sink's life.
    async fn lands_in_empty_keyspace(&self, conn: &mut Conn, batch: &Batch) -> Result<bool, SinkError> {
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
            return Err(SinkError::Rejected(format!(
                "sink `primary_key` is {configured:?} but the table's primary key is {pk:?}; fix `primary_key`"
            )));
        }
        match &self.template {
            Some(template) => {
                for c in template.columns().filter(|c| !pk.contains(c)) {
                    let Some(column) = schema.0.get(c) else {
                        return Err(SinkError::Rejected(format!(
                            "key template uses `{c}`, which is not among the shape's columns; add it to the source's `columns` or fix `key`"
                        )));
                    };
                    if !self.full_rows {
                        return Err(SinkError::Rejected(format!(
                            "key template uses `{c}`, which is not a primary-key column (the primary key is {pk:?}); updates carry only the primary key and changed columns, so set `replica: full` on the source or key by primary-key columns only"
                        )));
                    }
                    if !column.not_null {
                        return Err(SinkError::Rejected(format!(
                            "key template uses `{c}`, which is neither in the primary key nor NOT NULL in table `{}`; a row with NULL there would have no key and stop the pipeline, so key by primary-key or NOT NULL columns (or add a NOT NULL constraint)",
                            self.table
                        )));
                    }
                }
                Ok(template.clone())
            }
            None if pk.is_empty() => Err(SinkError::Rejected(format!(
                "table `{}` has no primary key, so there is no default key; set `key` on the sink",
                self.table
            ))),
            None if self.layout == Layout::Table => Ok(KeyTemplate::joined("", &pk)),
            None => Ok(KeyTemplate::joined(&format!("{}:", self.table), &pk)),
        }
    }

    fn row_key(template: &KeyTemplate, row: &Row, change: &Change) -> Result<String, SinkError> {
        template.render(row).map_err(|e| {
            SinkError::Rejected(match e {
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
                if fields.is_empty() {
                    // A row of NULLs is an empty hash, which Redis does not keep.
                    if replace {
                        unit.push(command(["DEL", &key]));
                    }
                } else if replace && !unit.atomic {
                    let mut eval = command(["EVAL", REPLACE_SCRIPT, "1", &key]);
                    for (column, text) in &fields {
                        eval.arg(*column).arg(&**text);
                    }
                    unit.push(eval);
                } else {
                    if replace {
                        unit.push(command(["DEL", &key]));
                    }
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
                    SinkError::Rejected(format!(
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
        conn: &mut Conn,
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

    /// Runs `unit`: new memberships (tagged `generation`) first, so a write cut short
    /// never leaves a row the sweep cannot find, then the unit's commands, then removed
    /// memberships, then `checkpoint`. An atomic unit (a live transaction) is one script
    /// call. Any other unit (replayable snapshot parts and sweep steps) is a plain
    /// pipeline, which costs Redis less and lets readers in between its commands; its
    /// checkpoint is stored only once every command of the pipeline has succeeded.
    async fn run(
        &self,
        conn: &mut Conn,
        unit: Unit,
        generation: &str,
        checkpoint: Option<&str>,
    ) -> Result<(), SinkError> {
        let Unit { commands, members, atomic } = unit;
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
        let store_checkpoint = checkpoint.map(|json| command(["SET", &self.keys.checkpoint, json]));
        if atomic {
            ordered.extend(store_checkpoint);
            if ordered.is_empty() {
                return Ok(());
            }
            let mut invocation = self.script.key(&self.keys.checkpoint);
            for cmd in &ordered {
                invocation.arg(cmd.args_iter().len());
                for arg in cmd.args_iter() {
                    if let Arg::Simple(bytes) = arg {
                        invocation.arg(bytes);
                    }
                }
            }
            invocation.invoke_async::<redis::Value>(conn).await.map_err(classify)?;
            return Ok(());
        }
        if !ordered.is_empty() {
            let mut pipe = redis::pipe();
            for cmd in ordered {
                pipe.add_command(cmd).ignore();
            }
            pipe.query_async::<()>(conn).await.map_err(classify)?;
        }
        if let Some(set) = store_checkpoint {
            set.query_async::<()>(conn).await.map_err(classify)?;
        }
        Ok(())
    }

    /// Deletes every member whose generation is below `generation`, `part_size` entries
    /// per step; the last step also stores `checkpoint`, if given.
    async fn sweep(
        &self,
        conn: &mut Conn,
        generation: u64,
        checkpoint: Option<&str>,
    ) -> Result<(), SinkError> {
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
            self.run(conn, unit, "", checkpoint.filter(|_| done)).await?;
            if done {
                return Ok(());
            }
            cursor = next;
        }
    }
}

#[async_trait]
impl Sink for RedisSink {
    async fn checkpoint(&self) -> Result<Option<Checkpoint>, SinkError> {
        let mut conn = self.conn.clone();
        let stored: Option<String> =
            redis::cmd("GET").arg(&self.keys.checkpoint).query_async(&mut conn).await.map_err(classify)?;
        stored
            .map(|json| Checkpoint::from_json(&json))
            .transpose()
            .map_err(|e| SinkError::CorruptCheckpoint(format!("key `{}`: {e}", self.keys.checkpoint)))
    }

    async fn apply(&self, batch: &Batch) -> Result<(), SinkError> {
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
        for (i, part) in parts.into_iter().enumerate() {
            let mut unit = Unit { atomic: !snapshot, ..Unit::default() };
            for change in part {
                self.write_change(&mut unit, &template, change, &mut rows, new_rows)?;
            }
            if snapshot {
                rows.clear(); // inserts only: no later change reads what this part wrote
            }
            let last = i + 1 == count;
            if last {
                while let Some(committed) = in_flight.next().await {
                    committed?;
                }
            }
            let checkpoint = checkpoint.as_str();
            let with_checkpoint = (last && !batch.sweep).then_some(checkpoint);
            let mut conn = self.conn.clone();
            let generation = generation.as_str();
            in_flight.push_back(async move { self.run(&mut conn, unit, generation, with_checkpoint).await });
            if (last || in_flight.len() >= PARTS_IN_FLIGHT)
                && let Some(committed) = in_flight.next().await
            {
                committed?;
            }
        }
        if batch.sweep {
            self.sweep(&mut conn, batch.checkpoint.generation, Some(&checkpoint)).await?;
        }
        Ok(())
    }

    async fn reset(&self) -> Result<(), SinkError> {
        let mut conn = self.conn.clone();
        // The checkpoint goes first: a reset cut short leaves rows but no progress, so the
        // next run resyncs instead of trusting rows that are partly gone.
        let mut unit = Unit::default();
        unit.push(command(["DEL", &self.keys.checkpoint]));
        self.run(&mut conn, unit, "", None).await?;
        self.sweep(&mut conn, u64::MAX, None).await?;
        let mut unit = Unit::default();
        unit.push(command(["UNLINK", &self.keys.members]));
        self.run(&mut conn, unit, "", None).await
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
