//! North-south traffic end to end: an outside client, nodes with their own `lb-agent`
//! (`--nodeport-iface lan0`: XDP ingress, tc egress) and pods, real TCP and UDP, and backends
//! that answer with the client address they saw (`lb-probe --whoami`), on the site of
//! `common::site` (IPv4 only here; `dual_stack.rs` has its IPv6 tests):
//!
//! ```text
//!   client ns  lan0 192.168.60.100 ─┐
//!                                    ├─ lan ns: bridge ── node-a ns  lan0 192.168.60.1
//!                                    │                      br0 10.244.0.1 ── pod-a 10.244.0.10
//!                                    └─────────────────── node-b ns  lan0 192.168.60.2
//!                                                           br0 10.244.1.1 ── pod-r 10.244.1.10
//! ```
//! node-a routes 10.244.1.0/24 via node-b; pods route the LAN via their node. There are no
//! default routes: every route stays inside the test's namespaces. The externalIP
//! 198.51.100.10 is on no interface; the client routes it via node-a.
mod common;

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    path::Path,
    time::{Duration, Instant},
};

use common::site::{
    AGENT_START_TIMEOUT, CLIENT_IP, EXTERNAL_IP, HEALTHZ_ADDR, LAN_IFACE, METRICS_ADDR, NODE_A_IP,
    NODE_B_IP, REMOTE_POD_IP, Site, run,
};
use common::{AGENT, POD_PORT, PROBE, ProbeResult};
use lb_testkit::objects::{ServiceManifest, SliceManifest};
use lb_testkit::{Netns, Pod, command_in, spawn_in};

/// A NodePort Service `name` with ports http (TCP 80, nodePort `base`) and dns (UDP 53,
/// nodePort `base + 1`), both to POD_PORT.
fn service(name: &str, cluster_ip: &str, base: u16) -> ServiceManifest {
    ServiceManifest::cluster_ip("default", name, cluster_ip)
        .service_type("NodePort")
        .port("http", "TCP", 80, POD_PORT)
        .node_port(base)
        .port("dns", "UDP", 53, POD_PORT)
        .node_port(base + 1)
}

/// The EndpointSlice `<service>-1` with ports http (TCP) and dns (UDP) on POD_PORT, and ready
/// (address, node name) endpoints.
fn slice(service: &str, endpoints: &[(&str, &str)]) -> SliceManifest {
    let slice = SliceManifest::new("default", &format!("{service}-1"), service)
        .port("http", "TCP", POD_PORT)
        .port("dns", "UDP", POD_PORT);
    with_ready(slice, endpoints)
}

/// Adds ready (address, node name) endpoints.
fn with_ready(slice: SliceManifest, endpoints: &[(&str, &str)]) -> SliceManifest {
    endpoints.iter().fold(slice, |slice, (ip, node)| {
        slice.endpoint(ip).on_node(node).ready(true)
    })
}

/// Every reply (a `--whoami` answer `IP:PORT`) comes from `ip`.
fn all_from(result: &ProbeResult, ip: Ipv4Addr) -> bool {
    !result.replies.is_empty()
        && result.failures() == 0
        && result
            .replies
            .keys()
            .all(|seen| seen.starts_with(&format!("{ip}:")))
}

#[test]
fn nodeport_and_external_ip_reach_a_local_pod_with_the_client_address_kept() {
    let mut site = Site::new(&["pod-a"], false);
    site.write_manifest(
        "web.yaml",
        &service("web", "10.96.0.10", 30080)
            .external_ips([EXTERNAL_IP])
            .to_yaml(),
    );
    site.write_manifest(
        "web-slice.yaml",
        &slice("web", &[(&site.pod_ip("pod-a"), "node-a")]).to_yaml(),
    );
    site.start_agents();
    let timeout = Duration::from_secs(10);
    let nodeport = format!("{NODE_A_IP}:30080");

    // TCP: the pod answers, and sees the client's own address.
    let names = site.probe_until(&["tcp", &nodeport, "--count", "10"], timeout, |r| {
        r.replies.get("pod-a") == Some(&10)
    });
    eprintln!("TCP NodePort: {names:?}");
    let whoami = site.probe(&["tcp", &nodeport, "--count", "10", "--whoami"]);
    assert!(all_from(&whoami, CLIENT_IP), "{whoami:?}\n{}", site.logs());

    // UDP: replies come from the NodePort the client sent to.
    let udp_nodeport = format!("{NODE_A_IP}:30081");
    let udp = site.probe(&["udp", &udp_nodeport, "--count", "10", "--whoami"]);
    assert!(all_from(&udp, CLIENT_IP), "{udp:?}\n{}", site.logs());
    assert_eq!(
        udp.peers.get(&udp_nodeport),
        Some(&10),
        "reply source: {udp:?}"
    );

    // externalIP at the service port, TCP and UDP.
    let external = format!("{EXTERNAL_IP}:80");
    let tcp = site.probe(&["tcp", &external, "--count", "10", "--whoami"]);
    assert!(all_from(&tcp, CLIENT_IP), "{tcp:?}\n{}", site.logs());
    let external_udp = format!("{EXTERNAL_IP}:53");
    let udp = site.probe(&["udp", &external_udp, "--count", "10"]);
    assert_eq!(
        udp.replies.get("pod-a"),
        Some(&10),
        "{udp:?}\n{}",
        site.logs()
    );
    assert_eq!(
        udp.peers.get(&external_udp),
        Some(&10),
        "reply source: {udp:?}"
    );

    // A pod's port unreachable comes back as an error about the NodePort: a connected UDP
    // socket of the client sees the refusal (ICMP translated at tc egress).
    let closed_yaml = service("closed", "10.96.0.11", 30090).to_yaml();
    site.write_manifest("closed.yaml", &closed_yaml);
    // The dns port's endpoints on a port nothing listens on.
    let closed_slice = SliceManifest::new("default", "closed-1", "closed")
        .port("http", "TCP", POD_PORT)
        .port("dns", "UDP", 9999);
    let closed_slice = with_ready(closed_slice, &[(&site.pod_ip("pod-a"), "node-a")]);
    site.write_manifest("closed-slice.yaml", &closed_slice.to_yaml());
    let refused = site.probe_until(
        &[
            "udp",
            &format!("{NODE_A_IP}:30091"),
            "--connected",
            "--count",
            "1",
            "--timeout-ms",
            "1000",
        ],
        timeout,
        |r| {
            r.first_error
                .as_deref()
                .is_some_and(|e| e.contains("refused"))
        },
    );
    eprintln!("UDP to a closed pod port: {refused:?}");

    // A port no service uses is the node's own: refused by its stack, at once.
    let closed = site.probe(&[
        "tcp",
        &format!("{NODE_A_IP}:30099"),
        "--count",
        "1",
        "--timeout-ms",
        "2000",
    ]);
    assert_eq!(closed.failures(), 1, "{closed:?}");
}

