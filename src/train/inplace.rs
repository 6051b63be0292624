//! In-place accumulation: the few writes the lean step makes into a buffer it already owns, so
//! that summing a gradient, adding a bias or scattering embedding rows allocates nothing.
//!
//! candle's arithmetic always returns a new tensor: `a + b` holds a, b and the sum at once. For a
//! gradient accumulated from several contributions (q, k and v into the norm output; the tied
//! head and the embedding into one [V, d] buffer; the residual stream) that is one extra buffer of
//! the accumulated size per add. These ops write into the first operand's storage instead (CPU,
//! contiguous). Elsewhere (CUDA, strided) they fall back to candle's out-of-place op and return
//! the new tensor: callers always use the returned tensor.
//!
//! Only call them on tensors the step allocated itself: a buffer shared with another tensor (a
//! weight, a saved activation) would change under its other owner.

use candle_core::{
    CpuStorage, DType, InplaceOp1, InplaceOp2, Layout, Result, Tensor, WithDType, D,
};

/// `dst += src` (same shape). Returns the accumulated tensor (`dst` itself on the fast path).
pub fn add(dst: Tensor, src: &Tensor) -> Result<Tensor> {
    if fast(&dst, src) && dst.dims() == src.dims() {
        dst.inplace_op2(
            src,
            &AddRows {
                row: dst.elem_count(),
            },
        )?;
        return Ok(dst);
    }
    &dst + src
}

/// `dst *= s`, with `s` rounded to dst's dtype first (as a scalar tensor of that dtype would be).
pub fn scale(dst: Tensor, s: f64) -> Result<Tensor> {
    if fast(&dst, &dst) {
        dst.inplace_op1(&Scale { s })?;
        return Ok(dst);
    }
    let st = Tensor::new(s, dst.device())?.to_dtype(dst.dtype())?;
    dst.broadcast_mul(&st)
}

/// `y[n, :] += b` for every row of `y` `[N, C]`, `b` `[C]`.
pub fn add_bias(y: Tensor, b: &Tensor) -> Result<Tensor> {
    let c = y.dim(D::Minus1)?;
    if fast(&y, b) && b.elem_count() == c {
        y.inplace_op2(b, &AddRows { row: c })?;
        return Ok(y);
    }
    y.broadcast_add(b)
}

/// `dst[ids[n], :] += src[n, :]` for every n whose id is not `skip` (torch's `padding_idx`: that
/// row gets no gradient). dst `[V, C]`, ids `[N]` u32, src `[N, C]`.
pub fn index_add_rows(
    dst: Tensor,
    ids: &Tensor,
    src: &Tensor,
    skip: Option<u32>,
) -> Result<Tensor> {
    let ids_host: Vec<u32> = ids.flatten_all()?.to_vec1()?;
    if fast(&dst, src) {
        dst.inplace_op2(
            src,
            &IndexAddRows {
                ids: ids_host,
                skip,
            },
        )?;
        return Ok(dst);
    }
    let src = match skip {
        Some(p) if ids_host.contains(&p) => {
            let keep: Vec<u8> = ids_host.iter().map(|&i| u8::from(i != p)).collect();
            let keep =
                Tensor::from_vec(keep, (ids_host.len(), 1), src.device())?.to_dtype(src.dtype())?;
            src.broadcast_mul(&keep)?
        }
        _ => src.clone(),
    };
    dst.index_add(&ids.flatten_all()?, &src, 0)
}

/// Both on the CPU, same float dtype, contiguous.
fn fast(dst: &Tensor, src: &Tensor) -> bool {
    dst.device().is_cpu()
        && dst.dtype() == src.dtype()
        && matches!(
            dst.dtype(),
            DType::F32 | DType::BF16 | DType::F16 | DType::F64
        )
        && dst.is_contiguous()
        && src.is_contiguous()
}

/// The contiguous element range of a tensor in its storage.
fn range(l: &Layout) -> Result<std::ops::Range<usize>> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(a..b),
        None => candle_core::bail!("in-place op on a non-contiguous tensor"),
    }
}

/// dst (viewed as rows of `row` elements) += src (one row, or as many elements as dst).
struct AddRows {
    row: usize,
}

fn add_rows<T: WithDType>(d: &mut [T], s: &[T], row: usize) {
    if s.len() == d.len() {
        d.iter_mut().zip(s).for_each(|(a, &b)| *a += b);
    } else {
        for r in d.chunks_exact_mut(row) {
            r.iter_mut().zip(s).for_each(|(a, &b)| *a += b);
        }
    }
}

impl InplaceOp2 for AddRows {
    fn name(&self) -> &'static str {
        "lean-add-rows"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<()> {
        let (r1, r2) = (range(l1)?, range(l2)?);
        match (s1, s2) {
            (CpuStorage::F32(d), CpuStorage::F32(s)) => add_rows(&mut d[r1], &s[r2], self.row),
            (CpuStorage::BF16(d), CpuStorage::BF16(s)) => add_rows(&mut d[r1], &s[r2], self.row),
            (CpuStorage::F16(d), CpuStorage::F16(s)) => add_rows(&mut d[r1], &s[r2], self.row),
            (CpuStorage::F64(d), CpuStorage::F64(s)) => add_rows(&mut d[r1], &s[r2], self.row),
            _ => candle_core::bail!("lean-add-rows: dtype mismatch"),
        }
        Ok(())
    }
}

