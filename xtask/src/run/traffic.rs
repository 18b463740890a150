//! Traffic through the agent: `lb-probe tcp` from the client pod inside the sandbox cgroup
//! (ClusterIPs) or from the outside client (the NodePort), and the spread of its connections
//! over the pods as a table.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context as _, Result, bail};
use serde::Deserialize;

use lb_testkit::{Cgroup, Netns};

use super::sandbox::Sandbox;

/// What `lb-probe tcp` prints.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct ProbeResult {
    pub attempts: u64,
    /// Answers by name: which pod served each connection.
    pub replies: BTreeMap<String, u64>,
    pub errors: BTreeMap<String, u64>,
    pub first_error: Option<String>,
}

impl ProbeResult {
    pub fn failures(&self) -> u64 {
        self.errors.values().sum()
    }
}

/// Where `lb-probe tcp` runs: a namespace, and the cgroup (if any) it joins first.
pub struct Origin<'a> {
    pub netns: &'a Netns,
    pub cgroup: Option<&'a Cgroup>,
}

impl<'a> Origin<'a> {
    /// The client pod, in the sandbox cgroup: east-west traffic, the socket programs.
    pub fn client_pod(sandbox: &'a Sandbox) -> Origin<'a> {
        Origin {
            netns: &sandbox.client.netns,
            cgroup: Some(&sandbox.cgroup),
        }
    }

    /// The outside client, in no sandbox cgroup: north-south traffic, the XDP and tc programs.
    pub fn outside(sandbox: &'a Sandbox) -> Origin<'a> {
        Origin {
            netns: sandbox.outside.netns(),
            cgroup: None,
        }
    }
}

/// `count` sequential connections to `target` (with `--whoami`: each reply is the address
/// the pod saw the connection come from).
pub fn probe(
    from: &Origin<'_>,
    probe: &Path,
    target: &str,
    count: u64,
    whoami: bool,
) -> Result<ProbeResult> {
    let count = count.to_string();
    let mut args = vec!["tcp", target, "--count", &count];
    if whoami {
        args.push("--whoami");
    }
    let child = lb_testkit::spawn_in(Some(from.netns), from.cgroup, probe, &args)?;
    let output = child.wait_with_output().context("waiting for lb-probe")?;
    if !output.status.success() {
        bail!(
            "lb-probe tcp {target} failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    serde_json::from_slice(&output.stdout).with_context(|| {
        format!(
            "lb-probe printed no JSON: {}",
            String::from_utf8_lossy(&output.stdout).trim()
        )
    })
}

/// The source addresses of `--whoami` replies (`IP:PORT`), by IP, ports dropped.
pub fn sources(result: &ProbeResult) -> BTreeMap<String, u64> {
    let mut sources = BTreeMap::new();
    for (seen, &n) in &result.replies {
        let ip = seen
            .parse::<std::net::SocketAddr>()
            .map_or_else(|_| seen.clone(), |addr| addr.ip().to_string());
        *sources.entry(ip).or_default() += n;
    }
    sources
}

/// One row per pod (also those that got nothing), then any other answer, then failures.
pub fn table(result: &ProbeResult, pods: &[&str]) -> String {
    let mut rows: Vec<(String, u64)> = pods
        .iter()
        .map(|p| {
            (
                (*p).to_owned(),
                result.replies.get(*p).copied().unwrap_or(0),
            )
        })
        .collect();
    for (name, &n) in &result.replies {
        if !pods.contains(&name.as_str()) {
            rows.push((format!("{name} (not a sandbox pod)"), n));
        }
    }
    let failures = result.failures();
    if failures > 0 {
        rows.push(("(failed)".to_owned(), failures));
    }
    let width = rows
        .iter()
        .map(|(name, _)| name.len())
        .chain(["POD".len()])
        .max()
        .unwrap_or(0);
    let total = result.attempts.max(1) as f64;
    let mut lines = vec![format!("  {:width$}  CONNECTIONS   SHARE", "POD")];
    for (name, n) in rows {
        let share = 100.0 * n as f64 / total;
        lines.push(format!("  {name:width$}  {n:>11}  {share:>5.1}%"));
    }
    if let Some(error) = &result.first_error {
        lines.push(format!("  first error: {error}"));
    }
    lines.join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_drop_the_ports() {
        let result: ProbeResult = serde_json::from_str(
            r#"{"attempts":3,"replies":{"192.168.77.100:40001":1,"192.168.77.100:40002":1,
                "10.244.0.1:61000":1}}"#,
        )
        .unwrap();
        assert_eq!(
            sources(&result),
            [
                ("10.244.0.1".to_owned(), 1),
                ("192.168.77.100".to_owned(), 2)
            ]
            .into()
        );
    }

    #[test]
    fn table_lists_every_pod_and_failures() {
        let result: ProbeResult = serde_json::from_str(
            r#"{"attempts":300,"replies":{"hostnames-1":150,"hostnames-3":149},
                "errors":{"timeout":1},"first_error":"timed out"}"#,
        )
        .unwrap();
        assert_eq!(
            table(&result, &["hostnames-1", "hostnames-2", "hostnames-3"]),
            "  POD          CONNECTIONS   SHARE\n  \
             hostnames-1          150   50.0%\n  \
             hostnames-2            0    0.0%\n  \
             hostnames-3          149   49.7%\n  \
             (failed)               1    0.3%\n  \
             first error: timed out"
        );
    }
}
