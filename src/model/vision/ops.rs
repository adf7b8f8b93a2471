//! The operations of the vision towers that the GPU fast path replaces: SAM's attention with
//! decomposed relative positions and CLIP's (over the qkv projection's output, the heads split
//! and merged inside), a linear layer with its activation and residual add, SAM's windows (and
//! its windowed attention as a whole, [`VisionOps::window_heads`]), patch embedding and neck,
//! the layer norms, and CLIP's blocks as a whole ([`VisionOps::clip_blocks`]: the fast path
//! replays them as one CUDA graph).
//! [`ReferenceOps`] computes them as deepencoder.py does (on every device; the default);
//! `crate::model::fast::vision` fuses them on CUDA. A tower holds an `Arc<dyn VisionOps>` and
//! [`crate::model::vision::DeepEncoder::set_ops`] swaps it.
//!
//! Owns: the contract (shapes, what is rounded where) and the reference. Does not own the
//! towers' structure (`sam`, `clip`).

use candle_core::{Module, Result, Tensor};
use candle_nn::{Conv2d, LayerNorm, Linear, VarBuilder};

use super::sam::{rel_pos_bias, sdpa, window_partition, window_unpartition, Neck};

/// The activation a linear layer's output goes through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Act {
    None,
    /// `nn.GELU()`: `x * (1 + erf(x / sqrt 2)) / 2` (SAM's MLP).
    GeluErf,
    /// `x * sigmoid(1.702 x)` (CLIP's MLP).
    QuickGelu,
}

impl Act {
    /// The activation as the reference computes it (candle ops in the tensor's dtype).
    pub fn apply(self, x: &Tensor) -> Result<Tensor> {
        match self {
            Act::None => Ok(x.clone()),
            Act::GeluErf => x.gelu_erf(),
            Act::QuickGelu => x * candle_nn::ops::sigmoid(&(x * 1.702)?)?,
        }
    }
}

/// The inputs of SAM's windowed attention as a whole ([`VisionOps::window_heads`]): `x` the
/// image after the block's first norm `(b, h, w, c)`, the block's qkv projection and heads, the
/// window side `ws` and the relative-position tables `get_rel_pos` gathered for a `ws x ws`
/// grid.
pub struct WindowAttention<'a> {
    pub x: &'a Tensor,
    pub qkv: &'a Linear,
    pub heads: usize,
    pub ws: usize,
    pub rh: &'a Tensor,
    pub rw: &'a Tensor,
}

/// The inputs of SAM's attention over one `h x w` grid: `qkv` the qkv projection's output
/// `(b, h*w, 3, heads, d)` (b = views, or windows); `rh` `(h, h, d)`, `rw` `(w, w, d)`: the
/// relative-position tables `get_rel_pos` gathered for this grid.
pub struct GridAttention<'a> {
    pub qkv: &'a Tensor,
    pub rh: &'a Tensor,
    pub rw: &'a Tensor,
    pub hw: (usize, usize),
}

/// `qkv` `(b, t, 3, heads, d)` -> `q`, `k`, `v` `(b*heads, t, d)` contiguous
/// (`qkv.permute(2, 0, 3, 1, 4)`); `copy` makes the permuted view contiguous.
pub fn split_heads(qkv: &Tensor, copy: &dyn Fn(&Tensor) -> Result<Tensor>) -> Result<[Tensor; 3]> {
    let (b, t, _, nh, d) = qkv.dims5()?;
    let qkv = copy(&qkv.permute((2, 0, 3, 1, 4))?)?.reshape((3, b * nh, t, d))?;
    Ok([qkv.get(0)?, qkv.get(1)?, qkv.get(2)?])
}

