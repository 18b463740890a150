//! Loads the real XDP and tc programs once, writes each episode's random services with the
//! agent's reconciler, runs every generated frame through `BPF_PROG_TEST_RUN` and through the
//! model, and diffs verdict, frame, reason counter and the map entries the packet touched;
//! at the end of each episode the whole conntrack, reverse, fragment and affinity maps and
//! every reason counter. Attaches nothing.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    path::PathBuf,
    time::{Duration, Instant},
};

use aya::{
    maps::{HashMap as BpfHash, LpmTrie, Map, MapData, PerCpuArray},
    programs::{TestRun as _, TestRunOptions},
};
use lb_agent::{
    dataplane::{
        BpfServiceMaps, Dataplane, Limits,
        bpffs::PinDir,
        nodeport::{self, NodeAddrMaps},
    },
    reconcile::Reconciler,
};
use lb_common::{
    Affinity4Key, AffinityValue, Backend4, Ct4Key, Ct4Value, Frag4Key, FragPorts, Frontend4Key,
    FrontendValue, MaglevTable, Rev4Value, SourceRange4Key, affinity_clients, map_names, reasons,
};

use crate::common::hints;

use super::{
    generator::{Gen, wire_addr},
    model::{Config, Hook, Model, Oracle, parses},
    wire::hex,
};

/// `BPF_PROG_TEST_RUN` runs XDP on the loopback device's queue: ifindex 1.
const TEST_RUN_IFINDEX: u32 = 1;

pub struct Mismatch {
    pub seed: u64,
    pub index: u64,
    pub report: String,
    pub fixture: Option<PathBuf>,
}

#[derive(Default)]
pub struct Report {
    pub packets: u64,
    pub episodes: u64,
    pub refused_by_kernel: u64,
    pub elapsed: Duration,
    /// Of `elapsed`, writing each episode's services and reading them back.
    pub setup: Duration,
    /// Of `elapsed`, the whole-map comparisons at the end of each episode.
    pub compare: Duration,
    pub mismatches: Vec<Mismatch>,
    pub by_kind: BTreeMap<&'static str, u64>,
    pub by_reason: BTreeMap<String, u64>,
}

impl Report {
    pub fn packets_per_sec(&self) -> f64 {
        self.packets as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

pub struct Runner {
    dataplane: Dataplane,
    maps: BpfServiceMaps,
    addrs: NodeAddrMaps,
    reconciler: Reconciler,
    pins: PathBuf,
    _bpffs: crate::common::BpffsDir,
}

struct KernelCt<'a>(&'a mut Dataplane);

impl Oracle for KernelCt<'_> {
    fn ct(&mut self, key: &Ct4Key) -> Option<Ct4Value> {
        ct_map(self.0).get(key, 0).ok()
    }
}

fn ct_map(d: &mut Dataplane) -> BpfHash<&mut MapData, Ct4Key, Ct4Value> {
    BpfHash::try_from(
        d.ebpf_mut()
            .map_mut(map_names::FLOWS_V4)
            .expect("conntrack map"),
    )
    .expect("conntrack map type")
}

fn rev_map(d: &mut Dataplane) -> BpfHash<&mut MapData, Ct4Key, Rev4Value> {
    BpfHash::try_from(
        d.ebpf_mut()
            .map_mut(map_names::FLOW_REPLIES_V4)
            .expect("reverse map"),
    )
    .expect("reverse map type")
}

fn frag_map(d: &mut Dataplane) -> BpfHash<&mut MapData, Frag4Key, FragPorts> {
    BpfHash::try_from(
        d.ebpf_mut()
            .map_mut(map_names::FRAGS_V4)
            .expect("fragments map"),
    )
    .expect("fragments map type")
}

fn affinity_map(d: &mut Dataplane) -> BpfHash<&mut MapData, Affinity4Key, AffinityValue> {
    BpfHash::try_from(
        d.ebpf_mut()
            .map_mut(map_names::AFFINITY_V4)
            .expect("affinity map"),
    )
    .expect("affinity map type")
}

fn clear<K: aya::Pod, V: aya::Pod>(mut m: BpfHash<&mut MapData, K, V>) {
    let keys: Vec<K> = m.keys().filter_map(Result::ok).collect();
    for k in keys {
        let _ = m.remove(&k);
    }
}

