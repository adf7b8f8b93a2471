// sam_softmax: SAM's attention probabilities with its decomposed relative positions
// (`add_decomposed_rel_pos` + the softmax), computed in place over the raw scores:
//   s[r, j] <- softmax_j( s[r, j] * scale + rel_h[r, j / kw] + rel_w[r, j % kw] )
//   rel_h[r, y] = q[r, :] . rh[i / qw, y, :],  rel_w[r, x] = q[r, :] . rw[i % qw, x, :]
// with i = r % (qh*qw) the query's position in its grid (unscaled q, as the remote code).
// s: (rows, kh*kw) bf16, q k^T unscaled (cuBLAS, before this kernel); q: (rows, d) bf16;
// rh: (qh, kh, d), rw: (qw, kw, d) bf16, the tables `get_rel_pos` gathered. The bias of kh*kw
// values per row is never materialised: the row's kh + kw dot products go to shared memory
// (16-byte table loads, d/8 lanes per term), the row's scores are loaded VEC at a time (16 or 8
// bytes) before the terms are computed, and stay in registers between the max, the
// exponentials and the store. f32 throughout; the probabilities are rounded to bf16 once.
// Kernels (kh*kw a multiple of 4: SAM's square grids of even side; d a power of two times 8,
// at most 256: 64 for SAM ViT-B):
//   sam_softmax_v8 (kh*kw % 8 == 0), sam_softmax_v4: a block per row (global attention);
//     grid: rows blocks, blockDim.x a multiple of 32 with kh*kw <= SAM_MAXV*blockDim.x; dynamic
//     shared memory (d + kh + kw) floats.
//   sam_softmax_rows_v4: a warp per row, 8 rows a block, warp reductions only (windows: short
//     rows, kh*kw <= 32*SAM_MAXV); grid: ceil(rows / 8) blocks of 256 threads; dynamic shared
//     memory 8 * (d + kh + kw) floats.
#include "common.cuh"

#define SAM_MAXV 16

template <int VEC>
struct alignas(2 * VEC) Pack {
  bf16 x[VEC];
};

// How a row is spread: `n` threads (a block or a warp), this one is `idx`; `worker` of `workers`
// warps share the relative-position terms.
struct Spread {
  int n, idx, worker, workers;
};

