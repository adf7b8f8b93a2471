// moe_route: MoEGate on the device, no host round-trip. Per row: logits = x . gate_w^T in f32
// (F.linear(h.float(), weight.float())), scores = softmax or sigmoid, top-k by the method
// (0 greedy, 1 group_limited_greedy, 2 noaux_tc with e_score_correction_bias), weights
// normalised (norm_topk_prob and topk > 1) and scaled by routed_scaling_factor, exactly as
// model::decoder::moe::route (ties go to the lower expert id).
// The row's slots: k = topk + n_fixed; slot j < topk is the j-th chosen expert, slots
// topk..k are the fixed experts e_routed + s with weight 1 (the shared experts, split into
// moe_intermediate_size-wide pieces; the dense MLP is one fixed expert).
// Then the plan (moe_plan.cuh) of all rows' slots, so the grouped kernels follow directly.
// Three stages in one launch, each finished by the last block to arrive (a counter in `done`,
// reset by that block for the next launch or graph replay):
//   1. block (r, g) computes the gate logits of experts g*8 .. g*8+7 of row r (a warp per
//      expert: the gate's rows are spread over the GPU, not read by one SM) into `logits`;
//   2. the last of row r's blocks chooses its experts (greedy: every expert's rank among the
//      scores, by the whole block; the group methods, rarer: one thread);
//   3. the last row to be chosen plans the slots of every row (one row: from shared memory).
// With `resid` set (the fast decoder's MoE layers) the routed rows are first made here, as
// add_rmsnorm mode 1 makes them: x = bf16(resid + delta), normed = bf16(bf16(x / rms) * norm_w);
// every block of the row computes them (a thread per 8 columns, while its gate loads are in
// flight); the row's last block stores x into resid (the others read resid until they are
// done) and, without `ready`, the normed row into `normed` (h <= MAX_H). Without `resid`, `x`
// holds the normed rows.
// ready (or null): one more block per row (y = the last, no gate rows) stores the normed row at
// once and adds 1 (publish): moe_gate_up's fixed experts, launched while this kernel runs, start
// on the rows then, off the routing's path. It arrives with the others (it reads resid too).
// x: (rows, h) bf16 or null; resid, delta, normed: (rows, h) bf16; norm_w: (h) bf16;
// gate_w: (e, h) bf16; bias: (e) f32 or null; logits: (rows, e) f32
// scratch; done: (rows + 1) i32, zero before the first launch; slot_expert: (rows*k) i32;
// slot_w: (rows*k) f32; offsets, list, active, n_active: as moe_plan, over e_total experts.
// Grid: (rows, ceil(e / 8) + (ready ? 1 : 0)) blocks of 256 threads. e <= 512, topk <= 32,
// e_total <= 1024.
#include "gemv.cuh"
#include "moe_plan.cuh"

#define MAX_E 512
#define MAX_E_TOTAL 1024
#define MAX_H 2048
#define U 5

__device__ void choose_groups(float* s, float* tmp, float* gs, unsigned char* used, int* sel,
                              float* wsel, const float* __restrict__ bias, int e, int topk,
                              int method, int scoring, int n_group, int topk_group);

