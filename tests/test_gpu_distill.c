/* test_gpu_distill.c: the CUDA backend of the distillation losses against
   the CPU reference, on fresh random inputs rounded to each dtype (large
   magnitudes, -inf teacher and student logits), poisoned outputs: every
   dtype, beta in {0, 0.25, 0.5, 1}, TVD, temperatures, labels with ignored
   rows, every reduction, padded row pitch, unaligned rows (the one-element
   path), in-place gradients, grad_loss, the hard term, the cached,
   partly cached and streaming row paths, confident rows, the deferred
   out-of-range label, the fused linear form (several row blocks, both
   grad_weight dtypes, accumulate), and rows past 2^31 elements. Every test
   skips visibly ("skipped: no CUDA device") without a GPU. */
#define _POSIX_C_SOURCE 200809L /* setenv */
#include <criterion/criterion.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "helpers.h"

static culoss_context *gpu, *cpu;
static void gpu_setup(void) { gpu_open(&gpu, &cpu); }
static void gpu_teardown(void) { gpu_close(gpu, cpu); }
TestSuite(gpu_distill, .init = gpu_setup, .fini = gpu_teardown, .timeout = 900);

typedef struct {
  int64_t n, v, ld_s, ld_t;
  culoss_dtype dt;
  int tvd;
  float beta, T;
  culoss_reduction red;
  int labels; /* 0 none, 1 i32, 2 i64 */
  float ws, wh;
  int inplace, grad, grad_loss, offset, confident;
  int nan_rows;  /* row 0: a NaN student logit, row 1: a NaN teacher logit */
  int hard_opts; /* the hard term's CE options: smoothing 0.1 (and, 2, class weights, z-loss) */
  uint64_t seed;
} dcase;

/* The gradient tolerance of a dtype (relative): about one unit of its last
   place, so a 1% error fails for every dtype. */
static double grad_rtol(culoss_dtype dt) {
  return dt == CULOSS_BF16 ? 1.0 / 128 : (dt == CULOSS_F16 ? 1.0 / 1024 : 4e-6);
}

static void fill_pair(rng_t *r, const dcase *c, float *s, float *t) {
  fill_logits(r, t, c->n, c->v, c->ld_t, 2.0, 1, NULL);
  fill_logits(r, s, c->n, c->v, c->ld_s, 2.0, 0, NULL);
  for (int64_t i = 0; i < c->n; i++)
    for (int64_t j = 0; j < c->v; j++) {
      float *sj = s + i * c->ld_s + j, *tj = t + i * c->ld_t + j;
      if (c->confident) { /* the top far ahead in both rows, the rest within +-2 */
        *sj = j == i % c->v ? 22.0f : (float)(0.5 * rng_normal(r));
        *tj = j == i % c->v ? 23.0f : (*tj == -INFINITY ? *tj : (float)(0.5 * rng_normal(r)));
      }
      if (*tj == -INFINITY && !c->tvd && c->beta == 1.0f) *tj = -25.0f; /* reverse KL finite */
      if (*tj == -INFINITY && rng_uniform(r) < 0.5) *sj = -INFINITY;    /* both -inf: no term */
      /* smoothing over a -inf student logit is +inf: keep the loss finite, comparable */
      if (c->hard_opts && *sj == -INFINITY) *sj = -30.0f;
      if (c->dt == CULOSS_F16 && isfinite(*sj)) *sj = fmaxf(fminf(*sj, 60000.0f), -60000.0f);
    }
  if (c->nan_rows && c->n >= 2 && c->v >= 6) s[3] = NAN, t[c->ld_t + 5] = NAN;
  round_through(s, c->n * c->ld_s, c->dt);
  round_through(t, c->n * c->ld_t, c->dt);
}

