//! The checkpoint checker: what the files hold, classified against the model family's tensor
//! list, and every structural fault as a [`Check`]. `inspect` and `verify --model` both run it,
//! so one fault gets one verdict everywhere (see the table in `checkpoint/mod.rs`).

use super::resolve::{resolve, Index, Resolved};
use super::safetensors::{read_header, FileHeader, HeaderTensor, LEN_PREFIX_BYTES};
use crate::check::Check;
use crate::config::ModelConfig;
use crate::error::Result;
use crate::estimate::params;
use crate::family::{self, Component, Family};
use crate::units::Bytes;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// A checkpoint on disk with every header read and validated (nothing else read).
#[derive(Debug, Clone)]
pub struct Checkpoint {
    /// What the user named.
    pub path: PathBuf,
    pub index: Option<Index>,
    /// The folder's `config.json`, when there is one.
    pub folder_config: Option<PathBuf>,
    /// One per file, in the order resolved.
    pub headers: Vec<FileHeader>,
}

impl Checkpoint {
    /// Resolve `path` and read every file's header. Errors (exit 2) name the file.
    pub fn open(path: &Path) -> Result<Checkpoint> {
        let Resolved {
            files,
            index,
            config,
        } = resolve(path)?;
        let headers = files
            .iter()
            .map(|f| read_header(f))
            .collect::<Result<Vec<_>>>()?;
        Ok(Checkpoint {
            path: path.to_path_buf(),
            index,
            folder_config: config,
            headers,
        })
    }

    pub fn file_bytes(&self) -> u64 {
        self.headers.iter().map(|h| h.file_bytes).sum()
    }

    pub fn header_bytes(&self) -> u64 {
        self.headers.iter().map(|h| h.header_bytes).sum()
    }

    pub fn data_bytes(&self) -> u64 {
        self.headers.iter().map(|h| h.data_bytes).sum()
    }

    /// Σ (8 + header): what the files hold beyond the raw tensor bytes.
    pub fn overhead_bytes(&self) -> u64 {
        self.header_bytes() + LEN_PREFIX_BYTES * self.headers.len() as u64
    }
}

/// A parameter tensor as stored, under the family's spelling of its name.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredTensor {
    pub name: String,
    pub shape: Vec<usize>,
    /// safetensors dtype name (`F32`, `BF16`, ...).
    pub dtype: String,
    pub numel: u64,
    /// Exact bytes from the header (any dtype, sub-byte ones included).
    pub bytes: u64,
    /// From the family's tensor list with a config; guessed from the name without one.
    pub component: Option<Component>,
}

/// What the checker found. Lists are sorted by name.
#[derive(Debug, Clone, Default)]
pub struct Findings {
    /// Parameter tensors (buffers and a duplicated tied head excluded).
    pub params: Vec<StoredTensor>,
    /// Every tensor in the files, buffers included (each name once).
    pub file_tensors: usize,
    pub file_numel: u64,
    /// Recognised non-parameter buffers.
    pub buffers: Vec<String>,
    pub buffers_numel: u64,
    /// Parameters of parts of the published model this config leaves out (Gemma 3's vision
    /// tower): not counted, not unexpected.
    pub outside: Vec<String>,
    pub outside_numel: u64,
    /// `lm_head.weight` stored although the config ties it to the token embedding.
    pub duplicate_tied_head: Option<String>,
    /// Tensors stored in more than one file: "name (file, file)".
    pub duplicated: Vec<String>,
    /// Against the family's tensor list (with a config).
    pub missing: Vec<String>,
    pub unexpected: Vec<String>,
    pub misshaped: Vec<String>,
    /// Exact parameter count of the config, when given.
    pub expected_params: Option<u64>,
    pub checks: Vec<Check>,
    pub notes: Vec<String>,
}

impl Findings {
    /// The failed gating checks' names and notes, one line each (for an error message).
    pub fn failures(&self) -> Vec<String> {
        self.checks
            .iter()
            .filter(|c| !c.ok())
            .map(|c| match &c.note {
                Some(n) => format!("{}: {n}", c.name),
                None => c.name.clone(),
            })
            .collect()
    }
}

/// How stored names are read: the config's family, or every family's conventions without one.
fn canonical(fam: Option<&dyn Family>, stored: &str) -> String {
    match fam {
        Some(f) => f.canonical_name(stored),
        None => family::guess_canonical_name(stored),
    }
}

