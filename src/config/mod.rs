//! `ModelConfig`: one resolved description of a GPT-2 or Llama-family model (no Options, no
//! spelling variants), read from truesize TOML, HF `config.json`, a model folder or a preset.

pub mod hf;
pub mod presets;
pub mod toml;

use crate::error::{Error, Result};
use serde::Serialize;
use std::path::Path;

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

    /// The attention window of layer `layer` (`None`: full causal attention). One place for
    /// per-layer rules (families that alternate local and global layers extend it).
    pub fn attention_window(&self, _layer: usize) -> Option<usize> {
        self.sliding_window
    }

    /// Whether q/k/v projections carry a bias.
    pub fn has_qkv_bias(&self) -> bool {
        self.bias || self.qkv_bias
    }

    /// Every rule a config must satisfy; errors name the source, the field and the value.
    pub fn validate(&self) -> Result<()> {
        let src = &self.name;
        let positive: [(&str, usize, usize); 7] = [
            ("vocab_size", self.vocab_size, MAX_DIM),
            ("block_size", self.block_size, MAX_DIM),
            ("n_embd", self.n_embd, MAX_DIM),
            ("n_layer", self.n_layer, MAX_LAYERS),
            ("n_head", self.n_head, MAX_DIM),
            ("n_kv_head", self.n_kv_head, MAX_DIM),
            ("intermediate_size", self.intermediate_size, MAX_DIM),
        ];
        for (field, v, max) in positive {
            if v == 0 {
                return Err(Error::field(src, field, v, "must be > 0"));
            }
            if v > max {
                return Err(Error::field(
                    src,
                    field,
                    v,
                    format!("is absurdly large (limit {max})"),
                ));
            }
        }
        if self.head_dim == 0 || self.head_dim > MAX_DIM {
            return Err(Error::field(
                src,
                "head_dim",
                self.head_dim,
                "must be > 0 and at most 2^24",
            ));
        }
        if self.n_head > self.n_embd {
            return Err(Error::field(
                src,
                "n_head",
                self.n_head,
                format!("exceeds n_embd = {}", self.n_embd),
            ));
        }
        match self.arch {
            Arch::Gpt2 => {
                if !self.n_embd.is_multiple_of(self.n_head) {
                    return Err(Error::field(
                        src,
                        "n_head",
                        self.n_head,
                        format!("does not divide n_embd = {}", self.n_embd),
                    ));
                }
                if self.n_kv_head != self.n_head {
                    return Err(Error::field(
                        src,
                        "n_kv_head",
                        self.n_kv_head,
                        format!(
                            "GPT-2 has full multi-head attention: must equal n_head = {}",
                            self.n_head
                        ),
                    ));
                }
                if self.head_dim * self.n_head != self.n_embd {
                    return Err(Error::field(
                        src,
                        "head_dim",
                        self.head_dim,
                        format!(
                            "GPT-2 needs head_dim = n_embd / n_head = {}",
                            self.n_embd / self.n_head
                        ),
                    ));
                }
                if self.is_moe() {
                    return Err(Error::field(
                        src,
                        "n_experts",
                        self.n_experts,
                        "mixture of experts is only supported for arch = \"llama\"",
                    ));
                }
            }
            Arch::Llama => {
                if !self.n_head.is_multiple_of(self.n_kv_head) {
                    return Err(Error::field(
                        src,
                        "n_kv_head",
                        self.n_kv_head,
                        format!("does not divide n_head = {}", self.n_head),
                    ));
                }
                if !self.head_dim.is_multiple_of(2) {
                    return Err(Error::field(
                        src,
                        "head_dim",
                        self.head_dim,
                        "RoPE rotates pairs of channels: must be even",
                    ));
                }
                if !(self.rope_theta.is_finite() && self.rope_theta > 0.0) {
                    return Err(Error::field(
                        src,
                        "rope_theta",
                        self.rope_theta,
                        "must be > 0",
                    ));
                }
            }
        }
        if self.is_moe() {
            if self.n_experts > MAX_EXPERTS {
                return Err(Error::field(
                    src,
                    "n_experts",
                    self.n_experts,
                    format!("is absurdly large (limit {MAX_EXPERTS})"),
                ));
            }
            if self.mlp_bias {
                return Err(Error::field(
                    src,
                    "mlp_bias",
                    true,
                    "Mixtral-style experts have no biases; drop mlp_bias or n_experts",
                ));
            }
            if self.n_experts_per_tok == 0 || self.n_experts_per_tok > self.n_experts {
                return Err(Error::field(
                    src,
                    "n_experts_per_tok",
                    self.n_experts_per_tok,
                    format!("must be between 1 and n_experts = {}", self.n_experts),
                ));
            }
        }
        if let Some(w) = self.sliding_window {
            if w == 0 || w > MAX_DIM {
                return Err(Error::field(
                    src,
                    "sliding_window",
                    w,
                    "must be > 0 and at most 2^24",
                ));
            }
        }
        if !(self.norm_eps.is_finite() && self.norm_eps > 0.0) {
            return Err(Error::field(src, "norm_eps", self.norm_eps, "must be > 0"));
        }
        if let Some(b) = self.run.batch {
            check_run_size(src, "run.batch", b)?;
        }
        if let Some(t) = self.run.seq {
            self.check_seq(t).map_err(|_| {
                Error::field(
                    src,
                    "run.seq",
                    t,
                    format!("must be between 1 and block_size = {}", self.block_size),
                )
            })?;
        }
        if let Some(tol) = self.run.tolerance {
            if !(tol.is_finite() && tol >= 0.0) {
                return Err(Error::field(src, "run.tolerance", tol, "must be >= 0"));
            }
        }
        Ok(())
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

/// Where a config comes from on the command line.
#[derive(Debug, Clone)]
pub enum ConfigSource<'a> {
    Preset(&'a str),
    /// A truesize TOML, an HF config.json, or a folder holding a config.json.
    Path(&'a Path),
}

/// Read any supported config: preset, `.toml`, `config.json`, or a folder with a config.json.
pub fn load(source: ConfigSource<'_>) -> Result<ModelConfig> {
    let cfg = match source {
        ConfigSource::Preset(name) => presets::load(name)?,
        ConfigSource::Path(path) => load_path(path)?,
    };
    cfg.validate()?;
    Ok(cfg)
}

fn load_path(path: &Path) -> Result<ModelConfig> {
    if path.is_dir() {
        let cj = path.join("config.json");
        if !cj.is_file() {
            return Err(Error::file(
                path,
                "folder has no config.json (expected an HF model folder)",
            ));
        }
        return load_path(&cj);
    }
    if crate::checkpoint::gguf::has_magic(path) {
        let h = crate::checkpoint::gguf::read_header(path)?;
        return crate::checkpoint::gguf::config_from_header(&h);
    }
    let text = std::fs::read(path).map_err(|e| Error::file(path, format!("cannot read: {e}")))?;
    let text = String::from_utf8(text).map_err(|_| Error::file(path, "is not valid UTF-8 text"))?;
    let name = path.display().to_string();
    let is_json = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("json"))
        || text.trim_start().starts_with('{');
    if is_json {
        hf::parse(&text, &name)
    } else {
        toml::parse(&text, &name)
    }
}
