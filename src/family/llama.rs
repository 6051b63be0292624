//! The Llama skeleton (HF `model_type` llama, mistral, qwen2, mixtral; truesize `arch =
//! "llama"`): RMSNorm, RoPE, SwiGLU MLP, grouped-query attention, untied head by default;
//! Qwen2's q/k/v biases; Mistral's sliding window; Mixtral's sparse mixture of experts
//! (`block_sparse_moe`).
//!
//! The families built on the same skeleton (Qwen3, Qwen3-MoE, Gemma 2/3, Phi-3) differ from it
//! by `ModelConfig` switches only, so what they share lives here as `pub(super)` helpers:
//! [`skeleton`] reads the keys every such `config.json` has, the RoPE and sliding-window
//! readers follow transformers' rules, and [`skeleton_layer_tensors`] lists a layer's tensors
//! for any combination of switches (q/k norms, four norms, fused storage, expert names).

use super::{Component, Family, Kind, LayerTensors, ParamTensor};
use crate::config::fields::{JsonKeys, TomlFields};
use crate::config::{
    Arch, Attention, Dims, ExpertNames, Llama3RopeScaling, MlpKind, ModelConfig, NormPlacement,
    RopeScaling, Storage,
};
use crate::error::{Error, Result};

pub struct Llama;

/// transformers' defaults for a Llama-skeleton config (the `__init__` / dataclass defaults of
/// `LlamaConfig`, `MistralConfig`, `Qwen2Config`, `MixtralConfig`, `Qwen3Config`, ...).
pub(super) struct SkeletonDefaults {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    /// None: equal to num_attention_heads.
    pub num_key_value_heads: Option<usize>,
    /// None: hidden_size / num_attention_heads.
    pub head_dim: Option<usize>,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub tie_word_embeddings: bool,
    /// The embedding's `padding_idx` when the config has no `pad_token_id` key.
    pub pad_token_id: Option<usize>,
}

const LLAMA: SkeletonDefaults = SkeletonDefaults {
    vocab_size: 32000,
    hidden_size: 4096,
    intermediate_size: 11008,
    num_hidden_layers: 32,
    num_attention_heads: 32,
    num_key_value_heads: None,
    head_dim: None,
    max_position_embeddings: 2048,
    rms_norm_eps: 1e-6,
    rope_theta: 10_000.0,
    tie_word_embeddings: false,
    pad_token_id: None,
};

const MISTRAL: SkeletonDefaults = SkeletonDefaults {
    vocab_size: 32000,
    hidden_size: 4096,
    intermediate_size: 14336,
    num_hidden_layers: 32,
    num_attention_heads: 32,
    num_key_value_heads: Some(8),
    head_dim: None,
    max_position_embeddings: 4096 * 32,
    rms_norm_eps: 1e-6,
    rope_theta: 10_000.0,
    tie_word_embeddings: false,
    pad_token_id: None,
};

const QWEN2: SkeletonDefaults = SkeletonDefaults {
    vocab_size: 151936,
    hidden_size: 4096,
    intermediate_size: 22016,
    num_hidden_layers: 32,
    num_attention_heads: 32,
    num_key_value_heads: Some(32),
    head_dim: None,
    max_position_embeddings: 32768,
    rms_norm_eps: 1e-6,
    rope_theta: 10_000.0,
    tie_word_embeddings: false,
    pad_token_id: None,
};

const MIXTRAL: SkeletonDefaults = SkeletonDefaults {
    vocab_size: 32000,
    hidden_size: 4096,
    intermediate_size: 14336,
    num_hidden_layers: 32,
    num_attention_heads: 32,
    num_key_value_heads: Some(8),
    head_dim: None,
    max_position_embeddings: 4096 * 32,
    rms_norm_eps: 1e-5,
    rope_theta: 1e6,
    tie_word_embeddings: false,
    pad_token_id: None,
};

/// The `model_type` whose defaults apply.
fn defaults(model_type: &str) -> &'static SkeletonDefaults {
    match model_type {
        "mistral" => &MISTRAL,
        "qwen2" => &QWEN2,
        "mixtral" => &MIXTRAL,
        _ => &LLAMA,
    }
}

// ---------------------------------------------------------------------------------------------
// Reading the skeleton's config keys (shared by every Llama-skeleton family)

