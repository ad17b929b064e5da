#define _POSIX_C_SOURCE 200809L /* setenv */
/* test_api.c: status strings, version, contexts, buffers and argument
   validation (every bad argument is an error with a message, and nothing is
   written to the outputs). */
#include <criterion/criterion.h>
#include <math.h>
#include <string.h>

#include "helpers.h"

Test(api, version) {
  cr_assert_eq(culoss_version(),
               CULOSS_VERSION_MAJOR * 10000 + CULOSS_VERSION_MINOR * 100 + CULOSS_VERSION_PATCH);
}

Test(api, status_numbers_and_strings) {
  /* fixed numbers: part of the ABI */
  cr_assert_eq(CULOSS_OK, 0);
  cr_assert_eq(CULOSS_ERROR_INVALID_VALUE, 1);
  cr_assert_eq(CULOSS_ERROR_TARGET_OUT_OF_RANGE, 2);
  cr_assert_eq(CULOSS_ERROR_NOT_SUPPORTED, 3);
  cr_assert_eq(CULOSS_ERROR_NO_DEVICE, 4);
  cr_assert_eq(CULOSS_ERROR_OUT_OF_MEMORY, 5);
  cr_assert_eq(CULOSS_ERROR_CUDA, 6);
  cr_assert_eq(CULOSS_ERROR_CUBLAS, 7);
  cr_assert_eq(CULOSS_ERROR_INTERNAL, 8);
  cr_assert_str_eq(culoss_status_string(CULOSS_OK), "CULOSS_OK");
  cr_assert_str_eq(culoss_status_string(CULOSS_ERROR_TARGET_OUT_OF_RANGE),
                   "CULOSS_ERROR_TARGET_OUT_OF_RANGE");
  cr_assert_str_eq(culoss_status_string((culoss_status)99), "CULOSS_ERROR_UNKNOWN");
  cr_assert_not_null(culoss_last_error());
}

Test(api, create_bad_arguments) {
  culoss_context *ctx = (culoss_context *)1;
  cr_assert_eq(culoss_create(NULL, CULOSS_BACKEND_CPU, 0), CULOSS_ERROR_INVALID_VALUE);
  cr_assert_eq(culoss_create(&ctx, (culoss_backend)7, 0), CULOSS_ERROR_INVALID_VALUE);
  cr_assert_null(ctx, "failed create sets *ctx = NULL");
  cr_assert(strstr(culoss_last_error(), "backend") != NULL);
  cr_assert_eq(culoss_destroy(NULL), CULOSS_OK);
}

Test(api, cuda_create_without_device_is_no_device) {
  culoss_context *ctx = NULL;
  culoss_status st = culoss_create(&ctx, CULOSS_BACKEND_CUDA, 0);
  if (st == CULOSS_OK) {
    culoss_destroy(ctx);
    cr_skip_test("skipped: a CUDA device is present (this test covers machines without one)");
  }
  cr_assert_eq(st, CULOSS_ERROR_NO_DEVICE, "%s", culoss_status_string(st));
  cr_assert_null(ctx);
  cr_assert_gt(strlen(culoss_last_error()), 10, "a clear message: %s", culoss_last_error());
}

Test(api, cpu_buffers) {
  culoss_context *ctx;
  cr_assert_eq(culoss_create(&ctx, CULOSS_BACKEND_CPU, 0), CULOSS_OK);
  void *p = (void *)1;
  cr_assert_eq(culoss_malloc(ctx, &p, 0), CULOSS_OK);
  cr_assert_null(p);
  cr_assert_eq(culoss_malloc(ctx, &p, 1000), CULOSS_OK);
  cr_assert_eq((uintptr_t)p % 64, 0, "64-byte aligned");
  const char src[5] = "abcd";
  char dst[5] = {0};
  cr_assert_eq(culoss_upload(ctx, p, src, 5), CULOSS_OK);
  cr_assert_eq(culoss_download(ctx, dst, p, 5), CULOSS_OK);
  cr_assert_str_eq(dst, "abcd");
  cr_assert_eq(culoss_upload(ctx, NULL, src, 5), CULOSS_ERROR_INVALID_VALUE);
  cr_assert_eq(culoss_download(ctx, NULL, p, 5), CULOSS_ERROR_INVALID_VALUE);
  cr_assert_eq(culoss_malloc(ctx, NULL, 5), CULOSS_ERROR_INVALID_VALUE);
  cr_assert_eq(culoss_malloc(NULL, &p, 5), CULOSS_ERROR_INVALID_VALUE);
  cr_assert_eq(culoss_free(ctx, p), CULOSS_OK);
  cr_assert_eq(culoss_free(ctx, NULL), CULOSS_OK);
  cr_assert_eq(culoss_set_stream(ctx, NULL), CULOSS_OK);
  cr_assert_eq(culoss_set_stream(ctx, (void *)16), CULOSS_ERROR_NOT_SUPPORTED);
  cr_assert_eq(culoss_synchronize(ctx), CULOSS_OK);
  cr_assert_eq(culoss_synchronize(NULL), CULOSS_ERROR_INVALID_VALUE);
  culoss_destroy(ctx);
}

