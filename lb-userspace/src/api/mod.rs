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

/// Binds the listeners asked for (so a taken port fails the start, naming it) and serves
/// them in the background. Either may be off on its own.
pub async fn serve(
    state: Arc<AgentState>,
    metrics_addr: Option<SocketAddr>,
    healthz_addr: Option<SocketAddr>,
) -> anyhow::Result<()> {
    if let Some(addr) = metrics_addr {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding --metrics-addr {addr}"))?;
        tracing::info!(metrics_addr = %listener.local_addr()?, "serving metrics");
        spawn_server(listener, metrics::router(state.clone()), "metrics");
    }
    if let Some(addr) = healthz_addr {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding --healthz-addr {addr}"))?;
        tracing::info!(healthz_addr = %listener.local_addr()?, "serving health");
        spawn_server(listener, health::router(state), "health");
    }
    Ok(())
}

fn spawn_server(listener: tokio::net::TcpListener, app: axum::Router, what: &'static str) {
    tokio::spawn(async move {
        if let Err(error) = axum::serve(listener, app).await {
            tracing::error!(%error, "{what} server stopped");
        }
    });
}