static void run_case(const dcase *c) {
  rng_t r = rng_seeded(c->seed);
  const size_t es = dtype_bytes(c->dt), off = c->offset ? es : 0;
  const int64_t n = c->n, v = c->v, ns = n * c->ld_s, nt = n * c->ld_t;
  float *s = malloc((size_t)ns * 4 + 4), *t = malloc((size_t)nt * 4 + 4);
  fill_pair(&r, c, s, t);
  void *hs = malloc((size_t)ns * es + 16), *ht = malloc((size_t)nt * es + 16);
  pack_dtype(hs, s, ns, c->dt), pack_dtype(ht, t, nt, c->dt);
  int64_t *y64 = malloc((size_t)n * 8);
  int32_t *y32 = malloc((size_t)n * 4);
  for (int64_t i = 0; i < n; i++) {
    y64[i] = rng_uniform(&r) < 0.25 ? -100 : rng_int(&r, 0, v);
    y32[i] = (int32_t)y64[i];
  }
  const void *hy = c->labels == 1 ? (const void *)y32 : (const void *)y64;
  const culoss_index_type tt = c->labels == 1 ? CULOSS_I32 : CULOSS_I64;
  float *gl = malloc((size_t)n * 4);
  for (int64_t i = 0; i < n; i++) gl[i] = (float)(rng_uniform(&r) * 2.0 - 0.5);
  const int64_t nl = c->red == CULOSS_REDUCTION_NONE ? n : 1;

  culoss_distill_options o;
  culoss_distill_options_init(&o);
  o.divergence = c->tvd ? CULOSS_DISTILL_TVD : CULOSS_DISTILL_JSD;
  o.beta = c->beta, o.temperature = c->T, o.reduction = c->red;
  o.weight_soft = c->ws, o.weight_hard = c->wh;
  /* the hard term's options: class weights in [0.25, 2] (device memory on the GPU) */
  culoss_cross_entropy_options ho, ho_cpu;
  culoss_cross_entropy_options_init(&ho);
  float *cw = malloc((size_t)v * 4), *dcw = NULL;
  for (int64_t j = 0; j < v; j++) cw[j] = (float)(0.25 + 1.75 * rng_uniform(&r));
  if (c->hard_opts) {
    ho.label_smoothing = 0.1f;
    if (c->hard_opts == 2) ho.z_loss = 0.01f, dcw = dev_from(cw, (size_t)v * 4);
    ho.class_weight = dcw;
    o.hard_options = &ho;
  }
  ho_cpu = ho;
  ho_cpu.class_weight = dcw ? cw : NULL;

  /* device copies (at a one-element offset: rows not 16-byte aligned) */
  char *ds_ = dev_alloc((size_t)ns * es + 16), *dt_ = dev_alloc((size_t)nt * es + 16);
  void *dS = ds_ + off, *dT = dt_ + off;
  cr_assert_eq(culoss_upload(gpu, dS, hs, (size_t)ns * es), CULOSS_OK);
  cr_assert_eq(culoss_upload(gpu, dT, ht, (size_t)nt * es), CULOSS_OK);
  void *dy = c->labels ? dev_from(hy, (size_t)n * (c->labels == 1 ? 4 : 8)) : NULL;
  float *dgl = c->grad_loss ? dev_from(gl, (size_t)nl * 4) : NULL;
  float *dl = dev_alloc((size_t)nl * 4);
  char *dg_ = c->grad && !c->inplace ? dev_alloc((size_t)ns * es + 16) : NULL;
  void *dG = c->inplace ? dS : (dg_ ? dg_ + off : NULL);
  dev_poison(dl, (size_t)nl * 4);
  if (dg_) dev_poison(dg_, (size_t)ns * es + 16);
  cr_assert_eq(culoss_distill(gpu, &o, n, v, c->dt, dS, c->ld_s, dT, c->ld_t, tt,
                              c->labels ? dy : NULL, dl, dG, dgl),
               CULOSS_OK, "%s", culoss_last_error());
  cr_assert_eq(culoss_synchronize(gpu), CULOSS_OK, "%s", culoss_last_error());

  /* the CPU reference on the same (rounded) inputs */
  if (c->hard_opts) o.hard_options = &ho_cpu;
  float *rl = malloc((size_t)nl * 4), *gl_cpu = c->grad_loss ? gl : NULL;
  void *rg = malloc((size_t)ns * es + 16);
  poison(rg, (size_t)ns * es);
  cr_assert_eq(culoss_distill(cpu, &o, n, v, c->dt, hs, c->ld_s, ht, c->ld_t, tt,
                              c->labels ? hy : NULL, rl, c->grad ? rg : NULL, gl_cpu),
               CULOSS_OK, "%s", culoss_last_error());
  float *l = malloc((size_t)nl * 4);
  to_host(l, dl, (size_t)nl * 4);
  for (int64_t i = 0; i < nl; i++)
    cr_assert(close_enough(l[i], rl[i], 1e-6, 1e-5),
              "n %lld v %lld dt %d tvd %d beta %g T %g red %d: loss[%lld] %.9g vs %.9g",
              (long long)n, (long long)v, (int)c->dt, c->tvd, (double)c->beta, (double)c->T,
              (int)c->red, (long long)i, (double)l[i], (double)rl[i]);
  if (c->grad) {
    void *hg = malloc((size_t)ns * es + 16);
    to_host(hg, dG, (size_t)ns * es);
    float *a = malloc((size_t)ns * 4), *b = malloc((size_t)ns * 4);
    unpack_dtype(a, hg, ns, c->dt), unpack_dtype(b, rg, ns, c->dt);
    /* the rows' gradient scale: grad_loss over the reduction's divisor */
    int64_t kept = 0;
    for (int64_t i = 0; i < n; i++) kept += !c->labels || y64[i] != -100;
    const double D = c->red == CULOSS_REDUCTION_BATCHMEAN ? (double)kept
                     : c->red == CULOSS_REDUCTION_MEAN    ? (double)(n * v)
                                                          : 1.0;
    /* each row's loss (reverse KL's row constant is the loss itself) */
    float *row_l = malloc((size_t)n * 4);
    culoss_distill_options on = o;
    on.reduction = CULOSS_REDUCTION_NONE;
    cr_assert_eq(culoss_distill(cpu, &on, n, v, c->dt, hs, c->ld_s, ht, c->ld_t, tt,
                                c->labels ? hy : NULL, row_l, NULL, NULL),
                 CULOSS_OK);
    for (int64_t i = 0; i < n; i++) {
      const double g = c->grad_loss ? gl[c->red == CULOSS_REDUCTION_NONE ? i : 0] : 1.0;
      const double sc = fabs(g) / (c->red == CULOSS_REDUCTION_NONE ? 1.0 : D) *
                        (fabs(c->ws) / c->T + fabs(c->wh) * (c->hard_opts == 2 ? 2.0 : 1.0));
      double rowmax = 0.0, m = -INFINITY, z = 0.0;
      for (int64_t j = 0; j < v; j++) rowmax = fmax(rowmax, fabs(b[i * c->ld_s + j]));
      for (int64_t j = 0; j < v; j++) m = fmax(m, s[i * c->ld_s + j] / c->T);
      for (int64_t j = 0; j < v; j++) z += exp(s[i * c->ld_s + j] / c->T - m);
      double mt = -INFINITY, zt = 0.0;
      for (int64_t j = 0; j < v; j++) mt = fmax(mt, t[i * c->ld_t + j] / c->T);
      for (int64_t j = 0; j < v; j++) zt += exp(t[i * c->ld_t + j] / c->T - mt);
      for (int64_t j = 0; j < v; j++) {
        const int64_t e = i * c->ld_s + j;
        /* atol: fp32's rounding of the row's scale, and of Q_j times the
           terms of u_j - sum Q u, which cancel where u_j is near its
           Q-weighted mean (the mean, reverse KL's loss, carries the fp32
           error of the probabilities it sums); and one step of the dtype's
           subnormals (fp16's 2^-24; fp32 and bf16 subnormals are below
           FLT_MIN, noise) */
        double qj = exp(s[e] / c->T - m) / z;
        const double pj = exp(t[i * c->ld_t + j] / c->T - mt) / zt;
        if (!isfinite(qj)) qj = 0.0; /* a NaN row: the values themselves must be NaN */
        if (c->tvd && fabs(pj - qj) <= 1e-5 * (pj + qj))
          continue; /* TVD's kink (P = Q within fp32 rounding): any subgradient */
        const double lr = isfinite(row_l[i]) ? fabs(row_l[i]) : 0.0;
        const double floor = c->dt == CULOSS_F16 ? 6e-8 : 1.2e-38; /* a subnormal step */
        /* confident rows: the top's Q - 1 and P - 1 are kept exactly (no
           cancellation term), so the row's own scale is the tolerance */
        const double qterm = c->confident ? 0.0 : sc * qj * (1.0 + lr);
        cr_assert(close_enough(a[e], b[e], floor + 1e-6 * (rowmax + qterm), grad_rtol(c->dt)),
                  "n %lld v %lld dt %d tvd %d beta %g T %g red %d inplace %d: grad[%lld][%lld] "
                  "%.9g vs %.9g (row max %.3g)",
                  (long long)n, (long long)v, (int)c->dt, c->tvd, (double)c->beta, (double)c->T,
                  (int)c->red, c->inplace, (long long)i, (long long)j, (double)a[e], (double)b[e],
                  rowmax);
      }
      if (!c->inplace) /* the pitch's padding is not touched */
        for (int64_t j = v; j < c->ld_s; j++)
          cr_assert(c->dt == CULOSS_F32 ? is_poison_f32(a[i * c->ld_s + j])
                                        : a[i * c->ld_s + j] != a[i * c->ld_s + j],
                    "padding written at [%lld][%lld]", (long long)i, (long long)j);
    }
    free(hg), free(a), free(b), free(row_l);
  }
  culoss_free(gpu, ds_), culoss_free(gpu, dt_), culoss_free(gpu, dy), culoss_free(gpu, dgl);
  culoss_free(gpu, dl), culoss_free(gpu, dg_), culoss_free(gpu, dcw);
  free(s), free(t), free(hs), free(ht), free(y64), free(y32), free(gl), free(rl), free(rg), free(l);
  free(cw);
}

