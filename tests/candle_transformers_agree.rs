//! A second, independent implementation: candle-transformers' Llama, Qwen2 and Mixtral (forward
//! only, fused kernels) run on the same weights must give the same last-position logits as our
//! differentiable networks.

use candle_core::{DType, Device, Tensor};
use candle_nn::{Activation, VarBuilder};
use candle_transformers::models::{llama, mixtral, qwen2};
use std::path::{Path, PathBuf};
use truesize::config::{self, ConfigSource, Llama3RopeScaling, ModelConfig};
use truesize::measure::reference::{self, max_rel_error};
use truesize::model::{build, Model};

const TOL: f64 = 1e-4;

fn fixture(name: &str) -> (PathBuf, ModelConfig, Tensor) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    let cfg = config::load(ConfigSource::Path(&dir)).unwrap();
    let ids = reference::load(&dir).unwrap().input_ids;
    (dir, cfg, ids)
}

fn ours_last(model: &Model, ids: &Tensor) -> Tensor {
    let logits = model.forward(ids).unwrap();
    let t = logits.dim(1).unwrap();
    // [B, T, V] -> [B, V]
    logits.narrow(1, t - 1, 1).unwrap().squeeze(1).unwrap()
}

fn checkpoint_vb(dir: &Path) -> VarBuilder<'static> {
    unsafe {
        VarBuilder::from_mmaped_safetensors(
            &[dir.join("model.safetensors")],
            DType::F32,
            &Device::Cpu,
        )
        .unwrap()
    }
}

fn ct_llama_config(cfg: &ModelConfig) -> llama::Config {
    // candle-transformers derives head_dim = hidden / heads.
    assert_eq!(cfg.head_dim * cfg.n_head, cfg.n_embd);
    llama::Config {
        hidden_size: cfg.n_embd,
        intermediate_size: cfg.intermediate_size,
        vocab_size: cfg.vocab_size,
        num_hidden_layers: cfg.n_layer,
        num_attention_heads: cfg.n_head,
        num_key_value_heads: cfg.n_kv_head,
        use_flash_attn: false,
        rms_norm_eps: cfg.norm_eps,
        rope_theta: cfg.rope_theta as f32,
        bos_token_id: None,
        eos_token_id: None,
        rope_scaling: cfg.rope_scaling.map(|s| llama::Llama3RopeConfig {
            factor: s.factor as f32,
            low_freq_factor: s.low_freq_factor as f32,
            high_freq_factor: s.high_freq_factor as f32,
            original_max_position_embeddings: s.original_max_position_embeddings,
            rope_type: llama::Llama3RopeType::Llama3,
        }),
        max_position_embeddings: cfg.block_size,
        tie_word_embeddings: cfg.tie_embeddings,
    }
}

fn ct_llama_last(vb: VarBuilder, cfg: &ModelConfig, ids: &Tensor) -> Tensor {
    let ct_cfg = ct_llama_config(cfg);
    let model = llama::Llama::load(vb, &ct_cfg).unwrap();
    let mut cache = llama::Cache::new(false, DType::F32, &ct_cfg, &Device::Cpu).unwrap();
    model.forward(ids, 0, &mut cache).unwrap()
}

#[test]
fn tiny_llama_matches_candle_transformers() {
    let (dir, cfg, ids) = fixture("tiny-llama");
    let theirs = ct_llama_last(checkpoint_vb(&dir), &cfg, &ids);
    let loaded = build::from_checkpoint(&cfg, &dir, DType::F32, &Device::Cpu).unwrap();
    let err = max_rel_error(&ours_last(&loaded.model, &ids), &theirs).unwrap();
    eprintln!("tiny-llama vs candle-transformers llama: {err:.2e}");
    assert!(err <= TOL, "{err:e}");
}

