//! The report as titled text tables, shared by the table and markdown exporters.

use super::Report;
mod memory;
use crate::estimate::params::Component;
use crate::units::{group, percent, Bytes};

pub struct Section {
    pub title: String,
    pub header: Vec<String>,
    pub rows: Vec<Vec<String>>,
    /// Lines printed under the table.
    pub notes: Vec<String>,
}

fn s(x: impl ToString) -> String {
    x.to_string()
}

fn bytes_cells(b: u64) -> [String; 2] {
    [group(b), Bytes(b).human()]
}

fn num(x: f64) -> String {
    if x.fract() == 0.0 && x.abs() < 1e15 {
        group(x.abs() as u64).chars().fold(
            if x < 0.0 {
                "-".to_string()
            } else {
                String::new()
            },
            |mut a, c| {
                a.push(c);
                a
            },
        )
    } else if x.abs() >= 1e-3 && x.abs() < 1e6 {
        format!("{x:.6}")
    } else {
        format!("{x:.3e}")
    }
}

pub fn sections(r: &Report) -> Vec<Section> {
    let mut out = Vec::new();
    let m = &r.model;
    let mut arch = vec![
        vec![
            s("model"),
            format!("{} ({}, {})", m.name, m.model_type, m.arch.name()),
        ],
        vec![
            s("n_embd × n_layer"),
            format!("{} × {}", m.n_embd, m.n_layer),
        ],
        vec![
            s("heads (q / kv) × head_dim"),
            format!("{} / {} × {}", m.n_head, m.n_kv_head, m.head_dim),
        ],
        vec![s("MLP width"), s(m.intermediate_size)],
        vec![
            s("vocab / block"),
            format!("{} / {}", m.vocab_size, m.block_size),
        ],
        vec![s("tied head"), s(m.tie_embeddings)],
    ];
    if m.is_moe() {
        arch.push(vec![
            s("experts (active)"),
            format!("{} ({} per token)", m.n_experts, m.n_experts_per_tok),
        ]);
    }
    arch.push(vec![
        s("step"),
        format!(
            "batch {} × seq {}, {}{}",
            r.run.batch,
            r.run.seq,
            r.run.dtype.name(),
            r.run
                .device
                .as_ref()
                .map(|d| format!(" on {d}"))
                .unwrap_or_default()
        ),
    ]);
    if let Some(w) = &r.run.weights {
        arch.push(vec![s("weights"), w.clone()]);
    }
    out.push(Section {
        title: "Model".into(),
        header: vec![s("field"), s("value")],
        rows: arch,
        notes: vec![],
    });

    // Parameters per component, estimate beside census when there is one.
    let p = &r.params;
    let mut header = vec![s("component"), s("estimate (params)")];
    if r.census.is_some() {
        header.push(s("census (numel)"));
    }
    header.push(s("share"));
    let mut rows = Vec::new();
    for c in Component::ALL {
        let e = p.get(c);
        let got = r.census.as_ref().map(|cs| cs.get(c));
        if e == 0 && got.unwrap_or(0) == 0 && !(c == Component::LmHead && m.tie_embeddings) {
            continue;
        }
        let mut row = vec![
            if c == Component::LmHead && m.tie_embeddings {
                s("lm_head (tied: shares embed_tokens)")
            } else {
                s(c.name())
            },
            group(e),
        ];
        if let Some(g) = got {
            row.push(group(g));
        }
        row.push(format!("{:.2}%", 100.0 * e as f64 / p.total.max(1) as f64));
        rows.push(row);
    }
    let mut total = vec![s("total"), group(p.total)];
    if let Some(cs) = &r.census {
        total.push(group(cs.numel));
    }
    total.push(s("100%"));
    rows.push(total);
    let mut notes = vec![format!(
        "non-embedding (Kaplan's N: without token/position embeddings): {}",
        group(p.non_embedding)
    )];
    if m.is_moe() {
        notes.push(format!(
            "active per token ({} of {} experts): {}",
            m.n_experts_per_tok,
            m.n_experts,
            group(p.active_per_token)
        ));
    }
    out.push(Section {
        title: "Parameters (exact; tied weights counted once)".into(),
        header,
        rows,
        notes,
    });

    // The 12·d² rule and where it goes wrong.
    let mut notes = vec![format!(
        "12·d² rule (vocab + block)·d + 12·d²·L = {}  vs exact {}: {}{}",
        group(p.rough_12d2),
        group(p.total),
        percent(p.rough_rel_error),
        if p.rough_applies {
            " (its assumptions hold here)"
        } else {
            " (its assumptions do not hold here)"
        }
    )];
    for why in crate::estimate::params::rough_applies(m) {
        notes.push(format!("  - {why}"));
    }
    out.push(Section {
        title: "Where the 12·d² rule differs".into(),
        header: vec![s("term"), s("exact − rule (params)"), s("why")],
        rows: p
            .rough_gap
            .iter()
            .map(|g| vec![s(g.term), signed_group(g.delta), g.why.clone()])
            .collect(),
        notes,
    });

    out.push(Section {
        title: "Weights by storage format (naive width, no quantisation scales)".into(),
        header: vec![s("format"), s("bits"), s("bytes"), s("binary")],
        rows: r
            .weights
            .iter()
            .map(|w| {
                let [b, h] = bytes_cells(w.bytes.0);
                vec![s(w.format), s(w.bits), b, h]
            })
            .collect(),
        notes: vec![],
    });

    let t = &r.training;
    let mut rows = vec![
        row_bytes(&format!("weights ({})", t.dtype.name()), t.weights_bytes.0),
        row_bytes(
            &format!("gradients ({})", t.dtype.name()),
            t.gradients_bytes.0,
        ),
    ];
    if t.master_weights_bytes.0 > 0 {
        rows.push(row_bytes("f32 master weights", t.master_weights_bytes.0));
    }
    rows.push(row_bytes("AdamW m + v (f32)", t.optimizer_bytes.0));
    match t.activations_bytes {
        Some(a) => rows.push(row_bytes(
            &format!(
                "activations at the step's peak (batch {} × seq {})",
                r.run.batch, r.run.seq
            ),
            a.0,
        )),
        None => rows.push(vec![
            s("activations"),
            s("beyond any machine (> 1 EiB)"),
            s(""),
        ]),
    }
    rows.push(row_bytes("total", t.total_bytes.0));
    out.push(Section {
        title: format!(
            "Training memory, AdamW, {} (mixed precision convention)",
            t.dtype.name()
        ),
        header: vec![s("part"), s("bytes"), s("binary")],
        rows,
        notes: vec![],
    });

    if let Some(c) = &r.census {
        let mut rows = vec![
            vec![s("tensors"), group(c.tensors as u64)],
            vec![s("numel"), group(c.numel)],
            vec![
                s("dtype (element bytes)"),
                format!("{} ({})", c.dtype, c.element_bytes),
            ],
            vec![s("bytes (numel × element)"), Bytes(c.bytes).to_string()],
        ];
        if let Some(sb) = c.storage_bytes {
            rows.push(vec![s("storage buffers (real)"), Bytes(sb).to_string()]);
        }
        out.push(Section {
            title: if c.shapes_only {
                "Census (shape-only: names and shapes, nothing allocated)".into()
            } else {
                "Census of the genuine model".into()
            },
            header: vec![s("measure"), s("value")],
            rows,
            notes: c
                .unclassified
                .iter()
                .map(|n| format!("unclassified tensor: {n}"))
                .collect(),
        });
    }

    if let Some(mem) = &r.memory {
        let ph = &mem.phases;
        let rows = vec![
            row_bytes("after build (weights)", ph.weights_bytes),
            row_bytes("peak during forward", ph.forward_peak_bytes),
            row_bytes("after forward (kept for backward)", ph.after_forward_bytes),
            row_bytes("peak during backward", ph.backward_peak_bytes),
            row_bytes("after backward (weights + grads)", ph.after_backward_bytes),
            row_bytes("  of which gradients", ph.gradients_bytes),
            row_bytes("peak of the step", ph.peak_bytes),
            row_bytes("predicted peak", mem.predicted_peak_bytes),
        ];
        let mut notes = vec![format!(
            "measured by the {}, above the pre-build baseline",
            mem.source
        )];
        if let Some(rss) = mem.rss_bytes {
            notes.push(format!(
                "process RSS at the end (context only): {}",
                Bytes(rss)
            ));
        }
        out.push(Section {
            title: "Memory of one training step (measured)".into(),
            header: vec![s("phase"), s("bytes"), s("binary")],
            rows,
            notes,
        });
    }
    out.extend(memory::rules_section(&r.rules));
    if let Some(e) = &r.extrapolation {
        out.push(memory::extrapolation_section(e));
    }

    if let Some(t) = &r.timing {
        out.push(Section {
            title: format!("Timing (median of {})", t.repeat),
            header: vec![s("phase"), s("seconds")],
            rows: vec![
                vec![s("build"), format!("{:.4}", t.build_s)],
                vec![s("forward + loss"), format!("{:.4}", t.forward_s)],
                vec![s("backward"), format!("{:.4}", t.backward_s)],
            ],
            notes: r.loss.map(|l| format!("loss {l:.6}")).into_iter().collect(),
        });
    }

    out.extend(compute_and_artifact_sections(r));

    if !r.checks.is_empty() {
        let rows = r
            .checks
            .iter()
            .map(|c| {
                vec![
                    c.name.clone(),
                    num(c.measured),
                    num(c.expected),
                    percent(c.rel_error),
                    if c.tolerance == 0.0 {
                        s("exact")
                    } else {
                        format!("{:.2e}", c.tolerance)
                    },
                    match (c.pass, c.gating) {
                        (true, _) => s("pass"),
                        (false, true) => s("FAIL"),
                        (false, false) => s("info"),
                    },
                    c.note.clone().unwrap_or_default(),
                ]
            })
            .collect();
        out.push(Section {
            title: "Checks".into(),
            header: [
                "check",
                "measured",
                "expected",
                "error",
                "tolerance",
                "result",
                "note",
            ]
            .map(s)
            .to_vec(),
            rows,
            notes: r
                .pass
                .map(|p| format!("verdict: {}", if p { "PASS" } else { "FAIL" }))
                .into_iter()
                .collect(),
        });
    }
    let mut notes = r.notes.clone();
    if let Some(rss) = r.peak_rss_bytes {
        notes.push(format!("peak RSS of this process: {}", Bytes(rss)));
    }
    if !notes.is_empty() {
        out.push(Section {
            title: "Notes".into(),
            header: vec![],
            rows: vec![],
            notes,
        });
    }
    out
}