fn ct_eq(a: &Ct4Value, b: &Ct4Value) -> bool {
    Ct4Value {
        last_seen_ns: 0,
        ..*a
    } == Ct4Value {
        last_seen_ns: 0,
        ..*b
    }
}

impl Runner {
    pub fn new() -> Runner {
        lb_testkit::require_root().expect("the packet fuzzer loads eBPF programs: run as root");
        let bpffs = crate::common::BpffsDir::new();
        let pins = PinDir::prepare(bpffs.path()).expect("preparing bpffs");
        let mut dataplane = Dataplane::load(pins, Limits::default()).expect("loading the object");
        let mut maps = dataplane.service_maps().expect("service maps");
        let addrs = NodeAddrMaps::take(dataplane.ebpf_mut()).expect("address maps");
        let reconciler = Reconciler::adopt(&mut maps).expect("adopting empty maps");
        nodeport::load_programs(dataplane.ebpf_mut()).expect("loading the programs");
        let pins = dataplane.pins().maps();
        Runner {
            dataplane,
            maps,
            addrs,
            reconciler,
            pins,
            _bpffs: bpffs,
        }
    }

    fn run_frame(&mut self, hook: Hook, frame: &[u8]) -> Result<(u32, Vec<u8>), String> {
        let mut out = vec![0u8; 2048];
        let opts = TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            repeat: 1,
            ..Default::default()
        };
        let ebpf = self.dataplane.ebpf_mut();
        let result = match hook {
            Hook::Xdp => nodeport::xdp_program(ebpf).unwrap().test_run(opts),
            Hook::Tc => nodeport::tc_program(ebpf).unwrap().test_run(opts),
        }
        .map_err(|e| e.to_string())?;
        out.truncate(result.data_size_out as usize);
        Ok((result.return_value, out))
    }

    fn reason_count(&mut self, reason: u32) -> u64 {
        let map = self
            .dataplane
            .ebpf_mut()
            .map_mut(map_names::REASONS_V4)
            .expect("reasons map");
        let counters: PerCpuArray<&mut MapData, u64> = PerCpuArray::try_from(map).expect("type");
        counters
            .get(&reason, 0)
            .map(|v| v.iter().sum())
            .unwrap_or(0)
    }

    fn open(&self, name: &str) -> MapData {
        MapData::from_pin(self.pins.join(name)).unwrap_or_else(|e| panic!("opening {name}: {e}"))
    }

    /// The service maps as the programs see them.
    fn read_config(&self, ep: &super::generator::Episode) -> Config {
        let frontends: BpfHash<MapData, Frontend4Key, FrontendValue> =
            BpfHash::try_from(Map::HashMap(self.open(map_names::FRONTENDS_V4))).unwrap();
        let backends: BpfHash<MapData, u32, Backend4> =
            BpfHash::try_from(Map::HashMap(self.open(map_names::BACKENDS_V4))).unwrap();
        let maglev: BpfHash<MapData, u32, MaglevTable> =
            BpfHash::try_from(Map::HashMap(self.open(map_names::MAGLEV_V4))).unwrap();
        let ranges: LpmTrie<MapData, SourceRange4Key, u8> =
            LpmTrie::try_from(Map::LpmTrie(self.open(map_names::SOURCE_RANGES_V4))).unwrap();
        Config {
            node_addrs: ep.node_addrs.iter().map(|a| wire_addr(*a)).collect(),
            snat_addr: ep.snat_addr.map(wire_addr),
            frontends: frontends.iter().map(Result::unwrap).collect(),
            backends: backends.iter().map(Result::unwrap).collect(),
            maglev: maglev
                .iter()
                .map(Result::unwrap)
                .map(|(id, t)| (id, t.backend_ids.to_vec()))
                .collect(),
            source_ranges: ranges
                .keys()
                .map(Result::unwrap)
                .map(|k| {
                    let d = k.data();
                    (
                        d.service_id(),
                        d.addr,
                        (k.prefix_len() - lb_common::source_range::SERVICE_ID_BITS) as u8,
                    )
                })
                .collect(),
        }
    }

    fn start_episode(&mut self, generator: &mut Gen, model: &mut Model) {
        let ep = generator.episode();
        let report = self.reconciler.sync(&ep.desired, &mut self.maps);
        assert!(report.failed.is_empty(), "reconciler: {:?}", report.failed);
        let node_addrs = ep.node_addrs.iter().map(|a| (*a).into()).collect();
        self.addrs.set_node_addrs(&node_addrs).unwrap();
        let ifaddrs: BTreeMap<_, _> = ep
            .snat_addr
            .map(|a| ((TEST_RUN_IFINDEX, lb_agent::model::Family::V4), a.into()))
            .into_iter()
            .collect();
        self.addrs.set_iface_addrs(&ifaddrs).unwrap();
        clear(ct_map(&mut self.dataplane));
        clear(rev_map(&mut self.dataplane));
        hints::clear::<lb_common::Addr4>(&mut Map::Array(self.open(map_names::REPLY_HINTS_V4)));
        clear(frag_map(&mut self.dataplane));
        clear(affinity_map(&mut self.dataplane));
        let cfg = self.read_config(&ep);
        model.reset_flows(cfg);
    }

    /// Compares the whole flow state at the end of an episode.
    fn compare_all(&mut self, model: &Model, baseline: &[u64]) -> Vec<String> {
        let mut problems = Vec::new();
        let kernel_ct: BTreeMap<Ct4Key, Ct4Value> = ct_map(&mut self.dataplane)
            .iter()
            .filter_map(Result::ok)
            .collect();
        for (k, flow) in &model.flows {
            match kernel_ct.get(k) {
                Some(v) if ct_eq(v, &flow.ct) => {}
                other => problems.push(format!(
                    "LB4_CT_V2 {}: expected {:?}, got {other:?}",
                    tuple(k),
                    flow.ct
                )),
            }
        }
        for (k, v) in &kernel_ct {
            if !model.flows.contains_key(k) {
                problems.push(format!("LB4_CT_V2 {}: unexpected entry {v:?}", tuple(k)));
            }
        }
        // The reverse map's own entries and the pending hints apart: a hint stands over the
        // map's entry of the same tuple, which is the reverse entry again if the hint goes.
        let kernel_map: BTreeMap<Ct4Key, Rev4Value> = rev_map(&mut self.dataplane)
            .iter()
            .filter_map(Result::ok)
            .collect();
        let kernel_hints: BTreeMap<Ct4Key, Rev4Value> =
            hints::all::<lb_common::Addr4>(&Map::Array(self.open(map_names::REPLY_HINTS_V4)))
                .into_iter()
                .filter(hints::pending)
                .map(|hint| (hint.key, hint.rev))
                .collect();
        let model_hints: BTreeMap<Ct4Key, Rev4Value> = model
            .hint_slots
            .values()
            .map(|k| (*k, model.revs[k].0))
            .collect();
        let model_map: BTreeMap<Ct4Key, Rev4Value> = model
            .revs
            .iter()
            .filter(|(k, _)| !model_hints.contains_key(*k))
            .chain(&model.beneath)
            .map(|(k, (v, _))| (*k, *v))
            .collect();
        for (what, kernel, wanted) in [
            ("LB4_FLOWREV_V2", &kernel_map, &model_map),
            ("LB4_RHINT_V1 (pending)", &kernel_hints, &model_hints),
        ] {
            for (k, v) in wanted {
                if kernel.get(k) != Some(v) {
                    problems.push(format!(
                        "{what} {}: expected {v:?}, got {:?}",
                        tuple(k),
                        kernel.get(k)
                    ));
                }
            }
            for (k, v) in kernel {
                if !wanted.contains_key(k) {
                    problems.push(format!("{what} {}: unexpected entry {v:?}", tuple(k)));
                }
            }
        }
        let flat =
            |k: &Frag4Key, v: &FragPorts| (k.saddr, k.daddr, k.id, k.proto, v.sport, v.dport);
        let kernel_frags: BTreeSet<_> = frag_map(&mut self.dataplane)
            .iter()
            .filter_map(Result::ok)
            .map(|(k, v)| flat(&k, &v))
            .collect();
        let model_frags: BTreeSet<_> = model.frags.iter().map(|(k, v)| flat(k, v)).collect();
        if kernel_frags != model_frags {
            problems.push(format!(
                "LB4_FRAGS_V2: expected {model_frags:?}, got {kernel_frags:?}"
            ));
        }
        let kernel_aff: BTreeMap<(u32, u32), u32> = affinity_map(&mut self.dataplane)
            .iter()
            .filter_map(Result::ok)
            .filter(|(k, _)| k.client_kind == affinity_clients::ADDRESS)
            .map(|(k, v)| ((k.client as u32, k.service_id), v.backend_id))
            .collect();
        if kernel_aff != model.affinity {
            problems.push(format!(
                "LB4_AFFIN_V2: expected {:?}, got {kernel_aff:?}",
                model.affinity
            ));
        }
        for reason in 0..reasons::COUNT {
            let got = self.reason_count(reason) - baseline[reason as usize];
            if got != model.reasons[reason as usize] {
                problems.push(format!(
                    "reason {:?}: {got} packets, expected {}",
                    reasons::name(reason),
                    model.reasons[reason as usize]
                ));
            }
        }
        problems
    }

    /// Runs `packets` frames from `seed`; stops at the first mismatch when `stop_at_first`.
    /// Each episode has a generator of its own, seeded from `seed` and its number, so a
    /// mismatch's fixture (the episode's seed and frames) replays without the rest.
    pub fn run(&mut self, seed: u64, packets: u64, stop_at_first: bool) -> Report {
        let mut model = Model::default();
        let baseline: Vec<u64> = (0..reasons::COUNT).map(|r| self.reason_count(r)).collect();
        let mut report = Report::default();
        let start = Instant::now();
        let mut index = 0u64;
        let mut episode = 0u64;
        while index < packets {
            let eseed = episode_seed(seed, episode);
            let mut generator = Gen::new(eseed);
            let t = Instant::now();
            self.start_episode(&mut generator, &mut model);
            report.setup += t.elapsed();
            report.episodes += 1;
            let len = 200 + generator.rng.u64(..1800);
            let mut frames: Vec<(Hook, Vec<u8>)> = Vec::new();
            let mut history: std::collections::VecDeque<String> = Default::default();
            let mut problem = None;
            for _ in 0..len {
                if index >= packets {
                    break;
                }
                let (hook, frame, kind) = generator.packet(&model);
                *report.by_kind.entry(kind).or_default() += 1;
                frames.push((hook, frame.clone()));
                let outcome = self.one(&mut model, hook, &frame, &baseline, &mut report);
                if history.len() == 12 {
                    history.pop_front();
                }
                history.push_back(format!("{index} {hook:?} {kind}: {}", summary(&frame)));
                index += 1;
                if let Some(p) = outcome {
                    problem = Some(format!(
                        "seed {seed} episode {episode} packet {} ({kind}, {hook:?}):\n  frame {}\n  {p}\n  services: {:?}\n  recent packets:\n    {}",
                        index - 1,
                        hex(&frame),
                        model
                            .cfg
                            .frontends
                            .iter()
                            .map(|(k, v)| format!(
                                "{}:{}/{} id {} n {} flags {:#x} kind {}",
                                ipv4(k.addr),
                                u16::from_be(k.port),
                                k.proto,
                                v.service_id,
                                v.count,
                                v.flags,
                                v.kind
                            ))
                            .collect::<Vec<_>>(),
                        history.iter().cloned().collect::<Vec<_>>().join("\n    ")
                    ));
                    break;
                }
            }
            if problem.is_none() {
                let t = Instant::now();
                let problems = self.compare_all(&model, &baseline);
                report.compare += t.elapsed();
                if !problems.is_empty() {
                    problem = Some(format!(
                        "seed {seed} episode {episode}, at its end (packet {index}):\n  {}",
                        problems.join("\n  ")
                    ));
                }
            }
            if let Some(p) = problem {
                let fixture = write_fixture(seed, episode, eseed, index - 1, &frames, &p);
                report.mismatches.push(Mismatch {
                    seed,
                    index: index - 1,
                    report: p,
                    fixture,
                });
                if stop_at_first {
                    break;
                }
                // The model and the kernel parted: go on from the kernel's counts.
                for r in 0..reasons::COUNT {
                    model.reasons[r as usize] = self.reason_count(r) - baseline[r as usize];
                }
            }
            episode += 1;
        }
        report.packets = index;
        report.elapsed = start.elapsed();
        for (r, n) in model.reasons.iter().enumerate() {
            if *n > 0 {
                let (p, name) = reasons::name(r as u32).unwrap();
                report.by_reason.insert(format!("{p}/{name}"), *n);
            }
        }
        report
    }

    /// Replays a fixture: the episode of `eseed` (its services) and exactly `frames`.
    pub fn replay(&mut self, eseed: u64, frames: &[(Hook, Vec<u8>)]) -> Result<(), String> {
        let mut model = Model::default();
        let baseline: Vec<u64> = (0..reasons::COUNT).map(|r| self.reason_count(r)).collect();
        let mut generator = Gen::new(eseed);
        self.start_episode(&mut generator, &mut model);
        let mut report = Report::default();
        for (i, (hook, frame)) in frames.iter().enumerate() {
            if let Some(p) = self.one(&mut model, *hook, frame, &baseline, &mut report) {
                return Err(format!("frame {i} ({hook:?} {}): {p}", summary(frame)));
            }
        }
        let problems = self.compare_all(&model, &baseline);
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems.join("\n"))
        }
    }

    /// One frame through the kernel and the model; a description of what differs.
    fn one(
        &mut self,
        model: &mut Model,
        hook: Hook,
        frame: &[u8],
        baseline: &[u64],
        report: &mut Report,
    ) -> Option<String> {
        let got = match self.run_frame(hook, frame) {
            Ok(got) => got,
            Err(e) => {
                if parses(frame) {
                    return Some(format!("the kernel refused a frame the model parses: {e}"));
                }
                report.refused_by_kernel += 1;
                return None;
            }
        };
        let expect = match model.step(hook, frame, &mut KernelCt(&mut self.dataplane)) {
            Ok(e) => e,
            Err(e) => return Some(format!("invalid kernel choice: {e}")),
        };
        let mut problems = String::new();
        if got.0 != expect.verdict {
            let _ = write!(
                problems,
                "verdict: expected {}, got {}; ",
                expect.verdict, got.0
            );
        }
        if got.1 != expect.frame {
            let _ = write!(
                problems,
                "frame out differs:\n    expected {}\n    got      {}\n  ",
                hex(&expect.frame),
                hex(&got.1)
            );
        }
        let count = self.reason_count(expect.reason) - baseline[expect.reason as usize];
        if count != model.reasons[expect.reason as usize] {
            let _ = write!(
                problems,
                "reason {:?} not counted (kernel {count}, model {}); ",
                reasons::name(expect.reason),
                model.reasons[expect.reason as usize]
            );
        }
        let touched_ct = model.touched_ct.clone();
        let ct = ct_map(&mut self.dataplane);
        for k in &touched_ct {
            let kernel = ct.get(k, 0).ok();
            let wanted = model.flows.get(k).map(|f| f.ct);
            let same = match (&kernel, &wanted) {
                (Some(a), Some(b)) => ct_eq(a, b),
                (None, None) => true,
                _ => false,
            };
            if !same {
                let _ = write!(
                    problems,
                    "LB4_CT_V2 {}: expected {wanted:?}, got {kernel:?}; ",
                    tuple(k)
                );
            }
        }
        let touched_rev = model.touched_rev.clone();
        let hint_map = Map::Array(self.open(map_names::REPLY_HINTS_V4));
        let rev = rev_map(&mut self.dataplane);
        for k in &touched_rev {
            let kernel = hints::reverse_entry(&hint_map, &rev, k);
            let wanted = model.revs.get(k).map(|(v, _)| *v);
            if kernel != wanted {
                let _ = write!(
                    problems,
                    "LB4_FLOWREV_V2 {}: expected {wanted:?}, got {kernel:?}; ",
                    tuple(k)
                );
            }
        }
        if problems.is_empty() {
            None
        } else {
            let moved: Vec<_> = (0..reasons::COUNT)
                .filter(|&r| {
                    self.reason_count(r) - baseline[r as usize] != model.reasons[r as usize]
                })
                .map(|r| reasons::name(r))
                .collect();
            let _ = write!(problems, "reasons the kernel counted otherwise: {moved:?}");
            Some(format!(
                "expected reason {:?}\n  {problems}",
                reasons::name(expect.reason)
            ))
        }
    }
}

