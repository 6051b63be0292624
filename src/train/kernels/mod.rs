//! Fused kernels for the lean step, each with its backward.
//!
//! Every function takes and returns candle tensors and picks its path itself: CPU, f32 and
//! contiguous inputs go to a fused Rust kernel (rayon over rows or heads, one pass over the data,
//! allocating only its outputs); anything else (CUDA, f16/bf16, strided views) runs the same
//! maths composed from candle ops, so the CUDA build runs it too. The composed versions define
//! the maths; the tests hold the fused ones to them and both backwards to candle autograd.
//! Statistics (mean, rstd, log-sum-exp) are f32 whatever the input dtype.
//!
//! What each forward returns beside its output is what PyTorch's autograd saves for the same op:
//! a norm's per-row statistics, attention's per-row log-sum-exp (never the T×T probabilities,
//! except for eager attention, which keeps them by definition), the loss's per-row log-sum-exp.

mod act;
mod attention;
mod embed;
mod loss;
mod matmul;
mod norm;
mod rope;
pub(crate) mod simd;
mod sum;

pub use act::{activation, gated_bwd, gated_fwd, gelu_tanh_bwd, gelu_tanh_fwd, GateAct};
pub use attention::{
    attention_bwd, attention_eager_bwd, attention_eager_fwd, attention_eager_fwd_keeping,
    attention_fwd, AttnSpec,
};
pub use embed::embedding_bwd;
pub use loss::{cross_entropy_bwd, cross_entropy_fwd, softcap_fwd, IGNORE_INDEX};
pub use matmul::matmul;
pub use norm::{layer_norm_bwd, layer_norm_fwd, rms_norm_bwd, rms_norm_fwd};
pub use rope::{rope_bwd, rope_fwd};
pub use sum::{add, mul_per_row, sub_per_row, sum_rows};

use candle_core::{DType, Storage, Tensor};

/// Runs `f` on the elements of `ts` when every one is a contiguous f32 tensor on the CPU (the
/// fused path); `None` otherwise (the caller then takes the composed path). The slices borrow
/// the tensors' storage for the duration of `f`: nothing is copied.
fn with_cpu_f32<R>(ts: &[&Tensor], f: impl FnOnce(&[&[f32]]) -> R) -> Option<R> {
    #[cfg(test)]
    if testing::FORCE_COMPOSED.with(|c| c.get()) {
        return None;
    }
    if ts
        .iter()
        .any(|t| t.dtype() != DType::F32 || !t.device().is_cpu())
    {
        return None;
    }
    let mut guards = Vec::with_capacity(ts.len());
    for t in ts {
        let (guard, layout) = t.storage_and_layout();
        let range = layout.contiguous_offsets()?;
        guards.push((guard, range));
    }
    let mut slices = Vec::with_capacity(ts.len());
    for (guard, (start, end)) in &guards {
        match &**guard {
            Storage::Cpu(cpu) => slices.push(cpu.as_slice::<f32>().ok()?.get(*start..*end)?),
            _ => return None,
        }
    }
    Some(f(&slices))
}

/// Rows of `x` as a [rows, last] view: (rows, last) for any rank ≥ 1.
fn rows_cols(x: &Tensor) -> candle_core::Result<(usize, usize)> {
    let dims = x.dims();
    let Some(&last) = dims.last() else {
        candle_core::bail!("expected a tensor with at least one dimension, got a scalar")
    };
    let rows = dims[..dims.len() - 1].iter().product();
    Ok((rows, last))
}

/// Rows a rayon task takes at least, so that tiny rows do not drown in scheduling.
fn min_rows(cols: usize) -> usize {
    (4096 / cols.max(1)).max(1)
}

#[cfg(test)]
pub(crate) mod testing {
    use candle_core::{Device, Result, Tensor};
    use rand::{rngs::StdRng, Rng, SeedableRng};

    thread_local! {
        /// Set by the timing run to time the composed path on the same inputs.
        pub static FORCE_COMPOSED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    }

