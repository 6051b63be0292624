//! Property tests: the closed form equals the genuine model's shape-only census for every
//! architecture option, and no input makes the parsers panic.

use proptest::prelude::*;
use truesize::config::{hf, toml, ModelConfig};
use truesize::estimate::params::{estimate, Component};
use truesize::model::build::shapes_only;

fn llama_toml(
    (d_heads, n_head, kv_div, layers, vocab, ff): (usize, usize, usize, usize, usize, usize),
    (explicit_hd, tie, qkv_bias, bias, mlp_bias, experts): (
        Option<usize>,
        bool,
        bool,
        bool,
        bool,
        usize,
    ),
) -> String {
    let n_kv = (n_head / kv_div).max(1);
    let n_kv = if n_head % n_kv == 0 { n_kv } else { n_head };
    let mut s = format!(
        "arch='llama'\nvocab_size={vocab}\nblock_size=64\nn_embd={}\nn_layer={layers}\nn_head={n_head}\n\
         n_kv_head={n_kv}\nintermediate_size={ff}\ntie_embeddings={tie}\nqkv_bias={qkv_bias}\nbias={bias}\nmlp_bias={mlp_bias}\n",
        d_heads * n_head
    );
    if let Some(hd) = explicit_hd {
        s.push_str(&format!("head_dim={}\n", hd * 2));
    }
    if experts > 0 {
        s.push_str(&format!(
            "n_experts={experts}\nn_experts_per_tok={}\n",
            experts.min(2)
        ));
    }
    s
}

fn census_numel(cfg: &ModelConfig) -> (u64, Vec<(Component, u64)>) {
    let specs = shapes_only(cfg, candle_core::DType::F32).expect("shape-only build");
    // Grouped by the naming convention of this config's family (independent of its tensor
    // list); a name alone is ambiguous across families: GPT-2 and Qwen-MoE both have `.mlp.`.
    let fam = truesize::family::of(cfg);
    let mut per = std::collections::BTreeMap::new();
    let mut total = 0u64;
    for s in specs {
        let n: u64 = s.shape.iter().map(|&d| d as u64).product();
        total += n;
        *per.entry(fam.guess_component(&s.name).expect("classified"))
            .or_insert(0) += n;
    }
    (total, per.into_iter().collect())
}

