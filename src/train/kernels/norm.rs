//! LayerNorm and RMSNorm over the last dimension, forward and backward.
//!
//! Shapes: x [.., C] (any leading dims, N rows in all), w and b [C]; the statistics have x's
//! leading dims ([N] for a 2-D x) and are f32.

use candle_core::{DType, Device, Result, Tensor, D};
use rayon::prelude::*;

use super::simd::{self, multiversion};
use super::{min_rows, rows_cols, with_cpu_f32};

/// y = (x − mean) · rstd · w + b, rstd = 1/√(var + eps) (biased variance, as PyTorch).
pub fn layer_norm_fwd(
    x: &Tensor,
    w: Option<&Tensor>,
    b: Option<&Tensor>,
    eps: f64,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (n, c) = rows_cols(x)?;
    check_param("w", w, c)?;
    check_param("b", b, c)?;
    let stat_dims = &x.dims()[..x.rank() - 1];
    let ins: Vec<&Tensor> = [Some(x), w, b].into_iter().flatten().collect();
    let fused = with_cpu_f32(&ins, |s| {
        let (xs, mut rest) = (s[0], &s[1..]);
        let ws = w.map(|_| take(&mut rest));
        let bs = b.map(|_| take(&mut rest));
        let mut y = vec![0f32; n * c];
        let mut mean = vec![0f32; n];
        let mut rstd = vec![0f32; n];
        let block = min_rows(c);
        y.par_chunks_mut(block * c)
            .zip(xs.par_chunks(block * c))
            .zip(mean.par_chunks_mut(block).zip(rstd.par_chunks_mut(block)))
            .for_each(|((y, x), (m, r))| ln_fwd_rows(y, x, m, r, ws, bs, c, eps as f32));
        (y, mean, rstd)
    });
    if let Some((y, mean, rstd)) = fused {
        return Ok((
            Tensor::from_vec(y, x.shape(), &Device::Cpu)?,
            Tensor::from_vec(mean, stat_dims, &Device::Cpu)?,
            Tensor::from_vec(rstd, stat_dims, &Device::Cpu)?,
        ));
    }
    let x32 = x.to_dtype(DType::F32)?;
    let mean = x32.mean_keepdim(D::Minus1)?;
    let xc = x32.broadcast_sub(&mean)?;
    let rstd = xc
        .sqr()?
        .mean_keepdim(D::Minus1)?
        .affine(1.0, eps)?
        .sqrt()?
        .recip()?;
    let mut y = xc.broadcast_mul(&rstd)?;
    if let Some(w) = w {
        y = y.broadcast_mul(&w.to_dtype(DType::F32)?)?;
    }
    if let Some(b) = b {
        y = y.broadcast_add(&b.to_dtype(DType::F32)?)?;
    }
    Ok((
        y.to_dtype(x.dtype())?,
        mean.squeeze(D::Minus1)?,
        rstd.squeeze(D::Minus1)?,
    ))
}

/// dx = rstd · (g − mean(g) − x̂ · mean(g · x̂)) with g = dy · w, x̂ = (x − mean) · rstd;
/// dw = Σ_rows dy · x̂ (present iff w is given), db = Σ_rows dy (always: the backward does not
/// know whether the norm has a bias; [`layer_norm_bwd_opt`] skips it).
pub fn layer_norm_bwd(
    dy: &Tensor,
    x: &Tensor,
    w: Option<&Tensor>,
    mean: &Tensor,
    rstd: &Tensor,
) -> Result<(Tensor, Option<Tensor>, Option<Tensor>)> {
    layer_norm_bwd_opt(dy, x, w, mean, rstd, true)
}

