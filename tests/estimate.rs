//! `truesize estimate` and `presets` through the binary: counts, JSON contract, bad input.

mod common;
use common::*;
use predicates::prelude::*;

fn estimate_json(args: &[&str]) -> serde_json::Value {
    let out = truesize()
        .arg("estimate")
        .args(args)
        .args(["--format", "json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    json_of(&out.stdout)
}

#[test]
fn presets_give_published_counts_in_json() {
    for (preset, total) in [
        ("baby-gpt", 3_481_088u64),
        ("gpt2", 124_439_808),
        ("gpt2-medium", 354_823_168),
        ("gpt2-large", 774_030_080),
        ("gpt2-xl", 1_557_611_200),
        ("llama2-7b", 6_738_415_616),
        ("llama3-8b", 8_030_261_248),
    ] {
        let j = estimate_json(&["--preset", preset]);
        assert_eq!(j["params"]["total"].as_u64(), Some(total), "{preset}");
    }
}

#[test]
fn baby_gpt_is_the_default_and_rough_rule_is_reported() {
    let j = estimate_json(&[]);
    assert_eq!(j["params"]["total"], 3_481_088);
    assert_eq!(j["params"]["rough_12d2"], 3_467_264);
    let comps = j["params"]["components"].as_object().unwrap();
    let sum: u64 = comps.values().map(|v| v.as_u64().unwrap()).sum();
    assert_eq!(sum, 3_481_088);
    assert_eq!(comps["embed_tokens"], 256_000);
    assert_eq!(comps["embed_positions"], 65_536);
    assert_eq!(comps["lm_head"], 0);
}

#[test]
fn fixture_hf_configs_match_hf_counts() {
    for dir in std::fs::read_dir(fixtures()).unwrap() {
        let dir = dir.unwrap().path();
        if !dir.join("config.json").is_file() {
            continue;
        }
        let expected: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap())
                .unwrap();
        // Both the folder and the config.json itself are accepted.
        for arg in [dir.clone(), dir.join("config.json")] {
            let j = estimate_json(&["--config", arg.to_str().unwrap()]);
            assert_eq!(
                j["params"]["total"],
                expected["params"],
                "{}",
                arg.display()
            );
        }
    }
}

/// Real hub configs, trimmed to what matters, in the spellings found in the wild.
#[test]
fn real_hf_config_spellings() {
    let cases: &[(&str, u64)] = &[
        // openai-community/gpt2 (n_inner: null means 4·d)
        (
            r#"{"model_type":"gpt2","vocab_size":50257,"n_positions":1024,"n_embd":768,"n_layer":12,"n_head":12,"n_inner":null,"activation_function":"gelu_new"}"#,
            124_439_808,
        ),
        // meta-llama/Meta-Llama-3-8B, transformers 5 spelling (rope_parameters), head_dim null
        (
            r#"{"model_type":"llama","vocab_size":128256,"hidden_size":4096,"intermediate_size":14336,"num_hidden_layers":32,"num_attention_heads":32,"num_key_value_heads":8,"max_position_embeddings":8192,"head_dim":null,"rope_parameters":{"rope_theta":500000.0,"rope_type":"default"},"tie_word_embeddings":false}"#,
            8_030_261_248,
        ),
        // meta-llama/Llama-3.2-1B: tied head, llama3 rope scaling, explicit head_dim
        (
            r#"{"model_type":"llama","vocab_size":128256,"hidden_size":2048,"intermediate_size":8192,"num_hidden_layers":16,"num_attention_heads":32,"num_key_value_heads":8,"head_dim":64,"max_position_embeddings":131072,"rope_theta":500000.0,"rope_scaling":{"factor":32.0,"high_freq_factor":4.0,"low_freq_factor":1.0,"original_max_position_embeddings":8192,"rope_type":"llama3"},"tie_word_embeddings":true}"#,
            1_235_814_400,
        ),
        // Qwen/Qwen2.5-0.5B: q/k/v biases, tied head
        (
            r#"{"model_type":"qwen2","vocab_size":151936,"hidden_size":896,"intermediate_size":4864,"num_hidden_layers":24,"num_attention_heads":14,"num_key_value_heads":2,"max_position_embeddings":32768,"rope_theta":1000000.0,"tie_word_embeddings":true}"#,
            494_032_768,
        ),
        // mistralai/Mistral-7B-v0.1 with keys missing: HF's MistralConfig defaults fill them
        (
            r#"{"model_type":"mistral","vocab_size":32000,"hidden_size":4096,"num_hidden_layers":32}"#,
            7_241_732_096,
        ),
        // mistralai/Mixtral-8x7B-v0.1
        (
            r#"{"model_type":"mixtral","vocab_size":32000,"hidden_size":4096,"intermediate_size":14336,"num_hidden_layers":32,"num_attention_heads":32,"num_key_value_heads":8,"num_local_experts":8,"num_experts_per_tok":2}"#,
            46_702_792_704,
        ),
    ];
    for (text, want) in cases {
        let (_d, p) = temp_file("config.json", text.as_bytes());
        let j = estimate_json(&["--config", p.to_str().unwrap()]);
        assert_eq!(j["params"]["total"].as_u64(), Some(*want), "{text}");
    }
}

#[test]
fn table_and_markdown_render() {
    truesize()
        .args(["estimate", "--preset", "llama3-8b"])
        .assert()
        .success()
        .stdout(predicate::str::contains("8,030,261,248"))
        .stdout(predicate::str::contains("-12.81%"))
        .stdout(predicate::str::contains("SwiGLU"));
    truesize()
        .args(["estimate", "--preset", "gpt2", "--format", "markdown"])
        .assert()
        .success()
        .stdout(predicate::str::contains("| total | 124,439,808 |"));
}

#[test]
fn presets_lists_every_preset() {
    truesize()
        .arg("presets")
        .assert()
        .success()
        .stdout(predicate::str::contains("baby-gpt"))
        .stdout(predicate::str::contains("3,481,088"))
        .stdout(predicate::str::contains("llama3-8b"));
}

fn bad(args: &[&str], stderr_has: &[&str]) {
    let mut a = truesize().args(args).assert().code(2);
    for s in stderr_has {
        a = a.stderr(predicate::str::contains(*s));
    }
    a.stderr(predicate::str::contains("panicked").not());
}

fn bad_toml(text: &str, stderr_has: &[&str]) {
    let (_d, p) = temp_file("bad.toml", text.as_bytes());
    let mut want = vec!["bad.toml"];
    want.extend_from_slice(stderr_has);
    bad(&["estimate", "--config", p.to_str().unwrap()], &want);
}

const BABY: &str = "arch = \"gpt2\"\nvocab_size = 1000\nblock_size = 256\nn_layer = 4\n";

#[test]
fn bad_configs_name_the_field_and_value() {
    bad_toml(
        &format!("{BABY}n_embd = 256\nn_head = 7\n"),
        &["n_head = 7", "does not divide n_embd = 256"],
    );
    bad_toml(
        &format!("{BABY}n_embd = 0\nn_head = 4\n"),
        &["n_embd = 0", "must be > 0"],
    );
    bad_toml(
        &format!("{BABY}n_embd = -3\nn_head = 4\n"),
        &["n_embd = -3"],
    );
    // A typo must not pass silently.
    bad_toml(&format!("{BABY}n_embed = 256\nn_head = 4\n"), &["n_embed"]);
    bad_toml("arch = \"gpt2\"\nvocab_size = 1000\n", &["missing field"]);
    bad_toml("this is = = not toml", &["invalid truesize TOML"]);
    bad_toml(
        &format!("{BABY}n_embd = 256\nn_head = 4\narch2 = 1\n"),
        &["arch2"],
    );
    bad_toml(
        "arch = \"llama\"\nvocab_size = 10\nblock_size = 8\nn_embd = 8\nn_layer = 1\nn_head = 4\nn_kv_head = 3\nintermediate_size = 8\n",
        &["n_kv_head = 3", "does not divide n_head = 4"],
    );
    bad_toml(
        "arch = \"mamba\"\nvocab_size = 10\nblock_size = 8\nn_embd = 8\nn_layer = 1\nn_head = 4\n",
        &["arch = \"mamba\""],
    );
    bad_toml(
        &format!("{BABY}n_embd = 256\nn_head = 4\n[run]\nseq = 512\n"),
        &["run.seq = 512", "block_size = 256"],
    );
    bad_toml(
        &format!("{BABY}n_embd = 99999999999\nn_head = 4\n"),
        &["n_embd = 99999999999", "absurd"],
    );
}

#[test]
fn bad_hf_configs() {
    let (_d, p) = temp_file("config.json", br#"{"model_type":"bert","hidden_size":768}"#);
    bad(
        &["estimate", "--config", p.to_str().unwrap()],
        &["model_type = \"bert\"", "supported"],
    );
    let (_d, p) = temp_file(
        "config.json",
        br#"{"model_type":"llama","hidden_size":"big"}"#,
    );
    bad(
        &["estimate", "--config", p.to_str().unwrap()],
        &["hidden_size = \"big\""],
    );
    let (_d, p) = temp_file("config.json", br#"{"model_type":"llama", "#);
    bad(
        &["estimate", "--config", p.to_str().unwrap()],
        &["config.json", "invalid JSON"],
    );
    let (_d, p) = temp_file("config.json", br#"{"hidden_size":768}"#);
    bad(
        &["estimate", "--config", p.to_str().unwrap()],
        &["model_type"],
    );
    let (_d, p) = temp_file("config.json", &[0xff, 0xfe, 0x00]);
    bad(&["estimate", "--config", p.to_str().unwrap()], &["UTF-8"]);
}

#[test]
fn bad_command_line_input() {
    bad(
        &["estimate", "--preset", "gpt5"],
        &["unknown preset \"gpt5\""],
    );
    bad(
        &["estimate", "--config", "/no/such/file.toml"],
        &["/no/such/file.toml", "cannot read"],
    );
    let d = tempfile::tempdir().unwrap();
    bad(
        &["estimate", "--config", d.path().to_str().unwrap()],
        &["no config.json"],
    );
    bad(&["estimate", "--dtype", "f8"], &["dtype = \"f8\""]);
    bad(
        &["estimate", "--seq", "100000"],
        &["seq = 100000", "block_size = 256"],
    );
    bad(&["estimate", "--batch", "0"], &["--batch = 0"]);
    bad(&["estimate", "--format", "yaml"], &["yaml"]);
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

/// nanoGPT `transformer_sizing.ipynb`: bias-free GPT-2 124M at T = 1024.
#[test]
fn estimate_reports_the_nanogpt_flops() {
    let v = ok_json(&["estimate", "--preset", "gpt2-nobias", "--seq", "1024"]);
    assert_eq!(v["params"]["total"].as_u64(), Some(124_337_664));
    assert_eq!(v["flops"]["forward"].as_u64(), Some(291_648_307_200));
    assert_eq!(
        format!("{:.4}", v["flops"]["palm_ratio"].as_f64().unwrap()),
        "1.0001"
    );
}
