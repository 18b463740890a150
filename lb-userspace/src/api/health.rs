//! `/healthz` and `/livez`, answered by kube-proxy's rules (pkg/proxy/healthcheck,
//! `proxy_health.go`, formerly `proxier_health.go`, 1.28 and later):
//!
//! * The proxy is healthy while no change has waited longer than [`HEALTHZ_TIMEOUT`] for its
//!   sync (kube-proxy's `QueuedUpdate`/`Updated` and `healthTimeout`). Whether the source can
//!   reach the API server does not enter it: kube-proxy keeps answering 200 through a
//!   control-plane outage (no change arrives, so none waits), and so does this agent. Were it
//!   otherwise, an API server outage would make every node fail its load balancers' probes at
//!   once while the data path keeps serving the last state (fail static). Staleness shows in
//!   the body's `stale` field (ours), in `lb_source_stale`, in `lb-agent status` and in the log.
//! * `/healthz` is 503 also when this node is not eligible for load-balancer traffic: its Node
//!   has a `deletionTimestamp` or carries the `ToBeDeletedByClusterAutoscaler` taint
//!   ([`crate::model::node_ineligible_because`]); the body says `nodeEligible`. As
//!   kube-proxy's `SyncNode` does from 1.28 on, the node is eligible until a Node object says
//!   otherwise, so before the first Node is seen (and with a manifest directory holding none)
//!   it is eligible; a Node that disappears leaves its last eligibility (kube-proxy syncs the
//!   deleted object's last state). (The newest kube-proxy reads the Node from its
//!   `NodeManager`, which waits for the Node before kube-proxy starts and exits it when the
//!   Node is deleted; its "no Node: ineligible" branch is never reached in practice.)
//! * `/livez` is the proxy's health alone: node eligibility does not enter it, so a node being
//!   drained is not restarted.
//! * The `healthCheckNodePort`s report the same proxy health as `serviceProxyHealthy`
//!   (kube-proxy's `IsHealthy`/`Health().Healthy`, without node eligibility); see
//!   [`super::service_health`].
//!
//! One difference kept on purpose: both answer 503 until the first sync wrote the maps
//! (kube-proxy answers 200 while starting up), so a readiness probe holds the pod back until
//! the data path serves the cluster's state.
//!
//! The body holds kube-proxy's `lastUpdated` and `currentTime` (and, on `/healthz`,
//! `nodeEligible`), plus `source` and `stale`.
use std::{
    sync::Arc,
    time::{Duration, SystemTime},
};

use axum::{Json, Router, extract::State, http::StatusCode, routing::get};
use serde::Serialize;
use tokio::sync::watch;

use super::AgentState;
use crate::model::{self, NodeInfo};

/// How long a change may wait for its sync before the agent calls itself unhealthy
/// (kube-proxy's `healthTimeout`: twice its `--iptables-sync-period`, 60 s by default).
pub const HEALTHZ_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, Clone)]
pub struct Health {
    /// Where objects come from, for `lb-agent status`.
    pub source: String,
    /// The end of the last sync that wrote the maps from a complete state.
    pub last_updated: Option<SystemTime>,
    /// A change that arrived and is not synced yet.
    pub pending_since: Option<SystemTime>,
    /// The source cannot be reached; the maps hold the last known state.
    pub stale: bool,
    /// Why this node should get no load-balancer traffic; `None`: it is eligible.
    pub node_ineligible: Option<&'static str>,
    /// How sockets of removed backends are terminated, for `lb-agent status`.
    pub socket_termination: String,
}

impl Health {
    pub fn new(source: String) -> Self {
        Self {
            source,
            last_updated: None,
            pending_since: None,
            stale: false,
            node_ineligible: None,
            socket_termination: String::new(),
        }
    }

    /// A change arrived that the next sync will write (kube-proxy's `QueuedUpdate`): the
    /// oldest unsynced change counts.
    pub fn change_arrived(&mut self, at: SystemTime) {
        self.pending_since.get_or_insert(at);
    }

    /// A sync wrote the maps from a complete state (kube-proxy's `Updated`).
    pub fn synced(&mut self, at: SystemTime) {
        self.last_updated = Some(at);
        self.pending_since = None;
    }