/// As [`layer_norm_bwd`], with the bias gradient only when `want_db`.
pub fn layer_norm_bwd_opt(
    dy: &Tensor,
    x: &Tensor,
    w: Option<&Tensor>,
    mean: &Tensor,
    rstd: &Tensor,
    want_db: bool,
) -> Result<(Tensor, Option<Tensor>, Option<Tensor>)> {
    let (n, c) = rows_cols(x)?;
    check_param("w", w, c)?;
    check_same("dy", dy, x)?;
    check_stats(mean, n)?;
    check_stats(rstd, n)?;
    let want_dw = w.is_some();
    let ins: Vec<&Tensor> = [Some(dy), Some(x), Some(mean), Some(rstd), w]
        .into_iter()
        .flatten()
        .collect();
    let fused = with_cpu_f32(&ins, |s| {
        let (dys, xs, ms, rs) = (s[0], s[1], s[2], s[3]);
        let ws = w.map(|_| s[4]);
        let mut dx = vec![0f32; n * c];
        let block = min_rows(c);
        let zero = || (vec![0f32; c], vec![0f32; c]);
        let (dw, db) = dx
            .par_chunks_mut(block * c)
            .zip(xs.par_chunks(block * c).zip(dys.par_chunks(block * c)))
            .zip(ms.par_chunks(block).zip(rs.par_chunks(block)))
            .fold(zero, |(mut dw, mut db), ((dx, (x, dy)), (m, r))| {
                ln_bwd_rows(dx, x, dy, m, r, ws, &mut dw, &mut db, c);
                (dw, db)
            })
            .reduce(zero, add_pair);
        (dx, dw, db)
    });
    if let Some((dx, dw, db)) = fused {
        let dx = Tensor::from_vec(dx, x.shape(), &Device::Cpu)?;
        let dw = if want_dw {
            Some(Tensor::from_vec(dw, c, &Device::Cpu)?)
        } else {
            None
        };
        let db = if want_db {
            Some(Tensor::from_vec(db, c, &Device::Cpu)?)
        } else {
            None
        };
        return Ok((dx, dw, db));
    }
    let x32 = x.to_dtype(DType::F32)?;
    let dy32 = dy.to_dtype(DType::F32)?;
    let mean = mean.unsqueeze(D::Minus1)?;
    let rstd = rstd.unsqueeze(D::Minus1)?;
    let xhat = x32.broadcast_sub(&mean)?.broadcast_mul(&rstd)?;
    let g = match w {
        Some(w) => dy32.broadcast_mul(&w.to_dtype(DType::F32)?)?,
        None => dy32.clone(),
    };
    let gm = g.mean_keepdim(D::Minus1)?;
    let gxm = (&g * &xhat)?.mean_keepdim(D::Minus1)?;
    let dx = g
        .broadcast_sub(&gm)?
        .sub(&xhat.broadcast_mul(&gxm)?)?
        .broadcast_mul(&rstd)?
        .to_dtype(x.dtype())?;
    let dw = match w {
        Some(w) => Some(sum_rows(&(&dy32 * &xhat)?, c)?.to_dtype(w.dtype())?),
        None => None,
    };
    let db = if want_db {
        Some(sum_rows(&dy32, c)?.to_dtype(dy.dtype())?)
    } else {
        None
    };
    Ok((dx, dw, db))
}

/// y = x · rstd · (offset + w), rstd = 1/√(mean(x²) + eps); offset 0 (Llama) or 1 (Gemma's
/// `(1 + w)`). Without w, y = x · rstd.
pub fn rms_norm_fwd(
    x: &Tensor,
    w: Option<&Tensor>,
    eps: f64,
    offset: f64,
) -> Result<(Tensor, Tensor)> {
    let (n, c) = rows_cols(x)?;
    check_param("w", w, c)?;
    let stat_dims = &x.dims()[..x.rank() - 1];
    let ins: Vec<&Tensor> = [Some(x), w].into_iter().flatten().collect();
    let fused = with_cpu_f32(&ins, |s| {
        let xs = s[0];
        let ws = w.map(|_| s[1]);
        let mut y = vec![0f32; n * c];
        let mut rstd = vec![0f32; n];
        let block = min_rows(c);
        y.par_chunks_mut(block * c)
            .zip(xs.par_chunks(block * c))
            .zip(rstd.par_chunks_mut(block))
            .for_each(|((y, x), r)| rms_fwd_rows(y, x, r, ws, c, eps as f32, offset as f32));
        (y, rstd)
    });
    if let Some((y, rstd)) = fused {
        return Ok((
            Tensor::from_vec(y, x.shape(), &Device::Cpu)?,
            Tensor::from_vec(rstd, stat_dims, &Device::Cpu)?,
        ));
    }
    let x32 = x.to_dtype(DType::F32)?;
    let rstd = x32
        .sqr()?
        .mean_keepdim(D::Minus1)?
        .affine(1.0, eps)?
        .sqrt()?
        .recip()?;
    let mut y = x32.broadcast_mul(&rstd)?;
    if let Some(w) = w {
        y = y.broadcast_mul(&w.to_dtype(DType::F32)?.affine(1.0, offset)?)?;
    }
    Ok((y.to_dtype(x.dtype())?, rstd.squeeze(D::Minus1)?))
}