/// Where mismatching frames are written (`LB_FUZZ_FIXTURES`, else the packet tests' fixtures
/// directory, which the replay test reads).
pub fn fixture_dir() -> PathBuf {
    std::env::var_os("LB_FUZZ_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/packet_fuzz")
        })
}

fn write_fixture(
    seed: u64,
    episode: u64,
    eseed: u64,
    index: u64,
    frames: &[(Hook, Vec<u8>)],
    problem: &str,
) -> Option<PathBuf> {
    let dir = fixture_dir();
    std::fs::create_dir_all(&dir).ok()?;
    let path = dir.join(format!("seed-{seed}-packet-{index}.txt"));
    let mut text = String::new();
    let _ = writeln!(
        text,
        "# A mismatch of the packet fuzzer: `episode_seed` gives the services, then every frame\n\
         # of the episode up to the mismatching one, in order (hook, frame in hex).\n\
         seed = {seed}\nepisode = {episode}\nepisode_seed = {eseed}\npacket = {index}"
    );
    for line in problem.lines() {
        let _ = writeln!(text, "# {line}");
    }
    for (hook, frame) in frames {
        let _ = writeln!(
            text,
            "{} {}",
            if *hook == Hook::Xdp { "xdp" } else { "tc" },
            hex(frame)
        );
    }
    std::fs::write(&path, text).ok()?;
    Some(path)
}

