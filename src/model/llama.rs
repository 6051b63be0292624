//! The Llama family as HF `LlamaForCausalLM` stores and computes it: RMSNorm, RoPE (rotate-half
//! layout), grouped-query attention, SwiGLU MLP. Config flags select the relatives:
//! Mistral (plain Llama here: no sliding window needed for sizing), Qwen2 (`qkv_bias`),
//! Mixtral (`n_experts > 0`: a routed mixture of SwiGLU experts in place of the MLP).

use super::{attention, causal_mask, norm_internal_dtype, Linear, INIT_ONE, INIT_WEIGHT};
use crate::config::{Llama3RopeScaling, ModelConfig};
use candle_core::{DType, Device, Result, Tensor, D};
use candle_nn::VarBuilder;

/// `LlamaRMSNorm`: x / sqrt(mean(x²) + eps) · w, written with basic ops so that it has a backward.
#[derive(Debug, Clone)]
struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    fn load(vb: VarBuilder, dim: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: vb.get_with_hints(dim, "weight", INIT_ONE)?,
            eps,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dtype = x.dtype();
        let x = x.to_dtype(norm_internal_dtype(dtype))?;
        let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
        let x = x.broadcast_div(&(ms + self.eps)?.sqrt()?)?;
        x.to_dtype(dtype)?.broadcast_mul(&self.weight)
    }
}

/// Rotary position embedding tables for the first `t` positions, `[T, head_dim]` each in the
/// rotate-half layout (frequencies repeated: `cat(freqs, freqs)`), as HF's `LlamaRotaryEmbedding`.
/// Computed per forward from the config: they are not parameters, and a table for a model's full
/// block_size (131,072 for Llama 3.1) would be a large allocation nobody asked for.
#[derive(Debug, Clone)]
struct Rope {
    cos: Tensor,
    sin: Tensor,
}

impl Rope {
    fn new(cfg: &RopeParams, t: usize, dtype: DType, device: &Device) -> Result<Self> {
        let inv_freq = inv_freq(cfg);
        let half = inv_freq.len();
        // HF computes positions × inv_freq and the cos/sin in f32.
        let mut cos = Vec::with_capacity(t * 2 * half);
        let mut sin = Vec::with_capacity(t * 2 * half);
        for pos in 0..t {
            for _ in 0..2 {
                for &f in &inv_freq {
                    let angle = pos as f32 * f;
                    cos.push(angle.cos());
                    sin.push(angle.sin());
                }
            }
        }
        let cos = Tensor::from_vec(cos, (t, 2 * half), device)?.to_dtype(dtype)?;
        let sin = Tensor::from_vec(sin, (t, 2 * half), device)?.to_dtype(dtype)?;
        Ok(Self { cos, sin })
    }

    /// x: `[B, H, T, hd]` -> x·cos + rotate_half(x)·sin.
    fn apply(&self, x: &Tensor) -> Result<Tensor> {
        let hd = x.dim(D::Minus1)?;
        let half = hd / 2;
        let x1 = x.narrow(D::Minus1, 0, half)?;
        let x2 = x.narrow(D::Minus1, half, half)?;
        // rotate_half: [x1, x2] -> [-x2, x1]
        let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
        x.broadcast_mul(&self.cos)? + rotated.broadcast_mul(&self.sin)?
    }
}

/// What RoPE needs from the config, kept so that `forward` does not hold the whole config.
#[derive(Debug, Clone)]
struct RopeParams {
    head_dim: usize,
    theta: f64,
    scaling: Option<Llama3RopeScaling>,
}

