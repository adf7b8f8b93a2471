// moe_gate_up: first half of the grouped (fused) MoE: for every expert with slots and every
// slot routed to it, act[slot] = silu(gate_proj(x)) * up_proj(x) (DeepseekV2MLP), each
// product rounded to bf16 as the reference's bf16 ops round. The expert's weights are read
// once per block and reused for all of its slots: decode reads only the chosen experts.
// w_gate, w_up: (e_total, inter, h) bf16; x: (rows, h) bf16, slot s belongs to row s / k;
// offsets, list: from moe_plan; act: (n_slots, inter) bf16. h a multiple of 8.
// Grid: (e_total, ceil(inter / 8)) blocks of 256 threads (a warp per intermediate row).
#include "common.cuh"

#define CHUNK 4

extern "C" __global__ void moe_gate_up(const bf16* __restrict__ w_gate, const bf16* __restrict__ w_up,
                                       const bf16* __restrict__ x, const int* __restrict__ offsets,
                                       const int* __restrict__ list, int k, int inter, int h,
                                       bf16* __restrict__ act) {
  int ex = blockIdx.x;
  int beg = offsets[ex], end = offsets[ex + 1];
  if (beg == end) return;
  int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  int row = blockIdx.y * (blockDim.x >> 5) + warp;
  if (row >= inter) return;
  const uint4* wg = reinterpret_cast<const uint4*>(w_gate + ((size_t)ex * inter + row) * h);
  const uint4* wu = reinterpret_cast<const uint4*>(w_up + ((size_t)ex * inter + row) * h);
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
    float ag[CHUNK], au[CHUNK];
#pragma unroll
    for (int t = 0; t < CHUNK; ++t) ag[t] = au[t] = 0.f;
#pragma unroll 4
    for (int c = lane; c < nc; c += 32) {
      uint4 g = wg[c], u = wu[c];
#pragma unroll
      for (int t = 0; t < CHUNK; ++t) {
        uint4 xv = xr[t][c];
        ag[t] += dot8(g, xv);
        au[t] += dot8(u, xv);
      }
    }
#pragma unroll
    for (int t = 0; t < CHUNK; ++t) {
      float gsum = warp_sum(ag[t]), usum = warp_sum(au[t]);
      if (lane == 0 && t < ns) {
        float g = round_bf16(gsum);
        float a = round_bf16(g / (1.f + expf(-g)));
        act[(size_t)sl[t] * inter + row] = f2bf(a * round_bf16(usum));
      }
    }
  }
}
