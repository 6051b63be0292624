//! Command-line definitions only (clap derive); `cmd` does the work.

use clap::{Args, Parser, Subcommand, ValueEnum};
use std::path::PathBuf;

const EXIT_CODES: &str = "\
Exit codes:
  0  every check passed
  1  a check failed, or a run was refused because it would not fit in memory
  2  bad input: the message names the file, the field and the value";

#[derive(Debug, Parser)]
#[command(
    name = "truesize",
    version,
    about = "Size transformer language models from a config, then prove the numbers on real tensors",
    after_help = EXIT_CODES
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Exact parameter counts, bytes per dtype and training memory, from a config alone.
    #[command(allow_negative_numbers = true)]
    Estimate(EstimateArgs),
    /// Build the genuine network, count its tensors, run forward + backward, compare with the estimate.
    #[command(allow_negative_numbers = true)]
    Verify(VerifyArgs),
    /// List the built-in presets.
    #[command(allow_negative_numbers = true)]
    Presets(PresetsArgs),
    /// Measure the peak memory of one training step over a grid of batch sizes and sequence lengths,
    /// beside our prediction and the rules of thumb; writes CSV, JSON and an SVG chart.
    #[command(allow_negative_numbers = true)]
    Sweep(SweepArgs),
    /// Time a large square f32 matmul through candle: this machine's roofline (for scripts/bench.sh).
    #[command(hide = true)]
    BenchMatmul,
    /// Read a checkpoint's safetensors headers (no tensor data) and check it against the model.
    #[command(allow_negative_numbers = true)]
    Inspect(InspectArgs),
    /// Chinchilla scaling: compute-optimal parameters and tokens for a FLOP budget or a model.
    #[command(allow_negative_numbers = true)]
    Scaling(ScalingArgs),
    /// Which GPUs the training state fits on, and days to train D tokens on N of them.
    #[command(allow_negative_numbers = true)]
    Gpus(GpusArgs),
    /// Serving memory (weights in any format, KV cache, prefill and decode peaks), proved on a
    /// genuine greedy generation run; what fits in a memory budget.
    Infer(InferArgs),
    /// Per-rank memory under tensor, pipeline and data parallelism (ZeRO, FSDP) as an engine
    /// lays it out; or, with --gpus, the layouts of N GPUs that fit.
    #[command(allow_negative_numbers = true)]
    Plan(PlanArgs),
}

pub use crate::report::Format;

/// Which model: a preset, a config file (truesize TOML or HF config.json) or a folder holding one.
#[derive(Debug, Args)]
pub struct ConfigArgs {
    /// truesize TOML, HF config.json, or an HF model folder.
    #[arg(long, value_name = "PATH", conflicts_with = "preset")]
    pub config: Option<PathBuf>,
    /// Built-in preset (see `truesize presets`); baby-gpt when nothing is given.
    #[arg(long, value_name = "NAME")]
    pub preset: Option<String>,
}

/// Shape of one training step.
#[derive(Debug, Args)]
pub struct StepArgs {
    /// Sequences per batch (default: the config's [run] table, else 4).
    #[arg(long, value_name = "B")]
    pub batch: Option<usize>,
    /// Tokens per sequence (default: the config's [run] table, else 64, at most block_size).
    #[arg(long, value_name = "T")]
    pub seq: Option<usize>,
    /// Training dtype: f32, f16 or bf16 (default: the config's [run] table, else f32).
    #[arg(long, value_name = "DTYPE")]
    pub dtype: Option<String>,
}

#[derive(Debug, Args)]
pub struct EstimateArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
    /// A model folder or a GGUF file to read the config from (same as --config).
    #[arg(long, value_name = "PATH", conflicts_with_all = ["config", "preset"])]
    pub model: Option<std::path::PathBuf>,
    #[command(flatten)]
    pub step: StepArgs,
    #[command(flatten)]
    pub engine: EngineArgs,
    #[arg(long, value_enum, default_value_t = Format::Table)]
    pub format: Format,
}

