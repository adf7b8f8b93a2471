//! The GPU fast path's kernels (`kernels/*.cu` at the repository root, one op per file): their
//! launches, and for each the reference it must agree with.
//!
//! Owns: loading the PTX that `build.rs` compiles with nvcc (compute capability
//! `CUDA_COMPUTE_CAP`, default 90), the launch of every kernel with its grid and shared memory,
//! raw device buffers ([`Buf`]) and the bf16 GEMMs between the kernels (cuBLAS; cuBLASLt
//! with the bias and residual epilogue: [`lt`]; CUTLASS with fused activations, [`cutlass`],
//! with the `cutlass` feature). Does not own
//! the order of a decoder step ([`crate::model::fast`]) nor the model's semantics: the
//! references are the reference path's own functions (`RmsNorm`, `moe::route`, `Mlp`,
//! `rope_tables`, `NoRepeatNgram::banned`), which stay the model's slow path on every device.
//!
//! Why nvcc at build time and not NVRTC at run time: the kernels are plain CUDA C++ with
//! `cuda_bf16.h`; compiling them with the build catches errors before a device is involved, the
//! binary carries PTX (the driver JITs it once for the card) and nothing compiles at start-up.
//!
//! Launches take raw device addresses (`u64`): every buffer lives on the one stream of the
//! candle device, with cudarc's event tracking off, so the launches can be captured in a CUDA
//! graph (see [`crate::model::fast`]).

pub mod attn;
pub mod cutlass;
pub mod lt;
pub mod moe;
pub mod norm;
pub mod sample;
pub mod trace;
pub mod vision;

use std::sync::Arc;

use candle_core::cuda_backend::cudarc;
use candle_core::{CudaDevice, Result, Tensor};
use cudarc::driver::{CudaFunction, CudaSlice, CudaStream, DevicePtr, DeviceRepr, LaunchConfig};

/// The PTX of each kernel, compiled by `build.rs`: as run, and with the timeline's probes
/// ([`trace`]).
mod ptx {
    macro_rules! ptx {
        ($name:ident, $file:literal) => {
            pub const $name: [&str; 2] = [
                include_str!(concat!(env!("OUT_DIR"), "/", $file, ".ptx")),
                include_str!(concat!(env!("OUT_DIR"), "/", $file, ".trace.ptx")),
            ];
        };
    }
    ptx!(EMBED, "embed");
    ptx!(ADD_RMSNORM, "add_rmsnorm");
    ptx!(NORM_LINEAR, "norm_linear");
    ptx!(ROPE_KV, "rope_kv");
    ptx!(DECODE_ATTN, "decode_attn");
    ptx!(MOE_ROUTE, "moe_route");
    ptx!(MOE_PLAN, "moe_plan");
    ptx!(MOE_GATE_UP, "moe_gate_up");
    ptx!(MOE_DOWN, "moe_down");
    ptx!(NGRAM_BAN, "ngram_ban");
    ptx!(GREEDY_NEXT, "greedy_next");
    ptx!(LINEAR, "linear");
    ptx!(SAM_SOFTMAX, "sam_softmax");
    ptx!(SAM_FLASH, "sam_flash");
    ptx!(PATCHES, "patches");
    ptx!(BIAS_ACT, "bias_act");
    ptx!(PERMUTE, "permute");
    ptx!(LAYER_NORM, "layer_norm");
}

pub(crate) fn cuda_err(e: impl std::fmt::Display) -> candle_core::Error {
    candle_core::Error::Msg(format!("cuda: {e}"))
}

/// A device buffer and its address.
pub struct Buf<T> {
    _slice: CudaSlice<T>,
    pub ptr: u64,
    pub len: usize,
}

impl<T: DeviceRepr> Buf<T> {
    /// Zeroed buffer of `len` elements on the device's stream.
    pub fn zeros(dev: &CudaDevice, len: usize) -> Result<Self>
    where
        T: cudarc::driver::ValidAsZeroBits,
    {
        let slice = dev.alloc_zeros::<T>(len.max(1))?;
        let ptr = {
            let stream = dev.cuda_stream();
            let (p, _guard) = slice.device_ptr(&stream);
            p
        };
        Ok(Self {
            _slice: slice,
            ptr,
            len,
        })
    }

    /// Address of element `i`.
    pub fn at(&self, i: usize) -> u64 {
        self.ptr + (i * std::mem::size_of::<T>()) as u64
    }

