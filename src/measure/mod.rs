//! Measurement of the genuine model: census of its tensors, forward + backward under a memory
//! probe, timings.

pub mod alloc;
pub mod census;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod device;
pub mod extrapolate;
pub mod peak;
pub mod quantize;
pub mod reference;
pub mod run;
pub mod sysmem;
