//! The Llama skeleton's layer for the lean step, the maths of `model::llama` with an explicit
//! backward: RMSNorm, rotate-half RoPE (with the model's scaling tables, on all or part of each
//! head), grouped-query attention with optional q/k/v bias and per-layer sliding windows, SwiGLU /
//! GeGLU MLP or a routed mixture of experts (Mixtral, Qwen-MoE), tied or untied head, padding row
//! without gradient; and the relatives' switches: q/k RMSNorm over head_dim (Qwen3, Gemma 3),
//! sandwich norms and the √d embedding scale (Gemma), fused `qkv_proj` / `gate_up_proj` (Phi-3).
//!
//! A fused projection is one matmul into one [N, q+2kv] (or [N, 2ff]) buffer whose column blocks
//! are copied out, so that every kernel downstream sees the same contiguous tensors as with
//! separate maps; its backward concatenates the blocks' gradients and runs one map's backward, so
//! the weight's gradient is one buffer under the checkpoint's one name. A q/k norm keeps its
//! input (the projection's output) and per-head rstd, as PyTorch's RMSNorm does; the normalised
//! heads are transient (RoPE's backward needs only the tables).

use super::amp;
use super::inplace;
use super::k;
use super::layers::{
    attn_bwd, attn_fwd_keeping, AttnSaved, Grads, Lin, Norm, NormKind, NormStats, Params,
    WeightLayout,
};
use super::step::Net;
use super::{LeanOptions, SavedSet};
use crate::config::{
    EmbeddingScale, ExpertNames, MlpKind, ModelConfig, NormKind as CfgNorm, NormPlacement, Storage,
};
use candle_core::{DType, Device, Result, Tensor, D};

const EMBED: &str = "model.embed_tokens.weight";

/// gate and up, stored separately or fused (Phi-3's `gate_up_proj`, rows gate | up).
enum GateUp {
    Separate { gate: Lin, up: Lin },
    Fused { gate_up: Lin, width: usize },
}

/// gate, up and down of one gated MLP (or one expert).
struct GatedMlp {
    gate_up: GateUp,
    down: Lin,
    act: k::GateAct,
}

/// What a gated MLP keeps besides its input: the activation's inputs and the down map's input.
struct MlpSaved {
    gate: Tensor,
    up: Tensor,
    h: Tensor,
    /// act(gate), which HF's `act_fn(gate) * up` makes PyTorch keep for up's gradient (held
    /// for its memory: the fused backward recomputes it), and the MLP's input when it is a
    /// gathered copy (an expert's tokens), which HF's gate/up maps keep.
    kept: Vec<Tensor>,
}

impl GatedMlp {
    fn load(
        p: &Params,
        prefix: &str,
        names: [&str; 3],
        bias: bool,
        act: k::GateAct,
    ) -> Result<Self> {
        let lin = |n: &str| Lin::load(p, &format!("{prefix}.{n}"), bias, WeightLayout::OutIn);
        Ok(GatedMlp {
            gate_up: GateUp::Separate {
                gate: lin(names[0])?,
                up: lin(names[1])?,
            },
            down: lin(names[2])?,
            act,
        })
    }

    /// Phi-3's MLP: `gate_up_proj` (rows gate | up, `width` each) and `down_proj`.
    fn load_fused(
        p: &Params,
        prefix: &str,
        width: usize,
        bias: bool,
        act: k::GateAct,
    ) -> Result<Self> {
        let lin = |n: &str| Lin::load(p, &format!("{prefix}.{n}"), bias, WeightLayout::OutIn);
        Ok(GatedMlp {
            gate_up: GateUp::Fused {
                gate_up: lin("gate_up_proj")?,
                width,
            },
            down: lin("down_proj")?,
            act,
        })
    }

    fn fwd(&self, x: &Tensor, saved: SavedSet) -> Result<(Tensor, MlpSaved)> {
        let (gate, up) = match &self.gate_up {
            GateUp::Separate { gate, up } => (gate.fwd(x)?, up.fwd(x)?),
            GateUp::Fused { gate_up, width } => {
                // [N, 2ff] -> gate, up [N, ff], each a contiguous copy of its columns
                let gu = gate_up.fwd(x)?;
                let gate = gu.narrow(1, 0, *width)?.contiguous()?;
                let up = gu.narrow(1, *width, *width)?.contiguous()?;
                (gate, up)
            }
        };
        let h = k::gated_fwd(&gate, &up, self.act)?;
        let kept = match saved {
            SavedSet::Transformers => vec![k::activation(&gate, self.act)?],
            SavedSet::Fused => Vec::new(),
        };
        let y = self.down.fwd(&h)?;
        Ok((y, MlpSaved { gate, up, h, kept }))
    }

    fn bwd(&self, x: &Tensor, s: MlpSaved, dy: &Tensor, grads: &mut Grads) -> Result<Tensor> {
        let dh = self.down.bwd(&s.h, dy, grads, None)?;
        drop(s.h);
        let (dgate, dup) = k::gated_bwd(&s.gate, &s.up, &dh, self.act)?;
        drop((dh, s.gate, s.up, s.kept));
        match &self.gate_up {
            GateUp::Separate { gate, up } => {
                let dx = gate.bwd(x, &dgate, grads, None)?;
                drop(dgate);
                up.bwd(x, &dup, grads, Some(dx))
            }
            GateUp::Fused { gate_up, .. } => {
                let dgu = Tensor::cat(&[&dgate, &dup], 1)?;
                drop((dgate, dup));
                gate_up.bwd(x, &dgu, grads, None)
            }
        }
    }

    fn zero_grads(&self, grads: &mut Grads) -> Result<()> {
        match &self.gate_up {
            GateUp::Separate { gate, up } => {
                gate.zero_grads(grads)?;
                up.zero_grads(grads)?;
            }
            GateUp::Fused { gate_up, .. } => gate_up.zero_grads(grads)?,
        }
        self.down.zero_grads(grads)
    }
}