#[test]
fn external_traffic_policy_local_keeps_the_source_drops_without_local_endpoints_and_reports_health()
{
    let mut site = Site::new(&["pod-a"], false);
    let local = service("web", "10.96.0.10", 30080)
        .external_traffic_policy("Local")
        .health_check_node_port(32100);
    site.write_manifest("web.yaml", &local.to_yaml());
    site.write_manifest(
        "web-slice.yaml",
        &slice("web", &[(&site.pod_ip("pod-a"), "node-a")]).to_yaml(),
    );
    site.start_agents();
    let timeout = Duration::from_secs(10);
    let nodeport = format!("{NODE_A_IP}:30080");
    let health = format!("{NODE_A_IP}:32100");

    let whoami = site.probe_until(
        &["tcp", &nodeport, "--count", "10", "--whoami"],
        timeout,
        |r| all_from(r, CLIENT_IP),
    );
    eprintln!("eTP Local, local endpoint: {whoami:?}");
    assert!(
        datapath_count(&site, "xdp", "forwarded") >= 10,
        "XDP translated the probes"
    );
    assert!(
        datapath_count(&site, "tc", "reply_translated") >= 10,
        "tc restored the replies' source"
    );
    let (status, body) = site
        .http_get(&health)
        .expect("health-check node port answers");
    assert_eq!(status, 200, "{body}");
    let json: serde_json::Value = serde_json::from_str(&body).expect("JSON body");
    assert_eq!(
        json,
        serde_json::json!({"service": {"namespace": "default", "name": "web"}, "localEndpoints": 1, "serviceProxyHealthy": true})
    );

    // The only endpoint moves to another node: this node drops (no refusal), health is 503.
    site.write_manifest(
        "web-slice.yaml",
        &slice("web", &[(REMOTE_POD_IP, "node-b")]).to_yaml(),
    );
    let started = Instant::now();
    loop {
        let answer = site.http_get(&health);
        if matches!(&answer, Ok((503, _))) {
            let json: serde_json::Value = serde_json::from_str(&answer.unwrap().1).unwrap();
            assert_eq!(json["localEndpoints"], 0);
            break;
        }
        assert!(
            started.elapsed() < timeout,
            "health never turned 503: {answer:?}\n{}",
            site.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let dropped_before = datapath_count(&site, "xdp", "dropped_no_local_endpoint");
    let dropped = site.probe(&["tcp", &nodeport, "--count", "2", "--timeout-ms", "500"]);
    assert!(
        dropped.replies.is_empty() && dropped.failures() == 2,
        "{dropped:?}"
    );
    // Each connection's SYN (and any retransmission) counted as dropped for this reason.
    let dropped_count = datapath_count(&site, "xdp", "dropped_no_local_endpoint") - dropped_before;
    assert!(dropped_count >= 2, "counted {dropped_count} drops");
    let first = dropped.first_error.clone().unwrap_or_default();
    assert!(
        !first.contains("refused"),
        "dropped, not refused: {dropped:?}"
    );

    // Back to Cluster: the health-check port stops answering.
    site.write_manifest("web.yaml", &service("web", "10.96.0.10", 30080).to_yaml());
    let started = Instant::now();
    while site.http_get(&health).is_ok() {
        assert!(
            started.elapsed() < timeout,
            "health port still answers\n{}",
            site.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn external_traffic_policy_cluster_reaches_a_pod_on_another_node_through_snat() {
    let mut site = Site::new(&["pod-a"], true);
    site.write_manifest("web.yaml", &service("web", "10.96.0.10", 30080).to_yaml());
    site.write_manifest(
        "web-slice.yaml",
        &slice("web", &[(REMOTE_POD_IP, "node-b")]).to_yaml(),
    );
    site.start_agents();
    let timeout = Duration::from_secs(10);
    let nodeport = format!("{NODE_A_IP}:30080");

    // Through node-a to node-b's pod: the pod sees node-a's address, on an SNAT port.
    let whoami = site.probe_until(
        &["tcp", &nodeport, "--count", "20", "--whoami"],
        timeout,
        |r| all_from(r, NODE_A_IP),
    );
    for seen in whoami.replies.keys() {
        let port: u16 = seen.rsplit(':').next().unwrap().parse().unwrap();
        assert!(port >= 61_000, "SNAT port {port} outside the SNAT range");
    }
    eprintln!("eTP Cluster, remote endpoint, via node-a: {whoami:?}");
    let udp_nodeport = format!("{NODE_A_IP}:30081");
    let udp = site.probe(&["udp", &udp_nodeport, "--count", "10", "--whoami"]);
    assert!(all_from(&udp, NODE_A_IP), "{udp:?}\n{}", site.logs());
    assert_eq!(
        udp.peers.get(&udp_nodeport),
        Some(&10),
        "reply source: {udp:?}"
    );

    // The same service through node-b, where the pod is local: no SNAT.
    let via_b = site.probe(&[
        "tcp",
        &format!("{NODE_B_IP}:30080"),
        "--count",
        "10",
        "--whoami",
    ]);
    assert!(all_from(&via_b, CLIENT_IP), "{via_b:?}\n{}", site.logs());

    // Local and remote endpoints: flows spread over both; the local one is reached without
    // SNAT (it sees the client), the remote one with it (it sees node-a).
    site.write_manifest(
        "web-slice.yaml",
        &slice(
            "web",
            &[(&site.pod_ip("pod-a"), "node-a"), (REMOTE_POD_IP, "node-b")],
        )
        .to_yaml(),
    );
    let spread = site.probe_until(&["tcp", &nodeport, "--count", "40"], timeout, |r| {
        r.replies.len() == 2
    });
    assert_eq!(spread.failures(), 0, "{spread:?}");
    eprintln!(
        "eTP Cluster, one local and one remote endpoint: {:?}",
        spread.replies
    );
    let whoami = site.probe(&["tcp", &nodeport, "--count", "40", "--whoami"]);
    assert_eq!(whoami.failures(), 0, "{whoami:?}");
    let from_client = whoami
        .replies
        .keys()
        .filter(|k| k.starts_with(&format!("{CLIENT_IP}:")))
        .count();
    let from_node = whoami
        .replies
        .keys()
        .filter(|k| k.starts_with(&format!("{NODE_A_IP}:")))
        .count();
    assert!(
        from_client > 0 && from_node > 0 && from_client + from_node == whoami.replies.len(),
        "{whoami:?}"
    );
}

/// `--size` and `--reply-size` of 3000 bytes: above the LAN's (and the pods') MTU of 1500.
const BIG_DATAGRAM: &str = "3000";

/// UDP datagrams of 3000 bytes, past the MTU of 1500, fragment on the way: XDP translates the
/// client's fragments (the first like a whole datagram, the later ones by its ports) and tc
/// the pod's fragmented reply, to a local pod and, through SNAT, to a pod on another node.
#[test]
fn fragmented_udp_datagrams_reach_a_nodeport_and_fragmented_replies_come_back_from_it() {
    let mut site = Site::new(&["pod-a"], true);
    site.write_manifest("web.yaml", &service("web", "10.96.0.10", 30080).to_yaml());
    site.write_manifest(
        "web-slice.yaml",
        &slice("web", &[(&site.pod_ip("pod-a"), "node-a")]).to_yaml(),
    );
    site.start_agents();
    let timeout = Duration::from_secs(10);
    let udp_nodeport = format!("{NODE_A_IP}:30081");
    let small = site.probe_until(&["udp", &udp_nodeport, "--count", "1"], timeout, |r| {
        r.replies.get("pod-a") == Some(&1)
    });
    eprintln!("UDP NodePort: {small:?}");

    // A big request: the pod answers, seeing the client's address.
    let request = ["udp", &udp_nodeport, "--count", "5", "--whoami"];
    let big_request = site.probe(&[&request[..], &["--size", BIG_DATAGRAM]].concat());
    assert!(
        all_from(&big_request, CLIENT_IP),
        "{big_request:?}\n{}",
        site.logs()
    );
    // A big reply (to a small and to a big request), from the NodePort's address.
    for size in [None, Some(BIG_DATAGRAM)] {
        let mut args = vec!["udp", &udp_nodeport, "--count", "5"];
        args.extend(["--reply-size", BIG_DATAGRAM]);
        if let Some(size) = size {
            args.extend(["--size", size]);
        }
        let big_reply = site.probe(&args);
        assert_eq!(
            big_reply.replies.get("pod-a"),
            Some(&5),
            "request size {size:?}: {big_reply:?}\n{}",
            site.logs()
        );
        assert_eq!(
            big_reply.peers.get(&udp_nodeport),
            Some(&5),
            "reply source: {big_reply:?}"
        );
    }
    let xdp_fragments = datapath_count(&site, "xdp", "fragment_translated");
    let tc_fragments = datapath_count(&site, "tc", "fragment_translated");
    // 3000 bytes at an MTU of 1500: three fragments, two of them later ones.
    assert!(
        xdp_fragments >= 2 * 10,
        "xdp fragment_translated {xdp_fragments}"
    );
    assert!(
        tc_fragments >= 2 * 10,
        "tc fragment_translated {tc_fragments}"
    );

    // eTP Cluster to the pod on node-b: fragments get the node's address and SNAT port at
    // tc; the pod's fragmented reply gets the client back in XDP, the NodePort at tc.
    site.write_manifest(
        "web-slice.yaml",
        &slice("web", &[(REMOTE_POD_IP, "node-b")]).to_yaml(),
    );
    let args = [
        &request[..],
        &["--size", BIG_DATAGRAM, "--reply-size", BIG_DATAGRAM],
    ]
    .concat();
    let snat = site.probe_until(&args, timeout, |r| all_from(r, NODE_A_IP));
    assert_eq!(
        snat.peers.get(&udp_nodeport),
        Some(&5),
        "reply source: {snat:?}"
    );
    eprintln!("eTP Cluster, remote endpoint, 3000 bytes both ways: {snat:?}");
    assert!(datapath_count(&site, "tc", "fragment_translated") > tc_fragments);
}

#[test]
fn nodeport_addresses_narrow_the_addresses_node_ports_answer_on() {
    let mut site = Site::new(&["pod-a"], false);
    run(
        site.node_a.netns(),
        &["ip", "addr", "add", "192.168.60.3/24", "dev", LAN_IFACE],
    );
    site.write_manifest("web.yaml", &service("web", "10.96.0.10", 30080).to_yaml());
    site.write_manifest(
        "web-slice.yaml",
        &slice("web", &[(&site.pod_ip("pod-a"), "node-a")]).to_yaml(),
    );
    // A second interface whose driver has no native XDP (a bridge): generic mode, said in the
    // log.
    run(
        site.node_a.netns(),
        &["ip", "link", "add", "dum0", "type", "bridge"],
    );
    run(site.node_a.netns(), &["ip", "link", "set", "dum0", "up"]);
    site.start_agents_with(&[
        "--nodeport-addresses",
        &format!("{NODE_A_IP}/32"),
        "--nodeport-iface",
        "dum0",
    ]);
    // Ready means attached: the log lines asserted on below are written (the reader thread
    // may lag behind the agent a little).
    site.agents[0].wait_for_log("iface=dum0", AGENT_START_TIMEOUT);
    let log = site.agents[0].log();
    let mode_of = |iface: &str| {
        log.lines()
            .find(|l| {
                l.contains("north-south programs attached") && l.contains(&format!("iface={iface}"))
            })
            .map(|l| {
                if l.contains("xdp_mode=native") {
                    "native"
                } else if l.contains("xdp_mode=generic") {
                    "generic"
                } else {
                    "?"
                }
            })
    };
    assert_eq!(mode_of(LAN_IFACE), Some("native"), "{log}");
    assert_eq!(mode_of("dum0"), Some("generic"), "{log}");

    let served = site.probe_until(
        &["tcp", &format!("{NODE_A_IP}:30080"), "--count", "5"],
        Duration::from_secs(10),
        |r| r.replies.get("pod-a") == Some(&5),
    );
    assert_eq!(served.failures(), 0);
    // The other address of the same interface is not a NodePort address: the node's own
    // stack refuses the connection.
    let other = site.probe(&[
        "tcp",
        "192.168.60.3:30080",
        "--count",
        "3",
        "--timeout-ms",
        "2000",
    ]);
    assert!(
        other.replies.is_empty() && other.failures() == 3,
        "{other:?}"
    );
    assert!(
        other
            .first_error
            .as_deref()
            .unwrap_or_default()
            .contains("refused"),
        "refused by the node, not translated: {other:?}"
    );
}

#[test]
fn nodeports_keep_serving_while_the_agent_is_down_and_a_new_agent_takes_over_the_links() {
    let mut site = Site::new(&["pod-a"], false);
    site.write_manifest("web.yaml", &service("web", "10.96.0.10", 30080).to_yaml());
    site.write_manifest(
        "web-slice.yaml",
        &slice("web", &[(&site.pod_ip("pod-a"), "node-a")]).to_yaml(),
    );
    site.start_agents();
    let nodeport = format!("{NODE_A_IP}:30080");
    site.probe_until(
        &["tcp", &nodeport, "--count", "5"],
        Duration::from_secs(10),
        |r| r.replies.get("pod-a") == Some(&5),
    );

    // kill -9: nothing is cleaned up, the pinned links keep XDP and tc attached.
    for agent in &mut site.agents {
        agent.kill();
    }
    let during = site.probe(&["tcp", &nodeport, "--count", "20", "--whoami"]);
    assert_eq!(during.failures(), 0, "no agent: {during:?}");
    assert!(all_from(&during, CLIENT_IP), "{during:?}");

    site.start_agents();
    let log = site.logs();
    assert!(
        log.contains("Replaced"),
        "the new agent did not reuse the pinned links:\n{log}"
    );
    let list = std::process::Command::new(AGENT)
        .args([
            "list",
            "--bpffs",
            &site.bpffs[0].path().display().to_string(),
        ])
        .output()
        .expect("lb-agent list");
    let list = String::from_utf8_lossy(&list.stdout);
    assert!(
        list.lines().any(|l| l.contains("default/web")
            && l.contains("NodePort/Cluster")
            && l.contains("<node>:30080")),
        "{list}"
    );
    eprintln!("{list}");
    let after = site.probe(&["tcp", &nodeport, "--count", "20"]);
    assert_eq!(
        after.replies.get("pod-a"),
        Some(&20),
        "{after:?}\n{}",
        site.logs()
    );
}

/// The netlink tc filters of `nodeport_tc` on node-a's `lan0` egress, as `tc filter show`
/// prints them (one line each).
fn tc_filters(site: &Site) -> Vec<String> {
    site.node_a
        .netns()
        .run(&["tc", "filter", "show", "dev", LAN_IFACE, "egress"])
        .expect("tc filter show")
        .lines()
        .filter(|l| l.contains("nodeport_tc"))
        .map(str::to_owned)
        .collect()
}

/// The program id in a `tc filter show` line (`... id 123 tag ...`).
fn filter_program_id(line: &str) -> u32 {
    let mut words = line.split_whitespace();
    words.find(|w| *w == "id");
    words
        .next()
        .and_then(|id| id.parse().ok())
        .unwrap_or_else(|| panic!("no id in {line}"))
}

#[test]
fn netlink_tc_restarts_replace_the_one_filter_and_cleanup_removes_it() {
    let mut site = Site::new(&["pod-a"], false);
    site.keep_pins_on_exit = true;
    site.write_manifest("web.yaml", &service("web", "10.96.0.10", 30080).to_yaml());
    site.write_manifest(
        "web-slice.yaml",
        &slice("web", &[(&site.pod_ip("pod-a"), "node-a")]).to_yaml(),
    );
    let nodeport = format!("{NODE_A_IP}:30080");
    let netlink = ["--tc-attach", "netlink"];
    let mut program_ids = Vec::new();
    // A first start and three restarts, on the netlink path this 6.18 kernel would not take.
    for round in 0..4 {
        site.start_agents_with(&netlink);
        let tc_pin = site.bpffs[0].path().join("links/iface-lan0/tc");
        // Replies leave through tc egress: a NodePort answering the client proves it runs.
        let answered = site.probe_until(
            &["tcp", &nodeport, "--count", "5", "--whoami"],
            Duration::from_secs(10),
            |r| r.replies.values().sum::<u64>() == 5,
        );
        assert!(all_from(&answered, CLIENT_IP), "{answered:?}");
        let filters = tc_filters(&site);
        assert_eq!(
            filters.len(),
            1,
            "round {round}: one filter, not one per start: {filters:?}
{}",
            site.logs()
        );
        assert!(
            filters[0].contains("pref 19522") && filters[0].contains("handle 0x1"),
            "{filters:?}"
        );
        assert!(!tc_pin.exists(), "a tcx link pinned on the netlink path");
        program_ids.push(filter_program_id(&filters[0]));
        let log = site.logs();
        let expected = if round == 0 {
            "Filter"
        } else {
            "ReplacedFilter"
        };
        assert!(
            log.contains(&format!("tc={expected} {{")),
            "round {round}: {expected} not logged:
{log}"
        );
        for agent in &mut site.agents {
            assert!(agent.terminate().success());
        }
    }
    let distinct: std::collections::BTreeSet<_> = program_ids.iter().collect();
    assert_eq!(
        distinct.len(),
        4,
        "each agent's own program ran: {program_ids:?}"
    );

    // Back on tcx (auto on 6.18): the filter goes, the tcx link is pinned.
    site.start_agents();
    assert_eq!(tc_filters(&site), Vec::<String>::new());
    assert!(site.bpffs[0].path().join("links/iface-lan0/tc").exists());
    let answered = site.probe(&["tcp", &nodeport, "--count", "5", "--whoami"]);
    assert!(
        all_from(&answered, CLIENT_IP) && answered.failures() == 0,
        "{answered:?}"
    );
    for agent in &mut site.agents {
        assert!(agent.terminate().success());
    }

    // On netlink once more, then cleanup: nothing of the agent is left on the interface.
    site.start_agents_with(&netlink);
    assert_eq!(tc_filters(&site).len(), 1);
    assert!(
        !site.bpffs[0].path().join("links/iface-lan0/tc").exists(),
        "the tcx link of the run before stayed"
    );
    let answered = site.probe(&["tcp", &nodeport, "--count", "5", "--whoami"]);
    assert!(
        all_from(&answered, CLIENT_IP) && answered.failures() == 0,
        "{answered:?}"
    );
    for agent in &mut site.agents {
        assert!(agent.terminate().success());
    }
    let bpffs = site.bpffs[0].path().display().to_string();
    let cleanup = command_in(Some(site.node_a.netns()), None, AGENT)
        .expect("cleanup command")
        .args(["cleanup", "--bpffs", &bpffs])
        .output()
        .expect("lb-agent cleanup");
    assert!(
        cleanup.status.success(),
        "{}",
        String::from_utf8_lossy(&cleanup.stderr)
    );
    assert_eq!(
        tc_filters(&site),
        Vec::<String>::new(),
        "cleanup left the tc filter"
    );
    let gone = site.probe(&["tcp", &nodeport, "--count", "1", "--timeout-ms", "300"]);
    assert!(gone.replies.is_empty(), "{gone:?}");
}

#[test]
fn direct_connections_reusing_the_ports_of_nodeport_flows_are_left_untouched() {
    let mut site = Site::new(&["pod-a"], false);
    site.write_manifest("web.yaml", &service("web", "10.96.0.10", 30080).to_yaml());
    site.write_manifest(
        "web-slice.yaml",
        &slice("web", &[(&site.pod_ip("pod-a"), "node-a")]).to_yaml(),
    );
    site.start_agents();
    let nodeport = format!("{NODE_A_IP}:30080");
    site.probe_until(
        &["tcp", &nodeport, "--count", "5"],
        Duration::from_secs(10),
        |r| r.replies.get("pod-a") == Some(&5),
    );
    // The client also reaches the pod network directly, through node-a (a flat pod network).
    site.client
        .route("10.244.0.0/24", NODE_A_IP)
        .expect("the client's route to the pods");

    // Many NodePort connections leave closed flows behind on many client ports ...
    let through_nodeport = site.probe(&["tcp", &nodeport, "--count", "2000"]);
    assert_eq!(through_nodeport.failures(), 0, "{through_nodeport:?}");
    // ... and direct connections from the same client reuse some of those ports: their
    // replies must not be taken for NodePort replies (about 7% would be, ~140 connections).
    let direct = format!("{}:{POD_PORT}", site.pod_ip("pod-a"));
    let direct = site.probe(&["tcp", &direct, "--count", "2000", "--timeout-ms", "1000"]);
    assert_eq!(direct.failures(), 0, "{direct:?}\n{}", site.logs());
    assert_eq!(direct.replies.get("pod-a"), Some(&2000), "{direct:?}");
}

/// The port of the echo servers the long-lived connection tests use.
const ECHO_PORT: u16 = 7000;

/// Runs `f` on a thread inside `netns` (sockets made there stay in that namespace).
fn in_netns<T: Send + 'static>(netns: &Netns, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = netns.path().to_owned();
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).expect("namespace file");
        // SAFETY: a valid namespace fd; this thread only.
        let entered =
            unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&file), libc::CLONE_NEWNET) };
        assert_eq!(entered, 0, "setns into {}", path.display());
        f()
    })
    .join()
    .expect("namespace thread")
}

