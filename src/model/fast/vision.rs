//! The vision encoder on the GPU fast path: the reference towers ([`DeepEncoder`]) with their
//! [`VisionOps`] swapped for [`FastVisionOps`]: SAM's and CLIP's attention as one `sam_flash`
//! launch each (flash attention on the tensor cores; SAM's relative-position terms made inside
//! it from the tables, the bias and the scores never materialised; other head
//! dims: cuBLAS + the fused `sam_softmax` kernel, the scores held a few heads at a time), every
//! linear layer as one cuBLASLt GEMM with the bias and the residual add in its epilogue (with
//! an activation: the GEMM, then `bias_act`: bias, activation and residual in one pass), the
//! head splits and merges as the `permute` kernel, SAM's windowed attention over the image's
//! rows where the windows lie (`sam_flash_win`: no partition; else `patches` / `unpatch`), its
//! patch embedding as one copy, a GEMM and `bias_act`, its neck on NHWC (`patches` and GEMMs,
//! `LayerNorm2d` as `layer_norm`), the layer norms as `layer_norm`. CLIP's 24 blocks run on
//! fixed buffers and are replayed as one CUDA graph per input shape ([`ClipRun`]): at a batch
//! of one they are ~190 short launches, which the host could not issue as fast as the GPU runs
//! them. The rest (CLIP's embeddings, the projector, the layout) is the reference path's code.
//!
//! Owns: the fused ops and [`accelerate`]. Does not own the towers' structure nor their
//! weights ([`crate::model::vision`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use candle_core::op::BackpropOp;
use candle_core::cuda_backend::cudarc;
use candle_core::{CudaStorage, DType, Device, Result, Storage, Tensor, D};
use candle_nn::{Conv2d, Linear};
use half::bf16;

use crate::model::kernels::vision::{FlashTerms, View, LAYER_NORM_MAX, SAM_FLASH_HEAD_DIM, SAM_HEAD_DIMS};
use crate::model::kernels::cutlass::sam_fmha_refusal;
use crate::model::kernels::{copy_d2d, cuda_err, tensor_ptr, view_ptr, Buf, Kernels};
use crate::model::vision::clip::Block;
use crate::model::vision::sam::{LayerNorm2d, Neck};
use crate::model::vision::ops::{merge_heads, split_heads};
use crate::model::vision::{
    partitioned_window_heads, Act, DeepEncoder, GridAttention, Norm, ReferenceOps, VisionOps, WindowAttention,
};

/// The fused vision ops, bf16 on CUDA; any other dtype or device goes to [`ReferenceOps`].
pub struct FastVisionOps {
    k: Arc<Kernels>,
    /// A k x k convolution's weight `(o, i, k, k)` as the NHWC GEMM takes it, `(o, k*k*i)`,
    /// made at its first use (by the weight's device address).
    conv_weights: Mutex<HashMap<u64, Tensor>>,
    /// SAM's and CLIP's attention by `sam_flash` (head dim 64; SAM's grids of even sides), unless
    /// `OCR_PATCH_SAM_FLASH=0`: cuBLAS's scores, `sam_softmax` and cuBLAS's `p v` then (CLIP:
    /// the reference's).
    flash: bool,
    /// The linears by cuBLASLt with the bias and the residual in its epilogue
    /// ([`Kernels::linear_epilogue`]), unless `OCR_PATCH_VISION_LT=0`: candle's GEMM then
    /// `bias_act` (which rounds the GEMM's output before the bias, as the reference does).
    epilogue: bool,
    /// SAM's fc1 (erf-GELU) as one CUTLASS GEMM with the bias and the GELU in its epilogue
    /// ([`Kernels::linear_gelu`], the `cutlass` feature), unless `OCR_PATCH_CUTLASS=0` (or
    /// built without): the GEMM then `bias_act`.
    cutlass: bool,
    /// CLIP's blocks as one CUDA graph per input shape ([`ClipRun`]), unless
    /// `OCR_PATCH_VISION_GRAPH=0`: the same launches on the same buffers, eagerly. Needs the
    /// epilogue and flash attention; off, CLIP runs op by op.
    graphs: bool,
    /// SAM's windowed attention read and written where the windows lie in the image
    /// ([`VisionOps::window_heads`], `sam_flash_win`: the qkv projection over the image's rows
    /// alone, no partition and no unpartition), unless `OCR_PATCH_SAM_WINDOWS_IN_PLACE=0` (or
    /// `sam_flash_rows16` is off): [`partitioned_window_heads`] on these ops then (`patches`,
    /// the projection over the padded windows, `sam_flash_rows16`, `unpatch`).
    in_place_windows: bool,
    /// SAM's global attention (the grids [`sam_fmha_refusal`] lets through: 64 and 40 wide) on wgmma
    /// ([`Kernels::sam_fmha_qkv`], CUTLASS's Hopper FMHA, the `cutlass` feature; its terms from
    /// [`Kernels::sam_rel_products`]), unless `OCR_PATCH_SAM_FMHA=0` (or built without):
    /// `sam_flash` then.
    fmha: bool,
    /// CLIP's buffers and graph per list of inputs, each `(views, tokens)`.
    clip_runs: Mutex<HashMap<Vec<(usize, usize)>, ClipRun>>,
}

