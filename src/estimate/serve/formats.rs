//! Weight storage formats for serving: GGML's tensor types (what a GGUF file and candle's
//! `QTensor` hold) and llama.cpp's file types (the per-tensor recipes `llama-quantize` applies,
//! such as Q4_K_M).
//!
//! Block layouts are ggml's (`ggml-common.h`, the same table as `GGML_QUANT_SIZES` in the `gguf`
//! Python package): a tensor row of `n` weights in a type with blocks of `b` weights and `s`
//! bytes takes `n / b · s` bytes, and a row whose length is not a multiple of `b` cannot be
//! stored in that type at all.

use crate::dtype::TrainDtype;
use crate::error::{Error, Result};
use candle_core::quantized::GgmlDType;

/// One GGML tensor type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GgmlType {
    /// ggml's name (`ggml_type_name`), as `inspect` reports it: `F32`, `Q4_K`, ...
    pub name: &'static str,
    /// The id stored in a GGUF tensor info (`enum ggml_type`).
    pub id: u32,
    /// Weights per block.
    pub block: u64,
    /// Bytes per block.
    pub block_bytes: u64,
}

impl GgmlType {
    /// Bytes of `numel` weights, or `None` when `numel` is not a whole number of blocks.
    pub fn bytes(&self, numel: u64) -> Option<u64> {
        numel
            .is_multiple_of(self.block)
            .then(|| numel / self.block)
            .and_then(|blocks| blocks.checked_mul(self.block_bytes))
    }

    /// Whether rows of `row_len` weights can be stored in this type.
    pub fn fits_row(&self, row_len: u64) -> bool {
        row_len > 0 && row_len.is_multiple_of(self.block)
    }

    /// Bits per weight of the block layout.
    pub fn bits_per_weight(&self) -> f64 {
        self.block_bytes as f64 * 8.0 / self.block as f64
    }

    /// Whether this is a plain float type (no blocks).
    pub fn is_float(&self) -> bool {
        matches!(self.name, "F32" | "F16" | "BF16")
    }

    /// candle's type, for the types candle 0.11.1 can hold and multiply (`GgmlDType`).
    pub fn candle(&self) -> Option<GgmlDType> {
        Some(match self.name {
            "F32" => GgmlDType::F32,
            "F16" => GgmlDType::F16,
            "BF16" => GgmlDType::BF16,
            "Q4_0" => GgmlDType::Q4_0,
            "Q4_1" => GgmlDType::Q4_1,
            "Q5_0" => GgmlDType::Q5_0,
            "Q5_1" => GgmlDType::Q5_1,
            "Q8_0" => GgmlDType::Q8_0,
            "Q8_1" => GgmlDType::Q8_1,
            "Q2_K" => GgmlDType::Q2K,
            "Q3_K" => GgmlDType::Q3K,
            "Q4_K" => GgmlDType::Q4K,
            "Q5_K" => GgmlDType::Q5K,
            "Q6_K" => GgmlDType::Q6K,
            "Q8_K" => GgmlDType::Q8K,
            _ => return None,
        })
    }
}

macro_rules! t {
    ($name:literal, $id:literal, $block:literal, $bytes:literal) => {
        GgmlType {
            name: $name,
            id: $id,
            block: $block,
            block_bytes: $bytes,
        }
    };
}

pub const F32: GgmlType = t!("F32", 0, 1, 4);
pub const F16: GgmlType = t!("F16", 1, 1, 2);
pub const BF16: GgmlType = t!("BF16", 30, 1, 2);
pub const Q4_0: GgmlType = t!("Q4_0", 2, 32, 18);
pub const Q4_1: GgmlType = t!("Q4_1", 3, 32, 20);
pub const Q5_0: GgmlType = t!("Q5_0", 6, 32, 22);
pub const Q5_1: GgmlType = t!("Q5_1", 7, 32, 24);
pub const Q8_0: GgmlType = t!("Q8_0", 8, 32, 34);
pub const Q2_K: GgmlType = t!("Q2_K", 10, 256, 84);
pub const Q3_K: GgmlType = t!("Q3_K", 11, 256, 110);
pub const Q4_K: GgmlType = t!("Q4_K", 12, 256, 144);
pub const Q5_K: GgmlType = t!("Q5_K", 13, 256, 176);
pub const Q6_K: GgmlType = t!("Q6_K", 14, 256, 210);
pub const IQ4_NL: GgmlType = t!("IQ4_NL", 20, 32, 18);

