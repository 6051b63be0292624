//! Which files a checkpoint argument names: a `.safetensors` file, a
//! `model.safetensors.index.json`, or an HF model folder holding either. The one resolver that
//! `inspect`, `verify --model` and `model::build::from_checkpoint` use.

use crate::error::{Error, Result};
use serde::Deserialize;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Largest `model.safetensors.index.json` read (real ones are well under 1 MB even for 405B).
pub const MAX_INDEX_BYTES: u64 = 64 << 20;
/// The index's name in an HF folder (transformers `SAFE_WEIGHTS_INDEX_NAME`).
pub const INDEX_NAME: &str = "model.safetensors.index.json";
/// The single-file checkpoint's name in an HF folder (transformers `SAFE_WEIGHTS_NAME`).
pub const SINGLE_NAME: &str = "model.safetensors";
/// The config's name in an HF folder.
pub const CONFIG_NAME: &str = "config.json";

/// A sharded checkpoint's index: tensor name -> shard file name.
#[derive(Debug, Clone)]
pub struct Index {
    pub path: PathBuf,
    pub weight_map: BTreeMap<String, String>,
}

#[derive(Deserialize)]
struct IndexJson {
    weight_map: BTreeMap<String, String>,
}

/// What a checkpoint argument names.
#[derive(Debug, Clone)]
pub struct Resolved {
    /// The safetensors files, each once (shards in name order).
    pub files: Vec<PathBuf>,
    /// The index, when sharded.
    pub index: Option<Index>,
    /// The folder's `config.json`, when there is one.
    pub config: Option<PathBuf>,
}

/// The files of a checkpoint and the folder's `config.json` (if any). A folder with both a
/// single file and an index uses the single file (as transformers does).
pub fn resolve(path: &Path) -> Result<Resolved> {
    let (dir, index) = if path.is_dir() {
        let single = path.join(SINGLE_NAME);
        let cfg = Some(path.join(CONFIG_NAME)).filter(|p| p.is_file());
        if single.is_file() {
            return Ok(Resolved {
                files: vec![single],
                index: None,
                config: cfg,
            });
        }
        let index = path.join(INDEX_NAME);
        if !index.is_file() {
            return Err(Error::file(
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
        return Err(Error::file(path, "no such file or folder"));
    };
    let index = read_index(&index)?;
    // Shards live beside the index: a name with a path in it could point anywhere.
    let mut shards = BTreeSet::new();
    for (tensor, file) in &index.weight_map {
        let plain = Path::new(file)
            .file_name()
            .is_some_and(|n| n == std::ffi::OsStr::new(file));
        if !plain || file == ".." {
            return Err(Error::file(
                &index.path,
                format!("weight_map[{tensor:?}] = {file:?}: shard must be a plain file name in the same folder"),
            ));
        }
        shards.insert(file.clone());
    }
    if shards.is_empty() {
        return Err(Error::file(&index.path, "weight_map is empty"));
    }
    let files: Vec<PathBuf> = shards.iter().map(|s| dir.join(s)).collect();
    let absent: Vec<String> = shards
        .iter()
        .zip(&files)
        .filter(|(_, f)| !f.is_file())
        .map(|(s, _)| format!("{s:?}"))
        .collect();
    if !absent.is_empty() {
        return Err(Error::file(
            &index.path,
            format!("names shards that do not exist: {}", absent.join(", ")),
        ));
    }
    Ok(Resolved {
        files,
        index: Some(index),
        config: Some(dir.join(CONFIG_NAME)).filter(|p| p.is_file()),
    })
}

fn read_index(path: &Path) -> Result<Index> {
    let size = std::fs::metadata(path)
        .map_err(|e| Error::file(path, format!("cannot read: {e}")))?
        .len();
    if size > MAX_INDEX_BYTES {
        return Err(Error::file(
            path,
            format!("index is {size} bytes: absurd (limit {MAX_INDEX_BYTES})"),
        ));
    }
    let bytes = std::fs::read(path).map_err(|e| Error::file(path, format!("cannot read: {e}")))?;
    let text = String::from_utf8(bytes).map_err(|_| Error::file(path, "is not valid UTF-8"))?;
    let parsed: IndexJson = serde_json::from_str(&text).map_err(|e| {
        Error::file(
            path,
            format!("not a safetensors index (needs weight_map): {e}"),
        )
    })?;
    Ok(Index {
        path: path.to_path_buf(),
        weight_map: parsed.weight_map,
    })
}
