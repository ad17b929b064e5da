#define _POSIX_C_SOURCE 200809L /* pthread barriers */
/* test_cpu_vocab_parallel.c: vocabulary-parallel cross-entropy on the CPU
   backend with simulated ranks (1, 2, 3 and 8; uneven slices, one holding
   no target), against the unsharded culoss_cross_entropy on the
   concatenated logits: every option and reduction, fp32 and bf16, the two
   phases driven by hand, the one-call form over an all-gather between
   threads, and bad arguments. */
#include <criterion/criterion.h>
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "helpers.h"

static culoss_context *ctx;
static void setup(void) { cr_assert_eq(culoss_create(&ctx, CULOSS_BACKEND_CPU, 0), CULOSS_OK); }
static void teardown(void) { culoss_destroy(ctx); }
TestSuite(cpu_vp, .init = setup, .fini = teardown);

#define REC (CULOSS_VOCAB_PARALLEL_RECORD_BYTES / 4)
#define MAXR 8

/* Uneven slices of v classes over `ranks` ranks: widths differ, and when
   there are three or more ranks the last slice is one class wide (so it
   rarely or never holds a target). */
static void slices(int ranks, int64_t v, int64_t *begin, int64_t *width) {
  int64_t left = v;
  for (int k = 0; k < ranks; k++) {
    const int64_t rest = ranks - 1 - k;
    int64_t w = k == ranks - 1
                    ? left
                    : (ranks >= 3 && k == ranks - 2 ? left - 1 : (left - rest) / 2 + k % 2);
    if (w < 1) w = 1;
    if (w > left - rest) w = left - rest;
    begin[k] = v - left, width[k] = w, left -= w;
  }
}

typedef struct {
  int64_t n, v;
  culoss_dtype dt;
  culoss_reduction red;
  int weights, smooth, zl, cap, norm, gl, in_place;
  uint64_t seed;
} vcase;

