// sam_fmha: SAM's global attention (head dim 64, bf16) on Hopper's wgmma, with the decomposed
// relative-position terms added to the scores before the softmax:
//   out[n, i] = sum_j softmax_j(q[n, i] . k[n, j] * scale + rel_h[n, i, y(j)] + rel_w[n, i, x(j)]) v[n, j]
// (y(j) = j / gw, x(j) = j % gw), rel_h[n, i, ky] = q[n, i] . rh[y(i), ky] and rel_w likewise
// read from the products of q with get_rel_pos's tables (RelPosFusion below).
//
// The kernel is CUTLASS example 88's Hopper FMHA forward (`FmhaKernelTma`: one warpgroup, 64
// queries a block, key tiles loaded by TMA in a 4-stage pipeline, q k^T with both operands in
// shared memory, p v with p from registers, the softmax interleaved with the second product),
// vendored in `fmha/` with its licence (BSD-3-Clause; NVIDIA/cutlass 7107b05,
// examples/88_hopper_fmha). Our changes there are marked `ocr-patch:`: the fusion is an object
// with arguments (here: the products' address) and state (the terms it keeps in registers), it
// runs on every key tile (the example's fusion hook ran on the masked tiles only), 2^x on the
// SFU alone, the LSE not written without its address, the softmax's scale given.
// Grids 64 wide (Base's global blocks, Gundam's global view: key tiles of 128) and 40 wide
// (Gundam's tiles' global blocks: 80), an even number of grid rows: a key tile is two grid
// rows, which RelPosFusion below takes for its terms.
//
// Layouts (elements): q, k, v read where the qkv projection left them, sequence n = (b, head):
// row i of q at q + b * seq_stride + head * 64 + i * row_stride (k and v likewise); out
// (b, t, heads * 64) likewise with out_seq_stride and out_row_stride. Strides multiples of 8
// (TMA's 16 bytes) under 2^31, addresses 16-byte aligned.
#include <cuda_runtime.h>

#include "cutlass/cutlass.h"
#include "cutlass/device_kernel.h"
#include "cutlass/cluster_launch.hpp"

#include "fmha/collective/fmha_collective_tma.hpp"
#include "fmha/collective/fmha_epilogue.hpp"
#include "fmha/kernel/fmha_kernel_tma.hpp"

using namespace cute;
using bf = cutlass::bfloat16_t;

// The relative-position terms as the example's fusion hook, for a grid GW wide in key tiles of
// two grid rows (N = 2 GW keys: t = gh GW is whole tiles for an even gh, so nothing is masked):
// `before_softmax` adds them to each tile's scores, in the scores' unscaled units (the softmax
// multiplies by the scale later). They come from the products of q with get_rel_pos's tables
// (Kernels::sam_rel_products: cuBLAS, rounded to bf16 as the reference's einsums are), row i of
// sequence (b, head) at products + ((head * B + b) * t + i) * (2 gh + 2 GW):
//   [q.rh[0][k] for k < gh | q.rh[gh-1][k] for k < gh | q.rw[0][k] for k < GW | q.rw[GW-1][k] ...]
// The tables are Toeplitz (rh[y][ky] depends on y - ky alone), so rel_h[i][ky] = q_i.rh[y][ky]
// is the first block's column ky - y where ky >= y, else the second's gh - 1 - y + ky (rel_w
// likewise with x). A thread's scores are 2 query rows by N / 4 keys, the first half of its keys
// in the tile's first grid row and the second half at the same x in the second (wgmma's
// accumulator layout: key 8 nb + 2 (lane % 4) + e for its (e, nb)), so its rel_w terms are the
// same in every tile: read once, kept in registers (bw, scaled); rel_h's are two per row and
// tile (as sam_flash_w64 / _w40 in sam_flash.cu).
template <int GW>
struct RelPosFusion {
  static_assert(GW % 8 == 0, "whole 8-key groups in a grid row");
  static constexpr int N = 2 * GW, COLS = N / 4, HALF = COLS / 2;
  struct Params {
    const bf* products;  // (heads, b, t, 2 gh + 2 GW)
    int gh;
    float inv_scale;
  };
  const bf* seq;  // this block's sequence's products
  int gh, ps;
  float inv_scale;
  bool first = true;
  float bw[2][HALF];  // rel_w's terms of the thread's first-row keys (scaled), rows r and r + 8

  template <class BlkCoord, class ProblemShape>
  CUTLASS_DEVICE RelPosFusion(Params const& p, BlkCoord const& blk, ProblemShape const& shape)
      : gh(p.gh), ps(2 * p.gh + 2 * GW), inv_scale(p.inv_scale) {
    const long long n = (long long)get<1>(get<2>(blk)) * get<0>(shape) + get<0>(get<2>(blk));
    seq = p.products + n * get<2>(shape) * ps;
  }

  template <class BlkCoord, class TileShape, class ProblemShape>
  CUTLASS_DEVICE int get_trip_count(BlkCoord const&, TileShape const& tile, ProblemShape const& shape) const {
    return ceil_div(get<3>(shape), get<1>(tile));
  }
  template <class BlkCoord, class TileShape, class ProblemShape>
  CUTLASS_DEVICE int get_masked_trip_count(BlkCoord const&, TileShape const&, ProblemShape const&) const {
    return 0;
  }
  template <class BlkCoord, class TileShape, class ProblemShape>
  CUTLASS_DEVICE int get_unmasked_trip_count(BlkCoord const& blk, TileShape const& tile, ProblemShape const& shape) const {
    return get_trip_count(blk, tile, shape);
  }

