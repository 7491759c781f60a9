//! Element types of the KV cache: what keys and values are stored as, and how they widen back to
//! `f32` for attention.
//!
//! Activations are `f32` holding values exact in the compute dtype, so storing keys and values in that
//! dtype (bf16 for the published checkpoint) loses nothing: attention over a bf16 cache gives the same
//! bits as over an f32 one. The fp8 formats (OCP E4M3 "fn", as `torch.float8_e4m3fn`, and E5M2) lose
//! precision: values are scaled by 1.0 (vLLM's default when a checkpoint brings no KV scales), rounded
//! to nearest even and saturated to the format's largest finite value, as vLLM's conversion does.

/// One stored key or value element.
///
/// # Safety
/// All-zero bits must be a valid value of the type ([`zeroed`] relies on it): plain numbers only.
pub unsafe trait KvElem: Copy + Send + Sync + 'static {
    fn widen(self) -> f32;
}

/// `n` zero elements in freshly zeroed memory. A pool sized for the worst case costs only what is
/// written: the pages stay untouched until then (`vec![x; n]` would write every element of a type
/// the standard library does not know to be zero).
pub fn zeroed<E: KvElem>(n: usize) -> Vec<E> {
    let layout = std::alloc::Layout::array::<E>(n).expect("KV pool size overflows");
    if layout.size() == 0 {
        return Vec::new();
    }
    // SAFETY: the layout is non-empty; zero bits are a valid `E` (the trait's contract); the pointer
    // comes from the global allocator with `E`'s layout for exactly `n` elements, as `Vec` requires.
    unsafe {
        let p = std::alloc::alloc_zeroed(layout).cast::<E>();
        if p.is_null() {
            std::alloc::handle_alloc_error(layout);
        }
        Vec::from_raw_parts(p, n, n)
    }
}

// SAFETY: zero bits are 0.0.
unsafe impl KvElem for f32 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self
    }
}

/// bf16 bits.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(transparent)]
pub struct Bf16(pub u16);

// SAFETY: zero bits are +0.0.
unsafe impl KvElem for Bf16 {
    #[inline(always)]
    fn widen(self) -> f32 {
        crate::dtype::bf16_to_f32(self.0)
    }
}

/// IEEE half bits.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(transparent)]
pub struct F16(pub u16);

// SAFETY: zero bits are +0.0.
unsafe impl KvElem for F16 {
    #[inline(always)]
    fn widen(self) -> f32 {
        half::f16::from_bits(self.0).to_f32()
    }
}

/// An 8-bit float format: exponent and mantissa widths, and whether it has infinities (E5M2, IEEE
/// style) or spends its top code on NaN only (E4M3 "fn").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fp8Format {
    pub exp_bits: u32,
    pub man_bits: u32,
    pub ieee: bool,
}

pub const E4M3: Fp8Format = Fp8Format { exp_bits: 4, man_bits: 3, ieee: false };
pub const E5M2: Fp8Format = Fp8Format { exp_bits: 5, man_bits: 2, ieee: true };

impl Fp8Format {
    const fn bias(self) -> i32 {
        (1 << (self.exp_bits - 1)) - 1
    }

    /// The code of the largest finite magnitude: 0x7E (448) for E4M3, 0x7B (57344) for E5M2.
    pub const fn max_code(self) -> u8 {
        if self.ieee { ((((1u32 << self.exp_bits) - 2) << self.man_bits) | ((1 << self.man_bits) - 1)) as u8 } else { 0x7E }
    }

    /// The value of a code, exactly (every fp8 value is an f32).
    pub const fn decode(self, code: u8) -> f32 {
        let sign = ((code as u32) >> 7) << 31;
        let e = ((code as u32) >> self.man_bits) & ((1 << self.exp_bits) - 1);
        let m = (code as u32) & ((1 << self.man_bits) - 1);
        let e_max = (1 << self.exp_bits) - 1;
        let bits = if e == e_max && (self.ieee || m == (1 << self.man_bits) - 1) {
            if self.ieee && m == 0 { 0x7F80_0000 } else { 0x7FC0_0000 }
        } else if e == 0 {
            if m == 0 {
                0
            } else {
                // m * 2^(1 - bias - man_bits): normalise the mantissa.
                let lead = 31 - m.leading_zeros(); // position of m's top bit
                let exp = 1 - self.bias() - self.man_bits as i32 + lead as i32;
                let frac = (m & !(1 << lead)) << (23 - lead);
                (((exp + 127) as u32) << 23) | frac
            }
        } else {
            (((e as i32 - self.bias() + 127) as u32) << 23) | (m << (23 - self.man_bits))
        };
        f32::from_bits(sign | bits)
    }

    /// The nearest code (ties to even), saturating to the largest finite value; NaN stays NaN.
    pub fn encode(self, x: f32) -> u8 {
        let sign = if x.is_sign_negative() { 0x80u8 } else { 0 };
        if x.is_nan() {
            return sign | if self.ieee { 0x7E } else { 0x7F };
        }
        let a = x.abs();
        let min_normal = f32::from_bits(((1 - self.bias() + 127) as u32) << 23);
        let code = if a < min_normal {
            // Subnormal: a multiple of 2^(1 - bias - man_bits); the quotient is exact in f32.
            let step = f32::from_bits(((1 - self.bias() - self.man_bits as i32 + 127) as u32) << 23);
            (a / step).round_ties_even() as u32
        } else if a.is_infinite() {
            u32::MAX
        } else {
            let b = a.to_bits();
            let shift = 23 - self.man_bits;
            let (q, rem, half) = (b >> shift, b & ((1 << shift) - 1), 1u32 << (shift - 1));
            let q = if rem > half || (rem == half && q & 1 == 1) { q + 1 } else { q };
            q - (((127 - self.bias()) as u32) << self.man_bits)
        };
        sign | code.min(self.max_code() as u32) as u8
    }

