//! `truesize scaling` and `truesize gpus`: planning from the estimate (no tensors).

use crate::cli::{Format, GpusArgs, ScalingArgs};
use crate::cmd::{base_report, load_config, resolve_step};
use crate::dtype::TrainDtype;
use crate::error::{Error, Result, EXIT_OK};
use crate::estimate::gpus::{self, FitInputs, GpuReport, DEFAULT_ASSUMED_MFU};
use crate::estimate::scaling::{
    self, BudgetPlan, Law, ModelPlan, Plan, CHINCHILLA, TOKENS_PER_PARAM,
};
use crate::report::sections::Section;
use crate::units::group;
use serde::Serialize;

/// Largest accepted `--flops` (10^35: far beyond any conceivable training run) and `--tokens`.
const MAX_BUDGET: f64 = 1e35;

fn s(x: impl ToString) -> String {
    x.to_string()
}

fn print(format: Format, json: &impl Serialize, secs: &[Section]) -> Result<()> {
    let text = match format {
        Format::Json => {
            serde_json::to_string_pretty(json).map_err(|e| Error::Internal(e.into()))? + "\n"
        }
        Format::Table => crate::report::table::render_sections(secs),
        Format::Markdown => crate::report::markdown::render_sections(secs),
    };
    print!("{text}");
    Ok(())
}

fn positive(field: &str, v: f64, max: f64) -> Result<f64> {
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

fn plan_row(what: &str, p: &Plan) -> Vec<String> {
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

pub fn scaling(a: ScalingArgs) -> Result<u8> {
    let has_model = a.config.config.is_some() || a.config.preset.is_some();
    if a.flops.is_none() && !has_model {
        return Err(Error::Usage(
            "scaling needs --flops C (a training budget) and/or --config PATH / --preset NAME (a model)".into(),
        ));
    }
    let law = CHINCHILLA;
    let budget = match a.flops {
        Some(c) => Some(scaling::for_budget(
            &law,
            positive("--flops", c, MAX_BUDGET)?,
        )),
        None => None,
    };
    let model = if has_model {
        let cfg = load_config(&a.config)?;
        let p = crate::estimate::params::estimate(&cfg)?;
        Some(ModelReport {
            name: cfg.name.clone(),
            params: p.total,
            plan: scaling::for_model(&law, p.total as f64),
        })
    } else {
        None
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
    print(a.format, &r, &secs)?;
    Ok(EXIT_OK)
}

pub fn gpus(a: GpusArgs) -> Result<u8> {
    let cfg = load_config(&a.config)?;
    let mut step_args = a.step;
    let dtype_default = step_args.dtype.is_none() && cfg.run.dtype.is_none();
    if dtype_default {
        step_args.dtype = Some(TrainDtype::Bf16.name().to_string());
    }
    let step = resolve_step(&cfg, &step_args)?;
    let report = base_report("gpus", &cfg, step)?;
    let flops = report
        .flops
        .as_ref()
        .ok_or_else(|| Error::Internal(anyhow::anyhow!("no FLOPs estimate")))?;
    let params = report.params.total;
    let (tokens, tokens_source) = match a.tokens {
        Some(d) => (positive("--tokens", d, MAX_BUDGET)?, "given: --tokens".to_string()),
        None => (
            TOKENS_PER_PARAM * params as f64,
            format!("{TOKENS_PER_PARAM} tokens per parameter (Chinchilla rule of thumb; set --tokens D)"),
        ),
    };
    if a.gpus == 0 || a.gpus > 1 << 24 {
        return Err(Error::field(
            "command line",
            "--gpus",
            a.gpus,
            "must be between 1 and 2^24",
        ));
    }
    let (mfu, mfu_source) = match a.mfu {
        Some(m) if m.is_finite() && m > 0.0 && m <= 1.0 => (m, "assumed: --mfu".to_string()),
        Some(m) => return Err(Error::field("command line", "--mfu", m, "must be in (0, 1]")),
        None => (
            DEFAULT_ASSUMED_MFU,
            format!("assumed default {DEFAULT_ASSUMED_MFU} (set --mfu X; `verify --measure-peak` measures one)"),
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
        gpus: a.gpus,
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
        gpus: a.gpus,
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
    print(a.format, &r, &secs)?;
    Ok(EXIT_OK)
}
