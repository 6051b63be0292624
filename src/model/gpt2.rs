//! GPT-2 (Radford et al. 2019), as HF `GPT2LMHeadModel` stores it and nanoGPT's `model.py`
//! computes it: learned positions, pre-LayerNorm blocks, fused qkv, GELU (tanh) MLP, tied head.
//!
//! HF keeps GPT-2's TensorFlow heritage: its `Conv1D` stores weights `[in, out]`, so y = x·W + b
//! with no transpose. `cfg.bias == false` is nanoGPT's bias-free variant: no bias in any Linear
//! or LayerNorm.

use super::{
    attention, causal_mask, norm_internal_dtype, INIT_ONE, INIT_STD, INIT_WEIGHT, INIT_ZERO,
};
use crate::config::ModelConfig;
use candle_core::{Result, Tensor, D};
use candle_nn::{Init, VarBuilder};

/// HF `Conv1D`: weight `[in, out]`, y = x·W + b.
#[derive(Debug, Clone)]
struct Conv1D {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Conv1D {
    fn load(vb: VarBuilder, in_dim: usize, out_dim: usize, bias: bool, init: Init) -> Result<Self> {
        let weight = vb.get_with_hints((in_dim, out_dim), "weight", init)?;
        let bias = if bias {
            Some(vb.get_with_hints(out_dim, "bias", INIT_ZERO)?)
        } else {
            None
        };
        Ok(Self { weight, bias })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, t, in_dim) = x.dims3()?;
        let (_, out_dim) = self.weight.dims2()?;
        // [B, T, in] -> [B·T, in] @ [in, out] -> [B, T, out]
        let y = x.reshape((b * t, in_dim))?.matmul(&self.weight)?;
        let y = match &self.bias {
            Some(bias) => y.broadcast_add(bias)?,
            None => y,
        };
        y.reshape((b, t, out_dim))
    }
}

/// `torch.nn.LayerNorm` (bias optional), written with basic ops so that it has a backward.
#[derive(Debug, Clone)]
struct LayerNorm {
    weight: Tensor,
    bias: Option<Tensor>,
    eps: f64,
}

impl LayerNorm {
    fn load(vb: VarBuilder, dim: usize, bias: bool, eps: f64) -> Result<Self> {
        let weight = vb.get_with_hints(dim, "weight", INIT_ONE)?;
        let bias = if bias {
            Some(vb.get_with_hints(dim, "bias", INIT_ZERO)?)
        } else {
            None
        };
        Ok(Self { weight, bias, eps })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dtype = x.dtype();
        let x = x.to_dtype(norm_internal_dtype(dtype))?;
        let mean = x.mean_keepdim(D::Minus1)?;
        let x = x.broadcast_sub(&mean)?;
        let var = x.sqr()?.mean_keepdim(D::Minus1)?;
        let x = x.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        let x = x.to_dtype(dtype)?.broadcast_mul(&self.weight)?;
        match &self.bias {
            Some(b) => x.broadcast_add(b),
            None => Ok(x),
        }
    }
}

#[derive(Debug, Clone)]
struct Attention {
    c_attn: Conv1D,
    c_proj: Conv1D,
    n_head: usize,
}

impl Attention {
    fn load(vb: VarBuilder, cfg: &ModelConfig) -> Result<Self> {
        let d = cfg.n_embd;
        Ok(Self {
            c_attn: Conv1D::load(vb.pp("c_attn"), d, 3 * d, cfg.bias, INIT_WEIGHT)?,
            c_proj: Conv1D::load(vb.pp("c_proj"), d, d, cfg.bias, residual_init(cfg))?,
            n_head: cfg.n_head,
        })
    }

    fn forward(&self, x: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let (b, t, d) = x.dims3()?;
        let hd = d / self.n_head;
        // [B, T, 3d]: q, k, v side by side
        let qkv = self.c_attn.forward(x)?;
        let heads = |i: usize| -> Result<Tensor> {
            // [B, T, d] -> [B, T, H, hd] -> [B, H, T, hd]
            qkv.narrow(D::Minus1, i * d, d)?
                .reshape((b, t, self.n_head, hd))?
                .transpose(1, 2)?
                .contiguous()
        };
        let y = attention(&heads(0)?, &heads(1)?, &heads(2)?, mask)?;
        // [B, H, T, hd] -> [B, T, H, hd] -> [B, T, d]
        let y = y.transpose(1, 2)?.reshape((b, t, d))?;
        self.c_proj.forward(&y)
    }
}

#[derive(Debug, Clone)]
struct Mlp {
    c_fc: Conv1D,
    c_proj: Conv1D,
}

