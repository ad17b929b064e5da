/* test_cpu_info_nce.c: culoss_info_nce on the CPU backend against an
   explicit InfoNCE in double (tests/info_nce_ref.h: the whole n x n logits),
   every reduction, symmetric or not, temperatures, gradient subsets, the
   temperature's gradient, bad arguments; and the memory test: N = 12288,
   D = 16, forward and backward, with the workspace and the peak resident
   memory measured against the N^2 floats of the explicit form. */
#define _POSIX_C_SOURCE 200809L /* setenv */
#include <criterion/criterion.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>

#include "helpers.h"
#include "info_nce_ref.h"

static culoss_context *ctx;
static void setup(void) { cr_assert_eq(culoss_create(&ctx, CULOSS_BACKEND_CPU, 0), CULOSS_OK); }
static void teardown(void) { culoss_destroy(ctx); }
TestSuite(cpu_nce, .init = setup, .fini = teardown, .timeout = 600);

static void against_explicit(int64_t n, int64_t d, double scale, float t, int sym,
                             culoss_reduction red, int grads, uint64_t seed) {
  rng_t r = rng_seeded(seed);
  const int64_t m = n * d, nl = red == CULOSS_REDUCTION_NONE ? n : 1;
  float *q = malloc((size_t)m * 4), *k = malloc((size_t)m * 4), *gl = malloc((size_t)nl * 4);
  for (int64_t e = 0; e < m; e++) q[e] = (float)(scale * rng_normal(&r));
  for (int64_t e = 0; e < m; e++) k[e] = (float)(scale * rng_normal(&r)) + 0.5f * q[e];
  for (int64_t i = 0; i < nl; i++) gl[i] = (float)(0.5 + rng_uniform(&r));
  culoss_info_nce_options o;
  culoss_info_nce_options_init(&o);
  float gt = NAN;
  o.reduction = red, o.symmetric = sym, o.temperature = &t;
  o.grad_temperature = grads & 4 ? &gt : NULL;
  size_t ws = 0;
  cr_assert_eq(culoss_info_nce_workspace_size(ctx, &o, n, d, CULOSS_F32, &ws), CULOSS_OK);
  void *w = malloc(ws + 1);
  float *loss = malloc((size_t)nl * 4), *gq = malloc((size_t)m * 4), *gk = malloc((size_t)m * 4);
  poison(gq, (size_t)m * 4), poison(gk, (size_t)m * 4);
  cr_assert_eq(culoss_info_nce(ctx, &o, n, d, CULOSS_F32, q, k, loss, grads & 1 ? gq : NULL,
                               grads & 2 ? gk : NULL, gl, w, ws),
               CULOSS_OK, "%s", culoss_last_error());
  double *rl = malloc((size_t)nl * sizeof(double)), *rq = malloc((size_t)m * sizeof(double));
  double *rk = malloc((size_t)m * sizeof(double)), rt;
  nce_explicit(n, d, q, k, t, sym, red, gl, rl, rq, rk, &rt);
  /* q / t is rounded to fp32 before the GEMM: a relative 2^-24 per logit */
  double zmax = 0.0;
  for (int64_t e = 0; e < m; e++) zmax = fmax(zmax, fabs(q[e]) * fabs(k[e]));
  const double tol = 2e-6 * (1.0 + (double)d * zmax / t);
  char what[128];
  snprintf(what, sizeof what, "n=%lld d=%lld scale=%g t=%g sym=%d red=%d grads=%d", (long long)n,
           (long long)d, scale, (double)t, sym, red, grads);
  for (int64_t i = 0; i < nl; i++)
    cr_assert(close_enough(loss[i], rl[i], tol, 1e-5), "%s: loss[%lld] %.9g want %.9g", what,
              (long long)i, (double)loss[i], rl[i]);
  double gmax = 0.0;
  for (int64_t e = 0; e < m; e++) gmax = fmax(gmax, fmax(fabs(rq[e]), fabs(rk[e])));
  for (int64_t e = 0; e < m; e++) {
    if (grads & 1)
      cr_assert(close_enough(gq[e], rq[e], tol * gmax + 1e-30, 1e-5),
                "%s: grad_query[%lld] %.9g want %.9g", what, (long long)e, (double)gq[e], rq[e]);
    else
      cr_assert(is_poison_f32(gq[e]));
    if (grads & 2)
      cr_assert(close_enough(gk[e], rk[e], tol * gmax + 1e-30, 1e-5),
                "%s: grad_key[%lld] %.9g want %.9g", what, (long long)e, (double)gk[e], rk[e]);
    else
      cr_assert(is_poison_f32(gk[e]));
  }
  if (grads & 4)
    cr_assert(close_enough(gt, rt, tol * fabs(rt) + 1e-7, 1e-4),
              "%s: grad_temperature %.9g want %.9g", what, (double)gt, rt);
  free(q), free(k), free(gl), free(w), free(loss), free(gq), free(gk), free(rl), free(rq), free(rk);
}

