//! `lb-agent list`: the programmed services, read from the pinned maps (no agent needed).
use std::{collections::BTreeSet, path::Path};

use serde::Serialize;

use crate::{
    dataplane::BpfServiceMaps,
    model::{Backend, Frontend},
    reconcile::ServiceMaps as _,
};

/// One programmed frontend as `list` shows it.
#[derive(Debug, Serialize)]
pub struct Row {
    pub frontend: Frontend,
    pub backends: BTreeSet<Backend>,
    pub affinity_timeout_secs: Option<u32>,
}

pub fn rows(bpffs: &Path) -> anyhow::Result<Vec<Row>> {
    let maps = BpfServiceMaps::open_pinned(&bpffs.join("maps"))?;
    let contents = maps.dump()?;
    Ok(contents
        .view()
        .into_iter()
        .map(|(frontend, (backends, affinity_timeout_secs))| Row {
            frontend,
            backends,
            affinity_timeout_secs,
        })
        .collect())
}

/// A table like `kubectl get` prints.
pub fn table(rows: &[Row]) -> String {
    let mut lines = vec![[
        "FRONTEND".to_owned(),
        "PROTOCOL".to_owned(),
        "AFFINITY".to_owned(),
        "BACKENDS".to_owned(),
    ]];
    for row in rows {
        let backends = if row.backends.is_empty() {
            "<none: refused>".to_owned()
        } else {
            row.backends
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(",")
        };
        lines.push([
            format!("{}:{}", row.frontend.ip, row.frontend.port),
            row.frontend.protocol.to_string(),
            row.affinity_timeout_secs
                .map(|s| format!("ClientIP/{s}s"))
                .unwrap_or_else(|| "None".into()),
            backends,
        ]);
    }
    let widths: Vec<usize> = (0..4)
        .map(|c| lines.iter().map(|l| l[c].len()).max().unwrap_or(0))
        .collect();
    lines
        .iter()
        .map(|l| {
            format!(
                "{:w0$}   {:w1$}   {:w2$}   {}",
                l[0],
                l[1],
                l[2],
                l[3],
                w0 = widths[0],
                w1 = widths[1],
                w2 = widths[2]
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}
