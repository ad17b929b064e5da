/* test_gpu_elementwise.c: CUDA backend of the elementwise losses and the
   multi-class hinge against the CPU reference, on fresh random inputs for
   each dtype, with poisoned outputs, unaligned views, every reduction,
   deferred domain errors, determinism and a case past 2^31 elements.
   Every test skips visibly ("skipped: no CUDA device") without a GPU. */
#include <criterion/criterion.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "helpers.h"
#include "ew_call.h"

static culoss_context *gpu, *cpu;
static void gpu_setup(void) { gpu_open(&gpu, &cpu); }
static void gpu_teardown(void) { gpu_close(gpu, cpu); }
TestSuite(gpu_ew, .init = gpu_setup, .fini = gpu_teardown, .timeout = 600);

/* One op on both backends; `offset` elements shift every device pointer to
   break 16-byte alignment (the scalar fallback). */
static void ew_case(t_op op, int64_t n, int64_t c, culoss_dtype dt, culoss_reduction red,
                    int weights, int grad_loss, int offset, uint64_t seed) {
  const int64_t m = n * c;
  const size_t es = dtype_bytes(dt), bytes = (size_t)(m + offset) * es;
  const int64_t nl = red == CULOSS_REDUCTION_NONE ? m : 1;
  rng_t r = rng_seeded(seed);
  float *x = malloc((size_t)(m + 1) * 4), *y = malloc((size_t)(m + 1) * 4);
  float *w = malloc((size_t)(m + 1) * 4), *pw = malloc((size_t)c * 4);
  float *gl = malloc((size_t)(nl + 1) * 4);
  void *xh = calloc(1, bytes + 16), *yh = calloc(1, bytes + 16);
  ew_fill(&r, op, x, y, m, 0.0);
  for (int64_t i = 0; i < m; i++) w[i] = (float)(0.25 + rng_uniform(&r));
  for (int64_t j = 0; j < c; j++) pw[j] = (float)(0.5 + 2 * rng_uniform(&r));
  for (int64_t i = 0; i < nl; i++) gl[i] = (float)rng_normal(&r);
  if (op == T_BCE) /* keep probabilities inside [0, 1] after rounding */
    for (int64_t i = 0; i < m; i++) x[i] = fminf(fmaxf(x[i], 0.0f), 1.0f);
  pack_dtype((char *)xh + (size_t)offset * es, x, m, dt);
  pack_dtype((char *)yh + (size_t)offset * es, y, m, dt);
  t_opts t = {red, weights && op <= T_BCE ? w : NULL, weights && op == T_BCE_LOGITS ? pw : NULL,
              op == T_HUBER ? 0.7f : (op == T_SMOOTH_L1 ? 1.3f : 0.0f)};
  float *ref_l = malloc((size_t)(nl + 1) * 4);
  void *ref_g = malloc(bytes + 16);
  char what[160];
  snprintf(what, sizeof what, "%s n=%lld c=%lld dt=%d red=%d w=%d gl=%d off=%d", t_op_name[op],
           (long long)n, (long long)c, dt, red, weights, grad_loss, offset);
  cr_assert_eq(ew_call(cpu, op, &t, n, c, dt, (char *)xh + (size_t)offset * es,
                       (char *)yh + (size_t)offset * es, ref_l, ref_g, grad_loss ? gl : NULL),
               CULOSS_OK, "%s: cpu %s", what, culoss_last_error());

  char *d_x = dev_from(xh, bytes), *d_y = dev_from(yh, bytes);
  float *d_w = dev_from(w, (size_t)(m + 1) * 4), *d_pw = dev_from(pw, (size_t)c * 4);
  float *d_gl = dev_from(gl, (size_t)(nl + 1) * 4), *d_l = dev_alloc((size_t)(nl + 1) * 4);
  char *d_g = dev_alloc(bytes);
  dev_poison(d_l, (size_t)(nl + 1) * 4);
  dev_poison(d_g, bytes);
  t.weight = t.weight ? d_w : NULL;
  t.pos_weight = t.pos_weight ? d_pw : NULL;
  cr_assert_eq(ew_call(gpu, op, &t, n, c, dt, d_x + (size_t)offset * es, d_y + (size_t)offset * es,
                       d_l, d_g + (size_t)offset * es, grad_loss ? d_gl : NULL),
               CULOSS_OK, "%s: gpu %s", what, culoss_last_error());
  cr_assert_eq(culoss_synchronize(gpu), CULOSS_OK, "%s: %s", what, culoss_last_error());
  float *l = malloc((size_t)(nl + 1) * 4);
  void *g = malloc(bytes);
  to_host(l, d_l, (size_t)(nl + 1) * 4);
  to_host(g, d_g, bytes);
  int64_t where;
  /* per-element losses are fp32 from identical inputs; the sums differ in
     order and precision of accumulation (double on both sides) */
  /* Poisson's exp(x) - y x (x - y log x) cancels where the two are close:
     an fp32 ulp or two of the terms it subtracts, on top (per element, or
     summed for a reduced loss) */
  double latol = 1e-6;
  if (op == T_POISSON || op == T_POISSON_FULL) {
    double terms = 0.0, tmax = 0.0;
    for (int64_t i = 0; i < m; i++) {
      const double xi = x[i], yi = y[i];
      const double ti = op == T_POISSON ? exp(xi) + fabs(yi * xi) : fabs(xi) + fabs(yi * log(xi));
      terms += ti, tmax = fmax(tmax, ti);
    }
    const double g0 = grad_loss ? fabs((double)gl[0]) : 1.0;
    latol += red == CULOSS_REDUCTION_NONE
                 ? 2.4e-7 * tmax
                 : 2.4e-7 * g0 * terms / (red == CULOSS_REDUCTION_MEAN ? (double)m : 1.0);
  }
  double wr = worst_ratio(l, ref_l, nl, latol, 2e-5, &where);
  cr_assert(wr <= 1.0, "%s: loss[%lld] gpu %.9g cpu %.9g", what, (long long)where, (double)l[where],
            (double)ref_l[where]);
  float *gf = malloc((size_t)(m + 1) * 4), *rf = malloc((size_t)(m + 1) * 4);
  unpack_dtype(gf, (char *)g + (size_t)offset * es, m, dt);
  unpack_dtype(rf, ref_g, m, dt); /* the CPU wrote its gradient at offset 0 */
  const double rtol = dt == CULOSS_F32 ? 2e-5 : (dt == CULOSS_F16 ? 2.0 / 1024 : 2.0 / 128);
  /* a gradient that nearly cancels (sigmoid(x) ~ y in BCE) keeps the fp32
     rounding of its O(largest gradient) terms, whatever the output dtype, so
     the absolute floor scales with the largest reference gradient (about 8
     fp32 ulps of it) */
  double gmax = 0.0;
  for (int64_t i = 0; i < m; i++)
    if (isfinite(rf[i]) && fabs((double)rf[i]) > gmax) gmax = fabs((double)rf[i]);
  const double atol = 1e-7 + 1e-6 * gmax;
  wr = worst_ratio(gf, rf, m, atol, rtol, &where);
  cr_assert(wr <= 1.0, "%s: grad[%lld] gpu %.9g cpu %.9g", what, (long long)where,
            (double)gf[where], (double)rf[where]);
  culoss_free(gpu, d_x), culoss_free(gpu, d_y), culoss_free(gpu, d_w), culoss_free(gpu, d_pw);
  culoss_free(gpu, d_gl), culoss_free(gpu, d_l), culoss_free(gpu, d_g);
  free(x), free(y), free(w), free(pw), free(gl), free(xh), free(yh), free(ref_l), free(ref_g);
  free(l), free(g), free(gf), free(rf);
}