static void run_vcase(const vcase *k, int ranks) {
  const int64_t n = k->n, v = k->v;
  const size_t es = dtype_bytes(k->dt);
  rng_t r = rng_seeded(k->seed);
  float *x = malloc((size_t)(n * v) * 4), *cw = malloc((size_t)v * 4), glv[64];
  int64_t *t = malloc((size_t)n * 8), begin[MAXR], width[MAXR];
  for (int64_t i = 0; i < n * v; i++) x[i] = (float)(3.0 * rng_normal(&r));
  for (int64_t i = 0; i < n; i++) {
    t[i] = i % 5 == 2 ? -100 : rng_int(&r, 0, v - (ranks >= 3 ? 1 : 0)); /* last slice: none */
    x[i * v + (i * 7) % v] = i % 4 == 1 ? -INFINITY : x[i * v + (i * 7) % v];
    if (i % 6 == 3) /* a large common offset */
      for (int64_t j = 0; j < v; j++) x[i * v + j] += 1000.0f;
  }
  for (int64_t j = 0; j < v; j++) cw[j] = (float)(0.25 + 2.0 * rng_uniform(&r));
  for (int i = 0; i < 64; i++) glv[i] = (float)(0.5 + rng_uniform(&r));
  round_through(x, n * v, k->dt);
  unsigned char *xh = malloc((size_t)(n * v) * es);
  pack_dtype(xh, x, n * v, k->dt);
  const float norm = 17.0f;
  culoss_cross_entropy_options o;
  culoss_cross_entropy_options_init(&o);
  o.reduction = k->red;
  o.label_smoothing = k->smooth ? 0.1f : 0.0f;
  o.z_loss = k->zl ? 1e-3f : 0.0f;
  o.logit_softcap = k->cap ? 30.0f : 0.0f;
  if (k->norm) o.normalizer = &norm;
  if (k->weights) o.class_weight = cw;
  const float *gl = k->gl ? glv : NULL;
  const int64_t nl = k->red == CULOSS_REDUCTION_NONE ? n : 1;
  /* the unsharded call */
  float ref_loss[64], loss[MAXR][64];
  unsigned char *ref_g = malloc((size_t)(n * v) * es);
  cr_assert_eq(
      culoss_cross_entropy(ctx, &o, n, v, k->dt, xh, v, CULOSS_I64, t, ref_loss, ref_g, gl),
      CULOSS_OK, "%s", culoss_last_error());
  /* phase 1 on every rank, the gather by hand, phase 2 on every rank */
  slices(ranks, v, begin, width);
  float *gathered = malloc((size_t)ranks * (size_t)(n + 1) * REC * 4);
  unsigned char *xs[MAXR], *gs[MAXR];
  float *cws[MAXR];
  for (int q = 0; q < ranks; q++) {
    xs[q] = malloc((size_t)(n * width[q]) * es), gs[q] = malloc((size_t)(n * width[q]) * es);
    cws[q] = cw + begin[q];
    for (int64_t i = 0; i < n; i++)
      memcpy(xs[q] + (size_t)(i * width[q]) * es, xh + (size_t)(i * v + begin[q]) * es,
             (size_t)width[q] * es);
    culoss_vocab_parallel vp = {q, ranks, begin[q], v, NULL, NULL};
    culoss_cross_entropy_options oq = o;
    if (k->weights) oq.class_weight = cws[q];
    cr_assert_eq(culoss_cross_entropy_vocab_parallel_stats(ctx, &oq, &vp, n, width[q], k->dt, xs[q],
                                                           width[q], CULOSS_I64, t,
                                                           gathered + (size_t)q * (n + 1) * REC),
                 CULOSS_OK, "%s", culoss_last_error());
  }
  for (int q = 0; q < ranks; q++) {
    culoss_vocab_parallel vp = {q, ranks, begin[q], v, NULL, NULL};
    culoss_cross_entropy_options oq = o;
    if (k->weights) oq.class_weight = cws[q];
    void *gq = k->in_place ? (void *)xs[q] : (void *)gs[q];
    cr_assert_eq(culoss_cross_entropy_vocab_parallel_finish(ctx, &oq, &vp, n, width[q], k->dt,
                                                            xs[q], width[q], CULOSS_I64, t,
                                                            gathered, loss[q], gq, gl),
                 CULOSS_OK, "%s", culoss_last_error());
    for (int64_t i = 0; i < nl; i++) {
      cr_assert(memcmp(&loss[q][i], &loss[0][i], 4) == 0, "rank %d loss[%lld] %.9g, rank 0 %.9g", q,
                (long long)i, (double)loss[q][i], (double)loss[0][i]);
      cr_assert(close_enough(loss[q][i], ref_loss[i], 1e-5, 1e-5),
                "ranks %d loss[%lld] %.9g vs unsharded %.9g", ranks, (long long)i,
                (double)loss[q][i], (double)ref_loss[i]);
    }
    float *a = malloc((size_t)width[q] * 4), *b = malloc((size_t)width[q] * 4);
    const double rt = k->dt == CULOSS_F32 ? 1e-5 : 1.0 / 128; /* one bf16 ulp at most */
    for (int64_t i = 0; i < n; i++) {
      unpack_dtype(a, (unsigned char *)gq + (size_t)(i * width[q]) * es, width[q], k->dt);
      unpack_dtype(b, ref_g + (size_t)(i * v + begin[q]) * es, width[q], k->dt);
      for (int64_t j = 0; j < width[q]; j++)
        cr_assert(close_enough(a[j], b[j], 1e-7, rt),
                  "ranks %d rank %d grad[%lld][%lld] %.9g vs %.9g", ranks, q, (long long)i,
                  (long long)(begin[q] + j), (double)a[j], (double)b[j]);
    }
    free(a), free(b);
  }
  for (int q = 0; q < ranks; q++) free(xs[q]), free(gs[q]);
  free(x), free(cw), free(t), free(xh), free(ref_g), free(gathered);
}

Test(cpu_vp, matches_unsharded_on_1_2_3_8_ranks_every_option) {
  static const int rank_counts[] = {1, 2, 3, 8};
  uint64_t seed = 1;
  for (int ri = 0; ri < 4; ri++)
    for (int variant = 0; variant < 8; variant++)
      for (int red = 0; red < 3; red++) {
        vcase k = {29,
                   53,
                   variant % 3 == 2 ? CULOSS_BF16 : CULOSS_F32,
                   (culoss_reduction)red,
                   variant & 1,
                   (variant >> 1) & 1,
                   variant >= 4,
                   variant == 5 || variant == 7,
                   variant == 6 && red == 2,
                   variant % 2 == 0,
                   variant == 3,
                   seed++};
        run_vcase(&k, rank_counts[ri]);
      }
}

/* The one-call form with a real all-gather between threads, one context
   per rank. */
typedef struct {
  pthread_barrier_t *bar;
  unsigned char *shared; /* ranks * bytes */
  int rank;
} gather_user;

static int thread_allgather(void *user, const void *send, void *recv, size_t bytes, void *stream) {
  gather_user *u = user;
  const int ranks = 3;
  if (stream != NULL) return 1;
  memcpy(u->shared + (size_t)u->rank * bytes, send, bytes);
  pthread_barrier_wait(u->bar);
  memcpy(recv, u->shared, (size_t)ranks * bytes);
  pthread_barrier_wait(u->bar);
  return 0;
}

