//! The lean step's memory in closed form: what each block keeps (one named term per saved
//! tensor), what the head and the loss keep, and the transient buffers of the backward, walked
//! in the order the step allocates and frees them (`gpt2.rs`, `llama.rs`, `step.rs`).
//!
//! All bytes are above the pre-build baseline, as the measurement reports them. N = batch·seq
//! rows, e = the dtype's element size; statistics (mean, rstd, log-sum-exp) are f32.
//!
//! Blocks differ only in their feed-forward (dense, or a mixture of experts where a config mixes
//! the two), so each kind is walked once and the step adds them up layer by layer: the forward's
//! level rises by each block's saved set, the backward's falls by it and rises by its gradients;
//! the step's peak is inside one of the blocks (with most saved tensors still alive, or most
//! gradients already allocated), or at the loss, the head or the embedding.

use super::{Attention, Checkpoint, LeanOptions, Optimizer, SavedSet};
use crate::config::{Arch, GeluForm, ModelConfig, NormKind, NormPlacement, Step, Storage};
use crate::model::build::VARMAP_BYTES_PER_TENSOR;
use serde::Serialize;

/// Bytes of one freshly allocated candle tensor beyond its data: the `Arc<Tensor_>` (160 B with
/// a rank-2 shape and stride, 2·16 B) and the `Arc<RwLock<Storage>>` (72 B), as measured for
/// the autograd replay (`model::autograd_replay::tensor`).
pub const TENSOR_OVERHEAD_BYTES: u64 = 160 + 2 * 16 + 72;
/// Bytes the lean model holds per parameter tensor beside the VarMap: a detached tensor header
/// sharing the storage, its name in the parameter map and in the layer that uses it.
pub const LEAN_BYTES_PER_TENSOR: u64 = 192 + 2 * 48 + 64;
/// f32 statistics.
const STAT: u64 = 4;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LeanPrediction {
    /// As the step holds them (the VarMap and the lean model's views of it).
    pub weights_bytes: u64,
    /// What the forward keeps for backward, all blocks + head/loss.
    pub saved_bytes: u64,
    /// Above baseline (weights included), like `PhaseBytes`.
    pub forward_peak_bytes: u64,
    pub backward_peak_bytes: u64,
    pub gradients_bytes: u64,
    /// max(forward, backward) above baseline, weights included.
    pub peak_bytes: u64,
    pub optimizer_state_bytes: Option<u64>,
    pub optimizer_peak_bytes: Option<u64>,
    /// Readable breakdown: per-block saved tensors by name, head, loss, transients.
    pub terms: Vec<(String, u64)>,
}

/// A running count of allocated bytes and its high-water mark.
#[derive(Debug, Clone, Copy, Default)]
struct Ledger {
    cur: i128,
    peak: i128,
}

impl Ledger {
    fn at(cur: u64) -> Ledger {
        Ledger {
            cur: cur as i128,
            peak: cur as i128,
        }
    }
    /// A tensor of `bytes` data.
    fn alloc(&mut self, bytes: u64) {
        self.cur += (bytes + TENSOR_OVERHEAD_BYTES) as i128;
        self.peak = self.peak.max(self.cur);
    }
    fn free(&mut self, bytes: u64) {
        self.cur -= (bytes + TENSOR_OVERHEAD_BYTES) as i128;
    }
    /// A buffer allocated and freed inside one call (no tensor header).
    fn scratch(&mut self, bytes: u64) {
        self.peak = self.peak.max(self.cur + bytes as i128);
    }
    /// A matmul `[m, k] @ [k, n]` of e-byte elements: candle allocates the output, then gemm
    /// packs its panels. `lhs_t` / `rhs_t`: the operand is a transposed view of a contiguous
    /// tensor.
    fn mm(&mut self, m: u64, n: u64, k: u64, lhs_t: bool, rhs_t: bool, e: u64) {
        self.alloc(m * n * e);
        self.scratch(gemm_scratch(m, n, k, lhs_t, rhs_t, e));
    }
    /// Peak above the starting level, and the net change.
    fn result(&self, start: u64) -> (u64, i128) {
        (
            (self.peak - start as i128).max(0) as u64,
            self.cur - start as i128,
        )
    }
}

/// gemm-f32's FMA microkernel (gemm-f32 0.19 `microkernel::fma`, the kernel candle's gemm
/// runs on x86-64 without the `x86-v4` feature): 8 lanes, MR = 2 vectors, NR = 6 columns.
const GEMM_LANES: u64 = 8;
const GEMM_MR: u64 = 2 * GEMM_LANES;
const GEMM_NR: u64 = 6;
/// gemm-common 0.19 `DEFAULT_RHS_PACKING_THRESHOLD` (gemm.rs:115, x86).
const GEMM_RHS_PACKING_THRESHOLD: u64 = 128;

/// Bytes one gemm call allocates for its packed panels (gemm-common 0.19
/// `gemm_basic_generic`, gemm.rs:350-440): the rhs panel kc × nc when the rhs is strided (or
/// very tall), and the whole lhs prepacked when it is short or strided. The crate `gemm`
/// transposes a row-major product first (gemm.rs:179): gemm-common sees m' = n, n' = m, its lhs
/// is our rhs and its rhs our lhs. kc and nc come from gemm-common's own `kernel_params`.
fn gemm_scratch(m: u64, n: u64, k: u64, lhs_t: bool, rhs_t: bool, e: u64) -> u64 {
    let (mp, np) = (n, m);
    // gemm-common's rhs row stride is our lhs's column stride (1 unless transposed); its lhs row
    // stride is our rhs's column stride.
    let (rhs_rs_one, lhs_rs_one) = (!lhs_t, !rhs_t);
    if k <= 2 || mp <= 1 || np <= 1 {
        return 0; // gevv / gemv
    }
    let (kc, mc, nc) = if mp <= 64 && np <= 64 {
        let kc = k.min(512);
        let l2 = gemm_common::cache::CACHE_INFO[1].cache_bytes as u64;
        (
            kc,
            (l2 / e / kc) / GEMM_MR * GEMM_MR,
            np.next_multiple_of(GEMM_NR),
        )
    } else {
        let p = gemm_common::cache::kernel_params(
            mp as usize,
            np as usize,
            k as usize,
            GEMM_MR as usize,
            GEMM_NR as usize,
            e as usize,
        );
        let nc = if p.nc > 0 {
            p.nc as u64
        } else {
            np.next_multiple_of(GEMM_NR)
        };
        (p.kc as u64, p.mc as u64, nc)
    };
    let pack_rhs = (!rhs_rs_one && mp > 2 * GEMM_MR)
        || (rhs_rs_one && mp > GEMM_RHS_PACKING_THRESHOLD * GEMM_MR);
    let prepack_lhs = mp <= 2 * mc && (!mp.is_multiple_of(GEMM_LANES) || !lhs_rs_one);
    let rhs = if pack_rhs {
        kc * GEMM_NR * (nc / GEMM_NR)
    } else {
        0
    };
    let lhs = if prepack_lhs {
        kc * GEMM_MR * mp.div_ceil(GEMM_MR)
    } else {
        0
    };
    if rhs + lhs == 0 {
        0
    } else {
        // dyn-stack aligns each part to a cache line
        (rhs + lhs) * e + 2 * 64
    }
}

/// Sizes of one step, and the kind of block being walked.
#[derive(Clone)]
struct Dims {
    n: u64,
    b: u64,
    t: u64,
    d: u64,
    h: u64,
    hkv: u64,
    hd: u64,
    ff: u64,
    v: u64,
    e: u64,
    threads: u64,
    /// Tensor parallelism: row-parallel outputs and column-parallel input gradients are summed
    /// over the group into a fresh buffer (`parallel`).
    tp: bool,
    /// The block's feed-forward is a mixture of experts (layers may differ: Qwen-MoE's
    /// `mlp_only_layers`, `decoder_sparse_step`).
    moe: bool,
    /// HF's attention holds k and v repeated to every query head (`repeat_kv`).
    repeat: bool,
    /// HF's sdpa holds a window mask `[B, 1, T, T]` f32.
    mask: bool,
}

impl Dims {
    /// A tensor-parallel all-reduce of an `[N, d]` tensor: the sum lands in a new buffer, then
    /// the partial one is freed.
    fn all_reduce(&self, l: &mut Ledger) {
        if self.tp {
            l.alloc(self.nd());
            l.free(self.nd());
        }
    }
    fn q(&self) -> u64 {
        self.n * self.h * self.hd * self.e
    }
    fn kv(&self) -> u64 {
        self.n * self.hkv * self.hd * self.e
    }
    fn nd(&self) -> u64 {
        self.n * self.d * self.e
    }
    fn nff(&self) -> u64 {
        self.n * self.ff * self.e
    }
    fn lse(&self) -> u64 {
        self.b * self.h * self.t * STAT
    }
    fn probs(&self) -> u64 {
        self.b * self.h * self.t * self.t * self.e
    }
    /// Flash attention forward's per-thread buffers (kernels/attention.rs `FwdScratch`: a
    /// kv head's kᵀ and v rows, and score / probability / query blocks of `QB` rows).
    fn attn_fwd_thread(&self) -> u64 {
        (2 * self.t * self.hd + 2 * ATTN_QB * self.t + 2 * ATTN_QB * self.hd) * STAT
    }
    /// The lse in (b, t, h) order, before its transpose to [B, H, T].
    fn attn_lse_bth(&self) -> u64 {
        self.lse()
    }
    /// Flash attention backward's per-task buffers (`BwdScratch`; one task per batch row and kv
    /// head, as many at once as threads): the group's dq, the head's dk, dv and three copies of
    /// k / v rows, and the blocks of `QB` rows.
    fn attn_bwd_scratch(&self) -> u64 {
        let g = self.h / self.hkv;
        let tasks = self.threads.min(self.b * self.hkv);
        let per = (g + 5) * self.t * self.hd + 4 * ATTN_QB * self.t + 5 * ATTN_QB * self.hd;
        tasks * per * STAT
    }
}

/// Query rows per block in the attention kernels (kernels/attention.rs `QB`).
const ATTN_QB: u64 = 4;