Test(gpu_ew, every_loss_dtype_and_reduction) {
  REQUIRE_GPU();
  const int64_t shapes[][2] = {{1, 1}, {3, 7}, {64, 129}, {1000, 1000}};
  uint64_t seed = 1;
  for (int op = 0; op < T_NUM_OPS; op++)
    for (int d = 0; d < 3; d++)
      for (int s = 0; s < 4; s++)
        for (int red = 0; red < 4; red++) {
          if (red == CULOSS_REDUCTION_BATCHMEAN && op != T_KL && op != T_KL_LOG) continue;
          if (test_quick() && s == 3) continue;
          ew_case((t_op)op, shapes[s][0], shapes[s][1], (culoss_dtype)d, (culoss_reduction)red,
                  s % 2, red != 0 || s > 1, 0, seed++);
        }
}

Test(gpu_ew, unaligned_views_and_large_sizes) {
  REQUIRE_GPU();
  uint64_t seed = 500;
  for (int op = 0; op < T_NUM_OPS; op++)
    for (int d = 0; d < 3; d++) {
      ew_case((t_op)op, 17, 33, (culoss_dtype)d, CULOSS_REDUCTION_MEAN, 1, 1, 1, seed++);
      if (!test_quick())
        ew_case((t_op)op, 4099, 1031, (culoss_dtype)d, CULOSS_REDUCTION_SUM, 1, 1, 0, seed++);
    }
}

