//! `type: redis` settings and their validation.

use std::sync::Arc;

use redis::{ConnectionInfo, IntoConnectionInfo};
use serde::Deserialize;
use shapesync_core::{
    Claim, ConfigError, Sink, SinkConfig, SinkContext, SinkError, SinkErrorKind, Space, async_trait,
};

use crate::layout;
use crate::sink::{KeyNames, RedisSink, internal_prefix};
use crate::template::KeyTemplate;

/// Default values of the optional settings, in one place.
pub mod defaults {
    /// Snapshot rows (and swept rows) per Redis transaction.
    pub const PART_SIZE: usize = 500;
    /// The largest `part_size` accepted: one unit's size bounds how long Redis is blocked.
    pub const MAX_PART_SIZE: usize = 10_000;
    /// How long one Redis command may take before the batch is retried.
    pub const TIMEOUT_MS: u64 = 10_000;
    /// How long a tombstone lives (`mode: invalidate` / `refresh`), in ms: a cache fill
    /// whose ticket is older is refused (see [`crate::guard`]).
    pub const TOMBSTONE_MS: u64 = crate::guard::DEFAULT_WINDOW_MS;

    pub(crate) fn part_size() -> usize {
        PART_SIZE
    }
    pub(crate) fn timeout_ms() -> u64 {
        TIMEOUT_MS
    }
    pub(crate) fn tombstone_ms() -> u64 {
        TOMBSTONE_MS
    }
}

/// What the sink does with the shape's rows.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// The sink owns a mirror of the shape: every row is written (the default).
    #[default]
    Mirror,
    /// The sink keeps an application's own cache honest: every committed change removes
    /// the keys its `keys` templates name, rendered with the old values and the new.
    Invalidate,
    /// As `invalidate` for `keys`, and the row's own key (`key`) is rewritten in place
    /// when it exists, so hot entries stay warm and cold rows are never loaded.
    Refresh,
}

impl Mode {
    /// The YAML name.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Mirror => "mirror",
            Mode::Invalidate => "invalidate",
            Mode::Refresh => "refresh",
        }
    }

    /// The sink keeps someone else's cache rather than a mirror of its own.
    pub fn keeps_a_cache(self) -> bool {
        self != Mode::Mirror
    }
}

/// How a pipeline's rows are stored.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Layout {
    /// One Redis hash per row, one field per non-NULL column (rendered by `Value::render`).
    #[default]
    Hash,
    /// One Redis string per row holding the row as a JSON object.
    Json,
    /// One Redis hash per shape (named after the table), one field per row key holding
    /// the row's JSON: the layout of Electric's own Redis example.
    Table,
}

/// Settings of a `type: redis` sink. Deliberately not `Debug`: the URL may hold a password.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisSinkConfig {
    /// `redis://[user:password@]host[:port][/db]` or `unix:///path/to.sock`.
    pub url: String,
    /// `mirror` (default), `invalidate` or `refresh`.
    #[serde(default)]
    pub mode: Mode,
    /// `mode: invalidate` / `refresh`: templates of the cache keys every change of a row
    /// invalidates (`project:{id}`, `org:{org_id}:projects`), rendered with the row's old
    /// values and its new ones.
    #[serde(default)]
    pub keys: Vec<String>,
    /// `mode: invalidate` / `refresh`: how long each invalidated key's tombstone lives,
    /// in ms; a fill whose ticket is older than this is refused (see [`crate::guard`]).
    #[serde(default = "defaults::tombstone_ms", deserialize_with = "shapesync_core::config::duration::ms")]
    pub tombstone_ms: u64,
    /// Row layout; `hash` by default.
    #[serde(default)]
    pub layout: Layout,
    /// Key template over column values, e.g. `project:{id}`; `{{`/`}}` are literal
    /// braces. Default: `<table>:<primary key values joined by ':'>` (for `table`:
    /// the primary key values only, as the field name).
    #[serde(default)]
    pub key: Option<String>,
    /// The table's primary-key columns, in key order. Optional: when given, the key
    /// template is checked against it at validation time; it is always checked against
    /// the shape's schema at the first batch.
    #[serde(default)]
    pub primary_key: Option<Vec<String>>,
    /// Prepended to every key this sink writes (rows, membership, checkpoint).
    #[serde(default)]
    pub prefix: String,
    /// Put every key of the pipeline in the Redis Cluster hash tag `{<pipeline>}`,
    /// right after `prefix`, so one script can touch them all on a cluster.
    #[serde(default)]
    pub hash_tag: bool,
    /// Channel to `PUBLISH` every committed change on (JSON, see the crate docs).
    #[serde(default)]
    pub notify: Option<String>,
    /// Database number; overrides the one in `url`.
    #[serde(default)]
    pub database: Option<i64>,
    /// Snapshot rows per Redis transaction, and membership entries scanned per sweep step;
    /// at most [`defaults::MAX_PART_SIZE`].
    #[serde(default = "defaults::part_size")]
    pub part_size: usize,
    /// Response timeout of one Redis command, in milliseconds.
    #[serde(default = "defaults::timeout_ms", deserialize_with = "shapesync_core::config::duration::ms")]
    pub timeout_ms: u64,
    /// `url` is one node of a Redis Cluster: the sink discovers the others and follows
    /// slot moves. Needs `hash_tag: true`, so each unit's keys share one slot.
    #[serde(default)]
    pub cluster: bool,
    /// For `rediss://`: a PEM file with the certificate authority that signed the
    /// server's certificate (a private CA). Default: the system's root certificates.
    #[serde(default)]
    pub ca_file: Option<std::path::PathBuf>,
    /// Run even though Redis' `maxmemory-policy` may evict keys (an `allkeys-*` policy),
    /// which would drop cached rows behind the checkpoint's back. Off: such a Redis is
    /// refused at start. Only for caches where a missing row is acceptable.
    #[serde(default)]
    pub allow_eviction: bool,
}

