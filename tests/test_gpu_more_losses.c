/* test_gpu_more_losses.c: CUDA backend of margin ranking, Gaussian NLL,
   cosine embedding and triplet margin against the CPU reference, on fresh
   random inputs rounded to each dtype (with large-magnitude, inf and NaN
   entries), poisoned outputs, every reduction, padded row pitch, unaligned
   views, in-place gradients, every subset of gradients, the register-cached
   and streaming row paths, deferred domain errors and a case past 2^31
   elements. Every test skips visibly ("skipped: no CUDA device") without a
   GPU. */
#include <criterion/criterion.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "helpers.h"
#include "more_losses_call.h"

static culoss_context *gpu, *cpu;
static void gpu_setup(void) { gpu_open(&gpu, &cpu); }
static void gpu_teardown(void) { gpu_close(gpu, cpu); }
TestSuite(gpu_more, .init = gpu_setup, .fini = gpu_teardown, .timeout = 600);

typedef struct {
  l_kind k;
  int64_t n, d, ld; /* the elementwise two: n elements, d = ld = 1 */
  culoss_dtype dt;
  l_opts o;
  int grad_loss, offset, inplace, gmask, specials;
  int weighted; /* multi-label soft margin: 0 none, 1 [d], 2 [n, ld] */
  uint64_t seed;
} mcase;

static const double EPS32 = 5.96e-8; /* half an fp32 ulp */

/* Row i's inputs in x[k] + i * ld: random, away from the hinge's kink and
   from swap ties by a margin far above fp32's error, rounded to dt. */
static void fill_row(rng_t *r, const mcase *c, float *x[3], float *yt, int64_t i) {
  const int64_t d = c->d, off = i * c->ld;
  for (int tries = 0; tries < 100; tries++) {
    for (int q = 0; q < 3; q++)
      for (int64_t j = 0; j < c->ld; j++) x[q][off + j] = (float)rng_normal(r);
    if (c->k == L_MRANK) {
      const double u = rng_uniform(r);
      x[2][off] = u < 0.4 ? 1.0f : (u < 0.8 ? -1.0f : (u < 0.9 ? 0.0f : 0.5f));
    } else if (c->k == L_GAUSS) {
      x[1][off] = (float)(rng_uniform(r) < 0.1 ? 1e-8 : 0.05 + 2.0 * rng_uniform(r)); /* var */
    } else if (c->k == L_MLSOFT) { /* labels, a few soft ones */
      for (int64_t j = 0; j < c->ld; j++) {
        const double u = rng_uniform(r);
        x[0][off + j] *= 2.0f;
        x[1][off + j] = u < 0.3 ? 1.0f : (u < 0.4 ? (float)rng_uniform(r) : 0.0f);
      }
    } else if (c->k == L_COSINE) {
      const double u = rng_uniform(r);
      yt[i] = u < 0.45 ? 1.0f : (u < 0.9 ? -1.0f : 0.0f);
      if (rng_uniform(r) < 0.5) /* correlated pairs: cos far from 0 */
        for (int64_t j = 0; j < d; j++)
          x[1][off + j] = (float)(x[0][off + j] + 0.5 * rng_normal(r)) * (yt[i] < 0 ? -1.0f : 1.0f);
    }
    for (int q = 0; q < 3; q++) round_through(x[q] + off, c->ld, c->dt);
    if (c->k == L_MRANK) {
      const double z = c->o.margin - x[2][off] * ((double)x[0][off] - x[1][off]);
      if (fabs(z) > 1e-2 * (1.0 + fabs(x[0][off]) + fabs(x[1][off]))) return;
    } else if (c->k == L_GAUSS || c->k == L_MLSOFT) {
      return;
    } else if (c->k == L_COSINE) {
      double dot = 0, n1 = 0, n2 = 0;
      for (int64_t j = 0; j < d; j++) {
        const double u = x[0][off + j], v = x[1][off + j];
        dot += u * v, n1 += u * u, n2 += v * v;
      }
      const double cs = dot / sqrt((n1 + 1e-12) * (n2 + 1e-12));
      if (yt[i] != -1.0f || fabs(cs - c->o.margin) > 1e-3) return;
    } else {
      const double p = c->o.p, e = c->o.eps;
      const double dap = l_dist(x[0] + off, x[1] + off, d, p, e);
      const double dan = l_dist(x[0] + off, x[2] + off, d, p, e);
      const double dpn = l_dist(x[1] + off, x[2] + off, d, p, e);
      const double dneg = c->o.swap ? fmin(dan, dpn) : dan;
      if (fabs(dap - dneg + c->o.margin) > 1e-3 * (1.0 + dap + dneg) &&
          (!c->o.swap || fabs(dpn - dan) > 1e-3 * (dan + dpn)))
        return;
    }
  }
  cr_assert_fail("%s: no row away from the kink in 100 tries", l_name[c->k]);
}

/* Special values in the first rows / elements (n >= 4); NaN and inf only
   for NONE (a NaN sum would hide the sum's check). */
static void add_specials(const mcase *c, float *x[3]) {
  const int64_t ld = c->ld;
  const float big = c->dt == CULOSS_F16 ? 200.0f : 3000.0f;
  const int nonfinite = c->o.red == CULOSS_REDUCTION_NONE;
  if (l_rows(c->k)) {
    for (int q = 0; q < l_ninputs(c->k); q++) /* row 0: large magnitude */
      for (int64_t j = 0; j < c->d; j++) x[q][j] *= big;
    if (nonfinite) {
      x[0][ld] = NAN;                     /* row 1: a NaN */
      x[1][2 * ld + c->d - 1] = INFINITY; /* row 2: an inf */
    }
    if (nonfinite && c->k == L_MLSOFT) /* infinite logits: inf or NaN, as torch */
      x[0][2 * ld] = INFINITY, x[0][3 * ld] = -INFINITY;
    if (c->k == L_TRIPLET) { /* row 3: anchor = positive, an active swap tie */
      memcpy(x[1] + 3 * ld, x[0] + 3 * ld, (size_t)c->d * 4);
      for (int64_t j = 0; j < c->d; j++)
        x[2][3 * ld + j] = x[0][3 * ld + j] + (float)((j % 2 ? 0.3 : -0.3) / sqrt((double)c->d));
    }
  } else {
    if (nonfinite) x[0][0] = -INFINITY, x[0][1] = NAN;
    if (c->k == L_GAUSS) x[1][2] = 0.0f; /* var 0: clamped to eps */
    x[0][3] *= big, x[1][3] *= c->k == L_GAUSS ? 1.0f : big;
  }
  for (int q = 0; q < 3; q++) round_through(x[q], c->n * ld, c->dt);
}

/* fp32 error bounds, in double from the rounded inputs: *latol the loss's
   of each row, gatol[q] each gradient element's (times the scale s). */
