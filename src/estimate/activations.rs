//! Memory of one training step beyond the weights, predicted from the mechanism: what candle
//! 0.11.1 allocates and keeps, op by op, for *our* forward (src/model) and candle's backward.
//!
//! # Why a replay and not a single formula
//! The forward is easy to write in closed form (see [`closed_form_kept`]): autograd keeps every
//! op output, so the retained bytes are a sum of shapes. The backward is not: candle's
//! `Tensor::backward` (candle-core-0.11.1/src/backprop.rs) keeps the whole forward graph alive
//! (the loss owns it), and a gradient that was computed *from a forward tensor* (e.g.
//! `lhs.t().matmul(&grad)` for a weight, `grad.mul(lhs)` for a RoPE table) is itself tracked, so
//! the `GradStore` entry that accumulates it (`zeros_like(..).add(..)`) pins that zeros tensor,
//! the partial gradient and the upstream node's gradient until the store is dropped. Which
//! gradients are alive at the same moment depends on the order of `sorted_nodes` (a reverse
//! post-order DFS) and on Rust's drop order inside each backward rule. So the backward is
//! *replayed on shapes*: a miniature tensor type with reference-counted storages mirrors
//! candle's `Arc` semantics (views share storage, ops hold their inputs, `detach` shares storage,
//! `to_dtype` to the same dtype is a clone), the forward is our model's op sequence, and the
//! backward rules are ported line by line from backprop.rs. Every allocation goes through a
//! counter that records the peak and which component held what at the peak. Nothing is
//! fitted; the constants below are struct sizes and CPU cache sizes, each cited.
//!
//! # What the replay accounts for (each was seen in the allocator's trace first)
//! - Everything the forward allocates stays alive through the whole backward (the loss owns the
//!   graph), so the backward peak sits on top of the after-forward level.
//! - backprop.rs binds `grads.remove(node)` and *shadows* it with `grad.detach()`: the tracked
//!   original, with every tensor its history pins, lives until the end of that node's iteration.
//!   At the loss this is what stacks ~7 [B·(T−1), V] f32 tensors on top of the 4 the forward
//!   keeps (the dominant term for small models with large vocabularies).
//! - Weight gradients of GPT-2's `x.matmul(W)` are tracked (`lhs.t().matmul(grad)` involves a
//!   forward tensor): each pins its zeros, its partial product and the node gradient `[B·T,
//!   out]` until the store is dropped. Llama's `W.t()` goes through a Transpose node, which
//!   drops that history once processed.
//! - Gradients reach untracked broadcast inputs (the causal mask, RoPE's cos/sin): candle
//!   creates and keeps them in the store, never processes them.
//! - bf16 matmul widens both *whole storages* to f32 and multiplies into an f32 buffer
//!   (cpu_backend `matmul`), e.g. the logits gradient `[B·T, V]` at 4 B per element.
//! - gemm's thread-local L2 slab (gemm-common gemm.rs:59) per thread that ran an unpacked gemm.
//!
//! Not modelled: gemm's transient packing buffers (measured ≤ 6.3 MB on GPT-2's head at 4,096
//! rows, < 0.5% of that peak) and hash-map/`Vec` bookkeeping of the backward (kilobytes).
//!
//! The replay is cheap (shapes only, no data): Llama-3.1-405B's 126 layers replay in well under a
//! second, so it also serves as the preflight estimate before a run.

use crate::config::{Arch, ModelConfig};
use crate::dtype::TrainDtype;
use serde::Serialize;
use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap};
use std::rc::Rc;

pub use crate::config::Step;

/// Bytes of one `Arc<Tensor_>` allocation (id, layout, op, dtype, device), excluding the shape
/// and stride vectors. Measured with a counting allocator on candle 0.11.1: a rank-2 view
/// (`t()`) allocates 192 B = 160 + 2·16, a rank-4 view 224 B = 160 + 4·16.
const TENSOR_HEADER_BYTES: u64 = 160;
/// Shape and stride vectors: 8 B per dimension each (same measurement).
const BYTES_PER_DIM: u64 = 16;
/// `Arc<RwLock<Storage>>` around a fresh buffer: a fresh rank-2 tensor allocates 264 B beyond
/// its data, i.e. 72 B more than a view (same measurement).
const STORAGE_HEADER_BYTES: u64 = 72;
/// Per-parameter bookkeeping of the VarMap beyond the tensor's data (name `String`, `Var`, map
/// slot, tensor and storage headers): measured 330–340 B per tensor on the fixtures and
/// baby-gpt (verify's "weights: allocated bytes" check); 336 B is the baby-gpt figure
/// (13,941,648 − 4 · 3,481,088) / 52 tensors.
const VARMAP_BYTES_PER_TENSOR: u64 = 336;
/// `measure::run::probe_for` runs one gemm on every thread before the baseline, so every
/// thread's L2 slab already exists and none is allocated during the step. The slab rules below
/// stay for a process that did not warm its threads.
const GEMM_SLABS_WARMED: bool = true;
/// gemm-common 0.19 `DEFAULT_THREADING_THRESHOLD` (gemm.rs:109): a gemm whose
/// m · n_chunk · k_chunk is below this runs on the calling thread, otherwise on the rayon pool.
const GEMM_THREADING_THRESHOLD: u64 = 48 * 48 * 256;
/// gemm-common 0.19 `kernel_params` (cache.rs:514): the depth block kc is at least 512 (and at
/// most k); with a 32 KiB, 8-way L1 the `max(512)` is what wins.
const GEMM_KC: u64 = 512;
/// gemm-common 0.19 `CACHE_INFO_DEFAULT`'s L2 (cache.rs:402) when sysfs says nothing: 256 KiB.
const DEFAULT_L2_BYTES: u64 = 256 * 1024;
/// AdamW (candle-nn-0.11.1/src/optim.rs:169-178): θ, m and v are `Var`s, so every expression
/// of the update is *tracked* and the final `next_theta` holds its whole history until the end of
/// the iteration: m·β1, g·(1−β1), next_m, v·β2, g²·(1−β2), next_v, m̂, v̂, θ·(1−lr·λ), √v̂,
/// √v̂+ε, the quotient, its ·lr, next_theta = 14 tensors the size of the parameter (g² itself is
/// untracked and freed early). The largest parameter sets the peak.
const ADAMW_TEMPORARIES: u64 = 14;

// ---------------------------------------------------------------------------------------------
// The breakdown a reader sees.

/// The predicted memory of one step, all in bytes above the pre-build baseline.
#[derive(Debug, Clone, Serialize)]
pub struct ActivationModel {
    /// Weights as the VarMap holds them (data + per-tensor bookkeeping).
    pub weights_bytes: u64,
    /// Autograd-kept bytes of one transformer layer (closed form, the replay agrees).
    pub per_layer_kept_bytes: u64,
    /// Kept by the embedding (token lookup, positions, first residual input).
    pub embed_kept_bytes: u64,
    /// Kept by the final norm, the head (logits) and the loss (its f32 log-softmax).
    pub head_kept_bytes: u64,
    /// Highest point of forward + loss.
    pub forward_peak_bytes: u64,
    /// After forward: weights + everything kept for backward (+ gemm's per-thread slabs).
    pub after_forward_bytes: u64,
    /// Highest point of the backward.
    pub backward_peak_bytes: u64,
    /// max(forward, backward).
    pub peak_bytes: u64,
    /// Gradients as allocated (one per parameter tensor).
    pub gradients_bytes: u64,
    /// gemm's thread-local L2 packing slabs (one per thread that ran a gemm), included above.
    pub gemm_slab_bytes: u64,
    /// How far the measurement can stray from the prediction because of a scheduling race:
    /// whether pool threads beyond the first steal a gemm task (and so allocate their slab) is
    /// not determined by shapes. ± this many bytes (half a slab per extra pool thread).
    pub gemm_slab_uncertainty_bytes: u64,
    /// The step's peak with `--optimizer adamw`: after backward, AdamW's two moment buffers and
    /// the per-parameter temporaries of its update.
    pub adamw_peak_bytes: u64,
    /// AdamW's first and second moments (parameter dtype).
    pub adamw_state_bytes: u64,
    /// What was alive at the peak, by component: `(name, bytes)`, largest first.
    pub terms: Vec<(String, u64)>,
}