impl Mlp {
    fn load(vb: VarBuilder, cfg: &ModelConfig) -> Result<Self> {
        let (d, ff) = (cfg.n_embd, cfg.intermediate_size);
        Ok(Self {
            c_fc: Conv1D::load(vb.pp("c_fc"), d, ff, cfg.bias, INIT_WEIGHT)?,
            c_proj: Conv1D::load(vb.pp("c_proj"), ff, d, cfg.bias, residual_init(cfg))?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        // `Tensor::gelu` is the tanh approximation, i.e. HF's `gelu_new`.
        self.c_proj.forward(&self.c_fc.forward(x)?.gelu()?)
    }
}

/// nanoGPT and HF GPT-2 scale the init of the projections into the residual stream by
/// 1/sqrt(2·n_layer) (GPT-2 paper, section 2.3).
fn residual_init(cfg: &ModelConfig) -> Init {
    Init::Randn {
        mean: 0.0,
        stdev: INIT_STD / (2.0 * cfg.n_layer as f64).sqrt(),
    }
}

#[derive(Debug, Clone)]
struct Block {
    ln_1: LayerNorm,
    attn: Attention,
    ln_2: LayerNorm,
    mlp: Mlp,
}

impl Block {
    fn load(vb: VarBuilder, cfg: &ModelConfig) -> Result<Self> {
        let d = cfg.n_embd;
        Ok(Self {
            ln_1: LayerNorm::load(vb.pp("ln_1"), d, cfg.bias, cfg.norm_eps)?,
            attn: Attention::load(vb.pp("attn"), cfg)?,
            ln_2: LayerNorm::load(vb.pp("ln_2"), d, cfg.bias, cfg.norm_eps)?,
            mlp: Mlp::load(vb.pp("mlp"), cfg)?,
        })
    }

    fn forward(&self, x: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let x = (x + self.attn.forward(&self.ln_1.forward(x)?, mask)?)?;
        &x + self.mlp.forward(&self.ln_2.forward(&x)?)?
    }
}

/// GPT-2 language model; field names follow the checkpoint keys.
#[derive(Debug, Clone)]
pub struct Gpt2 {
    wte: Tensor,
    wpe: Tensor,
    h: Vec<Block>,
    ln_f: LayerNorm,
    /// `Some` only when the head is untied (`lm_head.weight`, `[vocab, d]`).
    lm_head: Option<Tensor>,
}

impl Gpt2 {
    pub fn load(vb: VarBuilder, cfg: &ModelConfig) -> Result<Self> {
        let t = vb.pp("transformer");
        let d = cfg.n_embd;
        let wte = t.get_with_hints((cfg.vocab_size, d), "wte.weight", INIT_WEIGHT)?;
        let wpe = t.get_with_hints((cfg.block_size, d), "wpe.weight", INIT_WEIGHT)?;
        let h = (0..cfg.n_layer)
            .map(|i| Block::load(t.pp(format!("h.{i}")), cfg))
            .collect::<Result<Vec<_>>>()?;
        let ln_f = LayerNorm::load(t.pp("ln_f"), d, cfg.bias, cfg.norm_eps)?;
        let lm_head = if cfg.tie_embeddings {
            None
        } else {
            Some(vb.get_with_hints((cfg.vocab_size, d), "lm_head.weight", INIT_WEIGHT)?)
        };
        Ok(Self {
            wte,
            wpe,
            h,
            ln_f,
            lm_head,
        })
    }

    /// u32 ids `[B, T]` -> logits `[B, T, V]`.
    pub fn forward(&self, input_ids: &Tensor) -> Result<Tensor> {
        let (b, t) = input_ids.dims2()?;
        let (block_size, d) = self.wpe.dims2()?;
        if t > block_size {
            candle_core::bail!("sequence of {t} tokens exceeds block_size = {block_size}");
        }
        // [B·T] -> [B·T, d] -> [B, T, d]
        let tok = self
            .wte
            .index_select(&input_ids.flatten_all()?, 0)?
            .reshape((b, t, d))?;
        // [T, d], broadcast over the batch
        let pos = self.wpe.narrow(0, 0, t)?;
        let mut x = tok.broadcast_add(&pos)?;
        let mask = causal_mask(t, x.dtype(), x.device())?;
        for block in &self.h {
            x = block.forward(&x, &mask)?;
        }
        let x = self.ln_f.forward(&x)?;
        let head = self.lm_head.as_ref().unwrap_or(&self.wte);
        let (vocab, _) = head.dims2()?;
        // [B·T, d] @ [d, V] -> [B, T, V]
        x.reshape((b * t, d))?
            .matmul(&head.t()?)?
            .reshape((b, t, vocab))
    }
}
