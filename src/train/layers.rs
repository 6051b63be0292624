//! The pieces both families are made of, each with its forward (returning what backward needs)
//! and its backward: linear maps in both weight layouts, LayerNorm / RMSNorm, attention (flash
//! or eager), and the gradient store that accumulates into one buffer per parameter.

use super::amp;
use super::inplace;
use super::k;
use super::parallel::{role_of, Collective, Role};
use crate::train::{Attention, SavedSet};
use candle_core::{DType, Result, Tensor};
use candle_nn::VarMap;
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;

/// The parameters by HF name, sharing storage with the VarMap (no copy, no `Var`: candle
/// records no graph for ops on them).
pub(crate) struct Params {
    map: BTreeMap<String, Tensor>,
    /// The tensor-parallel group the maps loaded from here reduce over (None: TP = 1).
    tp: Option<Rc<dyn Collective>>,
}

impl Params {
    pub(crate) fn from_varmap(varmap: &VarMap) -> Params {
        let data = varmap.data().lock().unwrap_or_else(|e| e.into_inner());
        Params {
            map: data
                .iter()
                .map(|(k, v)| (k.clone(), v.as_tensor().detach()))
                .collect(),
            tp: None,
        }
    }

    /// A rank's parameters: its own (`varmap`), zero-strided views for the ones other stages
    /// hold, and its tensor-parallel group.
    pub(crate) fn for_rank(
        varmap: &VarMap,
        elsewhere: &[(String, Vec<usize>)],
        tp: Option<Rc<dyn Collective>>,
    ) -> Result<Params> {
        let mut p = Params::from_varmap(varmap);
        for (name, shape) in elsewhere {
            p.map.insert(
                name.clone(),
                super::parallel::placeholder(shape, DType::F32)?,
            );
        }
        p.tp = tp;
        Ok(p)
    }

    pub(crate) fn get(&self, name: &str) -> Result<Tensor> {
        self.map
            .get(name)
            .cloned()
            .ok_or_else(|| candle_core::Error::Msg(format!("no parameter {name} in the model")))
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = (&String, &Tensor)> {
        self.map.iter()
    }
}

/// Each parameter's gradient, accumulated in place into the first contribution's buffer.
#[derive(Default)]
pub(crate) struct Grads(
    pub(crate) BTreeMap<String, Tensor>,
    pub(crate) EmbeddingGrad,
);

/// How an embedding's gradient is formed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) enum EmbeddingGrad {
    /// Rows added in place into the one gradient buffer (a tied head's too).
    #[default]
    InPlace,
    /// As PyTorch does: `embedding_dense_backward` writes a whole `[V, C]` gradient, and a
    /// tied weight's existing gradient (the head's) is summed with it into a new buffer.
    Dense,
}

impl Grads {
    pub(crate) fn add(&mut self, name: &str, g: Tensor) -> Result<()> {
        match self.0.remove(name) {
            Some(acc) => {
                let acc = inplace::add(acc, &g)?;
                self.0.insert(name.to_string(), acc);
            }
            None => {
                self.0.insert(name.to_string(), g);
            }
        }
        Ok(())
    }

    /// Scatter-add embedding rows into `name`'s gradient (zeros `[V, C]` first if it has none).
    pub(crate) fn add_rows(
        &mut self,
        name: &str,
        weight: &Tensor,
        ids: &Tensor,
        dy: &Tensor,
        skip: Option<u32>,
    ) -> Result<()> {
        let acc = match (self.0.remove(name), self.1) {
            (Some(acc), EmbeddingGrad::InPlace) => acc,
            (None, _) => weight.zeros_like()?,
            (Some(acc), EmbeddingGrad::Dense) => {
                let dense = inplace::index_add_rows(weight.zeros_like()?, ids, dy, skip)?;
                let sum = k::add(&acc, &dense)?;
                drop((acc, dense));
                self.0.insert(name.to_string(), sum);
                return Ok(());
            }
        };
        let acc = inplace::index_add_rows(acc, ids, dy, skip)?;
        self.0.insert(name.to_string(), acc);
        Ok(())
    }
}

