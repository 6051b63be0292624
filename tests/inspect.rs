//! `truesize inspect` on the HF-made fixtures, on checkpoints we write, and on planted faults.

use assert_cmd::Command;
use predicates::str::contains;
use safetensors::tensor::TensorView;
use safetensors::SafeTensors;
use std::path::{Path, PathBuf};

fn truesize() -> Command {
    Command::cargo_bin("truesize").unwrap()
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn expected_params(name: &str) -> u64 {
    let text = std::fs::read_to_string(fixture(name).join("expected.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["params"].as_u64().unwrap()
}

fn inspect_json(args: &[&str]) -> (i32, serde_json::Value) {
    let out = truesize()
        .arg("inspect")
        .args(args)
        .args(["--format", "json"])
        .output()
        .unwrap();
    let code = out.status.code().unwrap();
    let v = serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
    (code, v)
}

/// Tensors of a file as (name, dtype, shape, bytes).
type Tensors = Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)>;

fn tensors_of(path: &Path) -> Tensors {
    let bytes = std::fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut v: Vec<_> = st
        .tensors()
        .into_iter()
        .map(|(n, t)| (n, t.dtype(), t.shape().to_vec(), t.data().to_vec()))
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

fn write_st(path: &Path, t: &[(String, safetensors::Dtype, Vec<usize>, Vec<u8>)]) {
    let views: Vec<(String, TensorView)> = t
        .iter()
        .map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    let bytes = safetensors::serialize(views, None).unwrap();
    std::fs::write(path, bytes).unwrap();
}

/// A copy of the tiny-gpt2 folder whose tensors `edit` changes.
fn gpt2_variant(dir: &Path, edit: impl FnOnce(&mut Tensors)) -> PathBuf {
    let src = fixture("tiny-gpt2");
    std::fs::copy(src.join("config.json"), dir.join("config.json")).unwrap();
    let mut t = tensors_of(&src.join("model.safetensors"));
    edit(&mut t);
    write_st(&dir.join("model.safetensors"), &t);
    dir.to_path_buf()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn fixtures_numel_equals_expected_params() {
    for name in ["tiny-gpt2", "tiny-llama", "tiny-qwen2", "tiny-mixtral"] {
        let dir = fixture(name);
        let want = expected_params(name);
        // the folder: with its config.json, every check runs
        let (code, v) = inspect_json(&[s(&dir)]);
        assert_eq!(code, 0, "{name}: {v}");
        assert_eq!(v["census"]["numel"].as_u64(), Some(want), "{name}");
        assert_eq!(v["pass"], true);
        assert!(v["checks"].as_array().unwrap().len() >= 4);
        // the file alone: structure only
        let (code, v) = inspect_json(&[s(&dir.join("model.safetensors"))]);
        assert_eq!(code, 0);
        assert_eq!(v["census"]["numel"].as_u64(), Some(want));
        assert_eq!(v["census"]["dtype"], "f32");
        assert_eq!(v["census"]["bytes"].as_u64(), Some(4 * want));
        let file = std::fs::metadata(dir.join("model.safetensors"))
            .unwrap()
            .len();
        assert_eq!(v["file_bytes"].as_u64(), Some(file));
        assert_eq!(
            v["overhead_bytes"].as_u64().unwrap() + v["data_bytes"].as_u64().unwrap(),
            file
        );
    }
}

/// What `verify` builds, written with `VarMap::save`, inspected against its config.
#[test]
fn checkpoint_written_from_the_genuine_model() {
    let d = tempfile::tempdir().unwrap();
    let cfg_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/baby-gpt.toml");
    let cfg = truesize::config::load(truesize::config::ConfigSource::Path(&cfg_path)).unwrap();
    let (vm, _) =
        truesize::model::build::random(&cfg, candle_core::DType::F32, &candle_core::Device::Cpu, 0)
            .unwrap();
    let file = d.path().join("model.safetensors");
    vm.save(&file).unwrap();
    let (code, v) = inspect_json(&[s(&file), "--config", s(&cfg_path)]);
    assert_eq!(code, 0, "{v}");
    // configs/baby-gpt.toml: the Baby GPT has 3,481,088 parameters
    assert_eq!(v["census"]["numel"].as_u64(), Some(3_481_088));
}

#[test]
fn sharded_index_is_read_across_shards() {
    let d = tempfile::tempdir().unwrap();
    let src = fixture("tiny-llama");
    std::fs::copy(src.join("config.json"), d.path().join("config.json")).unwrap();
    let t = tensors_of(&src.join("model.safetensors"));
    let (a, b) = t.split_at(t.len() / 2);
    write_st(&d.path().join("model-00001-of-00002.safetensors"), a);
    write_st(&d.path().join("model-00002-of-00002.safetensors"), b);
    let mut map = serde_json::Map::new();
    for (part, file) in [
        (a, "model-00001-of-00002.safetensors"),
        (b, "model-00002-of-00002.safetensors"),
    ] {
        for (n, ..) in part {
            map.insert(n.clone(), file.into());
        }
    }
    let index = serde_json::json!({"metadata": {"total_size": 0}, "weight_map": map});
    std::fs::write(
        d.path().join("model.safetensors.index.json"),
        index.to_string(),
    )
    .unwrap();
    let (code, v) = inspect_json(&[s(d.path())]);
    assert_eq!(code, 0, "{v}");
    assert_eq!(
        v["census"]["numel"].as_u64(),
        Some(expected_params("tiny-llama"))
    );
    assert_eq!(v["files"].as_array().unwrap().len(), 2);
    // an index naming a shard that is not there
    std::fs::remove_file(d.path().join("model-00002-of-00002.safetensors")).unwrap();
    truesize()
        .args(["inspect", s(d.path())])
        .assert()
        .code(2)
        .stderr(contains("model-00002-of-00002.safetensors"));
}

#[test]
fn planted_missing_tensor() {
    let d = tempfile::tempdir().unwrap();
    let dir = gpt2_variant(d.path(), |t| {
        t.retain(|x| x.0 != "transformer.h.1.mlp.c_fc.bias")
    });
    truesize()
        .args(["inspect", s(&dir)])
        .assert()
        .code(1)
        .stdout(contains("FAIL"))
        .stdout(contains("missing: transformer.h.1.mlp.c_fc.bias"));
}

#[test]
fn planted_wrong_shape() {
    let d = tempfile::tempdir().unwrap();
    // [64, 48] stored as [48, 64]: same bytes, wrong layout
    let dir = gpt2_variant(d.path(), |t| {
        for x in t.iter_mut().filter(|x| x.0 == "transformer.wpe.weight") {
            x.2 = vec![48, 64];
        }
    });
    truesize()
        .args(["inspect", s(&dir)])
        .assert()
        .code(1)
        .stdout(contains(
            "transformer.wpe.weight: [48, 64], expected [64, 48]",
        ));
}

#[test]
fn planted_unexpected_tensor() {
    let d = tempfile::tempdir().unwrap();
    let dir = gpt2_variant(d.path(), |t| {
        t.push((
            "transformer.h.0.mlp.extra.weight".into(),
            safetensors::Dtype::F32,
            vec![2],
            vec![0; 8],
        ))
    });
    let (code, v) = inspect_json(&[s(&dir)]);
    assert_eq!(code, 1);
    assert_eq!(v["unexpected"][0], "transformer.h.0.mlp.extra.weight");
}

/// HF hub GPT-2 layout: no `transformer.` prefix and the causal-mask buffers (`attn.bias`,
/// `attn.masked_bias`) that make the hub count 137,022,720 for GPT-2. They are recognised as
/// buffers, not parameters; a tied head stored twice is reported but does not fail.
#[test]
fn hub_gpt2_layout_with_buffers_and_duplicate_head() {
    let d = tempfile::tempdir().unwrap();
    let dir = gpt2_variant(d.path(), |t| {
        let wte = t
            .iter()
            .find(|x| x.0 == "transformer.wte.weight")
            .unwrap()
            .clone();
        for x in t.iter_mut() {
            x.0 = x.0.trim_start_matches("transformer.").to_string();
        }
        for l in 0..2 {
            // [1, 1, n_positions, n_positions] mask
            t.push((
                format!("h.{l}.attn.bias"),
                safetensors::Dtype::F32,
                vec![1, 1, 64, 64],
                vec![0; 4 * 64 * 64],
            ));
            t.push((
                format!("h.{l}.attn.masked_bias"),
                safetensors::Dtype::F32,
                vec![],
                vec![0; 4],
            ));
        }
        t.push(("lm_head.weight".into(), wte.1, wte.2, wte.3));
    });
    let (code, v) = inspect_json(&[s(&dir)]);
    assert_eq!(code, 0, "{v}");
    assert_eq!(v["census"]["numel"].as_u64(), Some(64_368));
    assert_eq!(v["buffers"].as_array().unwrap().len(), 4);
    assert_eq!(v["buffers_numel"].as_u64(), Some(2 * (64 * 64 + 1)));
    assert_eq!(v["duplicate_tied_head"], "lm_head.weight");
    assert_eq!(
        v["file_numel"].as_u64(),
        Some(64_368 + 2 * (64 * 64 + 1) + 97 * 48)
    );
}

fn raw_file(dir: &Path, header: &str, data: usize) -> PathBuf {
    let p = dir.join("model.safetensors");
    let mut b = (header.len() as u64).to_le_bytes().to_vec();
    b.extend_from_slice(header.as_bytes());
    b.resize(b.len() + data, 0);
    std::fs::write(&p, b).unwrap();
    p
}

fn bad_input(path: &Path, why: &str) {
    truesize()
        .args(["inspect", s(path)])
        .assert()
        .code(2)
        .stderr(contains(s(path)))
        .stderr(contains(why));
}

#[test]
fn planted_truncated_file() {
    let d = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(fixture("tiny-gpt2").join("model.safetensors")).unwrap();
    let p = d.path().join("model.safetensors");
    std::fs::write(&p, &bytes[..bytes.len() - 100]).unwrap();
    bad_input(&p, "truncated");
    std::fs::write(&p, &bytes[..5]).unwrap();
    bad_input(&p, "truncated");
}

#[test]
fn planted_header_length_beyond_eof() {
    let d = tempfile::tempdir().unwrap();
    let mut bytes = std::fs::read(fixture("tiny-gpt2").join("model.safetensors")).unwrap();
    let len = bytes.len() as u64;
    bytes[..8].copy_from_slice(&(len + 10).to_le_bytes());
    let p = d.path().join("model.safetensors");
    std::fs::write(&p, &bytes).unwrap();
    bad_input(&p, "runs past the end of the file");
    bytes[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    std::fs::write(&p, &bytes).unwrap();
    bad_input(&p, "absurd");
}

#[test]
fn planted_overlapping_offsets() {
    let d = tempfile::tempdir().unwrap();
    let p = raw_file(
        d.path(),
        r#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},"b":{"dtype":"F32","shape":[4],"data_offsets":[8,24]}}"#,
        24,
    );
    bad_input(&p, "overlap");
}

#[test]
fn planted_invalid_dtype_and_overflow() {
    let d = tempfile::tempdir().unwrap();
    let p = raw_file(
        d.path(),
        r#"{"a":{"dtype":"Q4","shape":[4],"data_offsets":[0,16]}}"#,
        16,
    );
    bad_input(&p, "dtype = \"Q4\" is not a safetensors dtype");
    let p = raw_file(
        d.path(),
        r#"{"a":{"dtype":"F32","shape":[18446744073709551615,2],"data_offsets":[0,16]}}"#,
        16,
    );
    bad_input(&p, "overflows");
    let p = d.path().join("model.safetensors");
    std::fs::write(&p, [4u8, 0, 0, 0, 0, 0, 0, 0, b'{', 0xc3, 0x28, b'}']).unwrap();
    bad_input(&p, "UTF-8");
}
