//! Memory: the training-memory breakdown, the measured phases of one step, the headline peak,
//! the rules of thumb beside the measured peak, and the per-layer extrapolation.

use crate::estimate::rules::RuleOfThumb;
use crate::measure::extrapolate::Extrapolation;
use crate::report::section::{row_bytes, s, Section};
use crate::report::sizing::Report;
use crate::units::{group, percent, rel_error, Bytes};

/// Weights, gradients, AdamW states, master weights and activations of training, by the
/// estimate.
pub fn training(r: &Report) -> Section {
    let t = &r.training;
    let mut rows = vec![
        row_bytes(&format!("weights ({})", t.dtype.name()), t.weights_bytes.0),
        row_bytes(
            &format!("gradients ({})", t.dtype.name()),
            t.gradients_bytes.0,
        ),
    ];
    if t.master_weights_bytes.0 > 0 {
        rows.push(row_bytes("f32 master weights", t.master_weights_bytes.0));
    }
    rows.push(row_bytes("AdamW m + v (f32)", t.optimizer_bytes.0));
    match t.activations_bytes {
        Some(a) => rows.push(row_bytes(
            &format!(
                "activations at the step's peak (batch {} × seq {})",
                r.run.batch, r.run.seq
            ),
            a.0,
        )),
        None => rows.push(vec![
            s("activations"),
            s("beyond any machine (> 1 EiB)"),
            s(""),
        ]),
    }
    rows.push(row_bytes("total", t.total_bytes.0));
    Section {
        title: format!(
            "Training memory, AdamW, {} (mixed precision convention)",
            t.dtype.name()
        ),
        header: vec![s("part"), s("bytes"), s("binary")],
        rows,
        notes: vec![],
    }
}

/// Bytes of each phase of the measured step, and the prediction.
pub fn measured(r: &Report) -> Option<Section> {
    let mem = r.memory.as_ref()?;
    let ph = &mem.phases;
    let rows = vec![
        row_bytes("after build (weights)", ph.weights_bytes),
        row_bytes("peak during forward", ph.forward_peak_bytes),
        row_bytes("after forward (kept for backward)", ph.after_forward_bytes),
        row_bytes("peak during backward", ph.backward_peak_bytes),
        row_bytes("after backward (weights + grads)", ph.after_backward_bytes),
        row_bytes("  of which gradients", ph.gradients_bytes),
        row_bytes("peak of the step", ph.peak_bytes),
        row_bytes("predicted peak", mem.predicted_peak_bytes),
    ];
    let mut notes = vec![format!(
        "measured by the {}, above the pre-build baseline",
        mem.source
    )];
    if let Some(rss) = mem.rss_bytes {
        notes.push(format!(
            "process RSS at the end (context only): {}",
            Bytes(rss)
        ));
    }
    Some(Section {
        title: "Memory of one training step (measured)".into(),
        header: vec![s("phase"), s("bytes"), s("binary")],
        rows,
        notes,
    })
}

/// The measured peak beside the prediction (and AdamW's with `--optimizer`), or the prediction
/// alone when nothing ran.
pub fn peak_headline(r: &Report) -> Section {
    let bytes = |b: u64| Bytes(b).to_string();
    let mut rows = Vec::new();
    let mut notes = Vec::new();
    let predicted = r.step_model.as_ref();
    match (&r.memory, predicted) {
        (Some(m), _) => {
            let ph = &m.phases;
            rows.push(vec![
                s("peak of one training step"),
                bytes(m.predicted_peak_bytes),
                bytes(ph.peak_bytes),
                percent(rel_error(
                    m.predicted_peak_bytes as f64,
                    ph.peak_bytes as f64,
                )),
            ]);
            if let (Some(measured), Some(p)) = (
                ph.optimizer_peak_bytes,
                predicted.and_then(|p| p.optimizer_peak_bytes),
            ) {
                rows.push(vec![
                    s("peak with the optimizer update"),
                    bytes(p),
                    bytes(measured),
                    percent(rel_error(p as f64, measured as f64)),
                ]);
            }
            rows.push(vec![
                s("  of which above the weights"),
                s(""),
                bytes(m.peak_above_weights_bytes),
                s(""),
            ]);
            notes.push(format!(
                "measured by the {}, above the pre-build baseline",
                m.source
            ));
        }
        (None, Some(p)) => rows.push(vec![
            s("peak of one training step"),
            bytes(p.peak_bytes),
            s("not run"),
            s(""),
        ]),
        (None, None) => {}
    }
    if let Some(p) = predicted {
        notes.push(match p.engine {
            "lean" => format!(
                "engine: lean (keeps what PyTorch's autograd keeps{}{}); predicted by its closed form",
                r.run
                    .checkpoint
                    .filter(|c| *c == crate::train::Checkpoint::Blocks)
                    .map_or("", |_| ", checkpointing each block"),
                r.run
                    .attention
                    .filter(|a| *a == crate::train::Attention::Eager)
                    .map_or("", |_| ", eager attention")
            ),
            _ => "engine: candle's autograd (keeps its whole graph); predicted by the per-op replay"
                .to_string(),
        });
    }
    Section {
        title: "Peak memory: predicted vs measured".into(),
        header: ["", "predicted", "measured", "error"].map(s).to_vec(),
        rows,
        notes,
    }
}
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

/// The lean step's closed form, term by term: what one step holds at its peak.
pub fn step_model_section(r: &Report) -> Option<Section> {
    let m = r.step_model.as_ref()?;
    if m.terms.is_empty() {
        return None;
    }
    let mut rows: Vec<Vec<String>> = m
        .terms
        .iter()
        .map(|(name, b)| row_bytes(name, *b))
        .collect();
    if let Some(saved) = m.saved_bytes {
        rows.push(row_bytes(
            "saved for backward (all blocks, head, loss)",
            saved,
        ));
    }
    rows.push(row_bytes("predicted peak", m.peak_bytes));
    Some(Section {
        title: format!(
            "The step's memory, closed form (batch {} × seq {})",
            r.run.batch, r.run.seq
        ),
        header: vec![s("term"), s("bytes"), s("binary")],
        rows,
        notes: vec![],
    })
}
