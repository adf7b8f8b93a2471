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
    fn traced_modules(&self) -> [(&'static str, &CudaFunction); 11] {
        [
            ("embed", &self.embed),
            ("add_rmsnorm", &self.add_rmsnorm),
            ("norm_linear", &self.norm_linear[0]),
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

    /// The probes' slots of every decoder module, looked up once, to reset and read step by
    /// step ([`Tracer`]).
    pub fn tracer(&self) -> Result<Tracer<'_>> {
        let slots = self
            .traced_modules()
            .into_iter()
            .map(|(kernel, f)| Ok((kernel, self.trace_slots(f)?)))
            .collect::<Result<_>>()?;
        let empty = (0..SLOTS)
            .flat_map(|_| [0, u64::MAX, 0, u64::MAX, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0])
            .collect();
        Ok(Tracer {
            k: self,
            slots,
            empty,
        })
    }
}

/// The kernels' probe slots (device addresses, one array per module) and what empties them.
pub struct Tracer<'a> {
    k: &'a Kernels,
    slots: Vec<(&'static str, u64)>,
    /// Every slot empty: mins at the top, the rest zero.
    empty: Vec<u64>,
}

impl Tracer<'_> {
    /// Empties every module's slots (synchronises the stream).
    pub fn reset(&self) -> Result<()> {
        let st = &self.k.stream;
        for &(_, p) in &self.slots {
            // SAFETY: p is the module's global of exactly this size (checked by trace_slots)
            unsafe { cudarc::driver::result::memcpy_htod_async(p, &self.empty, st.cu_stream()) }
                .map_err(cuda_err)?;
        }
        st.synchronize().map_err(cuda_err)
    }

    /// The launches recorded since [`Self::reset`], in launch order (synchronises).
    pub fn take(&self) -> Result<Vec<Launch>> {
        let st = &self.k.stream;
        let mut v = vec![0u64; SLOTS * FIELDS * self.slots.len()];
        for (chunk, &(_, p)) in v.chunks_mut(SLOTS * FIELDS).zip(&self.slots) {
            // SAFETY: as in reset
            unsafe { cudarc::driver::result::memcpy_dtoh_async(chunk, p, st.cu_stream()) }
                .map_err(cuda_err)?;
        }
        st.synchronize().map_err(cuda_err)?;
        let mut out: Vec<Launch> = v
            .chunks(SLOTS * FIELDS)
            .zip(&self.slots)
            .flat_map(|(module, &(kernel, _))| {
                module
                    .chunks(FIELDS)
                    .filter(|s| s[5] > 0)
                    .map(move |s| Launch {
                        kernel,
                        grid: s[0],
                        blocks: s[6],
                        seen: s[5],
                        first_arrival: s[1],
                        last_arrival: s[2],
                        first_release: s[3],
                        last_release: s[4],
                        marks: s[7..15].try_into().expect("8 marks"),
                    })
            })
            .collect();
        out.sort_by_key(|l| l.grid);
        Ok(out)
    }
}
