//! `truesize plan`: shard plans checked against rank-by-rank builds of the genuine network
//! through the sharding VarBuilder backend (shape-only for large configs, real tiny HF
//! checkpoints through candle's ShardedSafeTensors), and the command's exit codes.

mod common;

use candle_core::{DType, Device, Tensor};
use common::{fixtures, json_of, truesize};
use truesize::config::{self, presets, ConfigSource, ModelConfig};
use truesize::dtype::TrainDtype;
use truesize::plan::backend::{build_rank, Source};
use truesize::plan::{Engine, PlanInputs, ShardPlan};

fn inputs(
    cfg: &ModelConfig,
    engine: Engine,
    tp: usize,
    pp: usize,
    dp: usize,
    zero: u8,
) -> Option<PlanInputs> {
    Some(PlanInputs {
        engine,
        tp,
        pp,
        dp,
        zero,
        pp_layers: PlanInputs::even_layers(cfg, pp).ok()?,
        microbatch: 1,
        grad_accum: 4,
        seq: 32,
        dtype: TrainDtype::Bf16,
    })
}

/// Σ numel of what a rank holds, built through the backend.
fn held(
    cfg: &ModelConfig,
    plan: &ShardPlan,
    t: usize,
    s: usize,
    source: &Source,
) -> (u64, Vec<(String, Tensor)>) {
    let ts = build_rank(cfg, &plan.tensors, plan.tp, t, s, source, DType::F32).unwrap();
    let n = ts.values().map(|x| x.elem_count() as u64).sum();
    (n, ts.into_iter().collect())
}

/// The DP partitions of a rank's held tensors, computed with tensor narrowing: (real, padding)
/// elements per DP rank for DeepSpeed's flat buffers and ZeRO-3's per-parameter padding, and
/// FSDP2's dim-0 `torch.chunk` pieces.
fn partitions(engine: Engine, zero: u8, dp: usize, ts: &[(String, Tensor)]) -> Vec<(u64, u64)> {
    let dp64 = dp as u64;
    match (engine, zero) {
        (Engine::Fsdp2, _) => (0..dp)
            .map(|d| {
                let (mut real, mut alloc) = (0, 0);
                for (_, t) in ts {
                    let d0 = t.dims().first().copied().unwrap_or(1);
                    let rest = t.elem_count().checked_div(d0).unwrap_or(0) as u64;
                    let c = d0.div_ceil(dp);
                    let start = (d * c).min(d0);
                    let len = (d0 - start).min(c);
                    // Narrowing proves the chunk lies in the tensor.
                    real += t.narrow(0, start, len).unwrap().elem_count() as u64;
                    alloc += c as u64 * rest;
                }
                (real, alloc - real)
            })
            .collect(),
        (Engine::Deepspeed, 3) => (0..dp64)
            .map(|d| {
                let (mut real, mut alloc) = (0, 0);
                for (_, t) in ts {
                    let n = t.elem_count() as u64;
                    let c = n.div_ceil(dp64);
                    real += n.saturating_sub(d * c).min(c);
                    alloc += c;
                }
                (real, alloc - real)
            })
            .collect(),
        _ => {
            let p: u64 = ts.iter().map(|(_, t)| t.elem_count() as u64).sum();
            if engine == Engine::Megatron {
                // The distributed optimizer's buffers are padded as a whole, on every rank.
                let align = lcm(dp64, 128);
                return vec![(p, p.div_ceil(align) * align - p); dp];
            }
            let part = p.div_ceil(2 * dp64) * 2;
            (0..dp64)
                .map(|d| {
                    let real = p.saturating_sub(d * part).min(part);
                    (real, part - real)
                })
                .collect()
        }
    }
}

fn lcm(a: u64, b: u64) -> u64 {
    let (mut x, mut y) = (a, b);
    while y != 0 {
        (x, y) = (y, x % y);
    }
    a / x * b
}

