// The slot grouping of moe_plan as a block-wide device function, for moe_plan.cu and for the
// last block of moe_route.cu (which plans right after routing, saving a launch per layer).
// slot_expert is read through L2 (__ldcg): in moe_route other blocks wrote it in this launch.
// cnt: shared memory of e_total ints. Synchronises the block.
#pragma once
#include "common.cuh"

__device__ __forceinline__ void plan_slots(const int* __restrict__ slot_expert, int n_slots,
                                           int e_total, int* cnt, int* __restrict__ offsets,
                                           int* __restrict__ list, int* __restrict__ active,
                                           int* __restrict__ n_active) {
  for (int x = threadIdx.x; x < e_total; x += blockDim.x) cnt[x] = 0;
  __syncthreads();
  for (int s = threadIdx.x; s < n_slots; s += blockDim.x) atomicAdd(&cnt[__ldcg(slot_expert + s)], 1);
  __syncthreads();
  if (threadIdx.x == 0) {
    int acc = 0, na = 0;
    for (int x = 0; x < e_total; ++x) {
      int c = cnt[x];
      offsets[x] = acc;
      cnt[x] = acc;
      acc += c;
      if (c > 0) active[na++] = x;
    }
    offsets[e_total] = acc;
    n_active[0] = na;
  }
  __syncthreads();
  for (int s = threadIdx.x; s < n_slots; s += blockDim.x) {
    int p = atomicAdd(&cnt[__ldcg(slot_expert + s)], 1);
    list[p] = s;
  }
}
