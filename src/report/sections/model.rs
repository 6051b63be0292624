//! The model and the step: what was sized or run.

use crate::report::section::{s, Section};
use crate::report::sizing::Report;

pub fn model(r: &Report) -> Section {
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
    Section {
        title: "Model".into(),
        header: vec![s("field"), s("value")],
        rows: arch,
        notes: vec![],
    }
}

/// One line: the model and the step.
pub fn model_line(r: &Report) -> String {
    let m = &r.model;
    format!(
        "{} ({}, {}): d {} × {} layers, {} / {} heads × {}, vocab {}; batch {} × seq {}, {}{}",
        m.name,
        m.model_type,
        m.arch.name(),
        m.n_embd,
        m.n_layer,
        m.n_head,
        m.n_kv_head,
        m.head_dim,
        m.vocab_size,
        r.run.batch,
        r.run.seq,
        r.run.dtype.name(),
        r.run
            .device
            .as_ref()
            .map(|d| format!(" on {d}"))
            .unwrap_or_default()
    )
}
