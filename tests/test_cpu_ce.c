#define _DEFAULT_SOURCE
/* test_cpu_ce.c: the CPU reference of cross-entropy, soft cross-entropy and
   NLL against hand-computed values, identities and finite differences. */
#include <criterion/criterion.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "helpers.h"

static culoss_context *ctx;
static void setup(void) { cr_assert_eq(culoss_create(&ctx, CULOSS_BACKEND_CPU, 0), CULOSS_OK); }
static void teardown(void) { culoss_destroy(ctx); }
TestSuite(cpu_ce, .init = setup, .fini = teardown);

static culoss_cross_entropy_options opts(culoss_reduction red) {
  culoss_cross_entropy_options o;
  culoss_cross_entropy_options_init(&o);
  o.reduction = red;
  return o;
}

Test(cpu_ce, defaults_are_pytorch) {
  culoss_cross_entropy_options o;
  memset(&o, 0xab, sizeof o);
  culoss_cross_entropy_options_init(&o);
  cr_assert_eq(o.reduction, CULOSS_REDUCTION_MEAN);
  cr_assert_eq(o.ignore_index, -100);
  cr_assert_eq(o.label_smoothing, 0.0f);
  cr_assert_null(o.class_weight);
  cr_assert_eq(o.z_loss, 0.0f);
  cr_assert_eq(o.logit_softcap, 0.0f);
  cr_assert_null(o.normalizer);
}

/* logits {1,2,3} and {0,0,0}: lse = log(e+e^2+e^3) = 3.40760596444438, log 3. */
Test(cpu_ce, hand_computed_none_sum_mean) {
  const float x[6] = {1, 2, 3, 0, 0, 0};
  const int64_t t[2] = {2, 0};
  const double l0 = 0.40760596444438, l1 = log(3.0);
  float loss[2];
  culoss_cross_entropy_options o = opts(CULOSS_REDUCTION_NONE);
  cr_assert_eq(
      culoss_cross_entropy(ctx, &o, 2, 3, CULOSS_F32, x, 3, CULOSS_I64, t, loss, NULL, NULL),
      CULOSS_OK);
  cr_assert(close_enough(loss[0], l0, 1e-6, 1e-6), "%g", (double)loss[0]);
  cr_assert(close_enough(loss[1], l1, 1e-6, 1e-6), "%g", (double)loss[1]);
  o.reduction = CULOSS_REDUCTION_SUM;
  culoss_cross_entropy(ctx, &o, 2, 3, CULOSS_F32, x, 3, CULOSS_I64, t, loss, NULL, NULL);
  cr_assert(close_enough(loss[0], l0 + l1, 1e-6, 1e-6));
  o.reduction = CULOSS_REDUCTION_MEAN;
  culoss_cross_entropy(ctx, &o, 2, 3, CULOSS_F32, x, 3, CULOSS_I64, t, loss, NULL, NULL);
  cr_assert(close_enough(loss[0], (l0 + l1) / 2, 1e-6, 1e-6));
}

Test(cpu_ce, hand_computed_gradient) {
  /* mean over 2 rows: grad = (p - onehot) / 2 */
  const float x[6] = {1, 2, 3, 0, 0, 0};
  const int32_t t[2] = {2, 0};
  float loss, g[6];
  const double e1 = exp(1.0), e2 = exp(2.0), e3 = exp(3.0), s = e1 + e2 + e3;
  const double want[6] = {e1 / s / 2,        e2 / s / 2, (e3 / s - 1) / 2,
                          (1.0 / 3 - 1) / 2, 1.0 / 6,    1.0 / 6};
  cr_assert_eq(
      culoss_cross_entropy(ctx, NULL, 2, 3, CULOSS_F32, x, 3, CULOSS_I32, t, &loss, g, NULL),
      CULOSS_OK);
  for (int j = 0; j < 6; j++)
    cr_assert(close_enough(g[j], want[j], 1e-7, 1e-6), "g[%d] = %g, want %g", j, (double)g[j],
              want[j]);
}

