//! The CPU-feature check behind an artifact's `cpu_features` list: an x86-64 artifact names the
//! features its code uses (as `is_x86_feature_detected!` spells them) and is refused on a CPU
//! without one of them.

/// Whether this CPU has the named x86 feature (names as `is_x86_feature_detected!` spells them).
/// `None` for a name this runtime does not know.
pub fn cpu_has(feature: &str) -> Option<bool> {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        Some(match feature {
            "sse2" => has!("sse2"),
            "sse3" => has!("sse3"),
            "ssse3" => has!("ssse3"),
            "sse4.1" => has!("sse4.1"),
            "sse4.2" => has!("sse4.2"),
            "popcnt" => has!("popcnt"),
            "cmpxchg16b" => has!("cmpxchg16b"),
            "movbe" => has!("movbe"),
            "avx512cd" => has!("avx512cd"),
            "avx512ifma" => has!("avx512ifma"),
            "avx512vbmi2" => has!("avx512vbmi2"),
            "avx512bf16" => has!("avx512bf16"),
            "avx512fp16" => has!("avx512fp16"),
            "gfni" => has!("gfni"),
            "vaes" => has!("vaes"),
            "vpclmulqdq" => has!("vpclmulqdq"),
            "avx" => has!("avx"),
            "avx2" => has!("avx2"),
            "fma" => has!("fma"),
            "bmi1" => has!("bmi1"),
            "bmi2" => has!("bmi2"),
            "lzcnt" => has!("lzcnt"),
            "f16c" => has!("f16c"),
            "avx512f" => has!("avx512f"),
            "avx512vl" => has!("avx512vl"),
            "avx512dq" => has!("avx512dq"),
            "avx512bw" => has!("avx512bw"),
            "avx512vnni" => has!("avx512vnni"),
            "avx512bitalg" => has!("avx512bitalg"),
            "avx512vbmi" => has!("avx512vbmi"),
            "avx512vpopcntdq" => has!("avx512vpopcntdq"),
            "avxvnni" => has!("avxvnni"),
            _ => return None,
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = feature;
        Some(false)
    }
}
