/* test_gpu_graph.c: every loss call is capture-safe and deterministic across
   paths. Each family runs once on a non-default stream, then the same calls
   are captured into a CUDA graph (cudaStreamCaptureModeGlobal: any
   allocation, synchronisation or host copy inside would fail the capture)
   and replayed twice; the results must be bitwise identical to the direct
   run. Skips visibly without a GPU. */
#include <criterion/criterion.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "helpers.h"

#ifdef CULOSS_HAVE_CUDA
#include <cuda_runtime_api.h>
#endif

static culoss_context *gpu, *cpu;
static void gpu_setup(void) { gpu_open(&gpu, &cpu); }
static void gpu_teardown(void) { gpu_close(gpu, cpu); }
TestSuite(gpu_graph, .init = gpu_setup, .fini = gpu_teardown, .timeout = 300);

#ifdef CULOSS_HAVE_CUDA
enum { N = 300, C = 5000, M = N * C };

enum { SLICES = 24, LOSSES = 18 };

typedef struct {
  void *x, *y, *g, *t, *w, *ws;
  float *loss;
  size_t ws_bytes;
  void *t2, *ws2; /* multi-label margin's [N, C] targets; InfoNCE's workspace */
  float *temp;    /* InfoNCE's temperature */
  size_t ws2_bytes;
  void *ws3; /* linear distillation's workspace */
  size_t ws3_bytes;
} bufs_t;

/* All families, once each, on the context's stream; losses into b->loss
   (one float per call), gradients into consecutive slices of b->g. */
