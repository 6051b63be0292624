//! Hostile input through the binary, one test per class that `cli_estimate.rs`, `cli_verify.rs`
//! and `inspect.rs` do not already cover: corrupt checkpoints behind `verify --model`, bad
//! reference files, paths of the wrong kind, step sizes beyond the model, and a batch far beyond
//! the machine. Each asserts the documented exit code (2 = bad input, 1 = refused), that stderr
//! names the file / field / value, and that nothing panicked.
//!
//! The last test replays every input kept under `fuzz/regressions/` (crashes the fuzzers found,
//! now fixed) and the fuzz seed corpora through the same library calls the fuzz targets make.

mod common;

use common::{fixtures, truesize};
use serde_json::{json, Map, Value};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Run truesize and check the exit code, each expected stderr fragment, and the absence of a
/// panic. Returns stderr for further checks.
fn fails(args: &[&str], code: i32, stderr_has: &[&str]) -> String {
    let out = truesize()
        .args(args)
        .env_remove("RUST_BACKTRACE")
        .output()
        .expect("run truesize");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(code), "{args:?}: stderr = {err}");
    assert!(!err.contains("panicked"), "{args:?} panicked: {err}");
    assert!(err.contains("error: "), "{args:?}: {err}");
    for want in stderr_has {
        assert!(err.contains(want), "{args:?}: stderr lacks {want:?}: {err}");
    }
    err
}

fn s(p: &Path) -> &str {
    p.to_str().expect("UTF-8 temp path")
}

// ---- safetensors bytes, written by hand so every field can be broken -------------------------

/// `u64 LE header length` + header JSON + data.
fn safetensors(header: &Value, data: &[u8]) -> Vec<u8> {
    let j = serde_json::to_vec(header).unwrap();
    let mut out = (j.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&j);
    out.extend_from_slice(data);
    out
}

/// A well-formed file of zero-filled tensors (name, dtype, shape), offsets packed in order.
fn packed(tensors: &[(String, &str, Vec<u64>)]) -> Vec<u8> {
    let mut header = Map::new();
    let mut off = 0u64;
    for (name, dtype, shape) in tensors {
        let width = match *dtype {
            "F32" | "I32" => 4,
            "I64" => 8,
            "F16" | "BF16" => 2,
            other => panic!("test helper: no width for {other}"),
        };
        let n = shape.iter().product::<u64>() * width;
        header.insert(
            name.clone(),
            json!({"dtype": dtype, "shape": shape, "data_offsets": [off, off + n]}),
        );
        off += n;
    }
    safetensors(&Value::Object(header), &vec![0u8; off as usize])
}

/// The tiny-gpt2 fixture's tensors (name, shape), from its header.
fn tiny_gpt2_tensors() -> Vec<(String, &'static str, Vec<u64>)> {
    let bytes = std::fs::read(fixtures().join("tiny-gpt2/model.safetensors")).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: Map<String, Value> = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    header
        .into_iter()
        .filter(|(k, _)| k != "__metadata__")
        .map(|(k, v)| {
            let shape = v["shape"]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d.as_u64().unwrap())
                .collect();
            (k, "F32", shape)
        })
        .collect()
}

/// The tiny-gpt2 fixture's header JSON and data section, to break one field at a time.
fn tiny_gpt2_parts() -> (Map<String, Value>, Vec<u8>) {
    let bytes = std::fs::read(fixtures().join("tiny-gpt2/model.safetensors")).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    (header, bytes[8 + n..].to_vec())
}

/// A model folder: tiny-gpt2's config.json (if `config`) and the given model.safetensors.
fn model_folder(model: &[u8], config: bool) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let folder = dir.path().join("hostile-model");
    std::fs::create_dir(&folder).unwrap();
    if config {
        std::fs::copy(
            fixtures().join("tiny-gpt2/config.json"),
            folder.join("config.json"),
        )
        .unwrap();
    }
    std::fs::write(folder.join("model.safetensors"), model).unwrap();
    (dir, folder)
}

