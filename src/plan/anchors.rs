//! The engines' own published estimates, reproduced formula for formula (their simplifications
//! included), so a plan can show beside its per-rank figures what each engine's tool would say.

use super::engine::Engine;
use crate::config::{MlpKind, ModelConfig, NormKind};
use crate::family::{self, ParamTensor};
use serde::Serialize;
use std::collections::BTreeMap;

/// One published estimate.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Anchor {
    /// Short name ("megatron theoretical memory", ...).
    pub name: String,
    /// Where the formula lives.
    pub source: &'static str,
    /// Its figure per GPU, bytes (rounded down like the tools' `int()`).
    pub bytes: u64,
    /// Its parts where the tool reports them (weight_and_optimizer, activation).
    pub parts: BTreeMap<String, u64>,
    /// What it assumes that the plan does not.
    pub note: String,
}

/// What the formulas read from a layout.
pub struct AnchorInputs {
    pub tp: usize,
    pub pp: usize,
    pub dp: usize,
    pub zero: u8,
    pub microbatch: usize,
    pub microbatches: usize,
    pub seq: usize,
    /// Vocabulary rows after the engine's padding (Megatron's `padded_vocab_size`).
    pub padded_vocab: usize,
    /// Exact parameter count (tied once).
    pub total_params: u64,
    /// Parameters of the most loaded rank before any ZeRO/FSDP sharding.
    pub local_params: u64,
}

/// Megatron-LM `compute_weight_and_optimizer_memory` (theoretical_memory_usage.py): parameters
/// from the closed form (norms counted as `norm_size` per width, no biases, no router), the most
/// loaded shard = (layers / PP + embedding) / TP, plus a second embedding at PP = 1 untied, at
/// 18 B/param or 6 + 12/DP.
fn megatron_weight_and_optimizer(cfg: &ModelConfig, a: &AnchorInputs, distopt: bool) -> f64 {
    let h = cfg.n_embd as f64;
    let heads = cfg.n_head as f64;
    let groups = cfg.n_kv_head as f64;
    let q_ratio = (cfg.head_dim * cfg.n_head) as f64 / h;
    let gated = if cfg.mlp == MlpKind::Gelu { 1.0 } else { 1.5 };
    let norm_size = if cfg.norm == NormKind::LayerNorm {
        2.0
    } else {
        1.0
    };
    let self_attn = 2.0 * h * h * ((1.0 + groups / heads) * q_ratio);
    let dense = 2.0 * h * (cfg.intermediate_size as f64 * gated + norm_size) + self_attn;
    let experts = cfg.n_experts as f64;
    let moe =
        2.0 * h * (cfg.moe_intermediate_size as f64 * experts * gated + norm_size) + self_attn;
    let n_moe = cfg.moe_layer_count() as f64;
    let n_dense = cfg.n_layer as f64 - n_moe;
    let embedding = h * a.padded_vocab as f64;
    let block = dense * n_dense + moe * n_moe + norm_size * h;
    let (tp, pp) = (a.tp as f64, a.pp as f64);
    let mut most_loaded = (block / pp + embedding) / tp;
    if !cfg.tie_embeddings && a.pp == 1 {
        most_loaded += embedding / tp;
    }
    let per_param = if distopt {
        6.0 + 12.0 / a.dp as f64
    } else {
        18.0
    };
    most_loaded * per_param
}

/// Megatron-LM `compute_activation_memory_without_sp` (the formula it reports unless sequence
/// parallelism and selective recomputation are both on): `s·b·h·(10 + 24/t)` per layer times
/// **all** layers (not the first stage's), the embedding input and dropout for PP microbatches,
/// the schedule discount min(1, m / PP), logits at PP = 1, then × 1.05.
fn megatron_activation(cfg: &ModelConfig, a: &AnchorInputs) -> f64 {
    let (s, b, h) = (a.seq as f64, a.microbatch as f64, cfg.n_embd as f64);
    let (t, p) = (a.tp as f64, a.pp as f64);
    let mut total = s * b * h * (10.0 + 24.0 / t) * cfg.n_layer as f64;
    total += 8.0 * s * b * p;
    total += s * b * h * p;
    if a.pp > 1 {
        total *= (a.microbatches as f64 / p).min(1.0);
    }
    if a.pp == 1 {
        let logits = s * b * a.padded_vocab as f64 / t;
        total += (logits + s * b * h) * 2.0;
    }
    total * 1.05
}