/// For every layout of TP {1,2,4,8} × PP {1,2,4} × ZeRO {0..3} each engine accepts, each rank's
/// parameters in the plan equal Σ numel of what the backend hands that rank; rejected layouts
/// fail with a message naming the flag.
fn sweep(cfg: &ModelConfig, source: &Source) -> usize {
    let mut checked = 0;
    for engine in Engine::ALL {
        for tp in [1, 2, 4, 8] {
            for pp in [1, 2, 4] {
                let Some(base) = inputs(cfg, engine, tp, pp, 1, 0) else {
                    continue;
                };
                let plan = match ShardPlan::new(cfg, &base) {
                    Ok(p) => p,
                    Err(e) => {
                        let m = e.to_string();
                        assert!(
                            m.contains("--tp") || m.contains("--pp"),
                            "{engine:?} {tp} {pp}: {m}"
                        );
                        continue;
                    }
                };
                let mut builds = Vec::new();
                for s in 0..pp {
                    for t in 0..tp {
                        let (n, ts) = held(cfg, &plan, t, s, source);
                        let r = plan
                            .ranks
                            .iter()
                            .find(|r| r.tp_rank == t && r.pp_stage == s && r.dp_rank == 0)
                            .unwrap();
                        assert_eq!(
                            r.params, n,
                            "{} {engine:?} tp {tp} pp {pp} rank t{t} s{s}",
                            cfg.name
                        );
                        builds.push((t, s, ts));
                        checked += 1;
                    }
                }
                for zero in 0..=3u8 {
                    let Some(i) = inputs(cfg, engine, tp, pp, 3, zero) else {
                        continue;
                    };
                    let Ok(zp) = ShardPlan::new(cfg, &i) else {
                        assert!(engine.check_zero(zero).is_err());
                        continue;
                    };
                    for (t, s, ts) in &builds {
                        let parts = partitions(engine, zero, 3, ts);
                        let total: u64 = ts.iter().map(|(_, x)| x.elem_count() as u64).sum();
                        for (d, (real, pad)) in parts.iter().enumerate() {
                            let r = zp
                                .ranks
                                .iter()
                                .find(|r| r.tp_rank == *t && r.pp_stage == *s && r.dp_rank == d)
                                .unwrap();
                            let sharded_params = matches!(
                                (engine, zero),
                                (Engine::Deepspeed, 3) | (Engine::Fsdp2, _)
                            );
                            if sharded_params {
                                assert_eq!(
                                    (r.params, r.padding_elems),
                                    (*real, *pad),
                                    "{engine:?} z{zero} d{d}"
                                );
                            } else {
                                assert_eq!(r.params, total);
                                if zero > 0 {
                                    assert_eq!(r.padding_elems, *pad, "{engine:?} z{zero} d{d}");
                                }
                            }
                        }
                        if matches!((engine, zero), (Engine::Deepspeed, 3) | (Engine::Fsdp2, _)) {
                            assert_eq!(parts.iter().map(|p| p.0).sum::<u64>(), total);
                        }
                    }
                }
            }
        }
    }
    checked
}

#[test]
fn shards_match_the_plan_on_large_shape_only_configs() {
    for name in [
        "llama3-8b",
        "gpt2",
        "mixtral-8x7b",
        "phi3-mini",
        "qwen2.5-7b",
        "llama3.1-70b",
    ] {
        let cfg = presets::load(name).unwrap();
        let n = sweep(&cfg, &Source::Shapes);
        assert!(n > 20, "{name}: only {n} ranks checked");
    }
}

fn tiny(name: &str) -> (ModelConfig, Source) {
    let dir = fixtures().join(name);
    let cfg = config::load(ConfigSource::Path(&dir)).unwrap();
    (cfg, Source::Checkpoint(vec![dir.join("model.safetensors")]))
}

#[test]
fn shards_match_the_plan_on_real_tiny_checkpoints() {
    for name in [
        "tiny-gpt2",
        "tiny-llama",
        "tiny-qwen2",
        "tiny-mixtral",
        "tiny-phi3",
    ] {
        let (cfg, src) = tiny(name);
        let n = sweep(&cfg, &src);
        assert!(n >= 6, "{name}: only {n} ranks checked");
    }
}

/// Concatenating every TP rank's piece gives back the checkpoint's tensor: candle's
/// ShardedSafeTensors for whole splits, Megatron's zero rows where it pads the vocabulary.
#[test]
fn tp_pieces_reassemble_the_checkpoint() {
    let (cfg, src) = tiny("tiny-llama");
    let dir = fixtures().join("tiny-llama");
    let full = candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap();
    let plan = ShardPlan::new(&cfg, &inputs(&cfg, Engine::Megatron, 2, 1, 1, 0).unwrap()).unwrap();
    assert_eq!(plan.padded_vocab, 256); // 101 padded to a multiple of 128·2
    let ranks: Vec<_> = (0..2).map(|t| held(&cfg, &plan, t, 0, &src).1).collect();
    for name in [
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.1.mlp.down_proj.weight",
        "lm_head.weight",
    ] {
        let t = plan.tensors.iter().find(|t| t.name == name).unwrap();
        let dim = t.dim.unwrap();
        let parts: Vec<Tensor> = ranks
            .iter()
            .map(|r| r.iter().find(|(n, _)| n == name).unwrap().1.clone())
            .collect();
        let joined = Tensor::cat(&parts, dim).unwrap();
        let original = full[name].to_dtype(DType::F32).unwrap();
        let real = original.dim(dim).unwrap();
        let head = joined.narrow(dim, 0, real).unwrap();
        let diff = (head - &original)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(diff, 0.0, "{name}");
        let pad = joined.dim(dim).unwrap() - real;
        if pad > 0 {
            let z = joined
                .narrow(dim, real, pad)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert_eq!(z, 0.0, "{name}: padding rows are zeros");
        }
    }
}

