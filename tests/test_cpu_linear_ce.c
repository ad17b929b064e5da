/* test_cpu_linear_ce.c: the CPU reference of fused linear + cross-entropy
   against an explicit logits-then-cross-entropy computation, finite
   differences, the workspace rule, and bad arguments. */
#include <criterion/criterion.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "helpers.h"

static culoss_context *ctx;
static void setup(void) { cr_assert_eq(culoss_create(&ctx, CULOSS_BACKEND_CPU, 0), CULOSS_OK); }
static void teardown(void) { culoss_destroy(ctx); }
TestSuite(cpu_lce, .init = setup, .fini = teardown);

enum { N = 7, D = 5, V = 11 };

typedef struct {
  float h[N * D], w[V * D], b[V];
  int64_t t[N];
  float gl[N];
} lce_data;

static void make(lce_data *s, uint64_t seed) {
  rng_t r = rng_seeded(seed);
  for (int i = 0; i < N * D; i++) s->h[i] = (float)rng_normal(&r);
  for (int i = 0; i < V * D; i++) s->w[i] = (float)(0.7 * rng_normal(&r));
  for (int i = 0; i < V; i++) s->b[i] = (float)(0.3 * rng_normal(&r));
  for (int i = 0; i < N; i++)
    s->t[i] = rng_int(&r, 0, V), s->gl[i] = (float)(0.5 + rng_uniform(&r));
  s->t[2] = -100;
}

/* The unfused composition: logits (double, rounded to float), then
   culoss_cross_entropy, then the gradients' products in double. */
static void explicit_ref(const lce_data *s, const culoss_cross_entropy_options *o, int bias,
                         const float *gl, float *loss, double *gh, double *gw, double *gb) {
  float logits[N * V];
  for (int i = 0; i < N; i++)
    for (int j = 0; j < V; j++) {
      double z = bias ? s->b[j] : 0.0;
      for (int k = 0; k < D; k++) z += (double)s->h[i * D + k] * s->w[j * D + k];
      logits[i * V + j] = (float)z;
    }
  cr_assert_eq(
      culoss_cross_entropy(ctx, o, N, V, CULOSS_F32, logits, V, CULOSS_I64, s->t, loss, logits, gl),
      CULOSS_OK, "%s", culoss_last_error());
  memset(gh, 0, sizeof(double) * N * D), memset(gw, 0, sizeof(double) * V * D);
  memset(gb, 0, sizeof(double) * V);
  for (int i = 0; i < N; i++)
    for (int j = 0; j < V; j++) {
      const double g = logits[i * V + j];
      gb[j] += g;
      for (int k = 0; k < D; k++)
        gh[i * D + k] += g * s->w[j * D + k], gw[j * D + k] += g * s->h[i * D + k];
    }
}

Test(cpu_lce, matches_explicit_logits_then_cross_entropy) {
  lce_data s;
  make(&s, 1);
  const float cw[V] = {1, 2, 0.5f, 1, 1, 3, 1, 1, 0.25f, 1, 1};
  for (int variant = 0; variant < 6; variant++)
    for (int red = 0; red < 3; red++) {
      culoss_cross_entropy_options o;
      culoss_cross_entropy_options_init(&o);
      o.reduction = (culoss_reduction)red;
      if (variant >= 1) o.class_weight = cw;
      if (variant >= 2) o.label_smoothing = 0.1f;
      if (variant >= 3) o.z_loss = 1e-2f;
      if (variant >= 4) o.logit_softcap = 4.0f;
      const float norm = 9.0f;
      if (variant == 5) o.normalizer = &norm;
      const int bias = variant % 2;
      const float *gl = red == CULOSS_REDUCTION_NONE ? s.gl : s.gl + 1;
      float loss[N], ref_loss[N], gh[N * D], gw[V * D], gb[V];
      double rgh[N * D], rgw[V * D], rgb[V];
      explicit_ref(&s, &o, bias, gl, ref_loss, rgh, rgw, rgb);
      cr_assert_eq(culoss_linear_cross_entropy(ctx, &o, N, D, V, CULOSS_F32, s.h, s.w,
                                               bias ? s.b : NULL, CULOSS_I64, s.t, loss, gh, gw,
                                               bias ? gb : NULL, gl, NULL, 0),
                   CULOSS_OK, "%s", culoss_last_error());
      const int nl = red == CULOSS_REDUCTION_NONE ? N : 1;
      for (int i = 0; i < nl; i++)
        cr_assert(close_enough(loss[i], ref_loss[i], 1e-6, 1e-5), "v%d r%d loss[%d] %g vs %g",
                  variant, red, i, (double)loss[i], (double)ref_loss[i]);
      for (int i = 0; i < N * D; i++)
        cr_assert(close_enough(gh[i], rgh[i], 1e-6, 1e-4), "v%d r%d grad_hidden[%d]", variant, red,
                  i);
      for (int i = 0; i < V * D; i++)
        cr_assert(close_enough(gw[i], rgw[i], 1e-6, 1e-4), "v%d r%d grad_weight[%d]", variant, red,
                  i);
      if (bias)
        for (int j = 0; j < V; j++)
          cr_assert(close_enough(gb[j], rgb[j], 1e-6, 1e-4), "v%d r%d grad_bias[%d]", variant, red,
                    j);
    }
}

