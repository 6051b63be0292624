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
    /// The Llama skeleton (Llama, Mistral, Qwen2, Mixtral, Qwen3, Qwen3-MoE, Gemma 2/3, Phi-3):
    /// RMSNorm, RoPE, gated MLP, GQA, with the switches below.
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

/// LongRoPE (Phi-3 128k, Phi-3.5): per-frequency divisors, `short_factor` up to
/// `original_max_position_embeddings` tokens and `long_factor` beyond, and cos/sin multiplied by
/// `attention_factor`. Changes numerics only.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LongRope {
    pub short_factor: Vec<f64>,
    pub long_factor: Vec<f64>,
    pub original_max_position_embeddings: usize,
    /// Resolved: the config's value, else √(1 + ln(factor) / ln(original)) with factor =
    /// max positions / original (1 when factor ≤ 1), as transformers computes it.
    pub attention_factor: f64,
}

/// How the rotary frequencies are rescaled for long contexts. Never changes the parameter count.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "rope_type", rename_all = "lowercase")]
pub enum RopeScaling {
    Llama3(Llama3RopeScaling),
    /// Positions divided by `factor` (Gemma 3's global layers).
    Linear {
        factor: f64,
    },
    LongRope(LongRope),
}

/// The norm used throughout a model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum NormKind {
    /// GPT-2: mean and variance, weight and (with `bias`) bias.
    LayerNorm,
    /// Llama: x / rms(x) · w.
    Rms,
    /// Gemma: x / rms(x) · (1 + w), the weight stored as an offset from 1.
    RmsOnePlus,
}

/// Where each layer's norms sit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum NormPlacement {
    /// One norm before attention and one before the MLP (GPT-2, Llama).
    Pre,
    /// Gemma 2/3: also a norm on each sublayer's output before the residual add: four per layer
    /// (`input_layernorm`, `post_attention_layernorm`, `pre_feedforward_layernorm`,
    /// `post_feedforward_layernorm`).
    Sandwich,
}

/// The MLP (and each expert's) function.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum MlpKind {
    /// GPT-2: down(gelu_tanh(up(x))), two matrices.
    Gelu,
    /// Llama: down(silu(gate(x)) · up(x)), three matrices.
    SwiGlu,
    /// Gemma: down(gelu_tanh(gate(x)) · up(x)), three matrices.
    GeGlu,
}

/// How HF computes the tanh GELU. The value is the same; what PyTorch's autograd keeps for
/// backward is not (see `train::SavedSet`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum GeluForm {
    /// `gelu_new` (GPT-2's default): `NewGELUActivation`, composed from elementwise ops.
    New,
    /// `gelu_fast`: `FastGELUActivation`, composed from elementwise ops.
    Fast,
    /// `gelu_pytorch_tanh`: PyTorch's one fused op.
    Fused,
}

/// A factor on the token embedding's output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EmbeddingScale {
    None,
    /// Gemma: × √n_embd, rounded to the activation dtype first.
    SqrtHidden,
}

/// What one layer's attention sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Attention {
    /// Every earlier position (causal).
    Full,
    /// The last `window` positions, itself included (key j is seen from query i iff
    /// i − window < j ≤ i, as transformers' sliding-window mask).
    Sliding { window: usize },
}

/// How a group of projections is stored in the checkpoint (the math is the same).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Storage {
    /// One tensor each (`q_proj`, `k_proj`, `v_proj`; `gate_proj`, `up_proj`).
    Separate,
    /// Phi-3: rows concatenated in one tensor (`qkv_proj`: q | k | v; `gate_up_proj`: gate | up).
    Fused,
}

/// Checkpoint names of a mixture-of-experts block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ExpertNames {
    /// `block_sparse_moe.gate`, `block_sparse_moe.experts.E.{w1, w3, w2}` (gate, up, down).
    Mixtral,
    /// `mlp.gate`, `mlp.experts.E.{gate_proj, up_proj, down_proj}` (Qwen-MoE).
    Qwen,
}