    /// A deterministic tensor of uniform values in [-scale, scale).
    pub fn rand(shape: &[usize], scale: f32, seed: u64) -> Result<Tensor> {
        let mut rng = StdRng::seed_from_u64(seed);
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|_| (rng.random::<f32>() * 2.0 - 1.0) * scale)
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu)
    }

    /// max |a − b| / max |b|: the error relative to the reference's scale, so that entries
    /// near zero do not blow it up.
    pub fn rel_err(a: &Tensor, reference: &Tensor) -> Result<f64> {
        assert_eq!(a.dims(), reference.dims(), "shapes differ");
        let a = a
            .to_dtype(candle_core::DType::F64)?
            .flatten_all()?
            .to_vec1::<f64>()?;
        let b = reference
            .to_dtype(candle_core::DType::F64)?
            .flatten_all()?
            .to_vec1::<f64>()?;
        let scale = b.iter().fold(0f64, |m, x| m.max(x.abs()));
        assert!(
            scale > 0.0,
            "reference is all zeros: the comparison would be empty"
        );
        let diff = a.iter().zip(&b).fold(0f64, |m, (x, y)| {
            if (x - y).abs().is_nan() {
                f64::INFINITY
            } else {
                m.max((x - y).abs())
            }
        });
        Ok(diff / scale)
    }

    /// Asserts `a` matches `reference` within `tol` (relative to the reference's largest entry).
    pub fn close(what: &str, a: &Tensor, reference: &Tensor, tol: f64) {
        let e = rel_err(a, reference).unwrap();
        assert!(e <= tol, "{what}: relative error {e:e} > {tol:e}");
    }

    /// A strided (non-contiguous) copy of `x` with the same values, to force the composed path.
    pub fn strided(x: &Tensor) -> Tensor {
        let r = x.rank();
        let t = x.transpose(0, r - 1).unwrap().contiguous().unwrap();
        let t = t.transpose(0, r - 1).unwrap();
        assert!(!t.is_contiguous());
        t
    }
}

#[cfg(test)]
mod tests {
    use super::testing::{close, rand};
    use super::*;

    #[test]
    fn fused_path_reads_views_at_their_offset_and_refuses_the_rest() {
        let x = rand(&[4, 6], 1.0, 1).unwrap();
        // Rows 1..3: contiguous, starting 6 elements into the storage.
        let view = x.narrow(0, 1, 2).unwrap();
        let got = with_cpu_f32(&[&view], |s| s[0].to_vec()).expect("a contiguous f32 view");
        assert_eq!(got, view.flatten_all().unwrap().to_vec1::<f32>().unwrap());
        assert!(with_cpu_f32(&[&x.t().unwrap()], |_| ()).is_none());
        assert!(with_cpu_f32(&[&x.to_dtype(DType::BF16).unwrap()], |_| ()).is_none());
        // A kernel on the view agrees with the same kernel on a fresh copy of it.
        let (y, _, _) = layer_norm_fwd(&view, None, None, 1e-5).unwrap();
        let (y_copy, _, _) = layer_norm_fwd(&view.copy().unwrap(), None, None, 1e-5).unwrap();
        close("layer norm of a view", &y, &y_copy, 0.0);
    }
}

/// Fused vs composed timings at GPT-2 124M's shapes (batch 1 × seq 256), one layer's worth of
/// each kernel plus the loss. Prints; asserts nothing about speed. Run with
/// `cargo test --release --lib train::kernels::timing -- --ignored --nocapture`.
#[cfg(test)]
mod timing {
    use super::testing::{rand, FORCE_COMPOSED};
    use super::*;
    use std::time::Instant;

    /// Process CPU time (user + system, all threads) in ms: on a shared machine the wall
    /// clock measures the neighbours too.
    fn cpu_ms() -> f64 {
        let mut u: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: getrusage writes into the struct it is given.
        unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
        let tv = |t: libc::timeval| t.tv_sec as f64 * 1e3 + t.tv_usec as f64 / 1e3;
        tv(u.ru_utime) + tv(u.ru_stime)
    }

    /// Medians of (wall ms, CPU ms) over 7 runs after a warm-up.
    fn median_ms(mut f: impl FnMut()) -> (f64, f64) {
        f();
        let mut wall = Vec::new();
        let mut cpu = Vec::new();
        for _ in 0..7 {
            let (t, c) = (Instant::now(), cpu_ms());
            f();
            cpu.push(cpu_ms() - c);
            wall.push(t.elapsed().as_secs_f64() * 1e3);
        }
        wall.sort_by(f64::total_cmp);
        cpu.sort_by(f64::total_cmp);
        (wall[3], cpu[3])
    }

    fn both(name: &str, mut f: impl FnMut()) {
        // TIMING_ONLY=attention times only the kernels whose name contains it.
        if std::env::var("TIMING_ONLY").is_ok_and(|only| !name.contains(&only)) {
            return;
        }
        let (fw, fc) = median_ms(&mut f);
        if std::env::var("TIMING_FUSED_ONLY").is_ok() {
            println!("{name:<40} fused {fw:>8.2} ms (cpu {fc:>8.2})");
            return;
        }
        FORCE_COMPOSED.with(|c| c.set(true));
        let (cw, cc) = median_ms(&mut f);
        FORCE_COMPOSED.with(|c| c.set(false));
        println!(
            "{name:<40} fused {fw:>8.2} ms (cpu {fc:>8.2})   composed {cw:>8.2} ms (cpu {cc:>8.2})"
        );
    }

