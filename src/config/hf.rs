//! HF `config.json` -> `ModelConfig`: the JSON is read here, and the family registered for its
//! `model_type` (`crate::family`) maps HF's spellings and that type's defaults.
//!
//! Missing keys and `null`s take the defaults of that model type's `PretrainedConfig` class in
//! transformers, so a minimal config means what it means to transformers. Keys truesize does not
//! need are ignored: real configs carry dozens.

use super::fields::JsonKeys;
use super::ModelConfig;
use crate::error::{Error, Result};
use crate::family;
use serde_json::Value;

pub fn parse(text: &str, src: &str) -> Result<ModelConfig> {
    let value: Value =
        serde_json::from_str(text).map_err(|e| Error::file(src, format!("invalid JSON: {e}")))?;
    let Value::Object(map) = &value else {
        return Err(Error::file(src, "config.json must be a JSON object"));
    };
    let o = JsonKeys::new(map, src);
    let supported = || family::model_types().join(", ");
    let Some(model_type) = o.str_opt("model_type")? else {
        return Err(Error::field(
            src,
            "model_type",
            "(missing)",
            format!(
                "an HF config.json must say its model_type; supported: {}",
                supported()
            ),
        ));
    };
    match family::by_model_type(model_type) {
        Some(fam) => fam.read_hf(model_type, &o),
        None => Err(Error::field(
            src,
            "model_type",
            format!("{model_type:?}"),
            format!("unsupported model type; supported: {}", supported()),
        )),
    }
}
