//! HF `config.json` -> `ModelConfig`. The only file that knows HF's spellings.
//!
//! Missing keys and `null`s take the defaults of that model type's `PretrainedConfig` class in
//! transformers (values copied from `configuration_<type>.py`), so a minimal config means what it
//! means to transformers. Keys truesize does not need are ignored: real configs carry dozens.

use super::{Arch, Llama3RopeScaling, ModelConfig, RunDefaults};
use crate::error::{Error, Result};
use serde_json::{Map, Value};

/// The model types truesize can build and count.
pub const SUPPORTED_MODEL_TYPES: &[&str] = &["gpt2", "llama", "mistral", "qwen2", "mixtral"];

/// transformers' defaults for the Llama-family configs (`LlamaConfig`, `MistralConfig`,
/// `Qwen2Config`, `MixtralConfig` `__init__` signatures).
struct LlamaDefaults {
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    /// None: equal to num_attention_heads.
    num_key_value_heads: Option<usize>,
    max_position_embeddings: usize,
    rms_norm_eps: f64,
    rope_theta: f64,
    tie_word_embeddings: bool,
}

const LLAMA: LlamaDefaults = LlamaDefaults {
    vocab_size: 32000,
    hidden_size: 4096,
    intermediate_size: 11008,
    num_hidden_layers: 32,
    num_attention_heads: 32,
    num_key_value_heads: None,
    max_position_embeddings: 2048,
    rms_norm_eps: 1e-6,
    rope_theta: 10_000.0,
    tie_word_embeddings: false,
};

const MISTRAL: LlamaDefaults = LlamaDefaults {
    vocab_size: 32000,
    hidden_size: 4096,
    intermediate_size: 14336,
    num_hidden_layers: 32,
    num_attention_heads: 32,
    num_key_value_heads: Some(8),
    max_position_embeddings: 4096 * 32,
    rms_norm_eps: 1e-6,
    rope_theta: 10_000.0,
    tie_word_embeddings: false,
};

const QWEN2: LlamaDefaults = LlamaDefaults {
    vocab_size: 151936,
    hidden_size: 4096,
    intermediate_size: 22016,
    num_hidden_layers: 32,
    num_attention_heads: 32,
    num_key_value_heads: Some(32),
    max_position_embeddings: 32768,
    rms_norm_eps: 1e-6,
    rope_theta: 10_000.0,
    tie_word_embeddings: false,
};

const MIXTRAL: LlamaDefaults = LlamaDefaults {
    vocab_size: 32000,
    hidden_size: 4096,
    intermediate_size: 14336,
    num_hidden_layers: 32,
    num_attention_heads: 32,
    num_key_value_heads: Some(8),
    max_position_embeddings: 4096 * 32,
    rms_norm_eps: 1e-5,
    rope_theta: 1e6,
    tie_word_embeddings: false,
};

/// Typed access to the JSON object with field-naming errors; `null` counts as missing.
struct Obj<'a> {
    map: &'a Map<String, Value>,
    src: &'a str,
}

impl Obj<'_> {
    fn get(&self, key: &str) -> Option<&Value> {
        self.map.get(key).filter(|v| !v.is_null())
    }

    fn usize_opt(&self, key: &str) -> Result<Option<usize>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => match v.as_u64() {
                Some(n) => usize::try_from(n)
                    .map(Some)
                    .map_err(|_| Error::field(self.src, key, v, "does not fit in usize")),
                None => Err(Error::field(
                    self.src,
                    key,
                    v,
                    "expected a non-negative integer",
                )),
            },
        }
    }

    fn usize_or(&self, key: &str, default: usize) -> Result<usize> {
        Ok(self.usize_opt(key)?.unwrap_or(default))
    }

    fn f64_opt(&self, key: &str) -> Result<Option<f64>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| Error::field(self.src, key, v, "expected a number")),
        }
    }

    fn bool_or(&self, key: &str, default: bool) -> Result<bool> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v
                .as_bool()
                .ok_or_else(|| Error::field(self.src, key, v, "expected true or false")),
        }
    }

    fn str_opt(&self, key: &str) -> Result<Option<&str>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_str()
                .map(Some)
                .ok_or_else(|| Error::field(self.src, key, v, "expected a string")),
        }
    }

    fn obj(&self, key: &str) -> Result<Option<Obj<'_>>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Object(map)) => Ok(Some(Obj { map, src: self.src })),
            Some(v) => Err(Error::field(self.src, key, v, "expected an object")),
        }
    }
}

