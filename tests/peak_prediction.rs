//! The autograd replay's peak prediction (`model::autograd_replay`) against the counting
//! allocator, through the binary, on a grid of small GPT-2 and Llama shapes in f32 and bf16,
//! including seq ≥ 256 on a small width, and the AdamW step.

mod common;

use common::{fixtures, json_of, temp_file, truesize};
use truesize::config::{self, ConfigSource};
use truesize::dtype::TrainDtype;
use truesize::model::autograd_replay::{self as activations, Step};

/// verify's gate for predicted vs measured peaks.
const TOLERANCE: f64 = 0.05;

const GPT2_NOBIAS_UNTIED: &str = r#"
name = "gpt2-nobias-untied"
arch = "gpt2"
vocab_size = 5000
block_size = 512
n_embd = 64
n_layer = 2
n_head = 4
bias = false
tie_embeddings = false
"#;

const LLAMA_GQA: &str = r#"
name = "llama-gqa"
arch = "llama"
vocab_size = 2000
block_size = 512
n_embd = 128
n_layer = 2
n_head = 8
n_kv_head = 2
intermediate_size = 344
tie_embeddings = false
"#;

const LLAMA_MQA_QKV_BIAS: &str = r#"
name = "llama-mqa"
arch = "llama"
vocab_size = 3000
block_size = 512
n_embd = 96
n_layer = 2
n_head = 6
n_kv_head = 1
head_dim = 24
intermediate_size = 256
tie_embeddings = true
qkv_bias = true
"#;

const MOE: &str = r#"
name = "moe"
arch = "llama"
vocab_size = 1500
block_size = 512
n_embd = 128
n_layer = 2
n_head = 4
n_kv_head = 2
intermediate_size = 256
n_experts = 4
n_experts_per_tok = 2
tie_embeddings = false
"#;

/// Run `verify` and return (predicted, measured) of the named check.
fn verify_check(args: &[&str], check: &str) -> (f64, f64) {
    let out = truesize()
        .arg("verify")
        .args(args)
        // The replay predicts candle's own autograd step.
        .args(["--engine", "autograd", "--no-artifacts", "--format", "json"])
        .output()
        .expect("run truesize");
    let v = json_of(&out.stdout);
    let c = v["checks"]
        .as_array()
        .expect("checks")
        .iter()
        .find(|c| c["name"] == check)
        .unwrap_or_else(|| panic!("no check {check:?} for {args:?}"))
        .clone();
    (
        c["measured"].as_f64().expect("predicted"),
        c["expected"].as_f64().expect("measured"),
    )
}

fn assert_close(args: &[&str], check: &str) {
    let (predicted, measured) = verify_check(args, check);
    let err = (predicted - measured) / measured;
    assert!(
        err.abs() <= TOLERANCE,
        "{check}: predicted {predicted} vs measured {measured} ({:+.2}%) for {args:?}",
        err * 100.0
    );
}

const PEAK: &str = "peak memory: predicted vs measured";
const ADAMW: &str = "optimizer peak: predicted vs measured";

#[test]
fn baby_gpt_f32_and_bf16_with_adamw() {
    let a = ["--preset", "baby-gpt", "--batch", "4", "--seq", "64"];
    let mut f32_args = a.to_vec();
    f32_args.extend(["--optimizer", "adamw"]);
    assert_close(&f32_args, PEAK);
    assert_close(&f32_args, ADAMW);
    let bf16 = [
        "--preset",
        "baby-gpt",
        "--batch",
        "2",
        "--seq",
        "128",
        "--dtype",
        "bf16",
        "--optimizer",
        "adamw",
    ];
    assert_close(&bf16, PEAK);
    assert_close(&bf16, ADAMW);
}

#[test]
fn gpt2_untied_without_bias_long_sequence() {
    let (_d, p) = temp_file("gpt2.toml", GPT2_NOBIAS_UNTIED.as_bytes());
    let p = p.to_str().expect("utf-8 path");
    for (b, t, dt) in [
        ("2", "256", "f32"),
        ("1", "512", "bf16"),
        ("16", "16", "f32"),
    ] {
        assert_close(
            &["--config", p, "--batch", b, "--seq", t, "--dtype", dt],
            PEAK,
        );
    }
}

