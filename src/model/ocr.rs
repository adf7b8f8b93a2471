//! End-to-end OCR as `infer()` runs it: image -> views -> prompt tokens -> prefill -> greedy
//! decoding with transformers' `no_repeat_ngram_size=20` (whole history, prompt included) ->
//! text, streamed.
//!
//! Owns: wiring `preprocess`, `tokenizer`, the model and `generate` together, and the checks
//! that belong between them (the prompt fits the context). Does not own: argument parsing or
//! printing (the CLI), image decoding details (`preprocess`).

use std::collections::HashMap;
use std::ops::ControlFlow;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use image::RgbImage;

use super::generate::{self, StopReason};
use super::preprocess::{self, Mode, PreprocessError, PromptTokens, Views};
use super::tokenizer::{OcrTokenizer, StreamDecoder, TokenizerError, EOS_ID};
use super::{
    DecoderSession, DeepseekOcr, ImageInput, LocalTiles, ModelError, OcrConfig, TextConfig,
    VisionConfig,
};

#[derive(Debug, thiserror::Error)]
pub enum OcrError {
    #[error(transparent)]
    Preprocess(#[from] PreprocessError),
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(
        "the prompt is {tokens} tokens ({image_tokens} of them image tokens), but the model's \
         context is {context} (max_position_embeddings); use a smaller --mode or a shorter prompt"
    )]
    PromptTooLong {
        tokens: usize,
        image_tokens: usize,
        context: usize,
    },
    #[error("{path}: {message}")]
    Synthetic { path: String, message: String },
    #[error("the model failed while running: {0}")]
    Run(#[from] candle_core::Error),
}

/// The model, its tokenizer and how to feed it.
pub struct OcrEngine {
    pub model: DeepseekOcr,
    pub tokenizer: OcrTokenizer,
    pub text: TextConfig,
    pub device: Device,
    pub dtype: DType,
    /// Synthetic configs have small vocabularies: ids at or above `vocab_size` are looked up as
    /// `id % vocab_size` (the goldens' rule; image positions are replaced anyway).
    pub fold_ids: bool,
}

/// One image, ready to run.
pub struct Prepared {
    pub width: u32,
    pub height: u32,
    pub mode: Mode,
    pub views: Views,
    pub tokens: PromptTokens,
}

/// What one run produced.
#[derive(Debug, Clone)]
pub struct OcrOutput {
    pub prompt_tokens: usize,
    /// Generated ids (the final eos included when it was reached).
    pub tokens: Vec<u32>,
    /// The text, eos removed, special tokens kept.
    pub text: String,
    pub stop: StopReason,
}

/// On a CUDA device in bf16 (a build with `--features cuda`), the vision towers run on the fused
/// kernels of the GPU fast path ([`crate::model::fast::vision`]); everywhere else, or with
/// `OCR_PATCH_VISION=reference` (to compare), on the reference ops.
#[cfg(feature = "cuda")]
fn fast_vision(model: &mut DeepseekOcr, dtype: DType, device: &Device) -> Result<(), OcrError> {
    if std::env::var("OCR_PATCH_VISION").is_ok_and(|v| v == "reference") {
        return Ok(());
    }
    if let (Device::Cuda(cd), DType::BF16) = (device, dtype) {
        let kernels = std::sync::Arc::new(crate::model::kernels::Kernels::load(cd)?);
        crate::model::fast::vision::accelerate(&mut model.vision, kernels);
    }
    Ok(())
}

#[cfg(not(feature = "cuda"))]
fn fast_vision(_: &mut DeepseekOcr, _: DType, _: &Device) -> Result<(), OcrError> {
    Ok(())
}

impl OcrEngine {
    /// A checkpoint folder: `config.json`, `*.safetensors`; the tokenizer is passed in.
    pub fn load(
        dir: &Path,
        tokenizer: OcrTokenizer,
        dtype: DType,
        device: &Device,
    ) -> Result<Self, OcrError> {
        let text = OcrConfig::from_file(&dir.join("config.json"))
            .map_err(ModelError::from)?
            .text()
            .map_err(ModelError::from)?;
        let mut model = DeepseekOcr::load(dir, dtype, device)?;
        fast_vision(&mut model, dtype, device)?;
        Ok(Self {
            model,
            tokenizer,
            text,
            device: device.clone(),
            dtype,
            fold_ids: false,
        })
    }

