//! GGUF files (llama.cpp, ollama, LM Studio): the header read exactly and as a hostile input,
//! llama.cpp's metadata mapped to a `ModelConfig`, and tensors loaded through candle's reader.
//!
//! Layout (ggml docs/gguf.md): magic `GGUF`, version (2 or 3), tensor count and metadata count
//! (u64), the metadata key/values, one info per tensor (name, dims innermost first, ggml type,
//! offset), zero padding to `general.alignment` (default 32), then the data section. llama.cpp
//! (ggml/src/gguf.cpp) requires every tensor at the next aligned offset after the previous one
//! in info order, so `file = header + padding + Σ tensor bytes` exactly.
//!
//! The header is parsed here before candle sees the file: every count and length is checked
//! against the bytes left in the file and against caps far above any real model before anything
//! is allocated, large arrays (the tokenizer's) are counted, not kept, and every failure names
//! the file and the field (exit 2). candle's `gguf_file::Content` then reads the validated
//! file (its reader divides by `general.alignment` without checking for zero, and keeps every
//! token string) and loads the tensors; its tensor table is checked against ours.

use crate::config::{Arch, Attention, Dims, ModelConfig};
use crate::error::{Error, Result};
use crate::estimate::serve::formats::{self, GgmlType};
use crate::estimate::serve::weights::{GgufName, TypeCount};
use candle_core::quantized::{gguf_file, QStorage, QTensor};
use candle_core::{DType, Device, Tensor};
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

/// `GGUF` read as a little-endian u32.
pub const MAGIC: u32 = 0x4655_4747;
/// GGUF's default data alignment (`GGUF_DEFAULT_ALIGNMENT`).
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// Largest tensor count accepted: real files hold at most a few thousand (Llama-3.1-405B:
/// 1,138; DeepSeek-V3: 1,147 with stacked experts).
pub const MAX_TENSORS: u64 = 1 << 20;
/// Largest metadata entry count accepted (real files: tens).
pub const MAX_METADATA: u64 = 1 << 16;
/// Longest key or tensor name accepted (llama.cpp caps tensor names at 64 bytes).
pub const MAX_NAME_BYTES: u64 = 1 << 10;
/// Longest string value accepted (chat templates are a few KiB; candle caps at 1 GiB).
pub const MAX_STRING_BYTES: u64 = 1 << 26;
/// Longest array accepted (tokenizer vocabularies and merges are under a million entries).
pub const MAX_ARRAY_LEN: u64 = 1 << 26;
/// Arrays up to this length keep their numeric values (per-layer settings); longer ones, and
/// all string arrays, keep their length only.
pub const MAX_KEPT_ARRAY: u64 = 1 << 16;
/// String values keep at most this many bytes (longer ones keep their length).
pub const MAX_KEPT_STRING: usize = 1 << 12;
/// ggml's `GGML_MAX_DIMS`.
pub const MAX_DIMS: u32 = 4;
/// Largest `general.alignment` accepted.
pub const MAX_ALIGNMENT: u64 = 1 << 20;

/// One metadata value as kept.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum MetaValue {
    Int(i128),
    Float(f64),
    Bool(bool),
    Str(String),
    /// A string longer than `MAX_KEPT_STRING` bytes: its length.
    LongStr {
        string_bytes: u64,
    },
    /// Numeric array values (short arrays only).
    Numbers(Vec<f64>),
    /// A long array or an array of strings: element type and length.
    Array {
        elem_type: &'static str,
        len: u64,
    },
}

impl MetaValue {
    pub fn as_u64(&self) -> Option<u64> {
        match self {
            MetaValue::Int(i) => u64::try_from(*i).ok(),
            _ => None,
        }
    }
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            MetaValue::Int(i) => Some(*i as f64),
            MetaValue::Float(f) => Some(*f),
            _ => None,
        }
    }
    pub fn as_str(&self) -> Option<&str> {
        match self {
            MetaValue::Str(s) => Some(s),
            _ => None,
        }
    }
    pub fn array_len(&self) -> Option<u64> {
        match self {
            MetaValue::Array { len, .. } => Some(*len),
            MetaValue::Numbers(v) => Some(v.len() as u64),
            _ => None,
        }
    }
}

/// One tensor info, validated.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GgufTensor {
    pub name: String,
    /// Row-major shape (outermost first: `[rows, row_len]`), as candle and PyTorch write it;
    /// the file stores the reverse.
    pub shape: Vec<u64>,
    pub ggml_type: &'static str,
    pub numel: u64,
    pub bytes: u64,
    /// Offset within the data section.
    pub offset: u64,
}

/// A GGUF header, validated against the file.
#[derive(Debug, Clone, Serialize)]
pub struct GgufHeader {
    pub path: PathBuf,
    pub version: u32,
    pub file_bytes: u64,
    /// Magic through the last tensor info.
    pub header_bytes: u64,
    pub alignment: u64,
    /// Where the data section starts (header rounded up to the alignment).
    pub data_offset: u64,
    /// Zero bytes after the header and after each tensor up to the alignment.
    pub padding_bytes: u64,
    /// Σ tensor bytes.
    pub data_bytes: u64,
    /// Bytes after the last tensor's padding (llama.cpp ignores them; a check reports them).
    pub trailing_bytes: u64,
    #[serde(skip)]
    pub metadata: BTreeMap<String, MetaValue>,
    #[serde(skip)]
    pub tensors: Vec<GgufTensor>,
}

