//! The lean step's matrix products.
//!
//! `matmul` is candle's CPU matmul minus one pass over the output: candle fills every product
//! with zeros (`vec![0; m·n]`) and then has gemm overwrite it, which `perf` put at 1.4% of a
//! GPT-2 124M step (the [V, d] head gradient alone is 154 MB). Here gemm writes into an
//! allocation it fills completely. The gemm call itself is candle's: same crate, same strides,
//! same parallelism, so the packed panels it allocates (modelled in `train::memory`) are
//! unchanged.

use candle_core::{DType, Device, Layout, Result, Storage, Tensor};

/// A 2-D operand as gemm reads it: the storage, where it starts and its strides.
struct Operand<'a> {
    data: &'a [f32],
    start: usize,
    rs: usize,
    cs: usize,
}

/// `a` `[m, k]` @ `b` `[k, n]` -> `[m, n]`, contiguous. Either operand may be a transposed view.
pub fn matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    #[cfg(test)]
    if super::testing::FORCE_COMPOSED.with(|c| c.get()) {
        return a.matmul(b);
    }
    let fast = a.rank() == 2
        && b.rank() == 2
        && a.dtype() == DType::F32
        && b.dtype() == DType::F32
        && a.device().is_cpu()
        && b.device().is_cpu();
    if !fast {
        return a.matmul(b);
    }
    let ((m, k), (k2, n)) = (a.dims2()?, b.dims2()?);
    if k != k2 {
        candle_core::bail!("matmul: [{m}, {k}] @ [{k2}, {n}]");
    }
    if m == 0 || n == 0 || k == 0 {
        // gemm writes nothing without a product to form; the empty sum is zero.
        return Tensor::zeros((m, n), DType::F32, &Device::Cpu);
    }
    let (ga, la) = a.storage_and_layout();
    let (gb, lb) = b.storage_and_layout();
    let (Storage::Cpu(sa), Storage::Cpu(sb)) = (&*ga, &*gb) else {
        return a.matmul(b);
    };
    let (Some(oa), Some(ob)) = (
        operand(sa.as_slice::<f32>()?, la, m, k),
        operand(sb.as_slice::<f32>()?, lb, k, n),
    ) else {
        return a.matmul(b);
    };
    let len = m * n;
    let mut out: Vec<f32> = Vec::with_capacity(len);
    let threads = rayon::current_num_threads();
    let parallelism = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: `operand` checked that every element the strides reach lies inside each slice;
    // `out` has room for m·n elements, all of which gemm writes (read_dst = false: dst is
    // overwritten by 1·a·b, never read), so `set_len` exposes only initialised values.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out.as_mut_ptr(),
            1,
            n as isize,
            false,
            oa.data.as_ptr().add(oa.start),
            oa.cs as isize,
            oa.rs as isize,
            ob.data.as_ptr().add(ob.start),
            ob.cs as isize,
            ob.rs as isize,
            0.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
        out.set_len(len);
    }
    drop((ga, gb));
    Tensor::from_vec(out, (m, n), &Device::Cpu)
}

/// The operand `[rows, cols]` of `layout` in `data`, if its strides stay inside it.
fn operand<'a>(data: &'a [f32], layout: &Layout, rows: usize, cols: usize) -> Option<Operand<'a>> {
    let &[rs, cs] = layout.stride() else {
        return None;
    };
    let start = layout.start_offset();
    let last = start
        .checked_add((rows - 1).checked_mul(rs)?)?
        .checked_add((cols - 1).checked_mul(cs)?)?;
    (last < data.len()).then_some(Operand {
        data,
        start,
        rs,
        cs,
    })
}

#[cfg(test)]
mod tests {
    use super::super::testing::{rand, FORCE_COMPOSED};
    use super::*;

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    #[test]
    fn matmul_matches_candle_for_every_layout() {
        let (m, k, n) = (37, 19, 53);
        let a = rand(&[m, k], 1.0, 1).unwrap();
        let at = rand(&[k, m], 1.0, 2).unwrap();
        let b = rand(&[k, n], 1.0, 3).unwrap();
        let bt = rand(&[n, k], 1.0, 4).unwrap();
        for (x, y) in [
            (a.clone(), b.clone()),
            (a.clone(), bt.t().unwrap()),
            (at.t().unwrap(), b.clone()),
            (at.t().unwrap(), bt.t().unwrap()),
            // A row window of a bigger tensor: a start offset gemm must honour.
            (
                rand(&[m + 3, k], 1.0, 5).unwrap().narrow(0, 3, m).unwrap(),
                b.clone(),
            ),
        ] {
            let ours = matmul(&x, &y).unwrap();
            FORCE_COMPOSED.with(|c| c.set(true));
            let theirs = matmul(&x, &y).unwrap();
            FORCE_COMPOSED.with(|c| c.set(false));
            assert_eq!(ours.dims(), &[m, n]);
            assert!(ours.is_contiguous());
            assert!(max_abs_diff(&ours, &theirs) < 1e-5);
        }
    }

    #[test]
    fn matmul_of_an_empty_inner_dimension_is_zero() {
        let a = Tensor::zeros((3, 0), DType::F32, &Device::Cpu).unwrap();
        let b = Tensor::zeros((0, 4), DType::F32, &Device::Cpu).unwrap();
        let c = matmul(&a, &b).unwrap();
        assert_eq!(c.dims(), &[3, 4]);
        assert_eq!(c.sum_all().unwrap().to_scalar::<f32>().unwrap(), 0.0);
    }
}
