//! `mpirun -np N truesize verify ... --dp N`: one data-parallel training step across N
//! processes over MPI. Every rank builds the same seeded network, runs forward + backward on its
//! own microbatch of the global batch with the counting allocator watching, and the gradients
//! are all-reduced (summed, divided by N). Rank 0 then runs the single-process step on the whole
//! batch and compares the gradients, gathers every rank's measured peak and compares each with
//! the per-rank prediction. Tensor and pipeline parallelism across processes are not done here.

use crate::cli::VerifyArgs;
use crate::error::{Error, Result};

/// Whether the command line asks for a multi-process step.
pub fn wanted(a: &VerifyArgs) -> bool {
    a.dp.is_some() || a.tp.is_some() || a.pp.is_some()
}

fn cli(field: &str, value: impl std::fmt::Display, why: impl Into<String>) -> Error {
    Error::field("command line", field, value, why)
}

/// Refuse what the distributed step does not do, before any work.
fn check_args(a: &VerifyArgs) -> Result<usize> {
    for (flag, v) in [("--tp", a.tp), ("--pp", a.pp)] {
        if let Some(n) = v {
            if n != 1 {
                return Err(cli(
                    flag,
                    n,
                    "tensor and pipeline parallelism across processes are not implemented; \
                     `truesize plan` sizes them; use --dp",
                ));
            }
        }
    }
    let dp = a.dp.unwrap_or(1);
    if dp == 0 || dp > crate::plan::MAX_WORLD {
        return Err(cli("--dp", dp, "must be between 1 and 65536"));
    }
    if a.model.is_some() || a.reference.is_some() || a.shapes_only || a.device != "cpu" {
        return Err(cli(
            "--dp",
            dp,
            "the multi-process step runs seeded random weights on the CPU: drop --model, \
             --reference, --shapes-only and --device",
        ));
    }
    Ok(dp)
}

#[cfg(not(feature = "mpi"))]
pub fn run(a: VerifyArgs) -> Result<u8> {
    check_args(&a)?;
    Err(Error::Usage(
        "this truesize was built without MPI: build with `cargo build --release --features mpi` \
         (needs libopenmpi-dev and libclang-dev) and start it with mpirun"
            .into(),
    ))
}

#[cfg(feature = "mpi")]
pub fn run(a: VerifyArgs) -> Result<u8> {
    imp::run(a)
}

#[cfg(feature = "mpi")]
mod imp {
    use super::{check_args, cli};
    use crate::check::{all_pass, Check};
    use crate::cli::VerifyArgs;
    use crate::cmd::common::{load_config, resolve_step, verdict};
    use crate::error::{Error, Result};
    use crate::measure::probe::MemoryProbe;
    use crate::measure::{extrapolate, run as measure};
    use crate::model::{autograd_replay, build, next_token_loss, Model};
    use crate::plan::{Engine, PlanInputs, ShardPlan};
    use crate::report::plan::{DistRank, DistributedRun};
    use crate::report::{emit, View};
    use candle_core::{DType, Device, Tensor};
    use candle_nn::VarMap;
    use mpi::collective::SystemOperation;
    use mpi::traits::*;

    /// Gradients agree with the single-process step within this (max |difference| over the
    /// largest |gradient|): float sums in another order.
    const GRAD_TOLERANCE: f64 = 1e-5;
    /// Each rank's measured peak against its prediction.
    const PEAK_TOLERANCE: f64 = 0.05;

    fn internal(e: impl std::fmt::Display) -> Error {
        Error::Internal(anyhow::anyhow!("{e}"))
    }

    /// Every parameter's gradient after forward + backward on `ids`, flattened in name order,
    /// and the probe's peak read when backward returns (before any copy is made here).
    fn gradients(
        model: &Model,
        varmap: &VarMap,
        ids: &Tensor,
        probe: &dyn MemoryProbe,
    ) -> Result<(Vec<Vec<f32>>, u64)> {
        let logits = model.forward(ids)?;
        let loss = next_token_loss(&logits, ids)?;
        let store = loss.backward()?;
        let peak = probe.peak()?;
        let data = varmap.data().lock().map_err(internal)?;
        let mut names: Vec<&String> = data.keys().collect();
        names.sort();
        let mut out = Vec::new();
        for n in names {
            let g = store
                .get(data[n].as_tensor())
                .ok_or_else(|| internal(format!("{n} got no gradient")))?;
            out.push(g.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?);
        }
        Ok((out, peak))
    }

    /// The same through the lean step: every gradient in name order, and the probe's peak
    /// read when the step returns.
    fn lean_gradients(
        lean: &crate::train::LeanModel,
        ids: &Tensor,
        probe: &dyn MemoryProbe,
    ) -> Result<(Vec<Vec<f32>>, u64)> {
        let (_, grads) = lean.loss_and_grads(ids, &crate::train::LeanOptions::default())?;
        let peak = probe.peak()?;
        let mut out = Vec::with_capacity(grads.len());
        // BTreeMap: name order, the same on every rank.
        for g in grads.values() {
            out.push(g.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?);
        }
        Ok((out, peak))
    }

