//! The shape of one training step: batch, sequence length and dtype, resolved from the command
//! line, the config's `[run]` table and the defaults, in that order.

use super::{check_run_size, ModelConfig};
use crate::dtype::TrainDtype;
use crate::error::Result;
use serde::Serialize;

/// Default batch when neither the command line nor the config's `[run]` table gives one.
pub const DEFAULT_BATCH: usize = 4;
/// Default sequence length (capped at the model's block size).
pub const DEFAULT_SEQ: usize = 64;

/// Shape of one step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Step {
    pub batch: usize,
    pub seq: usize,
    pub dtype: TrainDtype,
}

impl Step {
    /// batch, seq, dtype after command line > config `[run]` > defaults, validated against the
    /// model. `dtype` is the text the user wrote.
    pub fn resolve(
        cfg: &ModelConfig,
        batch: Option<usize>,
        seq: Option<usize>,
        dtype: Option<&str>,
    ) -> Result<Step> {
        let batch = batch.or(cfg.run.batch).unwrap_or(DEFAULT_BATCH);
        check_run_size("command line", "--batch", batch)?;
        let seq = match seq.or(cfg.run.seq) {
            Some(t) => {
                cfg.check_seq(t)?;
                t
            }
            None => DEFAULT_SEQ.min(cfg.block_size),
        };
        let dtype = match dtype.or(cfg.run.dtype.as_deref()) {
            Some(d) => TrainDtype::parse(d)?,
            None => TrainDtype::F32,
        };
        Ok(Step { batch, seq, dtype })
    }
}
