/*
 * culoss: loss functions for deep-learning training, with CUDA kernels and a
 * CPU reference path.
 *
 * One public header, pure C11, usable from C and C++. It does not include
 * cuda_runtime.h: streams are passed as `void *` (a cudaStream_t).
 *
 * ABI promise: status numbers, enum values, and the size and field offsets of
 * every public struct never change once published (host/abi.c pins them at
 * compile time). An option struct never grows either: the library copies a
 * caller's struct whole, so a field appended later would be read past the
 * end of an older caller's struct. New options arrive in a new struct passed
 * to a new entry point (an `_ex` variant); the old entry point keeps its
 * meaning. Initialise every options struct with its `*_options_init`.
 *
 * Conventions (every function):
 *   - returns a culoss_status; CULOSS_OK (0) is success. On failure,
 *     culoss_last_error() gives a thread-local, human-readable detail naming
 *     the bad argument or the failing CUDA call.
 *   - never prints, never calls exit/abort, never asserts on user input. On an
 *     argument error nothing is written to any output.
 *   - sizes and indices are int64_t; every pointer is in the context's memory
 *     space (device memory for the CUDA backend, host memory for the CPU
 *     backend) unless its comment says "host".
 *   - the loss output is required, except when it has no elements (n = 0
 *     with reduction NONE), where it may be NULL.
 *
 * Stream semantics (CUDA backend): every loss call is enqueued on the
 * context's stream (culoss_set_stream; default: the legacy default stream)
 * and returns without waiting. Loss calls never synchronise, never allocate
 * and never copy to the host, so they are safe to record inside CUDA-graph
 * stream capture. Calls on one context use a small per-context scratch
 * buffer, in stream order: do not run two loss calls of the same context on
 * two streams at once (use one context per concurrent stream); moving a
 * context to another stream with culoss_set_stream is ordered for you.
 *
 * Threads: culoss_last_error() is per thread; a context may be used by one
 * thread at a time (different contexts are independent). The CPU backend
 * computes synchronously inside each call.
 *
 * Determinism: the same inputs give bitwise the same outputs, run after run
 * (reductions use fixed-order block reductions; no floating-point atomics).
 */
#ifndef CULOSS_H
#define CULOSS_H

#include <stddef.h>
#include <stdint.h>

#define CULOSS_VERSION_MAJOR 0
#define CULOSS_VERSION_MINOR 1
#define CULOSS_VERSION_PATCH 0

#if defined(_WIN32)
#define CULOSS_API
#elif defined(__GNUC__) || defined(__clang__)
#define CULOSS_API __attribute__((visibility("default")))
#else
#define CULOSS_API
#endif

