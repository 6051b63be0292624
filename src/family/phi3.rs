//! Phi-3 (HF `model_type` "phi3", truesize `arch = "phi3"`; Phi-3.5-mini and Phi-4 too): the
//! Llama skeleton with q, k and v stored as one `qkv_proj` (rows q | k | v) and gate and up as
//! one `gate_up_proj` (rows gate | up), no biases, untied head, GQA in the larger sizes, RoPE on
//! the first `partial_rotary_factor` of each head, LongRoPE scaling (`longrope`, and the older
//! `su` / `yarn` names transformers maps onto it; sizes do not change), and a `sliding_window`
//! on every layer when set (Phi-3-mini-4k: 2047).

use super::llama::{
    check_activation, layer_attention, rope_scaling_obj, rope_type, skeleton,
    skeleton_global_tensors, skeleton_guess_component, skeleton_layer_tensors,
    skeleton_mlp_vs_rule, skeleton_rule_exceptions, skeleton_toml, sliding_window,
    toml_layer_attention, validate_skeleton, SkeletonDefaults, SILU_ONLY,
};
use super::{Component, Family, ParamTensor};
use crate::config::fields::{JsonKeys, TomlFields};
use crate::config::{Arch, LongRope, ModelConfig, RopeScaling, Storage};
use crate::error::Result;

pub struct Phi3;

/// `Phi3Config`'s defaults (transformers 5.24); `pad_token_id` 32000 is its embedding's
/// `padding_idx`.
const DEFAULTS: SkeletonDefaults = SkeletonDefaults {
    vocab_size: 32064,
    hidden_size: 3072,
    intermediate_size: 8192,
    num_hidden_layers: 32,
    num_attention_heads: 32,
    num_key_value_heads: None,
    head_dim: None,
    max_position_embeddings: 4096,
    rms_norm_eps: 1e-5,
    rope_theta: 10_000.0,
    tie_word_embeddings: false,
    pad_token_id: Some(32000),
};

/// `original_max_position_embeddings`'s default.
const ORIGINAL_CONTEXT: usize = 4096;

/// The fused storage every Phi-3 has.
fn phi3_layout(cfg: &mut ModelConfig) {
    cfg.qkv_storage = Storage::Fused;
    cfg.gate_up_storage = Storage::Fused;
}

/// `partial_rotary_factor`: inside the RoPE parameters (transformers 5) or at the top level.
fn rotary_dim(o: &JsonKeys<'_>, scaling: Option<&JsonKeys<'_>>, head_dim: usize) -> Result<usize> {
    let key = "partial_rotary_factor";
    let prf = match scaling.filter(|s| s.get(key).is_some()) {
        Some(s) => s.positive_opt(key)?,
        None => match o.obj("rope_parameters")? {
            Some(p) if p.get(key).is_some() => p.positive_opt(key)?,
            _ => o.positive_opt(key)?,
        },
    }
    .unwrap_or(1.0);
    // transformers: int(head_dim * partial_rotary_factor)
    let rotary = (head_dim as f64 * prf) as usize;
    if prf > 1.0 || rotary == 0 || !rotary.is_multiple_of(2) {
        return Err(o.err(
            key,
            prf,
            format!(
                "must give an even number of rotated channels between 2 and head_dim = {head_dim} (got {rotary})"
            ),
        ));
    }
    Ok(rotary)
}