/// (truesize field, HF key) for the keys every Llama-skeleton `config.json` shares.
pub(super) const SKELETON_SPELLING: &[(&str, &str)] = &[
    ("n_embd", "hidden_size"),
    ("n_layer", "num_hidden_layers"),
    ("n_head", "num_attention_heads"),
    ("n_kv_head", "num_key_value_heads"),
    ("block_size", "max_position_embeddings"),
    ("norm_eps", "rms_norm_eps"),
    ("bias", "attention_bias"),
];

/// The keys every Llama-skeleton `config.json` shares, with the model type's defaults; every
/// switch at its plain value and the RoPE base read (scaling is left to the caller: which kinds
/// are allowed depends on the model type).
pub(super) fn skeleton(
    o: &JsonKeys<'_>,
    model_type: &str,
    d: &SkeletonDefaults,
) -> Result<ModelConfig> {
    let hidden = o.usize_or("hidden_size", d.hidden_size)?;
    let heads = o.usize_or("num_attention_heads", d.num_attention_heads)?;
    if heads == 0 {
        return Err(o.err("num_attention_heads", 0, "must be > 0"));
    }
    let kv_heads = match o.usize_opt("num_key_value_heads")? {
        Some(k) => k,
        None => d.num_key_value_heads.unwrap_or(heads),
    };
    // `head_dim: null` (or absent) means the type's default: hidden / heads for most.
    let head_dim = o.usize_or("head_dim", d.head_dim.unwrap_or(hidden / heads))?;
    let dims = Dims {
        vocab_size: o.usize_or("vocab_size", d.vocab_size)?,
        block_size: o.usize_or("max_position_embeddings", d.max_position_embeddings)?,
        n_embd: hidden,
        n_layer: o.usize_or("num_hidden_layers", d.num_hidden_layers)?,
        n_head: heads,
        n_kv_head: kv_heads,
        head_dim,
        intermediate_size: o.usize_or("intermediate_size", d.intermediate_size)?,
    };
    let mut cfg = ModelConfig::plain(o.src, Arch::Llama, model_type, dims);
    cfg.tie_embeddings = o.bool_or("tie_word_embeddings", d.tie_word_embeddings)?;
    // transformers' embeddings take padding_idx = pad_token_id; `null` means none.
    cfg.pad_token_id = if o.present("pad_token_id") {
        o.usize_opt("pad_token_id")?
    } else {
        d.pad_token_id
    };
    if let Some(p) = cfg.pad_token_id {
        if p >= cfg.vocab_size {
            return Err(o.err(
                "pad_token_id",
                p,
                format!("must be a token id below vocab_size = {}", cfg.vocab_size),
            ));
        }
    }
    cfg.norm_eps = o.f64_opt("rms_norm_eps")?.unwrap_or(d.rms_norm_eps);
    cfg.set_rope_theta(rope_theta(o, d.rope_theta)?);
    Ok(cfg)
}

/// The activation of the gated MLP must be the one the network implements.
pub(super) fn check_activation(
    o: &JsonKeys<'_>,
    key: &str,
    allowed: &[&str],
    what: &str,
) -> Result<()> {
    if let Some(act) = o.str_opt(key)? {
        if !allowed.contains(&act) {
            return Err(o.err(key, format!("{act:?}"), what.to_string()));
        }
    }
    Ok(())
}

pub(super) const SILU_ONLY: &str = "truesize's Llama family implements SwiGLU with silu only";

/// The RoPE base: transformers 5 nests it in `rope_parameters`; older configs write `rope_theta`
/// at the top level. Either may be present.
pub(super) fn rope_theta(o: &JsonKeys<'_>, default: f64) -> Result<f64> {
    let nested = match o.obj("rope_parameters")? {
        Some(p) => p.positive_opt("rope_theta")?,
        None => None,
    };
    Ok(match nested {
        Some(t) => t,
        None => o.positive_opt("rope_theta")?.unwrap_or(default),
    })
}

/// The scaling object, if any: `rope_parameters` when it names a type (transformers 5), else
/// `rope_scaling` (older configs).
pub(super) fn rope_scaling_obj<'a>(o: &'a JsonKeys<'_>) -> Result<Option<JsonKeys<'a>>> {
    Ok(match o.obj("rope_parameters")? {
        Some(p) if p.get("rope_type").is_some() || p.get("type").is_some() => Some(p),
        _ => o.obj("rope_scaling")?,
    })
}

