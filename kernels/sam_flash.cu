// sam_flash: SAM's attention in one pass, the scores never written (flash attention on the
// tensor cores, mma.sync m16n8k16 bf16 with f32 accumulation):
//   out[n, i] = sum_j softmax_j(q[n, i] . k[n, j] * scale + rel_h[n, i, y(j)] + rel_w[n, i, x(j)]) v[n, j]
// for the t queries and keys of one grid of gh x gw positions (t = gh * gw; y(j) = j / gw,
// x(j) = j % gw), rel_h[n, i, ky] = q[n, i] . relh[y(i), ky] and rel_w[n, i, kx] = q[n, i] .
// relw[x(i), kx] (add_decomposed_rel_pos's two einsums, each rounded to bf16 as the reference's
// GEMM output is) computed by the kernel from the tables get_rel_pos gathers for a
// self-attention: relh (gh, gh, 64) and relw (gw, gw, 64) bf16 contiguous, Toeplitz (relh[y][ky]
// depends on y - ky alone, as for equal query and key grids); relh = 0 for no bias (CLIP's
// attention: any t, gh and gw unused).
// q, k, v, out: n = b * heads sequences of t rows of 64 bf16 (head dim 64: SAM ViT-B, CLIP-L),
// sequence ni = (bi, hi) at bi * seq_stride + hi * 64, row i at + i * row_stride (elements):
// q, k and v read straight from the qkv projection's (b, t, 3, heads, 64) output, the result
// written as (b, t, heads, 64), the heads merged (layouts in FlashLayout, Kernels::sam_flash).
// A block of 4 warps takes 64 queries of one n, a warp 16 of them, and walks the keys 64 at a
// time: the next tile of k and v loads (cp.async) while this one is used; the scores stay in
// registers (online softmax in the exp2 domain, the probabilities rounded to bf16 for the
// second mma as the reference rounds its probabilities); the block's rows of the terms are
// made in shared memory first (two small products on the tensor cores, below). Queries or
// keys past t are masked, so t need not be a multiple of 64 (windows of 14 x 14).
// Kernels: sam_flash (any even grid), sam_flash_w64 (gw = 64: Base's global blocks, Gundam's
// global view), sam_flash_w40 (gw = 40: Gundam's tiles' global blocks, key tiles of two grid rows,
// 80 keys), sam_flash_plain (no bias), sam_flash_short (any grid of few positions: at most
// 128 registers, 4 blocks an SM), sam_flash_rows16 (the same for grids of gw <= 16, SAM's 14x14
// windows, the keys in grid rows of 16: ROWS16 below), sam_flash_win (rows16 over the windows of
// whole images where they lie, no partition: WIN16 below; 4 blocks an SM). Grid: (ceil(t / 64),
// n) blocks of 128 threads; dynamic shared memory as Kernels::sam_flash sizes it (the tiles, the
// block's rows of terms; sam_flash_w40's key and value tiles are 80 rows).
#include "common.cuh"

#include <type_traits>

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
// 2^x on the SFU alone (exp2f adds a denormal fix-up of three instructions a call; results
// below 2^-126 are probabilities that round away next to the row's largest, 1)
__device__ __forceinline__ float ex2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}
__device__ __forceinline__ uint32_t pack_bf16x2(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}

// An R-row tile of a sequence (rows `stride` apart; R a multiple of 16) from row r0 into shared
// memory (rows past t zero-filled): 8 R 16-byte pieces, R / 16 a thread.
template <int R = 64>
__device__ __forceinline__ void load_tile(bf16* dst, const bf16* __restrict__ src, long long stride,
                                          int r0, int t) {
#pragma unroll
  for (int u = 0; u < R / 16; ++u) {
    int p = threadIdx.x + u * 128, r = p >> 3, c = (p & 7) * 8;
    bool in = r0 + r < t;
    cp_async16(dst + r * LDS + c, src + (in ? r0 + r : 0) * stride + c, in);
  }
}