/// A fully resolved model description. Field names follow nanoGPT.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelConfig {
    /// Where it came from (preset name or file path), for messages.
    pub name: String,
    pub arch: Arch,
    /// HF model type it corresponds to (gpt2, llama, ..., gemma3 for Gemma 3's text model).
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
    /// The embedding row that gets no gradient (torch `nn.Embedding(padding_idx=...)`, which the
    /// Llama-family models in transformers build from `pad_token_id`). Changes gradients only.
    pub pad_token_id: Option<usize>,
    /// GPT-2: biases in every Linear and LayerNorm. Llama: `attention_bias` (q, k, v and o).
    pub bias: bool,
    /// Biases on q, k, v only (Qwen2).
    pub qkv_bias: bool,
    /// Biases on gate/up/down (Llama `mlp_bias`).
    pub mlp_bias: bool,
    /// Experts per MoE layer; 0 means a dense MLP.
    pub n_experts: usize,
    pub n_experts_per_tok: usize,
    /// RoPE base (of the full-attention layers when `rope_per_layer_type`).
    pub rope_theta: f64,
    /// Frequency rescaling (of the full-attention layers only when `rope_per_layer_type`).
    pub rope_scaling: Option<RopeScaling>,
    /// Gemma 3's RoPE per layer type: sliding-window layers use `rope_local_theta`, unscaled.
    /// Otherwise every layer, sliding or not, uses `rope_theta` and `rope_scaling` (Mistral,
    /// Phi-3, Gemma 2).
    pub rope_per_layer_type: bool,
    /// RoPE base of sliding-window layers when `rope_per_layer_type` (Gemma 3: 10,000 beside
    /// 1,000,000); equal to `rope_theta` otherwise.
    pub rope_local_theta: f64,
    /// Channels of each head that RoPE rotates (Phi `partial_rotary_factor`); `head_dim` elsewhere.
    pub rotary_dim: usize,
    pub norm_eps: f64,
    pub norm: NormKind,
    pub norm_placement: NormPlacement,
    pub mlp: MlpKind,
    /// How HF computes the (tanh) GELU of a GELU or GeGLU MLP.
    pub gelu: GeluForm,
    pub embedding_scale: EmbeddingScale,
    /// An RMSNorm over head_dim on every query and key head, before RoPE (Qwen3, Gemma 3): two
    /// weights of head_dim per layer (`q_norm`, `k_norm`), shared by all heads.
    pub qk_norm: bool,
    /// Scores are q·kᵀ / √attn_scalar: `head_dim`, unless the config says otherwise (Gemma's
    /// `query_pre_attn_scalar`).
    pub attn_scalar: f64,
    /// Scores become c·tanh(s / c) before the mask (Gemma 2's `attn_logit_softcapping`).
    pub attn_softcap: Option<f64>,
    /// Logits become c·tanh(z / c) (Gemma 2's `final_logit_softcapping`).
    pub final_softcap: Option<f64>,
    /// Attention of each layer, `n_layer` entries.
    pub layer_attention: Vec<Attention>,
    pub qkv_storage: Storage,
    pub gate_up_storage: Storage,
    /// Width of one expert's SwiGLU (Qwen-MoE `moe_intermediate_size`); `intermediate_size`
    /// for Mixtral. Dense layers of a MoE model use `intermediate_size`.
    pub moe_intermediate_size: usize,
    /// Whether the top-k routing probabilities are renormalised to sum to 1 (Mixtral always;
    /// Qwen-MoE `norm_topk_prob`).
    pub moe_renormalize: bool,
    /// Layer i is sparse when (i + 1) is a multiple of this (`decoder_sparse_step`) ...
    pub moe_sparse_step: usize,
    /// ... and i is not listed here (`mlp_only_layers`).
    pub moe_dense_layers: Vec<usize>,
    pub expert_names: ExpertNames,
    #[serde(skip)]
    pub run: RunDefaults,
}

/// The sizes every config states; the rest of a `ModelConfig` has a plain value per skeleton.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dims {
    pub vocab_size: usize,
    pub block_size: usize,
    pub n_embd: usize,
    pub n_layer: usize,
    pub n_head: usize,
    pub n_kv_head: usize,
    pub head_dim: usize,
    pub intermediate_size: usize,
}

