//! `truesize scaling`: Chinchilla's compute-optimal parameters and tokens for a FLOP budget
//! and/or a model (no tensors).

use super::common::{load_config, positive, print, MAX_BUDGET};
use crate::cli::{Format, ScalingArgs};
use crate::config::ModelConfig;
use crate::error::{Error, Result, EXIT_OK};
use crate::estimate::scaling::{
    self, BudgetPlan, Law, ModelPlan, Plan as Optimum, CHINCHILLA, TOKENS_PER_PARAM,
};
use crate::report::sections::Section;
use crate::units::group;
use serde::Serialize;

fn s(x: impl ToString) -> String {
    x.to_string()
}

#[derive(Debug, Serialize)]
pub struct ScalingReport {
    pub command: &'static str,
    pub law: Law,
    /// `N_opt = G·(C/6)^a`, `D_opt = G⁻¹·(C/6)^b`.
    pub g: f64,
    pub exp_n: f64,
    pub exp_d: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub budget: Option<BudgetPlan>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<ModelReport>,
}

#[derive(Debug, Serialize)]
pub struct ModelReport {
    pub name: String,
    /// Exact parameter count (N).
    pub params: u64,
    #[serde(flatten)]
    pub plan: ModelPlan,
}

fn plan_row(what: &str, p: &Optimum) -> Vec<String> {
    vec![
        s(what),
        format!("{:.4e}", p.params),
        format!("{:.4e}", p.tokens),
        format!("{:.1}", p.tokens_per_param),
        format!("{:.4e}", p.flops),
        format!("{:.4}", p.loss),
    ]
}

fn plan_header() -> Vec<String> {
    [
        "plan",
        "params N",
        "tokens D",
        "D / N",
        "FLOPs 6ND",
        "loss L(N, D)",
    ]
    .map(s)
    .to_vec()
}

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
    let mut secs = Vec::new();
    let law_note = format!(
        "Hoffmann et al. 2022, approach 3: L(N, D) = {} + {}/N^{} + {}/D^{}; C ≈ 6·N·D; \
         N_opt = {:.4}·(C/6)^{:.4}, D_opt = (C/6)^{:.4} / {:.4}",
        law.e, law.a, law.alpha, law.b, law.beta, r.g, r.exp_n, r.exp_d, r.g
    );
    if let Some(b) = &r.budget {
        secs.push(Section {
            title: format!("Compute-optimal for a budget of {:.4e} FLOPs", b.flops),
            header: plan_header(),
            rows: vec![
                plan_row("Chinchilla fit (approach 3)", &b.chinchilla),
                plan_row(
                    &format!("{TOKENS_PER_PARAM} tokens per parameter"),
                    &b.rule_20,
                ),
            ],
            notes: vec![law_note.clone()],
        });
    }
    if let Some(m) = &r.model {
        secs.push(Section {
            title: format!(
                "Compute-optimal data for {} ({} parameters)",
                m.name,
                group(m.params)
            ),
            header: plan_header(),
            rows: vec![
                plan_row(
                    "Chinchilla fit: tokens that make N optimal",
                    &m.plan.chinchilla,
                ),
                plan_row(
                    &format!("{TOKENS_PER_PARAM} tokens per parameter"),
                    &m.plan.rule_20,
                ),
            ],
            notes: vec![
                law_note,
                "N is the exact total parameter count (Chinchilla counts embeddings); for a \
                 mixture of experts the dense law is only indicative"
                    .into(),
            ],
        });
    }
    print(plan.format, &r, &secs)?;
    Ok(EXIT_OK)
}
