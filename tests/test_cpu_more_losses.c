/* test_cpu_more_losses.c: the CPU reference of margin ranking, Gaussian
   NLL, cosine embedding and triplet margin against hand-computed values
   (PyTorch 2.15's, where noted), identities with the other losses, finite
   differences of every gradient, NaN and kink semantics, and every bad
   argument (a named INVALID_VALUE, nothing written). */
#include <criterion/criterion.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "helpers.h"
#include "more_losses_call.h"

static culoss_context *ctx;
static void setup(void) { cr_assert_eq(culoss_create(&ctx, CULOSS_BACKEND_CPU, 0), CULOSS_OK); }
static void teardown(void) { culoss_destroy(ctx); }
TestSuite(cpu_more, .init = setup, .fini = teardown);

#define NEAR(a, b, tol, ...) cr_assert(fabs((double)(a) - (double)(b)) <= (tol), __VA_ARGS__)

/* torch 2.15: F.margin_ranking_loss([1, 2, .5], [1, 1, 1], [1, -1, 1],
   reduction='sum') = 1.5, grads x1 [-0, 1, -1], x2 [0, -1, 1] (0 at the
   kink z = 0) */
Test(cpu_more, margin_ranking_hand_values) {
  const float x1[3] = {1, 2, 0.5f}, x2[3] = {1, 1, 1}, y[3] = {1, -1, 1};
  float l[3], g1[3], g2[3], s, sg1[3];
  culoss_margin_ranking_options o;
  culoss_margin_ranking_options_init(&o);
  cr_assert_eq(o.reduction, CULOSS_REDUCTION_MEAN);
  cr_assert_eq(o.margin, 0.0f);
  o.reduction = CULOSS_REDUCTION_NONE;
  cr_assert_eq(culoss_margin_ranking(ctx, &o, 3, CULOSS_F32, x1, x2, y, l, g1, g2, NULL),
               CULOSS_OK);
  const float wl[3] = {0, 1, 0.5f}, wg1[3] = {0, 1, -1};
  for (int i = 0; i < 3; i++) {
    cr_assert_eq(l[i], wl[i], "loss[%d] = %g", i, (double)l[i]);
    cr_assert_eq(g1[i], wg1[i], "g1[%d] = %g", i, (double)g1[i]);
    cr_assert_eq(g2[i], -wg1[i], "g2[%d] = %g", i, (double)g2[i]);
  }
  o.reduction = CULOSS_REDUCTION_MEAN, o.margin = 1.0f;
  const float gl = 3.0f;
  cr_assert_eq(culoss_margin_ranking(ctx, &o, 3, CULOSS_F32, x1, x2, y, &s, sg1, NULL, &gl),
               CULOSS_OK);
  NEAR(s, (1.0 + 2.0 + 1.5) / 3.0, 1e-6, "mean %g", (double)s); /* z = 1, 2, 1.5 */
  for (int i = 0; i < 3; i++) NEAR(sg1[i], -y[i], 1e-6, "mean grad[%d] %g", i, (double)sg1[i]);
}

/* The binary hinge identity (docs/semantics.md section 5): margin ranking
   of (f, 0, y) with margin 1 is culoss_hinge(f, y). */
Test(cpu_more, margin_ranking_with_zero_is_the_hinge) {
  rng_t r = rng_seeded(3);
  float f[64], z[64], y[64], a[64], b[64], ga[64], gb[64];
  for (int i = 0; i < 64; i++)
    f[i] = (float)(2 * rng_normal(&r)), z[i] = 0, y[i] = rng_uniform(&r) < 0.5 ? -1.0f : 1.0f;
  culoss_margin_ranking_options o;
  culoss_margin_ranking_options_init(&o);
  o.reduction = CULOSS_REDUCTION_NONE, o.margin = 1.0f;
  culoss_hinge_options h;
  culoss_hinge_options_init(&h);
  h.reduction = CULOSS_REDUCTION_NONE;
  cr_assert_eq(culoss_margin_ranking(ctx, &o, 64, CULOSS_F32, f, z, y, a, ga, NULL, NULL),
               CULOSS_OK);
  cr_assert_eq(culoss_hinge(ctx, &h, 64, CULOSS_F32, f, y, b, gb, NULL), CULOSS_OK);
  for (int i = 0; i < 64; i++) {
    cr_assert_eq(a[i], b[i], "loss[%d] %g vs %g", i, (double)a[i], (double)b[i]);
    cr_assert_eq(ga[i], gb[i], "grad[%d] %g vs %g", i, (double)ga[i], (double)gb[i]);
  }
}

/* torch 2.15: F.gaussian_nll_loss([1, 2, 3], [0, 0, 0], var=[.5, 1e-9, 2],
   reduction='none') = [0.65343, 2.0e6, 2.5966]; grads input [2, 2e6, 1.5],
   var [-1, -2e12, -0.875] (var's gradient passes the clamp) */
