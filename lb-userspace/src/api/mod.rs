//! What operators poke at, on kube-proxy's ports: Prometheus metrics and `/proxyMode` on
//! `--metrics-addr` (default 127.0.0.1:10249), `/healthz` and `/livez` on `--healthz-addr`
//! (default 0.0.0.0:10256). Nothing here knows map internals: the agent records what it did
//! in [`AgentState`] and the handlers read it.
pub mod health;
pub mod metrics;
pub mod service_health;

use std::{net::SocketAddr, sync::Arc};

use anyhow::Context as _;

use crate::model::{self, Objects, ProxyIdentity};

pub use health::Health;
pub use metrics::Metrics;

/// What the agent shares with the HTTP handlers.
pub struct AgentState {
    pub metrics: Metrics,
    pub health: std::sync::Mutex<Health>,
    /// Reads the per-service counters when `/metrics` is scraped (nothing is read between
    /// scrapes): labels, forwarded, refused.
    pub counters: std::sync::Mutex<Option<CounterReader>>,
    /// Reads why the north-south programs dropped or passed packets, when `/metrics` is
    /// scraped: labels, packets.
    pub reasons: std::sync::Mutex<Option<ReasonReader>>,
}

/// See [`AgentState::counters`].
pub type CounterReader = Box<dyn Fn() -> Vec<(metrics::ServiceLabels, u64, u64)> + Send>;
/// See [`AgentState::reasons`].
pub type ReasonReader = Box<dyn Fn() -> Vec<(metrics::DatapathLabels, u64)> + Send>;

impl AgentState {
    pub fn new(source: String) -> Arc<Self> {
        Arc::new(Self {
            metrics: Metrics::new(),
            health: std::sync::Mutex::new(Health::new(source)),
            counters: std::sync::Mutex::new(None),
            reasons: std::sync::Mutex::new(None),
        })
    }

    /// Takes this node's eligibility for `/healthz` from the objects a snapshot holds (see
    /// [`Health::follow_node`]); the agent calls it for each snapshot it syncs.
    pub fn follow_node_of(&self, objects: &Objects, identity: &ProxyIdentity) {
        self.health
            .lock()
            .expect("health lock")
            .follow_node(model::this_node(objects, identity));
    }
}

/// Where [`serve`] listens (`None`: that server is off).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Serving {
    pub metrics: Option<SocketAddr>,
    pub healthz: Option<SocketAddr>,
}

/// Binds the listeners asked for (so a taken port fails the start, naming it) and serves them
/// in the background. Each server stands on its own: `None` turns off only that one (the
/// DaemonSet's probes need `/healthz` whether or not metrics are served).
pub async fn serve(
    state: Arc<AgentState>,
    metrics_addr: Option<SocketAddr>,
    healthz_addr: Option<SocketAddr>,
) -> anyhow::Result<Serving> {
    let metrics_listener = match metrics_addr {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding --metrics-addr {addr}"))?,
        ),
        None => None,
    };
    let healthz_listener = match healthz_addr {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding --healthz-addr {addr}"))?,
        ),
        None => None,
    };
    let serving = Serving {
        metrics: metrics_listener
            .as_ref()
            .map(tokio::net::TcpListener::local_addr)
            .transpose()?,
        healthz: healthz_listener
            .as_ref()
            .map(tokio::net::TcpListener::local_addr)
            .transpose()?,
    };
    let shown = |addr: Option<SocketAddr>| addr.map_or_else(|| "off".to_owned(), |a| a.to_string());
    if serving.metrics.is_some() || serving.healthz.is_some() {
        tracing::info!(
            metrics_addr = %shown(serving.metrics),
            healthz_addr = %shown(serving.healthz),
            "serving metrics and health"
        );
    }
    if let Some(listener) = metrics_listener {
        let app = metrics::router(state.clone());
        tokio::spawn(async move {
            if let Err(error) = axum::serve(listener, app).await {
                tracing::error!(%error, "metrics server stopped");
            }
        });
    }
    if let Some(listener) = healthz_listener {
        let app = health::router(state);
        tokio::spawn(async move {
            if let Err(error) = axum::serve(listener, app).await {
                tracing::error!(%error, "health server stopped");
            }
        });
    }
    Ok(serving)
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn get(addr: SocketAddr, path: &str) -> std::io::Result<String> {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        stream
            .write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
            .await?;
        let mut answer = String::new();
        stream.read_to_string(&mut answer).await?;
        Ok(answer)
    }

    fn loopback() -> Option<SocketAddr> {
        Some("127.0.0.1:0".parse().unwrap())
    }

    #[tokio::test]
    async fn health_is_served_with_metrics_off() {
        let state = AgentState::new("test".into());
        state.health.lock().unwrap().last_updated = Some(std::time::SystemTime::now());

        let serving = serve(state, None, loopback()).await.unwrap();

        assert_eq!(serving.metrics, None);
        let answer = get(serving.healthz.unwrap(), "/healthz").await.unwrap();
        assert!(answer.starts_with("HTTP/1.0 200"), "{answer}");
    }

    #[tokio::test]
    async fn metrics_are_served_with_health_off() {
        let serving = serve(AgentState::new("test".into()), loopback(), None)
            .await
            .unwrap();

        assert_eq!(serving.healthz, None);
        let answer = get(serving.metrics.unwrap(), "/proxyMode").await.unwrap();
        assert!(answer.starts_with("HTTP/1.0 200"), "{answer}");
        assert!(answer.ends_with("ebpf"), "{answer}");
    }

    #[tokio::test]
    async fn both_off_serves_nothing() {
        let serving = serve(AgentState::new("test".into()), None, None)
            .await
            .unwrap();
        assert_eq!(
            serving,
            Serving {
                metrics: None,
                healthz: None
            }
        );
    }
}