    /// Copies `host` into elements `off..off + host.len()` (synchronous).
    pub fn upload(&self, stream: &CudaStream, off: usize, host: &[T]) -> Result<()> {
        if off + host.len() > self.len {
            candle_core::bail!(
                "upload of {} elements at {off} overflows a buffer of {}",
                host.len(),
                self.len
            );
        }
        unsafe {
            cudarc::driver::result::memcpy_htod_async(self.at(off), host, stream.cu_stream())
                .map_err(cuda_err)?;
        }
        stream.synchronize().map_err(cuda_err)
    }

    /// Elements `off..off + n` to the host (synchronises the stream).
    pub fn download(&self, stream: &CudaStream, off: usize, n: usize) -> Result<Vec<T>>
    where
        T: Default + Clone,
    {
        let mut out = vec![T::default(); n];
        unsafe {
            cudarc::driver::result::memcpy_dtoh_async(&mut out, self.at(off), stream.cu_stream())
                .map_err(cuda_err)?;
        }
        stream.synchronize().map_err(cuda_err)?;
        Ok(out)
    }
}

/// Address of a contiguous CUDA tensor's first element; valid while the tensor lives.
pub fn tensor_ptr<T: candle_core::cuda_backend::CudaDType + DeviceRepr>(t: &Tensor) -> Result<u64> {
    if !t.layout().is_contiguous() {
        candle_core::bail!("tensor_ptr: the tensor must be contiguous");
    }
    view_ptr::<T>(t)
}

/// Address of the first element of a CUDA tensor's view (its layout's start), contiguous or
/// not; valid while the tensor lives.
pub fn view_ptr<T: candle_core::cuda_backend::CudaDType + DeviceRepr>(t: &Tensor) -> Result<u64> {
    let (st, layout) = t.storage_and_layout();
    let candle_core::Storage::Cuda(cs) = &*st else {
        candle_core::bail!("tensor_ptr: not a CUDA tensor");
    };
    let slice = cs.as_cuda_slice::<T>()?;
    let stream = cs.device.cuda_stream();
    let (p, _guard) = slice.device_ptr(&stream);
    Ok(p + (layout.start_offset() * std::mem::size_of::<T>()) as u64)
}

/// Device-to-device copy of `bytes` on the stream.
pub fn copy_d2d(stream: &CudaStream, dst: u64, src: u64, bytes: usize) -> Result<()> {
    unsafe { cudarc::driver::result::memcpy_dtod_async(dst, src, bytes, stream.cu_stream()) }
        .map_err(cuda_err)
}

