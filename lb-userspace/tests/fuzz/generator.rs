//! The seeded generator: random services for an episode, and random and mutated frames
//! (valid flows both ways, fragments, IP options, ICMP errors quoting flows or random
//! headers, truncation, flipped bytes, garbage, non-IPv4). The same seed gives the same
//! episodes and frames, as long as the kernel's choices (SNAT ports) are the same.

use std::{
    collections::{BTreeMap, BTreeSet, VecDeque},
    net::Ipv4Addr,
};

use lb_agent::model::{
    Backend, BackendSet, DesiredService, DesiredState, Endpoints, Family, Frontend, FrontendKind,
    Protocol, ServicePortName, SetKey, SourceRanges,
};
use lb_common::{ct_flags, tcp_flags as t};

use super::{
    model::{Hook, Model},
    wire::*,
};

pub const NODE_ADDRS: [[u8; 4]; 3] = [[192, 168, 50, 2], [192, 168, 50, 3], [192, 168, 50, 4]];
const CLIENTS: [[u8; 4]; 6] = [
    [203, 0, 113, 1],
    [203, 0, 113, 2],
    [203, 0, 113, 5],
    [198, 18, 0, 1],
    [198, 18, 0, 9],
    [192, 0, 2, 99],
];
const ROUTER: [u8; 4] = [192, 0, 2, 254];
const EXTERNAL_IPS: [[u8; 4]; 3] = [[198, 51, 100, 10], [198, 51, 100, 11], [198, 51, 100, 12]];
const LB_IPS: [[u8; 4]; 3] = [[198, 51, 100, 20], [198, 51, 100, 21], [198, 51, 100, 22]];
const CLUSTER_IPS: [[u8; 4]; 2] = [[10, 96, 0, 10], [10, 96, 0, 11]];
const LOCAL_PODS: [[u8; 4]; 3] = [[10, 244, 0, 10], [10, 244, 0, 11], [10, 244, 0, 12]];
const REMOTE_PODS: [[u8; 4]; 3] = [[10, 244, 1, 10], [10, 244, 1, 11], [10, 244, 1, 12]];
const NODE_PORTS: [u16; 4] = [30080, 30081, 30082, 30083];
const SERVICE_PORTS: [u16; 2] = [80, 53];
const RANGES: [&str; 6] = [
    "203.0.113.0/30",
    "203.0.113.4/31",
    "198.18.0.0/16",
    "203.0.113.2/32",
    "192.0.2.0/24",
    "0.0.0.0/1",
];
const TCP_FLAGS: [u8; 9] = [
    t::SYN,
    t::SYN,
    t::ACK,
    t::ACK | 0x08,
    t::FIN | t::ACK,
    t::RST,
    t::RST | t::ACK,
    t::SYN | t::ACK,
    t::FIN,
];

/// One episode's services and addresses.
#[derive(Clone, Debug)]
pub struct Episode {
    pub desired: DesiredState,
    pub node_addrs: BTreeSet<Ipv4Addr>,
    pub snat_addr: Option<Ipv4Addr>,
    /// Every frontend with its backends (address, port), for building packets.
    frontends: Vec<(Frontend, Vec<(Ipv4Addr, u16)>)>,
}

