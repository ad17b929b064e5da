/*
 * baselines.cu: what culoss-bench measures culoss against, in the same run,
 * plus on-device input generation (host generation of 10^9 random values
 * would dominate the run).
 *
 *   - cross-entropy, unfused: three kernels as a framework without fusion
 *     runs them: log_softmax (writes fp32 log-probabilities, n x v), NLL
 *     (mean of the target log-probabilities) and the softmax backward (reads
 *     the log-probabilities again, writes the gradient).
 *   - soft-target cross-entropy, unfused: log_softmax, a per-row soft NLL,
 *     their sum, and the backward (sum(y) softmax - y), four kernels.
 *   - NLL and multi-margin, naive: one thread per element (multi-margin's
 *     target column from per-row float atomics and a second kernel).
 *   - elementwise losses, naive: one thread per element, no vector loads,
 *     the loss summed with a float atomicAdd (margin ranking and Gaussian NLL
 *     too: three inputs, two gradients).
 *   - cosine embedding and triplet margin (p = 2, no swap), two-pass: a block
 *     per row computes the row's dot products / squared distances, then an
 *     elementwise kernel reads every input again and writes the gradients:
 *     what an implementation without a register row cache does (PyTorch's
 *     composite launches more kernels and materialises the differences:
 *     bench/compare_torch.py measures it).
 */
#include <cuda_runtime.h>
#include <stdint.h>

#include "dtype.cuh"
#include "launch.cuh"
#include "loss_math.h"

using namespace culoss_dev;

namespace {

constexpr int BT = 256;

__device__ __forceinline__ uint64_t mix(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}
__device__ __forceinline__ float unit(uint64_t h) { return (float)(h >> 40) * 0x1.0p-24f; }
__device__ __forceinline__ float normal(uint64_t seed, int64_t i) {
  const float u1 = fmaxf(unit(mix(seed ^ (uint64_t)(2 * i))), 1e-7f);
  const float u2 = unit(mix(seed ^ (uint64_t)(2 * i + 1)));
  return sqrtf(-2.0f * logf(u1)) * cospif(2.0f * u2);
}

template <typename T>
__global__ void fill_kernel(T *x, T *y, int64_t count, uint64_t seed, int op) {
  for (int64_t i = (int64_t)blockIdx.x * BT + threadIdx.x; i < count;
       i += (int64_t)gridDim.x * BT) {
    const float a = normal(seed, i), b = normal(seed + 7919, i);
    const float u = unit(mix(seed * 31 + (uint64_t)i));
    float xv, yv = 0.0f;
    switch (op) {
    case -1: /* logits: N(0, 2^2), about one in a thousand masked (-inf) */
      xv = u < 1e-3f ? -INFINITY : 2.0f * a;
      break;
    case -2: xv = 0.02f * a; break;        /* linear-layer weights */
    case -3: xv = a; break;                /* hidden states */
    case -4: xv = 2.0f * a, yv = u; break; /* logits and soft targets (unnormalised) */
    case 0: xv = 3.0f * a, yv = u; break;  /* bce with logits */
    case 1: xv = 0.02f + 0.96f * u, yv = unit(mix(seed + (uint64_t)i)); break; /* bce */
    case 2:
    case 3: yv = u < 0.5f ? -1.0f : 1.0f, xv = 2.0f * a; break;                     /* hinge */
    case 8: xv = -3.0f * u - 0.01f, yv = b < -0.8f ? 0.0f : fabsf(b) * 0.3f; break; /* kl */
    case 9: xv = -3.0f * u - 0.01f, yv = -4.0f * fabsf(b); break; /* kl, log target */
    case 10: yv = u < 0.5f ? -1.0f : 1.0f, xv = 2.0f * a; break;  /* hinge embedding */
    case 11: yv = u < 0.5f ? -1.0f : 1.0f, xv = 3.0f * a; break;  /* soft margin */
    case 12: xv = 0.8f * a, yv = floorf(6.0f * u); break;         /* poisson, log rates */
    case 13: xv = 0.1f + 5.0f * u, yv = floorf(6.0f * fabsf(b) / 2.5f); break; /* rates */
    case 14: xv = 3.0f * a, yv = u < 0.3f ? 1.0f : 0.0f; break;                /* focal */
    default: yv = b, xv = b + 2.0f * a; break;                                 /* regression */
    }
    x[i] = from_f32<T>(xv);
    if (y) y[i] = from_f32<T>(yv);
  }
}

__global__ void targets_kernel(int64_t *t, int64_t n, int64_t c, uint64_t seed) {
  for (int64_t i = (int64_t)blockIdx.x * BT + threadIdx.x; i < n; i += (int64_t)gridDim.x * BT)
    t[i] = (int64_t)(mix(seed ^ (uint64_t)i) % (uint64_t)c);
}

/* ---- unfused cross-entropy ---- */
__device__ float block_max(float v, float *sh) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  if ((threadIdx.x & 31) == 0) sh[threadIdx.x / 32] = v;
  __syncthreads();
  v = threadIdx.x < BT / 32 ? sh[threadIdx.x] : -INFINITY;
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  __syncthreads();
  return v;
}
__device__ float block_sum(float v, float *sh) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  if ((threadIdx.x & 31) == 0) sh[threadIdx.x / 32] = v;
  __syncthreads();
  v = threadIdx.x < BT / 32 ? sh[threadIdx.x] : 0.0f;
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  __syncthreads();
  return v;
}

