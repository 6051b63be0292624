//! Where a measurement reads allocated bytes: the counting allocator on CPU, a device's memory
//! pool elsewhere (`cuda.rs`).

use crate::error::Result;

/// Where allocated bytes are read from.
pub trait MemoryProbe {
    /// What is measured, for the report.
    fn source(&self) -> &'static str;
    fn current(&self) -> Result<u64>;
    fn peak(&self) -> Result<u64>;
    fn reset_peak(&self) -> Result<()>;
}

/// CPU: the counting global allocator (exact bytes of every allocation).
pub struct CpuProbe;

impl MemoryProbe for CpuProbe {
    fn source(&self) -> &'static str {
        "counting global allocator (exact heap bytes)"
    }
    fn current(&self) -> Result<u64> {
        Ok(super::alloc::current())
    }
    fn peak(&self) -> Result<u64> {
        Ok(super::alloc::peak())
    }
    fn reset_peak(&self) -> Result<()> {
        super::alloc::reset_peak();
        Ok(())
    }
}