/// A routed mixture of gated experts (HF `MixtralSparseMoeBlock`, `Qwen3MoeSparseMoeBlock`).
struct Moe {
    router: Lin,
    experts: Vec<GatedMlp>,
    top_k: usize,
    renormalize: bool,
}

/// One expert's share of a MoE forward.
struct ExpertSaved {
    /// The tokens routed to it `[n_e]` (u32) and their routing weights `[n_e, 1]`.
    idx: Tensor,
    weight: Tensor,
    mlp: MlpSaved,
    /// Its output before weighting `[n_e, d]` (the weight's gradient is ⟨dy, y⟩).
    y: Tensor,
}

struct MoeSaved {
    /// Router probabilities `[N, E]` (f32, the softmax's output).
    probs: Tensor,
    /// The top-k experts of each token (host).
    chosen: Vec<Vec<usize>>,
    experts: Vec<Option<ExpertSaved>>,
}

impl Moe {
    fn fwd(&self, x: &Tensor, saved: SavedSet) -> Result<(Tensor, MoeSaved)> {
        let (n, d) = x.dims2()?;
        let n_exp = self.experts.len();
        let logits = self.router.fwd(x)?.to_dtype(DType::F32)?;
        // The model's softmax, so that the discrete top-k choice is the same.
        let probs = candle_nn::ops::softmax(&logits, D::Minus1)?;
        drop(logits);
        let host: Vec<Vec<f32>> = probs.to_vec2()?;
        let mut chosen = Vec::with_capacity(n);
        let mut tokens_of: Vec<Vec<u32>> = vec![Vec::new(); n_exp];
        let mut weight_of: Vec<Vec<f32>> = vec![Vec::new(); n_exp];
        for (i, row) in host.iter().enumerate() {
            let mut order: Vec<usize> = (0..n_exp).collect();
            // Stable sort, descending: ties go to the lower expert index, as torch.topk.
            order.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
            let mut top: Vec<usize> = order.into_iter().take(self.top_k).collect();
            top.sort_unstable();
            let sum: f32 = top.iter().map(|&e| row[e]).sum();
            for &e in &top {
                let w = if self.renormalize {
                    row[e] / sum
                } else {
                    row[e]
                };
                tokens_of[e].push(i as u32);
                weight_of[e].push(w);
            }
            chosen.push(top);
        }
        let mut out = Tensor::zeros((n, d), x.dtype(), x.device())?;
        let mut experts = Vec::with_capacity(n_exp);
        for (e, expert) in self.experts.iter().enumerate() {
            if tokens_of[e].is_empty() {
                experts.push(None);
                continue;
            }
            let n_e = tokens_of[e].len();
            let idx = Tensor::from_vec(std::mem::take(&mut tokens_of[e]), n_e, x.device())?;
            let weight = Tensor::from_vec(std::mem::take(&mut weight_of[e]), (n_e, 1), x.device())?
                .to_dtype(x.dtype())?;
            let xe = x.index_select(&idx, 0)?;
            let (y, mut mlp) = expert.fwd(&xe, saved)?;
            if saved == SavedSet::Transformers {
                mlp.kept.push(xe);
            } else {
                drop(xe);
            }
            out = inplace::index_add_rows(out, &idx, &y.broadcast_mul(&weight)?, None)?;
            experts.push(Some(ExpertSaved {
                idx,
                weight,
                mlp,
                y,
            }));
        }
        Ok((
            out,
            MoeSaved {
                probs,
                chosen,
                experts,
            },
        ))
    }

    fn bwd(&self, x: &Tensor, s: MoeSaved, dy: &Tensor, grads: &mut Grads) -> Result<Tensor> {
        let (n, _) = x.dims2()?;
        let n_exp = self.experts.len();
        let mut dx = x.zeros_like()?;
        // d loss / d routing weight, [N][E] (zero off the chosen experts)
        let mut dw = vec![vec![0f32; n_exp]; n];
        for (e, (expert, saved)) in self.experts.iter().zip(s.experts).enumerate() {
            let Some(es) = saved else {
                expert.zero_grads(grads)?;
                continue;
            };
            let dy_rows = dy.index_select(&es.idx, 0)?;
            let dwe: Vec<f32> = (&dy_rows * &es.y)?
                .sum(1)?
                .to_dtype(DType::F32)?
                .to_vec1()?;
            drop(es.y);
            let ids: Vec<u32> = es.idx.to_vec1()?;
            for (&i, g) in ids.iter().zip(dwe) {
                dw[i as usize][e] = g;
            }
            let dye = dy_rows.broadcast_mul(&es.weight)?;
            drop(dy_rows);
            let xe = x.index_select(&es.idx, 0)?;
            let dxe = expert.bwd(&xe, es.mlp, &dye, grads)?;
            drop((xe, dye));
            dx = inplace::index_add_rows(dx, &es.idx, &dxe, None)?;
        }
        // Router: renormalised top-k, then the softmax, on host rows of E values.
        let probs: Vec<Vec<f32>> = s.probs.to_vec2()?;
        let mut dlogits = Vec::with_capacity(n * n_exp);
        for ((p, top), dwr) in probs.iter().zip(&s.chosen).zip(&dw) {
            let mut dp = vec![0f32; n_exp];
            if self.renormalize {
                let sum: f32 = top.iter().map(|&e| p[e]).sum();
                // Against the forward's own weights p/sum: a lone chosen expert's weight is then
                // exactly 1 and its router gradient (zero in exact arithmetic) exactly 0.
                let dot: f32 = top.iter().map(|&e| dwr[e] * (p[e] / sum)).sum();
                for &e in top {
                    dp[e] = (dwr[e] - dot) / sum;
                }
            } else {
                for &e in top {
                    dp[e] = dwr[e];
                }
            }
            let dot: f32 = p.iter().zip(&dp).map(|(a, b)| a * b).sum();
            dlogits.extend(p.iter().zip(&dp).map(|(pi, dpi)| pi * (dpi - dot)));
        }
        let dlogits = Tensor::from_vec(dlogits, (n, n_exp), x.device())?.to_dtype(x.dtype())?;
        self.router.bwd(x, &dlogits, grads, Some(dx))
    }
}