/* d(loss)/d(every parameter) by central differences. */
Test(cpu_lce, gradients_match_finite_differences) {
  lce_data s;
  make(&s, 2);
  culoss_cross_entropy_options o;
  culoss_cross_entropy_options_init(&o);
  o.label_smoothing = 0.05f;
  o.z_loss = 1e-3f;
  float loss, gh[N * D], gw[V * D], gb[V];
  cr_assert_eq(culoss_linear_cross_entropy(ctx, &o, N, D, V, CULOSS_F32, s.h, s.w, s.b, CULOSS_I64,
                                           s.t, &loss, gh, gw, gb, NULL, NULL, 0),
               CULOSS_OK);
  float *params[3] = {s.h, s.w, s.b}, *grads[3] = {gh, gw, gb};
  const int counts[3] = {N * D, V * D, V};
  for (int q = 0; q < 3; q++)
    for (int k = 0; k < counts[q]; k++) {
      const float keep = params[q][k];
      float up, dn;
      params[q][k] = keep + 1e-2f;
      culoss_linear_cross_entropy(ctx, &o, N, D, V, CULOSS_F32, s.h, s.w, s.b, CULOSS_I64, s.t, &up,
                                  NULL, NULL, NULL, NULL, NULL, 0);
      params[q][k] = keep - 1e-2f;
      culoss_linear_cross_entropy(ctx, &o, N, D, V, CULOSS_F32, s.h, s.w, s.b, CULOSS_I64, s.t, &dn,
                                  NULL, NULL, NULL, NULL, NULL, 0);
      params[q][k] = keep;
      const double fd = ((double)up - (double)dn) / 2e-2;
      cr_assert(close_enough(grads[q][k], fd, 2e-4, 3e-3), "param %d[%d]: %g vs fd %g", q, k,
                (double)grads[q][k], fd);
    }
}

Test(cpu_lce, workspace_rule_is_bounded_independently_of_n) {
  const int64_t d = 4096, v = 128256;
  size_t w1, w2, w3;
  cr_assert_eq(culoss_linear_cross_entropy_workspace_size(ctx, 8192, d, v, CULOSS_BF16, &w1),
               CULOSS_OK);
  cr_assert_eq(culoss_linear_cross_entropy_workspace_size(ctx, 1 << 20, d, v, CULOSS_BF16, &w2),
               CULOSS_OK);
  cr_assert_eq(culoss_linear_cross_entropy_workspace_size(ctx, 1 << 22, d, v, CULOSS_BF16, &w3),
               CULOSS_OK);
  /* once n exceeds one block, only the 36 bytes per row grow (plus rounding) */
  cr_assert_leq(w2 - w1, (size_t)36 * ((1 << 20) - 8192) + 1024);
  cr_assert_leq(w3 - w2, (size_t)36 * ((1 << 22) - (1 << 20)) + 1024);
  /* block (2^28) + bias + one grad_weight slice (<= block) + 36 n */
  const size_t bound = ((size_t)1 << 29) + (size_t)v * 4 + 4096;
  cr_assert_leq(w3 - (size_t)36 * (1 << 22), bound, "%zu", w3);
  /* never O(n * v): far below the logits of n = 2^22 rows */
  cr_assert_lt(w3, (size_t)(1 << 22) * (size_t)v * 2 / 100);
  /* fp32: no grad_weight slice */
  size_t wf;
  culoss_linear_cross_entropy_workspace_size(ctx, 8192, d, v, CULOSS_F32, &wf);
  cr_assert_leq(wf, ((size_t)1 << 28) + (size_t)v * 4 + 36 * 8192 + 1024);
}

