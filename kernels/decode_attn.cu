// decode_attn: attention of query rows over their sequence's KV cache (MHA with grouped kv
// heads), causal by position: row r sees keys 0..=pos[r] of slot[r]. Serves decode (one row per
// sequence) and prefill (one row per prompt token, the cache already holding the chunk's keys).
// Decode (`fused` = 1; every row a different slot) also does rope_kv's work for its row: q is
// rotated as it is loaded, and the block whose keys reach pos[r] rotates the new k, appends k
// and v to the cache and then reads them like the others (blocks of one kv group write the
// same bytes). Prefill runs rope_kv first (rows of one slot read each other's keys).
// Split-K (flash-decoding): block (r, h, s) covers the s-th share of the row's L keys, shares of
// max(share_min, ceil(L / gridDim.z)) keys (at most `chunk`, the scores' room), so the few
// blocks a graph captures once serve every length (the blocks past L return at once); with one
// split (gridDim.z == 1, chunk >= every row's length) or one share (ns == 1: a short row) it
// writes the output, otherwise its partial
// (running max m, sum l, unnormalised acc[hd]) to `part`, and the last of the row and head's
// splits to finish (a counter in `done`, reset by it) merges them:
// out = sum_s e^(m_s - M) acc_s / sum_s e^(m_s - M) l_s.
// q: row r, head h at qkv[r * qkv_stride + h * hd] (bf16), k and v heads after the nh q heads;
// k_cache, v_cache: (slots, nkv, max_t, hd) bf16; out: (rows, nh * hd) bf16; part: (rows, nh,
// splits, hd + 2) f32; done: (rows * nh) i32, zero before the first launch.
// softmax(q.k * scale) in f32, weighted sum of v in f32, rounded to bf16 once.
// Block: 256 threads; dynamic shared memory (hd + chunk + 256/(hd/8) * hd) floats.
// hd a multiple of 32, at most 256; at most 1024 splits.
#include "common.cuh"

#define VPRE 4
#define KPRE 4

// a8 += p * v (8 bf16 values)
__device__ __forceinline__ void axpy8(float p, uint4 v, float* a8) {
  float f[8];
  unpack8(v, f);
#pragma unroll
  for (int i = 0; i < 8; ++i) a8[i] = fmaf(p, f[i], a8[i]);
}