Test(cpu_nce, matches_the_explicit_form) {
  const int64_t shapes[][2] = {{1, 1}, {7, 5}, {64, 33}};
  const float temps[] = {1.0f, 0.07f, 3.0f};
  uint64_t seed = 1;
  for (int s = 0; s < 3; s++)
    for (int sym = 0; sym < 2; sym++)
      for (int red = 0; red < 3; red++)
        for (int ti = 0; ti < 3; ti++)
          against_explicit(shapes[s][0], shapes[s][1], ti == 1 ? 0.3 : 1.0, temps[ti], sym,
                           (culoss_reduction)red, 7, seed++);
}

Test(cpu_nce, gradient_subsets_and_defaults) {
  uint64_t seed = 100;
  for (int grads = 0; grads < 8; grads++)
    against_explicit(9, 4, 1.0, 0.5f, grads % 2, CULOSS_REDUCTION_MEAN, grads, seed++);
  /* NULL options: MEAN, one direction, t = 1 */
  rng_t r = rng_seeded(5);
  float q[12], k[12], a, b;
  for (int e = 0; e < 12; e++) q[e] = (float)rng_normal(&r), k[e] = (float)rng_normal(&r);
  size_t ws;
  cr_assert_eq(culoss_info_nce_workspace_size(ctx, NULL, 4, 3, CULOSS_F32, &ws), CULOSS_OK);
  void *w = malloc(ws);
  cr_assert_eq(culoss_info_nce(ctx, NULL, 4, 3, CULOSS_F32, q, k, &a, NULL, NULL, NULL, w, ws),
               CULOSS_OK);
  double want;
  nce_explicit(4, 3, q, k, 1.0, 0, CULOSS_REDUCTION_MEAN, NULL, &want, NULL, NULL, NULL);
  cr_assert(close_enough(a, want, 1e-6, 1e-6), "%g vs %g", (double)a, want);
  /* symmetric is the mean of the two directions */
  culoss_info_nce_options o;
  culoss_info_nce_options_init(&o);
  o.symmetric = 1;
  size_t ws2;
  cr_assert_eq(culoss_info_nce_workspace_size(ctx, &o, 4, 3, CULOSS_F32, &ws2), CULOSS_OK);
  cr_assert(ws2 >= ws);
  void *w2 = malloc(ws2);
  cr_assert_eq(culoss_info_nce(ctx, &o, 4, 3, CULOSS_F32, q, k, &b, NULL, NULL, NULL, w2, ws2),
               CULOSS_OK);
  float c;
  cr_assert_eq(culoss_info_nce(ctx, NULL, 4, 3, CULOSS_F32, k, q, &c, NULL, NULL, NULL, w, ws),
               CULOSS_OK);
  cr_assert(close_enough(b, 0.5 * (a + c), 1e-6, 1e-6), "symmetric %g vs (%g + %g) / 2", (double)b,
            (double)a, (double)c);
  free(w), free(w2);
}

