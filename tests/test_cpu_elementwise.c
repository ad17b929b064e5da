/* test_cpu_elementwise.c: CPU reference of BCE, hinge, multi-margin, MSE,
   L1, Huber, smooth-L1 and KL divergence against hand-computed values,
   finite differences and PyTorch's edge cases; bad arguments. */
#include <criterion/criterion.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "helpers.h"
#include "ew_call.h"

static culoss_context *ctx;
static void setup(void) { cr_assert_eq(culoss_create(&ctx, CULOSS_BACKEND_CPU, 0), CULOSS_OK); }
static void teardown(void) { culoss_destroy(ctx); }
TestSuite(cpu_ew, .init = setup, .fini = teardown);

#define NEAR(a, b)                                                                                 \
  cr_assert(close_enough((a), (b), 1e-6, 1e-5), "%s = %.9g, want %.9g", #a, (double)(a),           \
            (double)(b))

Test(cpu_ew, option_defaults) {
  culoss_bce_options b;
  culoss_hinge_options h;
  culoss_multi_margin_options m;
  culoss_regression_options r;
  culoss_kl_div_options k;
  memset(&b, 0x5a, sizeof b), memset(&h, 0x5a, sizeof h), memset(&m, 0x5a, sizeof m);
  memset(&r, 0x5a, sizeof r), memset(&k, 0x5a, sizeof k);
  culoss_bce_options_init(&b), culoss_hinge_options_init(&h), culoss_multi_margin_options_init(&m);
  culoss_regression_options_init(&r), culoss_kl_div_options_init(&k);
  cr_assert(b.reduction == CULOSS_REDUCTION_MEAN && b.weight == NULL && b.pos_weight == NULL);
  cr_assert(h.reduction == CULOSS_REDUCTION_MEAN && h.margin == 1.0f && h.squared == 0);
  cr_assert(m.reduction == CULOSS_REDUCTION_MEAN && m.p == 1 && m.margin == 1.0f &&
            m.class_weight == NULL);
  cr_assert(r.reduction == CULOSS_REDUCTION_MEAN && r.delta == 1.0f && r.beta == 1.0f);
  cr_assert(k.reduction == CULOSS_REDUCTION_MEAN && k.log_target == 0);
  /* issue 20's: PyTorch's (torchvision's for focal) defaults */
  culoss_hinge_embedding_options he;
  culoss_soft_margin_options sm;
  culoss_poisson_nll_options po;
  culoss_sigmoid_focal_options fo;
  memset(&he, 0x5a, sizeof he), memset(&sm, 0x5a, sizeof sm), memset(&po, 0x5a, sizeof po);
  memset(&fo, 0x5a, sizeof fo);
  culoss_hinge_embedding_options_init(&he), culoss_soft_margin_options_init(&sm);
  culoss_poisson_nll_options_init(&po), culoss_sigmoid_focal_options_init(&fo);
  cr_assert(he.reduction == CULOSS_REDUCTION_MEAN && he.margin == 1.0f);
  cr_assert(sm.reduction == CULOSS_REDUCTION_MEAN);
  cr_assert(po.reduction == CULOSS_REDUCTION_MEAN && po.log_input == 1 && po.full == 0 &&
            po.eps == 1e-8f);
  cr_assert(fo.reduction == CULOSS_REDUCTION_NONE && fo.alpha == 0.25f && fo.gamma == 2.0f);
}

/* r = x - y = {0.5, -1, 2, 0} */
static const float rx[4] = {0.5f, -1.0f, 3.0f, 2.0f}, ry[4] = {0.0f, 0.0f, 1.0f, 2.0f};

static void reg_none(t_op op, float param, const double *want_l, const double *want_g) {
  float loss[4], g[4];
  t_opts t = {CULOSS_REDUCTION_NONE, NULL, NULL, param};
  cr_assert_eq(ew_call(ctx, op, &t, 4, 1, CULOSS_F32, rx, ry, loss, g, NULL), CULOSS_OK, "%s",
               culoss_last_error());
  for (int i = 0; i < 4; i++) {
    cr_assert(close_enough(loss[i], want_l[i], 1e-7, 1e-6), "%s loss[%d] = %g, want %g",
              t_op_name[op], i, (double)loss[i], want_l[i]);
    cr_assert(close_enough(g[i], want_g[i], 1e-7, 1e-6), "%s grad[%d] = %g, want %g", t_op_name[op],
              i, (double)g[i], want_g[i]);
  }
}

Test(cpu_ew, regression_hand_values) {
  reg_none(T_MSE, 0, (double[]){0.25, 1, 4, 0}, (double[]){1, -2, 4, 0});
  reg_none(T_L1, 0, (double[]){0.5, 1, 2, 0}, (double[]){1, -1, 1, 0});
  reg_none(T_HUBER, 0, (double[]){0.125, 0.5, 1.5, 0}, (double[]){0.5, -1, 1, 0});
  reg_none(T_HUBER, 0.5f, (double[]){0.125, 0.375, 0.875, 0}, (double[]){0.5, -0.5, 0.5, 0});
  reg_none(T_SMOOTH_L1, 0, (double[]){0.125, 0.5, 1.5, 0}, (double[]){0.5, -1, 1, 0});
  reg_none(T_SMOOTH_L1, 2.0f, (double[]){0.0625, 0.25, 1, 0}, (double[]){0.25, -0.5, 1, 0});
}

