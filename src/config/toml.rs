//! truesize TOML: nanoGPT's names, every unknown key an error (a typo must not pass silently).
//! The generic checks happen here; `arch` picks the family (`crate::family`) that applies its
//! defaults and rules.

use super::fields::{TomlFields, TomlSwitches};
use super::{ModelConfig, RunDefaults};
use crate::error::{Error, Result};
use crate::family;
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
    attn_scalar: Option<f64>,
    attn_softcap: Option<f64>,
    final_softcap: Option<f64>,
    moe_intermediate_size: Option<i64>,
    moe_renormalize: Option<bool>,
    rope_local_theta: Option<f64>,
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
    let Some(fam) = family::by_toml_arch(&raw.arch) else {
        return Err(Error::field(
            src,
            "arch",
            format!("{:?}", raw.arch),
            format!(
                "unknown architecture; expected {}",
                family::toml_arches()
                    .iter()
                    .map(|a| format!("{a:?}"))
                    .collect::<Vec<_>>()
                    .join(" or ")
            ),
        ));
    };
    let opt = |field: &str, v: Option<i64>| v.map(|v| size(src, field, v)).transpose();
    let opt0 = |field: &str, v: Option<i64>| v.map(|v| size_or_zero(src, field, v)).transpose();
    let n_embd = size(src, "n_embd", raw.n_embd)?;
    let n_head = size(src, "n_head", raw.n_head)?;
    let n_kv_head = opt("n_kv_head", raw.n_kv_head)?;
    let head_dim = opt("head_dim", raw.head_dim)?;
    let intermediate_size = opt("intermediate_size", raw.intermediate_size)?;
    let n_experts = opt0("n_experts", raw.n_experts)?;
    let n_experts_per_tok = opt0("n_experts_per_tok", raw.n_experts_per_tok)?;
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
    let fields = TomlFields {
        src: src.to_string(),
        // The file stays in the name: messages must say which file a bad value is in.
        name: raw.name.map(|n| format!("{src} ({n})")),
        vocab_size: size(src, "vocab_size", raw.vocab_size)?,
        block_size: size(src, "block_size", raw.block_size)?,
        n_embd,
        n_layer: size(src, "n_layer", raw.n_layer)?,
        n_head,
        n_kv_head,
        head_dim,
        intermediate_size,
        tie_embeddings: raw.tie_embeddings,
        bias: raw.bias,
        qkv_bias: raw.qkv_bias,
        mlp_bias: raw.mlp_bias,
        n_experts,
        n_experts_per_tok,
        rope_theta: raw.rope_theta,
        norm_eps: raw.norm_eps,
        switches: TomlSwitches {
            sliding_window: opt("sliding_window", raw.sliding_window)?,
            attn_scalar: raw.attn_scalar,
            attn_softcap: raw.attn_softcap,
            final_softcap: raw.final_softcap,
            moe_intermediate_size: opt("moe_intermediate_size", raw.moe_intermediate_size)?,
            moe_renormalize: raw.moe_renormalize,
            rope_local_theta: raw.rope_local_theta,
        },
        run,
    };
    fam.read_toml(&fields)
}
