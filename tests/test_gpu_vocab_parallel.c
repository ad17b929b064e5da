#define _POSIX_C_SOURCE 200809L /* pthread barriers */
/* test_gpu_vocab_parallel.c: vocabulary-parallel cross-entropy on the CUDA
   backend with simulated ranks on one device (1, 2, 3 and 8; uneven slices,
   one holding no target): every rank's loss bitwise the same, and loss and
   gradient slice against the CPU backend's unsharded culoss_cross_entropy
   on the same rounded logits, every option; the one-call form over an
   all-gather between threads (one context each, device-to-device copies on
   the rank's stream); a target no rank owns. Skips without a device. */
#include <criterion/criterion.h>
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "helpers.h"

#ifdef CULOSS_HAVE_CUDA
#include <cuda_runtime_api.h>
#endif

static culoss_context *gpu, *cpu;
static void gpu_setup(void) { gpu_open(&gpu, &cpu); }
static void gpu_teardown(void) { gpu_close(gpu, cpu); }
TestSuite(gpu_vp, .init = gpu_setup, .fini = gpu_teardown, .timeout = 900);

#define REC (CULOSS_VOCAB_PARALLEL_RECORD_BYTES / 4)
#define MAXR 8

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

static void run_case(int ranks, int64_t n, int64_t v, culoss_dtype dt, culoss_reduction red,
                     int variant, uint64_t seed) {
  const size_t es = dtype_bytes(dt);
  rng_t r = rng_seeded(seed);
  float *x = malloc((size_t)(n * v) * 4), *cw = malloc((size_t)v * 4);
  float *gl = malloc((size_t)n * 4);
  int64_t *t = malloc((size_t)n * 8), begin[MAXR], width[MAXR];
  for (int64_t i = 0; i < n * v; i++) x[i] = (float)(3.0 * rng_normal(&r));
  for (int64_t i = 0; i < n; i++) {
    t[i] = i % 5 == 2 ? -100 : rng_int(&r, 0, v - (ranks >= 3 ? 1 : 0));
    if (i % 4 == 1) x[i * v + (i * 7) % v] = -INFINITY;
    if (i % 6 == 3)
      for (int64_t j = 0; j < v; j++) x[i * v + j] += dt == CULOSS_F16 ? 300.0f : 1000.0f;
    gl[i] = (float)(0.5 + rng_uniform(&r));
  }
  for (int64_t j = 0; j < v; j++) cw[j] = (float)(0.25 + 2.0 * rng_uniform(&r));
  round_through(x, n * v, dt);
  unsigned char *xh = malloc((size_t)(n * v) * es), *ref_g = malloc((size_t)(n * v) * es);
  pack_dtype(xh, x, n * v, dt);
  culoss_cross_entropy_options o;
  culoss_cross_entropy_options_init(&o);
  o.reduction = red;
  if (variant & 1) o.label_smoothing = 0.1f;
  if (variant & 2) o.z_loss = 1e-3f, o.logit_softcap = 30.0f;
  const int weights = (variant & 4) != 0;
  const int64_t nl = red == CULOSS_REDUCTION_NONE ? n : 1;
  float *ref_l = malloc((size_t)nl * 4);
  culoss_cross_entropy_options oc = o;
  if (weights) oc.class_weight = cw;
  cr_assert_eq(culoss_cross_entropy(cpu, &oc, n, v, dt, xh, v, CULOSS_I64, t, ref_l, ref_g, gl),
               CULOSS_OK, "%s", culoss_last_error());
  slices(ranks, v, begin, width);
  const size_t recb = (size_t)(n + 1) * REC * 4;
  float *d_gath = dev_alloc((size_t)ranks * recb), *d_gl = dev_from(gl, (size_t)nl * 4);
  int64_t *d_t = dev_from(t, (size_t)n * 8);
  void *d_x[MAXR];
  float *d_cw[MAXR], *d_l[MAXR];
  dev_poison(d_gath, (size_t)ranks * recb);
  for (int q = 0; q < ranks; q++) {
    unsigned char *xs = malloc((size_t)(n * width[q]) * es);
    for (int64_t i = 0; i < n; i++)
      memcpy(xs + (size_t)(i * width[q]) * es, xh + (size_t)(i * v + begin[q]) * es,
             (size_t)width[q] * es);
    d_x[q] = dev_from(xs, (size_t)(n * width[q]) * es);
    d_cw[q] = dev_from(cw + begin[q], (size_t)width[q] * 4);
    d_l[q] = dev_alloc((size_t)nl * 4);
    dev_poison(d_l[q], (size_t)nl * 4);
    free(xs);
    culoss_vocab_parallel vp = {q, ranks, begin[q], v, NULL, NULL};
    culoss_cross_entropy_options oq = o;
    if (weights) oq.class_weight = d_cw[q];
    cr_assert_eq(culoss_cross_entropy_vocab_parallel_stats(gpu, &oq, &vp, n, width[q], dt, d_x[q],
                                                           width[q], CULOSS_I64, d_t,
                                                           (unsigned char *)d_gath + q * recb),
                 CULOSS_OK, "%s", culoss_last_error());
  }
  float *l0 = malloc((size_t)nl * 4), *lq = malloc((size_t)nl * 4);
  for (int q = 0; q < ranks; q++) {
    culoss_vocab_parallel vp = {q, ranks, begin[q], v, NULL, NULL};
    culoss_cross_entropy_options oq = o;
    if (weights) oq.class_weight = d_cw[q];
    /* the gradient in place over this rank's logits */
    cr_assert_eq(culoss_cross_entropy_vocab_parallel_finish(gpu, &oq, &vp, n, width[q], dt, d_x[q],
                                                            width[q], CULOSS_I64, d_t, d_gath,
                                                            d_l[q], d_x[q], d_gl),
                 CULOSS_OK, "%s", culoss_last_error());
  }
  cr_assert_eq(culoss_synchronize(gpu), CULOSS_OK, "%s", culoss_last_error());
  to_host(l0, d_l[0], (size_t)nl * 4);
  for (int q = 0; q < ranks; q++) {
    to_host(lq, d_l[q], (size_t)nl * 4);
    for (int64_t i = 0; i < nl; i++) {
      cr_assert(memcmp(&lq[i], &l0[i], 4) == 0, "rank %d loss[%lld] %.9g vs rank 0 %.9g", q,
                (long long)i, (double)lq[i], (double)l0[i]);
      cr_assert(close_enough(lq[i], ref_l[i], 2e-5, 2e-5),
                "%d ranks v%d red %d loss[%lld] %.9g vs %.9g", ranks, variant, (int)red,
                (long long)i, (double)lq[i], (double)ref_l[i]);
    }
    unsigned char *g = malloc((size_t)(n * width[q]) * es);
    float *a = malloc((size_t)width[q] * 4), *b = malloc((size_t)width[q] * 4);
    to_host(g, d_x[q], (size_t)(n * width[q]) * es);
    const double rt = dt == CULOSS_F32 ? 2e-4 : (dt == CULOSS_F16 ? 2.0 / 1024 : 2.0 / 128);
    for (int64_t i = 0; i < n; i++) {
      unpack_dtype(a, g + (size_t)(i * width[q]) * es, width[q], dt);
      unpack_dtype(b, ref_g + (size_t)(i * v + begin[q]) * es, width[q], dt);
      for (int64_t j = 0; j < width[q]; j++)
        cr_assert(close_enough(a[j], b[j], 1e-6, rt),
                  "%d ranks rank %d dt %d grad[%lld][%lld] %.9g vs %.9g", ranks, q, (int)dt,
                  (long long)i, (long long)(begin[q] + j), (double)a[j], (double)b[j]);
    }
    free(g), free(a), free(b);
    culoss_free(gpu, d_x[q]), culoss_free(gpu, d_cw[q]), culoss_free(gpu, d_l[q]);
  }
  culoss_free(gpu, d_gath), culoss_free(gpu, d_gl), culoss_free(gpu, d_t);
  free(x), free(cw), free(gl), free(t), free(xh), free(ref_g), free(ref_l), free(l0), free(lq);
}

