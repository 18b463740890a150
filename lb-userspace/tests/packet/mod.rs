//! A small packet builder and checker for the north-south packet tests: Ethernet + IPv4 +
//! TCP/UDP (or raw bytes), with checksums computed from scratch, and a readable header diff.
#![allow(dead_code)]

use std::{fmt, net::Ipv4Addr};

pub const TCP: u8 = 6;
pub const UDP: u8 = 17;
pub const SYN: u8 = 0x02;
pub const ACK: u8 = 0x10;
pub const FIN: u8 = 0x01;
pub const RST: u8 = 0x04;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum L4 {
    Tcp {
        sport: u16,
        dport: u16,
        seq: u32,
        ack: u32,
        flags: u8,
    },
    /// `checksum: false` sends checksum 0 ("none").
    Udp {
        sport: u16,
        dport: u16,
        checksum: bool,
    },
}

/// An Ethernet/IPv4/TCP-or-UDP packet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Packet {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub ttl: u8,
    pub id: u16,
    pub l4: L4,
    pub payload: Vec<u8>,
}

pub fn tcp(src: (&str, u16), dst: (&str, u16), flags: u8) -> Packet {
    Packet {
        src: src.0.parse().unwrap(),
        dst: dst.0.parse().unwrap(),
        ttl: 64,
        id: 0x1234,
        l4: L4::Tcp {
            sport: src.1,
            dport: dst.1,
            seq: 1000,
            ack: if flags & ACK != 0 { 2000 } else { 0 },
            flags,
        },
        payload: b"hello".to_vec(),
    }
}

pub fn udp(src: (&str, u16), dst: (&str, u16)) -> Packet {
    Packet {
        src: src.0.parse().unwrap(),
        dst: dst.0.parse().unwrap(),
        ttl: 64,
        id: 0x4321,
        l4: L4::Udp {
            sport: src.1,
            dport: dst.1,
            checksum: true,
        },
        payload: b"dns?".to_vec(),
    }
}

impl Packet {
    pub fn with_src(mut self, addr: &str, port: u16) -> Self {
        self.src = addr.parse().unwrap();
        match &mut self.l4 {
            L4::Tcp { sport, .. } | L4::Udp { sport, .. } => *sport = port,
        }
        self
    }

    pub fn with_dst(mut self, addr: &str, port: u16) -> Self {
        self.dst = addr.parse().unwrap();
        match &mut self.l4 {
            L4::Tcp { dport, .. } | L4::Udp { dport, .. } => *dport = port,
        }
        self
    }

    pub fn sport(&self) -> u16 {
        match self.l4 {
            L4::Tcp { sport, .. } | L4::Udp { sport, .. } => sport,
        }
    }

    pub fn dport(&self) -> u16 {
        match self.l4 {
            L4::Tcp { dport, .. } | L4::Udp { dport, .. } => dport,
        }
    }

    pub fn proto(&self) -> u8 {
        match self.l4 {
            L4::Tcp { .. } => TCP,
            L4::Udp { .. } => UDP,
        }
    }

