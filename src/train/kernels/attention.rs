//! Causal self-attention, forward and backward: flash-style (keeps the per-row log-sum-exp,
//! recomputes the probabilities in backward) and eager (keeps the probabilities).
//!
//! Shapes: q [B,T,H,hd], k and v [B,T,Hkv,hd] with H a multiple of Hkv (grouped-query
//! attention: query head h reads kv head h / (H/Hkv), as HF's `repeat_kv` lays them out).
//! Scores s = scale · q·k, then softcap (c · tanh(s / c)) when set, then the causal mask and the
//! sliding window (query i sees key j iff j ≤ i and j > i − w), then softmax over j.
//!
//! The fused flash forward keeps one row of scores per thread (T floats) instead of an online
//! softmax over key blocks: the row fits in L1/L2 for any T a CPU trains at, and two passes over
//! it are cheaper than rescaling the output at every block. Its backward runs one task per
//! (batch, kv head): the task owns its kv head's dk/dv rows, loops over the query heads that
//! share them, and so accumulates without races; the task's rows go to the outputs under a lock
//! at the end (the outputs are [B,T,·,hd], so one head's rows are strided).

use std::sync::Mutex;

use candle_core::{DType, Device, IndexOp, Result, Tensor, D};
use rayon::prelude::*;

use super::simd::{self, multiversion};
use super::with_cpu_f32;

/// How scores are formed and masked.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AttnSpec {
    /// Multiplies q·k (usually 1/√hd).
    pub scale: f64,
    /// Sliding window: query i sees key j iff j ≤ i and j > i − w. None: all j ≤ i.
    pub window: Option<usize>,
    /// Soft-capping (Gemma 2): c · tanh(s / c) on the scaled scores, before the mask.
    pub softcap: Option<f64>,
}

/// Flash-style forward: o [B,T,H,hd] (contiguous, so it reshapes to [B,T,H·hd] for free) and
/// the log-sum-exp of each query row's scores, lse [B,H,T] f32.
pub fn attention_fwd(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    spec: &AttnSpec,
) -> Result<(Tensor, Tensor)> {
    let d = Dims::of(q, k, v, spec)?;
    let fused = with_cpu_f32(&[q, k, v], |s| flash_fwd_cpu(s[0], s[1], s[2], &d, spec));
    if let Some((o, lse)) = fused {
        return Ok((
            Tensor::from_vec(o, (d.b, d.t, d.h, d.hd), &Device::Cpu)?,
            Tensor::from_vec(lse, (d.b, d.h, d.t), &Device::Cpu)?,
        ));
    }
    flash_fwd_composed(q, k, v, &d, spec)
}

/// Flash-style backward from the forward's inputs, output and lse: (dq, dk, dv) in the shapes
/// of q, k, v. The probabilities are recomputed per (batch, kv head) (composed: a [H/Hkv,T,T]
/// transient; fused: one row per thread).
pub fn attention_bwd(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    o: &Tensor,
    lse: &Tensor,
    d_o: &Tensor,
    spec: &AttnSpec,
) -> Result<(Tensor, Tensor, Tensor)> {
    let d = Dims::of(q, k, v, spec)?;
    expect_dims("o", o, &[d.b, d.t, d.h, d.hd])?;
    expect_dims("d_o", d_o, &[d.b, d.t, d.h, d.hd])?;
    expect_dims("lse", lse, &[d.b, d.h, d.t])?;
    if lse.dtype() != DType::F32 {
        candle_core::bail!("attention: lse must be f32, got {:?}", lse.dtype())
    }
    let fused = with_cpu_f32(&[q, k, v, o, lse, d_o], |s| {
        flash_bwd_cpu(s[0], s[1], s[2], s[3], s[4], s[5], &d, spec)
    });
    if let Some((dq, dk, dv)) = fused {
        return Ok((
            Tensor::from_vec(dq, q.shape(), &Device::Cpu)?,
            Tensor::from_vec(dk, k.shape(), &Device::Cpu)?,
            Tensor::from_vec(dv, v.shape(), &Device::Cpu)?,
        ));
    }
    flash_bwd_composed(q, k, v, o, lse, d_o, &d, spec)
}

/// Eager forward (HF "eager"): o [B,T,H,hd] and the probabilities [B,H,T,T] in q's dtype,
/// which the backward reads instead of recomputing them.
pub fn attention_eager_fwd(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    spec: &AttnSpec,
) -> Result<(Tensor, Tensor)> {
    let (o, p, _) = attention_eager_fwd_keeping(q, k, v, spec, false)?;
    Ok((o, p))
}

/// `attention_eager_fwd`, also returning tanh(s / c) [B,H,T,T] of a soft-capped attention when
/// `keep_cap_tanh` (HF's eager attention composes the cap, and autograd keeps tanh's output);
/// the backward then reads it instead of recomputing the scores.
pub fn attention_eager_fwd_keeping(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    spec: &AttnSpec,
    keep_cap_tanh: bool,
) -> Result<(Tensor, Tensor, Option<Tensor>)> {
    let d = Dims::of(q, k, v, spec)?;
    let dt = q.dtype();
    let (qh, kh, vh) = heads_f32(q, k, v, &d)?;
    let (s, tt) = scores(&qh, &kh, &mask(d.t, spec.window, q.device())?, spec)?;
    let p = s.broadcast_sub(&logsumexp(&s)?)?.exp()?;
    drop(s);
    let tt = match tt {
        Some(t) if keep_cap_tanh => Some(t.to_dtype(dt)?),
        _ => None,
    };
    let o = p.matmul(&vh)?.transpose(1, 2)?.contiguous()?.to_dtype(dt)?;
    Ok((o, p.to_dtype(dt)?, tt))
}