Test(gpu_vp, matches_unsharded_on_1_2_3_8_ranks) {
  REQUIRE_GPU();
  static const int rank_counts[] = {1, 2, 3, 8};
  uint64_t seed = 10;
  for (int ri = 0; ri < 4; ri++)
    for (int variant = 0; variant < 8; variant++)
      run_case(rank_counts[ri], 23, 301, (culoss_dtype)(variant % 3),
               (culoss_reduction)((variant + ri) % 3), variant, seed++);
}

/* A slice layout with a gap (no rank owns some classes): NaN loss for the
   rows whose target lies in it, and the deferred error for the call (the
   other rows' losses miss the gap's classes: only the error says so). */
Test(gpu_vp, slices_that_leave_a_gap_are_a_deferred_error) {
  REQUIRE_GPU();
  enum { n = 6, v = 20 };
  float x[n * v], l[n];
  int64_t t[n] = {0, 5, 10, 19, 3, 15}; /* 10 lies in the gap [8, 12) */
  for (int i = 0; i < n * v; i++) x[i] = (float)(i % 7) * 0.25f;
  /* rank 0 holds [0, 8), rank 1 claims [12, 20) but both say v_total = 20 */
  float *d_x = dev_from(x, sizeof x), *d_l = dev_alloc(sizeof l);
  int64_t *d_t = dev_from(t, sizeof t);
  float *d_g = dev_alloc(2 * (n + 1) * REC * 4);
  culoss_vocab_parallel vp0 = {0, 2, 0, v, NULL, NULL}, vp1 = {1, 2, 12, v, NULL, NULL};
  culoss_cross_entropy_options o;
  culoss_cross_entropy_options_init(&o);
  o.reduction = CULOSS_REDUCTION_NONE;
  cr_assert_eq(culoss_cross_entropy_vocab_parallel_stats(gpu, &o, &vp0, n, 8, CULOSS_F32, d_x, v,
                                                         CULOSS_I64, d_t, d_g),
               CULOSS_OK);
  cr_assert_eq(culoss_cross_entropy_vocab_parallel_stats(gpu, &o, &vp1, n, 8, CULOSS_F32, d_x, v,
                                                         CULOSS_I64, d_t, d_g + (n + 1) * REC),
               CULOSS_OK);
  cr_assert_eq(culoss_cross_entropy_vocab_parallel_finish(gpu, &o, &vp0, n, 8, CULOSS_F32, d_x, v,
                                                          CULOSS_I64, d_t, d_g, d_l, NULL, NULL),
               CULOSS_OK);
  cr_assert_eq(culoss_synchronize(gpu), CULOSS_ERROR_INVALID_VALUE);
  cr_assert(strstr(culoss_last_error(), "v_total") != NULL, "%s", culoss_last_error());
  to_host(l, d_l, sizeof l);
  cr_assert(isnan(l[2]), "target 10 is owned by no rank: %g", (double)l[2]);
  cr_assert(!isnan(l[0]) && !isnan(l[1]), "rows whose targets rank 0 owns stay finite");
  culoss_free(gpu, d_x), culoss_free(gpu, d_l), culoss_free(gpu, d_t), culoss_free(gpu, d_g);
}

