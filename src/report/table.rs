//! `--format table` (the default): comfy-table tables, notes under each.

use super::render::{Document, Exporter};
use super::section::Section;
use crate::error::Result;
use comfy_table::{presets::UTF8_FULL_CONDENSED, Cell, CellAlignment, ContentArrangement, Table};

pub struct TableExporter;

/// Width that long notes wrap at, so tables stay readable in a terminal and in CI logs.
const TABLE_WIDTH: u16 = 150;

/// Render titled sections as comfy-table tables.
fn render_sections(secs: &[Section]) -> String {
    let mut out = String::new();
    for sec in secs {
        out.push_str(&sec.title);
        out.push('\n');
        if !sec.header.is_empty() {
            let mut t = Table::new();
            t.load_preset(UTF8_FULL_CONDENSED)
                .set_content_arrangement(ContentArrangement::Dynamic)
                .set_width(TABLE_WIDTH)
                .set_header(sec.header.clone());
            for row in &sec.rows {
                t.add_row(row.iter().map(|c| {
                    let numeric = c.chars().any(|ch| ch.is_ascii_digit())
                        && c.chars().all(|ch| "0123456789,.+-%e ×/".contains(ch));
                    Cell::new(c).set_alignment(if numeric {
                        CellAlignment::Right
                    } else {
                        CellAlignment::Left
                    })
                }));
            }
            out.push_str(&t.to_string());
            out.push('\n');
        }
        for n in &sec.notes {
            out.push_str(n);
            out.push('\n');
        }
        out.push('\n');
    }
    out
}

impl Exporter for TableExporter {
    fn export(&self, doc: &dyn Document) -> Result<String> {
        Ok(render_sections(&doc.sections()))
    }
}