/// One block's saved tensors (name, bytes) for the step's options.
fn block_saved(cfg: &ModelConfig, x: &Dims, opts: &LeanOptions) -> Vec<(&'static str, u64)> {
    let attn = match opts.attention {
        Attention::Flash => ("attention lse [B, H, T] f32", x.lse()),
        Attention::Eager => ("attention probabilities [B, H, T, T]", x.probs()),
    };
    let hf = opts.saved == SavedSet::Transformers;
    match cfg.arch {
        Arch::Gpt2 => {
            let mut v = vec![
                ("block input x (ln_1's input) [N, d]", x.nd()),
                ("ln_1 mean, rstd [N] f32", 2 * x.n * STAT),
                ("ln_1 output (c_attn's input) [N, d]", x.nd()),
            ];
            if hf && opts.attention == Attention::Eager {
                v.push((
                    "qkv projection (the attention's views keep it) [N, 3·H·hd]",
                    3 * x.q(),
                ));
            } else if hf {
                v.push(("q, v (sdpa's copies) [B, T, H, hd]", 2 * x.q()));
                v.push((
                    "qkv projection (sdpa's view of k keeps it) [N, 3·H·hd]",
                    3 * x.q(),
                ));
            } else {
                v.push(("q, k, v [B, T, H, hd]", 3 * x.q()));
            }
            v.extend([
                ("attention output (c_proj's input) [N, H·hd]", x.q()),
                attn,
                ("x + attention (ln_2's input) [N, d]", x.nd()),
                ("ln_2 mean, rstd [N] f32", 2 * x.n * STAT),
                ("ln_2 output (c_fc's input) [N, d]", x.nd()),
                ("GELU input [N, ff]", x.nff()),
                ("GELU output (c_proj's input) [N, ff]", x.nff()),
            ]);
            let parts = gelu_parts(cfg, opts);
            if parts > 0 {
                v.push((
                    "composed GELU's intermediates (tanh, ½x, 1 + tanh…) [N, ff] each",
                    parts * x.nff(),
                ));
            }
            v
        }
        Arch::Llama => {
            let sandwich = cfg.norm_placement == NormPlacement::Sandwich;
            let mut v = vec![
                ("block input x (input_layernorm's input) [N, d]", x.nd()),
                ("input_layernorm rstd [N] f32", x.n * STAT),
                ("input_layernorm output (q/k/v input) [N, d]", x.nd()),
            ];
            if cfg.qk_norm {
                v.extend([
                    ("q_norm input (q_proj's output) [N, H·hd]", x.q()),
                    ("q_norm rstd [N·H] f32", x.n * x.h * STAT),
                    ("k_norm input (k_proj's output) [N, Hkv·hd]", x.kv()),
                    ("k_norm rstd [N·Hkv] f32", x.n * x.hkv * STAT),
                ]);
            }
            v.extend([
                ("q after RoPE [B, T, H, hd]", x.q()),
                if x.repeat {
                    (
                        "k after RoPE and v, repeated to every query head (repeat_kv) [B, T, H, hd]",
                        2 * x.q(),
                    )
                } else {
                    ("k after RoPE, v [B, T, Hkv, hd]", 2 * x.kv())
                },
                (
                    "sdpa's window mask [B, 1, T, T] f32",
                    u64::from(x.mask) * x.b * x.t * x.t * STAT,
                ),
                (
                    "fused qkv projection, which v's view keeps (v not copied) [N, q + 2kv]",
                    keeps_qkv(cfg, opts) * (x.q() + x.kv()),
                ),
                ("attention output (o_proj's input) [N, H·hd]", x.q()),
                attn,
                (
                    "attention soft-cap's tanh(s / c) (HF composes the cap) [B, H, T, T]",
                    u64::from(keeps_cap_tanh(cfg, opts)) * x.probs(),
                ),
            ]);
            if sandwich {
                v.extend([
                    (
                        "o_proj output (post_attention_layernorm's input) [N, d]",
                        x.nd(),
                    ),
                    ("post_attention_layernorm rstd [N] f32", x.n * STAT),
                    (
                        "x + attention (pre_feedforward_layernorm's input) [N, d]",
                        x.nd(),
                    ),
                    ("pre_feedforward_layernorm rstd [N] f32", x.n * STAT),
                    (
                        "pre_feedforward_layernorm output (MLP input) [N, d]",
                        x.nd(),
                    ),
                ]);
            } else {
                v.extend([
                    (
                        "x + attention (post_attention_layernorm's input) [N, d]",
                        x.nd(),
                    ),
                    ("post_attention_layernorm rstd [N] f32", x.n * STAT),
                    ("post_attention_layernorm output (MLP input) [N, d]", x.nd()),
                ]);
            }
            if hf {
                let norms = if sandwich { 4 } else { 2 };
                v.push((
                    "each norm's normalized input x̂ [N, d] f32",
                    norms * x.n * x.d * STAT,
                ));
                if cfg.qk_norm {
                    v.push((
                        "q/k norms' normalized input x̂ [N, (H + Hkv)·hd] f32",
                        x.n * (x.h + x.hkv) * x.hd * STAT,
                    ));
                }
            }
            v.extend(ffn_saved(cfg, x, opts));
            if sandwich {
                v.extend([
                    (
                        "MLP output (post_feedforward_layernorm's input) [N, d]",
                        x.nd(),
                    ),
                    ("post_feedforward_layernorm rstd [N] f32", x.n * STAT),
                ]);
            }
            v
        }
    }
}

/// The feed-forward's saved tensors beyond its input. MoE: every token goes to k experts, so the
/// experts' saved rows add up to N·k whatever the routing.
fn ffn_saved(cfg: &ModelConfig, x: &Dims, opts: &LeanOptions) -> Vec<(&'static str, u64)> {
    let hf = opts.saved == SavedSet::Transformers;
    if x.moe {
        let routed = x.n * cfg.n_experts_per_tok as u64;
        let ffm = cfg.moe_intermediate_size as u64;
        let mut v = vec![
            (
                "router probabilities [N, E] f32",
                x.n * cfg.n_experts as u64 * STAT,
            ),
            (
                "top-k choice per token (host)",
                x.n * (24 + 8 * cfg.n_experts_per_tok as u64),
            ),
            ("routed token ids [N·k] u32", routed * 4),
            ("routing weights [N·k]", routed * x.e),
            ("experts' gate and up [N·k, ff_e]", 2 * routed * ffm * x.e),
            (
                "experts' gated product (down's input) [N·k, ff_e]",
                routed * ffm * x.e,
            ),
            ("experts' outputs [N·k, d]", routed * x.d * x.e),
        ];
        if hf {
            v.push(("experts' act(gate) [N·k, ff_e]", routed * ffm * x.e));
            v.push(("experts' gathered inputs [N·k, d]", routed * x.d * x.e));
        }
        v
    } else {
        let mut v = vec![
            ("gate and up (activation inputs) [N, ff]", 2 * x.nff()),
            ("gated product (down_proj's input) [N, ff]", x.nff()),
        ];
        if hf {
            v.push(("act(gate) (act_fn(gate) · up keeps it) [N, ff]", x.nff()));
        }
        v
    }
}

/// Tensors the composed GELU makes PyTorch keep beside its input (`train::kept`).
fn gelu_parts(cfg: &ModelConfig, opts: &LeanOptions) -> u64 {
    match (opts.saved, cfg.gelu) {
        (SavedSet::Fused, _) | (_, GeluForm::Fused) => 0,
        (SavedSet::Transformers, GeluForm::New) => 3,
        (SavedSet::Transformers, GeluForm::Fast) => 6,
    }
}

/// 1 when the step keeps a fused qkv projection whole, as HF's sdpa does through v's view.
fn keeps_qkv(cfg: &ModelConfig, opts: &LeanOptions) -> u64 {
    u64::from(
        opts.saved == SavedSet::Transformers
            && cfg.arch == Arch::Llama
            && cfg.qkv_storage == Storage::Fused,
    )
}

/// GPT-2's q, k, v copies not kept beside its qkv projection (`gpt2.rs`).
fn gpt2_copies_dropped(opts: &LeanOptions) -> u64 {
    match (opts.saved, opts.attention) {
        (SavedSet::Fused, _) => 0,
        (SavedSet::Transformers, Attention::Flash) => 1,
        (SavedSet::Transformers, Attention::Eager) => 3,
    }
}

/// Whether eager attention keeps tanh(s / c) of a soft-capped score beside the probabilities
/// (HF composes the cap; autograd keeps tanh's output).
fn keeps_cap_tanh(cfg: &ModelConfig, opts: &LeanOptions) -> bool {
    opts.saved == SavedSet::Transformers
        && opts.attention == Attention::Eager
        && cfg.arch == Arch::Llama
        && cfg.attn_softcap.is_some()
}

/// Whether the step keeps each RMSNorm's x̂ (HF's composed RMSNorm).
fn keeps_xhat(cfg: &ModelConfig, opts: &LeanOptions) -> bool {
    opts.saved == SavedSet::Transformers && cfg.norm != NormKind::LayerNorm
}

/// Tensors per block in `block_saved` (each with a header): q/k norms add their inputs and
/// rstds, sandwich norms the two sublayer outputs and their rstds; keeping what HF keeps adds
/// each RMSNorm's x̂, act(gate) and, per expert, its act(gate) and gathered input.
fn block_saved_tensors(cfg: &ModelConfig, x: &Dims, opts: &LeanOptions) -> u64 {
    let hf = u64::from(opts.saved == SavedSet::Transformers);
    let sandwich = cfg.norm_placement == NormPlacement::Sandwich;
    let switches = 4 * u64::from(cfg.qk_norm) + 4 * u64::from(sandwich);
    let xhats = if keeps_xhat(cfg, opts) {
        (if sandwich { 4 } else { 2 }) + 2 * u64::from(cfg.qk_norm)
    } else {
        0
    };
    match cfg.arch {
        // Transformers: qkv kept instead of the k copy.
        Arch::Gpt2 => 14 + gelu_parts(cfg, opts) + hf - gpt2_copies_dropped(opts),
        Arch::Llama if x.moe => {
            11 + 1 + (4 + 2 * hf) * cfg.n_experts as u64 + switches + xhats + u64::from(x.mask)
        }
        Arch::Llama => {
            13 + switches + xhats + hf + u64::from(x.mask) + u64::from(keeps_cap_tanh(cfg, opts))
        }
    }
}

