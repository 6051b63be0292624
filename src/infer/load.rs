//! Building the inference network from a weight source: seeded random values (any config or
//! preset), an HF safetensors checkpoint (the same names as training), or a GGUF file
//! (llama.cpp's names and types).
//!
//! Every source hands out f32 values in HF names and layouts, or (GGUF) a tensor already in its
//! stored type; the builder puts each tensor in the type the serving plan chose for it
//! (`estimate::serve::weights`), so the bytes held equal the estimate exactly.

use super::model::{
    Attention, Embedding, InferModel, Layer, Linear, Matrix, Mlp, Norm, Qkv, RopeSpec, SwiGlu,
};
use crate::checkpoint::gguf::{GgufFile, RawTensor};
use crate::config::{Arch, ModelConfig, RopeScaling};
use crate::error::{Error, Result};
use crate::estimate::serve::formats::{self, GgmlType};
use crate::estimate::serve::weights::{self, WeightsEstimate};
use candle_core::quantized::{QStorage, QTensor};
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::borrow::Cow;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// N(0, 0.02): GPT-2's and Llama's initialiser (`initializer_range`).
const INIT_STD: f32 = 0.02;

/// Where the weights come from.
pub enum Source {
    /// Seeded N(0, 0.02) matrices, unit norms, zero biases.
    Random { seed: u64 },
    /// An HF folder or `.safetensors` file (or sharded index).
    Safetensors { path: PathBuf },
    /// A GGUF file, each tensor in its own stored type (opened while building, so that
    /// candle's reader and its metadata are gone once the network is built).
    Gguf { path: PathBuf },
}

/// What a tensor is, for initialisation and checks.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Weight,
    NormWeight,
    Bias,
}

/// Values of one HF tensor, or an already-typed GGUF tensor.
enum Fetched {
    /// f32 values in the engine's layout (`[out, in]` for matrices).
    F32(Tensor),
    /// A GGUF tensor in its stored type, engine layout.
    Typed(RawTensor),
}

struct Builder<'a> {
    cfg: &'a ModelConfig,
    plan: &'a WeightsEstimate,
    act: DType,
    dev: Device,
    src: SourceState,
    /// (HF name, why) for every tensor that could not be used.
    problems: Vec<String>,
}

enum SourceState {
    Random(Box<StdRng>),
    Safetensors(MmapedSafetensors, String),
    Gguf(Box<GgufFile>),
}