/// Llama-3 RoPE frequency scaling, exercised past `original_max_position_embeddings`, on random
/// weights scaled up so that attention is far from uniform and a RoPE error would show.
#[test]
fn llama3_rope_scaling_matches_candle_transformers() {
    let mut cfg = config::toml::parse(
        "arch='llama'\nvocab_size=64\nblock_size=64\nn_embd=64\nn_layer=2\nn_head=4\n\
         n_kv_head=2\nintermediate_size=96\nrope_theta=500000.0\ntie_embeddings=true\n",
        "llama3-scaled",
    )
    .unwrap();
    cfg.rope_scaling = Some(Llama3RopeScaling {
        factor: 8.0,
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
        original_max_position_embeddings: 8,
    });
    let (varmap, model) = build::random(&cfg, DType::F32, &Device::Cpu, 11).unwrap();
    for (name, var) in varmap.data().lock().unwrap().iter() {
        if !name.contains("norm") {
            var.set(&(var.as_tensor() * 10.0).unwrap()).unwrap();
        }
    }
    let v: Vec<u32> = (0..2 * 32).map(|i| (i * 37 % 64) as u32).collect();
    let ids = Tensor::from_vec(v, (2, 32), &Device::Cpu).unwrap();
    let theirs = ct_llama_last(
        VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu),
        &cfg,
        &ids,
    );
    let ours = ours_last(&model, &ids);
    let err = max_rel_error(&ours, &theirs).unwrap();
    eprintln!("llama3 rope scaling vs candle-transformers llama: {err:.2e}");
    assert!(err <= TOL, "{err:e}");

    // The same weights without scaling must differ: the test can see RoPE.
    let mut plain = cfg.clone();
    plain.rope_scaling = None;
    let unscaled = ct_llama_last(
        VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu),
        &plain,
        &ids,
    );
    assert!(max_rel_error(&ours, &unscaled).unwrap() > 100.0 * TOL);
}

#[test]
fn tiny_qwen2_matches_candle_transformers() {
    let (dir, cfg, ids) = fixture("tiny-qwen2");
    let ct_cfg = qwen2::Config {
        vocab_size: cfg.vocab_size,
        hidden_size: cfg.n_embd,
        intermediate_size: cfg.intermediate_size,
        num_hidden_layers: cfg.n_layer,
        num_attention_heads: cfg.n_head,
        num_key_value_heads: cfg.n_kv_head,
        max_position_embeddings: cfg.block_size,
        sliding_window: cfg.block_size,
        max_window_layers: cfg.n_layer,
        tie_word_embeddings: cfg.tie_embeddings,
        rope_theta: cfg.rope_theta,
        rms_norm_eps: cfg.norm_eps,
        use_sliding_window: false,
        hidden_act: Activation::Silu,
    };
    let mut model = qwen2::ModelForCausalLM::new(&ct_cfg, checkpoint_vb(&dir)).unwrap();
    // [B, 1, V] -> [B, V]
    let theirs = model.forward(&ids, 0).unwrap().squeeze(1).unwrap();
    let loaded = build::from_checkpoint(&cfg, &dir, DType::F32, &Device::Cpu).unwrap();
    let err = max_rel_error(&ours_last(&loaded.model, &ids), &theirs).unwrap();
    eprintln!("tiny-qwen2 vs candle-transformers qwen2: {err:.2e}");
    assert!(err <= TOL, "{err:e}");
}

#[test]
fn tiny_mixtral_matches_candle_transformers() {
    let (dir, cfg, ids) = fixture("tiny-mixtral");
    // Its Config has crate-private fields: build it the way it is meant to be, from JSON.
    let ct_cfg: mixtral::Config = serde_json::from_value(serde_json::json!({
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.n_embd,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.n_kv_head,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.block_size,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "sliding_window": cfg.block_size,
        "num_experts_per_tok": cfg.n_experts_per_tok,
        "num_local_experts": cfg.n_experts,
        "use_flash_attn": false,
    }))
    .unwrap();
    let mut model = mixtral::Model::new(&ct_cfg, checkpoint_vb(&dir)).unwrap();
    // [B, 1, V] -> [B, V]
    let theirs = model.forward(&ids, 0).unwrap().squeeze(1).unwrap();
    let loaded = build::from_checkpoint(&cfg, &dir, DType::F32, &Device::Cpu).unwrap();
    let err = max_rel_error(&ours_last(&loaded.model, &ids), &theirs).unwrap();
    eprintln!("tiny-mixtral vs candle-transformers mixtral: {err:.2e}");
    assert!(err <= TOL, "{err:e}");
}
