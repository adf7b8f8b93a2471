// norm_linear: add_rmsnorm (any mode) fused with the projection that reads its output, for one
// row (batch-1 decode: the next layer's q/k/v after the MoE):
//   x = resid + delta (as add_rmsnorm's mode: nothing, a bf16 row, the slots' weighted sum)
//   resid_out = x (modes 1, 2; by block 0), y (1, out) = RMSNorm(x) * norm_w . w (out, h)^T
// Every block normalises the row itself (2.5 KB, and the slots' outputs from L2) into shared
// memory instead of waiting for a launch of its own: the kernel boundary between the norm and
// the projection is off the decode step's critical path. The dot is linear's for one row
// (gemv.cuh), so y is bit-identical to add_rmsnorm then linear. resid_out must not alias resid
// (the other blocks still read it). resid, delta, norm_w, y: bf16; slot_out, slot_w: f32.
// h a multiple of 8, at most 2048.
// Grid: ceil(out / (8 R)) blocks of 256 threads: a warp per R outputs (R = 4: few blocks, each
// reading the slots' outputs once for 32 outputs, all resident at once), a thread per 8 columns
// of the norm.
#include "gemv.cuh"

#define U 5

template <int R>
__device__ __forceinline__ void norm_linear_rows(const bf16* __restrict__ resid, bf16* __restrict__ resid_out,
                                       const bf16* __restrict__ delta,
                                       const float* __restrict__ slot_out,
                                       const float* __restrict__ slot_w, int k, int mode,
                                       const bf16* __restrict__ norm_w, float eps,
                                       const bf16* __restrict__ w, bf16* __restrict__ y, int h,
                                       int out) {
  __shared__ float red[32];
  __shared__ uint4 xs[256];
  int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, c = threadIdx.x, nc = h / 8;
  int o0 = (blockIdx.x * (blockDim.x >> 5) + warp) * R;
  bool live = o0 < out, on = c < nc;
  const uint4* wr[R];
#pragma unroll
  for (int q = 0; q < R; ++q) wr[q] = reinterpret_cast<const uint4*>(w + (size_t)min(o0 + q, out - 1) * h);
  bool resident = nc <= 32 * U;
  uint4 wv[R][U];
  if (resident) load_span(wv, wr, lane, nc);  // before the row is ready (see inputs_ready)
  const uint4 zero = make_uint4(0u, 0u, 0u, 0u);
  uint4 wt = on ? __ldg(reinterpret_cast<const uint4*>(norm_w) + c) : zero;
  inputs_ready_hold();  // the attention (its cache loads) starts once the row is loaded
  float v[8];
  unpack8(on ? reinterpret_cast<const uint4*>(resid)[c] : zero, v);
  if (on) add_delta8(v, delta, slot_out, slot_w, k, mode, 0, c, h);
  dependents_may_start();
  // the values are bf16 now: packing them back is exact
  if (blockIdx.x == 0 && mode != 0 && on) reinterpret_cast<uint4*>(resid_out)[c] = pack8(v);
  uint4 xn = rms_norm8(v, wt, h, eps, red);
  if (on) xs[c] = xn;
  __syncthreads();
  if (!live) return;
  const uint4* xr[1] = {xs};
  float acc[R][1];
#pragma unroll
  for (int q = 0; q < R; ++q) acc[q][0] = 0.f;
  span_dots<R, U, 1>(wv, resident, wr, nc, xr, acc);
#pragma unroll
  for (int q = 0; q < R; ++q) {
    float s = warp_sum(acc[q][0]);
    if (lane == 0 && o0 + q < out) y[o0 + q] = f2bf(s);
  }
}

#define NORM_LINEAR_ARGS                                                                         \
  const bf16 *__restrict__ resid, bf16 *__restrict__ resid_out, const bf16 *__restrict__ delta,  \
      const float *__restrict__ slot_out, const float *__restrict__ slot_w, int k, int mode,     \
      const bf16 *__restrict__ norm_w, float eps, const bf16 *__restrict__ w,                    \
      bf16 *__restrict__ y, int h, int out
#define NORM_LINEAR_PASS resid, resid_out, delta, slot_out, slot_w, k, mode, norm_w, eps, w, y, h, out
extern "C" __global__ void norm_linear(NORM_LINEAR_ARGS) { norm_linear_rows<4>(NORM_LINEAR_PASS); }
extern "C" __global__ void norm_linear_r2(NORM_LINEAR_ARGS) { norm_linear_rows<2>(NORM_LINEAR_PASS); }
extern "C" __global__ void norm_linear_r1(NORM_LINEAR_ARGS) { norm_linear_rows<1>(NORM_LINEAR_PASS); }
