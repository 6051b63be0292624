//! A genuine generation run under the counting allocator: load, allocate the KV cache, prefill
//! the prompt (in chunks), decode greedily, with the bytes of every phase measured.

use super::cache::{KvCache, LayerShape};
use super::load::{self, Source};
use super::model::{max_rel_error, InferModel, Logits};
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::estimate::serve::weights::WeightsEstimate;
use crate::measure::probe::MemoryProbe;
use crate::measure::run::probe_for;
use candle_core::{DType, Device, Tensor};
use serde::Serialize;
use std::time::Instant;

/// Everything a run needs, validated.
pub struct RunPlan<'a> {
    pub cfg: &'a ModelConfig,
    pub weights: &'a WeightsEstimate,
    pub source: Source,
    pub act: DType,
    pub kv: DType,
    pub batch: usize,
    /// The prompt of every sequence (all `batch` sequences share it).
    pub prompt: Vec<u32>,
    pub generate: usize,
    pub chunk: usize,
    pub device: Device,
    /// Run a full forward over the generated sequence afterwards and compare its logits with
    /// the incremental ones.
    pub full_forward_check: bool,
}

/// Bytes measured, each above the baseline taken before loading.
#[derive(Debug, Clone, Serialize)]
pub struct Measured {
    /// Σ storage of the loaded weights (exact).
    pub weights_bytes: u64,
    /// Allocated by loading (storage + bookkeeping).
    pub weights_allocated_bytes: u64,
    /// Σ storage of K and V (exact).
    pub kv_cache_bytes: u64,
    /// Allocated by creating the cache.
    pub kv_cache_allocated_bytes: u64,
    pub after_load_bytes: u64,
    pub prefill_peak_bytes: u64,
    pub after_prefill_bytes: u64,
    pub decode_peak_bytes: u64,
    pub decode_step_peak_bytes: Vec<u64>,
    pub end_bytes: u64,
    pub source: &'static str,
}

#[derive(Debug, Clone, Serialize)]
pub struct Timing {
    pub load_s: f64,
    pub prefill_s: f64,
    pub decode_s: f64,
    /// Generated tokens per second over the decode steps, all sequences.
    pub decode_tokens_per_s: f64,
}

pub struct RunResult {
    pub measured: Measured,
    /// Generated ids per sequence.
    pub tokens: Vec<Vec<u32>>,
    pub timing: Timing,
    /// max |incremental − full| / max |full| over the logits of every generated position.
    pub full_forward_error: Option<f64>,
    pub weights_source: String,
}

/// Greedy choice per row of `[B, V]` host logits: the first maximum (torch.argmax's tie rule).
fn argmax_rows(logits: &[f32], vocab: usize) -> Vec<u32> {
    logits
        .chunks_exact(vocab)
        .map(|row| {
            let mut best = 0;
            for (i, &v) in row.iter().enumerate() {
                if v > row[best] {
                    best = i;
                }
            }
            best as u32
        })
        .collect()
}

fn ctx(what: &'static str) -> impl Fn(candle_core::Error) -> Error {
    move |e| {
        Error::Internal(anyhow::anyhow!(
            "{what}: {}",
            crate::error::without_backtrace(e)
        ))
    }
}

