//! The inference network: GPT-2 and the Llama skeleton (Llama, Mistral with its sliding window,
//! Qwen2's q/k/v biases, Mixtral's experts, GQA/MQA, explicit head_dim), forward only, with a
//! KV cache.
//!
//! No autograd runs here, so candle's fused kernels are used (`rms_norm`, `layer_norm`,
//! `softmax_last_dim`, `rope`): each allocates its output and nothing else. The op order below
//! is what `estimate::serve::peaks` replays to predict the peaks; change one, change the other.
//!
//! Layout choices that keep the memory small and predictable:
//! - float weight matrices are held transposed, `[in, out]` contiguous: gemm then multiplies
//!   them in place (a `W.t()` view of a small `[out, in]` matrix makes gemm copy it whole first);
//! - the K/V cache is `[batch, kv_heads, capacity, head_dim]` per layer, written in place, and
//!   attention reads a narrowed view of it;
//! - grouped-query attention folds the query heads that share a kv head into rows
//!   (`[B, kv, rep·T, hd]`) instead of repeating K and V;
//! - a prefill computes the logits of the last position only unless all are asked for.

use super::cache::{tensor_bytes, KvCache};
use crate::error::Result as TsResult;
use candle_core::quantized::QTensor;
use candle_core::{DType, Device, Result, Tensor, D};
use std::sync::Arc;

/// A weight used as `y = x·Wᵀ`.
#[derive(Debug, Clone)]
pub enum Matrix {
    /// A float matrix held transposed, `[in, out]`, contiguous.
    Dense(Tensor),
    /// A float matrix `[out, in]` shared with an embedding table (a tied head).
    DenseRows(Tensor),
    /// A block-quantized matrix `[out, in]` (candle `QTensor`, multiplied in f32).
    Quant(Arc<QTensor>),
}

impl Matrix {
    /// x: `[N, in]` contiguous, in the activation dtype -> `[N, out]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Matrix::Dense(wt) => {
                if wt.dtype() == x.dtype() {
                    x.matmul(wt)
                } else {
                    // f16 weights with f32 activations: widened for this product only.
                    let w = wt.to_dtype(x.dtype())?;
                    x.matmul(&w)
                }
            }
            Matrix::DenseRows(w) => {
                if w.dtype() == x.dtype() {
                    x.matmul(&w.t()?)
                } else {
                    let w = w.to_dtype(x.dtype())?;
                    x.matmul(&w.t()?)
                }
            }
            Matrix::Quant(q) => x.apply_op1_no_bwd(q.as_ref()),
        }
    }

    /// Bytes of the storage behind this weight.
    pub fn storage_bytes(&self) -> u64 {
        match self {
            Matrix::Dense(t) | Matrix::DenseRows(t) => tensor_bytes(t),
            Matrix::Quant(q) => q.storage_size_in_bytes() as u64,
        }
    }
}

/// `f(x)`, then `x` freed: a plain `let x = f(&x)` would keep the old tensor alive (shadowing
/// does not drop) until the end of the scope, an extra copy at every step.
fn then(x: Tensor, f: impl FnOnce(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
    f(&x)
}

/// `x` in `dtype`, the original freed once converted.
fn cast(x: Tensor, dtype: DType) -> Result<Tensor> {
    if x.dtype() == dtype {
        Ok(x)
    } else {
        x.to_dtype(dtype)
    }
}

/// A token embedding table `[vocab, d]`.
#[derive(Debug, Clone)]
pub enum Embedding {
    Dense(Tensor),
    Quant(Arc<QTensor>),
}

impl Embedding {
    /// ids `[N]` u32 -> `[N, d]` in `act`.
    fn forward(&self, ids: &Tensor, act: DType) -> Result<Tensor> {
        match self {
            Embedding::Dense(t) => cast(t.index_select(ids, 0)?, act),
            // Dequantizes the selected rows into f32.
            Embedding::Quant(q) => q.embedding(ids),
        }
    }

    /// The same storage as a head matrix (tied embeddings).
    pub fn as_head(&self) -> Matrix {
        match self {
            Embedding::Dense(t) => Matrix::DenseRows(t.clone()),
            Embedding::Quant(q) => Matrix::Quant(q.clone()),
        }
    }

    pub fn storage_bytes(&self) -> u64 {
        match self {
            Embedding::Dense(t) => tensor_bytes(t),
            Embedding::Quant(q) => q.storage_size_in_bytes() as u64,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Linear {
    pub w: Matrix,
    pub b: Option<Tensor>,
}

impl Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = self.w.forward(x)?;
        match &self.b {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }
}

#[derive(Debug, Clone)]
pub enum Norm {
    Rms {
        w: Tensor,
        eps: f32,
    },
    /// LayerNorm; a bias-free one carries a zero shift (candle's fused kernel takes one).
    Layer {
        w: Tensor,
        b: Tensor,
        eps: f32,
    },
}

impl Norm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Norm::Rms { w, eps } => candle_nn::ops::rms_norm(x, w, *eps),
            Norm::Layer { w, b, eps } => candle_nn::ops::layer_norm(x, w, b, *eps),
        }
    }
}

