//! Census: what the genuine model really holds, counted tensor by tensor.

use crate::estimate::params::{Component, ComponentCount};
use candle_core::{DType, Storage, Tensor};
use candle_nn::VarMap;
use serde::Serialize;
use std::collections::{BTreeMap, HashMap, HashSet};

/// One tensor of the model.
#[derive(Debug, Clone, Serialize)]
pub struct TensorRow {
    pub name: String,
    pub shape: Vec<usize>,
    pub dtype: String,
    pub numel: u64,
    pub component: Option<Component>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Census {
    /// Elements over every distinct tensor (a tied weight once).
    pub numel: u64,
    pub tensors: usize,
    /// The dtype every tensor has, or "mixed".
    pub dtype: String,
    /// Element size in bytes from candle's `DType::size_in_bytes` (0 when mixed).
    pub element_bytes: u64,
    /// Σ numel × element size, per tensor.
    pub bytes: u64,
    /// Bytes of the buffers really behind the tensors (CPU: the storage `Vec`s, each distinct
    /// buffer once); `None` when nothing was allocated (shape-only) or on a device we can't read.
    pub storage_bytes: Option<u64>,
    /// True when counted from names and shapes without allocating.
    pub shapes_only: bool,
    #[serde(serialize_with = "crate::estimate::params::components_as_map")]
    pub components: Vec<ComponentCount>,
    /// Tensors whose names match no component (should be none for our own models).
    pub unclassified: Vec<String>,
    #[serde(skip)]
    pub rows: Vec<TensorRow>,
}

impl Census {
    pub fn get(&self, c: Component) -> u64 {
        self.components
            .iter()
            .find(|cc| cc.component == c)
            .map_or(0, |cc| cc.params)
    }

    /// Build from (name, shape, dtype) rows; `storage_bytes` as measured by the caller.
    pub fn from_rows(
        mut rows: Vec<TensorRow>,
        storage_bytes: Option<u64>,
        shapes_only: bool,
    ) -> Self {
        rows.sort_by(|a, b| a.name.cmp(&b.name));
        let mut per: BTreeMap<Component, u64> = BTreeMap::new();
        let mut unclassified = Vec::new();
        let mut bytes = 0u64;
        let mut dtypes: Vec<&str> = Vec::new();
        for r in &rows {
            match r.component {
                Some(c) => *per.entry(c).or_default() += r.numel,
                None => unclassified.push(r.name.clone()),
            }
            let size = dtype_from_str(&r.dtype).map_or(0, |d| d.size_in_bytes() as u64);
            bytes = bytes.saturating_add(r.numel.saturating_mul(size));
            if !dtypes.contains(&r.dtype.as_str()) {
                dtypes.push(&r.dtype);
            }
        }
        let (dtype, element_bytes) = match dtypes.as_slice() {
            [one] => (
                one.to_string(),
                dtype_from_str(one).map_or(0, |d| d.size_in_bytes() as u64),
            ),
            [] => ("none".to_string(), 0),
            _ => ("mixed".to_string(), 0),
        };
        let components = Component::ALL
            .iter()
            .map(|&c| ComponentCount {
                component: c,
                params: per.get(&c).copied().unwrap_or(0),
            })
            .collect();
        Census {
            numel: rows.iter().map(|r| r.numel).sum(),
            tensors: rows.len(),
            dtype,
            element_bytes,
            bytes,
            storage_bytes,
            shapes_only,
            components,
            unclassified,
            rows,
        }
    }
}

fn dtype_from_str(s: &str) -> Option<DType> {
    s.parse::<DType>().ok()
}

/// One tensor, grouped by the family's tensor list (`family::components_by_name`): a name the
/// list does not hold stays unclassified, and the census reports it.
pub fn row(
    name: &str,
    shape: &[usize],
    dtype: DType,
    components: &HashMap<String, Component>,
) -> TensorRow {
    TensorRow {
        name: name.to_string(),
        shape: shape.to_vec(),
        dtype: dtype.as_str().to_string(),
        numel: shape.iter().map(|&d| d as u64).product(),
        component: components.get(name).copied(),
    }
}

/// Address and byte length of a CPU tensor's buffer; `None` on other devices.
pub(crate) fn cpu_buffer(t: &Tensor) -> Option<(usize, u64)> {
    let (storage, _) = t.storage_and_layout();
    let s = match &*storage {
        Storage::Cpu(s) => s,
        _ => return None,
    };
    use candle_core::CpuStorage as C;
    fn span<T>(v: &[T]) -> (usize, u64) {
        (v.as_ptr() as usize, std::mem::size_of_val(v) as u64)
    }
    Some(match s {
        C::U8(v) => span(v),
        C::U32(v) => span(v),
        C::I16(v) => span(v),
        C::I32(v) => span(v),
        C::I64(v) => span(v),
        C::BF16(v) => span(v),
        C::F16(v) => span(v),
        C::F32(v) => span(v),
        C::F64(v) => span(v),
        _ => return None,
    })
}

/// Census of every variable the model holds (the VarMap is the model's storage), grouped by
/// `components` (`family::components_by_name`).
pub fn of_varmap(vm: &VarMap, components: &HashMap<String, Component>) -> Census {
    let data = vm.data().lock().unwrap_or_else(|e| e.into_inner());
    let mut rows = Vec::with_capacity(data.len());
    let mut seen = HashSet::new();
    let mut storage = Some(0u64);
    for (name, var) in data.iter() {
        let t = var.as_tensor();
        rows.push(row(name, t.dims(), t.dtype(), components));
        match (cpu_buffer(t), storage.as_mut()) {
            (Some((addr, len)), Some(total)) => {
                if seen.insert(addr) {
                    *total += len;
                }
            }
            _ => storage = None,
        }
    }
    Census::from_rows(rows, storage, false)
}
