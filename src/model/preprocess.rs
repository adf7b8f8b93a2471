//! Preprocessing as `DeepseekOCRForCausalLM.infer()` does it: image decoding (with EXIF
//! orientation), the five modes (resize / pad / `dynamic_preprocess` tiling), `ToTensor` +
//! `Normalize(0.5, 0.5)`, and the token sequence (`input_ids`, `images_seq_mask`,
//! `images_spatial_crop`) with the image tokens expanded exactly as `infer()` writes them.
//!
//! Owns: image file -> normalised pixels + token layout. Does not own: the tokenizer (it is
//! passed in as a function), the vision encoder, the model.
//!
//! Resampling is a port of Pillow's `ImagingResample` (`libImaging/Resample.c`: bicubic with
//! `a = -0.5`, support scaled by the reduction factor, 22-bit fixed-point coefficients, two
//! passes each rounded to 8 bits, in Pillow 13's order: see [`resize_bicubic`]), so the pixels
//! equal Pillow's bit for bit; `tests/preprocess_ref.rs` checks that against the remote code's
//! own functions.
//!
//! The modes (DeepSeek's README):
//!
//! | mode | `base_size` | `image_size` | `crop_mode` | global view | image tokens |
//! |---|---|---|---|---|---|
//! | tiny | 512 | 512 | no | `resize` to 512x512 (aspect not kept) | (8+1)*8+1 = 73 |
//! | small | 640 | 640 | no | `resize` to 640x640 (aspect not kept) | (10+1)*10+1 = 111 |
//! | base | 1024 | 1024 | no | `ImageOps.pad` to 1024 (aspect kept, grey 127 borders) | 273 |
//! | large | 1280 | 1280 | no | `ImageOps.pad` to 1280 | (20+1)*20+1 = 421 |
//! | gundam | 1024 | 640 | yes | `ImageOps.pad` to 1024, plus tiles of 640 when either side > 640 | 273 + (10w+1)*10h |

use std::io::{BufReader, Cursor, Read, Seek};
use std::path::Path;

use image::{DynamicImage, ImageDecoder, ImageReader, RgbImage};

/// `image_token_id` in `infer()`.
pub const IMAGE_TOKEN_ID: u32 = 128815;
/// The placeholder `infer()` splits the prompt on.
pub const IMAGE_TOKEN: &str = "<image>";
/// `bos_id` in `infer()` / `text_encode`.
pub const BOS_ID: u32 = 0;
/// `patch_size` and `downsample_ratio` in `infer()`: one token per 64 pixels of a view side.
const PATCH_SIZE: usize = 16;
const DOWNSAMPLE_RATIO: usize = 4;
/// `tuple(int(x * 255) for x in image_transform.mean)`: the pad colour.
pub const PAD_COLOR: [u8; 3] = [127, 127, 127];
/// Gundam tiles: `dynamic_preprocess(image)` defaults.
pub const TILE_SIZE: u32 = 640;
pub const MIN_TILES: u32 = 2;
pub const MAX_TILES: u32 = 9;

/// Images above this many pixels are refused before decoding: Pillow's own decompression-bomb
/// threshold (`Image.MAX_IMAGE_PIXELS`, 89,478,485 = 1024*1024*1024/4/3), where Pillow warns
/// (and errors at twice that). Checked on the header's dimensions, so a small file claiming a
/// huge image costs nothing.
pub const MAX_IMAGE_PIXELS: u64 = 89_478_485;

#[derive(Debug, thiserror::Error)]
pub enum PreprocessError {
    #[error("{path}: cannot read the image: {source}; check the path")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{path}: not a readable image ({message}); pass a PNG, JPEG, WebP, BMP, TIFF or GIF file"
    )]
    Undecodable { path: String, message: String },
    #[error("{path}: the image is {width}x{height}, it has no pixels; pass a non-empty image")]
    ZeroSize {
        path: String,
        width: u32,
        height: u32,
    },
    #[error(
        "{path}: the image is {width}x{height} = {pixels} pixels, above the limit of {limit} \
         (Pillow's decompression-bomb threshold); downscale it first"
    )]
    TooLarge {
        path: String,
        width: u32,
        height: u32,
        pixels: u64,
        limit: u64,
    },
    #[error(
        "the prompt has {placeholders} `<image>` placeholder(s) for {images} image(s); \
         put exactly one `<image>` per image in the prompt (e.g. \"<image>\\nFree OCR.\")"
    )]
    Placeholders { placeholders: usize, images: usize },
}

