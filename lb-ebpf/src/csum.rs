//! Incremental Internet checksum updates (RFC 1624, eqn. 3: `HC' = ~(~HC + ~m + m')`) for
//! XDP, which has no checksum helpers. Values are used as they lie in memory (network byte
//! order read as native integers): one's-complement sums are byte-order independent, so no
//! conversion is needed. tc uses the kernel's `bpf_l3/l4_csum_replace`, which also handle
//! CHECKSUM_PARTIAL skbs.

#[inline(always)]
fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// The checksum `check` after a 16-bit word of the covered data changed from `from` to `to`.
#[inline(always)]
pub fn replace2(check: u16, from: u16, to: u16) -> u16 {
    let sum = (!check) as u32 + (!from) as u32 + to as u32;
    !fold(sum)
}

/// The checksum `check` after a 32-bit word of the covered data changed from `from` to `to`.
#[inline(always)]
pub fn replace4(check: u16, from: u32, to: u32) -> u16 {
    let sum = (!check) as u32
        + (!(from as u16)) as u32
        + (!((from >> 16) as u16)) as u32
        + (to & 0xffff)
        + (to >> 16);
    !fold(sum)
}

/// The checksum `check` after a 128-bit word (an IPv6 address) of the covered data changed
/// from `from` to `to`: one fold over its eight 16-bit halves.
#[inline(always)]
pub fn replace16(check: u16, from: &[u32; 4], to: &[u32; 4]) -> u16 {
    let mut sum = (!check) as u32;
    let mut i = 0;
    while i < 4 {
        sum += (!(from[i] as u16)) as u32
            + (!((from[i] >> 16) as u16)) as u32
            + (to[i] & 0xffff)
            + (to[i] >> 16);
        i += 1;
    }
    !fold(sum)
}
