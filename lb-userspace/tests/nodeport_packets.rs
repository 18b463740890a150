//! The north-south programs on exact packets, katran style: the real XDP and tc programs of
//! the agent's eBPF object, run with BPF_PROG_TEST_RUN, their maps written by the agent's own
//! reconciler; each case gives a frame in, the verdict and the exact frame out. Checksums of
//! every frame out are recomputed from scratch and checked, and a mismatch prints both
//! frames' headers. Needs root (it loads programs), attaches nothing.
mod common;
mod packet;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use aya::programs::{TestRun as _, TestRunOptions};
use common::BpffsDir;
use lb_agent::{
    dataplane::{
        BpfServiceMaps, Dataplane, Limits,
        bpffs::PinDir,
        nodeport::{self, NodeAddrMaps},
        reasons::ReasonCounters,
    },
    model::{
        Backend, BackendSet, DesiredService, DesiredState, Endpoints, Family, Frontend,
        FrontendKind, Protocol, ServicePortName, SetKey, SourceRanges,
    },
    reconcile::{Reconciler, maglev},
};
use lb_common::{
    Ct4Key, Ct4Value, MAGLEV_SIZE, Rev4Value, ct_flags, ct_state, ct_timeouts, flow_hash,
    snat_ports,
};
use packet::{
    ACK, FIN, Headers, Packet, RST, SYN, fragments, icmp_error, tcp, udp, verify_checksums,
};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const TC_ACT_OK: u32 = 0;

const NODE: &str = "192.168.50.2";
const CLIENT: &str = "203.0.113.7";
const POD_A: &str = "10.244.0.10";
const POD_B: &str = "10.244.0.11";
const REMOTE_POD: &str = "10.244.1.10";
const EXTERNAL_IP: &str = "198.51.100.10";
/// A router between the node and the client.
const ROUTER: &str = "192.0.2.254";
/// `BPF_PROG_TEST_RUN` runs XDP on the loopback device's queue: ifindex 1.
const TEST_RUN_IFINDEX: u32 = 1;

struct Harness {
    maps: BpfServiceMaps,
    reconciler: Reconciler,
    dataplane: Dataplane,
    _bpffs: BpffsDir,
}

impl Harness {
    fn new() -> Harness {
        lb_testkit::require_root().expect("the packet tests load eBPF programs: run as root");
        let bpffs = BpffsDir::new();
        let pins = PinDir::prepare(bpffs.path()).expect("preparing bpffs");
        let mut dataplane = Dataplane::load(pins, Limits::default()).expect("loading the object");
        let mut maps = dataplane.service_maps().expect("service maps");
        let mut addrs = NodeAddrMaps::take(dataplane.ebpf_mut()).expect("address maps");
        let reconciler = Reconciler::adopt(&mut maps).expect("adopting empty maps");
        nodeport::load_programs(dataplane.ebpf_mut()).expect("loading the programs");
        addrs
            .set_node_addrs(&BTreeSet::from([NODE.parse().unwrap()]))
            .unwrap();
        addrs
            .set_iface_addrs(&BTreeMap::from([(
                (TEST_RUN_IFINDEX, Family::V4),
                NODE.parse().unwrap(),
            )]))
            .unwrap();
        Harness {
            maps,
            reconciler,
            dataplane,
            _bpffs: bpffs,
        }
    }

    fn program(&mut self, state: &State) {
        self.program_desired(&state.desired());
    }

    fn program_desired(&mut self, desired: &DesiredState) {
        let report = self.reconciler.sync(desired, &mut self.maps);
        assert!(report.failed.is_empty(), "{:?}", report.failed);
    }

    /// Every reason's packets, summed over CPUs, read from the pin as `lb-agent status` and
    /// `/metrics` read them.
    fn reasons(&self) -> BTreeMap<(&'static str, &'static str), u64> {
        ReasonCounters::open_pinned(&self.dataplane.pins().maps())
            .expect("the reasons map is pinned")
            .read()
            .into_iter()
            .map(|c| ((c.program, c.reason), c.packets))
            .collect()
    }

    fn run(&mut self, hook: Hook, frame: &[u8], repeat: u32) -> (u32, Vec<u8>, u128) {
        self.try_run(hook, frame, repeat)
            .unwrap_or_else(|e| panic!("BPF_PROG_TEST_RUN: {e}"))
    }

    fn try_run(
        &mut self,
        hook: Hook,
        frame: &[u8],
        repeat: u32,
    ) -> Result<(u32, Vec<u8>, u128), aya::programs::ProgramError> {
        let mut out = vec![0u8; 512];
        let opts = TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            repeat,
            ..Default::default()
        };
        let ebpf = self.dataplane.ebpf_mut();
        let result = match hook {
            Hook::Xdp => nodeport::xdp_program(ebpf).unwrap().test_run(opts),
            Hook::TcEgress => nodeport::tc_program(ebpf).unwrap().test_run(opts),
        }?;
        out.truncate(result.data_size_out as usize);
        Ok((result.return_value, out, result.duration.as_nanos()))
    }
}

#[derive(Clone, Copy, Debug)]
enum Hook {
    Xdp,
    TcEgress,
}

/// One fixture: what goes in, what must come out.
struct Case {
    name: &'static str,
    hook: Hook,
    input: Vec<u8>,
    verdict: u32,
    output: Vec<u8>,
    /// Frames built broken on purpose are compared byte for byte, their checksums not checked.
    check_checksums: bool,
}

/// A case on raw frames (ICMP), checksums checked.
fn raw_case(name: &'static str, hook: Hook, input: Vec<u8>, verdict: u32, output: Vec<u8>) -> Case {
    Case {
        name,
        hook,
        input,
        verdict,
        output,
        check_checksums: true,
    }
}

fn case(name: &'static str, hook: Hook, input: Packet, verdict: u32, output: Packet) -> Case {
    Case {
        name,
        hook,
        input: input.bytes(),
        verdict,
        output: output.bytes(),
        check_checksums: true,
    }
}

/// A frame that must pass untouched.
fn untouched(name: &'static str, hook: Hook, frame: Vec<u8>) -> Case {
    let verdict = match hook {
        Hook::Xdp => XDP_PASS,
        Hook::TcEgress => TC_ACT_OK,
    };
    Case {
        name,
        hook,
        output: frame.clone(),
        input: frame,
        verdict,
        check_checksums: false,
    }
}

fn run_cases(harness: &mut Harness, cases: &[Case]) {
    let mut failures = Vec::new();
    for case in cases {
        let (verdict, out, _) = match harness.try_run(case.hook, &case.input, 1) {
            Ok(result) => result,
            Err(e) if !case.check_checksums => {
                // The kernel refuses some garbage before any program runs (tc test runs
                // need a well-formed network header); nothing can be mistranslated then.
                eprintln!(
                    "ok   {:?} {}: refused by the kernel ({e})",
                    case.hook, case.name
                );
                continue;
            }
            Err(e) => panic!("{}: BPF_PROG_TEST_RUN: {e}", case.name),
        };
        let mut problems = Vec::new();
        if verdict != case.verdict {
            problems.push(format!("verdict {verdict}, expected {}", case.verdict));
        }
        if out != case.output {
            problems.push(format!(
                "frame out differs\n      in:       {}\n      expected: {}\n      got:      {}",
                Headers(&case.input),
                Headers(&case.output),
                Headers(&out)
            ));
        }
        if case.check_checksums
            && let Err(e) = verify_checksums(&out)
        {
            problems.push(e);
        }
        if problems.is_empty() {
            eprintln!("ok   {:?} {}", case.hook, case.name);
        } else {
            eprintln!(
                "FAIL {:?} {}: {}",
                case.hook,
                case.name,
                problems.join("; ")
            );
            failures.push(case.name);
        }
    }
    assert!(failures.is_empty(), "failed cases: {failures:?}");
}

/// External frontends as these tests write them: each service's backends with their
/// locality, turned into the one service table's desired state by [`State::desired`].
#[derive(Clone, Default)]
struct State {
    frontends: BTreeMap<Frontend, Svc>,
}

#[derive(Clone)]
struct Svc {
    name: String,
    /// Backends new flows may pick, and whether each is on this node.
    backends: BTreeMap<Backend, bool>,
    /// Terminating backends kept for the flows that use them.
    draining: BTreeSet<Backend>,
    local_only: bool,
    affinity_timeout_secs: Option<u32>,
}

impl State {
    fn desired(&self) -> DesiredState {
        let mut desired = DesiredState::default();
        for (frontend, svc) in &self.frontends {
            let name = ServicePortName {
                namespace: "default".into(),
                name: svc.name.as_str().into(),
                port: "".into(),
            };
            let endpoints = if svc.local_only {
                Endpoints::Local
            } else {
                Endpoints::All
            };
            desired.frontends.insert(
                *frontend,
                DesiredService {
                    name: name.clone(),
                    family: Family::V4,
                    kind: if frontend.is_node_port() {
                        FrontendKind::NodePort
                    } else {
                        FrontendKind::ExternalIp
                    },
                    endpoints,
                    affinity_timeout_secs: svc.affinity_timeout_secs,
                    local_only: svc.local_only,
                    two_scopes: false,
                    source_ranges: None,
                },
            );
            desired.sets.insert(
                SetKey {
                    name,
                    family: Family::V4,
                    endpoints,
                },
                BackendSet {
                    backends: svc.backends.keys().copied().collect(),
                    terminating: BTreeSet::new(),
                    draining: svc.draining.clone(),
                    local: svc
                        .backends
                        .iter()
                        .filter(|(_, local)| **local)
                        .map(|(b, _)| *b)
                        .collect(),
                },
            );
        }
        desired
    }
}

fn frontend(ip: Option<&str>, port: u16, protocol: Protocol) -> Frontend {
    match ip {
        Some(ip) => Frontend::new(ip.parse().unwrap(), port, protocol),
        None => Frontend::node_port(Family::V4, port, protocol),
    }
}

fn service(name: &str, backends: &[(&str, u16, bool)], local_only: bool) -> Svc {
    Svc {
        name: name.into(),
        draining: BTreeSet::new(),
        backends: backends
            .iter()
            .map(|(ip, port, local)| {
                (
                    Backend {
                        ip: ip.parse().unwrap(),
                        port: *port,
                    },
                    *local,
                )
            })
            .collect(),
        local_only,
        affinity_timeout_secs: None,
    }
}

/// The SNAT port the XDP program claims first for a flow (see `snat_port` in xdp.rs).
fn first_snat_port(p: &Packet) -> u16 {
    let hash = flow_hash(
        wire_addr(p.src),
        wire_addr(p.dst),
        p.sport().to_be(),
        p.dport().to_be(),
        p.proto(),
    );
    snat_ports::FIRST + ((hash >> 7) % snat_ports::COUNT as u32) as u16
}

fn wire_addr(ip: Ipv4Addr) -> u32 {
    lb_common::addr_to_map(u32::from(ip))
}

fn state() -> State {
    use Protocol::{Tcp, Udp};
    let mut frontends = BTreeMap::new();
    let web = service("web", &[(POD_A, 8080, true)], false);
    frontends.insert(frontend(None, 30080, Tcp), web.clone());
    frontends.insert(frontend(Some(EXTERNAL_IP), 80, Tcp), web);
    frontends.insert(
        frontend(None, 30053, Udp),
        service("dns", &[(POD_A, 5353, true)], false),
    );
    frontends.insert(frontend(None, 30090, Tcp), service("local-none", &[], true));
    frontends.insert(
        frontend(None, 30091, Tcp),
        service("local-one", &[(POD_B, 8080, true)], true),
    );
    frontends.insert(
        frontend(None, 30081, Tcp),
        service("remote", &[(REMOTE_POD, 8080, false)], false),
    );
    frontends.insert(
        frontend(None, 30082, Udp),
        service("remote-udp", &[(REMOTE_POD, 5353, false)], false),
    );
    frontends.insert(frontend(None, 30099, Tcp), service("empty", &[], false));
    State { frontends }
}

