//! IPv6 and dual-stack end to end, and IPv4-mapped sockets: the real lb-agent, the real
//! kernel programs, real TCP and UDP between namespaces that have both families.
//!
//! East-west (the socket load balancer), on [`Cluster::dual_stack`]: pods 10.244.0.N and
//! fd00:10:244::N on one node, the client pod in the agent's cgroup.
//!
//! North-south, on a [`Site`]: an outside client and two dual-stack nodes on a LAN, each node
//! running its own agent with `--nodeport-iface lan0`:
//!
//! ```text
//!   client ns  lan0 192.168.60.100 fd00:172::100 ─┐
//!                                                  ├─ lan ns: bridge
//!   node-a ns  lan0 192.168.60.1   fd00:172::1   ─┤   br0 10.244.0.1 fd00:10:244::1 ── pod-a .10 ::10
//!   node-b ns  lan0 192.168.60.2   fd00:172::2   ─┘   br0 10.244.1.1 fd00:10:244:1::1 ── pod-r
//! ```
//! Each node routes the other's pod subnets via the other's LAN address; pods route the LAN via
//! their node; the client routes the externalIP and the load balancer IP via node-a. There are
//! no default routes, and IPv6 addresses skip duplicate address detection.
//!
//! The Services are written as the API server stores them: `clusterIPs` with `ipFamilies` in
//! the same order and an `ipFamilyPolicy`, one EndpointSlice per family (`addressType: IPv4` /
//! `IPv6`).
mod common;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant};

use common::dual_stack::{NODE, all_from, at, service, slice, whoami_ip};
use common::site::{
    CLIENT_IP, CLIENT_IP6, EXTERNAL_IP6, NODE_A_IP, NODE_A_IP6, NODE_B_IP6, Site, probe_in, serve,
};
use common::{Cluster, POD_PORT, ProbeResult};
use lb_testkit::Netns;
use lb_testkit::objects::ServiceManifest;

const WEB4: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const WEB6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x96, 0, 0, 0, 0, 0x10);
const DNS4: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 53);
const DNS6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x96, 0, 0, 0, 0, 0x53);
/// A dual-stack Service's two ClusterIPs.
const DUAL4: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 20);
const DUAL6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x96, 0, 0, 0, 0, 0x20);
const TIMEOUT: Duration = Duration::from_secs(15);

fn v4(ip: Ipv4Addr) -> IpAddr {
    ip.into()
}

fn v6(ip: Ipv6Addr) -> IpAddr {
    ip.into()
}

/// `http` (TCP 80) and `dns` (UDP 53), both to POD_PORT.
fn with_web_ports(service: ServiceManifest) -> ServiceManifest {
    service
        .port("http", "TCP", 80, POD_PORT)
        .port("dns", "UDP", 53, POD_PORT)
}

/// The slice of `service` over `pods`' addresses of `family` (on this node), with the ports of
/// [`with_web_ports`].
fn web_slice(cluster: &Cluster, service: &str, family: &str, pods: &[&str]) -> String {
    let endpoints: Vec<(IpAddr, &str)> = pods
        .iter()
        .map(|p| (cluster.pod_ip_of(p, family), NODE))
        .collect();
    slice("default", service, &endpoints)
        .address_type(family)
        .port("http", "TCP", POD_PORT)
        .port("dns", "UDP", POD_PORT)
        .to_yaml()
}

/// The single-stack IPv6 Service `web6` at [`WEB6`] (and its UDP port at [`DNS6`]: a second
/// Service `dns6`) over `pods`.
fn ipv6_web(cluster: &Cluster, pods: &[&str]) {
    let web =
        service("default", "web6", &[v6(WEB6)], "SingleStack").port("http", "TCP", 80, POD_PORT);
    cluster.write_manifest("web6.yaml", &web.to_yaml());
    cluster.write_manifest("web6-slice.yaml", &web_slice(cluster, "web6", "IPv6", pods));
    let dns =
        service("default", "dns6", &[v6(DNS6)], "SingleStack").port("dns", "UDP", 53, POD_PORT);
    cluster.write_manifest("dns6.yaml", &dns.to_yaml());
    cluster.write_manifest("dns6-slice.yaml", &web_slice(cluster, "dns6", "IPv6", pods));
}

/// The replies' total.
fn answered(result: &ProbeResult) -> u64 {
    result.replies.values().sum()
}

