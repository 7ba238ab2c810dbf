//! Which kernels this CPU runs, decided once at run time from its features (the binary is
//! built for a baseline; the fast paths are `#[target_feature]` functions picked here).

use std::sync::OnceLock;

/// A family of kernels, from the most portable to the fastest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    /// Plain Rust, any CPU.
    Portable,
    /// x86-64 with AVX2, FMA and F16C: 8-bit products by `vpmaddubsw`.
    Avx2,
    /// x86-64 with AVX-512 VNNI (and VL): 8-bit products by `vpdpbusd`.
    Avx512Vnni,
}

impl Level {
    /// The kernels' name as printed in benchmarks and logs.
    pub fn name(self) -> &'static str {
        match self {
            Level::Portable => "portable",
            Level::Avx2 => "avx2+fma",
            Level::Avx512Vnni => "avx512-vnni",
        }
    }

    /// Every level this CPU can run, slowest first (tests compare each with the portable
    /// reference).
    pub fn available() -> Vec<Level> {
        [Level::Portable, Level::Avx2, Level::Avx512Vnni]
            .into_iter()
            .filter(|l| *l <= detect())
            .collect()
    }
}

/// The best level of this CPU; `RBEE_KERNELS=portable|avx2` caps it (to compare levels).
pub fn level() -> Level {
    static LEVEL: OnceLock<Level> = OnceLock::new();
    *LEVEL.get_or_init(|| {
        let best = detect();
        match std::env::var("RBEE_KERNELS").as_deref() {
            Ok("portable") => Level::Portable,
            Ok("avx2") => best.min(Level::Avx2),
            _ => best,
        }
    })
}

fn detect() -> Level {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
            && std::arch::is_x86_feature_detected!("f16c")
        {
            if std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512vnni")
                && std::arch::is_x86_feature_detected!("avx512vl")
                && std::arch::is_x86_feature_detected!("avx512bw")
            {
                return Level::Avx512Vnni;
            }
            return Level::Avx2;
        }
    }
    Level::Portable
}