#[derive(Debug, Args)]
pub struct VerifyArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
    /// HF checkpoint folder: config.json + model.safetensors (or a sharded index). Loads real
    /// weights. A GGUF file is accepted with --shapes-only (its header is checked).
    #[arg(long, value_name = "DIR", conflicts_with_all = ["config", "preset"])]
    pub model: Option<PathBuf>,
    /// Reference outputs (expected.safetensors + expected.json) to check logits, loss and gradients.
    #[arg(long, value_name = "PATH", conflicts_with = "shapes_only")]
    pub reference: Option<PathBuf>,
    /// cpu, cuda or cuda:N (cuda needs a build with `--features cuda`).
    #[arg(long, default_value = "cpu", conflicts_with = "shapes_only")]
    pub device: String,
    #[command(flatten)]
    pub step: StepArgs,
    /// Relative tolerance for the 12·d² rule where it applies (default 0.01).
    #[arg(long, value_name = "X", allow_negative_numbers = true)]
    pub tolerance: Option<f64>,
    /// Time the forward/backward pass N times and report medians.
    #[arg(
        long,
        default_value_t = 1,
        value_name = "N",
        conflicts_with = "shapes_only"
    )]
    pub repeat: usize,
    /// Count tensors by name and shape only, without allocating (any size, in milliseconds).
    #[arg(long)]
    pub shapes_only: bool,
    /// Seed for the random weights.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Memory the run may use, in bytes (overrides the available memory the OS reports).
    #[arg(long, value_name = "BYTES", conflicts_with = "shapes_only")]
    pub max_memory: Option<u64>,
    /// The device's peak in TFLOP/s (dense, at the run's dtype) for MFU; never assumed.
    #[arg(long, value_name = "TFLOPS", conflicts_with_all = ["measure_peak", "shapes_only"])]
    pub peak_tflops: Option<f64>,
    /// Measure the device's peak for MFU with a 2048×2048 f32 matmul probe (median of 5).
    #[arg(long, conflicts_with = "shapes_only")]
    pub measure_peak: bool,
    /// Skip writing the checkpoint file and quantizing the weights.
    #[arg(long)]
    pub no_artifacts: bool,
    /// Also measure 1- and 2-layer versions of the config and extrapolate the peak to its depth
    /// (works when the full model is refused for memory; compared with it when it ran).
    #[arg(long, conflicts_with = "shapes_only")]
    pub extrapolate: bool,
    /// After backward, take one real optimizer step and measure its peak (moments included).
    #[arg(long, value_enum, value_name = "OPT", conflicts_with = "shapes_only")]
    pub optimizer: Option<Optimizer>,
    #[command(flatten)]
    pub engine: EngineArgs,
    /// Print every table (default: one screen with what decides the verdict; JSON always has
    /// everything).
    #[arg(long)]
    pub full: bool,
    /// Data-parallel processes: one step across `mpirun -np N` processes over MPI (a build with
    /// `--features mpi`), gradients all-reduced and compared with the single-process step;
    /// N = TP·PP·DP with --tp / --pp.
    #[arg(long, value_name = "N")]
    pub dp: Option<usize>,
    /// Tensor-parallel ranks across processes (Megatron-style, whole heads per rank; with --pp
    /// and --dp: mpirun -np TP·PP·DP).
    #[arg(long, value_name = "N")]
    pub tp: Option<usize>,
    /// Pipeline stages across processes (even layers per stage, one microbatch).
    #[arg(long, value_name = "N")]
    pub pp: Option<usize>,
    /// ZeRO across the DP group of the multi-process step: 1 or 2 reduce-scatter the flat
    /// gradient buffer (DeepSpeed's layout) instead of all-reducing it; each rank keeps 1/DP.
    #[arg(long, value_name = "STAGE")]
    pub zero: Option<u8>,
    #[arg(long, value_enum, default_value_t = Format::Table)]
    pub format: Format,
}

/// Optimizers `verify --optimizer` can step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Optimizer {
    /// AdamW: two moments per parameter (in the master weights' dtype).
    Adamw,
    /// Plain SGD without momentum: no state.
    Sgd,
}

/// Which training step runs (and is predicted).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Engine {
    /// Explicit forward and backward keeping what PyTorch's autograd keeps (the default).
    Lean,
    /// candle's own autograd over the differentiable network (what a candle user's loop holds).
    Autograd,
}

/// Activation checkpointing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CheckpointArg {
    /// Keep every block's saved tensors.
    None,
    /// Keep each block's input; recompute the block during backward (HF gradient checkpointing).
    Blocks,
}

/// Attention's memory behaviour.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum AttentionArg {
    /// Flash-style (PyTorch SDPA on CPU): q, k, v, output and a per-row log-sum-exp kept.
    Flash,
    /// Eager (HF "eager"): the T×T probabilities kept for backward.
    Eager,
}

/// What the lean step's forward keeps for backward.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SavedArg {
    /// What PyTorch keeps for HF transformers' modules (composed ops' intermediates included).
    Transformers,
    /// Only what fused kernels read back (llm.c's set).
    Fused,
}

