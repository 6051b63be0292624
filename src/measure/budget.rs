//! The memory a run may use, and the one preflight every allocating path goes through: the
//! main training step, each shallow run of `--extrapolate`, each sweep point, a generation run.
//! A run is refused (exit 1, with the numbers and the ways out) before anything is allocated.

use crate::error::{Error, Result};
use crate::units::Bytes;
use candle_core::Device;

/// How many bytes a run may allocate, and where that figure came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    /// `None` when nothing says (no `--max-memory`, and the OS or device does not report).
    pub limit_bytes: Option<u64>,
    pub source: BudgetSource,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BudgetSource {
    /// `--max-memory BYTES`.
    Flag,
    /// min(MemAvailable, the cgroup's limit − usage) on CPU.
    HostAvailable,
    /// Free memory the device reports.
    DeviceFree,
    /// Nothing reported: no limit is enforced.
    Unknown,
}

impl Budget {
    /// `--max-memory` when given, else what the device has free now.
    pub fn for_device(max_memory: Option<u64>, device: &Device) -> Budget {
        if let Some(b) = max_memory {
            return Budget {
                limit_bytes: Some(b),
                source: BudgetSource::Flag,
            };
        }
        let (limit, source) = if device.is_cpu() {
            (
                super::sysmem::available_bytes(),
                BudgetSource::HostAvailable,
            )
        } else {
            (super::device::free_bytes(device), BudgetSource::DeviceFree)
        };
        match limit {
            Some(l) => Budget {
                limit_bytes: Some(l),
                source,
            },
            None => Budget {
                limit_bytes: None,
                source: BudgetSource::Unknown,
            },
        }
    }

    /// The host's budget (sweeps and generation runs on CPU).
    pub fn host(max_memory: Option<u64>) -> Budget {
        Budget::for_device(max_memory, &Device::Cpu)
    }

    /// Whether `predicted_bytes` fits.
    pub fn fits(&self, predicted_bytes: u64) -> bool {
        self.limit_bytes.is_none_or(|l| predicted_bytes <= l)
    }

    /// Refuse `what` (e.g. "the 2-layer run of --extrapolate") when its predicted peak does not
    /// fit: exit 1 with both numbers and the ways out.
    pub fn admit(&self, predicted_bytes: u64, what: &str) -> Result<()> {
        match self.limit_bytes {
            Some(limit) if predicted_bytes > limit => Err(Error::Refused(format!(
                "{what} needs about {} but only {} is available ({}); ways out: a smaller --batch \
                 or --seq, --shapes-only where the command has it, or --max-memory BYTES to \
                 override the limit",
                Bytes(predicted_bytes),
                Bytes(limit),
                self.source.describe(),
            ))),
            _ => Ok(()),
        }
    }
}

impl BudgetSource {
    pub fn describe(self) -> &'static str {
        match self {
            BudgetSource::Flag => "--max-memory",
            BudgetSource::HostAvailable => "memory the OS reports available",
            BudgetSource::DeviceFree => "free device memory",
            BudgetSource::Unknown => "no limit reported",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusal_names_both_numbers() {
        let b = Budget {
            limit_bytes: Some(1000),
            source: BudgetSource::Flag,
        };
        assert!(b.admit(1000, "x").is_ok());
        let e = b.admit(1001, "the 2-layer run").unwrap_err();
        assert_eq!(e.exit_code(), crate::error::EXIT_CHECK_FAILED);
        let m = e.to_string();
        assert!(
            m.contains("1,001") && m.contains("1,000") && m.contains("--max-memory"),
            "{m}"
        );
        let none = Budget {
            limit_bytes: None,
            source: BudgetSource::Unknown,
        };
        assert!(none.admit(u64::MAX, "x").is_ok());
    }
}
