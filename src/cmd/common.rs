//! Helpers the command files share. Imports nothing from the command files, so no command
//! depends on another.

use crate::cli::{AttentionArg, CheckpointArg, ConfigArgs, EngineArgs, SavedArg, StepArgs};
use crate::config::{self, presets, ConfigSource, ModelConfig, Step};
use crate::dtype::TrainDtype;
use crate::error::{Error, Result, EXIT_CHECK_FAILED, EXIT_OK};
use crate::estimate::{gpus, memory, params};
use crate::measure::extrapolate::StepRunner;
use crate::measure::probe::MemoryProbe;
use crate::measure::run::{OptimizerStep, PhaseBytes, StepResult};
use crate::model::autograd_replay as activations;
use crate::report::{Report, RunInfo, StepModel};
use crate::train::{self, LeanOptions};
use crate::units::Bytes;

/// `--config PATH`, `--preset NAME`, or the default preset.
pub fn load_config(args: &ConfigArgs) -> Result<ModelConfig> {
    match (&args.config, &args.preset) {
        (Some(path), _) => config_at(path),
        (None, Some(name)) => config::load(ConfigSource::Preset(name)),
        (None, None) => config::load(ConfigSource::Preset(presets::DEFAULT_PRESET)),
    }
}

/// batch, seq, dtype after command line > config `[run]` > defaults, validated against the model.
pub fn resolve_step(cfg: &ModelConfig, step: &StepArgs) -> Result<Step> {
    Step::resolve(cfg, step.batch, step.seq, step.dtype.as_deref())
}

/// Which training step runs and is predicted.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Engine {
    /// The lean step: keeps what PyTorch's autograd keeps; predicted by `train::memory`.
    Lean(LeanOptions),
    /// candle's own autograd; predicted by the per-op replay (`model::autograd_replay`).
    Autograd,
}

impl Engine {
    pub fn label(&self) -> &'static str {
        match self {
            Engine::Lean(_) => "lean",
            Engine::Autograd => "autograd",
        }
    }

    /// Weights are built in this dtype: AMP keeps f32 master weights and computes in `--dtype`.
    pub fn weights_dtype(&self, step: Step) -> candle_core::DType {
        match self {
            Engine::Lean(o) if o.amp.is_some() => candle_core::DType::F32,
            _ => step.dtype.candle(),
        }
    }

    /// The predicted step, whichever engine runs it.
    pub fn predict(&self, cfg: &ModelConfig, params_total: u64, step: Step) -> StepModel {
        match self {
            Engine::Lean(o) => {
                let p = train::memory::predict(cfg, step, o);
                StepModel {
                    engine: self.label(),
                    peak_bytes: p.peak_bytes,
                    optimizer_peak_bytes: p.optimizer_peak_bytes,
                    weights_bytes: p.weights_bytes,
                    gradients_bytes: p.gradients_bytes,
                    saved_bytes: Some(p.saved_bytes),
                    terms: p.terms,
                }
            }
            Engine::Autograd => {
                let a = activations::model(cfg, params_total, step);
                StepModel {
                    engine: self.label(),
                    peak_bytes: a.peak_bytes,
                    optimizer_peak_bytes: Some(a.adamw_peak_bytes),
                    weights_bytes: a.weights_bytes,
                    gradients_bytes: a.gradients_bytes,
                    saved_bytes: None,
                    terms: Vec::new(),
                }
            }
        }
    }
}

