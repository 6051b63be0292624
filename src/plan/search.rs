//! Which layouts of N GPUs (TP × PP × DP = N) fit a per-GPU memory, ranked by the headroom of
//! their most loaded rank.

use super::{PlanInputs, RankMemory, ShardPlan};
use crate::config::ModelConfig;
use serde::Serialize;

/// One layout tried.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LayoutFit {
    pub tp: usize,
    pub pp: usize,
    pub dp: usize,
    pub most_loaded_rank: RankMemory,
    /// memory − the most loaded rank's total (negative: it does not fit).
    pub headroom_bytes: i128,
    pub fits: bool,
    pub imbalance: f64,
}

/// A layout the engine or the model rules out, and why.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Skipped {
    pub tp: usize,
    pub pp: usize,
    pub dp: usize,
    pub why: String,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SearchResult {
    pub gpus: usize,
    pub memory_bytes: u64,
    /// Where the memory came from (a GPU's name or `--memory`).
    pub memory_source: String,
    /// Every valid layout, those that fit first, by headroom (largest first).
    pub layouts: Vec<LayoutFit>,
    pub skipped: Vec<Skipped>,
}

fn divisors(n: usize) -> Vec<usize> {
    (1..=n).filter(|d| n.is_multiple_of(*d)).collect()
}

/// Every TP × PP × DP = `gpus` under `base`'s engine, ZeRO stage and step (layers even per
/// stage), planned and ranked.
pub fn search(
    cfg: &ModelConfig,
    base: &PlanInputs,
    gpus: usize,
    memory_bytes: u64,
    memory_source: String,
) -> SearchResult {
    let mut layouts = Vec::new();
    let mut skipped = Vec::new();
    for tp in divisors(gpus) {
        for pp in divisors(gpus / tp) {
            let dp = gpus / tp / pp;
            let tried = PlanInputs::even_layers(cfg, pp).and_then(|pp_layers| {
                ShardPlan::new(
                    cfg,
                    &PlanInputs {
                        tp,
                        pp,
                        dp,
                        pp_layers,
                        ..base.clone()
                    },
                )
            });
            match tried {
                Ok(plan) => {
                    let m = plan.most_loaded_rank;
                    let headroom = memory_bytes as i128 - m.total_bytes as i128;
                    layouts.push(LayoutFit {
                        tp,
                        pp,
                        dp,
                        headroom_bytes: headroom,
                        fits: headroom >= 0,
                        imbalance: plan.imbalance,
                        most_loaded_rank: m,
                    });
                }
                Err(e) => skipped.push(Skipped {
                    tp,
                    pp,
                    dp,
                    why: e.to_string(),
                }),
            }
        }
    }
    layouts.sort_by_key(|l| std::cmp::Reverse(l.headroom_bytes));
    SearchResult {
        gpus,
        memory_bytes,
        memory_source,
        layouts,
        skipped,
    }
}
