#define _POSIX_C_SOURCE 200809L
/* test_gpu_ce.c: the CUDA backend against the CPU reference on fresh random
   inputs (large-magnitude and -inf logits included), every dtype, sizes from
   c = 2 to c = 256K, strided rows (every case also runs with a padded row
   pitch), in-place gradients, poisoned outputs,
   determinism, deferred out-of-range errors and a case with n * c past 2^31.
   Every test skips visibly ("skipped: no CUDA device") without a GPU. */
#include <criterion/criterion.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "helpers.h"

static culoss_context *gpu, *cpu;

static void gpu_setup(void) { gpu_open(&gpu, &cpu); }
static void gpu_teardown(void) { gpu_close(gpu, cpu); }
TestSuite(gpu_ce, .init = gpu_setup, .fini = gpu_teardown, .timeout = 600);

typedef struct {
  int mode; /* 0 index, 1 soft, 2 nll */
  int64_t n, c, ld;
  culoss_dtype dt;
  culoss_index_type tt;
  culoss_reduction red;
  float eps, z, cap;
  int weights, ignore, neg_inf, grad, grad_loss, in_place, normalizer;
  int adversarial;      /* rows from adversarial_rows() and extreme class weights */
  int64_t ignore_value; /* 0: -100; else this ignore_index (may be a valid class) */
  int unnormalized;     /* soft targets scaled by 1.7 (rows not summing to 1) */
  int nan_ignored;      /* NaN logits in some ignored rows */
  double scale;
  uint64_t seed;
} gcase;

static void describe(const gcase *k, char *buf, size_t len) {
  snprintf(buf, len,
           "mode=%d n=%lld c=%lld ld=%lld dt=%d tt=%d red=%d eps=%g z=%g cap=%g w=%d ign=%d "
           "inf=%d grad=%d gl=%d inplace=%d norm=%d adv=%d seed=%llu",
           k->mode, (long long)k->n, (long long)k->c, (long long)k->ld, k->dt, k->tt, k->red,
           (double)k->eps, (double)k->z, (double)k->cap, k->weights, k->ignore, k->neg_inf, k->grad,
           k->grad_loss, k->in_place, k->normalizer, k->adversarial, (unsigned long long)k->seed);
}

/* The edges of issue 19, one kind per row (row i gets kind i % 9, magnitude
   index i / 9): ties at magnitudes 1e0..1e38 (capped at the dtype's maximum),
   two tied maxima over zeros, a large common offset, ties at the dtype's
   maximum over its negative, -inf in non-target columns, the target column
   -inf, +inf in a column, NaN in a non-target column, and an ordinary row.
   Values are what the dtype holds (the caller rounds through it). */
static void adversarial_rows(rng_t *r, float *x, const int64_t *t, int64_t n, int64_t c, int64_t ld,
                             culoss_dtype dt) {
  const double dmax = dt == CULOSS_F16 ? 65504.0 : (dt == CULOSS_BF16 ? 3.3895e38 : 3.4028e38);
  for (int64_t i = 0; i < n; i++) {
    float *row = x + i * ld;
    const int kind = (int)(i % 9);
    const double mag = fmin(pow(10.0, (double)((i / 9) % 39)), dmax);
    const int64_t ti = t[i] >= 0 && t[i] < c ? t[i] : 0;
    const int64_t other = (ti + 1) % c;
    for (int64_t j = 0; j < c; j++) {
      switch (kind) {
      case 0: row[j] = (float)(i % 2 ? -mag : mag); break;
      case 1: row[j] = j < 2 || j == ti ? (float)mag : 0.0f; break;
      case 2: row[j] = (float)((i % 2 ? -1e4 : 1e3) + 3.0 * rng_normal(r)); break;
      case 3: row[j] = j % 2 == 0 || j == ti ? (float)dmax : (float)-dmax; break;
      case 4:
        row[j] = j == ti || rng_uniform(r) < 0.5 ? (float)(2.0 * rng_normal(r)) : -INFINITY;
        break;
      case 5: row[j] = j == ti ? -INFINITY : (float)rng_normal(r); break;
      case 6: row[j] = j == other ? INFINITY : (float)rng_normal(r); break;
      case 7: row[j] = j == other ? NAN : (float)rng_normal(r); break;
      default: row[j] = (float)(3.0 * rng_normal(r)); break;
      }
    }
  }
}

