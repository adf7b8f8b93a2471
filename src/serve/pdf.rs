//! PDF pages as images, for `serve` and `ocr FILE.pdf`: the page count is read first and
//! checked against a limit before anything is rendered; each page is rasterised at a chosen DPI
//! onto white and refused when it would exceed the pixel limit.
//!
//! Renderer: `hayro` (pure Rust, maintained, regression-tested on the pdf.js and PDFBox corpora,
//! standard fonts embedded), so builds and CI need no system library (no pdfium, no poppler).
//! Encrypted documents and a few blending features are not supported by it; such pages fail
//! or render approximately.

use hayro::hayro_interpret::InterpreterSettings;
use hayro::hayro_syntax::Pdf;
use hayro::vello_cpu::color::palette::css::WHITE;
use hayro::{PixmapSettings, RenderCache, RenderSettings};
use image::RgbImage;

/// DPI used when none is asked for (DeepSeek's PDF script renders at 144).
pub const DEFAULT_DPI: u32 = 144;
/// Largest side the rasteriser can produce.
const MAX_SIDE: f64 = 65535.0;

#[derive(Debug, thiserror::Error)]
pub enum PdfError {
    #[error("{name}: not a readable PDF ({reason}); send an unencrypted PDF")]
    Unreadable { name: String, reason: String },
    #[error("{name}: the PDF has {pages} pages, more than the limit of {limit}; send fewer pages or select some")]
    TooManyPages {
        name: String,
        pages: usize,
        limit: usize,
    },
    #[error("{name}: the PDF has no pages")]
    NoPages { name: String },
    #[error("{name}: page {page} does not exist (the PDF has {pages}); pages are numbered from 1")]
    NoSuchPage {
        name: String,
        page: usize,
        pages: usize,
    },
    #[error("{name}: page {page} at {dpi} dpi would be {width} x {height} pixels, over the limit of {limit}; use a lower dpi")]
    PageTooLarge {
        name: String,
        page: usize,
        dpi: u32,
        width: u64,
        height: u64,
        limit: u64,
    },
    #[error("dpi must be between 18 and 600, got {0}")]
    Dpi(u32),
}

/// Is this a PDF (by its magic bytes, as readers accept leading junk within 1 KiB)?
pub fn is_pdf(bytes: &[u8]) -> bool {
    let head = &bytes[..bytes.len().min(1024)];
    head.windows(5).any(|w| w == b"%PDF-")
}

fn open(bytes: &[u8], name: &str) -> Result<Pdf, PdfError> {
    Pdf::new(bytes.to_vec()).map_err(|e| PdfError::Unreadable {
        name: name.to_string(),
        reason: format!("{e:?}").to_lowercase(),
    })
}

/// Number of pages.
pub fn page_count(bytes: &[u8], name: &str) -> Result<usize, PdfError> {
    Ok(open(bytes, name)?.pages().len())
}

/// Renders the pages `select` (1-based; all when empty) at `dpi`. Refuses before rendering
/// anything when the document (or the selection) has more than `max_pages` pages, or when a
/// page would have more than `max_pixels` pixels.
pub fn render_pages(
    bytes: &[u8],
    name: &str,
    select: &[usize],
    dpi: u32,
    max_pages: usize,
    max_pixels: u64,
) -> Result<Vec<(usize, RgbImage)>, PdfError> {
    if !(18..=600).contains(&dpi) {
        return Err(PdfError::Dpi(dpi));
    }
    let pdf = open(bytes, name)?;
    let pages = pdf.pages();
    let n = pages.len();
    if n == 0 {
        return Err(PdfError::NoPages {
            name: name.to_string(),
        });
    }
    let wanted: Vec<usize> = if select.is_empty() {
        (1..=n).collect()
    } else {
        select.to_vec()
    };
    if wanted.len() > max_pages {
        return Err(PdfError::TooManyPages {
            name: name.to_string(),
            pages: wanted.len(),
            limit: max_pages,
        });
    }
    let scale = dpi as f32 / 72.0;
    // Every check before the first page is drawn.
    for &p in &wanted {
        if p == 0 || p > n {
            return Err(PdfError::NoSuchPage {
                name: name.to_string(),
                page: p,
                pages: n,
            });
        }
        let (w, h) = pages[p - 1].render_dimensions();
        let (w, h) = ((w * scale) as f64, (h * scale) as f64);
        if w < 1.0 || h < 1.0 || w > MAX_SIDE || h > MAX_SIDE || (w * h) as u64 > max_pixels {
            return Err(PdfError::PageTooLarge {
                name: name.to_string(),
                page: p,
                dpi,
                width: w.max(0.0) as u64,
                height: h.max(0.0) as u64,
                limit: max_pixels,
            });
        }
    }
    let cache = RenderCache::new();
    let interp = InterpreterSettings::default();
    let settings = RenderSettings::default();
    let px = PixmapSettings {
        x_scale: scale,
        y_scale: scale,
        bg_color: WHITE,
    };
    Ok(wanted
        .into_iter()
        .map(|p| {
            let pix = hayro::render(&pages[p - 1], &cache, &interp, &settings, &px);
            let (w, h) = (pix.width() as u32, pix.height() as u32);
            // premultiplied RGBA over white
            let rgb: Vec<u8> = pix
                .data_as_u8_slice()
                .chunks_exact(4)
                .flat_map(|c| {
                    let a = 255 - c[3];
                    [
                        c[0].saturating_add(a),
                        c[1].saturating_add(a),
                        c[2].saturating_add(a),
                    ]
                })
                .collect();
            (
                p,
                RgbImage::from_raw(w, h, rgb).unwrap_or_else(|| RgbImage::new(w.max(1), h.max(1))),
            )
        })
        .collect())
}