Test(gpu_ew, deferred_domain_errors) {
  REQUIRE_GPU();
  const float x[4] = {0.5f, 1.5f, 0.25f, -0.5f}, y[4] = {1.0f, 0.0f, 1.0f, -1.0f};
  const float yh[4] = {1.0f, 0.0f, -1.0f, 2.0f};
  float *d_x = dev_from(x, sizeof x), *d_y = dev_from(y, sizeof y), *d_yh = dev_from(yh, sizeof yh);
  float *d_l = dev_alloc(sizeof x), *d_g = dev_alloc(sizeof x), l[4], g[4];
  t_opts t = {CULOSS_REDUCTION_NONE, NULL, NULL, 0};
  cr_assert_eq(ew_call(gpu, T_BCE, &t, 1, 4, CULOSS_F32, d_x, d_y, d_l, d_g, NULL), CULOSS_OK);
  cr_assert_eq(culoss_synchronize(gpu), CULOSS_ERROR_INVALID_VALUE);
  cr_assert(strstr(culoss_last_error(), "domain") != NULL, "%s", culoss_last_error());
  cr_assert_eq(culoss_synchronize(gpu), CULOSS_OK, "the flag is cleared");
  to_host(l, d_l, sizeof l);
  to_host(g, d_g, sizeof g);
  cr_assert(isnan(l[1]) && isnan(l[3]) && g[1] == 0.0f && g[3] == 0.0f);
  cr_assert(close_enough(l[0], log(2.0), 1e-6, 1e-6));
  cr_assert_eq(ew_call(gpu, T_HINGE, &t, 1, 4, CULOSS_F32, d_x, d_yh, d_l, d_g, NULL), CULOSS_OK);
  cr_assert_eq(culoss_synchronize(gpu), CULOSS_ERROR_INVALID_VALUE);
  to_host(l, d_l, sizeof l);
  cr_assert(isnan(l[1]) && isnan(l[3]) && !isnan(l[0]) && !isnan(l[2]));
  culoss_free(gpu, d_x), culoss_free(gpu, d_y), culoss_free(gpu, d_yh);
  culoss_free(gpu, d_l), culoss_free(gpu, d_g);
}

/* Given inputs on both backends, every reduction; the CPU reference (double,
   checked against torch in python/tests) must match to fp32 / dtype rounding,
   NaN for NaN and inf for inf. */
static void ew_given(t_op op, const float *x, const float *y, int64_t m, culoss_dtype dt,
                     float param, const char *what) {
  const size_t es = dtype_bytes(dt), bytes = (size_t)m * es;
  void *xh = malloc(bytes), *yh = malloc(bytes), *rg = malloc(bytes), *g = malloc(bytes);
  float rl[64], l[64], gf[64], rf[64];
  cr_assert(m <= 64);
  pack_dtype(xh, x, m, dt);
  pack_dtype(yh, y, m, dt);
  void *d_x = dev_from(xh, bytes), *d_y = dev_from(yh, bytes), *d_g = dev_alloc(bytes);
  float *d_l = dev_alloc((size_t)m * 4);
  for (int red = 0; red < 3; red++) {
    t_opts t = {(culoss_reduction)red, NULL, NULL, param};
    const int64_t nl = red == CULOSS_REDUCTION_NONE ? m : 1;
    cr_assert_eq(ew_call(cpu, op, &t, 1, m, dt, xh, yh, rl, rg, NULL), CULOSS_OK, "%s: cpu %s",
                 what, culoss_last_error());
    dev_poison(d_l, (size_t)m * 4);
    dev_poison(d_g, bytes);
    cr_assert_eq(ew_call(gpu, op, &t, 1, m, dt, d_x, d_y, d_l, d_g, NULL), CULOSS_OK, "%s", what);
    cr_assert_eq(culoss_synchronize(gpu), CULOSS_OK, "%s: %s", what, culoss_last_error());
    to_host(l, d_l, (size_t)nl * 4);
    to_host(g, d_g, bytes);
    unpack_dtype(gf, g, m, dt);
    unpack_dtype(rf, rg, m, dt);
    int64_t where;
    cr_assert(worst_ratio(l, rl, nl, 1e-6, 2e-5, &where) <= 1.0,
              "%s red=%d: loss[%lld] gpu %.9g cpu %.9g", what, red, (long long)where,
              (double)l[where], (double)rl[where]);
    const double rtol = dt == CULOSS_F32 ? 2e-5 : (dt == CULOSS_F16 ? 2.0 / 1024 : 2.0 / 128);
    cr_assert(worst_ratio(gf, rf, m, 1e-7, rtol, &where) <= 1.0,
              "%s red=%d: grad[%lld] (x=%g y=%g) gpu %.9g cpu %.9g", what, red, (long long)where,
              (double)x[where], (double)y[where], (double)gf[where], (double)rf[where]);
  }
  culoss_free(gpu, d_x), culoss_free(gpu, d_y), culoss_free(gpu, d_g), culoss_free(gpu, d_l);
  free(xh), free(yh), free(rg), free(g);
}

