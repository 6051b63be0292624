//! Generation with a KV cache: the inference network (`model`), its cache (`cache`), weights
//! from random init, HF safetensors or GGUF (`load`), and a run measured phase by phase (`run`).
//! `estimate::serve::peaks` replays `model`'s allocations; the two change together.
//!
//! # Adding a family
//! The network is GPT-2 plus the Llama skeleton with switches, built in `load::Builder::build`:
//! - norms: `model::Norm` (RMS or Layer); a (1 + w) RMSNorm (Gemma) is a third variant, and
//!   q/k RMSNorms over head_dim (Qwen3, Gemma 3) an optional pair in `model::Attention`
//!   applied before RoPE;
//! - attention: per-layer windows come from `ModelConfig::attention_window` (the cache sizes
//!   each layer from it, a ring when smaller than the context); a logit soft-cap and a query
//!   scale other than hd^-½ belong beside the `affine` on q; fused `qkv_proj` is `model::Qkv`;
//! - MLP: `model::Mlp` (GELU, SwiGLU, MoE); GeGLU is SwiGLU with `gelu` for `silu`, a fused
//!   `gate_up_proj` one matrix split by rows, Qwen3-MoE's router the `Moe` arm with
//!   renormalisation optional;
//! - embeddings: a √d scale is one `affine` after the lookup; final-logit soft-cap after the head.
//!
//! Each switch needs the same op in `estimate::serve::peaks`, the HF → GGUF name table in
//! `estimate::serve::weights::gguf_name`, and (for GGUF files) the architecture in
//! `checkpoint::gguf::SUPPORTED_ARCHS` / `config_from_header` and `permutes_qk`.

use crate::config::{
    EmbeddingScale, ExpertNames, MlpKind, ModelConfig, NormKind, NormPlacement, RopeScaling,
    Storage,
};

pub mod cache;
pub mod load;
pub mod model;
pub mod run;

/// The switches of `cfg` the inference network does not implement yet (see "Adding a family"
/// above); a measured run of such a model is refused rather than run on the wrong math. The
/// serving estimate does not depend on them (weights, KV cache and windows are exact).
pub fn unsupported(cfg: &ModelConfig) -> Vec<&'static str> {
    let mut out = Vec::new();
    let mut not = |on: bool, what: &'static str| {
        if on {
            out.push(what)
        }
    };
    not(cfg.qk_norm, "q/k RMSNorms");
    not(cfg.norm == NormKind::RmsOnePlus, "(1 + w) RMSNorm");
    not(
        cfg.norm_placement != NormPlacement::Pre,
        "four norms per layer",
    );
    not(cfg.mlp == MlpKind::GeGlu, "GeGLU");
    not(
        cfg.embedding_scale != EmbeddingScale::None,
        "√d embedding scale",
    );
    not(
        cfg.attn_scalar != cfg.head_dim as f64,
        "a query scale other than head_dim^-1/2",
    );
    not(cfg.attn_softcap.is_some(), "attention logit soft-cap");
    not(cfg.final_softcap.is_some(), "final logit soft-cap");
    not(
        cfg.qkv_storage == Storage::Fused || cfg.gate_up_storage == Storage::Fused,
        "fused qkv_proj / gate_up_proj",
    );
    not(cfg.rotary_dim != cfg.head_dim, "partial rotary");
    not(
        matches!(
            cfg.rope_scaling,
            Some(RopeScaling::Linear { .. } | RopeScaling::LongRope(_))
        ),
        "linear or LongRoPE scaling",
    );
    not(cfg.rope_per_layer_type, "RoPE per layer type");
    not(
        cfg.is_moe()
            && (cfg.expert_names != ExpertNames::Mixtral
                || cfg.moe_intermediate_size != cfg.intermediate_size
                || !cfg.moe_renormalize
                || cfg.moe_layer_count() != cfg.n_layer),
        "Qwen-MoE experts",
    );
    out
}