/// The loaded kernels and a cuBLAS handle of their own (with a fixed workspace, so that GEMMs
/// can be captured in a CUDA graph) on the device's stream.
pub struct Kernels {
    pub stream: Arc<CudaStream>,
    blas: cudarc::cublas::CudaBlas,
    /// cuBLASLt for the GEMMs with a bias / residual epilogue; shares `_workspace` with `blas`
    /// (one stream: their calls never overlap). Declared before the workspace: dropped first.
    lt: lt::Lt,
    _workspace: Buf<u8>,
    embed: CudaFunction,
    add_rmsnorm: CudaFunction,
    /// 4, 2 and 1 outputs a warp.
    norm_linear: [CudaFunction; 3],
    rope_kv: CudaFunction,
    decode_attn: CudaFunction,
    moe_route: CudaFunction,
    moe_plan: CudaFunction,
    moe_gate_up: CudaFunction,
    moe_down: CudaFunction,
    /// The grouped kernels compiled for one slot per expert (one row).
    moe_gate_up_one: CudaFunction,
    moe_down_one: CudaFunction,
    ngram_ban: CudaFunction,
    greedy_next: CudaFunction,
    linear_rows: CudaFunction,
    sam_softmax_v8: CudaFunction,
    sam_softmax_v4: CudaFunction,
    sam_softmax_rows_v4: CudaFunction,
    /// Any grid, a grid 64 wide, no bias; any grid of few positions (4 blocks an SM); the same
    /// for grids at most 16 wide, the keys in grid rows of 16 (`sam_flash_rows16`); a grid 40
    /// wide, key tiles of two grid rows (`sam_flash_w40`); SAM's windows where they lie in the
    /// image (`sam_flash_win`, [`Kernels::sam_flash_windows`]).
    sam_flash: [CudaFunction; 7],
    /// SAM's windows (up to 256 positions) by `sam_flash_short`, 4 blocks an SM, unless
    /// `OCR_PATCH_SAM_FLASH_SHORT=0` (to compare): `sam_flash`'s 3 then.
    pub(crate) flash_short: bool,
    /// Those of them at most 16 wide (SAM's 14 x 14 windows) by `sam_flash_rows16` (the bias
    /// from registers, no per-key index arithmetic), unless `OCR_PATCH_SAM_FLASH_ROWS16=0`.
    pub(crate) flash_rows16: bool,
    /// Grids 40 wide (Gundam's tiles' global blocks) by `sam_flash_w40` (80-key tiles of two
    /// grid rows, the bias from registers), unless `OCR_PATCH_SAM_FLASH_W40=0`: `sam_flash`.
    pub(crate) flash_w40: bool,
    patches: CudaFunction,
    unpatch: CudaFunction,
    bias_act: CudaFunction,
    permute: CudaFunction,
    layer_norm: CudaFunction,
    /// `OCR_PATCH_LINEAR=cublas`: every projection through cuBLAS (to compare).
    cublas_only: bool,
    /// One row's post-MoE norm inside the q/k/v projection (`norm_linear`), each warp making
    /// this many outputs (1, 2 or 4; `OCR_PATCH_NORM_LINEAR`, default 4); 0 (to compare):
    /// `add_rmsnorm` then `linear`.
    pub(crate) norm_rows: usize,
    /// Programmatic dependent launch (compute capability >= 9.0, unless `OCR_PATCH_PDL=0`):
    /// each kernel may start while the one before it runs (see `inputs_ready` in
    /// `kernels/common.cuh`).
    overlap: bool,
    /// The fewest keys per block of the split attention (`OCR_PATCH_ATTN_SHARE`, default
    /// [`attn::SPLIT_CHUNK`]).
    pub(crate) attn_share: usize,
    /// The kernels carry the timeline's probes (`OCR_PATCH_KERNEL_TRACE=1`, see [`trace`]).
    pub(crate) traced: bool,
}

fn cfg(grid: (u32, u32, u32), block: u32, shared: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: grid,
        block_dim: (block, 1, 1),
        shared_mem_bytes: shared,
    }
}