static const float BETAS[] = {0.0f, 0.25f, 0.5f, 1.0f};

/* Every dtype x divergence x reduction on short and medium rows. */
Test(gpu_distill, matches_the_cpu_reference) {
  REQUIRE_GPU();
  uint64_t seed = 2200;
  const int64_t vs[2] = {37, 1000};
  for (int dt = 0; dt < 3; dt++)
    for (int k = 0; k < 5; k++)
      for (int red = 0; red < 4; red++)
        for (int vi = 0; vi < 2; vi++) {
          dcase c = {0};
          c.n = vi ? 5 : 9, c.v = vs[vi], c.ld_s = c.v + (red == 1 ? 3 : 0), c.ld_t = c.v + 8;
          c.dt = (culoss_dtype)dt, c.tvd = k == 4, c.beta = k < 4 ? BETAS[k] : 0.0f;
          c.T = red == 2 ? 2.0f : (red == 3 ? 0.7f : 1.0f);
          c.red = (culoss_reduction)red, c.ws = 1.0f;
          /* labels of each type; none for the means' long rows (n rows divide) */
          c.labels = vi == 1 && red >= 2 ? 0 : 1 + (k & 1) * (red != 1);
          c.grad = 1, c.grad_loss = red != 3, c.inplace = red == 0 && k == 2;
          c.nan_rows = red == 0; /* NONE: a NaN row does not hide the others */
          c.seed = seed++;
          run_case(&c);
        }
}

/* 16-byte rows (v a multiple of the pack), aligned or one element off, the
   hard term alone and with the soft one, confident rows. */
Test(gpu_distill, packs_hard_term_and_confident_rows) {
  REQUIRE_GPU();
  uint64_t seed = 2300;
  for (int dt = 0; dt < 3; dt++)
    for (int k = 0; k < 5; k++)
      for (int variant = 0; variant < 4; variant++) {
        dcase c = {0};
        c.n = 6, c.v = 512, c.ld_s = 512 + 16, c.ld_t = 512;
        c.dt = (culoss_dtype)dt, c.tvd = k == 4, c.beta = k < 4 ? BETAS[k] : 0.0f, c.T = 1.0f;
        c.red = variant == 3 ? CULOSS_REDUCTION_NONE : CULOSS_REDUCTION_BATCHMEAN;
        c.labels = 2, c.grad = 1;
        c.ws = variant == 1 ? 0.0f : 0.5f, c.wh = variant == 1 || variant == 2 ? 1.5f : 0.0f;
        c.T = variant == 2 ? 3.0f : 1.0f;
        c.offset = variant == 0 && dt > 0;
        c.confident = variant == 3;
        c.inplace = variant == 2;
        c.seed = seed++;
        run_case(&c);
      }
}

/* The hard term with culoss_cross_entropy's options (smoothing; class
   weights and z-loss), alone and beside the divergence: every dtype and
   reduction, a temperature (the hard term's own distribution), the
   one-element path, a strided grid (W read by every block). */
Test(gpu_distill, hard_term_options) {
  REQUIRE_GPU();
  uint64_t seed = 2350;
  for (int dt = 0; dt < 3; dt++)
    for (int red = 0; red < 4; red++)
      for (int variant = 0; variant < 3; variant++) {
        dcase c = {0};
        c.n = 7, c.v = variant == 2 ? 1003 : 256, c.ld_s = c.v, c.ld_t = c.v;
        c.dt = (culoss_dtype)dt, c.beta = variant == 1 ? 0.0f : 0.5f, c.tvd = variant == 2;
        c.T = variant == 0 ? 1.0f : 2.5f;
        c.red = (culoss_reduction)red, c.labels = 1 + (red & 1), c.grad = 1;
        c.grad_loss = red == 0;
        c.ws = variant == 0 ? 0.0f : 0.7f, c.wh = 1.3f, c.hard_opts = 1 + (variant != 1);
        c.inplace = variant == 1 && red == 2;
        c.seed = seed++;
        if (variant == 2) cr_assert_eq(culoss_set_grid_limit(gpu, 2), CULOSS_OK);
        run_case(&c);
        cr_assert_eq(culoss_set_grid_limit(gpu, 0), CULOSS_OK);
      }
}

