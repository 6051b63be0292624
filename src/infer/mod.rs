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

pub mod cache;
pub mod load;
pub mod model;
pub mod run;
