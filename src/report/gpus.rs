//! What `truesize gpus` found: the training state against each GPU, and its table.

use super::render::{Render, View};
use super::section::{s, Section};
use crate::dtype::TrainDtype;
use crate::estimate::gpus::GpuFit;
use crate::units::{group, Bytes};
use serde::Serialize;

/// The whole table for a model.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GpuReport {
    pub model: String,
    pub params: u64,
    pub dtype: TrainDtype,
    pub batch: usize,
    pub seq: usize,
    /// Weights + grads + optimizer (+ master) + activations at batch × seq (estimate::memory).
    pub training_bytes: Bytes,
    pub weights_bytes: Bytes,
    /// Training tokens D.
    pub tokens: f64,
    /// Where D came from ("given" or the 20-tokens rule).
    pub tokens_source: String,
    pub gpus: u64,
    /// Assumed MFU (never measured here).
    pub mfu: f64,
    pub mfu_source: String,
    /// Training FLOPs per token: `flops.total / seq` (fwd + bwd, nanoGPT convention).
    pub flops_per_token: f64,
    /// `6·N` for comparison.
    pub six_n: f64,
    /// flops_per_token × D.
    pub training_flops: f64,
    pub rows: Vec<GpuFit>,
    /// No dtype was given anywhere and bf16 was assumed (said under the table).
    #[serde(skip)]
    pub dtype_assumed: bool,
}

impl Render for GpuReport {
    fn sections(&self, _view: View) -> Vec<Section> {
        let r = self;
        let dt = r.dtype.name();
        vec![Section {
            title: format!(
                "GPUs for {} ({} params), training in {dt}, batch {} × seq {}",
                r.model,
                group(r.params),
                r.batch,
                r.seq
            ),
            header: [
                "GPU",
                "memory",
                "training state share",
                "weights share",
                "fits one",
                "GPUs if sharded",
                &format!("dense {dt} peak"),
                "days",
            ]
            .map(s)
            .to_vec(),
            rows: r
                .rows
                .iter()
                .map(|f| {
                    vec![
                        s(f.gpu.name),
                        Bytes(f.gpu.memory_bytes).human(),
                        format!("{:.1}%", f.training_share * 100.0),
                        format!("{:.1}%", f.weights_share * 100.0),
                        s(if f.fits { "yes" } else { "no" }),
                        group(f.min_gpus_sharded),
                        f.peak_flops_per_s
                            .map_or_else(|| format!("no {dt}"), |p| format!("{:.1} TFLOP/s", p / 1e12)),
                        f.days.map_or_else(|| s("n/a"), |d| format!("{d:.2}")),
                    ]
                })
                .collect(),
            notes: vec![
                format!(
                    "training state: {} (weights + grads + AdamW m, v{} + activations at batch × seq)",
                    r.training_bytes,
                    if r.dtype == TrainDtype::F32 { "" } else { " + f32 master weights" }
                ),
                format!(
                    "days = {:.4e} FLOPs/token × {:.4e} tokens / ({} GPUs × peak × MFU {}) ; tokens: {}",
                    r.flops_per_token, r.tokens, r.gpus, r.mfu, r.tokens_source
                ),
                format!(
                    "FLOPs/token: counted fwd+bwd (nanoGPT convention, attention at seq {}) = {:.4e}; 6·N = {:.4e}",
                    r.seq, r.flops_per_token, r.six_n
                ),
                format!("MFU: {}", r.mfu_source),
                format!(
                    "peaks: dense datasheet figures (no sparsity), tensor cores for bf16/fp16, CUDA cores for fp32{}",
                    if r.dtype_assumed { "; dtype: bf16 by default (set --dtype)" } else { "" }
                ),
            ],
        }]
    }
}