static void bounds(const mcase *c, float *x[3], const float *yt, const float *w, const double *s,
                   double *latol, double *gatol[3]) {
  const int64_t d = c->d, ld = c->ld;
  const double sumk = 4.0 * EPS32 * (4.0 + (double)d / 16.0); /* fp32 sums of a row */
  for (int64_t i = 0; i < c->n; i++) {
    const int64_t off = i * ld;
    const double si = fabs(s[i]);
    if (c->k == L_MRANK) {
      const double a = fabs(x[0][off]), b = fabs(x[1][off]), y = fabs(x[2][off]);
      latol[i] = 4.0 * EPS32 * (fabs(c->o.margin) + y * (a + b));
      gatol[0][off] = gatol[1][off] = 0.0;
    } else if (c->k == L_GAUSS) {
      const double r = (double)x[0][off] - x[2][off];
      const double v = x[1][off] < c->o.eps ? c->o.eps : x[1][off], rq = r * r / v;
      latol[i] = 8.0 * EPS32 * (fabs(log(v)) + rq + 1.0);
      gatol[0][off] = 4.0 * EPS32 * si * fabs(r / v);
      gatol[1][off] = 8.0 * EPS32 * si * (1.0 + rq) / v;
    } else if (c->k == L_MLSOFT) { /* an fp32 row sum of w_j (softplus terms) / c */
      double terms = 0.0;
      for (int64_t j = 0; j < d; j++) {
        const double wj = w ? fabs(w[c->weighted == 2 ? off + j : j]) : 1.0, xj = x[0][off + j];
        terms += wj * (fabs(xj) * (1.0 + fabs(x[1][off + j])) + 1.0);
        gatol[0][off + j] = 4.0 * EPS32 * si * wj / (double)d;
      }
      latol[i] = sumk * terms / (double)d;
    } else if (c->k == L_COSINE) {
      double n1 = 1e-12, n2 = 1e-12, m1 = 0, m2 = 0;
      for (int64_t j = 0; j < d; j++) {
        const double u = x[0][off + j], v = x[1][off + j];
        n1 += u * u, n2 += v * v, m1 = fmax(m1, fabs(u)), m2 = fmax(m2, fabs(v));
      }
      const double den = sqrt(n1 * n2);
      latol[i] = sumk * (yt[i] == 1.0f || yt[i] == -1.0f ? 1.0 : 0.0);
      const double gm = si * (m2 / den + m1 / n1 + m1 / den + m2 / n2);
      for (int64_t j = 0; j < d; j++) gatol[0][off + j] = gatol[1][off + j] = sumk * gm;
    } else {
      const double p = c->o.p, e = c->o.eps;
      const double dap = l_dist(x[0] + off, x[1] + off, d, p, e);
      const double dan = l_dist(x[0] + off, x[2] + off, d, p, e);
      const double dpn = c->o.swap ? l_dist(x[1] + off, x[2] + off, d, p, e) : 0.0;
      /* the norms: sums, then a root (powf: a few more ulps for p != 1, 2) */
      const double nk = sumk + (p == 1.0 || p == 2.0 ? 0.0 : 16.0 * EPS32);
      latol[i] = nk * (dap + dan + dpn) + 4.0 * EPS32 * c->o.margin;
      /* each element's |u_j / dist|^(p-1) (<= 1), its relative error nk,
         and the fp32 difference u_j = fl(fl(x - y) + eps): an ulp of
         |x - y| <= |u_j| + |eps| and one of |u_j| <= dist */
      const double dmin = fmin(dap, fmin(dan, c->o.swap ? dpn : dan));
      const double du = dmin > 0 ? 4.0 * EPS32 * (2.0 + fabs(e) / dmin) : 0.0;
      for (int64_t j = 0; j < d; j++)
        for (int q = 0; q < 3; q++) gatol[q][off + j] = 2.0 * si * (nk + du * fmax(p - 1.0, 1.0));
    }
  }
}