/* Issue 19: inputs that reach every branch of the device helpers (random
   inputs never do): BCE probabilities 0 and 1 (the -100 log clamp and the
   1e-12 gradient floor), logits past +-12 and +-100, hinge kinks (subgradient
   0) and NaN scores (NaN loss), zero and NaN residuals (sign(0) = sign(NaN) =
   0 for L1 and smooth-L1 with beta 0), |r| = delta and beta exactly, zero KL
   targets and log targets of -inf. Each value is compared with the CPU
   reference; losing a clamp, z > 0 for z >= 0 or a wrong sign(0) fails. */
Test(gpu_ew, edge_branches_match_cpu) {
  REQUIRE_GPU();
  const float nan = NAN, inf = INFINITY;
  for (int d = 0; d < 3; d++) {
    const culoss_dtype dt = (culoss_dtype)d;
    const float bx[8] = {0.0f, 1.0f, 0.0f, 1.0f, 0.5f, 0.25f, 1e-30f, 1.0f - 1e-7f};
    const float by[8] = {1.0f, 0.0f, 0.0f, 1.0f, 0.5f, 1.0f, 1.0f, 0.0f};
    ew_given(T_BCE, bx, by, 8, dt, 0.0f, "bce clamps");
    const float lx[8] = {12.5f, -12.5f, 100.0f, -100.0f, 0.0f, 30.0f, -inf, inf};
    const float ly[8] = {0.0f, 1.0f, 1.0f, 0.0f, 0.5f, 0.25f, 0.0f, 1.0f};
    ew_given(T_BCE_LOGITS, lx, ly, 6, dt, 0.0f, "bce_with_logits tails");
    const float hx[6] = {1.0f, -1.0f, 0.5f, 2.0f, nan, -3.0f};
    const float hy[6] = {1.0f, -1.0f, 1.0f, 1.0f, 1.0f, -1.0f};
    ew_given(T_HINGE, hx, hy, 6, dt, 0.0f, "hinge kinks and NaN");
    ew_given(T_SQ_HINGE, hx, hy, 6, dt, 0.0f, "squared hinge kinks and NaN");
    const float rx[6] = {1.0f, 2.0f, nan, 0.5f, -1.3f, 1.3f};
    const float ry[6] = {1.0f, 0.7f, 0.0f, 0.5f, 0.0f, 0.0f};
    ew_given(T_L1, rx, ry, 6, dt, 0.0f, "l1 zero and NaN residuals");
    ew_given(T_SMOOTH_L1, rx, ry, 6, dt, 1.3f, "smooth_l1 at |r| = beta");
    ew_given(T_HUBER, rx, ry, 6, dt, 1.3f, "huber at |r| = delta");
    ew_given(T_MSE, rx, ry, 6, dt, 0.0f, "mse zero residual");
    const float kx[4] = {-1.0f, -2.0f, -0.5f, -inf};
    const float ky[4] = {0.0f, 0.5f, 1.0f, 0.0f};
    ew_given(T_KL, kx, ky, 3, dt, 0.0f, "kl zero targets");
    const float kly[4] = {-inf, -0.7f, 0.0f, -1.0f};
    ew_given(T_KL_LOG, kx, kly, 3, dt, 0.0f, "kl log target -inf");
  }
  /* smooth-L1 with beta = 0 is L1: gradient 0 at r = 0 and at NaN */
  culoss_regression_options o;
  culoss_regression_options_init(&o);
  o.reduction = CULOSS_REDUCTION_NONE, o.beta = 0.0f;
  const float x[3] = {1.0f, NAN, 2.0f}, y[3] = {1.0f, 0.0f, 0.0f};
  float *d_x = dev_from(x, sizeof x), *d_y = dev_from(y, sizeof y);
  float *d_l = dev_alloc(sizeof x), *d_g = dev_alloc(sizeof x), g[3];
  cr_assert_eq(culoss_smooth_l1(gpu, &o, 3, CULOSS_F32, d_x, d_y, d_l, d_g, NULL), CULOSS_OK);
  to_host(g, d_g, sizeof g);
  cr_assert(g[0] == 0.0f && g[1] == 0.0f && g[2] == 1.0f, "%g %g %g", (double)g[0], (double)g[1],
            (double)g[2]);
  culoss_free(gpu, d_x), culoss_free(gpu, d_y), culoss_free(gpu, d_l), culoss_free(gpu, d_g);
}

/* BCE targets outside [0, 1] (and NaN) are domain errors on the GPU too:
   NaN loss, zero gradient for the element, the deferred error (torch raises). */
