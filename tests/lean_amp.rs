//! Mixed precision in the lean step (`LeanOptions::amp`, PyTorch autocast's saved set): the
//! closed form's peak against the counting allocator within ±2% on GPT-2 and Llama configs
//! where the peak falls at the head and where it falls inside the blocks, with and without block
//! checkpointing, and the step's loss and gradients against the f32 step's at half precision's
//! resolution (and, checkpointed, equal to the uncheckpointed AMP step's).
//!
//! The allocator's counters are process-wide: the tests take one lock so that no other test's
//! allocations land inside a measurement.

mod common;

use candle_core::{DType, Device, Tensor};
use common::tiny_config as cfg;
use std::collections::BTreeMap;
use std::sync::Mutex;
use truesize::config::{Arch, ModelConfig, Step};
use truesize::dtype::TrainDtype;
use truesize::measure::alloc::CountingAlloc;
use truesize::measure::run::probe_for;
use truesize::model::build;
use truesize::train::{self, memory, Checkpoint, LeanModel, LeanOptions, Optimizer};

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// verify's gate for the lean step's predicted vs measured peak.
const PEAK_TOL: f64 = 0.02;

fn ids(cfg: &ModelConfig, b: usize, t: usize) -> Tensor {
    let ids: Vec<u32> = (0..b * t)
        .map(|i| ((i * 7919 + 13) % cfg.vocab_size) as u32)
        .collect();
    Tensor::from_vec(ids, (b, t), &Device::Cpu).unwrap()
}

fn amp(dt: DType) -> LeanOptions {
    LeanOptions {
        amp: Some(dt),
        ..LeanOptions::default()
    }
}

fn rel(a: f64, b: f64) -> f64 {
    (a - b).abs() / b.abs()
}

/// (measured peak, predicted peak) of one AMP step, every phase printed.
fn measure(cfg: &ModelConfig, b: usize, t: usize, opts: &LeanOptions) -> (u64, u64) {
    train::supported(cfg, opts).unwrap();
    let ids = ids(cfg, b, t);
    let probe = probe_for(&Device::Cpu).unwrap();
    let baseline = probe.current().unwrap();
    let (varmap, model) = build::random(cfg, DType::F32, &Device::Cpu, 5).unwrap();
    drop(model);
    let lean = LeanModel::from_varmap(cfg, &varmap).unwrap();
    let weights = probe.current().unwrap();
    let r = train::run::run(&lean, &ids, opts, probe.as_ref(), baseline, weights, 1).unwrap();
    let dtype = match opts.amp {
        Some(DType::F16) => TrainDtype::F16,
        _ => TrainDtype::Bf16,
    };
    let p = memory::predict(
        cfg,
        Step {
            batch: b,
            seq: t,
            dtype,
        },
        opts,
    );
    let m = r.memory;
    common::print_phases(&format!("{} b{b} t{t} {:?}", cfg.name, opts.amp), &m, &p);
    assert!(r.missing_grads.is_empty(), "{:?}", r.missing_grads);
    // f32 master weights and f32 gradients, whatever the compute dtype.
    let params: u64 = lean.params().map(|(_, t)| t.elem_count() as u64).sum();
    assert!(m.gradients_bytes >= 4 * params, "gradients are f32");
    assert!(m.weights_bytes >= 4 * params, "weights are f32");
    if let (Some(mo), Some(po)) = (m.optimizer_peak_bytes, p.optimizer_peak_bytes) {
        assert!(
            rel(po as f64, mo as f64) <= PEAK_TOL,
            "{}: optimizer peak {po} vs {mo}",
            cfg.name
        );
    }
    (m.peak_bytes, p.peak_bytes)
}