/// How a weight matrix is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum WeightLayout {
    /// HF `Conv1D` (GPT-2): `[in, out]`, y = x·W.
    InOut,
    /// `torch.nn.Linear`: `[out, in]`, y = x·Wᵀ.
    OutIn,
}

pub(crate) struct Lin {
    w: Tensor,
    b: Option<Tensor>,
    w_name: String,
    b_name: String,
    layout: WeightLayout,
    /// Under tensor parallelism: what this map reduces, and over which group.
    role: Role,
    tp: Option<Rc<dyn Collective>>,
    /// AMP: the weight's half copy from the forward, which the backward reads (`fwd_amp`).
    half: RefCell<Option<Tensor>>,
}

impl Lin {
    /// `prefix.weight` and, with `bias`, `prefix.bias`.
    pub(crate) fn load(p: &Params, prefix: &str, bias: bool, layout: WeightLayout) -> Result<Lin> {
        let w_name = format!("{prefix}.weight");
        let b_name = format!("{prefix}.bias");
        Ok(Lin {
            w: p.get(&w_name)?,
            b: if bias { Some(p.get(&b_name)?) } else { None },
            w_name,
            b_name,
            layout,
            role: if p.tp.is_some() {
                role_of(prefix)
            } else {
                Role::Whole
            },
            tp: p.tp.clone(),
            half: RefCell::new(None),
        })
    }

    /// The group's sum of `t` when this map's `role` is `when`.
    fn reduce(&self, t: Tensor, when: Role) -> Result<Tensor> {
        match &self.tp {
            Some(tp) if self.role == when => tp.all_reduce_sum(t),
            _ => Ok(t),
        }
    }

    /// x `[N, in]` -> `[N, out]`; the bias is added in place (after a row-parallel map's sum).
    pub(crate) fn fwd(&self, x: &Tensor) -> Result<Tensor> {
        if x.dtype() != self.w.dtype() {
            return self.fwd_amp(x);
        }
        let y = match self.layout {
            WeightLayout::InOut => k::matmul(x, &self.w)?,
            WeightLayout::OutIn => k::matmul(x, &self.w.t()?)?,
        };
        let y = self.reduce(y, Role::Row)?;
        match &self.b {
            Some(b) => inplace::add_bias(y, b),
            None => Ok(y),
        }
    }

    /// Weight (and bias) gradients from the saved input `x` `[N, in]` and `dy` `[N, out]`; returns
    /// dx `[N, in]`, accumulated into `acc` when given (inputs shared by several maps).
    pub(crate) fn bwd(
        &self,
        x: &Tensor,
        dy: &Tensor,
        grads: &mut Grads,
        acc: Option<Tensor>,
    ) -> Result<Tensor> {
        if x.dtype() != self.w.dtype() {
            return self.bwd_amp(x, dy, grads, acc);
        }
        let dw = match self.layout {
            WeightLayout::InOut => k::matmul(&x.t()?, dy)?,
            WeightLayout::OutIn => k::matmul(&dy.t()?, x)?,
        };
        grads.add(&self.w_name, dw)?;
        if self.b.is_some() {
            grads.add(&self.b_name, k::sum_rows(dy)?)?;
        }
        let dx = match self.layout {
            WeightLayout::InOut => k::matmul(dy, &self.w.t()?)?,
            WeightLayout::OutIn => k::matmul(dy, &self.w)?,
        };
        let dx = match acc {
            Some(a) => {
                let sum = inplace::add(a, &dx)?;
                drop(dx);
                sum
            }
            None => dx,
        };
        self.reduce(dx, Role::ColumnReduce)
    }

    /// Zero gradients for a map that saw no input (an expert no token chose).
    pub(crate) fn zero_grads(&self, grads: &mut Grads) -> Result<()> {
        grads.add(&self.w_name, self.w.zeros_like()?)?;
        if let Some(b) = &self.b {
            grads.add(&self.b_name, b.zeros_like()?)?;
        }
        Ok(())
    }
}