    /// Takes this node's eligibility from its Node object in the latest snapshot (kube-proxy's
    /// `SyncNode`); without one, the last eligibility stays. Logs each change.
    pub fn follow_node(&mut self, node: Option<&NodeInfo>) {
        let Some(node) = node else {
            return;
        };
        let now = model::node_ineligible_because(node);
        if now == self.node_ineligible {
            return;
        }
        match now {
            Some(reason) => tracing::warn!(
                reason,
                "this node is not eligible for load-balancer traffic: /healthz answers 503"
            ),
            None => tracing::info!("this node is eligible for load-balancer traffic again"),
        }
        self.node_ineligible = now;
    }

    pub fn node_eligible(&self) -> bool {
        self.node_ineligible.is_none()
    }

    /// The proxy's own health, without node eligibility: the maps were written once and no
    /// change has waited longer than [`HEALTHZ_TIMEOUT`]. Staleness of the source does not
    /// enter it. `/livez` and the health-check node ports' `serviceProxyHealthy`.
    pub fn proxy_healthy(&self, now: SystemTime) -> bool {
        let waited_too_long = self
            .pending_since
            .is_some_and(|since| now.duration_since(since).unwrap_or_default() >= HEALTHZ_TIMEOUT);
        self.last_updated.is_some() && !waited_too_long
    }

    /// `/healthz`: the proxy is healthy and the node eligible.
    pub fn ready(&self, now: SystemTime) -> bool {
        self.proxy_healthy(now) && self.node_eligible()
    }
}

/// The body of `/healthz` and `/livez` (kube-proxy's fields, plus ours).
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HealthzBody {
    pub last_updated: String,
    pub current_time: String,
    /// On `/healthz` only, as kube-proxy's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node_eligible: Option<bool>,
    pub source: String,
    pub stale: bool,
    /// Ours: how sockets of removed backends are terminated.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub socket_termination: String,
}

pub fn router(state: Arc<AgentState>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/livez", get(livez))
        .with_state(state)
}

/// Mirrors the source's staleness into the health body (`stale`) and `lb_source_stale`; it
/// does not change a status code.
pub async fn follow_staleness(mut stale: watch::Receiver<bool>, state: Arc<AgentState>) {
    loop {
        let now_stale = *stale.borrow_and_update();
        state.health.lock().expect("health lock").stale = now_stale;
        state.metrics.source_stale.set(i64::from(now_stale));
        if stale.changed().await.is_err() {
            return;
        }
    }
}

fn rfc3339(time: Option<SystemTime>) -> String {
    time.and_then(|t| jiff::Timestamp::try_from(t).ok())
        .map(|t| t.to_string())
        .unwrap_or_default()
}

/// What `/healthz` (`readiness`) or `/livez` answer for `health` at `now`.
pub fn answer(health: &Health, now: SystemTime, readiness: bool) -> (StatusCode, HealthzBody) {
    let healthy = if readiness {
        health.ready(now)
    } else {
        health.proxy_healthy(now)
    };
    let status = if healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = HealthzBody {
        last_updated: rfc3339(health.last_updated),
        current_time: rfc3339(Some(now)),
        node_eligible: readiness.then(|| health.node_eligible()),
        source: health.source.clone(),
        stale: health.stale,
        socket_termination: health.socket_termination.clone(),
    };
    (status, body)
}

fn respond(state: &AgentState, readiness: bool) -> (StatusCode, Json<HealthzBody>) {
    let health = state.health.lock().expect("health lock").clone();
    let (status, body) = answer(&health, SystemTime::now(), readiness);
    (status, Json(body))
}

/// Readiness: the proxy is healthy and the node eligible for load-balancer traffic.
async fn healthz(State(state): State<Arc<AgentState>>) -> (StatusCode, Json<HealthzBody>) {
    respond(&state, true)
}

/// Liveness: the proxy is healthy; neither an unreachable API server nor a node being
/// deleted is a reason to restart it.
async fn livez(State(state): State<Arc<AgentState>>) -> (StatusCode, Json<HealthzBody>) {
    respond(&state, false)
}

