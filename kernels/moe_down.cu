// moe_down: second half of the grouped (fused) MoE: slot_out[slot] = down_proj(act[slot]) of
// the slot's expert, in f32 rounded to bf16 (the expert's bf16 output); the weighted sum over
// a row's slots is done by add_rmsnorm (mode 2), fused with the residual add and the next norm.
// w_down: (e_total, h, inter) bf16; act: (n_slots, inter) bf16; slot_out: (n_slots, h) f32;
// offsets, list, active, n_active: from moe_plan. inter a multiple of 8. Launched only right
// after moe_gate_up (Kernels::moe_experts).
// A warp per RPW output rows: each lane issues all its loads of a span of U * 256 columns
// before using any; when a row fits one span (inter <= U * 256, the routed experts) the rows
// stay in registers for all the expert's slots, else spans are reloaded per 4 slots (the dense
// MLP's wide down_proj).
// Grid: (min(e_total, n_slots), ceil(h / (8 * RPW))) blocks of 256 threads.
// moe_down_one: the same where no expert has more than one slot (one row), compiled for that
// alone: 60 registers against 91, 4 blocks per SM against 2.
#include "gemv.cuh"

#define RPW 2
#define U 4

// CHUNK: the slots of an expert taken at a time
template <int CHUNK>
__device__ __forceinline__ void down(const bf16* __restrict__ w_down, const bf16* __restrict__ act,
                                     const int* __restrict__ offsets, const int* __restrict__ list,
                                     const int* __restrict__ active, const int* __restrict__ n_active,
                                     int inter, int h, float* __restrict__ slot_out) {
  // The plan was written two launches back (Kernels::moe_experts launches moe_down right after
  // moe_gate_up, whose blocks let this kernel start only once they have waited for the plan):
  // it is read from L2 (__ldcg: this SM's L1 may hold the previous layer's) and this warp's
  // weight rows are loaded before waiting for act (see inputs_ready).
  int ex = __ldcg(active + blockIdx.x);  // with n_active: one round trip, not two
  if ((int)blockIdx.x >= __ldcg(n_active)) return;
  int beg = __ldcg(offsets + ex), end = __ldcg(offsets + ex + 1);
  int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  int row0 = (blockIdx.y * (blockDim.x >> 5) + warp) * RPW;
  if (row0 >= h) return;
  const uint4* w[RPW];
#pragma unroll
  for (int q = 0; q < RPW; ++q)
    w[q] = reinterpret_cast<const uint4*>(w_down + ((size_t)ex * h + min(row0 + q, h - 1)) * inter);
  int nc = inter / 8;
  bool resident = nc <= 32 * U;
  uint4 wv[RPW][U];
  if (resident) load_span(wv, w, lane, nc);
  inputs_ready();
  for (int s0 = beg; s0 < end; s0 += CHUNK) {
    int ns = min(CHUNK, end - s0);
    const uint4* ar[CHUNK];
    int sl[CHUNK];
#pragma unroll
    for (int t = 0; t < CHUNK; ++t) {
      sl[t] = list[s0 + min(t, ns - 1)];
      ar[t] = reinterpret_cast<const uint4*>(act + (size_t)sl[t] * inter);
    }
    float acc[RPW][CHUNK];
#pragma unroll
    for (int q = 0; q < RPW; ++q)
#pragma unroll
      for (int t = 0; t < CHUNK; ++t) acc[q][t] = 0.f;
    // one slot (decode's usual case) without the others' redundant work
    if (ns == 1) span_dots<RPW, U, 1>(wv, resident, w, nc, ar, acc);
    else span_dots<RPW, U, CHUNK>(wv, resident, w, nc, ar, acc);
#pragma unroll
    for (int t = 0; t < CHUNK; ++t) {
      if (t >= ns) break;
#pragma unroll
      for (int q = 0; q < RPW; ++q) {
        float v = warp_sum(acc[q][t]);
        if (lane == 0 && row0 + q < h) slot_out[(size_t)sl[t] * h + row0 + q] = round_bf16(v);
      }
    }
  }
}

#define DOWN_ARGS                                                                           \
  const bf16 *__restrict__ w_down, const bf16 *__restrict__ act,                            \
      const int *__restrict__ offsets, const int *__restrict__ list,                        \
      const int *__restrict__ active, const int *__restrict__ n_active, int inter, int h,   \
      float *__restrict__ slot_out
#define DOWN_PASS w_down, act, offsets, list, active, n_active, inter, h, slot_out

extern "C" __global__ void moe_down(DOWN_ARGS) { down<4>(DOWN_PASS); }
extern "C" __global__ void __launch_bounds__(256, 4) moe_down_one(DOWN_ARGS) { down<1>(DOWN_PASS); }
