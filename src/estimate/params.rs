//! Exact parameter counts per component, from a config alone: the sum over the family's tensor
//! list (`crate::family`), so nothing here knows a family. The shape-only census of the genuine
//! network must agree to the parameter (tests/count_and_parser_properties.rs).

use crate::config::ModelConfig;
use crate::error::{Error, Result};
pub use crate::family::Component;
use crate::family::{self, Kind};
use serde::{Serialize, Serializer};

/// One component's count.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ComponentCount {
    pub component: Component,
    pub params: u64,
}

/// A share of the gap between the 12·d² rule and the exact count, with its cause.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GapTerm {
    /// Which part of the rule it corrects.
    pub term: &'static str,
    /// exact − rule for that part (parameters, signed).
    pub delta: i128,
    /// Why the rule misses it.
    pub why: String,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ParamEstimate {
    /// Exact count, tied weights once.
    pub total: u64,
    /// Token and position embeddings excluded (Kaplan et al. 2020's N); an untied head stays in.
    pub non_embedding: u64,
    /// Parameters a token passes through (MoE: only `n_experts_per_tok` experts); = total if dense.
    pub active_per_token: u64,
    /// The 12·d² rule `(vocab + block)·d + 12·d²·L`.
    pub rough_12d2: u64,
    /// `(rough − total) / total`.
    pub rough_rel_error: f64,
    /// Whether the rule's assumptions hold (GPT-2-like): 4d GELU MLP, full heads, learned positions.
    pub rough_applies: bool,
    #[serde(serialize_with = "components_as_map")]
    pub components: Vec<ComponentCount>,
    /// Where the 12·d² rule and the exact count part, largest first.
    pub rough_gap: Vec<GapTerm>,
}

pub fn components_as_map<S: Serializer>(c: &[ComponentCount], s: S) -> Result<S::Ok, S::Error> {
    use serde::ser::SerializeMap;
    let mut m = s.serialize_map(Some(c.len()))?;
    for cc in c {
        m.serialize_entry(cc.component.name(), &cc.params)?;
    }
    m.end()
}

impl ParamEstimate {
    pub fn get(&self, c: Component) -> u64 {
        self.components
            .iter()
            .find(|cc| cc.component == c)
            .map_or(0, |cc| cc.params)
    }
}

/// Sums over the family's tensor list, in u128 so that no valid config can overflow while
/// summing.
struct Sums {
    /// By `Component::ALL` index.
    per: [u128; 9],
    /// Attention matrices without biases, to compare with the rule's 4·d².
    attention_weights: u128,
    /// Biases and norm vectors: the O(d) terms the 12·d² rule drops.
    vectors: u128,
    /// RMSNorm weights over head_dim on q and k (Qwen3, Gemma 3), inside `Attention`.
    qk_norms: u128,
    /// Norms in layer 0 (2 for pre-norm blocks, 4 for Gemma's).
    norms_in_layer0: usize,
}

impl Sums {
    fn of(cfg: &ModelConfig) -> Sums {
        let mut s = Sums {
            per: [0; 9],
            attention_weights: 0,
            vectors: 0,
            qk_norms: 0,
            norms_in_layer0: 0,
        };
        for (t, times) in family::weighted_tensors(cfg) {
            let n = t.numel() as u128 * times as u128;
            s.per[index(t.component)] += n;
            if t.component == Component::Attention && t.kind.is_matmul() {
                s.attention_weights += n;
            }
            if matches!(t.kind, Kind::Bias | Kind::Norm) {
                s.vectors += n;
            }
            if t.component == Component::Attention && t.kind == Kind::Norm {
                s.qk_norms += n;
            }
            if t.component == Component::Norms
                && t.layer == Some(0)
                && t.kind == Kind::Norm
                && t.name.ends_with(".weight")
            {
                s.norms_in_layer0 += 1;
            }
        }
        s
    }

    fn get(&self, c: Component) -> u128 {
        self.per[index(c)]
    }

    fn total(&self) -> u128 {
        self.per.iter().sum()
    }
}

fn index(c: Component) -> usize {
    Component::ALL.iter().position(|&x| x == c).unwrap_or(0)
}

fn to_u64(cfg: &ModelConfig, what: &str, v: u128) -> Result<u64> {
    u64::try_from(v).map_err(|_| {
        Error::field(
            &cfg.name,
            what,
            v,
            "parameter count overflows 64 bits: the config is absurd",
        )
    })
}

