//! Prometheus metrics, /healthz and /readyz over HTTP.
//!
//! [`names`] lists every metric (the one place to add one), [`collector`]
//! turns a [`Snapshot`] into them at scrape time, and this file serves
//! them. Client addresses never become label values: they go to the logs.

mod collector;
mod listener;
pub mod names;
mod snapshot;
#[cfg(test)]
mod tests;

use std::sync::Arc;

use axum::{
    Router,
    extract::State,
    http::{StatusCode, header},
    response::{IntoResponse as _, Response},
    routing::get,
};
use prometheus::{Encoder as _, Registry, TextEncoder};
use tokio::net::TcpListener;

use crate::heartbeat::Heartbeat;

pub use collector::{SnapshotCollector, families, registry};
use listener::{Limited, Limits};
pub use names::RELAY_METRICS;
pub use snapshot::{AttachmentState, DnsNameSnapshot, RelaySnapshot, Snapshot};

/// Takes a snapshot of the agent at scrape time.
pub type SnapshotFn = Arc<dyn Fn() -> Snapshot + Send + Sync>;

#[derive(Clone)]
struct AppState {
    registry: Registry,
    source: SnapshotFn,
    heartbeat: Heartbeat,
}

/// Serves /metrics, /healthz and /readyz until the listener fails.
///
/// GET and HEAD only (405 otherwise), 404 for other paths, HTTP/1.1
/// keep-alive (Prometheus reuses its connection), and the connection limits
/// of [`Limits`].
pub async fn serve(
    listener: TcpListener,
    source: SnapshotFn,
    heartbeat: Heartbeat,
) -> std::io::Result<()> {
    serve_with(listener, source, heartbeat, Limits::default()).await
}

async fn serve_with(
    listener: TcpListener,
    source: SnapshotFn,
    heartbeat: Heartbeat,
    limits: Limits,
) -> std::io::Result<()> {
    let registry = registry(source.clone()).map_err(std::io::Error::other)?;
    axum::serve(
        Limited::new(listener, limits),
        router(registry, source, heartbeat),
    )
    .await
}

fn router(registry: Registry, source: SnapshotFn, heartbeat: Heartbeat) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .fallback(|| async { (StatusCode::NOT_FOUND, "not found\n") })
        .with_state(AppState {
            registry,
            source,
            heartbeat,
        })
}

/// Liveness: the main loop's heartbeat, read without the agent's lock.
async fn healthz(State(state): State<AppState>) -> Response {
    let age = state.heartbeat.age();
    if state.heartbeat.stalled() {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "stalled: the main loop has not run for {} s\n",
                age.as_secs()
            ),
        )
            .into_response()
    } else {
        (StatusCode::OK, "ok\n").into_response()
    }
}

/// The snapshot takes the agent's lock and reads the kernel's maps: off the
/// async workers, so a slow scrape never stalls the runtime.
async fn metrics(State(state): State<AppState>) -> Response {
    let encoded = tokio::task::spawn_blocking(move || {
        let mut body = Vec::new();
        TextEncoder::new()
            .encode(&state.registry.gather(), &mut body)
            .map(|()| body)
    })
    .await;
    match encoded {
        Ok(Ok(body)) => ([(header::CONTENT_TYPE, prometheus::TEXT_FORMAT)], body).into_response(),
        Ok(Err(e)) => {
            tracing::error!(error = %e, "encoding metrics");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                "encoding metrics failed\n",
            )
                .into_response()
        }
        Err(e) => {
            tracing::error!(error = %e, "taking the metrics snapshot");
            (StatusCode::INTERNAL_SERVER_ERROR, "snapshot failed\n").into_response()
        }
    }
}

/// Readiness: every configured attach point enforces, as the kernel last
/// reported it (see `Agent::check_attachments`).
async fn readyz(State(state): State<AppState>) -> Response {
    let snapshot = tokio::task::spawn_blocking(move || (state.source)()).await;
    match snapshot {
        Ok(s) if s.ready => (StatusCode::OK, "ready\n").into_response(),
        Ok(s) => {
            let down: Vec<String> = s
                .attachments
                .iter()
                .filter(|a| !a.attached)
                .map(|a| format!("{} {} ({}) is down", a.hook, a.target, a.program))
                .collect();
            let why = if down.is_empty() {
                "not enforcing".to_owned()
            } else {
                down.join("; ")
            };
            (
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: {why}\n"),
            )
                .into_response()
        }
        Err(_) => (StatusCode::SERVICE_UNAVAILABLE, "not ready\n").into_response(),
    }
}
