//! `healthCheckNodePort`s of `externalTrafficPolicy: Local` services, answered as kube-proxy
//! answers them (pkg/proxy/healthcheck/service_health.go, `hcHandler`), on any path: 200 when
//! the service has ready endpoints on this node and the proxy is healthy, else 503, with the
//! body
//! `{"service":{"namespace":"..","name":".."},"localEndpoints":N,"serviceProxyHealthy":B}`.
//! `serviceProxyHealthy` is the proxy's own health ([`super::Health::proxy_healthy`],
//! kube-proxy's `IsHealthy`, later `Health().Healthy`): no change waited longer than the
//! health timeout. Node eligibility (the autoscaler's taint, a deletion timestamp) does not
//! enter it: kube-proxy leaves that to `/healthz`, which cloud load balancers of `Cluster`
//! services probe. Nor does a stale source.
//! External load balancers probe it to send traffic only to nodes with local endpoints. A
//! port stops answering (its listener closes) as soon as its service no longer asks for it,
//! e.g. when the policy goes back to `Cluster`.
use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr},
    sync::{Arc, Mutex},
    time::SystemTime,
};

use anyhow::Context as _;
use axum::{Json, Router, extract::State, http::StatusCode, response::IntoResponse};
use serde::Serialize;

use super::AgentState;
use crate::model::HealthCheck;

/// The running health-check servers, by port.
pub struct ServiceHealthServers {
    servers: BTreeMap<u16, Server>,
    /// Where the proxy's health is read on each request.
    state: Arc<AgentState>,
}

#[derive(Debug)]
struct Server {
    check: Arc<Mutex<HealthCheck>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl ServiceHealthServers {
    pub fn new(state: Arc<AgentState>) -> Self {
        Self {
            servers: BTreeMap::new(),
            state,
        }
    }

    /// Serves exactly the ports of `wanted`; must be called within the tokio runtime. A port
    /// that cannot be bound is reported and tried again on the next call.
    pub fn update(&mut self, wanted: &BTreeMap<u16, HealthCheck>) {
        self.servers.retain(|port, _| wanted.contains_key(port));
        for (port, check) in wanted {
            if let Some(server) = self.servers.get(port) {
                *server.check.lock().expect("health-check lock") = check.clone();
                continue;
            }
            match serve(*port, check.clone(), self.state.clone()) {
                Ok(server) => {
                    tracing::info!(
                        port,
                        service = %format!("{}/{}", check.namespace, check.name),
                        "serving a health-check node port"
                    );
                    self.servers.insert(*port, server);
                }
                Err(error) => {
                    tracing::warn!(port, error = %format!("{error:#}"), "cannot serve a health-check node port")
                }
            }
        }
    }

    pub fn ports(&self) -> Vec<u16> {
        self.servers.keys().copied().collect()
    }
}

fn serve(port: u16, check: HealthCheck, state: Arc<AgentState>) -> anyhow::Result<Server> {
    let addr = SocketAddr::from((Ipv4Addr::UNSPECIFIED, port));
    let listener = std::net::TcpListener::bind(addr).with_context(|| format!("binding {addr}"))?;
    listener.set_nonblocking(true)?;
    let listener = tokio::net::TcpListener::from_std(listener)?;
    let check = Arc::new(Mutex::new(check));
    let app = router(check.clone(), state);
    let task = tokio::spawn(async move {
        if let Err(error) = axum::serve(listener, app).await {
            tracing::warn!(port, %error, "health-check node port server stopped");
        }
    });
    Ok(Server { check, task })
}

/// Answers every path for `check`.
fn router(check: Arc<Mutex<HealthCheck>>, state: Arc<AgentState>) -> Router {
    Router::new().fallback(answer).with_state((check, state))
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Body {
    service: ServiceRef,
    local_endpoints: usize,
    service_proxy_healthy: bool,
}

#[derive(Serialize)]
struct ServiceRef {
    namespace: String,
    name: String,
}

async fn answer(
    State((check, state)): State<(Arc<Mutex<HealthCheck>>, Arc<AgentState>)>,
) -> impl IntoResponse {
    let check = check.lock().expect("health-check lock").clone();
    let proxy_healthy = state
        .health
        .lock()
        .expect("health lock")
        .proxy_healthy(SystemTime::now());
    let status = if check.local_endpoints > 0 && proxy_healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        [("X-Content-Type-Options", "nosniff")],
        Json(Body {
            service: ServiceRef {
                namespace: check.namespace,
                name: check.name,
            },
            local_endpoints: check.local_endpoints,
            service_proxy_healthy: proxy_healthy,
        }),
    )
}

#[cfg(test)]
mod tests {
    use std::{net::SocketAddr, time::Duration};

