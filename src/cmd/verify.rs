//! `truesize verify`: estimate, build the genuine model, measure it, compare.

use super::common::{base_report, load_config, resolve_engine, resolve_step, verdict, Engine};
use crate::check::{all_pass, Check};
use crate::checkpoint::write::{self, TensorMeta};
use crate::checkpoint::{self, Checkpoint};
use crate::cli::{Optimizer, VerifyArgs};
use crate::config::{ModelConfig, Step};
use crate::error::{Error, Result};
use crate::estimate::params::{self, Component};
use crate::family;
use crate::measure::census::{self, Census};
use crate::measure::device::DeviceSpec;
use crate::measure::probe::MemoryProbe;
use crate::measure::reference::Reference;
use crate::measure::run::{self, OptimizerStep};
use crate::measure::{alloc, quantize, sysmem};
use crate::model::build::{self, VARMAP_BYTES_PER_TENSOR};
use crate::report::{emit, Format, MemoryReport, Report, StepModel, Timing, View};
use crate::units::Bytes;
use candle_core::Device;
use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Instant;

/// The 12·d² rule's bound where its assumptions hold (`--tolerance`, `[run] tolerance`).
pub const DEFAULT_TOLERANCE: f64 = 0.01;
/// Predicted vs measured peak memory: the replay is exact to ~0.5% on the grid in
/// tests/peak_prediction.rs; 5% leaves room for data-dependent MoE routing and gemm's threading.
const PEAK_TOLERANCE: f64 = 0.05;
/// The lean step's closed form against its measured peak: the step allocates what the form
/// writes down, so what is left is bookkeeping and the runtime's first-step buffers.
const LEAN_PEAK_TOLERANCE: f64 = 0.02;
/// At initialisation every token is about equally likely: the loss is within this of ln(vocab)
/// (shown, never gating).
const LOSS_AT_INIT_TOLERANCE: f64 = 0.05;
/// Largest accepted `--repeat`.
const MAX_REPEAT: usize = 1000;
/// Allocated weight and gradient bytes exceed numel × element size by each tensor's
/// bookkeeping (`model::build::VARMAP_BYTES_PER_TENSOR`, measured); the checks allow half as
/// much again, for longer names.
const BOOKKEEPING_BYTES_PER_TENSOR: u64 = VARMAP_BYTES_PER_TENSOR * 3 / 2;
/// Reference tolerances: logits max relative error, loss, gradient norms.
const LOGITS_TOLERANCE: f64 = 1e-4;
const LOSS_TOLERANCE: f64 = 1e-5;
const GRAD_NORM_TOLERANCE: f64 = 1e-3;
/// Checks from the checkpoint checker carry this prefix in verify's report.
const CHECKPOINT_CHECK_PREFIX: &str = "checkpoint headers: ";

/// Where the device's peak FLOP/s for MFU comes from.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum PeakSource {
    /// Not asked for: no MFU (a peak is never assumed).
    None,
    /// `--peak-tflops`, in FLOP/s.
    Given(f64),
    /// `--measure-peak`: the matmul probe.
    Measure,
}

/// `--model DIR`: the folder, its checkpoint opened and checked from the headers.
#[derive(Debug, Clone)]
pub struct ModelDir {
    pub dir: PathBuf,
    /// `None` for a GGUF file (checked from its header with `--shapes-only` only).
    pub checkpoint: Option<Checkpoint>,
    pub findings: checkpoint::Findings,
}

/// Every input of a verify run, validated before anything is built or run.
pub struct Plan {
    pub cfg: ModelConfig,
    pub model: Option<ModelDir>,
    pub reference: Option<Reference>,
    pub device: DeviceSpec,
    pub step: Step,
    pub tolerance: f64,
    pub repeat: usize,
    pub shapes_only: bool,
    pub seed: u64,
    pub max_memory: Option<u64>,
    pub peak: PeakSource,
    /// Write the checkpoint file and quantize the weights.
    pub artifacts: bool,
    pub extrapolate: bool,
    pub optimizer: Option<OptimizerStep>,
    /// The step that runs: lean (default) or candle's autograd.
    pub engine: Engine,
    /// Why the lean engine was not used, when it was not.
    pub engine_note: Option<String>,
    /// Every table, not only the headline.
    pub full: bool,
    pub format: Format,
}

