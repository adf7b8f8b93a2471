//! `ocr-patch ocr IMAGE...`: runs the Rust DeepSeek-OCR on images, as `infer()` does, and
//! prints the text as it is generated. Wiring only: [`crate::model::ocr`] does the work.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, ValueEnum};
use serde::Serialize;

use crate::model::grounding::{self, Grounded};
use crate::model::ocr::{self, OcrEngine};
use crate::model::preprocess::{self, Mode, MAX_IMAGE_PIXELS};
use crate::model::tokenizer::OcrTokenizer;

use super::{print_json, Exit, OutputArgs};

/// `infer()`'s example prompt for documents, with layout boxes.
pub const GROUNDING_PROMPT: &str = "<image>\n<|grounding|>Convert the document to markdown.";
/// `infer()`'s plain OCR prompt.
pub const FREE_OCR_PROMPT: &str = "<image>\nFree OCR.";

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ModeArg {
    /// 512x512, 64 vision tokens
    Tiny,
    /// 640x640, 100 vision tokens
    Small,
    /// 1024x1024 padded, 256 vision tokens
    Base,
    /// 1280x1280 padded, 400 vision tokens
    Large,
    /// 2-9 tiles of 640 by aspect ratio + a 1024 global view (infer()'s default)
    Gundam,
}

impl From<ModeArg> for Mode {
    fn from(m: ModeArg) -> Mode {
        match m {
            ModeArg::Tiny => Mode::Tiny,
            ModeArg::Small => Mode::Small,
            ModeArg::Base => Mode::Base,
            ModeArg::Large => Mode::Large,
            ModeArg::Gundam => Mode::Gundam,
        }
    }
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum DeviceArg {
    Cpu,
    Cuda,
}

/// Run DeepSeek-OCR (the Rust model) on images and print the text as it is generated.
///
/// Each image is one run of `infer()`: greedy decoding, transformers' no-repeat 20-gram, stop at
/// eos. Images above 89,478,485 pixels (Pillow's decompression-bomb threshold) are refused
/// before decoding (--max-pixels changes the limit).
#[derive(Debug, Clone, Args)]
#[command(after_help = super::EXIT_CODES)]
pub struct OcrArgs {
    /// Image files (PNG, JPEG, WebP, BMP, TIFF, GIF) or PDFs (each page rendered at --dpi and
    /// run as one image)
    #[arg(required = true, value_name = "IMAGE")]
    pub images: Vec<PathBuf>,

    #[command(flatten)]
    pub source: ModelSource,

    /// Resolution mode
    #[arg(long, value_enum, default_value = "gundam")]
    pub mode: ModeArg,

    /// The prompt, with one `<image>` where the image goes [default: "<image>\nFree OCR.",
    /// with --grounding "<image>\n<|grounding|>Convert the document to markdown."]
    #[arg(long)]
    pub prompt: Option<String>,

    /// Most tokens to generate per image (also bounded by the model's context)
    #[arg(long, default_value_t = 8192, value_name = "N")]
    pub max_tokens: usize,

    /// Parse `<|ref|>..<|/ref|><|det|>[[x1,y1,x2,y2]]<|/det|>` into boxes in pixels of the
    /// image (the model writes 0-999); printed as JSON after the text
    #[arg(long)]
    pub grounding: bool,

    /// Refuse images with more pixels than this (checked on the header, before decoding)
    #[arg(long, default_value_t = MAX_IMAGE_PIXELS, value_name = "N")]
    pub max_pixels: u64,

    /// Resolution PDF pages are rendered at
    #[arg(long, default_value_t = 144, value_name = "DPI")]
    pub dpi: u32,

    /// Refuse PDFs with more pages than this (checked before rendering)
    #[arg(long, default_value_t = 500, value_name = "N")]
    pub max_pages: usize,

    #[command(flatten)]
    pub out: OutputArgs,
}

/// Which model runs and where; shared by `ocr` and `serve`.
#[derive(Debug, Clone, Args)]
pub struct ModelSource {
    /// Model folder: config.json, tokenizer.json and the *.safetensors of DeepSeek-OCR
    #[arg(
        long,
        value_name = "DIR",
        required_unless_present = "synthetic",
        conflicts_with = "synthetic"
    )]
    pub model: Option<PathBuf>,

    /// Run on synthetic weights (ocrp-synth-v1) made in memory for this config.json instead of
    /// a checkpoint: shows the pipeline working, the text is noise. Without --tokenizer a
    /// built-in byte-level stand-in tokenizer is used
    #[arg(long, value_name = "CONFIG")]
    pub synthetic: Option<PathBuf>,

    /// Seed of the synthetic weights
    #[arg(long, default_value_t = 1, requires = "synthetic")]
    pub seed: u64,

    /// tokenizer.json to use instead of the model folder's
    #[arg(long, value_name = "FILE")]
    pub tokenizer: Option<PathBuf>,

    /// Where the model runs (cuda needs a build with `--features cuda`; it runs in bf16)
    #[arg(long, value_enum, default_value = "cpu")]
    pub device: DeviceArg,

}

impl ModelSource {
    /// --tokenizer, else the model folder's tokenizer.json, else (synthetic weights) a
    /// byte-level stand-in; warns when DeepSeek-OCR's special tokens are missing.
    pub fn tokenizer(&self) -> anyhow::Result<OcrTokenizer> {
        let tokenizer = match (&self.tokenizer, &self.model) {
            (Some(f), _) => OcrTokenizer::from_file(f)?,
            (None, Some(dir)) => OcrTokenizer::from_dir(dir)?,
            (None, None) => OcrTokenizer::byte_level(),
        };
        for problem in tokenizer.check_ocr_tokens() {
            eprintln!("warning: {}: {problem}; prompts will not tokenise as DeepSeek-OCR's", tokenizer.source);
        }
        Ok(tokenizer)
    }

