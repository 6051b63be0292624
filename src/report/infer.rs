//! `truesize infer` as titled tables. No arithmetic beyond formatting: every number is a field
//! of the report (differences and errors are computed here only as displayed ratios).

use super::render::{Render, View};
use super::section::{result_label, Section};
use crate::check::Check;
use crate::checkpoint::gguf::GgufHeader;
use crate::config::ModelConfig;
use crate::dtype::TrainDtype;
use crate::estimate::serve::fit::FitReport;
use crate::estimate::serve::kv::KvComparison;
use crate::estimate::serve::peaks::PeakPrediction;
use crate::estimate::serve::weights::{TypeCount, WeightsEstimate};
use crate::infer::run::{Measured, Timing};
use crate::units::{group, percent, rel_error, Bytes};
use serde::Serialize;
use std::collections::BTreeMap;

/// The measured side of the JSON contract (`infer.*`), plus the prediction.
#[derive(Debug, Clone, Serialize)]
pub struct InferBlock {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub weights_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kv_cache_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prefill_peak_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub decode_peak_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub measured: Option<Measured>,
    pub predicted: PeakPrediction,
    /// Generated ids, one list per sequence.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tokens: Option<Vec<Vec<u32>>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timing: Option<Timing>,
    /// Incremental decode vs one full forward: max |Δlogit| / max |logit|.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub full_forward_max_rel_error: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct RunInfo {
    pub weights_source: String,
    pub weights_format: String,
    pub activation_dtype: TrainDtype,
    pub kv_dtype: TrainDtype,
    pub batch: usize,
    pub prompt_tokens: usize,
    pub prompt_source: String,
    pub generate: usize,
    pub context: usize,
    pub prefill_chunk: usize,
    pub device: String,
    pub shapes_only: bool,
}

/// The file as read, for a GGUF source.
#[derive(Debug, Clone, Serialize)]
pub struct GgufSummary {
    #[serde(flatten)]
    pub header: GgufHeader,
    pub by_type: BTreeMap<&'static str, TypeCount>,
}

#[derive(Debug, Clone, Serialize)]
pub struct InferReport {
    pub command: &'static str,
    pub model: ModelConfig,
    /// Exact parameter count of the config.
    pub params: u64,
    pub run: RunInfo,
    pub weights: WeightsEstimate,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gguf: Option<GgufSummary>,
    pub kv_cache: KvComparison,
    pub infer: InferBlock,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fit: Option<FitReport>,
    pub checks: Vec<Check>,
    pub pass: bool,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
}

impl Render for InferReport {
    fn sections(&self, _view: View) -> Vec<Section> {
        sections(self)
    }
}

fn s(x: impl ToString) -> String {
    x.to_string()
}

fn b(x: u64) -> String {
    format!("{} B ({})", group(x), Bytes(x).human())
}

fn opt(x: Option<usize>) -> String {
    x.map_or("does not fit".into(), |v| group(v as u64))
}