pub fn parse(text: &str, src: &str) -> Result<ModelConfig> {
    let value: Value =
        serde_json::from_str(text).map_err(|e| Error::file(src, format!("invalid JSON: {e}")))?;
    let Value::Object(map) = &value else {
        return Err(Error::file(src, "config.json must be a JSON object"));
    };
    let o = Obj { map, src };
    let model_type = match o.str_opt("model_type")? {
        Some(t) => t.to_string(),
        None => {
            return Err(Error::field(
                src,
                "model_type",
                "(missing)",
                format!(
                    "an HF config.json must say its model_type; supported: {}",
                    SUPPORTED_MODEL_TYPES.join(", ")
                ),
            ))
        }
    };
    match model_type.as_str() {
        "gpt2" => parse_gpt2(&o, src),
        "llama" => parse_llama(&o, src, &model_type, &LLAMA),
        "mistral" => parse_llama(&o, src, &model_type, &MISTRAL),
        "qwen2" => parse_llama(&o, src, &model_type, &QWEN2),
        "mixtral" => parse_llama(&o, src, &model_type, &MIXTRAL),
        other => Err(Error::field(
            src,
            "model_type",
            format!("{other:?}"),
            format!(
                "unsupported model type; supported: {}",
                SUPPORTED_MODEL_TYPES.join(", ")
            ),
        )),
    }
}

/// transformers' `GPT2Config` defaults.
fn parse_gpt2(o: &Obj<'_>, src: &str) -> Result<ModelConfig> {
    let n_embd = o.usize_or("n_embd", 768)?;
    let n_head = o.usize_or("n_head", 12)?;
    if n_head == 0 {
        return Err(Error::field(src, "n_head", 0, "must be > 0"));
    }
    if let Some(act) = o.str_opt("activation_function")? {
        if !matches!(act, "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast") {
            return Err(Error::field(
                src,
                "activation_function",
                format!("{act:?}"),
                "truesize's GPT-2 implements the tanh GELU (gelu_new) only",
            ));
        }
    }
    Ok(ModelConfig {
        name: src.to_string(),
        arch: Arch::Gpt2,
        model_type: "gpt2".into(),
        vocab_size: o.usize_or("vocab_size", 50257)?,
        block_size: o.usize_or("n_positions", 1024)?,
        n_embd,
        n_layer: o.usize_or("n_layer", 12)?,
        n_head,
        n_kv_head: n_head,
        head_dim: n_embd / n_head,
        // `n_inner: null` means 4·d (saturating: an absurd n_embd is reported by validate, not
        // as an overflow; fuzz/regressions/hf_config).
        intermediate_size: o.usize_or("n_inner", n_embd.saturating_mul(4))?,
        tie_embeddings: o.bool_or("tie_word_embeddings", true)?,
        bias: true,
        qkv_bias: false,
        mlp_bias: false,
        n_experts: 0,
        n_experts_per_tok: 0,
        rope_theta: 10_000.0,
        rope_scaling: None,
        norm_eps: o.f64_opt("layer_norm_epsilon")?.unwrap_or(1e-5),
        sliding_window: None,
        run: RunDefaults::default(),
    })
}

