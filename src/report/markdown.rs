//! `--format markdown`: a `###` heading and a pipe table per section.

use super::render::{Document, Exporter};
use super::section::Section;
use crate::error::Result;

pub struct MarkdownExporter;

fn cell(s: &str) -> String {
    s.replace('|', "\\|")
}

fn render_sections(secs: &[Section]) -> String {
    let mut out = String::new();
    for sec in secs {
        out.push_str(&format!("### {}\n\n", sec.title));
        if !sec.header.is_empty() {
            let h: Vec<String> = sec.header.iter().map(|c| cell(c)).collect();
            out.push_str(&format!("| {} |\n", h.join(" | ")));
            out.push_str(&format!("|{}\n", "---|".repeat(h.len())));
            for row in &sec.rows {
                let r: Vec<String> = row.iter().map(|c| cell(c)).collect();
                out.push_str(&format!("| {} |\n", r.join(" | ")));
            }
            out.push('\n');
        }
        for n in &sec.notes {
            out.push_str(&format!("{n}  \n"));
        }
        if !sec.notes.is_empty() {
            out.push('\n');
        }
    }
    out
}

impl Exporter for MarkdownExporter {
    fn export(&self, doc: &dyn Document) -> Result<String> {
        Ok(render_sections(&doc.sections()))
    }
}
