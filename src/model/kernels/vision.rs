//! The vision towers' kernels: `sam_flash` (SAM's and CLIP's attention in one pass on the
//! tensor cores, the scores never written), `sam_softmax` (SAM's attention probabilities with
//! the decomposed relative positions, the bias never materialised: the path for head dims other
//! than 64), `bias_act` (a linear layer's bias, activation and residual add in one pass over
//! cuBLAS's output), `permute` (a strided view made contiguous, 16 bytes per thread),
//! `patches` / `unpatch` (an NHWC image's patches: im2col, SAM's windows and their inverse) and
//! `layer_norm` (a warp per row). References: [`crate::model::vision::ReferenceOps`] (`attend`:
//! the full bias + `sdpa`; `attend_plain`: `sdpa`; `linear`: candle's linear, the activation and
//! the add as separate ops; `contiguous`: candle's copy; `windows`, `unwindow`, `patch_embed`,
//! `neck`: the remote code's padding, permutes and NCHW convolutions; `layer_norm`: candle's),
//! the vision encoder's own code.

use candle_core::cuda_backend::cudarc;
use candle_core::Result;

use super::{cfg, cuda_err, launch, Kernels};
use crate::model::vision::Act;

/// Scores per row one thread of `sam_softmax` keeps in registers (`SAM_MAXV` in the kernel).
const SAM_MAXV: usize = 16;

/// The widest row `layer_norm` takes (`LN_MAXU` 16-byte loads per lane).
pub const LAYER_NORM_MAX: usize = 1024;

/// SAM's relative positions for [`Kernels::sam_flash`]: the tables
/// [`crate::model::vision::sam::get_rel_pos`] gathers for a self-attention on a `gh x gw` grid,
/// `rh` `(gh, gh, 64)` and `rw` `(gw, gw, 64)` bf16 contiguous (device addresses), from which
/// the kernel makes the terms.
#[derive(Debug, Clone, Copy)]
pub struct FlashTerms {
    pub rh: u64,
    pub rw: u64,
    pub grid: (usize, usize),
}

/// Where `sam_flash` finds a sequence's rows (elements): sequence `(b, head)` at
/// `b * seq_stride + head * 64`, its rows `row_stride` apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlashLayout {
    pub heads: usize,
    pub seq_stride: usize,
    pub row_stride: usize,
}

impl FlashLayout {
    /// `(n, t, 64)` contiguous.
    pub fn contiguous(t: usize) -> Self {
        Self { heads: 1, seq_stride: t * 64, row_stride: 64 }
    }
}

/// The head dim `sam_flash` is compiled for (SAM ViT-B's and CLIP-L's).
pub const SAM_FLASH_HEAD_DIM: usize = 64;

/// `sam_flash`'s shared memory: the query tile, two stages of key and value tiles (`keys` rows
/// of 64 + 8 bf16 each: 64, `sam_flash_w40`'s 80) and 64 rows of the relative-position terms
/// (`sam_flash_rs` in the kernel).
const fn sam_flash_smem((gh, gw): (usize, usize), keys: usize) -> usize {
    let rs = 2 * (((gh + gw) / 2 + 27) / 32 * 32 + 4);
    ((64 + 4 * keys) * 72 + 64 * rs) * 2
}

/// The most shared memory `sam_flash` is let use: grid sides up to 1024 together (178 KiB).
pub const SAM_FLASH_MAX_SMEM: usize = sam_flash_smem((512, 512), 64);

/// The most positions `sam_flash_short` takes (SAM's windows of 14 x 14: 196), and the most
/// shared memory that lets 4 of its blocks share an SM (228 KiB, 1 KiB reserved a block).
const SAM_FLASH_SHORT: (usize, usize) = (256, 56 * 1024);

/// Head dims `sam_softmax` takes (`d / 8` lanes per relative-position term must divide a warp).
pub const SAM_HEAD_DIMS: [usize; 6] = [8, 16, 32, 64, 128, 256];

/// A strided view as `permute` takes it: up to 6 dims, outermost first, strides in elements.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct View {
    pub n: [i32; 6],
    pub st: [i64; 6],
}

unsafe impl cudarc::driver::DeviceRepr for View {}

impl View {
    /// The view of `dims`/`strides` if `permute` can copy it: rank <= 6, innermost stride 1 and
    /// size a multiple of 8, other strides multiples of 8, fewer than 2^31 elements.
    pub fn of(dims: &[usize], strides: &[usize]) -> Option<Self> {
        let rank = dims.len();
        let n: usize = dims.iter().product();
        if rank == 0
            || rank > 6
            || n >= i32::MAX as usize
            || strides[rank - 1] != 1
            || dims[rank - 1] % 8 != 0
        {
            return None;
        }
        if strides[..rank - 1].iter().any(|s| s % 8 != 0) {
            return None;
        }
        let mut v = View::default();
        for k in 0..rank {
            v.n[k] = dims[k] as i32;
            v.st[k] = strides[k] as i64;
        }
        Some(v)
    }
}

impl Kernels {
    /// In place over the scores `s` `(rows, kh*kw)` bf16 (`q k^T`, unscaled):
    /// `softmax(s * scale + q . rh[y(i)] + q . rw[x(i)])` per row (the relative-position terms
    /// computed in the kernel), `q` `(rows, d)`, `rh` `(qh, kh, d)`, `rw` `(qw, kw, d)` bf16, row
    /// `r`'s query at grid position `r % (qh*qw)`. `kh*kw` a multiple of 4.
    #[allow(clippy::too_many_arguments)]
    pub fn sam_softmax(
        &self,
        s: u64,
        q: u64,
        (rh, rw): (u64, u64),
        rows: usize,
        (qh, qw): (usize, usize),
        (kh, kw): (usize, usize),
        d: usize,
        scale: f32,
    ) -> Result<()> {
        let nk = kh * kw;
        if nk > 1024 * SAM_MAXV || nk % 4 != 0 {
            candle_core::bail!(
                "sam_softmax: {nk} keys per row (at most {} and a multiple of 4)",
                1024 * SAM_MAXV
            );
        }
        if !SAM_HEAD_DIMS.contains(&d) {
            candle_core::bail!("sam_softmax: head dim {d} is not one of {SAM_HEAD_DIMS:?}");
        }
        if rows > i32::MAX as usize {
            candle_core::bail!("sam_softmax: {rows} rows do not fit one grid");
        }
        let (func, grid, block, shared) = if nk <= 32 * SAM_MAXV && nk % 8 != 0 {
            // short rows (SAM's windows): a warp per row, 8 rows a block
            (
                &self.sam_softmax_rows_v4,
                rows.div_ceil(8),
                256,
                8 * (d + kh + kw) * 4,
            )
        } else {
            let threads = nk.div_ceil(SAM_MAXV).next_multiple_of(32).clamp(64, 1024);
            let func = if nk % 8 == 0 {
                &self.sam_softmax_v8
            } else {
                &self.sam_softmax_v4
            };
            (func, rows, threads, (d + kh + kw) * 4)
        };
        launch!(
            self,
            func,
            cfg((grid as u32, 1, 1), block as u32, shared as u32),
            s,
            q,
            rh,
            rw,
            qh as i32,
            qw as i32,
            kh as i32,
            kw as i32,
            d as i32,
            scale,
            rows as i32
        )
    }