/// Mixed precision (`train::amp`): the map's input is half, its weight f32.
impl Lin {
    /// autocast's linear: y = x·W₁₆ (+ b₁₆), W's half copy kept for the backward as autograd
    /// saves it; the bias's copy lives for the add only.
    fn fwd_amp(&self, x: &Tensor) -> Result<Tensor> {
        if self.tp.is_some() {
            candle_core::bail!("mixed precision under tensor parallelism is not implemented");
        }
        let dt = x.dtype();
        let w = self.w.to_dtype(dt)?;
        let y = match self.layout {
            WeightLayout::InOut => amp::matmul(x, &w)?,
            WeightLayout::OutIn => amp::matmul(x, &w.t()?)?,
        };
        *self.half.borrow_mut() = Some(w);
        match &self.b {
            Some(b) => inplace::add_bias(y, &b.to_dtype(dt)?),
            None => Ok(y),
        }
    }

    /// Drops the weight's half copy, as autocast's cast cache is cleared when the forward's
    /// autocast region ends (what the graph saved keeps its copy; a checkpointed block saved
    /// nothing).
    pub(crate) fn release_half(&self) {
        self.half.borrow_mut().take();
    }

    /// dW₁₆ (then its f32 copy, the master weight's gradient), db in f32, and dx in half from
    /// the half input and dy (narrowed first when it arrives in f32, as autograd casts a
    /// gradient to its tensor's dtype); the weight's half copy is released here.
    fn bwd_amp(
        &self,
        x: &Tensor,
        dy: &Tensor,
        grads: &mut Grads,
        acc: Option<Tensor>,
    ) -> Result<Tensor> {
        let dt = x.dtype();
        let dy = dy.to_dtype(dt)?;
        let w = self.half.borrow_mut().take().ok_or_else(|| {
            candle_core::Error::Msg(format!("{}: backward before forward", self.w_name))
        })?;
        let dw = match self.layout {
            WeightLayout::InOut => amp::matmul(&x.t()?, &dy)?,
            WeightLayout::OutIn => amp::matmul(&dy.t()?, x)?,
        };
        let dw32 = amp::widen(&dw)?;
        drop(dw);
        grads.add(&self.w_name, dw32)?;
        if self.b.is_some() {
            grads.add(&self.b_name, amp::sum_rows(&dy)?)?;
        }
        let dx = match self.layout {
            WeightLayout::InOut => amp::matmul(&dy, &w.t()?)?,
            WeightLayout::OutIn => amp::matmul(&dy, &w)?,
        };
        drop((w, dy));
        match acc {
            Some(a) => inplace::add(a, &dx),
            None => Ok(dx),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum NormKind {
    Layer,
    /// y = x · rstd · (offset + w).
    Rms {
        offset: f64,
    },
}

pub(crate) struct Norm {
    kind: NormKind,
    w: Tensor,
    b: Option<Tensor>,
    eps: f64,
    w_name: String,
    b_name: String,
}

/// What a norm's backward needs besides its input: per-row statistics (f32); and, when the
/// step keeps what HF's modules keep, an RMSNorm's normalized input (released with the stats).
pub(crate) struct NormStats {
    mean: Option<Tensor>,
    rstd: Tensor,
    /// Held for its memory only: the fused backward recomputes x̂ from x and rstd.
    #[allow(dead_code)]
    xhat: Option<Tensor>,
}

impl Norm {
    pub(crate) fn load(
        p: &Params,
        prefix: &str,
        kind: NormKind,
        bias: bool,
        eps: f64,
    ) -> Result<Norm> {
        let w_name = format!("{prefix}.weight");
        let b_name = format!("{prefix}.bias");
        Ok(Norm {
            kind,
            w: p.get(&w_name)?,
            b: if bias { Some(p.get(&b_name)?) } else { None },
            eps,
            w_name,
            b_name,
        })
    }

    /// x `[N, C]` -> (y `[N, C]`, statistics).
    pub(crate) fn fwd(&self, x: &Tensor) -> Result<(Tensor, NormStats)> {
        self.fwd_keeping(x, SavedSet::Fused)
    }

    /// `fwd`, keeping what `saved` asks: HF's RMSNorm is composed (x · rsqrt(mean(x²) + eps),
    /// then w · x̂), so PyTorch keeps x̂ for the weight's gradient; LayerNorm is one fused op.
    pub(crate) fn fwd_keeping(&self, x: &Tensor, saved: SavedSet) -> Result<(Tensor, NormStats)> {
        match self.kind {
            NormKind::Layer => {
                let (y, mean, rstd) =
                    k::layer_norm_fwd(x, Some(&self.w), self.b.as_ref(), self.eps)?;
                Ok((
                    y,
                    NormStats {
                        mean: Some(mean),
                        rstd,
                        xhat: None,
                    },
                ))
            }
            NormKind::Rms { offset } => {
                let (y, rstd) = k::rms_norm_fwd(x, Some(&self.w), self.eps, offset)?;
                let xhat = match saved {
                    SavedSet::Transformers => Some(super::kept::rms_normalized(x, &rstd)?),
                    SavedSet::Fused => None,
                };
                Ok((
                    y,
                    NormStats {
                        mean: None,
                        rstd,
                        xhat,
                    },
                ))
            }
        }
    }

    /// dx from dy and the saved input; the weight (and bias) gradients go to `grads`.
    pub(crate) fn bwd(
        &self,
        dy: &Tensor,
        x: &Tensor,
        st: &NormStats,
        grads: &mut Grads,
    ) -> Result<Tensor> {
        match (self.kind, &st.mean) {
            (NormKind::Layer, Some(mean)) => {
                let (dx, dw, db) = k::layer_norm_bwd(dy, x, Some(&self.w), mean, &st.rstd)?;
                if let Some(dw) = dw {
                    grads.add(&self.w_name, dw)?;
                }
                if let (Some(db), Some(_)) = (db, &self.b) {
                    grads.add(&self.b_name, db)?;
                }
                Ok(dx)
            }
            (NormKind::Rms { offset }, _) => {
                let (dx, dw) = k::rms_norm_bwd(dy, x, Some(&self.w), &st.rstd, offset)?;
                if let Some(dw) = dw {
                    grads.add(&self.w_name, dw)?;
                }
                Ok(dx)
            }
            (NormKind::Layer, None) => candle_core::bail!("LayerNorm statistics without a mean"),
        }
    }
}

/// What attention keeps for its backward besides q, k, v and o.
pub(crate) enum AttnSaved {
    /// Per-row log-sum-exp `[B, H, T]` (f32): the probabilities are recomputed.
    Flash(Tensor),
    /// The probabilities `[B, H, T, T]` (HF eager) and, for a soft-capped attention under
    /// `SavedSet::Transformers`, tanh(s / c) `[B, H, T, T]` (HF composes the cap).
    Eager(Tensor, Option<Tensor>),
}

pub(crate) fn attn_fwd(
    q: &Tensor,
    k_: &Tensor,
    v: &Tensor,
    spec: &k::AttnSpec,
    how: Attention,
) -> Result<(Tensor, AttnSaved)> {
    attn_fwd_keeping(q, k_, v, spec, how, SavedSet::Fused)
}

/// `attn_fwd`, keeping what `saved` asks of eager attention (a soft-cap's tanh for HF's).
pub(crate) fn attn_fwd_keeping(
    q: &Tensor,
    k_: &Tensor,
    v: &Tensor,
    spec: &k::AttnSpec,
    how: Attention,
    saved: SavedSet,
) -> Result<(Tensor, AttnSaved)> {
    match how {
        Attention::Flash => {
            let (o, lse) = k::attention_fwd(q, k_, v, spec)?;
            Ok((o, AttnSaved::Flash(lse)))
        }
        Attention::Eager => {
            let keep_tanh = saved == SavedSet::Transformers;
            let (o, p, t) = k::attention_eager_fwd_keeping(q, k_, v, spec, keep_tanh)?;
            Ok((o, AttnSaved::Eager(p, t)))
        }
    }
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn attn_bwd(
    q: &Tensor,
    k_: &Tensor,
    v: &Tensor,
    o: &Tensor,
    saved: &AttnSaved,
    d_o: &Tensor,
    spec: &k::AttnSpec,
) -> Result<(Tensor, Tensor, Tensor)> {
    match saved {
        AttnSaved::Flash(lse) => k::attention_bwd(q, k_, v, o, lse, d_o, spec),
        AttnSaved::Eager(p, t) => k::attention_eager_bwd(q, k_, v, p, t.as_ref(), d_o, spec),
    }
}