Test(cpu_ew, smooth_l1_beta_zero_is_exactly_l1) {
  float l1[4], g1[4], s[4], gs[4];
  culoss_regression_options o;
  culoss_regression_options_init(&o);
  o.reduction = CULOSS_REDUCTION_NONE;
  o.beta = 0.0f;
  culoss_l1(ctx, &o, 4, CULOSS_F32, rx, ry, l1, g1, NULL);
  cr_assert_eq(culoss_smooth_l1(ctx, &o, 4, CULOSS_F32, rx, ry, s, gs, NULL), CULOSS_OK);
  cr_assert(memcmp(l1, s, sizeof s) == 0 && memcmp(g1, gs, sizeof gs) == 0);
  cr_assert_eq(gs[3], 0.0f, "gradient 0 at r == 0 (recent PyTorch routes beta 0 to l1)");
}

Test(cpu_ew, regression_reductions_and_upstream_gradient) {
  float loss, g[4];
  const float gl = 3.0f;
  t_opts t = {CULOSS_REDUCTION_MEAN, NULL, NULL, 0};
  ew_call(ctx, T_MSE, &t, 4, 1, CULOSS_F32, rx, ry, &loss, g, &gl);
  NEAR(loss, 5.25 / 4);
  const double want[4] = {1 * 3.0 / 4, -2 * 3.0 / 4, 4 * 3.0 / 4, 0};
  for (int i = 0; i < 4; i++) NEAR(g[i], want[i]);
  t.red = CULOSS_REDUCTION_SUM;
  ew_call(ctx, T_MSE, &t, 4, 1, CULOSS_F32, rx, ry, &loss, g, &gl);
  NEAR(loss, 5.25);
  NEAR(g[2], 12.0);
  /* empty input: mean NaN, sum 0 */
  t.red = CULOSS_REDUCTION_MEAN;
  cr_assert_eq(ew_call(ctx, T_MSE, &t, 0, 1, CULOSS_F32, NULL, NULL, &loss, NULL, NULL), CULOSS_OK);
  cr_assert(isnan(loss));
  t.red = CULOSS_REDUCTION_SUM;
  ew_call(ctx, T_L1, &t, 0, 1, CULOSS_F32, NULL, NULL, &loss, NULL, NULL);
  cr_assert_eq(loss, 0.0f);
}

Test(cpu_ew, nan_and_inf_inputs) {
  const float x[3] = {NAN, INFINITY, 1.0f}, y[3] = {0.0f, 0.0f, INFINITY};
  float loss[3], g[3];
  t_opts t = {CULOSS_REDUCTION_NONE, NULL, NULL, 0};
  ew_call(ctx, T_MSE, &t, 3, 1, CULOSS_F32, x, y, loss, g, NULL);
  cr_assert(isnan(loss[0]) && isnan(g[0]));
  cr_assert(isinf(loss[1]) && isinf(g[1]));
  ew_call(ctx, T_L1, &t, 3, 1, CULOSS_F32, x, y, loss, g, NULL);
  cr_assert(isnan(loss[0]) && g[0] == 0.0f, "torch 2.15: sign(NaN) = 0 (loss NaN, gradient 0)");
  cr_assert(isinf(loss[2]) && g[2] == -1.0f);
  ew_call(ctx, T_HUBER, &t, 3, 1, CULOSS_F32, x, y, loss, g, NULL);
  cr_assert(isnan(loss[0]) && isnan(g[0]));
  cr_assert(isinf(loss[1]) && g[1] == 1.0f, "huber's gradient is clamped");
}

Test(cpu_ew, bce_with_logits_hand_values) {
  const float x[4] = {0.0f, 2.0f, 0.0f, -1.5f}, y[4] = {1.0f, 0.0f, 1.0f, 0.25f};
  const float w[4] = {1.0f, 1.0f, 2.0f, 0.5f}, pw[2] = {3.0f, 1.5f};
  float loss[4], g[4];
  t_opts t = {CULOSS_REDUCTION_NONE, NULL, NULL, 0};
  ew_call(ctx, T_BCE_LOGITS, &t, 2, 2, CULOSS_F32, x, y, loss, g, NULL);
  const double s15 = 1.0 / (1.0 + exp(1.5));
  NEAR(loss[0], log(2.0));
  NEAR(loss[1], log1p(exp(2.0)));
  NEAR(loss[3], -(0.25 * log(s15) + 0.75 * log(1 - s15)));
  NEAR(g[0], 0.5 - 1.0);
  NEAR(g[1], 1.0 / (1.0 + exp(-2.0)));
  NEAR(g[3], s15 - 0.25);
  /* weight and pos_weight [c] broadcast over rows: element 2 is column 0 */
  t.weight = w, t.pos_weight = pw;
  ew_call(ctx, T_BCE_LOGITS, &t, 2, 2, CULOSS_F32, x, y, loss, g, NULL);
  NEAR(loss[0], 3.0 * log(2.0));
  NEAR(loss[2], 2.0 * 3.0 * log(2.0));
  NEAR(g[2], 2.0 * ((1 + 2.0) * 0.5 - 3.0));
  NEAR(loss[3], -0.5 * (1.5 * 0.25 * log(s15) + 0.75 * log(1 - s15)));
}

