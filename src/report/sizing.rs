//! What `estimate`, `verify` and `gpus` found about one model and one step: the estimate, and
//! for verify the census, the measured memory and timing, the artifacts and the checks.

use crate::check::Check;
use crate::config::ModelConfig;
use crate::estimate::memory::{TrainingMemory, WeightBytes};
use crate::estimate::ParamEstimate;
use crate::measure::census::Census;
use crate::measure::run::PhaseBytes;
use crate::model::autograd_replay::ActivationModel;
use serde::Serialize;

/// What `estimate`, `verify` and `gpus` found, serialised as the JSON contract.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub command: &'static str,
    pub model: ModelConfig,
    pub run: RunInfo,
    pub params: ParamEstimate,
    pub weights: Vec<WeightBytes>,
    pub training: TrainingMemory,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub census: Option<Census>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory: Option<MemoryReport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timing: Option<Timing>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub loss: Option<f64>,
    /// FLOPs of one sequence of `run.seq` tokens (estimate::flops).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub flops: Option<crate::estimate::flops::FlopsEstimate>,
    /// Achieved FLOP/s and MFU from the measured step (verify).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mfu: Option<crate::estimate::flops::Mfu>,
    /// A real `.safetensors` file written and measured (verify).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<crate::checkpoint::write::CheckpointReport>,
    /// Sizes from real quantized tensors, by format (verify).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub quantized: Option<crate::measure::quantize::QuantizedReport>,
    /// Rules of thumb for the peak beside our prediction, each scored against the measured peak.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<crate::estimate::rules::RuleOfThumb>,
    /// `verify --extrapolate`: the peak predicted from 1- and 2-layer runs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub extrapolation: Option<crate::measure::extrapolate::Extrapolation>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub checks: Vec<Check>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pass: Option<bool>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
    /// Peak resident set size of this process (context: shows shape-only runs allocate nothing).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peak_rss_bytes: Option<u64>,
    /// The per-op replay of the step, computed once per run (its peak is
    /// `memory.predicted_peak_bytes` and the first rule of thumb).
    #[serde(skip)]
    pub activation: Option<ActivationModel>,
    /// The predicted step of the engine that runs (`run.engine`).
    pub step_model: Option<StepModel>,
}

/// A training step's prediction, whichever engine computes it.
#[derive(Debug, Clone, Serialize)]
pub struct StepModel {
    /// "lean" (the closed form of what the step saves) or "autograd" (the per-op replay).
    pub engine: &'static str,
    /// Highest point of forward + loss + backward above the pre-build baseline, weights included.
    pub peak_bytes: u64,
    /// Highest point of the optimizer update, when the step takes one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub optimizer_peak_bytes: Option<u64>,
    pub weights_bytes: u64,
    pub gradients_bytes: u64,
    /// What the forward keeps for backward (lean engine).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub saved_bytes: Option<u64>,
    /// The closed form term by term (lean engine).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub terms: Vec<(String, u64)>,
}

#[derive(Debug, Clone, Serialize)]
pub struct RunInfo {
    pub batch: usize,
    pub seq: usize,
    pub dtype: crate::dtype::TrainDtype,
    /// The training step: "lean" or "autograd".
    #[serde(skip_serializing_if = "Option::is_none")]
    pub engine: Option<&'static str>,
    /// Activation checkpointing (lean engine): "none" or "blocks".
    #[serde(skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<crate::train::Checkpoint>,
    /// Attention (lean engine): "flash" or "eager".
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attention: Option<crate::train::Attention>,
    /// Mixed precision's compute dtype (AMP), when used.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub amp: Option<String>,
    /// What the lean step's forward keeps: "transformers" or "fused".
    #[serde(skip_serializing_if = "Option::is_none")]
    pub saved: Option<crate::train::SavedSet>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tolerance: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub repeat: Option<usize>,
    /// Where the weights came from: "random (seed N)" or the checkpoint path.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub weights: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct MemoryReport {
    /// How bytes were measured.
    pub source: &'static str,
    #[serde(flatten)]
    pub phases: PhaseBytes,
    /// Analytic prediction of `peak_bytes` (the autograd replay).
    pub predicted_peak_bytes: u64,
    /// Measured peak minus the weights: what training adds on top of the model.
    pub peak_above_weights_bytes: u64,
    /// Process RSS at the end, for context only (includes the runtime, ~80–100 MiB).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rss_bytes: Option<u64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Timing {
    pub repeat: usize,
    /// Median over `repeat` runs, seconds.
    pub forward_s: f64,
    pub backward_s: f64,
    pub build_s: f64,
}
