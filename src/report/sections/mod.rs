//! The sections of the estimate / verify report ([`Report`]), one file per topic.

pub mod artifacts;
pub mod census;
pub mod checks;
pub mod compute;
pub mod memory;
pub mod model;
pub mod params;

use super::section::Section;
use super::sizing::Report;
use super::{Render, View};

impl Render for Report {
    fn sections(&self, view: View) -> Vec<Section> {
        report(self, view)
    }
}

/// The estimate / verify / gpus report as sections. `View::Headline` is verify's one screen:
/// the model, census vs estimate, the 12·d² gap, the peak, failed checks first, the verdict.
pub fn report(r: &Report, view: View) -> Vec<Section> {
    let full = view == View::Full;
    let mut out = Vec::new();
    if !full {
        out.push(Section {
            title: model::model_line(r),
            header: vec![],
            rows: vec![],
            notes: vec![],
        });
        out.push(params::parameters(r));
        out.push(params::rule_gap(r, false));
        out.push(memory::peak_headline(r));
        out.extend(checks::failed_first(r));
        out.extend(checks::notes(r, false));
        out.push(Section {
            title:
                "--full: every table (weights by format, training memory, census, memory phases, \
                    rules of thumb, FLOPs, timing, checkpoint, quantized sizes, every check); \
                    --format json: everything"
                    .into(),
            header: vec![],
            rows: vec![],
            notes: vec![],
        });
        return out;
    }
    out.push(model::model(r));
    out.push(params::parameters(r));
    out.push(params::rule_gap(r, true));
    out.push(params::weight_formats(r));
    out.push(memory::training(r));
    out.extend(census::census(r));
    out.extend(memory::measured(r));
    out.extend(memory::step_model_section(r));
    out.extend(memory::rules_section(&r.rules));
    if let Some(e) = &r.extrapolation {
        out.push(memory::extrapolation_section(e));
    }
    out.extend(compute::timing(r));
    out.extend(compute::flops(r));
    out.extend(compute::mfu(r));
    out.extend(artifacts::checkpoint(r));
    out.extend(artifacts::quantized(r));
    out.extend(checks::all(r));
    out.extend(checks::notes(r, true));
    out
}
