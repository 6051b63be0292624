//! `ModelConfig::validate`: the generic rules here, each family's own rules in `crate::family`
//! (kept out of `mod.rs` so that the type sits below the family registry and this file above it).

use super::{
    check_run_size, Arch, Attention, EmbeddingScale, MlpKind, ModelConfig, NormKind, NormPlacement,
    RopeScaling, Storage, MAX_DIM, MAX_EXPERTS, MAX_LAYERS,
};
use crate::error::{Error, Result};
use crate::family;

impl ModelConfig {
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
        // What only one family requires (GPT-2's full heads, RoPE's even head_dim, ...).
        family::of(self).validate(self)?;
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
        if !(self.norm_eps.is_finite() && self.norm_eps > 0.0) {
            return Err(Error::field(src, "norm_eps", self.norm_eps, "must be > 0"));
        }
        self.validate_switches()?;
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

    /// The rules of the switches the families after Llama add (q/k norms, soft-caps, windows,
    /// RoPE variants, experts). Parsers check the same values under the user's own key names
    /// first; this is the backstop for every other way a config is made.
    fn validate_switches(&self) -> Result<()> {
        let src = &self.name;
        let positive = |field: &str, v: f64| -> Result<()> {
            if v.is_finite() && v > 0.0 {
                Ok(())
            } else {
                Err(Error::field(src, field, v, "must be a finite number > 0"))
            }
        };
        let gpt2 = self.arch == Arch::Gpt2;
        if gpt2 != (self.norm == NormKind::LayerNorm) {
            return Err(Error::field(
                src,
                "norm",
                format!("{:?}", self.norm),
                "GPT-2 uses LayerNorm and the Llama family RMSNorm",
            ));
        }
        if gpt2 != (self.mlp == MlpKind::Gelu) {
            return Err(Error::field(
                src,
                "mlp",
                format!("{:?}", self.mlp),
                "GPT-2 has a plain GELU MLP and the Llama family a gated one",
            ));
        }
        if gpt2
            && (self.qk_norm
                || self.norm_placement != NormPlacement::Pre
                || self.qkv_storage != Storage::Separate
                || self.gate_up_storage != Storage::Separate
                || self.embedding_scale != EmbeddingScale::None)
        {
            return Err(Error::field(
                src,
                "arch",
                "\"gpt2\"",
                "q/k norms, sandwich norms, fused storage and embedding scales are Llama-family switches",
            ));
        }
        if let Some(p) = self.pad_token_id {
            if p >= self.vocab_size {
                return Err(Error::field(
                    src,
                    "pad_token_id",
                    p,
                    format!("must be a token id below vocab_size = {}", self.vocab_size),
                ));
            }
        }
        positive("attn_scalar", self.attn_scalar)?;
        if let Some(c) = self.attn_softcap {
            positive("attn_softcap", c)?;
        }
        if let Some(c) = self.final_softcap {
            positive("final_softcap", c)?;
        }
        if self.layer_attention.len() != self.n_layer {
            return Err(Error::field(
                src,
                "layer_attention",
                format!("{} entries", self.layer_attention.len()),
                format!(
                    "must list one attention kind per layer (n_layer = {})",
                    self.n_layer
                ),
            ));
        }
        for (i, a) in self.layer_attention.iter().enumerate() {
            if let Attention::Sliding { window } = *a {
                if window == 0 || window > MAX_DIM {
                    return Err(Error::field(
                        src,
                        format!("layer_attention[{i}].window"),
                        window,
                        "a sliding window must see at least the token itself (>= 1, at most 2^24)",
                    ));
                }
            }
        }
        if gpt2 {
            return Ok(());
        }
        positive("rope_local_theta", self.rope_local_theta)?;
        if !self.rope_per_layer_type && self.rope_local_theta != self.rope_theta {
            return Err(Error::field(
                src,
                "rope_local_theta",
                self.rope_local_theta,
                format!(
                    "a separate RoPE base for sliding-window layers needs RoPE per layer type (Gemma 3); here every layer uses rope_theta = {}",
                    self.rope_theta
                ),
            ));
        }
        if self.rotary_dim == 0
            || self.rotary_dim > self.head_dim
            || !self.rotary_dim.is_multiple_of(2)
        {
            return Err(Error::field(
                src,
                "rotary_dim",
                self.rotary_dim,
                format!(
                    "RoPE rotates pairs of channels of a head: must be even, > 0 and at most head_dim = {}",
                    self.head_dim
                ),
            ));
        }
        match &self.rope_scaling {
            None => {}
            Some(RopeScaling::Linear { factor }) => positive("rope_scaling.factor", *factor)?,
            Some(RopeScaling::Llama3(s)) => {
                positive("rope_scaling.factor", s.factor)?;
                positive("rope_scaling.low_freq_factor", s.low_freq_factor)?;
                positive("rope_scaling.high_freq_factor", s.high_freq_factor)?;
                if s.high_freq_factor <= s.low_freq_factor {
                    return Err(Error::field(
                        src,
                        "rope_scaling.high_freq_factor",
                        s.high_freq_factor,
                        format!(
                            "must exceed low_freq_factor = {} (the smoothing divides by their difference)",
                            s.low_freq_factor
                        ),
                    ));
                }
                if s.original_max_position_embeddings == 0 {
                    return Err(Error::field(
                        src,
                        "rope_scaling.original_max_position_embeddings",
                        0,
                        "must be > 0",
                    ));
                }
            }
            Some(RopeScaling::LongRope(l)) => {
                for (field, list) in [
                    ("rope_scaling.short_factor", &l.short_factor),
                    ("rope_scaling.long_factor", &l.long_factor),
                ] {
                    if list.len() != self.rotary_dim / 2 {
                        return Err(Error::field(
                            src,
                            field,
                            format!("{} entries", list.len()),
                            format!(
                                "needs one factor per rotated pair: rotary_dim / 2 = {}",
                                self.rotary_dim / 2
                            ),
                        ));
                    }
                    for &f in list.iter() {
                        positive(field, f)?;
                    }
                }
                if l.original_max_position_embeddings == 0 {
                    return Err(Error::field(
                        src,
                        "original_max_position_embeddings",
                        0,
                        "must be > 0",
                    ));
                }
                positive("rope_scaling.attention_factor", l.attention_factor)?;
            }
        }
        if self.is_moe() {
            if self.moe_intermediate_size == 0 || self.moe_intermediate_size > MAX_DIM {
                return Err(Error::field(
                    src,
                    "moe_intermediate_size",
                    self.moe_intermediate_size,
                    "must be > 0 and at most 2^24",
                ));
            }
            if self.moe_sparse_step == 0 {
                return Err(Error::field(
                    src,
                    "moe_sparse_step",
                    0,
                    "must be >= 1 (layer i is sparse when i + 1 is a multiple of it)",
                ));
            }
        }
        Ok(())
    }
}
