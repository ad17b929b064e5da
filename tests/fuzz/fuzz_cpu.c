/*
 * fuzz_cpu.c: libFuzzer harness over the CPU backend's entry points.
 *
 * The input picks a loss, its sizes (small), dtype, reduction, options and
 * every value and target (raw bits: NaN, inf, huge and out-of-range values
 * included). Checks, besides the sanitizers' own:
 *   - the status is one a caller can get for such input (OK, INVALID_VALUE,
 *     TARGET_OUT_OF_RANGE); on an error the outputs are untouched;
 *   - for finite fp32 cross-entropy and MSE inputs with default options, the
 *     loss matches an independent recomputation in this file.
 * Build: clang, -fsanitize=fuzzer,address,undefined (CMake option
 * CULOSS_BUILD_FUZZ); run: fuzz_cpu -max_total_time=60 tests/fuzz/corpus
 */
#include <math.h>
#include <stdio.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "culoss.h"

typedef struct {
  const uint8_t *p;
  size_t left;
} reader;

static uint8_t u8(reader *r) {
  if (r->left == 0) return 0;
  r->left--;
  return *r->p++;
}

static float f32(reader *r) {
  uint32_t u = 0;
  for (int i = 0; i < 4; i++) u = u << 8 | u8(r);
  float f;
  if ((u >> 30) == 0) return (float)((int32_t)u % 2000) / 100.0f; /* mostly ordinary values */
  memcpy(&f, &u, 4);
  return f;
}

#define POISON 0x5a