Test(cpu_ce, ignore_index_and_class_weights) {
  const float x[9] = {1, 2, 3, 0.5f, -1, 2, 0, 0, 0};
  const int64_t t[3] = {2, -100, 1};
  const float w[3] = {0.5f, 2.0f, 3.0f};
  float loss[3];
  culoss_cross_entropy_options o = opts(CULOSS_REDUCTION_NONE);
  o.class_weight = w;
  culoss_cross_entropy(ctx, &o, 3, 3, CULOSS_F32, x, 3, CULOSS_I64, t, loss, NULL, NULL);
  const double l0 = 3.0 * 0.40760596444438, l2 = 2.0 * log(3.0);
  cr_assert(close_enough(loss[0], l0, 1e-6, 1e-6));
  cr_assert_eq(loss[1], 0.0f, "ignored rows are exactly 0");
  cr_assert(close_enough(loss[2], l2, 1e-6, 1e-6));
  o.reduction = CULOSS_REDUCTION_MEAN;
  culoss_cross_entropy(ctx, &o, 3, 3, CULOSS_F32, x, 3, CULOSS_I64, t, loss, NULL, NULL);
  cr_assert(close_enough(loss[0], (l0 + l2) / (3.0 + 2.0), 1e-6, 1e-6),
            "weighted mean divides by the sum of target weights");
}

/* Label smoothing against docs/semantics.md's formula, written out here directly:
   l = (1-e) * w_y * (-lp_y) + (e/C) * sum_c w_c * (-lp_c), mean over sum w_y. */
Test(cpu_ce, label_smoothing_formula) {
  rng_t r = rng_seeded(3);
  enum { N = 5, C = 7 };
  float x[N * C], w[C], loss;
  int64_t t[N] = {0, 6, -100, 3, 3};
  fill_logits(&r, x, N, C, C, 1.0, 0, NULL);
  for (int j = 0; j < C; j++) w[j] = (float)(0.5 + rng_uniform(&r));
  const double eps = 0.2;
  double num = 0, den = 0;
  for (int i = 0; i < N; i++) {
    if (t[i] == -100) continue;
    double m = -INFINITY, s = 0;
    for (int j = 0; j < C; j++) m = fmax(m, x[i * C + j]);
    for (int j = 0; j < C; j++) s += exp(x[i * C + j] - m);
    double lse = m + log(s), smooth = 0;
    for (int j = 0; j < C; j++) smooth += w[j] * (lse - x[i * C + j]);
    num += (1 - eps) * w[t[i]] * (lse - x[i * C + t[i]]) + eps / C * smooth;
    den += w[t[i]];
  }
  culoss_cross_entropy_options o = opts(CULOSS_REDUCTION_MEAN);
  o.label_smoothing = (float)eps;
  o.class_weight = w;
  cr_assert_eq(
      culoss_cross_entropy(ctx, &o, N, C, CULOSS_F32, x, C, CULOSS_I64, t, &loss, NULL, NULL),
      CULOSS_OK);
  cr_assert(close_enough(loss, num / den, 1e-6, 1e-5), "%g vs %g", (double)loss, num / den);
}

Test(cpu_ce, z_loss_adds_z_lse_squared) {
  const float x[3] = {1, 2, 3};
  const int64_t t[1] = {2};
  float loss;
  culoss_cross_entropy_options o = opts(CULOSS_REDUCTION_SUM);
  o.z_loss = 1e-2f;
  culoss_cross_entropy(ctx, &o, 1, 3, CULOSS_F32, x, 3, CULOSS_I64, t, &loss, NULL, NULL);
  const double lse = 3.40760596444438;
  cr_assert(close_enough(loss, 0.40760596444438 + 1e-2 * lse * lse, 1e-6, 1e-6));
}

Test(cpu_ce, softcap_caps_logits) {
  /* with cap 2: logits become 2 tanh(x / 2) */
  const float x[3] = {1, 2, 30};
  const int64_t t[1] = {0};
  float loss;
  culoss_cross_entropy_options o = opts(CULOSS_REDUCTION_SUM);
  o.logit_softcap = 2.0f;
  culoss_cross_entropy(ctx, &o, 1, 3, CULOSS_F32, x, 3, CULOSS_I64, t, &loss, NULL, NULL);
  double y[3], m = 0, s = 0;
  for (int j = 0; j < 3; j++) y[j] = 2 * tanh(x[j] / 2.0), m = fmax(m, y[j]);
  for (int j = 0; j < 3; j++) s += exp(y[j] - m);
  cr_assert(close_enough(loss, m + log(s) - y[0], 1e-6, 1e-6));
}

