//! Sections for the rules of thumb beside the measured peak, and for the per-layer extrapolation.

use super::Section;
use crate::estimate::rules::RuleOfThumb;
use crate::measure::extrapolate::Extrapolation;
use crate::units::{group, percent, Bytes};

/// "Rules of thumb vs measured peak": one row per rule, the measurement first.
pub fn rules_section(rules: &[RuleOfThumb]) -> Option<Section> {
    if rules.is_empty() {
        return None;
    }
    let measured = rules.iter().find_map(|r| r.measured_peak_bytes);
    let mut rows = Vec::new();
    if let Some(m) = measured {
        rows.push(vec![
            "measured peak (memory.peak_bytes)".to_string(),
            group(m),
            Bytes(m).human(),
            String::new(),
            "counting allocator".to_string(),
        ]);
    }
    for r in rules {
        rows.push(vec![
            r.name.to_string(),
            group(r.predicted_peak_bytes),
            Bytes(r.predicted_peak_bytes).human(),
            r.rel_error.map(percent).unwrap_or_else(|| "-".into()),
            r.formula.clone(),
        ]);
    }
    let mut notes: Vec<String> = rules
        .iter()
        .map(|r| format!("{}: {}", r.name, r.assumptions))
        .collect();
    notes.push(
        "every rule is turned into a peak as weights + gradients (+ AdamW states if the step ran \
         an optimizer) + its activations; the measured step ran no optimizer unless stated"
            .to_string(),
    );
    Some(Section {
        title: "Rules of thumb vs measured peak".into(),
        header: [
            "rule",
            "peak (bytes)",
            "binary",
            "error vs measured",
            "formula",
        ]
        .map(String::from)
        .to_vec(),
        rows,
        notes,
    })
}

/// "Per-layer extrapolation": the two shallow runs, the affine model, and the full depth.
pub fn extrapolation_section(e: &Extrapolation) -> Section {
    let row = |name: &str, b: u64| vec![name.to_string(), group(b), Bytes(b).human()];
    let mut rows = vec![
        row("peak, 1 layer (measured)", e.peak_1_layer_bytes),
        row("peak, 2 layers (measured)", e.peak_2_layer_bytes),
        row("per layer = peak(2) − peak(1)", e.per_layer_bytes),
        row("base = peak(1) − per layer", e.base_bytes),
        row("runtime buffers of the first step", e.runtime_bytes),
        row(
            &format!(
                "predicted peak = base + {} × per layer + runtime",
                e.n_layer
            ),
            e.predicted_peak_bytes,
        ),
    ];
    rows.push(row(
        "model-guided: replay at full depth + its error at 1–2 layers",
        e.model_guided_peak_bytes,
    ));
    if let Some(m) = e.measured_peak_bytes {
        rows.push(row(&format!("measured peak, {} layers", e.n_layer), m));
    }
    Section {
        title: "Per-layer extrapolation from 1- and 2-layer runs".into(),
        header: ["quantity", "bytes", "binary"].map(String::from).to_vec(),
        rows,
        notes: [
            Some(match e.rel_error {
                Some(err) => format!(
                    "extrapolation error vs the measured full model: {}",
                    percent(err)
                ),
                None => "the full model was not run; the prediction stands alone".to_string(),
            }),
            e.model_guided_rel_error.map(|err| {
                format!(
                    "model-guided error vs the measured full model: {}",
                    percent(err)
                )
            }),
            e.warning.as_ref().map(|w| format!("warning: {w}")),
        ]
        .into_iter()
        .flatten()
        .collect(),
    }
}
