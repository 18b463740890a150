//! A warning in the log when XDP or tc drop packets for want of room: no free SNAT port, a
//! full flow table, no SNAT address, a failed rewrite. Those drops are counted per packet
//! (`lb_datapath_packets_total`); this looks at the counters every `PERIOD` and logs what grew,
//! so a flood costs one line per period, not one per packet. Drops that are policy (eTP Local
//! without a local endpoint, `loadBalancerSourceRanges`) are not warned about.
use std::{collections::BTreeMap, path::PathBuf, time::Duration};

use lb_common::reasons;

use crate::dataplane::reasons::ReasonCounters;

/// How often the counters are looked at (and so at most how often a reason is warned about).
pub const PERIOD: Duration = Duration::from_secs(30);

/// The reasons that mean the data path ran out of something.
pub const WARNED: [u32; 4] = [
    reasons::XDP_DROPPED_NO_SNAT_PORT,
    reasons::XDP_DROPPED_FLOW_TABLE_FULL,
    reasons::XDP_DROPPED_NO_SNAT_ADDRESS,
    reasons::TC_DROPPED_REWRITE_FAILED,
];

/// What grew between two readings (reason → count), of the warned reasons.
pub fn grown(before: &BTreeMap<u32, u64>, now: &BTreeMap<u32, u64>) -> Vec<(u32, u64)> {
    WARNED
        .iter()
        .filter_map(|reason| {
            let delta = now
                .get(reason)
                .copied()
                .unwrap_or(0)
                .saturating_sub(before.get(reason).copied().unwrap_or(0));
            (delta > 0).then_some((*reason, delta))
        })
        .collect()
}

fn reading(counters: &ReasonCounters) -> BTreeMap<u32, u64> {
    let read = counters.read();
    (0..reasons::COUNT)
        .filter_map(|reason| {
            let (program, name) = reasons::name(reason)?;
            let count = read
                .iter()
                .find(|c| c.program == program && c.reason == name)?;
            Some((reason, count.packets))
        })
        .collect()
}

/// Watches the counters pinned in `maps` until the agent stops.
pub async fn warn_on_drops(maps: PathBuf) {
    let counters = match ReasonCounters::open_pinned(&maps) {
        Ok(counters) => counters,
        Err(error) => {
            tracing::warn!(error = %format!("{error:#}"), "not watching the data path's drops");
            return;
        }
    };
    let mut before = reading(&counters);
    let mut ticks = tokio::time::interval(PERIOD);
    ticks.tick().await;
    loop {
        ticks.tick().await;
        let now = reading(&counters);
        for (reason, packets) in grown(&before, &now) {
            let (program, name) = reasons::name(reason).unwrap_or(("?", "?"));
            tracing::warn!(
                program,
                reason = name,
                packets,
                period_s = PERIOD.as_secs(),
                "packets dropped for want of room (lb_datapath_packets_total)"
            );
        }
        before = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_exhaustion_that_grew_is_warned_about() {
        let before = BTreeMap::from([
            (reasons::XDP_DROPPED_NO_SNAT_PORT, 5),
            (reasons::XDP_DROPPED_SOURCE_RANGE, 1),
        ]);
        let now = BTreeMap::from([
            (reasons::XDP_DROPPED_NO_SNAT_PORT, 12),
            (reasons::XDP_DROPPED_SOURCE_RANGE, 900),
            (reasons::TC_DROPPED_REWRITE_FAILED, 0),
        ]);
        assert_eq!(
            grown(&before, &now),
            vec![(reasons::XDP_DROPPED_NO_SNAT_PORT, 7)]
        );
        assert!(grown(&now, &now).is_empty());
    }
}