/// The engine the flags ask for, validated against the config and the step. The lean engine is
/// the default; a step it cannot run (pure half-precision weights, or whatever
/// `train::supported` refuses) falls back to candle's autograd with the reason returned as a
/// note, unless a lean-only flag was given (then exit 2).
pub fn resolve_engine(
    cfg: &ModelConfig,
    step: Step,
    a: &EngineArgs,
    optimizer: Option<train::Optimizer>,
) -> Result<(Engine, Option<String>)> {
    let lean_only = [
        (
            a.checkpoint == Some(CheckpointArg::Blocks),
            "--checkpoint",
            "blocks",
        ),
        (
            a.attention == Some(AttentionArg::Flash),
            "--attention",
            "flash",
        ),
        (a.amp, "--amp", "true"),
        (a.saved == Some(SavedArg::Fused), "--saved", "fused"),
        (
            optimizer == Some(train::Optimizer::Sgd),
            "--optimizer",
            "sgd",
        ),
    ];
    if a.amp && step.dtype == TrainDtype::F32 {
        return Err(Error::field(
            "command line",
            "--amp",
            "with --dtype f32",
            "AMP computes in a half-precision dtype: add --dtype bf16 or --dtype f16",
        ));
    }
    if a.engine == Some(crate::cli::Engine::Autograd) {
        if let Some((_, flag, value)) = lean_only.iter().find(|(set, _, _)| *set) {
            return Err(Error::field(
                "command line",
                *flag,
                value,
                "needs the lean engine: candle's autograd keeps its whole graph (eager \
                 attention, no checkpointing, no AMP, AdamW only); drop --engine autograd",
            ));
        }
        return Ok((Engine::Autograd, None));
    }
    let opts = LeanOptions {
        checkpoint: match a.checkpoint {
            Some(CheckpointArg::Blocks) => train::Checkpoint::Blocks,
            _ => train::Checkpoint::None,
        },
        attention: match a.attention {
            Some(AttentionArg::Eager) => train::Attention::Eager,
            _ => train::Attention::Flash,
        },
        amp: a.amp.then(|| step.dtype.candle()),
        optimizer,
        saved: match a.saved {
            Some(SavedArg::Fused) => train::SavedSet::Fused,
            _ => train::SavedSet::Transformers,
        },
    };
    // The lean step's memory model is written for f32 weights and AMP; pure half precision runs
    // through candle's autograd, whose replay models bf16's widened matmuls.
    let supported = if step.dtype != TrainDtype::F32 && opts.amp.is_none() {
        Err(format!(
            "pure {} weights (its memory model covers f32; half precision is --amp)",
            step.dtype.name()
        ))
    } else {
        train::supported_at(cfg, &opts, step.seq)
    };
    match supported {
        Ok(()) => Ok((Engine::Lean(opts), None)),
        Err(why) if a.amp => Err(Error::field(
            "command line",
            "--amp",
            "true",
            format!(
                "the lean step cannot run {} {} in mixed precision: {why}; drop --amp (candle's \
                 autograd has no AMP either)",
                cfg.model_type, cfg.name
            ),
        )),
        Err(why) => {
            let asked = a.engine.is_some() || lean_only.iter().any(|(set, _, _)| *set);
            if asked {
                Err(Error::field(
                    "command line",
                    "--engine",
                    "lean",
                    format!(
                        "the lean step cannot run {} {}: {why}; use --engine autograd",
                        cfg.model_type, cfg.name
                    ),
                ))
            } else {
                Ok((
                    Engine::Autograd,
                    Some(format!(
                        "the lean step cannot run this config ({why}): this run uses candle's \
                         autograd (--engine autograd), whose memory is candle's, not PyTorch's"
                    )),
                ))
            }
        }
    }
}

/// The estimate part every report starts from, predicted for `engine`'s step.
pub fn base_report(
    command: &'static str,
    cfg: &ModelConfig,
    step: Step,
    engine: &Engine,
) -> Result<Report> {
    let p = params::estimate(cfg)?;
    let flops = crate::estimate::flops::estimate(cfg, &p, step.seq, false)?;
    // What the step adds at its peak beyond weights and gradients: kept activations, the
    // gradients in flight and the largest op's transients.
    let sm = engine.predict(cfg, p.total, step);
    let act = (sm.peak_bytes != u64::MAX).then(|| {
        Bytes(
            sm.peak_bytes
                .saturating_sub(sm.weights_bytes)
                .saturating_sub(sm.gradients_bytes),
        )
    });
    let (checkpoint, attention, amp, saved) = match engine {
        Engine::Lean(o) => (
            Some(o.checkpoint),
            Some(o.attention),
            o.amp.map(|d| format!("{d:?}").to_lowercase()),
            Some(o.saved),
        ),
        Engine::Autograd => (None, None, None, None),
    };
    let activation = (*engine == Engine::Autograd).then(|| activations::model(cfg, p.total, step));
    Ok(Report {
        command,
        model: cfg.clone(),
        run: RunInfo {
            batch: step.batch,
            seq: step.seq,
            dtype: step.dtype,
            engine: Some(engine.label()),
            checkpoint,
            attention,
            amp,
            saved,
            device: None,
            tolerance: None,
            repeat: None,
            weights: None,
        },
        weights: memory::weight_bytes(p.total),
        training: memory::training(&p, step.dtype, act),
        params: p,
        census: None,
        memory: None,
        timing: None,
        loss: None,
        flops: Some(flops),
        mfu: None,
        checkpoint: None,
        quantized: None,
        rules: Vec::new(),
        extrapolation: None,
        checks: Vec::new(),
        pass: None,
        notes: Vec::new(),
        peak_rss_bytes: None,
        activation,
        step_model: Some(sm),
    })
}

/// Exit code for a finished run with checks.
pub fn verdict(pass: bool) -> u8 {
    if pass {
        EXIT_OK
    } else {
        EXIT_CHECK_FAILED
    }
}

/// Largest accepted `--flops` (10^35: far beyond any conceivable training run) and `--tokens`.
pub const MAX_BUDGET: f64 = 1e35;

