//! Benchmarks 4 (programming time: all services from nothing, one endpoint change; the agent
//! against full and partial iptables-restore and nft; the agent's bpf() syscalls) and 8 (the
//! agent's memory and CPU, map memory).

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};

use super::cluster::{self, BACKENDS, Cluster, field};
use super::kube::{self, Svc};
use super::report::Results;
use super::services::{
    KubeProxyState, Measured, iptables_flush, iptables_restore, nft_flush, nft_load,
};
use super::{Plan, bpf, check_interrupted};

/// CPU time (utime + stime, ms) of a process.
fn cpu_ms(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<u64> = rest
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    // After the comm: state is index 0, utime 11, stime 12.
    let ticks = f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    ticks as f64 * 1000.0 / hz
}

pub fn status_kb(pid: u32, key: &str) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| {
            v.trim_start_matches(':')
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or(0.0)
}

/// Writes `file` (atomically) and waits for the agent's next "sync complete": (wall ms from
/// the rename to the log line, sync_us, map_writes).
fn agent_apply(cluster: &mut Cluster, file: &str, text: Option<&str>) -> Result<(f64, f64, f64)> {
    let from = cluster.agent()?.lines();
    let target = cluster.manifests.0.join(file);
    let t0 = match text {
        Some(text) => {
            let tmp = cluster.work.0.join(format!(".{file}.tmp"));
            std::fs::write(&tmp, text)?;
            let t0 = Instant::now();
            std::fs::rename(&tmp, &target)?;
            t0
        }
        None => {
            let t0 = Instant::now();
            std::fs::remove_file(&target)?;
            t0
        }
    };
    let (_, line) = cluster.agent()?.wait_line(
        from,
        "sync complete",
        "map_writes",
        Duration::from_secs(900),
    )?;
    let wall = t0.elapsed().as_secs_f64() * 1000.0;
    let sync_us = field(&line, "sync_us").unwrap_or(0) as f64;
    let writes = field(&line, "map_writes").unwrap_or(0) as f64;
    Ok((wall, sync_us / 1000.0, writes))
}