Test(cpu_more, gaussian_nll_hand_values) {
  const float x[3] = {1, 2, 3}, t[3] = {0, 0, 0}, v[3] = {0.5f, 1e-9f, 2};
  float l[3], gx[3], gv[3];
  culoss_gaussian_nll_options o;
  culoss_gaussian_nll_options_init(&o);
  cr_assert_eq(o.eps, 1e-6f);
  cr_assert_eq(o.full, 0);
  o.reduction = CULOSS_REDUCTION_NONE;
  cr_assert_eq(culoss_gaussian_nll(ctx, &o, 3, CULOSS_F32, x, t, v, l, gx, gv, NULL), CULOSS_OK);
  const double wl[3] = {0.5 * (log(0.5) + 2.0), 0.5 * (log(1e-6) + 4e6), 0.5 * (log(2.0) + 4.5)};
  const double wgx[3] = {2.0, 2e6, 1.5}, wgv[3] = {-1.0, -2e12, -0.875};
  for (int i = 0; i < 3; i++) {
    NEAR(l[i], wl[i], 1e-6 * fabs(wl[i]), "loss[%d] %.9g want %.9g", i, (double)l[i], wl[i]);
    NEAR(gx[i], wgx[i], 1e-6 * fabs(wgx[i]), "gx[%d] %.9g", i, (double)gx[i]);
    NEAR(gv[i], wgv[i], 1e-6 * fabs(wgv[i]), "gv[%d] %.9g", i, (double)gv[i]);
  }
  o.full = 1;
  cr_assert_eq(culoss_gaussian_nll(ctx, &o, 3, CULOSS_F32, x, t, v, l, NULL, NULL, NULL),
               CULOSS_OK);
  NEAR(l[0], wl[0] + 0.5 * log(2.0 * 3.14159265358979), 1e-6, "full adds log(2 pi) / 2");
  /* var = 1: half the squared error */
  const float one[3] = {1, 1, 1};
  float mse[3];
  culoss_regression_options r;
  culoss_regression_options_init(&r);
  r.reduction = CULOSS_REDUCTION_NONE;
  o.full = 0;
  cr_assert_eq(culoss_gaussian_nll(ctx, &o, 3, CULOSS_F32, x, t, one, l, NULL, NULL, NULL),
               CULOSS_OK);
  cr_assert_eq(culoss_mse(ctx, &r, 3, CULOSS_F32, x, t, mse, NULL, NULL), CULOSS_OK);
  for (int i = 0; i < 3; i++)
    NEAR(l[i], 0.5 * mse[i], 1e-6, "var 1: %g vs %g", (double)l[i], (double)mse[i]);
  /* NaN var: NaN loss (the clamp keeps NaN); a negative one is refused */
  const float vn[3] = {NAN, 1, 1}, vneg[3] = {1, -0.0f, -1e-30f};
  cr_assert_eq(culoss_gaussian_nll(ctx, &o, 3, CULOSS_F32, x, t, vn, l, NULL, NULL, NULL),
               CULOSS_OK);
  cr_assert(isnan(l[0]) && !isnan(l[1]));
  poison(l, sizeof l);
  cr_assert_eq(culoss_gaussian_nll(ctx, &o, 3, CULOSS_F32, x, t, vneg, l, NULL, NULL, NULL),
               CULOSS_ERROR_INVALID_VALUE, "var -1e-30 is negative (torch: var < 0)");
  cr_assert(strstr(culoss_last_error(), "var[2]") != NULL, "%s", culoss_last_error());
  cr_assert(is_poison_f32(l[0]) && is_poison_f32(l[2]), "nothing written");
}