template <typename T> __global__ void log_softmax_kernel(const T *x, float *lp, int64_t v) {
  __shared__ float sh[BT / 32];
  const T *row = x + (int64_t)blockIdx.x * v;
  float m = -INFINITY, s = 0.0f;
  for (int64_t j = threadIdx.x; j < v; j += BT) m = fmaxf(m, to_f32(row[j]));
  m = block_max(m, sh);
  for (int64_t j = threadIdx.x; j < v; j += BT) s += expf(to_f32(row[j]) - m);
  const float lse = m + logf(block_sum(s, sh));
  for (int64_t j = threadIdx.x; j < v; j += BT)
    lp[(int64_t)blockIdx.x * v + j] = to_f32(row[j]) - lse;
}

__global__ void nll_mean_kernel(const float *lp, const int64_t *t, int64_t n, int64_t v,
                                float *loss) {
  __shared__ float sh[BT / 32];
  float s = 0.0f;
  for (int64_t i = threadIdx.x; i < n; i += BT) s -= lp[i * v + t[i]];
  s = block_sum(s, sh);
  if (threadIdx.x == 0) *loss = s / (float)n;
}

template <typename T>
__global__ void softmax_backward_kernel(const float *lp, const int64_t *t, int64_t v, float inv_n,
                                        T *g) {
  const int64_t i = blockIdx.x;
  for (int64_t j = threadIdx.x; j < v; j += BT)
    g[i * v + j] = from_f32<T>((expf(lp[i * v + j]) - (j == t[i] ? 1.0f : 0.0f)) * inv_n);
}

/* ---- unfused soft-target cross-entropy ---- */
template <typename T>
__global__ void soft_nll_kernel(const float *lp, const T *y, int64_t v, float inv_n,
                                float *row_loss) {
  __shared__ float sh[BT / 32];
  const int64_t i = blockIdx.x;
  float s = 0.0f;
  for (int64_t j = threadIdx.x; j < v; j += BT) {
    const float yv = to_f32(y[i * v + j]);
    if (yv != 0.0f) s -= yv * lp[i * v + j];
  }
  s = block_sum(s, sh);
  if (threadIdx.x == 0) row_loss[i] = s * inv_n;
}

__global__ void sum_kernel(const float *v, int64_t n, float *out) {
  __shared__ float sh[BT / 32];
  float s = 0.0f;
  for (int64_t i = threadIdx.x; i < n; i += BT) s += v[i];
  s = block_sum(s, sh);
  if (threadIdx.x == 0) *out = s;
}

template <typename T>
__global__ void soft_backward_kernel(const float *lp, const T *y, int64_t v, float inv_n, T *g) {
  __shared__ float sh[BT / 32];
  const int64_t i = blockIdx.x;
  float sy = 0.0f;
  for (int64_t j = threadIdx.x; j < v; j += BT) sy += to_f32(y[i * v + j]);
  sy = block_sum(sy, sh);
  for (int64_t j = threadIdx.x; j < v; j += BT)
    g[i * v + j] = from_f32<T>((sy * expf(lp[i * v + j]) - to_f32(y[i * v + j])) * inv_n);
}

