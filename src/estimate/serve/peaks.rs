//! Prefill and decode peaks of truesize's inference engine (`src/infer`), predicted from the
//! config: the forward's op sequence replayed on sizes, every buffer it allocates counted while
//! it is alive, in the order `infer::model` allocates and frees them.
//!
//! The level under every peak is the weights (exact storage, plus per-tensor bookkeeping) and
//! the KV cache (exact). On top of it a forward over a chunk of `T` tokens of `B` sequences
//! holds the residual stream `[B·T, d]`, the projections of the layer it is in, the attention
//! scores `[B, H, T, S]` against the `S` cached positions (the largest transient in a long
//! prefill), the MLP's hidden activations, and the logits of the last position (all positions
//! only when asked). Masks and RoPE tables live for the whole chunk.
//!
//! candle-specific terms, each measured with the counting allocator on candle 0.11.1 / gemm 0.19
//! (x86-64 with AVX-512, 2 threads):
//! - every candle matmul allocates gemm workspace for its duration: 8,849 B measured for every
//!   shape tried; a weight with an output width that is not a multiple of 16 (up to 256), or a
//!   `[out, in]` view (a tied head), is first copied whole into a packing buffer;
//! - bf16 matmuls widen both operands and the product to f32 (`cpu_backend::matmul`);
//! - quantized matmuls quantize their input into a per-thread scratch that grows to the largest
//!   input seen and is kept (`k_quants::matmul`), unless candle's x86 repacked kernel takes the
//!   shape (Q4_K, Q8_0 and, for more than one row, Q6_K, with an output width that is a multiple
//!   of 16 and an input width that is a multiple of 256): that kernel keeps a second, repacked
//!   copy of the weight from its first use on (Q8_0 the same size, Q4_K 4/3, Q6_K 32/21), and
//!   quantizes its input into a transient `[rows, in/256]` of 292-byte blocks;
//! - each new tensor carries about 272 B of header (shape, strides, `Arc`s).

use super::formats::{GgmlType, WeightFormat};
use super::weights::WeightsEstimate;
use crate::config::{Arch, ModelConfig};
use crate::dtype::TrainDtype;
use serde::Serialize;
use std::collections::BTreeSet;

/// Header bytes of a freshly allocated tensor (`Arc<Tensor_>`, shape and stride vectors, the
/// storage `Arc`): 272 B measured for a rank-2 matmul output.
pub const TENSOR_HEADER_BYTES: u64 = 272;
/// gemm's per-call workspace (dyn-stack buffer and rayon job state): 8,849 B measured for
/// every product shape tried with 2 threads.
pub const GEMM_CALL_BYTES: u64 = 8_849;
/// gemm packs the whole weight when its output width is at most this and not a multiple of
/// its 16-wide register tile (measured: width 101, 177, 200 are packed, 384 and 1001 are not).
pub const GEMM_PACK_MAX_WIDTH: u64 = 256;
/// gemm's depth block (`kc`): at least 512 (gemm-common `kernel_params`).
pub const GEMM_KC: u64 = 512;
/// Output widths gemm's kernels tile by.
pub const GEMM_TILE: u64 = 16;
/// candle's `BlockQ8K` (f32 scale, 256 i8, 16 i16 sums) used for the repacked kernels' input.
pub const Q8K_BLOCK_BYTES: u64 = 292;
/// Per-tensor bookkeeping of a loaded weight beyond its data (tensor and storage headers,
/// `Arc`s, the network's `Vec` slots): measured 226–280 B per tensor over the fixtures and
/// baby-gpt in f32, bf16, Q8_0, Q4_0 and Q4_K_M (quantized tensors carry no strides); the
/// middle of that range.
pub const WEIGHT_BOOKKEEPING_BYTES: u64 = 264;

/// What the CPU lets candle's quantized kernels do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum RepackLevel {
    /// No repacked kernels (not x86-64, or no AVX2+FMA).
    None,
    /// AVX2 only: Q4_K and Q6_K repack, Q8_0 does not (its kernel needs VNNI).
    Avx2,
    /// AVX-VNNI or AVX-512 VNNI: Q4_K, Q6_K and Q8_0 repack.
    Vnni,
}

