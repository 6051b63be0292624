//! `verify --extrapolate`: the peak of the full depth from 1- and 2-layer runs .

mod common;
use common::*;

fn verify_json(args: &[&str]) -> serde_json::Value {
    let out = truesize()
        .args([
            "verify",
            "--extrapolate",
            "--no-artifacts",
            "--format",
            "json",
        ])
        .args(args)
        .output()
        .unwrap();
    assert!(
        matches!(out.status.code(), Some(0 | 1)),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    json_of(&out.stdout)
}

/// The peak is affine in depth (every layer keeps one copy of its activations and gradients at
/// the backward peak), so two shallow runs predict the 4-layer baby-gpt almost to the byte:
/// at batch 4 × seq 64, 137,507,028 B predicted vs 137,506,444 B measured (+0.0004%). verify gates
/// it at 5%; this holds it to 0.1%. (Small step here: debug builds of candle are slow.)
#[test]
fn baby_gpt_four_layers_from_one_and_two() {
    let j = verify_json(&["--batch", "2", "--seq", "16"]);
    let e = &j["extrapolation"];
    assert_eq!(e["n_layer"], 4);
    assert_eq!(e["measured_peak_bytes"], j["memory"]["peak_bytes"]);
    let err = e["rel_error"].as_f64().unwrap();
    assert!(err.abs() <= 1e-3, "extrapolation error {err}");
    assert!(err.abs() <= 0.05);
    // Every depth peaks in the same phase here: no lower-bound warning.
    assert!(e.get("warning").is_none(), "{e}");
    let per_layer = e["per_layer_bytes"].as_u64().unwrap();
    // One layer holds at least its f32 weights and gradients: 12·d² + 13·d params.
    assert!(per_layer > 2 * 4 * (12 * 256 * 256 + 13 * 256));
}

#[test]
fn llama_bf16_extrapolates_too() {
    let fixture = fixtures().join("tiny-llama");
    let j = verify_json(&[
        "--config",
        fixture.to_str().unwrap(),
        "--dtype",
        "bf16",
        "--batch",
        "3",
        "--seq",
        "20",
    ]);
    let err = j["extrapolation"]["rel_error"].as_f64().unwrap();
    assert!(err.abs() <= 0.01, "extrapolation error {err}");
}

/// A model refused for memory is still extrapolated: that is what the mode is for. Baby GPT at
/// batch 1 × seq 16 through candle's autograd needs ~55 MiB; its 1- and 2-layer versions fit in
/// 40 MB, the whole does not.
#[test]
fn refused_model_is_still_extrapolated() {
    let j = verify_json(&[
        "--max-memory",
        "40000000",
        "--batch",
        "1",
        "--seq",
        "16",
        "--engine",
        "autograd",
    ]);
    let e = &j["extrapolation"];
    // At least the f32 weights and gradients of baby-gpt.
    assert!(e["predicted_peak_bytes"].as_u64().unwrap() > 2 * 4 * 3_481_088);
    assert!(e.get("measured_peak_bytes").is_none());
    assert!(j.get("memory").is_none());
}

/// The rules of thumb sit beside the measured peak in the JSON report .
#[test]
fn rules_are_scored_against_the_measured_peak() {
    let j = verify_json(&["--batch", "1", "--seq", "16"]);
    let rules = j["rules"].as_array().unwrap();
    let keys: Vec<&str> = rules.iter().map(|r| r["key"].as_str().unwrap()).collect();
    assert_eq!(
        keys,
        [
            "truesize",
            "korthikanti_16bit",
            "korthikanti_dtype",
            "weights_x3",
            "weights_x4",
            "weights_grads_adam"
        ]
    );
    for r in rules {
        assert_eq!(r["measured_peak_bytes"], j["memory"]["peak_bytes"]);
        assert!(r["rel_error"].is_number());
    }
}

/// candle's autograd on a deep model with a large vocabulary: its 1- and 2-layer runs peak at the
/// head early in backward, the 24-layer model at the end of backward, so the affine rule is far too low
/// (measured −16.6%), while the replay at full depth, corrected by its error at 1 and 2 layers,
/// lands within 5% (measured −0.004%).
#[test]
fn head_dominated_depth_needs_the_model_guided_figure() {
    let (_d, p) = temp_file(
        "deep.toml",
        b"arch='gpt2'\nvocab_size=20000\nblock_size=256\nn_embd=128\nn_layer=24\nn_head=4\n",
    );
    let j = verify_json(&[
        "--config",
        p.to_str().unwrap(),
        "--batch",
        "1",
        "--seq",
        "64",
        "--engine",
        "autograd",
    ]);
    let e = &j["extrapolation"];
    let affine = e["rel_error"].as_f64().unwrap();
    let guided = e["model_guided_rel_error"].as_f64().unwrap();
    assert!(affine < -0.05, "affine extrapolation error {affine}");
    assert!(e.get("warning").is_some(), "{e}");
    assert!(guided.abs() <= 0.05, "model-guided error {guided}");
    assert_eq!(j["pass"], true);
}