/* Runs one case on both backends and compares. Returns nothing: asserts. */
static void run_case_once(const gcase *k) {
  char what[400];
  describe(k, what, sizeof what);
  rng_t r = rng_seeded(k->seed);
  const int64_t elems = k->n * k->ld;
  const size_t es = dtype_bytes(k->dt), xbytes = (size_t)elems * es;
  float *xf = malloc((size_t)elems * sizeof(float));
  float *yf = k->mode == 1 ? malloc((size_t)elems * sizeof(float)) : NULL;
  void *xh = malloc(xbytes), *yh = k->mode == 1 ? malloc(xbytes) : NULL;
  int64_t *t = malloc((size_t)(k->n ? k->n : 1) * sizeof(int64_t));
  int32_t *t32 = malloc((size_t)(k->n ? k->n : 1) * sizeof(int32_t));
  float *w = malloc((size_t)k->c * sizeof(float));
  const int64_t nloss = k->red == CULOSS_REDUCTION_NONE ? k->n : 1;
  float *gl = malloc((size_t)(nloss ? nloss : 1) * sizeof(float));
  cr_assert(xf && xh && t && t32 && w && gl);

  for (int64_t i = 0; i < k->n; i++) {
    t[i] = rng_int(&r, 0, k->c);
    if (k->ignore && rng_uniform(&r) < 0.2) t[i] = k->ignore_value ? k->ignore_value : -100;
    t32[i] = (int32_t)t[i];
  }
  if (k->mode == 2) { /* log-probabilities: log_softmax of random rows */
    fill_logits(&r, xf, k->n, k->c, k->ld, k->scale, 0, NULL);
    for (int64_t i = 0; i < k->n; i++) {
      double m = -INFINITY, s = 0;
      for (int64_t j = 0; j < k->c; j++) m = fmax(m, xf[i * k->ld + j]);
      for (int64_t j = 0; j < k->c; j++) s += exp(xf[i * k->ld + j] - m);
      for (int64_t j = 0; j < k->c; j++) xf[i * k->ld + j] -= (float)(m + log(s));
    }
  } else {
    fill_logits(&r, xf, k->n, k->c, k->ld, k->scale, k->neg_inf, t);
    if (k->adversarial) adversarial_rows(&r, xf, t, k->n, k->c, k->ld, k->dt);
    if (k->nan_ignored) /* "ignored rows with NaN logits get a zero gradient" */
      for (int64_t i = 0; i < k->n; i++)
        if (t[i] == (k->ignore_value ? k->ignore_value : -100)) xf[i * k->ld + i % k->c] = NAN;
  }
  pack_dtype(xh, xf, elems, k->dt);
  if (yf) {
    fill_probs(&r, yf, k->n, k->c, k->ld);
    if (k->unnormalized)
      for (int64_t e = 0; e < elems; e++) yf[e] *= 1.7f;
    pack_dtype(yh, yf, elems, k->dt);
  }
  for (int64_t j = 0; j < k->c; j++) w[j] = (float)(0.25 + 2.0 * rng_uniform(&r));
  if (k->adversarial) /* zero and huge class weights */
    for (int64_t j = 0; j < k->c; j++) w[j] = j % 5 == 1 ? 0.0f : (j % 7 == 3 ? 1e6f : w[j]);
  for (int64_t i = 0; i < nloss; i++) gl[i] = (float)(0.5 + rng_normal(&r));
  const float norm = (float)(k->n + 3);

  culoss_cross_entropy_options o;
  culoss_cross_entropy_options_init(&o);
  o.reduction = k->red;
  if (k->ignore_value) o.ignore_index = k->ignore_value;
  o.label_smoothing = k->eps;
  o.z_loss = k->z;
  o.logit_softcap = k->cap;
  const void *targets_h = k->tt == CULOSS_I32 ? (const void *)t32 : (const void *)t;
  const size_t tbytes = (size_t)(k->n ? k->n : 1) * (k->tt == CULOSS_I32 ? 4u : 8u);

  /* --- CPU reference on exactly the same (rounded) inputs --- */
  float *ref_loss = malloc((size_t)(nloss ? nloss : 1) * sizeof(float));
  void *ref_grad = k->grad ? malloc(xbytes) : NULL;
  if (ref_grad) memcpy(ref_grad, xh, xbytes); /* padding keeps the logits' values */
  culoss_cross_entropy_options oc = o;
  oc.class_weight = k->weights ? w : NULL;
  oc.normalizer = k->normalizer ? &norm : NULL;
  culoss_status st;
  if (k->mode == 0)
    st = culoss_cross_entropy(cpu, &oc, k->n, k->c, k->dt, xh, k->ld, k->tt, targets_h, ref_loss,
                              ref_grad, k->grad_loss ? gl : NULL);
  else if (k->mode == 1)
    st = culoss_cross_entropy_soft(cpu, &oc, k->n, k->c, k->dt, xh, k->ld, yh, ref_loss, ref_grad,
                                   k->grad_loss ? gl : NULL);
  else
    st = culoss_nll(cpu, &oc, k->n, k->c, k->dt, xh, k->ld, k->tt, targets_h, ref_loss, ref_grad,
                    k->grad_loss ? gl : NULL);
  cr_assert_eq(st, CULOSS_OK, "%s: cpu %s", what, culoss_last_error());

  /* --- GPU --- */
  void *d_x = dev_from(xh, xbytes);
  void *d_y = yh ? dev_from(yh, xbytes) : NULL;
  void *d_t = dev_from(targets_h, tbytes);
  float *d_w = dev_from(w, (size_t)k->c * sizeof(float));
  float *d_gl = dev_from(gl, (size_t)(nloss ? nloss : 1) * sizeof(float));
  float *d_norm = dev_from(&norm, sizeof norm);
  float *d_loss = dev_alloc((size_t)(nloss ? nloss : 1) * sizeof(float));
  void *d_g = NULL;
  dev_poison(d_loss, (size_t)(nloss ? nloss : 1) * sizeof(float));
  if (k->grad) {
    if (k->in_place)
      d_g = d_x;
    else {
      d_g = dev_from(xh, xbytes); /* padding = logits' padding, rows poisoned below */
      void *pg = malloc(xbytes);
      memcpy(pg, xh, xbytes);
      for (int64_t i = 0; i < k->n; i++)
        poison((char *)pg + (size_t)(i * k->ld) * es, (size_t)k->c * es);
      cr_assert_eq(culoss_upload(gpu, d_g, pg, xbytes), CULOSS_OK);
      free(pg);
    }
  }
  o.class_weight = k->weights ? d_w : NULL;
  o.normalizer = k->normalizer ? d_norm : NULL;
  if (k->mode == 0)
    st = culoss_cross_entropy(gpu, &o, k->n, k->c, k->dt, d_x, k->ld, k->tt, d_t, d_loss, d_g,
                              k->grad_loss ? d_gl : NULL);
  else if (k->mode == 1)
    st = culoss_cross_entropy_soft(gpu, &o, k->n, k->c, k->dt, d_x, k->ld, d_y, d_loss, d_g,
                                   k->grad_loss ? d_gl : NULL);
  else
    st = culoss_nll(gpu, &o, k->n, k->c, k->dt, d_x, k->ld, k->tt, d_t, d_loss, d_g,
                    k->grad_loss ? d_gl : NULL);
  cr_assert_eq(st, CULOSS_OK, "%s: gpu %s", what, culoss_last_error());
  cr_assert_eq(culoss_synchronize(gpu), CULOSS_OK, "%s: %s", what, culoss_last_error());

  float *loss = malloc((size_t)(nloss ? nloss : 1) * sizeof(float));
  to_host(loss, d_loss, (size_t)(nloss ? nloss : 1) * sizeof(float));
  int64_t where;
  /* Losses are fp32 from identical inputs on both sides: fp32 tolerance for
     every dtype. */
  double wr = worst_ratio(loss, ref_loss, nloss, 2e-5, 5e-5, &where);
  cr_assert(wr <= 1.0, "%s: loss[%lld] gpu %.9g cpu %.9g", what, (long long)where,
            (double)loss[where], (double)ref_loss[where]);

  if (k->grad) {
    void *g = malloc(xbytes);
    to_host(g, d_g, xbytes);
    float *gf = malloc((size_t)elems * sizeof(float)), *rf = malloc((size_t)elems * sizeof(float));
    unpack_dtype(gf, g, elems, k->dt);
    unpack_dtype(rf, ref_grad, elems, k->dt);
    double gmax = 0;
    for (int64_t i = 0; i < elems; i++)
      if (isfinite(rf[i])) gmax = fmax(gmax, fabs(rf[i]));
    /* Both sides round to the dtype once: allow about one ulp of it. */
    double rtol = k->dt == CULOSS_F32 ? 2e-4 : (k->dt == CULOSS_F16 ? 2.0 / 1024 : 2.0 / 128);
    double atol = 1e-6 * gmax + 1e-12;
    if (k->dt == CULOSS_F16) atol += 1e-7; /* fp16 subnormals */
    for (int64_t i = 0; i < k->n; i++) {
      for (int64_t j = k->c; j < k->ld; j++)
        cr_assert(memcmp((char *)g + (size_t)(i * k->ld + j) * es,
                         (char *)xh + (size_t)(i * k->ld + j) * es, es) == 0,
                  "%s: padding (%lld,%lld) written", what, (long long)i, (long long)j);
    }
    wr = worst_ratio(gf, rf, elems, atol, rtol, &where);
    cr_assert(wr <= 1.0, "%s: grad[%lld] (row %lld col %lld) gpu %.9g cpu %.9g", what,
              (long long)where, (long long)(where / k->ld), (long long)(where % k->ld),
              (double)gf[where], (double)rf[where]);
    free(g);
    free(gf);
    free(rf);
  }
  culoss_free(gpu, d_x);
  culoss_free(gpu, d_y);
  culoss_free(gpu, d_t);
  culoss_free(gpu, d_w);
  culoss_free(gpu, d_gl);
  culoss_free(gpu, d_norm);
  culoss_free(gpu, d_loss);
  if (k->grad && !k->in_place) culoss_free(gpu, d_g);
  free(xf), free(yf), free(xh), free(yh), free(t), free(t32), free(w), free(gl);
  free(ref_loss), free(ref_grad), free(loss);
}

/* Every case runs as given and, where its rows are dense (ld == c), again
   with a padded row pitch: 8 elements (16-byte packs stay aligned) for odd
   seeds, 5 (the scalar path) for even ones, so a kernel that strides by c
   instead of ld fails everywhere, not in one test. */
static void run_case(const gcase *k) {
  run_case_once(k);
  if (k->ld == k->c && k->n > 0) {
    gcase p = *k;
    p.ld = k->c + (k->seed % 2 ? 8 : 5);
    p.seed = k->seed ^ 0x9e3779b9u;
    run_case_once(&p);
  }
}

static gcase base_case(int64_t n, int64_t c, culoss_dtype dt, uint64_t seed) {
  gcase k;
  memset(&k, 0, sizeof k);
  k.n = n;
  k.c = c;
  k.ld = c;
  k.dt = dt;
  k.tt = CULOSS_I64;
  k.red = CULOSS_REDUCTION_MEAN;
  k.grad = 1;
  k.scale = 2.0;
  k.neg_inf = 1;
  k.ignore = 1;
  k.seed = seed;
  return k;
}