#ifdef __cplusplus
extern "C" {
#endif

/* ------------------------------------------------------------------------ */
/* Status, errors, version                                                  */
/* ------------------------------------------------------------------------ */

typedef enum {
  CULOSS_OK = 0,
  CULOSS_ERROR_INVALID_VALUE = 1,       /* NULL pointer, negative size, bad enum, bad option */
  CULOSS_ERROR_TARGET_OUT_OF_RANGE = 2, /* a non-ignored class target outside [0, c) */
  CULOSS_ERROR_NOT_SUPPORTED = 3,       /* valid request this backend/build cannot do */
  CULOSS_ERROR_NO_DEVICE = 4,           /* no usable CUDA device (or built without CUDA) */
  CULOSS_ERROR_OUT_OF_MEMORY = 5,
  CULOSS_ERROR_CUDA = 6, /* a CUDA runtime call failed; see culoss_last_error() */
  CULOSS_ERROR_CUBLAS = 7,
  CULOSS_ERROR_INTERNAL = 8
} culoss_status;

/* Static string naming a status ("CULOSS_OK", ...); unknown values give
   "CULOSS_ERROR_UNKNOWN". Never NULL. */
CULOSS_API const char *culoss_status_string(culoss_status status);

/* Detail of the last failure on the calling thread (thread-local storage,
   valid until the next failing culoss call on this thread). "" if no call on
   this thread has failed. Never NULL. */
CULOSS_API const char *culoss_last_error(void);

/* MAJOR*10000 + MINOR*100 + PATCH of the library actually linked. */
CULOSS_API int culoss_version(void);

/* ------------------------------------------------------------------------ */
/* Context and buffers                                                      */
/* ------------------------------------------------------------------------ */

typedef struct culoss_context culoss_context; /* opaque */

typedef enum { CULOSS_BACKEND_CPU = 0, CULOSS_BACKEND_CUDA = 1 } culoss_backend;

/* Creates a context. `ctx` (host) receives it; on failure *ctx is set to NULL.
   CPU backend: `device` is ignored. CUDA backend: `device` is the CUDA
   device ordinal; allocates a small scratch buffer on that device and uses
   the legacy default stream until culoss_set_stream.
   Reads the tuning variables of the environment (README, "Tuning") once,
   here, for either backend.
   Returns CULOSS_ERROR_NO_DEVICE when no usable GPU exists (or the library was
   built without CUDA), CULOSS_ERROR_INVALID_VALUE for a bad backend, a
   device ordinal out of range, or a tuning variable set to a value it does
   not take (before any device is touched). */
CULOSS_API culoss_status culoss_create(culoss_context **ctx, culoss_backend backend, int device);

/* Destroys a context and its scratch memory (not buffers from culoss_malloc:
   free those first). Waits for the context's stream. NULL is fine. Every
   call checks its context against the live ones, so using a destroyed
   context (or destroying it twice) returns CULOSS_ERROR_INVALID_VALUE. */
CULOSS_API culoss_status culoss_destroy(culoss_context *ctx);

/* CUDA backend: subsequent calls are enqueued on `cuda_stream` (a
   cudaStream_t; NULL = legacy default stream). The caller keeps ownership of
   the stream. Switching is stream-ordered: the new stream waits (an event
   recorded on the old one, no host wait) for the work already enqueued on
   the old, since both use the context's scratch; so a caller may move a
   context between streams freely, call after call. What it may not do is
   run one context's calls on two streams at once (use one context per
   concurrent stream). While either stream is being captured into a graph
   the switch adds no dependency (it would pull the other stream into the
   capture): there the caller orders the streams itself, and a graph that
   holds a context's calls must not run concurrently with other calls on
   that context. Destroy the old stream only after switching away from it
   (the switch records an event on it). CPU backend: NULL is accepted
   (no-op); anything else returns CULOSS_ERROR_NOT_SUPPORTED. */
CULOSS_API culoss_status culoss_set_stream(culoss_context *ctx, void *cuda_stream);

/* Waits for all work enqueued on the context's stream, then reports deferred
   errors: CULOSS_ERROR_TARGET_OUT_OF_RANGE if a kernel met a non-ignored
   target outside [0, c) since the last synchronize (the flag is cleared), or
   CULOSS_ERROR_CUDA for an asynchronous CUDA failure. CPU backend: CULOSS_OK. */
CULOSS_API culoss_status culoss_synchronize(culoss_context *ctx);

/* Caps the grid of the CUDA backend's grid-stride kernels at `max_blocks`
   blocks (0 = the default, 4096); each block then walks more rows or
   elements. Results do not depend on it beyond the order of summation (at
   fp32 rounding level; bitwise stable for a fixed limit). For tests (small
   sizes that still stride) and tuning. max_blocks outside [0, 4096] is
   CULOSS_ERROR_INVALID_VALUE; the CPU backend accepts and ignores it. */
CULOSS_API culoss_status culoss_set_grid_limit(culoss_context *ctx, int64_t max_blocks);
/* Allocates `bytes` in the context's memory space (cudaMalloc on the CUDA
   backend; 64-byte aligned host memory on the CPU backend). `ptr` is host.
   bytes == 0 gives *ptr = NULL and CULOSS_OK. */
CULOSS_API culoss_status culoss_malloc(culoss_context *ctx, void **ptr, size_t bytes);

/* Frees memory from culoss_malloc. NULL is fine. */
CULOSS_API culoss_status culoss_free(culoss_context *ctx, void *ptr);

/* Copies `bytes` from host memory `host_src` to `dst` (context memory).
   Ordered on the context's stream and complete when the call returns. */
CULOSS_API culoss_status culoss_upload(culoss_context *ctx, void *dst, const void *host_src,
                                       size_t bytes);

/* Copies `bytes` from `src` (context memory) to host memory `host_dst`, after
   all work enqueued on the context's stream; complete when the call returns. */
CULOSS_API culoss_status culoss_download(culoss_context *ctx, void *host_dst, const void *src,
                                         size_t bytes);

/* ------------------------------------------------------------------------ */
/* Types                                                                    */
/* ------------------------------------------------------------------------ */

/* Element type of inputs and gradients. F16 is IEEE binary16, BF16 bfloat16,
   both passed as 16-bit storage (e.g. uint16_t arrays on the CPU backend). */
typedef enum {
  CULOSS_DTYPE_INPUT = -1, /* not an element type: "the input's", where an option takes a dtype */
  CULOSS_F32 = 0,
  CULOSS_F16 = 1,
  CULOSS_BF16 = 2
} culoss_dtype;

/* Element type of class-index targets. */
typedef enum { CULOSS_I32 = 0, CULOSS_I64 = 1 } culoss_index_type;

typedef enum {
  CULOSS_REDUCTION_NONE = 0,     /* loss[i] per row (or element) */
  CULOSS_REDUCTION_SUM = 1,      /* loss[0] = sum */
  CULOSS_REDUCTION_MEAN = 2,     /* loss[0] = sum / denominator (per loss, below) */
  CULOSS_REDUCTION_BATCHMEAN = 3 /* KL divergence only */
} culoss_reduction;

/* ------------------------------------------------------------------------ */
/* Common shape of loss calls                                               */
/* ------------------------------------------------------------------------ */
/*
 * Inputs, then outputs:
 *   loss       float, required: [n] for REDUCTION_NONE, [1] otherwise. Losses
 *              are fp32 whatever the input dtype; math accumulates in fp32 or
 *              better.
 *   grad_*     optional (NULL = do not compute), in the input's dtype. When
 *              requested, forward and backward run in one fused pass. It may
 *              alias its input exactly (in-place gradient); partial overlap is
 *              undefined.
 *   grad_loss  optional upstream gradient, float: [n] for NONE, [1]
 *              otherwise, in context memory (device memory on CUDA, so the
 *              call stays capture-safe). NULL means 1.
 */

/* ------------------------------------------------------------------------ */
/* Cross-entropy family                                                     */
/* ------------------------------------------------------------------------ */

typedef struct {
  culoss_reduction reduction; /* default MEAN; NONE, SUM or MEAN */
  int64_t ignore_index;       /* default -100; rows with this target have loss
                                 0, gradient 0 and no weight in MEAN. May be
                                 any value, including a valid class. */
  float label_smoothing;      /* default 0; must be in [0, 1] (NaN and values
                                 outside give CULOSS_ERROR_INVALID_VALUE) */
  const float *class_weight;  /* default NULL; [c] in context memory */
  float z_loss;               /* default 0; >= 0, finite: adds z_loss * lse^2
                                 per non-ignored row (unweighted by
                                 class_weight; divided by the same MEAN
                                 denominator as the rest of the row's loss) */
  float logit_softcap;        /* default 0 = off; > 0, finite: x -> cap *
                                 tanh(x / cap) before the softmax; the
                                 gradient includes the tanh derivative */
  const float *normalizer;    /* default NULL; [1] in context memory: if set,
                                 MEAN divides by *normalizer instead of the
                                 weight sum (e.g. the global token count for
                                 gradient accumulation / data parallel) */
} culoss_cross_entropy_options;

/* Sets PyTorch's defaults (listed above). `o` is host memory. */
CULOSS_API void culoss_cross_entropy_options_init(culoss_cross_entropy_options *o);

/* Softmax cross-entropy with class-index targets (torch.nn.functional.cross_entropy).
 *
 *   logits   [n, c] row-major, row stride ld >= c elements, dtype `dtype`
 *   targets  [n] class indices of type `ttype`
 *   loss     [n] (NONE) or [1]
 *   grad_logits  NULL or [n, c] with the same row stride ld (elements in
 *                [c, ld) of each row are not touched); may alias logits.
 *
 * Per row, with p = softmax(x), lse = logsumexp(x), eps = label_smoothing,
 * w = class_weight (all ones when NULL), W = sum_c w_c, y = target:
 *   l = (1-eps) w_y (lse - x_y) + (eps/c) (W lse - sum_c w_c x_c) + z_loss lse^2
 * MEAN divides by D = sum of w_y over non-ignored rows (or *normalizer).
 * D == 0 gives NaN for MEAN and a zero gradient: an all-ignored batch, n == 0,
 * or every present target on a zero-weight class (even where label smoothing
 * made the sum positive). SUM gives 0 for an all-ignored batch. PyTorch 2.15
 * gives a NaN gradient when every present target has weight 0; culoss keeps
 * it zero, on purpose (one such batch would otherwise poison every
 * parameter).
 * Accuracy: every term is formed from the row maximum m and s = sum exp(x -
 * m): p = exp(x - m) / s and lse - x_j = (m - x_j) + log s, a sum of
 * non-negative terms, so tied logits share the probability at any finite
 * magnitude and smoothing / soft-target losses do not cancel at large common
 * offsets (docs/semantics.md, section 0). s is kept as 1 + s', s' the sum
 * over every class but the (first) maximum, so log s = log1p(s') and the
 * maximum's p - 1 = -s' / (1 + s'): a confident row (target logit d ahead)
 * keeps fp32 accuracy of its loss and gradient at any d, where log(1 + s')
 * in fp32 is off by 6e-2 relative at d = 16 (PyTorch's fp32 error there).
 *
 * A non-ignored target outside [0, c): the CPU backend returns
 * CULOSS_ERROR_TARGET_OUT_OF_RANGE and writes nothing; the CUDA backend writes
 * NaN for that row's loss (so a reduced loss is NaN), a zero gradient row, and
 * the next culoss_synchronize returns CULOSS_ERROR_TARGET_OUT_OF_RANGE.
 * Differences from PyTorch, deliberate: ignored rows get a zero gradient even
 * if their logits hold NaN (PyTorch propagates the NaN into that row's
 * gradient); label_smoothing < 0 is an error (PyTorch treats it as 0). */
CULOSS_API culoss_status culoss_cross_entropy(culoss_context *ctx,
                                              const culoss_cross_entropy_options *o, int64_t n,
                                              int64_t c, culoss_dtype dtype, const void *logits,
                                              int64_t ld, culoss_index_type ttype,
                                              const void *targets, float *loss, void *grad_logits,
                                              const float *grad_loss);

/* Per-row statistics culoss_cross_entropy_ex writes beside the loss, from
   the same pass (what RL trainers keep: the log-sum-exp, hence each token's
   log-probability x_y - lse, and the softmax entropy). */
typedef struct {
  float *lse;     /* default NULL; [n]: the row's log-sum-exp of the (soft-capped) logits */
  float *entropy; /* default NULL; [n]: the entropy of its softmax, lse - sum_j p_j x_j */
} culoss_ce_row_outputs;
/* Sets both to NULL. `r` is host memory. */
CULOSS_API void culoss_ce_row_outputs_init(culoss_ce_row_outputs *r);

/* culoss_cross_entropy, plus the per-row statistics of `r` (NULL, or NULL
   fields: none). Rows whose target is ignore_index get 0; rows whose
   target is out of range get NaN (CUDA backend; the CPU backend returns the
   error before writing anything). */
CULOSS_API culoss_status culoss_cross_entropy_ex(culoss_context *ctx,
                                                 const culoss_cross_entropy_options *o,
                                                 const culoss_ce_row_outputs *r, int64_t n,
                                                 int64_t c, culoss_dtype dtype, const void *logits,
                                                 int64_t ld, culoss_index_type ttype,
                                                 const void *targets, float *loss,
                                                 void *grad_logits, const float *grad_loss);

/* Softmax cross-entropy with probability targets.
 *   target_probs  [n, c] of dtype `dtype`, same row stride ld as logits.
 * With y' = (1-eps) y + eps/c:  l = sum_c w_c y'_c (lse - x_c) + z_loss lse^2.
 * A term with y'_c == 0 contributes 0 even when x_c = -inf (PyTorch gives NaN
 * there: 0 * -inf). MEAN divides by n (not by a weight sum), as PyTorch does;
 * *normalizer replaces n when set. ignore_index is not used. */
CULOSS_API culoss_status culoss_cross_entropy_soft(culoss_context *ctx,
                                                   const culoss_cross_entropy_options *o, int64_t n,
                                                   int64_t c, culoss_dtype dtype,
                                                   const void *logits, int64_t ld,
                                                   const void *target_probs, float *loss,
                                                   void *grad_logits, const float *grad_loss);

/* Negative log-likelihood over log-probabilities (torch.nn.functional.nll_loss):
 *   l = -w_y * logprobs[y]; the gradient is zero except -w_y * g / D at the
 *   target column. Same options, targets, reductions and errors as
 *   culoss_cross_entropy, except label_smoothing, z_loss and logit_softcap,
 *   which must be 0 (else CULOSS_ERROR_INVALID_VALUE). */
CULOSS_API culoss_status culoss_nll(culoss_context *ctx, const culoss_cross_entropy_options *o,
                                    int64_t n, int64_t c, culoss_dtype dtype, const void *logprobs,
                                    int64_t ld, culoss_index_type ttype, const void *targets,
                                    float *loss, void *grad_logprobs, const float *grad_loss);

/* ------------------------------------------------------------------------ */
/* Elementwise and margin losses                                            */
/* ------------------------------------------------------------------------ */
/*
 * Shared rules: inputs and targets of one dtype, contiguous; loss is fp32 [m]
 * for REDUCTION_NONE (m = number of elements) or [1]; SUM sums, MEAN divides
 * by m (0/0 = NaN for m == 0, SUM gives 0); BATCHMEAN is only for KL
 * divergence. grad_* may alias its input. Every option struct is set to
 * PyTorch's defaults by its *_options_init; a NULL options pointer means
 * those defaults.
 *
 * Domain errors found in the data (a BCE probability outside [0, 1], a hinge
 * target other than +-1, a multi-margin target outside [0, c)) are returned
 * by the CPU backend from the call, before anything is written; the CUDA
 * backend writes NaN loss and zero gradient for those elements and reports
 * the error at the next culoss_synchronize (CULOSS_ERROR_INVALID_VALUE for a
 * domain error, CULOSS_ERROR_TARGET_OUT_OF_RANGE for a class target).
 */

typedef struct {
  culoss_reduction reduction; /* default MEAN */
  const float *weight;        /* default NULL; [n*c] elementwise weight, context memory */
  const float *pos_weight;    /* default NULL; [c], broadcast over rows; must be
                                 NULL for culoss_bce */
} culoss_bce_options;
CULOSS_API void culoss_bce_options_init(culoss_bce_options *o);

/* Binary cross-entropy on logits, [n, c] contiguous (m = n*c elements):
 *   l = w [(1 - y) x - (1 + (pw - 1) y) log sigmoid(x)]
 * computed in the overflow-free form (finite for |x| = 1000; an infinite
 * logit gives a NaN loss and a finite gradient, as in PyTorch). Targets are
 * any floats (soft labels in [0, 1] intended).
 *   grad = g w [(1 + (pw - 1) y) sigmoid(x) - pw y]  (/ m for MEAN) */
CULOSS_API culoss_status culoss_bce_with_logits(culoss_context *ctx, const culoss_bce_options *o,
                                                int64_t n, int64_t c, culoss_dtype dtype,
                                                const void *logits, const void *targets,
                                                float *loss, void *grad_logits,
                                                const float *grad_loss);

/* Binary cross-entropy on probabilities x in [0, 1] and targets y in [0, 1]:
 *   l = -w [y max(log x, -100) + (1 - y) max(log(1 - x), -100)]
 *   grad = g w (x - y) / max(x (1 - x), 1e-12)
 * x or y outside [0, 1] (or NaN) is a domain error (see above), as
 * PyTorch 2.15 raises for both. */
CULOSS_API culoss_status culoss_bce(culoss_context *ctx, const culoss_bce_options *o, int64_t n,
                                    int64_t c, culoss_dtype dtype, const void *probs,
                                    const void *targets, float *loss, void *grad_probs,
                                    const float *grad_loss);

typedef struct {
  culoss_reduction reduction; /* default MEAN */
  float margin;               /* default 1; finite */
  int squared;                /* default 0; 1 = squared hinge */
} culoss_hinge_options;
CULOSS_API void culoss_hinge_options_init(culoss_hinge_options *o);

/* Binary hinge over n scores with targets y in {-1, +1} (same dtype):
 *   l = max(0, margin - y f)          grad = -y where margin - y f > 0, else 0
 *   squared: l = max(0, margin - y f)^2, grad = -2 y max(0, margin - y f)
 * The subgradient at the kink is 0: PyTorch 2.15's clamp_min (and
 * F.margin_ranking_loss(f, 0, y)) give 0 at equality. A NaN score gives a NaN
 * loss (so SUM and MEAN are NaN) and a zero gradient, as clamp_min does. Any
 * target other than +-1 is a domain error. */
CULOSS_API culoss_status culoss_hinge(culoss_context *ctx, const culoss_hinge_options *o, int64_t n,
                                      culoss_dtype dtype, const void *scores, const void *targets,
                                      float *loss, void *grad_scores, const float *grad_loss);

typedef struct {
  culoss_reduction reduction; /* default MEAN */
  int p;                      /* default 1; 1 or 2 */
  float margin;               /* default 1; finite */
  const float *class_weight;  /* default NULL; [c], context memory */
} culoss_multi_margin_options;
CULOSS_API void culoss_multi_margin_options_init(culoss_multi_margin_options *o);

/* Multi-class hinge (torch.nn.functional.multi_margin_loss) over rows of
 * scores [n, c] with row stride ld >= c and class targets [n]:
 *   l_i = (1/c) sum_{j != y, z_j > 0} w_y z_j^p,  z_j = margin - x_y + x_j
 * (w_y: the target class's weight). MEAN divides by n. The gradient (same
 * row stride, may alias scores) is h_j = g w_y (p == 1 ? 1 : 2 z_j) / c at
 * each j with z_j > 0 and -sum_j h_j at the target. Targets outside [0, c)
 * behave as in culoss_cross_entropy (no ignore_index here). */
CULOSS_API culoss_status culoss_multi_margin(culoss_context *ctx,
                                             const culoss_multi_margin_options *o, int64_t n,
                                             int64_t c, culoss_dtype dtype, const void *scores,
                                             int64_t ld, culoss_index_type ttype,
                                             const void *targets, float *loss, void *grad_scores,
                                             const float *grad_loss);

typedef struct {
  culoss_reduction reduction; /* default MEAN (over rows) */
} culoss_multilabel_margin_options;
CULOSS_API void culoss_multilabel_margin_options_init(culoss_multilabel_margin_options *o);

/* Multi-label margin (torch.nn.functional.multilabel_margin_loss) over rows
 * of scores [n, c] (row stride ld >= c) with targets [n, c] (contiguous,
 * ttype): row i's classes are its targets up to the first -1, T_i (a class
 * listed twice counts twice, as PyTorch); every target entry must be in
 * [-1, c), as PyTorch checks:
 *   l_i = (1/c) sum_{t in T_i} sum_{j not in T_i} max(0, 1 - x_t + x_j),
 *   gradient g/c at j per active pair, -g/c at t per active pair (0 at the
 *   kink; a pair with a NaN score adds nothing, PyTorch's z > 0 test).
 *   MEAN divides by n. An entry outside [-1, c) behaves as an
 *   out-of-range class target of culoss_multi_margin (CPU:
 *   TARGET_OUT_OF_RANGE before writing; CUDA: NaN loss and zero gradient
 *   for the row, deferred). The CUDA kernel takes a block per row with the
 *   row's target flags and scores in shared memory: c is limited by the
 *   device's shared memory per block (about 19000 classes on an H100;
 *   INVALID_VALUE above). O(|T_i| c) work per row. */
CULOSS_API culoss_status culoss_multilabel_margin(
    culoss_context *ctx, const culoss_multilabel_margin_options *o, int64_t n, int64_t c,
    culoss_dtype dtype, const void *scores, int64_t ld, culoss_index_type ttype,
    const void *targets, float *loss, void *grad_scores, const float *grad_loss);

typedef struct {
  culoss_reduction reduction; /* default MEAN */
  float delta;                /* huber only, default 1; > 0 and finite */
  float beta;                 /* smooth_l1 only, default 1; >= 0 and finite */
} culoss_regression_options;
CULOSS_API void culoss_regression_options_init(culoss_regression_options *o);

/* Regression losses over n elements, r = input - target:
 *   mse:       r^2                                  grad 2 r
 *   l1:        |r|                                  grad sign(r), 0 at r == 0 and
 *                                                   where r is NaN (torch's sign)
 *   huber:     r^2/2 if |r| < delta else delta (|r| - delta/2)
 *                                                   grad clamp(r, -delta, delta)
 *   smooth_l1: r^2/(2 beta) if |r| < beta else |r| - beta/2
 *                                                   grad r/beta or sign(r);
 *              beta == 0 is exactly l1 (gradient 0 at r == 0 included).
 * Gradients are times g (and / n for MEAN). */
CULOSS_API culoss_status culoss_mse(culoss_context *ctx, const culoss_regression_options *o,
                                    int64_t n, culoss_dtype dtype, const void *input,
                                    const void *target, float *loss, void *grad_input,
                                    const float *grad_loss);
CULOSS_API culoss_status culoss_l1(culoss_context *ctx, const culoss_regression_options *o,
                                   int64_t n, culoss_dtype dtype, const void *input,
                                   const void *target, float *loss, void *grad_input,
                                   const float *grad_loss);
CULOSS_API culoss_status culoss_huber(culoss_context *ctx, const culoss_regression_options *o,
                                      int64_t n, culoss_dtype dtype, const void *input,
                                      const void *target, float *loss, void *grad_input,
                                      const float *grad_loss);
CULOSS_API culoss_status culoss_smooth_l1(culoss_context *ctx, const culoss_regression_options *o,
                                          int64_t n, culoss_dtype dtype, const void *input,
                                          const void *target, float *loss, void *grad_input,
                                          const float *grad_loss);

typedef struct {
  culoss_reduction reduction; /* default MEAN (over n*c; PyTorch warns it is not
                                 the true KL divergence: BATCHMEAN divides by n) */
  int log_target;             /* default 0; 1 = target given as log-probabilities */
} culoss_kl_div_options;
CULOSS_API void culoss_kl_div_options_init(culoss_kl_div_options *o);

/* KL divergence with input log-probabilities x [n, c] (contiguous) and
 * target t of the same shape:
 *   log_target 0: l = t log t - t x  (0 log 0 = 0; t < 0 gives NaN)
 *   log_target 1: l = exp(t) (t - x) (t = -inf gives NaN, as PyTorch)
 * Gradient with respect to x: -g t (or -g exp(t)), / (n*c) for MEAN, / n for
 * BATCHMEAN. NONE gives [n*c] losses. */
CULOSS_API culoss_status culoss_kl_div(culoss_context *ctx, const culoss_kl_div_options *o,
                                       int64_t n, int64_t c, culoss_dtype dtype,
                                       const void *input_logprobs, const void *target, float *loss,
                                       void *grad_input, const float *grad_loss);

/* ------------------------------------------------------------------------ */
/* More elementwise losses (torch.nn's, and torchvision's focal loss)       */
/* ------------------------------------------------------------------------ */
/*
 * Each takes n elements of input x and target y (contiguous, one dtype),
 * follows the family conventions above (fp32 loss: [n] for NONE, else one
 * value; MEAN divides by n; optional grad_input, which may alias x; the
 * upstream gradient g: [n] for NONE, else a scalar; NULL = 1), and has
 * PyTorch 2.15's semantics (docs/semantics.md sections 5, 9 and 11).
 */
typedef struct {
  culoss_reduction reduction; /* default MEAN */
  float margin;               /* default 1; finite */
} culoss_hinge_embedding_options;
CULOSS_API void culoss_hinge_embedding_options_init(culoss_hinge_embedding_options *o);

/* Hinge embedding: l = [y != 1] max(0, margin - x) + [y != -1] x, so y = 1
 * gives x, y = -1 the hinge, and any other y (0, say) both, as PyTorch.
 * Gradient: [y != -1] - [y != 1] [margin - x > 0] (0 at the kink x = margin,
 * as PyTorch 2.15). */
CULOSS_API culoss_status culoss_hinge_embedding(culoss_context *ctx,
                                                const culoss_hinge_embedding_options *o, int64_t n,
                                                culoss_dtype dtype, const void *input,
                                                const void *target, float *loss, void *grad_input,
                                                const float *grad_loss);

typedef struct {
  culoss_reduction reduction; /* default MEAN */
} culoss_soft_margin_options;
CULOSS_API void culoss_soft_margin_options_init(culoss_soft_margin_options *o);

/* Soft margin: l = log(1 + exp(-y x)), gradient -y sigmoid(-y x). Computed
 * overflow-free (softplus), so l = -y x and the gradient -y where -y x is
 * large: PyTorch's log1p(exp(-y x)) is inf there (past -y x ~ 88.7 in fp32)
 * and its gradient NaN. Targets are any floats (+-1 intended). */
CULOSS_API culoss_status culoss_soft_margin(culoss_context *ctx,
                                            const culoss_soft_margin_options *o, int64_t n,
                                            culoss_dtype dtype, const void *input,
                                            const void *target, float *loss, void *grad_input,
                                            const float *grad_loss);

typedef struct {
  culoss_reduction reduction; /* default MEAN */
  int log_input;              /* default 1: x is log(rate) */
  int full;                   /* default 0: 1 adds the Stirling term */
  float eps;                  /* default 1e-8 (log_input 0 only); finite, >= 0 */
} culoss_poisson_nll_options;
CULOSS_API void culoss_poisson_nll_options_init(culoss_poisson_nll_options *o);

/* Poisson negative log-likelihood of counts y:
 *   log_input 1: l = exp(x) - y x,            gradient exp(x) - y
 *   log_input 0: l = x - y log(x + eps),      gradient 1 - y / (x + eps)
 *   full: l += y log y - y + log(2 pi y) / 2 where y > 1 (no gradient). */
CULOSS_API culoss_status culoss_poisson_nll(culoss_context *ctx,
                                            const culoss_poisson_nll_options *o, int64_t n,
                                            culoss_dtype dtype, const void *input,
                                            const void *target, float *loss, void *grad_input,
                                            const float *grad_loss);

typedef struct {
  culoss_reduction reduction; /* default NONE (torchvision's) */
  float alpha;                /* default 0.25; < 0 turns the class weighting off */
  float gamma;                /* default 2; finite, >= 0 */
} culoss_sigmoid_focal_options;
CULOSS_API void culoss_sigmoid_focal_options_init(culoss_sigmoid_focal_options *o);

/* Sigmoid focal loss (torchvision.ops.sigmoid_focal_loss), on logits x and
 * targets y (0/1 intended; any float accepted):
 *   p = sigmoid(x), ce = BCE-with-logits(x, y), 1 - p_t = y (1 - p) + (1 - y) p,
 *   l = alpha_t ce (1 - p_t)^gamma, alpha_t = alpha y + (1 - alpha)(1 - y)
 *   (1 where alpha < 0);
 *   gradient alpha_t [(p - y)(1 - p_t)^gamma
 *                     - gamma (1 - p_t)^(gamma - 1) (2y - 1) p (1 - p) ce].
 * 1 - p_t is formed from sigmoid(-x) directly, so a confident prediction
 * keeps its (small) loss where torchvision's 1 - p_t rounds to 0. */
CULOSS_API culoss_status culoss_sigmoid_focal(culoss_context *ctx,
                                              const culoss_sigmoid_focal_options *o, int64_t n,
                                              culoss_dtype dtype, const void *inputs,
                                              const void *targets, float *loss, void *grad_inputs,
                                              const float *grad_loss);

typedef struct {
  culoss_reduction reduction; /* default MEAN */
  float margin;               /* default 0; finite */
} culoss_margin_ranking_options;
CULOSS_API void culoss_margin_ranking_options_init(culoss_margin_ranking_options *o);

/* Margin ranking over n elements of input1, input2 and target y (one dtype):
 *   l = max(0, -y (x1 - x2) + margin),
 *   gradient -y to x1 and +y to x2 where the hinge is active (> 0; 0 at the
 *   kink, as PyTorch 2.15), times g (/ n for MEAN).
 * grad_input1 and grad_input2 may each be NULL, and may alias input1 and
 * input2 respectively. A NaN gives a NaN loss and a zero gradient. Targets
 * are any floats (+-1 intended; PyTorch checks nothing either). */
CULOSS_API culoss_status culoss_margin_ranking(culoss_context *ctx,
                                               const culoss_margin_ranking_options *o, int64_t n,
                                               culoss_dtype dtype, const void *input1,
                                               const void *input2, const void *target, float *loss,
                                               void *grad_input1, void *grad_input2,
                                               const float *grad_loss);

typedef struct {
  culoss_reduction reduction; /* default MEAN */
  int full;                   /* default 0: 1 adds log(2 pi) / 2 */
  float eps;                  /* default 1e-6; finite, >= 0 */
} culoss_gaussian_nll_options;
CULOSS_API void culoss_gaussian_nll_options_init(culoss_gaussian_nll_options *o);

/* Gaussian negative log-likelihood of target y under N(x, var), n elements
 * of input x, target y and var (one dtype, var of the input's shape: the
 * torch front end broadcasts a var with one dim fewer and sums its gradient):
 *   v = max(var, eps),  l = (log v + (x - y)^2 / v) / 2  (+ log(2 pi) / 2),
 *   gradient (x - y) / v to x and (1 - (x - y)^2 / v) / (2 v) to var,
 * times g (/ n for MEAN). As PyTorch, the clamp does not cut var's
 * gradient (torch clamps a copy under no_grad); the target's gradient is
 * minus the input's. A negative var is a domain error (PyTorch raises):
 * INVALID_VALUE on the CPU backend before anything is written; on the CUDA
 * backend a NaN loss and zero gradients for that element and a deferred
 * INVALID_VALUE at culoss_synchronize. A NaN var gives a NaN loss.
 * (x - y)^2 / v is formed as r (r / v): finite where torch's r^2 / v
 * overflows in fp32 but the value does not (r = 1e20, v = 1e30: 5e9). */
CULOSS_API culoss_status culoss_gaussian_nll(culoss_context *ctx,
                                             const culoss_gaussian_nll_options *o, int64_t n,
                                             culoss_dtype dtype, const void *input,
                                             const void *target, const void *var, float *loss,
                                             void *grad_input, void *grad_var,
                                             const float *grad_loss);

/* ------------------------------------------------------------------------ */
/* Embedding losses: rows of pairs and triplets                             */
/* ------------------------------------------------------------------------ */
/*
 * Each takes n rows of d features (row stride ld >= d, shared by every input
 * and gradient; d >= 1), one dtype, and follows the family conventions: fp32
 * loss ([n] for NONE, else one value; MEAN divides by n), optional gradients
 * (NULL = skip; each may alias its own input), upstream gradient g ([n] for
 * NONE, else a scalar; NULL = 1). One pass: a warp reads a row of every
 * input once, reduces its dot products / norms in registers and writes the
 * gradients. PyTorch 2.15's semantics (docs/semantics.md section 11).
 */
typedef struct {
  culoss_reduction reduction; /* default MEAN */
  float margin;               /* default 0; finite */
} culoss_cosine_embedding_options;
CULOSS_API void culoss_cosine_embedding_options_init(culoss_cosine_embedding_options *o);

/* Cosine embedding with target [n] (fp32; 1 = similar, -1 = dissimilar):
 *   cos = <x1, x2> / sqrt((|x1|^2 + 1e-12)(|x2|^2 + 1e-12)),
 *   l = 1 - cos (y = 1), max(0, cos - margin) (y = -1), 0 for any other y
 *   (as PyTorch);
 *   dcos/dx1 = x2 / den - cos x1 / (|x1|^2 + 1e-12) (and symmetrically), with
 *   dl/dcos = -1, [cos - margin > 0] or 0. Sums and the norms (a product of
 *   square roots) are fp32 for every dtype: where torch's fp16 composite
 *   overflows (|x|^2 past 65504) or loses the 1e-12 (zero vectors: NaN),
 *   culoss gives the fp32 value (1 - 0 = 1 for zero vectors with y = 1). */
CULOSS_API culoss_status culoss_cosine_embedding(
    culoss_context *ctx, const culoss_cosine_embedding_options *o, int64_t n, int64_t d,
    culoss_dtype dtype, const void *input1, const void *input2, int64_t ld, const float *target,
    float *loss, void *grad_input1, void *grad_input2, const float *grad_loss);

typedef struct {
  culoss_reduction reduction; /* default MEAN */
  float margin;               /* default 1; finite, > 0 (PyTorch raises otherwise) */
  float p;                    /* default 2; the norm's degree, finite, >= 1 */
  float eps;                  /* default 1e-6; finite; added to the difference */
  int swap;                   /* default 0; 1 = distance swap */
} culoss_triplet_margin_options;
CULOSS_API void culoss_triplet_margin_options_init(culoss_triplet_margin_options *o);

/* Triplet margin with anchor a, positive p and negative q:
 *   d(u, v) = |u - v + eps|_p (pairwise_distance),
 *   l = max(d(a, p) - d(a, q) + margin, 0); with swap, d(a, q) is replaced by
 *   min(d(a, q), d(p, q)) (a tie splits the gradient in halves, as
 *   torch.minimum). Gradients to all three where l > 0 (0 at the kink);
 *   a zero distance contributes no gradient (torch's norm backward). The
 *   torch front end runs p < 1 and p = inf through torch's composite. */
CULOSS_API culoss_status culoss_triplet_margin(culoss_context *ctx,
                                               const culoss_triplet_margin_options *o, int64_t n,
                                               int64_t d, culoss_dtype dtype, const void *anchor,
                                               const void *positive, const void *negative,
                                               int64_t ld, float *loss, void *grad_anchor,
                                               void *grad_positive, void *grad_negative,
                                               const float *grad_loss);

typedef struct {
  culoss_reduction reduction; /* default MEAN (over rows) */
  const float *weight;        /* default NULL; [c] class weights, or [n, ld] (weight_per_row) */
  int weight_per_row;         /* default 0; 1: weight has a value per element (row stride ld) */
} culoss_multilabel_soft_margin_options;
CULOSS_API void
culoss_multilabel_soft_margin_options_init(culoss_multilabel_soft_margin_options *o);

/* Multi-label soft margin over n rows of c logits x and targets y (one
 * dtype, row stride ld >= c for both and the gradient; y in [0, 1] intended,
 * any float accepted, as PyTorch):
 *   l_i = (1/c) sum_j w_j [ (1 - y_j) x_j - log sigmoid(x_j) ]
 *       = -(1/c) sum_j w_j [ y_j log sigmoid(x_j) + (1 - y_j) log sigmoid(-x_j) ],
 *   computed overflow-free as y softplus(-x) + (1 - y) softplus(x) (infinite
 *   logits give PyTorch's inf or NaN); gradient g w_j (sigmoid(x_j) - y_j) / c
 *   (/ n for MEAN). One streaming pass, a warp per row. The gradient may
 *   alias x. The torch front end differentiates the targets too (-w x / c). */
CULOSS_API culoss_status culoss_multilabel_soft_margin(
    culoss_context *ctx, const culoss_multilabel_soft_margin_options *o, int64_t n, int64_t c,
    culoss_dtype dtype, const void *input, const void *target, int64_t ld, float *loss,
    void *grad_input, const float *grad_loss);

/* ------------------------------------------------------------------------ */
/* Large vocabulary: fused linear + cross-entropy                           */
/* ------------------------------------------------------------------------ */
/*
 * logits = hidden [n, d] @ weight [v, d]^T (+ bias [v]) are never
 * materialised whole: they are computed a block of rows at a time with cuBLAS
 * (tensor cores for fp16/bf16, fp32 accumulation), reduced on the fly by the
 * fused cross-entropy kernel, and the gradients formed per block with further
 * GEMMs. All cross-entropy options apply (class targets only).
 *
 * All of hidden, weight, bias, grad_* are contiguous, of dtype `dtype`.
 * bias, grad_hidden, grad_weight, grad_bias may each be NULL (grad_bias must
 * be NULL without bias). grad_weight and grad_bias are accumulated in fp32
 * and written once at the end (bf16 accumulation across blocks diverges).
 *
 * Workspace rule (what culoss_linear_cross_entropy_workspace_size returns):
 *   rows per block  r = min(n, 32768, max(1, floor(2^28 / (v * sizeof(dtype)))))
 *   logits block    r * v * sizeof(dtype)
 *   per-row values  4 * n bytes (row losses), and for a 16-bit grad_weight
 *                   32 * n more (saved softmax statistics)
 *   fp32 grad_bias  4 * v; for a 16-bit grad_weight, one vocabulary slice of
 *                   it in fp32: vs rows, vs * d * 4 <= the logits block
 * each region rounded up to 256 bytes: O(r * v + n), never O(n * v), and
 * with r fixed by v, bounded independently of n apart from the per-row
 * terms (4 n, or 36 n with the saved statistics).
 * (A 16-bit grad_weight: fp16/bf16 inputs with grad_weight_dtype the input
 * dtype, the only choice of culoss_linear_cross_entropy.)
 * grad_hidden must not alias hidden (hidden is read again after
 * grad_hidden is written).
 *
 * FLOPs: forward 2 n d v; grad_hidden 2 n d v; grad_weight 2 n d v. With an
 * fp32 grad_weight (fp32 inputs, or culoss_linear_cross_entropy_ex with
 * grad_weight_dtype CULOSS_F32) the whole call is one pass (6 n d v). With
 * a 16-bit grad_weight, its fp32 accumulation within a workspace of that
 * size takes a second pass over vocabulary slices that recomputes their
 * logits (8 n d v in all).
 */

/* Workspace bytes for culoss_linear_cross_entropy with these sizes and every
   gradient requested (an upper bound for fewer). `bytes` is host memory.
   Both backends report the rule's figure; the CPU backend ignores the
   workspace (its reference allocates what it needs). A context
   created with the tuning variable CULOSS_LINEAR_CE_BLOCK_BYTES set uses
   its value instead of the rule's 2^28 (README, "Tuning"). */
CULOSS_API culoss_status culoss_linear_cross_entropy_workspace_size(culoss_context *ctx, int64_t n,
                                                                    int64_t d, int64_t v,
                                                                    culoss_dtype dtype,
                                                                    size_t *bytes);

/* Fused linear + cross-entropy: loss over logits = hidden @ weight^T + bias
 * with class targets [n] (ttype). `loss`, `grad_loss`, the options and the
 * errors are culoss_cross_entropy's. `workspace` (context memory, at least
 * the queried size; NULL only when the size is 0) is used as scratch; its
 * contents need not be preserved between calls. */
CULOSS_API culoss_status culoss_linear_cross_entropy(
    culoss_context *ctx, const culoss_cross_entropy_options *o, int64_t n, int64_t d, int64_t v,
    culoss_dtype dtype, const void *hidden, const void *weight, const void *bias,
    culoss_index_type ttype, const void *targets, float *loss, void *grad_hidden, void *grad_weight,
    void *grad_bias, const float *grad_loss, void *workspace, size_t workspace_bytes);

/* The extended fused linear + cross-entropy: where grad_weight accumulates,
 * gradient accumulation across calls, and per-row statistics.
 *
 *   grad_weight_dtype  CULOSS_DTYPE_INPUT (the default) or the input dtype:
 *                      grad_weight and grad_bias in the input dtype, summed
 *                      in fp32 and rounded once (for fp16/bf16 by
 *                      vocabulary slices that recompute their logits: 8 n d v
 *                      FLOPs, see above). CULOSS_F32, for any input dtype:
 *                      grad_weight [v, d] and grad_bias [v] are fp32 buffers
 *                      the GEMMs accumulate into directly (fp16/bf16
 *                      operands, fp32 C): one pass, 6 n d v FLOPs, and no
 *                      grad_weight slice in the workspace. Any other value
 *                      is CULOSS_ERROR_INVALID_VALUE.
 *   accumulate         0 (default): grad_weight and grad_bias are
 *                      overwritten; 1: the call adds into them (gradient
 *                      accumulation over micro-batches; for a 16-bit
 *                      grad_weight, old + the fp32 sum rounded once).
 *                      grad_hidden is always overwritten.
 *   lse, entropy       NULL, or [n] floats (context memory): each row's
 *                      log-sum-exp of the (soft-capped) logits and the
 *                      entropy of its softmax, lse - sum_j p_j x_j, from the
 *                      same pass. Rows whose target is ignore_index get 0;
 *                      rows whose target is out of range get NaN.
 * `o` and every other argument are culoss_linear_cross_entropy's; with the
 * defaults the two calls are the same. */
typedef struct {
  culoss_dtype grad_weight_dtype; /* default CULOSS_DTYPE_INPUT; or CULOSS_F32 */
  int accumulate;                 /* default 0: overwrite grad_weight / grad_bias; 1: add */
  float *lse;                     /* default NULL; [n] per-row log-sum-exp */
  float *entropy;                 /* default NULL; [n] per-row softmax entropy */
} culoss_linear_ce_options;
CULOSS_API void culoss_linear_ce_options_init(culoss_linear_ce_options *o);

/* Workspace bytes for culoss_linear_cross_entropy_ex with these options (lo
   NULL: the defaults): the rule above, less the grad_weight slice and the
   saved statistics when grad_weight_dtype is CULOSS_F32. `bytes` is host
   memory. */
CULOSS_API culoss_status culoss_linear_cross_entropy_ex_workspace_size(
    culoss_context *ctx, const culoss_linear_ce_options *lo, int64_t n, int64_t d, int64_t v,
    culoss_dtype dtype, size_t *bytes);

CULOSS_API culoss_status culoss_linear_cross_entropy_ex(
    culoss_context *ctx, const culoss_cross_entropy_options *o, const culoss_linear_ce_options *lo,
    int64_t n, int64_t d, int64_t v, culoss_dtype dtype, const void *hidden, const void *weight,
    const void *bias, culoss_index_type ttype, const void *targets, float *loss, void *grad_hidden,
    void *grad_weight, void *grad_bias, const float *grad_loss, void *workspace,
    size_t workspace_bytes);

/* ------------------------------------------------------------------------ */
/* Contrastive InfoNCE (CLIP loss) on the fused linear + CE path            */
/* ------------------------------------------------------------------------ */
typedef struct {
  culoss_reduction reduction; /* default MEAN (over the n pairs) */
  int symmetric;              /* default 0; 1: (CE(logits) + CE(logits^T)) / 2 (CLIP) */
  const float *temperature;   /* default NULL (1); [1], context memory, > 0: read by the
                                   call on the device, so a learned temperature needs no
                                   host copy and a captured graph sees each step's value */
  float *grad_temperature;    /* default NULL (skip); [1]: d loss / d temperature, written */
} culoss_info_nce_options;
CULOSS_API void culoss_info_nce_options_init(culoss_info_nce_options *o);

/* Workspace bytes for culoss_info_nce (`bytes` host memory): two n x d
   buffers of dtype (one without symmetric or without grad_key), O(n) per-row
   values, and culoss_linear_cross_entropy_ex's workspace for n rows over n
   classes: the n x n similarity matrix exists one block of rows at a time,
   linear CE's block (2^28 bytes, or CULOSS_LINEAR_CE_BLOCK_BYTES) capped at
   max(n / 8, 1024) rows, so at most an eighth of the matrix once n > 8192. */
CULOSS_API culoss_status culoss_info_nce_workspace_size(culoss_context *ctx,
                                                        const culoss_info_nce_options *o, int64_t n,
                                                        int64_t d, culoss_dtype dtype,
                                                        size_t *bytes);

/* InfoNCE over query and key [n, d] (contiguous, dtype), positives on the
 * diagonal of z = q k^T / t:
 *   l_i = lse_j z_ij - z_ii; symmetric: (l_i + l'_i) / 2 with l' over z^T.
 * Built on culoss_linear_cross_entropy_ex (hidden q / t, weight k; then
 * k / t and q): fp32 accumulation, memory O(block x n + n x d). Gradients
 * (each NULL = skip; neither may alias an input) to query, key and the
 * temperature: dl_i/dt = -(1/t) (sum_j p_ij z_ij - z_ii) = -(l_i - H_i)/t
 * with H the row's softmax entropy. loss: [n] for NONE, else one value;
 * grad_loss as every loss. A temperature <= 0 (or NaN): INVALID_VALUE on the
 * CPU backend before anything is written; on CUDA NaN outputs and a
 * deferred INVALID_VALUE at culoss_synchronize. */
CULOSS_API culoss_status culoss_info_nce(culoss_context *ctx, const culoss_info_nce_options *o,
                                         int64_t n, int64_t d, culoss_dtype dtype,
                                         const void *query, const void *key, float *loss,
                                         void *grad_query, void *grad_key, const float *grad_loss,
                                         void *workspace, size_t workspace_bytes);

/* ------------------------------------------------------------------------ */
/* Vocabulary-parallel cross-entropy (tensor parallelism)                   */
/* ------------------------------------------------------------------------ */
/*
 * Each of `ranks` processes (or threads, or devices) holds the logits of a
 * slice of the classes: columns [v_begin, v_begin + c_local) of a v_total-class
 * problem (slices may differ in size; together they cover every class once).
 * Every rank writes the same full loss, bitwise identical across ranks (when
 * every rank's context has the same grid limit and tuning variables, which
 * fix the order of summation), and
 * the gradient of its own slice only; culoss never moves data between ranks
 * itself: the caller's `allgather` does (ncclAllGather, MPI_Allgather,
 * torch.distributed.all_gather_into_tensor).
 *
 * One all-gather per call, of CULOSS_VOCAB_PARALLEL_RECORD_BYTES (32) bytes
 * per row and rank plus one record per rank: each rank's row maximum, its
 * rescaled sum of exponentials, the smoothing sums, and the target logit and
 * weight on the rank that owns the target. Every rank merges the gathered
 * records in rank order (hence the identical loss), then writes its slice's
 * gradient from the merged statistics: the local logits are read twice
 * (statistics, then gradient) and the gradient written once.
 *
 * Everything of culoss_cross_entropy applies: targets are global class
 * indices (the same [n] array on every rank); o->class_weight, if given, is
 * this rank's slice [c_local]; label smoothing (with and without class
 * weights, over all v_total classes), z-loss, soft-capping, normalizer,
 * every reduction, the upstream gradient and the in-place gradient are
 * exact, as on one device. A target outside [0, v_total) that is not
 * ignore_index is an error as in culoss_cross_entropy (every rank sees it).
 */

/* Bytes each rank contributes per row (and once more per call) to the gather. */
#define CULOSS_VOCAB_PARALLEL_RECORD_BYTES 32

typedef struct {
  int rank, ranks; /* this rank, number of ranks (>= 1) */
  int64_t v_begin; /* global index of this rank's first class */
  int64_t v_total; /* classes over all ranks */
  /* Gathers `bytes` from every rank into recv (ranks * bytes, rank order).
     CUDA backend: device buffers, enqueued on `stream` (a cudaStream_t;
     NULL is the legacy default stream, so NULL does not tell the backends
     apart): ncclAllGather fits. CPU backend: host buffers, complete on
     return, stream NULL. Returns 0 on success (anything else fails the call
     with CULOSS_ERROR_INTERNAL naming the callback). */
  int (*allgather)(void *user, const void *send, void *recv, size_t bytes, void *stream);
  void *user;
} culoss_vocab_parallel;

/* Workspace of culoss_cross_entropy_vocab_parallel: ranks + 1 parts (this
   rank's records, then everyone's gathered), each part (n + 1) records
   rounded up to 256 bytes. `bytes` is host memory. */
CULOSS_API culoss_status culoss_vocab_parallel_workspace_size(culoss_context *ctx,
                                                              const culoss_vocab_parallel *vp,
                                                              int64_t n, size_t *bytes);

/* The one-call form: phase 1, the callback's all-gather, phase 2. `logits`
   is [n, c_local] with row stride ld; grad_logits (NULL, or [n, c_local]
   with stride ld, may alias logits) receives this rank's slice; loss,
   grad_loss and the options are culoss_cross_entropy's. */
CULOSS_API culoss_status culoss_cross_entropy_vocab_parallel(
    culoss_context *ctx, const culoss_cross_entropy_options *o, const culoss_vocab_parallel *vp,
    int64_t n, int64_t c_local, culoss_dtype dtype, const void *logits, int64_t ld,
    culoss_index_type ttype, const void *targets, float *loss, void *grad_logits,
    const float *grad_loss, void *workspace, size_t workspace_bytes);

/* The two phases, for callers that run the collective themselves (or overlap
   it with other work). Phase 1 writes this rank's n + 1 records to `stats`
   ((n + 1) * CULOSS_VOCAB_PARALLEL_RECORD_BYTES bytes, context memory); the
   caller gathers every rank's into `gathered` (ranks * that, rank order)
   and phase 2 merges them and writes loss and gradient. Both phases take the
   same options, vp (allgather unused), sizes, logits and targets. */
CULOSS_API culoss_status culoss_cross_entropy_vocab_parallel_stats(
    culoss_context *ctx, const culoss_cross_entropy_options *o, const culoss_vocab_parallel *vp,
    int64_t n, int64_t c_local, culoss_dtype dtype, const void *logits, int64_t ld,
    culoss_index_type ttype, const void *targets, void *stats);
CULOSS_API culoss_status culoss_cross_entropy_vocab_parallel_finish(
    culoss_context *ctx, const culoss_cross_entropy_options *o, const culoss_vocab_parallel *vp,
    int64_t n, int64_t c_local, culoss_dtype dtype, const void *logits, int64_t ld,
    culoss_index_type ttype, const void *targets, const void *gathered, float *loss,
    void *grad_logits, const float *grad_loss);

/* Vocabulary-parallel fused linear + cross-entropy: this rank holds the rows
 * [v_begin, v_begin + v_local) of the LM head, weight [v_local, d] (and bias
 * [v_local]); hidden [n, d] and the targets are the same on every rank.
 * The loss is the full loss (the same on every rank); grad_weight and
 * grad_bias are this rank's slice; grad_hidden is this rank's PARTIAL sum
 * over its classes, which the caller all-reduces (sums) across ranks to get
 * the gradient of hidden. `lo` is culoss_linear_cross_entropy_ex's: its
 * grad_weight dtypes, accumulate, and the per-row lse and entropy over all
 * v_total classes (the same on every rank; 0 for ignored rows, NaN on CUDA
 * for a target out of range or slices that do not tile v_total).
 *
 * The logits exist one block of rows at a time, as in the single-device
 * call, and the call makes one all-gather of the per-row records: pass 1
 * computes each block's logits and records, the gather runs, pass 2
 * recomputes each block's logits (unless one block holds all n rows) and
 * writes loss and gradients: 8 n d v_local FLOPs (6 when one block
 * suffices), plus 2 n d v_local for a 16-bit grad_weight, summed in fp32 by
 * vocabulary slices as in the single-device call. Workspace: the
 * single-device rule's regions (with its grad_weight slice and statistics
 * only for a 16-bit grad_weight) and (ranks + 1) (n + 1) records, each
 * rounded up to 256 bytes. */
CULOSS_API culoss_status culoss_linear_cross_entropy_vocab_parallel_workspace_size(
    culoss_context *ctx, const culoss_linear_ce_options *lo, const culoss_vocab_parallel *vp,
    int64_t n, int64_t d, int64_t v_local, culoss_dtype dtype, size_t *bytes);
CULOSS_API culoss_status culoss_linear_cross_entropy_vocab_parallel(
    culoss_context *ctx, const culoss_cross_entropy_options *o, const culoss_linear_ce_options *lo,
    const culoss_vocab_parallel *vp, int64_t n, int64_t d, int64_t v_local, culoss_dtype dtype,
    const void *hidden, const void *weight, const void *bias, culoss_index_type ttype,
    const void *targets, float *loss, void *grad_hidden, void *grad_weight, void *grad_bias,
    const float *grad_loss, void *workspace, size_t workspace_bytes);

/* ------------------------------------------------------------------------ */
/* Distillation between a student's and a teacher's logits                  */
/* ------------------------------------------------------------------------ */
/*
 * Per row of student logits s and teacher logits t over v classes, with
 * temperature T: P = softmax(t / T) (teacher), Q = softmax(s / T) (student).
 *   generalized JSD(beta): beta = 0 forward KL(P || Q) = sum P (log P - log Q);
 *     beta = 1 reverse KL(Q || P); else, with M = beta P + (1 - beta) Q,
 *     beta KL(P || M) + (1 - beta) KL(Q || M) (TRL's generalized_jsd_loss;
 *     the ends are the KLs, not the formula's limit, which is 0).
 *   TVD: 1/2 sum |P - Q|.
 * Terms where a probability is 0 are 0 (a -inf teacher logit gives no NaN);
 * a row whose logits are all -inf has no distribution and gives a NaN loss
 * and a NaN gradient row, as does a NaN or +inf logit in either row. The
 * gradient goes to the student only:
 * dl/ds_j = (1/T) Q_j (u_j - sum_k Q_k u_k) with u = dl/dQ; no T^2 factor
 * (scale grad_loss for it). Reverse KL where the teacher has probability 0
 * and the student does not is +inf, with a non-finite gradient row (-inf,
 * or NaN where P = 0; 0 where Q = 0), as torch's autograd of the formula.
 *
 * Hard loss: with weight_hard != 0 each kept row adds weight_hard times the
 * cross-entropy of the untempered student logits at its label (labels are
 * then required and must be in [0, v) unless ignored; out of range behaves
 * as in culoss_cross_entropy); the divergence is scaled by weight_soft.
 * hard_options NULL: the plain lse(s) - s_y. Otherwise its label_smoothing
 * (eps), class_weight (w, [v] in context memory; W = sum w) and z_loss (z)
 * give culoss_cross_entropy's row loss,
 *   (1 - eps) w_y (lse - s_y) + (eps / v) sum_c w_c (lse - s_c) + z lse^2,
 * with its gradient; its reduction and ignore_index are not read (this
 * call's own apply), and the row terms are reduced with the divergence's:
 * BATCHMEAN divides by the kept rows, not by sum w_y as culoss_cross_entropy's
 * MEAN does. logit_softcap must be 0 (it would change the student's
 * distribution for one term only: CULOSS_ERROR_NOT_SUPPORTED) and normalizer
 * NULL (CULOSS_ERROR_INVALID_VALUE; SUM with grad_loss gives any divisor).
 *
 * Labels (optional, [n] of ttype): a row whose label is ignore_index has
 * loss 0 and gradient 0 and does not count in BATCHMEAN. Reductions:
 * BATCHMEAN (default) divides the sum by the kept rows (n without labels;
 * 0 kept rows give NaN and a zero gradient), SUM, MEAN divides by n * v
 * (every element, ignored rows included: TRL's "mean"), NONE writes [n].
 *
 * Accuracy: probabilities come from the row maxima and the sums kept apart
 * from the top's 1 (the log1p form of culoss_cross_entropy), the max kept in
 * the logits' own units so (t_j - t_max) / T is formed from the exact
 * difference (in fp64 for log p), near-1
 * probabilities' differences formed as (P - 1) - (Q - 1), and the mixture's
 * log ratios log(Q / M) from log Q - log P through log1p / expm1: confident
 * rows and near-equal distributions keep fp32 accuracy. Log-probabilities
 * and row sums are in fp64 (the CUDA kernel: fp32 probabilities and
 * transcendentals, fp64 for (x - m) / T - log s and every sum). The loss is
 * within a few 1e-6 relative of float64 on the same inputs; a gradient
 * element within 1e-6 of its row's largest, plus ~1e-7 Q_j (1 + |l|) where
 * its two terms cancel (reverse KL's row constant is the loss l itself).
 * TVD's subgradient at P_j = Q_j is 0.
 */
typedef enum { CULOSS_DISTILL_JSD = 0, CULOSS_DISTILL_TVD = 1 } culoss_divergence;

typedef struct {
  culoss_divergence divergence; /* default CULOSS_DISTILL_JSD */
  float beta;                   /* default 0.5; in [0, 1] (JSD only) */
  float temperature;            /* default 1; finite and > 0 */
  culoss_reduction reduction;   /* default BATCHMEAN; NONE, SUM, MEAN or BATCHMEAN */
  int64_t ignore_index;         /* default -100 */
  float weight_soft;            /* default 1; finite: the divergence's weight */
  float weight_hard;            /* default 0; finite: the hard cross-entropy's weight */
  const culoss_cross_entropy_options *hard_options; /* default NULL (host memory): the hard
                                                       term's smoothing, class weights, z-loss */
} culoss_distill_options;
/* Sets the defaults above. `o` is host memory. */
CULOSS_API void culoss_distill_options_init(culoss_distill_options *o);

/* Distillation loss over student and teacher logits [n, v] of one dtype,
 * row strides ld_s and ld_t (>= v). labels: NULL (every row kept) or [n] of
 * ttype. loss: [n] (NONE) or [1]. grad_student: NULL, or [n, v] with row
 * stride ld_s (may alias the student logits; must not alias the teacher's).
 * CUDA backend: a block per row, the row pair kept in shared memory while
 * it fits (2 v sizeof(dtype) bytes up to the per-block limit, about 227 KB
 * on Hopper); a longer pair, on sm_90, is split over a thread-block cluster
 * of 2 to 8 blocks that each keep their slice (up to 8 x 227 KB: bf16
 * V = 450K); past that, or without clusters (CULOSS_CE_CLUSTER=0, older
 * GPUs), the rest is read again, from L2 if it is still there. So the
 * logits are read once and the gradient written once when the pair fits.
 * Split rows' fp32 row sums are merged in a fixed order (the same run to
 * run on one GPU; whether a row is split depends on the device's shared
 * memory, as for culoss_cross_entropy). */
CULOSS_API culoss_status culoss_distill(culoss_context *ctx, const culoss_distill_options *o,
                                        int64_t n, int64_t v, culoss_dtype dtype,
                                        const void *student, int64_t ld_s, const void *teacher,
                                        int64_t ld_t, culoss_index_type ttype, const void *labels,
                                        float *loss, void *grad_student, const float *grad_loss);

/* Workspace bytes for culoss_linear_distill (`bytes` host memory; lo NULL:
 * the defaults): two logits blocks of rows x v (student and teacher, in
 * dtype; rows from linear CE's block budget, 2^28 bytes or
 * CULOSS_LINEAR_CE_BLOCK_BYTES, split between the two), n per-row losses, an
 * fp32 grad_bias accumulator [v], and, for a 16-bit grad_weight in the
 * input dtype (grad_weight_dtype CULOSS_DTYPE_INPUT), an fp32 accumulator
 * [v, d_s] (v d_s 4 bytes: pass grad_weight_dtype CULOSS_F32 to do without
 * it). */
CULOSS_API culoss_status culoss_linear_distill_workspace_size(culoss_context *ctx,
                                                              const culoss_linear_ce_options *lo,
                                                              int64_t n, int64_t d_s, int64_t d_t,
                                                              int64_t v, culoss_dtype dtype,
                                                              size_t *bytes);

/* Fused linear + distillation: s = student_hidden [n, d_s] @ student_weight
 * [v, d_s]^T (+ student_bias [v]), t = teacher_hidden [n, d_t] @
 * teacher_weight [v, d_t]^T (+ teacher_bias), all contiguous and of dtype;
 * the loss is culoss_distill's over s and t (weight_soft times the
 * divergence plus weight_hard times the hard cross-entropy of s), computed
 * one block of rows at a time (cuBLAS, fp32 accumulation), never an [n, v]
 * buffer. Gradients (each NULL = skip) to the student hidden, weight and
 * bias only; `lo` gives grad_weight's dtype and accumulate as in
 * culoss_linear_cross_entropy_ex (its lse / entropy must be NULL).
 * grad_hidden is always overwritten and must not alias student_hidden or
 * teacher_hidden. */
CULOSS_API culoss_status culoss_linear_distill(
    culoss_context *ctx, const culoss_distill_options *o, const culoss_linear_ce_options *lo,
    int64_t n, int64_t d_s, int64_t d_t, int64_t v, culoss_dtype dtype, const void *student_hidden,
    const void *student_weight, const void *student_bias, const void *teacher_hidden,
    const void *teacher_weight, const void *teacher_bias, culoss_index_type ttype,
    const void *labels, float *loss, void *grad_hidden, void *grad_weight, void *grad_bias,
    const float *grad_loss, void *workspace, size_t workspace_bytes);

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* CULOSS_H */
