//! The OpenAI chat-completions request as this server reads it, turned into work items: images
//! from `image_url` parts (data URLs, allowed local files, remote URLs when enabled) and PDF
//! pages, each with its prompt tokens and decoding settings; and the errors, as OpenAI-style
//! JSON with a 4xx/5xx status.
//!
//! Owns: request validation and limits (pixels, pages, images per request, token budget).
//! Runs on a blocking thread (image decoding, PDF rendering and preprocessing are CPU work).

use std::collections::HashSet;
use std::path::Path;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use image::RgbImage;
use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::pdf;
use super::ServeConfig;
use crate::model::generate::{GenerationConfig, NoRepeatNgram, Sampling};
use crate::model::ocr::{self, OcrEngine, OcrError, Prepared};
use crate::model::preprocess::{self, Mode, PreprocessError};
use crate::model::tokenizer::EOS_ID;

/// `infer()`'s plain OCR prompt (as `ocr-patch ocr`).
pub const FREE_OCR_PROMPT: &str = "<image>\nFree OCR.";
/// `infer()`'s document prompt with layout boxes (as `ocr-patch ocr --grounding`).
pub const GROUNDING_PROMPT: &str = "<image>\n<|grounding|>Convert the document to markdown.";
/// Put between the texts of the pages (images) of one request, as DeepSeek's PDF script does.
pub const PAGE_SPLIT: &str = "\n<--- Page Split --->\n";

/// An error answered as `{"error": {"message", "type", "code"}}`.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }
    pub fn bad(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }
    fn kind(&self) -> &'static str {
        match self.status.as_u16() {
            401 => "authentication_error",
            404 => "not_found_error",
            413 => "request_too_large",
            429 => "rate_limit_error",
            504 => "timeout_error",
            s if s < 500 => "invalid_request_error",
            _ => "server_error",
        }
    }
    pub fn body(&self) -> serde_json::Value {
        serde_json::json!({"error": {
            "message": self.message,
            "type": self.kind(),
            "code": self.status.as_u16(),
        }})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, axum::Json(self.body())).into_response()
    }
}

impl From<PreprocessError> for ApiError {
    fn from(e: PreprocessError) -> Self {
        let status = match e {
            PreprocessError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            _ => StatusCode::BAD_REQUEST,
        };
        Self::new(status, e.to_string())
    }
}

impl From<pdf::PdfError> for ApiError {
    fn from(e: pdf::PdfError) -> Self {
        let status = match e {
            pdf::PdfError::TooManyPages { .. } | pdf::PdfError::PageTooLarge { .. } => {
                StatusCode::PAYLOAD_TOO_LARGE
            }
            _ => StatusCode::BAD_REQUEST,
        };
        Self::new(status, e.to_string())
    }
}

