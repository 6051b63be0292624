//! The Llama skeleton as HF's `LlamaForCausalLM` stores and computes it (RMSNorm, RoPE in the
//! rotate-half layout, grouped-query attention, gated MLP), and the relatives that differ from it
//! by config switches only, each with its HF names and layouts:
//! - Mistral, Qwen2: sliding windows, q/k/v biases (`qkv_bias`);
//! - Mixtral, Qwen3-MoE: a routed mixture of SwiGLU experts in place of the MLP (`n_experts`),
//!   expert width, renormalised top-k or not, which layers are sparse, two naming schemes;
//! - Qwen3: an RMSNorm over head_dim on every query and key head before RoPE (`qk_norm`);
//! - Gemma 2/3: embedding × √d, (1 + w) RMSNorm, four norms per layer, GeGLU with the tanh GELU,
//!   scores / √query_pre_attn_scalar, attention and final soft-caps, local (sliding-window) and
//!   global layers with their own RoPE bases;
//! - Phi-3: fused `qkv_proj` and `gate_up_proj`, RoPE on part of each head, LongRoPE.

use super::{
    attention_scaled, norm_internal_dtype, window_mask, Linear, INIT_ONE, INIT_WEIGHT, INIT_ZERO,
};
use crate::config::{
    Attention as AttentionKind, EmbeddingScale, ExpertNames, MlpKind, ModelConfig, NormKind,
    NormPlacement, RopeScaling, Storage,
};
use candle_core::{DType, Device, Result, Tensor, D};
use candle_nn::VarBuilder;

/// RMSNorm written with basic ops so that it has a backward. `Rms` is `LlamaRMSNorm`
/// (normalise in f32, cast back, × w); `RmsOnePlus` is Gemma's (normalise and scale by (1 + w) in
/// f32, then cast back; the weight starts at 0).
#[derive(Debug, Clone)]
struct RmsNorm {
    weight: Tensor,
    eps: f64,
    one_plus: bool,
}