pub fn run(plan: RunPlan) -> Result<RunResult> {
    let cfg = plan.cfg;
    let (b, p, n) = (plan.batch, plan.prompt.len(), plan.generate);
    let v = cfg.vocab_size;
    let probe: Box<dyn MemoryProbe> = probe_for(&plan.device)?;
    // Host buffers the run fills are reserved before the baseline: they are the harness's,
    // not the engine's.
    let mut tokens: Vec<Vec<u32>> = (0..b).map(|_| Vec::with_capacity(n)).collect();
    let mut stored: Vec<f32> = Vec::with_capacity(if plan.full_forward_check {
        b * n * v
    } else {
        0
    });
    let mut all_ids: Vec<u32> = Vec::with_capacity(b * (p + n));
    let weights_source = load::describe(&plan.source);
    probe.reset_peak()?;
    let baseline = probe.current()?;
    let rel = |x: u64| x.saturating_sub(baseline);

    let t0 = Instant::now();
    let model = load::build(cfg, plan.weights, plan.source, plan.act, &plan.device)?;
    let load_s = t0.elapsed().as_secs_f64();
    let after_load = probe.current()?;
    let shapes: Vec<LayerShape> = (0..cfg.n_layer)
        .map(|l| LayerShape {
            kv_heads: cfg.n_kv_head,
            head_dim: cfg.head_dim,
            capacity: crate::estimate::serve::kv::cached_tokens(cfg, l, (p + n) as u64) as usize,
        })
        .collect();
    let mut cache = KvCache::new(b, &shapes, plan.kv, &plan.device).map_err(ctx("KV cache"))?;
    let after_cache = probe.current()?;

    // Prefill.
    probe.reset_peak()?;
    let t1 = Instant::now();
    let mut first = Vec::new();
    let mut start = 0;
    while start < p {
        let t = plan.chunk.min(p - start);
        let ids: Vec<u32> = (0..b)
            .flat_map(|_| plan.prompt[start..start + t].iter().copied())
            .collect();
        let ids = Tensor::from_vec(ids, (b, t), &plan.device)?;
        let logits = model
            .forward(&ids, start, &mut cache, Logits::Last)
            .map_err(ctx("prefill"))?;
        drop(ids);
        if start + t == p {
            let host: Vec<f32> = logits.flatten_all()?.to_vec1()?;
            first = argmax_rows(&host, v);
            if plan.full_forward_check {
                stored.extend_from_slice(&host);
            }
        }
        drop(logits);
        start += t;
    }
    let prefill_s = t1.elapsed().as_secs_f64();
    let prefill_peak = probe.peak()?;
    let after_prefill = probe.current()?;
    for (s, &tok) in tokens.iter_mut().zip(&first) {
        s.push(tok);
    }

    // Decode: each step feeds the last token of every sequence.
    let mut step_peaks = Vec::with_capacity(n.saturating_sub(1));
    let t2 = Instant::now();
    for step in 1..n {
        probe.reset_peak()?;
        let last: Vec<u32> = tokens.iter().map(|s| s[step - 1]).collect();
        let ids = Tensor::from_vec(last, (b, 1), &plan.device)?;
        let logits = model
            .forward(&ids, p + step - 1, &mut cache, Logits::Last)
            .map_err(ctx("decode"))?;
        drop(ids);
        let host: Vec<f32> = logits.flatten_all()?.to_vec1()?;
        drop(logits);
        for (s, tok) in tokens.iter_mut().zip(argmax_rows(&host, v)) {
            s.push(tok);
        }
        if plan.full_forward_check {
            stored.extend_from_slice(&host);
        }
        drop(host);
        step_peaks.push(rel(probe.peak()?));
    }
    let decode_s = t2.elapsed().as_secs_f64();
    let end = probe.current()?;
    let weights_bytes = model.storage_bytes();
    let kv_bytes = cache.bytes();
    let measured = Measured {
        weights_bytes,
        weights_allocated_bytes: after_load.saturating_sub(baseline),
        kv_cache_bytes: kv_bytes,
        kv_cache_allocated_bytes: after_cache.saturating_sub(after_load),
        after_load_bytes: rel(after_load),
        prefill_peak_bytes: rel(prefill_peak),
        after_prefill_bytes: rel(after_prefill),
        decode_peak_bytes: step_peaks.iter().copied().max().unwrap_or(0),
        decode_step_peak_bytes: step_peaks,
        end_bytes: rel(end),
        source: probe.source(),
    };
    drop(cache);

    let full_forward_error = if plan.full_forward_check && n > 0 {
        // The whole sequence (prompt + all generated tokens but the last) in one forward with
        // a fresh cache: its logits at positions p−1 .. p+n−2 must equal the incremental ones.
        let l = p + n - 1;
        for s in &tokens {
            all_ids.extend_from_slice(&plan.prompt);
            all_ids.extend_from_slice(&s[..n - 1]);
        }
        let full = full_logits(&model, cfg, &all_ids, b, l, plan.kv, &plan.device)?;
        // [B, L, V] -> positions p−1.. as [B, n, V]; stored is [n][B][V].
        let full = full.narrow(1, p - 1, n)?.contiguous()?;
        let inc = Tensor::from_vec(stored, (n, b, v), &Device::Cpu)?
            .transpose(0, 1)?
            .contiguous()?;
        Some(max_rel_error(&inc, &full.to_device(&Device::Cpu)?)?)
    } else {
        None
    };
    let decode_tokens = (b * n.saturating_sub(1)) as f64;
    Ok(RunResult {
        measured,
        tokens,
        timing: Timing {
            load_s,
            prefill_s,
            decode_s,
            decode_tokens_per_s: if decode_s > 0.0 {
                decode_tokens / decode_s
            } else {
                0.0
            },
        },
        full_forward_error,
        weights_source,
    })
}

/// Logits `[B, L, V]` of one forward over `ids` with a fresh cache.
fn full_logits(
    model: &InferModel,
    cfg: &ModelConfig,
    ids: &[u32],
    b: usize,
    l: usize,
    kv: DType,
    dev: &Device,
) -> Result<Tensor> {
    let shapes: Vec<LayerShape> = (0..cfg.n_layer)
        .map(|layer| LayerShape {
            kv_heads: cfg.n_kv_head,
            head_dim: cfg.head_dim,
            capacity: crate::estimate::serve::kv::cached_tokens(cfg, layer, l as u64) as usize,
        })
        .collect();
    let mut cache = KvCache::new(b, &shapes, kv, dev)?;
    let ids = Tensor::from_vec(ids.to_vec(), (b, l), dev)?;
    model
        .forward(&ids, 0, &mut cache, Logits::All)
        .map_err(ctx("full forward"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argmax_takes_the_first_maximum() {
        assert_eq!(argmax_rows(&[0.0, 2.0, 2.0, 1.0, 5.0, 4.0], 3), vec![1, 1]);
    }
}
