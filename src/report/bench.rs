//! What the hidden `truesize bench-matmul` measured: this machine's f32 matmul roofline.

use super::render::{Render, View};
use super::section::{s, Section};
use serde::Serialize;

/// Fields in alphabetical order (the order scripts have always seen).
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub flops_per_s: f64,
    /// Side of the square matmul.
    pub matmul_size: usize,
    pub source: String,
}

impl Render for BenchReport {
    fn sections(&self, _view: View) -> Vec<Section> {
        vec![Section {
            title: "f32 matmul roofline".into(),
            header: vec![s("measure"), s("value")],
            rows: vec![
                vec![s("matmul size"), s(self.matmul_size)],
                vec![s("FLOP/s"), format!("{:.4e}", self.flops_per_s)],
            ],
            notes: vec![self.source.clone()],
        }]
    }
}