/// CLIP's blocks for one list of input shapes (their rows one after another: Gundam's tiles and
/// global view go through each linear together) on fixed buffers: the residual stream, the
/// normed rows, the qkv projection, the heads' output and the MLP's hidden rows, the weights'
/// addresses they were captured with, and the graph (captured at the shapes' second call, once
/// the first, eager, has loaded every kernel and made every GEMM plan). They live as long as the
/// ops: a model meets a handful of shapes (one per view size and batch of tiles). The capture assumes
/// no other thread enqueues work on the device's stream meanwhile (as the decoder's does); a
/// device on the legacy default stream is never captured (eager launches).
struct ClipRun {
    x: Buf<bf16>,
    normed: Buf<bf16>,
    qkv: Buf<bf16>,
    heads: Buf<bf16>,
    hidden: Buf<bf16>,
    weights: Vec<ClipBlockPtrs>,
    /// The shape was launched eagerly once (its plans made, its kernels loaded): capturable.
    launched: bool,
    graph: Option<Graph>,
    /// The capture failed once: this shape stays on eager launches.
    capture_failed: bool,
}

/// A captured graph; it is launched under [`FastVisionOps::clip_runs`]' lock only.
struct Graph(cudarc::driver::CudaGraph);

// SAFETY: the graph is launched and dropped under a lock, on the stream it was captured on,
// whose context is bound to the calling thread first
unsafe impl Send for Graph {}

/// One CLIP block's weights as addresses (bf16, contiguous, on the device) and its norms' eps.
#[derive(Debug, Clone, Copy, PartialEq)]
struct ClipBlockPtrs {
    ln1: (u64, u64, f64),
    qkv: (u64, u64),
    out: (u64, u64),
    ln2: (u64, u64, f64),
    fc1: (u64, u64),
    fc2: (u64, u64),
    /// The MLP's width (`fc1`'s outputs).
    ffn_width: usize,
}

impl ClipBlockPtrs {
    /// The block's addresses, if every weight and bias is there, contiguous, bf16 on CUDA and
    /// of CLIP's widths for `c` (`heads * 64 = c`, the MLP's width a multiple of 8).
    fn of(b: &Block, c: usize) -> Option<Self> {
        let a = &b.self_attn;
        let lin = |l: &Linear, out: usize, inp: usize| -> Option<(u64, u64)> {
            let bias = l.bias()?;
            let w = l.weight();
            (w.dims() == [out, inp] && bias.dims() == [out] && fusable(&[w, bias]))
                .then(|| Some((ptr(w).ok()?, ptr(bias).ok()?)))
                .flatten()
        };
        let norm = |n: &Norm| -> Option<(u64, u64, f64)> {
            let (w, bias) = (n.ln.weight(), n.ln.bias()?);
            (w.dims() == [c] && fusable(&[w, bias])).then(|| Some((ptr(w).ok()?, ptr(bias).ok()?, n.eps))).flatten()
        };
        let ffn = b.fc1.weight().dim(0).ok()?;
        if a.num_heads * SAM_FLASH_HEAD_DIM != c || ffn % 8 != 0 {
            return None;
        }
        Some(Self {
            ln1: norm(&b.layer_norm1)?,
            qkv: lin(&a.qkv_proj, 3 * c, c)?,
            out: lin(&a.out_proj, c, c)?,
            ln2: norm(&b.layer_norm2)?,
            fc1: lin(&b.fc1, ffn, c)?,
            fc2: lin(&b.fc2, c, ffn)?,
            ffn_width: ffn,
        })
    }
}

impl FastVisionOps {
    pub fn new(k: Arc<Kernels>) -> Self {
        let on = |var: &str| !std::env::var(var).is_ok_and(|v| v == "0");
        Self {
            k,
            flash: on("OCR_PATCH_SAM_FLASH"),
            epilogue: on("OCR_PATCH_VISION_LT"),
            cutlass: cfg!(feature = "cutlass") && on("OCR_PATCH_CUTLASS"),
            graphs: on("OCR_PATCH_VISION_GRAPH"),
            in_place_windows: on("OCR_PATCH_SAM_WINDOWS_IN_PLACE"),
            fmha: cfg!(feature = "cutlass") && on("OCR_PATCH_SAM_FMHA"),
            conv_weights: Mutex::default(),
            clip_runs: Mutex::default(),
        }
    }

