//! Compute: FLOPs per matmul term, the measured step's throughput and MFU, timings.

use crate::report::section::{s, Section};
use crate::report::sizing::Report;
use crate::units::group;

/// FLOPs of one sequence, per term (nanoGPT's convention) and PaLM's formula beside them.
pub fn flops(r: &Report) -> Option<Section> {
    let f = r.flops.as_ref()?;
    let mut rows: Vec<Vec<String>> = f
        .terms
        .iter()
        .map(|t| {
            vec![
                s(t.term),
                group(t.forward),
                format!("{:.3e}", t.forward as f64),
            ]
        })
        .collect();
    for (name, flops) in [
        ("forward", f.forward),
        ("forward, causal attention", f.forward_causal),
        ("backward (2 × forward)", f.backward),
        ("forward + backward", f.total),
        ("PaLM 6N + 12·L·H·Q·T, × T", f.palm_total),
    ] {
        rows.push(vec![s(name), group(flops), format!("{:.3e}", flops as f64)]);
    }
    Some(Section {
        title: format!(
            "FLOPs of one sequence of {} tokens (2·m·n·k per matmul; attention {})",
            f.seq,
            if f.causal {
                "causal"
            } else {
                "in full, as nanoGPT counts it"
            }
        ),
        header: vec![s("term"), s("FLOPs"), s("")],
        rows,
        notes: vec![
            format!(
                "MACs = FLOPs / 2: forward {} MACs; per token {:.4e} FLOPs",
                group(f.forward_macs),
                f.forward_per_token
            ),
            format!(
                "PaLM / counted = {:.4} (N = {} parameters in a matmul per token)",
                f.palm_ratio,
                group(f.palm_params)
            ),
        ],
    })
}

/// Achieved FLOP/s of the measured step and MFU when a peak was given or measured.
pub fn mfu(r: &Report) -> Option<Section> {
    let m = r.mfu.as_ref()?;
    let mut rows = vec![
        vec![
            s("model FLOPs of the step (batch × fwd+bwd)"),
            group(m.step_flops),
        ],
        vec![
            s("measured step (forward + backward), s"),
            format!("{:.4}", m.step_s),
        ],
        vec![
            s("achieved"),
            format!("{:.2} GFLOP/s", m.achieved_flops_per_s / 1e9),
        ],
    ];
    let mut notes = Vec::new();
    match (m.peak_flops_per_s, &m.peak_source, m.mfu) {
        (Some(p), Some(src), Some(u)) => {
            rows.push(vec![s("peak"), format!("{:.2} GFLOP/s ({src})", p / 1e9)]);
            rows.push(vec![s("MFU"), format!("{:.2}%", u * 100.0)]);
        }
        _ => notes.push(
            "MFU not computed: no peak given; pass --peak-tflops X or --measure-peak".to_string(),
        ),
    }
    Some(Section {
        title: "Throughput and MFU".into(),
        header: vec![s("measure"), s("value")],
        rows,
        notes,
    })
}

/// Median seconds of build, forward and backward.
pub fn timing(r: &Report) -> Option<Section> {
    let t = r.timing.as_ref()?;
    Some(Section {
        title: format!("Timing (median of {})", t.repeat),
        header: vec![s("phase"), s("seconds")],
        rows: vec![
            vec![s("build"), format!("{:.4}", t.build_s)],
            vec![s("forward + loss"), format!("{:.4}", t.forward_s)],
            vec![s("backward"), format!("{:.4}", t.backward_s)],
        ],
        notes: r.loss.map(|l| format!("loss {l:.6}")).into_iter().collect(),
    })
}