/// An echo server in `pod`: every line a connection sends comes back prefixed with the
/// pod's name, for as long as the connection lasts.
fn echo_server(pod: &Pod) {
    let name = pod.name.clone();
    let listener = in_netns(&pod.netns, move || {
        std::net::TcpListener::bind(("0.0.0.0", ECHO_PORT)).expect("binding the echo port")
    });
    std::thread::spawn(move || {
        for conn in listener.incoming().map_while(Result::ok) {
            let name = name.clone();
            std::thread::spawn(move || {
                let mut writer = conn.try_clone().expect("cloning a connection");
                for line in BufReader::new(conn).lines().map_while(Result::ok) {
                    if writeln!(writer, "{name} {line}").is_err() {
                        return;
                    }
                }
            });
        }
    });
}

/// A long-lived connection from the outside client, and the pod it reached.
struct LongLived {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
    pod: String,
}

impl LongLived {
    /// Sends a line and returns the name of the pod that echoed it.
    fn exchange(&mut self, text: &str) -> Result<String, String> {
        writeln!(self.writer, "{text}").map_err(|e| format!("send: {e}"))?;
        let mut line = String::new();
        self.reader
            .read_line(&mut line)
            .map_err(|e| format!("receive: {e}"))?;
        let (pod, echoed) = line
            .trim_end()
            .split_once(' ')
            .ok_or_else(|| format!("connection closed or garbled: {line:?}"))?;
        if echoed != text {
            return Err(format!("{pod} echoed {echoed:?} for {text:?}"));
        }
        Ok(pod.to_owned())
    }
}