// ---------------------------------------------------------------------------------------------
// Modes

/// DeepSeek-OCR's resolution modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mode {
    Tiny,
    Small,
    Base,
    Large,
    Gundam,
}

impl Mode {
    pub const ALL: [Mode; 5] = [
        Mode::Tiny,
        Mode::Small,
        Mode::Base,
        Mode::Large,
        Mode::Gundam,
    ];

    /// `base_size` of `infer()`.
    pub fn base_size(self) -> u32 {
        match self {
            Mode::Tiny => 512,
            Mode::Small => 640,
            Mode::Base | Mode::Gundam => 1024,
            Mode::Large => 1280,
        }
    }

    /// `image_size` of `infer()`.
    pub fn image_size(self) -> u32 {
        match self {
            Mode::Tiny => 512,
            Mode::Small => 640,
            Mode::Base => 1024,
            Mode::Large => 1280,
            Mode::Gundam => TILE_SIZE,
        }
    }

    /// `crop_mode` of `infer()`.
    pub fn crop_mode(self) -> bool {
        self == Mode::Gundam
    }

    /// The size of the global view (`base_size` with crops, `image_size` without).
    pub fn global_size(self) -> u32 {
        if self.crop_mode() {
            self.base_size()
        } else {
            self.image_size()
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Mode::Tiny => "tiny",
            Mode::Small => "small",
            Mode::Base => "base",
            Mode::Large => "large",
            Mode::Gundam => "gundam",
        }
    }
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Mode::ALL
            .into_iter()
            .find(|m| m.name().eq_ignore_ascii_case(s))
            .ok_or_else(|| format!("unknown mode `{s}`; use tiny, small, base, large or gundam"))
    }
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// `math.ceil((size // patch_size) / downsample_ratio)`: tokens per side of a view.
pub fn queries(size: u32) -> usize {
    (size as usize / PATCH_SIZE).div_ceil(DOWNSAMPLE_RATIO)
}

// ---------------------------------------------------------------------------------------------
// Decoding

/// Reads and decodes an image file: header dimensions checked against `max_pixels` before
/// anything is decoded, EXIF orientation applied (`ImageOps.exif_transpose`), converted to RGB
/// (`.convert("RGB")`: alpha dropped, grey replicated).
pub fn load_image(path: &Path, max_pixels: u64) -> Result<RgbImage, PreprocessError> {
    let name = path.display().to_string();
    let file = std::fs::File::open(path).map_err(|source| PreprocessError::Io {
        path: name.clone(),
        source,
    })?;
    decode_reader(BufReader::new(file), &name, max_pixels)
}

/// [`load_image`] on bytes in memory; `name` is used in messages.
pub fn decode_image(
    bytes: &[u8],
    name: &str,
    max_pixels: u64,
) -> Result<RgbImage, PreprocessError> {
    decode_reader(Cursor::new(bytes), name, max_pixels)
}

fn decode_reader<R: std::io::BufRead + Seek>(
    r: R,
    name: &str,
    max_pixels: u64,
) -> Result<RgbImage, PreprocessError> {
    let bad = |e: image::ImageError| PreprocessError::Undecodable {
        path: name.to_string(),
        message: e.to_string(),
    };
    let mut reader = ImageReader::new(r)
        .with_guessed_format()
        .map_err(|source| PreprocessError::Io {
            path: name.to_string(),
            source,
        })?;
    // The crate's default allocation cap (512 MiB) would refuse some images under our pixel
    // limit; ours is set below, once the header's dimensions are known.
    reader.no_limits();
    if reader.format().is_none() {
        return Err(PreprocessError::Undecodable {
            path: name.to_string(),
            message: "unknown format".into(),
        });
    }
    let mut decoder = reader.into_decoder().map_err(bad)?;
    let (width, height) = decoder.dimensions();
    if width == 0 || height == 0 {
        return Err(PreprocessError::ZeroSize {
            path: name.to_string(),
            width,
            height,
        });
    }
    let pixels = width as u64 * height as u64;
    if pixels > max_pixels {
        return Err(PreprocessError::TooLarge {
            path: name.to_string(),
            width,
            height,
            pixels,
            limit: max_pixels,
        });
    }
    let mut limits = image::Limits::default();
    // Room for the decoded image at 16 bits x 4 channels, and nothing like a bomb beyond it.
    limits.max_alloc = Some(pixels * 8 + (64 << 20));
    decoder.set_limits(limits).map_err(bad)?;
    // exif_transpose: a missing or broken EXIF block leaves the image as it is.
    let orientation = decoder
        .orientation()
        .unwrap_or(image::metadata::Orientation::NoTransforms);
    let mut img = DynamicImage::from_decoder(decoder).map_err(bad)?;
    img.apply_orientation(orientation);
    Ok(to_rgb(img))
}

