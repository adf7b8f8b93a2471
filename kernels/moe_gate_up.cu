// moe_gate_up: first half of the grouped (fused) MoE: for every expert with slots and every
// slot routed to it, act[slot] = silu(gate_proj(x)) * up_proj(x) (DeepseekV2MLP), each
// product rounded to bf16 as the reference's bf16 ops round. The expert's weights are read
// once per block and reused for all of its slots: decode reads only the chosen experts.
// A warp per intermediate row: each lane issues all its loads of a span of U * 256 columns
// (both matrices) before using any; when the row fits one span (h <= U * 256) it stays in
// registers for all the expert's slots (w read once from memory), else spans are reloaded per
// 4 slots (CHUNK).
// w_gate, w_up: (e_total, inter, h) bf16; x: (rows, h) bf16, slot s belongs to row s / k;
// offsets, list, active, n_active: from moe_plan; act: (n_slots, inter) bf16. h a multiple of 8.
// The last n_fixed experts (the shared experts' pieces, the dense MLP) have slots in every plan:
// the last n_fixed blocks in x serve them and load their weight rows before the plan is known
// (while moe_route still runs, see inputs_ready); block x < gridDim.x - n_fixed serves the x-th
// routed expert that has slots (active is sorted by id, the fixed ones last).
// Grid: (min(e_total, n_slots), ceil(inter / 8)) blocks of 256 threads.
#include "gemv.cuh"

#define CHUNK 4
#define U 5

extern "C" __global__ void moe_gate_up(const bf16* __restrict__ w_gate, const bf16* __restrict__ w_up,
                                       const bf16* __restrict__ x, const int* __restrict__ offsets,
                                       const int* __restrict__ list, const int* __restrict__ active,
                                       const int* __restrict__ n_active, int k, int inter, int h,
                                       int e_total, int n_fixed, bf16* __restrict__ act) {
  int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  int row = blockIdx.y * (blockDim.x >> 5) + warp;
  if (row >= inter) return;
  int first_fixed = (int)gridDim.x - n_fixed;
  bool fixed = (int)blockIdx.x >= first_fixed;
  int nc = h / 8;
  bool resident = nc <= 32 * U;
  // the row of gate and the row of up, as the two rows of one matrix-vector product
  int ex = e_total - (int)gridDim.x + (int)blockIdx.x;  // a fixed block's expert
  const uint4* wp[2];
  uint4 w[2][U];
  if (fixed) {
    wp[0] = reinterpret_cast<const uint4*>(w_gate + ((size_t)ex * inter + row) * h);
    wp[1] = reinterpret_cast<const uint4*>(w_up + ((size_t)ex * inter + row) * h);
    if (resident) load_span(w, wp, lane, nc);
  }
  inputs_ready();
  if (!fixed) {
    // both loads at once (active has e_total >= gridDim.x entries): one round trip, not two
    ex = active[blockIdx.x];
    if ((int)blockIdx.x >= n_active[0] - n_fixed) return;
    wp[0] = reinterpret_cast<const uint4*>(w_gate + ((size_t)ex * inter + row) * h);
    wp[1] = reinterpret_cast<const uint4*>(w_up + ((size_t)ex * inter + row) * h);
    if (resident) load_span(w, wp, lane, nc);
  }
  int beg = offsets[ex], end = offsets[ex + 1];
  for (int s0 = beg; s0 < end; s0 += CHUNK) {
    int ns = min(CHUNK, end - s0);
    const uint4* xr[CHUNK];
    int sl[CHUNK];
#pragma unroll
    for (int t = 0; t < CHUNK; ++t) {
      sl[t] = list[s0 + min(t, ns - 1)];
      xr[t] = reinterpret_cast<const uint4*>(x + (size_t)(sl[t] / k) * h);
    }
    float acc[2][CHUNK];  // gate, up
#pragma unroll
    for (int t = 0; t < CHUNK; ++t) acc[0][t] = acc[1][t] = 0.f;
    // one slot (decode's usual case) without the others' redundant work
    if (ns == 1) span_dots<2, U, 1>(w, resident, wp, nc, xr, acc);
    else span_dots<2, U, CHUNK>(w, resident, wp, nc, xr, acc);
#pragma unroll
    for (int t = 0; t < CHUNK; ++t) {
      if (t >= ns) break;
      float gsum = warp_sum(acc[0][t]), usum = warp_sum(acc[1][t]);
      if (lane == 0) {
        float gr = round_bf16(gsum);
        float a = round_bf16(gr / (1.f + expf(-gr)));
        act[(size_t)sl[t] * inter + row] = f2bf(a * round_bf16(usum));
      }
    }
  }
}
