//! Genuine candle networks (GPT-2 and the Llama family) with HF weight names and layouts.
//!
//! Every op on the path from the weights to the loss has a backward in candle 0.11.1. The fused
//! candle-nn kernels (`softmax_last_dim`, `rms_norm`, `layer_norm`, `rope*`, `sdpa`) are avoided
//! on purpose: `backward()` treats them as constants and the weights upstream silently get no
//! gradient (`measure::run` checks that every parameter got one).
//!
//! Precision: the whole network runs in the weights' dtype. Norms compute their statistics in f32
//! when the model is f16/bf16 (as candle's `*_norm_slow` and HF do); attention softmax stays in
//! the model dtype; the loss is computed in f32.

pub mod autograd_replay;
pub mod build;
pub mod gpt2;
pub mod llama;

use crate::config::{Arch, ModelConfig};
use candle_core::{DType, Device, Result, Tensor, D};
use candle_nn::{Init, VarBuilder};

/// GPT-2's and Llama's initialiser for weight matrices and embeddings: N(0, 0.02)
/// (`initializer_range` in HF configs, `std=0.02` in nanoGPT's `_init_weights`).
pub const INIT_STD: f64 = 0.02;

pub(crate) const INIT_WEIGHT: Init = Init::Randn {
    mean: 0.0,
    stdev: INIT_STD,
};
pub(crate) const INIT_ZERO: Init = Init::Const(0.0);
pub(crate) const INIT_ONE: Init = Init::Const(1.0);

/// A genuine network of any supported family.
#[derive(Debug, Clone)]
pub enum Model {
    Gpt2(gpt2::Gpt2),
    Llama(Box<llama::Llama>),
}

impl Model {
    /// Build the network for `cfg`, taking every parameter from `vb` under its HF checkpoint name.
    /// Nothing is computed from the weights here, so a shape-only backend allocates nothing.
    pub fn load(vb: VarBuilder, cfg: &ModelConfig) -> Result<Model> {
        Ok(match cfg.arch {
            Arch::Gpt2 => Model::Gpt2(gpt2::Gpt2::load(vb, cfg)?),
            Arch::Llama => Model::Llama(Box::new(llama::Llama::load(vb, cfg)?)),
        })
    }

    /// Token ids (u32 `[B, T]`) to logits `[B, T, V]` in the model dtype.
    pub fn forward(&self, input_ids: &Tensor) -> Result<Tensor> {
        match self {
            Model::Gpt2(m) => m.forward(input_ids),
            Model::Llama(m) => m.forward(input_ids),
        }
    }
}

/// Mean next-token cross-entropy as HF computes it: logits at positions `0..T-1` against the
/// ids at `1..T`, in f32. Returns a scalar f32 tensor.
pub fn next_token_loss(logits: &Tensor, input_ids: &Tensor) -> Result<Tensor> {
    let (b, t, v) = logits.dims3()?;
    let (ib, it) = input_ids.dims2()?;
    if (b, t) != (ib, it) {
        candle_core::bail!("logits are [{b}, {t}, {v}] but input_ids are [{ib}, {it}]");
    }
    if t < 2 {
        candle_core::bail!("a next-token loss needs at least 2 positions, got seq = {t}");
    }
    // [B, T-1, V] -> [B·(T-1), V]
    let pred = logits
        .narrow(1, 0, t - 1)?
        .to_dtype(DType::F32)?
        .reshape((b * (t - 1), v))?;
    // [B, T-1] -> [B·(T-1)]
    let target = input_ids.narrow(1, 1, t - 1)?.flatten_all()?;
    candle_nn::loss::cross_entropy(&pred, &target)
}

/// `torch.nn.Linear`: weight stored `[out, in]`, y = x·Wᵀ + b.
#[derive(Debug, Clone)]
pub(crate) struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    pub(crate) fn load(vb: VarBuilder, in_dim: usize, out_dim: usize, bias: bool) -> Result<Self> {
        let weight = vb.get_with_hints((out_dim, in_dim), "weight", INIT_WEIGHT)?;
        let bias = if bias {
            Some(vb.get_with_hints(out_dim, "bias", INIT_ZERO)?)
        } else {
            None
        };
        Ok(Self { weight, bias })
    }

    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        // [..., in] -> [N, in] -> [N, out] -> [..., out]; a plain 2-D matmul keeps the backward
        // simple (no broadcast batch of weights to sum back).
        let mut dims = x.dims().to_vec();
        let Some(in_dim) = dims.pop() else {
            candle_core::bail!("linear layer applied to a scalar");
        };
        let (out_dim, _) = self.weight.dims2()?;
        let n = dims.iter().product::<usize>();
        let y = x.reshape((n, in_dim))?.matmul(&self.weight.t()?)?;
        let y = match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        };
        dims.push(out_dim);
        y.reshape(dims)
    }
}

/// Additive causal mask `[T, T]`: 0 on and below the diagonal, -inf above it.
pub(crate) fn causal_mask(t: usize, dtype: DType, device: &Device) -> Result<Tensor> {
    window_mask(t, None, dtype, device)
}

/// Additive mask `[T, T]`: query i sees key j iff j ≤ i and, with a window w, j > i − w
/// (transformers' sliding-window mask); -inf elsewhere.
pub(crate) fn window_mask(
    t: usize,
    window: Option<usize>,
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    let mask: Vec<f32> = (0..t)
        .flat_map(|i| {
            (0..t).map(move |j| {
                let too_old = window.is_some_and(|w| j + w <= i);
                if j > i || too_old {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
        })
        .collect();
    Tensor::from_vec(mask, (t, t), device)?.to_dtype(dtype)
}

/// Causal scaled dot-product attention over heads.
/// q, k, v: `[B, H, T, hd]`; mask: `[T, T]`. Returns `[B, H, T, hd]`.
pub(crate) fn attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let head_dim = q.dim(D::Minus1)?;
    attention_scaled(q, k, v, mask, 1.0 / (head_dim as f64).sqrt(), None)
}

/// Attention with an explicit score scale and optional soft-cap c·tanh(s / c) applied to the
/// scaled scores before the mask (Gemma 2's order).
pub(crate) fn attention_scaled(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &Tensor,
    scale: f64,
    softcap: Option<f64>,
) -> Result<Tensor> {
    // [B, H, T, hd] @ [B, H, hd, T] -> [B, H, T, T]
    let att = (q.matmul(&k.t()?.contiguous()?)? * scale)?;
    let att = match softcap {
        Some(c) => ((att / c)?.tanh()? * c)?,
        None => att,
    };
    let att = att.broadcast_add(mask)?;
    // The composite softmax: softmax_last_dim has no backward.
    let att = candle_nn::ops::softmax(&att, D::Minus1)?;
    // [B, H, T, T] @ [B, H, T, hd] -> [B, H, T, hd]
    att.matmul(v)
}

/// Norm statistics are computed in f32 for half-precision models (as HF and candle's slow
/// norms do): f16 squares overflow beyond |x| ≈ 256.
pub(crate) fn norm_internal_dtype(dtype: DType) -> DType {
    match dtype {
        DType::F16 | DType::BF16 => DType::F32,
        d => d,
    }
}
