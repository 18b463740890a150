//! An IPv6 NodePort end to end, in namespaces: an outside client, a node with the real XDP and
//! tc programs on its uplink, a pod behind a veth; the IPv6 maps (`LB6_*`) written directly
//! (not through the agent's model). Real TCP and UDP from outside to `[node]:nodePort` reach
//! the pod with the client's address kept, and the replies come back from the NodePort.
//! Needs root; everything lives in the test's own namespaces and bpffs directory.
mod common;

use std::{
    io::{BufRead as _, BufReader},
    process::Child,
};

use aya::maps::{HashMap, MapData};
use common::{BpffsDir, PROBE, ProbeResult};
use lb_agent::dataplane::{
    Dataplane, Limits,
    bpffs::PinDir,
    nodeport::{self, TcAttach},
    reasons::ReasonCounters,
};
use lb_common::{
    Addr6, Backend6, Frontend6Key, FrontendValue, MaglevTable, MapAddr, SlotKey, SlotValue,
    backend_flags, backend_states, frontend_kinds, map_names, scopes,
};
use lb_testkit::{Netns, spawn_in};

const NODE_IP: &str = "2001:db8:77::1";
const CLIENT_IP: &str = "2001:db8:77::2";
const NODE_POD_GW: &str = "fd00:244::1";
const POD_IP: &str = "fd00:244::10";
const NODE_PORT: u16 = 30080;
const POD_PORT: u16 = 8080;

fn addr(s: &str) -> Addr6 {
    Addr6::from_ip(s.parse().unwrap())
}

fn run(ns: &Netns, cmds: &[&[&str]]) {
    for cmd in cmds {
        ns.run(cmd)
            .unwrap_or_else(|e| panic!("{} in {}: {e:#}", cmd.join(" "), ns.name()));
    }
}

/// The three namespaces, joined by veth pairs made in the node's namespace.
struct Topology {
    node: Netns,
    outside: Netns,
    pod: Netns,
}

fn topology() -> Topology {
    let (node, outside, pod) = (
        Netns::new("v6node").unwrap(),
        Netns::new("v6out").unwrap(),
        Netns::new("v6pod").unwrap(),
    );
    run(
        &node,
        &[
            &[
                "ip",
                "link",
                "add",
                "ext0",
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                outside.name(),
            ],
            &[
                "ip",
                "link",
                "add",
                "pod0",
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                pod.name(),
            ],
            &[
                "ip",
                "-6",
                "addr",
                "add",
                &format!("{NODE_IP}/64"),
                "dev",
                "ext0",
                "nodad",
            ],
            &[
                "ip",
                "-6",
                "addr",
                "add",
                &format!("{NODE_POD_GW}/64"),
                "dev",
                "pod0",
                "nodad",
            ],
            &["ip", "link", "set", "lo", "up"],
            &["ip", "link", "set", "ext0", "up"],
            &["ip", "link", "set", "pod0", "up"],
            &["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"],
        ],
    );
    run(
        &outside,
        &[
            &[
                "ip",
                "-6",
                "addr",
                "add",
                &format!("{CLIENT_IP}/64"),
                "dev",
                "eth0",
                "nodad",
            ],
            &["ip", "link", "set", "lo", "up"],
            &["ip", "link", "set", "eth0", "up"],
        ],
    );
    run(
        &pod,
        &[
            &[
                "ip",
                "-6",
                "addr",
                "add",
                &format!("{POD_IP}/64"),
                "dev",
                "eth0",
                "nodad",
            ],
            &["ip", "link", "set", "lo", "up"],
            &["ip", "link", "set", "eth0", "up"],
            &["ip", "-6", "route", "add", "default", "via", NODE_POD_GW],
        ],
    );
    // Duplicate address detection of the link-local addresses (the global ones have none)
    // holds neighbour discovery back for a second or two: wait for it.
    for ns in [&node, &outside, &pod] {
        let started = std::time::Instant::now();
        while !ns
            .run(&["ip", "-6", "addr", "show", "tentative"])
            .unwrap()
            .trim()
            .is_empty()
        {
            assert!(
                started.elapsed() < std::time::Duration::from_secs(10),
                "addresses still tentative in {}",
                ns.name()
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }
    Topology { node, outside, pod }
}

/// Loads the object with its maps pinned in `bpffs`, attaches XDP and tc to the node's `ext0`
/// (from a thread inside the node's namespace: the interface is looked up there), and writes
/// one IPv6 NodePort (TCP and UDP) to the pod, the node's address and `ext0`'s SNAT source.
fn attach_and_program(node: &Netns, bpffs: &BpffsDir) {
    let root = bpffs.path().to_path_buf();
    std::thread::scope(|scope| scope.spawn(|| attach_in_node(node, &root)).join())
        .expect("attaching in the node's namespace");
}

fn attach_in_node(node: &Netns, root: &std::path::Path) {
    {
        node.enter_thread().expect("entering the node's namespace");
        let pins = PinDir::prepare(root).expect("preparing bpffs");
        let link_dir = pins.links().join("iface-ext0");
        std::fs::create_dir_all(&link_dir).unwrap();
        let mut dataplane = Dataplane::load(pins, Limits::default()).expect("loading the object");
        let ebpf = dataplane.ebpf_mut();
        nodeport::attach(ebpf, "ext0", &link_dir, TcAttach::default()).expect("attaching");
        let ifindex = nix_ifindex("ext0");
        let mut nodes: HashMap<&mut MapData, Addr6, u32> =
            HashMap::try_from(ebpf.map_mut(map_names::NODE_ADDRS_V6).unwrap()).unwrap();
        nodes.insert(addr(NODE_IP), 1, 0).unwrap();
        let mut ifaddrs: HashMap<&mut MapData, u32, Addr6> =
            HashMap::try_from(ebpf.map_mut(map_names::IFACE_ADDRS_V6).unwrap()).unwrap();
        ifaddrs.insert(ifindex, addr(NODE_IP), 0).unwrap();
        for (id, proto) in [(1u32, 6u8), (2, 17)] {
            let mut front: HashMap<&mut MapData, Frontend6Key, FrontendValue> =
                HashMap::try_from(ebpf.map_mut(map_names::FRONTENDS_V6).unwrap()).unwrap();
            let key = Frontend6Key {
                addr: [0; 4],
                port: NODE_PORT.to_be(),
                proto,
                scope: scopes::EXTERNAL,
            };
            let value = FrontendValue {
                service_id: id,
                count: 1,
                generation: 0,
                flags: 0,
                affinity_timeout_secs: 0,
                kind: frontend_kinds::NODE_PORT,
                pad: [0; 3],
            };
            front.insert(key, value, 0).unwrap();
            let mut backends: HashMap<&mut MapData, u32, Backend6> =
                HashMap::try_from(ebpf.map_mut(map_names::BACKENDS_V6).unwrap()).unwrap();
            let backend = Backend6 {
                addr: addr(POD_IP),
                port: POD_PORT.to_be(),
                state: backend_states::ACTIVE,
                flags: backend_flags::LOCAL,
            };
            backends.insert(id, backend, 0).unwrap();
            let mut slots: HashMap<&mut MapData, SlotKey, SlotValue> =
                HashMap::try_from(ebpf.map_mut(map_names::SLOTS_V4).unwrap()).unwrap();
            let slot = SlotKey {
                service_id: id,
                index: 0,
                generation: 0,
                pad: 0,
            };
            slots.insert(slot, SlotValue { backend_id: id }, 0).unwrap();
            let mut maglev: HashMap<&mut MapData, u32, MaglevTable> =
                HashMap::try_from(ebpf.map_mut(map_names::MAGLEV_V4).unwrap()).unwrap();
            let table = MaglevTable {
                backend_ids: [id; lb_common::MAGLEV_SIZE as usize],
                pad: 0,
            };
            maglev.insert(id, table, 0).unwrap();
        }
        // The programs stay attached through their pinned links, the maps pinned.
    }
}

/// The index of `iface` in the calling thread's namespace.
fn nix_ifindex(iface: &str) -> u32 {
    let name = std::ffi::CString::new(iface).unwrap();
    // SAFETY: a NUL-terminated name; the call reads it only.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    assert_ne!(index, 0, "no interface {iface}");
    index
}

fn serve(pod: &Netns) -> Child {
    let port = POD_PORT.to_string();
    let mut server = spawn_in(
        Some(pod),
        None,
        &*PROBE,
        &[
            "serve", "--name", "pod6", "--tcp", &port, "--udp", &port, "--bind", "::",
        ],
    )
    .expect("starting the pod's server");
    let mut first = String::new();
    BufReader::new(server.stdout.take().expect("stdout"))
        .read_line(&mut first)
        .expect("server ready line");
    assert_eq!(first.trim(), "ready");
    server
}

fn probe(outside: &Netns, args: &[&str]) -> ProbeResult {
    let child = spawn_in(Some(outside), None, &*PROBE, args).expect("starting lb-probe");
    let output = child.wait_with_output().expect("waiting for lb-probe");
    assert!(output.status.success(), "lb-probe {args:?} failed");
    serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "lb-probe printed no JSON ({e}): {}",
            String::from_utf8_lossy(&output.stdout)
        )
    })
}