/* ---- naive NLL and multi-margin: one thread per element ---- */
template <typename T>
__global__ void nll_naive_kernel(const T *x, const int64_t *t, int64_t n, int64_t v, float inv_n,
                                 T *g, float *loss) {
  for (int64_t e = (int64_t)blockIdx.x * BT + threadIdx.x; e < n * v;
       e += (int64_t)gridDim.x * BT) {
    const int64_t i = e / v, j = e % v;
    const bool hit = j == t[i];
    g[e] = from_f32<T>(hit ? -inv_n : 0.0f);
    if (hit) atomicAdd(loss, -to_f32(x[e]) * inv_n);
  }
}

/* p = 1, margin 1, no weights, mean over rows: h = 1 / (n v) per violated
   margin; the target column gets -sum h from mm_target_kernel. */
template <typename T>
__global__ void mm_naive_kernel(const T *x, const int64_t *t, int64_t n, int64_t v, float inv_nv,
                                T *g, float *row_h, float *loss) {
  for (int64_t e = (int64_t)blockIdx.x * BT + threadIdx.x; e < n * v;
       e += (int64_t)gridDim.x * BT) {
    const int64_t i = e / v, j = e % v, ti = t[i];
    if (j == ti) continue;
    const float z = 1.0f - to_f32(x[i * v + ti]) + to_f32(x[e]);
    const float h = z > 0.0f ? inv_nv : 0.0f;
    g[e] = from_f32<T>(h);
    if (z > 0.0f) {
      atomicAdd(&row_h[i], h);
      atomicAdd(loss, z * inv_nv);
    }
  }
}

template <typename T>
__global__ void mm_target_kernel(const int64_t *t, int64_t n, int64_t v, const float *row_h, T *g) {
  const int64_t i = (int64_t)blockIdx.x * BT + threadIdx.x;
  if (i < n) g[i * v + t[i]] = from_f32<T>(-row_h[i]);
}

/* ---- naive elementwise ---- */
template <typename T>
__global__ void naive_kernel(const T *x, const T *y, int64_t m, int op, float inv_m, T *g,
                             float *loss) {
  const int64_t i = (int64_t)blockIdx.x * BT + threadIdx.x;
  if (i >= m) return;
  const float a = to_f32(x[i]), b = to_f32(y[i]);
  float d, l;
  switch (op) {
  case 0: l = culoss__bce_logits(a, b, 1.0f, 1.0f, &d); break;
  case 1: l = culoss__bce_prob(a, b, 1.0f, &d); break;
  case 2: l = culoss__hinge(a, b, 1.0f, 0, &d); break;
  case 3: l = culoss__hinge(a, b, 1.0f, 1, &d); break;
  case 4: l = culoss__mse(a, b, &d); break;
  case 5: l = culoss__l1(a, b, &d); break;
  case 6: l = culoss__huber(a, b, 1.0f, &d); break;
  case 7: l = culoss__smooth_l1(a, b, 1.0f, &d); break;
  case 8: l = culoss__kl_div(a, b, 0, &d); break;
  case 9: l = culoss__kl_div(a, b, 1, &d); break;
  case 10: l = culoss__hinge_embedding(a, b, 1.0f, &d); break;
  case 11: l = culoss__soft_margin(a, b, &d); break;
  case 12: l = culoss__poisson_nll(a, b, 1e-8f, 1, &d); break;
  case 13: l = culoss__poisson_nll(a, b, 1e-8f, 2, &d); break;
  default: l = culoss__sigmoid_focal(a, b, 0.25f, 2.0f, &d); break;
  }
  g[i] = from_f32<T>(d * inv_m);
  atomicAdd(loss, l * inv_m);
}

/* ---- three-input elementwise, naive: op 0 margin ranking (x2 = input2),
   1 Gaussian NLL (x2 = var) ---- */
template <typename T>
__global__ void naive3_kernel(const T *x, const T *x2, const T *y, int64_t m, int op, float inv_m,
                              T *g, T *g2, float *loss) {
  const int64_t i = (int64_t)blockIdx.x * BT + threadIdx.x;
  if (i >= m) return;
  const float a = to_f32(x[i]), b = to_f32(x2[i]), c = to_f32(y[i]);
  float d, d2, l;
  if (op == 0) {
    l = culoss__margin_ranking(a, b, c, 0.0f, &d);
    d2 = -d;
  } else {
    l = culoss__gaussian_nll(a, c, b, 1e-6f, 0, &d, &d2);
  }
  g[i] = from_f32<T>(d * inv_m);
  g2[i] = from_f32<T>(d2 * inv_m);
  atomicAdd(loss, l * inv_m);
}

