//! A sweep as an SVG chart (plotters): peak memory against batch size, one colour per sequence
//! length; measured (solid, dots), our prediction (dashed, rings), Korthikanti in the run dtype (dotted),
//! and the flat rules of thumb (grey and black).
//!
//! Text: plotters is built without a font feature, so it estimates label widths itself and
//! writes `<text font-family="sans-serif">` elements that the SVG viewer renders with its own
//! fonts. No system library and no embedded font is needed. (A PNG would need plotters'
//! `bitmap_backend` *and* a rasterising font feature with a bundled TTF; convert the SVG instead,
//! e.g. `rsvg-convert sweep.svg -o sweep.png`.)

use super::sweep::SweepReport;
use crate::error::{Error, Result};
use crate::units::GIB;
use plotters::prelude::*;

/// Chart size in pixels.
pub const WIDTH: u32 = 1100;
pub const HEIGHT: u32 = 720;
const MIB: f64 = (1u64 << 20) as f64;
/// One colour per sequence length (Tableau 10), cycled.
const SEQ_COLORS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];
/// Rules that do not depend on batch or seq, drawn flat: (key, colour, line width, dashed).
/// In f32, 4 × weights and 16 B/param coincide: a wide grey band under a black dashed line.
const FLAT_RULES: [(&str, RGBColor, u32, bool); 3] = [
    ("weights_x3", RGBColor(110, 110, 110), 2, false),
    ("weights_x4", RGBColor(185, 185, 185), 7, false),
    ("weights_grads_adam", RGBColor(0, 0, 0), 2, true),
];
/// The batch/seq-dependent rule drawn per sequence length.
const PER_SEQ_RULE: &str = "korthikanti_dtype";

fn plot_err(e: impl std::fmt::Display) -> Error {
    Error::Internal(anyhow::anyhow!("drawing the sweep chart: {e}"))
}

/// The chart as an SVG document.
pub fn render_sweep(r: &SweepReport) -> Result<String> {
    let rule_bytes = |p: &super::sweep::SweepPoint, key: &str| {
        p.rules
            .iter()
            .find(|k| k.key == key)
            .map(|k| k.predicted_peak_bytes)
    };
    let mut max_bytes = 0u64;
    for p in &r.points {
        max_bytes = max_bytes
            .max(p.measured_peak_bytes)
            .max(p.predicted_peak_bytes);
        for (k, _, _, _) in FLAT_RULES.iter() {
            max_bytes = max_bytes.max(rule_bytes(p, k).unwrap_or(0));
        }
        max_bytes = max_bytes.max(rule_bytes(p, PER_SEQ_RULE).unwrap_or(0));
    }
    let (unit, unit_name) = if max_bytes as f64 >= 2.0 * GIB {
        (GIB, "GiB")
    } else {
        (MIB, "MiB")
    };
    let y_max = (max_bytes as f64 / unit * 1.08).max(1e-3);
    let b_max = r.batches.iter().copied().max().unwrap_or(1) as f64;
    let b_min = r.batches.iter().copied().min().unwrap_or(1) as f64;
    let x_pad = ((b_max - b_min) * 0.04).max(0.2);
    let x_range = (b_min - x_pad).max(0.0)..(b_max + x_pad);

    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, HEIGHT)).into_drawing_area();
        root.fill(&WHITE).map_err(plot_err)?;
        let title = format!(
            "{}: peak memory of one training step ({}, {} params, {})",
            r.model,
            r.dtype.name(),
            crate::units::group(r.params),
            r.device
        );
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 22))
            .margin(18)
            .x_label_area_size(55)
            .y_label_area_size(85)
            .build_cartesian_2d(x_range, 0f64..y_max)
            .map_err(plot_err)?;
        chart
            .configure_mesh()
            .x_desc("batch size (sequences per step)")
            .y_desc(format!("peak memory above baseline ({unit_name})"))
            .axis_desc_style(("sans-serif", 17))
            .label_style(("sans-serif", 14))
            .x_label_formatter(&|v| {
                if v.fract().abs() < 1e-9 {
                    format!("{v:.0}")
                } else {
                    String::new()
                }
            })
            .y_label_formatter(&|v| format!("{v:.0}"))
            .light_line_style(RGBColor(235, 235, 235))
            .draw()
            .map_err(plot_err)?;

        for (i, &seq) in r.seqs.iter().enumerate() {
            let color = SEQ_COLORS[i % SEQ_COLORS.len()];
            let pts = |f: &dyn Fn(&super::sweep::SweepPoint) -> Option<u64>| -> Vec<(f64, f64)> {
                r.points
                    .iter()
                    .filter(|p| p.seq == seq)
                    .filter_map(|p| f(p).map(|b| (p.batch as f64, b as f64 / unit)))
                    .collect()
            };
            let measured = pts(&|p| Some(p.measured_peak_bytes));
            let predicted = pts(&|p| Some(p.predicted_peak_bytes));
            let korth = pts(&|p| rule_bytes(p, PER_SEQ_RULE));

            chart
                .draw_series(LineSeries::new(measured.clone(), color.stroke_width(3)))
                .map_err(plot_err)?
                .label(format!("measured, seq {seq}"))
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 24, y)], color.stroke_width(3))
                });
            chart
                .draw_series(
                    measured
                        .iter()
                        .map(|&(x, y)| Circle::new((x, y), 4, color.filled())),
                )
                .map_err(plot_err)?;
            // Rings around the measured dots: visible even where the two lines coincide.
            chart
                .draw_series(
                    predicted
                        .iter()
                        .map(|&(x, y)| Circle::new((x, y), 8, color.stroke_width(2))),
                )
                .map_err(plot_err)?;
            chart
                .draw_series(DashedLineSeries::new(
                    predicted,
                    9,
                    6,
                    color.stroke_width(2),
                ))
                .map_err(plot_err)?
                .label(format!("truesize predicted, seq {seq} (rings)"))
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 9, y)], color.stroke_width(2))
                });
            if !korth.is_empty() {
                chart
                    .draw_series(DashedLineSeries::new(korth, 2, 4, color.stroke_width(2)))
                    .map_err(plot_err)?
                    .label(format!(
                        "Korthikanti ({}, no dropout), seq {seq}",
                        r.dtype.name()
                    ))
                    .legend(move |(x, y)| {
                        PathElement::new(vec![(x, y), (x + 3, y)], color.stroke_width(2))
                    });
            }
        }

        for (key, color, width, dashed) in FLAT_RULES {
            let Some(p0) = r.points.first() else { break };
            let Some(rule) = p0.rules.iter().find(|k| k.key == key) else {
                continue;
            };
            let y = rule.predicted_peak_bytes as f64 / unit;
            let line = vec![(b_min, y), (b_max, y)];
            let style = color.stroke_width(width);
            let drawn = if dashed {
                chart.draw_series(DashedLineSeries::new(line, 12, 6, style))
            } else {
                chart.draw_series(LineSeries::new(line, style))
            };
            drawn
                .map_err(plot_err)?
                .label(rule.name)
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + if dashed { 12 } else { 24 }, y)], style)
                });
        }

        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.9))
            .border_style(BLACK.mix(0.5))
            .label_font(("sans-serif", 14))
            .draw()
            .map_err(plot_err)?;
        root.present().map_err(plot_err)?;
    }
    Ok(svg)
}