fn one(key: impl Into<String>, count: u64) -> std::collections::BTreeMap<String, u64> {
    [(key.into(), count)].into()
}

// ---------------------------------------------------------------- east-west

#[test]
fn tcp_and_udp_through_an_ipv6_cluster_ip_spread_over_the_pods_and_show_the_cluster_ip_as_peer() {
    let mut cluster = Cluster::dual_stack(&["pod-a", "pod-b", "pod-c"]);
    ipv6_web(&cluster, &["pod-a", "pod-b", "pod-c"]);
    cluster.start_agent();
    let web = at(WEB6, 80);
    let dns = at(DNS6, 53);

    let tcp = cluster.probe(&["tcp", &web, "--count", "60"]);
    assert_eq!(tcp.failures(), 0, "{tcp:?}");
    assert_eq!(answered(&tcp), 60, "{tcp:?}");
    // Uniform choice: a pod missing from 60 connections has probability 3 × (2/3)^60.
    assert_eq!(tcp.replies.len(), 3, "every pod answers: {tcp:?}");
    assert_eq!(tcp.peers, one(&web, 60), "getpeername: {tcp:?}");
    // The pods see the client's own IPv6 address: no NAT in between.
    let whoami = cluster.probe(&["tcp", &web, "--count", "5", "--whoami"]);
    assert!(all_from(&whoami, cluster.client_ip6()), "{whoami:?}");

    // Unconnected UDP: each fresh socket picks a pod; every reply comes from the ClusterIP.
    let udp = cluster.probe(&["udp", &dns, "--count", "30", "--new-socket-each"]);
    assert_eq!(udp.failures(), 0, "{udp:?}");
    assert!(udp.replies.len() >= 2, "30 sockets, one pod: {udp:?}");
    assert_eq!(udp.peers, one(&dns, 30), "recvfrom: {udp:?}");
    // Connected UDP: one socket, one pod; getpeername and recvfrom both show the ClusterIP.
    let connected = cluster.probe(&["udp", &dns, "--connected", "--count", "20"]);
    assert_eq!(connected.failures(), 0, "{connected:?}");
    assert_eq!(connected.replies.len(), 1, "{connected:?}");
    assert_eq!(connected.peers, one(&dns, 20), "getpeername: {connected:?}");
    assert_eq!(connected.sources, one(&dns, 20), "recvfrom: {connected:?}");
    let whoami = cluster.probe(&["udp", &dns, "--count", "3", "--whoami"]);
    assert!(all_from(&whoami, cluster.client_ip6()), "{whoami:?}");
}

#[test]
fn an_ipv6_service_without_ready_endpoints_refuses_at_once() {
    let mut cluster = Cluster::dual_stack(&["pod-a"]);
    let web = with_web_ports(service("default", "web6", &[v6(WEB6)], "SingleStack"));
    cluster.write_manifest("web6.yaml", &web.to_yaml());
    let not_ready = slice("default", "web6", &[(v6(cluster.pod_ip6("pod-a")), NODE)])
        .port("http", "TCP", POD_PORT)
        .port("dns", "UDP", POD_PORT);
    // ready(false) on the one endpoint: `slice` makes them ready.
    let not_ready = not_ready.ready(false);
    cluster.write_manifest("web6-slice.yaml", &not_ready.to_yaml());
    cluster.start_agent();

    let started = Instant::now();
    let tcp = cluster.probe(&["tcp", &at(WEB6, 80), "--count", "3", "--timeout-ms", "3000"]);
    let udp = cluster.probe(&["udp", &at(WEB6, 53), "--count", "3", "--timeout-ms", "3000"]);
    let elapsed = started.elapsed();
    assert_eq!(tcp.errors.get("refused"), Some(&3), "TCP: {tcp:?}");
    assert_eq!(udp.errors.get("refused"), Some(&3), "UDP: {udp:?}");
    assert!(
        elapsed < Duration::from_secs(2),
        "refusals must not wait: {elapsed:?}"
    );
}

