//! `truesize presets`: the built-in configs with their exact parameter counts.

use crate::cli::PresetsArgs;
use crate::config::presets;
use crate::error::{Result, EXIT_OK};
use crate::estimate::params;
use crate::report::presets::{PresetRow, PresetsReport};
use crate::report::{emit, View};

pub fn run(a: PresetsArgs) -> Result<u8> {
    let mut rows = Vec::new();
    for (name, file, text) in presets::PRESETS {
        let cfg = presets::load(name)?;
        rows.push(PresetRow {
            name,
            file: format!("configs/{file}"),
            params: params::estimate(&cfg)?.total,
            description: presets::description(text),
        });
    }
    emit(a.format, &PresetsReport(rows), View::Full)?;
    Ok(EXIT_OK)
}