static const int64_t sizes[] = {2,    3,    16,   17,    33,    100,   128,   129,    1000,
                                1024, 1025, 4099, 16384, 16385, 32000, 50257, 128256, 262147};

static int64_t rows_for(int64_t c) {
  int64_t n = (int64_t)(test_quick() ? 200000 : 4000000) / c;
  return n < 3 ? 3 : (n > 97 ? 97 : n);
}

Test(gpu_ce, index_targets_all_sizes_all_dtypes) {
  REQUIRE_GPU();
  for (int d = 0; d < 3; d++)
    for (size_t s = 0; s < sizeof sizes / sizeof *sizes; s++) {
      gcase k = base_case(rows_for(sizes[s]), sizes[s], (culoss_dtype)d, 100 + s * 3 + d);
      run_case(&k);
    }
}

/* More rows than the capped grid has row slots: each group strides over
   several rows (and reduced losses still sum every row once). */
Test(gpu_ce, grid_stride_over_many_rows) {
  REQUIRE_GPU();
  const int64_t shapes[][2] = {{70001, 3}, {30011, 100}, {40000, 700}, {5000, 20000}};
  uint64_t seed = 1500;
  for (int i = 0; i < 4; i++)
    for (int mode = 0; mode < 3; mode++) {
      if (test_quick() && i > 1) continue;
      gcase k = base_case(shapes[i][0], shapes[i][1], (culoss_dtype)(mode % 3), seed++);
      k.mode = mode;
      k.red = (culoss_reduction)((i + mode) % 3);
      k.neg_inf = 0;
      run_case(&k);
    }
}

/* Issue 19 regressions, CUDA against the CPU reference (itself checked
   against torch in float64: python/tests/test_torch_semantics.py) on rows
   built to break the arithmetic: ties at 1e0..1e38 and at the dtype's
   maximum, common offsets of 1e3 and 1e4, -inf / +inf / NaN patterns, zero
   and 1e6 class weights; index and soft targets, label smoothing, every
   reduction and dtype. Before the fix the CUDA loss with smoothing or soft
   targets was W lse - sum w x in fp32: 0 instead of log k for ties at 1e8,
   a relative error of 5e-4 at an offset of 1e4, NaN near the bf16 maximum. */
/* Issue 19: with the grid capped at 1 and 3 blocks (culoss_set_grid_limit),
   small problems stride on every kernel shape (thread, 8 lanes, warp, 256
   and 1024 threads per row, forced through CULOSS_CE_SHAPE) in the index
   and soft modes, and on NLL's gather kernel (8 rows per block, whatever
   the shape), at quick sizes too: a group that skipped or repeated a row on
   its second pass would change a row's loss or a reduced sum. */
Test(gpu_ce, grid_stride_on_every_shape_with_a_small_grid_limit) {
  REQUIRE_GPU();
  static const char *shapes[] = {"thread", "8", "warp", "256", "1024"};
  static const int64_t cs[] = {7, 100, 700, 3000, 20000};
  uint64_t seed = 1700;
  for (int s = 0; s < 5; s++) {
    setenv("CULOSS_CE_SHAPE", shapes[s], 1);
    gpu_reopen(&gpu);
    for (int lim = 1; lim <= 3; lim += 2) {
      cr_assert_eq(culoss_set_grid_limit(gpu, lim), CULOSS_OK);
      for (int mode = 0; mode < 3; mode++) {
        /* rows per block: 256 (thread), 32 (8 lanes), 8 (warp), 1 (256/1024);
           NLL: 8 (a warp per row) */
        const int64_t per_block = mode == 2 ? 8 : (s == 0 ? 256 : (s == 1 ? 32 : (s == 2 ? 8 : 1)));
        gcase k = base_case(per_block * lim * 2 + 5, cs[s], (culoss_dtype)((mode + s) % 3), seed++);
        k.mode = mode;
        k.red = (culoss_reduction)((mode + s + lim) % 3);
        k.grad_loss = 1;
        run_case(&k);
      }
    }
  }
  unsetenv("CULOSS_CE_SHAPE");
  gpu_reopen(&gpu);
}

Test(gpu_ce, adversarial_rows_all_dtypes) {
  REQUIRE_GPU();
  uint64_t seed = 1900;
  const int64_t cs[] = {4, 33, 1000, 5000};
  for (int d = 0; d < 3; d++)
    for (size_t s = 0; s < sizeof cs / sizeof *cs; s++)
      for (int mode = 0; mode < 2; mode++)
        for (int red = 0; red < 3; red++) {
          gcase k = base_case(test_quick() ? 45 : 117, cs[s], (culoss_dtype)d, seed++);
          k.mode = mode;
          k.adversarial = 1;
          k.neg_inf = 0;
          k.red = (culoss_reduction)red;
          k.eps = (red + s) % 2 ? 0.3f : 0.0f;
          k.weights = (int)((s + red) % 2);
          run_case(&k);
        }
}

Test(gpu_ce, soft_targets_all_sizes_all_dtypes) {
  REQUIRE_GPU();
  for (int d = 0; d < 3; d++)
    for (size_t s = 0; s < sizeof sizes / sizeof *sizes; s++) {
      gcase k = base_case(rows_for(sizes[s]), sizes[s], (culoss_dtype)d, 200 + s * 3 + d);
      k.mode = 1;
      k.eps = 0.1f;
      /* with smoothing every class has y' > 0, so a -inf logit makes the
         row's loss +inf: alternate so finite soft losses are compared too */
      k.neg_inf = (int)((s + d) % 2);
      run_case(&k);
    }
}

Test(gpu_ce, nll_all_sizes_all_dtypes) {
  REQUIRE_GPU();
  for (int d = 0; d < 3; d++)
    for (size_t s = 0; s < sizeof sizes / sizeof *sizes; s++) {
      gcase k = base_case(rows_for(sizes[s]), sizes[s], (culoss_dtype)d, 300 + s * 3 + d);
      k.mode = 2;
      k.weights = 1;
      run_case(&k);
    }
}

/* Every option and reduction, at a warp-per-row size and a block-per-row size. */
Test(gpu_ce, options_grid) {
  REQUIRE_GPU();
  const int64_t cs[] = {1000, 50257};
  uint64_t seed = 400;
  for (int ci = 0; ci < 2; ci++)
    for (int mode = 0; mode < 3; mode++)
      for (int red = 0; red < 3; red++)
        for (int variant = 0; variant < 6; variant++) {
          gcase k = base_case(ci ? 9 : 77, cs[ci], variant % 2 ? CULOSS_BF16 : CULOSS_F32, seed++);
          k.mode = mode;
          k.red = (culoss_reduction)red;
          k.weights = variant >= 1;
          k.grad_loss = variant >= 1;
          k.tt = variant % 3 == 2 ? CULOSS_I32 : CULOSS_I64;
          if (mode != 2) {
            k.eps = variant >= 2 ? 0.2f : 0.0f;
            k.z = variant >= 3 ? 1e-3f : 0.0f;
            k.cap = variant >= 4 ? 15.0f : 0.0f;
          }
          k.normalizer = variant == 5 && red == CULOSS_REDUCTION_MEAN;
          k.neg_inf = variant % 2 == 0; /* -inf with smoothing gives +inf losses */
          k.grad = variant != 3 || red != CULOSS_REDUCTION_SUM; /* forward-only too */
          run_case(&k);
        }
}

Test(gpu_ce, strided_and_in_place) {
  REQUIRE_GPU();
  const int64_t cs[] = {7, 1000, 5000, 32000};
  uint64_t seed = 600;
  for (int ci = 0; ci < 4; ci++)
    for (int d = 0; d < 3; d++)
      for (int pad = 0; pad < 3; pad++) {
        gcase k = base_case(13, cs[ci], (culoss_dtype)d, seed++);
        /* pad 0: in place; 1: ld breaks 16-byte alignment; 2: aligned ld */
        k.ld = cs[ci] + (pad == 1 ? 3 : (pad == 2 ? 64 : 0));
        k.in_place = pad != 1;
        k.eps = 0.05f;
        k.weights = 1;
        run_case(&k);
        k.mode = 1;
        run_case(&k);
      }
}

