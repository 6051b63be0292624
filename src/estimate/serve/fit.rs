//! What fits in a memory budget: the longest context at a batch, the largest batch at a
//! context, the highest-precision weight format, and the same over the GPU table.
//!
//! need(B, T) = weights + KV cache(B, T) + workspace (the activations of one prefill chunk or
//! one decode step at T cached positions, whichever is larger, with attention as a fused kernel
//! as GPU servers run it) + runtime overhead. The overhead is an assumption, always shown as its
//! own line and never folded in silently.

use super::formats::WeightFormat;
use super::weights::{self, WeightsEstimate};
use super::{kv, peaks};
use crate::config::{ModelConfig, MAX_BATCH};
use crate::dtype::TrainDtype;
use crate::error::{Error, Result};
use crate::estimate::gpus;
use serde::Serialize;

/// Runtime overhead assumed on a GPU beyond tensors: the CUDA context, cuBLAS/cuDNN
/// workspaces and allocator slack. An assumption, not a measurement: 1 GiB is a round figure
/// for a CUDA context plus a framework's workspaces; pass `--overhead` to use your own.
pub const DEFAULT_RUNTIME_OVERHEAD_BYTES: u64 = 1 << 30;
/// Default prefill chunk of `infer` and the fit questions: llama.cpp's default physical batch
/// (`n_ubatch` = 512).
pub const DEFAULT_FIT_CHUNK: usize = 512;

/// A size given on the command line: plain bytes, or a number with a unit (`24GiB` = 24·2^30,
/// `24GB` = 24·10^9; K, M, G, T with or without `i`/`B`).
pub fn parse_size(field: &str, s: &str) -> Result<u64> {
    let bad = |why: &str| Error::field("command line", field, format!("{s:?}"), why);
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let v: f64 = num
        .parse()
        .map_err(|_| bad("expected bytes or a size such as 24GiB or 80GB"))?;
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "m" | "mb" => 1e6,
        "g" | "gb" => 1e9,
        "t" | "tb" => 1e12,
        "ki" | "kib" => 1024.0,
        "mi" | "mib" => (1u64 << 20) as f64,
        "gi" | "gib" => (1u64 << 30) as f64,
        "ti" | "tib" => (1u64 << 40) as f64,
        _ => {
            return Err(bad(
                "unknown unit; use B, KB/MB/GB/TB (10^3) or KiB/MiB/GiB/TiB (2^10)",
            ))
        }
    };
    let bytes = v * mult;
    if !(1.0..=1e18).contains(&bytes) {
        return Err(bad("must be between 1 byte and 10^18 bytes"));
    }
    Ok(bytes.round() as u64)
}

/// The memory a configuration needs, term by term.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Need {
    pub weights_bytes: u64,
    pub kv_cache_bytes: u64,
    /// Engine workspace: the larger of one prefill chunk and one decode step.
    pub workspace_bytes: u64,
    /// Assumed runtime overhead.
    pub overhead_bytes: u64,
    pub total_bytes: u64,
}

/// Everything the fit search needs about the model.
#[derive(Clone)]
pub struct FitModel<'a> {
    pub cfg: &'a ModelConfig,
    pub format: WeightFormat,
    pub weights: WeightsEstimate,
    pub kv: TrainDtype,
    pub chunk: usize,
    pub overhead: u64,
}

impl FitModel<'_> {
    pub fn need(&self, batch: usize, context: usize) -> Need {
        let kv_cache_bytes =
            kv::exact_bytes(self.cfg, batch as u64, context as u64, self.kv.bytes());
        let workspace_bytes = peaks::workspace_bytes(
            self.cfg,
            &self.weights,
            self.format,
            self.kv,
            batch,
            context,
            self.chunk,
        );
        let total = self
            .weights
            .bytes
            .saturating_add(kv_cache_bytes)
            .saturating_add(workspace_bytes)
            .saturating_add(self.overhead);
        Need {
            weights_bytes: self.weights.bytes,
            kv_cache_bytes,
            workspace_bytes,
            overhead_bytes: self.overhead,
            total_bytes: total,
        }
    }

    pub fn fits(&self, batch: usize, context: usize, budget: u64) -> bool {
        self.need(batch, context).total_bytes <= budget
    }

    /// The longest context (≤ the model's positions) that fits at `batch`.
    pub fn longest_context(&self, batch: usize, budget: u64) -> Option<usize> {
        largest(1, self.cfg.block_size, |t| self.fits(batch, t, budget))
    }

    /// The largest batch that fits at `context`.
    pub fn largest_batch(&self, context: usize, budget: u64) -> Option<usize> {
        largest(1, MAX_BATCH, |b| self.fits(b, context, budget))
    }
}

/// The largest x in [lo, hi] with ok(x), for a monotone (true then false) predicate.
fn largest(lo: usize, hi: usize, ok: impl Fn(usize) -> bool) -> Option<usize> {
    if hi < lo || !ok(lo) {
        return None;
    }
    let (mut good, mut bad) = (lo, hi + 1);
    while bad - good > 1 {
        let mid = good + (bad - good) / 2;
        if ok(mid) {
            good = mid;
        } else {
            bad = mid;
        }
    }
    Some(good)
}

/// One format's need at the asked batch and context.
#[derive(Debug, Clone, Serialize)]
pub struct FormatFit {
    pub format: &'static str,
    pub weights_bytes: u64,
    pub total_bytes: u64,
    pub fits: bool,
}

