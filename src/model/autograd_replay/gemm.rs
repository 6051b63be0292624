//! gemm's thread-local L2 slabs: which matmuls allocate one, on which thread.

use super::machine::Machine;

/// Whose L2 slab a gemm touches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Slab {
    /// The calling thread's (a gemm below the threading threshold, or one thread).
    Calling,
    /// Every pool thread's.
    Pool,
}

/// `measure::run::probe_for` runs one gemm on every thread before the baseline, so every
/// thread's L2 slab already exists and none is allocated during the step. The slab rules below
/// stay for a process that did not warm its threads.
pub(super) const GEMM_SLABS_WARMED: bool = true;
/// gemm-common 0.19 `DEFAULT_THREADING_THRESHOLD` (gemm.rs:109): a gemm whose
/// m · n_chunk · k_chunk is below this runs on the calling thread, otherwise on the rayon pool.
pub(super) const GEMM_THREADING_THRESHOLD: u64 = 48 * 48 * 256;
/// gemm-common 0.19 `kernel_params` (cache.rs:514): the depth block kc is at least 512 (and at
/// most k); with a 32 KiB, 8-way L1 the `max(512)` is what wins.
pub(super) const GEMM_KC: u64 = 512;

/// gemm-common 0.19 gemm.rs:505-520 and :809: a gemm below the threading threshold runs on the
/// calling thread and uses that thread's `L2_SLAB`; above it every pool thread does. gemv/gevv
/// shapes (k ≤ 2, m or n = 1) take no slab. `None`: no slab is touched (or all exist already).
pub(super) fn slab_for(
    machine: &Machine,
    m: u64,
    n: u64,
    k: u64,
    strides: [usize; 4],
) -> Option<Slab> {
    if GEMM_SLABS_WARMED {
        return None;
    }
    let [lhs_rs, lhs_cs, rhs_rs, rhs_cs] = strides.map(|x| x as u64);
    // gemm.rs (crate gemm) transposes a row-major destination: gemm-common sees m' = n, n' = m,
    // lhs' = rhsᵀ, rhs' = lhsᵀ.
    let (mp, np) = (n, m);
    let (lhsp_rs, lhsp_cs, rhsp_rs) = (rhs_cs, rhs_rs, lhs_cs);
    let _ = lhs_rs;
    if k <= 2 || mp <= 1 || np <= 1 {
        return None; // gevv / gemv
    }
    if mp * np <= 16 * 16 && lhsp_cs == 1 && rhsp_rs == 1 {
        return None; // the horizontal small-matrix kernels
    }
    // gemm-common gemm.rs:402: a short or strided lhs' is prepacked once into its own buffer
    // and the per-thread L2 slab is never touched (gemm.rs:795).
    let small = mp <= 64 && np <= 64;
    let mc = if small {
        u64::MAX / 4
    } else {
        8 * machine.gemm_mr
    };
    let prepack = mp <= 2 * mc && (mp % machine.gemm_lanes != 0 || lhsp_rs != 1);
    if prepack {
        return None;
    }
    let work = m * n * k.min(GEMM_KC);
    Some(if machine.threads <= 1 || work < GEMM_THREADING_THRESHOLD {
        Slab::Calling
    } else {
        Slab::Pool
    })
}