/* Every bad argument: INVALID_VALUE, a message naming the argument, and the
   outputs untouched. */
typedef struct {
  const char *what; /* substring the message must contain */
  int64_t n, c, ld;
  int dtype, ttype;
  int null_ctx, null_logits, null_targets, null_loss;
  culoss_cross_entropy_options o;
  int fn; /* 0 ce, 1 soft, 2 nll */
} bad_case;

static culoss_cross_entropy_options defaults(void) {
  culoss_cross_entropy_options o;
  culoss_cross_entropy_options_init(&o);
  return o;
}

Test(api, bad_arguments_are_invalid_value_and_write_nothing) {
  culoss_context *ctx;
  cr_assert_eq(culoss_create(&ctx, CULOSS_BACKEND_CPU, 0), CULOSS_OK);
  bad_case cases[32];
  int k = 0;
  const bad_case base = {"", 2, 3, 3, CULOSS_F32, CULOSS_I64, 0, 0, 0, 0, defaults(), 0};
#define ADD(field_assign, msg)                                                                     \
  do {                                                                                             \
    cases[k] = base;                                                                               \
    cases[k].what = msg;                                                                           \
    {                                                                                              \
      bad_case *b = &cases[k];                                                                     \
      field_assign;                                                                                \
    }                                                                                              \
    k++;                                                                                           \
  } while (0)
  ADD(b->null_ctx = 1, "ctx");
  ADD(b->n = -1, "n = -1");
  ADD(b->c = 0, "c = 0");
  ADD(b->c = -5, "c = -5");
  ADD(b->ld = 2, "ld = 2");
  ADD(b->dtype = 9, "dtype");
  ADD(b->ttype = 5, "index type");
  ADD(b->null_logits = 1, "logits");
  ADD(b->null_targets = 1, "targets");
  ADD(b->null_loss = 1, "loss");
  ADD(b->o.reduction = CULOSS_REDUCTION_BATCHMEAN, "reduction");
  ADD(b->o.reduction = (culoss_reduction)42, "reduction");
  ADD(b->o.label_smoothing = 1.5f, "label_smoothing");
  ADD(b->o.label_smoothing = -0.1f, "label_smoothing");
  ADD(b->o.label_smoothing = NAN, "label_smoothing");
  ADD(b->o.z_loss = -1.0f, "z_loss");
  ADD(b->o.z_loss = INFINITY, "z_loss");
  ADD(b->o.logit_softcap = -3.0f, "logit_softcap");
  ADD(b->o.logit_softcap = NAN, "logit_softcap");
  ADD((b->fn = 2, b->o.label_smoothing = 0.1f), "NLL");
  ADD((b->fn = 2, b->o.z_loss = 0.1f), "NLL");
  ADD((b->fn = 1, b->null_logits = 1), "logits");
  ADD((b->fn = 1, b->null_targets = 1), "target_probs");
  ADD((b->n = (int64_t)1 << 40, b->c = (int64_t)1 << 30, b->ld = (int64_t)1 << 30), "overflow");
#undef ADD
  const float x[6] = {1, 2, 3, 4, 5, 6};
  const int64_t t[2] = {0, 1};
  for (int i = 0; i < k; i++) {
    bad_case *b = &cases[i];
    float loss[2] = {-9.0f, -9.0f}, g[6] = {-9, -9, -9, -9, -9, -9};
    culoss_context *cx = b->null_ctx ? NULL : ctx;
    const void *xp = b->null_logits ? NULL : x;
    const void *tp = b->null_targets ? NULL : (const void *)t;
    float *lp = b->null_loss ? NULL : loss;
    culoss_status st;
    if (b->fn == 0)
      st = culoss_cross_entropy(cx, &b->o, b->n, b->c, (culoss_dtype)b->dtype, xp, b->ld,
                                (culoss_index_type)b->ttype, tp, lp, g, NULL);
    else if (b->fn == 1)
      st = culoss_cross_entropy_soft(cx, &b->o, b->n, b->c, (culoss_dtype)b->dtype, xp, b->ld,
                                     b->null_targets ? NULL : x, lp, g, NULL);
    else
      st = culoss_nll(cx, &b->o, b->n, b->c, (culoss_dtype)b->dtype, xp, b->ld,
                      (culoss_index_type)b->ttype, tp, lp, g, NULL);
    cr_assert_eq(st, CULOSS_ERROR_INVALID_VALUE, "case %d (%s): got %s", i, b->what,
                 culoss_status_string(st));
    cr_assert(strstr(culoss_last_error(), b->what) != NULL, "case %d: message '%s' lacks '%s'", i,
              culoss_last_error(), b->what);
    cr_assert(loss[0] == -9.0f && loss[1] == -9.0f, "case %d wrote the loss", i);
    for (int j = 0; j < 6; j++) cr_assert_eq(g[j], -9.0f, "case %d wrote the gradient", i);
  }
  culoss_destroy(ctx);
}

