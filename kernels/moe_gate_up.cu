// moe_gate_up: first half of the grouped (fused) MoE: for every expert with slots and every
// slot routed to it, act[slot] = silu(gate_proj(x)) * up_proj(x) (DeepseekV2MLP), each
// product rounded to bf16 as the reference's bf16 ops round. The expert's weights are read
// once per block and reused for all of its slots: decode reads only the chosen experts.
// A warp per intermediate row: each lane issues all its loads of a span of U * 256 columns
// (both matrices) before using any; when the row fits one span (h <= U * 256) it stays in
// registers for all the expert's slots (w read once from memory), else spans are reloaded per
// 4 slots (CHUNK).
// w_gate, w_up: (e_total, inter, h) bf16; x: (rows, h) bf16, slot s belongs to row s / k;
// offsets, list, active, n_active: from moe_plan (block x serves the x-th expert that has
// slots); act: (n_slots, inter) bf16. h a multiple of 8.
// Grid: (min(e_total, n_slots), ceil(inter / 8)) blocks of 256 threads.
#include "common.cuh"

#define CHUNK 4
#define U 5

// The dot products of one row of gate and up (g, u: this lane's spans, reloaded per span
// unless resident) with NT slots' x rows at once (their loads issued together), into ag, au.
template <int NT>
__device__ __forceinline__ void dots(uint4 (&g)[U], uint4 (&u)[U], bool resident,
                                     const uint4* wg, const uint4* wu, int nc,
                                     const uint4* const (&xr)[CHUNK], float (&ag)[CHUNK],
                                     float (&au)[CHUNK]) {
  int lane = threadIdx.x & 31;
  for (int c0 = lane; c0 < nc; c0 += 32 * U) {
    if (!resident) {
#pragma unroll
      for (int i = 0; i < U; ++i) {
        g[i] = load_or_zero(wg, c0 + 32 * i, nc);
        u[i] = load_or_zero(wu, c0 + 32 * i, nc);
      }
    }
#pragma unroll
    for (int i = 0; i < U; ++i) {
      int c = c0 + 32 * i;
      if (c < nc) {
        uint4 xv[NT];
#pragma unroll
        for (int t = 0; t < NT; ++t) xv[t] = xr[t][c];
#pragma unroll
        for (int t = 0; t < NT; ++t) {
          ag[t] += dot8(g[i], xv[t]);
          au[t] += dot8(u[i], xv[t]);
        }
      }
    }
  }
}

extern "C" __global__ void moe_gate_up(const bf16* __restrict__ w_gate, const bf16* __restrict__ w_up,
                                       const bf16* __restrict__ x, const int* __restrict__ offsets,
                                       const int* __restrict__ list, const int* __restrict__ active,
                                       const int* __restrict__ n_active, int k, int inter, int h,
                                       bf16* __restrict__ act) {
  // both loads at once (active has e_total >= gridDim.x entries): one round trip, not two
  int ex = active[blockIdx.x];
  if ((int)blockIdx.x >= n_active[0]) return;
  int beg = offsets[ex], end = offsets[ex + 1];
  int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  int row = blockIdx.y * (blockDim.x >> 5) + warp;
  if (row >= inter) return;
  const uint4* wg = reinterpret_cast<const uint4*>(w_gate + ((size_t)ex * inter + row) * h);
  const uint4* wu = reinterpret_cast<const uint4*>(w_up + ((size_t)ex * inter + row) * h);
  int nc = h / 8;
  bool resident = nc <= 32 * U;
  uint4 g[U], u[U];
  if (resident) {
#pragma unroll
    for (int i = 0; i < U; ++i) {
      g[i] = load_or_zero(wg, lane + 32 * i, nc);
      u[i] = load_or_zero(wu, lane + 32 * i, nc);
    }
  }
  for (int s0 = beg; s0 < end; s0 += CHUNK) {
    int ns = min(CHUNK, end - s0);
    const uint4* xr[CHUNK];
    int sl[CHUNK];
#pragma unroll
    for (int t = 0; t < CHUNK; ++t) {
      sl[t] = list[s0 + min(t, ns - 1)];
      xr[t] = reinterpret_cast<const uint4*>(x + (size_t)(sl[t] / k) * h);
    }
    float ag[CHUNK], au[CHUNK];
#pragma unroll
    for (int t = 0; t < CHUNK; ++t) ag[t] = au[t] = 0.f;
    // one slot (decode's usual case) without the others' redundant work
    if (ns == 1) dots<1>(g, u, resident, wg, wu, nc, xr, ag, au);
    else dots<CHUNK>(g, u, resident, wg, wu, nc, xr, ag, au);
#pragma unroll
    for (int t = 0; t < CHUNK; ++t) {
      if (t >= ns) break;
      float gsum = warp_sum(ag[t]), usum = warp_sum(au[t]);
      if (lane == 0) {
        float gr = round_bf16(gsum);
        float a = round_bf16(gr / (1.f + expf(-gr)));
        act[(size_t)sl[t] * inter + row] = f2bf(a * round_bf16(usum));
      }
    }
  }
}
