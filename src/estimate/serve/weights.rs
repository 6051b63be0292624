//! Weight bytes in a serving format, tensor by tensor: which tensors are quantized, to which
//! type, and which stay unquantized, with every byte of every block counted.
//!
//! The tensor list is the genuine model's (`family::tensors`), renamed to llama.cpp's
//! GGUF names and laid out as a GGUF file holds it: matrices `[out, in]` (a row is one output's
//! `in` weights, so the row length is the last dimension), a MoE layer's experts stacked into one
//! `[experts, out, in]` tensor per projection.
//!
//! Which type each tensor gets follows llama.cpp (src/llama-quant.cpp):
//! - `llama_model_quantize_impl` quantizes a tensor only if its name ends in `weight`, it has at
//!   least 2 dimensions, and it is not a norm (`_norm.weight`), the MoE router
//!   (`ffn_gate_inp.weight`) or GPT-2's learned positions (`position_embd.weight`). Everything
//!   else (norms, biases, router, positions) stays F32.
//! - `llama_tensor_get_type` then picks the type per tensor for the file type: the output head
//!   (or the token embedding when the head is tied) gets Q6_K unless the recipe is Q8_0;
//!   `attn_v` and `ffn_down` get more bits in the first and last eighth of the layers and every
//!   third layer between for the `_M` recipes; 70B-class models (80 layers, GQA) get Q5_K
//!   `attn_v`; 8-expert MoE models get Q8_0 `attn_k`/`attn_v`.
//! - A tensor whose rows do not fit the chosen type's block falls back (Q4_K → Q5_0,
//!   Q5_K → Q5_1, Q6_K → Q8_0, Q2_K/Q3_K → IQ4_NL) and, if that does not fit either, to F16.
//!   Where llama.cpp refuses outright (legacy Q4_0…Q8_0 on such rows) truesize takes F16, as
//!   llama.cpp's `convert_hf_to_gguf.py` does.
//!
//! Float formats (`f32`, `f16`, `bf16`) hold every tensor in that dtype, norms included, as a
//! framework or an HF checkpoint in that dtype does.

use super::formats::{self, Ftype, GgmlType, WeightFormat};
use crate::config::{Arch, ModelConfig, NormPlacement};
use crate::dtype::TrainDtype;
use crate::error::{Error, Result};
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};

/// One tensor as a serving engine (and a GGUF file) holds it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ServeTensor {
    /// llama.cpp's GGUF name (`blk.0.attn_q.weight`).
    pub name: String,
    /// The HF checkpoint names it holds (several for stacked experts).
    #[serde(skip)]
    pub hf_names: Vec<String>,
    /// GGUF layout: `[out, in]`, `[experts, out, in]` or `[n]`.
    pub shape: Vec<u64>,
    pub numel: u64,
    /// Layer index for `blk.N.*` tensors.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub layer: Option<usize>,
    /// GGML type name.
    pub ggml_type: &'static str,
    pub bytes: u64,
    /// Why it is not in the format's default type (unquantized, recipe rule, fallback).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub why: Option<String>,
}

/// Count and bytes of the tensors of one GGML type.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct TypeCount {
    pub tensors: usize,
    pub numel: u64,
    pub bytes: u64,
}

/// The weights of a model in one format.
#[derive(Debug, Clone, Serialize)]
pub struct WeightsEstimate {
    pub format: &'static str,
    /// Exact bytes of all tensors (blocks and scales included).
    pub bytes: u64,
    pub numel: u64,
    /// bytes · 8 / numel.
    pub bits_per_weight: f64,
    /// Per GGML type name.
    pub by_type: BTreeMap<&'static str, TypeCount>,
    /// Names of the tensors kept unquantized (F32/F16) in a quantized format.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub kept_unquantized: Vec<String>,
    #[serde(skip)]
    pub tensors: Vec<ServeTensor>,
    /// HF name → index in `tensors`: the peak replay asks once per matmul per layer per token,
    /// and a scan of every tensor there made deep models quadratic in depth.
    #[serde(skip)]
    pub by_hf_name: HashMap<String, usize>,
}

