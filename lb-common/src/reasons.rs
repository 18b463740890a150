//! Why the north-south programs dropped or passed a packet: one per-CPU counter per reason
//! (`LB4_REASONS_V1`, a per-CPU array indexed by these numbers), exported as
//! `lb_datapath_packets_total{program, reason}` and shown by `lb-agent status`.
//!
//! Each program returns exactly one reason per packet, so the counters of a program sum to
//! the packets it saw. A reason fixes the verdict: the `dropped_*` ones drop ([`drops`]),
//! every other one passes (translated or not).
//!
//! The numbers are the map's layout: a new reason is added at the end (the map grows, and an
//! agent carries the old counts over), a reason is never renumbered without a new map name.

// ---- XDP (ingress) ----

/// Translated towards its backend (DNAT; a new flow or a tracked one).
pub const XDP_FORWARDED: u32 = 0;
/// A remote backend's reply to an SNAT flow, given its client back as destination.
pub const XDP_REPLY_TRANSLATED: u32 = 1;
/// An ICMP error about a tracked flow's reply, sent on to the backend.
pub const XDP_ICMP_TRANSLATED: u32 = 2;
/// Not to a frontend: another address, another port of a node address, an SNAT port
/// without flow.
pub const XDP_NOT_A_SERVICE: u32 = 3;
/// To a ClusterIP: served at the socket only, not from outside.
pub const XDP_CLUSTER_IP: u32 = 4;
/// Not IPv4/IPv6 TCP/UDP or an ICMP/ICMPv6 error as parsed (other EtherTypes, IP options,
/// truncated or inconsistent headers, other protocols and ICMP types, fragments of anything
/// but TCP/UDP, IPv6 UDP with checksum 0).
pub const XDP_NOT_PARSED: u32 = 5;
/// An ICMP error about no tracked flow.
pub const XDP_ICMP_NOT_TRACKED: u32 = 6;
/// `externalTrafficPolicy: Cluster` without a backend: left to the stack, which refuses it.
pub const XDP_NO_BACKEND: u32 = 7;
/// `externalTrafficPolicy: Local` without a local endpoint.
pub const XDP_DROPPED_NO_LOCAL_ENDPOINT: u32 = 8;
/// A LoadBalancer IP's `loadBalancerSourceRanges` leave the client out.
pub const XDP_DROPPED_SOURCE_RANGE: u32 = 9;
/// A new SNAT flow, but the ingress interface has no address to SNAT to.
pub const XDP_DROPPED_NO_SNAT_ADDRESS: u32 = 10;
/// A new SNAT flow, but every SNAT port of its backend and node address is held by a live
/// flow (port exhaustion; see `snat_ports`).
pub const XDP_DROPPED_NO_SNAT_PORT: u32 = 11;
/// A new flow the conntrack or reverse map refused.
pub const XDP_DROPPED_FLOW_TABLE_FULL: u32 = 12;

// ---- tc (egress) ----

/// A backend's reply, given the frontend as source.
pub const TC_REPLY_TRANSLATED: u32 = 13;
/// A packet to a remote backend, given the node's address and the flow's SNAT port.
pub const TC_SNAT: u32 = 14;
/// An ICMP error about a client's translated packet, quoting what the client sent.
pub const TC_ICMP_TRANSLATED: u32 = 15;
/// No flow of ours: the node's own traffic, a pod's traffic not to a NodePort client.
pub const TC_NOT_A_FLOW: u32 = 16;
/// The tuple of an ended flow, now used by a new connection: left untouched (and the stale
/// reverse entry removed).
pub const TC_STALE_FLOW: u32 = 17;
/// Not IPv4/IPv6 TCP/UDP or an ICMP/ICMPv6 error as parsed.
pub const TC_NOT_PARSED: u32 = 18;
/// An ICMP error about no tracked flow.
pub const TC_ICMP_NOT_TRACKED: u32 = 19;
/// A rewrite helper failed: dropped rather than leak the backend's address.
pub const TC_DROPPED_REWRITE_FAILED: u32 = 20;

// ---- added later (numbers follow the order of addition, not the program) ----

/// A later fragment (offset > 0) of a datagram whose first fragment XDP translated (to the
/// flow's backend, or a remote backend's reply to its client): given the same destination.
/// A first fragment counts as a whole packet would (`forwarded`, `reply_translated`).
pub const XDP_FRAGMENT_TRANSLATED: u32 = 21;
/// A later fragment whose first fragment XDP did not translate (not ours, or the first
/// fragment lost or not yet come): passed untouched.
pub const XDP_FRAGMENT_NOT_TRACKED: u32 = 22;
/// A later fragment of a datagram whose first fragment tc translated (a reply, or a packet to
/// a remote backend): given the same source address.
pub const TC_FRAGMENT_TRANSLATED: u32 = 23;
/// A later fragment whose first fragment tc did not translate: passed untouched.
pub const TC_FRAGMENT_NOT_TRACKED: u32 = 24;

/// An IPv6 packet with an extension header the programs do not walk (ESP, AH, Mobility, a
/// Routing header with segments left, a header after the Fragment header, Hop-by-Hop not
/// first, more than four headers): passed untouched, never translated.
pub const XDP_EXTENSION_HEADER_NOT_UNDERSTOOD: u32 = 25;
/// As `XDP_EXTENSION_HEADER_NOT_UNDERSTOOD`, at tc egress.
pub const TC_EXTENSION_HEADER_NOT_UNDERSTOOD: u32 = 26;

/// Number of reasons: the map's `max_entries`.
pub const COUNT: u32 = 27;