impl RmsNorm {
    fn load(vb: VarBuilder, dim: usize, eps: f64, kind: NormKind) -> Result<Self> {
        let one_plus = kind == NormKind::RmsOnePlus;
        let init = if one_plus { INIT_ZERO } else { INIT_ONE };
        Ok(Self {
            weight: vb.get_with_hints(dim, "weight", init)?,
            eps,
            one_plus,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dtype = x.dtype();
        let internal = norm_internal_dtype(dtype);
        let x = x.to_dtype(internal)?;
        let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
        let x = x.broadcast_div(&(ms + self.eps)?.sqrt()?)?;
        if self.one_plus {
            let w = (self.weight.to_dtype(internal)? + 1.0)?;
            x.broadcast_mul(&w)?.to_dtype(dtype)
        } else {
            x.to_dtype(dtype)?.broadcast_mul(&self.weight)
        }
    }
}

/// What RoPE needs from the config for one kind of layer, kept so that `forward` does not hold
/// the whole config.
#[derive(Debug, Clone, PartialEq)]
struct RopeParams {
    rotary_dim: usize,
    theta: f64,
    scaling: Option<RopeScaling>,
}

/// Rotary position embedding tables for the first `t` positions, `[T, rotary_dim]` each in the
/// rotate-half layout (frequencies repeated: `cat(freqs, freqs)`), as HF's rotary embeddings.
/// Computed per forward from the config: they are not parameters, and a table for a model's full
/// block_size (131,072 for Llama 3.1) would be a large allocation nobody asked for.
#[derive(Debug, Clone)]
struct Rope {
    cos: Tensor,
    sin: Tensor,
}

impl Rope {
    fn new(p: &RopeParams, t: usize, dtype: DType, device: &Device) -> Result<Self> {
        let (inv_freq, attention_factor) = inv_freq(p, t);
        let half = inv_freq.len();
        // HF computes positions × inv_freq and the cos/sin in f32, then multiplies by the
        // attention factor (LongRoPE; 1 otherwise).
        let mut cos = Vec::with_capacity(t * 2 * half);
        let mut sin = Vec::with_capacity(t * 2 * half);
        for pos in 0..t {
            for _ in 0..2 {
                for &f in &inv_freq {
                    let angle = pos as f32 * f;
                    cos.push(angle.cos() * attention_factor);
                    sin.push(angle.sin() * attention_factor);
                }
            }
        }
        let cos = Tensor::from_vec(cos, (t, 2 * half), device)?.to_dtype(dtype)?;
        let sin = Tensor::from_vec(sin, (t, 2 * half), device)?.to_dtype(dtype)?;
        Ok(Self { cos, sin })
    }

    /// x: `[B, H, T, hd]` -> the first rotary_dim channels become x·cos + rotate_half(x)·sin,
    /// the rest pass unchanged (Phi's partial rotary).
    fn apply(&self, x: &Tensor) -> Result<Tensor> {
        let hd = x.dim(D::Minus1)?;
        let rot = self.cos.dim(D::Minus1)?;
        let (x_rot, x_pass) = if rot == hd {
            (x.clone(), None)
        } else {
            (
                x.narrow(D::Minus1, 0, rot)?,
                Some(x.narrow(D::Minus1, rot, hd - rot)?),
            )
        };
        let half = rot / 2;
        let x1 = x_rot.narrow(D::Minus1, 0, half)?;
        let x2 = x_rot.narrow(D::Minus1, half, half)?;
        // rotate_half: [x1, x2] -> [-x2, x1]
        let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
        let y = (x_rot.broadcast_mul(&self.cos)? + rotated.broadcast_mul(&self.sin)?)?;
        match x_pass {
            None => Ok(y),
            Some(p) => Tensor::cat(&[&y, &p], D::Minus1),
        }
    }
}

/// Inverse frequencies θ^(-2i/d), i < d/2 (d = rotary_dim), in f32 as HF computes them, with the
/// configured scaling, and the factor cos/sin are multiplied by (LongRoPE's attention factor, 1
/// for the others). `t` is the sequence length: LongRoPE switches from its short to its long
/// factors beyond the original context, as transformers does per forward.
fn inv_freq(p: &RopeParams, t: usize) -> (Vec<f32>, f32) {
    let d = p.rotary_dim;
    let base: Vec<f64> = (0..d / 2)
        .map(|i| 1.0 / p.theta.powf((2 * i) as f64 / d as f64))
        .collect();
    let as_f32 = |v: Vec<f64>| v.into_iter().map(|f| f as f32).collect();
    match &p.scaling {
        None => (as_f32(base), 1.0),
        Some(RopeScaling::Linear { factor }) => {
            (as_f32(base.into_iter().map(|f| f / factor).collect()), 1.0)
        }
        Some(RopeScaling::LongRope(l)) => {
            let ext = if t > l.original_max_position_embeddings {
                &l.long_factor
            } else {
                &l.short_factor
            };
            let f = base.iter().zip(ext).map(|(f, e)| f / e).collect();
            (as_f32(f), l.attention_factor as f32)
        }
        Some(RopeScaling::Llama3(s)) => {
            // HF `_compute_llama3_parameters`.
            let old_ctx = s.original_max_position_embeddings as f64;
            let low_freq_wavelen = old_ctx / s.low_freq_factor;
            let high_freq_wavelen = old_ctx / s.high_freq_factor;
            let f = base
                .into_iter()
                .map(|f| {
                    // HF rounds the base frequencies to f32 before scaling.
                    let f = f as f32 as f64;
                    let wavelen = 2.0 * std::f64::consts::PI / f;
                    let scaled = if wavelen > low_freq_wavelen {
                        f / s.factor
                    } else {
                        f
                    };
                    let medium = wavelen >= high_freq_wavelen && wavelen <= low_freq_wavelen;
                    if medium {
                        let smooth = (old_ctx / wavelen - s.low_freq_factor)
                            / (s.high_freq_factor - s.low_freq_factor);
                        (1.0 - smooth) * scaled / s.factor + smooth * scaled
                    } else {
                        scaled
                    }
                })
                .collect();
            (as_f32(f), 1.0)
        }
    }
}

/// RoPE of layer `layer` for positions `0..t` as the forward computes it, before the
/// rotate-half repeat: (cos, sin), each `[t, rotary_dim / 2]` row-major in f32 (the attention
/// factor applied). For engines that apply RoPE with their own kernel (the lean step).
pub fn rope_half_tables(cfg: &ModelConfig, layer: usize, t: usize) -> (Vec<f32>, Vec<f32>) {
    let local =
        cfg.rope_per_layer_type && matches!(cfg.attention(layer), AttentionKind::Sliding { .. });
    let p = RopeParams {
        rotary_dim: cfg.rotary_dim,
        theta: if local {
            cfg.rope_local_theta
        } else {
            cfg.rope_theta
        },
        scaling: if local {
            None
        } else {
            cfg.rope_scaling.clone()
        },
    };
    let (inv_freq, attention_factor) = inv_freq(&p, t);
    let mut cos = Vec::with_capacity(t * inv_freq.len());
    let mut sin = Vec::with_capacity(t * inv_freq.len());
    for pos in 0..t {
        for &f in &inv_freq {
            let angle = pos as f32 * f;
            cos.push(angle.cos() * attention_factor);
            sin.push(angle.sin() * attention_factor);
        }
    }
    (cos, sin)
}

/// Per-forward tables shared by the layers: RoPE for global and local layers, one mask per
/// distinct window.
struct Context {
    rope_full: Rope,
    /// `None` when local layers use the same RoPE as global ones.
    rope_local: Option<Rope>,
    masks: Vec<(AttentionKind, Tensor)>,
}

impl Context {
    fn mask(&self, kind: AttentionKind) -> Result<&Tensor> {
        self.masks
            .iter()
            .find(|(k, _)| *k == kind)
            .map(|(_, m)| m)
            .ok_or_else(|| candle_core::Error::Msg(format!("no mask built for {kind:?}")))
    }

    fn rope(&self, kind: AttentionKind) -> &Rope {
        match (kind, &self.rope_local) {
            (AttentionKind::Sliding { .. }, Some(local)) => local,
            _ => &self.rope_full,
        }
    }
}

/// q, k and v, stored separately or fused (Phi-3's `qkv_proj`, rows q | k | v).
#[derive(Debug, Clone)]
enum QkvProj {
    Separate { q: Linear, k: Linear, v: Linear },
    Fused(Linear),
}

#[derive(Debug, Clone)]
struct Attention {
    qkv: QkvProj,
    o_proj: Linear,
    /// Qwen3 / Gemma 3: RMSNorm over head_dim on each query and key head, before RoPE.
    q_norm: Option<RmsNorm>,
    k_norm: Option<RmsNorm>,
    n_head: usize,
    n_kv_head: usize,
    head_dim: usize,
    scale: f64,
    softcap: Option<f64>,
    kind: AttentionKind,
}

impl Attention {
    fn load(vb: VarBuilder, cfg: &ModelConfig, layer: usize) -> Result<Self> {
        let d = cfg.n_embd;
        let qkv_bias = cfg.has_qkv_bias();
        let qkv = match cfg.qkv_storage {
            Storage::Separate => QkvProj::Separate {
                q: Linear::load(vb.pp("q_proj"), d, cfg.q_dim(), qkv_bias)?,
                k: Linear::load(vb.pp("k_proj"), d, cfg.kv_dim(), qkv_bias)?,
                v: Linear::load(vb.pp("v_proj"), d, cfg.kv_dim(), qkv_bias)?,
            },
            Storage::Fused => QkvProj::Fused(Linear::load(
                vb.pp("qkv_proj"),
                d,
                cfg.q_dim() + 2 * cfg.kv_dim(),
                qkv_bias,
            )?),
        };
        let (q_norm, k_norm) = if cfg.qk_norm {
            (
                Some(RmsNorm::load(
                    vb.pp("q_norm"),
                    cfg.head_dim,
                    cfg.norm_eps,
                    cfg.norm,
                )?),
                Some(RmsNorm::load(
                    vb.pp("k_norm"),
                    cfg.head_dim,
                    cfg.norm_eps,
                    cfg.norm,
                )?),
            )
        } else {
            (None, None)
        };
        Ok(Self {
            qkv,
            o_proj: Linear::load(vb.pp("o_proj"), cfg.q_dim(), d, cfg.bias)?,
            q_norm,
            k_norm,
            n_head: cfg.n_head,
            n_kv_head: cfg.n_kv_head,
            head_dim: cfg.head_dim,
            scale: 1.0 / cfg.attn_scalar.sqrt(),
            softcap: cfg.attn_softcap,
            kind: cfg.attention(layer),
        })
    }

    fn forward(&self, x: &Tensor, ctx: &Context) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let hd = self.head_dim;
        // [B, T, n·hd] -> [B, T, n, hd] -> (norm over hd) -> [B, n, T, hd]
        let heads = |y: Tensor, n: usize, norm: Option<&RmsNorm>| -> Result<Tensor> {
            let y = y.reshape((b, t, n, hd))?;
            let y = match norm {
                Some(nm) => nm.forward(&y)?,
                None => y,
            };
            y.transpose(1, 2)?.contiguous()
        };
        let (q, k, v) = match &self.qkv {
            QkvProj::Separate { q, k, v } => (q.forward(x)?, k.forward(x)?, v.forward(x)?),
            QkvProj::Fused(p) => {
                let qkv = p.forward(x)?;
                let (qd, kvd) = (self.n_head * hd, self.n_kv_head * hd);
                (
                    qkv.narrow(D::Minus1, 0, qd)?,
                    qkv.narrow(D::Minus1, qd, kvd)?,
                    qkv.narrow(D::Minus1, qd + kvd, kvd)?,
                )
            }
        };
        let rope = ctx.rope(self.kind);
        let q = rope.apply(&heads(q, self.n_head, self.q_norm.as_ref())?)?;
        let k = rope.apply(&heads(k, self.n_kv_head, self.k_norm.as_ref())?)?;
        let v = heads(v, self.n_kv_head, None)?;
        let k = self.repeat_kv(k)?;
        let v = self.repeat_kv(v)?;
        let y = attention_scaled(&q, &k, &v, ctx.mask(self.kind)?, self.scale, self.softcap)?;
        // [B, H, T, hd] -> [B, T, H, hd] -> [B, T, H·hd]
        let y = y.transpose(1, 2)?.reshape((b, t, self.n_head * hd))?;
        self.o_proj.forward(&y)
    }

    /// GQA: each kv head serves n_head / n_kv_head query heads.
    fn repeat_kv(&self, x: Tensor) -> Result<Tensor> {
        let rep = self.n_head / self.n_kv_head;
        if rep == 1 {
            return Ok(x);
        }
        let (b, kv, t, hd) = x.dims4()?;
        // [B, kv, T, hd] -> [B, kv, rep, T, hd] -> [B, kv·rep, T, hd]
        x.unsqueeze(2)?
            .broadcast_as((b, kv, rep, t, hd))?
            .reshape((b, kv * rep, t, hd))
    }
}

/// gate and up, stored separately or fused (Phi-3's `gate_up_proj`, rows gate | up).
#[derive(Debug, Clone)]
enum GateUp {
    Separate { gate: Linear, up: Linear },
    Fused(Linear),
}

/// A gated MLP: down(act(gate(x)) · up(x)) with act = silu (SwiGLU) or the tanh GELU (GeGLU).
/// Mixtral names the three matrices w1, w3, w2.
#[derive(Debug, Clone)]
struct GatedMlp {
    gate_up: GateUp,
    down: Linear,
    width: usize,
    gelu: bool,
}

/// Checkpoint names of (gate, up, down) and whether gate | up are fused in one tensor.
struct MlpNames<'a> {
    gate: &'a str,
    up: &'a str,
    down: &'a str,
    fused: Option<&'a str>,
}

