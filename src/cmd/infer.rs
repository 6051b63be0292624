//! `truesize infer`: serving memory estimated (weights in any format, KV cache, prefill and
//! decode peaks, fit questions), then proved on a genuine greedy generation run.
//!
//! Every flag is validated into a [`Plan`] before anything is loaded; the run is refused
//! before allocating if its predicted peak does not fit (exit 1, like `verify`).

use super::common::find_gpu;
use super::common::{load_config, verdict};
use crate::check::{all_pass, Check};
use crate::checkpoint::gguf::{self, GgufHeader};
use crate::cli::InferArgs;
use crate::config::{self, ModelConfig};
use crate::dtype::TrainDtype;
use crate::error::{Error, Result};
use crate::estimate::serve::fit::{self, FitModel};
use crate::estimate::serve::formats::{self, WeightFormat};
use crate::estimate::serve::kv;
use crate::estimate::serve::peaks::{self, PeakPrediction, RepackLevel, Scenario};
use crate::estimate::serve::weights::{self, ServeTensor, TypeCount, WeightsEstimate};
use crate::infer::load::Source;
use crate::infer::run::{self, RunPlan};
use crate::measure::device::DeviceSpec;
use crate::measure::sysmem;
use crate::report::infer::{GgufSummary, InferBlock, InferReport, RunInfo};
use crate::report::{emit, View};
use crate::units::Bytes;
use rand::{Rng, SeedableRng};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Default prompt length (random ids) and tokens generated.
pub const DEFAULT_PROMPT: usize = 32;
pub const DEFAULT_GENERATE: usize = 16;
/// Largest `--generate` and prompt accepted (positions are further capped by the model).
pub const MAX_TOKENS: usize = 1 << 24;
/// Predicted peaks gate at 5%, as verify's training peak does.
pub const PEAK_TOLERANCE: f64 = 0.05;
/// Allocated weight and cache bytes exceed their storage by per-tensor bookkeeping; 512 B per
/// tensor bounds it (verify's allowance).
pub const BOOKKEEPING_BYTES_PER_TENSOR: u64 = 512;
/// Incremental decode vs a full forward: max relative logit error allowed in f32 (the issue's
/// bound), and for half-precision activations (their rounding: f16 ε = 2^-10, bf16 ε = 2^-7,
/// times 8 for accumulated ops in a different order).
pub const FULL_FORWARD_TOLERANCE_F32: f64 = 1e-4;
pub const FULL_FORWARD_TOLERANCE_F16: f64 = 8.0 / 1024.0;
pub const FULL_FORWARD_TOLERANCE_BF16: f64 = 8.0 / 128.0;
/// The full-forward check is skipped when it would hold more than this (stored logits plus
/// its own forward): it is a numerical check, not worth gigabytes.
pub const MAX_CHECK_BYTES: u64 = 2 << 30;

/// A greedy-generation reference made by HF transformers (scripts/make_greedy_refs.py).
#[derive(Debug, Clone, Deserialize)]
pub struct GreedyRef {
    pub prompt_ids: Vec<u32>,
    pub generated_ids: Vec<u32>,
    #[serde(default)]
    pub transformers: Option<String>,
    #[serde(skip)]
    pub path: PathBuf,
}

enum SourceSpec {
    Random { seed: u64 },
    Hf(PathBuf),
    Gguf(PathBuf),
}

/// Everything a run needs, validated.
struct Plan {
    cfg: ModelConfig,
    source: SourceSpec,
    gguf: Option<GgufHeader>,
    format_name: String,
    weights: WeightsEstimate,
    /// The format the fit questions start from.
    fit_format: WeightFormat,
    act: TrainDtype,
    kv: TrainDtype,
    batch: usize,
    prompt: Vec<u32>,
    prompt_source: String,
    generate: usize,
    chunk: usize,
    device: DeviceSpec,
    shapes_only: bool,
    limit: Option<u64>,
    budget: Option<(u64, String)>,
    overhead: u64,
    reference: Option<GreedyRef>,
    full_forward: bool,
    head_stored: bool,
}

fn cli(field: &str, value: impl std::fmt::Display, why: impl Into<String>) -> Error {
    Error::field("command line", field, value, why)
}