Test(gpu_ew, bce_target_outside_unit_interval_is_deferred) {
  REQUIRE_GPU();
  const float x[4] = {0.5f, 0.5f, 0.25f, 0.75f}, y[4] = {1.0f, 2.0f, -1.0f, NAN};
  float *d_x = dev_from(x, sizeof x), *d_y = dev_from(y, sizeof y);
  float *d_l = dev_alloc(sizeof x), *d_g = dev_alloc(sizeof x), l[4], g[4], s;
  t_opts t = {CULOSS_REDUCTION_NONE, NULL, NULL, 0};
  cr_assert_eq(ew_call(gpu, T_BCE, &t, 1, 4, CULOSS_F32, d_x, d_y, d_l, d_g, NULL), CULOSS_OK);
  cr_assert_eq(culoss_synchronize(gpu), CULOSS_ERROR_INVALID_VALUE);
  to_host(l, d_l, sizeof l);
  to_host(g, d_g, sizeof g);
  cr_assert(!isnan(l[0]) && isnan(l[1]) && isnan(l[2]) && isnan(l[3]));
  cr_assert(g[1] == 0.0f && g[2] == 0.0f && g[3] == 0.0f && g[0] != 0.0f);
  t.red = CULOSS_REDUCTION_MEAN; /* and the reduced loss is NaN */
  cr_assert_eq(ew_call(gpu, T_BCE, &t, 1, 4, CULOSS_F32, d_x, d_y, d_l, NULL, NULL), CULOSS_OK);
  cr_assert_eq(culoss_synchronize(gpu), CULOSS_ERROR_INVALID_VALUE);
  to_host(&s, d_l, sizeof s);
  cr_assert(isnan(s));
  culoss_free(gpu, d_x), culoss_free(gpu, d_y), culoss_free(gpu, d_l), culoss_free(gpu, d_g);
}

/* Twice, bitwise: bites on a GPU, and on the emulator under
   CULOSS_EMU_SCHEDULE=random (a new thread and block order per launch). */
Test(gpu_ew, deterministic_bitwise) {
  REQUIRE_GPU();
  const int64_t m = test_quick() ? 100000 : 20000000;
  rng_t r = rng_seeded(77);
  float *x = malloc((size_t)m * 4), *y = malloc((size_t)m * 4);
  ew_fill(&r, T_MSE, x, y, m, 0.0);
  float *d_x = dev_from(x, (size_t)m * 4), *d_y = dev_from(y, (size_t)m * 4);
  float *d_l = dev_alloc(4), *d_g = dev_alloc((size_t)m * 4);
  for (int op = T_MSE; op <= T_SMOOTH_L1; op++) {
    float l[2];
    t_opts t = {CULOSS_REDUCTION_MEAN, NULL, NULL, 0};
    for (int rep = 0; rep < 2; rep++) {
      cr_assert_eq(ew_call(gpu, (t_op)op, &t, m, 1, CULOSS_F32, d_x, d_y, d_l, d_g, NULL),
                   CULOSS_OK);
      to_host(&l[rep], d_l, 4);
    }
    cr_assert(memcmp(&l[0], &l[1], 4) == 0, "%s: mean differs run to run", t_op_name[op]);
  }
  culoss_free(gpu, d_x), culoss_free(gpu, d_y), culoss_free(gpu, d_l), culoss_free(gpu, d_g);
  free(x), free(y);
}