impl Kernels {
    pub fn load(dev: &CudaDevice) -> Result<Self> {
        let traced = std::env::var("OCR_PATCH_KERNEL_TRACE").is_ok_and(|v| v == "1");
        let variant = if traced { "trace_" } else { "" };
        // a function of a module (the module's own kernel unless `func` names another)
        let g = |func: &str, module: &str, ptx: [&str; 2]| -> Result<CudaFunction> {
            Ok(dev
                .get_or_load_custom_func(func, &format!("ocr_patch_{variant}{module}"), ptx[usize::from(traced)])?
                .into_cuda_function())
        };
        let f = |name: &str, ptx: [&str; 2]| g(name, name, ptx);
        let stream = dev.cuda_stream();
        let blas = cudarc::cublas::CudaBlas::new(stream.clone()).map_err(cuda_err)?;
        let workspace = Buf::<u8>::zeros(dev, 32 << 20)?;
        unsafe {
            cudarc::cublas::sys::cublasSetWorkspace_v2(
                *blas.handle(),
                workspace.ptr as *mut std::ffi::c_void,
                workspace.len,
            )
            .result()
            .map_err(cuda_err)?;
        }
        Ok(Self {
            blas,
            lt: lt::Lt::new(workspace.ptr, workspace.len)?,
            _workspace: workspace,
            embed: f("embed", ptx::EMBED)?,
            add_rmsnorm: f("add_rmsnorm", ptx::ADD_RMSNORM)?,
            norm_linear: [
                f("norm_linear", ptx::NORM_LINEAR)?,
                g("norm_linear_r2", "norm_linear", ptx::NORM_LINEAR)?,
                g("norm_linear_r1", "norm_linear", ptx::NORM_LINEAR)?,
            ],
            rope_kv: f("rope_kv", ptx::ROPE_KV)?,
            decode_attn: f("decode_attn", ptx::DECODE_ATTN)?,
            moe_route: f("moe_route", ptx::MOE_ROUTE)?,
            moe_plan: f("moe_plan", ptx::MOE_PLAN)?,
            moe_gate_up: f("moe_gate_up", ptx::MOE_GATE_UP)?,
            moe_down: f("moe_down", ptx::MOE_DOWN)?,
            moe_gate_up_one: g("moe_gate_up_one", "moe_gate_up", ptx::MOE_GATE_UP)?,
            moe_down_one: g("moe_down_one", "moe_down", ptx::MOE_DOWN)?,
            ngram_ban: f("ngram_ban", ptx::NGRAM_BAN)?,
            greedy_next: f("greedy_next", ptx::GREEDY_NEXT)?,
            linear_rows: f("linear", ptx::LINEAR)?,
            sam_softmax_v8: f("sam_softmax_v8", ptx::SAM_SOFTMAX)?,
            sam_softmax_v4: g("sam_softmax_v4", "sam_softmax_v8", ptx::SAM_SOFTMAX)?,
            sam_softmax_rows_v4: g("sam_softmax_rows_v4", "sam_softmax_v8", ptx::SAM_SOFTMAX)?,
            sam_flash: {
                let load = |name: &str| -> Result<CudaFunction> {
                    let f = g(name, "sam_flash", ptx::SAM_FLASH)?;
                    // its tiles take more than the default 48 KiB of shared memory
                    f.set_attribute(
                        cudarc::driver::sys::CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                        vision::SAM_FLASH_MAX_SMEM as i32,
                    )
                    .map_err(cuda_err)?;
                    Ok(f)
                };
                [
                    load("sam_flash")?,
                    load("sam_flash_w64")?,
                    load("sam_flash_plain")?,
                    load("sam_flash_short")?,
                    load("sam_flash_rows16")?,
                    load("sam_flash_w40")?,
                    load("sam_flash_win")?,
                ]
            },
            flash_short: !std::env::var("OCR_PATCH_SAM_FLASH_SHORT").is_ok_and(|v| v == "0"),
            flash_rows16: !std::env::var("OCR_PATCH_SAM_FLASH_ROWS16").is_ok_and(|v| v == "0"),
            flash_w40: !std::env::var("OCR_PATCH_SAM_FLASH_W40").is_ok_and(|v| v == "0"),
            patches: f("patches", ptx::PATCHES)?,
            unpatch: g("unpatch", "patches", ptx::PATCHES)?,

            bias_act: f("bias_act", ptx::BIAS_ACT)?,
            permute: f("permute", ptx::PERMUTE)?,
            layer_norm: f("layer_norm", ptx::LAYER_NORM)?,
            cublas_only: std::env::var("OCR_PATCH_LINEAR").is_ok_and(|v| v == "cublas"),
            norm_rows: match std::env::var("OCR_PATCH_NORM_LINEAR").as_deref() {
                Ok("0") => 0,
                Ok("1") => 1,
                Ok("2") => 2,
                _ => 4,
            },
            overlap: stream.context().compute_capability().map_err(cuda_err)?.0 >= 9
                && !std::env::var("OCR_PATCH_PDL").is_ok_and(|v| v == "0"),
            attn_share: std::env::var("OCR_PATCH_ATTN_SHARE")
                .ok()
                .and_then(|v| v.parse().ok())
                .filter(|&v| v >= 1)
                .unwrap_or(attn::SPLIT_CHUNK),
            traced,
            stream,
        })
    }

    /// Launches `func` on the stream with `args` (pointers to each argument's value). With
    /// [`Self::overlap`] the launch is a programmatic dependent one: the kernel may begin (its
    /// weight loads) while the previous kernel finishes; every kernel of `kernels/` waits for
    /// its inputs (`inputs_ready`) before reading what an earlier launch wrote.
    ///
    /// # Safety
    /// `args` must match the kernel's parameters in number, order and type, and point to
    /// values that live until this returns (the [`launch!`] macro does both).
    pub(crate) unsafe fn launch_raw(
        &self,
        func: &CudaFunction,
        cfg: LaunchConfig,
        args: &mut [*mut std::ffi::c_void],
    ) -> Result<()> {
        use cudarc::driver::sys;
        self.stream.context().bind_to_thread().map_err(cuda_err)?;
        let mut attr: sys::CUlaunchAttribute = unsafe { std::mem::zeroed() };
        attr.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
        attr.value.programmaticStreamSerializationAllowed = 1;
        let config = sys::CUlaunchConfig {
            gridDimX: cfg.grid_dim.0,
            gridDimY: cfg.grid_dim.1,
            gridDimZ: cfg.grid_dim.2,
            blockDimX: cfg.block_dim.0,
            blockDimY: cfg.block_dim.1,
            blockDimZ: cfg.block_dim.2,
            sharedMemBytes: cfg.shared_mem_bytes,
            hStream: self.stream.cu_stream(),
            attrs: &mut attr,
            numAttrs: u32::from(self.overlap),
        };
        // SAFETY: the caller's contract (the arguments); the config is complete
        unsafe { sys::cuLaunchKernelEx(&config, func.cu_function(), args.as_mut_ptr(), std::ptr::null_mut()) }
            .result()
            .map_err(cuda_err)
    }