#[derive(Debug, Clone)]
pub enum Qkv {
    /// Separate q, k, v projections (Llama family).
    Separate { q: Linear, k: Linear, v: Linear },
    /// One projection whose rows are q | k | v (GPT-2's `c_attn`).
    Fused(Linear),
}

#[derive(Debug, Clone)]
pub struct Attention {
    pub qkv: Qkv,
    pub o: Linear,
    pub n_head: usize,
    pub n_kv_head: usize,
    pub head_dim: usize,
    /// Rotary embedding on q and k (not GPT-2).
    pub rope: bool,
}

#[derive(Debug, Clone)]
pub struct SwiGlu {
    pub gate: Linear,
    pub up: Linear,
    pub down: Linear,
}

impl SwiGlu {
    /// x: `[N, d]`, consumed (freed once gate and up have read it).
    fn forward(&self, x: Tensor) -> Result<Tensor> {
        let g = self.gate.forward(&x)?;
        let u = self.up.forward(&x)?;
        drop(x);
        let a = g.silu()?;
        drop(g);
        let p = (a * u)?;
        self.down.forward(&p)
    }
}

#[derive(Debug, Clone)]
pub enum Mlp {
    /// GPT-2: down(gelu_tanh(up(x))).
    Gelu {
        up: Linear,
        down: Linear,
    },
    SwiGlu(SwiGlu),
    /// Mixtral: softmax over all experts' router logits (f32), top k, renormalised.
    Moe {
        router: Linear,
        experts: Vec<SwiGlu>,
        top_k: usize,
    },
}

impl Mlp {
    /// x: `[N, d]` (consumed) -> `[N, d]`.
    fn forward(&self, x: Tensor) -> Result<Tensor> {
        match self {
            Mlp::Gelu { up, down } => {
                let h = up.forward(&x)?;
                drop(x);
                let g = h.gelu()?;
                drop(h);
                down.forward(&g)
            }
            Mlp::SwiGlu(m) => m.forward(x),
            Mlp::Moe {
                router,
                experts,
                top_k,
            } => moe(&x, router, experts, *top_k),
        }
    }
}

/// Mixtral's sparse block (HF `MixtralSparseMoeBlock`): experts run only on their tokens and
/// are summed in expert order, as HF's `index_add_` loop does.
fn moe(x: &Tensor, router: &Linear, experts: &[SwiGlu], top_k: usize) -> Result<Tensor> {
    let (n, _) = x.dims2()?;
    let n_exp = experts.len();
    let logits = cast(router.forward(x)?, DType::F32)?;
    let probs = then(logits, candle_nn::ops::softmax_last_dim)?;
    let host: Vec<f32> = probs.flatten_all()?.to_vec1()?;
    drop(probs);
    let mut tokens_of: Vec<Vec<u32>> = vec![Vec::new(); n_exp];
    let mut weight_of: Vec<Vec<f32>> = vec![Vec::new(); n_exp];
    for i in 0..n {
        let row = &host[i * n_exp..(i + 1) * n_exp];
        let mut order: Vec<usize> = (0..n_exp).collect();
        // Stable sort, descending: ties go to the lower expert index, as torch.topk does.
        order.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
        let chosen = &order[..top_k.min(n_exp)];
        let sum: f32 = chosen.iter().map(|&e| row[e]).sum();
        for &e in chosen {
            tokens_of[e].push(i as u32);
            weight_of[e].push(row[e] / sum);
        }
    }
    drop(host);
    let mut out = x.zeros_like()?;
    for (e, expert) in experts.iter().enumerate() {
        if tokens_of[e].is_empty() {
            continue;
        }
        let m = tokens_of[e].len();
        let idx = Tensor::new(tokens_of[e].as_slice(), x.device())?;
        let xe = x.index_select(&idx, 0)?;
        let ye = expert.forward(xe)?;
        let we = cast(
            Tensor::from_vec(std::mem::take(&mut weight_of[e]), (m, 1), x.device())?,
            x.dtype(),
        )?;
        let ye = then(ye, |ye| ye.broadcast_mul(&we))?;
        drop(we);
        out = out.index_add(&idx, &ye, 0)?;
    }
    Ok(out)
}

