/*
 * emu_cublas.cc: the cuBLAS API of culoss's CPU emulator of CUDA
 * (emu_internal.h, tests/emu/README.md), with cuBLAS's C ABI: handles,
 * GEMM (cublasGemmEx, cublasSgemm) and cublasSaxpy, run on the handle's
 * stream like any other work. GEMM operands must lie inside live device
 * allocations; the products accumulate in double and round once.
 */
#include "emu_internal.h"

#include <algorithm>
#include <vector>

/* The opaque handle type of cuBLAS. */
struct cublasContext {
  cudaStream_t stream = nullptr;
  cublasPointerMode_t pointer_mode = CUBLAS_POINTER_MODE_HOST;
};

/* ------------------------------------------------------------------ */
/* cuBLAS GEMM                                                          */
/* ------------------------------------------------------------------ */

namespace {

float load_elem(const void *p, cudaDataType_t t, size_t i) {
  switch (t) {
  case CUDA_R_16F: return __half2float(static_cast<const __half *>(p)[i]);
  case CUDA_R_16BF: return __bfloat162float(static_cast<const __nv_bfloat16 *>(p)[i]);
  default: return static_cast<const float *>(p)[i];
  }
}
void store_elem(void *p, cudaDataType_t t, size_t i, float v) {
  switch (t) {
  case CUDA_R_16F: static_cast<__half *>(p)[i] = __float2half_rn(v); break;
  case CUDA_R_16BF: static_cast<__nv_bfloat16 *>(p)[i] = __float2bfloat16_rn(v); break;
  default: static_cast<float *>(p)[i] = v; break;
  }
}
size_t type_size(cudaDataType_t t) { return t == CUDA_R_32F ? 4 : 2; }

/* Extent in bytes of a column-major rows x cols matrix with leading dim ld. */
size_t extent(int64_t rows, int64_t cols, int64_t ld, size_t es) {
  if (rows == 0 || cols == 0) return 0;
  return ((size_t)(cols - 1) * (size_t)ld + (size_t)rows) * es;
}

cublasStatus_t gemm(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m, int n,
                    int k, const void *alpha, const void *A, cudaDataType_t at, int lda,
                    const void *B, cudaDataType_t bt, int ldb, const void *beta, void *C,
                    cudaDataType_t ct, int ldc) {
  if (!h) return CUBLAS_STATUS_NOT_INITIALIZED;
  const bool tA = ta != CUBLAS_OP_N, tB = tb != CUBLAS_OP_N;
  const int a_rows = tA ? k : m, a_cols = tA ? m : k;
  const int b_rows = tB ? n : k, b_cols = tB ? k : n;
  if (m < 0 || n < 0 || k < 0 || lda < std::max(1, a_rows) || ldb < std::max(1, b_rows) ||
      ldc < std::max(1, m)) {
    report("cublasGemmEx: invalid sizes m=%d n=%d k=%d lda=%d ldb=%d ldc=%d", m, n, k, lda, ldb,
           ldc);
    return CUBLAS_STATUS_INVALID_VALUE;
  }
  if (m == 0 || n == 0) return CUBLAS_STATUS_SUCCESS;
  if (!in_device(A, extent(a_rows, a_cols, lda, type_size(at))) ||
      !in_device(B, extent(b_rows, b_cols, ldb, type_size(bt))) ||
      !in_device(C, extent(m, n, ldc, type_size(ct)))) {
    report("cublasGemmEx: an operand is not inside a device allocation (m=%d n=%d k=%d)", m, n, k);
    fault(cudaErrorIllegalAddress);
    return CUBLAS_STATUS_EXECUTION_FAILED;
  }
  float al, be;
  if (h->pointer_mode == CUBLAS_POINTER_MODE_HOST) {
    al = *static_cast<const float *>(alpha);
    be = *static_cast<const float *>(beta);
  } else {
    al = be = 0.0f; /* read at execution below */
  }
  const cublasPointerMode_t pm = h->pointer_mode;
  cudaError_t e = submit(h->stream, [=]() {
    const float a_ = pm == CUBLAS_POINTER_MODE_HOST ? al : *static_cast<const float *>(alpha);
    const float b_ = pm == CUBLAS_POINTER_MODE_HOST ? be : *static_cast<const float *>(beta);
    /* op(A) as rows and op(B) as columns, both contiguous in l */
    std::vector<float> ar((size_t)m * k), bc((size_t)n * k);
    for (int i = 0; i < m; i++)
      for (int l = 0; l < k; l++)
        ar[(size_t)i * k + l] = load_elem(A, at, tA ? (size_t)i * lda + l : (size_t)l * lda + i);
    for (int j = 0; j < n; j++)
      for (int l = 0; l < k; l++)
        bc[(size_t)j * k + l] = load_elem(B, bt, tB ? (size_t)l * ldb + j : (size_t)j * ldb + l);
    for (int j = 0; j < n; j++)
      for (int i = 0; i < m; i++) {
        const float *a = &ar[(size_t)i * k], *b = &bc[(size_t)j * k];
        /* double, rounded once: cuBLAS's blocked and split-k fp32 sums are
           far closer to that than a naive fp32 loop over a long k */
        double acc_d = 0.0;
        for (int l = 0; l < k; l++) acc_d += (double)a[l] * (double)b[l];
        const float acc = (float)acc_d;
        const size_t ci = (size_t)j * ldc + i;
        /* beta == 0: C is not read (it may hold NaN), as in cuBLAS */
        const float r = b_ == 0.0f ? a_ * acc : a_ * acc + b_ * load_elem(C, ct, ci);
        store_elem(C, ct, ci, r);
      }
    check_canaries("cublasGemmEx");
  });
  if (e != cudaSuccess) return CUBLAS_STATUS_EXECUTION_FAILED;
  return CUBLAS_STATUS_SUCCESS;
}

} // namespace

