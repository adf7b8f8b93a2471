//! The engine taken apart for a server that runs many requests at once: vision rows of several
//! images in one call, a prefill that returns a [`Sequence`] (its own KV cache and decoding
//! state), and a step that advances every running sequence by one token. Requests can join and
//! leave between two steps (continuous batching, scheduled by `crate::serve`).
//!
//! Owns: the step-wise API and its equivalence with [`OcrEngine::run`] (same ops in the same
//! order for each sequence, so the same tokens; `tests` check it). Does not own scheduling,
//! queues or I/O.
//!
//! On CPU a step runs each sequence's decoder step in turn: each sequence's arithmetic is then
//! exactly its serial arithmetic, whatever else is in the batch (a fused ragged-batch decoder
//! step is the GPU path's business).

use candle_core::{Device, Tensor};

use super::generate::{Decoding, GenerationConfig, NoRepeatNgram, Sampling, StopReason};
use super::ocr::{OcrEngine, OcrError};
use super::preprocess::{self, PromptTokens, Views};
use super::tokenizer::EOS_ID;
use super::{decoder, Cache, LocalTiles};

/// One running request: its KV cache, what it has chosen, the logits for its next choice.
pub struct Sequence {
    cache: Cache,
    decoding: Decoding,
    logits: Option<Vec<f32>>,
    /// Prompt length (text and image tokens).
    pub prompt_tokens: usize,
}

impl Sequence {
    /// Generated ids so far (eos included once reached).
    pub fn tokens(&self) -> &[u32] {
        self.decoding.tokens()
    }

    /// Why it ended; `None` while it runs.
    pub fn stop(&self) -> Option<StopReason> {
        self.decoding.stop()
    }

    /// Ends it now (client gone, timeout): the next step skips it.
    pub fn cancel(&mut self) {
        self.decoding.cancel();
        self.logits = None;
    }

    /// Positions held in its KV cache.
    pub fn cached_positions(&self) -> usize {
        self.cache.seq_len()
    }
}

impl OcrEngine {
    /// One view as the vision tower takes it: (1, 3, h, w) in the model's dtype and device.
    pub(crate) fn pixels(&self, img: &image::RgbImage) -> candle_core::Result<Tensor> {
        let (w, h) = img.dimensions();
        Tensor::from_vec(
            preprocess::to_chw(img),
            (1, 3, h as usize, w as usize),
            &Device::Cpu,
        )?
        .to_dtype(self.dtype)?
        .to_device(&self.device)
    }

    /// The vision rows of one image (what fills its image tokens). They depend on the views
    /// only, so a server may cache them by image and mode.
    pub fn encode_views(&self, views: &Views) -> Result<Tensor, OcrError> {
        let global = self.pixels(&views.global)?;
        let tiles = if views.tiles.is_empty() {
            None
        } else {
            let t = views
                .tiles
                .iter()
                .map(|v| self.pixels(v))
                .collect::<candle_core::Result<Vec<_>>>()?;
            Some(Tensor::cat(&t, 0)?)
        };
        let local = tiles.as_ref().map(|pixels| LocalTiles {
            pixels,
            width_crop_num: views.crop.0 as usize,
            height_crop_num: views.crop.1 as usize,
        });
        Ok(self.model.vision.encode_image(&global, local)?)
    }

    /// Vision rows of several images in one call: the global views of the same size go through
    /// SAM and the projector as one batch, as do all their tiles, and the two through CLIP
    /// together. Each image's rows are those of its own [`Self::encode_views`]: bit-identical
    /// on the reference ops (checked by a test); on the GPU's fast path the GEMMs over more
    /// rows may sum in another order.
    pub fn encode_batch(&self, views: &[&Views]) -> Result<Vec<Tensor>, OcrError> {
        let mut out: Vec<Option<Tensor>> = vec![None; views.len()];
        let mut sizes: Vec<u32> = views.iter().map(|v| v.global.width()).collect();
        sizes.sort_unstable();
        sizes.dedup();
        for size in sizes {
            let group: Vec<usize> = (0..views.len())
                .filter(|&i| views[i].global.width() == size)
                .collect();
            let globals = group
                .iter()
                .map(|&i| self.pixels(&views[i].global))
                .collect::<candle_core::Result<Vec<_>>>()?;
            let globals = Tensor::cat(&globals, 0)?;
            let tiles: Vec<Tensor> = group
                .iter()
                .flat_map(|&i| views[i].tiles.iter().map(|t| self.pixels(t)))
                .collect::<candle_core::Result<_>>()?;
            // the tiles and the global views through CLIP together
            let (g, l) = if tiles.is_empty() {
                (self.model.vision.encode_views(&globals)?, None)
            } else {
                let tiles = Tensor::cat(&tiles, 0)?;
                let mut out = self.model.vision.encode_views_many(&[&globals, &tiles])?;
                let l = out.pop();
                (out.remove(0), l)
            };
            let mut tile_at = 0;
            for (k, &i) in group.iter().enumerate() {
                let v = views[i];
                let gi = g.narrow(0, k, 1)?;
                let local = match (&l, v.tiles.len()) {
                    (Some(l), n) if n > 0 => {
                        let li = l.narrow(0, tile_at, n)?;
                        tile_at += n;
                        Some((li, v.crop.0 as usize, v.crop.1 as usize))
                    }
                    _ => None,
                };
                out[i] = Some(
                    self.model
                        .vision
                        .layout(&gi, local.as_ref().map(|(l, w, h)| (l, *w, *h)))?,
                );
            }
        }
        Ok(out.into_iter().flatten().collect())
    }

