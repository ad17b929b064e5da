/*
 * context.cu: the CUDA set-up a context does once, at culoss_create: the
 * fused cross-entropy kernels' dynamic shared memory limit (their row cache
 * may use the whole opt-in amount) and the cuBLAS handle of linear CE, with
 * a fixed workspace so that no call allocates (capture safety).
 */
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include "backend.h"
#include "cross_entropy.cuh"

namespace {

constexpr size_t CUBLAS_WS_BYTES = (size_t)32 << 20;

culoss_status kernel_attributes(culoss_context *ctx) {
  using culoss_dev::CE_STATIC_SMEM_RESERVE;
  if (ctx->smem_optin <= CE_STATIC_SMEM_RESERVE)
    return culoss__error(CULOSS_ERROR_NOT_SUPPORTED, "device shared memory per block too small");
  for (int i = 0; i < culoss_dev::ce_kernel_count(); i++) {
    const void *k = culoss_dev::ce_kernel_address(i);
    cudaFuncAttributes attr;
    cudaError_t e = cudaFuncGetAttributes(&attr, k);
    if (e != cudaSuccess) return culoss__cuda_status(e, "cudaFuncGetAttributes(ce_kernel)");
    /* The cluster kernel's body is sm_90 code: a binary whose code for this
       GPU comes from older PTX (built for sm_80 only, JIT-compiled on an
       H100) has a trap there, so the context keeps one block per row. */
    if (culoss_dev::ce_kernel_is_cluster(i) && attr.ptxVersion < 90) ctx->cluster_launch = 0;
    if (attr.sharedSizeBytes > CE_STATIC_SMEM_RESERVE)
      return culoss__error(CULOSS_ERROR_INTERNAL,
                           "ce_kernel static shared memory %zu exceeds the reserve %zu",
                           (size_t)attr.sharedSizeBytes, CE_STATIC_SMEM_RESERVE);
    e = cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             (int)(ctx->smem_optin - CE_STATIC_SMEM_RESERVE));
    if (e != cudaSuccess)
      return culoss__cuda_status(e, "cudaFuncSetAttribute(ce_kernel, MaxDynamicSharedMemorySize)");
  }
  return CULOSS_OK;
}

culoss_status cublas_create(culoss_context *ctx) {
  cublasHandle_t h = nullptr;
  culoss_status st = culoss__cublas_status(cublasCreate(&h), "cublasCreate");
  if (st != CULOSS_OK) return st;
  ctx->cublas = h;
  const cudaError_t e = cudaMalloc(&ctx->cublas_ws, CUBLAS_WS_BYTES);
  if (e != cudaSuccess) return culoss__cuda_status(e, "cudaMalloc(cuBLAS workspace)");
  st = culoss__cublas_status(cublasSetWorkspace(h, ctx->cublas_ws, CUBLAS_WS_BYTES),
                             "cublasSetWorkspace");
  if (st != CULOSS_OK) return st;
  return culoss__cublas_status(cublasSetPointerMode(h, CUBLAS_POINTER_MODE_HOST),
                               "cublasSetPointerMode");
}

} // namespace

extern "C" culoss_status culoss__cublas_status(int status, const char *what) {
  const cublasStatus_t s = (cublasStatus_t)status;
  if (s == CUBLAS_STATUS_SUCCESS) return CULOSS_OK;
  return culoss__error(
      s == CUBLAS_STATUS_ALLOC_FAILED ? CULOSS_ERROR_OUT_OF_MEMORY : CULOSS_ERROR_CUBLAS,
      "%s failed: %s (%s)", what, cublasGetStatusName(s), cublasGetStatusString(s));
}

extern "C" culoss_status culoss__cuda_context_init(culoss_context *ctx) {
  culoss_status st = kernel_attributes(ctx);
  if (st != CULOSS_OK) return st;
  cudaEvent_t ev = nullptr;
  const cudaError_t e = cudaEventCreateWithFlags(&ev, cudaEventDisableTiming);
  if (e != cudaSuccess) return culoss__cuda_status(e, "cudaEventCreateWithFlags");
  ctx->stream_event = ev;
  return cublas_create(ctx);
}

extern "C" void culoss__cuda_context_release(culoss_context *ctx) {
  if (ctx->cublas) cublasDestroy((cublasHandle_t)ctx->cublas);
  if (ctx->cublas_ws) cudaFree(ctx->cublas_ws);
  if (ctx->stream_event) cudaEventDestroy((cudaEvent_t)ctx->stream_event);
  ctx->cublas = nullptr;
  ctx->cublas_ws = nullptr;
  ctx->stream_event = nullptr;
}
