//! `type: postgres` settings and their validation.

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use shapesync_core::{Claim, ConfigError, Sink, SinkConfig, SinkContext, SinkError, Space, async_trait};
use sqlx::postgres::PgConnectOptions;

use shapesync_sql_table as sql_table;

use crate::sink::PostgresSink;

/// Default values of the optional settings, in one place.
pub mod defaults {
    /// How long Postgres keeps a sink session that sits idle inside a transaction (a
    /// paused or cut-off instance holding locks) before ending it.
    pub const IDLE_IN_TRANSACTION_TIMEOUT: &str = "10s";
    /// The Postgres schema the table goes to.
    pub const SCHEMA: &str = "public";
    /// How long to wait for a connection before calling the database unavailable.
    pub const CONNECT_TIMEOUT_MS: u64 = 5_000;

    pub(crate) fn schema() -> String {
        SCHEMA.to_owned()
    }
    pub(crate) fn connect_timeout_ms() -> u64 {
        CONNECT_TIMEOUT_MS
    }
}

/// Settings of a `type: postgres` sink. Deliberately not `Debug`: the URL may hold a
/// password.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresSinkConfig {
    /// `postgres://[user[:password]@]host[:port]/database[?options]`.
    pub url: String,
    /// The schema holding the table and the checkpoints table; it must exist.
    #[serde(default = "defaults::schema")]
    pub schema: String,
    /// The table holding the shape's rows. Default: the shape's table name, prefixed by
    /// its source schema unless that is `public` (`public.items` → `items`,
    /// `sales.items` → `sales_items`).
    #[serde(default)]
    pub table: Option<String>,
    /// How long to wait for a connection, in milliseconds, before the batch is retried.
    #[serde(
        default = "defaults::connect_timeout_ms",
        deserialize_with = "shapesync_core::config::duration::ms"
    )]
    pub connect_timeout_ms: u64,
}

impl PostgresSinkConfig {
    /// Settings with every optional key at its default.
    pub fn new(url: impl Into<String>) -> Self {
        PostgresSinkConfig {
            url: url.into(),
            schema: defaults::schema(),
            table: None,
            connect_timeout_ms: defaults::CONNECT_TIMEOUT_MS,
        }
    }

    /// The table the rows go to for a shape of `shape_table`.
    pub(crate) fn table_name(&self, shape_table: &str) -> String {
        sql_table::table_name(self.table.as_deref(), shape_table)
    }

    /// Where to connect. Errors never contain the URL (it may hold a password).
    pub(crate) fn connect_options(&self) -> Result<PgConnectOptions, ConfigError> {
        if !(self.url.starts_with("postgres://") || self.url.starts_with("postgresql://")) {
            return Err(ConfigError::new(
                "url",
                "expected postgres://[user[:password]@]host[:port]/database",
            ));
        }
        let options = PgConnectOptions::from_str(&self.url).map_err(|_| {
            ConfigError::new(
                "url",
                "not a usable Postgres URL; expected postgres://[user[:password]@]host[:port]/database",
            )
        })?;
        // Operators find the sink's sessions in `pg_stat_activity` by name.
        let options = match options.get_application_name() {
            Some(_) => options,
            None => options.application_name("shapesync"),
        };
        // `CREATE … IF NOT EXISTS` of an existing table is normal here, not news for the log.
        // A session idle inside a transaction is an instance paused or cut off while it
        // held the lease row's lock: Postgres ends it, so another instance can take over
        // (the sink itself never waits between the statements of a transaction).
        Ok(options.options([
            ("client_min_messages", "warning"),
            ("idle_in_transaction_session_timeout", defaults::IDLE_IN_TRANSACTION_TIMEOUT),
        ]))
    }

    pub(crate) fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms)
    }
}

#[async_trait]
impl SinkConfig for PostgresSinkConfig {
    fn check(&self, ctx: &SinkContext) -> Result<(), ConfigError> {
        self.connect_options()?;
        if self.schema.is_empty() {
            return Err(ConfigError::new("schema", "expected a schema name"));
        }
        sql_table::check_names(&self.table_name(&ctx.shape.table), &ctx.shape)?;
        if self.connect_timeout_ms == 0 {
            return Err(ConfigError::new("connect_timeout_ms", "expected a timeout of at least 1 ms"));
        }
        Ok(())
    }

    fn claims(&self, ctx: &SinkContext) -> Vec<Claim> {
        let Ok(options) = self.connect_options() else { return Vec::new() };
        let database = options.get_database().unwrap_or_default();
        vec![Claim {
            store: format!("postgres://{}:{}/{database}", options.get_host(), options.get_port()),
            space: Space::Exact(format!("{}.{}", self.schema, self.table_name(&ctx.shape.table))),
            key: "table".into(),
            shared: false,
        }]
    }

    /// Creates the connection pool without connecting: a database that is down at
    /// start-up surfaces as `Unavailable` on first use, which the runner retries.
    async fn build(self, ctx: SinkContext) -> Result<Arc<dyn Sink>, SinkError> {
        self.check(&ctx).map_err(|e| SinkError::rejected(e.to_string()).with_source(e))?;
        Ok(Arc::new(PostgresSink::new(&self, ctx)?))
    }
}
