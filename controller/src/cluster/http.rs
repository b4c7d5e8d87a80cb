//! The controller's HTTP endpoints: `/metrics` (OpenMetrics), `/healthz` (the process is
//! alive) and `/readyz` (start-up checks passed; a standby is ready too, and the body says
//! which role this replica has). The agent's `http.rs` has the same shape around libvirt's
//! readiness.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::registry::Registry;

use super::error::Error;

/// What the readiness probe reports.
#[derive(Debug, Default)]
pub struct Health {
    /// Set once the start-up checks passed and the election runs.
    pub started: AtomicBool,
    /// Set while this replica leads.
    pub leading: AtomicBool,
}

#[derive(Clone)]
struct AppState {
    registry: Arc<Registry>,
    health: Arc<Health>,
}

/// The router, separate from the listener so tests can call it directly.
pub fn router(registry: Arc<Registry>, health: Arc<Health>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(AppState { registry, health })
}

async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    let mut body = String::new();
    let encoded = prometheus_client::encoding::text::encode(&mut body, &state.registry);
    crate::http_server::metrics_response(encoded.map(|()| body))
}

async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    let started = state.health.started.load(Ordering::SeqCst);
    let role = if state.health.leading.load(Ordering::SeqCst) {
        "leader"
    } else {
        "standby"
    };
    let body = format!("started: {started}\nrole: {role}\n");
    if started {
        (StatusCode::OK, body)
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, body)
    }
}

/// Binds `addr` and serves until `shutdown` resolves. Returns the bound address and the
/// server task.
pub async fn serve(
    addr: SocketAddr,
    app: Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(SocketAddr, tokio::task::JoinHandle<()>), Error> {
    crate::http_server::serve(addr, app, shutdown)
        .await
        .map_err(|source| Error::MetricsServer { addr, source })
}
