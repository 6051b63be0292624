//! Model families: one file per family, and the registry at the bottom of this file.
//!
//! A family is everything truesize knows about one kind of model that is not generic:
//! - how HF's `config.json` for its `model_type`(s) maps to a [`ModelConfig`], with that type's
//!   defaults, and how a truesize TOML with its `arch` does;
//! - the rules its configs must satisfy beyond the generic ones;
//! - the exact list of parameter tensors its genuine network holds ([`ParamTensor`]: HF name,
//!   shape, component, layer, what the tensor does);
//! - how published checkpoints spell its tensor names, and which stored tensors are buffers.
//!
//! Everything else iterates over the tensor list: the parameter count is its sum
//! (`estimate::params`), FLOPs come from its matrices (`estimate::flops`), the census groups by
//! its names (`measure::census`), and checkpoints are compared with it (`checkpoint::check`).
//! The genuine candle network (`crate::model`) is built independently, and its shape-only census
//! must agree with the list to the parameter (tests/count_and_parser_properties.rs).
//!
//! # Adding a family
//! One file in this folder implementing [`Family`] (copy `llama.rs` for a Llama-skeleton model),
//! and one line in [`FAMILIES`]. A family whose layers differ in shape (dense and sparse layers)
//! overrides [`Family::layer_kind`] so that counts stay O(kinds), not O(layers).

pub mod gemma2;
pub mod gemma3;
pub mod gpt2;
pub mod llama;
pub mod phi3;
pub mod qwen3;
pub mod qwen3_moe;

use crate::config::fields::{JsonKeys, TomlFields};
use crate::config::{Arch, ModelConfig};
use crate::error::Result;
use serde::Serialize;
use std::collections::HashMap;

/// Parameter groups. The census groups checkpoint tensors into the same groups, so estimate and
/// measurement are joined by this key, never by position.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Component {
    /// Token embedding `[vocab, d]` (`wte` / `embed_tokens`).
    EmbedTokens,
    /// Learned positions `[block, d]` (GPT-2 `wpe`); RoPE models have none.
    EmbedPositions,
    /// q, k, v, o projections and their biases, all layers.
    Attention,
    /// Dense MLP (GELU: 2 matrices; SwiGLU: 3), all layers.
    Mlp,
    /// MoE router (`block_sparse_moe.gate`), all layers.
    Router,
    /// MoE experts (each a SwiGLU MLP), all layers.
    Experts,
    /// The norms inside each layer.
    Norms,
    /// The norm after the last layer.
    FinalNorm,
    /// The output projection; 0 when tied to the token embedding.
    LmHead,
}

impl Component {
    pub const ALL: [Component; 9] = [
        Component::EmbedTokens,
        Component::EmbedPositions,
        Component::Attention,
        Component::Mlp,
        Component::Router,
        Component::Experts,
        Component::Norms,
        Component::FinalNorm,
        Component::LmHead,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Component::EmbedTokens => "embed_tokens",
            Component::EmbedPositions => "embed_positions",
            Component::Attention => "attention",
            Component::Mlp => "mlp",
            Component::Router => "router",
            Component::Experts => "experts",
            Component::Norms => "norms",
            Component::FinalNorm => "final_norm",
            Component::LmHead => "lm_head",
        }
    }
}

/// What a tensor does in the forward pass: decides whether it costs FLOPs and, for matrices,
/// which side of the residual stream they sit on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// A lookup table (token or position embedding): no matmul (the tied head reuses it).
    Embedding,
    /// A matrix applied to the residual stream's activations: q, k, v (or fused qkv), gate,
    /// up, GPT-2's `c_fc`, the router, the head.
    MatmulIn,
    /// A matrix whose output is added back to the residual stream: o, down, GPT-2's `c_proj`.
    MatmulOut,
    /// A bias vector (added, no matmul).
    Bias,
    /// A norm's scale (or shift) vector.
    Norm,
}

impl Kind {
    pub fn is_matmul(self) -> bool {
        matches!(self, Kind::MatmulIn | Kind::MatmulOut)
    }
}

