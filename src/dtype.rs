//! Element widths, in one table.

use crate::error::{Error, Result};
use serde::Serialize;

/// The dtypes a model can be trained/run in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TrainDtype {
    F32,
    F16,
    Bf16,
}

impl TrainDtype {
    pub fn parse(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "float32" | "fp32" => Ok(TrainDtype::F32),
            "f16" | "float16" | "fp16" => Ok(TrainDtype::F16),
            "bf16" | "bfloat16" => Ok(TrainDtype::Bf16),
            _ => Err(Error::field(
                "command line",
                "dtype",
                format!("{s:?}"),
                "expected f32, f16 or bf16",
            )),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            TrainDtype::F32 => "f32",
            TrainDtype::F16 => "f16",
            TrainDtype::Bf16 => "bf16",
        }
    }

    pub fn bytes(self) -> u64 {
        match self {
            TrainDtype::F32 => 4,
            TrainDtype::F16 | TrainDtype::Bf16 => 2,
        }
    }

    pub fn candle(self) -> candle_core::DType {
        match self {
            TrainDtype::F32 => candle_core::DType::F32,
            TrainDtype::F16 => candle_core::DType::F16,
            TrainDtype::Bf16 => candle_core::DType::BF16,
        }
    }
}

/// Storage widths for weights, in bits per element, at their naive width (no block scales:
/// `quantized` sizes from real quantized tensors show the overhead).
pub const WEIGHT_FORMATS: &[(&str, u64)] = &[
    ("f32", 32),
    ("f16", 16),
    ("bf16", 16),
    ("int8", 8),
    ("int4", 4),
];
