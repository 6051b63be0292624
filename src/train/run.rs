//! The lean step under the memory probe, with the autograd engine's protocol
//! (`measure::run::train_step_with`): readings relative to the baseline taken before the model
//! was built, the peak reset at each phase, memory read on the first repeat, times on all.

use super::optim::OptimizerState;
use super::{LeanModel, LeanOptions};
use crate::error::{Error, Result};
use crate::measure::probe::MemoryProbe;
use crate::measure::run::{l2_norm, PhaseBytes, StepResult};
use candle_core::Tensor;
use std::collections::BTreeMap;
use std::time::Instant;

/// Run `repeat` steps. The optimizer step (when asked) runs once, after the last backward, so
/// that the earlier steps see the same weights; the reference logits are computed just before
/// it (their bytes are not part of the optimizer's readings).
pub fn run(
    model: &LeanModel,
    input_ids: &Tensor,
    opts: &LeanOptions,
    probe: &dyn MemoryProbe,
    baseline: u64,
    weights_after_build: u64,
    repeat: usize,
) -> Result<StepResult> {
    let rel = |x: u64| x.saturating_sub(baseline);
    let repeat = repeat.max(1);
    let mut forward_s = Vec::with_capacity(repeat);
    let mut backward_s = Vec::with_capacity(repeat);
    let mut first: Option<(PhaseBytes, f64)> = None;
    let mut last = None;
    for r in 0..repeat {
        probe.reset_peak()?;
        let t0 = Instant::now();
        let mut fwd = (0u64, 0u64, t0);
        let mut probe_err = None;
        let (loss, grads) = model
            .step_with(input_ids, opts, &mut || {
                let read = (|| -> Result<(u64, u64)> {
                    let peak = probe.peak()?;
                    let cur = probe.current()?;
                    probe.reset_peak()?;
                    Ok((peak, cur))
                })();
                match read {
                    Ok((peak, cur)) => {
                        fwd = (peak, cur, Instant::now());
                        Ok(())
                    }
                    Err(e) => {
                        let msg = e.to_string();
                        probe_err = Some(e);
                        Err(candle_core::Error::Msg(msg))
                    }
                }
            })
            .map_err(|e| match probe_err.take() {
                Some(p) => p,
                None => ctx("lean step")(e),
            })?;
        if let Some(g) = grads.values().next() {
            g.device().synchronize()?;
        }
        let t2 = Instant::now();
        forward_s.push((fwd.2 - t0).as_secs_f64());
        backward_s.push((t2 - fwd.2).as_secs_f64());
        let backward_peak = probe.peak()?;
        let after_backward = probe.current()?;
        if first.is_none() {
            first = Some((
                PhaseBytes {
                    weights_bytes: rel(weights_after_build),
                    forward_peak_bytes: rel(fwd.0),
                    after_forward_bytes: rel(fwd.1),
                    backward_peak_bytes: rel(backward_peak),
                    after_backward_bytes: rel(after_backward),
                    gradients_bytes: 0,
                    peak_bytes: rel(fwd.0.max(backward_peak)),
                    optimizer_peak_bytes: None,
                    optimizer_state_bytes: None,
                },
                loss,
            ));
        }
        if r + 1 < repeat {
            drop(grads);
            continue;
        }
        let logits = model.logits(input_ids).map_err(ctx("reference logits"))?;
        let logits_bytes = (logits.elem_count() * logits.dtype().size_in_bytes()) as u64;
        let optimizer = match opts.optimizer {
            Some(kind) => {
                probe.reset_peak()?;
                let before = probe.current()?;
                let mut state = OptimizerState::new(kind);
                state
                    .step(model.params(), &grads)
                    .map_err(ctx("optimizer step"))?;
                let peak = probe.peak()?.saturating_sub(logits_bytes);
                let state_bytes = probe.current()?.saturating_sub(before);
                drop(state);
                Some((rel(peak), state_bytes))
            }
            None => None,
        };
        let mut grad_norms = BTreeMap::new();
        for (name, g) in &grads {
            grad_norms.insert(name.clone(), l2_norm(g)?);
        }
        let missing: Vec<String> = model
            .params()
            .filter(|(n, _)| !grads.contains_key(*n))
            .map(|(n, _)| n.clone())
            .collect();
        let with_grads = probe.current()?;
        drop(grads);
        let gradients_bytes = with_grads.saturating_sub(probe.current()?);
        last = Some((logits, grad_norms, missing, gradients_bytes, optimizer));
    }
    let (Some((mut memory, loss)), Some((logits, grad_norms, missing, gradients_bytes, opt))) =
        (first, last)
    else {
        return Err(Error::Internal(anyhow::anyhow!("no step ran")));
    };
    memory.gradients_bytes = gradients_bytes;
    memory.optimizer_peak_bytes = opt.map(|o| o.0);
    memory.optimizer_state_bytes = opt.map(|o| o.1);
    Ok(StepResult {
        memory,
        loss,
        logits,
        grad_norms,
        missing_grads: missing,
        forward_s,
        backward_s,
    })
}

fn ctx(what: &'static str) -> impl Fn(candle_core::Error) -> Error {
    move |e| {
        let e = crate::error::without_backtrace(e);
        Error::Internal(anyhow::anyhow!("{what}: {e}"))
    }
}
