//! Benchmark 6: churn under load, CRR while the measured service's endpoints change: failed
//! connections, p99 (and over the idle run's), rate, changes applied, and the agent's CPU.

use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};

use super::arms::{apply_change, arm_label, arm_target, client_args};
use super::cluster::{self, BACKENDS, Cluster};
use super::process::{cpu_ms, wait_idle};
use super::report::Results;
use super::services::{KubeProxyState, Measured};
use super::{Plan, check_interrupted};

/// Changes per second asked of each arm; 0 is the idle run the others are compared with.
const RATES: [u64; 3] = [0, 10, 100];

/// The metric of a run's CRR p99 over the idle run's, in the same round.
pub fn p99_over_idle(rate: u64) -> String {
    format!("CRR p99, {rate} changes/s ÷ idle")
}

/// Benchmark 6 at `n`: the agent's arm at every N, kube-proxy's at `--latency-n`.
#[allow(clippy::too_many_arguments)]
pub fn churn(
    cluster: &mut Cluster,
    n: usize,
    plan: &Plan,
    res: &mut Results,
    measured: &mut Measured,
    kp_i: &mut KubeProxyState,
    kp_n: &mut KubeProxyState,
) -> Result<()> {
    println!("bench:   churn under load");
    let backends = cluster.backend_ips();
    for rate in RATES {
        for m in [
            "failed connections",
            "CRR p99",
            "CRR rate",
            "changes applied",
            "agent CPU",
        ] {
            let unit = match m {
                "CRR p99" => "µs",
                "CRR rate" => "conn/s",
                "agent CPU" => "% of one core",
                _ => "count",
            };
            res.unit("6", &format!("{m}, {rate} changes/s"), unit, None);
        }
        if rate > 0 {
            res.unit("6", &p99_over_idle(rate), "ratio", None);
        }
    }
    let mut toggle = 0usize;
    let arms = plan.latency_arms(n);
    let pid = cluster.agent()?.pid();
    for round in 0..plan.rounds {
        for k in 0..arms.len() {
            let arm = arms[(k + round) % arms.len()];
            let mut idle_p99 = f64::NAN;
            for rate in RATES {
                check_interrupted()?;
                let (c, targets) = arm_target(cluster, arm_label(arm));
                let args = client_args("crr", &targets, plan.churn_ms, &[]);
                let client = cluster::Proc(cluster.client_cmd(c, &args)?.spawn()?);
                let cpu0 = cpu_ms(pid);
                let start = Instant::now();
                let mut applied = 0u64;
                if let Some(micros) = 1_000_000u64.checked_div(rate) {
                    let period = Duration::from_micros(micros);
                    let mut next = start;
                    while start.elapsed() < Duration::from_millis(plan.churn_ms) {
                        check_interrupted()?;
                        toggle += 1;
                        measured.last_tcp.endpoints = if toggle % 2 == 1 {
                            backends[..BACKENDS - 1].to_vec()
                        } else {
                            backends.to_vec()
                        };
                        measured.last_udp.endpoints = measured.last_tcp.endpoints.clone();
                        let changed = measured.last_tcp.clone();
                        apply_change(cluster, arm, measured, &changed, kp_i, kp_n)?;
                        applied += 1;
                        next += period;
                        let now = Instant::now();
                        if next > now {
                            std::thread::sleep(next - now);
                        }
                    }
                }
                let out = client.wait_output()?;
                let cpu = (cpu_ms(pid) - cpu0) / start.elapsed().as_secs_f64() / 10.0;
                let json: serde_json::Value = serde_json::from_slice(&out).context("crr output")?;
                let label = arm_label(arm);
                let p99 = json["p99_us"].as_f64().unwrap_or(f64::NAN);
                if rate == 0 {
                    idle_p99 = p99;
                } else {
                    res.add("6", &p99_over_idle(rate), n, label, p99 / idle_p99);
                }
                if arm == 'E' {
                    // The agent's CPU over the client's run, in % of one core.
                    res.add("6", &format!("agent CPU, {rate} changes/s"), n, label, cpu);
                    // Done with the last change before the next run starts.
                    wait_idle(pid, Duration::from_secs(120))?;
                }
                res.add(
                    "6",
                    &format!("failed connections, {rate} changes/s"),
                    n,
                    label,
                    json["errors"].as_f64().unwrap_or(f64::NAN),
                );
                res.add("6", &format!("CRR p99, {rate} changes/s"), n, label, p99);
                res.add(
                    "6",
                    &format!("CRR rate, {rate} changes/s"),
                    n,
                    label,
                    json["rate"].as_f64().unwrap_or(f64::NAN),
                );
                res.add(
                    "6",
                    &format!("changes applied, {rate} changes/s"),
                    n,
                    label,
                    applied as f64,
                );
            }
        }
    }
    // Back to 10 endpoints everywhere.
    measured.last_tcp.endpoints = backends.to_vec();
    measured.last_udp.endpoints = backends.to_vec();
    for &arm in &arms {
        let changed = measured.last_tcp.clone();
        apply_change(cluster, arm, measured, &changed, kp_i, kp_n)?;
    }
    Ok(())
}