/// Eager backward from the kept probabilities: (dq, dk, dv). With a softcap, tanh's derivative
/// needs tanh(s / c): `cap_tanh` when the forward kept it, else recomputed from q and k.
pub fn attention_eager_bwd(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    probs: &Tensor,
    cap_tanh: Option<&Tensor>,
    d_o: &Tensor,
    spec: &AttnSpec,
) -> Result<(Tensor, Tensor, Tensor)> {
    let d = Dims::of(q, k, v, spec)?;
    expect_dims("probs", probs, &[d.b, d.h, d.t, d.t])?;
    expect_dims("d_o", d_o, &[d.b, d.t, d.h, d.hd])?;
    let (qh, kh, vh) = heads_f32(q, k, v, &d)?;
    let p = probs.to_dtype(DType::F32)?;
    let doh = d_o.to_dtype(DType::F32)?.transpose(1, 2)?.contiguous()?;
    let dp = doh.matmul(&vh.t()?)?;
    let dd = (&p * &dp)?.sum_keepdim(D::Minus1)?;
    let mut ds = (&p * dp.broadcast_sub(&dd)?)?;
    if spec.softcap.is_some() {
        let tt = match cap_tanh {
            Some(t) => {
                expect_dims("cap_tanh", t, &[d.b, d.h, d.t, d.t])?;
                Some(t.to_dtype(DType::F32)?)
            }
            None => scores(&qh, &kh, &mask(d.t, spec.window, q.device())?, spec)?.1,
        };
        if let Some(tt) = tt {
            ds = (ds * tt.sqr()?.affine(-1.0, 1.0)?)?;
        }
    }
    let dq = (ds.matmul(&kh)? * spec.scale)?;
    let dk = (ds.t()?.matmul(&qh)? * spec.scale)?;
    let dv = p.t()?.matmul(&doh)?;
    let back = |x: Tensor, heads: usize, like: &Tensor| -> Result<Tensor> {
        // [B,H,T,hd] -> (sum over the query heads of a group) -> [B,T,heads,hd]
        let x = if heads == d.h {
            x
        } else {
            x.reshape((d.b, heads, d.g, d.t, d.hd))?.sum(2)?
        };
        x.transpose(1, 2)?.contiguous()?.to_dtype(like.dtype())
    };
    Ok((back(dq, d.h, q)?, back(dk, d.hkv, k)?, back(dv, d.hkv, v)?))
}

/// Shapes of one call, checked.
struct Dims {
    b: usize,
    t: usize,
    h: usize,
    hkv: usize,
    /// Query heads per kv head.
    g: usize,
    hd: usize,
}

impl Dims {
    fn of(q: &Tensor, k: &Tensor, v: &Tensor, spec: &AttnSpec) -> Result<Dims> {
        let (b, t, h, hd) = q.dims4()?;
        let hkv = k.dim(2)?;
        if hkv == 0 || h % hkv != 0 {
            candle_core::bail!("attention: {h} query heads are not a multiple of {hkv} kv heads")
        }
        expect_dims("k", k, &[b, t, hkv, hd])?;
        expect_dims("v", v, &[b, t, hkv, hd])?;
        if spec.window == Some(0) {
            candle_core::bail!("attention: window = 0 would hide every key")
        }
        if !(spec.scale.is_finite()) || spec.softcap.is_some_and(|c| !(c > 0.0 && c.is_finite())) {
            candle_core::bail!(
                "attention: scale = {} / softcap = {:?} must be finite (softcap > 0)",
                spec.scale,
                spec.softcap
            )
        }
        Ok(Dims {
            b,
            t,
            h,
            hkv,
            g: h / hkv,
            hd,
        })
    }

    /// First key query i sees.
    fn first_key(i: usize, window: Option<usize>) -> usize {
        match window {
            Some(w) => (i + 1).saturating_sub(w),
            None => 0,
        }
    }
}

fn expect_dims(name: &str, t: &Tensor, dims: &[usize]) -> Result<()> {
    if t.dims() != dims {
        candle_core::bail!(
            "attention: {name} has shape {:?}, expected {dims:?}",
            t.dims()
        )
    }
    Ok(())
}

/// [T,T] additive mask: 0 where query i sees key j, −∞ elsewhere.
fn mask(t: usize, window: Option<usize>, dev: &Device) -> Result<Tensor> {
    let mut m = vec![f32::NEG_INFINITY; t * t];
    for (i, row) in m.chunks_exact_mut(t.max(1)).enumerate() {
        for x in &mut row[Dims::first_key(i, window)..=i] {
            *x = 0.0;
        }
    }
    Tensor::from_vec(m, (t, t), dev)
}

/// Masked scores [.., T, T] from q [.., T, hd] and k [.., T, hd] (k broadcast over q's leading
/// dims when it has fewer), and tanh(s/c) when there is a softcap (for its derivative).
fn scores(
    q: &Tensor,
    k: &Tensor,
    mask: &Tensor,
    spec: &AttnSpec,
) -> Result<(Tensor, Option<Tensor>)> {
    let mut s = (q.broadcast_matmul(&k.t()?)? * spec.scale)?;
    let mut tt = None;
    if let Some(c) = spec.softcap {
        let t = (s / c)?.tanh()?;
        s = (&t * c)?;
        tt = Some(t);
    }
    Ok((s.broadcast_add(mask)?, tt))
}

/// log Σ_j e^{s_j} over the last dim, kept as a size-1 dim.
fn logsumexp(s: &Tensor) -> Result<Tensor> {
    let m = s.max_keepdim(D::Minus1)?;
    m.broadcast_add(&s.broadcast_sub(&m)?.exp()?.sum_keepdim(D::Minus1)?.log()?)
}

