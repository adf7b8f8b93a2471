// moe_plan: groups the slots by expert, on the device (no host round-trip): offsets[x] ..
// offsets[x+1] index the slots of expert x in `list` (any order within an expert; every slot's
// output is computed on its own, so the result does not depend on it); active[0..n_active)
// are the experts that have slots, in id order (the grouped kernels' blocks serve only them).
// Routed layers plan inside moe_route (same code, moe_plan.cuh); this kernel serves the
// layers whose slots are fixed (the dense MLP).
// slot_expert: (n_slots) i32 in 0..e_total; offsets: (e_total + 1) i32; list: (n_slots) i32;
// active: (e_total) i32; n_active: (1) i32. ready (or null): `rows` added once the inputs are
// complete, for moe_gate_up's fixed experts (as moe_route does).
// Grid: 1 block of 1024 threads; dynamic shared memory e_total ints.
#include "moe_plan.cuh"

extern "C" __global__ void moe_plan(const int* __restrict__ slot_expert, int n_slots, int e_total,
                                    int* __restrict__ offsets, int* __restrict__ list,
                                    int* __restrict__ active, int* __restrict__ n_active,
                                    int rows, int* ready) {
  inputs_ready();
  if (ready) publish(ready, rows);
  extern __shared__ int cnt[];
  plan_slots([=](int s) { return __ldcg(slot_expert + s); }, n_slots, e_total, cnt, offsets, list, active, n_active);
}