impl Builder<'_> {
    /// The values of HF tensor `name`, whose engine shape is `shape`.
    fn fetch(&mut self, name: &str, shape: &[usize], kind: Kind) -> Result<Option<Fetched>> {
        let numel: usize = shape.iter().product();
        match &mut self.src {
            SourceState::Random(rng) => {
                let v: Vec<f32> = match kind {
                    Kind::NormWeight => vec![1.0; numel],
                    Kind::Bias => vec![0.0; numel],
                    Kind::Weight => normal(rng, numel, INIT_STD),
                };
                Ok(Some(Fetched::F32(Tensor::from_vec(
                    v,
                    shape,
                    &Device::Cpu,
                )?)))
            }
            SourceState::Safetensors(st, src) => {
                let key = resolve_hf(st, name);
                let Some(key) = key else {
                    self.problems.push(format!("{name}: missing"));
                    return Ok(None);
                };
                let view_shape = match st.get(&key) {
                    Ok(v) => v.shape().to_vec(),
                    Err(e) => {
                        self.problems.push(format!("{key}: {e}"));
                        return Ok(None);
                    }
                };
                let transposed = weights::hf_is_transposed(self.cfg, name);
                let want: Vec<usize> = if transposed {
                    shape.iter().rev().copied().collect()
                } else {
                    shape.to_vec()
                };
                if view_shape != want {
                    self.problems
                        .push(format!("{key}: shape {view_shape:?}, expected {want:?}"));
                    return Ok(None);
                }
                let t = st
                    .load(&key, &Device::Cpu)
                    .and_then(|t| t.to_dtype(DType::F32))
                    .map_err(|e| Error::file(src.as_str(), format!("{key}: {e}")))?;
                let t = if transposed { t.t()?.contiguous()? } else { t };
                Ok(Some(Fetched::F32(t)))
            }
            SourceState::Gguf(file) => {
                let Some(g) = weights::gguf_name(self.cfg, name) else {
                    self.problems.push(format!("{name}: no GGUF name"));
                    return Ok(None);
                };
                match file.read_for_engine(&g, shape) {
                    Ok(raw) => Ok(Some(Fetched::Typed(raw))),
                    Err(e) => {
                        self.problems.push(format!("{}: {e}", g.name));
                        Ok(None)
                    }
                }
            }
        }
    }

    fn planned_type(&self, name: &str) -> &'static GgmlType {
        self.plan.type_of(name).unwrap_or(&formats::F32)
    }

    /// A placeholder that keeps the build going so every problem is reported together.
    fn placeholder(&self, shape: &[usize]) -> Result<Tensor> {
        Ok(Tensor::zeros((), self.act, &self.dev)?.broadcast_as(shape)?)
    }

    /// A matrix `[out, in]` used as y = x·Wᵀ.
    fn matrix(&mut self, name: &str, out: usize, inp: usize) -> Result<Matrix> {
        let ty = *self.planned_type(name);
        let Some(f) = self.fetch(name, &[out, inp], Kind::Weight)? else {
            return Ok(Matrix::Dense(self.placeholder(&[inp, out])?));
        };
        match f {
            Fetched::F32(w) => self.matrix_from_f32(w, &ty),
            Fetched::Typed(raw) => self.matrix_from_raw(raw),
        }
    }

    fn matrix_from_f32(&self, w: Tensor, ty: &GgmlType) -> Result<Matrix> {
        Ok(match ty.name {
            "F32" | "F16" | "BF16" => {
                let dt = float_dtype(ty);
                Matrix::Dense(w.t()?.contiguous()?.to_dtype(dt)?.to_device(&self.dev)?)
            }
            _ => Matrix::Quant(Arc::new(quantize(&w, ty, &self.dev)?)),
        })
    }

    fn matrix_from_raw(&self, raw: RawTensor) -> Result<Matrix> {
        if raw.ty.is_float() {
            let w = raw.to_tensor(&self.dev)?;
            Ok(Matrix::Dense(w.t()?.contiguous()?))
        } else {
            Ok(Matrix::Quant(Arc::new(raw.to_qtensor(&self.dev)?)))
        }
    }

    fn embedding(&mut self, name: &str, rows: usize, d: usize) -> Result<Embedding> {
        let ty = *self.planned_type(name);
        let Some(f) = self.fetch(name, &[rows, d], Kind::Weight)? else {
            return Ok(Embedding::Dense(self.placeholder(&[rows, d])?));
        };
        Ok(match f {
            Fetched::F32(w) => match ty.name {
                "F32" | "F16" | "BF16" => {
                    Embedding::Dense(w.to_dtype(float_dtype(&ty))?.to_device(&self.dev)?)
                }
                _ => Embedding::Quant(Arc::new(quantize(&w, &ty, &self.dev)?)),
            },
            Fetched::Typed(raw) if raw.ty.is_float() => Embedding::Dense(raw.to_tensor(&self.dev)?),
            Fetched::Typed(raw) => Embedding::Quant(Arc::new(raw.to_qtensor(&self.dev)?)),
        })
    }

    /// A 1-D tensor (norm weight or bias) in the activation dtype.
    fn vector(&mut self, name: &str, n: usize, kind: Kind) -> Result<Tensor> {
        match self.fetch(name, &[n], kind)? {
            Some(Fetched::F32(t)) => Ok(t.to_dtype(self.act)?.to_device(&self.dev)?),
            Some(Fetched::Typed(raw)) => Ok(raw.to_tensor(&self.dev)?.to_dtype(self.act)?),
            None => self.placeholder(&[n]),
        }
    }

    /// A float table used as is (GPT-2's positions), in the activation dtype.
    fn table(&mut self, name: &str, rows: usize, cols: usize) -> Result<Tensor> {
        match self.fetch(name, &[rows, cols], Kind::Weight)? {
            Some(Fetched::F32(t)) => Ok(t.to_dtype(self.act)?.to_device(&self.dev)?),
            Some(Fetched::Typed(raw)) => Ok(raw.to_tensor(&self.dev)?.to_dtype(self.act)?),
            None => self.placeholder(&[rows, cols]),
        }
    }

    fn linear(&mut self, prefix: &str, out: usize, inp: usize, bias: bool) -> Result<Linear> {
        let w = self.matrix(&format!("{prefix}.weight"), out, inp)?;
        let b = if bias {
            Some(self.vector(&format!("{prefix}.bias"), out, Kind::Bias)?)
        } else {
            None
        };
        Ok(Linear { w, b })
    }

    fn norm(&mut self, prefix: &str, d: usize, layer_norm: bool, bias: bool) -> Result<Norm> {
        let eps = self.cfg.norm_eps as f32;
        let w = self.vector(&format!("{prefix}.weight"), d, Kind::NormWeight)?;
        Ok(if layer_norm {
            let b = if bias {
                self.vector(&format!("{prefix}.bias"), d, Kind::Bias)?
            } else {
                Tensor::zeros(d, self.act, &self.dev)?
            };
            Norm::Layer { w, b, eps }
        } else {
            Norm::Rms { w, eps }
        })
    }

    fn swiglu(&mut self, prefix: &str, names: [&str; 3], bias: bool) -> Result<SwiGlu> {
        let (d, ff) = (self.cfg.n_embd, self.cfg.intermediate_size);
        let [g, u, dn] = names;
        Ok(SwiGlu {
            gate: self.linear(&format!("{prefix}.{g}"), ff, d, bias)?,
            up: self.linear(&format!("{prefix}.{u}"), ff, d, bias)?,
            down: self.linear(&format!("{prefix}.{dn}"), d, ff, bias)?,
        })
    }

    fn build(mut self) -> Result<InferModel> {
        let cfg = self.cfg;
        let (d, v) = (cfg.n_embd, cfg.vocab_size);
        let model = match cfg.arch {
            Arch::Gpt2 => {
                let embed = self.embedding("transformer.wte.weight", v, d)?;
                let positions = Some(self.table("transformer.wpe.weight", cfg.block_size, d)?);
                let mut layers = Vec::with_capacity(cfg.n_layer);
                for i in 0..cfg.n_layer {
                    let p = format!("transformer.h.{i}");
                    let b = cfg.bias;
                    layers.push(Layer {
                        attn_norm: self.norm(&format!("{p}.ln_1"), d, true, b)?,
                        attn: Attention {
                            qkv: Qkv::Fused(self.linear(
                                &format!("{p}.attn.c_attn"),
                                3 * d,
                                d,
                                b,
                            )?),
                            o: self.linear(&format!("{p}.attn.c_proj"), d, d, b)?,
                            n_head: cfg.n_head,
                            n_kv_head: cfg.n_head,
                            head_dim: cfg.head_dim,
                            rope: false,
                        },
                        mlp_norm: self.norm(&format!("{p}.ln_2"), d, true, b)?,
                        mlp: Mlp::Gelu {
                            up: self.linear(
                                &format!("{p}.mlp.c_fc"),
                                cfg.intermediate_size,
                                d,
                                b,
                            )?,
                            down: self.linear(
                                &format!("{p}.mlp.c_proj"),
                                d,
                                cfg.intermediate_size,
                                b,
                            )?,
                        },
                        window: cfg.attention_window(i),
                    });
                }
                let norm = self.norm("transformer.ln_f", d, true, cfg.bias)?;
                let (head, head_tied) = self.head(&embed, v, d)?;
                InferModel {
                    embed,
                    positions,
                    head_tied,
                    layers,
                    norm,
                    head,
                    rope: None,
                    act: self.act,
                    vocab: v,
                    d,
                    device: self.dev.clone(),
                }
            }
            Arch::Llama => {
                let embed = self.embedding("model.embed_tokens.weight", v, d)?;
                let mut layers = Vec::with_capacity(cfg.n_layer);
                for i in 0..cfg.n_layer {
                    let p = format!("model.layers.{i}");
                    let qkv_bias = cfg.has_qkv_bias();
                    let attn = Attention {
                        qkv: Qkv::Separate {
                            q: self.linear(
                                &format!("{p}.self_attn.q_proj"),
                                cfg.q_dim(),
                                d,
                                qkv_bias,
                            )?,
                            k: self.linear(
                                &format!("{p}.self_attn.k_proj"),
                                cfg.kv_dim(),
                                d,
                                qkv_bias,
                            )?,
                            v: self.linear(
                                &format!("{p}.self_attn.v_proj"),
                                cfg.kv_dim(),
                                d,
                                qkv_bias,
                            )?,
                        },
                        o: self.linear(
                            &format!("{p}.self_attn.o_proj"),
                            d,
                            cfg.q_dim(),
                            cfg.bias,
                        )?,
                        n_head: cfg.n_head,
                        n_kv_head: cfg.n_kv_head,
                        head_dim: cfg.head_dim,
                        rope: true,
                    };
                    let mlp = if cfg.is_moe() {
                        let router = self.linear(
                            &format!("{p}.block_sparse_moe.gate"),
                            cfg.n_experts,
                            d,
                            false,
                        )?;
                        let experts = (0..cfg.n_experts)
                            .map(|e| {
                                self.swiglu(
                                    &format!("{p}.block_sparse_moe.experts.{e}"),
                                    ["w1", "w3", "w2"],
                                    false,
                                )
                            })
                            .collect::<Result<Vec<_>>>()?;
                        Mlp::Moe {
                            router,
                            experts,
                            top_k: cfg.n_experts_per_tok,
                        }
                    } else {
                        Mlp::SwiGlu(self.swiglu(
                            &format!("{p}.mlp"),
                            ["gate_proj", "up_proj", "down_proj"],
                            cfg.mlp_bias,
                        )?)
                    };
                    layers.push(Layer {
                        attn_norm: self.norm(&format!("{p}.input_layernorm"), d, false, false)?,
                        attn,
                        mlp_norm: self.norm(
                            &format!("{p}.post_attention_layernorm"),
                            d,
                            false,
                            false,
                        )?,
                        mlp,
                        window: cfg.attention_window(i),
                    });
                }
                let norm = self.norm("model.norm", d, false, false)?;
                let (head, head_tied) = self.head(&embed, v, d)?;
                let factors = match &mut self.src {
                    SourceState::Gguf(f) => f.rope_freq_factors()?,
                    _ => None,
                };
                InferModel {
                    embed,
                    positions: None,
                    head_tied,
                    layers,
                    norm,
                    head,
                    rope: Some(RopeSpec {
                        inv_freq: inv_freq(cfg, factors.as_deref()),
                    }),
                    act: self.act,
                    vocab: v,
                    d,
                    device: self.dev.clone(),
                }
            }
        };
        if !self.problems.is_empty() {
            let (what, src) = match &self.src {
                SourceState::Safetensors(_, s) => ("checkpoint", s.clone()),
                SourceState::Gguf(f) => ("GGUF file", f.path.display().to_string()),
                SourceState::Random(_) => ("random init", String::new()),
            };
            return Err(Error::file(
                src,
                format!(
                    "{what} does not match the {} config {}: {} problem(s): {}",
                    cfg.model_type,
                    cfg.name,
                    self.problems.len(),
                    self.problems.join("; ")
                ),
            ));
        }
        Ok(model)
    }

    /// The output head: its own tensor, or the embedding's storage when tied. A GGUF file may
    /// store a tied head anyway (llama.cpp's GPT-2 converter writes `output.weight`); then the
    /// file's copy is used, as llama.cpp does.
    fn head(&mut self, embed: &Embedding, v: usize, d: usize) -> Result<(Matrix, bool)> {
        let stored_anyway = match &self.src {
            SourceState::Gguf(f) => f.has_tensor("output.weight"),
            _ => false,
        };
        if self.cfg.tie_embeddings && !stored_anyway {
            Ok((embed.as_head(), true))
        } else {
            Ok((self.matrix("lm_head.weight", v, d)?, false))
        }
    }
}

