/*
 * internal.h: the host side's private declarations: argument checks
 * (host/validate.c), the dispatch to a backend (host/dispatch.c) and the
 * CPU references (host/<family>_ref.c). What a backend receives is in
 * common/backend.h.
 */
#ifndef CULOSS_INTERNAL_H
#define CULOSS_INTERNAL_H

#include "backend.h"
#include "loss_math.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Records an INVALID_VALUE detail and returns CULOSS_ERROR_INVALID_VALUE. */
#define CULOSS__BAD(...) culoss__error(CULOSS_ERROR_INVALID_VALUE, __VA_ARGS__)

/* Returns from the calling function when `expr` (a culoss_status) fails. */
#define CULOSS__TRY(expr)                                                                          \
  do {                                                                                             \
    const culoss_status try_st_ = (expr);                                                          \
    if (try_st_ != CULOSS_OK) return try_st_;                                                      \
  } while (0)

/* ------------------------------------------------------- argument checks */
/* Each records a message naming `fn` and the argument. */

/* NULL, or not a live context (destroyed, never created): INVALID_VALUE
   (host/context.c). */
culoss_status culoss__check_ctx(const culoss_context *ctx, const char *fn);
culoss_status culoss__check_dtype(const char *fn, culoss_dtype dtype);
culoss_status culoss__check_index_type(const char *fn, culoss_index_type t);
culoss_status culoss__check_reduction(const char *fn, culoss_reduction r, int allow_batchmean);
/* A row-major [n, c] matrix with row stride ld (ld = c when contiguous):
   n >= 0, c >= 1, ld >= c, and n * ld 4-byte elements addressable with
   64-bit byte offsets. */
culoss_status culoss__check_rows(const char *fn, int64_t n, int64_t c, int64_t ld);
/* Class targets in [0, c) unless equal to ignore_index (when has_ignore). */
culoss_status culoss__check_targets_cpu(const char *fn, const void *targets, culoss_index_type t,
                                        int64_t n, int64_t c, int has_ignore, int64_t ignore_index);
/* reduction (NONE/SUM/MEAN), label_smoothing, z_loss, logit_softcap
   (host/cross_entropy.c). */
culoss_status culoss__check_ce_options(const char *fn, const culoss_cross_entropy_options *o);

/* -------------------------------------------------------------- dispatch */

/* Runs a CUDA launcher with ctx->device current, inside an NVTX range named
   `fn`. In a CPU-only build the launchers are NULL and this reports an
   internal error (a CUDA context cannot exist there). */
typedef culoss_status (*culoss__launcher)(culoss_context *ctx, const void *args);
culoss_status culoss__dispatch_cuda(culoss_context *ctx, const char *fn, culoss__launcher launch,
                                    const void *args);

#ifdef CULOSS_HAVE_CUDA
/* Makes ctx->device current on this thread for the duration of a call;
   *prev receives the device to restore with culoss__device_leave. */
culoss_status culoss__device_enter(const culoss_context *ctx, int *prev);
void culoss__device_leave(const culoss_context *ctx, int prev);
#else
/* CPU-only build: no launchers. */
#define culoss__cuda_cross_entropy NULL
#define culoss__cuda_elementwise NULL
#define culoss__cuda_multi_margin NULL
#define culoss__cuda_embedding NULL
#define culoss__cuda_nce_step NULL
#define culoss__cuda_linear_cross_entropy NULL
#define culoss__cuda_vocab_parallel NULL
#define culoss__cuda_linear_vocab_parallel NULL
#define culoss__cuda_distill NULL
#define culoss__cuda_linear_distill NULL
#endif

/* -------------------------------------------------------- CPU references */
/* Arguments already validated; targets and domains already checked. */
culoss_status culoss__cpu_cross_entropy(const culoss__ce_args *a);
culoss_status culoss__cpu_elementwise(const culoss__ew_args *a);
culoss_status culoss__cpu_multi_margin(const culoss__mm_args *a);
culoss_status culoss__cpu_embedding(const culoss__emb_args *a);
culoss_status culoss__cpu_linear_cross_entropy(const culoss__lce_args *a);
culoss_status culoss__cpu_vocab_parallel(const culoss__vp_args *a);
culoss_status culoss__cpu_linear_vocab_parallel(const culoss__lce_args *a);
culoss_status culoss__cpu_distill(const culoss__distill_args *a);
culoss_status culoss__cpu_linear_distill(const culoss__distill_args *a);

/* Pieces of the CPU cross-entropy reference that linear CE's reuses
   (host/cross_entropy_ref.c). */
/* One row in double: x the (soft-capped) logits, t the class (y == NULL) or
   y the raw probability targets; writes scale * dloss/dx (soft-cap chain
   included) to g and returns the row loss. */
double culoss__cpu_ce_row(const culoss_cross_entropy_options *o, int64_t c, const double *x,
                          int64_t t, const double *y, double wsum, double scale, double *g);
/* The largest non-NaN value of a row (-inf for none); *has_nan says whether
   one was NaN. */
double culoss__cpu_row_max(int64_t c, const double *x, int *has_nan);
/* A row's log-sum-exp and softmax entropy lse - sum_j p_j x_j, in double. */
void culoss__cpu_row_stats(int64_t c, const double *x, double *lse, double *entropy);
/* Row i's of each of lse, entropy that is not NULL: 0 for an ignored row. */
void culoss__cpu_put_row_stats(float *lse, float *entropy, int64_t i, int ignored, int64_t c,
                               const double *x);
/* MEAN's denominator: *normalizer, n (soft), or the sum of target weights. */
double culoss__cpu_ce_denominator(const culoss_cross_entropy_options *o, int soft, int64_t n,
                                  const void *targets, culoss_index_type ttype);
/* Gradient scale of row `row` for the options' reduction. */
double culoss__cpu_ce_scale(const culoss_cross_entropy_options *o, const float *grad_loss,
                            int64_t row, double denom);
/* dst[j] = (accumulate ? dst[j] : 0) + src[j], j < count, rounded once to
   dtype: a gradient summed in double, stored (linear CE, distillation). */
void culoss__cpu_store_sum(void *dst, culoss_dtype dtype, const double *src, int64_t count,
                           int accumulate);
/* W = sum of class weights (c without weights). */
double culoss__cpu_ce_wsum(const culoss_cross_entropy_options *o, int64_t c);

/* Element i of a dtype array as float, and a float stored as element i
   (round to nearest even), on the host (host/status.c). */
float culoss__load_f32(const void *p, culoss_dtype dtype, int64_t i);
void culoss__store_f32(void *p, culoss_dtype dtype, int64_t i, float v);

#ifdef __cplusplus
}
#endif

#endif /* CULOSS_INTERNAL_H */