Test(cpu_lce, half_precision_matches_fp32_on_rounded_inputs) {
  lce_data s;
  make(&s, 3);
  for (int dt = 1; dt <= 2; dt++) {
    uint16_t h16[N * D], w16[V * D], b16[V], gh16[N * D], gw16[V * D], gb16[V];
    round_through(s.h, N * D, (culoss_dtype)dt);
    round_through(s.w, V * D, (culoss_dtype)dt);
    round_through(s.b, V, (culoss_dtype)dt);
    pack_dtype(h16, s.h, N * D, (culoss_dtype)dt);
    pack_dtype(w16, s.w, V * D, (culoss_dtype)dt);
    pack_dtype(b16, s.b, V, (culoss_dtype)dt);
    float l32, l16, gh[N * D], gw[V * D], gb[V], u[V * D];
    culoss_linear_cross_entropy(ctx, NULL, N, D, V, CULOSS_F32, s.h, s.w, s.b, CULOSS_I64, s.t,
                                &l32, gh, gw, gb, NULL, NULL, 0);
    cr_assert_eq(culoss_linear_cross_entropy(ctx, NULL, N, D, V, (culoss_dtype)dt, h16, w16, b16,
                                             CULOSS_I64, s.t, &l16, gh16, gw16, gb16, NULL, NULL,
                                             0),
                 CULOSS_OK);
    cr_assert_eq(l16, l32, "the loss is computed in double from the same values");
    const double rt = dt == CULOSS_F16 ? 1.0 / 1024 : 1.0 / 128;
    unpack_dtype(u, gw16, V * D, (culoss_dtype)dt);
    for (int i = 0; i < V * D; i++) cr_assert(close_enough(u[i], gw[i], 1e-6, rt));
    unpack_dtype(u, gh16, N * D, (culoss_dtype)dt);
    for (int i = 0; i < N * D; i++) cr_assert(close_enough(u[i], gh[i], 1e-6, rt));
  }
}

