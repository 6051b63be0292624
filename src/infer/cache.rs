//! The KV cache, preallocated for the whole context as a server reserves it: per layer K and V
//! `[batch, kv_heads, capacity, head_dim]`, capacity = the context (prompt + generated tokens),
//! or the window for a sliding-window layer, which then is a ring (position p in slot p mod w).

use candle_core::{DType, Device, Result, Tensor};

#[derive(Debug)]
struct LayerKv {
    k: Tensor,
    v: Tensor,
    cap: usize,
}

#[derive(Debug)]
pub struct KvCache {
    layers: Vec<LayerKv>,
    dtype: DType,
}

/// Shape of one layer's cache.
#[derive(Debug, Clone, Copy)]
pub struct LayerShape {
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Tokens kept: the context, or the window of a sliding-window layer if smaller.
    pub capacity: usize,
}

impl KvCache {
    /// Allocate (zeroed) the cache for `batch` sequences.
    pub fn new(batch: usize, shapes: &[LayerShape], dtype: DType, dev: &Device) -> Result<Self> {
        let layers = shapes
            .iter()
            .map(|s| {
                let shape = (batch, s.kv_heads, s.capacity, s.head_dim);
                Ok(LayerKv {
                    k: Tensor::zeros(shape, dtype, dev)?,
                    v: Tensor::zeros(shape, dtype, dev)?,
                    cap: s.capacity,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { layers, dtype })
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Bytes of the K and V storages.
    pub fn bytes(&self) -> u64 {
        self.layers
            .iter()
            .map(|l| tensor_bytes(&l.k) + tensor_bytes(&l.v))
            .sum()
    }

    /// Store `k`, `v` (`[B, kv, T, hd]`, the cache dtype) for positions `start..start + T` of
    /// layer `i` and return the keys and values to attend over with the position each holds.
    ///
    /// While the positions fit the capacity they are written in place and attention reads a
    /// view of the first `start + T` slots. A one-token step on a full ring overwrites the
    /// oldest slot and reads the whole ring (exactly the window). A chunk that would overwrite
    /// slots its own earlier queries still need attends over the ring's old contents joined
    /// with the chunk, and only then stores the chunk's last `capacity` tokens.
    pub fn attend(
        &mut self,
        i: usize,
        k: Tensor,
        v: Tensor,
        start: usize,
        t: usize,
    ) -> Result<(Tensor, Tensor, Vec<usize>)> {
        let l = &mut self.layers[i];
        let cap = l.cap;
        if start + t <= cap {
            l.k.slice_set(&k, 2, start)?;
            l.v.slice_set(&v, 2, start)?;
            drop((k, v));
            let n = start + t;
            return Ok((l.k.narrow(2, 0, n)?, l.v.narrow(2, 0, n)?, (0..n).collect()));
        }
        // Position held by slot j of a ring whose newest position is `newest`.
        let held = |j: usize, newest: usize| newest - ((newest + cap - j) % cap);
        if t == 1 {
            let slot = start % cap;
            l.k.slice_set(&k, 2, slot)?;
            l.v.slice_set(&v, 2, slot)?;
            drop((k, v));
            let pos = (0..cap).map(|j| held(j, start)).collect();
            return Ok((l.k.clone(), l.v.clone(), pos));
        }
        let valid = start.min(cap);
        let mut pos: Vec<usize> = if start <= cap {
            (0..start).collect()
        } else {
            (0..cap).map(|j| held(j, start - 1)).collect()
        };
        pos.extend(start..start + t);
        let (keys, values) = if valid == 0 {
            (k.clone(), v.clone())
        } else {
            (
                Tensor::cat(&[&l.k.narrow(2, 0, valid)?, &k], 2)?,
                Tensor::cat(&[&l.v.narrow(2, 0, valid)?, &v], 2)?,
            )
        };
        // Keep the chunk's last `cap` positions, in at most two runs of slots.
        let first = (start + t).saturating_sub(cap).max(start);
        let mut p = first;
        while p < start + t {
            let slot = p % cap;
            let len = (cap - slot).min(start + t - p);
            let (ks, vs) = (
                k.narrow(2, p - start, len)?.contiguous()?,
                v.narrow(2, p - start, len)?.contiguous()?,
            );
            l.k.slice_set(&ks, 2, slot)?;
            l.v.slice_set(&vs, 2, slot)?;
            p += len;
        }
        Ok((keys, values, pos))
    }
}

/// Bytes of a tensor's elements (its storage when contiguous).
pub fn tensor_bytes(t: &Tensor) -> u64 {
    (t.elem_count() * t.dtype().size_in_bytes()) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tok(vals: &[f32]) -> Tensor {
        Tensor::from_vec(vals.to_vec(), (1, 1, vals.len(), 1), &Device::Cpu).unwrap()
    }

    /// A window-3 ring: after positions 0..5 it holds 3, 4, 5 (slots 0, 1, 2) and a chunk
    /// that overflows it attends over the old contents plus the chunk.
    #[test]
    fn ring_keeps_the_window() {
        let shape = LayerShape {
            kv_heads: 1,
            head_dim: 1,
            capacity: 3,
        };
        let mut c = KvCache::new(1, &[shape], DType::F32, &Device::Cpu).unwrap();
        // prefill 2 tokens (fits), then decode 0-token steps 2..6
        let (k, _, pos) = c.attend(0, tok(&[0., 1.]), tok(&[0., 1.]), 0, 2).unwrap();
        assert_eq!(pos, vec![0, 1]);
        assert_eq!(
            k.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            vec![0., 1.]
        );
        for p in 2..6 {
            let (k, _, pos) = c
                .attend(0, tok(&[p as f32]), tok(&[p as f32]), p, 1)
                .unwrap();
            let vals = k.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            for (slot, &pp) in pos.iter().enumerate() {
                assert_eq!(vals[slot], pp as f32, "slot {slot} at step {p}");
            }
        }
        // chunk of 4 at positions 6..10 over a full ring (3, 4, 5)
        let (k, _, pos) = c
            .attend(0, tok(&[6., 7., 8., 9.]), tok(&[6., 7., 8., 9.]), 6, 4)
            .unwrap();
        assert_eq!(pos, vec![3, 4, 5, 6, 7, 8, 9]);
        assert_eq!(
            k.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            vec![3., 4., 5., 6., 7., 8., 9.]
        );
        // the ring now holds 7, 8, 9 in slots 1, 2, 0
        let (k, _, pos) = c.attend(0, tok(&[10.]), tok(&[10.]), 10, 1).unwrap();
        assert_eq!(pos, vec![9, 10, 8]);
        assert_eq!(
            k.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            vec![9., 10., 8.]
        );
    }
}