/// One parameter tensor of the genuine network, as a checkpoint stores it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ParamTensor {
    /// HF checkpoint key, e.g. `model.layers.0.self_attn.q_proj.weight`.
    pub name: String,
    /// Shape as stored (GPT-2's `Conv1D` is `[in, out]`, `nn.Linear` is `[out, in]`).
    pub shape: Vec<usize>,
    pub component: Component,
    /// The transformer layer it belongs to; `None` for embeddings, the final norm and the head.
    pub layer: Option<usize>,
    pub kind: Kind,
}

impl ParamTensor {
    pub fn numel(&self) -> u64 {
        self.shape.iter().map(|&d| d as u64).product()
    }

    /// A tensor outside the layers.
    pub fn global(
        name: impl Into<String>,
        shape: &[usize],
        component: Component,
        kind: Kind,
    ) -> Self {
        ParamTensor {
            name: name.into(),
            shape: shape.to_vec(),
            component,
            layer: None,
            kind,
        }
    }

    /// A tensor of layer `layer`.
    pub fn in_layer(
        layer: usize,
        name: impl Into<String>,
        shape: &[usize],
        component: Component,
        kind: Kind,
    ) -> Self {
        ParamTensor {
            name: name.into(),
            shape: shape.to_vec(),
            component,
            layer: Some(layer),
            kind,
        }
    }
}

/// One layer's tensor list under a name prefix (`transformer.h.3`, `model.layers.3`).
pub struct LayerTensors {
    layer: usize,
    prefix: String,
    out: Vec<ParamTensor>,
}

impl LayerTensors {
    pub fn new(layer: usize, prefix: impl Into<String>) -> Self {
        LayerTensors {
            layer,
            prefix: prefix.into(),
            out: Vec::new(),
        }
    }

    pub fn push(&mut self, name: &str, shape: &[usize], component: Component, kind: Kind) {
        let name = format!("{}.{name}", self.prefix);
        self.out.push(ParamTensor::in_layer(
            self.layer, name, shape, component, kind,
        ));
    }

    /// `{name}.weight` of `shape`, and `{name}.bias` of `bias` elements when given.
    pub fn matrix(
        &mut self,
        name: &str,
        shape: [usize; 2],
        component: Component,
        kind: Kind,
        bias: Option<usize>,
    ) {
        self.push(&format!("{name}.weight"), &shape, component, kind);
        if let Some(n) = bias {
            self.push(&format!("{name}.bias"), &[n], component, Kind::Bias);
        }
    }

    /// A norm inside the layer: `{name}.weight` `[width]` (and `{name}.bias` with `bias`).
    pub fn norm(&mut self, name: &str, width: usize, bias: bool) {
        self.push(
            &format!("{name}.weight"),
            &[width],
            Component::Norms,
            Kind::Norm,
        );
        if bias {
            self.push(
                &format!("{name}.bias"),
                &[width],
                Component::Norms,
                Kind::Norm,
            );
        }
    }

    pub fn finish(self) -> Vec<ParamTensor> {
        self.out
    }
}

