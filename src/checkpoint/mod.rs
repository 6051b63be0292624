//! Checkpoints on disk: which files a path names (`resolve`), their headers read as hostile
//! input (`safetensors`), the one checker that compares them with a model family's tensor list
//! (`check`), and writing one to measure its size (`write`).
//!
//! GGUF files (llama.cpp): `gguf.rs` beside `safetensors.rs`, a header reader with the same
//! contract (bounded reads, every failure an `Error::File`), and `gguf_inspect.rs`, the same
//! structure comparison for them (against the family's GGUF layout).
//!
//! # One fault, one verdict
//! `inspect`, `verify --model` and `verify --model --shapes-only` all open a checkpoint with
//! [`Checkpoint::open`] and run [`check::check`], so a fault gets the same exit code from each:
//!
//! | fault | verdict |
//! |---|---|
//! | path missing, folder without `model.safetensors` / index, unreadable or oversized index, shard name with a path in it, shard file missing | exit 2 (bad input), the message names the file |
//! | header not safetensors: truncated, length beyond the file, not UTF-8 / JSON, unknown dtype, overflowing shape, offsets outside the data or overlapping, bytes no tensor owns | exit 2, the message names the file and the tensor |
//! | a parameter missing, an unexpected tensor, a mis-shaped tensor, a tensor in two shards, an index naming the wrong shard (or missing a tensor) | a failed check: exit 1, the report is printed, `verify` runs nothing |
//! | known buffers (GPT-2's `attn.bias` masks, `rotary_emb.inv_freq`), a tied head stored twice | shown, never failing |

pub mod check;
pub mod gguf;
pub mod gguf_inspect;
pub mod resolve;
pub mod safetensors;
pub mod write;

pub use check::{check, Checkpoint, Findings, StoredTensor};
pub use resolve::{resolve, Resolved};