    /// The same ops, SAM's attention by `sam_flash` or not (tests and benches compare them).
    pub fn with_flash(mut self, flash: bool) -> Self {
        self.flash = flash;
        self
    }

    /// The same ops, the linears by cuBLASLt's epilogue or by cuBLAS + `bias_act` (tests
    /// compare them).
    pub fn with_epilogue(mut self, epilogue: bool) -> Self {
        self.epilogue = epilogue;
        self
    }

    /// The same ops, SAM's fc1 by CUTLASS's fused GELU or not (tests compare them; without the
    /// `cutlass` feature it stays off).
    pub fn with_cutlass(mut self, cutlass: bool) -> Self {
        self.cutlass = cutlass && cfg!(feature = "cutlass");
        self
    }

    /// The same ops, SAM's windows attended where they lie or partitioned first (tests
    /// compare them).
    pub fn with_in_place_windows(mut self, in_place: bool) -> Self {
        self.in_place_windows = in_place;
        self
    }

    /// The same ops, SAM's global attention by CUTLASS's FMHA or by `sam_flash` (tests compare
    /// them; without the `cutlass` feature it stays off).
    pub fn with_fmha(mut self, fmha: bool) -> Self {
        self.fmha = fmha && cfg!(feature = "cutlass");
        self
    }

    /// The same ops, CLIP's blocks replayed as CUDA graphs or launched eagerly (tests compare
    /// them).
    pub fn with_graphs(mut self, graphs: bool) -> Self {
        self.graphs = graphs;
        self
    }

