//! The IPv6 sibling of `packet/`: Ethernet + IPv6 (with extension headers as raw bytes) +
//! TCP/UDP, ICMPv6 errors, and a checker that recomputes every checksum from scratch
//! (TCP, UDP and ICMPv6 all over the IPv6 pseudo-header, RFC 8200 8.1).
#![allow(dead_code)]

use std::net::Ipv6Addr;

pub const TCP: u8 = 6;
pub const UDP: u8 = 17;
pub const ICMPV6: u8 = 58;
pub const HOP_BY_HOP: u8 = 0;
pub const ROUTING: u8 = 43;
pub const FRAGMENT: u8 = 44;
pub const DEST_OPTS: u8 = 60;
pub const AUTH: u8 = 51;
pub const SYN: u8 = 0x02;
pub const ACK: u8 = 0x10;

/// Destination MAC, source MAC, EtherType IPv6.
pub const ETH6: [u8; 14] = [2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 2, 0x86, 0xdd];

/// An extension header: its type and its bytes (next header and length filled in by
/// `Packet6::bytes`), a multiple of 8 bytes long.
#[derive(Clone, Debug)]
pub struct Ext {
    pub kind: u8,
    pub body: Vec<u8>,
}

/// Hop-by-Hop or Destination Options with one PadN option: 8 bytes.
pub fn options(kind: u8) -> Ext {
    Ext {
        kind,
        body: vec![0, 0, 1, 4, 0, 0, 0, 0],
    }
}

/// A Routing header (type 4, segment routing shape) with `segments_left`: 8 bytes + one
/// 16-byte segment.
pub fn routing(segments_left: u8) -> Ext {
    let mut body = vec![0, 2, 4, segments_left, 0, 0, 0, 0];
    body.extend([0u8; 16]);
    Ext {
        kind: ROUTING,
        body,
    }
}

#[derive(Clone, Debug)]
pub struct Packet6 {
    pub src: Ipv6Addr,
    pub dst: Ipv6Addr,
    pub hop_limit: u8,
    pub proto: u8,
    pub sport: u16,
    pub dport: u16,
    pub tcp_flags: u8,
    pub ext: Vec<Ext>,
    pub payload: Vec<u8>,
}

pub fn tcp6(src: (&str, u16), dst: (&str, u16), flags: u8) -> Packet6 {
    Packet6 {
        src: src.0.parse().unwrap(),
        dst: dst.0.parse().unwrap(),
        hop_limit: 64,
        proto: TCP,
        sport: src.1,
        dport: dst.1,
        tcp_flags: flags,
        ext: Vec::new(),
        payload: b"hello".to_vec(),
    }
}

pub fn udp6(src: (&str, u16), dst: (&str, u16)) -> Packet6 {
    Packet6 {
        proto: UDP,
        payload: b"dns?".to_vec(),
        ..tcp6(src, dst, 0)
    }
}

impl Packet6 {
    pub fn with_src(mut self, addr: &str, port: u16) -> Self {
        self.src = addr.parse().unwrap();
        self.sport = port;
        self
    }

    pub fn with_dst(mut self, addr: &str, port: u16) -> Self {
        self.dst = addr.parse().unwrap();
        self.dport = port;
        self
    }

    pub fn with_ext(mut self, ext: Ext) -> Self {
        self.ext.push(ext);
        self
    }

    /// The TCP or UDP header and payload, with its checksum.
    pub fn l4(&self) -> Vec<u8> {
        let mut l4 = Vec::new();
        l4.extend(self.sport.to_be_bytes());
        l4.extend(self.dport.to_be_bytes());
        if self.proto == TCP {
            l4.extend(1000u32.to_be_bytes());
            l4.extend(
                (if self.tcp_flags & ACK != 0 {
                    2000u32
                } else {
                    0
                })
                .to_be_bytes(),
            );
            l4.push(5 << 4);
            l4.push(self.tcp_flags);
            l4.extend(65535u16.to_be_bytes());
            l4.extend([0, 0, 0, 0]);
        } else {
            l4.extend(((8 + self.payload.len()) as u16).to_be_bytes());
            l4.extend([0, 0]);
        }
        l4.extend(&self.payload);
        let at = if self.proto == TCP { 16 } else { 6 };
        let mut c = !fold(pseudo_sum(self.src, self.dst, self.proto, l4.len()) + sum(&l4));
        if c == 0 && self.proto == UDP {
            c = 0xffff;
        }
        l4[at..at + 2].copy_from_slice(&c.to_be_bytes());
        l4
    }

    /// The frame: IPv6 header, the extension headers in order, the L4 bytes.
    pub fn bytes(&self) -> Vec<u8> {
        frame(
            self.src,
            self.dst,
            self.hop_limit,
            &self.ext,
            self.proto,
            &self.l4(),
        )
    }
}