// acc = the warp's 16 queries (qf, A fragments) times the NT * 8 rows of `rows` (a key tile, or
// 64 rows of a table), transposed: NT n-tiles of 8 columns; only the first `groups` 16-row
// groups unless FULL (the others' columns left at 0).
template <bool FULL, int NT = 8>
__device__ __forceinline__ void q_rows_t(float (&acc)[NT][4], const uint32_t (&qf)[4][4], const bf16* rows,
                                         int lane, int groups) {
#pragma unroll
  for (int i = 0; i < NT; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;
#pragma unroll
  for (int kk = 0; kk < 4; ++kk) {
#pragma unroll
    for (int p = 0; p < NT / 2; ++p) {
      if (!FULL && p >= groups) break;
      uint32_t b[4];
      ldmatrix_x4(b, rows + (16 * p + (lane & 7) + ((lane >> 4) << 3)) * LDS + kk * 16 + ((lane >> 3) & 1) * 8);
      mma16816(acc[2 * p], qf[kk], b[0], b[1]);
      mma16816(acc[2 * p + 1], qf[kk], b[2], b[3]);
    }
  }
}

// The terms' row stride in bf16: at least gh + gw, and 4 words past a multiple of 32, so that
// the 32 lanes' reads of rel_w (8 rows g, 4 column pairs tq: word 4g + tq + c) hit distinct
// banks. The host sizes shared memory with the same formula (Kernels::sam_flash).
__device__ __forceinline__ int sam_flash_rs(int gh, int gw) {
  return 2 * (((gh + gw) / 2 + 27) / 32 * 32 + 4);
}

// A tile of keys in ROWS16's layout: slot r of key tile `tile` holds key (4 tile + r / 16) * gw +
// r % 16 where r % 16 < gw and that grid row exists, zeros elsewhere (each grid row padded to 16).
__device__ __forceinline__ void load_tile16(bf16* dst, const bf16* __restrict__ src, long long stride,
                                            int tile, int gh, int gw) {
#pragma unroll
  for (int u = 0; u < 4; ++u) {
    int p = threadIdx.x + u * 128, r = p >> 3, c = (p & 7) * 8;
    int y = tile * 4 + (r >> 4), x = r & 15;
    bool in = y < gh && x < gw;
    cp_async16(dst + r * LDS + c, src + (in ? y * gw + x : 0) * stride + c, in);
  }
}

// WIN16: SAM's windows read and written where they lie in the image (no partition): the
// image grid (h, w) of each batch element and, for the positions of a window past the image
// (the zero padding window_partition adds, whose projection is the bias alone), the qkv
// projection's key and value bias as their rows.
struct WinGrid {
  int h, w;
  const bf16* kb;
  const bf16* vb;
};

// A tile of keys in ROWS16's layout for WIN16: slot r of key tile `tile` holds window position
// (4 tile + r / 16, r % 16) (zeros past the window, as load_tile16). A thread's four pieces
// share their column x = threadIdx.x / 8 (and their 16 bytes c): `col` is that column's
// window row 0 in the image (elements, c included) and `ystep` an image row; `xin` says x is
// within the window, `ximg` within the image, window rows below `ylim` are within the image,
// and the others' pieces come from `pad` (the bias row; its 16 bytes c).
__device__ __forceinline__ void load_win16(bf16* dst, const bf16* __restrict__ src, const bf16* __restrict__ pad,
                                           int col, int ystep, int tile, int gh, bool xin,
                                           bool ximg, int ylim) {
  const int c = (threadIdx.x & 7) * 8;
#pragma unroll
  for (int u = 0; u < 4; ++u) {
    const int r = (threadIdx.x >> 3) + 16 * u, y = tile * 4 + u;
    const bool in = xin && y < gh, img = ximg && y < ylim;
    cp_async16(dst + r * LDS + c, img ? src + col + y * ystep : pad + c, in);
  }
}

// BIAS: NONE, ANY grid, W64 (gw == 64 == BK: a key tile is one grid row, so rel_w's terms
// for this thread's columns are the same in every tile and stay in registers, rel_h's is one
// per row and tile), W40 (gw == 40: key tiles of KT = 80 keys, two grid rows, so that again
// a thread's columns have the same x in every tile, the second row's x those of the first's
// (n-tile i + 5 as i): rel_w's terms in registers, rel_h's two per row and tile), or ROWS16
// (gw <= 16, SAM's windows: the keys laid out as grid rows of 16 slots, load_tile16, so that a
// tile is 4 grid rows and a thread's columns have the same 4 x in every tile: rel_w's terms in
// registers, rel_h's 4 per row and tile, the padding's and missing rows' terms -inf; the
// softmax is over the keys whatever their order); WIN16: ROWS16 over the windows of an image
// in place (WinGrid above; n = windows * heads, the windows of each batch element row by row).
enum Bias { NONE, ANY, W64, W40, ROWS16, WIN16 };

template <int BIAS>
__device__ __forceinline__ void flash(
    const bf16* __restrict__ q, const bf16* __restrict__ k, const bf16* __restrict__ v,
    bf16* __restrict__ out, const bf16* __restrict__ relh, const bf16* __restrict__ relw, int n,
    int t, int gh, int gw, float scale, int heads, long long seq_stride, long long row_stride,
    long long out_seq_stride, long long out_row_stride, WinGrid win = {}) {
  extern __shared__ __align__(16) unsigned char smem[];
  // keys a tile (KT / 8 n-tiles, KT / 16 groups of the second product); W64 and W40: a tile is
  // GR whole grid rows of NB n-tiles each
  constexpr int KT = BIAS == W40 ? 80 : BK, NT = KT / 8;
  constexpr bool whole_rows = BIAS == W64 || BIAS == W40;
  constexpr int GR = BIAS == W40 ? 2 : 1, NB = NT / GR;
  // ROWS16's key layout (WIN16 is ROWS16 with other addresses)
  constexpr bool rows16 = BIAS == ROWS16 || BIAS == WIN16;
  // the query tile, then two stages of a key tile and a value tile, then the terms
  bf16* qs = reinterpret_cast<bf16*>(smem);
  bf16* rel = qs + (BQ + 4 * KT) * LDS;  // BQ rows of gh + gw terms (stride rs, see sam_flash_rs)
  auto kst = [&](int st) { return qs + (BQ + 2 * st * KT) * LDS; };
  auto vst = [&](int st) { return qs + (BQ + (2 * st + 1) * KT) * LDS; };
  const int ni = blockIdx.y, q0 = blockIdx.x * BQ;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, tq = lane & 3;
  constexpr bool bias = BIAS != NONE;
  const int rs = sam_flash_rs(gh, gw);
  // i / gw by a multiply: ceil(2^32 / gw), exact for i < 2^16 (t < 2^16)
  const uint32_t mgw = bias ? 0xffffffffu / gw + 1u : 0u;
  // WIN16: the window's origin in the image and its image's first row; win_row(y, x) is the
  // image row of window position (y, x), -1 past the image (32-bit: see wcol)
  int img0 = 0;
  int wy0 = 0, wx0 = 0;
  if (BIAS == WIN16) {
    const int wi = ni / heads, nwx = (win.w + gw - 1) / gw, nwy = (win.h + gh - 1) / gh;
    const int bi = wi / (nwx * nwy), r = wi - bi * (nwx * nwy), wy = r / nwx;
    img0 = bi * win.h * win.w;
    wy0 = wy * gh;
    wx0 = (r - wy * nwx) * gw;
  }
  auto win_row = [&](int y, int x) -> long long {
    const int gy = wy0 + y, gx = wx0 + x;
    return gy < win.h && gx < win.w ? img0 + gy * win.w + gx : -1;
  };
  // WIN16's key and value pieces of this thread (load_win16): its column's first row, the
  // image row's stride, what lies within the window and the image
  const int lx = threadIdx.x >> 3;
  const bool xin = lx < gw, ximg = wx0 + lx < win.w;
  const int ylim = min(gh, win.h - wy0);
  // (32-bit, as the image rows above: the host keeps the projection under 2^31 elements, and
  // 64-bit offsets took the registers of a fourth block an SM)
  const int wcol = (img0 + wy0 * win.w + wx0 + lx) * (int)row_stride + (threadIdx.x & 7) * 8;
  const int ystep = win.w * (int)row_stride;
  // query i's row (i < t): ROWS16's windows and the others by the sequence layout, WIN16's by
  // the image
  auto query_row = [&](int i) -> long long {
    if (BIAS != WIN16) return i;
    const int y = (int)__umulhi((uint32_t)i, mgw);
    return win_row(y, i - y * gw);
  };
  const long long at = (BIAS == WIN16 ? 0 : (long long)(ni / heads) * seq_stride) + (ni % heads) * HD;
  const bf16* qn = q + at;
  const bf16* kn = k + at;
  const bf16* vn = v + at;
  // key / value tile `tile` into stage st
  auto load_kv = [&](int st, int tile) {
    if (BIAS == ROWS16) {
      load_tile16(kst(st), kn, row_stride, tile, gh, gw);
      load_tile16(vst(st), vn, row_stride, tile, gh, gw);
    } else if (BIAS == WIN16) {
      // (the sequence's head offset at is the bias's too)
      load_win16(kst(st), kn, win.kb + at, wcol, ystep, tile, gh, xin, ximg, ylim);
      load_win16(vst(st), vn, win.vb + at, wcol, ystep, tile, gh, xin, ximg, ylim);
    } else {
      load_tile<KT>(kst(st), kn, row_stride, tile * KT, t);
      load_tile<KT>(vst(st), vn, row_stride, tile * KT, t);
    }
  };
  inputs_ready();
  if (BIAS == WIN16) {
    // the query tile by image rows (zeros for the queries past t and past the image: their
    // outputs are not written)
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      int p = threadIdx.x + u * 128, r = p >> 3, c = (p & 7) * 8;
      const long long gr = q0 + r < t ? query_row(q0 + r) : -1;
      cp_async16(qs + r * LDS + c, qn + (gr >= 0 ? gr : 0) * row_stride + c, gr >= 0);
    }
  } else {
    load_tile(qs, qn, row_stride, q0, t);
  }
  load_kv(0, 0);
  cp_async_commit();
  // the warp's 16 query rows as mma A fragments (read once the query tile is in)
  uint32_t qf[4][4];
  auto load_q = [&]() {
#pragma unroll
    for (int kk = 0; kk < 4; ++kk)
      ldmatrix_x4(qf[kk], qs + (warp * 16 + (lane & 15)) * LDS + kk * 16 + (lane >> 4) * 8);
  };
  if (bias) {
    // The block's rows of the terms, rel_h[i][ky] = q_i . rh[y(i)][ky] and rel_w[i][kx] =
    // q_i . rw[x(i)][kx], on the tensor cores. The tables are Toeplitz (rh[y][ky] is row
    // y - ky + gh - 1 of the resized table T_h, whose 2gh - 1 rows are rh[0][gh-1..0] then
    // rh[gh-1][gh-2..0]), so each is one product P = Q T^T (64 rows by 2g - 1 columns) read
    // along diagonals: rel_h[i][ky] = P_h[i][y(i) - ky + gh - 1]. Only the columns the
    // block's rows read are made: rel_h's [y0, y1 + gh - 1] (its first and last query's grid
    // rows), rel_w's [x0, x1 + gw - 1] within one grid row, all 2gw - 1 else. The tables go by
    // chunks of 64 rows (T_h's, then T_w's), two at a time into the second stage's key and
    // value tiles (windows: both tables at once); each warp writes its 16 rows of P, rounded to
    // bf16 as the reference's GEMM output is, over its own rows of the query tile (q is in
    // registers by then), and gathers them into rel.
    const int last = min(q0 + BQ, t) - 1, y0 = q0 / gw, y1 = last / gw;
    const int lo_h = y0, n_h = y1 - y0 + gh;
    const int lo_w = y0 == y1 ? q0 - y0 * gw : 0, n_w = y0 == y1 ? last - q0 + gw : 2 * gw - 1;
    const int nch_h = (n_h + BK - 1) / BK, nch = nch_h + (n_w + BK - 1) / BK;
    // chunk ci (T_h's first): which table (pass 0: h, 1: w), its grid side, first and end column
    struct Chunk {
      int pass, gs, c0, end;
    };
    auto chunk = [&](int ci) {
      const int pass = ci < nch_h ? 0 : 1;
      return Chunk{pass, pass == 0 ? gh : gw, pass == 0 ? lo_h + ci * BK : lo_w + (ci - nch_h) * BK,
                   pass == 0 ? lo_h + n_h : lo_w + n_w};
    };
    bf16* pw = qs + warp * 16 * LDS;
    for (int c2 = 0; c2 < nch; c2 += 2) {
      if (c2 > 0) __syncthreads();  // every warp is done with the previous chunks
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int ci = c2 + h;
        const Chunk ch = chunk(ci);
        const int gs = ch.gs;
        const bf16* src = ch.pass == 0 ? relh : relw;
        bf16* tab = h == 0 ? kst(1) : vst(1);
#pragma unroll
        for (int u = 0; u < 4; ++u) {
          int p = threadIdx.x + u * 128, r = p >> 3, c = (p & 7) * 8, row = ch.c0 + r;
          bool in = ci < nch && row < ch.end;
          int e = row >= gs - 1 ? (gs - 1) * gs + (2 * gs - 2 - row) : gs - 1 - row;
          cp_async16(tab + r * LDS + c, src + (size_t)(in ? e : 0) * HD + c, in);
        }
      }
      cp_async_commit();
      cp_async_wait<0>();
      __syncthreads();
      if (c2 == 0) {
        load_q();
        __syncwarp();  // the warp's query rows are read: P goes over them
      }
      for (int h = 0; h < 2 && c2 + h < nch; ++h) {
        const int ci = c2 + h;
        const Chunk ch = chunk(ci);
        const int pass = ch.pass, gs = ch.gs, c0 = ch.c0, off = pass == 0 ? 0 : gh;
        const bf16* tab = h == 0 ? kst(1) : vst(1);
        float acc[8][4];
        q_rows_t<true>(acc, qf, tab, lane, 4);
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          *reinterpret_cast<uint32_t*>(pw + g * LDS + 8 * i + 2 * tq) = pack_bf16x2(acc[i][0], acc[i][1]);
          *reinterpret_cast<uint32_t*>(pw + (g + 8) * LDS + 8 * i + 2 * tq) = pack_bf16x2(acc[i][2], acc[i][3]);
        }
        __syncwarp();
        // the warp's 16 rows by gs columns, flattened over the lanes (a window's 14 columns
        // fill them); column c of the terms is P's column coord - c + gs - 1
        const uint32_t mgs = 0xffffffffu / gs + 1u;  // idx / gs as i / gw (idx < 16 * 1024)
        for (int idx = lane; idx < 16 * gs; idx += 32) {
          const int rr = (int)__umulhi((uint32_t)idx, mgs), c = idx - rr * gs;
          const int r = warp * 16 + rr, i = q0 + r;
          const int yi = (int)__umulhi((uint32_t)i, mgw), coord = pass == 0 ? yi : i - yi * gw;
          const int col = coord - c + gs - 1 - c0;
          if (i >= t) {
            if (ci == 0 || ci == nch_h) rel[r * rs + off + c] = f2bf(0.f);
          } else if (col >= 0 && col < BK) {
            rel[r * rs + off + c] = pw[rr * LDS + col];
          }
        }
        __syncwarp();  // P's rows are written again by the next chunk
      }
    }
    __syncthreads();  // the terms are in; the second stage is free for the keys
  }
  // this thread's two rows: the warp's g-th and g+8-th
  const int ra = warp * 16 + g, rb = ra + 8;
  const float l2e = 1.4426950408889634f, sl2 = scale * l2e;
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
  float o[8][4];
