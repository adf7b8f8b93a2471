//! Resizing position tables exactly as PyTorch does, for the two calls deepencoder.py makes:
//! `F.interpolate(..., mode='bicubic', antialias=True, align_corners=False)` (absolute positions
//! of SAM and CLIP, `get_abs_pos_sam` / `get_abs_pos`) and `F.interpolate(..., mode="linear")`
//! (SAM's relative positions, `get_rel_pos`).
//!
//! Owns: the weights of both resamplers (ported from ATen's `UpSampleKernel.cpp` /
//! `UpSample.h`, computed in f32 like ATen does for f32 input). These tables are small and
//! resized once per input size, so the work is done on the host on plain `Vec<f32>`.

/// ATen `HelperInterpCubic::aa_filter`: Keys' cubic with a = -0.5 (not -0.75 as in the plain
/// bicubic path).
fn aa_bicubic_filter(x: f32) -> f32 {
    const A: f32 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A
    } else {
        0.0
    }
}

/// For each output index: the first input index and the normalised weights
/// (`_compute_indices_min_size_weights_aa`).
fn aa_weights(input_size: usize, output_size: usize) -> Vec<(usize, Vec<f32>)> {
    // area_pixel_compute_scale(input, output, align_corners=false) = input / output
    let scale = input_size as f32 / output_size as f32;
    let interp_size = 4.0f32; // bicubic
    let support = if scale >= 1.0 {
        interp_size * 0.5 * scale
    } else {
        interp_size * 0.5
    };
    let invscale = if scale >= 1.0 { 1.0 / scale } else { 1.0 };
    (0..output_size)
        .map(|i| {
            let center = scale * (i as f32 + 0.5);
            // xmin = max(int64(center - support + 0.5), 0): the cast truncates toward zero.
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).min(input_size as i64) as usize;
            let mut w: Vec<f32> = (xmin..xmax)
                .map(|j| aa_bicubic_filter((j as f32 - center + 0.5) * invscale))
                .collect();
            let total: f32 = w.iter().sum();
            if total != 0.0 {
                w.iter_mut().for_each(|x| *x /= total);
            }
            (xmin, w)
        })
        .collect()
}

/// `F.interpolate(x, size=(out_h, out_w), mode='bicubic', antialias=True, align_corners=False)`
/// on a channels-first `(c, in_h, in_w)` array. Like ATen: the width pass first, then the height
/// pass, each skipped when that size does not change.
pub fn bicubic_aa_chw(
    x: &[f32],
    c: usize,
    (in_h, in_w): (usize, usize),
    (out_h, out_w): (usize, usize),
) -> Vec<f32> {
    assert_eq!(x.len(), c * in_h * in_w, "bicubic_aa_chw: input length");
    let mut cur = x.to_vec();
    let mut w_now = in_w;
    if out_w != in_w {
        let wts = aa_weights(in_w, out_w);
        let mut out = vec![0f32; c * in_h * out_w];
        for row in 0..c * in_h {
            let src = &cur[row * in_w..(row + 1) * in_w];
            for (o, (xmin, ws)) in wts.iter().enumerate() {
                out[row * out_w + o] = ws.iter().enumerate().map(|(j, w)| src[xmin + j] * w).sum();
            }
        }
        cur = out;
        w_now = out_w;
    }
    if out_h != in_h {
        let wts = aa_weights(in_h, out_h);
        let mut out = vec![0f32; c * out_h * w_now];
        for ch in 0..c {
            let plane = &cur[ch * in_h * w_now..(ch + 1) * in_h * w_now];
            for (o, (ymin, ws)) in wts.iter().enumerate() {
                for col in 0..w_now {
                    out[(ch * out_h + o) * w_now + col] = ws
                        .iter()
                        .enumerate()
                        .map(|(j, w)| plane[(ymin + j) * w_now + col] * w)
                        .sum();
                }
            }
        }
        cur = out;
    }
    cur
}

/// `F.interpolate(x, size=out_len, mode="linear")` (align_corners=False) on `(c, in_len)`.
pub fn linear_1d(x: &[f32], c: usize, in_len: usize, out_len: usize) -> Vec<f32> {
    assert_eq!(x.len(), c * in_len, "linear_1d: input length");
    let scale = in_len as f32 / out_len as f32;
    let mut out = vec![0f32; c * out_len];
    for o in 0..out_len {
        // area_pixel_compute_source_index(scale, o, align_corners=false, cubic=false)
        let src = (scale * (o as f32 + 0.5) - 0.5).max(0.0);
        let i0 = src as usize;
        let i1 = if i0 < in_len - 1 { i0 + 1 } else { i0 };
        let l1 = src - i0 as f32;
        let l0 = 1.0 - l1;
        for ch in 0..c {
            out[ch * out_len + o] = l0 * x[ch * in_len + i0] + l1 * x[ch * in_len + i1];
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_size_is_identity() {
        let x: Vec<f32> = (0..2 * 3 * 3).map(|v| v as f32 * 0.7 - 3.0).collect();
        assert_eq!(bicubic_aa_chw(&x, 2, (3, 3), (3, 3)), x);
    }

    #[test]
    fn constant_stays_constant_and_weights_sum_to_one() {
        let x = vec![2.5f32; 16 * 16];
        for out in [5usize, 10, 16, 20, 40] {
            let y = bicubic_aa_chw(&x, 1, (16, 16), (out, out));
            assert!(y.iter().all(|v| (v - 2.5).abs() < 1e-5), "{out}");
        }
        for (_, w) in aa_weights(64, 40) {
            assert!((w.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        }
    }

    #[test]
    fn halving_averages_with_the_antialias_kernel() {
        // 4 -> 2: output 0 centres on 1.0 with support 4 (scale 2): taps at j=0..3 with
        // filter((j - 1.0 + 0.5) / 2) = f(-0.25), f(0.25), f(0.75), f(1.25).
        let f = aa_bicubic_filter;
        let w = [f(-0.25), f(0.25), f(0.75), f(1.25)];
        let s: f32 = w.iter().sum();
        let x = [1.0f32, 2.0, 3.0, 4.0];
        let want: f32 = w.iter().zip(x).map(|(w, x)| w * x).sum::<f32>() / s;
        let y = bicubic_aa_chw(&x, 1, (1, 4), (1, 2));
        assert!((y[0] - want).abs() < 1e-6, "{} vs {want}", y[0]);
    }

    #[test]
    fn linear_matches_hand_values() {
        // 3 -> 5: scale 0.6; o=0: src=max(-0.2,0)=0 -> x0; o=2: src=1.0 -> x1; o=4: src=2.2 -> x2.
        let y = linear_1d(&[0.0, 10.0, 20.0], 1, 3, 5);
        assert_eq!(y[0], 0.0);
        assert!((y[1] - 4.0).abs() < 1e-5); // src 0.4
        assert!((y[2] - 10.0).abs() < 1e-5);
        assert!((y[3] - 16.0).abs() < 1e-5); // src 1.6
        assert_eq!(y[4], 20.0);
    }
}
