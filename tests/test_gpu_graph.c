/* test_gpu_graph.c: every loss call is capture-safe and deterministic across
   paths. Each family runs once on a non-default stream, then the same calls
   are captured into a CUDA graph (cudaStreamCaptureModeGlobal: any
   allocation, synchronisation or host copy inside would fail the capture)
   and replayed twice; the results must be bitwise identical to the direct
   run. Skips visibly without a GPU. */
#include <criterion/criterion.h>
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

typedef struct {
  void *x, *y, *g, *t, *w, *ws;
  float *loss;
  size_t ws_bytes;
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
#define RUN(call) if (st == CULOSS_OK) st = (call)
  RUN(culoss_cross_entropy(gpu, &ce, N, C, CULOSS_BF16, b->x, C, CULOSS_I64, b->t, b->loss + 0,
                           g + 0 * gs, NULL));
  RUN(culoss_cross_entropy_soft(gpu, &ce, N, C, CULOSS_BF16, b->x, C, b->y, b->loss + 1, g + 1 * gs,
                                NULL));
  RUN(culoss_nll(gpu, NULL, N, C, CULOSS_BF16, b->x, C, CULOSS_I64, b->t, b->loss + 2, g + 2 * gs,
                 NULL));
  culoss_bce_options bo;
  culoss_bce_options_init(&bo);
  RUN(culoss_bce_with_logits(gpu, &bo, N, C, CULOSS_BF16, b->x, b->y, b->loss + 3, g + 3 * gs, NULL));
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
  RUN(culoss_linear_cross_entropy(gpu, NULL, N, 64, C, CULOSS_BF16, b->x, b->y, NULL, CULOSS_I64,
                                  b->t, b->loss + 7, g + 7 * gs, (char *)g + 7 * gs + (size_t)N * 64 * 2,
                                  NULL, NULL, b->ws, b->ws_bytes));
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
  b.g = dev_alloc((size_t)M * 2 * 8);
  b.loss = dev_alloc(8 * sizeof(float));
  cr_assert_eq(culoss_linear_cross_entropy_workspace_size(gpu, N, 64, C, CULOSS_BF16, &b.ws_bytes),
               CULOSS_OK);
  b.ws = dev_alloc(b.ws_bytes);
  cudaStream_t s;
  cr_assert_eq(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), cudaSuccess);
  cr_assert_eq(culoss_set_stream(gpu, s), CULOSS_OK);
  /* direct run; every run starts from the same poison, so the bytes no call
     writes (the tail of the linear CE slice) compare equal too */
  dev_poison(b.g, (size_t)M * 2 * 8);
  dev_poison(b.loss, 8 * sizeof(float));
  cr_assert_eq(all_losses(&b), CULOSS_OK, "%s", culoss_last_error());
  cr_assert_eq(culoss_synchronize(gpu), CULOSS_OK, "%s", culoss_last_error());
  float l0[8];
  uint16_t *g0 = malloc((size_t)M * 2 * 8), *g1 = malloc((size_t)M * 2 * 8);
  to_host(l0, b.loss, sizeof l0);
  to_host(g0, b.g, (size_t)M * 2 * 8);
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
    dev_poison(b.g, (size_t)M * 2 * 8);
    dev_poison(b.loss, 8 * sizeof(float));
    cr_assert_eq(cudaGraphLaunch(exec, s), cudaSuccess);
    cr_assert_eq(culoss_synchronize(gpu), CULOSS_OK, "%s", culoss_last_error());
    float l1[8];
    to_host(l1, b.loss, sizeof l1);
    to_host(g1, b.g, (size_t)M * 2 * 8);
    for (int k = 0; k < 8; k++)
      cr_assert(memcmp(&l0[k], &l1[k], 4) == 0, "replay %d: loss %d differs (%g vs %g)", rep, k,
                (double)l0[k], (double)l1[k]);
    size_t diff = 0;
    while (diff < (size_t)M * 8 && g0[diff] == g1[diff]) diff++;
    cr_assert(diff == (size_t)M * 8, "replay %d: gradient %zu differs at element %zu (%#x vs %#x)",
              rep, diff / M, diff % M, g0[diff], g1[diff]);
  }
  cudaGraphExecDestroy(exec);
  cudaGraphDestroy(graph);
  cr_assert_eq(culoss_set_stream(gpu, NULL), CULOSS_OK);
  cudaStreamDestroy(s);
  culoss_free(gpu, b.x), culoss_free(gpu, b.y), culoss_free(gpu, b.t), culoss_free(gpu, b.w);
  culoss_free(gpu, b.g), culoss_free(gpu, b.loss), culoss_free(gpu, b.ws);
  free(xf), free(yf), free(xb), free(yb), free(g0), free(g1);
#endif
}