/// The 12·d² rule of thumb: `(vocab + block)·d + 12·d²·L` (embeddings plus 4·d² of attention
/// and 8·d² of a 4d GELU MLP per layer).
pub fn rough_12d2(cfg: &ModelConfig) -> u128 {
    let d = cfg.n_embd as u128;
    (cfg.vocab_size as u128 + cfg.block_size as u128) * d + 12 * d * d * cfg.n_layer as u128
}

/// Why the 12·d² rule's assumptions (GELU MLP of width 4d, full attention heads of width d/h,
/// learned positions, dense, d large enough that biases and norms are negligible) fail for
/// `cfg`, one reason per line; empty when they hold. Where they fail, the rule is shown but
/// does not gate.
pub fn why_rough_rule_fails(cfg: &ModelConfig) -> Vec<String> {
    let mut why_not = family::of(cfg).rule_exceptions(cfg);
    if cfg.n_kv_head != cfg.n_head {
        why_not.push(format!(
            "GQA: {} kv heads for {} query heads, so k/v are {} wide, not d = {}",
            cfg.n_kv_head,
            cfg.n_head,
            cfg.kv_dim(),
            cfg.n_embd
        ));
    }
    if cfg.q_dim() != cfg.n_embd {
        why_not.push(format!(
            "explicit head_dim: n_head·head_dim = {} ≠ d = {}",
            cfg.q_dim(),
            cfg.n_embd
        ));
    }
    if !cfg.tie_embeddings {
        why_not.push(format!(
            "untied lm_head adds vocab·d = {} parameters",
            crate::units::group((cfg.vocab_size as u64).saturating_mul(cfg.n_embd as u64))
        ));
    }
    if cfg.is_moe() {
        why_not.push(format!(
            "mixture of experts: {} expert MLPs per layer plus a router",
            cfg.n_experts
        ));
    }
    if why_not.is_empty() {
        // The rule drops every O(d) term (biases, norm weights): fine for d in the hundreds,
        // not for toy widths.
        let s = Sums::of(cfg);
        let total = s.total();
        if total > 0 && s.vectors * 100 > total {
            why_not.push(format!(
                "d = {} is too small: biases and norm weights the rule ignores are {:.2}% of the parameters",
                cfg.n_embd,
                100.0 * s.vectors as f64 / total as f64
            ));
        }
    }
    why_not
}