Test(cpu_ew, bce_with_logits_extremes) {
  const float x[4] = {1000.0f, -1000.0f, INFINITY, -INFINITY};
  const float y[4] = {0.0f, 1.0f, 1.0f, 0.0f};
  float loss[4], g[4];
  t_opts t = {CULOSS_REDUCTION_NONE, NULL, NULL, 0};
  ew_call(ctx, T_BCE_LOGITS, &t, 1, 4, CULOSS_F32, x, y, loss, g, NULL);
  NEAR(loss[0], 1000.0);
  NEAR(loss[1], 1000.0);
  NEAR(g[0], 1.0);
  NEAR(g[1], -1.0);
  cr_assert(isnan(loss[2]) && isnan(loss[3]), "infinite logits: NaN loss (0 * inf), as PyTorch");
  cr_assert(g[2] == 0.0f && g[3] == 0.0f, "but a finite gradient");
}

Test(cpu_ew, bce_probabilities) {
  const float x[4] = {0.5f, 0.0f, 1.0f, 0.25f}, y[4] = {1.0f, 1.0f, 1.0f, 0.0f};
  float loss[4], g[4];
  t_opts t = {CULOSS_REDUCTION_NONE, NULL, NULL, 0};
  cr_assert_eq(ew_call(ctx, T_BCE, &t, 1, 4, CULOSS_F32, x, y, loss, g, NULL), CULOSS_OK);
  NEAR(loss[0], log(2.0));
  NEAR(loss[1], 100.0); /* log clamped at -100 */
  NEAR(g[1], -1e12);    /* denominator clamped at 1e-12 */
  cr_assert(loss[2] == 0.0f && g[2] == 0.0f, "x = y = 1: loss 0, gradient 0");
  NEAR(loss[3], -log(0.75));
  NEAR(g[3], 0.25 / (0.25 * 0.75));
  /* outside [0, 1] or NaN: an error naming the element, nothing written */
  const float bad[3][2] = {{0.5f, 1.5f}, {-0.1f, 0.5f}, {0.5f, NAN}};
  for (int k = 0; k < 3; k++) {
    float l2[2] = {-9, -9}, g2[2] = {-9, -9};
    cr_assert_eq(ew_call(ctx, T_BCE, &t, 1, 2, CULOSS_F32, bad[k], y, l2, g2, NULL),
                 CULOSS_ERROR_INVALID_VALUE);
    cr_assert(strstr(culoss_last_error(), "outside [0, 1]") != NULL, "%s", culoss_last_error());
    cr_assert(l2[0] == -9 && g2[0] == -9);
  }
  culoss_bce_options o;
  culoss_bce_options_init(&o);
  o.pos_weight = x;
  cr_assert_eq(culoss_bce(ctx, &o, 1, 4, CULOSS_F32, x, y, loss, g, NULL),
               CULOSS_ERROR_INVALID_VALUE);
  cr_assert(strstr(culoss_last_error(), "pos_weight") != NULL);
}

/* Issue 19, PyTorch 2.15: a NaN score makes the hinge loss NaN (so sum and
   mean are NaN) with a zero gradient; L1 and smooth-L1 with beta = 0 give a
   zero gradient where the residual is NaN (torch's sign(NaN) = 0), smooth-L1
   with beta > 0 a NaN one (torch's r / beta branch); BCE targets outside
   [0, 1] are errors. Each fails on the code before the fix. */
Test(cpu_ew, nan_and_domain_edges_as_torch) {
  const float f[3] = {NAN, 0.5f, 2.0f}, y[3] = {1, -1, 1};
  float loss[3], g[3], red[1];
  t_opts t = {CULOSS_REDUCTION_NONE, NULL, NULL, 0};
  for (int op = T_HINGE; op <= T_SQ_HINGE; op++) {
    cr_assert_eq(ew_call(ctx, (t_op)op, &t, 3, 1, CULOSS_F32, f, y, loss, g, NULL), CULOSS_OK);
    cr_assert(isnan(loss[0]) && g[0] == 0.0f, "%s: loss %g grad %g", t_op_name[op], (double)loss[0],
              (double)g[0]);
    t_opts s = {CULOSS_REDUCTION_SUM, NULL, NULL, 0};
    cr_assert_eq(ew_call(ctx, (t_op)op, &s, 3, 1, CULOSS_F32, f, y, red, NULL, NULL), CULOSS_OK);
    cr_assert(isnan(red[0]), "%s: sum %g", t_op_name[op], (double)red[0]);
  }
  const float yl[3] = {0.0f, NAN, 0.5f};
  cr_assert_eq(ew_call(ctx, T_L1, &t, 3, 1, CULOSS_F32, f, yl, loss, g, NULL), CULOSS_OK);
  cr_assert(isnan(loss[0]) && isnan(loss[1]) && g[0] == 0.0f && g[1] == 0.0f);
  culoss_regression_options b0; /* smooth-L1, beta = 0 (ew_call's 0 means the default) */
  culoss_regression_options_init(&b0);
  b0.reduction = CULOSS_REDUCTION_NONE, b0.beta = 0.0f;
  cr_assert_eq(culoss_smooth_l1(ctx, &b0, 3, CULOSS_F32, f, yl, loss, g, NULL), CULOSS_OK);
  cr_assert(g[0] == 0.0f && g[1] == 0.0f, "beta 0: %g %g", (double)g[0], (double)g[1]);
  t_opts b1 = {CULOSS_REDUCTION_NONE, NULL, NULL, 1.0f};
  cr_assert_eq(ew_call(ctx, T_SMOOTH_L1, &b1, 3, 1, CULOSS_F32, f, yl, loss, g, NULL), CULOSS_OK);
  cr_assert(isnan(g[0]) && isnan(g[1]), "beta 1: %g %g", (double)g[0], (double)g[1]);
  const float p[3] = {0.5f, 0.25f, 0.75f};
  const float bad_y[3][3] = {{0.5f, 2.0f, 0.0f}, {-1.0f, 0.5f, 0.0f}, {0.0f, 1.0f, NAN}};
  for (int k = 0; k < 3; k++) {
    cr_assert_eq(ew_call(ctx, T_BCE, &t, 3, 1, CULOSS_F32, p, bad_y[k], loss, g, NULL),
                 CULOSS_ERROR_INVALID_VALUE, "targets row %d", k);
    cr_assert(strstr(culoss_last_error(), "targets[") != NULL, "%s", culoss_last_error());
  }
}