    /// The frame, with correct IP and L4 checksums.
    pub fn bytes(&self) -> Vec<u8> {
        let mut l4 = Vec::new();
        match &self.l4 {
            L4::Tcp {
                sport,
                dport,
                seq,
                ack,
                flags,
            } => {
                l4.extend(sport.to_be_bytes());
                l4.extend(dport.to_be_bytes());
                l4.extend(seq.to_be_bytes());
                l4.extend(ack.to_be_bytes());
                l4.push(5 << 4);
                l4.push(*flags);
                l4.extend(65535u16.to_be_bytes());
                l4.extend([0, 0]); // checksum
                l4.extend([0, 0]); // urgent
            }
            L4::Udp { sport, dport, .. } => {
                l4.extend(sport.to_be_bytes());
                l4.extend(dport.to_be_bytes());
                l4.extend(((8 + self.payload.len()) as u16).to_be_bytes());
                l4.extend([0, 0]);
            }
        }
        l4.extend(&self.payload);
        let check_at = match self.l4 {
            L4::Tcp { .. } => 16,
            L4::Udp { .. } => 6,
        };
        let wants_checksum = !matches!(
            self.l4,
            L4::Udp {
                checksum: false,
                ..
            }
        );
        if wants_checksum {
            let mut c = !fold(pseudo_sum(self.src, self.dst, self.proto(), l4.len()) + sum(&l4));
            if c == 0 && self.proto() == UDP {
                c = 0xffff;
            }
            l4[check_at..check_at + 2].copy_from_slice(&c.to_be_bytes());
        }
        let mut ip = vec![0x45, 0];
        ip.extend(((20 + l4.len()) as u16).to_be_bytes());
        ip.extend(self.id.to_be_bytes());
        ip.extend(0x4000u16.to_be_bytes()); // DF
        ip.push(self.ttl);
        ip.push(self.proto());
        ip.extend([0, 0]);
        ip.extend(self.src.octets());
        ip.extend(self.dst.octets());
        let c = !fold(sum(&ip));
        ip[10..12].copy_from_slice(&c.to_be_bytes());
        let mut frame = ETH.to_vec();
        frame.extend(ip);
        frame.extend(l4);
        frame
    }
}

/// The datagram `p` cut into IPv4 fragments: the first `sizes` are the L4 bytes (header and
/// payload, from the first byte of the L4 header) each fragment carries, multiples of 8; the
/// last fragment carries the rest. Each fragment keeps `p`'s IP id, has MF set but the last,
/// no DF, and its own IP checksum; the L4 checksum (in the first fragment) covers the whole
/// datagram.
pub fn fragments(p: &Packet, sizes: &[usize]) -> Vec<Vec<u8>> {
    let whole = p.bytes();
    let l4 = &whole[34..];
    let mut frames = Vec::new();
    let mut offset = 0;
    for (i, size) in sizes
        .iter()
        .chain([&(l4.len() - sizes.iter().sum::<usize>())])
        .enumerate()
    {
        assert!(
            i == sizes.len() || size % 8 == 0,
            "a fragment's data must be a multiple of 8"
        );
        let more = i < sizes.len();
        let mut ip = whole[14..34].to_vec();
        ip[2..4].copy_from_slice(&((20 + size) as u16).to_be_bytes());
        let frag_off = (offset / 8) as u16 | if more { 0x2000 } else { 0 };
        ip[6..8].copy_from_slice(&frag_off.to_be_bytes());
        ip[10..12].copy_from_slice(&[0, 0]);
        let c = !fold(sum(&ip));
        ip[10..12].copy_from_slice(&c.to_be_bytes());
        let mut frame = ETH.to_vec();
        frame.extend(ip);
        frame.extend(&l4[offset..offset + size]);
        frames.push(frame);
        offset += size;
    }
    frames
}

pub const ICMP: u8 = 1;

/// An ICMP error (`kind`, `code`, the 4 bytes after the checksum: e.g. the next-hop MTU of
/// "fragmentation needed") from `src` to `dst`, quoting the IP header and first 8 L4 bytes
/// of `quoted`.
pub fn icmp_error(src: &str, dst: &str, kind: u8, code: u8, rest: u32, quoted: &Packet) -> Vec<u8> {
    let quoted = quoted.bytes();
    let mut icmp = vec![kind, code, 0, 0];
    icmp.extend(rest.to_be_bytes());
    icmp.extend(&quoted[14..14 + 28]);
    let c = !fold(sum(&icmp));
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    let src: Ipv4Addr = src.parse().unwrap();
    let dst: Ipv4Addr = dst.parse().unwrap();
    let mut ip = vec![0x45, 0xc0];
    ip.extend(((20 + icmp.len()) as u16).to_be_bytes());
    ip.extend([0, 0, 0, 0, 64, ICMP, 0, 0]);
    ip.extend(src.octets());
    ip.extend(dst.octets());
    let c = !fold(sum(&ip));
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    let mut frame = ETH.to_vec();
    frame.extend(ip);
    frame.extend(icmp);
    frame
}

/// Destination MAC, source MAC, EtherType IPv4.
pub const ETH: [u8; 14] = [2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 2, 0x08, 0x00];

