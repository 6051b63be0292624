//! FLOPs / MFU / checkpoint / quantized keys in `estimate` and `verify` JSON, and the `scaling`
//! and `gpus` commands (issue #6).

use assert_cmd::Command;
use predicates::str::contains;

fn json(args: &[&str]) -> serde_json::Value {
    let out = Command::cargo_bin("truesize")
        .unwrap()
        .args(args)
        .args(["--format", "json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// nanoGPT `transformer_sizing.ipynb`: bias-free GPT-2 124M at T = 1024.
#[test]
fn estimate_reports_the_nanogpt_flops() {
    let v = json(&["estimate", "--preset", "gpt2-nobias", "--seq", "1024"]);
    assert_eq!(v["params"]["total"].as_u64(), Some(124_337_664));
    assert_eq!(v["flops"]["forward"].as_u64(), Some(291_648_307_200));
    assert_eq!(
        format!("{:.4}", v["flops"]["palm_ratio"].as_f64().unwrap()),
        "1.0001"
    );
}

#[test]
fn verify_writes_a_checkpoint_and_quantizes() {
    let v = json(&["verify", "--preset", "baby-gpt", "--peak-tflops", "1"]);
    let c = &v["checkpoint"];
    assert_eq!(c["file_bytes"], c["predicted_bytes"]);
    // DESIGN.md: 3,481,088 f32 parameters = 13,924,352 data bytes
    assert_eq!(c["data_bytes"].as_u64(), Some(4 * 3_481_088));
    // training checkpoint: f32 weights + AdamW m, v
    assert_eq!(
        c["training_checkpoint_bytes"].as_u64(),
        Some(12 * 3_481_088)
    );
    // Every Baby GPT matrix has rows of 256 or 768 or 1024: all fit 32 and 256 blocks.
    assert_eq!(
        v["quantized"]["q4_0"]["bits_per_weight"].as_f64(),
        Some(4.5)
    );
    assert_eq!(
        v["quantized"]["q8_0"]["bits_per_weight"].as_f64(),
        Some(8.5)
    );
    assert_eq!(
        v["quantized"]["q4_k"]["bits_per_weight"].as_f64(),
        Some(4.5)
    );
    assert!(v["flops"]["forward"].as_u64().unwrap() > 0);
    assert_eq!(v["mfu"]["peak_flops_per_s"].as_f64(), Some(1e12));
    assert!(v["mfu"]["mfu"].as_f64().unwrap() > 0.0);
    assert_eq!(v["pass"], true);
}

#[test]
fn mfu_is_never_assumed() {
    let v = json(&["verify", "--preset", "baby-gpt", "--no-artifacts"]);
    assert!(v["mfu"]["achieved_flops_per_s"].as_f64().unwrap() > 0.0);
    assert!(v["mfu"].get("mfu").is_none());
    Command::cargo_bin("truesize")
        .unwrap()
        .args(["verify", "--preset", "baby-gpt", "--peak-tflops=0"])
        .assert()
        .code(2)
        .stderr(contains("--peak-tflops"));
}

#[test]
fn scaling_for_a_budget_and_a_model() {
    let v = json(&["scaling", "--flops", "5.76e23", "--preset", "gpt2"]);
    let n = v["budget"]["chinchilla"]["params"].as_f64().unwrap();
    let d = v["budget"]["chinchilla"]["tokens"].as_f64().unwrap();
    assert!((6.0 * n * d / 5.76e23 - 1.0).abs() < 1e-9);
    assert!((n / 3.219e10 - 1.0).abs() < 1e-3);
    assert_eq!(v["model"]["params"].as_u64(), Some(124_439_808));
    assert_eq!(
        v["model"]["rule_20"]["tokens"].as_f64(),
        Some(20.0 * 124_439_808.0)
    );
    Command::cargo_bin("truesize")
        .unwrap()
        .arg("scaling")
        .assert()
        .code(2)
        .stderr(contains("--flops"));
}

#[test]
fn gpus_table() {
    let v = json(&[
        "gpus", "--preset", "gpt2", "--tokens", "3e11", "--gpus", "8", "--mfu", "0.5",
    ]);
    let rows = v["rows"].as_array().unwrap();
    assert!(rows.len() >= 10);
    let a100 = rows
        .iter()
        .find(|r| r["gpu"]["name"] == "A100 40GB")
        .unwrap();
    assert_eq!(a100["fits"], true);
    let fpt = v["flops_per_token"].as_f64().unwrap();
    let days = fpt * 3e11 / (8.0 * 312e12 * 0.5) / 86_400.0;
    assert!((a100["days"].as_f64().unwrap() - days).abs() < 1e-9);
    Command::cargo_bin("truesize")
        .unwrap()
        .args(["gpus", "--mfu", "1.5"])
        .assert()
        .code(2)
        .stderr(contains("--mfu"));
}