    /// `out = softmax(q k^T * scale + rel_h + rel_w) v` over `n` sequences of `t` positions of
    /// 64 bf16, q, k, v laid out as `input` says and `out` as `output` (sequence `(b, head)` at
    /// `b * seq_stride + head * 64`, its rows `row_stride` apart: the qkv projection's
    /// `(b, t, 3, heads, 64)` and the merged `(b, t, heads * 64)`, or contiguous `(n, t, 64)`);
    /// the relative positions of a `gh x gw` grid (`t = gh*gw`; [`FlashTerms`]: `get_rel_pos`'s
    /// tables, Toeplitz as a self-attention's are, the terms made by the kernel), or `None` for
    /// no bias (CLIP).
    #[allow(clippy::too_many_arguments)]
    pub fn sam_flash(
        &self,
        (q, k, v): (u64, u64, u64),
        input: FlashLayout,
        out: u64,
        output: FlashLayout,
        terms: Option<FlashTerms>,
        n: usize,
        t: usize,
        scale: f32,
    ) -> Result<()> {
        if t == 0 || t >= 1 << 16 {
            candle_core::bail!("sam_flash: {t} positions (1 to 65535)");
        }
        if n == 0 || n > 65535 {
            candle_core::bail!("sam_flash: {n} sequences (1 to 65535)");
        }
        if [q, k, v, out].iter().any(|p| p % 16 != 0) {
            candle_core::bail!("sam_flash: q, k, v and out must be 16-byte aligned (16-byte copies)");
        }
        for l in [input, output] {
            if l.heads == 0 || n % l.heads != 0 || l.row_stride < 64 || l.row_stride % 8 != 0 || l.seq_stride % 8 != 0 || l.heads != input.heads {
                candle_core::bail!("sam_flash: {l:?} for {n} sequences (rows of at least 64, 16-byte aligned, the same heads in and out)");
            }
        }
        let ((rh, rw), (gh, gw)) = match terms {
            Some(FlashTerms { rh, rw, grid: (gh, gw) }) => {
                if gh % 2 != 0 || gw % 2 != 0 || gh * gw != t || gh + gw > 1024 {
                    candle_core::bail!("sam_flash: a {gh}x{gw} grid for {t} positions (even sides, up to 1024 together)");
                }
                if rh % 16 != 0 || rw % 16 != 0 {
                    candle_core::bail!("sam_flash: the tables must be 16-byte aligned (16-byte copies)");
                }
                ((rh, rw), (gh, gw))
            }
            None => ((0, 0), (0, 0)),
        };
        let (shared, shared_w40) = (sam_flash_smem((gh, gw), 64), sam_flash_smem((gh, gw), 80));
        // a short sequence (a window): the blocks are brief, so 4 an SM (at most 128
        // registers) rather than 3 hide their loads better and leave fewer waves
        let short = self.flash_short && t <= SAM_FLASH_SHORT.0 && shared <= SAM_FLASH_SHORT.1;
        let (func, shared) = match (terms.is_some(), gw, short) {
            (true, ..=16, true) if self.flash_rows16 => (&self.sam_flash[4], shared),
            (true, _, true) => (&self.sam_flash[3], shared),
            (true, 64, false) => (&self.sam_flash[1], shared),
            // (its 80-row tiles need more shared memory: past SAM_FLASH_MAX_SMEM only for grids
            // of 866 rows and more, which go to `sam_flash`)
            (true, 40, false) if self.flash_w40 && shared_w40 <= SAM_FLASH_MAX_SMEM => (&self.sam_flash[5], shared_w40),
            (true, _, false) => (&self.sam_flash[0], shared),
            (false, _, _) => (&self.sam_flash[2], shared),
        };
        launch!(
            self,
            *func,
            cfg((t.div_ceil(64) as u32, n as u32, 1), 128, shared as u32),
            q, k, v, out, rh, rw, n as i32, t as i32, gh as i32, gw as i32, scale,
            input.heads as i32, input.seq_stride as i64, input.row_stride as i64,
            output.seq_stride as i64, output.row_stride as i64
        )
    }

    /// [`Self::sam_flash`] over a qkv projection's output `qkv` `(b, t, 3, heads, 64)`
    /// contiguous, read where it lies, into `out` `(b, t, heads * 64)` (the heads merged).
    pub fn sam_flash_qkv(
        &self,
        qkv: u64,
        out: u64,
        terms: Option<FlashTerms>,
        (b, t, heads): (usize, usize, usize),
        scale: f32,
    ) -> Result<()> {
        let d = SAM_FLASH_HEAD_DIM;
        let head_bytes = (heads * d * 2) as u64;
        let input = FlashLayout { heads, seq_stride: t * 3 * heads * d, row_stride: 3 * heads * d };
        let output = FlashLayout { heads, seq_stride: t * heads * d, row_stride: heads * d };
        self.sam_flash((qkv, qkv + head_bytes, qkv + 2 * head_bytes), input, out, output, terms, b * heads, t, scale)
    }

