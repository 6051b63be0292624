//! Memory of one training step beyond the weights, predicted from the mechanism: what candle
//! 0.11.1 allocates and keeps, op by op, for *our* forward (src/model) and candle's backward.
//!
//! # Why a replay and not a single formula
//! The forward is easy to write in closed form (see [`closed_form_kept`]): autograd keeps every
//! op output, so the retained bytes are a sum of shapes. The backward is not: candle's
//! `Tensor::backward` (candle-core-0.11.1/src/backprop.rs) keeps the whole forward graph alive
//! (the loss owns it), and a gradient that was computed *from a forward tensor* (e.g.
//! `lhs.t().matmul(&grad)` for a weight, `grad.mul(lhs)` for a RoPE table) is itself tracked, so
//! the `GradStore` entry that accumulates it (`zeros_like(..).add(..)`) pins that zeros tensor,
//! the partial gradient and the upstream node's gradient until the store is dropped. Which
//! gradients are alive at the same moment depends on the order of `sorted_nodes` (a reverse
//! post-order DFS) and on Rust's drop order inside each backward rule. So the backward is
//! *replayed on shapes*: a miniature tensor type with reference-counted storages mirrors
//! candle's `Arc` semantics (views share storage, ops hold their inputs, `detach` shares storage,
//! `to_dtype` to the same dtype is a clone), the forward is our model's op sequence, and the
//! backward rules are ported line by line from backprop.rs. Every allocation goes through a
//! counter that records the peak and which component held what at the peak. Nothing is
//! fitted; the constants below are struct sizes and CPU cache sizes, each cited.
//!
//! # What the replay accounts for (each was seen in the allocator's trace first)
//! - Everything the forward allocates stays alive through the whole backward (the loss owns the
//!   graph), so the backward peak sits on top of the after-forward level.
//! - backprop.rs binds `grads.remove(node)` and *shadows* it with `grad.detach()`: the tracked
//!   original, with every tensor its history pins, lives until the end of that node's iteration.
//!   At the loss this is what stacks ~7 [B·(T−1), V] f32 tensors on top of the 4 the forward
//!   keeps (the dominant term for small models with large vocabularies).
//! - Weight gradients of GPT-2's `x.matmul(W)` are tracked (`lhs.t().matmul(grad)` involves a
//!   forward tensor): each pins its zeros, its partial product and the node gradient `[B·T,
//!   out]` until the store is dropped. Llama's `W.t()` goes through a Transpose node, which
//!   drops that history once processed.
//! - Gradients reach untracked broadcast inputs (the causal mask, RoPE's cos/sin): candle
//!   creates and keeps them in the store, never processes them.
//! - bf16 matmul widens both *whole storages* to f32 and multiplies into an f32 buffer
//!   (cpu_backend `matmul`), e.g. the logits gradient `[B·T, V]` at 4 B per element.
//! - gemm's thread-local L2 slab (gemm-common gemm.rs:59) per thread that ran an unpacked gemm.
//!
//! Not modelled: gemm's transient packing buffers (measured ≤ 6.3 MB on GPT-2's head at 4,096
//! rows, < 0.5% of that peak) and hash-map/`Vec` bookkeeping of the backward (kilobytes).
//!
//! The replay is cheap (shapes only, no data): Llama-3.1-405B's 126 layers replay in well under a
//! second, so it also serves as the preflight estimate before a run.

//!
//! # Files
//! `step.rs` drives the whole step; `forward.rs` and `backward.rs` replay our networks and
//! candle's backward on `tensor.rs`'s shape-level tensors, whose allocations `gemm.rs` and
//! `machine.rs` complete with what gemm allocates on this machine; `closed_form.rs` is the
//! forward's kept bytes as one formula. This is the predictor of the candle-autograd step
//! (`model::gpt2`, `model::llama`, `measure::run::train_step`).

mod backward;
mod closed_form;
mod forward;
mod gemm;
mod machine;
mod step;
mod tensor;

pub use crate::config::Step;
pub use closed_form::closed_form_kept;
pub use machine::Machine;

use crate::config::ModelConfig;
use serde::Serialize;