static int mm_int32; /* mm_case passes int32 targets to both backends */
static void mm_case_once(int64_t n, int64_t c, int64_t ld, culoss_dtype dt, int p,
                         culoss_reduction red, int weights, int in_place, uint64_t seed) {
  rng_t r = rng_seeded(seed);
  const size_t es = dtype_bytes(dt), bytes = (size_t)(n * ld) * es;
  const int64_t nl = red == CULOSS_REDUCTION_NONE ? n : 1;
  float *x = malloc((size_t)(n * ld) * 4), *w = malloc((size_t)c * 4), *gl = malloc((size_t)n * 4);
  int64_t *t = malloc((size_t)n * 8);
  void *xh = malloc(bytes), *ref_g = malloc(bytes), *g = malloc(bytes);
  fill_logits(&r, x, n, c, ld, 0.5, 0, NULL);
  pack_dtype(xh, x, n * ld, dt);
  memcpy(ref_g, xh, bytes);
  for (int64_t j = 0; j < c; j++) w[j] = (float)(0.5 + rng_uniform(&r));
  for (int64_t i = 0; i < n; i++) t[i] = rng_int(&r, 0, c), gl[i] = (float)rng_normal(&r);
  const culoss_index_type tt = mm_int32 ? CULOSS_I32 : CULOSS_I64;
  if (mm_int32) /* the same values as int32, in the first half of t's memory */
    for (int64_t i = 0; i < n; i++) ((int32_t *)t)[i] = (int32_t)t[i];
  culoss_multi_margin_options o;
  culoss_multi_margin_options_init(&o);
  o.p = p, o.reduction = red, o.margin = 0.9f, o.class_weight = weights ? w : NULL;
  float *ref_l = malloc((size_t)nl * 4), *l = malloc((size_t)nl * 4);
  cr_assert_eq(culoss_multi_margin(cpu, &o, n, c, dt, xh, ld, tt, t, ref_l, ref_g, gl), CULOSS_OK);
  char *d_x = dev_from(xh, bytes), *d_g = in_place ? d_x : dev_from(xh, bytes);
  float *d_w = dev_from(w, (size_t)c * 4), *d_gl = dev_from(gl, (size_t)n * 4);
  int64_t *d_t = dev_from(t, (size_t)n * 8);
  float *d_l = dev_alloc((size_t)nl * 4);
  dev_poison(d_l, (size_t)nl * 4);
  o.class_weight = weights ? d_w : NULL;
  cr_assert_eq(culoss_multi_margin(gpu, &o, n, c, dt, d_x, ld, tt, d_t, d_l, d_g, d_gl), CULOSS_OK,
               "%s", culoss_last_error());
  cr_assert_eq(culoss_synchronize(gpu), CULOSS_OK, "%s", culoss_last_error());
  to_host(l, d_l, (size_t)nl * 4);
  to_host(g, d_g, bytes);
  int64_t where;
  cr_assert(worst_ratio(l, ref_l, nl, 1e-6, 2e-5, &where) <= 1.0, "c=%lld p=%d loss[%lld] %g vs %g",
            (long long)c, p, (long long)where, (double)l[where], (double)ref_l[where]);
  float *gf = malloc((size_t)(n * ld) * 4), *rf = malloc((size_t)(n * ld) * 4);
  unpack_dtype(gf, g, n * ld, dt);
  unpack_dtype(rf, ref_g, n * ld, dt);
  const double rtol = dt == CULOSS_F32 ? 2e-5 : (dt == CULOSS_F16 ? 2.0 / 1024 : 2.0 / 128);
  /* the target column sums c terms in a different order: a looser absolute bound */
  cr_assert(worst_ratio(gf, rf, n * ld, 1e-6, rtol, &where) <= 1.0,
            "c=%lld p=%d dt=%d grad[%lld] %g vs %g", (long long)c, p, dt, (long long)where,
            (double)gf[where], (double)rf[where]);
  culoss_free(gpu, d_x), culoss_free(gpu, d_w), culoss_free(gpu, d_gl), culoss_free(gpu, d_t);
  culoss_free(gpu, d_l);
  if (!in_place) culoss_free(gpu, d_g);
  free(x), free(w), free(gl), free(t), free(xh), free(ref_g), free(g), free(ref_l), free(l);
  free(gf), free(rf);
}

/* Each case as given and, for dense rows, again with a padded row pitch
   (8 or 5 elements by seed), so a kernel striding by c instead of ld fails
   in every multi-margin case. */
static void mm_case(int64_t n, int64_t c, int64_t ld, culoss_dtype dt, int p, culoss_reduction red,
                    int weights, int in_place, uint64_t seed) {
  mm_case_once(n, c, ld, dt, p, red, weights, in_place, seed);
  if (ld == c)
    mm_case_once(n, c, c + (seed % 2 ? 8 : 5), dt, p, red, weights, in_place, seed ^ 0x9e3779b9u);
}

/* Issue 19: one and two blocks for the whole array: every thread strides
   over many packs (and the multi-margin kernel over many rows). */
Test(gpu_ew, grid_stride_with_a_small_grid_limit) {
  REQUIRE_GPU();
  uint64_t seed = 2100;
  for (int lim = 1; lim <= 2; lim++) {
    cr_assert_eq(culoss_set_grid_limit(gpu, lim), CULOSS_OK);
    for (int op = 0; op < T_NUM_OPS; op++)
      ew_case((t_op)op, 37, 1001, (culoss_dtype)((op + lim) % 3),
              (culoss_reduction)((op + lim) % 3), 1, 1, op % 2, seed++);
    for (int d = 0; d < 3; d++) /* multi-margin: rows per block x the limit, many times over */
      mm_case(301, 37, 40, (culoss_dtype)d, 1 + d % 2, (culoss_reduction)((d + lim) % 3), 1, d == 1,
              seed++);
  }
  cr_assert_eq(culoss_set_grid_limit(gpu, 0), CULOSS_OK);
}

/* Issue 19 section 3: every elementwise loss with its gradient written in
   place over the input at an ordinary size; multi-margin in place with
   ld > c and with int32 targets. */
