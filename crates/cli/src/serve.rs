//! `/metrics`, `/healthz`, `/readyz` and `/status` on the `metrics.listen` address.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use shapesync_core::PipelineStatus;
use tokio_util::sync::CancellationToken;

type Statuses = Arc<Vec<(String, Arc<PipelineStatus>)>>;

/// Binds `metrics.listen` — first thing at start-up, so a port in use is reported before
/// any sink connects.
pub async fn bind(listen: SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on metrics.listen {listen}; choose a free port"))
}

/// Installs the Prometheus recorder and serves the endpoints on `listener` until shutdown.
pub async fn start(
    listener: tokio::net::TcpListener,
    ready_grace: Duration,
    statuses: Vec<(String, Arc<PipelineStatus>)>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    use shapesync_core::telemetry;
    let recorder = PrometheusBuilder::new()
        .set_buckets(telemetry::SECONDS_BUCKETS)
        .context("metrics buckets")?
        .set_buckets_for_metric(
            Matcher::Full("shapesync_sink_batch_changes".into()),
            telemetry::COUNT_BUCKETS,
        )
        .context("metrics buckets")?
        .build_recorder();
    let handle = recorder.handle();
    if metrics::set_global_recorder(recorder).is_err() {
        tracing::warn!("a metrics recorder is already installed in this process; /metrics will be empty");
    }
    telemetry::describe(env!("CARGO_PKG_VERSION"));
    let listen = listener.local_addr().context("metrics listener address")?;
    let statuses: Statuses = Arc::new(statuses);
    let app = Router::new()
        .route("/metrics", get(move || std::future::ready(render(&handle))))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .route("/status", get(status))
        .with_state((statuses, ready_grace));
    tracing::info!(%listen, "serving /metrics, /healthz, /readyz and /status");
    tokio::spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
    });
    Ok(())
}

fn render(handle: &PrometheusHandle) -> String {
    handle.run_upkeep();
    handle.render()
}

/// 200 when every pipeline this instance owns is at its shape's head and no fault (a
/// silent source, a failing sink) has lasted longer than `metrics.ready_grace_ms`; a
/// pipeline another instance runs (standby) does not hold it back. The body says each
/// pipeline's state, for how long a fault has lasted, and the last error.
async fn ready(
    State((statuses, grace)): State<(Statuses, Duration)>,
) -> (StatusCode, Json<serde_json::Value>) {
    let mut all_ready = true;
    let pipelines: serde_json::Map<String, serde_json::Value> = statuses
        .iter()
        .map(|(id, s)| {
            let view = pipeline_view(id, s, grace);
            all_ready &= view["ready"] == true;
            (id.clone(), view)
        })
        .collect();
    let code = if all_ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (code, Json(serde_json::json!({ "ready": all_ready, "pipelines": pipelines })))
}

/// Every pipeline of this instance, always 200 (what `shapesync status` prints).
async fn status(State((statuses, grace)): State<(Statuses, Duration)>) -> Json<serde_json::Value> {
    let pipelines: Vec<serde_json::Value> =
        statuses.iter().map(|(id, s)| pipeline_view(id, s, grace)).collect();
    Json(serde_json::json!({ "version": env!("CARGO_PKG_VERSION"), "pipelines": pipelines }))
}

/// One pipeline as `/readyz` and `/status` show it: its state and readiness, for how long
/// a fault has lasted and the last error, whether this instance owns it (else who
/// does), changes committed since start, seconds since the last commit, and its lag (0
/// while at the shape's head, else seconds since it last was).
fn pipeline_view(id: &str, s: &PipelineStatus, grace: Duration) -> serde_json::Value {
    let secs = |d: Option<Duration>| d.map(|d| (d.as_secs_f64() * 10.0).round() / 10.0);
    let health = s.health(grace);
    let owned = s.is_owned();
    serde_json::json!({
        "pipeline": id,
        "ready": health.state.is_ready(),
        "state": health.state.as_str(),
        "for_secs": health.for_secs,
        "last_error": health.last_error,
        "owned": owned,
        "lease_holder": if owned { None } else { s.holder() },
        "changes_committed": s.changes_committed(),
        "last_commit_secs_ago": secs(s.since_last_commit()),
        "lag_secs": secs(s.lag()),
    })
}
