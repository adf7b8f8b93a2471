// linear: y (rows, out) = x (rows, k) . w (out, k)^T in bf16 with f32 accumulation, for the
// decode step's few rows (attention projections), where cuBLAS's GEMM tiles leave HBM
// bandwidth unused. A warp per output row reads that row of w once for every row of x
// (rows taken 4 at a time): each lane first issues all of its loads of a span of U * 256
// columns (8 bf16 per load, predicated), then multiplies, so a warp keeps U loads in flight
// instead of waiting on one at a time; a row that fits one span (k <= U * 256) stays in
// registers for every row of x. k a multiple of 8.
// Grid: ceil(out / 8) blocks of 256 threads.
#include "common.cuh"

#define CHUNK 4
#define U 5

// The dot products of this warp's row of w (wv: this lane's spans, reloaded per span unless
// resident) with NT rows of x at once (their loads issued together), into acc.
template <int NT>
__device__ __forceinline__ void dots(uint4 (&wv)[U], bool resident, const uint4* wr, int nc,
                                     const uint4* const (&xr)[CHUNK], float (&acc)[CHUNK]) {
  int lane = threadIdx.x & 31;
  for (int c0 = lane; c0 < nc; c0 += 32 * U) {
    if (!resident) {
#pragma unroll
      for (int i = 0; i < U; ++i) wv[i] = load_or_zero(wr, c0 + 32 * i, nc);
    }
#pragma unroll
    for (int i = 0; i < U; ++i) {
      int c = c0 + 32 * i;
      if (c < nc) {
        uint4 xv[NT];
#pragma unroll
        for (int t = 0; t < NT; ++t) xv[t] = xr[t][c];
#pragma unroll
        for (int t = 0; t < NT; ++t) acc[t] += dot8(wv[i], xv[t]);
      }
    }
  }
}

extern "C" __global__ void linear(const bf16* __restrict__ x, const bf16* __restrict__ w,
                                  bf16* __restrict__ y, int rows, int k, int out) {
  int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  int o = blockIdx.x * (blockDim.x >> 5) + warp;
  if (o >= out) return;
  const uint4* wr = reinterpret_cast<const uint4*>(w + (size_t)o * k);
  int nc = k / 8;
  bool resident = nc <= 32 * U;  // the whole row in registers, read once for every row of x
  uint4 wv[U];
  if (resident) {
#pragma unroll
    for (int i = 0; i < U; ++i) wv[i] = load_or_zero(wr, lane + 32 * i, nc);
  }
  for (int r0 = 0; r0 < rows; r0 += CHUNK) {
    int nr = min(CHUNK, rows - r0);
    const uint4* xr[CHUNK];
#pragma unroll
    for (int t = 0; t < CHUNK; ++t) xr[t] = reinterpret_cast<const uint4*>(x + (size_t)(r0 + min(t, nr - 1)) * k);
    float acc[CHUNK];
#pragma unroll
    for (int t = 0; t < CHUNK; ++t) acc[t] = 0.f;
    // one row (batch-1 decode) without the others' redundant work
    if (nr == 1) dots<1>(wv, resident, wr, nc, xr, acc);
    else dots<CHUNK>(wv, resident, wr, nc, xr, acc);
#pragma unroll
    for (int t = 0; t < CHUNK; ++t) {
      if (t >= nr) break;
      float v = warp_sum(acc[t]);
      if (lane == 0) y[(size_t)(r0 + t) * out + o] = f2bf(v);
    }
  }
}