/// Every type a GGUF file may hold (ggml.h `enum ggml_type`; ids 4, 5 and 31–33 were removed
/// from ggml and are invalid in a file).
pub const GGML_TYPES: &[GgmlType] = &[
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    // ggml-common.h block_q8_1: two f16 + 32 int8 (the gguf Python package's table says 40;
    // the type is a dot-product intermediate and never stored in a model file).
    t!("Q8_1", 9, 32, 36),
    Q2_K,
    Q3_K,
    Q4_K,
    Q5_K,
    Q6_K,
    t!("Q8_K", 15, 256, 292),
    t!("IQ2_XXS", 16, 256, 66),
    t!("IQ2_XS", 17, 256, 74),
    t!("IQ3_XXS", 18, 256, 98),
    t!("IQ1_S", 19, 256, 50),
    IQ4_NL,
    t!("IQ3_S", 21, 256, 110),
    t!("IQ2_S", 22, 256, 82),
    t!("IQ4_XS", 23, 256, 136),
    t!("I8", 24, 1, 1),
    t!("I16", 25, 1, 2),
    t!("I32", 26, 1, 4),
    t!("I64", 27, 1, 8),
    t!("F64", 28, 1, 8),
    t!("IQ1_M", 29, 256, 56),
    BF16,
    t!("TQ1_0", 34, 256, 54),
    t!("TQ2_0", 35, 256, 66),
    t!("MXFP4", 39, 32, 17),
];

pub fn ggml_by_id(id: u32) -> Option<&'static GgmlType> {
    GGML_TYPES.iter().find(|t| t.id == id)
}

/// A llama.cpp file type (`llama_ftype`): a default tensor type plus the per-tensor rules of
/// `llama_tensor_get_type` (llama.cpp src/llama-quant.cpp). Variants keep llama.cpp's names.
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ftype {
    Q8_0,
    Q6_K,
    Q5_K_M,
    Q5_K_S,
    Q5_1,
    Q5_0,
    Q4_K_M,
    Q4_K_S,
    Q4_1,
    Q4_0,
    Q3_K_M,
    Q2_K,
}

impl Ftype {
    pub const ALL: [Ftype; 12] = [
        Ftype::Q8_0,
        Ftype::Q6_K,
        Ftype::Q5_K_M,
        Ftype::Q5_K_S,
        Ftype::Q5_1,
        Ftype::Q5_0,
        Ftype::Q4_K_M,
        Ftype::Q4_K_S,
        Ftype::Q4_1,
        Ftype::Q4_0,
        Ftype::Q3_K_M,
        Ftype::Q2_K,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Ftype::Q8_0 => "q8_0",
            Ftype::Q6_K => "q6_k",
            Ftype::Q5_K_M => "q5_k_m",
            Ftype::Q5_K_S => "q5_k_s",
            Ftype::Q5_1 => "q5_1",
            Ftype::Q5_0 => "q5_0",
            Ftype::Q4_K_M => "q4_k_m",
            Ftype::Q4_K_S => "q4_k_s",
            Ftype::Q4_1 => "q4_1",
            Ftype::Q4_0 => "q4_0",
            Ftype::Q3_K_M => "q3_k_m",
            Ftype::Q2_K => "q2_k",
        }
    }

    /// The type every quantizable tensor gets before the per-tensor rules
    /// (`llama_model_quantize_impl`'s `default_type`).
    pub fn default_type(self) -> GgmlType {
        match self {
            Ftype::Q8_0 => Q8_0,
            Ftype::Q6_K => Q6_K,
            Ftype::Q5_K_M | Ftype::Q5_K_S => Q5_K,
            Ftype::Q5_1 => Q5_1,
            Ftype::Q5_0 => Q5_0,
            Ftype::Q4_K_M | Ftype::Q4_K_S => Q4_K,
            Ftype::Q4_1 => Q4_1,
            Ftype::Q4_0 => Q4_0,
            Ftype::Q3_K_M => Q3_K,
            Ftype::Q2_K => Q2_K,
        }
    }
}

/// How the weights are stored: one float dtype for everything (as a training framework or an
/// HF checkpoint holds them), or a llama.cpp file type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightFormat {
    Float(TrainDtype),
    Quant(Ftype),
}

