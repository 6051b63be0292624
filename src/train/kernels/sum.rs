//! Sums the lean step forms outside its fused kernels: residual additions and bias gradients.
//!
//! candle's `a + b` runs on candle's own thread pool, whose workers spin at a barrier while the
//! rayon threads that run gemm want the same cores (`perf`: 1.1% of a GPT-2 124M step waiting
//! in `BarrierGuard::drop`); candle's `sum(0)` reduces along the strided axis one element at a
//! time (2.5% of the same step). These run on rayon, a contiguous block per task.

use super::simd::{self, multiversion};
use super::with_cpu_f32;
use candle_core::{Device, Result, Tensor};
use rayon::prelude::*;

/// Elements a rayon task takes at least.
const CHUNK: usize = 16 * 1024;

/// `a + b` (same shape) in a new tensor, as the residual stream's sum is.
pub fn add(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if a.dims() != b.dims() {
        candle_core::bail!("add: shapes {:?} and {:?} differ", a.dims(), b.dims());
    }
    let fused = with_cpu_f32(&[a, b], |s| {
        fill(s[0].len(), CHUNK, |at, y| {
            add_block(y, &s[0][at..at + y.len()], &s[1][at..at + y.len()])
        })
    });
    match fused {
        Some(y) => Tensor::from_vec(y, a.shape(), &Device::Cpu),
        None => a + b,
    }
}

/// `x[r, :] − v[r]` for every row r of `x` `[R, C]`, `v` `[R]`, in a new tensor.
pub fn sub_per_row(x: &Tensor, v: &Tensor) -> Result<Tensor> {
    per_row(x, v, sub_block, |x, v| x.broadcast_sub(v))
}

/// `x[r, :] · v[r]` for every row r of `x` `[R, C]`, `v` `[R]`, in a new tensor.
pub fn mul_per_row(x: &Tensor, v: &Tensor) -> Result<Tensor> {
    per_row(x, v, mul_block, |x, v| x.broadcast_mul(v))
}

type Out = [std::mem::MaybeUninit<f32>];

multiversion! {
    fn add_block(y: &mut Out, a: &[f32], b: &[f32]) {
        for ((y, &a), &b) in y.iter_mut().zip(a).zip(b) {
            y.write(a + b);
        }
    }
}

multiversion! {
    fn sub_block(y: &mut Out, x: &[f32], v: f32) {
        for (y, &x) in y.iter_mut().zip(x) {
            y.write(x - v);
        }
    }
}

multiversion! {
    fn mul_block(y: &mut Out, x: &[f32], v: f32) {
        for (y, &x) in y.iter_mut().zip(x) {
            y.write(x * v);
        }
    }
}