impl RedisSinkConfig {
    /// Settings with every optional key at its default.
    pub fn new(url: impl Into<String>) -> Self {
        RedisSinkConfig {
            url: url.into(),
            mode: Mode::default(),
            keys: Vec::new(),
            tombstone_ms: defaults::TOMBSTONE_MS,
            layout: Layout::default(),
            key: None,
            primary_key: None,
            prefix: String::new(),
            hash_tag: false,
            notify: None,
            database: None,
            part_size: defaults::PART_SIZE,
            timeout_ms: defaults::TIMEOUT_MS,
            cluster: false,
            ca_file: None,
            allow_eviction: false,
        }
    }

    /// The parsed key template, if one is configured.
    pub(crate) fn template(&self) -> Result<Option<KeyTemplate>, ConfigError> {
        self.key
            .as_deref()
            .map(KeyTemplate::parse)
            .transpose()
            .map_err(|m| ConfigError::new("key", format!("invalid key template: {m}")))
    }

    /// The `keys` templates (`mode: invalidate` / `refresh`), parsed; errors name the
    /// entry (`keys.1`).
    pub(crate) fn cache_templates(&self) -> Result<Vec<KeyTemplate>, ConfigError> {
        self.keys
            .iter()
            .enumerate()
            .map(|(i, text)| {
                KeyTemplate::parse(text)
                    .map_err(|m| ConfigError::new(format!("keys.{i}"), format!("invalid key template: {m}")))
            })
            .collect()
    }

    /// The keys rows are written under, and the keys the sink keeps for itself.
    pub(crate) fn key_spaces(&self, ctx: &SinkContext) -> (Space, Space) {
        let names = KeyNames::new(&self.prefix, self.hash_tag, &ctx.pipeline, &ctx.shape.table);
        let internal = Space::Prefix(format!("{}{}", names.base, internal_prefix(&ctx.pipeline)));
        // An invalid template is reported by `check`; until then it claims the default keys.
        let template = self.template().ok().flatten();
        let rows = layout::for_layout(self.layout, &names).key_space(template.as_ref(), &ctx.shape.table);
        (rows, internal)
    }

    /// Where to connect. Errors never contain the URL (it may hold a password).
    pub(crate) fn connection_info(&self) -> Result<ConnectionInfo, ConfigError> {
        let tls = self.url.starts_with("rediss://");
        if tls && !cfg!(feature = "tls") {
            return Err(ConfigError::new(
                "url",
                "this build has no TLS support for Redis (rediss://); build shapesync-sink-redis with its `tls` feature",
            ));
        }
        if self.ca_file.is_some() && !tls {
            return Err(ConfigError::new("ca_file", "only applies to rediss:// URLs"));
        }
        let info = self.url.as_str().into_connection_info().map_err(|e| {
            let detail = e.detail().unwrap_or("unparseable");
            ConfigError::new(
                "url",
                format!(
                    "not a usable Redis URL ({detail}); expected redis://[user:password@]host[:port][/db], rediss://… (TLS) or unix:///path/to/redis.sock"
                ),
            )
        })?;
        Ok(match self.database {
            Some(db) => {
                let settings = info.redis_settings().clone().set_db(db);
                info.set_redis_settings(settings)
            }
            None => info,
        })
    }
}