#pragma unroll
  for (int i = 0; i < 8; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
  const int nt = rows16 ? (gh + 3) / 4 : (t + KT - 1) / KT;
  // W64 and W40: this thread's columns' rel_w terms in a grid row's NB n-tiles, rows ra and rb
  // (log2 domain), loaded below;
  // ROWS16: the same for its 4 columns of a grid row (bw[h][e]: column 8h + 2tq + e of the
  // row, -inf past gw)
  float bw[8][2][2];
  for (int tile = 0; tile < nt; ++tile) {
    const int st = tile & 1;
    if (tile + 1 < nt) {
      load_kv(st ^ 1, tile + 1);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    if (tile == 0) {
      if (!bias) load_q();
      if (whole_rows) {
#pragma unroll
        for (int i = 0; i < NB; ++i)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            bw[i][e][0] = bf(rel[ra * rs + gh + 8 * i + 2 * tq + e]) * l2e;
            bw[i][e][1] = bf(rel[rb * rs + gh + 8 * i + 2 * tq + e]) * l2e;
          }
      }
      if (rows16) {
#pragma unroll
        for (int h = 0; h < 2; ++h)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int x = 8 * h + 2 * tq + e;
            bw[h][e][0] = x < gw ? bf(rel[ra * rs + gh + x]) * l2e : -INFINITY;
            bw[h][e][1] = x < gw ? bf(rel[rb * rs + gh + x]) * l2e : -INFINITY;
          }
      }
    }
    const bf16* kt = kst(st);
    const bf16* vt = vst(st);
    // work only where it counts: a warp whose 16 queries are all past t idles (the last
    // block of a window of 196), and the tile's 16-key groups past t are skipped (its last
    // tile: 4 keys of 64)
    const int kvalid = rows16 ? 16 * min(4, gh - 4 * tile) : t - tile * KT;
    // FULL: every key of the tile in range (the loops unrolled without a test: W64 and W40
    // always)
    auto step = [&](auto full) {
      constexpr bool FULL = decltype(full)::value;
      // s = q k^T for the warp's 16 rows and the tile's KT keys (NT n-tiles of 8)
      float s[NT][4];
      q_rows_t<FULL, NT>(s, qf, kt, lane, (kvalid + 15) / 16);
      // scale, the terms, the mask; in the exp2 domain. W64 and W40 add the tile's first grid
      // row's rel_h term (one a query row) after the max, in the exponent's offset (hoff), not
      // to every key
      float mx[2] = {m[0], m[1]};
      float hoff[2] = {0.f, 0.f};
      if (rows16) {
        // the tile's grid rows 4 tile + p (-inf past gh: their keys' groups were skipped)
        float ha[4], hb[4];
#pragma unroll
        for (int p = 0; p < 4; ++p) {
          const int y = 4 * tile + p;
          ha[p] = y < gh ? bf(rel[ra * rs + y]) * l2e : -INFINITY;
          hb[p] = y < gh ? bf(rel[rb * rs + y]) * l2e : -INFINITY;
        }
#pragma unroll
        for (int i = 0; i < 8; ++i)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            s[i][e] = fmaf(s[i][e], sl2, ha[i >> 1] + bw[i & 1][e][0]);
            s[i][2 + e] = fmaf(s[i][2 + e], sl2, hb[i >> 1] + bw[i & 1][e][1]);
            mx[0] = fmaxf(mx[0], s[i][e]);
            mx[1] = fmaxf(mx[1], s[i][2 + e]);
          }
      } else if (whole_rows) {
        // every key of the tile is in range (t = gh * gw); the tile is grid rows GR tile ..
        // GR tile + GR - 1: the first's rel_h in the offset, a later one's difference to it
        // added with rel_w (its n-tiles' x are the first row's)
        hoff[0] = bf(rel[ra * rs + GR * tile]) * l2e;
        hoff[1] = bf(rel[rb * rs + GR * tile]) * l2e;
        float dh[GR][2];
#pragma unroll
        for (int r = 1; r < GR; ++r) {
          dh[r][0] = bf(rel[ra * rs + GR * tile + r]) * l2e - hoff[0];
          dh[r][1] = bf(rel[rb * rs + GR * tile + r]) * l2e - hoff[1];
        }
        float tmx[2] = {-INFINITY, -INFINITY};
#pragma unroll
        for (int i = 0; i < NT; ++i)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int r = i / NB, x = i % NB;
            const float ta = r == 0 ? bw[x][e][0] : bw[x][e][0] + dh[r][0];
            const float tb = r == 0 ? bw[x][e][1] : bw[x][e][1] + dh[r][1];
            s[i][e] = fmaf(s[i][e], sl2, ta);
            s[i][2 + e] = fmaf(s[i][2 + e], sl2, tb);
            tmx[0] = fmaxf(tmx[0], s[i][e]);
            tmx[1] = fmaxf(tmx[1], s[i][2 + e]);
          }
        mx[0] = fmaxf(mx[0], tmx[0] + hoff[0]);
        mx[1] = fmaxf(mx[1], tmx[1] + hoff[1]);
      } else {
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          // this thread's key pair j, j + 1 (j even): one grid row (gw even), rel_w's two terms
          // one 4-byte load
          const int j = tile * BK + 8 * i + 2 * tq;
          float ba[2] = {0.f, 0.f}, bb[2] = {0.f, 0.f};
          if (bias) {
            const int y = (int)__umulhi((uint32_t)j, mgw), x = j - y * gw;
            const float ha = bf(rel[ra * rs + y]), hb = bf(rel[rb * rs + y]);
            const float2 wa = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(rel + ra * rs + gh + x));
            const float2 wb = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(rel + rb * rs + gh + x));
            ba[0] = (ha + wa.x) * l2e;
            ba[1] = (ha + wa.y) * l2e;
            bb[0] = (hb + wb.x) * l2e;
            bb[1] = (hb + wb.y) * l2e;
          }
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            bool in = j + e < t;
            s[i][e] = in ? fmaf(s[i][e], sl2, ba[e]) : -INFINITY;
            s[i][2 + e] = in ? fmaf(s[i][2 + e], sl2, bb[e]) : -INFINITY;
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
      float corr[2] = {ex2(m[0] - mx[0]), ex2(m[1] - mx[1])};
      m[0] = mx[0];
      m[1] = mx[1];
      const float ea = m[0] - hoff[0], eb = m[1] - hoff[1];
      float rsum[2] = {0.f, 0.f};
