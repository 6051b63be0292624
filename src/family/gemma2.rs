//! Gemma 2 (HF `model_type` "gemma2", truesize `arch = "gemma2"`): the Llama skeleton with the
//! token embedding multiplied by √hidden (in the activation dtype), RMSNorm scaling by (1 + w),
//! four norms per layer (`input_layernorm`, `post_attention_layernorm` on the attention output,
//! `pre_feedforward_layernorm`, `post_feedforward_layernorm`), GeGLU with the tanh GELU, scores
//! scaled by `query_pre_attn_scalar`^-½, attention scores and final logits soft-capped
//! (c·tanh(x / c)), a sliding window on alternate layers (0, 2, ...), tied head, head_dim 256.

use super::llama::check_activation;
use super::llama::{
    layer_attention, rope_scaling, skeleton, skeleton_global_tensors, skeleton_guess_component,
    skeleton_layer_tensors, skeleton_mlp_vs_rule, skeleton_rule_exceptions, skeleton_toml,
    sliding_window, toml_layer_attention, validate_skeleton, SkeletonDefaults,
};
use super::{Component, Family, ParamTensor};
use crate::config::fields::{JsonKeys, TomlFields};
use crate::config::{Arch, EmbeddingScale, MlpKind, ModelConfig, NormKind, NormPlacement};
use crate::error::Result;

pub struct Gemma2;

/// `Gemma2Config`'s defaults (transformers 5.24).
const DEFAULTS: SkeletonDefaults = SkeletonDefaults {
    vocab_size: 256000,
    hidden_size: 2304,
    intermediate_size: 9216,
    num_hidden_layers: 26,
    num_attention_heads: 8,
    num_key_value_heads: Some(4),
    head_dim: Some(256),
    max_position_embeddings: 8192,
    rms_norm_eps: 1e-6,
    rope_theta: 10_000.0,
    tie_word_embeddings: true,
    pad_token_id: Some(0),
};

/// `Gemma2Config`: attention scores capped at 50, logits at 30, a 4096 window.
const ATTN_SOFTCAP: f64 = 50.0;
const FINAL_SOFTCAP: f64 = 30.0;
const WINDOW: usize = 4096;
/// `query_pre_attn_scalar`'s default in both Gemma configs.
pub(super) const QUERY_PRE_ATTN_SCALAR: f64 = 256.0;

/// Gemma 2's rule: even layers slide.
fn slides(layer: usize) -> bool {
    (layer + 1) % 2 == 1
}

/// The layout Gemma 2 and 3 share: embedding × √hidden, (1 + w) RMSNorm, four norms per layer,
/// GeGLU with the tanh GELU, scores / √query_pre_attn_scalar, soft-caps as configured (`null`
/// turns one off).
pub(super) fn gemma_switches(
    o: &JsonKeys<'_>,
    cfg: &mut ModelConfig,
    softcaps: (Option<f64>, Option<f64>),
) -> Result<()> {
    check_activation(
        o,
        "hidden_activation",
        &["gelu_pytorch_tanh", "gelu_new", "gelu_fast"],
        "truesize's Gemma implements GeGLU with the tanh GELU (gelu_pytorch_tanh) only",
    )?;
    gemma_layout(cfg);
    cfg.gelu = super::gpt2::gelu_form(
        o.str_opt("hidden_activation")?
            .unwrap_or("gelu_pytorch_tanh"),
    );
    cfg.bias = o.bool_or("attention_bias", false)?;
    cfg.attn_scalar = o
        .positive_opt("query_pre_attn_scalar")?
        .unwrap_or(QUERY_PRE_ATTN_SCALAR);
    cfg.attn_softcap = o.positive_or_off("attn_logit_softcapping", softcaps.0)?;
    cfg.final_softcap = o.positive_or_off("final_logit_softcapping", softcaps.1)?;
    if o.bool_or("use_bidirectional_attention", false)? {
        return Err(o.err(
            "use_bidirectional_attention",
            true,
            "a bidirectional encoder is not a causal language model; truesize sizes causal LMs",
        ));
    }
    Ok(())
}

/// The switches every Gemma has, whatever its config says.
pub(super) fn gemma_layout(cfg: &mut ModelConfig) {
    cfg.norm = NormKind::RmsOnePlus;
    cfg.norm_placement = NormPlacement::Sandwich;
    cfg.mlp = MlpKind::GeGlu;
    cfg.embedding_scale = EmbeddingScale::SqrtHidden;
}

impl Family for Gemma2 {
    fn name(&self) -> &'static str {
        "gemma2"
    }

    fn arch(&self) -> Arch {
        Arch::Llama
    }

    fn model_types(&self) -> &'static [&'static str] {
        &["gemma2"]
    }

    fn toml_arch(&self) -> &'static str {
        "gemma2"
    }

    fn read_hf(&self, model_type: &str, o: &JsonKeys<'_>) -> Result<ModelConfig> {
        let mut cfg = skeleton(o, model_type, &DEFAULTS)?;
        cfg.rope_scaling = rope_scaling(o)?;
        gemma_switches(o, &mut cfg, (Some(ATTN_SOFTCAP), Some(FINAL_SOFTCAP)))?;
        let window = sliding_window(o, Some(WINDOW))?;
        cfg.layer_attention = layer_attention(o, cfg.n_layer, window, slides)?;
        Ok(cfg)
    }

    /// Tied by default; `sliding_window` (4096), `attn_scalar` (256), `attn_softcap` (50) and
    /// `final_softcap` (30) as `Gemma2Config` defaults them.
    fn read_toml(&self, f: &TomlFields) -> Result<ModelConfig> {
        let s = &f.switches;
        f.only_switches(
            "gemma2",
            &[
                "sliding_window",
                "attn_scalar",
                "attn_softcap",
                "final_softcap",
            ],
        )?;
        let mut cfg = skeleton_toml(f, "gemma2", "gemma2")?;
        gemma_layout(&mut cfg);
        cfg.tie_embeddings = f.tie_embeddings.unwrap_or(true);
        cfg.attn_scalar = s.attn_scalar.unwrap_or(QUERY_PRE_ATTN_SCALAR);
        cfg.attn_softcap = Some(s.attn_softcap.unwrap_or(ATTN_SOFTCAP));
        cfg.final_softcap = Some(s.final_softcap.unwrap_or(FINAL_SOFTCAP));
        let mut with_window = f.clone();
        with_window.switches.sliding_window = Some(s.sliding_window.unwrap_or(WINDOW));
        cfg.layer_attention = toml_layer_attention(&with_window, cfg.n_layer, slides);
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