fn open_long_lived(site: &Site, target: &str, count: usize) -> Vec<LongLived> {
    let target: SocketAddr = target.parse().unwrap();
    let streams = in_netns(site.client.netns(), move || {
        (0..count)
            .map(|_| {
                let conn = TcpStream::connect_timeout(&target, Duration::from_secs(2))
                    .expect("connecting to the NodePort");
                conn.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
                conn
            })
            .collect::<Vec<_>>()
    });
    streams
        .into_iter()
        .map(|writer| {
            let mut conn = LongLived {
                reader: BufReader::new(writer.try_clone().unwrap()),
                writer,
                pod: String::new(),
            };
            conn.pod = conn.exchange("hello").expect("first exchange");
            conn
        })
        .collect()
}

/// Every connection still talks to the pod it first reached; the failures, named.
fn still_on_their_pods(connections: &mut [LongLived], round: &str) -> Vec<String> {
    connections
        .iter_mut()
        .enumerate()
        .filter_map(|(i, conn)| match conn.exchange(round) {
            Ok(pod) if pod == conn.pod => None,
            Ok(pod) => Some(format!("connection {i}: {} -> {pod}", conn.pod)),
            Err(error) => Some(format!("connection {i} (on {}): {error}", conn.pod)),
        })
        .collect()
}