/// Everything that is specific to one model family. See the module documentation.
pub trait Family: Sync {
    /// Name in messages ("gpt2", "llama").
    fn name(&self) -> &'static str;
    /// The network skeleton `crate::model` builds for it.
    fn arch(&self) -> Arch;
    /// HF `model_type`s whose `config.json` this family reads.
    fn model_types(&self) -> &'static [&'static str];
    /// The `arch = "..."` value of a truesize TOML that selects this family.
    fn toml_arch(&self) -> &'static str;

    /// HF `config.json` -> config, with `model_type`'s defaults for missing keys.
    fn read_hf(&self, model_type: &str, keys: &JsonKeys<'_>) -> Result<ModelConfig>;
    /// (truesize field, HF key) for every config field this family reads from `config.json`
    /// under another name, so that messages quote the key the user wrote.
    /// The Llama skeleton's spellings unless the family says otherwise.
    fn hf_spelling(&self, _model_type: &str) -> &'static [(&'static str, &'static str)] {
        llama::SKELETON_SPELLING
    }
    /// truesize TOML fields -> config, with this family's defaults.
    fn read_toml(&self, fields: &TomlFields) -> Result<ModelConfig>;
    /// Rules beyond the generic ones (`ModelConfig::validate` calls this).
    fn validate(&self, cfg: &ModelConfig) -> Result<()>;

    /// Tensors outside the layers: embeddings, final norm, untied head.
    fn global_tensors(&self, cfg: &ModelConfig) -> Vec<ParamTensor>;
    /// Tensors of layer `layer`, in the order the network requests them.
    fn layer_tensors(&self, cfg: &ModelConfig, layer: usize) -> Vec<ParamTensor>;
    /// Layers of the same kind have tensors of the same shapes (only the names differ), so
    /// counts take one layer per kind. Default: every layer alike.
    fn layer_kind(&self, _cfg: &ModelConfig, _layer: usize) -> usize {
        0
    }

    /// The name a published checkpoint's tensor has in [`ParamTensor::name`]'s spelling (hub
    /// GPT-2 checkpoints drop the `transformer.` prefix). Default: the same.
    fn canonical_name(&self, stored: &str) -> String {
        stored.to_string()
    }
    /// A stored tensor that is not a parameter (GPT-2's causal-mask buffers, RoPE's `inv_freq`).
    fn is_buffer(&self, _name: &str) -> bool {
        false
    }
    /// A stored parameter of a part of the published model that truesize does not build or count
    /// (Gemma 3's vision tower beside its text model): listed apart, neither a parameter of this
    /// config nor unexpected. Default: none.
    fn outside_model(&self, _name: &str) -> bool {
        false
    }
    /// The component a tensor name suggests, from this family's naming convention alone. Used
    /// only where no config says which tensors exist (`inspect FILE` without a config).
    fn guess_component(&self, name: &str) -> Option<Component>;

    /// Why the 12·d² rule's `8·d²` per-layer MLP term misses this config's MLP (gap table).
    fn mlp_vs_rule(&self, cfg: &ModelConfig) -> String;
    /// This family's reasons that the 12·d² rule's assumptions do not hold for `cfg` (the
    /// generic ones: GQA, head_dim, untied head, experts, small d are added by the caller).
    fn rule_exceptions(&self, cfg: &ModelConfig) -> Vec<String>;
}

/// The registry: every family truesize knows. A new family is one line here.
pub static FAMILIES: &[&dyn Family] = &[
    &gpt2::Gpt2,
    &llama::Llama,
    &qwen3::Qwen3,
    &qwen3_moe::Qwen3Moe,
    &gemma2::Gemma2,
    &gemma3::Gemma3,
    &phi3::Phi3,
];

/// The family registered for an HF `model_type`.
pub fn by_model_type(model_type: &str) -> Option<&'static dyn Family> {
    FAMILIES
        .iter()
        .copied()
        .find(|f| f.model_types().contains(&model_type))
}

/// The family a truesize TOML's `arch` selects.
pub fn by_toml_arch(arch: &str) -> Option<&'static dyn Family> {
    FAMILIES.iter().copied().find(|f| f.toml_arch() == arch)
}

/// Every HF `model_type` truesize reads, in registry order.
pub fn model_types() -> Vec<&'static str> {
    FAMILIES
        .iter()
        .flat_map(|f| f.model_types())
        .copied()
        .collect()
}

/// Every TOML `arch` value, in registry order.
pub fn toml_arches() -> Vec<&'static str> {
    FAMILIES.iter().map(|f| f.toml_arch()).collect()
}

/// The family of a config: by its `model_type`, else the family of its skeleton.
pub fn of(cfg: &ModelConfig) -> &'static dyn Family {
    let skeleton: &'static dyn Family = match cfg.arch {
        Arch::Gpt2 => &gpt2::Gpt2,
        Arch::Llama => &llama::Llama,
    };
    by_model_type(&cfg.model_type).unwrap_or(skeleton)
}

/// Every parameter tensor of `cfg`'s genuine network in forward order: embeddings, the layers,
/// then the final norm and the head. A tied head is absent: it is the token embedding.
pub fn tensors(cfg: &ModelConfig) -> Vec<ParamTensor> {
    let fam = of(cfg);
    let (mut out, after): (Vec<ParamTensor>, Vec<ParamTensor>) = fam
        .global_tensors(cfg)
        .into_iter()
        .partition(|t| t.kind == Kind::Embedding);
    out.extend((0..cfg.n_layer).flat_map(|l| fam.layer_tensors(cfg, l)));
    out.extend(after);
    out
}