pub fn sections(r: &InferReport) -> Vec<Section> {
    let mut out = Vec::new();
    let run = &r.run;
    let pr = &r.infer.predicted;
    out.push(Section {
        title: format!(
            "Serving memory: {} ({}, {} parameters), weights {}",
            r.model.name,
            r.model.model_type,
            group(r.params),
            run.weights_format
        ),
        header: vec![s("term"), s("bytes"), s("what")],
        rows: vec![
            vec![
                s("weights"),
                b(pr.weights_bytes),
                format!("{:.3} bits/weight", r.weights.bits_per_weight),
            ],
            vec![
                s("KV cache"),
                b(pr.kv_cache_bytes),
                format!(
                    "{} × {} tokens, {} K and V",
                    run.batch, run.context, run.kv_dtype.name()
                ),
            ],
            vec![
                s("prefill peak"),
                b(pr.prefill_peak_bytes),
                format!(
                    "{} prompt tokens in chunks of {}; workspace {}",
                    run.prompt_tokens,
                    run.prefill_chunk,
                    Bytes(pr.prefill_workspace_bytes).human()
                ),
            ],
            vec![
                s("decode peak"),
                b(pr.decode_peak_bytes),
                format!(
                    "{} tokens per sequence; workspace {}",
                    run.generate,
                    Bytes(pr.decode_workspace_bytes).human()
                ),
            ],
        ],
        notes: vec![
            format!(
                "activations {}, weights from {}; peaks are truesize's engine on {} (bytes above the process's baseline)",
                run.activation_dtype.name(),
                run.weights_source,
                run.device
            ),
        ],
    });
    let mut rows: Vec<Vec<String>> = r
        .weights
        .by_type
        .iter()
        .map(|(t, c)| {
            vec![
                s(t),
                group(c.tensors as u64),
                group(c.numel),
                b(c.bytes),
                format!("{:.3}", c.bytes as f64 * 8.0 / c.numel.max(1) as f64),
            ]
        })
        .collect();
    rows.push(vec![
        s("total"),
        group(r.weights.tensors.len() as u64),
        group(r.weights.numel),
        b(r.weights.bytes),
        format!("{:.3}", r.weights.bits_per_weight),
    ]);
    let mut notes = Vec::new();
    if !r.weights.kept_unquantized.is_empty() {
        let k = &r.weights.kept_unquantized;
        notes.push(format!(
            "unquantized ({}): {}{}",
            k.len(),
            k.iter().take(6).cloned().collect::<Vec<_>>().join(", "),
            if k.len() > 6 { ", ..." } else { "" }
        ));
    }
    if let Some(g) = &r.gguf {
        notes.push(format!(
            "file {}: header {} + padding {} + data {} = {} (alignment {}, GGUF v{})",
            g.header.path.display(),
            group(g.header.header_bytes),
            group(g.header.padding_bytes),
            group(g.header.data_bytes),
            b(g.header.file_bytes),
            g.header.alignment,
            g.header.version
        ));
    }
    out.push(Section {
        title: "Weights by GGML type".into(),
        header: vec![
            s("type"),
            s("tensors"),
            s("numel"),
            s("bytes"),
            s("bits/weight"),
        ],
        rows,
        notes,
    });
    let k = &r.kv_cache;
    out.push(Section {
        title: format!(
            "KV cache for {} × {} tokens, side by side",
            k.batch, k.context
        ),
        header: vec![s("sized by"), s("bytes"), s("vs truesize exact"), s("how")],
        rows: vec![
            vec![
                s("truesize (exact)"),
                b(k.exact_bytes),
                s(""),
                format!(
                    "{} B elements, windows applied to {} layers",
                    k.exact_elem_bytes, k.sliding_window_layers
                ),
            ],
            vec![
                s("truesize at 2 B"),
                b(k.exact_f16_bytes),
                percent(rel_error(k.exact_f16_bytes as f64, k.exact_bytes as f64)),
                s("f16/bf16 K and V"),
            ],
            vec![
                s("llama.cpp"),
                b(k.llama_cpp_bytes),
                percent(rel_error(
                    k.llama_cpp_bytes as f64,
                    k.exact_f16_bytes as f64,
                )),
                format!(
                    "{} cells (padded to 256), F16, no window",
                    group(k.llama_cpp_cells)
                ),
            ],
            vec![
                s("vLLM"),
                b(k.vllm_bytes),
                percent(rel_error(k.vllm_bytes as f64, k.exact_f16_bytes as f64)),
                format!(
                    "{} blocks of 16 per sequence, 16-bit, no window",
                    k.vllm_blocks_per_sequence
                ),
            ],
        ],
        notes: vec![s(
            "engine rows are compared with truesize's figure at the same 2-byte elements",
        )],
    });
    if let Some(m) = &r.infer.measured {
        let row = |name: &str, meas: u64, pred: u64| {
            vec![
                s(name),
                b(meas),
                b(pred),
                percent(rel_error(pred as f64, meas as f64)),
            ]
        };
        let mut rows = vec![
            row("weights (storage)", m.weights_bytes, pr.weights_bytes),
            row(
                "after load (allocated)",
                m.after_load_bytes,
                pr.loaded_bytes,
            ),
            row("KV cache (storage)", m.kv_cache_bytes, pr.kv_cache_bytes),
            row("prefill peak", m.prefill_peak_bytes, pr.prefill_peak_bytes),
            row(
                "after prefill",
                m.after_prefill_bytes,
                pr.after_prefill_bytes,
            ),
        ];
        if !m.decode_step_peak_bytes.is_empty() {
            rows.push(row(
                "decode peak (max over steps)",
                m.decode_peak_bytes,
                pr.decode_peak_bytes,
            ));
            if let (Some(f), Some(pf)) = (
                m.decode_step_peak_bytes.first(),
                pr.decode_step_peaks.first(),
            ) {
                rows.push(row("  first decode step", *f, *pf));
            }
            if let (Some(l), Some(pl)) =
                (m.decode_step_peak_bytes.last(), pr.decode_step_peaks.last())
            {
                rows.push(row("  last decode step", *l, *pl));
            }
        }
        rows.push(vec![s("end"), b(m.end_bytes), s(""), s("")]);
        let mut notes = vec![format!(
            "measured by the {}, above the baseline before loading",
            m.source
        )];
        if let Some(t) = &r.infer.timing {
            notes.push(format!(
                "load {:.3} s, prefill {:.3} s, decode {:.3} s ({:.1} tokens/s)",
                t.load_s, t.prefill_s, t.decode_s, t.decode_tokens_per_s
            ));
        }
        if pr.kept_by_kernels_bytes > 0 {
            notes.push(format!(
                "kept by candle's quantized kernels after the prefill (input scratch, repacked weights): {}",
                b(pr.kept_by_kernels_bytes)
            ));
        }
        out.push(Section {
            title: "Measured generation run".into(),
            header: vec![s("phase"), s("measured"), s("predicted"), s("error")],
            rows,
            notes,
        });
        if let Some(tok) = &r.infer.tokens {
            out.push(Section {
                title: "Generated tokens (greedy)".into(),
                header: vec![s("sequence"), s("ids")],
                rows: tok
                    .iter()
                    .take(4)
                    .enumerate()
                    .map(|(i, t)| {
                        vec![
                            s(i),
                            t.iter()
                                .map(|x| x.to_string())
                                .collect::<Vec<_>>()
                                .join(" "),
                        ]
                    })
                    .collect(),
                notes: if tok.len() > 4 {
                    vec![format!("... {} sequences in all (same prompt)", tok.len())]
                } else {
                    vec![]
                },
            });
        }
    }
    if let Some(f) = &r.fit {
        let n = &f.need;
        out.push(Section {
            title: format!(
                "Fit: {} ({} bytes) for {} weights, batch {} × context {}",
                f.budget_source,
                group(f.budget_bytes),
                f.format,
                f.batch,
                f.context
            ),
            header: vec![s("term"), s("bytes")],
            rows: vec![
                vec![s("weights"), b(n.weights_bytes)],
                vec![s(format!("KV cache ({})", f.kv_dtype)), b(n.kv_cache_bytes)],
                vec![s(format!("workspace (prefill chunk {})", f.prefill_chunk)), b(n.workspace_bytes)],
                vec![s("runtime overhead (assumed)"), b(n.overhead_bytes)],
                vec![s("total"), b(n.total_bytes)],
                vec![s("budget"), b(f.budget_bytes)],
            ],
            notes: vec![
                format!("fits: {}", if f.fits { "yes" } else { "no" }),
                format!("longest context at batch {}: {}", f.batch, opt(f.longest_context)),
                format!("largest batch at context {}: {}", f.context, opt(f.largest_batch)),
                format!(
                    "highest-precision format that fits at batch {} × {}: {}",
                    f.batch,
                    f.context,
                    f.best_format.unwrap_or("none")
                ),
                s("workspace: the engine's activations for one prefill chunk or decode step with fused (flash) attention, as GPU servers run it: no attention scores in memory; no CPU-kernel scratch"),
            ],
        });
        out.push(Section {
            title: format!("Formats at batch {} × context {}", f.batch, f.context),
            header: vec![s("format"), s("weights"), s("total"), s("fits")],
            rows: f
                .formats
                .iter()
                .map(|x| {
                    vec![
                        s(x.format),
                        b(x.weights_bytes),
                        b(x.total_bytes),
                        s(if x.fits { "yes" } else { "no" }),
                    ]
                })
                .collect(),
            notes: vec![],
        });
        out.push(Section {
            title: format!(
                "GPUs ({} weights, batch {} × context {})",
                f.format, f.batch, f.context
            ),
            header: vec![
                s("GPU"),
                s("memory"),
                s("fits"),
                s(format!("longest context at batch {}", f.batch)),
                s(format!("largest batch at {}", f.context)),
                s("best format"),
            ],
            rows: f
                .gpus
                .iter()
                .map(|g| {
                    vec![
                        s(g.gpu),
                        Bytes(g.memory_bytes).human(),
                        s(if g.fits { "yes" } else { "no" }),
                        opt(g.longest_context),
                        opt(g.largest_batch),
                        s(g.best_format.unwrap_or("none")),
                    ]
                })
                .collect(),
            notes: vec![],
        });
    }
    if !r.checks.is_empty() {
        out.push(Section {
            title: "Checks".into(),
            header: vec![
                s("check"),
                s("result"),
                s("measured"),
                s("expected"),
                s("note"),
            ],
            rows: r
                .checks
                .iter()
                .map(|c| {
                    vec![
                        c.name.clone(),
                        s(result_label(c)),
                        fmt_num(c.measured),
                        fmt_num(c.expected),
                        c.note.clone().unwrap_or_else(|| percent(c.rel_error)),
                    ]
                })
                .collect(),
            notes: vec![format!("verdict: {}", if r.pass { "PASS" } else { "FAIL" })],
        });
    }
    if !r.notes.is_empty() {
        out.push(Section {
            title: "Notes".into(),
            header: vec![],
            rows: vec![],
            notes: r.notes.clone(),
        });
    }
    out
}

fn fmt_num(x: f64) -> String {
    if x.fract() == 0.0 && x.abs() < 1e18 {
        group(x as u64)
    } else {
        format!("{x:.3e}")
    }
}