Test(cpu_lce, bad_arguments_and_targets) {
  lce_data s;
  make(&s, 4);
  float loss = -9.0f, gh[N * D];
  gh[0] = -9.0f;
  size_t ws;
  cr_assert_eq(culoss_linear_cross_entropy(NULL, NULL, N, D, V, CULOSS_F32, s.h, s.w, NULL,
                                           CULOSS_I64, s.t, &loss, gh, NULL, NULL, NULL, NULL, 0),
               CULOSS_ERROR_INVALID_VALUE);
  cr_assert_eq(culoss_linear_cross_entropy(ctx, NULL, N, 0, V, CULOSS_F32, s.h, s.w, NULL,
                                           CULOSS_I64, s.t, &loss, gh, NULL, NULL, NULL, NULL, 0),
               CULOSS_ERROR_INVALID_VALUE);
  cr_assert(strstr(culoss_last_error(), "d = 0") != NULL);
  cr_assert_eq(culoss_linear_cross_entropy(ctx, NULL, N, D, V, CULOSS_F32, s.h, NULL, NULL,
                                           CULOSS_I64, s.t, &loss, gh, NULL, NULL, NULL, NULL, 0),
               CULOSS_ERROR_INVALID_VALUE);
  cr_assert(strstr(culoss_last_error(), "weight is NULL") != NULL);
  cr_assert_eq(culoss_linear_cross_entropy(ctx, NULL, N, D, V, CULOSS_F32, s.h, s.w, NULL,
                                           CULOSS_I64, s.t, &loss, gh, NULL, gh, NULL, NULL, 0),
               CULOSS_ERROR_INVALID_VALUE);
  cr_assert(strstr(culoss_last_error(), "grad_bias") != NULL);
  cr_assert_eq(culoss_linear_cross_entropy(ctx, NULL, N, D, V, CULOSS_F32, s.h, s.w, NULL,
                                           CULOSS_I64, s.t, &loss, s.h, NULL, NULL, NULL, NULL, 0),
               CULOSS_ERROR_INVALID_VALUE);
  cr_assert(strstr(culoss_last_error(), "alias") != NULL);
  culoss_cross_entropy_options o;
  culoss_cross_entropy_options_init(&o);
  o.label_smoothing = 2.0f;
  cr_assert_eq(culoss_linear_cross_entropy(ctx, &o, N, D, V, CULOSS_F32, s.h, s.w, NULL, CULOSS_I64,
                                           s.t, &loss, gh, NULL, NULL, NULL, NULL, 0),
               CULOSS_ERROR_INVALID_VALUE);
  cr_assert_eq(culoss_linear_cross_entropy_workspace_size(ctx, N, D, V, CULOSS_F32, NULL),
               CULOSS_ERROR_INVALID_VALUE);
  cr_assert_eq(culoss_linear_cross_entropy_workspace_size(ctx, -1, D, V, CULOSS_F32, &ws),
               CULOSS_ERROR_INVALID_VALUE);
  s.t[4] = V;
  cr_assert_eq(culoss_linear_cross_entropy(ctx, NULL, N, D, V, CULOSS_F32, s.h, s.w, NULL,
                                           CULOSS_I64, s.t, &loss, gh, NULL, NULL, NULL, NULL, 0),
               CULOSS_ERROR_TARGET_OUT_OF_RANGE);
  cr_assert(loss == -9.0f && gh[0] == -9.0f, "nothing written on an error");
  /* n == 0: mean NaN, grad_weight zero */
  float gw[V * D];
  for (int i = 0; i < V * D; i++) gw[i] = 5.0f;
  cr_assert_eq(culoss_linear_cross_entropy(ctx, NULL, 0, D, V, CULOSS_F32, NULL, s.w, NULL,
                                           CULOSS_I64, NULL, &loss, NULL, gw, NULL, NULL, NULL, 0),
               CULOSS_OK);
  cr_assert(isnan(loss));
  for (int i = 0; i < V * D; i++) cr_assert_eq(gw[i], 0.0f);
}

/* ---- culoss_linear_cross_entropy_ex (issue 14) ---- */

/* Each row's lse and entropy of the (soft-capped) logits, from the logits
   written out here, in double: lse = m + log sum e^(x - m), H = lse -
   sum p x. Ignored rows: 0. */
static void direct_stats(const lce_data *s, double cap, int bias, double *lse, double *ent) {
  for (int i = 0; i < N; i++) {
    double x[V], m = -INFINITY, z = 0.0, px = 0.0;
    for (int j = 0; j < V; j++) {
      double l = bias ? s->b[j] : 0.0;
      for (int k = 0; k < D; k++) l += (double)s->h[i * D + k] * s->w[j * D + k];
      x[j] = cap > 0 ? cap * tanh(l / cap) : l;
      m = fmax(m, x[j]);
    }
    for (int j = 0; j < V; j++) z += exp(x[j] - m);
    for (int j = 0; j < V; j++) px += exp(x[j] - m) / z * x[j];
    lse[i] = s->t[i] == -100 ? 0.0 : m + log(z);
    ent[i] = s->t[i] == -100 ? 0.0 : m + log(z) - px;
  }
}

