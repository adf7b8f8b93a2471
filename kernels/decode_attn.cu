// decode_attn: attention of one query row per block over its sequence's KV cache (MHA with
// grouped kv heads), causal by position: row r sees keys 0..=pos[r] of slot[r]. Serves decode
// (one row per sequence) and prefill (one row per prompt token, the cache already holding the
// whole chunk's keys).
// q: row r, head h at qkv[r * qkv_stride + h * hd] (bf16); k_cache, v_cache: (slots, nkv,
// max_t, hd) bf16; out: (rows, nh * hd) bf16. softmax(q.k * scale) in f32, weighted sum of v in
// f32, rounded to bf16.
// Grid: (rows, nh) blocks of 256 threads; dynamic shared memory (hd + max_t + 256*2) floats.
// hd even and a multiple of 8, at most 256.
#include "common.cuh"

extern "C" __global__ void decode_attn(const bf16* __restrict__ qkv, int qkv_stride,
                                       const uint32_t* __restrict__ pos,
                                       const uint32_t* __restrict__ slot,
                                       const bf16* __restrict__ k_cache,
                                       const bf16* __restrict__ v_cache, bf16* __restrict__ out,
                                       int nh, int nkv, int hd, int max_t, float scale) {
  extern __shared__ float sm[];
  __shared__ float red[32];
  float* qs = sm;             // hd
  float* sc = sm + hd;        // max_t
  float* part = sc + max_t;   // blockDim.x * 2
  int r = blockIdx.x, h = blockIdx.y, kvh = h / (nh / nkv);
  int L = min((int)pos[r] + 1, max_t);
  const bf16* q = qkv + (size_t)r * qkv_stride + (size_t)h * hd;
  for (int i = threadIdx.x; i < hd; i += blockDim.x) qs[i] = bf(q[i]);
  __syncthreads();
  size_t base = ((size_t)slot[r] * nkv + kvh) * (size_t)max_t * hd;
  const bf16* K = k_cache + base;
  const bf16* V = v_cache + base;
  float m = -INFINITY;
  for (int j = threadIdx.x; j < L; j += blockDim.x) {
    const uint4* kr = reinterpret_cast<const uint4*>(K + (size_t)j * hd);
    float acc = 0.f;
    for (int c = 0; c < hd / 8; ++c) acc += dot8f(kr[c], qs + 8 * c);
    acc *= scale;
    sc[j] = acc;
    m = fmaxf(m, acc);
  }
  m = block_max(m, red);
  float l = 0.f;
  for (int j = threadIdx.x; j < L; j += blockDim.x) {
    float e = __expf(sc[j] - m);
    sc[j] = e;
    l += e;
  }
  l = block_sum(l, red);  // synchronises: sc is complete
  int pairs = hd / 2, groups = blockDim.x / pairs;
  int g = threadIdx.x / pairs, d2 = threadIdx.x % pairs;
  float a0 = 0.f, a1 = 0.f;
  if (g < groups) {
    for (int j = g; j < L; j += groups) {
      float2 v = __bfloat1622float2(reinterpret_cast<const __nv_bfloat162*>(V + (size_t)j * hd)[d2]);
      a0 = fmaf(sc[j], v.x, a0);
      a1 = fmaf(sc[j], v.y, a1);
    }
  }
  part[2 * threadIdx.x] = a0;
  part[2 * threadIdx.x + 1] = a1;
  __syncthreads();
  bf16* o = out + (size_t)r * nh * hd + (size_t)h * hd;
  for (int d = threadIdx.x; d < hd; d += blockDim.x) {
    float s = 0.f;
    for (int gg = 0; gg < groups; ++gg) s += part[2 * (gg * pairs + d / 2) + (d & 1)];
    o[d] = f2bf(s / l);
  }
}