/// An IPv6 frame around `upper` (protocol `proto`) after the extension headers `ext`.
pub fn frame(
    src: Ipv6Addr,
    dst: Ipv6Addr,
    hop: u8,
    ext: &[Ext],
    proto: u8,
    upper: &[u8],
) -> Vec<u8> {
    let mut payload = Vec::new();
    for (i, e) in ext.iter().enumerate() {
        let next = ext.get(i + 1).map_or(proto, |n| n.kind);
        let mut body = e.body.clone();
        assert!(body.len().is_multiple_of(8) && body.len() >= 8);
        body[0] = next;
        if e.kind != FRAGMENT {
            body[1] = (body.len() / 8 - 1) as u8;
        }
        payload.extend(body);
    }
    payload.extend(upper);
    let first = ext.first().map_or(proto, |e| e.kind);
    let mut f = ETH6.to_vec();
    f.extend([0x60, 0, 0, 0]);
    f.extend((payload.len() as u16).to_be_bytes());
    f.push(first);
    f.push(hop);
    f.extend(src.octets());
    f.extend(dst.octets());
    f.extend(payload);
    f
}

/// An ICMPv6 error (`kind`, `code`, `rest`: the MTU of Packet Too Big) from `src` to `dst`,
/// quoting the first `quote` bytes of `quoted`'s IPv6 packet.
pub fn icmp6_error(
    src: &str,
    dst: &str,
    kind: u8,
    code: u8,
    rest: u32,
    quoted: &Packet6,
    quote: usize,
) -> Vec<u8> {
    let q = quoted.bytes();
    let q = &q[14..(14 + quote).min(q.len())];
    let (src, dst): (Ipv6Addr, Ipv6Addr) = (src.parse().unwrap(), dst.parse().unwrap());
    let mut icmp = vec![kind, code, 0, 0];
    icmp.extend(rest.to_be_bytes());
    icmp.extend(q);
    let c = !fold(pseudo_sum(src, dst, ICMPV6, icmp.len()) + sum(&icmp));
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    frame(src, dst, 64, &[], ICMPV6, &icmp)
}

fn sum(bytes: &[u8]) -> u32 {
    bytes
        .chunks(2)
        .map(|c| u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]) as u32)
        .sum()
}

fn pseudo_sum(src: Ipv6Addr, dst: Ipv6Addr, proto: u8, len: usize) -> u32 {
    sum(&src.octets()) + sum(&dst.octets()) + proto as u32 + len as u32
}

fn fold(mut s: u32) -> u16 {
    while s >> 16 != 0 {
        s = (s & 0xffff) + (s >> 16);
    }
    s as u16
}

/// Checks the TCP/UDP/ICMPv6 checksum of a frame built like ours (no extension headers, or
/// the ones `frame` writes), from scratch; returns what is wrong.
pub fn verify6(f: &[u8]) -> Result<(), String> {
    if f.len() < 54 || f[12..14] != [0x86, 0xdd] {
        return Ok(());
    }
    let plen = u16::from_be_bytes([f[18], f[19]]) as usize;
    if 54 + plen > f.len() {
        return Ok(()); // malformed on purpose
    }
    let src = Ipv6Addr::from(<[u8; 16]>::try_from(&f[22..38]).unwrap());
    let dst = Ipv6Addr::from(<[u8; 16]>::try_from(&f[38..54]).unwrap());
    let mut next = f[20];
    let mut off = 54;
    while matches!(next, HOP_BY_HOP | ROUTING | DEST_OPTS) {
        next = f[off];
        off += (f[off + 1] as usize + 1) * 8;
    }
    if next == FRAGMENT {
        return Ok(()); // the L4 checksum covers the whole datagram
    }
    let upper = &f[off..54 + plen];
    if !matches!(next, TCP | UDP | ICMPV6) {
        return Ok(());
    }
    if fold(pseudo_sum(src, dst, next, upper.len()) + sum(upper)) != 0xffff {
        return Err(format!("bad checksum (protocol {next})"));
    }
    Ok(())
}

/// The datagram `p` cut into two IPv6 fragments (Fragment header with identification `id`):
/// the first carries `first` bytes of the L4 header and payload (a multiple of 8), M set;
/// the second the rest at that offset. The L4 checksum (in the first) covers the whole
/// datagram.
pub fn fragments6(p: &Packet6, first: usize, id: u32) -> [Vec<u8>; 2] {
    assert!(first.is_multiple_of(8));
    let l4 = p.l4();
    let frag = |offset: usize, more: bool| {
        let mut body = vec![0, 0];
        body.extend((offset as u16 | more as u16).to_be_bytes());
        body.extend(id.to_be_bytes());
        Ext {
            kind: FRAGMENT,
            body,
        }
    };
    let mut ext = p.ext.clone();
    ext.push(frag(0, true));
    let one = frame(p.src, p.dst, p.hop_limit, &ext, p.proto, &l4[..first]);
    ext.pop();
    ext.push(frag(first, false));
    let two = frame(p.src, p.dst, p.hop_limit, &ext, p.proto, &l4[first..]);
    [one, two]
}