impl From<OcrError> for ApiError {
    fn from(e: OcrError) -> Self {
        match e {
            OcrError::Preprocess(p) => p.into(),
            OcrError::PromptTooLong { .. } | OcrError::Tokenizer(_) => Self::bad(e.to_string()),
            other => Self::new(StatusCode::INTERNAL_SERVER_ERROR, other.to_string()),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The request

#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    pub model: Option<String>,
    pub messages: Vec<Message>,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    pub max_tokens: Option<usize>,
    pub max_completion_tokens: Option<usize>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    /// vLLM's: -1 or 0 means no cut.
    pub top_k: Option<i64>,
    pub seed: Option<u64>,
    pub n: Option<usize>,
    /// vLLM's per-request extras; DeepSeek-OCR's recipe sends `ngram_size`, `window_size`,
    /// `whitelist_token_ids` for its no-repeat n-gram processor.
    pub vllm_xargs: Option<VllmXargs>,
    /// Top-level spelling of the same guard (`ngram_size` alone: transformers' whole-history
    /// guard; 0 turns any guard off).
    pub ngram_size: Option<usize>,
    pub ngram_window_size: Option<usize>,
    pub ngram_whitelist_token_ids: Option<Vec<u32>>,
    /// tiny, small, base, large, gundam.
    pub mode: Option<String>,
    /// Parse `<|ref|>..<|det|>` spans into boxes in pixels (and default to the grounding prompt).
    #[serde(default)]
    pub grounding: bool,
    /// Also return each image with its boxes drawn, as a PNG data URL.
    #[serde(default)]
    pub draw_boxes: bool,
    /// Return the generated token ids per page (and per stream chunk).
    #[serde(default)]
    pub return_token_ids: bool,
    /// vLLM's: keep generating past eos until max_tokens.
    #[serde(default)]
    pub ignore_eos: bool,
    /// PDF rendering resolution.
    pub dpi: Option<u32>,
    /// PDF pages to run, numbered from 1 (all when absent).
    pub pages: Option<Vec<usize>>,
}

#[derive(Debug, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

#[derive(Debug, Deserialize)]
pub struct VllmXargs {
    pub ngram_size: Option<usize>,
    pub window_size: Option<usize>,
    pub whitelist_token_ids: Option<Vec<u32>>,
}

#[derive(Debug, Deserialize)]
pub struct Message {
    pub role: String,
    #[serde(default)]
    pub content: Option<Content>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Debug, Deserialize)]
#[serde(tag = "type")]
pub enum Part {
    #[serde(rename = "text")]
    Text { text: String },
    #[serde(rename = "image_url")]
    ImageUrl { image_url: ImageUrl },
    /// OpenAI's file part: `{"type": "file", "file": {"file_data": "data:application/pdf;base64,..."}}`.
    #[serde(rename = "file")]
    File { file: FilePart },
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum ImageUrl {
    Object { url: String },
    Plain(String),
}

#[derive(Debug, Deserialize)]
pub struct FilePart {
    pub file_data: Option<String>,
    pub filename: Option<String>,
}

/// Parses the body; JSON syntax and type errors are 400 with serde's message.
pub fn parse(body: &[u8]) -> Result<ChatRequest, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        let what = if e.is_syntax() || e.is_eof() {
            "malformed JSON"
        } else {
            "invalid request"
        };
        ApiError::bad(format!(
            "{what}: {e}; send an OpenAI chat-completions request"
        ))
    })
}

// ---------------------------------------------------------------------------------------------
// Work items

/// One image (or PDF page) of a request, prepared.
pub struct Page {
    /// Where it came from: `image 1`, `doc.pdf page 3`.
    pub source: String,
    pub image: RgbImage,
    pub prepared: Prepared,
    pub key: [u8; 32],
    pub cfg: GenerationConfig,
}

/// What the HTTP side needs besides the pages.
pub struct Plan {
    pub pages: Vec<Page>,
    pub stream: bool,
    pub include_usage: bool,
    pub grounding: bool,
    pub draw_boxes: bool,
    pub return_token_ids: bool,
}

fn parse_mode(s: &str) -> Result<Mode, ApiError> {
    Mode::ALL
        .into_iter()
        .find(|m| m.name().eq_ignore_ascii_case(s))
        .ok_or_else(|| {
            ApiError::bad(format!(
                "unknown mode `{s}`; use tiny, small, base, large or gundam"
            ))
        })
}

fn generation(req: &ChatRequest, max_tokens: usize) -> Result<GenerationConfig, ApiError> {
    let sampling = match req.temperature {
        None => Sampling::Greedy,
        Some(t) if !(0.0..=2.0).contains(&t) || t.is_nan() => {
            return Err(ApiError::bad(format!(
                "temperature must be between 0 and 2, got {t}"
            )))
        }
        Some(t) if t == 0.0 => Sampling::Greedy,
        Some(t) => Sampling::Sample {
            temperature: t,
            top_k: match req.top_k {
                Some(k) if k > 0 => Some(k as usize),
                _ => None,
            },
            top_p: match req.top_p {
                Some(p) if !(p > 0.0 && p <= 1.0) => {
                    return Err(ApiError::bad(format!("top_p must be in (0, 1], got {p}")))
                }
                p => p.filter(|&p| p < 1.0),
            },
            seed: req.seed.unwrap_or(0),
        },
    };
    let x = req.vllm_xargs.as_ref();
    let n = x.and_then(|x| x.ngram_size).or(req.ngram_size);
    let window = x.and_then(|x| x.window_size).or(req.ngram_window_size);
    let whitelist = x
        .and_then(|x| x.whitelist_token_ids.clone())
        .or_else(|| req.ngram_whitelist_token_ids.clone());
    let (no_repeat, sees_prompt) = match n {
        // infer()'s: transformers' no_repeat_ngram_size=20 over prompt and output
        None => (Some(NoRepeatNgram::hf(20)), true),
        Some(0) => (None, false),
        Some(n) if window.is_none() && whitelist.is_none() => (Some(NoRepeatNgram::hf(n)), true),
        // DeepSeek's vLLM processor: output only, a window, a whitelist
        Some(n) => (
            Some(NoRepeatNgram {
                n,
                window,
                whitelist: whitelist
                    .unwrap_or_default()
                    .into_iter()
                    .collect::<HashSet<_>>(),
            }),
            false,
        ),
    };
    Ok(GenerationConfig {
        max_new_tokens: max_tokens,
        stop_tokens: if req.ignore_eos { vec![] } else { vec![EOS_ID] },
        sampling,
        no_repeat,
        ngram_sees_prompt: sees_prompt,
    })
}

