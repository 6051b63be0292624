//! The closed form of what autograd keeps after the forward (the replay agrees; tested).

use crate::config::{Arch, ModelConfig, Step};

/// Closed form of what autograd keeps after the forward, by component, in bytes (data only;
/// tensor headers are a few hundred bytes per op). One term per op output that allocates; views
/// (reshape of contiguous, transpose, narrow, broadcast) are free. `e` is the model dtype's
/// width, `f` the width of norm statistics (f32 for half-precision models).
pub fn closed_form_kept(cfg: &ModelConfig, step: Step) -> Vec<(&'static str, u64)> {
    let (b, t) = (step.batch as u64, step.seq as u64);
    let n = b * t;
    let e = step.dtype.bytes();
    let half = e != 4;
    let d = cfg.n_embd as u64;
    let ff = cfg.intermediate_size as u64;
    let v = cfg.vocab_size as u64;
    let h = cfg.n_head as u64;
    let hd = cfg.head_dim as u64;
    let q = h * hd;
    let kv = cfg.kv_dim() as u64;
    let scores = b * h * t * t * e;
    // LayerNorm: [to f32 copy], centred, squared, normalised, [back to dtype], ·w, (+b)
    let norm_gpt2 = n * d * (3 * 4 + if half { 4 + e } else { 0 } + e + u64::from(cfg.bias) * e);
    // RMSNorm: [to f32], squared, normalised, [back], ·w
    let norm_llama = n * d * (2 * 4 + if half { 4 + e } else { 0 } + e);
    let bias = |on: bool, w: u64| if on { n * w * e } else { 0 };
    // q·kᵀ, scaled, masked, max-shifted, exp, normalised = 6 score-sized tensors
    let attn_core = 6 * scores + 2 * b * h * t * hd * e /* k^T copy, att@v */;
    let mut terms = Vec::new();
    match cfg.arch {
        Arch::Gpt2 => {
            terms.push(("layer.norms", 2 * norm_gpt2));
            let qkv = n * 3 * d * e + bias(cfg.bias, 3 * d);
            // each head split: reshape copy of the narrow + contiguous copy of the transpose
            let split = 3 * 2 * n * d * e;
            let merge = n * d * e;
            let proj = n * d * e + bias(cfg.bias, d);
            terms.push(("layer.attention", qkv + split + attn_core + merge + proj));
            let mlp = n * ff * e + bias(cfg.bias, ff) + n * ff * e + n * d * e + bias(cfg.bias, d);
            terms.push(("layer.mlp", mlp));
            terms.push(("layer.residuals", 2 * n * d * e));
        }
        Arch::Llama => {
            use crate::config::{NormKind, Storage};
            // Gemma's (1 + w) norm scales in f32 before casting back: [to f32], squared,
            // normalised, ·(1 + w) in f32, [back]
            let norm_row = if cfg.norm == NormKind::RmsOnePlus {
                2 * 4 + if half { 4 } else { 0 } + 4 + if half { e } else { 0 }
            } else {
                2 * 4 + if half { 4 + e } else { 0 } + e
            };
            let norms_per_layer = cfg.norms_per_layer() as u64;
            terms.push(("layer.norms", norms_per_layer * n * d * norm_row));
            let qb = cfg.has_qkv_bias();
            let proj = n * (q + 2 * kv) * e + bias(qb, q) + 2 * bias(qb, kv);
            // contiguous copies after the transpose; fused storage first copies each narrow
            let copies = if cfg.qkv_storage == Storage::Fused {
                2
            } else {
                1
            };
            let heads = copies * n * (q + 2 * kv) * e;
            let qk_norm = if cfg.qk_norm {
                n * (q + kv) * norm_row
            } else {
                0
            };
            // RoPE on q and k: neg (half), cat, x·cos, rot·sin, sum ≈ 5 copies of the rotated
            // channels each, and a cat with the channels passed on under partial rotary.
            let rot = cfg.rotary_dim as u64;
            let rope_per_head = 5 * rot + if rot < hd { hd } else { 0 };
            let rope = n * (h + cfg.n_kv_head as u64) * rope_per_head * e;
            let rep = cfg.n_head / cfg.n_kv_head.max(1);
            let repeat = if rep > 1 { 2 * n * q * e } else { 0 };
            // soft-cap: scores / c, tanh, · c
            let softcap = if cfg.attn_softcap.is_some() {
                3 * scores
            } else {
                0
            };
            let o = n * q * e + n * d * e + bias(cfg.bias, d);
            terms.push((
                "layer.attention",
                proj + heads + qk_norm + rope + repeat + attn_core + softcap + o,
            ));
            let k = cfg.n_experts_per_tok.max(1) as u64;
            let ex = cfg.n_experts as u64;
            let moe_ff = cfg.moe_intermediate_size as u64;
            // router logits, f32 probs pipeline (~6 [N,E]), gathers, 4·ff + 3·d per routed
            // token, weighted output, index_add per expert
            let sparse = n * ex * (e + 6 * 4)
                + n * k * (2 * d * e + 4 * moe_ff * e + 2 * d * e)
                + ex * n * d * e;
            let dense = n * (4 * ff + d) * e + bias(cfg.mlp_bias, 2 * ff) + bias(cfg.mlp_bias, d);
            let moe_layers = cfg.moe_layer_count() as u64;
            let l = cfg.n_layer as u64;
            // Averaged over the layers (the per-layer terms are multiplied by L below).
            let mlp = (moe_layers * sparse + (l - moe_layers) * dense) / l.max(1);
            terms.push(("layer.mlp", mlp));
            terms.push(("layer.residuals", 2 * n * d * e));
        }
    }
    let l = cfg.n_layer as u64;
    let per_layer: u64 = terms.iter().map(|x| x.1).sum();
    let mut out: Vec<(&'static str, u64)> = terms.into_iter().map(|(k, x)| (k, x * l)).collect();
    out.insert(0, ("layers (all)", per_layer * l));
    let scaled = cfg.embedding_scale != crate::config::EmbeddingScale::None;
    let embed = n
        * d
        * e
        * if cfg.arch == Arch::Gpt2 || scaled {
            2
        } else {
            1
        };
    out.push(("embed", embed));
    let final_norm = if cfg.arch == Arch::Gpt2 {
        norm_gpt2
    } else if cfg.norm == crate::config::NormKind::RmsOnePlus {
        n * d * (2 * 4 + if half { 4 } else { 0 } + 4 + if half { e } else { 0 })
    } else {
        norm_llama
    };
    // soft-capped logits: / c, tanh, · c
    let capped = if cfg.final_softcap.is_some() {
        3 * n * v * e
    } else {
        0
    };
    let rows = b * (t.saturating_sub(1));
    // logits (dtype) + [f32 copy when bf16/f16 or when the narrow is non-contiguous] +
    // log-softmax's diff, exp and result in f32
    let pred_copy = if half || b > 1 { rows * v * 4 } else { 0 };
    out.push((
        "head",
        final_norm + n * v * e + capped + pred_copy + 3 * rows * v * 4,
    ));
    out
}
