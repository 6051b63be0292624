//! One training step (forward, next-token loss, backward) with the memory probe watching each
//! phase, repeated for timing.

use super::probe::{CpuProbe, MemoryProbe};
use crate::error::{Error, Result};
use crate::model::{next_token_loss, Model};
use candle_core::{DType, Tensor};
use candle_nn::VarMap;
use serde::Serialize;
use std::collections::BTreeMap;
use std::time::Instant;

/// Side of the square f32 matmul run on every thread before measuring: small enough to stay on
/// the calling thread (64³ is below gemm-common's threading threshold of 48·48·256) and large
/// enough to take the path that uses the thread's L2 slab (not a gemv, not prepacked).
const WARM_GEMM_DIM: usize = 64;

/// The memory probe for a device, ready to take a baseline.
pub fn probe_for(device: &candle_core::Device) -> Result<Box<dyn MemoryProbe>> {
    match device {
        candle_core::Device::Cpu => {
            if !super::alloc::installed() {
                return Err(Error::Internal(anyhow::anyhow!(
                    "the counting allocator is not installed in this process"
                )));
            }
            warm_gemm_thread_buffers()?;
            Ok(Box::new(CpuProbe))
        }
        _ => super::device::cuda_probe(device),
    }
}

/// gemm (candle's CPU matmul) gives each thread that runs a kernel a thread-local, L2-sized
/// slab, allocated at that thread's first gemm and kept for its life (gemm-common 0.19
/// gemm.rs:59). Which rayon pool threads run a kernel during a step is a scheduling race, so
/// without this the measured peak moved by a slab per pool thread from run to run (1 MiB each
/// here; 5% of a tiny model's step). One small gemm on the calling thread and on every pool
/// thread allocates them all before the baseline: the slabs become runtime, like the pool's
/// stacks, and the step's bytes are deterministic.
pub fn warm_gemm_thread_buffers() -> Result<()> {
    let warm = || -> candle_core::Result<()> {
        let a = Tensor::ones(
            (WARM_GEMM_DIM, WARM_GEMM_DIM),
            DType::F32,
            &candle_core::Device::Cpu,
        )?;
        a.matmul(&a).map(drop)
    };
    warm()?;
    for r in rayon::broadcast(|_| warm()) {
        r?;
    }
    Ok(())
}

/// Bytes per phase, all relative to the baseline taken before the model was built.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct PhaseBytes {
    /// After building the model: the weights (and the VarMap's bookkeeping).
    pub weights_bytes: u64,
    /// Highest point during forward + loss.
    pub forward_peak_bytes: u64,
    /// After forward: weights + everything autograd keeps for backward.
    pub after_forward_bytes: u64,
    /// Highest point during backward.
    pub backward_peak_bytes: u64,
    /// After backward, graph released: weights + the gradients kept (+ runtime caches).
    pub after_backward_bytes: u64,
    /// Freed when the gradients are dropped: the gradients' real size.
    pub gradients_bytes: u64,
    /// Highest point of the whole step: max(forward peak, backward peak).
    pub peak_bytes: u64,
    /// With `--optimizer adamw`: highest point of building AdamW and taking one step, after
    /// backward (weights + gradients + moments + the update's temporaries).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub optimizer_peak_bytes: Option<u64>,
    /// With `--optimizer adamw`: bytes of AdamW's first and second moments.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub optimizer_state_bytes: Option<u64>,
}

/// Optimizer step taken once after the first backward.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OptimizerStep {
    /// candle-nn's `AdamW` with default hyper-parameters; its moments are in the parameter dtype.
    AdamW,
}

pub struct StepResult {
    pub memory: PhaseBytes,
    pub loss: f64,
    pub logits: Tensor,
    /// L2 norm of each parameter's gradient (f32), by parameter name.
    pub grad_norms: BTreeMap<String, f64>,
    /// Parameters that got no gradient: each one is a bug (a non-differentiable op upstream).
    pub missing_grads: Vec<String>,
    pub forward_s: Vec<f64>,
    pub backward_s: Vec<f64>,
}

/// Run `repeat` steps; memory is read on the first (it is identical on later ones), timings on all.
/// `baseline` is the probe's reading before the model was built.
pub fn train_step(
    model: &Model,
    varmap: &VarMap,
    input_ids: &Tensor,
    probe: &dyn MemoryProbe,
    baseline: u64,
    weights_after_build: u64,
    repeat: usize,
) -> Result<StepResult> {
    train_step_with(
        model,
        varmap,
        input_ids,
        probe,
        baseline,
        weights_after_build,
        repeat,
        None,
    )
}

