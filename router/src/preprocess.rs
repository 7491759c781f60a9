//! Gemma 4's image preprocessing, as transformers' `Gemma4ImageProcessor` (torchvision backend) does it:
//! an aspect-preserving resize to the largest grid of 48-pixel cells (3x3 pooled 16-pixel patches) that
//! the soft-token budget allows (ATen's 8-bit antialiased bicubic: int16 weights, exact integer
//! passes; not PIL's, not a float resize), then
//! 16x16 patches in row-major order, each flattened as (dy, dx, channel), with (column, row) positions.
//!
//! Pixels stay 8-bit: the model's input is `pixel / 255`, which the vision tower computes itself, so a
//! request's patches travel as bytes.

pub use switchyard_engine_api::Patches;
pub use switchyard_engine_api::image::{PATCH, POOL, SOFT_TOKEN_BUDGETS};

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

/// Keys' cubic with a = -0.5, as ATen's antialiased filter computes it (f64).
fn cubic(x: f64) -> f64 {
    let a = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a
    } else {
        0.0
    }
}

/// One axis of ATen's uint8 antialiased bicubic resize: per output index the first input index and
/// int16 weights, with the axis' fixed-point precision (`_compute_index_ranges_int16_weights`).
struct AxisWeights {
    taps: Vec<(usize, Vec<i32>)>,
    precision: u32,
}

fn axis_weights(input: usize, output: usize) -> AxisWeights {
    let scale = input as f64 / output as f64;
    let support = if scale >= 1.0 { 2.0 * scale } else { 2.0 };
    let kmax = support.ceil() as usize * 2 + 1;
    let invscale = if scale >= 1.0 { 1.0 / scale } else { 1.0 };
    let mut wt_max = 0f64;
    let float: Vec<(usize, Vec<f64>)> = (0..output)
        .map(|i| {
            let center = scale * (i as f64 + 0.5);
            let lo = ((center - support + 0.5) as i64).max(0);
            let n = (((center + support + 0.5) as i64).min(input as i64) - lo).clamp(0, kmax as i64) as usize;
            let mut w: Vec<f64> = (0..n).map(|j| cubic((j as f64 + lo as f64 - center + 0.5) * invscale)).collect();
            let total = w.iter().fold(0f64, |t, &x| t + x);
            if total != 0.0 {
                w.iter_mut().for_each(|x| *x /= total);
                wt_max = w.iter().fold(wt_max, |m, &x| m.max(x));
            }
            (lo as usize, w)
        })
        .collect();
    let mut precision = 0u32;
    while precision < 22 && ((0.5 + wt_max * (1u64 << (precision + 1)) as f64) as i64) < (1 << 15) {
        precision += 1;
    }
    let unit = (1u64 << precision) as f64;
    let taps = float
        .into_iter()
        .map(|(lo, w)| {
            let q = w.iter().map(|&x| {
                let v = x * unit;
                (if v < 0.0 { (v - 0.5).trunc() } else { (v + 0.5).trunc() }) as i32
            });
            (lo, q.collect())
        })
        .collect();
    AxisWeights { taps, precision }
}

/// One pass over an interleaved RGB image (`rows x cols x 3`), along columns (`horizontal`) or rows:
/// `clamp((2^(p-1) + sum in * w) >> p, 0, 255)`, in exact integers as ATen computes it.
fn resample(img: &[u8], rows: usize, cols: usize, out_len: usize, horizontal: bool) -> Vec<u8> {
    let input = if horizontal { cols } else { rows };
    let AxisWeights { taps, precision } = axis_weights(input, out_len);
    let round = 1i64 << (precision - 1);
    let (orows, ocols) = if horizontal { (rows, out_len) } else { (out_len, cols) };
    let mut out = vec![0u8; orows * ocols * 3];
    for r in 0..orows {
        for c in 0..ocols {
            let (lo, w) = &taps[if horizontal { c } else { r }];
            for ch in 0..3 {
                let mut acc = round;
                for (j, &k) in w.iter().enumerate() {
                    let (sr, sc) = if horizontal { (r, lo + j) } else { (lo + j, c) };
                    acc += img[(sr * cols + sc) * 3 + ch] as i64 * k as i64;
                }
                out[(r * ocols + c) * 3 + ch] = (acc >> precision).clamp(0, 255) as u8;
            }
        }
    }
    out
}

/// `torchvision.transforms.v2.functional.resize(uint8, bicubic, antialias=True)` on CPU: a horizontal
/// pass into 8 bits, then a vertical one (each skipped when that side keeps its size).
pub fn resize(rgb: &[u8], h: usize, w: usize, th: usize, tw: usize) -> Vec<u8> {
    let horiz = if tw != w { resample(rgb, h, w, tw, true) } else { rgb.to_vec() };
    if th != h { resample(&horiz, h, tw, th, false) } else { horiz }
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
    let img = resize(rgb, height, width, th, tw);
    let (rows, cols) = (th / PATCH, tw / PATCH);
    let mut pixels = Vec::with_capacity(th * tw * 3);
    for pr in 0..rows {
        for pc in 0..cols {
            for dy in 0..PATCH {
                for dx in 0..PATCH {
                    let at = ((pr * PATCH + dy) * tw + pc * PATCH + dx) * 3;
                    pixels.extend_from_slice(&img[at..at + 3]);
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