#[cfg(test)]
mod tests {
    use k8s_openapi::{
        api::core::v1::{Node, NodeSpec, Taint},
        apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time},
    };

    use super::*;

    const T0: Duration = Duration::from_secs(1_700_000_000);

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + T0 + Duration::from_secs(secs)
    }

    /// Synced once at t=0.
    fn synced() -> Health {
        let mut health = Health::new("test".into());
        health.synced(at(0));
        health
    }

    fn node(taints: &[&str], deleting: bool) -> NodeInfo {
        NodeInfo::from(Node {
            metadata: ObjectMeta {
                name: Some("node-a".into()),
                deletion_timestamp: deleting
                    .then(|| Time(jiff::Timestamp::try_from(at(0)).unwrap())),
                ..Default::default()
            },
            spec: Some(NodeSpec {
                taints: Some(
                    taints
                        .iter()
                        .map(|key| Taint {
                            key: (*key).into(),
                            effect: "NoSchedule".into(),
                            ..Default::default()
                        })
                        .collect(),
                ),
                ..Default::default()
            }),
            status: None,
        })
    }

    fn codes(health: &Health, now: SystemTime) -> (StatusCode, StatusCode) {
        (answer(health, now, true).0, answer(health, now, false).0)
    }

    const OK: StatusCode = StatusCode::OK;
    const UNAVAILABLE: StatusCode = StatusCode::SERVICE_UNAVAILABLE;

    #[test]
    fn unavailable_before_the_first_sync() {
        let health = Health::new("test".into());
        assert_eq!(codes(&health, at(0)), (UNAVAILABLE, UNAVAILABLE));
        assert!(!health.proxy_healthy(at(0)));
    }

    #[test]
    fn a_change_may_wait_up_to_the_timeout() {
        let mut health = synced();
        assert_eq!(codes(&health, at(1000)), (OK, OK), "nothing pending");
        health.change_arrived(at(10));
        // A later change does not restart the clock: the oldest pending one counts.
        health.change_arrived(at(50));
        assert_eq!(codes(&health, at(69)), (OK, OK));
        assert_eq!(codes(&health, at(70)), (UNAVAILABLE, UNAVAILABLE));
        assert!(!health.proxy_healthy(at(70)));
        health.synced(at(71));
        assert_eq!(codes(&health, at(200)), (OK, OK), "synced: healthy again");
    }

    #[test]
    fn a_stale_source_is_no_reason_for_503() {
        let mut health = synced();
        health.stale = true;
        assert_eq!(codes(&health, at(3600)), (OK, OK));
        assert!(health.proxy_healthy(at(3600)));
        let (_, body) = answer(&health, at(3600), true);
        assert!(body.stale);
        // Stale and a change waiting too long: unhealthy for the wait, not the staleness.
        health.change_arrived(at(3600));
        assert_eq!(codes(&health, at(3660)), (UNAVAILABLE, UNAVAILABLE));
    }

    #[test]
    fn the_deletion_timestamp_or_the_autoscaler_taint_fail_healthz_not_livez() {
        for node in [
            node(&[model::TO_BE_DELETED_TAINT], false),
            node(&["other", model::TO_BE_DELETED_TAINT], false),
            node(&[], true),
        ] {
            let mut health = synced();
            health.follow_node(Some(&node));
            assert_eq!(codes(&health, at(1)), (UNAVAILABLE, OK), "{node:?}");
            let (_, body) = answer(&health, at(1), true);
            assert_eq!(body.node_eligible, Some(false));
            assert!(
                health.proxy_healthy(at(1)),
                "serviceProxyHealthy ignores the node"
            );
        }
    }

    #[test]
    fn eligible_until_a_node_says_otherwise_and_after_it_disappears_as_it_was() {
        let mut health = synced();
        health.follow_node(None);
        assert_eq!(codes(&health, at(1)), (OK, OK), "no Node seen yet");
        assert_eq!(answer(&health, at(1), true).1.node_eligible, Some(true));

        health.follow_node(Some(&node(&["node.kubernetes.io/unschedulable"], false)));
        assert_eq!(codes(&health, at(1)), (OK, OK), "other taints do not count");

        health.follow_node(Some(&node(&[model::TO_BE_DELETED_TAINT], false)));
        assert_eq!(codes(&health, at(1)), (UNAVAILABLE, OK));
        health.follow_node(None);
        assert_eq!(
            codes(&health, at(1)),
            (UNAVAILABLE, OK),
            "the Node went away: its last state stays"
        );

        health.follow_node(Some(&node(&[], false)));
        assert_eq!(codes(&health, at(1)), (OK, OK), "the taint was removed");
    }

    #[test]
    fn livez_has_no_node_eligible_field() {
        let health = synced();
        let livez = serde_json::to_value(answer(&health, at(1), false).1).unwrap();
        assert!(livez.get("nodeEligible").is_none(), "{livez}");
        let healthz = serde_json::to_value(answer(&health, at(1), true).1).unwrap();
        assert_eq!(healthz["nodeEligible"], true, "{healthz}");
        assert_eq!(healthz["stale"], false, "{healthz}");
        assert!(
            healthz["lastUpdated"]
                .as_str()
                .unwrap()
                .starts_with("2023-")
        );
    }
}
