//! `truesize estimate`: counts, bytes, training memory and FLOPs from a config alone.

use super::common::{base_report, load_config, resolve_engine, resolve_step, Engine};
use crate::cli::EstimateArgs;
use crate::config::{ModelConfig, Step};
use crate::error::{Result, EXIT_OK};
use crate::report::{emit, Format, View};

/// Every input, validated.
pub struct Plan {
    pub cfg: ModelConfig,
    pub step: Step,
    pub engine: Engine,
    /// Why the lean engine was not used, when it was not.
    pub engine_note: Option<String>,
    pub format: Format,
}

impl Plan {
    pub fn from_args(a: EstimateArgs) -> Result<Plan> {
        let cfg = match &a.model {
            Some(p) => super::common::config_at(p)?,
            None => load_config(&a.config)?,
        };
        let step = resolve_step(&cfg, &a.step)?;
        let (engine, engine_note) = resolve_engine(&cfg, step, &a.engine, None)?;
        Ok(Plan {
            cfg,
            step,
            engine,
            engine_note,
            format: a.format,
        })
    }
}

pub fn run(a: EstimateArgs) -> Result<u8> {
    let plan = Plan::from_args(a)?;
    let mut report = base_report("estimate", &plan.cfg, plan.step, &plan.engine)?;
    report.notes.extend(plan.engine_note);
    emit(plan.format, &report, View::Full)?;
    Ok(EXIT_OK)
}
