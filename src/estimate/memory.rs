//! Bytes for weights in each storage format, and the training-memory breakdown.

use super::params::ParamEstimate;
use crate::dtype::{TrainDtype, WEIGHT_FORMATS};
use crate::units::Bytes;
use serde::Serialize;

/// AdamW keeps two moments (`m`, `v`) per parameter, held in f32 by mixed-precision trainers
/// (PyTorch AMP, DeepSpeed ZeRO: Rajbhandari et al. 2020, §3.1 "K = 12" for Adam).
pub const ADAMW_STATES: u64 = 2;
/// Bytes of each AdamW state element and of the f32 master copy in mixed precision.
pub const F32_BYTES: u64 = 4;

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct WeightBytes {
    pub format: &'static str,
    pub bits: u64,
    pub bytes: Bytes,
}

/// Training memory that needs no tensors, for one dtype. Every part is shown; `total` is their sum.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TrainingMemory {
    pub dtype: TrainDtype,
    pub weights_bytes: Bytes,
    pub gradients_bytes: Bytes,
    /// f32 copy of the weights kept by the optimizer when training in f16/bf16; 0 in f32.
    pub master_weights_bytes: Bytes,
    /// AdamW's m and v, f32.
    pub optimizer_bytes: Bytes,
    /// Activations kept for backward at the chosen batch and sequence. `None` until the
    /// activation model (see `memory.predicted_peak_bytes` in verify) is asked for.
    pub activations_bytes: Option<Bytes>,
    /// Sum of the parts above that are known.
    pub total_bytes: Bytes,
}

pub fn weight_bytes(params: u64) -> Vec<WeightBytes> {
    WEIGHT_FORMATS
        .iter()
        .map(|&(format, bits)| WeightBytes {
            format,
            bits,
            bytes: Bytes(bits_to_bytes(params, bits)),
        })
        .collect()
}

/// `params · bits / 8`, rounded up, without overflow for any u64 count.
fn bits_to_bytes(params: u64, bits: u64) -> u64 {
    ((params as u128 * bits as u128).div_ceil(8)) as u64
}

pub fn training(
    p: &ParamEstimate,
    dtype: TrainDtype,
    activations: Option<Bytes>,
) -> TrainingMemory {
    let n = p.total as u128;
    let w = n * dtype.bytes() as u128;
    let master = if dtype == TrainDtype::F32 {
        0
    } else {
        n * F32_BYTES as u128
    };
    let opt = n * (ADAMW_STATES * F32_BYTES) as u128;
    let sat = |x: u128| Bytes(u64::try_from(x).unwrap_or(u64::MAX));
    let total = w * 2 + master + opt + activations.map_or(0, |a| a.0 as u128);
    TrainingMemory {
        dtype,
        weights_bytes: sat(w),
        gradients_bytes: sat(w),
        master_weights_bytes: sat(master),
        optimizer_bytes: sat(opt),
        activations_bytes: activations,
        total_bytes: sat(total),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::presets;
    use crate::estimate::params::estimate;

    #[test]
    fn sixteen_bytes_per_parameter_for_adamw() {
        let p = estimate(&presets::load("gpt2").unwrap()).unwrap();
        for dt in [TrainDtype::F32, TrainDtype::Bf16] {
            let m = training(&p, dt, None);
            // f32: 4 + 4 + 8; bf16: 2 + 2 + 4 (master) + 8
            assert_eq!(m.total_bytes.0, 16 * 124_439_808, "{dt:?}");
        }
    }

    #[test]
    fn naive_widths() {
        let w = weight_bytes(7);
        assert_eq!(w[0].bytes.0, 28);
        assert_eq!(w[3].bytes.0, 7);
        assert_eq!(w[4].bytes.0, 4); // 3.5 bytes rounds up
    }
}
