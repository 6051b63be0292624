//! Each tensor of the family's list → how tensor parallelism splits it (under an engine's rules)
//! and which pipeline stages hold it.
//!
//! A split tensor is cut along one dimension into segments (a fused `c_attn` is q | k | v, a
//! fused `gate_up_proj` is gate | up); each segment is split on its own, as Megatron splits each
//! of q, k and v across ranks, so rank r's slice is one piece per segment.

use super::engine::Engine;
use crate::config::{Arch, ModelConfig};
use crate::error::{Error, Result};
use crate::family::{Component, Kind, ParamTensor};
use serde::Serialize;

/// How tensor parallelism treats a tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Split {
    /// Output features split (q, k, v, gate, up, GPT-2 `c_fc`): each rank computes its columns.
    ColumnParallel,
    /// Input features split (o, down, GPT-2 `c_proj`): partial sums all-reduced.
    RowParallel,
    /// Vocabulary rows split (token embedding, head), padded as the engine pads.
    VocabParallel,
    /// A whole copy on every rank (norms, router, positions, row-parallel biases; candle's
    /// embedding and head).
    Replicated,
    /// Fewer kv heads than ranks: each rank holds one whole kv head, shared by `tp / n_kv_head`
    /// ranks.
    KvReplicated,
}

/// One segment of the split dimension and the rule that cuts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(tag = "rule", rename_all = "snake_case")]
pub enum Segment {
    /// Not split: every rank holds all `len`.
    Whole { len: usize },
    /// `len` divided exactly by TP (the engine refused otherwise).
    Even { len: usize },
    /// `len` real rows padded with zero rows to `padded`, then divided exactly (Megatron's
    /// vocabulary).
    Padded { len: usize, padded: usize },
    /// `torch.chunk`: chunks of ceil(len / tp); the last ranks get less or nothing.
    Chunk { len: usize },
    /// `heads` kv heads of `head_dim` for `tp` > heads ranks: rank r holds head r / (tp / heads).
    KvReplicated { heads: usize, head_dim: usize },
}

/// Rank r's part of one segment, along the split dimension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Piece {
    /// First row of the real tensor taken (in the full tensor's coordinates).
    pub src_start: usize,
    /// Real rows taken.
    pub real: usize,
    /// Rows the rank allocates (real + zero padding).
    pub alloc: usize,
}

impl Segment {
    /// Rows of the full tensor this segment spans.
    pub fn rows(&self) -> usize {
        match *self {
            Segment::Whole { len }
            | Segment::Even { len }
            | Segment::Padded { len, .. }
            | Segment::Chunk { len } => len,
            Segment::KvReplicated { heads, head_dim } => heads * head_dim,
        }
    }

    /// Rank `r` of `tp`'s piece; `offset` is where the segment starts in the tensor.
    pub fn piece(&self, offset: usize, r: usize, tp: usize) -> Piece {
        match *self {
            Segment::Whole { len } => Piece {
                src_start: offset,
                real: len,
                alloc: len,
            },
            Segment::Even { len } => {
                let c = len / tp;
                Piece {
                    src_start: offset + r * c,
                    real: c,
                    alloc: c,
                }
            }
            Segment::Padded { len, padded } => {
                let c = padded / tp;
                let start = (r * c).min(len);
                Piece {
                    src_start: offset + start,
                    real: (len - start).min(c),
                    alloc: c,
                }
            }
            Segment::Chunk { len } => {
                let c = len.div_ceil(tp);
                let start = (r * c).min(len);
                let real = (len - start).min(c);
                Piece {
                    src_start: offset + start,
                    real,
                    alloc: real,
                }
            }
            Segment::KvReplicated { heads, head_dim } => {
                let head = r / (tp / heads);
                Piece {
                    src_start: offset + head * head_dim,
                    real: head_dim,
                    alloc: head_dim,
                }
            }
        }
    }
}

/// One tensor of the plan.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TensorShard {
    /// HF checkpoint key (a tied embedding's second copy keeps the embedding's name).
    pub name: String,
    pub shape: Vec<usize>,
    pub component: Component,
    pub layer: Option<usize>,
    pub split: Split,
    /// The dimension cut (None: replicated).
    pub dim: Option<usize>,
    pub segments: Vec<Segment>,
    /// Pipeline stages that hold a copy (a tied embedding: the first and the last).
    pub stages: Vec<usize>,
}

impl TensorShard {
    /// Rank r's pieces along `dim`, one per segment.
    pub fn pieces(&self, r: usize, tp: usize) -> Vec<Piece> {
        let mut offset = 0;
        self.segments
            .iter()
            .map(|s| {
                let p = s.piece(offset, r, tp);
                offset += s.rows();
                p
            })
            .collect()
    }

