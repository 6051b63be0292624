//! Which GPUs a model trains on, and for how long: datasheet memory and dense peaks, the
//! training memory of `estimate::memory`, and `FLOPs per token × D / (GPUs × peak × MFU)`.
//!
//! Peaks are **dense** (no 2:4 sparsity) tensor-core throughput for bf16/fp16 with fp32
//! accumulate, and non-tensor fp32 (CUDA cores; TF32 is not fp32). Memory is the datasheet's
//! capacity read in binary units (an "80 GB" A100 reports 81,920 MiB in nvidia-smi: the
//! capacities are GiB), so shares are against `GiB × 2^30` bytes.

use crate::dtype::TrainDtype;
use serde::Serialize;

/// Bytes per GiB.
const GIB: u64 = 1 << 30;
/// Seconds per day.
pub const SECONDS_PER_DAY: f64 = 86_400.0;
/// Default assumed MFU for `truesize gpus`: an assumption, shown as such. PaLM 540B reached
/// 46.2% MFU on TPU v4 (Chowdhery et al. 2022, Table 3); 40% is a round figure below it for
/// well-tuned GPU training.
pub const DEFAULT_ASSUMED_MFU: f64 = 0.40;

/// One GPU model from its datasheet.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Gpu {
    pub name: &'static str,
    pub memory_bytes: u64,
    /// Dense bf16 tensor TFLOP/s; `None` where the chip has no bf16 (V100, T4).
    pub bf16_tflops: Option<f64>,
    /// Dense fp16 tensor TFLOP/s (fp32 accumulate).
    pub fp16_tflops: f64,
    /// fp32 (non-tensor) TFLOP/s.
    pub fp32_tflops: f64,
}

impl Gpu {
    /// Peak for training in `dtype`, FLOP/s.
    pub fn peak_flops(&self, dtype: TrainDtype) -> Option<f64> {
        let t = match dtype {
            TrainDtype::Bf16 => self.bf16_tflops?,
            TrainDtype::F16 => self.fp16_tflops,
            TrainDtype::F32 => self.fp32_tflops,
        };
        Some(t * 1e12)
    }
}

/// The table. Each row's source is named beside it; sparsity figures are halved to dense.
pub const GPUS: &[Gpu] = &[
    // NVIDIA H200 Tensor Core GPU datasheet (2024), H200 SXM: 141 GB HBM3e; BF16/FP16 1,979
    // TFLOPS with sparsity (989.5 dense); FP32 67 TFLOPS.
    Gpu {
        name: "H200 SXM 141GB",
        memory_bytes: 141 * GIB,
        bf16_tflops: Some(989.5),
        fp16_tflops: 989.5,
        fp32_tflops: 67.0,
    },
    // NVIDIA H100 Tensor Core GPU datasheet (2023), H100 SXM: 80 GB; BF16/FP16 1,979 TFLOPS
    // with sparsity (989.5 dense); FP32 67 TFLOPS.
    Gpu {
        name: "H100 SXM 80GB",
        memory_bytes: 80 * GIB,
        bf16_tflops: Some(989.5),
        fp16_tflops: 989.5,
        fp32_tflops: 67.0,
    },
    // Same datasheet, H100 PCIe: 80 GB; BF16/FP16 1,513 with sparsity (756.5 dense); FP32 51.
    Gpu {
        name: "H100 PCIe 80GB",
        memory_bytes: 80 * GIB,
        bf16_tflops: Some(756.5),
        fp16_tflops: 756.5,
        fp32_tflops: 51.0,
    },
    // NVIDIA A100 Tensor Core GPU datasheet (2021): BF16/FP16 312 TFLOPS dense (624 sparse);
    // FP32 19.5 TFLOPS; 80 GB HBM2e.
    Gpu {
        name: "A100 80GB",
        memory_bytes: 80 * GIB,
        bf16_tflops: Some(312.0),
        fp16_tflops: 312.0,
        fp32_tflops: 19.5,
    },
    // Same datasheet, A100 40GB HBM2.
    Gpu {
        name: "A100 40GB",
        memory_bytes: 40 * GIB,
        bf16_tflops: Some(312.0),
        fp16_tflops: 312.0,
        fp32_tflops: 19.5,
    },
    // NVIDIA L4 datasheet (2023): FP16/BF16 242 TFLOPS with sparsity (121 dense); FP32 30.3;
    // 24 GB GDDR6.
    Gpu {
        name: "L4 24GB",
        memory_bytes: 24 * GIB,
        bf16_tflops: Some(121.0),
        fp16_tflops: 121.0,
        fp32_tflops: 30.3,
    },
    // NVIDIA A10 datasheet (2021): BF16/FP16 125 TFLOPS dense (250 sparse); FP32 31.2; 24 GB.
    Gpu {
        name: "A10 24GB",
        memory_bytes: 24 * GIB,
        bf16_tflops: Some(125.0),
        fp16_tflops: 125.0,
        fp32_tflops: 31.2,
    },
    // NVIDIA Ada Lovelace architecture whitepaper v1.1, appendix table (GeForce RTX 4090): peak
    // FP16/BF16 tensor with FP32 accumulate 165.2 dense (330.4 sparse); FP32 82.6; 24 GB GDDR6X.
    Gpu {
        name: "RTX 4090 24GB",
        memory_bytes: 24 * GIB,
        bf16_tflops: Some(165.2),
        fp16_tflops: 165.2,
        fp32_tflops: 82.6,
    },
    // NVIDIA Ampere GA102 GPU architecture whitepaper v2.1 (GeForce RTX 3090): peak FP16/BF16
    // tensor with FP32 accumulate 71 dense (142 sparse); FP32 35.6; 24 GB GDDR6X.
    Gpu {
        name: "RTX 3090 24GB",
        memory_bytes: 24 * GIB,
        bf16_tflops: Some(71.0),
        fp16_tflops: 71.0,
        fp32_tflops: 35.6,
    },
    // NVIDIA V100 Tensor Core GPU datasheet (2020), V100 SXM2: tensor 125 TFLOPS (fp16);
    // FP32 15.7; 32 GB HBM2; no bf16.
    Gpu {
        name: "V100 SXM2 32GB",
        memory_bytes: 32 * GIB,
        bf16_tflops: None,
        fp16_tflops: 125.0,
        fp32_tflops: 15.7,
    },
    // NVIDIA T4 datasheet (2019): mixed-precision FP16/FP32 65 TFLOPS; FP32 8.1; 16 GB GDDR6;
    // no bf16.
    Gpu {
        name: "T4 16GB",
        memory_bytes: 16 * GIB,
        bf16_tflops: None,
        fp16_tflops: 65.0,
        fp32_tflops: 8.1,
    },
];

