//! SAM ViT-B, the high-resolution half of DeepEncoder (`deepencoder.py`: `ImageEncoderViT`,
//! `Block`, `Attention`, `get_rel_pos`, `add_decomposed_rel_pos`, `window_partition`, the neck,
//! `net_2`, `net_3`). Checkpoint prefix: `model.sam_model`.
//!
//! Owns: pixels `(b, 3, H, W)` -> features `(b, 1024, H/64, W/64)`. Sizes are hard-coded in
//! `_build_sam` (not read from config.json); [`SamConfig::vit_b`] holds them, and smaller
//! configs exist for tests only.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::{conv2d, conv2d_no_bias, linear, Conv2d, Conv2dConfig, Linear, VarBuilder};

use super::interp;
use super::ops::{Act, GridAttention, Norm, ReferenceOps, VisionOps, WindowAttention};

#[derive(Debug, Clone, PartialEq)]
pub struct SamConfig {
    /// The size the absolute positions were trained at (`img_size`).
    pub img_size: usize,
    pub patch_size: usize,
    pub embed_dim: usize,
    pub depth: usize,
    pub num_heads: usize,
    pub mlp_ratio: f64,
    /// `out_chans` of the neck (the prompt embedding size, 256).
    pub out_chans: usize,
    pub window_size: usize,
    pub global_attn_indexes: Vec<usize>,
    /// `partial(torch.nn.LayerNorm, eps=1e-6)`
    pub layer_norm_eps: f64,
    /// `net_2` / `net_3` output channels (hard-coded 512, 1024).
    pub downsample_channels: [usize; 2],
}

impl SamConfig {
    /// `build_sam_vit_b()` as DeepSeek-OCR calls it.
    pub fn vit_b() -> Self {
        Self {
            img_size: 1024,
            patch_size: 16,
            embed_dim: 768,
            depth: 12,
            num_heads: 12,
            mlp_ratio: 4.0,
            out_chans: 256,
            window_size: 14,
            global_attn_indexes: vec![2, 5, 8, 11],
            layer_norm_eps: 1e-6,
            downsample_channels: [512, 1024],
        }
    }
}

/// Scaled dot-product attention, `F.scaled_dot_product_attention(q, k, v, attn_mask=bias)`:
/// softmax(q k^T / sqrt(d) + bias) v over `(.., t, d)`.
pub(crate) fn sdpa(q: &Tensor, k: &Tensor, v: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let d = q.dim(D::Minus1)?;
    let scale = 1.0 / (d as f64).sqrt();
    let mut att = (q.matmul(&k.t()?)? * scale)?;
    if let Some(b) = bias {
        att = att.broadcast_add(b)?;
    }
    let att = candle_nn::ops::softmax_last_dim(&att)?;
    att.matmul(&v.contiguous()?)
}

/// `get_rel_pos(q_size, k_size, rel_pos)`: `(q_size, k_size, c)` relative embeddings, the table
/// linearly resized to `2 * max(q, k) - 1` rows when its length differs.
pub fn get_rel_pos(q_size: usize, k_size: usize, rel_pos: &Tensor) -> Result<Tensor> {
    let max_rel_dist = 2 * q_size.max(k_size) - 1;
    let (l, c) = rel_pos.dims2()?;
    let resized = if l != max_rel_dist {
        // F.interpolate(rel_pos.reshape(1, L, -1).permute(0, 2, 1), size=max_rel_dist, mode="linear")
        let dtype = rel_pos.dtype();
        let cl: Vec<f32> = rel_pos
            .to_dtype(DType::F32)?
            .t()?
            .flatten_all()?
            .to_vec1()?;
        let out = interp::linear_1d(&cl, c, l, max_rel_dist);
        Tensor::from_vec(out, (c, max_rel_dist), rel_pos.device())?
            .t()?
            .contiguous()?
            .to_dtype(dtype)?
    } else {
        rel_pos.clone()
    };
    // q_coords = arange(q)[:, None] * max(k / q, 1.0); k_coords likewise;
    // relative_coords = (q_coords - k_coords) + (k - 1) * max(q / k, 1.0)
    let qs = (k_size as f32 / q_size as f32).max(1.0);
    let ks = (q_size as f32 / k_size as f32).max(1.0);
    let mut idx = Vec::with_capacity(q_size * k_size);
    for i in 0..q_size {
        for j in 0..k_size {
            let r = (i as f32 * qs - j as f32 * ks) + (k_size as f32 - 1.0) * ks;
            idx.push(r as u32); // `.long()` truncates; r >= 0
        }
    }
    let idx = Tensor::from_vec(idx, q_size * k_size, rel_pos.device())?;
    resized.index_select(&idx, 0)?.reshape((q_size, k_size, c))
}

