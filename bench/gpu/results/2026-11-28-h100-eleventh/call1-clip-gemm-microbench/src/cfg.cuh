#include <cuda_runtime.h>
#include "cutlass/cutlass.h"
#include "cute/tensor.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/gemm/kernel/tile_scheduler.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/epilogue/fusion/operations.hpp"
#include "cutlass/epilogue/thread/activation.h"
#include "cutlass/util/packed_stride.hpp"
using namespace cute;
using bf = cutlass::bfloat16_t;

template <class T> struct QuickGelu {
  static const bool kIsHeavy = true;
  CUTLASS_HOST_DEVICE T operator()(T const& x) const {
#ifdef __CUDA_ARCH__
    return x / (T(1) + T(__expf(-1.702f * float(x))));
#else
    return x / (T(1) + T(expf(-1.702f * float(x))));
#endif
  }
};
template <class T, int N> struct QuickGelu<cutlass::Array<T, N>> {
  static const bool kIsHeavy = true;
  CUTLASS_HOST_DEVICE cutlass::Array<T, N> operator()(cutlass::Array<T, N> const& v) const {
    cutlass::Array<T, N> y; QuickGelu<T> f;
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < N; ++i) y[i] = f(v[i]);
    return y;
  }
};
template <class T> using Ident = cutlass::epilogue::thread::Identity<T>;

// Swap: the product orientation of cuBLASLt (A = w (n, k), B = x, D = y^T column-major, bias per row)
template <template <class> class Act, class Tile, bool Swap, class Sched>
struct Cfg {
  using LA = cutlass::layout::RowMajor;
  using LB = cutlass::layout::ColumnMajor;
  using LD = std::conditional_t<Swap, cutlass::layout::ColumnMajor, cutlass::layout::RowMajor>;
  using Fusion = std::conditional_t<Swap,
      cutlass::epilogue::fusion::LinCombPerRowBiasEltAct<Act, bf, float, bf, bf, float>,
      cutlass::epilogue::fusion::LinCombPerColBiasEltAct<Act, bf, float, bf, bf, float>>;
  using Cluster = Shape<_1, _1, _1>;
  using Epi = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Tile, Cluster,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float, bf, LD, 8, bf,
      LD, 8, cutlass::epilogue::TmaWarpSpecializedCooperative, Fusion>::CollectiveOp;
  using Main = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, bf, LA, 8, bf,
      LB, 8, float, Tile, Cluster,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename Epi::SharedStorage))>,
      cutlass::gemm::KernelTmaWarpSpecializedCooperative>::CollectiveOp;
  using Kernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, Main, Epi, Sched>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
};

// y (rows, n) = act(x (rows, k) w (n, k)^T + bias) + beta * res; mode: 0 heuristic, 1 data-parallel, 2 stream-K, 3+ split-K(mode-1)
template <class G, bool Swap>
int run_cfg(cudaStream_t s, const void* x, const void* w, const void* bias, const void* res, void* y, int rows, int k, int n,
            int mode, void* ws, size_t wsl) {
  using Gemm = typename G::Gemm;
  using K = typename Gemm::GemmKernel;
  int M = Swap ? n : rows, N = Swap ? rows : n;
  const void* A = Swap ? w : x;
  const void* B = Swap ? x : w;
  auto sa = cutlass::make_cute_packed_stride(typename K::StrideA{}, make_shape(M, k, 1));
  auto sb = cutlass::make_cute_packed_stride(typename K::StrideB{}, make_shape(N, k, 1));
  auto sd = cutlass::make_cute_packed_stride(typename K::StrideD{}, make_shape(M, N, 1));
  auto sc = cutlass::make_cute_packed_stride(typename K::StrideC{}, make_shape(M, N, 1));
  typename Gemm::Arguments args{cutlass::gemm::GemmUniversalMode::kGemm,
                                {M, N, k, 1},
                                {static_cast<const bf*>(A), sa, static_cast<const bf*>(B), sb},
                                {{}, static_cast<const bf*>(res ? res : y), sc, static_cast<bf*>(y), sd}};
  args.epilogue.thread.alpha = 1.f;
  args.epilogue.thread.beta = res ? 1.f : 0.f;
  args.epilogue.thread.bias_ptr = static_cast<const bf*>(bias);
  using DM = cutlass::gemm::kernel::detail::DecompositionMode;
  if (mode == 1) args.scheduler.decomposition_mode = DM::DataParallel;
  else if (mode == 2) args.scheduler.decomposition_mode = DM::StreamK;
  else if (mode >= 3) { args.scheduler.decomposition_mode = DM::SplitK; args.scheduler.splits = mode - 1; }
  Gemm gemm;
  if (gemm.can_implement(args) != cutlass::Status::kSuccess) return 1;
  if (Gemm::get_workspace_size(args) > wsl) return 2;
  if (gemm.initialize(args, ws, s) != cutlass::Status::kSuccess) return 3;
  if (gemm.run(s) != cutlass::Status::kSuccess) return 4;
  return 0;
}
#define DEF(name, ACT, M, N, SWAP) \
  extern "C" int name(void* s, const void* x, const void* w, const void* b, const void* r, void* y, int rows, int k, int n, int mode, void* ws, size_t wsl) { \
    return run_cfg<Cfg<ACT, Shape<Int<M>, Int<N>, _64>, SWAP, cutlass::gemm::StreamKScheduler>, SWAP>((cudaStream_t)s, x, w, b, r, y, rows, k, n, mode, ws, wsl); }
