/*
 * validate.c: argument checks shared by every entry point, and the CUDA
 * dispatch wrapper. One place decides what is legal, for both backends.
 */
#include "internal.h"

#if defined(CULOSS_HAVE_CUDA) && defined(CULOSS_HAVE_NVTX)
#include <nvtx3/nvToolsExt.h>
#define CULOSS_RANGE_PUSH(name) nvtxRangePushA(name)
#define CULOSS_RANGE_POP() nvtxRangePop()
#else
#define CULOSS_RANGE_PUSH(name) ((void)(name))
#define CULOSS_RANGE_POP() ((void)0)
#endif

culoss_status culoss__check_dtype(const char *fn, culoss_dtype dtype) {
  if (dtype != CULOSS_F32 && dtype != CULOSS_F16 && dtype != CULOSS_BF16)
    return culoss__error(CULOSS_ERROR_INVALID_VALUE, "%s: unknown dtype %d", fn, (int)dtype);
  return CULOSS_OK;
}

culoss_status culoss__check_index_type(const char *fn, culoss_index_type t) {
  if (t != CULOSS_I32 && t != CULOSS_I64)
    return culoss__error(CULOSS_ERROR_INVALID_VALUE, "%s: unknown target index type %d", fn,
                         (int)t);
  return CULOSS_OK;
}

culoss_status culoss__check_reduction(const char *fn, culoss_reduction r, int allow_batchmean) {
  if (r == CULOSS_REDUCTION_NONE || r == CULOSS_REDUCTION_SUM || r == CULOSS_REDUCTION_MEAN ||
      (allow_batchmean && r == CULOSS_REDUCTION_BATCHMEAN))
    return CULOSS_OK;
  return culoss__error(CULOSS_ERROR_INVALID_VALUE, "%s: reduction %d is not %s", fn, (int)r,
                       allow_batchmean ? "NONE, SUM, MEAN or BATCHMEAN" : "NONE, SUM or MEAN");
}

int64_t culoss__target_at(const void *targets, culoss_index_type t, int64_t i) {
  return t == CULOSS_I32 ? (int64_t)((const int32_t *)targets)[i] : ((const int64_t *)targets)[i];
}

culoss_status culoss__check_targets_cpu(const char *fn, const void *targets, culoss_index_type t,
                                        int64_t n, int64_t c, int has_ignore,
                                        int64_t ignore_index) {
  int64_t i;
  for (i = 0; i < n; i++) {
    int64_t v = culoss__target_at(targets, t, i);
    if (has_ignore && v == ignore_index) continue;
    if (v < 0 || v >= c) {
      if (has_ignore)
        return culoss__error(CULOSS_ERROR_TARGET_OUT_OF_RANGE,
                             "%s: targets[%lld] = %lld is outside [0, %lld) and is not "
                             "ignore_index (%lld)",
                             fn, (long long)i, (long long)v, (long long)c, (long long)ignore_index);
      return culoss__error(CULOSS_ERROR_TARGET_OUT_OF_RANGE,
                           "%s: targets[%lld] = %lld is outside [0, %lld)", fn, (long long)i,
                           (long long)v, (long long)c);
    }
  }
  return CULOSS_OK;
}

culoss_status culoss__dispatch_cuda(culoss_context *ctx, const char *fn,
                                    culoss_status (*launch)(culoss_context *, const void *),
                                    const void *args) {
#ifdef CULOSS_HAVE_CUDA
  int prev = 0;
  culoss_status st = culoss__device_enter(ctx, &prev);
  if (st != CULOSS_OK) return st;
  /* An NVTX range around every loss call's launches, named after the entry
     point, so profiles attribute kernels to culoss calls (host-side only:
     nothing is enqueued, capture-safe). */
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