    /// The products of SAM's queries with `get_rel_pos`'s tables that
    /// [`Self::sam_fmha_qkv`] takes its relative-position terms from: over a qkv projection
    /// `qkv` `(b, t, 3, heads, 64)` contiguous on the grid `(gh, gw)` (`t = gh * gw`), with
    /// `rows` `(2 gh + 2 gw, 64)` bf16 contiguous, the tables' rows `rh[0]`, `rh[gh - 1]`,
    /// `rw[0]`, `rw[gw - 1]` one after another, into `products` `(heads, b * t, 2 gh + 2 gw)`
    /// bf16: row `i` holds `q_i` dotted with each of them, rounded to bf16 as the reference's
    /// einsums round theirs. The tables are Toeplitz (`rh[y][ky]` depends on `y - ky` alone),
    /// so these two rows of each hold every term (`kernels/cutlass/sam_fmha.cu` reads them).
    /// One strided-batched cuBLAS GEMM, a batch per head.
    pub fn sam_rel_products(&self, qkv: u64, rows: u64, products: u64, (gh, gw): (usize, usize), (b, t, heads): (usize, usize, usize)) -> Result<()> {
        use cudarc::cublas::sys::{cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cudaDataType_t};
        let d = SAM_FLASH_HEAD_DIM;
        if b == 0 || t == 0 || heads == 0 || b * t * 3 * heads * d >= 1 << 31 {
            candle_core::bail!("sam_rel_products: {b} x {heads} sequences of {t} positions (fewer than 2^31 projected elements)");
        }
        if gh == 0 || gw == 0 || gh * gw != t {
            candle_core::bail!("sam_rel_products: a {gh}x{gw} grid for {t} positions");
        }
        if [qkv, rows, products].iter().any(|&p| p == 0 || p % 16 != 0) {
            candle_core::bail!("sam_rel_products: qkv, the table rows and the products must be set and 16-byte aligned");
        }
        let ps = 2 * gh + 2 * gw;
        let (alpha, beta) = (1f32, 0f32);
        // column-major: products^T (ps x b t) = rows (ps x 64, row-major) . q^T, a head a batch
        // SAFETY: the addresses are the caller's buffers of these shapes (its contract), the
        // handle is the kernels' stream's
        unsafe {
            cudarc::cublas::result::gemm_strided_batched_ex(
                *self.blas.handle(),
                cublasOperation_t::CUBLAS_OP_T,
                cublasOperation_t::CUBLAS_OP_N,
                ps as i32,
                (b * t) as i32,
                d as i32,
                (&alpha) as *const f32 as *const _,
                rows as *const _,
                cudaDataType_t::CUDA_R_16BF,
                d as i32,
                0,
                qkv as *const _,
                cudaDataType_t::CUDA_R_16BF,
                (3 * heads * d) as i32,
                d as i64,
                (&beta) as *const f32 as *const _,
                products as *mut _,
                cudaDataType_t::CUDA_R_16BF,
                ps as i32,
                (b * t * ps) as i64,
                heads as i32,
                cublasComputeType_t::CUBLAS_COMPUTE_32F,
                cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
            .map_err(cuda_err)
        }
    }

    /// SAM's windowed attention where the windows lie (`sam_flash_win`: no partition): `qkv`
    /// the qkv projection of an image `(b, h, w, 3, heads, 64)` contiguous, `bias` its bias
    /// `(3 * heads * 64)` (the keys and values of the positions a window has past the image,
    /// which `window_partition` pads with zeros), `out` `(b, h, w, heads * 64)`: each `ws x ws`
    /// window's attention with the window's tables ([`FlashTerms`], grid `(ws, ws)`), written
    /// at its positions, what lies past the image dropped, as `window_unpartition` does.
    #[allow(clippy::too_many_arguments)]
    pub fn sam_flash_windows(
        &self,
        qkv: u64,
        bias: u64,
        out: u64,
        (b, h, w, heads): (usize, usize, usize, usize),
        terms: FlashTerms,
        scale: f32,
    ) -> Result<()> {
        let (ws, wsw) = terms.grid;
        if ws != wsw || ws == 0 || ws % 2 != 0 || ws > 16 {
            candle_core::bail!("sam_flash_windows: windows of {ws}x{wsw} (square, even, at most 16)");
        }
        let windows = b * h.div_ceil(ws) * w.div_ceil(ws);
        // (the kernel addresses the projection with 32-bit offsets)
        if b == 0 || h == 0 || w == 0 || heads == 0 || windows * heads > 65535 || b * h * w * 3 * heads * SAM_FLASH_HEAD_DIM >= 1 << 31 {
            candle_core::bail!("sam_flash_windows: {b} images of {h}x{w} with {heads} heads ({windows} windows; at most 65535 windows x heads and 2^31 projected elements)");
        }
        if [qkv, bias, out, terms.rh, terms.rw].iter().any(|p| p % 16 != 0) {
            candle_core::bail!("sam_flash_windows: qkv, bias, out and the tables must be 16-byte aligned (16-byte copies)");
        }
        let c = heads * SAM_FLASH_HEAD_DIM;
        let head_bytes = (c * 2) as u64;
        let t = ws * ws;
        launch!(
            self,
            self.sam_flash[6],
            cfg((t.div_ceil(64) as u32, (windows * heads) as u32, 1), 128, sam_flash_smem((ws, ws), 64) as u32),
            qkv, qkv + head_bytes, qkv + 2 * head_bytes, out, terms.rh, terms.rw,
            (windows * heads) as i32, t as i32, ws as i32, ws as i32, scale, heads as i32,
            0i64, (3 * c) as i64, 0i64, c as i64,
            h as i32, w as i32, bias + head_bytes, bias + 2 * head_bytes
        )
    }

    /// In place over `y` `(rows, out)` bf16: `act(y + bias) (+ res)`, `bias` `(out)` and `res`
    /// `(rows, out)` optional (0). `out` a multiple of 8.
    pub fn bias_act(
        &self,
        y: u64,
        bias: u64,
        res: u64,
        rows: usize,
        out: usize,
        act: Act,
    ) -> Result<()> {
        if out % 8 != 0 {
            candle_core::bail!("bias_act: {out} columns is not a multiple of 8");
        }
        if rows == 0 {
            return Ok(());
        }
        if rows >= 1 << 31 {
            candle_core::bail!("bias_act: {rows} rows (fewer than 2^31)");
        }
        let act = match act {
            Act::None => 0i32,
            Act::GeluErf => 1,
            Act::QuickGelu => 2,
        };
        // a row per grid x, 128 threads of 8 columns per grid y
        let col_blocks = (out / 8).div_ceil(128);
        launch!(
            self,
            self.bias_act,
            cfg((rows as u32, col_blocks as u32, 1), 128, 0),
            y,
            bias,
            res,
            out as i32,
            act
        )
    }

    /// `y` `(rows, c)` = the layer norm of `x` `(rows, c)` with `w`, `b` `(c)`, all bf16; `c` a
    /// multiple of 8, at most [`LAYER_NORM_MAX`].
    #[allow(clippy::too_many_arguments)]
    pub fn layer_norm(
        &self,
        x: u64,
        w: u64,
        b: u64,
        y: u64,
        rows: usize,
        c: usize,
        eps: f64,
    ) -> Result<()> {
        if c % 8 != 0 || c > LAYER_NORM_MAX || rows > i32::MAX as usize {
            candle_core::bail!(
                "layer_norm: {rows} rows of {c} (a multiple of 8, at most {LAYER_NORM_MAX})"
            );
        }
        launch!(
            self,
            self.layer_norm,
            cfg((rows.div_ceil(8) as u32, 1, 1), 256, 0),
            x,
            w,
            b,
            y,
            rows as i32,
            c as i32,
            eps as f32
        )
    }

    /// `out` `(b, oh, ow, k, k, c)` = the `k x k` patches of the NHWC image `x` `(b, h, w, c)`
    /// at stride `s` and padding `p` (zeros outside): a convolution's im2col, or with
    /// `k = s = ws`, `p = 0` SAM's windows (bottom and right zero-padded). `c` a multiple of 8.
    #[allow(clippy::too_many_arguments)]
    pub fn patches(
        &self,
        x: u64,
        out: u64,
        b: usize,
        (h, w, c): (usize, usize, usize),
        (k, s, p): (usize, usize, usize),
        (oh, ow): (usize, usize),
    ) -> Result<()> {
        let n = b * oh * ow * k * k * c;
        if c % 8 != 0 || n >= 1 << 31 || b * h * w * c >= 1 << 31 || k == 0 || s == 0 {
            candle_core::bail!("patches: {b}x{h}x{w}x{c} by {k}x{k} (channels a multiple of 8, fewer than 2^31 elements)");
        }
        let cfg = cfg(((n / 8).div_ceil(256) as u32, 1, 1), 256, 0);
        let dims = [b, h, w, c, k, s, p, oh, ow].map(|v| v as i32);
        launch!(self, self.patches, cfg, x, out, dims[0], dims[1], dims[2], dims[3], dims[4], dims[5], dims[6], dims[7], dims[8])
    }

    /// `out` `(b, h, w, c)` = SAM's `ws x ws` windows `win` `(b, ceil(h/ws), ceil(w/ws), ws, ws,
    /// c)` put back, the padding cropped. `c` a multiple of 8.
    pub fn unpatch(&self, win: u64, out: u64, b: usize, (h, w, c): (usize, usize, usize), ws: usize) -> Result<()> {
        let n = b * h.div_ceil(ws.max(1)) * w.div_ceil(ws.max(1)) * ws * ws * c;
        if c % 8 != 0 || n >= 1 << 31 || ws == 0 {
            candle_core::bail!("unpatch: {b}x{h}x{w}x{c} in windows of {ws} (channels a multiple of 8, fewer than 2^31 elements)");
        }
        let cfg = cfg(((b * h * w * c / 8).div_ceil(256) as u32, 1, 1), 256, 0);
        launch!(self, self.unpatch, cfg, win, out, b as i32, h as i32, w as i32, c as i32, ws as i32)
    }

    /// The view `v` of bf16 elements at `src` (its start, 16-byte aligned) copied to `dst`,
    /// contiguous.
    pub fn permute(&self, src: u64, dst: u64, v: View) -> Result<()> {
        let rank = v.n.iter().take_while(|&&n| n > 0).count();
        let n: usize = v.n[..rank].iter().map(|&n| n as usize).product();
        let n8 = (n / 8) as i32;
        launch!(
            self,
            self.permute,
            cfg(((n / 8).div_ceil(256) as u32, 1, 1), 256, 0),
            src,
            dst,
            n8,
            rank as i32,
            v
        )
    }
}

#[cfg(test)]
mod tests {
    use super::{FlashLayout, FlashTerms};
    use crate::model::fast::vision::FastVisionOps;
    use crate::model::kernels::testutil::*;
    use crate::model::kernels::Kernels;
    use crate::model::vision::sam::get_rel_pos;
    use crate::model::vision::{partitioned_window_heads, Act, GridAttention, Norm, ReferenceOps, VisionOps, WindowAttention};
    use candle_core::{DType, Tensor};
    use std::sync::Arc;

