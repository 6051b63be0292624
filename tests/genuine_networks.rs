//! The proof that the networks are genuine: HF-made checkpoints (tests/fixtures/*) loaded into
//! our models reproduce HF's logits, loss and every parameter's gradient norm; and the tensors the
//! networks hold agree with the closed-form parameter count to the parameter. The lean step runs
//! every fixture too, to the same loss and gradient norms.

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarMap;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use truesize::config::{self, ConfigSource, Llama3RopeScaling, ModelConfig, RopeScaling};
use truesize::estimate::params::estimate;
use truesize::measure::reference::{self, max_rel_error};
use truesize::model::{build, next_token_loss};
use truesize::train::{self, LeanModel, LeanOptions};

const LOGITS_TOL: f64 = 1e-4;
const LOSS_TOL: f64 = 1e-5;
const GRAD_NORM_TOL: f64 = 1e-3;

/// Every fixture folder, so that a new one is tested without code changes.
fn fixture_dirs() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("config.json").is_file())
        .collect();
    dirs.sort();
    assert!(!dirs.is_empty(), "no fixtures under {}", root.display());
    dirs
}

fn rel(a: f64, b: f64) -> f64 {
    (a - b).abs() / b.abs()
}

/// A gradient norm's error: relative, or absolute where HF's is exactly zero (an expert no token
/// chose), so that 0/0 does not become a NaN that every comparison passes.
fn norm_err(got: f64, want: f64) -> f64 {
    if want == 0.0 {
        got.abs()
    } else {
        rel(got, want)
    }
}

