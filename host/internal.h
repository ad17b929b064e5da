/*
 * internal.h: the library's private declarations, shared by host/ (C11) and
 * cuda/ (CUDA C++). Nothing here is installed or exported: every symbol uses
 * the culoss__ prefix and hidden visibility.
 */
#ifndef CULOSS_INTERNAL_H
#define CULOSS_INTERNAL_H

#include <stddef.h>
#include <stdint.h>

#include "culoss.h"

#ifdef __cplusplus
extern "C" {
#endif

#if defined(__GNUC__) || defined(__clang__)
#define CULOSS_PRINTF(a, b) __attribute__((format(printf, a, b)))
#else
#define CULOSS_PRINTF(a, b)
#endif

/* Records the thread-local detail text and returns `status`. */
culoss_status culoss__error(culoss_status status, const char *fmt, ...) CULOSS_PRINTF(2, 3);

/* Number of per-block partial sums the CUDA scratch holds: the grid of a
   reducing kernel is capped at this many blocks (rows are then strided), so
   the scratch has a fixed size allocated once per context. */
#define CULOSS_MAX_PARTIALS 4096
/* Blocks of the kernel that sums the weights of the targets (MEAN's D). */
#define CULOSS_MAX_PREP_BLOCKS 256

/* Device-side scratch of a CUDA context (cudaMalloc'd at create). */
typedef struct {
  int error_flag;                               /* deferred TARGET_OUT_OF_RANGE */
  int pad_;
  double prep_denom[CULOSS_MAX_PREP_BLOCKS];    /* partial sums of w_y (MEAN's D) */
  double prep_wsum[CULOSS_MAX_PREP_BLOCKS];     /* partial sums of class_weight (W) */
  double partial_loss[CULOSS_MAX_PARTIALS];     /* per-block loss sums */
} culoss__scratch;

struct culoss_context {
  culoss_backend backend;
  int device;
  void *stream;              /* cudaStream_t */
  culoss__scratch *scratch;  /* device memory (CUDA backend) */
  int *host_flag;            /* pinned host word for reading the flag */
  int sm_count;
  int64_t grid_limit;        /* culoss_set_grid_limit: 0 = CULOSS_MAX_PARTIALS */
  size_t smem_optin;         /* max dynamic shared memory per block */
  void *cublas;              /* cublasHandle_t, created with the context */
  void *cublas_ws;           /* its fixed workspace: nothing allocates during capture */
  struct culoss_context *next_live; /* the live-context list (host/context.c) */
};

/* Arguments of the cross-entropy family, validated by host/cross_entropy.c
   and passed to a backend. */
typedef enum { CULOSS__CE_INDEX = 0, CULOSS__CE_SOFT = 1, CULOSS__NLL = 2 } culoss__ce_mode;

typedef struct {
  culoss__ce_mode mode;
  culoss_cross_entropy_options o;
  int64_t n, c, ld;
  culoss_dtype dtype;
  culoss_index_type ttype;
  const void *x;       /* logits / logprobs */
  const void *targets; /* class indices (INDEX, NLL) */
  const void *probs;   /* soft targets (SOFT) */
  float *loss;
  void *grad;
  const float *grad_loss;
} culoss__ce_args;

/* Elementwise losses: one argument block for all of them. */
typedef enum {
  CULOSS__EW_BCE_LOGITS = 0,
  CULOSS__EW_BCE = 1,
  CULOSS__EW_HINGE = 2,
  CULOSS__EW_MSE = 3,
  CULOSS__EW_L1 = 4,
  CULOSS__EW_HUBER = 5,
  CULOSS__EW_SMOOTH_L1 = 6,
  CULOSS__EW_KL = 7
} culoss__ew_op;

typedef struct {
  culoss__ew_op op;
  culoss_reduction reduction;
  int64_t m;          /* elements */
  int64_t c;          /* row length: pos_weight index is i % c (1 if unused) */
  double divisor;     /* MEAN: m; BATCHMEAN: rows */
  culoss_dtype dtype;
  const void *x;      /* input */
  const void *y;      /* target, same dtype */
  const float *weight;     /* [m] or NULL (BCE) */
  const float *pos_weight; /* [c] or NULL (BCE with logits) */
  float a;            /* margin (hinge), delta (huber), beta (smooth_l1) */
  int flag;           /* squared (hinge), log_target (kl) */
  float *loss;
  void *grad;
  const float *grad_loss;
} culoss__ew_args;

/* Multi-class hinge: rows with class targets. */
typedef struct {
  culoss_multi_margin_options o;
  int64_t n, c, ld;
  culoss_dtype dtype;
  culoss_index_type ttype;
  const void *x;
  const void *targets;
  float *loss;
  void *grad;
  const float *grad_loss;
} culoss__mm_args;

/* Fused linear + cross-entropy. */
typedef struct {
  culoss_cross_entropy_options o;
  int64_t n, d, v;
  culoss_dtype dtype;
  culoss_index_type ttype;
  const void *hidden, *weight, *bias, *targets;
  float *loss;
  void *grad_hidden, *grad_weight, *grad_bias;
  const float *grad_loss;
  void *workspace;
  size_t workspace_bytes;
} culoss__lce_args;

/* The workspace layout of linear CE (host/linear_ce.c): byte offsets of each
   region and the block sizes; the CUDA path and the size query share it. */
typedef struct {
  int64_t rows;       /* rows per block */
  int64_t vslice;     /* vocabulary rows per grad_weight slice (16-bit) */
  size_t off_logits, off_row_loss, off_row_stats, off_bias_acc, off_gw_acc, total;
} culoss__lce_layout;
culoss__lce_layout culoss__lce_plan(int64_t n, int64_t d, int64_t v, culoss_dtype dtype);
culoss_status culoss__cpu_linear_cross_entropy(const culoss__lce_args *a);

/* Bits of culoss__scratch.error_flag, raised by kernels (atomicOr) and
   turned into a status by culoss_synchronize. */
#define CULOSS__FLAG_TARGET 1 /* a class target outside [0, c) */
#define CULOSS__FLAG_DOMAIN 2 /* an input outside its domain (BCE prob, hinge target) */

/* NULL, or not a live context (destroyed, never created): INVALID_VALUE
   naming `fn` (host/context.c). */
culoss_status culoss__check_ctx(const culoss_context *ctx, const char *fn);
/* Shared validation (host/validate.c); each records a message naming `fn`
   and the argument. */
culoss_status culoss__check_dtype(const char *fn, culoss_dtype dtype);
culoss_status culoss__check_index_type(const char *fn, culoss_index_type t);
culoss_status culoss__check_reduction(const char *fn, culoss_reduction r, int allow_batchmean);
/* Class targets in [0, c) unless equal to ignore_index (when has_ignore). */
culoss_status culoss__check_targets_cpu(const char *fn, const void *targets, culoss_index_type t,
                                        int64_t n, int64_t c, int has_ignore,
                                        int64_t ignore_index);
/* reduction (NONE/SUM/MEAN), label_smoothing, z_loss, logit_softcap. */
culoss_status culoss__check_ce_options(const char *fn, const culoss_cross_entropy_options *o);
/* Runs a CUDA launcher with ctx->device current (in a CPU-only build the
   launchers below are NULL and this reports an internal error). */
culoss_status culoss__dispatch_cuda(culoss_context *ctx, const char *fn,
                                    culoss_status (*launch)(culoss_context *, const void *),
                                    const void *args);
/* Reads element i of a class-target array. */
int64_t culoss__target_at(const void *targets, culoss_index_type t, int64_t i);

/* CPU reference (host/cpu_reference.c, host/cpu_elementwise.c). Arguments
   already validated; targets and domains already checked. */
culoss_status culoss__cpu_cross_entropy(const culoss__ce_args *a);
culoss_status culoss__cpu_elementwise(const culoss__ew_args *a);
culoss_status culoss__cpu_multi_margin(const culoss__mm_args *a);

/* Pieces of the CPU cross-entropy reference shared with linear CE. */
/* One row in double: x the (soft-capped) logits, t the class (y == NULL) or
   y the raw probability targets; writes scale * dloss/dx (soft-cap chain
   included) to g and returns the row loss. */
double culoss__cpu_ce_row(const culoss_cross_entropy_options *o, int64_t c, const double *x,
                          int64_t t, const double *y, double wsum, double scale, double *g);
/* MEAN's denominator: *normalizer, n (soft), or the sum of target weights. */
double culoss__cpu_ce_denominator(const culoss_cross_entropy_options *o, int soft, int64_t n,
                                  const void *targets, culoss_index_type ttype);
/* Gradient scale of row `row` for the options' reduction. */
double culoss__cpu_ce_scale(const culoss_cross_entropy_options *o, const float *grad_loss,
                            int64_t row, double denom);
/* W = sum of class weights (c without weights). */
double culoss__cpu_ce_wsum(const culoss_cross_entropy_options *o, int64_t c);

/* Element size of a dtype in bytes. */
size_t culoss__dtype_size(culoss_dtype dtype);

/* Reads element i of a dtype array as float (host). */
float culoss__load_f32(const void *p, culoss_dtype dtype, int64_t i);
/* Writes a float as element i of a dtype array (host, round to nearest even). */
void culoss__store_f32(void *p, culoss_dtype dtype, int64_t i, float v);

#ifdef CULOSS_HAVE_CUDA
/* CUDA backend (cuda/ sources): enqueue on ctx->stream, no synchronisation. */
culoss_status culoss__cuda_cross_entropy(culoss_context *ctx, const void *ce_args);
culoss_status culoss__cuda_elementwise(culoss_context *ctx, const void *ew_args);
culoss_status culoss__cuda_multi_margin(culoss_context *ctx, const void *mm_args);
culoss_status culoss__cuda_linear_cross_entropy(culoss_context *ctx, const void *lce_args);
/* cuBLAS handle lifetime (cuda/linear_ce.cu). */
culoss_status culoss__cublas_create(culoss_context *ctx);
void culoss__cublas_destroy(culoss_context *ctx);
/* Makes ctx->device current on this thread for the duration of a call;
   *prev receives the device to restore with culoss__device_leave. */
culoss_status culoss__device_enter(const culoss_context *ctx, int *prev);
void culoss__device_leave(const culoss_context *ctx, int prev);
/* Maps a cudaError_t (as int) to a status and records "what: cuda text". */
culoss_status culoss__cuda_status(int err, const char *what);
/* One-time per-context setup of kernel attributes (dynamic shared memory). */
culoss_status culoss__cuda_kernels_init(culoss_context *ctx);
#endif

#ifndef CULOSS_HAVE_CUDA
/* CPU-only build: no launchers; the entry points call culoss__dispatch_cuda
   with these and it reports the (unreachable) CUDA context as an error. */
#define culoss__cuda_cross_entropy NULL
#define culoss__cuda_elementwise NULL
#define culoss__cuda_multi_margin NULL
#define culoss__cuda_linear_cross_entropy NULL
#endif

#ifdef __cplusplus
}
#endif

#endif /* CULOSS_INTERNAL_H */
