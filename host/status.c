/*
 * status.c: status strings, the thread-local last-error text, the version,
 * and dtype helpers for the host side.
 */
#include <stdarg.h>
#include <stdio.h>

#include "internal.h"

/* Thread-local so that concurrent callers on different threads each read the
   detail of their own last failure. */
static _Thread_local char culoss__last_error_text[512];

culoss_status culoss__error(culoss_status status, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(culoss__last_error_text, sizeof culoss__last_error_text, fmt, ap);
  va_end(ap);
  return status;
}

const char *culoss_last_error(void) { return culoss__last_error_text; }

const char *culoss_status_string(culoss_status status) {
  switch (status) {
  case CULOSS_OK: return "CULOSS_OK";
  case CULOSS_ERROR_INVALID_VALUE: return "CULOSS_ERROR_INVALID_VALUE";
  case CULOSS_ERROR_TARGET_OUT_OF_RANGE: return "CULOSS_ERROR_TARGET_OUT_OF_RANGE";
  case CULOSS_ERROR_NOT_SUPPORTED: return "CULOSS_ERROR_NOT_SUPPORTED";
  case CULOSS_ERROR_NO_DEVICE: return "CULOSS_ERROR_NO_DEVICE";
  case CULOSS_ERROR_OUT_OF_MEMORY: return "CULOSS_ERROR_OUT_OF_MEMORY";
  case CULOSS_ERROR_CUDA: return "CULOSS_ERROR_CUDA";
  case CULOSS_ERROR_CUBLAS: return "CULOSS_ERROR_CUBLAS";
  case CULOSS_ERROR_INTERNAL: return "CULOSS_ERROR_INTERNAL";
  }
  return "CULOSS_ERROR_UNKNOWN";
}

int culoss_version(void) {
  return CULOSS_VERSION_MAJOR * 10000 + CULOSS_VERSION_MINOR * 100 + CULOSS_VERSION_PATCH;
}

size_t culoss__dtype_size(culoss_dtype dtype) { return dtype == CULOSS_F32 ? 4u : 2u; }

float culoss__load_f32(const void *p, culoss_dtype dtype, int64_t i) {
  switch (dtype) {
  case CULOSS_F16: return culoss__f16_to_f32(((const uint16_t *)p)[i]);
  case CULOSS_BF16: return culoss__bf16_to_f32(((const uint16_t *)p)[i]);
  default: return ((const float *)p)[i];
  }
}

void culoss__store_f32(void *p, culoss_dtype dtype, int64_t i, float v) {
  switch (dtype) {
  case CULOSS_F16: ((uint16_t *)p)[i] = culoss__f32_to_f16(v); break;
  case CULOSS_BF16: ((uint16_t *)p)[i] = culoss__f32_to_bf16(v); break;
  default: ((float *)p)[i] = v; break;
  }
}