static void run_case(const mcase *c) {
  const int ni = l_ninputs(c->k);
  const int64_t n = c->n, d = c->d, ld = c->ld, elems = n * ld;
  const size_t es = dtype_bytes(c->dt), bytes = (size_t)(elems + c->offset) * es;
  const int reduced = c->o.red != CULOSS_REDUCTION_NONE;
  const int64_t nl = reduced ? 1 : n;
  rng_t r = rng_seeded(c->seed);
  char what[200];
  snprintf(what, sizeof what,
           "%s n=%lld d=%lld ld=%lld dt=%d red=%d gl=%d off=%d inplace=%d gmask=%d margin=%g p=%g "
           "eps=%g swap=%d full=%d",
           l_name[c->k], (long long)n, (long long)d, (long long)ld, c->dt, c->o.red, c->grad_loss,
           c->offset, c->inplace, c->gmask, (double)c->o.margin, (double)c->o.p, (double)c->o.eps,
           c->o.swap, c->o.full);
  float *x[3], *yt = malloc((size_t)(n + 1) * 4), *gl = malloc((size_t)(nl + 1) * 4);
  for (int q = 0; q < 3; q++) x[q] = malloc((size_t)(elems + 1) * 4);
  for (int64_t i = 0; i < n; i++) fill_row(&r, c, x, yt, i);
  if (c->specials && n >= 4) add_specials(c, x);
  for (int64_t i = 0; i < nl; i++) gl[i] = (float)(0.5 + rng_uniform(&r)) * (i % 3 ? 1.0f : -1.0f);
  double *s = malloc((size_t)(n + 1) * sizeof *s), *latol = malloc((size_t)(n + 1) * sizeof *latol);
  double *gatol[3];
  for (int q = 0; q < 3; q++) gatol[q] = calloc((size_t)(elems + 1), sizeof(double));
  for (int64_t i = 0; i < n; i++) {
    const double g0 = c->grad_loss ? (double)gl[reduced ? 0 : i] : 1.0;
    s[i] = !reduced || c->o.red == CULOSS_REDUCTION_SUM ? g0 : g0 / (double)n;
  }
  /* class weights (multi-label soft margin), some 0 and some large */
  float *w = NULL, *d_w = NULL;
  l_opts o_cpu = c->o, o_gpu = c->o;
  if (c->weighted) {
    const int64_t nw = c->weighted == 2 ? elems : d;
    w = malloc((size_t)(nw + 1) * 4);
    for (int64_t e = 0; e < nw; e++)
      w[e] = e % 7 == 3 ? 0.0f : (float)(0.1 + 3.0 * rng_uniform(&r));
    d_w = dev_from(w, (size_t)(nw + 1) * 4);
    o_cpu.weight = w, o_gpu.weight = d_w;
    o_cpu.weight_per_row = o_gpu.weight_per_row = c->weighted == 2;
  }
  bounds(c, x, yt, w, s, latol, gatol);

  /* host copies in dt at the same offset; the reference on the CPU */
  void *h[3], *hg[3];
  for (int q = 0; q < 3; q++) {
    h[q] = calloc(1, bytes + 16), hg[q] = malloc(bytes + 16);
    pack_dtype((char *)h[q] + (size_t)c->offset * es, x[q], elems, c->dt);
    poison(hg[q], bytes + 16);
  }
  const void *in_c[3];
  void *g_c[3] = {NULL, NULL, NULL};
  for (int q = 0; q < 3; q++) {
    in_c[q] = (char *)h[q] + (size_t)c->offset * es;
    if (q < ni && (c->gmask >> q & 1)) g_c[q] = (char *)hg[q] + (size_t)c->offset * es;
  }
  float *ref_l = malloc((size_t)(nl + 1) * 4);
  cr_assert_eq(
      l_call(cpu, c->k, &o_cpu, n, d, ld, c->dt, in_c, yt, ref_l, g_c, c->grad_loss ? gl : NULL),
      CULOSS_OK, "%s: cpu %s", what, culoss_last_error());

  /* the device run: outputs poisoned, in-place gradients over the inputs */
  char *dx[3], *dg[3];
  float *d_yt = dev_from(yt, (size_t)(n + 1) * 4), *d_gl = dev_from(gl, (size_t)(nl + 1) * 4);
  float *d_l = dev_alloc((size_t)(nl + 1) * 4);
  dev_poison(d_l, (size_t)(nl + 1) * 4);
  const void *in_g[3];
  void *g_g[3] = {NULL, NULL, NULL};
  for (int q = 0; q < 3; q++) {
    dx[q] = dev_from(h[q], bytes + 16);
    dg[q] = NULL;
    in_g[q] = dx[q] + (size_t)c->offset * es;
    if (q < ni && (c->gmask >> q & 1)) {
      if (c->inplace) {
        dg[q] = dx[q];
      } else {
        dg[q] = dev_alloc(bytes + 16);
        dev_poison(dg[q], bytes + 16);
      }
      g_g[q] = dg[q] + (size_t)c->offset * es;
    }
  }
  cr_assert_eq(
      l_call(gpu, c->k, &o_gpu, n, d, ld, c->dt, in_g, d_yt, d_l, g_g, c->grad_loss ? d_gl : NULL),
      CULOSS_OK, "%s: gpu %s", what, culoss_last_error());
  cr_assert_eq(culoss_synchronize(gpu), CULOSS_OK, "%s: %s", what, culoss_last_error());

  float *l = malloc((size_t)(nl + 1) * 4);
  to_host(l, d_l, (size_t)(nl + 1) * 4);
  if (!reduced) {
    for (int64_t i = 0; i < n; i++)
      cr_assert(close_enough(l[i], ref_l[i], latol[i] + 1e-30, 1e-5),
                "%s: loss[%lld] gpu %.9g cpu %.9g (atol %.3g)", what, (long long)i, (double)l[i],
                (double)ref_l[i], latol[i]);
  } else {
    double sum_tol = 0.0;
    for (int64_t i = 0; i < n; i++) sum_tol += latol[i];
    if (c->o.red == CULOSS_REDUCTION_MEAN && n > 0) sum_tol /= (double)n;
    cr_assert(close_enough(l[0], ref_l[0], sum_tol + 1e-30, 2e-5), "%s: loss gpu %.9g cpu %.9g",
              what, (double)l[0], (double)ref_l[0]);
  }
  const double rtol = c->dt == CULOSS_F32 ? 2e-5 : (c->dt == CULOSS_F16 ? 2.0 / 1024 : 2.0 / 128);
  const double floor_g = c->dt == CULOSS_F16 ? 6e-8 : 1e-37; /* fp16's subnormal step */
  void *gh = malloc(bytes + 16);
  float *gf = malloc((size_t)(elems + 1) * 4), *rf = malloc((size_t)(elems + 1) * 4);
  float *pad_want = malloc((size_t)(elems + 1) * 4);
  for (int q = 0; q < ni; q++) {
    if (!(c->gmask >> q & 1)) {
      /* not requested: the input is untouched */
      to_host(gh, dx[q], bytes + 16);
      cr_assert(memcmp(gh, h[q], bytes + 16) == 0, "%s: input %d written without its gradient",
                what, q);
      continue;
    }
    to_host(gh, dg[q], bytes + 16);
    unpack_dtype(gf, (char *)gh + (size_t)c->offset * es, elems, c->dt);
    unpack_dtype(rf, (char *)hg[q] + (size_t)c->offset * es, elems, c->dt);
    unpack_dtype(pad_want, (char *)h[q] + (size_t)c->offset * es, elems, c->dt);
    for (int64_t i = 0; i < n; i++)
      for (int64_t j = 0; j < ld; j++) {
        const int64_t e = i * ld + j;
        if (j >= d) { /* padding: never written */
          if (c->inplace)
            cr_assert(memcmp(&gf[e], &pad_want[e], 4) == 0 || (isnan(gf[e]) && isnan(pad_want[e])),
                      "%s: grad %d padding (%lld, %lld) written", what, q, (long long)i,
                      (long long)j);
          else
            cr_assert(is_poison_f32(gf[e]) || isnan(gf[e]), "%s: grad %d padding written", what, q);
          continue;
        }
        cr_assert(!is_poison_f32(gf[e]) || isnan(rf[e]), "%s: grad %d (%lld, %lld) not written",
                  what, q, (long long)i, (long long)j);
        cr_assert(close_enough(gf[e], rf[e], gatol[q][e] + floor_g, rtol),
                  "%s: grad %d (%lld, %lld) gpu %.9g cpu %.9g (atol %.3g)", what, q, (long long)i,
                  (long long)j, (double)gf[e], (double)rf[e], gatol[q][e]);
      }
  }
  for (int q = 0; q < 3; q++) {
    if (dg[q] && dg[q] != dx[q]) culoss_free(gpu, dg[q]);
    culoss_free(gpu, dx[q]);
    free(x[q]), free(h[q]), free(hg[q]), free(gatol[q]);
  }
  culoss_free(gpu, d_yt), culoss_free(gpu, d_gl), culoss_free(gpu, d_l), culoss_free(gpu, d_w);
  free(w);
  free(yt), free(gl), free(s), free(latol), free(ref_l), free(l), free(gh), free(gf), free(rf);
  free(pad_want);
}

static mcase base(l_kind k, int64_t n, int64_t d, culoss_dtype dt, culoss_reduction red,
                  uint64_t seed) {
  mcase c;
  memset(&c, 0, sizeof c);
  c.k = k, c.n = n, c.d = l_rows(k) ? d : 1, c.ld = c.d, c.dt = dt;
  c.o = l_defaults(k, red);
  c.grad_loss = 1, c.gmask = 7, c.specials = 1, c.seed = seed;
  return c;
}

Test(gpu_more, every_loss_dtype_and_reduction) {
  REQUIRE_GPU();
  /* rows: the NPL = 1 and emb_npl register paths, the streaming path, tails */
  const int64_t rows[][2] = {{1, 1}, {5, 7}, {37, 64}, {20, 300}, {9, 1030}, {6, 2500}};
  const int64_t flat[] = {1, 7, 1000, 100003};
  uint64_t seed = 1;
  for (int k = 0; k < L_NUM; k++)
    for (int dt = 0; dt < 3; dt++)
      for (int s = 0; s < 6; s++)
        for (int red = 0; red < 3; red++) {
          if (!l_rows((l_kind)k) && s >= 4) continue;
          if (test_quick() && s == (l_rows((l_kind)k) ? 5 : 3)) continue;
          const int64_t n = l_rows((l_kind)k) ? rows[s][0] : flat[s];
          mcase c = base((l_kind)k, n, rows[s][1], (culoss_dtype)dt, (culoss_reduction)red, seed++);
          if (k == L_MLSOFT) c.weighted = (s + red) % 3;
          /* a pitch of whole 16-byte packs with d % VEC != 0: the vector
             paths' tails (ld = d + 3 below takes the scalar path) */
          if (l_rows(c.k) && s != 0 && s != 2) c.ld = (c.d + 7) / 8 * 8;
          c.grad_loss = red != 0 || s % 2;
          run_case(&c);
        }
}