/// One block's forward from the moment its input exists: (peak above start, net change).
fn block_forward(cfg: &ModelConfig, x: &Dims, opts: &LeanOptions) -> (u64, i128) {
    let mut l = Ledger::at(0);
    let (n, d, e) = (x.n, x.d, x.e);
    let hf = opts.saved == SavedSet::Transformers;
    let attn_out = |l: &mut Ledger| match opts.attention {
        Attention::Flash => {
            l.alloc(x.q()); // o
            l.scratch(x.attn_lse_bth() + x.threads * x.attn_fwd_thread());
            l.alloc(x.lse());
            l.scratch(x.attn_lse_bth());
        }
        Attention::Eager => {
            l.alloc(x.probs());
            if keeps_cap_tanh(cfg, opts) {
                l.alloc(x.probs());
            }
            l.alloc(x.q());
        }
    };
    match cfg.arch {
        Arch::Gpt2 => {
            // Conv1D weights [in, out]: x @ W, no transpose
            l.alloc(x.nd()); // ln_1 output
            l.alloc(n * STAT);
            l.alloc(n * STAT);
            let qd = x.h * x.hd; // d, or d / TP
            l.mm(n, 3 * qd, d, false, false, e); // qkv
            for _ in 0..3 {
                l.alloc(x.q()); // q, k, v copied out of qkv
            }
            if opts.saved == SavedSet::Fused {
                l.free(3 * x.q());
            }
            attn_out(&mut l);
            // The copies HF does not keep (qkv stays): k with sdpa, all three eager.
            let dropped = gpt2_copies_dropped(opts);
            for _ in 0..dropped {
                l.free(x.q());
            }
            l.mm(n, d, qd, false, false, e); // c_proj output
            x.all_reduce(&mut l);
            l.alloc(x.nd()); // x1
            l.free(x.nd());
            l.alloc(x.nd()); // ln_2
            l.alloc(n * STAT);
            l.alloc(n * STAT);
            l.mm(n, x.ff, d, false, false, e); // c_fc output (GELU input)
            l.alloc(x.nff()); // GELU output
            for _ in 0..gelu_parts(cfg, opts) {
                l.alloc(x.nff());
            }
            l.mm(n, d, x.ff, false, false, e); // c_proj output
            x.all_reduce(&mut l);
            l.alloc(x.nd()); // y
            l.free(x.nd());
        }
        Arch::Llama => {
            // nn.Linear weights [out, in]: x @ Wᵀ
            let (qd, kvd) = (x.h * x.hd, x.hkv * x.hd);
            let sandwich = cfg.norm_placement == NormPlacement::Sandwich;
            l.alloc(x.nd()); // input_layernorm output
            l.alloc(n * STAT);
            if keeps_xhat(cfg, opts) {
                l.alloc(n * d * STAT);
            }
            match cfg.qkv_storage {
                Storage::Separate => {
                    l.mm(n, qd, d, false, true, e); // q before RoPE
                    l.mm(n, kvd, d, false, true, e);
                    l.mm(n, kvd, d, false, true, e); // v
                }
                Storage::Fused => {
                    l.mm(n, qd + 2 * kvd, d, false, true, e); // qkv
                    l.alloc(x.q()); // q, k, v copied out of qkv
                    l.alloc(x.kv());
                    l.alloc(x.kv());
                    if !hf {
                        l.free(x.q() + 2 * x.kv());
                    }
                }
            }
            for (width, heads) in [(x.q(), x.h), (x.kv(), x.hkv)] {
                if cfg.qk_norm {
                    l.alloc(width); // normalised heads (the projection's output is kept)
                    l.alloc(n * heads * STAT);
                    if keeps_xhat(cfg, opts) {
                        l.alloc(width / e * STAT);
                    }
                }
                l.alloc(width); // after RoPE
                l.free(width); // before
            }
            let kv_att = if x.repeat { x.q() } else { x.kv() };
            if x.repeat {
                for _ in 0..2 {
                    l.alloc(x.q()); // k, v repeated
                    l.free(x.kv());
                }
            }
            if x.mask {
                l.alloc(x.b * x.t * x.t * STAT);
            }
            attn_out(&mut l);
            if keeps_qkv(cfg, opts) == 1 {
                l.free(kv_att); // the v copy (the projection stays)
            }
            l.mm(n, d, qd, false, true, e); // o_proj output
            x.all_reduce(&mut l);
            if sandwich {
                l.alloc(x.nd()); // post_attention_layernorm output
                l.alloc(n * STAT);
                if keeps_xhat(cfg, opts) {
                    l.alloc(n * d * STAT);
                }
                l.alloc(x.nd()); // x1
                l.free(x.nd());
            } else {
                l.alloc(x.nd()); // x1
                l.free(x.nd());
            }
            l.alloc(x.nd()); // the MLP's pre-norm output
            l.alloc(n * STAT);
            if keeps_xhat(cfg, opts) {
                l.alloc(n * d * STAT);
            }
            ffn_forward(cfg, x, opts, &mut l);
            if sandwich {
                l.alloc(x.nd()); // post_feedforward_layernorm output
                l.alloc(n * STAT);
                if keeps_xhat(cfg, opts) {
                    l.alloc(n * d * STAT);
                }
            }
            l.alloc(x.nd()); // y
            l.free(x.nd());
        }
    }
    l.result(0)
}

/// The feed-forward's forward, ending with its output `[N, d]` allocated.
fn ffn_forward(cfg: &ModelConfig, x: &Dims, opts: &LeanOptions, l: &mut Ledger) {
    let (n, d, e) = (x.n, x.d, x.e);
    let hf = opts.saved == SavedSet::Transformers;
    if !x.moe {
        match cfg.gate_up_storage {
            Storage::Separate => {
                l.mm(n, x.ff, d, false, true, e); // gate
                l.mm(n, x.ff, d, false, true, e); // up
            }
            Storage::Fused => {
                l.mm(n, 2 * x.ff, d, false, true, e); // gate | up
                l.alloc(x.nff()); // gate, up copied out
                l.alloc(x.nff());
                l.free(2 * x.nff());
            }
        }
        l.alloc(x.nff()); // gated product
        if hf {
            l.alloc(x.nff()); // act(gate)
        }
        l.mm(n, d, x.ff, false, true, e); // down output
        x.all_reduce(l);
        return;
    }
    let (k, e_count) = (cfg.n_experts_per_tok as u64, cfg.n_experts as u64);
    let ffm = cfg.moe_intermediate_size as u64;
    // The experts' rows are data-dependent; each expert sees N·k/E tokens on average.
    let ne = (n * k).div_ceil(e_count);
    l.mm(n, e_count, d, false, true, e); // router logits
    l.alloc(n * e_count * STAT); // probabilities
    l.free(n * e_count * e);
    l.scratch(n * e_count * STAT); // host copy
    l.alloc(n * (24 + 8 * k)); // choices
    l.alloc(x.nd()); // output accumulator
    for _ in 0..e_count {
        l.alloc(ne * 4 + ne * e); // ids, weights
        l.alloc(ne * d * e); // gathered rows
        l.mm(ne, ffm, d, false, true, e);
        l.mm(ne, ffm, d, false, true, e);
        l.alloc(ne * ffm * e);
        if hf {
            l.alloc(ne * ffm * e); // act(gate)
        }
        l.mm(ne, d, ffm, false, true, e); // expert output
        if !hf {
            l.free(ne * d * e); // gathered rows (kept by HF's expert maps)
        }
        l.scratch(ne * d * e); // weighted output
    }
}

/// One block's backward from the moment dy exists until dx replaces it: (peak above start,
/// net change: gradients allocated minus saved tensors freed).
fn block_backward(cfg: &ModelConfig, x: &Dims, opts: &LeanOptions) -> (u64, i128) {
    let mut l = Ledger::at(0);
    let (n, d, e) = (x.n, x.d, x.e);
    let bias = |l: &mut Ledger, on: bool, width: u64| {
        if on {
            l.alloc(width * e);
        }
    };
    let attn_bwd = |l: &mut Ledger, dq: u64, dkv: u64| {
        l.alloc(dq);
        l.alloc(dkv);
        l.alloc(dkv);
        if opts.attention == Attention::Flash {
            l.scratch(x.attn_bwd_scratch());
        }
    };
    match cfg.arch {
        Arch::Gpt2 => {
            // Conv1D [in, out]: dW = xᵀ @ dy, dx = dy @ Wᵀ
            let b = cfg.bias;
            let ff = x.ff;
            l.mm(ff, d, n, true, false, e); // MLP c_proj dW
            bias(&mut l, b, d);
            l.mm(n, ff, d, false, true, e); // dg
            l.free(x.nff()); // g
            l.alloc(x.nff()); // dh
            l.free(x.nff()); // dg
            l.free(x.nff()); // h
            for _ in 0..gelu_parts(cfg, opts) {
                l.free(x.nff());
            }
            l.mm(d, ff, n, true, false, e); // c_fc dW
            bias(&mut l, b, ff);
            l.mm(n, d, ff, false, true, e); // dln2
            x.all_reduce(&mut l);
            l.free(x.nff()); // dh
            l.free(x.nd()); // ln2
            l.alloc(x.nd()); // ln_2 dx
            l.alloc(d * e);
            bias(&mut l, b, d);
            l.free(x.nd()); // dln2
            l.free(x.nd()); // x1
            l.free(2 * n * STAT);
            l.free(x.nd()); // dx added into dy
            let qd = x.h * x.hd; // d, or d / TP
            l.mm(qd, d, n, true, false, e); // attention c_proj dW
            bias(&mut l, b, d);
            l.mm(n, qd, d, false, true, e); // d_o
            let hf = opts.saved == SavedSet::Transformers;
            for _ in 0..gpt2_copies_dropped(opts) {
                l.alloc(x.q()); // copied out of qkv again
            }
            attn_bwd(&mut l, x.q(), x.q());
            l.free(x.q()); // d_o
            l.free(4 * x.q()); // q, k, v, o
            if hf {
                l.free(3 * x.q()); // qkv
            }
            free_attn(&mut l, cfg, x, opts);
            l.alloc(3 * x.q()); // dqkv
            l.free(3 * x.q()); // dq, dk, dv
            l.mm(d, 3 * qd, n, true, false, e); // c_attn dW
            bias(&mut l, b, 3 * qd);
            l.mm(n, d, 3 * qd, false, true, e); // dln1
            x.all_reduce(&mut l);
            l.free(3 * x.q()); // dqkv
            l.free(x.nd()); // ln1
            l.alloc(x.nd()); // ln_1 dx
            l.alloc(d * e);
            bias(&mut l, b, d);
            l.free(x.nd()); // dln1
            l.free(x.nd()); // x
            l.free(2 * n * STAT);
            l.free(x.nd()); // dx added into dx1
        }
        Arch::Llama => {
            // nn.Linear [out, in]: dW = dyᵀ @ x, dx = dy @ W
            let (qd, kvd) = (cfg.q_dim() as u64, cfg.kv_dim() as u64);
            let qkv_b = cfg.has_qkv_bias();
            let sandwich = cfg.norm_placement == NormPlacement::Sandwich;
            // A norm's backward: its dx and dw, then its saved input and rstd freed.
            let xhat = if keeps_xhat(cfg, opts) {
                n * d * STAT
            } else {
                0
            };
            let norm_bwd = |l: &mut Ledger, width: u64, c: u64, rows: u64| {
                l.alloc(width);
                l.alloc(c * e);
                l.free(width);
                l.free(rows * STAT);
                if xhat > 0 {
                    l.free(width / e * STAT);
                }
            };
            if sandwich {
                norm_bwd(&mut l, x.nd(), d, n); // post_feedforward_layernorm: dm
            }
            ffn_backward(cfg, x, opts, &mut l);
            if sandwich {
                l.free(x.nd()); // dm
            }
            l.free(x.nd()); // h2
            l.alloc(x.nd()); // the MLP's pre-norm dx
            l.alloc(d * e);
            l.free(x.nd()); // dh2
            l.free(x.nd()); // x1
            l.free(n * STAT);
            if xhat > 0 {
                l.free(xhat);
            }
            l.free(x.nd()); // added into dy
            if sandwich {
                norm_bwd(&mut l, x.nd(), d, n); // post_attention_layernorm: da
            }
            l.mm(d, qd, n, true, false, e); // o_proj dW
            bias(&mut l, cfg.bias, d);
            l.mm(n, qd, d, false, false, e); // d_o
            if sandwich {
                l.free(x.nd()); // da
            }
            let qkv_kept = keeps_qkv(cfg, opts) == 1;
            if qkv_kept {
                l.alloc(x.kv()); // v copied out of the kept projection
                if x.repeat {
                    l.alloc(x.q());
                    l.free(x.kv());
                }
            }
            let kv_att = if x.repeat { x.q() } else { x.kv() };
            attn_bwd(&mut l, x.q(), kv_att);
            l.free(x.q()); // d_o
            l.free(2 * x.q() + 2 * kv_att); // q, k, v, o
            if qkv_kept {
                l.free(x.q() + 2 * x.kv());
            }
            if x.mask {
                l.free(x.b * x.t * x.t * STAT);
            }
            if x.repeat {
                for _ in 0..2 {
                    l.alloc(x.kv()); // the group sums of dk, dv
                    l.free(x.q());
                }
            }
            free_attn(&mut l, cfg, x, opts);
            // through RoPE (and the q/k norm: its dx, dw, then the gradient it came from and
            // its saved input and rstd freed)
            let unrotate = |l: &mut Ledger, width: u64, heads: u64| {
                l.alloc(width);
                l.free(width);
                if cfg.qk_norm {
                    l.alloc(width);
                    l.alloc(x.hd * e);
                    l.free(2 * width);
                    l.free(n * heads * STAT);
                    if keeps_xhat(cfg, opts) {
                        l.free(width / e * STAT);
                    }
                }
            };
            unrotate(&mut l, x.q(), x.h);
            match cfg.qkv_storage {
                Storage::Separate => {
                    // q_proj (its dx starts dh1)
                    l.mm(qd, d, n, true, false, e);
                    bias(&mut l, qkv_b, qd);
                    l.mm(n, d, qd, false, false, e);
                    l.free(x.q());
                    // k_proj (dx added into dh1)
                    unrotate(&mut l, x.kv(), x.hkv);
                    l.mm(kvd, d, n, true, false, e);
                    bias(&mut l, qkv_b, kvd);
                    l.mm(n, d, kvd, false, false, e);
                    l.free(x.nd());
                    l.free(x.kv());
                    // v_proj
                    l.mm(kvd, d, n, true, false, e);
                    bias(&mut l, qkv_b, kvd);
                    l.mm(n, d, kvd, false, false, e);
                    l.free(x.nd());
                    x.all_reduce(&mut l);
                    l.free(x.kv()); // dv
                }
                Storage::Fused => {
                    unrotate(&mut l, x.kv(), x.hkv);
                    let w = qd + 2 * kvd;
                    l.alloc(n * w * e); // dqkv
                    l.free(x.q() + 2 * x.kv());
                    l.mm(w, d, n, true, false, e);
                    bias(&mut l, qkv_b, w);
                    l.mm(n, d, w, false, false, e);
                    x.all_reduce(&mut l);
                    l.free(n * w * e);
                }
            }
            l.free(x.nd()); // h1
            l.alloc(x.nd()); // input norm dx
            l.alloc(d * e);
            l.free(x.nd()); // dh1
            l.free(x.nd()); // x
            l.free(n * STAT);
            if xhat > 0 {
                l.free(xhat);
            }
            l.free(x.nd()); // added into dx1
        }
    }
    l.result(0)
}

