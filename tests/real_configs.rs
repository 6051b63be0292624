//! Real HF `config.json` files of the families after Llama (tests/data/configs, copied from the
//! hub's files), counted exactly: total and active parameters equal the numbers HF transformers
//! 5.24 gives for the same files (`scripts/hf_counts.py`: the model built on PyTorch's meta
//! device, `sum(numel)` over `named_parameters()`, tied weights once; a multimodal Gemma 3 as its
//! text model). The shape-only census of the genuine network must agree too, and the switches
//! each family reads are checked on the real files.

mod common;

use candle_core::DType;
use common::{json_of, truesize};
use std::path::PathBuf;
use truesize::config::{self, Attention, ConfigSource, ModelConfig, RopeScaling, Storage};
use truesize::estimate::params::estimate;
use truesize::model::build;

fn data(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/configs")
        .join(format!("{name}.json"))
}

fn load(name: &str) -> ModelConfig {
    config::load(ConfigSource::Path(&data(name))).unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// (file, total, active) from `scripts/hf_counts.py` with transformers 5.24.0 on the meta device.
const HF_COUNTS: &[(&str, u64, u64)] = &[
    ("qwen3-0.6b", 596_049_920, 596_049_920),
    ("qwen3-8b", 8_190_735_360, 8_190_735_360),
    ("qwen3-32b", 32_762_123_264, 32_762_123_264),
    ("qwen3-30b-a3b", 30_532_122_624, 3_353_032_704),
    ("qwen3-235b-a22b", 235_093_634_560, 22_190_763_520),
    ("gemma-2-2b", 2_614_341_888, 2_614_341_888),
    ("gemma-2-9b", 9_241_705_984, 9_241_705_984),
    ("gemma-2-27b", 27_227_128_320, 27_227_128_320),
    ("gemma-3-1b", 999_885_952, 999_885_952),
    ("gemma-3-4b", 3_880_263_168, 3_880_263_168),
    ("gemma-3-12b", 11_766_034_176, 11_766_034_176),
    ("gemma-3-27b", 27_009_346_304, 27_009_346_304),
    ("phi-3-mini-4k", 3_821_079_552, 3_821_079_552),
    ("phi-3.5-mini", 3_821_079_552, 3_821_079_552),
    ("phi-3-medium-4k", 13_960_238_080, 13_960_238_080),
    // Each model type's defaults (`{"model_type": ...}` alone) ...
    ("defaults-qwen3", 12_049_461_248, 12_049_461_248),
    ("defaults-qwen3_moe", 15_350_731_776, 1_761_186_816),
    ("defaults-gemma2", 2_614_341_888, 2_614_341_888),
    ("defaults-gemma3_text", 2_628_658_432, 2_628_658_432),
    ("defaults-gemma3", 2_628_658_432, 2_628_658_432),
    ("defaults-phi3", 3_821_079_552, 3_821_079_552),
    // ... and dense layers among sparse ones (decoder_sparse_step 2, mlp_only_layers [3]).
    ("qwen3-moe-sparse-mix", 4_261_056, 3_671_232),
];

#[test]
fn real_configs_count_as_transformers_counts() {
    for &(name, total, active) in HF_COUNTS {
        let cfg = load(name);
        let p = estimate(&cfg).unwrap();
        assert_eq!(p.total, total, "{name}: total");
        assert_eq!(p.active_per_token, active, "{name}: active");
        let census: u64 = build::shapes_only(&cfg, DType::BF16)
            .unwrap()
            .iter()
            .map(|s| s.numel())
            .sum();
        assert_eq!(census, total, "{name}: shape-only census");
    }
}

#[test]
fn estimate_command_prints_the_published_counts() {
    // The figures the model cards publish, through the binary.
    for (name, total, active) in [
        ("qwen3-8b", 8_190_735_360u64, 8_190_735_360u64),
        ("qwen3-30b-a3b", 30_532_122_624, 3_353_032_704),
        ("gemma-2-9b", 9_241_705_984, 9_241_705_984),
        ("phi-3-mini-4k", 3_821_079_552, 3_821_079_552),
    ] {
        let out = truesize()
            .args(["estimate", "--format", "json", "--config"])
            .arg(data(name))
            .output()
            .unwrap();
        assert!(out.status.success(), "{name}");
        let j = json_of(&out.stdout);
        assert_eq!(j["params"]["total"], total, "{name}");
        assert_eq!(j["params"]["active_per_token"], active, "{name}");
    }
}

#[test]
fn switches_read_from_real_configs() {
    let q = load("qwen3-8b");
    assert!(q.qk_norm && !q.bias && q.head_dim == 128 && !q.tie_embeddings);
    assert!(q.layer_attention.iter().all(|a| *a == Attention::Full));

    let m = load("qwen3-30b-a3b");
    assert_eq!(
        (m.n_experts, m.n_experts_per_tok, m.moe_intermediate_size),
        (128, 8, 768)
    );
    assert!(m.moe_renormalize && m.moe_layer_count() == 48);

    // Gemma 2: window 4096 on even layers, both soft-caps, query_pre_attn_scalar 144 for 27B.
    let g = load("gemma-2-27b");
    assert_eq!(g.attention(0), Attention::Sliding { window: 4096 });
    assert_eq!(g.attention(1), Attention::Full);
    assert_eq!((g.attn_softcap, g.final_softcap), (Some(50.0), Some(30.0)));
    assert_eq!((g.attn_scalar, g.head_dim), (144.0, 128));
    assert_eq!(g.pad_token_id, Some(0));

    // Gemma 3 (text): every 6th layer global; local base 10k, global 1M scaled linearly by 8
    // (multimodal 4B, whose text_config leaves most keys to Gemma3TextConfig's defaults).
    let g3 = load("gemma-3-4b");
    assert_eq!(g3.model_type, "gemma3");
    assert_eq!((g3.n_head, g3.n_kv_head, g3.head_dim), (8, 4, 256));
    assert_eq!(g3.vocab_size, 262_208);
    let globals: Vec<usize> = (0..g3.n_layer)
        .filter(|&i| g3.attention(i) == Attention::Full)
        .collect();
    assert_eq!(globals, vec![5, 11, 17, 23, 29]);
    assert_eq!(g3.attention(0), Attention::Sliding { window: 1024 });
    assert_eq!(
        (g3.rope_theta, g3.rope_local_theta),
        (1_000_000.0, 10_000.0)
    );
    assert!(g3.rope_per_layer_type);
    assert_eq!(g3.rope_scaling, Some(RopeScaling::Linear { factor: 8.0 }));
    assert!(g3.qk_norm && g3.attn_softcap.is_none());
    let g1 = load("gemma-3-1b");
    assert_eq!(g1.attention(0), Attention::Sliding { window: 512 });
    assert!(g1.rope_scaling.is_none());

    // Phi-3: fused storage, every layer windowed at 2047 (4k), LongRoPE for 3.5-mini.
    let p = load("phi-3-mini-4k");
    // Windowed, yet one RoPE for every layer.
    assert!(!p.rope_per_layer_type);
    assert_eq!(
        (p.qkv_storage, p.gate_up_storage),
        (Storage::Fused, Storage::Fused)
    );
    assert!(p
        .layer_attention
        .iter()
        .all(|a| *a == Attention::Sliding { window: 2047 }));
    let l = load("phi-3.5-mini");
    let Some(RopeScaling::LongRope(lr)) = &l.rope_scaling else {
        panic!("phi-3.5-mini: {:?}", l.rope_scaling)
    };
    assert_eq!(lr.short_factor.len(), 48);
    assert_eq!(lr.original_max_position_embeddings, 4096);
    // transformers: √(1 + ln(131072 / 4096) / ln 4096)
    assert!((lr.attention_factor - (1.0f64 + 32f64.ln() / 4096f64.ln()).sqrt()).abs() < 1e-12);
    let med = load("phi-3-medium-4k");
    assert_eq!((med.n_head, med.n_kv_head), (40, 10));
}

/// Every value that would make the math undefined is refused with exit 2, naming the key as
/// the config writes it (nested keys with their path).
#[test]
fn bad_values_name_the_key_as_written() {
    let cases: &[(&str, &str, &str)] = &[
        (
            r#"{"model_type":"gemma2","query_pre_attn_scalar":0}"#,
            "query_pre_attn_scalar",
            "0",
        ),
        (
            r#"{"model_type":"gemma2","attn_logit_softcapping":-1.0}"#,
            "attn_logit_softcapping",
            "-1",
        ),
        (
            r#"{"model_type":"gemma2","sliding_window":0}"#,
            "sliding_window",
            "0",
        ),
        (
            r#"{"model_type":"gemma3","text_config":{"sliding_window_pattern":0}}"#,
            "text_config.sliding_window_pattern",
            "0",
        ),
        (
            r#"{"model_type":"gemma3_text","num_hidden_layers":2,"layer_types":["full_attention"]}"#,
            "layer_types",
            "1 entries",
        ),
        (
            r#"{"model_type":"gemma3_text","rope_parameters":{"full_attention":{"rope_type":"yarn"}}}"#,
            "rope_parameters.full_attention.rope_type",
            "yarn",
        ),
        (
            r#"{"model_type":"qwen3_moe","decoder_sparse_step":0}"#,
            "decoder_sparse_step",
            "0",
        ),
        (
            r#"{"model_type":"qwen3_moe","num_experts":4,"num_experts_per_tok":5}"#,
            "num_experts_per_tok",
            "5",
        ),
        (
            r#"{"model_type":"qwen3_moe","moe_intermediate_size":0}"#,
            "moe_intermediate_size",
            "0",
        ),
        (
            r#"{"model_type":"phi3","partial_rotary_factor":0.01}"#,
            "partial_rotary_factor",
            "0.01",
        ),
        (
            r#"{"model_type":"phi3","rope_scaling":{"type":"longrope","short_factor":[1.0],"long_factor":[1.0]}}"#,
            "rope_scaling.short_factor",
            "1 entries",
        ),
        (
            r#"{"model_type":"phi3","pad_token_id":40000}"#,
            "pad_token_id",
            "40000",
        ),
        (
            r#"{"model_type":"gemma2","hidden_activation":"gelu"}"#,
            "hidden_activation",
            "gelu",
        ),
        (
            r#"{"model_type":"gemma3_text","use_bidirectional_attention":true}"#,
            "use_bidirectional_attention",
            "true",
        ),
    ];
    for (json, key, value) in cases {
        let (_dir, path) = common::temp_file("config.json", json.as_bytes());
        let out = truesize()
            .args(["estimate", "--config"])
            .arg(&path)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{json}: {err}");
        assert!(
            err.contains(key) && err.contains(value),
            "{json}: stderr does not name {key} = {value}: {err}"
        );
    }
}

/// Each built-in preset of these families describes the real config it names: the same count
/// (transformers'), the same layer pattern and the same switches. (The Gemma 3 4B+ presets leave
/// out the hub's linear RoPE scaling of the global layers: numerics only.)
#[test]
fn presets_are_the_real_configs() {
    for (preset, file) in [
        ("qwen3-0.6b", "qwen3-0.6b"),
        ("qwen3-8b", "qwen3-8b"),
        ("qwen3-32b", "qwen3-32b"),
        ("qwen3-30b-a3b", "qwen3-30b-a3b"),
        ("qwen3-235b-a22b", "qwen3-235b-a22b"),
        ("gemma2-2b", "gemma-2-2b"),
        ("gemma2-9b", "gemma-2-9b"),
        ("gemma2-27b", "gemma-2-27b"),
        ("gemma3-1b", "gemma-3-1b"),
        ("gemma3-4b", "gemma-3-4b"),
        ("gemma3-12b", "gemma-3-12b"),
        ("gemma3-27b", "gemma-3-27b"),
        ("phi3-mini", "phi-3-mini-4k"),
        ("phi3-medium", "phi-3-medium-4k"),
    ] {
        let p = config::load(ConfigSource::Preset(preset)).unwrap();
        let r = load(file);
        let &(_, total, active) = HF_COUNTS.iter().find(|(n, _, _)| *n == file).unwrap();
        let e = estimate(&p).unwrap();
        assert_eq!((e.total, e.active_per_token), (total, active), "{preset}");
        let shape = |c: &ModelConfig| {
            (
                (c.vocab_size, c.block_size, c.n_embd, c.n_layer),
                (c.n_head, c.n_kv_head, c.head_dim, c.intermediate_size),
                (c.tie_embeddings, c.bias, c.qkv_bias, c.qk_norm),
                (c.norm, c.norm_placement, c.mlp, c.embedding_scale),
                (c.qkv_storage, c.gate_up_storage, c.moe_intermediate_size),
                (c.n_experts, c.n_experts_per_tok, c.moe_renormalize),
                c.layer_attention.clone(),
            )
        };
        assert_eq!(shape(&p), shape(&r), "{preset} vs {file}");
        let numerics = |c: &ModelConfig| {
            (
                c.attn_scalar,
                c.attn_softcap,
                c.final_softcap,
                c.rope_theta,
                c.rope_per_layer_type,
                c.rope_local_theta,
                c.norm_eps,
            )
        };
        assert_eq!(numerics(&p), numerics(&r), "{preset} vs {file}");
    }
}