enum Ffn {
    Mlp(GatedMlp),
    Moe(Moe),
}

enum FfnSaved {
    Mlp(MlpSaved),
    Moe(MoeSaved),
}

/// q, k and v, stored separately or fused (Phi-3's `qkv_proj`, rows q | k | v).
// One per layer, built once and never moved: the variants' size difference costs nothing.
#[allow(clippy::large_enum_variant)]
enum Qkv {
    Separate { q: Lin, k: Lin, v: Lin },
    Fused(Lin),
}

impl Qkv {
    /// x `[N, d]` -> q `[N, q_dim]`, k and v `[N, kv_dim]`, each contiguous; and, fused, the
    /// whole projection `[N, q_dim + 2·kv_dim]` when `saved` keeps what HF keeps (its v is a
    /// view of it, which sdpa holds for backward).
    #[allow(clippy::type_complexity)]
    fn fwd(
        &self,
        x: &Tensor,
        qd: usize,
        kvd: usize,
        saved: SavedSet,
    ) -> Result<(Tensor, Tensor, Tensor, Option<Tensor>)> {
        match self {
            Qkv::Separate { q, k, v } => Ok((q.fwd(x)?, k.fwd(x)?, v.fwd(x)?, None)),
            Qkv::Fused(p) => {
                let qkv = p.fwd(x)?;
                let part = |at: usize, w: usize| qkv.narrow(1, at, w)?.contiguous();
                let (q, k, v) = (part(0, qd)?, part(qd, kvd)?, part(qd + kvd, kvd)?);
                let kept = (saved == SavedSet::Transformers).then_some(qkv);
                Ok((q, k, v, kept))
            }
        }
    }
}

/// The norms after attention. Llama's `post_attention_layernorm` is the norm before the MLP;
/// with Gemma's sandwich norms the same name normalises attention's output before the residual
/// add, `pre_feedforward_layernorm` precedes the MLP and `post_feedforward_layernorm` normalises
/// its output before the residual add.
enum SubNorms {
    Pre(Norm),
    Sandwich {
        post_attention: Norm,
        pre_feedforward: Norm,
        post_feedforward: Norm,
    },
}

struct Layer {
    input_norm: Norm,
    qkv: Qkv,
    /// RMSNorm over head_dim of each query / key head, before RoPE.
    q_norm: Option<Norm>,
    k_norm: Option<Norm>,
    o: Lin,
    norms: SubNorms,
    ffn: Ffn,
    spec: k::AttnSpec,
    /// Whether this layer uses the local (sliding-window) RoPE tables.
    local_rope: bool,
}

pub(crate) struct Saved {
    x: Tensor,
    st1: NormStats,
    /// The q/k/v maps' input.
    h1: Tensor,
    /// q/k norms: their inputs `[N, n·hd]` (the projections' outputs) and per-head rstd.
    q_pre: Option<(Tensor, NormStats)>,
    k_pre: Option<(Tensor, NormStats)>,
    /// Attention's inputs after RoPE `[B, T, n, hd]`, its output `[N, H·hd]` (o_proj's input).
    q: Tensor,
    k: Tensor,
    /// v, or (fused qkv keeping what HF keeps) the whole projection it is read again from.
    v: std::result::Result<Tensor, Tensor>,
    o: Tensor,
    attn: AttnSaved,
    /// HF's sdpa mask `[B, 1, T, T]` f32 when a window is in effect (held for its memory).
    mask: Option<Tensor>,
    /// Sandwich norms: o_proj's output (post_attention_layernorm's input) and its rstd.
    a: Option<(Tensor, NormStats)>,
    /// x + attention: the MLP's pre-norm input.
    x1: Tensor,
    st2: NormStats,
    /// The MLP's (or router's and experts') input.
    h2: Tensor,
    ffn: FfnSaved,
    /// Sandwich norms: the MLP's output (post_feedforward_layernorm's input) and its rstd.
    m: Option<(Tensor, NormStats)>,
}

/// What a layer keeps, in full precision or under AMP.
pub(crate) enum BlockSaved {
    Full(Saved),
    Amp(AmpSaved),
}

/// What a layer keeps under AMP (`train::amp`; separate q/k/v and gate/up maps, pre-norms, a
/// dense MLP, sdpa): the residual stream and the norms' inputs, x̂ and rstd in f32; each map's
/// own half copy of its input, as autocast casts the f32 norm output once per map; q and k
/// after RoPE as sdpa's half copies, v, the output and lse; the MLP's half tensors.
pub(crate) struct AmpSaved {
    x: Tensor,
    st1: NormStats,
    /// The q, k and v maps' inputs (three copies of the same values).
    h1: [Tensor; 3],
    q: Tensor,
    k: Tensor,
    v: Tensor,
    o: Tensor,
    lse: Tensor,
    x1: Tensor,
    st2: NormStats,
    /// The gate and up maps' inputs.
    h2: [Tensor; 2],
    gate: Tensor,
    up: Tensor,
    /// act(gate), held for its memory as in `MlpSaved`.
    act: Tensor,
    /// The gated product, down's input.
    h: Tensor,
}

/// RoPE cos / sin `[T, rotary_dim / 2]` f32: global layers, and local ones when they differ.
pub(crate) struct Ctx {
    full: (Tensor, Tensor),
    local: Option<(Tensor, Tensor)>,
}

pub(crate) struct Llama {
    cfg: ModelConfig,
    embed: Tensor,
    /// Gemma's √d on the embedding's output, rounded to f32 as HF rounds it to the activation
    /// dtype (then to the dtype by the in-place scale).
    embed_scale: Option<f64>,
    layers: Vec<Layer>,
    norm: Norm,
    head: Tensor,
    head_name: String,
    pad: Option<u32>,
}