#ifdef CULOSS_HAVE_CUDA
/* The one-call form: three threads, a context each on its own stream, an
   all-gather of device buffers through a shared device buffer, ordered by
   stream synchronisation and a host barrier. */
typedef struct {
  pthread_barrier_t *bar;
  void *shared;
  int rank, ranks;
} gather_user;

static int dev_allgather(void *user, const void *send, void *recv, size_t bytes, void *stream) {
  gather_user *u = user;
  cudaStream_t s = (cudaStream_t)stream;
  if (cudaMemcpyAsync((char *)u->shared + (size_t)u->rank * bytes, send, bytes,
                      cudaMemcpyDeviceToDevice, s) != cudaSuccess ||
      cudaStreamSynchronize(s) != cudaSuccess)
    return 1;
  pthread_barrier_wait(u->bar);
  if (cudaMemcpyAsync(recv, u->shared, (size_t)u->ranks * bytes, cudaMemcpyDeviceToDevice, s) !=
          cudaSuccess ||
      cudaStreamSynchronize(s) != cudaSuccess)
    return 1;
  pthread_barrier_wait(u->bar);
  return 0;
}

typedef struct {
  gather_user user;
  int64_t begin, width, n, v;
  const float *x;
  const int64_t *t;
  float loss;
  float *grad; /* host, [n, width] */
  culoss_status st;
  char err[256];
} rank_job;

static void *rank_main(void *p) {
  rank_job *j = p;
  culoss_context *c = NULL;
  cudaStream_t s = NULL;
  culoss_vocab_parallel vp = {j->user.rank, j->user.ranks, j->begin, j->v, dev_allgather, &j->user};
  void *d_x = NULL, *d_t = NULL, *d_ws = NULL, *d_l = NULL;
  size_t wsb = 0;
  float *xs = malloc((size_t)(j->n * j->width) * 4);
  for (int64_t i = 0; i < j->n; i++)
    memcpy(xs + i * j->width, j->x + i * j->v + j->begin, (size_t)j->width * 4);
  culoss_cross_entropy_options o;
  culoss_cross_entropy_options_init(&o);
  o.label_smoothing = 0.2f;
#define STEP(e)                                                                                    \
  if (j->st == CULOSS_OK) j->st = (e)
  j->st = culoss_create(&c, CULOSS_BACKEND_CUDA, 0);
  STEP(cudaStreamCreate(&s) == cudaSuccess ? CULOSS_OK : CULOSS_ERROR_CUDA);
  STEP(culoss_set_stream(c, s));
  STEP(culoss_vocab_parallel_workspace_size(c, &vp, j->n, &wsb));
  STEP(culoss_malloc(c, &d_x, (size_t)(j->n * j->width) * 4));
  STEP(culoss_malloc(c, &d_t, (size_t)j->n * 8));
  STEP(culoss_malloc(c, &d_ws, wsb));
  STEP(culoss_malloc(c, &d_l, 4));
  STEP(culoss_upload(c, d_x, xs, (size_t)(j->n * j->width) * 4));
  STEP(culoss_upload(c, d_t, j->t, (size_t)j->n * 8));
  STEP(culoss_cross_entropy_vocab_parallel(c, &o, &vp, j->n, j->width, CULOSS_F32, d_x, j->width,
                                           CULOSS_I64, d_t, d_l, d_x, NULL, d_ws, wsb));
  STEP(culoss_synchronize(c));
  STEP(culoss_download(c, &j->loss, d_l, 4));
  STEP(culoss_download(c, j->grad, d_x, (size_t)(j->n * j->width) * 4));
#undef STEP
  if (j->st != CULOSS_OK) snprintf(j->err, sizeof j->err, "%s", culoss_last_error());
  culoss_free(c, d_x), culoss_free(c, d_t), culoss_free(c, d_ws), culoss_free(c, d_l);
  culoss_destroy(c);
  if (s) cudaStreamDestroy(s);
  free(xs);
  return NULL;
}

