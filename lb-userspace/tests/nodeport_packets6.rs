//! IPv6 frames through the real north-south programs under `BPF_PROG_TEST_RUN`, with the IPv6
//! maps (`LB6_*`) written directly (not through the agent's model). The IPv6 path of the
//! programs is compiled from the same generic source as IPv4's but not enabled yet
//! (`lb-ebpf/src/ip.rs`, `V6_ENABLED`: its call chain does not fit the verifier's 512-byte
//! stack, see docs/nodeport.md "IPv6"): until it is, every IPv6 frame, a NodePort's included,
//! must pass both programs untouched, counted as `not_parsed`, never mistranslated or
//! dropped. The frames are built by `packet6/` with checksums verified from scratch, ready for
//! the translation cases once the path is on. Needs root (it loads programs), attaches nothing.
mod common;
mod packet6;

use std::collections::BTreeMap;

use aya::{
    maps::{HashMap, MapData},
    programs::{TestRun as _, TestRunOptions},
};
use common::BpffsDir;
use lb_agent::dataplane::{Dataplane, Limits, bpffs::PinDir, nodeport, reasons::ReasonCounters};
use lb_common::{
    Addr6, Backend6, Frontend6Key, FrontendValue, MaglevTable, MapAddr, SlotKey, SlotValue,
    backend_flags, backend_states, frontend_kinds, map_names, scopes,
};
use packet6::{
    ACK, AUTH, DEST_OPTS, Ext, FRAGMENT, HOP_BY_HOP, SYN, icmp6_error, options, routing, tcp6,
    udp6, verify6,
};

const XDP_PASS: u32 = 2;
const TC_ACT_OK: u32 = 0;
const NODE: &str = "fd00:50::2";
const CLIENT: &str = "2001:db8::7";
const POD: &str = "fd00:244::10";
const ROUTER: &str = "2001:db8:ff::1";
const NODE_PORT: u16 = 30080;
/// `BPF_PROG_TEST_RUN` runs XDP on the loopback device's queue: ifindex 1.
const TEST_RUN_IFINDEX: u32 = 1;

fn addr(s: &str) -> Addr6 {
    Addr6::from_ip(s.parse().unwrap())
}

struct Harness {
    dataplane: Dataplane,
    _bpffs: BpffsDir,
}

impl Harness {
    fn new() -> Harness {
        lb_testkit::require_root().expect("the packet tests load eBPF programs: run as root");
        let bpffs = BpffsDir::new();
        let pins = PinDir::prepare(bpffs.path()).expect("preparing bpffs");
        let mut dataplane = Dataplane::load(pins, Limits::default()).expect("loading the object");
        nodeport::load_programs(dataplane.ebpf_mut()).expect("loading the programs");
        let mut h = Harness {
            dataplane,
            _bpffs: bpffs,
        };
        h.program_node_port();
        h
    }

    fn map(&mut self, name: &str) -> &mut aya::maps::Map {
        self.dataplane
            .ebpf_mut()
            .map_mut(name)
            .unwrap_or_else(|| panic!("no map {name}"))
    }