/// `rope_type`, or the older `type`.
pub(super) fn rope_type<'a>(s: &'a JsonKeys<'_>) -> Result<Option<&'a str>> {
    Ok(match s.str_opt("rope_type")? {
        Some(k) => Some(k),
        None => s.str_opt("type")?,
    })
}

/// Llama-3 or linear scaling, or none; anything else is refused (it would change the numerics
/// the genuine network must reproduce).
pub(super) fn rope_scaling(o: &JsonKeys<'_>) -> Result<Option<RopeScaling>> {
    let Some(s) = rope_scaling_obj(o)? else {
        return Ok(None);
    };
    scaling_of(&s, rope_type(&s)?, &["default", "llama3", "linear"])
}

/// Llama-3 RoPE scaling, with every value that would make the frequencies undefined refused by
/// its key: a zero factor divides by zero, and so do equal low and high frequency factors in the
/// smooth interpolation (transformers' `_compute_llama3_parameters`).
fn llama3_scaling(s: &JsonKeys<'_>) -> Result<Llama3RopeScaling> {
    let r = Llama3RopeScaling {
        factor: s.positive_opt("factor")?.unwrap_or(8.0),
        low_freq_factor: s.positive_opt("low_freq_factor")?.unwrap_or(1.0),
        high_freq_factor: s.positive_opt("high_freq_factor")?.unwrap_or(4.0),
        original_max_position_embeddings: s.usize_or("original_max_position_embeddings", 8192)?,
    };
    if r.high_freq_factor <= r.low_freq_factor {
        return Err(s.err(
            "high_freq_factor",
            r.high_freq_factor,
            format!(
                "must exceed low_freq_factor = {} (the interpolation divides by their difference)",
                r.low_freq_factor
            ),
        ));
    }
    if r.original_max_position_embeddings == 0 {
        return Err(s.err("original_max_position_embeddings", 0, "must be > 0"));
    }
    Ok(r)
}

/// The scaling a RoPE-parameters object describes, among `allowed` types.
pub(super) fn scaling_of(
    s: &JsonKeys<'_>,
    kind: Option<&str>,
    allowed: &[&str],
) -> Result<Option<RopeScaling>> {
    match kind {
        None | Some("default") => Ok(None),
        Some("llama3") if allowed.contains(&"llama3") => {
            Ok(Some(RopeScaling::Llama3(llama3_scaling(s)?)))
        }
        Some("linear") if allowed.contains(&"linear") => Ok(Some(RopeScaling::Linear {
            factor: match s.positive_opt("factor")? {
                Some(f) => f,
                None => {
                    return Err(s.err("factor", "(missing)", "linear RoPE scaling needs a factor"))
                }
            },
        })),
        Some(other) => Err(s.err(
            "rope_type",
            format!("{other:?}"),
            format!("supported RoPE types here: {}", allowed.join(", ")),
        )),
    }
}

/// Which layers use a sliding window: transformers 5's `layer_types` when given, else the model
/// type's rule (`default_sliding(i)`), each sliding layer seeing `window` positions.
/// `window = None` (a `null` sliding_window) makes every layer full, as in transformers, where
/// a layer only slides when a window is set.
pub(super) fn layer_attention(
    o: &JsonKeys<'_>,
    n_layer: usize,
    window: Option<usize>,
    default_sliding: impl Fn(usize) -> bool,
) -> Result<Vec<Attention>> {
    let kind = |sliding: bool| match (sliding, window) {
        (true, Some(w)) => Attention::Sliding { window: w },
        _ => Attention::Full,
    };
    let Some(list) = o.list_opt("layer_types")? else {
        // Bounded: an absurd layer count is reported by validate, not allocated here.
        let n = n_layer.min(crate::config::MAX_LAYERS + 1);
        return Ok((0..n).map(|i| kind(default_sliding(i))).collect());
    };
    if list.len() != n_layer {
        return Err(o.err(
            "layer_types",
            format!("{} entries", list.len()),
            format!("must list one type per layer (num_hidden_layers = {n_layer})"),
        ));
    }
    list.iter()
        .enumerate()
        .map(|(i, v)| match v.as_str() {
            Some("full_attention") => Ok(Attention::Full),
            Some("sliding_attention") => Ok(kind(true)),
            _ => Err(o.err(
                &format!("layer_types[{i}]"),
                v,
                "expected \"full_attention\" or \"sliding_attention\"",
            )),
        })
        .collect()
}

