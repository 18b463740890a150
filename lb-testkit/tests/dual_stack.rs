//! The dual-stack topology and lb-probe's IPv6 and IPv4-mapped modes, without any load
//! balancer: real namespaces, real sockets, run as root. Every address must work at once (no
//! duplicate address detection to wait for), and only on-link routes exist.

use std::io::{BufRead as _, BufReader};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::process::Child;

use anyhow::{Context, Result, bail};
use lb_testkit::{Lan, Netns, Node, OutsideClient, Pod, require_root, spawn_in};
use serde_json::Value;

const PROBE: &str = env!("CARGO_BIN_EXE_lb-probe");
const PORT: &str = "8080";

/// Kills the server on drop.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `lb-probe serve` in `netns` on both families (one IPv6-only socket beside the IPv4 one).
fn serve(netns: &Netns, name: &str) -> Result<Server> {
    let mut child = spawn_in(
        Some(netns),
        None,
        PROBE,
        &[
            "serve", "--name", name, "--tcp", PORT, "--udp", PORT, "--bind", "0.0.0.0", "--bind",
            "::",
        ],
    )?;
    let mut line = String::new();
    BufReader::new(child.stdout.take().context("stdout")?).read_line(&mut line)?;
    if line.trim() != "ready" {
        bail!("lb-probe serve did not start: {line:?}");
    }
    Ok(Server(child))
}

