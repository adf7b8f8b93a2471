// moe_gate_up: first half of the grouped (fused) MoE: for every expert with slots and every
// slot routed to it, act[slot] = silu(gate_proj(x)) * up_proj(x) (DeepseekV2MLP), each
// product rounded to bf16 as the reference's bf16 ops round. The expert's weights are read
// once per block and reused for all of its slots: decode reads only the chosen experts.
// w_gate, w_up: (e_total, inter, h) bf16; x: (rows, h) bf16, slot s belongs to row s / k;
// offsets, list, active, n_active: from moe_plan (block x serves the x-th expert that has
// slots); act: (n_slots, inter) bf16. h a multiple of 8.
// Grid: (min(e_total, n_slots), ceil(inter / (8 * RPW))) blocks of 256 threads (a warp per RPW
// intermediate rows).
#include "common.cuh"

#define CHUNK 4
#define RPW 2

extern "C" __global__ void moe_gate_up(const bf16* __restrict__ w_gate, const bf16* __restrict__ w_up,
                                       const bf16* __restrict__ x, const int* __restrict__ offsets,
                                       const int* __restrict__ list, const int* __restrict__ active,
                                       const int* __restrict__ n_active, int k, int inter, int h,
                                       bf16* __restrict__ act) {
  if ((int)blockIdx.x >= n_active[0]) return;
  int ex = active[blockIdx.x];
  int beg = offsets[ex], end = offsets[ex + 1];
  int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  int row0 = (blockIdx.y * (blockDim.x >> 5) + warp) * RPW;
  if (row0 >= inter) return;
  const uint4* wg[RPW];
  const uint4* wu[RPW];
#pragma unroll
  for (int q = 0; q < RPW; ++q) {
    int row = min(row0 + q, inter - 1);
    wg[q] = reinterpret_cast<const uint4*>(w_gate + ((size_t)ex * inter + row) * h);
    wu[q] = reinterpret_cast<const uint4*>(w_up + ((size_t)ex * inter + row) * h);
  }
  int nc = h / 8;
  for (int s0 = beg; s0 < end; s0 += CHUNK) {
    int ns = min(CHUNK, end - s0);
    const uint4* xr[CHUNK];
    int sl[CHUNK];
#pragma unroll
    for (int t = 0; t < CHUNK; ++t) {
      sl[t] = list[s0 + min(t, ns - 1)];
      xr[t] = reinterpret_cast<const uint4*>(x + (size_t)(sl[t] / k) * h);
    }
    float ag[RPW][CHUNK], au[RPW][CHUNK];
#pragma unroll
    for (int q = 0; q < RPW; ++q)
#pragma unroll
      for (int t = 0; t < CHUNK; ++t) ag[q][t] = au[q][t] = 0.f;
    for (int c = lane; c < nc; c += 32) {
      uint4 g[RPW], u[RPW];
#pragma unroll
      for (int q = 0; q < RPW; ++q) { g[q] = wg[q][c]; u[q] = wu[q][c]; }
#pragma unroll
      for (int t = 0; t < CHUNK; ++t) {
        uint4 xv = xr[t][c];
#pragma unroll
        for (int q = 0; q < RPW; ++q) {
          ag[q][t] += dot8(g[q], xv);
          au[q][t] += dot8(u[q], xv);
        }
      }
    }
#pragma unroll
    for (int q = 0; q < RPW; ++q)
#pragma unroll
      for (int t = 0; t < CHUNK; ++t) {
        float gsum = warp_sum(ag[q][t]), usum = warp_sum(au[q][t]);
        if (lane == 0 && t < ns && row0 + q < inter) {
          float g = round_bf16(gsum);
          float a = round_bf16(g / (1.f + expf(-g)));
          act[(size_t)sl[t] * inter + row0 + q] = f2bf(a * round_bf16(usum));
        }
      }
  }
}
