//! The goals of issue 13 as rows: each goal's figure, taken from the benchmarks' rows at the N
//! the goal names (the largest N measured when the run has not that N, as with `--quick`),
//! against its target. They are the report's first table and rows of benchmark `goals` in the
//! JSON. A goal without a number fails the run (`bench::run`); a goal missed does not.

use std::fmt::Write as _;

use super::Plan;
use super::churn::p99_over_idle;
use super::report::{Results, Row, num};

/// The `benchmark` of the goals' rows.
pub const BENCHMARK: &str = "goals";

/// The N of the network programming and churn goals, and of the per-change, from-nothing and
/// memory goals.
const N_LATENCY: usize = 50_000;
const N_SCALE: usize = 100_000;
/// The N the network programming p99 is compared with.
const N_REFERENCE: usize = 1_000;

enum Target {
    Below(f64),
    AtMost(f64),
    Zero,
    /// Reported, without a target.
    None,
}

impl Target {
    fn text(&self, unit: &str) -> Option<String> {
        match self {
            Target::Below(x) => Some(format!("< {x} {unit}")),
            Target::AtMost(x) => Some(format!("≤ {x}{unit}")),
            Target::Zero => Some("0".into()),
            Target::None => None,
        }
    }

    fn met(&self, value: f64) -> Option<bool> {
        if !value.is_finite() {
            return None;
        }
        match self {
            Target::Below(x) => Some(value < *x),
            Target::AtMost(x) => Some(value <= *x),
            Target::Zero => Some(value == 0.0),
            Target::None => None,
        }
    }
}

struct Goals<'a> {
    res: &'a Results,
    plan: &'a Plan,
    rows: Vec<Row>,
    kernel: String,
    backend: String,
}

impl Goals<'_> {
    /// The N a goal naming `n` is read at: `n` when measured, else the largest N measured.
    fn at(&self, n: usize) -> Option<usize> {
        if self.plan.ns.contains(&n) {
            Some(n)
        } else {
            self.plan.ns.last().copied()
        }
    }

    /// The N the network programming p99 at `n` is compared with: 1,000, or the smallest N
    /// measured when the run has not 1,000 below `n`.
    fn reference(&self, n: usize) -> Option<usize> {
        if N_REFERENCE < n && self.plan.ns.contains(&N_REFERENCE) {
            return Some(N_REFERENCE);
        }
        self.plan.ns.first().copied().filter(|&r| r < n)
    }

    fn median(&self, bench: &str, metric: &str, n: usize) -> f64 {
        self.res
            .median_of(bench, metric, n, "E")
            .unwrap_or(f64::NAN)
    }

    fn push(&mut self, what: &str, n: usize, value: f64, unit: &str, target: Target) {
        self.rows.push(Row {
            benchmark: BENCHMARK.into(),
            metric: what.into(),
            arm: "E".into(),
            n,
            unit: unit.into(),
            median: value,
            min: value,
            max: value,
            samples: 1,
            ratio: None,
            baseline: None,
            kernel: self.kernel.clone(),
            iptables_backend: self.backend.clone(),
            target: target.text(unit),
            met: target.met(value),
        });
    }
}

/// The goals' rows for what `res` holds of the run `plan`.
pub fn evaluate(res: &Results, plan: &Plan, kernel: &str, backend: &str) -> Vec<Row> {
    let mut g = Goals {
        res,
        plan,
        rows: Vec::new(),
        kernel: kernel.into(),
        backend: backend.into(),
    };
    if let Some(n) = g.at(N_LATENCY) {
        let p99 = |g: &Goals, n: usize| g.median("5", "first connection on new backend, p99", n);
        let v = p99(&g, n);
        g.push(
            "network programming p99: manifest rename → first connection answered by the new pod",
            n,
            v,
            "ms",
            Target::Below(20.0),
        );
        if let Some(r) = g.reference(n) {
            let ratio = v / p99(&g, r);
            g.push(
                &format!("network programming p99 at N ÷ p99 at N = {r}"),
                n,
                ratio,
                "×",
                Target::AtMost(1.5),
            );
        }
    }
    if let Some(n) = g.at(N_SCALE) {
        for (what, bench, metric, unit, target) in [
            (
                "one endpoint change beside N: agent CPU (utime+stime, rename → 50 ms after the sync, less its idle CPU)",
                "8",
                "agent CPU for one endpoint change",
                "ms",
                1.0,
            ),
            (
                "one endpoint change beside N: file event → maps (agent's latency_us: event noticed → sync complete)",
                "4",
                "agent latency_us, one change",
                "ms",
                5.0,
            ),
            (
                "one endpoint change beside N: manifest rename → `sync complete` logged (wall, as the benchmark sees it)",
                "4",
                "one endpoint change",
                "ms",
                5.0,
            ),
            (
                "all N × 10 endpoints from nothing: map writes (agent's sync_us: model, diff and map writes)",
                "4",
                "agent sync_us, from nothing",
                "ms",
                1000.0,
            ),
            (
                "all N × 10 endpoints from nothing: file event → maps (agent's latency_us)",
                "4",
                "agent latency_us, from nothing",
                "ms",
                3000.0,
            ),
            (
                "all N × 10 endpoints from nothing: manifest rename → `sync complete` logged (wall)",
                "4",
                "all services from nothing",
                "ms",
                3000.0,
            ),
            (
                "memory: (VmRSS with N services − VmRSS with none) / N, 10 endpoints each",
                "8",
                "agent VmRSS growth per service",
                "KiB",
                2.0,
            ),
        ] {
            let v = g.median(bench, metric, n);
            g.push(what, n, v, unit, Target::Below(target));
        }
    }
    if let Some(n) = g.at(N_LATENCY) {
        let v = g.median("6", "agent CPU, 100 changes/s", n);
        g.push(
            "churn, 100 endpoint changes/s: agent CPU",
            n,
            v,
            "% of one core",
            Target::Below(5.0),
        );
        let v = g.median("6", &p99_over_idle(100), n);
        g.push(
            "churn, 100 endpoint changes/s: CRR p99 ÷ idle CRR p99 (same round)",
            n,
            v,
            "×",
            Target::AtMost(1.2),
        );
        let failed = res
            .stats_of("6", "failed connections, 100 changes/s", n, "E")
            .map_or(f64::NAN, |(_, _, max)| max);
        g.push(
            "churn, 100 endpoint changes/s: failed connections (most in a round)",
            n,
            failed,
            "connections",
            Target::Zero,
        );
    }
    if let Some(n) = plan.ns.last().copied() {
        let metrics = res.metrics_of("3", n, "E");
        let connect4 = metrics
            .iter()
            .find(|m| m.starts_with("connect4") && !m.contains("IPv6") && !m.contains("during"));
        let v = connect4.map_or(f64::NAN, |m| g.median("3", m, n));
        g.push(
            "connect4 per connect (run_time_ns / run_cnt, BPF stats on)",
            n,
            v,
            "ns",
            Target::None,
        );
    }
    for (what, metric, unit) in [
        (
            "XDP: first packet of a new flow, over XDP_PASS",
            "hit over XDP_PASS",
            "ns",
        ),
        (
            "XDP: conntrack entries when new flows were measured",
            "conntrack entries after new flows",
            "entries",
        ),
        (
            "XDP: packet of a tracked flow, over XDP_PASS",
            "tracked over XDP_PASS",
            "ns",
        ),
        ("XDP: miss, over XDP_PASS", "miss over XDP_PASS", "ns"),
    ] {
        let v = g.median("7", metric, 1);
        g.push(what, 1, v, unit, Target::None);
    }
    g.rows
}

