//! `truesize infer` through the binary: greedy tokens equal HF transformers' on every fixture
//! (HF folders and GGUF files written by the gguf package), exact weight and KV bytes, peaks
//! within 5% of the counting allocator, and bad input refused before any work.

mod common;
use common::*;

fn run(args: &[&str]) -> (i32, serde_json::Value, String) {
    let out = truesize()
        .arg("infer")
        .args(args)
        .args(["--format", "json"])
        .output()
        .unwrap();
    let code = out.status.code().unwrap_or(-1);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    let j = if code == 2 {
        serde_json::Value::Null
    } else {
        json_of(&out.stdout)
    };
    (code, j, err)
}

fn failed(j: &serde_json::Value) -> Vec<String> {
    j["checks"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|c| c["gating"] == true && c["pass"] == false)
                .map(|c| c.to_string())
                .collect()
        })
        .unwrap_or_default()
}

fn greedy(name: &str) -> serde_json::Value {
    let p = fixtures().join(name).join("greedy.json");
    serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap()
}

fn check<'a>(j: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    j["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no check {name:?}"))
}

/// Every HF fixture generates exactly HF transformers' greedy tokens (greedy.json, made by
/// scripts/make_greedy_refs.py), with exact weight and cache bytes and every peak within 5%.
#[test]
fn greedy_tokens_equal_hf_on_every_fixture() {
    for name in [
        "tiny-gpt2",
        "tiny-llama",
        "tiny-qwen2",
        "tiny-mixtral",
        "infer/tiny-mistral-swa",
    ] {
        let dir = fixtures().join(name);
        let dir = dir.to_str().unwrap();
        let (code, j, err) = run(&["--model", dir, "--reference", dir]);
        assert_eq!(code, 0, "{name}: {err} {:?}", failed(&j));
        let want = &greedy(name)["generated_ids"];
        assert_eq!(&j["infer"]["tokens"][0], want, "{name}");
        assert_eq!(
            j["infer"]["weights_bytes"], j["infer"]["predicted"]["weights_bytes"],
            "{name}"
        );
        // f32 weights: 4 bytes per parameter, exactly.
        assert_eq!(
            j["infer"]["weights_bytes"].as_u64().unwrap(),
            4 * j["params"].as_u64().unwrap(),
            "{name}"
        );
        assert!(check(&j, "incremental decode logits == one full forward")["pass"] == true);
    }
}

/// The KV cache by hand for tiny-llama: 2 layers · 2 (K, V) · 2 kv heads · 16 · 4 B per token,
/// for 3 sequences of 8 + 16 tokens; Mistral's window (5) caps every layer at 5 tokens.
#[test]
fn kv_cache_bytes_by_hand_and_the_window() {
    let dir = fixtures().join("tiny-llama");
    let (code, j, err) = run(&[
        "--model",
        dir.to_str().unwrap(),
        "--batch",
        "3",
        "--prompt",
        "8",
        "--generate",
        "16",
    ]);
    assert_eq!(code, 0, "{err} {:?}", failed(&j));
    assert_eq!(j["infer"]["kv_cache_bytes"], 2 * 2 * 2 * 16 * 4 * 3 * 24);
    assert_eq!(j["kv_cache"]["llama_cpp_cells"], 256);
    let dir = fixtures().join("infer/tiny-mistral-swa");
    // chunks of 3 over an 8-token prompt: the later chunks overflow the 5-slot ring.
    let (code, j, err) = run(&[
        "--model",
        dir.to_str().unwrap(),
        "--reference",
        dir.to_str().unwrap(),
        "--batch",
        "2",
        "--prefill-chunk",
        "3",
    ]);
    assert_eq!(code, 0, "{err} {:?}", failed(&j));
    // 2 layers · 2 · 2 kv heads · 16 · 4 B · 5 tokens · 2 sequences
    assert_eq!(j["infer"]["kv_cache_bytes"], 2 * 2 * 2 * 16 * 4 * 5 * 2);
    assert_eq!(
        j["infer"]["tokens"][1],
        greedy("infer/tiny-mistral-swa")["generated_ids"]
    );
}