static culoss_status all_losses(const bufs_t *b) {
  culoss_status st = CULOSS_OK;
  culoss_cross_entropy_options ce;
  culoss_cross_entropy_options_init(&ce);
  ce.label_smoothing = 0.1f, ce.z_loss = 1e-4f, ce.class_weight = b->w;
  char *g = b->g;
  const size_t gs = (size_t)M * 2;
#define RUN(call)                                                                                  \
  if (st == CULOSS_OK) st = (call)
  RUN(culoss_cross_entropy(gpu, &ce, N, C, CULOSS_BF16, b->x, C, CULOSS_I64, b->t, b->loss + 0,
                           g + 0 * gs, NULL));
  RUN(culoss_cross_entropy_soft(gpu, &ce, N, C, CULOSS_BF16, b->x, C, b->y, b->loss + 1, g + 1 * gs,
                                NULL));
  RUN(culoss_nll(gpu, NULL, N, C, CULOSS_BF16, b->x, C, CULOSS_I64, b->t, b->loss + 2, g + 2 * gs,
                 NULL));
  culoss_bce_options bo;
  culoss_bce_options_init(&bo);
  RUN(culoss_bce_with_logits(gpu, &bo, N, C, CULOSS_BF16, b->x, b->y, b->loss + 3, g + 3 * gs,
                             NULL));
  culoss_regression_options ro;
  culoss_regression_options_init(&ro);
  RUN(culoss_huber(gpu, &ro, M, CULOSS_BF16, b->x, b->y, b->loss + 4, g + 4 * gs, NULL));
  culoss_kl_div_options ko;
  culoss_kl_div_options_init(&ko);
  ko.reduction = CULOSS_REDUCTION_BATCHMEAN;
  RUN(culoss_kl_div(gpu, &ko, N, C, CULOSS_BF16, b->x, b->y, b->loss + 5, g + 5 * gs, NULL));
  RUN(culoss_multi_margin(gpu, NULL, N, C, CULOSS_BF16, b->x, C, CULOSS_I64, b->t, b->loss + 6,
                          g + 6 * gs, NULL));
  /* linear CE: hidden = the first N x 64 of x, weight = the first C x 64 of y */
  RUN(culoss_linear_cross_entropy(
      gpu, NULL, N, 64, C, CULOSS_BF16, b->x, b->y, NULL, CULOSS_I64, b->t, b->loss + 7, g + 7 * gs,
      (char *)g + 7 * gs + (size_t)N * 64 * 2, NULL, NULL, b->ws, b->ws_bytes));
  /* issue 20's losses (x, y in the roles of their inputs; the class weights
     as the cosine targets: not +-1, so loss 0 and zero gradients, still
     every kernel) */
  RUN(culoss_margin_ranking(gpu, NULL, M, CULOSS_BF16, b->x, b->y, b->x, b->loss + 8, g + 8 * gs,
                            g + 9 * gs, NULL));
  RUN(culoss_gaussian_nll(gpu, NULL, M, CULOSS_BF16, b->x, b->x, b->y, b->loss + 9, g + 10 * gs,
                          g + 11 * gs, NULL));
  RUN(culoss_cosine_embedding(gpu, NULL, N, C, CULOSS_BF16, b->x, b->y, C, (const float *)b->w,
                              b->loss + 10, g + 12 * gs, g + 13 * gs, NULL));
  culoss_triplet_margin_options tm;
  culoss_triplet_margin_options_init(&tm);
  tm.swap = 1;
  RUN(culoss_triplet_margin(gpu, &tm, N, C, CULOSS_BF16, b->x, b->y, b->g, C, b->loss + 11,
                            g + 14 * gs, g + 15 * gs, g + 16 * gs, NULL)); /* negative: slice 0 */
  RUN(culoss_multilabel_soft_margin(gpu, NULL, N, C, CULOSS_BF16, b->x, b->y, C, b->loss + 12,
                                    g + 17 * gs, NULL));
  RUN(culoss_multilabel_margin(gpu, NULL, N, C, CULOSS_BF16, b->x, C, CULOSS_I64, b->t2,
                               b->loss + 13, g + 18 * gs, NULL));
  culoss_info_nce_options no;
  culoss_info_nce_options_init(&no);
  no.symmetric = 1, no.temperature = b->temp, no.grad_temperature = b->loss + 15;
  RUN(culoss_info_nce(gpu, &no, N, 64, CULOSS_BF16, b->x, b->y, b->loss + 14, g + 19 * gs,
                      g + 19 * gs + (size_t)N * 64 * 2, NULL, b->ws2, b->ws2_bytes));
  /* issue 21's: distillation with labels and the hard term (student x,
     teacher y), and its linear form (student x / y, teacher y / x) */
  culoss_distill_options dopt;
  culoss_distill_options_init(&dopt);
  dopt.beta = 0.25f, dopt.temperature = 2.0f, dopt.weight_hard = 0.5f;
  RUN(culoss_distill(gpu, &dopt, N, C, CULOSS_BF16, b->x, C, b->y, C, CULOSS_I64, b->t,
                     b->loss + 16, g + 20 * gs, NULL));
  RUN(culoss_linear_distill(gpu, &dopt, NULL, N, 64, 64, C, CULOSS_BF16, b->x, b->y, NULL, b->y,
                            b->x, NULL, CULOSS_I64, b->t, b->loss + 17, g + 21 * gs,
                            (char *)g + 21 * gs + (size_t)N * 64 * 2, NULL, NULL, b->ws3,
                            b->ws3_bytes));
#undef RUN
  return st;
}
#endif

