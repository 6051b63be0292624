//! Helpers the command files share. Imports nothing from the command files, so no command
//! depends on another.

use crate::cli::{ConfigArgs, StepArgs};
use crate::config::{self, presets, ConfigSource, ModelConfig, Step};
use crate::error::{Error, Result, EXIT_CHECK_FAILED, EXIT_OK};
use crate::estimate::{gpus, memory, params};
use crate::model::autograd_replay as activations;
use crate::report::{Report, RunInfo};
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

/// The estimate part every report starts from.
pub fn base_report(command: &'static str, cfg: &ModelConfig, step: Step) -> Result<Report> {
    let p = params::estimate(cfg)?;
    let flops = crate::estimate::flops::estimate(cfg, &p, step.seq, false)?;
    // What the step adds at its peak beyond weights and gradients: kept activations, the
    // gradients in flight and the largest op's transients (the per-op replay).
    let am = activations::model(cfg, p.total, step);
    let act = (am.peak_bytes != u64::MAX).then(|| {
        Bytes(
            am.peak_bytes
                .saturating_sub(am.weights_bytes)
                .saturating_sub(am.gradients_bytes),
        )
    });
    Ok(Report {
        command,
        model: cfg.clone(),
        run: RunInfo {
            batch: step.batch,
            seq: step.seq,
            dtype: step.dtype,
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
        activation: Some(am),
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