/// DeepSpeed's `model_to_params` "largest layer": the most parameters one module holds directly
/// (a Linear's weight and bias together).
fn largest_module(cfg: &ModelConfig) -> u64 {
    let mut by_module: BTreeMap<String, u64> = BTreeMap::new();
    for (t, _) in family::weighted_tensors(cfg) {
        let module = t
            .name
            .rsplit_once('.')
            .map_or(t.name.clone(), |(m, _)| m.to_string());
        *by_module.entry(module).or_default() += ParamTensor::numel(&t);
    }
    by_module.values().copied().max().unwrap_or(0)
}

/// The published estimates for `engine` at this layout.
pub fn anchors(engine: Engine, cfg: &ModelConfig, a: &AnchorInputs) -> Vec<Anchor> {
    let mut out = Vec::new();
    let p = a.total_params as f64;
    let world = (a.tp * a.pp * a.dp) as f64;
    match engine {
        Engine::Megatron => {
            let distopt = a.zero == 1;
            let wo = megatron_weight_and_optimizer(cfg, a, distopt);
            let act = megatron_activation(cfg, a);
            let parts = BTreeMap::from([
                ("weight_and_optimizer_bytes".to_string(), wo as u64),
                ("activation_bytes".to_string(), act as u64),
            ]);
            out.push(Anchor {
                name: "megatron theoretical memory".into(),
                source: "Megatron-LM megatron/training/theoretical_memory_usage.py \
                         (report_theoretical_memory, without sequence parallelism)",
                bytes: (wo + act) as u64,
                parts,
                note: format!(
                    "most loaded shard = (layers/PP + embedding)/TP at {} B/param; norms as \
                     weight{} per width, no biases or router; activations for all {} layers \
                     (not the first stage's), s·b·h·(10 + 24/t) each, × 1.05",
                    if distopt { "6 + 12/DP" } else { "18" },
                    if cfg.norm == NormKind::LayerNorm {
                        " + bias"
                    } else {
                        ""
                    },
                    cfg.n_layer
                ),
            });
        }
        Engine::Deepspeed => {
            let n = world;
            match a.zero {
                2 => out.push(Anchor {
                    name: "deepspeed estimate_zero2_model_states_mem_needs".into(),
                    source: "DeepSpeed deepspeed/runtime/zero/stage_1_and_2.py (cpu_offload=False)",
                    bytes: (4.0 * p + (16.0 * p / n).floor()) as u64,
                    parts: BTreeMap::new(),
                    note: format!(
                        "4 + 16/N B/param over all {} parameters, N = {} GPUs; no activations, \
                         no TP/PP",
                        a.total_params, n
                    ),
                }),
                3 => {
                    let largest = largest_module(cfg);
                    out.push(Anchor {
                        name: "deepspeed estimate_zero3_model_states_mem_needs".into(),
                        source: "DeepSpeed deepspeed/runtime/zero/stage3.py (cpu_offload=False)",
                        bytes: (4.0 * largest as f64 + (18.0 * p / n).floor()) as u64,
                        parts: BTreeMap::from([("largest_layer_params".to_string(), largest)]),
                        note: format!(
                            "4 B × the largest module ({largest} params) + 18/N B/param, N = {n} \
                             GPUs; no activations, no TP/PP"
                        ),
                    });
                }
                _ => {}
            }
            out.push(zero_paper(a));
        }
        Engine::Fsdp2 => {
            let mut z = zero_paper(&AnchorInputs { zero: 3, ..*a });
            z.note = format!("FSDP2 full sharding is ZeRO-3: {}", z.note);
            out.push(z);
        }
        Engine::Candle => {}
    }
    out
}

/// Rajbhandari et al. 2020 (ZeRO), Figure 1: model states per device for mixed-precision Adam
/// (K = 12): 16Ψ, 4Ψ + 12Ψ/N, 2Ψ + 14Ψ/N, 16Ψ/N.
fn zero_paper(a: &AnchorInputs) -> Anchor {
    let psi = a.local_params as f64;
    let n = a.dp as f64;
    let (bytes, formula) = match a.zero {
        0 => (16.0 * psi, "16Ψ"),
        1 => (4.0 * psi + 12.0 * psi / n, "4Ψ + 12Ψ/N"),
        2 => (2.0 * psi + 14.0 * psi / n, "2Ψ + 14Ψ/N"),
        _ => (16.0 * psi / n, "16Ψ/N"),
    };
    Anchor {
        name: format!("ZeRO paper, stage {}", a.zero.min(3)),
        source: "Rajbhandari et al. 2020, ZeRO, Figure 1 (K = 12)",
        bytes: bytes as u64,
        parts: BTreeMap::new(),
        note: format!(
            "{formula} with Ψ = {} (the most loaded rank's parameters before sharding), N = DP = {}; \
             model states only, no padding, no activations",
            a.local_params, a.dp
        ),
    }
}
