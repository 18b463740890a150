//! API server faults end to end: the real lb-agent reading a fake API server
//! (tests/common/fake_api.rs, real HTTP on 127.0.0.1 through `--kubeconfig`), the real eBPF
//! programs in a test cgroup, real TCP connections through a ClusterIP. Whatever the server
//! does wrong, connections keep working, `/healthz` and `lb_source_stale` say stale, and once
//! the server behaves a change on it reaches the maps.
mod common;

use std::time::{Duration, Instant};

use common::{Cluster, POD_PORT, fake_api::FakeApiServer, finish_probe, http_get};
use http::StatusCode;
use lb_agent::source::kube::Watched;
use lb_testkit::objects::{ServiceManifest, SliceManifest};

const TCP_VIP: &str = "10.96.0.10:80";
/// The agent's `--node-name`: every pod runs on it.
const NODE: &str = "node-a";
/// The agent's `--api-timeout-ms`.
const API_TIMEOUT_MS: u64 = 1000;
/// Within the watcher's longest backoff (30 s), a request timeout and a margin.
const RECOVERY_BOUND: Duration = Duration::from_secs(30 + 1 + 5);
/// How long each fault's probe runs: new TCP connections every 20 ms meanwhile.
const PROBE_MS: &str = "2000";

fn web_service() -> ServiceManifest {
    ServiceManifest::cluster_ip("default", "web", "10.96.0.10")
        .selector("app", "web")
        .port("http", "TCP", 80, POD_PORT)
}

/// The slice of `web` over these ready pods.
fn web_slice(cluster: &Cluster, backends: &[&str]) -> String {
    let slice = backends.iter().fold(
        SliceManifest::new("default", "web-1", "web"),
        |slice, pod| {
            slice
                .endpoint(cluster.pod_ip(pod))
                .on_node(NODE)
                .ready(true)
        },
    );
    slice.port("http", "TCP", POD_PORT).to_yaml()
}

const NODE_YAML: &str = "apiVersion: v1\nkind: Node\nmetadata:\n  name: node-a\n";

/// The agent's `/healthz` body and `lb_source_stale`, as (stale in healthz, gauge).
fn staleness(cluster: &mut Cluster) -> (bool, Option<String>) {
    let agent = cluster.agent();
    let healthz = agent.healthz_addr.expect("healthz is served").to_string();
    let metrics = agent.metrics_addr.expect("metrics are served").to_string();
    let (status, body) = http_get(&healthz, "/healthz");
    assert_eq!(status, 200, "a stale source is no reason for 503: {body}");
    let body: serde_json::Value = serde_json::from_str(&body).expect("healthz is JSON");
    let (_, metrics) = http_get(&metrics, "/metrics");
    let gauge = metrics
        .lines()
        .find(|l| l.starts_with("lb_source_stale "))
        .map(|l| l.trim_start_matches("lb_source_stale ").to_owned());
    (body["stale"] == true, gauge)
}

