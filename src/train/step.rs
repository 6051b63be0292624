//! The step both families share: embed, run the blocks keeping what each block's backward needs
//! (or only its input, with block checkpointing), the final norm, the head and the loss; then the
//! backward in reverse, each block's saved tensors dropped as soon as its gradients are done.

use super::amp;
use super::k;
use super::layers::{EmbeddingGrad, Grads, Norm};
use super::parallel::Parallel;
use super::{kept, Checkpoint, LeanOptions, SavedSet};
use candle_core::{DType, Result, Tensor};

/// A family's network as the lean step drives it.
pub(crate) trait Net {
    /// What one block keeps for its backward.
    type Saved;
    /// Per-forward tables (RoPE cos/sin).
    type Ctx;

    fn n_layer(&self) -> usize;
    /// The residual stream's width d.
    fn width(&self) -> usize;
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
    /// Under AMP, drops every block map's half weight copy (`Lin::release_half`).
    fn release_half(&self) {}
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
    let logits = k::matmul(&xf, &head.t()?)?;
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
    let whole = Parallel {
        layers: 0..net.n_layer(),
        ..Parallel::default()
    };
    let (loss, grads) = stage_step(net, ids, &whole, opts, forward_done)?;
    Ok((loss.unwrap_or(f64::NAN), grads))
}

