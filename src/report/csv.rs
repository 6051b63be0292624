//! A sweep as CSV: one row per (batch, seq), exact bytes, every rule's bytes and error.

use super::sweep::SweepReport;

/// Columns before the per-rule ones.
pub const FIXED_COLUMNS: [&str; 8] = [
    "batch",
    "seq",
    "tokens",
    "measured_peak_bytes",
    "predicted_peak_bytes",
    "predicted_rel_error",
    "forward_s",
    "backward_s",
];

/// Header + one line per point. Rule columns are `<key>_bytes,<key>_rel_error` in the rules'
/// order (keys are fixed identifiers, so nothing needs quoting).
pub fn render_sweep(r: &SweepReport) -> String {
    let mut header: Vec<String> = FIXED_COLUMNS.iter().map(|s| s.to_string()).collect();
    if let Some(p) = r.points.first() {
        for k in &p.rules {
            header.push(format!("{}_bytes", k.key));
            header.push(format!("{}_rel_error", k.key));
        }
    }
    let mut out = header.join(",");
    out.push('\n');
    for p in &r.points {
        let mut cells = vec![
            p.batch.to_string(),
            p.seq.to_string(),
            p.tokens.to_string(),
            p.measured_peak_bytes.to_string(),
            p.predicted_peak_bytes.to_string(),
            format!("{:.6}", p.predicted_rel_error),
            format!("{:.6}", p.forward_s),
            format!("{:.6}", p.backward_s),
        ];
        for k in &p.rules {
            cells.push(k.predicted_peak_bytes.to_string());
            cells.push(k.rel_error.map(|e| format!("{e:.6}")).unwrap_or_default());
        }
        out.push_str(&cells.join(","));
        out.push('\n');
    }
    out
}
