//! Units with their names attached, so nothing prints a byte count without saying which unit.

use serde::Serialize;
use std::fmt;

pub const GIB: f64 = (1u64 << 30) as f64;
pub const GB: f64 = 1e9;

/// An exact byte count. Displays as `475,084,800 B (442.46 GiB)`: exact first, then binary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Default)]
#[serde(transparent)]
pub struct Bytes(pub u64);

impl Bytes {
    pub fn gib(self) -> f64 {
        self.0 as f64 / GIB
    }
    pub fn gb(self) -> f64 {
        self.0 as f64 / GB
    }
    /// Short form for table cells: `442.46 GiB` (exact bytes are in JSON).
    pub fn human(self) -> String {
        let b = self.0 as f64;
        if b >= GIB {
            format!("{:.2} GiB", b / GIB)
        } else if b >= (1u64 << 20) as f64 {
            format!("{:.2} MiB", b / (1u64 << 20) as f64)
        } else if b >= 1024.0 {
            format!("{:.2} KiB", b / 1024.0)
        } else {
            format!("{} B", self.0)
        }
    }
}

impl fmt::Display for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} B ({})", group(self.0), self.human())
    }
}

/// `1234567` -> `1,234,567`.
pub fn group(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::with_capacity(s.len() + s.len() / 3);
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Signed relative error `(value - reference) / reference`, as a fraction.
pub fn rel_error(value: f64, reference: f64) -> f64 {
    if reference == 0.0 {
        if value == 0.0 {
            0.0
        } else {
            f64::INFINITY
        }
    } else {
        (value - reference) / reference
    }
}

/// `-0.128` -> `-12.81%`.
pub fn percent(frac: f64) -> String {
    if frac.is_finite() {
        format!("{:+.2}%", frac * 100.0)
    } else {
        "n/a".to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grouping() {
        assert_eq!(group(0), "0");
        assert_eq!(group(999), "999");
        assert_eq!(group(1000), "1,000");
        assert_eq!(group(124_439_808), "124,439,808");
    }

    #[test]
    fn bytes_display_is_exact_then_binary() {
        assert_eq!(Bytes(1 << 30).to_string(), "1,073,741,824 B (1.00 GiB)");
        assert_eq!(Bytes(512).to_string(), "512 B (512 B)");
    }
}
