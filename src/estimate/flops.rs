//! FLOPs of one sequence of `T` tokens, per matmul, in the nanoGPT notebook's convention
//! (`transformer_sizing.ipynb`, `flops()`):
//!
//! - a matmul `[m, k] @ [k, n]` costs `2·m·n·k` FLOPs (one multiply and one add per MAC);
//! - only matmuls count: norms, softmax, activations, residual adds and bias adds are left out
//!   ("effectively irrelevant"), and the embedding lookups cost 0;
//! - attention scores `Q·Kᵀ` and the attention-weighted sum of `V` are counted in full `T×T`
//!   (optionally only the query–key pairs the mask keeps: `T(T+1)/2` under a causal mask, and
//!   on a sliding-window layer of window `w < T` only `w(w+1)/2 + (T − w)·w`, the band a
//!   windowed kernel computes);
//! - the lm head (`[T, d] @ [d, V]`) is included;
//! - backward = 2 × forward (the notebook's "common estimate": gradients w.r.t. the input and
//!   w.r.t. the weights each cost one forward).
//!
//! The PaLM formula (Chowdhery et al. 2022, appendix B) `6·N + 12·L·H·Q·T` FLOPs per token is
//! computed separately, from the parameter count, and compared.

use super::params::{Component, ParamEstimate};
use crate::config::{Attention, ModelConfig};
use crate::error::{Error, Result};
use crate::family::{self, Kind};
use serde::{Serialize, Serializer};

/// FLOPs per multiply–accumulate: the notebook's `2·m·n·k` ("we count actual FLOPs, not MACs").
pub const FLOPS_PER_MAC: u64 = 2;
/// Backward costs twice the forward (nanoGPT notebook, `flops()`: "use common estimate of
/// bwd = 2*fwd"; Kaplan et al. 2020, §2.1).
pub const BACKWARD_PER_FORWARD: u64 = 2;
/// PaLM's per-parameter training FLOPs per token: 2 forward + 4 backward (Chowdhery et al.
/// 2022, appendix B; Kaplan et al. 2020 eq. 2.1's `6N`).
pub const PALM_FLOPS_PER_PARAM: u64 = 6;
/// PaLM's attention term `12·L·H·Q·T`: scores and values, forward (2 + 2) and backward (×3).
pub const PALM_ATTENTION_FACTOR: u64 = 12;

/// The matmul terms with weights: (term, component of the matrix, kind when the component
/// holds matrices of more than one term).
const MATMUL_TERMS: [(&str, Component, Option<Kind>); 6] = [
    ("attention/qkv", Component::Attention, Some(Kind::MatmulIn)),
    (
        "attention/proj",
        Component::Attention,
        Some(Kind::MatmulOut),
    ),
    ("mlp", Component::Mlp, None),
    ("router", Component::Router, None),
    ("experts", Component::Experts, None),
    ("lm_head", Component::LmHead, None),
];

/// One counted matmul (summed over all layers), forward FLOPs for one sequence.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FlopsTerm {
    /// The notebook's names: `attention/qkv`, `attention/scores`, `attention/reduce`,
    /// `attention/proj`, `mlp`, `router`, `experts`, `lm_head`.
    pub term: &'static str,
    /// The parameter group whose weights the matmul uses; `None` for the two attention matmuls
    /// between activations (scores and reduce), which use no weights.
    pub component: Option<Component>,
    pub forward: u64,
}

/// FLOPs of one sequence of `seq` tokens: computed once here, only read by verify and report.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FlopsEstimate {
    /// Tokens in the sequence (`--seq`).
    pub seq: usize,
    /// Whether the attention terms count only the causal lower triangle.
    pub causal: bool,
    /// Forward FLOPs of one sequence (2·m·n·k per matmul).
    pub forward: u64,
    /// The same forward with the attention terms counted over the causal lower triangle only
    /// (`T(T+1)/2` query–key pairs per head instead of `T²`): the FLOPs a masked kernel needs.
    pub forward_causal: u64,
    /// Backward FLOPs: 2 × forward.
    pub backward: u64,
    /// forward + backward.
    pub total: u64,
    /// Multiply–accumulates of the forward pass: forward / 2 (what fvcore/thop call "FLOPs").
    pub forward_macs: u64,
    /// forward / seq.
    pub forward_per_token: f64,
    /// N in the PaLM formula: parameters that take part in a matmul for every token (tied
    /// embeddings included as the head; positions, an untied token embedding and idle experts
    /// excluded).
    pub palm_params: u64,
    /// `6·N + 12·L·H·Q·T`, training FLOPs per token.
    pub palm_per_token: u64,
    /// `palm_per_token · seq`: PaLM's training FLOPs for the sequence.
    pub palm_total: u64,
    /// `palm_total / total` (nanoGPT's 124M at T = 1024: 1.0001).
    pub palm_ratio: f64,
    /// Forward FLOPs per term, all layers.
    #[serde(serialize_with = "terms_as_map")]
    pub terms: Vec<FlopsTerm>,
    /// Forward FLOPs per parameter group (attention includes scores and reduce).
    #[serde(serialize_with = "components_as_map")]
    pub components: Vec<(Component, u64)>,
}

