//! `truesize estimate`: counts, bytes, training memory and FLOPs from a config alone.

use super::common::{base_report, load_config, resolve_step};
use crate::cli::EstimateArgs;
use crate::config::{ModelConfig, Step};
use crate::error::{Result, EXIT_OK};
use crate::report::{emit, Format, View};

/// Every input, validated.
pub struct Plan {
    pub cfg: ModelConfig,
    pub step: Step,
    pub format: Format,
}

impl Plan {
    pub fn from_args(a: EstimateArgs) -> Result<Plan> {
        let cfg = match &a.model {
            Some(p) => super::common::config_at(p)?,
            None => load_config(&a.config)?,
        };
        let step = resolve_step(&cfg, &a.step)?;
        Ok(Plan {
            cfg,
            step,
            format: a.format,
        })
    }
}

pub fn run(a: EstimateArgs) -> Result<u8> {
    let plan = Plan::from_args(a)?;
    let report = base_report("estimate", &plan.cfg, plan.step)?;
    emit(plan.format, &report, View::Full)?;
    Ok(EXIT_OK)
}
