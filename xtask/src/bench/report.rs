//! Samples → rows (median, min, max, ratio to a baseline arm), the markdown table, the JSON
//! rows and the chart.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

use super::Plan;

/// One result row, as written to the JSON file.
#[derive(Clone, Debug, Serialize)]
pub struct Row {
    pub benchmark: String,
    pub metric: String,
    pub arm: String,
    pub n: usize,
    pub unit: String,
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub samples: usize,
    /// median / the baseline arm's median for the same benchmark, metric and N.
    pub ratio: Option<f64>,
    pub baseline: Option<String>,
    pub kernel: String,
    pub iptables_backend: String,
    /// A goal's target (`< 20 ms`), on the goals' rows.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// Whether the goal's target is met, on the goals' rows that have one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub met: Option<bool>,
}

type Key = (String, String, usize, String);

/// Samples per (benchmark, metric, N, arm), in insertion order of keys.
#[derive(Default)]
pub struct Results {
    samples: BTreeMap<Key, Vec<f64>>,
    order: Vec<Key>,
    units: BTreeMap<(String, String), (String, Option<String>)>,
}

impl Results {
    /// Declares a metric's unit and the arm its ratio is taken against.
    pub fn unit(&mut self, bench: &str, metric: &str, unit: &str, baseline: Option<&str>) {
        self.units.insert(
            (bench.into(), metric.into()),
            (unit.into(), baseline.map(str::to_string)),
        );
    }

    pub fn add(&mut self, bench: &str, metric: &str, n: usize, arm: &str, value: f64) {
        let key = (bench.to_string(), metric.to_string(), n, arm.to_string());
        if !self.samples.contains_key(&key) {
            self.order.push(key.clone());
        }
        self.samples.entry(key).or_default().push(value);
    }

    pub fn median_of(&self, bench: &str, metric: &str, n: usize, arm: &str) -> Option<f64> {
        let key = (bench.to_string(), metric.to_string(), n, arm.to_string());
        self.samples.get(&key).map(|s| stats(s).0)
    }

    /// (median, min, max) of a row.
    pub fn stats_of(
        &self,
        bench: &str,
        metric: &str,
        n: usize,
        arm: &str,
    ) -> Option<(f64, f64, f64)> {
        let key = (bench.to_string(), metric.to_string(), n, arm.to_string());
        self.samples.get(&key).map(|s| stats(s))
    }

    /// The metrics of a benchmark with rows at `n` of `arm`.
    pub fn metrics_of(&self, bench: &str, n: usize, arm: &str) -> Vec<String> {
        self.order
            .iter()
            .filter(|(b, _, at, a)| b == bench && *at == n && a == arm)
            .map(|(_, m, _, _)| m.clone())
            .collect()
    }

    pub fn samples_of(&self, bench: &str, metric: &str, n: usize, arm: &str) -> Vec<f64> {
        let key = (bench.to_string(), metric.to_string(), n, arm.to_string());
        self.samples.get(&key).cloned().unwrap_or_default()
    }

    pub fn rows(&self, kernel: &str, backend: &str) -> Vec<Row> {
        let mut rows = Vec::new();
        for key in &self.order {
            let (bench, metric, n, arm) = key;
            let values = &self.samples[key];
            let (median, min, max) = stats(values);
            let (unit, baseline) = self
                .units
                .get(&(bench.clone(), metric.clone()))
                .cloned()
                .unwrap_or_default();
            let ratio = baseline.as_ref().and_then(|b| {
                let base = self.median_of(bench, metric, *n, b)?;
                (base != 0.0).then(|| median / base)
            });
            rows.push(Row {
                benchmark: bench.clone(),
                metric: metric.clone(),
                arm: arm.clone(),
                n: *n,
                unit,
                median,
                min,
                max,
                samples: values.len(),
                ratio,
                baseline,
                kernel: kernel.into(),
                iptables_backend: backend.into(),
                target: None,
                met: None,
            });
        }
        rows.sort_by(|a, b| (&a.benchmark, &a.metric, a.n).cmp(&(&b.benchmark, &b.metric, b.n)));
        rows
    }
}

