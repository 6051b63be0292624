//! `mpirun -np N truesize verify ... --tp T --pp P --dp D` (N = T·P·D): one training step across
//! N processes over MPI, with real collectives. Ranks are numbered as the plan numbers them (TP
//! fastest, then DP, then PP). Each rank builds only its shard of the seeded network, as the
//! plan's candle profile cuts it (`plan::shard`: whole heads and an even inner width per TP rank,
//! embedding and head replicated, even layers per stage, a tied embedding copied onto the last
//! stage), and runs its part of the lean step (`train::parallel`) with the counting allocator
//! watching:
//!
//! - TP: each row-parallel map's output and each column-parallel group's input gradient is
//!   all-reduced over the TP group (`MPI_Allreduce`);
//! - PP: the activation goes to the next stage and its gradient comes back (`MPI_Send` /
//!   `MPI_Recv`), one microbatch per step (GPipe and 1F1B coincide);
//! - after backward: the two copies of a tied embedding add their gradients (first and last
//!   stage, `MPI_Sendrecv`), then every gradient is averaged over the DP group; with `--zero 1`
//!   or `2` the rank's gradients are laid out as one flat buffer, padded as DeepSpeed pads it
//!   (a multiple of 2·DP elements), and reduce-scattered (`MPI_Reduce_scatter_block`): each rank
//!   keeps its 1/DP partition, the per-parameter gradients are freed, and what the rank then holds
//!   (weights + its partition) is measured and checked. The partition is made after backward
//!   (no bucketing while backward runs), so the step's peak is the same as without ZeRO; ZeRO-1
//!   and 2 differ only in the optimizer step, which this step does not take. ZeRO-3 (parameters
//!   gathered layer by layer) is refused.
//!
//! Every rank then runs the single-process step on the whole batch from the same seeded network
//! and compares its shard of every gradient with the same slice of the reference; the worst
//! error is reduced to rank 0, which gathers each rank's measured peak and checks it against the
//! lean step's closed form for that rank's part (`plan::lean`), beside the plan's own figures.
//! The collectives sit behind `train::parallel`'s two traits; the MPI implementations here are
//! host-memory only (an NCCL implementation would implement the same traits on device
//! buffers). Configs the lean step cannot run (or dtypes other than f32) still run data
//! parallelism through candle's autograd, as before; TP and PP need the lean step.

use crate::cli::VerifyArgs;
use crate::error::{Error, Result};

/// Whether the command line asks for a multi-process step.
pub fn wanted(a: &VerifyArgs) -> bool {
    a.dp.is_some() || a.tp.is_some() || a.pp.is_some() || a.zero.is_some()
}

fn cli(field: &str, value: impl std::fmt::Display, why: impl Into<String>) -> Error {
    Error::field("command line", field, value, why)
}