/* Every entry point that takes a context: NULL is INVALID_VALUE with a
   message naming ctx, and a CPU context stays usable after each error. */
Test(api, every_entry_point_rejects_null_ctx) {
  const float x[4] = {0.5f, 0.5f, 0.5f, 0.5f};
  const int64_t t[2] = {0, 1};
  float loss[4] = {-9, -9, -9, -9};
  void *p = NULL;
  size_t ws = 0;
  culoss_status st[24];
  int k = 0;
  st[k++] = culoss_set_stream(NULL, NULL);
  st[k++] = culoss_synchronize(NULL);
  st[k++] = culoss_malloc(NULL, &p, 4);
  st[k++] = culoss_free(NULL, loss);
  st[k++] = culoss_upload(NULL, loss, x, 4);
  st[k++] = culoss_download(NULL, loss, x, 4);
  st[k++] =
      culoss_cross_entropy(NULL, NULL, 2, 2, CULOSS_F32, x, 2, CULOSS_I64, t, loss, NULL, NULL);
  st[k++] = culoss_cross_entropy_soft(NULL, NULL, 2, 2, CULOSS_F32, x, 2, x, loss, NULL, NULL);
  st[k++] = culoss_nll(NULL, NULL, 2, 2, CULOSS_F32, x, 2, CULOSS_I64, t, loss, NULL, NULL);
  st[k++] = culoss_bce_with_logits(NULL, NULL, 2, 2, CULOSS_F32, x, x, loss, NULL, NULL);
  st[k++] = culoss_bce(NULL, NULL, 2, 2, CULOSS_F32, x, x, loss, NULL, NULL);
  st[k++] = culoss_hinge(NULL, NULL, 4, CULOSS_F32, x, x, loss, NULL, NULL);
  st[k++] =
      culoss_multi_margin(NULL, NULL, 2, 2, CULOSS_F32, x, 2, CULOSS_I64, t, loss, NULL, NULL);
  st[k++] = culoss_mse(NULL, NULL, 4, CULOSS_F32, x, x, loss, NULL, NULL);
  st[k++] = culoss_l1(NULL, NULL, 4, CULOSS_F32, x, x, loss, NULL, NULL);
  st[k++] = culoss_huber(NULL, NULL, 4, CULOSS_F32, x, x, loss, NULL, NULL);
  st[k++] = culoss_smooth_l1(NULL, NULL, 4, CULOSS_F32, x, x, loss, NULL, NULL);
  st[k++] = culoss_kl_div(NULL, NULL, 2, 2, CULOSS_F32, x, x, loss, NULL, NULL);
  st[k++] = culoss_linear_cross_entropy_workspace_size(NULL, 2, 2, 2, CULOSS_F32, &ws);
  st[k++] = culoss_linear_cross_entropy(NULL, NULL, 2, 2, 2, CULOSS_F32, x, x, NULL, CULOSS_I64, t,
                                        loss, NULL, NULL, NULL, NULL, NULL, 0);
  for (int i = 0; i < k; i++) cr_assert_eq(st[i], CULOSS_ERROR_INVALID_VALUE, "entry %d", i);
  cr_assert(strstr(culoss_last_error(), "ctx is NULL") != NULL, "%s", culoss_last_error());
  for (int i = 0; i < 4; i++) cr_assert_eq(loss[i], -9.0f, "a NULL-ctx call wrote the loss");
  /* NULL option pointers mean the defaults (and the options_init functions accept NULL) */
  culoss_cross_entropy_options_init(NULL);
  culoss_bce_options_init(NULL);
  culoss_hinge_options_init(NULL);
  culoss_multi_margin_options_init(NULL);
  culoss_regression_options_init(NULL);
  culoss_kl_div_options_init(NULL);
  culoss_hinge_embedding_options_init(NULL);
  culoss_soft_margin_options_init(NULL);
  culoss_poisson_nll_options_init(NULL);
  culoss_sigmoid_focal_options_init(NULL);
}