Test(gpu_graph, every_loss_is_capture_safe_and_bitwise_stable) {
  REQUIRE_GPU();
#ifdef CULOSS_HAVE_CUDA
  rng_t r = rng_seeded(5);
  float *xf = malloc((size_t)M * 4), *yf = malloc((size_t)M * 4), w[C];
  uint16_t *xb = malloc((size_t)M * 2), *yb = malloc((size_t)M * 2);
  int64_t t[N];
  for (int i = 0; i < N; i++) t[i] = rng_int(&r, 0, C);
  fill_logits(&r, xf, N, C, C, 2.0, 1, t);
  fill_probs(&r, yf, N, C, C);
  for (int j = 0; j < C; j++) w[j] = (float)(0.5 + rng_uniform(&r));
  pack_dtype(xb, xf, M, CULOSS_BF16), pack_dtype(yb, yf, M, CULOSS_BF16);
  bufs_t b;
  b.x = dev_from(xb, (size_t)M * 2), b.y = dev_from(yb, (size_t)M * 2);
  b.t = dev_from(t, sizeof t), b.w = dev_from(w, sizeof w);
  b.g = dev_alloc((size_t)M * 2 * SLICES);
  b.loss = dev_alloc(LOSSES * sizeof(float));
  cr_assert_eq(culoss_linear_cross_entropy_workspace_size(gpu, N, 64, C, CULOSS_BF16, &b.ws_bytes),
               CULOSS_OK);
  b.ws = dev_alloc(b.ws_bytes);
  int64_t *t2 = malloc((size_t)M * 8); /* lists of 0..3 classes, then -1 */
  for (int64_t e = 0; e < M; e++) t2[e] = e % C < (e / C) % 4 ? (e * 7919) % C : -1;
  b.t2 = dev_from(t2, (size_t)M * 8);
  free(t2);
  const float temp = 0.25f;
  b.temp = dev_from(&temp, 4);
  culoss_info_nce_options no;
  culoss_info_nce_options_init(&no);
  no.symmetric = 1;
  cr_assert_eq(culoss_info_nce_workspace_size(gpu, &no, N, 64, CULOSS_BF16, &b.ws2_bytes),
               CULOSS_OK);
  b.ws2 = dev_alloc(b.ws2_bytes);
  cr_assert_eq(
      culoss_linear_distill_workspace_size(gpu, NULL, N, 64, 64, C, CULOSS_BF16, &b.ws3_bytes),
      CULOSS_OK);
  b.ws3 = dev_alloc(b.ws3_bytes);
  cudaStream_t s;
  cr_assert_eq(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), cudaSuccess);
  cr_assert_eq(culoss_set_stream(gpu, s), CULOSS_OK);
  /* direct run; every run starts from the same poison, so the bytes no call
     writes (the tail of the linear CE slice) compare equal too */
  dev_poison(b.g, (size_t)M * 2 * SLICES);
  dev_poison(b.loss, LOSSES * sizeof(float));
  cr_assert_eq(all_losses(&b), CULOSS_OK, "%s", culoss_last_error());
  cr_assert_eq(culoss_synchronize(gpu), CULOSS_OK, "%s", culoss_last_error());
  float l0[LOSSES];
  uint16_t *g0 = malloc((size_t)M * 2 * SLICES), *g1 = malloc((size_t)M * 2 * SLICES);
  to_host(l0, b.loss, sizeof l0);
  to_host(g0, b.g, (size_t)M * 2 * SLICES);
  for (int k = 0; k < LOSSES; k++) cr_assert(!is_poison_f32(l0[k]), "loss %d not written", k);
  /* captured and replayed */
  cudaGraph_t graph;
  cudaGraphExec_t exec;
  cr_assert_eq(cudaStreamBeginCapture(s, cudaStreamCaptureModeGlobal), cudaSuccess);
  const culoss_status cap = all_losses(&b);
  const cudaError_t end = cudaStreamEndCapture(s, &graph);
  cr_assert_eq(cap, CULOSS_OK, "a loss call failed under capture: %s", culoss_last_error());
  cr_assert_eq(end, cudaSuccess, "capture broken: %s", cudaGetErrorString(end));
  cr_assert_eq(cudaGraphInstantiate(&exec, graph, 0), cudaSuccess);
  for (int rep = 0; rep < 2; rep++) {
    dev_poison(b.g, (size_t)M * 2 * SLICES);
    dev_poison(b.loss, LOSSES * sizeof(float));
    cr_assert_eq(cudaGraphLaunch(exec, s), cudaSuccess);
    cr_assert_eq(culoss_synchronize(gpu), CULOSS_OK, "%s", culoss_last_error());
    float l1[LOSSES];
    to_host(l1, b.loss, sizeof l1);
    to_host(g1, b.g, (size_t)M * 2 * SLICES);
    for (int k = 0; k < LOSSES; k++)
      cr_assert(memcmp(&l0[k], &l1[k], 4) == 0, "replay %d: loss %d differs (%g vs %g)", rep, k,
                (double)l0[k], (double)l1[k]);
    size_t diff = 0;
    while (diff < (size_t)M * SLICES && g0[diff] == g1[diff]) diff++;
    cr_assert(diff == (size_t)M * SLICES,
              "replay %d: gradient %zu differs at element %zu (%#x vs %#x)", rep, diff / M,
              diff % M, g0[diff], g1[diff]);
  }
  cudaGraphExecDestroy(exec);
  cudaGraphDestroy(graph);
  cr_assert_eq(culoss_set_stream(gpu, NULL), CULOSS_OK);
  cudaStreamDestroy(s);
  culoss_free(gpu, b.x), culoss_free(gpu, b.y), culoss_free(gpu, b.t), culoss_free(gpu, b.w);
  culoss_free(gpu, b.g), culoss_free(gpu, b.loss), culoss_free(gpu, b.ws);
  culoss_free(gpu, b.t2), culoss_free(gpu, b.ws2), culoss_free(gpu, b.temp);
  culoss_free(gpu, b.ws3);
  free(xf), free(yf), free(xb), free(yb), free(g0), free(g1);