impl Plan {
    pub fn from_args(a: VerifyArgs) -> Result<Plan> {
        let gguf = a.model.as_deref().is_some_and(checkpoint::gguf::has_magic);
        if let (true, false, Some(f)) = (gguf, a.shapes_only, &a.model) {
            return Err(Error::file(
                f,
                "is a GGUF file: verify trains in f32/f16/bf16 from an HF folder; use --shapes-only to check the file against its config, or `truesize infer --model` to run it",
            ));
        }
        let cfg = match &a.model {
            Some(dir) if gguf => super::common::config_at(dir)?,
            Some(dir) if dir.is_file() => return Err(Error::file(
                dir,
                "--model takes an HF model folder (config.json + model.safetensors), not a file",
            )),
            Some(dir) => super::common::config_at(dir)?,
            None => load_config(&a.config)?,
        };
        if a.repeat == 0 || a.repeat > MAX_REPEAT {
            return Err(Error::field(
                "command line",
                "--repeat",
                a.repeat,
                format!("must be between 1 and {MAX_REPEAT}"),
            ));
        }
        let tolerance = a
            .tolerance
            .or(cfg.run.tolerance)
            .unwrap_or(DEFAULT_TOLERANCE);
        if !(tolerance.is_finite() && tolerance >= 0.0) {
            return Err(Error::field(
                "command line",
                "--tolerance",
                tolerance,
                "must be >= 0",
            ));
        }
        let peak = match (a.peak_tflops, a.measure_peak) {
            (Some(tf), _) if tf.is_finite() && tf > 0.0 => PeakSource::Given(tf * 1e12),
            (Some(tf), _) => {
                return Err(Error::field(
                    "command line",
                    "--peak-tflops",
                    tf,
                    "must be > 0",
                ))
            }
            (None, true) => PeakSource::Measure,
            (None, false) => PeakSource::None,
        };
        let device = DeviceSpec::parse(&a.device)?;
        let reference = match &a.reference {
            Some(p) => Some(crate::measure::reference::load(p)?),
            None => None,
        };
        let mut step = resolve_step(&cfg, &a.step)?;
        if let (Some(r), [rb, rt]) = (
            &reference,
            reference.as_ref().map_or(&[][..], |r| r.input_ids.dims()),
        ) {
            // The reference fixes the input; a different shape asked for explicitly cannot be
            // honoured.
            for (flag, asked, fixed) in [("--batch", a.step.batch, *rb), ("--seq", a.step.seq, *rt)]
            {
                if let Some(v) = asked.filter(|&v| v != fixed) {
                    return Err(Error::field(
                        "command line",
                        flag,
                        v,
                        format!(
                            "the reference {} fixes it at {fixed}; drop {flag}",
                            r.source.display()
                        ),
                    ));
                }
            }
        }
        if let Some(r) = &reference {
            check_reference(r, &cfg, &mut step)?;
        }
        if step.seq < 2 && !a.shapes_only {
            return Err(Error::field(
                "command line",
                "--seq",
                step.seq,
                "a next-token loss needs at least 2 positions",
            ));
        }
        let model = match a.model {
            Some(dir) if gguf => {
                // The GGUF header, checked against the config its metadata describes.
                let r = checkpoint::gguf_inspect::inspect(&dir)?;
                let findings = checkpoint::Findings {
                    file_tensors: r.file_tensors,
                    file_numel: r.file_numel,
                    missing: r.missing,
                    unexpected: r.unexpected,
                    misshaped: r.misshaped,
                    expected_params: r.expected_params,
                    checks: r.checks,
                    notes: r.notes,
                    ..Default::default()
                };
                Some(ModelDir {
                    dir,
                    checkpoint: None,
                    findings,
                })
            }
            Some(dir) => {
                // Headers only: a corrupt file is bad input (exit 2) before anything is built.
                let checkpoint = Checkpoint::open(&dir)?;
                let findings = checkpoint::check(&checkpoint, Some(&cfg))?;
                Some(ModelDir {
                    dir,
                    checkpoint: Some(checkpoint),
                    findings,
                })
            }
            None => None,
        };
        let lean_optimizer = a.optimizer.map(|o| match o {
            Optimizer::Adamw => crate::train::Optimizer::AdamW,
            Optimizer::Sgd => crate::train::Optimizer::Sgd,
        });
        let (engine, engine_note) = resolve_engine(&cfg, step, &a.engine, lean_optimizer)?;
        Ok(Plan {
            engine,
            engine_note,
            cfg,
            model,
            reference,
            device,
            step,
            tolerance,
            repeat: a.repeat,
            shapes_only: a.shapes_only,
            seed: a.seed,
            max_memory: a.max_memory,
            peak,
            artifacts: !a.no_artifacts,
            extrapolate: a.extrapolate,
            // The autograd engine steps candle-nn's AdamW; the lean engine its own optimizers.
            optimizer: a
                .optimizer
                .filter(|o| *o == Optimizer::Adamw)
                .map(|_| OptimizerStep::AdamW),
            full: a.full,
            format: a.format,
        })
    }
}