impl Llama {
    pub(crate) fn load(cfg: &ModelConfig, p: &Params) -> Result<Llama> {
        let offset = match cfg.norm {
            CfgNorm::RmsOnePlus => 1.0,
            _ => 0.0,
        };
        let kind = NormKind::Rms { offset };
        let norm = |name: &str| Norm::load(p, name, kind, false, cfg.norm_eps);
        let act = match cfg.mlp {
            MlpKind::GeGlu => k::GateAct::GeluTanh,
            _ => k::GateAct::Silu,
        };
        let mut layers = Vec::with_capacity(cfg.n_layer);
        for i in 0..cfg.n_layer {
            let l = format!("model.layers.{i}");
            let a = format!("{l}.self_attn");
            let qkv_lin = |n: &str| {
                Lin::load(
                    p,
                    &format!("{a}.{n}"),
                    cfg.has_qkv_bias(),
                    WeightLayout::OutIn,
                )
            };
            let qkv = match cfg.qkv_storage {
                Storage::Separate => Qkv::Separate {
                    q: qkv_lin("q_proj")?,
                    k: qkv_lin("k_proj")?,
                    v: qkv_lin("v_proj")?,
                },
                Storage::Fused => Qkv::Fused(qkv_lin("qkv_proj")?),
            };
            let (q_norm, k_norm) = if cfg.qk_norm {
                (
                    Some(norm(&format!("{a}.q_norm"))?),
                    Some(norm(&format!("{a}.k_norm"))?),
                )
            } else {
                (None, None)
            };
            let norms = match cfg.norm_placement {
                NormPlacement::Pre => {
                    SubNorms::Pre(norm(&format!("{l}.post_attention_layernorm"))?)
                }
                NormPlacement::Sandwich => SubNorms::Sandwich {
                    post_attention: norm(&format!("{l}.post_attention_layernorm"))?,
                    pre_feedforward: norm(&format!("{l}.pre_feedforward_layernorm"))?,
                    post_feedforward: norm(&format!("{l}.post_feedforward_layernorm"))?,
                },
            };
            let ffn = if cfg.layer_is_moe(i) {
                let (prefix, names) = match cfg.expert_names {
                    ExpertNames::Mixtral => ("block_sparse_moe", ["w1", "w3", "w2"]),
                    ExpertNames::Qwen => ("mlp", ["gate_proj", "up_proj", "down_proj"]),
                };
                let m = format!("{l}.{prefix}");
                Ffn::Moe(Moe {
                    router: Lin::load(p, &format!("{m}.gate"), false, WeightLayout::OutIn)?,
                    experts: (0..cfg.n_experts)
                        .map(|e| GatedMlp::load(p, &format!("{m}.experts.{e}"), names, false, act))
                        .collect::<Result<Vec<_>>>()?,
                    top_k: cfg.n_experts_per_tok,
                    renormalize: cfg.moe_renormalize,
                })
            } else {
                let prefix = format!("{l}.mlp");
                Ffn::Mlp(match cfg.gate_up_storage {
                    Storage::Separate => GatedMlp::load(
                        p,
                        &prefix,
                        ["gate_proj", "up_proj", "down_proj"],
                        cfg.mlp_bias,
                        act,
                    )?,
                    Storage::Fused => {
                        GatedMlp::load_fused(p, &prefix, cfg.intermediate_size, cfg.mlp_bias, act)?
                    }
                })
            };
            layers.push(Layer {
                input_norm: norm(&format!("{l}.input_layernorm"))?,
                qkv,
                q_norm,
                k_norm,
                o: Lin::load(p, &format!("{a}.o_proj"), cfg.bias, WeightLayout::OutIn)?,
                norms,
                ffn,
                spec: k::AttnSpec {
                    scale: 1.0 / cfg.attn_scalar.sqrt(),
                    window: cfg.attention_window(i),
                    softcap: cfg.attn_softcap,
                },
                local_rope: cfg.rope_per_layer_type && cfg.attention_window(i).is_some(),
            });
        }
        let head_name = if cfg.tie_embeddings {
            EMBED
        } else {
            "lm_head.weight"
        };
        Ok(Llama {
            cfg: cfg.clone(),
            embed: p.get(EMBED)?,
            embed_scale: match cfg.embedding_scale {
                EmbeddingScale::None => None,
                EmbeddingScale::SqrtHidden => Some((cfg.n_embd as f64).sqrt() as f32 as f64),
            },
            layers,
            norm: norm("model.norm")?,
            head: p.get(head_name)?,
            head_name: head_name.to_string(),
            pad: cfg.pad_token_id.and_then(|p| u32::try_from(p).ok()),
        })
    }

    /// The RoPE tables of a layer as tensors `[T, rot / 2]`.
    fn tables(&self, layer: usize, t: usize, device: &Device) -> Result<(Tensor, Tensor)> {
        let (cos, sin) = crate::model::llama::rope_half_tables(&self.cfg, layer, t);
        let half = self.cfg.rotary_dim / 2;
        Ok((
            Tensor::from_vec(cos, (t, half), device)?,
            Tensor::from_vec(sin, (t, half), device)?,
        ))
    }
}