fn l2(t: &Tensor) -> f64 {
    t.to_dtype(DType::F64)
        .unwrap()
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .sqrt()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

fn vars(varmap: &VarMap) -> BTreeMap<String, Var> {
    varmap
        .data()
        .lock()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

fn census_numel(cfg: &ModelConfig) -> u64 {
    build::shapes_only(cfg, DType::F32)
        .unwrap()
        .iter()
        .map(|s| s.numel())
        .sum()
}

#[test]
fn fixtures_reproduce_hf_logits_loss_and_gradients() {
    for dir in fixture_dirs() {
        let name = dir.file_name().unwrap().to_string_lossy().to_string();
        let cfg = config::load(ConfigSource::Path(&dir)).unwrap();
        let refr = reference::load(&dir).unwrap();

        // Parameter count: closed form = shape-only census = HF's count.
        let total = estimate(&cfg).unwrap().total;
        assert_eq!(census_numel(&cfg), total, "{name}: census vs estimate");
        if let Some(p) = refr.params {
            assert_eq!(total, p, "{name}: estimate vs HF count");
        }

        let loaded = build::from_checkpoint(&cfg, &dir, DType::F32, &Device::Cpu).unwrap();
        assert!(
            loaded.unexpected.is_empty(),
            "{name}: unexpected {:?}",
            loaded.unexpected
        );
        let numel: u64 = vars(&loaded.varmap)
            .values()
            .map(|v| v.elem_count() as u64)
            .sum();
        assert_eq!(numel, total, "{name}: loaded numel vs estimate");

        let logits = loaded.model.forward(&refr.input_ids).unwrap();
        let logits_err = max_rel_error(&logits, &refr.logits).unwrap();
        assert!(
            logits_err <= LOGITS_TOL,
            "{name}: logits error {logits_err:e}"
        );

        let loss = next_token_loss(&logits, &refr.input_ids).unwrap();
        let loss_v = loss.to_scalar::<f32>().unwrap() as f64;
        let loss_err = rel(loss_v, refr.loss.unwrap());
        assert!(
            loss_err <= LOSS_TOL,
            "{name}: loss {loss_v} error {loss_err:e}"
        );

        let grads = loss.backward().unwrap();
        let want = refr.grad_norm.as_ref().unwrap();
        let vars = vars(&loaded.varmap);
        let mut worst = (0.0f64, String::new());
        for (pname, var) in &vars {
            let g = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("{name}: no gradient for {pname}"));
            let expected = *want
                .get(pname)
                .unwrap_or_else(|| panic!("{name}: HF reports no gradient for {pname}"));
            let e = norm_err(l2(g), expected);
            if e >= worst.0 {
                worst = (e, pname.clone());
            }
        }
        for pname in want.keys() {
            assert!(vars.contains_key(pname), "{name}: no parameter {pname}");
        }
        assert!(
            worst.0 <= GRAD_NORM_TOL,
            "{name}: grad norm of {} off by {:e}",
            worst.1,
            worst.0
        );
        eprintln!(
            "{name}: logits max rel error {logits_err:.2e}, loss rel error {loss_err:.2e}, \
             worst grad-norm rel error {:.2e} ({}), {} tensors, {numel} params",
            worst.0,
            worst.1,
            vars.len()
        );

        // The lean step (verify's default engine) runs every fixture: same loss and gradients.
        let opts = LeanOptions::default();
        train::supported(&cfg, &opts).unwrap_or_else(|why| panic!("{name}: {why}"));
        let lean = LeanModel::from_varmap(&cfg, &loaded.varmap).unwrap();
        let (lean_loss, lean_grads) = lean.loss_and_grads(&refr.input_ids, &opts).unwrap();
        let e = rel(lean_loss, refr.loss.unwrap());
        assert!(e <= LOSS_TOL, "{name}: lean loss {lean_loss} error {e:e}");
        assert_eq!(lean_grads.len(), want.len(), "{name}: lean gradient count");
        for (pname, expected) in want {
            let e = norm_err(l2(&lean_grads[pname]), *expected);
            assert!(
                e <= GRAD_NORM_TOL,
                "{name}: lean grad norm of {pname} off by {e:e}"
            );
        }
    }
}

fn toml_cfg(text: &str) -> ModelConfig {
    let cfg = config::toml::parse(text, "test").unwrap();
    cfg.validate().unwrap();
    cfg
}

/// Small configs covering every structural flag.
fn configs() -> Vec<ModelConfig> {
    let mut scaled = toml_cfg(
        "arch='llama'\nvocab_size=40\nblock_size=32\nn_embd=32\nn_layer=2\nn_head=4\n\
         n_kv_head=1\nintermediate_size=48\nrope_theta=500000.0\n",
    );
    scaled.rope_scaling = Some(RopeScaling::Llama3(Llama3RopeScaling {
        factor: 8.0,
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
        original_max_position_embeddings: 8,
    }));
    vec![
        config::load(ConfigSource::Preset("baby-gpt")).unwrap(),
        // bias-free GPT-2 with an untied head
        toml_cfg(
            "arch='gpt2'\nvocab_size=50\nblock_size=16\nn_embd=32\nn_layer=2\nn_head=4\n\
             bias=false\ntie_embeddings=false\n",
        ),
        // GQA llama, untied
        toml_cfg(
            "arch='llama'\nvocab_size=40\nblock_size=32\nn_embd=32\nn_layer=2\nn_head=4\n\
             n_kv_head=2\nintermediate_size=48\ntie_embeddings=false\n",
        ),
        // Qwen2-like: q/k/v bias, tied
        toml_cfg(
            "arch='llama'\nvocab_size=40\nblock_size=32\nn_embd=32\nn_layer=2\nn_head=4\n\
             n_kv_head=2\nintermediate_size=48\nqkv_bias=true\ntie_embeddings=true\n",
        ),
        // explicit head_dim (n_head·head_dim = 48 ≠ 32), all biases, mlp bias
        toml_cfg(
            "arch='llama'\nvocab_size=40\nblock_size=32\nn_embd=32\nn_layer=1\nn_head=4\n\
             n_kv_head=2\nhead_dim=12\nintermediate_size=40\nbias=true\nmlp_bias=true\n",
        ),
        // MoE, top-2 of 4
        toml_cfg(
            "arch='llama'\nvocab_size=40\nblock_size=32\nn_embd=32\nn_layer=2\nn_head=4\n\
             n_kv_head=2\nintermediate_size=24\nn_experts=4\nn_experts_per_tok=2\n\
             tie_embeddings=false\n",
        ),
        // MQA with Llama-3 RoPE scaling
        scaled,
    ]
}

fn ids(cfg: &ModelConfig, b: usize, t: usize) -> Tensor {
    let v: Vec<u32> = (0..b * t)
        .map(|i| ((i * 7919 + 13) % cfg.vocab_size) as u32)
        .collect();
    Tensor::from_vec(v, (b, t), &Device::Cpu).unwrap()
}

#[test]
fn random_models_match_estimate_and_shapes_only() {
    for cfg in configs() {
        let specs = build::shapes_only(&cfg, DType::F32).unwrap();
        let (varmap, _) = build::random(&cfg, DType::F32, &Device::Cpu, 7).unwrap();
        let vars = vars(&varmap);
        let total = estimate(&cfg).unwrap().total;
        let numel: u64 = vars.values().map(|v| v.elem_count() as u64).sum();
        assert_eq!(numel, total, "{}: VarMap numel vs estimate", cfg.name);
        assert_eq!(
            specs.iter().map(|s| s.numel()).sum::<u64>(),
            total,
            "{}: shapes_only numel vs estimate",
            cfg.name
        );
        let names: Vec<&String> = vars.keys().collect();
        let spec_names: Vec<&String> = specs.iter().map(|s| &s.name).collect();
        assert_eq!(names, spec_names, "{}", cfg.name);
        for s in &specs {
            assert_eq!(vars[&s.name].dims(), s.shape.as_slice(), "{}", s.name);
        }
    }
}

#[test]
fn random_is_deterministic_per_seed() {
    let cfg = &configs()[2];
    let values = |seed| {
        let (vm, _) = build::random(cfg, DType::F32, &Device::Cpu, seed).unwrap();
        vars(&vm)
            .into_iter()
            .map(|(k, v)| (k, v.flatten_all().unwrap().to_vec1::<f32>().unwrap()))
            .collect::<BTreeMap<_, _>>()
    };
    let a = values(42);
    assert_eq!(a, values(42));
    assert_ne!(a, values(43));
    // GPT-2/Llama init: weights N(0, 0.02), norm weights 1.
    let w = &a["model.layers.0.self_attn.q_proj.weight"];
    let std = (w.iter().map(|x| (*x as f64).powi(2)).sum::<f64>() / w.len() as f64).sqrt();
    assert!((std - 0.02).abs() < 0.003, "std {std}");
    assert!(a["model.norm.weight"].iter().all(|&x| x == 1.0));
}

#[test]
fn every_parameter_gets_a_gradient() {
    for cfg in configs() {
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            let (varmap, model) = build::random(&cfg, dtype, &Device::Cpu, 1).unwrap();
            let input = ids(&cfg, 2, 8);
            let logits = model.forward(&input).unwrap();
            assert_eq!(logits.dims(), &[2, 8, cfg.vocab_size]);
            assert_eq!(logits.dtype(), dtype);
            let loss = next_token_loss(&logits, &input).unwrap();
            let lv = loss.to_scalar::<f32>().unwrap() as f64;
            // Random init predicts a near-uniform distribution.
            let ln_v = (cfg.vocab_size as f64).ln();
            assert!(
                rel(lv, ln_v) < 0.05,
                "{}: loss {lv} vs ln V {ln_v}",
                cfg.name
            );
            let grads = loss.backward().unwrap();
            for (name, var) in vars(&varmap) {
                let g = grads.get(var.as_tensor());
                assert!(
                    g.is_some(),
                    "{} {dtype:?}: no gradient for {name}",
                    cfg.name
                );
                assert!(
                    l2(g.unwrap()) > 0.0,
                    "{}: zero gradient for {name}",
                    cfg.name
                );
            }
        }
    }
}

