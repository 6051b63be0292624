//! Per-rank shard plans: every tensor of the family's list placed under tensor (TP), pipeline
//! (PP) and data parallelism (DP, with ZeRO or FSDP sharding), as a named engine does it, and
//! every rank's parameters, weights, gradients, optimizer states, buffers and activations.
//!
//! Ranks are numbered as Megatron orders its groups (TP fastest, then DP, then PP):
//! `rank = tp_rank + tp · (dp_rank + dp · pp_stage)`.

pub mod activations;
pub mod anchors;
pub mod backend;
pub mod engine;
pub mod lean;
pub mod search;
pub mod shard;

pub use engine::Engine;

use crate::config::ModelConfig;
use crate::dtype::TrainDtype;
use crate::error::{Error, Result};
use crate::family::{self, Component, Kind};
use anchors::{Anchor, AnchorInputs};
use serde::Serialize;
use shard::{Segment, Split, TensorShard};

/// Largest world size a plan lists rank by rank.
pub const MAX_WORLD: usize = 1 << 16;

/// The parallel layout and the step, validated against a config by [`ShardPlan::new`].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PlanInputs {
    pub engine: Engine,
    pub tp: usize,
    pub pp: usize,
    pub dp: usize,
    /// ZeRO stage (DeepSpeed 0–3; Megatron 1 = its distributed optimizer); FSDP2 reports 3.
    pub zero: u8,
    /// Layers per pipeline stage (even by default).
    pub pp_layers: Vec<usize>,
    /// Sequences per microbatch.
    pub microbatch: usize,
    /// Microbatches per step (gradient accumulation; what 1F1B pipelines).
    pub grad_accum: usize,
    pub seq: usize,
    pub dtype: TrainDtype,
}

impl PlanInputs {
    /// Even layers per stage, or an error naming `--pp`.
    pub fn even_layers(cfg: &ModelConfig, pp: usize) -> Result<Vec<usize>> {
        if pp == 0 || pp > cfg.n_layer {
            return Err(Error::field(
                "command line",
                "--pp",
                pp,
                format!("must be between 1 and n_layer = {}", cfg.n_layer),
            ));
        }
        if !cfg.n_layer.is_multiple_of(pp) {
            return Err(Error::field(
                "command line",
                "--pp",
                pp,
                format!(
                    "does not divide n_layer = {}: give the layers of each stage with --pp-layers",
                    cfg.n_layer
                ),
            ));
        }
        Ok(vec![cfg.n_layer / pp; pp])
    }

    pub fn world(&self) -> usize {
        self.tp * self.pp * self.dp
    }
}

/// One rank's memory. Bytes are exact integers; `total_bytes` is the sum of the parts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RankMemory {
    pub rank: usize,
    pub tp_rank: usize,
    pub pp_stage: usize,
    pub dp_rank: usize,
    /// Parameter elements the rank holds: its TP/PP slice (vocabulary padding rows included),
    /// or under ZeRO-3 / FSDP its real part of that slice.
    pub params: u64,
    /// Elements allocated beyond `params` for alignment (flat-buffer padding, FSDP's padded
    /// chunks), in the sharded states.
    pub padding_elems: u64,
    pub weights_bytes: u64,
    pub grads_bytes: u64,
    /// Master weights and the optimizer's moments.
    pub optimizer_bytes: u64,
    /// Gathered or communication buffers the engine sizes (FSDP2's unsharded layers, ZeRO-3's
    /// gathered layer); 0 where it keeps none beyond the states.
    pub buffers_bytes: u64,
    /// Activations of the microbatches in flight under 1F1B.
    pub activations_bytes: u64,
    /// Microbatches in flight on this rank's stage.
    pub microbatches_in_flight: u64,
    pub total_bytes: u64,
}