impl Llama {
    /// `block_fwd` under AMP with half dtype `dt` (`supported` admits the layers it handles).
    fn block_fwd_amp(
        &self,
        i: usize,
        x: &Tensor,
        (b, t): (usize, usize),
        ctx: &Ctx,
        dt: DType,
    ) -> Result<(Tensor, AmpSaved)> {
        let l = &self.layers[i];
        let (h, hkv, hd) = (self.cfg.n_head, self.cfg.n_kv_head, self.cfg.head_dim);
        let n = b * t;
        let (cos, sin) = rope_of(l, ctx);
        let (
            Qkv::Separate {
                q,
                k: kmap,
                v: vmap,
            },
            SubNorms::Pre(norm2),
            Ffn::Mlp(mlp),
        ) = (&l.qkv, &l.norms, &l.ffn)
        else {
            candle_core::bail!("layer {i}: mixed precision needs separate maps and pre-norms");
        };
        let GateUp::Separate { gate, up } = &mlp.gate_up else {
            candle_core::bail!("layer {i}: mixed precision needs separate gate and up maps");
        };
        let (h1_32, st1) = l.input_norm.fwd_keeping(x, SavedSet::Transformers)?;
        let cast_map = |m: &Lin| -> Result<(Tensor, Tensor)> {
            let xh = h1_32.to_dtype(dt)?;
            let y = m.fwd(&xh)?;
            Ok((xh, y))
        };
        let (h1q, q_lin) = cast_map(q)?;
        let (h1k, k_lin) = cast_map(kmap)?;
        let (h1v, v_lin) = cast_map(vmap)?;
        drop(h1_32);
        // RoPE on the widened heads; sdpa's half copy of the result is what stays.
        let rotate = |y: Tensor, heads: usize| {
            let r = amp::widened(&y.reshape((b, t, heads, hd))?, |y| k::rope_fwd(y, cos, sin))?;
            drop(y);
            Ok::<_, candle_core::Error>(r)
        };
        let q_ = rotate(q_lin, h)?;
        let k_ = rotate(k_lin, hkv)?;
        let v = v_lin.reshape((b, t, hkv, hd))?;
        drop(v_lin);
        let (o, lse) = amp::attention_fwd(&q_, &k_, &v, &l.spec)?;
        let o = o.reshape((n, h * hd))?;
        let a = amp::widen(&l.o.fwd(&o)?)?;
        let x1 = inplace::add(a, x)?;
        let (h2_32, st2) = norm2.fwd_keeping(&x1, SavedSet::Transformers)?;
        let h2g = h2_32.to_dtype(dt)?;
        let gate_y = gate.fwd(&h2g)?;
        let h2u = h2_32.to_dtype(dt)?;
        let up_y = up.fwd(&h2u)?;
        drop(h2_32);
        let act = mlp.act;
        let hprod = amp::widened2(&gate_y, &up_y, |g, u| k::gated_fwd(g, u, act))?;
        let act_g = amp::widened(&gate_y, |g| k::activation(g, act))?;
        let m = amp::widen(&mlp.down.fwd(&hprod)?)?;
        let y = inplace::add(m, &x1)?;
        Ok((
            y,
            AmpSaved {
                x: x.clone(),
                st1,
                h1: [h1q, h1k, h1v],
                q: q_,
                k: k_,
                v,
                o,
                lse,
                x1,
                st2,
                h2: [h2g, h2u],
                gate: gate_y,
                up: up_y,
                act: act_g,
                h: hprod,
            },
        ))
    }

    fn block_bwd_amp(
        &self,
        i: usize,
        s: AmpSaved,
        dy: Tensor,
        (b, t): (usize, usize),
        ctx: &Ctx,
        grads: &mut Grads,
    ) -> Result<Tensor> {
        let l = &self.layers[i];
        let (h, hkv, hd) = (self.cfg.n_head, self.cfg.n_kv_head, self.cfg.head_dim);
        let n = b * t;
        let (cos, sin) = rope_of(l, ctx);
        let (
            Qkv::Separate {
                q,
                k: kmap,
                v: vmap,
            },
            SubNorms::Pre(norm2),
            Ffn::Mlp(mlp),
        ) = (&l.qkv, &l.norms, &l.ffn)
        else {
            candle_core::bail!("layer {i}: mixed precision needs separate maps and pre-norms");
        };
        let GateUp::Separate { gate, up } = &mlp.gate_up else {
            candle_core::bail!("layer {i}: mixed precision needs separate gate and up maps");
        };
        // An f32 gradient summed from the half input gradients of maps sharing an input.
        let add_widened = |acc: Option<Tensor>, dxh: Tensor| -> Result<Tensor> {
            let d32 = amp::widen(&dxh)?;
            drop(dxh);
            match acc {
                None => Ok(d32),
                Some(a) => inplace::add(a, &d32),
            }
        };
        let dh = mlp.down.bwd(&s.h, &dy, grads, None)?;
        drop(s.h);
        let (dgate, dup) = {
            let (g, u, d) = (amp::widen(&s.gate)?, amp::widen(&s.up)?, amp::widen(&dh)?);
            let (dg, du) = k::gated_bwd(&g, &u, &d, mlp.act)?;
            drop((g, u, d));
            let dg_h = dg.to_dtype(s.gate.dtype())?;
            drop(dg);
            let du_h = du.to_dtype(s.gate.dtype())?;
            drop(du);
            (dg_h, du_h)
        };
        drop((dh, s.gate, s.up, s.act));
        let [h2g, h2u] = s.h2;
        let dh2 = add_widened(None, gate.bwd(&h2g, &dgate, grads, None)?)?;
        drop((dgate, h2g));
        let dh2 = add_widened(Some(dh2), up.bwd(&h2u, &dup, grads, None)?)?;
        drop((dup, h2u));
        let dn2 = norm2.bwd(&dh2, &s.x1, &s.st2, grads)?;
        drop((dh2, s.x1, s.st2));
        let dx1 = inplace::add(dy, &dn2)?;
        drop(dn2);
        let d_o = l.o.bwd(&s.o, &dx1, grads, None)?.reshape((b, t, h, hd))?;
        let (dq, dk, dv) = amp::attention_bwd(
            &s.q,
            &s.k,
            &s.v,
            &s.o.reshape((b, t, h, hd))?,
            &s.lse,
            &d_o,
            &l.spec,
        )?;
        drop((d_o, s.q, s.k, s.v, s.o, s.lse));
        let unrotate = |d: Tensor, heads: usize| {
            let r = amp::widened(&d, |d| k::rope_bwd(d, cos, sin))?;
            drop(d);
            r.reshape((n, heads * hd))
        };
        let [h1q, h1k, h1v] = s.h1;
        let dq = unrotate(dq, h)?;
        let dh1 = add_widened(None, q.bwd(&h1q, &dq, grads, None)?)?;
        drop((dq, h1q));
        let dk = unrotate(dk, hkv)?;
        let dh1 = add_widened(Some(dh1), kmap.bwd(&h1k, &dk, grads, None)?)?;
        drop((dk, h1k));
        let dv = dv.reshape((n, hkv * hd))?;
        let dh1 = add_widened(Some(dh1), vmap.bwd(&h1v, &dv, grads, None)?)?;
        drop((dv, h1v));
        let dn1 = l.input_norm.bwd(&dh1, &s.x, &s.st1, grads)?;
        drop((dh1, s.x, s.st1));
        inplace::add(dx1, &dn1)
    }
}