/* ---- embedding rows, two-pass: op 0 cosine (y: fp32 targets), 1 triplet ---- */
template <typename T>
__global__ void emb_stats_kernel(const T *a, const T *b, const T *c, int64_t d, int op,
                                 float *stats) {
  __shared__ float red[3][BT];
  const int64_t row = blockIdx.x, off = row * d;
  float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f;
  for (int64_t j = threadIdx.x; j < d; j += BT) {
    const float u = to_f32(a[off + j]), v = to_f32(b[off + j]);
    if (op == 0) {
      s0 += u * v, s1 += u * u, s2 += v * v;
    } else {
      const float w = to_f32(c[off + j]), e = u - v + 1e-6f, f = u - w + 1e-6f;
      s0 += e * e, s1 += f * f;
    }
  }
  red[0][threadIdx.x] = s0, red[1][threadIdx.x] = s1, red[2][threadIdx.x] = s2;
  __syncthreads();
  for (unsigned k = BT / 2; k > 0; k >>= 1) {
    if (threadIdx.x < k)
      for (int q = 0; q < 3; q++) red[q][threadIdx.x] += red[q][threadIdx.x + k];
    __syncthreads();
  }
  if (threadIdx.x < 3) stats[3 * row + threadIdx.x] = red[threadIdx.x][0];
}

template <typename T>
__global__ void emb_grad_kernel(const T *a, const T *b, const T *c, const float *y,
                                const float *stats, int64_t n, int64_t d, int op, float inv_n,
                                T *ga, T *gb, T *gc, float *loss) {
  for (int64_t e = (int64_t)blockIdx.x * BT + threadIdx.x; e < n * d;
       e += (int64_t)gridDim.x * BT) {
    const int64_t row = e / d;
    const float *st = stats + 3 * row;
    const float u = to_f32(a[e]), v = to_f32(b[e]);
    if (op == 0) {
      const float n1 = st[1] + 1e-12f, n2 = st[2] + 1e-12f, den = sqrtf(n1 * n2);
      const float cs = st[0] / den, t = y[row];
      const float dl = t == 1.0f ? -1.0f : (t == -1.0f && cs > 0.0f ? 1.0f : 0.0f);
      const float k = dl * inv_n;
      ga[e] = from_f32<T>(k * (v / den - cs * u / n1));
      gb[e] = from_f32<T>(k * (u / den - cs * v / n2));
      if (e % d == 0) atomicAdd(loss, (t == 1.0f ? 1.0f - cs : fmaxf(cs, 0.0f)) * inv_n);
    } else {
      const float w = to_f32(c[e]), dap = sqrtf(st[0]), dan = sqrtf(st[1]);
      const float z = dap - dan + 1.0f, k = z > 0.0f ? inv_n : 0.0f;
      const float gap = (u - v + 1e-6f) / dap, gan = (u - w + 1e-6f) / dan;
      ga[e] = from_f32<T>(k * (gap - gan));
      gb[e] = from_f32<T>(-k * gap);
      gc[e] = from_f32<T>(k * gan);
      if (e % d == 0) atomicAdd(loss, fmaxf(z, 0.0f) * inv_n);
    }
  }
}

unsigned grid_for(int64_t count) {
  const int64_t b = (count + BT - 1) / BT;
  return (unsigned)(b > 65535 * 16 ? 65535 * 16 : (b < 1 ? 1 : b));
}

} // namespace

/* dtype: 0 f32, 1 f16, 2 bf16 (culoss_dtype). Return cudaError_t as int. */
extern "C" int bench_fill(void *x, void *y, int dtype, int64_t count, uint64_t seed, int op) {
  return (int)with_dtype(dtype, [&](auto t) {
    typedef decltype(t) T;
    return launch(fill_kernel<T>, dim3(grid_for(count)), dim3(BT), 0, nullptr, (T *)x, (T *)y,
                  count, seed, op);
  });
}

extern "C" int bench_fill_targets(int64_t *t, int64_t n, int64_t c, uint64_t seed) {
  return (int)launch(targets_kernel, dim3(grid_for(n)), dim3(BT), 0, nullptr, t, n, c, seed);
}