// The choice of row r's experts from its logits s (shared memory, e of them); writes the
// row's k slots. Called by the whole block; greedy uses all of it, the group methods thread 0.
__device__ void choose(float* s, float* tmp, float* gs, unsigned char* used, int* sel, int r,
                       const float* __restrict__ bias, int e, int topk, int n_fixed, int method,
                       int scoring, int n_group, int topk_group, int norm_topk, float scale,
                       int* __restrict__ slot_expert, float* __restrict__ slot_w) {
  // the chosen weights, before normalisation: in shared memory, as the slots' global ones would
  // be read back one dependent round trip at a time
  __shared__ float wsel[32];
  int k = topk + n_fixed;
  int* se = slot_expert + (size_t)r * k;
  float* sw = slot_w + (size_t)r * k;
  if (method == 0) {
    // greedy, the whole block at once (a warp's k rounds of argmax ran ~8 us: one warp's
    // dependent shuffles on an SM that the experts' blocks keep busy): the scores (softmax or
    // sigmoid), then each expert's rank among them (value desc, id asc: the order k rounds of
    // argmax take), the first topk by rank chosen
    __shared__ float cred[32];
    int tid = threadIdx.x, bd = blockDim.x;
    if (scoring == 0) {
      float mx = -INFINITY;
      for (int i = tid; i < e; i += bd) mx = fmaxf(mx, s[i]);
      mx = block_max(mx, cred);
      float sum = 0.f;
      for (int i = tid; i < e; i += bd) {
        float v = expf(s[i] - mx);
        tmp[i] = v;
        sum += v;
      }
      sum = block_sum(sum, cred);
      for (int i = tid; i < e; i += bd) tmp[i] = tmp[i] / sum;
    } else {
      for (int i = tid; i < e; i += bd) tmp[i] = 1.f / (1.f + expf(-s[i]));
    }
    __syncthreads();
    // 4 threads an expert (lanes 4i..4i+3 of a warp), each over a quarter of the others
    for (int i0 = 0; i0 < e; i0 += bd / 4) {
      int i = i0 + tid / 4, q = tid & 3;
      float vi = i < e ? tmp[i] : 0.f;
      int rank = 0;
      for (int j = q; j < e; j += 4) {
        float vj = tmp[j];
        rank += vj > vi || (vj == vi && j < i);
      }
      rank += __shfl_xor_sync(0xffffffffu, rank, 1);
      rank += __shfl_xor_sync(0xffffffffu, rank, 2);
      if (i < e && q == 0 && rank < topk) {
        sel[rank] = i;
        wsel[rank] = vi;
      }
    }
  } else if (threadIdx.x == 0) {
    choose_groups(s, tmp, gs, used, sel, wsel, bias, e, topk, method, scoring, n_group, topk_group);
  }
  __syncthreads();
  // the row's slots, a thread each (stored at once: a store per round stalled on SMs busy with
  // the experts' loads); the weights' sum in the order chosen
  bool norm = topk > 1 && norm_topk;
  for (int j = threadIdx.x; j < k; j += blockDim.x) {
    float wsum = 0.f;
    for (int t = 0; t < topk; ++t) wsum += wsel[t];
    int x = j < topk ? sel[j] : e + (j - topk);
    sel[j] = x;
    se[j] = x;
    sw[j] = j >= topk ? 1.f : norm ? wsel[j] / (wsum + 1e-20f) * scale : wsel[j] * scale;
  }
}

// The group methods' choice (group_limited_greedy, noaux_tc) of topk experts from the logits s,
// by one thread: the experts into sel[0..topk), their weights before normalisation into wsel.
__device__ void choose_groups(float* s, float* tmp, float* gs, unsigned char* used, int* sel,
                              float* wsel, const float* __restrict__ bias, int e, int topk,
                              int method, int scoring, int n_group, int topk_group) {
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
  for (int t = 0; t < topk; ++t) {
    int best = -1;
    for (int i = 0; i < e; ++i)
      if (!used[i] && (best < 0 || tmp[i] > tmp[best])) best = i;
    used[best] = 1;
    sel[t] = best;
    wsel[t] = method == 1 ? tmp[best] : s[best];
  }
}

