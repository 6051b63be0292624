//! GPT-2's block for the lean step, the maths of `model::gpt2` with an explicit backward
//! (llm.c's `train_gpt2.c` order): pre-LayerNorm, fused qkv (HF Conv1D, `[in, out]`), causal
//! attention, GELU (tanh) MLP, learned positions, tied or untied head.

use super::amp;
use super::inplace;
use super::k;
use super::layers::{
    attn_bwd, attn_fwd, AttnSaved, Grads, Lin, Norm, NormKind, NormStats, Params, WeightLayout,
};
use super::step::Net;
use super::{kept, Attention, LeanOptions, SavedSet};
use crate::config::{GeluForm, ModelConfig};
use candle_core::{DType, Result, Tensor};

struct Block {
    ln_1: Norm,
    c_attn: Lin,
    attn_proj: Lin,
    ln_2: Norm,
    c_fc: Lin,
    mlp_proj: Lin,
}

/// What a block keeps for its backward (PyTorch's saved set for the same ops).
pub(crate) struct Saved {
    /// ln_1's input (the block input) and statistics.
    x: Tensor,
    st1: NormStats,
    /// c_attn's input.
    ln1: Tensor,
    /// Attention's inputs `[B, T, H, hd]`, output (c_proj's input) and lse or probabilities.
    /// q, k, v are copies of their columns (`SavedSet::Fused`); keeping what HF keeps, the
    /// whole qkv projection stays (its views reach the attention) and only the copies HF's
    /// sdpa makes (q and v) are kept beside it; the rest is read again from qkv in backward.
    q: Option<Tensor>,
    k: Option<Tensor>,
    v: Option<Tensor>,
    qkv: Option<Tensor>,
    o: Tensor,
    attn: AttnSaved,
    /// ln_2's input and statistics.
    x1: Tensor,
    st2: NormStats,
    /// c_fc's input.
    ln2: Tensor,
    /// GELU's input `[N, ff]`.
    h: Tensor,
    /// The MLP projection's input `[N, ff]`.
    g: Tensor,
    /// The composed GELU's intermediates PyTorch keeps (`kept::gelu_intermediates`).
    gelu_kept: Vec<Tensor>,
}

/// What a block keeps, in full precision or under AMP.
pub(crate) enum BlockSaved {
    Full(Saved),
    Amp(AmpSaved),
}

/// What a block keeps under AMP (autocast's saved set, `train::amp`): the residual stream and
/// the norms' inputs and statistics in f32; the maps' inputs as half copies, the weights' half
/// copies (held by the maps), and everything computed in half.
pub(crate) struct AmpSaved {
    x: Tensor,
    st1: NormStats,
    /// c_attn's input, ln_1's output narrowed.
    ln1: Tensor,
    /// sdpa's q and v copies and the qkv projection (k is read from it in backward).
    q: Tensor,
    v: Tensor,
    qkv: Tensor,
    o: Tensor,
    lse: Tensor,
    x1: Tensor,
    st2: NormStats,
    ln2: Tensor,
    h: Tensor,
    g: Tensor,
    gelu_kept: Vec<Tensor>,
}

pub(crate) struct Gpt2 {
    wte: Tensor,
    wpe: Tensor,
    blocks: Vec<Block>,
    ln_f: Norm,
    head: Tensor,
    head_name: String,
    n_head: usize,
    /// Residual width; the attention width is n_head · hd (narrower under tensor parallelism).
    d: usize,
    hd: usize,
    gelu: GeluForm,
}

const WTE: &str = "transformer.wte.weight";
const WPE: &str = "transformer.wpe.weight";

