//! One function per subcommand: resolve inputs, run the pipeline, hand a `Report` to an exporter.

use crate::cli::{Cli, Command, ConfigArgs, EstimateArgs, Format, PresetsArgs, StepArgs};
use crate::config::{self, presets, ConfigSource, ModelConfig};
use crate::dtype::TrainDtype;
use crate::error::{Error, Result, EXIT_CHECK_FAILED, EXIT_OK};
use crate::estimate::{activations, memory, params};
use crate::report::{exporter, Report, RunInfo};

/// Default batch when neither the command line nor the config's [run] table gives one.
pub const DEFAULT_BATCH: usize = 4;
/// Default sequence length (capped at the model's block size).
pub const DEFAULT_SEQ: usize = 64;
/// The seed's bound for the 12·d² rule.
pub const DEFAULT_TOLERANCE: f64 = 0.01;

pub fn run(cli: Cli) -> Result<u8> {
    match cli.command {
        Command::Estimate(a) => estimate(a),
        Command::Verify(a) => crate::verify_cmd::verify(a),
        Command::Presets(a) => list_presets(a),
        Command::Sweep(a) => crate::sweep::sweep(a),
        Command::BenchMatmul => crate::sweep::bench_matmul(),
        Command::Inspect(a) => crate::inspect::run(a),
        Command::Scaling(a) => crate::plan_cmd::scaling(a),
        Command::Gpus(a) => crate::plan_cmd::gpus(a),
        Command::Infer(a) => crate::cmd::infer::run(a),
    }
}

pub fn load_config(args: &ConfigArgs) -> Result<ModelConfig> {
    match (&args.config, &args.preset) {
        (Some(path), _) => config::load(ConfigSource::Path(path)),
        (None, Some(name)) => config::load(ConfigSource::Preset(name)),
        (None, None) => config::load(ConfigSource::Preset(presets::DEFAULT_PRESET)),
    }
}

/// batch, seq, dtype after command line > config [run] > defaults, validated against the model.
pub fn resolve_step(cfg: &ModelConfig, step: &StepArgs) -> Result<activations::Step> {
    let batch = step.batch.or(cfg.run.batch).unwrap_or(DEFAULT_BATCH);
    config::check_run_size("command line", "--batch", batch)?;
    let seq = match step.seq.or(cfg.run.seq) {
        Some(t) => {
            cfg.check_seq(t)?;
            t
        }
        None => DEFAULT_SEQ.min(cfg.block_size),
    };
    let dtype = match step.dtype.as_deref().or(cfg.run.dtype.as_deref()) {
        Some(d) => TrainDtype::parse(d)?,
        None => TrainDtype::F32,
    };
    Ok(activations::Step { batch, seq, dtype })
}

/// The estimate part every report starts from.
pub fn base_report(
    command: &'static str,
    cfg: &ModelConfig,
    step: activations::Step,
) -> Result<Report> {
    let p = params::estimate(cfg)?;
    let flops = crate::estimate::flops::estimate(cfg, &p, step.seq, false)?;
    // What the step adds at its peak beyond weights and gradients: kept activations, the
    // gradients in flight and the largest op's transients (the per-op replay).
    let am = activations::model(cfg, p.total, step);
    let act = (am.peak_bytes != u64::MAX).then(|| {
        crate::units::Bytes(
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
    })
}

fn estimate(a: EstimateArgs) -> Result<u8> {
    let cfg = match &a.model {
        Some(p) => config::load(ConfigSource::Path(p))?,
        None => load_config(&a.config)?,
    };
    let step = resolve_step(&cfg, &a.step)?;
    let report = base_report("estimate", &cfg, step)?;
    print!("{}", exporter(a.format).render(&report));
    Ok(EXIT_OK)
}

fn list_presets(a: PresetsArgs) -> Result<u8> {
    let mut rows = Vec::new();
    for (name, file, text) in presets::PRESETS {
        let cfg = presets::load(name)?;
        let p = params::estimate(&cfg)?;
        rows.push((name, file, p.total, presets::description(text)));
    }
    match a.format {
        Format::Json => {
            let v: Vec<_> = rows
                .iter()
                .map(|(n, f, t, d)| {
                    serde_json::json!({"name": n, "file": format!("configs/{f}"), "params": t, "description": d})
                })
                .collect();
            println!(
                "{}",
                serde_json::to_string_pretty(&v).map_err(|e| Error::Internal(e.into()))?
            );
        }
        Format::Table | Format::Markdown => {
            let sec = crate::report::sections::Section {
                title: "Built-in presets (use --preset NAME)".into(),
                header: vec!["name".into(), "params".into(), "description".into()],
                rows: rows
                    .iter()
                    .map(|(n, _, t, d)| vec![n.to_string(), crate::units::group(*t), d.to_string()])
                    .collect(),
                notes: vec![],
            };
            let out = if a.format == Format::Table {
                crate::report::table::render_sections(&[sec])
            } else {
                crate::report::markdown::render_sections(&[sec])
            };
            print!("{out}");
        }
    }
    Ok(EXIT_OK)
}

/// Exit code for a finished run with checks.
pub fn verdict(pass: bool) -> u8 {
    if pass {
        EXIT_OK
    } else {
        EXIT_CHECK_FAILED
    }
}
