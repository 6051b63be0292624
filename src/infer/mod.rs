//! Generation with a KV cache: the inference network (`model`), its cache (`cache`), weights
//! from random init, HF safetensors or GGUF (`load`), and a run measured phase by phase (`run`).

pub mod cache;
pub mod load;
pub mod model;
pub mod run;
