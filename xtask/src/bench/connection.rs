//! Benchmarks 1 (connection cost: TCP_CRR rate, p50, p99; TCP_RR), 2 (UDP request/reply) and
//! 3 (hook cost: run_time_ns / run_cnt of each socket program), measured in the same runs.

use anyhow::Result;

use super::arms::{arm_target, client_args};
use super::cluster::Cluster;
use super::report::Results;
use super::{Plan, bpf, check_interrupted};

pub fn connection_cost(
    cluster: &mut Cluster,
    n: usize,
    plan: &Plan,
    res: &mut Results,
    arms: &[&str],
) -> Result<()> {
    let progs = bpf::cgroup_programs(cluster.cgroup.path()).unwrap_or_default();
    // Warm-up: one short run per arm (ARP, caches).
    for arm in arms {
        let (c, t) = arm_target(cluster, arm);
        cluster.client_json(c, &client_args("crr", &t, 100, &[]))?;
    }
    for round in 0..plan.rounds {
        for k in 0..arms.len() {
            check_interrupted()?;
            let arm = arms[(k + round) % arms.len()];
            let (c, targets) = arm_target(cluster, arm);
            let before: Vec<(u64, u64)> = if arm == "E" {
                progs
                    .iter()
                    .map(|p| bpf::prog_stats(p.0).unwrap_or((0, 0)))
                    .collect()
            } else {
                Vec::new()
            };
            let crr = cluster.client_json(c, &client_args("crr", &targets, plan.dur_ms, &[]))?;
            if arm == "E" {
                for (p, (t0, c0)) in progs.iter().zip(before) {
                    let (t1, c1) = bpf::prog_stats(p.0).unwrap_or((0, 0));
                    if c1 > c0 {
                        res.unit("3", &format!("{} ({})", p.2, p.1), "ns/run", None);
                        res.add(
                            "3",
                            &format!("{} ({})", p.2, p.1),
                            n,
                            "E",
                            (t1 - t0) as f64 / (c1 - c0) as f64,
                        );
                    }
                }
            }
            let f = |k: &str| crr[k].as_f64().unwrap_or(f64::NAN);
            res.add("1", "CRR rate", n, arm, f("rate"));
            res.add("1", "CRR p50", n, arm, f("p50_us"));
            res.add("1", "CRR p99", n, arm, f("p99_us"));
            res.add("1", "CRR errors", n, arm, f("errors"));
            let rr = cluster.client_json(c, &client_args("rr", &targets[..1], plan.dur_ms, &[]))?;
            let f = |k: &str| rr[k].as_f64().unwrap_or(f64::NAN);
            res.add("1", "RR rate", n, arm, f("rate"));
            res.add("1", "RR p50", n, arm, f("p50_us"));
            res.add("1", "RR p99", n, arm, f("p99_us"));
            if arm == "I-rand" {
                continue; // UDP: the measured UDP port is the last one
            }
            // UDP to the same port number on the backends (D) or the ClusterIP.
            let udp_before: Vec<(u64, u64)> = if arm == "E" {
                progs
                    .iter()
                    .map(|p| bpf::prog_stats(p.0).unwrap_or((0, 0)))
                    .collect()
            } else {
                Vec::new()
            };
            let udp_dur = (plan.dur_ms / 2).max(100);
            for (mode, extra) in [("connected", vec!["--connected"]), ("unconnected", vec![])] {
                let u =
                    cluster.client_json(c, &client_args("udp", &targets[..1], udp_dur, &extra))?;
                res.add(
                    "2",
                    &format!("UDP {mode} rate"),
                    n,
                    arm,
                    u["rate"].as_f64().unwrap_or(f64::NAN),
                );
                res.add(
                    "2",
                    &format!("UDP {mode} p50"),
                    n,
                    arm,
                    u["p50_us"].as_f64().unwrap_or(f64::NAN),
                );
            }
            // The UDP hooks (sendmsg4, recvmsg4, ...) over this round's UDP runs of arm E.
            for (p, (t0, c0)) in progs.iter().zip(udp_before) {
                let (t1, c1) = bpf::prog_stats(p.0).unwrap_or((0, 0));
                if c1 > c0 && p.1 != "cgroup_inet4_connect" {
                    let metric = format!("{} ({}), during UDP", p.2, p.1);
                    res.unit("3", &metric, "ns/run", None);
                    res.add("3", &metric, n, "E", (t1 - t0) as f64 / (c1 - c0) as f64);
                }
            }
        }
        let crr = |arm| res.median_of("1", "CRR rate", n, arm).unwrap_or(f64::NAN);
        println!(
            "bench:   round {round}: CRR/s D {:.0} E {:.0} I {:.0} I-rand {:.0} N {:.0}",
            crr("D"),
            crr("E"),
            crr("I"),
            crr("I-rand"),
            crr("N")
        );
    }
    // Hook cost next to the latency difference E − D (benchmark 3).
    if let (Some(e), Some(d)) = (
        res.median_of("1", "CRR p50", n, "E"),
        res.median_of("1", "CRR p50", n, "D"),
    ) {
        res.unit("3", "CRR p50 latency E − D", "ns", None);
        res.add("3", "CRR p50 latency E − D", n, "E", (e - d) * 1000.0);
    }
    Ok(())
}