Test(gpu_vp, one_call_over_threads_and_streams) {
  REQUIRE_GPU();
  enum { n = 40, v = 100, ranks = 3 };
  rng_t r = rng_seeded(8);
  float x[n * v], ref_l, ref_g[n * v];
  int64_t t[n];
  for (int i = 0; i < n * v; i++) x[i] = (float)(2.0 * rng_normal(&r));
  for (int i = 0; i < n; i++) t[i] = i % 9 == 4 ? -100 : rng_int(&r, 0, v);
  culoss_cross_entropy_options o;
  culoss_cross_entropy_options_init(&o);
  o.label_smoothing = 0.2f;
  cr_assert_eq(
      culoss_cross_entropy(cpu, &o, n, v, CULOSS_F32, x, v, CULOSS_I64, t, &ref_l, ref_g, NULL),
      CULOSS_OK);
  pthread_barrier_t bar;
  pthread_barrier_init(&bar, NULL, ranks);
  void *shared = dev_alloc((size_t)ranks * (n + 1) * CULOSS_VOCAB_PARALLEL_RECORD_BYTES);
  static const int64_t begin[ranks] = {0, 57, 61}, width[ranks] = {57, 4, 39};
  rank_job jobs[ranks];
  pthread_t th[ranks];
  for (int q = 0; q < ranks; q++) {
    memset(&jobs[q], 0, sizeof jobs[q]);
    jobs[q].user = (gather_user){&bar, shared, q, ranks};
    jobs[q].begin = begin[q], jobs[q].width = width[q], jobs[q].n = n, jobs[q].v = v;
    jobs[q].x = x, jobs[q].t = t, jobs[q].grad = malloc((size_t)(n * width[q]) * 4);
    pthread_create(&th[q], NULL, rank_main, &jobs[q]);
  }
  for (int q = 0; q < ranks; q++) pthread_join(th[q], NULL);
  for (int q = 0; q < ranks; q++) {
    cr_assert_eq(jobs[q].st, CULOSS_OK, "rank %d: %s", q, jobs[q].err);
    cr_assert(memcmp(&jobs[q].loss, &jobs[0].loss, 4) == 0, "rank %d's loss", q);
    cr_assert(close_enough(jobs[q].loss, ref_l, 2e-5, 2e-5), "loss %g vs %g", (double)jobs[q].loss,
              (double)ref_l);
    for (int i = 0; i < n; i++)
      for (int64_t j = 0; j < width[q]; j++)
        cr_assert(
            close_enough(jobs[q].grad[i * width[q] + j], ref_g[i * v + begin[q] + j], 1e-7, 2e-4),
            "rank %d grad[%d][%lld]", q, i, (long long)(begin[q] + j));
    free(jobs[q].grad);
  }
  pthread_barrier_destroy(&bar);
  culoss_free(gpu, shared);
}
#endif

#ifdef CULOSS_HAVE_CUDA
/* ---- vocabulary-parallel linear + CE: ranks as threads, a stream each ---- */

enum { LN = 45, LD = 16, LV = 203 };

typedef struct {
  gather_user user;
  int64_t begin, width;
  culoss_dtype dt;
  const unsigned char *h, *w, *b; /* full, in dt */
  const int64_t *t;
  const float *gl; /* host upstream gradient [LN] (reduction none) or NULL */
  const float *cw; /* full class weights or NULL */
  culoss_cross_entropy_options o;
  float *gw, *gb;       /* host fp32 [LV * LD], [LV]: old values in, results out (own slice) */
  int accumulate, gw16; /* gw16: grad_weight / grad_bias in the input dtype */
  float loss[LN];
  float gh[LN * LD];
  float lse[LN], ent[LN];
  culoss_status st;
  char err[256];
} lrank_job;

static void *lrank_main(void *p) {
  lrank_job *j = p;
  culoss_context *c = NULL;
  cudaStream_t s = NULL;
  const size_t es = dtype_bytes(j->dt), nl = j->o.reduction == CULOSS_REDUCTION_NONE ? LN : 1;
  culoss_vocab_parallel vp = {j->user.rank, j->user.ranks, j->begin, LV, dev_allgather, &j->user};
  culoss_linear_ce_options lo;
  culoss_linear_ce_options_init(&lo);
  const culoss_dtype gdt = j->gw16 ? j->dt : CULOSS_F32;
  const size_t gs = dtype_bytes(gdt);
  lo.grad_weight_dtype = j->gw16 ? CULOSS_DTYPE_INPUT : CULOSS_F32;
  lo.accumulate = j->accumulate;
  void *d_lse = NULL, *d_ent = NULL;
  unsigned char gwp[LV * LD * 4], gbp[LV * 4];
  pack_dtype(gwp, j->gw + j->begin * LD, j->width * LD, gdt);
  pack_dtype(gbp, j->gb + j->begin, j->width, gdt);
  void *d_h = NULL, *d_w = NULL, *d_b = NULL, *d_t = NULL, *d_cw = NULL, *d_gh = NULL;
  void *d_gw = NULL, *d_gb = NULL, *d_ws = NULL, *d_l = NULL, *d_gl = NULL;
  size_t wsb = 0;
  unsigned char gh[LN * LD * 4];
#define STEP(e)                                                                                    \
  if (j->st == CULOSS_OK) j->st = (e)
  j->st = culoss_create(&c, CULOSS_BACKEND_CUDA, 0);
  STEP(cudaStreamCreate(&s) == cudaSuccess ? CULOSS_OK : CULOSS_ERROR_CUDA);
  STEP(culoss_set_stream(c, s));
  STEP(culoss_linear_cross_entropy_vocab_parallel_workspace_size(c, &lo, &vp, LN, LD, j->width,
                                                                 j->dt, &wsb));
  STEP(culoss_malloc(c, &d_h, (size_t)(LN * LD) * es));
  STEP(culoss_malloc(c, &d_w, (size_t)(j->width * LD) * es));
  STEP(culoss_malloc(c, &d_b, (size_t)j->width * es));
  STEP(culoss_malloc(c, &d_t, (size_t)LN * 8));
  STEP(culoss_malloc(c, &d_cw, (size_t)j->width * 4));
  STEP(culoss_malloc(c, &d_gh, (size_t)(LN * LD) * es));
  STEP(culoss_malloc(c, &d_gw, (size_t)(j->width * LD) * gs));
  STEP(culoss_malloc(c, &d_gb, (size_t)j->width * gs));
  STEP(culoss_malloc(c, &d_ws, wsb));
  STEP(culoss_malloc(c, &d_l, nl * 4));
  STEP(culoss_malloc(c, &d_gl, LN * 4));
  STEP(culoss_malloc(c, &d_lse, LN * 4));
  STEP(culoss_malloc(c, &d_ent, LN * 4));
  lo.lse = (float *)d_lse, lo.entropy = (float *)d_ent;
  if (j->gl) STEP(culoss_upload(c, d_gl, j->gl, LN * 4));
  STEP(culoss_upload(c, d_h, j->h, (size_t)(LN * LD) * es));
  STEP(culoss_upload(c, d_w, j->w + (size_t)(j->begin * LD) * es, (size_t)(j->width * LD) * es));
  STEP(culoss_upload(c, d_b, j->b + (size_t)j->begin * es, (size_t)j->width * es));
  STEP(culoss_upload(c, d_t, j->t, (size_t)LN * 8));
  if (j->cw) STEP(culoss_upload(c, d_cw, j->cw + j->begin, (size_t)j->width * 4));
  STEP(culoss_upload(c, d_gw, gwp, (size_t)(j->width * LD) * gs));
  STEP(culoss_upload(c, d_gb, gbp, (size_t)j->width * gs));
  culoss_cross_entropy_options o = j->o;
  o.class_weight = j->cw ? d_cw : NULL;
  STEP(culoss_linear_cross_entropy_vocab_parallel(c, &o, &lo, &vp, LN, LD, j->width, j->dt, d_h,
                                                  d_w, d_b, CULOSS_I64, d_t, d_l, d_gh, d_gw, d_gb,
                                                  j->gl ? d_gl : NULL, d_ws, wsb));
  STEP(culoss_synchronize(c));
  STEP(culoss_download(c, j->loss, d_l, nl * 4));
  STEP(culoss_download(c, j->lse, d_lse, LN * 4));
  STEP(culoss_download(c, j->ent, d_ent, LN * 4));
  STEP(culoss_download(c, gh, d_gh, (size_t)(LN * LD) * es));
  STEP(culoss_download(c, gwp, d_gw, (size_t)(j->width * LD) * gs));
  STEP(culoss_download(c, gbp, d_gb, (size_t)j->width * gs));
#undef STEP
  if (j->st != CULOSS_OK)
    snprintf(j->err, sizeof j->err, "%s", culoss_last_error());
  else {
    unpack_dtype(j->gh, gh, LN * LD, j->dt);
    unpack_dtype(j->gw + j->begin * LD, gwp, j->width * LD, gdt);
    unpack_dtype(j->gb + j->begin, gbp, j->width, gdt);
  }
  void *bufs[] = {d_h, d_w, d_b, d_t, d_cw, d_gh, d_gw, d_gb, d_ws, d_l, d_gl, d_lse, d_ent};
  for (int k = 0; k < 13; k++) culoss_free(c, bufs[k]);
  culoss_destroy(c);
  if (s) cudaStreamDestroy(s);
  return NULL;
}

