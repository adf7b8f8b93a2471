//! bf16 GEMMs through cuBLASLt with the bias and the residual add in the GEMM's epilogue:
//! `y = x w^T + bias + res`, f32 accumulation, one rounding to bf16 at the end (torch's
//! `F.linear` on CUDA adds its bias the same way, in cuBLASLt's epilogue). The vision towers'
//! linears without an activation use it ([`crate::model::fast::vision`]): one launch and one
//! pass over the output instead of a GEMM then `bias_act`.
//!
//! Owns: a cuBLASLt handle on the kernels' stream, the plans (descriptors, layouts and the
//! algorithm) per shape, made once and reused, so a call costs one `cublasLtMatmul` on the
//! host; the workspace is the fixed one of [`super::Kernels`], so the calls can be captured in
//! a CUDA graph. The algorithm: the fastest of the heuristic's first [`TUNE_CANDIDATES`], timed
//! on the shape's first call (the vision towers' GEMMs of a few hundred rows are where the
//! heuristic's first guess is weakest); `OCR_PATCH_LT_TUNE=N` times its first N instead, `0`
//! takes its first guess.
//! Reference: candle's matmul, the bias and the residual added in f32 (the test in
//! `kernels/mod.rs`).

use std::collections::HashMap;
use std::ffi::c_void;
use std::mem::size_of;
use std::sync::Mutex;

use candle_core::cuda_backend::cudarc;
use candle_core::Result;
use cudarc::cublaslt::{result as lt, sys};
use cudarc::driver::CudaStream;

/// How many of the heuristic's algorithms a plan times by default (the heuristic's order is kept
/// for ties); `OCR_PATCH_LT_TUNE` changes it (at most [`TUNE_MAX`]).
pub const TUNE_CANDIDATES: usize = 32;
/// The most candidates `OCR_PATCH_LT_TUNE` may ask for.
pub const TUNE_MAX: usize = 128;
/// A candidate's untimed runs, then its timed runs (one host clock around them: the vision
/// towers' GEMMs of 10-20 us need 20 for the choice to hold from one start to the next; with 5,
/// two starts picked kernels 20% apart for CLIP's fc2).
const TUNE_WARM: usize = 3;
const TUNE_REPS: usize = 20;

use super::cuda_err;

/// What a plan is made for: the shape, which epilogue inputs it takes, and whether every
/// address is 256-byte aligned (cuBLASLt's default assumption; 16 bytes otherwise).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct PlanKey {
    rows: usize,
    k: usize,
    n: usize,
    bias: bool,
    residual: bool,
    aligned: bool,
}

/// The descriptors of one [`PlanKey`] and the algorithm cuBLASLt's heuristic chose for it.
struct Plan {
    desc: sys::cublasLtMatmulDesc_t,
    /// `w` as A, `x` as B, the output (and the residual) as C and D.
    layouts: [sys::cublasLtMatrixLayout_t; 3],
    algo: sys::cublasLtMatmulAlgo_t,
}

impl Drop for Plan {
    fn drop(&mut self) {
        // SAFETY: made by `Lt::plan`, used by no call in flight on the host (the lock)
        unsafe {
            let _ = lt::destroy_matmul_desc(self.desc);
            for l in self.layouts {
                let _ = lt::destroy_matrix_layout(l);
            }
        }
    }
}

/// A cuBLASLt handle and its plans (see the module doc).
pub struct Lt {
    handle: sys::cublasLtHandle_t,
    workspace: u64,
    workspace_len: usize,
    /// How many of the heuristic's candidates to time (1: its first guess, untimed; see the
    /// module doc).
    tune: usize,
    /// Held across a call: a plan's descriptor carries the bias address of the call.
    plans: Mutex<HashMap<PlanKey, Plan>>,
}

// SAFETY: the handle is used under `plans`' lock only; cuBLASLt handles may move between
// threads
unsafe impl Send for Lt {}
unsafe impl Sync for Lt {}

impl Drop for Lt {
    fn drop(&mut self) {
        self.plans.get_mut().unwrap_or_else(|p| p.into_inner()).clear();
        // SAFETY: no plan is left and no call is in flight on the host
        let _ = unsafe { lt::destroy_handle(self.handle) };
    }
}

/// One matmul-descriptor attribute set from a plain value.
unsafe fn set_desc<T>(desc: sys::cublasLtMatmulDesc_t, attr: sys::cublasLtMatmulDescAttributes_t, v: &T) -> Result<()> {
    unsafe { lt::set_matmul_desc_attribute(desc, attr, v as *const T as *const c_void, size_of::<T>()) }
        .map_err(cuda_err)
}

impl Lt {
    /// A handle whose calls use `workspace` (`workspace_len` bytes, 256-byte aligned), which
    /// must outlive it and be used by nothing else on another stream.
    pub fn new(workspace: u64, workspace_len: usize) -> Result<Self> {
        Ok(Self {
            handle: lt::create_handle().map_err(cuda_err)?,
            workspace,
            workspace_len,
            tune: match std::env::var("OCR_PATCH_LT_TUNE") {
                Ok(v) => v.trim().parse::<usize>().map(|n| n.clamp(1, TUNE_MAX)).unwrap_or(TUNE_CANDIDATES),
                Err(_) => TUNE_CANDIDATES,
            },
            plans: Mutex::default(),
        })
    }