/// dx = rstd · (g − x̂ · mean(g · x̂)) with g = dy · (offset + w), x̂ = x · rstd;
/// dw = Σ_rows dy · x̂ (present iff w is).
pub fn rms_norm_bwd(
    dy: &Tensor,
    x: &Tensor,
    w: Option<&Tensor>,
    rstd: &Tensor,
    offset: f64,
) -> Result<(Tensor, Option<Tensor>)> {
    let (n, c) = rows_cols(x)?;
    check_param("w", w, c)?;
    check_same("dy", dy, x)?;
    check_stats(rstd, n)?;
    let ins: Vec<&Tensor> = [Some(dy), Some(x), Some(rstd), w]
        .into_iter()
        .flatten()
        .collect();
    let fused = with_cpu_f32(&ins, |s| {
        let (dys, xs, rs) = (s[0], s[1], s[2]);
        let ws = w.map(|_| s[3]);
        let mut dx = vec![0f32; n * c];
        let block = min_rows(c);
        let dw = dx
            .par_chunks_mut(block * c)
            .zip(xs.par_chunks(block * c).zip(dys.par_chunks(block * c)))
            .zip(rs.par_chunks(block))
            .fold(
                || vec![0f32; c],
                |mut dw, ((dx, (x, dy)), r)| {
                    rms_bwd_rows(dx, x, dy, r, ws, &mut dw, c, offset as f32);
                    dw
                },
            )
            .reduce(|| vec![0f32; c], add_vec);
        (dx, dw)
    });
    if let Some((dx, dw)) = fused {
        let dx = Tensor::from_vec(dx, x.shape(), &Device::Cpu)?;
        let dw = match w {
            Some(_) => Some(Tensor::from_vec(dw, c, &Device::Cpu)?),
            None => None,
        };
        return Ok((dx, dw));
    }
    let x32 = x.to_dtype(DType::F32)?;
    let dy32 = dy.to_dtype(DType::F32)?;
    let rstd = rstd.unsqueeze(D::Minus1)?;
    let xhat = x32.broadcast_mul(&rstd)?;
    let g = match w {
        Some(w) => dy32.broadcast_mul(&w.to_dtype(DType::F32)?.affine(1.0, offset)?)?,
        None => dy32.clone(),
    };
    let gxm = (&g * &xhat)?.mean_keepdim(D::Minus1)?;
    let dx = g
        .sub(&xhat.broadcast_mul(&gxm)?)?
        .broadcast_mul(&rstd)?
        .to_dtype(x.dtype())?;
    let dw = match w {
        Some(w) => Some(sum_rows(&(&dy32 * &xhat)?, c)?.to_dtype(w.dtype())?),
        None => None,
    };
    Ok((dx, dw))
}

/// The next optional parameter's slice. Cannot fail: the callers build their input list with one
/// slice per `Some` parameter and call this once per `Some`, in the same order; no user input
/// decides how many there are.
fn take<'a>(rest: &mut &[&'a [f32]]) -> &'a [f32] {
    let (first, tail) = rest.split_first().expect("one slice per optional tensor");
    *rest = tail;
    first
}

fn add_pair(a: (Vec<f32>, Vec<f32>), b: (Vec<f32>, Vec<f32>)) -> (Vec<f32>, Vec<f32>) {
    (add_vec(a.0, b.0), add_vec(a.1, b.1))
}

fn add_vec(mut a: Vec<f32>, b: Vec<f32>) -> Vec<f32> {
    simd::axpy(&mut a, 1.0, &b);
    a
}

/// Σ over every leading dim: [.., C] -> [C].
fn sum_rows(t: &Tensor, c: usize) -> Result<Tensor> {
    t.reshape(((), c))?.sum(0)
}

fn check_param(name: &str, p: Option<&Tensor>, c: usize) -> Result<()> {
    match p {
        Some(p) if p.dims() != [c] => {
            candle_core::bail!("norm: {name} has shape {:?}, expected [{c}]", p.dims())
        }
        _ => Ok(()),
    }
}

fn check_same(name: &str, t: &Tensor, x: &Tensor) -> Result<()> {
    if t.dims() != x.dims() {
        candle_core::bail!(
            "norm: {name} has shape {:?}, x has {:?}",
            t.dims(),
            x.dims()
        )
    }
    Ok(())
}

