//! The lean step's elementwise, norm, attention and loss ops composed from candle ops, with the
//! signatures of the fused kernels (`super::kernels`). Statistics (mean, rstd, lse) are f32.

use candle_core::{DType, Result, Tensor, D};

/// Target id of rows that take no part in the loss (the last position of each sequence).
pub const IGNORE_INDEX: u32 = u32::MAX;

fn f32(x: &Tensor) -> Result<Tensor> {
    x.to_dtype(DType::F32)
}

/// Sum over rows: `[N, C]` -> `[C]`.
fn col_sum(x: &Tensor) -> Result<Tensor> {
    x.sum(0)
}

pub fn layer_norm_fwd(
    x: &Tensor,
    w: Option<&Tensor>,
    b: Option<&Tensor>,
    eps: f64,
) -> Result<(Tensor, Tensor, Tensor)> {
    let dtype = x.dtype();
    let xf = f32(x)?;
    let mean = xf.mean_keepdim(D::Minus1)?;
    let xc = xf.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
    let std = (var + eps)?.sqrt()?;
    let mut y = xc.broadcast_div(&std)?.to_dtype(dtype)?;
    if let Some(w) = w {
        y = y.broadcast_mul(w)?;
    }
    if let Some(b) = b {
        y = y.broadcast_add(b)?;
    }
    Ok((y, mean.squeeze(1)?, std.recip()?.squeeze(1)?))
}

pub fn layer_norm_bwd(
    dy: &Tensor,
    x: &Tensor,
    w: Option<&Tensor>,
    mean: &Tensor,
    rstd: &Tensor,
) -> Result<(Tensor, Option<Tensor>, Option<Tensor>)> {
    let dtype = x.dtype();
    let (mean, rstd) = (mean.unsqueeze(1)?, rstd.unsqueeze(1)?);
    let xhat = f32(x)?.broadcast_sub(&mean)?.broadcast_mul(&rstd)?;
    let dyf = f32(dy)?;
    let g = match w {
        Some(w) => dyf.broadcast_mul(&f32(w)?)?,
        None => dyf.clone(),
    };
    let m1 = g.mean_keepdim(D::Minus1)?;
    let m2 = (&g * &xhat)?.mean_keepdim(D::Minus1)?;
    let dx = g
        .broadcast_sub(&m1)?
        .sub(&xhat.broadcast_mul(&m2)?)?
        .broadcast_mul(&rstd)?
        .to_dtype(dtype)?;
    let dw = match w {
        Some(w) => Some(col_sum(&(&dyf * &xhat)?)?.to_dtype(w.dtype())?),
        None => None,
    };
    let db = match w {
        Some(w) => Some(col_sum(&dyf)?.to_dtype(w.dtype())?),
        None => None,
    };
    Ok((dx, dw, db))
}