    /// Row-major `y (rows, n) = x (rows, k) . w (n, k)^T + bias (n) + res (rows, n)` on
    /// `stream`, bf16 in and out, the sum in f32 and rounded once; `bias` and `res` are
    /// optional (0 = none); `res` may be `y` (in place). Addresses 16-byte aligned, `k` and
    /// `n` multiples of 8.
    #[allow(clippy::too_many_arguments)]
    pub fn linear(
        &self,
        stream: &CudaStream,
        (x, w, bias, res, y): (u64, u64, u64, u64, u64),
        rows: usize,
        k: usize,
        n: usize,
    ) -> Result<()> {
        if rows == 0 {
            return Ok(());
        }
        if k % 8 != 0 || n % 8 != 0 {
            candle_core::bail!("cublasLt linear: k = {k} and n = {n} must be multiples of 8");
        }
        let addrs = [x, w, bias, res, y];
        if addrs.iter().any(|a| a % 16 != 0) || x == 0 || w == 0 || y == 0 {
            candle_core::bail!("cublasLt linear: x, w and y must be set and every address 16-byte aligned");
        }
        let key = PlanKey {
            rows,
            k,
            n,
            bias: bias != 0,
            residual: res != 0,
            aligned: addrs.iter().all(|a| a % 256 == 0),
        };
        let mut plans = self.plans.lock().unwrap_or_else(|p| p.into_inner());
        let plan = match plans.entry(key) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => e.insert(self.plan(key, stream, (x, w, bias))?),
        };
        let c = if key.residual { res } else { y };
        self.enqueue(plan, key, stream, (x, w, bias, c, y))
    }

    /// One `cublasLtMatmul` of `plan` (its algorithm) on `stream`: `y = x w^T (+ bias) (+ c)`.
    fn enqueue(&self, plan: &Plan, key: PlanKey, stream: &CudaStream, (x, w, bias, c, y): (u64, u64, u64, u64, u64)) -> Result<()> {
        if key.bias {
            // SAFETY: the descriptor is this plan's, under the lock until the call is queued
            unsafe { set_desc(plan.desc, sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias)? };
        }
        let (alpha, beta) = (1f32, if key.residual { 1f32 } else { 0f32 });
        let [la, lb, lc] = plan.layouts;
        // SAFETY: the layouts describe the caller's buffers (its contract), the workspace is
        // ours for the stream's lifetime
        unsafe {
            lt::matmul(
                self.handle,
                plan.desc,
                &alpha as *const f32 as *const c_void,
                &beta as *const f32 as *const c_void,
                w as *const c_void,
                la,
                x as *const c_void,
                lb,
                c as *const c_void,
                lc,
                y as *mut c_void,
                lc,
                &plan.algo,
                self.workspace as *mut c_void,
                self.workspace_len,
                stream.cu_stream() as sys::cudaStream_t,
            )
        }
        .map_err(cuda_err)
    }

    /// The fastest of `found` for `plan` (its algorithm set to it): each run [`TUNE_WARM`] + [`TUNE_REPS`] times on the
    /// caller's `x`, `w` and `bias` into a scratch output (the residual read from it too), the
    /// stream synchronised around each. `found[0]` (the heuristic's choice) when the stream is
    /// being captured or the scratch cannot be had.
    fn fastest(&self, plan: &mut Plan, key: PlanKey, stream: &CudaStream, (x, w, bias): (u64, u64, u64), found: &[sys::cublasLtMatmulAlgo_t]) -> Result<()> {
        use cudarc::driver::{result as drv, sys as dsys};
        plan.algo = found[0];
        let cu = stream.cu_stream();
        // SAFETY: the stream is alive (the caller's)
        let capturing = unsafe { drv::stream::is_capturing(cu) }.map_err(cuda_err)?;
        if self.tune < 2 || found.len() < 2 || capturing != dsys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE {
            return Ok(());
        }
        // SAFETY: a fresh allocation, freed below after the stream is idle
        let Ok(scratch) = (unsafe { drv::malloc_sync(key.rows * key.n * 2) }) else { return Ok(()) };
        let mut best: Option<(std::time::Duration, sys::cublasLtMatmulAlgo_t)> = None;
        let mut refused = None;
        for &algo in found {
            plan.algo = algo;
            let run = |reps: usize| -> Result<std::time::Duration> {
                // SAFETY: the stream is alive
                unsafe { drv::stream::synchronize(cu) }.map_err(cuda_err)?;
                let t0 = std::time::Instant::now();
                for _ in 0..reps {
                    self.enqueue(plan, key, stream, (x, w, bias, scratch, scratch))?;
                }
                // SAFETY: as above
                unsafe { drv::stream::synchronize(cu) }.map_err(cuda_err)?;
                Ok(t0.elapsed())
            };
            // an algorithm cuBLASLt refuses at the launch is skipped
            match run(TUNE_WARM).and_then(|_| run(TUNE_REPS)) {
                Ok(t) if best.map_or(true, |(b, _)| t < b) => best = Some((t, algo)),
                Ok(_) => {}
                Err(e) => refused = Some(e),
            }
        }
        // SAFETY: the stream was synchronised after the last use
        unsafe {
            let _ = drv::stream::synchronize(cu);
            let _ = drv::free_sync(scratch);
        }
        match (best, refused) {
            (Some((_, algo)), _) => {
                plan.algo = algo;
                Ok(())
            }
            (None, Some(e)) => Err(e),
            (None, None) => Ok(()),
        }
    }

    /// The descriptors of `key` and its algorithm: the fastest of the heuristic's first
    /// [`TUNE_CANDIDATES`] on the caller's inputs ([`Self::fastest`]). Column-major, as cuBLASLt
    /// sees it: `y^T (n, rows) = w (n, k) . x^T (k, rows)`: A = `w` stored `(k, n)` and
    /// transposed, B = `x` stored `(k, rows)`, C = D = `y` stored `(n, rows)`; the bias runs
    /// along D's rows, one per output feature.
    fn plan(&self, key: PlanKey, stream: &CudaStream, inputs: (u64, u64, u64)) -> Result<Plan> {
        use sys::cublasLtMatmulDescAttributes_t as D;
        let bf16 = sys::cudaDataType_t::CUDA_R_16BF;
        let (rows, k, n) = (key.rows as u64, key.k as u64, key.n as u64);
        let desc = lt::create_matmul_desc(sys::cublasComputeType_t::CUBLAS_COMPUTE_32F, sys::cudaDataType_t::CUDA_R_32F)
            .map_err(cuda_err)?;
        // the plan owns what is made from here on (its Drop frees them on an error)
        let mut plan = Plan { desc, layouts: [std::ptr::null_mut(); 3], algo: sys::cublasLtMatmulAlgo_t { data: [0; 8] } };
        plan.layouts = [
            lt::create_matrix_layout(bf16, k, n, key.k as i64).map_err(cuda_err)?,
            lt::create_matrix_layout(bf16, k, rows, key.k as i64).map_err(cuda_err)?,
            lt::create_matrix_layout(bf16, n, rows, key.n as i64).map_err(cuda_err)?,
        ];
        let epilogue = if key.bias {
            sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BIAS
        } else {
            sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_DEFAULT
        };
        // SAFETY: the descriptor was just made; each value has the attribute's type
        unsafe {
            // cublasOperation_t: CUBLAS_OP_N = 0, CUBLAS_OP_T = 1
            set_desc(desc, D::CUBLASLT_MATMUL_DESC_TRANSA, &1i32)?;
            set_desc(desc, D::CUBLASLT_MATMUL_DESC_TRANSB, &0i32)?;
            set_desc(desc, D::CUBLASLT_MATMUL_DESC_EPILOGUE, &(epilogue as u32))?;
        }
        let pref = lt::create_matmul_pref().map_err(cuda_err)?;
        let found = (|| -> Result<Vec<sys::cublasLtMatmulAlgo_t>> {
            use sys::cublasLtMatmulPreferenceAttributes_t as P;
            let set = |attr: P, v: *const c_void, len: usize| {
                // SAFETY: the preference was just made; `v` points at `len` bytes
                unsafe { lt::set_matmul_pref_attribute(pref, attr, v, len) }.map_err(cuda_err)
            };
            let ws = self.workspace_len as u64;
            set(P::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws as *const u64 as *const c_void, 8)?;
            let align: u32 = if key.aligned { 256 } else { 16 };
            for attr in [
                P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES,
                P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
                P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES,
                P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES,
            ] {
                set(attr, &align as *const u32 as *const c_void, 4)?;
            }
            let [la, lb, lc] = plan.layouts;
            let mut results = [sys::cublasLtMatmulHeuristicResult_t {
                algo: sys::cublasLtMatmulAlgo_t { data: [0; 8] },
                workspaceSize: 0,
                state: sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS,
                wavesCount: 0.0,
                reserved: [0; 4],
            }; TUNE_MAX];
            let mut count = 0;
            // SAFETY: every descriptor is alive; `results` holds TUNE_MAX >= self.tune entries
            // (clamped in `new`)
            let status = unsafe {
                sys::cublasLtMatmulAlgoGetHeuristic(self.handle, desc, la, lb, lc, lc, pref, self.tune as i32, results.as_mut_ptr(), &mut count)
            };
            let algos: Vec<_> = results[..count.max(0) as usize]
                .iter()
                .filter(|r| r.state == sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS)
                .map(|r| r.algo)
                .collect();
            if status != sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS || algos.is_empty() {
                candle_core::bail!(
                    "cublasLt linear: no algorithm for ({rows} x {k}) . ({n} x {k})^T (bias {}, residual {}): {status:?}",
                    key.bias, key.residual
                );
            }
            Ok(algos)
        })();
        // SAFETY: made above, used by nothing else
        let _ = unsafe { lt::destroy_matmul_pref(pref) };
        self.fastest(&mut plan, key, stream, inputs, &found?)?;
        Ok(plan)
    }
}