/* Issue 19 section 3, behaviours that had no test, CUDA against the CPU:
   NLL and soft targets with ld > c, a non-default ignore_index (a valid
   class, 3), ignored rows whose logits hold NaN (zero gradient on both
   backends), unweighted soft targets that do not sum to 1, and label
   smoothing with class weights at c > 65536. */
Test(gpu_ce, untested_behaviours_of_issue_19) {
  REQUIRE_GPU();
  uint64_t seed = 2300;
  for (int d = 0; d < 3; d++) {
    gcase k = base_case(29, 1000, (culoss_dtype)d, seed++);
    k.mode = 2, k.ld = 1000 + 24; /* NLL, padded rows */
    k.weights = 1;
    run_case(&k);
    k.mode = 1, k.unnormalized = 1, k.ld = 1000 + 5; /* soft, rows summing to 1.7 */
    for (int red = 0; red < 3; red++) {
      k.red = (culoss_reduction)red, k.seed = seed++;
      run_case(&k);
    }
    gcase g = base_case(41, 300, (culoss_dtype)d, seed++);
    g.ignore_value = 3, g.nan_ignored = 1, g.neg_inf = 0;
    for (int mode = 0; mode < 3; mode += 2)
      for (int red = 0; red < 3; red++) {
        g.mode = mode, g.red = (culoss_reduction)red, g.seed = seed++;
        g.eps = mode == 0 ? 0.125f : 0.0f;
        run_case(&g);
      }
  }
  gcase big = base_case(test_quick() ? 3 : 9, 70001, CULOSS_BF16, seed++);
  big.eps = 0.25f, big.weights = 1;
  run_case(&big);
  big.red = CULOSS_REDUCTION_NONE, big.dt = CULOSS_F32, big.seed = seed++;
  run_case(&big);
}

/* Issue 19 (1.3) on the GPU: every present target on a zero-weight class,
   label smoothing 0.3, MEAN: D = 0, so the loss is NaN (the smoothing term
   made the sum positive: sum / 0 was +inf) and the gradient zero. */
Test(gpu_ce, zero_weight_denominator_gives_nan_and_zero_gradient) {
  REQUIRE_GPU();
  enum { N = 5, C = 40 };
  float x[N * C], w[C], g[N * C], l;
  int64_t t[N] = {0, 0, 2, -100, 2};
  rng_t r = rng_seeded(2400);
  fill_logits(&r, x, N, C, C, 1.0, 0, NULL);
  for (int j = 0; j < C; j++) w[j] = j == 0 || j == 2 ? 0.0f : 1.0f;
  void *d_x = dev_from(x, sizeof x), *d_t = dev_from(t, sizeof t);
  float *d_w = dev_from(w, sizeof w), *d_g = dev_alloc(sizeof g), *d_l = dev_alloc(4);
  culoss_cross_entropy_options o;
  culoss_cross_entropy_options_init(&o);
  o.label_smoothing = 0.3f, o.class_weight = d_w;
  cr_assert_eq(
      culoss_cross_entropy(gpu, &o, N, C, CULOSS_F32, d_x, C, CULOSS_I64, d_t, d_l, d_g, NULL),
      CULOSS_OK);
  cr_assert_eq(culoss_synchronize(gpu), CULOSS_OK);
  to_host(&l, d_l, 4);
  to_host(g, d_g, sizeof g);
  cr_assert(isnan(l), "MEAN with D = 0: %g, not NaN", (double)l);
  for (int e = 0; e < N * C; e++) cr_assert(g[e] == 0.0f, "gradient[%d] = %g", e, (double)g[e]);
  culoss_free(gpu, d_x), culoss_free(gpu, d_t), culoss_free(gpu, d_w), culoss_free(gpu, d_g);
  culoss_free(gpu, d_l);
}

/* Every launch shape on sizes its heuristic would not pick, with the row
   cache full, partial and off: each instantiation against the CPU. */
Test(gpu_ce, every_shape_and_cache_budget) {
  REQUIRE_GPU();
  const char *shapes[] = {"thread", "8", "warp", "256", "1024"}, *caches[] = {"", "0", "3000"};
  const int64_t cs[] = {7, 1000, 5003};
  uint64_t seed = 1200;
  for (int si = 0; si < 5; si++)
    for (int ci = 0; ci < 3; ci++) {
      setenv("CULOSS_CE_SHAPE", shapes[si], 1);
      setenv("CULOSS_CE_CACHE_BYTES", caches[ci], 1);
      gpu_reopen(&gpu); /* the knobs are read at culoss_create */
      for (int mode = 0; mode < 3; mode++)
        for (int d = 0; d < 3; d++) {
          gcase k = base_case(37, cs[(si + ci + mode + d) % 3], (culoss_dtype)d, seed++);
          k.mode = mode;
          k.eps = mode == 2 ? 0.0f : 0.1f;
          k.weights = 1;
          k.in_place = d == 1;
          k.red = (culoss_reduction)((mode + d) % 3);
          run_case(&k);
        }
    }
  unsetenv("CULOSS_CE_SHAPE");
  unsetenv("CULOSS_CE_CACHE_BYTES");
  gpu_reopen(&gpu);
}

/* Rows too long for one block's row cache (with a gradient) go to the
   cluster kernel on a device with thread-block clusters (the emulator has
   them): cluster sizes 2 (bf16, 250 KB rows), 5 (fp32, 1 MB rows) and 8
   with a capped cache (the rest of each slice re-read), rows with a partial
   pack (c = 131077 on a pitch of 131080: 16-byte packs, then the last
   rank's partial pack; an odd pitch, the scalar path), every
   target kind and option, in place, every reduction, more rows than
   clusters (a grid limit of 4 blocks: each cluster walks several rows, its
   two result slots alternating); and CULOSS_CE_CLUSTER=0 (one block per
   row) once. */
Test(gpu_ce, rows_split_over_a_cluster) {
  REQUIRE_GPU();
  static const struct {
    int64_t c;
    culoss_dtype dt;
    const char *cache;
  } cs[] = {{128256, CULOSS_BF16, ""},      {262147, CULOSS_F32, ""},
            {70001, CULOSS_F16, ""},        {100000, CULOSS_F32, "65536"},
            {131075, CULOSS_BF16, "40000"}, {131077, CULOSS_BF16, ""}};
  uint64_t seed = 5100;
  for (int cl = 1; cl >= 0; cl--)
    for (size_t ci = 0; ci < sizeof cs / sizeof cs[0]; ci++) {
      setenv("CULOSS_CE_CLUSTER", cl ? "1" : "0", 1);
      setenv("CULOSS_CE_CACHE_BYTES", cs[ci].cache, 1);
      gpu_reopen(&gpu);
      /* a grid of 8 blocks: one to four clusters, each walking several rows
         (a limit below the cluster size would take one block per row) */
      if (ci != 3) cr_assert_eq(culoss_set_grid_limit(gpu, 8), CULOSS_OK);
      for (int mode = 0; mode < 2; mode++) {
        gcase k = base_case(test_quick() ? 3 : 5, cs[ci].c, cs[ci].dt, seed++);
        k.mode = mode;
        k.eps = mode == 0 ? 0.1f : 0.0f;
        k.z = ci % 2 ? 1e-3f : 0.0f;
        k.cap = ci == 2 ? 30.0f : 0.0f;
        k.weights = ci != 1;
        k.in_place = (int)(ci + mode) % 2;
        k.red = (culoss_reduction)((ci + mode) % 3);
        k.grad_loss = k.red == CULOSS_REDUCTION_NONE;
        if (ci == 4) k.ld = k.c + 1; /* no 16-byte packs */
        if (ci == 5) k.ld = 131080;  /* packs, and a partial one at the last rank's end */
        run_case(&k);
      }
      if (!cl) break; /* one case without clusters is enough to compare paths */
    }
  unsetenv("CULOSS_CE_CLUSTER");
  unsetenv("CULOSS_CE_CACHE_BYTES");
  gpu_reopen(&gpu);
}