/// `add_decomposed_rel_pos` folded into the attention bias, `(b, q_h*q_w, k_h*k_w)`, from the
/// tables [`get_rel_pos`] gathered: `rh` `(q_h, k_h, c)`, `rw` `(q_w, k_w, c)`.
pub fn rel_pos_bias(
    q: &Tensor,
    rh: &Tensor,
    rw: &Tensor,
    (q_h, q_w): (usize, usize),
    (k_h, k_w): (usize, usize),
) -> Result<Tensor> {
    let (b, _, c) = q.dims3()?;
    let q4 = q.reshape((b, q_h, q_w, c))?;
    // rel_h = torch.einsum("bhwc,hkc->bhwk", r_q, Rh): a matmul batched over h
    let rel_h = q4
        .permute((1, 0, 2, 3))?
        .contiguous()?
        .reshape((q_h, b * q_w, c))?
        .matmul(&rh.transpose(1, 2)?)?;
    // rel_w = torch.einsum("bhwc,wkc->bhwk", r_q, Rw): a matmul batched over w
    let rel_w = q4
        .permute((2, 0, 1, 3))?
        .contiguous()?
        .reshape((q_w, b * q_h, c))?
        .matmul(&rw.transpose(1, 2)?)?;
    let rel_h = rel_h.reshape((q_h, b, q_w, k_h))?.permute((1, 0, 2, 3))?;
    let rel_w = rel_w.reshape((q_w, b, q_h, k_w))?.permute((1, 2, 0, 3))?;
    // attn_bias = (rel_h[..., None] + rel_w[..., None, :]).view(B, nH, q_h*q_w, k_h*k_w)
    rel_h
        .unsqueeze(4)?
        .broadcast_add(&rel_w.unsqueeze(3)?)?
        .reshape((b, q_h * q_w, k_h * k_w))
}

/// Values that depend only on the grid size, computed at its first use: `get_rel_pos`'s
/// gathered tables per block, the resized absolute positions. A model serves a handful of
/// sizes (1024 global views, 640 or 512 tiles...), so the caches stay small.
pub(crate) type GridCache<K, V> = Mutex<HashMap<K, V>>;

struct Attention {
    qkv: Linear,
    proj: Linear,
    rel_pos_h: Tensor,
    rel_pos_w: Tensor,
    /// `(h, w)` -> `(get_rel_pos(h, h, rel_pos_h), get_rel_pos(w, w, rel_pos_w))`
    tables: GridCache<(usize, usize), (Tensor, Tensor)>,
    num_heads: usize,
    span: tracing::Span,
}

impl Attention {
    fn new(
        dim: usize,
        num_heads: usize,
        input_size: (usize, usize),
        vb: VarBuilder,
    ) -> Result<Self> {
        let head_dim = dim / num_heads;
        Ok(Self {
            qkv: linear(dim, dim * 3, vb.pp("qkv"))?,
            proj: linear(dim, dim, vb.pp("proj"))?,
            rel_pos_h: vb.get((2 * input_size.0 - 1, head_dim), "rel_pos_h")?,
            rel_pos_w: vb.get((2 * input_size.1 - 1, head_dim), "rel_pos_w")?,
            tables: Mutex::default(),
            num_heads,
            span: tracing::span!(tracing::Level::TRACE, "sam-attn"),
        })
    }