/// `.convert("RGB")`. For 16-bit images Pillow keeps the high byte (`RGB;16B` unpacking);
/// do the same rather than the image crate's rounding.
fn to_rgb(img: DynamicImage) -> RgbImage {
    match img {
        DynamicImage::ImageRgb16(im) => {
            let (w, h) = im.dimensions();
            RgbImage::from_fn(w, h, |x, y| {
                let p = im.get_pixel(x, y).0;
                image::Rgb([(p[0] >> 8) as u8, (p[1] >> 8) as u8, (p[2] >> 8) as u8])
            })
        }
        DynamicImage::ImageRgba16(im) => {
            let (w, h) = im.dimensions();
            RgbImage::from_fn(w, h, |x, y| {
                let p = im.get_pixel(x, y).0;
                image::Rgb([(p[0] >> 8) as u8, (p[1] >> 8) as u8, (p[2] >> 8) as u8])
            })
        }
        other => other.to_rgb8(),
    }
}

/// Reads the first bytes of a file to tell whether it looks like an image at all (for error
/// messages that name the real problem).
pub fn sniff(path: &Path) -> std::io::Result<Vec<u8>> {
    let mut buf = vec![0u8; 16];
    let n = std::fs::File::open(path)?.read(&mut buf)?;
    buf.truncate(n);
    Ok(buf)
}

// ---------------------------------------------------------------------------------------------
// Pillow's resampling (libImaging/Resample.c), bicubic, 8 bits per channel

/// Pillow's `PRECISION_BITS`: 32 - 8 - 2.
const PRECISION_BITS: u32 = 22;

/// `bicubic_filter` with `a = -0.5`.
fn bicubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// `precompute_coeffs` + `normalize_coeffs_8bpc`: for each output index, the first input index,
/// the number of inputs, and fixed-point weights (`ksize` per output).
struct Coeffs {
    ksize: usize,
    bounds: Vec<(usize, usize)>,
    kk: Vec<i32>,
}

fn precompute_coeffs(in_size: u32, out_size: u32) -> Coeffs {
    const SUPPORT: f64 = 2.0;
    // box = (0, 0, w, h): in0 = 0, in1 = in_size (floats in C; exact for any image size here).
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = SUPPORT * filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let mut bounds = Vec::with_capacity(out_size as usize);
    let mut kk = vec![0i32; out_size as usize * ksize];
    let mut k = vec![0f64; ksize];
    for xx in 0..out_size as usize {
        let center = (xx as f64 + 0.5) * scale;
        let ss = 1.0 / filterscale;
        // (int) casts truncate toward zero, then clamp.
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
        let n = xmax.saturating_sub(xmin);
        let mut ww = 0.0;
        for (x, kx) in k.iter_mut().enumerate().take(n) {
            let w = bicubic(((x + xmin) as f64 - center + 0.5) * ss);
            *kx = w;
            ww += w;
        }
        for (x, kx) in k.iter().enumerate().take(n) {
            let v = if ww != 0.0 { kx / ww } else { *kx };
            let f = v * (1u32 << PRECISION_BITS) as f64;
            kk[xx * ksize + x] = if v < 0.0 {
                (-0.5 + f) as i32
            } else {
                (0.5 + f) as i32
            };
        }
        bounds.push((xmin, n));
    }
    Coeffs { ksize, bounds, kk }
}