#[test]
fn a_require_dual_stack_service_is_reached_over_both_families_each_with_its_own_slice() {
    let mut cluster = Cluster::dual_stack(&["pod-a", "pod-b", "pod-c"]);
    let dual = service(
        "default",
        "web",
        &[v4(DUAL4), v6(DUAL6)],
        "RequireDualStack",
    )
    .port("http", "TCP", 80, POD_PORT);
    cluster.write_manifest("web.yaml", &dual.to_yaml());
    // Different pods per family: each ClusterIP must use its own family's slice.
    let v4_slice = web_slice(&cluster, "web", "IPv4", &["pod-a", "pod-b"]);
    let v6_slice = web_slice(&cluster, "web", "IPv6", &["pod-b", "pod-c"]);
    cluster.write_manifest("web-v4.yaml", &v4_slice);
    cluster.write_manifest("web-v6.yaml", &v6_slice);
    cluster.start_agent();

    for (vip, pods, client) in [
        (at(DUAL4, 80), ["pod-a", "pod-b"], v4(cluster.client.ip)),
        (at(DUAL6, 80), ["pod-b", "pod-c"], v6(cluster.client_ip6())),
    ] {
        let tcp = cluster.probe(&["tcp", &vip, "--count", "40"]);
        assert_eq!(tcp.failures(), 0, "{vip}: {tcp:?}");
        let answering: Vec<&str> = tcp.replies.keys().map(String::as_str).collect();
        assert_eq!(
            answering, pods,
            "{vip}: only its family's endpoints: {tcp:?}"
        );
        assert_eq!(tcp.peers, one(&vip, 40), "{vip}: getpeername: {tcp:?}");
        let whoami = cluster.probe(&["tcp", &vip, "--count", "3", "--whoami"]);
        assert!(all_from(&whoami, client), "{vip}: {whoami:?}");
    }
}

#[test]
fn ipv4_mapped_tcp_and_udp_sockets_reach_an_ipv4_cluster_ip_and_see_it_mapped() {
    // An IPv4-only cluster: an AF_INET6 socket to ::ffff:a.b.c.d needs no IPv6 at all.
    let mut cluster = Cluster::new(&["pod-a", "pod-b", "pod-c"]);
    let web =
        service("default", "web", &[v4(WEB4)], "SingleStack").port("http", "TCP", 80, POD_PORT);
    cluster.write_manifest("web.yaml", &web.to_yaml());
    cluster.write_manifest(
        "web-slice.yaml",
        &web_slice(&cluster, "web", "IPv4", &["pod-a", "pod-b", "pod-c"]),
    );
    let dns =
        service("default", "dns", &[v4(DNS4)], "SingleStack").port("dns", "UDP", 53, POD_PORT);
    cluster.write_manifest("dns.yaml", &dns.to_yaml());
    cluster.write_manifest(
        "dns-slice.yaml",
        &web_slice(&cluster, "dns", "IPv4", &["pod-a", "pod-b", "pod-c"]),
    );
    let empty = service(
        "default",
        "empty",
        &[v4(Ipv4Addr::new(10, 96, 0, 11))],
        "SingleStack",
    )
    .port("http", "TCP", 80, POD_PORT);
    cluster.write_manifest("empty.yaml", &empty.to_yaml());
    cluster.start_agent();
    let web = at(WEB4.to_ipv6_mapped(), 80);
    let dns = at(DNS4.to_ipv6_mapped(), 53);
    assert_eq!(web, "[::ffff:10.96.0.10]:80");
    let client_mapped = cluster.client.ip.to_ipv6_mapped().to_string();

    // TCP: the service's pods answer; the socket shows the service (mapped), not the pod.
    let tcp = cluster.probe(&["tcp", &web, "--count", "60"]);
    assert_eq!(tcp.failures(), 0, "{tcp:?}");
    assert_eq!(tcp.replies.len(), 3, "every pod answers: {tcp:?}");
    assert_eq!(tcp.peers, one(&web, 60), "getpeername: {tcp:?}");
    assert_eq!(
        tcp.locals,
        one(&client_mapped, 60),
        "an AF_INET6 socket: {tcp:?}"
    );
    // Carried over IPv4: the pods see the client's IPv4 address.
    let whoami = cluster.probe(&["tcp", &web, "--count", "5", "--whoami"]);
    assert!(all_from(&whoami, cluster.client.ip), "{whoami:?}");

    // Unconnected UDP (sendto): fresh sockets spread, one socket stays on one pod; recvfrom
    // shows the service mapped.
    let spread = cluster.probe(&["udp", &dns, "--count", "30", "--new-socket-each"]);
    assert_eq!(spread.failures(), 0, "{spread:?}");
    assert!(spread.replies.len() >= 2, "{spread:?}");
    assert_eq!(spread.peers, one(&dns, 30), "recvfrom: {spread:?}");
    let unconnected = cluster.probe(&["udp", &dns, "--count", "20"]);
    assert_eq!(unconnected.failures(), 0, "{unconnected:?}");
    assert_eq!(
        unconnected.replies.len(),
        1,
        "one socket, one pod: {unconnected:?}"
    );
    assert_eq!(
        unconnected.sources,
        one(&dns, 20),
        "recvfrom: {unconnected:?}"
    );
    // Connected UDP: getpeername and recvfrom both show the service mapped.
    let connected = cluster.probe(&["udp", &dns, "--connected", "--count", "20"]);
    assert_eq!(connected.failures(), 0, "{connected:?}");
    assert_eq!(connected.replies.len(), 1, "{connected:?}");
    assert_eq!(connected.peers, one(&dns, 20), "getpeername: {connected:?}");
    assert_eq!(connected.sources, one(&dns, 20), "recvfrom: {connected:?}");
    assert_eq!(connected.locals, one(&client_mapped, 20), "{connected:?}");
    let whoami = cluster.probe(&["udp", &dns, "--count", "3", "--whoami"]);
    assert!(all_from(&whoami, cluster.client.ip), "{whoami:?}");

    // A mapped service without endpoints refuses at once, as the IPv4 one does.
    let refused = cluster.probe(&[
        "tcp",
        &at(Ipv4Addr::new(10, 96, 0, 11).to_ipv6_mapped(), 80),
        "--count",
        "2",
        "--timeout-ms",
        "3000",
    ]);
    assert_eq!(refused.errors.get("refused"), Some(&2), "{refused:?}");
}

