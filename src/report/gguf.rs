//! What `truesize inspect FILE.gguf` found, and its tables.

use super::render::{Render, View};
use super::section::{result_label, s, Section};
use crate::checkpoint::gguf_inspect::GgufInspectReport;
use crate::units::{group, Bytes};

impl Render for GgufInspectReport {
    fn sections(&self, _view: View) -> Vec<Section> {
        sections(self)
    }
}

pub fn sections(r: &GgufInspectReport) -> Vec<Section> {
    let mut out = vec![Section {
        title: format!(
            "GGUF {} (v{}, {})",
            r.path,
            r.version,
            r.architecture.as_deref().unwrap_or("no architecture")
        ),
        header: vec![s("part"), s("bytes")],
        rows: vec![
            vec![s("header (metadata + tensor infos)"), group(r.header_bytes)],
            vec![
                format!("alignment padding (to {})", r.alignment),
                group(r.padding_bytes),
            ],
            vec![s("tensor data"), group(r.data_bytes)],
            vec![s("file"), format!("{}", Bytes(r.file_bytes))],
        ],
        notes: vec![format!(
            "{} tensors, {} elements, {:.3} bits/element; {} metadata entries{}",
            r.file_tensors,
            group(r.file_numel),
            r.bits_per_weight,
            r.metadata_entries,
            r.tokenizer_tokens
                .map_or(String::new(), |t| format!(", {t} tokenizer tokens"))
        )],
    }];
    let mut rows: Vec<Vec<String>> = r
        .by_type
        .iter()
        .map(|(t, c)| {
            vec![
                s(t),
                group(c.tensors as u64),
                group(c.numel),
                group(c.bytes),
                format!("{:.3}", c.bytes as f64 * 8.0 / c.numel.max(1) as f64),
            ]
        })
        .collect();
    rows.push(vec![
        s("total"),
        group(r.file_tensors as u64),
        group(r.file_numel),
        group(r.data_bytes),
        format!("{:.3}", r.bits_per_weight),
    ]);
    out.push(Section {
        title: "Tensors by GGML type".into(),
        header: vec![
            s("type"),
            s("tensors"),
            s("numel"),
            s("bytes"),
            s("bits/weight"),
        ],
        rows,
        notes: match (r.expected_params, r.params_numel) {
            (Some(e), Some(p)) => vec![format!(
                "parameters in the file {} vs the config's exact count {}",
                group(p),
                group(e)
            )],
            _ => vec![],
        },
    });
    out.push(Section {
        title: "Checks".into(),
        header: vec![s("check"), s("result"), s("note")],
        rows: r
            .checks
            .iter()
            .map(|c| {
                vec![
                    c.name.clone(),
                    s(result_label(c)),
                    c.note.clone().unwrap_or_else(|| {
                        format!(
                            "{} vs {}",
                            group(c.measured as u64),
                            group(c.expected as u64)
                        )
                    }),
                ]
            })
            .collect(),
        notes: {
            let mut n = r.notes.clone();
            n.push(format!("verdict: {}", if r.pass { "PASS" } else { "FAIL" }));
            n
        },
    });
    out
}