/// `clip8`: `in >> PRECISION_BITS`, clamped to 0..=255.
fn clip8(v: i32) -> u8 {
    (v >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Pillow's horizontal pass: rows `y0..y0 + rows` of `s` (`sw` wide) to `c.bounds.len()` columns.
fn hpass(s: &[u8], sw: usize, y0: usize, rows: usize, c: &Coeffs) -> Vec<u8> {
    let w = c.bounds.len();
    let mut out = vec![0u8; rows * w * 3];
    for (yy, orow) in out.chunks_exact_mut(w * 3).enumerate() {
        let irow = &s[(yy + y0) * sw * 3..][..sw * 3];
        for (xx, o) in orow.chunks_exact_mut(3).enumerate() {
            let (xmin, n) = c.bounds[xx];
            let k = &c.kk[xx * c.ksize..][..n];
            let mut acc = [1i32 << (PRECISION_BITS - 1); 3];
            for (x, &kx) in k.iter().enumerate() {
                let p = &irow[(x + xmin) * 3..][..3];
                acc[0] += p[0] as i32 * kx;
                acc[1] += p[1] as i32 * kx;
                acc[2] += p[2] as i32 * kx;
            }
            o.copy_from_slice(&[clip8(acc[0]), clip8(acc[1]), clip8(acc[2])]);
        }
    }
    out
}

/// Pillow's vertical pass: `s` (`width` wide) to `c.bounds.len()` rows; input row = bound - `shift`.
fn vpass(s: &[u8], width: usize, c: &Coeffs, shift: usize) -> Vec<u8> {
    let h = c.bounds.len();
    let mut out = vec![0u8; h * width * 3];
    for (yy, orow) in out.chunks_exact_mut(width * 3).enumerate() {
        let (ymin, n) = c.bounds[yy];
        let ymin = ymin - shift;
        let k = &c.kk[yy * c.ksize..][..n];
        for (xx, o) in orow.chunks_exact_mut(3).enumerate() {
            let mut acc = [1i32 << (PRECISION_BITS - 1); 3];
            for (y, &ky) in k.iter().enumerate() {
                let p = &s[((y + ymin) * width + xx) * 3..][..3];
                acc[0] += p[0] as i32 * ky;
                acc[1] += p[1] as i32 * ky;
                acc[2] += p[2] as i32 * ky;
            }
            o.copy_from_slice(&[clip8(acc[0]), clip8(acc[1]), clip8(acc[2])]);
        }
    }
    out
}

/// `Image.resize((w, h))` with Pillow's default (bicubic) filter on an RGB image: the same bytes
/// Pillow 13 writes. Pass order as Pillow 13 (`ImagingResampleInner`, python-pillow PR 9549):
/// vertical first when the height shrinks by more than twice as many pixels as the width
/// (`in_h - h > 0 && in_h - h > (in_w - w) * 2`), otherwise horizontal first. Pillow 12 and
/// older always run the horizontal pass first; for those images they differ from Pillow 13 by
/// a few levels (the 8-bit rounding between the passes), and so would we from them.
pub fn resize_bicubic(src: &RgbImage, w: u32, h: u32) -> RgbImage {
    let (sw, sh) = src.dimensions();
    if (sw, sh) == (w, h) {
        return src.clone();
    }
    if w == 0 || h == 0 {
        return RgbImage::new(w, h);
    }
    let need_h = w != sw;
    let need_v = h != sh;
    let dh = sh as i64 - h as i64;
    let horizontal_first = !(dh > 0 && dh > (sw as i64 - w as i64) * 2);
    let vert = precompute_coeffs(sh, h);
    let horiz = precompute_coeffs(sw, w);
    let s = src.as_raw();
    let out = if horizontal_first {
        // only the rows the vertical pass reads: ybox_first..ybox_last
        let (first, rows) = if need_v {
            let first = vert.bounds[0].0;
            let last = vert.bounds.last().map_or(first, |&(m, n)| m + n);
            (first, last - first)
        } else {
            (0, sh as usize)
        };
        let tmp = if need_h {
            hpass(s, sw as usize, first, rows, &horiz)
        } else {
            s.clone()
        };
        if need_v {
            vpass(&tmp, w as usize, &vert, if need_h { first } else { 0 })
        } else {
            tmp
        }
    } else {
        let tmp = if need_v {
            vpass(s, sw as usize, &vert, 0)
        } else {
            s.clone()
        };
        if need_h {
            hpass(&tmp, sw as usize, 0, h as usize, &horiz)
        } else {
            tmp
        }
    };
    RgbImage::from_raw(w, h, out).unwrap_or_else(|| RgbImage::new(w, h))
}

/// Python's `round()` on a float: half to even.
fn py_round(x: f64) -> i64 {
    let r = x.round();
    if (x - x.trunc()).abs() == 0.5 {
        (2.0 * (x / 2.0).round()) as i64
    } else {
        r as i64
    }
}

/// `ImageOps.contain(image, (w, h))`: the largest size within `(w, h)` with the image's aspect
/// ratio (Python's float arithmetic and `round`), then a bicubic resize.
pub fn contain(src: &RgbImage, w: u32, h: u32) -> RgbImage {
    let (iw, ih) = src.dimensions();
    let im_ratio = iw as f64 / ih as f64;
    let dest_ratio = w as f64 / h as f64;
    let (mut tw, mut th) = (w, h);
    if im_ratio != dest_ratio {
        if im_ratio > dest_ratio {
            // new_height = round(image.height / image.width * size[0])
            th = py_round(ih as f64 / iw as f64 * w as f64) as u32;
        } else {
            tw = py_round(iw as f64 / ih as f64 * h as f64) as u32;
        }
    }
    if tw.min(th) == 0 {
        return RgbImage::new(tw, th);
    }
    resize_bicubic(src, tw, th)
}

/// `ImageOps.pad(image, (w, h), color=color)`: [`contain`], then centred on a `color` canvas
/// (offset `round((w - rw) * 0.5)`, half to even).
pub fn pad(src: &RgbImage, w: u32, h: u32, color: [u8; 3]) -> RgbImage {
    let resized = contain(src, w, h);
    if resized.dimensions() == (w, h) {
        return resized;
    }
    let mut out = RgbImage::from_pixel(w, h, image::Rgb(color));
    let (rw, rh) = resized.dimensions();
    let (x0, y0) = if rw != w {
        (py_round((w - rw) as f64 * 0.5) as u32, 0)
    } else {
        (0, py_round((h - rh) as f64 * 0.5) as u32)
    };
    image::imageops::replace(&mut out, &resized, x0 as i64, y0 as i64);
    out
}

// ---------------------------------------------------------------------------------------------
// Tiling (Gundam)

/// `target_ratios` of `dynamic_preprocess(min_num=2, max_num=9)`, in the order Python iterates
/// them: `sorted(set(...), key=lambda x: x[0] * x[1])` — a stable sort of a set, so within one
/// product the order is CPython's set order for these tuples, which decides ties in
/// [`find_closest_aspect_ratio`]. Taken from CPython 3.11 (tuple hashes of small ints do not
/// depend on the hash seed); `tests/preprocess_ref.rs` checks it against the interpreter.
pub const TARGET_RATIOS: [(u32, u32); 22] = [
    (1, 2),
    (2, 1),
    (3, 1),
    (1, 3),
    (2, 2),
    (4, 1),
    (1, 4),
    (5, 1),
    (1, 5),
    (1, 6),
    (6, 1),
    (3, 2),
    (2, 3),
    (7, 1),
    (1, 7),
    (4, 2),
    (2, 4),
    (1, 8),
    (8, 1),
    (1, 9),
    (3, 3),
    (9, 1),
];

/// `find_closest_aspect_ratio`: the `(columns, rows)` whose ratio is nearest `aspect_ratio`; on
/// an exact tie the later candidate wins when the image's area exceeds half of the candidate's
/// tiled area.
pub fn find_closest_aspect_ratio(
    aspect_ratio: f64,
    target_ratios: &[(u32, u32)],
    width: u32,
    height: u32,
    image_size: u32,
) -> (u32, u32) {
    let mut best_diff = f64::INFINITY;
    let mut best = (1, 1);
    // area = width * height (a Python int), compared with a float
    let area = width as f64 * height as f64;
    for &(i, j) in target_ratios {
        let target = i as f64 / j as f64;
        let diff = (aspect_ratio - target).abs();
        if diff < best_diff {
            best_diff = diff;
            best = (i, j);
        } else if diff == best_diff
            && area > 0.5 * image_size as f64 * image_size as f64 * i as f64 * j as f64
        {
            best = (i, j);
        }
    }
    best
}

/// `dynamic_preprocess(image)`: the grid `(columns, rows)` and the tiles of `image_size`,
/// row-major, cut from the image resized (aspect not kept) to the grid.
pub fn dynamic_preprocess(img: &RgbImage, image_size: u32) -> (Vec<RgbImage>, (u32, u32)) {
    let (w, h) = img.dimensions();
    let aspect = w as f64 / h as f64;
    let (cols, rows) = find_closest_aspect_ratio(aspect, &TARGET_RATIOS, w, h, image_size);
    let resized = resize_bicubic(img, image_size * cols, image_size * rows);
    let tiles = (0..cols * rows)
        .map(|i| {
            let (x, y) = ((i % cols) * image_size, (i / cols) * image_size);
            image::imageops::crop_imm(&resized, x, y, image_size, image_size).to_image()
        })
        .collect();
    (tiles, (cols, rows))
}

// ---------------------------------------------------------------------------------------------
// Views and tensors

/// `ToTensor()` then `Normalize(0.5, 0.5)`: CHW float32, `(u8 / 255 - 0.5) / 0.5` in float32.
pub fn to_chw(img: &RgbImage) -> Vec<f32> {
    let (w, h) = img.dimensions();
    let n = (w * h) as usize;
    let mut out = vec![0f32; 3 * n];
    for (i, p) in img.pixels().enumerate() {
        for c in 0..3 {
            let x = p.0[c] as f32 / 255.0;
            out[c * n + i] = (x - 0.5) / 0.5;
        }
    }
    out
}

/// One image after preprocessing: the views as RGB images (tensors come from [`to_chw`]).
#[derive(Debug, Clone)]
pub struct Views {
    /// The global view, `global_size` square.
    pub global: RgbImage,
    /// Local tiles (Gundam with a side over 640), row-major; empty otherwise.
    pub tiles: Vec<RgbImage>,
    /// `images_spatial_crop`: `[width_crop_num, height_crop_num]` (`[1, 1]` without tiles).
    pub crop: (u32, u32),
}

impl Views {
    /// Image tokens this image takes in the prompt.
    pub fn token_count(&self, mode: Mode) -> usize {
        let n = queries(mode.global_size());
        let mut t = (n + 1) * n + 1;
        if !self.tiles.is_empty() {
            let q = queries(mode.image_size());
            let (wc, hc) = (self.crop.0 as usize, self.crop.1 as usize);
            t += (q * wc + 1) * (q * hc);
        }
        t
    }
}

/// The views of one image in `mode`, as `infer()` builds them.
pub fn views(img: &RgbImage, mode: Mode) -> Views {
    let (w, h) = img.dimensions();
    if mode.crop_mode() {
        // if image.size[0] <= 640 and image.size[1] <= 640: crop_ratio = [1, 1]
        let (tiles, crop) = if w <= 640 && h <= 640 {
            (vec![], (1, 1))
        } else {
            dynamic_preprocess(img, mode.image_size())
        };
        let global = pad(img, mode.base_size(), mode.base_size(), PAD_COLOR);
        // if width_crop_num > 1 or height_crop_num > 1: local views
        let tiles = if crop.0 > 1 || crop.1 > 1 {
            tiles
        } else {
            vec![]
        };
        Views {
            global,
            tiles,
            crop,
        }
    } else {
        let s = mode.image_size();
        // if image_size <= 640: image = image.resize((image_size, image_size))
        let resized;
        let img = if s <= 640 {
            resized = resize_bicubic(img, s, s);
            &resized
        } else {
            img
        };
        let global = pad(img, s, s, PAD_COLOR);
        Views {
            global,
            tiles: vec![],
            crop: (1, 1),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The prompt

/// Python's `str.strip()`: Unicode whitespace plus the ASCII separators `\x1c`-`\x1f`.
fn py_strip(s: &str) -> &str {
    s.trim_matches(|c: char| c.is_whitespace() || ('\x1c'..='\x1f').contains(&c))
}

/// `format_messages(conversation, sft_format="plain")`: the `plain` template writes the user's
/// message (stripped) and nothing else; the whole prompt is stripped again.
pub fn format_plain(prompt: &str) -> String {
    py_strip(py_strip(prompt)).to_string()
}

/// The model's input for one prompt.
#[derive(Debug, Clone, PartialEq)]
pub struct PromptTokens {
    pub input_ids: Vec<u32>,
    pub images_seq_mask: Vec<bool>,
    /// `[width_crop_num, height_crop_num]` per image.
    pub images_spatial_crop: Vec<(u32, u32)>,
}

/// `infer()`'s token sequence: bos, then for each `<image>` split the text's tokens followed by
/// the image's tokens — global view `([id] * n + [id]) * n + [id]`, then for tiles
/// `([id] * (q * w) + [id]) * (q * h)` — then the last split's tokens. `encode` is
/// `tokenizer.encode(text, add_special_tokens=False)`.
pub fn build_prompt<E>(
    prompt: &str,
    images: &[Views],
    mode: Mode,
    mut encode: impl FnMut(&str) -> Result<Vec<u32>, E>,
) -> Result<Result<PromptTokens, E>, PreprocessError> {
    let text = format_plain(prompt);
    let splits: Vec<&str> = text.split(IMAGE_TOKEN).collect();
    if splits.len() - 1 != images.len() {
        return Err(PreprocessError::Placeholders {
            placeholders: splits.len() - 1,
            images: images.len(),
        });
    }
    Ok((|| {
        let mut ids = vec![BOS_ID];
        let mut mask = vec![false];
        let mut crops = vec![];
        for (sep, v) in splits.iter().zip(images) {
            let t = encode(sep)?;
            mask.extend(std::iter::repeat(false).take(t.len()));
            ids.extend(t);
            let n = v.token_count(mode);
            ids.extend(std::iter::repeat(IMAGE_TOKEN_ID).take(n));
            mask.extend(std::iter::repeat(true).take(n));
            crops.push(v.crop);
        }
        let t = encode(splits[splits.len() - 1])?;
        mask.extend(std::iter::repeat(false).take(t.len()));
        ids.extend(t);
        Ok(PromptTokens {
            input_ids: ids,
            images_seq_mask: mask,
            images_spatial_crop: crops,
        })
    })())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gradient(w: u32, h: u32) -> RgbImage {
        RgbImage::from_fn(w, h, |x, y| {
            image::Rgb([
                (x * 255 / w.max(1)) as u8,
                (y * 255 / h.max(1)) as u8,
                ((x ^ y) & 255) as u8,
            ])
        })
    }

    #[test]
    fn token_counts_per_mode() {
        let img = gradient(300, 200);
        let counts: Vec<usize> = Mode::ALL
            .iter()
            .map(|&m| views(&img, m).token_count(m))
            .collect();
        // tiny 73, small 111, base 273, large 421, gundam (small image: global only) 273
        assert_eq!(counts, vec![73, 111, 273, 421, 273]);
        let big = gradient(1500, 1000);
        let v = views(&big, Mode::Gundam);
        assert_eq!(v.crop, (3, 2));
        assert_eq!(v.tiles.len(), 6);
        assert_eq!(v.token_count(Mode::Gundam), 273 + (30 + 1) * 20);
        assert_eq!(
            crate::model::vision::image_token_count(1024, Some((640, 3, 2))),
            273 + 31 * 20
        );
    }

    #[test]
    fn target_ratios_are_the_set_sorted_by_product() {
        let mut want: Vec<(u32, u32)> = (1..=9)
            .flat_map(|i| (1..=9).map(move |j| (i, j)))
            .filter(|(i, j)| (2..=9).contains(&(i * j)))
            .collect();
        let mut got = TARGET_RATIOS.to_vec();
        want.sort();
        got.sort();
        assert_eq!(got, want);
        assert!(TARGET_RATIOS
            .windows(2)
            .all(|w| w[0].0 * w[0].1 <= w[1].0 * w[1].1));
    }

    #[test]
    fn python_round_is_half_to_even() {
        assert_eq!(py_round(0.5), 0);
        assert_eq!(py_round(1.5), 2);
        assert_eq!(py_round(2.5), 2);
        assert_eq!(py_round(123.5), 124);
        assert_eq!(py_round(2.4999), 2);
        assert_eq!(py_round(2.5001), 3);
    }

    #[test]
    fn pad_keeps_aspect_and_centres_on_grey() {
        let img = RgbImage::from_pixel(200, 100, image::Rgb([10, 20, 30]));
        let p = pad(&img, 1024, 1024, PAD_COLOR);
        assert_eq!(p.dimensions(), (1024, 1024));
        assert_eq!(p.get_pixel(512, 0).0, PAD_COLOR);
        assert_eq!(p.get_pixel(512, 512).0, [10, 20, 30]);
        // 512 rows of image, offset round(512 * 0.5) = 256
        assert_eq!(p.get_pixel(0, 255).0, PAD_COLOR);
        assert_eq!(p.get_pixel(0, 256).0, [10, 20, 30]);
        assert_eq!(p.get_pixel(0, 767).0, [10, 20, 30]);
        assert_eq!(p.get_pixel(0, 768).0, PAD_COLOR);
    }

    #[test]
    fn resizing_a_flat_image_keeps_its_colour() {
        let img = RgbImage::from_pixel(37, 91, image::Rgb([200, 3, 127]));
        for (w, h) in [(640, 640), (5, 7), (37, 200), (1, 1)] {
            let r = resize_bicubic(&img, w, h);
            assert!(r.pixels().all(|p| p.0 == [200, 3, 127]), "{w}x{h}");
        }
    }

    #[test]
    fn normalisation_is_to_tensor_then_half_half() {
        let img = RgbImage::from_pixel(1, 1, image::Rgb([0, 255, 128]));
        assert_eq!(to_chw(&img), vec![-1.0, 1.0, (128f32 / 255.0 - 0.5) / 0.5]);
    }

    #[test]
    fn prompt_layout_bos_text_image_text() {
        let img = gradient(100, 100);
        let v = views(&img, Mode::Tiny);
        let enc =
            |s: &str| -> Result<Vec<u32>, ()> { Ok(s.bytes().map(|b| 1000 + b as u32).collect()) };
        let p = build_prompt("  ab<image>\ncd ", &[v], Mode::Tiny, enc)
            .unwrap()
            .unwrap();
        assert_eq!(p.input_ids.len(), 1 + 2 + 73 + 3);
        assert_eq!(
            &p.input_ids[..3],
            &[0, 1000 + b'a' as u32, 1000 + b'b' as u32]
        );
        assert!(p.images_seq_mask[3..76].iter().all(|&m| m));
        assert_eq!(p.images_seq_mask.iter().filter(|&&m| m).count(), 73);
        assert_eq!(
            &p.input_ids[76..],
            &[1000 + b'\n' as u32, 1000 + b'c' as u32, 1000 + b'd' as u32]
        );
        assert_eq!(p.images_spatial_crop, vec![(1, 1)]);
        let e = build_prompt(
            "no placeholder",
            &[views(&img, Mode::Tiny)],
            Mode::Tiny,
            enc,
        )
        .unwrap_err();
        assert!(
            e.to_string()
                .contains("0 `<image>` placeholder(s) for 1 image"),
            "{e}"
        );
    }

    #[test]
    fn bad_images_are_errors() {
        let e = decode_image(b"not an image at all", "x.png", MAX_IMAGE_PIXELS).unwrap_err();
        assert!(matches!(e, PreprocessError::Undecodable { .. }), "{e}");
        // A PNG signature followed by garbage.
        let mut bytes = b"\x89PNG\r\n\x1a\n".to_vec();
        bytes.extend_from_slice(&[0u8; 40]);
        let e = decode_image(&bytes, "x.png", MAX_IMAGE_PIXELS).unwrap_err();
        assert!(matches!(e, PreprocessError::Undecodable { .. }), "{e}");
    }
}
