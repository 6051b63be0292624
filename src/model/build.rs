//! Three `VarBuilder` backends that feed the same `Model::load`:
//! - [`shapes_only`]: records every parameter's name, shape and dtype and allocates nothing, so
//!   the census of a 405B-parameter model costs about a millisecond;
//! - [`random`]: seeded GPT-2/Llama initialisation, every parameter a `Var` in a `VarMap`;
//! - [`from_checkpoint`]: `model.safetensors` (or a sharded index), every parameter a `Var`,
//!   with every missing, mis-shaped and unexpected tensor reported at once.

use super::Model;
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Shape, Tensor, Var};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder, VarMap};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Serialize, Serializer};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

/// Bytes a `VarMap` allocates per parameter tensor beyond its data (name `String`, `Var`, map
/// slot, tensor and storage headers): measured 330–340 B per tensor on the fixtures and
/// baby-gpt (verify's "weights: allocated bytes" check); 336 B is the baby-gpt figure
/// (13,941,648 − 4 · 3,481,088) / 52 tensors.
pub const VARMAP_BYTES_PER_TENSOR: u64 = 336;

/// One parameter tensor as the network requests it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TensorSpec {
    /// HF checkpoint key, e.g. `model.layers.0.self_attn.q_proj.weight`.
    pub name: String,
    pub shape: Vec<usize>,
    #[serde(serialize_with = "dtype_as_str")]
    pub dtype: DType,
}

impl TensorSpec {
    pub fn numel(&self) -> u64 {
        self.shape.iter().map(|&d| d as u64).product()
    }
}

fn dtype_as_str<S: Serializer>(dtype: &DType, s: S) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_str(dtype.as_str())
}

fn lock<T>(m: &Mutex<T>) -> candle_core::Result<MutexGuard<'_, T>> {
    m.lock()
        .map_err(|_| candle_core::Error::Msg("a model-building lock was poisoned".into()))
}

/// A zero-strided view of one element: has the requested shape, holds no memory. Any op that
/// materialises it allocates the full size, so such tensors must never be computed with.
fn phantom(shape: Shape, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
    Tensor::zeros((), dtype, dev)?.broadcast_as(shape)
}

// ---------------------------------------------------------------------------------------------
// Shape only

#[derive(Default)]
struct ShapeRecorder {
    seen: Arc<Mutex<BTreeMap<String, TensorSpec>>>,
}

impl SimpleBackend for ShapeRecorder {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let mut seen = lock(&self.seen)?;
        if let Some(prev) = seen.get(name) {
            if prev.shape != s.dims() {
                candle_core::bail!("{name} requested as {:?} and as {:?}", prev.shape, s.dims());
            }
        } else {
            let spec = TensorSpec {
                name: name.to_string(),
                shape: s.dims().to_vec(),
                dtype,
            };
            seen.insert(name.to_string(), spec);
        }
        phantom(s, dtype, dev)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("shape-only build cannot serve {name} without a shape")
    }

    fn contains_tensor(&self, _: &str) -> bool {
        false
    }
}

/// Every parameter of the genuine network for `cfg`, sorted by name, tied weights once, without
/// allocating any of them: the real `Model::load` runs over a recording backend.
pub fn shapes_only(cfg: &ModelConfig, dtype: DType) -> Result<Vec<TensorSpec>> {
    let seen = Arc::new(Mutex::new(BTreeMap::new()));
    let backend = ShapeRecorder { seen: seen.clone() };
    let vb = VarBuilder::from_backend(Box::new(backend), dtype, Device::Cpu);
    // The model holds zero-strided views only; dropping it frees nothing of note.
    drop(Model::load(vb, cfg)?);
    let specs = lock(&seen)?.values().cloned().collect();
    Ok(specs)
}

// ---------------------------------------------------------------------------------------------
// Random init

struct RandomInit {
    varmap: VarMap,
    rng: Mutex<StdRng>,
}

