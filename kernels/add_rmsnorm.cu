// add_rmsnorm: the residual add fused with the next DeepseekV2RMSNorm.
//   mode 0: x = resid                                    (no add; the first layer)
//   mode 1: x = bf16(resid + delta)                      (after attention)
//   mode 2: x = bf16(resid + bf16(sum_j w[r,j] * slot_out[r*k+j]))  (after the MLP/MoE: the
//           weighted sum of the experts' outputs, shared experts with weight 1)
//   resid <- x (modes 1, 2); out = bf16(bf16(x / sqrt(mean(x^2) + eps)) * weight)
// resid, delta, out: (rows, h) bf16; slot_out: (rows*k, h) f32; slot_w: (rows*k) f32;
// weight: (h) bf16. h a multiple of 8, at most 8192.
// Grid: rows blocks of ceil(h / 256) * 32 threads, a thread per 8 columns: every load of the
// row (residual, delta or the slots' outputs, the norm's weight) is issued at once, so the
// kernel waits on memory about once (it is latency-bound: one row of 1280 is 2.5 KB).
#include "common.cuh"

extern "C" __global__ void add_rmsnorm(bf16* __restrict__ resid, const bf16* __restrict__ delta,
                                       const float* __restrict__ slot_out,
                                       const float* __restrict__ slot_w, int k, int mode,
                                       const bf16* __restrict__ weight, bf16* __restrict__ out,
                                       int h, float eps) {
  __shared__ float red[32];
  int r = blockIdx.x, c = threadIdx.x, nc = h / 8;
  bool on = c < nc;
  uint4* x8 = reinterpret_cast<uint4*>(resid + (size_t)r * h);
  uint4 wt = on ? __ldg(reinterpret_cast<const uint4*>(weight) + c) : make_uint4(0u, 0u, 0u, 0u);
  inputs_ready_hold();  // the next kernel (its weights: ~10 MB) starts once the row is loaded
  float v[8];
  unpack8(on ? x8[c] : make_uint4(0u, 0u, 0u, 0u), v);
  if (on) add_delta8(v, delta, slot_out, slot_w, k, mode, r, c, h);
  dependents_may_start();
  // the values are bf16 now: packing them back is exact
  if (mode != 0 && on) x8[c] = pack8(v);
  uint4 o = rms_norm8(v, wt, h, eps, red);
  if (on) reinterpret_cast<uint4*>(out + (size_t)r * h)[c] = o;
}
