//! What `truesize plan` found: a shard plan rank by rank, or the layouts of N GPUs that fit.

use super::render::{Render, View};
use super::section::{s, signed_group, Section};
use crate::plan::search::SearchResult;
use crate::plan::{RankMemory, ShardPlan};
use crate::units::{group, Bytes};
use serde::Serialize;

/// The result of `truesize plan`: one of `plan` (a layout) or `search` (`--gpus`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PlanReport {
    pub model: String,
    pub params_total: u64,
    pub plan: Option<ShardPlan>,
    pub search: Option<SearchResult>,
    /// Defaults the user did not choose (dtype, microbatch), said under the tables.
    pub notes: Vec<String>,
}

/// Ranks with identical figures (all DP ranks of a stage, usually) are shown once in tables.
fn same(a: &RankMemory, b: &RankMemory) -> bool {
    (
        a.pp_stage,
        a.params,
        a.weights_bytes,
        a.grads_bytes,
        a.optimizer_bytes,
        a.buffers_bytes,
        a.activations_bytes,
    ) == (
        b.pp_stage,
        b.params,
        b.weights_bytes,
        b.grads_bytes,
        b.optimizer_bytes,
        b.buffers_bytes,
        b.activations_bytes,
    )
}

fn rank_row(r: &RankMemory, alike: usize) -> Vec<String> {
    vec![
        if alike > 1 {
            format!("{} (+{} alike)", r.rank, alike - 1)
        } else {
            r.rank.to_string()
        },
        format!("{}/{}/{}", r.tp_rank, r.pp_stage, r.dp_rank),
        group(r.params),
        Bytes(r.weights_bytes).human(),
        Bytes(r.grads_bytes).human(),
        Bytes(r.optimizer_bytes).human(),
        Bytes(r.buffers_bytes).human(),
        format!(
            "{} ({} mb)",
            Bytes(r.activations_bytes).human(),
            r.microbatches_in_flight
        ),
        Bytes(r.total_bytes).human(),
    ]
}

fn plan_sections(p: &ShardPlan, model: &str) -> Vec<Section> {
    let mut rows: Vec<(RankMemory, usize)> = Vec::new();
    let mut order: Vec<&RankMemory> = p.ranks.iter().collect();
    order.sort_by_key(|r| (r.pp_stage, r.tp_rank, r.dp_rank));
    for r in order {
        match rows.iter_mut().find(|(x, _)| same(x, r)) {
            Some(e) => e.1 += 1,
            None => rows.push((r.clone(), 1)),
        }
    }
    let m = &p.most_loaded_rank;
    let mut notes = vec![
        format!(
            "most loaded: rank {} (tp {}, stage {}, dp {}): {} = {} B; imbalance (max / mean) {:.3}",
            m.rank,
            m.tp_rank,
            m.pp_stage,
            m.dp_rank,
            Bytes(m.total_bytes).human(),
            group(m.total_bytes),
            p.imbalance
        ),
        format!(
            "layers per stage {:?}; stage parameters (tp rank 0) {}; vocabulary {} rows{}",
            p.pp_layers,
            p.stage_params
                .iter()
                .map(|&x| group(x))
                .collect::<Vec<_>>()
                .join(" / "),
            group(p.padded_vocab as u64),
            if p.tensors.iter().any(|t| t.split == crate::plan::shard::Split::KvReplicated) {
                "; kv heads replicated (fewer kv heads than TP ranks)"
            } else {
                ""
            }
        ),
        format!(
            "rank = tp_rank + TP·(dp_rank + DP·pp_stage); activations: microbatches in flight under 1F1B × {}",
            if p.engine == crate::plan::Engine::Candle {
                "what the lean step saves per block (its closed form), plus the last stage's head and loss tensors, where the lean step runs the split (else a PyTorch-style step's)"
            } else {
                "what a PyTorch-style step saves per block"
            }
        ),
    ];
    for a in &p.anchors {
        notes.push(format!(
            "{}: {} ({}); {}",
            a.name,
            Bytes(a.bytes).human(),
            a.source,
            a.note
        ));
    }
    if p.anchors.is_empty() {
        notes.push(format!("{} publishes no memory estimate", p.engine.name()));
    }
    vec![Section {
        title: format!(
            "Plan for {model}: {} TP {} × PP {} × DP {}{} ({} ranks), {} microbatch {} × seq {}, {} microbatches",
            p.engine.name(),
            p.tp,
            p.pp,
            p.dp,
            if p.zero > 0 { format!(", ZeRO-{}", p.zero) } else { String::new() },
            p.world,
            p.dtype.name(),
            p.microbatch,
            p.seq,
            p.grad_accum
        ),
        header: [
            "rank", "tp/pp/dp", "params", "weights", "grads", "optimizer", "buffers",
            "activations", "total",
        ]
        .map(s)
        .to_vec(),
        rows: rows.iter().map(|(r, n)| rank_row(r, *n)).collect(),
        notes,
    }]
}

