/* test_cpu_distill.c: the CPU backend of the distillation losses
   (culoss_distill, culoss_linear_distill) against TRL's formula written out
   in long double (distill_oracle.h), hand-computed values, finite
   differences, the hard term against culoss_cross_entropy, -inf teacher
   logits, confident rows, labels and every reduction, every bad argument
   (a named error, nothing written), and the linear form's memory at
   n = 1024, v = 131072. */
#define _POSIX_C_SOURCE 200809L /* setenv */
#include <criterion/criterion.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>

#include "distill_oracle.h"
#include "helpers.h"

static culoss_context *ctx;
static void setup(void) { cr_assert_eq(culoss_create(&ctx, CULOSS_BACKEND_CPU, 0), CULOSS_OK); }
static void teardown(void) { culoss_destroy(ctx); }
TestSuite(cpu_distill, .init = setup, .fini = teardown);

static const float BETAS[] = {0.0f, 0.25f, 0.5f, 1.0f};

static culoss_distill_options opts(int tvd, float beta, float T, culoss_reduction red) {
  culoss_distill_options o;
  culoss_distill_options_init(&o);
  o.divergence = tvd ? CULOSS_DISTILL_TVD : CULOSS_DISTILL_JSD;
  o.beta = beta, o.temperature = T, o.reduction = red;
  return o;
}

Test(cpu_distill, defaults) {
  culoss_distill_options o;
  memset(&o, 0xff, sizeof o);
  culoss_distill_options_init(&o);
  cr_assert_eq(o.divergence, CULOSS_DISTILL_JSD);
  cr_assert_eq(o.beta, 0.5f);
  cr_assert_eq(o.temperature, 1.0f);
  cr_assert_eq(o.reduction, CULOSS_REDUCTION_BATCHMEAN);
  cr_assert_eq(o.ignore_index, -100);
  cr_assert_eq(o.weight_soft, 1.0f);
  cr_assert_eq(o.weight_hard, 0.0f);
  culoss_distill_options_init(NULL); /* no crash */
}

/* By hand: s = [0, 0], t = [log 3, 0] (P = [3/4, 1/4], Q = [1/2, 1/2]).
   forward KL = 3/4 log(3/2) + 1/4 log(1/2); reverse KL = 1/2 log(2/3) +
   1/2 log 2; M(1/2) = [5/8, 3/8]: JSD = 1/2 (3/4 log(6/5) + 1/4 log(2/3))
   + 1/2 (1/2 log(4/5) + 1/2 log(4/3)); TVD = 1/4. Forward KL's gradient
   Q - P = [-1/4, 1/4]; TVD's (1/T) Q (g - sum Q g), g = sign(Q - P) / 2 =
   [-1/2, 1/2]: [-1/4, 1/4]. */
Test(cpu_distill, hand_values) {
  const float s[2] = {0.0f, 0.0f}, t[2] = {logf(3.0f), 0.0f};
  const double want[4] = {0.75 * log(1.5) + 0.25 * log(0.5),
                          0.5 * (0.75 * log(6.0 / 5.0) + 0.25 * log(2.0 / 3.0)) +
                              0.5 * (0.5 * log(0.8) + 0.5 * log(4.0 / 3.0)),
                          0.5 * log(2.0 / 3.0) + 0.5 * log(2.0), 0.25};
  const float betas[3] = {0.0f, 0.5f, 1.0f};
  for (int k = 0; k < 4; k++) {
    culoss_distill_options o = opts(k == 3, k < 3 ? betas[k] : 0.0f, 1.0f, CULOSS_REDUCTION_SUM);
    float l, g[2];
    cr_assert_eq(
        culoss_distill(ctx, &o, 1, 2, CULOSS_F32, s, 2, t, 2, CULOSS_I64, NULL, &l, g, NULL),
        CULOSS_OK, "%s", culoss_last_error());
    cr_assert(fabs(l - want[k]) <= 1e-7 * fabs(want[k]), "case %d: %.9g vs %.9g", k, (double)l,
              want[k]);
    if (k == 0 || k == 3) {
      /* t = log 3 rounds in fp32: P_0 = 3/4 to 1e-7 */
      cr_assert(fabs(g[0] + 0.25) < 1e-7 && fabs(g[1] - 0.25) < 1e-7, "case %d: g = %g %g", k,
                (double)g[0], (double)g[1]);
    }
    cr_assert(fabs((double)g[0] + g[1]) < 1e-7, "softmax gradients sum to 0");
  }
}

/* Random rows (large magnitudes, -inf teacher and student entries) against
   the long-double oracle: every beta, TVD, temperatures, labels with
   ignored rows, every reduction. */
