//! Checkpoint files read as hostile input.

pub mod gguf;