impl RepackLevel {
    /// The level of this machine, detected as candle detects it (`repack_x86::level`).
    pub fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            let force_avx2 = std::env::var("MISTRALRS_FORCE_AVX2").as_deref() == Ok("1");
            let force_vnni = std::env::var("MISTRALRS_FORCE_AVXVNNI").as_deref() == Ok("1");
            if !force_avx2
                && !force_vnni
                && std::is_x86_feature_detected!("avx512f")
                && std::is_x86_feature_detected!("avx512vnni")
            {
                return RepackLevel::Vnni;
            }
            if !force_avx2
                && (force_vnni || std::is_x86_feature_detected!("avxvnni"))
                && std::is_x86_feature_detected!("avx2")
            {
                return RepackLevel::Vnni;
            }
            if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                return RepackLevel::Avx2;
            }
        }
        RepackLevel::None
    }
}

/// How one weight is multiplied.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Mat {
    /// Float `[in, out]` of element `bytes` (widened per product if not the activation dtype).
    Dense {
        bytes: u64,
    },
    /// Float `[out, in]` shared with the embedding (tied head).
    Rows {
        bytes: u64,
    },
    Quant(GgmlType),
}

/// The inputs of a prediction.
#[derive(Debug, Clone)]
pub struct Scenario<'a> {
    pub cfg: &'a ModelConfig,
    pub weights: &'a WeightsEstimate,
    pub act: TrainDtype,
    pub kv: TrainDtype,
    pub batch: usize,
    pub prompt: usize,
    pub generate: usize,
    /// Prefill chunk (tokens per forward); `prompt` for one chunk.
    pub chunk: usize,
    /// Whether the prefill returns the logits of every position.
    pub all_logits: bool,
    pub repack: RepackLevel,
    /// Whether the engine runs on candle's CPU backend (gemm workspace, bf16 widening,
    /// quantized-input scratch); a GPU keeps none of these.
    pub cpu: bool,
    /// A GGUF file whose tied head is stored as its own tensor.
    pub head_stored: bool,
    /// Attention as a fused kernel (flash attention: no scores in memory), as GPU servers run
    /// it; truesize's own engine materialises the scores (false).
    pub fused_attention: bool,
}

/// What the engine is predicted to hold, in bytes above the baseline before loading.
#[derive(Debug, Clone, Serialize)]
pub struct PeakPrediction {
    /// Exact storage of the weights.
    pub weights_bytes: u64,
    /// Storage + per-tensor bookkeeping: what loading leaves allocated.
    pub loaded_bytes: u64,
    pub weight_tensors: u64,
    /// Exact K and V storage.
    pub kv_cache_bytes: u64,
    /// Highest point of the prefill (all chunks).
    pub prefill_peak_bytes: u64,
    /// After the prefill: weights + cache + kept scratch/repacked weights.
    pub after_prefill_bytes: u64,
    /// Highest point of any decode step.
    pub decode_peak_bytes: u64,
    /// Each decode step's peak (the first token comes from the prefill).
    pub decode_step_peaks: Vec<u64>,
    /// The quantized-input scratch and repacked weights kept after the prefill.
    pub kept_by_kernels_bytes: u64,
    /// The prefill's largest transient above weights + cache.
    pub prefill_workspace_bytes: u64,
    pub decode_workspace_bytes: u64,
}

/// A live-bytes counter with a high-water mark.
#[derive(Debug, Default)]
struct Tally {
    cur: u64,
    peak: u64,
}

impl Tally {
    fn alloc(&mut self, bytes: u64) -> u64 {
        let b = bytes + TENSOR_HEADER_BYTES;
        self.cur += b;
        self.peak = self.peak.max(self.cur);
        b
    }
    fn raw(&mut self, b: u64) -> u64 {
        self.cur += b;
        self.peak = self.peak.max(self.cur);
        b
    }
    fn free(&mut self, b: u64) {
        self.cur -= b;
    }
    fn transient(&mut self, b: u64) {
        self.raw(b);
        self.free(b);
    }
}

