//! What the readers hand to a model family: the keys of an HF `config.json` and the fields of a
//! truesize TOML, typed, with errors that name the key as the user wrote it. The family turns
//! them into a [`ModelConfig`](super::ModelConfig) with its own defaults (`crate::family`).

use crate::error::{Error, Result};
use serde_json::{Map, Value};

/// Typed access to an HF `config.json` object; `null` counts as missing (transformers treats
/// `head_dim: null` as "use the default"). Keys of a nested object are named with their path in
/// messages (`text_config.hidden_size`, `rope_scaling.factor`), as the user wrote them.
pub struct JsonKeys<'a> {
    map: &'a Map<String, Value>,
    /// The file, for messages.
    pub src: &'a str,
    /// Where this object sits in the file (`text_config.`, `rope_scaling.`), empty at the top
    /// level, so messages name the full key.
    prefix: String,
}

impl<'a> JsonKeys<'a> {
    pub fn new(map: &'a Map<String, Value>, src: &'a str) -> Self {
        JsonKeys {
            map,
            src,
            prefix: String::new(),
        }
    }

    /// The same keys read as the object at `prefix` (`text_config.`) of the file.
    pub fn nested(map: &'a Map<String, Value>, src: &'a str, prefix: &str) -> Self {
        JsonKeys {
            map,
            src,
            prefix: prefix.to_string(),
        }
    }

    /// `key` as the file spells it, with its path.
    pub fn key(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    /// An error naming `key` (with its path), its value and the rule.
    pub fn err(&self, key: &str, value: impl std::fmt::Display, why: impl Into<String>) -> Error {
        Error::field(self.src, self.key(key), value, why)
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.map.get(key).filter(|v| !v.is_null())
    }

    /// Whether the key is written at all, `null` included (for keys whose `null` means "off").
    pub fn present(&self, key: &str) -> bool {
        self.map.contains_key(key)
    }

    pub fn usize_opt(&self, key: &str) -> Result<Option<usize>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => match v.as_u64() {
                Some(n) => usize::try_from(n)
                    .map(Some)
                    .map_err(|_| self.err(key, v, "does not fit in usize")),
                None => Err(self.err(key, v, "expected a non-negative integer")),
            },
        }
    }

    pub fn usize_or(&self, key: &str, default: usize) -> Result<usize> {
        Ok(self.usize_opt(key)?.unwrap_or(default))
    }

    pub fn f64_opt(&self, key: &str) -> Result<Option<f64>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| self.err(key, v, "expected a number")),
        }
    }

    /// A number that must be finite and > 0 when given.
    pub fn positive_opt(&self, key: &str) -> Result<Option<f64>> {
        match self.f64_opt(key)? {
            Some(x) if !(x.is_finite() && x > 0.0) => {
                Err(self.err(key, x, "must be a finite number > 0"))
            }
            x => Ok(x),
        }
    }

    /// A key whose `null` means "off" (transformers' `None`): absent gives the default, `null`
    /// gives None, a number must be > 0.
    pub fn positive_or_off(&self, key: &str, default: Option<f64>) -> Result<Option<f64>> {
        if !self.present(key) {
            return Ok(default);
        }
        self.positive_opt(key)
    }

    pub fn bool_or(&self, key: &str, default: bool) -> Result<bool> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v
                .as_bool()
                .ok_or_else(|| self.err(key, v, "expected true or false")),
        }
    }

    pub fn str_opt(&self, key: &str) -> Result<Option<&str>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_str()
                .map(Some)
                .ok_or_else(|| self.err(key, v, "expected a string")),
        }
    }

    /// A nested object (`rope_scaling`, `rope_parameters`, `text_config`).
    pub fn obj(&self, key: &str) -> Result<Option<JsonKeys<'_>>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Object(map)) => Ok(Some(JsonKeys {
                map,
                src: self.src,
                prefix: format!("{}{key}.", self.prefix),
            })),
            Some(v) => Err(self.err(key, v, "expected an object")),
        }
    }

    pub fn list_opt(&self, key: &str) -> Result<Option<&Vec<Value>>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Array(a)) => Ok(Some(a)),
            Some(v) => Err(self.err(key, v, "expected a list")),
        }
    }

    /// A list of finite numbers > 0 (RoPE factors).
    pub fn f64_list(&self, key: &str) -> Result<Option<Vec<f64>>> {
        let Some(list) = self.list_opt(key)? else {
            return Ok(None);
        };
        list.iter()
            .enumerate()
            .map(|(i, v)| match v.as_f64() {
                Some(x) if x.is_finite() && x > 0.0 => Ok(x),
                _ => Err(self.err(&format!("{key}[{i}]"), v, "expected a finite number > 0")),
            })
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }

    /// A list of non-negative integers (layer indices).
    pub fn usize_list(&self, key: &str) -> Result<Option<Vec<usize>>> {
        let Some(list) = self.list_opt(key)? else {
            return Ok(None);
        };
        list.iter()
            .enumerate()
            .map(|(i, v)| {
                v.as_u64()
                    .and_then(|n| usize::try_from(n).ok())
                    .ok_or_else(|| {
                        self.err(&format!("{key}[{i}]"), v, "expected a non-negative integer")
                    })
            })
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }
}