/// Inverse frequencies θ^(-2i/hd), i < hd/2, in f32 as HF computes them, with Llama-3 scaling
/// (HF `_compute_llama3_parameters`) when configured.
fn inv_freq(cfg: &RopeParams) -> Vec<f32> {
    let hd = cfg.head_dim;
    let base: Vec<f32> = (0..hd / 2)
        .map(|i| (1.0 / cfg.theta.powf((2 * i) as f64 / hd as f64)) as f32)
        .collect();
    let Some(s) = cfg.scaling else {
        return base;
    };
    let old_ctx = s.original_max_position_embeddings as f64;
    let low_freq_wavelen = old_ctx / s.low_freq_factor;
    let high_freq_wavelen = old_ctx / s.high_freq_factor;
    base.into_iter()
        .map(|f| {
            let f = f as f64;
            let wavelen = 2.0 * std::f64::consts::PI / f;
            let scaled = if wavelen > low_freq_wavelen {
                f / s.factor
            } else {
                f
            };
            let medium = wavelen >= high_freq_wavelen && wavelen <= low_freq_wavelen;
            let out = if medium {
                let smooth = (old_ctx / wavelen - s.low_freq_factor)
                    / (s.high_freq_factor - s.low_freq_factor);
                (1.0 - smooth) * scaled / s.factor + smooth * scaled
            } else {
                scaled
            };
            out as f32
        })
        .collect()
}

#[derive(Debug, Clone)]
struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    n_head: usize,
    n_kv_head: usize,
    head_dim: usize,
}

impl Attention {
    fn load(vb: VarBuilder, cfg: &ModelConfig) -> Result<Self> {
        let d = cfg.n_embd;
        let qkv_bias = cfg.has_qkv_bias();
        Ok(Self {
            q_proj: Linear::load(vb.pp("q_proj"), d, cfg.q_dim(), qkv_bias)?,
            k_proj: Linear::load(vb.pp("k_proj"), d, cfg.kv_dim(), qkv_bias)?,
            v_proj: Linear::load(vb.pp("v_proj"), d, cfg.kv_dim(), qkv_bias)?,
            o_proj: Linear::load(vb.pp("o_proj"), cfg.q_dim(), d, cfg.bias)?,
            n_head: cfg.n_head,
            n_kv_head: cfg.n_kv_head,
            head_dim: cfg.head_dim,
        })
    }