/// q, k, v as f32 [B,H,T,hd], k and v repeated over the query heads of their group.
fn heads_f32(q: &Tensor, k: &Tensor, v: &Tensor, d: &Dims) -> Result<(Tensor, Tensor, Tensor)> {
    let qh = q.to_dtype(DType::F32)?.transpose(1, 2)?.contiguous()?;
    let rep = |x: &Tensor| -> Result<Tensor> {
        x.to_dtype(DType::F32)?
            .transpose(1, 2)?
            .unsqueeze(2)?
            .broadcast_as((d.b, d.hkv, d.g, d.t, d.hd))?
            .reshape((d.b, d.h, d.t, d.hd))
    };
    Ok((qh, rep(k)?, rep(v)?))
}

/// The query heads of kv head j in batch b: [g, T, hd] f32.
fn group(x: &Tensor, b: usize, j: usize, g: usize) -> Result<Tensor> {
    x.i(b)?.narrow(1, j * g, g)?.transpose(0, 1)?.contiguous()
}

fn flash_fwd_composed(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    d: &Dims,
    spec: &AttnSpec,
) -> Result<(Tensor, Tensor)> {
    let (q32, k32, v32) = (
        q.to_dtype(DType::F32)?,
        k.to_dtype(DType::F32)?,
        v.to_dtype(DType::F32)?,
    );
    let mask = mask(d.t, spec.window, q.device())?;
    let (mut o_b, mut lse_b) = (Vec::with_capacity(d.b), Vec::with_capacity(d.b));
    for b in 0..d.b {
        let (mut o_h, mut lse_h) = (Vec::with_capacity(d.hkv), Vec::with_capacity(d.hkv));
        for j in 0..d.hkv {
            let qg = group(&q32, b, j, d.g)?;
            let kj = k32.i((b, .., j))?.contiguous()?;
            let vj = v32.i((b, .., j))?.contiguous()?;
            let (s, _) = scores(&qg, &kj, &mask, spec)?;
            let lse = logsumexp(&s)?;
            let p = s.broadcast_sub(&lse)?.exp()?;
            o_h.push(p.broadcast_matmul(&vj)?);
            lse_h.push(lse.squeeze(2)?);
        }
        o_b.push(Tensor::cat(&o_h, 0)?.transpose(0, 1)?);
        lse_b.push(Tensor::cat(&lse_h, 0)?);
    }
    let o = Tensor::stack(&o_b, 0)?.contiguous()?.to_dtype(q.dtype())?;
    Ok((o, Tensor::stack(&lse_b, 0)?.contiguous()?))
}

#[allow(clippy::too_many_arguments)]
fn flash_bwd_composed(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    o: &Tensor,
    lse: &Tensor,
    d_o: &Tensor,
    d: &Dims,
    spec: &AttnSpec,
) -> Result<(Tensor, Tensor, Tensor)> {
    let f = |x: &Tensor| x.to_dtype(DType::F32);
    let (q32, k32, v32, o32, do32) = (f(q)?, f(k)?, f(v)?, f(o)?, f(d_o)?);
    let mask = mask(d.t, spec.window, q.device())?;
    let (mut dq_b, mut dk_b, mut dv_b) = (Vec::new(), Vec::new(), Vec::new());
    for b in 0..d.b {
        let (mut dq_h, mut dk_h, mut dv_h) = (Vec::new(), Vec::new(), Vec::new());
        for j in 0..d.hkv {
            let qg = group(&q32, b, j, d.g)?;
            let og = group(&o32, b, j, d.g)?;
            let dog = group(&do32, b, j, d.g)?;
            let kj = k32.i((b, .., j))?.contiguous()?;
            let vj = v32.i((b, .., j))?.contiguous()?;
            let lse_g = lse.i(b)?.narrow(0, j * d.g, d.g)?.unsqueeze(2)?;
            let (s, tt) = scores(&qg, &kj, &mask, spec)?;
            let p = s.broadcast_sub(&lse_g)?.exp()?;
            let dd = (&dog * &og)?.sum_keepdim(2)?;
            let dp = dog.broadcast_matmul(&vj.t()?)?;
            let mut ds = (&p * dp.broadcast_sub(&dd)?)?;
            if let Some(tt) = tt {
                ds = (ds * tt.sqr()?.affine(-1.0, 1.0)?)?;
            }
            dq_h.push((ds.broadcast_matmul(&kj)? * spec.scale)?);
            dk_h.push((ds.transpose(1, 2)?.matmul(&qg)?.sum(0)? * spec.scale)?);
            dv_h.push(p.transpose(1, 2)?.matmul(&dog)?.sum(0)?);
        }
        dq_b.push(Tensor::cat(&dq_h, 0)?.transpose(0, 1)?);
        dk_b.push(Tensor::stack(&dk_h, 1)?);
        dv_b.push(Tensor::stack(&dv_h, 1)?);
    }
    let out = |xs: Vec<Tensor>, like: &Tensor| -> Result<Tensor> {
        Tensor::stack(&xs, 0)?.contiguous()?.to_dtype(like.dtype())
    };
    Ok((out(dq_b, q)?, out(dk_b, k)?, out(dv_b, v)?))
}

// ---------------------------------------------------------------------------------------------
// Fused CPU f32
//
// Query rows go through in blocks of QB, so that each key or value loaded serves QB rows and
// the accumulators stay in registers, as in a gemm micro-kernel: scores of a block are
// Σ_d q[d] · Kᵀ[d][keys] over a transposed copy of its keys (vectors run over contiguous keys,
// no horizontal sums); P·V and dq are Σ_j p[j] · v_j over 16-wide slices of hd; dk and dv get
// a rank-QB update per key. Rows a block does not see (causal, window, past the end) get p = 0.

/// Query rows per register block.
const QB: usize = 4;
const L: usize = simd::LANES;
/// Query positions per forward task: enough rows to amortise transposing their keys.
const ROWS_PER_TASK: usize = 32;