/// Draw `n` values for `init` from `rng`. Normals by Box–Muller: `rand` alone has no normal
/// distribution, and a fixed algorithm keeps a seed's values stable.
fn sample(init: Init, n: usize, rng: &mut StdRng) -> candle_core::Result<Vec<f32>> {
    Ok(match init {
        Init::Const(c) => vec![c as f32; n],
        Init::Uniform { lo, up } => (0..n)
            .map(|_| (lo + (up - lo) * rng.random::<f64>()) as f32)
            .collect(),
        Init::Randn { mean, stdev } => {
            let mut v = Vec::with_capacity(n + 1);
            while v.len() < n {
                // u1 in (0, 1] so that ln(u1) is finite.
                let u1 = 1.0 - rng.random::<f64>();
                let u2 = rng.random::<f64>();
                let r = (-2.0 * u1.ln()).sqrt();
                let (s, c) = (std::f64::consts::TAU * u2).sin_cos();
                v.push((mean + stdev * r * c) as f32);
                v.push((mean + stdev * r * s) as f32);
            }
            v.truncate(n);
            v
        }
        Init::Kaiming { .. } => candle_core::bail!("Kaiming init is not used by these models"),
    })
}

impl SimpleBackend for RandomInit {
    fn get(
        &self,
        s: Shape,
        name: &str,
        init: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let mut data = lock(self.varmap.data())?;
        if let Some(var) = data.get(name) {
            if var.shape() != &s {
                candle_core::bail!("{name} requested as {s:?} and as {:?}", var.shape());
            }
            return Ok(var.as_tensor().clone());
        }
        let values = sample(init, s.elem_count(), &mut *lock(&self.rng)?)?;
        let t = Tensor::from_vec(values, s, &Device::Cpu)?
            .to_dtype(dtype)?
            .to_device(dev)?;
        let var = Var::from_tensor(&t)?;
        let t = var.as_tensor().clone();
        data.insert(name.to_string(), var);
        Ok(t)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("random init cannot create {name} without a shape")
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.varmap
            .data()
            .lock()
            .is_ok_and(|d| d.contains_key(name))
    }
}

/// A freshly initialised network (weights N(0, 0.02), GPT-2's residual projections scaled by
/// 1/sqrt(2L), biases 0, norm weights 1), identical for identical `seed`s. Every parameter is a
/// `Var` in the returned map; a tied weight is one `Var`.
pub fn random(
    cfg: &ModelConfig,
    dtype: DType,
    device: &Device,
    seed: u64,
) -> Result<(VarMap, Model)> {
    let varmap = VarMap::new();
    let backend = RandomInit {
        varmap: varmap.clone(),
        rng: Mutex::new(StdRng::seed_from_u64(seed)),
    };
    let vb = VarBuilder::from_backend(Box::new(backend), dtype, device.clone());
    let model = Model::load(vb, cfg)?;
    Ok((varmap, model))
}

// ---------------------------------------------------------------------------------------------
// Checkpoint

/// A network whose every parameter is a `Var` initialised from a checkpoint.
pub struct Loaded {
    pub varmap: VarMap,
    pub model: Model,
    /// Checkpoint tensors the network does not use (non-parameter buffers such as GPT-2's
    /// `h.N.attn.bias` or Llama-2's `rotary_emb.inv_freq`, a stored copy of a tied head), sorted.
    pub unexpected: Vec<String>,
}

#[derive(Default)]
struct Problems {
    /// Checkpoint names consumed.
    used: BTreeSet<String>,
    missing: Vec<String>,
    /// (name, expected, found)
    misshaped: Vec<(String, Vec<usize>, Vec<usize>)>,
    /// Tensors present with the right shape that could not be read (e.g. an unsupported dtype).
    unreadable: Vec<(String, String)>,
}

struct Checkpoint {
    st: MmapedSafetensors,
    /// Parameter name (the family's spelling) -> the key stored in the checkpoint (hub GPT-2
    /// checkpoints drop the `transformer.` prefix).
    keys: HashMap<String, String>,
    varmap: VarMap,
    problems: Arc<Mutex<Problems>>,
}

impl Checkpoint {
    /// The checkpoint key holding parameter `name`.
    fn resolve(&self, name: &str) -> Option<String> {
        self.keys.get(name).cloned()
    }
}

