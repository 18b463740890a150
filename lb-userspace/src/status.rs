//! `lb-agent status`: what is attached where, how full each map is, why XDP and tc passed or
//! dropped packets (all read from the pins, so it works while no agent runs), and the running
//! agent's source and last sync (from its `/healthz`).
use std::{io::Read as _, io::Write as _, net::SocketAddr, path::Path, time::Duration};

use serde::Serialize;

use crate::dataplane::{
    bpffs::{PinDir, is_bpffs},
    inspect::{self, MapStatus},
    links::{self, PinnedLinkStatus},
    reasons::{ReasonCount, ReasonCounters},
};

#[derive(Debug, Serialize)]
pub struct Status {
    pub bpffs: String,
    pub bpffs_mounted: bool,
    /// The process holding the pin directory's lock (the running agent), if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub locked_by: Option<String>,
    pub links: Vec<PinnedLinkStatus>,
    pub maps: Vec<MapStatus>,
    /// Per address family, what its maps hold (from `maps`).
    pub families: Vec<FamilySummary>,
    /// Packets of the north-south programs by the reason they gave (empty: no map pinned).
    pub datapath: Vec<ReasonCount>,
    /// The running agent's `/healthz` answer, or why there is none.
    pub agent: serde_json::Value,
}

/// What one family's maps hold.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct FamilySummary {
    /// `IPv4` or `IPv6`.
    pub family: &'static str,
    /// Frontend entries of every kind and scope.
    pub frontends: u64,
    pub backends: u64,
    /// Addresses NodePorts answer on.
    pub node_addresses: u64,
    /// Allowed source ranges of LoadBalancer IPs.
    pub source_ranges: u64,
    /// Tracked north-south flows.
    pub flows: u64,
}

/// Each family's entries among the pinned `maps` (a family whose frontends map is not
/// pinned is left out).
pub fn families(maps: &[MapStatus]) -> Vec<FamilySummary> {
    use lb_common::map_names::*;
    let entries = |name: &str| maps.iter().find(|m| m.name == name).map(|m| m.entries);
    [
        (
            "IPv4",
            [
                FRONTENDS_V4,
                BACKENDS_V4,
                NODE_ADDRS_V4,
                SOURCE_RANGES_V4,
                FLOWS_V4,
            ],
        ),
        (
            "IPv6",
            [
                FRONTENDS_V6,
                BACKENDS_V6,
                NODE_ADDRS_V6,
                SOURCE_RANGES_V6,
                FLOWS_V6,
            ],
        ),
    ]
    .into_iter()
    .filter_map(|(family, [frontends, backends, nodes, ranges, flows])| {
        Some(FamilySummary {
            family,
            frontends: entries(frontends)?,
            backends: entries(backends).unwrap_or(0),
            node_addresses: entries(nodes).unwrap_or(0),
            source_ranges: entries(ranges).unwrap_or(0),
            flows: entries(flows).unwrap_or(0),
        })
    })
    .collect()
}

pub fn collect(bpffs: &Path, healthz: SocketAddr) -> Status {
    let pins = PinDir::at(bpffs);
    let maps = inspect::pinned_maps(&pins.maps());
    Status {
        bpffs: bpffs.display().to_string(),
        bpffs_mounted: is_bpffs(bpffs),
        locked_by: crate::dataplane::lock::holder(bpffs).map(|holder| holder.to_string()),
        links: links::list(&pins.links()),
        families: families(&maps),
        maps,
        datapath: ReasonCounters::open_pinned(&pins.maps())
            .map(|counters| counters.read())
            .unwrap_or_default(),
        agent: fetch_healthz(healthz)
            .unwrap_or_else(|error| serde_json::json!({ "running": false, "error": error })),
    }
}

/// GET /healthz over plain HTTP/1.0 on the local agent: one request, no client library needed.
fn fetch_healthz(address: SocketAddr) -> Result<serde_json::Value, String> {
    let timeout = Duration::from_secs(2);
    let mut stream = std::net::TcpStream::connect_timeout(&address, timeout)
        .map_err(|e| format!("no agent answering on {address}: {e}"))?;
    stream
        .set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    write!(stream, "GET /healthz HTTP/1.0\r\nHost: {address}\r\n\r\n")
        .map_err(|e| e.to_string())?;
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .map_err(|e| e.to_string())?;
    let (head, body) = response.split_once("\r\n\r\n").ok_or("malformed answer")?;
    let mut value: serde_json::Value = serde_json::from_str(body).map_err(|e| e.to_string())?;
    value["running"] = true.into();
    value["healthy"] =
        (head.starts_with("HTTP/1.1 200") || head.starts_with("HTTP/1.0 200")).into();
    Ok(value)
}

