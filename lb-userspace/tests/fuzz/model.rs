//! The reference model of north-south translation, written from the spec (docs/nodeport.md,
//! docs/behaviour.md, the README's map table), not from lb-ebpf. It keeps its own copy of
//! the flow state (conntrack, reverse entries, fragments, affinity, reason counters) and,
//! for each frame, says what XDP or tc must answer: the verdict, the frame out, the reason,
//! and the map entries afterwards. Values the kernel chooses (the SNAT port) are read from
//! the kernel through [`Oracle`] and checked for validity instead of equality.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use lb_common::{
    Backend4, Ct4Key, Ct4Value, Frag4Key, FragPorts, Frontend4Key, FrontendValue, MAGLEV_SIZE,
    Rev4Value, backend_states, ct_flags, ct_state, flow_hash, frontend_flags, frontend_kinds,
    reasons as r, reply_hint_slot, scopes, snat_ports, tcp_flags,
};

use super::wire::*;

pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const TC_ACT_OK: u32 = 0;
pub const TC_ACT_SHOT: u32 = 2;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    Xdp,
    Tc,
}

/// What the service maps hold for an episode, read back from the kernel maps after the
/// reconciler wrote them (so the model sees what the programs see), plus the node's addresses.
#[derive(Clone, Debug, Default)]
pub struct Config {
    pub node_addrs: BTreeSet<u32>,
    /// `LB4_IFADDR` of the test-run interface: the SNAT address.
    pub snat_addr: Option<u32>,
    pub frontends: HashMap<Frontend4Key, FrontendValue>,
    pub backends: HashMap<u32, Backend4>,
    pub maglev: HashMap<u32, Vec<u32>>,
    /// `LB4_SRCRANGE`: (service id, network-order address, prefix length).
    pub source_ranges: Vec<(u32, u32, u8)>,
}

/// What a program must do with one frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Expect {
    pub verdict: u32,
    pub frame: Vec<u8>,
    pub reason: u32,
}

/// Reads what the kernel chose, for the values the spec leaves to it.
pub trait Oracle {
    /// The conntrack entry the kernel holds for `key` after the packet.
    fn ct(&mut self, key: &Ct4Key) -> Option<Ct4Value>;
}

/// A flow the model tracks: the kernel's entry as the spec determines it, and the reverse
/// keys it owns.
#[derive(Clone, Debug)]
pub struct Flow {
    pub ct: Ct4Value,
    pub revs: Vec<Ct4Key>,
}

#[derive(Default)]
pub struct Model {
    pub cfg: Config,
    pub flows: BTreeMap<Ct4Key, Flow>,
    /// The reverse entries the programs go by (each with the flow owning it): a pending reply
    /// hint's, else the reverse map's.
    pub revs: BTreeMap<Ct4Key, (Rev4Value, Ct4Key)>,
    /// The reply tuple of each pending hint, by slot (`reply_hint_slot`); its entry is in
    /// `revs`.
    pub hint_slots: BTreeMap<u32, Ct4Key>,
    /// The reverse map's own entry of a tuple whose pending hint stands over it: the reverse
    /// entry again when the hint is forgotten before a reply takes it.
    pub beneath: BTreeMap<Ct4Key, (Rev4Value, Ct4Key)>,
    pub frags: HashMap<Frag4Key, FragPorts>,
    /// (client address, service id) → backend id.
    pub affinity: BTreeMap<(u32, u32), u32>,
    pub reasons: [u64; r::COUNT as usize],
    /// The conntrack and reverse keys the last packet looked at or changed (the runner
    /// compares the kernel's entries of these after each packet).
    pub touched_ct: Vec<Ct4Key>,
    pub touched_rev: Vec<Ct4Key>,
}

/// A parsed frame, as the spec's "What is passed or dropped" reads it.
#[derive(Clone, Copy, Debug)]
enum Headers {
    NotParsed,
    /// IPv6: the fuzzer programs no IPv6 service, node address or flow, so every IPv6 frame
    /// passes untouched; only the reason depends on how far it parses (docs/nodeport.md,
    /// "IPv6").
    Ipv6(Ipv6Seen),
    L4 {
        l4: usize,
        proto: u8,
        saddr: u32,
        daddr: u32,
        sport: u16,
        dport: u16,
        tcp: u8,
        first_fragment: bool,
        id: u16,
    },
    LaterFragment {
        saddr: u32,
        daddr: u32,
        id: u16,
        proto: u8,
    },
    IcmpError {
        saddr: u32,
        daddr: u32,
        /// Offset of the quoted IPv4 header.
        inner: usize,
        q: Ct4Key,
    },
}

const IP: usize = ETH_LEN;

/// How far an IPv6 frame parses.
#[derive(Clone, Copy, Debug)]
enum Ipv6Seen {
    NotParsed,
    ExtensionHeader,
    /// TCP or UDP, whole or a first fragment: no frontend, no flow.
    L4,
    LaterFragment,
    /// An ICMPv6 error quoting TCP or UDP: about no flow.
    IcmpError,
}

