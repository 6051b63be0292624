//! The lean training step: a forward that keeps, per block, what PyTorch's autograd keeps for
//! the same ops, and an explicit backward that walks the blocks in reverse.
//!
//! # Design
//!
//! candle's `backward()` keeps the whole forward graph alive until it returns and saves every
//! intermediate of the composed ops (norms, GELU, softmax, cross-entropy), and its attention
//! keeps several T×T tensors: 2.6–3.2× PyTorch's peak on the same step. This module does not
//! use candle's autograd at all. The weights are plain tensors sharing storage with the VarMap
//! (no `Var`, so candle records no graph), and each block has a forward that returns exactly the
//! tensors its backward reads (a `Saved` struct per family) and a hand-written backward, as llm.c's
//! `train_gpt2.c` does:
//!
//! - saved per block: each linear map's input, each norm's input and per-row mean / rstd (f32),
//!   the activation's inputs (GELU input; SiLU/GELU gate and up), attention's q, k, v, output
//!   and per-row log-sum-exp (flash style: the probabilities are recomputed in backward, no T×T
//!   is kept; `Attention::Eager` keeps them, as HF's eager attention), MoE routing probabilities,
//!   choices, weights and expert outputs; the loss keeps the logits and their per-row lse.
//! - backward: blocks in reverse, each block's saved struct consumed (freed) by its backward;
//!   every parameter's gradient accumulates in place into one buffer (a tied embedding once: the
//!   head's gradient buffer receives the embedding rows), as do the residual stream's and a
//!   shared input's gradients (`inplace`).
//! - `Checkpoint::Blocks` keeps each block's input only and runs its forward again just before
//!   its backward.
//!
//! Why not segment-wise autograd (each block's input a detached `Var`, the upstream gradient
//! injected as `(y · g).sum().backward()`): it would still run candle's composed ops, which save
//! every intermediate (a LayerNorm keeps five [N, C] tensors, softmax attention several T×T) and
//! allocate a zeros tensor plus an add per gradient contribution, so the block's transient peak
//! stays far above PyTorch's and is hard to write down; and it cannot use fused kernels, which
//! have no candle backward. An explicit backward allocates deliberately, so its memory is a
//! closed form (`memory`), and it runs the fused CPU kernels (`kernels`) where the time goes;
//! matrix products stay candle's `matmul` (gemm).
//!
//! The maths mirrors `model::gpt2` and `model::llama` (HF's to 1e-7), every switch of the Llama
//! skeleton included (q/k norms, sandwich norms, the embedding scale, soft-caps, fused
//! projections, partial rotary); `tests/lean_step.rs` checks every parameter's gradient against
//! candle autograd on those networks.
//!
//! Across processes (`parallel`): a rank builds the network from its local config over its
//! shard, its linear maps reduce over the tensor-parallel group where their role says so, and
//! `step::stage_step` runs its stage's block range between the neighbouring stages; the whole
//! step is the one stage with no neighbours.

mod amp;
mod gpt2;
mod inplace;
mod kept;
pub mod kernels;
mod layers;
mod llama;
pub mod memory;
pub mod optim;
pub mod parallel;
pub mod run;
mod step;

use kernels as k;

use crate::config::{Arch, ModelConfig, NormPlacement, Storage};
use candle_core::{Result, Tensor};
use candle_nn::VarMap;
use layers::Params;
use serde::Serialize;
use std::collections::BTreeMap;

/// What the forward keeps of each block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Checkpoint {
    /// Everything the block's backward reads.
    None,
    /// The block's input only; its forward runs again during backward.
    Blocks,
}

/// How attention keeps what its backward needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Attention {
    /// q, k, v, output and per-row log-sum-exp; probabilities recomputed (PyTorch sdpa).
    Flash,
    /// The T×T probabilities too (HF eager attention).
    Eager,
}