static void linear_case(int ranks, culoss_dtype dt, int variant, int gw16, uint64_t seed) {
  rng_t r = rng_seeded(seed);
  float h[LN * LD], w[LV * LD], b[LV], cw[LV], gw[LV * LD], gb[LV], old_w[LV * LD], old_b[LV];
  int64_t t[LN], begin[MAXR], width[MAXR];
  for (int i = 0; i < LN * LD; i++) h[i] = (float)rng_normal(&r);
  for (int i = 0; i < LV * LD; i++) w[i] = (float)(0.5 * rng_normal(&r));
  for (int j = 0; j < LV; j++)
    b[j] = (float)(0.3 * rng_normal(&r)), cw[j] = (float)(0.5 + rng_uniform(&r));
  for (int i = 0; i < LN; i++) t[i] = i % 6 == 1 ? -100 : rng_int(&r, 0, LV - 1);
  round_through(h, LN * LD, dt), round_through(w, LV * LD, dt), round_through(b, LV, dt);
  unsigned char hh[LN * LD * 4], wh[LV * LD * 4], bh[LV * 4];
  pack_dtype(hh, h, LN * LD, dt), pack_dtype(wh, w, LV * LD, dt), pack_dtype(bh, b, LV, dt);
  culoss_cross_entropy_options o;
  culoss_cross_entropy_options_init(&o);
  o.reduction = (culoss_reduction)(variant % 3);
  if (variant & 1) o.label_smoothing = 0.1f;
  if (variant & 2) o.z_loss = 1e-3f, o.logit_softcap = 5.0f;
  const int accumulate = variant >= 3, weights = variant % 2 == 0;
  float glv[LN]; /* an upstream gradient for reduction none */
  for (int i = 0; i < LN; i++) glv[i] = (float)(0.5 + rng_uniform(&r));
  const float *gl = o.reduction == CULOSS_REDUCTION_NONE ? glv : NULL;
  if (weights) o.class_weight = cw;
  float ref_l[LN], ref_gh[LN * LD], ref_gw[LV * LD], ref_gb[LV], ref_lse[LN], ref_ent[LN];
  culoss_linear_ce_options rlo;
  culoss_linear_ce_options_init(&rlo);
  rlo.lse = ref_lse, rlo.entropy = ref_ent;
  cr_assert_eq(culoss_linear_cross_entropy_ex(cpu, &o, &rlo, LN, LD, LV, CULOSS_F32, h, w, b,
                                              CULOSS_I64, t, ref_l, ref_gh, ref_gw, ref_gb, gl,
                                              NULL, 0),
               CULOSS_OK, "%s", culoss_last_error());
  const culoss_dtype gdt = gw16 ? dt : CULOSS_F32;
  for (int i = 0; i < LV * LD; i++) old_w[i] = accumulate ? (float)(0.01 * rng_normal(&r)) : 0;
  for (int j = 0; j < LV; j++) old_b[j] = accumulate ? (float)(0.01 * rng_normal(&r)) : 0;
  round_through(old_w, LV * LD, gdt), round_through(old_b, LV, gdt);
  memcpy(gw, old_w, sizeof gw), memcpy(gb, old_b, sizeof gb);
  slices(ranks, LV, begin, width);
  pthread_barrier_t bar;
  pthread_barrier_init(&bar, NULL, (unsigned)ranks);
  void *shared = dev_alloc((size_t)ranks * (LN + 1) * CULOSS_VOCAB_PARALLEL_RECORD_BYTES);
  static lrank_job jobs[MAXR];
  pthread_t th[MAXR];
  for (int q = 0; q < ranks; q++) {
    memset(&jobs[q], 0, sizeof jobs[q]);
    jobs[q].user = (gather_user){&bar, shared, q, ranks};
    jobs[q].begin = begin[q], jobs[q].width = width[q], jobs[q].dt = dt;
    jobs[q].h = hh, jobs[q].w = wh, jobs[q].b = bh, jobs[q].t = t, jobs[q].gl = gl;
    jobs[q].cw = weights ? cw : NULL, jobs[q].o = o, jobs[q].gw = gw, jobs[q].gb = gb;
    jobs[q].accumulate = accumulate, jobs[q].gw16 = gw16;
    pthread_create(&th[q], NULL, lrank_main, &jobs[q]);
  }
  for (int q = 0; q < ranks; q++) pthread_join(th[q], NULL);
  pthread_barrier_destroy(&bar);
  culoss_free(gpu, shared);
  const double tol = dt == CULOSS_F32 ? 1e-4 : 2e-2; /* 16-bit: logits rounded to the dtype */
  const int64_t nl = o.reduction == CULOSS_REDUCTION_NONE ? LN : 1;
  float gh_sum[LN * LD] = {0};
  for (int q = 0; q < ranks; q++) {
    cr_assert_eq(jobs[q].st, CULOSS_OK, "rank %d: %s", q, jobs[q].err);
    for (int64_t i = 0; i < nl; i++) {
      cr_assert(memcmp(&jobs[q].loss[i], &jobs[0].loss[i], 4) == 0, "rank %d loss[%lld]", q,
                (long long)i);
      cr_assert(close_enough(jobs[q].loss[i], ref_l[i], tol, tol),
                "%d ranks v%d loss[%lld] %.9g vs %.9g", ranks, variant, (long long)i,
                (double)jobs[q].loss[i], (double)ref_l[i]);
    }
    for (int i = 0; i < LN * LD; i++) gh_sum[i] += jobs[q].gh[i];
    for (int i = 0; i < LN; i++) {
      cr_assert(close_enough(jobs[q].lse[i], ref_lse[i], tol, tol), "rank %d lse[%d] %g vs %g", q,
                i, (double)jobs[q].lse[i], (double)ref_lse[i]);
      cr_assert(close_enough(jobs[q].ent[i], ref_ent[i], 2 * tol, 2 * tol),
                "rank %d entropy[%d] %g vs %g", q, i, (double)jobs[q].ent[i], (double)ref_ent[i]);
      cr_assert(memcmp(&jobs[q].lse[i], &jobs[0].lse[i], 4) == 0, "rank %d's lse differs", q);
    }
  }
  double num = 0, den = 0; /* relative norms: GEMMs sum in another order */
  for (int i = 0; i < LV * LD; i++) {
    const double e = (double)gw[i] - old_w[i] - ref_gw[i];
    num += e * e, den += (double)ref_gw[i] * ref_gw[i];
  }
  cr_assert(sqrt(num / den) <= tol, "%d ranks v%d grad_weight: %.3g", ranks, variant,
            sqrt(num / den));
  num = den = 0;
  for (int j = 0; j < LV; j++) {
    const double e = (double)gb[j] - old_b[j] - ref_gb[j];
    num += e * e, den += (double)ref_gb[j] * ref_gb[j];
  }
  cr_assert(sqrt(num / den) <= tol, "%d ranks v%d grad_bias: %.3g", ranks, variant,
            sqrt(num / den));
  num = den = 0;
  for (int i = 0; i < LN * LD; i++) {
    const double e = (double)gh_sum[i] - ref_gh[i];
    num += e * e, den += (double)ref_gh[i] * ref_gh[i];
  }
  cr_assert(sqrt(num / den) <= tol, "%d ranks v%d grad_hidden (all-reduced): %.3g", ranks, variant,
            sqrt(num / den));
}

