/*
 * embedding.c: the public entry points of the row losses of issue 20
 * (cosine embedding, triplet margin, multi-label soft margin): option
 * defaults, validation (nothing is written on an argument error), dispatch.
 */
#include <math.h>

#include "internal.h"

void culoss_cosine_embedding_options_init(culoss_cosine_embedding_options *o) {
  if (o == NULL) return;
  o->reduction = CULOSS_REDUCTION_MEAN;
  o->margin = 0.0f;
}

void culoss_triplet_margin_options_init(culoss_triplet_margin_options *o) {
  if (o == NULL) return;
  o->reduction = CULOSS_REDUCTION_MEAN;
  o->margin = 1.0f;
  o->p = 2.0f;
  o->eps = 1e-6f;
  o->swap = 0;
}

static culoss_status run_emb(culoss_context *ctx, const char *fn, culoss__emb_args *a, int ninputs,
                             const char *const names[3]) {
  const int nread = ninputs; /* inputs read; ML soft margin's targets have no gradient */
  CULOSS__TRY(culoss__check_ctx(ctx, fn));
  CULOSS__TRY(culoss__check_rows(fn, a->n, a->d, a->ld));
  CULOSS__TRY(culoss__check_dtype(fn, a->dtype));
  CULOSS__TRY(culoss__check_reduction(fn, a->reduction, 0));
  if (a->loss == NULL && !(a->n == 0 && a->reduction == CULOSS_REDUCTION_NONE))
    return CULOSS__BAD("%s: loss is NULL", fn);
  if (a->n > 0) {
    for (int k = 0; k < nread; k++)
      if (a->x[k] == NULL) return CULOSS__BAD("%s: %s is NULL", fn, names[k]);
    if (a->op == CULOSS__EMB_COSINE && a->target == NULL)
      return CULOSS__BAD("%s: target is NULL", fn);
  }
  if (a->op == CULOSS__EMB_ML_SOFT) { /* one gradient, of the input */
    if (a->weight_per_row != 0 && a->weight_per_row != 1)
      return CULOSS__BAD("%s: weight_per_row = %d must be 0 or 1", fn, a->weight_per_row);
    if (a->weight_per_row && a->weight == NULL)
      return CULOSS__BAD("%s: weight_per_row = 1 without a weight", fn);
    ninputs = 1;
  }
  /* a gradient may alias its own input only: another input read later in
     the row would see the gradient */
  for (int k = 0; k < ninputs; k++)
    for (int j = 0; j < nread; j++)
      if (j != k && a->grad[k] != NULL && a->grad[k] == a->x[j])
        return CULOSS__BAD("%s: the gradient of %s aliases %s (only its own input may be "
                           "overwritten)",
                           fn, names[k], names[j]);
  for (int k = 0; k < ninputs; k++)
    for (int j = k + 1; j < ninputs; j++)
      if (a->grad[k] != NULL && a->grad[k] == a->grad[j])
        return CULOSS__BAD("%s: the gradients of %s and %s are one buffer", fn, names[k], names[j]);
  if (ctx->backend == CULOSS_BACKEND_CPU) return culoss__cpu_embedding(a);
  return culoss__dispatch_cuda(ctx, fn, culoss__cuda_embedding, a);
}

culoss_status culoss_cosine_embedding(culoss_context *ctx, const culoss_cosine_embedding_options *o,
                                      int64_t n, int64_t d, culoss_dtype dtype, const void *input1,
                                      const void *input2, int64_t ld, const float *target,
                                      float *loss, void *grad_input1, void *grad_input2,
                                      const float *grad_loss) {
  static const char *const names[3] = {"input1", "input2", ""};
  const char *fn = "culoss_cosine_embedding";
  culoss_cosine_embedding_options def;
  culoss__emb_args a = {0};
  if (o == NULL) culoss_cosine_embedding_options_init(&def), o = &def;
  if (!isfinite(o->margin))
    return CULOSS__BAD("%s: margin = %g must be finite", fn, (double)o->margin);
  a.op = CULOSS__EMB_COSINE, a.reduction = o->reduction, a.margin = o->margin;
  a.n = n, a.d = d, a.ld = ld, a.dtype = dtype;
  a.x[0] = input1, a.x[1] = input2, a.target = target;
  a.loss = loss, a.grad[0] = grad_input1, a.grad[1] = grad_input2, a.grad_loss = grad_loss;
  return run_emb(ctx, fn, &a, 2, names);
}

culoss_status culoss_triplet_margin(culoss_context *ctx, const culoss_triplet_margin_options *o,
                                    int64_t n, int64_t d, culoss_dtype dtype, const void *anchor,
                                    const void *positive, const void *negative, int64_t ld,
                                    float *loss, void *grad_anchor, void *grad_positive,
                                    void *grad_negative, const float *grad_loss) {
  static const char *const names[3] = {"anchor", "positive", "negative"};
  const char *fn = "culoss_triplet_margin";
  culoss_triplet_margin_options def;
  culoss__emb_args a = {0};
  if (o == NULL) culoss_triplet_margin_options_init(&def), o = &def;
  if (!(o->margin > 0.0f && isfinite(o->margin)))
    return CULOSS__BAD("%s: margin = %g must be finite and > 0", fn, (double)o->margin);
  if (!(o->p >= 1.0f && isfinite(o->p)))
    return CULOSS__BAD("%s: p = %g must be finite and >= 1", fn, (double)o->p);
  if (!isfinite(o->eps)) return CULOSS__BAD("%s: eps = %g must be finite", fn, (double)o->eps);
  if (o->swap != 0 && o->swap != 1) return CULOSS__BAD("%s: swap = %d must be 0 or 1", fn, o->swap);
  a.op = CULOSS__EMB_TRIPLET, a.reduction = o->reduction, a.margin = o->margin;
  a.p = o->p, a.eps = o->eps, a.swap = o->swap;
  a.n = n, a.d = d, a.ld = ld, a.dtype = dtype;
  a.x[0] = anchor, a.x[1] = positive, a.x[2] = negative;
  a.loss = loss, a.grad[0] = grad_anchor, a.grad[1] = grad_positive, a.grad[2] = grad_negative;
  a.grad_loss = grad_loss;
  return run_emb(ctx, fn, &a, 3, names);
}

void culoss_multilabel_soft_margin_options_init(culoss_multilabel_soft_margin_options *o) {
  if (o == NULL) return;
  o->reduction = CULOSS_REDUCTION_MEAN;
  o->weight = NULL;
  o->weight_per_row = 0;
}

culoss_status culoss_multilabel_soft_margin(culoss_context *ctx,
                                            const culoss_multilabel_soft_margin_options *o,
                                            int64_t n, int64_t c, culoss_dtype dtype,
                                            const void *input, const void *target, int64_t ld,
                                            float *loss, void *grad_input, const float *grad_loss) {
  static const char *const names[3] = {"input", "target", ""};
  culoss_multilabel_soft_margin_options def;
  culoss__emb_args a = {0};
  if (o == NULL) culoss_multilabel_soft_margin_options_init(&def), o = &def;
  a.op = CULOSS__EMB_ML_SOFT, a.reduction = o->reduction;
  a.weight = o->weight, a.weight_per_row = o->weight_per_row;
  a.n = n, a.d = c, a.ld = ld, a.dtype = dtype;
  a.x[0] = input, a.x[1] = target;
  a.loss = loss, a.grad[0] = grad_input, a.grad_loss = grad_loss;
  return run_emb(ctx, "culoss_multilabel_soft_margin", &a, 2, names);
}