#[test]
fn nodeport_external_ip_local_policy_snat_and_replies_packet_by_packet() {
    use Hook::{TcEgress, Xdp};
    let mut h = Harness::new();
    h.program(&state());

    let syn = tcp((CLIENT, 40000), (NODE, 30080), SYN);
    let snat_syn = tcp((CLIENT, 40002), (NODE, 30081), SYN);
    let snat_port = first_snat_port(&snat_syn);
    let snat_udp = udp((CLIENT, 5002), (NODE, 30082));
    let snat_udp_port = first_snat_port(&snat_udp);
    let mut no_checksum = udp((CLIENT, 5001), (NODE, 30053));
    no_checksum.l4 = packet::L4::Udp {
        sport: 5001,
        dport: 30053,
        checksum: false,
    };

    let cases = vec![
        // TCP NodePort, local backend: DNAT only, the client's address is kept.
        case(
            "TCP SYN to a NodePort goes to the local backend",
            Xdp,
            syn.clone(),
            XDP_PASS,
            syn.clone().with_dst(POD_A, 8080),
        ),
        case(
            "the same flow's ACK keeps its backend",
            Xdp,
            tcp((CLIENT, 40000), (NODE, 30080), ACK),
            XDP_PASS,
            tcp((CLIENT, 40000), (POD_A, 8080), ACK),
        ),
        case(
            "the backend's reply leaves from the NodePort (tc egress)",
            TcEgress,
            tcp((POD_A, 8080), (CLIENT, 40000), SYN | ACK),
            TC_ACT_OK,
            tcp((NODE, 30080), (CLIENT, 40000), SYN | ACK),
        ),
        // UDP
        case(
            "UDP to a NodePort",
            Xdp,
            udp((CLIENT, 5000), (NODE, 30053)),
            XDP_PASS,
            udp((CLIENT, 5000), (POD_A, 5353)),
        ),
        case(
            "UDP reply",
            TcEgress,
            udp((POD_A, 5353), (CLIENT, 5000)),
            TC_ACT_OK,
            udp((NODE, 30053), (CLIENT, 5000)),
        ),
        case(
            "UDP without checksum keeps checksum 0",
            Xdp,
            no_checksum.clone(),
            XDP_PASS,
            no_checksum.clone().with_dst(POD_A, 5353),
        ),
        // externalIPs at the service port
        case(
            "TCP to an externalIP at the service port",
            Xdp,
            tcp((CLIENT, 40001), (EXTERNAL_IP, 80), SYN),
            XDP_PASS,
            tcp((CLIENT, 40001), (POD_A, 8080), SYN),
        ),
        case(
            "reply from the externalIP",
            TcEgress,
            tcp((POD_A, 8080), (CLIENT, 40001), SYN | ACK),
            TC_ACT_OK,
            tcp((EXTERNAL_IP, 80), (CLIENT, 40001), SYN | ACK),
        ),
        // externalTrafficPolicy: Local
        case(
            "eTP Local without a local endpoint drops",
            Xdp,
            tcp((CLIENT, 40003), (NODE, 30090), SYN),
            XDP_DROP,
            tcp((CLIENT, 40003), (NODE, 30090), SYN),
        ),
        case(
            "eTP Local with a local endpoint: DNAT, client address kept",
            Xdp,
            tcp((CLIENT, 40004), (NODE, 30091), SYN),
            XDP_PASS,
            tcp((CLIENT, 40004), (POD_B, 8080), SYN),
        ),
        // eTP Cluster, remote backend: DNAT in XDP, the node's address and an SNAT port as
        // source at tc egress (after the stack routed it); the reply gets its client back as
        // destination in XDP and the frontend as source at tc egress.
        case(
            "eTP Cluster to a remote backend: DNAT in XDP",
            Xdp,
            snat_syn.clone(),
            XDP_PASS,
            tcp((CLIENT, 40002), (REMOTE_POD, 8080), SYN),
        ),
        case(
            "... SNAT to the node's address at tc egress",
            TcEgress,
            tcp((CLIENT, 40002), (REMOTE_POD, 8080), SYN),
            TC_ACT_OK,
            tcp((NODE, snat_port), (REMOTE_POD, 8080), SYN),
        ),
        case(
            "the remote backend's reply gets its client back (XDP)",
            Xdp,
            tcp((REMOTE_POD, 8080), (NODE, snat_port), SYN | ACK),
            XDP_PASS,
            tcp((REMOTE_POD, 8080), (CLIENT, 40002), SYN | ACK),
        ),
        case(
            "... and leaves from the NodePort (tc egress)",
            TcEgress,
            tcp((REMOTE_POD, 8080), (CLIENT, 40002), SYN | ACK),
            TC_ACT_OK,
            tcp((NODE, 30081), (CLIENT, 40002), SYN | ACK),
        ),
        case(
            "the SNAT flow's next packet keeps backend and port",
            Xdp,
            tcp((CLIENT, 40002), (NODE, 30081), ACK),
            XDP_PASS,
            tcp((CLIENT, 40002), (REMOTE_POD, 8080), ACK),
        ),
        case(
            "... SNAT port at tc egress",
            TcEgress,
            tcp((CLIENT, 40002), (REMOTE_POD, 8080), ACK),
            TC_ACT_OK,
            tcp((NODE, snat_port), (REMOTE_POD, 8080), ACK),
        ),
        case(
            "UDP to a remote backend",
            Xdp,
            snat_udp.clone(),
            XDP_PASS,
            udp((CLIENT, 5002), (REMOTE_POD, 5353)),
        ),
        case(
            "UDP SNAT at tc egress",
            TcEgress,
            udp((CLIENT, 5002), (REMOTE_POD, 5353)),
            TC_ACT_OK,
            udp((NODE, snat_udp_port), (REMOTE_POD, 5353)),
        ),
        case(
            "UDP reply from the remote backend (XDP)",
            Xdp,
            udp((REMOTE_POD, 5353), (NODE, snat_udp_port)),
            XDP_PASS,
            udp((REMOTE_POD, 5353), (CLIENT, 5002)),
        ),
        case(
            "UDP reply from the remote backend (tc egress)",
            TcEgress,
            udp((REMOTE_POD, 5353), (CLIENT, 5002)),
            TC_ACT_OK,
            udp((NODE, 30082), (CLIENT, 5002)),
        ),
        // ICMP errors about replies, from a router between node and client: to the backend
        // that sent the reply, quoting the packet as the backend sent it.
        raw_case(
            "fragmentation needed for a local backend's reply goes to the backend",
            Xdp,
            icmp_error(
                ROUTER,
                NODE,
                3,
                4,
                1400,
                &tcp((NODE, 30080), (CLIENT, 40000), ACK),
            ),
            XDP_PASS,
            icmp_error(
                ROUTER,
                POD_A,
                3,
                4,
                1400,
                &tcp((POD_A, 8080), (CLIENT, 40000), ACK),
            ),
        ),
        raw_case(
            "port unreachable for a UDP reply from an SNAT flow quotes the node's SNAT port",
            Xdp,
            icmp_error(ROUTER, NODE, 3, 3, 0, &udp((NODE, 30082), (CLIENT, 5002))),
            XDP_PASS,
            icmp_error(
                ROUTER,
                REMOTE_POD,
                3,
                3,
                0,
                &udp((REMOTE_POD, 5353), (NODE, snat_udp_port)),
            ),
        ),
        raw_case(
            "time exceeded for an externalIP reply",
            Xdp,
            icmp_error(
                ROUTER,
                EXTERNAL_IP,
                11,
                0,
                0,
                &tcp((EXTERNAL_IP, 80), (CLIENT, 40001), ACK),
            ),
            XDP_PASS,
            icmp_error(
                ROUTER,
                POD_A,
                11,
                0,
                0,
                &tcp((POD_A, 8080), (CLIENT, 40001), ACK),
            ),
        ),
        // ICMP errors about a client's translated packet, on their way to the client.
        raw_case(
            "the local backend's port unreachable comes from the NodePort, quoting it",
            TcEgress,
            icmp_error(POD_A, CLIENT, 3, 3, 0, &udp((CLIENT, 5000), (POD_A, 5353))),
            TC_ACT_OK,
            icmp_error(NODE, CLIENT, 3, 3, 0, &udp((CLIENT, 5000), (NODE, 30053))),
        ),
        raw_case(
            "the node's fragmentation needed quotes the packet the client sent",
            TcEgress,
            icmp_error(
                "10.244.0.1",
                CLIENT,
                3,
                4,
                1400,
                &tcp((CLIENT, 40000), (POD_A, 8080), ACK),
            ),
            TC_ACT_OK,
            icmp_error(
                "10.244.0.1",
                CLIENT,
                3,
                4,
                1400,
                &tcp((CLIENT, 40000), (NODE, 30080), ACK),
            ),
        ),
        untouched(
            "an ICMP error about an untracked client packet",
            TcEgress,
            icmp_error(POD_A, CLIENT, 3, 3, 0, &udp((CLIENT, 5999), (POD_A, 5353))),
        ),
        untouched(
            "an ICMP error about an untracked flow",
            Xdp,
            icmp_error(
                ROUTER,
                NODE,
                3,
                4,
                1400,
                &tcp((NODE, 30080), (CLIENT, 49999), ACK),
            ),
        ),
        untouched(
            "an ICMP error quoting the node's own traffic",
            Xdp,
            icmp_error(ROUTER, NODE, 3, 3, 0, &udp((NODE, 53), (CLIENT, 5000))),
        ),
        case(
            "FIN of a tracked flow is translated",
            Xdp,
            tcp((CLIENT, 40000), (NODE, 30080), FIN | ACK),
            XDP_PASS,
            tcp((CLIENT, 40000), (POD_A, 8080), FIN | ACK),
        ),
        case(
            "RST of a tracked flow is translated",
            Xdp,
            tcp((CLIENT, 40000), (NODE, 30080), RST),
            XDP_PASS,
            tcp((CLIENT, 40000), (POD_A, 8080), RST),
        ),
        // No match: untouched
        untouched(
            "eTP Cluster without endpoints: passed to the stack, which refuses",
            Xdp,
            tcp((CLIENT, 40005), (NODE, 30099), SYN).bytes(),
        ),
        untouched(
            "another port of the node",
            Xdp,
            tcp((CLIENT, 40006), (NODE, 22), SYN).bytes(),
        ),
        untouched(
            "another address at a NodePort number",
            Xdp,
            tcp((CLIENT, 40007), ("192.0.2.1", 30080), SYN).bytes(),
        ),
        untouched(
            "a node address at an SNAT port without flow",
            Xdp,
            tcp((REMOTE_POD, 8080), (NODE, 61_001), SYN | ACK).bytes(),
        ),
        untouched(
            "UDP to a TCP NodePort",
            Xdp,
            udp((CLIENT, 40008), (NODE, 30080)).bytes(),
        ),
        untouched(
            "egress of an unknown flow",
            TcEgress,
            tcp((POD_A, 8080), ("192.0.2.1", 1234), SYN | ACK).bytes(),
        ),
        untouched(
            "egress of the node's own traffic",
            TcEgress,
            udp((NODE, 53), (CLIENT, 5000)).bytes(),
        ),
    ];
    run_cases(&mut h, &cases);
}

/// Each packet is counted under exactly one reason of its program, the one that says why it
/// was passed or dropped: the counters move by exactly the expected one and nothing else.
#[test]
fn every_packet_is_counted_under_the_reason_of_its_verdict() {
    use Hook::{TcEgress, Xdp};
    let mut h = Harness::new();
    let mut desired = state().desired();
    // A LoadBalancer IP with source ranges and a ClusterIP, beside the NodePorts of `state`.
    const LB_IP: &str = "198.51.100.20";
    let lb = frontend(Some(LB_IP), 80, Protocol::Tcp);
    let web = desired.frontends[&frontend(None, 30080, Protocol::Tcp)].clone();
    let mut lb_service = web.clone();
    lb_service.kind = FrontendKind::LoadBalancer;
    lb_service.source_ranges = Some(SourceRanges {
        allowed: ["203.0.113.0/28".parse().unwrap()].into(),
        allow_node: false,
        allow_pods: false,
    });
    desired.frontends.insert(lb, lb_service);
    let mut cluster_ip = web;
    cluster_ip.kind = FrontendKind::ClusterIP;
    desired.frontends.insert(
        Frontend::new("10.96.0.80".parse().unwrap(), 80, Protocol::Tcp),
        cluster_ip,
    );
    h.program_desired(&desired);

    let snat_syn = tcp((CLIENT, 40002), (NODE, 30081), SYN);
    let snat_port = first_snat_port(&snat_syn);
    let mut steps: Vec<(&str, Hook, Vec<u8>, u32, &str)> = vec![
        (
            "a SYN to a NodePort, translated",
            Xdp,
            tcp((CLIENT, 40000), (NODE, 30080), SYN).bytes(),
            XDP_PASS,
            "forwarded",
        ),
        (
            "the flow's next packet, translated",
            Xdp,
            tcp((CLIENT, 40000), (NODE, 30080), ACK).bytes(),
            XDP_PASS,
            "forwarded",
        ),
        (
            "the backend's reply, reverse-translated at tc",
            TcEgress,
            tcp((POD_A, 8080), (CLIENT, 40000), SYN | ACK).bytes(),
            TC_ACT_OK,
            "reply_translated",
        ),
        (
            "eTP Local without a local endpoint",
            Xdp,
            tcp((CLIENT, 40003), (NODE, 30090), SYN).bytes(),
            XDP_DROP,
            "dropped_no_local_endpoint",
        ),
        (
            "eTP Cluster without endpoints",
            Xdp,
            tcp((CLIENT, 40005), (NODE, 30099), SYN).bytes(),
            XDP_PASS,
            "no_backend",
        ),
        (
            "another address",
            Xdp,
            tcp((CLIENT, 40007), ("192.0.2.1", 30080), SYN).bytes(),
            XDP_PASS,
            "not_a_service",
        ),
        (
            "another port of the node",
            Xdp,
            tcp((CLIENT, 40006), (NODE, 22), SYN).bytes(),
            XDP_PASS,
            "not_a_service",
        ),
        (
            "a ClusterIP from outside",
            Xdp,
            tcp((CLIENT, 45000), ("10.96.0.80", 80), SYN).bytes(),
            XDP_PASS,
            "cluster_ip",
        ),
        (
            "a LoadBalancer IP from outside its source ranges",
            Xdp,
            tcp(("192.0.2.99", 40000), (LB_IP, 80), SYN).bytes(),
            XDP_DROP,
            "dropped_source_range",
        ),
        (
            "eTP Cluster to a remote backend",
            Xdp,
            snat_syn.bytes(),
            XDP_PASS,
            "forwarded",
        ),
        (
            "... SNAT at tc",
            TcEgress,
            tcp((CLIENT, 40002), (REMOTE_POD, 8080), SYN).bytes(),
            TC_ACT_OK,
            "snat",
        ),
        (
            "... the remote backend's reply gets its client back",
            Xdp,
            tcp((REMOTE_POD, 8080), (NODE, snat_port), SYN | ACK).bytes(),
            XDP_PASS,
            "reply_translated",
        ),
        (
            "an ICMP error about a tracked reply",
            Xdp,
            icmp_error(
                ROUTER,
                NODE,
                3,
                4,
                1400,
                &tcp((NODE, 30080), (CLIENT, 40000), ACK),
            ),
            XDP_PASS,
            "icmp_translated",
        ),
        (
            "an ICMP error about no flow",
            Xdp,
            icmp_error(ROUTER, NODE, 3, 3, 0, &udp((NODE, 53), (CLIENT, 5000))),
            XDP_PASS,
            "icmp_not_tracked",
        ),
        (
            "UDP to a NodePort",
            Xdp,
            udp((CLIENT, 5000), (NODE, 30053)).bytes(),
            XDP_PASS,
            "forwarded",
        ),
        (
            "the local backend's port unreachable about it, at tc",
            TcEgress,
            icmp_error(POD_A, CLIENT, 3, 3, 0, &udp((CLIENT, 5000), (POD_A, 5353))),
            TC_ACT_OK,
            "icmp_translated",
        ),
        (
            "egress of the node's own traffic",
            TcEgress,
            udp((NODE, 53), (CLIENT, 5000)).bytes(),
            TC_ACT_OK,
            "not_a_flow",
        ),
        (
            "an ICMP error about no flow, at tc",
            TcEgress,
            icmp_error(POD_A, CLIENT, 3, 3, 0, &udp((CLIENT, 5999), (POD_A, 5353))),
            TC_ACT_OK,
            "icmp_not_tracked",
        ),
    ];
    // Fragments: a later one without its first, a datagram's first and later ones, both ways.
    let frag_in = fragments(&big_udp((CLIENT, 5200), (NODE, 30053), 0x0f01, 24), &[16]);
    let frag_reply = fragments(&big_udp((POD_A, 5353), (CLIENT, 5200), 0x0f02, 24), &[16]);
    for (name, hook, frame, verdict, reason) in [
        (
            "a later fragment whose first was not seen",
            Xdp,
            frag_in[1].clone(),
            XDP_PASS,
            "fragment_not_tracked",
        ),
        (
            "a first fragment to a NodePort",
            Xdp,
            frag_in[0].clone(),
            XDP_PASS,
            "forwarded",
        ),
        (
            "... its later fragment",
            Xdp,
            frag_in[1].clone(),
            XDP_PASS,
            "fragment_translated",
        ),
        (
            "a later fragment of a reply before its first, at tc",
            TcEgress,
            frag_reply[1].clone(),
            TC_ACT_OK,
            "fragment_not_tracked",
        ),
        (
            "the reply's first fragment",
            TcEgress,
            frag_reply[0].clone(),
            TC_ACT_OK,
            "reply_translated",
        ),
        (
            "... its later fragment",
            TcEgress,
            frag_reply[1].clone(),
            TC_ACT_OK,
            "fragment_translated",
        ),
    ] {
        steps.push((name, hook, frame, verdict, reason));
    }
    // Garbage aimed at the tracked flow: never parsed, whatever is wrong with it.
    let good = tcp((CLIENT, 40000), (NODE, 30080), ACK).bytes();
    let good_udp = udp((CLIENT, 5000), (NODE, 30053)).bytes();
    for (name, frame) in garbage(&good, &good_udp) {
        steps.push((name, Xdp, frame, XDP_PASS, "not_parsed"));
    }
    let reply = tcp((POD_A, 8080), (CLIENT, 40000), ACK).bytes();
    steps.push((
        "IPv4 options at tc",
        TcEgress,
        garbage(&reply, &udp((POD_A, 5353), (CLIENT, 5000)).bytes())
            .into_iter()
            .find(|(name, _)| *name == "IPv4 options")
            .unwrap()
            .1,
        TC_ACT_OK,
        "not_parsed",
    ));

    let mut failures = Vec::new();
    for (name, hook, frame, verdict, reason) in steps {
        let program = match hook {
            Xdp => "xdp",
            TcEgress => "tc",
        };
        let before = h.reasons();
        let (got, _, _) = h.run(hook, &frame, 1);
        let after = h.reasons();
        let moved: BTreeMap<_, _> = after
            .iter()
            .filter(|(key, n)| before.get(*key) != Some(*n))
            .map(|(key, n)| (*key, n - before.get(key).copied().unwrap_or(0)))
            .collect();
        let expected = BTreeMap::from([((program, reason), 1)]);
        if got != verdict || moved != expected {
            eprintln!(
                "FAIL {name}: verdict {got} (expected {verdict}), counted {moved:?} (expected {expected:?})"
            );
            failures.push(name);
        } else {
            eprintln!("ok   {name}: {program} {reason}");
        }
    }
    assert!(failures.is_empty(), "failed: {failures:?}");
}

