//! Qwen3 (HF `model_type` "qwen3", truesize `arch = "qwen3"`): the Llama skeleton with an RMSNorm
//! over head_dim on every query and key head before RoPE (`self_attn.q_norm`, `k_norm`: one
//! head_dim weight each, shared by the heads), no q/k/v bias, head_dim 128 by default whatever
//! hidden / heads is, `attention_bias` on q, k, v and o, sliding windows as Qwen2.

use super::llama::{
    check_activation, qwen_layer_attention, rope_scaling, skeleton, skeleton_global_tensors,
    skeleton_guess_component, skeleton_layer_tensors, skeleton_mlp_vs_rule,
    skeleton_rule_exceptions, skeleton_toml, validate_skeleton, SkeletonDefaults, SILU_ONLY,
};
use super::{Component, Family, ParamTensor};
use crate::config::fields::{JsonKeys, TomlFields};
use crate::config::{Arch, ModelConfig};
use crate::error::Result;

pub struct Qwen3;

/// `Qwen3Config`'s defaults (transformers 5.24).
const DEFAULTS: SkeletonDefaults = SkeletonDefaults {
    vocab_size: 151936,
    hidden_size: 4096,
    intermediate_size: 22016,
    num_hidden_layers: 32,
    num_attention_heads: 32,
    num_key_value_heads: Some(32),
    head_dim: Some(128),
    max_position_embeddings: 32768,
    rms_norm_eps: 1e-6,
    rope_theta: 10_000.0,
    tie_word_embeddings: false,
    pad_token_id: None,
};

impl Family for Qwen3 {
    fn name(&self) -> &'static str {
        "qwen3"
    }

    fn arch(&self) -> Arch {
        Arch::Llama
    }

    fn model_types(&self) -> &'static [&'static str] {
        &["qwen3"]
    }

    fn toml_arch(&self) -> &'static str {
        "qwen3"
    }

    fn read_hf(&self, model_type: &str, o: &JsonKeys<'_>) -> Result<ModelConfig> {
        let mut cfg = skeleton(o, model_type, &DEFAULTS)?;
        check_activation(o, "hidden_act", &["silu"], SILU_ONLY)?;
        cfg.rope_scaling = rope_scaling(o)?;
        cfg.qk_norm = true;
        cfg.bias = o.bool_or("attention_bias", false)?;
        cfg.layer_attention = qwen_layer_attention(o, cfg.n_layer)?;
        Ok(cfg)
    }

    fn read_toml(&self, f: &TomlFields) -> Result<ModelConfig> {
        f.only_switches("qwen3", &[])?;
        let mut cfg = skeleton_toml(f, "qwen3", "qwen3")?;
        cfg.qk_norm = true;
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