/// (median, min, max); the median of an even count is the mean of the middle two.
pub fn stats(values: &[f64]) -> (f64, f64, f64) {
    if values.is_empty() {
        return (f64::NAN, f64::NAN, f64::NAN);
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    let median = if v.len().is_multiple_of(2) {
        (v[mid - 1] + v[mid]) / 2.0
    } else {
        v[mid]
    };
    (median, v[0], v[v.len() - 1])
}

pub fn num(x: f64) -> String {
    if x.is_nan() {
        "–".into()
    } else if x == 0.0 {
        "0".into()
    } else if x.abs() >= 1000.0 {
        format!("{x:.0}")
    } else if x.abs() >= 10.0 {
        format!("{x:.1}")
    } else if x.abs() >= 0.1 {
        format!("{x:.2}")
    } else {
        format!("{x:.3}")
    }
}

/// All rows, one markdown table per benchmark.
pub fn markdown(rows: &[Row], titles: &[(&str, &str)]) -> String {
    let mut out = String::new();
    for (bench, title) in titles {
        let mine: Vec<&Row> = rows.iter().filter(|r| r.benchmark == *bench).collect();
        if mine.is_empty() {
            continue;
        }
        let _ = writeln!(out, "\n### {title}\n");
        out.push_str("| metric | N | arm | median | min | max | unit | ratio |\n");
        out.push_str("|---|---:|---|---:|---:|---:|---|---:|\n");
        for r in mine {
            let ratio = match (&r.ratio, &r.baseline) {
                (Some(x), Some(b)) if b != &r.arm => format!("{:.3}× {b}", x),
                _ => String::new(),
            };
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {} | {} | {} |",
                r.metric,
                r.n,
                r.arm,
                num(r.median),
                num(r.min),
                num(r.max),
                r.unit,
                ratio
            );
        }
    }
    out
}

/// The run's method, above the tables.
pub fn method_notes(plan: &Plan) -> String {
    format!(
        "Rounds: {} (arms interleaved, order rotated each round); run length {} ms; medians with \
         min and max over rounds. N = background services × 10 endpoints, plus the measured ones \
         (10 endpoints, the real backend pods). Client pinned to CPU {}, servers to CPU {}. \
         Conntrack is in use in every arm's client namespace (an `--ctstate INVALID` rule, \
         TIME_WAIT timeout 10 s), none in the servers'. BPF run-time stats are on for all arms.\n",
        plan.rounds,
        plan.dur_ms,
        super::cluster::CLIENT_CPU,
        super::cluster::SERVER_CPU
    )
}

/// The headline table: connection rate and p99 against D, one change against iptables.
pub fn headline(res: &Results, plan: &Plan) -> String {
    let mut out = String::from(
        "\n### Headline\n\n| N | CRR/s E÷D | I÷D | I-rand÷D | N÷D | CRR p99 E÷D | I÷D | one change: agent, file → maps (ms) | agent, map writes only (ms) | iptables partial restore (ms) | nft (ms) | iptables ÷ agent (file) | iptables ÷ agent (maps) |\n|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for &n in &plan.ns {
        let m =
            |b: &str, metric: &str, arm: &str| res.median_of(b, metric, n, arm).unwrap_or(f64::NAN);
        let r = |metric: &str, arm: &str| m("1", metric, arm) / m("1", metric, "D");
        let agent = m("4", "one endpoint change", "E");
        let sync = m("4", "agent sync_us, one change", "E");
        let ipt = m("4", "one endpoint change", "I");
        out.push_str(&format!(
            "| {n} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {} | {} | {} | {} | {:.0}× | {:.0}× |\n",
            r("CRR rate", "E"),
            r("CRR rate", "I"),
            r("CRR rate", "I-rand"),
            r("CRR rate", "N"),
            r("CRR p99", "E"),
            r("CRR p99", "I"),
            num(agent),
            num(sync),
            num(ipt),
            num(m("4", "one endpoint change", "N")),
            ipt / agent,
            ipt / sync
        ));
    }
    out
}