impl Gpt2 {
    pub(crate) fn load(cfg: &ModelConfig, p: &Params) -> Result<Gpt2> {
        let norm = |name: &str| Norm::load(p, name, NormKind::Layer, cfg.bias, cfg.norm_eps);
        let lin = |name: &str| Lin::load(p, name, cfg.bias, WeightLayout::InOut);
        let blocks = (0..cfg.n_layer)
            .map(|i| {
                let h = format!("transformer.h.{i}");
                Ok(Block {
                    ln_1: norm(&format!("{h}.ln_1"))?,
                    c_attn: lin(&format!("{h}.attn.c_attn"))?,
                    attn_proj: lin(&format!("{h}.attn.c_proj"))?,
                    ln_2: norm(&format!("{h}.ln_2"))?,
                    c_fc: lin(&format!("{h}.mlp.c_fc"))?,
                    mlp_proj: lin(&format!("{h}.mlp.c_proj"))?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let head_name = if cfg.tie_embeddings {
            WTE
        } else {
            "lm_head.weight"
        };
        Ok(Gpt2 {
            wte: p.get(WTE)?,
            wpe: p.get(WPE)?,
            blocks,
            ln_f: norm("transformer.ln_f")?,
            head: p.get(head_name)?,
            head_name: head_name.to_string(),
            n_head: cfg.n_head,
            d: cfg.n_embd,
            hd: cfg.head_dim,
            gelu: cfg.gelu,
        })
    }

    fn spec(&self) -> k::AttnSpec {
        let hd = self.hd;
        k::AttnSpec {
            scale: 1.0 / (hd as f64).sqrt(),
            window: None,
            softcap: None,
        }
    }
}

impl Gpt2 {
    /// `block_fwd` under AMP with half dtype `dt` (sdpa attention, HF's saved set).
    fn block_fwd_amp(
        &self,
        i: usize,
        x: &Tensor,
        (b, t): (usize, usize),
        dt: DType,
    ) -> Result<(Tensor, AmpSaved)> {
        let blk = &self.blocks[i];
        let (h, hd) = (self.n_head, self.hd);
        let d = h * hd;
        let (ln1_32, st1) = blk.ln_1.fwd(x)?;
        let ln1 = ln1_32.to_dtype(dt)?;
        drop(ln1_32);
        let qkv = blk.c_attn.fwd(&ln1)?;
        let part = |j: usize| {
            qkv.narrow(1, j * d, d)?
                .contiguous()?
                .reshape((b, t, h, hd))
        };
        let (q, k_, v) = (part(0)?, part(1)?, part(2)?);
        let (o, lse) = amp::attention_fwd(&q, &k_, &v, &self.spec())?;
        drop(k_);
        let o = o.reshape((b * t, d))?;
        // The half output added to the f32 residual: the sum is f32.
        let a = amp::widen(&blk.attn_proj.fwd(&o)?)?;
        let x1 = inplace::add(a, x)?;
        let (ln2_32, st2) = blk.ln_2.fwd(&x1)?;
        let ln2 = ln2_32.to_dtype(dt)?;
        drop(ln2_32);
        let hpre = blk.c_fc.fwd(&ln2)?;
        let (g, gelu_kept) = {
            let h32 = amp::widen(&hpre)?;
            let g = k::gelu_tanh_fwd(&h32)?.to_dtype(dt)?;
            (g, kept::gelu_intermediates_half(&h32, self.gelu, dt)?)
        };
        let m = amp::widen(&blk.mlp_proj.fwd(&g)?)?;
        let y = inplace::add(m, &x1)?;
        let saved = AmpSaved {
            x: x.clone(),
            st1,
            ln1,
            q,
            v,
            qkv,
            o,
            lse,
            x1,
            st2,
            ln2,
            h: hpre,
            g,
            gelu_kept,
        };
        Ok((y, saved))
    }

    fn block_bwd_amp(
        &self,
        i: usize,
        s: AmpSaved,
        dy: Tensor,
        (b, t): (usize, usize),
        grads: &mut Grads,
    ) -> Result<Tensor> {
        let blk = &self.blocks[i];
        let (h, hd) = (self.n_head, self.hd);
        let d = h * hd;
        let dg = blk.mlp_proj.bwd(&s.g, &dy, grads, None)?;
        drop(s.g);
        let dh = amp::widened2(&s.h, &dg, k::gelu_tanh_bwd)?;
        drop((dg, s.h, s.gelu_kept));
        let dln2 = blk.c_fc.bwd(&s.ln2, &dh, grads, None)?;
        drop((dh, s.ln2));
        let dln2 = {
            let dln2_32 = amp::widen(&dln2)?;
            drop(dln2);
            dln2_32
        };
        let dn2 = blk.ln_2.bwd(&dln2, &s.x1, &s.st2, grads)?;
        drop((dln2, s.x1, s.st2));
        let dx1 = inplace::add(dy, &dn2)?;
        drop(dn2);
        let d_o = blk
            .attn_proj
            .bwd(&s.o, &dx1, grads, None)?
            .reshape((b, t, h, hd))?;
        let k_ = s
            .qkv
            .narrow(1, d, d)?
            .contiguous()?
            .reshape((b, t, h, hd))?;
        let (dq, dk, dv) = amp::attention_bwd(
            &s.q,
            &k_,
            &s.v,
            &s.o.reshape((b, t, h, hd))?,
            &s.lse,
            &d_o,
            &self.spec(),
        )?;
        drop((d_o, k_, s.q, s.v, s.qkv, s.o, s.lse));
        let n = b * t;
        let dqkv = Tensor::cat(
            &[
                &dq.reshape((n, d))?,
                &dk.reshape((n, d))?,
                &dv.reshape((n, d))?,
            ],
            1,
        )?;
        drop((dq, dk, dv));
        let dln1 = blk.c_attn.bwd(&s.ln1, &dqkv, grads, None)?;
        drop((dqkv, s.ln1));
        let dln1 = {
            let dln1_32 = amp::widen(&dln1)?;
            drop(dln1);
            dln1_32
        };
        let dn1 = blk.ln_1.bwd(&dln1, &s.x, &s.st1, grads)?;
        drop((dln1, s.x, s.st1));
        inplace::add(dx1, &dn1)
    }
}

impl Net for Gpt2 {
    type Saved = BlockSaved;
    type Ctx = ();

    fn n_layer(&self) -> usize {
        self.blocks.len()
    }

    fn width(&self) -> usize {
        self.d
    }

    fn ctx(&self, _t: usize, _dtype: DType, _device: &candle_core::Device) -> Result<()> {
        Ok(())
    }

    fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let (block_size, d) = self.wpe.dims2()?;
        if t > block_size {
            candle_core::bail!("sequence of {t} tokens exceeds block_size = {block_size}");
        }
        // [B·T, d] + [T, d] broadcast over the batch
        let tok = self
            .wte
            .index_select(&ids.flatten_all()?, 0)?
            .reshape((b, t, d))?;
        tok.broadcast_add(&self.wpe.narrow(0, 0, t)?)?
            .reshape((b * t, d))
    }

    fn embed_bwd(&self, ids: &Tensor, dx: Tensor, grads: &mut Grads) -> Result<()> {
        let (b, t) = ids.dims2()?;
        let (block_size, d) = self.wpe.dims2()?;
        // Positions: Σ over the batch, rows t.. of wpe get nothing.
        let dpos = dx.reshape((b, t, d))?.sum(0)?;
        let dwpe = if t == block_size {
            dpos
        } else {
            let rest = Tensor::zeros((block_size - t, d), dpos.dtype(), dpos.device())?;
            Tensor::cat(&[&dpos, &rest], 0)?
        };
        grads.add(WPE, dwpe)?;
        grads.add_rows(WTE, &self.wte, ids, &dx, None)
    }

    fn block_fwd(
        &self,
        i: usize,
        x: &Tensor,
        (b, t): (usize, usize),
        _ctx: &(),
        opts: &LeanOptions,
    ) -> Result<(Tensor, BlockSaved)> {
        if let Some(dt) = opts.amp {
            let (y, s) = self.block_fwd_amp(i, x, (b, t), dt)?;
            return Ok((y, BlockSaved::Amp(s)));
        }
        let blk = &self.blocks[i];
        let (h, hd) = (self.n_head, self.hd);
        let d = h * hd;
        let (ln1, st1) = blk.ln_1.fwd(x)?;
        // [N, 3d] -> q, k, v [B, T, H, hd], each a contiguous copy of its columns
        let qkv = blk.c_attn.fwd(&ln1)?;
        let part = |j: usize| {
            qkv.narrow(1, j * d, d)?
                .contiguous()?
                .reshape((b, t, h, hd))
        };
        let (q, k_, v) = (part(0)?, part(1)?, part(2)?);
        let qkv = match opts.saved {
            SavedSet::Fused => {
                drop(qkv);
                None
            }
            SavedSet::Transformers => Some(qkv),
        };
        let (o, attn) = attn_fwd(&q, &k_, &v, &self.spec(), opts.attention)?;
        // Which copies stay: q, k, v.
        let keep = match (opts.saved, opts.attention) {
            (SavedSet::Fused, _) => [true; 3],
            (SavedSet::Transformers, Attention::Flash) => [true, false, true],
            (SavedSet::Transformers, Attention::Eager) => [false; 3],
        };
        let [q, k_, v] = [(q, keep[0]), (k_, keep[1]), (v, keep[2])].map(|(t, k)| k.then_some(t));
        let o = o.reshape((b * t, d))?;
        let a = blk.attn_proj.fwd(&o)?;
        let x1 = k::add(x, &a)?;
        drop(a);
        let (ln2, st2) = blk.ln_2.fwd(&x1)?;
        let hpre = blk.c_fc.fwd(&ln2)?;
        let g = k::gelu_tanh_fwd(&hpre)?;
        let gelu_kept = match opts.saved {
            SavedSet::Transformers => kept::gelu_intermediates(&hpre, self.gelu)?,
            SavedSet::Fused => Vec::new(),
        };
        let m = blk.mlp_proj.fwd(&g)?;
        let y = k::add(&x1, &m)?;
        drop(m);
        let saved = Saved {
            x: x.clone(),
            st1,
            ln1,
            q,
            k: k_,
            qkv,
            v,
            o,
            attn,
            x1,
            st2,
            ln2,
            h: hpre,
            g,
            gelu_kept,
        };
        Ok((y, BlockSaved::Full(saved)))
    }

    fn block_bwd(
        &self,
        i: usize,
        s: BlockSaved,
        dy: Tensor,
        (b, t): (usize, usize),
        _ctx: &(),
        grads: &mut Grads,
    ) -> Result<Tensor> {
        let s = match s {
            BlockSaved::Full(s) => s,
            BlockSaved::Amp(s) => return self.block_bwd_amp(i, s, dy, (b, t), grads),
        };
        let blk = &self.blocks[i];
        let (h, hd) = (self.n_head, self.hd);
        let d = h * hd;
        // MLP
        let dg = blk.mlp_proj.bwd(&s.g, &dy, grads, None)?;
        drop(s.g);
        let dh = k::gelu_tanh_bwd(&s.h, &dg)?;
        drop((dg, s.h, s.gelu_kept));
        let dln2 = blk.c_fc.bwd(&s.ln2, &dh, grads, None)?;
        drop((dh, s.ln2));
        let dn2 = blk.ln_2.bwd(&dln2, &s.x1, &s.st2, grads)?;
        drop((dln2, s.x1, s.st2));
        let dx1 = inplace::add(dy, &dn2)?;
        drop(dn2);
        // attention
        let d_o = blk
            .attn_proj
            .bwd(&s.o, &dx1, grads, None)?
            .reshape((b, t, h, hd))?;
        let again = |kept: Option<Tensor>, j: usize| match (kept, &s.qkv) {
            (Some(t), _) => Ok(t),
            (None, Some(qkv)) => qkv
                .narrow(1, j * d, d)?
                .contiguous()?
                .reshape((b, t, h, hd)),
            (None, None) => candle_core::bail!("block {i} kept neither a copy nor qkv"),
        };
        let q = again(s.q, 0)?;
        let k_ = again(s.k, 1)?;
        let v = again(s.v, 2)?;
        let (dq, dk, dv) = attn_bwd(
            &q,
            &k_,
            &v,
            &s.o.reshape((b, t, h, hd))?,
            &s.attn,
            &d_o,
            &self.spec(),
        )?;
        drop((d_o, q, k_, v, s.qkv, s.o, s.attn));
        let n = b * t;
        // [N, 3d]: the three gradients side by side, as c_attn produced q | k | v
        let dqkv = Tensor::cat(
            &[
                &dq.reshape((n, d))?,
                &dk.reshape((n, d))?,
                &dv.reshape((n, d))?,
            ],
            1,
        )?;
        drop((dq, dk, dv));
        let dln1 = blk.c_attn.bwd(&s.ln1, &dqkv, grads, None)?;
        drop((dqkv, s.ln1));
        let dn1 = blk.ln_1.bwd(&dln1, &s.x, &s.st1, grads)?;
        drop((dln1, s.x, s.st1));
        inplace::add(dx1, &dn1)
    }

    fn final_norm(&self) -> &Norm {
        &self.ln_f
    }

    fn head(&self) -> (&Tensor, &str) {
        (&self.head, &self.head_name)
    }

    fn release_half(&self) {
        for b in &self.blocks {
            for l in [&b.c_attn, &b.attn_proj, &b.c_fc, &b.mlp_proj] {
                l.release_half();
            }
        }
    }
}