/* Long rows: fully cached, partly cached and streamed (the cache capped by
   CULOSS_CE_CACHE_BYTES, read at culoss_create), a 512-thread block. */
Test(gpu_distill, long_rows_cached_and_streamed) {
  REQUIRE_GPU();
  const char *caps[3] = {NULL, "20000", "0"};
  uint64_t seed = 2400;
  for (int ci = 0; ci < 3; ci++) {
    if (caps[ci])
      setenv("CULOSS_CE_CACHE_BYTES", caps[ci], 1);
    else
      unsetenv("CULOSS_CE_CACHE_BYTES");
    gpu_reopen(&gpu);
    for (int dt = 0; dt < 3; dt++)
      for (int k = 0; k < 5; k += 2) {
        dcase c = {0};
        c.n = 3, c.v = test_quick() ? 17000 : 40000 + 8, c.ld_s = c.v, c.ld_t = c.v;
        c.dt = (culoss_dtype)dt, c.tvd = k == 4, c.beta = k < 4 ? BETAS[k] : 0.0f, c.T = 1.5f;
        c.red = CULOSS_REDUCTION_SUM, c.labels = 0, c.ws = 1.0f, c.grad = 1;
        c.inplace = ci == 1, c.seed = seed++;
        run_case(&c);
      }
  }
  unsetenv("CULOSS_CE_CACHE_BYTES");
  gpu_reopen(&gpu);
}

/* Row pairs too long for one block's shared memory, split over a
   thread-block cluster (the emulator has them): 2 and 3 blocks holding the
   whole pair (bf16 70K and 128K), 8 with the rest of each slice re-read
   (fp32 262147, the one-element path; fp32 100000 with a capped cache),
   a padded pitch, every divergence, the hard term with its options (and
   alone: no second reduction, one barrier per row), in place, every reduction, more rows than clusters (a grid of 8 blocks: each
   cluster walks several rows, its slots alternating by parity); and
   CULOSS_CE_CLUSTER=0 (one block per row) once. */
Test(gpu_distill, rows_split_over_a_cluster) {
  REQUIRE_GPU();
  static const struct {
    int64_t v, ld;
    culoss_dtype dt;
    const char *cache;
  } cs[] = {{70000, 70000, CULOSS_BF16, ""},
            {128256, 128264, CULOSS_BF16, ""},
            {262147, 262147, CULOSS_F32, ""},
            {100000, 100000, CULOSS_F32, "65536"},
            {65536, 65536, CULOSS_F16, ""}};
  uint64_t seed = 2450;
  for (int cl = 1; cl >= 0; cl--)
    for (size_t ci = 0; ci < sizeof cs / sizeof cs[0]; ci++) {
      setenv("CULOSS_CE_CLUSTER", cl ? "1" : "0", 1);
      setenv("CULOSS_CE_CACHE_BYTES", cs[ci].cache, 1);
      gpu_reopen(&gpu);
      if (ci != 3) cr_assert_eq(culoss_set_grid_limit(gpu, 8), CULOSS_OK);
      dcase c = {0};
      c.n = test_quick() ? 3 : 6, c.v = cs[ci].v, c.ld_s = cs[ci].ld, c.ld_t = cs[ci].v;
      c.dt = cs[ci].dt, c.tvd = ci == 2, c.beta = BETAS[ci % 4], c.T = ci % 2 ? 1.0f : 1.7f;
      c.red = (culoss_reduction)(ci % 4), c.labels = 1 + (int)(ci % 2), c.grad = 1;
      c.grad_loss = c.red == CULOSS_REDUCTION_NONE;
      c.ws = 1.0f, c.wh = ci == 3 ? 0.0f : 0.5f, c.hard_opts = ci == 0 ? 0 : 1 + (int)(ci % 2);
      if (ci == 4) /* the plain hard term alone: one cluster barrier per row */
        c.ws = 0.0f, c.wh = 1.0f, c.hard_opts = 0;
      c.inplace = ci % 2 == 0, c.seed = seed++;
      run_case(&c);
      if (!cl) break; /* one case without clusters is enough to compare paths */
    }
  unsetenv("CULOSS_CE_CLUSTER");
  unsetenv("CULOSS_CE_CACHE_BYTES");
  gpu_reopen(&gpu);
}

/* A grid smaller than the rows (each block strides) gives the same result. */
Test(gpu_distill, strided_grid) {
  REQUIRE_GPU();
  cr_assert_eq(culoss_set_grid_limit(gpu, 3), CULOSS_OK);
  for (int red = 0; red < 4; red++) {
    dcase c = {0};
    c.n = 17, c.v = 100, c.ld_s = c.ld_t = 100, c.dt = CULOSS_BF16, c.beta = 0.5f, c.T = 1.0f;
    c.red = (culoss_reduction)red, c.labels = 2, c.ws = 1.0f, c.wh = 0.5f, c.grad = 1;
    c.seed = 2500 + (uint64_t)red;
    run_case(&c);
  }
  cr_assert_eq(culoss_set_grid_limit(gpu, 0), CULOSS_OK);
}

/* A hard-term label out of range: NaN row loss, zero gradient row, and
   CULOSS_ERROR_TARGET_OUT_OF_RANGE at the next synchronize; good rows are
   unaffected. */