/// `verify --model` on a folder holding `model` as its checkpoint: must exit 2 naming the file.
fn bad_checkpoint(model: &[u8], stderr_has: &[&str]) -> String {
    let (_d, folder) = model_folder(model, true);
    let mut want = vec!["hostile-model"];
    want.extend_from_slice(stderr_has);
    fails(
        &["verify", "--model", s(&folder), "--no-artifacts"],
        2,
        &want,
    )
}

/// `verify --model` on a checkpoint that reads fine but does not match its config: the same
/// failed check as `inspect` (exit 1), the tensor named on stderr, nothing built.
fn mismatched_checkpoint(model: &[u8], stderr_has: &[&str]) -> String {
    let (_d, folder) = model_folder(model, true);
    let mut want = vec!["hostile-model"];
    want.extend_from_slice(stderr_has);
    fails(
        &["verify", "--model", s(&folder), "--no-artifacts"],
        1,
        &want,
    )
}

// ---- checkpoints ---------------------------------------------------------------------------

#[test]
fn checkpoint_truncated() {
    let bytes = std::fs::read(fixtures().join("tiny-gpt2/model.safetensors")).unwrap();
    bad_checkpoint(
        &bytes[..bytes.len() / 2],
        &["model.safetensors", "cannot read safetensors"],
    );
}

#[test]
fn checkpoint_shorter_than_its_length_prefix() {
    bad_checkpoint(&[1, 2, 3, 4, 5], &["model.safetensors"]);
}

#[test]
fn checkpoint_header_length_beyond_the_file() {
    let bytes = std::fs::read(fixtures().join("tiny-gpt2/model.safetensors")).unwrap();
    let mut b = 1_000_000u64.to_le_bytes().to_vec();
    b.extend_from_slice(&bytes[8..100]);
    bad_checkpoint(&b, &["model.safetensors", "header length"]);
}

#[test]
fn checkpoint_garbage_bytes() {
    let garbage: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    bad_checkpoint(&garbage, &["model.safetensors"]);
}

#[test]
fn checkpoint_header_not_utf8() {
    let j = b"{\"\xff\xfe\": 1}";
    let mut b = (j.len() as u64).to_le_bytes().to_vec();
    b.extend_from_slice(j);
    bad_checkpoint(&b, &["model.safetensors", "UTF-8"]);
}

#[test]
fn checkpoint_header_not_json() {
    let j = b"this is not json";
    let mut b = (j.len() as u64).to_le_bytes().to_vec();
    b.extend_from_slice(j);
    bad_checkpoint(&b, &["model.safetensors"]);
}

#[test]
fn checkpoint_missing_tensor_is_named() {
    let tensors: Vec<_> = tiny_gpt2_tensors()
        .into_iter()
        .filter(|(n, _, _)| n != "transformer.ln_f.bias")
        .collect();
    mismatched_checkpoint(&packed(&tensors), &["transformer.ln_f.bias"]);
}

#[test]
fn checkpoint_wrong_shape_is_named() {
    let tensors: Vec<_> = tiny_gpt2_tensors()
        .into_iter()
        .map(|(n, d, shape)| {
            if n == "transformer.ln_f.bias" {
                (n, d, vec![12, 4])
            } else {
                (n, d, shape)
            }
        })
        .collect();
    mismatched_checkpoint(
        &packed(&tensors),
        &["transformer.ln_f.bias", "[48]", "[12, 4]"],
    );
}

#[test]
fn checkpoint_invalid_dtype_string() {
    let (mut h, data) = tiny_gpt2_parts();
    h["transformer.ln_f.bias"]["dtype"] = json!("F99");
    bad_checkpoint(&safetensors(&Value::Object(h), &data), &["F99"]);
}

#[test]
fn checkpoint_shape_whose_byte_size_overflows() {
    let (mut h, data) = tiny_gpt2_parts();
    h["transformer.ln_f.bias"]["shape"] = json!([1_000_000_000_000u64, 1_000_000_000_000u64]);
    bad_checkpoint(&safetensors(&Value::Object(h), &data), &["overflow"]);
}

