//! Checkpoints on disk: safetensors headers, and writing one.

pub mod safetensors;
pub mod write;