/// Which tensors the forward keeps beyond what the fused backward reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum SavedSet {
    /// What PyTorch's autograd keeps for HF transformers' modules, op by op: the composed GELU's
    /// intermediates (`gelu_new`: tanh, ½x and 1 + tanh), each RMSNorm's normalized input, the
    /// gated MLP's activation output, GPT-2's whole qkv projection (sdpa keeps a view of it), the
    /// f32 log-probabilities of the loss and, in backward, their gradient beside the logits'
    /// gradient, with the logits alive until the step ends (`out = model(ids, labels=ids);
    /// out.loss.backward()` holds them). The default: people size for HF training.
    Transformers,
    /// Only what fused kernels read back (llm.c's set): the loss's gradient is written over the
    /// logits, no intermediate of an elementwise op is kept.
    Fused,
}

/// The optimizer step after backward, holding memory as PyTorch's foreach implementations do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Optimizer {
    #[serde(rename = "adamw")]
    #[value(name = "adamw")]
    AdamW,
    Sgd,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct LeanOptions {
    pub checkpoint: Checkpoint,
    pub attention: Attention,
    /// Some(BF16|F16): PyTorch-AMP-style mixed precision (f32 master weights, f32 grads and
    /// optimizer states, matmuls and activations in this dtype). None: everything in the
    /// weights' dtype.
    #[serde(serialize_with = "dtype_name")]
    pub amp: Option<candle_core::DType>,
    pub optimizer: Option<Optimizer>,
    pub saved: SavedSet,
}

fn dtype_name<S: serde::Serializer>(
    d: &Option<candle_core::DType>,
    s: S,
) -> std::result::Result<S::Ok, S::Error> {
    match d {
        Some(d) => s.serialize_some(d.as_str()),
        None => s.serialize_none(),
    }
}

impl Default for LeanOptions {
    fn default() -> Self {
        LeanOptions {
            checkpoint: Checkpoint::None,
            attention: Attention::Flash,
            amp: None,
            optimizer: None,
            saved: SavedSet::Transformers,
        }
    }
}

/// Why the lean step cannot run this config (a switch it does not implement), or Ok. Every
/// switch of the Llama skeleton and GPT-2 is implemented in f32; mixed precision covers GPT-2
/// and the plain Llama layer (separate maps, pre-norms, dense MLP, no window in effect) with
/// HF's saved set and sdpa attention. Without a sequence length, any sliding window counts as in
/// effect; `supported_at` knows the length.
pub fn supported(cfg: &ModelConfig, opts: &LeanOptions) -> std::result::Result<(), String> {
    supported_at(cfg, opts, usize::MAX)
}

/// `supported` for sequences of `seq` tokens: a sliding window w is in effect from seq ≥ w (HF
/// then hands sdpa an explicit mask); shorter sequences see plain causal attention.
pub fn supported_at(
    cfg: &ModelConfig,
    opts: &LeanOptions,
    seq: usize,
) -> std::result::Result<(), String> {
    if opts.amp.is_none() {
        return Ok(());
    }
    let not_yet = |what: &str| {
        Err(format!(
            "mixed precision (amp) {what} is not implemented yet"
        ))
    };
    if cfg.arch == Arch::Llama {
        let windowed = (0..cfg.n_layer).any(|i| cfg.attention_window(i).is_some_and(|w| seq >= w));
        let unsupported = [
            (
                cfg.qkv_storage == Storage::Fused,
                "with a fused qkv projection",
            ),
            (
                cfg.gate_up_storage == Storage::Fused,
                "with a fused gate/up projection",
            ),
            (cfg.qk_norm, "with q/k norms"),
            (
                cfg.norm_placement == NormPlacement::Sandwich,
                "with sandwich norms",
            ),
            (cfg.is_moe(), "for a mixture of experts"),
            (cfg.final_softcap.is_some(), "with a final soft-cap"),
            (windowed, "with a sliding window in effect (seq ≥ window)"),
        ];
        if let Some((_, what)) = unsupported.iter().find(|(on, _)| *on) {
            return not_yet(what);
        }
    }
    if opts.attention == Attention::Eager {
        return not_yet("with eager attention");
    }
    if opts.saved == SavedSet::Fused {
        return not_yet("with the fused saved set");
    }
    Ok(())
}

enum Net {
    Gpt2(gpt2::Gpt2),
    Llama(Box<llama::Llama>),
}

/// The parameters by HF name, sharing storage with the VarMap (no copy).
pub struct LeanModel {
    net: Net,
    params: Params,
}