    /// Row-major `y (n, out) = x (n, k) . w (out, k)^T` in bf16 with f32 accumulation: the
    /// `linear` kernel for a few rows of a projection (decode; lm_head for one row), cuBLAS
    /// otherwise (prefill, lm_head for more rows).
    pub fn linear(&self, x: u64, w: u64, y: u64, n: usize, k: usize, out: usize) -> Result<()> {
        // a wide output (lm_head): the kernel for one row (108 against cuBLAS's 119 us on an
        // H100), cuBLAS for more (8 rows: 5,401 against 5,042 tokens/s)
        if n <= LINEAR_KERNEL_MAX_ROWS && (out <= 16384 || n == 1) && k % 8 == 0 && !self.cublas_only {
            self.linear_kernel(x, w, y, n, k, out)
        } else {
            self.gemm(x, w, y, n, k, out)
        }
    }

    /// [`Self::linear`] by the `linear` kernel.
    pub fn linear_kernel(
        &self,
        x: u64,
        w: u64,
        y: u64,
        n: usize,
        k: usize,
        out: usize,
    ) -> Result<()> {
        launch!(
            self,
            self.linear_rows,
            cfg((out.div_ceil(8) as u32, 1, 1), 256, 0),
            x,
            w,
            y,
            n as i32,
            k as i32,
            out as i32
        )
    }

    /// Records what `launch` enqueues on the stream as a CUDA graph (nothing runs), uploaded
    /// to the device. Needs a non-default stream (`Device::new_cuda_with_stream`); the capture
    /// ends whatever `launch` returns, so the stream never stays in capture mode.
    pub fn capture(&self, launch: impl FnOnce() -> Result<()>) -> Result<cudarc::driver::CudaGraph> {
        use cudarc::driver::sys;
        let st = &self.stream;
        if st.cu_stream().is_null() {
            candle_core::bail!("capture: the device uses the legacy default stream; create it with Device::new_cuda_with_stream");
        }
        st.begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL).map_err(cuda_err)?;
        let launched = launch();
        let graph = st.end_capture(sys::CUgraphInstantiate_flags(0)).map_err(cuda_err);
        launched?;
        let Some(g) = graph? else { candle_core::bail!("capture: the stream captured nothing") };
        g.upload().map_err(cuda_err)?;
        Ok(g)
    }

    /// Row-major `y (n, out) = x (n, k) . w (out, k)^T + bias (out) + res (n, out)` by cuBLASLt,
    /// the bias and the residual (each optional: 0) in the GEMM's epilogue, f32 until one
    /// rounding to bf16; `res` may be `y`. See [`lt`].
    #[allow(clippy::too_many_arguments)]
    pub fn linear_epilogue(&self, x: u64, w: u64, bias: u64, res: u64, y: u64, n: usize, k: usize, out: usize) -> Result<()> {
        self.stream.context().bind_to_thread().map_err(cuda_err)?;
        self.lt.linear(&self.stream, (x, w, bias, res, y), n, k, out)
    }

    /// [`Self::linear`] by cuBLAS (`cublasGemmEx`, bf16 in and out, f32 compute).
    pub fn gemm(&self, x: u64, w: u64, y: u64, n: usize, k: usize, out: usize) -> Result<()> {
        use cudarc::cublas::sys::{
            cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cudaDataType_t,
        };
        let (alpha, beta) = (1f32, 0f32);
        unsafe {
            cudarc::cublas::result::gemm_ex(
                *self.blas.handle(),
                cublasOperation_t::CUBLAS_OP_T,
                cublasOperation_t::CUBLAS_OP_N,
                out as i32,
                n as i32,
                k as i32,
                (&alpha) as *const f32 as *const _,
                w as *const _,
                cudaDataType_t::CUDA_R_16BF,
                k as i32,
                x as *const _,
                cudaDataType_t::CUDA_R_16BF,
                k as i32,
                (&beta) as *const f32 as *const _,
                y as *mut _,
                cudaDataType_t::CUDA_R_16BF,
                out as i32,
                cublasComputeType_t::CUBLAS_COMPUTE_32F,
                cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
            .map_err(cuda_err)
        }
    }
}