/* Extreme class targets, both index types; the context stays usable. */
Test(api, extreme_targets_and_context_reuse) {
  culoss_context *ctx;
  cr_assert_eq(culoss_create(&ctx, CULOSS_BACKEND_CPU, 0), CULOSS_OK);
  const float x[6] = {1, 2, 3, 4, 5, 6};
  float loss[2] = {-9, -9};
  const int64_t t64[][2] = {{0, INT64_MIN}, {INT64_MAX, 0}, {0, 3}, {-1, 0}};
  const int32_t t32[][2] = {{0, INT32_MIN}, {INT32_MAX, 0}, {0, 3}, {-1, 0}};
  culoss_cross_entropy_options o;
  culoss_cross_entropy_options_init(&o);
  o.reduction = CULOSS_REDUCTION_NONE;
  for (int k = 0; k < 4; k++) {
    cr_assert_eq(
        culoss_cross_entropy(ctx, &o, 2, 3, CULOSS_F32, x, 3, CULOSS_I64, t64[k], loss, NULL, NULL),
        CULOSS_ERROR_TARGET_OUT_OF_RANGE, "i64 case %d", k);
    cr_assert_eq(
        culoss_cross_entropy(ctx, &o, 2, 3, CULOSS_F32, x, 3, CULOSS_I32, t32[k], loss, NULL, NULL),
        CULOSS_ERROR_TARGET_OUT_OF_RANGE, "i32 case %d", k);
    cr_assert_eq(culoss_multi_margin(ctx, NULL, 2, 3, CULOSS_F32, x, 3, CULOSS_I32, t32[k], loss,
                                     NULL, NULL),
                 CULOSS_ERROR_TARGET_OUT_OF_RANGE, "mm case %d", k);
    cr_assert(loss[0] == -9.0f && loss[1] == -9.0f, "case %d wrote the loss", k);
  }
  /* ignore_index = INT64_MIN ignores that row instead */
  o.ignore_index = INT64_MIN;
  cr_assert_eq(
      culoss_cross_entropy(ctx, &o, 2, 3, CULOSS_F32, x, 3, CULOSS_I64, t64[0], loss, NULL, NULL),
      CULOSS_OK);
  cr_assert_eq(loss[1], 0.0f);
  culoss_destroy(ctx);
}

/* A destroyed context is rejected by pointer value (never dereferenced):
   every call, and a second destroy, give INVALID_VALUE. */