/// Frames that are malformed, truncated or carry IP options (fragments too), built from
/// packets of tracked flows (XDP: the client's; tc: the backend's reply): every one passes untouched
/// (the stack drops or refuses it), none is translated.
#[test]
fn garbage_passes_untouched_and_is_never_translated() {
    use Hook::{TcEgress, Xdp};
    let mut h = Harness::new();
    h.program(&state());
    let tcp_in = tcp((CLIENT, 41000), (NODE, 30080), SYN);
    let udp_in = udp((CLIENT, 41001), (NODE, 30053));
    // Track both flows, so the garbage below is aimed at live entries in both directions.
    for p in [&tcp_in, &udp_in] {
        assert_eq!(h.run(Xdp, &p.bytes(), 1).0, XDP_PASS);
    }
    let tcp_reply = tcp((POD_A, 8080), (CLIENT, 41000), SYN | ACK);
    let udp_reply = udp((POD_A, 5353), (CLIENT, 41001));

    let mut cases = Vec::new();
    for (hook, good, good_udp) in [
        (Xdp, tcp_in.bytes(), udp_in.bytes()),
        (TcEgress, tcp_reply.bytes(), udp_reply.bytes()),
    ] {
        for (name, frame) in garbage(&good, &good_udp) {
            cases.push(untouched(name, hook, frame));
        }
    }
    run_cases(&mut h, &cases);
}

fn garbage(good: &[u8], good_udp: &[u8]) -> Vec<(&'static str, Vec<u8>)> {
    let edit = |frame: &[u8], f: &dyn Fn(&mut Vec<u8>)| {
        let mut frame = frame.to_vec();
        f(&mut frame);
        frame
    };
    let with_options = edit(good, &|b| {
        b[14] = 0x46; // IHL 6
        b[17] += 4; // total length
        b.splice(34..34, [1, 1, 1, 0]); // NOP NOP NOP EOL
    });
    let mut arp = packet::ETH.to_vec();
    arp[12..14].copy_from_slice(&[0x08, 0x06]);
    arp.extend([0u8; 28]);
    vec![
        ("only an Ethernet header", good[..14].to_vec()),
        ("IPv4 header cut short", good[..24].to_vec()),
        ("TCP header cut short", good[..40].to_vec()),
        ("UDP header cut short", good_udp[..38].to_vec()),
        ("IPv4 options", with_options.clone()),
        (
            "first fragment with IPv4 options",
            edit(&with_options, &|b| b[20] |= 0x20),
        ),
        (
            "first UDP fragment cut short",
            edit(&good_udp[..38], &|b| {
                b[20] |= 0x20;
                b[17] = 24
            }),
        ),
        (
            "TCP data offset below 5",
            edit(good, &|b| b[34 + 12] = 4 << 4),
        ),
        (
            "TCP data offset beyond the packet",
            edit(good, &|b| b[34 + 12] = 15 << 4),
        ),
        (
            "IP total length beyond the frame",
            edit(good, &|b| b[16] = 0x05),
        ),
        (
            "IP total length below the headers",
            edit(good, &|b| {
                b[16] = 0;
                b[17] = 30
            }),
        ),
        ("UDP length below 8", edit(good_udp, &|b| b[34 + 5] = 4)),
        (
            "UDP length beyond the packet",
            edit(good_udp, &|b| b[34 + 5] = 200),
        ),
        (
            "IPv6 EtherType",
            edit(good, &|b| b[12..14].copy_from_slice(&[0x86, 0xdd])),
        ),
        (
            "VLAN tag",
            edit(good, &|b| b[12..14].copy_from_slice(&[0x81, 0x00])),
        ),
        (
            "IP version 6 in an IPv4 frame",
            edit(good, &|b| b[14] = 0x65),
        ),
        (
            "ICMP echo",
            edit(&good[..42], &|b| {
                b[23] = 1;
                b[17] = 28;
                b[34..42].copy_from_slice(&[8, 0, 0, 0, 0, 1, 0, 1])
            }),
        ),
        ("ARP", arp),
    ]
}

/// A UDP datagram of `len` payload bytes (a recognisable pattern) with IP id `id`.
fn big_udp(src: (&str, u16), dst: (&str, u16), id: u16, len: usize) -> Packet {
    let mut p = udp(src, dst);
    p.id = id;
    p.payload = (0..len).map(|i| (i * 7 + 3) as u8).collect();
    p
}

/// Each fragment of `input` in, each fragment of `output` out (`sizes` as `fragments` takes
/// them), in order: first, middle, last.
fn fragment_cases(
    name: &'static str,
    hook: Hook,
    input: &Packet,
    verdict: u32,
    output: &Packet,
) -> Vec<Case> {
    const SIZES: [usize; 2] = [24, 24];
    let names = ["first", "middle", "last"];
    fragments(input, &SIZES)
        .into_iter()
        .zip(fragments(output, &SIZES))
        .zip(names)
        .map(|((input, output), which)| Case {
            name: Box::leak(format!("{name}: {which} fragment").into_boxed_str()),
            hook,
            input,
            verdict,
            output,
            check_checksums: true,
        })
        .collect()
}

/// IPv4 fragments, Cilium's way: the first fragment (with the UDP header) is translated like
/// a whole datagram and its ports remembered; the middle and last ones (no UDP header) get
/// the same addresses, with the IP checksum updated and the UDP checksum, over the whole
/// datagram, right in the first. Every frame out is exact. A later fragment whose first
/// fragment was not seen passes untouched (and stays so: reassembly fails, the datagram is
/// lost, as it would be dropped); those after its first are translated.
#[test]
fn fragments_of_a_udp_datagram_are_translated_in_xdp_and_tc() {
    use Hook::{TcEgress, Xdp};
    let mut h = Harness::new();
    h.program(&state());
    // 8 + 56 bytes of UDP: fragments of 24, 24 and 16 bytes.
    let request = big_udp((CLIENT, 5100), (NODE, 30053), 0x0a01, 56);
    let reply = big_udp((POD_A, 5353), (CLIENT, 5100), 0x0b01, 56);
    // SNAT: to the remote backend, the node's source; its reply, back to the client.
    let snat = big_udp((CLIENT, 5102), (NODE, 30082), 0x0a02, 56);
    let snat_port = first_snat_port(&snat);
    let remote_reply = big_udp((REMOTE_POD, 5353), (NODE, snat_port), 0x0c01, 56);
    // The later fragment comes before its first.
    let late_first = big_udp((CLIENT, 5104), (NODE, 30053), 0x0a03, 56);
    let late_frags = fragments(&late_first, &[24, 24]);

    let mut cases = vec![untouched(
        "a middle fragment before its first passes untouched",
        Xdp,
        late_frags[1].clone(),
    )];
    cases.extend(fragment_cases(
        "UDP to a NodePort, local backend",
        Xdp,
        &request,
        XDP_PASS,
        &request.clone().with_dst(POD_A, 5353),
    ));
    cases.extend(fragment_cases(
        "the local backend's fragmented reply leaves from the NodePort (tc)",
        TcEgress,
        &reply,
        TC_ACT_OK,
        &reply.clone().with_src(NODE, 30053),
    ));
    cases.extend(fragment_cases(
        "UDP to a NodePort, remote backend: DNAT in XDP",
        Xdp,
        &snat,
        XDP_PASS,
        &snat.clone().with_dst(REMOTE_POD, 5353),
    ));
    cases.extend(fragment_cases(
        "... the node's address and SNAT port as source at tc",
        TcEgress,
        &snat.clone().with_dst(REMOTE_POD, 5353),
        TC_ACT_OK,
        &snat
            .clone()
            .with_dst(REMOTE_POD, 5353)
            .with_src(NODE, snat_port),
    ));
    cases.extend(fragment_cases(
        "... the remote backend's fragmented reply gets its client back in XDP",
        Xdp,
        &remote_reply,
        XDP_PASS,
        &remote_reply.clone().with_dst(CLIENT, 5102),
    ));
    cases.extend(fragment_cases(
        "... and the NodePort as source at tc",
        TcEgress,
        &remote_reply.clone().with_dst(CLIENT, 5102),
        TC_ACT_OK,
        &remote_reply
            .clone()
            .with_dst(CLIENT, 5102)
            .with_src(NODE, 30082),
    ));
    let late_out = fragments(&late_first.clone().with_dst(POD_A, 5353), &[24, 24]);
    cases.push(raw_case(
        "the late first fragment is translated",
        Xdp,
        late_frags[0].clone(),
        XDP_PASS,
        late_out[0].clone(),
    ));
    cases.push(raw_case(
        "... and the fragment after it",
        Xdp,
        late_frags[2].clone(),
        XDP_PASS,
        late_out[2].clone(),
    ));
    cases.push(untouched(
        "a later fragment of the node's own traffic leaves untouched (tc)",
        TcEgress,
        fragments(&big_udp((NODE, 53), (CLIENT, 5000), 0x0d01, 56), &[24, 24])[1].clone(),
    ));
    // TCP: the first fragment needs the whole TCP header; a tracked flow's fragments follow it.
    let mut tcp_in = tcp((CLIENT, 41100), (NODE, 30080), SYN);
    tcp_in.id = 0x0e01;
    tcp_in.payload = (0..40).collect();
    cases.extend(fragment_cases(
        "TCP to a NodePort",
        Xdp,
        &tcp_in,
        XDP_PASS,
        &tcp_in.clone().with_dst(POD_A, 8080),
    ));
    run_cases(&mut h, &cases);

    let reasons = h.reasons();
    let count = |program, reason| reasons.get(&(program, reason)).copied().unwrap_or(0);
    // Later fragments translated: 2 each of the local request, the SNAT request and the
    // remote reply, 1 of the late datagram, 2 of TCP (XDP); 2 each at tc of the three.
    assert_eq!(count("xdp", "fragment_translated"), 9);
    assert_eq!(count("xdp", "fragment_not_tracked"), 1);
    assert_eq!(count("tc", "fragment_translated"), 6);
    assert_eq!(count("tc", "fragment_not_tracked"), 1);
}