    /// CLIP's blocks over `xs` (`parts[i]` = `(b, t)` of `xs[i]`, each `c` wide) on the
    /// [`ClipRun`] of their shapes: the inputs copied one after another into the residual
    /// stream, the blocks launched (or their graph replayed), each input's rows copied out.
    fn run_clip(&self, blocks: &[ClipBlockPtrs], xs: &[&Tensor], parts: Vec<(usize, usize)>, c: usize, heads: usize) -> Result<Vec<Tensor>> {
        let Some(Device::Cuda(dev)) = xs.first().map(|x| x.device()) else { candle_core::bail!("clip_blocks: not on CUDA") };
        let rows: usize = parts.iter().map(|(b, t)| b * t).sum();
        let mut runs = self.clip_runs.lock().unwrap_or_else(|p| p.into_inner());
        // the shapes' buffers, made at their first call; other weights than those of its
        // capture (another tower on these ops) get fresh buffers, sized for them, and a new
        // capture
        let stale = runs.get(&parts).is_some_and(|r| r.weights != blocks);
        if stale {
            runs.remove(&parts);
        }
        let run = match runs.entry(parts.clone()) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => {
                let width = blocks.iter().map(|p| p.ffn_width).max().unwrap_or(0);
                e.insert(ClipRun {
                    x: Buf::zeros(dev, rows * c)?,
                    normed: Buf::zeros(dev, rows * c)?,
                    qkv: Buf::zeros(dev, rows * 3 * c)?,
                    heads: Buf::zeros(dev, rows * c)?,
                    hidden: Buf::zeros(dev, rows * width)?,
                    weights: blocks.to_vec(),
                    launched: false,
                    graph: None,
                    capture_failed: false,
                })
            }
        };
        let st = &self.k.stream;
        let mut at = 0;
        for x in xs {
            let x = x.contiguous()?;
            copy_d2d(st, run.x.ptr + at as u64 * 2, ptr(&x)?, x.elem_count() * 2)?;
            at += x.elem_count();
        }
        let capturable = self.graphs && !st.cu_stream().is_null();
        if run.graph.is_none() && capturable && run.launched && !run.capture_failed {
            // a capture that fails (another thread's work on the stream, a driver refusal)
            // leaves the shapes on eager launches: slower, never wrong
            match self.k.capture(|| self.clip_launches(run, &parts, c, heads)) {
                Ok(g) => run.graph = Some(Graph(g)),
                Err(e) => {
                    tracing::warn!("clip_blocks: no CUDA graph for {parts:?} (views, tokens), launching eagerly: {e}");
                    run.capture_failed = true;
                }
            }
        }
        match &run.graph {
            Some(g) => {
                st.context().bind_to_thread().map_err(cuda_err)?;
                g.0.launch().map_err(cuda_err)?;
            }
            None => {
                self.clip_launches(run, &parts, c, heads)?;
                run.launched = true;
            }
        }
        let mut at = 0;
        parts
            .iter()
            .map(|&(b, t)| {
                let out = self.uninit(dev, (b, t, c))?;
                copy_d2d(st, ptr(&out)?, run.x.ptr + at as u64 * 2, b * t * c * 2)?;
                at += b * t * c;
                Ok(out)
            })
            .collect()
    }

    /// The launches of CLIP's blocks on `run`'s buffers (`NoTPTransformerBlock.forward`):
    /// `x += out_proj(attention(qkv_proj(layer_norm1(x))))`, then
    /// `x += fc2(quick_gelu(fc1(layer_norm2(x))))`; every input's rows through each linear
    /// together, the attention within each input.
    fn clip_launches(&self, run: &ClipRun, parts: &[(usize, usize)], c: usize, heads: usize) -> Result<()> {
        let rows: usize = parts.iter().map(|(b, t)| b * t).sum();
        let k = &self.k;
        let scale = 1.0 / (SAM_FLASH_HEAD_DIM as f32).sqrt();
        for p in &run.weights {
            let ffn = p.ffn_width;
            k.layer_norm(run.x.ptr, p.ln1.0, p.ln1.1, run.normed.ptr, rows, c, p.ln1.2)?;
            k.linear_epilogue(run.normed.ptr, p.qkv.0, p.qkv.1, 0, run.qkv.ptr, rows, c, 3 * c)?;
            let mut at = 0u64;
            for &(b, t) in parts {
                let (qkv, out) = (run.qkv.ptr + at * 3 * c as u64 * 2, run.heads.ptr + at * c as u64 * 2);
                k.sam_flash_qkv(qkv, out, None, (b, t, heads), scale)?;
                at += (b * t) as u64;
            }
            k.linear_epilogue(run.heads.ptr, p.out.0, p.out.1, run.x.ptr, run.x.ptr, rows, c, c)?;
            k.layer_norm(run.x.ptr, p.ln2.0, p.ln2.1, run.normed.ptr, rows, c, p.ln2.2)?;
            k.linear_epilogue(run.normed.ptr, p.fc1.0, 0, 0, run.hidden.ptr, rows, c, ffn)?;
            k.bias_act(run.hidden.ptr, p.fc1.1, 0, rows, ffn, Act::QuickGelu)?;
            k.linear_epilogue(run.hidden.ptr, p.fc2.0, p.fc2.1, run.x.ptr, run.x.ptr, rows, ffn, c)?;
        }
        Ok(())
    }

    /// Whether [`Self::conv_nhwc`] takes `conv`: no groups, no dilation, a square kernel,
    /// input channels a multiple of 8, bf16 on CUDA.
    fn conv_fits(conv: &Conv2d) -> bool {
        let cfg = conv.config();
        let w = conv.weight();
        matches!(w.dims(), &[_, i, kh, kw] if kh == kw && i % 8 == 0)
            && cfg.groups == 1
            && cfg.dilation == 1
            && fusable(&[w])
    }

    /// `conv` ([`Self::conv_fits`]) over the NHWC image `x` `(b, h, w, c)`: the patches (none
    /// for a 1x1 convolution) times the weight, `(b, oh, ow, o)`.
    fn conv_nhwc(&self, conv: &Conv2d, x: &Tensor) -> Result<Tensor> {
        let cfg = conv.config();
        let (o, _, kh, _) = conv.weight().dims4()?;
        let (b, h, w, c) = x.dims4()?;
        let Device::Cuda(dev) = x.device() else { candle_core::bail!("conv_nhwc: not on CUDA") };
        let (k, s, p) = (kh, cfg.stride, cfg.padding);
        if h + 2 * p < k || w + 2 * p < k {
            candle_core::bail!("conv_nhwc: a {h}x{w} image is smaller than the {k}x{k} kernel");
        }
        let (oh, ow) = ((h + 2 * p - k) / s + 1, (w + 2 * p - k) / s + 1);
        let x = x.contiguous()?;
        let cols = if k == 1 && s == 1 && p == 0 {
            x.reshape((b * h * w, c))?
        } else {
            let cols = self.uninit(dev, (b * oh * ow, k * k * c))?;
            self.k.patches(ptr(&x)?, ptr(&cols)?, b, (h, w, c), (k, s, p), (oh, ow))?;
            cols
        };
        let wm = {
            let key = ptr(conv.weight())?;
            let mut cache = self.conv_weights.lock().unwrap_or_else(|p| p.into_inner());
            match cache.get(&key) {
                Some(t) => t.clone(),
                None => {
                    // (o, i, ky, kx) -> (o, ky, kx, i): the patches' column order
                    let t = conv.weight().permute((0, 2, 3, 1))?.contiguous()?.reshape((o, k * k * c))?;
                    cache.insert(key, t.clone());
                    t
                }
            }
        };
        let y = cols.matmul(&wm.t()?)?;
        if let Some(bias) = conv.bias() {
            let bias = bias.contiguous()?;
            self.k.bias_act(ptr(&y)?, ptr(&bias)?, 0, b * oh * ow, o, Act::None)?;
        }
        y.reshape((b, oh, ow, o))
    }

    /// `sam_flash` over the contiguous qkv projection's output `(b, t, 3, heads, 64)`
    /// ([`Kernels::sam_flash_qkv`]): the heads merged, `(b, t, heads*64)`.
    fn flash_heads(&self, qkv: &Tensor, terms: Option<FlashTerms>, scale: f32) -> Result<Tensor> {
        let (b, t, _, nh, d) = qkv.dims5()?;
        let Device::Cuda(dev) = qkv.device() else { candle_core::bail!("sam_flash: not on CUDA") };
        let out = self.uninit(dev, (b, t, nh * d))?;
        self.k.sam_flash_qkv(ptr(qkv)?, ptr(&out)?, terms, (b, t, nh), scale)?;
        Ok(out)
    }

    /// `LayerNorm2d` over the channels of an NHWC image (at most `LAYER_NORM_MAX`, a multiple
    /// of 8): the rows' layer norm.
    fn channel_norm(&self, n: &LayerNorm2d, x: &Tensor) -> Result<Tensor> {
        let c = x.dim(D::Minus1)?;
        let Device::Cuda(dev) = x.device() else { candle_core::bail!("channel_norm: not on CUDA") };
        let (w, b) = (n.weight.contiguous()?, n.bias.contiguous()?);
        let y = self.uninit(dev, x.dims())?;
        self.k.layer_norm(ptr(x)?, ptr(&w)?, ptr(&b)?, ptr(&y)?, x.elem_count() / c, c, n.eps)?;
        Ok(y)
    }

    /// `x` with contiguous storage: a strided bf16 view on CUDA by the `permute` kernel (16
    /// bytes a thread), anything else by candle's copy; the same values.
    pub fn contiguous(&self, x: &Tensor) -> Result<Tensor> {
        let l = x.layout();
        let view = View::of(x.dims(), l.stride());
        let (Some(view), true, Device::Cuda(dev)) =
            (view, fusable(&[x]) && l.start_offset() % 8 == 0, x.device())
        else {
            return x.contiguous();
        };
        if x.is_contiguous() {
            return Ok(x.clone());
        }
        let out = self.uninit(dev, x.dims())?;
        self.k.permute(view_ptr::<bf16>(x)?, ptr(&out)?, view)?;
        Ok(out)
    }

    /// A bf16 tensor whose every element the caller's kernel writes (no zero fill).
    fn uninit(
        &self,
        dev: &candle_core::CudaDevice,
        shape: impl Into<candle_core::Shape>,
    ) -> Result<Tensor> {
        let shape = shape.into();
        let out = unsafe { dev.alloc::<bf16>(shape.elem_count())? };
        Ok(Tensor::from_storage(
            Storage::Cuda(CudaStorage::wrap_cuda_slice(out, dev.clone())),
            shape,
            BackpropOp::none(),
            false,
        ))
    }
}