fn search_sections(r: &SearchResult, model: &str) -> Vec<Section> {
    let fitting = r.layouts.iter().filter(|l| l.fits).count();
    let mut notes = vec![format!(
        "{fitting} of {} layouts fit; ranked by the most loaded rank's headroom",
        r.layouts.len()
    )];
    for k in &r.skipped {
        notes.push(format!(
            "TP {} × PP {} × DP {}: skipped: {}",
            k.tp, k.pp, k.dp, k.why
        ));
    }
    vec![Section {
        title: format!(
            "Layouts of {} GPUs for {model} at {} per GPU ({})",
            r.gpus,
            Bytes(r.memory_bytes).human(),
            r.memory_source
        ),
        header: [
            "TP",
            "PP",
            "DP",
            "fits",
            "most loaded rank",
            "its total",
            "headroom",
            "imbalance",
        ]
        .map(s)
        .to_vec(),
        rows: r
            .layouts
            .iter()
            .map(|l| {
                let m = &l.most_loaded_rank;
                vec![
                    l.tp.to_string(),
                    l.pp.to_string(),
                    l.dp.to_string(),
                    s(if l.fits { "yes" } else { "no" }),
                    format!("{} (tp {}, stage {})", m.rank, m.tp_rank, m.pp_stage),
                    Bytes(m.total_bytes).human(),
                    format!("{} B", signed_group(l.headroom_bytes)),
                    format!("{:.3}", l.imbalance),
                ]
            })
            .collect(),
        notes,
    }]
}

impl Render for PlanReport {
    fn sections(&self, _view: View) -> Vec<Section> {
        let mut out = Vec::new();
        if let Some(p) = &self.plan {
            out.extend(plan_sections(p, &self.model));
        }
        if let Some(r) = &self.search {
            out.extend(search_sections(r, &self.model));
        }
        if let Some(last) = out.last_mut() {
            last.notes.extend(self.notes.iter().cloned());
        }
        out
    }
}

/// One process of a multi-process step.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DistRank {
    pub rank: usize,
    pub tp_rank: usize,
    pub pp_stage: usize,
    pub dp_rank: usize,
    /// Peak of its forward + backward above the baseline taken before its model was built
    /// (the counting allocator of that process).
    pub measured_peak_bytes: u64,
    /// The prediction of that peak for its part of the step: the lean step's closed form for the
    /// rank's shard (`plan::lean`), or the autograd replay where the lean step cannot run.
    pub predicted_peak_bytes: u64,
    /// The plan's (candle engine) weights + gradients for the rank.
    pub plan_weights_grads_bytes: u64,
    /// The plan's activations for the rank (candle profile: the lean step's saved set).
    pub plan_activations_bytes: u64,
    /// Under ZeRO: what the rank holds after the gradient reduce-scatter (weights + its 1/DP
    /// partition of the flat gradient buffer), measured and predicted.
    pub held_after_bytes: Option<u64>,
    pub predicted_held_after_bytes: Option<u64>,
}

/// What `mpirun -np N truesize verify --dp N` found (printed by rank 0).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DistributedRun {
    pub model: String,
    pub processes: usize,
    /// ZeRO stage across the DP group (0: gradients all-reduced).
    pub zero: u8,
    pub tp: usize,
    pub pp: usize,
    pub dp: usize,
    pub batch_per_rank: usize,
    pub seq: usize,
    pub dtype: crate::dtype::TrainDtype,
    /// max |gradient of the parallel step − single-process gradient| / max |gradient|, over
    /// every rank's shard of every parameter (DP-averaged, tied copies summed).
    pub grad_rel_error: f64,
    pub ranks: Vec<DistRank>,
    pub checks: Vec<crate::check::Check>,
    pub pass: bool,
}

impl Render for DistributedRun {
    fn sections(&self, _view: View) -> Vec<Section> {
        let r = self;
        let zero = r.zero > 0;
        let mut header = vec![
            "rank",
            "tp",
            "stage",
            "dp",
            "measured peak",
            "predicted",
            "plan: weights + grads",
            "plan: activations",
        ];
        if zero {
            header.extend(["held after reduce-scatter", "predicted"]);
        }
        let opt = |x: Option<u64>| x.map_or_else(String::new, |b| format!("{} B", group(b)));
        vec![
            Section {
                title: format!(
                    "Parallel step of {} over MPI: {} processes (TP {} × PP {} × DP {}{}), {} × {} tokens per DP rank, {}",
                    r.model,
                    r.processes,
                    r.tp,
                    r.pp,
                    r.dp,
                    if zero { format!(", ZeRO-{}", r.zero) } else { String::new() },
                    r.batch_per_rank,
                    r.seq,
                    r.dtype.name()
                ),
                header: header.into_iter().map(s).collect(),
                rows: r
                    .ranks
                    .iter()
                    .map(|x| {
                        let mut row = vec![
                            x.rank.to_string(),
                            x.tp_rank.to_string(),
                            x.pp_stage.to_string(),
                            x.dp_rank.to_string(),
                            format!("{} B", group(x.measured_peak_bytes)),
                            format!("{} B", group(x.predicted_peak_bytes)),
                            format!("{} B", group(x.plan_weights_grads_bytes)),
                            format!("{} B", group(x.plan_activations_bytes)),
                        ];
                        if zero {
                            row.push(opt(x.held_after_bytes));
                            row.push(opt(x.predicted_held_after_bytes));
                        }
                        row
                    })
                    .collect(),
                notes: vec![format!(
                    "gradients: every rank's shard (DP mean{}) vs the single-process step on the whole batch: max rel. error {:.3e}",
                    if zero { ", its partition of the flat buffer" } else { "" },
                    r.grad_rel_error
                )],
            },
            super::sections::checks::list(&r.checks, r.pass),
        ]
    }
}
