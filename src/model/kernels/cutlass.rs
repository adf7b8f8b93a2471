//! CUTLASS GEMMs with fused epilogues (`kernels/cutlass/*.cu`, built by `build.rs` with the
//! `cutlass` feature: host and device code for `sm_90a` in a static library, with the static
//! CUDA runtime): what cuBLASLt's epilogues cannot do.
//!
//! Owns: `linear_gelu`, SAM's fc1 with its bias and erf-GELU in the GEMM's epilogue (cuBLASLt's
//! GELU is the tanh form), one launch and one pass over the `(rows, 3072)` output instead of
//! the GEMM then `bias_act`. Reference: the reference path's linear (candle's matmul, the bias
//! add and `nn.GELU`'s erf form as separate bf16 ops), the test below.
//! `sam_fmha_qkv`, SAM's global attention on wgmma (CUTLASS example 88's Hopper FMHA, vendored
//! in `kernels/cutlass/fmha/`), the relative-position terms read from
//! [`Kernels::sam_rel_products`] and added before the softmax. Reference: `sam_flash` (its test compares them on the GPU) and
//! through it the reference path's attention.
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
    /// `kernels/cutlass/sam_fmha.cu`: 0 on success, else the step that failed (see there).
    fn ocr_sam_fmha(
        stream: *mut c_void,
        q: *const c_void,
        k: *const c_void,
        v: *const c_void,
        out: *mut c_void,
        products: *const c_void,
        b: i32,
        heads: i32,
        t: i32,
        gh: i32,
        gw: i32,
        scale: f32,
        seq_stride: i64,
        row_stride: i64,
        out_seq_stride: i64,
        out_row_stride: i64,
    ) -> i32;
}

/// The grid widths [`Kernels::sam_fmha_qkv`] takes (key tiles of two grid rows): SAM's global
/// blocks, Base's 64 x 64 (and Gundam's global view), Gundam's tiles' 40 x 40.
pub const SAM_FMHA_WIDTHS: [usize; 2] = [64, 40];

