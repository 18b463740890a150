//! `lb-agent list`: every programmed frontend, read from the pinned maps (no agent needed):
//! ClusterIPs from the socket load balancer's maps, NodePorts, externalIPs and LoadBalancer
//! IPs from the north-south maps, each with the Service port it belongs to.
use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
};

use aya::maps::HashMap;
use lb_common::{
    External4Key, External4Value, Maglev4Table, NameKey, NsBackend4, frontend_kinds,
    ns_backend_flags, ns_flags, ns_map_names,
};
use serde::Serialize;

use crate::{
    dataplane::{BpfServiceMaps, maps::open_pinned_hash, names::NamesMap},
    reconcile::{ServiceMaps as _, service_key},
};

/// One programmed frontend as `list` shows it.
#[derive(Debug, Serialize)]
pub struct Row {
    /// `namespace/name:port`, when the agent recorded it.
    pub service: Option<String>,
    /// ClusterIP, NodePort or ExternalIP (externalIPs and LoadBalancer ingress IPs).
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// `IP:port`, or `<node>:port` for a NodePort (every NodePort address of the node).
    pub frontend: String,
    pub protocol: String,
    pub backends: Vec<String>,
    pub affinity_timeout_secs: Option<u32>,
    /// externalTrafficPolicy of an external frontend.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub traffic_policy: Option<&'static str>,
}

pub fn rows(bpffs: &Path) -> anyhow::Result<Vec<Row>> {
    let maps_dir = bpffs.join("maps");
    let names = NamesMap::open_pinned(&maps_dir)
        .map(|n| n.all())
        .unwrap_or_default();
    let mut rows = cluster_rows(&maps_dir, &names)?;
    // The north-south maps exist once an agent ran with --nodeport-iface.
    if maps_dir.join(ns_map_names::FRONTENDS).exists() {
        rows.extend(external_rows(&maps_dir, &names)?);
    }
    Ok(rows)
}

fn cluster_rows(maps_dir: &Path, names: &BTreeMap<NameKey, String>) -> anyhow::Result<Vec<Row>> {
    let maps = BpfServiceMaps::open_pinned(maps_dir)?;
    let contents = maps.dump()?;
    let terminating = contents.terminating();
    Ok(contents
        .view()
        .into_iter()
        .map(|(frontend, (backends, affinity_timeout_secs))| Row {
            service: names
                .get(&NameKey {
                    frontend: service_key(&frontend),
                    kind: frontend_kinds::CLUSTER_IP,
                    pad: [0; 3],
                })
                .cloned(),
            kind: "ClusterIP",
            frontend: format!("{}:{}", frontend.ip, frontend.port),
            protocol: frontend.protocol.to_string(),
            backends: backends
                .iter()
                .map(|b| {
                    let terminating = terminating.get(&frontend).is_some_and(|t| t.contains(b));
                    let state = if terminating { " (terminating)" } else { "" };
                    format!("{b}{state}")
                })
                .collect(),
            affinity_timeout_secs,
            traffic_policy: None,
        })
        .collect())
}

fn external_rows(maps_dir: &Path, names: &BTreeMap<NameKey, String>) -> anyhow::Result<Vec<Row>> {
    let open = |name| open_pinned_hash(maps_dir, name);
    let frontends: HashMap<_, External4Key, External4Value> =
        HashMap::try_from(open(ns_map_names::FRONTENDS)?)?;
    let backends: HashMap<_, u32, NsBackend4> = HashMap::try_from(open(ns_map_names::BACKENDS)?)?;
    let tables: HashMap<_, u32, Maglev4Table> = HashMap::try_from(open(ns_map_names::MAGLEV)?)?;
    let mut rows = Vec::new();
    for (key, value) in frontends.iter().filter_map(Result::ok) {
        let node_port = key.addr == 0;
        let kind = if node_port {
            frontend_kinds::NODE_PORT
        } else {
            frontend_kinds::EXTERNAL_IP
        };
        let ids: BTreeSet<u32> = if value.count == 0 {
            BTreeSet::new()
        } else {
            tables
                .get(&value.service_id, 0)
                .map(|table| table.backend_ids.iter().copied().collect())
                .unwrap_or_default()
        };
        let shown = ids
            .iter()
            .filter_map(|id| backends.get(id, 0).ok())
            .map(|b| {
                let ip = std::net::Ipv4Addr::from(lb_common::addr_from_map(b.addr));
                let local = if b.flags & ns_backend_flags::LOCAL != 0 {
                    " (local)"
                } else {
                    ""
                };
                format!("{ip}:{}{local}", lb_common::port_from_map(b.port))
            })
            .collect::<BTreeSet<_>>();
        let ip = std::net::Ipv4Addr::from(lb_common::addr_from_map(key.addr));
        rows.push(Row {
            service: names
                .get(&NameKey {
                    frontend: key,
                    kind,
                    pad: [0; 3],
                })
                .cloned(),
            kind: if node_port { "NodePort" } else { "ExternalIP" },
            frontend: if node_port {
                format!("<node>:{}", lb_common::port_from_map(key.port))
            } else {
                format!("{ip}:{}", lb_common::port_from_map(key.port))
            },
            protocol: crate::model::Protocol::from_number(key.proto)
                .map_or_else(|| key.proto.to_string(), |p| p.to_string()),
            backends: shown.into_iter().collect(),
            affinity_timeout_secs: (value.flags & ns_flags::AFFINITY != 0)
                .then_some(value.affinity_timeout_secs),
            traffic_policy: Some(if value.flags & ns_flags::LOCAL_ONLY != 0 {
                "Local"
            } else {
                "Cluster"
            }),
        });
    }
    rows.sort_by(|a, b| {
        (a.kind, &a.frontend, &a.protocol).cmp(&(b.kind, &b.frontend, &b.protocol))
    });
    Ok(rows)
}

/// A table like `kubectl get` prints.
pub fn table(rows: &[Row]) -> String {
    let header = [
        "SERVICE", "TYPE", "FRONTEND", "PROTOCOL", "AFFINITY", "BACKENDS",
    ];
    let mut lines: Vec<[String; 6]> = vec![header.map(str::to_owned)];
    for row in rows {
        let backends = if row.backends.is_empty() {
            match row.traffic_policy {
                Some("Local") => "<none: dropped>".to_owned(),
                Some(_) => "<none>".to_owned(),
                None => "<none: refused>".to_owned(),
            }
        } else {
            row.backends.join(",")
        };
        let kind = match row.traffic_policy {
            Some(policy) => format!("{}/{policy}", row.kind),
            None => row.kind.to_owned(),
        };
        lines.push([
            row.service.clone().unwrap_or_else(|| "?".into()),
            kind,
            row.frontend.clone(),
            row.protocol.clone(),
            row.affinity_timeout_secs
                .map(|s| format!("ClientIP/{s}s"))
                .unwrap_or_else(|| "None".into()),
            backends,
        ]);
    }
    let widths: Vec<usize> = (0..5)
        .map(|c| lines.iter().map(|l| l[c].len()).max().unwrap_or(0))
        .collect();
    lines
        .iter()
        .map(|l| {
            let mut line = String::new();
            for (column, width) in widths.iter().enumerate() {
                line.push_str(&format!("{:width$}   ", l[column]));
            }
            line.push_str(&l[5]);
            line
        })
        .collect::<Vec<_>>()
        .join("\n")
}