impl WeightsEstimate {
    /// Index `tensors` by every HF name each one answers for.
    pub fn indexed(mut self) -> Self {
        self.by_hf_name = self
            .tensors
            .iter()
            .enumerate()
            .flat_map(|(i, t)| t.hf_names.iter().map(move |n| (n.clone(), i)))
            .collect();
        self
    }

    /// The type chosen for the HF tensor `hf_name` (a stacked expert tensor answers for each
    /// of its experts).
    pub fn type_of(&self, hf_name: &str) -> Option<&'static GgmlType> {
        let t = match self.by_hf_name.get(hf_name) {
            Some(&i) => self.tensors.get(i)?,
            None if !self.by_hf_name.is_empty() => return None,
            None => self
                .tensors
                .iter()
                .find(|t| t.hf_names.iter().any(|n| n == hf_name))?,
        };
        formats::GGML_TYPES.iter().find(|g| g.name == t.ggml_type)
    }
}

/// The GGUF name of an HF tensor of `cfg`, with its layer and (for experts) expert index and
/// the stacked tensor it belongs to. One table per family; `None` for names it does not know.
pub fn gguf_name(cfg: &ModelConfig, hf: &str) -> Option<GgufName> {
    match cfg.arch {
        Arch::Gpt2 => gpt2_name(hf),
        Arch::Llama => llama_name(hf, cfg.norm_placement == NormPlacement::Sandwich),
    }
}

/// Where an HF tensor lands in a GGUF file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GgufName {
    pub name: String,
    pub layer: Option<usize>,
    /// Expert index within a stacked `*_exps` tensor.
    pub expert: Option<usize>,
}

fn plain(name: impl Into<String>) -> Option<GgufName> {
    Some(GgufName {
        name: name.into(),
        layer: None,
        expert: None,
    })
}

/// `prefix.{N}.rest` -> (N, rest).
fn split_layer<'a>(hf: &'a str, prefix: &str) -> Option<(usize, &'a str)> {
    let rest = hf.strip_prefix(prefix)?;
    let (n, rest) = rest.split_once('.')?;
    Some((n.parse().ok()?, rest))
}

fn in_layer(layer: usize, name: &str) -> Option<GgufName> {
    Some(GgufName {
        name: format!("blk.{layer}.{name}"),
        layer: Some(layer),
        expert: None,
    })
}

/// llama.cpp's names for the Llama skeleton and its switches (convert_hf_to_gguf's tensor map):
/// Qwen3's q/k norms, Gemma's four norms (`post_attention_layernorm` is then the attention's
/// post-norm, and the MLP's pre-norm takes `ffn_norm`), Phi-3's fused `qkv_proj` and
/// `gate_up_proj` (kept fused, as `attn_qkv` and a double-height `ffn_up`), and both expert
/// naming schemes stacked per layer.
fn llama_name(hf: &str, sandwich: bool) -> Option<GgufName> {
    match hf {
        "model.embed_tokens.weight" => return plain("token_embd.weight"),
        "model.norm.weight" => return plain("output_norm.weight"),
        "lm_head.weight" => return plain("output.weight"),
        _ => {}
    }
    let (i, rest) = split_layer(hf, "model.layers.")?;
    let experts = rest
        .strip_prefix("block_sparse_moe.experts.")
        .or_else(|| rest.strip_prefix("mlp.experts."));
    if let Some(e_rest) = experts {
        let (e, w) = e_rest.split_once('.')?;
        let stacked = match w {
            "w1.weight" | "gate_proj.weight" => "ffn_gate_exps.weight",
            "w3.weight" | "up_proj.weight" => "ffn_up_exps.weight",
            "w2.weight" | "down_proj.weight" => "ffn_down_exps.weight",
            _ => return None,
        };
        return Some(GgufName {
            name: format!("blk.{i}.{stacked}"),
            layer: Some(i),
            expert: Some(e.parse().ok()?),
        });
    }
    let (module, kind) = rest.rsplit_once('.')?;
    let g = match module {
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" if sandwich => "post_attention_norm",
        "post_attention_layernorm" => "ffn_norm",
        "pre_feedforward_layernorm" => "ffn_norm",
        "post_feedforward_layernorm" => "post_ffw_norm",
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.qkv_proj" => "attn_qkv",
        "self_attn.q_norm" => "attn_q_norm",
        "self_attn.k_norm" => "attn_k_norm",
        "self_attn.o_proj" => "attn_output",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" | "mlp.gate_up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        "block_sparse_moe.gate" | "mlp.gate" => "ffn_gate_inp",
        _ => return None,
    };
    in_layer(i, &format!("{g}.{kind}"))
}