Test(cpu_ew, hinge_hand_values_and_kink) {
  const float f[5] = {0.5f, 2.0f, 1.0f, -1.0f, 0.25f}, y[5] = {1, 1, 1, -1, -1};
  float loss[5], g[5];
  t_opts t = {CULOSS_REDUCTION_NONE, NULL, NULL, 0};
  ew_call(ctx, T_HINGE, &t, 5, 1, CULOSS_F32, f, y, loss, g, NULL);
  /* f = 1, y = 1 and f = -1, y = -1 sit on the kink: subgradient 0 (torch 2.15) */
  const double wl[5] = {0.5, 0, 0, 0, 1.25}, wg[5] = {-1, 0, 0, 0, 1};
  for (int i = 0; i < 5; i++) {
    NEAR(loss[i], wl[i]);
    NEAR(g[i], wg[i]);
  }
  ew_call(ctx, T_SQ_HINGE, &t, 5, 1, CULOSS_F32, f, y, loss, g, NULL);
  const double sl[5] = {0.25, 0, 0, 0, 1.5625}, sg[5] = {-1, 0, 0, 0, 2.5};
  for (int i = 0; i < 5; i++) {
    NEAR(loss[i], sl[i]);
    NEAR(g[i], sg[i]);
  }
  t.param = 2.0f; /* margin 2 */
  ew_call(ctx, T_HINGE, &t, 5, 1, CULOSS_F32, f, y, loss, g, NULL);
  NEAR(loss[1], 0.0);
  NEAR(g[1], 0.0); /* the kink at margin 2: subgradient 0 */
  NEAR(g[2], -1.0);
  NEAR(loss[0], 1.5);
  /* a target other than +-1 is an error */
  const float y0[2] = {1.0f, 0.0f};
  cr_assert_eq(ew_call(ctx, T_HINGE, &t, 2, 1, CULOSS_F32, f, y0, loss, g, NULL),
               CULOSS_ERROR_INVALID_VALUE);
  cr_assert(strstr(culoss_last_error(), "targets[1]") != NULL, "%s", culoss_last_error());
}

Test(cpu_ew, kl_div_hand_values) {
  const float t[3] = {0.5f, 0.0f, 0.25f};
  const float x[3] = {(float)log(0.25), (float)log(0.5), (float)log(0.25)};
  float loss[3], g[3], s;
  t_opts o = {CULOSS_REDUCTION_NONE, NULL, NULL, 0};
  ew_call(ctx, T_KL, &o, 1, 3, CULOSS_F32, x, t, loss, g, NULL);
  NEAR(loss[0], 0.5 * log(2.0));
  cr_assert_eq(loss[1], 0.0f, "0 log 0 = 0");
  NEAR(loss[2], 0.0);
  NEAR(g[0], -0.5);
  o.red = CULOSS_REDUCTION_BATCHMEAN;
  ew_call(ctx, T_KL, &o, 1, 3, CULOSS_F32, x, t, &s, g, NULL);
  NEAR(s, 0.5 * log(2.0) / 1);
  NEAR(g[0], -0.5);
  o.red = CULOSS_REDUCTION_MEAN;
  ew_call(ctx, T_KL, &o, 1, 3, CULOSS_F32, x, t, &s, g, NULL);
  NEAR(s, 0.5 * log(2.0) / 3);
  NEAR(g[0], -0.5 / 3);
  /* log_target gives the same values from log-probabilities */
  const float lt[3] = {(float)log(0.5), -INFINITY, (float)log(0.25)};
  o.red = CULOSS_REDUCTION_NONE;
  ew_call(ctx, T_KL_LOG, &o, 1, 3, CULOSS_F32, x, lt, loss, g, NULL);
  NEAR(loss[0], 0.5 * log(2.0));
  cr_assert(isnan(loss[1]), "log_target with t = -inf is NaN (0 * -inf), as PyTorch");
  NEAR(g[2], -0.25);
  /* p = 0 with x = -inf: NaN (0 * -inf); p < 0: NaN */
  const float x2[2] = {-INFINITY, -1.0f}, t2[2] = {0.0f, -0.5f};
  ew_call(ctx, T_KL, &o, 1, 2, CULOSS_F32, x2, t2, loss, g, NULL);
  cr_assert(isnan(loss[0]) && isnan(loss[1]));
  /* BATCHMEAN is KL's alone */
  t_opts m = {CULOSS_REDUCTION_BATCHMEAN, NULL, NULL, 0};
  cr_assert_eq(ew_call(ctx, T_MSE, &m, 1, 3, CULOSS_F32, x, t, &s, NULL, NULL),
               CULOSS_ERROR_INVALID_VALUE);
}