impl GgufHeader {
    pub fn meta(&self, key: &str) -> Option<&MetaValue> {
        self.metadata.get(key)
    }

    pub fn tensor(&self, name: &str) -> Option<&GgufTensor> {
        self.tensors.iter().find(|t| t.name == name)
    }

    pub fn architecture(&self) -> Option<&str> {
        self.meta("general.architecture")
            .and_then(MetaValue::as_str)
    }

    /// Tensors per GGML type.
    pub fn by_type(&self) -> BTreeMap<&'static str, TypeCount> {
        let mut m: BTreeMap<&'static str, TypeCount> = BTreeMap::new();
        for t in &self.tensors {
            let c = m.entry(t.ggml_type).or_default();
            c.tensors += 1;
            c.numel += t.numel;
            c.bytes += t.bytes;
        }
        m
    }
}

/// Whether `path` is a regular file starting with the GGUF magic.
pub fn has_magic(path: &Path) -> bool {
    let Ok(meta) = std::fs::metadata(path) else {
        return false;
    };
    if !meta.is_file() {
        return false;
    }
    let mut b = [0u8; 4];
    File::open(path)
        .and_then(|mut f| f.read_exact(&mut b))
        .is_ok()
        && u32::from_le_bytes(b) == MAGIC
}

/// A reader that knows how many bytes are left and refuses to read past them.
struct Cursor<R> {
    r: R,
    pos: u64,
    len: u64,
}

impl<R: Read> Cursor<R> {
    fn left(&self) -> u64 {
        self.len - self.pos
    }

    fn bytes(&mut self, n: u64, what: &str) -> std::result::Result<Vec<u8>, String> {
        if n > self.left() {
            return Err(format!(
                "{what} needs {n} bytes at offset {} but the file ends {} bytes later: truncated or corrupt",
                self.pos,
                self.left()
            ));
        }
        let mut b = vec![0u8; n as usize];
        self.r
            .read_exact(&mut b)
            .map_err(|e| format!("cannot read {what}: {e}"))?;
        self.pos += n;
        Ok(b)
    }

    fn skip(&mut self, n: u64, what: &str) -> std::result::Result<(), String> {
        if n > self.left() {
            return Err(format!(
                "{what} needs {n} bytes at offset {} but the file ends {} bytes later: truncated or corrupt",
                self.pos,
                self.left()
            ));
        }
        let mut left = n;
        let mut buf = [0u8; 4096];
        while left > 0 {
            let k = left.min(buf.len() as u64) as usize;
            self.r
                .read_exact(&mut buf[..k])
                .map_err(|e| format!("cannot read {what}: {e}"))?;
            left -= k as u64;
        }
        self.pos += n;
        Ok(())
    }

    fn fixed<const N: usize>(&mut self, what: &str) -> std::result::Result<[u8; N], String> {
        let v = self.bytes(N as u64, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(&v);
        Ok(a)
    }

    fn u32(&mut self, what: &str) -> std::result::Result<u32, String> {
        Ok(u32::from_le_bytes(self.fixed(what)?))
    }

    fn u64(&mut self, what: &str) -> std::result::Result<u64, String> {
        Ok(u64::from_le_bytes(self.fixed(what)?))
    }

    /// A length-prefixed string of at most `cap` bytes; longer ones are an error.
    fn name(&mut self, what: &str, cap: u64) -> std::result::Result<String, String> {
        let n = self.u64(what)?;
        if n > cap {
            return Err(format!("{what} is {n} bytes long (limit {cap}): corrupt"));
        }
        let b = self.bytes(n, what)?;
        String::from_utf8(b).map_err(|_| format!("{what} is not valid UTF-8"))
    }
}

/// GGUF metadata value types (gguf.md `gguf_metadata_value_type`).
fn type_name(t: u32) -> Option<&'static str> {
    Some(match t {
        0 => "u8",
        1 => "i8",
        2 => "u16",
        3 => "i16",
        4 => "u32",
        5 => "i32",
        6 => "f32",
        7 => "bool",
        8 => "string",
        9 => "array",
        10 => "u64",
        11 => "i64",
        12 => "f64",
        _ => return None,
    })
}

fn scalar_size(t: u32) -> Option<u64> {
    Some(match t {
        0 | 1 | 7 => 1,
        2 | 3 => 2,
        4..=6 => 4,
        10..=12 => 8,
        _ => return None,
    })
}

