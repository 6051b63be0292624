//! The tensors PyTorch's autograd keeps for HF transformers' modules beyond what the fused
//! backward reads (`SavedSet::Transformers`), computed as those modules compute them.
//!
//! HF builds several ops from elementwise pieces, and autograd saves every piece a later
//! backward multiplies by: `NewGELUActivation` is ½x·(1 + tanh(√(2/π)(x + 0.044715x³))), so
//! the tanh output and both factors of the last product are saved beside x; RMSNorm multiplies
//! the weight by the normalized input, so x̂ is saved; a gated MLP multiplies act(gate) by up, so
//! act(gate) is saved; the loss runs `log_softmax` in f32 and saves its output, then its
//! backward holds the gradient of the log-probabilities and that of the logits at once. (Counted
//! with `torch.autograd.graph.saved_tensors_hooks` on HF transformers 5.24 / PyTorch 2.15:
//! the saved set plus the logits plus two [N, V] gradients equals the measured step peak.)
//!
//! The lean step keeps these tensors as long as PyTorch does and frees each where PyTorch's
//! backward releases it; its fused backward recomputes what it needs from the minimal set
//! instead of reading them, which is cheaper than reading a second [N, ff] buffer.

use candle_core::{DType, Device, Result, Tensor};
use rayon::prelude::*;

use super::k::simd::{multiversion, tanh};
use crate::config::GeluForm;

const SQRT_2_OVER_PI: f32 = 0.797_884_6;
const GELU_A: f32 = 0.044_715;
/// Elements a rayon task takes at least.
const CHUNK: usize = 16 * 1024;

/// Tensors `[..]` shaped like the GELU input that autograd saves besides the input itself:
/// `gelu_new` 3 (tanh u, ½x, 1 + tanh u), `gelu_fast` 6 (0.044715x, x·√(2/π),
/// 1 + 0.044715x², tanh, ½x, 1 + tanh), PyTorch's fused tanh GELU none.
pub(crate) fn gelu_intermediates(x: &Tensor, form: GeluForm) -> Result<Vec<Tensor>> {
    match form {
        GeluForm::Fused => Ok(Vec::new()),
        GeluForm::New => parts(x, gelu_new_block),
        GeluForm::Fast => parts(x, gelu_fast_block),
    }
}

multiversion! {
    /// tanh u, ½x, 1 + tanh u with u = √(2/π)(x + 0.044715x³).
    fn gelu_new_block(xs: &[f32], outs: &mut [&mut [f32]; 3]) {
        let [t, half, one_plus] = outs;
        for (((&x, t), half), one_plus) in xs.iter().zip(t.iter_mut()).zip(half.iter_mut()).zip(one_plus.iter_mut()) {
            let v = tanh(SQRT_2_OVER_PI * (x + GELU_A * x * x * x));
            (*t, *half, *one_plus) = (v, 0.5 * x, 1.0 + v);
        }
    }
}

multiversion! {
    /// 0.044715x, x·√(2/π), 1 + 0.044715x², tanh, ½x, 1 + tanh (`gelu_fast`'s order of ops).
    fn gelu_fast_block(xs: &[f32], outs: &mut [&mut [f32]; 6]) {
        for (i, &x) in xs.iter().enumerate() {
            let c2 = GELU_A * x;
            let c1 = x * SQRT_2_OVER_PI;
            let c3 = 1.0 + c2 * x;
            let t = tanh(c1 * c3);
            for (o, v) in outs.iter_mut().zip([c2, c1, c3, t, 0.5 * x, 1.0 + t]) {
                o[i] = v;
            }
        }
    }
}

fn new_parts(x: f32) -> [f32; 3] {
    let t = tanh(SQRT_2_OVER_PI * (x + GELU_A * x * x * x));
    [t, 0.5 * x, 1.0 + t]
}

fn fast_parts(x: f32) -> [f32; 6] {
    let c2 = GELU_A * x;
    let c1 = x * SQRT_2_OVER_PI;
    let c3 = 1.0 + c2 * x;
    let t = tanh(c1 * c3);
    [c2, c1, c3, t, 0.5 * x, 1.0 + t]
}

/// `gelu_intermediates` under AMP, where autocast runs the composed GELU in half: from the
/// widened input `x32`, one part at a time, each narrowed to `dt` as soon as it exists (so one
/// f32 part is alive at a time).
pub(crate) fn gelu_intermediates_half(
    x32: &Tensor,
    form: GeluForm,
    dt: DType,
) -> Result<Vec<Tensor>> {
    // One block per part: each writes only its own output.
    macro_rules! part {
        ($f:ident, $i:literal) => {
            |xs: &[f32], o: &mut [&mut [f32]; 1]| {
                for (y, &x) in o[0].iter_mut().zip(xs) {
                    *y = $f(x)[$i];
                }
            }
        };
    }
    let one: &[Block<1>] = match form {
        GeluForm::Fused => &[],
        GeluForm::New => &[
            part!(new_parts, 0),
            part!(new_parts, 1),
            part!(new_parts, 2),
        ],
        GeluForm::Fast => &[
            part!(fast_parts, 0),
            part!(fast_parts, 1),
            part!(fast_parts, 2),
            part!(fast_parts, 3),
            part!(fast_parts, 4),
            part!(fast_parts, 5),
        ],
    };
    one.iter()
        .map(|f| {
            let mut p = parts(x32, *f)?;
            p.pop()
                .ok_or_else(|| candle_core::Error::Msg("GELU part missing".into()))?
                .to_dtype(dt)
        })
        .collect()
}

/// Writes a chunk of each of K outputs from the same chunk of the input.
type Block<const K: usize> = fn(&[f32], &mut [&mut [f32]; K]);