#[test]
fn checkpoint_offsets_out_of_range() {
    let (mut h, data) = tiny_gpt2_parts();
    h["transformer.ln_f.bias"]["data_offsets"] = json!([1_000_000_000u64, 1_000_000_192u64]);
    bad_checkpoint(&safetensors(&Value::Object(h), &data), &["offset"]);
}

#[test]
fn checkpoint_overlapping_offsets() {
    let (mut h, data) = tiny_gpt2_parts();
    // ln_f.bias (48 f32 = 192 bytes) laid over the first tensor's bytes.
    h["transformer.ln_f.bias"]["data_offsets"] = json!([0, 192]);
    bad_checkpoint(&safetensors(&Value::Object(h), &data), &["offset"]);
}

#[test]
fn model_folder_without_config_json() {
    let bytes = std::fs::read(fixtures().join("tiny-gpt2/model.safetensors")).unwrap();
    let (_d, folder) = model_folder(&bytes, false);
    fails(
        &["verify", "--model", s(&folder)],
        2,
        &["hostile-model", "no config.json"],
    );
}

#[test]
fn model_folder_whose_checkpoint_is_a_directory() {
    // A directory where a file is expected (the tests run as root, so mode 000 would not stop a
    // read; a directory does).
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        fixtures().join("tiny-gpt2/config.json"),
        dir.path().join("config.json"),
    )
    .unwrap();
    std::fs::create_dir(dir.path().join("model.safetensors")).unwrap();
    fails(
        &["verify", "--model", s(dir.path())],
        2,
        &[s(dir.path()), "model.safetensors"],
    );
}

#[test]
fn config_path_that_is_a_directory_without_config() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("config.json");
    std::fs::create_dir(&cfg).unwrap();
    fails(
        &["estimate", "--config", s(&cfg)],
        2,
        &[s(&cfg), "config.json"],
    );
}

#[test]
fn sharded_index_naming_a_missing_shard() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        fixtures().join("tiny-gpt2/config.json"),
        dir.path().join("config.json"),
    )
    .unwrap();
    let index =
        json!({"weight_map": {"transformer.wte.weight": "model-00001-of-00002.safetensors"}});
    std::fs::write(
        dir.path().join("model.safetensors.index.json"),
        index.to_string(),
    )
    .unwrap();
    fails(
        &["verify", "--model", s(dir.path())],
        2,
        &[
            "model.safetensors.index.json",
            "model-00001-of-00002.safetensors",
        ],
    );
}

#[test]
fn sharded_index_that_is_not_an_index() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        fixtures().join("tiny-gpt2/config.json"),
        dir.path().join("config.json"),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("model.safetensors.index.json"),
        "{\"weight_map\": [1, 2",
    )
    .unwrap();
    fails(
        &["verify", "--model", s(dir.path())],
        2,
        &["model.safetensors.index.json"],
    );
}

// ---- reference outputs ---------------------------------------------------------------------

/// A reference folder with `expected.safetensors` (and `expected.json` if given), checked
/// against the tiny-gpt2 fixture model (vocab 97, block 64).
fn bad_reference(tensors: &[(String, &str, Vec<u64>)], json: Option<&str>, stderr_has: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("expected.safetensors"), packed(tensors)).unwrap();
    if let Some(j) = json {
        std::fs::write(dir.path().join("expected.json"), j).unwrap();
    }
    fails(
        &[
            "verify",
            "--model",
            s(&fixtures().join("tiny-gpt2")),
            "--reference",
            s(dir.path()),
            "--no-artifacts",
        ],
        2,
        stderr_has,
    );
}

fn ids(dtype: &'static str, shape: &[u64]) -> (String, &'static str, Vec<u64>) {
    ("input_ids".into(), dtype, shape.to_vec())
}