fn free_attn(l: &mut Ledger, cfg: &ModelConfig, x: &Dims, opts: &LeanOptions) {
    match opts.attention {
        Attention::Flash => l.free(x.lse()),
        Attention::Eager => {
            l.free(x.probs());
            if keeps_cap_tanh(cfg, opts) {
                l.free(x.probs());
            }
        }
    }
}

/// The feed-forward's backward from dy to dh2 (its input's gradient) allocated.
fn ffn_backward(cfg: &ModelConfig, x: &Dims, opts: &LeanOptions, l: &mut Ledger) {
    let (n, d, e) = (x.n, x.d, x.e);
    let hf = opts.saved == SavedSet::Transformers;
    if !x.moe {
        let ff = x.ff;
        let b = |l: &mut Ledger, w: u64| {
            if cfg.mlp_bias {
                l.alloc(w * e);
            }
        };
        l.mm(d, ff, n, true, false, e); // down dW
        b(l, d);
        l.mm(n, ff, d, false, false, e); // dh
        l.free(x.nff()); // h
        l.alloc(x.nff()); // dgate
        l.alloc(x.nff()); // dup
        l.free(x.nff()); // dh
        l.free(2 * x.nff()); // gate, up
        if hf {
            l.free(x.nff()); // act(gate)
        }
        match cfg.gate_up_storage {
            Storage::Separate => {
                l.mm(ff, d, n, true, false, e); // gate dW
                b(l, ff);
                l.mm(n, d, ff, false, false, e); // dx
                l.free(x.nff()); // dgate
                l.mm(ff, d, n, true, false, e); // up dW
                b(l, ff);
                l.mm(n, d, ff, false, false, e);
                l.free(x.nd()); // added
                x.all_reduce(l);
                l.free(x.nff()); // dup
            }
            Storage::Fused => {
                l.alloc(2 * x.nff()); // dgate | dup
                l.free(2 * x.nff());
                l.mm(2 * ff, d, n, true, false, e); // gate_up dW
                b(l, 2 * ff);
                l.mm(n, d, 2 * ff, false, false, e); // dx
                x.all_reduce(l);
                l.free(2 * x.nff());
            }
        }
        return;
    }
    let (k, ec) = (cfg.n_experts_per_tok as u64, cfg.n_experts as u64);
    let ffm = cfg.moe_intermediate_size as u64;
    let ne = (n * k).div_ceil(ec);
    l.alloc(x.nd()); // dx accumulator
    for _ in 0..ec {
        l.alloc(ne * d * e); // dy rows
        l.scratch(ne * d * e + ne * e); // ⟨dy, y⟩ per row
        l.free(ne * d * e); // expert output
        l.alloc(ne * d * e); // weighted dy
        l.free(ne * d * e); // dy rows
        l.alloc(ne * d * e); // gathered input
        l.mm(d, ffm, ne, true, false, e); // down dW
        l.mm(ne, ffm, d, false, false, e); // dh
        l.free(ne * ffm * e); // h
        l.alloc(2 * ne * ffm * e); // dgate, dup
        l.free(ne * ffm * e); // dh
        l.free(2 * ne * ffm * e); // gate, up
        if hf {
            l.free(ne * ffm * e); // act(gate)
            l.free(ne * d * e); // the input gathered in forward
        }
        l.mm(ffm, d, ne, true, false, e); // gate dW
        l.mm(ne, d, ffm, false, false, e); // dx
        l.free(ne * ffm * e); // dgate
        l.mm(ffm, d, ne, true, false, e); // up dW
        l.mm(ne, d, ffm, false, false, e);
        l.free(ne * d * e); // added
        l.free(ne * ffm * e); // dup
        l.free(ne * d * e); // gathered input
        l.free(ne * d * e); // weighted dy
        l.free(ne * d * e); // dxe added
        l.free(ne * 4 + ne * e); // ids, weights
    }
    l.free(n * (24 + 8 * k)); // choices
    l.scratch(n * ec * STAT * 2);
    l.alloc(n * ec * e); // router logits' gradient
    l.mm(ec, d, n, true, false, e); // router dW
    l.mm(n, d, ec, false, false, e);
    l.free(x.nd());
    l.free(n * ec * e);
    l.free(n * ec * STAT); // probabilities
}

/// One kind of block (dense or mixture of experts) under the step's options: what it keeps and
/// its walks, each relative to the level it starts from.
struct BlockKind {
    saved: Vec<(&'static str, u64)>,
    /// What the forward keeps of it (its saved set with headers, or its input when
    /// checkpointed).
    kept: u64,
    fwd_peak: u64,
    bwd_peak: u64,
    bwd_net: i128,
    /// With checkpointing its forward runs again before its backward (its saved set reappears;
    /// the recomputed output is dropped at once).
    recompute_peak: u64,
    recompute_net: i128,
}

impl BlockKind {
    fn new(cfg: &ModelConfig, x: &Dims, opts: &LeanOptions) -> BlockKind {
        let saved = block_saved(cfg, x, opts);
        let bytes = saved.iter().map(|(_, v)| v).sum::<u64>()
            + block_saved_tensors(cfg, x, opts) * TENSOR_OVERHEAD_BYTES;
        let input = x.nd() + TENSOR_OVERHEAD_BYTES;
        let (fwd_peak, _) = block_forward(cfg, x, opts);
        let (bwd_peak, bwd_net) = block_backward(cfg, x, opts);
        let (kept, recompute_peak, recompute_net) = match opts.checkpoint {
            Checkpoint::None => (bytes, 0, 0),
            Checkpoint::Blocks => (input, fwd_peak, bytes as i128 - input as i128),
        };
        BlockKind {
            saved,
            kept,
            fwd_peak,
            bwd_peak,
            bwd_net,
            recompute_peak,
            recompute_net,
        }
    }

    /// Peak of its backward (recompute included) from `level`.
    fn bwd_peak_from(&self, level: u64) -> u64 {
        let after_recompute = (level as i128 + self.recompute_net).max(0) as u64;
        (level + self.recompute_peak).max(after_recompute + self.bwd_peak)
    }
}

/// Parameters and parameter tensors of the model.
fn param_counts(cfg: &ModelConfig) -> (u64, u64) {
    match crate::model::build::shapes_only(cfg, candle_core::DType::F32) {
        Ok(specs) => (specs.iter().map(|s| s.numel()).sum(), specs.len() as u64),
        Err(_) => (0, 0),
    }
}

/// The part of the network one rank of a tensor- and pipeline-parallel step runs
/// (`train::parallel`); the config it is predicted with is the rank's local config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RankPart {
    /// Blocks this rank runs (its stage's layers).
    pub layers: u64,
    /// Whether it embeds the tokens (first stage).
    pub first: bool,
    /// Whether it computes the final norm, the head and the loss (last stage).
    pub last: bool,
    /// Whether its maps are tensor-parallel (TP > 1).
    pub tp: bool,
    /// Parameter elements and parameter tensors it holds.
    pub params: u64,
    pub tensors: u64,
    /// Parameters other stages hold, present here as zero-strided views.
    pub views: u64,
}