fn gpt2_name(hf: &str) -> Option<GgufName> {
    match hf {
        "transformer.wte.weight" => return plain("token_embd.weight"),
        "transformer.wpe.weight" => return plain("position_embd.weight"),
        "transformer.ln_f.weight" => return plain("output_norm.weight"),
        "transformer.ln_f.bias" => return plain("output_norm.bias"),
        "lm_head.weight" => return plain("output.weight"),
        _ => {}
    }
    let (i, rest) = split_layer(hf, "transformer.h.")?;
    let (module, kind) = rest.rsplit_once('.')?;
    let g = match module {
        "ln_1" => "attn_norm",
        "ln_2" => "ffn_norm",
        "attn.c_attn" => "attn_qkv",
        "attn.c_proj" => "attn_output",
        "mlp.c_fc" => "ffn_up",
        "mlp.c_proj" => "ffn_down",
        _ => return None,
    };
    in_layer(i, &format!("{g}.{kind}"))
}

/// Whether the HF tensor is stored `[in, out]` (GPT-2's Conv1D) and must be transposed into
/// the `[out, in]` layout GGUF and the serving engine use.
pub fn hf_is_transposed(cfg: &ModelConfig, hf: &str) -> bool {
    cfg.arch == Arch::Gpt2
        && hf.ends_with(".weight")
        && [".c_attn.", ".c_proj.", ".c_fc."]
            .iter()
            .any(|m| hf.contains(m))
}

/// The genuine model's tensors in GGUF layout (names, shapes, layers), before any type is
/// chosen. Experts of a layer are stacked in expert order.
pub fn gguf_layout(cfg: &ModelConfig) -> Result<Vec<ServeTensor>> {
    // By name, as llama.cpp's converter meets them in a sorted checkpoint.
    let mut specs = crate::family::tensors(cfg);
    specs.sort_by(|a, b| a.name.cmp(&b.name));
    let mut out: Vec<ServeTensor> = Vec::new();
    let mut stacked: BTreeMap<String, usize> = BTreeMap::new();
    for s in &specs {
        let Some(g) = gguf_name(cfg, &s.name) else {
            return Err(Error::Internal(anyhow::anyhow!(
                "no GGUF name for {} ({})",
                s.name,
                cfg.model_type
            )));
        };
        let mut shape: Vec<u64> = s.shape.iter().map(|&d| d as u64).collect();
        if hf_is_transposed(cfg, &s.name) {
            shape.reverse();
        }
        let numel: u64 = shape.iter().product();
        match g.expert {
            Some(_) => {
                if let Some(&i) = stacked.get(&g.name) {
                    let t = &mut out[i];
                    t.hf_names.push(s.name.clone());
                    t.shape[0] += 1;
                    t.numel += numel;
                } else {
                    stacked.insert(g.name.clone(), out.len());
                    let mut sh = vec![1];
                    sh.extend(shape);
                    out.push(ServeTensor {
                        name: g.name,
                        hf_names: vec![s.name.clone()],
                        shape: sh,
                        numel,
                        layer: g.layer,
                        ggml_type: "F32",
                        bytes: 0,
                        why: None,
                    });
                }
            }
            None => out.push(ServeTensor {
                name: g.name,
                hf_names: vec![s.name.clone()],
                shape,
                numel,
                layer: g.layer,
                ggml_type: "F32",
                bytes: 0,
                why: None,
            }),
        }
    }
    // Experts were pushed in name order (10 before 2); restore expert order.
    for t in &mut out {
        if t.hf_names.len() > 1 {
            t.hf_names
                .sort_by_key(|n| gguf_name(cfg, n).and_then(|g| g.expert).unwrap_or(0));
        }
    }
    // llama.cpp's order: tensors outside blocks first, then by layer, then by name.
    out.sort_by(|a, b| {
        (a.layer.map_or(-1, |l| l as i64), &a.name)
            .cmp(&(b.layer.map_or(-1, |l| l as i64), &b.name))
    });
    Ok(out)
}