Test(cpu_ce, normalizer_replaces_weight_sum) {
  const float x[6] = {1, 2, 3, 0, 0, 0};
  const int64_t t[2] = {2, 0};
  const float norm = 8.0f;
  float loss, g[6], g_sum[6];
  culoss_cross_entropy_options o = opts(CULOSS_REDUCTION_MEAN);
  o.normalizer = &norm;
  culoss_cross_entropy(ctx, &o, 2, 3, CULOSS_F32, x, 3, CULOSS_I64, t, &loss, g, NULL);
  cr_assert(close_enough(loss, (0.40760596444438 + log(3.0)) / 8, 1e-6, 1e-6));
  o = opts(CULOSS_REDUCTION_SUM);
  culoss_cross_entropy(ctx, &o, 2, 3, CULOSS_F32, x, 3, CULOSS_I64, t, &loss, g_sum, NULL);
  for (int j = 0; j < 6; j++) cr_assert(close_enough(g[j], g_sum[j] / 8, 1e-8, 1e-6));
}

Test(cpu_ce, all_ignored_and_empty) {
  const float x[6] = {1, 2, 3, 0, 0, 0};
  const int64_t t[2] = {-100, -100};
  float loss, g[6];
  culoss_cross_entropy_options o = opts(CULOSS_REDUCTION_MEAN);
  o.label_smoothing = 0.3f;
  culoss_cross_entropy(ctx, &o, 2, 3, CULOSS_F32, x, 3, CULOSS_I64, t, &loss, g, NULL);
  cr_assert(isnan(loss), "all-ignored mean is 0/0 = NaN");
  for (int j = 0; j < 6; j++) cr_assert_eq(g[j], 0.0f, "all-ignored gradient is zero");
  o.reduction = CULOSS_REDUCTION_SUM;
  culoss_cross_entropy(ctx, &o, 2, 3, CULOSS_F32, x, 3, CULOSS_I64, t, &loss, g, NULL);
  cr_assert_eq(loss, 0.0f);
  /* n == 0 */
  o.reduction = CULOSS_REDUCTION_MEAN;
  cr_assert_eq(
      culoss_cross_entropy(ctx, &o, 0, 3, CULOSS_F32, NULL, 3, CULOSS_I64, NULL, &loss, NULL, NULL),
      CULOSS_OK);
  cr_assert(isnan(loss));
  o.reduction = CULOSS_REDUCTION_SUM;
  culoss_cross_entropy(ctx, &o, 0, 3, CULOSS_F32, NULL, 3, CULOSS_I64, NULL, &loss, NULL, NULL);
  cr_assert_eq(loss, 0.0f);
  /* zero weights everywhere: D = 0 -> NaN mean, zero gradient */
  const float w0[3] = {0, 0, 0};
  const int64_t t2[2] = {0, 1};
  o = opts(CULOSS_REDUCTION_MEAN);
  o.class_weight = w0;
  culoss_cross_entropy(ctx, &o, 2, 3, CULOSS_F32, x, 3, CULOSS_I64, t2, &loss, g, NULL);
  cr_assert(isnan(loss));
  for (int j = 0; j < 6; j++) cr_assert_eq(g[j], 0.0f);
}

Test(cpu_ce, neg_inf_logits) {
  const float x[4] = {-INFINITY, 1.0f, 2.0f, -INFINITY};
  int64_t t[1] = {1};
  float loss, g[4];
  culoss_cross_entropy_options o = opts(CULOSS_REDUCTION_SUM);
  culoss_cross_entropy(ctx, &o, 1, 4, CULOSS_F32, x, 4, CULOSS_I64, t, &loss, g, NULL);
  cr_assert(close_enough(loss, log(exp(1.0) + exp(2.0)) - 1.0, 1e-6, 1e-6));
  cr_assert_eq(g[0], 0.0f, "-inf logit: p = 0, gradient 0");
  cr_assert_eq(g[3], 0.0f);
  t[0] = 0; /* target logit -inf: +inf loss */
  culoss_cross_entropy(ctx, &o, 1, 4, CULOSS_F32, x, 4, CULOSS_I64, t, &loss, g, NULL);
  cr_assert(isinf(loss) && loss > 0);
  t[0] = 1; /* smoothing with a -inf logit: +inf loss, finite gradient */
  o.label_smoothing = 0.1f;
  culoss_cross_entropy(ctx, &o, 1, 4, CULOSS_F32, x, 4, CULOSS_I64, t, &loss, g, NULL);
  cr_assert(isinf(loss) && loss > 0);
  for (int j = 0; j < 4; j++) cr_assert(isfinite(g[j]));
}