#[derive(Debug, Clone)]
pub struct Layer {
    pub attn_norm: Norm,
    pub attn: Attention,
    pub mlp_norm: Norm,
    pub mlp: Mlp,
    /// Sliding window of this layer (a token sees itself and the w − 1 before it).
    pub window: Option<usize>,
}

/// RoPE settings (HF `rope_theta`, Llama-3 scaling, or a GGUF file's frequency factors).
#[derive(Debug, Clone)]
pub struct RopeSpec {
    /// Inverse frequencies θ^(-2i/hd), i < hd/2, after any scaling, in f32 as HF computes them.
    pub inv_freq: Vec<f32>,
}

impl RopeSpec {
    /// cos and sin `[T, hd/2]` for positions `start..start + t`, in `dtype`.
    fn tables(
        &self,
        start: usize,
        t: usize,
        dtype: DType,
        dev: &Device,
    ) -> Result<(Tensor, Tensor)> {
        let half = self.inv_freq.len();
        let mut cos = Vec::with_capacity(t * half);
        let mut sin = Vec::with_capacity(t * half);
        for pos in start..start + t {
            for &f in &self.inv_freq {
                // HF: (position as f32) · inv_freq in f32, then cos/sin.
                let a = pos as f32 * f;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
        let cos = Tensor::from_vec(cos, (t, half), dev)?;
        let sin = Tensor::from_vec(sin, (t, half), dev)?;
        if dtype == DType::F32 {
            Ok((cos, sin))
        } else {
            Ok((cos.to_dtype(dtype)?, sin.to_dtype(dtype)?))
        }
    }
}

/// Which logits a forward returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    /// `[B, V]` for the last position (a prefill that only needs the next token).
    Last,
    /// `[B, T, V]` for every position.
    All,
}

#[derive(Debug, Clone)]
pub struct InferModel {
    pub embed: Embedding,
    /// GPT-2's learned positions `[block, d]`, in the activation dtype.
    pub positions: Option<Tensor>,
    pub layers: Vec<Layer>,
    pub norm: Norm,
    pub head: Matrix,
    /// The head is the embedding's storage (tied), counted once.
    pub head_tied: bool,
    pub rope: Option<RopeSpec>,
    /// Activation dtype.
    pub act: DType,
    pub vocab: usize,
    pub d: usize,
    pub device: Device,
}

/// The additive mask `[T, S]` for queries at positions `q_pos` and keys at positions `k_pos`:
/// 0 where the key is visible (not in the future, inside the window), −∞ elsewhere.
fn mask(
    q_pos: &[usize],
    k_pos: &[usize],
    window: Option<usize>,
    dtype: DType,
    dev: &Device,
) -> Result<Tensor> {
    let mut m = Vec::with_capacity(q_pos.len() * k_pos.len());
    for &q in q_pos {
        for &k in k_pos {
            let visible = k <= q && window.is_none_or(|w| q - k < w);
            m.push(if visible { 0f32 } else { f32::NEG_INFINITY });
        }
    }
    let m = Tensor::from_vec(m, (q_pos.len(), k_pos.len()), dev)?;
    if dtype == DType::F32 {
        Ok(m)
    } else {
        m.to_dtype(dtype)
    }
}

impl InferModel {
    /// Storage bytes of every weight, each storage once (a tied head is the embedding).
    pub fn storage_bytes(&self) -> u64 {
        let mut total = self.embed.storage_bytes();
        if let Some(p) = &self.positions {
            total += tensor_bytes(p);
        }
        if !self.head_tied {
            total += self.head.storage_bytes();
        }
        let norm = |n: &Norm| match n {
            Norm::Rms { w, .. } => tensor_bytes(w),
            Norm::Layer { w, b, .. } => tensor_bytes(w) + tensor_bytes(b),
        };
        let lin = |l: &Linear| l.w.storage_bytes() + l.b.as_ref().map_or(0, tensor_bytes);
        let swiglu = |m: &SwiGlu| lin(&m.gate) + lin(&m.up) + lin(&m.down);
        total += norm(&self.norm);
        for l in &self.layers {
            total += norm(&l.attn_norm) + norm(&l.mlp_norm) + lin(&l.attn.o);
            total += match &l.attn.qkv {
                Qkv::Separate { q, k, v } => lin(q) + lin(k) + lin(v),
                Qkv::Fused(f) => lin(f),
            };
            total += match &l.mlp {
                Mlp::Gelu { up, down } => lin(up) + lin(down),
                Mlp::SwiGlu(m) => swiglu(m),
                Mlp::Moe {
                    router, experts, ..
                } => lin(router) + experts.iter().map(swiglu).sum::<u64>(),
            };
        }
        total
    }

