//! Property tests for the preprocessing: the Gundam tiling, padding, resizing, token counts.
#![cfg(feature = "model")]

use image::{Rgb, RgbImage};
use ocr_patch::model::preprocess::{self, Mode, TARGET_RATIOS};
use proptest::prelude::*;

fn ratio(r: (u32, u32)) -> f64 {
    r.0 as f64 / r.1 as f64
}

fn noise(w: u32, h: u32, seed: u32) -> RgbImage {
    RgbImage::from_fn(w, h, |x, y| {
        let v = x
            .wrapping_mul(2654435761)
            .wrapping_add(y.wrapping_mul(40503))
            .wrapping_add(seed);
        Rgb([v as u8, (v >> 8) as u8, (v >> 16) as u8])
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// 2..=9 tiles, a candidate of dynamic_preprocess, and none strictly closer in aspect ratio.
    #[test]
    fn the_chosen_grid_is_a_closest_candidate(w in 1u32..20_000, h in 1u32..20_000) {
        let a = w as f64 / h as f64;
        let (c, r) = preprocess::find_closest_aspect_ratio(a, &TARGET_RATIOS, w, h, 640);
        prop_assert!((2..=9).contains(&(c * r)), "{c}x{r}");
        prop_assert!(TARGET_RATIOS.contains(&(c, r)));
        let best = (a - ratio((c, r))).abs();
        for &t in &TARGET_RATIOS {
            prop_assert!((a - ratio(t)).abs() >= best, "{t:?} is closer than {c}x{r} for {w}x{h}");
        }
        // wider images never get fewer columns per row than taller ones of the same area
        if w > h { prop_assert!(c >= r) } else if h > w { prop_assert!(r >= c) }
    }

    /// The tiles cover the resized image exactly, row-major, each `image_size` square.
    #[test]
    fn tiles_cover_the_resized_grid(w in 1u32..300, h in 1u32..300, seed in 0u32..1000) {
        let size = 16;
        let img = noise(w, h, seed);
        let (tiles, (c, r)) = preprocess::dynamic_preprocess(&img, size);
        prop_assert_eq!(tiles.len() as u32, c * r);
        let resized = preprocess::resize_bicubic(&img, size * c, size * r);
        for (i, t) in tiles.iter().enumerate() {
            prop_assert_eq!(t.dimensions(), (size, size));
            let (x0, y0) = ((i as u32 % c) * size, (i as u32 / c) * size);
            for (x, y, p) in t.enumerate_pixels() {
                prop_assert_eq!(p, resized.get_pixel(x0 + x, y0 + y));
            }
        }
    }

    /// `ImageOps.pad`: a square canvas; the image keeps its aspect ratio (to a pixel) and sits
    /// centred on grey 127.
    #[test]
    fn pad_keeps_aspect_and_centres(w in 1u32..400, h in 1u32..400) {
        let img = RgbImage::from_pixel(w, h, Rgb([0, 255, 0]));
        let s = 64;
        let p = preprocess::pad(&img, s, s, preprocess::PAD_COLOR);
        prop_assert_eq!(p.dimensions(), (s, s));
        let inside: Vec<(u32, u32)> = p.enumerate_pixels().filter(|(_, _, px)| px.0 != preprocess::PAD_COLOR).map(|(x, y, _)| (x, y)).collect();
        let (x0, x1) = (inside.iter().map(|q| q.0).min().unwrap_or(0), inside.iter().map(|q| q.0).max().unwrap_or(0));
        let (y0, y1) = (inside.iter().map(|q| q.1).min().unwrap_or(0), inside.iter().map(|q| q.1).max().unwrap_or(0));
        let (rw, rh) = (x1 - x0 + 1, y1 - y0 + 1);
        if !inside.is_empty() {
            prop_assert!(rw == s || rh == s);
            let want = w as f64 / h as f64 * s as f64;
            if w <= h { prop_assert!((rw as f64 - want).abs() <= 1.0, "{rw} vs {want}") }
            // centred: the two margins differ by at most one
            prop_assert!(((x0 as i64) - (s - 1 - x1) as i64).abs() <= 1);
            prop_assert!(((y0 as i64) - (s - 1 - y1) as i64).abs() <= 1);
        }
    }

    /// A flat image stays flat through any resize (the weights sum to one after rounding).
    #[test]
    fn resizing_a_flat_image_is_exact(w in 1u32..200, h in 1u32..200, tw in 1u32..200, th in 1u32..200, c in any::<[u8; 3]>()) {
        let img = RgbImage::from_pixel(w, h, Rgb(c));
        let r = preprocess::resize_bicubic(&img, tw, th);
        prop_assert_eq!(r.dimensions(), (tw, th));
        prop_assert!(r.pixels().all(|p| p.0 == c));
    }
}

proptest! {
    // each case resizes megapixel views: few cases
    #![proptest_config(ProptestConfig::with_cases(8))]

    /// Every mode's token count is the remote code's formula; the Gundam grid appears only when
    /// a side is over 640.
    #[test]
    fn token_counts_follow_the_formula(w in 1u32..1400, h in 1u32..1400) {
        // content does not matter for the layout: a 1-pixel image scaled up keeps the maths cheap
        let img = RgbImage::from_pixel(w, h, Rgb([1, 2, 3]));
        for m in [Mode::Tiny, Mode::Small, Mode::Base, Mode::Large] {
            let v = preprocess::views(&img, m);
            let n = m.global_size() as usize / 64;
            prop_assert_eq!(v.token_count(m), (n + 1) * n + 1);
            prop_assert_eq!(v.crop, (1, 1));
            prop_assert!(v.tiles.is_empty());
        }
        if w * h <= 700 * 700 {
            let v = preprocess::views(&img, Mode::Gundam);
            if w <= 640 && h <= 640 {
                prop_assert_eq!(v.crop, (1, 1));
                prop_assert!(v.tiles.is_empty());
                prop_assert_eq!(v.token_count(Mode::Gundam), 273);
            } else {
                let (c, r) = v.crop;
                prop_assert_eq!(v.tiles.len() as u32, c * r);
                prop_assert_eq!(v.token_count(Mode::Gundam), 273 + (10 * c as usize + 1) * 10 * r as usize);
            }
        }
    }
}