Test(cpu_distill, matches_the_oracle_on_random_rows) {
  const int64_t n = 9, v = 37, ld = 41;
  const float temps[3] = {1.0f, 2.0f, 0.5f};
  rng_t r = rng_seeded(2101);
  float *s = malloc(n * ld * 4), *t = malloc(n * ld * 4), *g = malloc(n * ld * 4);
  long double lp[37], lq[37], og[37];
  int64_t labels[9];
  for (int tvd = 0; tvd < 2; tvd++)
    for (int b = 0; b < (tvd ? 1 : 4); b++)
      for (int ti = 0; ti < 3; ti++)
        for (int red = 0; red < 4; red++) {
          fill_logits(&r, s, n, v, ld, 2.0, 1, NULL);
          fill_logits(&r, t, n, v, ld, 2.0, 1, NULL);
          for (int64_t i = 0; i < n; i++) {
            labels[i] = rng_uniform(&r) < 0.3 ? -100 : rng_int(&r, 0, v);
            for (int64_t j = 0; j < v; j++) /* keep the gradient's terms finite */
              if (s[i * ld + j] == -INFINITY && t[i * ld + j] != -INFINITY) s[i * ld + j] = -30.0f;
            if (!tvd && b == 3)
              for (int64_t j = 0; j < v; j++)
                if (t[i * ld + j] == -INFINITY) t[i * ld + j] = -25.0f; /* reverse KL: finite */
          }
          culoss_distill_options o = opts(tvd, BETAS[b], temps[ti], (culoss_reduction)red);
          float loss[9];
          poison(g, n * ld * 4);
          poison(loss, sizeof loss);
          cr_assert_eq(culoss_distill(ctx, &o, n, v, CULOSS_F32, s, ld, t, ld, CULOSS_I64, labels,
                                      loss, g, NULL),
                       CULOSS_OK, "%s", culoss_last_error());
          long double total = 0.0L;
          int64_t kept = 0;
          for (int64_t i = 0; i < n; i++) kept += labels[i] != -100;
          const double D = red == CULOSS_REDUCTION_BATCHMEAN ? (double)kept
                           : red == CULOSS_REDUCTION_MEAN    ? (double)(n * v)
                                                             : 1.0;
          for (int64_t i = 0; i < n; i++) {
            const int ign = labels[i] == -100;
            const long double l =
                ign ? 0.0L
                    : oracle_row(tvd, BETAS[b], temps[ti], v, s + i * ld, t + i * ld, lp, lq, og);
            total += l;
            if (red == CULOSS_REDUCTION_NONE)
              cr_assert(fabsl(loss[i] - l) <= 2e-6L * (1e-3L + fabsl(l)),
                        "tvd %d beta %g T %g row %lld: %.9g vs %.9Lg", tvd, (double)BETAS[b],
                        (double)temps[ti], (long long)i, (double)loss[i], l);
            for (int64_t j = 0; j < v; j++) {
              const long double want = ign ? 0.0L : og[j] / (red == 0 ? 1.0L : D);
              cr_assert(fabsl(g[i * ld + j] - want) <= 1e-6L * (1e-4L + fabsl(want)),
                        "tvd %d beta %g T %g red %d grad[%lld][%lld]: %.9g vs %.9Lg", tvd,
                        (double)BETAS[b], (double)temps[ti], red, (long long)i, (long long)j,
                        (double)g[i * ld + j], want);
            }
            for (int64_t j = v; j < ld; j++)
              cr_assert(is_poison_f32(g[i * ld + j]), "padding [%lld][%lld] was written",
                        (long long)i, (long long)j);
          }
          if (red != CULOSS_REDUCTION_NONE) {
            const long double want = total / D;
            cr_assert(fabsl(loss[0] - want) <= 2e-6L * (1e-3L + fabsl(want)),
                      "tvd %d beta %g red %d: %.9g vs %.9Lg", tvd, (double)BETAS[b], red,
                      (double)loss[0], want);
          }
        }
  free(s), free(t), free(g);
}

/* Central differences of the oracle's loss with respect to each student
   logit against the library's gradient: the closed form itself is checked. */
Test(cpu_distill, gradient_matches_finite_differences) {
  const int64_t v = 11;
  rng_t r = rng_seeded(2102);
  float s[11], t[11], g[11];
  long double lp[11], lq[11];
  for (int tvd = 0; tvd < 2; tvd++)
    for (int b = 0; b < (tvd ? 1 : 4); b++) {
      for (int64_t j = 0; j < v; j++) s[j] = (float)rng_normal(&r), t[j] = (float)rng_normal(&r);
      culoss_distill_options o = opts(tvd, BETAS[b], 1.5f, CULOSS_REDUCTION_SUM);
      float l;
      cr_assert_eq(
          culoss_distill(ctx, &o, 1, v, CULOSS_F32, s, v, t, v, CULOSS_I64, NULL, &l, g, NULL),
          CULOSS_OK);
      for (int64_t j = 0; j < v; j++) {
        const long double h = 1e-4L;
        float sp[11], sm[11];
        memcpy(sp, s, sizeof s), memcpy(sm, s, sizeof s);
        /* the oracle takes float rows: difference in long double by hand */
        long double lpl, lmi;
        {
          long double xs[2][11];
          for (int q = 0; q < 2; q++)
            for (int64_t k = 0; k < v; k++) xs[q][k] = s[k];
          xs[0][j] += h, xs[1][j] -= h;
          long double val[2];
          for (int q = 0; q < 2; q++) {
            /* log-softmaxes of the shifted row, then the divergence */
            long double m = -INFINITY, z = 0.0L;
            for (int64_t k = 0; k < v; k++) m = fmaxl(m, xs[q][k] / 1.5L);
            for (int64_t k = 0; k < v; k++) z += expl(xs[q][k] / 1.5L - m);
            for (int64_t k = 0; k < v; k++) lq[k] = xs[q][k] / 1.5L - m - logl(z);
            oracle_log_softmax(v, t, 1.5L, lp);
            long double acc = 0.0L;
            for (int64_t k = 0; k < v; k++) {
              const long double P = expl(lp[k]), Q = expl(lq[k]), be = BETAS[b];
              if (tvd)
                acc += 0.5L * fabsl(P - Q);
              else if (be == 0.0L)
                acc += P * (lp[k] - lq[k]);
              else if (be == 1.0L)
                acc += Q * (lq[k] - lp[k]);
              else {
                const long double lm = logl(be * P + (1.0L - be) * Q);
                acc += be * P * (lp[k] - lm) + (1.0L - be) * Q * (lq[k] - lm);
              }
            }
            val[q] = acc;
          }
          lpl = val[0], lmi = val[1];
        }
        (void)sp, (void)sm;
        const long double fd = (lpl - lmi) / (2.0L * h);
        cr_assert(fabsl(g[j] - fd) <= 1e-6L + 1e-5L * fabsl(fd),
                  "tvd %d beta %g: grad[%lld] = %.9g, finite difference %.9Lg", tvd,
                  (double)BETAS[b], (long long)j, (double)g[j], fd);
      }
    }
}

/* -inf teacher logits: P = 0 terms are 0 (no NaN), and the loss equals the
   row without those classes where the student is also -inf there. */
