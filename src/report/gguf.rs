//! What `truesize inspect FILE.gguf` found, and its tables.

use super::render::{Render, View};
use super::section::{result_label, s, Section};
use crate::check::Check;
use crate::config::ModelConfig;
use crate::estimate::serve::weights::TypeCount;
use crate::units::{group, Bytes};
use serde::Serialize;
use std::collections::BTreeMap;

#[derive(Debug, Clone, Serialize)]
pub struct GgufInspectReport {
    pub command: &'static str,
    pub path: String,
    pub format: &'static str,
    pub version: u32,
    pub architecture: Option<String>,
    /// `general.name`, when present.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub file_bytes: u64,
    pub header_bytes: u64,
    pub padding_bytes: u64,
    pub data_bytes: u64,
    pub alignment: u64,
    pub metadata_entries: usize,
    /// Every tensor in the file.
    pub file_tensors: usize,
    pub file_numel: u64,
    /// Per GGML type name: tensors, numel, bytes.
    pub by_type: BTreeMap<&'static str, TypeCount>,
    /// data bytes · 8 / numel.
    pub bits_per_weight: f64,
    /// Vocabulary entries in `tokenizer.ggml.tokens`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tokenizer_tokens: Option<u64>,
    /// The config read from the metadata.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub config: Option<ModelConfig>,
    /// Parameters of that config (HF's count: a stored copy of a tied head excluded).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expected_params: Option<u64>,
    /// Parameter elements in the file (tensors that are parameters of the model).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub params_numel: Option<u64>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub missing: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub unexpected: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub misshaped: Vec<String>,
    pub checks: Vec<Check>,
    pub pass: bool,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
}

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
