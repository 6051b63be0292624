//! Quantized sizes from real quantized tensors (candle's GGML formats), against the naive
//! `params × bits / 8` and against the block layout's closed form.
//!
//! The rule (llama.cpp `llama_model_quantize`): only 2-D weight matrices are quantized, and only
//! when their row length (the last dimension) is a multiple of the format's block size; norms,
//! biases and other 1-D tensors, and matrices that do not fit the block, stay in their dtype.

use crate::error::Result;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use candle_nn::VarMap;
use serde::Serialize;
use std::collections::BTreeMap;

/// A quantization format with its block layout.
#[derive(Debug, Clone, Copy)]
pub struct QuantFormat {
    /// JSON key and display name (llama.cpp's names, lower case).
    pub name: &'static str,
    pub ggml: GgmlDType,
    /// Weights per block.
    pub block_weights: u64,
    /// Bytes per block.
    pub block_bytes: u64,
    /// The width the format is sold as ("8-bit", "4-bit"), for the naive `params × bits / 8`.
    pub nominal_bits: u64,
}

/// Q8_0: 32 weights per block, an f16 scale + 32 int8 (ggml-common.h `block_q8_0`, 34 bytes).
pub const Q8_0: QuantFormat = QuantFormat {
    name: "q8_0",
    ggml: GgmlDType::Q8_0,
    block_weights: 32,
    block_bytes: 34,
    nominal_bits: 8,
};
/// Q4_0: 32 weights per block, an f16 scale + 16 bytes of nibbles (ggml-common.h `block_q4_0`,
/// 18 bytes: 4.5 bits per weight).
pub const Q4_0: QuantFormat = QuantFormat {
    name: "q4_0",
    ggml: GgmlDType::Q4_0,
    block_weights: 32,
    block_bytes: 18,
    nominal_bits: 4,
};
/// Q4_K: 256-weight super-blocks, f16 d and dmin + 12 bytes of 6-bit scales/mins + 128 bytes
/// of nibbles (ggml-common.h `block_q4_K`, 144 bytes: 4.5 bits per weight).
pub const Q4_K: QuantFormat = QuantFormat {
    name: "q4_k",
    ggml: GgmlDType::Q4K,
    block_weights: 256,
    block_bytes: 144,
    nominal_bits: 4,
};

pub const FORMATS: [QuantFormat; 3] = [Q8_0, Q4_0, Q4_K];

/// Models with more parameters than this are not quantized by `verify` (it would take seconds
/// to minutes on a CPU and the per-format ratios are already clear on smaller ones).
pub const MAX_QUANTIZE_PARAMS: u64 = 50_000_000;

/// One format's result over the whole model.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct QuantizedSize {
    /// Whole model: quantized storage + tensors kept unquantized.
    pub bytes: u64,
    /// Bytes of the quantized tensors' storage, as candle holds them (`QTensor::storage_size_in_bytes`).
    pub quantized_bytes: u64,
    /// Closed form for the quantized tensors: blocks × block bytes.
    pub predicted_quantized_bytes: u64,
    /// Tensors kept in their dtype, and their bytes.
    pub kept_bytes: u64,
    pub quantized_tensors: usize,
    pub quantized_params: u64,
    /// 1-D tensors (norms, biases) and tensors of rank ≠ 2: never quantized.
    pub kept_tensors: usize,
    /// 2-D matrices whose rows are not a multiple of the block size.
    pub kept_misfit_tensors: usize,
    pub kept_params: u64,
    /// quantized_bytes × 8 / quantized_params; `None` when no tensor fits the format's block.
    pub bits_per_weight: Option<f64>,
    /// bytes × 8 / all params.
    pub bits_per_param: f64,
    /// params × nominal bits / 8: the "4-bit = 8× smaller" arithmetic.
    pub naive_bytes: u64,
    /// bytes / naive_bytes.
    pub vs_naive: f64,
    /// f32 bytes of the whole model / bytes.
    pub compression_vs_f32: f64,
    /// Seconds spent quantizing.
    pub quantize_s: f64,
}

/// Results per format, keyed by the format's name (`quantized.q4_0.bytes`).
pub type QuantizedReport = BTreeMap<&'static str, QuantizedSize>;

/// Whether the rule quantizes a tensor of this shape in this format.
pub fn quantizable(shape: &[usize], f: &QuantFormat) -> bool {
    shape.len() == 2 && shape[1] > 0 && (shape[1] as u64).is_multiple_of(f.block_weights)
}

/// Quantize every tensor of `varmap` the rule allows, in each of [`FORMATS`].
pub fn quantize_varmap(varmap: &VarMap) -> Result<QuantizedReport> {
    let tensors: Vec<(String, Tensor)> = {
        let data = varmap.data().lock().unwrap_or_else(|e| e.into_inner());
        let mut v: Vec<_> = data
            .iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    };
    let mut out = BTreeMap::new();
    for f in FORMATS {
        out.insert(f.name, quantize_tensors(&tensors, &f)?);
    }
    Ok(out)
}

