//! The PNG chart: connection cost (TCP_CRR rate) and programming time against N, per arm.

use std::path::Path;

use anyhow::{Context as _, Result};
use plotters::prelude::*;

use super::report::Results;

pub const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

const ARMS: [(&str, RGBColor); 5] = [
    ("D", RGBColor(90, 90, 90)),
    ("E", RGBColor(0, 120, 200)),
    ("I", RGBColor(210, 60, 40)),
    ("I-rand", RGBColor(240, 150, 60)),
    ("N", RGBColor(40, 160, 70)),
];

fn label(arm: &str) -> &'static str {
    match arm {
        "D" => "D: direct to the pod",
        "E" => "E: lb-agent (socket LB)",
        "I" => "I: kube-proxy iptables, service last",
        "I-rand" => "I-rand: iptables, random position",
        _ => "N: kube-proxy nftables",
    }
}

pub fn draw(res: &Results, ns: &[usize], path: &Path, title: &str) -> Result<()> {
    let font = std::fs::read(FONT).with_context(|| format!("reading {FONT}"))?;
    let font: &'static [u8] = Box::leak(font.into_boxed_slice());
    plotters::style::register_font("sans-serif", FontStyle::Normal, font)
        .map_err(|_| anyhow::anyhow!("registering the font"))?;
    let root = BitMapBackend::new(path, (1400, 560)).into_drawing_area();
    root.fill(&WHITE)?;
    let root = root.titled(title, ("sans-serif", 20))?;
    let (left, right) = root.split_horizontally(700);
    let x_max = ns.iter().copied().max().unwrap_or(1).max(10) as f64 * 1.5;
    let x_range = (0.7f64..x_max).log_scale();

    // Connection cost.
    let series = |bench: &str, metric: &str, arm: &str| -> Vec<(f64, f64)> {
        ns.iter()
            .filter_map(|&n| {
                let v = res.median_of(bench, metric, n, arm)?;
                v.is_finite().then_some((n as f64, v))
            })
            .collect()
    };
    let mut y_max: f64 = 1.0;
    for (arm, _) in ARMS {
        for (_, v) in series("1", "CRR rate", arm) {
            y_max = y_max.max(v);
        }
    }
    let mut chart = ChartBuilder::on(&left)
        .caption(
            "TCP_CRR rate (connections/s, higher is better)",
            ("sans-serif", 16),
        )
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(x_range.clone(), 0f64..y_max * 1.15)?;
    chart
        .configure_mesh()
        .x_desc("background services (N)")
        .y_desc("connections/s")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_label_formatter(&|y| format!("{y:.0}"))
        .draw()?;
    for (arm, color) in ARMS {
        let data = series("1", "CRR rate", arm);
        if data.is_empty() {
            continue;
        }
        chart
            .draw_series(LineSeries::new(data.clone(), color.stroke_width(2)))?
            .label(label(arm))
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        chart.draw_series(data.iter().map(|&p| Circle::new(p, 4, color.filled())))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerLeft)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;

    // Programming time, log scale.
    let mut lo: f64 = f64::MAX;
    let mut hi: f64 = 0.0;
    for arm in ["E", "I", "N"] {
        for metric in [
            "one endpoint change",
            "all services from nothing",
            "agent sync_us, one change",
        ] {
            for (_, v) in series("4", metric, arm) {
                lo = lo.min(v.max(0.001));
                hi = hi.max(v);
            }
        }
    }
    if hi <= 0.0 {
        lo = 0.01;
        hi = 1.0;
    }
    let mut chart = ChartBuilder::on(&right)
        .caption(
            "Programming time (ms, log; lower is better)",
            ("sans-serif", 16),
        )
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(x_range, (lo / 2.0..hi * 2.0).log_scale())?;
    chart
        .configure_mesh()
        .x_desc("background services (N)")
        .y_desc("ms")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_label_formatter(&|y| format!("{y}"))
        .draw()?;
    // The agent's own map programming for one change (sync_us), without the file watcher.
    let sync = series("4", "agent sync_us, one change", "E");
    if !sync.is_empty() {
        let style = RGBColor(0, 120, 200).mix(0.9).stroke_width(1);
        chart
            .draw_series(LineSeries::new(sync.clone(), style))?
            .label("agent: one change, map writes only (sync_us)")
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style));
        chart.draw_series(
            sync.iter()
                .map(|&p| TriangleMarker::new(p, 4, style.filled())),
        )?;
    }
    for (arm, color) in ARMS
        .into_iter()
        .filter(|(a, _)| ["E", "I", "N"].contains(a))
    {
        let who = match arm {
            "E" => "agent",
            "I" => "iptables-restore",
            _ => "nft -f",
        };
        for (metric, dashed) in [
            ("one endpoint change", false),
            ("all services from nothing", true),
        ] {
            let data = series("4", metric, arm);
            if data.is_empty() {
                continue;
            }
            let name = format!(
                "{who}: {}",
                if dashed {
                    "all from nothing"
                } else {
                    "one endpoint change (partial)"
                }
            );
            let style = if dashed {
                color.mix(0.5).stroke_width(2)
            } else {
                color.stroke_width(2)
            };
            chart
                .draw_series(LineSeries::new(data.clone(), style))?
                .label(name)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style));
            chart.draw_series(data.iter().map(|&p| Circle::new(p, 3, style.filled())))?;
        }
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}
