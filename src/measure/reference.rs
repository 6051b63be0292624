//! Reference outputs made by another implementation (HF transformers): the inputs it ran, the
//! logits it produced, and optionally its loss, gradient norms and parameter count
//! (tests/fixtures/README.md says how they were made).

use crate::error::{Error, Result};
use candle_core::{DType, Device, Tensor};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// File holding `input_ids` (i64 `[B, T]`) and `logits` (f32 `[B, T, V]`).
pub const TENSORS_FILE: &str = "expected.safetensors";
/// Optional file with `loss`, `grad_norm`, `params`, `batch`, `seq`.
pub const JSON_FILE: &str = "expected.json";

#[derive(Debug, Clone)]
pub struct Reference {
    /// u32 `[B, T]` on the CPU.
    pub input_ids: Tensor,
    /// f32 `[B, T, V]` on the CPU.
    pub logits: Tensor,
    /// Mean next-token cross-entropy (labels = input_ids shifted by one).
    pub loss: Option<f64>,
    /// Parameter name -> L2 norm of d loss / d parameter. A tied weight appears once, under the
    /// embedding's name.
    pub grad_norm: Option<BTreeMap<String, f64>>,
    /// Exact parameter count, tied weights once.
    pub params: Option<u64>,
    /// The tensors file, for messages.
    pub source: PathBuf,
    /// Largest token id in `input_ids`, checked against the model's vocabulary before running.
    pub max_token_id: Option<u32>,
}

#[derive(serde::Deserialize)]
struct ExpectedJson {
    loss: Option<f64>,
    grad_norm: Option<BTreeMap<String, f64>>,
    params: Option<u64>,
    batch: Option<usize>,
    seq: Option<usize>,
}

/// Load a reference from a folder holding `expected.safetensors` (and maybe `expected.json`),
/// or from the `expected.safetensors` file itself (its sibling `expected.json` is read if present).
pub fn load(path: &Path) -> Result<Reference> {
    let (tensors_path, json_path): (PathBuf, PathBuf) = if path.is_dir() {
        (path.join(TENSORS_FILE), path.join(JSON_FILE))
    } else if path.is_file() {
        let dir = path.parent().unwrap_or(Path::new("."));
        (path.to_path_buf(), dir.join(JSON_FILE))
    } else {
        return Err(Error::file(path, "no such reference file or folder"));
    };
    if !tensors_path.is_file() {
        return Err(Error::file(
            path,
            format!("reference folder has no {TENSORS_FILE}"),
        ));
    }
    let tp = tensors_path.as_path();
    let mut tensors = candle_core::safetensors::load(tp, &Device::Cpu)
        .map_err(|e| Error::file(tp, format!("cannot read safetensors: {e}")))?;
    let mut take = |name: &str| {
        tensors
            .remove(name)
            .ok_or_else(|| Error::file(tp, format!("has no tensor `{name}`")))
    };
    let input_ids = take("input_ids")?;
    let logits = take("logits")?;
    let (b, t) = input_ids.dims2().map_err(|_| {
        Error::file(
            tp,
            format!("input_ids must be [B, T], found {:?}", input_ids.dims()),
        )
    })?;
    let (lb, lt, _) = logits.dims3().map_err(|_| {
        Error::file(
            tp,
            format!("logits must be [B, T, V], found {:?}", logits.dims()),
        )
    })?;
    if (lb, lt) != (b, t) {
        return Err(Error::file(
            tp,
            format!(
                "input_ids are [{b}, {t}] but logits are {:?}",
                logits.dims()
            ),
        ));
    }
    let input_ids = token_ids(&input_ids).map_err(|why| Error::file(tp, why))?;
    let max_token_id = input_ids
        .flatten_all()
        .and_then(|t| t.to_vec1::<u32>())
        .ok()
        .and_then(|v| v.into_iter().max());
    let logits = logits.to_dtype(DType::F32)?;

    let mut reference = Reference {
        input_ids,
        logits,
        loss: None,
        grad_norm: None,
        params: None,
        source: tensors_path.clone(),
        max_token_id,
    };
    if json_path.is_file() {
        let jp = json_path.as_path();
        let text = crate::files::read_text_capped(jp, crate::files::MAX_JSON_BYTES, JSON_FILE)?;
        let j: ExpectedJson =
            serde_json::from_str(&text).map_err(|e| Error::file(jp, format!("invalid: {e}")))?;
        for (field, v, want) in [("batch", j.batch, b), ("seq", j.seq, t)] {
            if let Some(v) = v {
                if v != want {
                    return Err(Error::field(
                        jp.display().to_string(),
                        field,
                        v,
                        format!("disagrees with {TENSORS_FILE}'s input_ids [{b}, {t}]"),
                    ));
                }
            }
        }
        reference.loss = j.loss;
        reference.grad_norm = j.grad_norm;
        reference.params = j.params;
    }
    Ok(reference)
}

/// Integer token ids of any integer dtype -> u32, refusing negatives and values beyond u32.
fn token_ids(ids: &Tensor) -> std::result::Result<Tensor, String> {
    let wide = match ids.dtype() {
        DType::I64 | DType::U32 | DType::U8 => ids
            .to_dtype(DType::I64)
            .map_err(|e| format!("input_ids: {e}"))?,
        other => {
            return Err(format!(
                "input_ids must be integers, found {}",
                other.as_str()
            ))
        }
    };
    let dims = wide.dims().to_vec();
    let flat: Vec<i64> = wide
        .flatten_all()
        .and_then(|t| t.to_vec1())
        .map_err(|e| format!("input_ids: {e}"))?;
    let ids: Vec<u32> = flat
        .iter()
        .map(|&v| u32::try_from(v).map_err(|_| format!("input_ids holds {v}, not a token id")))
        .collect::<std::result::Result<_, _>>()?;
    Tensor::from_vec(ids, dims, &Device::Cpu).map_err(|e| format!("input_ids: {e}"))
}

/// Maximum relative error over a tensor: `max |measured − expected| / max |expected|`.
///
/// Normalising by the largest reference magnitude (not element-wise) keeps near-zero reference
/// entries from turning float rounding into huge "relative" errors. Both tensors are compared
/// in f32 on the CPU; shapes must match exactly.
pub fn max_rel_error(measured: &Tensor, expected: &Tensor) -> Result<f64> {
    if measured.dims() != expected.dims() {
        return Err(Error::Usage(format!(
            "cannot compare tensors of shape {:?} and {:?}",
            measured.dims(),
            expected.dims()
        )));
    }
    let host =
        |t: &Tensor| -> Result<Tensor> { Ok(t.to_device(&Device::Cpu)?.to_dtype(DType::F32)?) };
    let (m, e) = (host(measured)?, host(expected)?);
    let diff = (m - &e)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()? as f64;
    let scale = e.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()? as f64;
    if scale == 0.0 {
        return Ok(if diff == 0.0 { 0.0 } else { f64::INFINITY });
    }
    Ok(diff / scale)
}