/// LongRoPE as transformers' `_compute_longrope_parameters` reads it: one factor per rotated
/// pair, `factor` defaulting to max positions / original, the attention factor to
/// √(1 + ln factor / ln original) when factor > 1.
fn long_rope(o: &JsonKeys<'_>, s: &JsonKeys<'_>, cfg: &ModelConfig) -> Result<LongRope> {
    let original = match s.usize_opt("original_max_position_embeddings")? {
        Some(v) => v,
        None => o.usize_or("original_max_position_embeddings", ORIGINAL_CONTEXT)?,
    };
    if original == 0 {
        return Err(o.err("original_max_position_embeddings", 0, "must be > 0"));
    }
    let pairs = cfg.rotary_dim / 2;
    let factors = |key: &str| -> Result<Vec<f64>> {
        let Some(list) = s.f64_list(key)? else {
            return Err(s.err(
                key,
                "(missing)",
                "LongRoPE needs short_factor and long_factor",
            ));
        };
        if list.len() != pairs {
            return Err(s.err(
                key,
                format!("{} entries", list.len()),
                format!("needs one factor per rotated pair of channels ({pairs})"),
            ));
        }
        Ok(list)
    };
    let short_factor = factors("short_factor")?;
    let long_factor = factors("long_factor")?;
    let factor = s
        .positive_opt("factor")?
        .unwrap_or(cfg.block_size as f64 / original as f64);
    let attention_factor = match s.positive_opt("attention_factor")? {
        Some(a) => a,
        None if factor <= 1.0 => 1.0,
        None => (1.0 + factor.ln() / (original as f64).ln()).sqrt(),
    };
    Ok(LongRope {
        short_factor,
        long_factor,
        original_max_position_embeddings: original,
        attention_factor,
    })
}

impl Family for Phi3 {
    fn name(&self) -> &'static str {
        "phi3"
    }

    fn arch(&self) -> Arch {
        Arch::Llama
    }

    fn model_types(&self) -> &'static [&'static str] {
        &["phi3"]
    }

    fn toml_arch(&self) -> &'static str {
        "phi3"
    }

    fn read_hf(&self, model_type: &str, o: &JsonKeys<'_>) -> Result<ModelConfig> {
        let mut cfg = skeleton(o, model_type, &DEFAULTS)?;
        check_activation(o, "hidden_act", &["silu"], SILU_ONLY)?;
        phi3_layout(&mut cfg);
        cfg.layer_attention = layer_attention(o, cfg.n_layer, sliding_window(o, None)?, |_| true)?;
        let scaling = rope_scaling_obj(o)?;
        cfg.rotary_dim = rotary_dim(o, scaling.as_ref(), cfg.head_dim)?;
        let Some(s) = scaling else {
            return Ok(cfg);
        };
        cfg.rope_scaling = match rope_type(&s)? {
            None | Some("default") => None,
            Some("longrope" | "su" | "yarn") => {
                Some(RopeScaling::LongRope(long_rope(o, &s, &cfg)?))
            }
            Some(other) => {
                return Err(s.err(
                    "rope_type",
                    format!("{other:?}"),
                    "Phi-3 supports the RoPE types default and longrope (su, yarn)",
                ))
            }
        };
        Ok(cfg)
    }

    /// Untied, fused storage; a `sliding_window` applies to every layer.
    fn read_toml(&self, f: &TomlFields) -> Result<ModelConfig> {
        f.only_switches("phi3", &["sliding_window"])?;
        let mut cfg = skeleton_toml(f, "phi3", "phi3")?;
        phi3_layout(&mut cfg);
        cfg.norm_eps = f.norm_eps.unwrap_or(DEFAULTS.rms_norm_eps);
        cfg.layer_attention = toml_layer_attention(f, cfg.n_layer, |_| true);
        Ok(cfg)
    }

    fn validate(&self, cfg: &ModelConfig) -> Result<()> {
        validate_skeleton(cfg)
    }

    fn global_tensors(&self, cfg: &ModelConfig) -> Vec<ParamTensor> {
        skeleton_global_tensors(cfg)
    }

    fn layer_tensors(&self, cfg: &ModelConfig, layer: usize) -> Vec<ParamTensor> {
        skeleton_layer_tensors(cfg, layer)
    }

    fn guess_component(&self, name: &str) -> Option<Component> {
        skeleton_guess_component(name)
    }

    fn mlp_vs_rule(&self, cfg: &ModelConfig) -> String {
        skeleton_mlp_vs_rule(cfg)
    }

    fn rule_exceptions(&self, cfg: &ModelConfig) -> Vec<String> {
        skeleton_rule_exceptions(cfg)
    }
}
