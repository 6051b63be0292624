//! `truesize sweep`: one measured training step per (batch, seq) over one model, beside our
//! prediction and the rules of thumb; writes sweep.csv, sweep.json and sweep.svg.

use super::common::{load_config, resolve_engine, Engine};
use crate::cli::SweepArgs;
use crate::config::{self, ModelConfig, Step};
use crate::dtype::TrainDtype;
use crate::error::{Error, Result, EXIT_OK};
use crate::estimate::{params, rules};
use crate::measure::extrapolate::{probe_for, random_tokens};
use crate::measure::{run, sysmem};
use crate::model::build;
use crate::report::sweep::{SweepPoint, SweepReport};
use crate::report::{csv, svg};
use crate::report::{emit, render, Format, View};
use crate::units::Bytes;
use candle_core::Device;
use indicatif::{ProgressBar, ProgressStyle};
use std::path::{Path, PathBuf};

/// Most grid points one sweep runs (each is a full training step).
pub const MAX_POINTS: usize = 1024;
/// The shortest sequence a next-token loss can use (one prediction needs two positions).
pub const MIN_SEQ: usize = 2;

/// `"1,2, 4"` -> `[1, 2, 4]`: positive integers, duplicates dropped, order kept.
pub fn parse_list(flag: &str, text: &str) -> Result<Vec<usize>> {
    let mut out = Vec::new();
    for item in text.split(',') {
        let item = item.trim();
        let v: usize = item.parse().map_err(|_| {
            Error::field(
                "command line",
                flag,
                format!("{item:?}"),
                "expected a comma-separated list of positive integers, e.g. 1,2,4,8",
            )
        })?;
        if !out.contains(&v) {
            out.push(v);
        }
    }
    Ok(out)
}

/// Every input, validated.
pub struct Plan {
    pub cfg: ModelConfig,
    pub batches: Vec<usize>,
    pub seqs: Vec<usize>,
    pub dtype: TrainDtype,
    /// Exists and takes new files.
    pub out: PathBuf,
    pub seed: u64,
    pub max_memory: Option<u64>,
    pub engine: Engine,
    /// Why the lean engine was not used, when it was not.
    pub engine_note: Option<String>,
    pub format: Format,
}

impl Plan {
    pub fn from_args(a: SweepArgs) -> Result<Plan> {
        let cfg = load_config(&a.config)?;
        let (batches, seqs, dtype) = resolve(&a, &cfg)?;
        // The engine is chosen for the first point's step; its switches do not depend on the size.
        let first = Step {
            batch: batches.first().copied().unwrap_or(1),
            seq: seqs.first().copied().unwrap_or(MIN_SEQ),
            dtype,
        };
        let (engine, engine_note) = resolve_engine(&cfg, first, &a.engine, None)?;
        prepare_out_dir(&a.out)?;
        Ok(Plan {
            engine,
            engine_note,
            cfg,
            batches,
            seqs,
            dtype,
            out: a.out,
            seed: a.seed,
            max_memory: a.max_memory,
            format: a.format,
        })
    }
}

fn resolve(a: &SweepArgs, cfg: &ModelConfig) -> Result<(Vec<usize>, Vec<usize>, TrainDtype)> {
    let batches = parse_list("--batch", &a.batch)?;
    for &b in &batches {
        config::check_run_size("command line", "--batch", b)?;
    }
    let seqs = parse_list("--seq", &a.seq)?;
    for &t in &seqs {
        cfg.check_seq(t)?;
        if t < MIN_SEQ {
            return Err(Error::field(
                "command line",
                "--seq",
                t,
                format!("must be at least {MIN_SEQ}: the next-token loss needs two positions"),
            ));
        }
    }
    if batches.len() * seqs.len() > MAX_POINTS {
        return Err(Error::field(
            "command line",
            "--batch × --seq",
            batches.len() * seqs.len(),
            format!("at most {MAX_POINTS} grid points"),
        ));
    }
    let dtype = match a.dtype.as_deref().or(cfg.run.dtype.as_deref()) {
        Some(d) => TrainDtype::parse(d)?,
        None => TrainDtype::F32,
    };
    Ok((batches, seqs, dtype))
}

/// The output folder exists (created if missing) and accepts a new file: checked before any
/// step runs, so a bad `--out` costs nothing.
fn prepare_out_dir(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir)
        .map_err(|e| Error::file(dir, format!("cannot create the output folder: {e}")))?;
    let probe = dir.join(format!(".truesize-write-test-{}", std::process::id()));
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&probe)
        .map_err(|e| Error::file(dir, format!("cannot write in the output folder: {e}")))?;
    std::fs::remove_file(&probe)
        .map_err(|e| Error::file(&probe, format!("cannot remove a probe file: {e}")))?;
    Ok(())
}