    /// One forward over `ids` (`[B, T]` u32) at positions `start..start + T`, reading and
    /// extending `cache`. Returns f32 logits `[B, V]` (Last) or `[B, T, V]` (All).
    pub fn forward(
        &self,
        ids: &Tensor,
        start: usize,
        cache: &mut KvCache,
        logits: Logits,
    ) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let d = self.d;
        let flat = ids.flatten_all()?;
        // [B·T, d]
        let mut x = self.embed.forward(&flat, self.act)?;
        drop(flat);
        if let Some(p) = &self.positions {
            // [B·T, d] -> [B, T, d] + [T, d]
            let pos = p.narrow(0, start, t)?;
            x = x
                .reshape((b, t, d))?
                .broadcast_add(&pos)?
                .reshape((b * t, d))?;
        }
        let rope = match &self.rope {
            Some(r) => Some(r.tables(start, t, self.act, &self.device)?),
            None => None,
        };
        // Masks are shared by layers with the same window and cache state.
        let mut masks: Vec<(Option<usize>, Tensor)> = Vec::new();
        for (i, layer) in self.layers.iter().enumerate() {
            let h = layer.attn_norm.forward(&x)?;
            let a = self.attention(i, layer, h, b, t, start, cache, rope.as_ref(), &mut masks)?;
            x = (x + a)?;
            let h = layer.mlp_norm.forward(&x)?;
            let m = layer.mlp.forward(h)?;
            x = (x + m)?;
        }
        drop(masks);
        drop(rope);
        let out = match logits {
            Logits::Last => {
                // [B, T, d] -> [B, 1, d] -> [B, d]
                let last = x.reshape((b, t, d))?.narrow(1, t - 1, 1)?.contiguous()?;
                drop(x);
                let normed = then(last, |l| self.norm.forward(&l.reshape((b, d))?))?;
                self.head.forward(&normed)?
            }
            Logits::All => {
                let h = self.norm.forward(&x)?;
                drop(x);
                self.head.forward(&h)?.reshape((b, t, self.vocab))?
            }
        };
        cast(out, DType::F32)
    }