/// The tensor list with multiplicities: the global tensors once, and for each layer kind the
/// tensors of its first layer with the number of layers of that kind. Any sum over [`tensors`]
/// of a quantity that depends on shapes, components and kinds (not names) equals the weighted
/// sum over this, without building a list that grows with depth × experts.
pub fn weighted_tensors(cfg: &ModelConfig) -> Vec<(ParamTensor, u64)> {
    let fam = of(cfg);
    let mut first_of_kind: Vec<(usize, usize, u64)> = Vec::new();
    for l in 0..cfg.n_layer {
        let kind = fam.layer_kind(cfg, l);
        match first_of_kind.iter_mut().find(|(k, _, _)| *k == kind) {
            Some(entry) => entry.2 += 1,
            None => first_of_kind.push((kind, l, 1)),
        }
    }
    let mut out = Vec::new();
    for (_, layer, count) in first_of_kind {
        out.extend(
            fam.layer_tensors(cfg, layer)
                .into_iter()
                .map(|t| (t, count)),
        );
    }
    out.extend(fam.global_tensors(cfg).into_iter().map(|t| (t, 1)));
    out
}

/// HF name -> component, for grouping a census of `cfg`'s network by name.
pub fn components_by_name(cfg: &ModelConfig) -> HashMap<String, Component> {
    tensors(cfg)
        .into_iter()
        .map(|t| (t.name, t.component))
        .collect()
}

/// The component a tensor name suggests under any registered family's naming (first match);
/// only for checkpoints read without a config.
pub fn guess_component(name: &str) -> Option<Component> {
    FAMILIES.iter().find_map(|f| f.guess_component(name))
}

/// A stored name in canonical spelling under any family (first that changes it); only for
/// checkpoints read without a config.
pub fn guess_canonical_name(stored: &str) -> String {
    FAMILIES
        .iter()
        .map(|f| f.canonical_name(stored))
        .find(|c| c != stored)
        .unwrap_or_else(|| stored.to_string())
}

/// Whether any registered family calls this stored tensor a buffer; only without a config.
pub fn guess_is_buffer(name: &str) -> bool {
    FAMILIES.iter().any(|f| f.is_buffer(name))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::presets;

    #[test]
    fn buffers_and_hub_names() {
        assert!(gpt2::Gpt2.is_buffer("h.0.attn.bias"));
        assert!(gpt2::Gpt2.is_buffer("transformer.h.11.attn.masked_bias"));
        assert!(llama::Llama.is_buffer("model.layers.0.self_attn.rotary_emb.inv_freq"));
        assert!(!guess_is_buffer("transformer.h.0.attn.c_attn.bias"));
        assert_eq!(
            guess_canonical_name("h.0.mlp.c_fc.weight"),
            "transformer.h.0.mlp.c_fc.weight"
        );
        assert_eq!(
            gpt2::Gpt2.canonical_name("wte.weight"),
            "transformer.wte.weight"
        );
        assert_eq!(
            llama::Llama.canonical_name("model.norm.weight"),
            "model.norm.weight"
        );
    }

    /// Counting one layer per kind gives the sums of the whole list.
    #[test]
    fn weighted_list_sums_like_the_whole_list() {
        for name in ["gpt2", "llama3-8b", "mixtral-8x7b"] {
            let cfg = presets::load(name).unwrap();
            let whole: u64 = tensors(&cfg).iter().map(ParamTensor::numel).sum();
            let weighted: u64 = weighted_tensors(&cfg)
                .iter()
                .map(|(t, n)| t.numel() * n)
                .sum();
            assert_eq!(whole, weighted, "{name}");
            let layers = tensors(&cfg).iter().filter(|t| t.layer.is_some()).count();
            assert_eq!(layers, cfg.n_layer * fam_layer_len(&cfg), "{name}");
        }
    }

    fn fam_layer_len(cfg: &ModelConfig) -> usize {
        of(cfg).layer_tensors(cfg, 0).len()
    }

    #[test]
    fn every_model_type_and_arch_has_one_family() {
        for mt in model_types() {
            assert_eq!(
                FAMILIES
                    .iter()
                    .filter(|f| f.model_types().contains(&mt))
                    .count(),
                1,
                "{mt}"
            );
        }
        for a in toml_arches() {
            assert!(by_toml_arch(a).is_some());
        }
        // Names in a list are unique.
        let cfg = presets::load("mixtral-8x7b").unwrap();
        let all = tensors(&cfg);
        let names: std::collections::BTreeSet<&str> = all.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names.len(), all.len());
    }
}