Test(api, destroyed_context_is_rejected) {
  culoss_context *ctx, *other;
  cr_assert_eq(culoss_create(&ctx, CULOSS_BACKEND_CPU, 0), CULOSS_OK);
  cr_assert_eq(culoss_create(&other, CULOSS_BACKEND_CPU, 0), CULOSS_OK);
  cr_assert_eq(culoss_destroy(ctx), CULOSS_OK);
  const float x[3] = {1, 2, 3};
  const int64_t t[1] = {0};
  float loss = -9.0f;
  void *p;
  cr_assert_eq(
      culoss_cross_entropy(ctx, NULL, 1, 3, CULOSS_F32, x, 3, CULOSS_I64, t, &loss, NULL, NULL),
      CULOSS_ERROR_INVALID_VALUE);
  cr_assert(strstr(culoss_last_error(), "not a live culoss context") != NULL, "%s",
            culoss_last_error());
  cr_assert_eq(loss, -9.0f);
  cr_assert_eq(culoss_malloc(ctx, &p, 16), CULOSS_ERROR_INVALID_VALUE);
  cr_assert_eq(culoss_mse(ctx, NULL, 3, CULOSS_F32, x, x, &loss, NULL, NULL),
               CULOSS_ERROR_INVALID_VALUE);
  cr_assert_eq(culoss_destroy(ctx), CULOSS_ERROR_INVALID_VALUE, "double destroy is detected");
  /* the other context is unaffected */
  cr_assert_eq(
      culoss_cross_entropy(other, NULL, 1, 3, CULOSS_F32, x, 3, CULOSS_I64, t, &loss, NULL, NULL),
      CULOSS_OK);
  cr_assert_eq(culoss_destroy(other), CULOSS_OK);
}

/* Issue 19: only "no device" may become CULOSS_ERROR_NO_DEVICE (a skip in
   the GPU suites); a CUDA that is present but fails is an error. The
   emulator injects cudaGetDeviceCount's failures. */
#ifdef CULOSS_TEST_EMULATOR /* defined only where it can run (not an empty pass) */
Test(api, broken_cuda_is_an_error_not_no_device) {
  culoss_context *c = NULL;
  setenv("CULOSS_EMU_DEVICE_COUNT_ERROR", "3", 1); /* cudaErrorInitializationError */
  cr_assert_eq(culoss_create(&c, CULOSS_BACKEND_CUDA, 0), CULOSS_ERROR_CUDA);
  cr_assert(strstr(culoss_last_error(), "unusable") != NULL, "%s", culoss_last_error());
  cr_assert(c == NULL);
  setenv("CULOSS_EMU_DEVICE_COUNT_ERROR", "100", 1); /* cudaErrorNoDevice */
  cr_assert_eq(culoss_create(&c, CULOSS_BACKEND_CUDA, 0), CULOSS_ERROR_NO_DEVICE);
  unsetenv("CULOSS_EMU_DEVICE_COUNT_ERROR");
  cr_assert_eq(culoss_create(&c, CULOSS_BACKEND_CUDA, 0), CULOSS_OK);
  culoss_destroy(c);
}
#endif

Test(api, grid_limit_is_validated) {
  culoss_context *c = NULL;
  cr_assert_eq(culoss_create(&c, CULOSS_BACKEND_CPU, 0), CULOSS_OK);
  cr_assert_eq(culoss_set_grid_limit(c, 0), CULOSS_OK);
  cr_assert_eq(culoss_set_grid_limit(c, 4096), CULOSS_OK);
  cr_assert_eq(culoss_set_grid_limit(c, -1), CULOSS_ERROR_INVALID_VALUE);
  cr_assert(strstr(culoss_last_error(), "max_blocks") != NULL, "%s", culoss_last_error());
  cr_assert_eq(culoss_set_grid_limit(c, 4097), CULOSS_ERROR_INVALID_VALUE);
  cr_assert_eq(culoss_set_grid_limit(NULL, 1), CULOSS_ERROR_INVALID_VALUE);
  culoss_destroy(c);
}

/* The tuning knobs are read once, at culoss_create: a value that is not
   one of the documented ones fails the create (naming the variable), and a
   context keeps the value it was created with whatever the environment
   does later, so linear CE's workspace query and call always agree. */