fn sum(bytes: &[u8]) -> u32 {
    bytes
        .chunks(2)
        .map(|c| u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]) as u32)
        .sum()
}

fn pseudo_sum(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, len: usize) -> u32 {
    sum(&src.octets()) + sum(&dst.octets()) + proto as u32 + len as u32
}

fn fold(mut s: u32) -> u16 {
    while s >> 16 != 0 {
        s = (s & 0xffff) + (s >> 16);
    }
    s as u16
}

/// Checks the IPv4 header checksum and the TCP/UDP checksum of a frame built like ours;
/// returns what is wrong.
pub fn verify_checksums(frame: &[u8]) -> Result<(), String> {
    if frame.len() < 34 || frame[12..14] != [0x08, 0x00] {
        return Ok(()); // not IPv4: nothing to check
    }
    let ip = &frame[14..34];
    let total = u16::from_be_bytes([ip[2], ip[3]]) as usize;
    if ip[0] != 0x45 || total < 28 || 14 + total > frame.len() {
        return Ok(()); // malformed on purpose (garbage cases compare bytes only)
    }
    if fold(sum(ip)) != 0xffff {
        return Err(format!(
            "bad IPv4 header checksum {:02x}{:02x}",
            ip[10], ip[11]
        ));
    }
    if u16::from_be_bytes([ip[6], ip[7]]) & 0x3fff != 0 {
        // A fragment: the L4 checksum covers the whole datagram (compare frames instead).
        return Ok(());
    }
    let l4 = &frame[34..14 + total];
    if ip[9] == ICMP {
        let icmp = &frame[34..14 + total];
        if fold(sum(icmp)) != 0xffff {
            return Err("bad ICMP checksum".into());
        }
        if icmp.len() >= 28 && icmp[8] == 0x45 && fold(sum(&icmp[8..28])) != 0xffff {
            return Err("bad checksum of the quoted IPv4 header".into());
        }
        return Ok(());
    }
    let src = Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
    let dst = Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]);
    let proto = ip[9];
    if proto == UDP && l4[6..8] == [0, 0] {
        return Ok(());
    }
    if fold(pseudo_sum(src, dst, proto, l4.len()) + sum(l4)) != 0xffff {
        return Err(format!("bad L4 checksum (protocol {proto})"));
    }
    Ok(())
}

/// A readable rendering of a frame's headers.
pub struct Headers<'a>(pub &'a [u8]);

impl fmt::Display for Headers<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        if b.len() < 34 || b[12..14] != [0x08, 0x00] {
            return write!(f, "{} bytes, not IPv4/TCP/UDP: {:02x?}", b.len(), b);
        }
        let ip = &b[14..34];
        write!(
            f,
            "IPv4 {}.{}.{}.{} -> {}.{}.{}.{} proto {} ttl {} check {:02x}{:02x}",
            ip[12],
            ip[13],
            ip[14],
            ip[15],
            ip[16],
            ip[17],
            ip[18],
            ip[19],
            ip[9],
            ip[8],
            ip[10],
            ip[11]
        )?;
        let frag_off = u16::from_be_bytes([ip[6], ip[7]]);
        if frag_off & 0x3fff != 0 {
            write!(
                f,
                " id {:02x}{:02x} fragment at {}{}",
                ip[4],
                ip[5],
                (frag_off & 0x1fff) * 8,
                if frag_off & 0x2000 != 0 { " MF" } else { "" }
            )?;
        }
        if b.len() >= 42 && frag_off & 0x1fff == 0 {
            let l4 = &b[34..];
            let (sport, dport) = (
                u16::from_be_bytes([l4[0], l4[1]]),
                u16::from_be_bytes([l4[2], l4[3]]),
            );
            let check = if ip[9] == TCP && l4.len() >= 18 {
                [l4[16], l4[17]]
            } else {
                [l4[6], l4[7]]
            };
            write!(
                f,
                " | ports {sport} -> {dport} check {:02x}{:02x}",
                check[0], check[1]
            )?;
        }
        Ok(())
    }
}