/// Frames in order, each with the hook it goes to.
pub type Frames = Vec<(Hook, Vec<u8>)>;

/// A fixture file's episode seed and frames.
pub fn read_fixture(text: &str) -> Option<(u64, Frames)> {
    let eseed = text.lines().find_map(|l| {
        l.strip_prefix("episode_seed")?
            .trim_start()
            .strip_prefix('=')?
            .trim()
            .parse()
            .ok()
    })?;
    let frames = text
        .lines()
        .filter_map(|l| {
            let (hook, frame) = l.split_once(' ')?;
            let hook = match hook {
                "xdp" => Hook::Xdp,
                "tc" => Hook::Tc,
                _ => return None,
            };
            Some((hook, super::wire::unhex(frame.trim())))
        })
        .collect();
    Some((eseed, frames))
}

/// The seed of episode `episode` of a run from `seed` (splitmix64's mix).
pub fn episode_seed(seed: u64, episode: u64) -> u64 {
    let mut z = seed.wrapping_add(episode.wrapping_add(1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn ipv4(wire: u32) -> std::net::Ipv4Addr {
    std::net::Ipv4Addr::from(wire.to_ne_bytes())
}

/// One line for a frame: addresses, ports, protocol, TCP flags, fragment bits.
pub fn summary(f: &[u8]) -> String {
    use super::wire::{be16, port_at};
    if f.len() < 34 || f[12..14] != [8, 0] {
        return format!("{} bytes, not IPv4", f.len());
    }
    let a = |at: usize| ipv4(u32::from_ne_bytes([f[at], f[at + 1], f[at + 2], f[at + 3]]));
    let mut s = format!(
        "{} -> {} proto {} ihl {} len {} frag {:#06x}",
        a(26),
        a(30),
        f[23],
        f[14] & 15,
        be16(f, 16),
        be16(f, 20)
    );
    if f.len() >= 38 {
        s += &format!(
            " ports {} -> {}",
            u16::from_be(port_at(f, 34)),
            u16::from_be(port_at(f, 36))
        );
    }
    if f[23] == 6 && f.len() >= 48 {
        s += &format!(" tcp {:#04x}", f[47]);
    }
    s
}

/// A tuple as addresses and ports.
pub fn tuple(k: &Ct4Key) -> String {
    format!(
        "{}:{} -> {}:{}/{}",
        ipv4(k.saddr),
        u16::from_be(k.sport),
        ipv4(k.daddr),
        u16::from_be(k.dport),
        k.proto
    )
}
