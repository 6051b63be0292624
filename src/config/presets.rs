//! Built-in presets: the files in `configs/`, compiled into the binary so it works anywhere.

use super::ModelConfig;
use crate::error::{Error, Result};

/// (name, file name, contents). Each file's first line cites the published parameter count that
/// `tests` asserts.
pub const PRESETS: &[(&str, &str, &str)] = &[
    (
        "baby-gpt",
        "baby-gpt.toml",
        include_str!("../../configs/baby-gpt.toml"),
    ),
    ("gpt2", "gpt2.toml", include_str!("../../configs/gpt2.toml")),
    (
        "gpt2-nobias",
        "gpt2-nobias.toml",
        include_str!("../../configs/gpt2-nobias.toml"),
    ),
    (
        "gpt2-medium",
        "gpt2-medium.toml",
        include_str!("../../configs/gpt2-medium.toml"),
    ),
    (
        "gpt2-large",
        "gpt2-large.toml",
        include_str!("../../configs/gpt2-large.toml"),
    ),
    (
        "gpt2-xl",
        "gpt2-xl.toml",
        include_str!("../../configs/gpt2-xl.toml"),
    ),
    (
        "llama2-7b",
        "llama2-7b.toml",
        include_str!("../../configs/llama2-7b.toml"),
    ),
    (
        "llama3-8b",
        "llama3-8b.toml",
        include_str!("../../configs/llama3-8b.toml"),
    ),
    (
        "llama3.1-70b",
        "llama3.1-70b.toml",
        include_str!("../../configs/llama3.1-70b.toml"),
    ),
    (
        "llama3.1-405b",
        "llama3.1-405b.toml",
        include_str!("../../configs/llama3.1-405b.toml"),
    ),
    (
        "mistral-7b",
        "mistral-7b.toml",
        include_str!("../../configs/mistral-7b.toml"),
    ),
    (
        "qwen2.5-7b",
        "qwen2.5-7b.toml",
        include_str!("../../configs/qwen2.5-7b.toml"),
    ),
    (
        "mixtral-8x7b",
        "mixtral-8x7b.toml",
        include_str!("../../configs/mixtral-8x7b.toml"),
    ),
    (
        "qwen3-0.6b",
        "qwen3-0.6b.toml",
        include_str!("../../configs/qwen3-0.6b.toml"),
    ),
    (
        "qwen3-8b",
        "qwen3-8b.toml",
        include_str!("../../configs/qwen3-8b.toml"),
    ),
    (
        "qwen3-32b",
        "qwen3-32b.toml",
        include_str!("../../configs/qwen3-32b.toml"),
    ),
    (
        "qwen3-30b-a3b",
        "qwen3-30b-a3b.toml",
        include_str!("../../configs/qwen3-30b-a3b.toml"),
    ),
    (
        "qwen3-235b-a22b",
        "qwen3-235b-a22b.toml",
        include_str!("../../configs/qwen3-235b-a22b.toml"),
    ),
    (
        "gemma2-2b",
        "gemma2-2b.toml",
        include_str!("../../configs/gemma2-2b.toml"),
    ),
    (
        "gemma2-9b",
        "gemma2-9b.toml",
        include_str!("../../configs/gemma2-9b.toml"),
    ),
    (
        "gemma2-27b",
        "gemma2-27b.toml",
        include_str!("../../configs/gemma2-27b.toml"),
    ),
    (
        "gemma3-1b",
        "gemma3-1b.toml",
        include_str!("../../configs/gemma3-1b.toml"),
    ),
    (
        "gemma3-4b",
        "gemma3-4b.toml",
        include_str!("../../configs/gemma3-4b.toml"),
    ),
    (
        "gemma3-12b",
        "gemma3-12b.toml",
        include_str!("../../configs/gemma3-12b.toml"),
    ),
    (
        "gemma3-27b",
        "gemma3-27b.toml",
        include_str!("../../configs/gemma3-27b.toml"),
    ),
    (
        "phi3-mini",
        "phi3-mini.toml",
        include_str!("../../configs/phi3-mini.toml"),
    ),
    (
        "phi3-medium",
        "phi3-medium.toml",
        include_str!("../../configs/phi3-medium.toml"),
    ),
];

/// The name used when no config is given.
pub const DEFAULT_PRESET: &str = "baby-gpt";

pub fn load(name: &str) -> Result<ModelConfig> {
    let Some((_, file, text)) = PRESETS.iter().find(|(n, _, _)| *n == name) else {
        let names: Vec<&str> = PRESETS.iter().map(|(n, _, _)| *n).collect();
        return Err(Error::Usage(format!(
            "unknown preset {name:?}; available: {}",
            names.join(", ")
        )));
    };
    let mut cfg = super::toml::parse(text, &format!("preset {name} (configs/{file})"))?;
    cfg.name = name.to_string();
    Ok(cfg)
}

/// The one-line description in each preset file's leading comment.
pub fn description(text: &str) -> &str {
    text.lines()
        .next()
        .and_then(|l| l.strip_prefix('#'))
        .map(str::trim)
        .unwrap_or("")
}