#else
  cr_skip_test("skipped: no CUDA device (a CPU-only build)");
#endif
}

#ifdef CULOSS_HAVE_CUDA
enum { GN = 64, GC = 300, GD = 32 };

/* The captured calls of the replay test: cross-entropy (MEAN over
   *normalizer, upstream gradient from device memory), soft cross-entropy
   (SUM), an elementwise loss and linear + CE (MEAN over *normalizer), all
   reading the device pointers the header promises are capture-safe. */
static culoss_status replay_calls(culoss_context *c, void *x, void *y, void *t, float *norm,
                                  float *gl, float *loss, void *g, void *h, void *w, void *gh,
                                  void *gw, void *ws, size_t ws_bytes) {
  culoss_status st;
  culoss_cross_entropy_options o;
  culoss_cross_entropy_options_init(&o);
  o.normalizer = norm;
  o.label_smoothing = 0.125f;
  st = culoss_cross_entropy(c, &o, GN, GC, CULOSS_F32, x, GC, CULOSS_I64, t, loss + 0, g, gl);
  if (st != CULOSS_OK) return st;
  culoss_cross_entropy_options os;
  culoss_cross_entropy_options_init(&os);
  os.reduction = CULOSS_REDUCTION_SUM;
  st = culoss_cross_entropy_soft(c, &os, GN, GC, CULOSS_F32, x, GC, y, loss + 1,
                                 (float *)g + GN * GC, gl);
  if (st != CULOSS_OK) return st;
  culoss_regression_options ro;
  culoss_regression_options_init(&ro);
  st = culoss_mse(c, &ro, GN * GC, CULOSS_F32, x, y, loss + 2, (float *)g + 2 * GN * GC, gl);
  if (st != CULOSS_OK) return st;
  return culoss_linear_cross_entropy(c, &o, GN, GD, GC, CULOSS_F32, h, w, NULL, CULOSS_I64, t,
                                     loss + 3, gh, gw, NULL, gl, ws, ws_bytes);
}
#endif

/* Issue 19: a graph is only useful if each replay reads the buffers' current
   contents. Between replays the logits, targets, upstream gradient and
   normalizer change; every replay must match the CPU reference for the new
   inputs, and a replay that meets an out-of-range target must raise the
   deferred error (then a good replay clears it). */
