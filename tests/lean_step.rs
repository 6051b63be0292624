//! The lean training step (`truesize::train`) against candle autograd on the genuine networks:
//! same weights (one VarMap), same batch, every parameter's gradient within 1e-5 (max relative
//! error), the loss within 1e-6, over random configs of every family; checkpointed blocks equal
//! to none; eager attention equal to flash; and the HF fixtures' loss and gradient norms.

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarMap;
use proptest::prelude::*;
use std::collections::BTreeMap;
use std::path::Path;
use truesize::config::{
    self, Arch, Attention as AttnKind, ConfigSource, Dims, EmbeddingScale, ExpertNames,
    Llama3RopeScaling, MlpKind, ModelConfig, NormKind, NormPlacement, RopeScaling, Storage,
};
use truesize::measure::reference::{self, max_rel_error};
use truesize::model::{build, next_token_loss};
use truesize::train::{self, Attention, Checkpoint, LeanModel, LeanOptions};

const GRAD_TOL: f64 = 1e-5;
const LOSS_TOL: f64 = 1e-6;
const LOGITS_TOL: f64 = 1e-5;
/// Below this fraction of the largest gradient a parameter's gradient counts as zero.
const ZERO_GRAD: f64 = 1e-4;
/// f32's resolution of a sum of gradient terms, relative to the largest gradient (8 ε_f32).
const F32_NOISE: f64 = 1e-6;

fn vars(varmap: &VarMap) -> BTreeMap<String, Var> {
    varmap
        .data()
        .lock()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

fn ids(vocab: usize, b: usize, t: usize, seed: u64) -> Tensor {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let v: Vec<u32> = (0..b * t)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((x >> 33) % vocab as u64) as u32
        })
        .collect();
    Tensor::from_vec(v, (b, t), &Device::Cpu).unwrap()
}

/// Lean step vs candle autograd on a random network; returns the lean gradients.
fn check(
    cfg: &ModelConfig,
    b: usize,
    t: usize,
    seed: u64,
    opts: &LeanOptions,
) -> BTreeMap<String, Tensor> {
    cfg.validate().unwrap();
    train::supported(cfg, opts).unwrap();
    let (varmap, model) = build::random(cfg, DType::F32, &Device::Cpu, seed).unwrap();
    let input = ids(cfg.vocab_size, b, t, seed);
    let logits = model.forward(&input).unwrap();
    let loss = next_token_loss(&logits, &input).unwrap();
    let want_loss = loss.to_scalar::<f32>().unwrap() as f64;
    let store = loss.backward().unwrap();

    let lean = LeanModel::from_varmap(cfg, &varmap).unwrap();
    let lean_logits = lean.logits(&input).unwrap();
    let e = max_rel_error(&lean_logits, &logits).unwrap();
    assert!(e <= LOGITS_TOL, "{}: logits off by {e:e}", cfg.name);
    let (got_loss, grads) = lean.loss_and_grads(&input, opts).unwrap();
    let le = (got_loss - want_loss).abs() / want_loss.abs();
    assert!(
        le <= LOSS_TOL,
        "{}: loss {got_loss} vs {want_loss} ({le:e})",
        cfg.name
    );
    let vars = vars(&varmap);
    assert_eq!(
        grads.keys().collect::<Vec<_>>(),
        vars.keys().collect::<Vec<_>>(),
        "{}: gradients for exactly the parameters",
        cfg.name
    );
    let max_abs = |t: &Tensor| -> f64 {
        t.abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap() as f64
    };
    let largest = vars
        .values()
        .map(|v| max_abs(store.get(v.as_tensor()).unwrap()))
        .fold(0.0, f64::max);
    let mut worst = (0.0f64, "");
    let mut above = Vec::new();
    for (name, var) in &vars {
        let want = store.get(var.as_tensor()).unwrap();
        // A gradient that is zero in exact arithmetic (a key bias: softmax ignores a shift
        // common to a row) is rounding noise in both; it is held to the model's largest gradient.
        let scale = max_abs(want).max(ZERO_GRAD * largest);
        let e = max_abs(&(&grads[name] - want).unwrap()) / scale;
        if e > GRAD_TOL {
            above.push((name, e));
        } else if e >= worst.0 {
            worst = (e, name);
        }
    }
    if !above.is_empty() {
        // Sandwich norms over a few channels can leave f32 with fewer digits than GRAD_TOL
        // asks of two engines that round differently: then both are held to candle's autograd
        // in f64 on the same weights, and the lean step must be at least as close to it as
        // candle's own f32 autograd is (a Gemma-like MoE with d = 5 gave 1.7e-5 for candle's
        // f32 and 9.3e-6 for the lean step). A gradient the f64 run also puts below ZERO_GRAD
        // of the largest is zero in exact arithmetic (a renormalised top-1 router: its weight is
        // 1 whatever the logits) and its value is f32 noise in both runs (the model routes in
        // f32 whatever its dtype, as HF does): the lean step must call it zero too. A small
        // gradient made of larger terms that nearly cancel (a key bias through a k norm: the
        // softmax's shift invariance, broken only by the norm) is known only to f32's
        // resolution of those terms: F32_NOISE of the largest gradient.
        let truth = autograd_f64(cfg, &varmap, &input);
        let f64_max = |t: &Tensor| max_abs(&t.to_dtype(DType::F32).unwrap());
        let largest64 = truth.values().map(f64_max).fold(0.0, f64::max);
        for (name, e) in above {
            let t64 = &truth[name.as_str()];
            let scale = f64_max(t64).max(ZERO_GRAD * largest64);
            let off =
                |g: &Tensor| f64_max(&(g.to_dtype(DType::F64).unwrap() - t64).unwrap()) / scale;
            let (lean_e, candle_e) = (
                off(&grads[name]),
                off(store.get(vars[name].as_tensor()).unwrap()),
            );
            let zero = ZERO_GRAD * largest64;
            let ok = if f64_max(t64) < zero {
                f64_max(&grads[name]) < zero
            } else {
                lean_e <= GRAD_TOL.max(candle_e) || lean_e * scale <= F32_NOISE * largest64
            };
            assert!(
                ok,
                "{}: gradient of {name} off by {e:e} from candle's f32 autograd; from its f64 \
                 autograd the lean step is {lean_e:e} off and candle's f32 {candle_e:e}",
                cfg.name
            );
            if lean_e >= worst.0 {
                worst = (lean_e, name);
            }
        }
    }
    eprintln!(
        "{} b{b} t{t} {opts:?}: worst gradient error {:.2e} ({})",
        cfg.name, worst.0, worst.1
    );
    grads
}