const ETH_P_IPV6: u16 = 0x86dd;

/// The IPv6 parse of `ipv6.rs` and `parse.rs`: the fixed header, at most 4 extension headers
/// walked (Hop-by-Hop first only, Destination Options, Routing with segments left 0,
/// Fragment last), then TCP, UDP (checksum not 0) or an ICMPv6 error.
fn parse6(f: &[u8]) -> Ipv6Seen {
    use Ipv6Seen as S;
    const IP6: usize = ETH_LEN;
    if f.len() < IP6 + 40 || f[IP6] >> 4 != 6 {
        return S::NotParsed;
    }
    let plen = be16(f, IP6 + 4) as usize;
    if plen == 0 || IP6 + 40 + plen > f.len() {
        return S::NotParsed;
    }
    let end = IP6 + 40 + plen;
    let extension = |n: u8| matches!(n, 0 | 43 | 44 | 50 | 51 | 60 | 135 | 139 | 140 | 253 | 254);
    let mut next = f[IP6 + 6];
    let mut off = IP6 + 40;
    let (mut first, mut later) = (false, false);
    for walked in 0..4 {
        match next {
            0 | 43 | 60 => {
                if next == 0 && walked != 0 {
                    return S::ExtensionHeader;
                }
                if off + 8 > f.len() {
                    return S::NotParsed;
                }
                if next == 43 && f[off + 3] != 0 {
                    return S::ExtensionHeader;
                }
                let len = (f[off + 1] as usize + 1) * 8;
                next = f[off];
                off += len;
            }
            44 => {
                if off + 8 > f.len() {
                    return S::NotParsed;
                }
                let fo = be16(f, off + 2);
                next = f[off];
                off += 8;
                later = fo & 0xfff8 != 0;
                first = !later && fo & 1 != 0;
                break;
            }
            _ => break,
        }
    }
    if extension(next) {
        return S::ExtensionHeader;
    }
    if off > end {
        return S::NotParsed;
    }
    let l4_len = end - off;
    match next {
        58 => {
            if first || later || l4_len < 56 || off + 56 > f.len() || !matches!(f[off], 1..=3) {
                return S::NotParsed;
            }
            let inner = off + 8;
            if f[inner] >> 4 == 6 && matches!(f[inner + 6], IPPROTO_TCP | IPPROTO_UDP) {
                S::IcmpError
            } else {
                S::NotParsed
            }
        }
        IPPROTO_TCP | IPPROTO_UDP if later => S::LaterFragment,
        IPPROTO_TCP => {
            if off + 20 > f.len() || l4_len < 20 {
                return S::NotParsed;
            }
            let doff = (f[off + 12] >> 4) as usize;
            if doff < 5 || doff * 4 > l4_len {
                return S::NotParsed;
            }
            S::L4
        }
        IPPROTO_UDP => {
            if off + 8 > f.len() {
                return S::NotParsed;
            }
            let ulen = be16(f, off + 4) as usize;
            let holds = if first { 8 } else { ulen };
            if ulen < 8 || holds > l4_len || be16(f, off + 6) == 0 {
                return S::NotParsed;
            }
            S::L4
        }
        _ => S::NotParsed,
    }
}

/// The reasons (XDP, tc) of an IPv6 frame with nothing of ours in the IPv6 maps.
fn ipv6_reasons(seen: Ipv6Seen) -> (u32, u32) {
    match seen {
        Ipv6Seen::NotParsed => (r::XDP_NOT_PARSED, r::TC_NOT_PARSED),
        Ipv6Seen::ExtensionHeader => (
            r::XDP_EXTENSION_HEADER_NOT_UNDERSTOOD,
            r::TC_EXTENSION_HEADER_NOT_UNDERSTOOD,
        ),
        Ipv6Seen::L4 => (r::XDP_NOT_A_SERVICE, r::TC_NOT_A_FLOW),
        Ipv6Seen::LaterFragment => (r::XDP_FRAGMENT_NOT_TRACKED, r::TC_FRAGMENT_NOT_TRACKED),
        Ipv6Seen::IcmpError => (r::XDP_ICMP_NOT_TRACKED, r::TC_ICMP_NOT_TRACKED),
    }
}

/// Whether the model parses `f` as anything it may translate (an IPv6 frame never is: the
/// fuzzer programs no IPv6 service).
pub fn parses(f: &[u8]) -> bool {
    !matches!(parse(f), Headers::NotParsed | Headers::Ipv6(_))
}

