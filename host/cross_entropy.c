/*
 * cross_entropy.c: the public entry points of the cross-entropy family.
 *
 * Validates every argument (nothing is written on an argument error), then
 * dispatches to the CPU reference or to the CUDA launcher. Validation is the
 * same for both backends, so the two cannot disagree about what is legal.
 */
#include <math.h>

#include "internal.h"

void culoss_cross_entropy_options_init(culoss_cross_entropy_options *o) {
  if (o == NULL) return;
  o->reduction = CULOSS_REDUCTION_MEAN;
  o->ignore_index = -100;
  o->label_smoothing = 0.0f;
  o->class_weight = NULL;
  o->z_loss = 0.0f;
  o->logit_softcap = 0.0f;
  o->normalizer = NULL;
}

culoss_status culoss__check_ce_options(const char *fn, const culoss_cross_entropy_options *o) {
  CULOSS__TRY(culoss__check_reduction(fn, o->reduction, 0));
  if (!(o->label_smoothing >= 0.0f && o->label_smoothing <= 1.0f))
    return CULOSS__BAD("%s: label_smoothing = %g must be in [0, 1]", fn,
                       (double)o->label_smoothing);
  if (!(o->z_loss >= 0.0f && isfinite(o->z_loss)))
    return CULOSS__BAD("%s: z_loss = %g must be finite and >= 0", fn, (double)o->z_loss);
  if (!(o->logit_softcap >= 0.0f && isfinite(o->logit_softcap)))
    return CULOSS__BAD("%s: logit_softcap = %g must be finite and >= 0 (0 = off)", fn,
                       (double)o->logit_softcap);
  return CULOSS_OK;
}

static culoss_status validate(const culoss_context *ctx, const char *fn, culoss__ce_args *a,
                              const char *xname) {
  const culoss_cross_entropy_options *o = &a->o;
  CULOSS__TRY(culoss__check_ctx(ctx, fn));
  CULOSS__TRY(culoss__check_rows(fn, a->n, a->c, a->ld));
  CULOSS__TRY(culoss__check_dtype(fn, a->dtype));
  if (a->mode != CULOSS__CE_SOFT) CULOSS__TRY(culoss__check_index_type(fn, a->ttype));
  CULOSS__TRY(culoss__check_ce_options(fn, o));
  if (a->mode == CULOSS__NLL &&
      (o->label_smoothing != 0.0f || o->z_loss != 0.0f || o->logit_softcap != 0.0f))
    return CULOSS__BAD(
        "%s: label_smoothing, z_loss and logit_softcap do not apply to NLL; they must be 0", fn);
  if (a->loss == NULL && !(a->n == 0 && a->o.reduction == CULOSS_REDUCTION_NONE))
    return CULOSS__BAD("%s: loss is NULL", fn);
  if (a->n > 0) {
    if (a->x == NULL) return CULOSS__BAD("%s: %s is NULL", fn, xname);
    if (a->mode == CULOSS__CE_SOFT && a->probs == NULL)
      return CULOSS__BAD("%s: target_probs is NULL", fn);
    if (a->mode != CULOSS__CE_SOFT && a->targets == NULL)
      return CULOSS__BAD("%s: targets is NULL", fn);
  }
  return CULOSS_OK;
}

static culoss_status run(culoss_context *ctx, const char *fn, culoss__ce_args *a,
                         const culoss_cross_entropy_options *o, const char *xname) {
  if (o != NULL)
    a->o = *o;
  else
    culoss_cross_entropy_options_init(&a->o);
  CULOSS__TRY(validate(ctx, fn, a, xname));
  if (ctx->backend == CULOSS_BACKEND_CPU) {
    /* a non-ignored target outside [0, c) is returned by the call itself,
       found before anything is written */
    if (a->mode != CULOSS__CE_SOFT)
      CULOSS__TRY(
          culoss__check_targets_cpu(fn, a->targets, a->ttype, a->n, a->c, 1, a->o.ignore_index));
    return culoss__cpu_cross_entropy(a);
  }
  return culoss__dispatch_cuda(ctx, fn, culoss__cuda_cross_entropy, a);
}

culoss_status culoss_cross_entropy(culoss_context *ctx, const culoss_cross_entropy_options *o,
                                   int64_t n, int64_t c, culoss_dtype dtype, const void *logits,
                                   int64_t ld, culoss_index_type ttype, const void *targets,
                                   float *loss, void *grad_logits, const float *grad_loss) {
  culoss__ce_args a = {0};
  a.mode = CULOSS__CE_INDEX;
  a.n = n, a.c = c, a.ld = ld, a.dtype = dtype, a.ttype = ttype;
  a.x = logits, a.targets = targets, a.loss = loss, a.grad = grad_logits, a.grad_loss = grad_loss;
  return run(ctx, "culoss_cross_entropy", &a, o, "logits");
}

void culoss_ce_row_outputs_init(culoss_ce_row_outputs *r) {
  if (r == NULL) return;
  r->lse = NULL;
  r->entropy = NULL;
}

culoss_status culoss_cross_entropy_ex(culoss_context *ctx, const culoss_cross_entropy_options *o,
                                      const culoss_ce_row_outputs *r, int64_t n, int64_t c,
                                      culoss_dtype dtype, const void *logits, int64_t ld,
                                      culoss_index_type ttype, const void *targets, float *loss,
                                      void *grad_logits, const float *grad_loss) {
  culoss__ce_args a = {0};
  a.mode = CULOSS__CE_INDEX;
  a.n = n, a.c = c, a.ld = ld, a.dtype = dtype, a.ttype = ttype;
  a.x = logits, a.targets = targets, a.loss = loss, a.grad = grad_logits, a.grad_loss = grad_loss;
  if (r != NULL) a.lse = r->lse, a.entropy = r->entropy;
  return run(ctx, "culoss_cross_entropy_ex", &a, o, "logits");
}

culoss_status culoss_cross_entropy_soft(culoss_context *ctx, const culoss_cross_entropy_options *o,
                                        int64_t n, int64_t c, culoss_dtype dtype,
                                        const void *logits, int64_t ld, const void *target_probs,
                                        float *loss, void *grad_logits, const float *grad_loss) {
  culoss__ce_args a = {0};
  a.mode = CULOSS__CE_SOFT;
  a.n = n, a.c = c, a.ld = ld, a.dtype = dtype, a.ttype = CULOSS_I64;
  a.x = logits, a.probs = target_probs, a.loss = loss, a.grad = grad_logits;
  a.grad_loss = grad_loss;
  return run(ctx, "culoss_cross_entropy_soft", &a, o, "logits");
}

culoss_status culoss_nll(culoss_context *ctx, const culoss_cross_entropy_options *o, int64_t n,
                         int64_t c, culoss_dtype dtype, const void *logprobs, int64_t ld,
                         culoss_index_type ttype, const void *targets, float *loss,
                         void *grad_logprobs, const float *grad_loss) {
  culoss__ce_args a = {0};
  a.mode = CULOSS__NLL;
  a.n = n, a.c = c, a.ld = ld, a.dtype = dtype, a.ttype = ttype;
  a.x = logprobs, a.targets = targets, a.loss = loss, a.grad = grad_logprobs;
  a.grad_loss = grad_loss;
  return run(ctx, "culoss_nll", &a, o, "logprobs");
}