typedef struct {
  gather_user user;
  int64_t begin, width, n, v;
  const float *x;
  const int64_t *t;
  float loss[40];
  float *grad;
  culoss_status st;
} rank_job;

static void *rank_main(void *p) {
  rank_job *j = p;
  culoss_context *c = NULL;
  culoss_vocab_parallel vp = {j->user.rank, 3, j->begin, j->v, thread_allgather, &j->user};
  size_t wsb = 0;
  float *xs = malloc((size_t)(j->n * j->width) * 4);
  for (int64_t i = 0; i < j->n; i++)
    memcpy(xs + i * j->width, j->x + i * j->v + j->begin, (size_t)j->width * 4);
  culoss_cross_entropy_options o;
  culoss_cross_entropy_options_init(&o);
  o.reduction = CULOSS_REDUCTION_NONE;
  o.label_smoothing = 0.2f;
  j->st = culoss_create(&c, CULOSS_BACKEND_CPU, 0);
  if (j->st == CULOSS_OK) j->st = culoss_vocab_parallel_workspace_size(c, &vp, j->n, &wsb);
  void *ws = malloc(wsb);
  if (j->st == CULOSS_OK)
    j->st =
        culoss_cross_entropy_vocab_parallel(c, &o, &vp, j->n, j->width, CULOSS_F32, xs, j->width,
                                            CULOSS_I64, j->t, j->loss, j->grad, NULL, ws, wsb);
  culoss_destroy(c);
  free(xs), free(ws);
  return NULL;
}

Test(cpu_vp, one_call_over_threads) {
  enum { n = 40, v = 100, ranks = 3 };
  rng_t r = rng_seeded(7);
  float x[n * v], ref_loss[n], ref_g[n * v];
  int64_t t[n];
  for (int i = 0; i < n * v; i++) x[i] = (float)(2.0 * rng_normal(&r));
  for (int i = 0; i < n; i++) t[i] = i % 9 == 4 ? -100 : rng_int(&r, 0, v);
  culoss_cross_entropy_options o;
  culoss_cross_entropy_options_init(&o);
  o.reduction = CULOSS_REDUCTION_NONE;
  o.label_smoothing = 0.2f;
  cr_assert_eq(
      culoss_cross_entropy(ctx, &o, n, v, CULOSS_F32, x, v, CULOSS_I64, t, ref_loss, ref_g, NULL),
      CULOSS_OK);
  pthread_barrier_t bar;
  pthread_barrier_init(&bar, NULL, ranks);
  size_t bytes = (size_t)(n + 1) * CULOSS_VOCAB_PARALLEL_RECORD_BYTES;
  unsigned char *shared = malloc((size_t)ranks * bytes);
  static const int64_t begin[ranks] = {0, 57, 61}, width[ranks] = {57, 4, 39};
  rank_job jobs[ranks];
  pthread_t th[ranks];
  for (int q = 0; q < ranks; q++) {
    jobs[q] = (rank_job){{&bar, shared, q}, begin[q], width[q], n, v, x, t, {0}, NULL, CULOSS_OK};
    jobs[q].grad = malloc((size_t)(n * width[q]) * 4);
    pthread_create(&th[q], NULL, rank_main, &jobs[q]);
  }
  for (int q = 0; q < ranks; q++) pthread_join(th[q], NULL);
  for (int q = 0; q < ranks; q++) {
    cr_assert_eq(jobs[q].st, CULOSS_OK, "rank %d: %d", q, (int)jobs[q].st);
    for (int i = 0; i < n; i++) {
      cr_assert(memcmp(&jobs[q].loss[i], &jobs[0].loss[i], 4) == 0, "rank %d loss[%d]", q, i);
      cr_assert(close_enough(jobs[q].loss[i], ref_loss[i], 1e-5, 1e-5), "loss[%d] %g vs %g", i,
                (double)jobs[q].loss[i], (double)ref_loss[i]);
      for (int64_t j = 0; j < width[q]; j++)
        cr_assert(
            close_enough(jobs[q].grad[i * width[q] + j], ref_g[i * v + begin[q] + j], 1e-7, 1e-5),
            "rank %d grad[%d][%lld]", q, i, (long long)(begin[q] + j));
    }
    free(jobs[q].grad);
  }
  pthread_barrier_destroy(&bar);
  free(shared);
}

