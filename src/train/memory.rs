use super::LeanOptions;
use crate::config::{ModelConfig, Step};
use serde::Serialize;
#[derive(Debug, Clone, Serialize)]
pub struct LeanPrediction {
    pub weights_bytes: u64,
    pub saved_bytes: u64,
    pub forward_peak_bytes: u64,
    pub backward_peak_bytes: u64,
    pub gradients_bytes: u64,
    pub peak_bytes: u64,
    pub optimizer_state_bytes: Option<u64>,
    pub optimizer_peak_bytes: Option<u64>,
    pub terms: Vec<(String, u64)>,
}
pub fn predict(_cfg: &ModelConfig, _step: Step, _opts: &LeanOptions) -> LeanPrediction {
    LeanPrediction {
        weights_bytes: 0,
        saved_bytes: 0,
        forward_peak_bytes: 0,
        backward_peak_bytes: 0,
        gradients_bytes: 0,
        peak_bytes: 0,
        optimizer_state_bytes: None,
        optimizer_peak_bytes: None,
        terms: vec![],
    }
}