    /// Synthetic weights (`ocrp-synth-v1`, `seed`) for `config`, generated in memory.
    pub fn synthetic(
        config: &Path,
        seed: u64,
        tokenizer: OcrTokenizer,
        dtype: DType,
        device: &Device,
    ) -> Result<Self, OcrError> {
        let name = config.display().to_string();
        let bad = |message: String| OcrError::Synthetic {
            path: name.clone(),
            message,
        };
        let raw = std::fs::read_to_string(config).map_err(|e| {
            bad(format!(
                "cannot read the config ({e}); check the path given to --synthetic"
            ))
        })?;
        let value: serde_json::Value = serde_json::from_str(&raw)
            .map_err(|e| bad(format!("not JSON ({e}); pass a config.json")))?;
        let text = OcrConfig::from_json_str(&raw)
            .map_err(ModelError::from)?
            .text()
            .map_err(ModelError::from)?;
        let tensors = super::synth::synthesize(&value, seed, super::synth::DType::F32)
            .map_err(|e| bad(e.to_string()))?;
        let mut map = HashMap::with_capacity(tensors.len());
        for (n, t) in tensors {
            let tensor = Tensor::from_raw_buffer(&t.data, DType::F32, &t.shape, &Device::Cpu)?
                .to_dtype(dtype)?
                .to_device(device)?;
            map.insert(n, tensor);
        }
        let vb = candle_nn::VarBuilder::from_tensors(map, dtype, device);
        let mut model =
            DeepseekOcr::new(&text, &VisionConfig::deepseek_ocr(), vb).map_err(ModelError::from)?;
        fast_vision(&mut model, dtype, device)?;
        let fold_ids = text.vocab_size < 129280;
        Ok(Self {
            model,
            tokenizer,
            text,
            device: device.clone(),
            dtype,
            fold_ids,
        })
    }

    /// `max_position_embeddings`.
    /// The prompt's ids as the model's embedding takes them: a synthetic model with a reduced
    /// vocabulary folds DeepSeek's ids into it (`fold_ids`).
    pub(crate) fn model_ids(&self, ids: &[u32]) -> Vec<u32> {
        let vocab = self.text.vocab_size as u32;
        ids.iter()
            .map(|&i| if self.fold_ids { i % vocab } else { i })
            .collect()
    }

    pub fn context(&self) -> usize {
        self.text.max_position_embeddings
    }

    /// Views and tokens of one image; fails when the prompt does not fit the context.
    pub fn prepare(
        &self,
        image: &RgbImage,
        mode: Mode,
        prompt: &str,
    ) -> Result<Prepared, OcrError> {
        prepare(&self.tokenizer, self.context(), image, mode, prompt)
    }

    /// Prefill and decode; `on_text` sees the text as it grows (eos not shown).
    pub fn run(
        &self,
        p: &Prepared,
        max_new_tokens: usize,
        mut on_text: impl FnMut(&str),
    ) -> Result<OcrOutput, OcrError> {
        let ids = self.model_ids(&p.tokens.input_ids);
        let n = ids.len();
        let input = Tensor::new(ids.as_slice(), &self.device)?.unsqueeze(0)?;
        let global = self.pixels(&p.views.global)?;
        let tiles = if p.views.tiles.is_empty() {
            None
        } else {
            let t: Vec<Tensor> = p
                .views
                .tiles
                .iter()
                .map(|v| self.pixels(v))
                .collect::<candle_core::Result<_>>()?;
            Some(Tensor::cat(&t, 0)?)
        };
        let image = ImageInput {
            global: &global,
            local: tiles.as_ref().map(|pixels| LocalTiles {
                pixels,
                width_crop_num: p.views.crop.0 as usize,
                height_crop_num: p.views.crop.1 as usize,
            }),
        };
        let embeds = self
            .model
            .prompt_embeds(&input, &p.tokens.images_seq_mask, &[image])?;
        let mut session = DecoderSession {
            model: &self.model.text,
            cache: self.model.text.new_cache(),
        };
        let first = self.prefill(&embeds, &mut session.cache)?;
        let cfg = self.infer_config(n, max_new_tokens);
        let mut stream = StreamDecoder::new(&self.tokenizer);
        let mut err = None;
        let g = generate::generate(&mut session, &p.tokens.input_ids, first, &cfg, |t| {
            if t == EOS_ID {
                return ControlFlow::Continue(());
            }
            match stream.push(t) {
                Ok(s) => {
                    if !s.is_empty() {
                        on_text(&s);
                    }
                    ControlFlow::Continue(())
                }
                Err(e) => {
                    err = Some(e);
                    ControlFlow::Break(())
                }
            }
        })?;
        if let Some(e) = err {
            return Err(e.into());
        }
        let rest = stream.finish()?;
        if !rest.is_empty() {
            on_text(&rest);
        }
        let body: Vec<u32> = g.tokens.iter().copied().filter(|&t| t != EOS_ID).collect();
        let text = self.tokenizer.decode(&body, false)?;
        Ok(OcrOutput {
            prompt_tokens: n,
            tokens: g.tokens,
            text,
            stop: g.stop,
        })
    }
}

/// [`OcrEngine::prepare`] without a model (for checks before loading one).
pub fn prepare(
    tok: &OcrTokenizer,
    context: usize,
    image: &RgbImage,
    mode: Mode,
    prompt: &str,
) -> Result<Prepared, OcrError> {
    let views = preprocess::views(image, mode);
    let image_tokens = views.token_count(mode);
    let tokens = preprocess::build_prompt(prompt, std::slice::from_ref(&views), mode, |s| {
        tok.encode(s)
    })??;
    if tokens.input_ids.len() >= context {
        return Err(OcrError::PromptTooLong {
            tokens: tokens.input_ids.len(),
            image_tokens,
            context,
        });
    }
    let (width, height) = image.dimensions();
    Ok(Prepared {
        width,
        height,
        mode,
        views,
        tokens,
    })
}