    /// The fused attention, `sam_flash` and the unfused path (cuBLAS scores + `sam_softmax` +
    /// cuBLAS), against the reference attention computed in f32, on SAM's shapes: windows of
    /// 14x14 (196 keys: partial tiles; a warp per row), global grids whose tables are resized
    /// (40x40 and 30x30 on tables trained for 64: partial tiles; a block per row, 16- and
    /// 8-byte loads; `sam_flash` makes the terms from one chunk of 64 rows of each table at
    /// 30x30, two of T_w's at 40x40) and Base's 64x64 grid, heads of 64; the windows by
    /// `sam_flash_rows16` (keys in grid rows of 16: 14 and 10 wide padded, 16 not), by
    /// `sam_flash_short` (4 blocks an SM) and by `sam_flash`; the 40x40 grid by `sam_flash_w40`
    /// (80-key tiles of two grid rows) and by `sam_flash`.
    #[test]
    fn sam_attention_matches_the_reference() {
        let (dev, cd) = device();
        let k = Arc::new(Kernels::load(&cd).unwrap());
        let mut three_a_sm = Kernels::load(&cd).unwrap();
        three_a_sm.flash_short = false;
        let mut any_grid = Kernels::load(&cd).unwrap();
        any_grid.flash_rows16 = false;
        any_grid.flash_w40 = false;
        let paths = [
            ("sam_flash", FastVisionOps::new(k.clone()).with_flash(true).with_fmha(false)),
            ("sam_flash, windows by sam_flash_short, 40x40 by sam_flash", FastVisionOps::new(Arc::new(any_grid)).with_flash(true).with_fmha(false)),
            ("sam_flash, windows 3 blocks an SM", FastVisionOps::new(Arc::new(three_a_sm)).with_flash(true).with_fmha(false)),
            // (the `cutlass` feature: the global grids 64 and 40 wide on wgmma; without it the
            // same as the first)
            ("sam_fmha", FastVisionOps::new(k.clone()).with_flash(true).with_fmha(true)),
            ("sam_softmax", FastVisionOps::new(k).with_flash(false)),
        ];
        // (b views or windows, heads)
        let cases = [
            ("windows 14x14 (a warp per row)", (2, 12), 14usize, 27usize),
            ("windows 10x10 (a last key tile of 2 grid rows)", (2, 3), 10, 19),
            ("windows 16x16 (grid rows unpadded)", (1, 3), 16, 31),
            ("global 40x40 (resized tables, 16-byte loads)", (1, 12), 40, 127),
            ("global 30x30 (8-byte loads)", (1, 12), 30, 127),
            ("global 64x64 (Base)", (1, 2), 64, 127),
        ];
        for (name, (b, heads), grid, table) in cases {
            let t = grid * grid;
            let d = 64;
            // the qkv projection's output (b, t, 3, heads, d): q, k, v of different scales
            let part = |scale, seed| rand(&[b, t, 1, heads, d], scale, seed);
            let qkv = Tensor::cat(&[part(1.5, 41), part(1.5, 42), part(1.0, 43)], 2).unwrap();
            let rel_h = rand(&[table, d], 0.5, 44);
            let rel_w = rand(&[table, d], 0.5, 45);
            let rh = get_rel_pos(grid, grid, &rel_h)
                .unwrap()
                .contiguous()
                .unwrap();
            let rw = get_rel_pos(grid, grid, &rel_w)
                .unwrap()
                .contiguous()
                .unwrap();
            // [qkv, rh, rw] through `ops`
            let attend = |ops: &dyn VisionOps, t: [&Tensor; 3]| {
                let (qkv, rh, rw) = (t[0], t[1], t[2]);
                ops.attend(&GridAttention { qkv, rh, rw, hw: (grid, grid) }).unwrap()
            };
            let want = attend(&ReferenceOps, [&qkv, &rh, &rw]);
            assert_eq!(want.dims(), &[b, t, heads * d]);
            let g = |x: &Tensor| x.to_dtype(DType::BF16).unwrap().to_device(&dev).unwrap();
            for (path, fast) in &paths {
                let got = attend(fast, [&g(&qkv), &g(&rh), &g(&rw)]);
                assert_eq!(got.dims(), want.dims());
                let diff = max_diff(&got, &want);
                eprintln!("sam attention by {path}, {name}: max |diff| {diff:.3e} at |out| <= {:.2} (bf16 inputs vs f32 reference)", max_abs(&want));
                // bf16 inputs (rounded q, k, v, tables, terms) and bf16 probabilities: a few
                // bf16 ulps at |out| < 1
                assert!(diff <= 2.5e-2, "{path}, {name}: {diff}");
            }
        }
    }