pub fn estimate(cfg: &ModelConfig) -> Result<ParamEstimate> {
    let d = cfg.n_embd as u128;
    let l = cfg.n_layer as u128;
    let s = Sums::of(cfg);
    let total = s.total();
    let mut components = Vec::with_capacity(Component::ALL.len());
    for c in Component::ALL {
        components.push(ComponentCount {
            component: c,
            params: to_u64(cfg, c.name(), s.get(c))?,
        });
    }
    // Each token passes through n_experts_per_tok of the n_experts (equal-sized) experts.
    let experts = s.get(Component::Experts);
    let inactive_experts = if cfg.n_experts > 0 {
        experts * cfg.n_experts.saturating_sub(cfg.n_experts_per_tok) as u128
            / cfg.n_experts as u128
    } else {
        0
    };
    let embed_tokens = s.get(Component::EmbedTokens);
    let embed_positions = s.get(Component::EmbedPositions);
    let lm_head = s.get(Component::LmHead);
    let rough = rough_12d2(cfg);
    let block_d = cfg.block_size as u128 * d;
    let signed = |x: u128| x as i128;
    let rule_attention = l * 4 * d * d;
    let mut rough_gap = vec![
        GapTerm {
            term: "attention",
            delta: signed(s.get(Component::Attention) - s.qk_norms) - signed(rule_attention),
            why: if s.attention_weights == rule_attention {
                "rule's 4·d² per layer; the difference is biases".into()
            } else {
                format!(
                    "q/k/v/o hold {:.3}·d² per layer, not 4·d² (GQA or head_dim ≠ d/h)",
                    s.attention_weights as f64 / l.max(1) as f64 / (d * d) as f64
                )
            },
        },
        GapTerm {
            term: "qk_norm",
            delta: signed(s.qk_norms),
            why: format!(
                "q_norm and k_norm: RMSNorm weights over head_dim (2·{} per layer) that the rule leaves out",
                cfg.head_dim
            ),
        },
        GapTerm {
            term: "mlp",
            delta: signed(
                s.get(Component::Mlp) + s.get(Component::Experts) + s.get(Component::Router),
            ) - signed(l * 8 * d * d),
            why: family::of(cfg).mlp_vs_rule(cfg),
        },
        GapTerm {
            term: "lm_head",
            delta: signed(lm_head),
            why: if cfg.tie_embeddings {
                "tied to the token embedding: counted once".into()
            } else {
                "untied output head (vocab·d) that the rule leaves out".into()
            },
        },
        GapTerm {
            term: "positions",
            delta: signed(embed_positions) - signed(block_d),
            why: if embed_positions > 0 {
                "learned positions, as the rule assumes".into()
            } else {
                "RoPE has no position parameters; the rule counts block·d".into()
            },
        },
        GapTerm {
            term: "norms",
            delta: signed(s.get(Component::Norms) + s.get(Component::FinalNorm)),
            why: format!(
                "norm weights (and biases) that the rule leaves out: {} per layer and the final norm",
                s.norms_in_layer0
            ),
        },
    ];
    // A term that does not apply (no q/k norms) is not shown.
    rough_gap.retain(|g| g.term != "qk_norm" || g.delta != 0);
    rough_gap.sort_by_key(|g| std::cmp::Reverse(g.delta.unsigned_abs()));
    let total_u = to_u64(cfg, "total", total)?;
    let rough_u = to_u64(cfg, "rough_12d2", rough)?;
    Ok(ParamEstimate {
        total: total_u,
        non_embedding: to_u64(cfg, "non_embedding", total - embed_tokens - embed_positions)?,
        active_per_token: to_u64(cfg, "active_per_token", total - inactive_experts)?,
        rough_12d2: rough_u,
        rough_rel_error: crate::units::rel_error(rough_u as f64, total_u as f64),
        rough_applies: why_rough_rule_fails(cfg).is_empty(),
        components,
        rough_gap,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::presets;

    fn total(name: &str) -> u64 {
        estimate(&presets::load(name).unwrap()).unwrap().total
    }

    /// Published counts of the HF-built models (see each preset file's first line).
    #[test]
    fn presets_match_published_counts() {
        for (name, want) in [
            ("baby-gpt", 3_481_088u64),
            ("gpt2", 124_439_808),
            ("gpt2-nobias", 124_337_664),
            ("gpt2-medium", 354_823_168),
            ("gpt2-large", 774_030_080),
            ("gpt2-xl", 1_557_611_200),
            ("llama2-7b", 6_738_415_616),
            ("llama3-8b", 8_030_261_248),
            ("llama3.1-70b", 70_553_706_496),
            ("llama3.1-405b", 405_853_388_800),
            ("mistral-7b", 7_241_732_096),
            ("qwen2.5-7b", 7_615_616_512),
            ("mixtral-8x7b", 46_702_792_704),
        ] {
            assert_eq!(total(name), want, "{name}");
        }
    }

    #[test]
    fn baby_gpt_rough_rule() {
        let e = estimate(&presets::load("baby-gpt").unwrap()).unwrap();
        // (1000 + 256)·256 + 12·256²·4
        assert_eq!(e.rough_12d2, 3_467_264);
        assert!((e.rough_rel_error - (3_467_264.0 / 3_481_088.0 - 1.0)).abs() < 1e-12);
        assert!(e.rough_applies);
    }

    #[test]
    fn llama3_rough_rule_misses_by_12_8_percent() {
        let e = estimate(&presets::load("llama3-8b").unwrap()).unwrap();
        assert_eq!(e.rough_12d2, 7_001_341_952);
        assert_eq!(format!("{:.1}", e.rough_rel_error * 100.0), "-12.8");
        assert!(!e.rough_applies);
        let gap: i128 = e.rough_gap.iter().map(|g| g.delta).sum();
        assert_eq!(gap, e.total as i128 - e.rough_12d2 as i128);
    }

    #[test]
    fn mixtral_active_parameters() {
        let e = estimate(&presets::load("mixtral-8x7b").unwrap()).unwrap();
        // 6 of 8 experts idle per token: 32 layers · 6 · 3·4096·14336 fewer.
        assert_eq!(
            e.active_per_token,
            46_702_792_704 - 32 * 6 * 3 * 4096 * 14336
        );
        assert_eq!(e.active_per_token, 12_879_925_248);
    }

    /// Hand-derived from the tensor shapes of a small GPT-2 (d=8, ff=32, V=10, T=6, L=2).
    #[test]
    fn hand_derived_small_gpt2() {
        let cfg = crate::config::toml::parse(
            "arch='gpt2'\nvocab_size=10\nblock_size=6\nn_embd=8\nn_layer=2\nn_head=2\n",
            "t",
        )
        .unwrap();
        let e = estimate(&cfg).unwrap();
        assert_eq!(e.get(Component::EmbedTokens), 80);
        assert_eq!(e.get(Component::EmbedPositions), 48);
        // per layer: c_attn 8·24 + 24, c_proj 8·8 + 8 = 288
        assert_eq!(e.get(Component::Attention), 2 * 288);
        // per layer: c_fc 8·32 + 32, c_proj 32·8 + 8 = 552
        assert_eq!(e.get(Component::Mlp), 2 * 552);
        assert_eq!(e.get(Component::Norms), 2 * 32);
        assert_eq!(e.get(Component::FinalNorm), 16);
        assert_eq!(e.get(Component::LmHead), 0);
        assert_eq!(e.total, 80 + 48 + 576 + 1104 + 64 + 16);
        assert_eq!(e.non_embedding, e.total - 128);
    }

    /// Hand-derived small Llama with GQA, explicit head_dim, qkv bias, untied head.
    #[test]
    fn hand_derived_small_llama() {
        let cfg = crate::config::toml::parse(
            "arch='llama'\nvocab_size=10\nblock_size=6\nn_embd=8\nn_layer=1\nn_head=4\n\
             n_kv_head=2\nhead_dim=4\nintermediate_size=12\nqkv_bias=true\ntie_embeddings=false\n",
            "t",
        )
        .unwrap();
        let e = estimate(&cfg).unwrap();
        // q: 8→16 (+16), k,v: 8→8 (+8 each), o: 16→8
        assert_eq!(
            e.get(Component::Attention),
            128 + 16 + 64 + 8 + 64 + 8 + 128
        );
        assert_eq!(e.get(Component::Mlp), 3 * 8 * 12);
        assert_eq!(e.get(Component::Norms), 16);
        assert_eq!(e.get(Component::FinalNorm), 8);
        assert_eq!(e.get(Component::LmHead), 80);
        assert_eq!(e.get(Component::EmbedPositions), 0);
    }

    #[test]
    fn tensor_names_map_to_components() {
        for (name, c) in [
            ("transformer.wte.weight", Component::EmbedTokens),
            ("transformer.wpe.weight", Component::EmbedPositions),
            ("transformer.h.0.attn.c_attn.weight", Component::Attention),
            ("transformer.h.0.mlp.c_fc.bias", Component::Mlp),
            ("transformer.h.0.ln_1.weight", Component::Norms),
            ("transformer.ln_f.bias", Component::FinalNorm),
            ("model.embed_tokens.weight", Component::EmbedTokens),
            ("model.layers.3.self_attn.k_proj.bias", Component::Attention),
            ("model.layers.3.mlp.gate_proj.weight", Component::Mlp),
            ("model.layers.3.input_layernorm.weight", Component::Norms),
            (
                "model.layers.3.post_attention_layernorm.weight",
                Component::Norms,
            ),
            (
                "model.layers.0.block_sparse_moe.gate.weight",
                Component::Router,
            ),
            (
                "model.layers.0.block_sparse_moe.experts.3.w2.weight",
                Component::Experts,
            ),
            ("model.norm.weight", Component::FinalNorm),
            ("lm_head.weight", Component::LmHead),
            // Qwen-MoE's router and experts sit under `mlp.`; Phi-3 fuses; Gemma has 4 norms.
            ("model.layers.0.mlp.gate.weight", Component::Router),
            (
                "model.layers.0.mlp.experts.5.down_proj.weight",
                Component::Experts,
            ),
            (
                "model.layers.1.self_attn.qkv_proj.weight",
                Component::Attention,
            ),
            (
                "model.layers.1.self_attn.q_norm.weight",
                Component::Attention,
            ),
            ("model.layers.1.mlp.gate_up_proj.weight", Component::Mlp),
            (
                "model.layers.1.pre_feedforward_layernorm.weight",
                Component::Norms,
            ),
        ] {
            assert_eq!(crate::family::guess_component(name), Some(c), "{name}");
        }
        assert_eq!(
            crate::family::guess_component("transformer.h.0.attn.bias_mask_x"),
            Some(Component::Attention)
        );
        assert_eq!(crate::family::guess_component("something.else"), None);
    }
}