Test(cpu_ce, nan_and_pos_inf_rows) {
  const float x[6] = {1, NAN, 3, 1, INFINITY, 0};
  const int64_t t[2] = {0, 0};
  float loss[2];
  culoss_cross_entropy_options o = opts(CULOSS_REDUCTION_NONE);
  culoss_cross_entropy(ctx, &o, 2, 3, CULOSS_F32, x, 3, CULOSS_I64, t, loss, NULL, NULL);
  cr_assert(isnan(loss[0]), "NaN in a row makes its loss NaN");
  cr_assert(isnan(loss[1]), "+inf logit makes the row NaN");
}

Test(cpu_ce, out_of_range_target_writes_nothing) {
  const float x[6] = {1, 2, 3, 0, 0, 0};
  int64_t t[2] = {2, 3};
  float loss[2] = {-7.0f, -7.0f}, g[6];
  for (int j = 0; j < 6; j++) g[j] = -7.0f;
  culoss_cross_entropy_options o = opts(CULOSS_REDUCTION_NONE);
  cr_assert_eq(culoss_cross_entropy(ctx, &o, 2, 3, CULOSS_F32, x, 3, CULOSS_I64, t, loss, g, NULL),
               CULOSS_ERROR_TARGET_OUT_OF_RANGE);
  cr_assert(strstr(culoss_last_error(), "targets[1]") != NULL, "%s", culoss_last_error());
  cr_assert_eq(loss[0], -7.0f);
  cr_assert_eq(g[0], -7.0f);
  t[1] = -1;
  cr_assert_eq(culoss_cross_entropy(ctx, &o, 2, 3, CULOSS_F32, x, 3, CULOSS_I64, t, loss, g, NULL),
               CULOSS_ERROR_TARGET_OUT_OF_RANGE);
  t[1] = INT64_MIN;
  cr_assert_eq(culoss_nll(ctx, &o, 2, 3, CULOSS_F32, x, 3, CULOSS_I64, t, loss, g, NULL),
               CULOSS_ERROR_TARGET_OUT_OF_RANGE);
  /* ignore_index may be a valid class, tested before the bounds */
  o.ignore_index = 3;
  t[1] = 3;
  cr_assert_eq(culoss_cross_entropy(ctx, &o, 2, 3, CULOSS_F32, x, 3, CULOSS_I64, t, loss, g, NULL),
               CULOSS_OK);
  cr_assert_eq(loss[1], 0.0f);
}

Test(cpu_ce, soft_one_hot_equals_index) {
  rng_t r = rng_seeded(5);
  enum { N = 6, C = 9 };
  float x[N * C], y[N * C], l_idx[N], l_soft[N], g_idx[N * C], g_soft[N * C];
  int64_t t[N];
  fill_logits(&r, x, N, C, C, 2.0, 0, NULL);
  memset(y, 0, sizeof y);
  for (int i = 0; i < N; i++) t[i] = rng_int(&r, 0, C), y[i * C + t[i]] = 1.0f;
  for (int smooth = 0; smooth < 2; smooth++) {
    culoss_cross_entropy_options o = opts(CULOSS_REDUCTION_NONE);
    o.label_smoothing = smooth ? 0.25f : 0.0f;
    o.z_loss = 1e-3f;
    culoss_cross_entropy(ctx, &o, N, C, CULOSS_F32, x, C, CULOSS_I64, t, l_idx, g_idx, NULL);
    culoss_cross_entropy_soft(ctx, &o, N, C, CULOSS_F32, x, C, y, l_soft, g_soft, NULL);
    for (int i = 0; i < N; i++) cr_assert(close_enough(l_soft[i], l_idx[i], 1e-6, 1e-5));
    for (int j = 0; j < N * C; j++) cr_assert(close_enough(g_soft[j], g_idx[j], 1e-6, 1e-5));
  }
  /* mean: soft divides by n, index by the weight sum (here equal: no weights) */
  culoss_cross_entropy_options o = opts(CULOSS_REDUCTION_MEAN);
  float a, b;
  culoss_cross_entropy(ctx, &o, N, C, CULOSS_F32, x, C, CULOSS_I64, t, &a, NULL, NULL);
  culoss_cross_entropy_soft(ctx, &o, N, C, CULOSS_F32, x, C, y, &b, NULL, NULL);
  cr_assert(close_enough(a, b, 1e-6, 1e-5));
}

