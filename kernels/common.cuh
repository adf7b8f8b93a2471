// Helpers shared by the kernels of this folder (not an op): bf16 conversions, warp and block
// reductions, 8-wide bf16 dot products. Included by every .cu; compiled into each PTX.
#pragma once
#include <cuda_bf16.h>
#include <stdint.h>

typedef __nv_bfloat16 bf16;

__device__ __forceinline__ float bf(bf16 x) { return __bfloat162float(x); }
__device__ __forceinline__ bf16 f2bf(float x) { return __float2bfloat16(x); }
// What a bf16 tensor op of the reference path stores: round to nearest even.
__device__ __forceinline__ float round_bf16(float x) { return bf(f2bf(x)); }

#ifdef OCR_TRACE
// The in-graph timeline (`ocr-patch bench --profile trace`, src/model/kernels/trace.rs): built
// with -DOCR_TRACE (build.rs makes a second PTX of every kernel), thread 0 of each block that
// reaches inputs_ready folds into its launch's slot (%gridid modulo the slots) the time it got
// there (its weight loads issued) and the time the wait let it through (the previous kernel
// finished), from the GPU's nanosecond clock: min and max of each, and a count (of about 256
// blocks a launch). Reductions whose results nobody waits for (RED), so the block is not held
// up. The host fills the slots (mins at the top) and reads them back.
#define OCR_TRACE_SLOTS 8192
extern "C" {
// per slot: grid id, first and last arrival, first and last release, blocks seen, blocks, and
// the last time any block passed each of 8 marks (TRACE_MARK)
__device__ unsigned long long ocr_trace[OCR_TRACE_SLOTS * 15];
}
__device__ __forceinline__ unsigned long long global_ns() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}
// This launch's slot.
__device__ __forceinline__ unsigned long long* trace_slot() {
  unsigned long long grid;
  asm volatile("mov.u64 %0, %%gridid;" : "=l"(grid));
  return ocr_trace + 15 * (grid % OCR_TRACE_SLOTS);
}
__device__ __forceinline__ void trace_block(unsigned long long before) {
  if (threadIdx.x | threadIdx.y | threadIdx.z) return;
  // about 256 blocks of a launch (every stride-th, the last), so that a launch of thousands
  // (lm_head) does not queue on its slot
  unsigned long long nb = (unsigned long long)gridDim.x * gridDim.y * gridDim.z;
  unsigned long long b = blockIdx.x + (unsigned long long)gridDim.x * (blockIdx.y + (unsigned long long)gridDim.y * blockIdx.z);
  if (b % (nb / 256 + 1) != 0 && b != nb - 1) return;
  unsigned long long after = global_ns(), grid;
  asm volatile("mov.u64 %0, %%gridid;" : "=l"(grid));
  unsigned long long* r = trace_slot();
  r[0] = grid;
  r[6] = nb;
  atomicMin(r + 1, before);
  atomicMax(r + 2, before);
  atomicMin(r + 3, after);
  atomicMax(r + 4, after);
  atomicAdd(r + 5, 1ull);
}
// A point inside a kernel (i < 8) whose latest passing, by thread 0 of any block, the
// timeline reports (relative to the launch's first release).
__device__ __forceinline__ void trace_mark(int i) {
  if (threadIdx.x | threadIdx.y | threadIdx.z) return;
  atomicMax(trace_slot() + 7 + i, global_ns());
}
#define TRACE_BEFORE unsigned long long trace_t0 = global_ns();
#define TRACE_AFTER trace_block(trace_t0);
#define TRACE_MARK(i) trace_mark(i);
#else
#define TRACE_BEFORE
#define TRACE_AFTER
#define TRACE_MARK(i)
#endif

// Programmatic dependent launch (Hopper; the host sets
// CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION on every launch, see
// Kernels::launch_raw): a kernel may start while the previous one still runs. Every kernel calls
// inputs_ready() before it reads anything an earlier launch wrote or writes anything an earlier
// launch reads; before it, only loads of weights (never written) may go out. It waits for the
// previous grid to finish and its writes to be visible, then lets the next kernel start, so at
// most one kernel runs ahead, in its weight loads. Without the attribute both are no-ops.
// inputs_ready_hold() waits without letting the next kernel start yet: the kernel calls
// dependents_may_start() once its own first loads after the wait are through (the next
// kernel's weight loads, issued at its start, would otherwise queue on the SMs with them).
__device__ __forceinline__ void inputs_ready_hold() {
  TRACE_BEFORE
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
  TRACE_AFTER
}

__device__ __forceinline__ void dependents_may_start() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

__device__ __forceinline__ void inputs_ready() {
  inputs_ready_hold();
  dependents_may_start();
}

