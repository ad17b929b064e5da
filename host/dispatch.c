/*
 * dispatch.c: how a call reaches the CUDA backend: the context's device made
 * current for the call (and the caller's restored after it), inside an NVTX
 * range named after the entry point. Loss calls and the buffer calls of
 * host/context.c all go through culoss__dispatch_cuda.
 */
#include "internal.h"

#ifdef CULOSS_HAVE_CUDA
#include <cuda_runtime_api.h>

#ifdef CULOSS_HAVE_NVTX
#include <nvtx3/nvToolsExt.h>
#define CULOSS_RANGE_PUSH(name) nvtxRangePushA(name)
#define CULOSS_RANGE_POP() nvtxRangePop()
#else
#define CULOSS_RANGE_PUSH(name) ((void)(name))
#define CULOSS_RANGE_POP() ((void)0)
#endif

culoss_status culoss__cuda_status(int err, const char *what) {
  const cudaError_t e = (cudaError_t)err;
  if (e == cudaSuccess) return CULOSS_OK;
  return culoss__error(e == cudaErrorMemoryAllocation ? CULOSS_ERROR_OUT_OF_MEMORY
                                                      : CULOSS_ERROR_CUDA,
                       "%s failed: %s (%s)", what, cudaGetErrorName(e), cudaGetErrorString(e));
}

culoss_status culoss__device_enter(const culoss_context *ctx, int *prev) {
  cudaError_t e = cudaGetDevice(prev);
  if (e != cudaSuccess) return culoss__cuda_status(e, "cudaGetDevice");
  if (*prev != ctx->device) {
    e = cudaSetDevice(ctx->device);
    if (e != cudaSuccess) return culoss__cuda_status(e, "cudaSetDevice");
  }
  return CULOSS_OK;
}

void culoss__device_leave(const culoss_context *ctx, int prev) {
  if (prev != ctx->device) (void)cudaSetDevice(prev);
}
#endif

culoss_status culoss__dispatch_cuda(culoss_context *ctx, const char *fn, culoss__launcher launch,
                                    const void *args) {
#ifdef CULOSS_HAVE_CUDA
  int prev = 0;
  culoss_status st = culoss__device_enter(ctx, &prev);
  if (st != CULOSS_OK) return st;
  /* host-side only: nothing is enqueued, so it is capture-safe */
  CULOSS_RANGE_PUSH(fn);
  st = launch(ctx, args);
  CULOSS_RANGE_POP();
  culoss__device_leave(ctx, prev);
  return st;
#else
  (void)ctx, (void)launch, (void)args;
  return culoss__error(CULOSS_ERROR_INTERNAL, "%s: CUDA context in a CPU-only build", fn);
#endif
}