/* cos((1, 0), (0, 1)) = 0; cos((1, 1), (2, 2)) = 1 */
Test(cpu_more, cosine_embedding_hand_values) {
  const float a[6] = {1, 0, 1, 1, 3, 4}, b[6] = {0, 1, 2, 2, -3, -4};
  const float y1[3] = {1, 1, 1}, ym[3] = {-1, -1, -1}, y0[3] = {0, 2, 0.5f};
  float l[3], g1[6], g2[6];
  culoss_cosine_embedding_options o;
  culoss_cosine_embedding_options_init(&o);
  cr_assert_eq(o.margin, 0.0f);
  o.reduction = CULOSS_REDUCTION_NONE;
  cr_assert_eq(culoss_cosine_embedding(ctx, &o, 3, 2, CULOSS_F32, a, b, 2, y1, l, g1, g2, NULL),
               CULOSS_OK);
  NEAR(l[0], 1.0, 1e-7, "orthogonal, y = 1: %g", (double)l[0]);
  NEAR(l[1], 0.0, 1e-7, "parallel, y = 1: %g", (double)l[1]);
  NEAR(l[2], 2.0, 1e-7, "opposite, y = 1: %g", (double)l[2]);
  /* row 0: dcos/da = b / (|a||b|) - cos a / |a|^2 = (0, 1); dl/dcos = -1 */
  NEAR(g1[0], 0.0, 1e-7, "g1 %g", (double)g1[0]);
  NEAR(g1[1], -1.0, 1e-6, "g1 %g", (double)g1[1]);
  NEAR(g2[0], -1.0, 1e-6, "g2 %g", (double)g2[0]);
  o.margin = -0.5f;
  cr_assert_eq(culoss_cosine_embedding(ctx, &o, 3, 2, CULOSS_F32, a, b, 2, ym, l, NULL, NULL, NULL),
               CULOSS_OK);
  NEAR(l[0], 0.5, 1e-7, "y = -1: max(0, 0 + 0.5) = %g", (double)l[0]);
  NEAR(l[1], 1.5, 1e-6, "y = -1: %g", (double)l[1]);
  NEAR(l[2], 0.0, 1e-7, "y = -1, cos -1 < margin: %g", (double)l[2]);
  /* any other target: loss 0, gradient 0 (torch's where) */
  cr_assert_eq(culoss_cosine_embedding(ctx, &o, 3, 2, CULOSS_F32, a, b, 2, y0, l, g1, g2, NULL),
               CULOSS_OK);
  for (int i = 0; i < 3; i++)
    cr_assert_eq(l[i], 0.0f, "target %g: loss %g", (double)y0[i], (double)l[i]);
  for (int i = 0; i < 6; i++) cr_assert(g1[i] == 0.0f && g2[i] == 0.0f);
  /* zero vectors: cos = 0 / 1e-12 = 0, as torch's + 1e-12 */
  const float z[2] = {0, 0};
  cr_assert_eq(culoss_cosine_embedding(ctx, &o, 1, 2, CULOSS_F32, z, z, 2, y1, l, g1, g2, NULL),
               CULOSS_OK);
  cr_assert_eq(l[0], 1.0f);
  cr_assert(g1[0] == 0.0f && g2[1] == 0.0f);
}

/* a = 0, p = (3, 4), q = (1, 0), eps 0: d(a, p) = 5, d(a, q) = 1,
   l = 5 - 1 + 1 = 5; grads a (0.4, -0.8), p (0.6, 0.8), q (-1, 0). */
Test(cpu_more, triplet_margin_hand_values) {
  const float a[2] = {0, 0}, p[2] = {3, 4}, q[2] = {1, 0};
  float l, ga[2], gp[2], gq[2];
  culoss_triplet_margin_options o;
  culoss_triplet_margin_options_init(&o);
  cr_assert(o.margin == 1.0f && o.p == 2.0f && o.eps == 1e-6f && o.swap == 0);
  o.eps = 0.0f, o.reduction = CULOSS_REDUCTION_SUM;
  cr_assert_eq(culoss_triplet_margin(ctx, &o, 1, 2, CULOSS_F32, a, p, q, 2, &l, ga, gp, gq, NULL),
               CULOSS_OK);
  NEAR(l, 5.0, 1e-6, "loss %g", (double)l);
  const float wa[2] = {0.4f, -0.8f}, wp[2] = {0.6f, 0.8f}, wq[2] = {-1, 0};
  for (int j = 0; j < 2; j++) {
    NEAR(ga[j], wa[j], 1e-6, "ga[%d] %g", j, (double)ga[j]);
    NEAR(gp[j], wp[j], 1e-6, "gp[%d] %g", j, (double)gp[j]);
    NEAR(gq[j], wq[j], 1e-6, "gq[%d] %g", j, (double)gq[j]);
  }
  /* p = 1: d(a, p) = 7, d(a, q) = 1 -> 7; grad a = sign(a - p) - sign(a - q) */
  o.p = 1.0f;
  cr_assert_eq(
      culoss_triplet_margin(ctx, &o, 1, 2, CULOSS_F32, a, p, q, 2, &l, ga, NULL, NULL, NULL),
      CULOSS_OK);
  NEAR(l, 7.0, 1e-6, "p = 1: %g", (double)l);
  NEAR(ga[0], 0.0, 0, "p = 1 ga[0] %g", (double)ga[0]);
  NEAR(ga[1], -1.0, 0, "p = 1 ga[1] %g", (double)ga[1]);
  /* swap: q closer to p than to a makes d(p, q) the negative distance */
  const float q2[2] = {3, 3.5f}; /* d(a, q) = 4.61, d(p, q) = 0.5 */
  o.p = 2.0f, o.swap = 1;
  cr_assert_eq(culoss_triplet_margin(ctx, &o, 1, 2, CULOSS_F32, a, p, q2, 2, &l, ga, gp, gq, NULL),
               CULOSS_OK);
  NEAR(l, 5.0 - 0.5 + 1.0, 1e-6, "swap: %g", (double)l);
  /* d(p, q) does not depend on a: grad a = (a - p) / 5 */
  NEAR(ga[0], -0.6, 1e-6, "swap ga %g", (double)ga[0]);
  o.swap = 0;
  cr_assert_eq(
      culoss_triplet_margin(ctx, &o, 1, 2, CULOSS_F32, a, p, q2, 2, &l, NULL, NULL, NULL, NULL),
      CULOSS_OK);
  NEAR(l, 5.0 - sqrt(9.0 + 12.25) + 1.0, 1e-6, "no swap: %g", (double)l);
  /* inactive (d(a, q) large): loss 0, gradients 0; the kink gives 0 too */
  const float far[2] = {100, 0};
  cr_assert_eq(culoss_triplet_margin(ctx, &o, 1, 2, CULOSS_F32, a, p, far, 2, &l, ga, gp, gq, NULL),
               CULOSS_OK);
  cr_assert(l == 0.0f && ga[0] == 0.0f && gp[1] == 0.0f && gq[0] == 0.0f);
  const float kink[2] = {6, 0}; /* d(a, q) = 6 = 5 + 1 */
  cr_assert_eq(
      culoss_triplet_margin(ctx, &o, 1, 2, CULOSS_F32, a, p, kink, 2, &l, ga, gp, gq, NULL),
      CULOSS_OK);
  cr_assert(l == 0.0f && ga[0] == 0.0f && gq[0] == 0.0f, "kink: %g %g", (double)l, (double)ga[0]);
  /* a = p with eps 0: a zero distance contributes no gradient */
  cr_assert_eq(culoss_triplet_margin(ctx, &o, 1, 2, CULOSS_F32, a, a, q, 2, &l, ga, gp, gq, NULL),
               CULOSS_OK);
  NEAR(l, 0.0 - 1.0 + 1.0, 0, "a = p, d(a, q) = 1: %g", (double)l);
}

