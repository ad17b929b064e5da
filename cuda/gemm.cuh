/*
 * gemm.cuh: what the fused linear losses (cuda/linear_ce.cu,
 * cuda/distill.cu) share around their cuBLAS calls: the GEMM wrapper
 * (fp32 accumulation), bias fill, deterministic column sums, fp32 -> T
 * conversion, the per-row loss sum, and the status-returning macros.
 * Everything is in an anonymous namespace: each translation unit gets its
 * own copy (no symbol is exported).
 */
#ifndef CULOSS_GEMM_CUH
#define CULOSS_GEMM_CUH

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <type_traits>

#include "backend.h"
#include "dtype.cuh"
#include "reduce.cuh"

namespace culoss_dev {
namespace {

constexpr int LT = 256; /* threads of the small kernels here */

/* (An explicit specialization here would be exported from the shared
   library despite -fvisibility=hidden: nvcc names the anonymous namespace.) */
template <typename T> inline cudaDataType_t cuda_type() {
  if constexpr (std::is_same<T, float>::value)
    return CUDA_R_32F;
  else if constexpr (std::is_same<T, __half>::value)
    return CUDA_R_16F;
  else
    return CUDA_R_16BF;
}

/* Column-major C[m, n] = op(A) op(B) + beta C, fp32 accumulation. */
culoss_status gemm(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int64_t m,
                   int64_t n, int64_t k, const void *A, cudaDataType_t at, int64_t lda,
                   const void *B, cudaDataType_t bt, int64_t ldb, float beta, void *C,
                   cudaDataType_t ct, int64_t ldc, const char *what) {
  const float alpha = 1.0f;
  return culoss__cublas_status(cublasGemmEx(h, ta, tb, (int)m, (int)n, (int)k, &alpha, A, at,
                                            (int)lda, B, bt, (int)ldb, &beta, C, ct, (int)ldc,
                                            CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
                               what);
}

template <typename T>
__global__ void __launch_bounds__(LT)
    bias_fill_kernel(T *tile, const T *bias, int64_t cols, int64_t ld) {
  T *row = tile + (int64_t)blockIdx.y * ld;
  for (int64_t j = (int64_t)blockIdx.x * LT + threadIdx.x; j < cols; j += (int64_t)gridDim.x * LT)
    row[j] = bias[j];
}

/* acc[j] (+)= sum over rows of tile[i, j], rows in order: deterministic. */
template <typename T>
__global__ void __launch_bounds__(LT)
    colsum_kernel(const T *tile, int64_t rows, int64_t cols, int64_t ld, float *acc, int init) {
  /* grid-stride: blocks_for caps the grid at 65535 blocks */
  for (int64_t j = (int64_t)blockIdx.x * LT + threadIdx.x; j < cols; j += (int64_t)gridDim.x * LT) {
    float s = 0.0f;
    for (int64_t i = 0; i < rows; i++) s += to_f32(tile[i * ld + j]);
    acc[j] = init ? s : acc[j] + s;
  }
}

/* dst = src (or, accumulating, dst + src in fp32), rounded once to T. */
template <typename T>
__global__ void __launch_bounds__(LT)
    convert_kernel(const float *src, T *dst, int64_t count, int accumulate) {
  for (int64_t i = (int64_t)blockIdx.x * LT + threadIdx.x; i < count; i += (int64_t)gridDim.x * LT)
    dst[i] = from_f32<T>(accumulate ? to_f32(dst[i]) + src[i] : src[i]);
}

__global__ void __launch_bounds__(LT)
    row_loss_sum_kernel(const float *row_loss, int64_t n, double *partials) {
  double s = 0.0;
  for (int64_t i = (int64_t)blockIdx.x * LT + threadIdx.x; i < n; i += (int64_t)gridDim.x * LT)
    s += row_loss[i];
  store_block_sum<LT>(s, &partials[blockIdx.x]);
}

inline unsigned blocks_for(int64_t count) {
  int64_t b = (count + LT - 1) / LT;
  if (b < 1) b = 1;
  return (unsigned)(b > 65535 ? 65535 : b);
}

#define CU_TRY(expr, what)                                                                         \
  do {                                                                                             \
    cudaError_t e_ = (expr);                                                                       \
    if (e_ != cudaSuccess) return culoss__cuda_status(e_, what);                                   \
  } while (0)
#define CL_TRY(expr)                                                                               \
  do {                                                                                             \
    culoss_status s_ = (expr);                                                                     \
    if (s_ != CULOSS_OK) return s_;                                                                \
  } while (0)

} // namespace
} // namespace culoss_dev

#endif /* CULOSS_GEMM_CUH */