fn must_be_known(
    columns: &[String],
    used: impl Iterator<Item = impl AsRef<str>>,
    key: &str,
) -> Result<(), ConfigError> {
    for c in used {
        let c = c.as_ref();
        if !columns.iter().any(|k| k == c) {
            return Err(ConfigError::new(
                key,
                format!(
                    "column `{c}` is not among the shape's selected columns; add it to the source's `columns`"
                ),
            ));
        }
    }
    Ok(())
}

impl RedisSinkConfig {
    /// Checks the settings of the connection and of the units: URL, database, part
    /// size, timeout, `notify`, cluster, hash tag and CA file.
    fn check_connection(&self, ctx: &SinkContext) -> Result<(), ConfigError> {
        self.connection_info()?;
        if self.database.is_some_and(|db| db < 0) {
            return Err(ConfigError::new("database", "expected a database number of 0 or more"));
        }
        if !(1..=defaults::MAX_PART_SIZE).contains(&self.part_size) {
            return Err(ConfigError::new(
                "part_size",
                format!(
                    "expected 1 to {} rows per part, got {}; larger parts hold more rows in memory and in flight to Redis at once",
                    defaults::MAX_PART_SIZE,
                    self.part_size
                ),
            ));
        }
        if self.timeout_ms == 0 {
            return Err(ConfigError::new("timeout_ms", "expected a timeout of at least 1 ms"));
        }
        if self.notify.as_deref() == Some("") {
            return Err(ConfigError::new(
                "notify",
                "expected a channel name; remove the key to disable notifications",
            ));
        }
        if self.cluster {
            if !self.hash_tag {
                return Err(ConfigError::new(
                    "cluster",
                    "needs `hash_tag: true`: a Redis Cluster runs a script or transaction only on keys of one slot, and the hash tag puts all of a pipeline's keys in one",
                ));
            }
            if self.database.is_some_and(|db| db != 0) || self.url.starts_with("unix:") {
                return Err(ConfigError::new(
                    "cluster",
                    "a Redis Cluster has only database 0 and listens on TCP; drop `database` or use a redis:// URL",
                ));
            }
        }
        if self.hash_tag {
            if self.prefix.contains(['{', '}']) {
                return Err(ConfigError::new(
                    "prefix",
                    "must not contain `{` or `}` when `hash_tag` is on: Redis Cluster would hash the prefix instead of the pipeline tag",
                ));
            }
            if ctx.pipeline.contains(['{', '}']) || ctx.pipeline.is_empty() {
                return Err(ConfigError::new(
                    "hash_tag",
                    "the pipeline id is used as the hash tag and must be non-empty without `{` or `}`; rename the pipeline",
                ));
            }
        }
        if let Some(path) = &self.ca_file
            && let Err(e) = std::fs::metadata(path)
        {
            return Err(ConfigError::new("ca_file", format!("cannot read the file: {e}")));
        }
        Ok(())
    }