fn logits(shape: &[u64]) -> (String, &'static str, Vec<u64>) {
    ("logits".into(), "F32", shape.to_vec())
}

#[test]
fn reference_logits_of_the_wrong_rank() {
    bad_reference(
        &[ids("I64", &[1, 4]), logits(&[4, 97])],
        None,
        &[
            "expected.safetensors",
            "logits must be [B, T, V]",
            "[4, 97]",
        ],
    );
}

#[test]
fn reference_logits_disagreeing_with_input_ids() {
    bad_reference(
        &[ids("I64", &[1, 4]), logits(&[1, 5, 97])],
        None,
        &["expected.safetensors", "[1, 4]", "[1, 5, 97]"],
    );
}

#[test]
fn reference_logits_of_another_vocabulary() {
    // The fixture model has vocab 97; these logits have 50 columns.
    bad_reference(
        &[ids("I64", &[1, 4]), logits(&[1, 4, 50])],
        None,
        &["[1, 4, 97]", "[1, 4, 50]"],
    );
}

#[test]
fn reference_token_ids_beyond_the_vocabulary() {
    // Zero-filled ids are valid; write one id = 500 (vocab is 97) by hand.
    let dir = tempfile::tempdir().unwrap();
    let mut data: Vec<u8> = [1i64, 2, 3, 500]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    data.extend(vec![0u8; 4 * 97 * 4]);
    let header = json!({
        "input_ids": {"dtype": "I64", "shape": [1, 4], "data_offsets": [0, 32]},
        "logits": {"dtype": "F32", "shape": [1, 4, 97], "data_offsets": [32, 32 + 4 * 97 * 4]},
    });
    std::fs::write(
        dir.path().join("expected.safetensors"),
        safetensors(&header, &data),
    )
    .unwrap();
    fails(
        &[
            "verify",
            "--model",
            s(&fixtures().join("tiny-gpt2")),
            "--reference",
            s(dir.path()),
            "--no-artifacts",
        ],
        2,
        &["500", "97"],
    );
}

#[test]
fn reference_negative_token_id() {
    let dir = tempfile::tempdir().unwrap();
    let mut data: Vec<u8> = [1i64, 2, 3, -1]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    data.extend(vec![0u8; 4 * 97 * 4]);
    let header = json!({
        "input_ids": {"dtype": "I64", "shape": [1, 4], "data_offsets": [0, 32]},
        "logits": {"dtype": "F32", "shape": [1, 4, 97], "data_offsets": [32, 32 + 4 * 97 * 4]},
    });
    std::fs::write(
        dir.path().join("expected.safetensors"),
        safetensors(&header, &data),
    )
    .unwrap();
    fails(
        &[
            "verify",
            "--model",
            s(&fixtures().join("tiny-gpt2")),
            "--reference",
            s(dir.path()),
        ],
        2,
        &["expected.safetensors", "input_ids holds -1"],
    );
}

#[test]
fn reference_token_ids_that_are_floats() {
    bad_reference(
        &[ids("F32", &[1, 4]), logits(&[1, 4, 97])],
        None,
        &["expected.safetensors", "input_ids must be integers", "f32"],
    );
}

#[test]
fn reference_without_logits() {
    bad_reference(
        &[ids("I64", &[1, 4])],
        None,
        &["expected.safetensors", "logits"],
    );
}

#[test]
fn reference_longer_than_the_model_block() {
    bad_reference(
        &[ids("I64", &[1, 100]), logits(&[1, 100, 97])],
        None,
        &["seq = 100", "block_size = 64"],
    );
}

