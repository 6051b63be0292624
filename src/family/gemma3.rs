//! Gemma 3's text model (HF `model_type` "gemma3_text", and "gemma3" whose `text_config` holds
//! it: only the text model is sized and built, the vision tower and its projector are not
//! counted; truesize `arch = "gemma3"`): Gemma 2's layout plus RMSNorm ((1 + w)) over head_dim
//! on queries and keys, no soft-caps by default, local layers with a sliding window (every
//! `sliding_window_pattern`-th layer global, 6 by default) and a RoPE base per layer type:
//! `rope_local_base_freq` (10,000) on local layers, `rope_theta` (1,000,000) with
//! `rope_scaling` on global ones, or transformers 5's `rope_parameters.{sliding_attention,
//! full_attention}`.

use super::gemma2::{gemma_layout, gemma_switches, QUERY_PRE_ATTN_SCALAR};
use super::llama::{
    layer_attention, rope_type, scaling_of, skeleton, skeleton_global_tensors,
    skeleton_guess_component, skeleton_layer_tensors, skeleton_mlp_vs_rule,
    skeleton_rule_exceptions, skeleton_toml, sliding_window, toml_layer_attention,
    validate_skeleton, SkeletonDefaults,
};
use super::{Component, Family, ParamTensor};
use crate::config::fields::{JsonKeys, TomlFields};
use crate::config::{Arch, ModelConfig};
use crate::error::Result;
use serde_json::Map;

pub struct Gemma3;

/// `Gemma3TextConfig`'s defaults (transformers 5.24); its RoPE bases are per layer type.
const DEFAULTS: SkeletonDefaults = SkeletonDefaults {
    vocab_size: 262_208,
    hidden_size: 2304,
    intermediate_size: 9216,
    num_hidden_layers: 26,
    num_attention_heads: 8,
    num_key_value_heads: Some(4),
    head_dim: Some(256),
    max_position_embeddings: 131_072,
    rms_norm_eps: 1e-6,
    rope_theta: 1_000_000.0,
    tie_word_embeddings: true,
    pad_token_id: Some(0),
};

/// `Gemma3TextConfig`: a 4096 window on 5 of every 6 layers, local RoPE base 10,000.
const WINDOW: usize = 4096;
const PATTERN: usize = 6;
const LOCAL_THETA: f64 = 10_000.0;

/// The text model's keys (at the top level, or under `text_config.`).
fn read_text(o: &JsonKeys<'_>, model_type: &str) -> Result<ModelConfig> {
    let mut cfg = skeleton(o, model_type, &DEFAULTS)?;
    gemma_switches(o, &mut cfg, (None, None))?;
    cfg.qk_norm = true;
    let pattern = o.usize_or("sliding_window_pattern", PATTERN)?;
    if pattern == 0 {
        return Err(o.err(
            "sliding_window_pattern",
            0,
            "must be >= 1 (every pattern-th layer is global)",
        ));
    }
    let window = sliding_window(o, Some(WINDOW))?;
    cfg.layer_attention = layer_attention(o, cfg.n_layer, window, |i| (i + 1) % pattern != 0)?;
    // transformers' Gemma3TextConfig.convert_rope_params_to_dict: nested per-layer-type
    // parameters win; the older top-level keys fill what they leave out. A flat
    // `rope_parameters` (no layer types) is not read by transformers either.
    let nested = o.obj("rope_parameters")?;
    let full = nested
        .as_ref()
        .map(|p| p.obj("full_attention"))
        .transpose()?
        .flatten();
    let local = nested
        .as_ref()
        .map(|p| p.obj("sliding_attention"))
        .transpose()?
        .flatten();
    let allowed = ["default", "linear", "llama3"];
    cfg.rope_theta = match full
        .as_ref()
        .map(|f| f.positive_opt("rope_theta"))
        .transpose()?
    {
        Some(Some(t)) => t,
        _ => o.positive_opt("rope_theta")?.unwrap_or(DEFAULTS.rope_theta),
    };
    cfg.rope_scaling = match &full {
        Some(f) if rope_type(f)?.is_some() => scaling_of(f, rope_type(f)?, &allowed)?,
        _ => match o.obj("rope_scaling")? {
            Some(s) => scaling_of(&s, rope_type(&s)?, &allowed)?,
            None => None,
        },
    };
    cfg.rope_per_layer_type = true;
    cfg.rope_local_theta = match local
        .as_ref()
        .map(|l| l.positive_opt("rope_theta"))
        .transpose()?
    {
        Some(Some(t)) => t,
        _ => o
            .positive_opt("rope_local_base_freq")?
            .unwrap_or(LOCAL_THETA),
    };
    if let Some(l) = &local {
        if let Some(kind) = rope_type(l)? {
            if kind != "default" {
                return Err(l.err(
                    "rope_type",
                    format!("{kind:?}"),
                    "truesize rescales RoPE on global layers only; local layers must be \"default\"",
                ));
            }
        }
    }
    Ok(cfg)
}