Test(gpu_more, options_pitch_views_inplace_and_gradient_subsets) {
  REQUIRE_GPU();
  uint64_t seed = 900;
  for (int k = 0; k < L_NUM; k++)
    for (int dt = 0; dt < 3; dt++) {
      const int rows = l_rows((l_kind)k);
      mcase c = base((l_kind)k, rows ? 33 : 777, 70, (culoss_dtype)dt, CULOSS_REDUCTION_NONE, 0);
      for (int v = 0; v < 6; v++) {
        c.seed = seed++;
        c.ld = rows && v % 2 ? c.d + 3 : c.d; /* padded pitch: the scalar path */
        c.offset = v == 2 ? 1 : 0;            /* unaligned view */
        c.inplace = v == 3 || v == 5;
        c.gmask = v == 4 ? 1 : (v == 5 ? (k == L_TRIPLET ? 6 : 2) : (1 << l_ninputs(c.k)) - 1);
        c.o.red = (culoss_reduction)(v % 3);
        if (k == L_MRANK) c.o.margin = v < 3 ? 0.5f : -0.25f;
        if (k == L_GAUSS) c.o.full = v % 2, c.o.eps = v < 3 ? 1e-6f : 0.3f;
        if (k == L_COSINE) c.o.margin = v < 3 ? 0.2f : -0.4f;
        if (k == L_MLSOFT) c.weighted = v % 3;
        if (k == L_TRIPLET) {
          static const float ps[] = {2.0f, 1.0f, 3.0f, 1.5f, 2.0f, 1.0f};
          c.o.p = ps[v], c.o.swap = v >= 2, c.o.margin = v == 4 ? 0.1f : 1.0f;
          c.o.eps = v == 5 ? 0.0f : 1e-6f; /* eps 0 with anchor = positive: zero distance */
        }
        run_case(&c);
      }
    }
}

/* Poisoned outputs and n = 0: nothing written for NONE, 0 for SUM, NaN for
   MEAN, as the CPU backend. */
Test(gpu_more, empty_input) {
  REQUIRE_GPU();
  for (int k = 0; k < L_NUM; k++)
    for (int red = 0; red < 3; red++) {
      l_opts o = l_defaults((l_kind)k, (culoss_reduction)red);
      float *d_l = dev_alloc(4), lc = 0.0f, lg = 0.0f;
      dev_poison(d_l, 4);
      const void *in[3] = {NULL, NULL, NULL};
      void *g[3] = {NULL, NULL, NULL};
      cr_assert_eq(l_call(gpu, (l_kind)k, &o, 0, 4, 4, CULOSS_F32, in, NULL, d_l, g, NULL),
                   CULOSS_OK, "%s: %s", l_name[k], culoss_last_error());
      cr_assert_eq(l_call(cpu, (l_kind)k, &o, 0, 4, 4, CULOSS_F32, in, NULL, &lc, g, NULL),
                   CULOSS_OK);
      cr_assert_eq(culoss_synchronize(gpu), CULOSS_OK);
      to_host(&lg, d_l, 4);
      if (red == CULOSS_REDUCTION_NONE)
        cr_assert(is_poison_f32(lg), "%s: NONE with n = 0 wrote the loss", l_name[k]);
      else
        cr_assert(close_enough(lg, lc, 0, 0) && (red == 1 ? lg == 0.0f : isnan(lg)),
                  "%s red=%d: gpu %g cpu %g", l_name[k], red, (double)lg, (double)lc);
      culoss_free(gpu, d_l);
    }
}

/* A negative var: the CPU backend refuses it before writing; the CUDA
   backend writes NaN loss and zero gradients for that element and reports
   INVALID_VALUE at culoss_synchronize, the other elements as the CPU's. */
Test(gpu_more, negative_var_is_a_deferred_domain_error) {
  REQUIRE_GPU();
  const float x[4] = {0.5f, 1.0f, -2.0f, 3.0f}, y[4] = {0.0f, 1.5f, -1.0f, 2.0f};
  const float v[4] = {1.0f, -0.5f, 2.0f, 0.25f}, vok[4] = {1.0f, 1.0f, 2.0f, 0.25f};
  culoss_gaussian_nll_options o;
  culoss_gaussian_nll_options_init(&o);
  o.reduction = CULOSS_REDUCTION_NONE;
  float l[4], gx[4], gv[4];
  poison(l, sizeof l);
  cr_assert_eq(culoss_gaussian_nll(cpu, &o, 4, CULOSS_F32, x, y, v, l, gx, gv, NULL),
               CULOSS_ERROR_INVALID_VALUE);
  cr_assert(strstr(culoss_last_error(), "var[1]") != NULL, "%s", culoss_last_error());
  cr_assert(is_poison_f32(l[0]), "the CPU backend wrote before refusing");
  float rl[4], rgx[4], rgv[4];
  cr_assert_eq(culoss_gaussian_nll(cpu, &o, 4, CULOSS_F32, x, y, vok, rl, rgx, rgv, NULL),
               CULOSS_OK);
  float *dx = dev_from(x, 16), *dy = dev_from(y, 16), *dv = dev_from(v, 16);
  float *dl = dev_alloc(16), *dgx = dev_alloc(16), *dgv = dev_alloc(16);
  cr_assert_eq(culoss_gaussian_nll(gpu, &o, 4, CULOSS_F32, dx, dy, dv, dl, dgx, dgv, NULL),
               CULOSS_OK);
  cr_assert_eq(culoss_synchronize(gpu), CULOSS_ERROR_INVALID_VALUE);
  cr_assert(strstr(culoss_last_error(), "outside") != NULL || strstr(culoss_last_error(), "domain"),
            "%s", culoss_last_error());
  to_host(l, dl, 16), to_host(gx, dgx, 16), to_host(gv, dgv, 16);
  cr_assert(isnan(l[1]) && gx[1] == 0.0f && gv[1] == 0.0f, "bad element: %g %g %g", (double)l[1],
            (double)gx[1], (double)gv[1]);
  for (int i = 0; i < 4; i++)
    if (i != 1)
      cr_assert(close_enough(l[i], rl[i], 1e-6, 1e-5) && close_enough(gx[i], rgx[i], 1e-6, 1e-5) &&
                    close_enough(gv[i], rgv[i], 1e-6, 1e-5),
                "element %d", i);
  cr_assert_eq(culoss_synchronize(gpu), CULOSS_OK, "the flag is cleared once reported");
  culoss_free(gpu, dx), culoss_free(gpu, dy), culoss_free(gpu, dv);
  culoss_free(gpu, dl), culoss_free(gpu, dgx), culoss_free(gpu, dgv);
}

/* Two runs of a reduced loss give the same bits (the fixed-order block
   reduction, no atomics). */