#[test]
fn reference_json_disagreeing_with_its_tensors() {
    bad_reference(
        &[ids("I64", &[1, 4]), logits(&[1, 4, 97])],
        Some(r#"{"batch": 3}"#),
        &["expected.json", "batch = 3"],
    );
}

#[test]
fn reference_json_malformed() {
    bad_reference(
        &[ids("I64", &[1, 4]), logits(&[1, 4, 97])],
        Some(r#"{"loss": "x""#),
        &["expected.json"],
    );
}

#[test]
fn reference_folder_without_tensors() {
    let dir = tempfile::tempdir().unwrap();
    fails(
        &["verify", "--reference", s(dir.path())],
        2,
        &[s(dir.path()), "expected.safetensors"],
    );
}

// ---- step sizes and resources --------------------------------------------------------------

#[test]
fn verify_seq_beyond_block_size() {
    fails(
        &[
            "verify",
            "--model",
            s(&fixtures().join("tiny-gpt2")),
            "--seq",
            "65",
        ],
        2,
        &["config.json", "seq = 65", "block_size = 64"],
    );
}

#[test]
fn verify_seq_too_short_for_a_next_token_loss() {
    fails(
        &["verify", "--seq", "1", "--no-artifacts"],
        2,
        &["seq = 1", "2 positions"],
    );
}

#[test]
fn verify_batch_beyond_the_cli_limit() {
    fails(
        &["verify", "--batch", "1048577"],
        2,
        &["--batch = 1048577", "1048576"],
    );
}

#[test]
fn huge_batch_is_refused_in_under_a_second_before_allocating() {
    // GPT-2 weights fit anywhere; 2^20 sequences of 64 tokens of activations fit nowhere
    // (~150 TB). The refusal must come from the estimate, before any tensor exists.
    let t0 = Instant::now();
    let err = fails(
        &["verify", "--preset", "gpt2", "--batch", "1048576"],
        1,
        &[
            "refused",
            "1048576",
            "GiB",
            "--shapes-only",
            "--batch",
            "--max-memory",
        ],
    );
    let took = t0.elapsed();
    assert!(
        took < Duration::from_secs(1),
        "refusal took {took:?}: {err}"
    );
}

// ---- fuzz regressions and seeds ------------------------------------------------------------

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut v: Vec<PathBuf> = rd
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && p.extension().is_none_or(|e| e != "py" && e != "md"))
        .collect();
    v.sort();
    v
}

/// What the `toml_config` / `hf_config` fuzz targets do with one input (fuzz/src/lib.rs).
fn estimate_everything(cfg: truesize::error::Result<truesize::config::ModelConfig>) {
    use truesize::dtype::TrainDtype;
    use truesize::estimate::{flops, memory, params};
    let Ok(cfg) = cfg else { return };
    if cfg.validate().is_err() {
        return;
    }
    let Ok(p) = params::estimate(&cfg) else {
        return;
    };
    let sum: u128 = p.components.iter().map(|c| c.params as u128).sum();
    assert_eq!(sum, p.total as u128, "components do not sum to the total");
    assert!(p.active_per_token <= p.total && p.non_embedding <= p.total);
    let _ = params::rough_applies(&cfg);
    for seq in [1, cfg.block_size] {
        for causal in [false, true] {
            let _ = flops::estimate(&cfg, &p, seq, causal);
        }
    }
    let _ = memory::weight_bytes(p.total);
    for dtype in [TrainDtype::F32, TrainDtype::F16, TrainDtype::Bf16] {
        let _ = memory::training(&p, dtype, None);
    }
}

#[test]
fn fuzz_regressions_and_seeds_replay_without_panic() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut replayed = 0;
    for kind in ["regressions", "seeds"] {
        for p in files_under(&root.join(kind).join("toml_config")) {
            let text = String::from_utf8_lossy(&std::fs::read(&p).unwrap()).into_owned();
            estimate_everything(truesize::config::toml::parse(&text, "fuzz"));
            replayed += 1;
        }
        for p in files_under(&root.join(kind).join("hf_config")) {
            let text = String::from_utf8_lossy(&std::fs::read(&p).unwrap()).into_owned();
            estimate_everything(truesize::config::hf::parse(&text, "fuzz"));
            replayed += 1;
        }
        for p in files_under(&root.join(kind).join("safetensors_header")) {
            if let Ok(h) = truesize::checkpoint::safetensors::read_header(&p) {
                let covered: u64 = h.entries.iter().map(|t| t.bytes).sum();
                assert_eq!(covered, h.data_bytes, "{}", p.display());
            }
            if let Ok(c) = truesize::checkpoint::Checkpoint::open(&p) {
                let _ = truesize::checkpoint::check(&c, None);
            }
            replayed += 1;
        }
    }
    assert!(replayed > 0, "no fuzz seeds found under {}", root.display());
}

