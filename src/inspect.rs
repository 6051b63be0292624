//! `truesize inspect`: what a real checkpoint holds, read from the safetensors headers only.
//!
//! A safetensors file is `u64 little-endian header length n` + `n` bytes of JSON + raw data.
//! This module opens each file, reads those 8 + n bytes and nothing else, and validates the
//! header as a hostile input: every length is checked against the file before anything is
//! allocated, every product uses checked arithmetic, and every failure is an `Error::File`
//! naming the file and the problem (exit 2), never a panic.
//!
//! With a config (given, or the folder's `config.json`) the tensors are compared with the
//! genuine model's parameter list from `model::build::shapes_only`.

use crate::cli::{Format, InspectArgs};
use crate::commands::verdict;
use crate::config::{self, Arch, ConfigSource, ModelConfig};
use crate::error::{Error, Result};
use crate::estimate::params::{self, Component};
use crate::measure::census::{Census, TensorRow};
use crate::report::sections::Section;
use crate::units::{group, Bytes};
use crate::verify::{all_pass, Check};
use serde::de::{Deserializer, MapAccess, Visitor};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};

/// Largest header accepted: the safetensors crate's own `MAX_HEADER_SIZE` (100,000,000 bytes).
pub const MAX_HEADER_BYTES: u64 = 100_000_000;
/// Bytes of the header-length prefix (safetensors format: a little-endian u64).
pub const LEN_PREFIX_BYTES: u64 = 8;
/// Largest `model.safetensors.index.json` read (real ones are well under 1 MB even for 405B).
pub const MAX_INDEX_BYTES: u64 = 64 << 20;
/// The index's name in an HF folder (transformers `SAFE_WEIGHTS_INDEX_NAME`).
pub const INDEX_NAME: &str = "model.safetensors.index.json";
/// The single-file checkpoint's name in an HF folder (transformers `SAFE_WEIGHTS_NAME`).
pub const SINGLE_NAME: &str = "model.safetensors";

/// Bits per element of every dtype the safetensors format defines (safetensors 0.8
/// `Dtype::bitsize`); anything else in a header is invalid.
const DTYPE_BITS: &[(&str, u64)] = &[
    ("BOOL", 8),
    ("F4", 4),
    ("F6_E2M3", 6),
    ("F6_E3M2", 6),
    ("U8", 8),
    ("I8", 8),
    ("F8_E5M2", 8),
    ("F8_E4M3", 8),
    ("F8_E8M0", 8),
    ("F8_E4M3FNUZ", 8),
    ("F8_E5M2FNUZ", 8),
    ("I16", 16),
    ("U16", 16),
    ("F16", 16),
    ("BF16", 16),
    ("I32", 32),
    ("U32", 32),
    ("F32", 32),
    ("C64", 64),
    ("F64", 64),
    ("I64", 64),
    ("U64", 64),
];

/// One tensor as its header describes it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HeaderTensor {
    pub name: String,
    /// safetensors dtype name (`F32`, `BF16`, ...).
    pub dtype: String,
    pub shape: Vec<u64>,
    pub numel: u64,
    pub bytes: u64,
    /// Byte range within the data section.
    pub data_offsets: (u64, u64),
}

/// One file's header, validated.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FileHeader {
    pub path: String,
    pub file_bytes: u64,
    /// JSON header length (the stored u64).
    pub header_bytes: u64,
    /// file − 8 − header.
    pub data_bytes: u64,
    pub tensors: usize,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, String>,
    #[serde(skip)]
    pub entries: Vec<HeaderTensor>,
}

fn bad(path: &Path, why: impl fmt::Display) -> Error {
    Error::file(path, why)
}

/// JSON object entries in file order, duplicates kept (serde_json's map would keep only one).
struct Entries(Vec<(String, serde_json::Value)>);