Test(gpu_ce, large_magnitude_logits) {
  REQUIRE_GPU();
  for (int d = 0; d < 3; d++) {
    gcase k = base_case(31, 4099, (culoss_dtype)d, 700 + d);
    k.scale = d == CULOSS_F16 ? 50.0 : 500.0; /* fp16 tops out at 65504 */
    run_case(&k);
    k.cap = 30.0f;
    run_case(&k);
  }
}

Test(gpu_ce, empty_and_all_ignored) {
  REQUIRE_GPU();
  float *d_loss = dev_alloc(sizeof(float)), loss;
  culoss_cross_entropy_options o;
  culoss_cross_entropy_options_init(&o);
  dev_poison(d_loss, sizeof(float));
  cr_assert_eq(culoss_cross_entropy(gpu, &o, 0, 10, CULOSS_F32, NULL, 10, CULOSS_I64, NULL, d_loss,
                                    NULL, NULL),
               CULOSS_OK);
  to_host(&loss, d_loss, sizeof loss);
  cr_assert(isnan(loss) && !is_poison_f32(loss), "n = 0 mean is NaN (written)");
  o.reduction = CULOSS_REDUCTION_SUM;
  culoss_cross_entropy(gpu, &o, 0, 10, CULOSS_F32, NULL, 10, CULOSS_I64, NULL, d_loss, NULL, NULL);
  to_host(&loss, d_loss, sizeof loss);
  cr_assert_eq(loss, 0.0f);
  /* all ignored, with smoothing: NaN mean, zero gradient */
  enum { N = 40, C = 300 };
  float *x = malloc(N * C * sizeof(float)), *g = malloc(N * C * sizeof(float));
  int64_t t[N];
  rng_t r = rng_seeded(800);
  fill_logits(&r, x, N, C, C, 1.0, 0, NULL);
  for (int i = 0; i < N; i++) t[i] = -100;
  void *d_x = dev_from(x, N * C * sizeof(float)), *d_t = dev_from(t, sizeof t);
  o.reduction = CULOSS_REDUCTION_MEAN;
  o.label_smoothing = 0.1f;
  cr_assert_eq(
      culoss_cross_entropy(gpu, &o, N, C, CULOSS_F32, d_x, C, CULOSS_I64, d_t, d_loss, d_x, NULL),
      CULOSS_OK);
  to_host(&loss, d_loss, sizeof loss);
  to_host(g, d_x, N * C * sizeof(float));
  cr_assert(isnan(loss) && !is_poison_f32(loss));
  for (int j = 0; j < N * C; j++) cr_assert_eq(g[j], 0.0f);
  culoss_free(gpu, d_x), culoss_free(gpu, d_t), culoss_free(gpu, d_loss);
  free(x), free(g);
}

Test(gpu_ce, out_of_range_target_is_deferred_error) {
  REQUIRE_GPU();
  enum { N = 8, C = 2000 };
  float *x = malloc(N * C * sizeof(float)), *g = malloc(N * C * sizeof(float)), loss[N];
  int64_t t[N] = {1, 5, C, 7, -100, 3, -4, 0};
  rng_t r = rng_seeded(900);
  fill_logits(&r, x, N, C, C, 1.0, 0, NULL);
  void *d_x = dev_from(x, N * C * sizeof(float)), *d_t = dev_from(t, sizeof t);
  float *d_loss = dev_alloc(sizeof loss), *d_g = dev_alloc(N * C * sizeof(float));
  culoss_cross_entropy_options o;
  culoss_cross_entropy_options_init(&o);
  o.reduction = CULOSS_REDUCTION_NONE;
  cr_assert_eq(
      culoss_cross_entropy(gpu, &o, N, C, CULOSS_F32, d_x, C, CULOSS_I64, d_t, d_loss, d_g, NULL),
      CULOSS_OK, "the launch itself succeeds");
  cr_assert_eq(culoss_synchronize(gpu), CULOSS_ERROR_TARGET_OUT_OF_RANGE);
  cr_assert_eq(culoss_synchronize(gpu), CULOSS_OK, "the flag is cleared");
  to_host(loss, d_loss, sizeof loss);
  to_host(g, d_g, N * C * sizeof(float));
  cr_assert(isnan(loss[2]) && isnan(loss[6]), "bad rows have NaN loss");
  cr_assert(isfinite(loss[0]) && loss[4] == 0.0f);
  for (int j = 0; j < C; j++) cr_assert(g[2 * C + j] == 0.0f && g[6 * C + j] == 0.0f);
  /* the context stays usable: a good call afterwards works and reports OK */
  t[2] = 2, t[6] = 6;
  cr_assert_eq(culoss_upload(gpu, d_t, t, sizeof t), CULOSS_OK);
  o.reduction = CULOSS_REDUCTION_SUM;
  cr_assert_eq(culoss_nll(gpu, &o, N, C, CULOSS_F32, d_x, C, CULOSS_I64, d_t, d_loss, NULL, NULL),
               CULOSS_OK);
  cr_assert_eq(culoss_synchronize(gpu), CULOSS_OK);
  culoss_free(gpu, d_x), culoss_free(gpu, d_t), culoss_free(gpu, d_loss), culoss_free(gpu, d_g);
  free(x), free(g);
}

/* Issue 19: the deferred flag survives later good calls (it is cleared only
   by culoss_synchronize), is raised under SUM and MEAN (NaN reduced loss), in
   NLL, soft-free index paths and fused linear + CE, and a NaN probability in
   BCE is a deferred domain error on the GPU too. */