/// llama.cpp's `quantize` test in `llama_model_quantize_impl`.
fn quantizable(t: &ServeTensor) -> bool {
    t.name.ends_with("weight")
        && t.shape.len() >= 2
        && !t.name.contains("_norm.weight")
        && !t.name.contains("ffn_gate_inp.weight")
        && t.name != "position_embd.weight"
}

/// llama.cpp's `use_more_bits`: the first and last eighth of the layers and every third layer
/// in between.
fn use_more_bits(i: usize, n: usize) -> bool {
    let (i, n) = (i as i64, n as i64);
    i < n / 8 || i >= 7 * n / 8 || (i - n / 8) % 3 == 2
}

/// Facts about the model `llama_tensor_get_type` consults.
struct ModelFacts {
    n_layer: usize,
    n_gqa: usize,
    n_expert: usize,
    /// llama.cpp's `LLM_TYPE_70B`: 80 layers with grouped-query attention (Llama-2/3-70B,
    /// Qwen2-72B).
    is_70b: bool,
    has_output: bool,
}

/// `llama_tensor_get_type` for the recipes truesize knows (the non-IQ ones), including the
/// fallback for rows that do not fit the block. Returns the type and why it differs from the
/// default.
fn recipe_type(
    ft: Ftype,
    t: &ServeTensor,
    m: &ModelFacts,
    i_attn_v: usize,
) -> (GgmlType, Option<String>) {
    use formats::{F16, IQ4_NL, Q3_K, Q4_K, Q5_0, Q5_1, Q5_K, Q6_K, Q8_0};
    let default = ft.default_type();
    let row = *t.shape.last().unwrap_or(&0);
    let name = t.name.as_str();
    let layer = t.layer.unwrap_or(0);
    let mut ty = default;
    let mut why: Option<&str> = None;
    if name == "output.weight" || (!m.has_output && name == "token_embd.weight") {
        if !row.is_multiple_of(default.block) {
            ty = Q8_0;
            why = Some("output head: rows do not fit the block");
        } else if default != Q8_0 {
            ty = Q6_K;
            why = Some("output head gets Q6_K");
        }
    } else if name.contains("attn_v.weight") {
        match ft {
            Ftype::Q2_K => ty = if m.n_gqa >= 4 { Q4_K } else { Q3_K },
            Ftype::Q3_K_M => ty = if i_attn_v < 2 { Q5_K } else { Q4_K },
            Ftype::Q4_K_M | Ftype::Q5_K_M if use_more_bits(i_attn_v, m.n_layer) => ty = Q6_K,
            Ftype::Q4_K_S if i_attn_v < 4 => ty = Q5_K,
            _ => {}
        }
        if m.is_70b && (ty == Q3_K || ty == Q4_K) {
            ty = Q5_K;
        }
        if m.n_expert == 8 {
            ty = Q8_0;
        }
        why = Some("attn_v rule");
    } else if name.contains("attn_k.weight") {
        if m.n_expert == 8 {
            ty = Q8_0;
            why = Some("8-expert attn_k rule");
        }
    } else if name.contains("ffn_down") {
        let n = m.n_layer;
        match ft {
            Ftype::Q2_K => ty = Q3_K,
            Ftype::Q3_K_M => ty = if layer < n / 16 { Q5_K } else { Q4_K },
            Ftype::Q4_K_M | Ftype::Q5_K_M if use_more_bits(layer, n) => ty = Q6_K,
            Ftype::Q4_K_S if layer < n / 8 => ty = Q5_K,
            _ => {}
        }
        why = Some("ffn_down rule");
    } else if name.contains("attn_output.weight") {
        if m.n_expert == 8 {
            if matches!(
                ft,
                Ftype::Q2_K | Ftype::Q3_K_M | Ftype::Q4_K_S | Ftype::Q4_K_M
            ) {
                ty = Q5_K;
            }
        } else {
            match ft {
                Ftype::Q2_K => ty = Q3_K,
                Ftype::Q3_K_M => ty = Q4_K,
                _ => {}
            }
        }
        why = Some("attn_output rule");
    } else if name.contains("attn_qkv.weight") {
        match ft {
            Ftype::Q3_K_M => ty = Q4_K,
            Ftype::Q4_K_M => ty = Q5_K,
            Ftype::Q5_K_M => ty = Q6_K,
            _ => {}
        }
        why = Some("attn_qkv rule");
    }
    let mut why = if ty == default {
        None
    } else {
        why.map(String::from)
    };
    if !row.is_multiple_of(ty.block) {
        let fallback = match ty.name {
            "Q4_K" => Q5_0,
            "Q5_K" => Q5_1,
            "Q6_K" => Q8_0,
            "Q2_K" | "Q3_K" => IQ4_NL,
            _ => F16,
        };
        ty = if row.is_multiple_of(fallback.block) {
            fallback
        } else {
            F16
        };
        why = Some(format!(
            "rows of {row} do not fit a block of {}: fallback",
            default.block
        ));
    }
    (ty, why)
}