/// The scalar parameters of the score function, as f32.
#[derive(Clone, Copy)]
struct Params {
    scale: f32,
    /// 0: no softcap.
    cap: f32,
}

impl Params {
    fn of(spec: &AttnSpec) -> Params {
        Params {
            scale: spec.scale as f32,
            cap: spec.softcap.map_or(0.0, |c| c as f32),
        }
    }
}

/// The rows of kv head `kvh` for keys jlo..jhi in a [T, Hkv, hd] slice.
fn kv_rows(
    kb: &[f32],
    kvh: usize,
    hkv: usize,
    hd: usize,
    jlo: usize,
    jhi: usize,
) -> impl Iterator<Item = &[f32]> {
    kb.chunks_exact(hd)
        .skip(kvh)
        .step_by(hkv)
        .skip(jlo)
        .take(jhi - jlo)
}

/// kt[d·w + (j − jlo)] = k[j, kvh, d] for keys jlo..jhi, w = jhi − jlo, through 16×16 tiles
/// held in a local array (contiguous loads and stores on both sides).
fn transpose_rows(
    kt: &mut [f32],
    kb: &[f32],
    kvh: usize,
    hkv: usize,
    hd: usize,
    jlo: usize,
    jhi: usize,
) {
    let w = jhi - jlo;
    let stride = hkv * hd;
    let src = &kb[jlo * stride + kvh * hd..];
    for j0 in (0..w).step_by(L) {
        let nj = L.min(w - j0);
        for d0 in (0..hd).step_by(L) {
            let nd = L.min(hd - d0);
            let mut tile = [[0f32; L]; L];
            for (jj, t) in tile.iter_mut().enumerate().take(nj) {
                let at = (j0 + jj) * stride + d0;
                t[..nd].copy_from_slice(&src[at..at + nd]);
            }
            for dd in 0..nd {
                let at = (d0 + dd) * w + j0;
                for (x, t) in kt[at..at + nj].iter_mut().zip(&tile) {
                    *x = t[dd];
                }
            }
        }
    }
}

/// rows[(j − jlo)·hd + d] = k[j, kvh, d] for keys jlo..jhi.
fn copy_rows(
    rows: &mut [f32],
    kb: &[f32],
    kvh: usize,
    hkv: usize,
    hd: usize,
    jlo: usize,
    jhi: usize,
) {
    for (dst, kj) in rows
        .chunks_exact_mut(hd)
        .zip(kv_rows(kb, kvh, hkv, hd, jlo, jhi))
    {
        dst.copy_from_slice(kj);
    }
}

/// out[r·w + j] = Σ_d at[d][r] · bt[d·bw + off + j], j < w: QB rows of scores (or of dP).
#[inline(always)]
fn mm_t(out: &mut [f32], at: &[[f32; QB]], bt: &[f32], bw: usize, off: usize, w: usize) {
    let full = w / L * L;
    let mut j = 0;
    while j < full {
        let mut acc = [[0f32; L]; QB];
        for (a, bd) in at.iter().zip(bt.chunks_exact(bw)) {
            let b = lanes(&bd[off + j..]);
            for r in 0..QB {
                for l in 0..L {
                    acc[r][l] += a[r] * b[l];
                }
            }
        }
        for (r, acc) in acc.iter().enumerate() {
            out[r * w + j..r * w + j + L].copy_from_slice(acc);
        }
        j += L;
    }
    for j in full..w {
        let mut acc = [0f32; QB];
        for (a, bd) in at.iter().zip(bt.chunks_exact(bw)) {
            let b = bd[off + j];
            for r in 0..QB {
                acc[r] += a[r] * b;
            }
        }
        for (r, acc) in acc.iter().enumerate() {
            out[r * w + j] = *acc;
        }
    }
}

/// out[r·hd + c] = Σ_j coef[j][r] · rows[j·hd + c]: QB rows of P·V (or of dS·K).
#[inline(always)]
fn mm_n(out: &mut [f32], coef: &[[f32; QB]], rows: &[f32], hd: usize) {
    let full = hd / L * L;
    let mut c = 0;
    while c < full {
        let mut acc = [[0f32; L]; QB];
        for (cf, row) in coef.iter().zip(rows.chunks_exact(hd)) {
            let b = lanes(&row[c..]);
            for r in 0..QB {
                for l in 0..L {
                    acc[r][l] += cf[r] * b[l];
                }
            }
        }
        for (r, acc) in acc.iter().enumerate() {
            out[r * hd + c..r * hd + c + L].copy_from_slice(acc);
        }
        c += L;
    }
    for c in full..hd {
        let mut acc = [0f32; QB];
        for (cf, row) in coef.iter().zip(rows.chunks_exact(hd)) {
            for r in 0..QB {
                acc[r] += cf[r] * row[c];
            }
        }
        for (r, acc) in acc.iter().enumerate() {
            out[r * hd + c] = *acc;
        }
    }
}

/// rows[j·hd + c] += Σ_r coef[j][r] · vecs[r·hd + c]: a rank-QB update of dk (or dv) rows.
#[inline(always)]
fn outer(rows: &mut [f32], coef: &[[f32; QB]], vecs: &[f32], hd: usize) {
    let full = hd / L * L;
    for (row, cf) in rows.chunks_exact_mut(hd).zip(coef) {
        let mut c = 0;
        while c < full {
            let mut acc = *lanes(&row[c..]);
            for r in 0..QB {
                let v = lanes(&vecs[r * hd + c..]);
                for l in 0..L {
                    acc[l] += cf[r] * v[l];
                }
            }
            row[c..c + L].copy_from_slice(&acc);
            c += L;
        }
        for c in full..hd {
            for r in 0..QB {
                row[c] += cf[r] * vecs[r * hd + c];
            }
        }
    }
}

