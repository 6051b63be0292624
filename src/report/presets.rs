//! What `truesize presets` lists: the built-in configs with their exact parameter counts.

use super::render::{Render, View};
use super::section::{s, Section};
use crate::units::group;
use serde::Serialize;

/// JSON: an array of presets.
#[derive(Debug, Clone, Serialize)]
#[serde(transparent)]
pub struct PresetsReport(pub Vec<PresetRow>);

#[derive(Debug, Clone, Serialize)]
pub struct PresetRow {
    pub name: &'static str,
    /// `configs/<file>`.
    pub file: String,
    /// Exact parameter count.
    pub params: u64,
    /// The preset file's first comment line.
    pub description: &'static str,
}

impl Render for PresetsReport {
    fn sections(&self, _view: View) -> Vec<Section> {
        vec![Section {
            title: "Built-in presets (use --preset NAME)".into(),
            header: vec![s("name"), s("params"), s("description")],
            rows: self
                .0
                .iter()
                .map(|p| vec![s(p.name), group(p.params), s(p.description)])
                .collect(),
            notes: vec![],
        }]
    }
}
