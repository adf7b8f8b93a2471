// embed: token embedding lookup. out[r, :] = table[ids[r], :].
// table (vocab, h) bf16, ids (rows) u32, out (rows, h) bf16; h a multiple of 8.
// Grid: rows blocks; any block size.
#include "common.cuh"

extern "C" __global__ void embed(const bf16* __restrict__ table, const uint32_t* __restrict__ ids,
                                 bf16* __restrict__ out, int h) {
  inputs_ready();
  int r = blockIdx.x;
  const uint4* src = reinterpret_cast<const uint4*>(table + (size_t)ids[r] * h);
  uint4* dst = reinterpret_cast<uint4*>(out + (size_t)r * h);
  for (int c = threadIdx.x; c < h / 8; c += blockDim.x) dst[c] = src[c];
}
