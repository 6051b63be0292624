use super::{LeanModel, LeanOptions};
use crate::error::{Error, Result};
use candle_core::Tensor;
pub fn run(
    _model: &LeanModel,
    _input_ids: &Tensor,
    _opts: &LeanOptions,
    _probe: &dyn crate::measure::probe::MemoryProbe,
    _baseline: u64,
    _weights_after_build: u64,
    _repeat: usize,
) -> Result<crate::measure::run::StepResult> {
    Err(Error::Internal(anyhow::anyhow!("stub")))
}