fn float_dtype(ty: &GgmlType) -> DType {
    match ty.name {
        "F16" => DType::F16,
        "BF16" => DType::BF16,
        _ => DType::F32,
    }
}

fn quantize(w: &Tensor, ty: &GgmlType, dev: &Device) -> Result<QTensor> {
    let Some(g) = ty.candle() else {
        return Err(Error::Usage(format!(
            "candle cannot hold {} tensors; choose another --weights format",
            ty.name
        )));
    };
    let q = QTensor::quantize(w, g)?;
    if dev.is_cpu() {
        Ok(q)
    } else {
        let data = q.data()?;
        Ok(QTensor::new(
            QStorage::from_data(Cow::Borrowed(&data), dev, g)?,
            q.shape().clone(),
        )?)
    }
}

/// HF hub GPT-2 checkpoints drop the `transformer.` prefix.
fn resolve_hf(st: &MmapedSafetensors, name: &str) -> Option<String> {
    if st.get(name).is_ok() {
        return Some(name.to_string());
    }
    name.strip_prefix("transformer.")
        .filter(|s| st.get(s).is_ok())
        .map(str::to_string)
}

/// `n` draws of N(0, std) by Box–Muller (a fixed algorithm keeps a seed's values stable).
fn normal(rng: &mut StdRng, n: usize, std: f32) -> Vec<f32> {
    let mut v = Vec::with_capacity(n + 1);
    while v.len() < n {
        let u1 = 1.0 - rng.random::<f64>();
        let u2 = rng.random::<f64>();
        let r = (-2.0 * u1.ln()).sqrt();
        let (s, c) = (std::f64::consts::TAU * u2).sin_cos();
        v.push((std as f64 * r * c) as f32);
        v.push((std as f64 * r * s) as f32);
    }
    v.truncate(n);
    v
}