static int failing_gather(void *user, const void *send, void *recv, size_t bytes, void *stream) {
  (void)user, (void)send, (void)recv, (void)bytes, (void)stream;
  return 5;
}

Test(cpu_vp, bad_arguments) {
  float x[4 * 6] = {0}, loss[4] = {-9, -9, -9, -9}, rec[(4 + 1) * REC * 2];
  int64_t t[4] = {0, 1, 2, 3};
  size_t wsb = 0;
  unsigned char ws[4096];
  culoss_vocab_parallel vp = {0, 2, 0, 10, NULL, NULL};
  /* no callback for the one-call form; a rank outside [0, ranks); a slice past v_total */
  cr_assert_eq(culoss_cross_entropy_vocab_parallel(ctx, NULL, &vp, 4, 6, CULOSS_F32, x, 6,
                                                   CULOSS_I64, t, loss, NULL, NULL, ws, sizeof ws),
               CULOSS_ERROR_INVALID_VALUE);
  cr_assert(strstr(culoss_last_error(), "allgather") != NULL, "%s", culoss_last_error());
  cr_assert_eq(culoss_cross_entropy_vocab_parallel(ctx, NULL, NULL, 4, 6, CULOSS_F32, x, 6,
                                                   CULOSS_I64, t, loss, NULL, NULL, ws, sizeof ws),
               CULOSS_ERROR_INVALID_VALUE);
  vp.allgather = failing_gather;
  vp.rank = 2;
  cr_assert_eq(culoss_cross_entropy_vocab_parallel_stats(ctx, NULL, &vp, 4, 6, CULOSS_F32, x, 6,
                                                         CULOSS_I64, t, rec),
               CULOSS_ERROR_INVALID_VALUE);
  vp.rank = 1, vp.v_begin = 5;
  cr_assert_eq(culoss_cross_entropy_vocab_parallel_stats(ctx, NULL, &vp, 4, 6, CULOSS_F32, x, 6,
                                                         CULOSS_I64, t, rec),
               CULOSS_ERROR_INVALID_VALUE);
  cr_assert(strstr(culoss_last_error(), "v_total") != NULL, "%s", culoss_last_error());
  /* a target outside [0, v_total) */
  vp.v_begin = 4;
  t[3] = 10;
  cr_assert_eq(culoss_cross_entropy_vocab_parallel_stats(ctx, NULL, &vp, 4, 6, CULOSS_F32, x, 6,
                                                         CULOSS_I64, t, rec),
               CULOSS_ERROR_TARGET_OUT_OF_RANGE);
  t[3] = 3;
  /* the callback's failure is the call's */
  cr_assert_eq(culoss_vocab_parallel_workspace_size(ctx, &vp, 4, &wsb), CULOSS_OK);
  cr_assert_leq(wsb, sizeof ws);
  cr_assert_eq(culoss_cross_entropy_vocab_parallel(ctx, NULL, &vp, 4, 6, CULOSS_F32, x, 6,
                                                   CULOSS_I64, t, loss, NULL, NULL, ws, wsb - 1),
               CULOSS_ERROR_INVALID_VALUE);
  cr_assert_eq(culoss_cross_entropy_vocab_parallel(ctx, NULL, &vp, 4, 6, CULOSS_F32, x, 6,
                                                   CULOSS_I64, t, loss, NULL, NULL, ws, wsb),
               CULOSS_ERROR_INTERNAL);
  cr_assert(strstr(culoss_last_error(), "allgather") != NULL, "%s", culoss_last_error());
  cr_assert_eq(loss[0], -9.0f, "nothing written");
  /* gathered records whose slices do not cover v_total: refused before writing */
  vp.v_begin = 0, vp.rank = 0;
  culoss_vocab_parallel vp1 = {1, 2, 6, 10, NULL, NULL};
  cr_assert_eq(culoss_cross_entropy_vocab_parallel_stats(ctx, NULL, &vp, 4, 6, CULOSS_F32, x, 6,
                                                         CULOSS_I64, t, rec),
               CULOSS_OK);
  cr_assert_eq(culoss_cross_entropy_vocab_parallel_stats(ctx, NULL, &vp1, 4, 3, CULOSS_F32, x, 6,
                                                         CULOSS_I64, t, rec + (4 + 1) * REC),
               CULOSS_OK); /* 6 + 3 = 9 classes, not 10 */
  cr_assert_eq(culoss_cross_entropy_vocab_parallel_finish(ctx, NULL, &vp, 4, 6, CULOSS_F32, x, 6,
                                                          CULOSS_I64, t, rec, loss, NULL, NULL),
               CULOSS_ERROR_INVALID_VALUE);
  cr_assert(strstr(culoss_last_error(), "v_total") != NULL, "%s", culoss_last_error());
  cr_assert_eq(loss[0], -9.0f, "nothing written");
  /* widths that add up but overlap ([0, 6) and [4, 8) of 10), every target
     owned once: still refused */
  culoss_vocab_parallel vo = {1, 2, 4, 10, NULL, NULL};
  int64_t t2[4] = {0, 1, 6, 7};
  cr_assert_eq(culoss_cross_entropy_vocab_parallel_stats(ctx, NULL, &vp, 4, 6, CULOSS_F32, x, 6,
                                                         CULOSS_I64, t2, rec),
               CULOSS_OK);
  cr_assert_eq(culoss_cross_entropy_vocab_parallel_stats(ctx, NULL, &vo, 4, 4, CULOSS_F32, x, 6,
                                                         CULOSS_I64, t2, rec + (4 + 1) * REC),
               CULOSS_OK);
  cr_assert_eq(culoss_cross_entropy_vocab_parallel_finish(ctx, NULL, &vp, 4, 6, CULOSS_F32, x, 6,
                                                          CULOSS_I64, t2, rec, loss, NULL, NULL),
               CULOSS_ERROR_INVALID_VALUE);
  cr_assert(strstr(culoss_last_error(), "tile") != NULL, "%s", culoss_last_error());
  cr_assert_eq(loss[0], -9.0f, "nothing written");
}

