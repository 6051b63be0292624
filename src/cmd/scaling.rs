//! `truesize scaling`: Chinchilla's compute-optimal parameters and tokens for a FLOP budget
//! and/or a model (no tensors).

use super::common::{load_config, positive, MAX_BUDGET};
use crate::cli::ScalingArgs;
use crate::config::ModelConfig;
use crate::error::{Error, Result, EXIT_OK};
use crate::estimate::scaling::{self, CHINCHILLA};
use crate::report::scaling::{ModelReport, ScalingReport};
use crate::report::{emit, Format, View};

/// Every input, validated.
pub struct Plan {
    /// `--flops`, checked.
    pub budget_flops: Option<f64>,
    /// The model, when one was named.
    pub cfg: Option<ModelConfig>,
    pub format: Format,
}

impl Plan {
    pub fn from_args(a: ScalingArgs) -> Result<Plan> {
        let has_model = a.config.config.is_some() || a.config.preset.is_some();
        if a.flops.is_none() && !has_model {
            return Err(Error::Usage(
                "scaling needs --flops C (a training budget) and/or --config PATH / --preset NAME (a model)".into(),
            ));
        }
        let budget_flops = a
            .flops
            .map(|c| positive("--flops", c, MAX_BUDGET))
            .transpose()?;
        let cfg = if has_model {
            Some(load_config(&a.config)?)
        } else {
            None
        };
        Ok(Plan {
            budget_flops,
            cfg,
            format: a.format,
        })
    }
}

pub fn run(a: ScalingArgs) -> Result<u8> {
    let plan = Plan::from_args(a)?;
    let law = CHINCHILLA;
    let budget = plan.budget_flops.map(|c| scaling::for_budget(&law, c));
    let model = match &plan.cfg {
        Some(cfg) => {
            let p = crate::estimate::params::estimate(cfg)?;
            Some(ModelReport {
                name: cfg.name.clone(),
                params: p.total,
                plan: scaling::for_model(&law, p.total as f64),
            })
        }
        None => None,
    };
    let r = ScalingReport {
        command: "scaling",
        law,
        g: law.g(),
        exp_n: law.exp_n(),
        exp_d: law.exp_d(),
        budget,
        model,
    };
    emit(plan.format, &r, View::Full)?;
    Ok(EXIT_OK)
}