const LLAMA_MLP: MlpNames = MlpNames {
    gate: "gate_proj",
    up: "up_proj",
    down: "down_proj",
    fused: None,
};
const PHI3_MLP: MlpNames = MlpNames {
    gate: "",
    up: "",
    down: "down_proj",
    fused: Some("gate_up_proj"),
};
const MIXTRAL_EXPERT: MlpNames = MlpNames {
    gate: "w1",
    up: "w3",
    down: "w2",
    fused: None,
};

impl GatedMlp {
    fn load(
        vb: VarBuilder,
        cfg: &ModelConfig,
        width: usize,
        names: &MlpNames,
        bias: bool,
    ) -> Result<Self> {
        let d = cfg.n_embd;
        let gate_up = match names.fused {
            None => GateUp::Separate {
                gate: Linear::load(vb.pp(names.gate), d, width, bias)?,
                up: Linear::load(vb.pp(names.up), d, width, bias)?,
            },
            Some(f) => GateUp::Fused(Linear::load(vb.pp(f), d, 2 * width, bias)?),
        };
        Ok(Self {
            gate_up,
            down: Linear::load(vb.pp(names.down), width, d, bias)?,
            width,
            gelu: cfg.mlp == MlpKind::GeGlu,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (gate, up) = match &self.gate_up {
            GateUp::Separate { gate, up } => (gate.forward(x)?, up.forward(x)?),
            GateUp::Fused(p) => {
                let gu = p.forward(x)?;
                (
                    gu.narrow(D::Minus1, 0, self.width)?,
                    gu.narrow(D::Minus1, self.width, self.width)?,
                )
            }
        };
        // candle's `gelu` is the tanh form (HF gelu_pytorch_tanh / gelu_new), with a backward.
        let act = if self.gelu {
            gate.gelu()?
        } else {
            gate.silu()?
        };
        self.down.forward(&(act * up)?)
    }
}

/// A routed mixture of gated experts (HF `MixtralSparseMoeBlock`, `Qwen3MoeSparseMoeBlock`):
/// softmax over all experts' router logits (f32), keep the top k, renormalise them when the
/// config says so (Mixtral always, Qwen-MoE with `norm_topk_prob`), and sum the chosen experts'
/// outputs weighted by those probabilities. Each expert runs only on the tokens routed to it.
#[derive(Debug, Clone)]
struct SparseMoe {
    gate: Linear,
    experts: Vec<GatedMlp>,
    top_k: usize,
    renormalize: bool,
}

impl SparseMoe {
    fn load(vb: VarBuilder, cfg: &ModelConfig) -> Result<Self> {
        let gate = Linear::load(vb.pp("gate"), cfg.n_embd, cfg.n_experts, false)?;
        let names = match cfg.expert_names {
            ExpertNames::Mixtral => &MIXTRAL_EXPERT,
            ExpertNames::Qwen => &LLAMA_MLP,
        };
        let experts = (0..cfg.n_experts)
            .map(|e| {
                GatedMlp::load(
                    vb.pp(format!("experts.{e}")),
                    cfg,
                    cfg.moe_intermediate_size,
                    names,
                    false,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            gate,
            experts,
            top_k: cfg.n_experts_per_tok,
            renormalize: cfg.moe_renormalize,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, t, d) = x.dims3()?;
        let n_exp = self.experts.len();
        // [B, T, d] -> [N, d]
        let x = x.reshape((b * t, d))?;
        let n = b * t;
        // [N, E] router probabilities, in f32 as HF does
        let probs =
            candle_nn::ops::softmax(&self.gate.forward(&x)?.to_dtype(DType::F32)?, D::Minus1)?;
        // The top-k choice is discrete (no gradient in any framework): made on host values,
        // it becomes a constant 0/1 mask, and the weights flow through differentiable ops.
        let host: Vec<Vec<f32>> = probs.to_vec2()?;
        let mut mask = vec![0f32; n * n_exp];
        let mut tokens_of: Vec<Vec<u32>> = vec![Vec::new(); n_exp];
        for (i, row) in host.iter().enumerate() {
            let mut order: Vec<usize> = (0..n_exp).collect();
            // Stable sort, descending: ties go to the lower expert index, as torch.topk.
            order.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
            for &e in order.iter().take(self.top_k) {
                mask[i * n_exp + e] = 1.0;
                tokens_of[e].push(i as u32);
            }
        }
        let mask = Tensor::from_vec(mask, (n, n_exp), x.device())?;
        let kept = (probs * mask)?;
        // [N, E], zero off the top k (rows summing to 1 when renormalised)
        let weights = if self.renormalize {
            kept.broadcast_div(&kept.sum_keepdim(D::Minus1)?)?
        } else {
            kept
        }
        .to_dtype(x.dtype())?;
        let mut out = x.zeros_like()?;
        for (e, expert) in self.experts.iter().enumerate() {
            if tokens_of[e].is_empty() {
                // An expert no token chose runs on one token with weight 0, so that its
                // gradient is an exact zero (as transformers reports it), not absent.
                // (A zero tensor, not `* 0.0`: candle prunes an affine by 0 from backprop.)
                let zero = Tensor::zeros((1, 1), x.dtype(), x.device())?;
                let ye = expert.forward(&x.narrow(0, 0, 1)?)?.broadcast_mul(&zero)?;
                out = out.slice_assign(&[0..1, 0..d], &(out.narrow(0, 0, 1)? + ye)?)?;
                continue;
            }
            let idx = Tensor::new(tokens_of[e].as_slice(), x.device())?;
            // [n_e, d]
            let xe = x.index_select(&idx, 0)?;
            // [N] -> [n_e, 1]
            let we = weights
                .narrow(1, e, 1)?
                .squeeze(1)?
                .contiguous()?
                .index_select(&idx, 0)?
                .unsqueeze(1)?;
            let ye = expert.forward(&xe)?.broadcast_mul(&we)?;
            out = out.index_add(&idx, &ye, 0)?;
        }
        out.reshape((b, t, d))
    }
}

#[derive(Debug, Clone)]
enum FeedForward {
    Mlp(GatedMlp),
    Moe(SparseMoe),
}

impl FeedForward {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            FeedForward::Mlp(m) => m.forward(x),
            FeedForward::Moe(m) => m.forward(x),
        }
    }
}

/// Gemma's extra norms on each sublayer's output, before the residual add.
#[derive(Debug, Clone)]
struct SandwichNorms {
    /// Gemma's `post_attention_layernorm` (on the attention output).
    post_attention: RmsNorm,
    pre_feedforward: RmsNorm,
    post_feedforward: RmsNorm,
}

#[derive(Debug, Clone)]
struct Layer {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    norms: SublayerNorms,
    ffn: FeedForward,
}

/// The norms around the MLP. Llama's `post_attention_layernorm` is the norm before the MLP;
/// with sandwich norms the same name is the norm after attention and
/// `pre_feedforward_layernorm` precedes the MLP.
#[derive(Debug, Clone)]
enum SublayerNorms {
    Pre(RmsNorm),
    Sandwich(SandwichNorms),
}

impl Layer {
    fn load(vb: VarBuilder, cfg: &ModelConfig, i: usize) -> Result<Self> {
        let d = cfg.n_embd;
        let norm = |name: &str| RmsNorm::load(vb.pp(name), d, cfg.norm_eps, cfg.norm);
        let ffn = if cfg.layer_is_moe(i) {
            let prefix = match cfg.expert_names {
                ExpertNames::Mixtral => "block_sparse_moe",
                ExpertNames::Qwen => "mlp",
            };
            FeedForward::Moe(SparseMoe::load(vb.pp(prefix), cfg)?)
        } else {
            let names = match cfg.gate_up_storage {
                Storage::Separate => &LLAMA_MLP,
                Storage::Fused => &PHI3_MLP,
            };
            FeedForward::Mlp(GatedMlp::load(
                vb.pp("mlp"),
                cfg,
                cfg.intermediate_size,
                names,
                cfg.mlp_bias,
            )?)
        };
        let norms = match cfg.norm_placement {
            NormPlacement::Pre => SublayerNorms::Pre(norm("post_attention_layernorm")?),
            NormPlacement::Sandwich => SublayerNorms::Sandwich(SandwichNorms {
                post_attention: norm("post_attention_layernorm")?,
                pre_feedforward: norm("pre_feedforward_layernorm")?,
                post_feedforward: norm("post_feedforward_layernorm")?,
            }),
        };
        Ok(Self {
            input_layernorm: norm("input_layernorm")?,
            self_attn: Attention::load(vb.pp("self_attn"), cfg, i)?,
            norms,
            ffn,
        })
    }

    fn forward(&self, x: &Tensor, ctx: &Context) -> Result<Tensor> {
        let attn = self
            .self_attn
            .forward(&self.input_layernorm.forward(x)?, ctx)?;
        match &self.norms {
            SublayerNorms::Pre(post_attention_layernorm) => {
                let x = (x + attn)?;
                &x + self.ffn.forward(&post_attention_layernorm.forward(&x)?)?
            }
            SublayerNorms::Sandwich(n) => {
                let x = (x + n.post_attention.forward(&attn)?)?;
                let h = self.ffn.forward(&n.pre_feedforward.forward(&x)?)?;
                &x + n.post_feedforward.forward(&h)?
            }
        }
    }
}

/// Llama-skeleton causal LM; field names follow the checkpoint keys.
#[derive(Debug, Clone)]
pub struct Llama {
    embed_tokens: Tensor,
    layers: Vec<Layer>,
    norm: RmsNorm,
    /// `Some` only when the head is untied (`lm_head.weight`, `[vocab, d]`).
    lm_head: Option<Tensor>,
    rope_full: RopeParams,
    rope_local: RopeParams,
    layer_attention: Vec<AttentionKind>,
    embedding_scale: EmbeddingScale,
    final_softcap: Option<f64>,
    pad_token_id: Option<u32>,
}

impl Llama {
    pub fn load(vb: VarBuilder, cfg: &ModelConfig) -> Result<Self> {
        let m = vb.pp("model");
        let d = cfg.n_embd;
        let embed_tokens =
            m.get_with_hints((cfg.vocab_size, d), "embed_tokens.weight", INIT_WEIGHT)?;
        let layers = (0..cfg.n_layer)
            .map(|i| Layer::load(m.pp(format!("layers.{i}")), cfg, i))
            .collect::<Result<Vec<_>>>()?;
        let norm = RmsNorm::load(m.pp("norm"), d, cfg.norm_eps, cfg.norm)?;
        let lm_head = if cfg.tie_embeddings {
            None
        } else {
            Some(vb.get_with_hints((cfg.vocab_size, d), "lm_head.weight", INIT_WEIGHT)?)
        };
        Ok(Self {
            embed_tokens,
            layers,
            norm,
            lm_head,
            rope_full: RopeParams {
                rotary_dim: cfg.rotary_dim,
                theta: cfg.rope_theta,
                scaling: cfg.rope_scaling.clone(),
            },
            // Gemma 3's local (sliding-window) layers: their own base, never rescaled. Elsewhere
            // every layer has the same RoPE.
            rope_local: if cfg.rope_per_layer_type {
                RopeParams {
                    rotary_dim: cfg.rotary_dim,
                    theta: cfg.rope_local_theta,
                    scaling: None,
                }
            } else {
                RopeParams {
                    rotary_dim: cfg.rotary_dim,
                    theta: cfg.rope_theta,
                    scaling: cfg.rope_scaling.clone(),
                }
            },
            layer_attention: (0..cfg.n_layer).map(|i| cfg.attention(i)).collect(),
            embedding_scale: cfg.embedding_scale,
            final_softcap: cfg.final_softcap,
            pad_token_id: cfg.pad_token_id.and_then(|p| u32::try_from(p).ok()),
        })
    }

    fn context(&self, t: usize, dtype: DType, device: &Device) -> Result<Context> {
        let rope_full = Rope::new(&self.rope_full, t, dtype, device)?;
        let any_local = self
            .layer_attention
            .iter()
            .any(|a| matches!(a, AttentionKind::Sliding { .. }));
        let rope_local = if any_local && self.rope_local != self.rope_full {
            Some(Rope::new(&self.rope_local, t, dtype, device)?)
        } else {
            None
        };
        let mut masks: Vec<(AttentionKind, Tensor)> = Vec::new();
        for &kind in &self.layer_attention {
            if masks.iter().any(|(k, _)| *k == kind) {
                continue;
            }
            let window = match kind {
                AttentionKind::Full => None,
                AttentionKind::Sliding { window } => Some(window),
            };
            masks.push((kind, window_mask(t, window, dtype, device)?));
        }
        Ok(Context {
            rope_full,
            rope_local,
            masks,
        })
    }

    /// u32 ids `[N]` -> rows `[N, d]`. The padding row's output is its weight but it receives no
    /// gradient, as torch's `nn.Embedding(padding_idx)`: its rows come from a detached copy.
    fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        let x = self.embed_tokens.index_select(ids, 0)?;
        let Some(pad) = self.pad_token_id else {
            return Ok(x);
        };
        let host: Vec<u32> = ids.to_dtype(DType::U32)?.to_vec1()?;
        if !host.contains(&pad) {
            return Ok(x);
        }
        let is_pad: Vec<u8> = host.iter().map(|&i| u8::from(i == pad)).collect();
        let mask =
            Tensor::from_vec(is_pad, (host.len(), 1), x.device())?.broadcast_as(x.shape())?;
        let pad_row = self
            .embed_tokens
            .detach()
            .narrow(0, pad as usize, 1)?
            .broadcast_as(x.shape())?;
        mask.where_cond(&pad_row, &x)
    }

    /// u32 ids `[B, T]` -> logits `[B, T, V]`.
    pub fn forward(&self, input_ids: &Tensor) -> Result<Tensor> {
        let (b, t) = input_ids.dims2()?;
        let (_, d) = self.embed_tokens.dims2()?;
        // [B·T] -> [B·T, d] -> [B, T, d]
        let mut x = self.embed(&input_ids.flatten_all()?)?.reshape((b, t, d))?;
        if self.embedding_scale == EmbeddingScale::SqrtHidden {
            // HF multiplies by √d rounded to the activation dtype first (Gemma's normalizer).
            let s = Tensor::new((d as f64).sqrt() as f32, x.device())?.to_dtype(x.dtype())?;
            x = x.broadcast_mul(&s)?;
        }
        let ctx = self.context(t, x.dtype(), x.device())?;
        for layer in &self.layers {
            x = layer.forward(&x, &ctx)?;
        }
        let x = self.norm.forward(&x)?;
        let head = self.lm_head.as_ref().unwrap_or(&self.embed_tokens);
        let (vocab, _) = head.dims2()?;
        // [B·T, d] @ [d, V] -> [B, T, V]
        let logits = x
            .reshape((b * t, d))?
            .matmul(&head.t()?)?
            .reshape((b, t, vocab))?;
        match self.final_softcap {
            Some(c) => (logits / c)?.tanh()? * c,
            None => Ok(logits),
        }
    }
}
