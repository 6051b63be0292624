//! Activation bytes a rank keeps for backward: per transformer block, the stage's extras, and
//! how many microbatches a 1F1B schedule keeps in flight on each stage.

use crate::config::{MlpKind, ModelConfig, NormKind};

/// Bytes of one fp32 element (norm statistics, log-sum-exp, router probabilities, log-softmax).
const F32: u64 = 4;
/// Bytes of an int64 token id or expert index.
const I64: u64 = 8;

/// Microbatches whose activations stage `stage` of `pp` holds at once under 1F1B with
/// `microbatches` per step: the first stage runs PP forwards before its first backward, the
/// last stage one.
pub fn in_flight(stage: usize, pp: usize, microbatches: usize) -> u64 {
    (pp - stage).min(microbatches) as u64
}

/// Bytes per element of a norm's saved statistics per row: LayerNorm keeps mean and rstd,
/// RMSNorm rstd alone.
fn norm_stats(cfg: &ModelConfig) -> u64 {
    match cfg.norm {
        NormKind::LayerNorm => 2 * F32,
        NormKind::Rms | NormKind::RmsOnePlus => F32,
    }
}

/// ceil(n / tp): the most loaded rank's share when a width is cut by `torch.chunk`.
fn per_rank(n: usize, tp: usize) -> u64 {
    n.div_ceil(tp) as u64
}

/// Bytes that one transformer block (`layer`) of `cfg` saves for backward for one microbatch of
/// `tokens` tokens, in a PyTorch-style step at `w` bytes per activation element, on one of `tp`
/// tensor-parallel ranks without sequence parallelism.
///
/// What autograd saves, per op (PyTorch's saved tensors):
/// - each norm: its input (`tokens·d`) and per-row statistics in fp32 (LayerNorm mean + rstd,
///   RMSNorm rstd): replicated on every TP rank, since without sequence parallelism every rank
///   sees the whole residual stream;
/// - the Linears that read the residual stream (q/k/v, gate/up, router): their input, the
///   norm's output, once (they share it): replicated too;
/// - attention (flash/SDPA): q, k, v, the output and a per-row fp32 log-sum-exp, no T×T
///   matrix; cut by heads (kv heads replicated when fewer than ranks); the output is also
///   o_proj's input (same storage, counted once); q/k norms (Qwen3, Gemma 3) their inputs and
///   rstd;
/// - MLP: GELU keeps its input and c_proj its input (2 × `tokens·ff`); a gated MLP keeps the
///   gate output (the activation's input), the activation's output, the up output and the
///   product (down's input): 4 × `tokens·ff`; cut by TP;
/// - MoE: router probabilities (fp32, `tokens·E`), top-k weights (fp32) and indices (int64),
///   then per routed token (`tokens·k` of them) the gathered input and the expert output the
///   routing weight multiplies (`2·d`), and the gated MLP's four `ff` tensors, cut by TP.
///
/// Dropout is taken as off (nanoGPT and the Llama family train without it).
pub fn layer_activation_bytes(
    cfg: &ModelConfig,
    layer: usize,
    tokens: u64,
    w: u64,
    tp: usize,
) -> u64 {
    let n = tokens;
    let d = cfg.n_embd as u64;
    let hd = cfg.head_dim as u64;
    let heads = per_rank(cfg.n_head, tp);
    // Fewer kv heads than ranks: each rank keeps one whole head.
    let kv = per_rank(cfg.n_kv_head, tp).max(1);
    let norm = n * d * w + n * norm_stats(cfg);
    let mut b = norm * cfg.norms_per_layer() as u64;
    // Attention: its input, q, k, v, out (= o_proj's input), lse.
    b += n * d * w;
    b += n * (2 * heads + 2 * kv) * hd * w + n * heads * F32;
    if cfg.qk_norm {
        b += n * (heads + kv) * (hd * w + F32);
    }
    // MLP or experts: their shared input.
    b += n * d * w;
    if cfg.layer_is_moe(layer) {
        let e = cfg.n_experts as u64;
        let k = cfg.n_experts_per_tok as u64;
        let ff = per_rank(cfg.moe_intermediate_size, tp);
        b += n * e * F32 + n * k * (F32 + I64);
        b += n * k * (2 * d * w + 4 * ff * w);
    } else {
        let ff = per_rank(cfg.intermediate_size, tp);
        let kept = match cfg.mlp {
            MlpKind::Gelu => 2,
            MlpKind::SwiGlu | MlpKind::GeGlu => 4,
        };
        b += n * kept * ff * w;
    }
    b
}

/// Bytes the first stage keeps per microbatch beyond its blocks: the token ids (int64), as
/// Megatron's formula counts them.
pub fn first_stage_extra_bytes(tokens: u64) -> u64 {
    tokens * I64
}

/// Bytes the last stage keeps for the one microbatch it holds beyond its blocks: the final
/// norm's input and statistics, the head's input, the logits of its `vocab_rows` and their fp32
/// log-softmax (cross-entropy's saved output).
pub fn last_stage_extra_bytes(cfg: &ModelConfig, tokens: u64, w: u64, vocab_rows: u64) -> u64 {
    let d = cfg.n_embd as u64;
    let n = tokens;
    n * d * w + n * norm_stats(cfg) + n * d * w + n * vocab_rows * (w + F32)
}