/// The NodePort Service `echo`: TCP 70 (node port 30070) to ECHO_PORT.
fn echo_service() -> ServiceManifest {
    ServiceManifest::cluster_ip("default", "echo", "10.96.0.70")
        .service_type("NodePort")
        .port("echo", "TCP", 70, ECHO_PORT)
        .node_port(30070)
}

/// The echo EndpointSlice: (address, ready, serving, terminating) per endpoint, on node-a.
fn echo_slice(endpoints: &[(&str, bool, bool, bool)]) -> SliceManifest {
    let slice = SliceManifest::new("default", "echo-1", "echo").port("echo", "TCP", ECHO_PORT);
    endpoints
        .iter()
        .fold(slice, |slice, &(ip, ready, serving, terminating)| {
            slice
                .endpoint(ip)
                .on_node("node-a")
                .conditions(ready, serving, terminating)
        })
}

/// Writes the echo Service with pod-a and pod-b ready; returns the NodePort's address.
fn start_echo(site: &Site) -> String {
    let (a, b) = (site.pod_ip("pod-a"), site.pod_ip("pod-b"));
    site.write_manifest("echo.yaml", &echo_service().to_yaml());
    site.write_manifest(
        "echo-slice.yaml",
        &echo_slice(&[(&a, true, true, false), (&b, true, true, false)]).to_yaml(),
    );
    format!("{NODE_A_IP}:30070")
}