    /// What [`OcrEngine::run`] decodes with: greedy, eos, transformers' no-repeat 20-gram over
    /// prompt and output, at most `max_new_tokens` and never past the context.
    pub fn infer_config(&self, prompt_len: usize, max_new_tokens: usize) -> GenerationConfig {
        GenerationConfig {
            max_new_tokens: max_new_tokens.min(self.context().saturating_sub(prompt_len)),
            stop_tokens: vec![EOS_ID],
            sampling: Sampling::Greedy,
            no_repeat: Some(NoRepeatNgram::hf(20)),
            ngram_sees_prompt: true,
        }
    }

    /// `embeds` `(1, n, h)` through the decoder into `cache`; the logits of the last position
    /// (the first token's), on the host. Shared by [`Self::start`] and [`OcrEngine::run`].
    pub(crate) fn prefill(&self, embeds: &Tensor, cache: &mut Cache) -> Result<Vec<f32>, OcrError> {
        let n = embeds.dim(1)?;
        let out = self.model.text.forward_embeds(embeds, cache, false)?;
        Ok(self
            .model
            .text
            .logits(&out.last_hidden_state.narrow(1, n - 1, 1)?)?
            .flatten_all()?
            .to_vec1()?)
    }

    /// Prefill: the prompt's embeddings with `features` (from [`Self::encode_views`]) in its
    /// image positions, through the decoder into a fresh cache. `cfg.max_new_tokens` is cut to
    /// what the context leaves.
    pub fn start(
        &self,
        prompt: &PromptTokens,
        features: &Tensor,
        mut cfg: GenerationConfig,
    ) -> Result<Sequence, OcrError> {
        let ids = self.model_ids(&prompt.input_ids);
        let n = ids.len();
        cfg.max_new_tokens = cfg.max_new_tokens.min(self.context().saturating_sub(n));
        let input = Tensor::new(ids.as_slice(), &self.device)?.unsqueeze(0)?;
        let embeds = self.model.text.embed(&input)?;
        let embeds =
            decoder::merge_image_features(&embeds.squeeze(0)?, &prompt.images_seq_mask, features)?
                .unsqueeze(0)?;
        let mut cache = self.model.text.new_cache();
        let first = self.prefill(&embeds, &mut cache)?;
        Ok(Sequence {
            cache,
            decoding: Decoding::new(cfg, &prompt.input_ids),
            logits: Some(first),
            prompt_tokens: n,
        })
    }

    /// One token for every running sequence of `batch`: `Some(token)` for each that chose one
    /// (check [`Sequence::stop`] after), `None` for those already ended. A model error ends
    /// only the sequence it happened in.
    pub fn step(&self, batch: &mut [&mut Sequence]) -> Vec<Result<Option<u32>, OcrError>> {
        batch
            .iter_mut()
            .map(|s| {
                let Some(logits) = s.logits.take() else {
                    return Ok(None);
                };
                let Some(tok) = s.decoding.choose(logits) else {
                    return Ok(None);
                };
                if s.decoding.stop().is_none() {
                    match self.next_logits(&mut s.cache, tok) {
                        Ok(l) => s.logits = Some(l),
                        Err(e) => {
                            s.decoding.cancel();
                            return Err(e.into());
                        }
                    }
                }
                Ok(Some(tok))
            })
            .collect()
    }

    /// `DecoderSession::step`: append `token`, the logits after it.
    fn next_logits(&self, cache: &mut Cache, token: u32) -> candle_core::Result<Vec<f32>> {
        let m = &self.model.text;
        let ids = Tensor::new(&[[token]], m.embed_tokens_device())?;
        let e = m.embed(&ids)?;
        let out = m.forward_embeds(&e, cache, false)?;
        m.logits(&out.last_hidden_state)?.flatten_all()?.to_vec1()
    }
}
