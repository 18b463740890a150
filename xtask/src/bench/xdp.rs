//! Benchmark 7: the XDP program under BPF_PROG_TEST_RUN, and NodePort CRR from outside
//! through XDP and through kube-proxy's NodePort rules.

use std::net::Ipv4Addr;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context as _, Result};
use lb_testkit::objects::ManifestList;
use lb_testkit::{Netns, OutsideClient, Uplink};

use super::arms::client_args;
use super::cluster::{self, Cluster};
use super::kube::{self, POD_PORT, SERVICE_PORT, Svc};
use super::report::Results;
use super::services::{agent_limits, iptables_restore};
use super::{Plan, bpf, check_interrupted, ipt, sleep};

const NODEPORT_E: u16 = 30080;
const NODEPORT_I: u16 = 30081;
const NODE_EXT_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 77, 1);
const OUTSIDE_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 77, 2);
/// The node's uplink, where the agent serves NodePorts.
const NODE_IFACE: &str = "ext0";
/// A veth pair from the node's `ext0` to the outside client's `eth0`.
const UPLINK: Uplink<'static> = Uplink {
    node_iface: NODE_IFACE,
    node_ip: NODE_EXT_IP,
    client_iface: "eth0",
    client_ip: OUTSIDE_IP,
    prefix_len: 24,
};

/// The source address of the `flow`th new flow: OUTSIDE_IP's first byte, then `flow` in the
/// low 22 bits (with bit 22 set, away from the uplink's own addresses).
fn new_flow_source(outside: [u8; 4], flow: u32) -> [u8; 4] {
    let bits = (flow & 0x003f_ffff) | 0x0040_0000;
    [
        outside[0],
        (bits >> 16) as u8,
        (bits >> 8) as u8,
        bits as u8,
    ]
}

/// Entries in the IPv4 conntrack map (`lb-agent status -o json`), for the fill level the
/// new-flow figure was measured at.
fn conntrack_fill(cluster: &Cluster) -> Result<u64> {
    let status = cluster.agent_status_json()?;
    status["maps"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|m| m["name"] == "LB4_CT_V2")
        .and_then(|m| m["entries"].as_u64())
        .context("lb-agent status shows no conntrack map")
}