/// The training step's knobs, shared by estimate, verify and sweep.
#[derive(Debug, Args, Clone, Default)]
pub struct EngineArgs {
    /// lean (default: keeps what PyTorch keeps) or autograd (candle's own backward).
    #[arg(long, value_enum)]
    pub engine: Option<Engine>,
    /// Activation checkpointing: none (default) or blocks (lean engine).
    #[arg(long, value_enum)]
    pub checkpoint: Option<CheckpointArg>,
    /// flash (default) or eager attention (lean engine).
    #[arg(long, value_enum)]
    pub attention: Option<AttentionArg>,
    /// Mixed precision as PyTorch AMP does it: f32 master weights, gradients and optimizer
    /// states; matmuls and activations in --dtype (bf16 or f16). Lean engine.
    #[arg(long)]
    pub amp: bool,
    /// What the forward keeps (lean engine): transformers (default: what PyTorch keeps for HF
    /// transformers' modules, composed GELU and RMSNorm intermediates and the loss's f32
    /// log-probabilities included) or fused (only what fused kernels read back, as llm.c).
    #[arg(long, value_enum)]
    pub saved: Option<SavedArg>,
}

#[derive(Debug, Args)]
pub struct SweepArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
    /// Batch sizes, comma-separated.
    #[arg(long, value_name = "B,B,...", default_value = "1,2,4,8")]
    pub batch: String,
    /// Sequence lengths, comma-separated (each between 2 and block_size).
    #[arg(long, value_name = "T,T,...", default_value = "64,128,256")]
    pub seq: String,
    /// Training dtype: f32, f16 or bf16 (default: the config's [run] table, else f32).
    #[arg(long, value_name = "DTYPE")]
    pub dtype: Option<String>,
    /// Folder for sweep.csv, sweep.json and sweep.svg (created if missing).
    #[arg(long, value_name = "DIR", default_value = "sweep-out")]
    pub out: PathBuf,
    /// Seed for the random weights and tokens.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Memory the sweep may use, in bytes (overrides the available memory the OS reports).
    #[arg(long, value_name = "BYTES")]
    pub max_memory: Option<u64>,
    /// Format of the summary printed on stdout.
    #[command(flatten)]
    pub engine: EngineArgs,
    #[arg(long, value_enum, default_value_t = Format::Table)]
    pub format: Format,
}

#[derive(Debug, Args)]
pub struct PresetsArgs {
    #[arg(long, value_enum, default_value_t = Format::Table)]
    pub format: Format,
}

#[derive(Debug, Args)]
pub struct InspectArgs {
    /// A .safetensors file, a model.safetensors.index.json, an HF model folder, or a GGUF file.
    #[arg(value_name = "PATH")]
    pub path: PathBuf,
    /// Config to check the checkpoint against (default: the folder's config.json, if any).
    #[arg(long, value_name = "PATH")]
    pub config: Option<PathBuf>,
    #[arg(long, value_enum, default_value_t = Format::Table)]
    pub format: Format,
}

#[derive(Debug, Args)]
pub struct ScalingArgs {
    /// Training budget in FLOPs (e.g. 1e21): compute-optimal N and D for it.
    #[arg(long, value_name = "C")]
    pub flops: Option<f64>,
    /// The model to plan for (its exact parameter count is N).
    #[command(flatten)]
    pub config: ConfigArgs,
    #[arg(long, value_enum, default_value_t = Format::Table)]
    pub format: Format,
}

#[derive(Debug, Args)]
pub struct GpusArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
    #[command(flatten)]
    pub step: StepArgs,
    /// Training tokens D (default: 20 per parameter, the Chinchilla rule of thumb).
    #[arg(long, value_name = "D")]
    pub tokens: Option<f64>,
    /// Number of GPUs training together.
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub gpus: u64,
    /// Assumed model FLOPs utilisation, 0 < X ≤ 1 (default 0.40: an assumption, not a measurement).
    #[arg(long, value_name = "X")]
    pub mfu: Option<f64>,
    #[arg(long, value_enum, default_value_t = Format::Table)]
    pub format: Format,
}

