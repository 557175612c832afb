//! `cache-aside`: the example service. Settings from the environment: `DATABASE_URL`
//! (default `postgres://postgres@127.0.0.1:5432/test`), `REDIS_URL` (default
//! `redis://127.0.0.1:6379`), `LISTEN` (default `127.0.0.1:8080`), `TABLE` (default
//! `projects`). Run shapesync beside it with `pipeline.yaml` (or `pipeline-refresh.yaml`).

use anyhow::Context;
use shapesync_example_cache_aside::{App, Settings};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let env = |name: &str, default: &str| std::env::var(name).unwrap_or_else(|_| default.to_owned());
    let database = env("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/test");
    let redis_url = env("REDIS_URL", "redis://127.0.0.1:6379");
    let listen = env("LISTEN", "127.0.0.1:8080");
    let pg = sqlx::PgPool::connect(&database).await.context("cannot reach Postgres at DATABASE_URL")?;
    let client = redis::Client::open(redis_url).context("REDIS_URL is not a Redis URL")?;
    let redis =
        redis::aio::ConnectionManager::new(client).await.context("cannot reach Redis at REDIS_URL")?;
    let app = App::new(pg, redis, Settings::new(env("TABLE", "projects")));
    let listener =
        tokio::net::TcpListener::bind(&listen).await.with_context(|| format!("cannot listen on {listen}"))?;
    eprintln!("cache-aside: serving GET /projects/{{id}} and /orgs/{{org_id}}/projects on http://{listen}");
    axum::serve(listener, app.router()).await.context("the HTTP server stopped")
}