/// The backend the kernel picks is the one the agent's Maglev table names for the flow's
/// hash, so every node with the same backends picks the same one; and a flow keeps its
/// backend when backends are added, while new flows use the new table.
#[test]
fn maglev_choice_matches_the_agents_table_and_flows_keep_their_backend() {
    let mut h = Harness::new();
    let pods = ["10.244.0.10", "10.244.0.11", "10.244.0.12"];
    let mut desired = State::default();
    let three: Vec<(&str, u16, bool)> = pods.iter().map(|p| (*p, 8080, true)).collect();
    desired.frontends.insert(
        frontend(None, 30080, Protocol::Tcp),
        service("web", &three, false),
    );
    h.program(&desired);

    let names: Vec<String> = pods.iter().map(|p| format!("{p}:8080")).collect();
    let table = maglev::table(&names, MAGLEV_SIZE);
    let mut chosen = BTreeMap::new();
    let mut seen = BTreeSet::new();
    for port in 42000..42100u16 {
        let p = tcp((CLIENT, port), (NODE, 30080), SYN);
        let hash = flow_hash(
            wire_addr(p.src),
            wire_addr(p.dst),
            port.to_be(),
            30080u16.to_be(),
            6,
        );
        let expected = pods[table[(hash % MAGLEV_SIZE) as usize] as usize];
        let (verdict, out, _) = h.run(Hook::Xdp, &p.bytes(), 1);
        assert_eq!(verdict, XDP_PASS);
        assert_eq!(
            out,
            p.clone().with_dst(expected, 8080).bytes(),
            "port {port}"
        );
        chosen.insert(port, expected);
        seen.insert(expected);
    }
    assert_eq!(seen.len(), 3, "100 flows use every backend");

    // Add two backends: tracked flows stay; new flows follow the new table.
    let five_pods = [
        "10.244.0.10",
        "10.244.0.11",
        "10.244.0.12",
        "10.244.0.13",
        "10.244.0.14",
    ];
    let five: Vec<(&str, u16, bool)> = five_pods.iter().map(|p| (*p, 8080, true)).collect();
    desired.frontends.insert(
        frontend(None, 30080, Protocol::Tcp),
        service("web", &five, false),
    );
    h.program(&desired);
    let names: Vec<String> = five_pods.iter().map(|p| format!("{p}:8080")).collect();
    let new_table = maglev::table(&names, MAGLEV_SIZE);
    let mut moved_if_new = 0;
    for port in 42000..42100u16 {
        let p = tcp((CLIENT, port), (NODE, 30080), ACK);
        let (_, out, _) = h.run(Hook::Xdp, &p.bytes(), 1);
        assert_eq!(
            out,
            p.clone().with_dst(chosen[&port], 8080).bytes(),
            "tracked flow from port {port} must keep its backend"
        );
        let hash = flow_hash(
            wire_addr(p.src),
            wire_addr(p.dst),
            port.to_be(),
            30080u16.to_be(),
            6,
        );
        if five_pods[new_table[(hash % MAGLEV_SIZE) as usize] as usize] != chosen[&port] {
            moved_if_new += 1;
        }
    }
    assert!(
        moved_if_new > 0,
        "the test must cover flows the new table moves"
    );
    eprintln!("{moved_if_new} of 100 tracked flows would move under the new table; none did");
    // A new flow uses the new table.
    for port in 43000..43020u16 {
        let p = tcp((CLIENT, port), (NODE, 30080), SYN);
        let hash = flow_hash(
            wire_addr(p.src),
            wire_addr(p.dst),
            port.to_be(),
            30080u16.to_be(),
            6,
        );
        let expected = five_pods[new_table[(hash % MAGLEV_SIZE) as usize] as usize];
        let (_, out, _) = h.run(Hook::Xdp, &p.bytes(), 1);
        assert_eq!(
            out,
            p.clone().with_dst(expected, 8080).bytes(),
            "new flow {port}"
        );
    }
}

/// ns per packet of the XDP program (BPF_PROG_TEST_RUN with repeat): printed, not asserted.
/// XDP test runs reuse the frame between repetitions, so the hit case uses two externalIP
/// frontends that translate into each other: every repetition is a tracked-flow hit with a
/// full rewrite.
#[test]
fn xdp_cost_per_packet_hit_and_miss() {
    let mut h = Harness::new();
    let mut desired = State::default();
    desired.frontends.insert(
        frontend(Some("198.51.100.1"), 80, Protocol::Tcp),
        service("ping", &[("198.51.100.2", 8080, true)], false),
    );
    desired.frontends.insert(
        frontend(Some("198.51.100.2"), 8080, Protocol::Tcp),
        service("pong", &[("198.51.100.1", 80, true)], false),
    );
    desired.frontends.insert(
        frontend(None, 30081, Protocol::Tcp),
        service("remote", &[(REMOTE_POD, 8080, false)], false),
    );
    h.program(&desired);
    const REPEAT: u32 = 1_000_000;
    let hit = tcp((CLIENT, 44000), ("198.51.100.1", 80), ACK).bytes();
    // Warm up: create both flows' entries.
    h.run(Hook::Xdp, &hit, 2);
    let miss = tcp((CLIENT, 44001), ("192.0.2.1", 80), ACK).bytes();
    let miss_node = tcp((CLIENT, 44002), (NODE, 22), ACK).bytes();
    let mut arp = packet::ETH.to_vec();
    arp[12..14].copy_from_slice(&[0x08, 0x06]);
    arp.extend([0u8; 28]);
    for (name, frame) in [
        ("hit (tracked flow, DNAT)", &hit),
        ("miss (not a service address)", &miss),
        ("miss (node address, not a NodePort)", &miss_node),
        ("not IPv4 (ARP)", &arp),
    ] {
        let mut best = u128::MAX;
        for _ in 0..3 {
            let (_, _, ns) = h.run(Hook::Xdp, frame, REPEAT);
            best = best.min(ns);
        }
        eprintln!("XDP {name}: {best} ns/packet (best of 3 x {REPEAT})");
    }
    // A repeated frame is one flow: new SNAT flows (a remote backend, eTP Cluster) are single
    // runs of distinct client ports, and so are their next packets, for comparison.
    const FLOWS: u16 = 1_000;
    for (name, flags) in [
        ("new SNAT flow (SYN, a free port)", SYN),
        ("tracked SNAT flow (ACK)", ACK),
    ] {
        let mut ns: Vec<u128> = (0..FLOWS)
            .map(|i| {
                let p = tcp((CLIENT, 10_000 + i), (NODE, 30081), flags);
                let (verdict, _, ns) = h.run(Hook::Xdp, &p.bytes(), 1);
                assert_eq!(verdict, XDP_PASS, "{name}");
                ns
            })
            .collect();
        ns.sort_unstable();
        eprintln!(
            "XDP {name}: {} ns/packet (median of {FLOWS} single runs)",
            ns[ns.len() / 2]
        );
    }
}

/// `bpf_ktime_get_ns`'s clock.
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn ct_map(h: &mut Harness) -> aya::maps::HashMap<&mut aya::maps::MapData, Ct4Key, Ct4Value> {
    let map = h
        .dataplane
        .ebpf_mut()
        .map_mut(lb_common::map_names::FLOWS_V4)
        .expect("conntrack map");
    aya::maps::HashMap::try_from(map).expect("conntrack map type")
}

fn ct_key(p: &Packet) -> Ct4Key {
    Ct4Key::new(
        wire_addr(p.src),
        wire_addr(p.dst),
        p.sport().to_be(),
        p.dport().to_be(),
        p.proto(),
    )
}

/// A tracked flow keeps its backend while it lives, with lifetimes after the kernel's
/// conntrack (`lb_common::ct_timeouts`; TCP: syn_sent 120 s, syn_recv 60 s, established 5
/// days, fin_wait 120 s, close_wait 60 s, last_ack 30 s, time_wait 120 s, close 10 s; UDP:
/// 30 s, 120 s with replies), and chooses again when its entry expired, when a closed
/// connection's port (RST, or FINs both ways) is reused by a new SYN, and when its backend is
/// gone. Entries are aged by rewriting their last-seen time; their state bits are written as
/// the programs write them (see `ct_state`).
#[test]
fn conntrack_lifetimes_follow_the_kernels_timeouts() {
    use ct_flags::{FIN_ACKED, FIN_BACKEND, FIN_CLIENT, RST as RST_SEEN, SEEN_REPLY, SYN_RECV};
    let mut h = Harness::new();
    let mut desired = State::default();
    desired.frontends.insert(
        frontend(None, 30080, Protocol::Tcp),
        service("web", &[(POD_A, 8080, true), (POD_B, 8080, true)], false),
    );
    desired.frontends.insert(
        frontend(None, 30053, Protocol::Udp),
        service("dns", &[(POD_A, 5353, true), (POD_B, 5353, true)], false),
    );
    h.program(&desired);

    for proto in ["tcp", "udp"] {
        let (port, backend_port) = if proto == "tcp" {
            (30080, 8080)
        } else {
            (30053, 5353)
        };
        let flow = |client_port: u16, flags: u8| match proto {
            "tcp" => tcp((CLIENT, client_port), (NODE, port), flags),
            _ => udp((CLIENT, client_port), (NODE, port)),
        };
        // The flow under test and its Maglev choice, and a flow Maglev sends elsewhere: its
        // entry is the "other backend" an aged entry names.
        let subject = flow(45000, SYN);
        let (_, out, _) = h.run(Hook::Xdp, &subject.bytes(), 1);
        let maglev = if out == subject.clone().with_dst(POD_A, backend_port).bytes() {
            POD_A
        } else {
            POD_B
        };
        let other = if maglev == POD_A { POD_B } else { POD_A };
        let other_entry = (45001..46000)
            .find_map(|client_port| {
                let p = flow(client_port, SYN);
                let (_, out, _) = h.run(Hook::Xdp, &p.bytes(), 1);
                (out == p.clone().with_dst(other, backend_port).bytes())
                    .then(|| ct_map(&mut h).get(&ct_key(&p), 0).unwrap())
            })
            .expect("a flow Maglev sends to the other backend");

        let cases: &[(&str, u8, u64, u8, &str)] = if proto == "tcp" {
            const ESTABLISHED: u8 = SEEN_REPLY;
            const FIN_WAIT: u8 = SEEN_REPLY | FIN_CLIENT;
            const CLOSE_WAIT: u8 = SEEN_REPLY | FIN_CLIENT | FIN_ACKED;
            const LAST_ACK: u8 = SEEN_REPLY | FIN_CLIENT | FIN_BACKEND;
            const TIME_WAIT: u8 = LAST_ACK | FIN_ACKED;
            const CLOSE: u8 = SEEN_REPLY | RST_SEEN;
            &[
                ("SYN seen 119 s ago: alive", 0, 119, ACK, other),
                ("SYN seen 121 s ago: expired", 0, 121, ACK, maglev),
                (
                    "SYN-ACK seen 59 s ago: alive",
                    SEEN_REPLY | SYN_RECV,
                    59,
                    ACK,
                    other,
                ),
                (
                    "SYN-ACK seen 61 s ago: expired",
                    SEEN_REPLY | SYN_RECV,
                    61,
                    ACK,
                    maglev,
                ),
                (
                    "established, idle 1 day: alive",
                    ESTABLISHED,
                    86_400,
                    ACK,
                    other,
                ),
                (
                    "established, idle 6 days: expired",
                    ESTABLISHED,
                    6 * 86_400,
                    ACK,
                    maglev,
                ),
                ("a FIN, 119 s ago: alive", FIN_WAIT, 119, ACK, other),
                ("a FIN, 121 s ago: expired", FIN_WAIT, 121, ACK, maglev),
                ("half-closed, 59 s ago: alive", CLOSE_WAIT, 59, ACK, other),
                (
                    "half-closed, 61 s ago: expired",
                    CLOSE_WAIT,
                    61,
                    ACK,
                    maglev,
                ),
                ("FINs both ways, 29 s ago: alive", LAST_ACK, 29, ACK, other),
                (
                    "FINs both ways, 31 s ago: expired",
                    LAST_ACK,
                    31,
                    ACK,
                    maglev,
                ),
                (
                    "FINs both ways, ACKed, 119 s ago: alive",
                    TIME_WAIT,
                    119,
                    ACK,
                    other,
                ),
                (
                    "FINs both ways, ACKed, 121 s ago: expired",
                    TIME_WAIT,
                    121,
                    ACK,
                    maglev,
                ),
                ("RST seen 9 s ago: alive", CLOSE, 9, ACK, other),
                ("RST seen 11 s ago: expired", CLOSE, 11, ACK, maglev),
                ("reset, port reused by a new SYN", CLOSE, 1, SYN, maglev),
                (
                    "FINs both ways, port reused by a new SYN",
                    LAST_ACK,
                    1,
                    SYN,
                    maglev,
                ),
                (
                    "time wait, port reused by a new SYN",
                    TIME_WAIT,
                    1,
                    SYN,
                    maglev,
                ),
                (
                    "half-closed, a SYN is not a new flow",
                    CLOSE_WAIT,
                    1,
                    SYN,
                    other,
                ),
            ]
        } else {
            &[
                ("no reply, 29 s ago: alive", 0, 29, 0, other),
                ("no reply, 31 s ago: expired", 0, 31, 0, maglev),
                ("replied, 119 s ago: alive", SEEN_REPLY, 119, 0, other),
                ("replied, 121 s ago: expired", SEEN_REPLY, 121, 0, maglev),
            ]
        };
        for (name, ct_flags, age_secs, tcp_flags, expected) in cases {
            let mut aged = other_entry;
            aged.flags = *ct_flags;
            aged.last_seen_ns = monotonic_ns().wrapping_sub(age_secs * 1_000_000_000);
            ct_map(&mut h).insert(ct_key(&subject), aged, 0).unwrap();
            let p = flow(45000, *tcp_flags);
            let (_, out, _) = h.run(Hook::Xdp, &p.bytes(), 1);
            assert_eq!(
                out,
                p.clone().with_dst(expected, backend_port).bytes(),
                "{proto}: {name}"
            );
            eprintln!("ok   {proto}: {name} -> {expected}");
        }
        // A backend that is gone: the flow chooses again.
        let mut gone = other_entry;
        gone.backend_id = u32::MAX;
        gone.last_seen_ns = monotonic_ns();
        ct_map(&mut h).insert(ct_key(&subject), gone, 0).unwrap();
        let p = flow(45000, ACK);
        let (_, out, _) = h.run(Hook::Xdp, &p.bytes(), 1);
        assert_eq!(
            out,
            p.clone().with_dst(maglev, backend_port).bytes(),
            "{proto}: backend gone"
        );
    }
}