#[test]
fn client_ip_affinity_holds_per_family_and_a_mapped_socket_shares_the_ipv4_choice() {
    let mut cluster = Cluster::dual_stack(&["pod-a", "pod-b", "pod-c"]);
    let dual = service(
        "default",
        "web",
        &[v4(DUAL4), v6(DUAL6)],
        "RequireDualStack",
    )
    .port("http", "TCP", 80, POD_PORT)
    .client_ip_affinity(None);
    cluster.write_manifest("web.yaml", &dual.to_yaml());
    let pods = ["pod-a", "pod-b", "pod-c"];
    cluster.write_manifest("web-v4.yaml", &web_slice(&cluster, "web", "IPv4", &pods));
    cluster.write_manifest("web-v6.yaml", &web_slice(&cluster, "web", "IPv6", &pods));
    cluster.start_agent();

    let mut chosen = Vec::new();
    for vip in [at(DUAL4, 80), at(DUAL6, 80)] {
        let first = cluster.probe(&["tcp", &vip, "--count", "30"]);
        assert_eq!(first.failures(), 0, "{vip}: {first:?}");
        assert_eq!(
            first.replies.len(),
            1,
            "{vip}: 30 connections, one pod: {first:?}"
        );
        let again = cluster.probe(&["tcp", &vip, "--count", "10"]);
        assert_eq!(
            again.replies,
            first.replies.keys().map(|k| (k.clone(), 10)).collect(),
            "{vip}"
        );
        chosen.push(first.replies.keys().next().unwrap().clone());
    }
    // The same client through an AF_INET6 socket to the IPv4 ClusterIP, mapped: the IPv4
    // service, the IPv4 affinity entry, the pod the IPv4 connections chose.
    let mapped = cluster.probe(&["tcp", &at(DUAL4.to_ipv6_mapped(), 80), "--count", "10"]);
    assert_eq!(mapped.replies, one(&chosen[0], 10), "{mapped:?}");
    eprintln!(
        "affinity: IPv4 chose {}, IPv6 chose {}",
        chosen[0], chosen[1]
    );

    // The IPv6 choice goes away: IPv6 moves to another pod and stays; IPv4 keeps its own.
    let rest: Vec<&str> = pods.iter().copied().filter(|p| *p != chosen[1]).collect();
    cluster.write_manifest("web-v6.yaml", &web_slice(&cluster, "web", "IPv6", &rest));
    let moved = cluster.probe_until(&["tcp", &at(DUAL6, 80), "--count", "1"], TIMEOUT, |r| {
        r.replies.keys().any(|pod| *pod != chosen[1])
    });
    let after = cluster.probe(&["tcp", &at(DUAL6, 80), "--count", "10"]);
    assert_eq!(
        after.replies,
        moved.replies.keys().map(|k| (k.clone(), 10)).collect(),
        "{after:?}"
    );
    // The IPv4 slice did not change: IPv4 keeps its pod, whichever IPv6 lost.
    let v4_after = cluster.probe(&["tcp", &at(DUAL4, 80), "--count", "10"]);
    assert_eq!(
        v4_after.replies,
        one(&chosen[0], 10),
        "IPv4 kept its pod: {v4_after:?}"
    );
}

