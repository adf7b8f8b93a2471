// linear: y (rows, out) = x (rows, k) . w (out, k)^T in bf16 with f32 accumulation, for the
// decode step's few rows (attention projections), where cuBLAS's GEMM tiles leave HBM
// bandwidth unused. A warp per output row reads that row of w once for every row of x
// (rows taken 4 at a time): each lane first issues all of its loads of a span of U * 256
// columns (8 bf16 per load, predicated), then multiplies, so a warp keeps U loads in flight
// instead of waiting on one at a time; a row that fits one span (k <= U * 256) stays in
// registers for every row of x. k a multiple of 8.
// Grid: ceil(out / 8) blocks of 256 threads.
#include "gemv.cuh"

#define CHUNK 4
#define U 5

extern "C" __global__ void linear(const bf16* __restrict__ x, const bf16* __restrict__ w,
                                  bf16* __restrict__ y, int rows, int k, int out) {
  int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  int o = blockIdx.x * (blockDim.x >> 5) + warp;
  if (o >= out) return;
  const uint4* wr[1] = {reinterpret_cast<const uint4*>(w + (size_t)o * k)};
  int nc = k / 8;
  bool resident = nc <= 32 * U;  // the whole row in registers, read once for every row of x
  uint4 wv[1][U];
  if (resident) load_span(wv, wr, lane, nc);  // before x is ready (see inputs_ready)
  inputs_ready();
  for (int r0 = 0; r0 < rows; r0 += CHUNK) {
    int nr = min(CHUNK, rows - r0);
    const uint4* xr[CHUNK];
#pragma unroll
    for (int t = 0; t < CHUNK; ++t) xr[t] = reinterpret_cast<const uint4*>(x + (size_t)(r0 + min(t, nr - 1)) * k);
    float acc[1][CHUNK];
#pragma unroll
    for (int t = 0; t < CHUNK; ++t) acc[0][t] = 0.f;
    // one row (batch-1 decode) without the others' redundant work
    if (nr == 1) span_dots<1, U, 1>(wv, resident, wr, nc, xr, acc);
    else span_dots<1, U, CHUNK>(wv, resident, wr, nc, xr, acc);
#pragma unroll
    for (int t = 0; t < CHUNK; ++t) {
      if (t >= nr) break;
      float v = warp_sum(acc[0][t]);
      if (lane == 0) y[(size_t)(r0 + t) * out + o] = f2bf(v);
    }
  }
}