fn terms_as_map<S: Serializer>(t: &[FlopsTerm], s: S) -> std::result::Result<S::Ok, S::Error> {
    use serde::ser::SerializeMap;
    let mut m = s.serialize_map(Some(t.len()))?;
    for x in t {
        m.serialize_entry(x.term, &x.forward)?;
    }
    m.end()
}

fn components_as_map<S: Serializer>(
    c: &[(Component, u64)],
    s: S,
) -> std::result::Result<S::Ok, S::Error> {
    use serde::ser::SerializeMap;
    let mut m = s.serialize_map(Some(c.len()))?;
    for (comp, f) in c {
        m.serialize_entry(comp.name(), f)?;
    }
    m.end()
}

impl FlopsEstimate {
    /// Forward FLOPs of one term (0 when absent).
    pub fn term(&self, name: &str) -> u64 {
        self.terms
            .iter()
            .find(|t| t.term == name)
            .map_or(0, |t| t.forward)
    }
}

fn to_u64(cfg: &ModelConfig, what: &str, v: u128) -> Result<u64> {
    u64::try_from(v).map_err(|_| {
        Error::field(
            &cfg.name,
            what,
            v,
            "FLOP count overflows 64 bits: the config or --seq is absurd",
        )
    })
}

/// Query–key pairs a layer's mask keeps for `t` tokens: the causal triangle, or the band of a
/// sliding window (query i sees keys i − w < j ≤ i).
pub fn kept_pairs(attention: Attention, t: usize) -> u128 {
    let t = t as u128;
    match attention {
        Attention::Sliding { window } if (window as u128) < t => {
            let w = window as u128;
            w * (w + 1) / 2 + (t - w) * w
        }
        _ => t * (t + 1) / 2,
    }
}