fn signed_group(x: i128) -> String {
    let sign = if x < 0 { "-" } else { "+" };
    format!(
        "{sign}{}",
        group(u64::try_from(x.unsigned_abs()).unwrap_or(u64::MAX))
    )
}

fn row_bytes(name: &str, b: u64) -> Vec<String> {
    let [x, h] = bytes_cells(b);
    vec![name.to_string(), x, h]
}

/// FLOPs, MFU, the saved checkpoint and quantized sizes (issue #6).
fn compute_and_artifact_sections(r: &Report) -> Vec<Section> {
    let mut out = Vec::new();
    if let Some(f) = &r.flops {
        let mut rows: Vec<Vec<String>> = f
            .terms
            .iter()
            .map(|t| {
                vec![
                    s(t.term),
                    group(t.forward),
                    format!("{:.3e}", t.forward as f64),
                ]
            })
            .collect();
        for (name, flops) in [
            ("forward", f.forward),
            ("forward, causal attention", f.forward_causal),
            ("backward (2 × forward)", f.backward),
            ("forward + backward", f.total),
            ("PaLM 6N + 12·L·H·Q·T, × T", f.palm_total),
        ] {
            rows.push(vec![s(name), group(flops), format!("{:.3e}", flops as f64)]);
        }
        out.push(Section {
            title: format!(
                "FLOPs of one sequence of {} tokens (2·m·n·k per matmul; attention {})",
                f.seq,
                if f.causal {
                    "causal"
                } else {
                    "in full, as nanoGPT counts it"
                }
            ),
            header: vec![s("term"), s("FLOPs"), s("")],
            rows,
            notes: vec![
                format!(
                    "MACs = FLOPs / 2: forward {} MACs; per token {:.4e} FLOPs",
                    group(f.forward_macs),
                    f.forward_per_token
                ),
                format!(
                    "PaLM / counted = {:.4} (N = {} parameters in a matmul per token)",
                    f.palm_ratio,
                    group(f.palm_params)
                ),
            ],
        });
    }
    if let Some(m) = &r.mfu {
        let mut rows = vec![
            vec![
                s("model FLOPs of the step (batch × fwd+bwd)"),
                group(m.step_flops),
            ],
            vec![
                s("measured step (forward + backward), s"),
                format!("{:.4}", m.step_s),
            ],
            vec![
                s("achieved"),
                format!("{:.2} GFLOP/s", m.achieved_flops_per_s / 1e9),
            ],
        ];
        let mut notes = Vec::new();
        match (m.peak_flops_per_s, &m.peak_source, m.mfu) {
            (Some(p), Some(src), Some(u)) => {
                rows.push(vec![s("peak"), format!("{:.2} GFLOP/s ({src})", p / 1e9)]);
                rows.push(vec![s("MFU"), format!("{:.2}%", u * 100.0)]);
            }
            _ => notes.push(
                "MFU not computed: no peak given; pass --peak-tflops X or --measure-peak"
                    .to_string(),
            ),
        }
        out.push(Section {
            title: "Throughput and MFU".into(),
            header: vec![s("measure"), s("value")],
            rows,
            notes,
        });
    }
    if let Some(c) = &r.checkpoint {
        out.push(Section {
            title: "Checkpoint (.safetensors written and measured)".into(),
            header: vec![s("part"), s("bytes"), s("binary")],
            rows: vec![
                row_bytes("file (measured)", c.file_bytes),
                row_bytes("predicted: 8 + header + data", c.predicted_bytes),
                row_bytes("header (JSON, padded to 8)", c.header_bytes),
                row_bytes("tensor data", c.data_bytes),
                row_bytes("training checkpoint: f32 weights + AdamW m, v", c.training_checkpoint_bytes),
            ],
            notes: vec![format!(
                "{} tensors; overhead beyond the data {} B ({:.4}% of the file); written in {:.1} ms",
                c.tensors,
                group(c.overhead_bytes),
                100.0 * c.overhead_bytes as f64 / c.file_bytes.max(1) as f64,
                c.save_s * 1e3
            )],
        });
    }
    if let Some(q) = &r.quantized {
        out.push(Section {
            title: "Quantized weights (real candle QTensors)".into(),
            header: ["format", "bytes", "binary", "bits/weight", "bits/param", "naive bytes", "vs naive", "vs f32", "kept (1-D / misfit)"]
                .map(s)
                .to_vec(),
            rows: q
                .iter()
                .map(|(name, x)| {
                    let [b, h] = bytes_cells(x.bytes);
                    vec![
                        s(name),
                        b,
                        h,
                        x.bits_per_weight.map_or_else(|| s("none fit"), |b| format!("{b:.3}")),
                        format!("{:.3}", x.bits_per_param),
                        group(x.naive_bytes),
                        format!("{:.3}×", x.vs_naive),
                        format!("{:.2}× smaller", x.compression_vs_f32),
                        format!("{} / {}", x.kept_tensors, x.kept_misfit_tensors),
                    ]
                })
                .collect(),
            notes: vec![s(
                "2-D matrices whose rows are a multiple of the block are quantized; norms, biases and misfits stay in their dtype",
            )],
        });
    }
    out
}
