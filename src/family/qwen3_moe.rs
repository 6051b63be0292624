//! Qwen3-MoE (HF `model_type` "qwen3_moe", truesize `arch = "qwen3_moe"`): Qwen3's attention
//! (q/k norms) with routed experts of width `moe_intermediate_size` in the layers that
//! `decoder_sparse_step` and `mlp_only_layers` choose (the others keep a dense MLP of
//! `intermediate_size`); softmax over all experts, top-k, renormalised only with
//! `norm_topk_prob`; hub names `mlp.gate` and `mlp.experts.E.{gate,up,down}_proj`. A sliding
//! window (`use_sliding_window`) applies to every layer.

use super::llama::{
    check_activation, layer_attention, rope_scaling, skeleton, skeleton_global_tensors,
    skeleton_guess_component, skeleton_layer_kind, skeleton_layer_tensors, skeleton_mlp_vs_rule,
    skeleton_rule_exceptions, skeleton_toml, sliding_window, validate_skeleton, SkeletonDefaults,
    SILU_ONLY,
};
use super::{Component, Family, ParamTensor};
use crate::config::fields::{JsonKeys, TomlFields};
use crate::config::{Arch, ExpertNames, ModelConfig};
use crate::error::{Error, Result};

pub struct Qwen3Moe;

/// `Qwen3MoeConfig`'s defaults (transformers 5.24). It has no head_dim field: the model reads
/// `getattr(config, "head_dim", hidden // heads)`.
const DEFAULTS: SkeletonDefaults = SkeletonDefaults {
    vocab_size: 151936,
    hidden_size: 2048,
    intermediate_size: 6144,
    num_hidden_layers: 24,
    num_attention_heads: 32,
    num_key_value_heads: Some(4),
    head_dim: None,
    max_position_embeddings: 32768,
    rms_norm_eps: 1e-6,
    rope_theta: 10_000.0,
    tie_word_embeddings: false,
    pad_token_id: None,
};

impl Family for Qwen3Moe {
    fn name(&self) -> &'static str {
        "qwen3_moe"
    }

    fn arch(&self) -> Arch {
        Arch::Llama
    }

    fn model_types(&self) -> &'static [&'static str] {
        &["qwen3_moe"]
    }

    fn toml_arch(&self) -> &'static str {
        "qwen3_moe"
    }

    fn hf_spelling(&self, _model_type: &str) -> &'static [(&'static str, &'static str)] {
        &[
            ("n_embd", "hidden_size"),
            ("n_layer", "num_hidden_layers"),
            ("n_head", "num_attention_heads"),
            ("n_kv_head", "num_key_value_heads"),
            ("block_size", "max_position_embeddings"),
            ("norm_eps", "rms_norm_eps"),
            ("n_experts", "num_experts"),
            ("n_experts_per_tok", "num_experts_per_tok"),
        ]
    }

    fn read_hf(&self, model_type: &str, o: &JsonKeys<'_>) -> Result<ModelConfig> {
        let mut cfg = skeleton(o, model_type, &DEFAULTS)?;
        check_activation(o, "hidden_act", &["silu"], SILU_ONLY)?;
        cfg.rope_scaling = rope_scaling(o)?;
        cfg.qk_norm = true;
        cfg.bias = o.bool_or("attention_bias", false)?;
        let window = if o.bool_or("use_sliding_window", false)? {
            sliding_window(o, Some(4096))?
        } else {
            None
        };
        cfg.layer_attention = layer_attention(o, cfg.n_layer, window, |_| true)?;
        // transformers maps `num_experts` onto `num_local_experts` (attribute_map); a saved
        // config may carry either spelling.
        let experts_key = if o.get("num_experts").is_some() {
            "num_experts"
        } else {
            "num_local_experts"
        };
        cfg.n_experts = o.usize_or(experts_key, 128)?;
        cfg.n_experts_per_tok = o.usize_or("num_experts_per_tok", 8)?;
        if cfg.n_experts == 0 {
            return Err(o.err(experts_key, 0, "must be > 0"));
        }
        if cfg.n_experts_per_tok == 0 || cfg.n_experts_per_tok > cfg.n_experts {
            return Err(o.err(
                "num_experts_per_tok",
                cfg.n_experts_per_tok,
                format!("must be between 1 and {experts_key} = {}", cfg.n_experts),
            ));
        }
        cfg.moe_intermediate_size = o.usize_or("moe_intermediate_size", 768)?;
        if cfg.moe_intermediate_size == 0 {
            return Err(o.err("moe_intermediate_size", 0, "must be > 0"));
        }
        cfg.moe_renormalize = o.bool_or("norm_topk_prob", false)?;
        cfg.moe_sparse_step = o.usize_or("decoder_sparse_step", 1)?;
        if cfg.moe_sparse_step == 0 {
            return Err(o.err(
                "decoder_sparse_step",
                0,
                "must be >= 1 (layer i is sparse when i + 1 is a multiple of it)",
            ));
        }
        cfg.moe_dense_layers = o.usize_list("mlp_only_layers")?.unwrap_or_default();
        cfg.expert_names = ExpertNames::Qwen;
        Ok(cfg)
    }

    /// `n_experts` (128 by default), `n_experts_per_tok` (8), `moe_intermediate_size`
    /// (required), `moe_renormalize` (false); every layer sparse.
    fn read_toml(&self, f: &TomlFields) -> Result<ModelConfig> {
        f.only_switches("qwen3_moe", &["moe_intermediate_size", "moe_renormalize"])?;
        let mut cfg = skeleton_toml(f, "qwen3_moe", "qwen3_moe")?;
        cfg.qk_norm = true;
        cfg.n_experts = f.n_experts.unwrap_or(128);
        cfg.n_experts_per_tok = f.n_experts_per_tok.unwrap_or(8);
        let Some(width) = f.switches.moe_intermediate_size else {
            return Err(Error::field(
                &f.src,
                "moe_intermediate_size",
                "(missing)",
                "required for arch = \"qwen3_moe\" (an expert's width)",
            ));
        };
        cfg.moe_intermediate_size = width;
        cfg.moe_renormalize = f.switches.moe_renormalize.unwrap_or(false);
        cfg.expert_names = ExpertNames::Qwen;
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

    fn layer_kind(&self, cfg: &ModelConfig, layer: usize) -> usize {
        skeleton_layer_kind(cfg, layer)
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