/// Causality: a token's logits must not depend on later tokens.
#[test]
fn logits_are_causal() {
    for cfg in configs() {
        let (_, model) = build::random(&cfg, DType::F32, &Device::Cpu, 3).unwrap();
        let a = ids(&cfg, 1, 8);
        let mut v = a.flatten_all().unwrap().to_vec1::<u32>().unwrap();
        v[7] = (v[7] + 1) % cfg.vocab_size as u32;
        let b = Tensor::from_vec(v, (1, 8), &Device::Cpu).unwrap();
        let la = model.forward(&a).unwrap().narrow(1, 0, 7).unwrap();
        let lb = model.forward(&b).unwrap().narrow(1, 0, 7).unwrap();
        assert_eq!(max_rel_error(&la, &lb).unwrap(), 0.0, "{}", cfg.name);
    }
}

#[test]
fn shapes_only_405b_allocates_nothing() {
    let cfg = config::load(ConfigSource::Preset("llama3.1-405b")).unwrap();
    let t = std::time::Instant::now();
    let specs = build::shapes_only(&cfg, DType::BF16).unwrap();
    let numel: u64 = specs.iter().map(|s| s.numel()).sum();
    assert_eq!(numel, 405_853_388_800);
    assert_eq!(numel, estimate(&cfg).unwrap().total);
    assert!(t.elapsed().as_secs_f64() < 5.0);
    assert!(specs.windows(2).all(|w| w[0].name < w[1].name));
    assert_eq!(specs[0].dtype, DType::BF16);
}