extern "C" __global__ void moe_route(const bf16* __restrict__ x, bf16* __restrict__ resid,
                                     const bf16* __restrict__ delta,
                                     const bf16* __restrict__ norm_w, float eps,
                                     bf16* __restrict__ normed, const bf16* __restrict__ gate_w,
                                     const float* __restrict__ bias, int h, int e, int topk,
                                     int n_fixed, int method, int scoring, int n_group,
                                     int topk_group, int norm_topk, float scale,
                                     float* __restrict__ logits, int* __restrict__ done,
                                     int* __restrict__ slot_expert, float* __restrict__ slot_w,
                                     int e_total, int* __restrict__ offsets,
                                     int* __restrict__ list, int* __restrict__ active,
                                     int* __restrict__ n_active, int* ready) {
  __shared__ float s[MAX_E];     // scores
  __shared__ float tmp[MAX_E];   // scores used for the choice
  __shared__ float gs[MAX_E];    // group scores
  __shared__ unsigned char used[MAX_E];
  __shared__ int cnt[MAX_E_TOTAL];
  __shared__ int sel[64];  // the chosen row's slots' experts (topk + n_fixed)
  __shared__ __align__(16) bf16 xs[MAX_H];  // the row's normed input (fused mode)
  __shared__ float red[32];
  int r = blockIdx.x, rows = gridDim.x, lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  int nc = h / 8;
  int gate_blocks = (int)gridDim.y - (ready ? 1 : 0);
  bool publisher = (int)blockIdx.y == gate_blocks;
  // 1. this warp's expert's gate row: the first span's loads go out before anything else
  int ex = blockIdx.y * (blockDim.x >> 5) + warp;
  const uint4* wr[1] = {reinterpret_cast<const uint4*>(gate_w + (size_t)min(ex, e - 1) * h)};
  uint4 wv[1][U];
  uint32_t fold = 0;
  if (!publisher) {
    load_span(wv, wr, lane, nc);
#pragma unroll
    for (int i = 0; i < U; ++i) fold ^= wv[0][i].x;
  }
  // the fused residual add + RMSNorm (as add_rmsnorm mode 1), a thread per 8 columns; every
  // block of the row computes it. The residual (written launches ago, before the kernel this
  // one follows began) and the norm's weight load before the wait too.
  bool fused = resid != nullptr, on = (int)threadIdx.x < nc;
  uint4 zero = make_uint4(0u, 0u, 0u, 0u);
  uint4 x8 = fused && on ? __ldcg(reinterpret_cast<const uint4*>(resid + (size_t)r * h) + threadIdx.x) : zero;
  uint4 w8 = fused && on ? __ldg(reinterpret_cast<const uint4*>(norm_w) + threadIdx.x) : zero;
  // the loads are in flight while the previous kernel finishes; moe_gate_up (its fixed experts'
  // rows: ~9 MB) may start once the row is normed
  inputs_ready_after(fold ^ x8.x ^ w8.x, false);
  uint4 xnew = zero, hnew;
  if (fused) {
    float v[8];
    unpack8(x8, v);
    add_round8(v, on ? reinterpret_cast<const uint4*>(delta + (size_t)r * h)[threadIdx.x] : zero);
    xnew = pack8(v);
    hnew = rms_norm8(v, w8, h, eps, red);
    if (on) reinterpret_cast<uint4*>(publisher ? normed + (size_t)r * h : xs)[threadIdx.x] = hnew;
    __syncthreads();
  }
  if (publisher) publish(ready, 1);  // the normed row is stored (or was given complete)
  dependents_may_start();
  TRACE_MARK(0)
  const uint4* xr = fused ? reinterpret_cast<const uint4*>(xs)
                          : reinterpret_cast<const uint4*>(x + (size_t)r * h);
  if (ex < e) {
    float acc[1][1] = {{0.f}};
    const uint4* xv[1] = {xr};
    span_dots<1, U, 1>(wv, nc <= 32 * U, wr, nc, xv, acc);
    float sum = warp_sum(acc[0][0]);
    if (lane == 0) logits[(size_t)r * e + ex] = sum;
  }
  TRACE_MARK(1)
  // 2. the row's last block stores the residual and chooses
  // (every block of the row, the publisher too, has read resid before the last one stores it)
  if (!last_to_arrive(&done[r], gridDim.y)) return;
  TRACE_MARK(2)
  if (fused && on) {
    reinterpret_cast<uint4*>(resid + (size_t)r * h)[threadIdx.x] = xnew;
    if (!ready) reinterpret_cast<uint4*>(normed + (size_t)r * h)[threadIdx.x] = hnew;
  }
  for (int i = threadIdx.x; i < e; i += blockDim.x) s[i] = __ldcg(logits + (size_t)r * e + i);
  __syncthreads();
  choose(s, tmp, gs, used, sel, r, bias, e, topk, n_fixed, method, scoring, n_group, topk_group,
         norm_topk, scale, slot_expert, slot_w);
  TRACE_MARK(3)
  // 3. the last row chosen plans every row's slots (one row: this block, from shared memory)
  int n_slots = rows * (topk + n_fixed);
  if (rows == 1) {
    __syncthreads();
    plan_row(sel, n_slots, e_total, offsets, list, active, n_active);
    TRACE_MARK(4)
    return;
  }
  if (!last_to_arrive(&done[rows], rows)) return;
  plan_slots([=](int i) { return __ldcg(slot_expert + i); }, n_slots, e_total, cnt, offsets, list,
             active, n_active);
}

