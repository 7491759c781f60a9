//! Gemma 4's image preprocessing, as transformers' `Gemma4ImageProcessor` (torchvision backend) does it:
//! an aspect-preserving resize to the largest grid of 48-pixel cells (3x3 pooled 16-pixel patches) that
//! the soft-token budget allows (bicubic, antialiased, on 8-bit pixels rounded back to 8 bits), then
//! 16x16 patches in row-major order, each flattened as (dy, dx, channel), with (column, row) positions.
//!
//! Pixels stay 8-bit: the model's input is `pixel / 255`, which the vision tower computes itself, so a
//! request's patches travel as bytes.

/// Budgets transformers accepts (`max_soft_tokens`).
pub const SOFT_TOKEN_BUDGETS: [usize; 5] = [70, 140, 280, 560, 1120];
pub const PATCH: usize = 16;
pub const POOL: usize = 3;

/// An image after preprocessing.
#[derive(Clone, Debug, PartialEq)]
pub struct Patches {
    /// Patch grid, in patches.
    pub rows: usize,
    pub cols: usize,
    /// `rows * cols` patches of `16 * 16 * 3` bytes, (dy, dx, c) order.
    pub pixels: Vec<u8>,
}

impl Patches {
    pub fn len(&self) -> usize {
        self.rows * self.cols
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Soft tokens after 3x3 pooling.
    pub fn soft_tokens(&self) -> usize {
        self.len() / (POOL * POOL)
    }

    /// `(x, y)` = (column, row) of patch `i`.
    pub fn position(&self, i: usize) -> (usize, usize) {
        (i % self.cols, i / self.cols)
    }
}

/// `get_aspect_ratio_preserving_size`: the resized (height, width), multiples of 48 whose patch count
/// fits `max_soft_tokens * 9`.
pub fn target_size(height: usize, width: usize, max_soft_tokens: usize) -> Result<(usize, usize), String> {
    let max_patches = max_soft_tokens * POOL * POOL;
    let target_px = (max_patches * PATCH * PATCH) as f64;
    let factor = (target_px / (height * width) as f64).sqrt();
    let side = PATCH * POOL;
    let mut th = ((factor * height as f64) / side as f64).floor() as usize * side;
    let mut tw = ((factor * width as f64) / side as f64).floor() as usize * side;
    if th == 0 && tw == 0 {
        return Err(format!("a {height}x{width} image cannot be resized to a 48-pixel grid"));
    }
    let max_side = (max_patches / (POOL * POOL)) * side;
    if th == 0 {
        th = side;
        tw = ((width / height) * side).min(max_side);
    } else if tw == 0 {
        tw = side;
        th = ((height / width) * side).min(max_side);
    }
    if (th * tw) as f64 > target_px {
        return Err(format!("a {height}x{width} image would need more than {max_patches} patches"));
    }
    Ok((th, tw))
}

/// The bicubic (a = -0.5) filter of PyTorch's antialiased interpolation.
fn cubic(x: f32) -> f32 {
    let a = -0.5f32;
    let x = x.abs();
    if x < 1.0 {
        ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a
    } else {
        0.0
    }
}

/// Per output index: the first input index and the normalised weights (PyTorch's
/// `_compute_indices_min_size_weights_aa`, in f32 as it computes them for f32 images).
fn aa_weights(input: usize, output: usize) -> Vec<(usize, Vec<f32>)> {
    let scale = input as f32 / output as f32;
    let support = if scale >= 1.0 { 2.0 * scale } else { 2.0 };
    let invscale = if scale >= 1.0 { 1.0 / scale } else { 1.0 };
    (0..output)
        .map(|i| {
            let center = scale * (i as f32 + 0.5);
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).min(input as i64) as usize;
            let mut w: Vec<f32> = (xmin..xmax).map(|j| cubic((j as f32 - center + 0.5) * invscale)).collect();
            let total: f32 = w.iter().fold(0.0, |t, &x| t + x);
            if total != 0.0 {
                w.iter_mut().for_each(|x| *x /= total);
            }
            (xmin, w)
        })
        .collect()
}