Test(api, tuning_knobs_are_read_at_create) {
  static const char *bad[][2] = {{"CULOSS_CE_SHAPE", "64"},
                                 {"CULOSS_CE_SHAPE", "warps"},
                                 {"CULOSS_CE_CLUSTER", "2"},
                                 {"CULOSS_CE_CLUSTER", "yes"},
                                 {"CULOSS_CE_CACHE_BYTES", "12k"},
                                 {"CULOSS_CE_CACHE_BYTES", "-1"},
                                 {"CULOSS_CE_CACHE_BYTES", "99999999999999999999999"},
                                 {"CULOSS_LINEAR_CE_BLOCK_BYTES", "1023"},
                                 {"CULOSS_LINEAR_CE_BLOCK_BYTES", "lots"},
                                 {"CULOSS_LINEAR_CE_BLOCK_BYTES", "1099511627777"}}; /* 2^40+1 */
  static const char *good[][2] = {{"CULOSS_CE_SHAPE", "thread"},
                                  {"CULOSS_CE_SHAPE", "1"},
                                  {"CULOSS_CE_SHAPE", "8"},
                                  {"CULOSS_CE_SHAPE", "warp"},
                                  {"CULOSS_CE_SHAPE", "32"},
                                  {"CULOSS_CE_SHAPE", "256"},
                                  {"CULOSS_CE_SHAPE", "1024"},
                                  {"CULOSS_CE_CACHE_BYTES", "0"},
                                  {"CULOSS_CE_CLUSTER", "0"},
                                  {"CULOSS_CE_CLUSTER", "1"},
                                  {"CULOSS_LINEAR_CE_BLOCK_BYTES", "1024"}};
  culoss_context *ctx = NULL, *small = NULL;
  size_t def = 0, got = 0;
  /* the caller's environment must not decide the outcome */
  unsetenv("CULOSS_CE_SHAPE"), unsetenv("CULOSS_CE_CACHE_BYTES");
  unsetenv("CULOSS_LINEAR_CE_BLOCK_BYTES"), unsetenv("CULOSS_CE_CLUSTER");
  for (size_t i = 0; i < sizeof good / sizeof good[0]; i++) {
    setenv(good[i][0], good[i][1], 1);
    cr_assert_eq(culoss_create(&ctx, CULOSS_BACKEND_CPU, 0), CULOSS_OK, "%s=%s: %s", good[i][0],
                 good[i][1], culoss_last_error());
    culoss_destroy(ctx);
    unsetenv(good[i][0]);
  }
  for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
    setenv(bad[i][0], bad[i][1], 1);
    cr_assert_eq(culoss_create(&ctx, CULOSS_BACKEND_CPU, 0), CULOSS_ERROR_INVALID_VALUE, "%s=%s",
                 bad[i][0], bad[i][1]);
    cr_assert_null(ctx);
    cr_assert(strstr(culoss_last_error(), bad[i][0]) != NULL, "%s", culoss_last_error());
    unsetenv(bad[i][0]);
  }
  setenv("CULOSS_CE_SHAPE", "", 1); /* empty: the default */
  cr_assert_eq(culoss_create(&ctx, CULOSS_BACKEND_CPU, 0), CULOSS_OK);
  unsetenv("CULOSS_CE_SHAPE");
  cr_assert_eq(culoss_linear_cross_entropy_workspace_size(ctx, 1000, 64, 32000, CULOSS_BF16, &def),
               CULOSS_OK);
  setenv("CULOSS_LINEAR_CE_BLOCK_BYTES", "65536", 1);
  cr_assert_eq(culoss_create(&small, CULOSS_BACKEND_CPU, 0), CULOSS_OK);
  cr_assert_eq(culoss_linear_cross_entropy_workspace_size(ctx, 1000, 64, 32000, CULOSS_BF16, &got),
               CULOSS_OK);
  cr_assert_eq(got, def, "a context created before the setenv keeps its budget");
  unsetenv("CULOSS_LINEAR_CE_BLOCK_BYTES");
  cr_assert_eq(
      culoss_linear_cross_entropy_workspace_size(small, 1000, 64, 32000, CULOSS_BF16, &got),
      CULOSS_OK);
  /* 65536 bytes hold one row of 32000 bf16 logits: a 1-row block */
  cr_assert_lt(got, def);
  cr_assert_geq(got, (size_t)32000 * 2, "the block holds at least one row");
  culoss_destroy(ctx);
  culoss_destroy(small);
}