fn fusable(ts: &[&Tensor]) -> bool {
    ts.iter()
        .all(|t| t.device().is_cuda() && t.dtype() == DType::BF16)
}

fn ptr(t: &Tensor) -> Result<u64> {
    tensor_ptr::<bf16>(t)
}

impl VisionOps for FastVisionOps {
    fn attend(&self, a: &GridAttention<'_>) -> Result<Tensor> {
        let (b, t, three, nh, d) = a.qkv.dims5()?;
        let (h, w) = a.hw;
        let shapes_fit = three == 3 && t == h * w && t % 4 == 0 && SAM_HEAD_DIMS.contains(&d);
        if !fusable(&[a.qkv, a.rh, a.rw]) || !shapes_fit {
            return ReferenceOps.attend(a);
        }
        let (rh, rw) = (a.rh.contiguous()?, a.rw.contiguous()?);
        let scale = 1.0 / (d as f32).sqrt();
        if self.flash && d == SAM_FLASH_HEAD_DIM && h % 2 == 0 && w % 2 == 0 && t < 1 << 16 {
            // one pass on the tensor cores, q, k and v read in place, the relative-position
            // terms made from the tables and the heads merged by the kernel
            let qkv = a.qkv.contiguous()?;
            if self.fmha && sam_fmha_refusal((h, w), (b, t, nh)).is_none() {
                // q times the tables' two rows that hold every term (cuBLAS), then the
                // attention on wgmma with the terms read from them
                let Device::Cuda(dev) = qkv.device() else { candle_core::bail!("sam_fmha: not on CUDA") };
                let rows = Tensor::cat(&[rh.get(0)?, rh.get(h - 1)?, rw.get(0)?, rw.get(w - 1)?], 0)?;
                let products = self.uninit(dev, (nh, b * t, 2 * h + 2 * w))?;
                self.k.sam_rel_products(ptr(&qkv)?, ptr(&rows)?, ptr(&products)?, (h, w), (b, t, nh))?;
                let out = self.uninit(dev, (b, t, nh * d))?;
                self.k.sam_fmha_qkv(ptr(&qkv)?, ptr(&out)?, ptr(&products)?, (h, w), (b, t, nh), scale)?;
                return Ok(out);
            }
            let terms = FlashTerms { rh: ptr(&rh)?, rw: ptr(&rw)?, grid: (h, w) };
            return self.flash_heads(&qkv, Some(terms), scale);
        }
        // cuBLAS's scores, sam_softmax, cuBLAS's p v, on the heads split
        let copy = |x: &Tensor| self.contiguous(x);
        let [q, k, v] = split_heads(a.qkv, &copy)?;
        let n = b * nh;
        // the scores of at most SCORE_BYTES at once (a few heads of a global view, every
        // window of a windowed block): the device's peak stays low
        let chunk = (SCORE_BYTES / (t * t * 2)).clamp(1, n);
        let mut outs = Vec::with_capacity(n.div_ceil(chunk));
        for c0 in (0..n).step_by(chunk) {
            let c = chunk.min(n - c0);
            let qc = q.narrow(0, c0, c)?;
            // scores = q @ k^T: a fresh (c, t, t) tensor, overwritten in place by the
            // probabilities
            let s = qc.matmul(&k.narrow(0, c0, c)?.t()?)?;
            self.k.sam_softmax(
                ptr(&s)?,
                ptr(&qc)?,
                (ptr(&rh)?, ptr(&rw)?),
                c * t,
                (h, w),
                (h, w),
                d,
                scale,
            )?;
            outs.push(s.matmul(&v.narrow(0, c0, c)?)?);
        }
        let out = if outs.len() == 1 { outs.remove(0) } else { Tensor::cat(&outs, 0)? };
        merge_heads(&out, b, &copy)
    }