Test(gpu_distill, out_of_range_label_is_deferred) {
  REQUIRE_GPU();
  const int64_t n = 3, v = 8;
  float s[24], t[24], l[3], g[24];
  for (int e = 0; e < 24; e++) s[e] = (float)(e % 5) * 0.3f, t[e] = (float)(e % 7) * 0.2f;
  const int64_t y[3] = {1, 8, -100};
  culoss_distill_options o;
  culoss_distill_options_init(&o);
  o.reduction = CULOSS_REDUCTION_NONE, o.weight_hard = 1.0f;
  float *dS = dev_from(s, sizeof s), *dT = dev_from(t, sizeof t), *dl = dev_alloc(12);
  float *dg = dev_alloc(sizeof g);
  int64_t *dy = dev_from(y, sizeof y);
  dev_poison(dg, sizeof g);
  cr_assert_eq(
      culoss_distill(gpu, &o, n, v, CULOSS_F32, dS, v, dT, v, CULOSS_I64, dy, dl, dg, NULL),
      CULOSS_OK);
  cr_assert_eq(culoss_synchronize(gpu), CULOSS_ERROR_TARGET_OUT_OF_RANGE);
  cr_assert_eq(culoss_synchronize(gpu), CULOSS_OK, "the flag is cleared");
  to_host(l, dl, 12), to_host(g, dg, sizeof g);
  cr_assert(isfinite(l[0]) && l[0] > 0.0f);
  cr_assert(isnan(l[1]));
  cr_assert_eq(l[2], 0.0f);
  for (int j = 0; j < 8; j++) cr_assert(g[8 + j] == 0.0f && g[16 + j] == 0.0f);
  culoss_free(gpu, dS), culoss_free(gpu, dT), culoss_free(gpu, dl), culoss_free(gpu, dg);
  culoss_free(gpu, dy);
}

/* ------------------------------------------------------- the linear form */

/* Inputs whose logits are exact in every dtype (hidden and weights in
   {0, +-1/2, +-1}, d <= 8: multiples of 1/4 below 16), so the GPU's dtype
   logits equal the CPU reference's double ones. The loss at fp32
   accuracy; each gradient within the rounding of the dtype gradient of the
   logits it is a sum over (2^-8 of the sum of |terms| for bf16). */
static float exact_val(rng_t *r) {
  static const float vals[5] = {0.0f, 0.5f, -0.5f, 1.0f, -1.0f};
  return vals[rng_int(r, 0, 5)];
}

