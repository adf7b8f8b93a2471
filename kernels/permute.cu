// permute: a strided bf16 view copied to a contiguous tensor (what `Tensor::contiguous` does
// after a permute), 8 elements (16 bytes) per thread: the vision towers' head splits and merges
// and SAM's window partitions. The view: `rank` <= 6 dims, outermost first, strides in
// elements; the innermost dim has stride 1 and a size that is a multiple of 8, the other
// strides and the view's start are multiples of 8 (16-byte aligned loads). Sizes < 2^31.
// Grid: ceil(n / 8 / 256) blocks of 256 threads.
#include "common.cuh"

struct View {
  int n[6];
  long long st[6];
};

extern "C" __global__ void permute(const bf16* __restrict__ in, bf16* __restrict__ out, int n8,
                                   int rank, View v) {
  inputs_ready();
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n8) return;
  unsigned e = (unsigned)i * 8u;
  long long off = 0;
#pragma unroll
  for (int k = 5; k >= 0; --k) {
    if (k < rank) {
      const unsigned n = (unsigned)v.n[k];
      const unsigned idx = e % n;
      e /= n;
      off += (long long)idx * v.st[k];
    }
  }
  reinterpret_cast<uint4*>(out)[i] = *reinterpret_cast<const uint4*>(in + off);
}
