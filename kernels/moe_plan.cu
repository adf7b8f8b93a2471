// moe_plan: groups the slots by expert, on the device (no host round-trip): offsets[x] ..
// offsets[x+1] index the slots of expert x in `list` (any order within an expert; every slot's
// output is computed on its own, so the result does not depend on it); active[0..n_active)
// are the experts that have slots, in id order (the grouped kernels' blocks serve only them).
// slot_expert: (n_slots) i32 in 0..e_total; offsets: (e_total + 1) i32; list: (n_slots) i32;
// active: (e_total) i32; n_active: (1) i32.
// Grid: 1 block of 1024 threads; dynamic shared memory e_total ints.
#include "common.cuh"

extern "C" __global__ void moe_plan(const int* __restrict__ slot_expert, int n_slots, int e_total,
                                    int* __restrict__ offsets, int* __restrict__ list,
                                    int* __restrict__ active, int* __restrict__ n_active) {
  extern __shared__ int cnt[];
  for (int x = threadIdx.x; x < e_total; x += blockDim.x) cnt[x] = 0;
  __syncthreads();
  for (int s = threadIdx.x; s < n_slots; s += blockDim.x) atomicAdd(&cnt[slot_expert[s]], 1);
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
    int p = atomicAdd(&cnt[slot_expert[s]], 1);
    list[p] = s;
  }
}