/// The K outputs of `block` over the elements of x, each in its own tensor: one pass on the CPU
/// for contiguous f32 (the values through the host otherwise).
fn parts<const K: usize>(x: &Tensor, block: Block<K>) -> Result<Vec<Tensor>> {
    let n = x.elem_count();
    let host = x.to_dtype(DType::F32)?.flatten_all()?;
    let fused = x.dtype() == DType::F32 && x.device().is_cpu() && x.is_contiguous();
    let mut outs: Vec<Vec<f32>> = (0..K).map(|_| vec![0f32; n]).collect();
    {
        let src = if fused {
            None
        } else {
            Some(host.to_vec1::<f32>()?)
        };
        let (guard, layout) = host.storage_and_layout();
        let xs: &[f32] = match (&src, &*guard) {
            (Some(v), _) => v,
            (None, candle_core::Storage::Cpu(cpu)) => {
                let (a, b) = layout
                    .contiguous_offsets()
                    .ok_or_else(|| candle_core::Error::Msg("GELU input not contiguous".into()))?;
                &cpu.as_slice::<f32>()?[a..b]
            }
            (None, _) => candle_core::bail!("GELU intermediates: host tensor not on the CPU"),
        };
        let mut slices: Vec<&mut [f32]> = outs.iter_mut().map(|v| v.as_mut_slice()).collect();
        // Split every output into the same chunks, then run each chunk on its own task.
        let mut chunks: Vec<[&mut [f32]; K]> = Vec::new();
        while !slices.is_empty() && !slices[0].is_empty() {
            let take = CHUNK.min(slices[0].len());
            let mut row = Vec::with_capacity(K);
            let mut rest = Vec::with_capacity(K);
            for s in slices {
                let (head, tail) = s.split_at_mut(take);
                row.push(head);
                rest.push(tail);
            }
            let Ok(row) = <[&mut [f32]; K]>::try_from(row) else {
                candle_core::bail!("GELU intermediates: {K} outputs expected");
            };
            chunks.push(row);
            slices = rest;
        }
        chunks
            .into_par_iter()
            .zip(xs.par_chunks(CHUNK))
            .for_each(|(mut outs, xs)| block(xs, &mut outs));
    }
    let device = x.device();
    outs.into_iter()
        .map(|v| {
            Tensor::from_vec(v, x.shape(), &Device::Cpu)?
                .to_dtype(x.dtype())?
                .to_device(device)
        })
        .collect()
}

/// RMSNorm's normalized input x̂ = x · rstd (f32, as HF computes the norm in f32).
pub(crate) fn rms_normalized(x: &Tensor, rstd: &Tensor) -> Result<Tensor> {
    super::k::mul_per_row(&x.to_dtype(DType::F32)?, rstd)
}

/// `log_softmax(logits.float())`: the loss's saved output `[N, V]` f32, from the rows' lse.
pub(crate) fn log_probs(logits: &Tensor, lse: &Tensor) -> Result<Tensor> {
    super::k::sub_per_row(&logits.to_dtype(DType::F32)?, lse)
}

/// tanh(x / c) of the capped logits c · tanh(x / c): what HF's final soft-cap keeps `[N, V]`.
pub(crate) fn softcap_tanh(capped: &Tensor, c: f64) -> Result<Tensor> {
    capped.affine(1.0 / c, 0.0)
}

/// `nll_loss`'s backward: the gradient of the log-probabilities `[N, V]` f32, −scale at each
/// counted row's target and 0 elsewhere.
pub(crate) fn nll_grad(targets: &Tensor, v: usize, scale: f64) -> Result<Tensor> {
    let tg = targets.to_vec1::<u32>()?;
    let n = tg.len();
    let mut g = vec![0f32; n * v];
    for (row, &t) in tg.iter().enumerate() {
        if t != super::k::IGNORE_INDEX {
            g[row * v + t as usize] = -scale as f32;
        }
    }
    Tensor::from_vec(g, (n, v), &Device::Cpu)?.to_device(targets.device())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gelu_parts_rebuild_the_activation() {
        let x = Tensor::arange(-40f32, 40.0, &Device::Cpu)
            .unwrap()
            .affine(0.1, 0.0)
            .unwrap();
        let want = super::super::k::gelu_tanh_fwd(&x).unwrap();
        let max_err = |a: Tensor, b: &Tensor| {
            (a - b)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        };
        // (form, parts, the last product's factors ½x and 1 + tanh, tanh)
        for (form, count, (half, one_plus), tanh) in [
            (GeluForm::New, 3, (1, 2), 0),
            (GeluForm::Fast, 6, (4, 5), 3),
        ] {
            let p = gelu_intermediates(&x, form).unwrap();
            assert_eq!(p.len(), count, "{form:?}");
            let y = (&p[half] * &p[one_plus]).unwrap();
            assert!(max_err(y, &want) < 1e-5, "{form:?}: y = ½x · (1 + tanh)");
            let t1 = (&p[tanh] + 1.0).unwrap();
            assert!(max_err(t1, &p[one_plus]) < 1e-6, "{form:?}: 1 + tanh");
        }
    }

    #[test]
    fn nll_grad_marks_targets() {
        let t = Tensor::new(&[2u32, super::super::k::IGNORE_INDEX, 0], &Device::Cpu).unwrap();
        let g = nll_grad(&t, 4, 0.5).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(
            g,
            vec![
                vec![0.0, 0.0, -0.5, 0.0],
                vec![0.0; 4],
                vec![-0.5, 0.0, 0.0, 0.0]
            ]
        );
    }
}