/// Opens connections through the NodePort until one reaches `pod` (the agent programmed it).
fn wait_until_reached(site: &Site, pod: &str) {
    let target = format!("{NODE_A_IP}:30070");
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if open_long_lived(site, &target, 8)
            .iter()
            .any(|c| c.pod == pod)
        {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("no new connection reached {pod}\n{}", site.logs());
}

/// Long-lived connections through a NodePort keep their pod: when a backend is added (some
/// flows are then off their Maglev pick), and across agent restarts by SIGTERM and by
/// kill -9, which adopt the pinned maps with every backend and service id as it was.
#[test]
fn long_lived_nodeport_connections_keep_their_pod_across_scale_up_and_agent_restarts() {
    let mut site = Site::new(&["pod-a", "pod-b", "pod-c"], false);
    site.keep_pins_on_exit = true;
    for pod in &site.pods {
        echo_server(pod);
    }
    let target = start_echo(&site);
    site.start_agents();
    let (a, b, c) = (
        site.pod_ip("pod-a"),
        site.pod_ip("pod-b"),
        site.pod_ip("pod-c"),
    );
    let mut connections = open_long_lived(&site, &target, 48);
    let mut spread = std::collections::BTreeMap::<String, usize>::new();
    for conn in &connections {
        *spread.entry(conn.pod.clone()).or_default() += 1;
    }
    assert!(
        spread.get("pod-a").is_some_and(|n| *n > 0) && spread.get("pod-b").is_some_and(|n| *n > 0),
        "48 connections over two pods: {spread:?}"
    );

    // Scale up: a third pod. Flows whose Maglev entry now names pod-c stay where they are.
    site.write_manifest(
        "echo-slice.yaml",
        &echo_slice(&[
            (&a, true, true, false),
            (&b, true, true, false),
            (&c, true, true, false),
        ])
        .to_yaml(),
    );
    wait_until_reached(&site, "pod-c");
    let moved = still_on_their_pods(&mut connections, "after scale-up");
    assert!(moved.is_empty(), "{moved:?}\n{}", site.logs());

    // A rollout: SIGTERM, a new agent adopts the maps.
    for agent in &mut site.agents {
        assert!(agent.terminate().success());
    }
    site.start_agents();
    let moved = still_on_their_pods(&mut connections, "after SIGTERM and restart");
    assert!(moved.is_empty(), "{moved:?}\n{}", site.logs());

    // A crash: kill -9, a new agent adopts the maps.
    for agent in &mut site.agents {
        agent.kill();
    }
    site.start_agents();
    let moved = still_on_their_pods(&mut connections, "after kill -9 and restart");
    assert!(moved.is_empty(), "{moved:?}\n{}", site.logs());
    let log = site.logs();
    assert!(
        log.contains("adopted maps pinned by an earlier agent"),
        "{log}"
    );
}

/// A pod that turns serving and terminating while others are ready keeps its established
/// NodePort connections (they drain, as kube-proxy leaves their conntrack entries alone);
/// no new connection goes to it; once it leaves the slice, nothing reaches it any more.
#[test]
fn a_terminating_pod_keeps_its_nodeport_connections_and_gets_no_new_ones() {
    let mut site = Site::new(&["pod-a", "pod-b"], false);
    for pod in &site.pods {
        echo_server(pod);
    }
    let target = start_echo(&site);
    site.start_agents();
    let (a, b) = (site.pod_ip("pod-a"), site.pod_ip("pod-b"));
    let mut connections = open_long_lived(&site, &target, 32);
    let on_b = connections.iter().filter(|c| c.pod == "pod-b").count();
    assert!(
        on_b > 0 && on_b < 32,
        "32 connections over two pods: {on_b} on pod-b"
    );

    site.write_manifest(
        "echo-slice.yaml",
        &echo_slice(&[(&a, true, true, false), (&b, false, true, true)]).to_yaml(),
    );
    // New connections stop reaching pod-b once the change is programmed.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let fresh = open_long_lived(&site, &target, 32);
        if fresh.iter().all(|c| c.pod == "pod-a") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "new connections still reach pod-b\n{}",
            site.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let fresh = open_long_lived(&site, &target, 64);
    assert!(
        fresh.iter().all(|c| c.pod == "pod-a"),
        "a new connection went to the terminating pod"
    );
    let broken = still_on_their_pods(&mut connections, "while pod-b terminates");
    assert!(broken.is_empty(), "{broken:?}\n{}", site.logs());

    // XDP counts the flows of the NodePort in the service's own counters.
    let metrics = site.agents[0].logged_address("metrics_addr");
    let (_, text) = in_netns(site.node_a.netns(), move || {
        common::http_get(&metrics, "/metrics")
    });
    let forwarded: u64 = text
        .lines()
        .filter(|l| l.starts_with("lb_service_forwarded_total") && l.contains("name=\"echo\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum();
    assert!(forwarded >= 32 + 64, "{forwarded} flows counted:\n{text}");
}

/// In-node clients reach NodePorts at the socket, as kube-proxy's OUTPUT rules let them: a pod
/// at `nodeIP:nodePort` (TCP, UDP; `getpeername` and UDP replies show the address it used),
/// a pod reaching itself through its own NodePort (hairpin), the node itself at its address
/// and at 127.0.0.1; an `externalTrafficPolicy: Local` NodePort reached from inside uses
/// every endpoint. Without translation, these connections would be refused: no socket
/// listens on a NodePort, and XDP sees only traffic arriving on `lan0`.
#[test]
fn pods_and_the_node_itself_reach_node_ports_at_the_socket() {
    let mut site = Site::new(&["pod-a", "pod-b"], false);
    let (a, b) = (site.pod_ip("pod-a"), site.pod_ip("pod-b"));
    site.write_manifest("web.yaml", &service("web", "10.96.0.10", 30080).to_yaml());
    site.write_manifest(
        "web-slice.yaml",
        &slice("web", &[(&a, "node-a"), (&b, "node-a")]).to_yaml(),
    );
    site.write_manifest(
        "local.yaml",
        &service("local", "10.96.0.11", 30090)
            .external_traffic_policy("Local")
            .to_yaml(),
    );
    // Its one endpoint, pod-b, is said to run on another node: node-a has no local one.
    site.write_manifest(
        "local-slice.yaml",
        &slice("local", &[(&b, "node-b")]).to_yaml(),
    );
    site.start_agents();

    let nodeport = format!("{NODE_A_IP}:30080");
    let tcp = site.probe_in_node(Some("pod-a"), &["tcp", &nodeport, "--count", "40"]);
    assert_eq!(tcp.failures(), 0, "{tcp:?}\n{}", site.logs());
    assert!(
        tcp.replies.contains_key("pod-a") && tcp.replies.contains_key("pod-b"),
        "both pods answer, pod-a itself too (hairpin): {tcp:?}"
    );
    assert_eq!(tcp.peers.get(&nodeport), Some(&40), "getpeername: {tcp:?}");

    let udp_port = format!("{NODE_A_IP}:30081");
    let udp = site.probe_in_node(Some("pod-b"), &["udp", &udp_port, "--count", "20"]);
    assert_eq!(udp.failures(), 0, "{udp:?}");
    assert_eq!(
        udp.peers.get(&udp_port),
        Some(&20),
        "UDP replies come from the address the pod used: {udp:?}"
    );

    for target in [nodeport.as_str(), "127.0.0.1:30080"] {
        let node = site.probe_in_node(None, &["tcp", target, "--count", "10"]);
        assert_eq!(node.failures(), 0, "the node itself to {target}: {node:?}");
        assert_eq!(node.replies.values().sum::<u64>(), 10, "{node:?}");
    }

    // eTP Local without a local endpoint: outside clients of node-a are dropped, but pods
    // and the node reach it (every endpoint, as kube-proxy's cluster chain).
    let outside = site.probe(&[
        "tcp",
        &format!("{NODE_A_IP}:30090"),
        "--count",
        "1",
        "--timeout-ms",
        "500",
    ]);
    assert_eq!(outside.failures(), 1, "dropped from outside: {outside:?}");
    let local = site.probe_in_node(
        Some("pod-a"),
        &["tcp", &format!("{NODE_A_IP}:30090"), "--count", "5"],
    );
    assert_eq!(
        local.replies.get("pod-b"),
        Some(&5),
        "{local:?}\n{}",
        site.logs()
    );

    // An address added to the node while the agent runs is a NodePort address at once
    // (netlink), without any Service changing.
    run(
        site.node_a.netns(),
        &["ip", "addr", "add", "192.168.60.7/24", "dev", LAN_IFACE],
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let added = site.probe_in_node(
            Some("pod-a"),
            &[
                "tcp",
                "192.168.60.7:30080",
                "--count",
                "3",
                "--timeout-ms",
                "500",
            ],
        );
        if added.replies.values().sum::<u64>() == 3 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the added address is no NodePort address: {added:?}\n{}",
            site.logs()
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // Addresses that are not the node's are left alone.
    let elsewhere = site.probe_in_node(
        Some("pod-a"),
        &[
            "tcp",
            "192.168.60.99:30080",
            "--count",
            "1",
            "--timeout-ms",
            "500",
        ],
    );
    assert_eq!(elsewhere.failures(), 1, "{elsewhere:?}");
}

const LB_IP: &str = "203.0.113.7";

/// `lb_datapath_packets_total{program, reason}` on node-a's `/metrics`.
fn datapath_count(site: &Site, program: &str, reason: &str) -> u64 {
    let (status, text) = in_netns(site.node_a.netns(), || {
        common::http_get(METRICS_ADDR, "/metrics")
    });
    assert_eq!(status, 200, "{text}");
    let labels = format!("{{program=\"{program}\",reason=\"{reason}\"}}");
    let line = text
        .lines()
        .find(|l| l.starts_with("lb_datapath_packets_total") && l.contains(&labels))
        .unwrap_or_else(|| panic!("no lb_datapath_packets_total{labels} in\n{text}"));
    line.rsplit(' ').next().unwrap().parse().unwrap()
}

/// The refused counter of service `name` on node-a's `/metrics`.
fn refused_count(site: &Site, name: &str) -> u64 {
    let (status, text) = in_netns(site.node_a.netns(), || {
        common::http_get(METRICS_ADDR, "/metrics")
    });
    assert_eq!(status, 200, "{text}");
    text.lines()
        .filter(|l| {
            l.starts_with("lb_service_refused_total") && l.contains(&format!("name=\"{name}\""))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// A LoadBalancer Service `lb` at LB_IP (TCP 80, nodePort 30100; UDP 53, nodePort 30101)
/// with these source ranges.
fn ranged_service(ranges: &[&str]) -> String {
    ServiceManifest::cluster_ip("default", "lb", "10.96.0.20")
        .service_type("LoadBalancer")
        .port("http", "TCP", 80, POD_PORT)
        .node_port(30100)
        .port("dns", "UDP", 53, POD_PORT)
        .node_port(30101)
        .load_balancer_ingress(LB_IP)
        .load_balancer_source_ranges(ranges.iter().copied())
        .to_yaml()
}

#[test]
fn load_balancer_source_ranges_filter_outside_and_in_node_clients_and_follow_changes() {
    let mut site = Site::new(&["pod-a"], false);
    site.client
        .route(&format!("{LB_IP}/32"), NODE_A_IP)
        .expect("the client's route to the LB IP");
    let a = site.pod_ip("pod-a");
    site.write_manifest("lb.yaml", &ranged_service(&["192.168.60.0/24"]));
    site.write_manifest(
        "lb-slice.yaml",
        &with_ready(
            SliceManifest::new("default", "lb-1", "lb")
                .port("http", "TCP", POD_PORT)
                .port("dns", "UDP", POD_PORT),
            &[(&a, "node-a")],
        )
        .to_yaml(),
    );
    site.start_agents();
    let lb = format!("{LB_IP}:80");
    let timeout = Duration::from_secs(10);
    let one = ["--count", "1", "--timeout-ms", "500"];

    // The client is in the range.
    site.probe_until(&["tcp", &lb, "--count", "5"], timeout, |r| {
        r.replies.get("pod-a") == Some(&5)
    });

    // The range no longer holds the client: dropped and counted, while the NodePort (never
    // filtered) still answers it.
    let before = refused_count(&site, "lb");
    site.write_manifest("lb.yaml", &ranged_service(&["192.0.2.0/24", "not-a-cidr"]));
    let refused = site.probe_until(&[&["tcp", &lb][..], &one].concat(), timeout, |r| {
        r.failures() == 1
    });
    assert!(refused.replies.is_empty(), "{refused:?}");
    let nodeport = site.probe(&["tcp", &format!("{NODE_A_IP}:30100"), "--count", "3"]);
    assert_eq!(nodeport.replies.get("pod-a"), Some(&3), "{nodeport:?}");
    assert!(
        site.logs().contains("\\\"not-a-cidr\\\" is not a CIDR")
            || site.logs().contains("\"not-a-cidr\" is not a CIDR"),
        "the bad entry is named:\n{}",
        site.logs()
    );
    // Per-CPU counters are read at scrape time.
    let deadline = Instant::now() + timeout;
    while refused_count(&site, "lb") <= before {
        assert!(
            Instant::now() < deadline,
            "drops not counted\n{}",
            site.logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // In-node clients whose source the socket does not know yet: a pod and the node are in
    // none of the ranges, so they are refused at once (EPERM, as a netfilter drop on output).
    let pod = site.probe_in_node(Some("pod-a"), &[&["tcp", &lb][..], &one].concat());
    assert_eq!(pod.errors.get("permission"), Some(&1), "{pod:?}");
    let node = site.probe_in_node(None, &[&["tcp", &lb][..], &one].concat());
    assert_eq!(node.errors.get("permission"), Some(&1), "{node:?}");

    // A range holding pod-a's own address: a socket bound to it is checked by that address
    // and let in; an unbound one still is not (its source is not known at the socket).
    site.write_manifest(
        "lb.yaml",
        &ranged_service(&["192.0.2.0/24", &format!("{a}/32")]),
    );
    let lb_udp = format!("{LB_IP}:53");
    let deadline = Instant::now() + timeout;
    loop {
        let bound = site.probe_in_node(
            Some("pod-a"),
            &[&["udp", &lb_udp, "--source", &a][..], &one].concat(),
        );
        if bound.replies.get("pod-a") == Some(&1) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "a bound pod socket in the range is refused: {bound:?}\n{}",
            site.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let unbound = site.probe_in_node(Some("pod-a"), &[&["udp", &lb_udp][..], &one].concat());
    assert_eq!(unbound.errors.get("permission"), Some(&1), "{unbound:?}");

    // The range back, the node known (its IP is in it; its pod CIDR is too): everyone in.
    site.write_manifest(
        "node.yaml",
        "apiVersion: v1\nkind: Node\nmetadata:\n  name: node-a\nspec:\n  podCIDR: 10.244.0.0/24\n  \
         podCIDRs:\n  - 10.244.0.0/24\nstatus:\n  addresses:\n  - type: InternalIP\n    address: \
         192.168.60.1\n",
    );
    site.write_manifest(
        "lb.yaml",
        &ranged_service(&["192.168.60.0/24", "10.244.0.0/16"]),
    );
    site.probe_until(&["tcp", &lb, "--count", "5"], timeout, |r| {
        r.replies.get("pod-a") == Some(&5)
    });
    let deadline = Instant::now() + timeout;
    loop {
        let pod = site.probe_in_node(Some("pod-a"), &[&["tcp", &lb][..], &one].concat());
        let node = site.probe_in_node(None, &[&["tcp", &lb][..], &one].concat());
        if pod.replies.get("pod-a") == Some(&1) && node.replies.get("pod-a") == Some(&1) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "in-node clients still refused: {pod:?} {node:?}\n{}",
            site.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A Node manifest for node-a with this InternalIP.
fn node_a_manifest(internal_ip: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Node\nmetadata:\n  name: node-a\nstatus:\n  addresses:\n  - type: \
         Hostname\n    address: node-a\n  - type: InternalIP\n    address: {internal_ip}\n"
    )
}

#[test]
fn nodeport_addresses_primary_follows_the_nodes_internal_ip() {
    let mut site = Site::new(&["pod-a"], false);
    run(
        site.node_a.netns(),
        &["ip", "addr", "add", "192.168.60.3/24", "dev", LAN_IFACE],
    );
    site.write_manifest("web.yaml", &service("web", "10.96.0.10", 30080).to_yaml());
    site.write_manifest(
        "web-slice.yaml",
        &slice("web", &[(&site.pod_ip("pod-a"), "node-a")]).to_yaml(),
    );
    site.write_manifest("node.yaml", &node_a_manifest("192.168.60.3"));
    site.start_agents_with(&["--nodeport-addresses", "primary"]);
    let timeout = Duration::from_secs(10);
    let answers = |site: &Site, ip: &str| {
        let result = site.probe(&[
            "tcp",
            &format!("{ip}:30080"),
            "--count",
            "1",
            "--timeout-ms",
            "1000",
        ]);
        result.replies.get("pod-a") == Some(&1)
    };
    let deadline = Instant::now() + timeout;
    while !answers(&site, "192.168.60.3") {
        assert!(
            Instant::now() < deadline,
            "primary IP not served\n{}",
            site.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        !answers(&site, &NODE_A_IP.to_string()),
        "only the primary IP answers"
    );
    // The Node's InternalIP changes: the NodePort moves with it.
    site.write_manifest("node.yaml", &node_a_manifest(&NODE_A_IP.to_string()));
    let deadline = Instant::now() + timeout;
    while !answers(&site, &NODE_A_IP.to_string()) {
        assert!(
            Instant::now() < deadline,
            "new primary IP not served\n{}",
            site.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(!answers(&site, "192.168.60.3"), "the old one no longer");
}

/// What `lb-probe bind` printed.
#[derive(Debug, serde::Deserialize)]
struct BindResult {
    bound: bool,
    errno: Option<i32>,
}

const EADDRINUSE: i32 = 98;

/// `lb-probe bind PROTO ADDRESS` in node-a's agent cgroup (once there is one): from pod
/// `pod`'s network namespace, or from the node's own with `None`.
fn bind_in_node(site: &Site, pod: Option<&str>, proto: &str, address: &str) -> BindResult {
    let netns = match pod {
        Some(name) => {
            &site
                .pods
                .iter()
                .find(|p| p.name == name)
                .expect("pod")
                .netns
        }
        None => site.node_a.netns(),
    };
    let child = spawn_in(
        Some(netns),
        site.cgroups.first(),
        &*PROBE,
        &["bind", proto, address],
    )
    .expect("starting lb-probe bind");
    let output = child.wait_with_output().expect("waiting for lb-probe bind");
    assert!(
        output.status.success(),
        "lb-probe bind {proto} {address}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("lb-probe bind JSON")
}

fn assert_refused(site: &Site, proto: &str, address: &str) {
    let result = bind_in_node(site, None, proto, address);
    assert!(
        !result.bound && result.errno == Some(EADDRINUSE),
        "binding {proto} {address} on the node: {result:?} (wanted EADDRINUSE)\n{}",
        site.logs()
    );
}

fn assert_bound(site: &Site, pod: Option<&str>, proto: &str, address: &str) {
    let result = bind_in_node(site, pod, proto, address);
    assert!(
        result.bound,
        "binding {proto} {address} in {}: {result:?}",
        pod.unwrap_or("the node")
    );
}

/// Bind protection: a process of the node (in the agent's cgroup and network namespace)
/// cannot bind a served NodePort on any address, nor an externalIP at its port, with the
/// protocol served; other ports, the other protocol, and pods (their own namespaces) bind as
/// always; once the service is gone, the port binds again.
#[test]
fn binding_a_served_node_port_or_external_ip_fails_with_eaddrinuse_until_the_service_is_gone() {
    let mut site = Site::new(&["pod-a"], false);
    site.write_manifest(
        "web.yaml",
        &service("web", "10.96.0.10", 30080)
            .external_ips([EXTERNAL_IP])
            .to_yaml(),
    );
    site.write_manifest(
        "web-slice.yaml",
        &slice("web", &[(&site.pod_ip("pod-a"), "node-a")]).to_yaml(),
    );
    // The externalIP is an address of the node here, or nothing could bind it at all.
    run(
        site.node_a.netns(),
        &[
            "ip",
            "addr",
            "add",
            &format!("{EXTERNAL_IP}/32"),
            "dev",
            "lo",
        ],
    );
    // Before the agent, every one of these binds works: the refusals below are the agent's.
    assert_bound(&site, None, "tcp", "0.0.0.0:30080");
    assert_bound(&site, None, "udp", "0.0.0.0:30081");
    site.start_agents();

    // http is TCP nodePort 30080, dns UDP nodePort 30081.
    for address in [
        "0.0.0.0:30080",
        &format!("{NODE_A_IP}:30080"),
        "127.0.0.1:30080",
    ] {
        assert_refused(&site, "tcp", address);
    }
    assert_refused(&site, "udp", "0.0.0.0:30081");
    assert_refused(&site, "udp", &format!("{NODE_A_IP}:30081"));
    assert_refused(&site, "tcp", &format!("{EXTERNAL_IP}:80"));
    assert_refused(&site, "udp", &format!("{EXTERNAL_IP}:53"));
    // AF_INET6 sockets (post_bind6): `::` takes IPv4 too; a mapped address is its IPv4 one.
    assert_refused(&site, "tcp", "[::]:30080");
    assert_refused(&site, "udp", "[::]:30081");
    assert_refused(&site, "tcp", "[::ffff:127.0.0.1]:30080");
    assert_refused(&site, "tcp", &format!("[::ffff:{EXTERNAL_IP}]:80"));
    assert_bound(&site, None, "tcp", "[::]:30099");
    assert_bound(&site, None, "udp", "[::]:30080");

    // Not served: another port, the other protocol, the externalIP at another port.
    assert_bound(&site, None, "tcp", "0.0.0.0:30099");
    assert_bound(&site, None, "udp", "0.0.0.0:30080");
    assert_bound(&site, None, "tcp", "0.0.0.0:30081");
    assert_bound(&site, None, "tcp", &format!("{EXTERNAL_IP}:81"));
    // A pod has ports of its own: a NodePort number is free there.
    assert_bound(&site, Some("pod-a"), "tcp", "0.0.0.0:30080");
    assert_bound(&site, Some("pod-a"), "udp", "0.0.0.0:30081");

    site.remove_manifest("web.yaml");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !bind_in_node(&site, None, "tcp", "0.0.0.0:30080").bound {
        assert!(
            Instant::now() < deadline,
            "0.0.0.0:30080 still refused after the service was removed\n{}",
            site.logs()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_bound(&site, None, "udp", "0.0.0.0:30081");
    assert_bound(&site, None, "tcp", &format!("{EXTERNAL_IP}:80"));
    assert_bound(&site, None, "tcp", "[::]:30080");
}

/// `--bind-protection=false`: the served NodePort binds; the post_bind4 and post_bind6 links an
/// earlier agent (with it on) pinned are removed.
#[test]
fn bind_protection_off_leaves_binds_alone_and_removes_the_link_of_an_earlier_run() {
    let mut site = Site::new(&["pod-a"], false);
    site.keep_pins_on_exit = true;
    site.write_manifest("web.yaml", &service("web", "10.96.0.10", 30080).to_yaml());
    site.write_manifest(
        "web-slice.yaml",
        &slice("web", &[(&site.pod_ip("pod-a"), "node-a")]).to_yaml(),
    );
    site.start_agents();
    assert_refused(&site, "tcp", "0.0.0.0:30080");
    let links = |site: &Site| -> Vec<String> {
        lb_testkit::AgentReady {
            agent: Path::new(AGENT),
            bpffs: site.bpffs[0].path(),
            healthz: HEALTHZ_ADDR.parse().unwrap(),
            netns: Some(site.node_a.netns()),
            links: 0,
        }
        .status()
        .expect("lb-agent status")
        .links
        .into_iter()
        .map(|(program, _)| program)
        .collect()
    };
    let before = links(&site);
    assert!(before.iter().any(|p| p == "post_bind4"), "{before:?}");
    assert!(before.iter().any(|p| p == "post_bind6"), "{before:?}");

    // SIGTERM without --cleanup-on-exit: the links stay pinned, post_bind4/6 with them.
    site.agents.clear();
    assert_refused(&site, "tcp", "0.0.0.0:30080");
    assert_refused(&site, "tcp", "[::]:30080");
    site.start_agents_with(&["--bind-protection=false"]);
    let now = links(&site);
    assert!(!now.iter().any(|p| p.starts_with("post_bind")), "{now:?}");
    assert_bound(&site, None, "tcp", "0.0.0.0:30080");
    assert_bound(&site, None, "tcp", "[::]:30080");
    assert_bound(&site, None, "udp", "0.0.0.0:30081");
    // The rest of the data path is unchanged: the NodePort still answers.
    let reached = site.probe_in_node(
        None,
        &["tcp", &format!("{NODE_A_IP}:30080"), "--count", "3"],
    );
    assert_eq!(reached.replies.get("pod-a"), Some(&3), "{reached:?}");
}

const RESERVED_PORTS: &str = "/proc/sys/net/ipv4/ip_local_reserved_ports";

/// The agent reserves the NodePort range and the SNAT ports in its network namespace's
/// `ip_local_reserved_ports`, keeping what was there; a namespace the agent does not run in
/// is left alone.
#[test]
fn the_agent_reserves_the_node_port_and_snat_ranges_keeping_the_entries_there() {
    let mut site = Site::new(&[], true);
    let read = |netns: &Netns| -> String {
        netns
            .run(&["cat", RESERVED_PORTS])
            .expect("reading ip_local_reserved_ports")
            .trim()
            .to_owned()
    };
    run(
        site.node_a.netns(),
        &[
            "sysctl",
            "-q",
            "-w",
            "net.ipv4.ip_local_reserved_ports=12345,20000-20010",
        ],
    );
    let node_b = site.node_b.as_ref().expect("node-b").netns();
    run(
        node_b,
        &[
            "sysctl",
            "-q",
            "-w",
            "net.ipv4.ip_local_reserved_ports=40000",
        ],
    );
    // Ephemeral ranges that straddle the NodePort range (node-a) and the SNAT range (node-b).
    run(
        site.node_a.netns(),
        &[
            "sysctl",
            "-q",
            "-w",
            "net.ipv4.ip_local_port_range=32700 32800",
        ],
    );
    run(
        node_b,
        &[
            "sysctl",
            "-q",
            "-w",
            "net.ipv4.ip_local_port_range=60950 61050",
        ],
    );
    site.start_agents();
    let node_b = site.node_b.as_ref().expect("node-b").netns();
    assert_eq!(
        read(site.node_a.netns()),
        "12345,20000-20010,30000-32767,61000-65535",
        "{}",
        site.logs()
    );
    assert_eq!(
        read(node_b),
        "30000-32767,40000,61000-65535",
        "{}",
        site.logs()
    );
    // The client namespace runs no agent.
    assert_eq!(read(site.client.netns()), "");
    // Ephemeral ports skip them now: each node's ephemeral range was narrowed to straddle
    // one reserved range, and 20 sockets held open at once all got ports outside it.
    for (netns, reserved) in [
        (site.node_a.netns(), 30_000..=32_767),
        (node_b, 61_000..=65_535),
    ] {
        let ports: Vec<u16> = in_netns(netns, || {
            let sockets: Vec<std::net::UdpSocket> = (0..20)
                .map(|_| std::net::UdpSocket::bind("0.0.0.0:0").expect("an ephemeral port"))
                .collect();
            sockets
                .iter()
                .map(|s| s.local_addr().unwrap().port())
                .collect()
        });
        assert!(
            ports.iter().all(|p| !reserved.contains(p)),
            "ephemeral ports in {reserved:?}: {ports:?}"
        );
    }
}

/// A malformed `--nodeport-range` stops the agent before it does anything, naming the flag.
#[test]
fn a_bad_nodeport_range_is_refused_naming_the_flag() {
    for bad in ["32767-30000", "30000", "0-100", "a-b"] {
        let output = std::process::Command::new(AGENT)
            .args(["run", "--cgroup", "/nonexistent", "--nodeport-range", bad])
            .env("RUST_BACKTRACE", "0")
            .output()
            .expect("running lb-agent");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{bad}: {stderr}");
        assert!(stderr.contains("--nodeport-range"), "{bad}: {stderr}");
    }
}