/// Every parameter's gradient from candle's autograd in f64, on `varmap`'s weights.
fn autograd_f64(cfg: &ModelConfig, varmap: &VarMap, input: &Tensor) -> BTreeMap<String, Tensor> {
    let (vm64, model64) = build::random(cfg, DType::F64, &Device::Cpu, 0).unwrap();
    let weights = vars(varmap);
    let vars64 = vars(&vm64);
    for (name, v) in &vars64 {
        v.set(&weights[name].as_tensor().to_dtype(DType::F64).unwrap())
            .unwrap();
    }
    let logits = model64.forward(input).unwrap();
    let store = next_token_loss(&logits, input).unwrap().backward().unwrap();
    vars64
        .into_iter()
        .map(|(name, v)| {
            let g = store.get(v.as_tensor()).unwrap().clone();
            (name, g)
        })
        .collect()
}

fn dims(v: usize, d: usize, l: usize, h: usize, kv: usize, hd: usize, ff: usize) -> Dims {
    Dims {
        vocab_size: v,
        block_size: 64,
        n_embd: d,
        n_layer: l,
        n_head: h,
        n_kv_head: kv,
        head_dim: hd,
        intermediate_size: ff,
    }
}

fn gpt2(v: usize, hd: usize, h: usize, l: usize, bias: bool, tie: bool) -> ModelConfig {
    let d = hd * h;
    let mut c = ModelConfig::plain(
        format!("gpt2 v{v} d{d} h{h} l{l} bias {bias} tie {tie}"),
        Arch::Gpt2,
        "gpt2",
        dims(v, d, l, h, h, hd, 4 * d),
    );
    c.bias = bias;
    c.tie_embeddings = tie;
    c
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    // Widths start at 4: with 2 channels a LayerNorm's output is ±1 whatever its input, so the
    // gradient through it vanishes analytically and both engines return rounding noise (a
    // 1.4e-5 relative difference was found at n_embd = 2).
    #[test]
    fn gpt2_gradients_equal_autograd(
        v in 11usize..90, hd in 4usize..9, h in 1usize..4, l in 1usize..3,
        bias in any::<bool>(), tie in any::<bool>(), b in 1usize..3, t in 2usize..13, seed in 0u64..1000,
    ) {
        check(&gpt2(v, hd, h, l, bias, tie), b, t, seed, &LeanOptions::default());
    }
}

