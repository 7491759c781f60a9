//! Plain Rust loops compiled for the widest vectors the chosen kernel path has.
//!
//! [`vectorized`] runs a closure inside a function built with AVX-512F/DQ (paths `avx512`,
//! `avx512bf16`, `amx`) or AVX2 (path `avx2`) enabled, so loops the closure inlines (`#[inline(always)]`
//! bodies) are vectorised with 512- or 256-bit registers; on the portable path the closure runs as it
//! is. Callers use the [`vectorized!`](crate::vectorized) macro, which makes the closure
//! `#[inline(always)]` too: otherwise LLVM may keep it a function of its own, compiled for the
//! baseline (SSE2), as it did for every elementwise pass of a prefill until 2026-12-07. The numbers
//! are the same either way: Rust never contracts `a * b + c` into an FMA, and lane-wise f32/f64
//! arithmetic rounds the same at any vector width.

#[cfg(target_arch = "x86_64")]
use crate::isa::{Isa, isa};

/// Evaluates `$body` vectorised for the chosen path: [`vectorized`] with the body in an
/// `#[inline(always)]` closure, so that it is compiled into the wide function (call this, not the
/// function: a closure without the attribute may stay a function of its own, built for SSE2).
/// `vectorized!(a.iter_mut().for_each(|x| *x *= 2.0))`.
#[macro_export]
macro_rules! vectorized {
    ($body:expr $(,)?) => {
        $crate::simd::vectorized(
            #[inline(always)]
            || $body,
        )
    };
}

/// Runs `f`, vectorised for the chosen path; through [`vectorized!`](crate::vectorized), which inlines
/// the closure.
#[doc(hidden)]
#[inline(always)]
pub fn vectorized<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    match isa() {
        Isa::Avx512 | Isa::Avx512Bf16 | Isa::Amx if crate::isa::avx512_elementwise() => {
            // SAFETY: the CPU has the features the function is compiled for.
            return unsafe { run_avx512(f) };
        }
        // AVX2 is part of every path past portable (the AVX-512 ones require it too).
        Isa::Avx2 | Isa::Avx512 | Isa::Avx512Bf16 | Isa::Amx => {
            // SAFETY: as above.
            return unsafe { run_avx2(f) };
        }
        Isa::Portable | Isa::Neon => {}
    }
    f()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512dq")]
unsafe fn run_avx512<R>(f: impl FnOnce() -> R) -> R {
    f()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn run_avx2<R>(f: impl FnOnce() -> R) -> R {
    f()
}

/// A hint to bring the cache line holding `p` into L1 (a no-op off x86-64). It reads nothing: any
/// address is allowed, and one that is not mapped is ignored, never a fault.
#[inline(always)]
pub fn prefetch<T>(p: *const T) {
    hint::<false, T>(p)
}

/// [`prefetch`] into L2 only (`prefetcht1`): for lines wanted later than the next few microseconds,
/// which L1 would evict first. A no-op off x86-64; any address is allowed.
#[inline(always)]
pub fn prefetch_l2<T>(p: *const T) {
    hint::<true, T>(p)
}

#[inline(always)]
fn hint<const L2: bool, T>(p: *const T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `prefetcht0` and `prefetcht1` are SSE (baseline on x86-64) and access no memory.
    unsafe {
        use std::arch::x86_64::{_MM_HINT_T0, _MM_HINT_T1, _mm_prefetch};
        if L2 { _mm_prefetch::<_MM_HINT_T1>(p as *const i8) } else { _mm_prefetch::<_MM_HINT_T0>(p as *const i8) }
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}
