//! Prometheus metrics with kube-proxy's names where the meaning is the same, plus ours
//! (`lb_*`). Encoded by prometheus-client.
use std::sync::{Arc, Mutex, atomic::AtomicU64};

use axum::{Router, extract::State, http::header, response::IntoResponse, routing::get};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

use super::AgentState;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServiceLabels {
    pub namespace: String,
    pub name: String,
    pub port: String,
    /// Which endpoints the backend set holds: `all` or `local` (a traffic policy `Local`).
    pub endpoints: String,
    /// `IPv4` or `IPv6`: a dual-stack Service port has a backend set (and counters) per family.
    pub family: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MapLabels {
    pub map: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub kind: String,
}

/// Why a north-south program dropped or passed packets (`lb_common::reasons`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DatapathLabels {
    /// `xdp` or `tc`.
    pub program: String,
    pub reason: String,
}

#[derive(Debug)]
pub struct Metrics {
    registry: Mutex<Registry>,
    pub sync_duration: Histogram,
    pub network_programming: Histogram,
    pub last_sync_timestamp: Gauge<f64, AtomicU64>,
    pub services: Gauge,
    pub backends: Gauge,
    pub map_entries: Family<MapLabels, Gauge>,
    pub map_capacity: Family<MapLabels, Gauge>,
    pub errors: Family<ErrorLabels, Counter>,
    pub forwarded: Family<ServiceLabels, Counter>,
    pub refused: Family<ServiceLabels, Counter>,
    pub datapath_packets: Family<DatapathLabels, Counter>,
    pub source_stale: Gauge,
}

fn seconds_buckets() -> impl Iterator<Item = f64> {
    // 100 µs .. ~100 s, as kube-proxy's sync histograms span.
    prometheus_client::metrics::histogram::exponential_buckets(0.0001, 2.0, 21)
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let metrics = Self {
            registry: Mutex::new(Registry::default()),
            sync_duration: Histogram::new(seconds_buckets()),
            network_programming: Histogram::new(seconds_buckets()),
            last_sync_timestamp: Gauge::default(),
            services: Gauge::default(),
            backends: Gauge::default(),
            map_entries: Family::default(),
            map_capacity: Family::default(),
            errors: Family::default(),
            forwarded: Family::default(),
            refused: Family::default(),
            datapath_packets: Family::default(),
            source_stale: Gauge::default(),
        };
        registry.register(
            "kubeproxy_sync_proxy_rules_duration_seconds",
            "How long one sync of the data path took (desired state, diff and map writes)",
            metrics.sync_duration.clone(),
        );
        registry.register(
            "kubeproxy_network_programming_duration_seconds",
            "From an EndpointSlice change (its last-change-trigger-time annotation, or when the change was noticed) to the maps serving it",
            metrics.network_programming.clone(),
        );
        registry.register(
            "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
            "Unix time of the last successful sync",
            metrics.last_sync_timestamp.clone(),
        );
        registry.register(
            "lb_services",
            "Programmed frontends (address, port, protocol)",
            metrics.services.clone(),
        );
        registry.register(
            "lb_backends",
            "Programmed backends over all frontends",
            metrics.backends.clone(),
        );
        registry.register(
            "lb_map_entries",
            "Entries in each BPF map the agent writes",
            metrics.map_entries.clone(),
        );
        registry.register(
            "lb_map_capacity",
            "Capacity (max_entries) of each BPF map",
            metrics.map_capacity.clone(),
        );
        registry.register(
            "lb_errors",
            "Errors by kind (map_write, source, invalid_object)",
            metrics.errors.clone(),
        );
        registry.register(
            "lb_service_forwarded",
            "Connections and unconnected UDP datagrams sent to a backend, per frontend",
            metrics.forwarded.clone(),
        );
        registry.register(
            "lb_service_refused",
            "Connections refused because the frontend had no backend",
            metrics.refused.clone(),
        );
        registry.register(
            "lb_datapath_packets",
            "Packets the north-south programs (XDP ingress, tc egress) passed or dropped, by the reason they give",
            metrics.datapath_packets.clone(),
        );
        registry.register(
            "lb_source_stale",
            "1 while the source cannot be reached and the last known state is served",
            metrics.source_stale.clone(),
        );
        *metrics.registry.lock().expect("registry lock") = registry;
        metrics
    }

    /// Sets a counter family member to an absolute value read from the kernel.
    pub fn set_counter<L: Clone + std::hash::Hash + Eq>(
        family: &Family<L, Counter>,
        labels: &L,
        value: u64,
    ) {
        let counter = family.get_or_create(labels);
        let current = counter.get();
        if value > current {
            counter.inc_by(value - current);
        }
    }

    pub fn encode(&self) -> String {
        let mut text = String::new();
        let registry = self.registry.lock().expect("registry lock");
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &registry);
        text
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

pub fn router(state: Arc<AgentState>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/proxyMode", get(|| async { "ebpf" }))
        .with_state(state)
}

async fn metrics(State(state): State<Arc<AgentState>>) -> impl IntoResponse {
    if let Some(read) = state.counters.lock().expect("counters lock").as_ref() {
        for (labels, forwarded, refused) in read() {
            Metrics::set_counter(&state.metrics.forwarded, &labels, forwarded);
            Metrics::set_counter(&state.metrics.refused, &labels, refused);
        }
    }
    if let Some(read) = state.reasons.lock().expect("reasons lock").as_ref() {
        for (labels, packets) in read() {
            Metrics::set_counter(&state.metrics.datapath_packets, &labels, packets);
        }
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.encode(),
    )
}
