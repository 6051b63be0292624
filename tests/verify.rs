//! `truesize verify` through the binary: the genuine model against the estimate.

mod common;
use common::*;
use predicates::prelude::*;

fn verify_json(args: &[&str]) -> (i32, serde_json::Value) {
    let out = truesize()
        .arg("verify")
        .args(args)
        .args(["--format", "json"])
        .output()
        .unwrap();
    let code = out.status.code().unwrap_or(-1);
    assert!(
        code == 0 || code == 1,
        "exit {code}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (code, json_of(&out.stdout))
}

fn failed_checks(j: &serde_json::Value) -> Vec<String> {
    j["checks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["gating"] == true && c["pass"] == false)
        .map(|c| c.to_string())
        .collect()
}

#[test]
fn baby_gpt_default_passes_with_census_equal_to_estimate() {
    let (code, j) = verify_json(&[]);
    assert_eq!(code, 0, "{:?}", failed_checks(&j));
    assert_eq!(j["pass"], true);
    assert_eq!(j["params"]["total"], 3_481_088);
    assert_eq!(j["census"]["numel"], 3_481_088);
    assert_eq!(j["census"]["bytes"], 3_481_088u64 * 4);
    assert_eq!(j["census"]["dtype"], "f32");
    assert_eq!(j["census"]["tensors"], 52);
    let m = &j["memory"];
    let weights = m["weights_bytes"].as_u64().unwrap();
    let peak = m["peak_bytes"].as_u64().unwrap();
    // Allocator-measured weights: numel × 4 plus a little bookkeeping.
    assert!(
        (3_481_088 * 4..3_481_088 * 4 + 52 * 512).contains(&weights),
        "{weights}"
    );
    // Forward keeps activations, backward adds gradients: the peak is well above the weights.
    assert!(peak > 2 * weights, "{peak}");
    assert!(m["after_forward_bytes"].as_u64().unwrap() > weights);
    assert!(j["timing"]["forward_s"].as_f64().unwrap() > 0.0);
    let rough = j["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "12·d² rule vs census")
        .unwrap();
    assert_eq!(rough["gating"], true);
    assert_eq!(rough["pass"], true);
}

/// Every folder under tests/fixtures is a reference checkpoint: loading it and running its
/// inputs must reproduce HF's logits, loss and gradient norms, through the lean step (every
/// family's switches are implemented there: no fallback to candle's autograd). New folders are
/// picked up.
#[test]
fn every_fixture_matches_its_reference() {
    let mut n = 0;
    for dir in std::fs::read_dir(fixtures()).unwrap() {
        let dir = dir.unwrap().path();
        if !dir.join("expected.safetensors").is_file() {
            continue;
        }
        n += 1;
        let d = dir.to_str().unwrap();
        let (code, j) = verify_json(&["--model", d, "--reference", d]);
        assert_eq!(code, 0, "{d}: {:?}", failed_checks(&j));
        assert_eq!(j["run"]["engine"], "lean", "{d}: notes {}", j["notes"]);
        let notes = j["notes"].to_string();
        assert!(!notes.contains("lean step cannot"), "{d}: {notes}");
        let names: Vec<&str> = j["checks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        for want in [
            "reference: logits max relative error",
            "reference: loss",
            "reference: gradient norms, worst relative error",
            "every parameter got a gradient",
        ] {
            assert!(names.contains(&want), "{d}: no check {want:?}");
        }
    }
    assert!(
        n >= 4,
        "expected at least the four shared fixtures, found {n}"
    );
}

#[test]
fn half_precision_runs_pass() {
    for dtype in ["bf16", "f16"] {
        let (code, j) = verify_json(&["--dtype", dtype, "--batch", "2", "--seq", "32"]);
        assert_eq!(code, 0, "{dtype}: {:?}", failed_checks(&j));
        assert_eq!(j["census"]["dtype"], dtype);
        assert_eq!(j["census"]["bytes"], 3_481_088u64 * 2);
    }
}

/// `--amp`: f32 master weights (census and gradients f32), the lean engine's AMP step, its
/// peak predicted within the gate; what the AMP step does not implement is refused naming
/// `--amp`.
#[test]
fn amp_runs_pass_and_refusals_name_the_flag() {
    for (arch, dtype) in [
        ("arch='gpt2'\nvocab_size=300\nblock_size=64\nn_embd=64\nn_layer=2\nn_head=4\n", "bf16"),
        ("arch='llama'\nvocab_size=300\nblock_size=64\nn_embd=64\nn_layer=2\nn_head=8\nn_kv_head=2\nintermediate_size=160\n", "f16"),
    ] {
        let (_d, p) = temp_file("m.toml", arch.as_bytes());
        let cfg = p.to_str().unwrap();
        let (code, j) = verify_json(&[
            "--config", cfg, "--batch", "2", "--seq", "16", "--dtype", dtype, "--amp",
        ]);
        assert_eq!(code, 0, "{arch}: {:?}", failed_checks(&j));
        assert_eq!(j["run"]["amp"], dtype);
        assert_eq!(j["run"]["engine"], "lean");
        let numel = j["params"]["total"].as_u64().unwrap();
        assert_eq!(j["census"]["bytes"].as_u64().unwrap(), 4 * numel, "f32 master weights");
        let grads = j["memory"]["gradients_bytes"].as_u64().unwrap();
        assert!(grads >= 4 * numel, "f32 gradients: {grads} for {numel}");
        let (m, p) = (
            j["memory"]["peak_bytes"].as_f64().unwrap(),
            j["memory"]["predicted_peak_bytes"].as_f64().unwrap(),
        );
        assert!((p - m).abs() / m <= 0.02, "{arch}: predicted {p} vs measured {m}");
    }
    let mistral = "arch='llama'\nvocab_size=300\nblock_size=64\nn_embd=64\nn_layer=1\nn_head=4\nn_kv_head=2\nintermediate_size=96\nsliding_window=8\n";
    let (_d, p) = temp_file("m.toml", mistral.as_bytes());
    for (extra, why) in [
        (vec!["--saved", "fused"], "fused saved set"),
        (vec!["--attention", "eager"], "eager attention"),
        (
            vec!["--config", p.to_str().unwrap()],
            "sliding window in effect",
        ),
    ] {
        truesize()
            .args([
                "verify", "--batch", "2", "--seq", "16", "--dtype", "bf16", "--amp",
            ])
            .args(&extra)
            .assert()
            .code(2)
            .stderr(predicate::str::contains("--amp"))
            .stderr(predicate::str::contains(why))
            .stderr(predicate::str::contains("panicked").not());
    }
    // Shorter than the window, the window is not in effect: plain causal attention, as HF's.
    let windowed = "arch='llama'\nvocab_size=300\nblock_size=64\nn_embd=64\nn_layer=2\nn_head=8\nn_kv_head=2\nintermediate_size=160\nsliding_window=32\n";
    let (_d, p) = temp_file("w.toml", windowed.as_bytes());
    let cfg = p.to_str().unwrap();
    let (code, j) = verify_json(&[
        "--config", cfg, "--batch", "2", "--seq", "16", "--dtype", "bf16", "--amp",
    ]);
    assert_eq!(code, 0, "{:?}", failed_checks(&j));
    assert_eq!(j["run"]["amp"], "bf16");
}

#[test]
fn llama_family_random_models_pass() {
    for preset_cfg in [
        "arch='llama'\nvocab_size=300\nblock_size=64\nn_embd=64\nn_layer=2\nn_head=8\nn_kv_head=2\nintermediate_size=160\n",
        "arch='llama'\nvocab_size=300\nblock_size=64\nn_embd=64\nn_layer=2\nn_head=4\nn_kv_head=1\nhead_dim=32\nintermediate_size=96\nqkv_bias=true\ntie_embeddings=true\n",
        "arch='llama'\nvocab_size=300\nblock_size=64\nn_embd=64\nn_layer=1\nn_head=4\nn_kv_head=2\nintermediate_size=96\nn_experts=4\nn_experts_per_tok=2\n",
        "arch='gpt2'\nvocab_size=300\nblock_size=64\nn_embd=64\nn_layer=2\nn_head=4\nbias=false\n",
    ] {
        let (_d, p) = temp_file("m.toml", preset_cfg.as_bytes());
        let (code, j) = verify_json(&["--config", p.to_str().unwrap(), "--batch", "2", "--seq", "16"]);
        assert_eq!(code, 0, "{preset_cfg}: {:?}", failed_checks(&j));
        assert_eq!(j["census"]["numel"], j["params"]["total"]);
    }
}

#[test]
fn shapes_only_counts_405b_without_allocating() {
    let (code, j) = verify_json(&["--preset", "llama3.1-405b", "--shapes-only"]);
    assert_eq!(code, 0, "{:?}", failed_checks(&j));
    assert_eq!(j["census"]["numel"].as_u64(), Some(405_853_388_800));
    assert_eq!(j["census"]["shapes_only"], true);
    // 405B parameters would be 1.6 TB in f32; the process stays in the tens of MB.
    let rss = j["peak_rss_bytes"].as_u64().unwrap();
    assert!(rss < 200 << 20, "peak RSS {rss}");
}

#[test]
fn too_big_is_refused_before_allocating() {
    let out = truesize()
        .args(["verify", "--preset", "llama3.1-405b"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("refused"), "{err}");
    assert!(err.contains("--shapes-only"), "{err}");
    assert!(err.contains("GiB"), "{err}");
    // The census still ran, shape-only.
    assert!(String::from_utf8_lossy(&out.stdout).contains("405,853,388,800"));
    // A small model with a tiny explicit limit is refused too.
    truesize()
        .args(["verify", "--max-memory", "1000000"])
        .assert()
        .code(1)
        .stderr(predicate::str::contains("only 1,000,000 B"));
}

#[test]
fn measurements_are_deterministic() {
    let (_, a) = verify_json(&["--seed", "3"]);
    let (_, b) = verify_json(&["--seed", "3"]);
    for key in [
        "weights_bytes",
        "forward_peak_bytes",
        "after_forward_bytes",
        "backward_peak_bytes",
        "gradients_bytes",
        "peak_bytes",
    ] {
        assert_eq!(a["memory"][key], b["memory"][key], "{key}");
    }
    assert_eq!(a["loss"], b["loss"]);
    assert_eq!(a["census"], b["census"]);
}

#[test]
fn bad_verify_input() {
    for (args, want) in [
        (vec!["verify", "--device", "cuda"], "--features cuda"),
        (vec!["verify", "--device", "cuda:7"], "cuda:7"),
        (vec!["verify", "--device", "tpu"], "--device = \"tpu\""),
        (vec!["verify", "--dtype", "int8"], "dtype = \"int8\""),
        (vec!["verify", "--repeat", "0"], "--repeat = 0"),
        (vec!["verify", "--tolerance", "-1"], "--tolerance = -1"),
        (vec!["verify", "--model", "/no/such/dir"], "/no/such/dir"),
        (
            vec!["verify", "--reference", "/no/such/ref"],
            "/no/such/ref",
        ),
    ] {
        truesize()
            .args(&args)
            .assert()
            .code(2)
            .stderr(predicate::str::contains(want))
            .stderr(predicate::str::contains("panicked").not());
    }
}

/// `--shapes-only` loads no weights, yet a `--model` checkpoint is still checked from its headers.
#[test]
fn shapes_only_still_checks_the_checkpoint_headers() {
    let (code, j) = verify_json(&[
        "--model",
        fixtures().join("tiny-llama").to_str().unwrap(),
        "--shapes-only",
    ]);
    assert_eq!(code, 0, "{:?}", failed_checks(&j));
    assert!(j["checks"].as_array().unwrap().iter().any(|c| c["name"]
        .as_str()
        .unwrap()
        .starts_with("checkpoint headers:")));
    let d = tempfile::tempdir().unwrap();
    let src = fixtures().join("tiny-gpt2");
    std::fs::copy(src.join("config.json"), d.path().join("config.json")).unwrap();
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    std::fs::write(d.path().join("model.safetensors"), &bytes[..1000]).unwrap();
    truesize()
        .args([
            "verify",
            "--shapes-only",
            "--model",
            d.path().to_str().unwrap(),
        ])
        .assert()
        .code(2)
        .stderr(predicate::str::contains("model.safetensors"))
        .stderr(predicate::str::contains("runs past the end"));
}

/// The default table is one screen that ends in the verdict; `--full` prints every table; the
/// JSON has everything either way.
#[test]
fn headline_fits_one_screen_and_full_prints_everything() {
    let out = truesize()
        .args(["verify", "--no-artifacts"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.lines().count() <= 50,
        "{} lines:\n{text}",
        text.lines().count()
    );
    for part in [
        "baby-gpt",
        "census (numel)",
        "Where the 12·d² rule differs",
        "Peak memory: predicted vs measured",
        "verdict: PASS",
    ] {
        assert!(text.contains(part), "{part} missing:\n{text}");
    }
    assert!(!text.contains("Rules of thumb vs measured peak"));
    let full = truesize()
        .args(["verify", "--no-artifacts", "--full"])
        .output()
        .unwrap();
    let full = String::from_utf8(full.stdout).unwrap();
    for part in [
        "Rules of thumb vs measured peak",
        "Memory of one training step (measured)",
        "FLOPs of one sequence",
        "verdict: PASS",
    ] {
        assert!(full.contains(part), "{part} missing from --full");
    }
    assert!(full.lines().count() > text.lines().count());
}

/// A failed check comes first in the headline, with its numbers.
#[test]
fn headline_shows_failed_checks_first() {
    let out = truesize()
        .args(["verify", "--no-artifacts", "--max-memory", "1000"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("Checks that failed"), "{text}");
    assert!(
        text.contains("memory preflight: predicted peak fits"),
        "{text}"
    );
    assert!(text.contains("verdict: FAIL"), "{text}");
}

/// `args` with `--format json`, which must succeed.
fn ok_json(args: &[&str]) -> serde_json::Value {
    let out = truesize()
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
fn verify_writes_a_checkpoint_and_quantizes() {
    let v = ok_json(&["verify", "--preset", "baby-gpt", "--peak-tflops", "1"]);
    let c = &v["checkpoint"];
    assert_eq!(c["file_bytes"], c["predicted_bytes"]);
    // configs/baby-gpt.toml: 3,481,088 f32 parameters = 13,924,352 data bytes
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
    let v = ok_json(&["verify", "--preset", "baby-gpt", "--no-artifacts"]);
    assert!(v["mfu"]["achieved_flops_per_s"].as_f64().unwrap() > 0.0);
    assert!(v["mfu"].get("mfu").is_none());
    truesize()
        .args(["verify", "--preset", "baby-gpt", "--peak-tflops=0"])
        .assert()
        .code(2)
        .stderr(predicate::str::contains("--peak-tflops"));
}
