//! What `truesize sweep` found: one measured training step per (batch, seq), with our prediction
//! and the rules of thumb beside it. Rendered as a table (stdout), CSV, JSON and SVG.

use super::render::{Render, View};
use super::section::Section;
use crate::dtype::TrainDtype;
use crate::estimate::rules::RuleOfThumb;
use crate::units::{group, percent, Bytes};
use serde::Serialize;

#[derive(Debug, Clone, Serialize)]
pub struct SweepReport {
    pub command: &'static str,
    /// Config name (preset or path).
    pub model: String,
    pub arch: &'static str,
    /// Exact parameter count.
    pub params: u64,
    pub dtype: TrainDtype,
    pub device: String,
    /// Weights as allocated (bytes above the pre-build baseline).
    pub weights_bytes: u64,
    pub batches: Vec<usize>,
    pub seqs: Vec<usize>,
    /// One per (batch, seq), batch-major.
    pub points: Vec<SweepPoint>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct SweepPoint {
    pub batch: usize,
    pub seq: usize,
    /// batch × seq.
    pub tokens: usize,
    /// Peak of forward + backward, counting allocator, above the pre-build baseline.
    pub measured_peak_bytes: u64,
    /// `estimate::activations::predicted_peak`.
    pub predicted_peak_bytes: u64,
    /// (predicted − measured) / measured.
    pub predicted_rel_error: f64,
    pub forward_s: f64,
    pub backward_s: f64,
    /// Every rule (ours first), scored against `measured_peak_bytes`.
    pub rules: Vec<RuleOfThumb>,
}

impl Render for SweepReport {
    fn sections(&self, _view: View) -> Vec<Section> {
        sections(self)
    }
}

/// The summary table printed on stdout.
pub fn sections(r: &SweepReport) -> Vec<Section> {
    let keys: Vec<&RuleOfThumb> = r
        .points
        .first()
        .map(|p| p.rules.iter().collect())
        .unwrap_or_default();
    let mut header: Vec<String> = ["batch", "seq", "measured peak", "predicted", "error"]
        .map(String::from)
        .to_vec();
    header.extend(keys.iter().skip(1).map(|k| k.key.to_string()));
    let rows = r
        .points
        .iter()
        .map(|p| {
            let mut row = vec![
                p.batch.to_string(),
                p.seq.to_string(),
                Bytes(p.measured_peak_bytes).human(),
                Bytes(p.predicted_peak_bytes).human(),
                percent(p.predicted_rel_error),
            ];
            row.extend(p.rules.iter().skip(1).map(|k| {
                format!(
                    "{} {}",
                    Bytes(k.predicted_peak_bytes).human(),
                    k.rel_error.map(percent).unwrap_or_else(|| "-".into())
                )
            }));
            row
        })
        .collect();
    let mut notes = vec![format!(
        "{} ({}), {} parameters, {}, on {}; weights {}",
        r.model,
        r.arch,
        group(r.params),
        r.dtype.name(),
        r.device,
        Bytes(r.weights_bytes).human()
    )];
    notes.extend(
        keys.iter()
            .skip(1)
            .map(|k| format!("{}: {}", k.key, k.name)),
    );
    notes.extend(r.notes.iter().cloned());
    vec![Section {
        title: "Peak memory of one training step: measured, predicted, rules of thumb".into(),
        header,
        rows,
        notes,
    }]
}