    fn clip_blocks(&self, blocks: &[Block], xs: &[&Tensor]) -> Option<Result<Vec<Tensor>>> {
        let (_, _, c) = xs.first()?.dims3().ok()?;
        // every input `(b, t, c)`, of one width
        let parts = xs
            .iter()
            .map(|x| x.dims3().ok().filter(|&(_, _, cx)| cx == c).map(|(b, t, _)| (b, t)))
            .collect::<Option<Vec<_>>>()?;
        if !self.epilogue || !self.flash || !fusable(xs) || c % 8 != 0 || c > LAYER_NORM_MAX {
            return None;
        }
        let ptrs = blocks.iter().map(|b| ClipBlockPtrs::of(b, c)).collect::<Option<Vec<_>>>()?;
        let heads = blocks.first()?.self_attn.num_heads;
        Some(self.run_clip(&ptrs, xs, parts, c, heads))
    }

    fn window_heads(&self, a: &WindowAttention<'_>) -> Result<Tensor> {
        let (b, h, w, c) = a.x.dims4()?;
        let (Some(bias), Device::Cuda(dev)) = (a.qkv.bias(), a.x.device()) else {
            return partitioned_window_heads(self, a);
        };
        let fits = self.in_place_windows
            && self.flash
            && self.k.flash_rows16
            && a.heads * SAM_FLASH_HEAD_DIM == c
            && a.ws % 2 == 0
            && (2..=16).contains(&a.ws)
            && a.rh.dims() == [a.ws, a.ws, SAM_FLASH_HEAD_DIM]
            && a.rw.dims() == [a.ws, a.ws, SAM_FLASH_HEAD_DIM]
            && bias.dims() == [3 * c]
            // the kernel's 32-bit offsets into the projection (past them: the partition path)
            && b * h * w * 3 * c < 1 << 31
            && fusable(&[a.x, a.qkv.weight(), bias, a.rh, a.rw]);
        if !fits {
            return partitioned_window_heads(self, a);
        }
        // the projection over the image's rows alone; a padded position's would be the bias
        let qkv = self.linear(a.qkv, a.x, Act::None, None)?;
        let (bias, rh, rw) = (bias.contiguous()?, a.rh.contiguous()?, a.rw.contiguous()?);
        let out = self.uninit(dev, (b, h, w, c))?;
        let terms = FlashTerms { rh: ptr(&rh)?, rw: ptr(&rw)?, grid: (a.ws, a.ws) };
        let scale = 1.0 / (SAM_FLASH_HEAD_DIM as f32).sqrt();
        self.k.sam_flash_windows(ptr(&qkv)?, ptr(&bias)?, ptr(&out)?, (b, h, w, a.heads), terms, scale)?;
        Ok(out)
    }