fn read_scalar<R: Read>(
    c: &mut Cursor<R>,
    t: u32,
    key: &str,
) -> std::result::Result<MetaValue, String> {
    Ok(match t {
        0 => MetaValue::Int(c.fixed::<1>(key)?[0] as i128),
        1 => MetaValue::Int(c.fixed::<1>(key)?[0] as i8 as i128),
        2 => MetaValue::Int(u16::from_le_bytes(c.fixed(key)?) as i128),
        3 => MetaValue::Int(i16::from_le_bytes(c.fixed(key)?) as i128),
        4 => MetaValue::Int(u32::from_le_bytes(c.fixed(key)?) as i128),
        5 => MetaValue::Int(i32::from_le_bytes(c.fixed(key)?) as i128),
        6 => MetaValue::Float(f32::from_le_bytes(c.fixed(key)?) as f64),
        7 => match c.fixed::<1>(key)?[0] {
            0 => MetaValue::Bool(false),
            1 => MetaValue::Bool(true),
            b => return Err(format!("{key}: bool value {b} (must be 0 or 1)")),
        },
        10 => MetaValue::Int(u64::from_le_bytes(c.fixed(key)?) as i128),
        11 => MetaValue::Int(i64::from_le_bytes(c.fixed(key)?) as i128),
        12 => MetaValue::Float(f64::from_le_bytes(c.fixed(key)?)),
        _ => return Err(format!("{key}: value type {t} is not a scalar")),
    })
}

fn read_value<R: Read>(
    c: &mut Cursor<R>,
    t: u32,
    key: &str,
) -> std::result::Result<MetaValue, String> {
    match t {
        8 => {
            let n = c.u64(key)?;
            if n > MAX_STRING_BYTES {
                return Err(format!(
                    "{key}: string of {n} bytes (limit {MAX_STRING_BYTES}): corrupt"
                ));
            }
            if n as usize > MAX_KEPT_STRING {
                c.skip(n, key)?;
                return Ok(MetaValue::LongStr { string_bytes: n });
            }
            let b = c.bytes(n, key)?;
            Ok(MetaValue::Str(String::from_utf8_lossy(&b).into_owned()))
        }
        9 => {
            let et = c.u32(key)?;
            let Some(en) = type_name(et) else {
                return Err(format!("{key}: array of unknown value type {et}"));
            };
            if et == 9 {
                return Err(format!(
                    "{key}: arrays of arrays are not valid GGUF metadata"
                ));
            }
            let len = c.u64(key)?;
            if len > MAX_ARRAY_LEN {
                return Err(format!(
                    "{key}: array of {len} elements (limit {MAX_ARRAY_LEN}): corrupt"
                ));
            }
            if et == 8 {
                // Count the strings, keep none: a tokenizer's 128k tokens stay on disk.
                if len.saturating_mul(8) > c.left() {
                    return Err(format!(
                        "{key}: {len} strings need at least {} bytes, the file has {} left: corrupt",
                        len.saturating_mul(8),
                        c.left()
                    ));
                }
                for i in 0..len {
                    let n = c.u64(key)?;
                    if n > MAX_STRING_BYTES {
                        return Err(format!("{key}[{i}]: string of {n} bytes: corrupt"));
                    }
                    c.skip(n, key)?;
                }
                return Ok(MetaValue::Array { elem_type: en, len });
            }
            let size = scalar_size(et).unwrap_or(1);
            let need = len.saturating_mul(size);
            if need > c.left() {
                return Err(format!(
                    "{key}: array of {len} {en} needs {need} bytes, the file has {} left: corrupt",
                    c.left()
                ));
            }
            if len > MAX_KEPT_ARRAY {
                c.skip(need, key)?;
                return Ok(MetaValue::Array { elem_type: en, len });
            }
            let mut v = Vec::with_capacity(len as usize);
            for _ in 0..len {
                match read_scalar(c, et, key)? {
                    MetaValue::Int(i) => v.push(i as f64),
                    MetaValue::Float(f) => v.push(f),
                    MetaValue::Bool(b) => v.push(f64::from(u8::from(b))),
                    _ => {}
                }
            }
            Ok(MetaValue::Numbers(v))
        }
        _ => read_scalar(c, t, key),
    }
}

/// Read and validate the header of a GGUF file without reading its tensor data.
pub fn read_header(path: &Path) -> Result<GgufHeader> {
    let bad = |why: String| Error::file(path, why);
    let meta = std::fs::metadata(path).map_err(|e| bad(format!("cannot read: {e}")))?;
    if !meta.is_file() {
        return Err(bad("is not a regular file".into()));
    }
    let f = File::open(path).map_err(|e| bad(format!("cannot open: {e}")))?;
    let mut c = Cursor {
        r: BufReader::new(f),
        pos: 0,
        len: meta.len(),
    };
    parse(&mut c, path).map_err(bad)
}

/// Parse a GGUF header from bytes (the fuzz target's entry point).
pub fn parse_bytes(bytes: &[u8]) -> std::result::Result<GgufHeader, String> {
    let mut c = Cursor {
        r: bytes,
        pos: 0,
        len: bytes.len() as u64,
    };
    parse(&mut c, Path::new("<bytes>"))
}

