/*
 * vocab_parallel.c: vocabulary-parallel cross-entropy, host side: the
 * argument checks, the workspace rule, the one-call form over the caller's
 * all-gather, and dispatch of the two phases.
 */
#include <string.h>

#include "internal.h"

#define RECORD CULOSS_VOCAB_PARALLEL_RECORD_BYTES

static size_t round256(size_t b) { return (b + 255u) & ~(size_t)255u; }

static culoss_status check_vp(const char *fn, const culoss_vocab_parallel *vp, int need_gather) {
  if (vp == NULL) return CULOSS__BAD("%s: vp is NULL", fn);
  if (vp->ranks < 1 || vp->rank < 0 || vp->rank >= vp->ranks)
    return CULOSS__BAD("%s: rank %d of %d ranks", fn, vp->rank, vp->ranks);
  if (vp->v_total < 1)
    return CULOSS__BAD("%s: v_total = %lld must be >= 1", fn, (long long)vp->v_total);
  if (need_gather && vp->allgather == NULL) return CULOSS__BAD("%s: vp->allgather is NULL", fn);
  return CULOSS_OK;
}

static culoss_status check_call(culoss_context *ctx, const char *fn, culoss__vp_args *a,
                                const culoss_cross_entropy_options *o, int need_gather) {
  if (o != NULL)
    a->o = *o;
  else
    culoss_cross_entropy_options_init(&a->o);
  CULOSS__TRY(culoss__check_ctx(ctx, fn));
  CULOSS__TRY(check_vp(fn, a->vp, need_gather));
  CULOSS__TRY(culoss__check_rows(fn, a->n, a->c_local, a->ld));
  if (a->vp->v_begin < 0 || a->vp->v_begin > a->vp->v_total - a->c_local)
    return CULOSS__BAD("%s: the slice [%lld, %lld) is not inside [0, v_total = %lld)", fn,
                       (long long)a->vp->v_begin, (long long)(a->vp->v_begin + a->c_local),
                       (long long)a->vp->v_total);
  if (a->n >= INT64_MAX / RECORD / ((int64_t)a->vp->ranks + 1) - 1)
    return CULOSS__BAD("%s: n = %lld records overflow", fn, (long long)a->n);
  CULOSS__TRY(culoss__check_dtype(fn, a->dtype));
  CULOSS__TRY(culoss__check_index_type(fn, a->ttype));
  CULOSS__TRY(culoss__check_ce_options(fn, &a->o));
  if (a->n > 0 && a->x == NULL) return CULOSS__BAD("%s: logits is NULL", fn);
  if (a->n > 0 && a->targets == NULL) return CULOSS__BAD("%s: targets is NULL", fn);
  if (ctx->backend == CULOSS_BACKEND_CPU)
    CULOSS__TRY(culoss__check_targets_cpu(fn, a->targets, a->ttype, a->n, a->vp->v_total, 1,
                                          a->o.ignore_index));
  return CULOSS_OK;
}

culoss_status culoss_vocab_parallel_workspace_size(culoss_context *ctx,
                                                   const culoss_vocab_parallel *vp, int64_t n,
                                                   size_t *bytes) {
  const char *fn = "culoss_vocab_parallel_workspace_size";
  CULOSS__TRY(culoss__check_ctx(ctx, fn));
  CULOSS__TRY(check_vp(fn, vp, 0));
  if (bytes == NULL) return CULOSS__BAD("%s: bytes is NULL", fn);
  if (n < 0) return CULOSS__BAD("%s: n = %lld is negative", fn, (long long)n);
  if (n >= INT64_MAX / RECORD / ((int64_t)vp->ranks + 1) - 1)
    return CULOSS__BAD("%s: n = %lld records overflow", fn, (long long)n);
  *bytes = round256((size_t)(n + 1) * RECORD) * ((size_t)vp->ranks + 1);
  return CULOSS_OK;
}

static culoss_status phase(culoss_context *ctx, const char *fn, culoss__vp_args *a) {
  if (ctx->backend == CULOSS_BACKEND_CPU) return culoss__cpu_vocab_parallel(a);
  return culoss__dispatch_cuda(ctx, fn, culoss__cuda_vocab_parallel, a);
}

