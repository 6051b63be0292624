//! The optimizer step as PyTorch's foreach implementations hold memory (`torch.optim.AdamW` and
//! `SGD` with `foreach=True`, the default on every device that has foreach kernels):
//!
//! - AdamW: `exp_avg` and `exp_avg_sq` per parameter, created at the first step in the
//!   parameter's dtype (the master dtype under AMP); the update's only temporary is
//!   `torch._foreach_sqrt(exp_avg_sqs)`, one buffer per parameter, all alive at once until the
//!   final `_foreach_addcdiv_`. Everything else is in place.
//! - SGD without momentum or weight decay: `_foreach_add_(params, grads, alpha=-lr)`, in place,
//!   no state.
//!
//! The update really changes the weights (they share storage with the VarMap). CPU only: the
//! in-place updates are CPU kernels.

use crate::train::Optimizer;
use candle_core::{
    CpuStorage, InplaceOp1, InplaceOp2, InplaceOp3, Layout, Result, Tensor, WithDType,
};
use std::collections::BTreeMap;

/// PyTorch's AdamW defaults.
pub const ADAMW_LR: f64 = 1e-3;
pub const ADAMW_BETA1: f64 = 0.9;
pub const ADAMW_BETA2: f64 = 0.999;
pub const ADAMW_EPS: f64 = 1e-8;
pub const ADAMW_WEIGHT_DECAY: f64 = 1e-2;
/// The learning rate of the SGD step (PyTorch's default since 2.2).
pub const SGD_LR: f64 = 1e-3;

/// The optimizer's state between steps.
pub struct OptimizerState {
    kind: Optimizer,
    step: u32,
    /// AdamW's (exp_avg, exp_avg_sq) by parameter name.
    moments: BTreeMap<String, (Tensor, Tensor)>,
}

impl OptimizerState {
    pub fn new(kind: Optimizer) -> Self {
        OptimizerState {
            kind,
            step: 0,
            moments: BTreeMap::new(),
        }
    }

    /// One step over every parameter that has a gradient.
    pub fn step<'a>(
        &mut self,
        params: impl Iterator<Item = (&'a String, &'a Tensor)>,
        grads: &BTreeMap<String, Tensor>,
    ) -> Result<()> {
        let params: Vec<(&String, &Tensor)> =
            params.filter(|(n, _)| grads.contains_key(*n)).collect();
        for (_, p) in &params {
            if !p.device().is_cpu() || !p.is_contiguous() {
                candle_core::bail!("the optimizer step runs on contiguous CPU tensors only");
            }
        }
        self.step += 1;
        match self.kind {
            Optimizer::Sgd => {
                for (name, p) in &params {
                    p.inplace_op2(
                        &grads[*name],
                        &Axpby {
                            a: 1.0,
                            b: -SGD_LR,
                            square: false,
                        },
                    )?;
                }
            }
            Optimizer::AdamW => {
                for (name, p) in &params {
                    if !self.moments.contains_key(*name) {
                        self.moments
                            .insert((*name).clone(), (p.zeros_like()?, p.zeros_like()?));
                    }
                }
                for (name, _) in &params {
                    let g = &grads[*name];
                    let (m, v) = &self.moments[*name];
                    // exp_avg.lerp_(grad, 1 − β1); exp_avg_sq.mul_(β2).addcmul_(grad, grad, 1 − β2)
                    m.inplace_op2(
                        g,
                        &Axpby {
                            a: ADAMW_BETA1,
                            b: 1.0 - ADAMW_BETA1,
                            square: false,
                        },
                    )?;
                    v.inplace_op2(
                        g,
                        &Axpby {
                            a: ADAMW_BETA2,
                            b: 1.0 - ADAMW_BETA2,
                            square: true,
                        },
                    )?;
                }
                let t = self.step as i32;
                let bc1 = 1.0 - ADAMW_BETA1.powi(t);
                let bc2_sqrt = (1.0 - ADAMW_BETA2.powi(t)).sqrt();
                // _foreach_sqrt: one new buffer per parameter, all alive at once.
                let denoms = params
                    .iter()
                    .map(|(name, _)| self.moments[*name].1.sqrt())
                    .collect::<Result<Vec<_>>>()?;
                for d in &denoms {
                    d.inplace_op1(&Affine {
                        a: 1.0 / bc2_sqrt,
                        b: ADAMW_EPS,
                    })?;
                }
                for ((name, p), d) in params.iter().zip(&denoms) {
                    p.inplace_op3(
                        &self.moments[*name].0,
                        d,
                        &AdamUpdate {
                            decay: 1.0 - ADAMW_LR * ADAMW_WEIGHT_DECAY,
                            step_size: ADAMW_LR / bc1,
                        },
                    )?;
                }
            }
        }
        Ok(())
    }
}

fn range(l: &Layout) -> Result<std::ops::Range<usize>> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(a..b),
        None => candle_core::bail!("optimizer update on a non-contiguous tensor"),
    }
}

macro_rules! float_slices {
    ($s:expr, $r:expr, |$d:ident| $body:expr) => {
        match $s {
            CpuStorage::F32(v) => {
                let $d = &mut v[$r];
                $body
            }
            CpuStorage::BF16(v) => {
                let $d = &mut v[$r];
                $body
            }
            CpuStorage::F16(v) => {
                let $d = &mut v[$r];
                $body
            }
            CpuStorage::F64(v) => {
                let $d = &mut v[$r];
                $body
            }
            _ => candle_core::bail!("optimizer update on a non-float tensor"),
        }
    };
}