/* ==================================================================== */
/* cuBLAS                                                                */
/* ==================================================================== */

cublasStatus_t cublasCreate(cublasHandle_t *h) {
  if (!h) return CUBLAS_STATUS_INVALID_VALUE;
  *h = new cublasContext;
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasDestroy(cublasHandle_t h) {
  if (!h) return CUBLAS_STATUS_NOT_INITIALIZED;
  delete h;
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasSetStream(cublasHandle_t h, cudaStream_t s) {
  if (!h) return CUBLAS_STATUS_NOT_INITIALIZED;
  h->stream = s;
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasGetStream(cublasHandle_t h, cudaStream_t *s) {
  if (!h) return CUBLAS_STATUS_NOT_INITIALIZED;
  *s = h->stream;
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasSetWorkspace(cublasHandle_t h, void *ws, size_t bytes) {
  LOCK;
  if (!h) return CUBLAS_STATUS_NOT_INITIALIZED;
  if (bytes && !in_device(ws, bytes)) return CUBLAS_STATUS_INVALID_VALUE;
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasSetPointerMode(cublasHandle_t h, cublasPointerMode_t mode) {
  if (!h) return CUBLAS_STATUS_NOT_INITIALIZED;
  h->pointer_mode = mode;
  return CUBLAS_STATUS_SUCCESS;
}

const char *cublasGetStatusName(cublasStatus_t s) {
  switch (s) {
  case CUBLAS_STATUS_SUCCESS: return "CUBLAS_STATUS_SUCCESS";
  case CUBLAS_STATUS_NOT_INITIALIZED: return "CUBLAS_STATUS_NOT_INITIALIZED";
  case CUBLAS_STATUS_INVALID_VALUE: return "CUBLAS_STATUS_INVALID_VALUE";
  case CUBLAS_STATUS_EXECUTION_FAILED: return "CUBLAS_STATUS_EXECUTION_FAILED";
  case CUBLAS_STATUS_NOT_SUPPORTED: return "CUBLAS_STATUS_NOT_SUPPORTED";
  default: return "CUBLAS_STATUS_UNKNOWN";
  }
}

const char *cublasGetStatusString(cublasStatus_t s) {
  return s == CUBLAS_STATUS_SUCCESS ? "success" : "emulated cuBLAS error (see stderr)";
}

cublasStatus_t cublasGemmEx(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m,
                            int n, int k, const void *alpha, const void *A, cudaDataType at,
                            int lda, const void *B, cudaDataType bt, int ldb, const void *beta,
                            void *C, cudaDataType ct, int ldc, cublasComputeType_t compute,
                            cublasGemmAlgo_t algo) {
  LOCK;
  (void)algo;
  if (compute != CUBLAS_COMPUTE_32F && compute != CUBLAS_COMPUTE_32F_FAST_TF32)
    return CUBLAS_STATUS_NOT_SUPPORTED;
  for (cudaDataType t : {at, bt, ct})
    if (t != CUDA_R_32F && t != CUDA_R_16F && t != CUDA_R_16BF) return CUBLAS_STATUS_NOT_SUPPORTED;
  return gemm(h, ta, tb, m, n, k, alpha, A, at, lda, B, bt, ldb, beta, C, ct, ldc);
}

cublasStatus_t cublasSgemm(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m,
                           int n, int k, const float *alpha, const float *A, int lda,
                           const float *B, int ldb, const float *beta, float *C, int ldc) {
  LOCK;
  return gemm(h, ta, tb, m, n, k, alpha, A, CUDA_R_32F, lda, B, CUDA_R_32F, ldb, beta, C,
              CUDA_R_32F, ldc);
}

cublasStatus_t cublasSaxpy(cublasHandle_t h, int n, const float *alpha, const float *x, int incx,
                           float *y, int incy) {
  LOCK;
  if (!h) return CUBLAS_STATUS_NOT_INITIALIZED;
  if (n <= 0) return CUBLAS_STATUS_SUCCESS;
  if (incx == 0 || incy == 0) return CUBLAS_STATUS_INVALID_VALUE;
  const float a = h->pointer_mode == CUBLAS_POINTER_MODE_HOST ? *alpha : 0.0f;
  const bool dev_alpha = h->pointer_mode != CUBLAS_POINTER_MODE_HOST;
  const cudaError_t e = submit(h->stream, [=]() {
    const float al = dev_alpha ? *alpha : a;
    for (int i = 0; i < n; i++) {
      const int64_t xi = incx > 0 ? (int64_t)i * incx : (int64_t)(n - 1 - i) * -incx;
      const int64_t yi = incy > 0 ? (int64_t)i * incy : (int64_t)(n - 1 - i) * -incy;
      y[yi] = fmaf(al, x[xi], y[yi]);
    }
  });
  return e == cudaSuccess ? CUBLAS_STATUS_SUCCESS : CUBLAS_STATUS_EXECUTION_FAILED;
}