/// The goals' table.
pub fn markdown(rows: &[Row]) -> String {
    let mut out = String::from(
        "\n### Goals (issue 13)\n\n| goal | N | measured | target | met |\n|---|---:|---:|---|---|\n",
    );
    for r in rows {
        let met = match r.met {
            Some(true) => "yes",
            Some(false) => "**no**",
            None if r.median.is_finite() => "",
            None => "**not measured**",
        };
        let _ = writeln!(
            out,
            "| {} | {} | {} {} | {} | {met} |",
            r.metric,
            r.n,
            num(r.median),
            r.unit,
            r.target.as_deref().unwrap_or("–"),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::{Args, Plan};

    fn plan(ns: &[usize]) -> Plan {
        Plan::from(&Args {
            quick: true,
            services: ns.to_vec(),
            agent_only: true,
            rounds: None,
            duration_ms: None,
            latency_n: None,
            changes: None,
            out: None,
            no_build: true,
            iptables: "iptables".into(),
            nft_max: 10_000,
            iptables_max: 10_000,
            xdp_only: false,
        })
    }

    fn row<'a>(rows: &'a [Row], starts: &str) -> &'a Row {
        rows.iter()
            .find(|r| r.metric.starts_with(starts))
            .unwrap_or_else(|| panic!("no goal row {starts:?}"))
    }

    const P99: &str = "first connection on new backend, p99";

    #[test]
    fn a_run_below_the_goals_n_reads_them_at_its_largest_n() {
        let mut res = Results::default();
        res.add("5", P99, 1, "E", 10.0);
        res.add("5", P99, 1000, "E", 30.0);
        let rows = evaluate(&res, &plan(&[1000, 1]), "k", "b");
        let p99 = row(&rows, "network programming p99:");
        assert_eq!((p99.n, p99.median, p99.met), (1000, 30.0, Some(false)));
        let ratio = row(&rows, "network programming p99 at N");
        assert_eq!(ratio.metric, "network programming p99 at N ÷ p99 at N = 1");
        assert_eq!((ratio.n, ratio.median, ratio.met), (1000, 3.0, Some(false)));
    }

    #[test]
    fn the_ratio_is_to_1000_and_goals_take_their_own_n() {
        let mut res = Results::default();
        for (n, v) in [(1, 1.0), (1000, 10.0), (50_000, 12.0), (100_000, 50.0)] {
            res.add("5", P99, n, "E", v);
        }
        res.add("8", "agent VmRSS growth per service", 100_000, "E", 1.5);
        let rows = evaluate(&res, &plan(&[1, 1000, 50_000, 100_000]), "k", "b");
        let p99 = row(&rows, "network programming p99:");
        assert_eq!((p99.n, p99.median, p99.met), (50_000, 12.0, Some(true)));
        let ratio = row(&rows, "network programming p99 at N");
        assert!(ratio.metric.ends_with("N = 1000"));
        assert_eq!((ratio.median, ratio.met), (1.2, Some(true)));
        let memory = row(&rows, "memory:");
        assert_eq!((memory.n, memory.met), (100_000, Some(true)));
        assert_eq!(memory.target.as_deref(), Some("< 2 KiB"));
    }

    #[test]
    fn a_goal_not_measured_has_no_number() {
        let rows = evaluate(&Results::default(), &plan(&[1]), "k", "b");
        let churn = row(&rows, "churn, 100 endpoint changes/s: failed");
        assert!(churn.median.is_nan());
        assert_eq!(churn.met, None);
        // A single N has nothing to compare with.
        assert!(!rows.iter().any(|r| r.metric.contains(" ÷ p99 at N")));
        assert!(markdown(&rows).contains("**not measured**"));
    }
}
