//! The forward of the genuine networks (`crate::model`), op for op, on shape-level tensors:
//! GPT-2 and the Llama skeleton, the next-token loss.

use super::tensor::{contiguous_stride, ctx, numel, Block, Dt, Storage, Un, T, TI};
use crate::config::ModelConfig;
use std::collections::HashMap;
use std::rc::Rc;

pub(super) fn tag(t: &'static str) {
    ctx().mem.tag.set(t);
}

pub(super) fn var(dims: &[usize], dt: Dt) -> T {
    // Weights are counted once, as the VarMap holds them (VARMAP_BYTES_PER_TENSOR), not here.
    let c = ctx();
    let id = c.next_id.get();
    c.next_id.set(id + 1);
    let storage = Rc::new(Storage {
        numel: numel(dims),
        _block: Block {
            mem: c.mem.clone(),
            bytes: 0,
            tag: "weights",
        },
    });
    T(Rc::new(TI {
        id,
        dims: dims.to_vec(),
        stride: contiguous_stride(dims),
        dt,
        storage,
        op: None,
        var: true,
        _hdr: None,
    }))
}

/// The parameters, one `Var` per tensor of the family's list (`crate::family::tensors`), looked
/// up by HF name as the network's `VarBuilder` would.
pub(super) struct Weights {
    pub(super) by_name: HashMap<String, T>,
    pub(super) all: Vec<T>,
}

impl Weights {
    pub(super) fn of(cfg: &ModelConfig, dt: Dt) -> Weights {
        let mut w = Weights {
            by_name: HashMap::new(),
            all: Vec::new(),
        };
        for t in crate::family::tensors(cfg) {
            let v = var(&t.shape, dt);
            w.all.push(v.clone());
            w.by_name.insert(t.name, v);
        }
        w
    }

    /// A tensor the list may not hold (a bias, an untied head).
    pub(super) fn opt(&self, name: &str) -> Option<T> {
        self.by_name.get(name).cloned()
    }

    /// A tensor the list holds for every config of this family.
    pub(super) fn get(&self, name: &str) -> T {
        // Cannot fail: the names below are the family's own (tests/activations.rs replays every
        // family against the allocator); no user input chooses them.
        self.opt(name)
            .unwrap_or_else(|| panic!("{name} is not in the family's tensor list"))
    }
}

/// GPT-2's Conv1D: x[B,T,in] → reshape → matmul W[in,out] (+ b) → reshape.
pub(super) fn conv1d(x: &T, w: &T, b: Option<&T>) -> T {
    let d = x.dims().to_vec();
    let (bb, t, i) = (d[0], d[1], d[2]);
    let out = w.dims()[1];
    let y = x.reshape(&[bb * t, i]).matmul(w);
    let y = match b {
        Some(b) => y.bcast(b, 0),
        None => y,
    };
    y.reshape(&[bb, t, out])
}

/// Llama's Linear: x[.., in] → reshape [N, in] → matmul Wᵀ (+ b) → reshape.
pub(super) fn linear(x: &T, w: &T, b: Option<&T>) -> T {
    let mut dims = x.dims().to_vec();
    let i = dims.pop().unwrap_or(1);
    let out = w.dims()[0];
    let n = dims.iter().product::<usize>();
    let y = x.reshape(&[n, i]).matmul(&w.t());
    let y = match b {
        Some(b) => y.bcast(b, 0),
        None => y,
    };
    dims.push(out);
    y.reshape(&dims)
}

pub(super) fn norm_dt(dt: Dt) -> Dt {
    match dt {
        Dt::F16 | Dt::Bf16 => Dt::F32,
        d => d,
    }
}

pub(super) fn layer_norm(x: &T, w: &T, b: Option<&T>) -> T {
    let dt = x.dt();
    let x = x.to_dtype(norm_dt(dt));
    let mean = x.mean_keepdim_last();
    let x = x.bcast(&mean, 1);
    let var = x.unary(Un::Sqr).mean_keepdim_last();
    let x = x.bcast(&var.affine(1.0).unary(Un::Sqrt), 3);
    let x = x.to_dtype(dt).bcast(w, 2);
    match b {
        Some(b) => x.bcast(b, 0),
        None => x,
    }
}

pub(super) fn rms_norm(x: &T, w: &T) -> T {
    let dt = x.dt();
    let x = x.to_dtype(norm_dt(dt));
    let ms = x.unary(Un::Sqr).mean_keepdim_last();
    let x = x.bcast(&ms.affine(1.0).unary(Un::Sqrt), 3);
    x.to_dtype(dt).bcast(w, 2)
}

/// A plain (untracked) tensor built from a host `Vec<f32>` (moved, not copied) and cast.
pub(super) fn host_f32(dims: &[usize], dt: Dt) -> T {
    T::zeros(dims, Dt::F32).to_dtype(dt)
}

pub(super) fn softmax_last(x: &T) -> T {
    let last = x.rank() - 1;
    let max = x.max_keepdim(last);
    let diff = x.bcast(&max, 1);
    let num = diff.unary(Un::Exp);
    let den = num.sum_keepdim(&[last]);
    num.bcast(&den, 3)
}