/// cols[j][r] = rows[r·w + j]: QB rows of width w to w columns of QB.
#[inline(always)]
fn to_columns(cols: &mut [[f32; QB]], rows: &[f32], w: usize) {
    for (j, c) in cols.iter_mut().enumerate().take(w) {
        for (r, x) in c.iter_mut().enumerate() {
            *x = rows[r * w + j];
        }
    }
}

/// The first L elements of `x` as an array. Cannot fail: every caller walks only the full
/// L-wide lanes of a row (`c < width / L * L`, the tail handled apart), so at least L elements
/// remain whatever the user's shapes.
#[inline(always)]
fn lanes(x: &[f32]) -> &[f32; L] {
    x.first_chunk::<L>().expect("a full lane of elements")
}

/// Scratch of one forward task.
struct FwdScratch {
    /// This head's keys transposed, [hd, W].
    kt: Vec<f32>,
    /// Its values as rows, [W, hd].
    vrows: Vec<f32>,
    /// QB rows of scores.
    s: Vec<f32>,
    /// Probabilities transposed: p[j][r].
    pt: Vec<[f32; QB]>,
    /// Scaled queries transposed: q[d][r].
    qt: Vec<[f32; QB]>,
    /// QB output rows.
    oblk: Vec<f32>,
}

fn flash_fwd_cpu(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    d: &Dims,
    spec: &AttnSpec,
) -> (Vec<f32>, Vec<f32>) {
    let (t, h, hd) = (d.t, d.h, d.hd);
    let mut o = vec![0f32; q.len()];
    // Per (b, t, h) first, in o's order; transposed to [B,H,T] below (B·H·T floats).
    let mut lse_bth = vec![0f32; d.b * t * h];
    let kv_len = t * d.hkv * hd;
    let rb = ROWS_PER_TASK;
    let p = Params::of(spec);
    o.par_chunks_mut(t * h * hd)
        .zip(lse_bth.par_chunks_mut(t * h))
        .zip(q.par_chunks(t * h * hd))
        .enumerate()
        .flat_map(|(b, ((ob, lb), qb))| {
            ob.par_chunks_mut(rb * h * hd)
                .zip(lb.par_chunks_mut(rb * h))
                .zip(qb.par_chunks(rb * h * hd))
                .enumerate()
                .map(move |(blk, x)| (b, blk, x))
        })
        .for_each_init(
            || FwdScratch {
                kt: vec![0f32; t * hd],
                vrows: vec![0f32; t * hd],
                s: vec![0f32; QB * t],
                pt: vec![[0f32; QB]; t],
                qt: vec![[0f32; QB]; hd],
                oblk: vec![0f32; QB * hd],
            },
            |sc, (b, blk, ((o, lse), q))| {
                let kb = &k[b * kv_len..(b + 1) * kv_len];
                let vb = &v[b * kv_len..(b + 1) * kv_len];
                let i0 = blk * rb;
                let i1 = i0 + lse.len() / h;
                let jlo = Dims::first_key(i0, spec.window);
                let mut loaded = usize::MAX;
                for head in 0..h {
                    let kvh = head / d.g;
                    if kvh != loaded {
                        transpose_rows(&mut sc.kt, kb, kvh, d.hkv, hd, jlo, i1);
                        copy_rows(&mut sc.vrows, vb, kvh, d.hkv, hd, jlo, i1);
                        loaded = kvh;
                    }
                    for s0 in (i0..i1).step_by(QB) {
                        let nr = QB.min(i1 - s0);
                        let at = (s0 - i0) * h * hd + head * hd;
                        let blk = FwdBlock {
                            s0,
                            nr,
                            jlo,
                            w_all: i1 - jlo,
                            h,
                            hd,
                            window: spec.window,
                        };
                        let lse_at = (s0 - i0) * h + head;
                        fwd_block(sc, &q[at..], &mut o[at..], &mut lse[lse_at..], blk, p);
                    }
                }
            },
        );
    let mut lse = vec![0f32; lse_bth.len()];
    for (src, dst) in lse_bth.chunks_exact(t * h).zip(lse.chunks_exact_mut(h * t)) {
        for (i, row) in src.chunks_exact(h).enumerate() {
            for (hh, &x) in row.iter().enumerate() {
                dst[hh * t + i] = x;
            }
        }
    }
    (o, lse)
}

/// Where a forward block sits.
#[derive(Clone, Copy)]
struct FwdBlock {
    /// First query position of the block, and how many rows are real (≤ QB).
    s0: usize,
    nr: usize,
    /// First key gathered in the scratch, and how many were.
    jlo: usize,
    w_all: usize,
    h: usize,
    hd: usize,
    window: Option<usize>,
}

multiversion! {
    /// QB query rows of one head: q and o start at the block's first row, rows H·hd apart;
    /// lse starts at its first entry, entries H apart.
    fn fwd_block(sc: &mut FwdScratch, q: &[f32], o: &mut [f32], lse: &mut [f32], blk: FwdBlock, p: Params) {
        let FwdBlock { s0, nr, jlo, w_all, h, hd, window } = blk;
        // Keys a..e (relative to jlo) cover every row of the block.
        let a = Dims::first_key(s0, window) - jlo;
        let e = s0 + nr - jlo;
        let w = e - a;
        for (dd, qt) in sc.qt.iter_mut().enumerate() {
            for (r, x) in qt.iter_mut().enumerate() {
                *x = if r < nr { q[r * h * hd + dd] * p.scale } else { 0.0 };
            }
        }
        mm_t(&mut sc.s, &sc.qt, &sc.kt, w_all, a, w);
        for r in 0..QB {
            let row = &mut sc.s[r * w..(r + 1) * w];
            if r >= nr {
                row.fill(0.0);
                continue;
            }
            let i = s0 + r;
            // Row i sees keys lo..hi of the block's a..e.
            let lo = Dims::first_key(i, window) - jlo - a;
            let hi = i + 1 - jlo - a;
            row[..lo].fill(0.0);
            row[hi..].fill(0.0);
            let s = &mut row[lo..hi];
            if p.cap > 0.0 {
                let inv = 1.0 / p.cap;
                for x in s.iter_mut() {
                    *x = p.cap * simd::tanh(*x * inv);
                }
            }
            let m = simd::max(s);
            for x in s.iter_mut() {
                *x = simd::exp(*x - m);
            }
            let z = simd::sum(s);
            let inv_z = 1.0 / z;
            for x in s.iter_mut() {
                *x *= inv_z;
            }
            lse[r * h] = m + z.ln();
        }
        let pt = &mut sc.pt[..w];
        to_columns(pt, &sc.s, w);
        let vrows = &sc.vrows[a * hd..e * hd];
        mm_n(&mut sc.oblk, pt, vrows, hd);
        for r in 0..nr {
            o[r * h * hd..r * h * hd + hd].copy_from_slice(&sc.oblk[r * hd..(r + 1) * hd]);
        }
    }
}

