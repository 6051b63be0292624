//! A titled table with notes: what the table and markdown exporters print; and the cell
//! helpers every result's sections use (one copy each).

use crate::check::Check;
use crate::units::{group, Bytes};

/// One titled table with notes under it. A section without a header is notes only.
pub struct Section {
    pub title: String,
    pub header: Vec<String>,
    pub rows: Vec<Vec<String>>,
    /// Lines printed under the table.
    pub notes: Vec<String>,
}

pub(crate) fn s(x: impl ToString) -> String {
    x.to_string()
}

/// Exact bytes, then binary units.
pub(crate) fn bytes_cells(b: u64) -> [String; 2] {
    [group(b), Bytes(b).human()]
}

pub(crate) fn row_bytes(name: &str, b: u64) -> Vec<String> {
    let [x, h] = bytes_cells(b);
    vec![name.to_string(), x, h]
}

pub(crate) fn signed_group(x: i128) -> String {
    let sign = if x < 0 { "-" } else { "+" };
    format!(
        "{sign}{}",
        group(u64::try_from(x.unsigned_abs()).unwrap_or(u64::MAX))
    )
}

/// "pass", "FAIL", or "info" for a check that failed but does not gate.
pub(crate) fn result_label(c: &Check) -> &'static str {
    match (c.pass, c.gating) {
        (true, _) => "pass",
        (false, true) => "FAIL",
        (false, false) => "info",
    }
}

/// A number in a check row: grouped when whole, else 6 decimals or scientific.
pub(crate) fn num(x: f64) -> String {
    if x.fract() == 0.0 && x.abs() < 1e15 {
        group(x.abs() as u64).chars().fold(
            if x < 0.0 {
                "-".to_string()
            } else {
                String::new()
            },
            |mut a, c| {
                a.push(c);
                a
            },
        )
    } else if x.abs() >= 1e-3 && x.abs() < 1e6 {
        format!("{x:.6}")
    } else {
        format!("{x:.3e}")
    }
}