/// A kernel argument for [`Kernels::launch_raw`]: plain device values only (addresses, sizes,
/// scalars, `#[repr(C)]` views).
pub(crate) fn arg_ptr<T: DeviceRepr>(a: &T) -> *mut std::ffi::c_void {
    a as *const T as *mut std::ffi::c_void
}

/// Rows up to which [`Kernels::linear`] uses the `linear` kernel rather than cuBLAS.
pub const LINEAR_KERNEL_MAX_ROWS: usize = 8;

/// Pushes the arguments and launches (the arguments are plain values: addresses and sizes)
/// through [`Kernels::launch_raw`].
macro_rules! launch {
    ($k:expr, $func:expr, $cfg:expr, $($arg:expr),* $(,)?) => {{
        let mut args: Vec<*mut std::ffi::c_void> = Vec::new();
        // `a` shadows itself: every argument stays alive until the launch.
        $( let a = $arg; args.push($crate::model::kernels::arg_ptr(&a)); )*
        // SAFETY: the arguments are the kernel's, in its order, alive until the launch returns
        unsafe { $k.launch_raw(&$func, $cfg, &mut args) }
    }};
}
pub(crate) use launch;

#[cfg(test)]
pub(crate) mod testutil {
    //! Shared by the kernel tests: the device, seeded inputs, differences.
    use candle_core::{DType, Device, Tensor};

    pub fn device() -> (Device, candle_core::CudaDevice) {
        let d = Device::new_cuda_with_stream(0).expect("these tests need a CUDA device");
        let Device::Cuda(c) = &d else { unreachable!() };
        let c = c.clone();
        (d, c)
    }

    /// Uniform values in `[-scale, scale)` from a seeded LCG, as a CPU f32 tensor.
    pub fn rand(shape: &[usize], scale: f32, seed: u64) -> Tensor {
        let n: usize = shape.iter().product();
        let mut s = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let v: Vec<f32> = (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
            })
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    pub fn rand_bf16(shape: &[usize], scale: f32, seed: u64) -> Tensor {
        rand(shape, scale, seed).to_dtype(DType::BF16).unwrap()
    }

    /// max |a - b| over all elements, in f32 on the host.
    pub fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        let f = |t: &Tensor| {
            t.to_device(&Device::Cpu)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap()
        };
        let (a, b) = (f(a), f(b));
        assert_eq!(a.dims(), b.dims(), "shapes differ");
        max_abs(&(a - b).unwrap())
    }

    /// max |t| over all elements, in f32 on the host.
    pub fn max_abs(t: &Tensor) -> f32 {
        let t = t
            .to_device(&Device::Cpu)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        t.abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }
}

#[cfg(test)]
mod tests {
    use super::testutil::*;
    use super::*;
    use candle_core::DType;
    use half::bf16;

    /// The `linear` kernel and the cuBLAS path against candle's matmul (what the reference
    /// path's `Linear` runs), for 1, 5 and 8 rows.
    #[test]
    fn linear_kernel_and_gemm_match_candle() {
        let (dev, cd) = device();
        let k = Kernels::load(&cd).unwrap();
        let (kk, out) = (1280usize, 3840usize);
        let w = rand_bf16(&[out, kk], 0.05, 31).to_device(&dev).unwrap();
        for n in [1usize, 5, 8] {
            let x = rand_bf16(&[n, kk], 1.0, 32 + n as u64)
                .to_device(&dev)
                .unwrap();
            let want = x.matmul(&w.t().unwrap()).unwrap();
            let y1 = Tensor::zeros((n, out), DType::BF16, &dev).unwrap();
            let y2 = Tensor::zeros((n, out), DType::BF16, &dev).unwrap();
            let p = |t: &Tensor| tensor_ptr::<bf16>(t).unwrap();
            k.linear_kernel(p(&x), p(&w), p(&y1), n, kk, out).unwrap();
            k.gemm(p(&x), p(&w), p(&y2), n, kk, out).unwrap();
            let (d1, d2) = (max_diff(&y1, &want), max_diff(&y2, &want));
            eprintln!("linear, {n} rows: kernel max |diff| {d1:.3e}, cuBLAS max |diff| {d2:.3e}");
            // |y| < 4: one bf16 ulp is 2^-6 (sums in another order may round the other way)
            assert!(
                d1 <= 1.6e-2 && d2 <= 1.6e-2,
                "{n} rows: kernel {d1}, cuBLAS {d2}"
            );
        }
    }