/// Bytes behind one `image_url` / `file` reference.
fn fetch(url: &str, cfg: &ServeConfig, index: usize) -> Result<(String, Vec<u8>), ApiError> {
    let name = format!("image {index}");
    if let Some(rest) = url.strip_prefix("data:") {
        let Some((meta, data)) = rest.split_once(',') else {
            return Err(ApiError::bad(format!(
                "{name}: a data URL needs a comma before its data"
            )));
        };
        if !meta.ends_with(";base64") {
            return Err(ApiError::bad(format!(
                "{name}: only base64 data URLs are accepted"
            )));
        }
        let limit = cfg.max_body_bytes;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(data.trim())
            .map_err(|e| {
                ApiError::bad(format!("{name}: the data URL is not valid base64 ({e})"))
            })?;
        if bytes.len() > limit {
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("{name}: over {limit} bytes"),
            ));
        }
        return Ok((name, bytes));
    }
    if url.starts_with("http://") || url.starts_with("https://") {
        if !cfg.allow_remote_urls {
            return Err(ApiError::bad(format!(
                "{name}: remote image URLs are disabled; send a data URL, or start the server with --allow-remote-urls"
            )));
        }
        return fetch_remote(url, cfg.max_body_bytes).map(|b| (url.to_string(), b));
    }
    let path = url.strip_prefix("file://").unwrap_or(url);
    let Some(root) = &cfg.allowed_local_media_path else {
        return Err(ApiError::bad(format!(
            "{name}: local files are disabled; send a data URL, or start the server with --allowed-local-media-path DIR"
        )));
    };
    let denied = || {
        ApiError::new(
            StatusCode::FORBIDDEN,
            format!("{path}: not a readable file under the allowed local media path"),
        )
    };
    let full = Path::new(path).canonicalize().map_err(|_| denied())?;
    let root = root.canonicalize().map_err(|_| denied())?;
    if !full.starts_with(&root) || !full.is_file() {
        return Err(denied());
    }
    let len = std::fs::metadata(&full).map_err(|_| denied())?.len();
    if len > cfg.max_body_bytes as u64 {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("{path}: over {} bytes", cfg.max_body_bytes),
        ));
    }
    let bytes = std::fs::read(&full).map_err(|_| denied())?;
    Ok((path.to_string(), bytes))
}

fn fetch_remote(url: &str, limit: usize) -> Result<Vec<u8>, ApiError> {
    use std::io::Read;
    let fail = |m: String| ApiError::bad(format!("{url}: cannot fetch the image ({m})"));
    let client = reqwest::blocking::Client::builder()
        .timeout(std::time::Duration::from_secs(30))
        .build()
        .map_err(|e| fail(e.to_string()))?;
    let resp = client.get(url).send().map_err(|e| fail(e.to_string()))?;
    if !resp.status().is_success() {
        return Err(fail(format!("HTTP {}", resp.status())));
    }
    let mut out = Vec::new();
    resp.take(limit as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|e| fail(e.to_string()))?;
    if out.len() > limit {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("{url}: over {limit} bytes"),
        ));
    }
    Ok(out)
}

fn pixel_key(img: &RgbImage, mode: Mode) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(mode.name().as_bytes());
    h.update(img.width().to_le_bytes());
    h.update(img.height().to_le_bytes());
    h.update(img.as_raw());
    h.finalize().into()
}