/* torch 2.15, float64: F.multilabel_soft_margin_loss(x, y, weight=w,
   reduction='none') and the gradient of its sum */
Test(cpu_more, multilabel_soft_margin_hand_values) {
  const float x[6] = {1, -2, 0.5f, 0, 3, -1}, y[6] = {1, 0, 1, 0, 1, 0.5f}, w[3] = {1, 2, 0.5f};
  const double wl[2] = {0.2680520672, 0.3989842425};
  float l4[4];
  const double wg[6] = {-0.0896471405, 0.0794686147,  -0.0629234448,
                        0.1666666667,  -0.0316172488, -0.0385097631};
  float l[2], g[6], s;
  culoss_multilabel_soft_margin_options o;
  culoss_multilabel_soft_margin_options_init(&o);
  cr_assert(o.reduction == CULOSS_REDUCTION_MEAN && o.weight == NULL && o.weight_per_row == 0);
  o.reduction = CULOSS_REDUCTION_NONE, o.weight = w;
  cr_assert_eq(culoss_multilabel_soft_margin(ctx, &o, 2, 3, CULOSS_F32, x, y, 3, l, g, NULL),
               CULOSS_OK);
  for (int i = 0; i < 2; i++) NEAR(l[i], wl[i], 1e-7, "loss[%d] %.9g", i, (double)l[i]);
  for (int i = 0; i < 6; i++) NEAR(g[i], wg[i], 1e-7, "grad[%d] %.9g", i, (double)g[i]);
  /* a weight per element equal to the class weights gives the same; MEAN
     divides by the rows */
  const float we[6] = {1, 2, 0.5f, 1, 2, 0.5f};
  o.weight = we, o.weight_per_row = 1, o.reduction = CULOSS_REDUCTION_MEAN;
  cr_assert_eq(culoss_multilabel_soft_margin(ctx, &o, 2, 3, CULOSS_F32, x, y, 3, &s, g, NULL),
               CULOSS_OK);
  NEAR(s, (wl[0] + wl[1]) / 2, 1e-7, "mean %.9g", (double)s);
  for (int i = 0; i < 6; i++) NEAR(g[i], wg[i] / 2, 1e-7, "mean grad[%d]", i);
  /* overflow-free: x = +-200 gives 200-sized losses, not inf */
  const float big[2] = {200, -200}, yb[2] = {0, 1};
  o.weight = NULL, o.weight_per_row = 0, o.reduction = CULOSS_REDUCTION_NONE;
  cr_assert_eq(culoss_multilabel_soft_margin(ctx, &o, 1, 2, CULOSS_F32, big, yb, 2, l, g, NULL),
               CULOSS_OK);
  NEAR(l[0], 200.0, 1e-4, "softplus(200) + softplus(200) over 2: %g", (double)l[0]);
  NEAR(g[0], 0.5, 1e-7, "grad %g", (double)g[0]);
  NEAR(g[1], -0.5, 1e-7, "grad %g", (double)g[1]);
  /* infinite logits as torch 2.15: (+inf, 0) and (-inf, 1) give inf,
     (+inf, 1) and (-inf, 0) NaN */
  const float xi[4] = {INFINITY, -INFINITY, INFINITY, -INFINITY}, yi[4] = {0, 1, 1, 0};
  cr_assert_eq(culoss_multilabel_soft_margin(ctx, &o, 4, 1, CULOSS_F32, xi, yi, 1, l4, NULL, NULL),
               CULOSS_OK);
  cr_assert(isinf(l4[0]) && l4[0] > 0 && isinf(l4[1]) && l4[1] > 0 && isnan(l4[2]) && isnan(l4[3]),
            "%g %g %g %g", (double)l4[0], (double)l4[1], (double)l4[2], (double)l4[3]);
  /* bad options */
  o.weight_per_row = 2;
  cr_assert_eq(culoss_multilabel_soft_margin(ctx, &o, 2, 3, CULOSS_F32, x, y, 3, l, g, NULL),
               CULOSS_ERROR_INVALID_VALUE);
  o.weight_per_row = 1;
  cr_assert_eq(culoss_multilabel_soft_margin(ctx, &o, 2, 3, CULOSS_F32, x, y, 3, l, g, NULL),
               CULOSS_ERROR_INVALID_VALUE, "weight_per_row without a weight");
  cr_assert(strstr(culoss_last_error(), "without a weight") != NULL, "%s", culoss_last_error());
  o.weight_per_row = 0;
  cr_assert_eq(culoss_multilabel_soft_margin(ctx, &o, 2, 3, CULOSS_F32, x, NULL, 3, l, g, NULL),
               CULOSS_ERROR_INVALID_VALUE);
  cr_assert(strstr(culoss_last_error(), "target is NULL") != NULL, "%s", culoss_last_error());
  cr_assert_eq(
      culoss_multilabel_soft_margin(ctx, &o, 2, 3, CULOSS_F32, x, y, 3, l, (void *)y, NULL),
      CULOSS_ERROR_INVALID_VALUE, "the gradient over the targets");
}

