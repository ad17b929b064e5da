/*
 * reduce.cuh: the one deterministic reduction mechanism every loss kernel
 * uses for SUM, MEAN and BATCHMEAN.
 *
 * A reducing kernel runs on a grid whose size depends only on the problem
 * size (never on the device), each block sums its own values in a fixed order
 * (CUB BlockReduce, then one store by thread 0) into the context scratch, and
 * a one-block kernel (reduce_final_kernel, cuda/reduce.cu) sums the partials
 * in a fixed order and divides by the mean's divisor. No atomics: the same
 * inputs give bitwise the same loss, run after run and device after device.
 *
 * The divisor of a mean is resolved on the device, in one place, so a fused
 * kernel scaling its gradient and the final kernel dividing the loss use
 * bitwise the same value: *normalizer if given, else the fixed-order sum of
 * `prep` partials if any (cross-entropy's sum of target weights), else the
 * host-known count.
 */
#ifndef CULOSS_REDUCE_CUH
#define CULOSS_REDUCE_CUH

#include <cub/block/block_reduce.cuh>

#include "backend.h"

namespace culoss_dev {

/* Where a mean's divisor comes from (see above). */
struct divisor_src {
  double count;            /* host-known divisor: elements, rows, ... */
  const float *normalizer; /* device [1] or NULL */
  const double *prep;      /* device partials or NULL */
  int prep_count;
};

/* Fixed-order sum by one thread: every caller gets bitwise the same value. */
__device__ __forceinline__ double sum_in_order(const double *v, int count) {
  double s = 0.0;
  for (int i = 0; i < count; i++) s += v[i];
  return s;
}

__device__ __forceinline__ double resolve_divisor(const divisor_src &d) {
  if (d.normalizer) return (double)*d.normalizer;
  if (d.prep) return sum_in_order(d.prep, d.prep_count);
  return d.count;
}

/* Gradient scale of a reduced loss: g for SUM, g / D for MEAN/BATCHMEAN,
   0 when D == 0 (PyTorch's all-ignored gradient is zero, not NaN). */
__device__ __forceinline__ float reduced_grad_scale(int reduction, const float *grad_loss,
                                                    const divisor_src &d) {
  const float g = grad_loss ? grad_loss[0] : 1.0f;
  if (reduction == CULOSS_REDUCTION_SUM) return g;
  const double dv = resolve_divisor(d);
  return dv == 0.0 ? 0.0f : (float)((double)g / dv);
}

/* Block-wide fixed-order sum of one value per thread, stored by thread 0.
   Every thread of the block must call it. The TempStorage is one static
   shared variable per instantiation, so the trailing barrier makes a second
   call safe. */
template <int BLOCK> __device__ __forceinline__ void store_block_sum(double v, double *dst) {
  typedef cub::BlockReduce<double, BLOCK> reduce_t;
  __shared__ typename reduce_t::TempStorage tmp;
  const double s = reduce_t(tmp).Sum(v);
  if (threadIdx.x == 0) *dst = s;
  __syncthreads();
}

/* A divisor known on the host (elements, rows). */
inline divisor_src count_divisor(double count) {
  divisor_src d;
  d.count = count;
  d.normalizer = nullptr;
  d.prep = nullptr;
  d.prep_count = 0;
  return d;
}

/* Caps a reducing kernel's grid: one partial per block in the scratch. */
/* The grid of a grid-stride kernel: `blocks`, at most the context's limit
   (culoss_set_grid_limit; default CULOSS_MAX_PARTIALS, one partial each). */
inline int64_t capped_grid(const culoss_context *ctx, int64_t blocks) {
  const int64_t cap = ctx->grid_limit > 0 ? ctx->grid_limit : CULOSS_MAX_PARTIALS;
  if (blocks < 1) return 1;
  return blocks > cap ? cap : blocks;
}

/* A row too long for one block's cache, split over a thread-block cluster
   (sm_90): the fewest blocks whose `fit` packs each hold the row's `packs`,
   at least 2 and at most `kmax` (longer rows re-read the rest of each
   slice); 0 when no pack fits. */
inline int64_t cluster_blocks(int64_t packs, int64_t fit, int64_t kmax) {
  if (fit <= 0) return 0;
  const int64_t k = (packs + fit - 1) / fit;
  return k < 2 ? 2 : (k > kmax ? kmax : k);
}
/* Whether this context launches clusters of k blocks: the device has them,
   CULOSS_CE_CLUSTER is not 0, and the grid limit (culoss_set_grid_limit)
   leaves room for one cluster. */
inline bool cluster_ok(const culoss_context *ctx, int64_t k) {
  return k > 0 && ctx->ce_cluster && ctx->cluster_launch &&
         (ctx->grid_limit == 0 || ctx->grid_limit >= k);
}
/* The grid of a cluster launch over `rows` rows: a cluster of k blocks per
   row, at most the context's limit of blocks (one partial each). */
inline int64_t cluster_grid(const culoss_context *ctx, int64_t k, int64_t rows) {
  const int64_t cap = ctx->grid_limit > 0 ? ctx->grid_limit : CULOSS_MAX_PARTIALS;
  return (cap / k < rows ? cap / k : rows) * k;
}

} // namespace culoss_dev

/* The last step of every reduced loss (cuda/reduce.cu): for SUM, MEAN or
   BATCHMEAN, enqueues on ctx's stream the one-block kernel that writes
   loss[0] from the first `partials` per-block partials in ctx's scratch
   (divided by `div` for the means); nothing for NONE. */
culoss_status culoss__finish_reduction(culoss_context *ctx, int partials, float *loss,
                                       int reduction, const culoss_dev::divisor_src &div);

#endif /* CULOSS_REDUCE_CUH */