/* hopt: the hard term with smoothing 0.1, class weights and z-loss 0.01 */
static void linear_case(culoss_dtype dt, int gw_f32, int accumulate, int red, int bias, float wh,
                        int hopt, uint64_t seed) {
  const int64_t n = 11, ds = 6, dtd = 8, v = 300;
  rng_t r = rng_seeded(seed);
  const size_t es = dtype_bytes(dt);
  float *hs = malloc(n * ds * 4), *w_s = malloc(v * ds * 4), *bs = malloc(v * 4);
  float *ht = malloc(n * dtd * 4), *w_t = malloc(v * dtd * 4), *bt = malloc(v * 4);
  for (int64_t e = 0; e < n * ds; e++) hs[e] = exact_val(&r);
  for (int64_t e = 0; e < v * ds; e++) w_s[e] = exact_val(&r);
  for (int64_t e = 0; e < n * dtd; e++) ht[e] = exact_val(&r);
  for (int64_t e = 0; e < v * dtd; e++) w_t[e] = exact_val(&r);
  for (int64_t e = 0; e < v; e++) bs[e] = exact_val(&r), bt[e] = exact_val(&r);
  void *p[6];
  const float *src[6] = {hs, w_s, bs, ht, w_t, bt};
  const int64_t cnt[6] = {n * ds, v * ds, v, n * dtd, v * dtd, v};
  void *dp[6];
  for (int q = 0; q < 6; q++) {
    p[q] = malloc((size_t)cnt[q] * es);
    pack_dtype(p[q], src[q], cnt[q], dt);
    dp[q] = dev_from(p[q], (size_t)cnt[q] * es);
  }
  int64_t y[11];
  for (int64_t i = 0; i < n; i++) y[i] = i % 4 == 1 ? -100 : rng_int(&r, 0, v);
  int64_t *dy = dev_from(y, sizeof y);
  culoss_distill_options o;
  culoss_distill_options_init(&o);
  o.reduction = (culoss_reduction)red, o.beta = 0.25f, o.temperature = 2.0f;
  o.weight_soft = 0.8f, o.weight_hard = wh;
  float *cw = malloc((size_t)v * 4);
  for (int64_t j = 0; j < v; j++) cw[j] = 0.5f + 0.25f * (float)(j % 5);
  float *dcw = dev_from(cw, (size_t)v * 4);
  culoss_cross_entropy_options ho, ho_cpu;
  culoss_cross_entropy_options_init(&ho);
  ho.label_smoothing = 0.1f, ho.z_loss = 0.01f, ho.class_weight = dcw;
  ho_cpu = ho, ho_cpu.class_weight = cw;
  if (hopt) o.hard_options = &ho;
  culoss_linear_ce_options lo;
  culoss_linear_ce_options_init(&lo);
  lo.grad_weight_dtype = gw_f32 ? CULOSS_F32 : CULOSS_DTYPE_INPUT;
  lo.accumulate = accumulate;
  const culoss_dtype gwt = gw_f32 ? CULOSS_F32 : dt;
  const size_t gs = dtype_bytes(gwt);
  size_t wsb;
  cr_assert_eq(culoss_linear_distill_workspace_size(gpu, &lo, n, ds, dtd, v, dt, &wsb), CULOSS_OK);
  void *dws = dev_alloc(wsb);
  const int64_t nl = red == CULOSS_REDUCTION_NONE ? n : 1;
  float *dl = dev_alloc((size_t)nl * 4);
  void *dgh = dev_alloc((size_t)(n * ds) * es), *dgw = dev_alloc((size_t)(v * ds) * gs);
  void *dgb = bias ? dev_alloc((size_t)v * gs) : NULL;
  /* accumulate: start both from a known gradient (the CPU sees the same) */
  float *g0 = malloc((size_t)(v * ds) * 4);
  void *hg0 = malloc((size_t)(v * ds) * gs), *hb0 = malloc((size_t)v * gs);
  for (int64_t e = 0; e < v * ds; e++) g0[e] = exact_val(&r) * 0.25f;
  pack_dtype(hg0, g0, v * ds, gwt), pack_dtype(hb0, g0, v, gwt);
  if (accumulate) {
    cr_assert_eq(culoss_upload(gpu, dgw, hg0, (size_t)(v * ds) * gs), CULOSS_OK);
    if (dgb) cr_assert_eq(culoss_upload(gpu, dgb, hb0, (size_t)v * gs), CULOSS_OK);
  } else {
    dev_poison(dgw, (size_t)(v * ds) * gs);
    if (dgb) dev_poison(dgb, (size_t)v * gs);
  }
  dev_poison(dgh, (size_t)(n * ds) * es), dev_poison(dl, (size_t)nl * 4);
  /* an upstream gradient, per row for NONE */
  float glv[11];
  for (int64_t i = 0; i < n; i++) glv[i] = (float)(i % 3) - 0.75f;
  float *dglv = dev_from(glv, (size_t)nl * 4);
  cr_assert_eq(culoss_linear_distill(gpu, &o, &lo, n, ds, dtd, v, dt, dp[0], dp[1],
                                     bias ? dp[2] : NULL, dp[3], dp[4], bias ? dp[5] : NULL,
                                     CULOSS_I64, dy, dl, dgh, dgw, dgb, dglv, dws, wsb),
               CULOSS_OK, "%s", culoss_last_error());
  cr_assert_eq(culoss_synchronize(gpu), CULOSS_OK, "%s", culoss_last_error());
  /* CPU */
  if (hopt) o.hard_options = &ho_cpu;
  float *rl = malloc((size_t)nl * 4), *l = malloc((size_t)nl * 4);
  void *rgh = malloc((size_t)(n * ds) * es), *rgw = malloc((size_t)(v * ds) * gs);
  void *rgb = malloc((size_t)v * gs);
  memcpy(rgw, hg0, (size_t)(v * ds) * gs), memcpy(rgb, hb0, (size_t)v * gs);
  cr_assert_eq(culoss_linear_distill(cpu, &o, &lo, n, ds, dtd, v, dt, p[0], p[1],
                                     bias ? p[2] : NULL, p[3], p[4], bias ? p[5] : NULL, CULOSS_I64,
                                     y, rl, rgh, rgw, bias ? rgb : NULL, glv, NULL, 0),
               CULOSS_OK, "%s", culoss_last_error());
  to_host(l, dl, (size_t)nl * 4);
  for (int64_t i = 0; i < nl; i++)
    cr_assert(close_enough(l[i], rl[i], 1e-6, 1e-5), "dt %d red %d loss[%lld] %.9g vs %.9g",
              (int)dt, red, (long long)i, (double)l[i], (double)rl[i]);
  /* The gradients: the GPU rounds the logits' gradient G to the dtype
     before its GEMMs, so each output may differ from the double reference by
     the sum of its terms' rounding, (u |G_ij| + f) |other factor|, u the
     dtype's unit roundoff and f half its smallest subnormal step, plus the
     output's own rounding (rtol). G comes from culoss_distill on the exact
     logits (fp32: the inputs make them exact). */
  /* u: the rounding, plus the kernel's own fp32 accuracy on G (1e-6 of the
     element and of its row's largest, as matches_the_cpu_reference checks) */
  const double u = 2e-6 + (dt == CULOSS_BF16 ? 1.0 / 256 : (dt == CULOSS_F16 ? 1.0 / 2048 : 0.0));
  const double f = dt == CULOSS_F16 ? 3e-8 : 1e-45;
  float *S = malloc((size_t)(n * v) * 4), *Tl = malloc((size_t)(n * v) * 4);
  float *G = malloc((size_t)(n * v) * 4), *lg = malloc((size_t)n * 4);
  for (int64_t i = 0; i < n; i++)
    for (int64_t j = 0; j < v; j++) {
      double zs = bias ? bs[j] : 0.0, zt = bias ? bt[j] : 0.0;
      for (int64_t k = 0; k < ds; k++) zs += (double)hs[i * ds + k] * w_s[j * ds + k];
      for (int64_t k = 0; k < dtd; k++) zt += (double)ht[i * dtd + k] * w_t[j * dtd + k];
      S[i * v + j] = (float)zs, Tl[i * v + j] = (float)zt;
    }
  cr_assert_eq(culoss_distill(cpu, &o, n, v, CULOSS_F32, S, v, Tl, v, CULOSS_I64, y, lg, G, glv),
               CULOSS_OK);
  double *gmax = calloc((size_t)n, sizeof *gmax);
  for (int64_t i = 0; i < n; i++)
    for (int64_t j = 0; j < v; j++) gmax[i] = fmax(gmax[i], 2e-6 * fabs(G[i * v + j]));
  const double rt = grad_rtol(dt);
  {
    void *hgh = malloc((size_t)(n * ds) * es);
    float *a = malloc((size_t)(n * ds) * 4), *b = malloc((size_t)(n * ds) * 4);
    to_host(hgh, dgh, (size_t)(n * ds) * es);
    unpack_dtype(a, hgh, n * ds, dt), unpack_dtype(b, rgh, n * ds, dt);
    for (int64_t i = 0; i < n; i++)
      for (int64_t k = 0; k < ds; k++) {
        double bound = 0.0;
        for (int64_t j = 0; j < v; j++)
          bound += (u * fabs(G[i * v + j]) + gmax[i] + f) * fabs(w_s[j * ds + k]);
        const int64_t e = i * ds + k;
        cr_assert(close_enough(a[e], b[e], bound + f, rt),
                  "dt %d red %d grad_hidden[%lld] %.9g vs %.9g (bound %.3g)", (int)dt, red,
                  (long long)e, (double)a[e], (double)b[e], bound);
      }
    free(hgh), free(a), free(b);
  }
  {
    void *hgw = malloc((size_t)(v * ds) * gs);
    float *a = malloc((size_t)(v * ds) * 4), *b = malloc((size_t)(v * ds) * 4);
    const double fo = gwt == CULOSS_F16 ? 3e-8 : 1e-45; /* the output's subnormal half-step */
    to_host(hgw, dgw, (size_t)(v * ds) * gs);
    unpack_dtype(a, hgw, v * ds, gwt), unpack_dtype(b, rgw, v * ds, gwt);
    for (int64_t j = 0; j < v; j++)
      for (int64_t k = 0; k < ds; k++) {
        double bound = 0.0;
        for (int64_t i = 0; i < n; i++)
          bound += (u * fabs(G[i * v + j]) + gmax[i] + f) * fabs(hs[i * ds + k]);
        const int64_t e = j * ds + k;
        cr_assert(close_enough(a[e], b[e], bound + fo, grad_rtol(gwt)),
                  "dt %d gw_f32 %d acc %d red %d grad_weight[%lld] %.9g vs %.9g (bound %.3g)",
                  (int)dt, gw_f32, accumulate, red, (long long)e, (double)a[e], (double)b[e],
                  bound);
      }
    if (dgb) {
      to_host(hgw, dgb, (size_t)v * gs);
      unpack_dtype(a, hgw, v, gwt), unpack_dtype(b, rgb, v, gwt);
      for (int64_t j = 0; j < v; j++) {
        double bound = 0.0;
        for (int64_t i = 0; i < n; i++) bound += u * fabs(G[i * v + j]) + gmax[i] + f;
        cr_assert(close_enough(a[j], b[j], bound + fo, grad_rtol(gwt)),
                  "dt %d grad_bias[%lld] %.9g vs %.9g", (int)dt, (long long)j, (double)a[j],
                  (double)b[j]);
      }
    }
    free(hgw), free(a), free(b);
  }
  free(S), free(Tl), free(G), free(lg), free(gmax);
  for (int q = 0; q < 6; q++) free(p[q]), culoss_free(gpu, dp[q]);
  culoss_free(gpu, dy), culoss_free(gpu, dws), culoss_free(gpu, dl), culoss_free(gpu, dgh);
  culoss_free(gpu, dglv), culoss_free(gpu, dcw);
  culoss_free(gpu, dgw), culoss_free(gpu, dgb);
  free(cw);
  free(hs), free(w_s), free(bs), free(ht), free(w_t), free(bt), free(g0), free(hg0), free(hb0);
  free(rl), free(l), free(rgh), free(rgw), free(rgb);
}