/// Validates the request and prepares every page. Blocking.
pub fn plan(req: ChatRequest, cfg: &ServeConfig, engine: &OcrEngine) -> Result<Plan, ApiError> {
    if let Some(m) = &req.model {
        if m != &cfg.model_name {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                format!(
                    "the model `{m}` does not exist; this server serves `{}`",
                    cfg.model_name
                ),
            ));
        }
    }
    if req.n.unwrap_or(1) != 1 {
        return Err(ApiError::bad("n must be 1"));
    }
    let Some(user) = req.messages.iter().rev().find(|m| m.role == "user") else {
        return Err(ApiError::bad(
            "the request has no user message; send the image in a user message",
        ));
    };
    let mode = match &req.mode {
        Some(m) => parse_mode(m)?,
        None => cfg.mode,
    };
    let max_tokens = req
        .max_completion_tokens
        .or(req.max_tokens)
        .unwrap_or(cfg.max_tokens);
    if max_tokens == 0 {
        return Err(ApiError::bad("max_tokens must be at least 1"));
    }
    if max_tokens > cfg.max_tokens {
        return Err(ApiError::bad(format!(
            "max_tokens is {max_tokens}, over this server's limit of {}",
            cfg.max_tokens
        )));
    }
    let gen = generation(&req, max_tokens)?;
    let dpi = req.dpi.unwrap_or(cfg.pdf_dpi);

    let mut texts = vec![];
    let mut refs = vec![];
    match &user.content {
        Some(Content::Text(t)) => texts.push(t.clone()),
        Some(Content::Parts(parts)) => {
            for p in parts {
                match p {
                    Part::Text { text } => texts.push(text.clone()),
                    Part::ImageUrl { image_url } => refs.push(match image_url {
                        ImageUrl::Object { url } | ImageUrl::Plain(url) => url.clone(),
                    }),
                    Part::File { file } => match &file.file_data {
                        Some(d) => refs.push(d.clone()),
                        None => {
                            return Err(ApiError::bad(
                                "a file part needs file_data (a base64 data URL)",
                            ))
                        }
                    },
                }
            }
        }
        None => {}
    }
    if refs.is_empty() {
        return Err(ApiError::bad(
            "the user message has no image; add an image_url part",
        ));
    }
    if refs.len() > cfg.max_pages {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "{} images, over the limit of {} per request",
                refs.len(),
                cfg.max_pages
            ),
        ));
    }
    let text = texts.join("\n");
    let prompt = if text.trim().is_empty() {
        if req.grounding {
            GROUNDING_PROMPT
        } else {
            FREE_OCR_PROMPT
        }
        .to_string()
    } else if text.contains(preprocess::IMAGE_TOKEN) {
        text
    } else {
        format!("{}\n{text}", preprocess::IMAGE_TOKEN)
    };

    let mut images: Vec<(String, RgbImage)> = vec![];
    for (i, r) in refs.iter().enumerate() {
        let (name, bytes) = fetch(r, cfg, i + 1)?;
        if pdf::is_pdf(&bytes) {
            let left = cfg.max_pages - images.len();
            let select = req.pages.clone().unwrap_or_default();
            let pages = pdf::render_pages(&bytes, &name, &select, dpi, left, cfg.max_pixels)?;
            images.extend(
                pages
                    .into_iter()
                    .map(|(p, img)| (format!("{name} page {p}"), img)),
            );
        } else {
            if images.len() >= cfg.max_pages {
                return Err(ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!(
                        "over the limit of {} images and pages per request",
                        cfg.max_pages
                    ),
                ));
            }
            images.push((
                name.clone(),
                preprocess::decode_image(&bytes, &name, cfg.max_pixels)?,
            ));
        }
    }
    let pages = images
        .into_iter()
        .map(|(source, image)| {
            let prepared = ocr::prepare(&engine.tokenizer, engine.context(), &image, mode, &prompt)
                .map_err(|e| {
                    let e = ApiError::from(e);
                    ApiError::new(e.status, format!("{source}: {}", e.message))
                })?;
            Ok(Page {
                key: pixel_key(&image, mode),
                source,
                image,
                prepared,
                cfg: gen.clone(),
            })
        })
        .collect::<Result<Vec<_>, ApiError>>()?;
    Ok(Plan {
        pages,
        stream: req.stream,
        include_usage: req.stream_options.map_or(false, |o| o.include_usage),
        grounding: req.grounding || prompt.contains("<|grounding|>"),
        draw_boxes: req.draw_boxes,
        return_token_ids: req.return_token_ids,
    })
}

