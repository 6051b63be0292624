//! The lean step split across processes: Megatron-style tensor parallelism inside each block and
//! a pipeline of stages over the blocks. Communication goes through two small traits, so that the
//! step itself knows no transport: `cmd::verify_mpi` implements them over MPI; an NCCL (or any
//! other) implementation slots in by implementing the same two traits on device buffers.
//!
//! # Tensor parallelism
//!
//! Each rank builds the lean network from a *local* config (`local_config`: n_head / TP,
//! n_kv_head / TP, intermediate_size / TP; the residual width and head_dim unchanged) over its
//! shard of the weights, cut as `plan::shard` cuts them. The maps that read the residual stream
//! (q, k, v, gate, up; GPT-2's `c_attn` per q | k | v segment and `c_fc`) are column-parallel:
//! each rank computes its heads / its slice of the inner width with no communication. The maps
//! that write the residual stream (o_proj, down_proj, GPT-2's two `c_proj`) are row-parallel:
//! their partial products are all-reduced, then the (replicated) bias is added once. In backward
//! the input gradient of the column-parallel maps is partial; it is all-reduced once per shared
//! input (after v_proj, up_proj, `c_attn`, `c_fc`, the last map of each group in the backward's
//! order), not once per map: all-reduce is linear, so one reduction of the sum is the sum of the
//! reductions, at a third of the traffic for q/k/v. Everything else (norms, embeddings, head,
//! loss) is replicated and computes the same numbers on every rank of a TP group: the candle
//! profile of the plan, which keeps the vocabulary whole.
//!
//! Which map is which is decided when the network is loaded, by the parameter's name
//! (`role_of`); the family files only build their `Lin`s as before. Why not a column/row flag
//! passed through each family's `load`: the role is a property of the checkpoint key (Megatron
//! and the plan's `shard` decide it the same way), so one table here serves both families and
//! a new family with HF names gets it for free; the gradient check of the multi-process step
//! catches a map whose role is wrong.
//!
//! # Pipeline parallelism
//!
//! A stage holds the blocks of its layer range (the plan's `pp_layers`), stage 0 the embedding,
//! the last stage the final norm, the head and the loss (and, with tied embeddings, its own copy
//! of the embedding, as Megatron does; the two copies' gradients are summed after backward).
//! Parameters a stage does not hold are zero-strided views of the right shape (one element of
//! storage each), so that the family's `load` runs unchanged; the step never touches them.
//! Making every layer, the embedding and the head optional in each family instead would touch
//! every accessor of both families for a few hundred bytes per stage, which the closed form
//! counts (`memory::RankPart::views`).
//! `step::stage_step` runs the block range with the input received from the previous stage
//! and the output gradient received from the next one. One microbatch per step: with one
//! microbatch GPipe and 1F1B are the same schedule (forward down the stages, backward up).

use crate::config::ModelConfig;
use candle_core::{DType, Result, Tensor};
use std::rc::Rc;

/// A sum over the ranks of one tensor-parallel group (NCCL's `ncclAllReduce`, MPI's
/// `MPI_Allreduce`).
pub trait Collective {
    /// Every rank passes a tensor of the same shape; every rank gets the element-wise sum.
    fn all_reduce_sum(&self, t: Tensor) -> Result<Tensor>;
}

/// The neighbour stage (point-to-point, NCCL's `ncclSend`/`ncclRecv`, MPI's `MPI_Send`/`Recv`).
pub trait Link {
    fn send(&self, t: &Tensor) -> Result<()>;
    /// A tensor of `shape` (f32) from the neighbour.
    fn recv(&self, shape: (usize, usize)) -> Result<Tensor>;
}

/// What a linear map does under tensor parallelism.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Replicated, or TP = 1.
    Whole,
    /// Output columns split; its input gradient is partial and joins a shared sum.
    Column,
    /// Output columns split, and the last map of its input's group in backward: the summed
    /// input gradient is all-reduced here.
    ColumnReduce,
    /// Input rows split: the output is all-reduced before the bias.
    Row,
}