impl Net for Llama {
    type Saved = BlockSaved;
    type Ctx = Ctx;

    fn n_layer(&self) -> usize {
        self.layers.len()
    }

    fn width(&self) -> usize {
        self.cfg.n_embd
    }

    fn ctx(&self, t: usize, _dtype: DType, device: &Device) -> Result<Ctx> {
        let full_layer = self.layers.iter().position(|l| !l.local_rope);
        let local_layer = self.layers.iter().position(|l| l.local_rope);
        Ok(Ctx {
            full: self.tables(full_layer.unwrap_or(0), t, device)?,
            local: match local_layer {
                Some(i) => Some(self.tables(i, t, device)?),
                None => None,
            },
        })
    }

    fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        let x = self.embed.index_select(&ids.flatten_all()?, 0)?;
        match self.embed_scale {
            Some(s) => inplace::scale(x, s),
            None => Ok(x),
        }
    }

    fn embed_bwd(&self, ids: &Tensor, dx: Tensor, grads: &mut Grads) -> Result<()> {
        // The scale is on the rows' way out, so the rows' gradient is the scaled dx.
        let dx = match self.embed_scale {
            Some(s) => inplace::scale(dx, s)?,
            None => dx,
        };
        grads.add_rows(EMBED, &self.embed, ids, &dx, self.pad)
    }

    fn block_fwd(
        &self,
        i: usize,
        x: &Tensor,
        (b, t): (usize, usize),
        ctx: &Ctx,
        opts: &LeanOptions,
    ) -> Result<(Tensor, BlockSaved)> {
        if let Some(dt) = opts.amp {
            let (y, s) = self.block_fwd_amp(i, x, (b, t), ctx, dt)?;
            return Ok((y, BlockSaved::Amp(s)));
        }
        let l = &self.layers[i];
        let (h, hkv, hd) = (self.cfg.n_head, self.cfg.n_kv_head, self.cfg.head_dim);
        let n = b * t;
        let (cos, sin) = rope_of(l, ctx);
        let (h1, st1) = l.input_norm.fwd_keeping(x, opts.saved)?;
        let (q_lin, k_lin, v_lin, qkv) = l.qkv.fwd(&h1, h * hd, hkv * hd, opts.saved)?;
        // [N, n·hd] -> (norm over hd) -> [B, T, n, hd], rotated. (Each input is moved, so that
        // the unrotated heads are freed here, not at the end of the block.)
        let (qn, q_pre) = head_norm(l.q_norm.as_ref(), q_lin, (n, h, hd), opts.saved)?;
        let q = k::rope_fwd(&qn.reshape((b, t, h, hd))?, cos, sin)?;
        drop(qn);
        let (kn, k_pre) = head_norm(l.k_norm.as_ref(), k_lin, (n, hkv, hd), opts.saved)?;
        let k_ = k::rope_fwd(&kn.reshape((b, t, hkv, hd))?, cos, sin)?;
        drop(kn);
        let v = v_lin.reshape((b, t, hkv, hd))?;
        drop(v_lin);
        // What HF's attention holds beyond q, k, v: with a mask (a window in effect, sdpa) or
        // eager, k and v repeated to every query head (`repeat_kv`), and sdpa's mask.
        let (repeat, mask) = hf_attention_inputs(&self.cfg, i, t, opts);
        let (k_, v) = if repeat {
            (repeat_heads(k_, h / hkv)?, repeat_heads(v, h / hkv)?)
        } else {
            (k_, v)
        };
        let mask = match mask {
            Some(w) => Some(sdpa_window_mask(b, t, w, x.device())?),
            None => None,
        };
        let (o, attn) = attn_fwd_keeping(&q, &k_, &v, &l.spec, opts.attention, opts.saved)?;
        let v = match qkv {
            None => Ok(v),
            Some(qkv) => {
                drop(v);
                Err(qkv)
            }
        };
        let o = o.reshape((n, h * hd))?;
        let a = l.o.fwd(&o)?;
        let (x1, a, norm2) = match &l.norms {
            SubNorms::Pre(post_attention) => {
                let x1 = k::add(x, &a)?;
                drop(a);
                (x1, None, post_attention)
            }
            SubNorms::Sandwich {
                post_attention,
                pre_feedforward,
                ..
            } => {
                let (an, sta) = post_attention.fwd_keeping(&a, opts.saved)?;
                let x1 = k::add(x, &an)?;
                drop(an);
                (x1, Some((a, sta)), pre_feedforward)
            }
        };
        let (h2, st2) = norm2.fwd_keeping(&x1, opts.saved)?;
        let (m, ffn) = match &l.ffn {
            Ffn::Mlp(mlp) => {
                let (m, s) = mlp.fwd(&h2, opts.saved)?;
                (m, FfnSaved::Mlp(s))
            }
            Ffn::Moe(moe) => {
                let (m, s) = moe.fwd(&h2, opts.saved)?;
                (m, FfnSaved::Moe(s))
            }
        };
        let (y, m) = match &l.norms {
            SubNorms::Pre(_) => {
                let y = k::add(&x1, &m)?;
                drop(m);
                (y, None)
            }
            SubNorms::Sandwich {
                post_feedforward, ..
            } => {
                let (mn, stm) = post_feedforward.fwd_keeping(&m, opts.saved)?;
                let y = k::add(&x1, &mn)?;
                drop(mn);
                (y, Some((m, stm)))
            }
        };
        Ok((
            y,
            BlockSaved::Full(Saved {
                x: x.clone(),
                st1,
                h1,
                q_pre,
                k_pre,
                q,
                k: k_,
                v,
                o,
                attn,
                mask,
                a,
                x1,
                st2,
                h2,
                ffn,
                m,
            }),
        ))
    }

    fn block_bwd(
        &self,
        i: usize,
        s: BlockSaved,
        dy: Tensor,
        (b, t): (usize, usize),
        ctx: &Ctx,
        grads: &mut Grads,
    ) -> Result<Tensor> {
        let s = match s {
            BlockSaved::Full(s) => s,
            BlockSaved::Amp(s) => return self.block_bwd_amp(i, s, dy, (b, t), ctx, grads),
        };
        let l = &self.layers[i];
        let (h, hkv, hd) = (self.cfg.n_head, self.cfg.n_kv_head, self.cfg.head_dim);
        let n = b * t;
        let (cos, sin) = rope_of(l, ctx);
        let (norm2, sandwich) = match &l.norms {
            SubNorms::Pre(post_attention) => (post_attention, None),
            SubNorms::Sandwich {
                post_attention,
                pre_feedforward,
                post_feedforward,
            } => (pre_feedforward, Some((post_attention, post_feedforward))),
        };
        // y = x1 + post_feedforward(m) (sandwich) or x1 + m
        let dm = match (sandwich, s.m) {
            (Some((_, post_ff)), Some((m, stm))) => Some(post_ff.bwd(&dy, &m, &stm, grads)?),
            (None, None) => None,
            _ => candle_core::bail!("layer {i}: saved tensors of another norm placement"),
        };
        let dh2 = match (&l.ffn, s.ffn) {
            (Ffn::Mlp(mlp), FfnSaved::Mlp(ms)) => {
                mlp.bwd(&s.h2, ms, dm.as_ref().unwrap_or(&dy), grads)?
            }
            (Ffn::Moe(moe), FfnSaved::Moe(ms)) => {
                moe.bwd(&s.h2, ms, dm.as_ref().unwrap_or(&dy), grads)?
            }
            _ => candle_core::bail!("layer {i}: saved tensors of another MLP kind"),
        };
        drop((dm, s.h2));
        let dn2 = norm2.bwd(&dh2, &s.x1, &s.st2, grads)?;
        drop((dh2, s.x1, s.st2));
        let dx1 = inplace::add(dy, &dn2)?;
        drop(dn2);
        // x1 = x + post_attention(a) (sandwich) or x + a
        let da = match (sandwich, s.a) {
            (Some((post_attn, _)), Some((a, sta))) => Some(post_attn.bwd(&dx1, &a, &sta, grads)?),
            (None, None) => None,
            _ => candle_core::bail!("layer {i}: saved tensors of another norm placement"),
        };
        let d_o =
            l.o.bwd(&s.o, da.as_ref().unwrap_or(&dx1), grads, None)?
                .reshape((b, t, h, hd))?;
        drop(da);
        let (v, qkv) = match s.v {
            Ok(v) => (v, None),
            Err(qkv) => (
                qkv.narrow(1, (h + hkv) * hd, hkv * hd)?
                    .contiguous()?
                    .reshape((b, t, hkv, hd))?,
                Some(qkv),
            ),
        };
        // k kept with every query head: it was repeated (`hf_attention_inputs`).
        let repeat = h != hkv && s.k.dim(2)? == h;
        // v read again from a kept fused projection has the kv heads only.
        let v = if repeat && v.dim(2)? == hkv {
            repeat_heads(v, h / hkv)?
        } else {
            v
        };
        let (dq, dk, dv) = attn_bwd(
            &s.q,
            &s.k,
            &v,
            &s.o.reshape((b, t, h, hd))?,
            &s.attn,
            &d_o,
            &l.spec,
        )?;
        drop((d_o, s.q, s.k, v, qkv, s.o, s.attn, s.mask));
        // repeat_kv's backward: each kv head's gradient is the sum over its query group.
        let (dk, dv) = if repeat {
            (sum_groups(dk, hkv)?, sum_groups(dv, hkv)?)
        } else {
            (dk, dv)
        };
        let dq_pre = k::rope_bwd(&dq, cos, sin)?;
        drop(dq);
        let dq_pre = head_norm_bwd(l.q_norm.as_ref(), dq_pre, s.q_pre, n, h, hd, grads)?;
        let dv_flat = dv.reshape((n, hkv * hd))?;
        drop(dv);
        match &l.qkv {
            Qkv::Separate {
                q,
                k: kmap,
                v: vmap,
            } => {
                let dh1 = q.bwd(&s.h1, &dq_pre, grads, None)?;
                drop(dq_pre);
                let dk_pre = k::rope_bwd(&dk, cos, sin)?;
                drop(dk);
                let dk_pre = head_norm_bwd(l.k_norm.as_ref(), dk_pre, s.k_pre, n, hkv, hd, grads)?;
                let dh1 = kmap.bwd(&s.h1, &dk_pre, grads, Some(dh1))?;
                drop(dk_pre);
                let dh1 = vmap.bwd(&s.h1, &dv_flat, grads, Some(dh1))?;
                drop((dv_flat, s.h1));
                let dn1 = l.input_norm.bwd(&dh1, &s.x, &s.st1, grads)?;
                drop((dh1, s.x, s.st1));
                inplace::add(dx1, &dn1)
            }
            Qkv::Fused(qkv) => {
                let dk_pre = k::rope_bwd(&dk, cos, sin)?;
                drop(dk);
                let dk_pre = head_norm_bwd(l.k_norm.as_ref(), dk_pre, s.k_pre, n, hkv, hd, grads)?;
                // rows q | k | v of qkv_proj
                let dqkv = Tensor::cat(&[&dq_pre, &dk_pre, &dv_flat], 1)?;
                drop((dq_pre, dk_pre, dv_flat));
                let dh1 = qkv.bwd(&s.h1, &dqkv, grads, None)?;
                drop((dqkv, s.h1));
                let dn1 = l.input_norm.bwd(&dh1, &s.x, &s.st1, grads)?;
                drop((dh1, s.x, s.st1));
                inplace::add(dx1, &dn1)
            }
        }
    }

    fn final_norm(&self) -> &Norm {
        &self.norm
    }

    fn head(&self) -> (&Tensor, &str) {
        (&self.head, &self.head_name)
    }

    fn final_softcap(&self) -> Option<f64> {
        self.cfg.final_softcap
    }

    fn release_half(&self) {
        for l in &self.layers {
            if let (Qkv::Separate { q, k, v }, Ffn::Mlp(mlp)) = (&l.qkv, &l.ffn) {
                for m in [q, k, v, &l.o, &mlp.down] {
                    m.release_half();
                }
                if let GateUp::Separate { gate, up } = &mlp.gate_up {
                    gate.release_half();
                    up.release_half();
                }
            }
        }
    }
}