fn parse(f: &[u8]) -> Headers {
    if f.len() >= ETH_LEN && be16(f, 12) == ETH_P_IPV6 {
        return Headers::Ipv6(parse6(f));
    }
    if f.len() < ETH_LEN || be16(f, 12) != ETH_P_IP || f.len() < IP + 20 {
        return Headers::NotParsed;
    }
    if f[IP] != 0x45 {
        return Headers::NotParsed; // not version 4, or IP options
    }
    let total = be16(f, IP + 2) as usize;
    if total > f.len() - IP || total < 20 {
        return Headers::NotParsed;
    }
    let frag = be16(f, IP + 6);
    let offset = frag & 0x1fff;
    let more = frag & 0x2000 != 0;
    let proto = f[IP + 9];
    let saddr = addr_at(f, IP + 12);
    let daddr = addr_at(f, IP + 16);
    let id = port_at(f, IP + 4); // network order, as `Frag4Key` keeps it
    if offset != 0 {
        return if proto == IPPROTO_TCP || proto == IPPROTO_UDP {
            Headers::LaterFragment {
                saddr,
                daddr,
                id,
                proto,
            }
        } else {
            Headers::NotParsed
        };
    }
    let l4 = IP + 20;
    let l4_len = total - 20;
    match proto {
        IPPROTO_TCP => {
            if l4_len < 20 {
                return Headers::NotParsed;
            }
            let doff = (f[l4 + 12] >> 4) as usize;
            if doff < 5 || doff * 4 > l4_len {
                return Headers::NotParsed;
            }
        }
        IPPROTO_UDP => {
            if l4_len < 8 {
                return Headers::NotParsed;
            }
            let ulen = be16(f, l4 + 4) as usize;
            if ulen < 8 || (!more && ulen > l4_len) {
                return Headers::NotParsed;
            }
        }
        IPPROTO_ICMP => {
            // An ICMP error (destination unreachable, time exceeded), not fragmented, whose
            // total length holds the quoted IPv4 header (no options) and the quoted packet's
            // first 8 bytes; the quoted packet TCP or UDP, its first fragment or whole.
            if more || l4_len < 8 + 20 + 8 || !matches!(f[l4], 3 | 11) {
                return Headers::NotParsed;
            }
            let inner = l4 + 8;
            let qproto = f[inner + 9];
            if f[inner] != 0x45
                || be16(f, inner + 6) & 0x1fff != 0
                || (qproto != IPPROTO_TCP && qproto != IPPROTO_UDP)
            {
                return Headers::NotParsed;
            }
            let q = Ct4Key::new(
                addr_at(f, inner + 12),
                addr_at(f, inner + 16),
                port_at(f, inner + 20),
                port_at(f, inner + 22),
                qproto,
            );
            return Headers::IcmpError {
                saddr,
                daddr,
                inner,
                q,
            };
        }
        _ => return Headers::NotParsed,
    }
    Headers::L4 {
        l4,
        proto,
        saddr,
        daddr,
        sport: port_at(f, l4),
        dport: port_at(f, l4 + 2),
        tcp: if proto == IPPROTO_TCP { f[l4 + 13] } else { 0 },
        first_fragment: more,
        id,
    }
}

/// Where a translation puts its new address and port.
#[derive(Clone, Copy, Debug)]
enum Rewrite {
    Dst(u32, u16),
    Src(u32, u16),
}

/// Rewrites one address (and, with an L4 header at `l4`, its port) with incremental
/// checksum updates: the IP header's, and the TCP/UDP checksum (a UDP checksum 0 stays 0, a
/// result of 0 is sent as 0xffff).
fn rewrite(f: &mut [u8], l4: Option<(usize, u8)>, rw: Rewrite) {
    let (addr_at_, port_off, addr, port) = match rw {
        Rewrite::Dst(a, p) => (IP + 16, 2, a, p),
        Rewrite::Src(a, p) => (IP + 12, 0, a, p),
    };
    let old_addr = f[addr_at_..addr_at_ + 4].to_vec();
    put_addr(f, addr_at_, addr);
    let new_addr = f[addr_at_..addr_at_ + 4].to_vec();
    let ipc = csum_update(be16(f, IP + 10), &old_addr, &new_addr);
    put16(f, IP + 10, ipc);
    if let Some((l4, proto)) = l4 {
        let mut old = old_addr.clone();
        old.extend_from_slice(&f[l4 + port_off..l4 + port_off + 2]);
        put_port(f, l4 + port_off, port);
        let mut new = new_addr.clone();
        new.extend_from_slice(&f[l4 + port_off..l4 + port_off + 2]);
        let at = if proto == IPPROTO_TCP {
            l4 + 16
        } else {
            l4 + 6
        };
        let c = be16(f, at);
        if proto == IPPROTO_UDP && c == 0 {
            return;
        }
        let mut c = csum_update(c, &old, &new);
        if proto == IPPROTO_UDP && c == 0 {
            c = 0xffff;
        }
        put16(f, at, c);
    }
}

impl Model {
    pub fn new(cfg: Config) -> Self {
        Model {
            cfg,
            ..Default::default()
        }
    }

