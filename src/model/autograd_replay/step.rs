//! The whole step, as `measure::run::train_step` runs it: weights, forward, loss, backward,
//! the gradients kept, one AdamW update; the peak of each phase and what was alive at it.

use super::backward::backward;
use super::closed_form::closed_form_kept;
use super::forward::{gpt2_forward, llama_forward, next_token_loss, tag, Weights};
use super::machine::Machine;
use super::tensor::{
    Block, Ctx, Dt, Mem, Storage, CTX, STORAGE_HEADER_BYTES, T, TENSOR_HEADER_BYTES, TI,
};
use super::ActivationModel;
use crate::config::{Arch, ModelConfig, Step};
use crate::dtype::TrainDtype;
use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::rc::Rc;

/// Per-parameter bookkeeping of the VarMap beyond the tensor's data (name `String`, `Var`, map
/// slot, tensor and storage headers): measured 330–340 B per tensor on the fixtures and
/// baby-gpt (verify's "weights: allocated bytes" check); 336 B is the baby-gpt figure
/// (13,941,648 − 4 · 3,481,088) / 52 tensors.
pub(super) const VARMAP_BYTES_PER_TENSOR: u64 = 336;
/// AdamW (candle-nn-0.11.1/src/optim.rs:169-178): θ, m and v are `Var`s, so every expression
/// of the update is *tracked* and the final `next_theta` holds its whole history until the end of
/// the iteration: m·β1, g·(1−β1), next_m, v·β2, g²·(1−β2), next_v, m̂, v̂, θ·(1−lr·λ), √v̂,
/// √v̂+ε, the quotient, its ·lr, next_theta = 14 tensors the size of the parameter (g² itself is
/// untracked and freed early). The largest parameter sets the peak.
pub(super) const ADAMW_TEMPORARIES: u64 = 14;

pub(super) fn dt_of(d: TrainDtype) -> Dt {
    match d {
        TrainDtype::F32 => Dt::F32,
        TrainDtype::F16 => Dt::F16,
        TrainDtype::Bf16 => Dt::Bf16,
    }
}

