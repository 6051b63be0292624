//! Rules of thumb for the peak memory of one training step, computed beside our own prediction so
//! the report can show which one is right for a given model and batch .
//!
//! Every rule here is a closed form of the config and the step; none looks at tensors. The error
//! against the measured peak is filled in by [`score`] once a measurement exists.
//!
//! What the measured step holds (verify, sweep): the weights, what autograd keeps, the logits and
//! the loss, and the gradients; no optimizer state unless an optimizer step was run. Each rule is
//! turned into a *peak* the same way: weights + gradients (+ AdamW states when the step ran one)
//! + whatever activations the rule claims.

use super::memory::{ADAMW_STATES, F32_BYTES};
use crate::config::{ModelConfig, Step};
use crate::dtype::TrainDtype;
use serde::Serialize;

/// Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models",
/// §4.1, eq. (1): activation bytes per layer = s·b·h·(34 + 5·a·s/h), for 16-bit activations with
/// 1-byte dropout masks. 34·s·b·h = 16 two-byte tensors of s·b·h (attention 5, MLP 9, LayerNorms
/// 2) + 2 one-byte dropout masks.
pub const KORTHIKANTI_SBH_BYTES: u64 = 34;
/// Same paper: 5·a·s²·b bytes of attention scores = softmax output (2 B) + dropout mask (1 B) +
/// dropout output (2 B) per score.
pub const KORTHIKANTI_SCORE_BYTES: u64 = 5;
/// The 34 above, counted in *elements* and without dropout: 16 tensors of s·b·h (our networks have
/// no dropout, and each element takes the training dtype's width instead of 2 bytes).
pub const KORTHIKANTI_SBH_ELEMENTS_NO_DROPOUT: u64 = 16;
/// Attention scores kept without dropout: only the softmax output, one element per score.
pub const KORTHIKANTI_SCORE_ELEMENTS_NO_DROPOUT: u64 = 1;
/// The folk rule "training needs 3–4× the memory of the weights". Both ends are shown.
pub const FOLK_LOW_MULTIPLE: u64 = 3;
pub const FOLK_HIGH_MULTIPLE: u64 = 4;
/// "Weights + grads + Adam": 16 bytes per parameter. Mixed precision: 2 (f16 weights) + 2 (f16
/// grads) + 4 (f32 master) + 4 + 4 (Adam m, v) (Rajbhandari et al. 2020, ZeRO, §3.1, K = 12 +
/// 2 + 2); in f32 it is the same 4·(1 + 1 + 2). No activations.
pub const WEIGHTS_GRADS_ADAM_BYTES_PER_PARAM: u64 = 16;

/// One rule's predicted peak and, once measured, its error.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RuleOfThumb {
    /// Stable identifier (CSV column prefix, JSON key).
    pub key: &'static str,
    pub name: &'static str,
    /// The formula as evaluated, with the numbers put in.
    pub formula: String,
    /// What the rule assumes and where it comes from.
    pub assumptions: &'static str,
    pub predicted_peak_bytes: u64,
    /// The measured peak it is compared with (`memory.peak_bytes`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub measured_peak_bytes: Option<u64>,
    /// (predicted − measured) / measured.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rel_error: Option<f64>,
}

