// moe_down: second half of the grouped (fused) MoE: slot_out[slot] = down_proj(act[slot]) of
// the slot's expert, in f32 rounded to bf16 (the expert's bf16 output); the weighted sum over
// a row's slots is done by add_rmsnorm (mode 2), fused with the residual add and the next norm.
// w_down: (e_total, h, inter) bf16; act: (n_slots, inter) bf16; slot_out: (n_slots, h) f32.
// inter a multiple of 8. Grid: (e_total, ceil(h / 8)) blocks of 256 threads (a warp per row).
#include "common.cuh"

#define CHUNK 4

extern "C" __global__ void moe_down(const bf16* __restrict__ w_down, const bf16* __restrict__ act,
                                    const int* __restrict__ offsets, const int* __restrict__ list,
                                    int inter, int h, float* __restrict__ slot_out) {
  int ex = blockIdx.x;
  int beg = offsets[ex], end = offsets[ex + 1];
  if (beg == end) return;
  int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  int row = blockIdx.y * (blockDim.x >> 5) + warp;
  if (row >= h) return;
  const uint4* w = reinterpret_cast<const uint4*>(w_down + ((size_t)ex * h + row) * inter);
  int nc = inter / 8;
  for (int s0 = beg; s0 < end; s0 += CHUNK) {
    int ns = min(CHUNK, end - s0);
    const uint4* ar[CHUNK];
    int sl[CHUNK];
#pragma unroll
    for (int t = 0; t < CHUNK; ++t) {
      sl[t] = list[s0 + min(t, ns - 1)];
      ar[t] = reinterpret_cast<const uint4*>(act + (size_t)sl[t] * inter);
    }
    float acc[CHUNK];
#pragma unroll
    for (int t = 0; t < CHUNK; ++t) acc[t] = 0.f;
#pragma unroll 4
    for (int c = lane; c < nc; c += 32) {
      uint4 wv = w[c];
#pragma unroll
      for (int t = 0; t < CHUNK; ++t) acc[t] += dot8(wv, ar[t][c]);
    }
#pragma unroll
    for (int t = 0; t < CHUNK; ++t) {
      float v = warp_sum(acc[t]);
      if (lane == 0 && t < ns) slot_out[(size_t)sl[t] * h + row] = round_bf16(v);
    }
  }
}