Test(cpu_ce, soft_weighted_mean_divides_by_n) {
  const float x[6] = {1, 2, 3, 0, 0, 0};
  const float y[6] = {0, 0, 1, 1, 0, 0};
  const float w[3] = {2, 1, 3};
  float loss;
  culoss_cross_entropy_options o = opts(CULOSS_REDUCTION_MEAN);
  o.class_weight = w;
  culoss_cross_entropy_soft(ctx, &o, 2, 3, CULOSS_F32, x, 3, y, &loss, NULL, NULL);
  cr_assert(close_enough(loss, (3 * 0.40760596444438 + 2 * log(3.0)) / 2, 1e-6, 1e-6));
}

Test(cpu_ce, nll_hand_values) {
  const float lp[6] = {-1.0f, -0.5f, -2.0f, -0.1f, -3.0f, -4.0f};
  const int64_t t[2] = {2, 0};
  const float w[3] = {2, 1, 0.5f};
  float loss, g[6];
  culoss_cross_entropy_options o = opts(CULOSS_REDUCTION_MEAN);
  o.class_weight = w;
  cr_assert_eq(culoss_nll(ctx, &o, 2, 3, CULOSS_F32, lp, 3, CULOSS_I64, t, &loss, g, NULL),
               CULOSS_OK);
  cr_assert(close_enough(loss, (0.5 * 2.0 + 2 * 0.1) / 2.5, 1e-7, 1e-6));
  const double want[6] = {0, 0, -0.5 / 2.5, -2.0 / 2.5, 0, 0};
  for (int j = 0; j < 6; j++) cr_assert(close_enough(g[j], want[j], 1e-8, 1e-6));
}

Test(cpu_ce, int32_targets_match_int64) {
  rng_t r = rng_seeded(9);
  enum { N = 8, C = 5 };
  float x[N * C], a, b;
  int32_t t32[N];
  int64_t t64[N];
  fill_logits(&r, x, N, C, C, 1.0, 0, NULL);
  for (int i = 0; i < N; i++) t32[i] = (int32_t)(t64[i] = rng_int(&r, 0, C));
  culoss_cross_entropy(ctx, NULL, N, C, CULOSS_F32, x, C, CULOSS_I32, t32, &a, NULL, NULL);
  culoss_cross_entropy(ctx, NULL, N, C, CULOSS_F32, x, C, CULOSS_I64, t64, &b, NULL, NULL);
  cr_assert_eq(a, b);
}

Test(cpu_ce, in_place_and_strided) {
  rng_t r = rng_seeded(13);
  enum { N = 4, C = 6, LD = 9 };
  float x[N * LD], xc[N * LD], g[N * LD], loss_a, loss_b;
  int64_t t[N];
  fill_logits(&r, x, N, C, LD, 1.0, 1, NULL);
  for (int i = 0; i < N; i++) t[i] = 1 + i % 3;
  for (int j = 0; j < N * LD; j++) g[j] = 777.0f;
  memcpy(xc, x, sizeof x);
  culoss_cross_entropy_options o = opts(CULOSS_REDUCTION_MEAN);
  o.label_smoothing = 0.1f;
  o.z_loss = 1e-4f;
  culoss_cross_entropy(ctx, &o, N, C, CULOSS_F32, x, LD, CULOSS_I64, t, &loss_a, g, NULL);
  culoss_cross_entropy(ctx, &o, N, C, CULOSS_F32, xc, LD, CULOSS_I64, t, &loss_b, xc, NULL);
  cr_assert_eq(loss_a, loss_b);
  for (int i = 0; i < N; i++)
    for (int j = 0; j < LD; j++) {
      if (j < C)
        cr_assert_eq(xc[i * LD + j], g[i * LD + j], "in-place gradient differs at %d,%d", i, j);
      else {
        cr_assert_eq(g[i * LD + j], 777.0f, "padding of grad written");
        cr_assert_eq(xc[i * LD + j], 12345.0f, "padding of logits written");
      }
    }
}

