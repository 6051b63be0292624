//! `truesize presets`: the built-in configs with their exact parameter counts.

use crate::cli::{Format, PresetsArgs};
use crate::config::presets;
use crate::error::{Error, Result, EXIT_OK};
use crate::estimate::params;
use crate::report::sections::Section;

pub fn run(a: PresetsArgs) -> Result<u8> {
    let mut rows = Vec::new();
    for (name, file, text) in presets::PRESETS {
        let cfg = presets::load(name)?;
        let p = params::estimate(&cfg)?;
        rows.push((name, file, p.total, presets::description(text)));
    }
    match a.format {
        Format::Json => {
            let v: Vec<_> = rows
                .iter()
                .map(|(n, f, t, d)| {
                    serde_json::json!({"name": n, "file": format!("configs/{f}"), "params": t, "description": d})
                })
                .collect();
            println!(
                "{}",
                serde_json::to_string_pretty(&v).map_err(|e| Error::Internal(e.into()))?
            );
        }
        Format::Table | Format::Markdown => {
            let sec = Section {
                title: "Built-in presets (use --preset NAME)".into(),
                header: vec!["name".into(), "params".into(), "description".into()],
                rows: rows
                    .iter()
                    .map(|(n, _, t, d)| vec![n.to_string(), crate::units::group(*t), d.to_string()])
                    .collect(),
                notes: vec![],
            };
            let out = if a.format == Format::Table {
                crate::report::table::render_sections(&[sec])
            } else {
                crate::report::markdown::render_sections(&[sec])
            };
            print!("{out}");
        }
    }
    Ok(EXIT_OK)
}