#[test]
fn llama_gqa_mqa_bias_tied() {
    let (_d1, gqa) = temp_file("gqa.toml", LLAMA_GQA.as_bytes());
    let (_d2, mqa) = temp_file("mqa.toml", LLAMA_MQA_QKV_BIAS.as_bytes());
    let gqa = gqa.to_str().expect("utf-8 path");
    let mqa = mqa.to_str().expect("utf-8 path");
    assert_close(
        &[
            "--config", gqa, "--batch", "2", "--seq", "256", "--dtype", "f32",
        ],
        PEAK,
    );
    let bf16 = [
        "--config",
        gqa,
        "--batch",
        "4",
        "--seq",
        "64",
        "--dtype",
        "bf16",
        "--optimizer",
        "adamw",
    ];
    assert_close(&bf16, PEAK);
    assert_close(&bf16, ADAMW);
    assert_close(
        &[
            "--config", mqa, "--batch", "8", "--seq", "32", "--dtype", "bf16",
        ],
        PEAK,
    );
    assert_close(
        &[
            "--config", mqa, "--batch", "1", "--seq", "256", "--dtype", "f32",
        ],
        PEAK,
    );
}

#[test]
fn mixture_of_experts() {
    let (_d, p) = temp_file("moe.toml", MOE.as_bytes());
    let p = p.to_str().expect("utf-8 path");
    assert_close(
        &[
            "--config",
            p,
            "--batch",
            "8",
            "--seq",
            "64",
            "--optimizer",
            "adamw",
        ],
        PEAK,
    );
}

#[test]
fn hf_fixtures() {
    for (name, b, t) in [("tiny-gpt2", "16", "64"), ("tiny-llama", "8", "128")] {
        let cfg = fixtures().join(name).join("config.json");
        let cfg = cfg.to_str().expect("utf-8 path");
        assert_close(&["--config", cfg, "--batch", b, "--seq", t], PEAK);
    }
}

/// The closed form of what the forward keeps agrees with the replay's after-forward bytes
/// (weights, gemm slabs and tensor headers aside).
#[test]
fn closed_form_matches_replay() {
    for (text, dtype) in [
        (GPT2_NOBIAS_UNTIED, TrainDtype::F32),
        (LLAMA_GQA, TrainDtype::Bf16),
        (LLAMA_MQA_QKV_BIAS, TrainDtype::F32),
    ] {
        let (_d, p) = temp_file("c.toml", text.as_bytes());
        let cfg = config::load(ConfigSource::Path(&p)).expect("config");
        let params = truesize::estimate::params::estimate(&cfg)
            .expect("params")
            .total;
        let step = Step {
            batch: 4,
            seq: 128,
            dtype,
        };
        let m = activations::model(&cfg, params, step);
        let replay_kept = m.after_forward_bytes - m.weights_bytes - m.gemm_slab_bytes;
        let closed: u64 = activations::closed_form_kept(&cfg, step)
            .iter()
            .filter(|(k, _)| matches!(*k, "layers (all)" | "embed" | "head"))
            .map(|(_, v)| v)
            .sum();
        let err = (closed as f64 - replay_kept as f64) / replay_kept as f64;
        assert!(
            err.abs() <= 0.02,
            "{}: closed form {closed} vs replay {replay_kept} ({:+.2}%)",
            cfg.name,
            err * 100.0
        );
        assert!(m.peak_bytes >= m.after_forward_bytes);
        assert!(!m.terms.is_empty());
    }
}

