/*
 * backend.h: what the host front end hands a backend, shared by host/ (C11)
 * and cuda/ (CUDA C++): the context, its device scratch, one argument block
 * per loss family, and the CUDA backend's entry points.
 *
 * Nothing here is installed or exported: every symbol has the culoss__
 * prefix and hidden visibility. Host-only declarations (argument checks, the
 * CPU references) are in host/internal.h.
 */
#ifndef CULOSS_BACKEND_H
#define CULOSS_BACKEND_H

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

/* Element size of a dtype in bytes. */
size_t culoss__dtype_size(culoss_dtype dtype);

/* ------------------------------------------------------------------ context */

/* Per-block partial sums the CUDA scratch holds: a reducing kernel's grid is
   capped at this many blocks (rows are then strided), so the scratch has a
   fixed size, allocated once per context. */
#define CULOSS_MAX_PARTIALS 4096
/* Blocks of the kernel that sums the weights of the targets (MEAN's D). */
#define CULOSS_MAX_PREP_BLOCKS 256

/* Device-side scratch of a CUDA context (cudaMalloc'd at create). */
typedef struct {
  int error_flag; /* deferred errors, CULOSS__FLAG_* bits */
  int pad_;
  double prep_denom[CULOSS_MAX_PREP_BLOCKS]; /* partial sums of w_y (MEAN's D) */
  double prep_wsum[CULOSS_MAX_PREP_BLOCKS];  /* partial sums of class_weight (W) */
  double partial_loss[CULOSS_MAX_PARTIALS];  /* per-block loss sums */
} culoss__scratch;

/* Bits of culoss__scratch.error_flag, raised by kernels (atomicOr) and
   turned into a status by culoss_synchronize. */
#define CULOSS__FLAG_TARGET 1 /* a class target outside [0, c) */
#define CULOSS__FLAG_DOMAIN 2 /* an input outside its domain (BCE prob, hinge target) */
#define CULOSS__FLAG_SLICES 4 /* vocabulary-parallel slices that overlap or leave a gap */

struct culoss_context {
  culoss_backend backend;
  int device;
  void *stream;             /* cudaStream_t */
  culoss__scratch *scratch; /* device memory (CUDA backend) */
  int *host_flag;           /* pinned host word for reading the flag */
  int sm_count;
  int64_t grid_limit; /* culoss_set_grid_limit: 0 = CULOSS_MAX_PARTIALS */
  size_t smem_optin;  /* max dynamic shared memory per block */
  void *cublas;       /* cublasHandle_t, created with the context */
  void *cublas_ws;    /* its fixed workspace: nothing allocates during capture */
  void *stream_event; /* cudaEvent_t: culoss_set_stream orders the new stream after the old */
  /* Tuning knobs, read from the environment once, at culoss_create (README,
     "Tuning"): a call never reads the environment. */
  int ce_tpr;              /* CULOSS_CE_SHAPE: CE threads per row; 0 = chosen by c */
  int ce_cluster;          /* CULOSS_CE_CLUSTER: 1 = split long rows over a cluster (sm_90) */
  int cluster_launch;      /* the device supports thread-block clusters */
  size_t ce_cache_cap;     /* CULOSS_CE_CACHE_BYTES: cap on the row cache; SIZE_MAX = none */
  int64_t lce_block_bytes; /* CULOSS_LINEAR_CE_BLOCK_BYTES: linear CE logits block */
  struct culoss_context *next_live; /* the live-context list (host/context.c) */
};

/* ------------------------------------------------------- argument blocks */
/* Each family's entry points (host/<family>.c) validate their arguments,
   fill one of these and pass it to the CPU reference or the CUDA launcher. */

/* Cross-entropy family (host/cross_entropy.c). */
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
  float *lse, *entropy; /* [n] per-row statistics or NULL (INDEX) */
} culoss__ce_args;

/* Elementwise losses (host/elementwise.c): one block for all of them. */
typedef enum {
  CULOSS__EW_BCE_LOGITS = 0,
  CULOSS__EW_BCE = 1,
  CULOSS__EW_HINGE = 2,
  CULOSS__EW_MSE = 3,
  CULOSS__EW_L1 = 4,
  CULOSS__EW_HUBER = 5,
  CULOSS__EW_SMOOTH_L1 = 6,
  CULOSS__EW_KL = 7,
  CULOSS__EW_HINGE_EMBEDDING = 8,
  CULOSS__EW_SOFT_MARGIN = 9,
  CULOSS__EW_POISSON_NLL = 10,
  CULOSS__EW_SIGMOID_FOCAL = 11,
  CULOSS__EW_MARGIN_RANKING = 12, /* x2: input2 */
  CULOSS__EW_GAUSSIAN_NLL = 13    /* x2: var */
} culoss__ew_op;

