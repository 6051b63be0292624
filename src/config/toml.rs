//! truesize TOML: nanoGPT's names, every unknown key an error (a typo must not pass silently).

use super::{Arch, ModelConfig, RunDefaults};
use crate::error::{Error, Result};
use serde::Deserialize;

/// Sizes are read as i64 so that `n_embd = -1` gets our message (field, value, rule), not serde's.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TomlConfig {
    /// Optional display name.
    name: Option<String>,
    arch: String,
    vocab_size: i64,
    block_size: i64,
    n_embd: i64,
    n_layer: i64,
    n_head: i64,
    n_kv_head: Option<i64>,
    head_dim: Option<i64>,
    intermediate_size: Option<i64>,
    tie_embeddings: Option<bool>,
    bias: Option<bool>,
    qkv_bias: Option<bool>,
    mlp_bias: Option<bool>,
    n_experts: Option<i64>,
    n_experts_per_tok: Option<i64>,
    rope_theta: Option<f64>,
    norm_eps: Option<f64>,
    sliding_window: Option<i64>,
    run: Option<TomlRun>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TomlRun {
    batch: Option<i64>,
    seq: Option<i64>,
    dtype: Option<String>,
    tolerance: Option<f64>,
}

fn size(src: &str, field: &str, v: i64) -> Result<usize> {
    if v <= 0 {
        return Err(Error::field(src, field, v, "must be > 0"));
    }
    usize::try_from(v).map_err(|_| Error::field(src, field, v, "does not fit this machine's usize"))
}

fn size_or_zero(src: &str, field: &str, v: i64) -> Result<usize> {
    if v < 0 {
        return Err(Error::field(src, field, v, "must be >= 0"));
    }
    usize::try_from(v).map_err(|_| Error::field(src, field, v, "does not fit this machine's usize"))
}

pub fn parse(text: &str, src: &str) -> Result<ModelConfig> {
    let raw: TomlConfig = ::toml::from_str(text).map_err(|e| {
        // toml's message already carries line, column and the offending key.
        Error::file(
            src,
            format!("invalid truesize TOML: {}", e.to_string().trim_end()),
        )
    })?;
    let arch = match raw.arch.as_str() {
        "gpt2" => Arch::Gpt2,
        "llama" => Arch::Llama,
        other => {
            return Err(Error::field(
                src,
                "arch",
                format!("{other:?}"),
                "unknown architecture; expected \"gpt2\" or \"llama\"",
            ))
        }
    };
    let n_embd = size(src, "n_embd", raw.n_embd)?;
    let n_head = size(src, "n_head", raw.n_head)?;
    let n_kv_head = match raw.n_kv_head {
        Some(v) => size(src, "n_kv_head", v)?,
        None => n_head,
    };
    let head_dim = match raw.head_dim {
        Some(v) => size(src, "head_dim", v)?,
        None => n_embd / n_head,
    };
    let intermediate_size = match (raw.intermediate_size, arch) {
        (Some(v), _) => size(src, "intermediate_size", v)?,
        // Saturating: an absurd n_embd is reported by validate (fuzz/regressions/toml_config).
        (None, Arch::Gpt2) => n_embd.saturating_mul(4),
        (None, Arch::Llama) => {
            return Err(Error::field(
                src,
                "intermediate_size",
                "(missing)",
                "required for arch = \"llama\" (SwiGLU width has no fixed ratio)",
            ))
        }
    };
    let n_experts = match raw.n_experts {
        Some(v) => size_or_zero(src, "n_experts", v)?,
        None => 0,
    };
    let n_experts_per_tok = match raw.n_experts_per_tok {
        Some(v) => size_or_zero(src, "n_experts_per_tok", v)?,
        None if n_experts > 0 => 2,
        None => 0,
    };
    if arch == Arch::Gpt2 {
        for (field, set) in [
            ("qkv_bias", raw.qkv_bias.is_some()),
            ("mlp_bias", raw.mlp_bias.is_some()),
            ("rope_theta", raw.rope_theta.is_some()),
        ] {
            if set {
                return Err(Error::field(
                    src,
                    field,
                    "(set)",
                    "only applies to arch = \"llama\"; GPT-2 uses `bias` for every layer",
                ));
            }
        }
    }
    let run = match raw.run {
        None => RunDefaults::default(),
        Some(r) => RunDefaults {
            batch: r.batch.map(|v| size(src, "run.batch", v)).transpose()?,
            seq: r.seq.map(|v| size(src, "run.seq", v)).transpose()?,
            dtype: r.dtype,
            tolerance: r.tolerance,
        },
    };
    if let Some(d) = &run.dtype {
        crate::dtype::TrainDtype::parse(d).map_err(|_| {
            Error::field(
                src,
                "run.dtype",
                format!("{d:?}"),
                "expected f32, f16 or bf16",
            )
        })?;
    }
    let is_gpt2 = arch == Arch::Gpt2;
    Ok(ModelConfig {
        name: raw.name.unwrap_or_else(|| src.to_string()),
        arch,
        model_type: if n_experts > 0 {
            "mixtral"
        } else {
            arch.name()
        }
        .to_string(),
        vocab_size: size(src, "vocab_size", raw.vocab_size)?,
        block_size: size(src, "block_size", raw.block_size)?,
        n_embd,
        n_layer: size(src, "n_layer", raw.n_layer)?,
        n_head,
        n_kv_head,
        head_dim,
        intermediate_size,
        tie_embeddings: raw.tie_embeddings.unwrap_or(is_gpt2),
        bias: raw.bias.unwrap_or(is_gpt2),
        qkv_bias: raw.qkv_bias.unwrap_or(false),
        mlp_bias: raw.mlp_bias.unwrap_or(false),
        n_experts,
        n_experts_per_tok,
        rope_theta: raw.rope_theta.unwrap_or(10_000.0),
        rope_scaling: None,
        norm_eps: raw.norm_eps.unwrap_or(if is_gpt2 { 1e-5 } else { 1e-6 }),
        sliding_window: raw
            .sliding_window
            .map(|v| size(src, "sliding_window", v))
            .transpose()?,
        run,
    })
}