/// 2 kv heads on 4 ranks: candle's ShardedSafeTensors cuts k_proj into 4 blocks of 8 rows
/// (half a 16-row head each) without an error; the candle and Megatron profiles refuse, and
/// DeepSpeed/FSDP2 give each rank one whole head.
#[test]
fn too_few_kv_heads_never_split_half_a_head() {
    let (cfg, src) = tiny("tiny-llama");
    assert_eq!((cfg.n_kv_head, cfg.head_dim), (2, 16));
    let dir = fixtures().join("tiny-llama");
    let vb = unsafe {
        candle_nn::var_builder::ShardedSafeTensors::var_builder(
            &[dir.join("model.safetensors")],
            DType::F32,
            &Device::Cpu,
        )
    }
    .unwrap();
    let hint = candle_nn::var_builder::Shard {
        dim: 0,
        rank: 1,
        world_size: 4,
    };
    let half = vb
        .get_with_hints((8, 64), "model.layers.0.self_attn.k_proj.weight", hint)
        .unwrap();
    assert_eq!(half.dims(), &[8, 64], "candle splits half a head silently");
    for e in [Engine::Candle, Engine::Megatron] {
        let err = ShardPlan::new(&cfg, &inputs(&cfg, e, 4, 1, 1, 0).unwrap())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("n_kv_head = 2") && err.contains("--tp = 4"),
            "{err}"
        );
    }
    let plan = ShardPlan::new(&cfg, &inputs(&cfg, Engine::Deepspeed, 4, 1, 1, 0).unwrap()).unwrap();
    let full = candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap();
    let k = &full["model.layers.0.self_attn.k_proj.weight"];
    for r in 0..4 {
        let ts = held(&cfg, &plan, r, 0, &src).1;
        let mine = &ts
            .iter()
            .find(|(n, _)| n == "model.layers.0.self_attn.k_proj.weight")
            .unwrap()
            .1;
        assert_eq!(mine.dims(), &[16, 64]);
        let head = k.narrow(0, (r / 2) * 16, 16).unwrap();
        let diff = (mine - head)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(diff, 0.0, "rank {r} holds kv head {}", r / 2);
    }
}

// ---------------------------------------------------------------------------------------------
// The command

#[test]
fn plan_json_has_every_rank_and_the_anchor() {
    let out = truesize()
        .args([
            "plan",
            "--preset",
            "llama3-8b",
            "--tp",
            "8",
            "--engine",
            "candle",
            "--format",
            "json",
        ])
        .assert()
        .success();
    let j = json_of(&out.get_output().stdout);
    let ranks = j["plan"]["ranks"].as_array().unwrap();
    assert_eq!(ranks.len(), 8);
    for (i, r) in ranks.iter().enumerate() {
        assert_eq!(r["tp_rank"], i);
        assert_eq!(r["params"], 1_923_354_624u64);
        let parts: u64 = [
            "weights_bytes",
            "grads_bytes",
            "optimizer_bytes",
            "buffers_bytes",
            "activations_bytes",
        ]
        .iter()
        .map(|k| r[k].as_u64().unwrap())
        .sum();
        assert_eq!(r["total_bytes"].as_u64().unwrap(), parts);
        // candle: weights, grads and AdamW moments in bf16: 8 B/param.
        assert_eq!(
            r["weights_bytes"].as_u64().unwrap()
                + r["grads_bytes"].as_u64().unwrap()
                + r["optimizer_bytes"].as_u64().unwrap(),
            8 * 1_923_354_624
        );
    }
    assert!(j["plan"]["most_loaded_rank"]["total_bytes"]
        .as_u64()
        .is_some());

    let out = truesize()
        .args([
            "plan",
            "--preset",
            "llama3-8b",
            "--pp",
            "4",
            "--tp",
            "8",
            "--grad-accum",
            "8",
            "--seq",
            "2048",
            "--format",
            "json",
        ])
        .assert()
        .success();
    let j = json_of(&out.get_output().stdout);
    assert_eq!(j["plan"]["engine"], "megatron");
    assert_eq!(j["plan"]["ranks"].as_array().unwrap().len(), 32);
    assert_eq!(
        j["plan"]["anchors"][0]["name"],
        "megatron theoretical memory"
    );
    // The first stage keeps the most microbatches in flight (4 of 8) and is the most loaded.
    assert_eq!(j["plan"]["ranks"][0]["microbatches_in_flight"], 4);
    assert_eq!(j["plan"]["most_loaded_rank"]["pp_stage"], 0);
}