Test(cpu_distill, neg_inf_teacher_logits_contribute_nothing) {
  const float t[5] = {1.0f, -INFINITY, 0.5f, -INFINITY, -1.0f};
  const float s[5] = {0.2f, -INFINITY, 0.1f, -INFINITY, 0.4f};
  const float t3[3] = {1.0f, 0.5f, -1.0f}, s3[3] = {0.2f, 0.1f, 0.4f};
  for (int tvd = 0; tvd < 2; tvd++)
    for (int b = 0; b < (tvd ? 1 : 4); b++) {
      culoss_distill_options o = opts(tvd, BETAS[b], 1.0f, CULOSS_REDUCTION_SUM);
      float l5, l3, g5[5], g3[3];
      cr_assert_eq(
          culoss_distill(ctx, &o, 1, 5, CULOSS_F32, s, 5, t, 5, CULOSS_I64, NULL, &l5, g5, NULL),
          CULOSS_OK);
      cr_assert_eq(
          culoss_distill(ctx, &o, 1, 3, CULOSS_F32, s3, 3, t3, 3, CULOSS_I64, NULL, &l3, g3, NULL),
          CULOSS_OK);
      cr_assert(isfinite(l5) && fabsf(l5 - l3) <= 1e-7f * fabsf(l3), "tvd %d beta %g: %g vs %g",
                tvd, (double)BETAS[b], (double)l5, (double)l3);
      cr_assert(g5[1] == 0.0f && g5[3] == 0.0f);
      cr_assert(fabsf(g5[0] - g3[0]) <= 1e-7f && fabsf(g5[2] - g3[1]) <= 1e-7f &&
                fabsf(g5[4] - g3[2]) <= 1e-7f);
    }
  /* teacher -inf where the student is not: forward KL stays finite */
  const float s2[3] = {0.3f, 0.1f, -0.2f}, t2[3] = {0.0f, -INFINITY, 1.0f};
  long double lp[3], lq[3], og[3];
  culoss_distill_options o = opts(0, 0.0f, 1.0f, CULOSS_REDUCTION_SUM);
  float l, g[3];
  cr_assert_eq(
      culoss_distill(ctx, &o, 1, 3, CULOSS_F32, s2, 3, t2, 3, CULOSS_I64, NULL, &l, g, NULL),
      CULOSS_OK);
  const long double want = oracle_row(0, 0.0L, 1.0L, 3, s2, t2, lp, lq, og);
  cr_assert(fabsl(l - want) <= 1e-7L * want, "%g vs %Lg", (double)l, want);
  /* ... reverse KL is +inf there (KL(Q || P) with P = 0 < Q) */
  o.beta = 1.0f;
  cr_assert_eq(
      culoss_distill(ctx, &o, 1, 3, CULOSS_F32, s2, 3, t2, 3, CULOSS_I64, NULL, &l, g, NULL),
      CULOSS_OK);
  cr_assert(isinf(l) && l > 0);
  /* a row with no teacher distribution (all -inf) is NaN */
  const float tn[3] = {-INFINITY, -INFINITY, -INFINITY};
  o.beta = 0.5f;
  cr_assert_eq(
      culoss_distill(ctx, &o, 1, 3, CULOSS_F32, s2, 3, tn, 3, CULOSS_I64, NULL, &l, g, NULL),
      CULOSS_OK);
  cr_assert(isnan(l));
}

/* Confident rows (the top d logits ahead): the loss and gradient keep fp32
   accuracy where 1 + e^-d rounds to 1 (d >= 17). The oracle is accurate to
   1e-7 up to d ~ 30 (distill_oracle.h). */
Test(cpu_distill, confident_rows_keep_their_digits) {
  const float ds[4] = {12.0f, 18.0f, 24.0f, 28.0f};
  long double lp[4], lq[4], og[4];
  for (int k = 0; k < 4; k++)
    for (int tvd = 0; tvd < 2; tvd++)
      for (int b = 0; b < (tvd ? 1 : 4); b++) {
        const float d = ds[k];
        const float s[4] = {d, 0.0f, -1.0f, 0.5f}, t[4] = {d + 0.5f, 0.3f, -1.5f, 0.0f};
        culoss_distill_options o = opts(tvd, BETAS[b], 1.0f, CULOSS_REDUCTION_SUM);
        float l, g[4];
        cr_assert_eq(
            culoss_distill(ctx, &o, 1, 4, CULOSS_F32, s, 4, t, 4, CULOSS_I64, NULL, &l, g, NULL),
            CULOSS_OK);
        const long double want = oracle_row(tvd, BETAS[b], 1.0L, 4, s, t, lp, lq, og);
        cr_assert(want > 0.0L);
        cr_assert(fabsl(l - want) <= 1e-6L * want, "d %g tvd %d beta %g: %.9g vs %.9Lg", (double)d,
                  tvd, (double)BETAS[b], (double)l, want);
        for (int j = 0; j < 4; j++)
          cr_assert(fabsl(g[j] - og[j]) <= 1e-6L * fabsl(og[j]) + 1e-30L,
                    "d %g tvd %d beta %g grad[%d]: %.9g vs %.9Lg", (double)d, tvd, (double)BETAS[b],
                    j, (double)g[j], og[j]);
      }
}

/* The hard term alone is culoss_cross_entropy's mean over kept rows (and,
   with both weights, the sum of the two losses and gradients). */