    /// `linear_epilogue` (cuBLASLt, bias and residual in the epilogue) against candle's matmul
    /// in f32 plus the bias and the residual, rounded once: every combination of the two, in
    /// place, at an address only 16-byte aligned (the other plan), and its refusals.
    #[test]
    fn linear_epilogue_matches_f32_sums() {
        let (dev, cd) = device();
        let k = Kernels::load(&cd).unwrap();
        let (rows, kk, out) = (101usize, 1024usize, 3072usize);
        let w = rand_bf16(&[out, kk], 0.05, 41).to_device(&dev).unwrap();
        let b = rand_bf16(&[out], 1.0, 42).to_device(&dev).unwrap();
        // one spare row in front: `x` and `res` at row 1 are 2,048 / 6,144 bytes in, 16-aligned
        // but not 256-aligned when `skew`
        let xs = rand_bf16(&[rows + 1, kk], 1.0, 43).to_device(&dev).unwrap();
        let rs = rand_bf16(&[rows + 1, out], 2.0, 44).to_device(&dev).unwrap();
        let f = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
        let p = |t: &Tensor| tensor_ptr::<bf16>(t).unwrap();
        for skew in [0usize, 1] {
            let x = xs.narrow(0, skew, rows).unwrap();
            let res = rs.narrow(0, skew, rows).unwrap();
            let acc = f(&x).matmul(&f(&w).t().unwrap()).unwrap();
            for (with_bias, with_res) in [(false, false), (true, false), (false, true), (true, true)] {
                let mut want = acc.clone();
                if with_bias {
                    want = want.broadcast_add(&f(&b)).unwrap();
                }
                if with_res {
                    want = (want + f(&res)).unwrap();
                }
                let want = want.to_dtype(DType::BF16).unwrap();
                let y = Tensor::zeros((rows, out), DType::BF16, &dev).unwrap();
                let (pb, pr) = (if with_bias { p(&b) } else { 0 }, if with_res { p(&res) } else { 0 });
                k.linear_epilogue(p(&x), p(&w), pb, pr, p(&y), rows, kk, out).unwrap();
                let d = max_diff(&y, &want);
                eprintln!("linear_epilogue, skew {skew}, bias {with_bias}, residual {with_res}: max |diff| {d:.3e} at |y| <= {:.2}", max_abs(&want));
                // f32 sums in another order: one bf16 ulp at |y| < 8
                assert!(d <= 3.2e-2, "skew {skew} bias {with_bias} residual {with_res}: {d}");
            }
            // in place: the residual stream is the output
            let y = res.copy().unwrap();
            k.linear_epilogue(p(&x), p(&w), p(&b), p(&y), p(&y), rows, kk, out).unwrap();
            let want = (acc.broadcast_add(&f(&b)).unwrap() + f(&res)).unwrap().to_dtype(DType::BF16).unwrap();
            let d = max_diff(&y, &want);
            assert!(d <= 3.2e-2, "in place, skew {skew}: {d}");
        }
        // refusals: widths not multiples of 8, an address not 16-byte aligned, no output
        let (px, pw, pb) = (p(&xs), p(&w), p(&b));
        let y = Tensor::zeros((rows, out), DType::BF16, &dev).unwrap();
        assert!(k.linear_epilogue(px, pw, pb, 0, p(&y), rows, kk - 4, out).is_err());
        assert!(k.linear_epilogue(px, pw, pb, 0, p(&y), rows, kk, out - 4).is_err());
        assert!(k.linear_epilogue(px + 2, pw, pb, 0, p(&y), rows, kk, out).is_err());
        assert!(k.linear_epilogue(px, pw, pb, 0, 0, rows, kk, out).is_err());
    }
}
