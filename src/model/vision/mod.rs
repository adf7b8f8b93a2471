//! DeepEncoder: SAM ViT-B and CLIP-L in series, the linear projector, and the layout of one
//! image's vision tokens as `DeepseekOCRModel.forward` assembles them (global view rows each
//! followed by `image_newline`, local tiles stitched row-major likewise, then `view_seperator`).
//!
//! Owns: normalised pixels -> the `(n, 1280)` rows that replace the image tokens. Does not own:
//! image decoding, resizing and tiling (preprocessing), nor the merge into the token embeddings
//! (`decoder`).

pub mod clip;
pub mod interp;
pub mod ops;
pub mod sam;

use std::sync::Arc;

use candle_core::{Module, Result, Tensor};
use candle_nn::{linear, Linear, VarBuilder};

pub use clip::{ClipConfig, VitModel};
pub use ops::{partitioned_window_heads, Act, GridAttention, Norm, ReferenceOps, VisionOps, WindowAttention};
pub use sam::{ImageEncoderViT, SamConfig};

/// The vision sizes; deepencoder.py hard-codes them, `DeepseekOCRModel.__init__` hard-codes
/// `n_embed = 1280` and the `linear` projector of 2048 inputs.
#[derive(Debug, Clone, PartialEq)]
pub struct VisionConfig {
    pub sam: SamConfig,
    pub clip: ClipConfig,
    pub n_embed: usize,
}

impl VisionConfig {
    pub fn deepseek_ocr() -> Self {
        Self {
            sam: SamConfig::vit_b(),
            clip: ClipConfig::clip_l(),
            n_embed: 1280,
        }
    }
}

/// The local tiles of one image: pixels `(p, 3, h, w)` with `p = width_crop_num * height_crop_num`,
/// row-major (`images_spatial_crop` = `[width_crop_num, height_crop_num]`).
#[derive(Clone, Copy)]
pub struct LocalTiles<'a> {
    pub pixels: &'a Tensor,
    pub width_crop_num: usize,
    pub height_crop_num: usize,
}

/// The outputs of one [`DeepEncoder::encode_views_staged`] call.
pub struct ViewStages {
    /// SAM's `net_3` output `(b, 1024, h, w)`.
    pub sam: Tensor,
    /// CLIP's output `(b, 1 + h*w, 1024)`, class token first.
    pub clip: Tensor,
    /// The projector's output `(b, h*w, n_embed)`.
    pub projected: Tensor,
}

/// SAM + CLIP + projector + the two learned separators (`model.sam_model`, `model.vision_model`,
/// `model.projector`, `model.image_newline`, `model.view_seperator`).
pub struct DeepEncoder {
    pub sam: ImageEncoderViT,
    pub clip: VitModel,
    projector: Linear,
    image_newline: Tensor,
    view_seperator: Tensor,
    span: tracing::Span,
}

impl DeepEncoder {
    /// `vb` is rooted at `model`.
    pub fn new(cfg: &VisionConfig, vb: VarBuilder) -> Result<Self> {
        let in_dim = cfg.clip.hidden_size + cfg.sam.downsample_channels[1];
        Ok(Self {
            sam: ImageEncoderViT::new(&cfg.sam, vb.pp("sam_model"))?,
            clip: VitModel::new(&cfg.clip, vb.pp("vision_model"))?,
            projector: linear(in_dim, cfg.n_embed, vb.pp("projector.layers"))?,
            image_newline: vb.get(cfg.n_embed, "image_newline")?,
            view_seperator: vb.get(cfg.n_embed, "view_seperator")?,
            span: tracing::span!(tracing::Level::TRACE, "deep-encoder"),
        })
    }

    /// Swaps how SAM and CLIP compute their attention and linears (the GPU fast path's fused
    /// kernels, `crate::model::fast::vision`); [`ReferenceOps`] is the default.
    pub fn set_ops(&mut self, ops: Arc<dyn VisionOps>) {
        self.sam.set_ops(ops.clone());
        self.clip.set_ops(ops);
    }

    /// One view through SAM, CLIP and the projector: pixels `(b, 3, H, W)` -> `(b, h*w, n_embed)`.
    pub fn encode_views(&self, pixels: &Tensor) -> Result<Tensor> {
        Ok(self.encode_views_many(&[pixels])?.remove(0))
    }

    /// [`Self::encode_views`] for batches of views of different sizes (Gundam's tiles and its
    /// global view): SAM and the projector batch by batch, CLIP over all of them at once (the
    /// fast path's linears take every batch's rows together; each batch's result is its own).
    pub fn encode_views_many(&self, pixels: &[&Tensor]) -> Result<Vec<Tensor>> {
        let _enter = self.span.enter();
        let f1 = pixels
            .iter()
            .map(|p| self.sam.forward(p))
            .collect::<Result<Vec<_>>>()?;
        let f2 = self.clip.forward_many(&f1.iter().collect::<Vec<_>>())?;
        f1.iter().zip(&f2).map(|(f1, f2)| self.project(f1, f2)).collect()
    }

    /// [`Self::encode_views`] keeping each stage's output (what the verifier compares).
    pub fn encode_views_staged(&self, pixels: &Tensor) -> Result<ViewStages> {
        let _enter = self.span.enter();
        let f1 = self.sam.forward(pixels)?;
        let f2 = self.clip.forward(&f1)?;
        let projected = self.project(&f1, &f2)?;
        Ok(ViewStages {
            sam: f1,
            clip: f2,
            projected,
        })
    }