/* Loss of the CPU backend as a function of one logit, for finite differences. */
typedef struct {
  int soft;
  int64_t n, c;
  float *x;
  const int64_t *t;
  const float *y;
  culoss_cross_entropy_options o;
  const float *gl;
} fd_case;

static double eval_loss(fd_case *f) {
  float loss[16];
  culoss_status st;
  if (f->soft)
    st = culoss_cross_entropy_soft(ctx, &f->o, f->n, f->c, CULOSS_F32, f->x, f->c, f->y, loss, NULL,
                                   NULL);
  else
    st = culoss_cross_entropy(ctx, &f->o, f->n, f->c, CULOSS_F32, f->x, f->c, CULOSS_I64, f->t,
                              loss, NULL, NULL);
  cr_assert_eq(st, CULOSS_OK);
  if (f->o.reduction != CULOSS_REDUCTION_NONE) return (double)loss[0] * (f->gl ? f->gl[0] : 1.0);
  double s = 0.0; /* sum_i gl_i * loss_i: its gradient is what NONE returns */
  for (int64_t i = 0; i < f->n; i++) s += (double)loss[i] * (f->gl ? f->gl[i] : 1.0);
  return s;
}

static void check_fd(fd_case *f) {
  float g[16 * 8];
  culoss_status st;
  if (f->soft)
    st = culoss_cross_entropy_soft(ctx, &f->o, f->n, f->c, CULOSS_F32, f->x, f->c, f->y,
                                   (float[16]){0}, g, f->gl);
  else
    st = culoss_cross_entropy(ctx, &f->o, f->n, f->c, CULOSS_F32, f->x, f->c, CULOSS_I64, f->t,
                              (float[16]){0}, g, f->gl);
  cr_assert_eq(st, CULOSS_OK);
  for (int64_t k = 0; k < f->n * f->c; k++) {
    const float keep = f->x[k];
    const double h = 1e-2;
    f->x[k] = (float)(keep + h);
    double up = eval_loss(f);
    f->x[k] = (float)(keep - h);
    double dn = eval_loss(f);
    f->x[k] = keep;
    double fd = (up - dn) / (2 * h);
    cr_assert(close_enough(g[k], fd, 2e-4, 2e-3), "element %lld: grad %g vs finite diff %g",
              (long long)k, (double)g[k], fd);
  }
}

Test(cpu_ce, gradient_matches_finite_differences) {
  rng_t r = rng_seeded(17);
  enum { N = 4, C = 7 };
  float x[N * C], y[N * C], w[C];
  const int64_t t[N] = {3, -100, 0, 6};
  const float gl_none[N] = {0.5f, 2.0f, -1.5f, 1.0f}, gl_one[1] = {1.7f};
  fill_logits(&r, x, N, C, C, 1.0, 0, NULL);
  fill_probs(&r, y, N, C, C);
  for (int j = 0; j < C; j++) w[j] = (float)(0.3 + 2 * rng_uniform(&r));
  for (int soft = 0; soft < 2; soft++)
    for (int red = 0; red < 3; red++)
      for (int variant = 0; variant < 5; variant++) {
        fd_case f = {soft, N, C, x, t, y, opts((culoss_reduction)red), NULL};
        f.gl = red == CULOSS_REDUCTION_NONE ? gl_none : gl_one;
        if (variant >= 1) f.o.class_weight = w;
        if (variant >= 2) f.o.label_smoothing = 0.15f;
        if (variant >= 3) f.o.z_loss = 0.05f;
        if (variant >= 4) f.o.logit_softcap = 1.5f;
        check_fd(&f);
      }
}

