//! Serving memory from a config: weights in any storage format, the KV cache, the prefill and
//! decode peaks of truesize's inference engine, and what fits in a memory budget.

pub mod fit;
pub mod formats;
pub mod kv;
pub mod peaks;
pub mod weights;