Test(cpu_distill, hard_term_is_cross_entropy) {
  const int64_t n = 7, v = 13;
  rng_t r = rng_seeded(2103);
  float s[7 * 13], t[7 * 13], g[7 * 13], gce[7 * 13], gsoft[7 * 13], l, lce, lsoft;
  int32_t y[7];
  fill_logits(&r, s, n, v, v, 3.0, 0, NULL);
  fill_logits(&r, t, n, v, v, 3.0, 0, NULL);
  for (int64_t i = 0; i < n; i++) y[i] = i == 2 ? -100 : (int32_t)rng_int(&r, 0, v);
  culoss_distill_options o = opts(0, 0.5f, 2.0f, CULOSS_REDUCTION_BATCHMEAN);
  o.weight_soft = 0.0f, o.weight_hard = 1.0f;
  cr_assert_eq(culoss_distill(ctx, &o, n, v, CULOSS_F32, s, v, t, v, CULOSS_I32, y, &l, g, NULL),
               CULOSS_OK, "%s", culoss_last_error());
  culoss_cross_entropy_options co;
  culoss_cross_entropy_options_init(&co);
  cr_assert_eq(
      culoss_cross_entropy(ctx, &co, n, v, CULOSS_F32, s, v, CULOSS_I32, y, &lce, gce, NULL),
      CULOSS_OK);
  cr_assert(fabsf(l - lce) <= 1e-6f * lce, "%g vs %g", (double)l, (double)lce);
  for (int64_t e = 0; e < n * v; e++) cr_assert(fabsf(g[e] - gce[e]) <= 1e-7f);
  /* both terms: 0.3 soft + 0.7 hard */
  o.weight_soft = 1.0f, o.weight_hard = 0.0f;
  cr_assert_eq(
      culoss_distill(ctx, &o, n, v, CULOSS_F32, s, v, t, v, CULOSS_I32, y, &lsoft, gsoft, NULL),
      CULOSS_OK);
  o.weight_soft = 0.3f, o.weight_hard = 0.7f;
  cr_assert_eq(culoss_distill(ctx, &o, n, v, CULOSS_F32, s, v, t, v, CULOSS_I32, y, &l, g, NULL),
               CULOSS_OK);
  cr_assert(fabsf(l - (0.3f * lsoft + 0.7f * lce)) <= 1e-6f * l);
  for (int64_t e = 0; e < n * v; e++)
    cr_assert(fabsf(g[e] - (0.3f * gsoft[e] + 0.7f * gce[e])) <= 1e-7f);
  /* a label out of range: the call's error, nothing written */
  y[4] = (int32_t)v;
  float lp = -7.0f;
  poison(g, sizeof g);
  cr_assert_eq(culoss_distill(ctx, &o, n, v, CULOSS_F32, s, v, t, v, CULOSS_I32, y, &lp, g, NULL),
               CULOSS_ERROR_TARGET_OUT_OF_RANGE);
  cr_assert_eq(lp, -7.0f);
  cr_assert(is_poison_f32(g[0]));
  /* without the hard term labels only mark ignored rows: any value is fine */
  o.weight_hard = 0.0f;
  cr_assert_eq(culoss_distill(ctx, &o, n, v, CULOSS_F32, s, v, t, v, CULOSS_I32, y, &lp, g, NULL),
               CULOSS_OK);
}

/* The hard term with culoss_cross_entropy's options (smoothing, class
   weights, z-loss), alone and beside the divergence, against the oracle:
   every reduction, BATCHMEAN over the kept rows (not sum w_y), the
   gradient included. */
Test(cpu_distill, hard_options_match_the_oracle) {
  const int64_t n = 8, v = 23;
  rng_t r = rng_seeded(2107);
  float s[8 * 23], t[8 * 23], g[8 * 23], cw[23], l[8];
  int64_t y[8];
  fill_logits(&r, s, n, v, v, 3.0, 0, NULL);
  fill_logits(&r, t, n, v, v, 3.0, 0, NULL);
  for (int64_t j = 0; j < v; j++) cw[j] = (float)(0.25 + 2.0 * rng_uniform(&r));
  for (int64_t i = 0; i < n; i++) y[i] = i % 3 == 1 ? -100 : rng_int(&r, 0, v);
  const struct {
    float eps, z;
    int weights;
  } cfg[5] = {{0.1f, 0.0f, 0}, {0.0f, 0.0f, 1}, {0.2f, 0.01f, 1}, {1.0f, 0.0f, 1}, {0.0f, 0.5f, 0}};
  long double lp[23], lq[23], gd[23], gh[23];
  for (int k = 0; k < 5; k++)
    for (int red = 0; red < 4; red++)
      for (int both = 0; both < 2; both++) {
        culoss_cross_entropy_options ho;
        culoss_cross_entropy_options_init(&ho);
        ho.label_smoothing = cfg[k].eps, ho.z_loss = cfg[k].z;
        ho.class_weight = cfg[k].weights ? cw : NULL;
        ho.reduction = CULOSS_REDUCTION_NONE, ho.ignore_index = 5; /* neither is read */
        culoss_distill_options o = opts(0, 0.25f, 2.0f, (culoss_reduction)red);
        o.weight_soft = both ? 0.5f : 0.0f, o.weight_hard = 1.5f, o.hard_options = &ho;
        poison(g, sizeof g), poison(l, sizeof l);
        cr_assert_eq(
            culoss_distill(ctx, &o, n, v, CULOSS_F32, s, v, t, v, CULOSS_I64, y, l, g, NULL),
            CULOSS_OK, "%s", culoss_last_error());
        int64_t kept = 0;
        for (int64_t i = 0; i < n; i++) kept += y[i] != -100;
        const long double D = red == CULOSS_REDUCTION_BATCHMEAN ? (long double)kept
                              : red == CULOSS_REDUCTION_MEAN    ? (long double)(n * v)
                                                                : 1.0L;
        long double total = 0.0L;
        for (int64_t i = 0; i < n; i++) {
          long double row = 0.0L;
          for (int64_t j = 0; j < v; j++) gd[j] = gh[j] = 0.0L;
          if (y[i] != -100) {
            row = 1.5L * oracle_hard(cfg[k].eps, ho.class_weight, cfg[k].z, v, s + i * v, y[i], gh);
            if (both) row += 0.5L * oracle_row(0, 0.25L, 2.0L, v, s + i * v, t + i * v, lp, lq, gd);
          }
          total += row;
          if (red == CULOSS_REDUCTION_NONE)
            cr_assert(fabsl(l[i] - row) <= 2e-6L * (1e-3L + fabsl(row)),
                      "cfg %d row %lld: %.9g vs the oracle's %.9Lg", k, (long long)i, (double)l[i],
                      row);
          const long double sc = red == CULOSS_REDUCTION_NONE ? 1.0L : 1.0L / D;
          for (int64_t j = 0; j < v; j++) {
            const long double want = sc * (1.5L * gh[j] + (both ? 0.5L * gd[j] : 0.0L));
            cr_assert(fabsl(g[i * v + j] - want) <= 1e-6L * sc + 1e-5L * fabsl(want),
                      "cfg %d red %d both %d: grad[%lld][%lld] %.9g vs the oracle's %.9Lg", k, red,
                      both, (long long)i, (long long)j, (double)g[i * v + j], want);
          }
        }
        if (red != CULOSS_REDUCTION_NONE)
          cr_assert(fabsl(l[0] - total / D) <= 2e-6L * fabsl(total / D),
                    "cfg %d red %d both %d: %.9g vs the oracle's %.9Lg", k, red, both, (double)l[0],
                    total / D);
      }
  /* the options' own errors, and the two that do not apply here */
  culoss_cross_entropy_options ho;
  culoss_distill_options o = opts(0, 0.5f, 1.0f, CULOSS_REDUCTION_SUM);
  o.weight_hard = 1.0f, o.hard_options = &ho;
  float lb = -3.0f, one = 1.0f;
  for (int k = 0; k < 4; k++) {
    culoss_cross_entropy_options_init(&ho);
    if (k == 0) ho.label_smoothing = -0.1f;
    if (k == 1) ho.z_loss = NAN;
    if (k == 2) ho.normalizer = &one;
    if (k == 3) ho.logit_softcap = 30.0f;
    cr_assert_eq(
        culoss_distill(ctx, &o, n, v, CULOSS_F32, s, v, t, v, CULOSS_I64, y, &lb, NULL, NULL),
        k == 3 ? CULOSS_ERROR_NOT_SUPPORTED : CULOSS_ERROR_INVALID_VALUE);
    cr_assert(strstr(culoss_last_error(), k == 0   ? "label_smoothing"
                                          : k == 1 ? "z_loss"
                                          : k == 2 ? "normalizer"
                                                   : "logit_softcap") != NULL,
              "%s", culoss_last_error());
    cr_assert_eq(lb, -3.0f);
  }
}