fn parse<R: Read>(c: &mut Cursor<R>, path: &Path) -> std::result::Result<GgufHeader, String> {
    let magic = c.u32("the magic")?;
    if magic != MAGIC {
        return Err(format!(
            "not a GGUF file (magic 0x{magic:08x}, expected \"GGUF\")"
        ));
    }
    let version = c.u32("the version")?;
    if !(2..=3).contains(&version) {
        return Err(format!(
            "GGUF version = {version} is not supported (2 and 3 are; version 1 files predate August 2023)"
        ));
    }
    let n_tensors = c.u64("tensor_count")?;
    let n_kv = c.u64("metadata_kv_count")?;
    if n_tensors > MAX_TENSORS {
        return Err(format!(
            "tensor_count = {n_tensors} is absurd (limit {MAX_TENSORS}): corrupt"
        ));
    }
    if n_kv > MAX_METADATA {
        return Err(format!(
            "metadata_kv_count = {n_kv} is absurd (limit {MAX_METADATA}): corrupt"
        ));
    }
    // Smallest possible entries: a key/value is 8 + 4 + 1 bytes, a tensor info 8 + 4 + 8 + 4 + 8.
    let need = n_kv
        .saturating_mul(13)
        .saturating_add(n_tensors.saturating_mul(32));
    if need > c.left() {
        return Err(format!(
            "header declares {n_tensors} tensors and {n_kv} metadata entries (at least {need} bytes) but the file has {} bytes left: truncated or corrupt",
            c.left()
        ));
    }
    let mut metadata = BTreeMap::new();
    for i in 0..n_kv {
        let key = c.name(&format!("metadata key #{i}"), MAX_NAME_BYTES)?;
        let t = c.u32(&key)?;
        if type_name(t).is_none() {
            return Err(format!("{key}: unknown value type {t}"));
        }
        let v = read_value(c, t, &key)?;
        if metadata.insert(key.clone(), v).is_some() {
            return Err(format!("metadata key {key:?} appears twice"));
        }
    }
    let alignment = match metadata.get("general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some(v) => match v.as_u64() {
            Some(a) if a > 0 && a.is_power_of_two() && a <= MAX_ALIGNMENT => a,
            _ => {
                return Err(format!(
                "general.alignment = {v:?}: must be a power of two between 1 and {MAX_ALIGNMENT}"
            ))
            }
        },
    };
    let mut tensors: Vec<GgufTensor> = Vec::with_capacity(n_tensors.min(4096) as usize);
    let mut names = BTreeSet::new();
    for i in 0..n_tensors {
        let name = c.name(&format!("tensor #{i}'s name"), MAX_NAME_BYTES)?;
        let n_dims = c.u32(&name)?;
        if n_dims == 0 || n_dims > MAX_DIMS {
            return Err(format!(
                "tensor {name:?}: {n_dims} dimensions (1 to {MAX_DIMS})"
            ));
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            dims.push(c.u64(&name)?);
        }
        let tid = c.u32(&name)?;
        let offset = c.u64(&name)?;
        let Some(ty) = formats::ggml_by_id(tid) else {
            return Err(format!(
                "tensor {name:?}: ggml type {tid} is not a GGML type"
            ));
        };
        if let Some(&z) = dims.iter().find(|&&d| d == 0) {
            return Err(format!("tensor {name:?}: dimension {z} in {dims:?}"));
        }
        let numel = dims
            .iter()
            .try_fold(1u64, |a, &d| a.checked_mul(d))
            .ok_or_else(|| format!("tensor {name:?}: dims {dims:?} overflow 64 bits"))?;
        if !dims[0].is_multiple_of(ty.block) {
            return Err(format!(
                "tensor {name:?}: rows of {} elements are not whole {} blocks of {}",
                dims[0], ty.name, ty.block
            ));
        }
        let bytes = ty
            .bytes(numel)
            .ok_or_else(|| format!("tensor {name:?}: size overflows 64 bits"))?;
        if !names.insert(name.clone()) {
            return Err(format!("tensor {name:?} appears twice"));
        }
        dims.reverse();
        tensors.push(GgufTensor {
            name,
            shape: dims,
            ggml_type: ty.name,
            numel,
            bytes,
            offset,
        });
    }
    let header_bytes = c.pos;
    let data_offset = header_bytes
        .checked_next_multiple_of(alignment)
        .ok_or("header size overflows")?;
    if data_offset > c.len {
        return Err(format!(
            "the data section would start at byte {data_offset} but the file is {} bytes: truncated",
            c.len
        ));
    }
    // llama.cpp's rule (gguf.cpp): each tensor at the aligned end of the one before it.
    let mut expected = 0u64;
    let mut padding = data_offset - header_bytes;
    for t in &tensors {
        if t.offset != expected {
            return Err(format!(
                "tensor {:?}: offset {} but llama.cpp's layout puts it at {expected} (after the previous tensor, aligned to {alignment}): corrupt",
                t.name, t.offset
            ));
        }
        let padded = t
            .bytes
            .checked_next_multiple_of(alignment)
            .ok_or("tensor size overflows")?;
        padding += padded - t.bytes;
        expected = expected.checked_add(padded).ok_or("data size overflows")?;
    }
    let data_bytes: u64 = tensors.iter().map(|t| t.bytes).sum();
    let file_data = c.len - data_offset;
    // The last tensor's padding may be absent (llama.cpp does not read past the tensor).
    let last_pad = tensors
        .last()
        .map_or(0, |t| t.bytes.next_multiple_of(alignment) - t.bytes);
    if file_data + last_pad < expected {
        return Err(format!(
            "the tensors need {expected} data bytes after the header but the file holds {file_data}: truncated"
        ));
    }
    let (padding, trailing) = if file_data < expected {
        (padding - (expected - file_data), 0)
    } else {
        (padding, file_data - expected)
    };
    Ok(GgufHeader {
        path: path.to_path_buf(),
        version,
        file_bytes: c.len,
        header_bytes,
        alignment,
        data_offset,
        padding_bytes: padding,
        data_bytes,
        trailing_bytes: trailing,
        metadata,
        tensors,
    })
}