fn assert_estimate_equals_census(cfg: &ModelConfig) -> Result<(), TestCaseError> {
    // The family's tensor list names exactly the tensors the genuine network requests, with
    // their shapes.
    let listed: std::collections::BTreeMap<String, Vec<usize>> = truesize::family::tensors(cfg)
        .into_iter()
        .map(|t| (t.name, t.shape))
        .collect();
    let built: std::collections::BTreeMap<String, Vec<usize>> =
        shapes_only(cfg, candle_core::DType::F32)
            .expect("shape-only build")
            .into_iter()
            .map(|s| (s.name, s.shape))
            .collect();
    prop_assert_eq!(listed, built);
    let e = estimate(cfg).expect("estimate");
    let (numel, per) = census_numel(cfg);
    prop_assert_eq!(e.total, numel);
    for (c, n) in per {
        prop_assert_eq!(e.get(c), n, "component {}", c.name());
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn llama_family_estimate_equals_shape_only_census(
        dims in (1usize..8, 1usize..9, 1usize..5, 1usize..4, 2usize..500, 1usize..300),
        opts in (proptest::option::of(1usize..16), any::<bool>(), any::<bool>(), any::<bool>(), any::<bool>(), prop_oneof![Just(0usize), 2usize..6]),
    ) {
        let cfg = toml::parse(&llama_toml(dims, opts), "prop").expect("valid config");
        if cfg.validate().is_ok() {
            assert_estimate_equals_census(&cfg)?;
        }
    }

    #[test]
    fn gpt2_estimate_equals_shape_only_census(
        hd in 1usize..16, heads in 1usize..8, layers in 1usize..4, vocab in 2usize..500,
        block in 1usize..300, ff in proptest::option::of(1usize..400), bias in any::<bool>(), tie in any::<bool>(),
    ) {
        let mut s = format!(
            "arch='gpt2'\nvocab_size={vocab}\nblock_size={block}\nn_embd={}\nn_layer={layers}\nn_head={heads}\nbias={bias}\ntie_embeddings={tie}\n",
            hd * heads
        );
        if let Some(ff) = ff {
            s.push_str(&format!("intermediate_size={ff}\n"));
        }
        let cfg = toml::parse(&s, "prop").expect("valid config");
        cfg.validate().expect("valid");
        assert_estimate_equals_census(&cfg)?;
    }

    /// The families after Llama, from random HF configs: q/k norms, four norms, fused storage,
    /// experts of their own width in the layers `decoder_sparse_step` / `mlp_only_layers` pick,
    /// windows; the tensor list and the count equal the genuine network's census.
    #[test]
    fn newer_families_estimate_equals_shape_only_census(
        mt in prop_oneof![Just("qwen3"), Just("qwen3_moe"), Just("gemma2"), Just("gemma3_text"), Just("gemma3"), Just("phi3")],
        (hd, heads, kv_div, layers, vocab, ff) in (1usize..6, 1usize..6, 1usize..4, 1usize..6, 2usize..300, 1usize..200),
        (tie, bias, experts, top_k, moe_ff, step) in (any::<bool>(), any::<bool>(), 1usize..6, 1usize..4, 1usize..64, 1usize..4),
        dense in proptest::collection::vec(0usize..6, 0..3),
        window in proptest::option::of(1usize..32),
    ) {
        let kv = (heads / kv_div).max(1);
        let kv = if heads % kv == 0 { kv } else { heads };
        let mut v = serde_json::json!({
            "model_type": mt, "vocab_size": vocab, "hidden_size": 2 * hd * heads,
            "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv,
            "head_dim": 2 * hd, "intermediate_size": ff, "max_position_embeddings": 64,
            "tie_word_embeddings": tie, "attention_bias": bias, "pad_token_id": null,
            "num_experts": experts, "num_experts_per_tok": top_k.min(experts),
            "moe_intermediate_size": moe_ff, "decoder_sparse_step": step, "mlp_only_layers": dense,
            "sliding_window": window, "use_sliding_window": window.is_some(),
        });
        if mt == "gemma3" {
            v = serde_json::json!({"model_type": "gemma3", "text_config": v});
        }
        if mt == "phi3" {
            // Phi-3 derives head_dim from hidden / heads.
            v["head_dim"] = serde_json::Value::Null;
        }
        let cfg = hf::parse(&v.to_string(), "prop").expect("valid config");
        if cfg.validate().is_ok() {
            assert_estimate_equals_census(&cfg)?;
        }
    }

    /// Any TOML text: an error or a config, never a panic.
    #[test]
    fn toml_parser_never_panics(text in "\\PC{0,300}") {
        if let Ok(cfg) = toml::parse(&text, "fuzz") {
            let _ = cfg.validate();
        }
    }

    /// Near-valid TOML with extreme integers: validation catches them, estimate never overflows.
    #[test]
    fn extreme_sizes_are_errors_not_overflows(
        v in any::<i64>(), d in any::<i64>(), l in any::<i64>(), h in any::<i64>(), ff in any::<i64>(),
    ) {
        let s = format!("arch='llama'\nvocab_size={v}\nblock_size=8\nn_embd={d}\nn_layer={l}\nn_head={h}\nintermediate_size={ff}\n");
        if let Ok(cfg) = toml::parse(&s, "prop") {
            if cfg.validate().is_ok() {
                let _ = estimate(&cfg);
            }
        }
    }

    /// Any JSON object with HF keys and arbitrary values: an error or a config, never a panic.
    #[test]
    fn hf_parser_never_panics(
        mt in prop_oneof![Just("gpt2"), Just("llama"), Just("mistral"), Just("qwen2"), Just("mixtral"),
            Just("qwen3"), Just("qwen3_moe"), Just("gemma2"), Just("gemma3_text"), Just("gemma3"), Just("phi3"), Just("x")],
        vals in proptest::collection::vec(prop_oneof![
            any::<i64>().prop_map(|x| x.to_string()),
            any::<f64>().prop_map(|x| if x.is_finite() { x.to_string() } else { "null".into() }),
            Just("null".to_string()), Just("true".to_string()), Just("\"s\"".to_string()),
            Just("{}".to_string()), Just("[]".to_string()),
            Just("[\"sliding_attention\", \"full_attention\"]".to_string()), Just("[0, 1]".to_string()),
            Just("{\"rope_type\": \"longrope\", \"short_factor\": [1.0], \"long_factor\": [2.0]}".to_string()),
            Just("{\"hidden_size\": 8, \"num_attention_heads\": 2}".to_string()),
        ], 22),
    ) {
        let keys = ["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "intermediate_size", "n_embd", "n_head", "n_layer",
            "rope_parameters", "num_local_experts", "sliding_window", "layer_types",
            "query_pre_attn_scalar", "attn_logit_softcapping", "num_experts", "moe_intermediate_size",
            "decoder_sparse_step", "mlp_only_layers", "text_config", "rope_scaling",
            "partial_rotary_factor", "pad_token_id"];
        let body: Vec<String> = keys.iter().zip(&vals).map(|(k, v)| format!("\"{k}\": {v}")).collect();
        let text = format!("{{\"model_type\": \"{mt}\", {}}}", body.join(", "));
        if let Ok(cfg) = hf::parse(&text, "prop") {
            if cfg.validate().is_ok() {
                let _ = estimate(&cfg);
            }
        }
    }
}