/* ---- vocabulary-parallel linear + CE: ranks as threads ---- */

typedef struct {
  pthread_barrier_t *bar;
  unsigned char *shared;
  int rank, ranks;
} lgather;

static int lthread_allgather(void *user, const void *send, void *recv, size_t bytes, void *stream) {
  lgather *u = user;
  if (stream != NULL) return 1;
  memcpy(u->shared + (size_t)u->rank * bytes, send, bytes);
  pthread_barrier_wait(u->bar);
  memcpy(recv, u->shared, (size_t)u->ranks * bytes);
  pthread_barrier_wait(u->bar);
  return 0;
}

enum { LN = 19, LD = 6, LV = 41 };

typedef struct {
  lgather g;
  int64_t begin, width;
  culoss_dtype dt;
  const unsigned char *h, *w, *b; /* full, in dt */
  const int64_t *t;
  const float *gl; /* upstream gradient [LN] (reduction none) or NULL */
  const culoss_cross_entropy_options *o;
  int accumulate, gw16; /* gw16: grad_weight / grad_bias in the input dtype */
  float loss[LN];
  float gh[LN * LD], gw[LV * LD], gb[LV]; /* fp32 (unpacked) */
  float lse[LN], ent[LN];
  culoss_status st;
  char err[200];
} lrank;

static void *lrank_main(void *p) {
  lrank *j = p;
  culoss_context *c = NULL;
  const size_t es = dtype_bytes(j->dt);
  culoss_vocab_parallel vp = {j->g.rank, j->g.ranks, j->begin, LV, lthread_allgather, &j->g};
  culoss_linear_ce_options lo;
  culoss_linear_ce_options_init(&lo);
  const culoss_dtype gdt = j->gw16 ? j->dt : CULOSS_F32;
  lo.grad_weight_dtype = j->gw16 ? CULOSS_DTYPE_INPUT : CULOSS_F32;
  lo.accumulate = j->accumulate;
  lo.lse = j->lse, lo.entropy = j->ent;
  culoss_cross_entropy_options o = *j->o;
  if (o.class_weight) o.class_weight += j->begin;
  unsigned char gh[LN * LD * 4], gw[LV * LD * 4], gb[LV * 4];
  pack_dtype(gw, j->gw + j->begin * LD, j->width * LD, gdt);
  pack_dtype(gb, j->gb + j->begin, j->width, gdt);
  j->st = culoss_create(&c, CULOSS_BACKEND_CPU, 0);
  if (j->st == CULOSS_OK)
    j->st = culoss_linear_cross_entropy_vocab_parallel(
        c, &o, &lo, &vp, LN, LD, j->width, j->dt, j->h, j->w + (size_t)(j->begin * LD) * es,
        j->b + (size_t)j->begin * es, CULOSS_I64, j->t, j->loss, gh, gw, gb, j->gl, NULL, 0);
  if (j->st != CULOSS_OK) snprintf(j->err, sizeof j->err, "%s", culoss_last_error());
  unpack_dtype(j->gh, gh, LN * LD, j->dt);
  unpack_dtype(j->gw + j->begin * LD, gw, j->width * LD, gdt);
  unpack_dtype(j->gb + j->begin, gb, j->width, gdt);
  culoss_destroy(c);
  return NULL;
}