/// The predicted memory of one step, all in bytes above the pre-build baseline.
#[derive(Debug, Clone, Serialize)]
pub struct ActivationModel {
    /// Weights as the VarMap holds them (data + per-tensor bookkeeping).
    pub weights_bytes: u64,
    /// Autograd-kept bytes of one transformer layer (closed form, the replay agrees).
    pub per_layer_kept_bytes: u64,
    /// Kept by the embedding (token lookup, positions, first residual input).
    pub embed_kept_bytes: u64,
    /// Kept by the final norm, the head (logits) and the loss (its f32 log-softmax).
    pub head_kept_bytes: u64,
    /// Highest point of forward + loss.
    pub forward_peak_bytes: u64,
    /// After forward: weights + everything kept for backward (+ gemm's per-thread slabs).
    pub after_forward_bytes: u64,
    /// Highest point of the backward.
    pub backward_peak_bytes: u64,
    /// max(forward, backward).
    pub peak_bytes: u64,
    /// Gradients as allocated (one per parameter tensor).
    pub gradients_bytes: u64,
    /// gemm's thread-local L2 packing slabs (one per thread that ran a gemm), included above.
    pub gemm_slab_bytes: u64,
    /// How far the measurement can stray from the prediction because of a scheduling race:
    /// whether pool threads beyond the first steal a gemm task (and so allocate their slab) is
    /// not determined by shapes. ± this many bytes (half a slab per extra pool thread).
    pub gemm_slab_uncertainty_bytes: u64,
    /// The step's peak with `--optimizer adamw`: after backward, AdamW's two moment buffers and
    /// the per-parameter temporaries of its update.
    pub adamw_peak_bytes: u64,
    /// AdamW's first and second moments (parameter dtype).
    pub adamw_state_bytes: u64,
    /// What was alive at the peak, by component: `(name, bytes)`, largest first.
    pub terms: Vec<(String, u64)>,
}

/// Predicted peak bytes of forward + backward above the pre-build baseline.
pub fn predicted_peak(cfg: &ModelConfig, params: u64, step: Step) -> u64 {
    model(cfg, params, step).peak_bytes
}

/// Predicted peak of the step with one AdamW update after backward.
pub fn predicted_adamw_peak(cfg: &ModelConfig, params: u64, step: Step) -> u64 {
    model(cfg, params, step).adamw_peak_bytes
}

/// The full prediction with its breakdown.
pub fn model(cfg: &ModelConfig, params: u64, step: Step) -> ActivationModel {
    if step_bound_bytes(cfg, params, step) > REPLAY_LIMIT_BYTES {
        return ActivationModel::beyond_any_machine();
    }
    let machine = Machine::detect();
    if cfg.n_layer <= REPLAY_MAX_DEPTH {
        return step::replay(cfg, params, step, machine);
    }
    // Every layer adds the same weights, kept activations and gradients, so beyond a few
    // layers each figure is affine in depth (to 3e-5, tested): replay two depths and extend
    // the line. Both
    // depths are multiples of every layer pattern in use (alternating, 1-in-4, 5-local-1-global).
    let (d1, d2) = (REPLAY_MAX_DEPTH / 2, REPLAY_MAX_DEPTH);
    let at = |depth: usize| {
        let mut c = cfg.clone();
        c.set_depth(depth);
        let p: u64 = crate::family::tensors(&c).iter().map(|t| t.numel()).sum();
        step::replay(&c, p, step, machine)
    };
    at(d1).extended(&at(d2), d2 as u64, cfg.n_layer as u64)
}

/// Deepest config replayed op by op (the replay costs milliseconds per layer); deeper ones are
/// extended affinely from this depth and half of it. Real models stay below it (126 layers for
/// Llama-3.1-405B).
const REPLAY_MAX_DEPTH: usize = 192;

/// Above this bound (1 EiB) no machine could run the step, and the replay's u64 byte counters
/// could overflow: the prediction saturates instead.
const REPLAY_LIMIT_BYTES: u128 = 1 << 60;

/// A generous upper bound of everything the step could allocate, in u128: every layer keeping
/// 64 tensors of each width it has, the head 32 [tokens, vocab] f32 tensors, 64 B per parameter.
fn step_bound_bytes(cfg: &ModelConfig, params: u64, step: Step) -> u128 {
    let n = step.batch as u128 * step.seq as u128;
    let experts = cfg.n_experts.max(1) as u128;
    let width = cfg.n_embd as u128
        + cfg.q_dim() as u128
        + cfg.kv_dim() as u128
        + cfg.intermediate_size as u128 * experts
        + cfg.n_head as u128 * step.seq as u128;
    let layers = cfg.n_layer as u128 * n * width * 64 * 4;
    let head = n * cfg.vocab_size as u128 * 32 * 4;
    layers + head + params as u128 * 64
}