/// Why [`Kernels::sam_fmha_qkv`] cannot take `b` images of the grid `(gh, gw)` (`t`
/// positions) with `heads` heads, or `None` where it can: the launcher's refusal and the fast
/// path's choice (`sam_flash` where it cannot) in one place.
pub fn sam_fmha_refusal((gh, gw): (usize, usize), (b, t, heads): (usize, usize, usize)) -> Option<String> {
    if b == 0 || t == 0 || heads == 0 {
        return Some(format!("{b} x {heads} sequences of {t} positions"));
    }
    if !SAM_FMHA_WIDTHS.contains(&gw) || gh == 0 || gh % 2 != 0 || gh * gw != t {
        return Some(format!("a {gh}x{gw} grid for {t} positions (one {SAM_FMHA_WIDTHS:?} wide, an even height)"));
    }
    // (the kernel's strides are 32-bit; its grid's y and z are the images and heads)
    if b * t * 3 * heads * super::vision::SAM_FLASH_HEAD_DIM >= 1 << 31 || b > 65535 || heads > 65535 {
        return Some(format!("{b} x {t} x {heads} heads is past the kernel's 32-bit strides"));
    }
    None
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

    /// SAM's attention over a qkv projection `qkv` `(b, t, 3, heads, 64)` contiguous, into `out`
    /// `(b, t, heads * 64)` (the heads merged), on Hopper's wgmma (`kernels/cutlass/sam_fmha.cu`):
    /// `softmax(q k^T * scale + rel_h[y(j)] + rel_w[x(j)]) v` with the terms read from
    /// `products` `(heads, b * t, 2 gh + 2 gw)` of the grid `(gh, gw)`
    /// ([`Self::sam_rel_products`]). What [`sam_fmha_refusal`] refuses is refused; the
    /// addresses 16-byte aligned.
    #[allow(clippy::too_many_arguments)]
    pub fn sam_fmha_qkv(&self, qkv: u64, out: u64, products: u64, (gh, gw): (usize, usize), (b, t, heads): (usize, usize, usize), scale: f32) -> Result<()> {
        if let Some(why) = sam_fmha_refusal((gh, gw), (b, t, heads)) {
            candle_core::bail!("sam_fmha: {why}");
        }
        if [qkv, out, products].iter().any(|&a| a == 0 || a % 16 != 0) {
            candle_core::bail!("sam_fmha: qkv, out and the products must be set and 16-byte aligned");
        }
        #[cfg(not(feature = "cutlass"))]
        candle_core::bail!("sam_fmha: built without the `cutlass` feature ({b} x {heads} x {t}, scale {scale})");
        #[cfg(feature = "cutlass")]
        self.launch_sam_fmha((qkv, out, products), (gh, gw), (b, t, heads), scale)
    }

    /// [`Self::sam_fmha_qkv`]'s launch, its arguments checked.
    #[cfg(feature = "cutlass")]
    fn launch_sam_fmha(&self, (qkv, out, products): (u64, u64, u64), (gh, gw): (usize, usize), (b, t, heads): (usize, usize, usize), scale: f32) -> Result<()> {
        let c = heads * super::vision::SAM_FLASH_HEAD_DIM;
        self.stream.context().bind_to_thread().map_err(cuda_err)?;
        let head_bytes = (c * 2) as u64;
        // SAFETY: the addresses are the caller's device buffers of these shapes (its
        // contract), the launch on the kernels' stream
        let rc = unsafe {
            ocr_sam_fmha(
                self.stream.cu_stream() as *mut c_void,
                qkv as *const c_void,
                (qkv + head_bytes) as *const c_void,
                (qkv + 2 * head_bytes) as *const c_void,
                out as *mut c_void,
                products as *const c_void,
                b as i32,
                heads as i32,
                t as i32,
                gh as i32,
                gw as i32,
                scale,
                (t * 3 * c) as i64,
                (3 * c) as i64,
                (t * c) as i64,
                c as i64,
            )
        };
        match rc {
            0 => Ok(()),
            1 => candle_core::bail!("sam_fmha: the kernel cannot take {b} x {heads} x {t} (grid {gh}x{gw})"),
            2 => candle_core::bail!("sam_fmha: the kernel's shared memory could not be set"),
            e => candle_core::bail!("sam_fmha: the launch failed (CUDA runtime error {})", e - 4),
        }
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

    /// SAM's global attention on wgmma (`sam_fmha_qkv` after `sam_rel_products`, as the fast
    /// path takes it) against `sam_flash` and the f32 reference: Base's 64x64 grid, Gundam's
    /// tiles' 40x40 over 2 images, 36x40 (rows of 64 queries straddling images' ends: 1,440
    /// positions) and 2x64; the products against the reference's; the refusals.
    #[cfg(feature = "cutlass")]
    #[test]
    fn sam_fmha_matches_sam_flash() {
        use crate::model::fast::vision::FastVisionOps;
        use crate::model::vision::sam::get_rel_pos;
        use crate::model::vision::GridAttention;
        use std::sync::Arc;
        let (dev, cd) = device();
        let k = Arc::new(Kernels::load(&cd).unwrap());
        let fmha = FastVisionOps::new(k.clone()).with_flash(true).with_fmha(true);
        let flash = FastVisionOps::new(k.clone()).with_flash(true).with_fmha(false);
        let g = |x: &Tensor| x.to_dtype(DType::BF16).unwrap().to_device(&dev).unwrap();
        let f32_of = |x: &Tensor| x.to_dtype(DType::F32).unwrap().to_device(&candle_core::Device::Cpu).unwrap();
        let p = |t: &Tensor| tensor_ptr::<bf16>(t).unwrap();
        for (b, heads, gh, gw) in [(1usize, 12usize, 64usize, 64usize), (2, 3, 40, 40), (2, 2, 36, 40), (1, 2, 2, 64)] {
            let (t, d) = (gh * gw, 64usize);
            let part = |scale, seed| rand(&[b, t, 1, heads, d], scale, seed);
            let qkv = Tensor::cat(&[part(1.5, 51), part(1.5, 52), part(1.0, 53)], 2).unwrap();
            let rh = get_rel_pos(gh, gh, &rand(&[2 * gh - 1, d], 0.5, 54)).unwrap().contiguous().unwrap();
            let rw = get_rel_pos(gw, gw, &rand(&[2 * gw - 1, d], 0.5, 55)).unwrap().contiguous().unwrap();
            let want = ReferenceOps.attend(&GridAttention { qkv: &qkv, rh: &rh, rw: &rw, hw: (gh, gw) }).unwrap();
            let (qg, rhg, rwg) = (g(&qkv), g(&rh), g(&rw));
            let a = GridAttention { qkv: &qg, rh: &rhg, rw: &rwg, hw: (gh, gw) };
            let got = fmha.attend(&a).unwrap();
            assert_eq!(got.dims(), &[b, t, heads * d]);
            let (d_flash, d_ref) = (max_diff(&got, &flash.attend(&a).unwrap()), max_diff(&got, &want));
            eprintln!("sam_fmha, {b} x {heads} heads, {gh}x{gw}: max |diff| {d_flash:.3e} against sam_flash, {d_ref:.3e} against the f32 reference at |out| <= {:.2}", max_abs(&want));
            // the same bf16 terms and probabilities, summed in another order: a bf16 ulp or two
            assert!(d_flash <= 1.6e-2, "{gh}x{gw}: {d_flash} against sam_flash");
            assert!(d_ref <= 2.5e-2, "{gh}x{gw}: {d_ref} against the reference");
            // the products: q (heads, b t, d) times rh[0], rh[gh - 1], rw[0], rw[gw - 1]
            let ps = 2 * gh + 2 * gw;
            let products = Tensor::zeros((heads, b * t, ps), DType::BF16, &dev).unwrap();
            let rows = Tensor::cat(&[rhg.get(0).unwrap(), rhg.get(gh - 1).unwrap(), rwg.get(0).unwrap(), rwg.get(gw - 1).unwrap()], 0).unwrap();
            k.sam_rel_products(p(&qg), p(&rows), p(&products), (gh, gw), (b, t, heads)).unwrap();
            // from the bf16 inputs, in f32
            let q = f32_of(&qg).narrow(2, 0, 1).unwrap().reshape((b * t, heads, d)).unwrap().transpose(0, 1).unwrap().contiguous().unwrap();
            let (rh32, rw32) = (f32_of(&rhg), f32_of(&rwg));
            let row = |tab: &Tensor, i: usize| tab.get(i).unwrap().t().unwrap().contiguous().unwrap();
            let parts = [row(&rh32, 0), row(&rh32, gh - 1), row(&rw32, 0), row(&rw32, gw - 1)];
            let parts: Vec<Tensor> = parts.iter().map(|m| q.broadcast_matmul(m).unwrap()).collect();
            let want_p = Tensor::cat(&parts, 2).unwrap();
            let (d_p, top) = (max_diff(&f32_of(&products), &want_p), max_abs(&want_p));
            eprintln!("sam_rel_products, {gh}x{gw}: max |diff| {d_p:.3e} at |product| <= {top:.2}");
            // one bf16 rounding of the f32 sum: half an ulp of the largest (1/256 of it)
            assert!(d_p <= top / 128.0 && top > 1.0, "{gh}x{gw}: products {d_p} at {top}");
        }
        // refused before a launch
        let t = Tensor::zeros((64, 64), DType::BF16, &dev).unwrap();
        let a = p(&t);
        let msg = |r: Result<()>| r.unwrap_err().to_string();
        assert!(msg(k.sam_fmha_qkv(a, a, 0, (2, 64), (0, 128, 2), 0.125)).contains("sequences"));
        assert!(msg(k.sam_fmha_qkv(a, a, a, (8, 16), (1, 128, 2), 0.125)).contains("wide"));
        assert!(msg(k.sam_fmha_qkv(a, a, a, (3, 64), (1, 192, 2), 0.125)).contains("even height"));
        assert!(msg(k.sam_fmha_qkv(a, a, a, (2, 64), (1, 192, 2), 0.125)).contains("grid"));
        assert!(msg(k.sam_fmha_qkv(a + 2, a, 0, (2, 64), (1, 128, 2), 0.125)).contains("aligned"));
        assert!(msg(k.sam_fmha_qkv(a, 0, 0, (2, 64), (1, 128, 2), 0.125)).contains("aligned"));
        assert!(msg(k.sam_fmha_qkv(a, a, 0, (2, 64), (1, 128, 2), 0.125)).contains("aligned"));
        assert!(msg(k.sam_rel_products(a, a, a, (8, 8), (1, 60, 2))).contains("grid"));
        assert!(msg(k.sam_rel_products(a, a, a, (8, 8), (0, 64, 2))).contains("sequences"));
        assert!(msg(k.sam_rel_products(a, a, a + 8, (8, 8), (1, 64, 2))).contains("aligned"));
        assert!(msg(k.sam_rel_products(a, 0, a, (8, 8), (1, 64, 2))).contains("aligned"));
    }

    /// What `sam_fmha` takes, as the fast path asks before choosing it (no device): SAM's
    /// global grids (Base's 64x64, Gundam's tiles' 40x40 over 6 images), not its windows, odd
    /// heights, or a batch past the 32-bit strides.
    #[test]
    fn sam_fmha_refusal_says_why() {
        assert_eq!(sam_fmha_refusal((64, 64), (1, 4096, 12)), None);
        assert_eq!(sam_fmha_refusal((40, 40), (6, 1600, 12)), None);
        let why = |grid, batch| sam_fmha_refusal(grid, batch).unwrap_or_default();
        assert!(why((14, 14), (1, 196, 12)).contains("wide"));
        assert!(why((3, 64), (1, 192, 12)).contains("even height"));
        assert!(why((64, 64), (1, 4000, 12)).contains("grid"));
        assert!(why((64, 64), (0, 4096, 12)).contains("sequences"));
        assert!(why((64, 64), (300, 4096, 12)).contains("32-bit"));
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
