// The slot grouping of moe_plan as a block-wide device function, for moe_plan.cu and for the
// last block of moe_route.cu (which plans right after routing, saving a launch per layer).
// slot_of(s): slot s's expert (moe_plan and moe_route's rows read slot_expert through L2 with
// __ldcg, as other blocks wrote it in the same launch; one routed row, from shared memory).
// cnt: shared memory of e_total ints. Synchronises the block.
#pragma once
#include "common.cuh"

// The plan of one row's k slots, whose experts sel[0..k) are distinct (shared memory): what
// plan_slots makes of them (each expert one slot), at once: a thread per expert counts the
// slots below it (offsets), a thread per slot its expert's rank among them (active, list).
__device__ __forceinline__ void plan_row(const int* sel, int k, int e_total, int* __restrict__ offsets,
                                         int* __restrict__ list, int* __restrict__ active,
                                         int* __restrict__ n_active) {
  for (int x = threadIdx.x; x <= e_total; x += blockDim.x) {
    int below = 0;
    for (int j = 0; j < k; ++j) below += sel[j] < x;
    offsets[x] = below;
  }
  for (int j = threadIdx.x; j < k; j += blockDim.x) {
    int rank = 0;
    for (int i = 0; i < k; ++i) rank += sel[i] < sel[j];
    active[rank] = sel[j];
    list[rank] = j;
  }
  if (threadIdx.x == 0) n_active[0] = k;
}

template <typename SlotOf>
__device__ __forceinline__ void plan_slots(SlotOf slot_of, int n_slots,
                                           int e_total, int* cnt, int* __restrict__ offsets,
                                           int* __restrict__ list, int* __restrict__ active,
                                           int* __restrict__ n_active) {
  for (int x = threadIdx.x; x < e_total; x += blockDim.x) cnt[x] = 0;
  __syncthreads();
  for (int s = threadIdx.x; s < n_slots; s += blockDim.x) atomicAdd(&cnt[slot_of(s)], 1);
  __syncthreads();
  // offsets = exclusive prefix sum of the counts, active = the experts with slots: warp 0,
  // 32 experts per round (shuffle scan, ballot for the active list)
  if (threadIdx.x < 32) {
    int lane = threadIdx.x, base = 0, na = 0;
    for (int x0 = 0; x0 < e_total; x0 += 32) {
      int x = x0 + lane;
      int c = x < e_total ? cnt[x] : 0;
      int inc = c;
#pragma unroll
      for (int o = 1; o < 32; o <<= 1) {
        int y = __shfl_up_sync(0xffffffffu, inc, o);
        if (lane >= o) inc += y;
      }
      unsigned has = __ballot_sync(0xffffffffu, c > 0);
      if (x < e_total) {
        offsets[x] = base + inc - c;
        cnt[x] = base + inc - c;
        if (c > 0) active[na + __popc(has & ((1u << lane) - 1u))] = x;
      }
      base += __shfl_sync(0xffffffffu, inc, 31);
      na += __popc(has);
    }
    if (lane == 0) {
      offsets[e_total] = base;
      n_active[0] = na;
    }
  }
  __syncthreads();
  for (int s = threadIdx.x; s < n_slots; s += blockDim.x) {
    int p = atomicAdd(&cnt[slot_of(s)], 1);
    list[p] = s;
  }
}
