// decode_attn: attention of query rows over their sequence's KV cache (MHA with grouped kv
// heads), causal by position: row r sees keys 0..=pos[r] of slot[r]. Serves decode (one row per
// sequence) and prefill (one row per prompt token, the cache already holding the chunk's keys).
// Decode (`fused` = 1; every row a different slot) also does rope_kv's work for its row: q is
// rotated as it is loaded, and the block whose keys reach pos[r] rotates the new k, appends k
// and v to the cache and then reads them like the others (blocks of one kv group write the
// same bytes). Prefill runs rope_kv first (rows of one slot read each other's keys).
// Split-K (flash-decoding): block (r, h, s) covers keys [s*chunk, (s+1)*chunk); with one split
// (gridDim.z == 1, chunk >= every row's length) it writes the output, otherwise its partial
// (running max m, sum l, unnormalised acc[hd]) to `part`, and the last of the row and head's
// splits to finish (a counter in `done`, reset by it) merges them:
// out = sum_s e^(m_s - M) acc_s / sum_s e^(m_s - M) l_s.
// q: row r, head h at qkv[r * qkv_stride + h * hd] (bf16), k and v heads after the nh q heads;
// k_cache, v_cache: (slots, nkv, max_t, hd) bf16; out: (rows, nh * hd) bf16; part: (rows, nh,
// splits, hd + 2) f32; done: (rows * nh) i32, zero before the first launch.
// softmax(q.k * scale) in f32, weighted sum of v in f32, rounded to bf16 once.
// Block: 256 threads; dynamic shared memory (hd + chunk + 256/(hd/8) * hd) floats.
// hd a multiple of 32, at most 256.
#include "common.cuh"

extern "C" __global__ void decode_attn(const bf16* __restrict__ qkv, int qkv_stride,
                                       const uint32_t* __restrict__ pos,
                                       const uint32_t* __restrict__ slot,
                                       bf16* k_cache,
                                       bf16* v_cache, bf16* __restrict__ out,
                                       float* __restrict__ part, int* __restrict__ done,
                                       int nh, int nkv, int hd, int max_t, int chunk,
                                       float scale, int fused, float theta) {
  extern __shared__ float sm[];
  __shared__ float red[32];
  __shared__ int last;
  int r = blockIdx.x, h = blockIdx.y, s = blockIdx.z, kvh = h / (nh / nkv);
  int L = min((int)pos[r] + 1, max_t);
  int j0 = s * chunk, j1 = min(L, j0 + chunk);
  if (j0 >= j1) return;  // past this row's length (the combine reads only the splits it needs)
  int n = j1 - j0;
  float* qs = sm;          // hd
  float* sc = sm + hd;     // chunk
  float* acc = sc + chunk; // groups * hd
  const bf16* q = qkv + (size_t)r * qkv_stride + (size_t)h * hd;
  size_t base = (((size_t)slot[r] * nkv + kvh) * (size_t)max_t + j0) * hd;
  const bf16* K = k_cache + base;
  const bf16* V = v_cache + base;
  if (fused) {
    uint32_t p = pos[r];
    int half = hd / 2;
    const bf16* kn = qkv + (size_t)r * qkv_stride + (size_t)(nh + kvh) * hd;
    const bf16* vn = kn + (size_t)nkv * hd;
    bool append = p < (uint32_t)max_t && (int)p < j1;  // this block's keys reach the new one
    bf16* kd = k_cache + (((size_t)slot[r] * nkv + kvh) * max_t + p) * hd;
    bf16* vd = v_cache + (((size_t)slot[r] * nkv + kvh) * max_t + p) * hd;
    for (int i = threadIdx.x; i < half; i += blockDim.x) {
      float c, sn;
      rope_cs(p, i, hd, theta, &c, &sn);
      float x1 = bf(q[i]), x2 = bf(q[i + half]);
      qs[i] = round_bf16(x1 * c - x2 * sn);
      qs[i + half] = round_bf16(x2 * c + x1 * sn);
      if (append) {
        float k1 = bf(kn[i]), k2 = bf(kn[i + half]);
        kd[i] = f2bf(k1 * c - k2 * sn);
        kd[i + half] = f2bf(k2 * c + k1 * sn);
      }
    }
    if (append)
      for (int i = threadIdx.x; i < hd; i += blockDim.x) vd[i] = vn[i];
  } else {
    for (int i = threadIdx.x; i < hd; i += blockDim.x) qs[i] = bf(q[i]);
  }
  __syncthreads();  // also makes this block's cache writes visible to its own reads
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
  float* pp = part + ((size_t)r * nh + h) * gridDim.z * (hd + 2);
  for (int d = threadIdx.x; d < hd; d += blockDim.x) {
    float t = 0.f;
    for (int gg = 0; gg < groups; ++gg) t += acc[gg * hd + d];
    if (gridDim.z == 1) {
      out[(size_t)r * nh * hd + (size_t)h * hd + d] = f2bf(t / l);
    } else {
      float* p = pp + s * (hd + 2);
      p[2 + d] = t;
      if (d == 0) { p[0] = m; p[1] = l; }
    }
  }
  if (gridDim.z == 1) return;
  // the last of the row's splits merges them
  int ns = (L + chunk - 1) / chunk;
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) {
    last = atomicAdd(&done[r * nh + h], 1) == ns - 1;
    if (last) done[r * nh + h] = 0;
  }
  __syncthreads();
  if (!last) return;
  float M = -INFINITY;
  for (int t = 0; t < ns; ++t) M = fmaxf(M, __ldcg(pp + t * (hd + 2)));
  for (int d = threadIdx.x; d < hd; d += blockDim.x) {
    float num = 0.f, den = 0.f;
    for (int t = 0; t < ns; ++t) {
      const float* p = pp + t * (hd + 2);
      float w = __expf(__ldcg(p) - M);
      den += w * __ldcg(p + 1);
      num += w * __ldcg(p + 2 + d);
    }
    out[(size_t)r * nh * hd + (size_t)h * hd + d] = f2bf(num / den);
  }
}