/// A truesize TOML after the generic checks (every size > 0 and a usize, the `[run]` table
/// read); what is optional is still `None`, so each family applies its own defaults.
#[derive(Debug, Clone)]
pub struct TomlFields {
    /// The file, for messages.
    pub src: String,
    /// `name = ...`, if given.
    pub name: Option<String>,
    pub vocab_size: usize,
    pub block_size: usize,
    pub n_embd: usize,
    pub n_layer: usize,
    pub n_head: usize,
    pub n_kv_head: Option<usize>,
    pub head_dim: Option<usize>,
    pub intermediate_size: Option<usize>,
    pub tie_embeddings: Option<bool>,
    pub bias: Option<bool>,
    pub qkv_bias: Option<bool>,
    pub mlp_bias: Option<bool>,
    /// `n_experts = 0` is allowed (dense).
    pub n_experts: Option<usize>,
    pub n_experts_per_tok: Option<usize>,
    pub rope_theta: Option<f64>,
    pub norm_eps: Option<f64>,
    /// The switches of the families after Llama; each family says which it reads
    /// ([`TomlFields::only_switches`]) and what a sliding window applies to.
    pub switches: TomlSwitches,
    pub run: super::RunDefaults,
}

/// Optional TOML keys for the switches of the families after Llama.
#[derive(Debug, Clone, Default)]
pub struct TomlSwitches {
    /// Positions a sliding-window layer sees (which layers slide is the family's rule).
    pub sliding_window: Option<usize>,
    /// Scores are q·kᵀ / √attn_scalar (HF `query_pre_attn_scalar`).
    pub attn_scalar: Option<f64>,
    /// c of c·tanh(s / c) on attention scores (HF `attn_logit_softcapping`).
    pub attn_softcap: Option<f64>,
    /// c of c·tanh(z / c) on the logits (HF `final_logit_softcapping`).
    pub final_softcap: Option<f64>,
    /// One expert's width (HF `moe_intermediate_size`).
    pub moe_intermediate_size: Option<usize>,
    /// Renormalise the top-k routing weights (HF `norm_topk_prob`).
    pub moe_renormalize: Option<bool>,
    /// RoPE base of the sliding-window layers (HF `rope_local_base_freq`).
    pub rope_local_theta: Option<f64>,
}

impl TomlFields {
    /// Refuse a switch key this family does not read, naming it: a key that means nothing for
    /// the model must not pass silently.
    pub fn only_switches(&self, arch: &str, allowed: &[&str]) -> Result<()> {
        let s = &self.switches;
        let set = [
            ("sliding_window", s.sliding_window.is_some()),
            ("attn_scalar", s.attn_scalar.is_some()),
            ("attn_softcap", s.attn_softcap.is_some()),
            ("final_softcap", s.final_softcap.is_some()),
            ("moe_intermediate_size", s.moe_intermediate_size.is_some()),
            ("moe_renormalize", s.moe_renormalize.is_some()),
            ("rope_local_theta", s.rope_local_theta.is_some()),
        ];
        for (key, is_set) in set {
            if is_set && !allowed.contains(&key) {
                return Err(Error::field(
                    &self.src,
                    key,
                    "(set)",
                    format!("does not apply to arch = {arch:?}"),
                ));
            }
        }
        Ok(())
    }
}
