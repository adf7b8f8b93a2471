// sam_flash: SAM's attention in one pass, the scores never written (flash attention on the
// tensor cores, mma.sync m16n8k16 bf16 with f32 accumulation):
//   out[n, i] = sum_j softmax_j(q[n, i] . k[n, j] * scale + rel_h[n, i, y(j)] + rel_w[n, i, x(j)]) v[n, j]
// for the t queries and keys of one grid of gh x gw positions (t = gh * gw; y(j) = j / gw,
// x(j) = j % gw). The relative-position terms come as the two batched GEMMs of
// `add_decomposed_rel_pos` leave them (bf16, the reference's own values, see
// `vision::sam::rel_pos_bias`): relh (gh, n*gw, gh) at [y(i)][n*gw + x(i)][y(j)],
// relw (gw, n*gh, gw) at [x(i)][n*gh + y(i)][x(j)]; relh = 0 for no bias (CLIP's attention:
// any t, gh and gw unused).
// q, k, v, out: n = b * heads sequences of t rows of 64 bf16 (head dim 64: SAM ViT-B, CLIP-L),
// sequence ni = (bi, hi) at bi * seq_stride + hi * 64, row i at + i * row_stride (elements):
// q, k and v read straight from the qkv projection's (b, t, 3, heads, 64) output, the result
// written as (b, t, heads, 64), the heads merged (layouts in FlashLayout, Kernels::sam_flash).
// A block of 4 warps takes 64 queries of one n, a warp 16 of them, and walks the keys 64 at a
// time: the next tile of k and v loads (cp.async) while this one is used; the scores stay in
// registers (online softmax in the exp2 domain, the probabilities rounded to bf16 for the
// second mma as the reference rounds its probabilities); the block's rows of the terms are
// copied to shared memory once. Queries or keys past t are masked, so t need not be a multiple
// of 64 (windows of 14 x 14).
// Kernels: sam_flash (any even grid), sam_flash_w64 (gw = 64: Base's global blocks, Gundam's
// global view), sam_flash_plain (no bias). Grid: (ceil(t / 64), n) blocks of 128 threads;
// dynamic shared memory as Kernels::sam_flash sizes it (the tiles, the block's rows of terms).
#include "common.cuh"

#define BQ 64
#define BK 64
#define HD 64
#define LDS (HD + 8)  // a tile row in shared memory, in bf16: 144 bytes, ldmatrix without conflicts

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool full) {
  unsigned s = (unsigned)__cvta_generic_to_shared(smem);
  int n = full ? 16 : 0;  // zero-fill past the end
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(n));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const bf16* p) {
  unsigned s = (unsigned)__cvta_generic_to_shared(p);
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(s));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const bf16* p) {
  unsigned s = (unsigned)__cvta_generic_to_shared(p);
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(s));
}
// c += a (16x16, row) . b (16x8, col)
__device__ __forceinline__ void mma16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                         uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
__device__ __forceinline__ uint32_t pack_bf16x2(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}

// A 64-row tile of a sequence (rows `stride` apart) from row r0 into shared memory (rows past
// t zero-filled): 512 16-byte pieces, 4 a thread.
__device__ __forceinline__ void load_tile(bf16* dst, const bf16* __restrict__ src, long long stride,
                                          int r0, int t) {
#pragma unroll
  for (int u = 0; u < 4; ++u) {
    int p = threadIdx.x + u * 128, r = p >> 3, c = (p & 7) * 8;
    bool in = r0 + r < t;
    cp_async16(dst + r * LDS + c, src + (in ? r0 + r : 0) * stride + c, in);
  }
}

// The terms' row stride in bf16: at least gh + gw, and 4 words past a multiple of 32, so that
// the 32 lanes' reads of rel_w (8 rows g, 4 column pairs tq: word 4g + tq + c) hit distinct
// banks. The host sizes shared memory with the same formula (Kernels::sam_flash).
__device__ __forceinline__ int sam_flash_rs(int gh, int gw) {
  return 2 * (((gh + gw) / 2 + 27) / 32 * 32 + 4);
}

// BIAS: NONE, ANY grid, or W64 (gw == 64 == BK: a key tile is one grid row, so rel_w's terms
// for this thread's columns are the same in every tile and stay in registers, rel_h's is one
// per row and tile).
enum Bias { NONE, ANY, W64 };