    /// Forgets the flow state (the runner clears the kernel's flow maps between episodes).
    pub fn reset_flows(&mut self, cfg: Config) {
        self.cfg = cfg;
        self.flows.clear();
        self.revs.clear();
        self.hint_slots.clear();
        self.beneath.clear();
        self.frags.clear();
        self.affinity.clear();
    }

    pub fn step(&mut self, hook: Hook, frame: &[u8], k: &mut dyn Oracle) -> Result<Expect, String> {
        self.touched_ct.clear();
        self.touched_rev.clear();
        let mut out = frame.to_vec();
        let (reason, translated) = match hook {
            Hook::Xdp => self.xdp(&mut out, k)?,
            Hook::Tc => self.tc(&mut out),
        };
        if !translated {
            out = frame.to_vec();
        }
        self.reasons[reason as usize] += 1;
        let verdict = match (hook, r::drops(reason)) {
            (Hook::Xdp, true) => XDP_DROP,
            (Hook::Xdp, false) => XDP_PASS,
            (Hook::Tc, true) => TC_ACT_SHOT,
            (Hook::Tc, false) => TC_ACT_OK,
        };
        Ok(Expect {
            verdict,
            frame: out,
            reason,
        })
    }

    fn frontend(&self, daddr: u32, dport: u16, proto: u8) -> Option<FrontendValue> {
        let key = |addr| Frontend4Key {
            addr,
            port: dport,
            proto,
            scope: scopes::EXTERNAL,
        };
        if let Some(v) = self.cfg.frontends.get(&key(daddr)) {
            return Some(*v);
        }
        if self.cfg.node_addrs.contains(&daddr) {
            return self.cfg.frontends.get(&key(0)).copied();
        }
        None
    }

    fn source_allowed(&self, service_id: u32, saddr: u32) -> bool {
        let client = u32::from_be(saddr);
        self.cfg.source_ranges.iter().any(|&(id, addr, prefix)| {
            let mask = if prefix == 0 {
                0
            } else {
                u32::MAX << (32 - prefix)
            };
            id == service_id && client & mask == u32::from_be(addr) & mask
        })
    }

    fn backend_usable(&self, ct: &Ct4Value) -> bool {
        self.cfg
            .backends
            .get(&ct.backend_id)
            .is_some_and(|b| b.addr == ct.backend_addr && b.port == ct.backend_port)
    }

    fn maglev_pick(&self, service_id: u32, hash: u32) -> Option<u32> {
        let table = self.cfg.maglev.get(&service_id)?;
        Some(table[(hash % MAGLEV_SIZE) as usize])
    }

    fn remove_flow(&mut self, key: &Ct4Key) {
        if let Some(flow) = self.flows.remove(key) {
            for rk in flow.revs {
                self.remove_owned(rk, key);
            }
        }
    }

    /// Whether a pending hint holds the reverse entry of `key`.
    fn hinted(&self, key: &Ct4Key) -> bool {
        self.hint_slots.get(&reply_hint_slot(key)) == Some(key)
    }

    /// The reverse map's own entry of `key` (XDP and the SNAT port search read the map, not
    /// the hints).
    fn map_entry(&self, key: &Ct4Key) -> Option<(Rev4Value, Ct4Key)> {
        if self.hinted(key) {
            self.beneath.get(key).copied()
        } else {
            self.revs.get(key).copied()
        }
    }

    /// A flow that is over gives back the entries of `rk` that name it: its hint (the entry
    /// beneath, if any, is the reverse entry again) and the reverse map's.
    fn remove_owned(&mut self, rk: Ct4Key, owner: &Ct4Key) {
        self.touched_rev.push(rk);
        if !self.hinted(&rk) {
            if self.revs.get(&rk).is_some_and(|(_, o)| o == owner) {
                self.revs.remove(&rk);
            }
            return;
        }
        if self.beneath.get(&rk).is_some_and(|(_, o)| o == owner) {
            self.beneath.remove(&rk);
        }
        if self.revs.get(&rk).is_some_and(|(_, o)| o == owner) {
            self.hint_slots.remove(&reply_hint_slot(&rk));
            match self.beneath.remove(&rk) {
                Some(entry) => self.revs.insert(rk, entry),
                None => self.revs.remove(&rk),
            };
        }
    }

    /// Forgets every entry of `key`, hint and reverse map's, whoever owns them.
    fn forget_rev(&mut self, key: &Ct4Key) {
        self.touched_rev.push(*key);
        if self.hinted(key) {
            self.hint_slots.remove(&reply_hint_slot(key));
        }
        self.beneath.remove(key);
        self.revs.remove(key);
    }