#[test]
fn tied_weight_recorded_once() {
    let cfg = config::load(ConfigSource::Preset("baby-gpt")).unwrap();
    let specs = build::shapes_only(&cfg, DType::F32).unwrap();
    assert!(specs.iter().all(|s| s.name != "lm_head.weight"));
    assert_eq!(
        specs
            .iter()
            .filter(|s| s.name == "transformer.wte.weight")
            .count(),
        1
    );
    let json = serde_json::to_value(&specs[0]).unwrap();
    assert_eq!(json["dtype"], "f32");
}

fn fixture_and_tmp(name: &str) -> (tempfile::TempDir, ModelConfig) {
    let src = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    let cfg = config::load(ConfigSource::Path(&src)).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    (tmp, cfg)
}

fn fixture_tensors(name: &str) -> BTreeMap<String, Tensor> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
        .join("model.safetensors");
    candle_core::safetensors::load(p, &Device::Cpu)
        .unwrap()
        .into_iter()
        .collect()
}

/// Hub GPT-2 checkpoints drop `transformer.` and carry attention-mask buffers; a tied head may
/// also be stored. All load; the extras are reported, not fatal.
#[test]
fn hub_gpt2_names_and_buffers_are_accepted() {
    let (tmp, cfg) = fixture_and_tmp("tiny-gpt2");
    let mut ts: BTreeMap<String, Tensor> = fixture_tensors("tiny-gpt2")
        .into_iter()
        .map(|(k, v)| (k.trim_start_matches("transformer.").to_string(), v))
        .collect();
    ts.insert(
        "h.0.attn.bias".into(),
        Tensor::ones((1, 1, 4, 4), DType::U8, &Device::Cpu).unwrap(),
    );
    ts.insert(
        "h.0.attn.masked_bias".into(),
        Tensor::new(-1e4f32, &Device::Cpu).unwrap(),
    );
    ts.insert("lm_head.weight".into(), ts["wte.weight"].clone());
    candle_core::safetensors::save(
        &ts.into_iter().collect(),
        tmp.path().join("model.safetensors"),
    )
    .unwrap();
    let loaded = build::from_checkpoint(&cfg, tmp.path(), DType::F32, &Device::Cpu).unwrap();
    assert_eq!(
        loaded.unexpected,
        ["h.0.attn.bias", "h.0.attn.masked_bias", "lm_head.weight"]
    );
    let refr = reference::load(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/tiny-gpt2")
            .as_path(),
    )
    .unwrap();
    let logits = loaded.model.forward(&refr.input_ids).unwrap();
    assert!(max_rel_error(&logits, &refr.logits).unwrap() <= LOGITS_TOL);
}

/// Every missing and every mis-shaped tensor is named in one error; nothing panics.
#[test]
fn checkpoint_errors_list_every_problem() {
    let (tmp, cfg) = fixture_and_tmp("tiny-llama");
    let mut ts = fixture_tensors("tiny-llama");
    ts.remove("model.norm.weight");
    ts.remove("model.layers.1.mlp.up_proj.weight");
    ts.insert(
        "model.layers.0.self_attn.k_proj.weight".into(),
        Tensor::zeros((64, 64), DType::F32, &Device::Cpu).unwrap(),
    );
    candle_core::safetensors::save(
        &ts.into_iter().collect(),
        tmp.path().join("model.safetensors"),
    )
    .unwrap();
    let err = build::from_checkpoint(&cfg, tmp.path(), DType::F32, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("model.norm.weight"), "{err}");
    assert!(err.contains("model.layers.1.mlp.up_proj.weight"), "{err}");
    assert!(
        err.contains("model.layers.0.self_attn.k_proj.weight expected [32, 64] found [64, 64]"),
        "{err}"
    );
    assert!(err.contains(&tmp.path().display().to_string()), "{err}");

    let empty = tempfile::tempdir().unwrap();
    let err = build::from_checkpoint(&cfg, empty.path(), DType::F32, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("model.safetensors"), "{err}");
}