/// The layout (TP, PP, DP), refused before any work when out of range or combined with what
/// the distributed step does not do.
fn check_args(a: &VerifyArgs) -> Result<(usize, usize, usize)> {
    let mut layout = [1usize; 3];
    for (slot, (flag, v)) in layout
        .iter_mut()
        .zip([("--tp", a.tp), ("--pp", a.pp), ("--dp", a.dp)])
    {
        let n = v.unwrap_or(1);
        if n == 0 || n > crate::plan::MAX_WORLD {
            return Err(cli(flag, n, "must be between 1 and 65536"));
        }
        *slot = n;
    }
    if a.model.is_some() || a.reference.is_some() || a.shapes_only || a.device != "cpu" {
        let flag = [("--tp", a.tp), ("--pp", a.pp), ("--dp", a.dp)]
            .into_iter()
            .find_map(|(f, v)| v.map(|n| (f, n)))
            .unwrap_or(("--dp", 1));
        return Err(cli(
            flag.0,
            flag.1,
            "the multi-process step runs seeded random weights on the CPU: drop --model, \
             --reference, --shapes-only and --device",
        ));
    }
    match a.zero {
        None | Some(0..=2) => {}
        Some(3) => {
            return Err(cli(
                "--zero",
                3,
                "ZeRO-3 (parameters gathered layer by layer) is not implemented across processes; \
                 `truesize plan --zero 3 --engine deepspeed` sizes it; use --zero 1 or 2",
            ))
        }
        Some(z) => return Err(cli("--zero", z, "must be 0, 1 or 2")),
    }
    Ok((layout[0], layout[1], layout[2]))
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
    use crate::config::{ModelConfig, Step};
    use crate::error::{Error, Result};
    use crate::measure::probe::MemoryProbe;
    use crate::measure::{extrapolate, run as measure};
    use crate::model::{autograd_replay, build, next_token_loss, Model};
    use crate::plan::engine::DEEPSPEED_ALIGNMENT;
    use crate::plan::shard::TensorShard;
    use crate::plan::{Engine, PlanInputs, ShardPlan};
    use crate::report::plan::{DistRank, DistributedRun};
    use crate::report::{emit, View};
    use crate::train::parallel::{Collective, Link, Parallel};
    use crate::train::{LeanModel, LeanOptions};
    use candle_core::{DType, Device, Tensor, Var};
    use candle_nn::VarMap;
    use mpi::collective::SystemOperation;
    use mpi::topology::{Color, SimpleCommunicator};
    use mpi::traits::*;
    use std::rc::Rc;

    /// Gradients agree with the single-process step within this (max |difference| over the
    /// largest |gradient|): float sums in another order.
    const GRAD_TOLERANCE: f64 = 1e-5;
    /// Each rank's measured peak against its prediction.
    const PEAK_TOLERANCE: f64 = 0.05;

    fn internal(e: impl std::fmt::Display) -> Error {
        Error::Internal(anyhow::anyhow!("{e}"))
    }

    /// `f` on a host f32 tensor's elements, in place (no copy when contiguous).
    fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> candle_core::Result<R> {
        let t = if t.is_contiguous() {
            t.clone()
        } else {
            t.contiguous()?
        };
        let (storage, layout) = t.storage_and_layout();
        let (a, b) = layout
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("a strided tensor".into()))?;
        match &*storage {
            candle_core::Storage::Cpu(c) => Ok(f(&c.as_slice::<f32>()?[a..b])),
            _ => candle_core::bail!("the MPI collectives here move host (CPU) tensors only"),
        }
    }

    /// A tensor-parallel group: `MPI_Allreduce` into a fresh buffer that becomes the result.
    struct MpiGroup(SimpleCommunicator);

    impl Collective for MpiGroup {
        fn all_reduce_sum(&self, t: Tensor) -> candle_core::Result<Tensor> {
            let shape = t.shape().clone();
            let mut sum = vec![0f32; t.elem_count()];
            with_f32(&t, |x| {
                self.0
                    .all_reduce_into(x, &mut sum[..], SystemOperation::sum())
            })?;
            drop(t);
            Tensor::from_vec(sum, shape, &Device::Cpu)
        }
    }

    /// The neighbour stage `peer` of `world`.
    struct MpiLink {
        world: Rc<SimpleCommunicator>,
        peer: i32,
    }

    impl Link for MpiLink {
        fn send(&self, t: &Tensor) -> candle_core::Result<()> {
            with_f32(t, |x| self.world.process_at_rank(self.peer).send(x))
        }

        fn recv(&self, shape: (usize, usize)) -> candle_core::Result<Tensor> {
            let mut buf = vec![0f32; shape.0 * shape.1];
            self.world
                .process_at_rank(self.peer)
                .receive_into(&mut buf[..]);
            Tensor::from_vec(buf, shape, &Device::Cpu)
        }
    }

    /// Rank `tp_rank`'s piece of a full tensor `t` under `shard` (candle's profile pads
    /// nothing: the pieces are narrowed and joined).
    fn piece(t: &Tensor, shard: &TensorShard, tp_rank: usize, tp: usize) -> Result<Tensor> {
        let Some(dim) = shard.dim else {
            return Ok(t.clone());
        };
        let mut parts = Vec::new();
        for p in shard.pieces(tp_rank, tp) {
            if p.alloc != p.real {
                return Err(internal(format!("{}: a padded piece", shard.name)));
            }
            parts.push(t.narrow(dim, p.src_start, p.real)?);
        }
        Ok(Tensor::cat(&parts, dim)?.contiguous()?)
    }

    fn host(t: &Tensor) -> Result<Vec<f32>> {
        Ok(t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?)
    }

    /// What rank (tp_rank, stage) holds: its pieces (name, shape, data), and the names and full
    /// shapes of the parameters other stages hold.
    #[allow(clippy::type_complexity)]
    fn shard_of(
        full: &VarMap,
        plan: &ShardPlan,
        tp_rank: usize,
        stage: usize,
    ) -> Result<(
        Vec<(String, Vec<usize>, Vec<f32>)>,
        Vec<(String, Vec<usize>)>,
    )> {
        let data = full.data().lock().map_err(internal)?;
        if data.len() != plan.tensors.len() {
            return Err(internal(format!(
                "the network has {} parameters, the plan {}",
                data.len(),
                plan.tensors.len()
            )));
        }
        let (mut held, mut elsewhere) = (Vec::new(), Vec::new());
        for s in &plan.tensors {
            let var = data
                .get(&s.name)
                .ok_or_else(|| internal(format!("{} is not in the network", s.name)))?;
            if s.stages.contains(&stage) {
                let p = piece(var.as_tensor(), s, tp_rank, plan.tp)?;
                held.push((s.name.clone(), p.dims().to_vec(), host(&p)?));
            } else {
                elsewhere.push((s.name.clone(), s.shape.clone()));
            }
        }
        Ok((held, elsewhere))
    }

    pub fn run(a: VerifyArgs) -> Result<u8> {
        let (tp, pp, dp) = check_args(&a)?;
        let cfg = load_config(&a.config)?;
        let step = resolve_step(&cfg, &a.step)?;
        let lean_opts = LeanOptions::default();
        let lean = if step.dtype != crate::dtype::TrainDtype::F32 {
            Err("the lean step runs f32 only".to_string())
        } else {
            crate::train::supported(&cfg, &lean_opts)
        };
        let zero = a.zero.unwrap_or(0);
        if let (Err(why), true) = (&lean, tp * pp > 1 || zero > 0) {
            let (flag, n) = match (tp > 1, pp > 1) {
                (true, _) => ("--tp", tp),
                (_, true) => ("--pp", pp),
                _ => ("--zero", zero as usize),
            };
            return Err(cli(
                flag,
                n,
                format!("tensor and pipeline parallelism and ZeRO run the lean step: {why}"),
            ));
        }
        let plan = ShardPlan::new(
            &cfg,
            &PlanInputs {
                engine: Engine::Candle,
                tp,
                pp,
                dp,
                zero: 0,
                pp_layers: PlanInputs::even_layers(&cfg, pp)?,
                microbatch: step.batch,
                grad_accum: 1,
                seq: step.seq,
                dtype: step.dtype,
            },
        )?;
        let local_cfg =
            crate::train::parallel::local_config(&cfg, tp).map_err(|why| cli("--tp", tp, why))?;
        let (universe, _) = mpi::initialize_with_threading(mpi::Threading::Serialized)
            .ok_or_else(|| internal("MPI could not be initialised (already initialised?)"))?;
        let world = universe.world();
        let size = world.size() as usize;
        if size != tp * pp * dp {
            return Err(cli(
                "--tp × --pp × --dp",
                tp * pp * dp,
                format!(
                    "must equal the number of MPI processes ({size}): mpirun -np {}",
                    tp * pp * dp
                ),
            ));
        }
        let out = if lean.is_ok() {
            lean_step(&a, &cfg, &local_cfg, step, &plan, zero, world)?
        } else {
            autograd_dp(&a, &cfg, step, &plan, world)?
        };
        match out {
            Some(result) => {
                emit(a.format, &result, View::Full)?;
                Ok(verdict(result.pass))
            }
            None => Ok(crate::error::EXIT_OK),
        }
    }

    /// What one rank found, sent to rank 0.
    struct Found {
        peak: u64,
        worst: f64,
        scale: f64,
        /// Under ZeRO: (bytes held after the reduce-scatter, predicted).
        held: Option<(u64, u64)>,
        zero: u8,
    }

    /// Rank 0: every rank's peak and the worst gradient error (max over ranks) into a report.
    #[allow(clippy::too_many_arguments)]
    fn collect(
        world: &SimpleCommunicator,
        cfg: &ModelConfig,
        step: Step,
        plan: &ShardPlan,
        found: Found,
        predicted: &dyn Fn(usize) -> Result<(u64, &'static str)>,
    ) -> Result<Option<DistributedRun>> {
        let mut err = [0f64; 2];
        world.all_reduce_into(
            &[found.worst, found.scale][..],
            &mut err[..],
            SystemOperation::max(),
        );
        let grad_error = err[0] / err[1].max(f64::MIN_POSITIVE);
        let root = world.process_at_rank(0);
        let (held, held_predicted) = found.held.unwrap_or((0, 0));
        let mine = [found.peak, held, held_predicted];
        if world.rank() != 0 {
            root.gather_into(&mine[..]);
            return Ok(None);
        }
        let mut all = vec![0u64; 3 * world.size() as usize];
        root.gather_into_root(&mine[..], &mut all[..]);
        let zero = found.held.is_some();
        let mut checks = vec![Check::error_bound(
            "gradients: every rank's shard (DP mean) vs the single-process step on the whole batch",
            grad_error,
            GRAD_TOLERANCE,
            "max |difference| / max |gradient| over every parameter",
        )];
        let mut ranks = Vec::new();
        for (r, got) in all.chunks_exact(3).enumerate() {
            let (measured, held, held_predicted) = (got[0], got[1], got[2]);
            let pr = &plan.ranks[r];
            let (predicted, predictor) = predicted(r)?;
            checks.push(Check::rel(
                format!(
                    "rank {r} (tp {}, stage {}, dp {}): step peak vs {predictor}",
                    pr.tp_rank, pr.pp_stage, pr.dp_rank
                ),
                measured as f64,
                predicted as f64,
                PEAK_TOLERANCE,
            ));
            if zero {
                checks.push(Check::rel(
                    format!(
                        "rank {r}: held after the gradient reduce-scatter (weights + its 1/DP \
                         partition) vs the closed form"
                    ),
                    held as f64,
                    held_predicted as f64,
                    PEAK_TOLERANCE,
                ));
            }
            ranks.push(DistRank {
                rank: r,
                tp_rank: pr.tp_rank,
                pp_stage: pr.pp_stage,
                dp_rank: pr.dp_rank,
                measured_peak_bytes: measured,
                predicted_peak_bytes: predicted,
                plan_weights_grads_bytes: pr.weights_bytes + pr.grads_bytes,
                plan_activations_bytes: pr.activations_bytes,
                held_after_bytes: zero.then_some(held),
                predicted_held_after_bytes: zero.then_some(held_predicted),
            });
        }
        let pass = all_pass(&checks);
        Ok(Some(DistributedRun {
            model: cfg.name.clone(),
            processes: ranks.len(),
            zero: found.zero,
            tp: plan.tp,
            pp: plan.pp,
            dp: plan.dp,
            batch_per_rank: step.batch,
            seq: step.seq,
            dtype: step.dtype,
            grad_rel_error: grad_error,
            ranks,
            checks,
            pass,
        }))
    }

    /// The lean step split over TP × PP × DP processes.
    fn lean_step(
        a: &VerifyArgs,
        cfg: &ModelConfig,
        local_cfg: &ModelConfig,
        step: Step,
        plan: &ShardPlan,
        zero: u8,
        world: SimpleCommunicator,
    ) -> Result<Option<DistributedRun>> {
        let rank = world.rank() as usize;
        let (tp, pp, dp) = (plan.tp, plan.pp, plan.dp);
        let me = &plan.ranks[rank];
        let (tp_rank, stage, dp_rank) = (me.tp_rank, me.pp_stage, me.dp_rank);
        let device = Device::Cpu;
        let opts = LeanOptions::default();
        // The global batch: dp microbatches of --batch sequences, the same on every rank.
        let all_ids =
            extrapolate::random_tokens(cfg.vocab_size, step.batch * dp, step.seq, a.seed, &device)?;
        let mine = all_ids
            .narrow(0, dp_rank * step.batch, step.batch)?
            .contiguous()?;
        // The whole seeded network: the source of this rank's shard and of the reference step.
        let (full, model) = build::random(cfg, DType::F32, &device, a.seed)?;
        drop(model);
        let (held, elsewhere) = shard_of(&full, plan, tp_rank, stage)?;
        // Groups: the TP group shares (dp, stage), the DP group (tp, stage); both ordered by
        // world rank, so that DP group rank = dp_rank.
        let color = |c: usize| Color::with_value(c as i32);
        let tp_group = world
            .split_by_color(color(dp_rank + dp * stage))
            .ok_or_else(|| internal("no TP group"))?;
        let dp_group = world
            .split_by_color(color(tp_rank + tp * stage))
            .ok_or_else(|| internal("no DP group"))?;
        let world = Rc::new(world);
        let link = |peer: usize| -> Rc<dyn Link> {
            Rc::new(MpiLink {
                world: world.clone(),
                peer: peer as i32,
            })
        };
        let first_layer: usize = plan.pp_layers[..stage].iter().sum();
        let part = Parallel {
            tp: (tp > 1).then(|| Rc::new(MpiGroup(tp_group)) as Rc<dyn Collective>),
            prev: (stage > 0).then(|| link(rank - tp * dp)),
            next: (stage + 1 < pp).then(|| link(rank + tp * dp)),
            layers: first_layer..first_layer + plan.pp_layers[stage],
        };

        measure::warm_gemm_thread_buffers()?;
        let probe = measure::probe_for(&device)?;
        probe.reset_peak()?;
        let baseline = probe.current()?;
        // The rank's own tensors, built as a VarMap builds them (a Var copied from the init).
        let varmap = VarMap::new();
        {
            let mut data = varmap.data().lock().map_err(internal)?;
            for (name, shape, values) in &held {
                let init = Tensor::from_slice(values, shape.as_slice(), &device)?;
                data.insert(name.clone(), Var::from_tensor(&init)?);
            }
        }
        let lean = LeanModel::for_rank(local_cfg, &varmap, &elsewhere, part.tp.clone())?;
        let (_, grads) = lean.stage_step(&mine, &part, &opts)?;
        let peak = probe.peak()?.saturating_sub(baseline);
        drop(part);

        // Every parameter the rank holds got a gradient, and nothing else did.
        let host_grads: Vec<(String, Vec<f32>)> = grads
            .iter()
            .map(|(n, g)| Ok((n.clone(), host(g)?)))
            .collect::<Result<_>>()?;
        drop(grads);
        let mut grads = host_grads;
        let names: Vec<&String> = grads.iter().map(|(n, _)| n).collect();
        let want: Vec<&String> = {
            let mut w: Vec<&String> = held.iter().map(|(n, _, _)| n).collect();
            w.sort();
            w
        };
        if names != want {
            return Err(internal(format!(
                "rank {rank}: gradients for {names:?}, parameters {want:?}"
            )));
        }
        // A tied embedding's two copies (first and last stage) add their gradients.
        if cfg.tie_embeddings && pp > 1 && (stage == 0 || stage + 1 == pp) {
            let other = if stage == 0 { pp - 1 } else { 0 };
            let peer = world.process_at_rank((tp_rank + tp * (dp_rank + dp * other)) as i32);
            let embed = plan
                .tensors
                .iter()
                .find(|t| t.stages.len() > 1)
                .ok_or_else(|| internal("no tied embedding in the plan"))?;
            let g = grads
                .iter_mut()
                .find(|(n, _)| *n == embed.name)
                .ok_or_else(|| internal("no embedding gradient"))?;
            let mut theirs = vec![0f32; g.1.len()];
            mpi::point_to_point::send_receive_into(&g.1[..], &peer, &mut theirs[..], &peer);
            for (x, y) in g.1.iter_mut().zip(theirs) {
                *x += y;
            }
        }
        // The gradients' layout: name order, each parameter's length.
        let layout: Vec<(String, usize)> =
            grads.iter().map(|(n, g)| (n.clone(), g.len())).collect();
        let numel: usize = layout.iter().map(|(_, n)| n).sum();
        let align = DEEPSPEED_ALIGNMENT as usize * dp;
        let part_len = numel.div_ceil(align) * align / dp;
        // The DP mean: per parameter (all-reduce), or this rank's partition of the flat buffer.
        let mut partition = Vec::new();
        let mut held = None;
        if zero == 0 {
            for (_, g) in grads.iter_mut() {
                let mut sum = vec![0f32; g.len()];
                dp_group.all_reduce_into(&g[..], &mut sum[..], SystemOperation::sum());
                *g = sum.into_iter().map(|x| x / dp as f32).collect();
            }
        } else {
            let mut flat = Vec::with_capacity(part_len * dp);
            for (_, g) in grads.drain(..) {
                flat.extend_from_slice(&g);
            }
            flat.resize(part_len * dp, 0.0);
            partition = vec![0f32; part_len];
            dp_group.reduce_scatter_block_into(
                &flat[..],
                &mut partition[..],
                SystemOperation::sum(),
            );
            drop(flat);
            for x in partition.iter_mut() {
                *x /= dp as f32;
            }
            // What the rank holds now: its weights (and the lean model's views of them) and
            // its partition.
            let measured = probe.current()?.saturating_sub(baseline);
            let weights = crate::plan::lean::predicted(cfg, plan, rank, &opts)?.weights_bytes;
            held = Some((measured, weights + part_len as u64 * 4));
        }
        drop((lean, varmap));

        // The single-process step on the whole batch; this rank's slice of each gradient.
        let (_, reference) = LeanModel::from_varmap(cfg, &full)?.loss_and_grads(&all_ids, &opts)?;
        let (mut worst, mut scale) = (0f64, 0f64);
        let mut compare = |g: &[f32], r: &[f32]| {
            for (x, y) in g.iter().zip(r) {
                worst = worst.max((x - y).abs() as f64);
                scale = scale.max(y.abs() as f64);
            }
        };
        let mut flat_ref = Vec::new();
        for (i, (name, len)) in layout.iter().enumerate() {
            let shard = plan
                .tensors
                .iter()
                .find(|t| &t.name == name)
                .ok_or_else(|| internal(format!("{name} not in the plan")))?;
            let r = reference
                .get(name)
                .ok_or_else(|| internal(format!("{name}: no reference gradient")))?;
            let r = host(&piece(r, shard, tp_rank, tp)?)?;
            if r.len() != *len {
                return Err(internal(format!(
                    "{name}: {} elements, reference {}",
                    len,
                    r.len()
                )));
            }
            match grads.get(i) {
                Some((_, g)) => compare(g, &r),
                None => flat_ref.extend_from_slice(&r),
            }
        }
        if zero > 0 {
            flat_ref.resize(part_len * dp, 0.0);
            compare(
                &partition,
                &flat_ref[dp_rank * part_len..(dp_rank + 1) * part_len],
            );
        }
        let predicted = |r: usize| -> Result<(u64, &'static str)> {
            Ok((
                crate::plan::lean::predicted(cfg, plan, r, &opts)?.peak_bytes,
                "the lean step's closed form for its shard",
            ))
        };
        collect(
            &world,
            cfg,
            step,
            plan,
            Found {
                peak,
                worst,
                scale,
                held,
                zero,
            },
            &predicted,
        )
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
            out.push(host(g)?);
        }
        Ok((out, peak))
    }

    /// Data parallelism through candle's autograd, for configs the lean step cannot run: every
    /// rank runs the whole network on its microbatch, the gradients are all-reduced.
    fn autograd_dp(
        a: &VerifyArgs,
        cfg: &ModelConfig,
        step: Step,
        plan: &ShardPlan,
        world: SimpleCommunicator,
    ) -> Result<Option<DistributedRun>> {
        let dp = plan.dp;
        let rank = world.rank() as usize;
        let device = Device::Cpu;
        let all_ids =
            extrapolate::random_tokens(cfg.vocab_size, step.batch * dp, step.seq, a.seed, &device)?;
        let mine = all_ids
            .narrow(0, rank * step.batch, step.batch)?
            .contiguous()?;
        measure::warm_gemm_thread_buffers()?;
        let probe = measure::probe_for(&device)?;
        probe.reset_peak()?;
        let baseline = probe.current()?;
        let (varmap, model) = build::random(cfg, step.dtype.candle(), &device, a.seed)?;
        let (grads, peak) = gradients(&model, &varmap, &mine, probe.as_ref())?;
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
        // The single-process step on the whole batch, same weights.
        let (reference, _) = gradients(&model, &varmap, &all_ids, probe.as_ref())?;
        let (mut worst, mut scale) = (0f64, 0f64);
        for (g, r) in reduced.iter().zip(&reference) {
            for (x, y) in g.iter().zip(r) {
                worst = worst.max((x - y).abs() as f64);
                scale = scale.max(y.abs() as f64);
            }
        }
        let params = crate::estimate::params::estimate(cfg)?.total;
        let predicted = autograd_replay::model(cfg, params, step).peak_bytes;
        collect(
            &world,
            cfg,
            step,
            plan,
            Found {
                peak,
                worst,
                scale,
                held: None,
                zero: 0,
            },
            &|_| Ok((predicted, "the autograd replay")),
        )
    }
}
