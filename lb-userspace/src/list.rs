//! `lb-agent list`: every programmed frontend of every kind, read from the pinned service
//! table (no agent needed), each with the Service port it belongs to, its service id (the
//! backend set: a NodePort and its ClusterIP share one while they use the same endpoints)
//! and the backends new connections may pick.
use std::{collections::BTreeMap, path::Path};

use lb_common::{backend_flags, backend_states, frontend_flags};
use serde::Serialize;

use crate::{
    dataplane::{BpfServiceMaps, names::NamesMap},
    model::{Frontend, FrontendKind, Scope},
    reconcile::{BackendEntry, MapContents, ServiceMaps as _},
};

/// One programmed frontend as `list` shows it.
#[derive(Debug, Serialize)]
pub struct Row {
    /// `namespace/name:port`, when the agent recorded it.
    pub service: Option<String>,
    /// ClusterIP, NodePort, ExternalIP or LoadBalancer.
    #[serde(rename = "type")]
    pub kind: String,
    /// `IP:port` (`[IPv6]:port`), or `<node>:port` for an IPv4 NodePort (every IPv4 NodePort
    /// address of the node) and `[<node>]:port` for an IPv6 one.
    pub frontend: String,
    /// `IPv4` or `IPv6`.
    pub family: String,
    pub protocol: String,
    /// The entry in-node clients use instead of the frontend's own (a `Local` policy).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub in_node_clients: bool,
    pub service_id: u32,
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
    let maps = BpfServiceMaps::open_pinned(&maps_dir)?;
    Ok(rows_of(&maps.dump()?, &names))
}

/// The rows of map contents of both families, with the names of their frontends.
pub fn rows_of(contents: &MapContents, names: &BTreeMap<Frontend, String>) -> Vec<Row> {
    let mut rows = Vec::new();
    for (frontend, value) in &contents.frontends {
        let kind = FrontendKind::from_number(value.kind);
        let backends = contents
            .live_backends(value)
            .map(|(_, b)| backend_text(b))
            .collect();
        let external = kind.is_some_and(FrontendKind::is_external);
        rows.push(Row {
            service: names.get(frontend).cloned(),
            kind: kind.map_or_else(|| format!("kind {}", value.kind), |k| k.to_string()),
            frontend: frontend.address_text(),
            family: frontend.family().to_string(),
            protocol: frontend.protocol.to_string(),
            in_node_clients: frontend.scope == Scope::Internal,
            service_id: value.service_id,
            backends,
            affinity_timeout_secs: (value.flags & frontend_flags::AFFINITY != 0)
                .then_some(value.affinity_timeout_secs),
            traffic_policy: (external && frontend.scope == Scope::External).then_some(
                if value.flags & frontend_flags::LOCAL_ONLY != 0 {
                    "Local"
                } else {
                    "Cluster"
                },
            ),
        });
    }
    rows.sort_by(|a, b| {
        (
            &a.service,
            &a.kind,
            &a.frontend,
            &a.protocol,
            a.in_node_clients,
        )
            .cmp(&(
                &b.service,
                &b.kind,
                &b.frontend,
                &b.protocol,
                b.in_node_clients,
            ))
    });
    rows
}

/// `IP:port` (`[IPv6]:port`), then ` (local)` and ` (terminating)` where they apply, and any
/// other flag or state bits as numbers (` (flags=N)`, ` (state=N)`): one text for `list` and
/// `describe`.
pub fn backend_text(backend: &BackendEntry) -> String {
    let mut text = backend.backend.to_string();
    if backend.flags & backend_flags::LOCAL != 0 {
        text.push_str(" (local)");
    }
    let other_flags = backend.flags & !backend_flags::LOCAL;
    if other_flags != 0 {
        text.push_str(&format!(" (flags={other_flags})"));
    }
    match backend.state {
        backend_states::ACTIVE => {}
        backend_states::TERMINATING => text.push_str(" (terminating)"),
        other => text.push_str(&format!(" (state={other})")),
    }
    text
}

