//! Mean cross-entropy over rows, forward and backward. Logits [N, V] in any float dtype, the
//! maths in f32; targets [N] u32, [`IGNORE_INDEX`] for rows that do not count (PyTorch's −100).
//!
//! Gemma 2's final soft-cap y = c·tanh(z/c) sits between the head and the loss. Its derivative
//! 1 − tanh²(z/c) = 1 − (y/c)² needs only the capped logits, which the loss's backward is about to
//! overwrite with their gradient: so the cap's backward is folded into the loss's (each element
//! read once, before it is overwritten), and the step keeps no second [N, V] buffer for it.

use candle_core::{CpuStorage, DType, Device, Layout, Result, Tensor, D};
use rayon::prelude::*;

use super::simd::{self, multiversion};
use super::with_cpu_f32;

/// A target that marks its row as not counted (the last position of a shifted sequence).
pub const IGNORE_INDEX: u32 = u32::MAX;

/// (mean over counted rows of lse_i − logit_i[target_i], lse [N] f32). NaN when no row counts,
/// as PyTorch's mean over nothing.
pub fn cross_entropy_fwd(logits: &Tensor, targets: &Tensor) -> Result<(f64, Tensor)> {
    let (n, v) = logits.dims2()?;
    let tg = targets_of(targets, n, v)?;
    let counted = tg.iter().filter(|&&t| t != IGNORE_INDEX).count();
    let fused = with_cpu_f32(&[logits], |s| {
        let mut lse = vec![0f32; n];
        let total: f64 = s[0]
            .par_chunks(v)
            .zip(lse.par_iter_mut())
            .zip(tg.par_iter())
            .map(|((row, l), &t)| {
                *l = row_lse(row);
                if t == IGNORE_INDEX {
                    0.0
                } else {
                    (*l - row[t as usize]) as f64
                }
            })
            .sum();
        (total, lse)
    });
    if let Some((total, lse)) = fused {
        return Ok((
            total / counted as f64,
            Tensor::from_vec(lse, n, &Device::Cpu)?,
        ));
    }
    // gather reads contiguous tensors only.
    let l32 = logits.to_dtype(DType::F32)?.contiguous()?;
    let m = l32.max_keepdim(D::Minus1)?;
    let lse = m
        .broadcast_add(
            &l32.broadcast_sub(&m)?
                .exp()?
                .sum_keepdim(D::Minus1)?
                .log()?,
        )?
        .squeeze(1)?;
    let (safe, keep) = gather_plan(&tg, logits.device())?;
    let picked = l32.gather(&safe.unsqueeze(1)?, 1)?.squeeze(1)?;
    let total = ((&lse - picked)? * keep)?
        .sum_all()?
        .to_dtype(DType::F64)?
        .to_scalar::<f64>()?;
    Ok((total / counted as f64, lse))
}

/// z `[N, V]` -> c·tanh(z/c), as `(z / c).tanh() * c` in z's dtype. Takes z by value: on the
/// fused path (CPU, f32, contiguous) the result is written over z's own buffer.
pub fn softcap_fwd(z: Tensor, cap: f64) -> Result<Tensor> {
    if z.dtype() == DType::F32 && z.device().is_cpu() && z.is_contiguous() {
        z.inplace_op1(&Softcap { cap })?;
        return Ok(z);
    }
    (z / cap)?.tanh()? * cap
}

/// The f32 elements an in-place op may rewrite: its storage's contiguous range.
fn contiguous_f32<'a>(
    storage: &'a mut CpuStorage,
    layout: &Layout,
    op: &str,
) -> Result<&'a mut [f32]> {
    let CpuStorage::F32(data) = storage else {
        candle_core::bail!("{op}: expected f32 storage")
    };
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("{op}: input must be contiguous")
    };
    Ok(&mut data[start..end])
}

struct Softcap {
    cap: f64,
}

impl candle_core::InplaceOp1 for Softcap {
    fn name(&self) -> &'static str {
        "softcap"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> Result<()> {
        let data = contiguous_f32(storage, layout, "softcap")?;
        // The same roundings as candle's `affine(1/c)`, `tanh`, `affine(c)` in f32.
        let (inv, c) = ((1.0 / self.cap) as f32, self.cap as f32);
        data.par_chunks_mut(4096)
            .for_each(|ch| ch.iter_mut().for_each(|x| *x = (*x * inv).tanh() * c));
        Ok(())
    }
}