impl<'de> Deserialize<'de> for Entries {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Entries;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object of tensor name -> {dtype, shape, data_offsets}")
            }
            fn visit_map<A: MapAccess<'de>>(
                self,
                mut m: A,
            ) -> std::result::Result<Entries, A::Error> {
                let mut v = Vec::new();
                while let Some((k, val)) = m.next_entry::<String, serde_json::Value>()? {
                    v.push((k, val));
                }
                Ok(Entries(v))
            }
        }
        d.deserialize_map(V)
    }
}

#[derive(Deserialize)]
struct RawInfo {
    dtype: String,
    shape: Vec<u64>,
    data_offsets: (u64, u64),
}

/// Read and validate the header of one `.safetensors` file without touching its data.
pub fn read_header(path: &Path) -> Result<FileHeader> {
    let mut f = std::fs::File::open(path).map_err(|e| bad(path, format!("cannot open: {e}")))?;
    let file_bytes = f
        .metadata()
        .map_err(|e| bad(path, format!("cannot stat: {e}")))?
        .len();
    if file_bytes < LEN_PREFIX_BYTES {
        return Err(bad(
            path,
            format!(
                "truncated: the file is {file_bytes} bytes, shorter than the 8-byte header length"
            ),
        ));
    }
    let mut len = [0u8; LEN_PREFIX_BYTES as usize];
    f.read_exact(&mut len)
        .map_err(|e| bad(path, format!("cannot read the header length: {e}")))?;
    let n = u64::from_le_bytes(len);
    if n > MAX_HEADER_BYTES {
        return Err(bad(
            path,
            format!("header length = {n} bytes is absurd (limit {MAX_HEADER_BYTES}): not a safetensors file, or corrupt"),
        ));
    }
    let data_start = LEN_PREFIX_BYTES + n;
    if data_start > file_bytes {
        return Err(bad(
            path,
            format!(
                "header length = {n} bytes runs past the end of the file ({file_bytes} bytes): truncated or not a safetensors file"
            ),
        ));
    }
    let data_bytes = file_bytes - data_start;
    // n ≤ 100 MB and ≤ the file's size: a bounded allocation.
    let mut buf = vec![0u8; n as usize];
    f.read_exact(&mut buf)
        .map_err(|e| bad(path, format!("cannot read the {n}-byte header: {e}")))?;
    drop(f);
    let text = std::str::from_utf8(&buf).map_err(|e| {
        bad(
            path,
            format!("header is not valid UTF-8 (byte {})", e.valid_up_to()),
        )
    })?;
    let Entries(entries) = serde_json::from_str(text).map_err(|e| {
        bad(
            path,
            format!("header is not a valid safetensors JSON object: {e}"),
        )
    })?;

    let mut metadata = BTreeMap::new();
    let mut tensors: Vec<HeaderTensor> = Vec::with_capacity(entries.len());
    let mut seen = BTreeSet::new();
    for (name, value) in entries {
        if !seen.insert(name.clone()) {
            return Err(bad(
                path,
                format!("tensor {name:?} appears twice in the header"),
            ));
        }
        if name == "__metadata__" {
            metadata = serde_json::from_value(value).map_err(|e| {
                bad(
                    path,
                    format!("__metadata__ must map strings to strings: {e}"),
                )
            })?;
            continue;
        }
        let raw: RawInfo = serde_json::from_value(value).map_err(|e| {
            bad(
                path,
                format!("tensor {name:?}: invalid entry (needs dtype, shape, data_offsets): {e}"),
            )
        })?;
        let Some(&(_, bits)) = DTYPE_BITS.iter().find(|(d, _)| *d == raw.dtype) else {
            return Err(bad(
                path,
                format!(
                    "tensor {name:?}: dtype = {:?} is not a safetensors dtype",
                    raw.dtype
                ),
            ));
        };
        let numel = raw
            .shape
            .iter()
            .try_fold(1u64, |a, &d| a.checked_mul(d))
            .ok_or_else(|| {
                bad(
                    path,
                    format!("tensor {name:?}: shape {:?} overflows 64 bits", raw.shape),
                )
            })?;
        let nbits = numel.checked_mul(bits).ok_or_else(|| {
            bad(
                path,
                format!(
                    "tensor {name:?}: size of shape {:?} overflows 64 bits",
                    raw.shape
                ),
            )
        })?;
        if nbits % 8 != 0 {
            return Err(bad(
                path,
                format!("tensor {name:?}: {numel} × {bits} bits is not a whole number of bytes"),
            ));
        }
        let bytes = nbits / 8;
        let (s, e) = raw.data_offsets;
        if e < s {
            return Err(bad(
                path,
                format!("tensor {name:?}: data_offsets [{s}, {e}] end before they start"),
            ));
        }
        if e > data_bytes {
            return Err(bad(
                path,
                format!(
                    "tensor {name:?}: data_offsets [{s}, {e}] run past the data section ({data_bytes} bytes): truncated or corrupt"
                ),
            ));
        }
        if e - s != bytes {
            return Err(bad(
                path,
                format!(
                    "tensor {name:?}: data_offsets [{s}, {e}] hold {} bytes but shape {:?} × {} needs {bytes}",
                    e - s,
                    raw.shape,
                    raw.dtype
                ),
            ));
        }
        tensors.push(HeaderTensor {
            name,
            dtype: raw.dtype,
            shape: raw.shape,
            numel,
            bytes,
            data_offsets: (s, e),
        });
    }
    // Layout: sorted by offset, tensors must tile the data section exactly.
    let mut order: Vec<&HeaderTensor> = tensors.iter().collect();
    order.sort_by_key(|t| t.data_offsets);
    let mut pos = 0u64;
    let mut prev: Option<&str> = None;
    for t in &order {
        let (s, e) = t.data_offsets;
        if s < pos {
            return Err(bad(
                path,
                format!(
                    "tensors {:?} and {:?} overlap (bytes {s}..{pos} of the data section)",
                    prev.unwrap_or(""),
                    t.name
                ),
            ));
        }
        if s > pos {
            return Err(bad(
                path,
                format!(
                    "data bytes {pos}..{s} belong to no tensor (before {:?}): corrupt",
                    t.name
                ),
            ));
        }
        pos = e;
        prev = Some(&t.name);
    }
    if pos != data_bytes {
        return Err(bad(
            path,
            format!(
                "the tensors cover {pos} data bytes but the file holds {data_bytes} after the header: {}",
                if pos < data_bytes { "trailing bytes" } else { "truncated" }
            ),
        ));
    }
    tensors.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(FileHeader {
        path: path.display().to_string(),
        file_bytes,
        header_bytes: n,
        data_bytes,
        tensors: tensors.len(),
        metadata,
        entries: tensors,
    })
}

