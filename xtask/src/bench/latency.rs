//! Benchmark 5: network programming latency, from a change written to the first connection on
//! the new backend and the last one on the removed backend: the agent's arm at every N,
//! kube-proxy's at `--latency-n`.

use std::process::Stdio;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, Result};

use super::arms::{apply_change, arm_label, client_args};
use super::cluster::{self, BACKENDS, Cluster};
use super::kube::SERVICE_PORT;
use super::report::Results;
use super::services::{KubeProxyState, Measured, NPL_VIP};
use super::{Plan, check_interrupted, sleep};

fn epoch_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

#[allow(clippy::too_many_arguments)]
pub fn programming_latency(
    cluster: &mut Cluster,
    n: usize,
    plan: &Plan,
    res: &mut Results,
    measured: &mut Measured,
    kp_i: &mut KubeProxyState,
    kp_n: &mut KubeProxyState,
) -> Result<()> {
    println!(
        "bench:   network programming latency, {} changes per arm",
        plan.changes
    );
    let backends = cluster.backend_ips();
    let interval = Duration::from_millis(plan.change_interval_ms);
    for arm in plan.latency_arms(n) {
        check_interrupted()?;
        // Runs until its stdin closes (after the last change), at most 15 minutes.
        let args = client_args(
            "watch",
            &[format!("{NPL_VIP}:{SERVICE_PORT}")],
            900_000,
            &["--timeout-ms", "200", "--until-stdin-closes"],
        );
        let mut watcher = cluster::Proc(
            cluster
                .client_cmd(arm, &args)?
                .stdin(Stdio::piped())
                .spawn()?,
        );
        let stdin = watcher.0.stdin.take();
        sleep(Duration::from_millis(300))?;
        // (t0, old id, new id)
        let mut changes = Vec::new();
        let mut current = backends
            .iter()
            .position(|ip| *ip == measured.npl.endpoints[0])
            .unwrap_or(0);
        for _ in 0..plan.changes {
            check_interrupted()?;
            let next = (current + 1) % BACKENDS;
            measured.npl.endpoints = vec![backends[next]];
            let from = cluster.agent()?.lines();
            let t0 = epoch_ns();
            let npl = measured.npl.clone();
            apply_change(cluster, arm, measured, &npl, kp_i, kp_n)?;
            if arm == 'E' {
                // As I and N (whose partial syncs run to completion above): the next change
                // only once this one is in the maps, so changes never overlap at large N.
                cluster.agent()?.wait_line(
                    from,
                    "sync complete",
                    "map_writes",
                    Duration::from_secs(120),
                )?;
            }
            changes.push((t0, current as i64, next as i64));
            current = next;
            sleep(interval)?;
        }
        sleep(Duration::from_millis(300))?;
        drop(stdin);
        let out = watcher.wait_output()?;
        let json: serde_json::Value = serde_json::from_slice(&out).context("watch output")?;
        let segments: Vec<(i64, u64, u64)> = json["segments"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|s| Some((s[0].as_i64()?, s[1].as_u64()?, s[2].as_u64()?)))
            .collect();
        let label = arm_label(arm);
        for (k, &(t0, old, new)) in changes.iter().enumerate() {
            let t_next = changes.get(k + 1).map_or(u64::MAX, |c| c.0);
            let first_new = segments
                .iter()
                .filter(|s| s.0 == new && s.2 >= t0 && s.1 < t_next)
                .map(|s| s.1.max(t0))
                .min();
            let last_old = segments
                .iter()
                .filter(|s| s.0 == old && s.2 >= t0 && s.1 < t_next)
                .map(|s| s.2)
                .max();
            if let Some(t) = first_new {
                res.add(
                    "5",
                    "first connection on new backend",
                    n,
                    label,
                    (t - t0) as f64 / 1e6,
                );
            }
            res.add(
                "5",
                "last connection on removed backend",
                n,
                label,
                last_old.map_or(0.0, |t| t.saturating_sub(t0) as f64 / 1e6),
            );
        }
        let firsts = res.samples_of("5", "first connection on new backend", n, label);
        let lasts = res.samples_of("5", "last connection on removed backend", n, label);
        let (p50, p99) = (percentile(&firsts, 0.5), percentile(&firsts, 0.99));
        res.unit("5", "first connection on new backend, p50", "ms", None);
        res.unit("5", "first connection on new backend, p99", "ms", None);
        res.add("5", "first connection on new backend, p50", n, label, p50);
        res.add("5", "first connection on new backend, p99", n, label, p99);
        res.unit("5", "last connection on removed backend, p99", "ms", None);
        res.add(
            "5",
            "last connection on removed backend, p99",
            n,
            label,
            percentile(&lasts, 0.99),
        );
        res.unit("5", "changes seen", "count", None);
        res.add("5", "changes seen", n, label, firsts.len() as f64);
        println!(
            "bench:   {label}: first connection on the new backend p50 {p50:.2} ms p99 {p99:.2} ms ({} of {} changes seen)",
            firsts.len(),
            changes.len()
        );
    }
    Ok(())
}

fn percentile(values: &[f64], p: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * p).round() as usize]
}