    /// The model's config.json.
    pub fn config_path(&self) -> anyhow::Result<PathBuf> {
        match (&self.model, &self.synthetic) {
            (Some(dir), _) => Ok(dir.join("config.json")),
            (None, Some(c)) => Ok(c.clone()),
            (None, None) => anyhow::bail!("pass --model DIR or --synthetic CONFIG"),
        }
    }

    /// The checkpoint loaded, or the synthetic weights made, on the chosen device (CPU in f32,
    /// CUDA in bf16).
    pub fn engine(&self, tokenizer: OcrTokenizer) -> anyhow::Result<OcrEngine> {
        let (device, dtype) = match self.device {
            DeviceArg::Cpu => (candle_core::Device::Cpu, candle_core::DType::F32),
            DeviceArg::Cuda => (
                candle_core::Device::new_cuda(0)
                    .context("cannot open CUDA device 0; build with `--features cuda` on a machine with an NVIDIA GPU, or use --device cpu")?,
                candle_core::DType::BF16,
            ),
        };
        match (&self.model, &self.synthetic) {
            (Some(dir), _) => OcrEngine::load(dir, tokenizer, dtype, &device)
                .with_context(|| format!("{}: cannot load the model", dir.display())),
            (None, Some(cfg)) => OcrEngine::synthetic(cfg, self.seed, tokenizer, dtype, &device)
                .with_context(|| format!("{}: cannot build synthetic weights", cfg.display())),
            (None, None) => anyhow::bail!("pass --model DIR or --synthetic CONFIG"),
        }
    }
}

#[derive(Serialize)]
struct ImageResult {
    image: String,
    width: u32,
    height: u32,
    mode: String,
    images_spatial_crop: [u32; 2],
    prompt_tokens: usize,
    generated_tokens: usize,
    stop: String,
    text: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    markdown: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    boxes: Option<Vec<Grounded>>,
}

pub fn run(a: OcrArgs) -> anyhow::Result<Exit> {
    let mode = Mode::from(a.mode);
    let prompt = a.prompt.clone().unwrap_or_else(|| {
        if a.grounding {
            GROUNDING_PROMPT
        } else {
            FREE_OCR_PROMPT
        }
        .to_string()
    });

    // Everything a user can get wrong is checked before the model loads.
    let mut inputs: Vec<(String, image::RgbImage)> = vec![];
    for p in &a.images {
        let head = preprocess::sniff(p).unwrap_or_default();
        if head.starts_with(b"%PDF-") {
            #[cfg(not(feature = "serve"))]
            anyhow::bail!(
                "{}: PDF input needs a build with the `serve` feature (the default)",
                p.display()
            );
            #[cfg(feature = "serve")]
            {
                let bytes = std::fs::read(p).with_context(|| {
                    format!("{}: cannot read the PDF; check the path", p.display())
                })?;
                let name = p.display().to_string();
                let pages = crate::serve::pdf::render_pages(
                    &bytes,
                    &name,
                    &[],
                    a.dpi,
                    a.max_pages,
                    a.max_pixels,
                )?;
                inputs.extend(
                    pages
                        .into_iter()
                        .map(|(n, img)| (format!("{name} page {n}"), img)),
                );
            }
        } else {
            inputs.push((
                p.display().to_string(),
                preprocess::load_image(p, a.max_pixels)?,
            ));
        }
    }
    let tokenizer = a.source.tokenizer()?;
    let config_path = a.source.config_path()?;
    let text_cfg = crate::model::OcrConfig::from_file(&config_path)
        .and_then(|c| c.text())
        .with_context(|| format!("{}: cannot use this model config", config_path.display()))?;
    let prepared = inputs
        .iter()
        .map(|(path, img)| {
            ocr::prepare(
                &tokenizer,
                text_cfg.max_position_embeddings,
                img,
                mode,
                &prompt,
            )
            .with_context(|| format!("{path}: cannot prepare the prompt"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;

    let engine = a.source.engine(tokenizer)?;

    let stream = !a.out.json;
    let mut results = Vec::new();
    for (p, (path, _)) in prepared.iter().zip(&inputs) {
        if stream && inputs.len() > 1 {
            println!("==> {path} <==");
        }
        let out = engine
            .run(p, a.max_tokens, |s| {
                if stream {
                    print!("{s}");
                    let _ = std::io::stdout().flush();
                }
            })
            .with_context(|| format!("{path}: the model failed"))?;
        if stream {
            println!();
            eprintln!(
                "[{}: {} prompt tokens, {} generated, stop: {:?}]",
                path,
                out.prompt_tokens,
                out.tokens.len(),
                out.stop
            );
        }
        let boxes = a
            .grounding
            .then(|| grounding::parse(&out.text, p.width, p.height));
        if stream {
            if let Some(b) = &boxes {
                let v = serde_json::json!({ "image": path, "boxes": b });
                println!("{}", serde_json::to_string(&v)?);
            }
        }
        results.push(ImageResult {
            image: path.clone(),
            width: p.width,
            height: p.height,
            mode: mode.to_string(),
            images_spatial_crop: [p.views.crop.0, p.views.crop.1],
            prompt_tokens: out.prompt_tokens,
            generated_tokens: out.tokens.len(),
            stop: format!("{:?}", out.stop),
            markdown: a.grounding.then(|| grounding::markdown(&out.text)),
            text: out.text,
            boxes,
        });
    }
    if a.out.json {
        print_json(&serde_json::json!({ "command": "ocr", "results": results }))?;
    }
    Ok(Exit::Done)
}
