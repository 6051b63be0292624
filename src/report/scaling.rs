//! What `truesize scaling` found: Chinchilla's compute-optimal plans, and its tables.

use super::render::{Render, View};
use super::section::{s, Section};
use crate::estimate::scaling::{BudgetPlan, Law, ModelPlan, Plan as Optimum, TOKENS_PER_PARAM};
use crate::units::group;
use serde::Serialize;

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

impl Render for ScalingReport {
    fn sections(&self, _view: View) -> Vec<Section> {
        let (r, law) = (self, &self.law);
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
        secs
    }
}
