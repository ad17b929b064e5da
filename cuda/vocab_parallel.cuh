/*
 * vocab_parallel.cuh: the launchers of vocabulary-parallel cross-entropy's
 * kernels (cuda/vocab_parallel.cu), shared with the vocabulary-parallel
 * fused linear + CE (cuda/linear_ce.cu), which runs them on blocks of rows
 * of the logits it computes.
 */
#ifndef CULOSS_VOCAB_PARALLEL_CUH
#define CULOSS_VOCAB_PARALLEL_CUH

#include <cuda_runtime.h>

#include "backend.h"
#include "reduce.cuh"

namespace culoss_dev {

struct vp_params {
  int64_t n, c, ld, v_begin, v_total;
  int64_t row0, rec_n; /* these n rows are rows row0.. of the rec_n rows the records hold */
  int rows_out;        /* 1: loss[row] per row even when reduced (linear CE's blocks) */
  int64_t col0;        /* these c columns are this slice's classes col0.. (linear CE's pass B) */
  int grad_only;       /* 1: the gradient only, no loss (pass B) */
  float *lse_out, *ent_out; /* NULL or [n]: per-row lse / entropy (0 ignored, NaN bad) */
  int ranks;
  const void *x;
  const void *targets;
  int ttype;
  int64_t ignore_index;
  const float *class_weight; /* this slice's, [c] */
  float eps, z, cap;
  float *stats;          /* STATS: [n + 1][NF] */
  const float *gathered; /* FINISH: [ranks][n + 1][NF] */
  float *loss;
  void *grad;
  const float *grad_loss;
  int reduction;
  divisor_src div;
  culoss__scratch *scratch;
};

/* Parameters from validated arguments: rows 0..n of an n-row problem. */
vp_params vp_fill(culoss_context *ctx, const culoss__vp_args *a);
/* This block's records (rows row0.. of p.stats); then, once per call, the
   slice record (record rec_n). */
culoss_status vp_launch_stats(culoss_context *ctx, const vp_params &p, int dtype, cudaStream_t s);
culoss_status vp_launch_slice(const vp_params &p, cudaStream_t s);
/* MEAN's denominator and W from all rec_n rows' gathered records; points
   p.div at them (unless a normalizer is set). */
culoss_status vp_launch_prep(vp_params &p, cudaStream_t s);
/* Loss and gradient of this block's rows; *grid: its per-block partials
   (when reduced and !rows_out). */
culoss_status vp_launch_finish(culoss_context *ctx, const vp_params &p, int dtype, int64_t *grid,
                               cudaStream_t s);

} // namespace culoss_dev

#endif /* CULOSS_VOCAB_PARALLEL_CUH */