Test(gpu_more, reduced_losses_are_deterministic) {
  REQUIRE_GPU();
  const int64_t n = 3001, d = 96;
  rng_t r = rng_seeded(77);
  float *h = malloc((size_t)(3 * n * d) * 4);
  for (int64_t i = 0; i < 3 * n * d; i++) h[i] = (float)rng_normal(&r);
  float *dxx = dev_from(h, (size_t)(3 * n * d) * 4), *dl = dev_alloc(4);
  const void *in[3] = {dxx, dxx + n * d, dxx + 2 * n * d};
  void *g[3] = {NULL, NULL, NULL};
  for (int k = L_COSINE; k <= L_TRIPLET; k++) {
    l_opts o = l_defaults((l_kind)k, CULOSS_REDUCTION_MEAN);
    float *yt = malloc((size_t)n * 4);
    for (int64_t i = 0; i < n; i++) yt[i] = i % 2 ? 1.0f : -1.0f;
    float *dyt = dev_from(yt, (size_t)n * 4), a = 0, b = 0;
    cr_assert_eq(l_call(gpu, (l_kind)k, &o, n, d, d, CULOSS_F32, in, dyt, dl, g, NULL), CULOSS_OK);
    to_host(&a, dl, 4);
    cr_assert_eq(l_call(gpu, (l_kind)k, &o, n, d, d, CULOSS_F32, in, dyt, dl, g, NULL), CULOSS_OK);
    to_host(&b, dl, 4);
    cr_assert(memcmp(&a, &b, 4) == 0, "%s: %.9g then %.9g", l_name[k], (double)a, (double)b);
    culoss_free(gpu, dyt);
    free(yt);
  }
  culoss_free(gpu, dxx), culoss_free(gpu, dl);
  free(h);
}

/* Rows past 2^31 elements (64-bit row offsets): cosine embedding over
   2 x 4.3 GiB of bf16, gradients in place, against the CPU reference of
   each block of rows. */
Test(gpu_more, rows_past_2_pow_31_elements) {
  REQUIRE_GPU();
  if (test_quick()) cr_skip_test("skipped: CULOSS_TEST_QUICK is set (8.6 GiB case)");
  if (test_emulated_small())
    cr_skip_test("skipped: the CPU emulator of CUDA (8.6 GiB case; CULOSS_EMU_BIG=1 runs it)");
  const int64_t d = 1024, n = ((int64_t)1 << 21) + 5, blk = 4096;
  const size_t bytes = (size_t)(n * d) * 2;
  void *d1 = NULL, *d2 = NULL;
  if (culoss_malloc(gpu, &d1, bytes) != CULOSS_OK || culoss_malloc(gpu, &d2, bytes) != CULOSS_OK) {
    cr_assert(getenv("CULOSS_REQUIRE_BIG") == NULL, "2 x %zu bytes of device memory: %s", bytes,
              culoss_last_error());
    cr_skip_test("skipped: 2 x %zu bytes of device memory not available", bytes);
  }
  float *x = malloc((size_t)(blk * d) * 4), *yt = malloc((size_t)n * 4);
  uint16_t *b1 = malloc((size_t)(blk * d) * 2), *b2 = malloc((size_t)(blk * d) * 2);
  for (int64_t i = 0; i < n; i++) yt[i] = i % 3 ? 1.0f : -1.0f;
  culoss_cosine_embedding_options o;
  culoss_cosine_embedding_options_init(&o);
  o.reduction = CULOSS_REDUCTION_SUM;
  double want = 0.0;
  for (int64_t i = 0; i < n; i += blk) {
    const int64_t k = n - i < blk ? n - i : blk;
    for (int64_t e = 0; e < k * d; e++) x[e] = (float)(hash_unit((uint64_t)(i * d + e)) - 0.5);
    pack_dtype(b1, x, k * d, CULOSS_BF16);
    for (int64_t e = 0; e < k * d; e++)
      x[e] += (float)(0.3 * (hash_unit((uint64_t)(i * d + e) ^ 0x777u) - 0.5));
    pack_dtype(b2, x, k * d, CULOSS_BF16);
    cr_assert_eq(culoss_upload(gpu, (char *)d1 + (size_t)(i * d) * 2, b1, (size_t)(k * d) * 2),
                 CULOSS_OK);
    cr_assert_eq(culoss_upload(gpu, (char *)d2 + (size_t)(i * d) * 2, b2, (size_t)(k * d) * 2),
                 CULOSS_OK);
    float bl;
    cr_assert_eq(culoss_cosine_embedding(cpu, &o, k, d, CULOSS_BF16, b1, b2, d, yt + i, &bl, NULL,
                                         NULL, NULL),
                 CULOSS_OK);
    want += (double)bl;
  }
  float *dyt = dev_from(yt, (size_t)n * 4), *dl = dev_alloc(4), l;
  cr_assert_eq(
      culoss_cosine_embedding(gpu, &o, n, d, CULOSS_BF16, d1, d2, d, dyt, dl, d1, d2, NULL),
      CULOSS_OK, "%s", culoss_last_error());
  cr_assert_eq(culoss_synchronize(gpu), CULOSS_OK, "%s", culoss_last_error());
  to_host(&l, dl, 4);
  cr_assert(close_enough(l, want, 0, 1e-5), "sum %.9g vs %.9g", (double)l, want);
  /* the last block's gradient, written in place past 2^31 elements */
  const int64_t i0 = n - 3;
  uint16_t g1[3 * 1024], g2[3 * 1024], r1[3 * 1024], r2[3 * 1024];
  to_host(g1, (char *)d1 + (size_t)(i0 * d) * 2, sizeof g1);
  to_host(g2, (char *)d2 + (size_t)(i0 * d) * 2, sizeof g2);
  for (int64_t e = 0; e < 3 * d; e++) x[e] = (float)(hash_unit((uint64_t)(i0 * d + e)) - 0.5);
  pack_dtype(b1, x, 3 * d, CULOSS_BF16);
  for (int64_t e = 0; e < 3 * d; e++)
    x[e] += (float)(0.3 * (hash_unit((uint64_t)(i0 * d + e) ^ 0x777u) - 0.5));
  pack_dtype(b2, x, 3 * d, CULOSS_BF16);
  o.reduction = CULOSS_REDUCTION_NONE;
  float rl[3];
  cr_assert_eq(
      culoss_cosine_embedding(cpu, &o, 3, d, CULOSS_BF16, b1, b2, d, yt + i0, rl, r1, r2, NULL),
      CULOSS_OK);
  float a[3 * 1024], b[3 * 1024];
  unpack_dtype(a, g1, 3 * d, CULOSS_BF16), unpack_dtype(b, r1, 3 * d, CULOSS_BF16);
  int64_t where;
  cr_assert(worst_ratio(a, b, 3 * d, 1e-6, 2.0 / 128, &where) <= 1.0, "grad1[%lld]",
            (long long)where);
  unpack_dtype(a, g2, 3 * d, CULOSS_BF16), unpack_dtype(b, r2, 3 * d, CULOSS_BF16);
  cr_assert(worst_ratio(a, b, 3 * d, 1e-6, 2.0 / 128, &where) <= 1.0, "grad2[%lld]",
            (long long)where);
  culoss_free(gpu, d1), culoss_free(gpu, d2), culoss_free(gpu, dyt), culoss_free(gpu, dl);
  free(x), free(yt), free(b1), free(b2);
}

