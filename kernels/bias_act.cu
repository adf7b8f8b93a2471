// bias_act: the epilogue of a vision linear layer, in place over cuBLAS's bf16 product:
//   y[r, c] <- bf16( act( bf16(y[r, c] + bias[c]) ) ) (+ res[r, c], rounded to bf16)
// act: 0 none, 1 GELU with erf (SAM's nn.GELU), 2 quick-GELU x * sigmoid(1.702 x) (CLIP).
// Each step rounded to bf16 where the reference's bf16 ops round (the bias add, the add of the
// residual); the activation is computed in f32 and rounded once.
// y, res: (rows, out) bf16 (res may be null); bias: (out) bf16 (may be null). out % 8 == 0.
// Grid: (rows, ceil(out / 8 / 128)) blocks of 128 threads, 8 values per thread (16-byte loads):
// a thread's column comes from its block and lane, no division (a 64-bit modulo per thread
// cost as much as SAM's erf).
#include "common.cuh"

__device__ __forceinline__ float act_f(float x, int act) {
  if (act == 1) return 0.5f * x * (1.f + erff(x * 0.70710678118654752f));
  if (act == 2) return x / (1.f + __expf(-1.702f * x));
  return x;
}

extern "C" __global__ void bias_act(bf16* __restrict__ y, const bf16* __restrict__ bias,
                                    const bf16* __restrict__ res, int out, int act) {
  inputs_ready();
  const int c0 = (blockIdx.y * blockDim.x + threadIdx.x) * 8;
  if (c0 >= out) return;
  const long long i = ((long long)blockIdx.x * out + c0) / 8;
  uint4 yv = reinterpret_cast<uint4*>(y)[i];
  uint4 bv = make_uint4(0, 0, 0, 0);
  if (bias) bv = *reinterpret_cast<const uint4*>(bias + c0);
  uint4 rv = make_uint4(0, 0, 0, 0);
  if (res) rv = reinterpret_cast<const uint4*>(res)[i];
  bf16* yp = reinterpret_cast<bf16*>(&yv);
  const bf16* bp = reinterpret_cast<const bf16*>(&bv);
  const bf16* rp = reinterpret_cast<const bf16*>(&rv);
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    float v = round_bf16(bf(yp[j]) + bf(bp[j]));
    if (act) v = round_bf16(act_f(v, act));
    if (res) v = bf(rp[j]) + v;
    yp[j] = f2bf(v);
  }
  reinterpret_cast<uint4*>(y)[i] = yv;
}
