// add_rmsnorm: the residual add fused with the next DeepseekV2RMSNorm.
//   mode 0: x = resid                                    (no add; the first layer)
//   mode 1: x = bf16(resid + delta)                      (after attention)
//   mode 2: x = bf16(resid + bf16(sum_j w[r,j] * slot_out[r*k+j]))  (after the MLP/MoE: the
//           weighted sum of the experts' outputs, shared experts with weight 1)
//   resid <- x (modes 1, 2); out = bf16(bf16(x / sqrt(mean(x^2) + eps)) * weight)
// resid, delta, out: (rows, h) bf16; slot_out: (rows*k, h) f32; slot_w: (rows*k) f32;
// weight: (h) bf16. Grid: rows blocks of 512 threads; dynamic shared memory h floats.
#include "common.cuh"

extern "C" __global__ void add_rmsnorm(bf16* __restrict__ resid, const bf16* __restrict__ delta,
                                       const float* __restrict__ slot_out,
                                       const float* __restrict__ slot_w, int k, int mode,
                                       const bf16* __restrict__ weight, bf16* __restrict__ out,
                                       int h, float eps) {
  extern __shared__ float xs[];
  __shared__ float red[32];
  int r = blockIdx.x;
  bf16* x = resid + (size_t)r * h;
  float ss = 0.f;
  for (int i = threadIdx.x; i < h; i += blockDim.x) {
    float v = bf(x[i]);
    if (mode == 1) {
      v = round_bf16(v + bf(delta[(size_t)r * h + i]));
      x[i] = f2bf(v);
    } else if (mode == 2) {
      float d = 0.f;
#pragma unroll 8
      for (int j = 0; j < k; ++j)
        d = fmaf(slot_w[r * k + j], slot_out[((size_t)r * k + j) * h + i], d);
      v = round_bf16(v + round_bf16(d));
      x[i] = f2bf(v);
    }
    xs[i] = v;
    ss = fmaf(v, v, ss);
  }
  ss = block_sum(ss, red);
  float denom = sqrtf(ss / (float)h + eps);
  bf16* o = out + (size_t)r * h;
  for (int i = threadIdx.x; i < h; i += blockDim.x)
    o[i] = f2bf(round_bf16(xs[i] / denom) * bf(weight[i]));
}