    /// The gathered relative-position tables of an `h x w` grid (cached).
    fn tables(&self, h: usize, w: usize) -> Result<(Tensor, Tensor)> {
        let mut cache = self.tables.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(t) = cache.get(&(h, w)) {
            return Ok(t.clone());
        }
        let t = (
            get_rel_pos(h, h, &self.rel_pos_h)?.contiguous()?,
            get_rel_pos(w, w, &self.rel_pos_w)?.contiguous()?,
        );
        cache.insert((h, w), t.clone());
        Ok(t)
    }

    /// `Attention.forward` up to `self.proj`, which [`Block::forward`] applies (a per-token
    /// linear: after the windows are put back, fused with the residual add).
    fn heads(&self, x: &Tensor, ops: &dyn VisionOps) -> Result<Tensor> {
        let _enter = self.span.enter();
        let (b, h, w, c) = x.dims4()?;
        let nh = self.num_heads;
        let hd = c / nh;
        // qkv = self.qkv(x).reshape(B, H * W, 3, nHead, -1) (the heads split by `attend`)
        let qkv = ops
            .linear(&self.qkv, x, Act::None, None)?
            .reshape((b, h * w, 3, nh, hd))?;
        let tables = self.tables(h, w)?;
        let (rh, rw) = (&tables.0, &tables.1);
        let x = ops.attend(&GridAttention { qkv: &qkv, rh, rw, hw: (h, w) })?;
        // x.view(B, nHead, H, W, -1).permute(0, 2, 3, 1, 4).reshape(B, H, W, -1): merged by `attend`
        x.reshape((b, h, w, c))
    }
}

/// `window_partition`: `(b, h, w, c)` -> `(b * n_windows, ws, ws, c)`, zero-padded to a multiple
/// of the window; returns the padded size.
pub fn window_partition(x: &Tensor, ws: usize) -> Result<(Tensor, (usize, usize))> {
    let (b, h, w, c) = x.dims4()?;
    let pad_h = (ws - h % ws) % ws;
    let pad_w = (ws - w % ws) % ws;
    let x = if pad_h > 0 || pad_w > 0 {
        x.pad_with_zeros(1, 0, pad_h)?.pad_with_zeros(2, 0, pad_w)?
    } else {
        x.clone()
    };
    let (hp, wp) = (h + pad_h, w + pad_w);
    let windows = x
        .reshape((b, hp / ws, ws, wp / ws, ws, c))?
        .permute((0, 1, 3, 2, 4, 5))?;
    let windows = windows.contiguous()?.reshape(((), ws, ws, c))?;
    Ok((windows, (hp, wp)))
}

/// `window_unpartition`: the inverse, cropping the padding.
pub fn window_unpartition(
    windows: &Tensor,
    ws: usize,
    (hp, wp): (usize, usize),
    (h, w): (usize, usize),
) -> Result<Tensor> {
    let (nw, _, _, c) = windows.dims4()?;
    let b = nw / (hp * wp / ws / ws);
    let x = windows
        .reshape((b, hp / ws, wp / ws, ws, ws, c))?
        .permute((0, 1, 3, 2, 4, 5))?;
    let x = x.contiguous()?.reshape((b, hp, wp, c))?;
    if hp > h || wp > w {
        x.narrow(1, 0, h)?.narrow(2, 0, w)?.contiguous()
    } else {
        Ok(x)
    }
}

struct Block {
    norm1: Norm,
    attn: Attention,
    norm2: Norm,
    lin1: Linear,
    lin2: Linear,
    window_size: usize,
    span: tracing::Span,
}

impl Block {
    fn new(cfg: &SamConfig, window_size: usize, vb: VarBuilder) -> Result<Self> {
        let dim = cfg.embed_dim;
        let grid = cfg.img_size / cfg.patch_size;
        // input_size=input_size if window_size == 0 else (window_size, window_size)
        let input_size = if window_size == 0 {
            (grid, grid)
        } else {
            (window_size, window_size)
        };
        let mlp_dim = (dim as f64 * cfg.mlp_ratio) as usize;
        Ok(Self {
            norm1: Norm::new(dim, cfg.layer_norm_eps, vb.pp("norm1"))?,
            attn: Attention::new(dim, cfg.num_heads, input_size, vb.pp("attn"))?,
            norm2: Norm::new(dim, cfg.layer_norm_eps, vb.pp("norm2"))?,
            lin1: linear(dim, mlp_dim, vb.pp("mlp.lin1"))?,
            lin2: linear(mlp_dim, dim, vb.pp("mlp.lin2"))?,
            window_size,
            span: tracing::span!(tracing::Level::TRACE, "sam-block"),
        })
    }

