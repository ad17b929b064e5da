/* test_gpu_nccl.c: vocabulary-parallel cross-entropy over NCCL, one process
   driving every GPU present (ncclCommInitAll): the two phases with a grouped
   ncclAllGather between them (culoss_nccl.h's callback, called by hand), and
   every rank's loss and gradient slice against the CPU backend's unsharded
   call. Exits 77 (skipped) only without a CUDA device. Built where CMake
   finds NCCL. */
#include <cuda_runtime_api.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "culoss_nccl.h"

#define MAXG 8
#define FAIL(...)                                                                                  \
  do {                                                                                             \
    fprintf(stderr, __VA_ARGS__);                                                                  \
    fprintf(stderr, "\n");                                                                         \
    return 1;                                                                                      \
  } while (0)
#define OK(e)                                                                                      \
  do {                                                                                             \
    if ((e) != CULOSS_OK) FAIL("%s: %s", #e, culoss_last_error());                                 \
  } while (0)

int main(void) {
  enum { N = 256, V = 5003 };
  int ng = 0;
  culoss_context *probe = NULL;
  const culoss_status ps = culoss_create(&probe, CULOSS_BACKEND_CUDA, 0);
  if (ps == CULOSS_ERROR_NO_DEVICE) { /* the library's rule: no device or no driver only */
    printf("skipped: no CUDA device (%s)\n", culoss_last_error());
    return 77;
  }
  OK(ps);
  culoss_destroy(probe);
  if (cudaGetDeviceCount(&ng) != cudaSuccess || ng < 1) FAIL("cudaGetDeviceCount");
  /* one GPU is one rank: still a real NCCL communicator and all-gather */
  if (ng > MAXG) ng = MAXG;
  float *x = malloc(sizeof(float) * N * V), *ref_g = malloc(sizeof(float) * N * V), ref_l;
  int64_t t[N];
  unsigned long long s = 1;
  for (int i = 0; i < N * V; i++) {
    s = s * 6364136223846793005ULL + 1442695040888963407ULL;
    x[i] = (float)((double)(s >> 11) / 9007199254740992.0 * 8.0 - 4.0);
  }
  for (int i = 0; i < N; i++) t[i] = i % 11 == 5 ? -100 : (i * 7919) % V;
  culoss_context *cpu = NULL, *ctx[MAXG];
  culoss_cross_entropy_options o;
  culoss_cross_entropy_options_init(&o);
  o.label_smoothing = 0.1f;
  OK(culoss_create(&cpu, CULOSS_BACKEND_CPU, 0));
  OK(culoss_cross_entropy(cpu, &o, N, V, CULOSS_F32, x, V, CULOSS_I64, t, &ref_l, ref_g, NULL));
  ncclComm_t comms[MAXG];
  int devs[MAXG];
  for (int g = 0; g < ng; g++) devs[g] = g;
  if (ncclCommInitAll(comms, ng, devs) != ncclSuccess) FAIL("ncclCommInitAll failed");
  int64_t begin[MAXG], width[MAXG];
  void *d_x[MAXG], *d_t[MAXG], *d_rec[MAXG], *d_all[MAXG], *d_l[MAXG];
  const size_t recb = (size_t)(N + 1) * CULOSS_VOCAB_PARALLEL_RECORD_BYTES;
  for (int g = 0, at = 0; g < ng; g++) { /* uneven: the first GPU holds one class more */
    width[g] = V / ng + (g < V % ng), begin[g] = at, at += (int)width[g];
    float *xs = malloc(sizeof(float) * N * (size_t)width[g]);
    for (int i = 0; i < N; i++)
      memcpy(xs + i * width[g], x + i * V + begin[g], sizeof(float) * width[g]);
    OK(culoss_create(&ctx[g], CULOSS_BACKEND_CUDA, g));
    OK(culoss_malloc(ctx[g], &d_x[g], sizeof(float) * N * (size_t)width[g]));
    OK(culoss_malloc(ctx[g], &d_t[g], sizeof t));
    OK(culoss_malloc(ctx[g], &d_rec[g], recb));
    OK(culoss_malloc(ctx[g], &d_all[g], recb * (size_t)ng));
    OK(culoss_malloc(ctx[g], &d_l[g], sizeof(float)));
    OK(culoss_upload(ctx[g], d_x[g], xs, sizeof(float) * N * (size_t)width[g]));
    OK(culoss_upload(ctx[g], d_t[g], t, sizeof t));
    free(xs);
  }
  culoss_vocab_parallel vp[MAXG];
  for (int g = 0; g < ng; g++) {
    vp[g] = (culoss_vocab_parallel){g, ng, begin[g], V, NULL, NULL};
    if (culoss_vocab_parallel_use_nccl(&vp[g], comms[g]) != 0) FAIL("communicator size");
    OK(culoss_cross_entropy_vocab_parallel_stats(ctx[g], &o, &vp[g], N, width[g], CULOSS_F32,
                                                 d_x[g], width[g], CULOSS_I64, d_t[g], d_rec[g]));
  }
  ncclGroupStart();
  for (int g = 0; g < ng; g++) {
    cudaSetDevice(g);
    if (vp[g].allgather(vp[g].user, d_rec[g], d_all[g], recb, NULL) != 0) FAIL("allgather");
  }
  ncclGroupEnd();
  for (int g = 0; g < ng; g++) {
    cudaSetDevice(g);
    cudaDeviceSynchronize();
    OK(culoss_cross_entropy_vocab_parallel_finish(ctx[g], &o, &vp[g], N, width[g], CULOSS_F32,
                                                  d_x[g], width[g], CULOSS_I64, d_t[g], d_all[g],
                                                  d_l[g], d_x[g], NULL));
  }
  int bad = 0;
  float l0 = 0;
  for (int g = 0; g < ng; g++) {
    float l, *gs = malloc(sizeof(float) * N * (size_t)width[g]);
    OK(culoss_synchronize(ctx[g]));
    OK(culoss_download(ctx[g], &l, d_l[g], sizeof l));
    OK(culoss_download(ctx[g], gs, d_x[g], sizeof(float) * N * (size_t)width[g]));
    if (g == 0) l0 = l;
    if (memcmp(&l, &l0, sizeof l) != 0 || fabs((double)l - ref_l) > 2e-5 * (1 + fabs(ref_l)))
      bad = 1;
    for (int i = 0; i < N; i++)
      for (int64_t j = 0; j < width[g]; j++) {
        const double a = gs[i * width[g] + j], b = ref_g[i * V + begin[g] + j];
        if (fabs(a - b) > 1e-7 + 2e-4 * fabs(b)) bad = 1;
      }
    printf("GPU %d: classes [%lld, %lld), loss %.7f (unsharded %.7f)\n", g, (long long)begin[g],
           (long long)(begin[g] + width[g]), (double)l, (double)ref_l);
    free(gs);
    culoss_free(ctx[g], d_x[g]), culoss_free(ctx[g], d_t[g]), culoss_free(ctx[g], d_rec[g]);
    culoss_free(ctx[g], d_all[g]), culoss_free(ctx[g], d_l[g]);
    culoss_destroy(ctx[g]);
    ncclCommDestroy(comms[g]);
  }
  culoss_destroy(cpu);
  free(x), free(ref_g);
  printf("%s\n", bad ? "MISMATCH" : "ok");
  return bad;
}