    /// CLIP's attention (no bias) by `sam_flash` against the reference in f32: CLIP-L's 16 heads
    /// of 257 positions (a partial last tile) and a sequence shorter than one tile.
    #[test]
    fn plain_attention_matches_the_reference() {
        let (dev, cd) = device();
        let fast = FastVisionOps::new(Arc::new(Kernels::load(&cd).unwrap())).with_flash(true);
        // (images, heads, positions)
        for (b, n, t) in [(1usize, 16usize, 257usize), (2, 3, 5)] {
            let part = |scale, seed| rand(&[b, t, 1, n, 64], scale, seed);
            let qkv = Tensor::cat(&[part(1.5, 71), part(1.5, 72), part(1.0, 73)], 2).unwrap();
            let want = ReferenceOps.attend_plain(&qkv).unwrap();
            assert_eq!(want.dims(), &[b, t, n * 64]);
            let g = |x: &Tensor| x.to_dtype(DType::BF16).unwrap().to_device(&dev).unwrap();
            let got = fast.attend_plain(&g(&qkv)).unwrap();
            assert_eq!(got.dims(), want.dims());
            let diff = max_diff(&got, &want);
            eprintln!("plain attention by sam_flash, {n} x {t}: max |diff| {diff:.3e} at |out| <= {:.2}", max_abs(&want));
            assert!(diff <= 2.5e-2, "{n} x {t}: {diff}");
        }
        // refused: a grid whose sides do not give t, an odd side, no positions, layouts that
        // do not fit the sequences
        let k = Kernels::load(&cd).unwrap();
        let terms = |grid| Some(FlashTerms { rh: 0, rw: 0, grid });
        let flat = |t| FlashLayout::contiguous(t);
        for (t, grid) in [(100usize, (10usize, 12usize)), (99, (9, 11))] {
            let e = k.sam_flash((0, 0, 0), flat(t), 0, flat(t), terms(grid), 1, t, 1.0).unwrap_err();
            assert!(e.to_string().contains("grid"), "{e}");
        }
        assert!(k.sam_flash((0, 0, 0), flat(0), 0, flat(0), None, 1, 0, 1.0).is_err());
        let e = k.sam_flash((0, 8, 0), flat(8), 0, flat(8), None, 1, 8, 1.0).unwrap_err();
        assert!(e.to_string().contains("aligned"), "{e}");
        let tables = Some(FlashTerms { rh: 0, rw: 8, grid: (2, 4) });
        let e = k.sam_flash((0, 0, 0), flat(8), 0, flat(8), tables, 1, 8, 1.0).unwrap_err();
        assert!(e.to_string().contains("tables"), "{e}");
        let three = FlashLayout { heads: 3, seq_stride: 64 * 3 * 8, row_stride: 64 * 3 };
        for (input, n) in [(three, 4usize), (FlashLayout { row_stride: 32, ..flat(8) }, 1)] {
            let e = k.sam_flash((0, 0, 0), input, 0, input, None, n, 8, 1.0).unwrap_err();
            assert!(e.to_string().contains("sequences"), "{e}");
        }
    }