#[test]
fn pods_reach_an_ipv6_external_ip_and_load_balancer_ip_at_the_socket() {
    let mut cluster = Cluster::dual_stack(&["pod-a"]);
    let external = Ipv6Addr::new(0xfd00, 0x198, 0x51, 0x100, 0, 0, 0, 0x10);
    let ingress = Ipv6Addr::new(0xfd00, 0x203, 0, 0x113, 0, 0, 0, 7);
    let lb = service("default", "web6", &[v6(WEB6)], "SingleStack")
        .service_type("LoadBalancer")
        .port("http", "TCP", 80, POD_PORT)
        .node_port(30080)
        .external_ips([external])
        .load_balancer_ingress(ingress);
    cluster.write_manifest("web6.yaml", &lb.to_yaml());
    cluster.write_manifest(
        "web6-slice.yaml",
        &web_slice(&cluster, "web6", "IPv6", &["pod-a"]),
    );
    cluster.start_agent();

    // Neither address is on any interface or routed: only the connect hook reaches the pod.
    for ip in [external, ingress] {
        let target = at(ip, 80);
        let tcp = cluster.probe(&["tcp", &target, "--count", "5"]);
        assert_eq!(tcp.replies, one("pod-a", 5), "{target}: {tcp:?}");
        assert_eq!(tcp.peers, one(&target, 5), "{target}: getpeername: {tcp:?}");
    }
}

#[test]
fn lb_agent_list_shows_the_frontends_and_backends_of_both_families() {
    let mut cluster = Cluster::dual_stack(&["pod-a"]);
    // IPv6 the primary family: clusterIP is the IPv6 address.
    let dual = service("default", "web", &[v6(DUAL6), v4(DUAL4)], "PreferDualStack")
        .port("http", "TCP", 80, POD_PORT);
    cluster.write_manifest("web.yaml", &dual.to_yaml());
    cluster.write_manifest(
        "web-v4.yaml",
        &web_slice(&cluster, "web", "IPv4", &["pod-a"]),
    );
    cluster.write_manifest(
        "web-v6.yaml",
        &web_slice(&cluster, "web", "IPv6", &["pod-a"]),
    );
    cluster.start_agent();
    // Programmed (through the IPv4 ClusterIP: the listing needs the agent's maps, not the
    // IPv6 socket hooks).
    cluster.probe_until(&["tcp", &at(DUAL4, 80), "--count", "1"], TIMEOUT, |r| {
        r.replies.get("pod-a") == Some(&1)
    });
    let bpffs = cluster.bpffs.path().display().to_string();

    let list: serde_json::Value =
        serde_json::from_str(&cluster.agent_command(&["list", "--bpffs", &bpffs, "-o", "json"]))
            .expect("list -o json");
    let row = |frontend: &str| {
        list.as_array()
            .unwrap()
            .iter()
            .find(|row| row["frontend"] == frontend)
            .cloned()
            .unwrap_or_else(|| panic!("no row for {frontend}: {list}"))
    };
    for (frontend, backend) in [
        (at(DUAL4, 80), at(cluster.pod_ip("pod-a"), POD_PORT)),
        (at(DUAL6, 80), at(cluster.pod_ip6("pod-a"), POD_PORT)),
    ] {
        let row = row(&frontend);
        assert_eq!(row["service"], "default/web:http", "{row}");
        assert_eq!(row["type"], "ClusterIP", "{row}");
        assert_eq!(row["protocol"], "TCP", "{row}");
        assert_eq!(
            row["backends"],
            serde_json::json!([format!("{backend} (local)")]),
            "{row}"
        );
    }
    let table = cluster.agent_command(&["list", "--bpffs", &bpffs]);
    assert!(table.contains("[fd00:10:96::20]:80"), "{table}");
    let backend6 = at(cluster.pod_ip6("pod-a"), POD_PORT);
    assert!(table.contains(&backend6), "{backend6}: {table}");
    eprintln!("{table}");
}