    fn forward(&self, x: &Tensor, ops: &dyn VisionOps) -> Result<Tensor> {
        let _enter = self.span.enter();
        let shortcut = x;
        let x = ops.layer_norm(&self.norm1, x)?;
        let y = if self.window_size > 0 {
            let ws = self.window_size;
            let (rh, rw) = self.attn.tables(ws, ws)?;
            ops.window_heads(&WindowAttention { x: &x, qkv: &self.attn.qkv, heads: self.attn.num_heads, ws, rh: &rh, rw: &rw })?
        } else {
            self.attn.heads(&x, ops)?
        };
        // x = shortcut + window_unpartition(attn(windows)), attn ending in self.proj: the
        // projection is per token, so it is applied after the windows are put back (the padding
        // cropped), with the residual add fused
        let x = ops.linear(&self.attn.proj, &y, Act::None, Some(shortcut))?;
        // x = x + self.mlp(self.norm2(x)); MLPBlock: lin2(GELU(lin1(x))), nn.GELU's exact (erf) form
        ops.residual_mlp(&self.norm2, &self.lin1, &self.lin2, Act::GeluErf, &x)
    }
}

/// `LayerNorm2d`: normalises over the channel dim of `(b, c, h, w)`.
pub struct LayerNorm2d {
    pub weight: Tensor,
    pub bias: Tensor,
    pub eps: f64,
}

impl LayerNorm2d {
    fn new(c: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            weight: vb.get(c, "weight")?,
            bias: vb.get(c, "bias")?,
            eps: 1e-6,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let c = self.weight.dim(0)?;
        // u = x.mean(1, keepdim=True); s = (x - u).pow(2).mean(1, keepdim=True)
        let u = x.mean_keepdim(1)?;
        let xc = x.broadcast_sub(&u)?;
        let s = xc.sqr()?.mean_keepdim(1)?;
        let x = xc.broadcast_div(&(s + self.eps)?.sqrt()?)?;
        x.broadcast_mul(&self.weight.reshape((1, c, 1, 1))?)?
            .broadcast_add(&self.bias.reshape((1, c, 1, 1))?)
    }
}

/// The neck and the downsampling convolutions after the blocks (`neck`, `net_2`, `net_3`):
/// a 1x1 convolution, `LayerNorm2d`, a 3x3 one, `LayerNorm2d`, two 3x3 ones of stride 2, no
/// biases.
pub struct Neck {
    pub conv1: Conv2d,
    pub ln1: LayerNorm2d,
    pub conv2: Conv2d,
    pub ln2: LayerNorm2d,
    pub net_2: Conv2d,
    pub net_3: Conv2d,
}

impl Neck {
    /// As the remote code computes it: the blocks' `(b, h, w, c)` to `(b, c, h, w)`, then each
    /// layer on NCHW: `(b, 1024, h/4, w/4)`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = x.permute((0, 3, 1, 2))?.contiguous()?;
        let x = self.ln1.forward(&self.conv1.forward(&x)?)?;
        let x = self.ln2.forward(&self.conv2.forward(&x)?)?;
        let x2 = self.net_2.forward(&x)?;
        self.net_3.forward(&x2)
    }
}

/// `ImageEncoderViT` as DeepSeek-OCR builds it.
pub struct ImageEncoderViT {
    patch_embed: Conv2d,
    pos_embed: Tensor,
    blocks: Vec<Block>,
    neck: Neck,
    /// How the blocks compute their attention and linears ([`ReferenceOps`] unless set).
    ops: Arc<dyn VisionOps>,
    /// grid size -> `get_abs_pos_sam(pos_embed, size)`, contiguous.
    abs_pos_cache: GridCache<usize, Tensor>,
    span: tracing::Span,
}

