/*
 * linear_ce.c: fused linear + cross-entropy, host side: the workspace plan
 * (the rule the header documents), validation and dispatch.
 */
#include <string.h>

#include "internal.h"

static size_t round256(size_t b) { return (b + 255u) & ~(size_t)255u; }

/* block_bytes: the context's logits block budget, 2^28 unless the tuning
   knob CULOSS_LINEAR_CE_BLOCK_BYTES set another at culoss_create (small
   values exercise many blocks and slices). slices: a 16-bit grad_weight
   built by vocabulary slices (pass B), which needs the saved per-row
   statistics and one fp32 slice. */
culoss__lce_layout culoss__lce_plan(int64_t n, int64_t d, int64_t v, culoss_dtype dtype,
                                    int64_t block_bytes, int slices) {
  culoss__lce_layout L;
  const size_t es = culoss__dtype_size(dtype);
  int64_t rows = block_bytes / (v * (int64_t)es);
  if (rows < 1) rows = 1;
  if (rows > 32768) rows = 32768;
  if (rows > n) rows = n > 0 ? n : 1;
  L.rows = rows;
  L.vslice = 0;
  L.off_logits = 0;
  L.off_row_loss = round256((size_t)rows * (size_t)v * es);
  L.off_row_stats = L.off_row_loss + round256((size_t)n * 4u);
  L.off_bias_acc = L.off_row_stats + (slices ? round256((size_t)n * 32u) : 0);
  L.off_gw_acc = L.off_bias_acc + round256((size_t)v * 4u);
  L.total = L.off_gw_acc;
  if (slices) {
    /* one vocabulary slice of fp32 grad_weight, no larger than the block */
    int64_t vs = (int64_t)(L.off_row_loss / ((size_t)d * 4u));
    if (vs > v) vs = v;
    if (vs < 1) vs = 1;
    L.vslice = vs;
    L.total += round256((size_t)vs * (size_t)d * 4u);
  }
  return L;
}

void culoss_linear_ce_options_init(culoss_linear_ce_options *o) {
  if (o == NULL) return;
  o->grad_weight_dtype = CULOSS_DTYPE_INPUT;
  o->accumulate = 0;
  o->lse = NULL;
  o->entropy = NULL;
}

/* grad_weight's dtype for these options: the input's unless CULOSS_F32. */
static culoss_status gw_dtype_of(const char *fn, const culoss_linear_ce_options *lo,
                                 culoss_dtype dtype, culoss_dtype *gw) {
  if (lo->grad_weight_dtype == CULOSS_DTYPE_INPUT || lo->grad_weight_dtype == dtype ||
      lo->grad_weight_dtype == CULOSS_F32) {
    *gw = lo->grad_weight_dtype == CULOSS_F32 ? CULOSS_F32 : dtype;
    return CULOSS_OK;
  }
  return CULOSS__BAD("%s: grad_weight_dtype = %d is neither the input dtype (%d) nor CULOSS_F32",
                     fn, (int)lo->grad_weight_dtype, (int)dtype);
}

/* Whether these dtypes take pass B (a 16-bit grad_weight by slices). */
static int uses_slices(culoss_dtype dtype, culoss_dtype gw) {
  return dtype != CULOSS_F32 && gw != CULOSS_F32;
}

static culoss_status check_sizes(const char *fn, int64_t n, int64_t d, int64_t v) {
  if (n < 0) return CULOSS__BAD("%s: n = %lld is negative", fn, (long long)n);
  if (d < 1) return CULOSS__BAD("%s: d = %lld must be >= 1", fn, (long long)d);
  if (v < 1) return CULOSS__BAD("%s: v = %lld must be >= 1", fn, (long long)v);
  if (d > INT64_MAX / 4 / v || (n > 0 && d > INT64_MAX / 4 / n))
    return CULOSS__BAD("%s: n, d, v = %lld, %lld, %lld overflow 64-bit byte offsets", fn,
                       (long long)n, (long long)d, (long long)v);
  if (n > INT32_MAX || d > INT32_MAX || v > INT32_MAX)
    return culoss__error(CULOSS_ERROR_NOT_SUPPORTED,
                         "%s: n, d and v must each fit cuBLAS's 32-bit dimensions", fn);
  return CULOSS_OK;
}

static culoss_status workspace_size(const char *fn, culoss_context *ctx,
                                    const culoss_linear_ce_options *lo, int64_t n, int64_t d,
                                    int64_t v, culoss_dtype dtype, size_t *bytes) {
  culoss_linear_ce_options dl;
  culoss_dtype gw = dtype;
  if (lo == NULL) culoss_linear_ce_options_init(&dl), lo = &dl;
  CULOSS__TRY(culoss__check_ctx(ctx, fn));
  if (bytes == NULL) return CULOSS__BAD("%s: bytes is NULL", fn);
  CULOSS__TRY(check_sizes(fn, n, d, v));
  CULOSS__TRY(culoss__check_dtype(fn, dtype));
  CULOSS__TRY(gw_dtype_of(fn, lo, dtype, &gw));
  /* the same figure for both backends; the CPU backend does not use it */
  *bytes = culoss__lce_plan(n, d, v, dtype, ctx->lce_block_bytes, uses_slices(dtype, gw)).total;
  return CULOSS_OK;
}

culoss_status culoss_linear_cross_entropy_workspace_size(culoss_context *ctx, int64_t n, int64_t d,
                                                         int64_t v, culoss_dtype dtype,
                                                         size_t *bytes) {
  return workspace_size("culoss_linear_cross_entropy_workspace_size", ctx, NULL, n, d, v, dtype,
                        bytes);
}

