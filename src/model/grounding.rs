//! Grounding output: `<|ref|>LABEL<|/ref|><|det|>[[x1, y1, x2, y2], ...]<|/det|>` spans, as
//! the remote code's `re_match` finds them and `draw_bounding_boxes` reads them. Coordinates are
//! normalised to 0..999 (`x1 = int(x1 / 999 * image_width)`), of the image as loaded (after EXIF
//! orientation), not of the padded or tiled views.
//!
//! Owns: model text -> labelled boxes and the cleaned markdown (`result.mmd`). Pure text.

use serde::Serialize;

/// One `<|ref|>...<|det|>` span.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Grounded {
    pub label: String,
    /// As the model wrote them (0..999).
    pub normalized: Vec<[f64; 4]>,
    /// `int(v / 999 * size)`, per box: `[x1, y1, x2, y2]` in pixels of the original image.
    pub pixels: Vec<[i64; 4]>,
    /// The whole span as it appears in the text.
    #[serde(skip)]
    pub span: String,
}

fn pattern() -> &'static regex::Regex {
    static RE: std::sync::OnceLock<regex::Regex> = std::sync::OnceLock::new();
    // r'(<\|ref\|>(.*?)<\|/ref\|><\|det\|>(.*?)<\|/det\|>)' with re.DOTALL
    RE.get_or_init(|| {
        regex::Regex::new(r"(?s)(<\|ref\|>(.*?)<\|/ref\|><\|det\|>(.*?)<\|/det\|>)")
            .unwrap_or_else(|e| panic!("grounding pattern: {e}"))
    })
}

/// `eval(ref_text[2])` for what the model writes there: a list of 4-number lists. Anything
/// else gives `None` (Python prints the exception and skips the span).
fn parse_boxes(s: &str) -> Option<Vec<[f64; 4]>> {
    let v: serde_json::Value = serde_json::from_str(s.trim()).ok()?;
    let outer = v.as_array()?;
    outer
        .iter()
        .map(|b| {
            let b = b.as_array()?;
            if b.len() != 4 {
                return None;
            }
            let mut out = [0.0; 4];
            for (o, x) in out.iter_mut().zip(b) {
                *o = x.as_f64()?;
            }
            Some(out)
        })
        .collect()
}

/// Every well-formed span of `text`, in order, with boxes in pixels of a `width` x `height` image.
pub fn parse(text: &str, width: u32, height: u32) -> Vec<Grounded> {
    pattern()
        .captures_iter(text)
        .filter_map(|c| {
            let normalized = parse_boxes(&c[3])?;
            let px = |v: f64, size: u32| (v / 999.0 * size as f64) as i64;
            let pixels = normalized
                .iter()
                .map(|b| {
                    [
                        px(b[0], width),
                        px(b[1], height),
                        px(b[2], width),
                        px(b[3], height),
                    ]
                })
                .collect();
            Some(Grounded {
                label: c[2].to_string(),
                normalized,
                pixels,
                span: c[1].to_string(),
            })
        })
        .collect()
}

/// The markdown `infer(save_results=True)` writes to `result.mmd`: image spans become
/// `![](images/N.jpg)\n`, the other spans are removed, `\coloneqq` -> `:=`, `\eqqcolon` -> `=:`.
/// (Every span counts here, parsable boxes or not, as in `re_match`.)
pub fn markdown(text: &str) -> String {
    let mut out = text.trim().to_string();
    let spans: Vec<String> = pattern()
        .captures_iter(&out.clone())
        .map(|c| c[1].to_string())
        .collect();
    let (images, others): (Vec<_>, Vec<_>) = spans
        .into_iter()
        .partition(|s| s.contains("<|ref|>image<|/ref|>"));
    for (i, s) in images.iter().enumerate() {
        out = out.replace(s.as_str(), &format!("![](images/{i}.jpg)\n"));
    }
    for s in &others {
        out = out
            .replace(s.as_str(), "")
            .replace("\\coloneqq", ":=")
            .replace("\\eqqcolon", "=:");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boxes_scale_from_0_999_to_pixels_with_truncation() {
        let text = "<|ref|>title<|/ref|><|det|>[[0, 10, 999, 500]]<|/det|>\n# Hello\n\
                    <|ref|>text<|/ref|><|det|>[[100, 200, 300, 400], [1, 2, 3, 4]]<|/det|>\nbody";
        let g = parse(text, 1000, 2000);
        assert_eq!(g.len(), 2);
        assert_eq!(g[0].label, "title");
        // int(10 / 999 * 2000) = int(20.02) = 20; int(999 / 999 * 1000) = 1000
        assert_eq!(g[0].pixels, vec![[0, 20, 1000, 1001]]); // int(500 / 999 * 2000) = 1001
        assert_eq!(g[1].pixels, vec![[100, 400, 300, 800], [1, 4, 3, 8]]);
        assert_eq!(g[1].normalized[1], [1.0, 2.0, 3.0, 4.0]);
    }

    #[test]
    fn malformed_spans_are_skipped_like_python() {
        let text = "<|ref|>a<|/ref|><|det|>[[1, 2, 3]]<|/det|><|ref|>b<|/ref|><|det|>oops<|/det|>\
                    <|ref|>c<|/ref|><|det|>[[1,2,3,4]]<|/det|><|ref|>unclosed<|/ref|><|det|>[[1";
        let g = parse(text, 999, 999);
        assert_eq!(
            g.iter().map(|g| g.label.as_str()).collect::<Vec<_>>(),
            vec!["c"]
        );
        assert_eq!(g[0].pixels, vec![[1, 2, 3, 4]]);
    }

    #[test]
    fn markdown_replaces_images_and_drops_other_spans() {
        let text = " <|ref|>image<|/ref|><|det|>[[1,2,3,4]]<|/det|>\n<|ref|>text<|/ref|><|det|>[[5,6,7,8]]<|/det|>\n$a \\coloneqq b$ ";
        assert_eq!(markdown(text), "![](images/0.jpg)\n\n\n$a := b$");
    }
}