#pragma unroll
      for (int i = 0; i < NT; ++i) {
        s[i][0] = ex2(s[i][0] - ea);
        s[i][1] = ex2(s[i][1] - ea);
        s[i][2] = ex2(s[i][2] - eb);
        s[i][3] = ex2(s[i][3] - eb);
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
      // transposed ldmatrix; the key groups past t have p = 0
#pragma unroll
      for (int kk = 0; kk < NT / 2; ++kk) {
        if (!FULL && 16 * kk >= kvalid) break;
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
    };
    if (q0 + warp * 16 < t) {
      if (whole_rows || kvalid >= KT)
        step(std::true_type{});
      else
        step(std::false_type{});
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
  bf16* on = out + (BIAS == WIN16 ? 0 : (long long)(ni / heads) * out_seq_stride) + (ni % heads) * HD;
  // the rows written: the queries before t (WIN16: within the image)
  const long long oa = q0 + ra < t ? query_row(q0 + ra) : -1, ob = q0 + rb < t ? query_row(q0 + rb) : -1;
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    int c = 8 * i + 2 * tq;
    if (oa >= 0)
      *reinterpret_cast<uint32_t*>(on + oa * out_row_stride + c) = pack_bf16x2(o[i][0] * inv[0], o[i][1] * inv[0]);
    if (ob >= 0)
      *reinterpret_cast<uint32_t*>(on + ob * out_row_stride + c) = pack_bf16x2(o[i][2] * inv[1], o[i][3] * inv[1]);
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
extern "C" __global__ void __launch_bounds__(128) sam_flash_w40(FLASH_ARGS) { flash<W40>(FLASH_PASS); }
extern "C" __global__ void __launch_bounds__(128) sam_flash_plain(FLASH_ARGS) { flash<NONE>(FLASH_PASS); }
extern "C" __global__ void __launch_bounds__(128, 4) sam_flash_short(FLASH_ARGS) { flash<ANY>(FLASH_PASS); }
extern "C" __global__ void __launch_bounds__(128, 4) sam_flash_rows16(FLASH_ARGS) { flash<ROWS16>(FLASH_PASS); }
extern "C" __global__ void __launch_bounds__(128, 4)
    sam_flash_win(FLASH_ARGS, int img_h, int img_w, const bf16* __restrict__ kb, const bf16* __restrict__ vb) {
  flash<WIN16>(FLASH_PASS, WinGrid{img_h, img_w, kb, vb});
}