    /// One IPv6 NodePort (TCP 30080) with one local backend, the node's address and the SNAT
    /// source of the test run's interface: the maps as the agent would write them.
    fn program_node_port(&mut self) {
        let service_id = 1;
        let backend_id = 1;
        let mut front: HashMap<&mut MapData, Frontend6Key, FrontendValue> =
            HashMap::try_from(self.map(map_names::FRONTENDS_V6)).unwrap();
        let key = Frontend6Key {
            addr: [0; 4],
            port: NODE_PORT.to_be(),
            proto: packet6::TCP,
            scope: scopes::EXTERNAL,
        };
        let value = FrontendValue {
            service_id,
            count: 1,
            generation: 0,
            flags: 0,
            affinity_timeout_secs: 0,
            kind: frontend_kinds::NODE_PORT,
            pad: [0; 3],
        };
        front.insert(key, value, 0).unwrap();
        let mut backends: HashMap<&mut MapData, u32, Backend6> =
            HashMap::try_from(self.map(map_names::BACKENDS_V6)).unwrap();
        let backend = Backend6 {
            addr: addr(POD),
            port: 8080u16.to_be(),
            state: backend_states::ACTIVE,
            flags: backend_flags::LOCAL,
        };
        backends.insert(backend_id, backend, 0).unwrap();
        let mut slots: HashMap<&mut MapData, SlotKey, SlotValue> =
            HashMap::try_from(self.map(map_names::SLOTS_V4)).unwrap();
        let slot = SlotKey {
            service_id,
            index: 0,
            generation: 0,
            pad: 0,
        };
        slots.insert(slot, SlotValue { backend_id }, 0).unwrap();
        let mut maglev: HashMap<&mut MapData, u32, MaglevTable> =
            HashMap::try_from(self.map(map_names::MAGLEV_V4)).unwrap();
        let table = MaglevTable {
            backend_ids: [backend_id; lb_common::MAGLEV_SIZE as usize],
            pad: 0,
        };
        maglev.insert(service_id, table, 0).unwrap();
        let mut nodes: HashMap<&mut MapData, Addr6, u32> =
            HashMap::try_from(self.map(map_names::NODE_ADDRS_V6)).unwrap();
        nodes.insert(addr(NODE), 1, 0).unwrap();
        let mut ifaddrs: HashMap<&mut MapData, u32, Addr6> =
            HashMap::try_from(self.map(map_names::IFACE_ADDRS_V6)).unwrap();
        ifaddrs.insert(TEST_RUN_IFINDEX, addr(NODE), 0).unwrap();
    }

    fn reasons(&self) -> BTreeMap<(&'static str, &'static str), u64> {
        ReasonCounters::open_pinned(&self.dataplane.pins().maps())
            .expect("the reasons map is pinned")
            .read()
            .into_iter()
            .map(|c| ((c.program, c.reason), c.packets))
            .collect()
    }

    /// Runs `frame` through XDP and tc: (verdict, frame out) of each; `None` where the
    /// kernel refused the frame before any program ran.
    fn run_both(&mut self, frame: &[u8]) -> [Option<(u32, Vec<u8>)>; 2] {
        let ebpf = self.dataplane.ebpf_mut();
        let mut results = [None, None];
        for (i, result) in results.iter_mut().enumerate() {
            let mut out = vec![0u8; 2048];
            let opts = TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                repeat: 1,
                ..Default::default()
            };
            let run = if i == 0 {
                nodeport::xdp_program(ebpf).unwrap().test_run(opts)
            } else {
                nodeport::tc_program(ebpf).unwrap().test_run(opts)
            };
            if let Ok(r) = run {
                out.truncate(r.data_size_out as usize);
                *result = Some((r.return_value, out));
            }
        }
        results
    }
}