/// Sets the last-seen time of the flow `key` to `secs` ago, its state as the programs left it.
fn age(h: &mut Harness, key: &Ct4Key, secs: u64) {
    let mut ct = ct_map(h).get(key, 0).expect("a tracked flow");
    ct.last_seen_ns = monotonic_ns().wrapping_sub(secs * 1_000_000_000);
    ct_map(h).insert(key, ct, 0).unwrap();
}

/// The lifetime the programs left the flow `key` on (`ct_timeouts::*`).
fn lifetime(h: &mut Harness, key: &Ct4Key) -> u64 {
    let ct = ct_map(h).get(key, 0).expect("a tracked flow");
    ct_state::lifetime_secs(lb_common::IPPROTO_TCP, ct.flags)
}

/// TCP flows through the real programs, packet by packet, the entry aged in between: the
/// states follow the kernel's conntrack. A FIN from the client only half-closes: the
/// backend's data keeps leaving from the NodePort after 11 s of idleness (no longer the close
/// lifetime) and up to fin_wait, then close_wait; FINs both ways go to last_ack, then
/// time_wait; an RST to close. Only the backend's packets mark a flow replied: an ICMP error
/// about a SYN-only flow neither does nor refreshes it, so the flow expires on syn_sent. A new
/// SYN from a closed flow's port starts afresh.
#[test]
fn conntrack_follows_tcp_states_half_close_time_wait_reset_and_icmp() {
    use Hook::{TcEgress, Xdp};
    use ct_timeouts::*;
    let mut h = Harness::new();
    let mut desired = State::default();
    desired.frontends.insert(
        frontend(None, 30080, Protocol::Tcp),
        service("web", &[(POD_A, 8080, true)], false),
    );
    h.program(&desired);

    // A packet of the client's: goes to the backend (the flow is tracked).
    let client = |h: &mut Harness, port: u16, flags: u8| {
        let p = tcp((CLIENT, port), (NODE, 30080), flags);
        let (verdict, out, _) = h.run(Xdp, &p.bytes(), 1);
        assert_eq!(verdict, XDP_PASS);
        let expected = p.clone().with_dst(POD_A, 8080).bytes();
        assert!(
            out == expected,
            "client {port} flags {flags:#04x}: {}, expected {}",
            Headers(&out),
            Headers(&expected)
        );
        ct_key(&p)
    };
    // A packet of the backend's: whether it left from the NodePort (reverse-translated) or
    // untouched (the flow is gone); anything else fails.
    let backend = |h: &mut Harness, port: u16, flags: u8| -> bool {
        let p = tcp((POD_A, 8080), (CLIENT, port), flags);
        let (verdict, out, _) = h.run(TcEgress, &p.bytes(), 1);
        assert_eq!(verdict, TC_ACT_OK);
        let translated = p.clone().with_src(NODE, 30080).bytes();
        assert!(
            out == translated || out == p.bytes(),
            "backend {port}: {}",
            Headers(&out)
        );
        out == translated
    };
    let handshake = |h: &mut Harness, port: u16| {
        let key = client(h, port, SYN);
        assert_eq!(lifetime(h, &key), TCP_SYN_SENT);
        assert!(backend(h, port, SYN | ACK));
        assert_eq!(lifetime(h, &key), TCP_SYN_RECV);
        client(h, port, ACK);
        assert_eq!(lifetime(h, &key), TCP_ESTABLISHED);
        key
    };

    // The client shuts down its write side and waits for a long response.
    let key = handshake(&mut h, 47000);
    client(&mut h, 47000, FIN | ACK);
    assert_eq!(lifetime(&mut h, &key), TCP_FIN_WAIT);
    age(&mut h, &key, TCP_FIN_WAIT - 1);
    assert!(backend(&mut h, 47000, ACK), "FIN_WAIT: the backend's ACK");
    assert_eq!(lifetime(&mut h, &key), TCP_CLOSE_WAIT);
    for idle in [11, TCP_CLOSE_WAIT / 2, TCP_CLOSE_WAIT - 1] {
        age(&mut h, &key, idle);
        assert!(
            backend(&mut h, 47000, ACK),
            "half-closed, data after {idle} s idle"
        );
        assert_eq!(lifetime(&mut h, &key), TCP_CLOSE_WAIT);
    }
    age(&mut h, &key, TCP_CLOSE_WAIT + 1);
    assert!(
        !backend(&mut h, 47000, ACK),
        "half-closed beyond close_wait: forgotten"
    );

    // The backend closes too, then the client's last ACK.
    let key = handshake(&mut h, 47001);
    client(&mut h, 47001, FIN | ACK);
    assert!(backend(&mut h, 47001, FIN | ACK));
    assert_eq!(lifetime(&mut h, &key), TCP_LAST_ACK);
    age(&mut h, &key, TCP_LAST_ACK - 1);
    client(&mut h, 47001, ACK);
    assert_eq!(lifetime(&mut h, &key), TCP_TIME_WAIT);
    age(&mut h, &key, TCP_TIME_WAIT - 1);
    assert!(
        backend(&mut h, 47001, FIN | ACK),
        "time_wait: a retransmitted FIN"
    );
    age(&mut h, &key, TCP_TIME_WAIT + 1);
    assert!(
        !backend(&mut h, 47001, FIN | ACK),
        "beyond time_wait: forgotten"
    );
    // FINs both ways without the last ACK: last_ack.
    let key = handshake(&mut h, 47002);
    assert!(backend(&mut h, 47002, FIN | ACK));
    client(&mut h, 47002, FIN | ACK);
    assert_eq!(lifetime(&mut h, &key), TCP_LAST_ACK);
    age(&mut h, &key, TCP_LAST_ACK + 1);
    assert!(!backend(&mut h, 47002, ACK), "beyond last_ack: forgotten");

    // An RST: close.
    let key = handshake(&mut h, 47003);
    assert!(backend(&mut h, 47003, RST | ACK));
    assert_eq!(lifetime(&mut h, &key), TCP_CLOSE);
    age(&mut h, &key, TCP_CLOSE - 1);
    assert!(backend(&mut h, 47003, RST | ACK), "close: a second RST");
    age(&mut h, &key, TCP_CLOSE + 1);
    assert!(
        !backend(&mut h, 47003, RST | ACK),
        "beyond close: forgotten"
    );

    // An ICMP error about a SYN-only flow (its quoted reply never was): translated to the
    // backend, but the flow stays on syn_sent, its last-seen time untouched.
    let key = client(&mut h, 47004, SYN);
    age(&mut h, &key, 100);
    let before = ct_map(&mut h).get(&key, 0).unwrap();
    let quoted = tcp((NODE, 30080), (CLIENT, 47004), SYN | ACK);
    let (_, out, _) = h.run(Xdp, &icmp_error(ROUTER, NODE, 3, 4, 1400, &quoted), 1);
    assert_eq!(
        out,
        icmp_error(
            ROUTER,
            POD_A,
            3,
            4,
            1400,
            &tcp((POD_A, 8080), (CLIENT, 47004), SYN | ACK)
        ),
        "the ICMP error goes to the backend"
    );
    assert_eq!(
        ct_map(&mut h).get(&key, 0).unwrap(),
        before,
        "ICMP left the flow alone"
    );
    assert_eq!(lifetime(&mut h, &key), TCP_SYN_SENT);
    age(&mut h, &key, TCP_SYN_SENT + 1);
    assert!(
        !backend(&mut h, 47004, SYN | ACK),
        "a SYN-only flow expires on syn_sent, ICMP errors or not"
    );

    // A new SYN from a closed flow's port: a new flow, its state afresh.
    for (port, close) in [(47005, [FIN | ACK, FIN | ACK]), (47006, [RST, RST])] {
        let key = handshake(&mut h, port);
        client(&mut h, port, close[0]);
        assert!(backend(&mut h, port, close[1]));
        let closed = ct_map(&mut h).get(&key, 0).unwrap();
        assert!(ct_state::closed(closed.flags));
        age(&mut h, &key, 1);
        client(&mut h, port, SYN);
        let fresh = ct_map(&mut h).get(&key, 0).unwrap();
        assert_eq!(fresh.flags, 0, "{port}: a new flow's flags");
        assert!(fresh.last_seen_ns > closed.last_seen_ns);
        assert!(
            backend(&mut h, port, SYN | ACK),
            "{port}: the new flow's SYN-ACK"
        );
        assert_eq!(lifetime(&mut h, &key), TCP_SYN_RECV);
        client(&mut h, port, ACK);
        assert_eq!(lifetime(&mut h, &key), TCP_ESTABLISHED);
    }
}

/// `sessionAffinity: ClientIP` on external traffic: every connection of one client goes to
/// one backend, chosen by Maglev over the client address (so every node agrees), and the
/// client stays there when backends are added, while its affinity lasts.
#[test]
fn session_affinity_keeps_a_client_on_one_backend() {
    let mut h = Harness::new();
    let pods = ["10.244.0.10", "10.244.0.11", "10.244.0.12"];
    let mut desired = State::default();
    let mut web = service("web", &pods.map(|p| (p, 8080, true)), false);
    web.affinity_timeout_secs = Some(10_800);
    desired
        .frontends
        .insert(frontend(None, 30080, Protocol::Tcp), web.clone());
    h.program(&desired);

    let backend_of = |h: &mut Harness, client: &str, port: u16| {
        let p = tcp((client, port), (NODE, 30080), SYN);
        let (_, out, _) = h.run(Hook::Xdp, &p.bytes(), 1);
        pods.iter()
            .chain(["10.244.0.13", "10.244.0.14"].iter())
            .find(|pod| out == p.clone().with_dst(pod, 8080).bytes())
            .map(|pod| pod.to_string())
            .expect("translated to a backend")
    };
    let mut per_client = BTreeMap::new();
    for i in 1..=20u8 {
        let client = format!("203.0.113.{i}");
        let first = backend_of(&mut h, &client, 50000);
        for port in 50001..50010 {
            assert_eq!(backend_of(&mut h, &client, port), first, "client {client}");
        }
        let names: Vec<String> = pods.iter().map(|p| format!("{p}:8080")).collect();
        let table = maglev::table(&names, MAGLEV_SIZE);
        let hash = flow_hash(wire_addr(client.parse().unwrap()), 0, 0, 0, 0);
        assert_eq!(
            first,
            pods[table[(hash % MAGLEV_SIZE) as usize] as usize],
            "Maglev over the client address"
        );
        per_client.insert(client, first);
    }
    let used: BTreeSet<&String> = per_client.values().collect();
    assert!(used.len() > 1, "20 clients over 3 backends: {per_client:?}");

    // Two more backends: new connections of known clients keep their backend.
    web.backends
        .extend(["10.244.0.13", "10.244.0.14"].map(|ip| {
            (
                Backend {
                    ip: ip.parse().unwrap(),
                    port: 8080,
                },
                true,
            )
        }));
    desired
        .frontends
        .insert(frontend(None, 30080, Protocol::Tcp), web);
    h.program(&desired);
    for (client, backend) in &per_client {
        assert_eq!(
            &backend_of(&mut h, client, 51000),
            backend,
            "client {client} after the change"
        );
    }
}

/// A terminating backend keeps the flows that use it (they drain), new flows never pick it,
/// and once it is gone its flows choose again. A ClusterIP in the same service table, sharing
/// the NodePort's backend set, is not served from outside: its packets pass untouched.
#[test]
fn terminating_backends_keep_their_flows_and_get_no_new_ones() {
    let mut h = Harness::new();
    let web = frontend(None, 30080, Protocol::Tcp);
    let mut state = State::default();
    state.frontends.insert(
        web,
        service("web", &[(POD_A, 8080, true), (POD_B, 8080, true)], false),
    );
    let cluster_ip = Frontend::new("10.96.0.80".parse().unwrap(), 80, Protocol::Tcp);
    let with_cluster_ip = |state: &State| {
        let mut desired = state.desired();
        let mut service = desired.frontends[&web].clone();
        service.kind = FrontendKind::ClusterIP;
        desired.frontends.insert(cluster_ip, service);
        desired
    };
    h.program_desired(&with_cluster_ip(&state));
    let to_cluster_ip = tcp((CLIENT, 45000), ("10.96.0.80", 80), SYN);
    let (verdict, out, _) = h.run(Hook::Xdp, &to_cluster_ip.bytes(), 1);
    assert_eq!(verdict, XDP_PASS);
    assert_eq!(
        out,
        to_cluster_ip.bytes(),
        "a ClusterIP is not served in XDP"
    );

    let pod_of = |h: &mut Harness, port: u16, flags: u8| {
        let p = tcp((CLIENT, port), (NODE, 30080), flags);
        let (verdict, out, _) = h.run(Hook::Xdp, &p.bytes(), 1);
        assert_eq!(verdict, XDP_PASS);
        [POD_A, POD_B]
            .into_iter()
            .find(|pod| out == p.clone().with_dst(pod, 8080).bytes())
            .expect("translated to a backend")
    };
    let mut on_b = Vec::new();
    for port in 43000..43064u16 {
        if pod_of(&mut h, port, SYN) == POD_B {
            on_b.push(port);
        }
    }
    assert!(
        !on_b.is_empty() && on_b.len() < 64,
        "64 flows over two pods: {} on {POD_B}",
        on_b.len()
    );

    // POD_B starts terminating: out of the picks, kept for its flows.
    let pod_b = Backend {
        ip: POD_B.parse().unwrap(),
        port: 8080,
    };
    let svc = state.frontends.get_mut(&web).unwrap();
    svc.backends.remove(&pod_b);
    svc.draining.insert(pod_b);
    h.program_desired(&with_cluster_ip(&state));
    for port in &on_b {
        assert_eq!(
            pod_of(&mut h, *port, ACK),
            POD_B,
            "flow from port {port} drains on the terminating pod"
        );
    }
    for port in 44000..44064u16 {
        assert_eq!(
            pod_of(&mut h, port, SYN),
            POD_A,
            "new flow from port {port}"
        );
    }

    // POD_B is gone: its flows choose again.
    state.frontends.get_mut(&web).unwrap().draining.clear();
    h.program_desired(&with_cluster_ip(&state));
    for port in &on_b {
        assert_eq!(pod_of(&mut h, *port, ACK), POD_A, "flow from port {port}");
    }
}