Test(gpu_graph, replays_read_new_inputs_grad_loss_normalizer_and_raise_errors) {
  REQUIRE_GPU();
#ifdef CULOSS_HAVE_CUDA
  const size_t xb = (size_t)GN * GC * 4, hb = (size_t)GN * GD * 4, wb = (size_t)GC * GD * 4;
  float *x = malloc(xb), *y = malloc(xb), *h = malloc(hb), *w = malloc(wb);
  float *g = malloc(3 * xb), *rg = malloc(3 * xb), *gh = malloc(hb), *gw = malloc(wb);
  float *rgh = malloc(hb), *rgw = malloc(wb), loss[4], rl[4], norm, glv;
  int64_t t[GN];
  size_t ws_bytes;
  cr_assert_eq(culoss_linear_cross_entropy_workspace_size(gpu, GN, GD, GC, CULOSS_F32, &ws_bytes),
               CULOSS_OK);
  void *d_x = dev_alloc(xb), *d_y = dev_alloc(xb), *d_t = dev_alloc(sizeof t);
  void *d_h = dev_alloc(hb), *d_w = dev_alloc(wb), *d_g = dev_alloc(3 * xb);
  void *d_gh = dev_alloc(hb), *d_gw = dev_alloc(wb), *d_ws = dev_alloc(ws_bytes);
  float *d_norm = dev_alloc(4), *d_gl = dev_alloc(4), *d_loss = dev_alloc(sizeof loss);
  cudaStream_t s;
  cr_assert_eq(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), cudaSuccess);
  cr_assert_eq(culoss_set_stream(gpu, s), CULOSS_OK);
  cudaGraph_t graph;
  cudaGraphExec_t exec;
  cr_assert_eq(cudaStreamBeginCapture(s, cudaStreamCaptureModeGlobal), cudaSuccess);
  const culoss_status cap = replay_calls(gpu, d_x, d_y, d_t, d_norm, d_gl, d_loss, d_g, d_h, d_w,
                                         d_gh, d_gw, d_ws, ws_bytes);
  const cudaError_t end = cudaStreamEndCapture(s, &graph);
  cr_assert_eq(cap, CULOSS_OK, "%s", culoss_last_error());
  cr_assert_eq(end, cudaSuccess, "%s", cudaGetErrorString(end));
  cr_assert_eq(cudaGraphInstantiate(&exec, graph, 0), cudaSuccess);
  for (int rep = 0; rep < 4; rep++) {
    rng_t r = rng_seeded(700 + (uint64_t)rep);
    for (int i = 0; i < GN; i++) t[i] = rng_int(&r, 0, GC);
    if (rep == 2) t[5] = GC; /* out of range: this replay must report it */
    fill_logits(&r, x, GN, GC, GC, 1.0 + rep, 0, t);
    fill_probs(&r, y, GN, GC, GC);
    for (int i = 0; i < GN * GD; i++) h[i] = (float)rng_normal(&r);
    for (int i = 0; i < GC * GD; i++) w[i] = (float)(0.2 * rng_normal(&r));
    norm = (float)(GN + 7 * rep), glv = (float)(0.5 + rep);
    cr_assert_eq(culoss_upload(gpu, d_x, x, xb), CULOSS_OK);
    cr_assert_eq(culoss_upload(gpu, d_y, y, xb), CULOSS_OK);
    cr_assert_eq(culoss_upload(gpu, d_t, t, sizeof t), CULOSS_OK);
    cr_assert_eq(culoss_upload(gpu, d_h, h, hb), CULOSS_OK);
    cr_assert_eq(culoss_upload(gpu, d_w, w, wb), CULOSS_OK);
    cr_assert_eq(culoss_upload(gpu, d_norm, &norm, 4), CULOSS_OK);
    cr_assert_eq(culoss_upload(gpu, d_gl, &glv, 4), CULOSS_OK);
    dev_poison(d_g, 3 * xb);
    dev_poison(d_loss, sizeof loss);
    cr_assert_eq(cudaGraphLaunch(exec, s), cudaSuccess);
    const culoss_status sync = culoss_synchronize(gpu);
    if (rep == 2) {
      cr_assert_eq(sync, CULOSS_ERROR_TARGET_OUT_OF_RANGE, "replay %d: %s", rep,
                   culoss_last_error());
      to_host(loss, d_loss, sizeof loss);
      cr_assert(isnan(loss[0]) && isnan(loss[3]), "an out-of-range target makes the mean NaN");
      continue;
    }
    cr_assert_eq(sync, CULOSS_OK, "replay %d: %s (the flag must be cleared)", rep,
                 culoss_last_error());
    cr_assert_eq(replay_calls(cpu, x, y, t, &norm, &glv, rl, rg, h, w, rgh, rgw, NULL, 0),
                 CULOSS_OK, "%s", culoss_last_error());
    to_host(loss, d_loss, sizeof loss);
    to_host(g, d_g, 3 * xb);
    to_host(gh, d_gh, hb);
    to_host(gw, d_gw, wb);
    int64_t where;
    cr_assert(worst_ratio(loss, rl, 4, 1e-6, 2e-5, &where) <= 1.0, "replay %d: loss %lld %g vs %g",
              rep, (long long)where, (double)loss[where], (double)rl[where]);
    cr_assert(worst_ratio(g, rg, 3 * GN * GC, 1e-7, 2e-4, &where) <= 1.0,
              "replay %d: grad %lld %g vs %g", rep, (long long)where, (double)g[where],
              (double)rg[where]);
    cr_assert(worst_ratio(gh, rgh, GN * GD, 1e-6, 1e-3, &where) <= 1.0, "replay %d: grad_hidden",
              rep);
    cr_assert(worst_ratio(gw, rgw, GC * GD, 1e-6, 1e-3, &where) <= 1.0, "replay %d: grad_weight",
              rep);
  }
  cudaGraphExecDestroy(exec);
  cudaGraphDestroy(graph);
  cr_assert_eq(culoss_set_stream(gpu, NULL), CULOSS_OK);
  cudaStreamDestroy(s);
  void *bufs[] = {d_x, d_y, d_t, d_h, d_w, d_g, d_gh, d_gw, d_ws, d_norm, d_gl, d_loss};
  for (size_t i = 0; i < sizeof bufs / sizeof *bufs; i++) culoss_free(gpu, bufs[i]);
  free(x), free(y), free(h), free(w), free(g), free(rg), free(gh), free(gw), free(rgh), free(rgw);
