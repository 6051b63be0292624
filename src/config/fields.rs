//! What the readers hand to a model family: the keys of an HF `config.json` and the fields of a
//! truesize TOML, typed, with errors that name the key as the user wrote it. The family turns
//! them into a [`ModelConfig`](super::ModelConfig) with its own defaults (`crate::family`).

use crate::error::{Error, Result};
use serde_json::{Map, Value};

/// Typed access to an HF `config.json` object; `null` counts as missing (transformers treats
/// `head_dim: null` as "use the default").
pub struct JsonKeys<'a> {
    map: &'a Map<String, Value>,
    /// The file, for messages.
    pub src: &'a str,
    /// Where this object sits in the file (`rope_scaling.`), so messages name the full key.
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

    /// `key` as the user wrote it, with the path of the object it sits in.
    pub fn key(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.map.get(key).filter(|v| !v.is_null())
    }

    pub fn usize_opt(&self, key: &str) -> Result<Option<usize>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => match v.as_u64() {
                Some(n) => usize::try_from(n)
                    .map(Some)
                    .map_err(|_| Error::field(self.src, self.key(key), v, "does not fit in usize")),
                None => Err(Error::field(
                    self.src,
                    self.key(key),
                    v,
                    "expected a non-negative integer",
                )),
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
                .ok_or_else(|| Error::field(self.src, self.key(key), v, "expected a number")),
        }
    }

    pub fn bool_or(&self, key: &str, default: bool) -> Result<bool> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v
                .as_bool()
                .ok_or_else(|| Error::field(self.src, self.key(key), v, "expected true or false")),
        }
    }

    pub fn str_opt(&self, key: &str) -> Result<Option<&str>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_str()
                .map(Some)
                .ok_or_else(|| Error::field(self.src, self.key(key), v, "expected a string")),
        }
    }

    /// A nested object (`rope_scaling`, `rope_parameters`).
    pub fn obj(&self, key: &str) -> Result<Option<JsonKeys<'_>>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Object(map)) => Ok(Some(JsonKeys {
                map,
                src: self.src,
                prefix: format!("{}{key}.", self.prefix),
            })),
            Some(v) => Err(Error::field(
                self.src,
                self.key(key),
                v,
                "expected an object",
            )),
        }
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
    pub sliding_window: Option<usize>,
    pub run: super::RunDefaults,
}
