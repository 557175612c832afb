//! A small HTTP service that caches Postgres rows in Redis the way most services do —
//! cache-aside: read the cache, on a miss read the database and fill the cache — but
//! with **no TTL and no invalidation code**. shapesync, with the pipeline in
//! `pipeline.yaml` (`mode: invalidate`) or `pipeline-refresh.yaml` (`mode: refresh`),
//! removes or rewrites the cached keys of every row that changes, and the fill goes
//! through `shapesync_sink_redis::guard`, so a reader that read the row just before it
//! changed cannot put the old row back.
//!
//! Routes: `GET /projects/{id}` (cached as `project:{id}`, the row's JSON) and
//! `GET /orgs/{org_id}/projects` (cached as `org:{org_id}:projects`, a JSON array of
//! ids; invalidated when a project joins or leaves the org).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use redis::AsyncCommands;
use redis::aio::ConnectionManager;
use serde::{Deserialize, Serialize};
use shapesync_sink_redis::guard::{self, FillOptions, FillValue};
use sqlx::PgPool;

/// A row of the `projects` table, as the service returns it and the cache holds it (the
/// JSON shapesync's `json` layout writes too, so `mode: refresh` can rewrite it).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Project {
    /// Primary key.
    pub id: i64,
    /// The project's name.
    pub name: String,
    /// The org it belongs to.
    pub org_id: i64,
    /// Bumped by every write (the test uses it to spot a stale read).
    pub version: i64,
}

/// How the service is set up.
#[derive(Clone, Debug)]
pub struct Settings {
    /// The table holding the projects (`id int8 primary key, name text, org_id int8,
    /// version int8`).
    pub table: String,
    /// The Redis key prefix, as the shapesync sink's `prefix`.
    pub prefix: String,
    /// The oldest ticket a fill accepts, in ms: at most the sink's `tombstone_ms`.
    pub window_ms: u64,
    /// Waits up to this long between the database read and the fill: only for tests,
    /// which widen the stale-fill race with it.
    pub fill_delay: Duration,
}

impl Settings {
    /// The service over `table`, with the sink's defaults.
    pub fn new(table: impl Into<String>) -> Self {
        Settings {
            table: table.into(),
            prefix: String::new(),
            window_ms: guard::DEFAULT_WINDOW_MS,
            fill_delay: Duration::ZERO,
        }
    }
}

/// What went wrong serving a read.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// Postgres failed.
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    /// Redis failed.
    #[error("cache: {0}")]
    Cache(#[from] redis::RedisError),
    /// A cached value is not what this service writes.
    #[error("cache holds a value this service cannot read: {0}")]
    Corrupt(#[from] serde_json::Error),
}

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        (StatusCode::INTERNAL_SERVER_ERROR, self.to_string()).into_response()
    }
}

/// Counts of what the cache did, for tests and logs.
#[derive(Debug, Default)]
pub struct Stats {
    /// Reads served from the cache.
    pub hits: AtomicU64,
    /// Reads that went to the database.
    pub misses: AtomicU64,
    /// Fills the guard refused (an invalidation came in during the read).
    pub refused_fills: AtomicU64,
}

/// The service: a Postgres pool, a Redis connection and the fill script.
pub struct App {
    pg: PgPool,
    redis: ConnectionManager,
    fill: redis::Script,
    settings: Settings,
    /// What the cache did.
    pub stats: Stats,
}

impl App {
    /// The service over `pg` and `redis`. `settings.table` must be a plain identifier.
    pub fn new(pg: PgPool, redis: ConnectionManager, settings: Settings) -> Arc<App> {
        assert!(
            settings.table.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'),
            "the table must be a plain lower-case identifier"
        );
        Arc::new(App {
            pg,
            redis,
            fill: redis::Script::new(guard::FILL_SCRIPT),
            settings,
            stats: Stats::default(),
        })
    }

    /// The routes.
    pub fn router(self: Arc<Self>) -> Router {
        Router::new()
            .route("/projects/{id}", get(project))
            .route("/orgs/{org_id}/projects", get(org_projects))
            .with_state(self)
    }

    /// One project: from the cache, or from Postgres (filling the cache).
    pub async fn project(&self, id: i64) -> Result<Option<Project>, AppError> {
        let key = format!("{}project:{id}", self.settings.prefix);
        let sql = format!("SELECT id, name, org_id, version FROM {} WHERE id = $1", self.settings.table);
        self.cached(&key, || async {
            let row: Option<(i64, String, i64, i64)> =
                sqlx::query_as(sqlx::AssertSqlSafe(sql)).bind(id).fetch_optional(&self.pg).await?;
            Ok(row.map(|(id, name, org_id, version)| Project { id, name, org_id, version }))
        })
        .await
    }

    /// The ids of an org's projects: from the cache, or from Postgres (filling it).
    pub async fn org_projects(&self, org_id: i64) -> Result<Vec<i64>, AppError> {
        let key = format!("{}org:{org_id}:projects", self.settings.prefix);
        let sql = format!("SELECT id FROM {} WHERE org_id = $1 ORDER BY id", self.settings.table);
        let ids: Option<Vec<i64>> = self
            .cached(&key, || async {
                let ids: Vec<i64> =
                    sqlx::query_scalar(sqlx::AssertSqlSafe(sql)).bind(org_id).fetch_all(&self.pg).await?;
                Ok(Some(ids))
            })
            .await?;
        Ok(ids.unwrap_or_default())
    }

    /// Cache-aside through the guard: the cached JSON under `key`, or what `load`
    /// reads, which then fills the cache unless an invalidation came in meanwhile.
    ///
    /// Before (with a TTL, and stale for up to that long):
    /// `GET key` → miss → `SELECT …` → `SET key value EX 60`.
    /// After: `GET key` → miss → ticket (`TIME`) → `SELECT …` → guarded fill; no TTL.
    async fn cached<T, F, Fut>(&self, key: &str, load: F) -> Result<Option<T>, AppError>
    where
        T: Serialize + for<'de> Deserialize<'de>,
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<Option<T>, sqlx::Error>>,
    {
        let mut redis = self.redis.clone();
        let hit: Option<String> = redis.get(key).await?;
        if let Some(json) = hit {
            self.stats.hits.fetch_add(1, Ordering::Relaxed);
            return Ok(Some(serde_json::from_str(&json)?));
        }
        self.stats.misses.fetch_add(1, Ordering::Relaxed);
        let ticket = guard::ticket(&mut redis).await?; // before the database read
        let Some(value) = load().await? else { return Ok(None) };
        if !self.settings.fill_delay.is_zero() {
            let delay = rand::Rng::random_range(&mut rand::rng(), Duration::ZERO..=self.settings.fill_delay);
            tokio::time::sleep(delay).await;
        }
        let json = serde_json::to_string(&value)?;
        let options = FillOptions {
            window_ms: self.settings.window_ms,
            prefix: &self.settings.prefix,
            ..FillOptions::default()
        };
        if !guard::fill(&mut redis, &self.fill, key, ticket, FillValue::String(&json), options).await? {
            self.stats.refused_fills.fetch_add(1, Ordering::Relaxed);
        }
        Ok(Some(value))
    }
}

async fn project(State(app): State<Arc<App>>, Path(id): Path<i64>) -> Result<Response, AppError> {
    Ok(match app.project(id).await? {
        Some(p) => Json(p).into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
    })
}

async fn org_projects(
    State(app): State<Arc<App>>,
    Path(org_id): Path<i64>,
) -> Result<Json<Vec<i64>>, AppError> {
    Ok(Json(app.org_projects(org_id).await?))
}
