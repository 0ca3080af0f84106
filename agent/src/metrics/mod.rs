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

pub use collector::{SnapshotCollector, families, registry};
use listener::{Limited, Limits};
pub use names::RELAY_METRICS;
pub use snapshot::{AttachmentState, RelaySnapshot, Snapshot};

/// Takes a snapshot of the agent at scrape time.
pub type SnapshotFn = Arc<dyn Fn() -> Snapshot + Send + Sync>;

#[derive(Clone)]
struct AppState {
    registry: Registry,
    source: SnapshotFn,
}

/// Serves /metrics, /healthz and /readyz until the listener fails.
///
/// GET and HEAD only (405 otherwise), 404 for other paths, HTTP/1.1
/// keep-alive (Prometheus reuses its connection), and the connection limits
/// of [`Limits`].
pub async fn serve(listener: TcpListener, source: SnapshotFn) -> std::io::Result<()> {
    serve_with(listener, source, Limits::default()).await
}

async fn serve_with(
    listener: TcpListener,
    source: SnapshotFn,
    limits: Limits,
) -> std::io::Result<()> {
    let registry = registry(source.clone()).map_err(std::io::Error::other)?;
    axum::serve(Limited::new(listener, limits), router(registry, source)).await
}

fn router(registry: Registry, source: SnapshotFn) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .fallback(|| async { (StatusCode::NOT_FOUND, "not found\n") })
        .with_state(AppState { registry, source })
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

async fn readyz(State(state): State<AppState>) -> Response {
    let ready = tokio::task::spawn_blocking(move || (state.source)().ready)
        .await
        .unwrap_or(false);
    if ready {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n").into_response()
    }
}
