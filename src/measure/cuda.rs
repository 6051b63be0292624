//! Device memory on CUDA, read from the CUDA driver (feature `cuda`).
//!
//! candle 0.11 allocates every tensor through cudarc's `CudaStream::alloc`, which uses
//! `cuMemAllocAsync` whenever the device supports memory pools (every GPU since Pascal with a
//! CUDA 11.2+ driver). Those allocations come from the device's current memory pool (the default
//! pool unless someone replaced it), and the pool keeps two counters of the bytes handed to the
//! application: `CU_MEMPOOL_ATTR_USED_MEM_CURRENT` and the high-water mark
//! `CU_MEMPOOL_ATTR_USED_MEM_HIGH`, which can be reset to 0. Reset, run, synchronise, read: that is
//! an exact peak of tensor bytes, the CUDA counterpart of the counting allocator on the CPU. The
//! CUDA context, loaded kernel modules and cuBLAS' workspace are not pool allocations and are not
//! in it; [`free_bytes`] / [`mem_info`] give the device-wide figure.
//!
//! Compiled by `scripts/check-cuda.sh` on machines without a GPU; it has never run on one
//! (see docs/cuda.md).

use crate::error::{Error, Result};
use candle_core::Device;
use cudarc::driver::{result, sys, CudaContext, DriverError};
use std::sync::Arc;

/// Memory probe reading the allocation counters of the device's memory pool.
pub struct CudaProbe {
    ctx: Arc<CudaContext>,
}

impl CudaProbe {
    /// A probe for a CUDA `device`; refuses a CPU device, or a GPU whose allocations would not go
    /// through a memory pool (then the pool counters would read 0 and the peak would be a lie).
    pub fn new(device: &Device) -> Result<Self> {
        let ctx = context(device)?;
        if !ctx.has_async_alloc() {
            return Err(Error::Usage(format!(
                "cuda:{}: this GPU or driver has no memory pools (CU_DEVICE_ATTRIBUTE_MEMORY_POOLS_SUPPORTED = 0), \
                 so candle allocates with cuMemAlloc and truesize cannot measure the peak of tensor bytes",
                ctx.ordinal()
            )));
        }
        let probe = CudaProbe { ctx };
        // Fail here, not half-way through a run, if the pool cannot be read.
        probe.pool()?;
        Ok(probe)
    }

    /// The pool `cuMemAllocAsync` allocates from for this device: its current pool.
    fn pool(&self) -> Result<sys::CUmemoryPool> {
        self.ctx
            .bind_to_thread()
            .map_err(driver("binding the CUDA context to this thread"))?;
        // SAFETY: the device handle comes from a live context.
        unsafe { result::device::get_mem_pool(self.ctx.cu_device()) }
            .map_err(driver("cuDeviceGetMemPool"))
    }

    /// Wait for all queued work (and so all stream-ordered frees) before reading a counter.
    fn synchronize(&self) -> Result<()> {
        self.ctx
            .synchronize()
            .map_err(driver("synchronising the CUDA device"))
    }

    fn read(&self, attr: sys::CUmemPool_attribute, what: &'static str) -> Result<u64> {
        self.synchronize()?;
        let pool = self.pool()?;
        let mut value: u64 = 0;
        // SAFETY: USED_MEM_CURRENT and USED_MEM_HIGH are cuuint64_t attributes.
        unsafe {
            result::mem_pool::get_attribute(
                pool,
                attr,
                (&mut value as *mut u64).cast::<std::ffi::c_void>(),
            )
        }
        .map_err(driver(what))?;
        Ok(value)
    }
}

impl super::probe::MemoryProbe for CudaProbe {
    fn source(&self) -> &'static str {
        "CUDA memory pool counters (CU_MEMPOOL_ATTR_USED_MEM_CURRENT / _HIGH: exact tensor bytes)"
    }

    fn current(&self) -> Result<u64> {
        self.read(
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_CURRENT,
            "cuMemPoolGetAttribute(USED_MEM_CURRENT)",
        )
    }

    fn peak(&self) -> Result<u64> {
        self.read(
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
            "cuMemPoolGetAttribute(USED_MEM_HIGH)",
        )
    }

    fn reset_peak(&self) -> Result<()> {
        // Frees still queued would otherwise count towards the new high-water mark.
        self.synchronize()?;
        let pool = self.pool()?;
        // The driver only accepts 0, and setting 0 resets the mark to USED_MEM_CURRENT, not to
        // zero (PyTorch's cudaMallocAsync allocator resets its peak the same way).
        let mut zero: u64 = 0;
        // SAFETY: USED_MEM_HIGH is a cuuint64_t attribute.
        unsafe {
            result::mem_pool::set_attribute(
                pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
                (&mut zero as *mut u64).cast::<std::ffi::c_void>(),
            )
        }
        .map_err(driver("cuMemPoolSetAttribute(USED_MEM_HIGH = 0)"))
    }
}