impl RankPart {
    /// The whole network in one process.
    pub fn whole(cfg: &ModelConfig) -> RankPart {
        let (params, tensors) = param_counts(cfg);
        RankPart {
            layers: cfg.n_layer as u64,
            first: true,
            last: true,
            tp: false,
            params,
            tensors,
            views: 0,
        }
    }
}

/// The closed form of one lean step (forward, loss, backward, optional optimizer step).
pub fn predict(cfg: &ModelConfig, step: Step, opts: &LeanOptions) -> LeanPrediction {
    predict_rank(cfg, step, opts, &RankPart::whole(cfg))
}

/// What one block saves for backward (headers included) at `step`: the activation term of a
/// plan that runs the lean step.
pub fn block_saved_bytes(cfg: &ModelConfig, step: Step, opts: &LeanOptions) -> u64 {
    let x = dims(cfg, step, false);
    block_saved(cfg, &x, opts)
        .iter()
        .map(|(_, v)| v)
        .sum::<u64>()
        + block_saved_tensors(cfg, &x, opts) * TENSOR_OVERHEAD_BYTES
}

fn dims(cfg: &ModelConfig, step: Step, tp: bool) -> Dims {
    let e = step.dtype.bytes();
    let (b, t) = (step.batch as u64, step.seq as u64);
    Dims {
        n: b * t,
        b,
        t,
        d: cfg.n_embd as u64,
        h: cfg.n_head as u64,
        hkv: cfg.n_kv_head as u64,
        hd: cfg.head_dim as u64,
        ff: cfg.intermediate_size as u64,
        v: cfg.vocab_size as u64,
        e,
        threads: rayon::current_num_threads() as u64,
        tp,
        moe: false,
        repeat: false,
        mask: false,
    }
}

/// (k and v repeated, a window mask held) for `layer`, as `llama::hf_attention_inputs` decides.
fn attention_inputs(cfg: &ModelConfig, layer: usize, t: u64, opts: &LeanOptions) -> (bool, bool) {
    if opts.saved != SavedSet::Transformers || cfg.arch != Arch::Llama {
        return (false, false);
    }
    let window = cfg.attention_window(layer).is_some_and(|w| t >= w as u64);
    let eager = opts.attention == Attention::Eager;
    (
        cfg.n_head != cfg.n_kv_head && (eager || window),
        !eager && window,
    )
}

/// The closed form of one rank's part of a parallel lean step (`RankPart`), with `cfg` the
/// rank's local config. Stages without the head hold no head or loss tensors, receive the
/// output's gradient instead, and stop at their first block's input gradient (sent on).
pub fn predict_rank(
    cfg: &ModelConfig,
    step: Step,
    opts: &LeanOptions,
    part: &RankPart,
) -> LeanPrediction {
    // Mixed precision runs whole steps only: a tensor-parallel map refuses it, and the
    // multi-process step runs the default options.
    if let Some(half) = opts.amp {
        debug_assert!(
            *part == RankPart::whole(cfg),
            "AMP is predicted for the whole step"
        );
        return predict_amp(cfg, step, opts, half.size_in_bytes() as u64);
    }
    let (params, n_tensors) = (part.params, part.tensors);
    let e = step.dtype.bytes();
    let (b, t) = (step.batch as u64, step.seq as u64);
    let x = dims(cfg, step, part.tp);
    let layers = part.layers;
    let mut terms: Vec<(String, u64)> = Vec::new();
    // A view: one element of storage and its headers, named in the parameter map.
    let views = part.views * (e + TENSOR_OVERHEAD_BYTES + LEAN_BYTES_PER_TENSOR);
    let weights =
        params * e + n_tensors * (VARMAP_BYTES_PER_TENSOR + LEAN_BYTES_PER_TENSOR) + views;
    terms.push(("weights".into(), weights));

    // --- what the forward keeps, per kind of block (a stage's blocks are taken as the model's
    // first `layers`: the lean step does not split a mixture of experts over stages)
    // Layers differ by their feed-forward (dense or MoE) and, keeping what HF keeps, by what
    // its attention holds (repeated k/v, a window mask): one walk per distinct kind.
    let key_of = |i: usize| {
        let (repeat, mask) = attention_inputs(cfg, i, t, opts);
        (cfg.is_moe() && cfg.layer_is_moe(i), repeat, mask)
    };
    let mut distinct: Vec<((bool, bool, bool), BlockKind)> = Vec::new();
    for i in 0..layers as usize {
        let key = key_of(i);
        if !distinct.iter().any(|(k, _)| *k == key) {
            let (moe, repeat, mask) = key;
            let dims = Dims {
                moe,
                repeat,
                mask,
                ..x.clone()
            };
            distinct.push((key, BlockKind::new(cfg, &dims, opts)));
        }
    }
    let kinds: Vec<&BlockKind> = (0..layers as usize)
        .filter_map(|i| {
            let key = key_of(i);
            distinct
                .iter()
                .find(|(k, _)| *k == key)
                .map(|(_, kind)| kind)
        })
        .collect();
    for ((moe, repeat, mask), kind) in &distinct {
        let label = if distinct.len() == 1 {
            "per block".to_string()
        } else {
            format!(
                "per {} block{}{}",
                if *moe { "MoE" } else { "dense" },
                if *repeat { ", k/v repeated" } else { "" },
                if *mask { ", window mask" } else { "" }
            )
        };
        for (name, v) in &kind.saved {
            terms.push((format!("{label}: {name}"), *v));
        }
    }
    let stats_f = match cfg.arch {
        Arch::Gpt2 => 2 * x.n * STAT,
        Arch::Llama => x.n * STAT,
    };
    let rope = match cfg.arch {
        Arch::Gpt2 => 0,
        Arch::Llama => {
            let one = 2 * (t * (cfg.rotary_dim as u64 / 2) * STAT + TENSOR_OVERHEAD_BYTES);
            let local = cfg.rope_per_layer_type
                && (0..cfg.n_layer).any(|i| cfg.attention_window(i).is_some());
            if local {
                2 * one
            } else {
                one
            }
        }
    };
    let hf = opts.saved == SavedSet::Transformers;
    let final_xhat = if keeps_xhat(cfg, opts) {
        x.n * x.d * STAT + TENSOR_OVERHEAD_BYTES
    } else {
        0
    };
    let logp = if hf {
        x.n * x.v * STAT + TENSOR_OVERHEAD_BYTES
    } else {
        0
    };
    // HF's final soft-cap c · tanh(x / c) keeps tanh's output.
    let cap_tanh = if hf && cfg.final_softcap.is_some() {
        x.n * x.v * STAT + TENSOR_OVERHEAD_BYTES
    } else {
        0
    };
    let head_saved = [
        ("final norm input [N, d]", x.nd() + TENSOR_OVERHEAD_BYTES),
        ("final norm x̂ [N, d] f32", final_xhat),
        (
            "final norm statistics [N] f32",
            stats_f + TENSOR_OVERHEAD_BYTES,
        ),
        (
            "final norm output (head input) [N, d]",
            x.nd() + TENSOR_OVERHEAD_BYTES,
        ),
        ("logits [N, V]", x.n * x.v * e + TENSOR_OVERHEAD_BYTES),
        ("final soft-cap's tanh [N, V] f32", cap_tanh),
        ("log-probabilities [N, V] f32", logp),
        ("loss lse [N] f32", x.n * STAT + TENSOR_OVERHEAD_BYTES),
        ("targets [N] u32", x.n * 4 + TENSOR_OVERHEAD_BYTES),
        ("RoPE cos/sin tables", rope),
    ];
    // A stage without the head keeps only the RoPE tables of this list (the last entry).
    let head_saved: &[(&str, u64)] = if part.last {
        &head_saved
    } else {
        &head_saved[head_saved.len() - 1..]
    };
    for (name, v) in head_saved {
        terms.push((name.to_string(), *v));
    }
    let head_bytes: u64 = head_saved.iter().map(|(_, v)| v).sum();
    let blocks_kept: u64 = kinds.iter().map(|k| k.kept).sum();
    let saved = blocks_kept + head_bytes;
    terms.push((
        format!("saved: {layers} blocks ({blocks_kept}) + head/loss"),
        saved,
    ));

    // --- forward peak: inside a block (each above the blocks before it), or at the loss
    let mut level = weights + rope + x.nd() + TENSOR_OVERHEAD_BYTES;
    let mut in_blocks = level;
    for k in &kinds {
        in_blocks = in_blocks.max(level + k.fwd_peak);
        level += k.kept;
    }
    // The logits' matmul (xf @ Wᵀ) packs its panels while the rest of the saved set exists.
    // (A stage without the head has none of these.)
    let logits_mm = if part.last {
        weights + saved - logp - cap_tanh - (x.n * STAT + TENSOR_OVERHEAD_BYTES) - (x.n * 4)
            + gemm_scratch(x.n, x.v, x.d, false, true, e)
    } else {
        0
    };
    let at_loss = if part.last {
        (weights + saved + (b * t * 4 + b * 24)).max(logits_mm) // host copy of the ids
    } else {
        0
    };
    let forward_peak = in_blocks.max(at_loss);
    terms.push(("forward peak: in the blocks".into(), in_blocks));
    terms.push(("forward peak: at the loss".into(), at_loss));

    // --- backward: the head, then each block, then the embedding
    let mut l = Ledger::at(weights + saved);
    if hf {
        l.alloc(x.n * x.v * STAT); // the log-probabilities' gradient
        l.alloc(x.n * x.v * e); // the logits' gradient, a new buffer
        l.free(x.n * x.v * STAT);
        l.free(x.n * x.v * STAT); // log-probabilities
        if cap_tanh > 0 {
            l.free(cap_tanh - TENSOR_OVERHEAD_BYTES);
        }
    }
    l.free(x.n * STAT); // loss lse (Fused: logits become their gradient in place)
    l.mm(x.v, x.d, x.n, true, false, e); // head dW = dlogitsᵀ @ xf
    l.free(x.nd()); // head input
    l.mm(x.n, x.d, x.v, false, false, e); // dxf = dlogits @ W
    l.free(x.n * x.v * e); // dlogits (Transformers: the logits stay until the step ends)
    l.alloc(x.nd()); // final norm dx
    l.alloc(x.d * e);
    if cfg.arch == Arch::Gpt2 && cfg.bias {
        l.alloc(x.d * e);
    }
    l.free(x.nd()); // dxf
    l.free(x.nd()); // final norm input
    l.free(stats_f);
    if final_xhat > 0 {
        l.free(final_xhat - TENSOR_OVERHEAD_BYTES);
    }
    let (head_peak, at_first_block) = if part.last {
        (l.peak as u64, l.cur.max(0) as u64)
    } else {
        // The output sent and dropped, its gradient received.
        let level = weights + saved + x.nd() + TENSOR_OVERHEAD_BYTES;
        (level, level)
    };
    // Each block from the last: its saved set freed, its gradients added.
    let mut level = at_first_block as i128;
    let mut in_blocks_bwd = 0;
    for k in kinds.iter().rev() {
        in_blocks_bwd = in_blocks_bwd.max(k.bwd_peak_from(level.max(0) as u64));
        level += k.recompute_net + k.bwd_net;
    }
    let after_blocks = level.max(0) as u64;
    // The embedding's gradient: GPT-2's positions (padded to block_size) and tokens.
    let mut l = Ledger::at(after_blocks);
    if cfg.arch == Arch::Gpt2 {
        let bs = cfg.block_size as u64;
        l.alloc(t * x.d * e);
        if t < bs {
            l.alloc((bs - t) * x.d * e);
            l.alloc(bs * x.d * e);
            l.free(t * x.d * e);
            l.free((bs - t) * x.d * e);
        }
    }
    l.scratch(x.n * 4);
    let vd = x.v * x.d * e;
    if !cfg.tie_embeddings || !part.last {
        // Without the head here, the tied embedding's gradient starts at the embedding too.
        l.alloc(vd);
    } else if hf {
        // PyTorch: the dense embedding gradient, then head + embedding into a new buffer.
        l.alloc(vd);
        l.alloc(vd);
        l.free(vd);
        l.free(vd);
    }
    let embed_peak = if part.first { l.peak as u64 } else { 0 };
    let backward_peak = head_peak.max(in_blocks_bwd).max(embed_peak);
    terms.push(("backward peak: at the head".into(), head_peak));
    terms.push(("backward peak: in the blocks".into(), in_blocks_bwd));
    terms.push(("backward peak: at the embedding".into(), embed_peak));

    let gradients = params * e + n_tensors * TENSOR_OVERHEAD_BYTES;
    terms.push(("gradients".into(), gradients));
    let (optimizer_state_bytes, optimizer_peak_bytes) = match opts.optimizer {
        None => (None, None),
        Some(Optimizer::Sgd) => (Some(0), Some(weights + gradients)),
        Some(Optimizer::AdamW) => {
            let state = 2 * (params * e + n_tensors * TENSOR_OVERHEAD_BYTES);
            // _foreach_sqrt: one buffer per parameter, all at once.
            let sqrt = params * e + n_tensors * TENSOR_OVERHEAD_BYTES;
            (Some(state), Some(weights + gradients + state + sqrt))
        }
    };
    LeanPrediction {
        weights_bytes: weights,
        saved_bytes: saved,
        forward_peak_bytes: forward_peak,
        backward_peak_bytes: backward_peak,
        gradients_bytes: gradients,
        peak_bytes: forward_peak.max(backward_peak),
        optimizer_state_bytes,
        optimizer_peak_bytes,
        terms,
    }
}

