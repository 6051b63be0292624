//! `truesize gpus`: which GPUs the training state fits on, and days to train D tokens on N of
//! them at an assumed MFU (no tensors).

use super::common::{base_report, load_config, positive, print, resolve_step, MAX_BUDGET};
use crate::cli::{Format, GpusArgs};
use crate::config::{ModelConfig, Step};
use crate::dtype::TrainDtype;
use crate::error::{Error, Result, EXIT_OK};
use crate::estimate::gpus::{self, FitInputs, GpuReport, DEFAULT_ASSUMED_MFU};
use crate::estimate::scaling::TOKENS_PER_PARAM;
use crate::report::sections::Section;
use crate::units::group;

fn s(x: impl ToString) -> String {
    x.to_string()
}

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
    let report = base_report("gpus", &cfg, step)?;
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
    };
    let dt = r.dtype.name();
    let secs = vec![Section {
        title: format!(
            "GPUs for {} ({} params), training in {dt}, batch {} × seq {}",
            r.model,
            group(r.params),
            r.batch,
            r.seq
        ),
        header: [
            "GPU",
            "memory",
            "training state share",
            "weights share",
            "fits one",
            "GPUs if sharded",
            &format!("dense {dt} peak"),
            "days",
        ]
        .map(s)
        .to_vec(),
        rows: r
            .rows
            .iter()
            .map(|f| {
                vec![
                    s(f.gpu.name),
                    crate::units::Bytes(f.gpu.memory_bytes).human(),
                    format!("{:.1}%", f.training_share * 100.0),
                    format!("{:.1}%", f.weights_share * 100.0),
                    s(if f.fits { "yes" } else { "no" }),
                    group(f.min_gpus_sharded),
                    f.peak_flops_per_s
                        .map_or_else(|| format!("no {dt}"), |p| format!("{:.1} TFLOP/s", p / 1e12)),
                    f.days.map_or_else(|| s("n/a"), |d| format!("{d:.2}")),
                ]
            })
            .collect(),
        notes: vec![
            format!(
                "training state: {} (weights + grads + AdamW m, v{} + activations at batch × seq)",
                r.training_bytes,
                if r.dtype == TrainDtype::F32 { "" } else { " + f32 master weights" }
            ),
            format!(
                "days = {:.4e} FLOPs/token × {:.4e} tokens / ({} GPUs × peak × MFU {}) ; tokens: {}",
                r.flops_per_token, r.tokens, r.gpus, r.mfu, r.tokens_source
            ),
            format!(
                "FLOPs/token: counted fwd+bwd (nanoGPT convention, attention at seq {}) = {:.4e}; 6·N = {:.4e}",
                r.seq, r.flops_per_token, r.six_n
            ),
            format!("MFU: {}", r.mfu_source),
            format!(
                "peaks: dense datasheet figures (no sparsity), tensor cores for bf16/fp16, CUDA cores for fp32{}",
                if dtype_default { "; dtype: bf16 by default (set --dtype)" } else { "" }
            ),
        ],
    }];
    print(format, &r, &secs)?;
    Ok(EXIT_OK)
}
