// moe_route: MoEGate on the device, no host round-trip. Per row: logits = x . gate_w^T in f32
// (F.linear(h.float(), weight.float())), scores = softmax or sigmoid, top-k by the method
// (0 greedy, 1 group_limited_greedy, 2 noaux_tc with e_score_correction_bias), weights
// normalised (norm_topk_prob and topk > 1) and scaled by routed_scaling_factor, exactly as
// model::decoder::moe::route (ties go to the lower expert id).
// The row's slots: k = topk + n_fixed; slot j < topk is the j-th chosen expert, slots
// topk..k are the fixed experts e_routed + s with weight 1 (the shared experts, split into
// moe_intermediate_size-wide pieces; the dense MLP is one fixed expert).
// x: (rows, h) bf16; gate_w: (e, h) bf16; bias: (e) f32 or null; slot_expert: (rows*k) i32;
// slot_w: (rows*k) f32. Grid: rows blocks of 1024 threads (a warp per 1/32 of the gate's rows).
// e <= 512, topk <= 32.
// Greedy routing (DeepSeek-OCR's) picks with one warp's shuffles; the group methods, rarer, with
// one thread.
#include "common.cuh"

#define MAX_E 512

extern "C" __global__ void __launch_bounds__(1024) moe_route(const bf16* __restrict__ x, const bf16* __restrict__ gate_w,
                                     const float* __restrict__ bias, int h, int e, int topk,
                                     int n_fixed, int method, int scoring, int n_group,
                                     int topk_group, int norm_topk, float scale,
                                     int* __restrict__ slot_expert, float* __restrict__ slot_w) {
  __shared__ float s[MAX_E];     // scores
  __shared__ float tmp[MAX_E];   // scores used for the choice
  __shared__ float gs[MAX_E];    // group scores
  __shared__ unsigned char used[MAX_E];
  int r = blockIdx.x, lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  const uint4* xr = reinterpret_cast<const uint4*>(x + (size_t)r * h);
  for (int ex = warp; ex < e; ex += nw) {
    const uint4* wr = reinterpret_cast<const uint4*>(gate_w + (size_t)ex * h);
    float acc = 0.f;
#pragma unroll 5
    for (int c = lane; c < h / 8; c += 32) acc += dot8(wr[c], xr[c]);
    acc = warp_sum(acc);
    if (lane == 0) s[ex] = acc;
  }
  __syncthreads();
  int k = topk + n_fixed;
  int* se = slot_expert + (size_t)r * k;
  float* sw = slot_w + (size_t)r * k;
  if (method == 0) {
    // greedy: one warp, each lane holding experts lane, lane+32, ...; softmax and k rounds of
    // a warp argmax (value desc, id asc)
    if (warp != 0) return;
    const int PER = MAX_E / 32;
    float v[PER];
    float mx = -INFINITY;
#pragma unroll
    for (int i = 0; i < PER; ++i) {
      int ex = lane + 32 * i;
      v[i] = ex < e ? s[ex] : -INFINITY;
      mx = fmaxf(mx, v[i]);
    }
    if (scoring == 0) {
      mx = warp_max(mx);
      float sum = 0.f;
#pragma unroll
      for (int i = 0; i < PER; ++i) {
        v[i] = lane + 32 * i < e ? expf(v[i] - mx) : 0.f;
        sum += v[i];
      }
      sum = warp_sum(sum);
#pragma unroll
      for (int i = 0; i < PER; ++i) v[i] = lane + 32 * i < e ? v[i] / sum : -INFINITY;
    } else {
#pragma unroll
      for (int i = 0; i < PER; ++i) v[i] = lane + 32 * i < e ? 1.f / (1.f + expf(-v[i])) : -INFINITY;
    }
    unsigned taken = 0;  // bit i: v[i] chosen
    float wsum = 0.f;
    for (int t = 0; t < topk; ++t) {
      float bv = -INFINITY;
      int bi = 0x7fffffff;
#pragma unroll
      for (int i = 0; i < PER; ++i) {
        int ex = lane + 32 * i;
        if (ex < e && !(taken >> i & 1u) && (v[i] > bv || bi == 0x7fffffff)) { bv = v[i]; bi = ex; }
      }
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) {
        float ov = __shfl_xor_sync(0xffffffffu, bv, o);
        int oi = __shfl_xor_sync(0xffffffffu, bi, o);
        if (ov > bv || (ov == bv && oi < bi)) { bv = ov; bi = oi; }
      }
      if ((bi & 31) == lane) taken |= 1u << (bi >> 5);
      if (lane == 0) { se[t] = bi; sw[t] = bv; }
      wsum += bv;
    }
    if (lane == 0) {
      if (topk > 1 && norm_topk) {
        float denom = wsum + 1e-20f;
        for (int t = 0; t < topk; ++t) sw[t] = sw[t] / denom * scale;
      } else {
        for (int t = 0; t < topk; ++t) sw[t] *= scale;
      }
      for (int f = 0; f < n_fixed; ++f) { se[topk + f] = e + f; sw[topk + f] = 1.f; }
    }
    return;
  }
  if (threadIdx.x != 0) return;
  if (scoring == 0) {
    float m = -INFINITY;
    for (int i = 0; i < e; ++i) m = fmaxf(m, s[i]);
    float sum = 0.f;
    for (int i = 0; i < e; ++i) { s[i] = expf(s[i] - m); sum += s[i]; }
    for (int i = 0; i < e; ++i) s[i] /= sum;
  } else {
    for (int i = 0; i < e; ++i) s[i] = 1.f / (1.f + expf(-s[i]));
  }
  for (int i = 0; i < e; ++i) {
    tmp[i] = (method == 2 && bias) ? s[i] + bias[i] : s[i];
    used[i] = 0;
  }
  if (method != 0) {
    int per = e / n_group;
    for (int g = 0; g < n_group; ++g) {
      const float* c = tmp + g * per;
      if (method == 1) {
        float m = -INFINITY;
        for (int i = 0; i < per; ++i) m = fmaxf(m, c[i]);
        gs[g] = m;
      } else {  // sum of the group's top 2
        int b0 = 0;
        for (int i = 1; i < per; ++i) if (c[i] > c[b0]) b0 = i;
        int b1 = -1;
        for (int i = 0; i < per; ++i) if (i != b0 && (b1 < 0 || c[i] > c[b1])) b1 = i;
        gs[g] = c[b0] + (b1 >= 0 ? c[b1] : 0.f);
      }
    }
    // keep the topk_group best groups (ties: lower group), zero the others (masked_fill 0.0)
    for (int t = 0; t < topk_group; ++t) {
      int best = -1;
      for (int g = 0; g < n_group; ++g)
        if (!used[g] && (best < 0 || gs[g] > gs[best])) best = g;
      used[best] = 1;
    }
    for (int i = 0; i < e; ++i) if (!used[i / per]) tmp[i] = 0.f;
    for (int i = 0; i < e; ++i) used[i] = 0;
  }
  float sum = 0.f;
  for (int t = 0; t < topk; ++t) {
    int best = -1;
    for (int i = 0; i < e; ++i)
      if (!used[i] && (best < 0 || tmp[i] > tmp[best])) best = i;
    used[best] = 1;
    se[t] = best;
    float w = method == 1 ? tmp[best] : s[best];
    sw[t] = w;
    sum += w;
  }
  if (topk > 1 && norm_topk) {
    float denom = sum + 1e-20f;
    for (int t = 0; t < topk; ++t) sw[t] = sw[t] / denom * scale;
  } else {
    for (int t = 0; t < topk; ++t) sw[t] *= scale;
  }
  for (int f = 0; f < n_fixed; ++f) {
    se[topk + f] = e + f;
    sw[topk + f] = 1.f;
  }
}