/// f32 bytes: master weights, their gradients, the residual stream and the norms under AMP.
const F32: u64 = 4;

/// The AMP step's ledger (`train::amp`): sizes in elements, `h` the half dtype's bytes.
struct Amp<'a> {
    x: &'a Dims,
    h: u64,
    l: Ledger,
    /// Weights stored `[in, out]` (GPT-2's Conv1D) rather than `[out, in]`.
    in_out: bool,
}

impl Amp<'_> {
    /// `amp::matmul` `[m, k] @ [k, n]`: both operands widened, the f32 product, then narrowed.
    fn mm(&mut self, m: u64, n: u64, k: u64) {
        self.l.alloc(m * k * F32);
        self.l.alloc(k * n * F32);
        self.l.mm(m, n, k, false, false, F32);
        self.l.free(m * k * F32);
        self.l.free(k * n * F32);
        self.l.alloc(m * n * self.h);
        self.l.free(m * n * F32);
    }
    /// A half tensor of `elems` widened into a new f32 buffer, then the half one freed.
    fn widen_replace(&mut self, elems: u64) {
        self.l.alloc(elems * F32);
        self.l.free(elems * self.h);
    }
    /// An f32 tensor narrowed into a new half buffer, then the f32 one freed.
    fn narrow_replace(&mut self, elems: u64) {
        self.l.alloc(elems * self.h);
        self.l.free(elems * F32);
    }
    /// `Lin::fwd_amp` on `[N, i]` -> `[N, o]`: the weight's half copy (kept), the product, the
    /// bias's half copy for the in-place add.
    fn lin_fwd(&mut self, i: u64, o: u64, bias: bool) {
        self.l.alloc(i * o * self.h);
        self.mm(self.x.n, o, i);
        if bias {
            self.l.alloc(o * self.h);
            self.l.free(o * self.h);
        }
    }
    /// `amp::sum_rows` over `[N, c]`: a block of rows widened, its sum, accumulated in f32.
    fn sum_rows(&mut self, c: u64) {
        let n = self.x.n;
        let rows = n.min(super::amp::SUM_ROWS as u64);
        self.l.alloc(rows * c * F32);
        self.l.alloc(c * F32); // the accumulator: the bias's gradient
        self.l.free(rows * c * F32);
        if n > rows {
            self.l.alloc(rows * c * F32);
            self.l.alloc(c * F32);
            self.l.free(rows * c * F32);
            self.l.free(c * F32);
        }
    }
    /// `Lin::bwd_amp` from the half input `[N, i]` and dy `[N, o]` (f32 when `dy_f32`, narrowed
    /// first): dW in half then its f32 copy (the gradient), db, dx in half; the weight's half
    /// copy and the narrowed dy freed.
    fn lin_bwd(&mut self, i: u64, o: u64, bias: bool, dy_f32: bool) {
        let n = self.x.n;
        if dy_f32 {
            self.l.alloc(n * o * self.h);
        }
        if self.in_out {
            self.mm(i, o, n); // xᵀ @ dy
        } else {
            self.mm(o, i, n); // dyᵀ @ x
        }
        self.widen_replace(i * o);
        if bias {
            self.sum_rows(o);
        }
        self.mm(n, i, o);
        self.l.free(i * o * self.h);
        if dy_f32 {
            self.l.free(n * o * self.h);
        }
    }
    /// A LayerNorm's forward (y, mean, rstd in f32), its output narrowed for the next map.
    fn layer_norm_fwd_narrowed(&mut self) {
        let (n, d) = (self.x.n, self.x.d);
        self.l.alloc(n * d * F32);
        self.l.alloc(n * STAT);
        self.l.alloc(n * STAT);
        self.narrow_replace(n * d);
    }
    /// The step's norm forward (LayerNorm: y, mean, rstd; RMSNorm: y, rstd, HF's x̂; all f32),
    /// its output narrowed for the next map.
    fn norm_fwd_narrowed(&mut self, rms: bool) {
        if !rms {
            return self.layer_norm_fwd_narrowed();
        }
        let (n, d) = (self.x.n, self.x.d);
        self.l.alloc(n * d * F32);
        self.l.alloc(n * STAT);
        self.l.alloc(n * d * STAT);
        self.narrow_replace(n * d);
    }
    /// An RMSNorm's backward from an f32 dy: dx, dw, then dy, the input, rstd and x̂ freed.
    fn rms_norm_bwd(&mut self) {
        let (n, d) = (self.x.n, self.x.d);
        self.l.alloc(n * d * F32);
        self.l.alloc(d * F32);
        self.l.free(n * d * F32); // dy
        self.l.free(n * d * F32); // input
        self.l.free(n * STAT);
        self.l.free(n * d * STAT); // x̂
    }
    /// A LayerNorm's backward from a half dy: widened, dx, dw, db (f32), then dy, the saved
    /// input and statistics freed.
    fn layer_norm_bwd(&mut self, bias: bool) {
        let (n, d) = (self.x.n, self.x.d);
        self.widen_replace(n * d);
        self.l.alloc(n * d * F32);
        self.l.alloc(d * F32);
        if bias {
            self.l.alloc(d * F32);
        }
        self.l.free(n * d * F32); // dy
        self.l.free(n * d * F32); // input
        self.l.free(2 * n * STAT);
    }
}

/// GPT-2's block under AMP: its saved set by name (`gpt2::AmpSaved` and the maps' weight copies).
fn amp_gpt2_saved(cfg: &ModelConfig, x: &Dims, h: u64) -> Vec<(&'static str, u64)> {
    let (n, d, ff) = (x.n, x.d, x.ff);
    let parts = gelu_parts(cfg, &LeanOptions::default());
    let mut v = vec![
        ("block input x (ln_1's input) [N, d] f32", n * d * F32),
        ("ln_1 mean, rstd [N] f32", 2 * n * STAT),
        (
            "ln_1 output narrowed (c_attn's input) [N, d] half",
            n * d * h,
        ),
        ("c_attn weight's half copy [d, 3d]", 3 * d * d * h),
        ("q, v (sdpa's copies) [B, T, H, hd] half", 2 * n * d * h),
        (
            "qkv projection (sdpa's view of k keeps it) [N, 3d] half",
            3 * n * d * h,
        ),
        ("attention output (c_proj's input) [N, d] half", n * d * h),
        ("attention lse [B, H, T] f32", x.lse()),
        ("attention c_proj weight's half copy [d, d]", d * d * h),
        ("x + attention (ln_2's input) [N, d] f32", n * d * F32),
        ("ln_2 mean, rstd [N] f32", 2 * n * STAT),
        ("ln_2 output narrowed (c_fc's input) [N, d] half", n * d * h),
        ("c_fc weight's half copy [d, ff]", d * ff * h),
        ("GELU input [N, ff] half", n * ff * h),
        ("GELU output (c_proj's input) [N, ff] half", n * ff * h),
        ("MLP c_proj weight's half copy [ff, d]", ff * d * h),
    ];
    if parts > 0 {
        v.push((
            "composed GELU's intermediates (tanh, ½x, 1 + tanh…) [N, ff] half each",
            parts * n * ff * h,
        ));
    }
    v
}