#[test]
fn amp_peak_matches_the_counting_allocator() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let gpt2 = cfg(Arch::Gpt2, 4000, 128, 2, 4, 4, 512);
    // A small vocabulary and a wide MLP: the peak falls inside the blocks' backward.
    let gpt2_blocks = cfg(Arch::Gpt2, 300, 128, 3, 4, 4, 1024);
    let mut gpt2_untied = cfg(Arch::Gpt2, 1500, 64, 2, 4, 4, 256);
    gpt2_untied.tie_embeddings = false;
    gpt2_untied.bias = false;
    let llama = cfg(Arch::Llama, 3000, 128, 2, 8, 2, 344);
    let llama_blocks = cfg(Arch::Llama, 256, 128, 3, 8, 2, 1024);
    let mut qwen = cfg(Arch::Llama, 4000, 96, 2, 6, 2, 256);
    qwen.qkv_bias = true;
    qwen.tie_embeddings = true;
    let bf16 = amp(DType::BF16);
    let adamw = LeanOptions {
        optimizer: Some(Optimizer::AdamW),
        ..bf16
    };
    let ckpt = LeanOptions {
        checkpoint: Checkpoint::Blocks,
        ..bf16
    };
    let cases = [
        (&gpt2, 4, 64, bf16),
        (&gpt2, 2, 96, amp(DType::F16)),
        (&gpt2_blocks, 4, 128, bf16),
        (&gpt2_untied, 3, 48, adamw),
        (&llama, 4, 64, bf16),
        (&llama_blocks, 4, 128, bf16),
        (&llama_blocks, 2, 96, amp(DType::F16)),
        (&qwen, 2, 80, adamw),
        (&gpt2, 4, 64, ckpt),
        (&gpt2_blocks, 4, 128, ckpt),
        (&llama_blocks, 4, 128, ckpt),
        (&qwen, 2, 80, ckpt),
    ];
    let mut worst = (0.0f64, String::new());
    for (c, b, t, opts) in cases {
        let (m, p) = measure(c, b, t, &opts);
        let e = rel(p as f64, m as f64);
        if e > worst.0 {
            worst = (
                e,
                format!("{} b{b} t{t} {:?} {:?}", c.name, opts.amp, opts.checkpoint),
            );
        }
    }
    assert!(
        worst.0 <= PEAK_TOL,
        "worst peak error {:.2}% on {}",
        100.0 * worst.0,
        worst.1
    );
}

fn l2(t: &Tensor) -> f64 {
    t.to_dtype(DType::F64)
        .unwrap()
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
        .sqrt()
}

/// The AMP step's loss and every gradient beside the f32 step's on the same weights: the loss
/// within 1e-2, each gradient's norm within 2e-2 and its difference within 4e-2 of its norm
/// (bf16 keeps 8 significant bits: 4e-3 per rounding, a few roundings deep), and every
/// gradient in f32.
#[test]
fn amp_gradients_match_the_f32_step() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let mut qwen = cfg(Arch::Llama, 700, 96, 2, 6, 2, 256);
    qwen.qkv_bias = true;
    let mut gpt2_untied = cfg(Arch::Gpt2, 500, 64, 2, 4, 4, 256);
    gpt2_untied.tie_embeddings = false;
    for c in [
        cfg(Arch::Gpt2, 600, 64, 2, 4, 4, 256),
        gpt2_untied,
        cfg(Arch::Llama, 600, 64, 2, 4, 2, 176),
        qwen,
    ] {
        let ids = ids(&c, 2, 40);
        let (varmap, model) = build::random(&c, DType::F32, &Device::Cpu, 11).unwrap();
        drop(model);
        let lean = LeanModel::from_varmap(&c, &varmap).unwrap();
        let (loss32, g32) = lean.loss_and_grads(&ids, &LeanOptions::default()).unwrap();
        for dt in [DType::BF16, DType::F16] {
            let (loss, g): (f64, BTreeMap<String, Tensor>) =
                lean.loss_and_grads(&ids, &amp(dt)).unwrap();
            assert!(
                (loss - loss32).abs() <= 1e-2,
                "{} {dt:?}: loss {loss} vs {loss32}",
                c.name
            );
            assert_eq!(g.len(), g32.len(), "{}: every parameter", c.name);
            let mut worst = (0.0f64, 0.0f64, String::new());
            for (name, want) in &g32 {
                let got = &g[name];
                assert_eq!(
                    got.dtype(),
                    DType::F32,
                    "{name}: the master weight's gradient"
                );
                assert_eq!(got.dims(), want.dims(), "{name}");
                let n32 = l2(want);
                let norm_err = rel(l2(got), n32);
                let diff_err = l2(&(got - want).unwrap()) / n32;
                if diff_err > worst.1 {
                    worst = (norm_err.max(worst.0), diff_err, name.clone());
                }
                assert!(
                    norm_err <= 2e-2,
                    "{} {dt:?} {name}: gradient norm off by {norm_err:.2e}",
                    c.name
                );
                assert!(
                    diff_err <= 4e-2,
                    "{} {dt:?} {name}: gradient differs by {diff_err:.2e} of its norm",
                    c.name
                );
            }
            eprintln!(
                "{} {dt:?}: loss {loss:.5} vs {loss32:.5}, worst gradient difference {:.2e} ({})",
                c.name, worst.1, worst.2
            );
            // Block checkpointing recomputes the same half-precision forward: the same numbers.
            let ckpt = LeanOptions {
                checkpoint: Checkpoint::Blocks,
                ..amp(dt)
            };
            let (loss_ck, g_ck) = lean.loss_and_grads(&ids, &ckpt).unwrap();
            assert_eq!(loss_ck, loss, "{} {dt:?}: checkpointed loss", c.name);
            for (name, want) in &g {
                let diff = l2(&(&g_ck[name] - want).unwrap());
                assert!(
                    diff == 0.0,
                    "{} {dt:?} {name}: checkpointed gradient differs by {diff}",
                    c.name
                );
            }
        }
    }
}