typedef struct {
  culoss__ew_op op;
  culoss_reduction reduction;
  int64_t m;      /* elements */
  int64_t c;      /* row length: pos_weight index is i % c (1 if unused) */
  double divisor; /* MEAN: m; BATCHMEAN: rows */
  culoss_dtype dtype;
  const void *x;           /* input */
  const void *y;           /* target, same dtype */
  const float *weight;     /* [m] or NULL (BCE) */
  const float *pos_weight; /* [c] or NULL (BCE with logits) */
  const void *x2;          /* the second differentiable input (ops 12, 13), same dtype */
  float a;  /* margin (hinge, hinge embedding, margin ranking), delta (huber), beta (smooth_l1),
              eps (poisson, gaussian), alpha (focal) */
  float b;  /* gamma (focal) */
  int flag; /* squared (hinge), log_target (kl), log_input | 2 full (poisson), full (gaussian) */
  float *loss;
  void *grad;
  void *grad2; /* x2's gradient or NULL */
  const float *grad_loss;
} culoss__ew_args;

/* Multi-class hinge (host/multi_margin.c): rows with class targets; and
   the multi-label margin (multilabel: targets [n, c], contiguous, each row's
   list of classes ended by the first -1; only o.reduction is used). */
typedef struct {
  int multilabel;
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

/* Embedding losses (host/embedding.c): rows of pairs and triplets. */
typedef enum {
  CULOSS__EMB_COSINE = 0,
  CULOSS__EMB_TRIPLET = 1,
  CULOSS__EMB_ML_SOFT = 2 /* multi-label soft margin: x[0] input, x[1] targets */
} culoss__emb_op;

typedef struct {
  culoss__emb_op op;
  culoss_reduction reduction;
  int64_t n, d, ld;
  culoss_dtype dtype;
  const void *x[3];    /* cosine: input1, input2; triplet: anchor, positive, negative */
  const float *target; /* cosine: [n] */
  const float *weight; /* multi-label soft margin: NULL, [d], or [n, ld] (weight_per_row) */
  int weight_per_row;
  float margin, p, eps;
  int swap;
  float *loss;
  void *grad[3];
  const float *grad_loss;
} culoss__emb_args;

/* InfoNCE (host/info_nce.c): the small steps around its two linear CE
   calls, one argument block for all. */
typedef enum {
  CULOSS__NCE_PREP = 0,  /* targets[i] = i, row_g[i] = the row's gradient scale; checks t */
  CULOSS__NCE_SCALE = 1, /* out = x / t (out may be x), n x d of dtype */
  CULOSS__NCE_AXPY = 2,  /* out += x / t */
  CULOSS__NCE_FINISH = 3 /* loss and grad_temperature from the rows' statistics */
} culoss__nce_step;

typedef struct {
  culoss__nce_step step;
  int64_t n, d;
  culoss_dtype dtype;
  culoss_reduction reduction;
  int symmetric;
  const float *temperature;       /* NULL = 1 */
  int64_t *targets;               /* PREP */
  float *row_g;                   /* PREP writes, FINISH reads: [n] */
  const float *grad_loss;         /* PREP */
  const void *x;                  /* SCALE, AXPY */
  void *out;                      /* SCALE, AXPY */
  const float *rows;              /* FINISH: [dirs][3][n]: loss, lse, entropy per direction */
  float *loss, *grad_temperature; /* FINISH */
} culoss__nce_args;

/* Fused linear + cross-entropy (host/linear_ce.c). */
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
  culoss_dtype gw_dtype;           /* grad_weight and grad_bias: dtype or CULOSS_F32 */
  int accumulate;                  /* add into grad_weight / grad_bias */
  float *lse, *entropy;            /* [n] or NULL */
  const culoss_vocab_parallel *vp; /* vocabulary-parallel: weight holds rows v_begin.. */
} culoss__lce_args;

/* Vocabulary-parallel cross-entropy (host/vocab_parallel.c): one phase.
   STATS writes this rank's n + 1 records to `stats`; FINISH merges the
   ranks' records in `gathered` (rank-major, n + 1 each) and writes loss and
   gradient. A record is 8 floats: for row i, {m, s, sx, sy, x_t, w_t, owned,
   u} of this rank's slice (m its maximum, s = sum e^(x - m) without the
   top's 1 (culoss__lse_state: log1p keeps confident rows), sx/sy the
   smoothing sums of culoss__sx_rebase, x_t and w_t the target's logit and
   weight where this rank owns it, owned 1 there, u the entropy sum of
   culoss__ent_rebase); record n is culoss__vp_slice_record's: the slice's
   class-weight sum, v_begin and width. */
typedef enum { CULOSS__VP_STATS = 0, CULOSS__VP_FINISH = 1 } culoss__vp_phase;
typedef struct {
  culoss__vp_phase phase;
  culoss_cross_entropy_options o;
  const culoss_vocab_parallel *vp;
  int64_t n, c_local, ld;
  culoss_dtype dtype;
  culoss_index_type ttype;
  const void *x, *targets;
  void *stats;          /* STATS: [n + 1] records */
  const void *gathered; /* FINISH: [ranks][n + 1] records */
  float *loss;
  void *grad;
  const float *grad_loss;
  float *lse, *entropy; /* FINISH: [n] per-row statistics or NULL */
} culoss__vp_args;