/// The closed form follows the newer families' switches too (see `newer_families`).
#[test]
fn closed_form_matches_replay_newer_families() {
    let common = r#""vocab_size": 1800, "hidden_size": 96, "num_hidden_layers": 3,
        "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 200,
        "max_position_embeddings": 512, "pad_token_id": null"#;
    for (json, dtype) in [
        (
            format!(
                r#"{{"model_type": "gemma2", {common}, "head_dim": 32, "sliding_window": 48}}"#
            ),
            TrainDtype::F32,
        ),
        (
            format!(
                r#"{{"model_type": "gemma3_text", {common}, "head_dim": 24, "sliding_window": 40}}"#
            ),
            TrainDtype::Bf16,
        ),
        (
            format!(r#"{{"model_type": "phi3", {common}, "partial_rotary_factor": 0.5}}"#),
            TrainDtype::F32,
        ),
        (
            format!(r#"{{"model_type": "qwen3", {common}, "head_dim": 32}}"#),
            TrainDtype::Bf16,
        ),
    ] {
        let cfg = config::hf::parse(&json, "closed-form").expect("config");
        cfg.validate().expect("valid");
        let params = truesize::estimate::params::estimate(&cfg)
            .expect("params")
            .total;
        let step = Step {
            batch: 4,
            seq: 128,
            dtype,
        };
        let m = activations::model(&cfg, params, step);
        let replay_kept = m.after_forward_bytes - m.weights_bytes - m.gemm_slab_bytes;
        let closed: u64 = activations::closed_form_kept(&cfg, step)
            .iter()
            .filter(|(k, _)| matches!(*k, "layers (all)" | "embed" | "head"))
            .map(|(_, v)| v)
            .sum();
        let err = (closed as f64 - replay_kept as f64) / replay_kept as f64;
        assert!(
            err.abs() <= 0.02,
            "{}: closed form {closed} vs replay {replay_kept} ({:+.2}%)",
            cfg.model_type,
            err * 100.0
        );
    }
}

/// The families after Llama through the same replay: Gemma 2 (sandwich (1 + w) norms, GeGLU,
/// √d scale, soft-caps, windows shorter than the sequence), Gemma 3 (q/k norms, RoPE per layer
/// type with linear scaling on global layers), Phi-3 (fused storage, partial rotary, LongRoPE
/// past its original context, a window on every layer), Qwen3-MoE (experts of their own width,
/// no renormalisation, dense layers among sparse ones). No padding id, so that the batch's
/// tokens cannot change what is allocated.
#[test]
fn newer_families() {
    let common = r#""vocab_size": 1800, "hidden_size": 96, "num_hidden_layers": 3,
        "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 200,
        "max_position_embeddings": 512, "pad_token_id": null"#;
    let configs = [
        format!(
            r#"{{"model_type": "gemma2", {common}, "head_dim": 32, "query_pre_attn_scalar": 24, "sliding_window": 48}}"#
        ),
        format!(
            r#"{{"model_type": "gemma3_text", {common}, "head_dim": 24, "sliding_window": 40,
            "sliding_window_pattern": 2, "rope_scaling": {{"rope_type": "linear", "factor": 4.0}}}}"#
        ),
        format!(
            r#"{{"model_type": "phi3", {common}, "sliding_window": 50, "original_max_position_embeddings": 64,
            "rope_scaling": {{"type": "longrope", "partial_rotary_factor": 0.5,
            "short_factor": [1.0, 1.1, 1.2, 1.3, 1.4, 1.5], "long_factor": [2.0, 3.0, 4.0, 5.0, 6.0, 7.0]}}}}"#
        ),
        format!(
            r#"{{"model_type": "qwen3_moe", {common}, "head_dim": 32, "num_experts": 4,
            "num_experts_per_tok": 2, "moe_intermediate_size": 64, "decoder_sparse_step": 2,
            "norm_topk_prob": false}}"#
        ),
    ];
    for (i, json) in configs.iter().enumerate() {
        let (_d, p) = temp_file("config.json", json.as_bytes());
        let p = p.to_str().expect("utf-8 path");
        let (b, t, dt) = [("2", "128", "f32"), ("4", "96", "bf16")][i % 2];
        assert_close(
            &["--config", p, "--batch", b, "--seq", t, "--dtype", dt],
            PEAK,
        );
        assert_close(
            &[
                "--config",
                p,
                "--batch",
                "2",
                "--seq",
                "64",
                "--optimizer",
                "adamw",
            ],
            ADAMW,
        );
    }
}
