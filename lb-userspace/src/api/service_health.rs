//! `healthCheckNodePort`s of `externalTrafficPolicy: Local` services, answered as kube-proxy
//! answers them, on any path: 200 while the service has ready endpoints on this node, 503
//! when it has none, with the body
//! `{"service":{"namespace":"..","name":".."},"localEndpoints":N,"serviceProxyHealthy":true}`.
//! External load balancers probe it to send traffic only to nodes with local endpoints. A
//! port stops answering (its listener closes) as soon as its service no longer asks for it,
//! e.g. when the policy goes back to `Cluster`.
use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr},
    sync::{Arc, Mutex},
};

use anyhow::Context as _;
use axum::{Json, Router, extract::State, http::StatusCode, response::IntoResponse};
use serde::Serialize;

use crate::model::HealthCheck;

/// The running health-check servers, by port.
#[derive(Debug, Default)]
pub struct ServiceHealthServers {
    servers: BTreeMap<u16, Server>,
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
    /// Serves exactly the ports of `wanted`; must be called within the tokio runtime. A port
    /// that cannot be bound is reported and tried again on the next call.
    pub fn update(&mut self, wanted: &BTreeMap<u16, HealthCheck>) {
        self.servers.retain(|port, _| wanted.contains_key(port));
        for (port, check) in wanted {
            if let Some(server) = self.servers.get(port) {
                *server.check.lock().expect("health-check lock") = check.clone();
                continue;
            }
            match serve(*port, check.clone()) {
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

fn serve(port: u16, check: HealthCheck) -> anyhow::Result<Server> {
    let addr = SocketAddr::from((Ipv4Addr::UNSPECIFIED, port));
    let listener = std::net::TcpListener::bind(addr).with_context(|| format!("binding {addr}"))?;
    listener.set_nonblocking(true)?;
    let listener = tokio::net::TcpListener::from_std(listener)?;
    let check = Arc::new(Mutex::new(check));
    let app = Router::new().fallback(answer).with_state(check.clone());
    let task = tokio::spawn(async move {
        if let Err(error) = axum::serve(listener, app).await {
            tracing::warn!(port, %error, "health-check node port server stopped");
        }
    });
    Ok(Server { check, task })
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

async fn answer(State(check): State<Arc<Mutex<HealthCheck>>>) -> impl IntoResponse {
    let check = check.lock().expect("health-check lock").clone();
    let status = if check.local_endpoints > 0 {
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
            service_proxy_healthy: true,
        }),
    )
}