/// One GPU's row for a model.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GpuFit {
    pub gpu: Gpu,
    /// Training state (+ activations) / memory of one GPU.
    pub training_share: f64,
    /// Weights alone (inference) / memory.
    pub weights_share: f64,
    /// training_share ≤ 1.
    pub fits: bool,
    /// GPUs needed to hold the training state if it were sharded evenly (ZeRO-3 / FSDP).
    pub min_gpus_sharded: u64,
    /// Peak at the training dtype, FLOP/s (`None`: the chip lacks that dtype).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peak_flops_per_s: Option<f64>,
    /// Days to train `tokens` on `gpus` of these at `mfu`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub days: Option<f64>,
}

/// Inputs of [`table`].
pub struct FitInputs {
    pub training_bytes: u64,
    pub weights_bytes: u64,
    pub dtype: TrainDtype,
    pub flops_per_token: f64,
    pub tokens: f64,
    pub gpus: u64,
    pub mfu: f64,
}

/// One row per GPU of [`GPUS`].
pub fn table(x: &FitInputs) -> Vec<GpuFit> {
    GPUS.iter()
        .map(|g| {
            let peak = g.peak_flops(x.dtype);
            let share = x.training_bytes as f64 / g.memory_bytes as f64;
            GpuFit {
                gpu: *g,
                training_share: share,
                weights_share: x.weights_bytes as f64 / g.memory_bytes as f64,
                fits: x.training_bytes <= g.memory_bytes,
                min_gpus_sharded: x.training_bytes.div_ceil(g.memory_bytes),
                peak_flops_per_s: peak,
                days: peak.map(|p| {
                    x.flops_per_token * x.tokens / (x.gpus as f64 * p * x.mfu) / SECONDS_PER_DAY
                }),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Hand case: GPT-2 124M on 300B tokens (nanoGPT's run) with 6N = 746.6 MFLOP/token, on
    /// 8 A100s at 40% MFU: 6·124,439,808·3e11 / (8 · 312e12 · 0.4) / 86400 = 2.60 days.
    #[test]
    fn days_by_hand() {
        let rows = table(&FitInputs {
            training_bytes: 16 * 124_439_808,
            weights_bytes: 2 * 124_439_808,
            dtype: TrainDtype::Bf16,
            flops_per_token: 6.0 * 124_439_808.0,
            tokens: 3e11,
            gpus: 8,
            mfu: 0.4,
        });
        let a100 = rows.iter().find(|r| r.gpu.name == "A100 40GB").unwrap();
        let want = 6.0 * 124_439_808.0 * 3e11 / (8.0 * 312e12 * 0.4) / 86_400.0;
        assert!((a100.days.unwrap() - want).abs() < 1e-9);
        assert_eq!(format!("{:.2}", a100.days.unwrap()), "2.60");
        // 16 B/param × 124.4M = 1.99 GB of 40 GiB
        assert!((a100.training_share - 1_991_036_928.0 / 42_949_672_960.0).abs() < 1e-12);
        assert!(a100.fits);
        let v100 = rows
            .iter()
            .find(|r| r.gpu.name == "V100 SXM2 32GB")
            .unwrap();
        assert!(v100.days.is_none(), "V100 has no bf16");
    }

    #[test]
    fn sharding_needs_whole_gpus() {
        let rows = table(&FitInputs {
            training_bytes: 81 * GIB,
            weights_bytes: 0,
            dtype: TrainDtype::F32,
            flops_per_token: 1.0,
            tokens: 1.0,
            gpus: 1,
            mfu: 1.0,
        });
        let h100 = rows.iter().find(|r| r.gpu.name == "H100 SXM 80GB").unwrap();
        assert!(!h100.fits);
        assert_eq!(h100.min_gpus_sharded, 2);
    }
}