/* torch 2.15: F.multilabel_margin_loss([[.1, .2, .4, .8]], [[3, 0, -1, 1]])
   = 0.85, grad (-0.5, 0.5, 0.5, -0.5); a listed class twice counts twice;
   a NaN score's pairs add nothing (torch: 0.475, grad (-0.25, 0, 0.5,
   -0.25) with x_1 = NaN); an empty list gives 0 */
Test(cpu_more, multilabel_margin_hand_values) {
  const float x[12] = {0.1f, 0.2f, 0.4f, 0.8f, 0.1f, 0.2f, 0.4f, 0.8f, 0.1f, NAN, 0.4f, 0.8f};
  const int64_t t[12] = {3, 0, -1, 1, 1, 1, -1, 0, 3, 0, -1, 1};
  const int32_t t32[12] = {3, 0, -1, 1, 1, 1, -1, 0, 3, 0, -1, 1};
  const float wl[3] = {0.85f, 1.85f, 0.475f};
  const float wg[12] = {-0.5f, 0.5f, 0.5f, -0.5f, 0.5f, -1.5f, 0.5f, 0.5f, -0.25f, 0, 0.5f, -0.25f};
  float l[3], g[12], s;
  culoss_multilabel_margin_options o;
  culoss_multilabel_margin_options_init(&o);
  cr_assert_eq(o.reduction, CULOSS_REDUCTION_MEAN);
  o.reduction = CULOSS_REDUCTION_NONE;
  for (int it = 0; it < 2; it++) {
    cr_assert_eq(culoss_multilabel_margin(ctx, &o, 3, 4, CULOSS_F32, x, 4,
                                          it ? CULOSS_I32 : CULOSS_I64,
                                          it ? (const void *)t32 : (const void *)t, l, g, NULL),
                 CULOSS_OK, "%s", culoss_last_error());
    for (int i = 0; i < 3; i++) NEAR(l[i], wl[i], 1e-6, "loss[%d] %.9g", i, (double)l[i]);
    for (int i = 0; i < 12; i++) NEAR(g[i], wg[i], 1e-6, "grad[%d] %.9g", i, (double)g[i]);
  }
  const int64_t none[4] = {-1, 2, 3, 0};
  o.reduction = CULOSS_REDUCTION_SUM;
  cr_assert_eq(
      culoss_multilabel_margin(ctx, &o, 1, 4, CULOSS_F32, x, 4, CULOSS_I64, none, &s, g, NULL),
      CULOSS_OK);
  cr_assert(s == 0.0f && g[0] == 0.0f && g[3] == 0.0f, "an empty list: %g", (double)s);
  /* every entry is checked, after the -1 too (as torch); nothing written */
  const int64_t bad[4] = {3, -1, 2, -2};
  poison(l, sizeof l);
  cr_assert_eq(
      culoss_multilabel_margin(ctx, &o, 1, 4, CULOSS_F32, x, 4, CULOSS_I64, bad, l, g, NULL),
      CULOSS_ERROR_TARGET_OUT_OF_RANGE);
  cr_assert(is_poison_f32(l[0]));
  cr_assert_eq(culoss_multilabel_margin(ctx, &o, 1, 4, CULOSS_F32, x, 3, CULOSS_I64, t, l, g, NULL),
               CULOSS_ERROR_INVALID_VALUE, "ld < c");
  cr_assert_eq(culoss_multilabel_margin(ctx, &o, 1, 4, CULOSS_F32, x, 4, (culoss_index_type)7, t, l,
                                        g, NULL),
               CULOSS_ERROR_INVALID_VALUE);
  cr_assert_eq(
      culoss_multilabel_margin(ctx, &o, 1, 4, CULOSS_F32, x, 4, CULOSS_I64, NULL, l, g, NULL),
      CULOSS_ERROR_INVALID_VALUE);
  cr_assert(strstr(culoss_last_error(), "targets is NULL") != NULL, "%s", culoss_last_error());
}