/// One backward task's accumulators and scratch: kv head `kvh` of batch `b`.
struct BwdScratch {
    /// dq of the group's heads, [g, T, hd]; dk and dv of the kv head, [T, hd].
    dq: Vec<f32>,
    dk: Vec<f32>,
    dv: Vec<f32>,
    /// Keys and values transposed [hd, T]; keys as rows [T, hd].
    kt: Vec<f32>,
    vt: Vec<f32>,
    krows: Vec<f32>,
    /// QB rows of scores and of dP.
    s: Vec<f32>,
    dp: Vec<f32>,
    /// p and dS transposed: [j][r].
    pt: Vec<[f32; QB]>,
    dst: Vec<[f32; QB]>,
    /// Scaled q and dO transposed: [d][r].
    qt: Vec<[f32; QB]>,
    dot: Vec<[f32; QB]>,
    /// QB rows of q, of dO, and the block's dq.
    qrows: Vec<f32>,
    dorows: Vec<f32>,
    dqblk: Vec<f32>,
}

/// The saved tensors of one batch entry, [T, H, hd] each, and its lse [H, T].
#[derive(Clone, Copy)]
struct BwdIn<'a> {
    q: &'a [f32],
    o: &'a [f32],
    d_o: &'a [f32],
    lse: &'a [f32],
}

#[allow(clippy::too_many_arguments)]
fn flash_bwd_cpu(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    o: &[f32],
    lse: &[f32],
    d_o: &[f32],
    d: &Dims,
    spec: &AttnSpec,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let (t, h, hkv, g, hd) = (d.t, d.h, d.hkv, d.g, d.hd);
    let out = Mutex::new((
        vec![0f32; q.len()],
        vec![0f32; k.len()],
        vec![0f32; v.len()],
    ));
    let p = Params::of(spec);
    let (q_len, kv_len) = (t * h * hd, t * hkv * hd);
    (0..d.b * hkv).into_par_iter().for_each(|task| {
        let (b, kvh) = (task / hkv, task % hkv);
        let mut sc = BwdScratch {
            dq: vec![0f32; g * t * hd],
            dk: vec![0f32; t * hd],
            dv: vec![0f32; t * hd],
            kt: vec![0f32; t * hd],
            vt: vec![0f32; t * hd],
            krows: vec![0f32; t * hd],
            s: vec![0f32; QB * t],
            dp: vec![0f32; QB * t],
            pt: vec![[0f32; QB]; t],
            dst: vec![[0f32; QB]; t],
            qt: vec![[0f32; QB]; hd],
            dot: vec![[0f32; QB]; hd],
            qrows: vec![0f32; QB * hd],
            dorows: vec![0f32; QB * hd],
            dqblk: vec![0f32; QB * hd],
        };
        let kb = &k[b * kv_len..(b + 1) * kv_len];
        let vb = &v[b * kv_len..(b + 1) * kv_len];
        transpose_rows(&mut sc.kt, kb, kvh, hkv, hd, 0, t);
        copy_rows(&mut sc.krows, kb, kvh, hkv, hd, 0, t);
        transpose_rows(&mut sc.vt, vb, kvh, hkv, hd, 0, t);
        let inp = BwdIn {
            q: &q[b * q_len..(b + 1) * q_len],
            o: &o[b * q_len..(b + 1) * q_len],
            d_o: &d_o[b * q_len..(b + 1) * q_len],
            lse: &lse[b * h * t..(b + 1) * h * t],
        };
        for hh in 0..g {
            for s0 in (0..t).step_by(QB) {
                let blk = BwdBlock {
                    s0,
                    nr: QB.min(t - s0),
                    hh,
                    head: kvh * g + hh,
                    t,
                    h,
                    hd,
                    window: spec.window,
                };
                bwd_block(&mut sc, inp, blk, p);
            }
        }
        // Hand the task's rows to the strided outputs.
        let mut guard = out.lock().unwrap_or_else(|e| e.into_inner());
        let (dq, dk, dv) = &mut *guard;
        for hh in 0..g {
            let head = kvh * g + hh;
            let dst = dq[b * q_len..(b + 1) * q_len]
                .chunks_exact_mut(hd)
                .skip(head)
                .step_by(h);
            for (dst, src) in dst.zip(sc.dq[hh * t * hd..(hh + 1) * t * hd].chunks_exact(hd)) {
                dst.copy_from_slice(src);
            }
        }
        for (dst, src) in [(dk, &sc.dk), (dv, &sc.dv)] {
            let dst = dst[b * kv_len..(b + 1) * kv_len]
                .chunks_exact_mut(hd)
                .skip(kvh)
                .step_by(hkv);
            for (dst, src) in dst.zip(src.chunks_exact(hd)) {
                dst.copy_from_slice(src);
            }
        }
    });
    out.into_inner().unwrap_or_else(|e| e.into_inner())
}