/// A command-line number that must be finite, > 0 and at most `max`.
pub fn positive(field: &str, v: f64, max: f64) -> Result<f64> {
    if v.is_finite() && v > 0.0 && v <= max {
        Ok(v)
    } else {
        Err(Error::field(
            "command line",
            field,
            v,
            format!("must be > 0 and at most {max:e}"),
        ))
    }
}

/// The config at `path`: a GGUF file's metadata, an HF folder or `config.json`, or a truesize
/// TOML. GGUF is told by its magic bytes, whatever the file is called.
pub fn config_at(path: &std::path::Path) -> Result<ModelConfig> {
    if crate::checkpoint::gguf::has_magic(path) {
        let h = crate::checkpoint::gguf::read_header(path)?;
        return crate::checkpoint::gguf::config_from_header(&h);
    }
    config::load(ConfigSource::Path(path))
}

/// A randomly initialised or loaded model, ready for the engine that runs it.
pub struct Built {
    pub varmap: candle_nn::VarMap,
    /// candle's network over the same tensors; `None` for the lean engine, which drops it (its
    /// precomputed masks and RoPE tables are not part of the lean step).
    pub model: Option<crate::model::Model>,
    /// The lean step's view of the same tensors (no copy); `None` for the autograd engine.
    pub lean: Option<train::LeanModel>,
}

impl Engine {
    /// Wrap a built model for this engine.
    pub fn prepare(
        &self,
        cfg: &ModelConfig,
        varmap: candle_nn::VarMap,
        model: crate::model::Model,
    ) -> Result<Built> {
        let (model, lean) = match self {
            Engine::Lean(_) => {
                drop(model);
                (None, Some(train::LeanModel::from_varmap(cfg, &varmap)?))
            }
            Engine::Autograd => (Some(model), None),
        };
        Ok(Built {
            varmap,
            model,
            lean,
        })
    }

    /// One measured step (repeated `repeat` times for timing) with this engine.
    #[allow(clippy::too_many_arguments)]
    pub fn run_step(
        &self,
        built: &Built,
        ids: &candle_core::Tensor,
        probe: &dyn MemoryProbe,
        baseline: u64,
        after_build: u64,
        repeat: usize,
        autograd_optimizer: Option<OptimizerStep>,
    ) -> Result<StepResult> {
        match (self, &built.lean, &built.model) {
            (Engine::Lean(o), Some(lean), _) => {
                train::run::run(lean, ids, o, probe, baseline, after_build, repeat)
            }
            (_, _, Some(model)) => crate::measure::run::train_step_with(
                model,
                &built.varmap,
                ids,
                probe,
                baseline,
                after_build,
                repeat,
                autograd_optimizer,
            ),
            _ => Err(Error::Internal(anyhow::anyhow!(
                "the model was prepared for another engine"
            ))),
        }
    }
}

impl StepRunner for Engine {
    fn predicted_peak(&self, cfg: &ModelConfig, step: Step) -> Result<u64> {
        let params = params::estimate(cfg)?.total;
        Ok(self.predict(cfg, params, step).peak_bytes)
    }

    fn measure(
        &self,
        cfg: &ModelConfig,
        step: Step,
        seed: u64,
        ids: &candle_core::Tensor,
        probe: &dyn MemoryProbe,
    ) -> Result<PhaseBytes> {
        probe.reset_peak()?;
        let baseline = probe.current()?;
        let (varmap, model) =
            crate::model::build::random(cfg, self.weights_dtype(step), ids.device(), seed)?;
        let built = self.prepare(cfg, varmap, model)?;
        let after_build = probe.current()?;
        let r = self.run_step(&built, ids, probe, baseline, after_build, 1, None)?;
        Ok(r.memory)
    }
}

/// A GPU of the `gpus` table by its name or a unique part of it.
pub fn find_gpu(name: &str) -> Result<&'static gpus::Gpu> {
    let lower = name.to_ascii_lowercase();
    if let Some(g) = gpus::GPUS
        .iter()
        .find(|g| g.name.eq_ignore_ascii_case(name))
    {
        return Ok(g);
    }
    let matches: Vec<&gpus::Gpu> = gpus::GPUS
        .iter()
        .filter(|g| g.name.to_ascii_lowercase().contains(&lower))
        .collect();
    match matches.as_slice() {
        [one] => Ok(one),
        _ => Err(Error::field(
            "command line",
            "--gpu",
            format!("{name:?}"),
            format!(
                "{}; known: {}",
                if matches.is_empty() {
                    "no such GPU"
                } else {
                    "matches several GPUs"
                },
                gpus::GPUS
                    .iter()
                    .map(|g| g.name)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        )),
    }
}