/* Each gradient against central differences of the reference's own loss
   (SUM with a random upstream gradient), on random inputs. */
Test(cpu_more, gradients_match_finite_differences) {
  rng_t r = rng_seeded(11);
  for (int k = 0; k < L_NUM; k++)
    for (int v = 0; v < 3; v++) {
      const int rows = l_rows((l_kind)k);
      const int64_t n = rows ? 3 : 8, d = rows ? 5 : 1, m = n * d;
      l_opts o = l_defaults((l_kind)k, CULOSS_REDUCTION_SUM);
      if (k == L_MRANK) o.margin = 0.3f;
      if (k == L_GAUSS) o.full = v == 1, o.eps = v == 2 ? 0.5f : 1e-6f;
      if (k == L_COSINE) o.margin = -0.2f;
      if (k == L_TRIPLET)
        o.p = v == 0 ? 2.0f : (v == 1 ? 3.0f : 1.5f), o.swap = v > 0, o.margin = 3.0f;
      float *x[3], yt[3] = {1, -1, 1}, gl = 0.7f;
      double *xd[3];
      for (int q = 0; q < 3; q++) {
        x[q] = malloc((size_t)m * 4);
        xd[q] = malloc((size_t)m * sizeof(double));
        for (int64_t e = 0; e < m; e++) x[q][e] = (float)rng_normal(&r);
      }
      if (k == L_MRANK)
        for (int64_t e = 0; e < m; e++) x[2][e] = e % 2 ? 1.0f : -1.0f;
      if (k == L_GAUSS)
        for (int64_t e = 0; e < m; e++) x[1][e] = (float)(0.5 + rng_uniform(&r));
      float *g[3];
      for (int q = 0; q < 3; q++) g[q] = malloc((size_t)m * 4);
      const void *in[3] = {x[0], x[1], x[2]};
      void *gp[3] = {g[0], g[1], k == L_TRIPLET ? g[2] : NULL};
      float base;
      cr_assert_eq(l_call(ctx, (l_kind)k, &o, n, d, d, CULOSS_F32, in, yt, &base, gp, &gl),
                   CULOSS_OK, "%s", culoss_last_error());
      for (int q = 0; q < l_ninputs((l_kind)k); q++)
        for (int64_t e = 0; e < m; e++) {
          const float keep = x[q][e], h = 1e-2f * fmaxf(1.0f, fabsf(keep));
          float lp, lm;
          void *none[3] = {NULL, NULL, NULL};
          x[q][e] = keep + h;
          l_call(ctx, (l_kind)k, &o, n, d, d, CULOSS_F32, in, yt, &lp, none, NULL);
          x[q][e] = keep - h;
          l_call(ctx, (l_kind)k, &o, n, d, d, CULOSS_F32, in, yt, &lm, none, NULL);
          x[q][e] = keep;
          const double fd = gl * ((double)lp - (double)lm) / (2.0 * (double)h);
          cr_assert(fabs(fd - g[q][e]) <= 2e-3 * (1.0 + fabs(fd)),
                    "%s v=%d input %d [%lld]: grad %.6g, finite difference %.6g", l_name[k], v, q,
                    (long long)e, (double)g[q][e], fd);
        }
      for (int q = 0; q < 3; q++) free(x[q]), free(xd[q]), free(g[q]);
    }
}