/// `sliding_window`: absent gives the type's default, `null` no window, 0 is refused.
pub(super) fn sliding_window(o: &JsonKeys<'_>, default: Option<usize>) -> Result<Option<usize>> {
    if !o.present("sliding_window") {
        return Ok(default);
    }
    match o.usize_opt("sliding_window")? {
        Some(0) => Err(o.err(
            "sliding_window",
            0,
            "a window must see at least the token itself (>= 1), or be null for none",
        )),
        w => Ok(w),
    }
}

/// Qwen2/Qwen3's rule: with `use_sliding_window`, layers from `max_window_layers` on slide.
pub(super) fn qwen_layer_attention(o: &JsonKeys<'_>, n_layer: usize) -> Result<Vec<Attention>> {
    let window = if o.bool_or("use_sliding_window", false)? {
        sliding_window(o, Some(4096))?
    } else {
        None
    };
    let first = o.usize_or("max_window_layers", 28)?;
    layer_attention(o, n_layer, window, |i| i >= first)
}

/// The TOML `sliding_window` on the layers `slides(i)` picks.
pub(super) fn toml_layer_attention(
    f: &TomlFields,
    n_layer: usize,
    slides: impl Fn(usize) -> bool,
) -> Vec<Attention> {
    let n = n_layer.min(crate::config::MAX_LAYERS + 1);
    (0..n)
        .map(|i| match f.switches.sliding_window {
            Some(w) if slides(i) => Attention::Sliding { window: w },
            _ => Attention::Full,
        })
        .collect()
}

/// The skeleton from truesize TOML fields, without family switches: sizes, head, biases,
/// experts, RoPE base, norm eps, `[run]`.
pub(super) fn skeleton_toml(f: &TomlFields, arch: &str, model_type: &str) -> Result<ModelConfig> {
    let src = f.src.as_str();
    let Some(intermediate_size) = f.intermediate_size else {
        return Err(Error::field(
            src,
            "intermediate_size",
            "(missing)",
            format!("required for arch = {arch:?} (a gated MLP's width has no fixed ratio)"),
        ));
    };
    let dims = Dims {
        vocab_size: f.vocab_size,
        block_size: f.block_size,
        n_embd: f.n_embd,
        n_layer: f.n_layer,
        n_head: f.n_head,
        n_kv_head: f.n_kv_head.unwrap_or(f.n_head),
        head_dim: f.head_dim.unwrap_or(f.n_embd / f.n_head),
        intermediate_size,
    };
    let name = f.name.clone().unwrap_or_else(|| src.to_string());
    let mut cfg = ModelConfig::plain(name, Arch::Llama, model_type, dims);
    cfg.tie_embeddings = f.tie_embeddings.unwrap_or(false);
    cfg.bias = f.bias.unwrap_or(false);
    cfg.qkv_bias = f.qkv_bias.unwrap_or(false);
    cfg.mlp_bias = f.mlp_bias.unwrap_or(false);
    cfg.n_experts = f.n_experts.unwrap_or(0);
    cfg.n_experts_per_tok = f
        .n_experts_per_tok
        .unwrap_or(if cfg.n_experts > 0 { 2 } else { 0 });
    cfg.set_rope_theta(f.rope_theta.unwrap_or(10_000.0));
    cfg.norm_eps = f.norm_eps.unwrap_or(1e-6);
    cfg.run = f.run.clone();
    Ok(cfg)
}

// ---------------------------------------------------------------------------------------------
// Rules and tensors of the skeleton (shared by every Llama-skeleton family)

/// The skeleton's own rules (GQA divides, RoPE pairs).
pub(super) fn validate_skeleton(cfg: &ModelConfig) -> Result<()> {
    let src = &cfg.name;
    if !cfg.n_head.is_multiple_of(cfg.n_kv_head) {
        return Err(Error::field(
            src,
            "n_kv_head",
            cfg.n_kv_head,
            format!("does not divide n_head = {}", cfg.n_head),
        ));
    }
    if !cfg.head_dim.is_multiple_of(2) {
        return Err(Error::field(
            src,
            "head_dim",
            cfg.head_dim,
            "RoPE rotates pairs of channels: must be even",
        ));
    }
    if !(cfg.rope_theta.is_finite() && cfg.rope_theta > 0.0) {
        return Err(Error::field(
            src,
            "rope_theta",
            cfg.rope_theta,
            "must be > 0",
        ));
    }
    Ok(())
}

