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
}