/* Every bad argument: INVALID_VALUE naming it, the loss not written. */
Test(cpu_more, bad_arguments_are_named_and_write_nothing) {
  float a[8] = {1, 2, 3, 4, 5, 6, 7, 8}, b[8] = {1, 1, 1, 1, 1, 1, 1, 1}, c[8] = {0};
  float yt[2] = {1, -1}, l[2], g[8], g2[8];
  struct {
    l_kind k;
    int64_t n, d, ld;
    int dt;
    int field; /* what to break */
    const char *want;
  } cases[] = {
      {L_COSINE, -1, 4, 4, 0, 0, "n = -1"},
      {L_COSINE, 2, 0, 0, 0, 0, "c = 0"},
      {L_TRIPLET, 2, 4, 3, 0, 0, "ld = 3"},
      {L_TRIPLET, 2, 4, 4, 9, 0, "dtype"},
      {L_COSINE, 2, 4, 4, 0, 1, "reduction"},
      {L_TRIPLET, 2, 4, 4, 0, 2, "loss is NULL"},
      {L_COSINE, 2, 4, 4, 0, 3, "input2 is NULL"},
      {L_COSINE, 2, 4, 4, 0, 4, "target is NULL"},
      {L_TRIPLET, 2, 4, 4, 0, 3, "positive is NULL"},
      {L_TRIPLET, 2, 4, 4, 0, 5, "margin"},
      {L_TRIPLET, 2, 4, 4, 0, 6, "p = 0.5"},
      {L_TRIPLET, 2, 4, 4, 0, 7, "p = inf"},
      {L_TRIPLET, 2, 4, 4, 0, 8, "eps"},
      {L_TRIPLET, 2, 4, 4, 0, 9, "swap = 2"},
      {L_COSINE, 2, 4, 4, 0, 10, "margin"},
      {L_TRIPLET, 2, 4, 4, 0, 11, "aliases"},
      {L_COSINE, 2, 4, 4, 0, 12, "one buffer"},
      {L_MRANK, 8, 1, 1, 0, 3, "input2 is NULL"},
      {L_MRANK, 8, 1, 1, 0, 10, "margin"},
      {L_GAUSS, 8, 1, 1, 0, 3, "var is NULL"},
      {L_GAUSS, 8, 1, 1, 0, 13, "full = 2"},
      {L_GAUSS, 8, 1, 1, 0, 14, "eps = -1"},
      {L_GAUSS, 8, 1, 1, 0, 1, "reduction"},
      {L_MRANK, -2, 1, 1, 0, 0, "n = -2"},
      {L_MRANK, 8, 1, 1, 0, 12, "one buffer"},
      {L_GAUSS, 8, 1, 1, 0, 12, "one buffer"},
      {L_MLSOFT, 2, 4, 4, 0, 3, "target is NULL"},
      {L_MLSOFT, 2, 4, 4, 0, 15, "weight_per_row = 3"},
      {L_MLSOFT, 2, 4, 4, 0, 16, "without a weight"},
      {L_MLSOFT, 2, 4, 4, 0, 11, "aliases"},
      {L_MLSOFT, 2, 4, 2, 0, 0, "ld = 2"},
  };
  for (size_t t = 0; t < sizeof cases / sizeof cases[0]; t++) {
    l_opts o = l_defaults(cases[t].k, CULOSS_REDUCTION_NONE);
    const void *in[3] = {a, b, c};
    void *gp[3] = {g, g2, NULL};
    const float *ytp = yt;
    float *lp = l;
    switch (cases[t].field) {
    case 1: o.red = CULOSS_REDUCTION_BATCHMEAN; break;
    case 2: lp = NULL; break;
    case 3: in[1] = NULL; break;
    case 4: ytp = NULL; break;
    case 5: o.margin = 0.0f; break;
    case 6: o.p = 0.5f; break;
    case 7: o.p = INFINITY; break;
    case 8: o.eps = NAN; break;
    case 9: o.swap = 2; break;
    case 10: o.margin = INFINITY; break;
    case 11: gp[0] = b; break; /* the anchor's gradient over the positive */
    case 12: gp[1] = g; break;
    case 13: o.full = 2; break;
    case 14: o.eps = -1.0f; break;
    case 15: o.weight_per_row = 3; break;
    case 16: o.weight_per_row = 1; break;
    default: break;
    }
    poison(l, sizeof l), poison(g, sizeof g), poison(g2, sizeof g2);
    const culoss_status st = l_call(ctx, cases[t].k, &o, cases[t].n, cases[t].d, cases[t].ld,
                                    (culoss_dtype)cases[t].dt, in, ytp, lp, gp, NULL);
    cr_assert_eq(st, CULOSS_ERROR_INVALID_VALUE, "case %zu (%s): status %d", t, cases[t].want, st);
    cr_assert(strstr(culoss_last_error(), cases[t].want) != NULL, "case %zu: '%s' lacks '%s'", t,
              culoss_last_error(), cases[t].want);
    cr_assert(is_poison_f32(l[0]) && is_poison_f32(l[1]), "case %zu wrote the loss", t);
    for (int e = 0; e < 8; e++)
      cr_assert(is_poison_f32(g[e]) && is_poison_f32(g2[e]), "case %zu wrote a gradient", t);
  }
  l_opts o = l_defaults(L_COSINE, CULOSS_REDUCTION_MEAN);
  const void *in[3] = {a, b, c};
  void *gp[3] = {NULL, NULL, NULL};
  cr_assert_eq(l_call(NULL, L_COSINE, &o, 2, 4, 4, CULOSS_F32, in, yt, l, gp, NULL),
               CULOSS_ERROR_INVALID_VALUE);
  /* NULL options: the defaults */
  float l1, l2;
  cr_assert_eq(
      culoss_triplet_margin(ctx, NULL, 2, 4, CULOSS_F32, a, b, c, 4, &l1, NULL, NULL, NULL, NULL),
      CULOSS_OK);
  cr_assert_eq(l_call(ctx, L_TRIPLET,
                      &(l_opts){CULOSS_REDUCTION_MEAN, 1.0f, 2.0f, 1e-6f, 0, 0, NULL, 0}, 2, 4, 4,
                      CULOSS_F32, in, yt, &l2, gp, NULL),
               CULOSS_OK);
  cr_assert_eq(l1, l2);
}