static void linear_case(int ranks, culoss_dtype dt, int variant, int gw16, uint64_t seed) {
  rng_t r = rng_seeded(seed);
  float h[LN * LD], w[LV * LD], b[LV], cw[LV];
  int64_t t[LN], begin[MAXR], width[MAXR];
  for (int i = 0; i < LN * LD; i++) h[i] = (float)rng_normal(&r);
  for (int i = 0; i < LV * LD; i++) w[i] = (float)(0.8 * rng_normal(&r));
  for (int j = 0; j < LV; j++)
    b[j] = (float)(0.3 * rng_normal(&r)), cw[j] = (float)(0.5 + rng_uniform(&r));
  for (int i = 0; i < LN; i++) t[i] = i % 6 == 1 ? -100 : rng_int(&r, 0, LV - 1);
  round_through(h, LN * LD, dt), round_through(w, LV * LD, dt), round_through(b, LV, dt);
  unsigned char hh[LN * LD * 4], wh[LV * LD * 4], bh[LV * 4];
  pack_dtype(hh, h, LN * LD, dt), pack_dtype(wh, w, LV * LD, dt), pack_dtype(bh, b, LV, dt);
  culoss_cross_entropy_options o;
  culoss_cross_entropy_options_init(&o);
  o.reduction = (culoss_reduction)(variant % 3);
  if (variant & 1) o.label_smoothing = 0.1f, o.class_weight = cw;
  if (variant & 2) o.z_loss = 1e-3f, o.logit_softcap = 5.0f;
  const int accumulate = variant >= 4;
  float glv[LN]; /* an upstream gradient for reduction none */
  for (int i = 0; i < LN; i++) glv[i] = (float)(0.5 + rng_uniform(&r));
  const float *gl = o.reduction == CULOSS_REDUCTION_NONE ? glv : NULL;
  /* the single-device reference, on fp32 copies of the rounded inputs */
  float ref_l[LN], ref_gh[LN * LD], ref_gw[LV * LD], ref_gb[LV], ref_lse[LN], ref_ent[LN];
  culoss_linear_ce_options rlo;
  culoss_linear_ce_options_init(&rlo);
  rlo.lse = ref_lse, rlo.entropy = ref_ent;
  cr_assert_eq(culoss_linear_cross_entropy_ex(ctx, &o, &rlo, LN, LD, LV, CULOSS_F32, h, w, b,
                                              CULOSS_I64, t, ref_l, ref_gh, ref_gw, ref_gb, gl,
                                              NULL, 0),
               CULOSS_OK, "%s", culoss_last_error());
  slices(ranks, LV, begin, width);
  pthread_barrier_t bar;
  pthread_barrier_init(&bar, NULL, (unsigned)ranks);
  unsigned char *shared = malloc((size_t)ranks * (LN + 1) * CULOSS_VOCAB_PARALLEL_RECORD_BYTES);
  static lrank jobs[MAXR];
  pthread_t th[MAXR];
  float old_w[LV * LD], old_b[LV];
  for (int i = 0; i < LV * LD; i++) old_w[i] = accumulate ? (float)(0.01 * rng_normal(&r)) : 0.0f;
  for (int j = 0; j < LV; j++) old_b[j] = accumulate ? (float)(0.01 * rng_normal(&r)) : 0.0f;
  const culoss_dtype gdt = gw16 ? dt : CULOSS_F32;
  round_through(old_w, LV * LD, gdt), round_through(old_b, LV, gdt);
  /* grad_weight / grad_bias: the sum rounded once to their dtype */
  const double gwr = gdt == CULOSS_F32 ? 1e-4 : (gdt == CULOSS_F16 ? 2.0 / 1024 : 2.0 / 256);
  for (int q = 0; q < ranks; q++) {
    memset(&jobs[q], 0, sizeof jobs[q]);
    jobs[q].g = (lgather){&bar, shared, q, ranks};
    jobs[q].begin = begin[q], jobs[q].width = width[q], jobs[q].dt = dt;
    jobs[q].h = hh, jobs[q].w = wh, jobs[q].b = bh, jobs[q].t = t, jobs[q].o = &o, jobs[q].gl = gl;
    jobs[q].accumulate = accumulate, jobs[q].gw16 = gw16;
    memcpy(jobs[q].gw, old_w, sizeof old_w), memcpy(jobs[q].gb, old_b, sizeof old_b);
    pthread_create(&th[q], NULL, lrank_main, &jobs[q]);
  }
  for (int q = 0; q < ranks; q++) pthread_join(th[q], NULL);
  const int64_t nl = o.reduction == CULOSS_REDUCTION_NONE ? LN : 1;
  float gh_sum[LN * LD] = {0}, gh_abs[LN * LD] = {0};
  const double ulp = dt == CULOSS_F32 ? 1.2e-7 : (dt == CULOSS_F16 ? 1.0 / 1024 : 1.0 / 256);
  for (int q = 0; q < ranks; q++) {
    cr_assert_eq(jobs[q].st, CULOSS_OK, "rank %d: %s", q, jobs[q].err);
    for (int64_t i = 0; i < nl; i++) {
      cr_assert(memcmp(&jobs[q].loss[i], &jobs[0].loss[i], 4) == 0, "rank %d loss[%lld]", q,
                (long long)i);
      cr_assert(close_enough(jobs[q].loss[i], ref_l[i], 1e-5, 1e-5),
                "%d ranks v%d loss[%lld] %.9g vs %.9g", ranks, variant, (long long)i,
                (double)jobs[q].loss[i], (double)ref_l[i]);
    }
    for (int64_t j = begin[q] * LD; j < (begin[q] + width[q]) * LD; j++)
      cr_assert(fabs(jobs[q].gw[j] - old_w[j] - ref_gw[j]) <=
                    1e-6 + gwr * (fabs(ref_gw[j]) + fabs(old_w[j])),
                "%d ranks v%d grad_weight[%lld] %.9g vs %.9g", ranks, variant, (long long)j,
                (double)(jobs[q].gw[j] - old_w[j]), (double)ref_gw[j]);
    for (int64_t j = begin[q]; j < begin[q] + width[q]; j++)
      cr_assert(fabs(jobs[q].gb[j] - old_b[j] - ref_gb[j]) <=
                    1e-6 + gwr * (fabs(ref_gb[j]) + fabs(old_b[j])),
                "grad_bias[%lld]", (long long)j);
    for (int i = 0; i < LN * LD; i++) gh_sum[i] += jobs[q].gh[i], gh_abs[i] += fabsf(jobs[q].gh[i]);
    for (int i = 0; i < LN; i++) {
      cr_assert(close_enough(jobs[q].lse[i], ref_lse[i], 1e-5, 1e-5), "rank %d lse[%d] %g vs %g", q,
                i, (double)jobs[q].lse[i], (double)ref_lse[i]);
      cr_assert(close_enough(jobs[q].ent[i], ref_ent[i], 1e-5, 1e-4),
                "rank %d entropy[%d] %g vs %g", q, i, (double)jobs[q].ent[i], (double)ref_ent[i]);
    }
  }
  /* the ranks' partial grad_hidden sum to the whole (what the caller's all-reduce does), each
     partial rounded once to the dtype */
  for (int i = 0; i < LN * LD; i++)
    cr_assert(fabs(gh_sum[i] - ref_gh[i]) <= 1e-6 + ulp * gh_abs[i] + 1e-5 * fabs(ref_gh[i]),
              "%d ranks v%d grad_hidden[%d] %.9g vs %.9g", ranks, variant, i, (double)gh_sum[i],
              (double)ref_gh[i]);
  pthread_barrier_destroy(&bar);
  free(shared);
}