fn quantize_tensors(tensors: &[(String, Tensor)], f: &QuantFormat) -> Result<QuantizedSize> {
    let t0 = std::time::Instant::now();
    let mut r = QuantizedSize {
        bytes: 0,
        quantized_bytes: 0,
        predicted_quantized_bytes: 0,
        kept_bytes: 0,
        quantized_tensors: 0,
        quantized_params: 0,
        kept_tensors: 0,
        kept_misfit_tensors: 0,
        kept_params: 0,
        bits_per_weight: None,
        bits_per_param: 0.0,
        naive_bytes: 0,
        vs_naive: 0.0,
        compression_vs_f32: 0.0,
        quantize_s: 0.0,
    };
    for (_, t) in tensors {
        let numel = t.elem_count() as u64;
        if quantizable(t.dims(), f) {
            let cpu = t.to_device(&Device::Cpu)?;
            let q = QTensor::quantize(&cpu, f.ggml)?;
            r.quantized_bytes += q.storage_size_in_bytes() as u64;
            r.predicted_quantized_bytes += numel / f.block_weights * f.block_bytes;
            r.quantized_tensors += 1;
            r.quantized_params += numel;
        } else {
            if t.rank() == 2 {
                r.kept_misfit_tensors += 1;
            } else {
                r.kept_tensors += 1;
            }
            r.kept_params += numel;
            r.kept_bytes += numel * t.dtype().size_in_bytes() as u64;
        }
    }
    let params = r.quantized_params + r.kept_params;
    r.bytes = r.quantized_bytes + r.kept_bytes;
    r.bits_per_weight =
        (r.quantized_params > 0).then(|| ratio(r.quantized_bytes * 8, r.quantized_params));
    r.bits_per_param = ratio(r.bytes * 8, params);
    r.naive_bytes = (params as u128 * f.nominal_bits as u128).div_ceil(8) as u64;
    r.vs_naive = ratio(r.bytes, r.naive_bytes);
    r.compression_vs_f32 = ratio(params * 4, r.bytes);
    r.quantize_s = t0.elapsed().as_secs_f64();
    Ok(r)
}

fn ratio(a: u64, b: u64) -> f64 {
    if b == 0 {
        0.0
    } else {
        a as f64 / b as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Var};

    fn varmap(shapes: &[(&str, &[usize])]) -> VarMap {
        let vm = VarMap::new();
        {
            let mut d = vm.data().lock().unwrap();
            for (n, s) in shapes {
                let t = Tensor::randn(0f32, 1.0, *s, &Device::Cpu).unwrap();
                d.insert(n.to_string(), Var::from_tensor(&t).unwrap());
            }
        }
        vm
    }

    /// Published block layouts: Q8_0 8.5, Q4_0 4.5, Q4_K 4.5 bits per weight; the common "4-bit
    /// = 8× smaller" is 32 / 4.5 = 7.1× for Q4_0.
    #[test]
    fn bits_per_weight_of_each_format() {
        let vm = varmap(&[("w", &[4, 512]), ("ln.weight", &[512]), ("odd", &[3, 96])]);
        let q = quantize_varmap(&vm).unwrap();
        let q8 = &q["q8_0"];
        assert_eq!(q8.quantized_bytes, (2048 + 288) / 32 * 34);
        assert_eq!(q8.bits_per_weight, Some(8.5));
        let q4 = &q["q4_0"];
        assert_eq!(q4.quantized_bytes, (2048 + 288) / 32 * 18);
        assert_eq!(q4.bits_per_weight, Some(4.5));
        // 96 is a multiple of 32 (q4_0 quantizes "odd"), not of 256 (q4_k keeps it)
        assert_eq!(q4.quantized_tensors, 2);
        let qk = &q["q4_k"];
        assert_eq!(qk.quantized_bytes, 2048 / 256 * 144);
        assert_eq!(qk.bits_per_weight, Some(4.5));
        assert_eq!(qk.kept_misfit_tensors, 1);
        assert_eq!(qk.kept_tensors, 1);
        assert_eq!(
            qk.kept_bytes,
            (512 + 288) * DType::F32.size_in_bytes() as u64
        );
        for r in q.values() {
            assert_eq!(r.quantized_bytes, r.predicted_quantized_bytes);
        }
        // Q4_0 on a pure matrix: 32 / 4.5 = 7.11× smaller than f32
        let q = quantize_varmap(&varmap(&[("w", &[8, 256])])).unwrap();
        assert_eq!(format!("{:.2}", q["q4_0"].compression_vs_f32), "7.11");
    }
}