/* The workspace layout of linear CE: byte offsets of each region and the
   block sizes, for a logits block of `block_bytes` (the context's
   lce_block_bytes); slices: the 16-bit grad_weight is built by vocabulary
   slices (pass B), which need an fp32 slice and the saved row statistics.
   The size query and the CUDA path share it. */
typedef struct {
  int64_t rows;   /* rows per block */
  int64_t vslice; /* vocabulary rows per grad_weight slice (16-bit) */
  size_t off_logits, off_row_loss, off_row_stats, off_bias_acc, off_gw_acc, total;
} culoss__lce_layout;
culoss__lce_layout culoss__lce_plan(int64_t n, int64_t d, int64_t v, culoss_dtype dtype,
                                    int64_t block_bytes, int slices);
/* Vocabulary-parallel linear CE: the plan without slices, then this rank's
   records at off_records and everyone's at off_gathered. */
typedef struct {
  culoss__lce_layout lce;
  size_t off_records, off_gathered, total;
} culoss__lvp_layout;
culoss__lvp_layout culoss__lvp_plan(int64_t n, int64_t d, int64_t v_local, culoss_dtype dtype,
                                    int64_t block_bytes, int ranks, int slices);

/* Distillation (host/distill.c): culoss_distill, and culoss_linear_distill
   (the linear fields set). */
typedef struct {
  culoss_distill_options o;
  int64_t n, v, ld_s, ld_t;
  culoss_dtype dtype;
  culoss_index_type ttype;
  const void *s, *t, *labels; /* labels NULL: every row kept */
  float *loss;
  void *grad; /* [n, ld_s] or NULL */
  const float *grad_loss;
  /* culoss_linear_distill */
  int64_t d_s, d_t;
  const void *hs, *ws, *bs, *ht, *wt, *bt;
  void *grad_hidden, *grad_weight, *grad_bias;
  culoss_dtype gw_dtype; /* grad_weight and grad_bias: dtype or CULOSS_F32 */
  int accumulate;
  void *workspace;
  size_t workspace_bytes;
} culoss__distill_args;

/* The workspace layout of culoss_linear_distill (host/distill.c's plan,
   shared by the size query and the CUDA path): the student and teacher
   logits blocks of `rows` rows, the per-row losses, the fp32 grad_bias
   accumulator and (gw_acc) an fp32 [v, d_s] grad_weight accumulator. */
typedef struct {
  int64_t rows;
  size_t off_s, off_t, off_row_loss, off_bias_acc, off_gw_acc, total;
} culoss__ld_layout;
culoss__ld_layout culoss__ld_plan(int64_t n, int64_t d_s, int64_t v, culoss_dtype dtype,
                                  int64_t block_bytes, int gw_acc);

/* ---------------------------------------------------- the CUDA backend */
#ifdef CULOSS_HAVE_CUDA
/* Launchers (cuda/<family>.cu): enqueue on ctx->stream, never synchronise.
   Called through culoss__dispatch_cuda, with ctx->device current. */
culoss_status culoss__cuda_cross_entropy(culoss_context *ctx, const void *ce_args);
culoss_status culoss__cuda_elementwise(culoss_context *ctx, const void *ew_args);
culoss_status culoss__cuda_multi_margin(culoss_context *ctx, const void *mm_args);
culoss_status culoss__cuda_embedding(culoss_context *ctx, const void *emb_args);
culoss_status culoss__cuda_nce_step(culoss_context *ctx, const void *nce_args);
culoss_status culoss__cuda_linear_cross_entropy(culoss_context *ctx, const void *lce_args);
culoss_status culoss__cuda_vocab_parallel(culoss_context *ctx, const void *vp_args);
culoss_status culoss__cuda_linear_vocab_parallel(culoss_context *ctx, const void *lce_args);
culoss_status culoss__cuda_distill(culoss_context *ctx, const void *distill_args);
culoss_status culoss__cuda_linear_distill(culoss_context *ctx, const void *distill_args);
/* Context-wide set-up and release (cuda/context.cu): kernel attributes and
   the cuBLAS handle with its fixed workspace. Release is safe after a
   partial set-up. */
culoss_status culoss__cuda_context_init(culoss_context *ctx);
void culoss__cuda_context_release(culoss_context *ctx);
/* Map a cudaError_t / cublasStatus_t (as int) to a status and record
   "what failed: the library's text". */
culoss_status culoss__cuda_status(int err, const char *what);
culoss_status culoss__cublas_status(int st, const char *what);
#endif

#ifdef __cplusplus
}
#endif

#endif /* CULOSS_BACKEND_H */