/// Predicted peak bytes of forward + backward above the pre-build baseline.
pub fn predicted_peak(cfg: &ModelConfig, params: u64, step: Step) -> u64 {
    model(cfg, params, step).peak_bytes
}

/// Predicted peak of the step with one AdamW update after backward.
pub fn predicted_adamw_peak(cfg: &ModelConfig, params: u64, step: Step) -> u64 {
    model(cfg, params, step).adamw_peak_bytes
}

/// The full prediction with its breakdown.
pub fn model(cfg: &ModelConfig, params: u64, step: Step) -> ActivationModel {
    if step_bound_bytes(cfg, params, step) > REPLAY_LIMIT_BYTES {
        return ActivationModel::beyond_any_machine();
    }
    let machine = Machine::detect();
    replay(cfg, params, step, machine)
}

/// Above this bound (1 EiB) no machine could run the step, and the replay's u64 byte counters
/// could overflow: the prediction saturates instead.
const REPLAY_LIMIT_BYTES: u128 = 1 << 60;

/// A generous upper bound of everything the step could allocate, in u128: every layer keeping
/// 64 tensors of each width it has, the head 32 [tokens, vocab] f32 tensors, 64 B per parameter.
fn step_bound_bytes(cfg: &ModelConfig, params: u64, step: Step) -> u128 {
    let n = step.batch as u128 * step.seq as u128;
    let experts = cfg.n_experts.max(1) as u128;
    let width = cfg.n_embd as u128
        + cfg.q_dim() as u128
        + cfg.kv_dim() as u128
        + cfg.intermediate_size as u128 * experts
        + cfg.n_head as u128 * step.seq as u128;
    let layers = cfg.n_layer as u128 * n * width * 64 * 4;
    let head = n * cfg.vocab_size as u128 * 32 * 4;
    layers + head + params as u128 * 64
}

impl ActivationModel {
    /// Every figure at u64::MAX: a step no machine can hold (the preflight refuses it).
    fn beyond_any_machine() -> Self {
        let max = u64::MAX;
        ActivationModel {
            weights_bytes: max,
            per_layer_kept_bytes: max,
            embed_kept_bytes: max,
            head_kept_bytes: max,
            forward_peak_bytes: max,
            after_forward_bytes: max,
            backward_peak_bytes: max,
            peak_bytes: max,
            gradients_bytes: max,
            gemm_slab_bytes: 0,
            gemm_slab_uncertainty_bytes: 0,
            adamw_peak_bytes: max,
            adamw_state_bytes: max,
            terms: Vec::new(),
        }
    }
}