template <typename T>
static cudaError_t ce_unfused(const void *x, int64_t n, int64_t v, const int64_t *t, float *lp,
                              float *loss, void *g) {
  cudaError_t e =
      launch(log_softmax_kernel<T>, dim3((unsigned)n), dim3(BT), 0, nullptr, (const T *)x, lp, v);
  if (e == cudaSuccess)
    e = launch(nll_mean_kernel, dim3(1), dim3(BT), 0, nullptr, (const float *)lp, t, n, v, loss);
  if (e == cudaSuccess)
    e = launch(softmax_backward_kernel<T>, dim3((unsigned)n), dim3(BT), 0, nullptr,
               (const float *)lp, t, v, 1.0f / (float)n, (T *)g);
  return e;
}

extern "C" int bench_ce_unfused(const void *x, int dtype, int64_t n, int64_t v, const int64_t *t,
                                float *lp, float *loss, void *g) {
  return (int)with_dtype(dtype,
                         [&](auto d) { return ce_unfused<decltype(d)>(x, n, v, t, lp, loss, g); });
}

template <typename T>
static cudaError_t soft_unfused(const void *x, const void *y, int64_t n, int64_t v, float *lp,
                                float *row_loss, float *loss, void *g) {
  const float inv_n = 1.0f / (float)n;
  cudaError_t e =
      launch(log_softmax_kernel<T>, dim3((unsigned)n), dim3(BT), 0, nullptr, (const T *)x, lp, v);
  if (e == cudaSuccess)
    e = launch(soft_nll_kernel<T>, dim3((unsigned)n), dim3(BT), 0, nullptr, (const float *)lp,
               (const T *)y, v, inv_n, row_loss);
  if (e == cudaSuccess)
    e = launch(sum_kernel, dim3(1), dim3(BT), 0, nullptr, (const float *)row_loss, n, loss);
  if (e == cudaSuccess)
    e = launch(soft_backward_kernel<T>, dim3((unsigned)n), dim3(BT), 0, nullptr, (const float *)lp,
               (const T *)y, v, inv_n, (T *)g);
  return e;
}

/* row_loss: n floats of scratch. */
extern "C" int bench_ce_soft_unfused(const void *x, const void *y, int dtype, int64_t n, int64_t v,
                                     float *lp, float *row_loss, float *loss, void *g) {
  return (int)with_dtype(
      dtype, [&](auto d) { return soft_unfused<decltype(d)>(x, y, n, v, lp, row_loss, loss, g); });
}

template <typename T>
static cudaError_t nll_naive(const void *x, const int64_t *t, int64_t n, int64_t v, void *g,
                             float *loss) {
  const cudaError_t e = cudaMemsetAsync(loss, 0, sizeof(float));
  if (e != cudaSuccess) return e;
  return launch(nll_naive_kernel<T>, dim3(grid_for(n * v)), dim3(BT), 0, nullptr, (const T *)x, t,
                n, v, 1.0f / (float)n, (T *)g, loss);
}

extern "C" int bench_nll_naive(const void *x, int dtype, int64_t n, int64_t v, const int64_t *t,
                               void *g, float *loss) {
  return (int)with_dtype(dtype,
                         [&](auto d) { return nll_naive<decltype(d)>(x, t, n, v, g, loss); });
}

template <typename T>
static cudaError_t mm_naive(const void *x, const int64_t *t, int64_t n, int64_t v, void *g,
                            float *row_h, float *loss) {
  cudaError_t e = cudaMemsetAsync(loss, 0, sizeof(float));
  if (e == cudaSuccess) e = cudaMemsetAsync(row_h, 0, (size_t)n * sizeof(float));
  if (e == cudaSuccess)
    e = launch(mm_naive_kernel<T>, dim3(grid_for(n * v)), dim3(BT), 0, nullptr, (const T *)x, t, n,
               v, (float)(1.0 / ((double)n * (double)v)), (T *)g, row_h, loss);
  if (e == cudaSuccess)
    e = launch(mm_target_kernel<T>, dim3(grid_for(n)), dim3(BT), 0, nullptr, t, n, v,
               (const float *)row_h, (T *)g);
  return e;
}

/* row_h: n floats of scratch. */
extern "C" int bench_mm_naive(const void *x, int dtype, int64_t n, int64_t v, const int64_t *t,
                              void *g, float *row_h, float *loss) {
  return (int)with_dtype(dtype,
                         [&](auto d) { return mm_naive<decltype(d)>(x, t, n, v, g, row_h, loss); });
}

