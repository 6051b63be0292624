//! The device's matmul throughput, measured: a large square f32 matmul timed a few times.
//! MFU is reported against this (or `--peak-tflops`), never against an assumed figure.

use crate::error::Result;
use candle_core::{DType, Device, Tensor};
use std::time::Instant;

/// Side of the square probe matrices: 2048³ MACs = 17.2 GFLOP per run, ~0.1 s on 2 CPU cores
/// at the ~150–180 GFLOP/s measured on a 2-core CI machine, large enough to reach the gemm plateau.
pub const PROBE_SIZE: usize = 2048;
/// Timed runs after one warm-up; the median is reported.
pub const PROBE_RUNS: usize = 5;

/// Peak matmul FLOP/s of `device` in f32 (median of [`PROBE_RUNS`] after a warm-up), and a
/// description of how it was measured.
pub fn measure_matmul_peak(device: &Device) -> Result<(f64, String)> {
    let n = PROBE_SIZE;
    let a = Tensor::randn(0f32, 1.0, (n, n), device)?.to_dtype(DType::F32)?;
    let b = Tensor::randn(0f32, 1.0, (n, n), device)?.to_dtype(DType::F32)?;
    let flops = 2.0 * (n as f64).powi(3);
    let mut secs = Vec::with_capacity(PROBE_RUNS);
    for i in 0..=PROBE_RUNS {
        let t0 = Instant::now();
        let c = a.matmul(&b)?;
        device.synchronize()?;
        let dt = t0.elapsed().as_secs_f64();
        drop(c);
        if i > 0 {
            secs.push(dt);
        }
    }
    let med = super::run::median(&secs);
    Ok((
        flops / med,
        format!(
            "measured: f32 matmul {n}×{n}, median of {PROBE_RUNS} runs ({:.1} ms each)",
            med * 1e3
        ),
    ))
}