fn check_stats(s: &Tensor, n: usize) -> Result<()> {
    if s.elem_count() != n || s.dtype() != DType::F32 {
        candle_core::bail!(
            "norm: statistics have shape {:?} ({:?}), expected {n} f32 values",
            s.dims(),
            s.dtype()
        )
    }
    Ok(())
}

multiversion! {
    #[allow(clippy::too_many_arguments)]
    fn ln_fwd_rows(
        y: &mut [f32],
        x: &[f32],
        mean: &mut [f32],
        rstd: &mut [f32],
        w: Option<&[f32]>,
        b: Option<&[f32]>,
        c: usize,
        eps: f32,
    ) {
        let inv_c = 1.0 / c as f32;
        for (((y, x), m), r) in y.chunks_exact_mut(c).zip(x.chunks_exact(c)).zip(mean).zip(rstd) {
            let mu = simd::sum(x) * inv_c;
            let mut acc = [0f32; simd::LANES];
            let (cx, tx) = x.as_chunks::<{ simd::LANES }>();
            for ch in cx {
                for l in 0..simd::LANES {
                    let d = ch[l] - mu;
                    acc[l] += d * d;
                }
            }
            let tail: f32 = tx.iter().map(|v| (v - mu) * (v - mu)).sum();
            let var = simd::sum(&acc) + tail;
            let rs = 1.0 / (var * inv_c + eps).sqrt();
            *m = mu;
            *r = rs;
            match (w, b) {
                (Some(w), Some(b)) => {
                    for (((y, x), w), b) in y.iter_mut().zip(x).zip(w).zip(b) {
                        *y = (x - mu) * rs * w + b;
                    }
                }
                (Some(w), None) => {
                    for ((y, x), w) in y.iter_mut().zip(x).zip(w) {
                        *y = (x - mu) * rs * w;
                    }
                }
                (None, Some(b)) => {
                    for ((y, x), b) in y.iter_mut().zip(x).zip(b) {
                        *y = (x - mu) * rs + b;
                    }
                }
                (None, None) => {
                    for (y, x) in y.iter_mut().zip(x) {
                        *y = (x - mu) * rs;
                    }
                }
            }
        }
    }
}

multiversion! {
    #[allow(clippy::too_many_arguments)]
    fn ln_bwd_rows(
        dx: &mut [f32],
        x: &[f32],
        dy: &[f32],
        mean: &[f32],
        rstd: &[f32],
        w: Option<&[f32]>,
        dw: &mut [f32],
        db: &mut [f32],
        c: usize,
    ) {
        let inv_c = 1.0 / c as f32;
        for ((((dx, x), dy), &mu), &rs) in dx
            .chunks_exact_mut(c)
            .zip(x.chunks_exact(c))
            .zip(dy.chunks_exact(c))
            .zip(mean)
            .zip(rstd)
        {
            // Σ g and Σ g·x̂ in one pass; g = dy·w is recomputed below rather than stored.
            let (mut sg, mut sgx) = ([0f32; simd::LANES], [0f32; simd::LANES]);
            let (ix, ixt) = x.as_chunks::<{ simd::LANES }>();
            let (idy, idyt) = dy.as_chunks::<{ simd::LANES }>();
            let mut tg = 0f32;
            let mut tgx = 0f32;
            match w {
                Some(w) => {
                    let (iw, iwt) = w.as_chunks::<{ simd::LANES }>();
                    for ((x, dy), w) in ix.iter().zip(idy).zip(iw) {
                        for l in 0..simd::LANES {
                            let g = dy[l] * w[l];
                            sg[l] += g;
                            sgx[l] += g * (x[l] - mu) * rs;
                        }
                    }
                    for ((x, dy), w) in ixt.iter().zip(idyt).zip(iwt) {
                        let g = dy * w;
                        tg += g;
                        tgx += g * (x - mu) * rs;
                    }
                }
                None => {
                    for (x, dy) in ix.iter().zip(idy) {
                        for l in 0..simd::LANES {
                            sg[l] += dy[l];
                            sgx[l] += dy[l] * (x[l] - mu) * rs;
                        }
                    }
                    for (x, dy) in ixt.iter().zip(idyt) {
                        tg += dy;
                        tgx += dy * (x - mu) * rs;
                    }
                }
            }
            let gm = (simd::sum(&sg) + tg) * inv_c;
            let gxm = (simd::sum(&sgx) + tgx) * inv_c;
            match w {
                Some(w) => {
                    for ((((dx, x), dy), w), (dw, db)) in dx
                        .iter_mut()
                        .zip(x)
                        .zip(dy)
                        .zip(w)
                        .zip(dw.iter_mut().zip(db.iter_mut()))
                    {
                        let xh = (x - mu) * rs;
                        *dx = rs * (dy * w - gm - xh * gxm);
                        *dw += dy * xh;
                        *db += dy;
                    }
                }
                None => {
                    for (((dx, x), dy), db) in dx.iter_mut().zip(x).zip(dy).zip(db.iter_mut()) {
                        let xh = (x - mu) * rs;
                        *dx = rs * (dy - gm - xh * gxm);
                        *db += dy;
                    }
                }
            }
        }
    }
}