culoss_status culoss_cross_entropy_vocab_parallel_stats(
    culoss_context *ctx, const culoss_cross_entropy_options *o, const culoss_vocab_parallel *vp,
    int64_t n, int64_t c_local, culoss_dtype dtype, const void *logits, int64_t ld,
    culoss_index_type ttype, const void *targets, void *stats) {
  const char *fn = "culoss_cross_entropy_vocab_parallel_stats";
  culoss__vp_args a;
  memset(&a, 0, sizeof a);
  a.phase = CULOSS__VP_STATS, a.vp = vp, a.n = n, a.c_local = c_local, a.ld = ld;
  a.dtype = dtype, a.ttype = ttype, a.x = logits, a.targets = targets, a.stats = stats;
  CULOSS__TRY(check_call(ctx, fn, &a, o, 0));
  if (stats == NULL) return CULOSS__BAD("%s: stats is NULL", fn);
  return phase(ctx, fn, &a);
}

culoss_status culoss_cross_entropy_vocab_parallel_finish(
    culoss_context *ctx, const culoss_cross_entropy_options *o, const culoss_vocab_parallel *vp,
    int64_t n, int64_t c_local, culoss_dtype dtype, const void *logits, int64_t ld,
    culoss_index_type ttype, const void *targets, const void *gathered, float *loss,
    void *grad_logits, const float *grad_loss) {
  const char *fn = "culoss_cross_entropy_vocab_parallel_finish";
  culoss__vp_args a;
  memset(&a, 0, sizeof a);
  a.phase = CULOSS__VP_FINISH, a.vp = vp, a.n = n, a.c_local = c_local, a.ld = ld;
  a.dtype = dtype, a.ttype = ttype, a.x = logits, a.targets = targets, a.gathered = gathered;
  a.loss = loss, a.grad = grad_logits, a.grad_loss = grad_loss;
  CULOSS__TRY(check_call(ctx, fn, &a, o, 0));
  if (gathered == NULL) return CULOSS__BAD("%s: gathered is NULL", fn);
  if (loss == NULL && !(n == 0 && o != NULL && o->reduction == CULOSS_REDUCTION_NONE))
    return CULOSS__BAD("%s: loss is NULL", fn);
  return phase(ctx, fn, &a);
}

culoss_status culoss_cross_entropy_vocab_parallel(
    culoss_context *ctx, const culoss_cross_entropy_options *o, const culoss_vocab_parallel *vp,
    int64_t n, int64_t c_local, culoss_dtype dtype, const void *logits, int64_t ld,
    culoss_index_type ttype, const void *targets, float *loss, void *grad_logits,
    const float *grad_loss, void *workspace, size_t workspace_bytes) {
  const char *fn = "culoss_cross_entropy_vocab_parallel";
  culoss__vp_args a;
  size_t need, part;
  unsigned char *ws = (unsigned char *)workspace;
  memset(&a, 0, sizeof a);
  a.vp = vp, a.n = n, a.c_local = c_local, a.ld = ld, a.dtype = dtype, a.ttype = ttype;
  a.x = logits, a.targets = targets, a.loss = loss, a.grad = grad_logits, a.grad_loss = grad_loss;
  CULOSS__TRY(check_call(ctx, fn, &a, o, 1));
  if (loss == NULL && !(n == 0 && o != NULL && o->reduction == CULOSS_REDUCTION_NONE))
    return CULOSS__BAD("%s: loss is NULL", fn);
  CULOSS__TRY(culoss_vocab_parallel_workspace_size(ctx, vp, n, &need));
  if (workspace_bytes < need)
    return CULOSS__BAD("%s: workspace_bytes = %zu is less than the %zu bytes "
                       "culoss_vocab_parallel_workspace_size gives",
                       fn, workspace_bytes, need);
  if (workspace == NULL) return CULOSS__BAD("%s: workspace is NULL", fn);
  part = round256((size_t)(n + 1) * RECORD);
  /* phase 1 into the first part, everyone's records after it */
  a.phase = CULOSS__VP_STATS, a.stats = ws;
  CULOSS__TRY(phase(ctx, fn, &a));
  if (vp->allgather(vp->user, ws, ws + part, (size_t)(n + 1) * RECORD,
                    ctx->backend == CULOSS_BACKEND_CPU ? NULL : ctx->stream) != 0)
    return culoss__error(CULOSS_ERROR_INTERNAL, "%s: vp->allgather returned an error", fn);
  a.phase = CULOSS__VP_FINISH, a.gathered = ws + part, a.stats = NULL;
  return phase(ctx, fn, &a);
}

