//! Checkpoint files read as hostile input.

pub mod gguf;
pub mod gguf_inspect;