/// A LoadBalancer IP with `loadBalancerSourceRanges`: packets from inside the ranges are
/// translated, every other packet dropped (a flow's later packets too once the range no
/// longer holds its client); the NodePort of the same backend set is never filtered.
#[test]
fn source_ranges_drop_packets_from_outside_them_at_load_balancer_ips_only() {
    let mut h = Harness::new();
    const LB_IP: &str = "198.51.100.20";
    let lb = frontend(Some(LB_IP), 80, Protocol::Tcp);
    let np = frontend(None, 30080, Protocol::Tcp);
    let mut state = State::default();
    let web = service("web", &[(POD_A, 8080, true)], false);
    state.frontends.insert(lb, web.clone());
    state.frontends.insert(np, web);
    let with_ranges = |ranges: &[&str]| {
        let mut desired = state.desired();
        let entry = desired.frontends.get_mut(&lb).unwrap();
        entry.kind = FrontendKind::LoadBalancer;
        entry.source_ranges = Some(SourceRanges {
            allowed: ranges.iter().map(|r| r.parse().unwrap()).collect(),
            allow_node: false,
            allow_pods: false,
        });
        desired
    };
    h.program_desired(&with_ranges(&["203.0.113.0/28"]));
    let outsider = "192.0.2.99";
    let syn = tcp((CLIENT, 40000), (LB_IP, 80), SYN);
    let syn_np = tcp((outsider, 40001), (NODE, 30080), SYN);
    run_cases(
        &mut h,
        &[
            case(
                "in the range: translated",
                Hook::Xdp,
                syn.clone(),
                XDP_PASS,
                syn.clone().with_dst(POD_A, 8080),
            ),
            case(
                "outside the ranges: dropped",
                Hook::Xdp,
                tcp((outsider, 40000), (LB_IP, 80), SYN),
                XDP_DROP,
                tcp((outsider, 40000), (LB_IP, 80), SYN),
            ),
            case(
                "the NodePort of the same set: not filtered",
                Hook::Xdp,
                syn_np.clone(),
                XDP_PASS,
                syn_np.clone().with_dst(POD_A, 8080),
            ),
        ],
    );
    // Narrowed: the tracked flow's next packet is dropped too.
    h.program_desired(&with_ranges(&["192.0.2.0/24"]));
    let ack = tcp((CLIENT, 40000), (LB_IP, 80), ACK);
    let from_outsider = tcp((outsider, 40002), (LB_IP, 80), SYN);
    run_cases(
        &mut h,
        &[
            case(
                "a tracked flow no longer in the range",
                Hook::Xdp,
                ack.clone(),
                XDP_DROP,
                ack.clone(),
            ),
            case(
                "now in the range",
                Hook::Xdp,
                from_outsider.clone(),
                XDP_PASS,
                from_outsider.clone().with_dst(POD_A, 8080),
            ),
        ],
    );
    // No ranges: open to everyone.
    let mut open = with_ranges(&[]);
    open.frontends.get_mut(&lb).unwrap().source_ranges = None;
    h.program_desired(&open);
    run_cases(
        &mut h,
        &[case(
            "without ranges",
            Hook::Xdp,
            ack.clone(),
            XDP_PASS,
            ack.with_dst(POD_A, 8080),
        )],
    );
}

// ---- SNAT ports ----

const SNAT_NODEPORT: u16 = 30081;

/// One remote backend behind a NodePort (eTP Cluster): every flow is SNATed to the node's
/// address, all on the one (backend, node address) pair whose range is `snat_ports::COUNT`.
fn snat_state(affinity: bool) -> State {
    let mut state = State::default();
    let mut remote = service("remote", &[(REMOTE_POD, 8080, false)], false);
    if affinity {
        remote.affinity_timeout_secs = Some(10_800);
    }
    state
        .frontends
        .insert(frontend(None, SNAT_NODEPORT, Protocol::Tcp), remote);
    state
}

fn flowrev_map(h: &mut Harness) -> aya::maps::HashMap<&mut aya::maps::MapData, Ct4Key, Rev4Value> {
    let map = h
        .dataplane
        .ebpf_mut()
        .map_mut(lb_common::map_names::FLOW_REPLIES_V4)
        .expect("reverse map");
    aya::maps::HashMap::try_from(map).expect("reverse map type")
}

fn hint_map(h: &Harness) -> aya::maps::Map {
    aya::maps::Map::Array(
        aya::maps::MapData::from_pin(
            h.dataplane
                .pins()
                .maps()
                .join(lb_common::map_names::REPLY_HINTS_V4),
        )
        .expect("the reply hint map is pinned"),
    )
}

/// The hint of reply tuple `key`, not yet taken.
fn hint(h: &Harness, key: &Ct4Key) -> Option<Rev4Value> {
    common::hints::hint_of(&hint_map(h), key)
}

/// The reverse entry of reply tuple `key` as tc egress finds it: a hint, or the reverse map's.
fn reverse_entry(h: &mut Harness, key: &Ct4Key) -> Option<Rev4Value> {
    let hints = hint_map(h);
    common::hints::reverse_entry(&hints, &flowrev_map(h), key)
}

/// The client tuple of the SNAT flow from `CLIENT:port`.
fn snat_client(port: u16) -> Ct4Key {
    ct_key(&tcp((CLIENT, port), (NODE, SNAT_NODEPORT), SYN))
}

/// The tc egress entry of the SNAT flow from `CLIENT:port` (client → backend): its SNAT port.
fn snat_out_port(h: &mut Harness, port: u16) -> Option<u16> {
    let key = ct_key(&tcp((CLIENT, port), (REMOTE_POD, 8080), SYN));
    let out = flowrev_map(h).get(&key, 0).ok()?;
    assert_ne!(out.flags & ct_flags::SNAT_OUT, 0, "an SNAT_OUT entry");
    assert_eq!(out.frontend_addr, wire_addr(NODE.parse().unwrap()));
    Some(u16::from_be(out.frontend_port))
}

/// The claim of SNAT port `port`: the reply's tuple (backend → node address, port).
fn snat_claim_key(port: u16) -> Ct4Key {
    ct_key(&tcp((REMOTE_POD, 8080), (NODE, port), SYN | ACK))
}

/// A client's packet of the SNAT flow from `CLIENT:port`: returns the XDP verdict and, when
/// passed, the SNAT port its flow holds. A passed packet must be DNATed to the backend.
fn snat_client_packet(h: &mut Harness, port: u16, flags: u8) -> (u32, Option<u16>, u128) {
    let p = tcp((CLIENT, port), (NODE, SNAT_NODEPORT), flags);
    let (verdict, out, ns) = h.run(Hook::Xdp, &p.bytes(), 1);
    if verdict != XDP_PASS {
        assert_eq!(out, p.bytes(), "a dropped packet is untouched");
        return (verdict, None, ns);
    }
    assert_eq!(out, p.with_dst(REMOTE_POD, 8080).bytes(), "DNAT of {port}");
    (verdict, snat_out_port(h, port), ns)
}

/// A new SNAT flow from `CLIENT:port`; its SNAT port, `None` when the SYN was dropped.
fn snat_syn(h: &mut Harness, port: u16) -> (Option<u16>, u128) {
    let (verdict, snat, ns) = snat_client_packet(h, port, SYN);
    match verdict {
        XDP_PASS => (Some(snat.expect("an SNAT port")), ns),
        XDP_DROP => (None, ns),
        other => panic!("verdict {other}"),
    }
}

/// The remote backend's packet to the node's SNAT `port`, reverse-translated to its client.
fn snat_backend_packet(h: &mut Harness, snat_port: u16, client_port: u16, flags: u8) {
    let p = tcp((REMOTE_POD, 8080), (NODE, snat_port), flags);
    let (verdict, out, _) = h.run(Hook::Xdp, &p.bytes(), 1);
    assert_eq!(verdict, XDP_PASS);
    assert_eq!(
        out,
        p.with_dst(CLIENT, client_port).bytes(),
        "the reply to {snat_port} goes to its client"
    );
}

/// Counters that moved between two readings of the reasons map.
fn reason_delta(
    before: &BTreeMap<(&'static str, &'static str), u64>,
    after: &BTreeMap<(&'static str, &'static str), u64>,
) -> BTreeMap<(&'static str, &'static str), u64> {
    after
        .iter()
        .filter_map(|(k, v)| {
            let d = v - before.get(k).copied().unwrap_or(0);
            (d != 0).then_some((*k, d))
        })
        .collect()
}

/// Makes the whole-range search of the (backend, node address) pair allowed again, as it is
/// `snat_ports::EXHAUSTED_SECS` after it last found no port.
fn forget_exhaustion(h: &mut Harness) {
    let map = h
        .dataplane
        .ebpf_mut()
        .map_mut(lb_common::map_names::SNAT_EXHAUSTED_V4)
        .expect("exhaustion map");
    let mut map: aya::maps::HashMap<_, Ct4Key, u64> = aya::maps::HashMap::try_from(map).unwrap();
    let key = Ct4Key::new(
        wire_addr(REMOTE_POD.parse().unwrap()),
        wire_addr(NODE.parse().unwrap()),
        8080u16.to_be(),
        0,
        lb_common::IPPROTO_TCP,
    );
    let at = map.get(&key, 0).expect("exhaustion recorded");
    let aged = monotonic_ns().wrapping_sub((snat_ports::EXHAUSTED_SECS + 1) * 1_000_000_000);
    assert!(at > aged);
    map.insert(key, aged, 0).unwrap();
}

/// Session affinity pins one client to one backend, not to 8 SNAT ports: 10,000 flows from
/// ONE client address through SNAT to one remote backend all get a port. The first
/// `snat_ports::COUNT` fill the whole range (all distinct); each later one gets the port of a
/// flow that just ended: an RST from the client, an RST from the backend, or FINs both ways
/// and the last ACK, the closed flow's entries gone (its conntrack entry, its tc entry).
/// Then, with every port held by a live flow, the next SYN is dropped, counted as
/// `dropped_no_snat_port` and leaves no entry behind.
#[test]
fn snat_ports_one_affinity_client_gets_the_whole_range_and_closed_flows_give_theirs_back() {
    let mut h = Harness::new();
    h.program(&snat_state(true));
    const FLOWS: u16 = 10_000;
    const BASE: u16 = 20_000;
    let count = snat_ports::COUNT;
    // The live flows: client port -> SNAT port.
    let mut live: BTreeMap<u16, u16> = BTreeMap::new();
    let mut fill_ns = Vec::new();
    for i in 0..count {
        let port = BASE + i;
        let (snat, ns) = snat_syn(&mut h, port);
        let snat = snat.unwrap_or_else(|| panic!("flow {i} got no port"));
        assert!(snat_ports::contains(snat), "{snat}");
        live.insert(port, snat);
        fill_ns.push(ns);
    }
    let ports: BTreeSet<u16> = live.values().copied().collect();
    assert_eq!(
        ports.len(),
        count as usize,
        "every port once: the whole range"
    );
    eprintln!(
        "{count} flows of one affinity client: {count} distinct ports; XDP new SNAT flow while \
         filling: median {} ns",
        median(&mut fill_ns)
    );

    let mut reuse_ns = Vec::new();
    for i in count..FLOWS {
        // End the oldest live flow, three ways in turn.
        let (&old, &old_snat) = live.iter().next().unwrap();
        match i % 3 {
            0 => {
                snat_client_packet(&mut h, old, RST | ACK);
            }
            1 => snat_backend_packet(&mut h, old_snat, old, RST | ACK),
            _ => {
                snat_backend_packet(&mut h, old_snat, old, SYN | ACK);
                snat_client_packet(&mut h, old, ACK);
                snat_client_packet(&mut h, old, FIN | ACK);
                snat_backend_packet(&mut h, old_snat, old, FIN | ACK);
                snat_client_packet(&mut h, old, ACK);
                assert_eq!(
                    lifetime(&mut h, &snat_client(old)),
                    ct_timeouts::TCP_TIME_WAIT
                );
            }
        }
        live.remove(&old);
        let port = BASE + i;
        let (snat, ns) = snat_syn(&mut h, port);
        assert_eq!(
            snat,
            Some(old_snat),
            "flow {i}: the only port not held by a live flow is the closed one's"
        );
        reuse_ns.push(ns);
        // The closed flow is gone with its entries.
        assert!(
            ct_map(&mut h).get(&snat_client(old), 0).is_err(),
            "{old}'s entry"
        );
        assert_eq!(snat_out_port(&mut h, old), None, "{old}'s tc entry");
        let claim = flowrev_map(&mut h)
            .get(&snat_claim_key(old_snat), 0)
            .unwrap();
        assert_eq!(
            claim.client_key(),
            snat_client(port),
            "the claim is the new flow's"
        );
        live.insert(port, old_snat);
    }
    assert_eq!(live.len(), count as usize);
    eprintln!(
        "{} flows in all from one client got a port; XDP new SNAT flow taking over a closed \
         flow's port in a full range: median {} ns",
        FLOWS,
        median(&mut reuse_ns)
    );

    // Every port is a live flow's: the next SYN is dropped and counted, nothing left behind.
    let before = h.reasons();
    let extra = BASE + FLOWS;
    let (snat, scan_ns) = snat_syn(&mut h, extra);
    assert_eq!(snat, None, "more flows than ports: dropped");
    let (snat, hinted_ns) = snat_syn(&mut h, extra + 1);
    assert_eq!(snat, None);
    assert_eq!(
        reason_delta(&before, &h.reasons()),
        BTreeMap::from([(("xdp", "dropped_no_snat_port"), 2)])
    );
    for port in [extra, extra + 1] {
        assert!(ct_map(&mut h).get(&snat_client(port), 0).is_err());
        assert_eq!(snat_out_port(&mut h, port), None);
        let reply = ct_key(&tcp((REMOTE_POD, 8080), (CLIENT, port), SYN | ACK));
        assert_eq!(reverse_entry(&mut h, &reply), None, "no reply entry leaks");
    }
    eprintln!(
        "XDP SYN at a full range: {scan_ns} ns (a search of the whole range), then {hinted_ns} \
         ns (the {} hashed ports only, for {} s)",
        snat_ports::TRIES,
        snat_ports::EXHAUSTED_SECS
    );
    // Live flows keep their ports: every one still translates.
    for (&port, &snat) in live.iter().take(100) {
        assert_eq!(snat_client_packet(&mut h, port, ACK).1, Some(snat));
    }
}

