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

    pub(crate) fn part_size() -> usize {
        PART_SIZE
    }
    pub(crate) fn timeout_ms() -> u64 {
        TIMEOUT_MS
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
    #[serde(default = "defaults::timeout_ms")]
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
        self.check_keys(ctx)
    }

    fn claims(&self, ctx: &SinkContext) -> Vec<Claim> {
        let Ok(info) = self.connection_info() else { return Vec::new() };
        let db = info.redis_settings().db();
        let store = format!("redis://{}/{db}", info.addr());
        let (rows, internal) = self.key_spaces(ctx);
        let key = if self.key.is_some() { "key" } else { "prefix" };
        vec![
            Claim { store: store.clone(), space: rows, key: key.into() },
            Claim { store, space: internal, key: "prefix".into() },
        ]
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
    fn hash_tag_rejects_braces_in_prefix() {
        let c = config(r#"{"url":"redis://h","prefix":"a{b}:","hash_tag":true}"#);
        assert_eq!(c.check(&ctx(false)).unwrap_err().key, "prefix");
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