/// `lb-probe ARGS` in `netns`: its JSON.
fn probe(netns: &Netns, args: &[&str]) -> Result<Value> {
    let output = spawn_in(Some(netns), None, PROBE, args)?.wait_with_output()?;
    if !output.status.success() {
        bail!(
            "lb-probe {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    serde_json::from_slice(&output.stdout).context("lb-probe JSON")
}

/// `[ip]:PORT` or `ip:PORT`.
fn at(ip: impl Into<IpAddr>) -> String {
    std::net::SocketAddr::new(ip.into(), PORT.parse().unwrap()).to_string()
}

fn mapped(ip: Ipv4Addr) -> Ipv6Addr {
    ip.to_ipv6_mapped()
}

/// The one key of `json[field]` with its count, asserting there is one.
fn only(json: &Value, field: &str) -> (String, u64) {
    let map = json[field]
        .as_object()
        .unwrap_or_else(|| panic!("{field}: {json}"));
    assert_eq!(map.len(), 1, "{field}: {json}");
    let (key, count) = map.iter().next().unwrap();
    (key.clone(), count.as_u64().unwrap())
}

/// `count` replies, every one starting with `prefix` (`--whoami` answers `IP:PORT`, a port
/// per connection).
fn all_start_with(json: &Value, prefix: &str, count: u64) -> bool {
    let replies = json["replies"].as_object().expect("replies");
    replies.keys().all(|seen| seen.starts_with(prefix))
        && replies.values().filter_map(Value::as_u64).sum::<u64>() == count
}

fn ip6(pod: &Pod) -> Ipv6Addr {
    pod.ip6.expect("a dual-stack pod has an IPv6 address")
}

#[test]
fn a_dual_stack_node_gives_the_bridge_and_pods_ipv6_addresses_that_work_at_once() -> Result<()> {
    require_root()?;
    let mut node = Node::dual_stack()?;
    let a = node.add_pod("a")?;
    let b = node.add_pod("b")?;
    assert_eq!(a.ip, Ipv4Addr::new(10, 244, 0, 10));
    assert_eq!(ip6(&a).to_string(), "fd00:10:244::10");
    assert_eq!(ip6(&b).to_string(), "fd00:10:244::11");
    assert_eq!(node.bridge_ip6().unwrap().to_string(), "fd00:10:244::1");
    assert_eq!(node.pod_subnet6().as_deref(), Some("fd00:10:244::/64"));

    // No address is tentative: the first connection, made at once, is answered.
    for netns in [&a.netns, &b.netns, node.netns()] {
        let tentative = netns.run(&["ip", "-6", "addr", "show", "tentative"])?;
        assert!(tentative.trim().is_empty(), "{}: {tentative}", netns.name());
    }
    let _serving = serve(&a.netns, "a")?;
    for from in [&b.netns, node.netns()] {
        let tcp = probe(
            from,
            &["tcp", &at(ip6(&a)), "--count", "1", "--timeout-ms", "2000"],
        )?;
        assert_eq!(only(&tcp, "replies"), ("a".into(), 1), "{tcp}");
    }
    // On-link routes only.
    for netns in [&a.netns, &b.netns, node.netns()] {
        let default = netns.run(&["ip", "-6", "route", "show", "default"])?;
        assert!(default.trim().is_empty(), "{}: {default}", netns.name());
        let default = netns.run(&["ip", "-4", "route", "show", "default"])?;
        assert!(default.trim().is_empty(), "{}: {default}", netns.name());
    }
    Ok(())
}

#[test]
fn an_ipv4_node_stays_ipv4_only() -> Result<()> {
    require_root()?;
    let mut node = Node::new()?;
    let a = node.add_pod("a")?;
    assert_eq!(a.ip6, None);
    assert_eq!(node.bridge_ip6(), None);
    let global = a
        .netns
        .run(&["ip", "-6", "addr", "show", "scope", "global"])?;
    assert!(global.trim().is_empty(), "{global}");
    Ok(())
}

#[test]
fn the_probe_reaches_a_dual_stack_server_over_each_family_and_reports_peers_as_the_socket_shows_them()
-> Result<()> {
    require_root()?;
    let mut node = Node::dual_stack()?;
    let server = node.add_pod("srv")?;
    let client = node.add_pod("cli")?;
    let _serving = serve(&server.netns, "srv")?;

    // IPv6, TCP: the server sees the client's IPv6 address; getpeername the server's.
    let v6 = at(ip6(&server));
    let tcp = probe(&client.netns, &["tcp", &v6, "--count", "3", "--whoami"])?;
    assert!(
        all_start_with(&tcp, &format!("[{}]:", ip6(&client)), 3),
        "{tcp}"
    );
    assert_eq!(only(&tcp, "peers"), (v6.clone(), 3), "{tcp}");
    assert_eq!(only(&tcp, "locals"), (ip6(&client).to_string(), 3), "{tcp}");

    // IPv6, UDP, unconnected and connected.
    for mode in [&[][..], &["--connected"]] {
        let mut args = vec!["udp", &v6, "--count", "3"];
        args.extend(mode);
        let udp = probe(&client.netns, &args)?;
        assert_eq!(only(&udp, "replies"), ("srv".into(), 3), "{udp}");
        assert_eq!(only(&udp, "peers"), (v6.clone(), 3), "{udp}");
        assert_eq!(only(&udp, "sources"), (v6.clone(), 3), "{udp}");
    }

    // IPv4 to the same server: its IPv4 socket sees an IPv4 client, not a mapped one.
    let v4 = at(server.ip);
    let tcp = probe(&client.netns, &["tcp", &v4, "--count", "1", "--whoami"])?;
    let (seen, _) = only(&tcp, "replies");
    assert!(seen.starts_with(&format!("{}:", client.ip)), "{tcp}");
    assert_eq!(only(&tcp, "locals"), (client.ip.to_string(), 1), "{tcp}");

    // IPv4-mapped from an AF_INET6 socket: carried over IPv4 (the server's IPv4 socket
    // answers, seeing the client's IPv4 address), while the client's socket shows every
    // address mapped: getpeername, recvfrom and getsockname.
    let mapped_target = at(mapped(server.ip));
    assert_eq!(mapped_target, "[::ffff:10.244.0.10]:8080");
    let tcp = probe(
        &client.netns,
        &["tcp", &mapped_target, "--count", "2", "--whoami"],
    )?;
    assert!(all_start_with(&tcp, &format!("{}:", client.ip), 2), "{tcp}");
    assert_eq!(only(&tcp, "peers"), (mapped_target.clone(), 2), "{tcp}");
    assert_eq!(
        only(&tcp, "locals"),
        (mapped(client.ip).to_string(), 2),
        "{tcp}"
    );
    for mode in [&[][..], &["--connected"]] {
        let mut args = vec!["udp", &mapped_target, "--count", "2"];
        args.extend(mode);
        let udp = probe(&client.netns, &args)?;
        assert_eq!(only(&udp, "replies"), ("srv".into(), 2), "{udp}");
        assert_eq!(only(&udp, "peers"), (mapped_target.clone(), 2), "{udp}");
        assert_eq!(only(&udp, "sources"), (mapped_target.clone(), 2), "{udp}");
        // An unconnected socket stays on the IPv6 wildcard; a connected one has its source.
        let local = if mode.is_empty() {
            Ipv6Addr::UNSPECIFIED
        } else {
            mapped(client.ip)
        };
        assert_eq!(only(&udp, "locals"), (local.to_string(), 2), "{udp}");
    }
    Ok(())
}

#[test]
fn a_dual_stack_lan_joins_nodes_and_an_outside_client_over_both_families() -> Result<()> {
    require_root()?;
    let lan = Lan::new()?;
    let node = Netns::new("na")?;
    let v6 = |host: u16| Ipv6Addr::new(0xfd00, 0x172, 0, 0, 0, 0, 0, host);
    lan.plug_dual_stack(
        &node,
        "lan0",
        (Ipv4Addr::new(192, 168, 60, 1), 24),
        (v6(1), 64),
    )?;
    let client = OutsideClient::on_lan_dual_stack(
        Netns::new("cli")?,
        &lan,
        "lan0",
        (Ipv4Addr::new(192, 168, 60, 100), 24),
        (v6(0x100), 64),
    )?;
    assert_eq!(client.ip6(), Some(v6(0x100)));
    let _serving = serve(&node, "node")?;

    let tcp = probe(
        client.netns(),
        &["tcp", &at(v6(1)), "--count", "1", "--whoami"],
    )?;
    let (seen, _) = only(&tcp, "replies");
    assert!(seen.starts_with("[fd00:172::100]:"), "{tcp}");
    let tcp = probe(
        client.netns(),
        &["tcp", "192.168.60.1:8080", "--count", "1"],
    )?;
    assert_eq!(only(&tcp, "replies"), ("node".into(), 1), "{tcp}");

    // A route the caller adds, of either family.
    client.route("fd00:10:96::/112", v6(1))?;
    let route = client
        .netns()
        .run(&["ip", "-6", "route", "get", "fd00:10:96::10"])?;
    assert!(route.contains("via fd00:172::1 dev lan0"), "{route}");
    Ok(())
}

#[test]
fn a_second_dual_stack_node_numbers_its_pods_in_its_own_subnet() -> Result<()> {
    require_root()?;
    let mut node = Node::dual_stack_in_subnet(Netns::new("nb")?, 1)?;
    let pod = node.add_pod("r")?;
    assert_eq!(pod.ip, Ipv4Addr::new(10, 244, 1, 10));
    assert_eq!(ip6(&pod).to_string(), "fd00:10:244:1::10");
    assert_eq!(node.bridge_ip(), Ipv4Addr::new(10, 244, 1, 1));
    assert_eq!(node.pod_subnet(), "10.244.1.0/24");
    assert_eq!(node.pod_subnet6().as_deref(), Some("fd00:10:244:1::/64"));
    let _serving = serve(node.netns(), "node-b")?;
    let bridge = at(node.bridge_ip6().unwrap());
    let tcp = probe(
        &pod.netns,
        &["tcp", &bridge, "--count", "1", "--timeout-ms", "2000"],
    )?;
    assert_eq!(only(&tcp, "replies"), ("node-b".into(), 1), "{tcp}");
    Ok(())
}
