#include <criterion/criterion.h>
#include <stdlib.h>

#include "helpers.h"

void gpu_open(culoss_context **gpu, culoss_context **cpu) {
  culoss_status st = culoss_create(gpu, CULOSS_BACKEND_CUDA, 0);
  *cpu = NULL;
  if (st == CULOSS_ERROR_NO_DEVICE) {
    *gpu = NULL;
    return;
  }
  cr_assert_eq(st, CULOSS_OK, "culoss_create(CUDA): %s", culoss_last_error());
  cr_assert_eq(culoss_create(cpu, CULOSS_BACKEND_CPU, 0), CULOSS_OK);
}

void gpu_close(culoss_context *gpu, culoss_context *cpu) {
  if (gpu) cr_expect_eq(culoss_synchronize(gpu), CULOSS_OK, "%s", culoss_last_error());
  culoss_destroy(gpu);
  culoss_destroy(cpu);
}

void gpu_reopen(culoss_context **gpu) {
  cr_assert_eq(culoss_synchronize(*gpu), CULOSS_OK, "%s", culoss_last_error());
  cr_assert_eq(culoss_destroy(*gpu), CULOSS_OK);
  *gpu = NULL;
  cr_assert_eq(culoss_create(gpu, CULOSS_BACKEND_CUDA, 0), CULOSS_OK, "culoss_create(CUDA): %s",
               culoss_last_error());
}

void *dev_alloc_(culoss_context *gpu, size_t bytes) {
  void *p = NULL;
  culoss_status st = culoss_malloc(gpu, &p, bytes);
  cr_assert_eq(st, CULOSS_OK, "culoss_malloc(%zu): %s", bytes, culoss_last_error());
  return p;
}

void *dev_from_(culoss_context *gpu, const void *host, size_t bytes) {
  void *p = dev_alloc_(gpu, bytes);
  cr_assert_eq(culoss_upload(gpu, p, host, bytes), CULOSS_OK, "%s", culoss_last_error());
  return p;
}

void dev_poison_(culoss_context *gpu, void *d, size_t bytes) {
  void *h = malloc(bytes);
  poison(h, bytes);
  cr_assert_eq(culoss_upload(gpu, d, h, bytes), CULOSS_OK);
  free(h);
}

void to_host_(culoss_context *gpu, void *h, const void *d, size_t bytes) {
  cr_assert_eq(culoss_download(gpu, h, d, bytes), CULOSS_OK, "%s", culoss_last_error());
}

int test_quick(void) { return getenv("CULOSS_TEST_QUICK") != NULL; }

int test_emulated_small(void) {
#ifdef CULOSS_TEST_EMULATOR
  return getenv("CULOSS_EMU_BIG") == NULL;
#else
  return 0;
#endif
}