/// A claim whose flow is over is taken over by a new flow: a handshake-less SYN aged past
/// syn_sent (120 s), a flow the conntrack map forgot (LRU eviction), an established flow idle
/// past its lifetime; a live flow's never is, even idle for a day. After a search of the
/// whole range found nothing, new flows try only their hashed ports for
/// `snat_ports::EXHAUSTED_SECS`.
#[test]
fn snat_claims_of_dead_flows_are_taken_over() {
    let mut h = Harness::new();
    h.program(&snat_state(false));
    const BASE: u16 = 20_000;
    let count = snat_ports::COUNT;
    let mut live: BTreeMap<u16, u16> = BTreeMap::new();
    for i in 0..count {
        let (snat, _) = snat_syn(&mut h, BASE + i);
        live.insert(BASE + i, snat.unwrap_or_else(|| panic!("flow {i}")));
    }
    // Half-open flows (the backend's SYN-ACK, no ACK) and established ones, idle a day.
    let syn_only = BASE;
    let syn_recv = BASE + 1;
    let evicted = BASE + 2;
    let established = BASE + 3;
    let idle_day = BASE + 4;
    snat_backend_packet(&mut h, live[&syn_recv], syn_recv, SYN | ACK);
    for port in [established, idle_day] {
        snat_backend_packet(&mut h, live[&port], port, SYN | ACK);
        snat_client_packet(&mut h, port, ACK);
    }
    age(&mut h, &snat_client(idle_day), 86_400);
    let mut next = BASE + count;
    let before = h.reasons();
    assert_eq!(snat_syn(&mut h, next).0, None, "every port live: dropped");
    next += 1;
    assert_eq!(
        reason_delta(&before, &h.reasons()),
        BTreeMap::from([(("xdp", "dropped_no_snat_port"), 1)])
    );

    type End = Box<dyn Fn(&mut Harness)>;
    let cases: [(&str, u16, End); 4] = [
        (
            "a SYN without reply, 121 s ago",
            syn_only,
            Box::new(move |h| age(h, &snat_client(syn_only), ct_timeouts::TCP_SYN_SENT + 1)),
        ),
        (
            "a SYN-ACK without ACK, 61 s ago",
            syn_recv,
            Box::new(move |h| age(h, &snat_client(syn_recv), ct_timeouts::TCP_SYN_RECV + 1)),
        ),
        (
            "a flow the conntrack map forgot",
            evicted,
            Box::new(move |h| ct_map(h).remove(&snat_client(evicted)).unwrap()),
        ),
        (
            "an established flow idle 6 days",
            established,
            Box::new(move |h| age(h, &snat_client(established), 6 * 86_400)),
        ),
    ];
    for (name, old, end) in cases {
        let old_snat = live.remove(&old).unwrap();
        end(&mut h);
        // Within a second of a failed search only the hashed ports are tried: a flow whose
        // hashed ports are others is dropped.
        next = (next..u16::MAX)
            .find(|&p| !hashed_ports(p).contains(&old_snat))
            .unwrap();
        assert_eq!(
            snat_syn(&mut h, next).0,
            None,
            "{name}: right after exhaustion"
        );
        next += 1;
        forget_exhaustion(&mut h);
        let (snat, _) = snat_syn(&mut h, next);
        assert_eq!(snat, Some(old_snat), "{name}: its port is taken over");
        assert_eq!(
            snat_out_port(&mut h, old),
            None,
            "{name}: its tc entry went"
        );
        assert!(ct_map(&mut h).get(&snat_client(old), 0).is_err(), "{name}");
        live.insert(next, old_snat);
        next += 1;
        // The range is full again.
        assert_eq!(snat_syn(&mut h, next).0, None, "{name}: full again");
        next += 1;
        eprintln!("ok   {name}: its port {old_snat} taken over");
    }
    // The flow idle for a day lives on, with its port.
    assert_eq!(
        snat_client_packet(&mut h, idle_day, ACK).1,
        Some(live[&idle_day])
    );
    assert_eq!(live.len(), count as usize);
}

/// A flow that finds its conntrack entry dead replaces it and gives its old port back first:
/// the same client tuple, its backend replaced by another remote one, leaves no claim of the
/// old backend behind.
#[test]
fn snat_a_replaced_flow_gives_its_old_port_back() {
    let mut h = Harness::new();
    let mut state = snat_state(false);
    h.program(&state);
    let port = 20_000;
    let (snat, _) = snat_syn(&mut h, port);
    let snat = snat.unwrap();
    assert!(flowrev_map(&mut h).get(&snat_claim_key(snat), 0).is_ok());
    age(&mut h, &snat_client(port), ct_timeouts::TCP_SYN_SENT + 1);
    // The backend moves: the flow's next SYN finds its entry expired and chooses again.
    const OTHER: &str = "10.244.2.10";
    state.frontends.insert(
        frontend(None, SNAT_NODEPORT, Protocol::Tcp),
        service("remote", &[(OTHER, 8080, false)], false),
    );
    h.program(&state);
    let p = tcp((CLIENT, port), (NODE, SNAT_NODEPORT), SYN);
    let (verdict, out, _) = h.run(Hook::Xdp, &p.bytes(), 1);
    assert_eq!(verdict, XDP_PASS);
    assert_eq!(out, p.with_dst(OTHER, 8080).bytes());
    assert!(
        flowrev_map(&mut h).get(&snat_claim_key(snat), 0).is_err(),
        "the old backend's claim went"
    );
    assert_eq!(
        snat_out_port(&mut h, port),
        None,
        "the old backend's tc entry went"
    );
    let old_reply = ct_key(&tcp((REMOTE_POD, 8080), (CLIENT, port), SYN | ACK));
    assert_eq!(
        reverse_entry(&mut h, &old_reply),
        None,
        "the old reply entry went"
    );
}

/// A flow to a local backend (no SNAT) that is over and replaced by a new flow on the same
/// client tuple that picks another backend leaves no reply entry of its old backend behind
/// (found by the soak: `LB4_FLOWREV_V2` grew past the conntrack map under NodePort churn).
#[test]
fn a_replaced_local_flow_leaves_no_reply_entry_of_its_old_backend() {
    let mut h = Harness::new();
    let mut state = State::default();
    state.frontends.insert(
        frontend(None, 30080, Protocol::Tcp),
        service("web", &[(POD_A, 8080, true)], false),
    );
    h.program(&state);
    let port = 21_000;
    let syn = tcp((CLIENT, port), (NODE, 30080), SYN);
    let (verdict, out, _) = h.run(Hook::Xdp, &syn.bytes(), 1);
    assert_eq!(verdict, XDP_PASS);
    assert_eq!(out, syn.clone().with_dst(POD_A, 8080).bytes());
    let old_reply = ct_key(&tcp((POD_A, 8080), (CLIENT, port), SYN | ACK));
    assert!(reverse_entry(&mut h, &old_reply).is_some());
    age(&mut h, &ct_key(&syn), ct_timeouts::TCP_SYN_SENT + 1);
    // The endpoints change: the next SYN on this tuple finds its entry over and picks POD_B.
    state.frontends.insert(
        frontend(None, 30080, Protocol::Tcp),
        service("web", &[(POD_B, 8080, true)], false),
    );
    h.program(&state);
    let (verdict, out, _) = h.run(Hook::Xdp, &syn.bytes(), 1);
    assert_eq!(verdict, XDP_PASS);
    assert_eq!(out, syn.with_dst(POD_B, 8080).bytes());
    let new_reply = ct_key(&tcp((POD_B, 8080), (CLIENT, port), SYN | ACK));
    assert!(reverse_entry(&mut h, &new_reply).is_some());
    assert_eq!(
        reverse_entry(&mut h, &old_reply),
        None,
        "the old backend's reply entry stayed"
    );
}

/// The ports a new SNAT flow from `CLIENT:client_port` tries first, from its hash.
fn hashed_ports(client_port: u16) -> Vec<u16> {
    let p = tcp((CLIENT, client_port), (NODE, SNAT_NODEPORT), SYN);
    let first = first_snat_port(&p) - snat_ports::FIRST;
    (0..snat_ports::TRIES)
        .map(|attempt| snat_ports::probe(first, attempt))
        .collect()
}

fn median(values: &mut [u128]) -> u128 {
    values.sort_unstable();
    values[values.len() / 2]
}

/// An IPv4 frame with its total length set to `total` (the IP header checksum fixed).
fn with_total_length(mut frame: Vec<u8>, total: u16) -> Vec<u8> {
    frame[16..18].copy_from_slice(&total.to_be_bytes());
    frame[24..26].copy_from_slice(&[0, 0]);
    let sum: u32 = frame[14..34]
        .chunks(2)
        .map(|c| u16::from_be_bytes([c[0], c[1]]) as u32)
        .sum();
    let folded = (sum & 0xffff) + (sum >> 16);
    let check = !((folded & 0xffff) + (folded >> 16)) as u16;
    frame[24..26].copy_from_slice(&check.to_be_bytes());
    frame
}

/// Rules the differential fuzzer (`cargo xtask fuzz`, tests/packet_fuzz.rs) pinned down, one
/// case each (docs/reliability.md, "Differential packet fuzzing"): ICMP errors whose total
/// length is below the quoted headers or beyond the frame pass untouched (they were
/// translated: a kernel fix); an ICMP error not addressed to the quoted packet's sender is
/// not ours; a backend's SYN-ACK reusing the tuple of a closed flow is left untouched (stale).
#[test]
fn fuzz_findings_icmp_lengths_addressing_and_stale_syn_acks() {
    use Hook::{TcEgress, Xdp};
    let mut h = Harness::new();
    h.program(&state());
    let about_reply = icmp_error(
        ROUTER,
        NODE,
        3,
        4,
        1400,
        &tcp((NODE, 30080), (CLIENT, 41000), ACK),
    );
    let about_client = icmp_error(POD_A, CLIENT, 3, 3, 0, &udp((CLIENT, 5100), (POD_A, 5353)));
    run_cases(
        &mut h,
        &[
            case(
                "a flow for the ICMP errors to be about",
                Xdp,
                tcp((CLIENT, 41000), (NODE, 30080), SYN),
                XDP_PASS,
                tcp((CLIENT, 41000), (POD_A, 8080), SYN),
            ),
            case(
                "a UDP flow too",
                Xdp,
                udp((CLIENT, 5100), (NODE, 30053)),
                XDP_PASS,
                udp((CLIENT, 5100), (POD_A, 5353)),
            ),
            untouched(
                "XDP: an ICMP error whose total length stops inside the quoted header",
                Xdp,
                with_total_length(about_reply.clone(), 40),
            ),
            untouched(
                "XDP: an ICMP error whose total length is beyond the frame",
                Xdp,
                with_total_length(about_reply.clone(), 1400),
            ),
            untouched(
                "tc: an ICMP error whose total length stops inside the quoted ports",
                TcEgress,
                with_total_length(about_client.clone(), 52),
            ),
            untouched(
                "XDP: an ICMP error addressed to another address than the quoted frontend",
                Xdp,
                icmp_error(
                    ROUTER,
                    EXTERNAL_IP,
                    3,
                    4,
                    1400,
                    &tcp((NODE, 30080), (CLIENT, 41000), ACK),
                ),
            ),
            untouched(
                "tc: an ICMP error addressed to another address than the quoted client",
                TcEgress,
                icmp_error(POD_A, ROUTER, 3, 3, 0, &udp((CLIENT, 5100), (POD_A, 5353))),
            ),
            raw_case(
                "the same errors with their lengths right are translated (XDP)",
                Xdp,
                about_reply,
                XDP_PASS,
                icmp_error(
                    ROUTER,
                    POD_A,
                    3,
                    4,
                    1400,
                    &tcp((POD_A, 8080), (CLIENT, 41000), ACK),
                ),
            ),
            raw_case(
                "... and (tc)",
                TcEgress,
                about_client,
                TC_ACT_OK,
                icmp_error(NODE, CLIENT, 3, 3, 0, &udp((CLIENT, 5100), (NODE, 30053))),
            ),
            case(
                "the client resets the TCP flow: closed",
                Xdp,
                tcp((CLIENT, 41000), (NODE, 30080), RST),
                XDP_PASS,
                tcp((CLIENT, 41000), (POD_A, 8080), RST),
            ),
            untouched(
                "tc: the backend's SYN-ACK on the closed flow's tuple is a new connection's",
                TcEgress,
                tcp((POD_A, 8080), (CLIENT, 41000), SYN | ACK).bytes(),
            ),
            untouched(
                "... and its reverse entry went with it: the next reply is not a flow of ours",
                TcEgress,
                tcp((POD_A, 8080), (CLIENT, 41000), ACK).bytes(),
            ),
        ],
    );
}

/// One local NodePort (30080/TCP → `POD_A:8080`), as the hint tests use it.
fn local_web(h: &mut Harness) {
    let mut state = State::default();
    state.frontends.insert(
        frontend(None, 30080, Protocol::Tcp),
        service("web", &[(POD_A, 8080, true)], false),
    );
    h.program(&state);
}

