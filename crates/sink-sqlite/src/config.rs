//! `type: sqlite` settings and their validation.

use std::path::PathBuf;
use std::sync::Arc;

use serde::Deserialize;
use shapesync_core::{Claim, ConfigError, Sink, SinkConfig, SinkContext, SinkError, Space, async_trait};

use shapesync_sql_table as sql_table;

use crate::sink::SqliteSink;

/// Default values of the optional settings, in one place.
pub mod defaults {
    /// How long a write waits for another connection's lock before the batch is retried.
    pub const BUSY_TIMEOUT_MS: u64 = 5_000;

    pub(crate) fn busy_timeout_ms() -> u64 {
        BUSY_TIMEOUT_MS
    }
}

/// Settings of a `type: sqlite` sink.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SqliteSinkConfig {
    /// The database file. It is created on the first write if missing; its directory
    /// must exist.
    pub path: PathBuf,
    /// The table holding the shape's rows. Default: the shape's table name, prefixed by
    /// its schema unless that is `public` (`public.items` → `items`, `sales.items` →
    /// `sales_items`).
    #[serde(default)]
    pub table: Option<String>,
    /// How long a write waits for a lock another connection holds, in milliseconds,
    /// before the batch is retried.
    #[serde(
        default = "defaults::busy_timeout_ms",
        deserialize_with = "shapesync_core::config::duration::ms"
    )]
    pub busy_timeout_ms: u64,
}

impl SqliteSinkConfig {
    /// Settings with every optional key at its default.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        SqliteSinkConfig { path: path.into(), table: None, busy_timeout_ms: defaults::BUSY_TIMEOUT_MS }
    }

    /// The table the rows go to for a shape of `shape_table`.
    pub(crate) fn table_name(&self, shape_table: &str) -> String {
        sql_table::table_name(self.table.as_deref(), shape_table)
    }
}

#[async_trait]
impl SinkConfig for SqliteSinkConfig {
    fn check(&self, ctx: &SinkContext) -> Result<(), ConfigError> {
        let path = self.path.to_string_lossy();
        if path.is_empty() {
            return Err(ConfigError::new("path", "expected the path of a SQLite database file"));
        }
        if path == ":memory:" || path.starts_with("file::memory:") {
            return Err(ConfigError::new(
                "path",
                "an in-memory SQLite database lives only as long as one connection; use `type: memory` for an in-process cache, or give a file path",
            ));
        }
        sql_table::check_names(&self.table_name(&ctx.shape.table), &ctx.shape)?;
        if self.busy_timeout_ms == 0 {
            return Err(ConfigError::new("busy_timeout_ms", "expected a timeout of at least 1 ms"));
        }
        Ok(())
    }

    fn claims(&self, ctx: &SinkContext) -> Vec<Claim> {
        let file = std::path::absolute(&self.path).unwrap_or_else(|_| self.path.clone());
        vec![Claim {
            store: file.display().to_string(),
            space: Space::Exact(self.table_name(&ctx.shape.table)),
            key: "table".into(),
            shared: false,
        }]
    }

    async fn build(self, ctx: SinkContext) -> Result<Arc<dyn Sink>, SinkError> {
        self.check(&ctx).map_err(|e| SinkError::rejected(e.to_string()).with_source(e))?;
        Ok(Arc::new(SqliteSink::new(self, ctx)))
    }
}