/// Forward/backward FLOPs for one sequence of `seq` tokens, and the PaLM comparison.
pub fn estimate(
    cfg: &ModelConfig,
    p: &ParamEstimate,
    seq: usize,
    causal: bool,
) -> Result<FlopsEstimate> {
    let mac = FLOPS_PER_MAC as u128;
    let t = seq as u128;
    let l = cfg.n_layer as u128;
    let q = cfg.q_dim() as u128;
    // Query–key pairs per head: all T² (the notebook), or the causal lower triangle.
    // Summed over the layers: a sliding window keeps fewer pairs than the causal triangle.
    let masked_pairs: u128 = (0..cfg.n_layer)
        .map(|i| kept_pairs(cfg.attention(i), seq))
        .sum();
    let all_pairs = if causal { masked_pairs } else { l * t * t };
    // Every matrix of the family's tensor list costs 2·numel FLOPs per token that passes through
    // it: all tokens, or for an expert the n_experts_per_tok / n_experts routed to it.
    let mut weights = [0u128; MATMUL_TERMS.len()];
    let mut embed_tokens = 0u128;
    for (tensor, times) in family::weighted_tensors(cfg) {
        let n = tensor.numel() as u128 * times as u128;
        if tensor.component == Component::EmbedTokens {
            embed_tokens += n;
        }
        if !tensor.kind.is_matmul() {
            continue;
        }
        if let Some(i) = MATMUL_TERMS
            .iter()
            .position(|&(_, c, k)| c == tensor.component && k.is_none_or(|k| k == tensor.kind))
        {
            weights[i] += n;
        }
    }
    let term_weights = |name: &str| {
        MATMUL_TERMS
            .iter()
            .position(|&(n, _, _)| n == name)
            .map_or(0, |i| weights[i])
    };
    // [T, d] @ [d, q + 2kv]
    let qkv = mac * t * term_weights("attention/qkv");
    // per query head: [T, hd] @ [hd, T] -> scores; [T, T] @ [T, hd] -> values. With GQA the
    // k/v heads are shared but every query head still does its own matmuls.
    let scores = mac * all_pairs * q;
    let reduce = mac * all_pairs * q;
    // [T, q] @ [q, d]
    let proj = mac * t * term_weights("attention/proj");
    let mlp = mac * t * term_weights("mlp");
    // router [T, d] @ [d, E]; each token runs k of the E experts
    let router = mac * t * term_weights("router");
    let experts = if cfg.n_experts > 0 {
        mac * t * term_weights("experts") * cfg.n_experts_per_tok as u128 / cfg.n_experts as u128
    } else {
        0
    };
    // [T, d] @ [d, V]; a tied head multiplies by the token embedding.
    let head = term_weights("lm_head");
    let lm_head = mac * t * if head > 0 { head } else { embed_tokens };
    let all_terms: [(&'static str, Option<Component>, u128); 7] = [
        ("attention/qkv", Some(Component::Attention), qkv),
        ("attention/scores", None, scores),
        ("attention/reduce", None, reduce),
        ("attention/proj", Some(Component::Attention), proj),
        ("mlp", Some(Component::Mlp), mlp),
        ("router", Some(Component::Router), router),
        ("experts", Some(Component::Experts), experts),
    ];
    let mut terms = Vec::new();
    let mut forward: u128 = 0;
    for (name, comp, all) in all_terms {
        if all == 0 {
            continue;
        }
        forward += all;
        terms.push(FlopsTerm {
            term: name,
            component: comp,
            forward: to_u64(cfg, name, all)?,
        });
    }
    forward += lm_head;
    terms.push(FlopsTerm {
        term: "lm_head",
        component: Some(Component::LmHead),
        forward: to_u64(cfg, "lm_head", lm_head)?,
    });
    let mut components: Vec<(Component, u64)> = Vec::new();
    for c in [
        Component::Attention,
        Component::Mlp,
        Component::Router,
        Component::Experts,
        Component::LmHead,
    ] {
        let f: u128 = terms
            .iter()
            .filter(|x| x.component.unwrap_or(Component::Attention) == c)
            .map(|x| u128::from(x.forward))
            .sum();
        let f = to_u64(cfg, c.name(), f)?;
        if f > 0 {
            components.push((c, f));
        }
    }

    // PaLM: N = parameters used in a matmul per token.
    let untied_embed = if cfg.tie_embeddings {
        0
    } else {
        p.get(Component::EmbedTokens)
    };
    let palm_params = p
        .active_per_token
        .saturating_sub(p.get(Component::EmbedPositions))
        .saturating_sub(untied_embed);
    let palm_per_token = PALM_FLOPS_PER_PARAM as u128 * palm_params as u128
        + PALM_ATTENTION_FACTOR as u128 * l * q * t;
    // Both attention terms are 2·pairs·q per layer.
    let forward_causal = forward - (scores + reduce) + 2 * mac * masked_pairs * q;
    let backward = BACKWARD_PER_FORWARD as u128 * forward;
    let total = forward + backward;
    let palm_total = palm_per_token * t;
    Ok(FlopsEstimate {
        seq,
        causal,
        forward: to_u64(cfg, "flops.forward", forward)?,
        forward_causal: to_u64(cfg, "flops.forward_causal", forward_causal)?,
        backward: to_u64(cfg, "flops.backward", backward)?,
        total: to_u64(cfg, "flops.total", total)?,
        forward_macs: to_u64(cfg, "flops.forward_macs", forward / mac)?,
        forward_per_token: forward as f64 / seq.max(1) as f64,
        palm_params,
        palm_per_token: to_u64(cfg, "flops.palm_per_token", palm_per_token)?,
        palm_total: to_u64(cfg, "flops.palm_total", palm_total)?,
        palm_ratio: palm_total as f64 / total.max(1) as f64,
        terms,
        components,
    })
}

/// Model FLOPs utilisation from a measured training step.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Mfu {
    /// Sequences in the step.
    pub batch: usize,
    /// Model FLOPs of the step: `batch × flops.total` (forward + backward).
    pub step_flops: u64,
    /// Measured forward (with loss) + backward seconds, medians.
    pub step_s: f64,
    /// step_flops / step_s.
    pub achieved_flops_per_s: f64,
    /// The device's peak, from `--peak-tflops` or the matmul probe; `None` when neither was
    /// asked for (a peak is never assumed).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peak_flops_per_s: Option<f64>,
    /// Where the peak comes from.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peak_source: Option<String>,
    /// achieved / peak.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mfu: Option<f64>,
}