/// A table like `kubectl get` prints.
pub fn table(rows: &[Row]) -> String {
    let header = [
        "SERVICE", "TYPE", "FRONTEND", "PROTOCOL", "ID", "AFFINITY", "BACKENDS",
    ];
    let mut lines: Vec<[String; 7]> = vec![header.map(str::to_owned)];
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
        let kind = match (row.traffic_policy, row.in_node_clients) {
            (Some(policy), _) => format!("{}/{policy}", row.kind),
            (None, true) => format!("{}/in-node", row.kind),
            (None, false) => row.kind.clone(),
        };
        lines.push([
            row.service.clone().unwrap_or_else(|| "?".into()),
            kind,
            row.frontend.clone(),
            row.protocol.clone(),
            row.service_id.to_string(),
            row.affinity_timeout_secs
                .map(|s| format!("ClientIP/{s}s"))
                .unwrap_or_else(|| "None".into()),
            backends,
        ]);
    }
    let widths: Vec<usize> = (0..6)
        .map(|c| lines.iter().map(|l| l[c].len()).max().unwrap_or(0))
        .collect();
    lines
        .iter()
        .map(|l| {
            let mut line = String::new();
            for (column, width) in widths.iter().enumerate() {
                line.push_str(&format!("{:width$}   ", l[column]));
            }
            line.push_str(&l[6]);
            line
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[cfg(test)]
mod tests {
    use lb_common::{FrontendValue, SlotKey, SlotValue, frontend_kinds};

    use super::*;
    use crate::model::{Backend, Family, Protocol};

    #[test]
    fn ipv6_frontends_and_backends_print_in_brackets_beside_ipv4_ones() {
        let mut contents = MapContents::default();
        let v4 = Frontend::new("10.96.0.10".parse().unwrap(), 80, Protocol::Tcp);
        let v6 = Frontend::new("fd00:10:96::a".parse().unwrap(), 80, Protocol::Tcp);
        let v6_node_port = Frontend::node_port(Family::V6, 30080, Protocol::Tcp);
        for (frontend, service_id, kind) in [
            (v4, 1, frontend_kinds::CLUSTER_IP),
            (v6, 2, frontend_kinds::CLUSTER_IP),
            (v6_node_port, 2, frontend_kinds::NODE_PORT),
        ] {
            contents.frontends.insert(
                frontend,
                FrontendValue {
                    service_id,
                    count: 1,
                    kind,
                    ..FrontendValue::default()
                },
            );
        }
        for (service_id, backend_id, ip) in [(1, 10, "10.244.0.5"), (2, 11, "fd00:10:244::5")] {
            contents.slots.insert(
                SlotKey {
                    service_id,
                    index: 0,
                    generation: 0,
                    pad: 0,
                },
                SlotValue { backend_id },
            );
            contents.backends.insert(
                backend_id,
                BackendEntry {
                    backend: Backend {
                        ip: ip.parse().unwrap(),
                        port: 8080,
                    },
                    state: 0,
                    flags: 0,
                },
            );
        }
        let names = BTreeMap::from([
            (v4, "default/web:http".to_owned()),
            (v6, "default/web:http".to_owned()),
            (v6_node_port, "default/web:http".to_owned()),
        ]);
        let rows = rows_of(&contents, &names);
        let shown: Vec<(&str, &str, Vec<String>)> = rows
            .iter()
            .map(|r| (r.kind.as_str(), r.frontend.as_str(), r.backends.clone()))
            .collect();
        assert_eq!(
            shown,
            [
                (
                    "ClusterIP",
                    "10.96.0.10:80",
                    vec!["10.244.0.5:8080".to_owned()]
                ),
                (
                    "ClusterIP",
                    "[fd00:10:96::a]:80",
                    vec!["[fd00:10:244::5]:8080".to_owned()]
                ),
                (
                    "NodePort",
                    "[<node>]:30080",
                    vec!["[fd00:10:244::5]:8080".to_owned()]
                ),
            ]
        );
        assert!(
            rows.iter()
                .all(|r| r.service.as_deref() == Some("default/web:http"))
        );
        let families: Vec<&str> = rows.iter().map(|r| r.family.as_str()).collect();
        assert_eq!(families, ["IPv4", "IPv6", "IPv6"]);
        let table = table(&rows);
        assert!(table.contains("[fd00:10:96::a]:80"), "{table}");
    }
}