    /// Checks the settings of `mode` against each other: which keys each mode reads,
    /// the layouts and deployments a cache mode works with, and its templates.
    fn check_mode(&self, ctx: &SinkContext) -> Result<(), ConfigError> {
        let mode = self.mode.as_str();
        if !self.mode.keeps_a_cache() {
            if !self.keys.is_empty() {
                return Err(ConfigError::new(
                    "keys",
                    "only for `mode: invalidate` or `mode: refresh`; a mirror writes each row under its `key`",
                ));
            }
            return Ok(());
        }
        if self.mode == Mode::Invalidate && self.key.is_some() {
            return Err(ConfigError::new(
                "key",
                "`mode: invalidate` writes no row; list the keys a change invalidates under `keys` instead",
            ));
        }
        if self.mode == Mode::Invalidate && self.keys.is_empty() {
            return Err(ConfigError::new(
                "keys",
                "`mode: invalidate` needs the templates of the cache keys a change invalidates, e.g. `keys: [\"project:{id}\", \"org:{org_id}:projects\"]`",
            ));
        }
        if self.layout == Layout::Table {
            return Err(ConfigError::new(
                "layout",
                format!(
                    "`mode: {mode}` keeps keys of your own cache; `layout: table` keeps a mirror in one hash, use `hash` or `json`"
                ),
            ));
        }
        if self.cluster || self.hash_tag {
            return Err(ConfigError::new(
                if self.cluster { "cluster" } else { "hash_tag" },
                format!(
                    "`mode: {mode}` is not supported on Redis Cluster yet: the keys one change names live in different slots, which one script cannot reach; use a single Redis (or mode: mirror)"
                ),
            ));
        }
        if self.tombstone_ms == 0 {
            return Err(ConfigError::new(
                "tombstone_ms",
                "expected at least 1 ms; tombstones are what refuses a cache fill that read the database before the change",
            ));
        }
        let (rows, internal) = self.key_spaces(ctx);
        // No hash tag in these modes (refused above): every key starts with `prefix`.
        let guards = [
            Space::Prefix(crate::guard::NAMESPACE.to_owned()),
            Space::Prefix(format!("{}{}", self.prefix, crate::guard::NAMESPACE)),
        ];
        if self.mode == Mode::Refresh && guards.iter().any(|g| rows.overlaps(g)) {
            return Err(ConfigError::new(
                if self.key.is_some() { "key" } else { "prefix" },
                format!(
                    "the refreshed keys could be the guard's own (`{}*`: tombstones, the flush stamp); start `key` with other fixed text",
                    crate::guard::NAMESPACE
                ),
            ));
        }
        for (i, template) in self.cache_templates()?.iter().enumerate() {
            let key = format!("keys.{i}");
            let space = Space::Prefix(format!("{}{}", self.prefix, template.literal_prefix()));
            if space.overlaps(&internal) || guards.iter().any(|g| space.overlaps(g)) {
                return Err(ConfigError::new(
                    key,
                    format!(
                        "`{}` could name the sink's own keys ({} and `{}*`: checkpoint, lease, tombstones); start it with fixed text, e.g. `project:{{id}}`",
                        self.keys[i],
                        internal.describe(),
                        crate::guard::NAMESPACE
                    ),
                ));
            }
            if let Some(columns) = &ctx.shape.columns {
                must_be_known(columns, template.columns(), &key)?;
            }
            if let (false, Some(pk)) = (ctx.shape.full_rows, &self.primary_key)
                && let Some(c) = template.columns().find(|c| !pk.iter().any(|k| k == c))
            {
                return Err(ConfigError::new(key, crate::cache::needs_full_rows(&self.keys[i], c)));
            }
        }
        Ok(())
    }

    /// Checks the keys rows are written under: the template against the sink's own keys,
    /// the shape's columns and the primary key.
    fn check_keys(&self, ctx: &SinkContext) -> Result<(), ConfigError> {
        let template = self.template()?;
        let (rows, internal) = self.key_spaces(ctx);
        if rows.overlaps(&internal) {
            return Err(ConfigError::new(
                if self.key.is_some() { "key" } else { "prefix" },
                format!(
                    "row keys could be rendered as the sink's own keys ({}: the checkpoint, membership and lease); start the key template with fixed text, e.g. `item:{{id}}`",
                    internal.describe()
                ),
            ));
        }
        if let Some(pk) = &self.primary_key {
            if pk.is_empty() {
                return Err(ConfigError::new("primary_key", "expected at least one column"));
            }
            if let Some(columns) = &ctx.shape.columns {
                must_be_known(columns, pk.iter(), "primary_key")?;
            }
        }
        if let Some(template) = &template {
            if let Some(columns) = &ctx.shape.columns {
                must_be_known(columns, template.columns(), "key")?;
            }
            if let (false, Some(pk)) = (ctx.shape.full_rows, &self.primary_key)
                && let Some(c) = template.columns().find(|c| !pk.iter().any(|k| k == c))
            {
                return Err(ConfigError::new(
                    "key",
                    format!(
                        "uses `{c}`, which is not a primary-key column; updates carry only the primary key and changed columns, so set `replica: full` on the source or key by primary-key columns only"
                    ),
                ));
            }
        }
        Ok(())
    }
}

#[async_trait]
impl SinkConfig for RedisSinkConfig {
    fn check(&self, ctx: &SinkContext) -> Result<(), ConfigError> {
        self.check_connection(ctx)?;
        self.check_mode(ctx)?;
        self.check_keys(ctx)
    }