/// dlogits = (softmax(logits) − onehot(target)) · scale for counted rows, 0 for ignored ones, in
/// logits' dtype (`scale` is 1/count for the mean loss). With `softcap = Some(c)` the logits are
/// the capped y = c·tanh(z/c) and the result is the gradient with respect to z: each element
/// times 1 − (y/c)².
///
/// Takes the logits by value: on the fused path (CPU, f32, contiguous) the gradient is written
/// over the logits' own buffer and that same tensor is returned, so no [N, V] buffer is
/// allocated. Any other tensor sharing that storage (a clone, a view) sees the gradient too: the
/// caller hands the logits over. Other paths allocate the result.
pub fn cross_entropy_bwd(
    logits: Tensor,
    targets: &Tensor,
    lse: &Tensor,
    scale: f64,
    softcap: Option<f64>,
) -> Result<Tensor> {
    let (n, v) = logits.dims2()?;
    let tg = targets_of(targets, n, v)?;
    if lse.dims() != [n] || lse.dtype() != DType::F32 {
        candle_core::bail!(
            "cross-entropy: lse has shape {:?} ({:?}), expected [{n}] f32",
            lse.dims(),
            lse.dtype()
        )
    }
    let fused = logits.dtype() == DType::F32 && logits.device().is_cpu() && logits.is_contiguous();
    if fused {
        if let Some(lse) = with_cpu_f32(&[lse], |s| s[0].to_vec()) {
            logits.inplace_op1(&CeBwd {
                targets: tg,
                lse,
                v,
                scale: scale as f32,
                inv_cap: softcap.map(|c| (1.0 / c) as f32),
            })?;
            return Ok(logits);
        }
    }
    let l32 = logits.to_dtype(DType::F32)?;
    let p = l32.broadcast_sub(&lse.unsqueeze(1)?)?.exp()?;
    let (safe, keep) = gather_plan(&tg, logits.device())?;
    let classes = Tensor::arange(0u32, v as u32, logits.device())?.unsqueeze(0)?;
    let onehot = classes
        .broadcast_eq(&safe.unsqueeze(1)?)?
        .to_dtype(DType::F32)?;
    let d = (p - onehot)?.broadcast_mul(&(keep * scale)?.unsqueeze(1)?)?;
    let d = match softcap {
        // 1 − (y/c)²
        Some(c) => (d * (l32 / c)?.sqr()?.affine(-1.0, 1.0)?)?,
        None => d,
    };
    d.to_dtype(logits.dtype())
}

/// The targets on the host, each checked: < V or [`IGNORE_INDEX`].
fn targets_of(targets: &Tensor, n: usize, v: usize) -> Result<Vec<u32>> {
    if targets.dims() != [n] || targets.dtype() != DType::U32 {
        candle_core::bail!(
            "cross-entropy: targets have shape {:?} ({:?}), expected [{n}] u32",
            targets.dims(),
            targets.dtype()
        )
    }
    let tg = targets.to_vec1::<u32>()?;
    if let Some((i, t)) = tg
        .iter()
        .enumerate()
        .find(|(_, &t)| t != IGNORE_INDEX && t as usize >= v)
    {
        candle_core::bail!("cross-entropy: targets[{i}] = {t} is not below the vocabulary size {v}")
    }
    Ok(tg)
}

/// Targets with ignored rows pointed at class 0 (so gather stays in range), and the f32 row mask.
fn gather_plan(tg: &[u32], dev: &Device) -> Result<(Tensor, Tensor)> {
    let safe: Vec<u32> = tg
        .iter()
        .map(|&t| if t == IGNORE_INDEX { 0 } else { t })
        .collect();
    let keep: Vec<f32> = tg
        .iter()
        .map(|&t| if t == IGNORE_INDEX { 0.0 } else { 1.0 })
        .collect();
    Ok((Tensor::new(safe, dev)?, Tensor::new(keep, dev)?))
}