Test(gpu_vp, linear_over_threads_1_3_8_ranks) {
  REQUIRE_GPU();
  static const int rank_counts[] = {1, 3, 8};
  uint64_t seed = 700;
  for (int ri = 0; ri < 3; ri++)
    for (int variant = 0; variant < 6; variant++)
      linear_case(rank_counts[ri], (culoss_dtype)(variant % 3), variant, 0, seed++);
  for (int dt = 1; dt <= 2; dt++) /* a 16-bit grad_weight and grad_bias: pass B */
    for (int variant = 1; variant < 6; variant += 3)
      linear_case(3, (culoss_dtype)dt, variant, 1, seed++);
}

/* Small logits blocks: pass 2 recomputes each block's logits. */
Test(gpu_vp, linear_many_blocks) {
  REQUIRE_GPU();
  setenv("CULOSS_LINEAR_CE_BLOCK_BYTES", "2048", 1); /* the rank contexts read it at create */
  uint64_t seed = 800;
  for (int variant = 0; variant < 6; variant++)
    linear_case(3, (culoss_dtype)(variant % 3), variant, variant % 3 != 0 && variant >= 3, seed++);
  unsetenv("CULOSS_LINEAR_CE_BLOCK_BYTES");
}
#endif

#ifdef CULOSS_HAVE_CUDA
/* A one-rank all-gather that is one stream-ordered device copy: as
   capturable as ncclAllGather. */
