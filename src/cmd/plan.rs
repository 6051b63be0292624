//! `truesize plan`: per-rank memory of a TP × PP × DP layout as an engine lays it out, or the
//! layouts of `--gpus N` that fit a GPU's memory (no tensors).

use super::common::{find_gpu, load_config};
use crate::cli::PlanArgs;
use crate::config::{check_run_size, ModelConfig, DEFAULT_SEQ};
use crate::dtype::TrainDtype;
use crate::error::{Error, Result, EXIT_CHECK_FAILED, EXIT_OK};
use crate::estimate::serve::fit::parse_size;
use crate::plan::{search, Engine, PlanInputs, ShardPlan, MAX_WORLD};
use crate::report::plan::PlanReport;
use crate::report::{emit, Format, View};

/// The search's budget: bytes per GPU and where they came from.
pub struct Budget {
    pub gpus: usize,
    pub memory_bytes: u64,
    pub source: String,
}

/// Every input, validated.
pub struct Plan {
    pub cfg: ModelConfig,
    pub inputs: PlanInputs,
    pub budget: Option<Budget>,
    pub notes: Vec<String>,
    pub format: Format,
}

fn cli(field: &str, value: impl std::fmt::Display, why: impl Into<String>) -> Error {
    Error::field("command line", field, value, why)
}

fn pp_layers(s: &str) -> Result<Vec<usize>> {
    s.split(',')
        .map(|x| {
            x.trim().parse::<usize>().map_err(|_| {
                cli(
                    "--pp-layers",
                    format!("{s:?}"),
                    "expected layer counts such as 8,8,8,8",
                )
            })
        })
        .collect()
}

impl Plan {
    pub fn from_args(a: PlanArgs) -> Result<Plan> {
        let cfg = load_config(&a.config)?;
        let mut notes = Vec::new();
        let engine = match (&a.engine, a.fsdp) {
            (Some(e), fsdp) => {
                let e = Engine::parse(e)?;
                if fsdp && e != Engine::Fsdp2 {
                    return Err(cli(
                        "--engine",
                        e.name(),
                        "conflicts with --fsdp (FSDP is the fsdp2 engine)",
                    ));
                }
                e
            }
            (None, true) => Engine::Fsdp2,
            (None, false) => Engine::Megatron,
        };
        let dtype = match a.dtype.as_deref() {
            Some(d) => TrainDtype::parse(d)
                .map_err(|_| cli("--dtype", format!("{d:?}"), "expected f32, f16 or bf16"))?,
            None => {
                notes.push("dtype: bf16 by default (set --dtype)".to_string());
                TrainDtype::Bf16
            }
        };
        let microbatch = a.microbatch.unwrap_or(1);
        check_run_size("command line", "--microbatch", microbatch)?;
        let grad_accum = a.grad_accum.unwrap_or(1);
        check_run_size("command line", "--grad-accum", grad_accum)?;
        let seq = match a.seq.or(cfg.run.seq) {
            Some(t) => {
                cfg.check_seq(t).map_err(|_| {
                    cli(
                        "--seq",
                        t,
                        format!("must be between 1 and block_size = {}", cfg.block_size),
                    )
                })?;
                t
            }
            None => DEFAULT_SEQ.min(cfg.block_size),
        };
        let budget = match a.gpus {
            None => None,
            Some(n) => {
                if n == 0 || n > MAX_WORLD {
                    return Err(cli(
                        "--gpus",
                        n,
                        format!("must be between 1 and {MAX_WORLD}"),
                    ));
                }
                let (memory_bytes, source) = match (&a.memory, &a.gpu) {
                    (Some(m), _) => (parse_size("--memory", m)?, format!("--memory {m}")),
                    (None, Some(g)) => {
                        let gpu = find_gpu(g)?;
                        (gpu.memory_bytes, gpu.name.to_string())
                    }
                    (None, None) => {
                        return Err(cli(
                            "--gpus",
                            n,
                            "needs the memory of one GPU: add --gpu NAME or --memory SIZE",
                        ))
                    }
                };
                Some(Budget {
                    gpus: n,
                    memory_bytes,
                    source,
                })
            }
        };
        let pp_layers = match &a.pp_layers {
            Some(s) => pp_layers(s)?,
            None if budget.is_some() => vec![cfg.n_layer],
            None => PlanInputs::even_layers(&cfg, a.pp)?,
        };
        let inputs = PlanInputs {
            engine,
            tp: a.tp,
            pp: a.pp,
            dp: a.dp,
            zero: a.zero,
            pp_layers,
            microbatch,
            grad_accum,
            seq,
            dtype,
        };
        match &budget {
            // The search tries layouts itself; only the engine's ZeRO stage is checked here.
            Some(_) => engine.check_zero(a.zero)?,
            None => crate::plan::validate(&cfg, &inputs)?,
        }
        Ok(Plan {
            cfg,
            inputs,
            budget,
            notes,
            format: a.format,
        })
    }
}

pub fn run(a: PlanArgs) -> Result<u8> {
    let Plan {
        cfg,
        inputs,
        budget,
        notes,
        format,
    } = Plan::from_args(a)?;
    let params_total = crate::estimate::params::estimate(&cfg)?.total;
    let (plan, search) = match budget {
        None => (Some(ShardPlan::new(&cfg, &inputs)?), None),
        Some(b) => (
            None,
            Some(search::search(
                &cfg,
                &inputs,
                b.gpus,
                b.memory_bytes,
                b.source,
            )),
        ),
    };
    // A search where no layout fits is a refusal for resources.
    let code = match &search {
        Some(s) if !s.layouts.iter().any(|l| l.fits) => EXIT_CHECK_FAILED,
        _ => EXIT_OK,
    };
    let r = PlanReport {
        model: cfg.name.clone(),
        params_total,
        plan,
        search,
        notes,
    };
    emit(format, &r, View::Full)?;
    Ok(code)
}