/* Gradients of every elementwise loss, every reduction, against central
   differences of the CPU backend's own loss. */
Test(cpu_ew, gradients_match_finite_differences) {
  rng_t r = rng_seeded(31);
  enum { N = 3, C = 4, M = N * C };
  float x[M], y[M], g[M], w[M], pw[C], gl[M], loss[M];
  for (int i = 0; i < M; i++) w[i] = (float)(0.5 + rng_uniform(&r)), gl[i] = (float)rng_normal(&r);
  for (int j = 0; j < C; j++) pw[j] = (float)(0.5 + 2 * rng_uniform(&r));
  for (int op = 0; op < T_NUM_OPS; op++)
    for (int red = 0; red < 4; red++) {
      if (red == CULOSS_REDUCTION_BATCHMEAN && op != T_KL && op != T_KL_LOG) continue;
      ew_fill(&r, (t_op)op, x, y, M, 0.05);
      t_opts t = {(culoss_reduction)red, op <= T_BCE ? w : NULL, op == T_BCE_LOGITS ? pw : NULL,
                  op == T_HUBER       ? 1.7f
                  : op == T_SMOOTH_L1 ? 0.6f
                  : op == T_FOCAL     ? 1.5f /* a fractional gamma */
                  : op == T_HINGE_EMB ? 0.8f
                                      : 0.0f};
      cr_assert_eq(ew_call(ctx, (t_op)op, &t, N, C, CULOSS_F32, x, y, loss, g, gl), CULOSS_OK,
                   "%s: %s", t_op_name[op], culoss_last_error());
      for (int k = 0; k < M; k++) {
        const float keep = x[k];
        const double h = op == T_BCE ? 1e-3 : 1e-2;
        double f[2];
        for (int s = 0; s < 2; s++) {
          x[k] = (float)(keep + (s ? -h : h));
          ew_call(ctx, (t_op)op, &t, N, C, CULOSS_F32, x, y, loss, NULL, gl);
          f[s] = 0;
          if (red == CULOSS_REDUCTION_NONE)
            for (int i = 0; i < M; i++) f[s] += (double)loss[i] * gl[i];
          else
            f[s] = (double)loss[0] * gl[0];
        }
        x[k] = keep;
        const double fd = (f[0] - f[1]) / (2 * h);
        cr_assert(close_enough(g[k], fd, 3e-4, 3e-3), "%s red %d element %d: grad %g vs fd %g",
                  t_op_name[op], red, k, (double)g[k], fd);
      }
    }
}

Test(cpu_ew, in_place_and_half_precision) {
  rng_t r = rng_seeded(37);
  enum { M = 40 };
  float x[M], y[M], xc[M], g[M], l1[M], l2[M];
  uint16_t xh[M], yh[M], gh[M];
  float ghf[M];
  for (int op = 0; op < T_NUM_OPS; op++) {
    t_opts t = {CULOSS_REDUCTION_NONE, NULL, NULL, 0};
    ew_fill(&r, (t_op)op, x, y, M, 0.05);
    memcpy(xc, x, sizeof x);
    ew_call(ctx, (t_op)op, &t, 4, 10, CULOSS_F32, x, y, l1, g, NULL);
    ew_call(ctx, (t_op)op, &t, 4, 10, CULOSS_F32, xc, y, l2, xc, NULL);
    cr_assert(memcmp(g, xc, sizeof g) == 0, "%s: in-place gradient differs", t_op_name[op]);
    cr_assert(memcmp(l1, l2, sizeof l1) == 0);
    for (int d = 1; d <= 2; d++) {
      round_through(x, M, (culoss_dtype)d);
      round_through(y, M, (culoss_dtype)d);
      pack_dtype(xh, x, M, (culoss_dtype)d);
      pack_dtype(yh, y, M, (culoss_dtype)d);
      ew_call(ctx, (t_op)op, &t, 4, 10, CULOSS_F32, x, y, l1, g, NULL);
      cr_assert_eq(ew_call(ctx, (t_op)op, &t, 4, 10, (culoss_dtype)d, xh, yh, l2, gh, NULL),
                   CULOSS_OK);
      unpack_dtype(ghf, gh, M, (culoss_dtype)d);
      for (int i = 0; i < M; i++) {
        cr_assert_eq(l1[i], l2[i], "%s: fp32 losses from the same values", t_op_name[op]);
        cr_assert(close_enough(ghf[i], g[i], 1e-6, d == 1 ? 1.0 / 1024 : 1.0 / 128));
      }
    }
  }
}