/// Waits (bounded) until healthz and the gauge both say `stale`; returns how long it took.
fn wait_stale(cluster: &mut Cluster, stale: bool, what: &str) -> Duration {
    let started = Instant::now();
    let gauge = if stale { "1" } else { "0" };
    loop {
        let (healthz, metric) = staleness(cluster);
        if healthz == stale && metric.as_deref() == Some(gauge) {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < RECOVERY_BOUND,
            "{what}: never stale={stale} (healthz {healthz}, lb_source_stale {metric:?}); log:\n{}",
            cluster.agent().log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Runs `fault` with connections going through the ClusterIP meanwhile: none fails, all
/// reach `backends`; the agent turns stale, and once `heal` ran it is current again within
/// RECOVERY_BOUND. Returns (time to stale, time to recover).
fn through_fault(
    cluster: &mut Cluster,
    what: &str,
    backends: &[&str],
    fault: impl FnOnce(),
    heal: impl FnOnce(),
) -> (Duration, Duration) {
    let probe = cluster.probe_in_background(&[
        "tcp",
        TCP_VIP,
        "--duration-ms",
        PROBE_MS,
        "--interval-ms",
        "20",
    ]);
    fault();
    let stale = wait_stale(cluster, true, what);
    let during = finish_probe(probe);
    assert_eq!(during.failures(), 0, "{what}: {during:?}");
    assert!(during.attempts > 20, "{what}: {during:?}");
    let reached: Vec<_> = during.replies.keys().map(String::as_str).collect();
    assert_eq!(reached, backends, "{what}: {during:?}");
    heal();
    let recovered = wait_stale(cluster, false, what);
    eprintln!(
        "{what}: stale after {} ms, current {} ms after the server was back; \
         {} connections, none failed",
        stale.as_millis(),
        recovered.as_millis(),
        during.attempts
    );
    (stale, recovered)
}

#[test]
fn connections_survive_api_server_faults_and_changes_flow_after_them() {
    let runtime = tokio::runtime::Runtime::new().expect("a tokio runtime");
    let server = runtime.block_on(FakeApiServer::start());
    let mut cluster = Cluster::new(&["pod-a", "pod-b", "pod-c"]);
    server.apply_yaml(Watched::Services, &web_service().to_yaml());
    server.apply_yaml(
        Watched::EndpointSlices,
        &web_slice(&cluster, &["pod-a", "pod-b"]),
    );
    server.apply_yaml(Watched::Nodes, NODE_YAML);
    let kubeconfig = server.kubeconfig().display().to_string();
    let timeout = API_TIMEOUT_MS.to_string();
    cluster.start_agent_with(&["--kubeconfig", &kubeconfig, "--api-timeout-ms", &timeout]);
    cluster.tcp_until(TCP_VIP, Duration::from_secs(10), |r| r.failures() == 0);
    assert_eq!(staleness(&mut cluster), (false, Some("0".into())));
    let both = ["pod-a", "pod-b"];

    // Every request answered 500, open watches broken.
    through_fault(
        &mut cluster,
        "500 on every request",
        &both,
        || {
            for kind in Watched::ALL {
                server.fail(kind, Some(StatusCode::INTERNAL_SERVER_ERROR));
                server.break_watches(kind);
            }
        },
        || {
            for kind in Watched::ALL {
                server.fail(kind, None);
            }
        },
    );

    // 429 with Retry-After on the slices.
    through_fault(
        &mut cluster,
        "429 Retry-After on slices",
        &both,
        || {
            let kind = Watched::EndpointSlices;
            server.fail_retry_after(kind, Some(StatusCode::TOO_MANY_REQUESTS), Some(1));
            server.break_watches(kind);
        },
        || server.fail(Watched::EndpointSlices, None),
    );

    // The slices' history is compacted and their re-list answers garbage.
    through_fault(
        &mut cluster,
        "a re-list answered with garbage",
        &both,
        || {
            server.list_body(
                Watched::EndpointSlices,
                Some("<html>502 Bad Gateway</html>"),
            );
            server.change_elsewhere();
            server.compact();
            server.end_watches(Watched::EndpointSlices);
        },
        || server.list_body(Watched::EndpointSlices, None),
    );

    // A server that accepts connections and never answers.
    through_fault(
        &mut cluster,
        "a server that never answers",
        &both,
        || {
            server.set_silent(true);
            for kind in Watched::ALL {
                server.break_watches(kind);
            }
        },
        || server.set_silent(false),
    );

    // Not JSON in the services' watch, once it is open again.
    let started = Instant::now();
    while server.open_watches(Watched::Services) == 0 {
        assert!(
            started.elapsed() < RECOVERY_BOUND,
            "the services' watch never reopened"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    through_fault(
        &mut cluster,
        "a watch line that is not JSON",
        &both,
        || server.inject(Watched::Services, "this is not JSON\n"),
        // The next valid event is contact again.
        || {
            server.bookmark(Watched::Services);
            server.apply_yaml(Watched::Services, &web_service().to_yaml());
        },
    );

    // Every slice watch answered 410 Gone, three times in a row: re-lists, never stale.
    let lists = server.seen(Watched::EndpointSlices, false).len();
    let probe = cluster.probe_in_background(&[
        "tcp",
        TCP_VIP,
        "--duration-ms",
        "4000",
        "--interval-ms",
        "20",
    ]);
    server.gone_watches(Watched::EndpointSlices, 3);
    server.end_watches(Watched::EndpointSlices);
    let started = Instant::now();
    while server.seen(Watched::EndpointSlices, false).len() < lists + 3 {
        assert!(
            started.elapsed() < RECOVERY_BOUND,
            "three re-lists after 410"
        );
        assert!(!staleness(&mut cluster).0, "410 made the agent stale");
        std::thread::sleep(Duration::from_millis(50));
    }
    let during = finish_probe(probe);
    assert_eq!(during.failures(), 0, "410: {during:?}");
    eprintln!(
        "3 x 410 Gone: 3 re-lists in {} ms, {} connections, none failed",
        started.elapsed().as_millis(),
        during.attempts
    );

    // After all that, a change on the server reaches the maps: web moves to pod-c.
    let changed = Instant::now();
    server.apply_yaml(Watched::EndpointSlices, &web_slice(&cluster, &["pod-c"]));
    cluster.tcp_until(TCP_VIP, RECOVERY_BOUND, |r| {
        r.replies.keys().eq(["pod-c"].iter())
    });
    eprintln!(
        "after the faults: a slice change served {} ms after it was made",
        changed.elapsed().as_millis()
    );
    drop(cluster);
    drop(server);
    drop(runtime);
}
