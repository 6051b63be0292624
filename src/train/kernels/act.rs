//! GELU (tanh form) and the gated MLP activations, forward and backward. Elementwise: any shape.
//!
//! gelu_tanh(x) = ½x(1 + tanh u), u = √(2/π)(x + 0.044715x³), is HF's `gelu_new` and PyTorch's
//! `gelu(approximate="tanh")`. The fused kernels use the equal form x·σ(2u), which needs one exp
//! and never cancels.

use candle_core::{Device, Result, Tensor};
use rayon::prelude::*;

use super::simd::{self, multiversion};
use super::with_cpu_f32;

const SQRT_2_OVER_PI: f64 = 0.797_884_560_802_865_4;
const GELU_A: f64 = 0.044_715;
/// Elements a rayon task takes at least.
const CHUNK: usize = 16 * 1024;

/// Which activation a gated MLP applies to its gate: SiLU (SwiGLU: Llama, Mistral, Qwen) or
/// GELU-tanh (GeGLU: Gemma).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GateAct {
    Silu,
    GeluTanh,
}

pub fn gelu_tanh_fwd(x: &Tensor) -> Result<Tensor> {
    if let Some(y) = with_cpu_f32(&[x], |s| map1(s[0], gelu_block)) {
        return Tensor::from_vec(y, x.shape(), &Device::Cpu);
    }
    x.gelu()
}

/// dx = dy · gelu_tanh'(x).
pub fn gelu_tanh_bwd(x: &Tensor, dy: &Tensor) -> Result<Tensor> {
    same_shape("dy", dy, x)?;
    if let Some(dx) = with_cpu_f32(&[x, dy], |s| map2(s[0], s[1], gelu_bwd_block)) {
        return Tensor::from_vec(dx, x.shape(), &Device::Cpu);
    }
    gelu_tanh_grad(x)? * dy
}

/// h = act(gate) · up.
pub fn gated_fwd(gate: &Tensor, up: &Tensor, act: GateAct) -> Result<Tensor> {
    same_shape("up", up, gate)?;
    let kernel = match act {
        GateAct::Silu => silu_gated_block,
        GateAct::GeluTanh => gelu_gated_block,
    };
    if let Some(h) = with_cpu_f32(&[gate, up], |s| map2(s[0], s[1], kernel)) {
        return Tensor::from_vec(h, gate.shape(), &Device::Cpu);
    }
    activate(gate, act)? * up
}

/// (dgate, dup) = (dh · up · act'(gate), dh · act(gate)).
pub fn gated_bwd(
    gate: &Tensor,
    up: &Tensor,
    dh: &Tensor,
    act: GateAct,
) -> Result<(Tensor, Tensor)> {
    same_shape("up", up, gate)?;
    same_shape("dh", dh, gate)?;
    let fused = with_cpu_f32(&[gate, up, dh], |s| {
        let n = s[0].len();
        let mut dg = vec![0f32; n];
        let mut du = vec![0f32; n];
        dg.par_chunks_mut(CHUNK)
            .zip(du.par_chunks_mut(CHUNK))
            .zip(s[0].par_chunks(CHUNK).zip(s[1].par_chunks(CHUNK)))
            .zip(s[2].par_chunks(CHUNK))
            .for_each(|(((dg, du), (g, u)), dh)| match act {
                GateAct::Silu => silu_gated_bwd_block(dg, du, g, u, dh),
                GateAct::GeluTanh => gelu_gated_bwd_block(dg, du, g, u, dh),
            });
        (dg, du)
    });
    if let Some((dg, du)) = fused {
        return Ok((
            Tensor::from_vec(dg, gate.shape(), &Device::Cpu)?,
            Tensor::from_vec(du, gate.shape(), &Device::Cpu)?,
        ));
    }
    let a = activate(gate, act)?;
    let da = match act {
        GateAct::Silu => {
            // σ(g)(1 + g(1 − σ(g)))
            let s = sigmoid(gate)?;
            (&s * ((gate * s.affine(-1.0, 1.0)?)? + 1.0)?)?
        }
        GateAct::GeluTanh => gelu_tanh_grad(gate)?,
    };
    Ok(((dh * up)?.mul(&da)?, (dh * a)?))
}

