//! `truesize inspect FILE.gguf`: what a GGUF file holds, from its header only, checked against
//! the genuine model its metadata describes.

use super::gguf::{self, GgufHeader, MetaValue};
use crate::check::{all_pass, Check};
use crate::config::ModelConfig;
use crate::error::Result;
use crate::estimate::serve::weights;
use crate::units::group;
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::Path;

/// What `truesize inspect FILE.gguf` found.
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
    pub by_type: BTreeMap<&'static str, weights::TypeCount>,
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

/// Inspect a GGUF file; with a config from its metadata, compare it with the genuine model.
pub fn inspect(path: &Path) -> Result<GgufInspectReport> {
    let h = gguf::read_header(path)?;
    let mut checks = vec![Check::exact(
        "file size == header + alignment padding + tensor data",
        h.header_bytes + h.padding_bytes + h.data_bytes,
        h.file_bytes,
    )
    .with_note(format!(
        "{} + {} + {} B{}",
        group(h.header_bytes),
        group(h.padding_bytes),
        group(h.data_bytes),
        if h.trailing_bytes > 0 {
            format!(
                "; {} trailing bytes after the last tensor",
                h.trailing_bytes
            )
        } else {
            String::new()
        }
    ))];
    let mut notes = Vec::new();
    let (cfg, expected, params_numel, missing, unexpected, misshaped) =
        match gguf::config_from_header(&h) {
            Ok(cfg) => {
                let r = compare(&cfg, &h)?;
                checks.extend(r.checks);
                notes.extend(r.notes);
                (
                    Some(cfg),
                    Some(r.expected),
                    Some(r.params_numel),
                    r.missing,
                    r.unexpected,
                    r.misshaped,
                )
            }
            Err(e) => {
                notes.push(format!("structure only: {e}"));
                (None, None, None, vec![], vec![], vec![])
            }
        };
    let by_type = h.by_type();
    let file_numel: u64 = h.tensors.iter().map(|t| t.numel).sum();
    Ok(GgufInspectReport {
        command: "inspect",
        path: path.display().to_string(),
        format: "gguf",
        version: h.version,
        architecture: h.architecture().map(str::to_string),
        name: h
            .meta("general.name")
            .and_then(MetaValue::as_str)
            .map(str::to_string),
        file_bytes: h.file_bytes,
        header_bytes: h.header_bytes,
        padding_bytes: h.padding_bytes,
        data_bytes: h.data_bytes,
        alignment: h.alignment,
        metadata_entries: h.metadata.len(),
        file_tensors: h.tensors.len(),
        file_numel,
        bits_per_weight: h.data_bytes as f64 * 8.0 / file_numel.max(1) as f64,
        tokenizer_tokens: h
            .meta("tokenizer.ggml.tokens")
            .and_then(MetaValue::array_len),
        by_type,
        config: cfg,
        expected_params: expected,
        params_numel,
        missing,
        unexpected,
        misshaped,
        pass: all_pass(&checks),
        checks,
        notes,
    })
}

struct Comparison {
    checks: Vec<Check>,
    notes: Vec<String>,
    expected: u64,
    params_numel: u64,
    missing: Vec<String>,
    unexpected: Vec<String>,
    misshaped: Vec<String>,
}

/// The file's tensors against the genuine model's GGUF layout.
fn compare(cfg: &ModelConfig, h: &GgufHeader) -> Result<Comparison> {
    let layout = weights::gguf_layout(cfg)?;
    let expected = crate::estimate::params::estimate(cfg)?.total;
    let (mut missing, mut misshaped, mut unexpected) = (Vec::new(), Vec::new(), Vec::new());
    let mut params_numel = 0u64;
    for t in &layout {
        match h.tensor(&t.name) {
            None => missing.push(t.name.clone()),
            Some(f) if f.shape != t.shape => {
                misshaped.push(format!("{}: {:?}, expected {:?}", t.name, f.shape, t.shape))
            }
            Some(f) => params_numel += f.numel,
        }
    }
    let mut buffers = Vec::new();
    for f in &h.tensors {
        if !layout.iter().any(|t| t.name == f.name) {
            if gguf::is_buffer(cfg, &f.name) {
                buffers.push(f.name.clone());
            } else {
                unexpected.push(f.name.clone());
            }
        }
    }
    let mut checks = vec![
        Check::holds(
            "every parameter of the model is in the file",
            missing.is_empty(),
            if missing.is_empty() {
                format!("{} of {}", layout.len(), layout.len())
            } else {
                format!("missing: {}", missing.join(", "))
            },
        ),
        Check::holds(
            "no unexpected tensors",
            unexpected.is_empty(),
            if unexpected.is_empty() {
                "every tensor is a parameter or a known buffer".into()
            } else {
                format!("unexpected: {}", unexpected.join(", "))
            },
        ),
        Check::holds(
            "every shape matches the model",
            misshaped.is_empty(),
            if misshaped.is_empty() {
                "all shapes match".into()
            } else {
                misshaped.join("; ")
            },
        ),
    ];
    if missing.is_empty() && misshaped.is_empty() {
        checks.push(Check::exact(
            "parameter numel == exact estimate",
            params_numel,
            expected,
        ));
    }
    let mut notes = Vec::new();
    if !buffers.is_empty() {
        notes.push(format!(
            "not parameters of the HF model: {} (llama.cpp's RoPE factors, or a GPT-2 file's copy of its tied head)",
            buffers.join(", ")
        ));
    }
    if let Some(n) = h
        .meta("tokenizer.ggml.tokens")
        .and_then(MetaValue::array_len)
    {
        if n != cfg.vocab_size as u64 {
            notes.push(format!(
                "tokenizer.ggml.tokens has {n} entries, token_embd {} rows",
                cfg.vocab_size
            ));
        }
    } else {
        notes.push("no tokenizer.ggml.tokens: llama.cpp would refuse to load this file".into());
    }
    Ok(Comparison {
        checks,
        notes,
        expected,
        params_numel,
        missing,
        unexpected,
        misshaped,
    })
}
