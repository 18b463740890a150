//! The socket load balancer end to end: the real lb-agent reading a manifest directory, the real
//! eBPF programs in a test cgroup, real TCP and UDP between network namespaces, real servers
//! answering with their pod name.
mod common;

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use common::{Cluster, POD_PORT, finish_probe, http_get};
use lb_testkit::objects::{ServiceManifest, SliceManifest};

const VIP: &str = "10.96.0.10";
const TCP_VIP: &str = "10.96.0.10:80";
/// The agent's `--node-name`: every pod runs on it.
const NODE: &str = "node-a";

/// A ClusterIP Service `namespace/name` at `ip` selecting `app: name`, without ports.
fn service(namespace: &str, name: &str, ip: &str) -> ServiceManifest {
    ServiceManifest::cluster_ip(namespace, name, ip).selector("app", name)
}

/// The slice `namespace/name` of `service`, with these (address, ready) endpoints on this
/// node, without ports.
fn slice(
    namespace: &str,
    name: &str,
    service: &str,
    endpoints: &[(Ipv4Addr, bool)],
) -> SliceManifest {
    endpoints.iter().fold(
        SliceManifest::new(namespace, name, service),
        |slice, (ip, ready)| slice.endpoint(ip).on_node(NODE).ready(*ready),
    )
}

/// The Service `web` at `VIP`:80 (TCP, port `http`) on POD_PORT.
fn web_service() -> ServiceManifest {
    service("default", "web", VIP).port("http", "TCP", 80, POD_PORT)
}

/// `web_service()` over the ready pods `backends`.
fn web(cluster: &Cluster, backends: &[&str]) {
    web_as(cluster, web_service(), backends);
}

/// The Service `web` as `service` says, over the ready pods `backends`.
fn web_as(cluster: &Cluster, service: ServiceManifest, backends: &[&str]) {
    cluster.write_manifest("web.yaml", &service.to_yaml());
    let endpoints: Vec<_> = backends.iter().map(|b| (cluster.pod_ip(b), true)).collect();
    let slice = slice("default", "web-1", "web", &endpoints).port("http", "TCP", POD_PORT);
    cluster.write_manifest("web-slice.yaml", &slice.to_yaml());
}

/// The Service `dns` at 10.96.0.53:53 (UDP, port `dns`) on POD_PORT.
fn dns_service() -> ServiceManifest {
    service("default", "dns", "10.96.0.53").port("dns", "UDP", 53, POD_PORT)
}

/// A Service `name` at `ip`:80 (TCP, port `http`) on POD_PORT, without endpoints.
fn http_service(name: &str, ip: &str) -> ServiceManifest {
    service("default", name, ip).port("http", "TCP", 80, POD_PORT)
}

#[test]
fn tcp_connections_spread_over_every_backend_and_getpeername_reports_the_cluster_ip() {
    let mut cluster = Cluster::new(&["pod-a", "pod-b", "pod-c"]);
    web(&cluster, &["pod-a", "pod-b", "pod-c"]);
    cluster.start_agent();

    let result = cluster.probe(&["tcp", TCP_VIP, "--count", "300"]);

    assert_eq!(result.failures(), 0, "{result:?}");
    assert_eq!(result.replies.values().sum::<u64>(), 300, "{result:?}");
    assert_eq!(result.replies.len(), 3, "every backend answers: {result:?}");
    for (pod, count) in &result.replies {
        // Uniform choice: 100 expected each, standard deviation about 8.
        assert!(
            (50..=150).contains(count),
            "{pod} got {count} of 300: {result:?}"
        );
    }
    eprintln!(
        "spread over 3 backends, 300 connections: {:?}",
        result.replies
    );
    assert_eq!(result.peers.len(), 1, "{result:?}");
    assert_eq!(
        result.peers.get(TCP_VIP),
        Some(&300),
        "getpeername: {result:?}"
    );
}

/// A UDP "DNS" service at 10.96.0.53:53 over two pods.
fn dns_cluster() -> Cluster {
    let cluster = Cluster::new(&["dns-a", "dns-b"]);
    cluster.write_manifest("dns.yaml", &dns_service().to_yaml());
    dns_slice(&cluster, &["dns-a", "dns-b"]);
    cluster
}