static int untouched(const void *p, size_t bytes) {
  const unsigned char *b = p;
  for (size_t i = 0; i < bytes; i++)
    if (b[i] != POISON) return 0;
  return 1;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  reader r = {data, size};
  static culoss_context *ctx;
  if (!ctx && culoss_create(&ctx, CULOSS_BACKEND_CPU, 0) != CULOSS_OK) abort();
  const int kind = u8(&r) % 14;
  const int64_t n = u8(&r) % 9 - (u8(&r) == 255); /* sometimes -1 */
  const int64_t c = u8(&r) % 17;                  /* 0 is invalid */
  const int64_t ld = c + u8(&r) % 4;
  const culoss_dtype dt = (culoss_dtype)(u8(&r) % 4); /* 3 is invalid */
  const culoss_reduction red = (culoss_reduction)(u8(&r) % 5);
  const int64_t rows = n > 0 ? n : 0, cc = c > 0 ? c : 1;
  const size_t elems = (size_t)(rows * (ld > 0 ? ld : 1)) + 1;
  float *x = malloc(elems * 4), *y = malloc(elems * 4), *w = malloc((size_t)cc * 4 + 4);
  float *loss = malloc(elems * 4), *grad = malloc(elems * 4);
  int64_t *t = malloc((size_t)(rows + 1) * 8);
  for (size_t i = 0; i < elems; i++) x[i] = f32(&r), y[i] = f32(&r);
  for (int64_t j = 0; j < cc; j++) w[j] = fabsf(f32(&r));
  for (int64_t i = 0; i <= rows; i++) t[i] = (int64_t)(int8_t)u8(&r) % (cc + 2);
  memset(loss, POISON, elems * 4);
  memset(grad, POISON, elems * 4);
  const uint8_t opt = u8(&r);
  culoss_cross_entropy_options co;
  culoss_cross_entropy_options_init(&co);
  co.reduction = red;
  co.label_smoothing = opt & 1 ? f32(&r) : 0.0f;
  co.z_loss = opt & 2 ? f32(&r) : 0.0f;
  co.logit_softcap = opt & 4 ? f32(&r) : 0.0f;
  co.class_weight = opt & 8 ? w : NULL;
  co.ignore_index = opt & 16 ? (int64_t)(int8_t)u8(&r) : -100;
  float *g = opt & 32 ? grad : NULL;
  culoss_status st;
  switch (kind) {
  case 0: st = culoss_cross_entropy(ctx, &co, n, c, dt, x, ld, CULOSS_I64, t, loss, g, NULL); break;
  case 1: st = culoss_cross_entropy_soft(ctx, &co, n, c, dt, x, ld, y, loss, g, NULL); break;
  case 2: st = culoss_nll(ctx, &co, n, c, dt, x, ld, CULOSS_I64, t, loss, g, NULL); break;
  case 3: {
    culoss_bce_options o = {red, opt & 8 ? x : NULL, opt & 64 ? w : NULL};
    st = culoss_bce_with_logits(ctx, &o, n, c, dt, x, y, loss, g, NULL);
    break;
  }
  case 4: {
    culoss_bce_options o = {red, NULL, NULL};
    st = culoss_bce(ctx, &o, n, c, dt, x, y, loss, g, NULL);
    break;
  }
  case 5: {
    culoss_hinge_options o = {red, f32(&r), opt >> 7};
    st = culoss_hinge(ctx, &o, n, dt, x, y, loss, g, NULL);
    break;
  }
  case 6: {
    culoss_multi_margin_options o = {red, 1 + (opt >> 6), f32(&r), opt & 8 ? w : NULL};
    st = culoss_multi_margin(ctx, &o, n, c, dt, x, ld, CULOSS_I64, t, loss, g, NULL);
    break;
  }
  case 7:
  case 8:
  case 9:
  case 10: {
    culoss_regression_options o = {red, f32(&r), f32(&r)};
    if (kind == 7)
      st = culoss_mse(ctx, &o, n, dt, x, y, loss, g, NULL);
    else if (kind == 8)
      st = culoss_l1(ctx, &o, n, dt, x, y, loss, g, NULL);
    else if (kind == 9)
      st = culoss_huber(ctx, &o, n, dt, x, y, loss, g, NULL);
    else
      st = culoss_smooth_l1(ctx, &o, n, dt, x, y, loss, g, NULL);
    break;
  }
  case 11: {
    culoss_kl_div_options o = {red, opt >> 7};
    st = culoss_kl_div(ctx, &o, n, c, dt, x, y, loss, g, NULL);
    break;
  }
  default: { /* linear CE: hidden [n, d] from x, weight [c, d] from y, d = ld - c + 1 */
    const int64_t d = ld - c + 1;
    if (rows * d >= (int64_t)elems || cc * d >= (int64_t)elems) {
      st = CULOSS_OK;
      memset(loss, 0, 4);
      break;
    }
    st = culoss_linear_cross_entropy(ctx, &co, n, d, c, dt, x, y, opt & 64 ? w : NULL, CULOSS_I64,
                                     t, loss, g, NULL, NULL, NULL, NULL, 0);
    break;
  }
  }
  if (st != CULOSS_OK && st != CULOSS_ERROR_INVALID_VALUE && st != CULOSS_ERROR_TARGET_OUT_OF_RANGE)
    abort(); /* no other status is possible for host inputs */
  if (st != CULOSS_OK && (!untouched(loss, elems * 4) || !untouched(grad, elems * 4)))
    abort(); /* an error must write nothing */
  if (st != CULOSS_OK && strlen(culoss_last_error()) == 0) abort();
  /* Independent recomputation: plain cross-entropy (kind 0, fp32, no options)
     and MSE (kind 7, fp32), reduction NONE, finite inputs. */
  if (st == CULOSS_OK && dt == CULOSS_F32 && red == CULOSS_REDUCTION_NONE && (opt & 31) == 0) {
    for (int64_t i = 0; i < rows; i++) {
      double want;
      if (kind == 0) {
        const float *row = x + i * ld;
        int finite = 1;
        double m = -INFINITY, s = 0;
        for (int64_t j = 0; j < c; j++) finite &= isfinite(row[j]), m = fmax(m, row[j]);
        if (!finite || t[i] == -100) continue;
        for (int64_t j = 0; j < c; j++) s += exp((double)row[j] - m);
        /* (m - x_t) + log s: m + log s - x_t loses log s when lse - m
           underflows in double (ties at |x| >~ 1e11 have loss log k, not 0) */
        want = (m - row[t[i]]) + log(s);
        if (fabs(want) > 1e37) continue; /* beyond float: the fp32 loss is inf */
      } else if (kind == 7) {
        if (!isfinite(x[i]) || !isfinite(y[i])) continue;
        want = ((double)x[i] - y[i]) * ((double)x[i] - y[i]);
        if (!isfinite(want) || want > 1e30) continue;
      } else {
        break;
      }
      if (fabs(loss[i] - want) > 1e-4 * fmax(1.0, fabs(want))) {
        if (getenv("FUZZ_DEBUG"))
          fprintf(stderr, "kind %d row %lld c %lld t %lld: loss %.9g want %.9g\n", kind,
                  (long long)i, (long long)c, (long long)t[i], (double)loss[i], want);
        abort();
      }
    }
  }
  free(x), free(y), free(w), free(loss), free(grad), free(t);
  return 0;
}
