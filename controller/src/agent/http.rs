//! The agent's HTTP endpoints: `/metrics` (OpenMetrics: the agent's own metrics and its
//! guests' statistics), `/healthz` (the process is alive) and `/readyz` (the Kubernetes API
//! and libvirt answer, the controllers run; the body says why not).

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::encoding::text;
use prometheus_client::registry::Registry;
use virtkube_engine::Engine;

use super::error::Error;
use super::guest_metrics::{self, GuestMetricsConfig};

pub use super::readiness::Health;

#[derive(Clone)]
struct AppState {
    registry: Arc<Registry>,
    health: Arc<Health>,
    engine: Option<Engine>,
    guests: GuestMetricsConfig,
}

/// The router, separate from the listener so tests can call it directly; per-guest metrics
/// with their defaults (see [`router_with_guest_metrics`]).
pub fn router(registry: Arc<Registry>, health: Arc<Health>, engine: Option<Engine>) -> Router {
    router_with_guest_metrics(registry, health, engine, GuestMetricsConfig::default())
}

/// The router; `/metrics` also gathers the guests' statistics (one libvirt call per scrape,
/// see [`super::guest_metrics`]) when there is an engine and `guests.max_domains > 0`.
pub fn router_with_guest_metrics(
    registry: Arc<Registry>,
    health: Arc<Health>,
    engine: Option<Engine>,
    guests: GuestMetricsConfig,
) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(AppState {
            registry,
            health,
            engine,
            guests,
        })
}

async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    let guests = match &state.engine {
        Some(engine) if state.guests.max_domains > 0 => Some(guest_metrics::registry(
            guest_metrics::scrape(engine, state.guests).await,
        )),
        _ => None,
    };
    let mut body = String::new();
    let encoded = text::encode_registry(&mut body, &state.registry)
        .and_then(|()| match &guests {
            Some(g) => text::encode_registry(&mut body, g),
            None => Ok(()),
        })
        .and_then(|()| text::encode_eof(&mut body));
    crate::http_server::metrics_response(encoded.map(|()| body))
}

async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    // A cheap probe: the engine's own view (close callback, keepalive), no libvirt call;
    // the API's state is the API health monitor's last verdict, no API call either.
    let libvirt = state.engine.as_ref().is_some_and(Engine::is_connected);
    let readiness = state.health.readiness(libvirt);
    let code = if readiness.ready() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, readiness.body())
}

/// Binds `addr` and serves until `shutdown` resolves. Returns the bound address (useful with
/// port 0) and the server task.
pub async fn serve(
    addr: SocketAddr,
    app: Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(SocketAddr, tokio::task::JoinHandle<()>), Error> {
    crate::http_server::serve(addr, app, shutdown)
        .await
        .map_err(|source| Error::MetricsServer { addr, source })
}