/// The architectures truesize maps to a config (llama.cpp `general.architecture`). Mistral and
/// Mixtral files say `llama` (llama.cpp converts them as Llama; Mixtral has `expert_count`).
pub const SUPPORTED_ARCHS: &[&str] = &["gpt2", "llama", "qwen2"];

/// llama.cpp permutes the rows of q and k for its `llama` architecture (interleaved RoPE
/// pairs instead of HF's rotate-half halves): `convert_hf_to_gguf.py` `LlamaModel.permute`,
/// `w.reshape(heads, 2, hd/2, in).swapaxes(1, 2)`. Qwen2 and GPT-2 are stored as in HF.
pub fn permutes_qk(arch: &str) -> bool {
    arch == "llama"
}

/// The config a GGUF header describes.
pub fn config_from_header(h: &GgufHeader) -> Result<ModelConfig> {
    let src = h.path.display().to_string();
    let bad = |key: &str, v: String, why: &str| Error::field(&src, key, v, why);
    let arch = match h.architecture() {
        Some(a) => a.to_string(),
        None => {
            return Err(bad(
                "general.architecture",
                "(missing)".into(),
                "a GGUF model file names its architecture",
            ))
        }
    };
    if !SUPPORTED_ARCHS.contains(&arch.as_str()) {
        return Err(bad(
            "general.architecture",
            format!("{arch:?}"),
            &format!("not supported; supported: {}", SUPPORTED_ARCHS.join(", ")),
        ));
    }
    let key = |k: &str| format!("{arch}.{k}");
    let int = |k: &str, default: Option<u64>| -> Result<u64> {
        let full = key(k);
        match h.meta(&full) {
            None => default.ok_or_else(|| bad(&full, "(missing)".into(), "required")),
            Some(v) => match v.as_u64() {
                Some(n) if n > 0 && n <= crate::config::MAX_DIM as u64 => Ok(n),
                _ => Err(bad(
                    &full,
                    format!("{v:?}"),
                    "must be a positive integer, at most 2^24",
                )),
            },
        }
    };
    let float = |k: &str, default: f64| -> Result<f64> {
        let full = key(k);
        match h.meta(&full) {
            None => Ok(default),
            Some(v) => match v.as_f64() {
                Some(x) if x.is_finite() && x > 0.0 => Ok(x),
                _ => Err(bad(&full, format!("{v:?}"), "must be a positive number")),
            },
        }
    };
    let n_embd = int("embedding_length", None)? as usize;
    let n_layer = int("block_count", None)? as usize;
    if n_layer > crate::config::MAX_LAYERS {
        return Err(bad(
            &key("block_count"),
            n_layer.to_string(),
            "is absurdly large",
        ));
    }
    let n_head = int("attention.head_count", None)? as usize;
    let n_kv_head = int("attention.head_count_kv", Some(n_head as u64))? as usize;
    let head_dim = int(
        "attention.key_length",
        Some((n_embd / n_head.max(1)).max(1) as u64),
    )? as usize;
    if let Some(v) = h.meta(&key("attention.value_length")) {
        if v.as_u64() != Some(head_dim as u64) {
            return Err(bad(
                &key("attention.value_length"),
                format!("{v:?}"),
                &format!("truesize's models need value_length = key_length = {head_dim}"),
            ));
        }
    }
    let embd = h.tensor("token_embd.weight").ok_or_else(|| {
        Error::file(
            &src,
            "has no token_embd.weight tensor (not a language model file?)",
        )
    })?;
    let vocab_from_tensor = embd.shape.first().copied().unwrap_or(0);
    let vocab = int("vocab_size", Some(vocab_from_tensor))? as usize;
    let has = |n: &str| h.tensor(n).is_some();
    let n_experts = match h.meta(&key("expert_count")) {
        None => 0,
        Some(_) => int("expert_count", None)? as usize,
    };
    let n_experts_per_tok = if n_experts > 0 {
        int("expert_used_count", None)? as usize
    } else {
        0
    };
    let (arch_enum, model_type, bias, qkv_bias, mlp_bias, eps) = match arch.as_str() {
        "gpt2" => (
            Arch::Gpt2,
            "gpt2",
            has("blk.0.attn_qkv.bias"),
            false,
            false,
            float("attention.layer_norm_epsilon", 1e-5)?,
        ),
        "qwen2" => (
            Arch::Llama,
            "qwen2",
            false,
            true,
            false,
            float("attention.layer_norm_rms_epsilon", 1e-6)?,
        ),
        _ => {
            let o_bias = has("blk.0.attn_output.bias");
            (
                Arch::Llama,
                if n_experts > 0 { "mixtral" } else { "llama" },
                o_bias,
                has("blk.0.attn_q.bias") && !o_bias,
                has("blk.0.ffn_gate.bias"),
                float("attention.layer_norm_rms_epsilon", 1e-5)?,
            )
        }
    };
    let sliding_window = match h.meta(&key("attention.sliding_window")) {
        None => None,
        Some(_) => Some(int("attention.sliding_window", None)? as usize),
    };
    let dims = Dims {
        vocab_size: vocab,
        block_size: int("context_length", None)? as usize,
        n_embd,
        n_layer,
        n_head,
        n_kv_head: if arch_enum == Arch::Gpt2 {
            n_head
        } else {
            n_kv_head
        },
        head_dim,
        intermediate_size: int("feed_forward_length", None)? as usize,
    };
    let mut cfg = ModelConfig::plain(src.clone(), arch_enum, model_type, dims);
    // llama.cpp's GPT-2 converter stores the tied head as a copy (`output.weight`); the
    // model itself (HF GPT-2) ties it. Other architectures tie when no head is stored.
    cfg.tie_embeddings = arch_enum == Arch::Gpt2 || !has("output.weight");
    cfg.bias = bias;
    cfg.qkv_bias = qkv_bias;
    cfg.mlp_bias = mlp_bias;
    cfg.n_experts = n_experts;
    cfg.n_experts_per_tok = n_experts_per_tok;
    if arch_enum != Arch::Gpt2 {
        cfg.set_rope_theta(float("rope.freq_base", 10_000.0)?);
    }
    cfg.norm_eps = eps;
    if let Some(window) = sliding_window {
        cfg.set_all_attention(Attention::Sliding { window });
    }
    cfg.validate()?;
    Ok(cfg)
}

