//! The kernel side of the load balancer. Every decision is a lookup in the maps whose layout
//! lives in `lb-common`; the agent fills them.
//!
//! - `sock.rs`: cgroup socket-address hooks (connect4/6, sendmsg4/6, recvmsg4/6,
//!   getpeername4/6) that translate a ClusterIP:port to a backend when the socket connects or
//!   sends, so east-west traffic pays no per-packet NAT; IPv4-mapped addresses on `AF_INET6`
//!   sockets as the IPv4 service.
//! - `bind.rs`: post_bind4/6 hooks refusing binds to the ports served to outside traffic.
//! - `ctx_word.rs`: the context's address fields, one 4-byte word at a time.
//! - `lookup.rs`: service and backend selection (random, or by session affinity).
//! - `maps.rs`: the map definitions.
//! - `xdp.rs`, `tc.rs`: north-south traffic (NodePort, externalIPs, LoadBalancer IPs),
//!   translated per packet in XDP with replies restored at tc egress, IPv4 and IPv6 by one
//!   source generic over the family (`ip.rs`: what differs; `ipv4.rs`, `ipv6.rs`: the
//!   network headers, IPv6's extension headers); helped by `parse.rs`, `csum.rs`,
//!   `conntrack.rs`, `nat.rs`, `snat.rs` (SNAT ports), `icmp.rs` (ICMP/ICMPv6 errors) and
//!   `frag.rs` (fragments); IPv6 runs in XDP as stages entered by tail call (`stages.rs`);
//!   why each packet was dropped or passed is counted in `verdict.rs`; a new flow's reverse
//!   entry waits for its first reply as a hint (`hint.rs`, atomics by `core::intrinsics`:
//!   the BPF target's `core::sync::atomic` has no compare-and-swap).
#![no_std]
#![no_main]
#![feature(core_intrinsics)]
#![allow(internal_features)]

mod bind;
mod ctx_word;
mod family;
mod lookup;
mod maps;
mod netns;
mod sock;

mod conntrack;
mod csum;
mod frag;
mod hint;
mod icmp;
mod ip;
mod ipv4;
mod ipv6;
mod nat;
mod parse;
mod snat;
mod stages;
mod tc;
mod verdict;
mod xdp;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

/// GPL-compatible, as the socket-cookie and retval helpers require.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