pub fn run(a: SweepArgs) -> Result<u8> {
    let Plan {
        cfg,
        batches,
        seqs,
        dtype,
        out,
        seed,
        max_memory,
        engine,
        engine_note,
        format,
    } = Plan::from_args(a)?;
    let p = params::estimate(&cfg)?;
    let grid: Vec<Step> = batches
        .iter()
        .flat_map(|&batch| seqs.iter().map(move |&seq| Step { batch, seq, dtype }))
        .collect();

    // The engine's prediction, once per point; the preflight refuses on the largest before
    // allocating anything.
    let predicted: Vec<u64> = grid
        .iter()
        .map(|&s| engine.predict(&cfg, p.total, s).peak_bytes)
        .collect();
    let worst = predicted.iter().copied().max().unwrap_or(0);
    if let Some(limit) = max_memory.or_else(sysmem::available_bytes) {
        if worst > limit {
            return Err(Error::Refused(format!(
                "the largest point of this sweep needs about {} but only {} is available; \
                 use smaller --batch/--seq values or --max-memory BYTES",
                Bytes(worst),
                Bytes(limit)
            )));
        }
    }

    let device = Device::Cpu;
    let probe = probe_for(&device)?;
    probe.reset_peak()?;
    let baseline = probe.current()?;
    // The model is built once; each point runs one step on it.
    let (varmap, model) = build::random(
        &cfg,
        engine.weights_dtype(Step {
            batch: 1,
            seq: MIN_SEQ,
            dtype,
        }),
        &device,
        seed,
    )?;
    let built = engine.prepare(&cfg, varmap, model)?;
    let after_build = probe.current()?;

    let bar = ProgressBar::new(grid.len() as u64);
    bar.set_style(
        ProgressStyle::with_template("{spinner} sweep [{bar:30}] {pos}/{len} {msg} ({elapsed})")
            .map_err(|e| Error::Internal(anyhow::anyhow!("progress bar template: {e}")))?
            .progress_chars("=> "),
    );
    let mut points = Vec::with_capacity(grid.len());
    for (step, &predicted) in grid.iter().zip(&predicted) {
        bar.set_message(format!("batch {} × seq {}", step.batch, step.seq));
        let ids = random_tokens(cfg.vocab_size, step.batch, step.seq, seed, &device)?;
        let r = engine.run_step(&built, &ids, probe.as_ref(), baseline, after_build, 1, None)?;
        let measured = r.memory.peak_bytes;
        let mut rs = rules::predict(&cfg, p.total, *step, false, predicted);
        rules::score(&mut rs, measured);
        points.push(SweepPoint {
            batch: step.batch,
            seq: step.seq,
            tokens: step.batch * step.seq,
            measured_peak_bytes: measured,
            predicted_peak_bytes: predicted,
            predicted_rel_error: crate::units::rel_error(predicted as f64, measured as f64),
            forward_s: run::median(&r.forward_s),
            backward_s: run::median(&r.backward_s),
            rules: rs,
        });
        bar.inc(1);
    }
    bar.finish_and_clear();

    let report = SweepReport {
        command: "sweep",
        model: cfg.name.clone(),
        arch: cfg.arch.name(),
        params: p.total,
        dtype,
        device: "cpu".into(),
        weights_bytes: after_build.saturating_sub(baseline),
        batches,
        seqs,
        points,
        notes: std::iter::once(format!(
            "peaks are bytes above the pre-build baseline, read by the counting allocator; the \
             model is built once and each point runs one forward + backward (no optimizer) with \
             the {} engine",
            engine.label()
        ))
        .chain(engine_note)
        .collect(),
    };
    write_outputs(&out, &report)?;
    emit(format, &report, View::Full)?;
    eprintln!(
        "wrote {0}/sweep.csv, {0}/sweep.json, {0}/sweep.svg",
        out.display()
    );
    Ok(EXIT_OK)
}

fn write_outputs(dir: &Path, r: &SweepReport) -> Result<()> {
    std::fs::create_dir_all(dir)
        .map_err(|e| Error::file(dir, format!("cannot create the output folder: {e}")))?;
    // Never through a link planted in the folder: a fresh file renamed into place.
    let write = |name: &str, text: &str| {
        crate::files::write_replacing(dir, name, text.as_bytes()).map(drop)
    };
    write("sweep.csv", &csv::render_sweep(r))?;
    write("sweep.json", &render(Format::Json, r, View::Full)?)?;
    write("sweep.svg", &svg::render_sweep(r)?)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_parse_trim_and_dedupe() {
        assert_eq!(parse_list("--batch", "1, 2,4,2").unwrap(), vec![1, 2, 4]);
    }

    #[test]
    fn bad_lists_name_the_flag_and_item() {
        for bad in ["", "1,,2", "a", "-1", "1.5"] {
            let e = parse_list("--seq", bad).unwrap_err().to_string();
            assert!(e.contains("--seq"), "{e}");
        }
    }
}