/* Every row ignored: BATCHMEAN is NaN with a zero gradient, SUM 0; n = 0. */
Test(cpu_distill, all_ignored_and_empty) {
  const float s[6] = {1, 2, 3, 4, 5, 6}, t[6] = {6, 5, 4, 3, 2, 1};
  const int64_t y[2] = {-100, -100};
  float l, g[6];
  culoss_distill_options o = opts(0, 0.5f, 1.0f, CULOSS_REDUCTION_BATCHMEAN);
  cr_assert_eq(culoss_distill(ctx, &o, 2, 3, CULOSS_F32, s, 3, t, 3, CULOSS_I64, y, &l, g, NULL),
               CULOSS_OK);
  cr_assert(isnan(l));
  for (int e = 0; e < 6; e++) cr_assert_eq(g[e], 0.0f);
  o.reduction = CULOSS_REDUCTION_SUM;
  cr_assert_eq(culoss_distill(ctx, &o, 2, 3, CULOSS_F32, s, 3, t, 3, CULOSS_I64, y, &l, g, NULL),
               CULOSS_OK);
  cr_assert_eq(l, 0.0f);
  o.reduction = CULOSS_REDUCTION_BATCHMEAN;
  cr_assert_eq(
      culoss_distill(ctx, &o, 0, 3, CULOSS_F32, NULL, 3, NULL, 3, CULOSS_I64, NULL, &l, NULL, NULL),
      CULOSS_OK);
  cr_assert(isnan(l));
  o.reduction = CULOSS_REDUCTION_NONE;
  cr_assert_eq(culoss_distill(ctx, &o, 0, 3, CULOSS_F32, NULL, 3, NULL, 3, CULOSS_I64, NULL, NULL,
                              NULL, NULL),
               CULOSS_OK);
}

/* In place: the gradient written over the student logits equals the
   out-of-place one; grad_loss scales it. */
Test(cpu_distill, in_place_and_grad_loss) {
  const int64_t n = 4, v = 9;
  rng_t r = rng_seeded(2104);
  float s[36], t[36], g[36], sp[36], l[4], l2[4], gl[4] = {0.5f, -2.0f, 0.0f, 3.0f};
  fill_logits(&r, s, n, v, v, 2.0, 0, NULL);
  fill_logits(&r, t, n, v, v, 2.0, 0, NULL);
  memcpy(sp, s, sizeof s);
  culoss_distill_options o = opts(0, 0.25f, 1.0f, CULOSS_REDUCTION_NONE);
  cr_assert_eq(culoss_distill(ctx, &o, n, v, CULOSS_F32, s, v, t, v, CULOSS_I64, NULL, l, g, gl),
               CULOSS_OK);
  cr_assert_eq(
      culoss_distill(ctx, &o, n, v, CULOSS_F32, sp, v, t, v, CULOSS_I64, NULL, l2, sp, NULL),
      CULOSS_OK);
  for (int64_t i = 0; i < n; i++) {
    cr_assert_eq(l[i], l2[i]);
    for (int64_t j = 0; j < v; j++)
      cr_assert(fabsf(g[i * v + j] - gl[i] * sp[i * v + j]) <=
                1e-7f * fabsf(g[i * v + j]) + 1e-12f);
  }
}

