//! The lean training step: an explicit forward and backward that keep what PyTorch keeps.
pub mod kernels;