impl ImageEncoderViT {
    pub fn new(cfg: &SamConfig, vb: VarBuilder) -> Result<Self> {
        let p = cfg.patch_size;
        let grid = cfg.img_size / p;
        let patch_cfg = Conv2dConfig {
            stride: p,
            ..Default::default()
        };
        let pad1 = Conv2dConfig {
            padding: 1,
            ..Default::default()
        };
        let pad1_s2 = Conv2dConfig {
            padding: 1,
            stride: 2,
            ..Default::default()
        };
        // Loaded in the module's order, so a broken checkpoint reports its first bad tensor.
        let patch_embed = conv2d(3, cfg.embed_dim, p, patch_cfg, vb.pp("patch_embed.proj"))?;
        let pos_embed = vb.get((1, grid, grid, cfg.embed_dim), "pos_embed")?;
        let blocks = (0..cfg.depth)
            .map(|i| {
                let ws = if cfg.global_attn_indexes.contains(&i) {
                    0
                } else {
                    cfg.window_size
                };
                Block::new(cfg, ws, vb.pp(format!("blocks.{i}")))
            })
            .collect::<Result<Vec<_>>>()?;
        let [c2, c3] = cfg.downsample_channels;
        Ok(Self {
            patch_embed,
            pos_embed,
            blocks,
            neck: Neck {
                conv1: conv2d_no_bias(
                    cfg.embed_dim,
                    cfg.out_chans,
                    1,
                    Default::default(),
                    vb.pp("neck.0"),
                )?,
                ln1: LayerNorm2d::new(cfg.out_chans, vb.pp("neck.1"))?,
                conv2: conv2d_no_bias(cfg.out_chans, cfg.out_chans, 3, pad1, vb.pp("neck.2"))?,
                ln2: LayerNorm2d::new(cfg.out_chans, vb.pp("neck.3"))?,
                net_2: conv2d_no_bias(cfg.out_chans, c2, 3, pad1_s2, vb.pp("net_2"))?,
                net_3: conv2d_no_bias(c2, c3, 3, pad1_s2, vb.pp("net_3"))?,
            },
            ops: Arc::new(ReferenceOps),
            abs_pos_cache: Mutex::default(),
            span: tracing::span!(tracing::Level::TRACE, "sam"),
        })
    }

    /// Swaps the blocks' attention and linears (the GPU fast path's fused kernels);
    /// [`ReferenceOps`] is the default.
    pub fn set_ops(&mut self, ops: Arc<dyn VisionOps>) {
        self.ops = ops;
    }

    /// `get_abs_pos_sam(self.pos_embed, tgt_size)`: `(1, t, t, c)`, bicubic-resized when the
    /// grid differs from the trained one (computed on the host once per size, then cached).
    pub fn abs_pos(&self, tgt_size: usize) -> Result<Tensor> {
        let (_, src, _, _) = self.pos_embed.dims4()?;
        if src == tgt_size {
            return Ok(self.pos_embed.clone());
        }
        let mut cache = self.abs_pos_cache.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(t) = cache.get(&tgt_size) {
            return Ok(t.clone());
        }
        let t = self.resized_abs_pos(tgt_size)?.contiguous()?;
        cache.insert(tgt_size, t.clone());
        Ok(t)
    }

    fn resized_abs_pos(&self, tgt_size: usize) -> Result<Tensor> {
        let (_, src, _, c) = self.pos_embed.dims4()?;
        let dtype = self.pos_embed.dtype();
        // old_pos_embed = abs_pos.permute(0, 3, 1, 2).to(float32); F.interpolate(bicubic, antialias)
        let chw: Vec<f32> = self
            .pos_embed
            .to_dtype(DType::F32)?
            .permute((0, 3, 1, 2))?
            .flatten_all()?
            .to_vec1()?;
        let out = interp::bicubic_aa_chw(&chw, c, (src, src), (tgt_size, tgt_size));
        Tensor::from_vec(out, (1, c, tgt_size, tgt_size), self.pos_embed.device())?
            .permute((0, 2, 3, 1))?
            .to_dtype(dtype)
    }