impl ModelConfig {
    /// The plain GPT-2 or Llama skeleton of these sizes: GPT-2 with biases and a tied head,
    /// Llama untied without biases, dense, RoPE base 10,000 unscaled, and every switch the later
    /// families add at its plain value (pre-norm, no q/k norm, scores / √head_dim, no soft-caps,
    /// full attention in every layer, separate projections). Parsers start here and set what
    /// their model type changes.
    pub fn plain(name: impl Into<String>, arch: Arch, model_type: &str, d: Dims) -> ModelConfig {
        let gpt2 = arch == Arch::Gpt2;
        ModelConfig {
            name: name.into(),
            arch,
            model_type: model_type.to_string(),
            vocab_size: d.vocab_size,
            block_size: d.block_size,
            n_embd: d.n_embd,
            n_layer: d.n_layer,
            n_head: d.n_head,
            n_kv_head: d.n_kv_head,
            head_dim: d.head_dim,
            intermediate_size: d.intermediate_size,
            tie_embeddings: gpt2,
            pad_token_id: None,
            bias: gpt2,
            qkv_bias: false,
            mlp_bias: false,
            n_experts: 0,
            n_experts_per_tok: 0,
            rope_theta: 10_000.0,
            rope_scaling: None,
            rope_per_layer_type: false,
            rope_local_theta: 10_000.0,
            rotary_dim: d.head_dim,
            norm_eps: if gpt2 { 1e-5 } else { 1e-6 },
            norm: if gpt2 {
                NormKind::LayerNorm
            } else {
                NormKind::Rms
            },
            norm_placement: NormPlacement::Pre,
            mlp: if gpt2 { MlpKind::Gelu } else { MlpKind::SwiGlu },
            gelu: if gpt2 { GeluForm::New } else { GeluForm::Fused },
            embedding_scale: EmbeddingScale::None,
            qk_norm: false,
            attn_scalar: d.head_dim as f64,
            attn_softcap: None,
            final_softcap: None,
            // Bounded so that an absurd layer count is reported by validate, not allocated here.
            layer_attention: vec![Attention::Full; d.n_layer.min(MAX_LAYERS + 1)],
            qkv_storage: Storage::Separate,
            gate_up_storage: Storage::Separate,
            moe_intermediate_size: d.intermediate_size,
            moe_renormalize: true,
            moe_sparse_step: 1,
            moe_dense_layers: Vec::new(),
            expert_names: ExpertNames::Mixtral,
            run: RunDefaults::default(),
        }
    }

    /// Set the RoPE base of every layer (full and sliding alike).
    pub fn set_rope_theta(&mut self, theta: f64) {
        self.rope_theta = theta;
        self.rope_local_theta = theta;
    }

    /// The same model at another depth: the first `n_layer` layers' attention kinds, repeated
    /// in order when deepening.
    pub fn set_depth(&mut self, n_layer: usize) {
        let pattern = if self.layer_attention.is_empty() {
            vec![Attention::Full]
        } else {
            self.layer_attention.clone()
        };
        self.layer_attention = (0..n_layer.min(MAX_LAYERS + 1))
            .map(|i| pattern[i % pattern.len()])
            .collect();
        self.n_layer = n_layer;
    }

    /// Set every layer's attention to `a`.
    pub fn set_all_attention(&mut self, a: Attention) {
        self.layer_attention = vec![a; self.n_layer.min(MAX_LAYERS + 1)];
    }

    pub fn is_moe(&self) -> bool {
        self.n_experts > 0
    }

    /// Whether layer `i` holds a routed mixture of experts (the rest have a dense MLP).
    pub fn layer_is_moe(&self, i: usize) -> bool {
        self.is_moe()
            && self.moe_sparse_step > 0
            && (i + 1).is_multiple_of(self.moe_sparse_step)
            && !self.moe_dense_layers.contains(&i)
    }

    /// How many layers hold experts.
    pub fn moe_layer_count(&self) -> usize {
        (0..self.n_layer).filter(|&i| self.layer_is_moe(i)).count()
    }

    /// Norm weights per layer (GPT-2 LayerNorms also carry a bias each when `bias`).
    pub fn norms_per_layer(&self) -> usize {
        match self.norm_placement {
            NormPlacement::Pre => 2,
            NormPlacement::Sandwich => 4,
        }
    }

    /// The attention of layer `i` (full when the config lists fewer layers).
    pub fn attention(&self, i: usize) -> Attention {
        self.layer_attention
            .get(i)
            .copied()
            .unwrap_or(Attention::Full)
    }

    /// The attention window of layer `layer` (`None`: full causal attention).
    pub fn attention_window(&self, layer: usize) -> Option<usize> {
        match self.attention(layer) {
            Attention::Full => None,
            Attention::Sliding { window } => Some(window),
        }
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