template <typename T>
static cudaError_t ew_naive(int op, const void *x, const void *y, int64_t m, void *g, float *loss) {
  const int64_t blocks = (m + BT - 1) / BT;
  const cudaError_t e = cudaMemsetAsync(loss, 0, sizeof(float));
  if (e != cudaSuccess) return e;
  return launch(naive_kernel<T>, dim3((unsigned)blocks), dim3(BT), 0, nullptr, (const T *)x,
                (const T *)y, m, op, 1.0f / (float)m, (T *)g, loss);
}

extern "C" int bench_ew_naive(int op, const void *x, const void *y, int dtype, int64_t m, void *g,
                              float *loss) {
  return (int)with_dtype(dtype,
                         [&](auto d) { return ew_naive<decltype(d)>(op, x, y, m, g, loss); });
}

extern "C" int bench_ew3_naive(int op, const void *x, const void *x2, const void *y, int dtype,
                               int64_t m, void *g, void *g2, float *loss) {
  return (int)with_dtype(dtype, [&](auto t) {
    typedef decltype(t) T;
    const cudaError_t e = cudaMemsetAsync(loss, 0, sizeof(float));
    if (e != cudaSuccess) return e;
    return launch(naive3_kernel<T>, dim3((unsigned)((m + BT - 1) / BT)), dim3(BT), 0, nullptr,
                  (const T *)x, (const T *)x2, (const T *)y, m, op, 1.0f / (float)m, (T *)g,
                  (T *)g2, loss);
  });
}

/* stats: 3 n floats of scratch; c, gc unused for cosine (op 0). */
extern "C" int bench_emb_two_pass(int op, const void *a, const void *b, const void *c,
                                  const float *y, int dtype, int64_t n, int64_t d, float *stats,
                                  void *ga, void *gb, void *gc, float *loss) {
  return (int)with_dtype(dtype, [&](auto t) {
    typedef decltype(t) T;
    cudaError_t e = cudaMemsetAsync(loss, 0, sizeof(float));
    if (e == cudaSuccess)
      e = launch(emb_stats_kernel<T>, dim3((unsigned)n), dim3(BT), 0, nullptr, (const T *)a,
                 (const T *)b, (const T *)c, d, op, stats);
    if (e == cudaSuccess)
      e = launch(emb_grad_kernel<T>, dim3(grid_for(n * d)), dim3(BT), 0, nullptr, (const T *)a,
                 (const T *)b, (const T *)c, y, (const float *)stats, n, d, op, 1.0f / (float)n,
                 (T *)ga, (T *)gb, (T *)gc, loss);
    return e;
  });
}

/* ---- multi-label margin, naive: a thread per row, the list scanned for
   each class (no shared-memory flags), float atomics for the loss ---- */
namespace {
template <typename T>
__global__ void mlm_naive_kernel(const T *x, const int64_t *t, int64_t n, int64_t c, float inv_nc,
                                 T *g, float *loss) {
  const int64_t row = (int64_t)blockIdx.x * BT + threadIdx.x;
  if (row >= n) return;
  const T *xr = x + row * c;
  const int64_t *tr = t + row * c;
  T *gr = g + row * c;
  int64_t k = 0;
  while (k < c && tr[k] >= 0) k++;
  for (int64_t i = 0; i < c; i++) gr[i] = from_f32<T>(0.0f);
  float l = 0.0f;
  for (int64_t q = 0; q < k; q++) {
    const float xt = to_f32(xr[tr[q]]);
    for (int64_t i = 0; i < c; i++) {
      bool listed = false;
      for (int64_t p = 0; p < k && !listed; p++) listed = tr[p] == i;
      if (listed) continue;
      const float z = 1.0f - xt + to_f32(xr[i]);
      if (z > 0.0f) {
        l += z;
        gr[i] = from_f32<T>(to_f32(gr[i]) + inv_nc);
        gr[tr[q]] = from_f32<T>(to_f32(gr[tr[q]]) - inv_nc);
      }
    }
  }
  atomicAdd(loss, l * inv_nc);
}
} // namespace

extern "C" int bench_mlm_naive(const void *x, const int64_t *t, int dtype, int64_t n, int64_t c,
                               void *g, float *loss) {
  return (int)with_dtype(dtype, [&](auto d) {
    typedef decltype(d) T;
    const cudaError_t e = cudaMemsetAsync(loss, 0, sizeof(float));
    if (e != cudaSuccess) return e;
    return launch(mlm_naive_kernel<T>, dim3((unsigned)((n + BT - 1) / BT)), dim3(BT), 0, nullptr,
                  (const T *)x, t, n, c, 1.0f / ((float)n * (float)c), (T *)g, loss);
  });
}