#[derive(Deserialize)]
struct Index {
    weight_map: BTreeMap<String, String>,
}

/// What a PATH argument names.
struct Resolved {
    files: Vec<PathBuf>,
    /// The index file and its weight map, when sharded.
    index: Option<(PathBuf, BTreeMap<String, String>)>,
    /// The folder's config.json, when there is one.
    config: Option<PathBuf>,
}

/// The files of a checkpoint and the folder's config.json (if any): a file, an index, or a folder.
fn resolve(path: &Path) -> Result<Resolved> {
    let (dir, index) = if path.is_dir() {
        let single = path.join(SINGLE_NAME);
        let cfg = Some(path.join("config.json")).filter(|p| p.is_file());
        if single.is_file() {
            return Ok(Resolved {
                files: vec![single],
                index: None,
                config: cfg,
            });
        }
        let index = path.join(INDEX_NAME);
        if !index.is_file() {
            return Err(bad(
                path,
                format!("folder has no {SINGLE_NAME} or {INDEX_NAME}"),
            ));
        }
        (path.to_path_buf(), index)
    } else if path.is_file() {
        if path
            .file_name()
            .is_some_and(|n| n.to_string_lossy().ends_with(".json"))
        {
            (
                path.parent().unwrap_or(Path::new(".")).to_path_buf(),
                path.to_path_buf(),
            )
        } else {
            return Ok(Resolved {
                files: vec![path.to_path_buf()],
                index: None,
                config: None,
            });
        }
    } else {
        return Err(bad(path, "no such file or folder"));
    };
    let size = std::fs::metadata(&index).map_err(|e| bad(&index, e))?.len();
    if size > MAX_INDEX_BYTES {
        return Err(bad(
            &index,
            format!("index is {size} bytes: absurd (limit {MAX_INDEX_BYTES})"),
        ));
    }
    let text = std::fs::read(&index).map_err(|e| bad(&index, format!("cannot read: {e}")))?;
    let text = String::from_utf8(text).map_err(|_| bad(&index, "is not valid UTF-8"))?;
    let parsed: Index = serde_json::from_str(&text).map_err(|e| {
        bad(
            &index,
            format!("not a safetensors index (needs weight_map): {e}"),
        )
    })?;
    let mut shards = BTreeSet::new();
    for (tensor, file) in &parsed.weight_map {
        let plain = Path::new(file)
            .file_name()
            .is_some_and(|n| n == std::ffi::OsStr::new(file));
        if !plain || file == ".." {
            return Err(bad(
                &index,
                format!("weight_map[{tensor:?}] = {file:?}: shard must be a plain file name in the same folder"),
            ));
        }
        shards.insert(file.clone());
    }
    if shards.is_empty() {
        return Err(bad(&index, "weight_map is empty"));
    }
    let mut files = Vec::new();
    for s in shards {
        let f = dir.join(&s);
        if !f.is_file() {
            return Err(bad(
                &index,
                format!("names shard {s:?}, which does not exist"),
            ));
        }
        files.push(f);
    }
    let cfg = Some(dir.join("config.json")).filter(|p| p.is_file());
    Ok(Resolved {
        files,
        index: Some((index, parsed.weight_map)),
        config: cfg,
    })
}

