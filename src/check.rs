//! Estimate versus measurement: the only place where numbers are compared.

use crate::units::rel_error;
use serde::Serialize;

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Check {
    pub name: String,
    pub measured: f64,
    pub expected: f64,
    /// `(measured − expected) / expected`, signed.
    pub rel_error: f64,
    /// Largest |rel_error| that passes.
    pub tolerance: f64,
    pub pass: bool,
    /// False for checks shown for information only (e.g. the 12·d² rule where its assumptions
    /// do not hold): they never fail the run.
    pub gating: bool,
    /// Why a check does not gate, or what it compares.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

impl Check {
    /// Compare `measured` against `expected` with a relative tolerance.
    pub fn rel(name: impl Into<String>, measured: f64, expected: f64, tolerance: f64) -> Self {
        let rel_error = rel_error(measured, expected);
        Check {
            name: name.into(),
            measured,
            expected,
            rel_error,
            tolerance,
            pass: rel_error.abs() <= tolerance,
            gating: true,
            note: None,
        }
    }

    /// Exact integer equality (tolerance 0).
    pub fn exact(name: impl Into<String>, measured: u64, expected: u64) -> Self {
        let mut c = Check::rel(name, measured as f64, expected as f64, 0.0);
        c.pass = measured == expected;
        c
    }

    /// A yes/no property (measured 1 = holds).
    pub fn holds(name: impl Into<String>, ok: bool, note: impl Into<String>) -> Self {
        Check {
            name: name.into(),
            measured: f64::from(u8::from(ok)),
            expected: 1.0,
            rel_error: if ok { 0.0 } else { -1.0 },
            tolerance: 0.0,
            pass: ok,
            gating: true,
            note: Some(note.into()),
        }
    }

    /// An error already computed elsewhere (e.g. max relative error of logits) against a bound.
    pub fn error_bound(name: impl Into<String>, error: f64, tolerance: f64, note: &str) -> Self {
        Check {
            name: name.into(),
            measured: error,
            expected: 0.0,
            rel_error: error,
            tolerance,
            pass: error.is_finite() && error.abs() <= tolerance,
            gating: true,
            note: Some(note.to_string()),
        }
    }

    /// Shown, never failing.
    pub fn informational(mut self, why: impl Into<String>) -> Self {
        self.gating = false;
        self.note = Some(why.into());
        self
    }

    pub fn with_note(mut self, note: impl Into<String>) -> Self {
        self.note = Some(note.into());
        self
    }

    /// Whether this check lets the run pass.
    pub fn ok(&self) -> bool {
        self.pass || !self.gating
    }
}

/// All gating checks passed.
pub fn all_pass(checks: &[Check]) -> bool {
    checks.iter().all(Check::ok)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_and_relative() {
        assert!(Check::exact("n", 5, 5).pass);
        assert!(!Check::exact("n", 5, 6).pass);
        let c = Check::rel("r", 99.0, 100.0, 0.01);
        assert!(c.pass);
        assert!((c.rel_error + 0.01).abs() < 1e-12);
        assert!(!Check::rel("r", 98.0, 100.0, 0.01).pass);
    }

    #[test]
    fn informational_checks_never_fail_the_run() {
        let c = Check::rel("rough", 50.0, 100.0, 0.01).informational("SwiGLU");
        assert!(!c.pass);
        assert!(c.ok());
        assert!(all_pass(&[c]));
        assert!(!all_pass(&[Check::exact("n", 1, 2)]));
    }
}
