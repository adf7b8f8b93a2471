// ngram_ban: the no-repeat n-gram guard on the device (model::generate::NoRepeatNgram::banned):
// for row r with history hist[r, 0..len) (the generated tokens), every earlier n-gram in the
// window whose first n-1 tokens equal the last n-1 tokens bans its last token (unless
// whitelisted): logits[r, token] = -inf.
// hist: (rows, hist_cap) u32; hist_len: (rows) u32; window <= 0: the whole history;
// whitelist: (n_white) u32; logits: (rows, vocab) bf16. Grid: rows blocks of 256 threads.
#include "common.cuh"

extern "C" __global__ void ngram_ban(const uint32_t* __restrict__ hist,
                                     const uint32_t* __restrict__ hist_len, int hist_cap, int n,
                                     int window, const uint32_t* __restrict__ whitelist,
                                     int n_white, bf16* __restrict__ logits, int vocab) {
  inputs_ready();
  int r = blockIdx.x;
  int len = (int)hist_len[r];
  if (n <= 0 || len < n) return;
  const uint32_t* hr = hist + (size_t)r * hist_cap;
  int start = window > 0 ? max(0, len - window) : 0;
  int end = len + 1 - n;
  const uint32_t* prefix = hr + len - (n - 1);
  for (int i = start + threadIdx.x; i < end; i += blockDim.x) {
    bool same = true;
    for (int m = 0; m < n - 1 && same; ++m) same = hr[i + m] == prefix[m];
    if (!same) continue;
    uint32_t t = hr[i + n - 1];
    bool white = false;
    for (int w = 0; w < n_white; ++w) white |= whitelist[w] == t;
    if (!white && t < (uint32_t)vocab) logits[(size_t)r * vocab + t] = f2bf(-INFINITY);
  }
}
