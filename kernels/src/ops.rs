//! Element-wise and row-wise operations, each rounding where transformers rounds in the compute dtype.

use crate::DType;

/// Gemma 4 RMSNorm of one row, as `Gemma4RMSNorm`: `x * pow(mean(x²) + eps, -0.5)` in f32, then times the
/// weight (if any; Gemma 4 multiplies by `w` directly, not `1 + w`), then rounded to the compute dtype.
pub fn rms_norm_row(x: &[f32], weight: Option<&[f32]>, eps: f32, dt: DType, out: &mut [f32]) {
    let ss: f32 = sum_squares(x);
    let inv = (ss / x.len() as f32 + eps).powf(-0.5);
    match weight {
        Some(w) => {
            for ((o, &v), &g) in out.iter_mut().zip(x).zip(w) {
                *o = dt.round(v * inv * g);
            }
        }
        None => {
            for (o, &v) in out.iter_mut().zip(x) {
                *o = dt.round(v * inv);
            }
        }
    }
}

/// RMSNorm applied to each `dim`-wide chunk of `x` (rows, or heads within rows), in place.
pub fn rms_norm_chunks(x: &mut [f32], dim: usize, weight: Option<&[f32]>, eps: f32, dt: DType) {
    let mut tmp = vec![0f32; dim];
    for row in x.chunks_exact_mut(dim) {
        rms_norm_row(row, weight, eps, dt, &mut tmp);
        row.copy_from_slice(&tmp);
    }
}

/// Sum of squares with a fixed 8-lane order (independent of where the row sits in a batch).
fn sum_squares(x: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let chunks = x.chunks_exact(8);
    let rem = chunks.remainder();
    for c in chunks {
        for i in 0..8 {
            lanes[i] += c[i] * c[i];
        }
    }
    for (i, v) in rem.iter().enumerate() {
        lanes[i] += v * v;
    }
    ((lanes[0] + lanes[4]) + (lanes[1] + lanes[5])) + ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7]))
}

/// tanh-approximated GELU (`gelu_pytorch_tanh`), computed in f32.
#[inline]
pub fn gelu_tanh(x: f32) -> f32 {
    const BETA: f32 = 0.797_884_6; // sqrt(2/pi)
    const KAPPA: f32 = 0.044715;
    0.5 * x * (1.0 + (BETA * (x + KAPPA * x * x * x)).tanh())
}

/// `out[i] = round(round(gelu(gate[i])) * up[i])`: the gated activation of the MLP and the experts.
pub fn gelu_mul(gate: &[f32], up: &[f32], dt: DType, out: &mut [f32]) {
    for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
        *o = dt.round(dt.round(gelu_tanh(g)) * u);
    }
}

/// `a[i] = round(a[i] + b[i])`.
pub fn add_assign(a: &mut [f32], b: &[f32], dt: DType) {
    for (x, &y) in a.iter_mut().zip(b) {
        *x = dt.round(*x + y);
    }
}

/// Numerically stable softmax in f32, in place.
pub fn softmax(x: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0f32;
    for v in x.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    for v in x.iter_mut() {
        *v /= sum;
    }
}

/// Log-softmax in f64 (logits are few per step; accuracy beats speed here).
pub fn log_softmax(x: &[f32]) -> Vec<f32> {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = x.iter().map(|&v| (v as f64 - max).exp()).sum::<f64>().ln() + max;
    x.iter().map(|&v| (v as f64 - lse) as f32).collect()
}

/// RoPE tables for one layer type: `inv_freq` as transformers computes it (f32), with zeros for the
/// dimensions a proportional (partial) RoPE leaves unrotated.
#[derive(Clone, Debug)]
pub struct Rope {
    pub inv_freq: Vec<f32>,
}

impl Rope {
    /// Standard RoPE over the whole head: `inv_freq[i] = 1 / theta^(2i / head_dim)`.
    pub fn default(theta: f64, head_dim: usize) -> Rope {
        Rope::proportional(theta, head_dim, 1.0)
    }

    /// Gemma 4's proportional RoPE: the first `int(fraction * head_dim / 2)` frequencies use the
    /// exponent `2i / head_dim` (dividing by the full head size), the rest are 0 (cos 1, sin 0).
    pub fn proportional(theta: f64, head_dim: usize, fraction: f64) -> Rope {
        let angles = ((fraction * head_dim as f64) as usize / 2).min(head_dim / 2);
        let theta = theta as f32;
        let mut inv_freq = vec![0f32; head_dim / 2];
        for (i, f) in inv_freq.iter_mut().enumerate().take(angles) {
            let exponent = (2 * i) as f32 / head_dim as f32;
            *f = 1.0 / theta.powf(exponent);
        }
        Rope { inv_freq }
    }

    /// cos and sin (each `head_dim/2` wide, shared by both halves) at `pos`, rounded to `dt`.
    pub fn cos_sin(&self, pos: usize, dt: DType) -> (Vec<f32>, Vec<f32>) {
        let p = pos as f32;
        let cos = self.inv_freq.iter().map(|&f| dt.round((p * f).cos())).collect();
        let sin = self.inv_freq.iter().map(|&f| dt.round((p * f).sin())).collect();
        (cos, sin)
    }

    /// Rotates every `head_dim`-wide head of `x` in place ("neox" halves), rounding like
    /// `(x * cos) + (rotate_half(x) * sin)` in the compute dtype.
    pub fn apply(&self, x: &mut [f32], cos: &[f32], sin: &[f32], dt: DType) {
        let half = self.inv_freq.len();
        for head in x.chunks_exact_mut(2 * half) {
            let (a, b) = head.split_at_mut(half);
            for i in 0..half {
                let (x1, x2) = (a[i], b[i]);
                a[i] = dt.round(dt.round(x1 * cos[i]) + dt.round(-x2 * sin[i]));
                b[i] = dt.round(dt.round(x2 * cos[i]) + dt.round(x1 * sin[i]));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rms_norm_normalises_and_scales() {
        let x = [3.0f32, 4.0];
        let mut out = [0f32; 2];
        rms_norm_row(&x, Some(&[2.0, 1.0]), 0.0, DType::F32, &mut out);
        let r = (12.5f32).sqrt();
        assert!((out[0] - 2.0 * 3.0 / r).abs() < 1e-6 && (out[1] - 4.0 / r).abs() < 1e-6);
    }

    #[test]
    fn proportional_rope_rotates_only_the_first_fraction() {
        let r = Rope::proportional(1e6, 512, 0.25);
        assert_eq!(r.inv_freq.len(), 256);
        assert_eq!(r.inv_freq[0], 1.0);
        assert!(r.inv_freq[63] > 0.0 && r.inv_freq[64] == 0.0);
        // Exponent divides by the head size (512), not by the rotary size (128).
        assert!((r.inv_freq[1] - 1.0 / 1e6f32.powf(2.0 / 512.0)).abs() < 1e-9);
        let mut x: Vec<f32> = (0..512).map(|i| i as f32).collect();
        let (c, s) = r.cos_sin(7, DType::F32);
        r.apply(&mut x, &c, &s, DType::F32);
        assert_eq!(x[100], 100.0);
        assert_eq!(x[356], 356.0);
        assert_ne!(x[1], 1.0);
    }

    #[test]
    fn softmax_sums_to_one() {
        let mut x = [1.0f32, 2.0, 3.0];
        softmax(&mut x);
        assert!((x.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        let l = log_softmax(&[1.0, 2.0, 3.0]);
        assert!((l[2].exp() - x[2]).abs() < 1e-6);
    }
}