#[test]
fn an_ipv6_nodeport_reaches_a_pod_from_outside_with_the_client_address_kept() {
    lb_testkit::require_root().expect("namespace tests need root");
    let t = topology();
    let bpffs = BpffsDir::new();
    attach_and_program(&t.node, &bpffs);
    let mut server = serve(&t.pod);
    let target = format!("[{NODE_IP}]:{NODE_PORT}");
    let tcp = probe(
        &t.outside,
        &[
            "tcp",
            &target,
            "--whoami",
            "--count",
            "3",
            "--timeout-ms",
            "2000",
        ],
    );
    let udp = probe(
        &t.outside,
        &[
            "udp",
            &target,
            "--whoami",
            "--count",
            "3",
            "--timeout-ms",
            "2000",
            "--connected",
        ],
    );
    let _ = server.kill();
    let _ = server.wait();
    for (proto, result) in [("tcp", &tcp), ("udp", &udp)] {
        assert_eq!(result.failures(), 0, "{proto}: {result:?}");
        assert_eq!(
            result.replies.values().sum::<u64>(),
            3,
            "{proto}: {result:?}"
        );
        assert!(
            result
                .replies
                .keys()
                .all(|seen| seen.starts_with(&format!("[{CLIENT_IP}]:"))),
            "{proto}: the pod must see the client's own address: {result:?}"
        );
        // The replies came from the NodePort the client used.
        assert!(
            result.peers.keys().all(|peer| *peer == target),
            "{proto}: replies from {:?}, expected {target}",
            result.peers
        );
    }
    let counts: std::collections::BTreeMap<_, _> =
        ReasonCounters::open_pinned(&PinDir::prepare(bpffs.path()).unwrap().maps())
            .expect("the reasons map is pinned")
            .read()
            .into_iter()
            .map(|c| ((c.program, c.reason), c.packets))
            .collect();
    assert!(
        counts.get(&("xdp", "forwarded")).copied().unwrap_or(0) >= 6,
        "{counts:?}"
    );
    assert!(
        counts
            .get(&("tc", "reply_translated"))
            .copied()
            .unwrap_or(0)
            >= 6,
        "{counts:?}"
    );
}