    use k8s_openapi::api::core::v1::{Node, NodeSpec, Taint};

    use super::*;
    use crate::model::TO_BE_DELETED_TAINT;

    async fn get(addr: SocketAddr) -> (u16, serde_json::Value) {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        stream
            .write_all(format!("GET /anything HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).await.unwrap();
        let status = answer.split_whitespace().nth(1).unwrap().parse().unwrap();
        let (_, body) = answer.split_once("\r\n\r\n").unwrap();
        (status, serde_json::from_str(body).unwrap())
    }

    /// The handler on a loopback port, for `local_endpoints` endpoints.
    async fn serving(local_endpoints: usize) -> (SocketAddr, Arc<AgentState>) {
        let state = AgentState::new("test".into());
        state.health.lock().unwrap().synced(SystemTime::now());
        let check = Arc::new(Mutex::new(HealthCheck {
            namespace: "default".into(),
            name: "web".into(),
            local_endpoints,
        }));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = router(check, state.clone());
        tokio::spawn(async move { axum::serve(listener, app).await });
        (addr, state)
    }

    #[tokio::test]
    async fn ok_with_local_endpoints_and_a_healthy_proxy() {
        let (addr, _state) = serving(2).await;
        let (status, body) = get(addr).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(
            body,
            serde_json::json!({
                "service": {"namespace": "default", "name": "web"},
                "localEndpoints": 2,
                "serviceProxyHealthy": true,
            })
        );
    }

    #[tokio::test]
    async fn unavailable_without_local_endpoints() {
        let (addr, _state) = serving(0).await;
        let (status, body) = get(addr).await;
        assert_eq!(status, 503, "{body}");
        assert_eq!(body["serviceProxyHealthy"], true);
    }

    #[tokio::test]
    async fn unavailable_and_unhealthy_when_a_change_waited_too_long() {
        let (addr, state) = serving(2).await;
        let long_ago = SystemTime::now() - super::super::health::HEALTHZ_TIMEOUT;
        state
            .health
            .lock()
            .unwrap()
            .change_arrived(long_ago - Duration::from_secs(1));
        let (status, body) = get(addr).await;
        assert_eq!(status, 503, "{body}");
        assert_eq!(body["serviceProxyHealthy"], false);
        assert_eq!(body["localEndpoints"], 2);

        state.health.lock().unwrap().synced(SystemTime::now());
        assert_eq!(get(addr).await.0, 200, "synced again");
    }

    /// Neither a stale source nor an ineligible node enter the service's health.
    #[tokio::test]
    async fn staleness_and_node_eligibility_do_not_count() {
        let (addr, state) = serving(1).await;
        {
            let mut health = state.health.lock().unwrap();
            health.stale = true;
            let node = Node {
                spec: Some(NodeSpec {
                    taints: Some(vec![Taint {
                        key: TO_BE_DELETED_TAINT.into(),
                        effect: "NoSchedule".into(),
                        ..Default::default()
                    }]),
                    ..Default::default()
                }),
                ..Default::default()
            };
            health.follow_node(Some(&node));
            assert!(!health.node_eligible());
        }
        let (status, body) = get(addr).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["serviceProxyHealthy"], true);
    }
}
