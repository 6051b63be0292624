//! The engines whose conventions a plan reproduces, and what each stores per parameter.

use crate::dtype::TrainDtype;
use crate::error::{Error, Result};
use serde::Serialize;

/// Megatron-LM's `--make-vocab-size-divisible-by` default: the vocabulary is padded to a
/// multiple of this × TP (`_vocab_size_with_padding` in Megatron's tokenizer setup).
pub const MEGATRON_VOCAB_DIVISIBLE_BY: usize = 128;

/// DeepSpeed ZeRO-1/2 pad each flat fp16/bf16 group to a multiple of
/// `nccl_start_alignment_factor × dp` elements, with `nccl_start_alignment_factor = 2`
/// (4-byte alignment of every rank's partition start; `stage_1_and_2.py`).
pub const DEEPSPEED_ALIGNMENT: u64 = 2;

/// Megatron's distributed optimizer pads its buffer to a multiple of lcm(dp, 128) elements
/// (`param_and_grad_buffer.py`, `_pad_end_of_bucket_if_needed`): each rank's shard then starts
/// 256-byte aligned. One bucket is assumed (buckets add a pad each).
pub const MEGATRON_BUFFER_ALIGNMENT: u64 = 128;

/// Bytes of an fp32 element: Megatron's main gradients, master weights and Adam's moments.
pub const F32: u64 = 4;

/// A training engine's conventions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Engine {
    /// Megatron-LM (core): vocab padded to 128·TP, embedding on the first stage and the head on
    /// the last (a tied embedding gets a second copy there), bf16 weights + fp32 main gradients
    /// + fp32 master and Adam (18 B/param), or its distributed optimizer (6 + 12/DP).
    Megatron,
    /// DeepSpeed ZeRO-1/2/3 (tensor parallelism as Megatron-DeepSpeed does it): dtype weights
    /// and gradients, fp32 master + Adam (K = 12), flat groups padded to 2·DP.
    Deepspeed,
    /// PyTorch FSDP2 (`fully_shard`): each parameter cut on dim 0 by `torch.chunk` (chunks of
    /// ceil(d0 / DP); every rank allocates the first chunk's size), sharded parameters, gradients
    /// and Adam in fp32, compute in the dtype; tensor parallelism by DTensor (`torch.chunk` too).
    Fsdp2,
    /// candle (`ShardedSafeTensors`, mistral.rs): exact division or an error; the embedding and
    /// head replicated on every TP rank; weights, gradients and AdamW's moments in the dtype.
    Candle,
}

impl Engine {
    pub const ALL: [Engine; 4] = [
        Engine::Megatron,
        Engine::Deepspeed,
        Engine::Fsdp2,
        Engine::Candle,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Engine::Megatron => "megatron",
            Engine::Deepspeed => "deepspeed",
            Engine::Fsdp2 => "fsdp2",
            Engine::Candle => "candle",
        }
    }

    pub fn parse(s: &str) -> Result<Engine> {
        Engine::ALL
            .into_iter()
            .find(|e| e.name().eq_ignore_ascii_case(s))
            .ok_or_else(|| {
                Error::field(
                    "command line",
                    "--engine",
                    format!("{s:?}"),
                    "expected megatron, deepspeed, fsdp2 or candle",
                )
            })
    }

    /// Whether `zero` (0–3) exists in this engine; the reason when not.
    pub fn check_zero(self, zero: u8) -> Result<()> {
        let why = match (self, zero) {
            (_, 0) | (Engine::Deepspeed, 1..=3) => return Ok(()),
            (Engine::Megatron, 1) => return Ok(()),
            (_, z) if z > 3 => "must be 0, 1, 2 or 3",
            (Engine::Megatron, _) => {
                "Megatron's distributed optimizer (--zero 1) shards optimizer states only; use \
                 --engine deepspeed for ZeRO-2/3 or --engine fsdp2"
            }
            (Engine::Fsdp2, _) => {
                "FSDP2 has no ZeRO stages: it always shards parameters, gradients and optimizer \
                 states (ZeRO-3-like); drop --zero"
            }
            (Engine::Candle, _) => "candle has no ZeRO: drop --zero or use --engine deepspeed",
            _ => "is not supported",
        };
        Err(Error::field("command line", "--zero", zero, why))
    }

    /// Bytes per element of the working weights, the gradients and the optimizer state (master
    /// copy + moments) in a step trained in `dtype`.
    pub fn widths(self, dtype: TrainDtype) -> Widths {
        let w = dtype.bytes();
        let master = if dtype == TrainDtype::F32 { 0 } else { F32 };
        match self {
            // Gradients accumulate in fp32 `main_grad` buffers.
            Engine::Megatron => Widths {
                weight: w,
                grad: F32,
                optimizer: master + 2 * F32,
            },
            // ZeRO paper's accounting: 2 + 2 + K with K = 12 in mixed precision.
            Engine::Deepspeed => Widths {
                weight: w,
                grad: w,
                optimizer: master + 2 * F32,
            },
            // Sharded parameters stay fp32 (MixedPrecisionPolicy casts only the gathered copy),
            // so gradients (reduce_dtype fp32) and Adam are fp32 too.
            Engine::Fsdp2 => Widths {
                weight: F32,
                grad: F32,
                optimizer: 2 * F32,
            },
            // candle-nn AdamW keeps m and v in the parameter dtype, and there is no master copy.
            Engine::Candle => Widths {
                weight: w,
                grad: w,
                optimizer: 2 * w,
            },
        }
    }
}

/// Bytes per element of each state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Widths {
    pub weight: u64,
    pub grad: u64,
    pub optimizer: u64,
}
