//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::PathBuf;
use truesize::config::{Arch, Dims, ModelConfig};
use truesize::measure::run::PhaseBytes;
use truesize::train::memory::LeanPrediction;

pub fn truesize() -> assert_cmd::Command {
    assert_cmd::Command::cargo_bin("truesize").expect("the truesize binary is built by cargo test")
}

pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

pub fn json_of(out: &[u8]) -> serde_json::Value {
    serde_json::from_slice(out).expect("stdout is JSON")
}

/// Write `text` to a fresh temp file named `name` and return (dir guard, path).
pub fn temp_file(name: &str, text: &[u8]) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("temp dir");
    let p = dir.path().join(name);
    std::fs::write(&p, text).expect("write temp file");
    (dir, p)
}

/// A small valid config of `arch`: vocabulary v, width d, l layers, h query / kv key-value heads,
/// MLP width ff, 512 positions.
pub fn tiny_config(
    arch: Arch,
    v: usize,
    d: usize,
    l: usize,
    h: usize,
    kv: usize,
    ff: usize,
) -> ModelConfig {
    let c = ModelConfig::plain(
        format!("{arch:?} v{v} d{d} l{l} h{h}/{kv} ff{ff}"),
        arch,
        if arch == Arch::Gpt2 { "gpt2" } else { "llama" },
        Dims {
            vocab_size: v,
            block_size: 512,
            n_embd: d,
            n_layer: l,
            n_head: h,
            n_kv_head: kv,
            head_dim: d / h,
            intermediate_size: ff,
        },
    );
    c.validate().unwrap();
    c
}

/// One line comparing a lean step's measured phases with the closed form's (shown on failure).
pub fn print_phases(what: &str, m: &PhaseBytes, p: &LeanPrediction) {
    eprintln!(
        "{what}: peak {} / {} ({:+.2}%), fwd peak {} / {}, after fwd {} / {}, \
         bwd peak {} / {}, weights {} / {}, grads {} / {}, opt {:?} / {:?}",
        m.peak_bytes,
        p.peak_bytes,
        100.0 * (p.peak_bytes as f64 - m.peak_bytes as f64) / m.peak_bytes as f64,
        m.forward_peak_bytes,
        p.forward_peak_bytes,
        m.after_forward_bytes,
        p.weights_bytes + p.saved_bytes,
        m.backward_peak_bytes,
        p.backward_peak_bytes,
        m.weights_bytes,
        p.weights_bytes,
        m.gradients_bytes,
        p.gradients_bytes,
        m.optimizer_peak_bytes,
        p.optimizer_peak_bytes,
    );
}