pub(super) fn attention(q: &T, k: &T, v: &T, mask: &T) -> T {
    tag("attention scores/softmax");
    let hd = q.dims()[3] as f64;
    let att = q.matmul(&k.t().contiguous()).affine(1.0 / hd.sqrt());
    let att = att.bcast(mask, 0);
    let att = softmax_last(&att);
    att.matmul(v)
}

pub(super) fn gpt2_forward(cfg: &ModelConfig, b: usize, t: usize, ids: &T, w: &Weights) -> T {
    let d = cfg.n_embd;
    let h = cfg.n_head;
    let hd = d / h;
    let wte = w.get("transformer.wte.weight");
    let wpe = w.get("transformer.wpe.weight");
    tag("embeddings");
    let tok = wte.index_select(&ids.flatten_all(), 0).reshape(&[b, t, d]);
    let pos = wpe.narrow(0, 0, t);
    let mut x = tok.bcast(&pos, 0);
    let mask = host_f32(&[t, t], wte.dt());
    for l in 0..cfg.n_layer {
        let p = |n: &str| format!("transformer.h.{l}.{n}");
        let get = |n: &str| w.get(&p(n));
        let opt = |n: &str| w.opt(&p(n));
        tag("norms");
        let y = layer_norm(&x, &get("ln_1.weight"), opt("ln_1.bias").as_ref());
        tag("attention projections");
        let qkv = conv1d(
            &y,
            &get("attn.c_attn.weight"),
            opt("attn.c_attn.bias").as_ref(),
        );
        let heads = |i: usize| {
            qkv.narrow(2, i * d, d)
                .reshape(&[b, t, h, hd])
                .transpose(1, 2)
                .contiguous()
        };
        let (q, k, v) = (heads(0), heads(1), heads(2));
        let y = attention(&q, &k, &v, &mask);
        tag("attention projections");
        let y = y.transpose(1, 2).reshape(&[b, t, d]);
        let y = conv1d(
            &y,
            &get("attn.c_proj.weight"),
            opt("attn.c_proj.bias").as_ref(),
        );
        tag("residual stream");
        x = x.add(&y);
        tag("norms");
        let y = layer_norm(&x, &get("ln_2.weight"), opt("ln_2.bias").as_ref());
        tag("mlp");
        let y = conv1d(&y, &get("mlp.c_fc.weight"), opt("mlp.c_fc.bias").as_ref()).unary(Un::Gelu);
        let y = conv1d(
            &y,
            &get("mlp.c_proj.weight"),
            opt("mlp.c_proj.bias").as_ref(),
        );
        tag("residual stream");
        x = x.add(&y);
    }
    tag("norms");
    let x = layer_norm(
        &x,
        &w.get("transformer.ln_f.weight"),
        w.opt("transformer.ln_f.bias").as_ref(),
    );
    tag("logits");
    let head = w.opt("lm_head.weight").unwrap_or(wte);
    x.reshape(&[b * t, d])
        .matmul(&head.t())
        .reshape(&[b, t, cfg.vocab_size])
}

/// (weight, bias) of one linear layer.
pub(super) type Lin = (T, Option<T>);

pub(super) fn swiglu(x: &T, e: &[Lin; 3]) -> T {
    let g = linear(x, &e[0].0, e[0].1.as_ref()).unary(Un::Silu);
    let h = g.mul(&linear(x, &e[1].0, e[1].1.as_ref()));
    linear(&h, &e[2].0, e[2].1.as_ref())
}

pub(super) fn rope_apply(x: &T, cos: &T, sin: &T) -> T {
    let hd = x.dims()[3];
    let half = hd / 2;
    let x1 = x.narrow(3, 0, half);
    let x2 = x.narrow(3, half, half);
    let rotated = T::cat(&[&x2.unary(Un::Neg), &x1], 3);
    x.bcast(cos, 2).add(&rotated.bcast(sin, 2))
}

pub(super) fn repeat_kv(x: T, rep: usize) -> T {
    if rep == 1 {
        return x;
    }
    let d = x.dims().to_vec();
    let (b, kv, t, hd) = (d[0], d[1], d[2], d[3]);
    x.unsqueeze(2)
        .broadcast_as(&[b, kv, rep, t, hd])
        .reshape(&[b, kv * rep, t, hd])
}

