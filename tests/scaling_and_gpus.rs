//! `truesize scaling` and `truesize gpus` through the binary: planning from the estimate.

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
