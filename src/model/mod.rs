//! The Rust reference implementation of DeepSeek-OCR on candle: configuration, checkpoint
//! loading, the vision encoder (SAM + CLIP + projector), the DeepSeek-V2 decoder (MHA/MLA,
//! dense/MoE) and the decoding loop.
//!
//! Owns: weights -> logits. Imports nothing else of ours (no `patch`, no `cache`): data flows
//! one way, the verifier and the server stand on this module.
//!
//! Reference first: every block mirrors the remote code (`deepencoder.py`,
//! `modeling_deepseekv2.py`, `modeling_deepseekocr.py`) line by line and quotes the Python
//! where the translation is not obvious; `tests/model_ref*` compare it with that code.

pub mod config;
pub mod decoder;
#[cfg(feature = "cuda")]
pub mod fast;
pub mod generate;
pub mod grounding;
#[cfg(feature = "cuda")]
pub mod kernels;
pub mod ocr;
pub mod preprocess;
pub mod stepwise;
pub mod synth;
pub mod tokenizer;
pub mod vision;
pub mod weights;

use std::path::Path;

use candle_core::{DType, Device, Tensor};

pub use config::{ConfigError, OcrConfig, TextConfig};
pub use decoder::{Cache, DecoderOutput, DeepseekV2};
pub use vision::{DeepEncoder, LocalTiles, VisionConfig};
pub use weights::{Weights, WeightsError};

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Weights(#[from] WeightsError),
    #[error("{0}")]
    Candle(#[from] candle_core::Error),
}

/// One image of a prompt: the global view and optional local tiles, normalised pixels.
pub struct ImageInput<'a> {
    /// `(1, 3, S, S)`.
    pub global: &'a Tensor,
    pub local: Option<LocalTiles<'a>>,
}

/// `DeepseekOCRForCausalLM`: vision encoder + decoder.
pub struct DeepseekOcr {
    pub vision: DeepEncoder,
    pub text: DeepseekV2,
}

impl DeepseekOcr {
    /// Builds the model from a `VarBuilder` rooted at the checkpoint's top.
    pub fn new(
        text: &TextConfig,
        vision: &VisionConfig,
        vb: candle_nn::VarBuilder,
    ) -> candle_core::Result<Self> {
        Ok(Self {
            vision: DeepEncoder::new(vision, vb.pp("model"))?,
            text: DeepseekV2::new(text, vb)?,
        })
    }

    /// Loads `config.json` and the `*.safetensors` of `dir`; the model runs in `dtype` on `device`.
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Self, ModelError> {
        let cfg = OcrConfig::from_file(&dir.join("config.json"))?.text()?;
        let weights = Weights::open_dir(dir)?;
        Self::from_weights(&cfg, &VisionConfig::deepseek_ocr(), &weights, dtype, device)
    }

    pub fn from_weights(
        text: &TextConfig,
        vision: &VisionConfig,
        weights: &Weights,
        dtype: DType,
        device: &Device,
    ) -> Result<Self, ModelError> {
        let vb = weights.var_builder(dtype, device);
        Self::new(text, vision, vb).map_err(|e| match weights.take_error() {
            Some(w) => ModelError::Weights(w),
            None => ModelError::Candle(e),
        })
    }

    /// `DeepseekOCRModel.forward` up to the decoder's input: embeds `input_ids` `(1, t)` and
    /// scatters the images' rows into the positions where `image_mask` is true. Python takes
    /// one image per batch row; several images here fill the mask one after the other.
    pub fn prompt_embeds(
        &self,
        input_ids: &Tensor,
        image_mask: &[bool],
        images: &[ImageInput<'_>],
    ) -> candle_core::Result<Tensor> {
        let embeds = self.text.embed(input_ids)?;
        if images.is_empty() {
            return Ok(embeds);
        }
        let rows = images
            .iter()
            .map(|im| self.vision.encode_image(im.global, im.local))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let rows = Tensor::cat(&rows, 0)?;
        decoder::merge_image_features(&embeds.squeeze(0)?, image_mask, &rows)?.unsqueeze(0)
    }
}

/// A decoder with its cache, stepping one token at a time for [`generate::generate`].
pub struct DecoderSession<'m> {
    pub model: &'m DeepseekV2,
    pub cache: Cache,
}