    /// Self-attention of layer `i` on `h` (`[B·T, d]`, consumed). Returns `[B·T, d]`.
    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        i: usize,
        layer: &Layer,
        h: Tensor,
        b: usize,
        t: usize,
        start: usize,
        cache: &mut KvCache,
        rope: Option<&(Tensor, Tensor)>,
        masks: &mut Vec<(Option<usize>, Tensor)>,
    ) -> Result<Tensor> {
        let at = &layer.attn;
        let (nh, nkv, hd) = (at.n_head, at.n_kv_head, at.head_dim);
        // [B·T, n·hd] -> [B, T, n, hd] -> [B, n, T, hd]
        let heads = |x: Tensor, n: usize| -> Result<Tensor> {
            x.reshape((b, t, n, hd))?.transpose(1, 2)?.contiguous()
        };
        let (q, k, v) = match &at.qkv {
            Qkv::Separate { q, k, v } => {
                let (q, k, v) = (q.forward(&h)?, k.forward(&h)?, v.forward(&h)?);
                drop(h);
                (heads(q, nh)?, heads(k, nkv)?, heads(v, nkv)?)
            }
            Qkv::Fused(f) => {
                let qkv = f.forward(&h)?;
                drop(h);
                let (qd, kd) = (nh * hd, nkv * hd);
                let q = heads(qkv.narrow(1, 0, qd)?, nh)?;
                let k = heads(qkv.narrow(1, qd, kd)?, nkv)?;
                let v = heads(qkv.narrow(1, qd + kd, kd)?, nkv)?;
                (q, k, v)
            }
        };
        let (q, k) = match (at.rope, rope) {
            (true, Some((cos, sin))) => (
                then(q, |q| candle_nn::rotary_emb::rope(q, cos, sin))?,
                then(k, |k| candle_nn::rotary_emb::rope(k, cos, sin))?,
            ),
            _ => (q, k),
        };
        // HF scales the scores by hd^-½; scaling q first is the same product, on fewer numbers.
        let q = then(q, |q| q.affine(1.0 / (hd as f64).sqrt(), 0.0))?;
        let kv_dtype = cache.dtype();
        let k = cast(k, kv_dtype)?;
        let v = cast(v, kv_dtype)?;
        // Keys/values to attend over and the positions they hold.
        let (keys, values, k_pos) = cache.attend(i, k, v, start, t)?;
        // A mask is needed when some query cannot see some key: a key after the first query, or
        // one older than the last query's window.
        let newest = k_pos.iter().copied().max().unwrap_or(0);
        let oldest = k_pos.iter().copied().min().unwrap_or(0);
        let needs_mask =
            newest > start || layer.window.is_some_and(|w| start + t - 1 - oldest >= w);
        let rep = nh / nkv;
        let s = keys.dim(2)?;
        // [B, H, T, hd] -> [B, kv, rep·T, hd]: the query heads sharing a kv head become rows.
        let q = then(q, |q| q.reshape((b, nkv, rep * t, hd)))?;
        let keys = cast(keys, self.act)?;
        // [B, kv, rep·T, hd] @ [B, kv, hd, S] -> [B, kv, rep·T, S]
        let scores = q.matmul(&keys.t()?)?;
        drop(q);
        drop(keys);
        let scores = if needs_mask {
            let m = match masks
                .iter()
                .find(|(w, m)| *w == layer.window && m.dim(1).ok() == Some(s))
            {
                Some((_, m)) => m.clone(),
                None => {
                    let q_pos: Vec<usize> = (start..start + t).collect();
                    let m = mask(&q_pos, &k_pos, layer.window, self.act, &self.device)?;
                    masks.push((layer.window, m.clone()));
                    m
                }
            };
            then(scores, |sc| {
                sc.reshape((b, nkv, rep, t, s))?
                    .broadcast_add(&m)?
                    .reshape((b, nkv, rep * t, s))
            })?
        } else {
            scores
        };
        let probs = then(scores, candle_nn::ops::softmax_last_dim)?;
        let values = cast(values, self.act)?;
        // [B, kv, rep·T, S] @ [B, kv, S, hd] -> [B, kv, rep·T, hd]
        let y = probs.matmul(&values)?;
        drop(probs);
        drop(values);
        // -> [B, H, T, hd] -> [B, T, H, hd] -> [B·T, H·hd]
        let y = then(y, |y| {
            y.reshape((b, nh, t, hd))?
                .transpose(1, 2)?
                .contiguous()?
                .reshape((b * t, nh * hd))
        })?;
        at.o.forward(&y)
    }
}

/// A network whose inputs were validated: `ids` within the vocabulary, positions within the
/// model's and the cache's range. Wraps candle errors into truesize's.
pub fn check_ids(ids: &[u32], vocab: usize) -> TsResult<()> {
    if let Some(&bad) = ids.iter().find(|&&i| i as usize >= vocab) {
        return Err(crate::error::Error::field(
            "command line",
            "--prompt-ids",
            bad,
            format!("token id beyond the model's vocab_size = {vocab}"),
        ));
    }
    Ok(())
}

/// Numerical cross-check helper: max |a − b| / max |b| over two f32 tensors of equal shape.
pub fn max_rel_error(a: &Tensor, b: &Tensor) -> Result<f64> {
    let diff = (a - b)?
        .abs()?
        .flatten_all()?
        .max(D::Minus1)?
        .to_scalar::<f32>()? as f64;
    let scale = b.abs()?.flatten_all()?.max(D::Minus1)?.to_scalar::<f32>()? as f64;
    Ok(if scale == 0.0 { diff } else { diff / scale })
}