#else
  cr_skip_test("skipped: no CUDA device (a CPU-only build)");
#endif
}

#ifdef CULOSS_HAVE_CUDA
#include "ew_call.h"

enum { SN = 33, SC = 257, SD = 16 };

/* Every loss once on context c (stream as set), losses into loss[0..], one
   gradient slice of SN * SC each into g. */
static culoss_status every_loss(culoss_context *c, const float *x, const float *p, const float *y,
                                const float *pm, const void *t, const float *h, const float *w,
                                float *loss, float *g, void *ws, size_t ws_bytes) {
  culoss_status st;
  const int64_t gs = SN * SC;
  int k = 0;
  culoss_cross_entropy_options o;
  culoss_cross_entropy_options_init(&o);
  o.label_smoothing = 0.125f;
  if ((st = culoss_cross_entropy(c, &o, SN, SC, CULOSS_F32, x, SC, CULOSS_I64, t, loss + k,
                                 g + k * gs, NULL)) != CULOSS_OK)
    return st;
  k++;
  if ((st = culoss_cross_entropy_soft(c, &o, SN, SC, CULOSS_F32, x, SC, y, loss + k, g + k * gs,
                                      NULL)) != CULOSS_OK)
    return st;
  k++;
  if ((st = culoss_nll(c, NULL, SN, SC, CULOSS_F32, x, SC, CULOSS_I64, t, loss + k, g + k * gs,
                       NULL)) != CULOSS_OK)
    return st;
  k++;
  if ((st = culoss_multi_margin(c, NULL, SN, SC, CULOSS_F32, x, SC, CULOSS_I64, t, loss + k,
                                g + k * gs, NULL)) != CULOSS_OK)
    return st;
  k++;
  for (int op = 0; op < T_NUM_OPS; op++, k++) {
    t_opts to = {CULOSS_REDUCTION_MEAN, NULL, NULL, 0.0f};
    const float *in = op == T_BCE ? p : x, *tg = op == T_HINGE || op == T_SQ_HINGE ? pm : y;
    if ((st = ew_call(c, (t_op)op, &to, SN, SC, CULOSS_F32, in, tg, loss + k, g + k * gs, NULL)) !=
        CULOSS_OK)
      return st;
  }
  return culoss_linear_cross_entropy(c, &o, SN, SD, SC, CULOSS_F32, h, w, NULL, CULOSS_I64, t,
                                     loss + k, g + k * gs, g + k * gs + SN * SD, NULL, NULL, ws,
                                     ws_bytes);
}
#endif

/* Issue 19 section 3: every loss on a non-default (non-blocking) stream,
   against the CPU: the work is enqueued on that stream, and reading results
   after culoss_synchronize sees all of it. */