extern "C" __global__ void decode_attn(const bf16* __restrict__ qkv, int qkv_stride,
                                       const uint32_t* __restrict__ pos,
                                       const uint32_t* __restrict__ slot,
                                       bf16* k_cache,
                                       bf16* v_cache, bf16* __restrict__ out,
                                       float* __restrict__ part, int* __restrict__ done,
                                       int nh, int nkv, int hd, int max_t, int chunk, int share_min,
                                       float scale, int fused, float theta) {
  extern __shared__ float sm[];
  __shared__ float red[32];
  int r = blockIdx.x, h = blockIdx.y, s = blockIdx.z, kvh = h / (nh / nkv);
  int tid = threadIdx.x, half = hd / 2;
  // Decode: the row's position and slot (written by the previous step), its share of keys and
  // the first keys' and values' loads (the cache below the new position, written by earlier
  // steps) go out before the wait, while the q/k/v projection runs; only q and the new k and v
  // are the previous kernel's. Prefill's cache is rope_kv's, the previous kernel: all after it.
  if (!fused) inputs_ready();
  uint32_t p = __ldcg(pos + r), sl = __ldcg(slot + r);
  int L = min((int)p + 1, max_t);
  int cz = max(share_min, (L + (int)gridDim.z - 1) / (int)gridDim.z);  // this row's share
  int j0 = s * cz, j1 = min(L, j0 + cz);
  if (j0 >= j1) return;  // past this row's length (the merge reads only the splits it needs)
  int n = j1 - j0;
  float* qs = sm;          // hd
  float* sc = sm + hd;     // chunk
  float* acc = sc + chunk; // groups * hd
  size_t head = ((size_t)sl * nkv + kvh) * (size_t)max_t;
  const bf16* K = k_cache + (head + j0) * hd;
  const bf16* V = v_cache + (head + j0) * hd;
  // the key this row appends (decode), not in the cache before this launch: loaded after it
  int jnew = fused && p < (uint32_t)max_t ? (int)p - j0 : -1;
  bool append = jnew >= 0 && jnew < n;  // this block's keys reach the new one
  int tpk = hd / 8, groups = blockDim.x / tpk, g = threadIdx.x / tpk, d8 = threadIdx.x % tpk;
  int quarter = hd / 4, sub = threadIdx.x & 3;
  int kp = blockDim.x >> 2;  // keys per pass of the scores; the whole warp takes the same trips
  // the first pass's keys (4 threads per key, KPRE 16-byte loads each: hd <= 4 * 8 * KPRE) and
  // the first VPRE values of each thread's keys for the weighted sum
  uint4 kpre[KPRE], vpre[VPRE];
  bool kfirst = 4 * 8 * KPRE >= hd;
  {
    int j = threadIdx.x >> 2;
    bool ok = kfirst && j < n && j != jnew;
    const uint4* kr = reinterpret_cast<const uint4*>(K + (size_t)j * hd + sub * quarter);
#pragma unroll
    for (int c = 0; c < KPRE; ++c) kpre[c] = ok && c < quarter / 8 ? __ldcg(kr + c) : make_uint4(0u, 0u, 0u, 0u);
  }
#pragma unroll
  for (int i = 0; i < VPRE; ++i) {
    int j = g + i * groups;
    vpre[i] = g < groups && j < n && j != jnew ? __ldcg(reinterpret_cast<const uint4*>(V + (size_t)j * hd) + d8)
                                               : make_uint4(0u, 0u, 0u, 0u);
  }
  float cs = 1.f, sn = 0.f;
  if (fused && tid < half) rope_cs(p, tid, hd, theta, &cs, &sn);
  // the output projection (its rows: ~3 MB) may start once q and the new k, v are in
  if (fused) inputs_ready_hold();
  // this thread's part of q (and of the new k, v): a thread per element (hd <= blockDim)
  const bf16* q = qkv + (size_t)r * qkv_stride + (size_t)h * hd;
  const bf16* kn = qkv + (size_t)r * qkv_stride + (size_t)(nh + kvh) * hd;
  const bf16* vn = kn + (size_t)nkv * hd;
  if (fused) {
    if (tid < half) {
      float2 qr = rope_rotate(bf(q[tid]), bf(q[tid + half]), cs, sn);
      qs[tid] = round_bf16(qr.x);
      qs[tid + half] = round_bf16(qr.y);
      if (append) {
        bf16* kd = k_cache + (head + p) * hd;
        float2 kr = rope_rotate(bf(kn[tid]), bf(kn[tid + half]), cs, sn);
        kd[tid] = f2bf(kr.x);
        kd[tid + half] = f2bf(kr.y);
      }
    }
    if (append && tid < hd) v_cache[(head + p) * hd + tid] = vn[tid];
  } else if (tid < hd) {
    qs[tid] = bf(q[tid]);
  }
  __syncthreads();  // also makes this block's cache writes visible to its own reads
  if (fused) dependents_may_start();
  TRACE_MARK(0)
  // the new key and value, now in the cache
  if (append) {
    if (kfirst && (threadIdx.x >> 2) == jnew) {
      const uint4* kr = reinterpret_cast<const uint4*>(K + (size_t)jnew * hd + sub * quarter);
#pragma unroll
      for (int c = 0; c < KPRE; ++c) if (c < quarter / 8) kpre[c] = kr[c];
    }
#pragma unroll
    for (int i = 0; i < VPRE; ++i)
      if (g < groups && g + i * groups == jnew) vpre[i] = reinterpret_cast<const uint4*>(V + (size_t)jnew * hd)[d8];
  }
  // scores: 4 threads per key, each hd/4 dims
  float m = -INFINITY;
  for (int j = threadIdx.x >> 2; j < ((n + kp - 1) / kp) * kp; j += kp) {
    float a = 0.f;
    if (j < n) {
      const float* qq = qs + sub * quarter;
      if (kfirst && j < kp) {
#pragma unroll
        for (int c = 0; c < KPRE; ++c) if (c < quarter / 8) a += dot8f(kpre[c], qq + 8 * c);
      } else {
        const uint4* kr = reinterpret_cast<const uint4*>(K + (size_t)j * hd + sub * quarter);
#pragma unroll 4
        for (int c = 0; c < quarter / 8; ++c) a += dot8f(kr[c], qq + 8 * c);
      }
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
  TRACE_MARK(1)
  // weighted sum of v: hd/8 threads per key (8 dims each), `groups` keys at a time
  float a8[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) a8[i] = 0.f;
  if (g < groups) {
#pragma unroll
    for (int i = 0; i < VPRE; ++i) {
      int j = g + i * groups;
      if (j < n) axpy8(sc[j], vpre[i], a8);
    }
#pragma unroll 2
    for (int j = g + VPRE * groups; j < n; j += groups)
      axpy8(sc[j], reinterpret_cast<const uint4*>(V + (size_t)j * hd)[d8], a8);
#pragma unroll
    for (int i = 0; i < 8; ++i) acc[g * hd + d8 * 8 + i] = a8[i];
  }
  __syncthreads();
  float* pp = part + ((size_t)r * nh + h) * gridDim.z * (hd + 2);
  int ns = (L + cz - 1) / cz;  // the row's shares
  bool alone = gridDim.z == 1 || ns == 1;
  for (int d = threadIdx.x; d < hd; d += blockDim.x) {
    float t = 0.f;
    for (int gg = 0; gg < groups; ++gg) t += acc[gg * hd + d];
    if (alone) {
      out[(size_t)r * nh * hd + (size_t)h * hd + d] = f2bf(t / l);
    } else {
      float* p = pp + s * (hd + 2);
      p[2 + d] = t;
      if (d == 0) { p[0] = m; p[1] = l; }
    }
  }
  TRACE_MARK(2)
  if (alone) return;
  // the last of the row's splits merges them
  if (!last_to_arrive(&done[r * nh + h], ns)) return;
  TRACE_MARK(3)
  // each output dimension's partials with every split's (m, l), 16 splits' loads at once (one
  // round trip for a decode row's at most 16), folded by a running max
  for (int d = threadIdx.x; d < hd; d += blockDim.x) {
    float M = -INFINITY, num = 0.f, den = 0.f;
    for (int t0 = 0; t0 < ns; t0 += 16) {
      float mv[16], lv[16], av[16];
#pragma unroll
      for (int i = 0; i < 16; ++i) {
        bool ok = t0 + i < ns;
        const float* pt = pp + (size_t)(t0 + i) * (hd + 2);
        mv[i] = ok ? __ldcg(pt) : -INFINITY;
        lv[i] = ok ? __ldcg(pt + 1) : 0.f;
        av[i] = ok ? __ldcg(pt + 2 + d) : 0.f;
      }
      float mc = M;
#pragma unroll
      for (int i = 0; i < 16; ++i) mc = fmaxf(mc, mv[i]);
      float back = __expf(M - mc);  // 0 on the first turn (M = -inf)
      num *= back;
      den *= back;
#pragma unroll
      for (int i = 0; i < 16; ++i) {
        if (t0 + i < ns) {
          float w = __expf(mv[i] - mc);
          den += w * lv[i];
          num += w * av[i];
        }
      }
      M = mc;
    }
    out[(size_t)r * nh * hd + (size_t)h * hd + d] = f2bf(num / den);
  }
  TRACE_MARK(4)
}
