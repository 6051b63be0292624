//! Writing a checkpoint: its size predicted to the byte and measured on a real file.
//!
//! A `.safetensors` file is 8 bytes of little-endian header length, a JSON header, then the raw
//! tensor data. The `safetensors` crate (0.8, `tensor.rs::prepare`) writes the header as
//! `{"<name>":{"dtype":"F32","shape":[..],"data_offsets":[start,end]},...}` with the tensors
//! sorted by descending dtype alignment and then by name, data laid out in that order, and the
//! header padded with spaces to a multiple of 8 bytes. So the file size follows from names,
//! shapes and dtypes alone: `8 + padded header + Σ numel × element size`.

use super::safetensors::LEN_PREFIX_BYTES;
use crate::error::{Error, Result};
use crate::estimate::memory::{ADAMW_STATES, F32_BYTES};
use ::safetensors::Dtype as StDtype;
use candle_core::DType;
use candle_nn::VarMap;
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// The header is padded with spaces to a multiple of this (safetensors `tensor.rs::prepare`,
/// "Force alignment to 8 bytes").
pub const HEADER_ALIGN: u64 = 8;

/// `verify` writes no checkpoint larger than this (it would fill a temp dir for nothing: the
/// prediction is exact on small models and the format does not change with size); 4 GiB.
pub const MAX_CHECKPOINT_BYTES: u64 = 4 << 30;

/// One tensor as it will be written: name, shape, dtype.
#[derive(Debug, Clone, Copy)]
pub struct TensorMeta<'a> {
    pub name: &'a str,
    pub shape: &'a [usize],
    pub dtype: DType,
}

/// The predicted layout of a safetensors file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PredictedFile {
    /// JSON header length after padding (the value stored in the first 8 bytes).
    pub header_bytes: u64,
    /// Σ numel × element size.
    pub data_bytes: u64,
    /// 8 + header + data.
    pub file_bytes: u64,
}

/// Exactly the header the safetensors crate writes for these tensors (no `__metadata__`), padded.
pub fn predicted_header(tensors: &[TensorMeta<'_>]) -> Result<String> {
    let mut sorted: Vec<&TensorMeta<'_>> = tensors.iter().collect();
    sorted.sort_by(|a, b| {
        StDtype::from(b.dtype)
            .cmp(&StDtype::from(a.dtype))
            .then(a.name.cmp(b.name))
    });
    let json = |e: serde_json::Error| Error::Internal(anyhow::anyhow!("header JSON: {e}"));
    let mut out = String::from("{");
    let mut offset: u64 = 0;
    for (i, t) in sorted.iter().enumerate() {
        let n = data_len(t)?;
        if i > 0 {
            out.push(',');
        }
        out.push_str(&serde_json::to_string(t.name).map_err(json)?);
        out.push_str(":{\"dtype\":");
        out.push_str(&serde_json::to_string(&StDtype::from(t.dtype)).map_err(json)?);
        out.push_str(",\"shape\":");
        out.push_str(&serde_json::to_string(t.shape).map_err(json)?);
        let end = offset
            .checked_add(n)
            .ok_or_else(|| Error::Internal(anyhow::anyhow!("checkpoint size overflows u64")))?;
        out.push_str(&format!(",\"data_offsets\":[{offset},{end}]}}"));
        offset = end;
    }
    out.push('}');
    let padded = (out.len() as u64).next_multiple_of(HEADER_ALIGN) as usize;
    while out.len() < padded {
        out.push(' ');
    }
    Ok(out)
}

fn data_len(t: &TensorMeta<'_>) -> Result<u64> {
    t.shape
        .iter()
        .try_fold(t.dtype.size_in_bytes() as u64, |acc, &d| {
            acc.checked_mul(d as u64)
        })
        .ok_or_else(|| Error::Internal(anyhow::anyhow!("{}: byte size overflows u64", t.name)))
}

/// File size the safetensors crate will produce for these tensors.
pub fn predict(tensors: &[TensorMeta<'_>]) -> Result<PredictedFile> {
    let header_bytes = predicted_header(tensors)?.len() as u64;
    let mut data_bytes: u64 = 0;
    for t in tensors {
        data_bytes = data_bytes
            .checked_add(data_len(t)?)
            .ok_or_else(|| Error::Internal(anyhow::anyhow!("checkpoint size overflows u64")))?;
    }
    Ok(PredictedFile {
        header_bytes,
        data_bytes,
        file_bytes: LEN_PREFIX_BYTES + header_bytes + data_bytes,
    })
}

/// Saved-checkpoint sizes, measured and predicted.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CheckpointReport {
    /// Size of the `.safetensors` file really written by `VarMap::save`.
    pub file_bytes: u64,
    /// `8 + header + Σ numel × element size`, from names, shapes and dtypes alone.
    pub predicted_bytes: u64,
    /// Header length stored in the written file.
    pub header_bytes: u64,
    pub predicted_header_bytes: u64,
    /// Σ numel × element size.
    pub data_bytes: u64,
    /// 8 + header: what the file holds beyond the raw tensor bytes.
    pub overhead_bytes: u64,
    pub tensors: usize,
    /// A training checkpoint with AdamW (nanoGPT notebook: "params + 2 buffers"): f32 weights
    /// and the two f32 moments, 12 bytes per parameter, before any container overhead.
    pub training_checkpoint_bytes: u64,
    /// Seconds to write the file.
    pub save_s: f64,
}

/// Removes the file when dropped, so an error path leaves nothing behind.
struct TempFile(PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn temp_path() -> PathBuf {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    std::env::temp_dir().join(format!(
        "truesize-{}-{nanos}.safetensors",
        std::process::id()
    ))
}

/// Read the stored header length (first 8 bytes) of a safetensors file.
fn stored_header_len(path: &Path) -> Result<u64> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).map_err(|e| Error::file(path, e))?;
    let mut b = [0u8; LEN_PREFIX_BYTES as usize];
    f.read_exact(&mut b).map_err(|e| Error::file(path, e))?;
    Ok(u64::from_le_bytes(b))
}