pub struct Gen {
    pub rng: fastrand::Rng,
    episode: Option<Episode>,
    queue: VecDeque<(Hook, Vec<u8>, &'static str)>,
}

fn ip(a: [u8; 4]) -> Ipv4Addr {
    Ipv4Addr::from(a)
}

/// The IPv4 address of a model address (this generator builds IPv4 services only).
fn ipv4(ip: std::net::IpAddr) -> Ipv4Addr {
    match ip {
        std::net::IpAddr::V4(ip) => ip,
        std::net::IpAddr::V6(ip) => panic!("{ip}: the packet fuzzer builds IPv4 only"),
    }
}

fn wire(a: Ipv4Addr) -> u32 {
    lb_common::addr_to_map(u32::from(a))
}

fn from_wire(a: u32) -> [u8; 4] {
    a.to_ne_bytes()
}

/// A TCP/UDP frame with correct checksums.
pub struct Frame {
    pub src: [u8; 4],
    pub dst: [u8; 4],
    pub proto: u8,
    pub sport: u16,
    pub dport: u16,
    pub tcp: u8,
    pub payload: Vec<u8>,
    pub id: u16,
    pub udp_checksum: bool,
}

impl Frame {
    /// The IP datagram (no Ethernet header).
    pub fn datagram(&self) -> Vec<u8> {
        let mut l4 = Vec::new();
        l4.extend(self.sport.to_be_bytes());
        l4.extend(self.dport.to_be_bytes());
        if self.proto == IPPROTO_TCP {
            l4.extend(0x1000_0000u32.wrapping_add(self.id as u32).to_be_bytes());
            l4.extend(if self.tcp & t::ACK != 0 { 2000u32 } else { 0 }.to_be_bytes());
            l4.push(5 << 4);
            l4.push(self.tcp);
            l4.extend(65535u16.to_be_bytes());
            l4.extend([0, 0, 0, 0]);
        } else {
            l4.extend(((8 + self.payload.len()) as u16).to_be_bytes());
            l4.extend([0, 0]);
        }
        l4.extend(&self.payload);
        let at = if self.proto == IPPROTO_TCP { 16 } else { 6 };
        if self.proto == IPPROTO_TCP || self.udp_checksum {
            let mut c = !fold(pseudo_sum(self.src, self.dst, self.proto, l4.len()) + sum(&l4));
            if c == 0 && self.proto == IPPROTO_UDP {
                c = 0xffff;
            }
            put16(&mut l4, at, c);
        }
        let mut d = vec![0x45, 0];
        d.extend(((20 + l4.len()) as u16).to_be_bytes());
        d.extend(self.id.to_be_bytes());
        d.extend(0x4000u16.to_be_bytes());
        d.extend([64, self.proto, 0, 0]);
        d.extend(self.src);
        d.extend(self.dst);
        let c = checksum(&d[..20]);
        put16(&mut d, 10, c);
        d.extend(l4);
        d
    }