    pub fn run(a: VerifyArgs) -> Result<u8> {
        let dp = check_args(&a)?;
        let cfg = load_config(&a.config)?;
        let step = resolve_step(&cfg, &a.step)?;
        let (universe, _) = mpi::initialize_with_threading(mpi::Threading::Serialized)
            .ok_or_else(|| internal("MPI could not be initialised (already initialised?)"))?;
        let world = universe.world();
        let size = world.size() as usize;
        let rank = world.rank() as usize;
        if size != dp {
            return Err(cli(
                "--dp",
                dp,
                format!("must equal the number of MPI processes ({size}): mpirun -np {dp}"),
            ));
        }
        let device = Device::Cpu;
        // The global batch: dp microbatches of --batch sequences, the same on every rank.
        let all_ids =
            extrapolate::random_tokens(cfg.vocab_size, step.batch * dp, step.seq, a.seed, &device)?;
        let mine = all_ids
            .narrow(0, rank * step.batch, step.batch)?
            .contiguous()?;
        measure::warm_gemm_thread_buffers()?;
        let probe = measure::probe_for(&device)?;
        probe.reset_peak()?;
        let baseline = probe.current()?;
        let (varmap, model) = build::random(&cfg, step.dtype.candle(), &device, a.seed)?;
        // The lean step where it runs this config (f32), else candle's autograd.
        let lean_opts = crate::train::LeanOptions::default();
        let (lean, model) = if step.dtype == crate::dtype::TrainDtype::F32
            && crate::train::supported(&cfg, &lean_opts).is_ok()
        {
            // candle's network holds masks and RoPE tables the lean step does not use.
            drop(model);
            (
                Some(crate::train::LeanModel::from_varmap(&cfg, &varmap)?),
                None,
            )
        } else {
            (None, Some(model))
        };
        let step_of = |ids: &Tensor| -> Result<(Vec<Vec<f32>>, u64)> {
            match (&lean, &model) {
                (Some(l), _) => lean_gradients(l, ids, probe.as_ref()),
                (None, Some(m)) => gradients(m, &varmap, ids, probe.as_ref()),
                (None, None) => Err(internal("no model was built")),
            }
        };
        let (grads, peak) = step_of(&mine)?;
        let peak = peak.saturating_sub(baseline);

        // All-reduce: sum over ranks, then the mean (each rank's loss is a mean over its own
        // equal-sized microbatch).
        let mut reduced = Vec::with_capacity(grads.len());
        for g in &grads {
            let mut sum = vec![0f32; g.len()];
            world.all_reduce_into(&g[..], &mut sum[..], SystemOperation::sum());
            reduced.push(sum.into_iter().map(|x| x / dp as f32).collect::<Vec<f32>>());
        }
        drop(grads);

        let root = world.process_at_rank(0);
        let peak_u64 = peak;
        if rank != 0 {
            root.gather_into(&peak_u64);
            return Ok(crate::error::EXIT_OK);
        }
        let mut peaks = vec![0u64; size];
        root.gather_into_root(&peak_u64, &mut peaks[..]);

        // The single-process step on the whole batch, same weights.
        let (reference, _) = step_of(&all_ids)?;
        let (mut worst, mut scale) = (0f64, 0f64);
        for (g, r) in reduced.iter().zip(&reference) {
            for (x, y) in g.iter().zip(r) {
                worst = worst.max((x - y).abs() as f64);
                scale = scale.max(y.abs() as f64);
            }
        }
        let grad_error = worst / scale.max(f64::MIN_POSITIVE);

        let params = crate::estimate::params::estimate(&cfg)?.total;
        let (predicted, predictor) = match &lean {
            Some(_) => (
                crate::train::memory::predict(&cfg, step, &lean_opts).peak_bytes,
                "the lean step's closed form",
            ),
            None => (
                autograd_replay::model(&cfg, params, step).peak_bytes,
                "the autograd replay",
            ),
        };
        let plan = ShardPlan::new(
            &cfg,
            &PlanInputs {
                engine: Engine::Candle,
                tp: 1,
                pp: 1,
                dp,
                zero: 0,
                pp_layers: vec![cfg.n_layer],
                microbatch: step.batch,
                grad_accum: 1,
                seq: step.seq,
                dtype: step.dtype,
            },
        )?;
        let mut checks = vec![Check::error_bound(
            "gradients: all-reduced DP step vs single-process step on the whole batch",
            grad_error,
            GRAD_TOLERANCE,
            "max |difference| / max |gradient| over every parameter",
        )];
        let mut ranks = Vec::new();
        for (r, &measured) in peaks.iter().enumerate() {
            let plan_rank = &plan.ranks[r];
            checks.push(Check::rel(
                format!("rank {r}: step peak vs {predictor}"),
                measured as f64,
                predicted as f64,
                PEAK_TOLERANCE,
            ));
            ranks.push(DistRank {
                rank: r,
                dp_rank: plan_rank.dp_rank,
                measured_peak_bytes: measured,
                predicted_peak_bytes: predicted,
                plan_weights_grads_bytes: plan_rank.weights_bytes + plan_rank.grads_bytes,
                plan_activations_bytes: plan_rank.activations_bytes,
            });
        }
        let pass = all_pass(&checks);
        let result = DistributedRun {
            model: cfg.name.clone(),
            processes: size,
            dp,
            batch_per_rank: step.batch,
            seq: step.seq,
            dtype: step.dtype,
            grad_rel_error: grad_error,
            ranks,
            checks,
            pass,
        };
        emit(a.format, &result, View::Full)?;
        Ok(verdict(pass))
    }
}