/* Bad arguments: a named INVALID_VALUE, nothing written. */
Test(cpu_distill, bad_arguments) {
  const float s[6] = {1, 2, 3, 4, 5, 6}, t[6] = {6, 5, 4, 3, 2, 1};
  const int64_t y[2] = {0, 1};
  float l = -3.0f, g[6];
  poison(g, sizeof g);
  culoss_distill_options o;
#define BAD_CALL(...)                                                                              \
  do {                                                                                             \
    cr_assert_eq(culoss_distill(__VA_ARGS__), CULOSS_ERROR_INVALID_VALUE);                         \
    cr_assert(strstr(culoss_last_error(), "culoss_distill") != NULL, "%s", culoss_last_error());   \
    cr_assert_eq(l, -3.0f);                                                                        \
    cr_assert(is_poison_f32(g[0]));                                                                \
  } while (0)
  const float bad_beta[4] = {-0.1f, 1.5f, NAN, INFINITY};
  for (int k = 0; k < 4; k++) {
    culoss_distill_options_init(&o);
    o.beta = bad_beta[k];
    BAD_CALL(ctx, &o, 2, 3, CULOSS_F32, s, 3, t, 3, CULOSS_I64, y, &l, g, NULL);
    cr_assert(strstr(culoss_last_error(), "beta") != NULL);
  }
  const float bad_t[4] = {0.0f, -1.0f, NAN, INFINITY};
  for (int k = 0; k < 4; k++) {
    culoss_distill_options_init(&o);
    o.temperature = bad_t[k];
    BAD_CALL(ctx, &o, 2, 3, CULOSS_F32, s, 3, t, 3, CULOSS_I64, y, &l, g, NULL);
    cr_assert(strstr(culoss_last_error(), "temperature") != NULL);
  }
  culoss_distill_options_init(&o);
  o.divergence = (culoss_divergence)7;
  BAD_CALL(ctx, &o, 2, 3, CULOSS_F32, s, 3, t, 3, CULOSS_I64, y, &l, g, NULL);
  culoss_distill_options_init(&o);
  o.reduction = (culoss_reduction)9;
  BAD_CALL(ctx, &o, 2, 3, CULOSS_F32, s, 3, t, 3, CULOSS_I64, y, &l, g, NULL);
  culoss_distill_options_init(&o);
  o.weight_hard = NAN;
  BAD_CALL(ctx, &o, 2, 3, CULOSS_F32, s, 3, t, 3, CULOSS_I64, y, &l, g, NULL);
  o.weight_hard = 1.0f; /* the hard term needs labels */
  BAD_CALL(ctx, &o, 2, 3, CULOSS_F32, s, 3, t, 3, CULOSS_I64, NULL, &l, g, NULL);
  cr_assert(strstr(culoss_last_error(), "labels") != NULL);
  culoss_distill_options_init(&o);
  BAD_CALL(ctx, &o, 2, 3, CULOSS_F32, s, 2, t, 3, CULOSS_I64, y, &l, g, NULL); /* ld_s < v */
  BAD_CALL(ctx, &o, 2, 3, CULOSS_F32, s, 3, t, 2, CULOSS_I64, y, &l, g, NULL); /* ld_t < v */
  BAD_CALL(ctx, &o, 2, 0, CULOSS_F32, s, 3, t, 3, CULOSS_I64, y, &l, g, NULL); /* v = 0 */
  BAD_CALL(ctx, &o, -1, 3, CULOSS_F32, s, 3, t, 3, CULOSS_I64, y, &l, g, NULL);
  BAD_CALL(ctx, &o, 2, 3, (culoss_dtype)5, s, 3, t, 3, CULOSS_I64, y, &l, g, NULL);
  BAD_CALL(ctx, &o, 2, 3, CULOSS_F32, s, 3, t, 3, (culoss_index_type)4, y, &l, g, NULL);
  BAD_CALL(ctx, &o, 2, 3, CULOSS_F32, NULL, 3, t, 3, CULOSS_I64, y, &l, g, NULL);
  BAD_CALL(ctx, &o, 2, 3, CULOSS_F32, s, 3, NULL, 3, CULOSS_I64, y, &l, g, NULL);
  BAD_CALL(ctx, &o, 2, 3, CULOSS_F32, s, 3, t, 3, CULOSS_I64, y, NULL, g, NULL);
  BAD_CALL(ctx, &o, 2, 3, CULOSS_F32, s, 3, t, 3, CULOSS_I64, y, &l, (void *)t, NULL);
  BAD_CALL(NULL, &o, 2, 3, CULOSS_F32, s, 3, t, 3, CULOSS_I64, y, &l, g, NULL);
#undef BAD_CALL
}

/* ------------------------------------------------------- the linear form */

/* The linear form against explicit logits through culoss_distill and the
   chain rule, and (NONE) each row's loss against the oracle, with biases,
   the hard term, labels, every reduction, and accumulate (fp32; 16-bit
   grad_weight on the GPU suite). */