/* ---- vocabulary-parallel fused linear + cross-entropy ---- */

culoss__lvp_layout culoss__lvp_plan(int64_t n, int64_t d, int64_t v_local, culoss_dtype dtype,
                                    int64_t block_bytes, int ranks, int slices) {
  culoss__lvp_layout L;
  const size_t part = round256((size_t)(n + 1) * RECORD);
  L.lce = culoss__lce_plan(n, d, v_local, dtype, block_bytes, slices);
  L.off_records = L.lce.total;
  L.off_gathered = L.off_records + part;
  L.total = L.off_gathered + part * (size_t)ranks;
  return L;
}

/* A 16-bit grad_weight, built by vocabulary slices (the single-device rule). */
static int uses_slices(culoss_dtype dtype, const culoss_linear_ce_options *lo) {
  return dtype != CULOSS_F32 && (lo == NULL || lo->grad_weight_dtype != CULOSS_F32);
}

static culoss_status check_lvp(culoss_context *ctx, const char *fn,
                               const culoss_linear_ce_options *lo, const culoss_vocab_parallel *vp,
                               int64_t n, int64_t d, int64_t v_local, culoss_dtype dtype) {
  CULOSS__TRY(culoss__check_ctx(ctx, fn));
  CULOSS__TRY(check_vp(fn, vp, 0));
  if (n < 0) return CULOSS__BAD("%s: n = %lld is negative", fn, (long long)n);
  if (d < 1) return CULOSS__BAD("%s: d = %lld must be >= 1", fn, (long long)d);
  if (v_local < 1) return CULOSS__BAD("%s: v_local = %lld must be >= 1", fn, (long long)v_local);
  if (d > INT64_MAX / 4 / v_local || (n > 0 && d > INT64_MAX / 4 / n) ||
      n >= INT64_MAX / RECORD / ((int64_t)vp->ranks + 1) - 1)
    return CULOSS__BAD("%s: n, d, v_local = %lld, %lld, %lld overflow 64-bit byte offsets", fn,
                       (long long)n, (long long)d, (long long)v_local);
  if (n > INT32_MAX || d > INT32_MAX || v_local > INT32_MAX)
    return culoss__error(CULOSS_ERROR_NOT_SUPPORTED,
                         "%s: n, d and v_local must each fit cuBLAS's 32-bit dimensions", fn);
  if (vp->v_begin < 0 || vp->v_begin > vp->v_total - v_local)
    return CULOSS__BAD("%s: the slice [%lld, %lld) is not inside [0, v_total = %lld)", fn,
                       (long long)vp->v_begin, (long long)(vp->v_begin + v_local),
                       (long long)vp->v_total);
  CULOSS__TRY(culoss__check_dtype(fn, dtype));
  if (lo != NULL && lo->grad_weight_dtype != CULOSS_DTYPE_INPUT && lo->grad_weight_dtype != dtype &&
      lo->grad_weight_dtype != CULOSS_F32)
    return CULOSS__BAD("%s: grad_weight_dtype = %d is neither the input dtype (%d) nor CULOSS_F32",
                       fn, (int)lo->grad_weight_dtype, (int)dtype);
  if (lo != NULL && lo->accumulate != 0 && lo->accumulate != 1)
    return CULOSS__BAD("%s: accumulate = %d must be 0 or 1", fn, lo->accumulate);
  return CULOSS_OK;
}