/// `train_step`, optionally followed (on the first repeat) by one optimizer step whose peak is
/// measured on its own.
#[allow(clippy::too_many_arguments)]
pub fn train_step_with(
    model: &Model,
    varmap: &VarMap,
    input_ids: &Tensor,
    probe: &dyn MemoryProbe,
    baseline: u64,
    weights_after_build: u64,
    repeat: usize,
    optimizer: Option<OptimizerStep>,
) -> Result<StepResult> {
    let vars: Vec<(String, candle_core::Var)> = {
        let data = varmap.data().lock().unwrap_or_else(|e| e.into_inner());
        let mut v: Vec<_> = data.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    };
    let rel = |x: u64| x.saturating_sub(baseline);
    let mut first: Option<StepResult> = None;
    let mut forward_s = Vec::with_capacity(repeat);
    let mut backward_s = Vec::with_capacity(repeat);
    for _ in 0..repeat.max(1) {
        probe.reset_peak()?;
        let t0 = Instant::now();
        let logits = model.forward(input_ids).map_err(ctx("forward pass"))?;
        let loss = next_token_loss(&logits, input_ids).map_err(ctx("loss"))?;
        // Reading the scalar synchronises a GPU, so the timing covers the real work.
        let loss_value = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        forward_s.push(t0.elapsed().as_secs_f64());
        let forward_peak = probe.peak()?;
        let after_forward = probe.current()?;

        probe.reset_peak()?;
        let t1 = Instant::now();
        let store = loss.backward().map_err(ctx("backward pass"))?;
        // Gradients from `backward()` still point into the graph; detach the ones we keep and
        // drop the store, or the whole graph stays alive (the store's tensors hold it).
        let mut grads = BTreeMap::new();
        let mut missing = Vec::new();
        for (name, var) in &vars {
            match store.get(var.as_tensor()) {
                Some(g) => {
                    grads.insert(name.clone(), g.detach());
                }
                None => missing.push(name.clone()),
            }
        }
        drop(store);
        drop(loss);
        // Shadowing would keep the graph-carrying logits alive to the end of the loop body.
        let logits = {
            let with_graph = logits;
            with_graph.detach()
        };
        if let Some(g) = grads.values().next() {
            // Force completion on asynchronous devices before stopping the clock.
            g.device().synchronize()?;
        }
        backward_s.push(t1.elapsed().as_secs_f64());
        let backward_peak = probe.peak()?;
        let after_backward = probe.current()?.saturating_sub(logits_bytes(&logits));
        if first.is_none() {
            // --- optimizer step: once, after backward, graph already released.
            let (optimizer_peak_bytes, optimizer_state_bytes) = match optimizer {
                Some(OptimizerStep::AdamW) => {
                    let (peak, state) = adamw_step(&vars, &grads, probe)?;
                    (Some(rel(peak)), Some(state))
                }
                None => (None, None),
            };
            // --- end optimizer step
            let mut grad_norms = BTreeMap::new();
            for (name, g) in &grads {
                grad_norms.insert(name.clone(), l2_norm(g)?);
            }
            let with_grads = probe.current()?;
            drop(grads);
            let gradients_bytes = with_grads.saturating_sub(probe.current()?);
            first = Some(StepResult {
                memory: PhaseBytes {
                    weights_bytes: rel(weights_after_build),
                    forward_peak_bytes: rel(forward_peak),
                    after_forward_bytes: rel(after_forward),
                    backward_peak_bytes: rel(backward_peak),
                    after_backward_bytes: rel(after_backward),
                    gradients_bytes,
                    peak_bytes: rel(forward_peak.max(backward_peak)),
                    optimizer_peak_bytes,
                    optimizer_state_bytes,
                },
                loss: loss_value,
                logits,
                grad_norms,
                missing_grads: missing,
                forward_s: Vec::new(),
                backward_s: Vec::new(),
            });
        }
    }
    let mut r = first.ok_or_else(|| Error::Internal(anyhow::anyhow!("no step ran")))?;
    r.forward_s = forward_s;
    r.backward_s = backward_s;
    Ok(r)
}

/// One real `candle_nn::AdamW` step on the detached gradients. Returns the probe's peak during
/// `AdamW::new` + `step` and the bytes of the moments it allocated (freed again on return).
fn adamw_step(
    vars: &[(String, candle_core::Var)],
    grads: &BTreeMap<String, Tensor>,
    probe: &dyn MemoryProbe,
) -> Result<(u64, u64)> {
    use candle_nn::optim::{AdamW, Optimizer, ParamsAdamW};
    probe.reset_peak()?;
    let before = probe.current()?;
    let opt_err = ctx("AdamW step");
    let mut opt = AdamW::new(
        vars.iter().map(|(_, v)| v.clone()).collect(),
        ParamsAdamW::default(),
    )
    .map_err(&opt_err)?;
    let state = probe.current()?.saturating_sub(before);
    // `step` reads gradients from a GradStore; the detached gradients share storage (no copy).
    let mut store = candle_core::backprop::GradStore::default();
    for (name, var) in vars {
        if let Some(g) = grads.get(name) {
            store.insert(var.as_tensor(), g.clone());
        }
    }
    opt.step(&store).map_err(&opt_err)?;
    let peak = probe.peak()?;
    drop(store);
    drop(opt);
    Ok((peak, state))
}

/// The detached logits we keep for reference checks are not part of the training state.
fn logits_bytes(t: &Tensor) -> u64 {
    (t.elem_count() * t.dtype().size_in_bytes()) as u64
}

fn ctx(what: &'static str) -> impl Fn(candle_core::Error) -> Error {
    move |e| {
        let e = crate::error::without_backtrace(e);
        Error::Internal(anyhow::anyhow!("{what}: {e}"))
    }
}

/// L2 norm of a tensor, computed in f32.
pub fn l2_norm(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(DType::F32)?
        .sqr()?
        .sum_all()?
        .sqrt()?
        .to_scalar::<f32>()? as f64)
}

pub fn median(xs: &[f64]) -> f64 {
    if xs.is_empty() {
        return f64::NAN;
    }
    let mut v = xs.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}