pub(super) fn replay(
    cfg: &ModelConfig,
    params: u64,
    step: Step,
    machine: Machine,
) -> ActivationModel {
    let mem = Rc::new(Mem {
        cur: Cell::new(0),
        peak: Cell::new(0),
        live: RefCell::new(BTreeMap::new()),
        at_peak: RefCell::new(BTreeMap::new()),
        tag: Cell::new("weights"),
    });
    let c = Rc::new(Ctx {
        mem: mem.clone(),
        next_id: Cell::new(0),
        machine,
        slabs: RefCell::new((None, Vec::new())),
    });
    CTX.with(|x| *x.borrow_mut() = Some(c.clone()));
    let dt = dt_of(step.dtype);
    let (b, t) = (step.batch, step.seq.max(2));
    let w = Weights::of(cfg, dt);
    // The input ids exist before the baseline: an uncounted plain tensor.
    let ids = {
        let id = c.next_id.get();
        c.next_id.set(id + 1);
        T(Rc::new(TI {
            id,
            dims: vec![b, t],
            stride: vec![t, 1],
            dt: Dt::U32,
            storage: Rc::new(Storage {
                numel: (b * t) as u64,
                _block: Block {
                    mem: mem.clone(),
                    bytes: 0,
                    tag: "weights",
                },
            }),
            op: None,
            var: false,
            _hdr: None,
        }))
    };
    // Weight bytes: the exact parameter count at the dtype, plus per-tensor bookkeeping for
    // every tensor of the family's list.
    let n_tensors = w.all.len() as u64;
    let e = step.dtype.bytes();
    mem.tag.set("weights");
    let weights_block = mem.alloc(params * e + n_tensors * VARMAP_BYTES_PER_TENSOR);
    let weights_bytes = weights_block.bytes;
    mem.reset_peak();

    let logits = match cfg.arch {
        Arch::Gpt2 => gpt2_forward(cfg, b, t, &ids, &w),
        Arch::Llama => llama_forward(cfg, b, t, &ids, &w),
    };
    let loss = next_token_loss(&logits, &ids);
    {
        // loss.to_dtype(F64).to_scalar()
        let _s = mem.alloc(STORAGE_HEADER_BYTES + 8 + TENSOR_HEADER_BYTES);
    }
    let forward_peak = mem.peak.get();
    let after_forward = mem.cur.get();
    let fwd_terms = mem.at_peak.borrow().clone();

    mem.reset_peak();
    tag("gradients (backward)");
    let store = backward(&loss);
    // detach the var grads we keep, drop the store and the graph (train_step)
    let kept: Vec<T> = w
        .all
        .iter()
        .filter_map(|v| store.map.get(&v.id()).map(|g| g.detach()))
        .collect();
    let backward_peak = mem.peak.get();
    let bwd_terms = mem.at_peak.borrow().clone();
    drop(store);
    drop(loss);
    // a block, not shadowing: a shadowed binding would keep the graph alive (run.rs does this)
    let logits = {
        let with_graph = logits;
        with_graph.detach()
    };
    let slab_uncertainty = {
        let s = c.slabs.borrow();
        if s.1.is_empty() {
            0
        } else {
            machine.threads.saturating_sub(1) * machine.l2_bytes / 2
        }
    };
    let slab_bytes = {
        let s = c.slabs.borrow();
        s.0.as_ref().map_or(0, |b| b.bytes) + s.1.iter().map(|b| b.bytes).sum::<u64>()
    };
    // Gradients exactly as allocated: data + one storage and tensor header each.
    let gradients_bytes: u64 = kept
        .iter()
        .map(|g| g.numel() * e + STORAGE_HEADER_BYTES + TENSOR_HEADER_BYTES + 16 * g.rank() as u64)
        .sum();

    // AdamW (candle-nn optim.rs): two zeroed Vars per parameter, then per parameter up to
    // ADAMW_TEMPORARIES temporaries of its size; the largest parameter sets the peak.
    mem.reset_peak();
    tag("optimizer (AdamW)");
    let state: Vec<Block> = w
        .all
        .iter()
        .flat_map(|v| {
            let bytes = v.numel() * e + STORAGE_HEADER_BYTES + TENSOR_HEADER_BYTES + 32;
            [mem.alloc(bytes), mem.alloc(bytes)]
        })
        .collect();
    let adamw_state_bytes: u64 = state.iter().map(|b| b.bytes).sum();
    let largest = w.all.iter().map(|v| v.numel()).max().unwrap_or(0);
    {
        let _tmp = mem.alloc(ADAMW_TEMPORARIES * (largest * e + STORAGE_HEADER_BYTES + 192));
    }
    let adamw_peak = mem.peak.get();
    drop(state);
    drop(logits);
    drop(kept);
    drop(weights_block);
    CTX.with(|x| *x.borrow_mut() = None);

    let peak = forward_peak.max(backward_peak);
    let at_peak = if backward_peak >= forward_peak {
        bwd_terms
    } else {
        fwd_terms
    };
    let mut terms: Vec<(String, u64)> = at_peak
        .into_iter()
        .filter(|(_, v)| *v > 0)
        .map(|(k, v)| (k.to_string(), v))
        .collect();
    terms.sort_by_key(|t| std::cmp::Reverse(t.1));
    let cf = closed_form_kept(cfg, step);
    let get = |k: &str| cf.iter().find(|x| x.0 == k).map_or(0, |x| x.1);
    let per_layer = get("layers (all)") / (cfg.n_layer.max(1) as u64);
    ActivationModel {
        weights_bytes,
        per_layer_kept_bytes: per_layer,
        embed_kept_bytes: get("embed"),
        head_kept_bytes: get("head"),
        forward_peak_bytes: forward_peak,
        after_forward_bytes: after_forward,
        backward_peak_bytes: backward_peak,
        peak_bytes: peak,
        gradients_bytes,
        gemm_slab_bytes: slab_bytes,
        gemm_slab_uncertainty_bytes: slab_uncertainty,
        adamw_peak_bytes: adamw_peak,
        adamw_state_bytes,
        terms,
    }
}