Test(gpu_distill, linear_matches_the_cpu_reference) {
  REQUIRE_GPU();
  /* a small logits budget: 300-class rows in blocks of a few rows */
  setenv("CULOSS_LINEAR_CE_BLOCK_BYTES", "4800", 1);
  gpu_reopen(&gpu);
  uint64_t seed = 2600;
  for (int dt = 0; dt < 3; dt++)
    for (int red = 0; red < 4; red++)
      for (int variant = 0; variant < 3; variant++)
        linear_case((culoss_dtype)dt, variant == 1 || dt == 0, variant == 2, red, red != 1,
                    red >= 2 ? 0.5f : 0.0f, red == 2 || (red == 3 && variant > 0), seed++);
  unsetenv("CULOSS_LINEAR_CE_BLOCK_BYTES");
  gpu_reopen(&gpu);
  linear_case(CULOSS_BF16, 0, 0, CULOSS_REDUCTION_BATCHMEAN, 1, 1.0f, 1, seed++); /* one block */
}

/* Rows past 2^31 elements: n * v = 32769 * 65536 bf16 (4.3 GiB each of s
   and t), the gradient in place, the sum against the CPU reference of
   every block of rows and the last rows' gradient. */
Test(gpu_distill, rows_past_2_pow_31_elements) {
  REQUIRE_GPU();
  if (test_quick()) cr_skip_test("skipped: CULOSS_TEST_QUICK is set (8.6 GiB case)");
  if (test_emulated_small())
    cr_skip_test("skipped: the CPU emulator of CUDA (8.6 GiB case; CULOSS_EMU_BIG=1 runs it)");
  const int64_t v = 65536, n = 32769, blk = 64;
  const size_t bytes = (size_t)(n * v) * 2;
  void *dS = NULL, *dT = NULL;
  if (culoss_malloc(gpu, &dS, bytes) != CULOSS_OK || culoss_malloc(gpu, &dT, bytes) != CULOSS_OK) {
    cr_assert(getenv("CULOSS_REQUIRE_BIG") == NULL, "2 x %zu bytes of device memory: %s", bytes,
              culoss_last_error());
    cr_skip_test("skipped: 2 x %zu bytes of device memory not available", bytes);
  }
  float *x = malloc((size_t)(blk * v) * 4);
  uint16_t *bs = malloc((size_t)(blk * v) * 2), *bt = malloc((size_t)(blk * v) * 2);
  culoss_distill_options o;
  culoss_distill_options_init(&o);
  o.reduction = CULOSS_REDUCTION_SUM;
  double want = 0.0;
  for (int64_t i = 0; i < n; i += blk) {
    const int64_t k = n - i < blk ? n - i : blk;
    for (int64_t e = 0; e < k * v; e++) x[e] = (float)(4.0 * hash_unit((uint64_t)(i * v + e)));
    pack_dtype(bs, x, k * v, CULOSS_BF16);
    for (int64_t e = 0; e < k * v; e++)
      x[e] = (float)(4.0 * hash_unit((uint64_t)(i * v + e) ^ 0x5a5au));
    pack_dtype(bt, x, k * v, CULOSS_BF16);
    cr_assert_eq(culoss_upload(gpu, (char *)dS + (size_t)(i * v) * 2, bs, (size_t)(k * v) * 2),
                 CULOSS_OK);
    cr_assert_eq(culoss_upload(gpu, (char *)dT + (size_t)(i * v) * 2, bt, (size_t)(k * v) * 2),
                 CULOSS_OK);
    float bl;
    cr_assert_eq(
        culoss_distill(cpu, &o, k, v, CULOSS_BF16, bs, v, bt, v, CULOSS_I64, NULL, &bl, NULL, NULL),
        CULOSS_OK);
    want += (double)bl;
  }
  float *dl = dev_alloc(4), l;
  cr_assert_eq(
      culoss_distill(gpu, &o, n, v, CULOSS_BF16, dS, v, dT, v, CULOSS_I64, NULL, dl, dS, NULL),
      CULOSS_OK, "%s", culoss_last_error());
  cr_assert_eq(culoss_synchronize(gpu), CULOSS_OK, "%s", culoss_last_error());
  to_host(&l, dl, 4);
  cr_assert(close_enough(l, want, 0, 1e-5), "sum %.9g vs %.9g", (double)l, want);
  const int64_t i0 = n - 2;
  uint16_t *hg = malloc((size_t)(2 * v) * 2), *rg = malloc((size_t)(2 * v) * 2);
  to_host(hg, (char *)dS + (size_t)(i0 * v) * 2, (size_t)(2 * v) * 2);
  for (int64_t e = 0; e < 2 * v; e++) x[e] = (float)(4.0 * hash_unit((uint64_t)(i0 * v + e)));
  pack_dtype(bs, x, 2 * v, CULOSS_BF16);
  for (int64_t e = 0; e < 2 * v; e++)
    x[e] = (float)(4.0 * hash_unit((uint64_t)(i0 * v + e) ^ 0x5a5au));
  pack_dtype(bt, x, 2 * v, CULOSS_BF16);
  float bl;
  cr_assert_eq(
      culoss_distill(cpu, &o, 2, v, CULOSS_BF16, bs, v, bt, v, CULOSS_I64, NULL, &bl, rg, NULL),
      CULOSS_OK);
  float *a = malloc((size_t)(2 * v) * 4), *b = malloc((size_t)(2 * v) * 4);
  unpack_dtype(a, hg, 2 * v, CULOSS_BF16), unpack_dtype(b, rg, 2 * v, CULOSS_BF16);
  int64_t where;
  cr_assert(worst_ratio(a, b, 2 * v, 1e-6, 1.0 / 128, &where) <= 1.0, "grad[%lld] %g vs %g",
            (long long)where, (double)a[where], (double)b[where]);
  culoss_free(gpu, dS), culoss_free(gpu, dT), culoss_free(gpu, dl);
  free(x), free(bs), free(bt), free(hg), free(rg), free(a), free(b);
}