  template <bool kMask, class AccQK, class IndexQK, class ProblemShape, class TiledMma>
  CUTLASS_DEVICE void before_softmax(AccQK& acc_qk, IndexQK const& index_qk, ProblemShape const& shape, TiledMma const& mma) {
    Tensor acc = make_tensor(acc_qk.data(), cutlass::fmha::collective::layout_acc_mn(mma, acc_qk.layout()));
    Tensor idx = make_tensor(index_qk.data(), cutlass::fmha::collective::layout_acc_mn(mma, index_qk.layout()));
    static_assert(decltype(size<0>(acc))::value == 2 && decltype(size<1>(acc))::value == COLS, "64 x 2GW tiles, one warpgroup");
    const int t = get<2>(shape);
    CUTLASS_PRAGMA_UNROLL
    for (int r = 0; r < 2; r++) {
      // (queries past t: their rows are not written; the last row's terms)
      const int i = min((int)get<0>(idx(r, 0)), t - 1), y = i / GW, x = i - y * GW;
      const bf* row = seq + (long long)i * ps;
      if (first) {
        CUTLASS_PRAGMA_UNROLL
        for (int j = 0; j < HALF; j++) {
          const int kx = (int)get<1>(idx(r, j)) % N;  // < GW: the first grid row
          bw[r][j] = float(row[2 * gh + (kx >= x ? kx - x : GW + GW - 1 - x + kx)]) * inv_scale;
        }
      }
      // the tile's two grid rows' rel_h
      const int ky0 = (int)get<1>(idx(r, 0)) / N * 2, ky1 = ky0 + 1;
      const float h0 = float(row[ky0 >= y ? ky0 - y : gh + gh - 1 - y + ky0]) * inv_scale;
      const float h1 = float(row[ky1 >= y ? ky1 - y : gh + gh - 1 - y + ky1]) * inv_scale;
      CUTLASS_PRAGMA_UNROLL
      for (int j = 0; j < COLS; j++) acc(r, j) += (j < HALF ? h0 : h1) + bw[r][j % HALF];
    }
    first = false;
  }
};

template <int GW>
struct Fmha {
  using TileShape = Shape<_64, Int<2 * GW>, _64>;
  using Mainloop = cutlass::fmha::collective::FmhaMainloopTma<bf, float, TileShape, RelPosFusion<GW>>;
  using Epilogue = cutlass::fmha::collective::FmhaFwdEpilogue<bf, float, typename Mainloop::TileShapePV>;
  using Kernel = cutlass::fmha::kernel::FmhaKernelTma<Mainloop, Epilogue>;

  static int run(cudaStream_t stream, const bf* q, const bf* k, const bf* v, bf* out, const bf* products, int b,
                 int heads, int t, int gh, float scale, int seq_stride, int row_stride, int out_seq_stride,
                 int out_row_stride) {
    using Stride = cute::tuple<int, _1, cute::tuple<int, int>>;  // row, head dim, (batch, head)
    Stride sin = make_stride(row_stride, _1{}, make_stride(seq_stride, 64));
    Stride sout = make_stride(out_row_stride, _1{}, make_stride(out_seq_stride, 64));
    typename Kernel::Arguments args{{b, heads, t, t, 64},
                                    {q, sin, k, sin, v, sin, {products, gh, 1.f / scale}, scale},
                                    {out, sout, nullptr, {}},
                                    {}};
    if (!Kernel::can_implement(args)) return 1;
    typename Kernel::Params params = Kernel::to_underlying_arguments(args, nullptr);
    // (set at every call: the attribute is the current device's)
    const int smem = Kernel::SharedStorageSize;
    if (cudaFuncSetAttribute(cutlass::device_kernel<Kernel>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem) != cudaSuccess) {
      (void)cudaGetLastError();
      return 2;
    }
    cutlass::device_kernel<Kernel><<<Kernel::get_grid_shape(params), Kernel::get_block_shape(), smem, stream>>>(params);
    cudaError_t e = cudaGetLastError();
    return e == cudaSuccess ? 0 : 4 + (int)e;
  }
};

// 0 on success; 1: the shape or layout cannot be taken (grids 64 or 40 wide with an even
// height, strides multiples of 8 under 2^31), 2: the shared memory cannot be set, 4 + e: the
// launch failed with CUDA runtime error e.
extern "C" int ocr_sam_fmha(void* stream, const void* q, const void* k, const void* v, void* out,
                            const void* products, int b, int heads, int t, int gh, int gw, float scale,
                            long long seq_stride, long long row_stride, long long out_seq_stride,
                            long long out_row_stride) {
  const long long strides[4] = {seq_stride, row_stride, out_seq_stride, out_row_stride};
  for (long long st : strides)
    if (st <= 0 || st % 8 != 0 || st > INT32_MAX) return 1;
  if (b <= 0 || heads <= 0 || gh <= 0 || gh % 2 != 0 || (long long)gh * gw != t) return 1;
  auto go = [&](auto fmha) {
    using F = decltype(fmha);
    return F::run(static_cast<cudaStream_t>(stream), static_cast<const bf*>(q), static_cast<const bf*>(k),
                  static_cast<const bf*>(v), static_cast<bf*>(out), static_cast<const bf*>(products), b, heads, t, gh,
                  scale, (int)seq_stride, (int)row_stride, (int)out_seq_stride, (int)out_row_stride);
  };
  switch (gw) {
    case 64: return go(Fmha<64>{});
    case 40: return go(Fmha<40>{});
    default: return 1;
  }
}