Test(cpu_vp, linear_matches_single_device_on_1_3_8_ranks) {
  static const int rank_counts[] = {1, 3, 8};
  uint64_t seed = 900;
  for (int ri = 0; ri < 3; ri++)
    for (int variant = 0; variant < 6; variant++)
      linear_case(rank_counts[ri], variant == 5 ? CULOSS_BF16 : CULOSS_F32, variant, 0, seed++);
  for (int dt = 1; dt <= 2; dt++) /* a 16-bit grad_weight and grad_bias */
    for (int variant = 0; variant < 6; variant += 3)
      linear_case(3, (culoss_dtype)dt, variant + 1, 1, seed++);
}

Test(cpu_vp, linear_refusals) {
  culoss_vocab_parallel vp = {0, 1, 0, 4, lthread_allgather, NULL};
  culoss_linear_ce_options lo;
  culoss_linear_ce_options_init(&lo);
  uint16_t h[8] = {0}, w[8] = {0}, gw[8];
  int64_t t[4] = {0, 1, 2, 3};
  float loss;
  lo.grad_weight_dtype = CULOSS_F16; /* neither the input's (bf16) nor fp32 */
  cr_assert_eq(culoss_linear_cross_entropy_vocab_parallel(ctx, NULL, &lo, &vp, 4, 2, 4, CULOSS_BF16,
                                                          h, w, NULL, CULOSS_I64, t, &loss, NULL,
                                                          gw, NULL, NULL, NULL, 0),
               CULOSS_ERROR_INVALID_VALUE);
  cr_assert(strstr(culoss_last_error(), "grad_weight_dtype") != NULL, "%s", culoss_last_error());
  culoss_linear_ce_options_init(&lo);
  vp.allgather = NULL;
  cr_assert_eq(culoss_linear_cross_entropy_vocab_parallel(ctx, NULL, NULL, &vp, 4, 2, 4,
                                                          CULOSS_BF16, h, w, NULL, CULOSS_I64, t,
                                                          &loss, NULL, NULL, NULL, NULL, NULL, 0),
               CULOSS_ERROR_INVALID_VALUE);
}