Test(gpu_ew, in_place_gradients_and_int32_multi_margin) {
  REQUIRE_GPU();
  uint64_t seed = 2500;
  for (int op = 0; op < T_NUM_OPS; op++)
    for (int d = 0; d < 3; d++) {
      const culoss_dtype dt = (culoss_dtype)d;
      const int64_t m = 5003;
      const size_t bytes = (size_t)m * dtype_bytes(dt);
      rng_t r = rng_seeded(seed++);
      float *x = malloc((size_t)m * 4), *y = malloc((size_t)m * 4), l, rl;
      ew_fill(&r, (t_op)op, x, y, m, 0.0);
      if (op == T_BCE)
        for (int64_t i = 0; i < m; i++) x[i] = fminf(fmaxf(x[i], 0.0f), 1.0f);
      void *xh = malloc(bytes), *yh = malloc(bytes), *rg = malloc(bytes), *g = malloc(bytes);
      pack_dtype(xh, x, m, dt), pack_dtype(yh, y, m, dt);
      t_opts t = {CULOSS_REDUCTION_MEAN, NULL, NULL, op == T_HUBER ? 0.7f : 0.0f};
      cr_assert_eq(ew_call(cpu, (t_op)op, &t, 1, m, dt, xh, yh, &rl, rg, NULL), CULOSS_OK);
      void *d_x = dev_from(xh, bytes), *d_y = dev_from(yh, bytes);
      float *d_l = dev_alloc(4);
      cr_assert_eq(ew_call(gpu, (t_op)op, &t, 1, m, dt, d_x, d_y, d_l, d_x, NULL), CULOSS_OK);
      cr_assert_eq(culoss_synchronize(gpu), CULOSS_OK, "%s", culoss_last_error());
      to_host(&l, d_l, 4);
      to_host(g, d_x, bytes);
      float *gf = malloc((size_t)m * 4), *rf = malloc((size_t)m * 4);
      unpack_dtype(gf, g, m, dt), unpack_dtype(rf, rg, m, dt);
      int64_t where;
      cr_assert(close_enough(l, rl, 1e-6, 2e-5), "%s dt %d: loss %g vs %g", t_op_name[op], d,
                (double)l, (double)rl);
      const double rtol = dt == CULOSS_F32 ? 2e-5 : (dt == CULOSS_F16 ? 2.0 / 1024 : 2.0 / 128);
      cr_assert(worst_ratio(gf, rf, m, 1e-7, rtol, &where) <= 1.0,
                "%s dt %d: in-place grad[%lld] "
                "%g vs %g",
                t_op_name[op], d, (long long)where, (double)gf[where], (double)rf[where]);
      culoss_free(gpu, d_x), culoss_free(gpu, d_y), culoss_free(gpu, d_l);
      free(x), free(y), free(xh), free(yh), free(rg), free(g), free(gf), free(rf);
    }
  for (int d = 0; d < 3; d++) {
    mm_case(45, 100, 117, (culoss_dtype)d, 1 + d % 2, CULOSS_REDUCTION_MEAN, 1, 1, seed++);
    mm_int32 = 1;
    mm_case(45, 100, 117, (culoss_dtype)d, 2 - d % 2, CULOSS_REDUCTION_NONE, 0, 1, seed++);
    mm_case(45, 100, 100, (culoss_dtype)d, 1, CULOSS_REDUCTION_SUM, 1, 0, seed++);
    mm_int32 = 0;
  }
}

Test(gpu_ew, multi_margin_against_cpu) {
  REQUIRE_GPU();
  const int64_t cs[] = {2, 10, 100, 1000, 5003};
  uint64_t seed = 900;
  for (int ci = 0; ci < 5; ci++)
    for (int d = 0; d < 3; d++)
      for (int red = 0; red < 3; red++) {
        const int64_t c = cs[ci], n = test_quick() ? 7 : 333;
        mm_case(n, c, c, (culoss_dtype)d, 1 + (int)(seed % 2), (culoss_reduction)red, red != 1,
                red == 2, seed);
        seed++;
        mm_case(n, c, c + 3, (culoss_dtype)d, 2, (culoss_reduction)red, 1, 0, seed++);
      }
}

Test(gpu_ew, multi_margin_out_of_range_is_deferred) {
  REQUIRE_GPU();
  const float x[6] = {0.1f, 0.2f, 0.3f, 0.4f, 0.5f, 0.6f};
  const int64_t t[2] = {1, 3};
  float *d_x = dev_from(x, sizeof x), *d_l = dev_alloc(8), *d_g = dev_alloc(sizeof x), l[2], g[6];
  int64_t *d_t = dev_from(t, sizeof t);
  culoss_multi_margin_options o;
  culoss_multi_margin_options_init(&o);
  o.reduction = CULOSS_REDUCTION_NONE;
  cr_assert_eq(
      culoss_multi_margin(gpu, &o, 2, 3, CULOSS_F32, d_x, 3, CULOSS_I64, d_t, d_l, d_g, NULL),
      CULOSS_OK);
  cr_assert_eq(culoss_synchronize(gpu), CULOSS_ERROR_TARGET_OUT_OF_RANGE);
  to_host(l, d_l, 8);
  to_host(g, d_g, sizeof g);
  cr_assert(isfinite(l[0]) && isnan(l[1]));
  cr_assert(g[3] == 0.0f && g[4] == 0.0f && g[5] == 0.0f);
  culoss_free(gpu, d_x), culoss_free(gpu, d_l), culoss_free(gpu, d_g), culoss_free(gpu, d_t);
}

