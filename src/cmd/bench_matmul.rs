//! `truesize bench-matmul` (hidden): the f32 matmul probe (`measure::peak`) as one JSON object,
//! this machine's roofline for scripts/bench.sh.

use crate::error::{Result, EXIT_OK};
use crate::report::bench::BenchReport;
use crate::report::{emit, Format, View};
use candle_core::Device;

pub fn run() -> Result<u8> {
    let (flops_per_s, source) = crate::measure::peak::measure_matmul_peak(&Device::Cpu)?;
    let r = BenchReport {
        flops_per_s,
        matmul_size: crate::measure::peak::PROBE_SIZE,
        source,
    };
    emit(Format::Json, &r, View::Full)?;
    Ok(EXIT_OK)
}