/// RoPE inverse frequencies θ^(-2i/hd) in f32 as HF computes them, with Llama-3 scaling
/// (HF `_compute_llama3_parameters`) or a GGUF file's per-frequency divisors
/// (`rope_freqs.weight`, which llama.cpp divides the frequencies by).
pub fn inv_freq(cfg: &ModelConfig, factors: Option<&[f32]>) -> Vec<f32> {
    let hd = cfg.head_dim;
    let base: Vec<f32> = (0..hd / 2)
        .map(|i| (1.0 / cfg.rope_theta.powf((2 * i) as f64 / hd as f64)) as f32)
        .collect();
    if let Some(f) = factors {
        return base.iter().zip(f).map(|(b, f)| b / f).collect();
    }
    // Other scalings are refused before a run (`super::unsupported`).
    let Some(RopeScaling::Llama3(s)) = cfg.rope_scaling else {
        return base;
    };
    let old_ctx = s.original_max_position_embeddings as f64;
    let low_freq_wavelen = old_ctx / s.low_freq_factor;
    let high_freq_wavelen = old_ctx / s.high_freq_factor;
    base.into_iter()
        .map(|f| {
            let f = f as f64;
            let wavelen = 2.0 * std::f64::consts::PI / f;
            let scaled = if wavelen > low_freq_wavelen {
                f / s.factor
            } else {
                f
            };
            let medium = wavelen >= high_freq_wavelen && wavelen <= low_freq_wavelen;
            let out = if medium {
                let smooth = (old_ctx / wavelen - s.low_freq_factor)
                    / (s.high_freq_factor - s.low_freq_factor);
                (1.0 - smooth) * scaled / s.factor + smooth * scaled
            } else {
                scaled
            };
            out as f32
        })
        .collect()
}