impl SimpleBackend for Checkpoint {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let mut data = lock(self.varmap.data())?;
        if let Some(var) = data.get(name) {
            return Ok(var.as_tensor().clone());
        }
        let mut problems = lock(&self.problems)?;
        // On any problem, hand back a placeholder of the right shape so that loading goes on
        // and every problem is reported together.
        let Some(key) = self.resolve(name) else {
            problems.missing.push(name.to_string());
            return phantom(s, dtype, dev);
        };
        problems.used.insert(key.clone());
        let found = match self.st.get(&key) {
            Ok(view) => view.shape().to_vec(),
            Err(e) => {
                problems.unreadable.push((key, e.to_string()));
                return phantom(s, dtype, dev);
            }
        };
        if found != s.dims() {
            problems
                .misshaped
                .push((name.to_string(), s.dims().to_vec(), found));
            return phantom(s, dtype, dev);
        }
        // Convert on the host, then move: a bf16 model on a GPU never holds the f32 copy there.
        let loaded = self
            .st
            .load(&key, &Device::Cpu)
            .and_then(|t| t.to_dtype(dtype))
            .and_then(|t| t.to_device(dev))
            .and_then(|t| Var::from_tensor(&t));
        match loaded {
            Ok(var) => {
                let t = var.as_tensor().clone();
                data.insert(name.to_string(), var);
                Ok(t)
            }
            Err(e) => {
                problems.unreadable.push((key, e.to_string()));
                phantom(s, dtype, dev)
            }
        }
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("checkpoint loading needs the shape of {name}")
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.resolve(name).is_some()
    }
}

/// Build the network for `cfg` with every parameter a `Var` read from the checkpoint in `dir`
/// (converted to `dtype`, placed on `device`). Errors list every missing and mis-shaped tensor.
pub fn from_checkpoint(
    cfg: &ModelConfig,
    dir: &Path,
    dtype: DType,
    device: &Device,
) -> Result<Loaded> {
    let files = crate::checkpoint::resolve(dir)?.files;
    // SAFETY: the mapped files are only read; like every mmap-based loader (candle, safetensors,
    // PyTorch) this assumes no one truncates them while the model is being built.
    let st = unsafe {
        if files.len() == 1 {
            MmapedSafetensors::new(&files[0])
        } else {
            MmapedSafetensors::multi(&files)
        }
    }
    .map_err(|e| Error::file(dir, format!("cannot read safetensors: {e}")))?;
    let names: BTreeSet<String> = st.tensors().into_iter().map(|(n, _)| n).collect();
    let fam = crate::family::of(cfg);
    let keys = names
        .iter()
        .map(|stored| (fam.canonical_name(stored), stored.clone()))
        .collect();
    let varmap = VarMap::new();
    let problems = Arc::new(Mutex::new(Problems::default()));
    let backend = Checkpoint {
        st,
        keys,
        varmap: varmap.clone(),
        problems: problems.clone(),
    };
    let vb = VarBuilder::from_backend(Box::new(backend), dtype, device.clone());
    let model = Model::load(vb, cfg)?;
    let problems = std::mem::take(&mut *lock(&problems)?);
    let mut why = Vec::new();
    if !problems.missing.is_empty() {
        why.push(format!(
            "{} tensor(s) missing: {}",
            problems.missing.len(),
            problems.missing.join(", ")
        ));
    }
    if !problems.misshaped.is_empty() {
        let list: Vec<String> = problems
            .misshaped
            .iter()
            .map(|(n, want, got)| format!("{n} expected {want:?} found {got:?}"))
            .collect();
        why.push(format!(
            "{} tensor(s) with the wrong shape: {}",
            list.len(),
            list.join(", ")
        ));
    }
    if !problems.unreadable.is_empty() {
        let list: Vec<String> = problems
            .unreadable
            .iter()
            .map(|(n, e)| format!("{n}: {e}"))
            .collect();
        why.push(format!("unreadable tensor(s): {}", list.join("; ")));
    }
    if !why.is_empty() {
        return Err(Error::file(
            dir,
            format!(
                "does not match the {} config {}: {}",
                cfg.model_type,
                cfg.name,
                why.join("; ")
            ),
        ));
    }
    let unexpected = names
        .difference(&problems.used)
        .filter(|stored| !fam.outside_model(&fam.canonical_name(stored)))
        .cloned()
        .collect();
    Ok(Loaded {
        varmap,
        model,
        unexpected,
    })
}
