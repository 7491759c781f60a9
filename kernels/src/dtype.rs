//! Element types of checkpoints and activations, and the rounding that emulates them in `f32`.

use half::f16;

/// A floating-point element type a checkpoint may store and the model may compute in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    BF16,
    F16,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::BF16 | DType::F16 => 2,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "float32",
            DType::BF16 => "bfloat16",
            DType::F16 => "float16",
        }
    }

    /// The dtype a config names (`bfloat16`, `float16`, `float32`, and PyTorch's short spellings).
    pub fn from_name(name: &str) -> Option<DType> {
        match name.trim_start_matches("torch.") {
            "bfloat16" | "bf16" => Some(DType::BF16),
            "float16" | "half" | "fp16" | "f16" => Some(DType::F16),
            "float32" | "float" | "fp32" | "f32" => Some(DType::F32),
            _ => None,
        }
    }

    /// Encodes `vals` (rounded to nearest even) into a little-endian buffer of this dtype.
    pub fn encode_into(self, vals: &[f32], bytes: &mut [u8]) {
        assert!(bytes.len() >= vals.len() * self.size(), "buffer too short for {} elements", vals.len());
        match self {
            DType::F32 => vals.iter().zip(bytes.chunks_exact_mut(4)).for_each(|(v, c)| c.copy_from_slice(&v.to_le_bytes())),
            DType::BF16 => {
                vals.iter().zip(bytes.chunks_exact_mut(2)).for_each(|(v, c)| c.copy_from_slice(&f32_to_bf16_bits(*v).to_le_bytes()))
            }
            DType::F16 => vals.iter().zip(bytes.chunks_exact_mut(2)).for_each(|(v, c)| c.copy_from_slice(&f16::from_f32(*v).to_le_bytes())),
        }
    }

    /// Rounds an `f32` to the nearest value of this dtype (round-to-nearest-even), returned as `f32`.
    #[inline(always)]
    pub fn round(self, x: f32) -> f32 {
        match self {
            DType::F32 => x,
            DType::BF16 => bf16_round(x),
            DType::F16 => f16::from_f32(x).to_f32(),
        }
    }

    /// Rounds every element in place; a no-op for `F32`.
    pub fn round_slice(self, xs: &mut [f32]) {
        if self != DType::F32 {
            crate::with_rounding!(self, |round| crate::vectorized!(xs.iter_mut().for_each(|x| *x = round(*x))));
        }
    }

    /// Decodes element `i` of a little-endian buffer of this dtype.
    #[inline(always)]
    pub fn read(self, bytes: &[u8], i: usize) -> f32 {
        match self {
            DType::F32 => f32::from_le_bytes(bytes[4 * i..4 * i + 4].try_into().unwrap()),
            DType::BF16 => bf16_to_f32(u16::from_le_bytes([bytes[2 * i], bytes[2 * i + 1]])),
            DType::F16 => f16::from_le_bytes([bytes[2 * i], bytes[2 * i + 1]]).to_f32(),
        }
    }

    /// Decodes a whole little-endian buffer into `out` (`out.len()` elements).
    pub fn decode_into(self, bytes: &[u8], out: &mut [f32]) {
        assert!(bytes.len() >= out.len() * self.size(), "buffer too short for {} elements", out.len());
        match self {
            DType::F32 => {
                for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                    *o = f32::from_le_bytes(c.try_into().unwrap());
                }
            }
            DType::BF16 => {
                for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                    *o = bf16_to_f32(u16::from_le_bytes([c[0], c[1]]));
                }
            }
            DType::F16 => {
                for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                    *o = f16::from_le_bytes([c[0], c[1]]).to_f32();
                }
            }
        }
    }
}

#[inline(always)]
pub fn bf16_to_f32(bits: u16) -> f32 {
    f32::from_bits((bits as u32) << 16)
}

/// `f32` -> bf16 bits, round to nearest even; NaN stays NaN (quiet).
#[inline(always)]
pub fn f32_to_bf16_bits(x: f32) -> u16 {
    let b = x.to_bits();
    if x.is_nan() {
        return ((b >> 16) | 0x0040) as u16;
    }
    let rounded = b.wrapping_add(0x7FFF + ((b >> 16) & 1));
    (rounded >> 16) as u16
}

#[inline(always)]
pub fn bf16_round(x: f32) -> f32 {
    bf16_to_f32(f32_to_bf16_bits(x))
}

/// Evaluates `$body` with `$round` bound to `$dt`'s rounding as a function of its own ([`bf16_round`]
/// for bf16, the identity for f32, [`DType::round`] of f16 for f16): a loop that calls it has no match on
/// the dtype inside, so it vectorises. `with_rounding!(dt, |round| a.iter_mut().for_each(|x| *x = round(*x * s)))`.
#[macro_export]
macro_rules! with_rounding {
    ($dt:expr, |$round:ident| $body:expr) => {
        match $dt {
            $crate::DType::BF16 => {
                let $round = $crate::dtype::bf16_round;
                $body
            }
            $crate::DType::F32 => {
                let $round = |x: f32| x;
                $body
            }
            $crate::DType::F16 => {
                let $round = |x: f32| $crate::DType::F16.round(x);
                $body
            }
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_rounds_to_nearest_even() {
        // sqrt(2816) = 53.066... is not representable: bf16 gives 53.0 (the Gemma 4 embedding scale).
        assert_eq!(bf16_round(2816f32.sqrt()), 53.0);
        // 1 + 2^-8 is exactly between 1 and 1 + 2^-7: ties go to the even mantissa (1.0).
        assert_eq!(bf16_round(1.0 + 1.0 / 256.0), 1.0);
        assert_eq!(bf16_round(1.0 + 3.0 / 256.0), 1.0 + 4.0 / 256.0);
        assert!(bf16_round(f32::NAN).is_nan());
        assert_eq!(bf16_round(f32::INFINITY), f32::INFINITY);
    }

    #[test]
    fn decode_matches_read() {
        let vals = [1.5f32, -2.25, 3.0e-3];
        let bytes: Vec<u8> = vals.iter().flat_map(|v| f32_to_bf16_bits(*v).to_le_bytes()).collect();
        let mut out = [0f32; 3];
        DType::BF16.decode_into(&bytes, &mut out);
        for i in 0..3 {
            assert_eq!(out[i], DType::BF16.read(&bytes, i));
            assert_eq!(out[i], bf16_round(vals[i]));
        }
    }
}