culoss_status culoss_linear_cross_entropy_vocab_parallel_workspace_size(
    culoss_context *ctx, const culoss_linear_ce_options *lo, const culoss_vocab_parallel *vp,
    int64_t n, int64_t d, int64_t v_local, culoss_dtype dtype, size_t *bytes) {
  const char *fn = "culoss_linear_cross_entropy_vocab_parallel_workspace_size";
  CULOSS__TRY(check_lvp(ctx, fn, lo, vp, n, d, v_local, dtype));
  if (bytes == NULL) return CULOSS__BAD("%s: bytes is NULL", fn);
  *bytes = culoss__lvp_plan(n, d, v_local, dtype, ctx->lce_block_bytes, vp->ranks,
                            uses_slices(dtype, lo))
               .total;
  return CULOSS_OK;
}

culoss_status culoss_linear_cross_entropy_vocab_parallel(
    culoss_context *ctx, const culoss_cross_entropy_options *o, const culoss_linear_ce_options *lo,
    const culoss_vocab_parallel *vp, int64_t n, int64_t d, int64_t v_local, culoss_dtype dtype,
    const void *hidden, const void *weight, const void *bias, culoss_index_type ttype,
    const void *targets, float *loss, void *grad_hidden, void *grad_weight, void *grad_bias,
    const float *grad_loss, void *workspace, size_t workspace_bytes) {
  const char *fn = "culoss_linear_cross_entropy_vocab_parallel";
  culoss__lce_args a;
  memset(&a, 0, sizeof a);
  if (o != NULL)
    a.o = *o;
  else
    culoss_cross_entropy_options_init(&a.o);
  CULOSS__TRY(check_lvp(ctx, fn, lo, vp, n, d, v_local, dtype));
  if (vp->allgather == NULL) return CULOSS__BAD("%s: vp->allgather is NULL", fn);
  CULOSS__TRY(culoss__check_index_type(fn, ttype));
  CULOSS__TRY(culoss__check_ce_options(fn, &a.o));
  a.gw_dtype = lo != NULL && lo->grad_weight_dtype == CULOSS_F32 ? CULOSS_F32 : dtype;
  a.accumulate = lo != NULL ? lo->accumulate : 0;
  a.lse = lo != NULL ? lo->lse : NULL, a.entropy = lo != NULL ? lo->entropy : NULL;
  if (loss == NULL && !(n == 0 && a.o.reduction == CULOSS_REDUCTION_NONE))
    return CULOSS__BAD("%s: loss is NULL", fn);
  if (weight == NULL) return CULOSS__BAD("%s: weight is NULL", fn);
  if (n > 0 && hidden == NULL) return CULOSS__BAD("%s: hidden is NULL", fn);
  if (n > 0 && targets == NULL) return CULOSS__BAD("%s: targets is NULL", fn);
  if (grad_bias != NULL && bias == NULL)
    return CULOSS__BAD("%s: grad_bias needs a bias (bias is NULL)", fn);
  if (grad_hidden != NULL && grad_hidden == hidden)
    return CULOSS__BAD("%s: grad_hidden must not alias hidden", fn);
  a.n = n, a.d = d, a.v = v_local, a.dtype = dtype, a.ttype = ttype, a.vp = vp;
  a.hidden = hidden, a.weight = weight, a.bias = bias, a.targets = targets, a.loss = loss;
  a.grad_hidden = grad_hidden, a.grad_weight = grad_weight, a.grad_bias = grad_bias;
  a.grad_loss = grad_loss, a.workspace = workspace, a.workspace_bytes = workspace_bytes;
  if (ctx->backend == CULOSS_BACKEND_CPU) {
    CULOSS__TRY(culoss__check_targets_cpu(fn, targets, ttype, n, vp->v_total, 1, a.o.ignore_index));
    return culoss__cpu_linear_vocab_parallel(&a);
  }
  {
    const size_t need = culoss__lvp_plan(n, d, v_local, dtype, ctx->lce_block_bytes, vp->ranks,
                                         uses_slices(dtype, lo))
                            .total;
    if (workspace_bytes < need)
      return CULOSS__BAD("%s: workspace_bytes = %zu is less than the %zu bytes its "
                         "workspace-size query gives",
                         fn, workspace_bytes, need);
    if (workspace == NULL) return CULOSS__BAD("%s: workspace is NULL", fn);
  }
  return culoss__dispatch_cuda(ctx, fn, culoss__cuda_linear_vocab_parallel, &a);
}