struct Scale {
    s: f64,
}

fn scale_slice<T: WithDType>(d: &mut [T], s: f64) {
    let s = T::from_f64(s);
    d.iter_mut().for_each(|x| *x *= s);
}

impl InplaceOp1 for Scale {
    fn name(&self) -> &'static str {
        "lean-scale"
    }

    fn cpu_fwd(&self, s1: &mut CpuStorage, l1: &Layout) -> Result<()> {
        let r = range(l1)?;
        match s1 {
            CpuStorage::F32(d) => scale_slice(&mut d[r], self.s),
            CpuStorage::BF16(d) => scale_slice(&mut d[r], self.s),
            CpuStorage::F16(d) => scale_slice(&mut d[r], self.s),
            CpuStorage::F64(d) => scale_slice(&mut d[r], self.s),
            _ => candle_core::bail!("lean-scale: not a float tensor"),
        }
        Ok(())
    }
}

struct IndexAddRows {
    ids: Vec<u32>,
    skip: Option<u32>,
}

impl IndexAddRows {
    fn run<T: WithDType>(&self, d: &mut [T], s: &[T]) -> Result<()> {
        let n = self.ids.len();
        if n == 0 || !s.len().is_multiple_of(n) {
            candle_core::bail!("lean-index-add-rows: {} rows for {n} ids", s.len());
        }
        let c = s.len() / n;
        let v = d.len() / c;
        for (row, &id) in s.chunks_exact(c).zip(&self.ids) {
            if Some(id) == self.skip {
                continue;
            }
            let id = id as usize;
            if id >= v {
                candle_core::bail!("lean-index-add-rows: id {id} out of {v} rows");
            }
            d[id * c..(id + 1) * c]
                .iter_mut()
                .zip(row)
                .for_each(|(a, &b)| *a += b);
        }
        Ok(())
    }
}

impl InplaceOp2 for IndexAddRows {
    fn name(&self) -> &'static str {
        "lean-index-add-rows"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<()> {
        let (r1, r2) = (range(l1)?, range(l2)?);
        match (s1, s2) {
            (CpuStorage::F32(d), CpuStorage::F32(s)) => self.run(&mut d[r1], &s[r2]),
            (CpuStorage::BF16(d), CpuStorage::BF16(s)) => self.run(&mut d[r1], &s[r2]),
            (CpuStorage::F16(d), CpuStorage::F16(s)) => self.run(&mut d[r1], &s[r2]),
            (CpuStorage::F64(d), CpuStorage::F64(s)) => self.run(&mut d[r1], &s[r2]),
            _ => candle_core::bail!("lean-index-add-rows: dtype mismatch"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn in_place_ops_match_candle_and_allocate_nothing_new() -> Result<()> {
        let dev = Device::Cpu;
        let a = Tensor::randn(0f32, 1.0, (5, 3), &dev)?;
        let b = Tensor::randn(0f32, 1.0, (5, 3), &dev)?;
        let want = (&a + &b)?;
        let acc = add(a.copy()?, &b)?;
        assert_eq!(acc.to_vec2::<f32>()?, want.to_vec2::<f32>()?);

        let bias = Tensor::randn(0f32, 1.0, 3, &dev)?;
        let want = a.broadcast_add(&bias)?;
        let got = add_bias(a.copy()?, &bias)?;
        assert_eq!(got.to_vec2::<f32>()?, want.to_vec2::<f32>()?);

        let ids = Tensor::new(&[1u32, 0, 1, 3, 2], &dev)?;
        let dst = Tensor::randn(0f32, 1.0, (4, 3), &dev)?;
        let want = dst.index_add(&ids, &a, 0)?;
        let got = index_add_rows(dst.copy()?, &ids, &a, None)?;
        assert_eq!(got.to_vec2::<f32>()?, want.to_vec2::<f32>()?);
        // The scale rounded to the dtype first, as a scalar tensor of that dtype multiplies.
        let s = (12f64).sqrt() as f32 as f64;
        for dt in [DType::F32, DType::BF16] {
            let x = a.to_dtype(dt)?;
            let want = x.broadcast_mul(&Tensor::new(s as f32, &dev)?.to_dtype(dt)?)?;
            let got = scale(x.copy()?, s)?;
            let strided = scale(x.t()?, s)?.t()?;
            for g in [got, strided] {
                let d = (g.to_dtype(DType::F32)? - want.to_dtype(DType::F32)?)?
                    .abs()?
                    .max_all()?
                    .to_scalar::<f32>()?;
                assert_eq!(d, 0.0, "{dt:?}");
            }
        }
        // Row 1 skipped: only the other ids land.
        let got = index_add_rows(dst.copy()?, &ids, &a, Some(1))?.to_vec2::<f32>()?;
        assert_eq!(got[1], dst.to_vec2::<f32>()?[1]);
        assert_eq!(got[3], want.to_vec2::<f32>()?[3]);
        Ok(())
    }
}