    /// A new flow's reply entry, as a hint (docs/nodeport.md): the pending hint of another
    /// tuple in its slot moves into the reverse map first; the reverse map's entry of the same
    /// tuple stays beneath the hint. The owner's `Flow` records the key when it is made.
    fn record_hint(&mut self, key: Ct4Key, value: Rev4Value, owner: Ct4Key) {
        self.touched_rev.push(key);
        match self.hint_slots.insert(reply_hint_slot(&key), key) {
            Some(old) if old == key => {}
            Some(old) => {
                // Now the map's own entry (its value unchanged).
                self.beneath.remove(&old);
                self.keep_beneath(key);
            }
            None => self.keep_beneath(key),
        }
        self.revs.insert(key, (value, owner));
    }

    /// `key` is about to get a hint: what the reverse map holds of it stays beneath.
    fn keep_beneath(&mut self, key: Ct4Key) {
        if let Some(entry) = self.revs.get(&key).copied() {
            self.beneath.insert(key, entry);
        }
    }

    /// tc egress looks a reply tuple up: a pending hint of it is taken into the reverse map.
    fn take_hint(&mut self, key: &Ct4Key) {
        if self.hinted(key) {
            self.hint_slots.remove(&reply_hint_slot(key));
            self.beneath.remove(key);
        }
    }

    /// An entry written into the reverse map (SNAT claims and tc egress's entries): beneath a
    /// pending hint of the same tuple, if there is one.
    fn add_rev(&mut self, key: Ct4Key, value: Rev4Value, owner: Ct4Key) {
        self.touched_rev.push(key);
        if self.hinted(&key) {
            self.beneath.insert(key, (value, owner));
        } else {
            self.revs.insert(key, (value, owner));
        }
        if let Some(flow) = self.flows.get_mut(&owner) {
            flow.revs.push(key);
        }
    }