struct CeBwd {
    targets: Vec<u32>,
    lse: Vec<f32>,
    v: usize,
    scale: f32,
    /// 1/c of a final soft-cap the logits went through.
    inv_cap: Option<f32>,
}

impl candle_core::InplaceOp1 for CeBwd {
    fn name(&self) -> &'static str {
        "cross-entropy-bwd"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> Result<()> {
        let data = contiguous_f32(storage, layout, "cross-entropy-bwd")?;
        let v = self.v;
        data.par_chunks_mut(v)
            .zip(self.targets.par_iter().zip(self.lse.par_iter()))
            .for_each(|(row, (&t, &lse))| {
                if t == IGNORE_INDEX {
                    row.fill(0.0);
                    return;
                }
                let t = t as usize;
                match self.inv_cap {
                    None => {
                        softmax_row_scaled(row, lse, self.scale);
                        row[t] -= self.scale;
                    }
                    Some(inv) => {
                        let yt = row[t] * inv;
                        softmax_row_scaled_capped(row, lse, self.scale, inv);
                        row[t] -= self.scale * (1.0 - yt * yt);
                    }
                }
            });
        Ok(())
    }
}

multiversion! {
    /// log Σ e^x over one row.
    fn row_lse(x: &[f32]) -> f32 {
        let m = simd::max(x);
        let mut acc = [0f32; simd::LANES];
        let (cx, tx) = x.as_chunks::<{ simd::LANES }>();
        for ch in cx {
            for l in 0..simd::LANES {
                acc[l] += simd::exp(ch[l] - m);
            }
        }
        let tail: f32 = tx.iter().map(|&x| simd::exp(x - m)).sum();
        m + (simd::sum(&acc) + tail).ln()
    }
}

multiversion! {
    /// x ← e^{x − lse} · scale, in place.
    fn softmax_row_scaled(x: &mut [f32], lse: f32, scale: f32) {
        for x in x.iter_mut() {
            *x = simd::exp(*x - lse) * scale;
        }
    }
}

