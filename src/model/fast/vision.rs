//! The vision encoder on the GPU fast path: the reference towers ([`DeepEncoder`]) with their
//! [`VisionOps`] swapped for [`FastVisionOps`]: SAM's attention as one `sam_flash` launch (flash
//! attention on the tensor cores; the relative-position terms are the reference's two batched
//! GEMMs, the bias and the scores are never materialised; other head dims: cuBLAS + the fused
//! `sam_softmax` kernel, the scores held a few heads at a time), every linear layer as one cuBLAS GEMM + the `bias_act` epilogue
//! (bias, activation and residual add in one pass), the head splits, merges and window
//! partitions as the `permute` kernel, the layer norms as `layer_norm`, CLIP's attention as
//! `sam_flash` without a bias. The rest (convolutions, the neck's channel norms, the layout) is
//! the reference path's code.
//!
//! Owns: the fused ops and [`accelerate`]. Does not own the towers' structure nor their
//! weights ([`crate::model::vision`]).

use std::sync::Arc;

use candle_core::op::BackpropOp;
use candle_core::{CudaStorage, DType, Device, Result, Storage, Tensor, D};
use candle_nn::Linear;
use half::bf16;

use crate::model::kernels::vision::{FlashTerms, View, LAYER_NORM_MAX, SAM_FLASH_HEAD_DIM, SAM_HEAD_DIMS};
use crate::model::kernels::{tensor_ptr, view_ptr, Kernels};
use crate::model::vision::{rel_pos_terms, Act, DeepEncoder, GridAttention, Norm, ReferenceOps, VisionOps};

/// The fused vision ops, bf16 on CUDA; any other dtype or device goes to [`ReferenceOps`].
pub struct FastVisionOps {
    k: Arc<Kernels>,
    /// SAM's and CLIP's attention by `sam_flash` (head dim 64; SAM's grids of even sides), unless
    /// `OCR_PATCH_SAM_FLASH=0`: cuBLAS's scores, `sam_softmax` and cuBLAS's `p v` then (CLIP:
    /// the reference's).
    flash: bool,
}

impl FastVisionOps {
    pub fn new(k: Arc<Kernels>) -> Self {
        let flash = !std::env::var("OCR_PATCH_SAM_FLASH").is_ok_and(|v| v == "0");
        Self { k, flash }
    }

    /// The same ops, SAM's attention by `sam_flash` or not (tests and benches compare them).
    pub fn with_flash(mut self, flash: bool) -> Self {
        self.flash = flash;
        self
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
        let (n, t, d) = a.q.dims3()?;
        let (h, w) = a.hw;
        let shapes_fit = t == h * w && t % 4 == 0 && SAM_HEAD_DIMS.contains(&d);
        if !fusable(&[a.q, a.k, a.v, a.rh, a.rw]) || !shapes_fit {
            return ReferenceOps.attend(a);
        }
        let (q, k, v) = (a.q.contiguous()?, a.k.contiguous()?, a.v.contiguous()?);
        let (rh, rw) = (a.rh.contiguous()?, a.rw.contiguous()?);
        let scale = 1.0 / (d as f32).sqrt();
        if self.flash && d == SAM_FLASH_HEAD_DIM && h % 2 == 0 && w % 2 == 0 && t < 1 << 16 {
            // one pass on the tensor cores; the terms are the reference's two batched GEMMs
            let (rel_h, rel_w) = rel_pos_terms(&q, &rh, &rw, (h, w), &|x| self.contiguous(x))?;
            let Device::Cuda(dev) = q.device() else { unreachable!("fusable checked the device") };
            let out = self.uninit(dev, (n, t, d))?;
            let terms = FlashTerms { rel_h: ptr(&rel_h)?, rel_w: ptr(&rel_w)?, grid: (h, w) };
            self.k.sam_flash((ptr(&q)?, ptr(&k)?, ptr(&v)?), ptr(&out)?, Some(terms), n, t, scale)?;
            return Ok(out);
        }
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
        if outs.len() == 1 {
            Ok(outs.remove(0))
        } else {
            Tensor::cat(&outs, 0)
        }
    }

    fn attend_plain(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        let dims = q.dims().to_vec();
        let (t, d) = (q.dim(D::Minus2)?, q.dim(D::Minus1)?);
        let n = q.elem_count() / (t * d).max(1);
        if !self.flash || !fusable(&[q, k, v]) || d != SAM_FLASH_HEAD_DIM || k.dims() != dims || v.dims() != dims {
            return ReferenceOps.attend_plain(q, k, v);
        }
        let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
        let Device::Cuda(dev) = q.device() else { unreachable!("fusable checked the device") };
        let out = self.uninit(dev, dims)?;
        let scale = 1.0 / (d as f32).sqrt();
        self.k.sam_flash((ptr(&q)?, ptr(&k)?, ptr(&v)?), ptr(&out)?, None, n, t, scale)?;
        Ok(out)
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
        let mut dims = x.dims().to_vec();
        let rows = x.elem_count() / kdim;
        // one GEMM over all rows (cuBLAS), then the epilogue in place on its fresh output
        let y = x
            .contiguous()?
            .reshape((rows, kdim))?
            .matmul(&l.weight().t()?)?;
        // contiguous copies (if any) live until the launch is queued
        let bias = l.bias().map(Tensor::contiguous).transpose()?;
        let res = residual.map(Tensor::contiguous).transpose()?;
        let opt_ptr = |t: &Option<Tensor>| t.as_ref().map_or(Ok(0), ptr);
        self.k
            .bias_act(ptr(&y)?, opt_ptr(&bias)?, opt_ptr(&res)?, rows, out, act)?;
        *dims.last_mut().expect("a linear input has dims") = out;
        y.reshape(dims)
    }

    fn contiguous(&self, x: &Tensor) -> Result<Tensor> {
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
