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
//! e.g. when the policy goes back to `Cluster`. A port answers on both families (load
//! balancers of either family probe it, as kube-proxy serves it on each family's node
//! addresses).
use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
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
    /// One task per listener (one dual-stack one, or one per family).
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
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

/// Listeners on `port` of both families: `[::]` first (on Linux a dual-stack socket, unless
/// `net.ipv6.bindv6only` is set), then `0.0.0.0` where the first does not already take IPv4
/// (bindv6only, or no IPv6 at all on the node). Fails only when neither can be bound.
fn listeners(port: u16) -> anyhow::Result<Vec<std::net::TcpListener>> {
    let v6 = SocketAddr::from((Ipv6Addr::UNSPECIFIED, port));
    let v4 = SocketAddr::from((Ipv4Addr::UNSPECIFIED, port));
    let mut bound = Vec::new();
    let v6_error = match std::net::TcpListener::bind(v6) {
        Ok(listener) => {
            bound.push(listener);
            None
        }
        Err(error) => Some(error),
    };
    match std::net::TcpListener::bind(v4) {
        Ok(listener) => bound.push(listener),
        // The dual-stack listener already has IPv4.
        Err(error) if error.kind() == std::io::ErrorKind::AddrInUse && v6_error.is_none() => {}
        Err(error) => {
            if bound.is_empty() {
                return Err(error).with_context(|| {
                    format!(
                        "binding {v4} (and {v6}: {})",
                        v6_error.map_or_else(String::new, |e| e.to_string())
                    )
                });
            }
            tracing::warn!(%v4, %error, "health-check node port served on IPv6 only");
        }
    }
    Ok(bound)
}

fn serve(port: u16, check: HealthCheck, state: Arc<AgentState>) -> anyhow::Result<Server> {
    let check = Arc::new(Mutex::new(check));
    let app = router(check.clone(), state);
    let mut tasks = Vec::new();
    for listener in listeners(port)? {
        listener.set_nonblocking(true)?;
        let listener = tokio::net::TcpListener::from_std(listener)?;
        let app = app.clone();
        tasks.push(tokio::spawn(async move {
            if let Err(error) = axum::serve(listener, app).await {
                tracing::warn!(port, %error, "health-check node port server stopped");
            }
        }));
    }
    Ok(Server { check, tasks })
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
    use crate::model::{NodeInfo, TO_BE_DELETED_TAINT};

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

    /// A port `serve` binds answers at 127.0.0.1 and at ::1 (this test needs IPv6 on lo).
    #[tokio::test]
    async fn a_health_check_port_answers_on_both_families() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let state = AgentState::new("test".into());
        state.health.lock().unwrap().synced(SystemTime::now());
        let check = HealthCheck {
            namespace: "default".into(),
            name: "web".into(),
            local_endpoints: 1,
        };
        let _server = serve(port, check, state).expect("serving");
        for addr in [
            SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
            SocketAddr::from((Ipv6Addr::LOCALHOST, port)),
        ] {
            let (status, body) = get(addr).await;
            assert_eq!(status, 200, "{addr}: {body}");
            assert_eq!(body["localEndpoints"], 1, "{addr}");
        }
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
            health.follow_node(Some(&NodeInfo::from(node)));
            assert!(!health.node_eligible());
        }
        let (status, body) = get(addr).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["serviceProxyHealthy"], true);
    }
}
