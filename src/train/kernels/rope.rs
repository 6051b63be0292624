//! HF rotate-half RoPE on the first `rot` dims of each head (partial rotary allowed):
//! x [B,T,H,hd], cos and sin [T, rot/2] f32 (position t's angles, one per pair; HF's cos of
//! width rot repeats them). With x₁ = x[..rot/2], x₂ = x[rot/2..rot]:
//! y₁ = x₁·cos − x₂·sin, y₂ = x₂·cos + x₁·sin, the rest unchanged. The map is a rotation, so its
//! backward is the same map with −sin.

use candle_core::{Device, Result, Tensor};
use rayon::prelude::*;

use super::simd::multiversion;
use super::with_cpu_f32;

pub fn rope_fwd(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    rope(x, cos, sin, 1.0)
}

/// dx from dy: the forward with −sin.
pub fn rope_bwd(dy: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    rope(dy, cos, sin, -1.0)
}

fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor, sign: f32) -> Result<Tensor> {
    let (_, t, h, hd) = x.dims4()?;
    let (tc, r) = cos.dims2()?;
    if tc != t || sin.dims() != cos.dims() || 2 * r > hd {
        candle_core::bail!(
            "rope: cos {:?} / sin {:?} do not fit x {:?} (expected [{t}, ≤ {}])",
            cos.dims(),
            sin.dims(),
            x.dims(),
            hd / 2
        )
    }
    let fused = with_cpu_f32(&[x, cos, sin], |s| {
        let (xs, cs, ss) = (s[0], s[1], s[2]);
        let mut y = vec![0f32; xs.len()];
        y.par_chunks_mut(h * hd)
            .zip(xs.par_chunks(h * hd))
            .enumerate()
            .for_each(|(row, (y, x))| {
                let p = row % t;
                rope_row(
                    y,
                    x,
                    &cs[p * r..(p + 1) * r],
                    &ss[p * r..(p + 1) * r],
                    hd,
                    sign,
                );
            });
        y
    });
    if let Some(y) = fused {
        return Tensor::from_vec(y, x.shape(), &Device::Cpu);
    }
    let shape = (1, t, 1, r);
    let c = cos.to_dtype(x.dtype())?.reshape(shape)?;
    let s = (sin.to_dtype(x.dtype())?.reshape(shape)? * sign as f64)?;
    let x1 = x.narrow(3, 0, r)?;
    let x2 = x.narrow(3, r, r)?;
    let mut parts = vec![
        (x1.broadcast_mul(&c)? - x2.broadcast_mul(&s)?)?,
        (x2.broadcast_mul(&c)? + x1.broadcast_mul(&s)?)?,
    ];
    if 2 * r < hd {
        parts.push(x.narrow(3, 2 * r, hd - 2 * r)?);
    }
    Tensor::cat(&parts, 3)?.contiguous()
}

multiversion! {
    /// Every head of one position.
    fn rope_row(y: &mut [f32], x: &[f32], cos: &[f32], sin: &[f32], hd: usize, sign: f32) {
        let r = cos.len();
        for (y, x) in y.chunks_exact_mut(hd).zip(x.chunks_exact(hd)) {
            let (y12, yrest) = y.split_at_mut(2 * r);
            let (y1, y2) = y12.split_at_mut(r);
            let (x1, rest) = x.split_at(r);
            let (x2, xrest) = rest.split_at(r);
            for ((((y1, y2), x1), x2), (c, s)) in
                y1.iter_mut().zip(y2.iter_mut()).zip(x1).zip(x2).zip(cos.iter().zip(sin))
            {
                let s = sign * s;
                *y1 = x1 * c - x2 * s;
                *y2 = x2 * c + x1 * s;
            }
            yrest.copy_from_slice(xrest);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{close, rand, strided};
    use super::*;
    use candle_core::Var;

    /// cos/sin [T, r] for HF's inverse frequencies base^(−2i/rot).
    fn angles(t: usize, r: usize) -> (Tensor, Tensor) {
        let mut c = Vec::new();
        let mut s = Vec::new();
        for p in 0..t {
            for i in 0..r {
                let a = p as f64 * 10_000f64.powf(-(i as f64) / r as f64);
                c.push(a.cos() as f32);
                s.push(a.sin() as f32);
            }
        }
        (
            Tensor::from_vec(c, (t, r), &Device::Cpu).unwrap(),
            Tensor::from_vec(s, (t, r), &Device::Cpu).unwrap(),
        )
    }

    #[test]
    fn full_rotary_matches_candle_rope_slow() {
        let (b, t, h, hd) = (2, 7, 3, 12);
        let x = rand(&[b, t, h, hd], 1.0, 51).unwrap();
        let (c, s) = angles(t, hd / 2);
        // candle-nn's rope_slow takes [B,H,T,hd].
        let want = candle_nn::rotary_emb::rope_slow(
            &x.transpose(1, 2).unwrap().contiguous().unwrap(),
            &c,
            &s,
        )
        .unwrap()
        .transpose(1, 2)
        .unwrap();
        close("fused", &rope_fwd(&x, &c, &s).unwrap(), &want, 1e-6);
        close(
            "composed",
            &rope_fwd(&strided(&x), &c, &s).unwrap(),
            &want,
            1e-6,
        );
    }

    #[test]
    fn backward_matches_autograd_with_partial_rotary() {
        for (b, t, h, hd, r) in [
            (2, 7, 3, 12, 6),
            (1, 9, 4, 12, 3),
            (2, 5, 2, 32, 8),
            (1, 4, 1, 10, 0),
        ] {
            let x = rand(&[b, t, h, hd], 1.0, 52).unwrap();
            let dy = rand(&[b, t, h, hd], 1.0, 53).unwrap();
            let (c, s) = angles(t, r);
            let xv = Var::from_tensor(&x).unwrap();
            let y_ref = rope_fwd(&strided(xv.as_tensor()), &c, &s).unwrap();
            let g = (&y_ref * &dy)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let want = g.get(xv.as_tensor()).unwrap();
            close("y", &rope_fwd(&x, &c, &s).unwrap(), &y_ref, 1e-6);
            close("dx fused", &rope_bwd(&dy, &c, &s).unwrap(), want, 1e-6);
            close(
                "dx composed",
                &rope_bwd(&strided(&dy), &c, &s).unwrap(),
                want,
                1e-6,
            );
        }
    }
}