multiversion! {
    /// x ← e^{x − lse} · scale · (1 − (x · inv_cap)²), in place.
    fn softmax_row_scaled_capped(x: &mut [f32], lse: f32, scale: f32, inv_cap: f32) {
        for x in x.iter_mut() {
            let y = *x * inv_cap;
            *x = simd::exp(*x - lse) * scale * (1.0 - y * y);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{close, rand, strided};
    use super::*;
    use candle_core::Var;

    #[test]
    fn fused_composed_and_autograd_agree() {
        for (n, v, ignored) in [
            (7, 12, vec![3]),
            (5, 1000, vec![]),
            (33, 257, vec![0, 32, 7]),
        ] {
            let logits = rand(&[n, v], 8.0, 41).unwrap();
            let tg: Vec<u32> = (0..n)
                .map(|i| {
                    if ignored.contains(&i) {
                        IGNORE_INDEX
                    } else {
                        ((i * 7919) % v) as u32
                    }
                })
                .collect();
            let targets = Tensor::new(tg.clone(), &Device::Cpu).unwrap();
            let counted = n - ignored.len();

            // Autograd of −mean log_softmax(logits)[target] over counted rows.
            let lv = Var::from_tensor(&logits).unwrap();
            let ls = candle_nn::ops::log_softmax(lv.as_tensor(), D::Minus1).unwrap();
            let (safe, keep) = gather_plan(&tg, &Device::Cpu).unwrap();
            let picked = ls
                .gather(&safe.unsqueeze(1).unwrap(), 1)
                .unwrap()
                .squeeze(1)
                .unwrap();
            let loss =
                ((picked * keep).unwrap().sum_all().unwrap() * (-1.0 / counted as f64)).unwrap();
            let want_loss = loss.to_scalar::<f32>().unwrap() as f64;
            let g = loss.backward().unwrap();
            let want = g.get(lv.as_tensor()).unwrap();

            let (l_fused, lse) = cross_entropy_fwd(&logits, &targets).unwrap();
            let (l_comp, lse_c) = cross_entropy_fwd(&strided(&logits), &targets).unwrap();
            assert!(
                (l_fused - want_loss).abs() <= 1e-5 * want_loss.abs(),
                "{l_fused} vs {want_loss}"
            );
            assert!(
                (l_comp - want_loss).abs() <= 1e-5 * want_loss.abs(),
                "{l_comp} vs {want_loss}"
            );
            close("lse", &lse, &lse_c, 1e-6);

            let scale = 1.0 / counted as f64;
            let composed =
                cross_entropy_bwd(strided(&logits), &targets, &lse, scale, None).unwrap();
            close("dlogits composed", &composed, want, 1e-5);
            // The fused path writes over the buffer it is handed: give it a copy.
            let owned = logits.copy().unwrap();
            let fused = cross_entropy_bwd(owned, &targets, &lse, scale, None).unwrap();
            close("dlogits fused", &fused, want, 1e-5);
            for &i in &ignored {
                let row = fused.get(i).unwrap().abs().unwrap().sum_all().unwrap();
                assert_eq!(row.to_scalar::<f32>().unwrap(), 0.0);
            }
        }
    }

    #[test]
    fn softcapped_loss_backward_matches_autograd() {
        let (n, v, cap) = (9, 40, 3.0);
        let z = rand(&[n, v], 8.0, 43).unwrap();
        let tg: Vec<u32> = (0..n)
            .map(|i| {
                if i == 4 {
                    IGNORE_INDEX
                } else {
                    (i * 13 % v) as u32
                }
            })
            .collect();
        let targets = Tensor::new(tg.clone(), &Device::Cpu).unwrap();
        let zv = Var::from_tensor(&z).unwrap();
        let y_ref = ((zv.as_tensor() / cap).unwrap().tanh().unwrap() * cap).unwrap();
        let ls = candle_nn::ops::log_softmax(&y_ref, D::Minus1).unwrap();
        let (safe, keep) = gather_plan(&tg, &Device::Cpu).unwrap();
        let picked = ls
            .gather(&safe.unsqueeze(1).unwrap(), 1)
            .unwrap()
            .squeeze(1)
            .unwrap();
        let loss = ((picked * keep).unwrap().sum_all().unwrap() * (-1.0 / (n - 1) as f64)).unwrap();
        let g = loss.backward().unwrap();
        let want = g.get(zv.as_tensor()).unwrap();

        let y = softcap_fwd(z.copy().unwrap(), cap).unwrap();
        close("capped fused", &y, &y_ref, 0.0);
        let y_comp = softcap_fwd(strided(&z), cap).unwrap();
        close("capped composed", &y_comp, &y_ref, 0.0);
        let (_, lse) = cross_entropy_fwd(&y, &targets).unwrap();
        let scale = 1.0 / (n - 1) as f64;
        let composed = cross_entropy_bwd(strided(&y), &targets, &lse, scale, Some(cap)).unwrap();
        close("dz composed", &composed, want, 1e-5);
        let fused = cross_entropy_bwd(y, &targets, &lse, scale, Some(cap)).unwrap();
        close("dz fused", &fused, want, 1e-5);
    }

    #[test]
    fn bf16_logits_take_the_composed_path_with_f32_maths() {
        let logits = rand(&[6, 50], 4.0, 42).unwrap();
        let targets = Tensor::new(vec![1u32, 2, 3, 4, 5, IGNORE_INDEX], &Device::Cpu).unwrap();
        let lb = logits.to_dtype(DType::BF16).unwrap();
        let (l16, lse16) = cross_entropy_fwd(&lb, &targets).unwrap();
        let (l32, _) = cross_entropy_fwd(&lb.to_dtype(DType::F32).unwrap(), &targets).unwrap();
        assert!((l16 - l32).abs() < 1e-5 * l32.abs(), "{l16} vs {l32}");
        let d = cross_entropy_bwd(lb.clone(), &targets, &lse16, 0.2, None).unwrap();
        assert_eq!(d.dtype(), DType::BF16);
    }

    #[test]
    fn targets_out_of_range_are_errors() {
        let logits = rand(&[2, 5], 1.0, 1).unwrap();
        let t = Tensor::new(vec![1u32, 5], &Device::Cpu).unwrap();
        let e = cross_entropy_fwd(&logits, &t).unwrap_err().to_string();
        assert!(e.contains("targets[1] = 5"), "{e}");
    }
}