/// The formats `--weights` accepts, in the order the fit search tries them (largest first).
pub const FORMAT_NAMES: &str = "f32, f16, bf16, q8_0, q6_k, q5_k_m, q5_k_s, q5_1, q5_0, q4_k_m, \
     q4_k_s, q4_1, q4_0, q3_k_m, q2_k (q4_k, q5_k, q3_k: llama.cpp's aliases for the _m recipes)";

impl WeightFormat {
    pub fn parse(field: &str, s: &str) -> Result<Self> {
        let lower = s.to_ascii_lowercase();
        let f = match lower.as_str() {
            "f32" | "float32" | "fp32" => WeightFormat::Float(TrainDtype::F32),
            "f16" | "float16" | "fp16" => WeightFormat::Float(TrainDtype::F16),
            "bf16" | "bfloat16" => WeightFormat::Float(TrainDtype::Bf16),
            // llama-quantize's aliases (tools/quantize/quantize.cpp QUANT_OPTIONS).
            "q4_k" => WeightFormat::Quant(Ftype::Q4_K_M),
            "q5_k" => WeightFormat::Quant(Ftype::Q5_K_M),
            "q3_k" => WeightFormat::Quant(Ftype::Q3_K_M),
            other => match Ftype::ALL.iter().find(|f| f.name() == other) {
                Some(&f) => WeightFormat::Quant(f),
                None => {
                    return Err(Error::field(
                        "command line",
                        field,
                        format!("{s:?}"),
                        format!("expected one of {FORMAT_NAMES}"),
                    ))
                }
            },
        };
        Ok(f)
    }

    pub fn name(self) -> &'static str {
        match self {
            WeightFormat::Float(d) => d.name(),
            WeightFormat::Quant(f) => f.name(),
        }
    }

    /// Every format, largest storage first (floats, then llama.cpp's recipes by bits/weight).
    pub fn all() -> Vec<WeightFormat> {
        let mut v = vec![
            WeightFormat::Float(TrainDtype::F32),
            WeightFormat::Float(TrainDtype::F16),
            WeightFormat::Float(TrainDtype::Bf16),
        ];
        v.extend(Ftype::ALL.iter().map(|&f| WeightFormat::Quant(f)));
        v
    }

    /// The dtype activations run in with these weights: the float dtype itself, or f32 for
    /// block-quantized weights (llama.cpp's CPU path and candle's `QMatMul` multiply f32).
    pub fn activation_dtype(self) -> TrainDtype {
        match self {
            WeightFormat::Float(d) => d,
            WeightFormat::Quant(_) => TrainDtype::F32,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// ggml-common.h: block_q4_K is 2 f16 + 12 scale bytes + 128 nibble bytes = 144 B per 256
    /// weights (4.5 bits), block_q6_K 128 + 64 + 16 + 2 = 210 B (6.5625 bits), block_q8_0 34 B
    /// per 32 (8.5 bits). candle's block sizes agree.
    #[test]
    fn block_layouts_match_candle() {
        for t in GGML_TYPES {
            if let Some(c) = t.candle() {
                assert_eq!(c.block_size() as u64, t.block, "{}", t.name);
                assert_eq!(c.type_size() as u64, t.block_bytes, "{}", t.name);
            }
        }
        assert_eq!(Q4_K.bits_per_weight(), 4.5);
        assert_eq!(Q6_K.bits_per_weight(), 6.5625);
        assert_eq!(Q8_0.bits_per_weight(), 8.5);
        assert_eq!(Q8_0.bytes(64), Some(68));
        assert_eq!(Q8_0.bytes(48), None);
        let mut ids: Vec<u32> = GGML_TYPES.iter().map(|t| t.id).collect();
        ids.dedup();
        assert_eq!(ids.len(), GGML_TYPES.len());
    }

    #[test]
    fn parse_names() {
        assert_eq!(
            WeightFormat::parse("--weights", "Q4_K").unwrap(),
            WeightFormat::Quant(Ftype::Q4_K_M)
        );
        assert_eq!(
            WeightFormat::parse("--weights", "bf16").unwrap(),
            WeightFormat::Float(TrainDtype::Bf16)
        );
        let e = WeightFormat::parse("--weights", "q7")
            .unwrap_err()
            .to_string();
        assert!(e.contains("--weights") && e.contains("q7"), "{e}");
    }
}