    /// Product of the dimensions other than the split one.
    fn rest(&self) -> u64 {
        let dim = self.dim.unwrap_or(0);
        self.shape
            .iter()
            .enumerate()
            .filter(|&(i, _)| i != dim)
            .map(|(_, &d)| d as u64)
            .product()
    }

    /// Elements rank r allocates (padding rows included) and the real ones among them.
    pub fn local_numel(&self, r: usize, tp: usize) -> (u64, u64) {
        let rest = self.rest();
        self.pieces(r, tp).iter().fold((0, 0), |(a, b), p| {
            (a + p.alloc as u64 * rest, b + p.real as u64 * rest)
        })
    }

    /// The rank's shape (padding rows included).
    pub fn local_shape(&self, r: usize, tp: usize) -> Vec<usize> {
        let mut s = self.shape.clone();
        if let Some(d) = self.dim {
            s[d] = self.pieces(r, tp).iter().map(|p| p.alloc).sum();
        }
        s
    }
}

/// What a tensor is, for the split rules.
enum Role {
    /// Query heads (and a fused projection's q part).
    Heads,
    /// Key/value heads.
    KvHeads,
    /// A plain width: the MLP's inner width.
    Width,
    Vocab,
}

/// `len` under the engine's rule for `role` on `tp` ranks; `what` names the tensor in errors.
fn segment(
    engine: Engine,
    role: Role,
    len: usize,
    cfg: &ModelConfig,
    tp: usize,
    what: &str,
) -> Result<Segment> {
    if tp == 1 {
        return Ok(Segment::Whole { len });
    }
    let refuse = |field: &str, value: usize, why: String| {
        Err(Error::field(
            "command line",
            "--tp",
            tp,
            format!("{field} = {value} {why}"),
        ))
    };
    match role {
        Role::Vocab => match engine {
            Engine::Candle => Ok(Segment::Whole { len }),
            Engine::Fsdp2 => Ok(Segment::Chunk { len }),
            Engine::Megatron | Engine::Deepspeed => {
                let m = super::engine::MEGATRON_VOCAB_DIVISIBLE_BY * tp;
                Ok(Segment::Padded {
                    len,
                    padded: len.div_ceil(m) * m,
                })
            }
        },
        Role::Heads => {
            if cfg.n_head.is_multiple_of(tp) {
                Ok(Segment::Even { len })
            } else {
                refuse(
                    "n_head",
                    cfg.n_head,
                    format!(
                        "is not divisible by it: {} splits attention by whole heads ({what})",
                        engine.name()
                    ),
                )
            }
        }
        Role::KvHeads => {
            let kv = cfg.n_kv_head;
            if kv.is_multiple_of(tp) {
                return Ok(Segment::Even { len });
            }
            match engine {
                Engine::Fsdp2 | Engine::Deepspeed if tp.is_multiple_of(kv) => {
                    Ok(Segment::KvReplicated {
                        heads: kv,
                        head_dim: cfg.head_dim,
                    })
                }
                Engine::Candle => refuse(
                    "n_kv_head",
                    kv,
                    format!(
                        "is not divisible by it: candle's ShardedSafeTensors would cut {what} into \
                         {tp} row blocks of {} rows, splitting kv heads of {} rows; refused \
                         (use --tp dividing {kv}, or --engine deepspeed/fsdp2, which replicate kv heads)",
                        len / tp.max(1),
                        cfg.head_dim
                    ),
                ),
                Engine::Megatron => refuse(
                    "n_kv_head",
                    kv,
                    format!(
                        "is not divisible by it: Megatron divides the query groups by TP \
                         (num_query_groups % tensor_model_parallel_size must be 0) ({what})"
                    ),
                ),
                _ => refuse(
                    "n_kv_head",
                    kv,
                    format!("neither divides nor is divided by it ({what})"),
                ),
            }
        }
        Role::Width => match engine {
            Engine::Fsdp2 => Ok(Segment::Chunk { len }),
            _ if len.is_multiple_of(tp) => Ok(Segment::Even { len }),
            _ => Err(Error::field(
                "command line",
                "--tp",
                tp,
                format!(
                    "does not divide {what}'s width {len}: {} needs an exact division",
                    engine.name()
                ),
            )),
        },
    }
}