/// Free and total memory of the whole device (`cuMemGetInfo`), in bytes: what every process,
/// context and library holds, not only tensors. For a preflight check before allocating.
pub fn mem_info(device: &Device) -> Result<(u64, u64)> {
    let ctx = context(device)?;
    let (free, total) = ctx.mem_get_info().map_err(driver("cuMemGetInfo"))?;
    Ok((free as u64, total as u64))
}

/// Free device memory in bytes (`cuMemGetInfo`).
pub fn free_bytes(device: &Device) -> Result<u64> {
    Ok(mem_info(device)?.0)
}

/// Total device memory in bytes (`cuMemGetInfo`).
pub fn total_bytes(device: &Device) -> Result<u64> {
    Ok(mem_info(device)?.1)
}

/// The cudarc context behind a candle CUDA device.
fn context(device: &Device) -> Result<Arc<CudaContext>> {
    let cuda = device.as_cuda_device().map_err(|e| {
        Error::Usage(format!(
            "the CUDA memory probe needs a CUDA device, got {:?}: {e}",
            device.location()
        ))
    })?;
    Ok(cuda.cuda_stream().context().clone())
}

fn driver(what: &'static str) -> impl Fn(DriverError) -> Error {
    move |e| Error::Internal(anyhow::anyhow!("CUDA driver: {what}: {e}"))
}

/// These need a GPU (and libcuda to even start the test binary); without a CUDA device they
/// print why and pass. `cargo test --features cuda measure::cuda -- --nocapture` on a GPU machine.
#[cfg(test)]
mod tests {
    use super::*;
    use crate::measure::probe::MemoryProbe;
    use candle_core::{DType, Tensor};

    fn gpu() -> Option<Device> {
        match Device::new_cuda(0) {
            Ok(d) => Some(d),
            Err(e) => {
                eprintln!("skipped: no CUDA device: {e}");
                None
            }
        }
    }

    #[test]
    fn probe_refuses_the_cpu() {
        assert!(CudaProbe::new(&Device::Cpu).is_err());
        assert!(free_bytes(&Device::Cpu).is_err());
    }

    #[test]
    fn pool_counters_follow_tensor_bytes() -> Result<()> {
        let Some(dev) = gpu() else { return Ok(()) };
        let probe = CudaProbe::new(&dev)?;
        let n: u64 = 4 << 20; // 1 Mi f32 = 4 MiB
        let base = probe.current()?;
        probe.reset_peak()?;
        assert_eq!(
            probe.peak()?,
            base,
            "a reset high-water mark restarts at current use"
        );

        let a = Tensor::zeros((1024, 1024), DType::F32, &dev)?;
        let with_a = probe.current()?;
        eprintln!("base {base} B, after a 4 MiB tensor {with_a} B");
        let grew = with_a.saturating_sub(base);
        assert!(grew >= n && grew <= n + (1 << 20), "{with_a} - {base}");

        let b = (&a + 1.0)?;
        let with_b = probe.current()?;
        assert!(with_b.saturating_sub(base) >= 2 * n, "{with_b} - {base}");
        drop(a);
        drop(b);
        let after = probe.current()?;
        let peak = probe.peak()?;
        eprintln!("after dropping both {after} B, peak {peak} B");
        assert_eq!(after, base, "dropped tensors go back to the pool");
        assert!(peak >= with_b, "peak {peak} < {with_b}");

        probe.reset_peak()?;
        assert_eq!(probe.peak()?, after);

        let (free, total) = mem_info(&dev)?;
        assert!(free > 0 && free <= total, "free {free}, total {total}");
        Ok(())
    }
}