/// `(program, reason)` label values, by reason number.
pub const NAMES: [(&str, &str); COUNT as usize] = [
    ("xdp", "forwarded"),
    ("xdp", "reply_translated"),
    ("xdp", "icmp_translated"),
    ("xdp", "not_a_service"),
    ("xdp", "cluster_ip"),
    ("xdp", "not_parsed"),
    ("xdp", "icmp_not_tracked"),
    ("xdp", "no_backend"),
    ("xdp", "dropped_no_local_endpoint"),
    ("xdp", "dropped_source_range"),
    ("xdp", "dropped_no_snat_address"),
    ("xdp", "dropped_no_snat_port"),
    ("xdp", "dropped_flow_table_full"),
    ("tc", "reply_translated"),
    ("tc", "snat"),
    ("tc", "icmp_translated"),
    ("tc", "not_a_flow"),
    ("tc", "stale_flow"),
    ("tc", "not_parsed"),
    ("tc", "icmp_not_tracked"),
    ("tc", "dropped_rewrite_failed"),
    ("xdp", "fragment_translated"),
    ("xdp", "fragment_not_tracked"),
    ("tc", "fragment_translated"),
    ("tc", "fragment_not_tracked"),
    ("xdp", "extension_header_not_understood"),
    ("tc", "extension_header_not_understood"),
];

/// The `(program, reason)` labels of `reason`.
pub fn name(reason: u32) -> Option<(&'static str, &'static str)> {
    NAMES.get(reason as usize).copied()
}

/// Whether the packet is dropped for `reason` (otherwise it passes).
#[inline(always)]
pub const fn drops(reason: u32) -> bool {
    matches!(
        reason,
        XDP_DROPPED_NO_LOCAL_ENDPOINT
            | XDP_DROPPED_SOURCE_RANGE
            | XDP_DROPPED_NO_SNAT_ADDRESS
            | XDP_DROPPED_NO_SNAT_PORT
            | XDP_DROPPED_FLOW_TABLE_FULL
            | TC_DROPPED_REWRITE_FAILED
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reason_has_one_unique_name_that_says_its_verdict() {
        assert_eq!(NAMES.len(), COUNT as usize);
        for (reason, (program, label)) in NAMES.iter().enumerate() {
            assert!(matches!(*program, "xdp" | "tc"), "{program}");
            assert!(
                !label.is_empty() && label.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'),
                "{label}"
            );
            assert_eq!(
                label.starts_with("dropped_"),
                drops(reason as u32),
                "{program} {label}: the name must say whether it drops"
            );
            let same = NAMES
                .iter()
                .filter(|other| **other == (*program, *label))
                .count();
            assert_eq!(same, 1, "{program} {label} named twice");
        }
        assert_eq!(name(COUNT), None);
        assert_eq!(name(TC_SNAT), Some(("tc", "snat")));
    }

    #[test]
    fn the_constants_number_the_names_in_order() {
        let numbered = [
            (XDP_FORWARDED, "xdp", "forwarded"),
            (XDP_REPLY_TRANSLATED, "xdp", "reply_translated"),
            (XDP_ICMP_TRANSLATED, "xdp", "icmp_translated"),
            (XDP_NOT_A_SERVICE, "xdp", "not_a_service"),
            (XDP_CLUSTER_IP, "xdp", "cluster_ip"),
            (XDP_NOT_PARSED, "xdp", "not_parsed"),
            (XDP_ICMP_NOT_TRACKED, "xdp", "icmp_not_tracked"),
            (XDP_NO_BACKEND, "xdp", "no_backend"),
            (
                XDP_DROPPED_NO_LOCAL_ENDPOINT,
                "xdp",
                "dropped_no_local_endpoint",
            ),
            (XDP_DROPPED_SOURCE_RANGE, "xdp", "dropped_source_range"),
            (
                XDP_DROPPED_NO_SNAT_ADDRESS,
                "xdp",
                "dropped_no_snat_address",
            ),
            (XDP_DROPPED_NO_SNAT_PORT, "xdp", "dropped_no_snat_port"),
            (
                XDP_DROPPED_FLOW_TABLE_FULL,
                "xdp",
                "dropped_flow_table_full",
            ),
            (TC_REPLY_TRANSLATED, "tc", "reply_translated"),
            (TC_SNAT, "tc", "snat"),
            (TC_ICMP_TRANSLATED, "tc", "icmp_translated"),
            (TC_NOT_A_FLOW, "tc", "not_a_flow"),
            (TC_STALE_FLOW, "tc", "stale_flow"),
            (TC_NOT_PARSED, "tc", "not_parsed"),
            (TC_ICMP_NOT_TRACKED, "tc", "icmp_not_tracked"),
            (TC_DROPPED_REWRITE_FAILED, "tc", "dropped_rewrite_failed"),
            (XDP_FRAGMENT_TRANSLATED, "xdp", "fragment_translated"),
            (XDP_FRAGMENT_NOT_TRACKED, "xdp", "fragment_not_tracked"),
            (TC_FRAGMENT_TRANSLATED, "tc", "fragment_translated"),
            (TC_FRAGMENT_NOT_TRACKED, "tc", "fragment_not_tracked"),
            (
                XDP_EXTENSION_HEADER_NOT_UNDERSTOOD,
                "xdp",
                "extension_header_not_understood",
            ),
            (
                TC_EXTENSION_HEADER_NOT_UNDERSTOOD,
                "tc",
                "extension_header_not_understood",
            ),
        ];
        assert_eq!(
            numbered.len(),
            COUNT as usize,
            "a constant without a test row"
        );
        for (reason, expected, label) in numbered {
            let (program, named) = name(reason).unwrap();
            assert_eq!(named, label, "reason {reason}");
            assert_eq!(program, expected, "reason {reason}");
        }
    }
}