/// State the kernels keep between forwards.
#[derive(Debug, Default, Clone)]
struct Kept {
    scratch: u64,
    repacked: BTreeSet<String>,
    repacked_bytes: u64,
}

struct Engine<'a> {
    s: &'a Scenario<'a>,
    a: u64,
    kvb: u64,
    kept: Kept,
}

impl Engine<'_> {
    fn mat(&self, hf: &str) -> Mat {
        let ty = self
            .s
            .weights
            .type_of(hf)
            .copied()
            .unwrap_or(super::formats::F32);
        if !ty.is_float() {
            Mat::Quant(ty)
        } else {
            Mat::Dense {
                bytes: ty.block_bytes,
            }
        }
    }

    /// y[m, n] = x[m, k]·Wᵀ; allocates the output (kept, returned) and the product's transients.
    fn matmul(&mut self, t: &mut Tally, name: &str, mat: Mat, m: u64, k: u64, n: u64) -> u64 {
        if !self.s.cpu {
            return t.alloc(m * n * self.a);
        }
        match mat {
            Mat::Dense { bytes } | Mat::Rows { bytes } => {
                let widened = if bytes != self.a {
                    // f16 weights, f32 activations: the weight widened for this product.
                    t.alloc(k * n * self.a)
                } else {
                    0
                };
                let rows_view = matches!(mat, Mat::Rows { .. });
                let pack = if n <= GEMM_PACK_MAX_WIDTH
                    && (rows_view || !n.is_multiple_of(GEMM_TILE))
                    && m >= 2
                {
                    k.min(GEMM_KC) * n.next_multiple_of(GEMM_TILE) * 4
                } else {
                    0
                };
                let out = if self.a == 2 && self.s.act == TrainDtype::Bf16 {
                    // bf16: both operands and the product widened to f32, then narrowed.
                    let w = t.raw(m * k * 4 + k * n * 4 + m * n * 4);
                    let o = t.alloc(m * n * self.a);
                    t.free(w);
                    o
                } else {
                    t.transient(GEMM_CALL_BYTES.max(pack));
                    t.alloc(m * n * self.a)
                };
                t.free(widened);
                out
            }
            Mat::Quant(ty) => {
                let rows = m;
                let repacks = self.repacks(&ty, rows, k, n);
                if repacks {
                    if self.kept.repacked.insert(name.to_string()) {
                        let b = repacked_bytes(&ty, k * n);
                        t.raw(b);
                        self.kept.repacked_bytes += b;
                    }
                    let out = t.raw(m * n * 4 + 256);
                    t.transient(rows * (k / 256) * Q8K_BLOCK_BYTES);
                    out
                } else {
                    let need = scratch_bytes(&ty, rows, k);
                    if need > self.kept.scratch {
                        t.raw(need - self.kept.scratch);
                        self.kept.scratch = need;
                    }
                    t.raw(m * n * 4 + 256)
                }
            }
        }
    }

    fn gemm_call(&self, t: &mut Tally) {
        if self.s.cpu {
            t.transient(GEMM_CALL_BYTES);
        }
    }

    /// candle's `repack_x86::select`.
    fn repacks(&self, ty: &GgmlType, m: u64, k: u64, n: u64) -> bool {
        if self.s.repack == RepackLevel::None
            || k == 0
            || !n.is_multiple_of(16)
            || !k.is_multiple_of(256)
        {
            return false;
        }
        match ty.name {
            "Q4_K" => true,
            "Q6_K" => m > 1,
            "Q8_0" => self.s.repack == RepackLevel::Vnni,
            _ => false,
        }
    }

    /// A linear layer with optional bias: returns the live output.
    #[allow(clippy::too_many_arguments)]
    fn linear(&mut self, t: &mut Tally, name: &str, m: u64, k: u64, n: u64, bias: bool) -> u64 {
        let w = format!("{name}.weight");
        let mat = self.mat(&w);
        let y = self.matmul(t, &w, mat, m, k, n);
        if bias {
            let yb = t.alloc(m * n * self.a);
            t.free(y);
            yb
        } else {
            y
        }
    }

    /// One forward over `tt` tokens at `start`. Returns the peak of the forward above the level
    /// at entry and the bytes the kernels kept (already added to the tally's level).
    fn forward(&mut self, t: &mut Tally, tt: u64, start: u64, all_logits: bool) {
        let s = self.s;
        let cfg = s.cfg;
        let a = self.a;
        let b = s.batch as u64;
        let bt = b * tt;
        let d = cfg.n_embd as u64;
        let ids = t.alloc(4 * bt);
        // Embedding lookup.
        let embed_name = match cfg.arch {
            Arch::Gpt2 => "transformer.wte.weight",
            Arch::Llama => "model.embed_tokens.weight",
        };
        let mut x = match self.mat(embed_name) {
            Mat::Quant(_) => {
                t.transient(4 * bt + 64);
                t.alloc(bt * d * 4)
            }
            Mat::Dense { bytes } | Mat::Rows { bytes } => {
                let e = t.alloc(bt * d * bytes);
                if bytes != a {
                    let x = t.alloc(bt * d * a);
                    t.free(e);
                    x
                } else {
                    e
                }
            }
        };
        if cfg.arch == Arch::Gpt2 {
            let nx = t.alloc(bt * d * a);
            t.free(x);
            x = nx;
        }
        let hd = cfg.head_dim as u64;
        let mut chunk_bufs = Vec::new();
        if cfg.arch == Arch::Llama {
            let half = hd / 2;
            let f = t.alloc(tt * half * 4) + t.alloc(tt * half * 4);
            if a != 4 {
                chunk_bufs.push(t.alloc(tt * half * a) + t.alloc(tt * half * a));
                t.free(f);
            } else {
                chunk_bufs.push(f);
            }
        }
        let mut masks: Vec<(Option<usize>, u64)> = Vec::new();
        for layer in 0..cfg.n_layer {
            let h = t.alloc(bt * d * a);
            let o = self.attention(t, layer, h, tt, start, &mut masks);
            let nx = t.alloc(bt * d * a);
            t.free(x);
            t.free(o);
            x = nx;
            let h = t.alloc(bt * d * a);
            let m = self.mlp(t, layer, h, bt);
            let nx = t.alloc(bt * d * a);
            t.free(x);
            t.free(m);
            x = nx;
        }
        for (_, m) in masks {
            t.free(m);
        }
        for c in chunk_bufs {
            t.free(c);
        }
        let v = cfg.vocab_size as u64;
        let head_name = if cfg.tie_embeddings && !s.head_stored {
            embed_name
        } else {
            "lm_head.weight"
        };
        let head_mat = match self.mat(head_name) {
            Mat::Dense { bytes } if head_name == embed_name => Mat::Rows { bytes },
            m => m,
        };
        let rows = if all_logits { bt } else { b };
        let logits = if all_logits {
            let n = t.alloc(bt * d * a);
            t.free(x);
            let l = self.matmul(t, head_name, head_mat, rows, d, v);
            t.free(n);
            l
        } else {
            let last = t.alloc(b * d * a);
            t.free(x);
            let n = t.alloc(b * d * a);
            t.free(last);
            let l = self.matmul(t, head_name, head_mat, rows, d, v);
            t.free(n);
            l
        };
        let logits = if a != 4 {
            let l = t.alloc(rows * v * 4);
            t.free(logits);
            l
        } else {
            logits
        };
        // The caller copies the logits to the host for the argmax (and the check).
        t.transient(rows * v * 4);
        t.free(logits);
        t.free(ids);
    }

    fn attention(
        &mut self,
        t: &mut Tally,
        layer: usize,
        h: u64,
        tt: u64,
        start: u64,
        masks: &mut Vec<(Option<usize>, u64)>,
    ) -> u64 {
        let s = self.s;
        let cfg = s.cfg;
        let a = self.a;
        let b = s.batch as u64;
        let bt = b * tt;
        let d = cfg.n_embd as u64;
        let (nh, nkv, hd) = (cfg.n_head as u64, cfg.n_kv_head as u64, cfg.head_dim as u64);
        let (qd, kd) = (nh * hd, nkv * hd);
        let (q, k, v) = match cfg.arch {
            Arch::Llama => {
                let p = format!("model.layers.{layer}.self_attn");
                let bias = cfg.has_qkv_bias();
                let ql = self.linear(t, &format!("{p}.q_proj"), bt, d, qd, bias);
                let kl = self.linear(t, &format!("{p}.k_proj"), bt, d, kd, bias);
                let vl = self.linear(t, &format!("{p}.v_proj"), bt, d, kd, bias);
                t.free(h);
                let q = t.alloc(bt * qd * a);
                t.free(ql);
                let k = t.alloc(bt * kd * a);
                t.free(kl);
                let v = t.alloc(bt * kd * a);
                t.free(vl);
                (q, k, v)
            }
            Arch::Gpt2 => {
                let p = format!("transformer.h.{layer}.attn.c_attn");
                let qkv = self.linear(t, &p, bt, d, qd + 2 * kd, cfg.bias);
                t.free(h);
                // A narrowed column block is copied by reshape, then by contiguous.
                let mut heads = |n: u64| {
                    let r = t.alloc(bt * n * a);
                    let c = t.alloc(bt * n * a);
                    t.free(r);
                    c
                };
                let (q, k, v) = (heads(qd), heads(kd), heads(kd));
                t.free(qkv);
                (q, k, v)
            }
        };
        let (q, k) = if cfg.arch == Arch::Llama {
            let qr = t.alloc(bt * qd * a);
            let kr = t.alloc(bt * kd * a);
            t.free(q);
            t.free(k);
            (qr, kr)
        } else {
            (q, k)
        };
        let qs = t.alloc(bt * qd * a);
        t.free(q);
        let q = qs;
        let kvb = self.kvb;
        let (k, v) = if kvb != a {
            let kc = t.alloc(bt * kd * kvb);
            t.free(k);
            let vc = t.alloc(bt * kd * kvb);
            t.free(v);
            (kc, vc)
        } else {
            (k, v)
        };
        // The cache: what attention reads, and what it allocates to read it.
        let ctx = (s.prompt + s.generate) as u64;
        let window = cfg.attention_window(layer).map(|w| w as u64);
        let cap = window.map_or(ctx, |w| w.min(ctx));
        let mut cat = 0;
        let (s_len, oldest, newest) = if start + tt <= cap {
            t.free(k);
            t.free(v);
            (start + tt, 0, start + tt - 1)
        } else if tt == 1 {
            t.free(k);
            t.free(v);
            (cap, start + 1 - cap, start)
        } else {
            let valid = start.min(cap);
            if valid > 0 {
                cat = t.alloc(b * nkv * (valid + tt) * hd * kvb)
                    + t.alloc(b * nkv * (valid + tt) * hd * kvb);
            }
            let kept = tt.min(cap);
            if b * nkv > 1 {
                // The runs written back into the ring are copied out of the chunk first.
                t.transient(2 * (b * kept * kd * kvb + TENSOR_HEADER_BYTES));
            }
            t.free(k);
            t.free(v);
            (valid + tt, start - valid, start + tt - 1)
        };
        if s.fused_attention {
            // A fused kernel (flash attention) reads q and the cache in place and writes only
            // the output [B·T, H·hd]; the scores never exist in memory.
            let y = t.alloc(bt * qd * a);
            t.free(q);
            t.free(cat);
            let _ = (s_len, oldest, newest, masks);
            let o_name = match cfg.arch {
                Arch::Llama => format!("model.layers.{layer}.self_attn.o_proj"),
                Arch::Gpt2 => format!("transformer.h.{layer}.attn.c_proj"),
            };
            let o = self.linear(t, &o_name, bt, qd, d, cfg.bias);
            t.free(y);
            return o;
        }
        let rep = nh / nkv;
        let keys = if kvb != a {
            t.alloc(b * nkv * s_len * hd * a)
        } else {
            0
        };
        let scores = t.alloc(b * nkv * rep * tt * s_len * a);
        self.gemm_call(t);
        t.free(q);
        t.free(keys);
        // As the engine: a key after the first query, or one older than the last query's window.
        let needs_mask = newest > start || window.is_some_and(|w| start + tt - 1 - oldest >= w);
        let scores = if needs_mask {
            let win = cfg.attention_window(layer);
            if !masks.iter().any(|(w, _)| *w == win) {
                let m = t.alloc(tt * s_len * 4);
                let m = if a != 4 {
                    let ma = t.alloc(tt * s_len * a);
                    t.free(m);
                    ma
                } else {
                    m
                };
                masks.push((win, m));
            }
            let sm = t.alloc(b * nkv * rep * tt * s_len * a);
            t.free(scores);
            sm
        } else {
            scores
        };
        let probs = t.alloc(b * nkv * rep * tt * s_len * a);
        t.free(scores);
        let values = if kvb != a {
            t.alloc(b * nkv * s_len * hd * a)
        } else {
            0
        };
        let y = t.alloc(bt * qd * a);
        self.gemm_call(t);
        t.free(probs);
        t.free(values);
        t.free(cat);
        let yc = t.alloc(bt * qd * a);
        t.free(y);
        let o_name = match cfg.arch {
            Arch::Llama => format!("model.layers.{layer}.self_attn.o_proj"),
            Arch::Gpt2 => format!("transformer.h.{layer}.attn.c_proj"),
        };
        let o = self.linear(t, &o_name, bt, qd, d, cfg.bias);
        t.free(yc);
        o
    }

    fn swiglu(
        &mut self,
        t: &mut Tally,
        p: &str,
        names: [&str; 3],
        x: u64,
        n: u64,
        bias: bool,
    ) -> u64 {
        let cfg = self.s.cfg;
        let (d, ff) = (cfg.n_embd as u64, cfg.intermediate_size as u64);
        let a = self.a;
        let g = self.linear(t, &format!("{p}.{}", names[0]), n, d, ff, bias);
        let u = self.linear(t, &format!("{p}.{}", names[1]), n, d, ff, bias);
        t.free(x);
        let act = t.alloc(n * ff * a);
        t.free(g);
        let prod = t.alloc(n * ff * a);
        t.free(act);
        t.free(u);
        let y = self.linear(t, &format!("{p}.{}", names[2]), n, ff, d, bias);
        t.free(prod);
        y
    }

    fn mlp(&mut self, t: &mut Tally, layer: usize, h: u64, n: u64) -> u64 {
        let cfg = self.s.cfg;
        let a = self.a;
        let (d, ff) = (cfg.n_embd as u64, cfg.intermediate_size as u64);
        match cfg.arch {
            Arch::Gpt2 => {
                let p = format!("transformer.h.{layer}.mlp");
                let u = self.linear(t, &format!("{p}.c_fc"), n, d, ff, cfg.bias);
                t.free(h);
                let g = t.alloc(n * ff * a);
                t.free(u);
                let y = self.linear(t, &format!("{p}.c_proj"), n, ff, d, cfg.bias);
                t.free(g);
                y
            }
            Arch::Llama if cfg.is_moe() => {
                let p = format!("model.layers.{layer}.block_sparse_moe");
                let e = cfg.n_experts as u64;
                let logits = self.linear(t, &format!("{p}.gate"), n, d, e, false);
                let logits = if a != 4 {
                    let l = t.alloc(n * e * 4);
                    t.free(logits);
                    l
                } else {
                    logits
                };
                let probs = t.alloc(n * e * 4);
                t.free(logits);
                let host = t.raw(n * e * 4);
                t.free(probs);
                // Routing lists: token ids and weights per expert (capacity growth included).
                let lists = t.raw(8 * n * cfg.n_experts_per_tok as u64 * 2);
                t.free(host);
                let mut out = t.alloc(n * d * a);
                // The largest group an expert can get is every token: the bound a server
                // must reserve (the measured run's routing may give less).
                let ne = n;
                let idx = t.alloc(4 * ne);
                let xe = t.alloc(ne * d * a);
                let ye = self.swiglu(
                    t,
                    &format!("{p}.experts.0"),
                    ["w1", "w3", "w2"],
                    xe,
                    ne,
                    false,
                );
                let we = t.alloc(ne * 4);
                let we = if a != 4 {
                    let w2 = t.alloc(ne * a);
                    t.free(we);
                    w2
                } else {
                    we
                };
                let yw = t.alloc(ne * d * a);
                t.free(ye);
                t.free(we);
                let nout = t.alloc(n * d * a);
                t.free(out);
                out = nout;
                t.free(yw);
                t.free(idx);
                t.free(lists);
                t.free(h);
                let _ = ff;
                out
            }
            Arch::Llama => {
                let p = format!("model.layers.{layer}.mlp");
                self.swiglu(
                    t,
                    &p,
                    ["gate_proj", "up_proj", "down_proj"],
                    h,
                    n,
                    cfg.mlp_bias,
                )
            }
        }
    }
}