Test(cpu_lce, ex_lse_and_entropy_match_a_direct_computation) {
  lce_data s;
  make(&s, 21);
  for (int capped = 0; capped < 2; capped++) {
    culoss_cross_entropy_options o;
    culoss_cross_entropy_options_init(&o);
    o.logit_softcap = capped ? 3.0f : 0.0f;
    o.label_smoothing = 0.1f;
    culoss_linear_ce_options lo;
    culoss_linear_ce_options_init(&lo);
    float lse[N], ent[N], loss, ref_loss;
    double dl[N], de[N];
    lo.lse = lse, lo.entropy = ent;
    cr_assert_eq(culoss_linear_cross_entropy_ex(ctx, &o, &lo, N, D, V, CULOSS_F32, s.h, s.w, s.b,
                                                CULOSS_I64, s.t, &loss, NULL, NULL, NULL, NULL,
                                                NULL, 0),
                 CULOSS_OK, "%s", culoss_last_error());
    direct_stats(&s, o.logit_softcap, 1, dl, de);
    for (int i = 0; i < N; i++) {
      cr_assert(close_enough(lse[i], dl[i], 1e-6, 1e-6), "lse[%d] %g vs %g", i, (double)lse[i],
                dl[i]);
      cr_assert(close_enough(ent[i], de[i], 1e-6, 1e-5), "entropy[%d] %g vs %g", i, (double)ent[i],
                de[i]);
      if (s.t[i] != -100) cr_assert_gt(ent[i], 0.0f);
    }
    /* the loss is the plain call's */
    cr_assert_eq(culoss_linear_cross_entropy(ctx, &o, N, D, V, CULOSS_F32, s.h, s.w, s.b,
                                             CULOSS_I64, s.t, &ref_loss, NULL, NULL, NULL, NULL,
                                             NULL, 0),
                 CULOSS_OK);
    cr_assert_eq(loss, ref_loss);
  }
}

/* An fp32 grad_weight and grad_bias for fp16/bf16 inputs: exactly the fp32
   call's on the rounded inputs (the reference sums both in double), and
   grad_hidden stays in the input dtype. */
Test(cpu_lce, ex_fp32_grad_weight_for_16_bit_inputs) {
  for (int dt = 1; dt <= 2; dt++) {
    lce_data s;
    make(&s, 22 + dt);
    round_through(s.h, N * D, (culoss_dtype)dt);
    round_through(s.w, V * D, (culoss_dtype)dt);
    round_through(s.b, V, (culoss_dtype)dt);
    uint16_t h16[N * D], w16[V * D], b16[V], gh16[N * D];
    pack_dtype(h16, s.h, N * D, (culoss_dtype)dt);
    pack_dtype(w16, s.w, V * D, (culoss_dtype)dt);
    pack_dtype(b16, s.b, V, (culoss_dtype)dt);
    float l32, l16, gh[N * D], gw[V * D], gb[V], gw32[V * D], gb32[V];
    cr_assert_eq(culoss_linear_cross_entropy(ctx, NULL, N, D, V, CULOSS_F32, s.h, s.w, s.b,
                                             CULOSS_I64, s.t, &l32, gh, gw, gb, NULL, NULL, 0),
                 CULOSS_OK);
    culoss_linear_ce_options lo;
    culoss_linear_ce_options_init(&lo);
    lo.grad_weight_dtype = CULOSS_F32;
    cr_assert_eq(culoss_linear_cross_entropy_ex(ctx, NULL, &lo, N, D, V, (culoss_dtype)dt, h16, w16,
                                                b16, CULOSS_I64, s.t, &l16, gh16, gw32, gb32, NULL,
                                                NULL, 0),
                 CULOSS_OK, "%s", culoss_last_error());
    cr_assert_eq(l16, l32);
    for (int i = 0; i < V * D; i++) cr_assert_eq(gw32[i], gw[i], "grad_weight[%d]", i);
    for (int j = 0; j < V; j++) cr_assert_eq(gb32[j], gb[j], "grad_bias[%d]", j);
    float u[N * D];
    unpack_dtype(u, gh16, N * D, (culoss_dtype)dt);
    for (int i = 0; i < N * D; i++)
      cr_assert(close_enough(u[i], gh[i], 1e-6, dt == CULOSS_F16 ? 1.0 / 1024 : 1.0 / 128));
  }
}

/* accumulate = 1 adds into buffers holding random values, for both
   grad_weight dtypes and every input dtype: old + the fresh gradient,
   rounded once to the buffer's dtype. */