    /// A mirror's rows, and a refreshed row's own key, are this pipeline's alone; keys a
    /// cache mode invalidates may be named by other cache pipelines too (an
    /// `org:{org_id}:projects` list both a projects and an orgs pipeline invalidate),
    /// never by a mirror.
    fn claims(&self, ctx: &SinkContext) -> Vec<Claim> {
        let Ok(info) = self.connection_info() else { return Vec::new() };
        let db = info.redis_settings().db();
        let store = format!("redis://{}/{db}", info.addr());
        let (rows, internal) = self.key_spaces(ctx);
        let key = if self.key.is_some() { "key" } else { "prefix" };
        let mut claims =
            vec![Claim { store: store.clone(), space: internal, key: "prefix".into(), shared: false }];
        if self.mode != Mode::Invalidate {
            claims.push(Claim { store: store.clone(), space: rows, key: key.into(), shared: false });
        }
        for (i, template) in self.cache_templates().unwrap_or_default().iter().enumerate() {
            claims.push(Claim {
                store: store.clone(),
                space: Space::Prefix(format!("{}{}", self.prefix, template.literal_prefix())),
                key: format!("keys.{i}"),
                shared: true,
            });
        }
        claims
    }

    fn accepts_changes_only(&self) -> bool {
        self.mode.keeps_a_cache()
    }

    /// Connects; a server that is down at start-up does not fail the pipeline: the sink
    /// then connects on first use and reports `Unavailable` until it can, which the
    /// runner retries. Bad credentials and settings still fail here.
    async fn build(self, ctx: SinkContext) -> Result<Arc<dyn Sink>, SinkError> {
        let address = self.connection_info().map(|i| i.addr().to_string()).unwrap_or_default();
        let sink = match RedisSink::connect(self.clone(), ctx.clone()).await {
            Ok(sink) => {
                tracing::info!(pipeline = %ctx.pipeline, %address, "redis sink connected");
                sink
            }
            Err(e) if e.kind() == SinkErrorKind::Unavailable => {
                let reason = e.message();
                tracing::warn!(pipeline = %ctx.pipeline, %address, %reason, "redis is unreachable; will keep retrying");
                RedisSink::connect_lazy(self, ctx)?
            }
            Err(e) => return Err(e),
        };
        Ok(Arc::new(sink))
    }
}

#[cfg(test)]
mod tests {
    use shapesync_core::ShapeInfo;

    use super::*;

    fn ctx(full_rows: bool) -> SinkContext {
        SinkContext {
            pipeline: "projects".into(),
            shape: ShapeInfo {
                table: "projects".into(),
                columns: Some(vec!["id".into(), "org".into(), "name".into()]),
                full_rows,
                changes_only: false,
            },
        }
    }

    fn config(yaml: &str) -> RedisSinkConfig {
        serde_json::from_str(yaml).unwrap()
    }