/* 64-bit row offsets at small cost: 3 rows of v = 4096 bf16 with row
   strides of 2^30 (+ 8 for the teacher), so the last row starts past 2^31
   elements (4.3 GiB allocations, three rows touched); the gradient in place,
   against the CPU reference of the three rows. CI runs this one on the
   emulator (CULOSS_EMU_BIG=1). */
Test(gpu_distill, padded_rows_past_2_pow_31) {
  REQUIRE_GPU();
  if (test_quick()) cr_skip_test("skipped: CULOSS_TEST_QUICK is set (8.6 GiB case)");
  if (test_emulated_small())
    cr_skip_test("skipped: the CPU emulator of CUDA (8.6 GiB case; CULOSS_EMU_BIG=1 runs it)");
  const int64_t n = 3, v = 4096, lds = (int64_t)1 << 30, ldt = lds + 8;
  const size_t bs = (size_t)((n - 1) * lds + v) * 2, bt = (size_t)((n - 1) * ldt + v) * 2;
  void *dS = NULL, *dT = NULL;
  if (culoss_malloc(gpu, &dS, bs) != CULOSS_OK || culoss_malloc(gpu, &dT, bt) != CULOSS_OK) {
    cr_assert(getenv("CULOSS_REQUIRE_BIG") == NULL, "%zu + %zu bytes of device memory: %s", bs, bt,
              culoss_last_error());
    cr_skip_test("skipped: %zu + %zu bytes of device memory not available", bs, bt);
  }
  rng_t r = rng_seeded(2700);
  float x[3 * 4096], y[3 * 4096];
  uint16_t hs[3 * 4096], ht[3 * 4096], hg[3 * 4096], rg[3 * 4096];
  fill_logits(&r, x, n, v, v, 2.0, 0, NULL);
  fill_logits(&r, y, n, v, v, 2.0, 1, NULL);
  pack_dtype(hs, x, n * v, CULOSS_BF16), pack_dtype(ht, y, n * v, CULOSS_BF16);
  for (int64_t i = 0; i < n; i++) {
    cr_assert_eq(culoss_upload(gpu, (char *)dS + (size_t)(i * lds) * 2, hs + i * v, (size_t)v * 2),
                 CULOSS_OK);
    cr_assert_eq(culoss_upload(gpu, (char *)dT + (size_t)(i * ldt) * 2, ht + i * v, (size_t)v * 2),
                 CULOSS_OK);
  }
  culoss_distill_options o;
  culoss_distill_options_init(&o);
  o.reduction = CULOSS_REDUCTION_NONE, o.beta = 0.25f;
  float *dl = dev_alloc(12), l[3], rl[3];
  cr_assert_eq(
      culoss_distill(gpu, &o, n, v, CULOSS_BF16, dS, lds, dT, ldt, CULOSS_I64, NULL, dl, dS, NULL),
      CULOSS_OK, "%s", culoss_last_error());
  cr_assert_eq(culoss_synchronize(gpu), CULOSS_OK, "%s", culoss_last_error());
  to_host(l, dl, 12);
  for (int64_t i = 0; i < n; i++)
    to_host(hg + i * v, (char *)dS + (size_t)(i * lds) * 2, (size_t)v * 2);
  cr_assert_eq(
      culoss_distill(cpu, &o, n, v, CULOSS_BF16, hs, v, ht, v, CULOSS_I64, NULL, rl, rg, NULL),
      CULOSS_OK);
  for (int i = 0; i < 3; i++)
    cr_assert(close_enough(l[i], rl[i], 1e-6, 1e-5), "row %d: %g vs %g", i, (double)l[i],
              (double)rl[i]);
  float a[3 * 4096], b[3 * 4096];
  unpack_dtype(a, hg, n * v, CULOSS_BF16), unpack_dtype(b, rg, n * v, CULOSS_BF16);
  int64_t where;
  cr_assert(worst_ratio(a, b, n * v, 1e-6, 1.0 / 128, &where) <= 1.0, "grad[%lld] %g vs %g",
            (long long)where, (double)a[where], (double)b[where]);
  culoss_free(gpu, dS), culoss_free(gpu, dT), culoss_free(gpu, dl);
}