Test(cpu_ew, multi_margin_hand_values) {
  /* PyTorch's documentation example: x = [0.1, 0.2, 0.4, 0.8], y = 3 -> 0.325 */
  const float x[8] = {0.1f, 0.2f, 0.4f, 0.8f, 0.0f, 2.0f, 0.5f, 0.0f};
  const int64_t t[2] = {3, 1};
  float loss[2], g[8];
  culoss_multi_margin_options o;
  culoss_multi_margin_options_init(&o);
  o.reduction = CULOSS_REDUCTION_NONE;
  cr_assert_eq(culoss_multi_margin(ctx, &o, 2, 4, CULOSS_F32, x, 4, CULOSS_I64, t, loss, g, NULL),
               CULOSS_OK);
  NEAR(loss[0], 0.325);
  NEAR(loss[1], 0.0); /* margins 1-2+0 = -1, 1-2+0.5 = -0.5: none violated */
  const double want[8] = {0.25, 0.25, 0.25, -0.75, 0, 0, 0, 0};
  for (int i = 0; i < 8; i++) NEAR(g[i], want[i]);
  o.p = 2;
  culoss_multi_margin(ctx, &o, 2, 4, CULOSS_F32, x, 4, CULOSS_I64, t, loss, g, NULL);
  NEAR(loss[0], (0.09 + 0.16 + 0.36) / 4);
  NEAR(g[0], 2 * 0.3 / 4);
  NEAR(g[3], -2 * (0.3 + 0.4 + 0.6) / 4);
  /* the target class's weight, mean over n */
  const float w[4] = {1, 1, 1, 2};
  o.p = 1, o.class_weight = w, o.reduction = CULOSS_REDUCTION_MEAN;
  culoss_multi_margin(ctx, &o, 2, 4, CULOSS_F32, x, 4, CULOSS_I64, t, loss, g, NULL);
  NEAR(loss[0], 2 * 0.325 / 2);
  NEAR(g[0], 2 * 0.25 / 2);
  /* z == 0 contributes nothing */
  const float xe[2] = {0.0f, 1.0f};
  const int64_t te[1] = {1};
  o.class_weight = NULL, o.reduction = CULOSS_REDUCTION_SUM;
  culoss_multi_margin(ctx, &o, 1, 2, CULOSS_F32, xe, 2, CULOSS_I64, te, loss, g, NULL);
  cr_assert(loss[0] == 0.0f && g[0] == 0.0f && g[1] == 0.0f);
}

Test(cpu_ew, multi_margin_fd_strided_inplace_and_errors) {
  rng_t r = rng_seeded(41);
  enum { N = 3, C = 5, LD = 7 };
  float x[N * LD], xc[N * LD], g[N * LD], loss[N], w[C], gl[N];
  int32_t t[N] = {0, 4, 2};
  fill_logits(&r, x, N, C, LD, 0.7, 0, NULL);
  for (int j = 0; j < C; j++) w[j] = (float)(0.5 + rng_uniform(&r));
  for (int i = 0; i < N; i++) gl[i] = (float)rng_normal(&r);
  for (int p = 1; p <= 2; p++) {
    culoss_multi_margin_options o;
    culoss_multi_margin_options_init(&o);
    o.p = p, o.class_weight = w, o.reduction = CULOSS_REDUCTION_NONE, o.margin = 0.8f;
    for (int j = 0; j < N * LD; j++) g[j] = 55.0f;
    culoss_multi_margin(ctx, &o, N, C, CULOSS_F32, x, LD, CULOSS_I32, t, loss, g, gl);
    for (int i = 0; i < N; i++)
      for (int j = 0; j < LD; j++) {
        const int k = i * LD + j;
        if (j >= C) {
          cr_assert_eq(g[k], 55.0f, "padding written");
          continue;
        }
        const float keep = x[k];
        double f[2];
        for (int s = 0; s < 2; s++) {
          float l2[N];
          x[k] = keep + (s ? -1e-3f : 1e-3f);
          culoss_multi_margin(ctx, &o, N, C, CULOSS_F32, x, LD, CULOSS_I32, t, l2, NULL, NULL);
          f[s] = 0;
          for (int q = 0; q < N; q++) f[s] += (double)l2[q] * gl[q];
        }
        x[k] = keep;
        cr_assert(close_enough(g[k], (f[0] - f[1]) / 2e-3, 2e-3, 2e-2), "p=%d (%d,%d): %g vs %g", p,
                  i, j, (double)g[k], (f[0] - f[1]) / 2e-3);
      }
    memcpy(xc, x, sizeof x);
    float l2[N];
    culoss_multi_margin(ctx, &o, N, C, CULOSS_F32, xc, LD, CULOSS_I32, t, l2, xc, gl);
    for (int i = 0; i < N; i++)
      for (int j = 0; j < C; j++) cr_assert_eq(xc[i * LD + j], g[i * LD + j], "in place differs");
  }
  culoss_multi_margin_options o;
  culoss_multi_margin_options_init(&o);
  int32_t bad[N] = {0, 5, 1};
  cr_assert_eq(
      culoss_multi_margin(ctx, &o, N, C, CULOSS_F32, x, LD, CULOSS_I32, bad, loss, g, NULL),
      CULOSS_ERROR_TARGET_OUT_OF_RANGE);
  o.p = 3;
  cr_assert_eq(culoss_multi_margin(ctx, &o, N, C, CULOSS_F32, x, LD, CULOSS_I32, t, loss, g, NULL),
               CULOSS_ERROR_INVALID_VALUE);
  cr_assert(strstr(culoss_last_error(), "p = 3") != NULL);
}