/// A tensor that is not a parameter: GPT-2's causal-mask buffers (`attn.bias` [1, 1, n, n] and
/// `attn.masked_bias`, saved by transformers < 4.31) and RoPE's `rotary_emb.inv_freq`
/// (Llama-2 checkpoints). HF's hub counts them: 137,022,720 for GPT-2 instead of 124,439,808.
pub fn is_buffer(name: &str) -> bool {
    name.ends_with(".attn.bias")
        || name.ends_with(".attn.masked_bias")
        || name.ends_with("rotary_emb.inv_freq")
}

/// HF hub GPT-2 checkpoints have no `transformer.` prefix (`h.0.attn.c_attn.weight`, `wte.weight`).
fn normalise(name: &str, arch: Option<Arch>) -> String {
    let gpt2_bare = ["h.", "wte.", "wpe.", "ln_f."]
        .iter()
        .any(|p| name.starts_with(p));
    if gpt2_bare && arch != Some(Arch::Llama) {
        format!("transformer.{name}")
    } else {
        name.to_string()
    }
}

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
    /// Exact parameter count of the config, when given.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expected_params: Option<u64>,
    pub checks: Vec<Check>,
    pub pass: bool,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
}

/// Inspect `path`; with `config` (or the folder's config.json) compare with the genuine model.
pub fn inspect(path: &Path, config_path: Option<&Path>) -> Result<InspectReport> {
    let Resolved {
        files,
        index,
        config: folder_cfg,
    } = resolve(path)?;
    let cfg: Option<ModelConfig> = match config_path.or(folder_cfg.as_deref()) {
        Some(p) => Some(config::load(ConfigSource::Path(p))?),
        None => None,
    };
    let arch = cfg.as_ref().map(|c| c.arch);
    let mut headers = Vec::with_capacity(files.len());
    for f in &files {
        headers.push(read_header(f)?);
    }
    let mut notes = Vec::new();
    let mut checks = Vec::new();

    // All tensors, normalised names, each once across shards.
    let mut all: BTreeMap<String, (HeaderTensor, String)> = BTreeMap::new();
    for h in &headers {
        for t in &h.entries {
            let name = normalise(&t.name, arch);
            if let Some((_, other)) = all.get(&name) {
                return Err(bad(
                    Path::new(&h.path),
                    format!("tensor {name:?} is also stored in {other}"),
                ));
            }
            all.insert(name, (t.clone(), h.path.clone()));
        }
    }
    if let Some((index_path, map)) = &index {
        // Every tensor the index names must be in the shard it names, and vice versa.
        let mut wrong = Vec::new();
        for (tensor, shard) in map {
            let name = normalise(tensor, arch);
            match all.get(&name) {
                Some((_, file))
                    if Path::new(file).file_name() == Some(std::ffi::OsStr::new(shard)) => {}
                Some((_, file)) => {
                    wrong.push(format!("{tensor} (index: {shard}, found in {file})"))
                }
                None => wrong.push(format!("{tensor} (index: {shard}, not in any shard)")),
            }
        }
        let unindexed: Vec<String> = headers
            .iter()
            .flat_map(|h| h.entries.iter())
            .filter(|t| !map.contains_key(&t.name))
            .map(|t| t.name.clone())
            .collect();
        checks.push(Check::holds(
            "index matches the shards",
            wrong.is_empty() && unindexed.is_empty(),
            if wrong.is_empty() && unindexed.is_empty() {
                format!("{} tensors in {} shards", map.len(), headers.len())
            } else {
                format!(
                    "{}: {}",
                    index_path.display(),
                    wrong
                        .into_iter()
                        .chain(
                            unindexed
                                .into_iter()
                                .map(|u| format!("{u} (not in the index)"))
                        )
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            },
        ));
    }

    let mut buffers = Vec::new();
    let mut buffers_numel = 0u64;
    let mut duplicate_tied_head = None;
    let mut rows = Vec::new();
    let mut param_bytes = 0u64;
    let tied = cfg.as_ref().is_some_and(|c| c.tie_embeddings);
    for (name, (t, _)) in &all {
        if is_buffer(name) {
            buffers.push(name.clone());
            buffers_numel = buffers_numel.saturating_add(t.numel);
            continue;
        }
        if tied && name == "lm_head.weight" {
            duplicate_tied_head = Some(name.clone());
            continue;
        }
        param_bytes = param_bytes.saturating_add(t.bytes);
        rows.push(TensorRow {
            name: name.clone(),
            shape: t.shape.iter().map(|&d| d as usize).collect(),
            dtype: t.dtype.to_ascii_lowercase(),
            numel: t.numel,
            component: Component::of_tensor(name),
        });
    }
    let mut census = Census::from_rows(rows, None, false);
    // Census::from_rows sizes elements by candle's dtypes; the header's sizes are exact for all.
    census.bytes = param_bytes;

    let (mut missing, mut unexpected, mut misshaped) = (Vec::new(), Vec::new(), Vec::new());
    let mut expected_params = None;
    if let Some(cfg) = &cfg {
        let p = params::estimate(cfg)?;
        expected_params = Some(p.total);
        let specs = crate::model::build::shapes_only(cfg, candle_core::DType::F32)?;
        let want: BTreeMap<&str, &[usize]> = specs
            .iter()
            .map(|s| (s.name.as_str(), s.shape.as_slice()))
            .collect();
        for (name, shape) in &want {
            match all.get(*name) {
                None => missing.push(name.to_string()),
                Some((t, _)) => {
                    let got: Vec<usize> = t.shape.iter().map(|&d| d as usize).collect();
                    if got.as_slice() != *shape {
                        misshaped.push(format!("{name}: {got:?}, expected {shape:?}"));
                    }
                }
            }
        }
        for name in all.keys() {
            let known = want.contains_key(name.as_str())
                || is_buffer(name)
                || duplicate_tied_head.as_deref() == Some(name);
            if !known {
                unexpected.push(name.clone());
            }
        }
        checks.push(Check::holds(
            "every parameter of the model is in the checkpoint",
            missing.is_empty(),
            if missing.is_empty() {
                format!("{} of {}", want.len(), want.len())
            } else {
                format!("missing: {}", missing.join(", "))
            },
        ));
        checks.push(Check::holds(
            "no unexpected tensors",
            unexpected.is_empty(),
            if unexpected.is_empty() {
                "every tensor is a parameter or a known buffer".to_string()
            } else {
                format!("unexpected: {}", unexpected.join(", "))
            },
        ));
        checks.push(Check::holds(
            "every shape matches the model",
            misshaped.is_empty(),
            if misshaped.is_empty() {
                "all shapes match".to_string()
            } else {
                misshaped.join("; ")
            },
        ));
        checks.push(Check::exact(
            "census numel == exact estimate",
            census.numel,
            p.total,
        ));
        let tied_note = match (&duplicate_tied_head, all.get("lm_head.weight")) {
            (Some(_), Some((t, _))) => Some(format!(
                "tied head stored twice: lm_head.weight duplicates the token embedding, {} wasted",
                Bytes(t.bytes)
            )),
            _ if cfg.tie_embeddings => {
                Some("tied head stored once (no lm_head.weight)".to_string())
            }
            _ => None,
        };
        if let Some(n) = tied_note {
            checks.push(
                Check::holds(
                    "tied weights stored once",
                    duplicate_tied_head.is_none(),
                    n.clone(),
                )
                .informational(n),
            );
        }
    } else {
        notes.push(
            "no config given (and no config.json beside the checkpoint): structure only; pass --config to compare with the model"
                .to_string(),
        );
    }
    if !buffers.is_empty() {
        notes.push(format!(
            "{} non-parameter buffers ({} elements) not counted as parameters: {}",
            buffers.len(),
            group(buffers_numel),
            buffers.join(", ")
        ));
    }
    if !census.unclassified.is_empty() && cfg.is_none() {
        notes.push(format!(
            "tensors matching no component: {}",
            census.unclassified.join(", ")
        ));
    }
    let file_bytes: u64 = headers.iter().map(|h| h.file_bytes).sum();
    let header_bytes: u64 = headers.iter().map(|h| h.header_bytes).sum();
    let data_bytes: u64 = headers.iter().map(|h| h.data_bytes).sum();
    let overhead_bytes = header_bytes + LEN_PREFIX_BYTES * headers.len() as u64;
    let pass = all_pass(&checks);
    Ok(InspectReport {
        command: "inspect",
        path: path.display().to_string(),
        config: cfg.as_ref().map(|c| c.name.clone()),
        file_tensors: all.len(),
        file_numel: all.values().map(|(t, _)| t.numel).sum(),
        files: headers,
        file_bytes,
        header_bytes,
        data_bytes,
        overhead_bytes,
        overhead_fraction: overhead_bytes as f64 / file_bytes.max(1) as f64,
        census,
        buffers,
        buffers_numel,
        duplicate_tied_head,
        missing,
        unexpected,
        misshaped,
        expected_params,
        checks,
        pass,
        notes,
    })
}

fn s(x: impl ToString) -> String {
    x.to_string()
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
                        match (c.pass, c.gating) {
                            (true, _) => s("pass"),
                            (false, true) => s("FAIL"),
                            (false, false) => s("info"),
                        },
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

/// `truesize inspect PATH [--config PATH] [--format F]`.
pub fn run(a: InspectArgs) -> Result<u8> {
    if crate::checkpoint::gguf::has_magic(&a.path) {
        return run_gguf(&a);
    }
    let r = inspect(&a.path, a.config.as_deref())?;
    let text = match a.format {
        Format::Json => {
            serde_json::to_string_pretty(&r).map_err(|e| Error::Internal(e.into()))? + "\n"
        }
        Format::Table => crate::report::table::render_sections(&sections(&r)),
        Format::Markdown => crate::report::markdown::render_sections(&sections(&r)),
    };
    print!("{text}");
    Ok(verdict(r.pass))
}

fn run_gguf(a: &InspectArgs) -> Result<u8> {
    use crate::checkpoint::gguf_inspect;
    if let Some(c) = &a.config {
        return Err(Error::field(
            "command line",
            "--config",
            c.display(),
            "a GGUF file carries its own config in its metadata",
        ));
    }
    let r = gguf_inspect::inspect(&a.path)?;
    let text = match a.format {
        Format::Json => {
            serde_json::to_string_pretty(&r).map_err(|e| Error::Internal(e.into()))? + "\n"
        }
        Format::Table => crate::report::table::render_sections(&gguf_inspect::sections(&r)),
        Format::Markdown => crate::report::markdown::render_sections(&gguf_inspect::sections(&r)),
    };
    print!("{text}");
    Ok(verdict(r.pass))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, header: &str, data_len: usize) -> PathBuf {
        let p = dir.join(name);
        let mut b = (header.len() as u64).to_le_bytes().to_vec();
        b.extend_from_slice(header.as_bytes());
        b.resize(b.len() + data_len, 0);
        std::fs::write(&p, b).unwrap();
        p
    }

    fn err(dir: &Path, header: &str, data_len: usize) -> String {
        let p = write(dir, "x.safetensors", header, data_len);
        read_header(&p).unwrap_err().to_string()
    }

    #[test]
    fn hostile_headers_are_errors_not_panics() {
        let d = tempfile::tempdir().unwrap();
        let d = d.path();
        let ok = r#"{"a":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]}}"#;
        assert_eq!(
            read_header(&write(d, "ok.safetensors", ok, 16))
                .unwrap()
                .entries[0]
                .numel,
            4
        );
        assert!(err(d, ok, 8).contains("run past the data section"));
        assert!(err(d, ok, 20).contains("trailing bytes"));
        assert!(err(
            d,
            r#"{"a":{"dtype":"F33","shape":[1],"data_offsets":[0,4]}}"#,
            4
        )
        .contains("not a safetensors dtype"));
        assert!(err(
            d,
            r#"{"a":{"dtype":"F32","shape":[4294967296,4294967296,16],"data_offsets":[0,4]}}"#,
            4
        )
        .contains("overflows"));
        assert!(err(
            d,
            r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#,
            12
        )
        .contains("overlap"));
        assert!(err(
            d,
            r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}}"#,
            4
        )
        .contains("needs 8"));
        assert!(err(d, "not json", 0).contains("not a valid safetensors JSON"));
        assert!(err(
            d,
            r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#,
            8
        )
        .contains("twice"));
        // header length beyond the file, absurd length, truncated prefix, non-UTF-8
        let p = d.join("y.safetensors");
        std::fs::write(&p, [200u8, 0, 0, 0, 0, 0, 0, 0, b'{']).unwrap();
        assert!(read_header(&p)
            .unwrap_err()
            .to_string()
            .contains("runs past the end"));
        std::fs::write(&p, u64::MAX.to_le_bytes()).unwrap();
        assert!(read_header(&p).unwrap_err().to_string().contains("absurd"));
        std::fs::write(&p, [1u8, 2, 3]).unwrap();
        assert!(read_header(&p)
            .unwrap_err()
            .to_string()
            .contains("truncated"));
        std::fs::write(&p, [2u8, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xfe]).unwrap();
        assert!(read_header(&p).unwrap_err().to_string().contains("UTF-8"));
    }

    #[test]
    fn buffers_and_hub_names() {
        assert!(is_buffer("h.0.attn.bias"));
        assert!(is_buffer("transformer.h.11.attn.masked_bias"));
        assert!(is_buffer("model.layers.0.self_attn.rotary_emb.inv_freq"));
        assert!(!is_buffer("transformer.h.0.attn.c_attn.bias"));
        assert_eq!(
            normalise("h.0.mlp.c_fc.weight", None),
            "transformer.h.0.mlp.c_fc.weight"
        );
        assert_eq!(
            normalise("wte.weight", Some(Arch::Gpt2)),
            "transformer.wte.weight"
        );
        assert_eq!(
            normalise("model.norm.weight", Some(Arch::Llama)),
            "model.norm.weight"
        );
    }
}