/// Whether HF's attention in `layer` holds k and v repeated to every query head, and the window
/// of the sdpa mask it holds, when the step keeps what HF keeps. sdpa takes GQA natively and
/// no mask while the causal mask can be skipped (no window, or T < window); with a window in
/// effect it gets an explicit mask and `repeat_kv`s; eager attention always repeats.
fn hf_attention_inputs(
    cfg: &ModelConfig,
    layer: usize,
    t: usize,
    opts: &LeanOptions,
) -> (bool, Option<usize>) {
    if opts.saved != SavedSet::Transformers {
        return (false, None);
    }
    let window = cfg.attention_window(layer).filter(|&w| t >= w);
    let eager = opts.attention == crate::train::Attention::Eager;
    let repeat = cfg.n_head != cfg.n_kv_head && (eager || window.is_some());
    let mask = if eager { None } else { window };
    (repeat, mask)
}

/// `[B, T, kv, hd]` -> `[B, T, kv·g, hd]`, each kv head repeated g times in a row (HF's
/// `repeat_kv` order); the input is released.
fn repeat_heads(x: Tensor, g: usize) -> Result<Tensor> {
    let (b, t, kv, hd) = x.dims4()?;
    x.unsqueeze(3)?
        .expand((b, t, kv, g, hd))?
        .contiguous()?
        .reshape((b, t, kv * g, hd))
}