Test(gpu_ce, deferred_errors_survive_good_calls_in_every_family) {
  REQUIRE_GPU();
  enum { N = 6, C = 300, D = 16 };
  float *x = malloc(N * C * sizeof(float)), *w = malloc(C * D * sizeof(float)), h[N * D];
  float loss[N];
  int64_t bad[N] = {1, 2, C + 3, 4, 5, 0}, good[N] = {1, 2, 3, 4, 5, 0};
  rng_t r = rng_seeded(910);
  fill_logits(&r, x, N, C, C, 1.0, 0, NULL);
  for (int i = 0; i < N * D; i++) h[i] = (float)rng_normal(&r);
  for (int i = 0; i < C * D; i++) w[i] = (float)(0.1 * rng_normal(&r));
  void *d_x = dev_from(x, N * C * sizeof(float)), *d_bad = dev_from(bad, sizeof bad);
  void *d_good = dev_from(good, sizeof good), *d_h = dev_from(h, sizeof h);
  void *d_w = dev_from(w, C * D * sizeof(float));
  float *d_loss = dev_alloc(sizeof loss);
  size_t ws_bytes;
  cr_assert_eq(culoss_linear_cross_entropy_workspace_size(gpu, N, D, C, CULOSS_F32, &ws_bytes),
               CULOSS_OK);
  void *d_ws = dev_alloc(ws_bytes);
  culoss_cross_entropy_options o;
  culoss_cross_entropy_options_init(&o);
  for (int red = CULOSS_REDUCTION_SUM; red <= CULOSS_REDUCTION_MEAN; red++) {
    o.reduction = (culoss_reduction)red;
    for (int family = 0; family < 3; family++) {
      culoss_status st =
          family == 0 ? culoss_cross_entropy(gpu, &o, N, C, CULOSS_F32, d_x, C, CULOSS_I64, d_bad,
                                             d_loss, NULL, NULL)
          : family == 1
              ? culoss_nll(gpu, &o, N, C, CULOSS_F32, d_x, C, CULOSS_I64, d_bad, d_loss, NULL, NULL)
              : culoss_linear_cross_entropy(gpu, &o, N, D, C, CULOSS_F32, d_h, d_w, NULL,
                                            CULOSS_I64, d_bad, d_loss, NULL, NULL, NULL, NULL, d_ws,
                                            ws_bytes);
      cr_assert_eq(st, CULOSS_OK, "family %d: %s", family, culoss_last_error());
      float l;
      to_host(&l, d_loss, sizeof l);
      cr_assert(isnan(l), "family %d red %d: the reduced loss of a bad batch is NaN", family, red);
      /* a good call afterwards does not clear the flag */
      cr_assert_eq(culoss_cross_entropy(gpu, &o, N, C, CULOSS_F32, d_x, C, CULOSS_I64, d_good,
                                        d_loss, NULL, NULL),
                   CULOSS_OK);
      cr_assert_eq(culoss_synchronize(gpu), CULOSS_ERROR_TARGET_OUT_OF_RANGE, "family %d red %d",
                   family, red);
      cr_assert_eq(culoss_synchronize(gpu), CULOSS_OK, "cleared by the synchronize");
    }
  }
  /* BCE: a NaN probability (or one outside [0, 1]) is a deferred domain error */
  const float p[4] = {0.5f, NAN, 0.25f, 0.75f}, y[4] = {1.0f, 0.0f, 1.0f, 0.0f};
  float *d_p = dev_from(p, sizeof p), *d_y = dev_from(y, sizeof y);
  culoss_bce_options bo;
  culoss_bce_options_init(&bo);
  cr_assert_eq(culoss_bce(gpu, &bo, 1, 4, CULOSS_F32, d_p, d_y, d_loss, NULL, NULL), CULOSS_OK);
  cr_assert_eq(culoss_synchronize(gpu), CULOSS_ERROR_INVALID_VALUE);
  culoss_free(gpu, d_x), culoss_free(gpu, d_bad), culoss_free(gpu, d_good), culoss_free(gpu, d_h);
  culoss_free(gpu, d_w), culoss_free(gpu, d_loss), culoss_free(gpu, d_ws), culoss_free(gpu, d_p);
  culoss_free(gpu, d_y);
  free(x), free(w);
}

/* Run twice, compared bitwise. On a GPU this bites on any order that depends
   on scheduling (atomics, a reduction over whichever block finishes first);
   on the CPU emulator it bites only under CULOSS_EMU_SCHEDULE=random, where
   threads and blocks run in a different order each run (CI runs it so). */
Test(gpu_ce, deterministic_bitwise) {
  REQUIRE_GPU();
  const int64_t cs[] = {100, 8000, 128256};
  for (int ci = 0; ci < 3; ci++) {
    const int64_t n = ci == 2 ? 33 : 1500, c = cs[ci];
    float *x = malloc((size_t)(n * c) * sizeof(float));
    int64_t *t = malloc((size_t)n * sizeof(int64_t));
    rng_t r = rng_seeded(1000 + ci);
    for (int64_t i = 0; i < n; i++) t[i] = rng_int(&r, 0, c);
    fill_logits(&r, x, n, c, c, 3.0, 1, t);
    uint16_t *xb = malloc((size_t)(n * c) * 2);
    pack_dtype(xb, x, n * c, CULOSS_BF16);
    void *d_x = dev_from(xb, (size_t)(n * c) * 2), *d_t = dev_from(t, (size_t)n * 8);
    void *d_g = dev_alloc((size_t)(n * c) * 2);
    float *d_loss = dev_alloc(sizeof(float));
    culoss_cross_entropy_options o;
    culoss_cross_entropy_options_init(&o);
    o.label_smoothing = 0.1f;
    o.z_loss = 1e-4f;
    uint16_t *g[2];
    float loss[2];
    for (int rep = 0; rep < 2; rep++) {
      dev_poison(d_g, (size_t)(n * c) * 2);
      cr_assert_eq(culoss_cross_entropy(gpu, &o, n, c, CULOSS_BF16, d_x, c, CULOSS_I64, d_t, d_loss,
                                        d_g, NULL),
                   CULOSS_OK);
      g[rep] = malloc((size_t)(n * c) * 2);
      to_host(g[rep], d_g, (size_t)(n * c) * 2);
      to_host(&loss[rep], d_loss, sizeof(float));
    }
    cr_assert(memcmp(&loss[0], &loss[1], sizeof(float)) == 0, "c=%lld: loss differs run to run",
              (long long)c);
    cr_assert(memcmp(g[0], g[1], (size_t)(n * c) * 2) == 0, "c=%lld: grad differs", (long long)c);
    culoss_free(gpu, d_x), culoss_free(gpu, d_t), culoss_free(gpu, d_g), culoss_free(gpu, d_loss);
    free(x), free(t), free(xb), free(g[0]), free(g[1]);
  }
}

/* n * c just past 2^31 elements: 64-bit offsets on the GPU path. The last
   rows (all of them beyond element 2^31) are checked against the CPU. */
/* 64-bit offsets: n * c = 2^31 + 8 c, so rows 16384..16391 lie wholly past
   element 2^31. Every element is a hash of its global index (a 32-bit offset
   that wraps reads different values, unlike a periodic fill), every row's
   loss is compared with the CPU reference, and the in-place gradient of the
   two rows before 2^31 and all eight past it. CULOSS_REQUIRE_BIG=1 (CI) turns
   a failed 4 GiB allocation into a failure instead of a skip. */