/// The segments of the attention projections' output side: q | k | v as the tensor stores them.
fn qkv_segments(
    engine: Engine,
    cfg: &ModelConfig,
    tp: usize,
    what: &str,
    fused: bool,
    name: &str,
) -> Result<Vec<Segment>> {
    let (q, kv) = (cfg.q_dim(), cfg.kv_dim());
    if fused {
        return Ok(vec![
            segment(engine, Role::Heads, q, cfg, tp, what)?,
            segment(engine, Role::KvHeads, kv, cfg, tp, what)?,
            segment(engine, Role::KvHeads, kv, cfg, tp, what)?,
        ]);
    }
    if name.contains("q_proj") {
        Ok(vec![segment(engine, Role::Heads, q, cfg, tp, what)?])
    } else {
        Ok(vec![segment(engine, Role::KvHeads, kv, cfg, tp, what)?])
    }
}

/// The name without its `.weight` / `.bias` suffix.
fn stem(name: &str) -> &str {
    name.strip_suffix(".weight")
        .or_else(|| name.strip_suffix(".bias"))
        .unwrap_or(name)
}

/// How `t` splits under `engine` at TP = `tp`; `stages` are the stages that hold it.
pub fn shard_tensor(
    engine: Engine,
    cfg: &ModelConfig,
    t: &ParamTensor,
    tp: usize,
    stages: Vec<usize>,
) -> Result<TensorShard> {
    // GPT-2's Conv1D stores [in, out]; nn.Linear stores [out, in].
    let conv1d = cfg.arch == Arch::Gpt2;
    let (out_dim, in_dim) = if conv1d { (1, 0) } else { (0, 1) };
    let is_bias = t.kind == Kind::Bias;
    let s = stem(&t.name);
    let what = t.name.as_str();
    let whole = |t: &ParamTensor| {
        vec![Segment::Whole {
            len: t.shape.first().copied().unwrap_or(1),
        }]
    };
    let mut dim = None;
    let mut split = Split::Replicated;
    let mut segments = whole(t);
    let attention_in = s.ends_with("q_proj")
        || s.ends_with("k_proj")
        || s.ends_with("v_proj")
        || s.ends_with("qkv_proj")
        || s.ends_with("attn.c_attn");
    let attention_out = s.ends_with("o_proj") || s.ends_with("attn.c_proj");
    let mlp = matches!(t.component, Component::Mlp | Component::Experts);
    let mlp_out =
        mlp && (s.ends_with("down_proj") || s.ends_with("w2") || s.ends_with("mlp.c_proj"));
    let mlp_in = mlp && !mlp_out;
    match t.component {
        Component::EmbedTokens | Component::LmHead => {
            let v = t.shape[0];
            let seg = segment(engine, Role::Vocab, v, cfg, tp, what)?;
            if !matches!(seg, Segment::Whole { .. }) {
                split = Split::VocabParallel;
                dim = Some(0);
            }
            segments = vec![seg];
        }
        _ if t.kind == Kind::Norm || t.component == Component::Router => {}
        Component::EmbedPositions | Component::FinalNorm | Component::Norms => {}
        _ if attention_in && tp > 1 => {
            let fused = conv1d || s.ends_with("qkv_proj");
            let d = if is_bias { 0 } else { out_dim };
            segments = if conv1d {
                // GPT-2 has no GQA: q, k, v are n_head heads each.
                let h = segment(engine, Role::Heads, cfg.n_embd, cfg, tp, what)?;
                vec![h, h, h]
            } else {
                qkv_segments(engine, cfg, tp, what, fused, s)?
            };
            dim = Some(d);
            split = if segments
                .iter()
                .any(|g| matches!(g, Segment::KvReplicated { .. }))
            {
                Split::KvReplicated
            } else {
                Split::ColumnParallel
            };
        }
        _ if attention_out && tp > 1 && !is_bias => {
            let len = t.shape[in_dim];
            segments = vec![segment(engine, Role::Heads, len, cfg, tp, what)?];
            dim = Some(in_dim);
            split = Split::RowParallel;
        }
        _ if mlp_in && tp > 1 => {
            let d = if is_bias { 0 } else { out_dim };
            let len = t.shape[d];
            // A fused gate | up splits each half on its own.
            segments = if s.ends_with("gate_up_proj") {
                let half = segment(engine, Role::Width, len / 2, cfg, tp, what)?;
                vec![half, half]
            } else {
                vec![segment(engine, Role::Width, len, cfg, tp, what)?]
            };
            dim = Some(d);
            split = Split::ColumnParallel;
        }
        _ if mlp_out && tp > 1 && !is_bias => {
            let len = t.shape[in_dim];
            segments = vec![segment(engine, Role::Width, len, cfg, tp, what)?];
            dim = Some(in_dim);
            split = Split::RowParallel;
        }
        _ => {}
    }
    if dim.is_none() {
        segments = whole(t);
    }
    Ok(TensorShard {
        name: t.name.clone(),
        shape: t.shape.clone(),
        component: t.component,
        layer: t.layer,
        split,
        dim,
        segments,
        stages,
    })
}
