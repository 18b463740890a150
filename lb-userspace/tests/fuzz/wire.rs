//! Byte-level helpers shared by the generator and the model: reading and writing big-endian
//! fields, the Internet checksum (RFC 1071) and its incremental update (RFC 1624, eq. 3).
//! Hand-rolled on purpose: the generator must also write broken headers (wrong lengths,
//! options, truncation, flipped bytes) that packet crates refuse to build, and the model must
//! update checksums exactly as the spec says (incrementally), not recompute them.

pub const ETH_LEN: usize = 14;
pub const ETH_P_IP: u16 = 0x0800;
pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;

pub fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

pub fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

pub fn put16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_be_bytes());
}

/// A map-order (network order) address read from the wire.
pub fn addr_at(b: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

pub fn put_addr(b: &mut [u8], at: usize, wire: u32) {
    b[at..at + 4].copy_from_slice(&wire.to_ne_bytes());
}

/// A map-order (network order) port read from the wire.
pub fn port_at(b: &[u8], at: usize) -> u16 {
    u16::from_ne_bytes([b[at], b[at + 1]])
}

pub fn put_port(b: &mut [u8], at: usize, wire: u16) {
    b[at..at + 2].copy_from_slice(&wire.to_ne_bytes());
}

pub fn sum(bytes: &[u8]) -> u32 {
    bytes
        .chunks(2)
        .map(|c| u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]) as u32)
        .sum()
}

pub fn fold(mut s: u32) -> u16 {
    while s >> 16 != 0 {
        s = (s & 0xffff) + (s >> 16);
    }
    s as u16
}

/// The checksum of `bytes` with its checksum field already zero.
pub fn checksum(bytes: &[u8]) -> u16 {
    !fold(sum(bytes))
}

pub fn pseudo_sum(src: [u8; 4], dst: [u8; 4], proto: u8, len: usize) -> u32 {
    sum(&src) + sum(&dst) + proto as u32 + len as u32
}

/// RFC 1624 eq. 3: the checksum `check` after the 16-bit words `old` became `new`
/// (`HC' = ~(~HC + ~m + m')`).
pub fn csum_update(check: u16, old: &[u8], new: &[u8]) -> u16 {
    let mut s = (!check) as u32;
    for c in old.chunks(2) {
        s += (!u16::from_be_bytes([c[0], c[1]])) as u32;
    }
    for c in new.chunks(2) {
        s += u16::from_be_bytes([c[0], c[1]]) as u32;
    }
    !fold(s)
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

pub fn unhex(s: &str) -> Vec<u8> {
    (0..s.len() / 2)
        .map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).expect("hex"))
        .collect()
}