/// Bytes of candle's x86 repacked copy of a weight of `numel` elements.
fn repacked_bytes(ty: &GgmlType, numel: u64) -> u64 {
    let blocks = numel / ty.block;
    match ty.name {
        // TileQ4K: 8·16 f32 scales + 8·16 f32 mins + 2,048 nibble bytes per 16 super-blocks.
        "Q4_K" => blocks / 16 * 3072,
        // TileQ6K: 16·16 f32 scales + 4,096 bytes per 16 super-blocks.
        "Q6_K" => blocks / 16 * 5120,
        // TileQ8_0: 16 f16 scales + 512 bytes per 16 blocks.
        "Q8_0" => blocks / 16 * 544,
        _ => 0,
    }
}

/// Bytes of the quantized-input scratch a non-repacked quantized product of `m` rows needs:
/// its input in the weight type's dot-product blocks (Q8_0 for the legacy types, Q8_1 for
/// Q4_1/Q5_1, Q8_K for the k-quants), rounded up to 8 bytes.
fn scratch_bytes(ty: &GgmlType, m: u64, k: u64) -> u64 {
    let (block, bytes) = match ty.name {
        "Q4_1" | "Q5_1" => (32, 36),
        "Q2_K" | "Q3_K" | "Q4_K" | "Q5_K" | "Q6_K" | "Q8_K" => (256, Q8K_BLOCK_BYTES),
        _ => (32, 34),
    };
    (m * k.div_ceil(block) * bytes).next_multiple_of(8)
}