    pub fn bytes(&self) -> Vec<u8> {
        eth(&self.datagram())
    }
}

pub fn eth(datagram: &[u8]) -> Vec<u8> {
    let mut f = vec![2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 2, 0x08, 0x00];
    f.extend_from_slice(datagram);
    f
}

/// An ICMP error from `src` to `dst` quoting `quoted` (an IP datagram), `quote_len` bytes.
pub fn icmp_error(
    src: [u8; 4],
    dst: [u8; 4],
    kind: u8,
    code: u8,
    quoted: &[u8],
    quote_len: usize,
) -> Vec<u8> {
    let mut icmp = vec![kind, code, 0, 0, 0, 0, 0x05, 0xdc];
    icmp.extend_from_slice(&quoted[..quote_len.min(quoted.len())]);
    let c = checksum(&icmp);
    put16(&mut icmp, 2, c);
    let mut d = vec![0x45, 0xc0];
    d.extend(((20 + icmp.len()) as u16).to_be_bytes());
    d.extend([0, 0, 0, 0, 64, IPPROTO_ICMP, 0, 0]);
    d.extend(src);
    d.extend(dst);
    let c = checksum(&d);
    put16(&mut d, 10, c);
    d.extend(icmp);
    eth(&d)
}

/// Cuts a datagram into fragments carrying `sizes` L4 bytes each (multiples of 8) and the rest.
pub fn fragments(datagram: &[u8], sizes: &[usize]) -> Vec<Vec<u8>> {
    let l4 = &datagram[20..];
    let mut out = Vec::new();
    let mut offset = 0;
    let mut all: Vec<usize> = sizes.to_vec();
    all.push(l4.len() - sizes.iter().sum::<usize>());
    for (i, size) in all.iter().enumerate() {
        let more = i + 1 < all.len();
        let mut h = datagram[..20].to_vec();
        put16(&mut h, 2, (20 + size) as u16);
        put16(
            &mut h,
            6,
            (offset / 8) as u16 | if more { 0x2000 } else { 0 },
        );
        put16(&mut h, 10, 0);
        let c = checksum(&h);
        put16(&mut h, 10, c);
        h.extend_from_slice(&l4[offset..offset + size]);
        out.push(eth(&h));
        offset += size;
    }
    out
}

impl Gen {
    pub fn new(seed: u64) -> Self {
        Gen {
            rng: fastrand::Rng::with_seed(seed),
            episode: None,
            queue: VecDeque::new(),
        }
    }

    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.rng.usize(..items.len())]
    }

    /// Random services and node addresses for the next episode.
    pub fn episode(&mut self) -> Episode {
        self.queue.clear();
        let mut desired = DesiredState::default();
        let mut frontends = Vec::new();
        let n_addrs = self.rng.usize(1..=NODE_ADDRS.len());
        let node_addrs: BTreeSet<Ipv4Addr> = NODE_ADDRS[..n_addrs].iter().map(|a| ip(*a)).collect();
        let snat_addr = (self.rng.u8(..10) != 0).then(|| ip(NODE_ADDRS[0]));
        for n in 0..self.rng.usize(1..=5) {
            let tcp = self.rng.bool();
            let (protocol, port) = if tcp {
                (Protocol::Tcp, 8080)
            } else {
                (Protocol::Udp, 5353)
            };
            let local_only = self.rng.u8(..4) == 0;
            let affinity = (self.rng.u8(..10) < 3).then_some(10_800);
            let mut backends = BTreeMap::new();
            for _ in 0..self.rng.usize(0..=4) {
                let local = self.rng.bool();
                let a = if local {
                    self.pick(&LOCAL_PODS)
                } else {
                    self.pick(&REMOTE_PODS)
                };
                backends.insert(
                    Backend {
                        ip: ip(a).into(),
                        port,
                    },
                    local,
                );
            }
            if local_only {
                backends.retain(|_, local| *local);
            }
            let endpoints = if local_only {
                Endpoints::Local
            } else {
                Endpoints::All
            };
            let name = ServicePortName {
                namespace: "fuzz".into(),
                name: format!("svc{n}").into(),
                port: "".into(),
            };
            let mut kinds = Vec::new();
            if self.rng.u8(..10) < 8 {
                kinds.push(FrontendKind::NodePort);
            }
            if self.rng.u8(..10) < 4 {
                kinds.push(FrontendKind::ExternalIp);
            }
            if self.rng.u8(..10) < 4 {
                kinds.push(FrontendKind::LoadBalancer);
            }
            if !local_only && self.rng.u8(..10) < 3 {
                kinds.push(FrontendKind::ClusterIP);
            }
            let mut any = false;
            for kind in kinds {
                let sport = self.pick(&SERVICE_PORTS);
                let frontend = match kind {
                    FrontendKind::NodePort => {
                        Frontend::node_port(Family::V4, self.pick(&NODE_PORTS), protocol)
                    }
                    FrontendKind::ExternalIp => {
                        Frontend::new(ip(self.pick(&EXTERNAL_IPS)).into(), sport, protocol)
                    }
                    FrontendKind::LoadBalancer => {
                        Frontend::new(ip(self.pick(&LB_IPS)).into(), sport, protocol)
                    }
                    FrontendKind::ClusterIP => {
                        Frontend::new(ip(self.pick(&CLUSTER_IPS)).into(), sport, protocol)
                    }
                };
                if desired.frontends.contains_key(&frontend) {
                    continue;
                }
                let source_ranges = (kind == FrontendKind::LoadBalancer && self.rng.u8(..10) < 5)
                    .then(|| SourceRanges {
                        allowed: (0..self.rng.usize(1..=2))
                            .map(|_| self.pick(&RANGES).parse().unwrap())
                            .collect(),
                        allow_node: false,
                        allow_pods: false,
                    });
                desired.frontends.insert(
                    frontend,
                    DesiredService {
                        name: name.clone(),
                        family: Family::V4,
                        kind,
                        endpoints: if kind == FrontendKind::ClusterIP {
                            Endpoints::All
                        } else {
                            endpoints
                        },
                        affinity_timeout_secs: affinity,
                        local_only: local_only && kind != FrontendKind::ClusterIP,
                        two_scopes: false,
                        source_ranges,
                    },
                );
                frontends.push((
                    frontend,
                    backends.keys().map(|b| (ipv4(b.ip), b.port)).collect(),
                ));
                any = true;
            }
            if any {
                desired.sets.insert(
                    SetKey {
                        name,
                        family: Family::V4,
                        endpoints,
                    },
                    BackendSet {
                        backends: backends.keys().copied().collect(),
                        terminating: BTreeSet::new(),
                        draining: BTreeSet::new(),
                        local: backends
                            .iter()
                            .filter(|(_, l)| **l)
                            .map(|(b, _)| *b)
                            .collect(),
                    },
                );
            }
        }
        let episode = Episode {
            desired,
            node_addrs,
            snat_addr,
            frontends,
        };
        self.episode = Some(episode.clone());
        episode
    }

    fn client_port(&mut self) -> u16 {
        40000 + self.rng.u16(..6)
    }

    fn payload(&mut self) -> Vec<u8> {
        let n = self.pick(&[0usize, 1, 5, 16, 40]);
        (0..n).map(|_| self.rng.u8(..)).collect()
    }

    fn flags(&mut self) -> u8 {
        if self.rng.u8(..20) == 0 {
            self.rng.u8(..)
        } else {
            self.pick(&TCP_FLAGS)
        }
    }

    /// A client's packet to a frontend (or near one).
    fn client_to_frontend(&mut self) -> Frame {
        let ep = self.episode.as_ref().expect("an episode");
        let n = ep.frontends.len();
        let node_addrs: Vec<Ipv4Addr> = ep.node_addrs.iter().copied().collect();
        let (fe, _) = if n > 0 {
            ep.frontends[self.rng.usize(..n)].clone()
        } else {
            (
                Frontend::node_port(Family::V4, 30080, Protocol::Tcp),
                vec![],
            )
        };
        let mut dst = if fe.ip.is_unspecified() {
            node_addrs[self.rng.usize(..node_addrs.len())].octets()
        } else {
            ipv4(fe.ip).octets()
        };
        let mut dport = fe.port;
        let mut proto = match fe.protocol {
            Protocol::Tcp => IPPROTO_TCP,
            _ => IPPROTO_UDP,
        };
        match self.rng.u8(..20) {
            0 => dst = self.pick(&NODE_ADDRS),
            1 => dport = self.pick(&NODE_PORTS),
            2 => {
                proto = if proto == IPPROTO_TCP {
                    IPPROTO_UDP
                } else {
                    IPPROTO_TCP
                }
            }
            3 => dst = self.pick(&CLIENTS),
            _ => {}
        }
        let src = self.pick(&CLIENTS);
        Frame {
            src,
            dst,
            proto,
            sport: self.client_port(),
            dport,
            tcp: self.flags(),
            payload: self.payload(),
            id: self.rng.u16(..),
            udp_checksum: self.rng.u8(..8) != 0,
        }
    }

    /// A packet of a flow the model tracks, in one of its directions, at the hook it would
    /// meet next.
    fn follow_up(&mut self, model: &Model) -> Option<(Hook, Frame)> {
        if model.flows.is_empty() {
            return None;
        }
        let i = self.rng.usize(..model.flows.len());
        let (key, flow) = model.flows.iter().nth(i)?;
        let ct = flow.ct;
        let snat = ct.flags & ct_flags::SNAT != 0;
        let frame = |src: u32, dst: u32, sport: u16, dport: u16| Frame {
            src: from_wire(src),
            dst: from_wire(dst),
            proto: key.proto,
            sport: u16::from_be(sport),
            dport: u16::from_be(dport),
            tcp: 0,
            payload: vec![],
            id: 0,
            udp_checksum: true,
        };
        let (hook, mut f) = match self.rng.u8(..4) {
            // The client again.
            0 => (Hook::Xdp, frame(key.saddr, key.daddr, key.sport, key.dport)),
            // The backend's reply on its way out (tc egress).
            1 => (
                Hook::Tc,
                frame(ct.backend_addr, key.saddr, ct.backend_port, key.sport),
            ),
            // The client's translated packet leaving for a remote backend (tc egress).
            2 => (
                Hook::Tc,
                frame(key.saddr, ct.backend_addr, key.sport, ct.backend_port),
            ),
            // A remote backend's reply to the node's SNAT address (XDP).
            _ if snat => (
                Hook::Xdp,
                frame(ct.backend_addr, ct.nat_addr, ct.backend_port, ct.nat_port),
            ),
            _ => (
                Hook::Tc,
                frame(ct.backend_addr, key.saddr, ct.backend_port, key.sport),
            ),
        };
        f.tcp = self.flags();
        f.payload = self.payload();
        f.id = self.rng.u16(..);
        f.udp_checksum = self.rng.u8(..8) != 0;
        Some((hook, f))
    }

    fn any_frame(&mut self, model: &Model) -> (Hook, Frame) {
        if self.rng.bool()
            && let Some(x) = self.follow_up(model)
        {
            return x;
        }
        (Hook::Xdp, self.client_to_frontend())
    }

    /// A frame to truncate or mutate: a TCP/UDP one, or (1 in 4) an ICMP error.
    fn base_frame(&mut self, model: &Model) -> (Hook, Vec<u8>) {
        if self.rng.u8(..4) == 0 {
            let (h, b, _) = self.icmp(model);
            (h, b)
        } else {
            let (h, f) = self.any_frame(model);
            (h, f.bytes())
        }
    }

    fn random_hook(&mut self) -> Hook {
        if self.rng.bool() { Hook::Xdp } else { Hook::Tc }
    }

    /// The next frame, which hook it goes to, and what kind of frame it is.
    pub fn packet(&mut self, model: &Model) -> (Hook, Vec<u8>, &'static str) {
        if let Some(p) = self.queue.pop_front() {
            return p;
        }
        let roll = self.rng.u8(..100);
        match roll {
            0..30 => (Hook::Xdp, self.client_to_frontend().bytes(), "to_frontend"),
            30..58 => {
                let (h, f) = self.any_frame(model);
                (h, f.bytes(), "flow")
            }
            58..66 => self.fragmented(model),
            66..74 => self.icmp(model),
            74..78 => {
                let (h, f) = self.any_frame(model);
                (
                    h,
                    with_options(&f.bytes(), self.rng.usize(1..=10)),
                    "ip_options",
                )
            }
            78..84 => {
                let (h, mut b) = self.base_frame(model);
                let cut = self.rng.usize(..b.len());
                b.truncate(cut);
                (h, b, "truncated")
            }
            84..93 => {
                let (h, mut b) = self.base_frame(model);
                for _ in 0..self.rng.usize(1..=3) {
                    let at = self.rng.usize(12..b.len().min(64));
                    b[at] ^= 1 << self.rng.u8(..8);
                }
                (h, b, "mutated")
            }
            93..96 => {
                let n = self.rng.usize(0..90);
                let mut b: Vec<u8> = (0..n).map(|_| self.rng.u8(..)).collect();
                if b.len() > 14 && self.rng.bool() {
                    b[12] = 0x08;
                    b[13] = 0x00;
                }
                (self.random_hook(), b, "garbage")
            }
            _ => {
                let (h, f) = self.any_frame(model);
                let b = f.bytes();
                let framed = match self.rng.u8(..3) {
                    0 => {
                        // IPv6 with the IPv4 packet's L4 bytes as payload (its checksum is
                        // the IPv4 one: a TCP/UDP frame parses, and no IPv6 service takes it).
                        // The payload length is right or (the address's parity says) 20 too
                        // long, as it was before IPv6 was parsed.
                        let addrs: Vec<u8> = (0..32).map(|_| self.rng.u8(..)).collect();
                        let extra = if addrs[0] & 1 == 0 { 0 } else { 20 };
                        let mut v6 = b[..12].to_vec();
                        v6.extend([0x86, 0xdd, 0x60, 0, 0, 0]);
                        v6.extend(((b.len() - 34 + extra) as u16).to_be_bytes());
                        v6.extend([f.proto, 64]);
                        v6.extend(addrs);
                        v6.extend(&b[34..]);
                        v6
                    }
                    1 => {
                        let mut arp = b[..12].to_vec();
                        arp.extend([0x08, 0x06, 0, 1, 8, 0, 6, 4, 0, 1]);
                        arp.extend((0..20).map(|_| self.rng.u8(..)));
                        arp
                    }
                    _ => {
                        // VLAN-tagged IPv4.
                        let mut vlan = b[..12].to_vec();
                        vlan.extend([0x81, 0x00, 0, 7]);
                        vlan.extend(&b[12..]);
                        vlan
                    }
                };
                (h, framed, "non_ipv4")
            }
        }
    }

    fn fragmented(&mut self, model: &Model) -> (Hook, Vec<u8>, &'static str) {
        let (h, mut f) = self.any_frame(model);
        let len = 16 + 8 * self.rng.usize(1..6);
        f.payload = (0..len).map(|_| self.rng.u8(..)).collect();
        let d = f.datagram();
        let l4_len = d.len() - 20;
        let first = 8 * self.rng.usize(1..=(l4_len - 1) / 8);
        let mut sizes = vec![first];
        if l4_len - first > 16 && self.rng.bool() {
            sizes.push(8);
        }
        let mut frags = fragments(&d, &sizes);
        match self.rng.u8(..6) {
            0 => frags.reverse(),
            1 => {
                frags.remove(0);
            }
            2 => {
                let dup = frags[self.rng.usize(..frags.len())].clone();
                frags.push(dup);
            }
            _ => {}
        }
        for fr in frags {
            self.queue.push_back((h, fr, "fragment"));
        }
        self.queue.pop_front().unwrap_or((h, f.bytes(), "fragment"))
    }

    fn icmp(&mut self, model: &Model) -> (Hook, Vec<u8>, &'static str) {
        let kind = self.pick(&[3u8, 3, 11, 0, 5]);
        let code = if kind == 3 {
            self.pick(&[3u8, 4, 1])
        } else {
            0
        };
        let quote_len = self.pick(&[28usize, 28, 28, 40, 27]);
        let flow = (!model.flows.is_empty() && self.rng.u8(..4) != 0).then(|| {
            let i = self.rng.usize(..model.flows.len());
            let (k, f) = model.flows.iter().nth(i).unwrap();
            (*k, f.ct)
        });
        let pick_payload = self.payload();
        match (self.rng.bool(), flow) {
            (true, Some((key, _ct))) => {
                // A router's error about the reply the node sent from the frontend (XDP).
                let quoted = Frame {
                    src: from_wire(key.daddr),
                    dst: from_wire(key.saddr),
                    proto: key.proto,
                    sport: u16::from_be(key.dport),
                    dport: u16::from_be(key.sport),
                    tcp: t::ACK,
                    payload: pick_payload,
                    id: 7,
                    udp_checksum: true,
                };
                let to = if self.rng.u8(..8) == 0 {
                    self.pick(&CLIENTS)
                } else {
                    from_wire(key.daddr)
                };
                let b = icmp_error(ROUTER, to, kind, code, &quoted.datagram(), quote_len);
                (Hook::Xdp, b, "icmp_about_flow")
            }
            (false, Some((key, ct))) => {
                // A local pod's (or the node's) error about the client's translated packet (tc).
                let quoted = Frame {
                    src: from_wire(key.saddr),
                    dst: from_wire(ct.backend_addr),
                    proto: key.proto,
                    sport: u16::from_be(key.sport),
                    dport: u16::from_be(ct.backend_port),
                    tcp: t::SYN,
                    payload: pick_payload,
                    id: 9,
                    udp_checksum: true,
                };
                let from = if self.rng.u8(..4) == 0 {
                    self.pick(&NODE_ADDRS)
                } else {
                    from_wire(ct.backend_addr)
                };
                let b = icmp_error(
                    from,
                    from_wire(key.saddr),
                    kind,
                    code,
                    &quoted.datagram(),
                    quote_len,
                );
                (Hook::Tc, b, "icmp_about_flow")
            }
            _ => {
                let (h, f) = self.any_frame(model);
                let mut d = f.datagram();
                let at = self.rng.usize(..d.len().min(28));
                d[at] ^= self.rng.u8(..);
                let b = icmp_error(ROUTER, self.pick(&NODE_ADDRS), kind, code, &d, quote_len);
                (h, b, "icmp_random")
            }
        }
    }
}

/// The frame with `words` 4-byte words of IP options (NOPs and an end), lengths and IP
/// checksum fixed.
pub fn with_options(frame: &[u8], words: usize) -> Vec<u8> {
    if frame.len() < 34 {
        return frame.to_vec();
    }
    let mut ip = frame[14..34].to_vec();
    ip[0] = 0x40 | (5 + words as u8);
    let total = be16(&ip, 2) as usize + 4 * words;
    put16(&mut ip, 2, total as u16);
    let mut opts = vec![1u8; 4 * words];
    *opts.last_mut().unwrap() = 0;
    ip.extend(opts);
    put16(&mut ip, 10, 0);
    let c = checksum(&ip);
    put16(&mut ip, 10, c);
    let mut out = frame[..14].to_vec();
    out.extend(ip);
    out.extend(&frame[34..]);
    out
}

pub fn wire_addr(a: Ipv4Addr) -> u32 {
    wire(a)
}
