//! Shape-level tensors with candle's sharing semantics (views share storage, ops hold their
//! inputs, `detach` shares storage, `to_dtype` to the same dtype is a clone), and the counter
//! every allocation goes through. No data: only shapes, dtypes and bytes.

use super::gemm::{slab_for, Slab};
use super::machine::Machine;
use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::rc::Rc;

/// Bytes of one `Arc<Tensor_>` allocation (id, layout, op, dtype, device), excluding the shape
/// and stride vectors. Measured with a counting allocator on candle 0.11.1: a rank-2 view
/// (`t()`) allocates 192 B = 160 + 2·16, a rank-4 view 224 B = 160 + 4·16.
pub(super) const TENSOR_HEADER_BYTES: u64 = 160;
/// Shape and stride vectors: 8 B per dimension each (same measurement).
pub(super) const BYTES_PER_DIM: u64 = 16;
/// `Arc<RwLock<Storage>>` around a fresh buffer: a fresh rank-2 tensor allocates 264 B beyond
/// its data, i.e. 72 B more than a view (same measurement).
pub(super) const STORAGE_HEADER_BYTES: u64 = 72;

// The allocation counter.

pub(super) struct Mem {
    pub(super) cur: Cell<u64>,
    pub(super) peak: Cell<u64>,
    pub(super) live: RefCell<BTreeMap<&'static str, u64>>,
    pub(super) at_peak: RefCell<BTreeMap<&'static str, u64>>,
    pub(super) tag: Cell<&'static str>,
}