static int copy_allgather(void *user, const void *send, void *recv, size_t bytes, void *stream) {
  (void)user;
  return cudaMemcpyAsync(recv, send, bytes, cudaMemcpyDeviceToDevice, (cudaStream_t)stream) ==
                 cudaSuccess
             ? 0
             : 1;
}

/* Both one-call forms recorded in a CUDA graph (the collective included)
   and replayed on new logits: each replay equals an eager call on them. */
Test(gpu_vp, one_call_forms_are_capture_safe) {
  REQUIRE_GPU();
  enum { n = 33, v = 150, d = 8 };
  cudaStream_t s;
  cr_assert_eq(cudaStreamCreate(&s), cudaSuccess);
  cr_assert_eq(culoss_set_stream(gpu, s), CULOSS_OK);
  culoss_vocab_parallel vp = {0, 1, 0, v, copy_allgather, NULL};
  culoss_linear_ce_options lo;
  culoss_linear_ce_options_init(&lo);
  lo.grad_weight_dtype = CULOSS_F32;
  culoss_cross_entropy_options o;
  culoss_cross_entropy_options_init(&o);
  o.label_smoothing = 0.1f;
  rng_t r = rng_seeded(5);
  float x[n * v], h[n * d], w[v * d];
  int64_t t[n];
  for (int i = 0; i < n; i++) t[i] = i % 5 == 0 ? -100 : rng_int(&r, 0, v);
  for (int i = 0; i < n * d; i++) h[i] = (float)rng_normal(&r);
  for (int i = 0; i < v * d; i++) w[i] = (float)(0.5 * rng_normal(&r));
  size_t ws1, ws2;
  cr_assert_eq(culoss_vocab_parallel_workspace_size(gpu, &vp, n, &ws1), CULOSS_OK);
  cr_assert_eq(culoss_linear_cross_entropy_vocab_parallel_workspace_size(gpu, &lo, &vp, n, d, v,
                                                                         CULOSS_F32, &ws2),
               CULOSS_OK);
  float *d_x = dev_alloc(sizeof x), *d_g = dev_alloc(sizeof x), *d_l = dev_alloc(2 * 4);
  float *d_h = dev_from(h, sizeof h), *d_w = dev_from(w, sizeof w), *d_gw = dev_alloc(sizeof w);
  int64_t *d_t = dev_from(t, sizeof t);
  void *d_ws1 = dev_alloc(ws1), *d_ws2 = dev_alloc(ws2);
#define CALLS()                                                                                    \
  (culoss_cross_entropy_vocab_parallel(gpu, &o, &vp, n, v, CULOSS_F32, d_x, v, CULOSS_I64, d_t,    \
                                       d_l, d_g, NULL, d_ws1, ws1) == CULOSS_OK &&                 \
   culoss_linear_cross_entropy_vocab_parallel(gpu, &o, &lo, &vp, n, d, v, CULOSS_F32, d_h, d_w,    \
                                              NULL, CULOSS_I64, d_t, d_l + 1, NULL, d_gw, NULL,    \
                                              NULL, d_ws2, ws2) == CULOSS_OK)
  for (int i = 0; i < n * v; i++) x[i] = (float)rng_normal(&r);
  cr_assert_eq(culoss_upload(gpu, d_x, x, sizeof x), CULOSS_OK);
  cr_assert(CALLS(), "%s", culoss_last_error()); /* eager, outside capture, first */
  cudaGraph_t graph;
  cudaGraphExec_t exec;
  cr_assert_eq(cudaStreamBeginCapture(s, cudaStreamCaptureModeGlobal), cudaSuccess);
  const int ok = CALLS();
  const cudaError_t end = cudaStreamEndCapture(s, &graph);
  cr_assert(ok, "a call failed under capture: %s", culoss_last_error());
  cr_assert_eq(end, cudaSuccess, "capture broken: %s", cudaGetErrorString(end));
  cr_assert_eq(cudaGraphInstantiate(&exec, graph, 0), cudaSuccess);
  for (int rep = 0; rep < 2; rep++) {
    float le[2], lg[2], ge[n * v], gg[n * v];
    for (int i = 0; i < n * v; i++) x[i] = (float)(2.0 * rng_normal(&r));
    cr_assert_eq(culoss_upload(gpu, d_x, x, sizeof x), CULOSS_OK);
    cr_assert(CALLS(), "%s", culoss_last_error());
    cr_assert_eq(culoss_synchronize(gpu), CULOSS_OK, "%s", culoss_last_error());
    to_host(le, d_l, sizeof le), to_host(ge, d_g, sizeof ge);
    dev_poison(d_l, sizeof le), dev_poison(d_g, sizeof ge);
    cr_assert_eq(cudaGraphLaunch(exec, s), cudaSuccess);
    cr_assert_eq(culoss_synchronize(gpu), CULOSS_OK, "%s", culoss_last_error());
    to_host(lg, d_l, sizeof lg), to_host(gg, d_g, sizeof gg);
    cr_assert(memcmp(le, lg, sizeof le) == 0, "replay %d: losses %g %g vs eager %g %g", rep,
              (double)lg[0], (double)lg[1], (double)le[0], (double)le[1]);
    cr_assert(memcmp(ge, gg, sizeof ge) == 0, "replay %d: the gradient differs", rep);
  }
#undef CALLS
  cudaGraphExecDestroy(exec);
  cudaGraphDestroy(graph);
  cr_assert_eq(culoss_set_stream(gpu, NULL), CULOSS_OK);
  cudaStreamDestroy(s);
  culoss_free(gpu, d_x), culoss_free(gpu, d_g), culoss_free(gpu, d_l), culoss_free(gpu, d_h);
  culoss_free(gpu, d_w), culoss_free(gpu, d_gw), culoss_free(gpu, d_t), culoss_free(gpu, d_ws1);
  culoss_free(gpu, d_ws2);
}
#endif