// ---------------------------------------------------------------- north-south

/// On no interface; the LoadBalancer test's client routes it via node-a.
const LB_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x203, 0, 0x113, 0, 0, 0, 7);
/// The `healthCheckNodePort` of the eTP Local Service.
const HEALTH_CHECK_PORT: u16 = 32100;
/// The first port of the agents' SNAT range.
const SNAT_PORTS_FROM: u16 = 61_000;

/// The slices (one per family) of `service` over these pods (on their nodes), with the
/// ports of [`with_web_ports`].
fn write_slices(site: &Site, service: &str, pods: &[&str]) {
    let node_of = |pod: &str| if pod == "pod-r" { "node-b" } else { "node-a" };
    for family in ["IPv4", "IPv6"] {
        let endpoints: Vec<(IpAddr, &str)> = pods
            .iter()
            .map(|name| {
                let pod = site.pod(name);
                let ip = match family {
                    "IPv6" => v6(pod.ip6.expect("a dual-stack pod")),
                    _ => v4(pod.ip),
                };
                (ip, node_of(name))
            })
            .collect();
        let yaml = slice("default", service, &endpoints)
            .address_type(family)
            .port("http", "TCP", POD_PORT)
            .port("dns", "UDP", POD_PORT)
            .to_yaml();
        site.write_manifest(&format!("{service}-{family}.yaml"), &yaml);
    }
}

/// A RequireDualStack NodePort Service `web` at [`WEB4`] and [`WEB6`]: http (TCP 80, nodePort
/// 30080) and dns (UDP 53, nodePort 30081).
fn dual_node_port() -> ServiceManifest {
    service("default", "web", &[v4(WEB4), v6(WEB6)], "RequireDualStack")
        .service_type("NodePort")
        .port("http", "TCP", 80, POD_PORT)
        .node_port(30080)
        .port("dns", "UDP", 53, POD_PORT)
        .node_port(30081)
}

/// `lb-probe tcp TARGET` once from `netns` (no cgroup: no load balancer involved).
fn direct(netns: &Netns, target: &str) -> ProbeResult {
    probe_in(netns, None, &["tcp", target, "--count", "1"])
}

#[test]
fn the_site_routes_both_families_between_client_nodes_and_pods_without_an_agent() {
    let mut site = Site::dual_stack(&["pod-a"]);
    // A server where the SNAT path's replies end: node-a's LAN address.
    site.servers
        .push(serve(site.node_a.netns(), "node-a", true));
    let pod_a = site.pod("pod-a");
    let pod_r = site.pod("pod-r");
    // A local pod routes its replies to the outside client via its node (eTP Local's reply
    // path; the client itself routes nothing to the pods).
    for client in [v6(CLIENT_IP6), v4(CLIENT_IP)] {
        let route = pod_a
            .netns
            .run(&["ip", "route", "get", &client.to_string()])
            .expect("ip route get");
        let via = match client {
            IpAddr::V6(_) => site.node_a.bridge_ip6().unwrap().to_string(),
            IpAddr::V4(_) => site.node_a.bridge_ip().to_string(),
        };
        assert!(route.contains(&format!("via {via} dev eth0")), "{route}");
    }
    // node-a reaches node-b's pod (eTP Cluster through SNAT), which answers node-a.
    let paths: [(&Netns, IpAddr, &str); 4] = [
        (site.node_a.netns(), v6(pod_r.ip6.unwrap()), "pod-r"),
        (site.node_a.netns(), v4(pod_r.ip), "pod-r"),
        (&pod_r.netns, v6(NODE_A_IP6), "node-a"),
        (&pod_r.netns, v4(NODE_A_IP), "node-a"),
    ];
    for (from, to, name) in paths {
        let target = at(to, POD_PORT);
        let answer = direct(from, &target);
        assert_eq!(
            answer.replies,
            one(name, 1),
            "{} to {target}: {answer:?}",
            from.name()
        );
    }
    // Nothing else is routed: the client has no route to the pods.
    let unrouted = direct(site.client.netns(), &at(pod_a.ip6.unwrap(), POD_PORT));
    assert_eq!(unrouted.errors.get("unreachable"), Some(&1), "{unrouted:?}");
}