Test(cpu_distill, linear_matches_explicit_logits) {
  const int64_t n = 6, ds = 5, dt = 7, v = 10;
  rng_t r = rng_seeded(2105);
  float hs[30], wsw[50], bs[10], ht[42], wt[70], bt[10];
  float S[60], T[60], G[60], l, lx;
  float gh[30], gw[50], gb[10];
  int64_t y[6] = {3, -100, 0, 9, 5, 1};
  for (int e = 0; e < 30; e++) hs[e] = (float)rng_normal(&r);
  for (int e = 0; e < 50; e++) wsw[e] = (float)(0.5 * rng_normal(&r));
  for (int e = 0; e < 42; e++) ht[e] = (float)rng_normal(&r);
  for (int e = 0; e < 70; e++) wt[e] = (float)(0.5 * rng_normal(&r));
  for (int e = 0; e < 10; e++) bs[e] = (float)rng_normal(&r), bt[e] = (float)rng_normal(&r);
  for (int64_t i = 0; i < n; i++)
    for (int64_t j = 0; j < v; j++) {
      double zs = bs[j], zt = bt[j];
      for (int64_t k = 0; k < ds; k++) zs += (double)hs[i * ds + k] * wsw[j * ds + k];
      for (int64_t k = 0; k < dt; k++) zt += (double)ht[i * dt + k] * wt[j * dt + k];
      S[i * v + j] = (float)zs, T[i * v + j] = (float)zt;
    }
  for (int red = 0; red < 4; red++)
    for (int b = 0; b < 4; b++) {
      culoss_distill_options o = opts(0, BETAS[b], 1.5f, (culoss_reduction)red);
      o.weight_soft = 0.6f, o.weight_hard = 0.4f;
      /* beta >= 0.5: the hard term with smoothing, class weights and z-loss */
      static const float cw[10] = {1.0f, 0.5f, 2.0f, 1.5f, 0.25f, 1.0f, 3.0f, 0.75f, 1.25f, 2.5f};
      culoss_cross_entropy_options ho;
      culoss_cross_entropy_options_init(&ho);
      ho.label_smoothing = 0.1f, ho.class_weight = cw, ho.z_loss = 0.01f;
      if (b >= 2) o.hard_options = &ho;
      float lrows[6], lxrows[6];
      cr_assert_eq(culoss_linear_distill(ctx, &o, NULL, n, ds, dt, v, CULOSS_F32, hs, wsw, bs, ht,
                                         wt, bt, CULOSS_I64, y, red == 0 ? lrows : &l, gh, gw, gb,
                                         NULL, NULL, 0),
                   CULOSS_OK, "%s", culoss_last_error());
      cr_assert_eq(culoss_distill(ctx, &o, n, v, CULOSS_F32, S, v, T, v, CULOSS_I64, y,
                                  red == 0 ? lxrows : &lx, G, NULL),
                   CULOSS_OK);
      if (red == 0) {
        long double lp[10], lq[10];
        for (int64_t i = 0; i < n; i++) {
          cr_assert(fabsf(lrows[i] - lxrows[i]) <= 1e-5f * (1e-3f + fabsf(lxrows[i])));
          /* and against the oracle: 0.6 TRL + 0.4 CE (lse(s) - s_y, or with the
             hard options), independently */
          long double want = 0.0L;
          if (y[i] != -100)
            want = 0.6L * oracle_row(0, BETAS[b], 1.5L, v, S + i * v, T + i * v, lp, lq, NULL) +
                   0.4L * (b >= 2 ? oracle_hard(0.1L, cw, 0.01L, v, S + i * v, y[i], NULL)
                                  : oracle_hard(0.0L, NULL, 0.0L, v, S + i * v, y[i], NULL));
          cr_assert(fabsl(lrows[i] - want) <= 1e-5L * (1e-3L + fabsl(want)),
                    "beta %g row %lld: %.9g vs the oracle's %.9Lg", (double)BETAS[b], (long long)i,
                    (double)lrows[i], want);
        }
      } else
        cr_assert(fabsf(l - lx) <= 1e-5f * fabsf(lx), "red %d: %g vs %g", red, (double)l,
                  (double)lx);
      for (int64_t i = 0; i < n; i++)
        for (int64_t k = 0; k < ds; k++) {
          double want = 0.0;
          for (int64_t j = 0; j < v; j++) want += (double)G[i * v + j] * wsw[j * ds + k];
          cr_assert(fabs(gh[i * ds + k] - want) <= 1e-5 * (1e-3 + fabs(want)));
        }
      for (int64_t j = 0; j < v; j++) {
        double wb = 0.0;
        for (int64_t i = 0; i < n; i++) wb += G[i * v + j];
        cr_assert(fabs(gb[j] - wb) <= 1e-5 * (1e-3 + fabs(wb)));
        for (int64_t k = 0; k < ds; k++) {
          double want = 0.0;
          for (int64_t i = 0; i < n; i++) want += (double)G[i * v + j] * hs[i * ds + k];
          cr_assert(fabs(gw[j * ds + k] - want) <= 1e-5 * (1e-3 + fabs(want)));
        }
      }
    }
  /* accumulate: a second call adds its gradient to grad_weight and grad_bias */
  culoss_distill_options o = opts(1, 0.0f, 1.0f, CULOSS_REDUCTION_SUM);
  culoss_linear_ce_options lo;
  culoss_linear_ce_options_init(&lo);
  float gw2[50], gb2[10];
  cr_assert_eq(culoss_linear_distill(ctx, &o, &lo, n, ds, dt, v, CULOSS_F32, hs, wsw, bs, ht, wt,
                                     bt, CULOSS_I64, y, &l, NULL, gw, gb, NULL, NULL, 0),
               CULOSS_OK);
  memcpy(gw2, gw, sizeof gw), memcpy(gb2, gb, sizeof gb);
  lo.accumulate = 1;
  cr_assert_eq(culoss_linear_distill(ctx, &o, &lo, n, ds, dt, v, CULOSS_F32, hs, wsw, bs, ht, wt,
                                     bt, CULOSS_I64, y, &l, NULL, gw2, gb2, NULL, NULL, 0),
               CULOSS_OK);
  for (int e = 0; e < 50; e++) cr_assert(fabsf(gw2[e] - 2.0f * gw[e]) <= 1e-6f * fabsf(gw[e]));
  for (int e = 0; e < 10; e++) cr_assert(fabsf(gb2[e] - 2.0f * gb[e]) <= 1e-6f * fabsf(gb[e]));
}

