/*
 * cross_entropy.cuh: the fused cross-entropy kernel's launch interface,
 * shared by the cross-entropy entry points and by fused linear + CE, which
 * runs the same kernel on blocks of logits it computes with cuBLAS.
 */
#ifndef CULOSS_CROSS_ENTROPY_CUH
#define CULOSS_CROSS_ENTROPY_CUH

#include <cuda_runtime.h>

#include "backend.h"
#include "reduce.cuh"

namespace culoss_dev {

/* Shared memory kept free for the fused kernel's static shared memory (CUB
   temp storage, broadcasts): the row cache gets the rest of the opt-in
   limit. cuda/context.cu checks every instantiation against it. */
constexpr size_t CE_STATIC_SMEM_RESERVE = 4096;

struct ce_params {
  int64_t n, c, ld;
  const void *x;
  const void *targets;
  const void *probs;
  float *loss;
  void *grad;
  const float *grad_loss;
  const float *class_weight;
  const float *normalizer;
  int64_t ignore_index;
  float eps, z, cap;
  int reduction;
  int ttype;
  int prep_blocks;    /* partials of D / W in the scratch (0: none) */
  int need_wsum;      /* W = sum of class weights comes from the prep partials */
  divisor_src div;    /* MEAN's denominator */
  int64_t cache_vecs; /* packs of each row kept in shared memory */
  int rows_out;       /* 1: loss[row] per row even for SUM/MEAN (no partials) */
  float *lse_out;     /* NULL, or [n]: each row's lse (0 ignored, NaN out of range) */
  float *ent_out;     /* NULL, or [n]: each row's softmax entropy (likewise) */
  float4 *row_stats;  /* NULL, or per row two float4: {m, log_s, a.k, (1-eps) w_y},
                         {grad scale, s, 0, 0} (lse = m + log_s, log_s =
                         log1p(s), s the culoss__lse_state sum without its top) */
  culoss__scratch *scratch;
};

/* Every instantiation of the fused kernel, for the context's attribute
   set-up (cuda/context.cu): the address of number i in [0, count). */
int ce_kernel_count();
const void *ce_kernel_address(int i);
/* Whether number i is a ce_cluster_kernel (sm_90 code only). */
bool ce_kernel_is_cluster(int i);

/* Fills p from validated arguments (no launch). */
void ce_fill_params(culoss_context *ctx, const culoss__ce_args *a, ce_params *p);
/* Launches the kernel that sums target weights (MEAN's D) and class weights
   (W, for smoothing with class weights) over all p->n rows, if needed, and
   points p->div at its result. */
culoss_status ce_launch_prep(const ce_params *p_in, ce_params *p, int mode, cudaStream_t s);
/* Launches the fused kernel (NLL's gather for mode CULOSS__NLL) over p.n
   rows; *grid receives its block count (the number of per-block partials
   it wrote when reduced and !rows_out). */
culoss_status ce_launch_main(culoss_context *ctx, ce_params &p, int mode, int dtype, int64_t *grid,
                             cudaStream_t s);

} // namespace culoss_dev

#endif
