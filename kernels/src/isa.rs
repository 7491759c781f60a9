//! Which instruction-set path the kernels take, chosen once per process.
//!
//! | path | needs | bf16 x bf16 products | other products, elementwise passes |
//! |---|---|---|---|
//! | `amx` | `avx512bf16` + AMX-TILE/AMX-BF16, and the tile state granted by Linux | `tdpbf16ps` on 16x16 tiles | as `avx512bf16` |
//! | `avx512bf16` | AVX-512F/BW + AVX512-BF16 | `vdpbf16ps` | 512-bit FMA, loops vectorised for AVX-512 |
//! | `avx512` | AVX-512F/BW | the pair-order kernel on AVX2 + FMA | 512-bit FMA, loops vectorised for AVX-512 |
//! | `avx2` | AVX2 + FMA + F16C (x86-64-v3) | the pair-order kernel on AVX2 + FMA | 256-bit FMA in the 16-lane order of the 512-bit kernels, loops vectorised for AVX2 |
//! | `neon` | aarch64 (NEON is baseline) | the pair-order kernel on 128-bit FMA | 128-bit FMA in the same 16-lane order; elementwise loops as the compiler vectorises them |
//! | `portable` | nothing | the pair-order sum, one scalar at a time | scalar, 16 lanes, no FMA |
//!
//! The best path the CPU supports is taken unless `SWITCHYARD_KERNELS` names another (one the CPU
//! supports: a test or a benchmark runs every path a machine has this way). The variable is read once,
//! the first time a kernel runs or [`select`] is called; binaries call [`select`] at start and print
//! the result, so a bad value fails there, with the paths this CPU offers.
//!
//! Numerics: bf16 weights with bf16 activations give bit-identical results on every path but `amx`
//! (each output is summed over k-pairs in order, as `vdpbf16ps` and oneDNN's bf16 GEMM do). `amx`
//! takes `tdpbf16ps`, which rounds inside a tile unlike a chain of `vdpbf16ps` (about one bf16 output
//! in several thousand differs by one step); it does so for every batch size, so it is batch-invariant
//! like the others, and it is the order PyTorch's oneDNN GEMM takes on these CPUs for batched inputs. Elementwise passes give
//! the same results on every path (no contraction to FMA, lane-wise rounding). f32 and f16 weights give
//! the same results on `avx512bf16`, `avx512`, `avx2` and `neon` (FMA over the same 16 lanes, the same
//! reduction tree); `portable` rounds each product before adding it.

use std::sync::OnceLock;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Isa {
    Portable,
    Neon,
    Avx2,
    Avx512,
    Avx512Bf16,
    Amx,
}

impl Isa {
    pub const ALL: [Isa; 6] = [Isa::Portable, Isa::Neon, Isa::Avx2, Isa::Avx512, Isa::Avx512Bf16, Isa::Amx];

    pub fn name(self) -> &'static str {
        match self {
            Isa::Portable => "portable",
            Isa::Neon => "neon",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
            Isa::Avx512Bf16 => "avx512bf16",
            Isa::Amx => "amx",
        }
    }

    pub fn parse(s: &str) -> Option<Isa> {
        Isa::ALL.into_iter().find(|i| i.name() == s.trim().to_ascii_lowercase())
    }

    /// Whether this CPU can run the path.
    pub fn is_supported(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            let v3 = has!("avx2") && has!("fma") && has!("f16c");
            match self {
                Isa::Portable => true,
                Isa::Neon => false,
                Isa::Avx2 => v3,
                Isa::Avx512 => v3 && has!("avx512f") && has!("avx512bw"),
                Isa::Avx512Bf16 => v3 && has!("avx512f") && has!("avx512bw") && has!("avx512bf16"),
                Isa::Amx => Isa::Avx512Bf16.is_supported() && amx_tiles(),
            }
        }
        #[cfg(target_arch = "aarch64")]
        {
            matches!(self, Isa::Portable | Isa::Neon)
        }
        #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
        {
            self == Isa::Portable
        }
    }

    /// Whether the path multiplies bf16 pairs with `vdpbf16ps` semantics on 512-bit registers (and so
    /// wants bf16 activations and pair-interleaved panels): `avx512bf16`, and `amx` for its k tails.
    pub fn has_avx512_bf16(self) -> bool {
        matches!(self, Isa::Avx512Bf16 | Isa::Amx)
    }

    /// The order this path sums bf16 x bf16 products in, as a name: `pairs` on every path but `amx`
    /// (they give the same bits), `tdpbf16ps` there. Cluster workers register it so that the
    /// coordinator can tell when outputs would depend on which machine computed them.
    pub fn bf16_order(self) -> &'static str {
        if self == Isa::Amx { "tdpbf16ps" } else { "pairs" }
    }

    /// Every path this CPU supports, slowest first.
    pub fn supported() -> Vec<Isa> {
        Isa::ALL.into_iter().filter(|i| i.is_supported()).collect()
    }

    /// The best path this CPU supports.
    pub fn best() -> Isa {
        Isa::supported().into_iter().next_back().unwrap_or(Isa::Portable)
    }
}

