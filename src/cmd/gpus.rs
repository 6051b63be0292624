//! `truesize gpus`: which GPUs the training state fits on, and days to train D tokens on N of
//! them at an assumed MFU (no tensors).

use super::common::{base_report, load_config, positive, resolve_engine, resolve_step, MAX_BUDGET};
use crate::cli::GpusArgs;
use crate::config::{ModelConfig, Step};
use crate::dtype::TrainDtype;
use crate::error::{Error, Result, EXIT_OK};
use crate::estimate::gpus::{self, FitInputs, DEFAULT_ASSUMED_MFU};
use crate::estimate::scaling::TOKENS_PER_PARAM;
use crate::report::gpus::GpuReport;
use crate::report::{emit, Format, View};

/// Every input, validated.
pub struct Plan {
    pub cfg: ModelConfig,
    pub step: Step,
    /// No dtype was given anywhere: bf16 was assumed (and the report says so).
    pub dtype_default: bool,
    /// `--tokens`, checked; `None`: 20 per parameter.
    pub tokens: Option<f64>,
    pub gpus: u64,
    /// (MFU, where it comes from).
    pub mfu: (f64, String),
    pub format: Format,
}

impl Plan {
    pub fn from_args(a: GpusArgs) -> Result<Plan> {
        let cfg = load_config(&a.config)?;
        let mut step_args = a.step;
        let dtype_default = step_args.dtype.is_none() && cfg.run.dtype.is_none();
        if dtype_default {
            step_args.dtype = Some(TrainDtype::Bf16.name().to_string());
        }
        let step = resolve_step(&cfg, &step_args)?;
        let tokens = a
            .tokens
            .map(|d| positive("--tokens", d, MAX_BUDGET))
            .transpose()?;
        if a.gpus == 0 || a.gpus > MAX_GPUS {
            return Err(Error::field(
                "command line",
                "--gpus",
                a.gpus,
                "must be between 1 and 2^24",
            ));
        }
        let mfu = match a.mfu {
            Some(m) if m.is_finite() && m > 0.0 && m <= 1.0 => (m, "assumed: --mfu".to_string()),
            Some(m) => return Err(Error::field("command line", "--mfu", m, "must be in (0, 1]")),
            None => (
                DEFAULT_ASSUMED_MFU,
                format!("assumed default {DEFAULT_ASSUMED_MFU} (set --mfu X; `verify --measure-peak` measures one)"),
            ),
        };
        Ok(Plan {
            cfg,
            step,
            dtype_default,
            tokens,
            gpus: a.gpus,
            mfu,
            format: a.format,
        })
    }
}

/// Largest accepted `--gpus`.
const MAX_GPUS: u64 = 1 << 24;

pub fn run(a: GpusArgs) -> Result<u8> {
    let Plan {
        cfg,
        step,
        dtype_default,
        tokens,
        gpus: n_gpus,
        mfu: (mfu, mfu_source),
        format,
    } = Plan::from_args(a)?;
    let (engine, engine_note) = resolve_engine(&cfg, step, &Default::default(), None)?;
    let mut report = base_report("gpus", &cfg, step, &engine)?;
    report.notes.extend(engine_note);
    let flops = report
        .flops
        .as_ref()
        .ok_or_else(|| Error::Internal(anyhow::anyhow!("no FLOPs estimate")))?;
    let params = report.params.total;
    let (tokens, tokens_source) = match tokens {
        Some(d) => (d, "given: --tokens".to_string()),
        None => (
            TOKENS_PER_PARAM * params as f64,
            format!("{TOKENS_PER_PARAM} tokens per parameter (Chinchilla rule of thumb; set --tokens D)"),
        ),
    };
    let flops_per_token = flops.total as f64 / flops.seq as f64;
    let weights_bytes = report.training.weights_bytes;
    let training_bytes = report.training.total_bytes;
    let rows = gpus::table(&FitInputs {
        training_bytes: training_bytes.0,
        weights_bytes: weights_bytes.0,
        dtype: step.dtype,
        flops_per_token,
        tokens,
        gpus: n_gpus,
        mfu,
    });
    let r = GpuReport {
        model: cfg.name.clone(),
        params,
        dtype: step.dtype,
        batch: step.batch,
        seq: step.seq,
        training_bytes,
        weights_bytes,
        tokens,
        tokens_source,
        gpus: n_gpus,
        mfu,
        mfu_source,
        flops_per_token,
        six_n: 6.0 * params as f64,
        training_flops: flops_per_token * tokens,
        rows,
        dtype_assumed: dtype_default,
    };
    emit(format, &r, View::Full)?;
    Ok(EXIT_OK)
}