    /// XDP: (reason, whether the frame was rewritten).
    fn xdp(&mut self, f: &mut [u8], k: &mut dyn Oracle) -> Result<(u32, bool), String> {
        match parse(f) {
            Headers::NotParsed => Ok((r::XDP_NOT_PARSED, false)),
            Headers::Ipv6(seen) => Ok((ipv6_reasons(seen).0, false)),
            Headers::LaterFragment {
                saddr,
                daddr,
                id,
                proto,
            } => {
                let Some(ports) = self
                    .frags
                    .get(&Frag4Key::new(saddr, daddr, id as u32, proto))
                    .copied()
                else {
                    return Ok((r::XDP_FRAGMENT_NOT_TRACKED, false));
                };
                let (reason, done) =
                    self.xdp_l4(f, None, proto, saddr, daddr, ports.sport, ports.dport, 0, k)?;
                Ok(if done {
                    (r::XDP_FRAGMENT_TRANSLATED, true)
                } else {
                    (reason, false)
                })
            }
            Headers::L4 {
                l4,
                proto,
                saddr,
                daddr,
                sport,
                dport,
                tcp,
                first_fragment,
                id,
            } => {
                let (reason, done) =
                    self.xdp_l4(f, Some(l4), proto, saddr, daddr, sport, dport, tcp, k)?;
                if done && first_fragment {
                    self.frags.insert(
                        Frag4Key::new(saddr, daddr, id as u32, proto),
                        FragPorts { sport, dport },
                    );
                }
                Ok((reason, done))
            }
            Headers::IcmpError {
                saddr: _,
                daddr,
                inner,
                q,
            } => Ok(if daddr == q.saddr {
                self.xdp_icmp(f, inner, q)
            } else {
                // Not addressed to the frontend the quoted reply came from.
                (r::XDP_ICMP_NOT_TRACKED, false)
            }),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn xdp_l4(
        &mut self,
        f: &mut [u8],
        l4: Option<usize>,
        proto: u8,
        saddr: u32,
        daddr: u32,
        sport: u16,
        dport: u16,
        tcp: u8,
        k: &mut dyn Oracle,
    ) -> Result<(u32, bool), String> {
        let key = Ct4Key::new(saddr, daddr, sport, dport, proto);
        let l4p = l4.map(|o| (o, proto));
        self.touched_rev.push(key);
        let exact = self.cfg.frontends.get(&Frontend4Key {
            addr: daddr,
            port: dport,
            proto,
            scope: scopes::EXTERNAL,
        });
        // A new TCP connection (SYN without ACK) to an address that is not ours may reuse the
        // tuple of an old flow to the same backend (a client reaching a pod directly): the old
        // reverse entry goes, so its replies are not taken for the old flow's.
        let plain_syn =
            proto == IPPROTO_TCP && tcp & (tcp_flags::SYN | tcp_flags::ACK) == tcp_flags::SYN;
        let fe = match exact {
            Some(fe) if fe.kind == frontend_kinds::CLUSTER_IP => {
                if plain_syn {
                    self.forget_rev(&key.reversed());
                }
                return Ok((r::XDP_CLUSTER_IP, false));
            }
            Some(fe) => *fe,
            None if !self.cfg.node_addrs.contains(&daddr) => {
                if plain_syn {
                    self.forget_rev(&key.reversed());
                }
                return Ok((r::XDP_NOT_A_SERVICE, false));
            }
            None => match self.frontend(daddr, dport, proto) {
                Some(fe) if fe.kind == frontend_kinds::NODE_PORT => fe,
                _ => {
                    // A node address, no NodePort: a remote backend's reply to an SNAT flow?
                    if let Some((rev, owner)) = self.map_entry(&key)
                        && snat_ports::contains(u16::from_be(dport))
                        && rev.flags & ct_flags::SNAT != 0
                    {
                        self.touched_ct.push(owner);
                        if let Some(flow) = self.flows.get_mut(&owner) {
                            flow.ct.flags = ct_state::next_flags(flow.ct.flags, tcp, true);
                        }
                        rewrite(f, l4p, Rewrite::Dst(rev.client_addr, rev.client_port));
                        return Ok((r::XDP_REPLY_TRANSLATED, true));
                    }
                    return Ok((r::XDP_NOT_A_SERVICE, false));
                }
            },
        };
        if fe.flags & frontend_flags::SOURCE_RANGES != 0
            && !self.source_allowed(fe.service_id, saddr)
        {
            return Ok((r::XDP_DROPPED_SOURCE_RANGE, false));
        }
        self.touched_ct.push(key);
        // A SYN without ACK (whatever else it has: FIN, RST) reopens a closed flow.
        let syn = tcp & (tcp_flags::SYN | tcp_flags::ACK) == tcp_flags::SYN;
        let tracked = self.flows.get(&key).is_some_and(|flow| {
            flow.ct.service_id == fe.service_id
                && self.backend_usable(&flow.ct)
                && !(proto == IPPROTO_TCP && syn && ct_state::closed(flow.ct.flags))
        });
        if tracked {
            let flow = self.flows.get_mut(&key).unwrap();
            flow.ct.flags = ct_state::next_flags(flow.ct.flags, tcp, false);
            let (a, p) = (flow.ct.backend_addr, flow.ct.backend_port);
            rewrite(f, l4p, Rewrite::Dst(a, p));
            return Ok((r::XDP_FORWARDED, true));
        }
        // A new flow (or a dead one starting afresh: its entries go first).
        self.remove_flow(&key);
        if fe.count == 0 {
            return Ok(if fe.flags & frontend_flags::LOCAL_ONLY != 0 {
                (r::XDP_DROPPED_NO_LOCAL_ENDPOINT, false)
            } else {
                (r::XDP_NO_BACKEND, false)
            });
        }
        let affinity = fe.flags & frontend_flags::AFFINITY != 0;
        let remembered = if affinity {
            self.affinity
                .get(&(saddr, fe.service_id))
                .copied()
                .filter(|id| {
                    self.cfg
                        .backends
                        .get(id)
                        .is_some_and(|b| b.state == backend_states::ACTIVE)
                })
        } else {
            None
        };
        let backend_id = match remembered {
            Some(id) => id,
            None => {
                let hash = if affinity {
                    flow_hash(saddr, 0, 0, 0, 0)
                } else {
                    flow_hash(saddr, daddr, sport, dport, proto)
                };
                self.maglev_pick(fe.service_id, hash).ok_or_else(|| {
                    format!(
                        "service id {} has backends but no Maglev table",
                        fe.service_id
                    )
                })?
            }
        };
        // The client's backend is remembered when it is chosen, whatever becomes of the
        // packet afterwards (no SNAT address, no port).
        if affinity {
            self.affinity.insert((saddr, fe.service_id), backend_id);
        }
        let backend =
            *self.cfg.backends.get(&backend_id).ok_or_else(|| {
                format!("Maglev names backend id {backend_id}, not in LB4_BACKEND")
            })?;
        let local = backend.flags & lb_common::backend_flags::LOCAL != 0;
        let snat = !local && fe.flags & frontend_flags::LOCAL_ONLY == 0;
        let mut ct = Ct4Value {
            backend_addr: backend.addr,
            backend_port: backend.port,
            backend_id,
            service_id: fe.service_id,
            ..Default::default()
        };
        // The replies' reverse entry, as a hint, before the SNAT port (XDP's order).
        let reply_to_client = Ct4Key::new(backend.addr, saddr, backend.port, sport, proto);
        let rev = Rev4Value {
            client_addr: saddr,
            frontend_addr: daddr,
            client_port: sport,
            frontend_port: dport,
            flags: 0,
            proto,
            pad: 0,
        };
        self.record_hint(reply_to_client, rev, key);
        if snat {
            let Some(nat_addr) = self.cfg.snat_addr else {
                // The refused flow's reply entry goes: its hint, and what the reverse map
                // held of the tuple.
                self.forget_rev(&reply_to_client);
                return Ok((r::XDP_DROPPED_NO_SNAT_ADDRESS, false));
            };
            let chosen = k
                .ct(&key)
                .ok_or("a new SNAT flow left no conntrack entry")?;
            let port = u16::from_be(chosen.nat_port);
            if !snat_ports::contains(port) {
                return Err(format!("SNAT port {port} outside the SNAT range"));
            }
            let reply = Ct4Key::new(backend.addr, nat_addr, backend.port, chosen.nat_port, proto);
            if let Some((_, owner)) = self.map_entry(&reply) {
                // A port held by a flow that is over (closed: an RST or FINs both ways) is
                // taken over, the old flow's entries removed; a live flow's never.
                let closed = self
                    .flows
                    .get(&owner)
                    .is_none_or(|old| proto == IPPROTO_TCP && ct_state::closed(old.ct.flags));
                if !closed {
                    return Err(format!(
                        "SNAT port {port} already held by the live flow {owner:?}"
                    ));
                }
                self.touched_ct.push(owner);
                self.remove_flow(&owner);
            }
            ct.flags = ct_flags::SNAT;
            ct.nat_addr = nat_addr;
            ct.nat_port = chosen.nat_port;
        }
        ct.flags = ct_state::next_flags(ct.flags, tcp, false);
        self.flows.insert(
            key,
            Flow {
                ct,
                revs: vec![reply_to_client],
            },
        );
        if snat {
            self.add_rev(
                Ct4Key::new(backend.addr, ct.nat_addr, backend.port, ct.nat_port, proto),
                Rev4Value {
                    flags: ct_flags::SNAT,
                    ..rev
                },
                key,
            );
            self.add_rev(
                Ct4Key::new(saddr, backend.addr, sport, backend.port, proto),
                Rev4Value {
                    frontend_addr: ct.nat_addr,
                    frontend_port: ct.nat_port,
                    flags: ct_flags::SNAT_OUT,
                    ..rev
                },
                key,
            );
        }
        rewrite(f, l4p, Rewrite::Dst(backend.addr, backend.port));
        Ok((r::XDP_FORWARDED, true))
    }

    /// An ICMP error about a reply the node sent from a frontend: sent on to its backend,
    /// quoting the packet as the backend sent it.
    fn xdp_icmp(&mut self, f: &mut [u8], inner: usize, q: Ct4Key) -> (u32, bool) {
        let Some(flow) = self.flows.get(&q.reversed()) else {
            return (r::XDP_ICMP_NOT_TRACKED, false);
        };
        let ct = flow.ct;
        let quoted_src = (ct.backend_addr, ct.backend_port);
        let quoted_dst = (ct.flags & ct_flags::SNAT != 0).then_some((ct.nat_addr, ct.nat_port));
        let old = f[inner..inner + 28].to_vec();
        // The quoted packet: its source, and for SNAT flows its destination.
        let mut q_bytes = f[IP..].to_vec();
        let qi = inner - IP;
        {
            // Work on a copy laid out as a frame so `rewrite` applies (quoted header at IP).
            let mut quoted = vec![0u8; ETH_LEN];
            quoted.extend_from_slice(&q_bytes[qi..]);
            let l4 = Some((IP + 20, q.proto));
            rewrite_quoted(&mut quoted, l4, Rewrite::Src(quoted_src.0, quoted_src.1));
            if let Some((a, p)) = quoted_dst {
                rewrite_quoted(&mut quoted, l4, Rewrite::Dst(a, p));
            }
            q_bytes[qi..].copy_from_slice(&quoted[ETH_LEN..]);
        }
        f[IP..].copy_from_slice(&q_bytes);
        let new = f[inner..inner + 28].to_vec();
        let icmp = inner - 8;
        let c = csum_update(be16(f, icmp + 2), &old, &new);
        put16(f, icmp + 2, c);
        rewrite(f, None, Rewrite::Dst(ct.backend_addr, 0));
        (r::XDP_ICMP_TRANSLATED, true)
    }

    /// tc egress: (reason, whether the frame was rewritten).
    fn tc(&mut self, f: &mut [u8]) -> (u32, bool) {
        match parse(f) {
            Headers::NotParsed => (r::TC_NOT_PARSED, false),
            Headers::Ipv6(seen) => (ipv6_reasons(seen).1, false),
            Headers::LaterFragment {
                saddr,
                daddr,
                id,
                proto,
            } => {
                let Some(ports) = self
                    .frags
                    .get(&Frag4Key::new(saddr, daddr, id as u32, proto))
                    .copied()
                else {
                    return (r::TC_FRAGMENT_NOT_TRACKED, false);
                };
                let (reason, done) =
                    self.tc_l4(f, None, proto, saddr, daddr, ports.sport, ports.dport, 0);
                if done {
                    (r::TC_FRAGMENT_TRANSLATED, true)
                } else {
                    (reason, false)
                }
            }
            Headers::L4 {
                l4,
                proto,
                saddr,
                daddr,
                sport,
                dport,
                tcp,
                first_fragment,
                id,
            } => {
                let (reason, done) =
                    self.tc_l4(f, Some(l4), proto, saddr, daddr, sport, dport, tcp);
                if done && first_fragment {
                    self.frags.insert(
                        Frag4Key::new(saddr, daddr, id as u32, proto),
                        FragPorts { sport, dport },
                    );
                }
                (reason, done)
            }
            Headers::IcmpError {
                saddr,
                daddr,
                inner,
                q,
            } => {
                if daddr == q.saddr {
                    self.tc_icmp(f, saddr, inner, q)
                } else {
                    // Not addressed to the quoted packet's sender.
                    (r::TC_ICMP_NOT_TRACKED, false)
                }
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn tc_l4(
        &mut self,
        f: &mut [u8],
        l4: Option<usize>,
        proto: u8,
        saddr: u32,
        daddr: u32,
        sport: u16,
        dport: u16,
        tcp: u8,
    ) -> (u32, bool) {
        let key = Ct4Key::new(saddr, daddr, sport, dport, proto);
        self.touched_rev.push(key);
        self.take_hint(&key);
        let Some((rev, owner)) = self.revs.get(&key).copied() else {
            return (r::TC_NOT_A_FLOW, false);
        };
        self.touched_ct.push(owner);
        let l4p = l4.map(|o| (o, proto));
        if rev.flags & ct_flags::SNAT != 0 {
            // A remote backend's reply to the node's address: XDP's to restore.
            return (r::TC_NOT_A_FLOW, false);
        }
        let out = rev.flags & ct_flags::SNAT_OUT != 0;
        // A backend's packet is a reply only while its flow lives, goes to that backend, and is
        // not a SYN (or SYN-ACK) reusing the tuple of a closed TCP flow.
        let alive = out
            || self.flows.get(&owner).is_some_and(|flow| {
                flow.ct.backend_addr == saddr
                    && flow.ct.backend_port == sport
                    && !(proto == IPPROTO_TCP
                        && tcp & tcp_flags::SYN != 0
                        && ct_state::closed(flow.ct.flags))
            });
        if !alive {
            self.revs.remove(&key);
            return (r::TC_STALE_FLOW, false);
        }
        if out {
            rewrite(f, l4p, Rewrite::Src(rev.frontend_addr, rev.frontend_port));
            return (r::TC_SNAT, true);
        }
        let flow = self.flows.get_mut(&owner).unwrap();
        flow.ct.flags = ct_state::next_flags(flow.ct.flags, tcp, true);
        rewrite(f, l4p, Rewrite::Src(rev.frontend_addr, rev.frontend_port));
        (r::TC_REPLY_TRANSLATED, true)
    }

    /// An ICMP error about a client's translated packet (client → backend): it leaves quoting
    /// what the client sent (to the frontend), and a pod's error comes from the frontend.
    fn tc_icmp(&mut self, f: &mut [u8], saddr: u32, inner: usize, q: Ct4Key) -> (u32, bool) {
        self.take_hint(&q.reversed());
        let Some((rev, _owner)) = self.revs.get(&q.reversed()).copied() else {
            return (r::TC_ICMP_NOT_TRACKED, false);
        };
        if rev.flags & (ct_flags::SNAT | ct_flags::SNAT_OUT) != 0 {
            return (r::TC_ICMP_NOT_TRACKED, false);
        }
        let old = f[inner..inner + 28].to_vec();
        let mut quoted = vec![0u8; ETH_LEN];
        quoted.extend_from_slice(&f[inner..]);
        rewrite_quoted(
            &mut quoted,
            Some((IP + 20, q.proto)),
            Rewrite::Dst(rev.frontend_addr, rev.frontend_port),
        );
        f[inner..].copy_from_slice(&quoted[ETH_LEN..]);
        let new = f[inner..inner + 28].to_vec();
        let icmp = inner - 8;
        let c = csum_update(be16(f, icmp + 2), &old, &new);
        put16(f, icmp + 2, c);
        if saddr == q.daddr {
            rewrite(f, None, Rewrite::Src(rev.frontend_addr, 0));
        }
        (r::TC_ICMP_TRANSLATED, true)
    }
}

/// A quoted header's rewrite: as [`rewrite`], but the quoted L4 checksum is updated only
/// for UDP (the 8 quoted bytes of TCP hold no checksum).
fn rewrite_quoted(f: &mut [u8], l4: Option<(usize, u8)>, rw: Rewrite) {
    match l4 {
        Some((o, IPPROTO_UDP)) => rewrite(f, Some((o, IPPROTO_UDP)), rw),
        Some((o, _)) => {
            // Ports only, no checksum: rewrite the address with the IP checksum, then the port.
            rewrite(f, None, rw);
            match rw {
                Rewrite::Dst(_, p) => put_port(f, o + 2, p),
                Rewrite::Src(_, p) => put_port(f, o, p),
            }
        }
        None => rewrite(f, None, rw),
    }
}