/// The role of the map `prefix` (a parameter name without `.weight`). The backward's order
/// decides which column map reduces: Llama runs q, k, v and gate, up; GPT-2 has one map each.
pub fn role_of(prefix: &str) -> Role {
    const COLUMN: [&str; 3] = ["self_attn.q_proj", "self_attn.k_proj", "mlp.gate_proj"];
    const REDUCE: [&str; 4] = ["self_attn.v_proj", "mlp.up_proj", "attn.c_attn", "mlp.c_fc"];
    const ROW: [&str; 3] = ["self_attn.o_proj", "mlp.down_proj", "c_proj"];
    if COLUMN.iter().any(|s| prefix.ends_with(s)) {
        Role::Column
    } else if REDUCE.iter().any(|s| prefix.ends_with(s)) {
        Role::ColumnReduce
    } else if ROW.iter().any(|s| prefix.ends_with(s)) {
        Role::Row
    } else {
        Role::Whole
    }
}

/// Why the lean step cannot run `cfg` at TP = `tp`, or the config one rank computes with.
pub fn local_config(cfg: &ModelConfig, tp: usize) -> std::result::Result<ModelConfig, String> {
    if tp == 1 {
        return Ok(cfg.clone());
    }
    if cfg.is_moe() {
        return Err("tensor parallelism of experts is not implemented by the lean step".into());
    }
    for (what, n) in [
        ("n_head", cfg.n_head),
        ("n_kv_head", cfg.n_kv_head),
        ("intermediate_size", cfg.intermediate_size),
    ] {
        if !n.is_multiple_of(tp) {
            return Err(format!(
                "{what} = {n} is not divisible by --tp {tp}: the lean step splits whole heads \
                 and the inner width evenly (kv-head replication is not implemented)"
            ));
        }
    }
    let mut local = cfg.clone();
    local.n_head /= tp;
    local.n_kv_head /= tp;
    // head_dim and n_embd stay: the residual stream is whole on every rank (GPT-2's attention
    // width becomes n_head · head_dim, no longer n_embd).
    local.intermediate_size /= tp;
    Ok(local)
}

/// How this process takes part: its tensor-parallel group, its neighbours and its layers.
#[derive(Clone, Default)]
pub struct Parallel {
    pub tp: Option<Rc<dyn Collective>>,
    /// The previous stage (None: this stage embeds).
    pub prev: Option<Rc<dyn Link>>,
    /// The next stage (None: this stage computes the head and the loss).
    pub next: Option<Rc<dyn Link>>,
    /// The global layer indices this stage runs.
    pub layers: std::ops::Range<usize>,
}

/// A zero-strided view of `shape`: what a stage holds for a parameter another stage owns.
pub(crate) fn placeholder(shape: &[usize], dtype: DType) -> Result<Tensor> {
    Tensor::zeros((), dtype, &candle_core::Device::Cpu)?.broadcast_as(shape)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::presets;

    #[test]
    fn maps_reduce_where_their_group_ends() {
        let l = "model.layers.3";
        assert_eq!(role_of(&format!("{l}.self_attn.q_proj")), Role::Column);
        assert_eq!(role_of(&format!("{l}.self_attn.k_proj")), Role::Column);
        assert_eq!(
            role_of(&format!("{l}.self_attn.v_proj")),
            Role::ColumnReduce
        );
        assert_eq!(role_of(&format!("{l}.self_attn.o_proj")), Role::Row);
        assert_eq!(role_of(&format!("{l}.mlp.gate_proj")), Role::Column);
        assert_eq!(role_of(&format!("{l}.mlp.up_proj")), Role::ColumnReduce);
        assert_eq!(role_of(&format!("{l}.mlp.down_proj")), Role::Row);
        let h = "transformer.h.0";
        assert_eq!(role_of(&format!("{h}.attn.c_attn")), Role::ColumnReduce);
        assert_eq!(role_of(&format!("{h}.attn.c_proj")), Role::Row);
        assert_eq!(role_of(&format!("{h}.mlp.c_fc")), Role::ColumnReduce);
        assert_eq!(role_of(&format!("{h}.mlp.c_proj")), Role::Row);
        assert_eq!(role_of("model.layers.0.block_sparse_moe.gate"), Role::Whole);
    }

    #[test]
    fn local_config_divides_heads_and_width_only() {
        let cfg = presets::load("llama3-8b").unwrap();
        let l = local_config(&cfg, 8).unwrap();
        assert_eq!((l.n_head, l.n_kv_head, l.head_dim), (4, 1, 128));
        assert_eq!((l.n_embd, l.intermediate_size), (4096, 1792));
        let err = local_config(&cfg, 16).unwrap_err();
        assert!(err.contains("n_kv_head = 8"), "{err}");
    }
}