/// Write `varmap` to a real `.safetensors` file in `dir` (the system temp dir when `None`),
/// measure it, delete it, and compare with the prediction from `tensors` (the shape-only list).
pub fn save_and_measure(
    varmap: &VarMap,
    tensors: &[TensorMeta<'_>],
    dir: Option<&Path>,
) -> Result<CheckpointReport> {
    let predicted = predict(tensors)?;
    let path = match dir {
        Some(d) => d.join(temp_path().file_name().unwrap_or_default()),
        None => temp_path(),
    };
    let guard = TempFile(path);
    let t0 = Instant::now();
    varmap
        .save(&guard.0)
        .map_err(|e| Error::file(&guard.0, format!("cannot write checkpoint: {e}")))?;
    let save_s = t0.elapsed().as_secs_f64();
    let file_bytes = std::fs::metadata(&guard.0)
        .map_err(|e| Error::file(&guard.0, e))?
        .len();
    let header_bytes = stored_header_len(&guard.0)?;
    drop(guard);
    let params: u64 = tensors
        .iter()
        .map(|t| t.shape.iter().map(|&d| d as u64).product::<u64>())
        .sum();
    Ok(CheckpointReport {
        file_bytes,
        predicted_bytes: predicted.file_bytes,
        header_bytes,
        predicted_header_bytes: predicted.header_bytes,
        data_bytes: predicted.data_bytes,
        overhead_bytes: LEN_PREFIX_BYTES + predicted.header_bytes,
        tensors: tensors.len(),
        training_checkpoint_bytes: params.saturating_mul((1 + ADAMW_STATES) * F32_BYTES),
        save_s,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    /// The docstring example of safetensors' `SafeTensors::deserialize`: one I32 [2, 2] tensor
    /// named "test" has the 60-byte header `{"test":{"dtype":"I32","shape":[2,2],"data_offsets":[0,16]}}`
    /// (declared length `<` = 60 in the example; the writer pads it to 64).
    #[test]
    fn header_of_the_documented_example() {
        let t = [TensorMeta {
            name: "test",
            shape: &[2, 2],
            dtype: DType::U32,
        }];
        let h = predicted_header(&t).unwrap();
        assert_eq!(
            h.trim_end(),
            r#"{"test":{"dtype":"U32","shape":[2,2],"data_offsets":[0,16]}}"#
        );
        assert_eq!(h.len(), 64);
        assert_eq!(predict(&t).unwrap().file_bytes, 8 + 64 + 16);
    }

    #[test]
    fn real_file_matches_prediction_to_the_byte() {
        let vm = VarMap::new();
        let dev = Device::Cpu;
        {
            let mut data = vm.data().lock().unwrap();
            for (name, shape) in [
                ("b.weight", vec![3usize, 5]),
                ("a.bias", vec![7]),
                ("c\"q", vec![2, 2, 2]),
            ] {
                let t = Tensor::zeros(shape.as_slice(), DType::F32, &dev).unwrap();
                data.insert(name.to_string(), candle_core::Var::from_tensor(&t).unwrap());
            }
        }
        let shapes = [vec![3usize, 5], vec![7], vec![2, 2, 2]];
        let metas: Vec<TensorMeta> = ["b.weight", "a.bias", "c\"q"]
            .iter()
            .zip(&shapes)
            .map(|(n, s)| TensorMeta {
                name: n,
                shape: s,
                dtype: DType::F32,
            })
            .collect();
        let r = save_and_measure(&vm, &metas, None).unwrap();
        assert_eq!(r.file_bytes, r.predicted_bytes);
        assert_eq!(r.header_bytes, r.predicted_header_bytes);
        assert_eq!(r.data_bytes, 4 * (15 + 7 + 8));
        assert_eq!(r.training_checkpoint_bytes, 12 * 30);
    }
}
