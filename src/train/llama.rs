//! The Llama skeleton's layer for the lean step, the maths of `model::llama` with an explicit
//! backward: RMSNorm, rotate-half RoPE (with the model's scaling tables), grouped-query attention
//! with optional q/k/v bias and per-layer sliding windows, SwiGLU / GeGLU MLP or a routed mixture
//! of experts (Mixtral, Qwen-MoE), tied or untied head, padding row without gradient.

use super::inplace;
use super::k;
use super::layers::{
    attn_bwd, attn_fwd, AttnSaved, Grads, Lin, Norm, NormKind, NormStats, Params, WeightLayout,
};
use super::step::Net;
use super::{LeanOptions, SavedSet};
use crate::config::{ExpertNames, MlpKind, ModelConfig, NormKind as CfgNorm};
use candle_core::{DType, Device, Result, Tensor, D};

const EMBED: &str = "model.embed_tokens.weight";

/// gate, up and down of one gated MLP (or one expert).
struct GatedMlp {
    gate: Lin,
    up: Lin,
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
            gate: lin(names[0])?,
            up: lin(names[1])?,
            down: lin(names[2])?,
            act,
        })
    }

    fn fwd(&self, x: &Tensor, saved: SavedSet) -> Result<(Tensor, MlpSaved)> {
        let gate = self.gate.fwd(x)?;
        let up = self.up.fwd(x)?;
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
        let dx = self.gate.bwd(x, &dgate, grads, None)?;
        drop(dgate);
        self.up.bwd(x, &dup, grads, Some(dx))
    }

    fn zero_grads(&self, grads: &mut Grads) -> Result<()> {
        self.gate.zero_grads(grads)?;
        self.up.zero_grads(grads)?;
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
                let dot: f32 = top.iter().map(|&e| dwr[e] * p[e] / sum).sum();
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

struct Layer {
    input_norm: Norm,
    q: Lin,
    k: Lin,
    v: Lin,
    o: Lin,
    post_norm: Norm,
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
    /// Attention's inputs after RoPE `[B, T, n, hd]`, its output `[N, H·hd]` (o_proj's input).
    q: Tensor,
    k: Tensor,
    v: Tensor,
    o: Tensor,
    attn: AttnSaved,
    x1: Tensor,
    st2: NormStats,
    /// The MLP's (or router's and experts') input.
    h2: Tensor,
    ffn: FfnSaved,
}

/// RoPE cos / sin `[T, rotary_dim / 2]` f32: global layers, and local ones when they differ.
pub(crate) struct Ctx {
    full: (Tensor, Tensor),
    local: Option<(Tensor, Tensor)>,
}

pub(crate) struct Llama {
    cfg: ModelConfig,
    embed: Tensor,
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
            let qkv = |n: &str| {
                Lin::load(
                    p,
                    &format!("{a}.{n}"),
                    cfg.has_qkv_bias(),
                    WeightLayout::OutIn,
                )
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
                Ffn::Mlp(GatedMlp::load(
                    p,
                    &format!("{l}.mlp"),
                    ["gate_proj", "up_proj", "down_proj"],
                    cfg.mlp_bias,
                    act,
                )?)
            };
            layers.push(Layer {
                input_norm: norm(&format!("{l}.input_layernorm"))?,
                q: qkv("q_proj")?,
                k: qkv("k_proj")?,
                v: qkv("v_proj")?,
                o: Lin::load(p, &format!("{a}.o_proj"), cfg.bias, WeightLayout::OutIn)?,
                post_norm: norm(&format!("{l}.post_attention_layernorm"))?,
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

impl Net for Llama {
    type Saved = Saved;
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
        self.embed.index_select(&ids.flatten_all()?, 0)
    }

    fn embed_bwd(&self, ids: &Tensor, dx: Tensor, grads: &mut Grads) -> Result<()> {
        grads.add_rows(EMBED, &self.embed, ids, &dx, self.pad)
    }

    fn block_fwd(
        &self,
        i: usize,
        x: &Tensor,
        (b, t): (usize, usize),
        ctx: &Ctx,
        opts: &LeanOptions,
    ) -> Result<(Tensor, Saved)> {
        let l = &self.layers[i];
        let (h, hkv, hd) = (self.cfg.n_head, self.cfg.n_kv_head, self.cfg.head_dim);
        let (cos, sin) = rope_of(l, ctx);
        let (h1, st1) = l.input_norm.fwd_keeping(x, opts.saved)?;
        // [N, n·hd] -> [B, T, n, hd], rotated
        let q = k::rope_fwd(&l.q.fwd(&h1)?.reshape((b, t, h, hd))?, cos, sin)?;
        let k_ = k::rope_fwd(&l.k.fwd(&h1)?.reshape((b, t, hkv, hd))?, cos, sin)?;
        let v = l.v.fwd(&h1)?.reshape((b, t, hkv, hd))?;
        let (o, attn) = attn_fwd(&q, &k_, &v, &l.spec, opts.attention)?;
        let o = o.reshape((b * t, h * hd))?;
        let a = l.o.fwd(&o)?;
        let x1 = (x + a)?;
        let (h2, st2) = l.post_norm.fwd_keeping(&x1, opts.saved)?;
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
        let y = (&x1 + m)?;
        Ok((
            y,
            Saved {
                x: x.clone(),
                st1,
                h1,
                q,
                k: k_,
                v,
                o,
                attn,
                x1,
                st2,
                h2,
                ffn,
            },
        ))
    }

    fn block_bwd(
        &self,
        i: usize,
        s: Saved,
        dy: Tensor,
        (b, t): (usize, usize),
        ctx: &Ctx,
        grads: &mut Grads,
    ) -> Result<Tensor> {
        let l = &self.layers[i];
        let (h, hkv, hd) = (self.cfg.n_head, self.cfg.n_kv_head, self.cfg.head_dim);
        let n = b * t;
        let (cos, sin) = rope_of(l, ctx);
        let dh2 = match (&l.ffn, s.ffn) {
            (Ffn::Mlp(mlp), FfnSaved::Mlp(ms)) => mlp.bwd(&s.h2, ms, &dy, grads)?,
            (Ffn::Moe(moe), FfnSaved::Moe(ms)) => moe.bwd(&s.h2, ms, &dy, grads)?,
            _ => candle_core::bail!("layer {i}: saved tensors of another MLP kind"),
        };
        drop(s.h2);
        let dn2 = l.post_norm.bwd(&dh2, &s.x1, &s.st2, grads)?;
        drop((dh2, s.x1, s.st2));
        let dx1 = inplace::add(dy, &dn2)?;
        drop(dn2);
        let d_o = l.o.bwd(&s.o, &dx1, grads, None)?.reshape((b, t, h, hd))?;
        let (dq, dk, dv) = attn_bwd(
            &s.q,
            &s.k,
            &s.v,
            &s.o.reshape((b, t, h, hd))?,
            &s.attn,
            &d_o,
            &l.spec,
        )?;
        drop((d_o, s.q, s.k, s.v, s.o, s.attn));
        let dq_pre = k::rope_bwd(&dq, cos, sin)?.reshape((n, h * hd))?;
        drop(dq);
        let dh1 = l.q.bwd(&s.h1, &dq_pre, grads, None)?;
        drop(dq_pre);
        let dk_pre = k::rope_bwd(&dk, cos, sin)?.reshape((n, hkv * hd))?;
        drop(dk);
        let dh1 = l.k.bwd(&s.h1, &dk_pre, grads, Some(dh1))?;
        drop(dk_pre);
        let dh1 =
            l.v.bwd(&s.h1, &dv.reshape((n, hkv * hd))?, grads, Some(dh1))?;
        drop((dv, s.h1));
        let dn1 = l.input_norm.bwd(&dh1, &s.x, &s.st1, grads)?;
        drop((dh1, s.x, s.st1));
        inplace::add(dx1, &dn1)
    }

    fn final_norm(&self) -> &Norm {
        &self.norm
    }

    fn head(&self) -> (&Tensor, &str) {
        (&self.head, &self.head_name)
    }
}

fn rope_of<'a>(l: &Layer, ctx: &'a Ctx) -> (&'a Tensor, &'a Tensor) {
    match (&ctx.local, l.local_rope) {
        (Some((c, s)), true) => (c, s),
        _ => (&ctx.full.0, &ctx.full.1),
    }
}
