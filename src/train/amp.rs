//! Mixed precision as PyTorch's CPU autocast runs HF's modules (`LeanOptions::amp`): f32 master
//! weights, gradients and optimizer states; matrix products and attention in half precision.
//!
//! What autocast keeps, counted with `torch.autograd.graph.saved_tensors_hooks` (PyTorch 2.15,
//! transformers 5.24, `scripts/torch-amp-memory.py --saved`): each linear map's input as a half
//! copy (autocast casts the f32 norm output once per map: Llama's q, k and v projections each
//! keep their own copy of the same input, as do gate and up), the half copy of each weight
//! matrix (cached for the forward, saved for the backward), the maps' outputs and what is
//! computed from them in half (q, k, v, the attention output, GELU's pieces, the gated MLP's),
//! while the residual stream, the norms and their saved inputs stay f32 (a half output added to
//! the f32 residual promotes to f32) and the loss runs on an f32 copy of the half logits.
//!
//! Kernels here take half tensors and compute in f32 inside: the operands are widened, the f32
//! kernel runs, and the result is narrowed. The widened copies are transient; what is kept,
//! and its bytes, is what autocast keeps. Every op is composed from candle ops around the f32
//! kernels, so the CUDA build runs it too.

use super::k;
use candle_core::{DType, Result, Tensor};

/// `x` as f32: a new buffer for a half tensor.
pub(crate) fn widen(x: &Tensor) -> Result<Tensor> {
    x.to_dtype(DType::F32)
}

/// `a @ b` for half operands (either may be a transposed view): both widened to f32, multiplied,
/// the product narrowed to `a`'s dtype. candle's CPU backend has no half gemm of its own that
/// this step's memory model could state (bf16 widens whole storages, f16 packs in f32 panels).
pub(crate) fn matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let dt = a.dtype();
    let y = {
        let (a, b) = (widen(a)?, widen(b)?);
        a.matmul(&b)?
    };
    y.to_dtype(dt)
}

/// Σ over the rows of `dy` `[N, C]` (half) in f32: a bias's gradient. Summed a block of rows at
/// a time so that the widened copy stays small.
pub(crate) fn sum_rows(dy: &Tensor) -> Result<Tensor> {
    let n = dy.dim(0)?;
    let mut acc: Option<Tensor> = None;
    let mut at = 0;
    while at < n {
        let rows = SUM_ROWS.min(n - at);
        let part = widen(&dy.narrow(0, at, rows)?)?.sum(0)?;
        acc = Some(match acc {
            None => part,
            Some(a) => super::inplace::add(a, &part)?,
        });
        at += rows;
    }
    match acc {
        Some(a) => Ok(a),
        None => Tensor::zeros(dy.dim(1)?, DType::F32, dy.device()),
    }
}

/// Rows `sum_rows` widens at once.
pub(crate) const SUM_ROWS: usize = 256;

/// Flash attention on half q, k, v: (o in half, lse f32).
pub(crate) fn attention_fwd(
    q: &Tensor,
    k_: &Tensor,
    v: &Tensor,
    spec: &k::AttnSpec,
) -> Result<(Tensor, Tensor)> {
    let dt = q.dtype();
    let (o, lse) = {
        let (q, k_, v) = (widen(q)?, widen(k_)?, widen(v)?);
        k::attention_fwd(&q, &k_, &v, spec)?
    };
    let o_h = o.to_dtype(dt)?;
    drop(o);
    Ok((o_h, lse))
}

/// Its backward: dq, dk, dv in half.
#[allow(clippy::too_many_arguments)]
pub(crate) fn attention_bwd(
    q: &Tensor,
    k_: &Tensor,
    v: &Tensor,
    o: &Tensor,
    lse: &Tensor,
    d_o: &Tensor,
    spec: &k::AttnSpec,
) -> Result<(Tensor, Tensor, Tensor)> {
    let dt = q.dtype();
    let (dq, dk, dv) = {
        let (q, k_, v, o, d_o) = (widen(q)?, widen(k_)?, widen(v)?, widen(o)?, widen(d_o)?);
        k::attention_bwd(&q, &k_, &v, &o, lse, &d_o, spec)?
    };
    let dq_h = dq.to_dtype(dt)?;
    drop(dq);
    let dk_h = dk.to_dtype(dt)?;
    drop(dk);
    let dv_h = dv.to_dtype(dt)?;
    drop(dv);
    Ok((dq_h, dk_h, dv_h))
}

/// `f` on the widened `x`, its result narrowed back to `x`'s dtype.
pub(crate) fn widened(x: &Tensor, f: impl FnOnce(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
    let dt = x.dtype();
    let y = {
        let x = widen(x)?;
        f(&x)?
    };
    y.to_dtype(dt)
}

/// `f` on the widened `a` and `b`, its result narrowed back to `a`'s dtype.
pub(crate) fn widened2(
    a: &Tensor,
    b: &Tensor,
    f: impl FnOnce(&Tensor, &Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    let dt = a.dtype();
    let y = {
        let (a, b) = (widen(a)?, widen(b)?);
        f(&a, &b)?
    };
    y.to_dtype(dt)
}
