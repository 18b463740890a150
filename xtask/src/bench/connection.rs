//! Benchmarks 1 (connection cost: TCP_CRR rate, p50, p99; TCP_RR), 2 (UDP request/reply) and
//! 3 (hook cost: run_time_ns / run_cnt of each socket program), measured in the same runs.
//!
//! The IPv6 arms (D6, E6: see `arms::IPV6_ARMS`) are measured in the same rounds as the others,
//! as rows of their own (`IPv6 CRR rate`, ratio to D6). An IPv6 arm whose warm-up gets no answer
//! at all (an agent without IPv6 ClusterIPs) is left out at that N, said on the console, as arms
//! I and N are above their limits.

use anyhow::Result;

use super::arms::{IPV6_ARMS, arm_target, client_args, metric_of};
use super::cluster::Cluster;
use super::report::Results;
use super::{Plan, bpf, check_interrupted};

/// The arms whose client runs in the agent's cgroup: their runs measure the hooks too.
fn is_ours(arm: &str) -> bool {
    matches!(arm, "E" | "E6")
}

/// A hook-cost metric of benchmark 3 for `arm`'s runs (`…, IPv6` for E6's).
fn hook_metric(arm: &str, program: &str, attach: &str, during: &str) -> String {
    let family = if IPV6_ARMS.contains(&arm) {
        ", IPv6"
    } else {
        ""
    };
    format!("{program} ({attach}){during}{family}")
}

pub fn connection_cost(
    cluster: &mut Cluster,
    n: usize,
    plan: &Plan,
    res: &mut Results,
    arms: &[&str],
) -> Result<()> {
    let progs = bpf::cgroup_programs(cluster.cgroup.path()).unwrap_or_default();
    let stats_now = || -> Vec<(u64, u64)> {
        progs
            .iter()
            .map(|p| bpf::prog_stats(p.0).unwrap_or((0, 0)))
            .collect()
    };
    // Warm-up: one short run per arm (ARP and neighbour discovery, caches); an IPv6 arm that
    // gets no answer is left out.
    let mut measured_arms = Vec::new();
    for &arm in arms {
        let (c, t) = arm_target(cluster, arm);
        let warm = cluster.client_json(c, &client_args("crr", &t, 100, &[]))?;
        if IPV6_ARMS.contains(&arm) && warm["ok"].as_u64().unwrap_or(0) == 0 {
            println!(
                "bench:   arm {arm} left out at N = {n}: no answer from {t:?} ({})",
                warm["first_error"].as_str().unwrap_or("no error recorded")
            );
            continue;
        }
        measured_arms.push(arm);
    }
    let arms = measured_arms;
    for round in 0..plan.rounds {
        for k in 0..arms.len() {
            check_interrupted()?;
            let arm = arms[(k + round) % arms.len()];
            let (c, targets) = arm_target(cluster, arm);
            let before = if is_ours(arm) {
                stats_now()
            } else {
                Vec::new()
            };
            let crr = cluster.client_json(c, &client_args("crr", &targets, plan.dur_ms, &[]))?;
            for (p, (t0, c0)) in progs.iter().zip(before) {
                let (t1, c1) = bpf::prog_stats(p.0).unwrap_or((0, 0));
                if c1 > c0 {
                    let metric = hook_metric(arm, &p.2, &p.1, "");
                    res.unit("3", &metric, "ns/run", None);
                    res.add("3", &metric, n, "E", (t1 - t0) as f64 / (c1 - c0) as f64);
                }
            }
            let f = |k: &str| crr[k].as_f64().unwrap_or(f64::NAN);
            res.add("1", &metric_of(arm, "CRR rate"), n, arm, f("rate"));
            res.add("1", &metric_of(arm, "CRR p50"), n, arm, f("p50_us"));
            res.add("1", &metric_of(arm, "CRR p99"), n, arm, f("p99_us"));
            res.add("1", &metric_of(arm, "CRR errors"), n, arm, f("errors"));
            let rr = cluster.client_json(c, &client_args("rr", &targets[..1], plan.dur_ms, &[]))?;
            let f = |k: &str| rr[k].as_f64().unwrap_or(f64::NAN);
            res.add("1", &metric_of(arm, "RR rate"), n, arm, f("rate"));
            res.add("1", &metric_of(arm, "RR p50"), n, arm, f("p50_us"));
            res.add("1", &metric_of(arm, "RR p99"), n, arm, f("p99_us"));
            if arm == "I-rand" {
                continue; // UDP: the measured UDP port is the last one
            }
            // UDP to the same port number on the backends (D, D6) or the ClusterIP.
            let udp_before = if is_ours(arm) {
                stats_now()
            } else {
                Vec::new()
            };
            let udp_dur = (plan.dur_ms / 2).max(100);
            for (mode, extra) in [("connected", vec!["--connected"]), ("unconnected", vec![])] {
                let u =
                    cluster.client_json(c, &client_args("udp", &targets[..1], udp_dur, &extra))?;
                let f = |k: &str| u[k].as_f64().unwrap_or(f64::NAN);
                let metric = |what: &str| metric_of(arm, &format!("UDP {mode} {what}"));
                res.add("2", &metric("rate"), n, arm, f("rate"));
                res.add("2", &metric("p50"), n, arm, f("p50_us"));
            }
            // The UDP hooks (sendmsg, recvmsg, ...) over this round's UDP runs of arm E (E6).
            for (p, (t0, c0)) in progs.iter().zip(udp_before) {
                let (t1, c1) = bpf::prog_stats(p.0).unwrap_or((0, 0));
                if c1 > c0 && !p.1.ends_with("_connect") {
                    let metric = hook_metric(arm, &p.2, &p.1, ", during UDP");
                    res.unit("3", &metric, "ns/run", None);
                    res.add("3", &metric, n, "E", (t1 - t0) as f64 / (c1 - c0) as f64);
                }
            }
        }
        let crr = |arm: &str| {
            res.median_of("1", &metric_of(arm, "CRR rate"), n, arm)
                .unwrap_or(f64::NAN)
        };
        println!(
            "bench:   round {round}: CRR/s D {:.0} E {:.0} I {:.0} I-rand {:.0} N {:.0} D6 {:.0} E6 {:.0}",
            crr("D"),
            crr("E"),
            crr("I"),
            crr("I-rand"),
            crr("N"),
            crr("D6"),
            crr("E6")
        );
    }
    // Hook cost next to the latency difference E − D (benchmark 3), and E6 − D6.
    for (ours, direct) in [("E", "D"), ("E6", "D6")] {
        let p50 = |arm: &str| res.median_of("1", &metric_of(arm, "CRR p50"), n, arm);
        if let (Some(e), Some(d)) = (p50(ours), p50(direct)) {
            let metric = format!("CRR p50 latency {ours} − {direct}");
            res.unit("3", &metric, "ns", None);
            res.add("3", &metric, n, "E", (e - d) * 1000.0);
        }
    }
    Ok(())
}