/* Multi-label margin: random target lists (duplicates, an empty list, a
   full one, valid entries after the -1), against the CPU reference, every
   dtype and reduction, padded pitch, unaligned rows, in place. */
static void mlm_case(int64_t n, int64_t c, int64_t ld, culoss_dtype dt, culoss_reduction red,
                     int inplace, int offset, uint64_t seed) {
  rng_t r = rng_seeded(seed);
  const size_t es = dtype_bytes(dt), bytes = (size_t)(n * ld + offset) * es;
  const int reduced = red != CULOSS_REDUCTION_NONE;
  const int64_t nl = reduced ? 1 : n;
  float *x = malloc((size_t)(n * ld + 1) * 4), *gl = malloc((size_t)(nl + 1) * 4);
  int64_t *t = malloc((size_t)(n * c + 1) * 8);
  for (int64_t e = 0; e < n * ld; e++) x[e] = (float)(1.5 * rng_normal(&r));
  if (n > 1) x[ld + c - 1] = NAN; /* a NaN pair adds nothing */
  round_through(x, n * ld, dt);
  for (int64_t i = 0; i < n; i++) {
    const int64_t k = i == 0 ? 0 : (i == 2 ? c : rng_int(&r, 0, c + 1));
    for (int64_t q = 0; q < c; q++) t[i * c + q] = q < k ? rng_int(&r, 0, c) : rng_int(&r, -1, c);
    if (k < c) t[i * c + k] = -1;
  }
  for (int64_t i = 0; i < nl; i++) gl[i] = (float)(0.5 + rng_uniform(&r));
  void *xh = calloc(1, bytes + 16), *gh = malloc(bytes + 16), *ref_g = malloc(bytes + 16);
  pack_dtype((char *)xh + (size_t)offset * es, x, n * ld, dt);
  poison(ref_g, bytes + 16);
  culoss_multilabel_margin_options o;
  culoss_multilabel_margin_options_init(&o);
  o.reduction = red;
  float *ref_l = malloc((size_t)(nl + 1) * 4), *l = malloc((size_t)(nl + 1) * 4);
  char what[160];
  snprintf(what, sizeof what,
           "multilabel_margin n=%lld c=%lld ld=%lld dt=%d red=%d inplace=%d off=%d", (long long)n,
           (long long)c, (long long)ld, dt, red, inplace, offset);
  cr_assert_eq(culoss_multilabel_margin(cpu, &o, n, c, dt, (char *)xh + (size_t)offset * es, ld,
                                        CULOSS_I64, t, ref_l, (char *)ref_g + (size_t)offset * es,
                                        gl),
               CULOSS_OK, "%s: cpu %s", what, culoss_last_error());
  char *dx = dev_from(xh, bytes + 16), *dg = inplace ? dx : dev_alloc(bytes + 16);
  if (!inplace) dev_poison(dg, bytes + 16);
  int64_t *dtg = dev_from(t, (size_t)(n * c + 1) * 8);
  float *dl = dev_alloc((size_t)(nl + 1) * 4), *dgl = dev_from(gl, (size_t)(nl + 1) * 4);
  dev_poison(dl, (size_t)(nl + 1) * 4);
  cr_assert_eq(culoss_multilabel_margin(gpu, &o, n, c, dt, dx + (size_t)offset * es, ld, CULOSS_I64,
                                        dtg, dl, dg + (size_t)offset * es, dgl),
               CULOSS_OK, "%s: gpu %s", what, culoss_last_error());
  cr_assert_eq(culoss_synchronize(gpu), CULOSS_OK, "%s: %s", what, culoss_last_error());
  to_host(l, dl, (size_t)(nl + 1) * 4);
  to_host(gh, dg, bytes + 16);
  /* fp32 sums of up to c^2 / 4 positive terms per row (a relative error) */
  const double lt = 4.0 * EPS32 * (4.0 + (double)c);
  for (int64_t i = 0; i < nl; i++)
    cr_assert(close_enough(l[i], ref_l[i], 1e-30, lt), "%s: loss[%lld] gpu %.9g cpu %.9g", what,
              (long long)i, (double)l[i], (double)ref_l[i]);
  float *gf = malloc((size_t)(n * ld + 1) * 4), *rf = malloc((size_t)(n * ld + 1) * 4);
  unpack_dtype(gf, (char *)gh + (size_t)offset * es, n * ld, dt);
  unpack_dtype(rf, (char *)ref_g + (size_t)offset * es, n * ld, dt);
  const double rtol = dt == CULOSS_F32 ? 2e-5 : (dt == CULOSS_F16 ? 2.0 / 1024 : 2.0 / 128);
  for (int64_t i = 0; i < n; i++)
    for (int64_t j = 0; j < ld; j++) {
      const int64_t e = i * ld + j;
      if (j >= c) {
        cr_assert(inplace ? memcmp(&gf[e], &x[e], 4) == 0 || (isnan(gf[e]) && isnan(x[e]))
                          : isnan(gf[e]),
                  "%s: padding (%lld, %lld) written", what, (long long)i, (long long)j);
        continue;
      }
      /* counts times g / c: exact up to the output's rounding */
      cr_assert(close_enough(gf[e], rf[e], 1e-37, rtol), "%s: grad (%lld, %lld) gpu %.9g cpu %.9g",
                what, (long long)i, (long long)j, (double)gf[e], (double)rf[e]);
    }
  if (!inplace) culoss_free(gpu, dg);
  culoss_free(gpu, dx), culoss_free(gpu, dtg), culoss_free(gpu, dl), culoss_free(gpu, dgl);
  free(x), free(gl), free(t), free(xh), free(gh), free(ref_g), free(ref_l), free(l), free(gf);
  free(rf);
}

Test(gpu_more, multilabel_margin) {
  REQUIRE_GPU();
  const int64_t cs[] = {1, 5, 37, 300, 5000}; /* 5000: past 48 KiB of shared memory */
  uint64_t seed = 3000;
  for (int ci = 0; ci < 5; ci++)
    for (int dt = 0; dt < 3; dt++)
      for (int red = 0; red < 3; red++) {
        const int64_t c = cs[ci], n = c >= 1000 ? 3 : 11;
        if (test_quick() && c >= 1000 && dt > 0) continue;
        mlm_case(n, c, c + (red == 1 ? 3 : 0), (culoss_dtype)dt, (culoss_reduction)red, red == 2,
                 dt == 1 && red == 0, seed++);
      }
}

/* An entry outside [-1, c) (after the -1 too, as PyTorch checks): the CPU
   refuses before writing; CUDA gives the row NaN and zero gradient and a
   deferred TARGET_OUT_OF_RANGE; a c beyond shared memory is refused. */
