//! `/healthz` and `/livez`, answered as kube-proxy answers them: 200 with a JSON body holding
//! `lastUpdated` and `currentTime` while the data path follows the source, 503 when a change
//! has waited longer than the timeout, or the source cannot be reached (fail static: the data
//! path still serves the last state, but the node is not following the cluster).
use std::{
    sync::Arc,
    time::{Duration, SystemTime},
};

use axum::{Json, Router, extract::State, http::StatusCode, routing::get};
use serde::Serialize;

use super::AgentState;

/// How long a change may wait for its sync before the agent calls itself unhealthy.
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
}

impl Health {
    pub fn new(source: String) -> Self {
        Self {
            source,
            last_updated: None,
            pending_since: None,
            stale: false,
        }
    }

    fn healthy(&self, now: SystemTime) -> bool {
        let waited_too_long = self
            .pending_since
            .is_some_and(|since| now.duration_since(since).unwrap_or_default() > HEALTHZ_TIMEOUT);
        self.last_updated.is_some() && !waited_too_long && !self.stale
    }
}

/// The body of `/healthz` (kube-proxy's fields, plus ours).
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HealthzBody {
    pub last_updated: String,
    pub current_time: String,
    pub node_eligible: bool,
    pub source: String,
    pub stale: bool,
}

pub fn router(state: Arc<AgentState>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/livez", get(livez))
        .with_state(state)
}

fn rfc3339(time: Option<SystemTime>) -> String {
    time.and_then(|t| jiff::Timestamp::try_from(t).ok())
        .map(|t| t.to_string())
        .unwrap_or_default()
}

fn answer(state: &AgentState, check_source: bool) -> (StatusCode, Json<HealthzBody>) {
    let health = state.health.lock().expect("health lock").clone();
    let now = SystemTime::now();
    let mut healthy = health.healthy(now);
    if !check_source && health.stale && health.last_updated.is_some() {
        healthy = true;
    }
    let status = if healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = HealthzBody {
        last_updated: rfc3339(health.last_updated),
        current_time: rfc3339(Some(now)),
        node_eligible: true,
        source: health.source,
        stale: health.stale,
    };
    (status, Json(body))
}

/// Readiness: the data path follows the source.
async fn healthz(State(state): State<Arc<AgentState>>) -> (StatusCode, Json<HealthzBody>) {
    answer(&state, true)
}

/// Liveness: the agent syncs; an unreachable API server is no reason to restart it.
async fn livez(State(state): State<Arc<AgentState>>) -> (StatusCode, Json<HealthzBody>) {
    answer(&state, false)
}
