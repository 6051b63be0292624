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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dtype::TrainDtype;
    use crate::estimate::rules::RuleOfThumb;
    use crate::report::sweep::SweepPoint;

    /// A hand-built sweep (no candle): what the exporters see.
    fn mock() -> SweepReport {
        let rule = |key, name, bytes: u64, err| RuleOfThumb {
            key,
            name,
            formula: String::new(),
            assumptions: "",
            predicted_peak_bytes: bytes,
            measured_peak_bytes: Some(1000),
            rel_error: Some(err),
        };
        let point = |batch, seq, measured| SweepPoint {
            batch,
            seq,
            tokens: batch * seq,
            measured_peak_bytes: measured,
            predicted_peak_bytes: 990,
            predicted_rel_error: -0.01,
            forward_s: 0.5,
            backward_s: 1.25,
            rules: vec![
                rule("truesize", "truesize prediction", 990, -0.01),
                rule("weights_x3", "3 × weights", 300, -0.7),
            ],
        };
        SweepReport {
            command: "sweep",
            model: "mock".into(),
            arch: "gpt2",
            params: 25,
            dtype: TrainDtype::F32,
            device: "cpu".into(),
            weights_bytes: 100,
            batches: vec![1, 2],
            seqs: vec![8],
            points: vec![point(1, 8, 1000), point(2, 8, 1500)],
            notes: vec![],
        }
    }

    #[test]
    fn header_and_rows() {
        let text = render_sweep(&mock());
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0],
            "batch,seq,tokens,measured_peak_bytes,predicted_peak_bytes,predicted_rel_error,\
             forward_s,backward_s,truesize_bytes,truesize_rel_error,weights_x3_bytes,\
             weights_x3_rel_error"
        );
        assert_eq!(
            lines[2],
            "2,8,16,1500,990,-0.010000,0.500000,1.250000,990,-0.010000,300,-0.700000"
        );
        assert_eq!(lines.len(), 3);
    }

    #[test]
    fn svg_renders_from_a_mock() {
        let svg = crate::report::svg::render_sweep(&mock()).unwrap();
        assert!(svg.contains("measured, seq 8"));
        assert!(svg.contains("3 × weights"));
        assert!(svg.trim_end().ends_with("</svg>"));
    }
}
