//! Checks and the verdict; the run's notes.

use crate::check::Check;
use crate::report::section::{num, result_label, s, Section};
use crate::report::sizing::Report;
use crate::units::{percent, Bytes};

const HEADER: [&str; 7] = [
    "check",
    "measured",
    "expected",
    "error",
    "tolerance",
    "result",
    "note",
];

fn row(c: &Check) -> Vec<String> {
    vec![
        c.name.clone(),
        num(c.measured),
        num(c.expected),
        percent(c.rel_error),
        if c.tolerance == 0.0 {
            s("exact")
        } else {
            format!("{:.2e}", c.tolerance)
        },
        s(result_label(c)),
        c.note.clone().unwrap_or_default(),
    ]
}

fn verdict(r: &Report) -> Vec<String> {
    r.pass
        .map(|p| format!("verdict: {}", if p { "PASS" } else { "FAIL" }))
        .into_iter()
        .collect()
}

/// Every check, in the order made, and the verdict.
pub fn all(r: &Report) -> Option<Section> {
    if r.checks.is_empty() {
        return None;
    }
    Some(Section {
        title: "Checks".into(),
        header: HEADER.map(s).to_vec(),
        rows: r.checks.iter().map(row).collect(),
        notes: verdict(r),
    })
}

/// A list of checks with its verdict, for results other than `Report`.
pub fn list(checks: &[Check], pass: bool) -> Section {
    Section {
        title: "Checks".into(),
        header: HEADER.map(s).to_vec(),
        rows: checks.iter().map(row).collect(),
        notes: vec![format!("verdict: {}", if pass { "PASS" } else { "FAIL" })],
    }
}

/// Failed checks in full, the rest counted, and the verdict.
pub fn failed_first(r: &Report) -> Option<Section> {
    if r.checks.is_empty() {
        return None;
    }
    let failed: Vec<&Check> = r.checks.iter().filter(|c| !c.ok()).collect();
    let passed = r.checks.iter().filter(|c| c.pass).count();
    let info = r.checks.iter().filter(|c| !c.pass && !c.gating).count();
    let mut notes = vec![format!(
        "{} checks: {passed} passed, {} failed, {info} shown for information only",
        r.checks.len(),
        failed.len()
    )];
    notes.extend(verdict(r));
    Some(Section {
        title: if failed.is_empty() {
            "Checks".into()
        } else {
            "Checks that failed".into()
        },
        header: if failed.is_empty() {
            Vec::new()
        } else {
            HEADER.map(s).to_vec()
        },
        rows: failed.into_iter().map(row).collect(),
        notes,
    })
}

/// The run's notes and, in full, the process's peak RSS.
pub fn notes(r: &Report, full: bool) -> Option<Section> {
    let mut notes = r.notes.clone();
    if full {
        if let Some(rss) = r.peak_rss_bytes {
            notes.push(format!("peak RSS of this process: {}", Bytes(rss)));
        }
    }
    (!notes.is_empty()).then(|| Section {
        title: "Notes".into(),
        header: vec![],
        rows: vec![],
        notes,
    })
}