/// Closed form of what autograd keeps after the forward, by component, in bytes (data only;
/// tensor headers are a few hundred bytes per op). One term per op output that allocates; views
/// (reshape of contiguous, transpose, narrow, broadcast) are free. `e` is the model dtype's
/// width, `f` the width of norm statistics (f32 for half-precision models).
pub fn closed_form_kept(cfg: &ModelConfig, step: Step) -> Vec<(&'static str, u64)> {
    let (b, t) = (step.batch as u64, step.seq as u64);
    let n = b * t;
    let e = step.dtype.bytes();
    let half = e != 4;
    let d = cfg.n_embd as u64;
    let ff = cfg.intermediate_size as u64;
    let v = cfg.vocab_size as u64;
    let h = cfg.n_head as u64;
    let hd = cfg.head_dim as u64;
    let q = h * hd;
    let kv = cfg.kv_dim() as u64;
    let scores = b * h * t * t * e;
    // LayerNorm: [to f32 copy], centred, squared, normalised, [back to dtype], ·w, (+b)
    let norm_gpt2 = n * d * (3 * 4 + if half { 4 + e } else { 0 } + e + u64::from(cfg.bias) * e);
    // RMSNorm: [to f32], squared, normalised, [back], ·w
    let norm_llama = n * d * (2 * 4 + if half { 4 + e } else { 0 } + e);
    let bias = |on: bool, w: u64| if on { n * w * e } else { 0 };
    // q·kᵀ, scaled, masked, max-shifted, exp, normalised = 6 score-sized tensors
    let attn_core = 6 * scores + 2 * b * h * t * hd * e /* k^T copy, att@v */;
    let mut terms = Vec::new();
    match cfg.arch {
        Arch::Gpt2 => {
            terms.push(("layer.norms", 2 * norm_gpt2));
            let qkv = n * 3 * d * e + bias(cfg.bias, 3 * d);
            // each head split: reshape copy of the narrow + contiguous copy of the transpose
            let split = 3 * 2 * n * d * e;
            let merge = n * d * e;
            let proj = n * d * e + bias(cfg.bias, d);
            terms.push(("layer.attention", qkv + split + attn_core + merge + proj));
            let mlp = n * ff * e + bias(cfg.bias, ff) + n * ff * e + n * d * e + bias(cfg.bias, d);
            terms.push(("layer.mlp", mlp));
            terms.push(("layer.residuals", 2 * n * d * e));
        }
        Arch::Llama => {
            terms.push(("layer.norms", 2 * norm_llama));
            let qb = cfg.has_qkv_bias();
            let proj = n * (q + 2 * kv) * e + bias(qb, q) + 2 * bias(qb, kv);
            let heads = n * (q + 2 * kv) * e; // contiguous copies after the transpose
                                              // RoPE on q and k: neg, cat, x·cos, rot·sin, sum = 5 copies each
            let rope = 5 * n * (q + kv) * e;
            let rep = cfg.n_head / cfg.n_kv_head.max(1);
            let repeat = if rep > 1 { 2 * n * q * e } else { 0 };
            let o = n * q * e + n * d * e + bias(cfg.bias, d);
            terms.push((
                "layer.attention",
                proj + heads + rope + repeat + attn_core + o,
            ));
            let k = cfg.n_experts_per_tok.max(1) as u64;
            let mlp = if cfg.is_moe() {
                let ex = cfg.n_experts as u64;
                // router logits, f32 probs pipeline (~6 [N,E]), gathers, 4·ff + 3·d per routed
                // token, weighted output, index_add per expert
                n * ex * (e + 6 * 4) + n * k * (2 * d * e + 4 * ff * e + 2 * d * e) + ex * n * d * e
            } else {
                n * (4 * ff + d) * e + bias(cfg.mlp_bias, 2 * ff) + bias(cfg.mlp_bias, d)
            };
            terms.push(("layer.mlp", mlp));
            terms.push(("layer.residuals", 2 * n * d * e));
        }
    }
    let l = cfg.n_layer as u64;
    let per_layer: u64 = terms.iter().map(|x| x.1).sum();
    let mut out: Vec<(&'static str, u64)> = terms.into_iter().map(|(k, x)| (k, x * l)).collect();
    out.insert(0, ("layers (all)", per_layer * l));
    let embed = n * d * e * if cfg.arch == Arch::Gpt2 { 2 } else { 1 };
    out.push(("embed", embed));
    let final_norm = if cfg.arch == Arch::Gpt2 {
        norm_gpt2
    } else {
        norm_llama
    };
    let rows = b * (t.saturating_sub(1));
    // logits (dtype) + [f32 copy when bf16/f16 or when the narrow is non-contiguous] +
    // log-softmax's diff, exp and result in f32
    let pred_copy = if half || b > 1 { rows * v * 4 } else { 0 };
    out.push((
        "head",
        final_norm + n * v * e + pred_copy + 3 * rows * v * 4,
    ));
    out
}

// ---------------------------------------------------------------------------------------------
// Machine facts the allocator sees.

/// What the CPU backend's allocations depend on beyond shapes.
#[derive(Debug, Clone, Copy)]
pub struct Machine {
    /// candle's `get_num_threads()`: RAYON_NUM_THREADS or the core count.
    pub threads: u64,
    /// gemm's per-thread L2 slab: L2 bytes / CPUs sharing it (gemm-common cache.rs).
    pub l2_bytes: u64,
    /// f32 SIMD lanes of gemm's kernel (16 with AVX-512F, 8 with FMA/AVX2).
    pub gemm_lanes: u64,
    /// gemm's microkernel rows MR (3 vectors of lanes in gemm-f32's x86 kernels).
    pub gemm_mr: u64,
}

impl Machine {
    pub fn detect() -> Machine {
        let threads = std::env::var("RAYON_NUM_THREADS")
            .ok()
            .and_then(|s| s.parse::<u64>().ok())
            .filter(|&x| x > 0)
            .or_else(|| {
                std::thread::available_parallelism()
                    .ok()
                    .map(|n| n.get() as u64)
            })
            .unwrap_or(1);
        let lanes = if avx512() { 16 } else { 8 };
        Machine {
            threads,
            l2_bytes: l2_from_sysfs().unwrap_or(DEFAULT_L2_BYTES),
            gemm_lanes: lanes,
            gemm_mr: 3 * lanes,
        }
    }
}

fn avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// gemm-common's reading of the L2: `size` of the level-2 Data/Unified cache divided by the
/// number of CPUs in its `shared_cpu_list`.
fn l2_from_sysfs() -> Option<u64> {
    let dir = std::path::Path::new("/sys/devices/system/cpu/cpu0/cache");
    for entry in std::fs::read_dir(dir).ok()? {
        let p = entry.ok()?.path();
        let read = |f: &str| std::fs::read_to_string(p.join(f)).ok();
        if read("level").map(|s| s.trim().to_string()) != Some("2".into()) {
            continue;
        }
        let ty = read("type").unwrap_or_default();
        if !matches!(ty.trim(), "Data" | "Unified") {
            continue;
        }
        let size = read("size")?;
        let s = size.trim();
        let (num, mul) = match s.chars().last()? {
            'K' => (&s[..s.len() - 1], 1u64 << 10),
            'M' => (&s[..s.len() - 1], 1 << 20),
            'G' => (&s[..s.len() - 1], 1 << 30),
            _ => (s, 1),
        };
        let bytes = num.parse::<u64>().ok()? * mul;
        let shared: u64 = read("shared_cpu_list")
            .unwrap_or_default()
            .trim()
            .split(',')
            .filter(|x| !x.is_empty())
            .map(|item| match item.split_once('-') {
                Some((a, b)) => match (a.parse::<u64>(), b.parse::<u64>()) {
                    (Ok(a), Ok(b)) => b + 1 - a,
                    _ => 1,
                },
                None => 1,
            })
            .sum();
        return Some(bytes / shared.max(1));
    }
    None
}

// ---------------------------------------------------------------------------------------------
// The allocation counter.

struct Mem {
    cur: Cell<u64>,
    peak: Cell<u64>,
    live: RefCell<BTreeMap<&'static str, u64>>,
    at_peak: RefCell<BTreeMap<&'static str, u64>>,
    tag: Cell<&'static str>,
}

impl Mem {
    fn alloc(self: &Rc<Self>, bytes: u64) -> Block {
        let tag = self.tag.get();
        let now = self.cur.get() + bytes;
        self.cur.set(now);
        *self.live.borrow_mut().entry(tag).or_insert(0) += bytes;
        if now > self.peak.get() {
            self.peak.set(now);
            self.at_peak.borrow_mut().clone_from(&self.live.borrow());
        }
        Block {
            mem: self.clone(),
            bytes,
            tag,
        }
    }
    fn reset_peak(&self) {
        self.peak.set(self.cur.get());
        self.at_peak.borrow_mut().clone_from(&self.live.borrow());
    }
}

/// One counted allocation; freed on drop, like the `Vec`/`Arc` it stands for.
struct Block {
    mem: Rc<Mem>,
    bytes: u64,
    tag: &'static str,
}

impl Drop for Block {
    fn drop(&mut self) {
        self.mem.cur.set(self.mem.cur.get() - self.bytes);
        if let Some(x) = self.mem.live.borrow_mut().get_mut(self.tag) {
            *x -= self.bytes;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Shape-level tensors with candle's sharing semantics.

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Dt {
    F32,
    F16,
    Bf16,
    U32,
    U8,
}

impl Dt {
    fn size(self) -> u64 {
        match self {
            Dt::F32 | Dt::U32 => 4,
            Dt::F16 | Dt::Bf16 => 2,
            Dt::U8 => 1,
        }
    }
    fn is_float(self) -> bool {
        matches!(self, Dt::F32 | Dt::F16 | Dt::Bf16)
    }
}

struct Storage {
    numel: u64,
    _block: Block,
}

#[derive(Clone, Copy, PartialEq)]
enum Un {
    Exp,
    Log,
    Sqr,
    Sqrt,
    Neg,
    Gelu,
    Silu,
    Tanh,
    Recip,
}

enum Op {
    Add(T, T),
    Sub(T, T),
    Mul(T, T),
    Div(T, T),
    Unary(T, Un),
    Affine(T, f64),
    Powf(T, f64),
    Matmul(T, T),
    Reshape(T),
    Transpose(T, usize, usize),
    Narrow(T, usize, usize, usize),
    Broadcast(T),
    Copy(T),
    ToDType(T),
    Sum(T),
    Max(T),
    Cat(Vec<T>, usize),
    IndexSelect(T, T),
    Gather(T, T),
    ScatterAdd(T, T, T),
    IndexAdd(T, T, T, usize),
    Cmp(T),
}

struct TI {
    id: u64,
    dims: Vec<usize>,
    stride: Vec<usize>,
    dt: Dt,
    storage: Rc<Storage>,
    op: Option<Op>,
    var: bool,
    _hdr: Option<Block>,
}

#[derive(Clone)]
struct T(Rc<TI>);

struct Ctx {
    mem: Rc<Mem>,
    next_id: Cell<u64>,
    machine: Machine,
    /// gemm slabs: (main thread, pool threads), allocated at first use and kept.
    slabs: RefCell<(Option<Block>, Vec<Block>)>,
}

thread_local! {
    static CTX: RefCell<Option<Rc<Ctx>>> = const { RefCell::new(None) };
}

fn ctx() -> Rc<Ctx> {
    // Cannot fail: only `replay` builds tensors, and it installs the context before the first
    // one and removes it after the last; no user input reaches this.
    CTX.with(|c| c.borrow().clone().expect("replay context"))
}

fn contiguous_stride(dims: &[usize]) -> Vec<usize> {
    let mut s = vec![0; dims.len()];
    let mut acc = 1;
    for i in (0..dims.len()).rev() {
        s[i] = acc;
        acc *= dims[i];
    }
    s
}

fn numel(dims: &[usize]) -> u64 {
    dims.iter().map(|&x| x as u64).product()
}

fn header(rank: usize) -> Option<Block> {
    Some(
        ctx()
            .mem
            .alloc(TENSOR_HEADER_BYTES + BYTES_PER_DIM * rank as u64),
    )
}

fn new_storage(n: u64, dt: Dt) -> Rc<Storage> {
    Rc::new(Storage {
        numel: n,
        _block: ctx().mem.alloc(STORAGE_HEADER_BYTES + n * dt.size()),
    })
}

/// `BackpropOp::new*`: record the op only when an input is tracked.
fn op_if(args: &[&T], op: impl FnOnce() -> Op) -> Option<Op> {
    if args.iter().any(|a| a.track()) {
        Some(op())
    } else {
        None
    }
}

impl T {
    fn id(&self) -> u64 {
        self.0.id
    }
    fn dims(&self) -> &[usize] {
        &self.0.dims
    }
    fn dt(&self) -> Dt {
        self.0.dt
    }
    fn rank(&self) -> usize {
        self.0.dims.len()
    }
    fn track(&self) -> bool {
        self.0.var || self.0.op.is_some()
    }
    fn numel(&self) -> u64 {
        numel(&self.0.dims)
    }
    /// candle `Shape::is_contiguous`: dims of size 1 are ignored.
    fn is_contiguous(&self) -> bool {
        let mut acc = 1;
        for (&s, &d) in self.0.stride.iter().zip(self.0.dims.iter()).rev() {
            if d > 1 && s != acc {
                return false;
            }
            acc *= d;
        }
        true
    }
    fn mk(dims: Vec<usize>, stride: Vec<usize>, dt: Dt, storage: Rc<Storage>, op: Option<Op>) -> T {
        let c = ctx();
        let id = c.next_id.get();
        c.next_id.set(id + 1);
        let hdr = header(dims.len());
        T(Rc::new(TI {
            id,
            dims,
            stride,
            dt,
            storage,
            op,
            var: false,
            _hdr: hdr,
        }))
    }
    /// A fresh contiguous result.
    fn fresh(dims: Vec<usize>, dt: Dt, op: Option<Op>) -> T {
        let st = new_storage(numel(&dims), dt);
        let stride = contiguous_stride(&dims);
        T::mk(dims, stride, dt, st, op)
    }
    /// A view sharing this tensor's storage.
    fn view(&self, dims: Vec<usize>, stride: Vec<usize>, op: Option<Op>) -> T {
        T::mk(dims, stride, self.dt(), self.0.storage.clone(), op)
    }
    fn zeros(dims: &[usize], dt: Dt) -> T {
        T::fresh(dims.to_vec(), dt, None)
    }
    fn zeros_like(&self) -> T {
        T::zeros(self.dims(), self.dt())
    }
    fn detach(&self) -> T {
        if self.0.op.is_none() && !self.0.var {
            self.clone()
        } else {
            self.view(self.0.dims.clone(), self.0.stride.clone(), None)
        }
    }

    // --- views
    fn reshape(&self, dims: &[usize]) -> T {
        let op = op_if(&[self], || Op::Reshape(self.clone()));
        if self.is_contiguous() {
            self.view(dims.to_vec(), contiguous_stride(dims), op)
        } else {
            T::fresh(dims.to_vec(), self.dt(), op)
        }
    }
    fn transpose(&self, a: usize, b: usize) -> T {
        if a == b {
            return self.clone();
        }
        let mut dims = self.0.dims.clone();
        let mut stride = self.0.stride.clone();
        dims.swap(a, b);
        stride.swap(a, b);
        let op = op_if(&[self], || Op::Transpose(self.clone(), a, b));
        self.view(dims, stride, op)
    }
    fn t(&self) -> T {
        let r = self.rank();
        self.transpose(r - 2, r - 1)
    }
    fn narrow(&self, dim: usize, start: usize, len: usize) -> T {
        if start == 0 && self.dims()[dim] == len {
            return self.clone();
        }
        let mut dims = self.0.dims.clone();
        dims[dim] = len;
        let op = op_if(&[self], || Op::Narrow(self.clone(), dim, start, len));
        self.view(dims, self.0.stride.clone(), op)
    }
    fn broadcast_as(&self, dims: &[usize]) -> T {
        let left = dims.len() - self.rank();
        let mut stride = vec![0; dims.len()];
        for (i, &d) in self.dims().iter().enumerate() {
            stride[left + i] = if d == dims[left + i] {
                self.0.stride[i]
            } else {
                0
            };
        }
        let op = op_if(&[self], || Op::Broadcast(self.clone()));
        self.view(dims.to_vec(), stride, op)
    }
    fn unsqueeze(&self, dim: usize) -> T {
        let mut dims = self.0.dims.clone();
        let mut stride = self.0.stride.clone();
        let s = if dim < stride.len() { stride[dim] } else { 1 };
        dims.insert(dim, 1);
        stride.insert(dim, s);
        let op = op_if(&[self], || Op::Reshape(self.clone()));
        self.view(dims, stride, op)
    }
    fn squeeze(&self, dim: usize) -> T {
        if self.dims()[dim] != 1 {
            return self.clone();
        }
        let mut dims = self.0.dims.clone();
        let mut stride = self.0.stride.clone();
        dims.remove(dim);
        stride.remove(dim);
        let op = op_if(&[self], || Op::Reshape(self.clone()));
        self.view(dims, stride, op)
    }
    fn contiguous(&self) -> T {
        if self.is_contiguous() {
            self.clone()
        } else {
            let op = op_if(&[self], || Op::Copy(self.clone()));
            T::fresh(self.0.dims.clone(), self.dt(), op)
        }
    }
    fn flatten_all(&self) -> T {
        if self.rank() <= 1 {
            return self.clone();
        }
        self.reshape(&[self.numel() as usize])
    }

    // --- computing ops
    fn to_dtype(&self, dt: Dt) -> T {
        if self.dt() == dt {
            return self.clone();
        }
        let op = if self.dt().is_float() {
            op_if(&[self], || Op::ToDType(self.clone()))
        } else {
            // candle records the op (BackpropOp::new1) whatever the source dtype; the walk then
            // ignores it. An int source is never tracked here, so no op either way.
            None
        };
        T::fresh(self.0.dims.clone(), dt, op)
    }
    fn unary(&self, u: Un) -> T {
        let op = op_if(&[self], || Op::Unary(self.clone(), u));
        T::fresh(self.0.dims.clone(), self.dt(), op)
    }
    fn affine(&self, mul: f64) -> T {
        let op = op_if(&[self], || Op::Affine(self.clone(), mul));
        T::fresh(self.0.dims.clone(), self.dt(), op)
    }
    fn powf(&self, e: f64) -> T {
        let op = op_if(&[self], || Op::Powf(self.clone(), e));
        T::fresh(self.0.dims.clone(), self.dt(), op)
    }
    fn binary(&self, rhs: &T, which: u8) -> T {
        let op = op_if(&[self, rhs], || {
            let (a, b) = (self.clone(), rhs.clone());
            match which {
                0 => Op::Add(a, b),
                1 => Op::Sub(a, b),
                2 => Op::Mul(a, b),
                _ => Op::Div(a, b),
            }
        });
        T::fresh(self.0.dims.clone(), self.dt(), op)
    }
    fn add(&self, r: &T) -> T {
        self.binary(r, 0)
    }
    fn sub(&self, r: &T) -> T {
        self.binary(r, 1)
    }
    fn mul(&self, r: &T) -> T {
        self.binary(r, 2)
    }
    fn div(&self, r: &T) -> T {
        self.binary(r, 3)
    }
    /// `broadcast_binary_op!` (tensor.rs:139): broadcast only the side whose shape differs.
    fn bcast(&self, rhs: &T, which: u8) -> T {
        let n = self.rank().max(rhs.rank());
        let pad = |d: &[usize]| {
            let mut v = vec![1; n - d.len()];
            v.extend_from_slice(d);
            v
        };
        let (a, b) = (pad(self.dims()), pad(rhs.dims()));
        let shape: Vec<usize> = a.iter().zip(&b).map(|(x, y)| *x.max(y)).collect();
        let lb = shape != self.dims();
        let rb = shape != rhs.dims();
        match (lb, rb) {
            (true, true) => self
                .broadcast_as(&shape)
                .binary(&rhs.broadcast_as(&shape), which),
            (false, true) => self.binary(&rhs.broadcast_as(&shape), which),
            (true, false) => self.broadcast_as(&shape).binary(rhs, which),
            (false, false) => self.binary(rhs, which),
        }
    }
    fn reduce(&self, dims_red: &[usize], keepdim: bool, max: bool) -> T {
        let mut dims = self.0.dims.clone();
        for &d in dims_red {
            dims[d] = 1;
        }
        let op = op_if(&[self], || {
            if max {
                Op::Max(self.clone())
            } else {
                Op::Sum(self.clone())
            }
        });
        let r = T::fresh(dims.clone(), self.dt(), op);
        if keepdim {
            r
        } else if dims_red.len() == 1 {
            r.squeeze(dims_red[0])
        } else {
            let kept: Vec<usize> = self
                .dims()
                .iter()
                .enumerate()
                .filter(|(i, _)| !dims_red.contains(i))
                .map(|(_, &x)| x)
                .collect();
            r.reshape(&kept)
        }
    }
    fn sum_keepdim(&self, dims: &[usize]) -> T {
        self.reduce(dims, true, false)
    }
    fn mean_keepdim_last(&self) -> T {
        let last = self.rank() - 1;
        let n = self.dims()[last] as f64;
        self.sum_keepdim(&[last]).affine(1.0 / n)
    }
    fn max_keepdim(&self, dim: usize) -> T {
        self.reduce(&[dim], true, true)
    }
    fn sum_all(&self) -> T {
        let all: Vec<usize> = (0..self.rank()).collect();
        self.reduce(&all, false, false)
    }
    fn cmp(&self, other: &T) -> T {
        let _ = other;
        let op = op_if(&[self], || Op::Cmp(self.clone()));
        T::fresh(self.0.dims.clone(), Dt::U8, op)
    }
    fn cat(args: &[&T], dim: usize) -> T {
        if args.len() == 1 {
            return args[0].clone();
        }
        let mut dims = args[0].0.dims.clone();
        dims[dim] = args.iter().map(|a| a.dims()[dim]).sum();
        let op = op_if(args, || {
            Op::Cat(args.iter().map(|a| (*a).clone()).collect(), dim)
        });
        T::fresh(dims, args[0].dt(), op)
    }
    fn index_select(&self, ids: &T, dim: usize) -> T {
        let mut dims = self.0.dims.clone();
        dims[dim] = ids.dims()[0];
        let op = op_if(&[self, ids], || Op::IndexSelect(self.clone(), ids.clone()));
        T::fresh(dims, self.dt(), op)
    }
    fn gather(&self, ids: &T) -> T {
        let op = op_if(&[self, ids], || Op::Gather(self.clone(), ids.clone()));
        T::fresh(ids.0.dims.clone(), self.dt(), op)
    }
    fn scatter_add(&self, ids: &T, src: &T) -> T {
        let op = op_if(&[self, ids, src], || {
            Op::ScatterAdd(self.clone(), ids.clone(), src.clone())
        });
        T::fresh(self.0.dims.clone(), self.dt(), op)
    }
    fn index_add(&self, ids: &T, src: &T, dim: usize) -> T {
        let op = op_if(&[self, ids, src], || {
            Op::IndexAdd(self.clone(), ids.clone(), src.clone(), dim)
        });
        T::fresh(self.0.dims.clone(), self.dt(), op)
    }
    /// cpu_backend `matmul` (+ gemm-common): bf16 widens both whole storages to f32, multiplies
    /// into an f32 buffer and narrows it; gemm's thread-local L2 slabs appear at first use.
    fn matmul(&self, rhs: &T) -> T {
        let r = self.rank();
        let (m, k) = (self.dims()[r - 2], self.dims()[r - 1]);
        let n = rhs.dims()[r - 1];
        let batch: u64 = numel(&self.dims()[..r - 2]);
        let mut dims = self.dims()[..r - 2].to_vec();
        dims.extend([m, n]);
        let op = op_if(&[self, rhs], || Op::Matmul(self.clone(), rhs.clone()));
        let c = ctx();
        let (ls, rs) = (&self.0.stride, &rhs.0.stride);
        let strides = [ls[r - 2], ls[r - 1], rs[r - 2], rs[r - 1]];
        gemm_slabs(&c, m as u64, n as u64, k as u64, strides);
        if self.dt() == Dt::Bf16 {
            let _l32 = c.mem.alloc(self.0.storage.numel * 4);
            let _r32 = c.mem.alloc(rhs.0.storage.numel * 4);
            let _o32 = c.mem.alloc(batch * (m * n) as u64 * 4);
            T::fresh(dims, self.dt(), op)
        } else {
            T::fresh(dims, self.dt(), op)
        }
    }
}

/// gemm-common 0.19 gemm.rs:505-520 and :809: a gemm below the threading threshold runs on the
/// calling thread and uses that thread's `L2_SLAB`; above it every pool thread does. gemv/gevv
/// shapes (k ≤ 2, m or n = 1) take no slab.
fn gemm_slabs(c: &Ctx, m: u64, n: u64, k: u64, strides: [usize; 4]) {
    if GEMM_SLABS_WARMED {
        return;
    }
    let [lhs_rs, lhs_cs, rhs_rs, rhs_cs] = strides.map(|x| x as u64);
    // gemm.rs (crate gemm) transposes a row-major destination: gemm-common sees m' = n, n' = m,
    // lhs' = rhsᵀ, rhs' = lhsᵀ.
    let (mp, np) = (n, m);
    let (lhsp_rs, lhsp_cs, rhsp_rs) = (rhs_cs, rhs_rs, lhs_cs);
    let _ = lhs_rs;
    if k <= 2 || mp <= 1 || np <= 1 {
        return; // gevv / gemv
    }
    if mp * np <= 16 * 16 && lhsp_cs == 1 && rhsp_rs == 1 {
        return; // the horizontal small-matrix kernels
    }
    // gemm-common gemm.rs:402: a short or strided lhs' is prepacked once into its own buffer
    // and the per-thread L2 slab is never touched (gemm.rs:795).
    let small = mp <= 64 && np <= 64;
    let mc = if small {
        u64::MAX / 4
    } else {
        8 * c.machine.gemm_mr
    };
    let prepack = mp <= 2 * mc && (mp % c.machine.gemm_lanes != 0 || lhsp_rs != 1);
    if prepack {
        return;
    }
    let work = m * n * k.min(GEMM_KC);
    let mut s = c.slabs.borrow_mut();
    if c.machine.threads <= 1 || work < GEMM_THREADING_THRESHOLD {
        if s.0.is_none() {
            s.0 = Some(c.mem.alloc(c.machine.l2_bytes));
        }
    } else if s.1.is_empty() {
        // The first pool thread always runs a task; whether the others steal one before it is
        // done is a race (measured on 2 cores: tiny-llama at batch 4 × seq 64 ended with 2 or 3
        // slabs over six runs). Count the first fully and the others at half, the expectation
        // that minimises the worst error: ± (threads − 1) / 2 slabs.
        s.1.push(c.mem.alloc(c.machine.l2_bytes));
        let rest = (c.machine.threads - 1) * c.machine.l2_bytes / 2;
        if rest > 0 {
            s.1.push(c.mem.alloc(rest));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The forward of src/model, op for op.

fn tag(t: &'static str) {
    ctx().mem.tag.set(t);
}

fn var(dims: &[usize], dt: Dt) -> T {
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
struct Weights {
    by_name: HashMap<String, T>,
    all: Vec<T>,
}

impl Weights {
    fn of(cfg: &ModelConfig, dt: Dt) -> Weights {
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
    fn opt(&self, name: &str) -> Option<T> {
        self.by_name.get(name).cloned()
    }

    /// A tensor the list holds for every config of this family.
    fn get(&self, name: &str) -> T {
        // Cannot fail: the names below are the family's own (tests/activations.rs replays every
        // family against the allocator); no user input chooses them.
        self.opt(name)
            .unwrap_or_else(|| panic!("{name} is not in the family's tensor list"))
    }
}

/// GPT-2's Conv1D: x[B,T,in] → reshape → matmul W[in,out] (+ b) → reshape.
fn conv1d(x: &T, w: &T, b: Option<&T>) -> T {
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
fn linear(x: &T, w: &T, b: Option<&T>) -> T {
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

fn norm_dt(dt: Dt) -> Dt {
    match dt {
        Dt::F16 | Dt::Bf16 => Dt::F32,
        d => d,
    }
}

fn layer_norm(x: &T, w: &T, b: Option<&T>) -> T {
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

fn rms_norm(x: &T, w: &T) -> T {
    let dt = x.dt();
    let x = x.to_dtype(norm_dt(dt));
    let ms = x.unary(Un::Sqr).mean_keepdim_last();
    let x = x.bcast(&ms.affine(1.0).unary(Un::Sqrt), 3);
    x.to_dtype(dt).bcast(w, 2)
}

/// A plain (untracked) tensor built from a host `Vec<f32>` (moved, not copied) and cast.
fn host_f32(dims: &[usize], dt: Dt) -> T {
    T::zeros(dims, Dt::F32).to_dtype(dt)
}

fn softmax_last(x: &T) -> T {
    let last = x.rank() - 1;
    let max = x.max_keepdim(last);
    let diff = x.bcast(&max, 1);
    let num = diff.unary(Un::Exp);
    let den = num.sum_keepdim(&[last]);
    num.bcast(&den, 3)
}

fn attention(q: &T, k: &T, v: &T, mask: &T) -> T {
    tag("attention scores/softmax");
    let hd = q.dims()[3] as f64;
    let att = q.matmul(&k.t().contiguous()).affine(1.0 / hd.sqrt());
    let att = att.bcast(mask, 0);
    let att = softmax_last(&att);
    att.matmul(v)
}

fn gpt2_forward(cfg: &ModelConfig, b: usize, t: usize, ids: &T, w: &Weights) -> T {
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
type Lin = (T, Option<T>);

fn swiglu(x: &T, e: &[Lin; 3]) -> T {
    let g = linear(x, &e[0].0, e[0].1.as_ref()).unary(Un::Silu);
    let h = g.mul(&linear(x, &e[1].0, e[1].1.as_ref()));
    linear(&h, &e[2].0, e[2].1.as_ref())
}

fn rope_apply(x: &T, cos: &T, sin: &T) -> T {
    let hd = x.dims()[3];
    let half = hd / 2;
    let x1 = x.narrow(3, 0, half);
    let x2 = x.narrow(3, half, half);
    let rotated = T::cat(&[&x2.unary(Un::Neg), &x1], 3);
    x.bcast(cos, 2).add(&rotated.bcast(sin, 2))
}

fn repeat_kv(x: T, rep: usize) -> T {
    if rep == 1 {
        return x;
    }
    let d = x.dims().to_vec();
    let (b, kv, t, hd) = (d[0], d[1], d[2], d[3]);
    x.unsqueeze(2)
        .broadcast_as(&[b, kv, rep, t, hd])
        .reshape(&[b, kv * rep, t, hd])
}

fn moe(x: &T, router: &T, experts: &[[Lin; 3]], top_k: usize) -> T {
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

fn llama_forward(cfg: &ModelConfig, b: usize, t: usize, ids: &T, w: &Weights) -> T {
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
fn next_token_loss(logits: &T, ids: &T) -> T {
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

// ---------------------------------------------------------------------------------------------
// candle's backward, ported from candle-core-0.11.1/src/backprop.rs.

fn op_args(op: &Op) -> Vec<&T> {
    match op {
        Op::Add(a, b) | Op::Sub(a, b) | Op::Mul(a, b) | Op::Div(a, b) | Op::Matmul(a, b) => {
            vec![a, b]
        }
        Op::IndexSelect(a, b) | Op::Gather(a, b) => vec![a, b],
        Op::IndexAdd(a, b, c, _) | Op::ScatterAdd(a, b, c) => vec![a, b, c],
        Op::Cat(args, _) => args.iter().collect(),
        Op::Affine(a, mul) => {
            if *mul == 0.0 {
                vec![]
            } else {
                vec![a]
            }
        }
        Op::ToDType(a) => {
            if a.dt().is_float() {
                vec![a]
            } else {
                vec![]
            }
        }
        Op::Unary(a, _)
        | Op::Powf(a, _)
        | Op::Reshape(a)
        | Op::Transpose(a, _, _)
        | Op::Narrow(a, ..)
        | Op::Broadcast(a)
        | Op::Copy(a)
        | Op::Sum(a)
        | Op::Max(a)
        | Op::Cmp(a) => vec![a],
    }
}

/// `Tensor::sorted_nodes`: reverse post-order of the DFS from the loss.
fn sorted_nodes(root: &T) -> Vec<T> {
    fn walk(node: &T, nodes: &mut Vec<T>, seen: &mut HashMap<u64, bool>) -> bool {
        if let Some(&tg) = seen.get(&node.id()) {
            return tg;
        }
        let mut tg = false;
        if node.0.var {
            tg = true;
        } else if !node.dt().is_float() {
        } else if let Some(op) = &node.0.op {
            for a in op_args(op) {
                tg |= walk(a, nodes, seen);
            }
        }
        seen.insert(node.id(), tg);
        if tg {
            nodes.push(node.clone());
        }
        tg
    }
    let mut nodes = Vec::new();
    let mut seen = HashMap::new();
    walk(root, &mut nodes, &mut seen);
    nodes.reverse();
    nodes
}

struct Store {
    map: HashMap<u64, T>,
}

impl Store {
    fn or_insert(&mut self, t: &T) -> &mut T {
        self.map.entry(t.id()).or_insert_with(|| t.zeros_like())
    }
}

fn backward(root: &T) -> Store {
    let nodes = sorted_nodes(root);
    // the Vec<&Tensor> of sorted nodes (capacity doubles from 4)
    let _sorted = ctx()
        .mem
        .alloc(8 * (nodes.len().max(4) as u64).next_power_of_two());
    let mut grads = Store {
        map: HashMap::new(),
    };
    grads.map.insert(root.id(), root.zeros_like().contiguous());
    for node in &nodes {
        if node.0.var {
            continue;
        }
        // backprop.rs binds the removed gradient and then shadows it with its detached copy:
        // the original (and the history it pins) lives until the end of this iteration.
        // Cannot fail: nodes are visited in reverse topological order from the root, so every
        // node's consumers have already added its gradient (the same invariant candle's
        // backprop.rs relies on); the graph is ours, built from shapes, not from user data.
        let grad = grads.map.remove(&node.id()).expect("grad populated");
        let grad = grad.detach();
        let Some(op) = &node.0.op else { continue };
        match op {
            Op::Add(l, r) => {
                let s = grads.or_insert(l);
                *s = s.add(&grad);
                let s = grads.or_insert(r);
                *s = s.add(&grad);
            }
            Op::Sub(l, r) => {
                let s = grads.or_insert(l);
                *s = s.add(&grad);
                let s = grads.or_insert(r);
                *s = s.sub(&grad);
            }
            Op::Mul(l, r) => {
                let lg = grad.mul(r);
                let s = grads.or_insert(l);
                *s = s.add(&lg);
                let rg = grad.mul(l);
                let s = grads.or_insert(r);
                *s = s.add(&rg);
            }
            Op::Div(l, r) => {
                let lg = grad.div(r);
                let s = grads.or_insert(l);
                *s = s.add(&lg);
                let rg = grad.mul(l).div(&r.unary(Un::Sqr));
                let s = grads.or_insert(r);
                *s = s.sub(&rg);
            }
            Op::Matmul(l, r) => {
                let lg = grad.matmul(&r.t());
                let s = grads.or_insert(l);
                *s = s.add(&lg);
                let rg = l.t().matmul(&grad);
                let s = grads.or_insert(r);
                *s = s.add(&rg);
            }
            Op::Reshape(a) => {
                let ag = grad.reshape(a.dims());
                let s = grads.or_insert(a);
                *s = s.add(&ag);
            }
            Op::Transpose(a, d1, d2) => {
                let ag = grad.transpose(*d1, *d2);
                let s = grads.or_insert(a);
                *s = s.add(&ag);
            }
            Op::Copy(a) => {
                let s = grads.or_insert(a);
                *s = s.add(&grad);
            }
            Op::ToDType(a) => {
                let s = grads.or_insert(a);
                *s = s.add(&grad.to_dtype(a.dt()));
            }
            Op::Affine(a, mul) => {
                let ag = grad.affine(*mul);
                let s = grads.or_insert(a);
                *s = s.add(&ag);
            }
            Op::Narrow(a, dim, start, len) => {
                let ad = a.dims();
                let left = if *start == 0 {
                    None
                } else {
                    let mut d = ad.to_vec();
                    d[*dim] = *start;
                    Some(T::zeros(&d, grad.dt()))
                };
                let rp = ad[*dim] - start - len;
                let right = if rp == 0 {
                    None
                } else {
                    let mut d = ad.to_vec();
                    d[*dim] = rp;
                    Some(T::zeros(&d, grad.dt()))
                };
                let ag = match (left, right) {
                    (None, None) => grad.clone(),
                    (Some(l), None) => T::cat(&[&l, &grad], *dim),
                    (None, Some(r)) => T::cat(&[&grad, &r], *dim),
                    (Some(l), Some(r)) => T::cat(&[&l, &grad, &r], *dim),
                };
                let s = grads.or_insert(a);
                *s = s.add(&ag);
            }
            Op::Broadcast(a) => {
                let ad = a.dims().to_vec();
                let nd = node.dims();
                let left = nd.len() - ad.len();
                let mut sum_dims: Vec<usize> = (0..left).collect();
                for (i, (n, x)) in nd[left..].iter().zip(ad.iter()).enumerate() {
                    if n != x {
                        sum_dims.push(i + left);
                    }
                }
                let mut ag = grad.sum_keepdim(&sum_dims);
                for _ in 0..left {
                    ag = ag.squeeze(0);
                }
                let s = grads.or_insert(a);
                let sd = s.dims().to_vec();
                *s = s.add(&ag.broadcast_as(&sd));
            }
            Op::Sum(a) => {
                let g = grad.broadcast_as(a.dims());
                let s = grads.or_insert(a);
                *s = s.add(&g);
            }
            Op::Max(a) => {
                let nb = node.broadcast_as(a.dims());
                let g = grad.broadcast_as(a.dims());
                let g = nb.cmp(a).to_dtype(g.dt()).mul(&g);
                let s = grads.or_insert(a);
                let sd = s.dims().to_vec();
                *s = s.add(&g.broadcast_as(&sd));
            }
            Op::Cat(args, dim) => {
                let mut start = 0;
                for a in args {
                    let len = a.dims()[*dim];
                    let ag = grad.narrow(*dim, start, len);
                    let s = grads.or_insert(a);
                    *s = s.add(&ag);
                    start += len;
                }
            }
            Op::IndexSelect(a, ids) => {
                let s = grads.or_insert(a);
                let ids = ids.contiguous();
                *s = s.index_add(&ids, &grad, 0);
            }
            Op::Gather(a, ids) => {
                let s = grads.or_insert(a);
                *s = s.scatter_add(ids, &grad);
            }
            Op::IndexAdd(init, ids, src, dim) => {
                let s = grads.or_insert(init);
                *s = s.add(&grad);
                let sg = grad.index_select(ids, *dim);
                let s = grads.or_insert(src);
                *s = s.add(&sg);
            }
            Op::ScatterAdd(..) | Op::Cmp(_) => {}
            Op::Powf(a, e) => {
                let ag = grad.mul(&a.powf(e - 1.0)).affine(*e);
                let s = grads.or_insert(a);
                *s = s.add(&ag);
            }
            Op::Unary(a, u) => unary_backward(&mut grads, node, a, *u, &grad),
        }
    }
    grads
}

fn unary_backward(grads: &mut Store, node: &T, a: &T, u: Un, grad: &T) {
    match u {
        Un::Log => {
            let s = grads.or_insert(a);
            *s = s.add(&grad.div(a));
        }
        Un::Exp => {
            let s = grads.or_insert(a);
            *s = s.add(&grad.mul(node));
        }
        Un::Neg => {
            let s = grads.or_insert(a);
            *s = s.sub(grad);
        }
        Un::Recip => {
            let s = grads.or_insert(a);
            let g = grad.div(&a.unary(Un::Sqr));
            *s = s.sub(&g);
        }
        Un::Sqr => {
            let ag = a.mul(grad).affine(2.0);
            let s = grads.or_insert(a);
            *s = s.add(&ag);
        }
        Un::Sqrt => {
            let ag = grad.div(node).affine(0.5);
            let s = grads.or_insert(a);
            *s = s.add(&ag);
        }
        Un::Tanh => {
            let s = grads.or_insert(a);
            let minus = node.unary(Un::Sqr).affine(1.0);
            *s = s.sub(&grad.mul(&minus));
        }
        Un::Gelu => {
            // backprop.rs: cube, tanh(0.0356774·cube + 0.797885·x), then the derivative.
            let s = grads.or_insert(a);
            let cube = a.powf(3.0);
            let tanh = cube
                .affine(0.0356774)
                .add(&a.affine(0.797885))
                .unary(Un::Tanh);
            let g = tanh
                .affine(0.5)
                .add(
                    &cube
                        .affine(0.0535161)
                        .add(&a.affine(0.398942))
                        .mul(&tanh.powf(2.0).affine(-1.0)),
                )
                .affine(1.0);
            *s = s.add(&grad.mul(&g));
        }
        Un::Silu => {
            let s = grads.or_insert(a);
            let sig = a.unary(Un::Neg).unary(Un::Exp).affine(1.0).unary(Un::Recip);
            let g = sig.mul(&node.affine(-1.0)).add(node);
            *s = s.add(&grad.mul(&g));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The whole step, as `measure::run::train_step` runs it.

fn dt_of(d: TrainDtype) -> Dt {
    match d {
        TrainDtype::F32 => Dt::F32,
        TrainDtype::F16 => Dt::F16,
        TrainDtype::Bf16 => Dt::Bf16,
    }
}

fn replay(cfg: &ModelConfig, params: u64, step: Step, machine: Machine) -> ActivationModel {
    let mem = Rc::new(Mem {
        cur: Cell::new(0),
        peak: Cell::new(0),
        live: RefCell::new(BTreeMap::new()),
        at_peak: RefCell::new(BTreeMap::new()),
        tag: Cell::new("weights"),
    });
    let c = Rc::new(Ctx {
        mem: mem.clone(),
        next_id: Cell::new(0),
        machine,
        slabs: RefCell::new((None, Vec::new())),
    });
    CTX.with(|x| *x.borrow_mut() = Some(c.clone()));
    let dt = dt_of(step.dtype);
    let (b, t) = (step.batch, step.seq.max(2));
    let w = Weights::of(cfg, dt);
    // The input ids exist before the baseline: an uncounted plain tensor.
    let ids = {
        let id = c.next_id.get();
        c.next_id.set(id + 1);
        T(Rc::new(TI {
            id,
            dims: vec![b, t],
            stride: vec![t, 1],
            dt: Dt::U32,
            storage: Rc::new(Storage {
                numel: (b * t) as u64,
                _block: Block {
                    mem: mem.clone(),
                    bytes: 0,
                    tag: "weights",
                },
            }),
            op: None,
            var: false,
            _hdr: None,
        }))
    };
    // Weight bytes: the exact parameter count at the dtype, plus per-tensor bookkeeping for
    // every tensor of the family's list.
    let n_tensors = w.all.len() as u64;
    let e = step.dtype.bytes();
    mem.tag.set("weights");
    let weights_block = mem.alloc(params * e + n_tensors * VARMAP_BYTES_PER_TENSOR);
    let weights_bytes = weights_block.bytes;
    mem.reset_peak();

    let logits = match cfg.arch {
        Arch::Gpt2 => gpt2_forward(cfg, b, t, &ids, &w),
        Arch::Llama => llama_forward(cfg, b, t, &ids, &w),
    };
    let loss = next_token_loss(&logits, &ids);
    {
        // loss.to_dtype(F64).to_scalar()
        let _s = mem.alloc(STORAGE_HEADER_BYTES + 8 + TENSOR_HEADER_BYTES);
    }
    let forward_peak = mem.peak.get();
    let after_forward = mem.cur.get();
    let fwd_terms = mem.at_peak.borrow().clone();

    mem.reset_peak();
    tag("gradients (backward)");
    let store = backward(&loss);
    // detach the var grads we keep, drop the store and the graph (train_step)
    let kept: Vec<T> = w
        .all
        .iter()
        .filter_map(|v| store.map.get(&v.id()).map(|g| g.detach()))
        .collect();
    let backward_peak = mem.peak.get();
    let bwd_terms = mem.at_peak.borrow().clone();
    drop(store);
    drop(loss);
    // a block, not shadowing: a shadowed binding would keep the graph alive (run.rs does this)
    let logits = {
        let with_graph = logits;
        with_graph.detach()
    };
    let slab_uncertainty = {
        let s = c.slabs.borrow();
        if s.1.is_empty() {
            0
        } else {
            machine.threads.saturating_sub(1) * machine.l2_bytes / 2
        }
    };
    let slab_bytes = {
        let s = c.slabs.borrow();
        s.0.as_ref().map_or(0, |b| b.bytes) + s.1.iter().map(|b| b.bytes).sum::<u64>()
    };
    // Gradients exactly as allocated: data + one storage and tensor header each.
    let gradients_bytes: u64 = kept
        .iter()
        .map(|g| g.numel() * e + STORAGE_HEADER_BYTES + TENSOR_HEADER_BYTES + 16 * g.rank() as u64)
        .sum();

    // AdamW (candle-nn optim.rs): two zeroed Vars per parameter, then per parameter up to
    // ADAMW_TEMPORARIES temporaries of its size; the largest parameter sets the peak.
    mem.reset_peak();
    tag("optimizer (AdamW)");
    let state: Vec<Block> = w
        .all
        .iter()
        .flat_map(|v| {
            let bytes = v.numel() * e + STORAGE_HEADER_BYTES + TENSOR_HEADER_BYTES + 32;
            [mem.alloc(bytes), mem.alloc(bytes)]
        })
        .collect();
    let adamw_state_bytes: u64 = state.iter().map(|b| b.bytes).sum();
    let largest = w.all.iter().map(|v| v.numel()).max().unwrap_or(0);
    {
        let _tmp = mem.alloc(ADAMW_TEMPORARIES * (largest * e + STORAGE_HEADER_BYTES + 192));
    }
    let adamw_peak = mem.peak.get();
    drop(state);
    drop(logits);
    drop(kept);
    drop(weights_block);
    CTX.with(|x| *x.borrow_mut() = None);

    let peak = forward_peak.max(backward_peak);
    let at_peak = if backward_peak >= forward_peak {
        bwd_terms
    } else {
        fwd_terms
    };
    let mut terms: Vec<(String, u64)> = at_peak
        .into_iter()
        .filter(|(_, v)| *v > 0)
        .map(|(k, v)| (k.to_string(), v))
        .collect();
    terms.sort_by_key(|t| std::cmp::Reverse(t.1));
    let cf = closed_form_kept(cfg, step);
    let get = |k: &str| cf.iter().find(|x| x.0 == k).map_or(0, |x| x.1);
    let per_layer = get("layers (all)") / (cfg.n_layer.max(1) as u64);
    ActivationModel {
        weights_bytes,
        per_layer_kept_bytes: per_layer,
        embed_kept_bytes: get("embed"),
        head_kept_bytes: get("head"),
        forward_peak_bytes: forward_peak,
        after_forward_bytes: after_forward,
        backward_peak_bytes: backward_peak,
        peak_bytes: peak,
        gradients_bytes,
        gemm_slab_bytes: slab_bytes,
        gemm_slab_uncertainty_bytes: slab_uncertainty,
        adamw_peak_bytes: adamw_peak,
        adamw_state_bytes,
        terms,
    }
}