    /// SAM's windowed attention where the windows lie (`sam_flash_win`: no partition, the
    /// padding's keys and values from the projection's bias) against the partition path
    /// (`patches`, the projection over the padded windows, `sam_flash_rows16`, `unpatch`) and
    /// against the reference's in f32: Base's 64x64 grid (padded to 70: windows past the image
    /// on two sides), Gundam's tiles' 40x40 (42), a grid of whole windows (28x28), an oblong one
    /// (30x16) over 2 images and a window of 10 on 25x25; then its refusals.
    #[test]
    fn windows_in_place_match_the_partition() {
        let (dev, cd) = device();
        let k = Arc::new(Kernels::load(&cd).unwrap());
        let in_place = FastVisionOps::new(k.clone()).with_flash(true).with_in_place_windows(true);
        let partition = FastVisionOps::new(k.clone()).with_flash(true).with_in_place_windows(false);
        let (heads, c) = (2usize, 128usize);
        // bf16 values, so that the f32 reference starts from the same inputs
        let r = |shape: &[usize], scale, seed| rand_bf16(shape, scale, seed).to_dtype(DType::F32).unwrap();
        let (weight, bias) = (r(&[3 * c, c], 0.15, 81), r(&[3 * c], 0.6, 82));
        let g = |x: &Tensor| x.to_dtype(DType::BF16).unwrap().to_device(&dev).unwrap();
        let lin = candle_nn::Linear::new(weight.clone(), Some(bias.clone()));
        let lin_gpu = candle_nn::Linear::new(g(&weight), Some(g(&bias)));
        for (b, h, w, ws) in [(1usize, 64usize, 64usize, 14usize), (1, 40, 40, 14), (1, 28, 28, 14), (2, 30, 16, 14), (1, 25, 25, 10)] {
            let rh = get_rel_pos(ws, ws, &r(&[2 * ws - 1, 64], 0.5, 83)).unwrap().contiguous().unwrap();
            let rw = get_rel_pos(ws, ws, &r(&[2 * ws - 1, 64], 0.5, 84)).unwrap().contiguous().unwrap();
            let x = r(&[b, h, w, c], 1.0, 85);
            let want = ReferenceOps.window_heads(&WindowAttention { x: &x, qkv: &lin, heads, ws, rh: &rh, rw: &rw }).unwrap();
            let (xg, rhg, rwg) = (g(&x), g(&rh), g(&rw));
            let a = WindowAttention { x: &xg, qkv: &lin_gpu, heads, ws, rh: &rhg, rw: &rwg };
            let got = in_place.window_heads(&a).unwrap();
            assert_eq!(got.dims(), &[b, h, w, c]);
            // the partition path on the fast ops (`patches`, the projection, `sam_flash_rows16`,
            // `unpatch`): what the ops with the knob off give
            let parted = partitioned_window_heads(&partition, &a).unwrap();
            assert_eq!(max_diff(&partition.window_heads(&a).unwrap(), &parted), 0.0, "the knob off partitions");
            let (d_part, d_ref) = (max_diff(&got, &parted), max_diff(&got, &want));
            eprintln!("windows of {ws} in place, {b} x {h}x{w}: max |diff| {d_part:.3e} against the partition, {d_ref:.3e} against the f32 reference at |out| <= {:.2}", max_abs(&want));
            // the same bf16 products but for the GEMM's rows (another tiling may round a q, k or
            // v element the other way): a bf16 ulp or two; against f32, bf16 q, k, v
            assert!(d_part <= 1e-2, "{b} x {h}x{w} / {ws}: {d_part} against the partition");
            assert!(d_ref <= 3e-2, "{b} x {h}x{w} / {ws}: {d_ref} against the reference");
        }
        // refused: windows odd, too wide or not square, no image, misaligned addresses
        let t = |ws, wsw| FlashTerms { rh: 0, rw: 0, grid: (ws, wsw) };
        for (terms, what) in [(t(15, 15), "windows"), (t(18, 18), "windows"), (t(14, 12), "windows"), (t(0, 0), "windows")] {
            let e = k.sam_flash_windows(0, 0, 0, (1, 64, 64, 12), terms, 1.0).unwrap_err();
            assert!(e.to_string().contains(what), "{e}");
        }
        let e = k.sam_flash_windows(0, 0, 0, (1, 0, 64, 12), t(14, 14), 1.0).unwrap_err();
        assert!(e.to_string().contains("images"), "{e}");
        let e = k.sam_flash_windows(0, 0, 0, (400, 64, 64, 12), t(14, 14), 1.0).unwrap_err();
        assert!(e.to_string().contains("65535"), "{e}");
        let e = k.sam_flash_windows(0, 8, 0, (1, 64, 64, 12), t(14, 14), 1.0).unwrap_err();
        assert!(e.to_string().contains("aligned"), "{e}");
    }

    /// SAM's windows by `patches` / `unpatch` against `window_partition` / `window_unpartition`
    /// (zero padding, the crop): the same values, bit for bit; and the round trip.
    #[test]
    fn windows_match_the_reference() {
        let (dev, cd) = device();
        let fast = FastVisionOps::new(Arc::new(Kernels::load(&cd).unwrap()));
        for (b, h, w, ws) in [(1usize, 10usize, 10usize, 4usize), (2, 9, 14, 7), (1, 8, 8, 4)] {
            let x = rand_bf16(&[b, h, w, 16], 1.0, 81).to_device(&dev).unwrap();
            let (want, want_pad) = ReferenceOps.windows(&x, ws).unwrap();
            let (got, pad) = fast.windows(&x, ws).unwrap();
            assert_eq!((got.dims(), pad), (want.dims(), want_pad), "{b}x{h}x{w} in {ws}");
            assert_eq!(max_diff(&got, &want), 0.0, "{b}x{h}x{w} in {ws}");
            let back = fast.unwindow(&got, ws, pad, (h, w)).unwrap();
            let want_back = ReferenceOps.unwindow(&want, ws, pad, (h, w)).unwrap();
            assert_eq!(back.dims(), &[b, h, w, 16]);
            assert_eq!((max_diff(&back, &x), max_diff(&want_back, &x)), (0.0, 0.0), "{b}x{h}x{w} in {ws}");
        }
        let k = Kernels::load(&cd).unwrap();
        assert!(k.patches(0, 0, 1, (4, 4, 12), (3, 1, 1), (4, 4)).is_err(), "12 channels");
        assert!(k.unpatch(0, 0, 1, (4, 4, 16), 0).is_err(), "no window");
    }

    /// SAM's patch embedding and neck on NHWC (one copy and a GEMM; patches, GEMMs and row
    /// norms) against the reference's convolutions and `LayerNorm2d` on NCHW, both in bf16 on
    /// the GPU: a smaller SAM's shapes (64 channels in, 32 / 64 / 128 out, a 16x16 grid, two
    /// images).
    #[test]
    fn patch_embed_and_neck_match_the_reference() {
        use crate::model::vision::sam::{LayerNorm2d, Neck};
        use candle_nn::{Conv2d, Conv2dConfig};
        let (dev, cd) = device();
        let fast = FastVisionOps::new(Arc::new(Kernels::load(&cd).unwrap()));
        let g = |shape: &[usize], scale: f32, seed: u64| rand_bf16(shape, scale, seed).to_device(&dev).unwrap();
        let pad = |padding, stride| Conv2dConfig { padding, stride, ..Default::default() };
        let embed = Conv2d::new(g(&[64, 3, 16, 16], 0.05, 90), Some(g(&[64], 0.5, 91)), pad(0, 16));
        let pixels = g(&[2, 3, 256, 256], 1.0, 92);
        let pos = g(&[1, 16, 16, 64], 0.5, 93);
        let want = ReferenceOps.patch_embed(&embed, &pos, &pixels).unwrap();
        let got = fast.patch_embed(&embed, &pos, &pixels).unwrap();
        assert_eq!(got.dims(), want.dims());
        let (diff, top) = (max_diff(&got, &want), max_abs(&want));
        eprintln!("patch embedding: max |diff| {diff:.3e} at |y| <= {top:.2}");
        // sums in another order: one bf16 ulp at |y| < 8
        assert!(diff <= 3.2e-2, "patch embedding: {diff}");
        let norm = |c, seed| LayerNorm2d { weight: g(&[c], 1.0, seed), bias: g(&[c], 0.5, seed + 1), eps: 1e-6 };
        let neck = Neck {
            conv1: Conv2d::new(g(&[32, 64, 1, 1], 0.1, 94), None, pad(0, 1)),
            ln1: norm(32, 95),
            conv2: Conv2d::new(g(&[32, 32, 3, 3], 0.05, 97), None, pad(1, 1)),
            ln2: norm(32, 98),
            net_2: Conv2d::new(g(&[64, 32, 3, 3], 0.05, 100), None, pad(1, 2)),
            net_3: Conv2d::new(g(&[128, 64, 3, 3], 0.05, 101), None, pad(1, 2)),
        };
        let want = ReferenceOps.neck(&neck, &got).unwrap();
        let out = fast.neck(&neck, &got).unwrap();
        assert_eq!(out.dims(), &[2, 128, 4, 4]);
        let (diff, top) = (max_diff(&out, &want), max_abs(&want));
        eprintln!("neck: max |diff| {diff:.3e} at |y| <= {top:.2}");
        // the reference's LayerNorm2d rounds every step to bf16, the row norm once: a few ulps
        assert!(diff <= 0.03 * top.max(1.0), "neck: {diff} at {top}");
    }

