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
// The last n_fixed experts (the shared experts' pieces, the dense MLP) are slots k - n_fixed ..
// k of every row and need no plan: blocks y < n_fixed (the first to be scheduled) serve them as
// soon as the rows are made. They load their weight rows at once, wait until moe_route (or
// moe_plan), still running, has counted every row into `ready` (wait_count), and work alongside
// the rest of the routing; the last of them resets `ready` (and `fixed_done`, its own counter)
// for the next launch. Blocks y >= n_fixed serve the (y - n_fixed)-th routed expert that has
// slots (active is sorted by id, the fixed ones last), once the plan is complete (inputs_ready).
// Grid: (ceil(inter / 8), min(e_total, n_slots)) blocks of 256 threads.
// moe_gate_up_one: the same where no expert has more than one slot (one row: batch-1 decode),
// compiled for that alone: 76 registers against 120, 3 blocks per SM against 2, so more of the
// chosen experts' rows are in flight at once.
#include "gemv.cuh"

#define U 5

// act of the slots slot_of(i), i in [beg, end), for this warp's row (live: the row exists).
template <int CHUNK, typename SlotOf>
__device__ __forceinline__ void gate_up_slots(uint4 (&w)[2][U], bool resident,
                                              const uint4* const (&wp)[2], int nc, const bf16* x,
                                              int beg, int end, SlotOf slot_of, int k, int inter,
                                              int row, bool live, bf16* act) {
  int lane = threadIdx.x & 31;
  for (int s0 = beg; s0 < end; s0 += CHUNK) {
    int ns = min(CHUNK, end - s0);
    const uint4* xr[CHUNK];
    int sl[CHUNK];
#pragma unroll
    for (int t = 0; t < CHUNK; ++t) {
      sl[t] = slot_of(s0 + min(t, ns - 1));
      xr[t] = reinterpret_cast<const uint4*>(x + (size_t)(sl[t] / k) * nc * 8);
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
      if (lane == 0 && live) {
        float gr = round_bf16(gsum);
        float a = round_bf16(gr / (1.f + expf(-gr)));
        act[(size_t)sl[t] * inter + row] = f2bf(a * round_bf16(usum));
      }
    }
  }
}

// CHUNK: the slots of an expert taken at a time
template <int CHUNK>
__device__ __forceinline__ void gate_up(const bf16* __restrict__ w_gate, const bf16* __restrict__ w_up,
                                        const bf16* __restrict__ x, const int* __restrict__ offsets,
                                        const int* __restrict__ list, const int* __restrict__ active,
                                        const int* __restrict__ n_active, int k, int inter, int h,
                                        int e_total, int n_fixed, int rows, int* ready,
                                        int* fixed_done, bf16* __restrict__ act) {
  int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  int row = blockIdx.x * (blockDim.x >> 5) + warp;
  bool live = row < inter;
  row = min(row, inter - 1);  // a warp past the rows computes the last one, stores nothing
  int nc = h / 8;
  bool resident = nc <= 32 * U;
  // expert ex's row of gate and row of up, as the two rows of one matrix-vector product
  const uint4* wp[2];
  uint4 w[2][U];
  auto load_rows = [&](int ex) {
    wp[0] = reinterpret_cast<const uint4*>(w_gate + ((size_t)ex * inter + row) * h);
    wp[1] = reinterpret_cast<const uint4*>(w_up + ((size_t)ex * inter + row) * h);
    if (resident) load_span(w, wp, lane, nc);
  };
  int f = blockIdx.y;
  if (f < n_fixed) {
    load_rows(e_total - n_fixed + f);
    wait_count(ready, rows);
    gate_up_slots<CHUNK>(w, resident, wp, nc, x, 0, rows, [=](int i) { return i * k + k - n_fixed + f; },
                  k, inter, row, live, act);
    // every block still waits for the routing to finish: moe_down reads its plan before waiting
    inputs_ready();
    if (last_to_arrive(fixed_done, n_fixed * (int)gridDim.x) && threadIdx.x == 0) *ready = 0;
    return;
  }
  if (!live) return;
  inputs_ready();
  // both loads at once (active has e_total >= gridDim.y entries): one round trip, not two
  int ex = active[blockIdx.y - n_fixed];
  if ((int)blockIdx.y >= n_active[0]) return;
  load_rows(ex);
  gate_up_slots<CHUNK>(w, resident, wp, nc, x, offsets[ex], offsets[ex + 1], [=](int i) { return list[i]; },
                       k, inter, row, live, act);
}

#define GATE_UP_ARGS                                                                            \
  const bf16 *__restrict__ w_gate, const bf16 *__restrict__ w_up, const bf16 *__restrict__ x,   \
      const int *__restrict__ offsets, const int *__restrict__ list,                            \
      const int *__restrict__ active, const int *__restrict__ n_active, int k, int inter, int h, \
      int e_total, int n_fixed, int rows, int *ready, int *fixed_done, bf16 *__restrict__ act
#define GATE_UP_PASS \
  w_gate, w_up, x, offsets, list, active, n_active, k, inter, h, e_total, n_fixed, rows, ready, fixed_done, act

extern "C" __global__ void moe_gate_up(GATE_UP_ARGS) { gate_up<4>(GATE_UP_PASS); }
extern "C" __global__ void __launch_bounds__(256, 3) moe_gate_up_one(GATE_UP_ARGS) { gate_up<1>(GATE_UP_PASS); }
