//! A plan's rank as the lean step runs it (`train::parallel`): the rank's local config, what it
//! holds, and the closed-form peak of its part of the step (`train::memory::predict_rank`).
//! `verify --tp/--pp/--dp` under MPI checks each rank's measured peak against this; the candle
//! profile's activations come from the same closed form.

use super::{PlanInputs, ShardPlan};
use crate::config::{ModelConfig, Step};
use crate::error::{Error, Result};
use crate::train::memory::{self, LeanPrediction, RankPart};
use crate::train::{parallel, LeanOptions};

/// Rank `rank`'s local config (heads and inner width divided by TP) and its part of the step.
pub fn rank_part(
    cfg: &ModelConfig,
    plan: &ShardPlan,
    rank: usize,
) -> Result<(ModelConfig, RankPart)> {
    let r = plan
        .ranks
        .get(rank)
        .ok_or_else(|| Error::field("command line", "rank", rank, "not in the plan"))?;
    let local = parallel::local_config(cfg, plan.tp)
        .map_err(|why| Error::field("command line", "--tp", plan.tp, why))?;
    let (mut params, mut tensors, mut views) = (0u64, 0u64, 0u64);
    for t in &plan.tensors {
        if t.stages.contains(&r.pp_stage) {
            params += t.local_numel(r.tp_rank, plan.tp).0;
            tensors += 1;
        } else {
            views += 1;
        }
    }
    let part = RankPart {
        layers: plan.pp_layers[r.pp_stage] as u64,
        first: r.pp_stage == 0,
        last: r.pp_stage + 1 == plan.pp,
        tp: plan.tp > 1,
        params,
        tensors,
        views,
    };
    Ok((local, part))
}

/// The lean step's closed-form memory of rank `rank`'s part of one step of `plan`.
pub fn predicted(
    cfg: &ModelConfig,
    plan: &ShardPlan,
    rank: usize,
    opts: &LeanOptions,
) -> Result<LeanPrediction> {
    let (local, part) = rank_part(cfg, plan, rank)?;
    Ok(memory::predict_rank(&local, step_of(plan), opts, &part))
}

/// The plan's microbatch as a lean step.
pub fn step_of(plan: &ShardPlan) -> Step {
    Step {
        batch: plan.microbatch,
        seq: plan.seq,
        dtype: plan.dtype,
    }
}

/// Activation bytes of stage `stage` under the candle profile: what the lean step keeps, block by
/// block for each of the `in_flight` microbatches, plus the last stage's head and loss tensors
/// (and the RoPE tables every stage builds). None where the lean step cannot run the config's
/// tensor-parallel split (the caller keeps the PyTorch-style count).
pub(super) fn activations(
    cfg: &ModelConfig,
    inp: &PlanInputs,
    stage: usize,
    in_flight: u64,
) -> Option<u64> {
    let local = parallel::local_config(cfg, inp.tp).ok()?;
    let step = Step {
        batch: inp.microbatch,
        seq: inp.seq,
        dtype: inp.dtype,
    };
    let opts = LeanOptions::default();
    let part = RankPart {
        layers: inp.pp_layers[stage] as u64,
        first: stage == 0,
        last: stage + 1 == inp.pp,
        tp: inp.tp > 1,
        params: 0,
        tensors: 0,
        views: 0,
    };
    let saved = memory::predict_rank(&local, step, &opts, &part).saved_bytes;
    let blocks = part.layers * memory::block_saved_bytes(&local, step, &opts);
    Some(blocks * in_flight + saved.saturating_sub(blocks))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::presets;
    use crate::dtype::TrainDtype;
    use crate::plan::Engine;

    fn plan(cfg: &ModelConfig, tp: usize, pp: usize) -> ShardPlan {
        let inp = PlanInputs {
            engine: Engine::Candle,
            tp,
            pp,
            dp: 1,
            zero: 0,
            pp_layers: PlanInputs::even_layers(cfg, pp).unwrap(),
            microbatch: 2,
            grad_accum: 1,
            seq: 64,
            dtype: TrainDtype::F32,
        };
        ShardPlan::new(cfg, &inp).unwrap()
    }

    /// One rank holding everything is the single-process step, to the byte.
    #[test]
    fn one_rank_is_the_whole_step() {
        let cfg = presets::load("baby-gpt").unwrap();
        let p = plan(&cfg, 1, 1);
        let opts = LeanOptions::default();
        let whole = memory::predict(&cfg, step_of(&p), &opts);
        assert_eq!(predicted(&cfg, &p, 0, &opts).unwrap(), whole);
        assert_eq!(p.ranks[0].activations_bytes, whole.saved_bytes);
    }

    /// Two stages and two TP ranks each hold and keep less than the whole step.
    #[test]
    fn split_ranks_are_smaller() {
        let cfg = presets::load("baby-gpt").unwrap();
        let opts = LeanOptions::default();
        let whole = predicted(&cfg, &plan(&cfg, 1, 1), 0, &opts).unwrap();
        for (tp, pp) in [(2, 1), (1, 2), (2, 2)] {
            let p = plan(&cfg, tp, pp);
            for r in 0..tp * pp {
                let x = predicted(&cfg, &p, r, &opts).unwrap();
                assert!(x.peak_bytes < whole.peak_bytes, "tp {tp} pp {pp} rank {r}");
                assert!(x.saved_bytes < whole.saved_bytes);
            }
        }
    }
}