    #[test]
    #[ignore = "timing, run by hand"]
    fn gpt2_124m_shapes() {
        let (t, h, hd, c, v) = (256, 12, 64, 768, 50257);
        // Yardstick: one MLP matmul (2·256·768·3072 = 1.21 GFLOP) on the same machine state; the
        // whole GPT-2 124M step at this batch is ≈ 190 GFLOP of such matmuls.
        let (ma, mb) = (
            rand(&[t, c], 1.0, 11).unwrap(),
            rand(&[c, 4 * c], 1.0, 12).unwrap(),
        );
        both("yardstick matmul [256,768]x[768,3072]", || {
            ma.matmul(&mb).unwrap();
        });
        let x = rand(&[t, c], 1.0, 1).unwrap();
        let w = rand(&[c], 1.0, 2).unwrap();
        let b = rand(&[c], 1.0, 3).unwrap();
        let (_, mean, rstd) = layer_norm_fwd(&x, Some(&w), Some(&b), 1e-5).unwrap();
        both("layer_norm_fwd [256,768]", || {
            layer_norm_fwd(&x, Some(&w), Some(&b), 1e-5).unwrap();
        });
        both("layer_norm_bwd [256,768]", || {
            layer_norm_bwd(&x, &x, Some(&w), &mean, &rstd).unwrap();
        });
        let hx = rand(&[t, 4 * c], 3.0, 4).unwrap();
        both("gelu_tanh_fwd [256,3072]", || {
            gelu_tanh_fwd(&hx).unwrap();
        });
        both("gelu_tanh_bwd [256,3072]", || {
            gelu_tanh_bwd(&hx, &hx).unwrap();
        });
        both("gated_bwd silu [256,3072]", || {
            gated_bwd(&hx, &hx, &hx, GateAct::Silu).unwrap();
        });
        let q = rand(&[1, t, h, hd], 1.0, 5).unwrap();
        let k = rand(&[1, t, h, hd], 1.0, 6).unwrap();
        let vv = rand(&[1, t, h, hd], 1.0, 7).unwrap();
        let spec = AttnSpec {
            scale: 0.125,
            window: None,
            softcap: None,
        };
        let (o, lse) = attention_fwd(&q, &k, &vv, &spec).unwrap();
        both("attention_fwd [1,256,12,64]", || {
            attention_fwd(&q, &k, &vv, &spec).unwrap();
        });
        both("attention_bwd [1,256,12,64]", || {
            attention_bwd(&q, &k, &vv, &o, &lse, &o, &spec).unwrap();
        });
        both("attention_eager_fwd (composed both)", || {
            attention_eager_fwd(&q, &k, &vv, &spec).unwrap();
        });
        let logits = rand(&[t, v], 5.0, 8).unwrap();
        let targets = Tensor::new(
            (0..t as u32).map(|i| i * 191).collect::<Vec<_>>(),
            &candle_core::Device::Cpu,
        )
        .unwrap();
        let (_, lse) = cross_entropy_fwd(&logits, &targets).unwrap();
        both("cross_entropy_fwd [256,50257]", || {
            cross_entropy_fwd(&logits, &targets).unwrap();
        });
        both("cross_entropy_bwd [256,50257]", || {
            // The fused path overwrites its input: each run gets a fresh copy (timed too).
            cross_entropy_bwd(logits.copy().unwrap(), &targets, &lse, 1.0 / t as f64, None)
                .unwrap();
        });
        both("copy of the logits (in the line above)", || {
            logits.copy().unwrap();
        });
        let ids = Tensor::new(
            (0..t as u32).map(|i| i * 7).collect::<Vec<_>>(),
            &candle_core::Device::Cpu,
        )
        .unwrap();
        both("embedding_bwd [256,768] -> [50257,768]", || {
            embedding_bwd(&ids, &x, v).unwrap();
        });
        let (cs, sn) = (
            rand(&[t, 32], 1.0, 9).unwrap(),
            rand(&[t, 32], 1.0, 10).unwrap(),
        );
        both("rope_fwd [1,256,12,64]", || {
            rope_fwd(&q, &cs, &sn).unwrap();
        });
    }
}