Test(cpu_distill, linear_bad_arguments) {
  const float h[6] = {1, 2, 3, 4, 5, 6}, w[6] = {1, 0, 0, 1, 1, 1};
  float l = -3.0f, gh[6];
  culoss_linear_ce_options lo;
  size_t ws = 0;
#define LBAD(st, ...)                                                                              \
  do {                                                                                             \
    cr_assert_eq(culoss_linear_distill(__VA_ARGS__), st, "%s", culoss_last_error());               \
    cr_assert_eq(l, -3.0f);                                                                        \
  } while (0)
  culoss_linear_ce_options_init(&lo);
  lo.lse = &l;
  LBAD(CULOSS_ERROR_INVALID_VALUE, ctx, NULL, &lo, 3, 2, 2, 3, CULOSS_F32, h, w, NULL, h, w, NULL,
       CULOSS_I64, NULL, &l, gh, NULL, NULL, NULL, NULL, 0);
  culoss_linear_ce_options_init(&lo);
  lo.accumulate = 2;
  LBAD(CULOSS_ERROR_INVALID_VALUE, ctx, NULL, &lo, 3, 2, 2, 3, CULOSS_F32, h, w, NULL, h, w, NULL,
       CULOSS_I64, NULL, &l, gh, NULL, NULL, NULL, NULL, 0);
  LBAD(CULOSS_ERROR_INVALID_VALUE, ctx, NULL, NULL, 3, 0, 2, 3, CULOSS_F32, h, w, NULL, h, w, NULL,
       CULOSS_I64, NULL, &l, gh, NULL, NULL, NULL, NULL, 0);
  LBAD(CULOSS_ERROR_INVALID_VALUE, ctx, NULL, NULL, 3, 2, 2, 3, CULOSS_F32, h, NULL, NULL, h, w,
       NULL, CULOSS_I64, NULL, &l, gh, NULL, NULL, NULL, NULL, 0);
  LBAD(CULOSS_ERROR_INVALID_VALUE, ctx, NULL, NULL, 3, 2, 2, 3, CULOSS_F32, h, w, NULL, NULL, w,
       NULL, CULOSS_I64, NULL, &l, gh, NULL, NULL, NULL, NULL, 0);
  LBAD(CULOSS_ERROR_INVALID_VALUE, ctx, NULL, NULL, 3, 2, 2, 3, CULOSS_F32, h, w, NULL, h, w, NULL,
       CULOSS_I64, NULL, &l, (void *)h, NULL, NULL, NULL, NULL, 0); /* grad_hidden aliases */
  LBAD(CULOSS_ERROR_INVALID_VALUE, ctx, NULL, NULL, 3, 2, 2, 3, CULOSS_F32, h, w, NULL, h, w, NULL,
       CULOSS_I64, NULL, &l, gh, NULL, gh, NULL, NULL, 0); /* grad_bias without a bias */
#undef LBAD
  cr_assert_eq(culoss_linear_distill_workspace_size(ctx, NULL, 3, 2, 2, 3, CULOSS_F32, NULL),
               CULOSS_ERROR_INVALID_VALUE);
  cr_assert_eq(culoss_linear_distill_workspace_size(ctx, NULL, 3, 2, 2, 3, CULOSS_F32, &ws),
               CULOSS_OK);
  cr_assert(ws > 0);
}

/* The memory test of issue 21: n = 1024 rows over v = 131072 classes with
   d = 16, loss and every student gradient, on the CPU backend. The explicit
   form holds two [n, v] fp32 logits tensors (1 GiB) and a gradient; the
   fused form's workspace (the size the CUDA backend would use, with an
   8 MiB logits budget here) and the process's peak resident memory added
   by the call (the CPU reference keeps O(v d) doubles: the weights and
   grad_weight) stay a small fraction of it. */
Test(cpu_distill, linear_memory_is_a_small_fraction_of_the_explicit_logits, .timeout = 600) {
  const int64_t n = 1024, d = 16, v = 131072;
  const double explicit_bytes = 2.0 * (double)n * (double)v * 4.0; /* s and t, fp32 */
  setenv("CULOSS_LINEAR_CE_BLOCK_BYTES", "8388608", 1);
  culoss_context *c8;
  cr_assert_eq(culoss_create(&c8, CULOSS_BACKEND_CPU, 0), CULOSS_OK);
  rng_t r = rng_seeded(2106);
  float *hs = malloc((size_t)(n * d) * 4), *ht = malloc((size_t)(n * d) * 4);
  float *ws = malloc((size_t)(v * d) * 4), *wt = malloc((size_t)(v * d) * 4);
  float *gh = malloc((size_t)(n * d) * 4), *gw = malloc((size_t)(v * d) * 4), loss;
  for (int64_t e = 0; e < n * d; e++) hs[e] = (float)rng_normal(&r), ht[e] = (float)rng_normal(&r);
  for (int64_t e = 0; e < v * d; e++)
    ws[e] = (float)(0.3 * rng_normal(&r)), wt[e] = (float)(0.3 * rng_normal(&r));
  culoss_distill_options o = opts(0, 0.5f, 1.0f, CULOSS_REDUCTION_BATCHMEAN);
  size_t wsb;
  cr_assert_eq(culoss_linear_distill_workspace_size(c8, NULL, n, d, d, v, CULOSS_F32, &wsb),
               CULOSS_OK);
  struct rusage ru;
  getrusage(RUSAGE_SELF, &ru);
  const double before = (double)ru.ru_maxrss * 1024.0;
  cr_assert_eq(culoss_linear_distill(c8, &o, NULL, n, d, d, v, CULOSS_F32, hs, ws, NULL, ht, wt,
                                     NULL, CULOSS_I64, NULL, &loss, gh, gw, NULL, NULL, NULL, 0),
               CULOSS_OK, "%s", culoss_last_error());
  getrusage(RUSAGE_SELF, &ru);
  const double peak = (double)ru.ru_maxrss * 1024.0 - before;
  fprintf(stderr,
          "linear distillation n=%lld v=%lld d=%lld: workspace %.1f MB (%.1f%% of the explicit "
          "logits), peak RSS added by the call %.1f MB (%.1f%%)\n",
          (long long)n, (long long)v, (long long)d, wsb / 1e6, 100.0 * wsb / explicit_bytes,
          peak / 1e6, 100.0 * peak / explicit_bytes);
  cr_assert(wsb < explicit_bytes / 16, "workspace %zu bytes", wsb);
  /* an eighth of the two: not even a quarter of one [n, v] buffer */
  cr_assert(peak < explicit_bytes / 8, "peak RSS %.0f bytes", peak);
  cr_assert(isfinite(loss) && loss > 0.0f, "loss %g", (double)loss);
  culoss_destroy(c8);
  free(hs), free(ht), free(ws), free(wt), free(gh), free(gw);
}