impl generate::Step for DecoderSession<'_> {
    type Error = candle_core::Error;
    fn step(&mut self, token: u32) -> candle_core::Result<Vec<f32>> {
        let ids = Tensor::new(&[[token]], self.model.embed_tokens_device())?;
        let e = self.model.embed(&ids)?;
        let out = self.model.forward_embeds(&e, &mut self.cache, false)?;
        self.model
            .logits(&out.last_hidden_state)?
            .flatten_all()?
            .to_vec1()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Shape;
    use candle_nn::var_builder::SimpleBackend;
    use std::collections::BTreeSet;
    use std::sync::{Arc, Mutex};

    /// Serves a zero of any requested shape without allocating it (a broadcast scalar) and
    /// records the names asked for.
    #[derive(Clone, Default)]
    struct Recorder(Arc<Mutex<Vec<String>>>);

    impl SimpleBackend for Recorder {
        fn get(
            &self,
            s: Shape,
            name: &str,
            _: candle_nn::Init,
            dtype: DType,
            dev: &Device,
        ) -> candle_core::Result<Tensor> {
            self.0.lock().unwrap().push(name.to_string());
            Tensor::zeros((), dtype, dev)?.broadcast_as(s)
        }
        fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
            candle_core::bail!("unchecked get of {name}")
        }
        fn contains_tensor(&self, _: &str) -> bool {
            true
        }
    }

    #[test]
    fn the_model_reads_exactly_the_real_checkpoint_names() {
        let data =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data/deepseek-ocr");
        let (Ok(cfg), Ok(index)) = (
            OcrConfig::from_file(&data.join("config.json")),
            std::fs::read_to_string(data.join("model.safetensors.index.json")),
        ) else {
            eprintln!("skipping: {} not found", data.display());
            return;
        };
        let index: serde_json::Value = serde_json::from_str(&index).unwrap();
        let in_checkpoint: BTreeSet<String> = index["weight_map"]
            .as_object()
            .unwrap()
            .keys()
            .cloned()
            .collect();
        assert_eq!(in_checkpoint.len(), 2710);
        let rec = Recorder::default();
        let vb =
            candle_nn::VarBuilder::from_backend(Box::new(rec.clone()), DType::BF16, Device::Cpu);
        DeepseekOcr::new(&cfg.text().unwrap(), &VisionConfig::deepseek_ocr(), vb).unwrap();
        let read: BTreeSet<String> = rec.0.lock().unwrap().iter().cloned().collect();
        let missing: Vec<_> = read.difference(&in_checkpoint).collect();
        assert!(
            missing.is_empty(),
            "the model reads names the checkpoint lacks: {missing:?}"
        );
        let unread: Vec<_> = in_checkpoint.difference(&read).collect();
        // CLIP's own patch embedding is never used: SAM's features replace it.
        assert_eq!(
            unread,
            vec!["model.vision_model.embeddings.patch_embedding.weight"]
        );
    }

    #[test]
    fn loading_reports_the_first_bad_tensor_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let dev = Device::Cpu;
        let text = OcrConfig::from_json_str(r#"{"language_config": {"vocab_size": 8, "hidden_size": 4,
            "intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": 1, "use_mla": false}}"#)
        .unwrap()
        .text()
        .unwrap();
        let vision = VisionConfig::deepseek_ocr();
        let mut t = std::collections::HashMap::new();
        // Missing everything: the first tensor the model asks for is named.
        t.insert(
            "unrelated".to_string(),
            Tensor::zeros(2, DType::F32, &dev).unwrap(),
        );
        candle_core::safetensors::save(&t, dir.path().join("model.safetensors")).unwrap();
        let w = Weights::open_dir(dir.path()).unwrap();
        let e = DeepseekOcr::from_weights(&text, &vision, &w, DType::F32, &dev)
            .err()
            .unwrap();
        assert!(
            matches!(&e, ModelError::Weights(WeightsError::Missing { name }) if name == "model.sam_model.patch_embed.proj.weight"),
            "{e}"
        );
        // A wrong shape is named with both shapes.
        t.insert(
            "model.sam_model.patch_embed.proj.weight".to_string(),
            Tensor::zeros((768, 3, 14, 14), DType::BF16, &dev).unwrap(),
        );
        candle_core::safetensors::save(&t, dir.path().join("model.safetensors")).unwrap();
        let w = Weights::open_dir(dir.path()).unwrap();
        let e = DeepseekOcr::from_weights(&text, &vision, &w, DType::F32, &dev)
            .err()
            .unwrap();
        assert_eq!(
            e.to_string(),
            "tensor `model.sam_model.patch_embed.proj.weight` has shape [768, 3, 14, 14], the model expects \
             [768, 3, 16, 16]; does config.json match the weights?"
        );
    }
}
