//! The machine the benchmark runs on, as the report describes it.

use std::process::Command;

use super::ipt;
use crate::cmd;

pub struct Machine {
    pub kernel: String,
    cpu: String,
    cpus: usize,
    mem_gib: f64,
    iptables: String,
    pub iptables_backend: String,
    nft: String,
    load: String,
    profile: String,
}

impl Machine {
    pub fn probe(profile: &str) -> Machine {
        let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
        let cpuinfo = read("/proc/cpuinfo");
        let cpu = cpuinfo
            .lines()
            .find_map(|l| {
                l.strip_prefix("model name")
                    .map(|r| r.trim_start_matches([' ', '\t', ':']).to_string())
            })
            .unwrap_or_default();
        let cpus = cpuinfo
            .lines()
            .filter(|l| l.starts_with("processor"))
            .count();
        let mem_kb: f64 = read("/proc/meminfo")
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0.0);
        let iptables = cmd::output(Command::new(ipt()).arg("-V"))
            .unwrap_or_default()
            .trim()
            .to_string();
        let iptables_backend = if iptables.contains("nf_tables") {
            "nf_tables"
        } else {
            "legacy"
        }
        .to_string();
        let nft = cmd::output(Command::new("nft").arg("--version"))
            .unwrap_or_default()
            .trim()
            .to_string();
        Machine {
            kernel: read("/proc/sys/kernel/osrelease").trim().to_string(),
            cpu,
            cpus,
            mem_gib: mem_kb / 1024.0 / 1024.0,
            iptables,
            iptables_backend,
            nft,
            load: read("/proc/loadavg")
                .split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" "),
            profile: profile.into(),
        }
    }

    pub fn describe(&self) -> String {
        format!(
            "Linux {}, {} × {}, {:.0} GiB, {}, {}, load average at start {}, agent built {}",
            self.kernel,
            self.cpus,
            self.cpu,
            self.mem_gib,
            self.iptables,
            self.nft,
            self.load,
            self.profile
        )
    }
}