/// Tensors a GGUF file may hold that are not parameters of the HF model: llama.cpp's Llama-3
/// RoPE frequency divisors and a GPT-2 file's copy of its tied head.
pub fn is_buffer(cfg: &ModelConfig, name: &str) -> bool {
    name == "rope_freqs.weight" || (cfg.arch == Arch::Gpt2 && name == "output.weight")
}

/// One tensor read for the engine: its stored type, engine shape and bytes.
pub struct RawTensor {
    pub ty: GgmlType,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

impl RawTensor {
    /// A float tensor (F32/F16/BF16) as a candle `Tensor` in its stored dtype.
    pub fn to_tensor(&self, dev: &Device) -> Result<Tensor> {
        let dt = match self.ty.name {
            "F32" => DType::F32,
            "F16" => DType::F16,
            "BF16" => DType::BF16,
            other => {
                return Err(Error::Internal(anyhow::anyhow!(
                    "{other} is not a float type"
                )))
            }
        };
        Ok(Tensor::from_raw_buffer(&self.data, dt, &self.shape, dev)?)
    }

    /// A quantized tensor as a candle `QTensor`.
    pub fn to_qtensor(&self, dev: &Device) -> Result<QTensor> {
        let Some(g) = self.ty.candle() else {
            return Err(Error::Usage(format!(
                "candle 0.11 cannot run {} tensors (only F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K–Q6_K)",
                self.ty.name
            )));
        };
        let storage = QStorage::from_data(std::borrow::Cow::Borrowed(&self.data), dev, g)?;
        Ok(QTensor::new(storage, self.shape.as_slice())?)
    }
}

/// An open GGUF file: our validated header, and candle's reader over the same file.
pub struct GgufFile {
    pub path: PathBuf,
    pub header: GgufHeader,
    content: gguf_file::Content,
    reader: BufReader<File>,
    arch: String,
    n_head: usize,
    n_kv_head: usize,
}

impl GgufFile {
    pub fn open(path: &Path, cfg: &ModelConfig) -> Result<Self> {
        let header = read_header(path)?;
        let f = File::open(path).map_err(|e| Error::file(path, format!("cannot open: {e}")))?;
        let mut reader = BufReader::new(f);
        let content = gguf_file::Content::read(&mut reader)
            .map_err(|e| Error::file(path, format!("candle's GGUF reader: {e}")))?;
        // The two readers must agree on every tensor and on where the data starts.
        if content.tensor_data_offset != header.data_offset
            || content.tensor_infos.len() != header.tensors.len()
        {
            return Err(Error::file(
                path,
                format!(
                    "candle reads {} tensors with data at {}, truesize {} at {}",
                    content.tensor_infos.len(),
                    content.tensor_data_offset,
                    header.tensors.len(),
                    header.data_offset
                ),
            ));
        }
        for t in &header.tensors {
            let ok = content.tensor_infos.get(&t.name).is_some_and(|ci| {
                ci.offset == t.offset
                    && ci
                        .shape
                        .dims()
                        .iter()
                        .map(|&d| d as u64)
                        .eq(t.shape.iter().copied())
                    && formats::GGML_TYPES
                        .iter()
                        .find(|g| g.name == t.ggml_type)
                        .and_then(|g| g.candle())
                        == Some(ci.ggml_dtype)
            });
            if !ok {
                return Err(Error::file(
                    path,
                    format!("candle's reader disagrees about tensor {:?}", t.name),
                ));
            }
        }
        Ok(Self {
            path: path.to_path_buf(),
            arch: header.architecture().unwrap_or("").to_string(),
            header,
            content,
            reader,
            n_head: cfg.n_head,
            n_kv_head: cfg.n_kv_head,
        })
    }