/// A sharded checkpoint (`model.safetensors.index.json`) loads like a single file.
#[test]
fn sharded_checkpoint_loads() {
    let (tmp, cfg) = fixture_and_tmp("tiny-qwen2");
    let ts = fixture_tensors("tiny-qwen2");
    let (a, b): (Vec<_>, Vec<_>) = ts.into_iter().partition(|(k, _)| k.contains("layers.0"));
    let mut map = serde_json::Map::new();
    for (part, file) in [
        (a, "model-00001-of-00002.safetensors"),
        (b, "model-00002-of-00002.safetensors"),
    ] {
        for (k, _) in &part {
            map.insert(k.clone(), file.into());
        }
        let part: std::collections::HashMap<String, Tensor> = part.into_iter().collect();
        candle_core::safetensors::save(&part, tmp.path().join(file)).unwrap();
    }
    let index = serde_json::json!({ "metadata": {}, "weight_map": map });
    std::fs::write(
        tmp.path().join("model.safetensors.index.json"),
        index.to_string(),
    )
    .unwrap();
    let loaded = build::from_checkpoint(&cfg, tmp.path(), DType::F32, &Device::Cpu).unwrap();
    let numel: u64 = vars(&loaded.varmap)
        .values()
        .map(|v| v.elem_count() as u64)
        .sum();
    assert_eq!(numel, 85_760);
}

#[test]
fn reference_errors_name_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let err = reference::load(tmp.path()).err().unwrap().to_string();
    assert!(err.contains("expected.safetensors"), "{err}");
    let a = Tensor::zeros((2, 3), DType::F32, &Device::Cpu).unwrap();
    let b = Tensor::zeros((3, 2), DType::F32, &Device::Cpu).unwrap();
    assert!(max_rel_error(&a, &b).is_err());
    let c = Tensor::new(&[1f32, -4.0], &Device::Cpu).unwrap();
    let d = Tensor::new(&[1.1f32, -4.0], &Device::Cpu).unwrap();
    assert!((max_rel_error(&d, &c).unwrap() - 0.025).abs() < 1e-6);
}

/// A Gemma 3 checkpoint saved by `Gemma3ForConditionalGeneration` (hub layout: the text model
/// under `language_model.`, a vision tower and projector beside it) loads into the text model:
/// the same logits as the text-only fixture, the vision tensors neither loaded nor unexpected,
/// and `inspect` lists them apart from the parameters.
#[test]
fn gemma3_multimodal_checkpoint_loads_its_text_model() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-gemma3");
    let dir = tempfile::tempdir().unwrap();
    let text = candle_core::safetensors::load(src.join("model.safetensors"), &Device::Cpu).unwrap();
    let mut stored: std::collections::HashMap<String, Tensor> = text
        .into_iter()
        .map(|(k, v)| (format!("language_model.{k}"), v))
        .collect();
    for (name, shape) in [
        (
            "vision_tower.vision_model.embeddings.patch_embedding.weight",
            vec![8, 3, 2, 2],
        ),
        (
            "multi_modal_projector.mm_input_projection_weight",
            vec![8, 64],
        ),
    ] {
        stored.insert(
            name.into(),
            Tensor::zeros(shape, DType::F32, &Device::Cpu).unwrap(),
        );
    }
    candle_core::safetensors::save(&stored, dir.path().join("model.safetensors")).unwrap();
    let text_cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    let mm = serde_json::json!({
        "model_type": "gemma3",
        "architectures": ["Gemma3ForConditionalGeneration"],
        "text_config": text_cfg,
        "vision_config": {"model_type": "siglip_vision_model", "hidden_size": 8},
    });
    std::fs::write(dir.path().join("config.json"), mm.to_string()).unwrap();

    let cfg = config::load(ConfigSource::Path(dir.path())).unwrap();
    assert_eq!(cfg.model_type, "gemma3");
    let loaded = build::from_checkpoint(&cfg, dir.path(), DType::F32, &Device::Cpu).unwrap();
    assert!(loaded.unexpected.is_empty(), "{:?}", loaded.unexpected);
    let refr = reference::load(&src).unwrap();
    let logits = loaded.model.forward(&refr.input_ids).unwrap();
    assert!(max_rel_error(&logits, &refr.logits).unwrap() <= LOGITS_TOL);

    let ckpt = truesize::checkpoint::Checkpoint::open(dir.path()).unwrap();
    let f = truesize::checkpoint::check::check(&ckpt, Some(&cfg)).unwrap();
    assert_eq!(f.outside.len(), 2);
    assert!(f.unexpected.is_empty() && f.missing.is_empty(), "{f:?}");
    let numel: u64 = f.params.iter().map(|t| t.numel).sum();
    assert_eq!(numel, estimate(&cfg).unwrap().total);
}