Test(gpu_graph, every_loss_on_a_non_default_stream_matches_the_cpu) {
  REQUIRE_GPU();
#ifdef CULOSS_HAVE_CUDA
  enum { K = 4 + T_NUM_OPS + 1 };
  const size_t xb = (size_t)SN * SC * 4;
  rng_t r = rng_seeded(77);
  float *x = malloc(xb), *p = malloc(xb), *y = malloc(xb), *pm = malloc(xb);
  float *h = malloc((size_t)SN * SD * 4), *w = malloc((size_t)SC * SD * 4);
  float *g = malloc(K * xb), *rg = malloc(K * xb), loss[K], rl[K];
  int64_t t[SN];
  for (int i = 0; i < SN; i++) t[i] = rng_int(&r, 0, SC);
  fill_logits(&r, x, SN, SC, SC, 2.0, 0, t);
  fill_probs(&r, y, SN, SC, SC);
  for (int64_t e = 0; e < (int64_t)SN * SC; e++) {
    p[e] = (float)(0.05 + 0.9 * rng_uniform(&r));
    pm[e] = rng_uniform(&r) < 0.5 ? -1.0f : 1.0f;
  }
  for (int i = 0; i < SN * SD; i++) h[i] = (float)rng_normal(&r);
  for (int i = 0; i < SC * SD; i++) w[i] = (float)(0.3 * rng_normal(&r));
  memset(rg, 0, K * xb);
  cr_assert_eq(every_loss(cpu, x, p, y, pm, t, h, w, rl, rg, NULL, 0), CULOSS_OK, "%s",
               culoss_last_error());
  size_t ws_bytes;
  cr_assert_eq(culoss_linear_cross_entropy_workspace_size(gpu, SN, SD, SC, CULOSS_F32, &ws_bytes),
               CULOSS_OK);
  float *d_x = dev_from(x, xb), *d_p = dev_from(p, xb), *d_y = dev_from(y, xb);
  float *d_pm = dev_from(pm, xb), *d_h = dev_from(h, (size_t)SN * SD * 4);
  float *d_w = dev_from(w, (size_t)SC * SD * 4), *d_g = dev_alloc(K * xb),
        *d_l = dev_alloc(sizeof loss);
  void *d_t = dev_from(t, sizeof t), *d_ws = dev_alloc(ws_bytes);
  cr_assert_eq(culoss_upload(gpu, d_g, rg, K * xb), CULOSS_OK); /* unwritten bytes compare equal */
  dev_poison(d_l, sizeof loss);
  cudaStream_t s;
  cr_assert_eq(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), cudaSuccess);
  cr_assert_eq(culoss_set_stream(gpu, s), CULOSS_OK);
  cr_assert_eq(every_loss(gpu, d_x, d_p, d_y, d_pm, d_t, d_h, d_w, d_l, d_g, d_ws, ws_bytes),
               CULOSS_OK, "%s", culoss_last_error());
  cr_assert_eq(culoss_synchronize(gpu), CULOSS_OK, "%s", culoss_last_error());
  to_host(loss, d_l, sizeof loss);
  to_host(g, d_g, K * xb);
  for (int k = 0; k < K; k++) {
    int64_t where;
    cr_assert(close_enough(loss[k], rl[k], 1e-6, 2e-5), "loss %d: %g vs %g", k, (double)loss[k],
              (double)rl[k]);
    cr_assert(worst_ratio(g + (size_t)k * SN * SC, rg + (size_t)k * SN * SC, (int64_t)SN * SC, 1e-7,
                          1e-4, &where) <= 1.0,
              "gradient %d [%lld]: %g vs %g", k, (long long)where,
              (double)g[(size_t)k * SN * SC + where], (double)rg[(size_t)k * SN * SC + where]);
  }
  cr_assert_eq(culoss_set_stream(gpu, NULL), CULOSS_OK);
  cudaStreamDestroy(s);
  float *bufs[] = {d_x, d_p, d_y, d_pm, d_h, d_w, d_g, d_l};
  for (size_t i = 0; i < sizeof bufs / sizeof *bufs; i++) culoss_free(gpu, bufs[i]);
  culoss_free(gpu, d_t), culoss_free(gpu, d_ws);
  free(x), free(p), free(y), free(pm), free(h), free(w), free(g), free(rg);
#else
  cr_skip_test("skipped: no CUDA device (a CPU-only build)");
#endif
}

/* culoss_set_stream between two streams, call after call, on one context:
   each call's MEAN goes through the context's scratch (partials and
   denominator), so without the switch's event the calls on the two streams
   could overlap on it (on a GPU; the emulator, synchronous, only checks the
   results and the calls). During a capture the switch must add nothing:
   the un-captured stream is not pulled into the capture. */