Test(cpu_ew, bad_arguments) {
  const float x[4] = {0.1f, 0.2f, 0.3f, 0.4f};
  float loss[4] = {-9, -9, -9, -9}, g[4] = {-9, -9, -9, -9};
  culoss_regression_options r;
  culoss_regression_options_init(&r);
  struct {
    culoss_status st;
    const char *what;
  } got[16];
  int k = 0;
#define TRY(call, msg) (got[k].st = (call), got[k].what = (msg), k++)
  TRY(culoss_mse(NULL, &r, 4, CULOSS_F32, x, x, loss, g, NULL), "ctx");
  TRY(culoss_mse(ctx, &r, -1, CULOSS_F32, x, x, loss, g, NULL), "n = -1");
  TRY(culoss_mse(ctx, &r, 4, (culoss_dtype)7, x, x, loss, g, NULL), "dtype");
  TRY(culoss_mse(ctx, &r, 4, CULOSS_F32, NULL, x, loss, g, NULL), "input");
  TRY(culoss_mse(ctx, &r, 4, CULOSS_F32, x, NULL, loss, g, NULL), "target");
  TRY(culoss_mse(ctx, &r, 4, CULOSS_F32, x, x, NULL, g, NULL), "loss");
  r.delta = 0.0f;
  TRY(culoss_huber(ctx, &r, 4, CULOSS_F32, x, x, loss, g, NULL), "delta");
  r.delta = 1.0f, r.beta = -0.5f;
  TRY(culoss_smooth_l1(ctx, &r, 4, CULOSS_F32, x, x, loss, g, NULL), "beta");
  r.beta = NAN;
  TRY(culoss_smooth_l1(ctx, &r, 4, CULOSS_F32, x, x, loss, g, NULL), "beta");
  r.beta = 1.0f, r.reduction = (culoss_reduction)9;
  TRY(culoss_l1(ctx, &r, 4, CULOSS_F32, x, x, loss, g, NULL), "reduction");
  culoss_hinge_options h;
  culoss_hinge_options_init(&h);
  h.margin = INFINITY;
  TRY(culoss_hinge(ctx, &h, 4, CULOSS_F32, x, x, loss, g, NULL), "margin");
  h.margin = 1.0f, h.squared = 2;
  TRY(culoss_hinge(ctx, &h, 4, CULOSS_F32, x, x, loss, g, NULL), "squared");
  culoss_kl_div_options kl;
  culoss_kl_div_options_init(&kl);
  kl.log_target = 5;
  TRY(culoss_kl_div(ctx, &kl, 2, 2, CULOSS_F32, x, x, loss, g, NULL), "log_target");
  TRY(culoss_bce_with_logits(ctx, NULL, 2, 0, CULOSS_F32, x, x, loss, g, NULL), "c = 0");
#undef TRY
  for (int i = 0; i < k; i++) {
    cr_assert_eq(got[i].st, CULOSS_ERROR_INVALID_VALUE, "case %d (%s)", i, got[i].what);
  }
  for (int i = 0; i < 4; i++) cr_assert(loss[i] == -9 && g[i] == -9, "an output was written");
  /* each message names its argument (checked on the last error of each call) */
  culoss_regression_options_init(&r);
  r.delta = -1.0f;
  culoss_huber(ctx, &r, 4, CULOSS_F32, x, x, loss, g, NULL);
  cr_assert(strstr(culoss_last_error(), "delta") != NULL, "%s", culoss_last_error());
  culoss_mse(ctx, NULL, 4, CULOSS_F32, NULL, x, loss, g, NULL);
  cr_assert(strstr(culoss_last_error(), "input is NULL") != NULL, "%s", culoss_last_error());
}

/* The losses of issue 20, against values worked out by hand (and checked
   in double precision): hinge embedding with y = 1, -1 (both sides of the
   margin and the kink, where the subgradient is 0) and 0 (both terms);
   soft margin where PyTorch overflows (-y x = 100: loss 100, gradient -1);
   Poisson with log rates, and with rates plus the Stirling term; focal
   loss at p = 1/2, on a negative, and with the weighting off (alpha < 0)
   and gamma = 1/2. */