#[test]
fn plan_tables_render() {
    for f in ["table", "markdown"] {
        truesize()
            .args([
                "plan",
                "--preset",
                "gpt2",
                "--pp",
                "2",
                "--dp",
                "2",
                "--zero",
                "2",
                "--engine",
                "deepspeed",
                "--format",
                f,
            ])
            .assert()
            .success()
            .stdout(predicates::str::contains("most loaded"));
    }
}

#[test]
fn search_ranks_layouts_that_fit() {
    let out = truesize()
        .args([
            "plan",
            "--preset",
            "llama3-8b",
            "--gpus",
            "8",
            "--gpu",
            "H100 SXM",
            "--format",
            "json",
        ])
        .assert()
        .success();
    let j = json_of(&out.get_output().stdout);
    let l = j["search"]["layouts"].as_array().unwrap();
    assert!(!l.is_empty());
    assert_eq!(l[0]["fits"], true);
    let h: Vec<i64> = l
        .iter()
        .map(|x| x["headroom_bytes"].as_i64().unwrap())
        .collect();
    assert!(h.windows(2).all(|w| w[0] >= w[1]));
    for x in l {
        assert_eq!(
            x["tp"].as_u64().unwrap() * x["pp"].as_u64().unwrap() * x["dp"].as_u64().unwrap(),
            8
        );
    }
    // Nothing fits in 1 GiB: refused for resources.
    truesize()
        .args([
            "plan",
            "--preset",
            "llama3-8b",
            "--gpus",
            "2",
            "--memory",
            "1GiB",
        ])
        .assert()
        .code(1);
}

#[test]
fn bad_input_exits_2_naming_the_flag() {
    for (args, flag) in [
        (vec!["--tp", "3"], "--tp"),
        (vec!["--tp", "0"], "--tp"),
        (vec!["--pp", "5"], "--pp"),
        (vec!["--pp", "4", "--pp-layers", "8,8,8"], "--pp-layers"),
        (vec!["--pp", "2", "--pp-layers", "8,x"], "--pp-layers"),
        (vec!["--engine", "nope"], "--engine"),
        (vec!["--zero", "2"], "--zero"),
        (vec!["--zero", "7", "--engine", "deepspeed"], "--zero"),
        (vec!["--engine", "candle", "--zero", "1"], "--zero"),
        (vec!["--fsdp", "--engine", "megatron"], "--engine"),
        (vec!["--tp", "16", "--engine", "candle"], "--tp"),
        (vec!["--gpus", "8"], "--gpus"),
        (vec!["--gpus", "8", "--gpu", "H100"], "--gpu"),
        (vec!["--gpus", "8", "--memory", "80XB"], "--memory"),
        (vec!["--seq", "100000"], "--seq"),
        (vec!["--dtype", "f8"], "--dtype"),
        (vec!["--microbatch", "0"], "--microbatch"),
    ] {
        let mut all = vec!["plan", "--preset", "llama3-8b"];
        all.extend(args.iter().copied());
        truesize()
            .args(&all)
            .assert()
            .code(2)
            .stderr(predicates::str::contains(flag));
    }
}

/// The multi-process step refuses what it does not do, and a build without MPI says how to get it.
#[test]
fn verify_across_processes_refuses_clearly() {
    truesize()
        .args(["verify", "--preset", "baby-gpt", "--tp", "0"])
        .assert()
        .code(2)
        .stderr(predicates::str::contains("--tp = 0"));
    // Whole heads per rank: 4 heads do not split over 3 ranks (refused before MPI starts).
    #[cfg(feature = "mpi")]
    truesize()
        .args(["verify", "--preset", "baby-gpt", "--tp", "3"])
        .assert()
        .code(2)
        .stderr(predicates::str::contains("--tp = 3"))
        .stderr(predicates::str::contains("n_head = 4"));
    // The layout needs TP·PP·DP processes.
    #[cfg(feature = "mpi")]
    truesize()
        .args(["verify", "--preset", "baby-gpt", "--tp", "2", "--pp", "2"])
        .assert()
        .code(2)
        .stderr(predicates::str::contains("mpirun -np 4"));
    #[cfg(not(feature = "mpi"))]
    truesize()
        .args(["verify", "--preset", "baby-gpt", "--dp", "2"])
        .assert()
        .code(2)
        .stderr(predicates::str::contains("--features mpi"));
}
