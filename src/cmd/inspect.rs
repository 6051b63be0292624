//! `truesize inspect PATH [--config PATH]`: a checkpoint's headers (never its data), counted
//! per component and checked against the model family's tensor list.

use super::common::verdict;
use crate::check::all_pass;
use crate::checkpoint::{self, Checkpoint};
use crate::cli::InspectArgs;
use crate::config::ModelConfig;
use crate::error::Result;
use crate::measure::census::{Census, TensorRow};
use crate::report::inspect::InspectReport;
use crate::report::{emit, Format, View};
use std::path::{Path, PathBuf};

/// Every input, validated.
pub struct Plan {
    pub path: PathBuf,
    pub checkpoint: Checkpoint,
    pub cfg: Option<ModelConfig>,
    pub format: Format,
}

impl Plan {
    pub fn from_args(a: InspectArgs) -> Result<Plan> {
        Plan::new(a.path, a.config.as_deref(), a.format)
    }

    /// `config`: the config to compare with (default: the folder's `config.json`, if any).
    pub fn new(path: PathBuf, config: Option<&Path>, format: Format) -> Result<Plan> {
        let checkpoint = Checkpoint::open(&path)?;
        let cfg = match config.or(checkpoint.folder_config.as_deref()) {
            Some(p) => Some(super::common::config_at(p)?),
            None => None,
        };
        Ok(Plan {
            path,
            checkpoint,
            cfg,
            format,
        })
    }
}

pub fn run(a: InspectArgs) -> Result<u8> {
    if checkpoint::gguf::has_magic(&a.path) {
        if let Some(c) = &a.config {
            return Err(crate::error::Error::field(
                "command line",
                "--config",
                c.display(),
                "a GGUF file carries its own config in its metadata",
            ));
        }
        let r = checkpoint::gguf_inspect::inspect(&a.path)?;
        emit(a.format, &r, View::Full)?;
        return Ok(verdict(r.pass));
    }
    let plan = Plan::from_args(a)?;
    let r = report(&plan)?;
    emit(plan.format, &r, View::Full)?;
    Ok(verdict(r.pass))
}

/// Inspect the checkpoint of `plan`.
pub fn report(plan: &Plan) -> Result<InspectReport> {
    let ckpt = &plan.checkpoint;
    let f = checkpoint::check(ckpt, plan.cfg.as_ref())?;
    let rows: Vec<TensorRow> = f
        .params
        .iter()
        .map(|t| TensorRow {
            name: t.name.clone(),
            shape: t.shape.clone(),
            dtype: t.dtype.to_ascii_lowercase(),
            numel: t.numel,
            component: t.component,
        })
        .collect();
    let mut census = Census::from_rows(rows, None, false);
    // Census::from_rows sizes elements by candle's dtypes; the header's sizes are exact for all.
    census.bytes = f.params.iter().map(|t| t.bytes).sum();
    let file_bytes = ckpt.file_bytes();
    let overhead_bytes = ckpt.overhead_bytes();
    let pass = all_pass(&f.checks);
    Ok(InspectReport {
        command: "inspect",
        path: plan.path.display().to_string(),
        config: plan.cfg.as_ref().map(|c| c.name.clone()),
        files: ckpt.headers.clone(),
        file_bytes,
        header_bytes: ckpt.header_bytes(),
        data_bytes: ckpt.data_bytes(),
        overhead_bytes,
        overhead_fraction: overhead_bytes as f64 / file_bytes.max(1) as f64,
        census,
        file_tensors: f.file_tensors,
        file_numel: f.file_numel,
        buffers: f.buffers,
        buffers_numel: f.buffers_numel,
        duplicate_tied_head: f.duplicate_tied_head,
        missing: f.missing,
        unexpected: f.unexpected,
        misshaped: f.misshaped,
        duplicated: f.duplicated,
        expected_params: f.expected_params,
        checks: f.checks,
        pass,
        notes: f.notes,
    })
}