Test(gpu_ce, offsets_past_2_pow_31) {
  REQUIRE_GPU();
  const int64_t c = 131072, past = 8, n = ((int64_t)1 << 31) / c + past;
  if (test_quick()) cr_skip_test("skipped: CULOSS_TEST_QUICK is set (4 GiB case)");
  if (test_emulated_small())
    cr_skip_test("skipped: the CPU emulator of CUDA (4 GiB case; CULOSS_EMU_BIG=1 runs it)");
  const size_t bytes = (size_t)(n * c) * 2;
  void *d_x = NULL;
  if (culoss_malloc(gpu, &d_x, bytes) != CULOSS_OK) {
    cr_assert(getenv("CULOSS_REQUIRE_BIG") == NULL, "%zu bytes of device memory: %s", bytes,
              culoss_last_error());
    cr_skip_test("skipped: %zu bytes of device memory not available (%s)", bytes,
                 culoss_last_error());
  }
  rng_t r = rng_seeded(1100);
  int64_t *t = malloc((size_t)n * 8);
  for (int64_t i = 0; i < n; i++) t[i] = rng_int(&r, 0, c);
  const int64_t blk_rows = 256;
  float *xf = malloc((size_t)(blk_rows * c) * sizeof(float));
  uint16_t *xb = malloc((size_t)(blk_rows * c) * 2);
  float *ref_loss = malloc((size_t)n * sizeof(float));
  culoss_cross_entropy_options o;
  culoss_cross_entropy_options_init(&o);
  o.reduction = CULOSS_REDUCTION_NONE;
  /* upload block by block, and the CPU reference of each block's rows */
  for (int64_t i = 0; i < n; i += blk_rows) {
    const int64_t rows = n - i < blk_rows ? n - i : blk_rows;
    for (int64_t e = 0; e < rows * c; e++) xf[e] = (float)(8.0 * hash_unit((uint64_t)(i * c + e)));
    pack_dtype(xb, xf, rows * c, CULOSS_BF16);
    cr_assert_eq(culoss_upload(gpu, (char *)d_x + (size_t)(i * c) * 2, xb, (size_t)(rows * c) * 2),
                 CULOSS_OK);
    cr_assert_eq(culoss_cross_entropy(cpu, &o, rows, c, CULOSS_BF16, xb, c, CULOSS_I64, t + i,
                                      ref_loss + i, NULL, NULL),
                 CULOSS_OK);
  }
  void *d_t = dev_from(t, (size_t)n * 8);
  float *d_loss = dev_alloc((size_t)n * sizeof(float));
  cr_assert_eq(
      culoss_cross_entropy(gpu, &o, n, c, CULOSS_BF16, d_x, c, CULOSS_I64, d_t, d_loss, d_x, NULL),
      CULOSS_OK, "%s", culoss_last_error());
  cr_assert_eq(culoss_synchronize(gpu), CULOSS_OK, "%s", culoss_last_error());
  float *loss = malloc((size_t)n * sizeof(float));
  to_host(loss, d_loss, (size_t)n * sizeof(float));
  int64_t where;
  cr_assert(worst_ratio(loss, ref_loss, n, 2e-5, 5e-5, &where) <= 1.0, "row %lld: %g vs %g",
            (long long)where, (double)loss[where], (double)ref_loss[where]);
  uint16_t *row = malloc((size_t)c * 2), *src = malloc((size_t)c * 2),
           *ref_g = malloc((size_t)c * 2);
  float *gf = malloc((size_t)c * 4), *rf = malloc((size_t)c * 4), rl;
  for (int64_t i = n - past - 2; i < n; i++) {
    for (int64_t j = 0; j < c; j++) xf[j] = (float)(8.0 * hash_unit((uint64_t)(i * c + j)));
    pack_dtype(src, xf, c, CULOSS_BF16);
    cr_assert_eq(culoss_cross_entropy(cpu, &o, 1, c, CULOSS_BF16, src, c, CULOSS_I64, &t[i], &rl,
                                      ref_g, NULL),
                 CULOSS_OK);
    to_host(row, (char *)d_x + (size_t)(i * c) * 2, (size_t)c * 2);
    unpack_dtype(gf, row, c, CULOSS_BF16);
    unpack_dtype(rf, ref_g, c, CULOSS_BF16);
    cr_assert(worst_ratio(gf, rf, c, 1e-9, 2.0 / 128, &where) <= 1.0, "row %lld col %lld: %g vs %g",
              (long long)i, (long long)where, (double)gf[where], (double)rf[where]);
  }
  culoss_free(gpu, d_x), culoss_free(gpu, d_t), culoss_free(gpu, d_loss);
  free(row), free(src), free(ref_g), free(gf), free(rf), free(xf), free(xb), free(t), free(loss);
  free(ref_loss);
}

/* Issue 14: culoss_cross_entropy_ex's per-row lse and entropy on every
   shape and dtype against the CPU backend on the same rounded logits:
   random rows, rows at large common offsets (ties and noise), rows with
   -inf logits, ignored rows (0) and an out-of-range row (NaN and the
   deferred error). */
Test(gpu_ce, cross_entropy_ex_row_outputs_every_shape) {
  REQUIRE_GPU();
  static const int64_t cs[] = {7, 100, 1000, 5000, 20000};
  uint64_t seed = 3100;
  for (int si = 0; si < 5; si++)
    for (int d = 0; d < 3; d++) {
      const int64_t n = 41, c = cs[si];
      const culoss_dtype dt = (culoss_dtype)d;
      rng_t r = rng_seeded(seed++);
      float *x = malloc((size_t)(n * c) * 4);
      int64_t t[41];
      for (int64_t i = 0; i < n; i++) {
        t[i] = i % 7 == 3 ? -100 : rng_int(&r, 0, c);
        const double off = i % 5 == 1 ? (d == CULOSS_F16 ? 3e4 : 1e4) : 0.0;
        for (int64_t j = 0; j < c; j++) {
          double v = off + 2.0 * rng_normal(&r);
          if (i % 5 == 2 && j % 3 == 0 && j != t[i]) v = -INFINITY;
          if (i % 5 == 4) v = j % 4 == 0 ? 50.0 : -50.0; /* tied maxima */
          x[i * c + j] = (float)v;
        }
      }
      round_through(x, n * c, dt);
      void *xh = malloc((size_t)(n * c) * dtype_bytes(dt));
      pack_dtype(xh, x, n * c, dt);
      float ref_lse[41], ref_ent[41], lse[41], ent[41], ref_l, l;
      culoss_ce_row_outputs ro = {ref_lse, ref_ent};
      cr_assert_eq(culoss_cross_entropy_ex(cpu, NULL, &ro, n, c, dt, xh, c, CULOSS_I64, t, &ref_l,
                                           NULL, NULL),
                   CULOSS_OK, "%s", culoss_last_error());
      void *d_x = dev_from(xh, (size_t)(n * c) * dtype_bytes(dt));
      int64_t *d_t = dev_from(t, sizeof t);
      float *d_lse = dev_alloc(sizeof lse), *d_ent = dev_alloc(sizeof ent), *d_l = dev_alloc(4);
      dev_poison(d_lse, sizeof lse), dev_poison(d_ent, sizeof ent);
      culoss_ce_row_outputs dro = {d_lse, d_ent};
      cr_assert_eq(culoss_cross_entropy_ex(gpu, NULL, &dro, n, c, dt, d_x, c, CULOSS_I64, d_t, d_l,
                                           d_x, NULL),
                   CULOSS_OK, "%s", culoss_last_error());
      cr_assert_eq(culoss_synchronize(gpu), CULOSS_OK, "%s", culoss_last_error());
      to_host(lse, d_lse, sizeof lse), to_host(ent, d_ent, sizeof ent), to_host(&l, d_l, 4);
      for (int64_t i = 0; i < n; i++) {
        cr_assert(close_enough(lse[i], ref_lse[i], 1e-4, 2e-6),
                  "c %lld dt %d lse[%lld] %.9g vs %.9g", (long long)c, d, (long long)i,
                  (double)lse[i], (double)ref_lse[i]);
        cr_assert(close_enough(ent[i], ref_ent[i], 2e-4, 1e-4),
                  "c %lld dt %d entropy[%lld] %.9g vs %.9g", (long long)c, d, (long long)i,
                  (double)ent[i], (double)ref_ent[i]);
        if (t[i] == -100)
          cr_assert(lse[i] == 0.0f && ent[i] == 0.0f, "ignored row %lld", (long long)i);
      }
      cr_assert(close_enough(l, ref_l, 1e-5, 1e-5), "loss %g vs %g", (double)l, (double)ref_l);
      /* an out-of-range target: NaN statistics for its row, the deferred error */
      t[5] = c + 3;
      cr_assert_eq(culoss_upload(gpu, d_t, t, sizeof t), CULOSS_OK);
      cr_assert_eq(culoss_upload(gpu, d_x, xh, (size_t)(n * c) * dtype_bytes(dt)), CULOSS_OK);
      cr_assert_eq(culoss_cross_entropy_ex(gpu, NULL, &dro, n, c, dt, d_x, c, CULOSS_I64, d_t, d_l,
                                           NULL, NULL),
                   CULOSS_OK);
      cr_assert_eq(culoss_synchronize(gpu), CULOSS_ERROR_TARGET_OUT_OF_RANGE);
      to_host(lse, d_lse, sizeof lse), to_host(ent, d_ent, sizeof ent);
      cr_assert(isnan(lse[5]) && isnan(ent[5]), "out-of-range row: %g %g", (double)lse[5],
                (double)ent[5]);
      culoss_free(gpu, d_x), culoss_free(gpu, d_t), culoss_free(gpu, d_lse);
      culoss_free(gpu, d_ent), culoss_free(gpu, d_l);
      free(x), free(xh);
    }
}