/// Embeddings, final norm and (untied) head.
pub(super) fn skeleton_global_tensors(cfg: &ModelConfig) -> Vec<ParamTensor> {
    let (d, v) = (cfg.n_embd, cfg.vocab_size);
    let mut out = vec![
        ParamTensor::global(
            "model.embed_tokens.weight",
            &[v, d],
            Component::EmbedTokens,
            Kind::Embedding,
        ),
        ParamTensor::global("model.norm.weight", &[d], Component::FinalNorm, Kind::Norm),
    ];
    if !cfg.tie_embeddings {
        out.push(ParamTensor::global(
            "lm_head.weight",
            &[v, d],
            Component::LmHead,
            Kind::MatmulIn,
        ));
    }
    out
}

/// A gated MLP's tensors under `prefix` (width `ff`), stored as `names` (gate, up, down) or with
/// gate | up fused in one tensor (Phi-3's `gate_up_proj`).
fn gated_mlp(
    l: &mut LayerTensors,
    cfg: &ModelConfig,
    prefix: &str,
    ff: usize,
    names: [&str; 3],
    component: Component,
    bias: bool,
) {
    let d = cfg.n_embd;
    let b = |n: usize| bias.then_some(n);
    match cfg.gate_up_storage {
        Storage::Separate => {
            l.matrix(
                &format!("{prefix}.{}", names[0]),
                [ff, d],
                component,
                Kind::MatmulIn,
                b(ff),
            );
            l.matrix(
                &format!("{prefix}.{}", names[1]),
                [ff, d],
                component,
                Kind::MatmulIn,
                b(ff),
            );
        }
        Storage::Fused => l.matrix(
            &format!("{prefix}.gate_up_proj"),
            [2 * ff, d],
            component,
            Kind::MatmulIn,
            b(2 * ff),
        ),
    }
    l.matrix(
        &format!("{prefix}.{}", names[2]),
        [d, ff],
        component,
        Kind::MatmulOut,
        b(d),
    );
}

/// Layer `layer`'s tensors for any combination of the skeleton's switches, in the order the
/// network requests them.
pub(super) fn skeleton_layer_tensors(cfg: &ModelConfig, layer: usize) -> Vec<ParamTensor> {
    let (d, ff, q, kv) = (cfg.n_embd, cfg.intermediate_size, cfg.q_dim(), cfg.kv_dim());
    let qkv_b = |n: usize| cfg.has_qkv_bias().then_some(n);
    let mut l = LayerTensors::new(layer, format!("model.layers.{layer}"));
    // nn.Linear stores [out, in].
    l.norm("input_layernorm", d, false);
    match cfg.qkv_storage {
        Storage::Separate => {
            for (name, out) in [("q_proj", q), ("k_proj", kv), ("v_proj", kv)] {
                l.matrix(
                    &format!("self_attn.{name}"),
                    [out, d],
                    Component::Attention,
                    Kind::MatmulIn,
                    qkv_b(out),
                );
            }
        }
        Storage::Fused => l.matrix(
            "self_attn.qkv_proj",
            [q + 2 * kv, d],
            Component::Attention,
            Kind::MatmulIn,
            qkv_b(q + 2 * kv),
        ),
    }
    if cfg.qk_norm {
        // One head_dim weight each, shared by all heads.
        for name in ["self_attn.q_norm.weight", "self_attn.k_norm.weight"] {
            l.push(name, &[cfg.head_dim], Component::Attention, Kind::Norm);
        }
    }
    l.matrix(
        "self_attn.o_proj",
        [d, q],
        Component::Attention,
        Kind::MatmulOut,
        cfg.bias.then_some(d),
    );
    l.norm("post_attention_layernorm", d, false);
    if cfg.norm_placement == NormPlacement::Sandwich {
        l.norm("pre_feedforward_layernorm", d, false);
        l.norm("post_feedforward_layernorm", d, false);
    }
    if cfg.layer_is_moe(layer) {
        let (block, names) = match cfg.expert_names {
            // Mixtral's w1 = gate, w3 = up, w2 = down.
            ExpertNames::Mixtral => ("block_sparse_moe", ["w1", "w3", "w2"]),
            ExpertNames::Qwen => ("mlp", ["gate_proj", "up_proj", "down_proj"]),
        };
        l.matrix(
            &format!("{block}.gate"),
            [cfg.n_experts, d],
            Component::Router,
            Kind::MatmulIn,
            None,
        );
        for e in 0..cfg.n_experts {
            // Experts have no biases.
            gated_mlp(
                &mut l,
                cfg,
                &format!("{block}.experts.{e}"),
                cfg.moe_intermediate_size,
                names,
                Component::Experts,
                false,
            );
        }
    } else {
        gated_mlp(
            &mut l,
            cfg,
            "mlp",
            ff,
            ["gate_proj", "up_proj", "down_proj"],
            Component::Mlp,
            cfg.mlp_bias,
        );
    }
    l.finish()
}