/// The IPv6 frames of the cases: name, frame, whether its checksums must verify.
fn frames() -> Vec<(&'static str, Vec<u8>, bool)> {
    let syn = tcp6((CLIENT, 40000), (NODE, NODE_PORT), SYN);
    let reply = tcp6((POD, 8080), (CLIENT, 40000), SYN | ACK);
    let mut frag = Ext {
        kind: FRAGMENT,
        body: vec![0, 0, 0, 1, 0x12, 0x34, 0x56, 0x78], // offset 0, M: a first fragment
    };
    let first_fragment = syn.clone().with_ext(frag.clone());
    frag.body[2..4].copy_from_slice(&(8u16 << 3).to_be_bytes()); // offset 8, M clear
    let later_fragment = syn.clone().with_ext(frag);
    let good = syn.bytes();
    let mut frames = vec![
        ("TCP SYN to a NodePort", good.clone(), true),
        (
            "UDP to a NodePort",
            udp6((CLIENT, 5000), (NODE, NODE_PORT)).bytes(),
            true,
        ),
        ("a backend's SYN-ACK at tc", reply.bytes(), true),
        (
            "Packet Too Big about a reply, quoting 1232 bytes' worth",
            icmp6_error(
                ROUTER,
                NODE,
                2,
                0,
                1280,
                &tcp6((NODE, NODE_PORT), (CLIENT, 40000), ACK),
                1232,
            ),
            true,
        ),
        (
            "destination unreachable about a client's packet",
            icmp6_error(POD, CLIENT, 1, 4, 0, &syn, 48),
            true,
        ),
        (
            "Hop-by-Hop, then TCP",
            syn.clone().with_ext(options(HOP_BY_HOP)).bytes(),
            true,
        ),
        (
            "Destination Options, then TCP",
            syn.clone().with_ext(options(DEST_OPTS)).bytes(),
            true,
        ),
        (
            "Routing with segments left 0",
            syn.clone().with_ext(routing(0)).bytes(),
            true,
        ),
        (
            "Routing with segments left 1",
            syn.clone().with_ext(routing(1)).bytes(),
            true,
        ),
        (
            "an Authentication header",
            syn.clone()
                .with_ext(Ext {
                    kind: AUTH,
                    body: vec![0; 16],
                })
                .bytes(),
            false,
        ),
        ("a first fragment", first_fragment.bytes(), true),
        ("a later fragment", later_fragment.bytes(), false),
    ];
    for cut in [14, 20, 53, 54, 60, 73] {
        frames.push(("truncated", good[..cut].to_vec(), false));
    }
    let mut long = good.clone();
    long[18..20].copy_from_slice(&2000u16.to_be_bytes());
    frames.push(("payload length beyond the frame", long, false));
    let mut zero_csum = udp6((CLIENT, 5000), (NODE, NODE_PORT)).bytes();
    let n = zero_csum.len();
    zero_csum[n - 6..n - 4].copy_from_slice(&[0, 0]);
    frames.push(("UDP checksum 0", zero_csum, false));
    frames
}

#[test]
fn ipv6_frames_pass_both_programs_untouched_while_the_ipv6_path_is_off() {
    let mut h = Harness::new();
    let before = h.reasons();
    let mut ran = [0u64; 2];
    let mut failures = Vec::new();
    for (name, frame, checksums) in frames() {
        if checksums {
            verify6(&frame).unwrap_or_else(|e| panic!("{name}: the builder made {e}"));
        }
        for (i, result) in h.run_both(&frame).into_iter().enumerate() {
            let hook = ["xdp", "tc"][i];
            let Some((verdict, out)) = result else {
                eprintln!("ok   {hook} {name}: refused by the kernel");
                continue;
            };
            ran[i] += 1;
            let pass = if i == 0 { XDP_PASS } else { TC_ACT_OK };
            if verdict != pass || out != frame {
                eprintln!(
                    "FAIL {hook} {name}: verdict {verdict}, frame changed: {}",
                    out != frame
                );
                failures.push(format!("{hook} {name}"));
            } else {
                eprintln!("ok   {hook} {name}");
            }
        }
    }
    assert!(failures.is_empty(), "{failures:?}");
    let after = h.reasons();
    let delta = |key| after.get(&key).unwrap_or(&0) - before.get(&key).unwrap_or(&0);
    assert_eq!(delta(("xdp", "not_parsed")), ran[0], "{after:?}");
    assert_eq!(delta(("tc", "not_parsed")), ran[1], "{after:?}");
    let counted: u64 = after.values().sum::<u64>() - before.values().sum::<u64>();
    assert_eq!(
        counted,
        ran[0] + ran[1],
        "every frame counted once: {after:?}"
    );
    assert!(
        ran[0] > 10 && ran[1] > 10,
        "most frames reach the programs: {ran:?}"
    );
}