    fn attend_plain(&self, qkv: &Tensor) -> Result<Tensor> {
        let (_, _, three, _, d) = qkv.dims5()?;
        if !self.flash || !fusable(&[qkv]) || d != SAM_FLASH_HEAD_DIM || three != 3 {
            return ReferenceOps.attend_plain(qkv);
        }
        self.flash_heads(&qkv.contiguous()?, None, 1.0 / (d as f32).sqrt())
    }

    fn patch_embed(&self, conv: &Conv2d, pos: &Tensor, pixels: &Tensor) -> Result<Tensor> {
        let (b, ch, hh, ww) = pixels.dims4()?;
        let (o, _, k, _) = conv.weight().dims4()?;
        let cfg = conv.config();
        let fits = cfg.stride == k && cfg.padding == 0 && cfg.groups == 1 && cfg.dilation == 1
            && hh % k == 0 && ww % k == 0 && k % 8 == 0 && o % 8 == 0
            && pos.dims() == [1, hh / k, ww / k, o];
        let Some(bias) = conv.bias() else { return ReferenceOps.patch_embed(conv, pos, pixels) };
        if !fits || !fusable(&[pixels, conv.weight(), bias, pos]) {
            return ReferenceOps.patch_embed(conv, pos, pixels);
        }
        let (gh, gw) = (hh / k, ww / k);
        // each patch's pixels in the weight's (channel, ky, kx) order: one copy, one GEMM
        let view = pixels.reshape((b, ch, gh, k, gw, k))?.permute((0, 2, 4, 1, 3, 5))?;
        let cols = self.contiguous(&view)?.reshape((b * gh * gw, ch * k * k))?;
        let y = cols.matmul(&conv.weight().reshape((o, ch * k * k))?.t()?)?;
        // + bias, rounded, + the positions, rounded (the reference's two adds), per image
        let (bias, pos) = (bias.contiguous()?, pos.contiguous()?);
        for i in 0..b {
            let yi = y.narrow(0, i * gh * gw, gh * gw)?;
            self.k.bias_act(view_ptr::<bf16>(&yi)?, ptr(&bias)?, ptr(&pos)?, gh * gw, o, Act::None)?;
        }
        y.reshape((b, gh, gw, o))
    }

    fn windows(&self, x: &Tensor, ws: usize) -> Result<(Tensor, (usize, usize))> {
        let (b, h, w, c) = x.dims4()?;
        let Device::Cuda(dev) = x.device() else { return ReferenceOps.windows(x, ws) };
        if !fusable(&[x]) || c % 8 != 0 || ws == 0 {
            return ReferenceOps.windows(x, ws);
        }
        let (nh, nw) = (h.div_ceil(ws), w.div_ceil(ws));
        let x = x.contiguous()?;
        let out = self.uninit(dev, (b * nh * nw, ws, ws, c))?;
        self.k.patches(ptr(&x)?, ptr(&out)?, b, (h, w, c), (ws, ws, 0), (nh, nw))?;
        Ok((out, (nh * ws, nw * ws)))
    }

    fn unwindow(&self, windows: &Tensor, ws: usize, (hp, wp): (usize, usize), (h, w): (usize, usize)) -> Result<Tensor> {
        let (n, _, _, c) = windows.dims4()?;
        let Device::Cuda(dev) = windows.device() else {
            return ReferenceOps.unwindow(windows, ws, (hp, wp), (h, w));
        };
        if !fusable(&[windows]) || c % 8 != 0 || h.div_ceil(ws) * ws != hp || w.div_ceil(ws) * ws != wp {
            return ReferenceOps.unwindow(windows, ws, (hp, wp), (h, w));
        }
        let b = n / (hp / ws * (wp / ws));
        let windows = windows.contiguous()?;
        let out = self.uninit(dev, (b, h, w, c))?;
        self.k.unpatch(ptr(&windows)?, ptr(&out)?, b, (h, w, c), ws)?;
        Ok(out)
    }

    fn neck(&self, n: &Neck, x: &Tensor) -> Result<Tensor> {
        // NHWC throughout (the reference goes to NCHW first): the convolutions as patches and
        // GEMMs, LayerNorm2d as the rows' layer norm
        let convs = [&n.conv1, &n.conv2, &n.net_2, &n.net_3];
        let norms_fit = [&n.ln1, &n.ln2].iter().all(|l| {
            let c = l.weight.elem_count();
            c % 8 == 0 && c <= LAYER_NORM_MAX && fusable(&[&l.weight, &l.bias])
        });
        if !fusable(&[x]) || !norms_fit || !convs.iter().all(|c| Self::conv_fits(c)) {
            return ReferenceOps.neck(n, x);
        }
        let y = self.channel_norm(&n.ln1, &self.conv_nhwc(&n.conv1, x)?)?;
        let y = self.channel_norm(&n.ln2, &self.conv_nhwc(&n.conv2, &y)?)?;
        let y = self.conv_nhwc(&n.net_3, &self.conv_nhwc(&n.net_2, &y)?)?;
        y.permute((0, 3, 1, 2))?.contiguous()
    }