Test(cpu_lce, ex_accumulate_adds_into_random_buffers) {
  for (int dt = 0; dt < 3; dt++)
    for (int f32 = 0; f32 < 2; f32++) {
      lce_data s;
      make(&s, 30 + dt * 2 + f32);
      rng_t r = rng_seeded(99 + dt);
      const culoss_dtype gdt = f32 ? CULOSS_F32 : (culoss_dtype)dt;
      unsigned char hh[N * D * 4], wh[V * D * 4], bh[V * 4];
      pack_dtype(hh, s.h, N * D, (culoss_dtype)dt), pack_dtype(wh, s.w, V * D, (culoss_dtype)dt);
      pack_dtype(bh, s.b, V, (culoss_dtype)dt);
      float old_w[V * D], old_b[V], fresh_w[V * D], fresh_b[V], got_w[V * D], got_b[V], loss;
      for (int i = 0; i < V * D; i++) old_w[i] = (float)(0.05 * rng_normal(&r));
      for (int j = 0; j < V; j++) old_b[j] = (float)(0.05 * rng_normal(&r));
      round_through(old_w, V * D, gdt), round_through(old_b, V, gdt);
      unsigned char gw[V * D * 4], gb[V * 4];
      culoss_linear_ce_options lo;
      culoss_linear_ce_options_init(&lo);
      lo.grad_weight_dtype = gdt;
      cr_assert_eq(culoss_linear_cross_entropy_ex(ctx, NULL, &lo, N, D, V, (culoss_dtype)dt, hh, wh,
                                                  bh, CULOSS_I64, s.t, &loss, NULL, gw, gb, NULL,
                                                  NULL, 0),
                   CULOSS_OK, "%s", culoss_last_error());
      unpack_dtype(fresh_w, gw, V * D, gdt), unpack_dtype(fresh_b, gb, V, gdt);
      pack_dtype(gw, old_w, V * D, gdt), pack_dtype(gb, old_b, V, gdt);
      lo.accumulate = 1;
      cr_assert_eq(culoss_linear_cross_entropy_ex(ctx, NULL, &lo, N, D, V, (culoss_dtype)dt, hh, wh,
                                                  bh, CULOSS_I64, s.t, &loss, NULL, gw, gb, NULL,
                                                  NULL, 0),
                   CULOSS_OK);
      unpack_dtype(got_w, gw, V * D, gdt), unpack_dtype(got_b, gb, V, gdt);
      /* one rounding of the sum, plus the fresh gradient's own rounding */
      const double ulp = gdt == CULOSS_F32 ? 1.2e-7 : (gdt == CULOSS_F16 ? 9.8e-4 : 7.9e-3);
      for (int i = 0; i < V * D; i++) {
        const double want = (double)old_w[i] + fresh_w[i];
        cr_assert(fabs(got_w[i] - want) <= 1.01 * ulp * (fabs(want) + fabs(fresh_w[i])) + 1e-30,
                  "dt %d gw %d [%d]: %g vs %g", dt, (int)gdt, i, (double)got_w[i], want);
      }
      for (int j = 0; j < V; j++) {
        const double want = (double)old_b[j] + fresh_b[j];
        cr_assert(fabs(got_b[j] - want) <= 1.01 * ulp * (fabs(want) + fabs(fresh_b[j])) + 1e-30,
                  "dt %d gb [%d]: %g vs %g", dt, j, (double)got_b[j], want);
      }
    }
}