/* int32 targets on two ranks sharing one row-strided buffer, against the
   CPU backend's unsharded call; n == 0 (MEAN: NaN, SUM: 0). */
Test(gpu_vp, int32_targets_strided_slices_and_empty_batches) {
  REQUIRE_GPU();
  enum { n = 9, v = 20 };
  rng_t r = rng_seeded(32);
  float x[n * v], ref_l[n], l[n], ref_g[n * v], g[n * v];
  int32_t t32[n];
  for (int i = 0; i < n * v; i++) x[i] = (float)rng_normal(&r);
  for (int i = 0; i < n; i++) t32[i] = i == 4 ? -100 : (int32_t)rng_int(&r, 0, v);
  culoss_cross_entropy_options o;
  culoss_cross_entropy_options_init(&o);
  o.reduction = CULOSS_REDUCTION_NONE;
  o.label_smoothing = 0.25f;
  cr_assert_eq(
      culoss_cross_entropy(cpu, &o, n, v, CULOSS_F32, x, v, CULOSS_I32, t32, ref_l, ref_g, NULL),
      CULOSS_OK);
  float *d_x = dev_from(x, sizeof x), *d_l = dev_alloc(sizeof l);
  float *d_rec = dev_alloc(2 * (n + 1) * REC * 4);
  int32_t *d_t = dev_from(t32, sizeof t32);
  culoss_vocab_parallel v0 = {0, 2, 0, v, NULL, NULL}, v1 = {1, 2, 12, v, NULL, NULL};
  cr_assert_eq(culoss_cross_entropy_vocab_parallel_stats(gpu, &o, &v0, n, 12, CULOSS_F32, d_x, v,
                                                         CULOSS_I32, d_t, d_rec),
               CULOSS_OK);
  cr_assert_eq(culoss_cross_entropy_vocab_parallel_stats(gpu, &o, &v1, n, 8, CULOSS_F32, d_x + 12,
                                                         v, CULOSS_I32, d_t, d_rec + (n + 1) * REC),
               CULOSS_OK);
  cr_assert_eq(culoss_cross_entropy_vocab_parallel_finish(gpu, &o, &v0, n, 12, CULOSS_F32, d_x, v,
                                                          CULOSS_I32, d_t, d_rec, d_l, d_x, NULL),
               CULOSS_OK);
  cr_assert_eq(culoss_cross_entropy_vocab_parallel_finish(gpu, &o, &v1, n, 8, CULOSS_F32, d_x + 12,
                                                          v, CULOSS_I32, d_t, d_rec, d_l, d_x + 12,
                                                          NULL),
               CULOSS_OK);
  cr_assert_eq(culoss_synchronize(gpu), CULOSS_OK, "%s", culoss_last_error());
  to_host(l, d_l, sizeof l), to_host(g, d_x, sizeof g);
  for (int i = 0; i < n; i++) {
    cr_assert(close_enough(l[i], ref_l[i], 2e-5, 2e-5), "loss[%d] %g vs %g", i, (double)l[i],
              (double)ref_l[i]);
    for (int j = 0; j < v; j++)
      cr_assert(close_enough(g[i * v + j], ref_g[i * v + j], 1e-6, 2e-4), "grad[%d][%d]", i, j);
  }
  for (int red = 1; red <= 2; red++) {
    float e = -9.0f;
    o.reduction = (culoss_reduction)red;
    culoss_vocab_parallel one = {0, 1, 0, v, NULL, NULL};
    dev_poison(d_l, 4);
    cr_assert_eq(culoss_cross_entropy_vocab_parallel_stats(gpu, &o, &one, 0, v, CULOSS_F32, NULL, v,
                                                           CULOSS_I32, NULL, d_rec),
                 CULOSS_OK);
    cr_assert_eq(culoss_cross_entropy_vocab_parallel_finish(gpu, &o, &one, 0, v, CULOSS_F32, NULL,
                                                            v, CULOSS_I32, NULL, d_rec, d_l, NULL,
                                                            NULL),
                 CULOSS_OK, "%s", culoss_last_error());
    cr_assert_eq(culoss_synchronize(gpu), CULOSS_OK, "%s", culoss_last_error());
    to_host(&e, d_l, 4);
    if (red == CULOSS_REDUCTION_SUM)
      cr_assert_eq(e, 0.0f);
    else
      cr_assert(isnan(e), "MEAN of no rows: %g", (double)e);
  }
  culoss_free(gpu, d_x), culoss_free(gpu, d_l), culoss_free(gpu, d_rec), culoss_free(gpu, d_t);
}