impl Mem {
    pub(super) fn alloc(self: &Rc<Self>, bytes: u64) -> Block {
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
    pub(super) fn reset_peak(&self) {
        self.peak.set(self.cur.get());
        self.at_peak.borrow_mut().clone_from(&self.live.borrow());
    }
}

/// One counted allocation; freed on drop, like the `Vec`/`Arc` it stands for.
pub(super) struct Block {
    pub(super) mem: Rc<Mem>,
    pub(super) bytes: u64,
    pub(super) tag: &'static str,
}

impl Drop for Block {
    fn drop(&mut self) {
        self.mem.cur.set(self.mem.cur.get() - self.bytes);
        if let Some(x) = self.mem.live.borrow_mut().get_mut(self.tag) {
            *x -= self.bytes;
        }
    }
}

// Shape-level tensors with candle's sharing semantics.

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum Dt {
    F32,
    F16,
    Bf16,
    U32,
    U8,
}

impl Dt {
    pub(super) fn size(self) -> u64 {
        match self {
            Dt::F32 | Dt::U32 => 4,
            Dt::F16 | Dt::Bf16 => 2,
            Dt::U8 => 1,
        }
    }
    pub(super) fn is_float(self) -> bool {
        matches!(self, Dt::F32 | Dt::F16 | Dt::Bf16)
    }
}

pub(super) struct Storage {
    pub(super) numel: u64,
    pub(super) _block: Block,
}

#[derive(Clone, Copy, PartialEq)]
pub(super) enum Un {
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

pub(super) enum Op {
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

pub(super) struct TI {
    pub(super) id: u64,
    pub(super) dims: Vec<usize>,
    pub(super) stride: Vec<usize>,
    pub(super) dt: Dt,
    pub(super) storage: Rc<Storage>,
    pub(super) op: Option<Op>,
    pub(super) var: bool,
    pub(super) _hdr: Option<Block>,
}

#[derive(Clone)]
pub(super) struct T(pub(super) Rc<TI>);

pub(super) struct Ctx {
    pub(super) mem: Rc<Mem>,
    pub(super) next_id: Cell<u64>,
    pub(super) machine: Machine,
    /// gemm slabs: (main thread, pool threads), allocated at first use and kept.
    pub(super) slabs: RefCell<(Option<Block>, Vec<Block>)>,
}

thread_local! {
    pub(super) static CTX: RefCell<Option<Rc<Ctx>>> = const { RefCell::new(None) };
}

impl Ctx {
    /// Allocate the slab a gemm touches, the first time it is touched.
    fn touch_slab(&self, slab: Slab) {
        let mut s = self.slabs.borrow_mut();
        match slab {
            Slab::Calling => {
                if s.0.is_none() {
                    s.0 = Some(self.mem.alloc(self.machine.l2_bytes));
                }
            }
            Slab::Pool => {
                if s.1.is_empty() {
                    // The first pool thread always runs a task; whether the others steal one
                    // before it is done is a race (measured on 2 cores: tiny-llama at batch 4 ×
                    // seq 64 ended with 2 or 3 slabs over six runs). Count the first fully and
                    // the others at half, the expectation that minimises the worst error:
                    // ± (threads − 1) / 2 slabs.
                    s.1.push(self.mem.alloc(self.machine.l2_bytes));
                    let rest = (self.machine.threads - 1) * self.machine.l2_bytes / 2;
                    if rest > 0 {
                        s.1.push(self.mem.alloc(rest));
                    }
                }
            }
        }
    }
}

pub(super) fn ctx() -> Rc<Ctx> {
    // Cannot fail: only `replay` builds tensors, and it installs the context before the first
    // one and removes it after the last; no user input reaches this.
    CTX.with(|c| c.borrow().clone().expect("replay context"))
}

pub(super) fn contiguous_stride(dims: &[usize]) -> Vec<usize> {
    let mut s = vec![0; dims.len()];
    let mut acc = 1;
    for i in (0..dims.len()).rev() {
        s[i] = acc;
        acc *= dims[i];
    }
    s
}

pub(super) fn numel(dims: &[usize]) -> u64 {
    dims.iter().map(|&x| x as u64).product()
}

pub(super) fn header(rank: usize) -> Option<Block> {
    Some(
        ctx()
            .mem
            .alloc(TENSOR_HEADER_BYTES + BYTES_PER_DIM * rank as u64),
    )
}

pub(super) fn new_storage(n: u64, dt: Dt) -> Rc<Storage> {
    Rc::new(Storage {
        numel: n,
        _block: ctx().mem.alloc(STORAGE_HEADER_BYTES + n * dt.size()),
    })
}

/// `BackpropOp::new*`: record the op only when an input is tracked.
pub(super) fn op_if(args: &[&T], op: impl FnOnce() -> Op) -> Option<Op> {
    if args.iter().any(|a| a.track()) {
        Some(op())
    } else {
        None
    }
}

impl T {
    pub(super) fn id(&self) -> u64 {
        self.0.id
    }
    pub(super) fn dims(&self) -> &[usize] {
        &self.0.dims
    }
    pub(super) fn dt(&self) -> Dt {
        self.0.dt
    }
    pub(super) fn rank(&self) -> usize {
        self.0.dims.len()
    }
    pub(super) fn track(&self) -> bool {
        self.0.var || self.0.op.is_some()
    }
    pub(super) fn numel(&self) -> u64 {
        numel(&self.0.dims)
    }
    /// candle `Shape::is_contiguous`: dims of size 1 are ignored.
    pub(super) fn is_contiguous(&self) -> bool {
        let mut acc = 1;
        for (&s, &d) in self.0.stride.iter().zip(self.0.dims.iter()).rev() {
            if d > 1 && s != acc {
                return false;
            }
            acc *= d;
        }
        true
    }
    pub(super) fn mk(
        dims: Vec<usize>,
        stride: Vec<usize>,
        dt: Dt,
        storage: Rc<Storage>,
        op: Option<Op>,
    ) -> T {
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
    pub(super) fn fresh(dims: Vec<usize>, dt: Dt, op: Option<Op>) -> T {
        let st = new_storage(numel(&dims), dt);
        let stride = contiguous_stride(&dims);
        T::mk(dims, stride, dt, st, op)
    }
    /// A view sharing this tensor's storage.
    pub(super) fn view(&self, dims: Vec<usize>, stride: Vec<usize>, op: Option<Op>) -> T {
        T::mk(dims, stride, self.dt(), self.0.storage.clone(), op)
    }
    pub(super) fn zeros(dims: &[usize], dt: Dt) -> T {
        T::fresh(dims.to_vec(), dt, None)
    }
    pub(super) fn zeros_like(&self) -> T {
        T::zeros(self.dims(), self.dt())
    }
    pub(super) fn detach(&self) -> T {
        if self.0.op.is_none() && !self.0.var {
            self.clone()
        } else {
            self.view(self.0.dims.clone(), self.0.stride.clone(), None)
        }
    }

    // --- views
    pub(super) fn reshape(&self, dims: &[usize]) -> T {
        let op = op_if(&[self], || Op::Reshape(self.clone()));
        if self.is_contiguous() {
            self.view(dims.to_vec(), contiguous_stride(dims), op)
        } else {
            T::fresh(dims.to_vec(), self.dt(), op)
        }
    }
    pub(super) fn transpose(&self, a: usize, b: usize) -> T {
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
    pub(super) fn t(&self) -> T {
        let r = self.rank();
        self.transpose(r - 2, r - 1)
    }
    pub(super) fn narrow(&self, dim: usize, start: usize, len: usize) -> T {
        if start == 0 && self.dims()[dim] == len {
            return self.clone();
        }
        let mut dims = self.0.dims.clone();
        dims[dim] = len;
        let op = op_if(&[self], || Op::Narrow(self.clone(), dim, start, len));
        self.view(dims, self.0.stride.clone(), op)
    }
    pub(super) fn broadcast_as(&self, dims: &[usize]) -> T {
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
    pub(super) fn unsqueeze(&self, dim: usize) -> T {
        let mut dims = self.0.dims.clone();
        let mut stride = self.0.stride.clone();
        let s = if dim < stride.len() { stride[dim] } else { 1 };
        dims.insert(dim, 1);
        stride.insert(dim, s);
        let op = op_if(&[self], || Op::Reshape(self.clone()));
        self.view(dims, stride, op)
    }
    pub(super) fn squeeze(&self, dim: usize) -> T {
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
    pub(super) fn contiguous(&self) -> T {
        if self.is_contiguous() {
            self.clone()
        } else {
            let op = op_if(&[self], || Op::Copy(self.clone()));
            T::fresh(self.0.dims.clone(), self.dt(), op)
        }
    }
    pub(super) fn flatten_all(&self) -> T {
        if self.rank() <= 1 {
            return self.clone();
        }
        self.reshape(&[self.numel() as usize])
    }

    // --- computing ops
    pub(super) fn to_dtype(&self, dt: Dt) -> T {
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
    pub(super) fn unary(&self, u: Un) -> T {
        let op = op_if(&[self], || Op::Unary(self.clone(), u));
        T::fresh(self.0.dims.clone(), self.dt(), op)
    }
    pub(super) fn affine(&self, mul: f64) -> T {
        let op = op_if(&[self], || Op::Affine(self.clone(), mul));
        T::fresh(self.0.dims.clone(), self.dt(), op)
    }
    pub(super) fn powf(&self, e: f64) -> T {
        let op = op_if(&[self], || Op::Powf(self.clone(), e));
        T::fresh(self.0.dims.clone(), self.dt(), op)
    }
    pub(super) fn binary(&self, rhs: &T, which: u8) -> T {
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
    pub(super) fn add(&self, r: &T) -> T {
        self.binary(r, 0)
    }
    pub(super) fn sub(&self, r: &T) -> T {
        self.binary(r, 1)
    }
    pub(super) fn mul(&self, r: &T) -> T {
        self.binary(r, 2)
    }
    pub(super) fn div(&self, r: &T) -> T {
        self.binary(r, 3)
    }
    /// `broadcast_binary_op!` (tensor.rs:139): broadcast only the side whose shape differs.
    pub(super) fn bcast(&self, rhs: &T, which: u8) -> T {
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
    pub(super) fn reduce(&self, dims_red: &[usize], keepdim: bool, max: bool) -> T {
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
    pub(super) fn sum_keepdim(&self, dims: &[usize]) -> T {
        self.reduce(dims, true, false)
    }
    pub(super) fn mean_keepdim_last(&self) -> T {
        let last = self.rank() - 1;
        let n = self.dims()[last] as f64;
        self.sum_keepdim(&[last]).affine(1.0 / n)
    }
    pub(super) fn max_keepdim(&self, dim: usize) -> T {
        self.reduce(&[dim], true, true)
    }
    pub(super) fn sum_all(&self) -> T {
        let all: Vec<usize> = (0..self.rank()).collect();
        self.reduce(&all, false, false)
    }
    pub(super) fn cmp(&self, other: &T) -> T {
        let _ = other;
        let op = op_if(&[self], || Op::Cmp(self.clone()));
        T::fresh(self.0.dims.clone(), Dt::U8, op)
    }
    pub(super) fn cat(args: &[&T], dim: usize) -> T {
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
    pub(super) fn index_select(&self, ids: &T, dim: usize) -> T {
        let mut dims = self.0.dims.clone();
        dims[dim] = ids.dims()[0];
        let op = op_if(&[self, ids], || Op::IndexSelect(self.clone(), ids.clone()));
        T::fresh(dims, self.dt(), op)
    }
    pub(super) fn gather(&self, ids: &T) -> T {
        let op = op_if(&[self, ids], || Op::Gather(self.clone(), ids.clone()));
        T::fresh(ids.0.dims.clone(), self.dt(), op)
    }
    pub(super) fn scatter_add(&self, ids: &T, src: &T) -> T {
        let op = op_if(&[self, ids, src], || {
            Op::ScatterAdd(self.clone(), ids.clone(), src.clone())
        });
        T::fresh(self.0.dims.clone(), self.dt(), op)
    }
    pub(super) fn index_add(&self, ids: &T, src: &T, dim: usize) -> T {
        let op = op_if(&[self, ids, src], || {
            Op::IndexAdd(self.clone(), ids.clone(), src.clone(), dim)
        });
        T::fresh(self.0.dims.clone(), self.dt(), op)
    }
    /// cpu_backend `matmul` (+ gemm-common): bf16 widens both whole storages to f32, multiplies
    /// into an f32 buffer and narrows it; gemm's thread-local L2 slabs appear at first use.
    pub(super) fn matmul(&self, rhs: &T) -> T {
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
        if let Some(slab) = slab_for(&c.machine, m as u64, n as u64, k as u64, strides) {
            c.touch_slab(slab);
        }
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