Test(cpu_ce, half_precision_inputs) {
  rng_t r = rng_seeded(21);
  enum { N = 5, C = 33 };
  float x[N * C], g32[N * C], g16f[N * C], l32[N], l16[N];
  uint16_t x16[N * C], g16[N * C];
  int64_t t[N];
  for (int i = 0; i < N; i++) t[i] = rng_int(&r, 0, C);
  fill_logits(&r, x, N, C, C, 3.0, 1, t);
  culoss_cross_entropy_options o = opts(CULOSS_REDUCTION_NONE);
  for (int d = 1; d <= 2; d++) {
    culoss_dtype dt = (culoss_dtype)d;
    round_through(x, N * C, dt); /* the f32 run then sees the same values */
    pack_dtype(x16, x, N * C, dt);
    culoss_cross_entropy(ctx, &o, N, C, CULOSS_F32, x, C, CULOSS_I64, t, l32, g32, NULL);
    culoss_cross_entropy(ctx, &o, N, C, dt, x16, C, CULOSS_I64, t, l16, g16, NULL);
    unpack_dtype(g16f, g16, N * C, dt);
    for (int i = 0; i < N; i++)
      cr_assert_eq(l16[i], l32[i], "losses are fp32 from the same values");
    double rt = dt == CULOSS_F16 ? 1.0 / 1024 : 1.0 / 128;
    for (int j = 0; j < N * C; j++)
      cr_assert(close_enough(g16f[j], g32[j], 1e-7, rt), "dtype %d grad %d: %g vs %g", d, j,
                (double)g16f[j], (double)g32[j]);
  }
}

/* 64-bit offsets in the CPU reference: two rows 2^31 + 16 elements apart
   (a strided view), in a sparse mapping so only the two rows' pages are
   ever touched. */
#include <sys/mman.h>
Test(cpu_ce, row_offsets_past_2_pow_31) {
  const int64_t c = 40, ld = ((int64_t)1 << 31) + 16;
  const size_t bytes = (size_t)(ld + c) * 2; /* bf16: just over 4 GiB of address space */
  uint16_t *x =
      mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (x == MAP_FAILED) cr_skip_test("skipped: cannot map %zu bytes of address space", bytes);
  rng_t r = rng_seeded(61);
  float rows[2 * c], loss[2], ref[2];
  const int64_t t[2] = {3, 37};
  fill_logits(&r, rows, 2, c, c, 2.0, 0, NULL);
  pack_dtype(x, rows, c, CULOSS_BF16);
  pack_dtype(x + ld, rows + c, c, CULOSS_BF16);
  uint16_t packed[2 * c];
  pack_dtype(packed, rows, 2 * c, CULOSS_BF16);
  culoss_cross_entropy_options o = opts(CULOSS_REDUCTION_NONE);
  cr_assert_eq(
      culoss_cross_entropy(ctx, &o, 2, c, CULOSS_BF16, x, ld, CULOSS_I64, t, loss, x, NULL),
      CULOSS_OK);
  uint16_t g[2 * c];
  cr_assert_eq(
      culoss_cross_entropy(ctx, &o, 2, c, CULOSS_BF16, packed, c, CULOSS_I64, t, ref, g, NULL),
      CULOSS_OK);
  cr_assert(loss[0] == ref[0] && loss[1] == ref[1], "row past 2^31: %g vs %g", (double)loss[1],
            (double)ref[1]);
  cr_assert(memcmp(x + ld, g + c, c * 2) == 0, "in-place gradient of the far row differs");
  munmap(x, bytes);
}

/* Found by the CUDA-path fuzzer: without label smoothing an infinite class
   weight elsewhere must not reach the gradient (the smoothing terms were
   0 * inf = NaN in every column); PyTorch's w_t (softmax - onehot). */
Test(cpu_ce, infinite_weight_of_another_class_without_smoothing) {
  culoss_context *c;
  cr_assert_eq(culoss_create(&c, CULOSS_BACKEND_CPU, 0), CULOSS_OK);
  const float x[3] = {1, 2, 3}, w[3] = {1, 1, INFINITY};
  const int64_t t[1] = {0};
  float loss, g[3];
  culoss_cross_entropy_options o;
  culoss_cross_entropy_options_init(&o);
  o.class_weight = w, o.reduction = CULOSS_REDUCTION_SUM;
  cr_assert_eq(culoss_cross_entropy(c, &o, 1, 3, CULOSS_F32, x, 3, CULOSS_I64, t, &loss, g, NULL),
               CULOSS_OK);
  const double s = exp(1.0) + exp(2.0) + exp(3.0);
  cr_assert(fabs(loss - (log(s) - 1.0)) < 1e-6, "loss %g", (double)loss);
  for (int j = 0; j < 3; j++)
    cr_assert(fabs(g[j] - (exp((double)x[j]) / s - (j == 0))) < 1e-6, "grad[%d] = %g", j,
              (double)g[j]);
  culoss_destroy(c);
}
