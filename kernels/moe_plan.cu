// moe_plan: groups the slots by expert, on the device (no host round-trip): offsets[x] ..
// offsets[x+1] index the slots of expert x in `list` (any order within an expert; every slot's
// output is computed on its own, so the result does not depend on it).
// slot_expert: (n_slots) i32 in 0..e_total; offsets: (e_total + 1) i32; list: (n_slots) i32.
// Grid: 1 block of 1024 threads; dynamic shared memory e_total ints.
#include "common.cuh"

extern "C" __global__ void moe_plan(const int* __restrict__ slot_expert, int n_slots, int e_total,
                                    int* __restrict__ offsets, int* __restrict__ list) {
  extern __shared__ int cnt[];
  for (int x = threadIdx.x; x < e_total; x += blockDim.x) cnt[x] = 0;
  __syncthreads();
  for (int s = threadIdx.x; s < n_slots; s += blockDim.x) atomicAdd(&cnt[slot_expert[s]], 1);
  __syncthreads();
  if (threadIdx.x == 0) {
    int acc = 0;
    for (int x = 0; x < e_total; ++x) {
      int c = cnt[x];
      offsets[x] = acc;
      cnt[x] = acc;
      acc += c;
    }
    offsets[e_total] = acc;
  }
  __syncthreads();
  for (int s = threadIdx.x; s < n_slots; s += blockDim.x) {
    int p = atomicAdd(&cnt[slot_expert[s]], 1);
    list[p] = s;
  }
}
