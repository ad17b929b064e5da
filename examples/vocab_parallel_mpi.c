/*
 * vocab_parallel_mpi.c: vocabulary-parallel cross-entropy across MPI
 * processes on the CPU backend, with MPI_Allgather as the collective.
 *
 *   mpirun -np 4 ./vocab_parallel_mpi
 *
 * Every rank builds the same logits and targets (a fixed seed), keeps the
 * columns of its own, uneven slice of the vocabulary, and runs
 * culoss_cross_entropy_vocab_parallel; then it checks its loss against the
 * unsharded culoss_cross_entropy on the whole logits (and against rank 0's
 * loss, bitwise) and its gradient slice against the unsharded gradient;
 * then the same for fused linear + CE with this rank's rows of the weight
 * (grad_hidden all-reduced across the ranks).
 * Exits 0 when every rank agrees. ctest runs it with 4 processes where MPI
 * is found.
 */
#include <math.h>
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "culoss.h"

static int mpi_allgather(void *user, const void *send, void *recv, size_t bytes, void *stream) {
  (void)stream; /* the CPU backend: host buffers, complete on return */
  return MPI_Allgather(send, (int)bytes, MPI_BYTE, recv, (int)bytes, MPI_BYTE, *(MPI_Comm *)user) ==
                 MPI_SUCCESS
             ? 0
             : 1;
}

static double rnd(unsigned long long *s) { /* uniform in [0, 1) */
  *s = *s * 6364136223846793005ULL + 1442695040888963407ULL;
  return (double)(*s >> 11) / 9007199254740992.0;
}

