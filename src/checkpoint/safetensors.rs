//! safetensors headers, read as hostile input.
//!
//! A safetensors file is `u64 little-endian header length n` + `n` bytes of JSON + raw data.
//! [`read_header`] opens a file, reads those 8 + n bytes and nothing else, and validates the
//! header: every length is checked against the file before anything is allocated, every
//! product uses checked arithmetic, the tensors must tile the data section exactly, and every
//! failure is an `Error::File` naming the file and the problem (exit 2), never a panic.

use crate::error::{Error, Result};
use serde::de::{Deserializer, MapAccess, Visitor};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::io::Read;
use std::path::Path;

/// Largest header accepted: the safetensors crate's own `MAX_HEADER_SIZE` (100,000,000 bytes).
pub const MAX_HEADER_BYTES: u64 = 100_000_000;
/// Bytes of the header-length prefix (safetensors format: a little-endian u64).
pub const LEN_PREFIX_BYTES: u64 = 8;

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

/// A file whose header is not a valid safetensors header.
fn bad(path: &Path, why: impl fmt::Display) -> Error {
    Error::file(path, format!("cannot read safetensors: {why}"))
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
    let mut f =
        std::fs::File::open(path).map_err(|e| Error::file(path, format!("cannot open: {e}")))?;
    let file_bytes = f
        .metadata()
        .map_err(|e| Error::file(path, format!("cannot stat: {e}")))?
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
                    "tensors {:?} and {:?} overlap: their data_offsets share bytes {s}..{pos} of the data section",
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

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
}
