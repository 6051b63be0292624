//! Inner loops written so that LLVM vectorises them: fixed-width lanes of independent f32
//! accumulators (a float sum is only reordered when the code says so), no branches, no index
//! arithmetic (the crate's release builds keep overflow checks), and an exp made of
//! multiplications and bit operations instead of a libm call.
//!
//! The default x86-64 target has SSE2 only; `multiversion!` compiles a kernel a second and third
//! time with AVX-512 / AVX2 enabled and picks one at run time.

/// Lanes of the accumulators: one AVX-512 register of f32.
pub const LANES: usize = 16;

/// Σ a·b.
#[inline(always)]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0f32; LANES];
    let (ca, ta) = a.as_chunks::<LANES>();
    let (cb, tb) = b.as_chunks::<LANES>();
    for (x, y) in ca.iter().zip(cb) {
        for l in 0..LANES {
            acc[l] += x[l] * y[l];
        }
    }
    let mut tail = 0f32;
    for (x, y) in ta.iter().zip(tb) {
        tail += x * y;
    }
    hsum(&acc) + tail
}

/// Σ a.
#[inline(always)]
pub fn sum(a: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let (ca, ta) = a.as_chunks::<LANES>();
    for x in ca {
        for l in 0..LANES {
            acc[l] += x[l];
        }
    }
    hsum(&acc) + ta.iter().sum::<f32>()
}

/// max a (−∞ for an empty slice).
#[inline(always)]
pub fn max(a: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let (ca, ta) = a.as_chunks::<LANES>();
    for x in ca {
        for l in 0..LANES {
            acc[l] = acc[l].max(x[l]);
        }
    }
    let m = acc.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
    ta.iter().fold(m, |m, &x| m.max(x))
}

#[inline(always)]
fn hsum(acc: &[f32; LANES]) -> f32 {
    // Pairwise, as the lanes of a register are reduced.
    let mut h = *acc;
    let mut w = LANES / 2;
    while w > 0 {
        for l in 0..w {
            h[l] += h[l + w];
        }
        w /= 2;
    }
    h[0]
}

/// y += a·x.
#[inline(always)]
pub fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
    for (y, x) in y.iter_mut().zip(x) {
        *y += a * x;
    }
}

/// e^x in f32, within 2 ulp of libm's for x ≥ −87.33 (where e^x is a normal f32); 0 below.
/// Cephes' expf: x = n·ln2 + r with |r| ≤ ln2/2, e^r by a degree-7 polynomial, 2^n put in the
/// exponent bits.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding 1.5·2^23 rounds to an integer and leaves it in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    const LO: f32 = -87.33;
    const HI: f32 = 88.72;
    let xc = x.clamp(LO, HI);
    let k = xc * LOG2E + ROUND;
    let n = k - ROUND;
    let r = xc - n * LN2_HI - n * LN2_LO;
    let r2 = r * r;
    let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 1.666_666_5e-1)
        * r
        + 0.5;
    let er = p * r2 + r + 1.0;
    let bits = k.to_bits().wrapping_sub(ROUND.to_bits()).wrapping_add(127) << 23;
    let y = er * f32::from_bits(bits);
    if x < LO {
        0.0
    } else {
        y
    }
}

/// 1 / (1 + e^−x).
#[inline(always)]
pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp(-x))
}

/// tanh x = 1 − 2 / (e^{2x} + 1), with the odd symmetry taken so the subtraction never cancels
/// for large |x| and a short series near 0 where it would.
#[inline(always)]
pub fn tanh(x: f32) -> f32 {
    let a = x.abs();
    let e = exp(-2.0 * a);
    let big = (1.0 - e) / (1.0 + e);
    // For |x| < 0.0625 the quotient loses bits to cancellation: tanh's series, error < 1e-9.
    let x2 = a * a;
    let small = a * (1.0 + x2 * (-1.0 / 3.0 + x2 * (2.0 / 15.0 + x2 * (-17.0 / 315.0))));
    let t = if a < 0.0625 { small } else { big };
    if x < 0.0 {
        -t
    } else {
        t
    }
}

/// Defines `fn name(args) -> ret` whose body is compiled three times (AVX-512, AVX2+FMA and the
/// baseline) and picks the widest the CPU has, once per call. Kernels call it per row block or
/// per head, so the check (a cached atomic load) costs nothing measurable.
macro_rules! multiversion {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident : $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$m])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn inner($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
                fn avx512($($arg: $ty),*) $(-> $ret)? { inner($($arg),*) }
                #[target_feature(enable = "avx2,fma")]
                fn avx2($($arg: $ty),*) $(-> $ret)? { inner($($arg),*) }
                if std::is_x86_feature_detected!("avx512f")
                    && std::is_x86_feature_detected!("avx512vl")
                {
                    // SAFETY: the CPU has the features `avx512` was compiled for.
                    return unsafe { avx512($($arg),*) };
                }
                if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                    // SAFETY: the CPU has the features `avx2` was compiled for.
                    return unsafe { avx2($($arg),*) };
                }
            }
            inner($($arg),*)
        }
    };
}
pub(crate) use multiversion;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_and_tanh_match_libm() {
        let mut worst_exp = 0f64;
        let mut worst_tanh = 0f64;
        let mut x = -100f32;
        while x < 88.0 {
            let (e, r) = (exp(x) as f64, (x as f64).exp());
            if r > 1e-37 {
                let err = ((e - r) / r).abs();
                assert!(err < 4e-7, "exp({x}) = {e}, libm {r}");
                worst_exp = worst_exp.max(err);
            } else {
                assert!(e <= 1e-37, "exp({x}) = {e}");
            }
            if x.abs() < 20.0 {
                let (t, r) = (tanh(x) as f64, (x as f64).tanh());
                worst_tanh = worst_tanh.max(((t - r) / r.abs().max(1e-30)).abs());
            }
            x += 0.001_37;
        }
        assert!(worst_exp < 4e-7, "exp: worst relative error {worst_exp:e}");
        assert!(
            worst_tanh < 1e-6,
            "tanh: worst relative error {worst_tanh:e}"
        );
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(tanh(0.0), 0.0);
    }

    #[test]
    fn reductions_match_plain_loops() {
        let a: Vec<f32> = (0..37).map(|i| (i as f32 * 0.37).sin()).collect();
        let b: Vec<f32> = (0..37).map(|i| (i as f32 * 0.11).cos()).collect();
        let d: f64 = a.iter().zip(&b).map(|(x, y)| (x * y) as f64).sum();
        assert!((dot(&a, &b) as f64 - d).abs() < 1e-5);
        let s: f64 = a.iter().map(|&x| x as f64).sum();
        assert!((sum(&a) as f64 - s).abs() < 1e-5);
        let m = a.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        assert_eq!(max(&a), m);
        let mut y = b.clone();
        axpy(&mut y, 2.0, &a);
        for i in 0..37 {
            assert_eq!(y[i], b[i] + 2.0 * a[i]);
        }
    }
}