/// The human-readable form.
pub fn text(status: &Status) -> String {
    let mut out = format!(
        "bpffs: {} ({})\n",
        status.bpffs,
        if status.bpffs_mounted {
            "bpffs"
        } else {
            "not bpffs: nothing pinned"
        }
    );
    if let Some(holder) = &status.locked_by {
        out.push_str(&format!("locked by: {holder}\n"));
    }
    out.push_str("\nATTACHED\n");
    if status.links.is_empty() {
        out.push_str("  (no pinned links: no programs attached by lb-agent)\n");
    }
    for link in &status.links {
        let where_ = link
            .pin
            .parent()
            .and_then(|p| p.file_name())
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let id = link
            .program_id
            .map(|id| id.to_string())
            .unwrap_or("?".into());
        out.push_str(&format!(
            "  {:<14} {:<22} program id {}\n",
            link.program, where_, id
        ));
    }
    out.push_str("\nFAMILIES\n");
    if status.families.is_empty() {
        out.push_str("  (no frontends map pinned)\n");
    }
    for family in &status.families {
        out.push_str(&format!(
            "  {:<5} {:>8} frontends {:>8} backends {:>4} NodePort addresses {:>6} source \
             ranges {:>8} flows\n",
            family.family,
            family.frontends,
            family.backends,
            family.node_addresses,
            family.source_ranges,
            family.flows
        ));
    }
    out.push_str("\nMAPS\n");
    for map in &status.maps {
        let percent = 100.0 * map.entries as f64 / f64::from(map.capacity.max(1));
        out.push_str(&format!(
            "  {:<16} {:<18} {:>8} / {:<8} ({percent:.1}%)\n",
            map.name, map.kind, map.entries, map.capacity
        ));
    }
    out.push_str("\nPACKETS (north-south programs, by reason)\n");
    let counted: Vec<&ReasonCount> = status.datapath.iter().filter(|c| c.packets > 0).collect();
    if status.datapath.is_empty() {
        out.push_str("  (no reasons map pinned)\n");
    } else if counted.is_empty() {
        out.push_str("  (no packet seen)\n");
    }
    for count in counted {
        out.push_str(&format!(
            "  {:<4} {:<26} {:>14}\n",
            count.program, count.reason, count.packets
        ));
    }
    out.push_str("\nAGENT\n");
    let agent = &status.agent;
    if agent["running"] == true {
        out.push_str(&format!(
            "  source {}, last sync {}, {}{}{}\n",
            agent["source"].as_str().unwrap_or("?"),
            agent["lastUpdated"].as_str().unwrap_or("never"),
            if agent["healthy"] == true {
                "healthy"
            } else {
                "unhealthy"
            },
            if agent["stale"] == true {
                " (source unreachable: serving the last known state)"
            } else {
                ""
            },
            if agent["nodeEligible"] == false {
                " (node marked for deletion: not eligible for load-balancer traffic)"
            } else {
                ""
            },
        ));
        if let Some(how) = agent["socketTermination"].as_str() {
            out.push_str(&format!("  sockets of removed backends: {how}\n"));
        }
    } else {
        out.push_str(&format!(
            "  not reachable: {}\n",
            agent["error"].as_str().unwrap_or("?")
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(datapath: Vec<ReasonCount>) -> Status {
        Status {
            bpffs: "/sys/fs/bpf/lb".into(),
            bpffs_mounted: true,
            locked_by: None,
            links: Vec::new(),
            maps: Vec::new(),
            families: Vec::new(),
            datapath,
            agent: serde_json::json!({ "running": false, "error": "none" }),
        }
    }

    #[test]
    fn packets_show_the_reasons_that_counted_and_say_when_there_is_nothing() {
        let counted = |program, reason, packets| ReasonCount {
            program,
            reason,
            packets,
        };
        let shown = text(&status(vec![
            counted("xdp", "forwarded", 12),
            counted("xdp", "not_a_service", 0),
            counted("tc", "reply_translated", 7),
        ]));
        let packets: Vec<&str> = shown
            .split("\nPACKETS")
            .nth(1)
            .unwrap()
            .split("\nAGENT")
            .next()
            .unwrap()
            .lines()
            .skip(1)
            .map(str::trim)
            .collect();
        let words: Vec<Vec<&str>> = packets
            .iter()
            .map(|l| l.split_whitespace().collect())
            .collect();
        assert_eq!(
            words,
            [
                vec!["xdp", "forwarded", "12"],
                vec!["tc", "reply_translated", "7"]
            ]
        );
        let none = text(&status(vec![counted("xdp", "forwarded", 0)]));
        assert!(none.contains("(no packet seen)"), "{none}");
        let unpinned = text(&status(Vec::new()));
        assert!(unpinned.contains("(no reasons map pinned)"), "{unpinned}");
    }

    #[test]
    fn families_sum_up_each_familys_maps() {
        use lb_common::map_names::*;
        let map = |name: &str, entries| MapStatus {
            name: name.into(),
            kind: "Hash".into(),
            entries,
            capacity: 65_536,
        };
        let maps = vec![
            map(FRONTENDS_V4, 12),
            map(BACKENDS_V4, 30),
            map(NODE_ADDRS_V4, 3),
            map(FRONTENDS_V6, 4),
            map(BACKENDS_V6, 2),
            map(NODE_ADDRS_V6, 2),
            map(SOURCE_RANGES_V6, 1),
        ];
        let found = families(&maps);
        assert_eq!(
            found,
            [
                FamilySummary {
                    family: "IPv4",
                    frontends: 12,
                    backends: 30,
                    node_addresses: 3,
                    source_ranges: 0,
                    flows: 0,
                },
                FamilySummary {
                    family: "IPv6",
                    frontends: 4,
                    backends: 2,
                    node_addresses: 2,
                    source_ranges: 1,
                    flows: 0,
                },
            ]
        );
        let mut shown = status(Vec::new());
        shown.families = found;
        let text = text(&shown);
        let line = text
            .lines()
            .find(|l| l.trim_start().starts_with("IPv6"))
            .unwrap();
        let words: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(
            &words[..5],
            ["IPv6", "4", "frontends", "2", "backends"],
            "{text}"
        );
        // An object without IPv6 maps (pins of an older agent): IPv4 alone.
        assert_eq!(families(&maps[..3]).len(), 1);
    }
}