/// Check `ckpt` against `cfg`'s tensor list (structure only without a config).
pub fn check(ckpt: &Checkpoint, cfg: Option<&ModelConfig>) -> Result<Findings> {
    let fam = cfg.map(family::of);
    let mut f = Findings::default();

    // All tensors under canonical names; a name in two files is kept once and reported.
    let mut all: BTreeMap<String, (&HeaderTensor, &str)> = BTreeMap::new();
    let mut duplicated: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for h in &ckpt.headers {
        for t in &h.entries {
            let name = canonical(fam, &t.name);
            match all.get(&name) {
                Some((_, first)) => duplicated
                    .entry(name)
                    .or_insert_with(|| vec![first.to_string()])
                    .push(h.path.clone()),
                None => {
                    all.insert(name, (t, &h.path));
                }
            }
        }
    }
    f.duplicated = duplicated
        .iter()
        .map(|(n, files)| format!("{n} ({})", files.join(", ")))
        .collect();
    if ckpt.headers.len() > 1 {
        f.checks.push(Check::holds(
            "every tensor is stored in one file",
            f.duplicated.is_empty(),
            if f.duplicated.is_empty() {
                format!("{} tensors in {} files", all.len(), ckpt.headers.len())
            } else {
                format!("stored twice: {}", f.duplicated.join(", "))
            },
        ));
    }
    if let Some(index) = &ckpt.index {
        f.checks.push(index_check(ckpt, index, fam, &all));
    }

    let is_buffer = |n: &str| match fam {
        Some(x) => x.is_buffer(n),
        None => family::guess_is_buffer(n),
    };
    let components = cfg.map(family::components_by_name);
    let tied = cfg.is_some_and(|c| c.tie_embeddings);
    for (name, (t, _)) in &all {
        if fam.is_some_and(|x| x.outside_model(name)) {
            f.outside.push(name.clone());
            f.outside_numel = f.outside_numel.saturating_add(t.numel);
            continue;
        }
        if is_buffer(name) {
            f.buffers.push(name.clone());
            f.buffers_numel = f.buffers_numel.saturating_add(t.numel);
            continue;
        }
        if tied && name == "lm_head.weight" {
            f.duplicate_tied_head = Some(name.clone());
            continue;
        }
        f.params.push(StoredTensor {
            name: name.clone(),
            shape: t.shape.iter().map(|&d| d as usize).collect(),
            dtype: t.dtype.clone(),
            numel: t.numel,
            bytes: t.bytes,
            component: match &components {
                Some(map) => map.get(name).copied(),
                None => family::guess_component(name),
            },
        });
    }
    f.file_tensors = all.len();
    f.file_numel = all.values().map(|(t, _)| t.numel).sum();

    match cfg {
        Some(cfg) => against_config(&mut f, cfg, &all)?,
        None => f.notes.push(
            "no config given (and no config.json beside the checkpoint): structure only; pass --config to compare with the model"
                .to_string(),
        ),
    }
    if !f.buffers.is_empty() {
        f.notes.push(format!(
            "{} non-parameter buffers ({} elements) not counted as parameters: {}",
            f.buffers.len(),
            crate::units::group(f.buffers_numel),
            f.buffers.join(", ")
        ));
    }
    if !f.outside.is_empty() {
        f.notes.push(format!(
            "{} tensors ({} elements) of parts this config does not describe, not counted: {}",
            f.outside.len(),
            crate::units::group(f.outside_numel),
            f.outside.join(", ")
        ));
    }
    if cfg.is_none() {
        let unclassified: Vec<&str> = f
            .params
            .iter()
            .filter(|t| t.component.is_none())
            .map(|t| t.name.as_str())
            .collect();
        if !unclassified.is_empty() {
            f.notes.push(format!(
                "tensors matching no component: {}",
                unclassified.join(", ")
            ));
        }
    }
    Ok(f)
}