    #[test]
    fn rejects_unknown_keys() {
        let r = serde_json::from_str::<RedisSinkConfig>(r#"{"url":"redis://h","ttl":5}"#);
        assert!(r.is_err());
        assert!(serde_json::from_str::<RedisSinkConfig>(r#"{"layout":"json"}"#).is_err(), "url is required");
    }

    #[test]
    fn bad_urls_are_rejected_without_echoing_the_password() {
        for url in ["http://u:s3cret@h", "redis://u:s3cret@", "not a url s3cret"] {
            let e = RedisSinkConfig::new(url).check(&ctx(false)).unwrap_err();
            assert_eq!(e.key, "url");
            assert!(!e.to_string().contains("s3cret"), "{e}");
        }
        assert!(RedisSinkConfig::new("redis://u:s3cret@localhost:1/2").check(&ctx(false)).is_ok());
    }

    #[test]
    fn non_primary_key_template_needs_full_rows() {
        let c = config(r#"{"url":"redis://h","key":"p:{org}:{id}","primary_key":["id"]}"#);
        let e = c.check(&ctx(false)).unwrap_err();
        assert_eq!(e.key, "key");
        assert!(e.message.contains("replica: full"), "{e}");
        assert!(c.check(&ctx(true)).is_ok());
        let pk_only = config(r#"{"url":"redis://h","key":"p:{id}","primary_key":["id"]}"#);
        assert!(pk_only.check(&ctx(false)).is_ok());
    }

    #[test]
    fn template_columns_must_be_selected() {
        let c = config(r#"{"url":"redis://h","key":"p:{missing}"}"#);
        assert_eq!(c.check(&ctx(true)).unwrap_err().key, "key");
        let c = config(r#"{"url":"redis://h","key":"p:{id"}"#);
        assert!(c.check(&ctx(true)).unwrap_err().message.contains("unclosed"));
    }

    #[test]
    fn cache_modes_check_their_keys() {
        let c = config(
            r#"{"url":"redis://h","mode":"invalidate","keys":["p:{id}","org:{org}:projects"],"primary_key":["id"]}"#,
        );
        let e = c.check(&ctx(false)).unwrap_err();
        assert_eq!(e.key, "keys.1");
        assert!(e.message.contains("`org:{org}:projects`") && e.message.contains("`org`"), "{e}");
        assert!(e.message.contains("replica: full"), "{e}");
        assert!(c.check(&ctx(true)).is_ok());
        assert!(c.accepts_changes_only());
        assert!(!config(r#"{"url":"redis://h"}"#).accepts_changes_only(), "a mirror needs the snapshot");

        let bad = [
            (r#"{"url":"redis://h","mode":"invalidate"}"#, "keys"),
            (r#"{"url":"redis://h","mode":"invalidate","keys":["p:{id}"],"key":"p:{id}"}"#, "key"),
            (r#"{"url":"redis://h","keys":["p:{id}"]}"#, "keys"),
            (r#"{"url":"redis://h","mode":"refresh","layout":"table"}"#, "layout"),
            (r#"{"url":"redis://h","mode":"invalidate","keys":["p:{id}"],"hash_tag":true}"#, "hash_tag"),
            (r#"{"url":"redis://h","mode":"invalidate","keys":["p:{id}"],"tombstone_ms":0}"#, "tombstone_ms"),
            (r#"{"url":"redis://h","mode":"invalidate","keys":["{id}"]}"#, "keys.0"),
            (r#"{"url":"redis://h","mode":"invalidate","keys":["shapesync.{id}"]}"#, "keys.0"),
            (r#"{"url":"redis://h","mode":"invalidate","keys":["p:{missing}"]}"#, "keys.0"),
            (r#"{"url":"redis://h","mode":"invalidate","keys":["p:{id"]}"#, "keys.0"),
            (r#"{"url":"redis://h","mode":"refresh","key":"shapesync.tomb:{id}"}"#, "key"),
        ];
        for (yaml, key) in bad {
            assert_eq!(config(yaml).check(&ctx(true)).unwrap_err().key, key, "{yaml}");
        }
    }

    #[test]
    fn keys_several_cache_pipelines_invalidate_are_shared_but_a_mirror_is_not() {
        let invalidate = config(r#"{"url":"redis://h","mode":"invalidate","keys":["org:{org}:projects"]}"#);
        let other = config(r#"{"url":"redis://h","mode":"invalidate","keys":["org:{id}:projects"]}"#);
        let mirror = config(r#"{"url":"redis://h","key":"org:{id}"}"#);
        let ctx_of = |pipeline: &str| SinkContext { pipeline: pipeline.into(), ..ctx(true) };
        let (a, b, m) =
            (invalidate.claims(&ctx_of("a")), other.claims(&ctx_of("b")), mirror.claims(&ctx_of("m")));
        let clash = |x: &[Claim], y: &[Claim]| x.iter().any(|c| y.iter().any(|d| c.overlaps(d)));
        assert!(!clash(&a, &b), "two invalidating pipelines may name the same keys");
        assert!(clash(&a, &m), "a mirror's rows are its own");
    }

    #[test]
    fn hash_tag_rejects_braces_in_prefix() {
        let c = config(r#"{"url":"redis://h","prefix":"a{b}:","hash_tag":true}"#);
        assert_eq!(c.check(&ctx(false)).unwrap_err().key, "prefix");
    }

    #[test]
    fn durations_take_units() {
        let c = config(r#"{"url":"redis://h","timeout_ms":"2s","tombstone_ms":"1m"}"#);
        assert_eq!((c.timeout_ms, c.tombstone_ms), (2000, 60_000));
        assert!(
            serde_json::from_str::<RedisSinkConfig>(r#"{"url":"redis://h","timeout_ms":"soon"}"#).is_err()
        );
    }

    #[test]
    fn numeric_limits_are_checked() {
        for part_size in [0, defaults::MAX_PART_SIZE + 1] {
            let c = config(&format!(r#"{{"url":"redis://h","part_size":{part_size}}}"#));
            assert_eq!(c.check(&ctx(false)).unwrap_err().key, "part_size");
        }
        let c = config(r#"{"url":"redis://h","database":-1}"#);
        assert_eq!(c.check(&ctx(false)).unwrap_err().key, "database");
    }
}