fn parse_ids(s: &str) -> Result<Vec<u32>> {
    let ids: Result<Vec<u32>> = s
        .split(',')
        .map(|t| {
            t.trim().parse::<u32>().map_err(|_| {
                cli(
                    "--prompt-ids",
                    format!("{s:?}"),
                    format!(
                        "{:?} is not a token id (comma-separated non-negative integers)",
                        t.trim()
                    ),
                )
            })
        })
        .collect();
    let ids = ids?;
    if ids.is_empty() {
        return Err(cli(
            "--prompt-ids",
            format!("{s:?}"),
            "needs at least one id",
        ));
    }
    Ok(ids)
}

fn load_reference(p: &Path) -> Result<GreedyRef> {
    let path = if p.is_dir() {
        p.join("greedy.json")
    } else {
        p.to_path_buf()
    };
    let meta =
        std::fs::metadata(&path).map_err(|e| Error::file(&path, format!("cannot read: {e}")))?;
    if !meta.is_file() || meta.len() > 64 << 20 {
        return Err(Error::file(
            &path,
            "is not a greedy.json reference (a JSON file under 64 MiB)",
        ));
    }
    let text = std::fs::read_to_string(&path)
        .map_err(|e| Error::file(&path, format!("cannot read: {e}")))?;
    let mut r: GreedyRef = serde_json::from_str(&text).map_err(|e| {
        Error::file(
            &path,
            format!("not a greedy reference (needs prompt_ids and generated_ids): {e}"),
        )
    })?;
    if r.prompt_ids.is_empty() || r.generated_ids.is_empty() {
        return Err(Error::file(
            &path,
            "prompt_ids and generated_ids must not be empty",
        ));
    }
    r.path = path;
    Ok(r)
}

/// The engine's weights for a GGUF file: the file's own type for every tensor the network
/// holds (1-D tensors and GPT-2's positions converted to the f32 activations).
fn weights_from_gguf(cfg: &ModelConfig, h: &GgufHeader) -> Result<(WeightsEstimate, bool)> {
    let mut layout = weights::gguf_layout(cfg)?;
    let mut problems = Vec::new();
    for t in &mut layout {
        match h.tensor(&t.name) {
            None => problems.push(format!("{} missing", t.name)),
            Some(f) if f.shape != t.shape => problems.push(format!(
                "{}: shape {:?}, expected {:?}",
                t.name, f.shape, t.shape
            )),
            Some(f) => {
                let to_f32 = t.shape.len() == 1 || t.name == "position_embd.weight";
                let ty = if to_f32 {
                    &formats::F32
                } else {
                    formats::GGML_TYPES
                        .iter()
                        .find(|g| g.name == f.ggml_type)
                        .unwrap_or(&formats::F32)
                };
                t.ggml_type = ty.name;
                t.bytes = ty.bytes(t.numel).unwrap_or(f.bytes);
                if to_f32 && f.ggml_type != "F32" {
                    t.why = Some(format!("stored {}, held in f32", f.ggml_type));
                }
            }
        }
    }
    let head_stored = cfg.tie_embeddings && h.tensor("output.weight").is_some();
    if head_stored {
        if let Some(f) = h.tensor("output.weight") {
            layout.push(ServeTensor {
                name: f.name.clone(),
                hf_names: vec!["lm_head.weight".into()],
                shape: f.shape.clone(),
                numel: f.numel,
                layer: None,
                ggml_type: f.ggml_type,
                bytes: f.bytes,
                why: Some("the file stores the tied head as a copy".into()),
            });
        }
    }
    if !problems.is_empty() {
        return Err(Error::file(
            &h.path,
            format!(
                "does not hold the {} model its metadata describes: {}",
                cfg.model_type,
                problems.join("; ")
            ),
        ));
    }
    let mut by_type: BTreeMap<&'static str, TypeCount> = BTreeMap::new();
    for t in &layout {
        let c = by_type.entry(t.ggml_type).or_default();
        c.tensors += 1;
        c.numel += t.numel;
        c.bytes += t.bytes;
    }
    let bytes: u64 = layout.iter().map(|t| t.bytes).sum();
    let numel: u64 = layout.iter().map(|t| t.numel).sum();
    Ok((
        WeightsEstimate {
            format: "gguf",
            bytes,
            numel,
            bits_per_weight: bytes as f64 * 8.0 / numel.max(1) as f64,
            by_type,
            kept_unquantized: layout
                .iter()
                .filter(|t| matches!(t.ggml_type, "F32" | "F16" | "BF16"))
                .map(|t| t.name.clone())
                .collect(),
            tensors: layout,
            by_hf_name: Default::default(),
        }
        .indexed(),
        head_stored,
    ))
}