/// The Llama skeleton's switches the lean step implements.
#[derive(Debug, Clone)]
struct LlamaSwitches {
    kv: usize,
    group: usize,
    half_hd: usize,
    d: usize,
    layers: usize,
    ff: usize,
    tie: bool,
    bias: bool,
    qkv_bias: bool,
    mlp_bias: bool,
    windows: Vec<Option<usize>>,
    experts: usize,
    top_k: usize,
    renormalize: bool,
    qwen_names: bool,
    dense_layer0: bool,
    geglu: bool,
    one_plus: bool,
    softcap: Option<f64>,
    llama3_rope: bool,
    pad: Option<usize>,
    qk_norm: bool,
    sandwich: bool,
    embedding_scale: bool,
    final_softcap: Option<f64>,
    qkv_fused: bool,
    gate_up_fused: bool,
    /// Rotated pairs per head when fewer than head_dim / 2 (partial rotary).
    rotary_pairs: Option<usize>,
    attn_scalar: Option<f64>,
}

fn llama_switches() -> impl Strategy<Value = LlamaSwitches> {
    (
        (
            1usize..3,
            1usize..4,
            1usize..5,
            4usize..24,
            1usize..3,
            4usize..20,
        ),
        (any::<bool>(), any::<bool>(), any::<bool>(), any::<bool>()),
        proptest::collection::vec(proptest::option::of(1usize..6), 2),
        (
            prop_oneof![Just(0usize), 2usize..5],
            1usize..4,
            any::<bool>(),
            any::<bool>(),
            any::<bool>(),
        ),
        (
            any::<bool>(),
            any::<bool>(),
            proptest::option::of(5.0f64..40.0),
            any::<bool>(),
            proptest::option::of(0usize..20),
        ),
        (
            any::<bool>(),
            any::<bool>(),
            any::<bool>(),
            proptest::option::of(2.0f64..30.0),
            any::<bool>(),
            any::<bool>(),
            proptest::option::of(1usize..4),
            proptest::option::of(1.0f64..64.0),
        ),
    )
        .prop_map(
            |(
                (kv, group, half_hd, d, layers, ff),
                (tie, bias, qkv_bias, mlp_bias),
                windows,
                (experts, top_k, renormalize, qwen_names, dense_layer0),
                (geglu, one_plus, softcap, llama3_rope, pad),
                (
                    qk_norm,
                    sandwich,
                    embedding_scale,
                    final_softcap,
                    qkv_fused,
                    gate_up_fused,
                    rotary_pairs,
                    attn_scalar,
                ),
            )| {
                LlamaSwitches {
                    kv,
                    group,
                    half_hd,
                    d,
                    layers,
                    ff,
                    tie,
                    bias,
                    qkv_bias,
                    mlp_bias,
                    windows: windows[..layers].to_vec(),
                    experts,
                    top_k: top_k.min(experts.max(1)),
                    renormalize,
                    qwen_names,
                    dense_layer0,
                    geglu,
                    one_plus,
                    softcap,
                    llama3_rope,
                    pad,
                    qk_norm,
                    sandwich,
                    embedding_scale,
                    final_softcap,
                    qkv_fused,
                    gate_up_fused,
                    rotary_pairs,
                    attn_scalar,
                }
            },
        )
}