/// `image` with each box outlined (3 px, a colour per label), as a PNG data URL.
pub fn draw_boxes(image: &RgbImage, boxes: &[crate::model::grounding::Grounded]) -> String {
    let mut img = image.clone();
    let (w, h) = (img.width() as i64, img.height() as i64);
    for g in boxes {
        let d = Sha256::digest(g.label.as_bytes());
        let color = image::Rgb([d[0] / 2 + 100, d[1] / 2, d[2] / 2]);
        for b in &g.pixels {
            let (x1, y1) = (b[0].clamp(0, w - 1), b[1].clamp(0, h - 1));
            let (x2, y2) = (b[2].clamp(0, w - 1), b[3].clamp(0, h - 1));
            for t in 0..3 {
                for x in x1..=x2 {
                    for y in [y1 + t, y2 - t] {
                        if (0..h).contains(&y) {
                            img.put_pixel(x as u32, y as u32, color);
                        }
                    }
                }
                for y in y1..=y2 {
                    for x in [x1 + t, x2 - t] {
                        if (0..w).contains(&x) {
                            img.put_pixel(x as u32, y as u32, color);
                        }
                    }
                }
            }
        }
    }
    let mut png = Vec::new();
    let _ = img.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png);
    format!(
        "data:image/png;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(png)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ngram_settings_follow_vllm_xargs_or_infer() {
        let req = |j: &str| parse(j.as_bytes()).unwrap();
        let base = r#"{"messages": [{"role": "user", "content": "x"}]"#;
        let g = generation(&req(&format!("{base}}}")), 8).unwrap();
        assert_eq!(
            (g.no_repeat, g.ngram_sees_prompt),
            (Some(NoRepeatNgram::hf(20)), true)
        );
        let g = generation(
            &req(&format!(
                r#"{base}, "vllm_xargs": {{"ngram_size": 30, "window_size": 90, "whitelist_token_ids": [128821, 128822]}}}}"#
            )),
            8,
        )
        .unwrap();
        assert_eq!(
            (g.no_repeat, g.ngram_sees_prompt),
            (Some(NoRepeatNgram::vllm()), false)
        );
        let g = generation(&req(&format!(r#"{base}, "ngram_size": 0}}"#)), 8).unwrap();
        assert_eq!(g.no_repeat, None);
        let g = generation(
            &req(&format!(
                r#"{base}, "temperature": 0.5, "seed": 3, "top_k": -1}}"#
            )),
            8,
        )
        .unwrap();
        assert_eq!(
            g.sampling,
            Sampling::Sample {
                temperature: 0.5,
                top_k: None,
                top_p: None,
                seed: 3
            }
        );
        assert!(generation(&req(&format!(r#"{base}, "temperature": 9}}"#)), 8).is_err());
    }

    #[test]
    fn malformed_and_mistyped_bodies_are_400() {
        for body in [
            &b"{"[..],
            b"[]",
            br#"{"messages": "hi"}"#,
            br#"{"messages": [], "max_tokens": "many"}"#,
        ] {
            let e = parse(body).err().unwrap();
            assert_eq!(e.status, StatusCode::BAD_REQUEST, "{}", e.message);
            assert_eq!(e.body()["error"]["code"], 400);
        }
    }

    #[test]
    fn boxes_are_drawn_inside_the_image() {
        let img = RgbImage::from_pixel(20, 10, image::Rgb([255, 255, 255]));
        let g = crate::model::grounding::parse(
            "<|ref|>t<|/ref|><|det|>[[0,0,999,999]]<|/det|>",
            20,
            10,
        );
        let url = draw_boxes(&img, &g);
        let png = base64::engine::general_purpose::STANDARD
            .decode(url.strip_prefix("data:image/png;base64,").unwrap())
            .unwrap();
        let out = image::load_from_memory(&png).unwrap().to_rgb8();
        assert_ne!(out.get_pixel(0, 0).0, [255, 255, 255]);
        assert_ne!(out.get_pixel(19, 9).0, [255, 255, 255]);
        assert_eq!(out.get_pixel(10, 5).0, [255, 255, 255]);
    }
}
