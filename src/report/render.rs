//! The seam between results and formats: a result implements [`Render`], a format implements
//! [`Exporter`], and an exporter sees a result only as a [`Document`].

use super::section::Section;
use crate::error::{Error, Result};
use serde::Serialize;

/// How much of a result the tables show (JSON always has everything).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum View {
    /// One screen: what decides the verdict (`verify` without `--full`).
    Headline,
    /// Every table.
    Full,
}

/// A command's result: serialisable (the JSON contract) and as titled sections.
pub trait Render: Serialize {
    fn sections(&self, view: View) -> Vec<Section>;
}

/// What an exporter can ask of a result.
pub trait Document {
    /// Pretty JSON of the whole result.
    fn json(&self) -> Result<String>;
    /// The result's tables, in the view asked for.
    fn sections(&self) -> Vec<Section>;
}

/// A result with the view asked for.
pub(super) struct Viewed<'a, R> {
    pub(super) result: &'a R,
    pub(super) view: View,
}

impl<R: Render> Document for Viewed<'_, R> {
    fn json(&self) -> Result<String> {
        serde_json::to_string_pretty(self.result).map_err(|e| Error::Internal(e.into()))
    }

    fn sections(&self) -> Vec<Section> {
        self.result.sections(self.view)
    }
}

/// One output format.
pub trait Exporter {
    /// The whole text, ending in a newline.
    fn export(&self, doc: &dyn Document) -> Result<String>;
}
