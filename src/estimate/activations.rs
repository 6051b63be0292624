//! Memory of one training step beyond the weights: what autograd keeps, gradients, transients.
//!
//! First-order model used for the preflight and shown beside the measurement; the per-op
//! accounting of our own forward/backward refines it (see `predicted_peak`).

use crate::config::{Arch, ModelConfig};
use crate::dtype::TrainDtype;

/// Shape of one step.
#[derive(Debug, Clone, Copy)]
pub struct Step {
    pub batch: usize,
    pub seq: usize,
    pub dtype: TrainDtype,
}

/// Elements autograd keeps per layer for one token, by the ops of our forward pass: every op
/// output stays alive until backward (DESIGN.md, "What autograd keeps").
fn kept_per_token_per_layer(cfg: &ModelConfig, seq: u128) -> u128 {
    let d = cfg.n_embd as u128;
    let q = cfg.q_dim() as u128;
    let kv = cfg.kv_dim() as u128;
    let ff = cfg.intermediate_size as u128;
    let h = cfg.n_head as u128;
    // attention scores, masked scores, softmax output: 3 tensors of h × T per token
    let attn_probs = 3 * h * seq;
    match cfg.arch {
        Arch::Gpt2 => {
            // 2 LayerNorms (~6 d each: centred, squared, normalised, scaled, shifted),
            // qkv (3d) + head split/merge copies (3d), attention out (d), proj (d), 2 residuals
            12 * d + 3 * d + 3 * d + 2 * d + 2 * d + attn_probs
                // MLP: fc out, gelu intermediates (~4 ff), proj
                + ff * 5 + d
        }
        Arch::Llama => {
            let experts = if cfg.is_moe() {
                cfg.n_experts as u128
            } else {
                1
            };
            // 2 RMSNorms (~4 d each), q/k/v + RoPE (3 × (q + 2kv)), kv repeat (2q),
            // attention out (q), o proj (d), 2 residuals
            8 * d + 3 * (q + 2 * kv) + 2 * q + q + d + 2 * d + attn_probs
                // SwiGLU: gate, up, silu (~2), product; down
                + experts * (5 * ff + d)
        }
    }
}

/// Predicted peak bytes of forward + backward above the pre-build baseline: weights, the kept
/// activations, the logits and loss, and the gradients being formed.
pub fn predicted_peak(cfg: &ModelConfig, params: u64, step: Step) -> u64 {
    let e = step.dtype.bytes() as u128;
    let tokens = (step.batch as u128) * (step.seq as u128);
    let weights = params as u128 * e;
    let layers = cfg.n_layer as u128 * tokens * kept_per_token_per_layer(cfg, step.seq as u128);
    // logits, their log-softmax and its gradient, in f32 for the loss
    let head = tokens * cfg.vocab_size as u128 * (e + 2 * 4);
    let embed = tokens * cfg.n_embd as u128 * 3;
    let kept = (layers + embed) * e + head;
    // backward: all gradients plus roughly one layer's worth of transient gradient tensors
    let grads = weights;
    let total = weights + kept + grads;
    u64::try_from(total).unwrap_or(u64::MAX)
}