/// act(x) alone (candle's op: one output buffer).
pub fn activation(x: &Tensor, act: GateAct) -> Result<Tensor> {
    activate(x, act)
}

fn activate(x: &Tensor, act: GateAct) -> Result<Tensor> {
    match act {
        GateAct::Silu => x.silu(),
        GateAct::GeluTanh => x.gelu(),
    }
}

fn sigmoid(x: &Tensor) -> Result<Tensor> {
    (x.neg()?.exp()? + 1.0)?.recip()
}

/// ½(1 + t) + ½x(1 − t²)·√(2/π)(1 + 3·0.044715x²), t = tanh u.
fn gelu_tanh_grad(x: &Tensor) -> Result<Tensor> {
    let x2 = x.sqr()?;
    let u = (x * (x2.affine(GELU_A, 1.0)?))?.affine(SQRT_2_OVER_PI, 0.0)?;
    let t = u.tanh()?;
    let du = x2.affine(3.0 * GELU_A * SQRT_2_OVER_PI, SQRT_2_OVER_PI)?;
    let left = t.affine(0.5, 0.5)?;
    let right = ((x * t.sqr()?.affine(-0.5, 0.5)?)? * du)?;
    left + right
}

fn same_shape(name: &str, t: &Tensor, x: &Tensor) -> Result<()> {
    if t.dims() != x.dims() {
        candle_core::bail!(
            "activation: {name} has shape {:?}, expected {:?}",
            t.dims(),
            x.dims()
        )
    }
    Ok(())
}

fn map1(x: &[f32], f: fn(&mut [f32], &[f32])) -> Vec<f32> {
    let mut y = vec![0f32; x.len()];
    y.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK))
        .for_each(|(y, x)| f(y, x));
    y
}

fn map2(a: &[f32], b: &[f32], f: fn(&mut [f32], &[f32], &[f32])) -> Vec<f32> {
    let mut y = vec![0f32; a.len()];
    y.par_chunks_mut(CHUNK)
        .zip(a.par_chunks(CHUNK).zip(b.par_chunks(CHUNK)))
        .for_each(|(y, (a, b))| f(y, a, b));
    y
}

/// (gelu_tanh(x), gelu_tanh'(x)) through s = σ(2u): y = x·s, y' = s + 2x·s(1 − s)·u'.
#[inline(always)]
fn gelu_and_grad(x: f32) -> (f32, f32) {
    let (k, a) = (SQRT_2_OVER_PI as f32, GELU_A as f32);
    let x2 = x * x;
    let u = k * x * (1.0 + a * x2);
    let s = simd::sigmoid(2.0 * u);
    let du = k * (1.0 + 3.0 * a * x2);
    (x * s, s + 2.0 * x * s * (1.0 - s) * du)
}

#[inline(always)]
fn gelu(x: f32) -> f32 {
    let (k, a) = (SQRT_2_OVER_PI as f32, GELU_A as f32);
    x * simd::sigmoid(2.0 * k * x * (1.0 + a * x * x))
}

#[inline(always)]
fn silu_and_grad(x: f32) -> (f32, f32) {
    let s = simd::sigmoid(x);
    (x * s, s * (1.0 + x * (1.0 - s)))
}

multiversion! {
    fn gelu_block(y: &mut [f32], x: &[f32]) {
        for (y, &x) in y.iter_mut().zip(x) {
            *y = gelu(x);
        }
    }
}

