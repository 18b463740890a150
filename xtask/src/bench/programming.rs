//! Benchmarks 4 (programming time: all services from nothing, one endpoint change; the agent
//! against full and partial iptables-restore and nft; the agent's bpf() syscalls) and 8 (the
//! agent's memory and CPU, map memory).

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};

use super::cluster::{self, BACKENDS, Cluster, field};
use super::kube::{self, Svc};
use super::process::{cpu_ms, status_kb, wait_idle};
use super::report::Results;
use super::services::{
    KubeProxyState, Measured, iptables_flush, iptables_restore, nft_flush, nft_load,
};
use super::{Plan, bpf, check_interrupted, sleep};

/// What the agent's `sync complete` line says about one applied file, and the wall time.
pub struct Applied {
    /// From the rename (or removal) of the file to the log line, seen by the benchmark (ms).
    pub wall_ms: f64,
    /// The agent's sync pass (model update, diff, map writes): `sync_us`, in ms.
    pub sync_ms: f64,
    /// From the agent noticing the file's event to the end of the sync: `latency_us`, in ms
    /// (NaN when the line has no such field).
    pub latency_ms: f64,
    pub writes: f64,
    /// The agent's CPU time from just before the rename to `SETTLE` after the log line (ms).
    pub cpu_ms: f64,
    /// The wall time `cpu_ms` is over (ms).
    pub window_ms: f64,
}

/// After the `sync complete` line, how long the agent's CPU time keeps counting for the
/// change (the removed backends' sockets are terminated after the line).
const SETTLE: Duration = Duration::from_millis(50);

/// Writes `file` (atomically) and waits for the agent's next "sync complete".
pub fn agent_apply(cluster: &mut Cluster, file: &str, text: Option<&str>) -> Result<Applied> {
    let from = cluster.agent()?.lines();
    let pid = cluster.agent()?.pid();
    let target = cluster.manifests.0.join(file);
    let tmp = cluster.work.0.join(format!(".{file}.tmp"));
    if let Some(text) = text {
        std::fs::write(&tmp, text)?;
    }
    let cpu0 = cpu_ms(pid);
    let t0 = Instant::now();
    match text {
        Some(_) => std::fs::rename(&tmp, &target)?,
        None => std::fs::remove_file(&target)?,
    }
    let (_, line) = cluster.agent()?.wait_line(
        from,
        "sync complete",
        "map_writes",
        Duration::from_secs(900),
    )?;
    let wall_ms = t0.elapsed().as_secs_f64() * 1000.0;
    std::thread::sleep(SETTLE);
    let us = |key: &str| field(&line, key).map_or(f64::NAN, |v| v as f64 / 1000.0);
    Ok(Applied {
        wall_ms,
        sync_ms: us("sync_us"),
        latency_ms: us("latency_us"),
        writes: field(&line, "map_writes").map_or(f64::NAN, |v| v as f64),
        cpu_ms: cpu_ms(pid) - cpu0,
        window_ms: t0.elapsed().as_secs_f64() * 1000.0,
    })
}

/// The agent's CPU while it has nothing to do (no change, no traffic), in ms per second,
/// over `IDLE`, once it is idle: what one change's CPU figure has its share of subtracted.
fn idle_cpu(pid: u32) -> Result<f64> {
    /// The manifest source's poll period, so a periodic cost is in it once.
    const IDLE: Duration = Duration::from_secs(2);
    wait_idle(pid, Duration::from_secs(60))?;
    let (cpu0, t0) = (cpu_ms(pid), Instant::now());
    sleep(IDLE)?;
    Ok((cpu_ms(pid) - cpu0) / t0.elapsed().as_secs_f64())
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
    let ipt_on = plan.ipt_on(n);
    let full_ipt = if ipt_on {
        kube::iptables_full(&all)
    } else {
        String::new()
    };
    let nft_on = plan.nft_on(n);
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
    let mut idle = 0.0;
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
            let removed = agent_apply(cluster, "services.json", None)?;
            res.add("4", "remove all services", n, "E", removed.wall_ms);
            iptables_flush(&prog)?;
            nft_flush(&prog);
        }
        let full = agent_apply(cluster, "services.json", Some(bg_manifest))?;
        let (ms, sync_ms, writes) = (full.wall_ms, full.sync_ms, full.writes);
        res.add("4", "all services from nothing", n, "E", ms);
        res.add("4", "agent sync_us, from nothing", n, "E", sync_ms);
        res.add(
            "4",
            "agent latency_us, from nothing",
            n,
            "E",
            full.latency_ms,
        );
        res.add("4", "agent map_writes, from nothing", n, "E", writes);
        res.add("8", "agent CPU for a full sync", n, "E", full.cpu_ms);
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
            "bench:   round {round}: from nothing: agent {ms:.1} ms (sync {sync_ms:.1} ms, {writes} writes), iptables-restore {}, nft {}",
            if ipt_on {
                format!("{ipt:.1?}")
            } else {
                "left out".to_string()
            },
            if nft_on {
                format!("{nft:.1?}")
            } else {
                "left out".to_string()
            }
        );
        if round == 0 {
            idle = idle_cpu(pid)?;
            res.add("8", "agent CPU while idle", n, "E", idle / 10.0);
        }
        // One endpoint change beside N: measure-rand loses or regains its last endpoint.
        for _ in 0..plan.toggles {
            check_interrupted()?;
            toggle += 1;
            measured.rand.endpoints = if toggle % 2 == 1 {
                backends[..BACKENDS - 1].to_vec()
            } else {
                backends.to_vec()
            };
            let change = agent_apply(cluster, "measured.json", Some(&measured.manifest()))?;
            res.add("4", "one endpoint change", n, "E", change.wall_ms);
            res.add("4", "agent sync_us, one change", n, "E", change.sync_ms);
            res.add(
                "4",
                "agent latency_us, one change",
                n,
                "E",
                change.latency_ms,
            );
            res.add("4", "agent map_writes, one change", n, "E", change.writes);
            res.add(
                "8",
                "agent CPU for one endpoint change",
                n,
                "E",
                change.cpu_ms - idle * change.window_ms / 1000.0,
            );
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
    // (VmRSS with the N services − VmRSS with only the measured ones) / N.
    res.add(
        "8",
        "agent VmRSS growth per service",
        n,
        "E",
        (rss - rss_before) / n.max(1) as f64,
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