fn llama(s: &LlamaSwitches) -> ModelConfig {
    let h = s.kv * s.group;
    // A q/k norm over 2 channels leaves one direction per head: the part of a key's gradient
    // along it is what remains after the radial part cancels, and for a short key (large rstd)
    // f32 keeps few digits of it (2.4e-5 between the lean step and f64, 1.7e-6 for candle's
    // f32, on the embedding of a 2-layer Gemma-like config): q/k norms get 4 channels or more.
    let half_hd = if s.qk_norm {
        s.half_hd.max(2)
    } else {
        s.half_hd
    };
    let hd = 2 * half_hd;
    let mut c = ModelConfig::plain(
        format!("{s:?}"),
        Arch::Llama,
        "llama",
        // n_head may not exceed n_embd
        dims(23, s.d.max(h), s.layers, h, s.kv, hd, s.ff),
    );
    c.tie_embeddings = s.tie;
    c.bias = s.bias;
    c.qkv_bias = s.qkv_bias;
    c.mlp_bias = s.mlp_bias;
    c.layer_attention = s
        .windows
        .iter()
        .map(|w| match w {
            Some(w) => AttnKind::Sliding { window: *w },
            None => AttnKind::Full,
        })
        .collect();
    if s.experts > 0 {
        c.mlp_bias = false;
        c.n_experts = s.experts;
        c.n_experts_per_tok = s.top_k;
        c.moe_renormalize = s.renormalize;
        c.moe_intermediate_size = s.ff + 2;
        if s.qwen_names {
            c.expert_names = ExpertNames::Qwen;
        }
        if s.dense_layer0 {
            c.moe_dense_layers = vec![0];
        }
    }
    if s.geglu {
        c.mlp = MlpKind::GeGlu;
    }
    if s.one_plus {
        c.norm = NormKind::RmsOnePlus;
    }
    c.attn_softcap = s.softcap;
    if s.llama3_rope {
        c.set_rope_theta(500_000.0);
        c.rope_scaling = Some(RopeScaling::Llama3(Llama3RopeScaling {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8,
        }));
    }
    c.pad_token_id = s.pad;
    c.qk_norm = s.qk_norm;
    if s.sandwich {
        c.norm_placement = NormPlacement::Sandwich;
    }
    if s.embedding_scale {
        c.embedding_scale = EmbeddingScale::SqrtHidden;
    }
    c.final_softcap = s.final_softcap;
    if s.qkv_fused {
        c.qkv_storage = Storage::Fused;
    }
    if s.gate_up_fused {
        c.gate_up_storage = Storage::Fused;
    }
    if let Some(p) = s.rotary_pairs {
        c.rotary_dim = 2 * p.min(half_hd);
    }
    if let Some(a) = s.attn_scalar {
        c.attn_scalar = a;
    }
    c
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn llama_family_gradients_equal_autograd(
        s in llama_switches(), b in 1usize..3, t in 2usize..11, seed in 0u64..1000,
    ) {
        check(&llama(&s), b, t, seed, &LeanOptions::default());
    }
}

/// Configs covering each family's switches at once, for the option tests.
fn zoo() -> Vec<ModelConfig> {
    let base = LlamaSwitches {
        kv: 2,
        group: 2,
        half_hd: 3,
        d: 12,
        layers: 2,
        ff: 10,
        tie: false,
        bias: false,
        qkv_bias: false,
        mlp_bias: false,
        windows: vec![None, None],
        experts: 0,
        top_k: 1,
        renormalize: true,
        qwen_names: false,
        dense_layer0: false,
        geglu: false,
        one_plus: false,
        softcap: None,
        llama3_rope: false,
        pad: None,
        qk_norm: false,
        sandwich: false,
        embedding_scale: false,
        final_softcap: None,
        qkv_fused: false,
        gate_up_fused: false,
        rotary_pairs: None,
        attn_scalar: None,
    };
    vec![
        gpt2(37, 4, 3, 2, true, true),
        gpt2(29, 6, 2, 2, false, false),
        llama(&base),
        llama(&LlamaSwitches {
            windows: vec![Some(3), None],
            qkv_bias: true,
            tie: true,
            ..base.clone()
        }),
        llama(&LlamaSwitches {
            experts: 4,
            top_k: 2,
            ..base.clone()
        }),
        // Qwen3-MoE: q/k norms and experts
        llama(&LlamaSwitches {
            experts: 4,
            top_k: 2,
            qwen_names: true,
            qk_norm: true,
            ..base.clone()
        }),
        // Gemma 2 / 3: sandwich norms, (1 + w), GeGLU, √d, soft-caps, local windows, q/k norms
        llama(&LlamaSwitches {
            windows: vec![Some(4), None],
            tie: true,
            geglu: true,
            one_plus: true,
            softcap: Some(20.0),
            sandwich: true,
            embedding_scale: true,
            final_softcap: Some(5.0),
            qk_norm: true,
            attn_scalar: Some(9.0),
            ..base.clone()
        }),
        // Phi-3: fused projections, partial rotary
        llama(&LlamaSwitches {
            qkv_fused: true,
            gate_up_fused: true,
            rotary_pairs: Some(2),
            windows: vec![Some(5), Some(5)],
            ..base.clone()
        }),
    ]
}

