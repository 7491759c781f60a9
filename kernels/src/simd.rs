//! Plain Rust loops compiled for AVX-512 where the CPU has it.
//!
//! [`avx512`] runs a closure inside a function built with AVX-512F/DQ enabled, so loops the closure
//! inlines (`#[inline(always)]` bodies) are vectorised with 512-bit registers; elsewhere the closure
//! runs as it is. The numbers are the same either way: Rust never contracts `a * b + c` into an FMA,
//! and lane-wise f32/f64 arithmetic rounds the same at any vector width.

/// Runs `f`, vectorised for AVX-512 when the CPU has AVX-512F and DQ.
#[inline(always)]
pub fn avx512<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("avx512dq") {
        // SAFETY: the CPU has the features the function is compiled for.
        return unsafe { run_avx512(f) };
    }
    f()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512dq")]
unsafe fn run_avx512<R>(f: impl FnOnce() -> R) -> R {
    f()
}
