use super::{Exporter, Report};

pub struct JsonExporter;

impl Exporter for JsonExporter {
    fn render(&self, report: &Report) -> String {
        // Serialising plain structs of numbers and strings cannot fail; NaN/inf become null.
        serde_json::to_string_pretty(report).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
    }
}
