//! What operators poke at, on kube-proxy's ports: Prometheus metrics and `/proxyMode` on
//! `--metrics-addr` (default 127.0.0.1:10249), `/healthz` and `/livez` on `--healthz-addr`
//! (default 0.0.0.0:10256). Nothing here knows map internals: the agent records what it did
//! in [`AgentState`] and the handlers read it.
pub mod health;
pub mod metrics;
pub mod service_health;

use std::{net::SocketAddr, sync::Arc};

use anyhow::Context as _;

pub use health::Health;
pub use metrics::Metrics;

/// What the agent shares with the HTTP handlers.
pub struct AgentState {
    pub metrics: Metrics,
    pub health: std::sync::Mutex<Health>,
    /// Reads the per-service counters when `/metrics` is scraped (nothing is read between
    /// scrapes): labels, forwarded, refused.
    pub counters: std::sync::Mutex<Option<CounterReader>>,
}

/// See [`AgentState::counters`].
pub type CounterReader = Box<dyn Fn() -> Vec<(metrics::ServiceLabels, u64, u64)> + Send>;

impl AgentState {
    pub fn new(source: String) -> Arc<Self> {
        Arc::new(Self {
            metrics: Metrics::new(),
            health: std::sync::Mutex::new(Health::new(source)),
            counters: std::sync::Mutex::new(None),
        })
    }
}

/// Binds both listeners (so a taken port fails the start, naming it) and serves them in the
/// background.
pub async fn serve(
    state: Arc<AgentState>,
    metrics_addr: SocketAddr,
    healthz_addr: SocketAddr,
) -> anyhow::Result<()> {
    let metrics_listener = tokio::net::TcpListener::bind(metrics_addr)
        .await
        .with_context(|| format!("binding --metrics-addr {metrics_addr}"))?;
    let healthz_listener = tokio::net::TcpListener::bind(healthz_addr)
        .await
        .with_context(|| format!("binding --healthz-addr {healthz_addr}"))?;
    tracing::info!(
        metrics_addr = %metrics_listener.local_addr()?,
        healthz_addr = %healthz_listener.local_addr()?,
        "serving metrics and health"
    );
    let metrics_app = metrics::router(state.clone());
    let health_app = health::router(state);
    tokio::spawn(async move {
        if let Err(error) = axum::serve(metrics_listener, metrics_app).await {
            tracing::error!(%error, "metrics server stopped");
        }
    });
    tokio::spawn(async move {
        if let Err(error) = axum::serve(healthz_listener, health_app).await {
            tracing::error!(%error, "health server stopped");
        }
    });
    Ok(())
}
