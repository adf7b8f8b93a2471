//! CUTLASS GEMMs with fused epilogues (`kernels/cutlass/*.cu`, built by `build.rs` with the
//! `cutlass` feature: host and device code for `sm_90a` in a static library, with the static
//! CUDA runtime): what cuBLASLt's epilogues cannot do.
//!
//! Owns: `linear_gelu`, SAM's fc1 with its bias and erf-GELU in the GEMM's epilogue (cuBLASLt's
//! GELU is the tanh form), one launch and one pass over the `(rows, 3072)` output instead of
//! the GEMM then `bias_act`. Reference: the reference path's linear (candle's matmul, the bias
//! add and `nn.GELU`'s erf form as separate bf16 ops), the test below.
//!
//! The CUTLASS kernel is launched through the CUDA runtime on the kernels' stream (the runtime
//! takes the context current on the thread, the device's primary context that cudarc binds).
//! Built without the feature, `linear_gelu` checks its arguments and says it is not there, so
//! its callers need no feature gates of their own.

#[cfg(feature = "cutlass")]
use std::ffi::c_void;

use candle_core::Result;

#[cfg(feature = "cutlass")]
use super::cuda_err;
use super::Kernels;

#[cfg(feature = "cutlass")]
extern "C" {
    /// `kernels/cutlass/linear_gelu.cu`: 0 on success, else the step that failed (see there).
    fn ocr_linear_gelu(
        stream: *mut c_void,
        x: *const c_void,
        w: *const c_void,
        bias: *const c_void,
        y: *mut c_void,
        rows: i32,
        k: i32,
        n: i32,
        workspace: *mut c_void,
        workspace_len: usize,
    ) -> i32;
}

impl Kernels {
    /// Row-major `y (rows, n) = GELU(x (rows, k) . w (n, k)^T + bias (n))`, GELU with erf,
    /// bf16 in and out, f32 until one rounding (the reference rounds the product and the sum
    /// too: at most a bf16 ulp apart per step). `k` and `n` multiples of 8, every address set
    /// and 16-byte aligned.
    #[allow(clippy::too_many_arguments)]
    pub fn linear_gelu(&self, x: u64, w: u64, bias: u64, y: u64, rows: usize, k: usize, n: usize) -> Result<()> {
        if k % 8 != 0 || n % 8 != 0 || k == 0 {
            candle_core::bail!("linear_gelu: k = {k} and n = {n} must be positive multiples of 8");
        }
        if [x, w, bias, y].iter().any(|&a| a == 0 || a % 16 != 0) {
            candle_core::bail!("linear_gelu: x, w, bias and y must be set and 16-byte aligned");
        }
        if rows == 0 {
            return Ok(());
        }
        #[cfg(not(feature = "cutlass"))]
        candle_core::bail!("linear_gelu: built without the `cutlass` feature ({rows} x {k} x {n})");
        #[cfg(feature = "cutlass")]
        self.launch_linear_gelu((x, w, bias, y), rows, k, n)
    }

    /// [`Self::linear_gelu`]'s launch, its arguments checked.
    #[cfg(feature = "cutlass")]
    fn launch_linear_gelu(&self, (x, w, bias, y): (u64, u64, u64, u64), rows: usize, k: usize, n: usize) -> Result<()> {
        let int = |v: usize, what: &str| i32::try_from(v).map_err(|_| candle_core::Error::Msg(format!("linear_gelu: {what} = {v} is over 2^31")));
        let (rows_i, k_i, n_i) = (int(rows, "rows")?, int(k, "k")?, int(n, "n")?);
        self.stream.context().bind_to_thread().map_err(cuda_err)?;
        // SAFETY: the addresses are the caller's device buffers of these shapes (its contract);
        // the workspace is ours, used on this stream only
        let rc = unsafe {
            ocr_linear_gelu(
                self.stream.cu_stream() as *mut c_void,
                x as *const c_void,
                w as *const c_void,
                bias as *const c_void,
                y as *mut c_void,
                rows_i,
                k_i,
                n_i,
                self._workspace.ptr as *mut c_void,
                self._workspace.len,
            )
        };
        match rc {
            0 => Ok(()),
            1 => candle_core::bail!("linear_gelu: CUTLASS cannot run {rows} x {k} x {n} at these addresses"),
            2 => candle_core::bail!("linear_gelu: the workspace ({} bytes) is too small", self._workspace.len),
            3 => candle_core::bail!("linear_gelu: CUTLASS's setup failed ({rows} x {k} x {n})"),
            e => candle_core::bail!("linear_gelu: the launch failed (CUDA runtime error {})", e - 4),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::super::tensor_ptr;
    use super::*;
    #[cfg(feature = "cutlass")]
    use crate::model::vision::{Act, ReferenceOps, VisionOps};
    use candle_core::{DType, Tensor};
    use half::bf16;

    /// SAM's fc1 (768 -> 3072) on Base's 4,096 rows and on row counts no tile divides, against
    /// the reference's linear + GELU (bf16 ops on the GPU).
    #[cfg(feature = "cutlass")]
    #[test]
    fn linear_gelu_matches_the_reference() {
        let (dev, cd) = device();
        let k = Kernels::load(&cd).unwrap();
        let (kk, out) = (768usize, 3072usize);
        let g = |x: Tensor| x.to_dtype(DType::BF16).unwrap().to_device(&dev).unwrap();
        let w = g(rand(&[out, kk], 0.05, 61));
        let b = g(rand(&[out], 1.0, 62));
        let lin = candle_nn::Linear::new(w.clone(), Some(b.clone()));
        for rows in [4096usize, 37, 1000] {
            let x = g(rand(&[rows, kk], 1.5, 63 + rows as u64));
            let want = ReferenceOps.linear(&lin, &x, Act::GeluErf, None).unwrap();
            let y = Tensor::zeros((rows, out), DType::BF16, &dev).unwrap();
            let p = |t: &Tensor| tensor_ptr::<bf16>(t).unwrap();
            k.linear_gelu(p(&x), p(&w), p(&b), p(&y), rows, kk, out).unwrap();
            let diff = max_diff(&y, &want);
            eprintln!("linear_gelu, {rows} rows: max |diff| {diff:.3e} at |y| <= {:.2}", max_abs(&want));
            // one rounding against three: <= 2 bf16 ulps at |y| < 8
            assert!(diff <= 6.25e-2, "{rows} rows: {diff}");
            // not a copy of something else: GELU's negative side is small, its positive side x
            assert!(max_abs(&want) > 1.0);
        }
    }

    /// The shapes and addresses the kernel cannot take are refused before a launch.
    #[test]
    fn linear_gelu_refuses_what_it_cannot_run() {
        let (dev, cd) = device();
        let k = Kernels::load(&cd).unwrap();
        let t = Tensor::zeros((64, 64), DType::BF16, &dev).unwrap();
        let p = tensor_ptr::<bf16>(&t).unwrap();
        let msg = |r: Result<()>| r.unwrap_err().to_string();
        assert!(msg(k.linear_gelu(p, p, p, p, 8, 12, 64)).contains("multiples of 8"));
        assert!(msg(k.linear_gelu(p, p, p, p, 8, 64, 60)).contains("multiples of 8"));
        assert!(msg(k.linear_gelu(p + 2, p, p, p, 8, 64, 64)).contains("16-byte aligned"));
        assert!(msg(k.linear_gelu(p, p, 0, p, 8, 64, 64)).contains("16-byte aligned"));
    }
}