impl LeanModel {
    pub fn from_varmap(cfg: &ModelConfig, varmap: &VarMap) -> Result<LeanModel> {
        if let Err(why) = supported(cfg, &LeanOptions::default()) {
            candle_core::bail!("{why}");
        }
        let params = Params::from_varmap(varmap);
        let net = match cfg.arch {
            Arch::Gpt2 => Net::Gpt2(gpt2::Gpt2::load(cfg, &params)?),
            Arch::Llama => Net::Llama(Box::new(llama::Llama::load(cfg, &params)?)),
        };
        Ok(LeanModel { net, params })
    }

    /// Logits `[B, T, V]` from a forward that saves nothing (reference checks, outside
    /// measurement).
    pub fn logits(&self, input_ids: &Tensor) -> Result<Tensor> {
        match &self.net {
            Net::Gpt2(n) => step::logits(n, input_ids),
            Net::Llama(n) => step::logits(n.as_ref(), input_ids),
        }
    }

    /// One step without measurement: mean next-token loss and every parameter's gradient by
    /// name.
    pub fn loss_and_grads(
        &self,
        input_ids: &Tensor,
        opts: &LeanOptions,
    ) -> Result<(f64, BTreeMap<String, Tensor>)> {
        let (loss, grads) = match &self.net {
            Net::Gpt2(n) => step::loss_and_grads(n, input_ids, opts, &mut || Ok(()))?,
            Net::Llama(n) => step::loss_and_grads(n.as_ref(), input_ids, opts, &mut || Ok(()))?,
        };
        Ok((loss, grads.0))
    }

    /// `loss_and_grads` with `forward_done` run between the loss and the backward.
    pub(crate) fn step_with(
        &self,
        input_ids: &Tensor,
        opts: &LeanOptions,
        forward_done: &mut dyn FnMut() -> Result<()>,
    ) -> Result<(f64, BTreeMap<String, Tensor>)> {
        let (loss, grads) = match &self.net {
            Net::Gpt2(n) => step::loss_and_grads(n, input_ids, opts, forward_done)?,
            Net::Llama(n) => step::loss_and_grads(n.as_ref(), input_ids, opts, forward_done)?,
        };
        Ok((loss, grads.0))
    }

    /// One rank of a tensor- and pipeline-parallel step (`parallel`): the network built from the
    /// rank's local config over its own tensors (`varmap`) and zero-strided views of those other
    /// stages hold (`elsewhere`: name and shape).
    pub fn for_rank(
        local_cfg: &ModelConfig,
        varmap: &VarMap,
        elsewhere: &[(String, Vec<usize>)],
        tp: Option<std::rc::Rc<dyn parallel::Collective>>,
    ) -> Result<LeanModel> {
        if let Err(why) = supported(local_cfg, &LeanOptions::default()) {
            candle_core::bail!("{why}");
        }
        let params = Params::for_rank(varmap, elsewhere, tp)?;
        let net = match local_cfg.arch {
            Arch::Gpt2 => Net::Gpt2(gpt2::Gpt2::load(local_cfg, &params)?),
            Arch::Llama => Net::Llama(Box::new(llama::Llama::load(local_cfg, &params)?)),
        };
        Ok(LeanModel { net, params })
    }

    /// This rank's part of the step (`parallel::Parallel`): the loss where this stage computes
    /// it, and the gradient of every parameter the stage holds, by name.
    pub fn stage_step(
        &self,
        input_ids: &Tensor,
        part: &parallel::Parallel,
        opts: &LeanOptions,
    ) -> Result<(Option<f64>, BTreeMap<String, Tensor>)> {
        let (loss, grads) = match &self.net {
            Net::Gpt2(n) => step::stage_step(n, input_ids, part, opts, &mut || Ok(()))?,
            Net::Llama(n) => step::stage_step(n.as_ref(), input_ids, part, opts, &mut || Ok(()))?,
        };
        Ok((loss, grads.0))
    }

    /// Every parameter by name (shared storage).
    pub fn params(&self) -> impl Iterator<Item = (&String, &Tensor)> {
        self.params.iter()
    }
}
