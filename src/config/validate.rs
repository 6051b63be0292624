//! `ModelConfig::validate`: the generic rules here, each family's own rules in `crate::family`
//! (kept out of `mod.rs` so that the type sits below the family registry and this file above it).

use super::{check_run_size, ModelConfig, MAX_DIM, MAX_EXPERTS, MAX_LAYERS};
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
}
