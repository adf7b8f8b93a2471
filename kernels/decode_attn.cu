// decode_attn: attention of query rows over their sequence's KV cache (MHA with grouped kv
// heads), causal by position: row r sees keys 0..=pos[r] of slot[r]. Serves decode (one row per
// sequence) and prefill (one row per prompt token, the cache already holding the chunk's keys).
// Split-K (flash-decoding): block (r, h, s) covers keys [s*chunk, (s+1)*chunk); with one split
// (gridDim.z == 1, chunk >= every row's length) it writes the output, otherwise its partial
// (running max m, sum l, unnormalised acc[hd]) to `part`, merged by decode_attn_combine.
// q: row r, head h at qkv[r * qkv_stride + h * hd] (bf16); k_cache, v_cache: (slots, nkv,
// max_t, hd) bf16; out: (rows, nh * hd) bf16; part: (rows, nh, splits, hd + 2) f32.
// softmax(q.k * scale) in f32, weighted sum of v in f32, rounded to bf16 once.
// Block: 256 threads; dynamic shared memory (hd + chunk + 256/(hd/8) * hd) floats.
// hd a multiple of 32, at most 256.
#include "common.cuh"

extern "C" __global__ void decode_attn(const bf16* __restrict__ qkv, int qkv_stride,
                                       const uint32_t* __restrict__ pos,
                                       const uint32_t* __restrict__ slot,
                                       const bf16* __restrict__ k_cache,
                                       const bf16* __restrict__ v_cache, bf16* __restrict__ out,
                                       float* __restrict__ part, int nh, int nkv, int hd,
                                       int max_t, int chunk, float scale) {
  extern __shared__ float sm[];
  __shared__ float red[32];
  int r = blockIdx.x, h = blockIdx.y, s = blockIdx.z, kvh = h / (nh / nkv);
  int L = min((int)pos[r] + 1, max_t);
  int j0 = s * chunk, j1 = min(L, j0 + chunk);
  if (j0 >= j1) return;  // past this row's length (the combine reads only the splits it needs)
  int n = j1 - j0;
  float* qs = sm;          // hd
  float* sc = sm + hd;     // chunk
  float* acc = sc + chunk; // groups * hd
  const bf16* q = qkv + (size_t)r * qkv_stride + (size_t)h * hd;
  for (int i = threadIdx.x; i < hd; i += blockDim.x) qs[i] = bf(q[i]);
  __syncthreads();
  size_t base = (((size_t)slot[r] * nkv + kvh) * (size_t)max_t + j0) * hd;
  const bf16* K = k_cache + base;
  const bf16* V = v_cache + base;
  // scores: 4 threads per key, each hd/4 dims
  int quarter = hd / 4, sub = threadIdx.x & 3;
  float m = -INFINITY;
  int kp = blockDim.x >> 2;  // keys per pass; the whole warp takes the same trips (shuffles)
  for (int j = threadIdx.x >> 2; j < ((n + kp - 1) / kp) * kp; j += kp) {
    float a = 0.f;
    if (j < n) {
      const uint4* kr = reinterpret_cast<const uint4*>(K + (size_t)j * hd + sub * quarter);
      const float* qq = qs + sub * quarter;
#pragma unroll 4
      for (int c = 0; c < quarter / 8; ++c) a += dot8f(kr[c], qq + 8 * c);
    }
    a += __shfl_xor_sync(0xffffffffu, a, 1);
    a += __shfl_xor_sync(0xffffffffu, a, 2);
    if (j < n && sub == 0) {
      a *= scale;
      sc[j] = a;
      m = fmaxf(m, a);
    }
  }
  m = block_max(m, red);
  float l = 0.f;
  for (int j = threadIdx.x; j < n; j += blockDim.x) {
    float e = __expf(sc[j] - m);
    sc[j] = e;
    l += e;
  }
  l = block_sum(l, red);  // synchronises: sc is complete
  // weighted sum of v: hd/8 threads per key (8 dims each), `groups` keys at a time
  int tpk = hd / 8, groups = blockDim.x / tpk, g = threadIdx.x / tpk, d8 = threadIdx.x % tpk;
  float a8[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) a8[i] = 0.f;
  if (g < groups) {
#pragma unroll 2
    for (int j = g; j < n; j += groups) {
      uint4 v = reinterpret_cast<const uint4*>(V + (size_t)j * hd)[d8];
      const __nv_bfloat162* pv = reinterpret_cast<const __nv_bfloat162*>(&v);
      float p = sc[j];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        float2 f = __bfloat1622float2(pv[i]);
        a8[2 * i] = fmaf(p, f.x, a8[2 * i]);
        a8[2 * i + 1] = fmaf(p, f.y, a8[2 * i + 1]);
      }
    }
#pragma unroll
    for (int i = 0; i < 8; ++i) acc[g * hd + d8 * 8 + i] = a8[i];
  }
  __syncthreads();
  for (int d = threadIdx.x; d < hd; d += blockDim.x) {
    float t = 0.f;
    for (int gg = 0; gg < groups; ++gg) t += acc[gg * hd + d];
    if (gridDim.z == 1) {
      out[(size_t)r * nh * hd + (size_t)h * hd + d] = f2bf(t / l);
    } else {
      float* p = part + (((size_t)r * nh + h) * gridDim.z + s) * (hd + 2);
      p[2 + d] = t;
      if (d == 0) { p[0] = m; p[1] = l; }
    }
  }
}

// Merges the splits of decode_attn: out = sum_s e^(m_s - M) acc_s / sum_s e^(m_s - M) l_s.
// Grid: (rows, nh) blocks of hd threads.
extern "C" __global__ void decode_attn_combine(const float* __restrict__ part,
                                               const uint32_t* __restrict__ pos,
                                               bf16* __restrict__ out, int nh, int hd, int max_t,
                                               int chunk, int splits) {
  int r = blockIdx.x, h = blockIdx.y, d = threadIdx.x;
  int L = min((int)pos[r] + 1, max_t);
  int ns = min(splits, (L + chunk - 1) / chunk);
  const float* p = part + ((size_t)r * nh + h) * splits * (hd + 2);
  float M = -INFINITY;
  for (int s = 0; s < ns; ++s) M = fmaxf(M, p[s * (hd + 2)]);
  float num = 0.f, den = 0.f;
  for (int s = 0; s < ns; ++s) {
    const float* q = p + s * (hd + 2);
    float w = __expf(q[0] - M);
    den += w * q[1];
    if (d < hd) num += w * q[2 + d];
  }
  if (d < hd) out[(size_t)r * nh * hd + (size_t)h * hd + d] = f2bf(num / den);
}