fn plan(a: &InferArgs) -> Result<Plan> {
    // The model and where its weights come from.
    let (cfg, source, gguf) = match &a.model {
        Some(p) if gguf::has_magic(p) => {
            let h = gguf::read_header(p)?;
            let cfg = gguf::config_from_header(&h)?;
            (cfg, SourceSpec::Gguf(p.clone()), Some(h))
        }
        Some(p) if p.is_dir() => (
            super::common::config_at(p)?,
            SourceSpec::Hf(p.clone()),
            None,
        ),
        Some(p) => {
            return Err(Error::file(
                p,
                "--model takes an HF model folder (config.json + safetensors) or a GGUF file",
            ))
        }
        None => (
            load_config(&a.config)?,
            SourceSpec::Random { seed: a.seed },
            None,
        ),
    };
    if cfg.vocab_size > u32::MAX as usize {
        return Err(Error::field(
            &cfg.name,
            "vocab_size",
            cfg.vocab_size,
            "exceeds u32 token ids",
        ));
    }
    let reference = a.reference.as_deref().map(load_reference).transpose()?;
    // Weight format and dtypes.
    let (format_name, fit_format, weights, act, head_stored) = match (&gguf, &a.weights) {
        (Some(h), Some(w)) => {
            return Err(cli(
                "--weights",
                w,
                format!(
                    "{} is a GGUF file: its tensors are used in the types it stores",
                    h.path.display()
                ),
            ))
        }
        (Some(h), None) => {
            let (w, stored) = weights_from_gguf(&cfg, h)?;
            // The fit questions start from the format closest to the file's bits per weight.
            let fit = WeightFormat::all()
                .into_iter()
                .min_by(|x, y| {
                    let bx = weights::estimate(&cfg, *x)
                        .map(|e| e.bits_per_weight)
                        .unwrap_or(0.0);
                    let by = weights::estimate(&cfg, *y)
                        .map(|e| e.bits_per_weight)
                        .unwrap_or(0.0);
                    (bx - w.bits_per_weight)
                        .abs()
                        .total_cmp(&(by - w.bits_per_weight).abs())
                })
                .unwrap_or(WeightFormat::Float(TrainDtype::F32));
            (
                "gguf (as stored)".to_string(),
                fit,
                w,
                TrainDtype::F32,
                stored,
            )
        }
        (None, w) => {
            let f = match w {
                Some(s) => WeightFormat::parse("--weights", s)?,
                None => WeightFormat::Float(TrainDtype::F32),
            };
            let w = weights::estimate(&cfg, f)?;
            (f.name().to_string(), f, w, f.activation_dtype(), false)
        }
    };
    let kv = match &a.kv_dtype {
        Some(d) => TrainDtype::parse(d)
            .map_err(|_| cli("--kv-dtype", format!("{d:?}"), "expected f32, f16 or bf16"))?,
        None => act,
    };
    // Shape of the run.
    let batch = a.batch.unwrap_or(1);
    config::check_run_size("command line", "--batch", batch)?;
    let generate = match (a.generate, &reference) {
        (Some(n), _) => n,
        (None, Some(r)) => r.generated_ids.len(),
        (None, None) => DEFAULT_GENERATE,
    };
    if generate == 0 || generate > MAX_TOKENS {
        return Err(cli(
            "--generate",
            generate,
            format!("must be between 1 and {MAX_TOKENS}"),
        ));
    }
    let (prompt, prompt_source) = match (&a.prompt_ids, a.prompt, &reference) {
        (Some(s), _, _) => (parse_ids(s)?, "--prompt-ids".to_string()),
        (None, None, Some(r)) => (r.prompt_ids.clone(), format!("{}", r.path.display())),
        (None, p, _) => {
            let p = p.unwrap_or(DEFAULT_PROMPT.min(cfg.block_size.saturating_sub(generate).max(1)));
            if p == 0 || p > MAX_TOKENS {
                return Err(cli(
                    "--prompt",
                    p,
                    format!("must be between 1 and {MAX_TOKENS}"),
                ));
            }
            let mut rng = rand::rngs::StdRng::seed_from_u64(a.seed ^ 0x9e37_79b9);
            let ids = (0..p)
                .map(|_| rng.random_range(0..cfg.vocab_size as u32))
                .collect();
            (ids, format!("random, seed {}", a.seed))
        }
    };
    let field = if a.prompt_ids.is_some() {
        "--prompt-ids"
    } else {
        "--prompt"
    };
    crate::infer::model::check_ids(&prompt, cfg.vocab_size).map_err(|_| {
        let bad = prompt
            .iter()
            .find(|&&i| i as usize >= cfg.vocab_size)
            .copied()
            .unwrap_or(0);
        cli(
            field,
            bad,
            format!(
                "token id beyond the model's vocab_size = {}",
                cfg.vocab_size
            ),
        )
    })?;
    let context = prompt.len() + generate;
    if context > cfg.block_size {
        return Err(cli(
            "--generate",
            generate,
            format!(
                "prompt ({}) + generate = {context} tokens exceeds the model's {} positions ({})",
                prompt.len(),
                cfg.block_size,
                cfg.name
            ),
        ));
    }
    let chunk = a
        .prefill_chunk
        .unwrap_or(fit::DEFAULT_FIT_CHUNK.min(prompt.len()));
    if chunk == 0 || chunk > MAX_TOKENS {
        return Err(cli(
            "--prefill-chunk",
            chunk,
            format!("must be between 1 and {MAX_TOKENS}"),
        ));
    }
    let chunk = chunk.min(prompt.len());
    let device = DeviceSpec::parse(&a.device)?;
    if !a.shapes_only {
        let missing = crate::infer::unsupported(&cfg);
        if !missing.is_empty() {
            return Err(cli(
                "--config",
                &cfg.model_type,
                format!(
                    "the measured generation does not implement {} yet; --shapes-only gives the serving estimate",
                    missing.join(", ")
                ),
            ));
        }
        // An absent device is bad input, found before any work.
        device.open()?;
        if let Some(t) = weights.tensors.iter().find(|t| {
            formats::GGML_TYPES
                .iter()
                .find(|g| g.name == t.ggml_type)
                .and_then(|g| g.candle())
                .is_none()
        }) {
            return Err(cli(
                "--weights",
                &format_name,
                format!(
                    "{} would be {}, which candle cannot run; use --shapes-only for the estimate or another format",
                    t.name, t.ggml_type
                ),
            ));
        }
        if act != TrainDtype::F32 && !device_is_cpu(device) && format_name.starts_with('q') {
            return Err(cli(
                "--weights",
                &format_name,
                "quantized weights run with f32 activations",
            ));
        }
    }
    let limit = a
        .max_memory
        .as_deref()
        .map(|s| fit::parse_size("--max-memory", s))
        .transpose()?;
    let budget = match (&a.memory, &a.gpu) {
        (Some(m), _) => Some((fit::parse_size("--memory", m)?, format!("--memory {m}"))),
        (None, Some(g)) => {
            let gpu = find_gpu(g)?;
            Some((gpu.memory_bytes, gpu.name.to_string()))
        }
        (None, None) => None,
    };
    let overhead = match &a.overhead {
        Some(s) if s.trim() == "0" => 0,
        Some(s) => fit::parse_size("--overhead", s)?,
        None => fit::DEFAULT_RUNTIME_OVERHEAD_BYTES,
    };
    if a.overhead.is_some() && budget.is_none() {
        return Err(cli(
            "--overhead",
            a.overhead.as_deref().unwrap_or(""),
            "only used by the fit questions: add --memory or --gpu",
        ));
    }
    if reference.is_some() && a.shapes_only {
        return Err(cli(
            "--reference",
            a.reference
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            "cannot be checked with --shapes-only (nothing is generated)",
        ));
    }
    Ok(Plan {
        cfg,
        source,
        gguf,
        format_name,
        weights,
        fit_format,
        act,
        kv,
        batch,
        prompt,
        prompt_source,
        generate,
        chunk,
        device,
        shapes_only: a.shapes_only,
        limit,
        budget,
        overhead,
        reference,
        full_forward: !a.no_full_forward,
        head_stored,
    })
}