/// The plan for one layout.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ShardPlan {
    pub engine: Engine,
    pub tp: usize,
    pub pp: usize,
    pub dp: usize,
    pub zero: u8,
    pub world: usize,
    pub pp_layers: Vec<usize>,
    pub microbatch: usize,
    pub grad_accum: usize,
    pub seq: usize,
    pub dtype: TrainDtype,
    /// Vocabulary rows after the engine's padding (equal to `vocab_size` when none).
    pub padded_vocab: usize,
    /// Exact parameter count of the model (tied once).
    pub total_params: u64,
    /// Every rank, in rank order.
    pub ranks: Vec<RankMemory>,
    /// The rank with the largest total (the first such).
    pub most_loaded_rank: RankMemory,
    /// Largest total / mean total (1 when perfectly balanced).
    pub imbalance: f64,
    /// Each stage's parameters at TP rank 0 (before ZeRO/FSDP sharding).
    pub stage_params: Vec<u64>,
    pub anchors: Vec<Anchor>,
    /// Every tensor: its split, dimension, segments, stages.
    pub tensors: Vec<TensorShard>,
}

/// The stage of each layer under `pp_layers`.
fn layer_stages(pp_layers: &[usize]) -> Vec<usize> {
    pp_layers
        .iter()
        .enumerate()
        .flat_map(|(s, &n)| std::iter::repeat_n(s, n))
        .collect()
}

/// Every tensor of `cfg` placed and split. A tied embedding is held by the first and the last
/// stage when PP > 1 (the last computes the logits with its own copy).
pub fn shard_tensors(cfg: &ModelConfig, inp: &PlanInputs) -> Result<Vec<TensorShard>> {
    let last = inp.pp - 1;
    let stage_of = layer_stages(&inp.pp_layers);
    let mut out = Vec::new();
    for t in family::tensors(cfg) {
        let stages = match (t.layer, t.kind, t.component) {
            (Some(l), _, _) => vec![stage_of[l]],
            (None, Kind::Embedding, Component::EmbedTokens) if cfg.tie_embeddings && last > 0 => {
                vec![0, last]
            }
            (None, Kind::Embedding, _) => vec![0],
            (None, _, _) => vec![last],
        };
        out.push(shard::shard_tensor(inp.engine, cfg, &t, inp.tp, stages)?);
    }
    Ok(out)
}

/// Check the layout against the config and the engine, with errors naming the flag.
pub fn validate(cfg: &ModelConfig, inp: &PlanInputs) -> Result<()> {
    for (flag, v) in [("--tp", inp.tp), ("--pp", inp.pp), ("--dp", inp.dp)] {
        if v == 0 || v > MAX_WORLD {
            return Err(Error::field(
                "command line",
                flag,
                v,
                format!("must be between 1 and {MAX_WORLD}"),
            ));
        }
    }
    if inp.world() > MAX_WORLD {
        return Err(Error::field(
            "command line",
            "--tp × --pp × --dp",
            inp.world(),
            format!("at most {MAX_WORLD} ranks"),
        ));
    }
    inp.engine.check_zero(inp.zero)?;
    if inp.pp_layers.len() != inp.pp || inp.pp_layers.iter().sum::<usize>() != cfg.n_layer {
        return Err(Error::field(
            "command line",
            "--pp-layers",
            inp.pp_layers
                .iter()
                .map(|n| n.to_string())
                .collect::<Vec<_>>()
                .join(","),
            format!(
                "needs --pp = {} counts summing to n_layer = {}",
                inp.pp, cfg.n_layer
            ),
        ));
    }
    if inp.pp > cfg.n_layer {
        return Err(Error::field(
            "command line",
            "--pp",
            inp.pp,
            format!("more stages than n_layer = {}", cfg.n_layer),
        ));
    }
    shard_tensors(cfg, inp).map(|_| ())
}

/// Per-(tp rank, stage) sums before data parallelism.
struct Local {
    /// (alloc, real) numel of each tensor held, in list order.
    sizes: Vec<(u64, u64, usize)>,
    alloc: u64,
    /// Largest unit (a layer, or the stage's embeddings/norm/head) in elements.
    largest_unit: u64,
}

