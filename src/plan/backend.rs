//! A sharding `VarBuilder` backend: the genuine network's construction (`Model::load`) runs over
//! it, and every tensor the network requests is answered for one rank (TP rank, pipeline
//! stage) as the plan says: narrowed piece by piece along the split dimension, zero-padded
//! where the engine pads, absent where another stage holds it. What the rank would hold is
//! recorded; the network itself gets a zero-cost view of the full shape so that construction
//! goes on.
//!
//! Sources: shapes only (zero-strided views narrowed by candle: any size, no memory), or a
//! checkpoint, where whole even splits go through candle's own `ShardedSafeTensors` (as a
//! candle or mistral.rs rank loads) and the rest (padding, kv replication, fused segments,
//! `torch.chunk`'s uneven pieces) is cut from the full tensor.

use super::shard::TensorShard;
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::model::Model;
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::{Shard, ShardedSafeTensors, ShardedVarBuilder, SimpleBackend};
use candle_nn::{Init, VarBuilder};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Where the full tensors come from.
pub enum Source {
    /// Zero-strided views: shapes only.
    Shapes,
    /// safetensors files (one checkpoint, possibly sharded into several files).
    Checkpoint(Vec<PathBuf>),
}

/// What one rank holds: name → its tensor (a view for shape-only sources).
pub type RankTensors = BTreeMap<String, Tensor>;

struct Sharding {
    plan: HashMap<String, TensorShard>,
    tp: usize,
    tp_rank: usize,
    stage: usize,
    /// Parameter name → stored key.
    keys: HashMap<String, String>,
    st: Option<MmapedSafetensors>,
    sharded: Option<ShardedVarBuilder<'static>>,
    held: Arc<Mutex<RankTensors>>,
}

fn phantom(shape: &[usize], dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
    Tensor::zeros((), dtype, dev)?.broadcast_as(shape)
}

impl Sharding {
    /// The full tensor for `name` (real or a view).
    fn full(&self, t: &TensorShard, dtype: DType) -> candle_core::Result<Tensor> {
        match &self.st {
            None => phantom(&t.shape, dtype, &Device::Cpu),
            Some(st) => {
                let key = self.keys.get(&t.name).ok_or_else(|| {
                    candle_core::Error::Msg(format!("{} not in checkpoint", t.name))
                })?;
                st.load(key, &Device::Cpu)?.to_dtype(dtype)
            }
        }
    }

    /// Rank `tp_rank`'s tensor for `t`.
    fn slice(&self, t: &TensorShard, dtype: DType) -> candle_core::Result<Tensor> {
        let Some(dim) = t.dim else {
            return self.full(t, dtype);
        };
        let pieces = t.pieces(self.tp_rank, self.tp);
        // A whole even split of a checkpoint tensor: candle's own sharded loader.
        if let (Some(sh), [p]) = (&self.sharded, pieces.as_slice()) {
            if p.alloc == p.real && p.real * self.tp == t.shape[dim] && dim < 2 {
                let key = self.keys.get(&t.name).cloned().unwrap_or(t.name.clone());
                let hint = Shard {
                    dim,
                    rank: self.tp_rank,
                    world_size: self.tp,
                };
                return sh.get_with_hints_dtype(
                    t.local_shape(self.tp_rank, self.tp),
                    &key,
                    hint,
                    dtype,
                );
            }
        }
        let full = self.full(t, dtype)?;
        let shape = t.local_shape(self.tp_rank, self.tp);
        if self.st.is_none() {
            // Views cannot be concatenated without materialising them: narrow each piece (so
            // candle checks every bound) and hand back a view of the summed shape.
            let mut rows = 0;
            for p in &pieces {
                rows += full.narrow(dim, p.src_start, p.real)?.dim(dim)? + (p.alloc - p.real);
            }
            if rows != shape[dim] {
                candle_core::bail!(
                    "{}: pieces hold {rows} rows, plan says {}",
                    t.name,
                    shape[dim]
                );
            }
            return phantom(&shape, dtype, &Device::Cpu);
        }
        let mut parts = Vec::new();
        for p in &pieces {
            if p.real > 0 {
                parts.push(full.narrow(dim, p.src_start, p.real)?);
            }
            if p.alloc > p.real {
                let mut pad = t.shape.clone();
                pad[dim] = p.alloc - p.real;
                parts.push(Tensor::zeros(pad, dtype, &Device::Cpu)?);
            }
        }
        if parts.is_empty() {
            let mut empty = t.shape.clone();
            empty[dim] = 0;
            return Tensor::zeros(empty, dtype, &Device::Cpu);
        }
        Tensor::cat(&parts, dim)
    }
}

impl SimpleBackend for Sharding {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let t = self
            .plan
            .get(name)
            .ok_or_else(|| candle_core::Error::Msg(format!("{name} is not in the plan")))?;
        if t.shape != s.dims() {
            candle_core::bail!(
                "{name} requested as {:?}, planned as {:?}",
                s.dims(),
                t.shape
            );
        }
        let mut held = self
            .held
            .lock()
            .map_err(|_| candle_core::Error::Msg("a sharding lock was poisoned".into()))?;
        if t.stages.contains(&self.stage) && !held.contains_key(name) {
            held.insert(name.to_string(), self.slice(t, dtype)?);
        }
        phantom(s.dims(), dtype, dev)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("sharding needs the shape of {name}")
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.plan.contains_key(name)
    }
}

/// Build `cfg`'s network over the sharding backend for TP rank `tp_rank` of `tp` on stage
/// `stage`, and return what that rank holds.
pub fn build_rank(
    cfg: &ModelConfig,
    tensors: &[TensorShard],
    tp: usize,
    tp_rank: usize,
    stage: usize,
    source: &Source,
    dtype: DType,
) -> Result<RankTensors> {
    let (st, sharded, keys) = match source {
        Source::Shapes => (None, None, HashMap::new()),
        Source::Checkpoint(files) => {
            let open = |files: &[PathBuf]| {
                // SAFETY: the mapped files are only read, and nothing truncates the test
                // fixtures while they are mapped.
                unsafe { MmapedSafetensors::multi(files) }
                    .map_err(|e| Error::file(first(files), format!("cannot read safetensors: {e}")))
            };
            let st = open(files)?;
            let fam = crate::family::of(cfg);
            let keys = st
                .tensors()
                .into_iter()
                .map(|(stored, _)| (fam.canonical_name(&stored), stored))
                .collect();
            // candle's ShardedSafeTensors is built from its own mapping of the same files.
            let sharded = unsafe { ShardedSafeTensors::var_builder(files, dtype, &Device::Cpu) }
                .map_err(|e| Error::file(first(files), format!("cannot read safetensors: {e}")))?;
            (Some(st), Some(sharded), keys)
        }
    };
    let held = Arc::new(Mutex::new(RankTensors::new()));
    let backend = Sharding {
        plan: tensors
            .iter()
            .map(|t| (t.name.clone(), t.clone()))
            .collect(),
        tp,
        tp_rank,
        stage,
        keys,
        st,
        sharded,
        held: held.clone(),
    };
    let vb = VarBuilder::from_backend(Box::new(backend), dtype, Device::Cpu);
    drop(Model::load(vb, cfg)?);
    let out = std::mem::take(
        &mut *held
            .lock()
            .map_err(|_| Error::Internal(anyhow::anyhow!("a sharding lock was poisoned")))?,
    );
    Ok(out)
}

fn first(files: &[PathBuf]) -> &Path {
    files
        .first()
        .map_or(Path::new("checkpoint"), |p| p.as_path())
}
