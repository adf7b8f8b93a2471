//! The decode step's timeline as the GPU runs it (in the CUDA graph, launches overlapping under
//! programmatic dependent launch), which a profiler that serialises kernels (ncu) cannot show
//! and nsys is not at hand for: `ocr-patch bench --profile trace`.
//!
//! With `OCR_PATCH_KERNEL_TRACE=1`, [`Kernels::load`] loads the kernels built with
//! `-DOCR_TRACE` (`build.rs` compiles both): thread 0 of every block that reaches
//! `inputs_ready` folds two times of the GPU's nanosecond clock into its launch's slot of its
//! module's `ocr_trace` (`kernels/common.cuh`): when it got there (its weight loads issued)
//! and when the wait let it through (every earlier kernel had finished and its writes were
//! visible). Owns reading and resetting those slots; the bench (`crate::bench::rust`) turns
//! them into the step's timeline.

use candle_core::Result;
use cudarc::driver::{sys, CudaFunction};

use super::{cuda_err, Kernels};
pub use crate::bench::timeline::Launch;
use candle_core::cuda_backend::cudarc;

/// Slots per module (`OCR_TRACE_SLOTS` in `common.cuh`): launches are told apart by their grid
/// id modulo this, so a trace holds at most this many launches.
pub const SLOTS: usize = 8192;
/// u64 fields per slot: grid id, first and last arrival, first and last release, blocks seen,
/// blocks launched, the 8 marks.
const FIELDS: usize = 15;

impl Kernels {
    /// The decoder kernels' modules (each `ocr_trace` once).
    fn traced_modules(&self) -> [(&'static str, &CudaFunction); 10] {
        [
            ("embed", &self.embed),
            ("add_rmsnorm", &self.add_rmsnorm),
            ("rope_kv", &self.rope_kv),
            ("decode_attn", &self.decode_attn),
            ("moe_route", &self.moe_route),
            ("moe_plan", &self.moe_plan),
            ("moe_gate_up", &self.moe_gate_up),
            ("moe_down", &self.moe_down),
            ("greedy_next", &self.greedy_next),
            ("linear", &self.linear_rows),
        ]
    }

    /// Address of the module's `ocr_trace` slots.
    fn trace_slots(&self, f: &CudaFunction) -> Result<u64> {
        if !self.traced {
            candle_core::bail!(
                "the kernels carry no probes: load them with OCR_PATCH_KERNEL_TRACE=1"
            );
        }
        self.stream.context().bind_to_thread().map_err(cuda_err)?;
        let mut module: sys::CUmodule = std::ptr::null_mut();
        let mut ptr: sys::CUdeviceptr = 0;
        let mut bytes = 0usize;
        // SAFETY: out-pointers to locals; the function is loaded and outlives the calls
        unsafe {
            sys::cuFuncGetModule(&mut module, f.cu_function())
                .result()
                .map_err(cuda_err)?;
            sys::cuModuleGetGlobal_v2(&mut ptr, &mut bytes, module, c"ocr_trace".as_ptr())
                .result()
                .map_err(cuda_err)?;
        }
        if bytes != SLOTS * FIELDS * 8 {
            candle_core::bail!(
                "ocr_trace holds {bytes} bytes, expected {}",
                SLOTS * FIELDS * 8
            );
        }
        Ok(ptr)
    }

    /// Empties every module's slots (synchronises the stream).
    pub fn trace_reset(&self) -> Result<()> {
        let empty: Vec<u64> = (0..SLOTS)
            .flat_map(|_| [0, u64::MAX, 0, u64::MAX, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0])
            .collect();
        for (_, f) in self.traced_modules() {
            let p = self.trace_slots(f)?;
            // SAFETY: p is the module's global of exactly this size (checked)
            unsafe {
                cudarc::driver::result::memcpy_htod_async(p, &empty, self.stream.cu_stream())
            }
            .map_err(cuda_err)?;
        }
        self.stream.synchronize().map_err(cuda_err)
    }

    /// The launches recorded since [`Self::trace_reset`], in launch order (synchronises).
    pub fn trace_take(&self) -> Result<Vec<Launch>> {
        self.stream.synchronize().map_err(cuda_err)?;
        let mut out = Vec::new();
        for (kernel, f) in self.traced_modules() {
            let p = self.trace_slots(f)?;
            let mut v = vec![0u64; SLOTS * FIELDS];
            // SAFETY: as in trace_reset
            unsafe {
                cudarc::driver::result::memcpy_dtoh_async(&mut v, p, self.stream.cu_stream())
            }
            .map_err(cuda_err)?;
            self.stream.synchronize().map_err(cuda_err)?;
            out.extend(v.chunks(FIELDS).filter(|s| s[5] > 0).map(|s| Launch {
                kernel,
                grid: s[0],
                blocks: s[6],
                seen: s[5],
                first_arrival: s[1],
                last_arrival: s[2],
                first_release: s[3],
                last_release: s[4],
                marks: s[7..15].try_into().expect("8 marks"),
            }));
        }
        out.sort_by_key(|l| l.grid);
        Ok(out)
    }
}