int main(int argc, char **argv) {
  enum { N = 64, V = 1000 };
  int rank, ranks, bad = 0;
  MPI_Comm comm = MPI_COMM_WORLD;
  MPI_Init(&argc, &argv);
  MPI_Comm_rank(comm, &rank);
  MPI_Comm_size(comm, &ranks);
  /* uneven slices: rank k holds a share proportional to k + 1 */
  const int64_t total_share = (int64_t)ranks * (ranks + 1) / 2;
  int64_t begin = 0, width = 0;
  for (int k = 0, at = 0; k <= rank; k++) {
    const int64_t w = k == ranks - 1 ? V - at : (int64_t)V * (k + 1) / total_share;
    if (k == rank) begin = at, width = w;
    at += (int)w;
  }
  float *x = malloc(sizeof(float) * N * V), *ref_g = malloc(sizeof(float) * N * V);
  float *xs = malloc(sizeof(float) * N * (size_t)width), ref_loss, loss;
  int64_t t[N];
  unsigned long long seed = 42;
  for (int i = 0; i < N * V; i++) x[i] = (float)(6.0 * rnd(&seed) - 3.0);
  for (int i = 0; i < N; i++) t[i] = i % 7 == 3 ? -100 : (int64_t)(rnd(&seed) * V);
  for (int i = 0; i < N; i++) memcpy(xs + i * width, x + i * V + begin, sizeof(float) * width);

  culoss_context *ctx = NULL;
  culoss_cross_entropy_options o;
  culoss_cross_entropy_options_init(&o);
  o.label_smoothing = 0.1f;
  o.z_loss = 1e-4f;
  culoss_vocab_parallel vp = {rank, ranks, begin, V, mpi_allgather, &comm};
  size_t wsb = 0;
  void *ws = NULL;
  if (culoss_create(&ctx, CULOSS_BACKEND_CPU, 0) != CULOSS_OK ||
      culoss_vocab_parallel_workspace_size(ctx, &vp, N, &wsb) != CULOSS_OK ||
      culoss_malloc(ctx, &ws, wsb) != CULOSS_OK ||
      culoss_cross_entropy(ctx, &o, N, V, CULOSS_F32, x, V, CULOSS_I64, t, &ref_loss, ref_g,
                           NULL) != CULOSS_OK ||
      culoss_cross_entropy_vocab_parallel(ctx, &o, &vp, N, width, CULOSS_F32, xs, width, CULOSS_I64,
                                          t, &loss, xs, NULL, ws, wsb) != CULOSS_OK) {
    fprintf(stderr, "rank %d: %s\n", rank, culoss_last_error());
    MPI_Abort(comm, 2);
  }
  float loss0 = loss;
  MPI_Bcast(&loss0, 1, MPI_FLOAT, 0, comm);
  if (memcmp(&loss0, &loss, sizeof loss) != 0) bad = 1;
  if (fabs((double)loss - ref_loss) > 1e-5 * (1.0 + fabs(ref_loss))) bad = 1;
  for (int i = 0; i < N; i++)
    for (int64_t j = 0; j < width; j++) {
      const double a = xs[i * width + j], b = ref_g[i * V + begin + j];
      if (fabs(a - b) > 1e-7 + 1e-5 * fabs(b)) bad = 1;
    }
  printf("rank %d of %d: classes [%lld, %lld), loss %.7f (unsharded %.7f): %s\n", rank, ranks,
         (long long)begin, (long long)(begin + width), (double)loss, (double)ref_loss,
         bad ? "MISMATCH" : "ok");

  /* Linear + CE: hidden [N, D] on every rank, this rank's rows of the LM
     head; grad_hidden comes back as this rank's partial sum, all-reduced
     here as a tensor-parallel trainer would. */
  enum { D = 16 };
  float *h = malloc(sizeof(float) * N * D), *w = malloc(sizeof(float) * V * D);
  float *gw_ref = malloc(sizeof(float) * V * D), *gw = malloc(sizeof(float) * (size_t)width * D);
  float gh_ref[N * D], gh[N * D], gh_all[N * D], lin_ref, lin;
  for (int i = 0; i < N * D; i++) h[i] = (float)(2.0 * rnd(&seed) - 1.0);
  for (int i = 0; i < V * D; i++) w[i] = (float)(rnd(&seed) - 0.5);
  culoss_linear_ce_options lo;
  culoss_linear_ce_options_init(&lo);
  lo.grad_weight_dtype = CULOSS_F32;
  if (culoss_linear_cross_entropy(ctx, &o, N, D, V, CULOSS_F32, h, w, NULL, CULOSS_I64, t, &lin_ref,
                                  gh_ref, gw_ref, NULL, NULL, NULL, 0) != CULOSS_OK ||
      culoss_linear_cross_entropy_vocab_parallel(ctx, &o, &lo, &vp, N, D, width, CULOSS_F32, h,
                                                 w + begin * D, NULL, CULOSS_I64, t, &lin, gh, gw,
                                                 NULL, NULL, NULL, 0) != CULOSS_OK) {
    fprintf(stderr, "rank %d: %s\n", rank, culoss_last_error());
    MPI_Abort(comm, 2);
  }
  MPI_Allreduce(gh, gh_all, N * D, MPI_FLOAT, MPI_SUM, comm);
  int lbad = fabs((double)lin - lin_ref) > 1e-5 * (1.0 + fabs(lin_ref));
  for (int i = 0; i < N * D; i++)
    if (fabs((double)gh_all[i] - gh_ref[i]) > 1e-6 + 1e-4 * fabs(gh_ref[i])) lbad = 1;
  for (int64_t j = 0; j < width * D; j++)
    if (fabs((double)gw[j] - gw_ref[begin * D + j]) > 1e-7 + 1e-5 * fabs(gw_ref[begin * D + j]))
      lbad = 1;
  printf("rank %d of %d: linear + CE loss %.7f (unsharded %.7f), grad_hidden all-reduced: %s\n",
         rank, ranks, (double)lin, (double)lin_ref, lbad ? "MISMATCH" : "ok");
  bad |= lbad;
  free(h), free(w), free(gw_ref), free(gw);
  int any = 0;
  MPI_Allreduce(&bad, &any, 1, MPI_INT, MPI_MAX, comm);
  culoss_free(ctx, ws);
  culoss_destroy(ctx);
  free(x), free(ref_g), free(xs);
  MPI_Finalize();
  return any ? 1 : 0;
}