/// Benchmark 7: the agent restarted with `--nodeport-iface ext0` (a veth from the node to an
/// "outside" namespace) and a NodePort service; BPF_PROG_TEST_RUN of its XDP program against
/// an XDP_PASS-only program; NodePort CRR from outside through XDP (E) and through
/// kube-proxy's NodePort rules in the node namespace (I).
pub fn xdp(cluster: &mut Cluster, plan: &Plan, res: &mut Results) -> Result<()> {
    let outside = OutsideClient::direct(Netns::new("lbout")?, cluster.node.netns(), &UPLINK)?;
    cluster
        .node
        .netns()
        .run(&["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
    for sysctl in [
        "net.ipv4.ip_local_port_range=1024 65535",
        "net.ipv4.tcp_tw_reuse=1",
    ] {
        outside.netns().run(&["sysctl", "-qw", sysctl])?;
    }
    // Replies of local backends go to the client's address (no SNAT for local backends).
    for pod in &cluster.pods {
        let _ = pod
            .netns
            .run(&["ip", "route", "add", &UPLINK.subnet(), "via", "10.244.0.1"]);
    }
    let backends = cluster.backend_ips();
    let np = Svc {
        name: "measure-np".into(),
        port_name: "http".into(),
        protocol: "TCP",
        vip: Ipv4Addr::new(10, 100, 0, 9).into(),
        port: SERVICE_PORT,
        target_port: POD_PORT,
        endpoints: backends.clone(),
    };
    let manifest = ManifestList::new()
        .item(
            kube::service_manifest(&[&np])
                .service_type("NodePort")
                .node_port(NODEPORT_E),
        )
        .item(kube::slice_manifest(&[&np], "bench-node"));
    cluster.agent = None;
    let _ = std::fs::remove_file(cluster.manifests.0.join("services.json"));
    cluster.write_manifest("nodeport.json", &manifest.to_json())?;
    let mut extra = agent_limits(16);
    extra.extend(["--nodeport-iface".to_string(), NODE_IFACE.to_string()]);
    // Ready: XDP and tc are linked on ext0 too.
    cluster.start_agent(&extra)?;
    sleep(Duration::from_millis(300))?;

    // The XDP program on ext0.
    let link = cluster
        .node
        .netns()
        .run(&["ip", "-j", "-d", "link", "show", NODE_IFACE])?;
    let json: serde_json::Value = serde_json::from_str(link.trim())?;
    let id = json[0]["xdp"]["prog"]["id"]
        .as_u64()
        .or_else(|| {
            json[0]["xdp"]["attached"]
                .as_array()?
                .iter()
                .find_map(|a| a["prog"]["id"].as_u64())
        })
        .context("no XDP program on ext0")?;
    let prog = bpf::prog_fd_by_id(id)?;
    let pass = bpf::load_xdp_pass()?;
    let calls: u32 = if plan.quick { 2000 } else { 20000 };
    let (src, dst) = (OUTSIDE_IP.octets(), NODE_EXT_IP.octets());
    for m in [
        "hit, new flow",
        "tracked flow",
        "miss",
        "XDP_PASS only",
        "miss, repeat 1M",
        "XDP_PASS only, repeat 1M",
    ] {
        res.unit("7", m, "ns/packet", Some("XDP_PASS"));
    }
    res.unit("7", "conntrack entries after new flows", "entries", None);
    let mut new_flows: u32 = 0;
    for round in 0..plan.rounds {
        check_interrupted()?;
        let _ = round;
        let mean = |f: &mut dyn FnMut(u32) -> Result<u32>| -> Result<f64> {
            let mut total = 0u64;
            for i in 0..calls {
                total += u64::from(f(i)?);
            }
            Ok(total as f64 / f64::from(calls))
        };
        // Every packet of this row is a flow never seen before in this run: the client
        // address counts up over all rounds (2^22 addresses from OUTSIDE_IP's /10), so no
        // round resends a flow the conntrack map still holds.
        let hit = mean(&mut |i| {
            let flow = new_flows + i;
            let p = bpf::packet(new_flow_source(src, flow), dst, 40_000, NODEPORT_E, true);
            Ok(bpf::test_run(&prog, &p, 1)?.1)
        })?;
        new_flows += calls;
        let fill = conntrack_fill(cluster)?;
        res.add(
            "7",
            "conntrack entries after new flows",
            1,
            "E",
            fill as f64,
        );
        let tracked_pkt = bpf::packet(src, dst, 55555, NODEPORT_E, true);
        bpf::test_run(&prog, &tracked_pkt, 1)?;
        let tracked = mean(&mut |_| Ok(bpf::test_run(&prog, &tracked_pkt, 1)?.1))?;
        let miss_pkt = bpf::packet(src, dst, 55555, 9999, true);
        let miss = mean(&mut |_| Ok(bpf::test_run(&prog, &miss_pkt, 1)?.1))?;
        let pass_ns = mean(&mut |_| Ok(bpf::test_run(&pass, &miss_pkt, 1)?.1))?;
        let miss_1m = bpf::test_run(&prog, &miss_pkt, 1_000_000)?.1;
        let pass_1m = bpf::test_run(&pass, &miss_pkt, 1_000_000)?.1;
        for (m, v) in [
            ("hit, new flow", hit),
            ("tracked flow", tracked),
            ("miss", miss),
            ("XDP_PASS only", pass_ns),
            ("miss, repeat 1M", f64::from(miss_1m)),
            ("XDP_PASS only, repeat 1M", f64::from(pass_1m)),
        ] {
            res.add(
                "7",
                m,
                1,
                if m.starts_with("XDP_PASS") {
                    "XDP_PASS"
                } else {
                    "E"
                },
                v,
            );
        }
        // Over the XDP_PASS program, the same way measured.
        res.unit("7", "hit over XDP_PASS", "ns/packet", None);
        res.add("7", "hit over XDP_PASS", 1, "E", hit - pass_ns);
        res.unit("7", "tracked over XDP_PASS", "ns/packet", None);
        res.add("7", "tracked over XDP_PASS", 1, "E", tracked - pass_ns);
        res.unit("7", "miss over XDP_PASS", "ns/packet", None);
        res.add("7", "miss over XDP_PASS", 1, "E", miss - pass_ns);
    }
    // Check that a hit is translated (the destination in the output differs).
    let p = bpf::packet(src, dst, 44444, NODEPORT_E, true);
    let (retval, rewritten) = bpf::test_run_out(&prog, &p)?;
    println!("bench:   XDP hit: return value {retval}, destination rewritten: {rewritten}");

    // NodePort CRR from outside: E through XDP (port NODEPORT_E); I through kube-proxy's
    // NodePort rules in the node namespace (port NODEPORT_I; the XDP program passes it).
    let mut np_i = np.clone();
    np_i.name = "measure-npi".into();
    let rules = kube::iptables_nodeport(&np_i, NODEPORT_I);
    iptables_restore(cluster, cluster.node.netns(), &rules)?;
    for jump in kube::IPTABLES_JUMPS {
        let mut args = vec![ipt(), "-w"];
        args.extend_from_slice(jump);
        cluster.node.netns().run(&args)?;
    }
    // conntrack is now in use in the node namespace for both arms alike.
    res.unit("7", "NodePort CRR rate", "conn/s", Some("I"));
    res.unit("7", "NodePort CRR p50", "µs", Some("I"));
    res.unit("7", "NodePort CRR errors", "count", None);
    for round in 0..plan.rounds {
        for k in 0..2 {
            check_interrupted()?;
            let (arm, port) = [("E", NODEPORT_E), ("I", NODEPORT_I)][(k + round) % 2];
            let mut cmd = lb_testkit::command_in(Some(outside.netns()), None, "taskset")?;
            cmd.args(["-c", &cluster::CLIENT_CPU.to_string()])
                .arg(&cluster.bench_bin)
                .args(client_args(
                    "crr",
                    &[format!("{NODE_EXT_IP}:{port}")],
                    plan.dur_ms,
                    &[],
                ))
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            let out = cluster::Proc(cmd.spawn()?).wait_output()?;
            let json: serde_json::Value = serde_json::from_slice(&out)?;
            res.add(
                "7",
                "NodePort CRR rate",
                1,
                arm,
                json["rate"].as_f64().unwrap_or(f64::NAN),
            );
            res.add(
                "7",
                "NodePort CRR p50",
                1,
                arm,
                json["p50_us"].as_f64().unwrap_or(f64::NAN),
            );
            res.add(
                "7",
                "NodePort CRR errors",
                1,
                arm,
                json["errors"].as_f64().unwrap_or(f64::NAN),
            );
        }
    }
    cluster.agent = None;
    let _ = std::fs::remove_file(cluster.manifests.0.join("nodeport.json"));
    drop(outside);
    Ok(())
}
