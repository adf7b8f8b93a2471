// greedy_next: the greedy choice on the device and the decode bookkeeping, so that a step needs
// nothing from the host: token[r] = argmax(logits[r]) (ties: the lowest id, as torch.argmax);
// with `advance`, pos[r] += 1 and the token is appended to hist[r] (hist_len[r] += 1).
// logits: (rows, vocab) bf16; token, pos, hist_len: (rows) u32; hist: (rows, hist_cap) u32 or
// null. Grid: rows blocks of 1024 threads.
#include "common.cuh"

extern "C" __global__ void greedy_next(const bf16* __restrict__ logits, int vocab,
                                       uint32_t* __restrict__ token, uint32_t* __restrict__ pos,
                                       uint32_t* __restrict__ hist, uint32_t* __restrict__ hist_len,
                                       int hist_cap, int advance) {
  inputs_ready();
  __shared__ float bv[32];
  __shared__ int bi[32];
  int r = blockIdx.x;
  const bf16* l = logits + (size_t)r * vocab;
  float best = -INFINITY;
  int idx = 0x7fffffff;
  // 8 logits per load (rows start 16-byte aligned when vocab % 8 == 0; else scalar)
  int nv = (vocab % 8 == 0) ? vocab / 8 : 0;
  const uint4* l8 = reinterpret_cast<const uint4*>(l);
#pragma unroll 4
  for (int c = threadIdx.x; c < nv; c += blockDim.x) {
    uint4 u = l8[c];
    const bf16* b = reinterpret_cast<const bf16*>(&u);
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      float v = bf(b[i]);
      if (v > best || idx == 0x7fffffff) { best = v; idx = 8 * c + i; }
    }
  }
  for (int i = 8 * nv + threadIdx.x; i < vocab; i += blockDim.x) {
    float v = bf(l[i]);
    if (v > best || idx == 0x7fffffff) { best = v; idx = i; }
  }
  // warp then block reduction on (value desc, index asc)
  for (int o = 16; o > 0; o >>= 1) {
    float ov = __shfl_xor_sync(0xffffffffu, best, o);
    int oi = __shfl_xor_sync(0xffffffffu, idx, o);
    if (ov > best || (ov == best && oi < idx)) { best = ov; idx = oi; }
  }
  int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  if (lane == 0) { bv[warp] = best; bi[warp] = idx; }
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < nw; ++w)
      if (bv[w] > best || (bv[w] == best && bi[w] < idx)) { best = bv[w]; idx = bi[w]; }
    token[r] = (uint32_t)idx;
    if (advance) {
      pos[r] += 1;
      if (hist) {
        uint32_t n = hist_len[r];
        if ((int)n < hist_cap) { hist[(size_t)r * hist_cap + n] = (uint32_t)idx; hist_len[r] = n + 1; }
      }
    }
  }
}