    pub fn has_tensor(&self, name: &str) -> bool {
        self.header.tensor(name).is_some()
    }

    /// Bytes of a tensor as stored, through candle's reader.
    fn bytes_of(&mut self, name: &str) -> Result<(GgmlType, Vec<u64>, Vec<u8>)> {
        let t = self
            .header
            .tensor(name)
            .ok_or_else(|| Error::file(&self.path, format!("has no tensor {name:?}")))?
            .clone();
        let ty = *formats::GGML_TYPES
            .iter()
            .find(|g| g.name == t.ggml_type)
            .ok_or_else(|| Error::Internal(anyhow::anyhow!("unknown type")))?;
        if ty.candle().is_none() {
            return Err(Error::file(
                &self.path,
                format!(
                    "tensor {name:?} is {}, which candle 0.11 cannot run",
                    ty.name
                ),
            ));
        }
        let q = self
            .content
            .tensor(&mut self.reader, name, &Device::Cpu)
            .map_err(|e| Error::file(&self.path, format!("tensor {name:?}: {e}")))?;
        let data = q.data()?.into_owned();
        Ok((ty, t.shape, data))
    }

    /// The tensor holding HF tensor `g` (a whole tensor, or one expert's slice of a stacked
    /// `*_exps` tensor), with llama.cpp's q/k row permutation undone, in the engine's shape.
    pub fn read_for_engine(&mut self, g: &GgufName, shape: &[usize]) -> Result<RawTensor> {
        let (ty, file_shape, mut data) = self.bytes_of(&g.name)?;
        let want: Vec<u64> = shape.iter().map(|&d| d as u64).collect();
        if let Some(e) = g.expert {
            let ok = file_shape.len() == want.len() + 1 && file_shape[1..] == want[..];
            let n_exp = file_shape.first().copied().unwrap_or(0) as usize;
            if !ok || e >= n_exp {
                return Err(Error::file(
                    &self.path,
                    format!(
                        "{}: shape {file_shape:?}, expected [experts, {want:?}]",
                        g.name
                    ),
                ));
            }
            let per = data.len() / n_exp;
            data = data[e * per..(e + 1) * per].to_vec();
        } else if file_shape != want {
            return Err(Error::file(
                &self.path,
                format!("{}: shape {file_shape:?}, expected {want:?}", g.name),
            ));
        }
        if permutes_qk(&self.arch) {
            let heads = if g.name.contains(".attn_q.") {
                Some(self.n_head)
            } else if g.name.contains(".attn_k.") {
                Some(self.n_kv_head)
            } else {
                None
            };
            if let Some(h) = heads {
                data = unpermute_rows(&data, shape[0], h)?;
            }
        }
        Ok(RawTensor {
            ty,
            shape: shape.to_vec(),
            data,
        })
    }