/// GPT-2's block forward under AMP (`gpt2::block_fwd_amp`): (peak above start, net change).
fn amp_gpt2_forward(cfg: &ModelConfig, x: &Dims, h: u64) -> (u64, i128) {
    let mut a = Amp {
        x,
        h,
        l: Ledger::at(0),
        in_out: cfg.arch == Arch::Gpt2,
    };
    let (n, d, ff, b) = (x.n, x.d, x.ff, cfg.bias);
    a.layer_norm_fwd_narrowed(); // ln_1
    a.lin_fwd(d, 3 * d, b); // qkv
    for _ in 0..3 {
        a.l.alloc(n * d * h); // q, k, v copied out of qkv
    }
    for _ in 0..3 {
        a.l.alloc(n * d * F32); // widened for the kernel
    }
    a.l.alloc(n * d * F32); // o
    a.l.scratch(x.attn_lse_bth() + x.threads * x.attn_fwd_thread());
    a.l.alloc(x.lse());
    a.l.scratch(x.attn_lse_bth());
    a.l.free(3 * n * d * F32);
    a.narrow_replace(n * d); // o
    a.l.free(n * d * h); // the k copy (qkv stays)
    a.lin_fwd(d, d, b); // attention c_proj
    a.widen_replace(n * d); // its output, then x1 in place
    a.layer_norm_fwd_narrowed(); // ln_2
    a.lin_fwd(d, ff, b); // c_fc: the GELU input
    a.l.alloc(n * ff * F32); // widened
    a.l.alloc(n * ff * F32); // GELU
    a.narrow_replace(n * ff);
    for _ in 0..gelu_parts(cfg, &LeanOptions::default()) {
        a.l.alloc(n * ff * F32);
        a.narrow_replace(n * ff);
    }
    a.l.free(n * ff * F32); // widened input
    a.lin_fwd(ff, d, b); // MLP c_proj
    a.widen_replace(n * d); // its output, then y in place
    a.l.result(0)
}

/// GPT-2's block backward under AMP (`gpt2::block_bwd_amp`): (peak above start, net change).
fn amp_gpt2_backward(cfg: &ModelConfig, x: &Dims, h: u64) -> (u64, i128) {
    let mut a = Amp {
        x,
        h,
        l: Ledger::at(0),
        in_out: cfg.arch == Arch::Gpt2,
    };
    let (n, d, ff, b) = (x.n, x.d, x.ff, cfg.bias);
    a.lin_bwd(ff, d, b, true); // MLP c_proj: dg
    a.l.free(n * ff * h); // g
    a.l.alloc(n * ff * F32); // h widened
    a.l.alloc(n * ff * F32); // dg widened
    a.l.alloc(n * ff * F32); // dh
    a.l.free(2 * n * ff * F32);
    a.narrow_replace(n * ff);
    a.l.free(n * ff * h); // dg
    a.l.free(n * ff * h); // h
    for _ in 0..gelu_parts(cfg, &LeanOptions::default()) {
        a.l.free(n * ff * h);
    }
    a.lin_bwd(d, ff, b, false); // c_fc: dln2
    a.l.free(n * ff * h); // dh
    a.l.free(n * d * h); // ln2
    a.layer_norm_bwd(b); // ln_2 (x1 freed)
    a.l.free(n * d * F32); // its dx added into dy
    a.lin_bwd(d, d, b, true); // attention c_proj: d_o
    a.l.alloc(n * d * h); // k copied out of qkv again
    for _ in 0..5 {
        a.l.alloc(n * d * F32); // q, k, v, o, d_o widened
    }
    for _ in 0..3 {
        a.l.alloc(n * d * F32); // dq, dk, dv
    }
    a.l.scratch(x.attn_bwd_scratch());
    a.l.free(5 * n * d * F32);
    for _ in 0..3 {
        a.narrow_replace(n * d);
    }
    a.l.free(2 * n * d * h); // d_o, k
    a.l.free(2 * n * d * h); // q, v
    a.l.free(3 * n * d * h); // qkv
    a.l.free(n * d * h); // o
    a.l.free(x.lse());
    a.l.alloc(3 * n * d * h); // dqkv
    a.l.free(3 * n * d * h); // dq, dk, dv
    a.lin_bwd(d, 3 * d, b, false); // c_attn: dln1
    a.l.free(3 * n * d * h); // dqkv
    a.l.free(n * d * h); // ln1
    a.layer_norm_bwd(b); // ln_1 (x freed)
    a.l.free(n * d * F32); // its dx added into dx1
    a.l.result(0)
}

/// The plain Llama layer under AMP: its saved set by name (`llama::AmpSaved` and the maps'
/// weight copies).
fn amp_llama_saved(x: &Dims, h: u64) -> Vec<(&'static str, u64)> {
    let (n, d, ff) = (x.n, x.d, x.ff);
    let (q, kv) = (x.h * x.hd, x.hkv * x.hd);
    vec![
        ("block input x (input_layernorm's input) [N, d] f32", n * d * F32),
        ("input_layernorm rstd [N] f32", n * STAT),
        ("input_layernorm's normalized input x̂ [N, d] f32", n * d * STAT),
        (
            "input_layernorm output narrowed, once per map (q, k, v inputs) [N, d] half ×3",
            3 * n * d * h,
        ),
        (
            "q, k, v, o weights' half copies [q + 2kv + q, d]",
            (2 * q + 2 * kv) * d * h,
        ),
        ("q after RoPE (sdpa's half copy) [B, T, H, hd]", n * q * h),
        ("k after RoPE (sdpa's half copy), v [B, T, Hkv, hd] half", 2 * n * kv * h),
        ("attention output (o_proj's input) [N, H·hd] half", n * q * h),
        ("attention lse [B, H, T] f32", x.lse()),
        ("x + attention (post_attention_layernorm's input) [N, d] f32", n * d * F32),
        ("post_attention_layernorm rstd [N] f32", n * STAT),
        ("post_attention_layernorm's normalized input x̂ [N, d] f32", n * d * STAT),
        (
            "post_attention_layernorm output narrowed, once per map (gate, up inputs) [N, d] half ×2",
            2 * n * d * h,
        ),
        ("gate, up, down weights' half copies [3 · ff, d]", 3 * ff * d * h),
        ("gate and up (activation inputs) [N, ff] half", 2 * n * ff * h),
        ("act(gate) [N, ff] half", n * ff * h),
        ("gated product (down_proj's input) [N, ff] half", n * ff * h),
    ]
}

/// Tensors in `amp_llama_saved` (each with a header).
const AMP_LLAMA_SAVED_TENSORS: u64 = 27;

/// The plain Llama layer's forward under AMP (`llama::block_fwd_amp`).
fn amp_llama_forward(cfg: &ModelConfig, x: &Dims, h: u64) -> (u64, i128) {
    let mut a = Amp {
        x,
        h,
        l: Ledger::at(0),
        in_out: false,
    };
    let (n, d, ff) = (x.n, x.d, x.ff);
    let (q, kv) = (x.h * x.hd, x.hkv * x.hd);
    let (qkv_b, mlp_b) = (cfg.has_qkv_bias(), cfg.mlp_bias);
    a.l.alloc(n * d * F32); // input_layernorm output
    a.l.alloc(n * STAT);
    a.l.alloc(n * d * STAT); // x̂
    for out in [q, kv, kv] {
        a.l.alloc(n * d * h); // the map's own narrowed input
        a.lin_fwd(d, out, qkv_b);
    }
    a.l.free(n * d * F32); // the f32 norm output
    for w in [q, kv] {
        a.l.alloc(n * w * F32); // widened
        a.l.alloc(n * w * F32); // rotated
        a.l.free(n * w * F32);
        a.narrow_replace(n * w);
        a.l.free(n * w * h); // the projection's output
    }
    a.l.alloc(n * q * F32); // q, k, v widened for the kernel
    a.l.alloc(n * kv * F32);
    a.l.alloc(n * kv * F32);
    a.l.alloc(n * q * F32); // o
    a.l.scratch(x.attn_lse_bth() + x.threads * x.attn_fwd_thread());
    a.l.alloc(x.lse());
    a.l.scratch(x.attn_lse_bth());
    a.l.free((q + 2 * kv) * n * F32);
    a.narrow_replace(n * q);
    a.lin_fwd(q, d, cfg.bias); // o_proj
    a.widen_replace(n * d); // its output, then x1 in place
    a.l.alloc(n * d * F32); // post_attention_layernorm output
    a.l.alloc(n * STAT);
    a.l.alloc(n * d * STAT); // x̂
    for _ in 0..2 {
        a.l.alloc(n * d * h); // gate's, up's narrowed input
        a.lin_fwd(d, ff, mlp_b);
    }
    a.l.free(n * d * F32);
    for _ in 0..2 {
        a.l.alloc(n * ff * F32); // gate and up widened
    }
    a.l.alloc(n * ff * F32); // gated product
    a.l.free(2 * n * ff * F32);
    a.narrow_replace(n * ff);
    a.l.alloc(n * ff * F32); // gate widened
    a.l.alloc(n * ff * F32); // act(gate)
    a.l.free(n * ff * F32);
    a.narrow_replace(n * ff);
    a.lin_fwd(ff, d, mlp_b); // down
    a.widen_replace(n * d); // its output, then y in place
    a.l.result(0)
}

/// The plain Llama layer's backward under AMP (`llama::block_bwd_amp`).
fn amp_llama_backward(cfg: &ModelConfig, x: &Dims, h: u64) -> (u64, i128) {
    let mut a = Amp {
        x,
        h,
        l: Ledger::at(0),
        in_out: false,
    };
    let (n, d, ff) = (x.n, x.d, x.ff);
    let (q, kv) = (x.h * x.hd, x.hkv * x.hd);
    let (qkv_b, mlp_b) = (cfg.has_qkv_bias(), cfg.mlp_bias);
    // A map's half input gradient widened and summed into the f32 one.
    let add_widened = |a: &mut Amp, first: bool| {
        a.widen_replace(n * d);
        if !first {
            a.l.free(n * d * F32);
        }
    };
    a.lin_bwd(ff, d, mlp_b, true); // down: dh
    a.l.free(n * ff * h); // h
    for _ in 0..3 {
        a.l.alloc(n * ff * F32); // gate, up, dh widened
    }
    a.l.alloc(n * ff * F32); // dgate
    a.l.alloc(n * ff * F32); // dup
    a.l.free(3 * n * ff * F32);
    a.narrow_replace(n * ff);
    a.narrow_replace(n * ff);
    a.l.free(4 * n * ff * h); // dh, gate, up, act(gate)
    for first in [true, false] {
        a.lin_bwd(d, ff, mlp_b, false); // gate, then up
        add_widened(&mut a, first);
        a.l.free(n * ff * h); // dgate / dup
        a.l.free(n * d * h); // its input
    }
    a.rms_norm_bwd(); // post_attention_layernorm (x1 freed)
    a.l.free(n * d * F32); // its dx added into dy
    a.lin_bwd(q, d, cfg.bias, true); // o_proj: d_o
    a.l.alloc(n * q * F32); // q, k, v, o, d_o widened
    a.l.alloc(n * kv * F32);
    a.l.alloc(n * kv * F32);
    a.l.alloc(n * q * F32);
    a.l.alloc(n * q * F32);
    a.l.alloc(n * q * F32); // dq, dk, dv
    a.l.alloc(n * kv * F32);
    a.l.alloc(n * kv * F32);
    a.l.scratch(x.attn_bwd_scratch());
    a.l.free((3 * q + 2 * kv) * n * F32);
    for w in [q, kv, kv] {
        a.narrow_replace(n * w);
    }
    a.l.free((3 * q + 2 * kv) * n * h); // d_o, q, k, v, o
    a.l.free(x.lse());
    for (i, (w, out)) in [(q, q), (kv, kv), (0, kv)].into_iter().enumerate() {
        if w > 0 {
            // through RoPE: widened, rotated back, narrowed, the incoming gradient freed
            a.l.alloc(n * w * F32);
            a.l.alloc(n * w * F32);
            a.l.free(n * w * F32);
            a.narrow_replace(n * w);
            a.l.free(n * w * h);
        }
        a.lin_bwd(d, out, qkv_b, false);
        add_widened(&mut a, i == 0);
        a.l.free(n * out * h); // dq / dk / dv
        a.l.free(n * d * h); // its input
    }
    a.rms_norm_bwd(); // input_layernorm (x freed)
    a.l.free(n * d * F32); // its dx added into dx1
    a.l.result(0)
}