/// The heads' outputs `(b*heads, t, d)` -> `(b, t, heads*d)`
/// (`x.view(B, nHead, t, -1).permute(0, 2, 1, 3)`); `copy` as in [`split_heads`].
pub fn merge_heads(x: &Tensor, b: usize, copy: &dyn Fn(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
    let (n, t, d) = x.dims3()?;
    let x = x.reshape((b, n / b, t, d))?.permute((0, 2, 1, 3))?;
    copy(&x)?.reshape((b, t, n / b * d))
}

/// `nn.LayerNorm` with its eps readable (candle's keeps it private): the fast path's kernel
/// needs it, and one constructor keeps the two from disagreeing.
pub struct Norm {
    pub ln: LayerNorm,
    pub eps: f64,
}

impl Norm {
    /// `weight` and `bias` of `dim` under `vb`.
    pub fn new(dim: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            ln: candle_nn::layer_norm(dim, eps, vb)?,
            eps,
        })
    }
}

pub trait VisionOps: Send + Sync {
    /// SAM's attention, `softmax(q k^T / sqrt(d) + rel_h + rel_w) v` per head (`Attention.forward`
    /// with `add_decomposed_rel_pos`, up to `proj`), the heads merged: `(b, h*w, heads*d)`.
    fn attend(&self, a: &GridAttention<'_>) -> Result<Tensor>;

    /// CLIP's attention, `softmax(q k^T / sqrt(d)) v` per head (no bias, no mask), over its
    /// qkv projection's output `(b, t, 3, heads, d)`, the heads merged: `(b, t, heads*d)`.
    fn attend_plain(&self, qkv: &Tensor) -> Result<Tensor>;

    /// SAM's patch embedding (a convolution of stride = kernel, with a bias) and its absolute
    /// positions `pos` `(1, H/p, W/p, c)`: pixels `(b, 3, H, W)` -> `(b, H/p, W/p, c)`.
    fn patch_embed(&self, conv: &Conv2d, pos: &Tensor, pixels: &Tensor) -> Result<Tensor>;

    /// `window_partition`: `(b, h, w, c)` -> `(b * n_windows, ws, ws, c)`, zero-padded to a
    /// multiple of the window, and the padded size.
    fn windows(&self, x: &Tensor, ws: usize) -> Result<(Tensor, (usize, usize))>;

    /// `window_unpartition`: the windows put back into `(b, h, w, c)`, the padding cropped.
    fn unwindow(&self, windows: &Tensor, ws: usize, padded: (usize, usize), hw: (usize, usize)) -> Result<Tensor>;

    /// SAM's windowed attention up to `proj`, `window_unpartition(attention(qkv(window_partition(x))))`:
    /// `(b, h, w, heads * d)`; by default [`partitioned_window_heads`] (the ops above, the
    /// reference's way). The fast path reads and writes each window where it lies in the image,
    /// the padding's keys and values being the projection's bias (a zero row's projection).
    fn window_heads(&self, a: &WindowAttention<'_>) -> Result<Tensor> {
        partitioned_window_heads(self, a)
    }

    /// SAM's neck and downsampling convolutions on the blocks' `(b, h, w, c)`:
    /// `(b, 1024, h/4, w/4)`.
    fn neck(&self, n: &Neck, x: &Tensor) -> Result<Tensor>;

    /// `act(l(x)) + residual` over the last dim of `x`, each step rounded to the dtype as the
    /// reference's ops round.
    fn linear(&self, l: &Linear, x: &Tensor, act: Act, residual: Option<&Tensor>)
        -> Result<Tensor>;

    /// The layer norm over the last dim of `x`.
    fn layer_norm(&self, n: &Norm, x: &Tensor) -> Result<Tensor>;

    /// CLIP's blocks in turn over each of `xs`, `(b_i, t_i, c)` after the pre-LN (views of
    /// several sizes at once: Gundam's tiles and its global view), or `None` where these ops
    /// have no whole-tower path for them: the caller then runs each block on the ops above,
    /// input by input (the reference's way; the fast path puts every input's rows through each
    /// linear together, attends within each input, and replays the blocks as one CUDA graph).
    fn clip_blocks(&self, _blocks: &[super::clip::Block], _xs: &[&Tensor]) -> Option<Result<Vec<Tensor>>> {
        None
    }

    /// A block's second half, `x + down(act(up(norm(x))))`: SAM's `x + mlp(norm2(x))`, CLIP's
    /// `h + mlp(layer_norm2(h))`, made of the ops above.
    fn residual_mlp(&self, norm: &Norm, up: &Linear, down: &Linear, act: Act, x: &Tensor) -> Result<Tensor> {
        let m = self.linear(up, &self.layer_norm(norm, x)?, act, None)?;
        self.linear(down, &m, Act::None, Some(x))
    }
}

/// [`VisionOps::window_heads`] as deepencoder.py computes it, on `ops`: the windows partitioned
/// (zero-padded), the qkv projection over them, the attention of each window with the window's
/// tables, the windows put back and the padding cropped.
pub fn partitioned_window_heads<O: VisionOps + ?Sized>(ops: &O, a: &WindowAttention<'_>) -> Result<Tensor> {
    let (_, h, w, c) = a.x.dims4()?;
    let ws = a.ws;
    let (win, padded) = ops.windows(a.x, ws)?;
    let n = win.dim(0)?;
    // qkv = self.qkv(x).reshape(B, H * W, 3, nHead, -1) (the heads split by `attend`)
    let qkv = ops.linear(a.qkv, &win, Act::None, None)?.reshape((n, ws * ws, 3, a.heads, c / a.heads))?;
    let y = ops.attend(&GridAttention { qkv: &qkv, rh: a.rh, rw: a.rw, hw: (ws, ws) })?;
    ops.unwindow(&y.reshape((n, ws, ws, c))?, ws, padded, (h, w))
}

/// deepencoder.py as written: the full relative-position bias, then [`sdpa`]; candle's linear,
/// then the activation and the add as separate ops.
pub struct ReferenceOps;

impl VisionOps for ReferenceOps {
    fn attend(&self, a: &GridAttention<'_>) -> Result<Tensor> {
        let [q, k, v] = split_heads(a.qkv, &Tensor::contiguous)?;
        let bias = rel_pos_bias(&q, a.rh, a.rw, a.hw, a.hw)?;
        merge_heads(&sdpa(&q, &k, &v, Some(&bias))?, a.qkv.dim(0)?, &Tensor::contiguous)
    }