Test(cpu_nce, bad_arguments_write_nothing) {
  float q[8] = {1, 2, 3, 4, 5, 6, 7, 8}, k[8] = {0}, l[2], g[8], t0 = 0.0f, tn = NAN;
  culoss_info_nce_options o;
  culoss_info_nce_options_init(&o);
  size_t ws;
  cr_assert_eq(culoss_info_nce_workspace_size(ctx, &o, 2, 4, CULOSS_F32, &ws), CULOSS_OK);
  void *w = malloc(ws);
  struct {
    const char *want;
    int field;
  } cases[] = {{"temperature = 0", 1},   {"temperature = nan", 2}, {"workspace_bytes", 3},
               {"workspace is NULL", 4}, {"aliases", 5},           {"one buffer", 6},
               {"symmetric = 2", 7},     {"reduction", 8},         {"key is NULL", 9},
               {"loss is NULL", 10}};
  for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
    culoss_info_nce_options b = o;
    void *wp = w, *gq = g, *gk = NULL;
    const void *kp = k;
    float *lp = l;
    size_t wb = ws;
    switch (cases[c].field) {
    case 1: b.temperature = &t0; break;
    case 2: b.temperature = &tn; break;
    case 3: wb = ws - 1; break;
    case 4: wp = NULL; break;
    case 5: gq = q; break;
    case 6: gk = g; break;
    case 7: b.symmetric = 2; break;
    case 8: b.reduction = CULOSS_REDUCTION_BATCHMEAN; break;
    case 9: kp = NULL; break;
    case 10: lp = NULL; break;
    }
    poison(l, sizeof l), poison(g, sizeof g);
    cr_assert_eq(culoss_info_nce(ctx, &b, 2, 4, CULOSS_F32, q, kp, lp, gq, gk, NULL, wp, wb),
                 CULOSS_ERROR_INVALID_VALUE, "case %zu", c);
    cr_assert(strstr(culoss_last_error(), cases[c].want) != NULL, "case %zu: '%s' lacks '%s'", c,
              culoss_last_error(), cases[c].want);
    cr_assert(is_poison_f32(l[0]) && is_poison_f32(g[0]), "case %zu wrote", c);
  }
  /* no pairs: NONE writes nothing, SUM 0, MEAN NaN */
  float s = 1.0f;
  o.reduction = CULOSS_REDUCTION_SUM;
  cr_assert_eq(
      culoss_info_nce(ctx, &o, 0, 4, CULOSS_F32, NULL, NULL, &s, NULL, NULL, NULL, NULL, 0),
      CULOSS_OK, "%s", culoss_last_error());
  cr_assert_eq(s, 0.0f);
  o.reduction = CULOSS_REDUCTION_MEAN;
  cr_assert_eq(
      culoss_info_nce(ctx, &o, 0, 4, CULOSS_F32, NULL, NULL, &s, NULL, NULL, NULL, NULL, 0),
      CULOSS_OK);
  cr_assert(isnan(s));
  free(w);
}

/* The memory test of issue 20: N = 12288 pairs of D = 16 on the CPU
   backend, loss and both gradients. The explicit form holds N^2 fp32
   logits (604 MB) and as much again for their gradient; culoss's workspace
   is O(N D) plus linear CE's logits block, here 8 MiB
   (CULOSS_LINEAR_CE_BLOCK_BYTES, read at culoss_create). Measured: the
   workspace size, and the process's peak resident memory (Criterion runs
   each test in its own process). */
Test(cpu_nce, memory_is_a_small_fraction_of_the_explicit_logits) {
  const int64_t n = 12288, d = 16;
  const double explicit_bytes = (double)n * (double)n * 4.0;
  setenv("CULOSS_LINEAR_CE_BLOCK_BYTES", "8388608", 1);
  culoss_context *c8;
  cr_assert_eq(culoss_create(&c8, CULOSS_BACKEND_CPU, 0), CULOSS_OK);
  rng_t r = rng_seeded(12288);
  float *q = malloc((size_t)(n * d) * 4), *k = malloc((size_t)(n * d) * 4);
  float *gq = malloc((size_t)(n * d) * 4), *gk = malloc((size_t)(n * d) * 4), loss, gt;
  for (int64_t e = 0; e < n * d; e++) q[e] = (float)(0.25 * rng_normal(&r));
  for (int64_t e = 0; e < n * d; e++) k[e] = q[e] + (float)(0.1 * rng_normal(&r));
  float t = 0.1f;
  culoss_info_nce_options o;
  culoss_info_nce_options_init(&o);
  o.temperature = &t, o.grad_temperature = &gt;
  size_t ws;
  cr_assert_eq(culoss_info_nce_workspace_size(c8, &o, n, d, CULOSS_F32, &ws), CULOSS_OK);
  void *w = malloc(ws);
  /* the call's own peak: the process's peak after it less the peak before
     (the test's inputs and the loaded libraries: cudart and cuBLAS in a CUDA
     build are ~150 MB) */
  struct rusage ru;
  getrusage(RUSAGE_SELF, &ru);
  const double before = (double)ru.ru_maxrss * 1024.0;
  cr_assert_eq(culoss_info_nce(c8, &o, n, d, CULOSS_F32, q, k, &loss, gq, gk, NULL, w, ws),
               CULOSS_OK, "%s", culoss_last_error());
  getrusage(RUSAGE_SELF, &ru);
  const double peak = (double)ru.ru_maxrss * 1024.0 - before;
  cr_log_info("InfoNCE N=%lld D=%lld: workspace %.1f MB, peak RSS added %.1f MB; explicit logits "
              "%.1f MB",
              (long long)n, (long long)d, ws / 1e6, peak / 1e6, explicit_bytes / 1e6);
  fprintf(stderr,
          "InfoNCE N=%lld D=%lld: workspace %.1f MB (%.1f%% of the explicit N^2 logits), "
          "peak RSS added by the call %.1f MB (%.1f%%)\n",
          (long long)n, (long long)d, ws / 1e6, 100.0 * ws / explicit_bytes, peak / 1e6,
          100.0 * peak / explicit_bytes);
  cr_assert(ws < explicit_bytes / 16, "workspace %zu bytes", ws);
  cr_assert(peak < explicit_bytes / 4, "peak RSS %.0f bytes", peak);
  /* near-aligned pairs at t = 0.1: the diagonal dominates, the loss is small and finite */
  cr_assert(isfinite(loss) && loss >= 0.0f && loss < logf((float)n), "loss %g", (double)loss);
  cr_assert(isfinite(gt), "grad_temperature %g", (double)gt);
  culoss_destroy(c8);
  free(q), free(k), free(gq), free(gk), free(w);
}

