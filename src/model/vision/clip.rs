//! CLIP-L/14 as DeepEncoder uses it (`deepencoder.py`: `VitModel`, `CLIPVisionEmbeddings`,
//! `NoTPTransformer`): it takes SAM's features as its patch embeddings, adds a class token and
//! positions (bicubic-resized by `get_abs_pos` when the grid is not 16x16), applies the pre-LN
//! and 24 pre-norm blocks with quick-GELU. Checkpoint prefix: `model.vision_model`.
//!
//! Owns: `(b, 1024, h, w)` SAM features -> `(b, 1 + h*w, 1024)`. The checkpoint's
//! `embeddings.patch_embedding.weight` is never used (DeepSeek-OCR always passes SAM's
//! features), so it is not loaded; nor is the `position_ids` buffer (it is `arange`).

use std::sync::Arc;

use candle_core::{DType, Result, Tensor};
use candle_nn::{embedding, linear, Embedding, Linear, VarBuilder};

use super::interp;
use super::ops::{Act, Norm, ReferenceOps, VisionOps};
use super::sam::GridCache;

#[derive(Debug, Clone, PartialEq)]
pub struct ClipConfig {
    pub num_layers: usize,
    pub hidden_size: usize,
    pub num_attention_heads: usize,
    pub ffn_hidden_size: usize,
    pub image_size: usize,
    pub patch_size: usize,
    pub layernorm_epsilon: f64,
    pub pre_layernorm_epsilon: f64,
}

impl ClipConfig {
    /// `vit_model_cfg` of deepencoder.py.
    pub fn clip_l() -> Self {
        Self {
            num_layers: 24,
            hidden_size: 1024,
            num_attention_heads: 16,
            ffn_hidden_size: 4096,
            image_size: 224,
            patch_size: 14,
            layernorm_epsilon: 1e-5,
            pre_layernorm_epsilon: 1e-5,
        }
    }

    /// `num_positions = (image_size // patch_size) ** 2 + 1`
    pub fn num_positions(&self) -> usize {
        let g = self.image_size / self.patch_size;
        g * g + 1
    }
}

/// One block's attention (`NoTPAttention`); the fields are read by whole-tower paths
/// ([`VisionOps::clip_blocks`]).
pub struct Attention {
    pub qkv_proj: Linear,
    pub out_proj: Linear,
    pub num_heads: usize,
    span: tracing::Span,
}

impl Attention {
    /// `x` is the normed input; returns `residual + out_proj(attention)`.
    fn forward(&self, x: &Tensor, residual: &Tensor, ops: &dyn VisionOps) -> Result<Tensor> {
        let _enter = self.span.enter();
        let (b, s, c) = x.dims3()?;
        let nh = self.num_heads;
        let hd = c / nh;
        // xqkv.view(bsz, seqlen, 3, num_heads, head_dim); split on dim 2; permute(0, 2, 1, 3);
        // the output permuted back and reshaped (bsz, seqlen, -1): the heads split and merged by
        // `attend_plain`
        let qkv = ops
            .linear(&self.qkv_proj, x, Act::None, None)?
            .reshape((b, s, 3, nh, hd))?;
        let o = ops.attend_plain(&qkv)?;
        ops.linear(&self.out_proj, &o, Act::None, Some(residual))
    }
}

/// One pre-norm block (`NoTPTransformerBlock`, `mlp.fc1` / `mlp.fc2` with quick-GELU).
pub struct Block {
    pub layer_norm1: Norm,
    pub self_attn: Attention,
    pub layer_norm2: Norm,
    pub fc1: Linear,
    pub fc2: Linear,
    span: tracing::Span,
}

impl Block {
    fn new(cfg: &ClipConfig, vb: VarBuilder) -> Result<Self> {
        let h = cfg.hidden_size;
        Ok(Self {
            layer_norm1: Norm::new(h, cfg.layernorm_epsilon, vb.pp("layer_norm1"))?,
            self_attn: Attention {
                qkv_proj: linear(h, 3 * h, vb.pp("self_attn.qkv_proj"))?,
                out_proj: linear(h, h, vb.pp("self_attn.out_proj"))?,
                num_heads: cfg.num_attention_heads,
                span: tracing::span!(tracing::Level::TRACE, "clip-attn"),
            },
            layer_norm2: Norm::new(h, cfg.layernorm_epsilon, vb.pp("layer_norm2"))?,
            fc1: linear(h, cfg.ffn_hidden_size, vb.pp("mlp.fc1"))?,
            fc2: linear(cfg.ffn_hidden_size, h, vb.pp("mlp.fc2"))?,
            span: tracing::span!(tracing::Level::TRACE, "clip-block"),
        })
    }

