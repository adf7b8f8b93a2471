// linear_gelu: y = GELU(x w^T + bias), GELU with erf (SAM's nn.GELU), in one CUTLASS GEMM whose
// epilogue adds the bias and applies the activation before the one rounding to bf16: SAM's fc1
// without the second pass of `bias_act` over its (rows, 3072) output.
// x: (rows, k) bf16 row-major; w: (n, k) bf16 (nn.Linear's weight, k contiguous); bias: (n) bf16;
// y: (rows, n) bf16. f32 accumulation; k and n multiples of 8, every address 16-byte aligned
// (TMA's), any rows.
// Kernel: CUTLASS 3's Hopper GEMM (TMA loads, wgmma, warp-specialized cooperative schedule,
// persistent tiles of 128 x 256 x 64, cluster 1x1), epilogue LinCombPerColBiasEltAct<GELU>
// (cutlass::epilogue::thread::GELU<float>: 0.5 x (1 + erff(x / sqrt 2)), as bias_act.cu).
// Built by build.rs with the `cutlass` feature (host and device code, sm_90a; CUTLASS's headers
// from the nvidia-cutlass wheel or CUTLASS_DIR), linked into the crate with the static CUDA
// runtime; launched by `Kernels::linear_gelu` (src/model/kernels/cutlass.rs).
#include <cuda_runtime.h>

#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/epilogue/fusion/operations.hpp"
#include "cutlass/epilogue/thread/activation.h"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/util/packed_stride.hpp"

namespace {
using namespace cute;
using bf = cutlass::bfloat16_t;
using Tile = Shape<_128, _256, _64>;
using Cluster = Shape<_1, _1, _1>;
using Fusion = cutlass::epilogue::fusion::LinCombPerColBiasEltAct<cutlass::epilogue::thread::GELU, bf, float, bf, bf, float>;
// no source matrix C (void): y = act(acc + bias)
using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
    cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Tile, Cluster,
    cutlass::epilogue::collective::EpilogueTileAuto, float, float, void, cutlass::layout::RowMajor, 8, bf,
    cutlass::layout::RowMajor, 8, cutlass::epilogue::TmaWarpSpecializedCooperative, Fusion>::CollectiveOp;
// A = x (rows, k) row-major, B = w seen as (k, n) column-major: both k-major ("TN")
using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
    cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, bf, cutlass::layout::RowMajor, 8, bf,
    cutlass::layout::ColumnMajor, 8, float, Tile, Cluster,
    cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
    cutlass::gemm::KernelTmaWarpSpecializedCooperative>::CollectiveOp;
using Kernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, Mainloop, Epilogue>;
using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
}  // namespace

// 0 on success; 1: CUTLASS cannot run this shape or these addresses; 2: the workspace is too
// small; 3: the kernel's setup failed; 4 + the CUDA error: the launch failed.
extern "C" int ocr_linear_gelu(void* stream, const void* x, const void* w, const void* bias, void* y,
                               int rows, int k, int n, void* workspace, size_t workspace_len) {
  auto sa = cutlass::make_cute_packed_stride(Kernel::StrideA{}, make_shape(rows, k, 1));
  auto sb = cutlass::make_cute_packed_stride(Kernel::StrideB{}, make_shape(n, k, 1));
  auto sd = cutlass::make_cute_packed_stride(Kernel::StrideD{}, make_shape(rows, n, 1));
  Gemm::Arguments args{cutlass::gemm::GemmUniversalMode::kGemm,
                       {rows, n, k, 1},
                       {static_cast<const bf*>(x), sa, static_cast<const bf*>(w), sb},
                       {{}, nullptr, sd, static_cast<bf*>(y), sd}};
  args.epilogue.thread.alpha = 1.f;
  args.epilogue.thread.beta = 0.f;
  args.epilogue.thread.bias_ptr = static_cast<const bf*>(bias);
  Gemm gemm;
  if (gemm.can_implement(args) != cutlass::Status::kSuccess) return 1;
  if (Gemm::get_workspace_size(args) > workspace_len) return 2;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (gemm.initialize(args, workspace, s) != cutlass::Status::kSuccess) return 3;
  if (gemm.run(s) != cutlass::Status::kSuccess) {
    cudaError_t e = cudaGetLastError();
    return 4 + static_cast<int>(e);
  }
  return 0;
}