/* 16-bit on the CPU backend against the explicit form, on inputs whose
   logits are exact in every dtype (q, k in {0, +-1/2, +-1}, t = 1/2: q / t
   exact, z a multiple of 1/2 below 32): the loss and the temperature's
   gradient at fp32 accuracy, the gradients at the output dtype's rounding
   (the CPU reference rounds the intermediate gradients: grad_hidden to the
   dtype, then / t, then the second direction's sum). */
Test(cpu_nce, bf16_and_fp16_match_the_explicit_form) {
  for (int dt = 1; dt <= 2; dt++)
    for (int sym = 0; sym < 2; sym++) {
      const int64_t n = 23, d = 12;
      rng_t r = rng_seeded(40 + (uint64_t)(2 * dt + sym));
      float q[23 * 12], k[23 * 12], t = 0.5f, gt;
      for (int e = 0; e < n * d; e++)
        q[e] = 0.5f * (float)rng_int(&r, -2, 3), k[e] = 0.5f * (float)rng_int(&r, -2, 3);
      uint16_t qh[23 * 12], kh[23 * 12], gq[23 * 12], gk[23 * 12];
      pack_dtype(qh, q, n * d, (culoss_dtype)dt), pack_dtype(kh, k, n * d, (culoss_dtype)dt);
      culoss_info_nce_options o;
      culoss_info_nce_options_init(&o);
      o.symmetric = sym, o.temperature = &t, o.grad_temperature = &gt;
      size_t ws;
      cr_assert_eq(culoss_info_nce_workspace_size(ctx, &o, n, d, (culoss_dtype)dt, &ws), CULOSS_OK);
      void *w = malloc(ws);
      float loss;
      cr_assert_eq(
          culoss_info_nce(ctx, &o, n, d, (culoss_dtype)dt, qh, kh, &loss, gq, gk, NULL, w, ws),
          CULOSS_OK, "%s", culoss_last_error());
      double rl, rq[23 * 12], rk[23 * 12], rt;
      nce_explicit(n, d, q, k, t, sym, CULOSS_REDUCTION_MEAN, NULL, &rl, rq, rk, &rt);
      cr_assert(close_enough(loss, rl, 1e-6, 1e-6), "dt %d sym %d: loss %.9g want %.9g", dt, sym,
                (double)loss, rl);
      cr_assert(close_enough(gt, rt, 1e-6, 1e-5), "dt %d sym %d: grad_t %.9g want %.9g", dt, sym,
                (double)gt, rt);
      float a[23 * 12], b[23 * 12];
      double gmax = 0.0;
      for (int e = 0; e < n * d; e++) gmax = fmax(gmax, fmax(fabs(rq[e]), fabs(rk[e])));
      /* 3 roundings to the dtype of values up to gmax */
      const double u = dt == CULOSS_BF16 ? 1.0 / 256 : 1.0 / 2048;
      unpack_dtype(a, gq, n * d, (culoss_dtype)dt);
      unpack_dtype(b, gk, n * d, (culoss_dtype)dt);
      for (int e = 0; e < n * d; e++) {
        cr_assert(fabs(a[e] - rq[e]) <= 2.0 * u * (fabs(rq[e]) + 0.5 * gmax),
                  "dt %d sym %d: grad_query[%d] %.6g want %.6g", dt, sym, e, (double)a[e], rq[e]);
        cr_assert(fabs(b[e] - rk[e]) <= 2.0 * u * (fabs(rk[e]) + 0.5 * gmax),
                  "dt %d sym %d: grad_key[%d] %.6g want %.6g", dt, sym, e, (double)b[e], rk[e]);
      }
      free(w);
    }
}
