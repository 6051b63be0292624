//! The KV cache a server reserves for `batch` sequences of up to `context` tokens, exactly, and
//! as two engines size it.
//!
//! Per layer the cache holds K and V: 2 · kv_heads · head_dim elements per token per sequence.
//! A sliding-window layer never needs more than its window of tokens; a full-attention layer
//! needs the whole context. GQA/MQA shrink `kv_heads`; an explicit `head_dim` is used as given.

use crate::config::ModelConfig;
use serde::Serialize;

/// llama.cpp pads the number of KV cells to a multiple of 256 (`llama_kv_cache` with its
/// default `n_pad`; measured with llama-cpp-python 0.3.36: n_ctx 64 allocates 256 cells).
pub const LLAMA_CPP_CELL_PAD: u64 = 256;
/// llama.cpp's default K and V cache type: F16 (`--cache-type-k/-v f16`), 2 bytes.
pub const LLAMA_CPP_KV_ELEM_BYTES: u64 = 2;
/// vLLM's default KV block: 16 tokens (`--block-size 16`, `CacheConfig.block_size`).
pub const VLLM_BLOCK_TOKENS: u64 = 16;
/// vLLM's `kv_cache_dtype="auto"` stores K and V in the model dtype: 2 bytes for the bf16/f16
/// checkpoints it serves.
pub const VLLM_KV_ELEM_BYTES: u64 = 2;

/// Tokens layer `layer` keeps for a sequence of `context` tokens.
pub fn cached_tokens(cfg: &ModelConfig, layer: usize, context: u64) -> u64 {
    match cfg.attention_window(layer) {
        Some(w) => context.min(w as u64),
        None => context,
    }
}

/// Bytes of K and V per cached token of one layer: 2 · kv_heads · head_dim · element bytes.
pub fn bytes_per_token_layer(cfg: &ModelConfig, elem_bytes: u64) -> u64 {
    2 * cfg.n_kv_head as u64 * cfg.head_dim as u64 * elem_bytes
}

/// The exact cache for `batch` sequences of `context` tokens (saturating on absurd sizes).
pub fn exact_bytes(cfg: &ModelConfig, batch: u64, context: u64, elem_bytes: u64) -> u64 {
    let per = bytes_per_token_layer(cfg, elem_bytes);
    (0..cfg.n_layer)
        .map(|l| {
            per.saturating_mul(cached_tokens(cfg, l, context))
                .saturating_mul(batch)
        })
        .fold(0u64, u64::saturating_add)
}

/// The cache sized three ways, side by side.
#[derive(Debug, Clone, Serialize)]
pub struct KvComparison {
    pub batch: u64,
    pub context: u64,
    /// truesize: exact, at the run's KV element size.
    pub exact_bytes: u64,
    pub exact_elem_bytes: u64,
    /// truesize's exact figure at 2-byte elements (the engines' default), for comparison.
    pub exact_f16_bytes: u64,
    /// llama.cpp: `batch · context` cells (one unified cache shared by the sequences) padded to
    /// 256, F16 K and V, every layer full size (its `llama` architecture has no sliding
    /// window: Mistral's window is not applied).
    pub llama_cpp_bytes: u64,
    pub llama_cpp_cells: u64,
    /// vLLM: each sequence rounded up to 16-token blocks, K and V in the model's 16-bit dtype,
    /// every layer full context (its hybrid allocator's freeing of blocks that fell out of a
    /// window is not modelled).
    pub vllm_bytes: u64,
    pub vllm_blocks_per_sequence: u64,
    /// Layers whose window caps the cache.
    pub sliding_window_layers: usize,
}

pub fn compare(cfg: &ModelConfig, batch: u64, context: u64, elem_bytes: u64) -> KvComparison {
    let layers = cfg.n_layer as u64;
    let cells = batch
        .saturating_mul(context)
        .div_ceil(LLAMA_CPP_CELL_PAD)
        .saturating_mul(LLAMA_CPP_CELL_PAD);
    let llama_cpp = bytes_per_token_layer(cfg, LLAMA_CPP_KV_ELEM_BYTES)
        .saturating_mul(cells)
        .saturating_mul(layers);
    let blocks = context.div_ceil(VLLM_BLOCK_TOKENS);
    let vllm = bytes_per_token_layer(cfg, VLLM_KV_ELEM_BYTES)
        .saturating_mul(blocks * VLLM_BLOCK_TOKENS)
        .saturating_mul(batch)
        .saturating_mul(layers);
    KvComparison {
        batch,
        context,
        exact_bytes: exact_bytes(cfg, batch, context, elem_bytes),
        exact_elem_bytes: elem_bytes,
        exact_f16_bytes: exact_bytes(cfg, batch, context, 2),
        llama_cpp_bytes: llama_cpp,
        llama_cpp_cells: cells,
        vllm_bytes: vllm,
        vllm_blocks_per_sequence: blocks,
        sliding_window_layers: (0..cfg.n_layer)
            .filter(|&l| cfg.attention_window(l).is_some())
            .count(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::presets;

    /// Llama-3-8B: 32 layers · 2 · 8 kv heads · 128 · 2 B = 131,072 B per token (128 KiB), the
    /// figure vLLM and llama.cpp print for it.
    #[test]
    fn llama3_8b_per_token() {
        let cfg = presets::load("llama3-8b").unwrap();
        assert_eq!(exact_bytes(&cfg, 1, 1, 2), 131_072);
        assert_eq!(exact_bytes(&cfg, 4, 8192, 2), 4 * 8192 * 131_072);
        let c = compare(&cfg, 1, 100, 2);
        assert_eq!(c.llama_cpp_cells, 256);
        assert_eq!(c.llama_cpp_bytes, 256 * 131_072);
        assert_eq!(c.vllm_blocks_per_sequence, 7);
        assert_eq!(c.vllm_bytes, 112 * 131_072);
    }

    #[test]
    fn sliding_window_caps_the_cache() {
        let mut cfg = presets::load("mistral-7b").unwrap();
        cfg.set_all_attention(crate::config::Attention::Sliding { window: 4096 });
        // 32 layers · 2 · 8 · 128 · 2 B = 128 KiB per token, capped at 4096 tokens
        assert_eq!(exact_bytes(&cfg, 1, 32768, 2), 4096 * 131_072);
        assert_eq!(exact_bytes(&cfg, 1, 100, 2), 100 * 131_072);
        let c = compare(&cfg, 1, 32768, 2);
        assert_eq!(c.llama_cpp_bytes, 32768 * 131_072);
        assert_eq!(c.sliding_window_layers, 32);
    }
}