/// Every tensor the index names must be in the shard it names, and every stored tensor must be
/// in the index.
fn index_check(
    ckpt: &Checkpoint,
    index: &Index,
    fam: Option<&dyn Family>,
    all: &BTreeMap<String, (&HeaderTensor, &str)>,
) -> Check {
    let mut wrong = Vec::new();
    for (tensor, shard) in &index.weight_map {
        match all.get(&canonical(fam, tensor)) {
            Some((_, file)) if Path::new(file).file_name() == Some(std::ffi::OsStr::new(shard)) => {
            }
            Some((_, file)) => wrong.push(format!("{tensor} (index: {shard}, found in {file})")),
            None => wrong.push(format!("{tensor} (index: {shard}, not in any shard)")),
        }
    }
    let unindexed = ckpt
        .headers
        .iter()
        .flat_map(|h| h.entries.iter())
        .filter(|t| !index.weight_map.contains_key(&t.name))
        .map(|t| format!("{} (not in the index)", t.name));
    wrong.extend(unindexed);
    Check::holds(
        "index matches the shards",
        wrong.is_empty(),
        if wrong.is_empty() {
            format!(
                "{} tensors in {} shards",
                index.weight_map.len(),
                ckpt.headers.len()
            )
        } else {
            format!("{}: {}", index.path.display(), wrong.join(", "))
        },
    )
}

/// safetensors dtypes a parameter may be stored in (what candle converts to a training dtype).
const FLOAT_DTYPES: [&str; 4] = ["F64", "F32", "F16", "BF16"];

/// Missing, unexpected and mis-shaped tensors against the family's list; the count; the tied head.
fn against_config(
    f: &mut Findings,
    cfg: &ModelConfig,
    all: &BTreeMap<String, (&HeaderTensor, &str)>,
) -> Result<()> {
    let p = params::estimate(cfg)?;
    f.expected_params = Some(p.total);
    let want: BTreeMap<String, Vec<usize>> = family::tensors(cfg)
        .into_iter()
        .map(|t| (t.name, t.shape))
        .collect();
    for (name, shape) in &want {
        match all.get(name) {
            None => f.missing.push(name.clone()),
            Some((t, _)) => {
                let got: Vec<usize> = t.shape.iter().map(|&d| d as usize).collect();
                if &got != shape {
                    f.misshaped
                        .push(format!("{name}: {got:?}, expected {shape:?}"));
                }
            }
        }
    }
    let buffer_names: Vec<&String> = f.buffers.iter().collect();
    for name in all.keys() {
        let known = want.contains_key(name)
            || buffer_names.contains(&name)
            || f.outside.contains(name)
            || f.duplicate_tied_head.as_deref() == Some(name);
        if !known {
            f.unexpected.push(name.clone());
        }
    }
    f.checks.push(Check::holds(
        "every parameter of the model is in the checkpoint",
        f.missing.is_empty(),
        if f.missing.is_empty() {
            format!("{} of {}", want.len(), want.len())
        } else {
            format!("missing: {}", f.missing.join(", "))
        },
    ));
    f.checks.push(Check::holds(
        "no unexpected tensors",
        f.unexpected.is_empty(),
        if f.unexpected.is_empty() {
            "every tensor is a parameter or a known buffer".to_string()
        } else {
            format!("unexpected: {}", f.unexpected.join(", "))
        },
    ));
    f.checks.push(Check::holds(
        "every shape matches the model",
        f.misshaped.is_empty(),
        if f.misshaped.is_empty() {
            "all shapes match".to_string()
        } else {
            f.misshaped.join("; ")
        },
    ));
    // Integer weights would load and run (converted to the run dtype) into absurd losses.
    let not_float: Vec<String> = f
        .params
        .iter()
        .filter(|t| !FLOAT_DTYPES.contains(&t.dtype.as_str()))
        .map(|t| format!("{} ({})", t.name, t.dtype))
        .collect();
    f.checks.push(Check::holds(
        "every parameter is a floating-point tensor",
        not_float.is_empty(),
        if not_float.is_empty() {
            format!("dtypes among {}", FLOAT_DTYPES.join(", "))
        } else {
            format!("not floating point: {}", not_float.join(", "))
        },
    ));
    let numel: u64 = f.params.iter().map(|t| t.numel).sum();
    f.checks.push(Check::exact(
        "census numel == exact estimate",
        numel,
        p.total,
    ));
    let tied_note = match (&f.duplicate_tied_head, all.get("lm_head.weight")) {
        (Some(_), Some((t, _))) => Some(format!(
            "tied head stored twice: lm_head.weight duplicates the token embedding, {} wasted",
            Bytes(t.bytes)
        )),
        _ if cfg.tie_embeddings => Some("tied head stored once (no lm_head.weight)".to_string()),
        _ => None,
    };
    if let Some(n) = tied_note {
        f.checks.push(
            Check::holds(
                "tied weights stored once",
                f.duplicate_tied_head.is_none(),
                n.clone(),
            )
            .informational(n),
        );
    }
    Ok(())
}