/// Waits until fresh UDP sockets to the dns service reach `pod` only.
fn udp_until_only_from(cluster: &Cluster, pod: &str) {
    let started = Instant::now();
    loop {
        let result = cluster.probe(&[
            "udp",
            "10.96.0.53:53",
            "--count",
            "10",
            "--new-socket-each",
            "--timeout-ms",
            "300",
        ]);
        if result.replies.get(pod) == Some(&10) {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the dns service does not reach {pod} only: {result:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The dns slice over these backends.
fn dns_slice(cluster: &Cluster, backends: &[&str]) {
    let endpoints: Vec<_> = backends.iter().map(|b| (cluster.pod_ip(b), true)).collect();
    cluster.write_manifest(
        "dns-slice.yaml",
        &slice("default", "dns-1", "dns", &endpoints)
            .port("dns", "UDP", POD_PORT)
            .to_yaml(),
    );
}

#[test]
fn an_unconnected_udp_socket_stays_on_one_backend_until_it_goes_and_replies_come_from_the_cluster_ip()
 {
    let mut cluster = dns_cluster();
    cluster.start_agent();

    // One socket: every datagram to one backend (as one 5-tuple through kube-proxy's
    // conntrack), every reply from the ClusterIP.
    let one = cluster.probe(&["udp", "10.96.0.53:53", "--count", "50"]);
    assert_eq!(one.failures(), 0, "{one:?}");
    assert_eq!(one.replies.len(), 1, "one socket, one backend: {one:?}");
    assert_eq!(
        one.peers.get("10.96.0.53:53"),
        Some(&50),
        "recvmsg reports the ClusterIP as the source of every reply: {one:?}"
    );
    // A socket per datagram: spread over both.
    let many = cluster.probe(&["udp", "10.96.0.53:53", "--count", "60", "--new-socket-each"]);
    assert_eq!(many.failures(), 0, "{many:?}");
    assert_eq!(many.replies.len(), 2, "separate sockets spread: {many:?}");

    // A socket on dns-a stays there when dns-b joins ...
    dns_slice(&cluster, &["dns-a"]);
    udp_until_only_from(&cluster, "dns-a");
    let steady = [
        "udp",
        "10.96.0.53:53",
        "--duration-ms",
        "1600",
        "--interval-ms",
        "10",
        "--timeout-ms",
        "300",
    ];
    let running = cluster.probe_in_background(&steady);
    std::thread::sleep(Duration::from_millis(600));
    dns_slice(&cluster, &["dns-a", "dns-b"]);
    let stayed = finish_probe(running);
    assert_eq!(stayed.failures(), 0, "{stayed:?}");
    assert_eq!(
        stayed.replies.keys().collect::<Vec<_>>(),
        ["dns-a"],
        "a backend joining moves no socket: {stayed:?}"
    );
    // ... and moves to dns-b when dns-a goes.
    dns_slice(&cluster, &["dns-a"]);
    udp_until_only_from(&cluster, "dns-a");
    let running = cluster.probe_in_background(&steady);
    std::thread::sleep(Duration::from_millis(600));
    dns_slice(&cluster, &["dns-b"]);
    let moved = finish_probe(running);
    assert!(
        moved.replies.get("dns-a").is_some_and(|n| *n > 0)
            && moved.replies.get("dns-b").is_some_and(|n| *n > 0),
        "the socket moves once its backend is gone: {moved:?}"
    );
    assert!(moved.failures() <= 2, "{moved:?}");
}

#[test]
fn connected_udp_goes_to_one_backend_and_reports_the_cluster_ip_as_peer() {
    let mut cluster = dns_cluster();
    cluster.start_agent();

    let result = cluster.probe(&["udp", "10.96.0.53:53", "--connected", "--count", "20"]);

    assert_eq!(result.failures(), 0, "{result:?}");
    assert_eq!(
        result.replies.len(),
        1,
        "one connected socket, one backend: {result:?}"
    );
    assert_eq!(result.peers.get("10.96.0.53:53"), Some(&20), "{result:?}");
}

#[test]
fn a_service_without_ready_endpoints_refuses_at_once() {
    let mut cluster = Cluster::new(&["pod-a"]);
    cluster.write_manifest("web.yaml", &web_service().to_yaml());
    cluster.write_manifest(
        "web-slice.yaml",
        &slice(
            "default",
            "web-1",
            "web",
            &[(cluster.pod_ip("pod-a"), false)],
        )
        .port("http", "TCP", POD_PORT)
        .to_yaml(),
    );
    cluster.write_manifest("dns.yaml", &dns_service().to_yaml());
    cluster.start_agent();

    let started = Instant::now();
    let tcp = cluster.probe(&["tcp", TCP_VIP, "--count", "5", "--timeout-ms", "3000"]);
    let udp = cluster.probe(&[
        "udp",
        "10.96.0.53:53",
        "--count",
        "5",
        "--timeout-ms",
        "3000",
    ]);
    let elapsed = started.elapsed();

    assert_eq!(tcp.errors.get("refused"), Some(&5), "TCP: {tcp:?}");
    assert_eq!(udp.errors.get("refused"), Some(&5), "UDP: {udp:?}");
    assert!(
        elapsed < Duration::from_secs(2),
        "refusals must not wait for a timeout: {elapsed:?}"
    );
}

#[test]
fn client_ip_affinity_keeps_a_client_on_one_backend_until_it_goes_away() {
    let mut cluster = Cluster::new(&["pod-a", "pod-b", "pod-c"]);
    web_as(
        &cluster,
        web_service().client_ip_affinity(None),
        &["pod-a", "pod-b", "pod-c"],
    );
    cluster.start_agent();

    let first = cluster.probe(&["tcp", TCP_VIP, "--count", "30"]);
    assert_eq!(first.failures(), 0, "{first:?}");
    assert_eq!(
        first.replies.len(),
        1,
        "30 connections, one backend: {first:?}"
    );
    let chosen = first.replies.keys().next().unwrap().clone();

    // Remove the chosen backend: affinity moves to another one and stays there.
    let rest: Vec<&str> = ["pod-a", "pod-b", "pod-c"]
        .into_iter()
        .filter(|p| *p != chosen)
        .collect();
    web_as(&cluster, web_service().client_ip_affinity(None), &rest);
    cluster.tcp_until(TCP_VIP, Duration::from_secs(5), |r| {
        r.replies.keys().any(|name| *name != chosen)
    });
    let after = cluster.probe(&["tcp", TCP_VIP, "--count", "30"]);
    assert_eq!(after.failures(), 0, "{after:?}");
    assert_eq!(after.replies.len(), 1, "{after:?}");
    assert!(!after.replies.contains_key(&chosen), "{after:?}");
}

#[test]
fn client_ip_affinity_expires_after_its_timeout() {
    let mut cluster = Cluster::new(&["pod-a", "pod-b", "pod-c"]);
    web_as(
        &cluster,
        web_service().client_ip_affinity(Some(1)),
        &["pod-a", "pod-b", "pod-c"],
    );
    cluster.start_agent();

    // Within the timeout: one backend.
    let burst = cluster.probe(&["tcp", TCP_VIP, "--count", "20"]);
    assert_eq!(burst.replies.len(), 1, "{burst:?}");
    // Each connection after a pause longer than the timeout is a fresh random choice: eight
    // pauses all landing on the same backend would happen with probability 3^-7.
    let spaced = cluster.probe(&["tcp", TCP_VIP, "--count", "8", "--interval-ms", "1200"]);
    assert_eq!(spaced.failures(), 0, "{spaced:?}");
    assert!(
        spaced.replies.len() > 1,
        "affinity never expired: {spaced:?}"
    );
}

#[test]
fn endpoint_changes_reach_the_maps_quickly_and_without_failed_connections() {
    let mut cluster = Cluster::new(&["pod-a", "pod-b", "pod-c"]);
    web(&cluster, &["pod-a"]);
    cluster.start_agent();
    let steady = cluster.probe_in_background(&[
        "tcp",
        TCP_VIP,
        "--duration-ms",
        "6000",
        "--interval-ms",
        "2",
    ]);

    let mut latencies = Vec::new();
    for (backends, expect) in [
        (&["pod-a", "pod-b"][..], "pod-b"),
        (&["pod-c"][..], "pod-c"),
        (&["pod-a", "pod-c"][..], "pod-a"),
        (&["pod-b"][..], "pod-b"),
    ] {
        let started = Instant::now();
        web(&cluster, backends);
        cluster.tcp_until(TCP_VIP, Duration::from_secs(2), |r| {
            r.replies.contains_key(expect)
        });
        latencies.push(started.elapsed());
        // Once the change is in, removed backends get nothing.
        let check = cluster.probe(&["tcp", TCP_VIP, "--count", "20"]);
        assert!(
            check
                .replies
                .keys()
                .all(|name| backends.contains(&name.as_str())),
            "after switching to {backends:?}: {check:?}"
        );
    }
    let steady = finish_probe(steady);
    eprintln!("endpoint change to first connection on the new backend: {latencies:?}");
    assert!(steady.attempts > 100, "{steady:?}");
    assert_eq!(
        steady.failures(),
        0,
        "connections failed during updates: {steady:?}"
    );
    for latency in latencies {
        assert!(latency < Duration::from_secs(1), "{latency:?}");
    }
}

#[test]
fn services_appear_and_disappear_with_their_files_and_other_addresses_pass_untouched() {
    let mut cluster = Cluster::new(&["pod-a"]);
    cluster.start_agent();
    let direct = format!("{}:{POD_PORT}", cluster.pod_ip("pod-a"));

    // Not a service: connections go where they were addressed.
    let plain = cluster.probe(&["tcp", &direct, "--count", "3"]);
    assert_eq!(plain.replies.get("pod-a"), Some(&3), "{plain:?}");
    assert_eq!(plain.peers.get(&direct), Some(&3), "{plain:?}");
    // A ClusterIP that is not (yet) a service is not routed anywhere.
    let before = cluster.probe(&["tcp", TCP_VIP, "--count", "1", "--timeout-ms", "500"]);
    assert_eq!(before.failures(), 1, "{before:?}");

    web(&cluster, &["pod-a"]);
    cluster.tcp_until(TCP_VIP, Duration::from_secs(2), |r| {
        r.replies.contains_key("pod-a")
    });

    cluster.remove_manifest("web.yaml");
    cluster.tcp_until(TCP_VIP, Duration::from_secs(2), |r| r.failures() == 1);
    let after = cluster.probe(&["tcp", TCP_VIP, "--count", "1", "--timeout-ms", "500"]);
    assert!(
        !after.errors.contains_key("refused"),
        "a removed service is not refused: {after:?}"
    );
}

#[test]
fn multi_port_services_match_named_ports_and_keep_tcp_and_udp_apart() {
    let mut cluster = Cluster::new(&["pod-a", "pod-b"]);
    cluster.write_manifest(
        "dns.yaml",
        &service("default", "dns", "10.96.0.53")
            .port("dns-tcp", "TCP", 53, POD_PORT)
            .port("dns-udp", "UDP", 53, POD_PORT)
            .to_yaml(),
    );
    // Two slices: TCP only on pod-a, UDP only on pod-b (as named ports would resolve).
    cluster.write_manifest(
        "dns-tcp.yaml",
        &slice(
            "default",
            "dns-t",
            "dns",
            &[(cluster.pod_ip("pod-a"), true)],
        )
        .port("dns-tcp", "TCP", POD_PORT)
        .to_yaml(),
    );
    cluster.write_manifest(
        "dns-udp.yaml",
        &slice(
            "default",
            "dns-u",
            "dns",
            &[(cluster.pod_ip("pod-b"), true)],
        )
        .port("dns-udp", "UDP", POD_PORT)
        .to_yaml(),
    );
    cluster.start_agent();

    let tcp = cluster.probe(&["tcp", "10.96.0.53:53", "--count", "10"]);
    let udp = cluster.probe(&["udp", "10.96.0.53:53", "--count", "10"]);
    assert_eq!(tcp.replies.get("pod-a"), Some(&10), "{tcp:?}");
    assert_eq!(udp.replies.get("pod-b"), Some(&10), "{udp:?}");
}

#[test]
fn bad_manifests_are_reported_and_do_not_disturb_what_is_programmed() {
    let mut cluster = Cluster::new(&["pod-a"]);
    web(&cluster, &["pod-a"]);
    cluster.start_agent();
    cluster.tcp_until(TCP_VIP, Duration::from_secs(2), |r| {
        r.replies.contains_key("pod-a")
    });

    cluster.write_manifest(
        "broken.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: [unclosed\n",
    );
    cluster.write_manifest(
        "badport.yaml",
        &service("default", "badport", "10.96.0.20")
            .port("http", "TCP", 0, 8080)
            .to_yaml(),
    );
    cluster.write_manifest(
        "badip.yaml",
        &service("default", "badip", "10.96.0.300")
            .port("http", "TCP", 80, 80)
            .to_yaml(),
    );
    let agent = cluster.agent();
    agent.wait_for_log("broken.yaml", Duration::from_secs(3));
    agent.wait_for_log("Service default/badport", Duration::from_secs(3));
    agent.wait_for_log("Service default/badip", Duration::from_secs(3));
    assert!(agent.is_running(), "bad input must not stop the agent");

    let still = cluster.probe(&["tcp", TCP_VIP, "--count", "10"]);
    assert_eq!(still.replies.get("pod-a"), Some(&10), "{still:?}");
}

#[test]
fn a_manifest_directory_with_loops_half_written_and_oversize_files_keeps_what_it_serves() {
    let mut cluster = Cluster::new(&["pod-a", "pod-b"]);
    web(&cluster, &["pod-a"]);
    let dir = cluster.manifests.path().to_owned();
    // A directory loop and a file loop: neither may slow the source down or go unreported.
    std::os::unix::fs::symlink(".", dir.join("loop")).unwrap();
    std::os::unix::fs::symlink("y.yaml", dir.join("x.yaml")).unwrap();
    std::os::unix::fs::symlink("x.yaml", dir.join("y.yaml")).unwrap();
    cluster.start_agent_with(&["--manifest-max-bytes", "4096"]);
    cluster.tcp_until(TCP_VIP, Duration::from_secs(2), |r| {
        r.replies.contains_key("pod-a")
    });
    cluster
        .agent()
        .wait_for_log("x.yaml: cannot read", Duration::from_secs(3));

    // Half-written in place (no rename), as a slow writer leaves it.
    let half = "apiVersion: v1\nkind: Service\nmetadata:\n  name: web\nspec:\n  ports: [ {port: 80";
    std::fs::write(dir.join("web.yaml"), half).unwrap();
    cluster.agent().wait_for_log(
        "web.yaml: document 1 does not parse",
        Duration::from_secs(3),
    );
    cluster
        .agent()
        .wait_for_log("its last good version is kept", Duration::from_secs(3));
    // Over the size limit: reported, the slice's last good version still served.
    let endpoints = [(cluster.pod_ip("pod-b"), true)];
    let slice = slice("default", "web-1", "web", &endpoints).port("http", "TCP", POD_PORT);
    let padded = format!("{}# {}\n", slice.to_yaml(), "x".repeat(5000));
    cluster.write_manifest("web-slice.yaml", &padded);
    cluster
        .agent()
        .wait_for_log("over the limit of 4096", Duration::from_secs(3));
    let still = cluster.probe(&["tcp", TCP_VIP, "--count", "10"]);
    assert_eq!(still.replies.get("pod-a"), Some(&10), "{still:?}");

    // Whole again: the new version is served at once, the loop notwithstanding.
    cluster.write_manifest("web-slice.yaml", &slice.to_yaml());
    let took = cluster.tcp_until(TCP_VIP, Duration::from_secs(2), |r| {
        r.replies.contains_key("pod-b")
    });
    assert!(took < Duration::from_secs(2), "took {took:?}");
    // A file really gone takes its objects with it (the broken web.yaml's last good Service).
    cluster.remove_manifest("web.yaml");
    cluster.tcp_until(TCP_VIP, Duration::from_secs(2), |r| r.replies.is_empty());
    assert!(cluster.agent().is_running());
}

#[test]
fn sigterm_with_cleanup_on_exit_detaches_the_programs_and_removes_the_pins() {
    let mut cluster = Cluster::new(&["pod-a"]);
    web(&cluster, &["pod-a"]);
    cluster.start_agent_with(&["--cleanup-on-exit"]);
    cluster.tcp_until(TCP_VIP, Duration::from_secs(2), |r| {
        r.replies.contains_key("pod-a")
    });

    let status = cluster.agent().terminate();
    assert!(status.success(), "clean exit: {status:?}");

    let after = cluster.probe(&["tcp", TCP_VIP, "--count", "1", "--timeout-ms", "500"]);
    assert!(
        after.replies.is_empty(),
        "programs still attached: {after:?}"
    );
    assert!(
        !cluster.bpffs.is_mounted(),
        "the bpffs the agent mounted is still there"
    );
}

#[test]
fn a_stopped_agent_leaves_traffic_flowing_until_cleanup() {
    let mut cluster = Cluster::new(&["pod-a"]);
    web(&cluster, &["pod-a"]);
    cluster.start_agent();
    cluster.tcp_until(TCP_VIP, Duration::from_secs(2), |r| {
        r.replies.contains_key("pod-a")
    });

    let status = cluster.agent().terminate();
    assert!(status.success(), "clean exit: {status:?}");
    let during = cluster.probe(&["tcp", TCP_VIP, "--count", "10"]);
    assert_eq!(
        during.replies.get("pod-a"),
        Some(&10),
        "no agent, same service: {during:?}"
    );

    let bpffs = cluster.bpffs.path().display().to_string();
    cluster.agent_command(&["cleanup", "--bpffs", &bpffs]);
    let after = cluster.probe(&["tcp", TCP_VIP, "--count", "1", "--timeout-ms", "500"]);
    assert!(
        after.replies.is_empty(),
        "cleanup left programs attached: {after:?}"
    );
    assert!(!cluster.bpffs.is_mounted(), "cleanup left the bpffs mount");
}

#[test]
fn sigkill_under_traffic_fails_no_connection_and_a_restart_applies_what_changed_meanwhile() {
    let mut cluster = Cluster::new(&["pod-a", "pod-b"]);
    web(&cluster, &["pod-a"]);
    cluster.start_agent();
    let steady = cluster.probe_in_background(&[
        "tcp",
        TCP_VIP,
        "--duration-ms",
        "4000",
        "--interval-ms",
        "2",
    ]);
    std::thread::sleep(Duration::from_millis(500));
    cluster.agent().kill();

    // While no agent runs, the service changes.
    web(&cluster, &["pod-b"]);
    std::thread::sleep(Duration::from_millis(1000));
    let unchanged = cluster.probe(&["tcp", TCP_VIP, "--count", "10"]);
    assert_eq!(
        unchanged.replies.get("pod-a"),
        Some(&10),
        "last programmed state: {unchanged:?}"
    );

    cluster.start_agent();
    cluster.tcp_until(TCP_VIP, Duration::from_secs(3), |r| {
        r.replies.contains_key("pod-b")
    });
    let steady = finish_probe(steady);
    assert!(steady.attempts > 200, "{steady:?}");
    assert_eq!(
        steady.failures(),
        0,
        "connections failed across the kill and restart: {steady:?}"
    );
    assert!(
        steady.replies.contains_key("pod-a") && steady.replies.contains_key("pod-b"),
        "{steady:?}"
    );
}

#[test]
fn a_new_agent_swaps_its_programs_in_atomically_under_traffic() {
    let mut cluster = Cluster::new(&["pod-a", "pod-b"]);
    web(&cluster, &["pod-a", "pod-b"]);
    cluster.start_agent();
    let first = cluster.attached_program_ids();
    assert_eq!(
        first.len(),
        11,
        "eight socket programs, sock_release, post_bind4 and post_bind6 linked: {first:?}"
    );
    let steady = cluster.probe_in_background(&[
        "tcp",
        TCP_VIP,
        "--duration-ms",
        "3000",
        "--interval-ms",
        "1",
    ]);

    for _ in 0..3 {
        std::thread::sleep(Duration::from_millis(300));
        cluster.agent().terminate();
        cluster.start_agent();
    }
    let last = cluster.attached_program_ids();
    let steady = finish_probe(steady);

    assert!(
        first.iter().all(|id| !last.contains(id)),
        "the programs were not replaced: {first:?} then {last:?}"
    );
    assert_eq!(last.len(), 11, "{last:?}");
    assert!(steady.attempts > 300, "{steady:?}");
    assert_eq!(
        steady.failures(),
        0,
        "connections failed during the upgrades: {steady:?}"
    );
}

#[test]
fn metrics_healthz_and_proxy_mode_answer_as_kube_proxys_do() {
    let mut cluster = Cluster::new(&["pod-a"]);
    web(&cluster, &["pod-a"]);
    cluster.write_manifest("empty.yaml", &http_service("empty", "10.96.0.11").to_yaml());
    cluster.start_agent();
    let metrics = cluster.agent().metrics_addr.unwrap().to_string();
    let healthz = cluster.agent().healthz_addr.unwrap().to_string();
    assert_eq!(cluster.agent().logged_address("metrics_addr"), metrics);
    assert_eq!(cluster.agent().logged_address("healthz_addr"), healthz);

    let (status, body) = http_get(&healthz, "/healthz");
    assert_eq!(status, 200, "{body}");
    let health: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(
        health["lastUpdated"]
            .as_str()
            .is_some_and(|t| t.contains('T')),
        "{body}"
    );
    assert!(health["currentTime"].as_str().is_some(), "{body}");
    assert_eq!(http_get(&healthz, "/livez").0, 200);
    assert_eq!(http_get(&metrics, "/proxyMode").1, "ebpf");

    let sent = cluster.probe(&["tcp", TCP_VIP, "--count", "7"]);
    assert_eq!(sent.replies.get("pod-a"), Some(&7), "{sent:?}");
    let refused = cluster.probe(&["tcp", "10.96.0.11:80", "--count", "3"]);
    assert_eq!(refused.errors.get("refused"), Some(&3), "{refused:?}");
    // The counters are read from the per-CPU map every 2 s.
    std::thread::sleep(Duration::from_millis(2500));
    let (status, text) = http_get(&metrics, "/metrics");
    assert_eq!(status, 200);
    for name in [
        "kubeproxy_sync_proxy_rules_duration_seconds",
        "kubeproxy_network_programming_duration_seconds",
        "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
        "lb_services 2",
        "lb_map_capacity{map=\"LB4_FRONT_V2\"} 65536",
    ] {
        assert!(text.contains(name), "no {name} in:\n{text}");
    }
    let counter = |metric: &str, service: &str| {
        text.lines()
            .find(|l| l.starts_with(metric) && l.contains(&format!("name=\"{service}\"")))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<u64>().ok())
    };
    assert_eq!(
        counter("lb_service_forwarded_total", "web"),
        Some(7),
        "{text}"
    );
    assert_eq!(
        counter("lb_service_refused_total", "empty"),
        Some(3),
        "{text}"
    );
    eprintln!("{text}");

    let bpffs = cluster.bpffs.path().display().to_string();
    let status: serde_json::Value = serde_json::from_str(&cluster.agent_command(&[
        "status",
        "--bpffs",
        &bpffs,
        "--healthz-addr",
        &healthz,
        "-o",
        "json",
    ]))
    .unwrap();
    assert_eq!(
        status["links"].as_array().map(Vec::len),
        Some(lb_testkit::agent_links(0)),
        "{status}"
    );
    let services = status["maps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "LB4_FRONT_V2")
        .cloned()
        .unwrap_or_default();
    assert_eq!(services["entries"], 2, "{status}");
    assert_eq!(services["capacity"], 65536, "{status}");
    assert_eq!(status["agent"]["running"], true, "{status}");
    assert!(
        status["agent"]["source"]
            .as_str()
            .unwrap()
            .starts_with("manifests:"),
        "{status}"
    );
    eprintln!(
        "{}",
        cluster.agent_command(&["status", "--bpffs", &bpffs, "--healthz-addr", &healthz])
    );
    let list: serde_json::Value =
        serde_json::from_str(&cluster.agent_command(&["list", "--bpffs", &bpffs, "-o", "json"]))
            .unwrap();
    let web = list
        .as_array()
        .unwrap()
        .iter()
        .find(|row| row["frontend"] == "10.96.0.10:80")
        .cloned()
        .unwrap_or_default();
    assert_eq!(web["service"], "default/web:http", "{list}");
    assert_eq!(web["type"], "ClusterIP", "{list}");
    assert_eq!(
        web["backends"][0],
        format!("{}:{POD_PORT} (local)", cluster.pod_ip("pod-a")),
        "the pod runs on this node: {list}"
    );
    eprintln!("{}", cluster.agent_command(&["list", "--bpffs", &bpffs]));
}

#[test]
fn bpf_log_shows_each_translation_and_refusal_in_the_agents_log() {
    let mut cluster = Cluster::new(&["pod-a"]);
    web(&cluster, &["pod-a"]);
    cluster.write_manifest("empty.yaml", &http_service("empty", "10.96.0.11").to_yaml());
    cluster.start_agent_with(&["--bpf-log"]);

    let sent = cluster.probe(&["tcp", TCP_VIP, "--count", "1"]);
    assert_eq!(sent.replies.get("pod-a"), Some(&1), "{sent:?}");
    let refused = cluster.probe(&["tcp", "10.96.0.11:80", "--count", "1"]);
    assert_eq!(refused.errors.get("refused"), Some(&1), "{refused:?}");

    let pod = format!("{}:{POD_PORT}", cluster.pod_ip("pod-a"));
    let agent = cluster.agent();
    agent.wait_for_log(&format!("10.96.0.10:80 -> {pod}"), Duration::from_secs(3));
    agent.wait_for_log("refused 10.96.0.11:80: no backend", Duration::from_secs(3));
}

#[test]
fn pods_reach_a_services_external_ip_at_the_socket() {
    let mut cluster = Cluster::new(&["pod-a"]);
    web_as(
        &cluster,
        web_service().external_ips(["198.51.100.10"]),
        &["pod-a"],
    );
    cluster.start_agent();

    let result = cluster.probe(&["tcp", "198.51.100.10:80", "--count", "5"]);
    assert_eq!(result.replies.get("pod-a"), Some(&5), "{result:?}");
    assert_eq!(result.peers.get("198.51.100.10:80"), Some(&5), "{result:?}");
}

#[test]
fn a_pod_reaches_itself_through_its_own_service() {
    let mut cluster = Cluster::new(&["pod-a"]);
    web(&cluster, &["pod-a"]);
    cluster.start_agent();

    // Hairpin: the backend pod itself, in the cgroup, connects to its own service.
    let child = lb_testkit::spawn_in(
        Some(&cluster.pods[0].netns),
        Some(&cluster.cgroup),
        &*common::PROBE,
        &["tcp", TCP_VIP, "--count", "3"],
    )
    .expect("starting lb-probe in the backend pod");
    let result = finish_probe(child);
    assert_eq!(result.replies.get("pod-a"), Some(&3), "{result:?}");
}

#[test]
fn terminating_endpoints_serve_when_none_is_ready_and_list_says_so() {
    let mut cluster = Cluster::new(&["pod-a"]);
    web(&cluster, &["pod-a"]);
    let terminating = SliceManifest::new("default", "web-1", "web")
        .port("http", "TCP", POD_PORT)
        .endpoint(cluster.pod_ip("pod-a"))
        .on_node(NODE)
        .conditions(false, true, true);
    cluster.write_manifest("web-slice.yaml", &terminating.to_yaml());
    cluster.start_agent();

    // kube-proxy's graceful termination: no ready endpoint, so serving-terminating ones serve.
    let result = cluster.probe(&["tcp", TCP_VIP, "--count", "5"]);
    assert_eq!(result.replies.get("pod-a"), Some(&5), "{result:?}");
    let bpffs = cluster.bpffs.path().display().to_string();
    let list = cluster.agent_command(&["list", "--bpffs", &bpffs]);
    assert!(
        list.lines()
            .any(|l| l.contains("default/web:http") && l.contains("(terminating)")),
        "{list}"
    );
}

#[test]
fn maps_of_an_earlier_layout_are_replaced_without_a_gap_and_then_removed() {
    let mut cluster = Cluster::new(&["pod-a"]);
    web(&cluster, &["pod-a"]);
    // An earlier version's pins: a map under a name this version does not use (a layout
    // change renames the map), as `bpftool` or an older agent would have left it.
    let old = pin_foreign_map(&cluster, "LB4_SERVICES_V0");

    cluster.start_agent();
    let served = cluster.probe(&["tcp", TCP_VIP, "--count", "5"]);
    assert_eq!(served.replies.get("pod-a"), Some(&5), "{served:?}");
    cluster.agent().wait_for_log(
        "removed a map pinned by an earlier version",
        Duration::from_secs(3),
    );
    assert!(!old.exists(), "the old map's pin is still there");
}

/// CVE-2020-8554: a Service in namespace `aaa` (first by name) listing kube-dns's ClusterIP
/// in `spec.externalIPs` at port 53 does not take DNS over: a ClusterIP always wins over an
/// externalIP claim on the same address, port and protocol, and the losing claim is reported.
#[test]
fn an_external_ip_claiming_kube_dns_cluster_ip_does_not_take_dns_over() {
    let mut cluster = Cluster::new(&["kube-dns", "attacker"]);
    cluster.write_manifest(
        "kube-dns.yaml",
        &service("kube-system", "kube-dns", "10.96.0.53")
            .port("dns", "UDP", 53, POD_PORT)
            .to_yaml(),
    );
    cluster.write_manifest(
        "kube-dns-slice.yaml",
        &slice(
            "kube-system",
            "kube-dns-1",
            "kube-dns",
            &[(cluster.pod_ip("kube-dns"), true)],
        )
        .port("dns", "UDP", POD_PORT)
        .to_yaml(),
    );
    cluster.write_manifest(
        "attacker.yaml",
        &service("aaa", "attacker", "10.96.0.99")
            .port("dns", "UDP", 53, POD_PORT)
            .external_ips(["10.96.0.53"])
            .to_yaml(),
    );
    cluster.write_manifest(
        "attacker-slice.yaml",
        &slice(
            "aaa",
            "attacker-1",
            "attacker",
            &[(cluster.pod_ip("attacker"), true)],
        )
        .port("dns", "UDP", POD_PORT)
        .to_yaml(),
    );
    cluster.start_agent();
    cluster
        .agent()
        .wait_for_log("Service aaa/attacker", Duration::from_secs(5));
    let log = cluster.agent().log();
    assert!(
        log.lines().any(|l| l.contains("Service aaa/attacker")
            && l.contains("10.96.0.53:53/UDP")
            && l.contains("kube-system/kube-dns")),
        "the losing claim is reported by name:\n{log}"
    );
    let dns = cluster.probe(&["udp", "10.96.0.53:53", "--count", "50"]);
    assert_eq!(
        dns.replies.get("kube-dns"),
        Some(&50),
        "DNS keeps reaching kube-dns: {dns:?}"
    );
    let own = cluster.probe(&["udp", "10.96.0.99:53", "--count", "5"]);
    assert_eq!(own.replies.get("attacker"), Some(&5), "{own:?}");
}

/// Problems of every frontend kind reach the log with the Service's name and are counted:
/// an impossible nodePort (invalid_object), an IPv6 externalIP (unsupported).
#[test]
fn node_port_and_external_ip_problems_are_named_in_the_log_and_counted() {
    let mut cluster = Cluster::new(&["pod-a"]);
    web(&cluster, &["pod-a"]);
    cluster.write_manifest(
        "odd.yaml",
        &http_service("odd", "10.96.0.12")
            .service_type("NodePort")
            .node_port(70000)
            .external_ips(["2001:db8::10", "not-an-ip"])
            .to_yaml(),
    );
    cluster.start_agent();
    let agent = cluster.agent();
    agent.wait_for_log("nodePort 70000", Duration::from_secs(5));
    let log = agent.log();
    for needle in ["nodePort 70000", "2001:db8::10", "\"not-an-ip\""] {
        assert!(
            log.lines()
                .any(|l| l.contains("Service default/odd") && l.contains(needle)),
            "no line naming Service default/odd and {needle}:\n{log}"
        );
    }
    let metrics = agent.logged_address("metrics_addr");
    let (_, text) = http_get(&metrics, "/metrics");
    let errors = |kind: &str| {
        text.lines()
            .find(|l| l.starts_with(&format!("lb_errors_total{{kind=\"{kind}\"}}")))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    assert_eq!(errors("invalid_object"), 2, "{text}");
    assert_eq!(errors("unsupported"), 1, "{text}");
    // The rest of the Service is served: its ClusterIP answers.
    let ok = cluster.probe(&["tcp", TCP_VIP, "--count", "3"]);
    assert_eq!(ok.replies.get("pod-a"), Some(&3), "{ok:?}");
}

/// Mounts the cluster's bpffs and pins a hash map `name` (8-byte keys, 12-byte values, 16
/// entries) in its maps directory, as `bpftool` or an older agent would have left it.
fn pin_foreign_map(cluster: &Cluster, name: &str) -> std::path::PathBuf {
    let root = cluster.bpffs.path().to_owned();
    std::fs::create_dir_all(&root).unwrap();
    if !cluster.bpffs.is_mounted() {
        let mounted = std::process::Command::new("mount")
            .args(["-t", "bpf", "bpf"])
            .arg(&root)
            .status()
            .expect("mount");
        assert!(mounted.success());
    }
    std::fs::create_dir_all(root.join("maps")).unwrap();
    let pin = root.join("maps").join(name);
    let created = std::process::Command::new("bpftool")
        .args(["map", "create"])
        .arg(&pin)
        .args([
            "type", "hash", "key", "8", "value", "12", "entries", "16", "name", name,
        ])
        .status()
        .expect("bpftool (Debian package bpftool)");
    assert!(created.success());
    pin
}

/// The capacity `lb-agent status` reads from the map pinned as `name`.
fn pinned_capacity(cluster: &Cluster, name: &str) -> u64 {
    let bpffs = cluster.bpffs.path().display().to_string();
    let status: serde_json::Value =
        serde_json::from_str(&cluster.agent_command(&["status", "--bpffs", &bpffs, "-o", "json"]))
            .unwrap();
    status["maps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == name)
        .and_then(|m| m["capacity"].as_u64())
        .unwrap_or_else(|| panic!("no map {name} pinned: {status}"))
}

/// `lb_service_forwarded_total` of `service` in a `/metrics` answer (0 when absent).
fn forwarded(metrics: &str, service: &str) -> u64 {
    metrics
        .lines()
        .find(|l| {
            l.starts_with("lb_service_forwarded_total")
                && l.contains(&format!("name=\"{service}\""))
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// The pins under the agent's maps directory, by name.
fn pinned_maps(cluster: &Cluster) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(cluster.bpffs.path().join("maps"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn a_raised_max_services_migrates_the_pinned_maps_without_a_failed_connection() {
    let mut cluster = Cluster::new(&["pod-a", "pod-b"]);
    web(&cluster, &["pod-a", "pod-b"]);
    cluster.write_manifest("dns.yaml", &dns_service().to_yaml());
    dns_slice(&cluster, &["pod-a"]);
    cluster.start_agent();
    assert_eq!(pinned_capacity(&cluster, "LB4_FRONT_V2"), 65_536);
    let steady = cluster.probe_in_background(&[
        "tcp",
        TCP_VIP,
        "--duration-ms",
        "4000",
        "--interval-ms",
        "2",
    ]);
    // A socket open across the migration: its entry is carried, so its replies keep coming
    // from the ClusterIP.
    let open = cluster.probe_in_background(&[
        "udp",
        "10.96.0.53:53",
        "--connected",
        "--duration-ms",
        "4000",
        "--interval-ms",
        "20",
    ]);

    std::thread::sleep(Duration::from_millis(500));
    let metrics = cluster.agent().logged_address("metrics_addr");
    let forwarded_before = forwarded(&http_get(&metrics, "/metrics").1, "web");
    assert!(forwarded_before > 0, "traffic before the restart");
    cluster.agent().terminate();
    // The services limit sizes agent-written hash maps; the reverse-translation map is an LRU
    // map the programs fill (one entry per connected socket).
    cluster.start_agent_with(&["--max-services", "70000", "--max-revnat", "300000"]);

    // The maps the limits size are new, with what the old ones held.
    assert_eq!(pinned_capacity(&cluster, "LB4_FRONT_V2"), 70_000);
    assert_eq!(pinned_capacity(&cluster, "LB4_REVNAT_V2"), 300_000);
    assert_eq!(pinned_capacity(&cluster, "LB4_STATS_V2"), 70_000);
    assert_eq!(pinned_capacity(&cluster, "LB4_NAMES_V2"), 70_000);
    assert_eq!(
        pinned_capacity(&cluster, "LB4_BACKEND_V2"),
        262_144,
        "untouched"
    );
    let log = cluster.agent().log();
    let migrated = log
        .lines()
        .find(|l| l.contains("map LB4_FRONT_V2 migrated"))
        .unwrap_or_else(|| panic!("no migration logged:\n{log}"));
    assert!(
        migrated.contains("65536 entries") && migrated.contains("70000 entries"),
        "old and new shape: {migrated}"
    );
    assert!(
        migrated.contains("2 entries carried over"),
        "the two frontends (web, dns): {migrated}"
    );
    let revnat = log
        .lines()
        .find(|l| l.contains("map LB4_REVNAT_V2 migrated"))
        .unwrap_or_else(|| panic!("no migration logged:\n{log}"));
    assert!(
        revnat.contains("LruHash") && !revnat.contains(" 0 entries carried"),
        "the open socket's entry: {revnat}"
    );
    assert!(
        !log.contains("map LB4_BACKEND_V2 migrated"),
        "a map of the same shape is reused:\n{log}"
    );
    assert!(
        log.contains("adopted maps pinned by an earlier agent"),
        "the reconciler adopts the carried entries:\n{log}"
    );
    // Once the new programs are linked the old maps' pins go.
    cluster.agent().wait_for_log(
        "removed a map pinned by an earlier version",
        Duration::from_secs(3),
    );
    let pins = pinned_maps(&cluster);
    assert!(
        pins.iter().all(|name| !name.ends_with("-old")),
        "old pins left: {pins:?}"
    );
    for line in cluster.agent().log().lines() {
        if line.contains("migrated")
            || line.contains("earlier version")
            || line.contains("meanwhile")
        {
            eprintln!("{line}");
        }
    }
    let metrics = cluster.agent().logged_address("metrics_addr");
    let (_, text) = http_get(&metrics, "/metrics");
    assert!(
        text.contains("lb_map_capacity{map=\"LB4_FRONT_V2\"} 70000"),
        "the real capacity:\n{text}"
    );
    // The per-CPU counters came along (one value per possible CPU).
    assert!(
        forwarded(&text, "web") >= forwarded_before,
        "{forwarded_before} before:\n{text}"
    );

    let steady = finish_probe(steady);
    assert!(steady.attempts > 200, "{steady:?}");
    assert_eq!(
        steady.failures(),
        0,
        "connections failed across the migration: {steady:?}"
    );
    assert_eq!(steady.replies.len(), 2, "both backends served: {steady:?}");
    eprintln!("across the migration: {steady:?}");
    let open = finish_probe(open);
    assert_eq!(open.failures(), 0, "{open:?}");
    assert_eq!(
        open.peers.get("10.96.0.53:53"),
        Some(&open.attempts),
        "the open socket's peer stays the ClusterIP: {open:?}"
    );

    // The new maps are the ones programmed from now on.
    web(&cluster, &["pod-b"]);
    // pod-b served before too: wait until pod-a is gone from the answers.
    let deadline = Instant::now() + Duration::from_secs(5);
    while cluster
        .probe(&["tcp", TCP_VIP, "--count", "10"])
        .replies
        .get("pod-b")
        != Some(&10)
    {
        assert!(
            Instant::now() < deadline,
            "pod-a still answers\n{}",
            cluster.agent().log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let after = cluster.probe(&["tcp", TCP_VIP, "--count", "20"]);
    assert_eq!(after.replies.get("pod-b"), Some(&20), "{after:?}");

    // And a start with the same flags reuses them as they are.
    cluster.agent().terminate();
    cluster.start_agent_with(&["--max-services", "70000", "--max-revnat", "300000"]);
    let log = cluster.agent().log();
    assert!(!log.contains("migrated"), "nothing to migrate:\n{log}");
    assert_eq!(pinned_capacity(&cluster, "LB4_FRONT_V2"), 70_000);
}

#[test]
fn a_pinned_map_of_another_layout_is_replaced_and_rebuilt_from_the_source() {
    let mut cluster = Cluster::new(&["pod-a"]);
    web(&cluster, &["pod-a"]);
    // A map pinned under the frontends map's name with a smaller value (16 bytes now: a
    // layout change without a rename), holding an entry of its own.
    let pin = pin_foreign_map(&cluster, "LB4_FRONT_V2");
    let updated = std::process::Command::new("bpftool")
        .args(["map", "update", "pinned"])
        .arg(&pin)
        .args(["key", "hex", "0a", "60", "00", "0b", "00", "50", "06", "00"])
        .args(["value", "hex"])
        .args(["01"; 12])
        .status()
        .expect("bpftool");
    assert!(updated.success());
    // The sockets map of the layout before LB4_REVNAT_V2: renamed, so only removed.
    let renamed = pin_foreign_map(&cluster, "LB4_REVNAT");

    cluster.start_agent();

    let log = cluster.agent().log();
    let migrated = log
        .lines()
        .find(|l| l.contains("map LB4_FRONT_V2 migrated"))
        .unwrap_or_else(|| panic!("no migration logged:\n{log}"));
    assert!(
        migrated.contains("value 12 B") && migrated.contains("rebuilt from the source"),
        "{migrated}"
    );
    assert!(
        !log.contains("adopted maps pinned by an earlier agent"),
        "nothing of the other layout is adopted:\n{log}"
    );
    assert_eq!(pinned_capacity(&cluster, "LB4_FRONT_V2"), 65_536);
    let served = cluster.probe(&["tcp", TCP_VIP, "--count", "5"]);
    assert_eq!(served.replies.get("pod-a"), Some(&5), "{served:?}");
    let bpffs = cluster.bpffs.path().display().to_string();
    let list = cluster.agent_command(&["list", "--bpffs", &bpffs]);
    assert_eq!(
        list.lines().filter(|l| l.contains("ClusterIP")).count(),
        1,
        "only the source's service:\n{list}"
    );
    cluster.agent().wait_for_log(
        "removed a map pinned by an earlier version",
        Duration::from_secs(3),
    );
    assert!(
        !cluster.bpffs.path().join("maps/LB4_FRONT_V2-old").exists(),
        "{:?}",
        pinned_maps(&cluster)
    );
    assert!(
        !renamed.exists(),
        "a map of an earlier version's name goes: {:?}",
        pinned_maps(&cluster)
    );
}

/// This node's Node as a manifest, with the cluster autoscaler's taint or without.
fn node_manifest(to_be_deleted: bool) -> String {
    let taints = if to_be_deleted {
        "  taints:\n  - key: ToBeDeletedByClusterAutoscaler\n    value: \"1700000000\"\n    effect: NoSchedule\n"
    } else {
        "  taints: []\n"
    };
    format!("apiVersion: v1\nkind: Node\nmetadata:\n  name: {NODE}\nspec:\n{taints}")
}

/// Polls `path` until it answers `status`; returns the body.
fn wait_for_status(address: &str, path: &str, status: u16) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (got, body) = http_get(address, path);
        if got == status {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "{path} answers {got}, not {status}: {body}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Node eligibility from the manifest directory, as kube-proxy takes it from the API server:
/// this node's Node tainted `ToBeDeletedByClusterAutoscaler` turns `/healthz` 503 (the data
/// path keeps serving, `/livez` stays 200), the taint removed turns it 200 again.
#[test]
fn healthz_follows_the_node_manifests_autoscaler_taint() {
    let mut cluster = Cluster::new(&["pod-a"]);
    web(&cluster, &["pod-a"]);
    cluster.write_manifest("node.yaml", &node_manifest(false));
    cluster.start_agent();
    let healthz = cluster.agent().healthz_addr.unwrap().to_string();
    let (status, body) = http_get(&healthz, "/healthz");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"nodeEligible\":true"), "{body}");

    cluster.write_manifest("node.yaml", &node_manifest(true));
    let body = wait_for_status(&healthz, "/healthz", 503);
    assert!(body.contains("\"nodeEligible\":false"), "{body}");
    assert_eq!(http_get(&healthz, "/livez").0, 200);
    let served = cluster.probe(&["tcp", TCP_VIP, "--count", "3"]);
    assert_eq!(served.replies.get("pod-a"), Some(&3), "{served:?}");
    let bpffs = cluster.bpffs.path().display().to_string();
    let status = cluster.agent_command(&["status", "--bpffs", &bpffs, "--healthz-addr", &healthz]);
    assert!(status.contains("unhealthy"), "{status}");
    assert!(status.contains("not eligible"), "{status}");

    cluster.write_manifest("node.yaml", &node_manifest(false));
    let body = wait_for_status(&healthz, "/healthz", 200);
    assert!(body.contains("\"nodeEligible\":true"), "{body}");
}

#[test]
fn metrics_and_healthz_are_each_turned_off_on_their_own() {
    let mut cluster = Cluster::new(&["pod-a"]);
    web(&cluster, &["pod-a"]);

    cluster.start_agent_serving("off", "127.0.0.1:0", &[]);
    let agent = cluster.agent();
    assert_eq!(agent.logged_address("metrics_addr"), "off");
    let healthz = agent.logged_address("healthz_addr");
    let (status, body) = http_get(&healthz, "/healthz");
    assert_eq!(status, 200, "{body}");
    assert_eq!(http_get(&healthz, "/livez").0, 200);
    assert_eq!(
        agent.listening(),
        vec![healthz.parse().unwrap()],
        "only /healthz listens"
    );
    agent.terminate();

    cluster.start_agent_serving("127.0.0.1:0", "off", &[]);
    let agent = cluster.agent();
    assert_eq!(agent.logged_address("healthz_addr"), "off");
    let metrics = agent.logged_address("metrics_addr");
    let (status, text) = http_get(&metrics, "/metrics");
    assert_eq!(status, 200);
    assert!(text.contains("lb_services 1"), "{text}");
    assert_eq!(
        agent.listening(),
        vec![metrics.parse().unwrap()],
        "only /metrics listens"
    );
    let served = cluster.probe(&["tcp", TCP_VIP, "--count", "3"]);
    assert_eq!(served.replies.get("pod-a"), Some(&3), "{served:?}");
}

/// Entries of the pinned IPv4 sockets map.
fn socket_entries(cluster: &Cluster) -> usize {
    socket_entries_of::<lb_common::Addr4>(cluster, lb_common::map_names::REVNAT_V4)
}

/// Entries of the pinned sockets map `name` of the family of `A`.
fn socket_entries_of<A>(cluster: &Cluster, name: &str) -> usize
where
    lb_common::SockValue<A>: aya::Pod,
{
    let path = cluster.bpffs.path().join("maps").join(name);
    let data = aya::maps::MapData::from_pin(&path).expect("the pinned sockets map");
    let map: aya::maps::HashMap<_, u64, lb_common::SockValue<A>> =
        aya::maps::HashMap::try_from(aya::maps::Map::LruHashMap(data)).expect("an LRU hash");
    map.keys().filter_map(Result::ok).count()
}

#[test]
fn a_closed_socket_leaves_nothing_in_the_sockets_map() {
    let mut cluster = Cluster::new(&["pod-a", "pod-b"]);
    web(&cluster, &["pod-a", "pod-b"]);
    cluster.write_manifest("dns.yaml", &dns_service().to_yaml());
    dns_slice(&cluster, &["pod-a"]);
    cluster.start_agent();
    let baseline = socket_entries(&cluster);

    let tcp = cluster.probe(&["tcp", TCP_VIP, "--count", "10000"]);
    assert_eq!(tcp.failures(), 0, "{tcp:?}");
    let udp = cluster.probe(&[
        "udp",
        "10.96.0.53:53",
        "--count",
        "200",
        "--new-socket-each",
    ]);
    assert_eq!(udp.failures(), 0, "{udp:?}");
    let after = socket_entries(&cluster);
    assert_eq!(
        after, baseline,
        "10,000 TCP and 200 UDP sockets closed: their entries went with them"
    );

    // A socket that is still open keeps its entry (getpeername needs it).
    let open = cluster.probe_in_background(&[
        "udp",
        "10.96.0.53:53",
        "--connected",
        "--duration-ms",
        "1500",
        "--interval-ms",
        "100",
    ]);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(socket_entries(&cluster), baseline + 1);
    let result = finish_probe(open);
    assert_eq!(result.failures(), 0, "{result:?}");
    assert_eq!(socket_entries(&cluster), baseline);
}

#[test]
fn a_connected_udp_socket_of_a_removed_backend_is_destroyed_and_reconnects_to_a_live_one() {
    let mut cluster = dns_cluster();
    dns_slice(&cluster, &["dns-a"]);
    cluster.start_agent();
    udp_until_only_from(&cluster, "dns-a");

    // One connected socket, reopened after an error as an application would. dns-a leaves
    // the service but keeps answering at its own address: without the socket's destruction
    // the socket would stay on it for good.
    let running = cluster.probe_in_background(&[
        "udp",
        "10.96.0.53:53",
        "--connected",
        "--reopen-on-error",
        "--duration-ms",
        "3000",
        "--interval-ms",
        "10",
        "--timeout-ms",
        "200",
    ]);
    std::thread::sleep(Duration::from_millis(800));
    dns_slice(&cluster, &["dns-b"]);
    let result = finish_probe(running);
    let to_b = result.replies.get("dns-b").copied().unwrap_or(0);
    assert!(
        result.replies.get("dns-a").is_some_and(|n| *n > 0) && to_b > 0,
        "the socket moved: {result:?}\n{}",
        cluster.agent().log()
    );
    // ~2.2 s after the change at one request per ~10 ms: it moved within about a second.
    assert!(to_b >= 60, "moved late: {result:?}");
    assert!(
        cluster
            .agent()
            .log()
            .contains("destroyed the sockets of removed backends"),
        "{}",
        cluster.agent().log()
    );
    // `lb-agent status` says how.
    let healthz = cluster.agent().healthz_addr.unwrap().to_string();
    let bpffs = cluster.bpffs.path().display().to_string();
    let status = cluster.agent_command(&["status", "--bpffs", &bpffs, "--healthz-addr", &healthz]);
    assert!(
        status.contains("sockets of removed backends: destroyed through netlink SOCK_DESTROY"),
        "{status}"
    );
}

/// A TCP connection held open to pod-a while pod-a leaves the service (and keeps serving
/// at its own address); how it ended.
fn held_tcp_connection_when_its_backend_goes(extra: &[&str]) -> (common::ProbeResult, String) {
    let mut cluster = Cluster::new(&["pod-a", "pod-b"]);
    web(&cluster, &["pod-a"]);
    cluster.start_agent_with(extra);
    let held = cluster.probe_in_background(&["tcp", TCP_VIP, "--hold-ms", "1500"]);
    std::thread::sleep(Duration::from_millis(500));
    web(&cluster, &["pod-b"]);
    let result = finish_probe(held);
    let log = cluster.agent().log();
    (result, log)
}

#[test]
fn tcp_connections_of_a_removed_backend_are_destroyed_only_with_terminate_tcp() {
    let (kept, _) = held_tcp_connection_when_its_backend_goes(&[]);
    assert_eq!(
        kept.errors.get("timeout"),
        Some(&1),
        "without --terminate-tcp the connection stays: {kept:?}"
    );
    let (destroyed, log) = held_tcp_connection_when_its_backend_goes(&["--terminate-tcp"]);
    assert_eq!(
        destroyed.errors.get("reset"),
        Some(&1),
        "aborted: {destroyed:?}\n{log}"
    );
}

// ---- AF_INET6 sockets: IPv4 services through IPv4-mapped addresses ----

/// `addr` (IP:PORT) as an `AF_INET6` socket names it: `[::ffff:IP]:PORT`.
fn mapped(addr: &str) -> String {
    let addr: std::net::SocketAddrV4 = addr.parse().expect("an IPv4 IP:PORT");
    std::net::SocketAddrV6::new(addr.ip().to_ipv6_mapped(), addr.port(), 0, 0).to_string()
}

#[test]
fn an_af_inet6_tcp_socket_reaches_an_ipv4_service_at_its_mapped_address_and_sees_it_mapped() {
    let mut cluster = Cluster::new(&["pod-a", "pod-b"]);
    web(&cluster, &["pod-a", "pod-b"]);
    cluster.start_agent();

    let target = mapped(TCP_VIP);
    let result = cluster.probe(&["tcp", &target, "--count", "40", "--timeout-ms", "2000"]);

    assert_eq!(result.failures(), 0, "{result:?}");
    assert_eq!(result.replies.values().sum::<u64>(), 40, "{result:?}");
    assert_eq!(result.replies.len(), 2, "both backends answer: {result:?}");
    assert_eq!(
        result.peers.get(&target),
        Some(&40),
        "getpeername shows the mapped ClusterIP: {result:?}"
    );
    // The pod saw the client's own IPv4 address: the connection went out as IPv4.
    let whoami = cluster.probe(&["tcp", &target, "--whoami"]);
    let seen = whoami.replies.keys().next().expect("a reply");
    assert!(
        seen.starts_with(&format!("{}:", cluster.client.ip)),
        "{whoami:?}"
    );
}

#[test]
fn af_inet6_udp_sockets_reach_an_ipv4_service_at_its_mapped_address_and_replies_show_it_mapped() {
    let mut cluster = dns_cluster();
    cluster.start_agent();
    let target = mapped("10.96.0.53:53");

    // Connected: connect6 translates, getpeername6 shows the service.
    let connected = cluster.probe(&["udp", &target, "--connected", "--count", "20"]);
    assert_eq!(connected.failures(), 0, "{connected:?}");
    assert_eq!(
        connected.replies.len(),
        1,
        "one socket, one backend: {connected:?}"
    );
    assert_eq!(connected.peers.get(&target), Some(&20), "{connected:?}");

    // Unconnected: the kernel runs sendmsg4 for a mapped destination, recvmsg6 shows the
    // reply's source as the mapped service; one socket stays on one backend.
    let one = cluster.probe(&["udp", &target, "--count", "20"]);
    assert_eq!(one.failures(), 0, "{one:?}");
    assert_eq!(one.replies.len(), 1, "one socket, one backend: {one:?}");
    assert_eq!(
        one.peers.get(&target),
        Some(&20),
        "recvfrom shows the mapped ClusterIP: {one:?}"
    );
    let many = cluster.probe(&["udp", &target, "--count", "60", "--new-socket-each"]);
    assert_eq!(many.failures(), 0, "{many:?}");
    assert_eq!(many.replies.len(), 2, "separate sockets spread: {many:?}");
    assert_eq!(many.peers.get(&target), Some(&60), "{many:?}");
}

#[test]
fn an_ipv4_service_without_endpoints_refuses_af_inet6_sockets_at_its_mapped_address() {
    let mut cluster = Cluster::new(&["pod-a"]);
    cluster.write_manifest("web.yaml", &web_service().to_yaml());
    cluster.write_manifest("dns.yaml", &dns_service().to_yaml());
    cluster.start_agent();

    let started = Instant::now();
    let tcp = cluster.probe(&[
        "tcp",
        &mapped(TCP_VIP),
        "--count",
        "3",
        "--timeout-ms",
        "3000",
    ]);
    let target = mapped("10.96.0.53:53");
    let connected = cluster.probe(&["udp", &target, "--connected", "--count", "3"]);
    let unconnected = cluster.probe(&["udp", &target, "--count", "3", "--timeout-ms", "3000"]);
    let elapsed = started.elapsed();

    assert_eq!(tcp.errors.get("refused"), Some(&3), "TCP: {tcp:?}");
    assert_eq!(connected.errors.get("refused"), Some(&3), "{connected:?}");
    assert_eq!(
        unconnected.errors.get("refused"),
        Some(&3),
        "{unconnected:?}"
    );
    assert!(
        elapsed < Duration::from_secs(2),
        "refusals must not wait for a timeout: {elapsed:?}"
    );
}

// ---- IPv6 services at the socket, programmed by the test ----
//
// The agent's model has no IPv6 Services on this branch yet: these tests give the pods IPv6
// addresses and write the IPv6 maps (`LB6_*`, and the shared slots) themselves, as the agent
// will, after it started with no services. The agent leaves entries of service ids it does
// not know alone once it runs (it adopts the pinned maps only at start).

/// The IPv6 ClusterIP of the tests' IPv6 services.
const VIP6: std::net::Ipv6Addr = std::net::Ipv6Addr::new(0xfd00, 0x10, 0x96, 0, 0, 0, 0, 0xa);
/// Service and backend ids far above the ones the agent hands out to the manifests' services.
const SERVICE6_ID: u32 = 40_000;

/// `[addr]:port`.
fn at6(addr: std::net::Ipv6Addr, port: u16) -> String {
    std::net::SocketAddrV6::new(addr, port, 0, 0).to_string()
}

/// A dual-stack cluster (`Cluster::dual_stack`: the node bridge, client and backend pods have
/// IPv6 addresses too, each backend answering with its name on both families), the agent
/// started with no services.
fn ipv6_cluster(backends: &[&str]) -> Cluster {
    let mut cluster = Cluster::dual_stack(backends);
    cluster.start_agent();
    cluster
}

/// The pinned IPv6 service maps of a cluster's agent, written as the agent will.
struct Maps6 {
    frontends:
        aya::maps::HashMap<aya::maps::MapData, lb_common::Frontend6Key, lb_common::FrontendValue>,
    slots: aya::maps::HashMap<aya::maps::MapData, lb_common::SlotKey, lb_common::SlotValue>,
    backends: aya::maps::HashMap<aya::maps::MapData, u32, lb_common::Backend6>,
    node_addrs: aya::maps::HashMap<aya::maps::MapData, lb_common::Addr6, u32>,
    source_ranges: aya::maps::LpmTrie<aya::maps::MapData, lb_common::SourceRange6Key, u8>,
}

impl Maps6 {
    fn open(cluster: &Cluster) -> Maps6 {
        use lb_common::map_names;
        let data = |name: &str| {
            let path = cluster.bpffs.path().join("maps").join(name);
            aya::maps::MapData::from_pin(&path)
                .unwrap_or_else(|e| panic!("opening pinned {}: {e}", path.display()))
        };
        let hash = |name: &str| aya::maps::Map::HashMap(data(name));
        Maps6 {
            frontends: hash(map_names::FRONTENDS_V6).try_into().unwrap(),
            slots: hash(map_names::SLOTS_V4).try_into().unwrap(),
            backends: hash(map_names::BACKENDS_V6).try_into().unwrap(),
            node_addrs: hash(map_names::NODE_ADDRS_V6).try_into().unwrap(),
            source_ranges: aya::maps::Map::LpmTrie(data(map_names::SOURCE_RANGES_V6))
                .try_into()
                .unwrap(),
        }
    }

    /// Service `id` at `addr`:`port`/`proto`, a frontend of `kind` with `flags`, over the
    /// backends `(id, address)` at `POD_PORT`.
    #[allow(clippy::too_many_arguments)]
    fn service(
        &mut self,
        id: u32,
        kind: u8,
        flags: u8,
        addr: std::net::Ipv6Addr,
        port: u16,
        proto: u8,
        backends: &[(u32, std::net::Ipv6Addr)],
    ) {
        use lb_common::MapAddr as _;
        for (index, (backend_id, backend)) in backends.iter().enumerate() {
            let value = lb_common::Backend6 {
                addr: lb_common::Addr6::from_ip(*backend),
                port: lb_common::port_to_map(POD_PORT),
                state: lb_common::backend_states::ACTIVE,
                flags: 0,
            };
            self.backends.insert(backend_id, value, 0).unwrap();
            let slot = lb_common::SlotKey {
                service_id: id,
                index: index as u16,
                generation: 0,
                pad: 0,
            };
            let slot_value = lb_common::SlotValue {
                backend_id: *backend_id,
            };
            self.slots.insert(slot, slot_value, 0).unwrap();
        }
        let key = lb_common::Frontend6Key {
            addr: lb_common::Addr6::from_ip(addr),
            port: lb_common::port_to_map(port),
            proto,
            scope: lb_common::scopes::EXTERNAL,
        };
        let value = lb_common::FrontendValue {
            service_id: id,
            count: backends.len() as u16,
            kind,
            flags,
            ..Default::default()
        };
        self.frontends.insert(key, value, 0).unwrap();
    }

    /// A ClusterIP service `id` at `VIP6`:`port`/`proto` over `backends`.
    fn cluster_ip(
        &mut self,
        id: u32,
        port: u16,
        proto: u8,
        backends: &[(u32, std::net::Ipv6Addr)],
    ) {
        let kind = lb_common::frontend_kinds::CLUSTER_IP;
        self.service(id, kind, 0, VIP6, port, proto, backends);
    }
}

/// The IPv6 backends of `pods`: (backend id, address).
fn backends6(cluster: &Cluster, pods: &[&str]) -> Vec<(u32, std::net::Ipv6Addr)> {
    pods.iter()
        .enumerate()
        .map(|(i, pod)| (SERVICE6_ID + 100 + i as u32, cluster.pod_ip6(pod)))
        .collect()
}

#[test]
fn ipv6_tcp_and_udp_sockets_reach_an_ipv6_cluster_ip_and_see_it_as_their_peer() {
    let cluster = ipv6_cluster(&["pod-a", "pod-b"]);
    let mut maps = Maps6::open(&cluster);
    let backends = backends6(&cluster, &["pod-a", "pod-b"]);
    maps.cluster_ip(SERVICE6_ID, 80, lb_common::IPPROTO_TCP, &backends);
    maps.cluster_ip(SERVICE6_ID + 1, 53, lb_common::IPPROTO_UDP, &backends);

    let tcp_vip = at6(VIP6, 80);
    let tcp = cluster.probe(&["tcp", &tcp_vip, "--count", "40", "--timeout-ms", "2000"]);
    assert_eq!(tcp.failures(), 0, "{tcp:?}");
    assert_eq!(tcp.replies.len(), 2, "both backends answer: {tcp:?}");
    assert_eq!(tcp.peers.get(&tcp_vip), Some(&40), "getpeername: {tcp:?}");
    let whoami = cluster.probe(&["tcp", &tcp_vip, "--whoami"]);
    let client = format!("[{}]:", cluster.client_ip6());
    assert!(
        whoami.replies.keys().all(|seen| seen.starts_with(&client)),
        "the pod sees the client's own IPv6 address: {whoami:?}"
    );

    let udp_vip = at6(VIP6, 53);
    let connected = cluster.probe(&["udp", &udp_vip, "--connected", "--count", "20"]);
    assert_eq!(connected.failures(), 0, "{connected:?}");
    assert_eq!(connected.replies.len(), 1, "{connected:?}");
    assert_eq!(
        connected.peers.get(&udp_vip),
        Some(&20),
        "getpeername: {connected:?}"
    );
    let one = cluster.probe(&["udp", &udp_vip, "--count", "20"]);
    assert_eq!(one.failures(), 0, "{one:?}");
    assert_eq!(one.replies.len(), 1, "one socket, one backend: {one:?}");
    assert_eq!(one.peers.get(&udp_vip), Some(&20), "recvfrom: {one:?}");
    let many = cluster.probe(&["udp", &udp_vip, "--count", "60", "--new-socket-each"]);
    assert_eq!(many.failures(), 0, "{many:?}");
    assert_eq!(many.replies.len(), 2, "separate sockets spread: {many:?}");
    assert_eq!(many.peers.get(&udp_vip), Some(&60), "{many:?}");
}

/// What `lb-probe bind` printed.
#[derive(Debug, serde::Deserialize)]
struct Bound {
    bound: bool,
    errno: Option<i32>,
}

/// Binds `proto` `address` with a process of the node (the agent's network namespace, in
/// the test cgroup) and releases it again.
fn bind_on_node(cluster: &Cluster, proto: &str, address: &str) -> Bound {
    let args = ["bind", proto, address];
    let child = lb_testkit::spawn_in(None, Some(&cluster.cgroup), &*common::PROBE, &args)
        .expect("starting lb-probe bind");
    let output = child.wait_with_output().expect("waiting for lb-probe bind");
    serde_json::from_slice(&output.stdout).expect("lb-probe bind prints JSON")
}

#[test]
fn ipv6_refusals_node_ports_source_ranges_and_bind_protection_at_the_socket() {
    let cluster = ipv6_cluster(&["pod-a"]);
    let mut maps = Maps6::open(&cluster);
    let backends = backends6(&cluster, &["pod-a"]);
    let node_port: u16 = 30_000 + (std::process::id() % 2_000) as u16;
    let bind_at = at6(std::net::Ipv6Addr::UNSPECIFIED, node_port);
    assert!(
        bind_on_node(&cluster, "tcp", &bind_at).bound,
        "{bind_at} binds before the service"
    );

    // No backend: refused at once, TCP and UDP.
    maps.cluster_ip(SERVICE6_ID, 81, lb_common::IPPROTO_TCP, &[]);
    maps.cluster_ip(SERVICE6_ID + 1, 54, lb_common::IPPROTO_UDP, &[]);
    let started = Instant::now();
    let tcp = cluster.probe(&[
        "tcp",
        &at6(VIP6, 81),
        "--count",
        "3",
        "--timeout-ms",
        "3000",
    ]);
    let udp = cluster.probe(&[
        "udp",
        &at6(VIP6, 54),
        "--count",
        "3",
        "--timeout-ms",
        "3000",
    ]);
    assert_eq!(tcp.errors.get("refused"), Some(&3), "TCP: {tcp:?}");
    assert_eq!(udp.errors.get("refused"), Some(&3), "UDP: {udp:?}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );

    // A NodePort at the node's IPv6 address (LB6_NODEADDR), from a pod.
    use lb_common::MapAddr as _;
    let node = lb_testkit::BRIDGE_IP6;
    maps.node_addrs
        .insert(lb_common::Addr6::from_ip(node), 1, 0)
        .unwrap();
    let kind = lb_common::frontend_kinds::NODE_PORT;
    let unspecified = std::net::Ipv6Addr::UNSPECIFIED;
    let tcp = lb_common::IPPROTO_TCP;
    maps.service(
        SERVICE6_ID + 2,
        kind,
        0,
        unspecified,
        node_port,
        tcp,
        &backends,
    );
    let reached = cluster.probe(&["tcp", &at6(node, node_port), "--count", "5"]);
    assert_eq!(reached.replies.get("pod-a"), Some(&5), "{reached:?}");

    // Bind protection: the node's own socket cannot take the served NodePort; UDP can.
    let refused = bind_on_node(&cluster, "tcp", &bind_at);
    assert!(
        !refused.bound && refused.errno == Some(libc::EADDRINUSE),
        "binding {bind_at}: {refused:?}"
    );
    assert!(
        bind_on_node(&cluster, "udp", &bind_at).bound,
        "UDP {bind_at}"
    );

    // loadBalancerSourceRanges: a LoadBalancer IP whose ranges leave pods out refuses an
    // unbound pod socket with EPERM; one bound to an allowed source gets through.
    let lb_ip = std::net::Ipv6Addr::new(0xfd00, 0x20, 0, 0, 0, 0, 0, 0x1);
    let kind = lb_common::frontend_kinds::LOAD_BALANCER;
    let flags = lb_common::frontend_flags::SOURCE_RANGES;
    let udp = lb_common::IPPROTO_UDP;
    maps.service(SERVICE6_ID + 3, kind, flags, lb_ip, 53, udp, &backends);
    let target = at6(lb_ip, 53);
    let filtered = cluster.probe(&["udp", &target, "--count", "2"]);
    assert_eq!(filtered.errors.get("permission"), Some(&2), "{filtered:?}");
    let client = cluster.client_ip6();
    let source = client.to_string();
    let bound = cluster.probe(&["udp", &target, "--source", &source, "--count", "2"]);
    assert_eq!(
        bound.errors.get("permission"),
        Some(&2),
        "not in the ranges: {bound:?}"
    );
    let allowed =
        lb_common::SourceRange6Key::new(SERVICE6_ID + 3, lb_common::Addr6::from_ip(client));
    maps.source_ranges
        .insert(&aya::maps::lpm_trie::Key::new(32 + 128, allowed), 1, 0)
        .unwrap();
    let bound = cluster.probe(&["udp", &target, "--source", &source, "--count", "2"]);
    assert_eq!(
        bound.replies.get("pod-a"),
        Some(&2),
        "in the ranges: {bound:?}"
    );
}

#[test]
fn closed_af_inet6_sockets_leave_nothing_in_either_sockets_map() {
    let cluster = ipv6_cluster(&["pod-a"]);
    let mut maps = Maps6::open(&cluster);
    let backends = backends6(&cluster, &["pod-a"]);
    maps.cluster_ip(SERVICE6_ID, 80, lb_common::IPPROTO_TCP, &backends);
    web(&cluster, &["pod-a"]);
    let mapped_vip = mapped(TCP_VIP);
    cluster.tcp_until(&mapped_vip, Duration::from_secs(10), |r| {
        r.replies.contains_key("pod-a")
    });
    let entries = || {
        (
            socket_entries(&cluster),
            socket_entries_of::<lb_common::Addr6>(&cluster, lb_common::map_names::REVNAT_V6),
        )
    };
    let baseline = entries();

    let v6 = cluster.probe(&["tcp", &at6(VIP6, 80), "--count", "1000"]);
    assert_eq!(v6.failures(), 0, "{v6:?}");
    let v4 = cluster.probe(&["tcp", &mapped_vip, "--count", "1000"]);
    assert_eq!(v4.failures(), 0, "{v4:?}");
    assert_eq!(
        entries(),
        baseline,
        "1,000 IPv6 and 1,000 IPv4-mapped connections closed: their entries went with them"
    );

    // Open sockets keep theirs: an IPv6 one in the IPv6 map, a mapped one in the IPv4 map.
    let open = |target: &str| cluster.probe_in_background(&["tcp", target, "--hold-ms", "1200"]);
    let (held6, held4) = (open(&at6(VIP6, 80)), open(&mapped_vip));
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(entries(), (baseline.0 + 1, baseline.1 + 1));
    for held in [held6, held4] {
        let result = finish_probe(held);
        assert_eq!(
            result.errors.get("timeout"),
            Some(&1),
            "held open: {result:?}"
        );
    }
    assert_eq!(entries(), baseline);
}

/// The program id behind the cluster's pinned link of socket program `name`, if one is pinned.
fn attached_program_id(cluster: &Cluster, name: &str) -> Option<u32> {
    let links = cluster.bpffs.path().join("links");
    std::fs::read_dir(&links)
        .expect("reading the links directory")
        .map(|dir| dir.unwrap().path().join(name))
        .find(|pin| pin.exists())
        .map(|pin| lb_agent::dataplane::links::program_id_of(&pin).expect("reading a link"))
}

/// (run_time_ns, run_cnt) of program `id`, as the kernel counts them with BPF statistics on.
fn program_stats(id: u32) -> (u64, u64) {
    let info = aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .find(|p| p.id() == id)
        .unwrap_or_else(|| panic!("program {id} not loaded"));
    (info.run_time().as_nanos() as u64, info.run_count())
}

/// connect4 runs once per connect (its run count grows by the connects made) and costs what
/// the log line says: run_time_ns / run_cnt with BPF statistics on (`BPF_ENABLE_STATS`, for
/// as long as this test holds it), over connects to a ClusterIP, the reverse entry of each
/// socket written.
#[test]
fn connect4_runs_once_per_connect_and_its_cost_is_measured() {
    const CONNECTS: u64 = 3000;
    let mut cluster = Cluster::new(&["pod-a", "pod-b"]);
    web(&cluster, &["pod-a", "pod-b"]);
    cluster.start_agent();
    cluster.tcp_until(TCP_VIP, Duration::from_secs(10), |r| r.failures() == 0);
    let _stats = aya::sys::enable_stats(aya::sys::Stats::RunTime).expect("BPF_ENABLE_STATS");
    let connect4 = attached_program_id(&cluster, "connect4").expect("connect4 attached");
    let getpeername4 = attached_program_id(&cluster, "getpeername4").expect("getpeername4");
    let release = attached_program_id(&cluster, "sock_release");
    for round in 0..3 {
        let (time0, runs0) = program_stats(connect4);
        let (peer_time0, peer_runs0) = program_stats(getpeername4);
        let released0 = release.map(program_stats);
        let count = CONNECTS.to_string();
        let result = cluster.probe(&["tcp", TCP_VIP, "--count", &count]);
        let (time1, runs1) = program_stats(connect4);
        let (peer_time1, peer_runs1) = program_stats(getpeername4);
        eprintln!(
            "getpeername4, round {round}: {:.0} ns per call over {} calls",
            (peer_time1 - peer_time0) as f64 / (peer_runs1 - peer_runs0).max(1) as f64,
            peer_runs1 - peer_runs0
        );
        if let (Some(id), Some((t0, r0))) = (release, released0) {
            let (t1, r1) = program_stats(id);
            eprintln!(
                "sock_release, round {round}: {:.0} ns per release over {} releases",
                (t1 - t0) as f64 / (r1 - r0).max(1) as f64,
                r1 - r0
            );
        }
        assert_eq!(result.failures(), 0, "{result:?}");
        assert_eq!(
            result.peers.get(TCP_VIP),
            Some(&CONNECTS),
            "getpeername: {result:?}"
        );
        assert_eq!(runs1 - runs0, CONNECTS, "connect4 runs once per connect");
        eprintln!(
            "connect4, round {round}: {:.0} ns per connect over {CONNECTS} connects",
            (time1 - time0) as f64 / CONNECTS as f64
        );
    }
}