fn local(tensors: &[TensorShard], tp_rank: usize, tp: usize, stage: usize) -> Local {
    let mut sizes = Vec::new();
    let mut units: std::collections::BTreeMap<Option<usize>, u64> = Default::default();
    for t in tensors.iter().filter(|t| t.stages.contains(&stage)) {
        let (a, r) = t.local_numel(tp_rank, tp);
        let d0 = t.local_shape(tp_rank, tp).first().copied().unwrap_or(1);
        sizes.push((a, r, d0));
        *units.entry(t.layer).or_default() += a;
    }
    Local {
        alloc: sizes.iter().map(|s| s.0).sum(),
        sizes,
        largest_unit: units.values().copied().max().unwrap_or(0),
    }
}

/// `x` rounded up to a multiple of `m`.
fn round_up(x: u64, m: u64) -> u64 {
    x.div_ceil(m) * m
}

fn lcm(a: u64, b: u64) -> u64 {
    let (mut x, mut y) = (a, b);
    while y != 0 {
        (x, y) = (y, x % y);
    }
    a / x * b
}

impl ShardPlan {
    pub fn new(cfg: &ModelConfig, inp: &PlanInputs) -> Result<ShardPlan> {
        validate(cfg, inp)?;
        let tensors = shard_tensors(cfg, inp)?;
        let (tp, pp, dp) = (inp.tp, inp.pp, inp.dp);
        let widths = inp.engine.widths(inp.dtype);
        let w_act = inp.dtype.bytes();
        let tokens = (inp.microbatch * inp.seq) as u64;
        let stage_of = layer_stages(&inp.pp_layers);
        let head = tensors
            .iter()
            .find(|t| t.component == Component::LmHead)
            .or_else(|| {
                tensors
                    .iter()
                    .find(|t| t.component == Component::EmbedTokens)
            });
        let padded_vocab = head.map_or(cfg.vocab_size, |t| match t.segments[0] {
            Segment::Padded { padded, .. } => padded,
            _ => cfg.vocab_size,
        });
        let mut ranks = vec![None; tp * pp * dp];
        let mut stage_params = Vec::with_capacity(pp);
        for s in 0..pp {
            let in_flight = activations::in_flight(s, pp, inp.grad_accum);
            let layers_act: u64 = (0..cfg.n_layer)
                .filter(|&l| stage_of[l] == s)
                .map(|l| activations::layer_activation_bytes(cfg, l, tokens, w_act, tp))
                .sum();
            // candle's profile is the lean step's: its activations are that step's closed form.
            let lean_act = match inp.engine {
                Engine::Candle => lean::activations(cfg, inp, s, in_flight),
                _ => None,
            };
            for t in 0..tp {
                let loc = local(&tensors, t, tp, s);
                if t == 0 {
                    stage_params.push(loc.alloc);
                }
                let mut act = layers_act;
                if s == 0 {
                    act += activations::first_stage_extra_bytes(tokens);
                }
                act *= in_flight;
                if s == pp - 1 {
                    let rows = head.map_or(0, |h| h.local_shape(t, tp)[0] as u64);
                    act += activations::last_stage_extra_bytes(cfg, tokens, w_act, rows);
                }
                if let Some(a) = lean_act {
                    act = a;
                }
                for d in 0..dp {
                    let mut r = rank_states(inp, &loc, d, widths);
                    r.rank = t + tp * (d + dp * s);
                    r.tp_rank = t;
                    r.pp_stage = s;
                    r.dp_rank = d;
                    r.activations_bytes = act;
                    r.microbatches_in_flight = in_flight;
                    r.total_bytes = r.weights_bytes
                        + r.grads_bytes
                        + r.optimizer_bytes
                        + r.buffers_bytes
                        + r.activations_bytes;
                    let idx = r.rank;
                    ranks[idx] = Some(r);
                }
            }
        }
        let ranks: Vec<RankMemory> = ranks.into_iter().flatten().collect();
        let most = ranks
            .iter()
            .fold(
                &ranks[0],
                |m, r| if r.total_bytes > m.total_bytes { r } else { m },
            )
            .clone();
        let mean = ranks.iter().map(|r| r.total_bytes as f64).sum::<f64>() / ranks.len() as f64;
        let total_params = crate::estimate::params::estimate(cfg)?.total;
        let local_params = {
            let loc = local(&tensors, most.tp_rank, tp, most.pp_stage);
            loc.alloc
        };
        let anchors = anchors::anchors(
            inp.engine,
            cfg,
            &AnchorInputs {
                tp,
                pp,
                dp,
                zero: inp.zero,
                microbatch: inp.microbatch,
                microbatches: inp.grad_accum,
                seq: inp.seq,
                padded_vocab,
                total_params,
                local_params,
            },
        );
        Ok(ShardPlan {
            engine: inp.engine,
            tp,
            pp,
            dp,
            zero: if inp.engine == Engine::Fsdp2 {
                3
            } else {
                inp.zero
            },
            world: ranks.len(),
            pp_layers: inp.pp_layers.clone(),
            microbatch: inp.microbatch,
            grad_accum: inp.grad_accum,
            seq: inp.seq,
            dtype: inp.dtype,
            padded_vocab,
            total_params,
            imbalance: if mean > 0.0 {
                most.total_bytes as f64 / mean
            } else {
                1.0
            },
            most_loaded_rank: most,
            ranks,
            stage_params,
            anchors,
            tensors,
        })
    }