multiversion! {
    fn rms_fwd_rows(
        y: &mut [f32],
        x: &[f32],
        rstd: &mut [f32],
        w: Option<&[f32]>,
        c: usize,
        eps: f32,
        offset: f32,
    ) {
        let inv_c = 1.0 / c as f32;
        for ((y, x), r) in y.chunks_exact_mut(c).zip(x.chunks_exact(c)).zip(rstd) {
            let rs = 1.0 / (simd::dot(x, x) * inv_c + eps).sqrt();
            *r = rs;
            match w {
                Some(w) => {
                    for ((y, x), w) in y.iter_mut().zip(x).zip(w) {
                        *y = x * rs * (offset + w);
                    }
                }
                None => {
                    for (y, x) in y.iter_mut().zip(x) {
                        *y = x * rs;
                    }
                }
            }
        }
    }
}

multiversion! {
    #[allow(clippy::too_many_arguments)]
    fn rms_bwd_rows(
        dx: &mut [f32],
        x: &[f32],
        dy: &[f32],
        rstd: &[f32],
        w: Option<&[f32]>,
        dw: &mut [f32],
        c: usize,
        offset: f32,
    ) {
        let inv_c = 1.0 / c as f32;
        for (((dx, x), dy), &rs) in dx
            .chunks_exact_mut(c)
            .zip(x.chunks_exact(c))
            .zip(dy.chunks_exact(c))
            .zip(rstd)
        {
            let gxm = match w {
                Some(w) => {
                    let mut acc = [0f32; simd::LANES];
                    let (ix, ixt) = x.as_chunks::<{ simd::LANES }>();
                    let (idy, idyt) = dy.as_chunks::<{ simd::LANES }>();
                    let (iw, iwt) = w.as_chunks::<{ simd::LANES }>();
                    for ((x, dy), w) in ix.iter().zip(idy).zip(iw) {
                        for l in 0..simd::LANES {
                            acc[l] += dy[l] * (offset + w[l]) * x[l];
                        }
                    }
                    let tail: f32 = ixt
                        .iter()
                        .zip(idyt)
                        .zip(iwt)
                        .map(|((x, dy), w)| dy * (offset + w) * x)
                        .sum();
                    (simd::sum(&acc) + tail) * rs * inv_c
                }
                None => simd::dot(dy, x) * rs * inv_c,
            };
            match w {
                Some(w) => {
                    for ((((dx, x), dy), w), dw) in
                        dx.iter_mut().zip(x).zip(dy).zip(w).zip(dw.iter_mut())
                    {
                        let xh = x * rs;
                        *dx = rs * (dy * (offset + w) - xh * gxm);
                        *dw += dy * xh;
                    }
                }
                None => {
                    for ((dx, x), dy) in dx.iter_mut().zip(x).zip(dy) {
                        *dx = rs * (dy - x * rs * gxm);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{close, rand, strided};
    use super::*;
    use candle_core::Var;

    const TOL: f64 = 1e-5;

    /// Autograd of the composed forward (strided input forces it) with loss Σ y · r.
    fn ln_autograd(
        x: &Tensor,
        w: Option<&Tensor>,
        b: Option<&Tensor>,
        r: &Tensor,
    ) -> (Tensor, Tensor, Option<Tensor>, Option<Tensor>) {
        let xv = Var::from_tensor(x).unwrap();
        let wv = w.map(|w| Var::from_tensor(w).unwrap());
        let bv = b.map(|b| Var::from_tensor(b).unwrap());
        let (y, _, _) = layer_norm_fwd(
            &strided(xv.as_tensor()),
            wv.as_ref().map(|v| v.as_tensor()),
            bv.as_ref().map(|v| v.as_tensor()),
            1e-5,
        )
        .unwrap();
        let g = (&y * r).unwrap().sum_all().unwrap().backward().unwrap();
        let grad = |v: &Var| g.get(v.as_tensor()).unwrap().clone();
        (
            y.clone(),
            grad(&xv),
            wv.as_ref().map(grad),
            bv.as_ref().map(grad),
        )
    }

    #[test]
    fn layer_norm_fused_composed_and_autograd_agree() {
        for (n, c, with_w, with_b) in [
            (7, 12, true, true),
            (5, 33, true, false),
            (3, 20, false, true),
            (9, 768, false, false),
            (300, 40, true, true),
        ] {
            let x = rand(&[n, c], 2.0, 1).unwrap().affine(1.0, 0.3).unwrap();
            let w = with_w.then(|| rand(&[c], 1.0, 2).unwrap());
            let b = with_b.then(|| rand(&[c], 1.0, 3).unwrap());
            let r = rand(&[n, c], 1.0, 4).unwrap();
            let (y_ref, dx_ref, dw_ref, db_ref) = ln_autograd(&x, w.as_ref(), b.as_ref(), &r);
            let (y, m, s) = layer_norm_fwd(&x, w.as_ref(), b.as_ref(), 1e-5).unwrap();
            close("y", &y, &y_ref, TOL);
            let (_, mc, sc) = layer_norm_fwd(&strided(&x), w.as_ref(), b.as_ref(), 1e-5).unwrap();
            close("mean", &m, &mc, TOL);
            close("rstd", &s, &sc, TOL);
            for dy in [r.clone(), strided(&r)] {
                let (dx, dw, db) = layer_norm_bwd_opt(&dy, &x, w.as_ref(), &m, &s, with_b).unwrap();
                close("dx", &dx, &dx_ref, TOL);
                assert_eq!(dw.is_some(), with_w);
                assert_eq!(db.is_some(), with_b);
                if let (Some(dw), Some(r)) = (dw, &dw_ref) {
                    close("dw", &dw, r, TOL);
                }
                if let (Some(db), Some(r)) = (db, &db_ref) {
                    close("db", &db, r, TOL);
                }
            }
        }
    }

    #[test]
    fn rms_norm_fused_composed_and_autograd_agree() {
        for (n, c, with_w, offset) in [
            (7, 12, true, 0.0),
            (5, 33, true, 1.0),
            (4, 20, false, 0.0),
            (300, 64, true, 1.0),
        ] {
            let x = rand(&[2, n, c], 2.0, 5).unwrap();
            let w = with_w.then(|| rand(&[c], 1.0, 6).unwrap());
            let r = rand(&[2, n, c], 1.0, 7).unwrap();
            let xv = Var::from_tensor(&x).unwrap();
            let wv = w.as_ref().map(|w| Var::from_tensor(w).unwrap());
            let (y_ref, _) = rms_norm_fwd(
                &strided(xv.as_tensor()),
                wv.as_ref().map(|v| v.as_tensor()),
                1e-6,
                offset,
            )
            .unwrap();
            let g = (&y_ref * &r)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let dx_ref = g.get(xv.as_tensor()).unwrap();
            let (y, s) = rms_norm_fwd(&x, w.as_ref(), 1e-6, offset).unwrap();
            assert_eq!(s.dims(), [2, n]);
            close("y", &y, &y_ref, TOL);
            for dy in [r.clone(), strided(&r)] {
                let (dx, dw) = rms_norm_bwd(&dy, &x, w.as_ref(), &s, offset).unwrap();
                close("dx", &dx, dx_ref, TOL);
                assert_eq!(dw.is_some(), with_w);
                if let (Some(dw), Some(wv)) = (dw, &wv) {
                    close("dw", &dw, g.get(wv.as_tensor()).unwrap(), TOL);
                }
            }
        }
    }

    #[test]
    fn bad_shapes_are_errors() {
        let x = rand(&[3, 4], 1.0, 1).unwrap();
        let w = rand(&[5], 1.0, 2).unwrap();
        assert!(layer_norm_fwd(&x, Some(&w), None, 1e-5).is_err());
        assert!(rms_norm_fwd(&x, Some(&w), 1e-5, 0.0).is_err());
    }
}