/// One GPU's answers.
#[derive(Debug, Clone, Serialize)]
pub struct GpuRow {
    pub gpu: &'static str,
    pub memory_bytes: u64,
    pub total_bytes: u64,
    pub fits: bool,
    pub longest_context: Option<usize>,
    pub largest_batch: Option<usize>,
    pub best_format: Option<&'static str>,
}

#[derive(Debug, Clone, Serialize)]
pub struct FitReport {
    pub budget_bytes: u64,
    /// `--memory` or the GPU's name.
    pub budget_source: String,
    pub format: &'static str,
    pub batch: usize,
    pub context: usize,
    pub prefill_chunk: usize,
    pub kv_dtype: &'static str,
    pub need: Need,
    pub fits: bool,
    /// Longest context at `batch` (up to the model's positions), `None` if not even 1 fits.
    pub longest_context: Option<usize>,
    /// Largest batch at `context`.
    pub largest_batch: Option<usize>,
    /// The highest-precision format (tried from f32 down to q2_k) that fits at batch × context.
    pub best_format: Option<&'static str>,
    pub formats: Vec<FormatFit>,
    pub gpus: Vec<GpuRow>,
}

/// The fit report for `m` at `batch` × `context` against `budget`.
pub fn report(
    m: &FitModel,
    batch: usize,
    context: usize,
    budget: u64,
    budget_source: String,
) -> Result<FitReport> {
    let need = m.need(batch, context);
    let mut formats = Vec::new();
    let mut per_format: Vec<FitModel> = Vec::new();
    for f in WeightFormat::all() {
        let fm = FitModel {
            format: f,
            weights: weights::estimate(m.cfg, f)?,
            ..m.clone()
        };
        let n = fm.need(batch, context);
        formats.push(FormatFit {
            format: f.name(),
            weights_bytes: n.weights_bytes,
            total_bytes: n.total_bytes,
            fits: n.total_bytes <= budget,
        });
        per_format.push(fm);
    }
    let best = |budget: u64| {
        per_format
            .iter()
            .find(|fm| fm.fits(batch, context, budget))
            .map(|fm| fm.format.name())
    };
    let gpus = gpus::GPUS
        .iter()
        .map(|g| GpuRow {
            gpu: g.name,
            memory_bytes: g.memory_bytes,
            total_bytes: need.total_bytes,
            fits: need.total_bytes <= g.memory_bytes,
            longest_context: m.longest_context(batch, g.memory_bytes),
            largest_batch: m.largest_batch(context, g.memory_bytes),
            best_format: best(g.memory_bytes),
        })
        .collect();
    Ok(FitReport {
        budget_bytes: budget,
        budget_source,
        format: m.format.name(),
        batch,
        context,
        prefill_chunk: m.chunk,
        kv_dtype: m.kv.name(),
        need,
        fits: need.total_bytes <= budget,
        longest_context: m.longest_context(batch, budget),
        largest_batch: m.largest_batch(context, budget),
        best_format: best(budget),
        formats,
        gpus,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::presets;

    #[test]
    fn sizes_parse_with_units() {
        assert_eq!(parse_size("--memory", "24GiB").unwrap(), 24 << 30);
        assert_eq!(parse_size("--memory", "80GB").unwrap(), 80_000_000_000);
        assert_eq!(parse_size("--memory", "1000").unwrap(), 1000);
        assert_eq!(parse_size("--memory", "1.5 GiB").unwrap(), 3 << 29);
        let e = parse_size("--memory", "lots").unwrap_err().to_string();
        assert!(e.contains("--memory") && e.contains("lots"), "{e}");
        assert!(parse_size("--memory", "0").is_err());
        assert!(parse_size("--memory", "24XB").is_err());
    }

    #[test]
    fn search_finds_the_boundary() {
        assert_eq!(largest(1, 100, |x| x <= 37), Some(37));
        assert_eq!(largest(1, 100, |_| true), Some(100));
        assert_eq!(largest(1, 100, |_| false), None);
    }

    /// The fit answers are consistent with need(): the longest context fits and one more does
    /// not; the largest batch likewise.
    #[test]
    fn answers_sit_on_the_boundary() {
        let cfg = presets::load("llama3-8b").unwrap();
        let f = WeightFormat::Float(TrainDtype::Bf16);
        let m = FitModel {
            cfg: &cfg,
            format: f,
            weights: weights::estimate(&cfg, f).unwrap(),
            kv: TrainDtype::F16,
            chunk: DEFAULT_FIT_CHUNK,
            overhead: DEFAULT_RUNTIME_OVERHEAD_BYTES,
        };
        // bf16 weights are 16,060,522,496 B (14.96 GiB); with the 1 GiB overhead, 16.5 GiB
        // leaves about 0.54 GiB: some 4,400 tokens of 128 KiB, less the workspace.
        let budget = 33u64 << 29;
        let t = m.longest_context(1, budget).unwrap();
        assert!(m.fits(1, t, budget) && !m.fits(1, t + 1, budget));
        assert!(t > 1000 && t < 4400, "{t}");
        let b = m.largest_batch(1024, budget).unwrap();
        assert!(m.fits(b, 1024, budget) && !m.fits(b + 1, 1024, budget));
        // The whole 8,192-token context fits in 24 GiB.
        assert_eq!(m.longest_context(1, 24 << 30), Some(8192));
    }
}