/// Config crashes kept from fuzzing (fuzz/regressions/{toml_config,hf_config}), now through the
/// binary: a GPT-2 config with an absurd `n_embd` and no MLP width overflowed `4 * n_embd`
/// while filling in the default (a panic in debug builds); now validate names n_embd.
#[test]
fn fuzz_config_regressions_are_bad_input_through_the_binary() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz/regressions");
    let mut n = 0;
    for target in ["toml_config", "hf_config"] {
        for p in files_under(&root.join(target)) {
            fails(&["estimate", "--config", s(&p)], 2, &[s(&p)]);
            n += 1;
        }
    }
    assert!(n >= 2, "regression inputs missing under {}", root.display());
    fails(
        &[
            "estimate",
            "--config",
            s(&root.join("hf_config/gpt2-n_inner-default-overflows.json")),
        ],
        2,
        &["n_embd = 18446744073709551615", "absurd"],
    );
}

/// Found by the toml_config fuzz target (seed configs/llama3.1-70b.toml at the largest step the
/// CLI accepts): the activation simulator's byte counter overflows u64 (src/estimate/
/// activations.rs `Mem::alloc`, `self.cur.get() + bytes`): a panic in debug builds, a wrapped
/// (wrong) number in release. Fixed: a u128 bound saturates steps no machine could hold.
#[test]
fn estimate_at_the_largest_accepted_step_does_not_overflow() {
    let out = truesize()
        .args([
            "estimate",
            "--preset",
            "llama3.1-70b",
            "--batch",
            "1048576",
            "--seq",
            "131072",
            "--format",
            "json",
        ])
        .env_remove("RUST_BACKTRACE")
        .output()
        .expect("run truesize");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
    assert!(matches!(out.status.code(), Some(0) | Some(2)), "{err}");
}

/// Found by the toml_config fuzz target (fuzz/findings/toml_config/): a Llama-405B shape with
/// block_size 2,231,070. At --seq 1,830,600 every FLOP term fits in u64 but the per-component
/// sum does not (src/estimate/flops.rs, `components`: an unchecked `.sum()` of u64 terms): a
/// panic with overflow checks (on for this crate in release too), a wrapped count without.
/// Fixed by summing in u128 and converting with an error.
#[test]
fn estimate_flops_sum_does_not_overflow() {
    let cfg = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/findings/toml_config/llama-405b-flops-sum-overflows-at-seq-2231070.toml");
    let out = truesize()
        .args(["estimate", "--config", s(&cfg), "--seq", "1830600"])
        .env_remove("RUST_BACKTRACE")
        .output()
        .expect("run truesize");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
    assert!(matches!(out.status.code(), Some(0) | Some(2)), "{err}");
}

#[test]
fn estimate_of_a_checkpoint_given_as_config_is_bad_input() {
    // A user passing the weights where the config belongs gets the file named, not a panic.
    let p = fixtures().join("tiny-gpt2/model.safetensors");
    fails(&["estimate", "--config", s(&p)], 2, &["model.safetensors"]);
}

/// A stdout that cannot be written (a full device) is an error message and a non-zero exit,
/// not a panic.
#[test]
fn unwritable_stdout_is_an_error_not_a_panic() {
    let Ok(full) = std::fs::OpenOptions::new().write(true).open("/dev/full") else {
        return; // no /dev/full on this system
    };
    let out = std::process::Command::new(assert_cmd::cargo::cargo_bin("truesize"))
        .args(["estimate", "--preset", "gpt2"])
        .stdout(full)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("cannot write the output"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}