/* NaN semantics: a NaN input gives a NaN loss (clamp_min keeps it); the
   margin ranking gradient there is 0 (its mask), as torch's. */
Test(cpu_more, nan_inputs_propagate_as_torch) {
  const float x1[2] = {NAN, 1}, x2[2] = {0, 0}, y[2] = {1, 1};
  float l[2], g[2], s;
  culoss_margin_ranking_options o;
  culoss_margin_ranking_options_init(&o);
  o.reduction = CULOSS_REDUCTION_NONE;
  cr_assert_eq(culoss_margin_ranking(ctx, &o, 2, CULOSS_F32, x1, x2, y, l, g, NULL, NULL),
               CULOSS_OK);
  cr_assert(isnan(l[0]) && g[0] == 0.0f && l[1] == 0.0f);
  o.reduction = CULOSS_REDUCTION_SUM;
  cr_assert_eq(culoss_margin_ranking(ctx, &o, 2, CULOSS_F32, x1, x2, y, &s, NULL, NULL, NULL),
               CULOSS_OK);
  cr_assert(isnan(s));
  const float a[4] = {NAN, 0, 1, 1}, p[4] = {0, 0, 1, 1}, q[4] = {1, 1, 0, 0};
  culoss_triplet_margin_options t;
  culoss_triplet_margin_options_init(&t);
  t.reduction = CULOSS_REDUCTION_NONE;
  cr_assert_eq(
      culoss_triplet_margin(ctx, &t, 2, 2, CULOSS_F32, a, p, q, 2, l, NULL, NULL, NULL, NULL),
      CULOSS_OK);
  cr_assert(isnan(l[0]) && !isnan(l[1]));
}

/* n = 0 with reduction NONE: the loss has no elements and may be NULL, in
   every family (culoss.torch passes NULL for an empty tensor); any other
   reduction still needs it. */
Test(cpu_more, empty_none_loss_may_be_null) {
  culoss_cross_entropy_options ce;
  culoss_cross_entropy_options_init(&ce);
  ce.reduction = CULOSS_REDUCTION_NONE;
  cr_assert_eq(
      culoss_cross_entropy(ctx, &ce, 0, 5, CULOSS_F32, NULL, 5, CULOSS_I64, NULL, NULL, NULL, NULL),
      CULOSS_OK, "%s", culoss_last_error());
  culoss_regression_options r;
  culoss_regression_options_init(&r);
  r.reduction = CULOSS_REDUCTION_NONE;
  cr_assert_eq(culoss_mse(ctx, &r, 0, CULOSS_F32, NULL, NULL, NULL, NULL, NULL), CULOSS_OK);
  culoss_multi_margin_options mm;
  culoss_multi_margin_options_init(&mm);
  mm.reduction = CULOSS_REDUCTION_NONE;
  cr_assert_eq(
      culoss_multi_margin(ctx, &mm, 0, 5, CULOSS_F32, NULL, 5, CULOSS_I64, NULL, NULL, NULL, NULL),
      CULOSS_OK);
  for (int k = 0; k < L_NUM; k++) {
    l_opts o = l_defaults((l_kind)k, CULOSS_REDUCTION_NONE);
    const void *in[3] = {NULL, NULL, NULL};
    void *g[3] = {NULL, NULL, NULL};
    cr_assert_eq(l_call(ctx, (l_kind)k, &o, 0, 4, 4, CULOSS_F32, in, NULL, NULL, g, NULL),
                 CULOSS_OK, "%s: %s", l_name[k], culoss_last_error());
    o.red = CULOSS_REDUCTION_SUM;
    cr_assert_eq(l_call(ctx, (l_kind)k, &o, 0, 4, 4, CULOSS_F32, in, NULL, NULL, g, NULL),
                 CULOSS_ERROR_INVALID_VALUE, "%s: SUM writes loss[0]", l_name[k]);
  }
  r.reduction = CULOSS_REDUCTION_MEAN;
  cr_assert_eq(culoss_mse(ctx, &r, 0, CULOSS_F32, NULL, NULL, NULL, NULL, NULL),
               CULOSS_ERROR_INVALID_VALUE);
}