Test(cpu_lce, ex_bad_options_and_workspace) {
  lce_data s;
  make(&s, 40);
  float loss = -9.0f;
  culoss_linear_ce_options lo;
  culoss_linear_ce_options_init(&lo);
  cr_assert_eq(lo.grad_weight_dtype, CULOSS_DTYPE_INPUT);
  cr_assert_eq(lo.accumulate, 0);
  cr_assert_null(lo.lse);
  cr_assert_null(lo.entropy);
  lo.grad_weight_dtype = CULOSS_F16; /* neither the input's (fp32) nor fp32 */
  cr_assert_eq(culoss_linear_cross_entropy_ex(ctx, NULL, &lo, N, D, V, CULOSS_F32, s.h, s.w, NULL,
                                              CULOSS_I64, s.t, &loss, NULL, NULL, NULL, NULL, NULL,
                                              0),
               CULOSS_ERROR_INVALID_VALUE);
  cr_assert(strstr(culoss_last_error(), "grad_weight_dtype") != NULL, "%s", culoss_last_error());
  cr_assert_eq(loss, -9.0f, "nothing written");
  culoss_linear_ce_options_init(&lo);
  lo.accumulate = 2;
  cr_assert_eq(culoss_linear_cross_entropy_ex(ctx, NULL, &lo, N, D, V, CULOSS_F32, s.h, s.w, NULL,
                                              CULOSS_I64, s.t, &loss, NULL, NULL, NULL, NULL, NULL,
                                              0),
               CULOSS_ERROR_INVALID_VALUE);
  cr_assert(strstr(culoss_last_error(), "accumulate") != NULL);
  /* NULL options are the defaults: the same workspace as the plain query */
  size_t plain, ex, ex32;
  cr_assert_eq(
      culoss_linear_cross_entropy_workspace_size(ctx, 8192, 4096, 128256, CULOSS_BF16, &plain),
      CULOSS_OK);
  cr_assert_eq(culoss_linear_cross_entropy_ex_workspace_size(ctx, NULL, 8192, 4096, 128256,
                                                             CULOSS_BF16, &ex),
               CULOSS_OK);
  cr_assert_eq(plain, ex);
  culoss_linear_ce_options_init(&lo);
  lo.grad_weight_dtype = CULOSS_F32;
  cr_assert_eq(culoss_linear_cross_entropy_ex_workspace_size(ctx, &lo, 8192, 4096, 128256,
                                                             CULOSS_BF16, &ex32),
               CULOSS_OK);
  /* no grad_weight slice (up to one logits block) and no saved statistics */
  cr_assert_lt(ex32, plain);
  cr_assert_leq(ex32, ((size_t)1 << 28) + (size_t)128256 * 4 + (size_t)4 * 8192 + 1024, "%zu",
                ex32);
  lo.grad_weight_dtype = CULOSS_BF16;
  cr_assert_eq(culoss_linear_cross_entropy_ex_workspace_size(ctx, &lo, 8192, 4096, 128256,
                                                             CULOSS_F16, &ex32),
               CULOSS_ERROR_INVALID_VALUE);
}

/* culoss_cross_entropy_ex: the same statistics from materialised logits. */
Test(cpu_lce, cross_entropy_ex_row_outputs) {
  lce_data s;
  make(&s, 41);
  float logits[N * V], lse[N], ent[N], loss, ref_loss;
  double dl[N], de[N];
  for (int i = 0; i < N; i++)
    for (int j = 0; j < V; j++) {
      double z = s.b[j];
      for (int k = 0; k < D; k++) z += (double)s.h[i * D + k] * s.w[j * D + k];
      logits[i * V + j] = (float)z;
    }
  culoss_ce_row_outputs ro;
  culoss_ce_row_outputs_init(&ro);
  cr_assert_null(ro.lse);
  cr_assert_null(ro.entropy);
  ro.lse = lse, ro.entropy = ent;
  cr_assert_eq(culoss_cross_entropy_ex(ctx, NULL, &ro, N, V, CULOSS_F32, logits, V, CULOSS_I64, s.t,
                                       &loss, NULL, NULL),
               CULOSS_OK, "%s", culoss_last_error());
  cr_assert_eq(culoss_cross_entropy(ctx, NULL, N, V, CULOSS_F32, logits, V, CULOSS_I64, s.t,
                                    &ref_loss, NULL, NULL),
               CULOSS_OK);
  cr_assert_eq(loss, ref_loss);
  direct_stats(&s, 0.0, 1, dl, de);
  for (int i = 0; i < N; i++) {
    cr_assert(close_enough(lse[i], dl[i], 1e-6, 1e-6), "lse[%d] %g vs %g", i, (double)lse[i],
              dl[i]);
    cr_assert(close_enough(ent[i], de[i], 1e-6, 1e-5), "entropy[%d]", i);
  }
}
