//! What `truesize inspect` found in a checkpoint, and its tables.

use super::render::{Render, View};
use super::section::{result_label, s, Section};
use crate::check::Check;
use crate::checkpoint::safetensors::FileHeader;
use crate::measure::census::Census;
use crate::units::{group, Bytes};
use serde::Serialize;

/// What `inspect` found. `census.*` keys mean what they mean in `verify`: parameters only.
#[derive(Debug, Clone, Serialize)]
pub struct InspectReport {
    pub command: &'static str,
    pub path: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub config: Option<String>,
    pub files: Vec<FileHeader>,
    /// Σ file sizes.
    pub file_bytes: u64,
    /// Σ JSON header lengths.
    pub header_bytes: u64,
    /// Σ tensor data bytes.
    pub data_bytes: u64,
    /// Σ (8 + header): what the files hold beyond the raw tensor bytes.
    pub overhead_bytes: u64,
    /// overhead / file bytes.
    pub overhead_fraction: f64,
    /// Parameter tensors (buffers and a duplicated tied head excluded).
    pub census: Census,
    /// Every tensor in the files, buffers included.
    pub file_tensors: usize,
    pub file_numel: u64,
    /// Recognised non-parameter buffers.
    pub buffers: Vec<String>,
    pub buffers_numel: u64,
    /// `lm_head.weight` stored although the config ties it to the token embedding.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duplicate_tied_head: Option<String>,
    /// Against the genuine model (with a config).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub missing: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub unexpected: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub misshaped: Vec<String>,
    /// Tensors stored in more than one file.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub duplicated: Vec<String>,
    /// Exact parameter count of the config, when given.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expected_params: Option<u64>,
    pub checks: Vec<Check>,
    pub pass: bool,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
}

impl Render for InspectReport {
    fn sections(&self, _view: View) -> Vec<Section> {
        sections(self)
    }
}

/// The report as titled tables (no arithmetic: every number is a field of the report).
pub fn sections(r: &InspectReport) -> Vec<Section> {
    let mut out = Vec::new();
    out.push(Section {
        title: format!("Checkpoint {}", r.path),
        header: vec![
            s("file"),
            s("tensors"),
            s("file bytes"),
            s("header bytes"),
            s("data bytes"),
        ],
        rows: r
            .files
            .iter()
            .map(|f| {
                vec![
                    f.path.clone(),
                    group(f.tensors as u64),
                    group(f.file_bytes),
                    group(f.header_bytes),
                    group(f.data_bytes),
                ]
            })
            .collect(),
        notes: vec![
            format!("total {}", Bytes(r.file_bytes)),
            format!(
                "overhead (8-byte length + JSON header per file): {} B = {:.4}% of the files",
                group(r.overhead_bytes),
                r.overhead_fraction * 100.0
            ),
        ],
    });
    let c = &r.census;
    let mut rows: Vec<Vec<String>> = c
        .components
        .iter()
        .filter(|cc| cc.params > 0)
        .map(|cc| vec![s(cc.component.name()), group(cc.params)])
        .collect();
    rows.push(vec![s("total (census.numel)"), group(c.numel)]);
    if let Some(e) = r.expected_params {
        rows.push(vec![s("exact estimate from the config"), group(e)]);
    }
    let mut notes = vec![
        format!(
            "{} parameter tensors, dtype {}, {}",
            c.tensors,
            c.dtype,
            Bytes(c.bytes)
        ),
        format!(
            "all tensors in the files: {} ({} elements)",
            r.file_tensors,
            group(r.file_numel)
        ),
    ];
    notes.extend(r.notes.iter().cloned());
    out.push(Section {
        title: "Parameters per component (from the headers)".into(),
        header: vec![s("component"), s("numel")],
        rows,
        notes,
    });
    if !r.checks.is_empty() {
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
            notes: vec![format!("verdict: {}", if r.pass { "PASS" } else { "FAIL" })],
        });
    }
    out
}
