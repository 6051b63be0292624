//! STUB for integration only; replaced by the lean branch's module on merge.
pub mod memory;
pub mod run;

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use candle_core::Tensor;
use serde::Serialize;
use std::collections::BTreeMap;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Checkpoint {
    None,
    Blocks,
}
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Attention {
    Flash,
    Eager,
}
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Optimizer {
    AdamW,
    Sgd,
}
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct LeanOptions {
    pub checkpoint: Checkpoint,
    pub attention: Attention,
    #[serde(skip)]
    pub amp: Option<candle_core::DType>,
    pub optimizer: Option<Optimizer>,
}
impl Default for LeanOptions {
    fn default() -> Self {
        LeanOptions {
            checkpoint: Checkpoint::None,
            attention: Attention::Flash,
            amp: None,
            optimizer: None,
        }
    }
}
pub fn supported(_cfg: &ModelConfig, _opts: &LeanOptions) -> std::result::Result<(), String> {
    Err("stub".into())
}
pub struct LeanModel;
impl LeanModel {
    pub fn from_varmap(_cfg: &ModelConfig, _varmap: &candle_nn::VarMap) -> Result<LeanModel> {
        Err(Error::Internal(anyhow::anyhow!("stub")))
    }
    pub fn logits(&self, _input_ids: &Tensor) -> Result<Tensor> {
        Err(Error::Internal(anyhow::anyhow!("stub")))
    }
    pub fn loss_and_grads(
        &self,
        _input_ids: &Tensor,
        _opts: &LeanOptions,
    ) -> Result<(f64, BTreeMap<String, Tensor>)> {
        Err(Error::Internal(anyhow::anyhow!("stub")))
    }
}