#[test]
fn checkpointed_blocks_give_the_same_gradients() {
    for cfg in zoo() {
        let plain = check(&cfg, 2, 9, 7, &LeanOptions::default());
        let ckpt = check(
            &cfg,
            2,
            9,
            7,
            &LeanOptions {
                checkpoint: Checkpoint::Blocks,
                ..LeanOptions::default()
            },
        );
        for (name, g) in &plain {
            let e = max_rel_error(&ckpt[name], g).unwrap();
            assert!(
                e <= 1e-6,
                "{}: {name} off by {e:e} with checkpointing",
                cfg.name
            );
        }
    }
}

#[test]
fn eager_attention_gives_the_same_gradients() {
    for cfg in zoo() {
        check(
            &cfg,
            2,
            9,
            11,
            &LeanOptions {
                attention: Attention::Eager,
                ..LeanOptions::default()
            },
        );
    }
}

/// HF-made checkpoints (tests/fixtures/*) through the lean step: HF's loss and every gradient
/// norm. Every fixture must run (none is refused).
#[test]
fn fixtures_reproduce_hf_loss_and_gradient_norms() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let mut dirs: Vec<_> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("config.json").is_file() && p.join("expected.json").is_file())
        .collect();
    dirs.sort();
    let mut ran = Vec::new();
    for dir in dirs {
        let name = dir.file_name().unwrap().to_string_lossy().to_string();
        let cfg = config::load(ConfigSource::Path(&dir)).unwrap();
        if let Err(why) = train::supported(&cfg, &LeanOptions::default()) {
            panic!("{name}: refused: {why}");
        }
        let refr = reference::load(&dir).unwrap();
        let loaded = build::from_checkpoint(&cfg, &dir, DType::F32, &Device::Cpu).unwrap();
        let lean = LeanModel::from_varmap(&cfg, &loaded.varmap).unwrap();
        let logits = lean.logits(&refr.input_ids).unwrap();
        let le = max_rel_error(&logits, &refr.logits).unwrap();
        assert!(le <= 1e-4, "{name}: logits off by {le:e}");
        let (loss, grads) = lean
            .loss_and_grads(&refr.input_ids, &LeanOptions::default())
            .unwrap();
        let want = refr.loss.unwrap();
        let e = (loss - want).abs() / want.abs();
        assert!(e <= 1e-5, "{name}: loss {loss} vs HF {want} ({e:e})");
        let norms = refr.grad_norm.as_ref().unwrap();
        for (p, want) in norms {
            let g = grads
                .get(p)
                .unwrap_or_else(|| panic!("{name}: no gradient for {p}"));
            let got = g
                .to_dtype(DType::F64)
                .unwrap()
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .sqrt()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap();
            let e = (got - want).abs() / want.abs().max(1e-12);
            assert!(
                e <= 1e-3,
                "{name}: grad norm of {p}: {got} vs HF {want} ({e:e})"
            );
        }
        assert_eq!(grads.len(), norms.len(), "{name}: gradient count");
        ran.push(name);
    }
    for must in [
        "tiny-gemma2",
        "tiny-gemma3",
        "tiny-gpt2",
        "tiny-llama",
        "tiny-mixtral",
        "tiny-phi3",
        "tiny-phi3-longrope",
        "tiny-qwen2",
        "tiny-qwen3",
        "tiny-qwen3-moe",
    ] {
        assert!(ran.iter().any(|r| r == must), "{must} did not run: {ran:?}");
    }
}

/// Each family's fixture config (Qwen3, Qwen3-MoE, Gemma 2, Gemma 3, Phi-3 with and without
/// LongRoPE and partial rotary) with random weights: the lean step against autograd, plain,
/// checkpointed and with eager attention, at a length beyond the sliding windows and LongRoPE's
/// original context.
#[test]
fn each_family_gradients_equal_autograd() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    for name in [
        "tiny-qwen3",
        "tiny-qwen3-moe",
        "tiny-gemma2",
        "tiny-gemma3",
        "tiny-phi3",
        "tiny-phi3-longrope",
    ] {
        let cfg = config::load(ConfigSource::Path(&root.join(name))).unwrap();
        for (b, t, opts) in [
            (2, 12, LeanOptions::default()),
            (
                1,
                5,
                LeanOptions {
                    checkpoint: Checkpoint::Blocks,
                    ..LeanOptions::default()
                },
            ),
            (
                2,
                10,
                LeanOptions {
                    attention: Attention::Eager,
                    ..LeanOptions::default()
                },
            ),
        ] {
            check(&cfg, b, t, 17, &opts);
        }
    }
}