    /// Whether any tensor keeps whole kv heads on several ranks.
    pub fn kv_replicated(&self) -> bool {
        self.tensors.iter().any(|t| t.split == Split::KvReplicated)
    }
}

/// DP rank `d`'s states for the local slice `loc`: ZeRO / FSDP partitions as the engine cuts
/// them. `rank`, stage, activations and total are filled by the caller.
fn rank_states(inp: &PlanInputs, loc: &Local, d: usize, w: engine::Widths) -> RankMemory {
    let dp = inp.dp as u64;
    let p = loc.alloc;
    let mut r = RankMemory {
        rank: 0,
        tp_rank: 0,
        pp_stage: 0,
        dp_rank: d,
        params: p,
        padding_elems: 0,
        weights_bytes: p * w.weight,
        grads_bytes: p * w.grad,
        optimizer_bytes: p * w.optimizer,
        buffers_bytes: 0,
        activations_bytes: 0,
        microbatches_in_flight: 0,
        total_bytes: 0,
    };
    // The part of a flat buffer of `len` real elements padded to `padded` that rank d owns.
    let owned = |len: u64, part: u64| (len.saturating_sub(d as u64 * part)).min(part);
    match (inp.engine, inp.zero) {
        (Engine::Megatron, 1) => {
            let padded = round_up(p, lcm(dp, engine::MEGATRON_BUFFER_ALIGNMENT));
            r.padding_elems = padded - p;
            r.weights_bytes = padded * w.weight;
            r.grads_bytes = padded * w.grad;
            r.optimizer_bytes = padded / dp * w.optimizer;
        }
        (Engine::Deepspeed, 1 | 2) => {
            let padded = round_up(p, engine::DEEPSPEED_ALIGNMENT * dp);
            let part = padded / dp;
            r.padding_elems = part - owned(p, part);
            r.optimizer_bytes = part * w.optimizer;
            if inp.zero == 2 {
                r.grads_bytes = part * w.grad;
            }
        }
        (Engine::Deepspeed, 3) | (Engine::Fsdp2, _) => {
            // ZeRO-3 pads every parameter to a multiple of DP and gives each rank ceil(n / DP)
            // of it; FSDP2 chunks dim 0 with torch.chunk and pads every rank to the first
            // chunk's size.
            let (mut alloc, mut real) = (0u64, 0u64);
            for &(a, _, d0) in &loc.sizes {
                if inp.engine == Engine::Fsdp2 {
                    let rest = if d0 == 0 { 0 } else { a / d0 as u64 };
                    let c = (d0 as u64).div_ceil(dp);
                    alloc += c * rest;
                    real += (d0 as u64).saturating_sub(d as u64 * c).min(c) * rest;
                } else {
                    let c = a.div_ceil(dp);
                    alloc += c;
                    real += a.saturating_sub(d as u64 * c).min(c);
                }
            }
            r.params = real;
            r.padding_elems = alloc - real;
            r.weights_bytes = alloc * w.weight;
            r.grads_bytes = alloc * w.grad;
            r.optimizer_bytes = alloc * w.optimizer;
            // The gathered layer in the compute dtype: FSDP2 holds the current and the
            // prefetched next unit, ZeRO-3 the layer being computed.
            let gathered = if inp.engine == Engine::Fsdp2 { 2 } else { 1 };
            r.buffers_bytes = gathered * loc.largest_unit * inp.dtype.bytes();
        }
        _ => {}
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::presets;

    fn inputs(
        cfg: &ModelConfig,
        engine: Engine,
        tp: usize,
        pp: usize,
        dp: usize,
        zero: u8,
    ) -> PlanInputs {
        PlanInputs {
            engine,
            tp,
            pp,
            dp,
            zero,
            pp_layers: PlanInputs::even_layers(cfg, pp).unwrap(),
            microbatch: 1,
            grad_accum: 1,
            seq: 64,
            dtype: TrainDtype::Bf16,
        }
    }

    /// Llama-3-8B per layer: q, o 4096² each, k, v 1024·4096 each, MLP 3·14336·4096, two norms
    /// = 218,112,000; embedding and head 128,256·4096 = 525,336,576 each.
    #[test]
    fn llama3_8b_pipeline_stages() {
        let cfg = presets::load("llama3-8b").unwrap();
        let layer = 2 * 4096 * 4096 + 2 * 1024 * 4096 + 3 * 14336 * 4096 + 2 * 4096;
        assert_eq!(layer, 218_112_000u64);
        for engine in Engine::ALL {
            let p = ShardPlan::new(&cfg, &inputs(&cfg, engine, 1, 4, 1, 0)).unwrap();
            assert_eq!(
                p.stage_params,
                vec![2_270_232_576, 1_744_896_000, 1_744_896_000, 2_270_236_672],
                "{engine:?}"
            );
            assert_eq!(8 * layer + 525_336_576, 2_270_232_576);
        }
    }

    #[test]
    fn llama3_8b_tp8_candle_replicates_embedding_and_head() {
        let cfg = presets::load("llama3-8b").unwrap();
        let p = ShardPlan::new(&cfg, &inputs(&cfg, Engine::Candle, 8, 1, 1, 0)).unwrap();
        assert!(p.ranks.iter().all(|r| r.params == 1_923_354_624));
        // 32 layers of (attention + MLP)/8 + norms, embedding + head whole, final norm.
        let layer = (2 * 4096 * 4096 + 2 * 1024 * 4096 + 3 * 14336 * 4096) / 8 + 2 * 4096;
        assert_eq!(32 * layer + 2 * 525_336_576 + 4096, 1_923_354_624u64);
    }

    #[test]
    fn llama3_8b_tp8_megatron_pads_the_vocabulary() {
        let cfg = presets::load("llama3-8b").unwrap();
        let p = ShardPlan::new(&cfg, &inputs(&cfg, Engine::Megatron, 8, 1, 1, 0)).unwrap();
        assert_eq!(p.padded_vocab, 129_024);
        assert!(p.ranks.iter().all(|r| r.params == 1_004_802_048));
        // 18 B/param without the distributed optimizer.
        assert_eq!(
            p.ranks[0].weights_bytes + p.ranks[0].grads_bytes + p.ranks[0].optimizer_bytes,
            18 * 1_004_802_048
        );
    }

    #[test]
    fn megatron_distributed_optimizer_is_6_plus_12_over_dp() {
        let cfg = presets::load("llama3-8b").unwrap();
        let p = ShardPlan::new(&cfg, &inputs(&cfg, Engine::Megatron, 8, 1, 4, 1)).unwrap();
        let r = &p.ranks[0];
        // 1,004,802,048 is a multiple of lcm(4, 128): no padding.
        assert_eq!(r.padding_elems, 0);
        assert_eq!(
            r.weights_bytes + r.grads_bytes + r.optimizer_bytes,
            6 * 1_004_802_048 + 3 * 1_004_802_048
        );
    }

    #[test]
    fn kv_heads_fewer_than_ranks_follow_each_engine() {
        let cfg = presets::load("llama3-8b").unwrap(); // 8 kv heads
        for e in [Engine::Megatron, Engine::Candle] {
            let err = ShardPlan::new(&cfg, &inputs(&cfg, e, 16, 1, 1, 0))
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("--tp = 16") && err.contains("n_kv_head = 8"),
                "{err}"
            );
        }
        let p = ShardPlan::new(&cfg, &inputs(&cfg, Engine::Deepspeed, 16, 1, 1, 0)).unwrap();
        assert!(p.kv_replicated());
        let k = p
            .tensors
            .iter()
            .find(|t| t.name.ends_with("0.self_attn.k_proj.weight"))
            .unwrap();
        // Each rank holds one whole kv head: 128 rows; ranks 0 and 1 share head 0.
        assert_eq!(k.local_shape(1, 16), vec![128, 4096]);
        assert_eq!(k.pieces(1, 16)[0].src_start, 0);
        assert_eq!(k.pieces(2, 16)[0].src_start, 128);
    }

    #[test]
    fn deepspeed_zero_partitions_pad_to_twice_dp() {
        let cfg = presets::load("baby-gpt").unwrap();
        let p = ShardPlan::new(&cfg, &inputs(&cfg, Engine::Deepspeed, 1, 1, 3, 2)).unwrap();
        let n = 3_481_088u64; // the Baby GPT preset's published count
        let padded = n.div_ceil(6) * 6;
        for r in &p.ranks {
            assert_eq!(r.params, n);
            assert_eq!(r.optimizer_bytes, padded / 3 * 12);
            assert_eq!(r.grads_bytes, padded / 3 * 2);
            assert_eq!(r.weights_bytes, n * 2);
        }
        let z3 = ShardPlan::new(&cfg, &inputs(&cfg, Engine::Deepspeed, 1, 1, 3, 3)).unwrap();
        assert_eq!(z3.ranks.iter().map(|r| r.params).sum::<u64>(), n);
    }

    #[test]
    fn fsdp2_allocates_the_first_chunk_everywhere() {
        let cfg = presets::load("baby-gpt").unwrap(); // vocab 1000 on 3 ranks: 334, 334, 332
        let p = ShardPlan::new(&cfg, &inputs(&cfg, Engine::Fsdp2, 1, 1, 3, 0)).unwrap();
        let alloc: Vec<u64> = p.ranks.iter().map(|r| r.params + r.padding_elems).collect();
        assert!(alloc.iter().all(|&a| a == alloc[0]));
        assert_eq!(p.ranks.iter().map(|r| r.params).sum::<u64>(), 3_481_088);
        assert!(p.ranks[2].padding_elems > 0);
    }

    #[test]
    fn first_stage_holds_more_microbatches() {
        let cfg = presets::load("llama3-8b").unwrap();
        let mut i = inputs(&cfg, Engine::Megatron, 1, 4, 1, 0);
        i.grad_accum = 8;
        let p = ShardPlan::new(&cfg, &i).unwrap();
        let f: Vec<u64> = p.ranks.iter().map(|r| r.microbatches_in_flight).collect();
        assert_eq!(f, vec![4, 3, 2, 1]);
        let one = activations::layer_activation_bytes(&cfg, 0, 64, 2, 1);
        assert_eq!(p.ranks[1].activations_bytes, 3 * 8 * one);
    }

    #[test]
    fn megatron_anchor_matches_its_formula_by_hand() {
        // Llama-3-8B at TP 8, PP 1, DP 1: 18 B × ((block + padded embedding)/8 + embedding/8).
        let cfg = presets::load("llama3-8b").unwrap();
        let p = ShardPlan::new(&cfg, &inputs(&cfg, Engine::Megatron, 8, 1, 1, 0)).unwrap();
        let a = &p.anchors[0];
        let h = 4096f64;
        let layer = 2.0 * h * h * (1.0 + 8.0 / 32.0) + 2.0 * h * (14336.0 * 1.5 + 1.0);
        let block = 32.0 * layer + h;
        let emb = h * 129_024.0;
        let wo = ((block + emb) / 8.0 + emb / 8.0) * 18.0;
        assert_eq!(a.parts["weight_and_optimizer_bytes"], wo as u64);
    }
}
