//! `ModelConfig`: one resolved description of a model (no Options, no spelling variants), read
//! from truesize TOML, HF `config.json`, a model folder or a preset.
//!
//! Files here sit on both sides of `crate::family`: this file (the type and the generic checks)
//! and `fields.rs` (what readers hand to a family) are below it; the readers (`hf.rs`, `toml.rs`,
//! `presets.rs`, `load.rs`) and `validate.rs` dispatch through the family registry above it.

pub mod fields;
pub mod hf;
mod load;
pub mod presets;
mod step;
pub mod toml;
mod validate;

pub use load::{load, ConfigSource};
pub use step::{Step, DEFAULT_BATCH, DEFAULT_SEQ};

use crate::error::{Error, Result};
use serde::Serialize;

/// Largest value accepted for any single size field: far above any real model (Llama-3.1-405B
/// has d = 16,384, vocab = 128,256) but small enough that products of a few of them stay in u64.
pub const MAX_DIM: usize = 1 << 24;
/// Largest accepted layer count (real models have at most a few hundred).
pub const MAX_LAYERS: usize = 1 << 16;
/// Largest accepted expert count.
pub const MAX_EXPERTS: usize = 1 << 12;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    /// GPT-2: learned positions, LayerNorm, GELU (tanh) MLP, fused qkv (Conv1D [in, out]).
    Gpt2,
    /// Llama family (Llama, Mistral, Qwen2, Mixtral): RMSNorm, RoPE, SwiGLU, GQA.
    Llama,
}

impl Arch {
    pub fn name(self) -> &'static str {
        match self {
            Arch::Gpt2 => "gpt2",
            Arch::Llama => "llama",
        }
    }
}

/// The `[run]` defaults a config may carry.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct RunDefaults {
    pub batch: Option<usize>,
    pub seq: Option<usize>,
    pub dtype: Option<String>,
    pub tolerance: Option<f64>,
}

/// Llama-3 style RoPE frequency scaling (`rope_scaling` / `rope_parameters` with
/// `rope_type = "llama3"`). Changes numerics only, never the parameter count.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Llama3RopeScaling {
    pub factor: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    pub original_max_position_embeddings: usize,
}

/// A fully resolved model description. Field names follow nanoGPT.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelConfig {
    /// Where it came from (preset name or file path), for messages.
    pub name: String,
    pub arch: Arch,
    /// HF model type it corresponds to: gpt2, llama, mistral, qwen2, mixtral.
    pub model_type: String,
    pub vocab_size: usize,
    /// Maximum sequence length (`n_positions` / `max_position_embeddings`).
    pub block_size: usize,
    pub n_embd: usize,
    pub n_layer: usize,
    pub n_head: usize,
    /// Key/value heads (GQA); equals `n_head` for full multi-head attention.
    pub n_kv_head: usize,
    /// Width of one attention head; `n_embd / n_head` unless given explicitly.
    pub head_dim: usize,
    /// MLP hidden width (GPT-2: `n_inner`, 4·d by default; Llama: `intermediate_size`).
    pub intermediate_size: usize,
    pub tie_embeddings: bool,
    /// GPT-2: biases in every Linear and LayerNorm. Llama: `attention_bias` (q, k, v and o).
    pub bias: bool,
    /// Biases on q, k, v only (Qwen2).
    pub qkv_bias: bool,
    /// Biases on gate/up/down (Llama `mlp_bias`).
    pub mlp_bias: bool,
    /// Experts per MoE layer; 0 means a dense MLP.
    pub n_experts: usize,
    pub n_experts_per_tok: usize,
    pub rope_theta: f64,
    pub rope_scaling: Option<Llama3RopeScaling>,
    pub norm_eps: f64,
    /// Sliding-window attention (Mistral's `sliding_window`): a token attends to itself and the
    /// `w - 1` tokens before it. `None`: full causal attention. Changes memory, not the count.
    pub sliding_window: Option<usize>,
    #[serde(skip)]
    pub run: RunDefaults,
}

impl ModelConfig {
    /// The attention window of layer `layer` (`None`: full causal attention). One place for
    /// per-layer rules (families that alternate local and global layers extend it).
    pub fn attention_window(&self, _layer: usize) -> Option<usize> {
        self.sliding_window
    }

    pub fn is_moe(&self) -> bool {
        self.n_experts > 0
    }

    /// Width of the query projection output (`n_head · head_dim`), which need not equal n_embd.
    pub fn q_dim(&self) -> usize {
        self.n_head * self.head_dim
    }

    /// Width of the key (and value) projection output.
    pub fn kv_dim(&self) -> usize {
        self.n_kv_head * self.head_dim
    }

    /// Whether q/k/v projections carry a bias.
    pub fn has_qkv_bias(&self) -> bool {
        self.bias || self.qkv_bias
    }

    /// A sequence length must fit the model's positions.
    pub fn check_seq(&self, seq: usize) -> Result<()> {
        if seq == 0 || seq > self.block_size {
            return Err(Error::field(
                &self.name,
                "seq",
                seq,
                format!("must be between 1 and block_size = {}", self.block_size),
            ));
        }
        Ok(())
    }
}

/// Batch sizes above this are refused as input errors (memory preflight catches smaller absurd ones).
pub const MAX_BATCH: usize = 1 << 20;

pub fn check_run_size(src: &str, field: &str, v: usize) -> Result<()> {
    if v == 0 || v > MAX_BATCH {
        return Err(Error::field(
            src,
            field,
            v,
            format!("must be between 1 and {MAX_BATCH}"),
        ));
    }
    Ok(())
}