/// Every rule, first our own prediction (`predicted_peak`: the autograd replay's, computed once
/// by the caller). `params` is the exact parameter count; `optimizer` says whether the measured
/// step included an AdamW update (then the rules that ignore it get its states added, to be
/// fair).
pub fn predict(
    cfg: &ModelConfig,
    params: u64,
    step: Step,
    optimizer: bool,
    predicted_peak: u64,
) -> Vec<RuleOfThumb> {
    let e = step.dtype.bytes() as u128;
    let n = params as u128;
    let weights = n * e;
    let master = if step.dtype == TrainDtype::F32 {
        0
    } else {
        n * F32_BYTES as u128
    };
    let optim = if optimizer {
        n * (ADAMW_STATES * F32_BYTES) as u128 + master
    } else {
        0
    };
    let base = 2 * weights + optim;
    let (s, b, h, a, l) = (
        step.seq as u128,
        step.batch as u128,
        cfg.n_embd as u128,
        cfg.n_head as u128,
        cfg.n_layer as u128,
    );
    let published = l
        * (KORTHIKANTI_SBH_BYTES as u128 * s * b * h
            + KORTHIKANTI_SCORE_BYTES as u128 * a * s * s * b);
    let ours_dtype = l
        * e
        * (KORTHIKANTI_SBH_ELEMENTS_NO_DROPOUT as u128 * s * b * h
            + KORTHIKANTI_SCORE_ELEMENTS_NO_DROPOUT as u128 * a * s * s * b);
    let sat = |x: u128| u64::try_from(x).unwrap_or(u64::MAX);
    let opt_txt = if optimizer { " + AdamW states" } else { "" };
    let dt = step.dtype.name();
    vec![
        RuleOfThumb {
            key: "truesize",
            name: "truesize prediction",
            formula: "the engine's own model of this step (lean: closed form; autograd: per-op replay)".into(),
            assumptions: "what the running engine allocates and keeps for this network",
            predicted_peak_bytes: predicted_peak,
            measured_peak_bytes: None,
            rel_error: None,
        },
        RuleOfThumb {
            key: "korthikanti_16bit",
            name: "Korthikanti 2022, as published",
            formula: format!(
                "2 × weights{opt_txt} + L·s·b·h·(34 + 5·a·s/h) = {} + {}·{}·{}·{}·(34 + 5·{}·{}/{})",
                sat(base),
                l,
                s,
                b,
                h,
                a,
                s,
                h
            ),
            assumptions: "Megatron GPT layer, 16-bit activations, dropout masks (1 B/element), \
                          MLP 4h, no logits/loss/embeddings",
            predicted_peak_bytes: sat(base + published),
            measured_peak_bytes: None,
            rel_error: None,
        },
        RuleOfThumb {
            key: "korthikanti_dtype",
            name: "Korthikanti, in the run dtype, no dropout",
            formula: format!(
                "2 × weights{opt_txt} + L·{e}·s·b·h·(16 + a·s/h)  ({e} B = {dt} element)"
            ),
            assumptions: "the same 16 kept s·b·h tensors and softmax output, counted in elements \
                          of the run dtype; masks and dropout output dropped (our networks have \
                          no dropout); no logits/loss/embeddings",
            predicted_peak_bytes: sat(base + ours_dtype),
            measured_peak_bytes: None,
            rel_error: None,
        },
        RuleOfThumb {
            key: "weights_x3",
            name: "3 × weights (rule of thumb, low end)",
            formula: format!("3 × {} B ({dt} weights)", sat(weights)),
            assumptions: "the folk rule \"training needs 3–4× the weights\"",
            predicted_peak_bytes: sat(FOLK_LOW_MULTIPLE as u128 * weights),
            measured_peak_bytes: None,
            rel_error: None,
        },
        RuleOfThumb {
            key: "weights_x4",
            name: "4 × weights (rule of thumb, high end)",
            formula: format!("4 × {} B ({dt} weights)", sat(weights)),
            assumptions: "the folk rule \"training needs 3–4× the weights\"",
            predicted_peak_bytes: sat(FOLK_HIGH_MULTIPLE as u128 * weights),
            measured_peak_bytes: None,
            rel_error: None,
        },
        RuleOfThumb {
            key: "weights_grads_adam",
            name: "weights + grads + Adam (16 B/param)",
            formula: format!("16 × {} params", n),
            assumptions: "mixed precision 2 + 2 + 4 + 8, or f32 4·(1 + 1 + 2); no activations \
                          (counts Adam states even when the step ran no optimizer)",
            predicted_peak_bytes: sat(WEIGHTS_GRADS_ADAM_BYTES_PER_PARAM as u128 * n),
            measured_peak_bytes: None,
            rel_error: None,
        },
    ]
}

/// Fill in each rule's error against the measured peak.
pub fn score(rules: &mut [RuleOfThumb], measured_peak_bytes: u64) {
    for r in rules {
        r.measured_peak_bytes = Some(measured_peak_bytes);
        r.rel_error = Some(crate::units::rel_error(
            r.predicted_peak_bytes as f64,
            measured_peak_bytes as f64,
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::presets;
    use crate::estimate::params::estimate;

    /// Our own prediction is the caller's (tested in tests/peak_prediction.rs); these tests check the
    /// rules of thumb only.
    const REPLAY_NOT_UNDER_TEST: u64 = 0;

    fn baby() -> (ModelConfig, u64) {
        let cfg = presets::load("baby-gpt").unwrap();
        let n = estimate(&cfg).unwrap().total;
        (cfg, n)
    }

    #[test]
    fn korthikanti_published_hand_checked() {
        // baby-gpt: L=4, h=256, a=4; b=4, s=64 -> per layer 64·4·256·34 + 5·4·64²·4 = 2,228,224 +
        // 327,680 = 2,555,904 B; × 4 layers = 10,223,616; + 2 × 3,481,088 × 4 B = 27,848,704.
        let (cfg, n) = baby();
        let step = Step {
            batch: 4,
            seq: 64,
            dtype: TrainDtype::F32,
        };
        let r = predict(&cfg, n, step, false, REPLAY_NOT_UNDER_TEST);
        let k = r.iter().find(|r| r.key == "korthikanti_16bit").unwrap();
        assert_eq!(k.predicted_peak_bytes, 10_223_616 + 27_848_704);
        // f32 no dropout: 4 · 4 · (16·64·4·256 + 4·64²·4) = 16 · (1,048,576 + 65,536)
        let k = r.iter().find(|r| r.key == "korthikanti_dtype").unwrap();
        assert_eq!(k.predicted_peak_bytes, 16 * 1_114_112 + 27_848_704);
    }

    #[test]
    fn seed_rules_and_sixteen_bytes() {
        let (cfg, n) = baby();
        let step = Step {
            batch: 1,
            seq: 16,
            dtype: TrainDtype::Bf16,
        };
        let r = predict(&cfg, n, step, false, REPLAY_NOT_UNDER_TEST);
        let get = |k: &str| r.iter().find(|r| r.key == k).unwrap().predicted_peak_bytes;
        assert_eq!(get("weights_x3"), 3 * 2 * n);
        assert_eq!(get("weights_x4"), 4 * 2 * n);
        assert_eq!(get("weights_grads_adam"), 16 * n);
    }

    #[test]
    fn score_is_relative_to_measured() {
        let (cfg, n) = baby();
        let step = Step {
            batch: 1,
            seq: 16,
            dtype: TrainDtype::F32,
        };
        let mut r = predict(&cfg, n, step, false, REPLAY_NOT_UNDER_TEST);
        let measured = r[3].predicted_peak_bytes / 3 * 2;
        score(&mut r, measured);
        let e = r[3].rel_error.unwrap();
        assert!((e - 0.5).abs() < 1e-6, "{e}");
    }
}