    /// `contiguous` of the towers' permuted views (head split, window partition, a cropped
    /// window unpartition) against candle's copy: bit-identical.
    #[test]
    fn permute_matches_candle_contiguous() {
        let (dev, cd) = device();
        let fast = FastVisionOps::new(Arc::new(Kernels::load(&cd).unwrap()));
        let x = rand_bf16(&[2, 10, 3, 4, 64], 1.0, 61)
            .to_device(&dev)
            .unwrap();
        let w = rand_bf16(&[1, 2, 14, 3, 14, 32], 1.0, 62)
            .to_device(&dev)
            .unwrap();
        let cases: Vec<(&str, Tensor)> = vec![
            ("qkv head split", x.permute((2, 0, 3, 1, 4)).unwrap()),
            ("window partition", w.permute((0, 1, 3, 2, 4, 5)).unwrap()),
            (
                "cropped",
                w.reshape((1, 28, 42, 32))
                    .unwrap()
                    .narrow(1, 0, 27)
                    .unwrap()
                    .narrow(2, 0, 40)
                    .unwrap(),
            ),
        ];
        for (name, v) in cases {
            assert!(!v.is_contiguous(), "{name}");
            let got = fast.contiguous(&v).unwrap();
            assert!(got.is_contiguous());
            let diff = max_diff(&got, &v.contiguous().unwrap());
            eprintln!("permute, {name}: max |diff| {diff:.3e}");
            assert_eq!(diff, 0.0, "{name}");
        }
    }

    /// `layer_norm` against candle's layer norm (the reference's), SAM's and CLIP's widths.
    #[test]
    fn layer_norm_matches_candle() {
        let (dev, cd) = device();
        let fast = FastVisionOps::new(Arc::new(Kernels::load(&cd).unwrap()));
        for (c, eps) in [(768usize, 1e-6), (1024, 1e-5), (40, 1e-6)] {
            let mut m = std::collections::HashMap::new();
            m.insert(
                "weight".to_string(),
                rand_bf16(&[c], 1.5, 71).to_device(&dev).unwrap(),
            );
            m.insert(
                "bias".to_string(),
                rand_bf16(&[c], 0.5, 72).to_device(&dev).unwrap(),
            );
            let vb = candle_nn::VarBuilder::from_tensors(m, DType::BF16, &dev);
            let n = Norm::new(c, eps, vb).unwrap();
            // (2, 37, c) around an offset, as the towers' residual streams
            let x = (rand_bf16(&[2, 37, c], 2.0, 73).to_device(&dev).unwrap() + 3.0).unwrap();
            let want = ReferenceOps.layer_norm(&n, &x).unwrap();
            let got = fast.layer_norm(&n, &x).unwrap();
            assert_eq!(got.dims(), want.dims());
            let diff = max_diff(&got, &want);
            eprintln!(
                "layer_norm, {c} wide: max |diff| {diff:.3e} at |y| <= {:.2}",
                max_abs(&want)
            );
            // f32 statistics in another order: one bf16 ulp at |y| < 8
            assert!(diff <= 3.2e-2, "{c}: {diff}");
        }
    }