    fn forward(&self, x: &Tensor, rope: &Rope, mask: &Tensor) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let hd = self.head_dim;
        let heads = |proj: &Linear, n: usize| -> Result<Tensor> {
            // [B, T, n·hd] -> [B, T, n, hd] -> [B, n, T, hd]
            proj.forward(x)?
                .reshape((b, t, n, hd))?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = rope.apply(&heads(&self.q_proj, self.n_head)?)?;
        let k = rope.apply(&heads(&self.k_proj, self.n_kv_head)?)?;
        let v = heads(&self.v_proj, self.n_kv_head)?;
        let k = self.repeat_kv(k)?;
        let v = self.repeat_kv(v)?;
        let y = attention(&q, &k, &v, mask)?;
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

/// SwiGLU: down(silu(gate(x)) · up(x)). Mixtral names the same three matrices w1, w3, w2.
#[derive(Debug, Clone)]
struct SwiGlu {
    gate: Linear,
    up: Linear,
    down: Linear,
}

impl SwiGlu {
    fn load(vb: VarBuilder, cfg: &ModelConfig, names: [&str; 3], bias: bool) -> Result<Self> {
        let (d, ff) = (cfg.n_embd, cfg.intermediate_size);
        let [gate, up, down] = names;
        Ok(Self {
            gate: Linear::load(vb.pp(gate), d, ff, bias)?,
            up: Linear::load(vb.pp(up), d, ff, bias)?,
            down: Linear::load(vb.pp(down), ff, d, bias)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = (self.gate.forward(x)?.silu()? * self.up.forward(x)?)?;
        self.down.forward(&h)
    }
}

/// Mixtral's sparse MoE block (HF `MixtralSparseMoeBlock`): softmax over all experts' router
/// logits (f32), keep the top k, renormalise them, and sum the chosen experts' outputs weighted
/// by those probabilities. Each expert runs only on the tokens routed to it.
#[derive(Debug, Clone)]
struct SparseMoe {
    gate: Linear,
    experts: Vec<SwiGlu>,
    top_k: usize,
}

impl SparseMoe {
    fn load(vb: VarBuilder, cfg: &ModelConfig) -> Result<Self> {
        let gate = Linear::load(vb.pp("gate"), cfg.n_embd, cfg.n_experts, false)?;
        let experts = (0..cfg.n_experts)
            .map(|e| {
                SwiGlu::load(
                    vb.pp(format!("experts.{e}")),
                    cfg,
                    ["w1", "w3", "w2"],
                    false,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            gate,
            experts,
            top_k: cfg.n_experts_per_tok,
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
        // [N, E], zero off the top k, rows summing to 1
        let weights = kept
            .broadcast_div(&kept.sum_keepdim(D::Minus1)?)?
            .to_dtype(x.dtype())?;
        let mut out = x.zeros_like()?;
        for (e, expert) in self.experts.iter().enumerate() {
            if tokens_of[e].is_empty() {
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
    Mlp(SwiGlu),
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

#[derive(Debug, Clone)]
struct Layer {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    post_attention_layernorm: RmsNorm,
    ffn: FeedForward,
}

impl Layer {
    fn load(vb: VarBuilder, cfg: &ModelConfig) -> Result<Self> {
        let d = cfg.n_embd;
        let ffn = if cfg.is_moe() {
            FeedForward::Moe(SparseMoe::load(vb.pp("block_sparse_moe"), cfg)?)
        } else {
            FeedForward::Mlp(SwiGlu::load(
                vb.pp("mlp"),
                cfg,
                ["gate_proj", "up_proj", "down_proj"],
                cfg.mlp_bias,
            )?)
        };
        Ok(Self {
            input_layernorm: RmsNorm::load(vb.pp("input_layernorm"), d, cfg.norm_eps)?,
            self_attn: Attention::load(vb.pp("self_attn"), cfg)?,
            post_attention_layernorm: RmsNorm::load(
                vb.pp("post_attention_layernorm"),
                d,
                cfg.norm_eps,
            )?,
            ffn,
        })
    }

    fn forward(&self, x: &Tensor, rope: &Rope, mask: &Tensor) -> Result<Tensor> {
        let x = (x + self
            .self_attn
            .forward(&self.input_layernorm.forward(x)?, rope, mask)?)?;
        &x + self
            .ffn
            .forward(&self.post_attention_layernorm.forward(&x)?)?
    }
}

/// Llama-family causal LM; field names follow the checkpoint keys.
#[derive(Debug, Clone)]
pub struct Llama {
    embed_tokens: Tensor,
    layers: Vec<Layer>,
    norm: RmsNorm,
    /// `Some` only when the head is untied (`lm_head.weight`, `[vocab, d]`).
    lm_head: Option<Tensor>,
    rope: RopeParams,
}

impl Llama {
    pub fn load(vb: VarBuilder, cfg: &ModelConfig) -> Result<Self> {
        let m = vb.pp("model");
        let d = cfg.n_embd;
        let embed_tokens =
            m.get_with_hints((cfg.vocab_size, d), "embed_tokens.weight", INIT_WEIGHT)?;
        let layers = (0..cfg.n_layer)
            .map(|i| Layer::load(m.pp(format!("layers.{i}")), cfg))
            .collect::<Result<Vec<_>>>()?;
        let norm = RmsNorm::load(m.pp("norm"), d, cfg.norm_eps)?;
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
            rope: RopeParams {
                head_dim: cfg.head_dim,
                theta: cfg.rope_theta,
                scaling: cfg.rope_scaling,
            },
        })
    }

    /// u32 ids `[B, T]` -> logits `[B, T, V]`.
    pub fn forward(&self, input_ids: &Tensor) -> Result<Tensor> {
        let (b, t) = input_ids.dims2()?;
        let (_, d) = self.embed_tokens.dims2()?;
        // [B·T] -> [B·T, d] -> [B, T, d]
        let mut x = self
            .embed_tokens
            .index_select(&input_ids.flatten_all()?, 0)?
            .reshape((b, t, d))?;
        let rope = Rope::new(&self.rope, t, x.dtype(), x.device())?;
        let mask = causal_mask(t, x.dtype(), x.device())?;
        for layer in &self.layers {
            x = layer.forward(&x, &rope, &mask)?;
        }
        let x = self.norm.forward(&x)?;
        let head = self.lm_head.as_ref().unwrap_or(&self.embed_tokens);
        let (vocab, _) = head.dims2()?;
        // [B·T, d] @ [d, V] -> [B, T, V]
        x.reshape((b * t, d))?
            .matmul(&head.t()?)?
            .reshape((b, t, vocab))
    }
}