pub fn rms_norm_fwd(
    x: &Tensor,
    w: Option<&Tensor>,
    eps: f64,
    offset: f64,
) -> Result<(Tensor, Tensor)> {
    let dtype = x.dtype();
    let xf = f32(x)?;
    let std = (xf.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?;
    let xn = xf.broadcast_div(&std)?;
    let y = match w {
        None => xn.to_dtype(dtype)?,
        Some(w) if offset == 0.0 => xn.to_dtype(dtype)?.broadcast_mul(w)?,
        Some(w) => xn.broadcast_mul(&(f32(w)? + offset)?)?.to_dtype(dtype)?,
    };
    Ok((y, std.recip()?.squeeze(1)?))
}

pub fn rms_norm_bwd(
    dy: &Tensor,
    x: &Tensor,
    w: Option<&Tensor>,
    rstd: &Tensor,
    offset: f64,
) -> Result<(Tensor, Option<Tensor>)> {
    let dtype = x.dtype();
    let rstd = rstd.unsqueeze(1)?;
    let xhat = f32(x)?.broadcast_mul(&rstd)?;
    let dyf = f32(dy)?;
    let g = match w {
        Some(w) => dyf.broadcast_mul(&(f32(w)? + offset)?)?,
        None => dyf.clone(),
    };
    let m = (&g * &xhat)?.mean_keepdim(D::Minus1)?;
    let dx = g
        .sub(&xhat.broadcast_mul(&m)?)?
        .broadcast_mul(&rstd)?
        .to_dtype(dtype)?;
    let dw = match w {
        Some(w) => Some(col_sum(&(&dyf * &xhat)?)?.to_dtype(w.dtype())?),
        None => None,
    };
    Ok((dx, dw))
}

const SQRT_2_OVER_PI: f64 = 0.797_884_560_802_865_4;
const GELU_C: f64 = 0.044715;

pub fn gelu_tanh_fwd(x: &Tensor) -> Result<Tensor> {
    x.gelu()
}

pub fn gelu_tanh_bwd(x: &Tensor, dy: &Tensor) -> Result<Tensor> {
    let dtype = x.dtype();
    let x = f32(x)?;
    let x2 = x.sqr()?;
    let inner = ((&x * (x2.clone() * GELU_C)?)? + &x)?;
    let th = (inner * SQRT_2_OVER_PI)?.tanh()?;
    let left = ((&th + 1.0)? * 0.5)?;
    let dinner = ((x2 * (3.0 * GELU_C))? + 1.0)? * SQRT_2_OVER_PI;
    let right = (((x * 0.5)? * (1.0 - th.sqr()?)?)? * dinner?)?;
    ((left + right)? * f32(dy)?)?.to_dtype(dtype)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GateAct {
    Silu,
    GeluTanh,
}

pub fn gated_fwd(gate: &Tensor, up: &Tensor, act: GateAct) -> Result<Tensor> {
    let a = match act {
        GateAct::Silu => gate.silu()?,
        GateAct::GeluTanh => gate.gelu()?,
    };
    a * up
}

pub fn gated_bwd(
    gate: &Tensor,
    up: &Tensor,
    dh: &Tensor,
    act: GateAct,
) -> Result<(Tensor, Tensor)> {
    let dtype = gate.dtype();
    let (a, da) = match act {
        GateAct::Silu => {
            let g = f32(gate)?;
            let s = candle_nn::ops::sigmoid(&g)?;
            let a = (&g * &s)?;
            // silu'(g) = s·(1 + g·(1 − s))
            let da = (&s * ((&g * (1.0 - &s)?)? + 1.0)?)?;
            (a, da)
        }
        GateAct::GeluTanh => {
            let ones = Tensor::ones_like(&f32(gate)?)?;
            (f32(&gate.gelu()?)?, gelu_tanh_bwd(&f32(gate)?, &ones)?)
        }
    };
    let dh = f32(dh)?;
    let dgate = ((&dh * f32(up)?)? * da)?.to_dtype(dtype)?;
    let dup = (dh * a)?.to_dtype(dtype)?;
    Ok((dgate, dup))
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AttnSpec {
    pub scale: f64,
    pub window: Option<usize>,
    pub softcap: Option<f64>,
}

/// [B, T, n, hd] -> [B, H, T, hd], kv heads repeated to H.
fn heads(x: &Tensor, h: usize) -> Result<Tensor> {
    let (b, t, n, hd) = x.dims4()?;
    let x = x.transpose(1, 2)?.contiguous()?;
    if n == h {
        return Ok(x);
    }
    x.unsqueeze(2)?
        .broadcast_as((b, n, h / n, t, hd))?
        .reshape((b, h, t, hd))
}

/// [B, H, T, hd] -> [B, T, n, hd], summing the H / n query heads that share a kv head.
fn unheads(x: &Tensor, n: usize) -> Result<Tensor> {
    let (b, h, t, hd) = x.dims4()?;
    let x = if n == h {
        x.clone()
    } else {
        x.reshape((b, n, h / n, t, hd))?.sum(2)?
    };
    x.transpose(1, 2)?.contiguous()
}

/// Scaled (and soft-capped) masked scores [B, H, T, T] in f32, and tanh(s / c) when capped.
fn scores(q: &Tensor, k: &Tensor, spec: &AttnSpec) -> Result<(Tensor, Option<Tensor>)> {
    let t = q.dim(2)?;
    let s = (f32(q)?.matmul(&f32(k)?.t()?)? * spec.scale)?;
    let (s, th) = match spec.softcap {
        Some(c) => {
            let th = (s / c)?.tanh()?;
            ((&th * c)?, Some(th))
        }
        None => (s, None),
    };
    let mask: Vec<f32> = (0..t)
        .flat_map(|i| {
            (0..t).map(move |j| {
                let old = spec.window.is_some_and(|w| j + w <= i);
                if j > i || old {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
        })
        .collect();
    let mask = Tensor::from_vec(mask, (t, t), q.device())?;
    Ok((s.broadcast_add(&mask)?, th))
}

pub fn attention_fwd(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    spec: &AttnSpec,
) -> Result<(Tensor, Tensor)> {
    let (o, p, s) = eager(q, k, v, spec)?;
    let m = s.max_keepdim(D::Minus1)?;
    let lse = (s.broadcast_sub(&m)?.exp()?.sum_keepdim(D::Minus1)?.log()? + m)?;
    drop(p);
    Ok((o, lse.squeeze(3)?))
}

/// o, probabilities (f32) and masked scores.
fn eager(q: &Tensor, k: &Tensor, v: &Tensor, spec: &AttnSpec) -> Result<(Tensor, Tensor, Tensor)> {
    let h = q.dim(2)?;
    let (qh, kh, vh) = (heads(q, h)?, heads(k, h)?, heads(v, h)?);
    let (s, _) = scores(&qh, &kh, spec)?;
    let p = candle_nn::ops::softmax(&s, D::Minus1)?;
    let o = p.matmul(&f32(&vh)?)?.to_dtype(q.dtype())?;
    Ok((o.transpose(1, 2)?.contiguous()?, p, s))
}

pub fn attention_bwd(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    o: &Tensor,
    lse: &Tensor,
    d_o: &Tensor,
    spec: &AttnSpec,
) -> Result<(Tensor, Tensor, Tensor)> {
    let h = q.dim(2)?;
    let (qh, kh) = (heads(q, h)?, heads(k, h)?);
    let (s, _) = scores(&qh, &kh, spec)?;
    let p = s.broadcast_sub(&lse.unsqueeze(3)?)?.exp()?;
    backward_from_probs(q, k, v, Some(o), &p, d_o, spec)
}

fn backward_from_probs(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    o: Option<&Tensor>,
    p: &Tensor,
    d_o: &Tensor,
    spec: &AttnSpec,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (h, hkv, dtype) = (q.dim(2)?, k.dim(2)?, q.dtype());
    let (qh, kh, vh) = (
        f32(&heads(q, h)?)?,
        f32(&heads(k, h)?)?,
        f32(&heads(v, h)?)?,
    );
    let doh = f32(&heads(d_o, h)?)?;
    let p = f32(p)?;
    let dv = p.t()?.matmul(&doh)?;
    let dp = doh.matmul(&vh.t()?)?;
    // D_i = Σ_j P_ij dP_ij = do_i · o_i
    let dsum = match o {
        Some(o) => (&doh * f32(&heads(o, h)?)?)?.sum_keepdim(D::Minus1)?,
        None => (&p * &dp)?.sum_keepdim(D::Minus1)?,
    };
    let mut ds = (&p * dp.broadcast_sub(&dsum)?)?;
    if let Some(c) = spec.softcap {
        let (_, th) = scores(&qh, &kh, spec)?;
        if let Some(th) = th {
            let _ = c;
            ds = (ds * (1.0 - th.sqr()?)?)?;
        }
    }
    let dq = (ds.matmul(&kh)? * spec.scale)?;
    let dk = (ds.t()?.matmul(&qh)? * spec.scale)?;
    Ok((
        unheads(&dq, h)?.to_dtype(dtype)?,
        unheads(&dk, hkv)?.to_dtype(dtype)?,
        unheads(&dv, hkv)?.to_dtype(dtype)?,
    ))
}

pub fn attention_eager_fwd(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    spec: &AttnSpec,
) -> Result<(Tensor, Tensor)> {
    let (o, p, _) = eager(q, k, v, spec)?;
    Ok((o, p.to_dtype(q.dtype())?))
}

pub fn attention_eager_bwd(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    probs: &Tensor,
    d_o: &Tensor,
    spec: &AttnSpec,
) -> Result<(Tensor, Tensor, Tensor)> {
    backward_from_probs(q, k, v, None, probs, d_o, spec)
}

/// Per-row log-sum-exp and the mean loss over rows whose target is not [`IGNORE_INDEX`].
pub fn cross_entropy_fwd(logits: &Tensor, targets: &Tensor) -> Result<(f64, Tensor)> {
    let lf = f32(logits)?;
    let m = lf.max_keepdim(D::Minus1)?;
    let lse = (lf.broadcast_sub(&m)?.exp()?.sum_keepdim(D::Minus1)?.log()? + m)?.squeeze(1)?;
    let tg: Vec<u32> = targets.to_vec1()?;
    let lse_h: Vec<f32> = lse.to_vec1()?;
    let rows: Vec<Vec<f32>> = lf.to_vec2()?;
    let (mut sum, mut n) = (0f64, 0usize);
    for ((row, &t), &l) in rows.iter().zip(&tg).zip(&lse_h) {
        if t != IGNORE_INDEX {
            sum += (l - row[t as usize]) as f64;
            n += 1;
        }
    }
    Ok((sum / n.max(1) as f64, lse))
}

pub fn cross_entropy_bwd(
    logits: Tensor,
    targets: &Tensor,
    lse: &Tensor,
    scale: f64,
) -> Result<Tensor> {
    let (n, v) = logits.dims2()?;
    let p = f32(&logits)?.broadcast_sub(&lse.unsqueeze(1)?)?.exp()?;
    let tg: Vec<u32> = targets.to_vec1()?;
    let mut onehot = vec![0f32; n * v];
    let mut keep = vec![0f32; n];
    for (i, &t) in tg.iter().enumerate() {
        if t != IGNORE_INDEX {
            onehot[i * v + t as usize] = 1.0;
            keep[i] = scale as f32;
        }
    }
    let onehot = Tensor::from_vec(onehot, (n, v), logits.device())?;
    let keep = Tensor::from_vec(keep, (n, 1), logits.device())?;
    (p - onehot)?.broadcast_mul(&keep)?.to_dtype(logits.dtype())
}

/// x [B, T, H, hd]; cos/sin [T, rot/2].
pub fn rope_fwd(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let (_, t, _, hd) = x.dims4()?;
    let half = cos.dim(1)?;
    let rot = 2 * half;
    let dtype = x.dtype();
    let c = cos.reshape((t, 1, half))?;
    let s = sin.reshape((t, 1, half))?;
    let xf = f32(x)?;
    let x1 = xf.narrow(D::Minus1, 0, half)?;
    let x2 = xf.narrow(D::Minus1, half, half)?;
    let y1 = (x1.broadcast_mul(&c)? - x2.broadcast_mul(&s)?)?;
    let y2 = (x2.broadcast_mul(&c)? + x1.broadcast_mul(&s)?)?;
    let mut parts = vec![y1, y2];
    if rot < hd {
        parts.push(xf.narrow(D::Minus1, rot, hd - rot)?);
    }
    Tensor::cat(&parts, D::Minus1)?.to_dtype(dtype)
}

pub fn rope_bwd(dy: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    rope_fwd(dy, cos, &sin.neg()?)
}