/// A minimal valid PDF of `pages` pages of `w` x `h` points, each with a filled black
/// rectangle in its upper left quarter, 4 points further right on each page (modulo 8 pages):
/// for tests and examples, no library needed to write it.
pub fn synthetic_pdf(pages: usize, w: u32, h: u32) -> Vec<u8> {
    let mut out = b"%PDF-1.4\n".to_vec();
    let mut offsets = vec![];
    let mut obj = |out: &mut Vec<u8>, body: String| {
        offsets.push(out.len());
        let id = offsets.len();
        out.extend_from_slice(format!("{id} 0 obj\n{body}\nendobj\n").as_bytes());
    };
    // 1: catalog, 2: pages, then per page its page object and its content stream
    obj(&mut out, "<< /Type /Catalog /Pages 2 0 R >>".into());
    let kids: Vec<String> = (0..pages).map(|i| format!("{} 0 R", 3 + 2 * i)).collect();
    obj(
        &mut out,
        format!(
            "<< /Type /Pages /Kids [{}] /Count {pages} >>",
            kids.join(" ")
        ),
    );
    for i in 0..pages {
        obj(
            &mut out,
            format!(
                "<< /Type /Page /Parent 2 0 R /MediaBox [0 0 {w} {h}] /Contents {} 0 R >>",
                4 + 2 * i
            ),
        );
        // the rectangle moves right by 4 points a page, so pages differ
        let x = w / 8 + 4 * (i as u32 % 8);
        let content = format!("0 0 0 rg {x} {} {} {} re f", h / 2, w / 3, h / 3);
        obj(
            &mut out,
            format!(
                "<< /Length {} >>\nstream\n{content}\nendstream",
                content.len()
            ),
        );
    }
    let xref = out.len();
    let n = offsets.len() + 1;
    out.extend_from_slice(format!("xref\n0 {n}\n0000000000 65535 f \n").as_bytes());
    for o in &offsets {
        out.extend_from_slice(format!("{o:010} 00000 n \n").as_bytes());
    }
    out.extend_from_slice(
        format!("trailer\n<< /Size {n} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n").as_bytes(),
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_pages_at_the_dpi_with_the_drawn_rectangle() {
        let pdf = synthetic_pdf(3, 144, 72);
        assert!(is_pdf(&pdf));
        assert_eq!(page_count(&pdf, "t.pdf").unwrap(), 3);
        let pages = render_pages(&pdf, "t.pdf", &[2], 144, 10, 1 << 30).unwrap();
        assert_eq!(pages.len(), 1);
        let (n, img) = &pages[0];
        assert_eq!((*n, img.dimensions()), (2, (288, 144)));
        // white margin, black rectangle: x from 22pt on page 2, y (PDF up) 36..60pt -> pixels 24..72 from the top
        assert_eq!(img.get_pixel(2, 2).0, [255, 255, 255]);
        assert_eq!(img.get_pixel(60, 50).0, [0, 0, 0]);
    }

    #[test]
    fn limits_are_checked_before_rendering() {
        let pdf = synthetic_pdf(10_000, 10, 10);
        let e = render_pages(&pdf, "big.pdf", &[], 72, 100, 1 << 30).unwrap_err();
        assert!(
            matches!(
                e,
                PdfError::TooManyPages {
                    pages: 10_000,
                    limit: 100,
                    ..
                }
            ),
            "{e}"
        );
        let pdf = synthetic_pdf(1, 600, 600);
        let e = render_pages(&pdf, "p.pdf", &[], 600, 10, 1_000_000).unwrap_err();
        assert!(
            matches!(e, PdfError::PageTooLarge { width: 5000, .. }),
            "{e}"
        );
        let e = render_pages(&pdf, "p.pdf", &[2], 72, 10, 1 << 30).unwrap_err();
        assert!(e.to_string().contains("page 2 does not exist"), "{e}");
        assert!(matches!(
            render_pages(b"%PDF-1.4 junk", "j.pdf", &[], 72, 10, 1 << 30),
            Err(PdfError::Unreadable { .. })
        ));
    }
}
