//! Why the north-south programs dropped or passed packets (`lb_common::reasons`): per-CPU
//! counters in `LB4_REASONS_V1`, summed over CPUs on read. Read from the pin, so `/metrics`
//! and `lb-agent status` (with no agent running) read the same map the same way.
use std::path::Path;

use anyhow::Context as _;
use aya::maps::{Map, MapData, PerCpuArray};
use lb_common::{map_names, reasons};
use serde::Serialize;

/// One reason's count, summed over CPUs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ReasonCount {
    /// `xdp` or `tc`.
    pub program: &'static str,
    pub reason: &'static str,
    pub packets: u64,
}

pub struct ReasonCounters {
    map: PerCpuArray<MapData, u64>,
}

impl ReasonCounters {
    /// Opens the map pinned in the maps directory `dir`.
    pub fn open_pinned(dir: &Path) -> anyhow::Result<Self> {
        let path = dir.join(map_names::REASONS_V4);
        let data = MapData::from_pin(&path)
            .with_context(|| format!("opening pinned map {}", path.display()))?;
        Ok(Self {
            map: PerCpuArray::try_from(Map::PerCpuArray(data))?,
        })
    }

    /// Every reason with its count (zero included), in reason order. A reason the pinned map
    /// does not hold (an older, smaller map) reads as zero.
    pub fn read(&self) -> Vec<ReasonCount> {
        (0..reasons::COUNT)
            .filter_map(|reason| {
                let (program, name) = reasons::name(reason)?;
                let packets = self
                    .map
                    .get(&reason, 0)
                    .map(|per_cpu| per_cpu.iter().sum())
                    .unwrap_or(0);
                Some(ReasonCount {
                    program,
                    reason: name,
                    packets,
                })
            })
            .collect()
    }
}