fn device_is_cpu(d: DeviceSpec) -> bool {
    d == DeviceSpec::Cpu
}

fn scenario<'a>(
    p: &'a Plan,
    prompt: usize,
    generate: usize,
    chunk: usize,
    all: bool,
) -> Scenario<'a> {
    let cpu = device_is_cpu(p.device);
    Scenario {
        cfg: &p.cfg,
        weights: &p.weights,
        act: p.act,
        kv: p.kv,
        batch: p.batch,
        prompt,
        generate,
        chunk,
        all_logits: all,
        repack: if cpu {
            RepackLevel::detect()
        } else {
            RepackLevel::None
        },
        cpu,
        head_stored: p.head_stored,
        fused_attention: false,
    }
}

pub fn run(a: InferArgs) -> Result<u8> {
    let format = a.format;
    let p = plan(&a)?;
    let (report, refused) = execute(p)?;
    emit(format, &report, View::Full)?;
    if let Some(msg) = refused {
        eprintln!("error: refused: {msg}");
    }
    Ok(verdict(report.pass))
}

fn execute(p: Plan) -> Result<(InferReport, Option<String>)> {
    let cfg = &p.cfg;
    let params = crate::estimate::params::estimate(cfg)?.total;
    let context = p.prompt.len() + p.generate;
    let kv_cmp = kv::compare(cfg, p.batch as u64, context as u64, p.kv.bytes());
    let predicted = peaks::predict(&scenario(&p, p.prompt.len(), p.generate, p.chunk, false));
    let mut notes = Vec::new();
    let mut checks = Vec::new();
    if let Some(h) = &p.gguf {
        checks.push(
            Check::exact(
                "GGUF file: header + alignment padding + tensor data == file size",
                h.header_bytes + h.padding_bytes + h.data_bytes,
                h.file_bytes,
            )
            .with_note(format!(
                "{} + {} + {} B; candle's reader agrees on every tensor",
                h.header_bytes, h.padding_bytes, h.data_bytes
            )),
        );
    }
    if let Some(w) = (0..cfg.n_layer).find_map(|l| cfg.attention_window(l)) {
        notes.push(format!(
            "sliding window {w}: each sliding layer caches at most that many tokens"
        ));
    }
    let fit = match &p.budget {
        Some((budget, source)) => {
            let fm = FitModel {
                cfg,
                format: p.fit_format,
                weights: if p.gguf.is_some() {
                    p.weights.clone()
                } else {
                    weights::estimate(cfg, p.fit_format)?
                },
                kv: p.kv,
                chunk: p.chunk,
                overhead: p.overhead,
            };
            Some(fit::report(&fm, p.batch, context, *budget, source.clone())?)
        }
        None => None,
    };
    let mut infer = InferBlock {
        weights_bytes: None,
        kv_cache_bytes: None,
        prefill_peak_bytes: None,
        decode_peak_bytes: None,
        measured: None,
        predicted: predicted.clone(),
        tokens: None,
        timing: None,
        full_forward_max_rel_error: None,
    };
    let run_info = RunInfo {
        weights_source: match &p.source {
            SourceSpec::Random { seed } => format!("random N(0, 0.02), seed {seed}"),
            SourceSpec::Hf(d) | SourceSpec::Gguf(d) => d.display().to_string(),
        },
        weights_format: p.format_name.clone(),
        activation_dtype: p.act,
        kv_dtype: p.kv,
        batch: p.batch,
        prompt_tokens: p.prompt.len(),
        prompt_source: p.prompt_source.clone(),
        generate: p.generate,
        context,
        prefill_chunk: p.chunk,
        device: p.device.label(),
        shapes_only: p.shapes_only,
    };
    let mut refused = None;
    if p.shapes_only {
        notes.push("--shapes-only: the estimate only; nothing was loaded or run".into());
    } else {
        // Memory preflight: the run's predicted peak (and the harness's host buffers).
        let host = (p.batch * p.generate * 4) as u64;
        let need = predicted
            .prefill_peak_bytes
            .max(predicted.decode_peak_bytes)
            + host;
        let check_need = check_bytes(&p);
        let limit = p.limit.or_else(sysmem::available_bytes);
        let full_forward = p.full_forward
            && {
                let ok = check_need <= MAX_CHECK_BYTES
                    && limit.is_none_or(|l| need.max(check_need) <= l);
                if !ok && p.full_forward {
                    notes.push(format!(
                    "full-forward check skipped: it would hold {} (limit {} or the memory available)",
                    Bytes(check_need),
                    Bytes(MAX_CHECK_BYTES)
                ));
                }
                ok
            };
        if let Some(l) = limit.filter(|&l| need > l) {
            let msg = format!(
                "this run needs about {} (weights {} + KV cache {} + the forward's peak) but only {} is available; ways out: --shapes-only (the estimate at any size), a smaller --batch, --prompt or --generate, a smaller --prefill-chunk, a smaller --weights format, or --max-memory to override the limit",
                Bytes(need),
                Bytes(predicted.weights_bytes),
                Bytes(predicted.kv_cache_bytes),
                Bytes(l)
            );
            checks.push(
                Check::rel(
                    "memory preflight: predicted peak fits",
                    need as f64,
                    l as f64,
                    0.0,
                )
                .with_note("predicted bytes vs bytes available"),
            );
            // rel() passes equal values; a refusal must fail.
            if let Some(c) = checks.last_mut() {
                c.pass = false;
            }
            notes.push(format!("refused before allocating: {msg}"));
            refused = Some(msg);
        } else {
            measured_run(
                &p,
                full_forward,
                &predicted,
                &mut infer,
                &mut checks,
                &mut notes,
            )?;
        }
    }
    let pass = all_pass(&checks);
    let gguf = p.gguf.clone().map(|h| GgufSummary {
        by_type: h.by_type(),
        header: h,
    });
    Ok((
        InferReport {
            command: "infer",
            model: p.cfg.clone(),
            params,
            run: run_info,
            weights: p.weights.clone(),
            gguf,
            kv_cache: kv_cmp,
            infer,
            fit,
            checks,
            pass,
            notes,
        },
        refused,
    ))
}