/// Every tensor of `cfg` in `format`, with its type and exact bytes.
pub fn estimate(cfg: &ModelConfig, format: WeightFormat) -> Result<WeightsEstimate> {
    let mut tensors = gguf_layout(cfg)?;
    let facts = ModelFacts {
        n_layer: cfg.n_layer,
        n_gqa: cfg.n_head / cfg.n_kv_head.max(1),
        n_expert: cfg.n_experts.max(1),
        is_70b: cfg.n_layer == 80 && cfg.arch == Arch::Llama && cfg.n_head != cfg.n_kv_head,
        has_output: tensors.iter().any(|t| t.name == "output.weight"),
    };
    let mut i_attn_v = 0;
    for t in &mut tensors {
        let (ty, why) = match format {
            WeightFormat::Float(d) => (
                match d {
                    TrainDtype::F32 => formats::F32,
                    TrainDtype::F16 => formats::F16,
                    TrainDtype::Bf16 => formats::BF16,
                },
                None,
            ),
            WeightFormat::Quant(_) if !quantizable(t) => (
                formats::F32,
                Some("not quantized (1-D, norm, router or positions)".into()),
            ),
            WeightFormat::Quant(ft) => {
                let r = recipe_type(ft, t, &facts, i_attn_v);
                if t.name.contains("attn_v.weight") {
                    i_attn_v += 1;
                }
                r
            }
        };
        t.ggml_type = ty.name;
        t.bytes = ty.bytes(t.numel).ok_or_else(|| {
            Error::Internal(anyhow::anyhow!(
                "{} ({} elements) is not a whole number of {} blocks",
                t.name,
                t.numel,
                ty.name
            ))
        })?;
        t.why = why;
    }
    let mut by_type: BTreeMap<&'static str, TypeCount> = BTreeMap::new();
    for t in &tensors {
        let c = by_type.entry(t.ggml_type).or_default();
        c.tensors += 1;
        c.numel += t.numel;
        c.bytes += t.bytes;
    }
    let bytes: u64 = tensors.iter().map(|t| t.bytes).sum();
    let numel: u64 = tensors.iter().map(|t| t.numel).sum();
    let kept_unquantized = match format {
        WeightFormat::Float(_) => Vec::new(),
        WeightFormat::Quant(_) => tensors
            .iter()
            .filter(|t| matches!(t.ggml_type, "F32" | "F16"))
            .map(|t| t.name.clone())
            .collect(),
    };
    Ok(WeightsEstimate {
        format: format.name(),
        bytes,
        numel,
        bits_per_weight: bytes as f64 * 8.0 / numel.max(1) as f64,
        by_type,
        kept_unquantized,
        tensors,
        by_hf_name: HashMap::new(),
    }
    .indexed())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::presets;

    #[test]
    fn names_follow_llama_cpp() {
        let cfg = presets::load("mixtral-8x7b").unwrap();
        let g = gguf_name(&cfg, "model.layers.3.block_sparse_moe.experts.5.w2.weight").unwrap();
        assert_eq!(g.name, "blk.3.ffn_down_exps.weight");
        assert_eq!((g.layer, g.expert), (Some(3), Some(5)));
        let layout = gguf_layout(&cfg).unwrap();
        let down = layout
            .iter()
            .find(|t| t.name == "blk.0.ffn_down_exps.weight")
            .unwrap();
        assert_eq!(down.shape, vec![8, 4096, 14336]);
        assert_eq!(
            down.hf_names[7],
            "model.layers.0.block_sparse_moe.experts.7.w2.weight"
        );
        let gpt2 = presets::load("gpt2").unwrap();
        let qkv = gguf_layout(&gpt2)
            .unwrap()
            .into_iter()
            .find(|t| t.name == "blk.0.attn_qkv.weight")
            .unwrap();
        assert_eq!(
            qkv.shape,
            vec![2304, 768],
            "Conv1D [in, out] becomes [out, in]"
        );
    }

    #[test]
    fn float_formats_are_numel_times_width() {
        let cfg = presets::load("llama3-8b").unwrap();
        let w = estimate(&cfg, WeightFormat::Float(TrainDtype::Bf16)).unwrap();
        assert_eq!(w.numel, 8_030_261_248);
        assert_eq!(w.bytes, 2 * 8_030_261_248);
    }

    #[test]
    fn use_more_bits_matches_llama_cpp() {
        // n = 32: layers 0..4, 28..32 and 4 + 3k + 2 = 6, 9, ..., 27.
        let picked: Vec<usize> = (0..32).filter(|&i| use_more_bits(i, 32)).collect();
        assert_eq!(
            picked,
            vec![0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]
        );
    }

    /// Q4_K_M by hand for Llama-3-8B (32 layers, d 4096, kv 1024, ff 14336, vocab 128256):
    /// 16 of 32 attn_v and ffn_down tensors in Q6_K, the head in Q6_K, the rest Q4_K, norms F32.
    #[test]
    fn q4_k_m_by_hand() {
        let cfg = presets::load("llama3-8b").unwrap();
        let w = estimate(&cfg, WeightFormat::Quant(Ftype::Q4_K_M)).unwrap();
        let (d, kv, ff, v) = (4096u64, 1024u64, 14336u64, 128256u64);
        let q4 = |n: u64| n / 256 * 144;
        let q6 = |n: u64| n / 256 * 210;
        let per_layer_q4 = q4(d * d) * 2 + q4(kv * d) + q4(ff * d) * 2; // q, o, k, gate, up
        let expected = q4(v * d) + q6(v * d) + 4 * d // embd, head, output_norm
            + 32 * (per_layer_q4 + 2 * 4 * d)
            + 16 * (q6(kv * d) + q6(d * ff))
            + 16 * (q4(kv * d) + q4(d * ff));
        assert_eq!(w.bytes, expected);
        assert_eq!(w.by_type["Q6_K"].tensors, 1 + 16 + 16);
        assert_eq!(w.by_type["F32"].tensors, 65);
        assert!(w
            .kept_unquantized
            .contains(&"output_norm.weight".to_string()));
    }

    /// Rows that do not fit a block fall back: tiny-llama-like ff = 176 is not a multiple of 32
    /// (Q8_0) so `ffn_down` ([64, 176]) is F16; 64-wide rows fit.
    #[test]
    fn misfit_rows_fall_back_to_f16() {
        let mut cfg = presets::load("llama3-8b").unwrap();
        cfg.n_embd = 64;
        cfg.n_head = 4;
        cfg.n_kv_head = 2;
        cfg.head_dim = 16;
        cfg.intermediate_size = 176;
        cfg.n_layer = 2;
        cfg.vocab_size = 101;
        let w = estimate(&cfg, WeightFormat::Quant(Ftype::Q8_0)).unwrap();
        let down = w
            .tensors
            .iter()
            .find(|t| t.name == "blk.0.ffn_down.weight")
            .unwrap();
        assert_eq!(down.ggml_type, "F16");
        assert_eq!(down.bytes, 64 * 176 * 2);
        let up = w
            .tensors
            .iter()
            .find(|t| t.name == "blk.0.ffn_up.weight")
            .unwrap();
        assert_eq!((up.ggml_type, up.bytes), ("Q8_0", 176 * 64 / 32 * 34));
    }
}