    fn forward(&self, x: &Tensor, ops: &dyn VisionOps) -> Result<Tensor> {
        let _enter = self.span.enter();
        // h = x + self_attn(layer_norm1(x)); h + mlp(layer_norm2(h)), mlp = fc2(quick_gelu(fc1))
        let h = self
            .self_attn
            .forward(&ops.layer_norm(&self.layer_norm1, x)?, x, ops)?;
        ops.residual_mlp(&self.layer_norm2, &self.fc1, &self.fc2, Act::QuickGelu, &h)
    }
}

/// `VitModel` (CLIP-L) fed with SAM features.
pub struct VitModel {
    class_embedding: Tensor,
    position_embedding: Embedding,
    pre_layrnorm: Norm,
    layers: Vec<Block>,
    /// tokens -> [`Self::abs_pos`] when resized (computed on the host once per size).
    abs_pos_cache: GridCache<usize, Tensor>,
    /// How the blocks compute their linears ([`ReferenceOps`] unless set).
    ops: Arc<dyn VisionOps>,
    span: tracing::Span,
}

impl VitModel {
    pub fn new(cfg: &ClipConfig, vb: VarBuilder) -> Result<Self> {
        let h = cfg.hidden_size;
        let emb = vb.pp("embeddings");
        let layers = (0..cfg.num_layers)
            .map(|i| Block::new(cfg, vb.pp(format!("transformer.layers.{i}"))))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            class_embedding: emb.get(h, "class_embedding")?,
            position_embedding: embedding(cfg.num_positions(), h, emb.pp("position_embedding"))?,
            pre_layrnorm: Norm::new(h, cfg.pre_layernorm_epsilon, vb.pp("pre_layrnorm"))?,
            layers,
            abs_pos_cache: Default::default(),
            ops: Arc::new(ReferenceOps),
            span: tracing::span!(tracing::Level::TRACE, "clip"),
        })
    }

    /// Swaps the blocks' linears (the GPU fast path's fused epilogue); [`ReferenceOps`] is the
    /// default.
    pub fn set_ops(&mut self, ops: Arc<dyn VisionOps>) {
        self.ops = ops;
    }

    /// `get_abs_pos(self.position_embedding(self.position_ids), n)`: `(1, n, c)`; the 16x16 grid
    /// is bicubic-resized to `int(sqrt(n))` squared when that differs.
    pub fn abs_pos(&self, n: usize) -> Result<Tensor> {
        let table = self.position_embedding.embeddings();
        let (l, _) = table.dims2()?;
        let src = ((l - 1) as f64).sqrt() as usize;
        let tgt = (n as f64).sqrt() as usize;
        if src == tgt {
            return table.unsqueeze(0);
        }
        let mut cache = self.abs_pos_cache.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(t) = cache.get(&n) {
            return Ok(t.clone());
        }
        let t = self.resized_abs_pos(src, tgt)?;
        cache.insert(n, t.clone());
        Ok(t)
    }

    fn resized_abs_pos(&self, src: usize, tgt: usize) -> Result<Tensor> {
        let table = self.position_embedding.embeddings();
        let (l, c) = table.dims2()?;
        let dtype = table.dtype();
        let cls = table.narrow(0, 0, 1)?;
        // old_pos_embed.view(1, src, src, dim).permute(0, 3, 1, 2), interpolated in f32
        let chw: Vec<f32> = table
            .narrow(0, 1, l - 1)?
            .to_dtype(DType::F32)?
            .reshape((src, src, c))?
            .permute((2, 0, 1))?
            .flatten_all()?
            .to_vec1()?;
        let out = interp::bicubic_aa_chw(&chw, c, (src, src), (tgt, tgt));
        let new = Tensor::from_vec(out, (c, tgt * tgt), table.device())?
            .t()?
            .to_dtype(dtype)?;
        Tensor::cat(&[&cls, &new], 0)?.unsqueeze(0)
    }

    /// `forward(x, patch_embeds)` with SAM features `(b, c, h, w)`: `(b, 1 + h*w, c)`.
    pub fn forward(&self, patch_embeds: &Tensor) -> Result<Tensor> {
        Ok(self.forward_many(&[patch_embeds])?.remove(0))
    }

    /// [`Self::forward`] over several SAM outputs (views of different sizes), each on its own:
    /// the ops may run their blocks together ([`VisionOps::clip_blocks`]).
    pub fn forward_many(&self, patch_embeds: &[&Tensor]) -> Result<Vec<Tensor>> {
        let _enter = self.span.enter();
        let hs = patch_embeds
            .iter()
            .map(|p| self.embed(p))
            .collect::<Result<Vec<_>>>()?;
        if let Some(out) = self.ops.clip_blocks(&self.layers, &hs.iter().collect::<Vec<_>>()) {
            return out;
        }
        hs.into_iter()
            .map(|mut h| {
                for layer in &self.layers {
                    h = layer.forward(&h, self.ops.as_ref())?;
                }
                Ok(h)
            })
            .collect()
    }

    /// The embeddings and the pre-LN: SAM features `(b, c, h, w)` -> `(b, 1 + h*w, c)`.
    fn embed(&self, patch_embeds: &Tensor) -> Result<Tensor> {
        let (b, c, _, _) = patch_embeds.dims4()?;
        // patch_embeds.flatten(2).transpose(1, 2)
        let patches = patch_embeds.flatten_from(2)?.transpose(1, 2)?;
        let cls = self
            .class_embedding
            .reshape((1, 1, c))?
            .broadcast_as((b, 1, c))?;
        let x = Tensor::cat(&[&cls, &patches], 1)?;
        let n = x.dim(1)?;
        let x = x.broadcast_add(&self.abs_pos(n)?)?;
        self.ops.layer_norm(&self.pre_layrnorm, &x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn quick_gelu_hand_values() {
        let x = Tensor::new(&[0f32, 1.0, -2.0], &Device::Cpu).unwrap();
        let y = Act::QuickGelu.apply(&x).unwrap().to_vec1::<f32>().unwrap();
        let f = |v: f32| v / (1.0 + (-1.702 * v).exp());
        for (a, v) in y.iter().zip([0f32, 1.0, -2.0]) {
            assert!((a - f(v)).abs() < 1e-6);
        }
    }

    /// `forward_many` over views of two sizes (Gundam's tiles and global view, at a small
    /// CLIP's widths) gives each view what `forward` gives it alone, to the bit, on the
    /// reference ops (which run each input on its own); an empty list gives no outputs.
    #[test]
    fn forward_many_is_forward_per_input() {
        let cfg = ClipConfig {
            num_layers: 2,
            hidden_size: 32,
            num_attention_heads: 2,
            ffn_hidden_size: 64,
            image_size: 64,
            patch_size: 16,
            ..ClipConfig::clip_l()
        };
        let clip = super::super::random_tower(|vb| VitModel::new(&cfg, vb));
        // SAM features: 3 tiles of a 2x2 grid (positions resized from 4x4), one view of 4x4
        let tiles = Tensor::randn(0f32, 1.0, (3, 32, 2, 2), &Device::Cpu).unwrap();
        let global = Tensor::randn(0f32, 1.0, (1, 32, 4, 4), &Device::Cpu).unwrap();
        let both = clip.forward_many(&[&tiles, &global]).unwrap();
        assert_eq!(both.len(), 2);
        for (got, x) in both.iter().zip([&tiles, &global]) {
            let want = clip.forward(x).unwrap();
            assert_eq!(got.dims(), want.dims());
            let diff = (got - &want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert_eq!(diff, 0.0, "{:?}", x.dims());
        }
        assert_eq!(both[0].dims(), &[3, 5, 32]);
        assert!(clip.forward_many(&[]).unwrap().is_empty());
    }
}