/// dst = a·dst + b·src (or b·src² with `square`).
struct Axpby {
    a: f64,
    b: f64,
    square: bool,
}

fn axpby<T: WithDType>(
    d: &mut [T],
    s: &CpuStorage,
    r: std::ops::Range<usize>,
    op: &Axpby,
) -> Result<()> {
    let s = &s.as_slice::<T>()?[r];
    for (x, &g) in d.iter_mut().zip(s) {
        let g = g.to_f64();
        let g = if op.square { g * g } else { g };
        *x = T::from_f64(op.a * x.to_f64() + op.b * g);
    }
    Ok(())
}

impl InplaceOp2 for Axpby {
    fn name(&self) -> &'static str {
        "lean-axpby"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<()> {
        let (r1, r2) = (range(l1)?, range(l2)?);
        float_slices!(s1, r1, |d| axpby(d, s2, r2, self))
    }
}

/// dst = a·dst + b.
struct Affine {
    a: f64,
    b: f64,
}

impl InplaceOp1 for Affine {
    fn name(&self) -> &'static str {
        "lean-affine"
    }

    fn cpu_fwd(&self, s: &mut CpuStorage, l: &Layout) -> Result<()> {
        let r = range(l)?;
        float_slices!(s, r, |d| {
            for x in d.iter_mut() {
                *x = WithDType::from_f64(self.a * x.to_f64() + self.b);
            }
            Ok(())
        })
    }
}

/// p = p·decay − step_size · m / denom.
struct AdamUpdate {
    decay: f64,
    step_size: f64,
}

fn adam_update<T: WithDType>(
    p: &mut [T],
    m: &CpuStorage,
    rm: std::ops::Range<usize>,
    d: &CpuStorage,
    rd: std::ops::Range<usize>,
    op: &AdamUpdate,
) -> Result<()> {
    let (m, d) = (&m.as_slice::<T>()?[rm], &d.as_slice::<T>()?[rd]);
    for ((x, &mi), &di) in p.iter_mut().zip(m).zip(d) {
        *x = T::from_f64(x.to_f64() * op.decay - op.step_size * mi.to_f64() / di.to_f64());
    }
    Ok(())
}

impl InplaceOp3 for AdamUpdate {
    fn name(&self) -> &'static str {
        "lean-adamw-update"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<()> {
        let (r1, r2, r3) = (range(l1)?, range(l2)?, range(l3)?);
        float_slices!(s1, r1, |p| adam_update(
            p,
            s2,
            r2.clone(),
            s3,
            r3.clone(),
            self
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Two AdamW steps against the update written out with candle ops (PyTorch's formula).
    #[test]
    fn adamw_and_sgd_follow_pytorch() -> Result<()> {
        let dev = Device::Cpu;
        let p0 = Tensor::randn(0f32, 1.0, (3, 4), &dev)?;
        let g = Tensor::randn(0f32, 1.0, (3, 4), &dev)?;
        let name = "w".to_string();
        let p = p0.copy()?;
        let grads = BTreeMap::from([(name.clone(), g.clone())]);
        let mut opt = OptimizerState::new(Optimizer::AdamW);
        opt.step([(&name, &p)].into_iter(), &grads)?;
        opt.step([(&name, &p)].into_iter(), &grads)?;
        let (mut want, mut m, mut v) = (
            p0.to_dtype(candle_core::DType::F64)?,
            None::<Tensor>,
            None::<Tensor>,
        );
        let g64 = g.to_dtype(candle_core::DType::F64)?;
        for t in 1..=2 {
            want = (want * (1.0 - ADAMW_LR * ADAMW_WEIGHT_DECAY))?;
            let mm = match m {
                None => (&g64 * (1.0 - ADAMW_BETA1))?,
                Some(m) => ((m * ADAMW_BETA1)? + (&g64 * (1.0 - ADAMW_BETA1))?)?,
            };
            let vv = match v {
                None => (g64.sqr()? * (1.0 - ADAMW_BETA2))?,
                Some(v) => ((v * ADAMW_BETA2)? + (g64.sqr()? * (1.0 - ADAMW_BETA2))?)?,
            };
            let bc1 = 1.0 - ADAMW_BETA1.powi(t);
            let bc2 = 1.0 - ADAMW_BETA2.powi(t);
            let denom = ((vv.sqrt()? / bc2.sqrt())? + ADAMW_EPS)?;
            want = (want - ((&mm / denom)? * (ADAMW_LR / bc1))?)?;
            m = Some(mm);
            v = Some(vv);
        }
        let err = (p.to_dtype(candle_core::DType::F64)? - want)?
            .abs()?
            .max_all()?
            .to_scalar::<f64>()?;
        assert!(err < 1e-6, "{err}");

        let p = p0.copy()?;
        let mut sgd = OptimizerState::new(Optimizer::Sgd);
        sgd.step([(&name, &p)].into_iter(), &grads)?;
        let want = (&p0 - (&g * SGD_LR)?)?;
        let err = (p - want)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(err < 1e-7, "{err}");
        Ok(())
    }
}