#[derive(Debug, Args)]
pub struct InferArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
    /// Real weights: an HF model folder (config.json + safetensors) or a GGUF file.
    #[arg(long, value_name = "PATH", conflicts_with_all = ["config", "preset"])]
    pub model: Option<PathBuf>,
    /// Greedy-generation reference (greedy.json: prompt ids and HF's generated ids) to check the
    /// tokens against; supplies --prompt-ids and --generate unless given.
    #[arg(long, value_name = "PATH")]
    pub reference: Option<PathBuf>,
    /// cpu, cuda or cuda:N (cuda needs a build with `--features cuda`).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Concurrent sequences (default 1).
    #[arg(long, value_name = "B")]
    pub batch: Option<usize>,
    /// Prompt length in tokens, random ids drawn with --seed (default 32).
    #[arg(long, value_name = "P", conflicts_with = "prompt_ids")]
    pub prompt: Option<usize>,
    /// Prompt token ids, comma-separated (every sequence of the batch gets this prompt).
    #[arg(long, value_name = "IDS")]
    pub prompt_ids: Option<String>,
    /// Tokens to generate per sequence (default 16); the context is prompt + generate.
    #[arg(long, value_name = "N")]
    pub generate: Option<usize>,
    /// Weight storage: f32, f16, bf16 or a llama.cpp file type (q8_0, q6_k, q5_k_m, q4_k_m,
    /// q4_0, ...). A GGUF file's own tensor types are used as stored.
    #[arg(long, value_name = "FORMAT")]
    pub weights: Option<String>,
    /// K and V element type: f32, f16 or bf16 (default: the activation dtype).
    #[arg(long, value_name = "DTYPE")]
    pub kv_dtype: Option<String>,
    /// Tokens per prefill forward (default 512, llama.cpp's physical batch; the fit questions
    /// use it too).
    #[arg(long, value_name = "C")]
    pub prefill_chunk: Option<usize>,
    /// The estimate only, at any size: nothing is loaded or run.
    #[arg(long)]
    pub shapes_only: bool,
    /// Seed for random weights and random prompt ids.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Memory the run may use (bytes, or 24GiB / 24GB), instead of what the OS reports.
    #[arg(long, value_name = "SIZE")]
    pub max_memory: Option<String>,
    /// Memory budget for the fit questions (bytes, or 24GiB / 80GB).
    #[arg(long, value_name = "SIZE", conflicts_with = "gpu")]
    pub memory: Option<String>,
    /// A GPU from `truesize gpus` as the budget for the fit questions (its name, or a unique
    /// part of it such as "4090").
    #[arg(long, value_name = "NAME")]
    pub gpu: Option<String>,
    /// Runtime overhead assumed by the fit questions (default 1GiB; shown as its own line).
    #[arg(long, value_name = "SIZE")]
    pub overhead: Option<String>,
    /// Skip the full forward that checks the incremental decode's logits.
    #[arg(long)]
    pub no_full_forward: bool,
    #[arg(long, value_enum, default_value_t = Format::Table)]
    pub format: Format,
}

#[derive(Debug, Args)]
pub struct PlanArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
    /// Tensor-parallel ranks.
    #[arg(long, default_value_t = 1, value_name = "T")]
    pub tp: usize,
    /// Pipeline stages.
    #[arg(long, default_value_t = 1, value_name = "P")]
    pub pp: usize,
    /// Data-parallel ranks.
    #[arg(long, default_value_t = 1, value_name = "D")]
    pub dp: usize,
    /// ZeRO stage 0–3 (deepspeed; megatron: 1 = its distributed optimizer).
    #[arg(long, default_value_t = 0, value_name = "STAGE")]
    pub zero: u8,
    /// Shard with FSDP2 (implies --engine fsdp2).
    #[arg(long)]
    pub fsdp: bool,
    /// Whose conventions: megatron, deepspeed, fsdp2 or candle (default megatron; fsdp2 with --fsdp).
    #[arg(long, value_name = "NAME")]
    pub engine: Option<String>,
    /// Sequences per microbatch (default 1).
    #[arg(long, value_name = "B")]
    pub microbatch: Option<usize>,
    /// Microbatches per step (gradient accumulation; what the pipeline schedules; default 1).
    #[arg(long, value_name = "M")]
    pub grad_accum: Option<usize>,
    /// Tokens per sequence (default: the config's [run] table, else 64).
    #[arg(long, value_name = "T")]
    pub seq: Option<usize>,
    /// Training dtype: f32, f16 or bf16 (default bf16).
    #[arg(long, value_name = "DTYPE")]
    pub dtype: Option<String>,
    /// Layers of each pipeline stage, comma-separated (default: even).
    #[arg(long, value_name = "N,N,...")]
    pub pp_layers: Option<String>,
    /// Search the layouts of N GPUs (TP × PP × DP = N) that fit --gpu or --memory.
    #[arg(long, value_name = "N", conflicts_with_all = ["tp", "pp", "dp", "pp_layers"])]
    pub gpus: Option<usize>,
    /// A GPU from `truesize gpus` as the per-GPU memory (its name, or a unique part of it).
    #[arg(long, value_name = "NAME", requires = "gpus")]
    pub gpu: Option<String>,
    /// Per-GPU memory (bytes, or 80GiB / 80GB) for the search.
    #[arg(long, value_name = "SIZE", requires = "gpus", conflicts_with = "gpu")]
    pub memory: Option<String>,
    #[arg(long, value_enum, default_value_t = Format::Table)]
    pub format: Format,
}