/// Build the network for `cfg` with every tensor in the type `plan` gives it (a GGUF source
/// keeps its own types), activations in `act`, on `dev`.
pub fn build(
    cfg: &ModelConfig,
    plan: &WeightsEstimate,
    source: Source,
    act: DType,
    dev: &Device,
) -> Result<InferModel> {
    let src = match source {
        Source::Random { seed } => SourceState::Random(Box::new(StdRng::seed_from_u64(seed))),
        Source::Safetensors { path } => {
            let files = crate::checkpoint::resolve(&path)?.files;
            // SAFETY: the mapped files are only read; like every mmap-based loader this
            // assumes nobody truncates them while the model is built.
            let st = unsafe {
                if files.len() == 1 {
                    MmapedSafetensors::new(&files[0])
                } else {
                    MmapedSafetensors::multi(&files)
                }
            }
            .map_err(|e| Error::file(&path, format!("cannot read safetensors: {e}")))?;
            SourceState::Safetensors(st, path.display().to_string())
        }
        Source::Gguf { path } => SourceState::Gguf(Box::new(GgufFile::open(&path, cfg)?)),
    };
    Builder {
        cfg,
        plan,
        act,
        dev: dev.clone(),
        src,
        problems: Vec::new(),
    }
    .build()
}

/// A path's safetensors source, for messages.
pub fn describe(source: &Source) -> String {
    match source {
        Source::Random { seed } => format!("random N(0, {INIT_STD}), seed {seed}"),
        Source::Safetensors { path } => path.display().to_string(),
        Source::Gguf { path } => path.display().to_string(),
    }
}

/// Whether `path` names a GGUF file (by its magic, whatever its extension).
pub fn is_gguf(path: &Path) -> bool {
    crate::checkpoint::gguf::has_magic(path)
}
