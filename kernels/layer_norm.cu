// layer_norm: y = (x - mean(x)) / sqrt(var(x) + eps) * w + b over the last dim (nn.LayerNorm, the
// vision towers' pre-norms), a warp per row, the row in registers (16-byte loads), mean and
// variance in f32 (two passes over the registers), the output rounded to bf16 once.
// x, y: (rows, c) bf16; w, b: (c) bf16; c a multiple of 8, at most 1024.
// Grid: ceil(rows / 8) blocks of 256 threads.
#include "common.cuh"

#define LN_MAXU 4  // 16-byte loads per lane: c <= 32 * 8 * LN_MAXU

extern "C" __global__ void layer_norm(const bf16* __restrict__ x, const bf16* __restrict__ w,
                                      const bf16* __restrict__ b, bf16* __restrict__ y, int rows,
                                      int c, float eps) {
  inputs_ready();
  const int lane = threadIdx.x & 31;
  const size_t row = (size_t)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (row >= (size_t)rows) return;
  const int n8 = c >> 3;
  const uint4* xr = reinterpret_cast<const uint4*>(x + row * c);
  float v[LN_MAXU * 8];
  float sum = 0.f;
#pragma unroll
  for (int u = 0; u < LN_MAXU; ++u) {
    const int p = u * 32 + lane;
    uint4 raw = make_uint4(0, 0, 0, 0);
    if (p < n8) raw = xr[p];
    const bf16* e = reinterpret_cast<const bf16*>(&raw);
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      v[u * 8 + k] = bf(e[k]);
      sum += v[u * 8 + k];
    }
  }
  const float mean = warp_sum(sum) / (float)c;
  float sq = 0.f;
#pragma unroll
  for (int u = 0; u < LN_MAXU; ++u) {
    if (u * 32 + lane < n8) {
#pragma unroll
      for (int k = 0; k < 8; ++k) {
        const float d = v[u * 8 + k] - mean;
        sq = fmaf(d, d, sq);
      }
    }
  }
  const float rstd = rsqrtf(warp_sum(sq) / (float)c + eps);
  const uint4* wr = reinterpret_cast<const uint4*>(w);
  const uint4* br = reinterpret_cast<const uint4*>(b);
  uint4* yr = reinterpret_cast<uint4*>(y + row * c);
#pragma unroll
  for (int u = 0; u < LN_MAXU; ++u) {
    const int p = u * 32 + lane;
    if (p < n8) {
      const uint4 wv = wr[p], bv = br[p];
      const bf16* we = reinterpret_cast<const bf16*>(&wv);
      const bf16* be = reinterpret_cast<const bf16*>(&bv);
      uint4 out;
      bf16* o = reinterpret_cast<bf16*>(&out);
#pragma unroll
      for (int k = 0; k < 8; ++k) o[k] = f2bf(fmaf((v[u * 8 + k] - mean) * rstd, bf(we[k]), bf(be[k])));
      yr[p] = out;
    }
  }
}
