//! GPT-2 (HF `model_type` "gpt2", truesize `arch = "gpt2"`): learned positions, LayerNorm with
//! bias, fused qkv, GELU MLP, tied head by default. HF keeps GPT-2's TensorFlow heritage: its
//! `Conv1D` weights are stored `[in, out]`.

use super::{Component, Family, Kind, LayerTensors, ParamTensor};
use crate::config::fields::{JsonKeys, TomlFields};
use crate::config::{Arch, Dims, ModelConfig};
use crate::error::{Error, Result};

pub struct Gpt2;

/// Published GPT-2 checkpoints saved from `GPT2Model` have no `transformer.` prefix.
const HUB_BARE_PREFIXES: [&str; 4] = ["h.", "wte.", "wpe.", "ln_f."];

impl Family for Gpt2 {
    fn name(&self) -> &'static str {
        "gpt2"
    }

    fn arch(&self) -> Arch {
        Arch::Gpt2
    }

    fn model_types(&self) -> &'static [&'static str] {
        &["gpt2"]
    }

    fn toml_arch(&self) -> &'static str {
        "gpt2"
    }

    /// transformers' `GPT2Config` defaults.
    fn read_hf(&self, _model_type: &str, o: &JsonKeys<'_>) -> Result<ModelConfig> {
        let src = o.src;
        let n_embd = o.usize_or("n_embd", 768)?;
        let n_head = o.usize_or("n_head", 12)?;
        if n_head == 0 {
            return Err(Error::field(src, "n_head", 0, "must be > 0"));
        }
        let act = o.str_opt("activation_function")?;
        if let Some(act) = act {
            if !matches!(act, "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast") {
                return Err(Error::field(
                    src,
                    "activation_function",
                    format!("{act:?}"),
                    "truesize's GPT-2 implements the tanh GELU (gelu_new) only",
                ));
            }
        }
        let dims = Dims {
            vocab_size: o.usize_or("vocab_size", 50257)?,
            block_size: o.usize_or("n_positions", 1024)?,
            n_embd,
            n_layer: o.usize_or("n_layer", 12)?,
            n_head,
            n_kv_head: n_head,
            head_dim: n_embd / n_head,
            // `n_inner: null` means 4·d (saturating: an absurd n_embd is reported by validate,
            // not as an overflow; fuzz/regressions/hf_config).
            intermediate_size: o.usize_or("n_inner", n_embd.saturating_mul(4))?,
        };
        let mut cfg = ModelConfig::plain(src, Arch::Gpt2, "gpt2", dims);
        cfg.gelu = gelu_form(act.unwrap_or("gelu_new"));
        cfg.tie_embeddings = o.bool_or("tie_word_embeddings", true)?;
        cfg.norm_eps = o.f64_opt("layer_norm_epsilon")?.unwrap_or(1e-5);
        Ok(cfg)
    }

    fn hf_spelling(&self, _model_type: &str) -> &'static [(&'static str, &'static str)] {
        &[
            ("block_size", "n_positions"),
            ("intermediate_size", "n_inner"),
            ("norm_eps", "layer_norm_epsilon"),
        ]
    }

    fn read_toml(&self, f: &TomlFields) -> Result<ModelConfig> {
        let src = f.src.as_str();
        for (field, set) in [
            ("qkv_bias", f.qkv_bias.is_some()),
            ("mlp_bias", f.mlp_bias.is_some()),
            ("rope_theta", f.rope_theta.is_some()),
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
        f.only_switches("gpt2", &[])?;
        let n_experts = f.n_experts.unwrap_or(0);
        let dims = Dims {
            vocab_size: f.vocab_size,
            block_size: f.block_size,
            n_embd: f.n_embd,
            n_layer: f.n_layer,
            n_head: f.n_head,
            n_kv_head: f.n_kv_head.unwrap_or(f.n_head),
            head_dim: f.head_dim.unwrap_or(f.n_embd / f.n_head),
            // Saturating: an absurd n_embd is reported by validate (fuzz/regressions/toml_config).
            intermediate_size: f.intermediate_size.unwrap_or(f.n_embd.saturating_mul(4)),
        };
        let name = f.name.clone().unwrap_or_else(|| src.to_string());
        let mut cfg = ModelConfig::plain(name, Arch::Gpt2, "gpt2", dims);
        cfg.tie_embeddings = f.tie_embeddings.unwrap_or(true);
        cfg.bias = f.bias.unwrap_or(true);
        // Kept so that validate names the field: GPT-2 has no experts.
        cfg.n_experts = n_experts;
        cfg.n_experts_per_tok = f
            .n_experts_per_tok
            .unwrap_or(if n_experts > 0 { 2 } else { 0 });
        cfg.norm_eps = f.norm_eps.unwrap_or(1e-5);
        cfg.run = f.run.clone();
        Ok(cfg)
    }

    fn validate(&self, cfg: &ModelConfig) -> Result<()> {
        let src = &cfg.name;
        if !cfg.n_embd.is_multiple_of(cfg.n_head) {
            return Err(Error::field(
                src,
                "n_head",
                cfg.n_head,
                format!("does not divide n_embd = {}", cfg.n_embd),
            ));
        }
        if cfg.n_kv_head != cfg.n_head {
            return Err(Error::field(
                src,
                "n_kv_head",
                cfg.n_kv_head,
                format!(
                    "GPT-2 has full multi-head attention: must equal n_head = {}",
                    cfg.n_head
                ),
            ));
        }
        if cfg.head_dim * cfg.n_head != cfg.n_embd {
            return Err(Error::field(
                src,
                "head_dim",
                cfg.head_dim,
                format!(
                    "GPT-2 needs head_dim = n_embd / n_head = {}",
                    cfg.n_embd / cfg.n_head
                ),
            ));
        }
        if cfg.is_moe() {
            return Err(Error::field(
                src,
                "n_experts",
                cfg.n_experts,
                "mixture of experts is only supported for arch = \"llama\"",
            ));
        }
        Ok(())
    }

    fn global_tensors(&self, cfg: &ModelConfig) -> Vec<ParamTensor> {
        let (d, v) = (cfg.n_embd, cfg.vocab_size);
        let mut out = vec![
            ParamTensor::global(
                "transformer.wte.weight",
                &[v, d],
                Component::EmbedTokens,
                Kind::Embedding,
            ),
            ParamTensor::global(
                "transformer.wpe.weight",
                &[cfg.block_size, d],
                Component::EmbedPositions,
                Kind::Embedding,
            ),
            ParamTensor::global(
                "transformer.ln_f.weight",
                &[d],
                Component::FinalNorm,
                Kind::Norm,
            ),
        ];
        if cfg.bias {
            out.push(ParamTensor::global(
                "transformer.ln_f.bias",
                &[d],
                Component::FinalNorm,
                Kind::Norm,
            ));
        }
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
        let (d, ff) = (cfg.n_embd, cfg.intermediate_size);
        // Conv1D stores [in, out]; every Linear and LayerNorm has a bias unless bias = false.
        let b = |n: usize| cfg.bias.then_some(n);
        let mut l = LayerTensors::new(layer, format!("transformer.h.{layer}"));
        l.norm("ln_1", d, cfg.bias);
        l.matrix(
            "attn.c_attn",
            [d, 3 * d],
            Component::Attention,
            Kind::MatmulIn,
            b(3 * d),
        );
        l.matrix(
            "attn.c_proj",
            [d, d],
            Component::Attention,
            Kind::MatmulOut,
            b(d),
        );
        l.norm("ln_2", d, cfg.bias);
        l.matrix("mlp.c_fc", [d, ff], Component::Mlp, Kind::MatmulIn, b(ff));
        l.matrix("mlp.c_proj", [ff, d], Component::Mlp, Kind::MatmulOut, b(d));
        l.finish()
    }

    fn canonical_name(&self, stored: &str) -> String {
        if HUB_BARE_PREFIXES.iter().any(|p| stored.starts_with(p)) {
            format!("transformer.{stored}")
        } else {
            stored.to_string()
        }
    }

    /// The causal-mask buffers `attn.bias` `[1, 1, n, n]` and `attn.masked_bias` that
    /// transformers < 4.31 saved: HF's hub counts them (137,022,720 for GPT-2 instead of
    /// 124,439,808).
    fn is_buffer(&self, name: &str) -> bool {
        name.ends_with(".attn.bias") || name.ends_with(".attn.masked_bias")
    }

    fn guess_component(&self, n: &str) -> Option<Component> {
        let last = |s: &str| n.ends_with(s) || n.contains(&format!("{s}."));
        Some(if n.contains("wte.") {
            Component::EmbedTokens
        } else if n.contains("wpe.") {
            Component::EmbedPositions
        } else if n.starts_with("lm_head.") {
            Component::LmHead
        } else if n.contains(".attn.") {
            Component::Attention
        } else if n.contains(".mlp.c_fc.") || n.contains(".mlp.c_proj.") {
            // GPT-2's own MLP names only: other families' `.mlp.` holds routers and experts.
            Component::Mlp
        } else if last("ln_1") || last("ln_2") {
            Component::Norms
        } else if n.contains("ln_f.") {
            Component::FinalNorm
        } else {
            return None;
        })
    }

    fn mlp_vs_rule(&self, cfg: &ModelConfig) -> String {
        if cfg.intermediate_size == 4 * cfg.n_embd {
            "rule's 8·d² per layer; the difference is biases".into()
        } else {
            format!("MLP width {} instead of 4·d", cfg.intermediate_size)
        }
    }

    fn rule_exceptions(&self, cfg: &ModelConfig) -> Vec<String> {
        if cfg.intermediate_size != 4 * cfg.n_embd {
            vec![format!(
                "MLP width {} is not 4·d = {}",
                cfg.intermediate_size,
                4 * cfg.n_embd
            )]
        } else {
            Vec::new()
        }
    }
}

/// How HF computes the activation it names (what PyTorch keeps for backward differs).
pub(super) fn gelu_form(hf_name: &str) -> crate::config::GeluForm {
    use crate::config::GeluForm;
    match hf_name {
        "gelu_new" => GeluForm::New,
        "gelu_fast" => GeluForm::Fast,
        _ => GeluForm::Fused,
    }
}