impl std::fmt::Display for Isa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// AMX-TILE and AMX-BF16 in CPUID, and Linux's grant of the tile data state to this process
/// (`arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`, asked once; the grant covers every thread).
#[cfg(target_arch = "x86_64")]
fn amx_tiles() -> bool {
    static GRANTED: OnceLock<bool> = OnceLock::new();
    *GRANTED.get_or_init(|| {
        // CPUID leaf 7, sub-leaf 0: EDX bit 22 is AMX-BF16, bit 24 AMX-TILE (is_x86_feature_detected! does
        // not offer them on stable Rust).
        let ext = std::arch::x86_64::__cpuid_count(7, 0);
        if (ext.edx >> 22) & 1 == 0 || (ext.edx >> 24) & 1 == 0 {
            return false;
        }
        if !cfg!(target_os = "linux") {
            return false;
        }
        const ARCH_REQ_XCOMP_PERM: i64 = 0x1023;
        const XFEATURE_XTILEDATA: i64 = 18;
        const SYS_ARCH_PRCTL: i64 = 158;
        let ret: i64;
        // SAFETY: the arch_prctl system call with two integer arguments; it reads and writes no memory of
        // ours, and the syscall instruction clobbers only rax (the result), rcx and r11.
        unsafe {
            std::arch::asm!("syscall", inlateout("rax") SYS_ARCH_PRCTL => ret, in("rdi") ARCH_REQ_XCOMP_PERM,
                            in("rsi") XFEATURE_XTILEDATA, lateout("rcx") _, lateout("r11") _, options(nostack));
        }
        ret == 0
    })
}

/// Whether the CPU is AMD's (CPUID leaf 0's vendor string is `AuthenticAMD`). A few kernel choices
/// that give the same bits either way measured faster one way on AMD's cores and the other on
/// Intel's; they go by this.
#[cfg(target_arch = "x86_64")]
pub fn is_amd() -> bool {
    static AMD: OnceLock<bool> = OnceLock::new();
    *AMD.get_or_init(|| {
        let v = std::arch::x86_64::__cpuid(0);
        let mut id = [0u8; 12];
        for (i, r) in [v.ebx, v.edx, v.ecx].into_iter().enumerate() {
            id[4 * i..4 * i + 4].copy_from_slice(&r.to_le_bytes());
        }
        &id == b"AuthenticAMD"
    })
}

/// Whether the chosen path is an AVX-512 one and the CPU also has AVX-512DQ: the elementwise passes
/// ([`crate::simd`]) and the vector `exp` ([`crate::ops::exp_shifted`]) then run their 512-bit builds,
/// which use DQ's conversions. Every AVX-512 CPU the paths target has DQ; the check keeps one without
/// it on the 256-bit builds.
#[cfg(target_arch = "x86_64")]
#[inline]
pub fn avx512_elementwise() -> bool {
    matches!(isa(), Isa::Avx512 | Isa::Avx512Bf16 | Isa::Amx) && std::arch::is_x86_feature_detected!("avx512dq")
}

static CHOSEN: OnceLock<Result<Isa, String>> = OnceLock::new();

fn choose() -> Result<Isa, String> {
    let requested = match std::env::var("SWITCHYARD_KERNELS") {
        Ok(v) if !v.is_empty() => Some(v),
        // The older spelling of `SWITCHYARD_KERNELS=portable`.
        _ if std::env::var_os("SWITCHYARD_PORTABLE_KERNELS").is_some() => Some("portable".to_string()),
        _ => None,
    };
    let Some(v) = requested else { return Ok(Isa::best()) };
    let offered = Isa::supported().iter().map(|i| i.name()).collect::<Vec<_>>().join(", ");
    match Isa::parse(&v) {
        Some(i) if i.is_supported() => Ok(i),
        Some(i) => Err(format!("SWITCHYARD_KERNELS={i}: this CPU does not support that path (it offers: {offered})")),
        None => Err(format!(
            "SWITCHYARD_KERNELS={v}: not a kernel path (one of portable, neon, avx2, avx512, avx512bf16, amx; this CPU offers: {offered})"
        )),
    }
}

/// The path chosen for this process, or why `SWITCHYARD_KERNELS` cannot be honoured.
pub fn select() -> Result<Isa, String> {
    CHOSEN.get_or_init(choose).clone()
}

/// The path the kernels run. An unusable `SWITCHYARD_KERNELS` (which [`select`] reports) falls back to
/// the best supported path.
#[inline]
pub fn isa() -> Isa {
    match CHOSEN.get_or_init(choose) {
        Ok(i) => *i,
        Err(_) => Isa::best(),
    }
}

/// The CPU features the paths depend on that this CPU has, for logs and benchmark reports.
pub fn cpu_features() -> String {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        let all = [
            ("avx2", has!("avx2")),
            ("fma", has!("fma")),
            ("f16c", has!("f16c")),
            ("avx512f", has!("avx512f")),
            ("avx512bw", has!("avx512bw")),
            ("avx512bf16", has!("avx512bf16")),
            ("amx", Isa::Amx.is_supported()),
        ];
        all.iter().filter(|(_, on)| *on).map(|(n, _)| *n).collect::<Vec<_>>().join(" ")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        String::from(std::env::consts::ARCH)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_portable_is_always_there() {
        for i in Isa::ALL {
            assert_eq!(Isa::parse(i.name()), Some(i));
        }
        assert_eq!(Isa::parse("AVX2"), Some(Isa::Avx2));
        assert_eq!(Isa::parse("sse"), None);
        assert_eq!(Isa::supported()[0], Isa::Portable);
        assert!(Isa::best().is_supported());
    }

    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    #[test]
    fn vendor_matches_the_kernels_report() {
        let info = std::fs::read_to_string("/proc/cpuinfo").unwrap();
        let vendor = info.lines().find_map(|l| l.strip_prefix("vendor_id")).map(|v| v.trim_start_matches([' ', '\t', ':']).trim());
        assert_eq!(is_amd(), vendor == Some("AuthenticAMD"), "vendor_id {vendor:?}");
    }
}