Test(gpu_more, multilabel_margin_bad_targets_and_sizes) {
  REQUIRE_GPU();
  const float x[8] = {0.1f, 0.2f, 0.4f, 0.8f, 1, 2, 3, 4};
  const int64_t t[8] = {3, 0, -1, 1, 1, -1, 0, 4}; /* 4 = c: out of range */
  culoss_multilabel_margin_options o;
  culoss_multilabel_margin_options_init(&o);
  o.reduction = CULOSS_REDUCTION_NONE;
  float l[2], g[8];
  poison(l, sizeof l);
  cr_assert_eq(culoss_multilabel_margin(cpu, &o, 2, 4, CULOSS_F32, x, 4, CULOSS_I64, t, l, g, NULL),
               CULOSS_ERROR_TARGET_OUT_OF_RANGE);
  cr_assert(strstr(culoss_last_error(), "targets[1][3] = 4") != NULL, "%s", culoss_last_error());
  cr_assert(is_poison_f32(l[0]), "the CPU wrote before refusing");
  float *dx = dev_from(x, 32), *dl = dev_alloc(8), *dg = dev_alloc(32);
  int64_t *dt = dev_from(t, 64);
  cr_assert_eq(
      culoss_multilabel_margin(gpu, &o, 2, 4, CULOSS_F32, dx, 4, CULOSS_I64, dt, dl, dg, NULL),
      CULOSS_OK);
  cr_assert_eq(culoss_synchronize(gpu), CULOSS_ERROR_TARGET_OUT_OF_RANGE);
  to_host(l, dl, 8), to_host(g, dg, 32);
  /* row 0 as torch: 0.85, gradient (-0.5, 0.5, 0.5, -0.5) */
  cr_assert(fabs(l[0] - 0.85) < 1e-6 && isnan(l[1]), "%g %g", (double)l[0], (double)l[1]);
  const float want[4] = {-0.5f, 0.5f, 0.5f, -0.5f};
  for (int j = 0; j < 4; j++) cr_assert(fabs(g[j] - want[j]) < 1e-6 && g[4 + j] == 0.0f);
  const int64_t big = 100000; /* 1.2 MB of shared memory: refused before any read */
  cr_assert_eq(culoss_multilabel_margin(gpu, &o, 1, big, CULOSS_F32, dx, big, CULOSS_I64, dt, dl,
                                        NULL, NULL),
               CULOSS_ERROR_INVALID_VALUE);
  cr_assert(strstr(culoss_last_error(), "shared memory") != NULL, "%s", culoss_last_error());
  culoss_free(gpu, dx), culoss_free(gpu, dl), culoss_free(gpu, dg), culoss_free(gpu, dt);
}

/* InfoNCE (culoss_info_nce) against the CPU backend. fp32: random inputs,
   1e-4 in norm (GEMM orders differ). 16-bit: inputs whose logits are exact
   in every dtype and GEMM order (q, k in {0, +-1/2, +-1}, t = 1/2, d <= 16:
   z a multiple of 1/2 below 32), so the loss must match to 2e-5 and the
   gradients to the rounding of the logits' gradient to the dtype before its
   GEMMs (1e-2 in norm for bf16, 2e-3 for fp16), with the temperature's;
   random 16-bit inputs (logits rounded to the dtype) at 2e-2. */
static double rel_norm(const void *got, const void *ref, int64_t count, culoss_dtype dt) {
  float *a = malloc((size_t)count * 4), *b = malloc((size_t)count * 4);
  unpack_dtype(a, got, count, dt), unpack_dtype(b, ref, count, dt);
  double num = 0, den = 0;
  for (int64_t i = 0; i < count; i++) {
    if (isnan(a[i]) || isnan(b[i])) return INFINITY;
    num += ((double)a[i] - b[i]) * ((double)a[i] - b[i]), den += (double)b[i] * b[i];
  }
  free(a), free(b);
  return sqrt(num) / (sqrt(den) + 1e-30);
}

static void nce_case(int64_t n, int64_t d, culoss_dtype dt, int sym, culoss_reduction red,
                     int exact, uint64_t seed) {
  rng_t r = rng_seeded(seed);
  const size_t es = dtype_bytes(dt), bytes = (size_t)(n * d) * es;
  const int64_t nl = red == CULOSS_REDUCTION_NONE ? n : 1;
  float *q = malloc((size_t)(n * d) * 4), *k = malloc((size_t)(n * d) * 4);
  float *gl = malloc((size_t)nl * 4), t = exact ? 0.5f : 0.3f;
  for (int64_t e = 0; e < n * d; e++) {
    /* random 16-bit: |z| of a few units, since linear CE rounds 16-bit
       logits to the dtype (an error of ulp(z) in each) */
    const float sc = dt == CULOSS_F32 ? 1.0f : 0.25f;
    q[e] = exact ? (float)(rng_int(&r, -2, 3)) * 0.5f : sc * (float)rng_normal(&r);
    k[e] = exact ? (float)(rng_int(&r, -2, 3)) * 0.5f : sc * (float)rng_normal(&r) + 0.5f * q[e];
  }
  for (int64_t i = 0; i < nl; i++) gl[i] = (float)(0.5 + rng_uniform(&r));
  void *qh = malloc(bytes), *kh = malloc(bytes);
  pack_dtype(qh, q, n * d, dt), pack_dtype(kh, k, n * d, dt);
  culoss_info_nce_options oc, og;
  culoss_info_nce_options_init(&oc);
  oc.reduction = red, oc.symmetric = sym;
  float gt_c = 0.0f, gt_g = 0.0f, *d_t = dev_from(&t, 4), *d_gt = dev_alloc(4);
  og = oc;
  oc.temperature = &t, oc.grad_temperature = &gt_c;
  og.temperature = d_t, og.grad_temperature = d_gt;
  size_t wc, wg;
  cr_assert_eq(culoss_info_nce_workspace_size(cpu, &oc, n, d, dt, &wc), CULOSS_OK);
  cr_assert_eq(culoss_info_nce_workspace_size(gpu, &og, n, d, dt, &wg), CULOSS_OK);
  void *w = malloc(wc), *rq = malloc(bytes), *rk = malloc(bytes), *gq = malloc(bytes);
  void *gk = malloc(bytes);
  float *rl = malloc((size_t)nl * 4), *l = malloc((size_t)nl * 4);
  cr_assert_eq(culoss_info_nce(cpu, &oc, n, d, dt, qh, kh, rl, rq, rk, gl, w, wc), CULOSS_OK, "%s",
               culoss_last_error());
  char *dq = dev_from(qh, bytes), *dk = dev_from(kh, bytes), *dgq = dev_alloc(bytes);
  char *dgk = dev_alloc(bytes), *dw = dev_alloc(wg + 1);
  float *dl = dev_alloc((size_t)nl * 4), *dgl = dev_from(gl, (size_t)nl * 4);
  dev_poison(dgq, bytes), dev_poison(dgk, bytes), dev_poison(dl, (size_t)nl * 4);
  cr_assert_eq(culoss_info_nce(gpu, &og, n, d, dt, dq, dk, dl, dgq, dgk, dgl, dw, wg), CULOSS_OK,
               "%s", culoss_last_error());
  cr_assert_eq(culoss_synchronize(gpu), CULOSS_OK, "%s", culoss_last_error());
  to_host(l, dl, (size_t)nl * 4), to_host(gq, dgq, bytes), to_host(gk, dgk, bytes);
  to_host(&gt_g, d_gt, 4);
  const double lt = dt == CULOSS_F32 ? 1e-4 : (exact ? 2e-5 : 2e-2);
  const double gtol = dt == CULOSS_F32 ? 1e-4 : (!exact ? 2e-2 : (dt == CULOSS_F16 ? 2e-3 : 1e-2));
  char what[96];
  snprintf(what, sizeof what, "info_nce n=%lld d=%lld dt=%d sym=%d red=%d exact=%d", (long long)n,
           (long long)d, dt, sym, red, exact);
  for (int64_t i = 0; i < nl; i++)
    cr_assert(close_enough(l[i], rl[i], lt, lt), "%s: loss[%lld] gpu %.9g cpu %.9g", what,
              (long long)i, (double)l[i], (double)rl[i]);
  cr_assert(rel_norm(gq, rq, n * d, dt) <= gtol, "%s: grad_query %.3g", what,
            rel_norm(gq, rq, n * d, dt));
  cr_assert(rel_norm(gk, rk, n * d, dt) <= gtol, "%s: grad_key %.3g", what,
            rel_norm(gk, rk, n * d, dt));
  cr_assert(close_enough(gt_g, gt_c, 1e-6, dt == CULOSS_F32 || exact ? 1e-3 : 3e-2),
            "%s: grad_temperature gpu %.9g cpu %.9g", what, (double)gt_g, (double)gt_c);
  culoss_free(gpu, dq), culoss_free(gpu, dk), culoss_free(gpu, dgq), culoss_free(gpu, dgk);
  culoss_free(gpu, dw), culoss_free(gpu, dl), culoss_free(gpu, dgl), culoss_free(gpu, d_t);
  culoss_free(gpu, d_gt);
  free(q), free(k), free(gl), free(qh), free(kh), free(w), free(rq), free(rk), free(gq), free(gk);
  free(rl), free(l);
}

