//! Shared by the config fuzz targets: every closed form `truesize estimate` computes from a
//! parsed config.
//!
//! A target's only assertions are "no panic, no abort, no hang, no huge allocation" plus the
//! estimate's own invariants: every hostile input must come back as `Err` (exit code 2).
//! `model::autograd_replay` (the step's replay) is not called here: it is slow per input
//! (seconds for a 70B config) and is being rewritten; see tests/hostile_input.rs for its
//! overflow at extreme steps.

use truesize::config::ModelConfig;
use truesize::dtype::TrainDtype;
use truesize::error::Result;
use truesize::estimate::{flops, memory, params};

/// validate → exact parameter estimate → the 12·d² comparison → FLOPs at the shortest and the
/// longest sequence → weight and training bytes in every dtype.
pub fn estimate_everything(cfg: Result<ModelConfig>) {
    let Ok(cfg) = cfg else { return };
    if cfg.validate().is_err() {
        return;
    }
    let Ok(p) = params::estimate(&cfg) else {
        return;
    };
    // The closed form's parts must add up to its total; active ≤ total.
    let sum: u128 = p.components.iter().map(|c| c.params as u128).sum();
    assert_eq!(sum, p.total as u128, "components do not sum to the total");
    assert!(p.active_per_token <= p.total, "active > total");
    assert!(p.non_embedding <= p.total, "non-embedding > total");
    let _ = params::why_rough_rule_fails(&cfg);
    for seq in [1, cfg.block_size] {
        for causal in [false, true] {
            let _ = flops::estimate(&cfg, &p, seq, causal);
        }
    }
    let _ = memory::weight_bytes(p.total);
    for dtype in [TrainDtype::F32, TrainDtype::F16, TrainDtype::Bf16] {
        let _ = memory::training(&p, dtype, None);
    }
}