/* Confident rows (issue 16, item 7): row i's target logit is d = 6 + i
   ahead of every other (d = 6..30), the others on a 1/16 grid so that x - m
   is exact in fp32. 1 + s rounds s = sum e^-(d..) away from d ~ 17 on, so a
   kernel that takes log(1 + s) or p - 1 of the target loses every digit
   there (torch's fp32 error: 6e-2 relative at d = 16); kept apart, the loss
   and gradient stay within a few fp32 ulps of float64. The CPU reference
   itself is checked against the closed form of the two-class rows first.
   Every shape (c from 2 to 20000, and 100000 split over a cluster), dtype
   and option. Tolerances: 1.5e-6
   relative (fp32 loss and gradient); 16-bit gradients one ulp of their
   dtype; with the soft-cap, whose fp32 tanh carries an ulp of the capped
   logit (2e-6 at 30) into exp, 1e-5; with label smoothing, an fp32 ulp of
   eps/c more (p_j a - eps/c cancels wherever p_j ~ eps/c, confident or not),
   and with z-loss an ulp of 2 z lse at the target. */
static double elem_f32(const void *p, culoss_dtype dt, int64_t i) {
  float f;
  unpack_dtype(&f, (const char *)p + (size_t)i * dtype_bytes(dt), 1, dt);
  return f;
}

Test(gpu_ce, confident_rows_keep_fp32_accuracy) {
  REQUIRE_GPU();
  /* 100000: a row split over a cluster (fp32 and bf16, three options) */
  static const int64_t cs[] = {2, 100, 1000, 5000, 20000, 100000};
  enum { N = 25, OPTS = 6 };
  uint64_t seed = 4200;
  for (int si = 0; si < 6; si++)
    for (int d = 0; d < 3; d++)
      for (int opt = 0; opt < OPTS; opt++) {
        if (si == 5 && (d == CULOSS_F16 || opt > 2)) continue;
        const int64_t n = N, c = cs[si], ld = c + (opt % 2 ? 8 : 0); /* padded pitch too */
        const culoss_dtype dt = (culoss_dtype)d;
        const int soft = opt == 5;
        const size_t es = dtype_bytes(dt), xbytes = (size_t)(n * ld) * es;
        rng_t r = rng_seeded(seed++);
        float *x = malloc((size_t)(n * ld) * 4), *y = malloc((size_t)(n * ld) * 4);
        float *w = malloc((size_t)c * 4);
        int64_t t[N];
        cr_assert(x && y && w);
        for (int64_t j = 0; j < c; j++) w[j] = (float)(0.5 + rng_int(&r, 0, 8) / 4.0);
        for (int64_t i = 0; i < n; i++) {
          t[i] = rng_int(&r, 0, c);
          for (int64_t j = 0; j < ld; j++) {
            x[i * ld + j] = j == t[i] ? (float)(6 + i) : -(float)rng_int(&r, 0, 16) / 16.0f;
            y[i * ld + j] = j == t[i] ? 1.0f : 0.0f;
          }
        }
        void *xh = malloc(xbytes), *yh = malloc(xbytes);
        pack_dtype(xh, x, n * ld, dt), pack_dtype(yh, y, n * ld, dt);
        culoss_cross_entropy_options o;
        culoss_cross_entropy_options_init(&o);
        o.reduction = CULOSS_REDUCTION_NONE;
        if (opt == 1) o.label_smoothing = 0.1f;
        if (opt == 2) o.z_loss = 1e-4f;
        if (opt == 3) o.logit_softcap = 50.0f;
        if (opt == 4) o.class_weight = w;
        float ref_l[N], l[N];
        void *ref_g = malloc(xbytes), *g = malloc(xbytes);
        memcpy(ref_g, xh, xbytes);
        culoss_status st =
            soft ? culoss_cross_entropy_soft(cpu, &o, n, c, dt, xh, ld, yh, ref_l, ref_g, NULL)
                 : culoss_cross_entropy(cpu, &o, n, c, dt, xh, ld, CULOSS_I64, t, ref_l, ref_g,
                                        NULL);
        cr_assert_eq(st, CULOSS_OK, "%s", culoss_last_error());
        if (c == 2 && dt == CULOSS_F32 && (opt == 0 || opt == 5))
          for (int64_t i = 0; i < n; i++) { /* the oracle: log1p(e^-D), -e^-D / (1 + e^-D) */
            const double e = exp(-((double)x[i * ld + t[i]] - x[i * ld + (1 - t[i])]));
            const double gt = elem_f32(ref_g, dt, i * ld + t[i]);
            cr_assert(fabs(ref_l[i] - log1p(e)) <= 1e-7 * log1p(e), "cpu row %lld: %.9g vs %.9g",
                      (long long)i, (double)ref_l[i], log1p(e));
            cr_assert(fabs(gt + e / (1 + e)) <= 1e-7 * e, "cpu grad row %lld: %.9g vs %.9g",
                      (long long)i, gt, -e / (1 + e));
          }
        void *d_x = dev_from(xh, xbytes), *d_y = dev_from(yh, xbytes);
        int64_t *d_t = dev_from(t, sizeof t);
        float *d_w = dev_from(w, (size_t)c * 4), *d_l = dev_alloc(sizeof l);
        void *d_g = dev_from(xh, xbytes);
        for (int64_t i = 0; i < n; i++)
          dev_poison((char *)d_g + (size_t)(i * ld) * es, (size_t)c * es);
        dev_poison(d_l, sizeof l);
        if (opt == 4) o.class_weight = d_w;
        st = soft ? culoss_cross_entropy_soft(gpu, &o, n, c, dt, d_x, ld, d_y, d_l, d_g, NULL)
                  : culoss_cross_entropy(gpu, &o, n, c, dt, d_x, ld, CULOSS_I64, d_t, d_l, d_g,
                                         NULL);
        cr_assert_eq(st, CULOSS_OK, "%s", culoss_last_error());
        cr_assert_eq(culoss_synchronize(gpu), CULOSS_OK, "%s", culoss_last_error());
        to_host(l, d_l, sizeof l), to_host(g, d_g, xbytes);
        const double lt = opt == 3 ? 1e-5 : 1.5e-6;
        const double gt = dt == CULOSS_F32 ? lt : (dt == CULOSS_F16 ? 1.0 / 1024 : 1.0 / 128);
        for (int64_t i = 0; i < n; i++) {
          cr_assert(fabs(l[i] - ref_l[i]) <= lt * fabs(ref_l[i]),
                    "c %lld dt %d opt %d row %lld (d %lld): loss %.9g vs %.9g", (long long)c, d,
                    opt, (long long)i, (long long)(6 + i), (double)l[i], (double)ref_l[i]);
          for (int64_t j = 0; j < ld; j++) {
            const double a = elem_f32(g, dt, i * ld + j), b = elem_f32(ref_g, dt, i * ld + j);
            /* with smoothing, p_j a - eps/c cancels where p_j ~ eps/c (any row),
               and z-loss's target p - 1 + 2 z lse where s ~ 2 z lse: an fp32
               ulp or two of the terms it subtracts, on top */
            double bj = j < c && opt == 1 ? o.label_smoothing / (double)c : 0.0;
            if (j == t[i] && opt == 2) bj = 2.0 * o.z_loss * (7 + i); /* 2 z lse, lse < d + 1 */
            const double sub = dt == CULOSS_F16 ? 6e-8 : 1e-30;       /* fp16 subnormal ulp */
            cr_assert(fabs(a - b) <= gt * fabs(b) + 5e-7 * bj + sub,
                      "c %lld dt %d opt %d row %lld (d %lld) col %lld%s: grad %.9g vs %.9g",
                      (long long)c, d, opt, (long long)i, (long long)(6 + i), (long long)j,
                      j == t[i] ? " (target)" : "", a, b);
          }
        }
        culoss_free(gpu, d_x), culoss_free(gpu, d_y), culoss_free(gpu, d_t);
        culoss_free(gpu, d_w), culoss_free(gpu, d_l), culoss_free(gpu, d_g);
        free(x), free(y), free(w), free(xh), free(yh), free(ref_g), free(g);
      }
}