/// The half copies of one block's weight matrices, headers included (GPT-2: c_attn, c_proj,
/// c_fc, the MLP's c_proj; Llama: q, k, v, o, gate, up, down).
fn amp_weight_copies(cfg: &ModelConfig, x: &Dims, h: u64) -> u64 {
    let (d, ff) = (x.d, x.ff);
    let (q, kv) = (x.h * x.hd, x.hkv * x.hd);
    match cfg.arch {
        Arch::Gpt2 => (4 * d * d + 2 * d * ff) * h + 4 * TENSOR_OVERHEAD_BYTES,
        Arch::Llama => ((2 * q + 2 * kv) * d + 3 * ff * d) * h + 7 * TENSOR_OVERHEAD_BYTES,
    }
}

/// Tensors in `amp_gpt2_saved` (each with a header).
fn amp_gpt2_saved_tensors(cfg: &ModelConfig) -> u64 {
    19 + gelu_parts(cfg, &LeanOptions::default())
}

/// The closed form of the whole step under AMP (GPT-2 and the plain Llama layer;
/// `train::supported` refuses the rest): f32 master weights, gradients and optimizer states; the
/// saved set autocast keeps.
fn predict_amp(cfg: &ModelConfig, step: Step, opts: &LeanOptions, h: u64) -> LeanPrediction {
    let (params, n_tensors) = param_counts(cfg);
    let (b, t) = (step.batch as u64, step.seq as u64);
    let x = dims(cfg, step, false);
    let (n, d, v) = (x.n, x.d, x.v);
    let layers = cfg.n_layer as u64;
    let mut terms: Vec<(String, u64)> = Vec::new();
    let weights = params * F32 + n_tensors * (VARMAP_BYTES_PER_TENSOR + LEAN_BYTES_PER_TENSOR);
    terms.push(("weights (f32 master)".into(), weights));

    let rms = cfg.arch == Arch::Llama;
    let (saved_block, tensors, (fwd_peak, _), (bwd_peak, bwd_net)) = match cfg.arch {
        Arch::Gpt2 => (
            amp_gpt2_saved(cfg, &x, h),
            amp_gpt2_saved_tensors(cfg),
            amp_gpt2_forward(cfg, &x, h),
            amp_gpt2_backward(cfg, &x, h),
        ),
        Arch::Llama => (
            amp_llama_saved(&x, h),
            AMP_LLAMA_SAVED_TENSORS,
            amp_llama_forward(cfg, &x, h),
            amp_llama_backward(cfg, &x, h),
        ),
    };
    for (name, bytes) in &saved_block {
        terms.push((format!("per block: {name}"), *bytes));
    }
    let kept = saved_block.iter().map(|(_, v)| v).sum::<u64>() + tensors * TENSOR_OVERHEAD_BYTES;
    let rope = if rms {
        2 * (t * (cfg.rotary_dim as u64 / 2) * STAT + TENSOR_OVERHEAD_BYTES)
    } else {
        0
    };

    let head_saved = [
        ("final norm input [N, d] f32", n * d * F32),
        (
            "final norm statistics [N] f32",
            if rms { n * STAT } else { 2 * n * STAT },
        ),
        (
            "final norm's normalized input x̂ [N, d] f32",
            u64::from(rms) * n * d * STAT,
        ),
        (
            "final norm output narrowed (head input) [N, d] half",
            n * d * h,
        ),
        ("head weight's half copy [V, d]", v * d * h),
        ("logits [N, V] half", n * v * h),
        ("log-probabilities [N, V] f32", n * v * STAT),
        ("loss lse [N] f32", n * STAT),
        ("targets [N] u32", n * 4),
        ("RoPE cos/sin tables", rope),
    ];
    for (name, bytes) in head_saved {
        terms.push((name.to_string(), bytes));
    }
    // Eight tensors and the RMSNorm's x̂ (the RoPE tables' headers are in their term).
    let head_bytes = head_saved.iter().map(|(_, v)| v).sum::<u64>()
        + (8 + u64::from(rms)) * TENSOR_OVERHEAD_BYTES;
    // Checkpointed blocks keep their input for the backward; their weight copies stay in
    // autocast's cast cache until the forward ends, then the recompute casts again.
    let ckpt = opts.checkpoint == Checkpoint::Blocks;
    let input = n * d * F32 + TENSOR_OVERHEAD_BYTES;
    let copies = amp_weight_copies(cfg, &x, h);
    let (kept_fwd, kept_bwd) = if ckpt {
        (input + copies, input)
    } else {
        (kept, kept)
    };
    if ckpt {
        terms.push((
            "per block, checkpointed: its input, and until the forward ends its weights' half copies"
                .into(),
            kept_fwd,
        ));
    }
    let blocks_kept = layers * kept_bwd;
    let saved = blocks_kept + head_bytes;
    terms.push((
        format!("saved: {layers} blocks ({blocks_kept}) + head/loss"),
        saved,
    ));

    // --- forward: the blocks, then the head and the loss
    let start = weights + rope + n * d * F32 + TENSOR_OVERHEAD_BYTES; // the embedding's output
    let mut in_blocks = start;
    let mut level = start;
    for _ in 0..layers {
        in_blocks = in_blocks.max(level + fwd_peak);
        level += kept_fwd;
    }
    let mut a = Amp {
        x: &x,
        h,
        l: Ledger::at(level),
        in_out: cfg.arch == Arch::Gpt2,
    };
    a.norm_fwd_narrowed(rms); // the final norm
    a.l.alloc(v * d * h); // the head's half copy
    a.mm(n, v, d); // logits
    a.l.alloc(n * 4); // targets
    a.l.scratch(b * t * 4 + b * 24); // host copy of the ids
    a.l.alloc(n * v * F32); // the logits widened for the loss
    a.l.alloc(n * STAT); // lse
    a.l.alloc(n * v * STAT); // log-probabilities
    a.l.free(n * v * F32);
    let at_loss = a.l.peak as u64;
    let forward_peak = in_blocks.max(at_loss);
    terms.push(("forward peak: in the blocks".into(), in_blocks));
    terms.push(("forward peak: at the loss".into(), at_loss));

    // --- backward: the loss and the head
    a.l = Ledger::at(weights + saved);
    a.l.alloc(n * v * STAT); // the log-probabilities' gradient
    a.l.alloc(n * v * F32); // the logits widened: their gradient, in place
    a.l.free(n * v * STAT);
    a.l.free(n * v * STAT); // log-probabilities
    a.l.free(n * STAT); // lse
    a.narrow_replace(n * v); // dlogits
    a.mm(v, d, n); // head dW
    a.widen_replace(v * d); // its f32 gradient
    a.l.free(n * d * h); // head input
    a.mm(n, d, v); // dxf
    a.l.free(n * v * h); // dlogits
    a.l.free(v * d * h); // the head's half copy
    if rms {
        a.widen_replace(n * d);
        a.rms_norm_bwd();
    } else {
        a.layer_norm_bwd(cfg.bias); // its input freed
    }
    let head_peak = a.l.peak as u64;
    let mut level = a.l.cur.max(0) as u64;
    let mut in_blocks_bwd = 0;
    for _ in 0..layers {
        if ckpt {
            // the block's forward again, its output dropped and its saved set kept
            in_blocks_bwd = in_blocks_bwd.max(level + fwd_peak);
            level += kept - input;
        }
        in_blocks_bwd = in_blocks_bwd.max(level + bwd_peak);
        level = (level as i128 + bwd_net).max(0) as u64;
    }
    // --- the embedding's gradient (f32): GPT-2's positions, then the tokens'
    let mut l = Ledger::at(level);
    let bs = cfg.block_size as u64;
    if !rms {
        l.alloc(t * d * F32);
    }
    if !rms && t < bs {
        l.alloc((bs - t) * d * F32);
        l.alloc(bs * d * F32);
        l.free(t * d * F32);
        l.free((bs - t) * d * F32);
    }
    l.scratch(n * 4);
    let vd = v * d * F32;
    if !cfg.tie_embeddings {
        l.alloc(vd);
    } else {
        l.alloc(vd);
        l.alloc(vd);
        l.free(vd);
        l.free(vd);
    }
    let embed_peak = l.peak as u64;
    let backward_peak = head_peak.max(in_blocks_bwd).max(embed_peak);
    terms.push(("backward peak: at the head".into(), head_peak));
    terms.push(("backward peak: in the blocks".into(), in_blocks_bwd));
    terms.push(("backward peak: at the embedding".into(), embed_peak));

    let gradients = params * F32 + n_tensors * TENSOR_OVERHEAD_BYTES;
    terms.push(("gradients (f32)".into(), gradients));
    let (optimizer_state_bytes, optimizer_peak_bytes) = match opts.optimizer {
        None => (None, None),
        Some(Optimizer::Sgd) => (Some(0), Some(weights + gradients)),
        Some(Optimizer::AdamW) => {
            let state = 2 * gradients;
            (Some(state), Some(weights + gradients + state + gradients))
        }
    };
    LeanPrediction {
        weights_bytes: weights,
        saved_bytes: saved,
        forward_peak_bytes: forward_peak,
        backward_peak_bytes: backward_peak,
        gradients_bytes: gradients,
        peak_bytes: forward_peak.max(backward_peak),
        optimizer_state_bytes,
        optimizer_peak_bytes,
        terms,
    }
}