template <int VEC>
__device__ __forceinline__ void softmax_row(bf16* __restrict__ s, const bf16* __restrict__ q,
                                            const bf16* __restrict__ rh, const bf16* __restrict__ rw,
                                            int qh, int qw, int kh, int kw, int d, float scale,
                                            size_t row, float* sh, Spread sp, float* red) {
  const bool block = red != nullptr;  // else a warp: no block barrier
  float* qs = sh;
  float* relh = sh + d;
  float* relw = relh + kh;
  const int nq = qh * qw, nk = kh * kw;
  const int i = (int)(row % (size_t)nq);
  const int yi = i / qw, xi = i - yi * qw;
  const int lane = threadIdx.x & 31;
  // the row's scores first: their latency overlaps the terms below
  Pack<VEC>* sr = reinterpret_cast<Pack<VEC>*>(s + row * nk);
  constexpr int NV = SAM_MAXV / VEC;
  Pack<VEC> raw[NV];
#pragma unroll
  for (int u = 0; u < NV; ++u) {
    const int p = u * sp.n + sp.idx;
    if (p * VEC < nk) raw[u] = sr[p];
  }
  for (int c = sp.idx; c < d; c += sp.n) qs[c] = bf(q[row * d + c]);
  if (block) __syncthreads(); else __syncwarp();
  // the kh + kw terms: d/8 lanes per term, 32/(d/8) terms per warp at once
  const int lpt = d >> 3, tpw = 32 / lpt;
  const int sub = lane % lpt, slot = lane / lpt;
  for (int t0 = sp.worker * tpw; t0 < kh + kw; t0 += sp.workers * tpw) {
    const int t = t0 + slot;
    float acc = 0.f;
    if (t < kh + kw) {
      const bf16* r = t < kh ? rh + ((size_t)yi * kh + t) * d : rw + ((size_t)xi * kw + (t - kh)) * d;
      acc = dot8f(reinterpret_cast<const uint4*>(r)[sub], qs + 8 * sub);
    }
    for (int o = lpt >> 1; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
    if (sub == 0 && t < kh + kw) {
      if (t < kh)
        relh[t] = acc;
      else
        relw[t - kh] = acc;
    }
  }
  if (block) __syncthreads(); else __syncwarp();
  float v[SAM_MAXV];
  float m = -INFINITY;
#pragma unroll
  for (int u = 0; u < NV; ++u) {
    const int j0 = (u * sp.n + sp.idx) * VEC;
    if (j0 < nk) {
      int y = j0 / kw, x = j0 - y * kw;
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        const float val = fmaf(bf(raw[u].x[e]), scale, relh[y] + relw[x]);
        v[u * VEC + e] = val;
        m = fmaxf(m, val);
        if (++x == kw) { x = 0; ++y; }
      }
    } else {
#pragma unroll
      for (int e = 0; e < VEC; ++e) v[u * VEC + e] = -INFINITY;
    }
  }
  m = block ? block_max(m, red) : warp_max(m);
  float sum = 0.f;
#pragma unroll
  for (int u = 0; u < SAM_MAXV; ++u) {
    v[u] = __expf(v[u] - m);  // exp(-inf) = 0 for the slots past the row
    sum += v[u];
  }
  const float inv = 1.f / (block ? block_sum(sum, red) : warp_sum(sum));
#pragma unroll
  for (int u = 0; u < NV; ++u) {
    const int p = u * sp.n + sp.idx;
    if (p * VEC < nk) {
      Pack<VEC> out;
#pragma unroll
      for (int e = 0; e < VEC; ++e) out.x[e] = f2bf(v[u * VEC + e] * inv);
      sr[p] = out;
    }
  }
}

// A block per row.
template <int VEC>
__device__ __forceinline__ void softmax_block_row(bf16* s, const bf16* q, const bf16* rh,
                                                  const bf16* rw, int qh, int qw, int kh, int kw,
                                                  int d, float scale) {
  extern __shared__ float sh[];
  __shared__ float red[32];
  const Spread sp = {(int)blockDim.x, (int)threadIdx.x, (int)(threadIdx.x >> 5), (int)(blockDim.x >> 5)};
  softmax_row<VEC>(s, q, rh, rw, qh, qw, kh, kw, d, scale, blockIdx.x, sh, sp, red);
}

extern "C" __global__ void sam_softmax_v8(bf16* s, const bf16* q, const bf16* rh, const bf16* rw,
                                          int qh, int qw, int kh, int kw, int d, float scale,
                                          int rows) {
  inputs_ready();
  softmax_block_row<8>(s, q, rh, rw, qh, qw, kh, kw, d, scale);
}

extern "C" __global__ void sam_softmax_v4(bf16* s, const bf16* q, const bf16* rh, const bf16* rw,
                                          int qh, int qw, int kh, int kw, int d, float scale,
                                          int rows) {
  inputs_ready();
  softmax_block_row<4>(s, q, rh, rw, qh, qw, kh, kw, d, scale);
}

// A warp per row, blockDim.x / 32 rows a block.
extern "C" __global__ void sam_softmax_rows_v4(bf16* s, const bf16* q, const bf16* rh,
                                               const bf16* rw, int qh, int qw, int kh, int kw,
                                               int d, float scale, int rows) {
  inputs_ready();
  extern __shared__ float smem_rows[];
  const int warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  const size_t row = (size_t)blockIdx.x * nw + warp;
  if (row >= (size_t)rows) return;  // the whole warp: no block barrier follows
  const Spread sp = {32, (int)(threadIdx.x & 31), 0, 1};
  softmax_row<4>(s, q, rh, rw, qh, qw, kh, kw, d, scale, row, smem_rows + warp * (d + kh + kw), sp, nullptr);
}