/// The reference fixes the input: its shape overrides `--batch`/`--seq`, and its ids and logits
/// must fit the model's vocabulary.
fn check_reference(r: &Reference, cfg: &ModelConfig, step: &mut Step) -> Result<()> {
    if let [b, t] = r.input_ids.dims() {
        step.batch = *b;
        step.seq = *t;
        cfg.check_seq(*t)?;
    }
    if let Some(max) = r.max_token_id {
        if max as usize >= cfg.vocab_size {
            return Err(Error::field(
                r.source.display().to_string(),
                "input_ids",
                max,
                format!(
                    "token id beyond the model's vocab_size = {}",
                    cfg.vocab_size
                ),
            ));
        }
    }
    if let [b, t, v] = r.logits.dims() {
        if *v != cfg.vocab_size {
            return Err(Error::field(
                r.source.display().to_string(),
                "logits",
                format!("{:?}", r.logits.dims()),
                format!(
                    "the model's logits are [{b}, {t}, {}] (vocab_size = {})",
                    cfg.vocab_size, cfg.vocab_size
                ),
            ));
        }
    }
    Ok(())
}

pub fn run(a: VerifyArgs) -> Result<u8> {
    if super::verify_mpi::wanted(&a) {
        return super::verify_mpi::run(a);
    }
    let plan = Plan::from_args(a)?;
    let (cfg, step) = (&plan.cfg, plan.step);
    let mut report = base_report("verify", cfg, step, &plan.engine)?;
    report.notes.extend(plan.engine_note.clone());
    report.run.device = Some(plan.device.label());
    report.run.tolerance = Some(plan.tolerance);
    report.run.repeat = Some(plan.repeat);

    // Shape-only census: always cheap, and the count when we cannot or need not allocate.
    let t_shapes = Instant::now();
    let components = family::components_by_name(cfg);
    let specs = build::shapes_only(cfg, plan.engine.weights_dtype(step))?;
    let shape_census = Census::from_rows(
        specs
            .iter()
            .map(|s| census::row(&s.name, &s.shape, s.dtype, &components))
            .collect(),
        None,
        true,
    );
    let shapes_s = t_shapes.elapsed().as_secs_f64();

    let sm = report
        .step_model
        .clone()
        .unwrap_or_else(|| plan.engine.predict(cfg, report.params.total, step));
    let predicted_peak = sm.peak_bytes;
    let weights_need = shape_census.bytes;
    // Open the device before deciding anything: an absent device is an input error (exit 2).
    let device = if plan.shapes_only {
        None
    } else {
        Some(plan.device.open()?)
    };
    let limit = plan.max_memory.or_else(|| match &device {
        Some(d) if !d.is_cpu() => crate::measure::device::free_bytes(d),
        _ => sysmem::available_bytes(),
    });
    let mut checks = census_checks(&report, &shape_census, plan.tolerance, cfg);
    // The checkpoint, checked from its headers whether or not its weights are loaded.
    let mut refused: Option<String> = None;
    if let Some(m) = &plan.model {
        checks.extend(checkpoint_checks(&m.findings));
        let failures = m.findings.failures();
        if !failures.is_empty() {
            let msg = format!(
                "{}: the checkpoint does not match the {} config {}: {}",
                m.dir.display(),
                cfg.model_type,
                cfg.name,
                failures.join("; ")
            );
            report
                .notes
                .push(format!("nothing was built or run: {msg}"));
            refused = Some(msg);
        }
    }

    if plan.shapes_only {
        report
            .notes
            .push(format!("--shapes-only: counted {} tensors from names and shapes in {:.1} ms; nothing allocated", shape_census.tensors, shapes_s * 1e3));
    } else if refused.is_some() {
        // The checkpoint's own checks failed: nothing to build.
    } else if let Some(limit) = limit.filter(|&l| predicted_peak > l) {
        let msg = format!(
            "this run needs about {} (weights {} + activations and gradients at batch {} × seq {}), \
             but only {} is available; ways out: --shapes-only (exact count, no allocation), a smaller \
             --batch or --seq, or --max-memory BYTES to override the limit",
            Bytes(predicted_peak),
            Bytes(weights_need),
            step.batch,
            step.seq,
            Bytes(limit),
        );
        report.notes.push(format!(
            "refused before allocating: {msg}. The census below is shape-only."
        ));
        checks.push(Check {
            name: "memory preflight: predicted peak fits".into(),
            measured: predicted_peak as f64,
            expected: limit as f64,
            rel_error: crate::units::rel_error(predicted_peak as f64, limit as f64),
            tolerance: 0.0,
            pass: false,
            gating: true,
            note: Some("predicted bytes vs bytes available".into()),
        });
        refused = Some(format!("refused: {msg}"));
    }

    if let (Some(device), None) = (&device, &refused) {
        measure_real(&plan, device, &sm, &components, &mut report, &mut checks)?;
    } else {
        report.census = Some(shape_census);
    }
    rules_and_extrapolation(&plan, &mut report, &mut checks)?;
    let pass = all_pass(&checks);
    report.checks = checks;
    report.pass = Some(pass);
    report.peak_rss_bytes = sysmem::peak_rss_bytes();
    let view = if plan.full {
        View::Full
    } else {
        View::Headline
    };
    emit(plan.format, &report, view)?;
    if let Some(msg) = refused {
        eprintln!("error: {msg}");
    }
    Ok(verdict(pass))
}