    /// Pixels `(b, 3, H, W)` -> `(b, 1024, H/64, W/64)`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let _enter = self.span.enter();
        // x = self.patch_embed(x)  (B C H W -> B H W C); x = x + get_abs_pos_sam(self.pos_embed, x.size(1))
        let h = x.dim(2)? / self.patch_embed.config().stride;
        let mut x = self.ops.patch_embed(&self.patch_embed, &self.abs_pos(h)?, x)?;
        for blk in &self.blocks {
            x = blk.forward(&x, self.ops.as_ref())?;
        }
        self.ops.neck(&self.neck, &x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// A 2-block SAM of random weights (window 2, block 1 global), trained at 64 px.
    fn tiny_sam() -> ImageEncoderViT {
        let cfg = SamConfig {
            img_size: 64,
            embed_dim: 32,
            depth: 2,
            num_heads: 2,
            out_chans: 16,
            window_size: 2,
            global_attn_indexes: vec![1],
            downsample_channels: [16, 32],
            ..SamConfig::vit_b()
        };
        super::super::random_tower(|vb| ImageEncoderViT::new(&cfg, vb))
    }

    /// Counts the blocks' attention, linear and whole-windowed-attention calls and answers as
    /// the reference does (the windowed attention by the default's partition, on these ops).
    #[derive(Default)]
    struct Counting(
        std::sync::atomic::AtomicUsize,
        std::sync::atomic::AtomicUsize,
        std::sync::atomic::AtomicUsize,
    );

    impl VisionOps for Counting {
        fn window_heads(&self, a: &WindowAttention<'_>) -> Result<Tensor> {
            self.2.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            super::super::partitioned_window_heads(self, a)
        }

        fn attend(&self, a: &GridAttention<'_>) -> Result<Tensor> {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            ReferenceOps.attend(a)
        }

        fn attend_plain(&self, qkv: &Tensor) -> Result<Tensor> {
            ReferenceOps.attend_plain(qkv)
        }

        fn patch_embed(&self, conv: &Conv2d, pos: &Tensor, pixels: &Tensor) -> Result<Tensor> {
            ReferenceOps.patch_embed(conv, pos, pixels)
        }

        fn windows(&self, x: &Tensor, ws: usize) -> Result<(Tensor, (usize, usize))> {
            ReferenceOps.windows(x, ws)
        }

        fn unwindow(&self, w: &Tensor, ws: usize, pad: (usize, usize), hw: (usize, usize)) -> Result<Tensor> {
            ReferenceOps.unwindow(w, ws, pad, hw)
        }

        fn neck(&self, n: &Neck, x: &Tensor) -> Result<Tensor> {
            ReferenceOps.neck(n, x)
        }

        fn linear(&self, l: &Linear, x: &Tensor, act: Act, r: Option<&Tensor>) -> Result<Tensor> {
            self.1.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            ReferenceOps.linear(l, x, act, r)
        }

        fn layer_norm(&self, n: &Norm, x: &Tensor) -> Result<Tensor> {
            ReferenceOps.layer_norm(n, x)
        }
    }

    #[test]
    fn grid_caches_and_swapped_attention_change_nothing() {
        let mut sam = tiny_sam();
        // 96 px: a 6x6 grid, so the absolute positions (4x4) and the global block's relative
        // tables are resized; the second call takes them from the caches.
        let x = Tensor::randn(0f32, 1.0, (1, 3, 96, 96), &Device::Cpu).unwrap();
        let first = sam.forward(&x).unwrap();
        let again = sam.forward(&x).unwrap();
        let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(
            flat(&first),
            flat(&again),
            "a cached grid must give the same features"
        );
        assert_eq!(sam.abs_pos_cache.lock().unwrap().len(), 1);
        assert_eq!(sam.blocks[1].attn.tables.lock().unwrap().len(), 1);
        // the fresh computation equals what the cache holds
        assert_eq!(
            flat(&sam.abs_pos(6).unwrap()),
            flat(&sam.resized_abs_pos(6).unwrap())
        );
        let counting = Arc::new(Counting::default());
        sam.set_ops(counting.clone());
        let swapped = sam.forward(&x).unwrap();
        assert_eq!(flat(&first), flat(&swapped));
        // one attention per block (the windowed block attends all its windows at once), four
        // linears per block (qkv, proj, lin1, lin2)
        assert_eq!(counting.0.load(std::sync::atomic::Ordering::SeqCst), 2);
        assert_eq!(counting.1.load(std::sync::atomic::Ordering::SeqCst), 8);
        // the windowed block through window_heads, once (its attention and qkv projection are
        // among the counts above)
        assert_eq!(counting.2.load(std::sync::atomic::Ordering::SeqCst), 1);
    }

    #[test]
    fn window_partition_round_trips_with_padding() {
        let dev = Device::Cpu;
        let x = Tensor::arange(0f32, (5 * 7 * 2) as f32, &dev)
            .unwrap()
            .reshape((1, 5, 7, 2))
            .unwrap();
        let (win, pad) = window_partition(&x, 3).unwrap();
        assert_eq!(pad, (6, 9));
        assert_eq!(win.dims(), &[6, 3, 3, 2]);
        // Window (0, 1) starts at column 3 of row 0.
        assert_eq!(
            win.get(1)
                .unwrap()
                .get(0)
                .unwrap()
                .get(0)
                .unwrap()
                .to_vec1::<f32>()
                .unwrap(),
            vec![6.0, 7.0]
        );
        // The last window holds padding (zeros) below row 5.
        assert_eq!(
            win.get(5)
                .unwrap()
                .get(2)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap(),
            0.0
        );
        let back = window_unpartition(&win, 3, pad, (5, 7)).unwrap();
        assert_eq!(
            back.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            x.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
    }

    #[test]
    fn rel_pos_indexes_by_offset() {
        let dev = Device::Cpu;
        // table row r holds value r; Rh[i, j] = table[i - j + k - 1]
        let t = Tensor::arange(0f32, 5.0, &dev)
            .unwrap()
            .reshape((5, 1))
            .unwrap();
        let r = get_rel_pos(3, 3, &t)
            .unwrap()
            .squeeze(2)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        assert_eq!(
            r,
            vec![
                vec![2.0, 1.0, 0.0],
                vec![3.0, 2.0, 1.0],
                vec![4.0, 3.0, 2.0]
            ]
        );
        // A 5-row table serving a 2x2 grid (3 rows needed) is linearly resized first.
        let r = get_rel_pos(2, 2, &t)
            .unwrap()
            .squeeze(2)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let resized = interp::linear_1d(&[0.0, 1.0, 2.0, 3.0, 4.0], 1, 5, 3);
        assert_eq!(
            r,
            vec![vec![resized[1], resized[0]], vec![resized[2], resized[1]]]
        );
    }

    #[test]
    fn rel_pos_bias_is_rel_h_plus_rel_w() {
        let dev = Device::Cpu;
        let q = Tensor::new(&[[[1f32], [2.0], [3.0], [4.0]]], &dev).unwrap(); // b=1, 2x2 grid, c=1
        let rh = Tensor::new(&[[10f32], [20.0], [30.0]], &dev).unwrap();
        let rw = Tensor::new(&[[1f32], [2.0], [3.0]], &dev).unwrap();
        let (rh, rw) = (get_rel_pos(2, 2, &rh).unwrap(), get_rel_pos(2, 2, &rw).unwrap());
        let bias = rel_pos_bias(&q, &rh, &rw, (2, 2), (2, 2)).unwrap();
        let bias = bias.squeeze(0).unwrap().to_vec2::<f32>().unwrap();
        // query (h=1, w=0) = 3.0; key (kh=0, kw=1): q*Rh[1-0+1] + q*Rw[0-1+1] = 3*30 + 3*1
        assert_eq!(bias[2][1], 93.0);
        // query (0, 0) = 1.0; key (1, 1): 1*Rh[0] + 1*Rw[0] = 11
        assert_eq!(bias[0][3], 11.0);
    }
}