Test(gpu_graph, set_stream_alternation_is_ordered) {
  REQUIRE_GPU();
#ifdef CULOSS_HAVE_CUDA
  enum { K = 8, AN = 96, AC = 3000 };
  rng_t r = rng_seeded(777);
  float *x = malloc((size_t)AN * AC * 4), rl[K], l[K];
  int64_t t[K][AN];
  cr_assert(x);
  fill_logits(&r, x, AN, AC, AC, 2.0, 1, NULL);
  for (int k = 0; k < K; k++)
    for (int i = 0; i < AN; i++) t[k][i] = i % 5 == k % 5 ? -100 : rng_int(&r, 0, AC);
  culoss_cross_entropy_options o;
  culoss_cross_entropy_options_init(&o);
  for (int k = 0; k < K; k++)
    cr_assert_eq(culoss_cross_entropy(cpu, &o, AN, AC, CULOSS_F32, x, AC, CULOSS_I64, t[k], &rl[k],
                                      NULL, NULL),
                 CULOSS_OK);
  float *d_x = dev_from(x, (size_t)AN * AC * 4), *d_l = dev_alloc(sizeof l);
  float *d_g = dev_alloc((size_t)AN * AC * 4);
  int64_t *d_t = dev_from(t, sizeof t);
  dev_poison(d_l, sizeof l);
  cudaStream_t s[2];
  for (int i = 0; i < 2; i++)
    cr_assert_eq(cudaStreamCreateWithFlags(&s[i], cudaStreamNonBlocking), cudaSuccess);
  for (int k = 0; k < K; k++) {
    cr_assert_eq(culoss_set_stream(gpu, s[k % 2]), CULOSS_OK, "%s", culoss_last_error());
    cr_assert_eq(culoss_cross_entropy(gpu, &o, AN, AC, CULOSS_F32, d_x, AC, CULOSS_I64,
                                      d_t + k * AN, d_l + k, d_g, NULL),
                 CULOSS_OK, "%s", culoss_last_error());
  }
  cr_assert_eq(culoss_synchronize(gpu), CULOSS_OK, "%s", culoss_last_error());
  to_host(l, d_l, sizeof l);
  for (int k = 0; k < K; k++)
    cr_assert(close_enough(l[k], rl[k], 1e-6, 2e-5), "call %d: %g vs %g", k, (double)l[k],
              (double)rl[k]);
  /* capture on s[0]; switching to s[1] and back must leave s[1] out of it */
  cr_assert_eq(culoss_set_stream(gpu, s[0]), CULOSS_OK);
  cudaGraph_t graph = NULL;
  cr_assert_eq(cudaStreamBeginCapture(s[0], cudaStreamCaptureModeGlobal), cudaSuccess);
  cr_assert_eq(
      culoss_cross_entropy(gpu, &o, AN, AC, CULOSS_F32, d_x, AC, CULOSS_I64, d_t, d_l, NULL, NULL),
      CULOSS_OK);
  const culoss_status sw1 = culoss_set_stream(gpu, s[1]);
  enum cudaStreamCaptureStatus cs = cudaStreamCaptureStatusActive;
  const cudaError_t q = cudaStreamIsCapturing(s[1], &cs);
  const culoss_status sw2 = culoss_set_stream(gpu, s[0]);
  const cudaError_t end = cudaStreamEndCapture(s[0], &graph);
  cr_assert_eq(sw1, CULOSS_OK, "%s", culoss_last_error());
  cr_assert_eq(sw2, CULOSS_OK, "%s", culoss_last_error());
  cr_assert(q == cudaSuccess && cs == cudaStreamCaptureStatusNone,
            "set_stream pulled the other stream into the capture");
  cr_assert_eq(end, cudaSuccess, "capture broken: %s", cudaGetErrorString(end));
  cudaGraphDestroy(graph);
  cr_assert_eq(culoss_set_stream(gpu, NULL), CULOSS_OK);
  for (int i = 0; i < 2; i++) cudaStreamDestroy(s[i]);
  culoss_free(gpu, d_x), culoss_free(gpu, d_l), culoss_free(gpu, d_g), culoss_free(gpu, d_t);
  free(x);
#else
  cr_skip_test("skipped: no CUDA device (a CPU-only build)");
#endif
}