Test(gpu_more, info_nce) {
  REQUIRE_GPU();
  uint64_t seed = 5000;
  const int64_t shapes[][2] = {{1, 8}, {37, 16}, {300, 64}};
  for (int s = 0; s < 3; s++)
    for (int dt = 0; dt < 3; dt++)
      for (int sym = 0; sym < 2; sym++)
        for (int red = 0; red < 3; red++) {
          if (test_quick() && s == 2 && dt > 0) continue;
          const int exact = dt != CULOSS_F32 && shapes[s][1] <= 16;
          nce_case(shapes[s][0], shapes[s][1], (culoss_dtype)dt, sym, (culoss_reduction)red, exact,
                   seed++);
        }
}

/* A temperature <= 0 read on the device: NaN outputs, a deferred
   INVALID_VALUE. */
Test(gpu_more, info_nce_bad_temperature_is_deferred) {
  REQUIRE_GPU();
  const float q[8] = {1, 0, 0, 1, 1, 1, 0, 0}, bad = -1.0f;
  culoss_info_nce_options o;
  culoss_info_nce_options_init(&o);
  float *dq = dev_from(q, 32), *dt = dev_from(&bad, 4), *dl = dev_alloc(4), l;
  o.temperature = dt;
  size_t ws;
  cr_assert_eq(culoss_info_nce_workspace_size(gpu, &o, 2, 4, CULOSS_F32, &ws), CULOSS_OK);
  void *w = dev_alloc(ws);
  cr_assert_eq(culoss_info_nce(gpu, &o, 2, 4, CULOSS_F32, dq, dq + 0, dl, NULL, NULL, NULL, w, ws),
               CULOSS_OK);
  cr_assert_eq(culoss_synchronize(gpu), CULOSS_ERROR_INVALID_VALUE);
  to_host(&l, dl, 4);
  cr_assert(isnan(l), "loss %g", (double)l);
  culoss_free(gpu, dq), culoss_free(gpu, dt), culoss_free(gpu, dl), culoss_free(gpu, w);
}

/* The memory test of issue 20 on a GPU: InfoNCE at N = 12288, D = 1024
   (bf16), forward and backward. Loss calls never allocate, so the device
   memory the call needs beyond its inputs and gradients is the workspace it
   asks for, against the explicit form's N^2 bf16 logits and their gradient
   (bench/compare_torch.py measures torch's peak for both forms). */
Test(gpu_more, info_nce_memory_at_12288_pairs) {
  REQUIRE_GPU();
  if (test_quick()) cr_skip_test("skipped: CULOSS_TEST_QUICK is set (a 6 GFLOP-per-pass case)");
  if (test_emulated_small())
    cr_skip_test("skipped: the CPU emulator of CUDA (its GEMMs at N = 12288, D = 1024 take "
                 "hours; CULOSS_EMU_BIG=1 runs it)");
  const int64_t n = 12288, d = 1024;
  const double explicit_bytes = 2.0 * (double)n * (double)n * 2.0; /* logits + their gradient */
  rng_t r = rng_seeded(7);
  float *h = malloc((size_t)(n * d) * 4);
  uint16_t *qb = malloc((size_t)(n * d) * 2), *kb = malloc((size_t)(n * d) * 2);
  for (int64_t e = 0; e < n * d; e++) h[e] = (float)(0.03 * rng_normal(&r));
  pack_dtype(qb, h, n * d, CULOSS_BF16);
  for (int64_t e = 0; e < n * d; e++) h[e] += (float)(0.01 * rng_normal(&r));
  pack_dtype(kb, h, n * d, CULOSS_BF16);
  void *dq = dev_from(qb, (size_t)(n * d) * 2), *dk = dev_from(kb, (size_t)(n * d) * 2);
  void *dgq = dev_alloc((size_t)(n * d) * 2), *dgk = dev_alloc((size_t)(n * d) * 2);
  float *dl = dev_alloc(4), loss;
  culoss_info_nce_options o;
  culoss_info_nce_options_init(&o);
  o.symmetric = 1;
  size_t ws;
  cr_assert_eq(culoss_info_nce_workspace_size(gpu, &o, n, d, CULOSS_BF16, &ws), CULOSS_OK);
  void *w = dev_alloc(ws);
  cr_assert_eq(culoss_info_nce(gpu, &o, n, d, CULOSS_BF16, dq, dk, dl, dgq, dgk, NULL, w, ws),
               CULOSS_OK, "%s", culoss_last_error());
  cr_assert_eq(culoss_synchronize(gpu), CULOSS_OK, "%s", culoss_last_error());
  to_host(&loss, dl, 4);
  fprintf(stderr,
          "InfoNCE N=%lld D=%lld bf16 symmetric: workspace %.1f MB, %.1f%% of the "
          "explicit form's %.0f MB\n",
          (long long)n, (long long)d, ws / 1e6, 100.0 * ws / explicit_bytes, explicit_bytes / 1e6);
  cr_assert(ws < explicit_bytes / 4, "workspace %zu bytes", ws);
  cr_assert(isfinite(loss) && loss >= 0.0f, "loss %g", (double)loss);
  culoss_free(gpu, dq), culoss_free(gpu, dk), culoss_free(gpu, dgq), culoss_free(gpu, dgk);
  culoss_free(gpu, dl), culoss_free(gpu, w);
  free(h), free(qb), free(kb);
}
