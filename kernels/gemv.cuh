// The matrix-vector core of linear, moe_gate_up and moe_down (not an op): R weight rows dotted
// with NT vectors. Each lane holds its spans of the rows, U 16-byte loads per row issued before
// any is used (predicated, not looped), reloaded per span of U * 256 columns unless the caller
// keeps the rows resident in registers (a row of at most U * 256 columns, loaded once by
// load_span for every vector it meets); the NT vectors' loads are issued together too.
#pragma once
#include "common.cuh"

// This lane's part of the span of the rows wp starting at column chunk c0 (a lane's first).
template <int R, int U>
__device__ __forceinline__ void load_span(uint4 (&w)[R][U], const uint4* const (&wp)[R], int c0,
                                          int nc) {
#pragma unroll
  for (int q = 0; q < R; ++q)
#pragma unroll
    for (int i = 0; i < U; ++i) w[q][i] = load_or_zero(wp[q], c0 + 32 * i, nc);
}

// acc[q][t] += row q . vector t over the nc 8-wide column chunks, this lane's part (the caller
// reduces over the warp). xr: CH vector pointers, the first NT used.
template <int R, int U, int NT, int CH>
__device__ __forceinline__ void span_dots(uint4 (&w)[R][U], bool resident,
                                          const uint4* const (&wp)[R], int nc,
                                          const uint4* const (&xr)[CH], float (&acc)[R][CH]) {
  int lane = threadIdx.x & 31;
  for (int c0 = lane; c0 < nc; c0 += 32 * U) {
    if (!resident) load_span(w, wp, c0, nc);
#pragma unroll
    for (int i = 0; i < U; ++i) {
      int c = c0 + 32 * i;
      if (c < nc) {
        uint4 xv[NT];
#pragma unroll
        for (int t = 0; t < NT; ++t) xv[t] = xr[t][c];
#pragma unroll
        for (int t = 0; t < NT; ++t)
#pragma unroll
          for (int q = 0; q < R; ++q) acc[q][t] += dot8(w[q][i], xv[t]);
      }
    }
  }
}
