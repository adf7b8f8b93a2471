// rope_kv: half-split rotary embedding (transformers' LlamaAttention / MHA) of q and k at each
// row's position, and the append of k, v to a preallocated KV cache.
// qkv: (rows, (nh + 2*nkv) * hd) bf16, q heads then k heads then v heads, each hd wide; q is
// rotated in place. pos, slot: (rows) u32: the row's position and its sequence's cache slot.
// k_cache, v_cache: (slots, nkv, max_t, hd) bf16; row r writes [slot[r], :, pos[r], :].
// cos/sin as rope_tables: inv_freq = 1 / theta^(2i/hd) and pos*inv_freq in f32, rounded to
// bf16; the rotation in f32, rounded to bf16.
// Grid: (rows, nh + 2*nkv) blocks of 64 threads.
#include "common.cuh"

extern "C" __global__ void rope_kv(bf16* __restrict__ qkv, const uint32_t* __restrict__ pos,
                                   const uint32_t* __restrict__ slot, bf16* __restrict__ k_cache,
                                   bf16* __restrict__ v_cache, int nh, int nkv, int hd, int max_t,
                                   float theta) {
  inputs_ready();
  int r = blockIdx.x, head = blockIdx.y, half = hd / 2;
  uint32_t p = pos[r];
  if (p >= (uint32_t)max_t) return;  // past the cache: nothing is written (the caller bounds steps)
  bf16* x = qkv + (size_t)r * (nh + 2 * nkv) * hd + (size_t)head * hd;
  if (head >= nh + nkv) {
    int vh = head - nh - nkv;
    bf16* dst = v_cache + (((size_t)slot[r] * nkv + vh) * max_t + p) * hd;
    for (int i = threadIdx.x; i < hd; i += blockDim.x) dst[i] = x[i];
    return;
  }
  bf16* kdst = head >= nh ? k_cache + (((size_t)slot[r] * nkv + (head - nh)) * max_t + p) * hd : nullptr;
  for (int i = threadIdx.x; i < half; i += blockDim.x) {
    float c, s;
    rope_cs(p, i, hd, theta, &c, &s);
    float x1 = bf(x[i]), x2 = bf(x[i + half]);
    float2 o = rope_rotate(x1, x2, c, s);
    bf16 o1 = f2bf(o.x), o2 = f2bf(o.y);
    if (kdst) {
      kdst[i] = o1;
      kdst[i + half] = o2;
    } else {
      x[i] = o1;
      x[i + half] = o2;
    }
  }
}
