//! `truesize bench-matmul` (hidden): the f32 matmul probe (`measure::peak`) as one JSON object,
//! this machine's roofline for scripts/bench.sh.

use crate::error::{Result, EXIT_OK};
use candle_core::Device;

pub fn run() -> Result<u8> {
    let (flops_per_s, source) = crate::measure::peak::measure_matmul_peak(&Device::Cpu)?;
    println!(
        "{}",
        serde_json::json!({
            "matmul_size": crate::measure::peak::PROBE_SIZE,
            "flops_per_s": flops_per_s,
            "source": source,
        })
    );
    Ok(EXIT_OK)
}