/// Predict every phase of a generation run.
pub fn predict(s: &Scenario) -> PeakPrediction {
    let a = s.act.bytes();
    let kvb = s.kv.bytes();
    let weight_tensors = s
        .weights
        .tensors
        .iter()
        .map(|t| t.hf_names.len() as u64)
        .sum::<u64>()
        + layer_norm_shifts(s.cfg);
    let weights_bytes = s.weights.bytes + shift_bytes(s.cfg, a);
    let loaded = weights_bytes + weight_tensors * WEIGHT_BOOKKEEPING_BYTES;
    let ctx = (s.prompt + s.generate) as u64;
    let kv_cache_bytes = super::kv::exact_bytes(s.cfg, s.batch as u64, ctx, kvb);
    let cache_headers = 2 * s.cfg.n_layer as u64 * TENSOR_HEADER_BYTES;
    let mut e = Engine {
        s,
        a,
        kvb,
        kept: Kept::default(),
    };
    let base = loaded + kv_cache_bytes + cache_headers;
    let mut t = Tally {
        cur: base,
        peak: base,
    };
    // Prefill: chunk by chunk. Chunks between the first and the last full one have the same
    // shape and fewer cached positions than the last, so they cannot peak higher.
    let p = s.prompt as u64;
    let c = (s.chunk as u64).clamp(1, p.max(1));
    let n_full = p / c;
    let rem = p % c;
    let mut starts: Vec<(u64, u64)> = Vec::new();
    if n_full > 0 {
        starts.push((0, c));
        if n_full > 1 {
            starts.push(((n_full - 1) * c, c));
        }
    }
    if rem > 0 {
        starts.push((n_full * c, rem));
    }
    let mut prefill_peak = base;
    for &(start, tt) in &starts {
        t.peak = t.cur;
        e.forward(&mut t, tt, start, s.all_logits);
        prefill_peak = prefill_peak.max(t.peak);
    }
    let after_prefill = t.cur;
    let mut steps = Vec::with_capacity(s.generate.saturating_sub(1));
    for step in 1..s.generate as u64 {
        t.peak = t.cur;
        e.forward(&mut t, 1, p + step - 1, false);
        steps.push(t.peak);
    }
    let decode_peak = steps.iter().copied().max().unwrap_or(after_prefill);
    PeakPrediction {
        weights_bytes,
        loaded_bytes: loaded,
        weight_tensors,
        kv_cache_bytes,
        prefill_peak_bytes: prefill_peak,
        after_prefill_bytes: after_prefill,
        decode_peak_bytes: decode_peak,
        decode_step_peaks: steps,
        kept_by_kernels_bytes: e.kept.scratch + e.kept.repacked_bytes,
        prefill_workspace_bytes: prefill_peak - base,
        decode_workspace_bytes: decode_peak.saturating_sub(after_prefill),
    }
}