/// Where a backward block sits.
#[derive(Clone, Copy)]
struct BwdBlock {
    s0: usize,
    nr: usize,
    /// Index of the head within its group, and overall.
    hh: usize,
    head: usize,
    t: usize,
    h: usize,
    hd: usize,
    window: Option<usize>,
}

multiversion! {
    /// QB query rows of one head: P from the saved lse, dS = P(dP − D) with D = dO·O (times
    /// tanh' under a softcap, times scale); then dq of the rows, and dk, dv of the keys they see.
    fn bwd_block(sc: &mut BwdScratch, inp: BwdIn<'_>, blk: BwdBlock, p: Params) {
        let BwdBlock { s0, nr, hh, head, t, h, hd, window } = blk;
        let a = Dims::first_key(s0, window);
        let e = s0 + nr;
        let w = e - a;
        // Row r of the block in a [T, H, hd] slice.
        let row = |r: usize| ((s0 + r) * h + head) * hd..((s0 + r) * h + head + 1) * hd;
        let mut dd = [0f32; QB];
        for (r, ddr) in dd.iter_mut().enumerate() {
            let (qr, dor) = (&mut sc.qrows[r * hd..(r + 1) * hd], &mut sc.dorows[r * hd..(r + 1) * hd]);
            if r < nr {
                qr.copy_from_slice(&inp.q[row(r)]);
                dor.copy_from_slice(&inp.d_o[row(r)]);
                *ddr = simd::dot(dor, &inp.o[row(r)]);
            } else {
                qr.fill(0.0);
                dor.fill(0.0);
            }
        }
        for (dd_, (qt, dot)) in sc.qt.iter_mut().zip(sc.dot.iter_mut()).enumerate() {
            for r in 0..QB {
                qt[r] = sc.qrows[r * hd + dd_] * p.scale;
                dot[r] = sc.dorows[r * hd + dd_];
            }
        }
        mm_t(&mut sc.s, &sc.qt, &sc.kt, t, a, w);
        mm_t(&mut sc.dp, &sc.dot, &sc.vt, t, a, w);
        let inv = if p.cap > 0.0 { 1.0 / p.cap } else { 0.0 };
        // p into s's rows and dS into dp's rows, in place (contiguous, so vectorised), then
        // transposed for the micro-kernels.
        for (r, &ddr) in dd.iter().enumerate() {
            let (srow, dprow) = (&mut sc.s[r * w..(r + 1) * w], &mut sc.dp[r * w..(r + 1) * w]);
            if r >= nr {
                srow.fill(0.0);
                dprow.fill(0.0);
                continue;
            }
            let i = s0 + r;
            let lo = Dims::first_key(i, window) - a;
            let hi = i + 1 - a;
            for x in [&mut *srow, &mut *dprow] {
                x[..lo].fill(0.0);
                x[hi..].fill(0.0);
            }
            let lse = inp.lse[head * t + i];
            let pairs = srow[lo..hi].iter_mut().zip(dprow[lo..hi].iter_mut());
            if p.cap > 0.0 {
                for (sj, dpj) in pairs {
                    let th = simd::tanh(*sj * inv);
                    let pv = simd::exp(p.cap * th - lse);
                    *sj = pv;
                    *dpj = pv * (*dpj - ddr) * (1.0 - th * th) * p.scale;
                }
            } else {
                for (sj, dpj) in pairs {
                    let pv = simd::exp(*sj - lse);
                    *sj = pv;
                    *dpj = pv * (*dpj - ddr) * p.scale;
                }
            }
        }
        let (pt, dst) = (&mut sc.pt[..w], &mut sc.dst[..w]);
        to_columns(pt, &sc.s, w);
        to_columns(dst, &sc.dp, w);
        mm_n(&mut sc.dqblk, dst, &sc.krows[a * hd..e * hd], hd);
        for r in 0..nr {
            let at = (hh * t + s0 + r) * hd;
            sc.dq[at..at + hd].copy_from_slice(&sc.dqblk[r * hd..(r + 1) * hd]);
        }
        outer(&mut sc.dk[a * hd..e * hd], dst, &sc.qrows, hd);
        outer(&mut sc.dv[a * hd..e * hd], pt, &sc.dorows, hd);
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{close, rand, strided};
    use super::*;
    use candle_core::Var;

    const TOL: f64 = 1e-5;

    /// Attention written as HF's eager path does it, from candle ops that all have a backward
    /// (candle-nn's composed softmax), independent of this file's code.
    fn reference(q: &Tensor, k: &Tensor, v: &Tensor, spec: &AttnSpec) -> Tensor {
        let (b, t, h, hd) = q.dims4().unwrap();
        let hkv = k.dim(2).unwrap();
        let rep = |x: &Tensor| {
            x.transpose(1, 2)
                .unwrap()
                .unsqueeze(2)
                .unwrap()
                .broadcast_as((b, hkv, h / hkv, t, hd))
                .unwrap()
                .reshape((b, h, t, hd))
                .unwrap()
        };
        let qh = q.transpose(1, 2).unwrap().contiguous().unwrap();
        let mut s = (qh.matmul(&rep(k).t().unwrap()).unwrap() * spec.scale).unwrap();
        if let Some(c) = spec.softcap {
            s = ((s / c).unwrap().tanh().unwrap() * c).unwrap();
        }
        let mut m = vec![0f32; t * t];
        for i in 0..t {
            for j in 0..t {
                let seen = j <= i && spec.window.is_none_or(|w| j + w > i);
                m[i * t + j] = if seen { 0.0 } else { f32::NEG_INFINITY };
            }
        }
        let m = Tensor::from_vec(m, (t, t), &Device::Cpu).unwrap();
        let p = candle_nn::ops::softmax(&s.broadcast_add(&m).unwrap(), D::Minus1).unwrap();
        p.matmul(&rep(v)).unwrap().transpose(1, 2).unwrap()
    }

    fn cases() -> Vec<([usize; 5], AttnSpec)> {
        let spec = |hd: usize, window, softcap| AttnSpec {
            scale: 1.0 / (hd as f64).sqrt(),
            window,
            softcap,
        };
        vec![
            // [B, T, H, Hkv, hd]
            ([2, 7, 4, 1, 12], spec(12, None, None)),
            ([1, 7, 4, 4, 12], spec(12, Some(3), None)),
            ([2, 9, 8, 2, 12], spec(12, None, Some(2.0))),
            ([1, 13, 4, 1, 20], spec(20, Some(5), Some(1.5))),
            ([2, 33, 2, 2, 64], spec(64, None, None)),
            ([1, 40, 6, 3, 17], spec(17, Some(40), Some(3.0))),
        ]
    }

    #[test]
    fn flash_and_eager_fused_composed_and_autograd_agree() {
        for ([b, t, h, hkv, hd], spec) in cases() {
            let what = format!("B={b} T={t} H={h} Hkv={hkv} hd={hd} {spec:?}");
            // q scaled up so that the softcap's tanh is far from linear.
            let q = rand(&[b, t, h, hd], 3.0, 31).unwrap();
            let k = rand(&[b, t, hkv, hd], 1.0, 32).unwrap();
            let v = rand(&[b, t, hkv, hd], 1.0, 33).unwrap();
            let r = rand(&[b, t, h, hd], 1.0, 34).unwrap();
            let (qv, kv, vv) = (
                Var::from_tensor(&q).unwrap(),
                Var::from_tensor(&k).unwrap(),
                Var::from_tensor(&v).unwrap(),
            );
            let o_ref = reference(qv.as_tensor(), kv.as_tensor(), vv.as_tensor(), &spec);
            let g = (&o_ref * &r)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let grads = [&qv, &kv, &vv].map(|x| g.get(x.as_tensor()).unwrap().clone());

            let (o, lse) = attention_fwd(&q, &k, &v, &spec).unwrap();
            let (oc, lsec) = attention_fwd(&strided(&q), &k, &v, &spec).unwrap();
            close(&format!("o fused {what}"), &o, &o_ref, TOL);
            close(&format!("o composed {what}"), &oc, &o_ref, TOL);
            close(&format!("lse {what}"), &lse, &lsec, TOL);
            assert!(o.is_contiguous() && oc.is_contiguous() && lse.dims() == [b, h, t]);

            for (label, dout) in [("fused", r.clone()), ("composed", strided(&r))] {
                let (dq, dk, dv) = attention_bwd(&q, &k, &v, &o, &lse, &dout, &spec).unwrap();
                for (name, x, want) in [
                    ("dq", &dq, &grads[0]),
                    ("dk", &dk, &grads[1]),
                    ("dv", &dv, &grads[2]),
                ] {
                    close(&format!("{name} {label} {what}"), x, want, TOL);
                    assert!(x.is_contiguous());
                }
            }

            let (oe, probs) = attention_eager_fwd(&q, &k, &v, &spec).unwrap();
            close(&format!("o eager {what}"), &oe, &o_ref, TOL);
            assert_eq!(probs.dims(), [b, h, t, t]);
            let (_, _, cap_tanh) = attention_eager_fwd_keeping(&q, &k, &v, &spec, true).unwrap();
            assert_eq!(cap_tanh.is_some(), spec.softcap.is_some(), "{what}");
            // Recomputed and kept tanh(s / c) give the same gradients.
            for (how, kept) in [("recomputed", None), ("kept", cap_tanh.as_ref())] {
                let (dq, dk, dv) =
                    attention_eager_bwd(&q, &k, &v, &probs, kept, &r, &spec).unwrap();
                for (name, x, want) in [
                    ("dq", &dq, &grads[0]),
                    ("dk", &dk, &grads[1]),
                    ("dv", &dv, &grads[2]),
                ] {
                    close(&format!("{name} eager ({how} cap) {what}"), x, want, TOL);
                }
            }
        }
    }

    #[test]
    fn lse_is_the_log_normaliser_of_the_visible_scores() {
        // T = 3, one head, hd = 1: scores are q_i·k_j, written out by hand.
        let q = Tensor::new(&[1f32, 2.0, -1.0], &Device::Cpu)
            .unwrap()
            .reshape((1, 3, 1, 1))
            .unwrap();
        let k = Tensor::new(&[0.5f32, -1.0, 3.0], &Device::Cpu)
            .unwrap()
            .reshape((1, 3, 1, 1))
            .unwrap();
        let v = k.clone();
        let spec = AttnSpec {
            scale: 1.0,
            window: Some(2),
            softcap: None,
        };
        let (_, lse) = attention_fwd(&q, &k, &v, &spec).unwrap();
        let lse = lse.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let want = [
            0.5f64,
            (1f64.exp() + (-2f64).exp()).ln(),
            (1f64.exp() + (-3f64).exp()).ln(),
        ];
        for (a, b) in lse.iter().zip(want) {
            assert!((*a as f64 - b).abs() < 1e-6, "{lse:?} vs {want:?}");
        }
    }

    #[test]
    fn bad_shapes_are_errors() {
        let q = rand(&[1, 4, 3, 8], 1.0, 1).unwrap();
        let k = rand(&[1, 4, 2, 8], 1.0, 2).unwrap();
        let spec = AttnSpec {
            scale: 1.0,
            window: None,
            softcap: None,
        };
        assert!(attention_fwd(&q, &k, &k, &spec).is_err());
        let spec0 = AttnSpec {
            window: Some(0),
            ..spec
        };
        assert!(attention_fwd(&q, &q, &q, &spec0).is_err());
    }
}