/// Benchmarks 4 and 8.
#[allow(clippy::too_many_arguments)]
pub fn programming(
    cluster: &mut Cluster,
    n: usize,
    plan: &Plan,
    res: &mut Results,
    background: &[Svc],
    measured: &mut Measured,
    bg_manifest: &str,
) -> Result<()> {
    let all = measured.all(background, n);
    let ipt_on = n <= plan.iptables_max;
    let full_ipt = if ipt_on {
        kube::iptables_full(&all)
    } else {
        String::new()
    };
    let nft_on = n <= plan.nft_max;
    let full_nft = if nft_on {
        kube::nft_full(&all)
    } else {
        String::new()
    };
    let mut kp = KubeProxyState { services: all };
    let prog = lb_testkit::Netns::new("lbprg")?;
    let backends = cluster.backend_ips();
    let pid = cluster.agent()?.pid();
    let rss_before = status_kb(pid, "VmRSS");
    let mut toggle = 0usize;
    // Large N: fewer from-nothing rounds (an iptables-restore of 50,000 services takes long).
    let full_rounds = if n >= 50_000 {
        plan.rounds.min(3)
    } else {
        plan.rounds
    };
    for round in 0..full_rounds {
        check_interrupted()?;
        // All N from nothing: agent, iptables (full restore into an empty nat table), nft.
        if round > 0 {
            let (ms, _, _) = agent_apply(cluster, "services.json", None)?;
            res.add("4", "remove all services", n, "E", ms);
            iptables_flush(&prog)?;
            nft_flush(&prog);
        }
        let cpu0 = cpu_ms(pid);
        let (ms, sync_ms, writes) = agent_apply(cluster, "services.json", Some(bg_manifest))?;
        let cpu = cpu_ms(pid) - cpu0;
        res.add("4", "all services from nothing", n, "E", ms);
        res.add("4", "agent sync_us, from nothing", n, "E", sync_ms);
        res.add("4", "agent map_writes, from nothing", n, "E", writes);
        res.add("8", "agent CPU for a full sync", n, "E", cpu);
        let ipt = if ipt_on {
            let ipt = iptables_restore(cluster, &prog, &full_ipt)?;
            res.add(
                "4",
                "all services from nothing",
                n,
                "I",
                ipt.as_secs_f64() * 1000.0,
            );
            ipt
        } else {
            Duration::ZERO
        };
        let nft = if nft_on {
            let nft = nft_load(cluster, &prog, &full_nft)?;
            res.add(
                "4",
                "all services from nothing",
                n,
                "N",
                nft.as_secs_f64() * 1000.0,
            );
            nft
        } else {
            Duration::ZERO
        };
        println!(
            "bench:   round {round}: from nothing: agent {ms:.1} ms (sync {sync_ms:.1} ms, {writes} writes), iptables-restore {ipt:.1?}, nft {}",
            if nft_on {
                format!("{nft:.1?}")
            } else {
                "left out".to_string()
            }
        );
        // One endpoint change beside N: measure-rand loses or regains its last endpoint.
        for _ in 0..plan.toggles {
            check_interrupted()?;
            toggle += 1;
            measured.rand.endpoints = if toggle % 2 == 1 {
                backends[..BACKENDS - 1].to_vec()
            } else {
                backends.to_vec()
            };
            let (ms, sync_ms, writes) =
                agent_apply(cluster, "measured.json", Some(&measured.manifest()))?;
            res.add("4", "one endpoint change", n, "E", ms);
            res.add("4", "agent sync_us, one change", n, "E", sync_ms);
            res.add("4", "agent map_writes, one change", n, "E", writes);
            let old = kp.replace(&measured.rand);
            if ipt_on {
                let partial = kube::iptables_partial(&kp.services, &measured.rand, &old);
                let ipt = iptables_restore(cluster, &prog, &partial)?;
                res.add(
                    "4",
                    "one endpoint change",
                    n,
                    "I",
                    ipt.as_secs_f64() * 1000.0,
                );
            }
            if !nft_on {
                continue;
            }
            let nft = nft_load(cluster, &prog, &kube::nft_partial(&measured.rand, &old))?;
            res.add(
                "4",
                "one endpoint change",
                n,
                "N",
                nft.as_secs_f64() * 1000.0,
            );
        }
        // Even toggles: measure-rand is back at its 10 endpoints.
    }
    // Memory (benchmark 8), after the full state is in.
    let hwm = status_kb(pid, "VmHWM");
    let rss = status_kb(pid, "VmRSS");
    res.add("8", "agent VmHWM", n, "E", hwm / 1024.0);
    res.add("8", "agent VmRSS", n, "E", rss / 1024.0);
    res.add(
        "8",
        "agent VmRSS growth over idle",
        n,
        "E",
        (rss - rss_before) / 1024.0,
    );
    let maps = bpf::pinned_maps(&cluster.bpffs.0);
    let total: u64 = maps.values().map(|(m, _)| m).sum();
    let services = (n + 4) as f64;
    res.add(
        "8",
        "map memory (memlock, all maps)",
        n,
        "E",
        total as f64 / 1048576.0,
    );
    res.add(
        "8",
        "map memory per service",
        n,
        "E",
        total as f64 / services,
    );
    res.add(
        "8",
        "map memory per endpoint",
        n,
        "E",
        total as f64 / (services * 10.0),
    );
    for (name, (mem, max)) in &maps {
        res.unit("8", &format!("map {name} (max_entries {max})"), "MiB", None);
        res.add(
            "8",
            &format!("map {name} (max_entries {max})"),
            n,
            "E",
            *mem as f64 / 1048576.0,
        );
    }

    // bpf() syscalls of one full sync and one change (strace attached; not timed).
    let (counts_full, counts_change) = {
        agent_apply(cluster, "services.json", None)?;
        let full = strace_bpf(cluster, |c| {
            agent_apply(c, "services.json", Some(bg_manifest)).map(|_| ())
        })?;
        toggle += 1;
        measured.rand.endpoints = backends[..BACKENDS - 1].to_vec();
        let manifest = measured.manifest();
        let change = strace_bpf(cluster, |c| {
            agent_apply(c, "measured.json", Some(&manifest)).map(|_| ())
        })?;
        measured.rand.endpoints = backends.to_vec();
        agent_apply(cluster, "measured.json", Some(&measured.manifest()))?;
        (full, change)
    };
    let _ = toggle;
    res.add(
        "4",
        "agent bpf() syscalls, from nothing",
        n,
        "E",
        counts_full.values().sum::<u64>() as f64,
    );
    res.add(
        "4",
        "agent bpf() syscalls, one change",
        n,
        "E",
        counts_change.values().sum::<u64>() as f64,
    );
    println!("bench:   bpf() syscalls: full sync {counts_full:?}; one change {counts_change:?}");
    Ok(())
}

/// Attaches strace to every thread of the agent, runs `f`, detaches: bpf() calls by command.
fn strace_bpf(
    cluster: &mut Cluster,
    f: impl FnOnce(&mut Cluster) -> Result<()>,
) -> Result<BTreeMap<String, u64>> {
    let pid = cluster.agent()?.pid();
    let out = cluster.work.0.join("strace.txt");
    let mut cmd = Command::new("strace");
    cmd.args(["-f", "-qq", "-e", "trace=bpf", "-o"]).arg(&out);
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))?.flatten() {
        cmd.arg("-p").arg(task.file_name());
    }
    let mut strace = cluster::Proc(
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting strace")?,
    );
    // Until strace is attached: the agent's TracerPid is set.
    let deadline = Instant::now() + Duration::from_secs(5);
    while status_kb(pid, "TracerPid") == 0.0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(200));
    let result = f(cluster);
    // SAFETY: our own child; SIGINT makes strace detach and flush.
    unsafe { libc::kill(strace.0.id() as i32, libc::SIGINT) };
    let _ = strace.0.wait();
    result?;
    let text = std::fs::read_to_string(&out).unwrap_or_default();
    let mut counts = BTreeMap::new();
    for line in text.lines() {
        if let Some(at) = line.find("bpf(") {
            let cmd: String = line[at + 4..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            *counts.entry(cmd).or_insert(0) += 1;
        }
    }
    Ok(counts)
}
