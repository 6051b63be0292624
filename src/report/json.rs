//! `--format json`: the whole result, pretty-printed (NaN and infinities become null).

use super::render::{Document, Exporter};
use crate::error::Result;

pub struct JsonExporter;

impl Exporter for JsonExporter {
    fn export(&self, doc: &dyn Document) -> Result<String> {
        Ok(doc.json()? + "\n")
    }
}
