//! The forward of the genuine networks (`crate::model`), op for op, on shape-level tensors:
//! GPT-2 and the Llama skeleton with every switch of its families (q/k norms, (1 + w) and
//! sandwich norms, GeGLU, √d scale, soft-caps, windows, RoPE per layer type, fused storage,
//! partial rotary, expert width and sparse layers), the next-token loss. A padding id in the
//! batch (the embedding's masked gradient) is data-dependent and not replayed.

use super::tensor::{contiguous_stride, ctx, numel, Block, Dt, Storage, Un, T, TI};
use crate::config::ModelConfig;
use std::collections::HashMap;
use std::rc::Rc;

pub(super) fn tag(t: &'static str) {
    ctx().mem.tag.set(t);
}

pub(super) fn var(dims: &[usize], dt: Dt) -> T {
    // Weights are counted once, as the VarMap holds them (`model::build::VARMAP_BYTES_PER_TENSOR`), not here.
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
        // Cannot fail: the names below are the family's own (tests/peak_prediction.rs replays every
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

/// `model::llama::RmsNorm`: Llama's (normalise in f32, cast back, × w) or Gemma's (normalise and
/// × (1 + w) in f32, then cast back).
pub(super) fn rms_norm_kind(x: &T, w: &T, one_plus: bool) -> T {
    if !one_plus {
        return rms_norm(x, w);
    }
    let dt = x.dt();
    let internal = norm_dt(dt);
    let x = x.to_dtype(internal);
    let ms = x.unary(Un::Sqr).mean_keepdim_last();
    let x = x.bcast(&ms.affine(1.0).unary(Un::Sqrt), 3);
    let w = w.to_dtype(internal).affine(1.0);
    x.bcast(&w, 2).to_dtype(dt)
}

/// `model::llama::GatedMlp`: gate and up (separate, or one fused tensor split by `narrow`),
/// act(gate) · up, down. `e`: [gate, up, down] or [gate_up, down, down] when `fused`.
pub(super) fn gated_mlp(x: &T, gate_up: &[Lin], down: &Lin, width: usize, gelu: bool) -> T {
    let (gate, up) = match gate_up {
        [fused] => {
            let gu = linear(x, &fused.0, fused.1.as_ref());
            let last = gu.rank() - 1;
            (gu.narrow(last, 0, width), gu.narrow(last, width, width))
        }
        [g, u, ..] => (linear(x, &g.0, g.1.as_ref()), linear(x, &u.0, u.1.as_ref())),
        [] => unreachable!("a gated MLP has gate and up"),
    };
    let act = gate.unary(if gelu { Un::Gelu } else { Un::Silu });
    let h = act.mul(&up);
    linear(&h, &down.0, down.1.as_ref())
}

/// `model::llama::Rope::apply`: the first `rotary` channels rotated, the rest passed on.
pub(super) fn rope_apply(x: &T, cos: &T, sin: &T) -> T {
    let hd = x.dims()[3];
    let rot = cos.dims()[1];
    let (x_rot, x_pass) = if rot == hd {
        (x.clone(), None)
    } else {
        (x.narrow(3, 0, rot), Some(x.narrow(3, rot, hd - rot)))
    };
    let half = rot / 2;
    let x1 = x_rot.narrow(3, 0, half);
    let x2 = x_rot.narrow(3, half, half);
    let rotated = T::cat(&[&x2.unary(Un::Neg), &x1], 3);
    let y = x_rot.bcast(cos, 2).add(&rotated.bcast(sin, 2));
    match x_pass {
        None => y,
        Some(p) => T::cat(&[&y, &p], 3),
    }
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

/// One expert's tensors: gate and up (or fused gate_up), down.
pub(super) struct ExpertW {
    gate_up: Vec<Lin>,
    down: Lin,
}

pub(super) fn moe(x: &T, router: &T, experts: &[ExpertW], cfg: &ModelConfig, gelu: bool) -> T {
    let top_k = cfg.n_experts_per_tok;
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
    let weights = if cfg.moe_renormalize {
        kept.bcast(&kept.sum_keepdim(&[1]), 3)
    } else {
        kept
    }
    .to_dtype(x.dt());
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
        let ye = gated_mlp(
            &xe,
            &expert.gate_up,
            &expert.down,
            cfg.moe_intermediate_size,
            gelu,
        )
        .bcast(&we, 2);
        out = out.index_add(&idx, &ye, 0);
    }
    drop(_host);
    out.reshape(&[b, t, d])
}

/// c·tanh(x / c).
fn softcap(x: &T, c: f64) -> T {
    x.affine(1.0 / c).unary(Un::Tanh).affine(c)
}

pub(super) fn llama_forward(cfg: &ModelConfig, b: usize, t: usize, ids: &T, w: &Weights) -> T {
    use crate::config::{
        Attention, EmbeddingScale, ExpertNames, MlpKind, NormKind, NormPlacement, Storage,
    };
    let d = cfg.n_embd;
    let (h, kvh, hd) = (cfg.n_head, cfg.n_kv_head, cfg.head_dim);
    let one_plus = cfg.norm == NormKind::RmsOnePlus;
    let gelu = cfg.mlp == MlpKind::GeGlu;
    let embed = w.get("model.embed_tokens.weight");
    let dt = embed.dt();
    tag("embeddings");
    // A padding row in the batch adds a where_cond over [B·T, d] (data-dependent, not replayed).
    let mut x = embed
        .index_select(&ids.flatten_all(), 0)
        .reshape(&[b, t, d]);
    if cfg.embedding_scale == EmbeddingScale::SqrtHidden {
        x = x.bcast(&host_f32(&[], dt), 2);
    }
    tag("attention projections");
    let rot = cfg.rotary_dim;
    let cos = host_f32(&[t, rot], dt);
    let sin = host_f32(&[t, rot], dt);
    let kinds: Vec<Attention> = (0..cfg.n_layer).map(|i| cfg.attention(i)).collect();
    let any_local = kinds.iter().any(|a| matches!(a, Attention::Sliding { .. }));
    // The network builds local tables only when they differ from the global ones.
    let local_differs = cfg.rope_per_layer_type
        && (cfg.rope_local_theta != cfg.rope_theta || cfg.rope_scaling.is_some());
    let local =
        (any_local && local_differs).then(|| (host_f32(&[t, rot], dt), host_f32(&[t, rot], dt)));
    let mut masks: Vec<(Attention, T)> = Vec::new();
    for &k in &kinds {
        if !masks.iter().any(|(m, _)| *m == k) {
            masks.push((k, host_f32(&[t, t], dt)));
        }
    }
    let scale = 1.0 / cfg.attn_scalar.sqrt();
    for (l, kind) in kinds.iter().enumerate() {
        let p = |n: &str| format!("model.layers.{l}.{n}");
        let lin = |n: &str| -> Lin {
            (
                w.get(&p(&format!("{n}.weight"))),
                w.opt(&p(&format!("{n}.bias"))),
            )
        };
        let norm = |x: &T, n: &str| rms_norm_kind(x, &w.get(&p(&format!("{n}.weight"))), one_plus);
        let (cos, sin) = match (kind, &local) {
            (Attention::Sliding { .. }, Some((c, s))) => (c, s),
            _ => (&cos, &sin),
        };
        let mask = masks
            .iter()
            .find(|(m, _)| m == kind)
            .map(|(_, t)| t)
            .unwrap_or_else(|| unreachable!("a mask per attention kind was built above"));
        tag("norms");
        let y = norm(&x, "input_layernorm");
        tag("attention projections");
        let (q, k, v) = match cfg.qkv_storage {
            Storage::Separate => (
                linear(
                    &y,
                    &lin("self_attn.q_proj").0,
                    lin("self_attn.q_proj").1.as_ref(),
                ),
                linear(
                    &y,
                    &lin("self_attn.k_proj").0,
                    lin("self_attn.k_proj").1.as_ref(),
                ),
                linear(
                    &y,
                    &lin("self_attn.v_proj").0,
                    lin("self_attn.v_proj").1.as_ref(),
                ),
            ),
            Storage::Fused => {
                let f = lin("self_attn.qkv_proj");
                let qkv = linear(&y, &f.0, f.1.as_ref());
                let (qd, kvd) = (h * hd, kvh * hd);
                (
                    qkv.narrow(2, 0, qd),
                    qkv.narrow(2, qd, kvd),
                    qkv.narrow(2, qd + kvd, kvd),
                )
            }
        };
        let heads = |y: T, n: usize, nm: Option<&str>| {
            let y = y.reshape(&[b, t, n, hd]);
            let y = match nm {
                Some(nm) => norm(&y, nm),
                None => y,
            };
            y.transpose(1, 2).contiguous()
        };
        let (qn, kn) = if cfg.qk_norm {
            (Some("self_attn.q_norm"), Some("self_attn.k_norm"))
        } else {
            (None, None)
        };
        let q = rope_apply(&heads(q, h, qn), cos, sin);
        let k = rope_apply(&heads(k, kvh, kn), cos, sin);
        let v = heads(v, kvh, None);
        let rep = h / kvh.max(1);
        let k = repeat_kv(k, rep);
        let v = repeat_kv(v, rep);
        tag("attention scores/softmax");
        let att = q.matmul(&k.t().contiguous()).affine(scale);
        let att = match cfg.attn_softcap {
            Some(c) => softcap(&att, c),
            None => att,
        };
        let a = softmax_last(&att.bcast(mask, 0)).matmul(&v);
        tag("attention projections");
        let a = a.transpose(1, 2).reshape(&[b, t, h * hd]);
        let o = lin("self_attn.o_proj");
        let a = linear(&a, &o.0, o.1.as_ref());
        let sandwich = cfg.norm_placement == NormPlacement::Sandwich;
        tag("residual stream");
        x = if sandwich {
            tag("norms");
            let a = norm(&a, "post_attention_layernorm");
            tag("residual stream");
            x.add(&a)
        } else {
            x.add(&a)
        };
        tag("norms");
        let y = norm(
            &x,
            if sandwich {
                "pre_feedforward_layernorm"
            } else {
                "post_attention_layernorm"
            },
        );
        tag("mlp");
        let gate_up = |prefix: &str, names: [&str; 2]| -> Vec<Lin> {
            match cfg.gate_up_storage {
                Storage::Fused => vec![lin(&format!("{prefix}.gate_up_proj"))],
                Storage::Separate => names
                    .iter()
                    .map(|n| lin(&format!("{prefix}.{n}")))
                    .collect(),
            }
        };
        let y = if cfg.layer_is_moe(l) {
            let (block, names) = match cfg.expert_names {
                ExpertNames::Mixtral => ("block_sparse_moe", ["w1", "w3", "w2"]),
                ExpertNames::Qwen => ("mlp", ["gate_proj", "up_proj", "down_proj"]),
            };
            let experts: Vec<ExpertW> = (0..cfg.n_experts)
                .map(|e| {
                    let x = format!("{block}.experts.{e}");
                    ExpertW {
                        gate_up: gate_up(&x, [names[0], names[1]]),
                        down: lin(&format!("{x}.{}", names[2])),
                    }
                })
                .collect();
            let router = w.get(&p(&format!("{block}.gate.weight")));
            moe(&y, &router, &experts, cfg, gelu)
        } else {
            gated_mlp(
                &y,
                &gate_up("mlp", ["gate_proj", "up_proj"]),
                &lin("mlp.down_proj"),
                cfg.intermediate_size,
                gelu,
            )
        };
        x = if sandwich {
            tag("norms");
            let y = norm(&y, "post_feedforward_layernorm");
            tag("residual stream");
            x.add(&y)
        } else {
            tag("residual stream");
            x.add(&y)
        };
    }
    tag("norms");
    let x = rms_norm_kind(&x, &w.get("model.norm.weight"), one_plus);
    tag("logits");
    let head = w.opt("lm_head.weight").unwrap_or(embed);
    let logits = x
        .reshape(&[b * t, d])
        .matmul(&head.t())
        .reshape(&[b, t, cfg.vocab_size]);
    match cfg.final_softcap {
        Some(c) => softcap(&logits, c),
        None => logits,
    }
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