/// GGUF files written by the gguf package from the fixtures: F32, F16 and Q8_0 generate HF's
/// tokens from the source weights; every file's weights are held byte for byte as stored.
#[test]
fn gguf_files_generate_hf_tokens() {
    for (file, fixture, exact_tokens) in [
        ("tiny-llama-f32", "tiny-llama", true),
        ("tiny-llama-f16", "tiny-llama", true),
        ("tiny-llama-q8_0", "tiny-llama", true),
        ("tiny-llama-q4_0", "tiny-llama", false),
        ("tiny-gpt2-f16", "tiny-gpt2", true),
        ("tiny-qwen2-q8_0", "tiny-qwen2", true),
        ("tiny-mixtral-f16", "tiny-mixtral", true),
    ] {
        let path = fixtures().join("gguf").join(format!("{file}.gguf"));
        let r = greedy(fixture);
        let ids: Vec<String> = r["prompt_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.to_string())
            .collect();
        let (code, j, err) = run(&[
            "--model",
            path.to_str().unwrap(),
            "--prompt-ids",
            &ids.join(","),
            "--generate",
            "16",
        ]);
        assert_eq!(code, 0, "{file}: {err} {:?}", failed(&j));
        if exact_tokens {
            assert_eq!(j["infer"]["tokens"][0], r["generated_ids"], "{file}");
        }
        // What the engine holds equals what the file stores, tensor for tensor.
        let held = j["infer"]["weights_bytes"].as_u64().unwrap();
        let data = j["gguf"]["data_bytes"].as_u64().unwrap();
        assert_eq!(held, data, "{file}");
    }
}

/// `inspect FILE.gguf --format json`: the census per GGML type, checked against block
/// arithmetic done here (Q8_0: 34 B per 32 weights, F16 2 B, F32 4 B) and the file's size.
#[test]
fn inspect_gguf_census_is_exact() {
    let path = fixtures().join("gguf/tiny-llama-q8_0.gguf");
    let out = truesize()
        .args(["inspect", path.to_str().unwrap(), "--format", "json"])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let j = json_of(&out.stdout);
    assert_eq!(j["file_bytes"], std::fs::metadata(&path).unwrap().len());
    assert_eq!(j["file_tensors"], 21);
    assert_eq!(j["file_numel"], 105_408);
    let bt = &j["by_type"];
    let q8 = bt["Q8_0"]["numel"].as_u64().unwrap();
    assert_eq!(bt["Q8_0"]["bytes"].as_u64().unwrap(), q8 / 32 * 34);
    let f16 = bt["F16"]["numel"].as_u64().unwrap();
    assert_eq!(bt["F16"]["bytes"].as_u64().unwrap(), 2 * f16);
    // ffn_down rows are 176 long (not a multiple of 32): 2 layers · 64 · 176 in F16
    assert_eq!(f16, 2 * 64 * 176);
    // norms in F32: 2 per layer + the final one, 64 each
    assert_eq!(bt["F32"]["numel"], 5 * 64);
    let data: u64 = ["Q8_0", "F16", "F32"]
        .iter()
        .map(|t| bt[t]["bytes"].as_u64().unwrap())
        .sum();
    assert_eq!(data, j["data_bytes"].as_u64().unwrap());
    assert_eq!(
        j["header_bytes"].as_u64().unwrap() + j["padding_bytes"].as_u64().unwrap() + data,
        j["file_bytes"].as_u64().unwrap()
    );
    assert_eq!(j["params_numel"], j["expected_params"]);
    // The GPT-2 file also stores the tied head (llama.cpp's converter): a buffer, not a param.
    let out = truesize()
        .args([
            "inspect",
            fixtures().join("gguf/tiny-gpt2-f16.gguf").to_str().unwrap(),
            "--format",
            "json",
        ])
        .output()
        .unwrap();
    let j = json_of(&out.stdout);
    assert_eq!(j["pass"], true);
    assert_eq!(
        j["file_numel"].as_u64().unwrap() - j["params_numel"].as_u64().unwrap(),
        97 * 48
    );
}

#[test]
fn gguf_works_for_estimate_and_verify_shapes_only() {
    let path = fixtures().join("gguf/tiny-mixtral-q8_0.gguf");
    let p = path.to_str().unwrap();
    let out = truesize()
        .args(["estimate", "--model", p, "--format", "json"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(json_of(&out.stdout)["params"]["total"], 133_584);
    let out = truesize()
        .args(["verify", "--model", p, "--shapes-only", "--format", "json"])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let j = json_of(&out.stdout);
    assert!(j["checks"].as_array().unwrap().iter().any(|c| c["name"]
        .as_str()
        .unwrap()
        .starts_with("checkpoint headers: file size")));
    // A full verify trains: not from a GGUF file.
    let out = truesize().args(["verify", "--model", p]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
}

/// Quantized and half-precision runs of a preset: exact bytes (candle's blocks), peaks within
/// 5% (repacked kernels and the input scratch included).
#[test]
fn formats_on_a_preset_pass() {
    for w in ["q8_0", "q4_k_m", "bf16", "f16"] {
        let (code, j, err) = run(&[
            "--preset",
            "baby-gpt",
            "--weights",
            w,
            "--prompt",
            "48",
            "--generate",
            "4",
            "--batch",
            "2",
        ]);
        assert_eq!(code, 0, "{w}: {err} {:?}", failed(&j));
    }
}

/// The llama.cpp recipe reproduces a published figure: Llama-3.1-70B in Q4_K_M is 42.5 GB at
/// 4.82 bits per weight (every tensor's type chosen by llama_tensor_get_type's rules).
#[test]
fn seventy_b_q4_k_m_is_42_5_gb() {
    let (code, j, err) = run(&[
        "--preset",
        "llama3.1-70b",
        "--weights",
        "q4_k_m",
        "--shapes-only",
    ]);
    assert_eq!(code, 0, "{err}");
    let b = j["weights"]["bytes"].as_u64().unwrap();
    assert_eq!(format!("{:.1}", b as f64 / 1e9), "42.5");
    assert_eq!(
        format!("{:.2}", j["weights"]["bits_per_weight"].as_f64().unwrap()),
        "4.82"
    );
    assert!(
        j["infer"].get("weights_bytes").is_none(),
        "shapes-only measures nothing"
    );
}

#[test]
fn fit_questions_answer_consistently() {
    let (code, j, err) = run(&[
        "--preset",
        "llama3-8b",
        "--weights",
        "bf16",
        "--kv-dtype",
        "f16",
        "--shapes-only",
        "--gpu",
        "4090",
        "--prompt",
        "4000",
        "--generate",
        "96",
    ]);
    assert_eq!(code, 0, "{err}");
    let f = &j["fit"];
    assert_eq!(f["budget_bytes"], 24u64 << 30);
    let n = &f["need"];
    let sum: u64 = [
        "weights_bytes",
        "kv_cache_bytes",
        "workspace_bytes",
        "overhead_bytes",
    ]
    .iter()
    .map(|k| n[k].as_u64().unwrap())
    .sum();
    assert_eq!(n["total_bytes"].as_u64().unwrap(), sum);
    assert_eq!(n["overhead_bytes"], 1u64 << 30);
    assert_eq!(f["fits"], true);
    // f32 (32 GB of weights) cannot fit a 24 GiB card; bf16 can.
    let formats = f["formats"].as_array().unwrap();
    assert_eq!(formats[0]["format"], "f32");
    assert_eq!(formats[0]["fits"], false);
    assert_eq!(f["best_format"], "f16");
    assert!(f["gpus"].as_array().unwrap().len() > 5);
}

#[test]
fn bad_flags_are_refused_before_any_work() {
    let llama = fixtures().join("tiny-llama");
    let l = llama.to_str().unwrap();
    let gguf = fixtures().join("gguf/tiny-llama-f16.gguf");
    let g = gguf.to_str().unwrap();
    for (args, needle) in [
        (vec!["--batch", "0"], "--batch"),
        (vec!["--generate", "0"], "--generate"),
        (vec!["--model", l, "--prompt-ids", "1,x,3"], "--prompt-ids"),
        (vec!["--model", l, "--prompt-ids", "1,101"], "--prompt-ids"),
        (vec!["--weights", "q7"], "--weights"),
        (vec!["--kv-dtype", "f8"], "--kv-dtype"),
        (vec!["--prefill-chunk", "0"], "--prefill-chunk"),
        (vec!["--memory", "lots"], "--memory"),
        (vec!["--gpu", "nosuch"], "--gpu"),
        (vec!["--overhead", "1GiB"], "--overhead"),
        (vec!["--model", g, "--weights", "q8_0"], "--weights"),
        (
            vec!["--model", l, "--prompt", "100", "--generate", "100"],
            "--generate",
        ),
        (
            vec!["--model", l, "--reference", l, "--shapes-only"],
            "--reference",
        ),
        (vec!["--device", "tpu"], "--device"),
        (vec!["--model", "/nonexistent/x.gguf"], "/nonexistent"),
    ] {
        let (code, _, err) = run(&args);
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
    }
}

#[test]
fn a_run_that_does_not_fit_is_refused_before_allocating() {
    let (code, j, err) = run(&["--preset", "llama3-8b", "--max-memory", "1GiB"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("refused"), "{err}");
    assert_eq!(j["pass"], false);
    assert!(j["infer"].get("weights_bytes").is_none());
}

/// Hostile GGUF headers through the binary: exit 2 naming the file, no panic, no huge
/// allocation (a header that claims 2^40 tensors or a 2^40-byte string is refused from the
/// bytes left in the file).
#[test]
fn hostile_gguf_headers_are_clear_errors() {
    let good = std::fs::read(fixtures().join("gguf/tiny-llama-f32.gguf")).unwrap();
    let mut cases: Vec<(&str, Vec<u8>)> = Vec::new();
    let mut huge_count = good.clone();
    huge_count[8..16].copy_from_slice(&(1u64 << 40).to_le_bytes());
    cases.push(("absurd", huge_count));
    let mut many = good.clone();
    many[8..16].copy_from_slice(&100_000u64.to_le_bytes());
    cases.push(("", many));
    // first metadata key's length
    let mut long_key = good.clone();
    long_key[24..32].copy_from_slice(&(1u64 << 40).to_le_bytes());
    cases.push(("limit", long_key));
    cases.push(("truncated", good[..good.len() / 2].to_vec()));
    cases.push(("truncated", good[..100].to_vec()));
    let mut v9 = good.clone();
    v9[4..8].copy_from_slice(&9u32.to_le_bytes());
    cases.push(("version", v9));
    for (needle, bytes) in cases {
        let (_d, p) = temp_file("bad.gguf", &bytes);
        for cmd in [
            vec!["inspect"],
            vec!["infer", "--model"],
            vec!["estimate", "--model"],
        ] {
            let out = truesize().args(&cmd).arg(&p).output().unwrap();
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{cmd:?} {needle}: {err}");
            assert!(
                err.contains("bad.gguf") && err.contains(needle),
                "{cmd:?}: {err}"
            );
        }
    }
}

/// The serving estimate of every newer family in llama.cpp's layout: each HF tensor has its
/// GGUF name (Qwen3's q/k norms, Gemma's four norms, Phi-3's fused projections, Qwen3-MoE's
/// stacked experts), the file holds the tensors llama.cpp's converter writes (counted by hand
/// from its tensor map: per layer, then embeddings, final norm and an untied head), and the
/// elements are the model's exact parameter count (HF transformers' figure).
#[test]
fn serving_estimate_names_every_family_tensor() {
    let cases = [
        // 36 layers × (attn_norm, q, k, v, o, q_norm, k_norm, ffn_norm, gate, up, down) + 3
        ("qwen3-8b.json", 36 * 11 + 3, 8_190_735_360u64),
        // 48 × (attn_norm, q, k, v, o, q_norm, k_norm, ffn_norm, router, 3 stacked experts) + 3
        ("qwen3-30b-a3b.json", 48 * 12 + 3, 30_532_122_624),
        // 42 × (attn_norm, q, k, v, o, post_attention_norm, ffn_norm, gate, up, down,
        // post_ffw_norm) + 2 (tied)
        ("gemma-2-9b.json", 42 * 11 + 2, 9_241_705_984),
        // 32 × (attn_norm, attn_qkv, attn_output, ffn_norm, ffn_up (gate | up), ffn_down) + 3
        ("phi-3-mini-4k.json", 32 * 6 + 3, 3_821_079_552),
    ];
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/configs");
    for (file, tensors, params) in cases {
        let cfg = dir.join(file);
        let (code, j, err) = run(&[
            "--config",
            cfg.to_str().unwrap(),
            "--shapes-only",
            "--weights",
            "q4_k_m",
            "--prompt",
            "512",
            "--generate",
            "16",
        ]);
        assert_eq!(code, 0, "{file}: {err}");
        let w = &j["weights"];
        let counted: u64 = w["by_type"]
            .as_object()
            .unwrap()
            .values()
            .map(|t| t["tensors"].as_u64().unwrap())
            .sum();
        assert_eq!(counted, tensors, "{file}: {w}");
        assert_eq!(w["numel"].as_u64(), Some(params), "{file}");
    }
}