impl ActivationModel {
    /// `self` at depth d2/2 and `b` at depth d2, extended along their line to depth `n`.
    fn extended(&self, b: &ActivationModel, d2: u64, n: u64) -> ActivationModel {
        let d1 = d2 / 2;
        let line = |x: u64, y: u64| -> u64 {
            let slope = (y as i128 - x as i128) / (d2 - d1) as i128;
            (y as i128 + slope * (n - d2) as i128).clamp(0, u64::MAX as i128) as u64
        };
        let terms = b
            .terms
            .iter()
            .map(|(name, y)| {
                let x = self
                    .terms
                    .iter()
                    .find(|(m, _)| m == name)
                    .map_or(*y, |t| t.1);
                (name.clone(), line(x, *y))
            })
            .collect();
        ActivationModel {
            weights_bytes: line(self.weights_bytes, b.weights_bytes),
            per_layer_kept_bytes: b.per_layer_kept_bytes,
            embed_kept_bytes: b.embed_kept_bytes,
            head_kept_bytes: b.head_kept_bytes,
            forward_peak_bytes: line(self.forward_peak_bytes, b.forward_peak_bytes),
            after_forward_bytes: line(self.after_forward_bytes, b.after_forward_bytes),
            backward_peak_bytes: line(self.backward_peak_bytes, b.backward_peak_bytes),
            peak_bytes: line(self.peak_bytes, b.peak_bytes),
            gradients_bytes: line(self.gradients_bytes, b.gradients_bytes),
            gemm_slab_bytes: b.gemm_slab_bytes,
            gemm_slab_uncertainty_bytes: b.gemm_slab_uncertainty_bytes,
            adamw_peak_bytes: line(self.adamw_peak_bytes, b.adamw_peak_bytes),
            adamw_state_bytes: line(self.adamw_state_bytes, b.adamw_state_bytes),
            terms,
        }
    }

    /// Every figure at u64::MAX: a step no machine can hold (the preflight refuses it).
    fn beyond_any_machine() -> Self {
        let max = u64::MAX;
        ActivationModel {
            weights_bytes: max,
            per_layer_kept_bytes: max,
            embed_kept_bytes: max,
            head_kept_bytes: max,
            forward_peak_bytes: max,
            after_forward_bytes: max,
            backward_peak_bytes: max,
            peak_bytes: max,
            gradients_bytes: max,
            gemm_slab_bytes: 0,
            gemm_slab_uncertainty_bytes: 0,
            adamw_peak_bytes: max,
            adamw_state_bytes: max,
            terms: Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{self, ConfigSource};
    use crate::dtype::TrainDtype;

    /// The affine extension past `REPLAY_MAX_DEPTH` agrees with the op-by-op replay at that
    /// depth to 0.01% (the graph's bookkeeping grows slightly faster than linearly: 3e-5 here),
    /// for a GPT-2 and a Gemma-2-style model whose layers alternate local and global attention.
    #[test]
    fn deep_replay_extends_exactly() {
        for preset in ["baby-gpt", "gemma2-2b"] {
            let mut cfg = config::load(ConfigSource::Preset(preset)).unwrap();
            cfg.n_embd = cfg.n_embd.min(64);
            cfg.intermediate_size = cfg.intermediate_size.min(128);
            cfg.vocab_size = cfg.vocab_size.min(512);
            cfg.set_depth(REPLAY_MAX_DEPTH * 2 + 6);
            let step = Step {
                batch: 1,
                seq: 8,
                dtype: TrainDtype::F32,
            };
            let params: u64 = crate::family::tensors(&cfg).iter().map(|t| t.numel()).sum();
            let direct = step::replay(&cfg, params, step, Machine::detect());
            let extended = model(&cfg, params, step);
            for (what, e, d) in [
                ("peak", extended.peak_bytes, direct.peak_bytes),
                (
                    "adamw peak",
                    extended.adamw_peak_bytes,
                    direct.adamw_peak_bytes,
                ),
                ("weights", extended.weights_bytes, direct.weights_bytes),
                (
                    "gradients",
                    extended.gradients_bytes,
                    direct.gradients_bytes,
                ),
            ] {
                let rel = (e as f64 - d as f64).abs() / d as f64;
                assert!(rel < 1e-4, "{preset} {what}: {e} vs {d}");
            }
        }
    }
}
