//! The step both families share: embed, run the blocks keeping what each block's backward needs
//! (or only its input, with block checkpointing), the final norm, the head and the loss; then the
//! backward in reverse, each block's saved tensors dropped as soon as its gradients are done.

use super::k;
use super::layers::{Grads, Norm};
use super::{Checkpoint, LeanOptions};
use candle_core::{DType, Result, Tensor};

/// A family's network as the lean step drives it.
pub(crate) trait Net {
    /// What one block keeps for its backward.
    type Saved;
    /// Per-forward tables (RoPE cos/sin).
    type Ctx;

    fn n_layer(&self) -> usize;
    fn ctx(&self, t: usize, dtype: DType, device: &candle_core::Device) -> Result<Self::Ctx>;
    /// ids `[B, T]` -> the residual stream `[B·T, d]`.
    fn embed(&self, ids: &Tensor) -> Result<Tensor>;
    /// The embedding's gradients from d(residual) `[B·T, d]` (into the head's buffer when tied).
    fn embed_bwd(&self, ids: &Tensor, dx: Tensor, grads: &mut Grads) -> Result<()>;
    /// Block `i`: x `[B·T, d]` -> (y, what backward needs).
    fn block_fwd(
        &self,
        i: usize,
        x: &Tensor,
        bt: (usize, usize),
        ctx: &Self::Ctx,
        opts: &LeanOptions,
    ) -> Result<(Tensor, Self::Saved)>;
    /// Block `i`'s gradients from dy; returns dx. Consumes (frees) the saved tensors.
    fn block_bwd(
        &self,
        i: usize,
        saved: Self::Saved,
        dy: Tensor,
        bt: (usize, usize),
        ctx: &Self::Ctx,
        grads: &mut Grads,
    ) -> Result<Tensor>;
    fn final_norm(&self) -> &Norm;
    /// The head `[V, d]` and the name its gradient goes to.
    fn head(&self) -> (&Tensor, &str);
    /// c of a soft-cap c·tanh(z/c) on the logits (Gemma 2), or None.
    fn final_softcap(&self) -> Option<f64> {
        None
    }
}

/// What the forward kept of one block.
enum Kept<S> {
    All(S),
    /// Block checkpointing: the block's input only; its forward runs again in backward.
    Input(Tensor),
}

/// Next-token targets `[B·T]`: row (b, t) predicts ids[b, t + 1]; the last position of each
/// sequence is ignored.
pub(crate) fn targets(ids: &Tensor) -> Result<Tensor> {
    let (b, t) = ids.dims2()?;
    let host: Vec<Vec<u32>> = ids.to_dtype(DType::U32)?.to_vec2()?;
    let mut out = Vec::with_capacity(b * t);
    for row in &host {
        out.extend_from_slice(&row[1..]);
        out.push(k::IGNORE_INDEX);
    }
    Tensor::from_vec(out, b * t, ids.device())
}

/// Logits `[B, T, V]` from a forward that keeps nothing.
pub(crate) fn logits<N: Net>(net: &N, ids: &Tensor) -> Result<Tensor> {
    let (b, t) = ids.dims2()?;
    let mut x = net.embed(ids)?;
    let ctx = net.ctx(t, x.dtype(), x.device())?;
    let opts = LeanOptions::default();
    for i in 0..net.n_layer() {
        x = net.block_fwd(i, &x, (b, t), &ctx, &opts)?.0;
    }
    let (xf, _) = net.final_norm().fwd(&x)?;
    let (head, _) = net.head();
    let v = head.dim(0)?;
    let logits = xf.matmul(&head.t()?)?;
    let logits = match net.final_softcap() {
        Some(c) => k::softcap_fwd(logits, c)?,
        None => logits,
    };
    logits.reshape((b, t, v))
}

/// Forward, loss and backward: the mean next-token loss and every parameter's gradient.
/// `forward_done` runs between the loss and the backward (where a measurement reads the
/// forward's peak and what it kept).
pub(crate) fn loss_and_grads<N: Net>(
    net: &N,
    ids: &Tensor,
    opts: &LeanOptions,
    forward_done: &mut dyn FnMut() -> Result<()>,
) -> Result<(f64, Grads)> {
    let (b, t) = ids.dims2()?;
    if t < 2 {
        candle_core::bail!("a next-token loss needs at least 2 positions, got seq = {t}");
    }
    let bt = (b, t);
    // --- forward
    let mut x = net.embed(ids)?;
    let ctx = net.ctx(t, x.dtype(), x.device())?;
    let mut kept: Vec<Kept<N::Saved>> = Vec::with_capacity(net.n_layer());
    for i in 0..net.n_layer() {
        let (y, saved) = net.block_fwd(i, &x, bt, &ctx, opts)?;
        kept.push(match opts.checkpoint {
            Checkpoint::None => Kept::All(saved),
            Checkpoint::Blocks => {
                drop(saved);
                Kept::Input(x)
            }
        });
        x = y;
    }
    let (xf, stats) = net.final_norm().fwd(&x)?;
    let (head, head_name) = net.head();
    // [N, d] @ [d, V] -> [N, V]
    let logits = xf.matmul(&head.t()?)?;
    // Capped in place: the loss's backward reads the capped logits for the cap's derivative too.
    let logits = match net.final_softcap() {
        Some(c) => k::softcap_fwd(logits, c)?,
        None => logits,
    };
    let targets = targets(ids)?;
    let (loss, lse) = k::cross_entropy_fwd(&logits, &targets)?;
    forward_done()?;

    // --- backward
    let rows = b * (t - 1);
    let dlogits = k::cross_entropy_bwd(
        logits,
        &targets,
        &lse,
        1.0 / rows as f64,
        net.final_softcap(),
    )?;
    drop(lse);
    let mut grads = Grads::default();
    // [V, N] @ [N, d] -> [V, d]
    grads.add(head_name, dlogits.t()?.matmul(&xf)?)?;
    drop(xf);
    let dxf = dlogits.matmul(head)?;
    drop(dlogits);
    let mut dx = net.final_norm().bwd(&dxf, &x, &stats, &mut grads)?;
    drop((dxf, x, stats));
    for i in (0..net.n_layer()).rev() {
        let saved = match kept.pop() {
            Some(Kept::All(s)) => s,
            Some(Kept::Input(x)) => net.block_fwd(i, &x, bt, &ctx, opts)?.1,
            None => candle_core::bail!("block {i} kept nothing"),
        };
        dx = net.block_bwd(i, saved, dx, bt, &ctx, &mut grads)?;
    }
    net.embed_bwd(ids, dx, &mut grads)?;
    Ok((loss, grads))
}
