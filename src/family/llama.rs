//! The Llama skeleton (HF `model_type` llama, mistral, qwen2, mixtral; truesize `arch =
//! "llama"`): RMSNorm, RoPE, SwiGLU MLP, grouped-query attention, untied head by default;
//! Qwen2's q/k/v biases; Mixtral's sparse mixture of experts (`block_sparse_moe`).

use super::{Component, Family, Kind, LayerTensors, ParamTensor};
use crate::config::fields::{JsonKeys, TomlFields};
use crate::config::{Arch, Llama3RopeScaling, ModelConfig, RunDefaults};
use crate::error::{Error, Result};

pub struct Llama;

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

/// The `model_type` whose defaults apply.
fn defaults(model_type: &str) -> &'static LlamaDefaults {
    match model_type {
        "mistral" => &MISTRAL,
        "qwen2" => &QWEN2,
        "mixtral" => &MIXTRAL,
        _ => &LLAMA,
    }
}

/// Llama-3 RoPE scaling, with every value that would make the frequencies undefined (a zero
/// factor divides by zero; equal low and high frequency factors divide by zero in the smooth
/// interpolation, as in transformers' `_compute_llama3_parameters`) refused by its key.
fn llama3_scaling(s: &JsonKeys<'_>) -> Result<Llama3RopeScaling> {
    let r = Llama3RopeScaling {
        factor: s.f64_opt("factor")?.unwrap_or(8.0),
        low_freq_factor: s.f64_opt("low_freq_factor")?.unwrap_or(1.0),
        high_freq_factor: s.f64_opt("high_freq_factor")?.unwrap_or(4.0),
        original_max_position_embeddings: s.usize_or("original_max_position_embeddings", 8192)?,
    };
    let positive = |key: &str, v: f64| {
        if v.is_finite() && v > 0.0 {
            Ok(())
        } else {
            Err(Error::field(
                s.src,
                s.key(key),
                v,
                "must be a finite number > 0",
            ))
        }
    };
    positive("factor", r.factor)?;
    positive("low_freq_factor", r.low_freq_factor)?;
    positive("high_freq_factor", r.high_freq_factor)?;
    if r.high_freq_factor <= r.low_freq_factor {
        return Err(Error::field(
            s.src,
            s.key("high_freq_factor"),
            r.high_freq_factor,
            format!(
                "must exceed low_freq_factor = {} (the interpolation divides by their difference)",
                r.low_freq_factor
            ),
        ));
    }
    if r.original_max_position_embeddings == 0 {
        return Err(Error::field(
            s.src,
            s.key("original_max_position_embeddings"),
            0,
            "must be > 0",
        ));
    }
    Ok(r)
}

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

    fn read_hf(&self, model_type: &str, o: &JsonKeys<'_>) -> Result<ModelConfig> {
        let src = o.src;
        let d = defaults(model_type);

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
                    Some("llama3") => Some(llama3_scaling(&s)?),
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
            // Mistral and Mixtral apply `sliding_window` to every layer whenever it is set
            // (`null`, as in Mistral-7B v0.2+ and Mixtral, means full attention). Qwen2's window
            // is per layer type and off in released configs; Llama has none.
            sliding_window: match model_type {
                "mistral" | "mixtral" => o.usize_opt("sliding_window")?,
                _ => None,
            },
            run: RunDefaults::default(),
        })
    }

    fn hf_spelling(&self, model_type: &str) -> &'static [(&'static str, &'static str)] {
        const COMMON: &[(&str, &str)] = &[
            ("n_embd", "hidden_size"),
            ("n_layer", "num_hidden_layers"),
            ("n_head", "num_attention_heads"),
            ("n_kv_head", "num_key_value_heads"),
            ("block_size", "max_position_embeddings"),
            ("norm_eps", "rms_norm_eps"),
            ("bias", "attention_bias"),
        ];
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
            COMMON
        }
    }

    fn read_toml(&self, f: &TomlFields) -> Result<ModelConfig> {
        let src = f.src.as_str();
        let Some(intermediate_size) = f.intermediate_size else {
            return Err(Error::field(
                src,
                "intermediate_size",
                "(missing)",
                "required for arch = \"llama\" (SwiGLU width has no fixed ratio)",
            ));
        };
        let n_experts = f.n_experts.unwrap_or(0);
        Ok(ModelConfig {
            name: f.name.clone().unwrap_or_else(|| src.to_string()),
            arch: Arch::Llama,
            model_type: if n_experts > 0 { "mixtral" } else { "llama" }.into(),
            vocab_size: f.vocab_size,
            block_size: f.block_size,
            n_embd: f.n_embd,
            n_layer: f.n_layer,
            n_head: f.n_head,
            n_kv_head: f.n_kv_head.unwrap_or(f.n_head),
            head_dim: f.head_dim.unwrap_or(f.n_embd / f.n_head),
            intermediate_size,
            tie_embeddings: f.tie_embeddings.unwrap_or(false),
            bias: f.bias.unwrap_or(false),
            qkv_bias: f.qkv_bias.unwrap_or(false),
            mlp_bias: f.mlp_bias.unwrap_or(false),
            n_experts,
            n_experts_per_tok: f
                .n_experts_per_tok
                .unwrap_or(if n_experts > 0 { 2 } else { 0 }),
            rope_theta: f.rope_theta.unwrap_or(10_000.0),
            rope_scaling: None,
            norm_eps: f.norm_eps.unwrap_or(1e-6),
            sliding_window: f.sliding_window,
            run: f.run.clone(),
        })
    }

    fn validate(&self, cfg: &ModelConfig) -> Result<()> {
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

    fn global_tensors(&self, cfg: &ModelConfig) -> Vec<ParamTensor> {
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

    fn layer_tensors(&self, cfg: &ModelConfig, layer: usize) -> Vec<ParamTensor> {
        let (d, ff, q, kv) = (cfg.n_embd, cfg.intermediate_size, cfg.q_dim(), cfg.kv_dim());
        let qkv_b = |n: usize| cfg.has_qkv_bias().then_some(n);
        let mut l = LayerTensors::new(layer, format!("model.layers.{layer}"));
        // nn.Linear stores [out, in].
        l.norm("input_layernorm", d, false);
        l.matrix(
            "self_attn.q_proj",
            [q, d],
            Component::Attention,
            Kind::MatmulIn,
            qkv_b(q),
        );
        l.matrix(
            "self_attn.k_proj",
            [kv, d],
            Component::Attention,
            Kind::MatmulIn,
            qkv_b(kv),
        );
        l.matrix(
            "self_attn.v_proj",
            [kv, d],
            Component::Attention,
            Kind::MatmulIn,
            qkv_b(kv),
        );
        l.matrix(
            "self_attn.o_proj",
            [d, q],
            Component::Attention,
            Kind::MatmulOut,
            cfg.bias.then_some(d),
        );
        l.norm("post_attention_layernorm", d, false);
        if cfg.is_moe() {
            l.matrix(
                "block_sparse_moe.gate",
                [cfg.n_experts, d],
                Component::Router,
                Kind::MatmulIn,
                None,
            );
            for e in 0..cfg.n_experts {
                // Mixtral's w1 = gate, w3 = up, w2 = down; experts have no biases.
                let x = format!("block_sparse_moe.experts.{e}");
                l.matrix(
                    &format!("{x}.w1"),
                    [ff, d],
                    Component::Experts,
                    Kind::MatmulIn,
                    None,
                );
                l.matrix(
                    &format!("{x}.w3"),
                    [ff, d],
                    Component::Experts,
                    Kind::MatmulIn,
                    None,
                );
                l.matrix(
                    &format!("{x}.w2"),
                    [d, ff],
                    Component::Experts,
                    Kind::MatmulOut,
                    None,
                );
            }
        } else {
            let mb = |n: usize| cfg.mlp_bias.then_some(n);
            l.matrix(
                "mlp.gate_proj",
                [ff, d],
                Component::Mlp,
                Kind::MatmulIn,
                mb(ff),
            );
            l.matrix(
                "mlp.up_proj",
                [ff, d],
                Component::Mlp,
                Kind::MatmulIn,
                mb(ff),
            );
            l.matrix(
                "mlp.down_proj",
                [d, ff],
                Component::Mlp,
                Kind::MatmulOut,
                mb(d),
            );
        }
        l.finish()
    }

    /// RoPE's `rotary_emb.inv_freq`, which Llama-2 checkpoints carry.
    fn is_buffer(&self, name: &str) -> bool {
        name.ends_with("rotary_emb.inv_freq")
    }

    fn guess_component(&self, n: &str) -> Option<Component> {
        Some(if n.contains("embed_tokens.") {
            Component::EmbedTokens
        } else if n.starts_with("lm_head.") {
            Component::LmHead
        } else if n.contains("block_sparse_moe.gate.") {
            Component::Router
        } else if n.contains("block_sparse_moe.experts.") {
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

    fn mlp_vs_rule(&self, cfg: &ModelConfig) -> String {
        if cfg.is_moe() {
            format!(
                "{} SwiGLU experts of 3·d×{} plus a router per layer, not one 8·d² MLP",
                cfg.n_experts, cfg.intermediate_size
            )
        } else {
            format!(
                "SwiGLU: 3 matrices d×{} = {:.3}·d² per layer, not 8·d²",
                cfg.intermediate_size,
                3.0 * cfg.intermediate_size as f64 / cfg.n_embd as f64
            )
        }
    }

    fn rule_exceptions(&self, cfg: &ModelConfig) -> Vec<String> {
        vec![
            format!(
                "SwiGLU MLP: 3 matrices of width {} (3·d·ff = {:.2}·d²), not 2 of 4d (8·d²)",
                cfg.intermediate_size,
                3.0 * cfg.intermediate_size as f64 / cfg.n_embd as f64
            ),
            "RoPE: no learned position embedding, yet the rule adds block·d".into(),
        ]
    }
}