#[test]
fn an_ipv6_node_port_with_external_traffic_policy_local_keeps_the_client_address() {
    let mut site = Site::dual_stack(&["pod-a"]);
    site.write_manifest(
        "web.yaml",
        &dual_node_port()
            .external_traffic_policy("Local")
            .health_check_node_port(HEALTH_CHECK_PORT)
            .to_yaml(),
    );
    write_slices(&site, "web", &["pod-a"]);
    site.start_agents();

    // IPv4 first: the same Service's other family, through the same topology.
    let ipv4 = site.probe_until(
        &["tcp", &at(NODE_A_IP, 30080), "--count", "5", "--whoami"],
        TIMEOUT,
        |r| all_from(r, CLIENT_IP),
    );
    eprintln!("IPv4 NodePort: {ipv4:?}");
    // The health-check node port answers on the node's IPv4 and IPv6 addresses (any path:
    // lb-probe's `GET /`), counting node-a's one local endpoint; node-b's has none.
    for (node, local_endpoints) in [(v4(NODE_A_IP), 1), (v6(NODE_A_IP6), 1), (v6(NODE_B_IP6), 0)] {
        let health = at(node, HEALTH_CHECK_PORT);
        let answer = site.probe_until(&["tcp", &health, "--count", "1"], TIMEOUT, |r| {
            r.replies.len() == 1
        });
        let body = answer.replies.keys().next().unwrap();
        let json: serde_json::Value =
            serde_json::from_str(body).unwrap_or_else(|e| panic!("{health}: {e}: {body}"));
        assert_eq!(
            json,
            serde_json::json!({"service": {"namespace": "default", "name": "web"},
                "localEndpoints": local_endpoints, "serviceProxyHealthy": true}),
            "{health}"
        );
    }

    let nodeport = at(NODE_A_IP6, 30080);
    let tcp = site.probe_until(
        &["tcp", &nodeport, "--count", "10", "--whoami"],
        TIMEOUT,
        |r| all_from(r, CLIENT_IP6),
    );
    eprintln!("IPv6 NodePort, eTP Local: {tcp:?}");
    let names = site.probe(&["tcp", &nodeport, "--count", "5"]);
    assert_eq!(names.replies, one("pod-a", 5), "{names:?}\n{}", site.logs());

    // UDP: the pod sees the client; replies come from the NodePort the client sent to.
    let udp_nodeport = at(NODE_A_IP6, 30081);
    let udp = site.probe(&["udp", &udp_nodeport, "--count", "10", "--whoami"]);
    assert!(all_from(&udp, CLIENT_IP6), "{udp:?}\n{}", site.logs());
    assert_eq!(udp.peers, one(&udp_nodeport, 10), "reply source: {udp:?}");

    // node-b has no local endpoint: its IPv6 NodePort drops (no refusal) under Local.
    let dropped = site.probe(&[
        "tcp",
        &at(NODE_B_IP6, 30080),
        "--count",
        "2",
        "--timeout-ms",
        "500",
    ]);
    assert!(
        dropped.replies.is_empty() && dropped.failures() == 2,
        "{dropped:?}"
    );
    let first = dropped.first_error.clone().unwrap_or_default();
    assert!(
        !first.contains("refused"),
        "dropped, not refused: {dropped:?}"
    );
}

#[test]
fn pods_and_the_node_itself_reach_an_ipv6_node_port_at_the_socket() {
    let mut site = Site::dual_stack(&["pod-a", "pod-b"]);
    site.write_manifest("web.yaml", &dual_node_port().to_yaml());
    write_slices(&site, "web", &["pod-a", "pod-b"]);
    site.start_agents();

    // From a pod: both pods answer (pod-a itself too), getpeername shows the NodePort.
    let nodeport = at(NODE_A_IP6, 30080);
    let tcp = site.probe_in_node(Some("pod-a"), &["tcp", &nodeport, "--count", "40"]);
    assert_eq!(tcp.failures(), 0, "{tcp:?}\n{}", site.logs());
    assert_eq!(tcp.replies.len(), 2, "both pods answer: {tcp:?}");
    assert_eq!(tcp.peers, one(&nodeport, 40), "getpeername: {tcp:?}");
    let udp_port = at(NODE_A_IP6, 30081);
    let udp = site.probe_in_node(Some("pod-b"), &["udp", &udp_port, "--count", "20"]);
    assert_eq!(udp.failures(), 0, "{udp:?}");
    assert_eq!(
        udp.peers,
        one(&udp_port, 20),
        "UDP replies from the NodePort: {udp:?}"
    );

    // The node itself, at its IPv6 address and at ::1; an AF_INET6 socket at the node's IPv4
    // address, mapped, takes the IPv4 NodePort.
    let mapped = at(NODE_A_IP.to_ipv6_mapped(), 30080);
    for target in [nodeport.as_str(), "[::1]:30080", mapped.as_str()] {
        let node = site.probe_in_node(None, &["tcp", target, "--count", "10"]);
        assert_eq!(node.failures(), 0, "the node itself to {target}: {node:?}");
        assert_eq!(answered(&node), 10, "{node:?}");
        assert_eq!(node.peers, one(target, 10), "getpeername: {node:?}");
    }
}