    /// Every code's value.
    pub const fn table(self) -> [f32; 256] {
        let mut t = [0f32; 256];
        let mut i = 0;
        while i < 256 {
            t[i] = self.decode(i as u8);
            i += 1;
        }
        t
    }
}

static E4M3_TABLE: [f32; 256] = E4M3.table();
static E5M2_TABLE: [f32; 256] = E5M2.table();

/// An fp8 E4M3 code.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(transparent)]
pub struct Fp8E4m3(pub u8);

// SAFETY: code 0 is +0.0.
unsafe impl KvElem for Fp8E4m3 {
    #[inline(always)]
    fn widen(self) -> f32 {
        E4M3_TABLE[self.0 as usize]
    }
}

/// An fp8 E5M2 code.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(transparent)]
pub struct Fp8E5m2(pub u8);

// SAFETY: code 0 is +0.0.
unsafe impl KvElem for Fp8E5m2 {
    #[inline(always)]
    fn widen(self) -> f32 {
        E5M2_TABLE[self.0 as usize]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zeroed_pools_read_as_zero() {
        assert!(zeroed::<Bf16>(1000).iter().all(|x| x.widen() == 0.0));
        assert!(zeroed::<Fp8E4m3>(3).iter().all(|x| x.widen() == 0.0));
        assert!(zeroed::<f32>(0).is_empty());
    }

    #[test]
    fn e4m3_values_are_torch_float8_e4m3fn() {
        assert_eq!(E4M3.decode(0x7E), 448.0);
        assert!(E4M3.decode(0x7F).is_nan());
        assert_eq!(E4M3.decode(0x08), 2f32.powi(-6)); // smallest normal
        assert_eq!(E4M3.decode(0x01), 2f32.powi(-9)); // smallest subnormal
        assert_eq!(E4M3.decode(0x07), 7.0 * 2f32.powi(-9));
        assert_eq!(E4M3.decode(0x38), 1.0);
        assert_eq!(E4M3.decode(0xB8), -1.0);
        assert_eq!(E4M3.decode(0x3C), 1.5);
    }

    #[test]
    fn e5m2_values_are_ieee_like() {
        assert_eq!(E5M2.decode(0x7B), 57344.0);
        assert_eq!(E5M2.decode(0x7C), f32::INFINITY);
        assert!(E5M2.decode(0x7D).is_nan());
        assert_eq!(E5M2.decode(0x3C), 1.0);
        assert_eq!(E5M2.decode(0x01), 2f32.powi(-16));
    }

    #[test]
    fn every_finite_code_round_trips() {
        for f in [E4M3, E5M2] {
            for c in 0..=255u8 {
                let v = f.decode(c);
                if v.is_finite() && (c & 0x7F) <= f.max_code() {
                    let back = f.encode(v);
                    // -0 and +0 are both zero; otherwise the code comes back.
                    assert!(back == c || (v == 0.0 && back & 0x7F == 0), "{f:?} code {c:#x} -> {v} -> {back:#x}");
                }
            }
        }
    }

    #[test]
    fn encode_rounds_to_nearest_even_and_saturates() {
        // Between 1.0 (0x38) and 1.125 (0x39): the midpoint goes to the even code.
        assert_eq!(E4M3.encode(1.0625), 0x38);
        assert_eq!(E4M3.encode(1.0626), 0x39);
        // Between 1.125 and 1.25 (0x3A): the tie goes up to the even code.
        assert_eq!(E4M3.encode(1.1875), 0x3A);
        assert_eq!(E4M3.encode(460.0), 0x7E);
        assert_eq!(E4M3.encode(1e9), 0x7E);
        assert_eq!(E4M3.encode(-1e9), 0xFE);
        assert_eq!(E4M3.encode(f32::INFINITY), 0x7E);
        assert_eq!(E5M2.encode(1e9), 0x7B);
        // Subnormals: half of the smallest rounds to zero (even), three halves to two.
        assert_eq!(E4M3.encode(2f32.powi(-10)), 0x00);
        assert_eq!(E4M3.encode(3.0 * 2f32.powi(-10)), 0x02);
        // Rounding up out of the subnormals lands on the smallest normal.
        assert_eq!(E4M3.encode(7.6 * 2f32.powi(-9)), 0x08);
    }

    #[test]
    fn encode_is_nearest() {
        // Against a brute-force search over all codes, on a sweep of magnitudes.
        for f in [E4M3, E5M2] {
            let max = f.decode(f.max_code());
            let mut x = 1e-6f32;
            while x < max {
                let code = f.encode(x);
                let err = (f.decode(code) - x).abs();
                for c in 0..=f.max_code() {
                    assert!((f.decode(c) - x).abs() >= err, "{f:?}: {x} -> {code:#x}, but {c:#x} is nearer");
                }
                x *= 1.037;
            }
        }
    }
}