    fn linear(
        &self,
        l: &Linear,
        x: &Tensor,
        act: Act,
        residual: Option<&Tensor>,
    ) -> Result<Tensor> {
        let mut ts = vec![x, l.weight()];
        ts.extend(l.bias());
        ts.extend(residual);
        let (out, kdim) = l.weight().dims2()?;
        if !fusable(&ts) || out % 8 != 0 {
            return ReferenceOps.linear(l, x, act, residual);
        }
        let Device::Cuda(dev) = x.device() else { return ReferenceOps.linear(l, x, act, residual) };
        let mut dims = x.dims().to_vec();
        *dims.last_mut().expect("a linear input has dims") = out;
        let rows = x.elem_count() / kdim;
        // contiguous copies (if any) live until the launches are queued
        let (x, w) = (x.contiguous()?.reshape((rows, kdim))?, l.weight().contiguous()?);
        let bias = l.bias().map(Tensor::contiguous).transpose()?;
        let res = residual.map(Tensor::contiguous).transpose()?;
        let opt_ptr = |t: &Option<Tensor>| t.as_ref().map_or(Ok(0), ptr);
        let (px, pw, pb, pr) = (ptr(&x)?, ptr(&w)?, opt_ptr(&bias)?, opt_ptr(&res)?);
        // cuBLASLt takes 16-byte aligned addresses (not so a view into a tensor) and widths of 8
        let lt_fits = self.epilogue && kdim % 8 == 0 && [px, pw, pb, pr].iter().all(|a| a % 16 == 0);
        let y = if lt_fits && self.cutlass && act == Act::GeluErf && pb != 0 && pr == 0 {
            // SAM's fc1: the bias and erf-GELU in CUTLASS's epilogue
            let y = self.uninit(dev, (rows, out))?;
            self.k.linear_gelu(px, pw, pb, ptr(&y)?, rows, kdim, out)?;
            y
        } else if lt_fits {
            // without an activation one launch, the bias and residual in the epilogue; with one,
            // the GEMM then `bias_act` (the activation of the rounded sum, as the reference's)
            let y = self.uninit(dev, (rows, out))?;
            let (eb, er) = if act == Act::None { (pb, pr) } else { (0, 0) };
            self.k.linear_epilogue(px, pw, eb, er, ptr(&y)?, rows, kdim, out)?;
            if act != Act::None {
                self.k.bias_act(ptr(&y)?, pb, pr, rows, out, act)?;
            }
            y
        } else {
            // one GEMM over all rows (cuBLAS), then the epilogue in place on its fresh output
            let y = x.matmul(&w.t()?)?;
            if pb != 0 || pr != 0 || act != Act::None {
                self.k.bias_act(ptr(&y)?, pb, pr, rows, out, act)?;
            }
            y
        };
        y.reshape(dims)
    }

    fn layer_norm(&self, n: &Norm, x: &Tensor) -> Result<Tensor> {
        let Some(b) = n.ln.bias() else {
            return ReferenceOps.layer_norm(n, x);
        };
        let w = n.ln.weight();
        let c = x.dim(candle_core::D::Minus1)?;
        let (Device::Cuda(dev), true) = (
            x.device(),
            fusable(&[x, w, b]) && c % 8 == 0 && c <= LAYER_NORM_MAX,
        ) else {
            return ReferenceOps.layer_norm(n, x);
        };
        let x = x.contiguous()?;
        let (w, b) = (w.contiguous()?, b.contiguous()?);
        let y = self.uninit(dev, x.dims())?;
        let rows = x.elem_count() / c;
        self.k
            .layer_norm(ptr(&x)?, ptr(&w)?, ptr(&b)?, ptr(&y)?, rows, c, n.eps)?;
        Ok(y)
    }
}

/// The most bytes of scores [`FastVisionOps::attend`] holds at once (128 MiB: four heads of a
/// 1024 view; fewer heads per GEMM run the score GEMMs less efficiently, more raise the peak).
const SCORE_BYTES: usize = 128 << 20;

/// Puts `encoder` on the fast path: SAM and CLIP use [`FastVisionOps`] (bf16 on CUDA; other
/// dtypes keep the reference ops).
pub fn accelerate(encoder: &mut DeepEncoder, k: Arc<Kernels>) {
    encoder.set_ops(Arc::new(FastVisionOps::new(k)));
}
