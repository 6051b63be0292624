//! Artifacts: the checkpoint file written and measured, quantized sizes.

use crate::report::section::{bytes_cells, row_bytes, s, Section};
use crate::report::sizing::Report;
use crate::units::group;

/// The `.safetensors` file written from the model, beside its prediction.
pub fn checkpoint(r: &Report) -> Option<Section> {
    let c = r.checkpoint.as_ref()?;
    Some(Section {
        title: "Checkpoint (.safetensors written and measured)".into(),
        header: vec![s("part"), s("bytes"), s("binary")],
        rows: vec![
            row_bytes("file (measured)", c.file_bytes),
            row_bytes("predicted: 8 + header + data", c.predicted_bytes),
            row_bytes("header (JSON, padded to 8)", c.header_bytes),
            row_bytes("tensor data", c.data_bytes),
            row_bytes(
                "training checkpoint: f32 weights + AdamW m, v",
                c.training_checkpoint_bytes,
            ),
        ],
        notes: vec![format!(
            "{} tensors; overhead beyond the data {} B ({:.4}% of the file); written in {:.1} ms",
            c.tensors,
            group(c.overhead_bytes),
            100.0 * c.overhead_bytes as f64 / c.file_bytes.max(1) as f64,
            c.save_s * 1e3
        )],
    })
}

/// Real candle QTensors per quantized format.
pub fn quantized(r: &Report) -> Option<Section> {
    let q = r.quantized.as_ref()?;
    Some(Section {
        title: "Quantized weights (real candle QTensors)".into(),
        header: ["format", "bytes", "binary", "bits/weight", "bits/param", "naive bytes", "vs naive", "vs f32", "kept (1-D / misfit)"]
            .map(s)
            .to_vec(),
        rows: q
            .iter()
            .map(|(name, x)| {
                let [b, h] = bytes_cells(x.bytes);
                vec![
                    s(name),
                    b,
                    h,
                    x.bits_per_weight.map_or_else(|| s("none fit"), |b| format!("{b:.3}")),
                    format!("{:.3}", x.bits_per_param),
                    group(x.naive_bytes),
                    format!("{:.3}×", x.vs_naive),
                    format!("{:.2}× smaller", x.compression_vs_f32),
                    format!("{} / {}", x.kept_tensors, x.kept_misfit_tensors),
                ]
            })
            .collect(),
        notes: vec![s(
            "2-D matrices whose rows are a multiple of the block are quantized; norms, biases and misfits stay in their dtype",
        )],
    })
}
