//! Keeps the kernel from handing out the node's NodePorts and north-south SNAT ports as
//! ephemeral ports (Cilium's `--enable-auto-protect-node-port-range`): at start the agent adds
//! `--nodeport-range` and the SNAT range to `net.ipv4.ip_local_reserved_ports` of the network
//! namespace it runs in, keeping every entry already there. A local connection whose source
//! port were a NodePort would have its replies taken for NodePort traffic; one on an SNAT
//! port could collide with a translated flow.
use std::{fmt, path::Path, str::FromStr};

use lb_common::snat_ports;

/// The sysctl, per network namespace: read and written in the one the agent runs in.
pub const SYSCTL: &str = "/proc/sys/net/ipv4/ip_local_reserved_ports";

/// An inclusive port range (`A-B`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

/// The apiserver's default `--service-node-port-range`.
pub const DEFAULT_NODEPORT_RANGE: PortRange = PortRange {
    first: 30_000,
    last: 32_767,
};

/// The ports XDP uses as source of flows it translates to remote backends.
pub const SNAT_RANGE: PortRange = PortRange {
    first: snat_ports::FIRST,
    last: (snat_ports::FIRST as u32 + snat_ports::COUNT as u32 - 1) as u16,
};

impl PortRange {
    pub fn contains(&self, port: u16) -> bool {
        (self.first..=self.last).contains(&port)
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.first == self.last {
            write!(f, "{}", self.first)
        } else {
            write!(f, "{}-{}", self.first, self.last)
        }
    }
}

/// `A-B` as kube-apiserver's `--service-node-port-range` takes it (both ports 1..=65535,
/// A <= B).
impl FromStr for PortRange {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let (first, last) = text
            .trim()
            .split_once('-')
            .ok_or_else(|| format!("{text:?} is not a port range A-B (e.g. 30000-32767)"))?;
        let port = |p: &str| -> Result<u16, String> {
            match p.trim().parse::<u16>() {
                Ok(0) | Err(_) => Err(format!("{p:?} is not a port (1-65535)")),
                Ok(port) => Ok(port),
            }
        };
        let (first, last) = (port(first)?, port(last)?);
        if first > last {
            return Err(format!("{text:?}: the first port is above the last"));
        }
        Ok(Self { first, last })
    }
}

/// The entries of an `ip_local_reserved_ports` value (`1,2-5,...`; empty when none).
pub fn parse_reserved(text: &str) -> Result<Vec<PortRange>, String> {
    text.trim()
        .split(',')
        .map(str::trim)
        .filter(|entry| !entry.is_empty())
        .map(|entry| match entry.split_once('-') {
            Some(_) => entry.parse(),
            None => entry
                .parse::<u16>()
                .map(|p| PortRange { first: p, last: p })
                .map_err(|_| format!("{entry:?} is not a port")),
        })
        .collect()
}

/// The value to write so that `current` also reserves every port of `wanted`: the entries
/// there are kept as they are and each range not wholly reserved already is appended.
/// `None`: nothing is missing, nothing to write.
pub fn merged(current: &str, wanted: &[PortRange]) -> Result<Option<String>, String> {
    let reserved = parse_reserved(current)?;
    let covered = |range: &PortRange| {
        (range.first..=range.last).all(|port| reserved.iter().any(|r| r.contains(port)))
    };
    let missing: Vec<String> = wanted
        .iter()
        .filter(|range| !covered(range))
        .map(PortRange::to_string)
        .collect();
    if missing.is_empty() {
        return Ok(None);
    }
    let mut entries: Vec<String> = reserved.iter().map(PortRange::to_string).collect();
    entries.extend(missing);
    Ok(Some(entries.join(",")))
}

/// Adds `wanted` to the sysctl at `path` (see [`SYSCTL`]). Failing is no reason to stop:
/// traffic is served all the same; the warning says what may happen instead.
pub fn reserve(path: &Path, wanted: &[PortRange]) {
    let described: Vec<String> = wanted.iter().map(PortRange::to_string).collect();
    let described = described.join(",");
    let warn = |why: String| {
        tracing::warn!(
            sysctl = %path.display(),
            ports = %described,
            "cannot reserve the NodePort and SNAT ports: {why}; the kernel may hand them out as \
             ephemeral ports, and a local connection from one of them can collide with a \
             NodePort or a translated flow (reserve them on the node, or turn this off with \
             --reserve-ports=false)"
        );
    };
    let current = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) => return warn(format!("reading it: {e}")),
    };
    let value = match merged(&current, wanted) {
        Ok(Some(value)) => value,
        Ok(None) => {
            tracing::debug!(ports = %described, "NodePort and SNAT ports already reserved");
            return;
        }
        Err(e) => return warn(format!("its value {:?}: {e}", current.trim())),
    };
    match std::fs::write(path, &value) {
        Ok(()) => tracing::info!(
            sysctl = %path.display(),
            was = %current.trim(),
            now = %value,
            "reserved the NodePort and SNAT ports: no ephemeral port is taken from them"
        ),
        Err(e) => warn(format!(
            "writing it: {e} (read-only /proc/sys, or no CAP_NET_ADMIN)"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(first: u16, last: u16) -> PortRange {
        PortRange { first, last }
    }

    #[test]
    fn node_port_ranges_parse_as_the_apiserver_writes_them() {
        assert_eq!("30000-32767".parse(), Ok(DEFAULT_NODEPORT_RANGE));
        assert_eq!("1-1".parse(), Ok(range(1, 1)));
        assert_eq!(" 20000 - 20100 ".parse(), Ok(range(20_000, 20_100)));
        for bad in [
            "30000",
            "30000-",
            "-1",
            "a-b",
            "0-10",
            "1-65536",
            "32767-30000",
            "",
        ] {
            assert!(bad.parse::<PortRange>().is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn the_snat_range_is_the_top_of_the_port_space() {
        assert_eq!(SNAT_RANGE, range(61_000, 65_535));
    }

    #[test]
    fn reserved_ports_parse_as_the_kernel_prints_them() {
        assert_eq!(parse_reserved("\n"), Ok(vec![]));
        assert_eq!(
            parse_reserved("22,8000-8100,9000\n"),
            Ok(vec![range(22, 22), range(8000, 8100), range(9000, 9000)])
        );
        assert!(parse_reserved("22,x").is_err());
    }

    #[test]
    fn merging_keeps_what_is_there_and_appends_only_what_is_missing() {
        let wanted = [DEFAULT_NODEPORT_RANGE, SNAT_RANGE];
        assert_eq!(
            merged("\n", &wanted),
            Ok(Some("30000-32767,61000-65535".into()))
        );
        assert_eq!(
            merged("22,8000-8100\n", &wanted),
            Ok(Some("22,8000-8100,30000-32767,61000-65535".into()))
        );
        // Already there (also split over several entries): nothing to write.
        assert_eq!(merged("30000-32767,61000-65535\n", &wanted), Ok(None));
        assert_eq!(
            merged("1000,30000-31000,31001-32767,60000-65535", &wanted),
            Ok(None)
        );
        // Partly covered: the whole range is appended, the old entry stays.
        assert_eq!(
            merged("30000-30010", &wanted),
            Ok(Some("30000-30010,30000-32767,61000-65535".into()))
        );
        assert!(merged("nonsense", &wanted).is_err());
    }
}