fn parse_llama(o: &Obj<'_>, src: &str, model_type: &str, d: &LlamaDefaults) -> Result<ModelConfig> {
    let hidden = o.usize_or("hidden_size", d.hidden_size)?;
    let heads = o.usize_or("num_attention_heads", d.num_attention_heads)?;
    if heads == 0 {
        return Err(Error::field(src, "num_attention_heads", 0, "must be > 0"));
    }
    let kv_heads = match o.usize_opt("num_key_value_heads")? {
        Some(k) => k,
        None => d.num_key_value_heads.unwrap_or(heads),
    };
    // `head_dim: null` (or absent) means hidden / heads.
    let head_dim = o.usize_or("head_dim", hidden / heads)?;
    if let Some(act) = o.str_opt("hidden_act")? {
        if act != "silu" {
            return Err(Error::field(
                src,
                "hidden_act",
                format!("{act:?}"),
                "truesize's Llama family implements SwiGLU with silu only",
            ));
        }
    }
    // transformers 5 nests RoPE settings in `rope_parameters`; older configs use `rope_theta` and
    // `rope_scaling` at the top level. Either may be present.
    let rope_params = o.obj("rope_parameters")?;
    let rope_theta = match rope_params
        .as_ref()
        .map(|p| p.f64_opt("rope_theta"))
        .transpose()?
    {
        Some(Some(t)) => t,
        _ => o.f64_opt("rope_theta")?.unwrap_or(d.rope_theta),
    };
    let scaling = match rope_params {
        Some(p) if p.get("rope_type").is_some() || p.get("type").is_some() => Some(p),
        _ => o.obj("rope_scaling")?,
    };
    let rope_scaling = match scaling {
        None => None,
        Some(s) => {
            let kind = match s.str_opt("rope_type")? {
                Some(k) => Some(k),
                None => s.str_opt("type")?,
            };
            match kind {
                None | Some("default") => None,
                Some("llama3") => Some(Llama3RopeScaling {
                    factor: s.f64_opt("factor")?.unwrap_or(8.0),
                    low_freq_factor: s.f64_opt("low_freq_factor")?.unwrap_or(1.0),
                    high_freq_factor: s.f64_opt("high_freq_factor")?.unwrap_or(4.0),
                    original_max_position_embeddings: s
                        .usize_or("original_max_position_embeddings", 8192)?,
                }),
                Some(other) => {
                    return Err(Error::field(
                        src,
                        "rope_scaling.rope_type",
                        format!("{other:?}"),
                        "supported RoPE types: default, llama3",
                    ))
                }
            }
        }
    };
    let (n_experts, n_experts_per_tok) = if model_type == "mixtral" {
        (
            o.usize_or("num_local_experts", 8)?,
            o.usize_or("num_experts_per_tok", 2)?,
        )
    } else {
        (0, 0)
    };
    if model_type == "mixtral" && n_experts == 0 {
        return Err(Error::field(src, "num_local_experts", 0, "must be > 0"));
    }
    Ok(ModelConfig {
        name: src.to_string(),
        arch: Arch::Llama,
        model_type: model_type.to_string(),
        vocab_size: o.usize_or("vocab_size", d.vocab_size)?,
        block_size: o.usize_or("max_position_embeddings", d.max_position_embeddings)?,
        n_embd: hidden,
        n_layer: o.usize_or("num_hidden_layers", d.num_hidden_layers)?,
        n_head: heads,
        n_kv_head: kv_heads,
        head_dim,
        intermediate_size: o.usize_or("intermediate_size", d.intermediate_size)?,
        tie_embeddings: o.bool_or("tie_word_embeddings", d.tie_word_embeddings)?,
        // Llama's attention_bias covers q, k, v and o; Mistral and Mixtral have none.
        bias: model_type == "llama" && o.bool_or("attention_bias", false)?,
        // Qwen2 always has q/k/v biases and no o bias.
        qkv_bias: model_type == "qwen2",
        mlp_bias: model_type == "llama" && o.bool_or("mlp_bias", false)?,
        n_experts,
        n_experts_per_tok,
        rope_theta,
        rope_scaling,
        norm_eps: o.f64_opt("rms_norm_eps")?.unwrap_or(d.rms_norm_eps),
        sliding_window: sliding_window(o, model_type)?,
        run: RunDefaults::default(),
    })
}

/// Mistral and Mixtral apply `sliding_window` to every layer whenever it is set (`null`, as in
/// Mistral-7B v0.2+ and Mixtral, means full attention). Qwen2's window is per layer type and off
/// in released configs (`use_sliding_window: false`); Llama has none.
fn sliding_window(o: &Obj<'_>, model_type: &str) -> Result<Option<usize>> {
    match model_type {
        "mistral" | "mixtral" => o.usize_opt("sliding_window"),
        _ => Ok(None),
    }
}