/// Dense and sparse layers differ in shape.
pub(super) fn skeleton_layer_kind(cfg: &ModelConfig, layer: usize) -> usize {
    usize::from(cfg.layer_is_moe(layer))
}

/// Component from a Llama-skeleton tensor name (both expert naming schemes).
pub(super) fn skeleton_guess_component(n: &str) -> Option<Component> {
    Some(if n.contains("embed_tokens.") {
        Component::EmbedTokens
    } else if n.starts_with("lm_head.") {
        Component::LmHead
    } else if n.contains("block_sparse_moe.gate.") || n.contains(".mlp.gate.") {
        Component::Router
    } else if n.contains("block_sparse_moe.experts.") || n.contains(".mlp.experts.") {
        Component::Experts
    } else if n.contains(".self_attn.") {
        Component::Attention
    } else if n.contains(".mlp.") {
        Component::Mlp
    } else if n.contains("layernorm.") {
        Component::Norms
    } else if n.starts_with("model.norm.") || n.starts_with("norm.") {
        Component::FinalNorm
    } else {
        return None;
    })
}

/// Why the skeleton's MLP (or experts) is not the rule's 8·d².
pub(super) fn skeleton_mlp_vs_rule(cfg: &ModelConfig) -> String {
    let d = cfg.n_embd as f64;
    let gate = gate_name(cfg);
    if cfg.is_moe() {
        let sparse = cfg.moe_layer_count();
        let dense = cfg.n_layer - sparse;
        let mut why = format!(
            "{} {gate} experts of 3·d×{} ({:.3}·d² each) plus a router in {sparse} of {} layers, not one 8·d² MLP",
            cfg.n_experts,
            cfg.moe_intermediate_size,
            3.0 * cfg.moe_intermediate_size as f64 / d,
            cfg.n_layer
        );
        if dense > 0 {
            why.push_str(&format!(
                "; {dense} dense layers of 3·d×{}",
                cfg.intermediate_size
            ));
        }
        why
    } else {
        format!(
            "{gate}: 3 matrices d×{} = {:.3}·d² per layer, not 8·d²",
            cfg.intermediate_size,
            3.0 * cfg.intermediate_size as f64 / d
        )
    }
}

fn gate_name(cfg: &ModelConfig) -> &'static str {
    if cfg.mlp == MlpKind::GeGlu {
        "GeGLU (tanh GELU)"
    } else {
        "SwiGLU"
    }
}

/// The skeleton's reasons that the 12·d² rule does not apply.
pub(super) fn skeleton_rule_exceptions(cfg: &ModelConfig) -> Vec<String> {
    let mut why = vec![
        format!(
            "{} MLP: 3 matrices of width {} (3·d·ff = {:.2}·d²), not 2 of 4d (8·d²)",
            gate_name(cfg),
            cfg.intermediate_size,
            3.0 * cfg.intermediate_size as f64 / cfg.n_embd as f64
        ),
        "RoPE: no learned position embedding, yet the rule adds block·d".into(),
    ];
    if cfg.qk_norm {
        why.push(format!(
            "q/k norms: 2·{} weights per layer the rule leaves out",
            cfg.head_dim
        ));
    }
    if cfg.norm_placement == NormPlacement::Sandwich {
        why.push("four norms per layer, not the two the rule's block assumes".into());
    }
    why
}

// ---------------------------------------------------------------------------------------------
// The Llama family itself