Test(cpu_ew, issue20_hand_values) {
  float l[5], g[5];
  culoss_hinge_embedding_options he;
  culoss_hinge_embedding_options_init(&he);
  he.reduction = CULOSS_REDUCTION_NONE;
  const float hx[5] = {0.3f, 2.0f, 0.3f, 1.0f, 0.3f}, hy[5] = {1, -1, -1, -1, 0};
  const double hl[5] = {0.3, 0.0, 0.7, 0.0, 1.0}, hg[5] = {1, 0, -1, 0, 0};
  cr_assert_eq(culoss_hinge_embedding(ctx, &he, 5, CULOSS_F32, hx, hy, l, g, NULL), CULOSS_OK);
  for (int i = 0; i < 5; i++)
    cr_assert(close_enough(l[i], hl[i], 1e-7, 1e-6) && g[i] == (float)hg[i],
              "hinge_embedding %d: %g %g", i, (double)l[i], (double)g[i]);

  culoss_soft_margin_options sm;
  culoss_soft_margin_options_init(&sm);
  sm.reduction = CULOSS_REDUCTION_NONE;
  const float sx[2] = {2.0f, -100.0f}, sy[2] = {1, 1};
  cr_assert_eq(culoss_soft_margin(ctx, &sm, 2, CULOSS_F32, sx, sy, l, g, NULL), CULOSS_OK);
  cr_assert(close_enough(l[0], 0.1269280110429725, 1e-8, 1e-6), "%g", (double)l[0]);
  cr_assert(close_enough(g[0], -0.11920292202211755, 1e-8, 1e-6), "%g", (double)g[0]);
  cr_assert(l[1] == 100.0f && g[1] == -1.0f, "overflow-free: %g %g", (double)l[1], (double)g[1]);

  culoss_poisson_nll_options po;
  culoss_poisson_nll_options_init(&po);
  po.reduction = CULOSS_REDUCTION_NONE;
  const float px[1] = {0.5f}, py[1] = {2.0f};
  cr_assert_eq(culoss_poisson_nll(ctx, &po, 1, CULOSS_F32, px, py, l, g, NULL), CULOSS_OK);
  cr_assert(close_enough(l[0], 0.6487212707001282, 1e-8, 1e-6), "%g", (double)l[0]);
  cr_assert(close_enough(g[0], -0.3512787292998718, 1e-8, 1e-6), "%g", (double)g[0]);
  po.log_input = 0, po.full = 1;
  const float qx[2] = {3.0f, 3.0f}, qy[2] = {4.0f, 1.0f}; /* y = 1: no Stirling term */
  cr_assert_eq(culoss_poisson_nll(ctx, &po, 2, CULOSS_F32, qx, qy, l, g, NULL), CULOSS_OK);
  cr_assert(close_enough(l[0], 1.7628139902384086, 1e-8, 1e-6), "%g", (double)l[0]);
  cr_assert(close_enough(g[0], -0.3333333288888889, 1e-8, 1e-6), "%g", (double)g[0]);
  cr_assert(close_enough(l[1], 3.0 - log(3.0 + 1e-8), 1e-8, 1e-6), "%g", (double)l[1]);

  culoss_sigmoid_focal_options fo;
  culoss_sigmoid_focal_options_init(&fo);
  cr_assert_eq(fo.reduction, CULOSS_REDUCTION_NONE);
  const float fx[2] = {0.0f, 2.0f}, fy[2] = {1.0f, 0.0f};
  cr_assert_eq(culoss_sigmoid_focal(ctx, &fo, 2, CULOSS_F32, fx, fy, l, g, NULL), CULOSS_OK);
  cr_assert(close_enough(l[0], 0.04332169878499658, 1e-8, 1e-6), "%g", (double)l[0]);
  cr_assert(close_enough(g[0], -0.07457169878499659, 1e-8, 1e-6), "%g", (double)g[0]);
  cr_assert(close_enough(l[1], 1.2375586345660565, 1e-8, 1e-6), "%g", (double)l[1]);
  cr_assert(close_enough(g[1], 0.8075352978363615, 1e-8, 1e-6), "%g", (double)g[1]);
  fo.alpha = -1.0f, fo.gamma = 0.5f;
  const float f2x[1] = {-1.5f}, f2y[1] = {1.0f};
  cr_assert_eq(culoss_sigmoid_focal(ctx, &fo, 1, CULOSS_F32, f2x, f2y, l, g, NULL), CULOSS_OK);
  cr_assert(close_enough(l[0], 1.5384149093166632, 1e-8, 1e-6), "%g", (double)l[0]);
  cr_assert(close_enough(g[0], -0.8795724838533904, 1e-8, 1e-6), "%g", (double)g[0]);
}

/* Bad options of the issue-20 losses: a named INVALID_VALUE, nothing written. */
Test(cpu_ew, issue20_bad_options) {
  const float x[2] = {1, 2}, y[2] = {1, -1};
  float l[2] = {7, 7};
  culoss_hinge_embedding_options he;
  culoss_hinge_embedding_options_init(&he);
  he.margin = INFINITY;
  cr_assert_eq(culoss_hinge_embedding(ctx, &he, 2, CULOSS_F32, x, y, l, NULL, NULL),
               CULOSS_ERROR_INVALID_VALUE);
  culoss_poisson_nll_options po;
  culoss_poisson_nll_options_init(&po);
  po.eps = -1.0f;
  cr_assert_eq(culoss_poisson_nll(ctx, &po, 2, CULOSS_F32, x, y, l, NULL, NULL),
               CULOSS_ERROR_INVALID_VALUE);
  cr_assert(strstr(culoss_last_error(), "eps") != NULL, "%s", culoss_last_error());
  culoss_poisson_nll_options_init(&po);
  po.full = 2;
  cr_assert_eq(culoss_poisson_nll(ctx, &po, 2, CULOSS_F32, x, y, l, NULL, NULL),
               CULOSS_ERROR_INVALID_VALUE);
  culoss_sigmoid_focal_options fo;
  culoss_sigmoid_focal_options_init(&fo);
  fo.gamma = -0.5f;
  cr_assert_eq(culoss_sigmoid_focal(ctx, &fo, 2, CULOSS_F32, x, y, l, NULL, NULL),
               CULOSS_ERROR_INVALID_VALUE);
  cr_assert(strstr(culoss_last_error(), "gamma") != NULL, "%s", culoss_last_error());
  fo.gamma = 2.0f, fo.alpha = NAN;
  cr_assert_eq(culoss_sigmoid_focal(ctx, &fo, 2, CULOSS_F32, x, y, l, NULL, NULL),
               CULOSS_ERROR_INVALID_VALUE);
  cr_assert_eq(culoss_soft_margin(ctx, NULL, 2, CULOSS_F32, NULL, y, l, NULL, NULL),
               CULOSS_ERROR_INVALID_VALUE);
  cr_assert(l[0] == 7.0f && l[1] == 7.0f, "nothing written on an error");
}