/// MFU of a step of `batch` sequences that took `step_s` seconds, against `peak` (FLOP/s and
/// where it came from), if any.
pub fn mfu(f: &FlopsEstimate, batch: usize, step_s: f64, peak: Option<(f64, String)>) -> Mfu {
    let step_flops = f.total.saturating_mul(batch as u64);
    let achieved = if step_s > 0.0 {
        step_flops as f64 / step_s
    } else {
        f64::NAN
    };
    let (peak_flops_per_s, peak_source) = match peak {
        Some((p, src)) => (Some(p), Some(src)),
        None => (None, None),
    };
    Mfu {
        batch,
        step_flops,
        step_s,
        achieved_flops_per_s: achieved,
        peak_flops_per_s,
        peak_source,
        mfu: peak_flops_per_s.filter(|p| *p > 0.0).map(|p| achieved / p),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::presets;
    use crate::estimate::params;

    fn flops(name: &str, seq: usize, causal: bool) -> FlopsEstimate {
        let cfg = presets::load(name).unwrap();
        let p = params::estimate(&cfg).unwrap();
        estimate(&cfg, &p, seq, causal).unwrap()
    }

    /// nanoGPT `transformer_sizing.ipynb`, bias-free GPT-2 124M at T = 1024: forward_total
    /// 291,648,307,200; "palm_flops / flops()['total']" = 1.0001.
    #[test]
    fn nanogpt_notebook_figures() {
        let f = flops("gpt2-nobias", 1024, false);
        assert_eq!(f.forward, 291_648_307_200);
        assert_eq!(f.backward, 2 * 291_648_307_200);
        assert_eq!(f.total, 874_944_921_600);
        assert_eq!(f.forward_macs, 145_824_153_600);
        // the notebook's per-term values
        assert_eq!(f.term("attention/qkv"), 12 * 3_623_878_656);
        assert_eq!(f.term("attention/scores"), 12 * 1_610_612_736);
        assert_eq!(f.term("attention/reduce"), 12 * 1_610_612_736);
        assert_eq!(f.term("attention/proj"), 12 * 1_207_959_552);
        assert_eq!(f.term("mlp"), 12 * 9_663_676_416);
        assert_eq!(f.term("lm_head"), 79_047_426_048);
        // N = 124,337,664 − 1024·768 positions = 123,551,232
        assert_eq!(f.palm_params, 123_551_232);
        assert_eq!(f.palm_per_token, 6 * 123_551_232 + 12 * 12 * 12 * 64 * 1024);
        assert_eq!(f.palm_total, 875_062_886_400);
        assert_eq!(format!("{:.4}", f.palm_ratio), "1.0001");
    }

    #[test]
    fn causal_halves_attention_terms_only() {
        let full = flops("gpt2-nobias", 1024, false);
        let c = flops("gpt2-nobias", 1024, true);
        // T(T+1)/2 of T² pairs
        assert_eq!(
            c.term("attention/scores"),
            full.term("attention/scores") / (1024 * 1024) * (1024 * 1025 / 2)
        );
        assert_eq!(c.term("mlp"), full.term("mlp"));
        assert_eq!(c.term("lm_head"), full.term("lm_head"));
        assert!(c.causal && !full.causal);
        assert_eq!(full.forward_causal, c.forward);
        assert_eq!(c.forward_causal, c.forward);
    }

    /// Llama-3-8B (GQA 32/8, SwiGLU 14336, untied), T = 1: the 2·N rule holds exactly when the
    /// attention terms are negligible: forward = 2 × (params − token embedding), since the
    /// lookup is free and every other parameter is one MAC per token (no biases, norms aside).
    #[test]
    fn llama3_gqa_swiglu_per_token() {
        let cfg = presets::load("llama3-8b").unwrap();
        let p = params::estimate(&cfg).unwrap();
        let f = estimate(&cfg, &p, 1, false).unwrap();
        let norms = p.get(Component::Norms) + p.get(Component::FinalNorm);
        let attn_pairs = 2 * 2 * 32 * 4096; // scores + reduce: 2·1·q, 32 layers
        assert_eq!(
            f.forward,
            2 * (p.total - p.get(Component::EmbedTokens) - norms) + attn_pairs
        );
        // q: 4096, k/v: 1024 each
        assert_eq!(f.term("attention/qkv"), 32 * 2 * 4096 * (4096 + 2 * 1024));
        assert_eq!(f.term("mlp"), 32 * 2 * 3 * 4096 * 14336);
        assert_eq!(f.palm_params, p.total - p.get(Component::EmbedTokens));
    }

    /// Mixtral 8x7B: only the 2 active experts and the router cost FLOPs.
    #[test]
    fn mixtral_counts_active_experts() {
        let f = flops("mixtral-8x7b", 1, false);
        assert_eq!(f.term("experts"), 32 * 2 * 2 * 3 * 4096 * 14336);
        assert_eq!(f.term("router"), 32 * 2 * 4096 * 8);
        assert_eq!(f.term("mlp"), 0);
        // PaLM's N: active parameters (12,879,925,248) minus the untied token embedding.
        assert_eq!(f.palm_params, 12_879_925_248 - 32_000 * 4096);
    }

    /// Explicit head_dim (q_dim ≠ n_embd): small hand case d = 8, 4 heads × 4, 2 kv heads.
    #[test]
    fn explicit_head_dim() {
        let cfg = crate::config::toml::parse(
            "arch='llama'\nvocab_size=10\nblock_size=6\nn_embd=8\nn_layer=1\nn_head=4\n\
             n_kv_head=2\nhead_dim=4\nintermediate_size=12\n",
            "t",
        )
        .unwrap();
        let p = params::estimate(&cfg).unwrap();
        let f = estimate(&cfg, &p, 3, false).unwrap();
        assert_eq!(f.term("attention/qkv"), 2 * 3 * 8 * (16 + 16));
        assert_eq!(f.term("attention/scores"), 2 * 9 * 16);
        assert_eq!(f.term("attention/proj"), 2 * 3 * 16 * 8);
        assert_eq!(f.term("mlp"), 2 * 3 * 3 * 8 * 12);
        assert_eq!(f.term("lm_head"), 2 * 3 * 8 * 10);
    }

    #[test]
    fn mfu_needs_a_peak() {
        let f = flops("baby-gpt", 64, false);
        let m = mfu(&f, 4, 2.0, None);
        assert!(m.mfu.is_none());
        assert_eq!(m.step_flops, 4 * f.total);
        let m = mfu(
            &f,
            4,
            2.0,
            Some((m.achieved_flops_per_s * 4.0, "given".into())),
        );
        assert!((m.mfu.unwrap() - 0.25).abs() < 1e-12);
    }

    /// A sliding window keeps the band w(w+1)/2 + (T − w)·w of query–key pairs; the dense count
    /// is unchanged, and a window at least T long is the causal triangle.
    #[test]
    fn sliding_windows_keep_a_band() {
        use crate::config::Attention;
        assert_eq!(kept_pairs(Attention::Full, 16), 136);
        assert_eq!(kept_pairs(Attention::Sliding { window: 16 }, 16), 136);
        assert_eq!(kept_pairs(Attention::Sliding { window: 20 }, 16), 136);
        // window 4, T 6: rows see 1, 2, 3, 4, 4, 4 keys
        assert_eq!(kept_pairs(Attention::Sliding { window: 4 }, 6), 18);
        let mut cfg = crate::config::toml::parse(
            "arch='gemma2'\nvocab_size=50\nblock_size=64\nn_embd=32\nn_layer=2\nn_head=4\n\
             head_dim=8\nintermediate_size=48\nsliding_window=4\n",
            "t",
        )
        .unwrap();
        let p = crate::estimate::params::estimate(&cfg).unwrap();
        let windowed = estimate(&cfg, &p, 6, true).unwrap();
        let windowed_dense = estimate(&cfg, &p, 6, false).unwrap();
        cfg.set_all_attention(Attention::Full);
        let full = estimate(&cfg, &p, 6, true).unwrap();
        let full_dense = estimate(&cfg, &p, 6, false).unwrap();
        // layer 0 slides (18 pairs instead of 21), layer 1 is global; 2 matmuls · 2 FLOPs · q.
        let q = 4 * 8;
        assert_eq!(full.forward_causal - windowed.forward_causal, 2 * 2 * 3 * q);
        assert_eq!(windowed.forward, windowed.forward_causal);
        assert_eq!(windowed.term("attention/scores"), 2 * (18 + 21) * q);
        assert_eq!(full_dense.forward, windowed_dense.forward);
        assert_eq!(windowed_dense.term("attention/scores"), 2 * 2 * 36 * q);
    }
}