#[test]
fn an_ipv6_node_port_with_external_traffic_policy_cluster_reaches_a_pod_on_the_second_node_through_snat()
 {
    let mut site = Site::dual_stack(&["pod-a"]);
    site.write_manifest("web.yaml", &dual_node_port().to_yaml());
    write_slices(&site, "web", &["pod-r"]);
    site.start_agents();

    // Through node-a to node-b's pod: the pod sees node-a's IPv6 address, on an SNAT port.
    let nodeport = at(NODE_A_IP6, 30080);
    let whoami = site.probe_until(
        &["tcp", &nodeport, "--count", "20", "--whoami"],
        TIMEOUT,
        |r| all_from(r, NODE_A_IP6),
    );
    for seen in whoami.replies.keys() {
        let port = seen
            .parse::<std::net::SocketAddr>()
            .expect("IP:PORT")
            .port();
        assert!(
            port >= SNAT_PORTS_FROM,
            "SNAT port {port} outside the SNAT range"
        );
    }
    eprintln!("IPv6 eTP Cluster, remote endpoint, via node-a: {whoami:?}");
    let udp_nodeport = at(NODE_A_IP6, 30081);
    let udp = site.probe(&["udp", &udp_nodeport, "--count", "10", "--whoami"]);
    assert!(all_from(&udp, NODE_A_IP6), "{udp:?}\n{}", site.logs());
    assert_eq!(udp.peers, one(&udp_nodeport, 10), "reply source: {udp:?}");

    // The same Service through node-b, where the pod is local: no SNAT.
    let via_b = site.probe_until(
        &["tcp", &at(NODE_B_IP6, 30080), "--count", "10", "--whoami"],
        TIMEOUT,
        |r| all_from(r, CLIENT_IP6),
    );
    eprintln!("IPv6 eTP Cluster via node-b: {via_b:?}");
}

#[test]
fn an_ipv6_external_ip_and_load_balancer_ip_are_reached_from_outside_with_the_client_address_kept()
{
    let mut site = Site::dual_stack(&["pod-a"]);
    let lb = service("default", "web", &[v6(WEB6)], "SingleStack")
        .service_type("LoadBalancer")
        .port("http", "TCP", 80, POD_PORT)
        .node_port(30080)
        .port("dns", "UDP", 53, POD_PORT)
        .node_port(30081)
        .external_ips([EXTERNAL_IP6])
        .load_balancer_ingress(LB_IP6);
    site.client
        .route(&format!("{LB_IP6}/128"), NODE_A_IP6)
        .expect("the client's route to the load balancer IP");
    site.write_manifest("web.yaml", &lb.to_yaml());
    write_slices(&site, "web", &["pod-a"]);
    site.start_agents();

    for ip in [EXTERNAL_IP6, LB_IP6] {
        let tcp_target = at(ip, 80);
        let tcp = site.probe_until(
            &["tcp", &tcp_target, "--count", "10", "--whoami"],
            TIMEOUT,
            |r| all_from(r, CLIENT_IP6),
        );
        eprintln!("{tcp_target}: {tcp:?}");
        let udp_target = at(ip, 53);
        let udp = site.probe(&["udp", &udp_target, "--count", "10"]);
        assert_eq!(
            udp.replies,
            one("pod-a", 10),
            "{ip}: {udp:?}\n{}",
            site.logs()
        );
        assert_eq!(
            udp.peers,
            one(&udp_target, 10),
            "{ip}: reply source: {udp:?}"
        );
        let whoami = site.probe(&["udp", &udp_target, "--count", "3", "--whoami"]);
        assert!(
            whoami
                .replies
                .keys()
                .all(|k| whoami_ip(k) == Some(v6(CLIENT_IP6))),
            "{whoami:?}"
        );
    }
}