/// Resizes an RGB image (`h x w x 3` bytes) as `torchvision.transforms.v2.functional.resize(uint8,
/// bicubic, antialias=True)` does: to f32, a horizontal pass, then a vertical one, rounded (half to
/// even) and clamped back to bytes. Returns planar channels.
fn resize_planar(rgb: &[u8], h: usize, w: usize, th: usize, tw: usize) -> [Vec<u8>; 3] {
    let wx = aa_weights(w, tw);
    let wy = aa_weights(h, th);
    std::array::from_fn(|c| {
        let plane: Vec<f32> = (0..h * w).map(|i| rgb[i * 3 + c] as f32).collect();
        // Horizontal pass (skipped when the width is unchanged, as PyTorch skips it).
        let horiz: Vec<f32> = if tw == w {
            plane
        } else {
            let mut out = vec![0f32; h * tw];
            for y in 0..h {
                let row = &plane[y * w..(y + 1) * w];
                for (x, (x0, ws)) in wx.iter().enumerate() {
                    let mut t = row[*x0] * ws[0];
                    for (j, &k) in ws.iter().enumerate().skip(1) {
                        t += row[x0 + j] * k;
                    }
                    out[y * tw + x] = t;
                }
            }
            out
        };
        let vert: Vec<f32> = if th == h {
            horiz
        } else {
            let mut out = vec![0f32; th * tw];
            for (y, (y0, ws)) in wy.iter().enumerate() {
                for x in 0..tw {
                    let mut t = horiz[y0 * tw + x] * ws[0];
                    for (j, &k) in ws.iter().enumerate().skip(1) {
                        t += horiz[(y0 + j) * tw + x] * k;
                    }
                    out[y * tw + x] = t;
                }
            }
            out
        };
        vert.into_iter().map(|v| v.round_ties_even().clamp(0.0, 255.0) as u8).collect()
    })
}

/// Resizes and patchifies an RGB image (`height x width x 3` bytes, row-major).
pub fn preprocess(rgb: &[u8], height: usize, width: usize, max_soft_tokens: usize) -> Result<Patches, String> {
    if !SOFT_TOKEN_BUDGETS.contains(&max_soft_tokens) {
        return Err(format!("max_soft_tokens must be one of {SOFT_TOKEN_BUDGETS:?}, not {max_soft_tokens}"));
    }
    if rgb.len() != height * width * 3 || height == 0 || width == 0 {
        return Err(format!("expected a {height}x{width} RGB image"));
    }
    let (th, tw) = target_size(height, width, max_soft_tokens)?;
    let planes = if (th, tw) == (height, width) {
        std::array::from_fn(|c| (0..height * width).map(|i| rgb[i * 3 + c]).collect())
    } else {
        resize_planar(rgb, height, width, th, tw)
    };
    let (rows, cols) = (th / PATCH, tw / PATCH);
    let mut pixels = Vec::with_capacity(th * tw * 3);
    for pr in 0..rows {
        for pc in 0..cols {
            for dy in 0..PATCH {
                for dx in 0..PATCH {
                    let at = (pr * PATCH + dy) * tw + pc * PATCH + dx;
                    pixels.extend(planes.iter().map(|p| p[at]));
                }
            }
        }
    }
    Ok(Patches { rows, cols, pixels })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_follow_transformers_table() {
        // gemma4-spec.md section 4.1: soft tokens for three image sizes at every budget.
        let want = [
            ((1024, 1024), [64, 121, 256, 529, 1089]),
            ((768, 1024), [63, 130, 266, 540, 1064]),
            ((1080, 1920), [66, 120, 264, 527, 1100]),
        ];
        for ((h, w), counts) in want {
            for (budget, count) in SOFT_TOKEN_BUDGETS.iter().zip(counts) {
                let (th, tw) = target_size(h, w, *budget).unwrap();
                assert_eq!((th / 16) * (tw / 16) / 9, count, "{h}x{w} at {budget}");
            }
        }
        // Upscaled too: 224x224 fills the 280 budget at 768x768.
        assert_eq!(target_size(224, 224, 280).unwrap(), (768, 768));
        // Extreme aspect ratios: one side is one cell.
        assert_eq!(target_size(10, 4000, 70).unwrap(), (48, 3360));
    }
}