/// Bytes the full-forward check holds: the stored logits plus its own forward over the whole
/// sequence with all logits (a fresh cache).
fn check_bytes(p: &Plan) -> u64 {
    let l = p.prompt.len() + p.generate - 1;
    let stored = (p.batch * p.generate * p.cfg.vocab_size * 4) as u64;
    let full = peaks::predict(&scenario(p, l, 1, l, true));
    stored + full.prefill_peak_bytes
}

fn measured_run(
    p: &Plan,
    full_forward: bool,
    predicted: &PeakPrediction,
    infer: &mut InferBlock,
    checks: &mut Vec<Check>,
    notes: &mut Vec<String>,
) -> Result<()> {
    let source = match &p.source {
        SourceSpec::Random { seed } => Source::Random { seed: *seed },
        SourceSpec::Hf(d) => Source::Safetensors { path: d.clone() },
        SourceSpec::Gguf(f) => Source::Gguf { path: f.clone() },
    };
    let r = run::run(RunPlan {
        cfg: &p.cfg,
        weights: &p.weights,
        source,
        act: p.act.candle(),
        kv: p.kv.candle(),
        batch: p.batch,
        prompt: p.prompt.clone(),
        generate: p.generate,
        chunk: p.chunk,
        device: p.device.open()?,
        full_forward_check: full_forward,
    })?;
    let m = &r.measured;
    let on_cpu = device_is_cpu(p.device);
    checks.push(
        Check::exact(
            "weights: storage bytes == predicted",
            m.weights_bytes,
            predicted.weights_bytes,
        )
        .with_note(format!(
            "{} weights, every block and scale counted",
            p.format_name
        )),
    );
    let tensors = predicted.weight_tensors.max(1);
    checks.push(
        Check::rel(
            "weights: allocated by loading vs storage",
            m.weights_allocated_bytes as f64,
            m.weights_bytes as f64,
            (tensors * BOOKKEEPING_BYTES_PER_TENSOR) as f64 / m.weights_bytes.max(1) as f64,
        )
        .with_note(format!(
            "allows {BOOKKEEPING_BYTES_PER_TENSOR} B of bookkeeping per tensor ({tensors} tensors)"
        )),
    );
    checks.push(
        Check::exact(
            "KV cache: storage bytes == predicted",
            m.kv_cache_bytes,
            predicted.kv_cache_bytes,
        )
        .with_note(format!(
            "2 · {} kv heads · {} · {} B · tokens · {} sequences, per layer",
            p.cfg.n_kv_head,
            p.cfg.head_dim,
            p.kv.bytes(),
            p.batch
        )),
    );
    let cache_tensors = 2 * p.cfg.n_layer as u64;
    checks.push(Check::rel(
        "KV cache: allocated vs storage",
        m.kv_cache_allocated_bytes as f64,
        m.kv_cache_bytes as f64,
        (cache_tensors * BOOKKEEPING_BYTES_PER_TENSOR) as f64 / m.kv_cache_bytes.max(1) as f64,
    ));
    let peak_check = |name: &str, pred: u64, meas: u64| {
        let c = Check::rel(name, pred as f64, meas as f64, PEAK_TOLERANCE);
        if on_cpu {
            c.with_note("replay of the engine's allocations (estimate::serve::peaks)")
        } else {
            c.informational("the replay describes candle's CPU backend")
        }
    };
    checks.push(peak_check(
        "prefill peak: predicted vs measured",
        predicted.prefill_peak_bytes,
        m.prefill_peak_bytes,
    ));
    checks.push(peak_check(
        "after prefill: predicted vs measured",
        predicted.after_prefill_bytes,
        m.after_prefill_bytes,
    ));
    if p.generate > 1 {
        checks.push(peak_check(
            "decode peak: predicted vs measured",
            predicted.decode_peak_bytes,
            m.decode_peak_bytes,
        ));
        let worst = m
            .decode_step_peak_bytes
            .iter()
            .zip(&predicted.decode_step_peaks)
            .map(|(&mm, &pp)| crate::units::rel_error(pp as f64, mm as f64).abs())
            .fold(0.0f64, f64::max);
        checks.push(Check::error_bound(
            "every decode step's peak: worst relative error",
            worst,
            PEAK_TOLERANCE,
            "per-step prediction vs the step's measured peak",
        ));
    }
    if let Some(e) = r.full_forward_error {
        let tol = match p.act {
            TrainDtype::F32 => FULL_FORWARD_TOLERANCE_F32,
            TrainDtype::F16 => FULL_FORWARD_TOLERANCE_F16,
            TrainDtype::Bf16 => FULL_FORWARD_TOLERANCE_BF16,
        };
        let c = Check::error_bound(
            "incremental decode logits == one full forward",
            e,
            tol,
            &format!("max |Δ| / max |logit| over {} positions", p.generate),
        );
        let quantized = p
            .weights
            .by_type
            .keys()
            .any(|t| !matches!(*t, "F32" | "F16" | "BF16"));
        checks.push(if quantized {
            // candle quantizes a quantized matmul's input to 8 bits (Q8_0 / Q8_K blocks): an
            // activation on a rounding boundary may round one step differently when the
            // incremental and the full forward sum in different orders, and deep models carry
            // that step to the logits. Not an error of either; float weights gate.
            c.informational(format!(
                "max |Δ| / max |logit| = {e:.2e}; quantized weights: each quantized matmul rounds its input to 8 bits, so the two orders may differ by rounding steps"
            ))
        } else {
            c
        });
        infer.full_forward_max_rel_error = Some(e);
    }
    if let Some(rf) = &p.reference {
        let want = &rf.generated_ids;
        let mut bad = None;
        for (s, got) in r.tokens.iter().enumerate() {
            let n = got.len().min(want.len());
            if got[..n] != want[..n] || got.len() < want.len() {
                let at = (0..n).find(|&i| got[i] != want[i]).unwrap_or(n);
                bad = Some(format!(
                    "sequence {s}: first difference at token {at}: {:?} vs {:?}",
                    got.get(at),
                    want.get(at)
                ));
                break;
            }
        }
        checks.push(Check::holds(
            "greedy tokens == HF transformers' greedy generation",
            bad.is_none(),
            bad.unwrap_or_else(|| {
                format!(
                    "{} tokens from {} (transformers {})",
                    want.len().min(p.generate),
                    rf.path.display(),
                    rf.transformers.as_deref().unwrap_or("?")
                )
            }),
        ));
    }
    if p.head_stored {
        notes.push(
            "the file stores the tied head as its own tensor (output.weight): loaded as stored"
                .into(),
        );
    }
    infer.weights_bytes = Some(m.weights_bytes);
    infer.kv_cache_bytes = Some(m.kv_cache_bytes);
    infer.prefill_peak_bytes = Some(m.prefill_peak_bytes);
    infer.decode_peak_bytes = Some(if p.generate > 1 {
        m.decode_peak_bytes
    } else {
        m.after_prefill_bytes
    });
    infer.tokens = Some(r.tokens);
    infer.timing = Some(r.timing);
    infer.measured = Some(r.measured);
    Ok(())
}
