/*
 * validate.c: the argument checks every family's entry points share. One
 * place decides what is legal, for both backends.
 */
#include "internal.h"

culoss_status culoss__check_dtype(const char *fn, culoss_dtype dtype) {
  if (dtype != CULOSS_F32 && dtype != CULOSS_F16 && dtype != CULOSS_BF16)
    return CULOSS__BAD("%s: unknown dtype %d", fn, (int)dtype);
  return CULOSS_OK;
}

culoss_status culoss__check_index_type(const char *fn, culoss_index_type t) {
  if (t != CULOSS_I32 && t != CULOSS_I64)
    return CULOSS__BAD("%s: unknown target index type %d", fn, (int)t);
  return CULOSS_OK;
}

culoss_status culoss__check_reduction(const char *fn, culoss_reduction r, int allow_batchmean) {
  if (r == CULOSS_REDUCTION_NONE || r == CULOSS_REDUCTION_SUM || r == CULOSS_REDUCTION_MEAN ||
      (allow_batchmean && r == CULOSS_REDUCTION_BATCHMEAN))
    return CULOSS_OK;
  return CULOSS__BAD("%s: reduction %d is not %s", fn, (int)r,
                     allow_batchmean ? "NONE, SUM, MEAN or BATCHMEAN" : "NONE, SUM or MEAN");
}

culoss_status culoss__check_rows(const char *fn, int64_t n, int64_t c, int64_t ld) {
  if (n < 0) return CULOSS__BAD("%s: n = %lld is negative", fn, (long long)n);
  if (c < 1) return CULOSS__BAD("%s: c = %lld must be >= 1", fn, (long long)c);
  if (ld < c)
    return CULOSS__BAD("%s: ld = %lld is less than c = %lld", fn, (long long)ld, (long long)c);
  /* n * ld elements of up to 4 bytes, in bytes, fit a 64-bit offset */
  if (n > 0 && ld > INT64_MAX / 4 / n)
    return CULOSS__BAD("%s: n * %s = %lld * %lld overflows 64-bit byte offsets", fn,
                       ld == c ? "c" : "ld", (long long)n, (long long)ld);
  return CULOSS_OK;
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
