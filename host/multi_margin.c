/*
 * multi_margin.c: the public entry point of the multi-class hinge
 * (PyTorch's multi_margin_loss): option defaults, validation (nothing is
 * written on an argument error), the CPU backend's target check, dispatch.
 */
#include <math.h>

#include "internal.h"

void culoss_multi_margin_options_init(culoss_multi_margin_options *o) {
  if (o == NULL) return;
  o->reduction = CULOSS_REDUCTION_MEAN;
  o->p = 1;
  o->margin = 1.0f;
  o->class_weight = NULL;
}

/* The checks both row losses share (a->o.reduction already set), then the
   arguments into a. */
static culoss_status check_rows_call(culoss_context *ctx, const char *fn, culoss__mm_args *a,
                                     int64_t n, int64_t c, int64_t ld, culoss_dtype dtype,
                                     culoss_index_type ttype, const void *scores,
                                     const void *targets, float *loss, void *grad,
                                     const float *grad_loss) {
  CULOSS__TRY(culoss__check_ctx(ctx, fn));
  CULOSS__TRY(culoss__check_rows(fn, n, c, ld));
  CULOSS__TRY(culoss__check_dtype(fn, dtype));
  CULOSS__TRY(culoss__check_index_type(fn, ttype));
  CULOSS__TRY(culoss__check_reduction(fn, a->o.reduction, 0));
  if (loss == NULL && !(n == 0 && a->o.reduction == CULOSS_REDUCTION_NONE))
    return CULOSS__BAD("%s: loss is NULL", fn);
  if (n > 0 && scores == NULL) return CULOSS__BAD("%s: scores is NULL", fn);
  if (n > 0 && targets == NULL) return CULOSS__BAD("%s: targets is NULL", fn);
  a->n = n, a->c = c, a->ld = ld, a->dtype = dtype, a->ttype = ttype, a->x = scores;
  a->targets = targets, a->loss = loss, a->grad = grad, a->grad_loss = grad_loss;
  return CULOSS_OK;
}

culoss_status culoss_multi_margin(culoss_context *ctx, const culoss_multi_margin_options *o,
                                  int64_t n, int64_t c, culoss_dtype dtype, const void *scores,
                                  int64_t ld, culoss_index_type ttype, const void *targets,
                                  float *loss, void *grad_scores, const float *grad_loss) {
  const char *fn = "culoss_multi_margin";
  culoss__mm_args a = {0};
  if (o == NULL)
    culoss_multi_margin_options_init(&a.o);
  else
    a.o = *o;
  CULOSS__TRY(check_rows_call(ctx, fn, &a, n, c, ld, dtype, ttype, scores, targets, loss,
                              grad_scores, grad_loss));
  if (a.o.p != 1 && a.o.p != 2) return CULOSS__BAD("%s: p = %d must be 1 or 2", fn, a.o.p);
  if (!isfinite(a.o.margin))
    return CULOSS__BAD("%s: margin = %g must be finite", fn, (double)a.o.margin);
  if (ctx->backend == CULOSS_BACKEND_CPU) {
    CULOSS__TRY(culoss__check_targets_cpu(fn, targets, ttype, n, c, 0, 0));
    return culoss__cpu_multi_margin(&a);
  }
  return culoss__dispatch_cuda(ctx, fn, culoss__cuda_multi_margin, &a);
}

void culoss_multilabel_margin_options_init(culoss_multilabel_margin_options *o) {
  if (o == NULL) return;
  o->reduction = CULOSS_REDUCTION_MEAN;
}

culoss_status culoss_multilabel_margin(culoss_context *ctx,
                                       const culoss_multilabel_margin_options *o, int64_t n,
                                       int64_t c, culoss_dtype dtype, const void *scores,
                                       int64_t ld, culoss_index_type ttype, const void *targets,
                                       float *loss, void *grad_scores, const float *grad_loss) {
  const char *fn = "culoss_multilabel_margin";
  culoss__mm_args a = {0};
  culoss_multi_margin_options_init(&a.o);
  a.multilabel = 1;
  a.o.reduction = o ? o->reduction : CULOSS_REDUCTION_MEAN;
  CULOSS__TRY(check_rows_call(ctx, fn, &a, n, c, ld, dtype, ttype, scores, targets, loss,
                              grad_scores, grad_loss));
  if (ctx->backend == CULOSS_BACKEND_CPU) {
    for (int64_t e = 0; e < n * c; e++) {
      const int64_t t = culoss__target_at(targets, ttype, e);
      if (t < -1 || t >= c)
        return culoss__error(CULOSS_ERROR_TARGET_OUT_OF_RANGE,
                             "%s: targets[%lld][%lld] = %lld is outside [-1, %lld)", fn,
                             (long long)(e / c), (long long)(e % c), (long long)t, (long long)c);
    }
    return culoss__cpu_multi_margin(&a);
  }
  return culoss__dispatch_cuda(ctx, fn, culoss__cuda_multi_margin, &a);
}