/* int32 targets, and n == 0 (MEAN: NaN, SUM: 0, as the unsharded call). */
Test(cpu_vp, int32_targets_and_empty_batches) {
  enum { n = 9, v = 20 };
  rng_t r = rng_seeded(31);
  float x[n * v], ref_l[n], l[n], g[n * v], ref_g[n * v];
  int32_t t32[n];
  float rec[2 * (n + 1) * REC];
  for (int i = 0; i < n * v; i++) x[i] = (float)rng_normal(&r);
  for (int i = 0; i < n; i++) t32[i] = i == 4 ? -100 : (int32_t)rng_int(&r, 0, v);
  culoss_cross_entropy_options o;
  culoss_cross_entropy_options_init(&o);
  o.reduction = CULOSS_REDUCTION_NONE;
  cr_assert_eq(
      culoss_cross_entropy(ctx, &o, n, v, CULOSS_F32, x, v, CULOSS_I32, t32, ref_l, ref_g, NULL),
      CULOSS_OK);
  /* two ranks over the same row-major buffer: columns [0, 12) and [12, 20), row stride v */
  culoss_vocab_parallel v0 = {0, 2, 0, v, NULL, NULL}, v1 = {1, 2, 12, v, NULL, NULL};
  cr_assert_eq(culoss_cross_entropy_vocab_parallel_stats(ctx, &o, &v0, n, 12, CULOSS_F32, x, v,
                                                         CULOSS_I32, t32, rec),
               CULOSS_OK);
  cr_assert_eq(culoss_cross_entropy_vocab_parallel_stats(ctx, &o, &v1, n, 8, CULOSS_F32, x + 12, v,
                                                         CULOSS_I32, t32, rec + (n + 1) * REC),
               CULOSS_OK);
  memcpy(g, x, sizeof g);
  cr_assert_eq(culoss_cross_entropy_vocab_parallel_finish(ctx, &o, &v0, n, 12, CULOSS_F32, x, v,
                                                          CULOSS_I32, t32, rec, l, g, NULL),
               CULOSS_OK);
  cr_assert_eq(culoss_cross_entropy_vocab_parallel_finish(ctx, &o, &v1, n, 8, CULOSS_F32, x + 12, v,
                                                          CULOSS_I32, t32, rec, l, g + 12, NULL),
               CULOSS_OK);
  for (int i = 0; i < n; i++) {
    cr_assert(close_enough(l[i], ref_l[i], 1e-6, 1e-6), "loss[%d] %g vs %g", i, (double)l[i],
              (double)ref_l[i]);
    for (int j = 0; j < v; j++)
      cr_assert(close_enough(g[i * v + j], ref_g[i * v + j], 1e-7, 1e-5), "grad[%d][%d]", i, j);
  }
  /* n == 0 */
  for (int red = 1; red <= 2; red++) {
    float e = -9.0f;
    o.reduction = (culoss_reduction)red;
    culoss_vocab_parallel one = {0, 1, 0, v, NULL, NULL};
    cr_assert_eq(culoss_cross_entropy_vocab_parallel_stats(ctx, &o, &one, 0, v, CULOSS_F32, NULL, v,
                                                           CULOSS_I32, NULL, rec),
                 CULOSS_OK);
    cr_assert_eq(culoss_cross_entropy_vocab_parallel_finish(ctx, &o, &one, 0, v, CULOSS_F32, NULL,
                                                            v, CULOSS_I32, NULL, rec, &e, NULL,
                                                            NULL),
                 CULOSS_OK, "%s", culoss_last_error());
    if (red == CULOSS_REDUCTION_SUM)
      cr_assert_eq(e, 0.0f);
    else
      cr_assert(isnan(e), "MEAN of no rows: %g", (double)e);
  }
}