/// Bias-free LayerNorms (nanoGPT's GPT-2 variant) get a zero shift from the engine.
fn layer_norm_shifts(cfg: &ModelConfig) -> u64 {
    if cfg.arch == Arch::Gpt2 && !cfg.bias {
        2 * cfg.n_layer as u64 + 1
    } else {
        0
    }
}

fn shift_bytes(cfg: &ModelConfig, a: u64) -> u64 {
    layer_norm_shifts(cfg) * cfg.n_embd as u64 * a
}

/// The workspace a GPU server needs on top of weights and KV cache: the larger of one prefill
/// chunk of `chunk` tokens of one sequence against `context` cached positions (servers prefill
/// a request a chunk at a time while the others decode: vLLM's chunked prefill, llama.cpp's
/// ubatch) and one decode step of all `batch` sequences at `context`. Attention is fused (no
/// scores in memory) and the CPU backend's scratch is absent. One chunk and one step are
/// replayed.
pub fn workspace_bytes(
    cfg: &ModelConfig,
    weights: &WeightsEstimate,
    format: WeightFormat,
    kv: TrainDtype,
    batch: usize,
    context: usize,
    chunk: usize,
) -> u64 {
    let s = Scenario {
        cfg,
        weights,
        act: format.activation_dtype(),
        kv,
        batch,
        prompt: context,
        generate: 1,
        chunk: chunk.min(context).max(1),
        all_logits: false,
        // A GPU has no repacked CPU kernels.
        repack: RepackLevel::None,
        cpu: false,
        head_stored: false,
        fused_attention: true,
    };
    let a = s.act.bytes();
    let mut e = Engine {
        s: &s,
        a,
        kvb: kv.bytes(),
        kept: Kept::default(),
    };
    let mut t = Tally::default();
    let c = s.chunk as u64;
    let start = context as u64 - c;
    let one = Scenario {
        batch: 1,
        ..s.clone()
    };
    let mut pe = Engine {
        s: &one,
        a,
        kvb: kv.bytes(),
        kept: Kept::default(),
    };
    pe.forward(&mut t, c, start, false);
    let prefill = t.peak;
    let mut t2 = Tally::default();
    e.forward(&mut t2, 1, context.saturating_sub(1) as u64, false);
    prefill.max(t2.peak)
}