    /// SAM's `(b, c, h, w)` and CLIP's `(b, 1 + h*w, c2)` features joined and projected.
    fn project(&self, f1: &Tensor, f2: &Tensor) -> Result<Tensor> {
        // torch.cat((features_2[:, 1:], features_1.flatten(2).permute(0, 2, 1)), dim=-1)
        let n = f2.dim(1)?;
        let clip_part = f2.narrow(1, 1, n - 1)?;
        let sam_part = f1.flatten_from(2)?.permute((0, 2, 1))?;
        // contiguous: with a non-contiguous part, candle's cat on dim 2 returns a transposed
        // view, which its CUDA matmul refuses for a batch of several views (CPU accepts it).
        let feats = Tensor::cat(&[&clip_part, &sam_part], 2)?.contiguous()?;
        self.projector.forward(&feats)
    }

    /// `(h*w, n)` features of a square grid -> rows each followed by `image_newline`:
    /// `(h*(w+1), n)`.
    fn with_newlines(&self, grid: &Tensor, h: usize, w: usize) -> Result<Tensor> {
        let n = grid.dim(1)?;
        let grid = grid.reshape((h, w, n))?;
        // torch.cat([features, self.image_newline[None, None, :].expand(h, 1, n_dim)], dim=1)
        let nl = self
            .image_newline
            .reshape((1, 1, n))?
            .broadcast_as((h, 1, n))?;
        Tensor::cat(&[&grid, &nl], 1)?.reshape((h * (w + 1), n))
    }

    /// All vision rows of one image, in the order they fill its image tokens:
    /// `[local rows..., global rows..., view_seperator]` (local only when tiles are given;
    /// Python decides that by `torch.sum(patches) != 0`).
    pub fn encode_image(&self, global: &Tensor, local: Option<LocalTiles<'_>>) -> Result<Tensor> {
        let _enter = self.span.enter();
        match local {
            Some(t) => {
                let out = self.encode_views_many(&[t.pixels, global])?;
                let [l, g] = &out[..] else {
                    candle_core::bail!("encode_image: {} outputs for 2 batches of views", out.len())
                };
                self.layout(g, Some((l, t.width_crop_num, t.height_crop_num)))
            }
            None => self.layout(&self.encode_views(global)?, None),
        }
    }

    /// The layout half of [`Self::encode_image`]: projected global features `(1, h*w, n)` and
    /// optional projected tiles `(wc*hc, h2*w2, n)` with `(wc, hc)` -> the image's rows.
    pub fn layout(&self, g: &Tensor, local: Option<(&Tensor, usize, usize)>) -> Result<Tensor> {
        let (_, hw, n) = g.dims3()?;
        // h = w = int(hw ** 0.5)
        let h = (hw as f64).sqrt() as usize;
        let global_rows = self.with_newlines(&g.squeeze(0)?, h, h)?;
        let sep = self.view_seperator.unsqueeze(0)?;
        let Some(local) = local else {
            return Tensor::cat(&[&global_rows, &sep], 0);
        };
        let (l, wc, hc) = local;
        let (_, hw2, n2) = l.dims3()?;
        let h2 = (hw2 as f64).sqrt() as usize;
        // local_features.view(hc, wc, h2, w2, n).permute(0, 2, 1, 3, 4).reshape(hc*h2, wc*w2, n)
        let l = l
            .reshape((hc, wc, h2, h2, n2))?
            .permute((0, 2, 1, 3, 4))?
            .reshape((hc * h2 * wc * h2, n2))?;
        let local_rows = self.with_newlines(&l, hc * h2, wc * h2)?;
        debug_assert_eq!(n, n2);
        Tensor::cat(&[&local_rows, &global_rows, &sep], 0)
    }
}

/// How many image tokens one image takes: `(h+1)*h + 1` for the global view plus
/// `(hc*h2) * (wc*h2 + 1)` for the tiles (`h`, `h2` = view size / 64).
pub fn image_token_count(global_size: usize, local: Option<(usize, usize, usize)>) -> usize {
    let h = global_size / 64;
    let mut n = h * (h + 1) + 1;
    if let Some((tile_size, wc, hc)) = local {
        let h2 = tile_size / 64;
        n += hc * h2 * (wc * h2 + 1);
    }
    n
}

/// A tower of random f32 weights on the CPU for the unit tests: `make` builds it on a fresh
/// `VarMap`, then every tensor is drawn from N(0, 0.5) (the map zero-fills what the
/// constructor does not initialise: positions, tables).
#[cfg(test)]
pub(crate) fn random_tower<T>(make: impl FnOnce(VarBuilder) -> Result<T>) -> T {
    let vm = candle_nn::VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, candle_core::DType::F32, &candle_core::Device::Cpu);
    let tower = make(vb).unwrap();
    for var in vm.all_vars() {
        let r = Tensor::randn(0f32, 0.5, var.shape(), &candle_core::Device::Cpu).unwrap();
        var.set(&r).unwrap();
    }
    tower
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_counts_match_the_modes() {
        assert_eq!(image_token_count(1024, None), 273); // Base: (16+1)*16 + 1
        assert_eq!(image_token_count(512, None), 8 * 9 + 1); // Tiny
                                                             // Gundam 2x3 tiles of 640 + one 1024 global view
        assert_eq!(image_token_count(1024, Some((640, 2, 3))), 273 + 30 * 21);
    }
}