template <int BIAS>
__device__ __forceinline__ void flash(
    const bf16* __restrict__ q, const bf16* __restrict__ k, const bf16* __restrict__ v,
    bf16* __restrict__ out, const bf16* __restrict__ relh, const bf16* __restrict__ relw, int n,
    int t, int gh, int gw, float scale, int heads, long long seq_stride, long long row_stride,
    long long out_seq_stride, long long out_row_stride) {
  extern __shared__ __align__(16) unsigned char smem[];
  bf16* qs = reinterpret_cast<bf16*>(smem);
  bf16* ks = qs + BQ * LDS;       // 2 stages
  bf16* vs = ks + 2 * BK * LDS;   // 2 stages
  bf16* rel = vs + 2 * BK * LDS;  // BQ rows of gh + gw terms (stride rs, see sam_flash_rs)
  const int ni = blockIdx.y, q0 = blockIdx.x * BQ;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, tq = lane & 3;
  constexpr bool bias = BIAS != NONE;
  const int rs = sam_flash_rs(gh, gw);
  const long long at = (long long)(ni / heads) * seq_stride + (ni % heads) * HD;
  const bf16* qn = q + at;
  const bf16* kn = k + at;
  const bf16* vn = v + at;
  inputs_ready();
  load_tile(qs, qn, row_stride, q0, t);
  load_tile(ks, kn, row_stride, 0, t);
  load_tile(vs, vn, row_stride, 0, t);
  cp_async_commit();
  if (bias) {
    // the block's rows of the terms, a bf16 pair at a time (gh, gw even)
    const int hp = gh / 2, wp = gw / 2;
    for (int p = threadIdx.x; p < BQ * (hp + wp); p += 128) {
      int r = p / (hp + wp), c = p - r * (hp + wp), i = q0 + r;
      uint32_t val = 0u;
      if (i < t) {
        int yi = i / gw, xi = i - yi * gw;
        const bf16* src = c < hp ? relh + ((size_t)yi * n * gw + (size_t)ni * gw + xi) * gh + 2 * c
                                 : relw + ((size_t)xi * n * gh + (size_t)ni * gh + yi) * gw + 2 * (c - hp);
        val = *reinterpret_cast<const uint32_t*>(src);
      }
      *reinterpret_cast<uint32_t*>(rel + r * rs + 2 * c) = val;
    }
  }
  // this thread's two rows: the warp's g-th and g+8-th
  const int ra = warp * 16 + g, rb = ra + 8;
  const float l2e = 1.4426950408889634f, sl2 = scale * l2e;
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
  float o[8][4];
#pragma unroll
  for (int i = 0; i < 8; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
  uint32_t qf[4][4];
  const int nt = (t + BK - 1) / BK;
  // W64: this thread's columns' rel_w terms, rows ra and rb (log2 domain), loaded below
  float bw[8][2][2];
  // j / gw for j < 2^16 by a multiply (exact there)
  const uint32_t magic = bias ? (uint32_t)((0x100000000ull + gw - 1) / gw) : 0u;
  for (int tile = 0; tile < nt; ++tile) {
    const int st = tile & 1;
    if (tile + 1 < nt) {
      load_tile(ks + (st ^ 1) * BK * LDS, kn, row_stride, (tile + 1) * BK, t);
      load_tile(vs + (st ^ 1) * BK * LDS, vn, row_stride, (tile + 1) * BK, t);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    if (tile == 0) {
#pragma unroll
      for (int kk = 0; kk < 4; ++kk)
        ldmatrix_x4(qf[kk], qs + (warp * 16 + (lane & 15)) * LDS + kk * 16 + (lane >> 4) * 8);
      if (BIAS == W64) {
#pragma unroll
        for (int i = 0; i < 8; ++i)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            bw[i][e][0] = bf(rel[ra * rs + gh + 8 * i + 2 * tq + e]) * l2e;
            bw[i][e][1] = bf(rel[rb * rs + gh + 8 * i + 2 * tq + e]) * l2e;
          }
      }
    }
    const bf16* kt = ks + st * BK * LDS;
    const bf16* vt = vs + st * BK * LDS;
    // s = q k^T for the warp's 16 rows and the tile's 64 keys (8 n-tiles of 8)
    float s[8][4];
#pragma unroll
    for (int i = 0; i < 8; ++i) s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
#pragma unroll
      for (int p = 0; p < 4; ++p) {
        uint32_t b[4];
        ldmatrix_x4(b, kt + (16 * p + (lane & 7) + ((lane >> 4) << 3)) * LDS + kk * 16 + ((lane >> 3) & 1) * 8);
        mma16816(s[2 * p], qf[kk], b[0], b[1]);
        mma16816(s[2 * p + 1], qf[kk], b[2], b[3]);
      }
    }
    // scale, the terms, the mask; in the exp2 domain
    float mx[2] = {m[0], m[1]};
    if (BIAS == W64) {
      // every key of the tile is in range (t = gh * 64); the tile is grid row `tile`
      const float ha = bf(rel[ra * rs + tile]) * l2e, hb = bf(rel[rb * rs + tile]) * l2e;
#pragma unroll
      for (int i = 0; i < 8; ++i)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          s[i][e] = fmaf(s[i][e], sl2, ha + bw[i][e][0]);
          s[i][2 + e] = fmaf(s[i][2 + e], sl2, hb + bw[i][e][1]);
          mx[0] = fmaxf(mx[0], s[i][e]);
          mx[1] = fmaxf(mx[1], s[i][2 + e]);
        }
    } else {
#pragma unroll
      for (int i = 0; i < 8; ++i) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          int j = tile * BK + 8 * i + 2 * tq + e;
          float ba = 0.f, bb = 0.f;
          if (bias) {
            int y = (int)__umulhi((uint32_t)j, magic), x = j - y * gw;
            ba = bf(rel[ra * rs + y]) + bf(rel[ra * rs + gh + x]);
            bb = bf(rel[rb * rs + y]) + bf(rel[rb * rs + gh + x]);
          }
          bool in = j < t;
          s[i][e] = in ? fmaf(s[i][e], sl2, ba * l2e) : -INFINITY;
          s[i][2 + e] = in ? fmaf(s[i][2 + e], sl2, bb * l2e) : -INFINITY;
          mx[0] = fmaxf(mx[0], s[i][e]);
          mx[1] = fmaxf(mx[1], s[i][2 + e]);
        }
      }
    }
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 1));
      mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 2));
    }
    // the first tile always has a key in range: mx is finite from here on
    float corr[2] = {exp2f(m[0] - mx[0]), exp2f(m[1] - mx[1])};
    m[0] = mx[0];
    m[1] = mx[1];
    float rsum[2] = {0.f, 0.f};
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      s[i][0] = exp2f(s[i][0] - m[0]);
      s[i][1] = exp2f(s[i][1] - m[0]);
      s[i][2] = exp2f(s[i][2] - m[1]);
      s[i][3] = exp2f(s[i][3] - m[1]);
      rsum[0] += s[i][0] + s[i][1];
      rsum[1] += s[i][2] + s[i][3];
    }
    l[0] = l[0] * corr[0] + rsum[0];
    l[1] = l[1] * corr[1] + rsum[1];
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      o[i][0] *= corr[0];
      o[i][1] *= corr[0];
      o[i][2] *= corr[1];
      o[i][3] *= corr[1];
    }
    // o += p v: p from the registers (the accumulators' layout is the A operand's), v by
    // transposed ldmatrix
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
      uint32_t a[4] = {pack_bf16x2(s[2 * kk][0], s[2 * kk][1]), pack_bf16x2(s[2 * kk][2], s[2 * kk][3]),
                       pack_bf16x2(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                       pack_bf16x2(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
      for (int p = 0; p < 4; ++p) {
        uint32_t b[4];
        ldmatrix_x4_trans(b, vt + (16 * kk + (lane & 7) + ((lane >> 3) & 1) * 8) * LDS + 16 * p + (lane >> 4) * 8);
        mma16816(o[2 * p], a, b[0], b[1]);
        mma16816(o[2 * p + 1], a, b[2], b[3]);
      }
    }
    __syncthreads();  // this stage is loaded again two tiles on
  }
  // the row sums over the quad, then out = o / l
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    l[h] += __shfl_xor_sync(0xffffffffu, l[h], 1);
    l[h] += __shfl_xor_sync(0xffffffffu, l[h], 2);
  }
  const float inv[2] = {1.f / l[0], 1.f / l[1]};
  bf16* on = out + (long long)(ni / heads) * out_seq_stride + (ni % heads) * HD;
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    int c = 8 * i + 2 * tq;
    if (q0 + ra < t)
      *reinterpret_cast<uint32_t*>(on + (q0 + ra) * out_row_stride + c) = pack_bf16x2(o[i][0] * inv[0], o[i][1] * inv[0]);
    if (q0 + rb < t)
      *reinterpret_cast<uint32_t*>(on + (q0 + rb) * out_row_stride + c) = pack_bf16x2(o[i][2] * inv[1], o[i][3] * inv[1]);
  }
}

#define FLASH_ARGS                                                                            \
  const bf16 *__restrict__ q, const bf16 *__restrict__ k, const bf16 *__restrict__ v,         \
      bf16 *__restrict__ out, const bf16 *__restrict__ relh, const bf16 *__restrict__ relw,   \
      int n, int t, int gh, int gw, float scale, int heads, long long seq_stride,                  \
      long long row_stride, long long out_seq_stride, long long out_row_stride
#define FLASH_PASS                                                                            \
  q, k, v, out, relh, relw, n, t, gh, gw, scale, heads, seq_stride, row_stride, out_seq_stride, \
      out_row_stride
extern "C" __global__ void __launch_bounds__(128, 3) sam_flash(FLASH_ARGS) { flash<ANY>(FLASH_PASS); }
extern "C" __global__ void __launch_bounds__(128) sam_flash_w64(FLASH_ARGS) { flash<W64>(FLASH_PASS); }
extern "C" __global__ void __launch_bounds__(128) sam_flash_plain(FLASH_ARGS) { flash<NONE>(FLASH_PASS); }