culoss_status culoss_linear_cross_entropy_ex_workspace_size(culoss_context *ctx,
                                                            const culoss_linear_ce_options *lo,
                                                            int64_t n, int64_t d, int64_t v,
                                                            culoss_dtype dtype, size_t *bytes) {
  return workspace_size("culoss_linear_cross_entropy_ex_workspace_size", ctx, lo, n, d, v, dtype,
                        bytes);
}

static culoss_status run(culoss_context *ctx, const char *fn, culoss__lce_args *a,
                         const culoss_cross_entropy_options *o,
                         const culoss_linear_ce_options *lo) {
  culoss_linear_ce_options dl;
  if (o != NULL)
    a->o = *o;
  else
    culoss_cross_entropy_options_init(&a->o);
  if (lo == NULL) culoss_linear_ce_options_init(&dl), lo = &dl;
  CULOSS__TRY(culoss__check_ctx(ctx, fn));
  CULOSS__TRY(check_sizes(fn, a->n, a->d, a->v));
  CULOSS__TRY(culoss__check_dtype(fn, a->dtype));
  CULOSS__TRY(culoss__check_index_type(fn, a->ttype));
  CULOSS__TRY(culoss__check_ce_options(fn, &a->o));
  CULOSS__TRY(gw_dtype_of(fn, lo, a->dtype, &a->gw_dtype));
  if (lo->accumulate != 0 && lo->accumulate != 1)
    return CULOSS__BAD("%s: accumulate = %d must be 0 or 1", fn, lo->accumulate);
  a->accumulate = lo->accumulate, a->lse = lo->lse, a->entropy = lo->entropy;
  if (a->loss == NULL && !(a->n == 0 && a->o.reduction == CULOSS_REDUCTION_NONE))
    return CULOSS__BAD("%s: loss is NULL", fn);
  if (a->weight == NULL) return CULOSS__BAD("%s: weight is NULL", fn);
  if (a->n > 0 && a->hidden == NULL) return CULOSS__BAD("%s: hidden is NULL", fn);
  if (a->n > 0 && a->targets == NULL) return CULOSS__BAD("%s: targets is NULL", fn);
  if (a->grad_bias != NULL && a->bias == NULL)
    return CULOSS__BAD("%s: grad_bias needs a bias (bias is NULL)", fn);
  if (a->grad_hidden != NULL && a->grad_hidden == a->hidden)
    return CULOSS__BAD("%s: grad_hidden must not alias hidden", fn);
  if (ctx->backend == CULOSS_BACKEND_CPU) {
    CULOSS__TRY(
        culoss__check_targets_cpu(fn, a->targets, a->ttype, a->n, a->v, 1, a->o.ignore_index));
    return culoss__cpu_linear_cross_entropy(a);
  }
  {
    const size_t need = culoss__lce_plan(a->n, a->d, a->v, a->dtype, ctx->lce_block_bytes,
                                         uses_slices(a->dtype, a->gw_dtype))
                            .total;
    if (a->workspace_bytes < need)
      return CULOSS__BAD("%s: workspace_bytes = %zu is less than the %zu bytes its "
                         "workspace-size query gives",
                         fn, a->workspace_bytes, need);
    if (a->workspace == NULL && need > 0) return CULOSS__BAD("%s: workspace is NULL", fn);
  }
  return culoss__dispatch_cuda(ctx, fn, culoss__cuda_linear_cross_entropy, a);
}

static culoss_status call(culoss_context *ctx, const char *fn,
                          const culoss_cross_entropy_options *o, const culoss_linear_ce_options *lo,
                          int64_t n, int64_t d, int64_t v, culoss_dtype dtype, const void *hidden,
                          const void *weight, const void *bias, culoss_index_type ttype,
                          const void *targets, float *loss, void *grad_hidden, void *grad_weight,
                          void *grad_bias, const float *grad_loss, void *workspace,
                          size_t workspace_bytes) {
  culoss__lce_args a;
  memset(&a, 0, sizeof a);
  a.n = n, a.d = d, a.v = v, a.dtype = dtype, a.ttype = ttype;
  a.hidden = hidden, a.weight = weight, a.bias = bias, a.targets = targets, a.loss = loss;
  a.grad_hidden = grad_hidden, a.grad_weight = grad_weight, a.grad_bias = grad_bias;
  a.grad_loss = grad_loss, a.workspace = workspace, a.workspace_bytes = workspace_bytes;
  return run(ctx, fn, &a, o, lo);
}

culoss_status
culoss_linear_cross_entropy_ex(culoss_context *ctx, const culoss_cross_entropy_options *o,
                               const culoss_linear_ce_options *lo, int64_t n, int64_t d, int64_t v,
                               culoss_dtype dtype, const void *hidden, const void *weight,
                               const void *bias, culoss_index_type ttype, const void *targets,
                               float *loss, void *grad_hidden, void *grad_weight, void *grad_bias,
                               const float *grad_loss, void *workspace, size_t workspace_bytes) {
  return call(ctx, "culoss_linear_cross_entropy_ex", o, lo, n, d, v, dtype, hidden, weight, bias,
              ttype, targets, loss, grad_hidden, grad_weight, grad_bias, grad_loss, workspace,
              workspace_bytes);
}

culoss_status culoss_linear_cross_entropy(
    culoss_context *ctx, const culoss_cross_entropy_options *o, int64_t n, int64_t d, int64_t v,
    culoss_dtype dtype, const void *hidden, const void *weight, const void *bias,
    culoss_index_type ttype, const void *targets, float *loss, void *grad_hidden, void *grad_weight,
    void *grad_bias, const float *grad_loss, void *workspace, size_t workspace_bytes) {
  return call(ctx, "culoss_linear_cross_entropy", o, NULL, n, d, v, dtype, hidden, weight, bias,
              ttype, targets, loss, grad_hidden, grad_weight, grad_bias, grad_loss, workspace,
              workspace_bytes);
}
