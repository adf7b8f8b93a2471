// patches: the k x k patches of an NHWC image, zero outside it, in the layout a GEMM takes
// them, and the inverse for windows (SAM's window_partition / window_unpartition):
//   patches:   out[b, oy, ox, ky, kx, :] = x[b, oy*s - p + ky, ox*s - p + kx, :]  (0 outside)
//              im2col of a k x k convolution with stride s and padding p (the neck's 3 x 3
//              convolutions on NHWC), and with k = s = ws, p = 0 SAM's windows (the bottom and
//              right padding zero-filled, no padded copy made first).
//   unpatch:   out[b, y, x, :] = win[b, y / ws, x / ws, y % ws, x % ws, :]  for y < h, x < w
//              (the windows put back, the padding cropped, in one pass).
// x, out, win: bf16; c a multiple of 8 (16 bytes a thread). Sizes < 2^31 elements (the host
// checks).
// Grid: ceil(out elements / 8 / 256) blocks of 256 threads.
#include "common.cuh"

extern "C" __global__ void patches(const bf16* __restrict__ x, bf16* __restrict__ out, int b,
                                   int h, int w, int c, int k, int s, int p, int oh, int ow) {
  inputs_ready();
  const unsigned c8 = c / 8, n8 = (unsigned)b * oh * ow * k * k * c8;
  const unsigned i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n8) return;
  unsigned e = i;
  const int cc = (int)(e % c8); e /= c8;
  const int kx = (int)(e % k); e /= k;
  const int ky = (int)(e % k); e /= k;
  const int ox = (int)(e % ow); e /= ow;
  const int oy = (int)(e % oh);
  const int bi = (int)(e / oh);
  const int y = oy * s - p + ky, xx = ox * s - p + kx;
  uint4 v = make_uint4(0u, 0u, 0u, 0u);
  if (y >= 0 && y < h && xx >= 0 && xx < w)
    v = reinterpret_cast<const uint4*>(x + (((size_t)bi * h + y) * w + xx) * c)[cc];
  reinterpret_cast<uint4*>(out)[i] = v;
}

extern "C" __global__ void unpatch(const bf16* __restrict__ win, bf16* __restrict__ out, int b,
                                   int h, int w, int c, int ws) {
  inputs_ready();
  const unsigned c8 = c / 8, n8 = (unsigned)b * h * w * c8;
  const unsigned i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n8) return;
  unsigned e = i;
  const int cc = (int)(e % c8); e /= c8;
  const int x = (int)(e % w); e /= w;
  const int y = (int)(e % h);
  const int bi = (int)(e / h);
  const int nwh = (h + ws - 1) / ws, nww = (w + ws - 1) / ws;
  const size_t src = ((((size_t)bi * nwh + y / ws) * nww + x / ws) * ws + y % ws) * ws + x % ws;
  reinterpret_cast<uint4*>(out)[i] = reinterpret_cast<const uint4*>(win + src * c)[cc];
}