/// `[B, T, kv·g, hd]` -> `[B, T, kv, hd]`: the sum over each group.
fn sum_groups(x: Tensor, kv: usize) -> Result<Tensor> {
    let (b, t, h, hd) = x.dims4()?;
    x.reshape((b, t, kv, h / kv, hd))?.sum(3)
}

/// HF's sdpa mask for a causal window `w`: `[B, 1, T, T]` f32, 0 where a query sees a key and
/// the dtype's minimum elsewhere.
fn sdpa_window_mask(b: usize, t: usize, w: usize, device: &Device) -> Result<Tensor> {
    let mut m = vec![f32::MIN; b * t * t];
    for row in m.chunks_mut(t * t) {
        for (i, q) in row.chunks_mut(t).enumerate() {
            for (j, v) in q.iter_mut().enumerate() {
                if j <= i && i - j < w {
                    *v = 0.0;
                }
            }
        }
    }
    Tensor::from_vec(m, (b, 1, t, t), &Device::Cpu)?.to_device(device)
}

/// An optional RMSNorm over each head of y `[N, heads·hd]`: (the normalised heads `[N, heads·hd]`,
/// what its backward needs: y itself and the per-head rstd).
fn head_norm(
    norm: Option<&Norm>,
    y: Tensor,
    (n, heads, hd): (usize, usize, usize),
    saved: SavedSet,
) -> Result<(Tensor, Option<(Tensor, NormStats)>)> {
    match norm {
        None => Ok((y, None)),
        Some(nm) => {
            // [N, heads·hd] -> [N·heads, hd]
            let (yn, st) = nm.fwd_keeping(&y.reshape((n * heads, hd))?, saved)?;
            Ok((yn.reshape((n, heads * hd))?, Some((y, st))))
        }
    }
}

/// d(norm input) `[N, heads·hd]` from d(norm output) `[B, T, heads, hd]` (or that gradient
/// reshaped when the layer has no q/k norm).
fn head_norm_bwd(
    norm: Option<&Norm>,
    dy: Tensor,
    saved: Option<(Tensor, NormStats)>,
    n: usize,
    heads: usize,
    hd: usize,
    grads: &mut Grads,
) -> Result<Tensor> {
    match (norm, saved) {
        (None, None) => dy.reshape((n, heads * hd)),
        (Some(nm), Some((y, st))) => nm
            .bwd(
                &dy.reshape((n * heads, hd))?,
                &y.reshape((n * heads, hd))?,
                &st,
                grads,
            )?
            .reshape((n, heads * hd)),
        _ => candle_core::bail!("q/k norm saved tensors do not match the layer"),
    }
}

fn rope_of<'a>(l: &Layer, ctx: &'a Ctx) -> (&'a Tensor, &'a Tensor) {
    match (&ctx.local, l.local_rope) {
        (Some((c, s)), true) => (c, s),
        _ => (&ctx.full.0, &ctx.full.1),
    }
}
