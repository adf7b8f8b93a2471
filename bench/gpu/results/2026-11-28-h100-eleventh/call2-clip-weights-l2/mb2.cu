// CLIP's four GEMMs per layer over 24 layers of distinct weights in one CUDA graph: cold (the weights
// from HBM), hot (one layer's weights 24 times), and cold with the next layer's weights prefetched
// into L2 (cp.async.bulk.prefetch.L2 on a forked stream) while the current layer runs.
#include <cstdio>
#include <vector>
#include <algorithm>
#include <cstdlib>
#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cublasLt.h>
__global__ void fill(__nv_bfloat16* p, size_t n, unsigned seed, float sc) {
  size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
  if (i < n) { unsigned h = (unsigned)i * 2654435761u ^ seed; h ^= h >> 13; h *= 0x5bd1e995; h ^= h >> 15;
    p[i] = __float2bfloat16(((h & 0xffff) / 65535.f - 0.5f) * sc); }
}
__device__ float rb(float v) { return __bfloat162float(__float2bfloat16(v)); }
__global__ void bias_act(__nv_bfloat16* y, const __nv_bfloat16* b, int n) {
  int c0 = (blockIdx.y * blockDim.x + threadIdx.x) * 8; if (c0 >= n) return;
  size_t i = (size_t)blockIdx.x * n + c0;
  for (int j = 0; j < 8; ++j) { float v = rb(__bfloat162float(y[i + j]) + __bfloat162float(b[c0 + j]));
    v = rb(v / (1.f + __expf(-1.702f * v))); y[i + j] = __float2bfloat16(v); }
}
// stands for a layer's layer norms and attention: 80 blocks busy for `ns` nanoseconds
__global__ void spin(long long ns) { long long t0; asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t0)); long long t; do { asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t)); } while (t - t0 < ns); }
__global__ void prefetch_l2(const char* p, size_t bytes) {
  const size_t chunk = 16384;
  for (size_t off = (blockIdx.x * (size_t)blockDim.x + threadIdx.x) * chunk; off < bytes; off += (size_t)gridDim.x * blockDim.x * chunk) {
    unsigned n = (unsigned)(bytes - off < chunk ? bytes - off : chunk);
    asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(p + off), "r"(n) : "memory");
  }
}
struct G { int m, k, n; bool bias, res; cublasLtMatmulDesc_t d; cublasLtMatrixLayout_t la, lb, lc; cublasLtMatmulAlgo_t algo; };
int main(int argc, char** argv) {
  int rows = argc > 1 ? atoi(argv[1]) : 257; long long spin_ns = argc > 2 ? atoll(argv[2]) : 12000;
  const int L = 24, C = 1024, F = 4096;
  cublasLtHandle_t lh; cublasLtCreate(&lh);
  cudaStream_t s, s2; cudaStreamCreate(&s); cudaStreamCreate(&s2);
  void* ws; size_t wsl = 32 << 20; cudaMalloc(&ws, wsl);
  // one slab per layer: qkv (3C x C), out (C x C), fc1 (F x C), fc2 (C x F), biases
  size_t per = (size_t)3 * C * C + C * C + F * C + C * F + 3 * C + C + F + C;
  size_t off_w[4] = {0, (size_t)3 * C * C, (size_t)4 * C * C, (size_t)4 * C * C + F * C};
  size_t off_b[4] = {off_w[3] + (size_t)C * F, off_w[3] + (size_t)C * F + 3 * C, off_w[3] + (size_t)C * F + 4 * C, off_w[3] + (size_t)C * F + 4 * C + F};
  __nv_bfloat16 *W, *x, *normed, *qkv, *heads, *hidden;
  cudaMalloc(&W, per * L * 2); fill<<<(per * L + 255) / 256, 256>>>(W, per * L, 7, 0.05f);
  cudaMalloc(&x, (size_t)rows * C * 2); fill<<<(rows * C + 255) / 256, 256>>>(x, (size_t)rows * C, 1, 2.f);
  cudaMalloc(&normed, (size_t)rows * C * 2); fill<<<(rows * C + 255) / 256, 256>>>(normed, (size_t)rows * C, 2, 2.f);
  cudaMalloc(&qkv, (size_t)rows * 3 * C * 2); cudaMalloc(&heads, (size_t)rows * C * 2); fill<<<(rows * C + 255) / 256, 256>>>(heads, (size_t)rows * C, 3, 2.f);
  cudaMalloc(&hidden, (size_t)rows * F * 2);
  G g[4] = {{rows, C, 3 * C, true, false}, {rows, C, C, true, true}, {rows, C, F, false, false}, {rows, F, C, true, true}};
  float one = 1, zero = 0;
  __nv_bfloat16* ins[4] = {normed, heads, normed, hidden};
  __nv_bfloat16* outs[4] = {qkv, x, hidden, x};
  auto call = [&](int i, int layer, cudaStream_t st) {
    G& q = g[i]; const __nv_bfloat16* w = W + per * layer + off_w[i]; const __nv_bfloat16* b = W + per * layer + off_b[i];
    cublasLtMatmulDescSetAttribute(q.d, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &b, sizeof b);
    float beta = q.res ? 1.f : 0.f;
    cublasLtMatmul(lh, q.d, &one, w, q.la, ins[i], q.lb, &beta, outs[i], q.lc, outs[i], q.lc, &q.algo, ws, wsl, st);
    if (i == 2) bias_act<<<dim3(rows, (F / 8 + 127) / 128), 128, 0, st>>>(hidden, b, F);
  };
  cudaEvent_t e0, e1; cudaEventCreate(&e0); cudaEventCreate(&e1);
  for (int i = 0; i < 4; ++i) {
    G& q = g[i]; cublasLtMatmulDescCreate(&q.d, CUBLAS_COMPUTE_32F, CUDA_R_32F);
    int ta = 1, tb = 0; cublasLtMatmulDescSetAttribute(q.d, CUBLASLT_MATMUL_DESC_TRANSA, &ta, 4); cublasLtMatmulDescSetAttribute(q.d, CUBLASLT_MATMUL_DESC_TRANSB, &tb, 4);
    cublasLtEpilogue_t ep = q.bias ? CUBLASLT_EPILOGUE_BIAS : CUBLASLT_EPILOGUE_DEFAULT; cublasLtMatmulDescSetAttribute(q.d, CUBLASLT_MATMUL_DESC_EPILOGUE, &ep, sizeof ep);
    cublasLtMatrixLayoutCreate(&q.la, CUDA_R_16BF, q.k, q.n, q.k); cublasLtMatrixLayoutCreate(&q.lb, CUDA_R_16BF, q.k, q.m, q.k); cublasLtMatrixLayoutCreate(&q.lc, CUDA_R_16BF, q.n, q.m, q.n);
    cublasLtMatmulPreference_t pref; cublasLtMatmulPreferenceCreate(&pref); size_t wsb = wsl; cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &wsb, 8);
    cublasLtMatmulHeuristicResult_t hr[32]; int cnt = 0; cublasLtMatmulAlgoGetHeuristic(lh, q.d, q.la, q.lb, q.lc, q.lc, pref, 32, hr, &cnt);
    // the fastest over the 24 layers' weights (cold, as the product's tuning sees them)
    float best = 1e30f;
    for (int a = 0; a < cnt; ++a) {
      q.algo = hr[a].algo; call(i, 0, s); if (cudaStreamSynchronize(s) != cudaSuccess) continue;
      cudaEventRecord(e0, s); for (int r = 0; r < 3; ++r) for (int l = 0; l < L; ++l) call(i, l, s); cudaEventRecord(e1, s); cudaEventSynchronize(e1);
      float ms; cudaEventElapsedTime(&ms, e0, e1); if (ms < best) { best = ms; } else continue;
      G keep = q; (void)keep; g[i].algo = hr[a].algo; hr[0].algo = hr[a].algo;
    }
    q.algo = hr[0].algo;
  }
  // mode 0: cold; 1: hot (layer 0's weights every time); 2: cold + prefetch of the next layer; 3: no GEMMs (the spin alone)
  const char* names[] = {"cold (24 layers' weights)", "hot (one layer's weights)", "cold + L2 prefetch of the next layer", "the stand-in for LN + attention alone"};
  for (int mode = 0; mode < 4; ++mode) {
    cudaGraph_t gr; cudaGraphExec_t ge; cudaEvent_t fork[L], join[L];
    for (int l = 0; l < L; ++l) { cudaEventCreateWithFlags(&fork[l], cudaEventDisableTiming); cudaEventCreateWithFlags(&join[l], cudaEventDisableTiming); }
    cudaStreamBeginCapture(s, cudaStreamCaptureModeRelaxed);
    if (mode == 2) { prefetch_l2<<<8, 128, 0, s>>>((const char*)W, per * 2); }
    for (int l = 0; l < L; ++l) {
      int wl = mode == 1 ? 0 : l;
      if (mode == 2 && l + 1 < L) { cudaEventRecord(fork[l], s); cudaStreamWaitEvent(s2, fork[l]); prefetch_l2<<<8, 128, 0, s2>>>((const char*)(W + per * (l + 1)), per * 2); cudaEventRecord(join[l], s2); }
      spin<<<80, 128, 0, s>>>(spin_ns / 2);
      call(0, wl, s);
      if (mode != 3) call(1, wl, s);
      spin<<<80, 128, 0, s>>>(spin_ns / 2);
      if (mode != 3) { call(2, wl, s); call(3, wl, s); }
      if (mode == 2 && l + 1 < L) cudaStreamWaitEvent(s, join[l]);
    }
    if (cudaStreamEndCapture(s, &gr) != cudaSuccess || cudaGraphInstantiate(&ge, gr, 0) != cudaSuccess) { printf("capture failed (mode %d): %s\n", mode, cudaGetErrorString(cudaGetLastError())); continue; }
    for (int r = 0; r < 3; ++r) cudaGraphLaunch(ge, s);
    cudaStreamSynchronize(s);
    std::vector<float> t;
    for (int r = 0; r < 20; ++r) { cudaEventRecord(e0, s); cudaGraphLaunch(ge, s); cudaEventRecord(e1, s); cudaEventSynchronize(e1); float ms; cudaEventElapsedTime(&ms, e0, e1); t.push_back(ms * 1000); }
    std::sort(t.begin(), t.end());
    printf("rows %d, spin %lld ns/layer: %-40s median %8.1f us, min %8.1f (per layer %.1f)\n", rows, spin_ns, names[mode], t[10], t[0], t[10] / L);
    cudaGraphExecDestroy(ge); cudaGraphDestroy(gr);
  }
  printf("err: %s\n", cudaGetErrorString(cudaDeviceSynchronize()));
  return 0;
}