    fn attend_plain(&self, qkv: &Tensor) -> Result<Tensor> {
        let [q, k, v] = split_heads(qkv, &Tensor::contiguous)?;
        merge_heads(&sdpa(&q, &k, &v, None)?, qkv.dim(0)?, &Tensor::contiguous)
    }

    fn patch_embed(&self, conv: &Conv2d, pos: &Tensor, pixels: &Tensor) -> Result<Tensor> {
        conv.forward(pixels)?.permute((0, 2, 3, 1))?.broadcast_add(pos)
    }

    fn windows(&self, x: &Tensor, ws: usize) -> Result<(Tensor, (usize, usize))> {
        window_partition(x, ws)
    }

    fn unwindow(&self, windows: &Tensor, ws: usize, padded: (usize, usize), hw: (usize, usize)) -> Result<Tensor> {
        window_unpartition(windows, ws, padded, hw)
    }

    fn neck(&self, n: &Neck, x: &Tensor) -> Result<Tensor> {
        n.forward(x)
    }

    fn linear(
        &self,
        l: &Linear,
        x: &Tensor,
        act: Act,
        residual: Option<&Tensor>,
    ) -> Result<Tensor> {
        let y = act.apply(&l.forward(x)?)?;
        match residual {
            Some(r) => r + y,
            None => Ok(y),
        }
    }

    fn layer_norm(&self, n: &Norm, x: &Tensor) -> Result<Tensor> {
        n.ln.forward(x)
    }
}