multiversion! {
    fn gelu_bwd_block(dx: &mut [f32], x: &[f32], dy: &[f32]) {
        for ((dx, &x), dy) in dx.iter_mut().zip(x).zip(dy) {
            *dx = dy * gelu_and_grad(x).1;
        }
    }
}

multiversion! {
    fn silu_gated_block(h: &mut [f32], g: &[f32], u: &[f32]) {
        for ((h, &g), u) in h.iter_mut().zip(g).zip(u) {
            *h = g * simd::sigmoid(g) * u;
        }
    }
}

multiversion! {
    fn gelu_gated_block(h: &mut [f32], g: &[f32], u: &[f32]) {
        for ((h, &g), u) in h.iter_mut().zip(g).zip(u) {
            *h = gelu(g) * u;
        }
    }
}

multiversion! {
    fn silu_gated_bwd_block(dg: &mut [f32], du: &mut [f32], g: &[f32], u: &[f32], dh: &[f32]) {
        for ((((dg, du), &g), u), dh) in dg.iter_mut().zip(du.iter_mut()).zip(g).zip(u).zip(dh) {
            let (a, da) = silu_and_grad(g);
            *dg = dh * u * da;
            *du = dh * a;
        }
    }
}

multiversion! {
    fn gelu_gated_bwd_block(dg: &mut [f32], du: &mut [f32], g: &[f32], u: &[f32], dh: &[f32]) {
        for ((((dg, du), &g), u), dh) in dg.iter_mut().zip(du.iter_mut()).zip(g).zip(u).zip(dh) {
            let (a, da) = gelu_and_grad(g);
            *dg = dh * u * da;
            *du = dh * a;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{close, rand, strided};
    use super::*;
    use candle_core::Var;

    const TOL: f64 = 1e-5;

    #[test]
    fn gelu_fused_composed_and_autograd_agree() {
        for shape in [vec![7, 12], vec![3, 5, 37], vec![64, 3072]] {
            let x = rand(&shape, 6.0, 11).unwrap();
            let r = rand(&shape, 1.0, 12).unwrap();
            let xv = Var::from_tensor(&x).unwrap();
            let y_ref = gelu_tanh_fwd(&strided(xv.as_tensor())).unwrap();
            let g = (&y_ref * &r)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let dx_ref = g.get(xv.as_tensor()).unwrap();
            close("y", &gelu_tanh_fwd(&x).unwrap(), &y_ref, TOL);
            close("dx fused", &gelu_tanh_bwd(&x, &r).unwrap(), dx_ref, TOL);
            close(
                "dx composed",
                &gelu_tanh_bwd(&x, &strided(&r)).unwrap(),
                dx_ref,
                TOL,
            );
        }
    }

    #[test]
    fn gated_fused_composed_and_autograd_agree() {
        for act in [GateAct::Silu, GateAct::GeluTanh] {
            for shape in [vec![7, 12], vec![2, 9, 41], vec![256, 688]] {
                let gate = rand(&shape, 8.0, 21).unwrap();
                let up = rand(&shape, 1.0, 22).unwrap();
                let r = rand(&shape, 1.0, 23).unwrap();
                let (gv, uv) = (
                    Var::from_tensor(&gate).unwrap(),
                    Var::from_tensor(&up).unwrap(),
                );
                let h_ref = gated_fwd(&strided(gv.as_tensor()), uv.as_tensor(), act).unwrap();
                let g = (&h_ref * &r)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .backward()
                    .unwrap();
                let (dg_ref, du_ref) = (
                    g.get(gv.as_tensor()).unwrap(),
                    g.get(uv.as_tensor()).unwrap(),
                );
                close("h", &gated_fwd(&gate, &up, act).unwrap(), &h_ref, TOL);
                for dh in [r.clone(), strided(&r)] {
                    let (dg, du) = gated_bwd(&gate, &up, &dh, act).unwrap();
                    close("dgate", &dg, dg_ref, TOL);
                    close("dup", &du, du_ref, TOL);
                }
            }
        }
    }
}