/// A client (address in 203.0.113.0/24 and port, from `*next` on) whose reply tuple from
/// `POD_A:8080` falls in the hint slot of `key` and is not `key`; `*next` moves past it.
fn colliding_client(key: &Ct4Key, next: &mut u32) -> (String, u16) {
    let slot = lb_common::reply_hint_slot(key);
    loop {
        let n = *next;
        *next += 1;
        let client = format!("203.0.113.{}", 1 + (n >> 16) % 250);
        let port = (n & 0xffff) as u16;
        if port < 1024 {
            continue;
        }
        let reply = ct_key(&tcp((POD_A, 8080), (&client, port), SYN | ACK));
        if reply != *key && lb_common::reply_hint_slot(&reply) == slot {
            return (client, port);
        }
    }
}

/// A new flow's SYN to the local NodePort, DNATed to `POD_A`.
fn syn_to_web(h: &mut Harness, client: &str, port: u16) {
    let syn = tcp((client, port), (NODE, 30080), SYN);
    let (verdict, out, _) = h.run(Hook::Xdp, &syn.bytes(), 1);
    assert_eq!(verdict, XDP_PASS);
    assert_eq!(out, syn.with_dst(POD_A, 8080).bytes());
}

/// `POD_A`'s reply to `client:port` at tc egress leaves from the NodePort.
fn reply_from_web(h: &mut Harness, client: &str, port: u16, flags: u8) {
    let reply = tcp((POD_A, 8080), (client, port), flags);
    let (verdict, out, _) = h.run(Hook::TcEgress, &reply.bytes(), 1);
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(
        out,
        reply.with_src(NODE, 30080).bytes(),
        "the reply to {client}:{port} leaves from the NodePort"
    );
}

/// A new flow to a local backend makes one LRU insert (its conntrack entry): its reverse entry
/// waits as a hint until the first reply, which tc egress translates from the hint and turns
/// into the reverse map's entry; later replies find that entry.
#[test]
fn a_new_flows_reverse_entry_is_a_hint_until_its_first_reply() {
    let mut h = Harness::new();
    local_web(&mut h);
    let port = 22_000;
    let before = h.reasons();
    syn_to_web(&mut h, CLIENT, port);
    let client_key = ct_key(&tcp((CLIENT, port), (NODE, 30080), SYN));
    let key = ct_key(&tcp((POD_A, 8080), (CLIENT, port), SYN | ACK));
    assert!(
        ct_map(&mut h).get(&client_key, 0).is_ok(),
        "its conntrack entry"
    );
    assert!(
        flowrev_map(&mut h).get(&key, 0).is_err(),
        "no reverse map insert on the first packet"
    );
    let hinted = hint(&h, &key).expect("the reverse entry waits as a hint");
    assert_eq!(hinted.client_key(), client_key);
    assert_eq!(hinted.flags, 0);

    reply_from_web(&mut h, CLIENT, port, SYN | ACK);
    assert_eq!(
        flowrev_map(&mut h).get(&key, 0).ok(),
        Some(hinted),
        "the first reply made the reverse entry"
    );
    assert_eq!(hint(&h, &key), None, "and took the hint");
    let ct = ct_map(&mut h).get(&client_key, 0).unwrap();
    assert_ne!(ct.flags & ct_flags::SEEN_REPLY, 0, "the reply was tracked");
    assert_ne!(ct.flags & ct_flags::SYN_RECV, 0);

    reply_from_web(&mut h, CLIENT, port, ACK);
    assert_eq!(
        reason_delta(&before, &h.reasons()),
        BTreeMap::from([(("xdp", "forwarded"), 1), (("tc", "reply_translated"), 2)])
    );
}

/// Another new flow whose replies want the same hint slot before the first flow's reply came:
/// the first flow's hint moves to the reverse map, so neither loses its translation; a packet
/// of a third tuple of that slot takes neither.
#[test]
fn a_hint_slot_another_flow_wants_moves_its_hint_to_the_reverse_map() {
    let mut h = Harness::new();
    local_web(&mut h);
    let port = 23_000;
    syn_to_web(&mut h, CLIENT, port);
    let a = ct_key(&tcp((POD_A, 8080), (CLIENT, port), SYN | ACK));
    let a_hint = hint(&h, &a).expect("a's hint");
    let mut next = 1 << 16;
    let (b_client, b_port) = colliding_client(&a, &mut next);
    let b = ct_key(&tcp((POD_A, 8080), (&b_client, b_port), SYN | ACK));
    syn_to_web(&mut h, &b_client, b_port);
    assert_eq!(hint(&h, &a), None, "b holds the slot");
    assert_eq!(
        flowrev_map(&mut h).get(&a, 0).ok(),
        Some(a_hint),
        "a's hint moved to the reverse map"
    );
    let b_hint = hint(&h, &b).expect("b's hint");
    assert_eq!(
        b_hint.client_key(),
        ct_key(&tcp((&b_client, b_port), (NODE, 30080), SYN))
    );
    assert!(flowrev_map(&mut h).get(&b, 0).is_err());

    // A tuple of the same slot that is no flow: nothing taken, nothing translated.
    let (c_client, c_port) = colliding_client(&a, &mut next);
    let stranger = tcp((POD_A, 8080), (&c_client, c_port), SYN | ACK);
    let before = h.reasons();
    let (verdict, out, _) = h.run(Hook::TcEgress, &stranger.bytes(), 1);
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(out, stranger.bytes(), "not translated");
    assert_eq!(
        reason_delta(&before, &h.reasons()),
        BTreeMap::from([(("tc", "not_a_flow"), 1)])
    );
    assert_eq!(hint(&h, &b), Some(b_hint), "b's hint is still there");
    assert!(flowrev_map(&mut h).get(&ct_key(&stranger), 0).is_err());

    reply_from_web(&mut h, &b_client, b_port, SYN | ACK);
    reply_from_web(&mut h, CLIENT, port, SYN | ACK);
    assert_eq!(flowrev_map(&mut h).get(&b, 0).ok(), Some(b_hint));
}

/// A slot another CPU is writing (`BUSY`) is neither taken by a reply (even of its tuple: its
/// entry may be half written) nor written by a new flow, which inserts its reverse entry into
/// the reverse map directly.
#[test]
fn a_hint_slot_being_written_is_neither_taken_nor_overwritten() {
    use lb_common::{ReplyHint4, hint_state};
    let mut h = Harness::new();
    local_web(&mut h);
    let port = 24_000;
    let key = ct_key(&tcp((POD_A, 8080), (CLIENT, port), SYN | ACK));
    let half_written = ReplyHint4 {
        state: hint_state::BUSY | hint_state::PENDING | (7 * hint_state::GENERATION),
        key,
        rev: Rev4Value {
            frontend_addr: wire_addr("192.0.2.99".parse().unwrap()),
            ..Rev4Value::default()
        },
    };
    let slot = lb_common::reply_hint_slot(&key);
    let mut map = hint_map(&h);
    let mut hints: aya::maps::Array<&mut aya::maps::MapData, ReplyHint4> =
        aya::maps::Array::try_from(&mut map).unwrap();
    hints.set(slot, half_written, 0).unwrap();

    syn_to_web(&mut h, CLIENT, port);
    let rev = flowrev_map(&mut h)
        .get(&key, 0)
        .expect("the reverse entry went to the reverse map directly");
    assert_eq!(
        rev.client_key(),
        ct_key(&tcp((CLIENT, port), (NODE, 30080), SYN))
    );
    assert_eq!(
        hints.get(&slot, 0).unwrap(),
        half_written,
        "the slot untouched"
    );
    reply_from_web(&mut h, CLIENT, port, SYN | ACK);
    assert_eq!(hints.get(&slot, 0).unwrap(), half_written, "not taken");
}

/// `BPF_PROG_LOAD` of `r0 = XDP_PASS; exit`, the program costs are measured over.
fn load_xdp_pass() -> std::os::fd::OwnedFd {
    use std::os::fd::FromRawFd as _;
    let insns: [u64; 2] = [0x0000_0002_0000_00b7, 0x0000_0000_0000_0095];
    let license = b"GPL\0";
    // union bpf_attr, BPF_PROG_LOAD: prog_type, insn_cnt, insns, license, the rest zero.
    let mut attr = [0u64; 16];
    attr[0] = 6 /* BPF_PROG_TYPE_XDP */ | (2u64 << 32);
    attr[1] = insns.as_ptr() as u64;
    attr[2] = license.as_ptr() as u64;
    // SAFETY: a zeroed attribute with the fields above; the buffers outlive the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            5, /* BPF_PROG_LOAD */
            attr.as_mut_ptr(),
            128,
        )
    };
    assert!(
        fd >= 0,
        "loading XDP_PASS: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: a descriptor the kernel just returned.
    unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) }
}

/// `BPF_PROG_TEST_RUN` of `prog` once on `frame`: ns.
fn run_fd(prog: &std::os::fd::OwnedFd, frame: &[u8]) -> u32 {
    use std::os::fd::AsRawFd as _;
    let mut out = vec![0u8; frame.len() + 256];
    // prog_fd, retval, data_size_in, data_size_out, data_in, data_out, repeat, duration, ...
    let mut attr = [0u64; 10];
    attr[0] = prog.as_raw_fd() as u64;
    attr[1] = frame.len() as u64 | ((out.len() as u64) << 32);
    attr[2] = frame.as_ptr() as u64;
    attr[3] = out.as_mut_ptr() as u64;
    attr[4] = 1;
    // SAFETY: as above.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            10, /* BPF_PROG_TEST_RUN */
            attr.as_mut_ptr(),
            80,
        )
    };
    assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
    (attr[4] >> 32) as u32
}

/// The first packet of a new local flow with reply hints (H) and with the hint slots of its
/// reply tuples held (`BUSY`), so its reverse entry goes to the reverse map as before hints
/// (D, which also pays the hint check): single `BPF_PROG_TEST_RUN`s as the bench makes them,
/// every packet a new flow, over an XDP_PASS program, arms interleaved in batches of
/// `BATCH`, medians and means per conntrack fill. A measurement, no assertion on time:
/// `cargo test ... -- --ignored --nocapture xdp_first_packet`.
#[test]
#[ignore = "a measurement: run on its own"]
fn xdp_first_packet_cost_with_and_without_reply_hints() {
    use lb_common::{ReplyHint4, hint_state};
    let mut h = Harness::new();
    local_web(&mut h);
    let pass = load_xdp_pass();
    const BATCH: u32 = 2_000;
    const ROUNDS: u32 = 40;
    let mut flow = 0u32;
    let tracked = tcp((CLIENT, 55_555), (NODE, 30080), ACK).bytes();
    h.run(Hook::Xdp, &tracked, 1);
    let miss = tcp((CLIENT, 55_555), (NODE, 9999), ACK).bytes();
    let stats = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        (v[v.len() / 2], v.iter().sum::<f64>() / v.len() as f64)
    };
    // Per fill half (below / at a full conntrack map): arm -> per-packet ns over XDP_PASS.
    let mut results: BTreeMap<(bool, &str), Vec<f64>> = BTreeMap::new();
    for round in 0..ROUNDS {
        let full = ct_map(&mut h).keys().count() >= lb_common::limits::MAX_FLOWS as usize - 1_000;
        for arm in if round % 2 == 0 {
            ["H", "D"]
        } else {
            ["D", "H"]
        } {
            let clients: Vec<String> = (0..BATCH)
                .map(|_| {
                    let n = flow | 0x0040_0000;
                    flow += 1;
                    format!("10.{}.{}.{}", (n >> 16) & 0xff, (n >> 8) & 0xff, n & 0xff)
                })
                .collect();
            let mut map = hint_map(&h);
            let mut hints: aya::maps::Array<&mut aya::maps::MapData, ReplyHint4> =
                aya::maps::Array::try_from(&mut map).unwrap();
            let mut saved = Vec::new();
            if arm == "D" {
                for c in &clients {
                    let slot =
                        lb_common::reply_hint_slot(&ct_key(&tcp((POD_A, 8080), (c, 40_000), SYN)));
                    let s = hints.get(&slot, 0).unwrap();
                    saved.push((slot, s));
                    hints
                        .set(
                            slot,
                            ReplyHint4 {
                                state: s.state | hint_state::BUSY,
                                ..s
                            },
                            0,
                        )
                        .unwrap();
                }
            }
            for c in &clients {
                let p = tcp((c, 40_000), (NODE, 30080), SYN).bytes();
                let (verdict, _, ns) = h.run(Hook::Xdp, &p, 1);
                assert_eq!(verdict, XDP_PASS);
                let base = run_fd(&pass, &miss);
                results
                    .entry((full, arm))
                    .or_default()
                    .push(ns as f64 - f64::from(base));
                let t = h.run(Hook::Xdp, &tracked, 1).2 as f64;
                results
                    .entry((full, "tracked"))
                    .or_default()
                    .push(t - f64::from(base));
                let m = h.run(Hook::Xdp, &miss, 1).2 as f64;
                results
                    .entry((full, "miss"))
                    .or_default()
                    .push(m - f64::from(base));
            }
            for (slot, s) in saved.into_iter().rev() {
                hints.set(slot, s, 0).unwrap();
            }
        }
    }
    let fill = ct_map(&mut h).keys().count();
    let pending = common::hints::all::<lb_common::Addr4>(&hint_map(&h))
        .iter()
        .filter(|s| common::hints::pending(s))
        .count();
    eprintln!(
        "{} new flows in all; conntrack entries at the end {fill}, hints pending {pending}",
        flow
    );
    for ((full, arm), v) in results.iter_mut() {
        let n = v.len();
        let (median, mean) = stats(v);
        eprintln!(
            "{} {arm:<8} over XDP_PASS: median {median:.0} ns, mean {mean:.0} ns ({n} packets)",
            if *full {
                "conntrack full     "
            } else {
                "conntrack not full "
            }
        );
    }
}