fn per_row(
    x: &Tensor,
    v: &Tensor,
    block: fn(&mut Out, &[f32], f32),
    composed: impl Fn(&Tensor, &Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    let (rows, c) = super::rows_cols(x)?;
    if v.elem_count() != rows {
        candle_core::bail!("per-row operand: {} values for {rows} rows", v.elem_count());
    }
    let fused = with_cpu_f32(&[x, v], |s| {
        // Whole rows per task (none at all when rows are empty).
        fill(rows * c, super::min_rows(c) * c.max(1), |at, y| {
            for (i, y) in y.chunks_mut(c).enumerate() {
                let r = at / c + i;
                block(y, &s[0][r * c..(r + 1) * c], s[1][r]);
            }
        })
    });
    match fused {
        Some(y) => Tensor::from_vec(y, x.shape(), &Device::Cpu),
        None => composed(
            x,
            &v.reshape((rows, 1))?
                .broadcast_as((rows, c))?
                .reshape(x.shape())?
                .contiguous()?,
        ),
    }
}

/// A vector of `n` values, written by `f(start, chunk)` over chunks of `chunk` elements on
/// rayon; `f` must write every element of its chunk.
fn fill(
    n: usize,
    chunk: usize,
    f: impl Fn(usize, &mut [std::mem::MaybeUninit<f32>]) + Sync,
) -> Vec<f32> {
    let mut y: Vec<f32> = Vec::with_capacity(n);
    y.spare_capacity_mut()[..n]
        .par_chunks_mut(chunk)
        .enumerate()
        .for_each(|(i, part)| f(i * chunk, part));
    // SAFETY: every chunk of the first n elements was written by `f` (its contract).
    unsafe { y.set_len(n) };
    y
}

/// Column sums of `dy` `[N, C]` -> `[C]` (a bias's gradient).
pub fn sum_rows(dy: &Tensor) -> Result<Tensor> {
    let (n, c) = dy.dims2()?;
    let fused = with_cpu_f32(&[dy], |s| {
        let dy = s[0];
        let mut out = vec![0f32; c];
        // Column blocks of at least 256 floats per task: each task streams its block of every
        // row, so no two tasks write the same output.
        let block = c.div_ceil(rayon::current_num_threads()).max(256);
        out.par_chunks_mut(block).enumerate().for_each(|(bi, acc)| {
            let c0 = bi * block;
            for r in 0..n {
                simd::axpy(acc, 1.0, &dy[r * c + c0..r * c + c0 + acc.len()]);
            }
        });
        out
    });
    match fused {
        Some(out) => Tensor::from_vec(out, c, &Device::Cpu),
        None => dy.sum(0),
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{close, rand, strided};
    use super::*;

    #[test]
    fn add_matches_candle_on_both_paths() {
        for shape in [&[1usize][..], &[3, 5], &[2, 40_000], &[2, 3, 7]] {
            let a = rand(shape, 1.0, 1).unwrap();
            let b = rand(shape, 1.0, 2).unwrap();
            let want = (&a + &b).unwrap();
            close("fused add", &add(&a, &b).unwrap(), &want, 0.0);
            if shape.len() > 1 {
                close("composed add", &add(&strided(&a), &b).unwrap(), &want, 0.0);
            }
        }
        let a = rand(&[2, 3], 1.0, 1).unwrap();
        assert!(add(&a, &rand(&[3, 2], 1.0, 2).unwrap()).is_err());
    }

    #[test]
    fn per_row_ops_match_candle() {
        for (r, c) in [(1, 1), (3, 5), (40, 1000), (3, 0)] {
            if c == 0 {
                let x = Tensor::zeros((r, 0), candle_core::DType::F32, &Device::Cpu).unwrap();
                let v = rand(&[r], 1.0, 4).unwrap();
                assert_eq!(sub_per_row(&x, &v).unwrap().dims(), &[r, 0]);
                continue;
            }
            let x = rand(&[r, c], 1.0, 3).unwrap();
            let v = rand(&[r], 1.0, 4).unwrap();
            let col = v.unsqueeze(1).unwrap();
            let sub = x.broadcast_sub(&col).unwrap();
            let mul = x.broadcast_mul(&col).unwrap();
            close("x − v", &sub_per_row(&x, &v).unwrap(), &sub, 0.0);
            close("x · v", &mul_per_row(&x, &v).unwrap(), &mul, 0.0);
            if r > 1 && c > 1 {
                let xs = strided(&x);
                close("x − v, composed", &sub_per_row(&xs, &v).unwrap(), &sub, 0.0);
                close("x · v, composed", &mul_per_row(&xs, &v).unwrap(), &mul, 0.0);
            }
        }
    }

    #[test]
    fn sum_rows_matches_candle() {
        for (n, c) in [(1, 1), (7, 5), (33, 300), (256, 2304), (5, 1029)] {
            let dy = rand(&[n, c], 1.0, 9).unwrap();
            close(
                "column sums",
                &sum_rows(&dy).unwrap(),
                &dy.sum(0).unwrap(),
                1e-6,
            );
            if n > 1 && c > 1 {
                let composed = sum_rows(&strided(&dy)).unwrap();
                close(
                    "column sums, composed",
                    &composed,
                    &dy.sum(0).unwrap(),
                    1e-6,
                );
            }
        }
    }
}