// inputs_ready() once the loads that produced `fold` (any value computed from them) are done:
// ptxas may otherwise sink loads issued before the wait to after it (it did in moe_route), and
// the loads would not overlap the previous kernel. The wait is guarded by a predicate on
// `fold`, both ways, so it cannot be scheduled before the loads complete.
// With `trigger` false it holds the next kernel as inputs_ready_hold() does.
__device__ __forceinline__ void inputs_ready_after(uint32_t fold, bool trigger = true) {
  TRACE_BEFORE
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile(
      "{\n .reg .pred p;\n setp.ne.u32 p, %0, 0;\n @p griddepcontrol.wait;\n"
      " @!p griddepcontrol.wait;\n}" ::"r"(fold)
      : "memory");
#endif
  TRACE_AFTER
  if (trigger) dependents_may_start();
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets the result.
// `red` is 32 floats of shared memory; the call synchronises the block.
__device__ __forceinline__ float block_sum(float v, float* red) {
  int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  v = warp_sum(v);
  __syncthreads();
  if (lane == 0) red[warp] = v;
  __syncthreads();
  float t = lane < nw ? red[lane] : 0.f;
  t = warp_sum(t);
  return t;
}

__device__ __forceinline__ float block_max(float v, float* red) {
  int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  v = warp_max(v);
  __syncthreads();
  if (lane == 0) red[warp] = v;
  __syncthreads();
  float t = lane < nw ? red[lane] : -INFINITY;
  t = warp_max(t);
  return t;
}

// A block's arrival at a counter: a barrier (every thread's earlier writes are done), then
// thread 0 fences at gpu scope and adds n, as CUTLASS's barriers do (one fence per block, not
// one per thread). Returns the counter's value before the add to thread 0 (others: 0). Every
// thread of the block must call it.
__device__ __forceinline__ int arrive(int* counter, int n) {
  __syncthreads();
  int old = 0;
  if (threadIdx.x == 0) {
    __threadfence();
    old = atomicAdd(counter, n);
  }
  return old;
}

// The "last block to arrive finishes" handshake: every block arrives at *counter; this tells
// whether this block is the `expected`-th. That block resets the counter (for the next launch
// or graph replay) and, after its own fence, reads the others' writes (through L2: __ldcg).
// Every thread of the block must call it.
__device__ __forceinline__ bool last_to_arrive(int* counter, int expected) {
  __shared__ int last;
  int old = arrive(counter, 1);
  if (threadIdx.x == 0) {
    last = old == expected - 1;
    if (last) {
      *counter = 0;
      __threadfence();
    }
  }
  __syncthreads();
  return last;
}

// Counted rows between two grids running at once (moe_route -> moe_gate_up's fixed experts):
// the producer's threads store their part of the rows, then publish adds n to *c (arrive: the
// release); the consumer's wait_count returns once *c >= n, each thread with an acquire of its
// own (its later loads see the rows). The consumer only runs while the producer is resident
// (programmatic dependent launch starts it after every producer block has begun) or after it
// has finished (no PDL), so the spin cannot starve the producer.
__device__ __forceinline__ void publish(int* c, int n) { arrive(c, n); }

__device__ __forceinline__ int load_acquire(const int* p) {
  int v;
  asm volatile("ld.acquire.gpu.global.b32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}

// A count that never comes (a producer that does not publish: a caller's error) traps after
// 2^24 naps (over a second) rather than hanging the GPU: the launch fails with an error.
__device__ __forceinline__ void wait_count(const int* c, int n) {
  if (threadIdx.x == 0)
    for (int i = 0; load_acquire(c) < n; ++i) {
      if (i == (1 << 24)) __trap();
      __nanosleep(64);
    }
  __syncthreads();
  (void)load_acquire(c);
}

// cos and sin of half-split RoPE's pair i (of hd/2) at position p, as the reference's
// rope_tables: inv_freq = 1 / theta^(2i/hd) and p * inv_freq in f32, each rounded to bf16.
__device__ __forceinline__ void rope_cs(uint32_t p, int i, int hd, float theta, float* c, float* s) {
  float inv_freq = 1.0f / powf(theta, (float)(2 * i) / (float)hd);
  float f = (float)p * inv_freq;
  *c = round_bf16(cosf(f));
  *s = round_bf16(sinf(f));
}

// The pair (x1, x2) = (x[i], x[i + hd/2]) rotated by (c, s) from rope_cs, in f32.
__device__ __forceinline__ float2 rope_rotate(float x1, float x2, float c, float s) {
  return make_float2(x1 * c - x2 * s, x2 * c + x1 * s);
}

// p[c] when c < n, else zeros: the predicated 16-byte load the matrix-vector kernels issue
// several of before using any.
__device__ __forceinline__ uint4 load_or_zero(const uint4* __restrict__ p, int c, int n) {
  return c < n ? __ldg(p + c) : make_uint4(0u, 0u, 0u, 0u);
}

// 8 bf16 (packed in a uint4) to f32, and back (round to nearest even).
__device__ __forceinline__ void unpack8(uint4 u, float* v) {
  const __nv_bfloat162* p = reinterpret_cast<const __nv_bfloat162*>(&u);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    float2 f = __bfloat1622float2(p[i]);
    v[2 * i] = f.x;
    v[2 * i + 1] = f.y;
  }
}

__device__ __forceinline__ uint4 pack8(const float* v) {
  uint4 u;
  __nv_bfloat162* p = reinterpret_cast<__nv_bfloat162*>(&u);
#pragma unroll
  for (int i = 0; i < 4; ++i) p[i] = __floats2bfloat162_rn(v[2 * i], v[2 * i + 1]);
  return u;
}

// v += the 8 bf16 values d8, each sum rounded to bf16 (the reference's bf16 residual add).
__device__ __forceinline__ void add_round8(float* v, uint4 d8) {
  float d[8];
  unpack8(d8, d);
#pragma unroll
  for (int i = 0; i < 8; ++i) v[i] = round_bf16(v[i] + d[i]);
}

// v (this thread's 8 columns c of row r of the residual stream) += what add_rmsnorm's mode adds
// (see add_rmsnorm.cu): nothing (0), the bf16 row delta (1), or the slots' weighted sum (2:
// sum_j slot_w[r*k+j] * slot_out[r*k+j] in f32, rounded to bf16 once), each sum rounded to bf16.
__device__ __forceinline__ void add_delta8(float* v, const bf16* __restrict__ delta,
                                           const float* __restrict__ slot_out,
                                           const float* __restrict__ slot_w, int k, int mode,
                                           int r, int c, int h) {
  if (mode == 1) {
    add_round8(v, reinterpret_cast<const uint4*>(delta + (size_t)r * h)[c]);
  } else if (mode == 2) {
    float d[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) d[i] = 0.f;
#pragma unroll 8
    for (int j = 0; j < k; ++j) {
      float wj = slot_w[r * k + j];
      const float4* so = reinterpret_cast<const float4*>(slot_out + ((size_t)r * k + j) * h) + 2 * c;
      float4 a = so[0], b = so[1];
      d[0] = fmaf(wj, a.x, d[0]); d[1] = fmaf(wj, a.y, d[1]);
      d[2] = fmaf(wj, a.z, d[2]); d[3] = fmaf(wj, a.w, d[3]);
      d[4] = fmaf(wj, b.x, d[4]); d[5] = fmaf(wj, b.y, d[5]);
      d[6] = fmaf(wj, b.z, d[6]); d[7] = fmaf(wj, b.w, d[7]);
    }
#pragma unroll
    for (int i = 0; i < 8; ++i) v[i] = round_bf16(v[i] + round_bf16(d[i]));
  }
}

// DeepseekV2RMSNorm of a row held 8 values a thread (a thread per 8 columns; threads past the
// row hold zeros and get a result nobody stores): bf16(bf16(v / sqrt(mean(v^2) + eps)) * w),
// packed. Every thread of the block calls it (a block reduction); red: 32 floats of shared memory.
__device__ __forceinline__ uint4 rms_norm8(const float* v, uint4 w8, int h, float eps, float* red) {
  float ss = 0.f;
#pragma unroll
  for (int i = 0; i < 8; ++i) ss = fmaf(v[i], v[i], ss);
  ss = block_sum(ss, red);
  float denom = sqrtf(ss / (float)h + eps);
  float w[8], o[8];
  unpack8(w8, w);
#pragma unroll
  for (int i = 0; i < 8; ++i) o[i] = round_bf16(v[i] / denom) * w[i];
  return pack8(o);
}

// Dot product of 8 bf16 pairs packed in two uint4, accumulated in f32.
__device__ __forceinline__ float dot8(uint4 a, uint4 b) {
  const __nv_bfloat162* pa = reinterpret_cast<const __nv_bfloat162*>(&a);
  const __nv_bfloat162* pb = reinterpret_cast<const __nv_bfloat162*>(&b);
  float acc = 0.f;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    float2 fa = __bfloat1622float2(pa[i]);
    float2 fb = __bfloat1622float2(pb[i]);
    acc = fmaf(fa.x, fb.x, acc);
    acc = fmaf(fa.y, fb.y, acc);
  }
  return acc;
}

// Dot product of 8 bf16 (packed) with 8 f32 values.
__device__ __forceinline__ float dot8f(uint4 a, const float* b) {
  const __nv_bfloat162* pa = reinterpret_cast<const __nv_bfloat162*>(&a);
  float acc = 0.f;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    float2 fa = __bfloat1622float2(pa[i]);
    acc = fmaf(fa.x, b[2 * i], acc);
    acc = fmaf(fa.y, b[2 * i + 1], acc);
  }
  return acc;
}