/// Rules of thumb beside our prediction, scored against the measured peak, and with
/// `--extrapolate` the peak predicted from 1- and 2-layer runs.
fn rules_and_extrapolation(
    plan: &Plan,
    report: &mut Report,
    checks: &mut Vec<Check>,
) -> Result<()> {
    let (cfg, step) = (&plan.cfg, plan.step);
    use crate::estimate::rules;
    let measured = report.memory.as_ref().map(|m| m.phases.peak_bytes);
    // The measured step runs no optimizer, so the rules get no AdamW states added.
    let predicted_peak = report.step_model.as_ref().map_or(0, |a| a.peak_bytes);
    let mut rs = rules::predict(cfg, report.params.total, step, false, predicted_peak);
    if let Some(m) = measured {
        rules::score(&mut rs, m);
    }
    report.rules = rs;
    if !alloc::counting() {
        report.notes.push(format!(
            "{}: the counting allocator was switched off; memory figures are not measured",
            alloc::NO_COUNT_ENV
        ));
    }
    if plan.extrapolate {
        let device = plan.device.open()?;
        // The full model's step ran first in this process: its residue is the runtime's.
        let runtime = report
            .memory
            .as_ref()
            .map(|m| crate::measure::extrapolate::runtime_residue(&m.phases));
        let budget = crate::measure::budget::Budget::for_device(plan.max_memory, &device);
        let mut e = match crate::measure::extrapolate::extrapolate(
            cfg,
            step,
            plan.seed,
            &device,
            runtime,
            predicted_peak,
            &budget,
            &plan.engine,
        ) {
            Ok(e) => e,
            Err(Error::Refused(why)) => {
                // The rest of the report stands; the extrapolation is a failed check.
                report.notes.push(format!("--extrapolate refused: {why}"));
                checks.push(Check::holds(
                    "--extrapolate: shallow runs fit in memory",
                    false,
                    why,
                ));
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        if let Some(m) = measured {
            e = e.with_measured(m);
            checks.push(
                Check::rel(
                    "peak memory: extrapolated from 1 and 2 layers vs measured",
                    e.predicted_peak_bytes as f64,
                    m as f64,
                    PEAK_TOLERANCE,
                )
                .informational("peak(L) = base + L · (peak(2) − peak(1))"),
            );
            checks.push(
                Check::rel(
                    "peak memory: model-guided extrapolation vs measured",
                    e.model_guided_peak_bytes as f64,
                    m as f64,
                    PEAK_TOLERANCE,
                )
                .with_note("the prediction at full depth + its measured error at 1 and 2 layers"),
            );
        }
        report.extrapolation = Some(e);
    }
    Ok(())
}

/// The checkpoint checker's checks, named as verify reports them.
fn checkpoint_checks(f: &checkpoint::Findings) -> Vec<Check> {
    f.checks
        .iter()
        .cloned()
        .map(|mut c| {
            c.name = format!("{CHECKPOINT_CHECK_PREFIX}{}", c.name);
            c
        })
        .collect()
}

/// Census against the estimate: total, per component, bytes, and the 12·d² rule.
fn census_checks(report: &Report, c: &Census, tolerance: f64, cfg: &ModelConfig) -> Vec<Check> {
    let p = &report.params;
    let mut checks = vec![Check::exact(
        "census numel == exact estimate",
        c.numel,
        p.total,
    )];
    for comp in Component::ALL {
        let (e, m) = (p.get(comp), c.get(comp));
        if e != 0 || m != 0 {
            checks.push(Check::exact(format!("  {}", comp.name()), m, e));
        }
    }
    if !c.unclassified.is_empty() {
        checks.push(Check::holds(
            "every tensor belongs to a component",
            false,
            c.unclassified.join(", "),
        ));
    }
    checks.push(
        Check::exact(
            "census bytes == numel × element size",
            c.bytes,
            c.numel.saturating_mul(c.element_bytes),
        )
        .with_note(format!("{} × {} B", c.dtype, c.element_bytes)),
    );
    if let Some(sb) = c.storage_bytes {
        checks.push(
            Check::exact("storage buffers == numel × element size", sb, c.bytes)
                .with_note("bytes of the real tensor buffers, each once"),
        );
    }
    let rough = Check::rel(
        "12·d² rule vs census",
        p.rough_12d2 as f64,
        c.numel as f64,
        tolerance,
    );
    let why_not = params::why_rough_rule_fails(cfg);
    checks.push(if why_not.is_empty() {
        rough.with_note("rule's assumptions hold: gates")
    } else {
        rough.informational(format!("does not apply: {}", why_not.join("; ")))
    });
    checks
}

/// Build the genuine model (random or from the checkpoint), census it, run the step under the
/// memory probe, and check every measurement.
fn measure_real(
    plan: &Plan,
    device: &Device,
    sm: &StepModel,
    components: &HashMap<String, Component>,
    report: &mut Report,
    checks: &mut Vec<Check>,
) -> Result<()> {
    let (cfg, step, tolerance) = (&plan.cfg, plan.step, plan.tolerance);
    let predicted_peak = sm.peak_bytes;
    let reference = plan.reference.as_ref();
    let weights_dtype = plan.engine.weights_dtype(step);
    let probe: Box<dyn MemoryProbe> = run::probe_for(device)?;
    let input_ids = match reference {
        Some(r) => r.input_ids.to_device(device)?,
        None => crate::measure::extrapolate::random_tokens(
            cfg.vocab_size,
            step.batch,
            step.seq,
            plan.seed,
            device,
        )?,
    };
    probe.reset_peak()?;
    let baseline = probe.current()?;
    let t0 = Instant::now();
    let (varmap, model, source) = match &plan.model {
        Some(m) => {
            let dir = &m.dir;
            let loaded = build::from_checkpoint(cfg, dir, weights_dtype, device)?;
            if !loaded.unexpected.is_empty() {
                report.notes.push(format!(
                    "checkpoint tensors that are not parameters (ignored): {}",
                    loaded.unexpected.join(", ")
                ));
            }
            (loaded.varmap, loaded.model, dir.display().to_string())
        }
        None => {
            let (vm, m) = build::random(cfg, weights_dtype, device, plan.seed)?;
            (
                vm,
                m,
                format!(
                    "random N(0, {}), seed {}",
                    crate::model::INIT_STD,
                    plan.seed
                ),
            )
        }
    };
    // The weights alone, before the engine's view of them (names and handles, no tensor data).
    let after_varmap = probe.current()?;
    let built = plan.engine.prepare(cfg, varmap, model)?;
    let build_s = t0.elapsed().as_secs_f64();
    let after_build = probe.current()?;
    report.run.weights = Some(source);

    let real = census::of_varmap(&built.varmap, components);
    // The real census replaces the shape-only checks made before building. Nothing else is
    // added to `checks` before the step: its allocations would count in the step's bytes.
    checks.clear();
    checks.extend(census_checks(report, &real, tolerance, cfg));
    let after_census = checks.len();
    let weights_measured = after_varmap.saturating_sub(baseline);
    let bookkeeping_tolerance =
        (BOOKKEEPING_BYTES_PER_TENSOR * real.tensors as u64) as f64 / real.bytes.max(1) as f64;
    checks.push(
        Check::rel(
            "weights: allocated bytes vs numel × element size",
            weights_measured as f64,
            real.bytes as f64,
            bookkeeping_tolerance,
        )
        .with_note(format!(
            "measured by the {}; allows {BOOKKEEPING_BYTES_PER_TENSOR} B of bookkeeping per tensor",
            probe.source()
        )),
    );

    let mut r = plan.engine.run_step(
        &built,
        &input_ids,
        probe.as_ref(),
        baseline,
        after_build,
        plan.repeat,
        plan.optimizer,
    )?;
    // The weights are the weights: the engine's handles on them count in the step's bytes.
    r.memory.weights_bytes = weights_measured;
    if let Some(m) = &plan.model {
        checks.splice(after_census..after_census, checkpoint_checks(&m.findings));
    }
    checks.extend(finite_checks(&r)?);
    checks.push(Check::holds(
        "every parameter got a gradient",
        r.missing_grads.is_empty(),
        if r.missing_grads.is_empty() {
            format!("{} of {} tensors", r.grad_norms.len(), real.tensors)
        } else {
            format!("missing: {}", r.missing_grads.join(", "))
        },
    ));
    checks.push(
        Check::rel(
            "gradients: allocated bytes vs numel × element size",
            r.memory.gradients_bytes as f64,
            real.bytes as f64,
            bookkeeping_tolerance,
        )
        .with_note("bytes freed when the gradients are dropped"),
    );
    // Both predictions describe candle's CPU backend: they gate on CPU; on a GPU the pool's
    // high-water mark follows other rules (no bf16 widening, no gemm slabs), so there they are
    // shown only.
    let on_cpu = matches!(device, Device::Cpu);
    // gemm's pool threads beyond the first allocate their L2 slab only if they win a race
    // for a task: the replay states that ± and the tolerance widens by it (tiny models only).
    let slab_race = report
        .activation
        .as_ref()
        .map_or(0, |a| a.gemm_slab_uncertainty_bytes);
    let race = |measured: u64| slab_race as f64 / measured.max(1) as f64;
    let (tolerance_base, how) = match plan.engine {
        // The experts' saved rows add up to tokens × k whatever the routing, but each expert's
        // transients follow how many tokens the router sends it on this batch: a mixture of
        // experts gets the replay's wider bound.
        Engine::Lean(_) if cfg.n_experts > 1 => (
            PEAK_TOLERANCE,
            "closed form; an expert's transients follow the router's choices on this batch"
                .to_string(),
        ),
        Engine::Lean(_) => (
            LEAN_PEAK_TOLERANCE,
            "closed form: weights + the saved set + the backward's transients".to_string(),
        ),
        Engine::Autograd => (
            PEAK_TOLERANCE,
            format!(
                "per-op replay of candle's allocations; ±{} gemm-slab race",
                Bytes(slab_race)
            ),
        ),
    };
    let peak_check = Check::rel(
        "peak memory: predicted vs measured",
        predicted_peak as f64,
        r.memory.peak_bytes as f64,
        tolerance_base + race(r.memory.peak_bytes),
    );
    let pad_in_batch = plan.engine == Engine::Autograd
        && match cfg.pad_token_id.and_then(|p| u32::try_from(p).ok()) {
            Some(pad) => input_ids
                .flatten_all()?
                .to_dtype(candle_core::DType::U32)?
                .to_vec1::<u32>()?
                .contains(&pad),
            None => false,
        };
    checks.push(if on_cpu && !pad_in_batch {
        peak_check.with_note(how)
    } else if on_cpu {
        peak_check.informational(
            "the batch holds the padding id: the embedding's masked gradient (a where_cond over \
             [tokens, d]) is data-dependent and not replayed",
        )
    } else {
        peak_check.informational("the prediction describes candle's CPU backend")
    });
    if let (Some(measured), Some(predicted)) =
        (r.memory.optimizer_peak_bytes, sm.optimizer_peak_bytes)
    {
        let c = Check::rel(
            "optimizer peak: predicted vs measured",
            predicted as f64,
            measured as f64,
            tolerance_base + race(measured),
        );
        checks.push(if on_cpu && !pad_in_batch {
            c.with_note("weights + gradients + optimizer states + the update's temporaries")
        } else if on_cpu {
            c.informational("the batch holds the padding id (not replayed)")
        } else {
            c.informational("the prediction describes candle's CPU backend")
        });
    }
    if reference.is_none() {
        // At initialisation every token is about equally likely: loss ≈ ln(vocab).
        let ln_v = (cfg.vocab_size as f64).ln();
        checks.push(
            Check::rel(
                "loss at init vs ln(vocab)",
                r.loss,
                ln_v,
                LOSS_AT_INIT_TOLERANCE,
            )
            .informational("sanity: random weights predict a near-uniform distribution"),
        );
    }
    if let Some(refr) = reference {
        reference_checks(refr, &r, real.numel, checks)?;
    }
    report.memory = Some(MemoryReport {
        source: probe.source(),
        phases: r.memory,
        predicted_peak_bytes: predicted_peak,
        peak_above_weights_bytes: r.memory.peak_bytes.saturating_sub(r.memory.weights_bytes),
        rss_bytes: sysmem::rss_bytes(),
    });
    report.timing = Some(Timing {
        repeat: plan.repeat,
        forward_s: run::median(&r.forward_s),
        backward_s: run::median(&r.backward_s),
        build_s,
    });
    report.loss = Some(r.loss);
    if let (Some(f), Some(t)) = (&report.flops, &report.timing) {
        let peak = match plan.peak {
            PeakSource::Given(flops_per_s) => {
                Some((flops_per_s, "given: --peak-tflops".to_string()))
            }
            PeakSource::Measure => Some(crate::measure::peak::measure_matmul_peak(device)?),
            PeakSource::None => None,
        };
        report.mfu = Some(crate::estimate::flops::mfu(
            f,
            step.batch,
            t.forward_s + t.backward_s,
            peak,
        ));
    }
    if plan.artifacts {
        let weights = plan.engine.weights_dtype(step);
        measure_artifacts(cfg, weights, &built.varmap, real.numel, report, checks)?;
    }
    report.census = Some(real);
    Ok(())
}

/// Write the model to a real `.safetensors` file (in the weights' dtype: f32 master weights under
/// AMP) and quantize its weights.
fn measure_artifacts(
    cfg: &ModelConfig,
    weights: candle_core::DType,
    varmap: &candle_nn::VarMap,
    numel: u64,
    report: &mut Report,
    checks: &mut Vec<Check>,
) -> Result<()> {
    let specs = build::shapes_only(cfg, weights)?;
    let metas: Vec<TensorMeta> = specs
        .iter()
        .map(|s| TensorMeta {
            name: &s.name,
            shape: &s.shape,
            dtype: s.dtype,
        })
        .collect();
    let predicted = write::predict(&metas)?;
    if predicted.file_bytes <= write::MAX_CHECKPOINT_BYTES {
        let c = match write::save_and_measure(varmap, &metas, None) {
            Ok(c) => c,
            Err(e) => {
                // The machine, not the user's input: the report stands, this check fails.
                checks.push(Check::holds(
                    "checkpoint: file written",
                    false,
                    format!(
                        "{}; set TMPDIR to a writable folder with room, or pass --no-artifacts",
                        crate::error::printable(&e.to_string())
                    ),
                ));
                return quantize_checks(numel, varmap, report, checks);
            }
        };
        checks.push(
            Check::exact(
                "checkpoint: file bytes == predicted",
                c.file_bytes,
                c.predicted_bytes,
            )
            .with_note("real .safetensors file vs 8 + header + Σ numel × element size"),
        );
        checks.push(Check::exact(
            "checkpoint: header bytes == predicted",
            c.header_bytes,
            c.predicted_header_bytes,
        ));
        report.checkpoint = Some(c);
    } else {
        report.notes.push(format!(
            "checkpoint not written: {} predicted exceeds the {} limit for a temp file",
            Bytes(predicted.file_bytes),
            Bytes(write::MAX_CHECKPOINT_BYTES)
        ));
    }
    quantize_checks(numel, varmap, report, checks)
}

/// Quantize the weights into every supported block format and check each size.
fn quantize_checks(
    numel: u64,
    varmap: &candle_nn::VarMap,
    report: &mut Report,
    checks: &mut Vec<Check>,
) -> Result<()> {
    if numel <= quantize::MAX_QUANTIZE_PARAMS {
        let q = quantize::quantize_varmap(varmap)?;
        for (name, r) in &q {
            checks.push(
                Check::exact(
                    format!("quantized {name}: storage bytes == blocks × block bytes"),
                    r.quantized_bytes,
                    r.predicted_quantized_bytes,
                )
                .with_note(match r.bits_per_weight {
                    Some(b) => format!("{b:.3} bits/weight"),
                    None => format!("no matrix row is a multiple of the {name} block"),
                }),
            );
        }
        report.quantized = Some(q);
    } else {
        report.notes.push(format!(
            "weights not quantized: {numel} parameters exceed the {} limit",
            quantize::MAX_QUANTIZE_PARAMS
        ));
    }
    Ok(())
}

fn reference_checks(
    refr: &crate::measure::reference::Reference,
    r: &run::StepResult,
    census_numel: u64,
    checks: &mut Vec<Check>,
) -> Result<()> {
    use crate::measure::reference::max_rel_error;
    let logits = r
        .logits
        .to_dtype(candle_core::DType::F32)?
        .to_device(&Device::Cpu)?;
    let err = max_rel_error(&logits, &refr.logits)?;
    checks.push(Check::error_bound(
        "reference: logits max relative error",
        err,
        LOGITS_TOLERANCE,
        "max|ours − ref| / max|ref|",
    ));
    if let Some(loss) = refr.loss {
        checks.push(Check::rel("reference: loss", r.loss, loss, LOSS_TOLERANCE));
    }
    if let Some(norms) = &refr.grad_norm {
        let mut worst: (f64, String) = (0.0, String::new());
        let mut missing = Vec::new();
        for (name, &want) in norms {
            match r.grad_norms.get(name) {
                Some(&got) => {
                    let e = crate::units::rel_error(got, want).abs();
                    if e > worst.0 || worst.1.is_empty() {
                        worst = (e, name.clone());
                    }
                }
                None => missing.push(name.clone()),
            }
        }
        checks.push(Check::error_bound(
            "reference: gradient norms, worst relative error",
            worst.0,
            GRAD_NORM_TOLERANCE,
            &format!("{} parameters; worst: {}", norms.len(), worst.1),
        ));
        if !missing.is_empty() {
            checks.push(Check::holds(
                "reference: every reference gradient exists",
                false,
                missing.join(", "),
            ));
        }
    }
    if let Some(p) = refr.params {
        checks.push(Check::exact("reference: parameter count", census_numel, p));
    }
    Ok(())
}

/// A loss, logits or gradients that are NaN or infinite make every other figure meaningless
/// (NaN weights in a checkpoint, an overflow in half precision): each is a failed check.
fn finite_checks(r: &run::StepResult) -> Result<Vec<Check>> {
    let bad_grads: Vec<&str> = r
        .grad_norms
        .iter()
        .filter(|(_, n)| !n.is_finite())
        .map(|(name, _)| name.as_str())
        .collect();
    // x · 0 is 0 for every finite x and NaN otherwise; the sum is exactly 0 iff all are finite.
    let logits_finite = (&r.logits * 0.0)?
        .to_dtype(candle_core::DType::F64)?
        .sum_all()?
        .to_scalar::<f64>()?
        == 0.0;
    Ok(vec![
        Check::holds("loss is finite", r.loss.is_finite(), format!("{}", r.loss)),
        Check::holds(
            "logits are finite",
            logits_finite,
            if logits_finite {
                "no NaN or ±inf".to_string()
            } else {
                "NaN or ±inf in the logits".to_string()
            },
        ),
        Check::holds(
            "gradients are finite",
            bad_grads.is_empty(),
            if bad_grads.is_empty() {
                format!("{} tensors", r.grad_norms.len())
            } else {
                format!(
                    "{} of {} tensors have a NaN or ±inf norm: {}",
                    bad_grads.len(),
                    r.grad_norms.len(),
                    crate::error::excerpt(&bad_grads.join(", "))
                )
            },
        ),
    ])
}