/* m past 2^31 elements: 64-bit indices in the elementwise kernel. The tail
   (beyond element 2^31) is compared with the CPU. */
/* 64-bit offsets: m = 2^31 + 4099 elements, each a hash of its index. The
   first 2^31 have residuals below 1e-3 and the last 4099 residuals near 50,
   so the sum is dominated by the elements past 2^31 (a wrapped offset, which
   would read the small ones, moves it by far more than the tolerance); the
   in-place gradient past 2^31 must equal the CPU's bit for bit.
   CULOSS_REQUIRE_BIG=1 (CI) turns a failed allocation into a failure. */
Test(gpu_ew, elements_past_2_pow_31) {
  REQUIRE_GPU();
  if (test_quick()) cr_skip_test("skipped: CULOSS_TEST_QUICK is set (8 GiB case)");
  if (test_emulated_small())
    cr_skip_test("skipped: the CPU emulator of CUDA (8 GiB case; CULOSS_EMU_BIG=1 runs it)");
  const int64_t head = (int64_t)1 << 31, m = head + 4099, blk = (int64_t)1 << 22;
  const size_t bytes = (size_t)m * 2;
  void *d_x = NULL, *d_y = NULL;
  if (culoss_malloc(gpu, &d_x, bytes) != CULOSS_OK ||
      culoss_malloc(gpu, &d_y, bytes) != CULOSS_OK) {
    cr_assert(getenv("CULOSS_REQUIRE_BIG") == NULL, "2 x %zu bytes of device memory: %s", bytes,
              culoss_last_error());
    cr_skip_test("skipped: 2 x %zu bytes of device memory not available", bytes);
  }
  float *x = malloc((size_t)blk * 4), *y = malloc((size_t)blk * 4);
  uint16_t *xb = malloc((size_t)blk * 2), *yb = malloc((size_t)blk * 2);
  culoss_regression_options o;
  culoss_regression_options_init(&o);
  o.reduction = CULOSS_REDUCTION_SUM;
  double want = 0.0;
  for (int64_t i = 0; i < m; i += blk) {
    const int64_t k = m - i < blk ? m - i : blk;
    for (int64_t e = 0; e < k; e++) {
      const int64_t g = i + e;
      x[e] = (float)(4.0 * hash_unit((uint64_t)g));
      y[e] = x[e] + (float)((g < head ? 1e-3 : 50.0) * hash_unit((uint64_t)g ^ 0x5555u));
    }
    pack_dtype(xb, x, k, CULOSS_BF16);
    pack_dtype(yb, y, k, CULOSS_BF16);
    cr_assert_eq(culoss_upload(gpu, (char *)d_x + (size_t)i * 2, xb, (size_t)k * 2), CULOSS_OK);
    cr_assert_eq(culoss_upload(gpu, (char *)d_y + (size_t)i * 2, yb, (size_t)k * 2), CULOSS_OK);
    float bl;
    cr_assert_eq(culoss_huber(cpu, &o, k, CULOSS_BF16, xb, yb, &bl, NULL, NULL), CULOSS_OK);
    want += (double)bl;
  }
  float *d_l = dev_alloc(4), l;
  cr_assert_eq(culoss_huber(gpu, &o, m, CULOSS_BF16, d_x, d_y, d_l, d_x, NULL), CULOSS_OK);
  cr_assert_eq(culoss_synchronize(gpu), CULOSS_OK, "%s", culoss_last_error());
  to_host(&l, d_l, 4);
  cr_assert(close_enough(l, want, 0, 1e-5), "sum %.9g vs %.9g", (double)l, want);
  /* the gradient written in place past 2^31: the last block's tail, which
     xb/yb still hold */
  const int64_t rest = m - head, last0 = (m - 1) / blk * blk, off = head - last0;
  uint16_t *g = malloc((size_t)rest * 2), *ref = malloc((size_t)rest * 2);
  float tl;
  to_host(g, (char *)d_x + (size_t)head * 2, (size_t)rest * 2);
  cr_assert_eq(culoss_huber(cpu, &o, rest, CULOSS_BF16, xb + off, yb + off, &tl, ref, NULL),
               CULOSS_OK);
  cr_assert(memcmp(g, ref, (size_t)rest * 2) == 0, "gradient past 2^31 differs from the CPU");
  culoss_free(gpu, d_x), culoss_free(gpu, d_y), culoss_free(gpu, d_l);
  free(x), free(y), free(xb), free(yb), free(g), free(ref);
}
