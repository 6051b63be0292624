//! Machine facts the allocator sees: threads, the L2 size gemm reads, the SIMD width.

/// gemm-common 0.19 `CACHE_INFO_DEFAULT`'s L2 (cache.rs:402) when sysfs says nothing: 256 KiB.
const DEFAULT_L2_BYTES: u64 = 256 * 1024;

/// What the CPU backend's allocations depend on beyond shapes.
#[derive(Debug, Clone, Copy)]
pub struct Machine {
    /// candle's `get_num_threads()`: RAYON_NUM_THREADS or the core count.
    pub threads: u64,
    /// gemm's per-thread L2 slab: L2 bytes / CPUs sharing it (gemm-common cache.rs).
    pub l2_bytes: u64,
    /// f32 SIMD lanes of gemm's kernel (16 with AVX-512F, 8 with FMA/AVX2).
    pub gemm_lanes: u64,
    /// gemm's microkernel rows MR (3 vectors of lanes in gemm-f32's x86 kernels).
    pub gemm_mr: u64,
}

impl Machine {
    pub fn detect() -> Machine {
        let threads = std::env::var("RAYON_NUM_THREADS")
            .ok()
            .and_then(|s| s.parse::<u64>().ok())
            .filter(|&x| x > 0)
            .or_else(|| {
                std::thread::available_parallelism()
                    .ok()
                    .map(|n| n.get() as u64)
            })
            .unwrap_or(1);
        let lanes = if avx512() { 16 } else { 8 };
        Machine {
            threads,
            l2_bytes: l2_from_sysfs().unwrap_or(DEFAULT_L2_BYTES),
            gemm_lanes: lanes,
            gemm_mr: 3 * lanes,
        }
    }
}

fn avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// gemm-common's reading of the L2: `size` of the level-2 Data/Unified cache divided by the
/// number of CPUs in its `shared_cpu_list`.
fn l2_from_sysfs() -> Option<u64> {
    let dir = std::path::Path::new("/sys/devices/system/cpu/cpu0/cache");
    for entry in std::fs::read_dir(dir).ok()? {
        let p = entry.ok()?.path();
        let read = |f: &str| std::fs::read_to_string(p.join(f)).ok();
        if read("level").map(|s| s.trim().to_string()) != Some("2".into()) {
            continue;
        }
        let ty = read("type").unwrap_or_default();
        if !matches!(ty.trim(), "Data" | "Unified") {
            continue;
        }
        let size = read("size")?;
        let s = size.trim();
        let (num, mul) = match s.chars().last()? {
            'K' => (&s[..s.len() - 1], 1u64 << 10),
            'M' => (&s[..s.len() - 1], 1 << 20),
            'G' => (&s[..s.len() - 1], 1 << 30),
            _ => (s, 1),
        };
        let bytes = num.parse::<u64>().ok()? * mul;
        let shared: u64 = read("shared_cpu_list")
            .unwrap_or_default()
            .trim()
            .split(',')
            .filter(|x| !x.is_empty())
            .map(|item| match item.split_once('-') {
                Some((a, b)) => match (a.parse::<u64>(), b.parse::<u64>()) {
                    (Ok(a), Ok(b)) => b + 1 - a,
                    _ => 1,
                },
                None => 1,
            })
            .sum();
        return Some(bytes / shared.max(1));
    }
    None
}
