//! Per-service counters the programs keep in a per-CPU map (no atomics on the connect path);
//! the agent creates and removes the entries with the services and sums the CPUs on read.
use std::collections::BTreeMap;

use anyhow::Context as _;
use aya::{
    Ebpf,
    maps::{MapData, PerCpuHashMap, PerCpuValues},
    util::nr_cpus,
};
use lb_common::{ServiceStats, map_names};

pub struct ServiceStatsMap {
    map: PerCpuHashMap<MapData, u32, ServiceStats>,
    cpus: usize,
}

impl ServiceStatsMap {
    pub fn take(ebpf: &mut Ebpf) -> anyhow::Result<Self> {
        Ok(Self {
            map: PerCpuHashMap::try_from(super::maps::take_map(
                ebpf,
                map_names::SERVICE_STATS_V4,
            )?)?,
            cpus: nr_cpus()
                .map_err(|(_, e)| e)
                .context("counting possible CPUs")?,
        })
    }

    /// Adds a zeroed entry for each new service id and removes the entries of removed ones
    /// (an id already present, left by an earlier agent, keeps its counts).
    pub fn track(&mut self, added: &[u32], removed: &[u32]) -> anyhow::Result<()> {
        for gone in removed {
            // Already gone is fine: nothing to count for it.
            let _ = self.map.remove(gone);
        }
        for new in added {
            if self.map.get(new, 0).is_ok() {
                continue;
            }
            let zero = PerCpuValues::try_from(vec![ServiceStats::default(); self.cpus])?;
            self.map.insert(*new, zero, 0)?;
        }
        Ok(())
    }

    /// Removes the entries of every id not in `keep` (services an earlier agent programmed
    /// that are gone now).
    pub fn retain(&mut self, keep: &std::collections::BTreeSet<u32>) -> anyhow::Result<()> {
        let stale: Vec<u32> = self
            .map
            .keys()
            .filter_map(Result::ok)
            .filter(|id| !keep.contains(id))
            .collect();
        for id in stale {
            let _ = self.map.remove(&id);
        }
        Ok(())
    }

    /// The counters of every service, summed over CPUs.
    pub fn read(&self) -> BTreeMap<u32, ServiceStats> {
        self.map
            .iter()
            .filter_map(Result::ok)
            .map(|(id, per_cpu)| {
                let total = per_cpu
                    .iter()
                    .fold(ServiceStats::default(), |sum, cpu| ServiceStats {
                        forwarded: sum.forwarded + cpu.forwarded,
                        refused: sum.refused + cpu.refused,
                    });
                (id, total)
            })
            .collect()
    }
}