    /// CLIP's blocks on the fast path (fixed buffers; eager, then captured and replayed as a
    /// CUDA graph) against the reference tower (the same bf16 weights, `ReferenceOps`), two
    /// blocks of CLIP-L's widths, on Base's view (1 x 257 tokens) and Gundam's tiles
    /// (6 x 101): the graph's output equals the eager launches' exactly, also for an input
    /// the graph was not captured with; both within bf16 rounding of the reference; the tiles
    /// and the global view in one run, each within rounding of its own reference; a second
    /// tower on the same ops gets its own capture.
    #[test]
    fn clip_blocks_match_the_reference() {
        use crate::model::vision::{ClipConfig, VitModel};
        let (dev, cd) = device();
        let k = Arc::new(Kernels::load(&cd).unwrap());
        let cfg = ClipConfig { num_layers: 2, ..ClipConfig::clip_l() };
        let (h, f) = (cfg.hidden_size, cfg.ffn_hidden_size);
        // a tower of random weights from `seed0`
        let model = |seed0: u64| {
            let mut m = std::collections::HashMap::new();
            let mut seed = seed0;
            let mut put = |name: String, shape: &[usize], scale: f32, offset: f32| {
                seed += 1;
                let t = (rand(shape, scale, seed) + offset as f64).unwrap();
                m.insert(name, t.to_dtype(DType::BF16).unwrap().to_device(&dev).unwrap());
            };
            put("embeddings.class_embedding".into(), &[h], 0.5, 0.0);
            put("embeddings.position_embedding.weight".into(), &[cfg.num_positions(), h], 0.5, 0.0);
            put("pre_layrnorm.weight".into(), &[h], 0.2, 1.0);
            put("pre_layrnorm.bias".into(), &[h], 0.1, 0.0);
            for i in 0..cfg.num_layers {
                let l = format!("transformer.layers.{i}");
                for (name, out, inp) in [("self_attn.qkv_proj", 3 * h, h), ("self_attn.out_proj", h, h), ("mlp.fc1", f, h), ("mlp.fc2", h, f)] {
                    put(format!("{l}.{name}.weight"), &[out, inp], 1.5 / (inp as f32).sqrt(), 0.0);
                    put(format!("{l}.{name}.bias"), &[out], 0.1, 0.0);
                }
                for n in ["layer_norm1", "layer_norm2"] {
                    put(format!("{l}.{n}.weight"), &[h], 0.2, 1.0);
                    put(format!("{l}.{n}.bias"), &[h], 0.1, 0.0);
                }
            }
            VitModel::new(&cfg, candle_nn::VarBuilder::from_tensors(m, DType::BF16, &dev)).unwrap()
        };
        let mut clip = model(90);
        for (name, (b, side)) in [("Base, 1 x 257", (1usize, 16usize)), ("Gundam tiles, 6 x 101", (6, 10))] {
            let feats = |seed| rand_bf16(&[b, h, side, side], 1.0, seed).to_device(&dev).unwrap();
            let (x1, x2) = (feats(81), feats(82));
            clip.set_ops(Arc::new(ReferenceOps));
            let want = clip.forward(&x1).unwrap();
            clip.set_ops(Arc::new(FastVisionOps::new(k.clone()).with_graphs(false)));
            let eager = [clip.forward(&x1).unwrap(), clip.forward(&x2).unwrap()];
            clip.set_ops(Arc::new(FastVisionOps::new(k.clone()).with_graphs(true)));
            // the first call launches, the second captures and replays, the third replays
            let runs: Vec<Tensor> = (0..3).map(|_| clip.forward(&x1).unwrap()).collect();
            let other = clip.forward(&x2).unwrap();
            let diff = max_diff(&eager[0], &want);
            let scale = max_abs(&want);
            eprintln!("clip blocks, {name}: fast vs reference max |diff| {diff:.3e} at |y| <= {scale:.2}");
            assert_eq!(want.dims(), &[b, side * side + 1, h]);
            // two blocks of bf16 roundings in another order (epilogue sums, flash attention)
            assert!(diff <= 3e-2 * scale.max(1.0), "{name}: {diff} at {scale}");
            for (i, r) in runs.iter().enumerate() {
                assert_eq!(max_diff(r, &eager[0]), 0.0, "{name}: call {i} differs from the eager launches");
            }
            assert_eq!(max_diff(&other, &eager[1]), 0.0, "{name}: the replay with another input");
            assert!(max_diff(&other, &runs[0]) > 0.0, "{name}: another input gave the same output");
        }
        // Gundam's tiles and global view together (every input's rows through each linear at
        // once, the attention within each input): each as the reference gives it alone; the
        // graph's replays equal the eager launches
        let tiles = rand_bf16(&[6, h, 10, 10], 1.0, 84).to_device(&dev).unwrap();
        let global = rand_bf16(&[1, h, 16, 16], 1.0, 85).to_device(&dev).unwrap();
        clip.set_ops(Arc::new(ReferenceOps));
        let want = [clip.forward(&tiles).unwrap(), clip.forward(&global).unwrap()];
        clip.set_ops(Arc::new(FastVisionOps::new(k.clone()).with_graphs(false)));
        let eager = clip.forward_many(&[&tiles, &global]).unwrap();
        clip.set_ops(Arc::new(FastVisionOps::new(k.clone()).with_graphs(true)));
        let runs: Vec<Vec<Tensor>> = (0..3).map(|_| clip.forward_many(&[&tiles, &global]).unwrap()).collect();
        assert_eq!(eager.len(), 2);
        for (i, (got, want)) in eager.iter().zip(&want).enumerate() {
            assert_eq!(got.dims(), want.dims());
            let (diff, scale) = (max_diff(got, want), max_abs(want));
            eprintln!("clip blocks, tiles and global view together, input {i}: fast vs reference max |diff| {diff:.3e} at |y| <= {scale:.2}");
            assert!(diff <= 3e-2 * scale.max(1.0), "input {i}: {diff} at {scale}");
            for (r, run) in runs.iter().enumerate() {
                assert_eq!(max_diff(&run[i], got), 0.0, "input {i}: call {r} differs from the eager launches");
            }
        }
        // one ops for two towers: the second's weights are not the captured ones, so its shape
        // gets new buffers and a new capture (the first tower's graph is not replayed for it)
        let shared: Arc<FastVisionOps> = Arc::new(FastVisionOps::new(k.clone()).with_graphs(true));
        let mut other = model(300);
        let x = rand_bf16(&[1, h, 16, 16], 1.0, 83).to_device(&dev).unwrap();
        other.set_ops(Arc::new(FastVisionOps::new(k.clone()).with_graphs(false)));
        let want_other = other.forward(&x).unwrap();
        clip.set_ops(shared.clone());
        other.set_ops(shared);
        for _ in 0..3 {
            clip.forward(&x).unwrap();
        }
        for i in 0..3 {
            let got = other.forward(&x).unwrap();
            assert_eq!(max_diff(&got, &want_other), 0.0, "the second tower, call {i}, on the first's ops");
        }
    }

    /// `linear` with each activation, with and without the residual, on CLIP's and SAM's
    /// widths: the fused epilogues (cuBLASLt's; CUTLASS's GELU with the `cutlass` feature)
    /// against the reference's ops, both in bf16 on the GPU.
    #[test]
    fn bias_act_linear_matches_the_reference() {
        let (dev, cd) = device();
        let k = Arc::new(Kernels::load(&cd).unwrap());
        let (rows, kk, out) = (37usize, 256usize, 1024usize);
        let g = |x: Tensor| x.to_dtype(DType::BF16).unwrap().to_device(&dev).unwrap();
        let w = g(rand(&[out, kk], 0.1, 51));
        let b = g(rand(&[out], 1.0, 52));
        let lin = candle_nn::Linear::new(w, Some(b));
        // (2, rows, k): a batch dim, as the towers pass (b, t, c) or (b, h, w, c)
        let x = g(rand(&[2, rows, kk], 1.5, 53));
        let res = g(rand(&[2, rows, out], 2.0, 54));
        let paths = [("cuBLASLt epilogue", true, false), ("cuBLAS + bias_act", false, false), ("CUTLASS's GELU", true, true)];
        for (path, epilogue, cutlass) in paths {
            if cutlass && !cfg!(feature = "cutlass") {
                continue;
            }
            let fast = FastVisionOps::new(k.clone()).with_epilogue(epilogue).with_cutlass(cutlass);
            for act in [Act::None, Act::GeluErf, Act::QuickGelu] {
                for r in [None, Some(&res)] {
                    let want = ReferenceOps.linear(&lin, &x, act, r).unwrap();
                    let got = fast.linear(&lin, &x, act, r).unwrap();
                    assert_eq!(got.dims(), want.dims());
                    let diff = max_diff(&got, &want);
                    eprintln!(
                        "linear by {path}, {act:?}, residual {}: max |diff| {diff:.3e} at |y| <= {:.2}",
                        r.is_some(),
                        max_abs(&want)
                    );
                    // rounded once rather than per op: <= 2 bf16 ulps at |y| < 8
                    assert!(diff <= 6.25e-2, "{path}, {act:?} residual {}: {diff}", r.is_some());
                }
            }
        }
    }
}