impl Family for Llama {
    fn name(&self) -> &'static str {
        "llama"
    }

    fn arch(&self) -> Arch {
        Arch::Llama
    }

    fn model_types(&self) -> &'static [&'static str] {
        &["llama", "mistral", "qwen2", "mixtral"]
    }

    fn toml_arch(&self) -> &'static str {
        "llama"
    }

    /// The skeleton with biases (Llama `attention_bias` and `mlp_bias`, Qwen2's fixed q/k/v
    /// biases), Mixtral's experts, and Mistral's, Mixtral's and Qwen2's sliding windows.
    fn read_hf(&self, model_type: &str, o: &JsonKeys<'_>) -> Result<ModelConfig> {
        let mut cfg = skeleton(o, model_type, defaults(model_type))?;
        check_activation(o, "hidden_act", &["silu"], SILU_ONLY)?;
        cfg.rope_scaling = rope_scaling(o)?;
        // Llama's attention_bias covers q, k, v and o; Mistral and Mixtral have none.
        cfg.bias = model_type == "llama" && o.bool_or("attention_bias", false)?;
        // Qwen2 always has q/k/v biases and no o bias.
        cfg.qkv_bias = model_type == "qwen2";
        cfg.mlp_bias = model_type == "llama" && o.bool_or("mlp_bias", false)?;
        cfg.layer_attention = match model_type {
            // MistralConfig defaults to a 4096 window, MixtralConfig to none; either applies to
            // every layer.
            "mistral" => layer_attention(o, cfg.n_layer, sliding_window(o, Some(4096))?, |_| true)?,
            "mixtral" => layer_attention(o, cfg.n_layer, sliding_window(o, None)?, |_| true)?,
            "qwen2" => qwen_layer_attention(o, cfg.n_layer)?,
            _ => cfg.layer_attention,
        };
        if model_type == "mixtral" {
            cfg.n_experts = o.usize_or("num_local_experts", 8)?;
            cfg.n_experts_per_tok = o.usize_or("num_experts_per_tok", 2)?;
            if cfg.n_experts == 0 {
                return Err(o.err("num_local_experts", 0, "must be > 0"));
            }
        }
        Ok(cfg)
    }

    fn hf_spelling(&self, model_type: &str) -> &'static [(&'static str, &'static str)] {
        const MIXTRAL: &[(&str, &str)] = &[
            ("n_embd", "hidden_size"),
            ("n_layer", "num_hidden_layers"),
            ("n_head", "num_attention_heads"),
            ("n_kv_head", "num_key_value_heads"),
            ("block_size", "max_position_embeddings"),
            ("norm_eps", "rms_norm_eps"),
            ("n_experts", "num_local_experts"),
            ("n_experts_per_tok", "num_experts_per_tok"),
        ];
        if model_type == "mixtral" {
            MIXTRAL
        } else {
            SKELETON_SPELLING
        }
    }

    fn read_toml(&self, f: &TomlFields) -> Result<ModelConfig> {
        f.only_switches("llama", &["sliding_window"])?;
        let n_experts = f.n_experts.unwrap_or(0);
        let model_type = if n_experts > 0 { "mixtral" } else { "llama" };
        let mut cfg = skeleton_toml(f, "llama", model_type)?;
        // Mistral-style: a window applies to every layer.
        cfg.layer_attention = toml_layer_attention(f, cfg.n_layer, |_| true);
        Ok(cfg)
    }

    fn validate(&self, cfg: &ModelConfig) -> Result<()> {
        validate_skeleton(cfg)
    }

    fn global_tensors(&self, cfg: &ModelConfig) -> Vec<ParamTensor> {
        skeleton_global_tensors(cfg)
    }

    fn layer_tensors(&self, cfg: &ModelConfig, layer: usize) -> Vec<ParamTensor> {
        skeleton_layer_tensors(cfg, layer)
    }

    fn layer_kind(&self, cfg: &ModelConfig, layer: usize) -> usize {
        skeleton_layer_kind(cfg, layer)
    }

    /// RoPE's `rotary_emb.inv_freq`, which Llama-2 checkpoints carry.
    fn is_buffer(&self, name: &str) -> bool {
        name.ends_with("rotary_emb.inv_freq")
    }

    fn guess_component(&self, n: &str) -> Option<Component> {
        skeleton_guess_component(n)
    }

    fn mlp_vs_rule(&self, cfg: &ModelConfig) -> String {
        skeleton_mlp_vs_rule(cfg)
    }

    fn rule_exceptions(&self, cfg: &ModelConfig) -> Vec<String> {
        skeleton_rule_exceptions(cfg)
    }
}
