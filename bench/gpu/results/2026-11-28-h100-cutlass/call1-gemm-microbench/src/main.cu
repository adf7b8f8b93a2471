#include <cstdio>
#include <cstdlib>
#include <cmath>
#include <vector>
#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cublas_v2.h>
typedef int (*Fn)(void*, const void*, const void*, const void*, void*, int, int, int, void*, size_t);
extern "C" int cfg1(void*, const void*, const void*, const void*, void*, int, int, int, void*, size_t);
extern "C" int cfg2(void*, const void*, const void*, const void*, void*, int, int, int, void*, size_t);
extern "C" int cfg3(void*, const void*, const void*, const void*, void*, int, int, int, void*, size_t);
extern "C" int cfg4(void*, const void*, const void*, const void*, void*, int, int, int, void*, size_t);
extern "C" int cfg5(void*, const void*, const void*, const void*, void*, int, int, int, void*, size_t);
__global__ void fill(__nv_bfloat16* p, size_t n, unsigned seed, float sc) {
  size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
  if (i < n) { unsigned h = (unsigned)i * 2654435761u ^ seed; h ^= h >> 13; h *= 0x5bd1e995; h ^= h >> 15;
    p[i] = __float2bfloat16(((h & 0xffff) / 65535.f - 0.5f) * sc); }
}
__global__ void bias_act(__nv_bfloat16* y, const __nv_bfloat16* b, int n, size_t total, int act) {
  size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
  if (i >= total) return;
  float v = __bfloat162float(__float2bfloat16(__bfloat162float(y[i]) + __bfloat162float(b[i % n])));
  if (act == 1) v = 0.5f * v * (1.f + erff(v * 0.70710678f)); else v = v / (1.f + __expf(-1.702f * v));
  y[i] = __float2bfloat16(v);
}
int main() {
  cublasHandle_t h; cublasCreate(&h);
  struct Case { const char* name; int m, k, n, act; } cases[] = {
    {"sam-base fc1", 4096, 768, 3072, 1}, {"sam-tiles fc1", 9600, 768, 3072, 1}, {"sam-merged fc1", 13696, 768, 3072, 1},
  };
  Fn fns[] = {cfg1, cfg2, cfg3, cfg4, cfg5};
  const char* fnames[] = {"gelu 128x256 coop c2x1", "IDENTITY 128x256 coop c2x1", "gelu 256x128 coop c1x2", "gelu 128x256 coop c1x1", "gelu 128x128 pingpong"};
  void* ws; size_t wsl = 64 << 20; cudaMalloc(&ws, wsl);
  cudaStream_t s; cudaStreamCreate(&s); cublasSetStream(h, s);
  cudaEvent_t e0, e1; cudaEventCreate(&e0); cudaEventCreate(&e1);
  for (auto& c : cases) {
    __nv_bfloat16 *x, *w, *b, *y0, *y1;
    size_t nx = (size_t)c.m * c.k, nw = (size_t)c.n * c.k, ny = (size_t)c.m * c.n;
    cudaMalloc(&x, nx * 2); cudaMalloc(&w, nw * 2); cudaMalloc(&b, c.n * 2); cudaMalloc(&y0, ny * 2); cudaMalloc(&y1, ny * 2);
    fill<<<(nx + 255) / 256, 256, 0, s>>>(x, nx, 1, 4.f); fill<<<(nw + 255) / 256, 256, 0, s>>>(w, nw, 2, 0.2f);
    fill<<<(c.n + 255) / 256, 256, 0, s>>>(b, c.n, 3, 1.f);
    float one = 1, zero = 0;
    auto ref = [&]() {
      cublasGemmEx(h, CUBLAS_OP_T, CUBLAS_OP_N, c.n, c.m, c.k, &one, w, CUDA_R_16BF, c.k, x, CUDA_R_16BF, c.k, &zero, y0, CUDA_R_16BF, c.n, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
      bias_act<<<(ny + 255) / 256, 256, 0, s>>>(y0, b, c.n, ny, c.act);
    };
    auto time = [&](auto f) { for (int i = 0; i < 3; ++i) f(); cudaEventRecord(e0, s); for (int i = 0; i < 20; ++i) f(); cudaEventRecord(e1, s); cudaEventSynchronize(e1); float ms; cudaEventElapsedTime(&ms, e0, e1); return ms * 1000 / 20; };
    float tr = time(ref);
    float tg = time([&]() { cublasGemmEx(h, CUBLAS_OP_T, CUBLAS_OP_N, c.n, c.m, c.k, &one, w, CUDA_R_16BF, c.k, x, CUDA_R_16BF, c.k, &zero, y1, CUDA_R_16BF, c.n, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT); });
    printf("  cublasGemmEx alone %.1f us\n", tg);
    std::vector<__nv_bfloat16> h0(ny), h1(ny);
    cudaMemcpy(h0.data(), y0, ny * 2, cudaMemcpyDeviceToHost);
    double fl = 2.0 * c.m * c.n * c.k;
    printf("%-16s m=%5d k=%4d n=%4d  cublas+bias_act %7.1f us (%.0f TF/s of gemm)\n", c.name, c.m, c.k, c.n, tr, fl / tr / 1e6);
    for (int f = 0; f < 5; ++f) {
      
      cudaMemset(y1, 0, ny * 2);
      int rc = fns[f](s, x, w, b, y1, c.m, c.k, c.n, ws, wsl);
      cudaError_t err = cudaStreamSynchronize(s);
      if (rc || err) { printf("   %-24s rc=%d err=%s\n", fnames[f], rc, cudaGetErrorString(err)); continue; }
      cudaMemcpy(h1.data(), y1, ny * 2, cudaMemcpyDeviceToHost);
      double md = 0, mv = 0; size_t bad = 0;
      for (size_t i = 0; i < ny; ++i) { float a = __bfloat162float(h0[i]), bb = __bfloat162float(h1[i]); double d = fabs(a - bb); if (!(d <= 0.02 + 0.02 * fabs(a))) ++bad; if (d > md || d != d) md = d; if (fabs(a) > mv) mv = fabs(a); }
      float t = time([&]() { fns[f](s, x, w, b, y1, c.m, c.k, c.n, ws, wsl); });
      printf("   %-24s %7.1f us (%.0f TF/s)  max|diff| %.4g at |y|<=%.3g, %zu outside tol\n", fnames[f], t, fl / t / 1e6, md, mv, bad);
    }
    cudaFree(x); cudaFree(w); cudaFree(b); cudaFree(y0); cudaFree(y1);
  }
  return 0;
}