impl Family for Gemma3 {
    fn name(&self) -> &'static str {
        "gemma3"
    }

    fn arch(&self) -> Arch {
        Arch::Llama
    }

    fn model_types(&self) -> &'static [&'static str] {
        &["gemma3_text", "gemma3"]
    }

    fn toml_arch(&self) -> &'static str {
        "gemma3"
    }

    /// `gemma3_text` at the top level; `gemma3` (with vision) from its `text_config`, which
    /// transformers fills with `Gemma3TextConfig`'s defaults when absent.
    fn read_hf(&self, model_type: &str, o: &JsonKeys<'_>) -> Result<ModelConfig> {
        if model_type != "gemma3" {
            return read_text(o, model_type);
        }
        match o.obj("text_config")? {
            Some(text) => read_text(&text, model_type),
            None => {
                let empty = Map::new();
                read_text(&JsonKeys::nested(&empty, o.src, "text_config."), model_type)
            }
        }
    }

    /// Tied by default; `sliding_window` (4096) on 5 of every 6 layers, `attn_scalar` (256),
    /// `rope_local_theta` (10,000), soft-caps only when given.
    fn read_toml(&self, f: &TomlFields) -> Result<ModelConfig> {
        let s = &f.switches;
        f.only_switches(
            "gemma3",
            &[
                "sliding_window",
                "attn_scalar",
                "attn_softcap",
                "final_softcap",
                "rope_local_theta",
            ],
        )?;
        let mut cfg = skeleton_toml(f, "gemma3", "gemma3_text")?;
        gemma_layout(&mut cfg);
        cfg.qk_norm = true;
        cfg.tie_embeddings = f.tie_embeddings.unwrap_or(true);
        cfg.attn_scalar = s.attn_scalar.unwrap_or(QUERY_PRE_ATTN_SCALAR);
        cfg.attn_softcap = s.attn_softcap;
        cfg.final_softcap = s.final_softcap;
        cfg.rope_theta = f.rope_theta.unwrap_or(DEFAULTS.rope_theta);
        cfg.rope_per_layer_type = true;
        cfg.rope_local_theta = s.rope_local_theta.unwrap_or(LOCAL_THETA);
        let mut with_window = f.clone();
        with_window.switches.sliding_window = Some(s.sliding_window.unwrap_or(WINDOW));
        cfg.layer_attention =
            toml_layer_attention(&with_window, cfg.n_layer, |i| (i + 1) % PATTERN != 0);
        Ok(cfg)
    }

    fn validate(&self, cfg: &ModelConfig) -> Result<()> {
        validate_skeleton(cfg)
    }

    /// The text model's tensors as `Gemma3ForConditionalGeneration` checkpoints store them:
    /// `language_model.model.*` / `language_model.lm_head.*` (transformers 4.50, the hub's
    /// files) or `model.language_model.*` (transformers ≥ 4.52).
    fn canonical_name(&self, stored: &str) -> String {
        for (from, to) in [
            ("language_model.model.", "model."),
            ("model.language_model.", "model."),
            ("language_model.lm_head.", "lm_head."),
        ] {
            if let Some(rest) = stored.strip_prefix(from) {
                return format!("{to}{rest}");
            }
        }
        stored.to_string()
    }

    /// The vision tower and its projector (`vision_tower.*`, `multi_modal_projector.*`, also
    /// under `model.`): parameters of the published model, not of the text model truesize builds.
    fn outside_model(&self, name: &str) -> bool {
        let n = name.strip_prefix("model.").unwrap_or(name);
        n.starts_with("vision_tower.") || n.starts_with("multi_modal_projector.")
    }

    fn global_tensors(&self, cfg: &ModelConfig) -> Vec<ParamTensor> {
        skeleton_global_tensors(cfg)
    }

    fn layer_tensors(&self, cfg: &ModelConfig, layer: usize) -> Vec<ParamTensor> {
        skeleton_layer_tensors(cfg, layer)
    }

    fn guess_component(&self, name: &str) -> Option<Component> {
        skeleton_guess_component(name)
    }

    fn mlp_vs_rule(&self, cfg: &ModelConfig) -> String {
        skeleton_mlp_vs_rule(cfg)
    }

    fn rule_exceptions(&self, cfg: &ModelConfig) -> Vec<String> {
        skeleton_rule_exceptions(cfg)
    }
}
