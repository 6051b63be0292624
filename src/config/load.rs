//! Where a config comes from: a preset, a truesize TOML, an HF `config.json`, or a folder holding
//! one. Every path ends in validation, so a `ModelConfig` from here is always usable.

use super::{hf, presets, toml, ModelConfig};
use crate::error::{Error, Result};
use std::path::Path;

/// Where a config comes from on the command line.
#[derive(Debug, Clone)]
pub enum ConfigSource<'a> {
    Preset(&'a str),
    /// A truesize TOML, an HF config.json, or a folder holding a config.json.
    Path(&'a Path),
}

/// Read any supported config: preset, `.toml`, `config.json`, or a folder with a config.json.
pub fn load(source: ConfigSource<'_>) -> Result<ModelConfig> {
    let cfg = match source {
        ConfigSource::Preset(name) => presets::load(name)?,
        ConfigSource::Path(path) => load_path(path)?,
    };
    cfg.validate()?;
    Ok(cfg)
}

fn load_path(path: &Path) -> Result<ModelConfig> {
    if path.is_dir() {
        let cj = path.join("config.json");
        if !cj.is_file() {
            return Err(Error::file(
                path,
                "folder has no config.json (expected an HF model folder)",
            ));
        }
        return load_path(&cj);
    }
    if crate::checkpoint::gguf::has_magic(path) {
        let h = crate::checkpoint::gguf::read_header(path)?;
        return crate::checkpoint::gguf::config_from_header(&h);
    }
    let text = std::fs::read(path).map_err(|e| Error::file(path, format!("cannot read: {e}")))?;
    let text = String::from_utf8(text).map_err(|_| Error::file(path, "is not valid UTF-8 text"))?;
    let name = path.display().to_string();
    let is_json = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("json"))
        || text.trim_start().starts_with('{');
    if is_json {
        hf::parse(&text, &name)
    } else {
        toml::parse(&text, &name)
    }
}