/// One pipeline stage's part of the step: the blocks of `part.layers`, with the input embedded
/// here (first stage) or received from the previous stage, and the output's gradient computed
/// from the loss here (last stage) or received from the next stage. The loss when this stage
/// computes it. The whole network is the one stage with no neighbours.
pub(crate) fn stage_step<N: Net>(
    net: &N,
    ids: &Tensor,
    part: &Parallel,
    opts: &LeanOptions,
    forward_done: &mut dyn FnMut() -> Result<()>,
) -> Result<(Option<f64>, Grads)> {
    let (b, t) = ids.dims2()?;
    if t < 2 {
        candle_core::bail!("a next-token loss needs at least 2 positions, got seq = {t}");
    }
    let bt = (b, t);
    let rows_d = (b * t, net.width());
    // --- forward
    let mut x = match &part.prev {
        None => net.embed(ids)?,
        Some(prev) => prev.recv(rows_d)?,
    };
    let ctx = net.ctx(t, x.dtype(), x.device())?;
    let mut kept: Vec<Kept<N::Saved>> = Vec::with_capacity(part.layers.len());
    for i in part.layers.clone() {
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
    let mut grads = Grads::default();
    if opts.saved == SavedSet::Transformers {
        grads.1 = EmbeddingGrad::Dense;
    }
    let mut kept_tail = None;
    // With checkpointed blocks under AMP, nothing saved a block's weight copies: they go when
    // the forward's autocast region ends (its cast cache cleared), and the recompute casts again.
    let release = opts.amp.is_some() && opts.checkpoint == Checkpoint::Blocks;
    let mut ending = || {
        if release {
            net.release_half();
        }
        forward_done()
    };
    let forward_done: &mut dyn FnMut() -> Result<()> = &mut ending;
    let (loss, mut dx) = match &part.next {
        Some(next) => {
            next.send(&x)?;
            drop(x);
            forward_done()?;
            (None, next.recv(rows_d)?)
        }
        None => {
            let (loss, dx, tail) = head_step(net, ids, x, opts, &mut grads, forward_done)?;
            // The targets (and, keeping what HF keeps, the logits) live until the step ends,
            // as the memory model counts them.
            kept_tail = Some(tail);
            (Some(loss), dx)
        }
    };

    // --- backward through the blocks
    for i in part.layers.clone().rev() {
        let saved = match kept.pop() {
            Some(Kept::All(s)) => s,
            Some(Kept::Input(x)) => net.block_fwd(i, &x, bt, &ctx, opts)?.1,
            None => candle_core::bail!("block {i} kept nothing"),
        };
        dx = net.block_bwd(i, saved, dx, bt, &ctx, &mut grads)?;
    }
    match &part.prev {
        None => net.embed_bwd(ids, dx, &mut grads)?,
        Some(prev) => prev.send(&dx)?,
    }
    drop(kept_tail);
    Ok((loss, grads))
}

/// The final norm, the head and the loss on the last block's output `x`, then their backward:
/// the loss, d(x), and what must outlive the step's backward: the targets and, with
/// `SavedSet::Transformers`, the logits (the model's output holds them).
#[allow(clippy::type_complexity)]
fn head_step<N: Net>(
    net: &N,
    ids: &Tensor,
    x: Tensor,
    opts: &LeanOptions,
    grads: &mut Grads,
    forward_done: &mut dyn FnMut() -> Result<()>,
) -> Result<(f64, Tensor, (Tensor, Option<Tensor>))> {
    if let Some(dt) = opts.amp {
        return head_step_amp(net, ids, x, dt, opts, grads, forward_done);
    }
    let (b, t) = ids.dims2()?;
    let (xf, stats) = net.final_norm().fwd_keeping(&x, opts.saved)?;
    let (head, head_name) = net.head();
    // [N, d] @ [d, V] -> [N, V]
    let logits = k::matmul(&xf, &head.t()?)?;
    // Capped in place: the loss's backward reads the capped logits for the cap's derivative too.
    let cap = net.final_softcap();
    let logits = match cap {
        Some(c) => k::softcap_fwd(logits, c)?,
        None => logits,
    };
    // HF caps as c · tanh(x / c): tanh keeps its output for its backward.
    let cap_tanh = match (cap, opts.saved) {
        (Some(c), SavedSet::Transformers) => Some(kept::softcap_tanh(&logits, c)?),
        _ => None,
    };
    let targets = targets(ids)?;
    let (loss, lse) = k::cross_entropy_fwd(&logits, &targets)?;
    // HF's loss: log_softmax(logits.float()) keeps its output for nll_loss's backward.
    let logp = match opts.saved {
        SavedSet::Transformers => Some(kept::log_probs(&logits, &lse)?),
        SavedSet::Fused => None,
    };
    forward_done()?;

    // --- backward
    let rows = b * (t - 1);
    let scale = 1.0 / rows as f64;
    let (dlogits, held_logits) = match logp {
        None => (
            k::cross_entropy_bwd(logits, &targets, &lse, scale, cap)?,
            None,
        ),
        Some(logp) => {
            // nll_loss's backward writes the log-probabilities' gradient, log_softmax's the
            // logits' into a new buffer; then both saved inputs go. The logits themselves
            // stay: the model's output holds them until the step ends.
            let dlogp = kept::nll_grad(&targets, logits.dim(1)?, scale)?;
            let dlogits = k::cross_entropy_bwd(logits.copy()?, &targets, &lse, scale, cap)?;
            drop((dlogp, logp, cap_tanh));
            (dlogits, Some(logits))
        }
    };
    drop(lse);
    // [V, N] @ [N, d] -> [V, d]
    grads.add(head_name, k::matmul(&dlogits.t()?, &xf)?)?;
    drop(xf);
    let dxf = k::matmul(&dlogits, head)?;
    drop(dlogits);
    let dx = net.final_norm().bwd(&dxf, &x, &stats, grads)?;
    drop((dxf, x, stats));
    Ok((loss, dx, (targets, held_logits)))
}

/// `head_step` under AMP (HF's loss on the half logits of autocast's linear): the final norm in
/// f32, its output and the head's weight narrowed (both kept for the backward), the half logits
/// (held until the step ends), the loss on their f32 copy with its f32 log-probabilities kept;
/// in backward the logits' f32 gradient, narrowed before the head's products.
#[allow(clippy::type_complexity)]
fn head_step_amp<N: Net>(
    net: &N,
    ids: &Tensor,
    x: Tensor,
    dt: DType,
    opts: &LeanOptions,
    grads: &mut Grads,
    forward_done: &mut dyn FnMut() -> Result<()>,
) -> Result<(f64, Tensor, (Tensor, Option<Tensor>))> {
    let (b, t) = ids.dims2()?;
    let (xf32, stats) = net.final_norm().fwd_keeping(&x, opts.saved)?;
    let xf = xf32.to_dtype(dt)?;
    drop(xf32);
    let (head, head_name) = net.head();
    let head = head.to_dtype(dt)?;
    // [N, d] @ [d, V] -> [N, V]
    let logits = amp::matmul(&xf, &head.t()?)?;
    let targets = targets(ids)?;
    let (loss, lse, logp) = {
        let logits32 = amp::widen(&logits)?;
        let (loss, lse) = k::cross_entropy_fwd(&logits32, &targets)?;
        let logp = kept::log_probs(&logits32, &lse)?;
        (loss, lse, logp)
    };
    forward_done()?;

    // --- backward
    let rows = b * (t - 1);
    let scale = 1.0 / rows as f64;
    let dlogp = kept::nll_grad(&targets, logits.dim(1)?, scale)?;
    let dlogits = k::cross_entropy_bwd(amp::widen(&logits)?, &targets, &lse, scale, None)?;
    drop((dlogp, logp, lse));
    let dlogits = {
        let d = dlogits.to_dtype(dt)?;
        drop(dlogits);
        d
    };
    // [V, N] @ [N, d] -> [V, d], the master weight's gradient in f32
    let dw = amp::widen(&amp::matmul(&dlogits.t()?, &xf)?)?;
    grads.add(head_name, dw)?;
    drop(xf);
    let dxf = amp::widen(&amp::matmul(&dlogits, &head)?)?;
    drop((dlogits, head));
    let dx = net.final_norm().bwd(&dxf, &x, &stats, grads)?;
    drop((dxf, x, stats));
    Ok((loss, dx, (targets, Some(logits))))
}
