//! Output: every command builds a serialisable result and hands it to [`emit`] with the format
//! asked for. A result implements [`Render`]: its JSON is everything, its sections are the
//! tables. A format is one file here implementing [`Exporter`] (`table.rs`, `json.rs`,
//! `markdown.rs`), registered in [`Format`] and [`exporter`]. Exporters turn results into text;
//! they never compute. `csv.rs` and `svg.rs` are the files `sweep` writes beside its output.

pub mod bench;
pub mod csv;
pub mod gguf;
pub mod gpus;
pub mod infer;
pub mod inspect;
pub mod json;
pub mod markdown;
pub mod plan;
pub mod presets;
mod render;
pub mod scaling;
pub mod section;
pub mod sections;
pub mod sizing;
pub mod svg;
pub mod sweep;
pub mod table;

pub use render::{Document, Exporter, Render, View};
pub use sizing::{MemoryReport, Report, RunInfo, StepModel, Timing};

use crate::error::{Error, Result};
use render::Viewed;
use std::io::Write;

/// Output formats of every command (`--format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Table,
    Json,
    Markdown,
}

pub fn exporter(format: Format) -> Box<dyn Exporter> {
    match format {
        Format::Table => Box::new(table::TableExporter),
        Format::Json => Box::new(json::JsonExporter),
        Format::Markdown => Box::new(markdown::MarkdownExporter),
    }
}

/// `result` as text in `format`.
pub fn render(format: Format, result: &impl Render, view: View) -> Result<String> {
    exporter(format).export(&Viewed { result, view })
}

/// Render `result` in `format` and write it to stdout. A closed pipe (`| head`) ends the output
/// quietly; any other write failure is an error, never a panic.
pub fn emit(format: Format, result: &impl Render, view: View) -> Result<()> {
    write_stdout(&render(format, result, view)?)
}

fn write_stdout(text: &str) -> Result<()> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        Err(e) => Err(Error::Output(e.to_string())),
    }
}