pub(super) fn moe(x: &T, router: &T, experts: &[[Lin; 3]], top_k: usize) -> T {
    let d3 = x.dims().to_vec();
    let (b, t, d) = (d3[0], d3[1], d3[2]);
    let n_exp = experts.len();
    let x = x.reshape(&[b * t, d]);
    let n = b * t;
    let probs = softmax_last(&linear(&x, router, None).to_dtype(Dt::F32));
    // host copies: probs.to_vec2 (N rows of E f32), the mask Vec, tokens_of
    let c = ctx();
    let _host = c.mem.alloc((n * n_exp * 4 + n * 24) as u64);
    let mask = T::zeros(&[n, n_exp], Dt::F32);
    let kept = probs.mul(&mask);
    let weights = kept.bcast(&kept.sum_keepdim(&[1]), 3).to_dtype(x.dt());
    let mut out = x.zeros_like();
    // Routing is data-dependent; with random weights the router is near-uniform, so each
    // expert gets N·k/E tokens (the total, which is what memory follows, is exact).
    let total = n * top_k.min(n_exp);
    for (e, expert) in experts.iter().enumerate() {
        let ne = total / n_exp + usize::from(e < total % n_exp);
        if ne == 0 {
            continue;
        }
        let idx = T::zeros(&[ne], Dt::U32);
        let xe = x.index_select(&idx, 0);
        let we = weights
            .narrow(1, e, 1)
            .squeeze(1)
            .contiguous()
            .index_select(&idx, 0)
            .unsqueeze(1);
        let ye = swiglu(&xe, expert).bcast(&we, 2);
        out = out.index_add(&idx, &ye, 0);
    }
    drop(_host);
    out.reshape(&[b, t, d])
}

pub(super) fn llama_forward(cfg: &ModelConfig, b: usize, t: usize, ids: &T, w: &Weights) -> T {
    let d = cfg.n_embd;
    let (h, kvh, hd) = (cfg.n_head, cfg.n_kv_head, cfg.head_dim);
    let embed = w.get("model.embed_tokens.weight");
    let dt = embed.dt();
    tag("embeddings");
    let mut x = embed
        .index_select(&ids.flatten_all(), 0)
        .reshape(&[b, t, d]);
    tag("attention projections");
    let cos = host_f32(&[t, hd], dt);
    let sin = host_f32(&[t, hd], dt);
    let mask = host_f32(&[t, t], dt);
    for l in 0..cfg.n_layer {
        let p = |n: &str| format!("model.layers.{l}.{n}");
        let lin = |n: &str| -> Lin {
            (
                w.get(&p(&format!("{n}.weight"))),
                w.opt(&p(&format!("{n}.bias"))),
            )
        };
        tag("norms");
        let y = rms_norm(&x, &w.get(&p("input_layernorm.weight")));
        tag("attention projections");
        let heads = |proj: &Lin, n: usize| {
            linear(&y, &proj.0, proj.1.as_ref())
                .reshape(&[b, t, n, hd])
                .transpose(1, 2)
                .contiguous()
        };
        let q = rope_apply(&heads(&lin("self_attn.q_proj"), h), &cos, &sin);
        let k = rope_apply(&heads(&lin("self_attn.k_proj"), kvh), &cos, &sin);
        let v = heads(&lin("self_attn.v_proj"), kvh);
        let rep = h / kvh.max(1);
        let k = repeat_kv(k, rep);
        let v = repeat_kv(v, rep);
        let a = attention(&q, &k, &v, &mask);
        tag("attention projections");
        let a = a.transpose(1, 2).reshape(&[b, t, h * hd]);
        let o = lin("self_attn.o_proj");
        let a = linear(&a, &o.0, o.1.as_ref());
        tag("residual stream");
        x = x.add(&a);
        tag("norms");
        let y = rms_norm(&x, &w.get(&p("post_attention_layernorm.weight")));
        tag("mlp");
        let y = if cfg.is_moe() {
            let experts: Vec<[Lin; 3]> = (0..cfg.n_experts)
                .map(|e| {
                    let x = format!("block_sparse_moe.experts.{e}");
                    [
                        lin(&format!("{x}.w1")),
                        lin(&format!("{x}.w3")),
                        lin(&format!("{x}.w2")),
                    ]
                })
                .collect();
            let router = w.get(&p("block_sparse_moe.gate.weight"));
            moe(&y, &router, &experts, cfg.n_experts_per_tok)
        } else {
            swiglu(
                &y,
                &[
                    lin("mlp.gate_proj"),
                    lin("mlp.up_proj"),
                    lin("mlp.down_proj"),
                ],
            )
        };
        tag("residual stream");
        x = x.add(&y);
    }
    tag("norms");
    let x = rms_norm(&x, &w.get("model.norm.weight"));
    tag("logits");
    let head = w.opt("lm_head.weight").unwrap_or(embed);
    x.reshape(&[b * t, d])
        .matmul(&head.t())
        .reshape(&[b, t, cfg.vocab_size])
}

/// `model::next_token_loss` + candle-nn `cross_entropy` (log_softmax, then nll via gather).
pub(super) fn next_token_loss(logits: &T, ids: &T) -> T {
    tag("loss (f32 log-softmax)");
    let d = logits.dims().to_vec();
    let (b, t, v) = (d[0], d[1], d[2]);
    let pred = logits
        .narrow(1, 0, t - 1)
        .to_dtype(Dt::F32)
        .reshape(&[b * (t - 1), v]);
    let target = ids.narrow(1, 1, t - 1).flatten_all();
    let max = pred.max_keepdim(1);
    let diff = pred.bcast(&max, 1);
    let sum_exp = diff.unary(Un::Exp).sum_keepdim(&[1]);
    let log_sm = diff.bcast(&sum_exp.unary(Un::Log), 1);
    let n = b * (t - 1);
    log_sm
        .gather(&target.unsqueeze(1))
        .sum_all()
        .affine(-1.0 / n as f64)
}