    /// llama.cpp's Llama-3 RoPE divisors (`rope_freqs.weight`, hd/2 f32), when stored.
    pub fn rope_freq_factors(&mut self) -> Result<Option<Vec<f32>>> {
        if !self.has_tensor("rope_freqs.weight") {
            return Ok(None);
        }
        let (ty, _, data) = self.bytes_of("rope_freqs.weight")?;
        if ty.name != "F32" {
            return Err(Error::file(&self.path, "rope_freqs.weight must be F32"));
        }
        Ok(Some(
            data.chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
        ))
    }
}

/// Undo `LlamaModel.permute` on the rows of a q or k projection (weight or bias) stored as
/// `rows` equal byte rows: the file's row `h·hd + 2i + j` is HF's row `h·hd + j·hd/2 + i`.
fn unpermute_rows(data: &[u8], rows: usize, heads: usize) -> Result<Vec<u8>> {
    if heads == 0
        || !rows.is_multiple_of(heads)
        || !(rows / heads).is_multiple_of(2)
        || !data.len().is_multiple_of(rows)
    {
        return Err(Error::Internal(anyhow::anyhow!(
            "cannot un-permute {rows} rows over {heads} heads"
        )));
    }
    let row = data.len() / rows;
    let hd = rows / heads;
    let half = hd / 2;
    let mut out = vec![0u8; data.len()];
    for h in 0..heads {
        for i in 0..half {
            for j in 0..2 {
                let file_row = h * hd + 2 * i + j;
                let hf_row = h * hd + j * half + i;
                out[hf_row * row..(hf_row + 1) * row]
                    .copy_from_slice(&data[file_row * row..(file_row + 1) * row]);
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal valid GGUF v3 file: `kvs` as (key, type, raw value bytes), `tensors` as
    /// (name, dims innermost first, type id, offset).
    pub fn build(
        kvs: &[(&str, u32, Vec<u8>)],
        tensors: &[(&str, Vec<u64>, u32, u64)],
        data: usize,
    ) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend(MAGIC.to_le_bytes());
        b.extend(3u32.to_le_bytes());
        b.extend((tensors.len() as u64).to_le_bytes());
        b.extend((kvs.len() as u64).to_le_bytes());
        for (k, t, v) in kvs {
            b.extend((k.len() as u64).to_le_bytes());
            b.extend(k.as_bytes());
            b.extend(t.to_le_bytes());
            b.extend(v);
        }
        for (n, dims, t, off) in tensors {
            b.extend((n.len() as u64).to_le_bytes());
            b.extend(n.as_bytes());
            b.extend((dims.len() as u32).to_le_bytes());
            for d in dims {
                b.extend(d.to_le_bytes());
            }
            b.extend(t.to_le_bytes());
            b.extend(off.to_le_bytes());
        }
        while b.len() % 32 != 0 {
            b.push(0);
        }
        b.resize(b.len() + data, 0);
        b
    }

    fn s(v: &str) -> Vec<u8> {
        let mut b = (v.len() as u64).to_le_bytes().to_vec();
        b.extend(v.as_bytes());
        b
    }

    #[test]
    fn reads_a_small_file_exactly() {
        let f = build(
            &[("general.architecture", 8, s("llama"))],
            &[("a", vec![32, 2], 8, 0), ("b", vec![3], 0, 96)],
            96 + 12,
        );
        let h = parse_bytes(&f).unwrap();
        assert_eq!(h.tensors[0].shape, vec![2, 32]);
        assert_eq!(h.tensors[0].bytes, 68);
        assert_eq!(h.tensors[1].bytes, 12);
        assert_eq!(
            h.header_bytes + h.padding_bytes + h.data_bytes,
            h.file_bytes
        );
        assert_eq!(h.architecture(), Some("llama"));
        assert_eq!(h.by_type()["Q8_0"].bytes, 68);
    }

    #[test]
    fn hostile_headers_are_errors() {
        let huge_count = {
            let mut b = build(&[], &[], 0);
            b[8..16].copy_from_slice(&(1u64 << 40).to_le_bytes());
            b
        };
        assert!(parse_bytes(&huge_count).unwrap_err().contains("absurd"));
        let many = {
            let mut b = build(&[], &[], 0);
            b[8..16].copy_from_slice(&1000u64.to_le_bytes());
            b
        };
        assert!(parse_bytes(&many).unwrap_err().contains("truncated"));
        let long_string = build(&[("k", 8, (1u64 << 40).to_le_bytes().to_vec())], &[], 0);
        assert!(parse_bytes(&long_string).unwrap_err().contains("limit"));
        let past_end = build(&[("k", 8, 1000u64.to_le_bytes().to_vec())], &[], 0);
        assert!(parse_bytes(&past_end).unwrap_err().contains("truncated"));
        let zero_align = build(
            &[("general.alignment", 4, 0u32.to_le_bytes().to_vec())],
            &[],
            0,
        );
        assert!(parse_bytes(&zero_align)
            .unwrap_err()
            .contains("power of two"));
        let bad_type = build(&[], &[("a", vec![4], 99, 0)], 32);
        assert!(parse_bytes(&bad_type)
            .unwrap_err()
            .contains("not a GGML type"));
        let overflow = build(&[], &[("a", vec![u64::MAX, u64::MAX], 0, 0)], 32);
        assert!(parse_bytes(&overflow).unwrap_err().contains("overflow"));
        let gap = build(&[], &[("a", vec![8], 0, 64)], 96);
        assert!(parse_bytes(&gap).unwrap_err().contains("offset"));
        let short = build(&[], &[("a", vec![64], 0, 0)], 100);
        assert!(parse_bytes(&short).unwrap_err().contains("truncated"));
        let misfit = build(&[], &[("a", vec![48], 8, 0)], 64);
        assert!(parse_bytes(&misfit).unwrap_err().contains("blocks"));
        assert!(parse_bytes(b"GGUF").unwrap_err().contains("truncated"));
        assert!(parse_bytes(b"GGML\x03\0\0\0")
            .unwrap_err()
            .contains("not a GGUF"));
        let nested = build(
            &[(
                "k",
                9,
                [9u32.to_le_bytes().to_vec(), 1u64.to_le_bytes().to_vec()].concat(),
            )],
            &[],
            0,
        );
        assert!(parse_bytes(&nested)
            .unwrap_err()
            .contains("arrays of arrays"));
    }

    /// llama.cpp's permutation for 2 heads of hd 4: HF rows [a0 a1 a2 a3 | b0 b1 b2 b3]
    /// (rotate-half pairs (a0, a2), (a1, a3)) are stored [a0 a2 a1 a3 | b0 b2 b1 b3].
    #[test]
    fn unpermute_inverts_llama_cpp() {
        let file: Vec<u8> = vec![0, 2, 1, 3, 4, 6, 5, 7];
        assert_eq!(
            unpermute_rows(&file, 8, 2).unwrap(),
            vec![0, 1, 2, 3, 4, 5, 6, 7]
        );
    }
}
