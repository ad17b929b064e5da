/*
 * elementwise.c: public entry points of the elementwise losses (BCE, hinge,
 * regression, KL divergence): option defaults, validation (nothing is
 * written on an argument error), the CPU backend's domain checks, dispatch.
 */
#include <math.h>

#include "internal.h"

void culoss_bce_options_init(culoss_bce_options *o) {
  if (o == NULL) return;
  o->reduction = CULOSS_REDUCTION_MEAN;
  o->weight = NULL;
  o->pos_weight = NULL;
}

void culoss_hinge_options_init(culoss_hinge_options *o) {
  if (o == NULL) return;
  o->reduction = CULOSS_REDUCTION_MEAN;
  o->margin = 1.0f;
  o->squared = 0;
}

void culoss_regression_options_init(culoss_regression_options *o) {
  if (o == NULL) return;
  o->reduction = CULOSS_REDUCTION_MEAN;
  o->delta = 1.0f;
  o->beta = 1.0f;
}

void culoss_kl_div_options_init(culoss_kl_div_options *o) {
  if (o == NULL) return;
  o->reduction = CULOSS_REDUCTION_MEAN;
  o->log_target = 0;
}

/* CPU backend domain checks, before anything is written. */
static culoss_status check_domain_cpu(const char *fn, const culoss__ew_args *a) {
  int64_t i;
  if (a->op == CULOSS__EW_BCE) {
    for (i = 0; i < a->m; i++) {
      float x = culoss__load_f32(a->x, a->dtype, i), y = culoss__load_f32(a->y, a->dtype, i);
      if (!(x >= 0.0f && x <= 1.0f))
        return CULOSS__BAD("%s: probs[%lld] = %g is outside [0, 1]", fn, (long long)i, (double)x);
      if (!(y >= 0.0f && y <= 1.0f))
        return CULOSS__BAD("%s: targets[%lld] = %g is outside [0, 1]", fn, (long long)i, (double)y);
    }
  } else if (a->op == CULOSS__EW_GAUSSIAN_NLL) {
    for (i = 0; i < a->m; i++) {
      float v = culoss__load_f32(a->x2, a->dtype, i);
      if (v < 0.0f)
        return CULOSS__BAD("%s: var[%lld] = %g is negative", fn, (long long)i, (double)v);
    }
  } else if (a->op == CULOSS__EW_HINGE) {
    for (i = 0; i < a->m; i++) {
      float y = culoss__load_f32(a->y, a->dtype, i);
      if (y != 1.0f && y != -1.0f)
        return CULOSS__BAD("%s: targets[%lld] = %g is not -1 or +1", fn, (long long)i, (double)y);
    }
  }
  return CULOSS_OK;
}

/* Common checks and dispatch. `rows`/`cols` are the caller's shape (cols is
   1 for flat losses); m = rows * cols elements. */
static culoss_status run_ew(culoss_context *ctx, const char *fn, culoss__ew_args *a, int64_t rows,
                            int64_t cols, const char *xname, const char *yname) {
  CULOSS__TRY(culoss__check_ctx(ctx, fn));
  CULOSS__TRY(culoss__check_rows(fn, rows, cols, cols));
  CULOSS__TRY(culoss__check_dtype(fn, a->dtype));
  CULOSS__TRY(culoss__check_reduction(fn, a->reduction, a->op == CULOSS__EW_KL));
  if (a->loss == NULL && !(rows * cols == 0 && a->reduction == CULOSS_REDUCTION_NONE))
    return CULOSS__BAD("%s: loss is NULL", fn);
  a->m = rows * cols;
  a->c = cols;
  a->divisor = a->reduction == CULOSS_REDUCTION_BATCHMEAN ? (double)rows : (double)a->m;
  if (a->m > 0) {
    if (a->x == NULL) return CULOSS__BAD("%s: %s is NULL", fn, xname);
    if (a->y == NULL) return CULOSS__BAD("%s: %s is NULL", fn, yname);
    if ((a->op == CULOSS__EW_MARGIN_RANKING || a->op == CULOSS__EW_GAUSSIAN_NLL) && a->x2 == NULL)
      return CULOSS__BAD("%s: %s is NULL", fn, a->op == CULOSS__EW_GAUSSIAN_NLL ? "var" : "input2");
  }
  if (a->grad != NULL && a->grad == a->grad2)
    return CULOSS__BAD("%s: the two gradients are one buffer", fn);
  if (ctx->backend == CULOSS_BACKEND_CPU) {
    CULOSS__TRY(check_domain_cpu(fn, a));
    return culoss__cpu_elementwise(a);
  }
  return culoss__dispatch_cuda(ctx, fn, culoss__cuda_elementwise, a);
}

static culoss_status bce_common(culoss_context *ctx, const char *fn, culoss__ew_op op,
                                const culoss_bce_options *o, int64_t n, int64_t c,
                                culoss_dtype dtype, const void *x, const void *y, float *loss,
                                void *grad, const float *grad_loss) {
  culoss_bce_options d;
  culoss__ew_args a = {0};
  if (o == NULL) culoss_bce_options_init(&d), o = &d;
  if (op == CULOSS__EW_BCE && o->pos_weight != NULL)
    return CULOSS__BAD("%s: pos_weight must be NULL for culoss_bce (use culoss_bce_with_logits)",
                       fn);
  a.op = op, a.reduction = o->reduction, a.dtype = dtype, a.x = x, a.y = y;
  a.weight = o->weight, a.pos_weight = o->pos_weight;
  a.loss = loss, a.grad = grad, a.grad_loss = grad_loss;
  return run_ew(ctx, fn, &a, n, c, op == CULOSS__EW_BCE ? "probs" : "logits", "targets");
}

culoss_status culoss_bce_with_logits(culoss_context *ctx, const culoss_bce_options *o, int64_t n,
                                     int64_t c, culoss_dtype dtype, const void *logits,
                                     const void *targets, float *loss, void *grad_logits,
                                     const float *grad_loss) {
  return bce_common(ctx, "culoss_bce_with_logits", CULOSS__EW_BCE_LOGITS, o, n, c, dtype, logits,
                    targets, loss, grad_logits, grad_loss);
}

culoss_status culoss_bce(culoss_context *ctx, const culoss_bce_options *o, int64_t n, int64_t c,
                         culoss_dtype dtype, const void *probs, const void *targets, float *loss,
                         void *grad_probs, const float *grad_loss) {
  return bce_common(ctx, "culoss_bce", CULOSS__EW_BCE, o, n, c, dtype, probs, targets, loss,
                    grad_probs, grad_loss);
}

culoss_status culoss_hinge(culoss_context *ctx, const culoss_hinge_options *o, int64_t n,
                           culoss_dtype dtype, const void *scores, const void *targets, float *loss,
                           void *grad_scores, const float *grad_loss) {
  const char *fn = "culoss_hinge";
  culoss_hinge_options d;
  culoss__ew_args a = {0};
  if (o == NULL) culoss_hinge_options_init(&d), o = &d;
  if (!isfinite(o->margin))
    return CULOSS__BAD("%s: margin = %g must be finite", fn, (double)o->margin);
  if (o->squared != 0 && o->squared != 1)
    return CULOSS__BAD("%s: squared = %d must be 0 or 1", fn, o->squared);
  a.op = CULOSS__EW_HINGE, a.reduction = o->reduction, a.dtype = dtype, a.x = scores, a.y = targets;
  a.a = o->margin, a.flag = o->squared;
  a.loss = loss, a.grad = grad_scores, a.grad_loss = grad_loss;
  return run_ew(ctx, fn, &a, n, 1, "scores", "targets");
}

static culoss_status regression(culoss_context *ctx, const char *fn, culoss__ew_op op,
                                const culoss_regression_options *o, int64_t n, culoss_dtype dtype,
                                const void *input, const void *target, float *loss, void *grad,
                                const float *grad_loss) {
  culoss_regression_options d;
  culoss__ew_args a = {0};
  if (o == NULL) culoss_regression_options_init(&d), o = &d;
  if (op == CULOSS__EW_HUBER && !(o->delta > 0.0f && isfinite(o->delta)))
    return CULOSS__BAD("%s: delta = %g must be finite and > 0", fn, (double)o->delta);
  if (op == CULOSS__EW_SMOOTH_L1 && !(o->beta >= 0.0f && isfinite(o->beta)))
    return CULOSS__BAD("%s: beta = %g must be finite and >= 0", fn, (double)o->beta);
  a.op = op, a.reduction = o->reduction, a.dtype = dtype, a.x = input, a.y = target;
  a.a = op == CULOSS__EW_HUBER ? o->delta : o->beta;
  a.loss = loss, a.grad = grad, a.grad_loss = grad_loss;
  return run_ew(ctx, fn, &a, n, 1, "input", "target");
}

culoss_status culoss_mse(culoss_context *ctx, const culoss_regression_options *o, int64_t n,
                         culoss_dtype dtype, const void *input, const void *target, float *loss,
                         void *grad_input, const float *grad_loss) {
  return regression(ctx, "culoss_mse", CULOSS__EW_MSE, o, n, dtype, input, target, loss, grad_input,
                    grad_loss);
}

culoss_status culoss_l1(culoss_context *ctx, const culoss_regression_options *o, int64_t n,
                        culoss_dtype dtype, const void *input, const void *target, float *loss,
                        void *grad_input, const float *grad_loss) {
  return regression(ctx, "culoss_l1", CULOSS__EW_L1, o, n, dtype, input, target, loss, grad_input,
                    grad_loss);
}

culoss_status culoss_huber(culoss_context *ctx, const culoss_regression_options *o, int64_t n,
                           culoss_dtype dtype, const void *input, const void *target, float *loss,
                           void *grad_input, const float *grad_loss) {
  return regression(ctx, "culoss_huber", CULOSS__EW_HUBER, o, n, dtype, input, target, loss,
                    grad_input, grad_loss);
}

culoss_status culoss_smooth_l1(culoss_context *ctx, const culoss_regression_options *o, int64_t n,
                               culoss_dtype dtype, const void *input, const void *target,
                               float *loss, void *grad_input, const float *grad_loss) {
  return regression(ctx, "culoss_smooth_l1", CULOSS__EW_SMOOTH_L1, o, n, dtype, input, target, loss,
                    grad_input, grad_loss);
}

void culoss_hinge_embedding_options_init(culoss_hinge_embedding_options *o) {
  if (o == NULL) return;
  o->reduction = CULOSS_REDUCTION_MEAN;
  o->margin = 1.0f;
}

void culoss_soft_margin_options_init(culoss_soft_margin_options *o) {
  if (o == NULL) return;
  o->reduction = CULOSS_REDUCTION_MEAN;
}

void culoss_poisson_nll_options_init(culoss_poisson_nll_options *o) {
  if (o == NULL) return;
  o->reduction = CULOSS_REDUCTION_MEAN;
  o->log_input = 1;
  o->full = 0;
  o->eps = 1e-8f;
}

void culoss_sigmoid_focal_options_init(culoss_sigmoid_focal_options *o) {
  if (o == NULL) return;
  o->reduction = CULOSS_REDUCTION_NONE;
  o->alpha = 0.25f;
  o->gamma = 2.0f;
}

culoss_status culoss_hinge_embedding(culoss_context *ctx, const culoss_hinge_embedding_options *o,
                                     int64_t n, culoss_dtype dtype, const void *input,
                                     const void *target, float *loss, void *grad_input,
                                     const float *grad_loss) {
  const char *fn = "culoss_hinge_embedding";
  culoss_hinge_embedding_options d;
  culoss__ew_args a = {0};
  if (o == NULL) culoss_hinge_embedding_options_init(&d), o = &d;
  if (!isfinite(o->margin))
    return CULOSS__BAD("%s: margin = %g must be finite", fn, (double)o->margin);
  a.op = CULOSS__EW_HINGE_EMBEDDING, a.reduction = o->reduction, a.dtype = dtype;
  a.x = input, a.y = target, a.a = o->margin;
  a.loss = loss, a.grad = grad_input, a.grad_loss = grad_loss;
  return run_ew(ctx, fn, &a, n, 1, "input", "target");
}

culoss_status culoss_soft_margin(culoss_context *ctx, const culoss_soft_margin_options *o,
                                 int64_t n, culoss_dtype dtype, const void *input,
                                 const void *target, float *loss, void *grad_input,
                                 const float *grad_loss) {
  culoss_soft_margin_options d;
  culoss__ew_args a = {0};
  if (o == NULL) culoss_soft_margin_options_init(&d), o = &d;
  a.op = CULOSS__EW_SOFT_MARGIN, a.reduction = o->reduction, a.dtype = dtype;
  a.x = input, a.y = target;
  a.loss = loss, a.grad = grad_input, a.grad_loss = grad_loss;
  return run_ew(ctx, "culoss_soft_margin", &a, n, 1, "input", "target");
}

culoss_status culoss_poisson_nll(culoss_context *ctx, const culoss_poisson_nll_options *o,
                                 int64_t n, culoss_dtype dtype, const void *input,
                                 const void *target, float *loss, void *grad_input,
                                 const float *grad_loss) {
  const char *fn = "culoss_poisson_nll";
  culoss_poisson_nll_options d;
  culoss__ew_args a = {0};
  if (o == NULL) culoss_poisson_nll_options_init(&d), o = &d;
  if (o->log_input != 0 && o->log_input != 1)
    return CULOSS__BAD("%s: log_input = %d must be 0 or 1", fn, o->log_input);
  if (o->full != 0 && o->full != 1) return CULOSS__BAD("%s: full = %d must be 0 or 1", fn, o->full);
  if (!(o->eps >= 0.0f && isfinite(o->eps)))
    return CULOSS__BAD("%s: eps = %g must be finite and >= 0", fn, (double)o->eps);
  a.op = CULOSS__EW_POISSON_NLL, a.reduction = o->reduction, a.dtype = dtype;
  a.x = input, a.y = target, a.a = o->eps, a.flag = o->log_input | (o->full << 1);
  a.loss = loss, a.grad = grad_input, a.grad_loss = grad_loss;
  return run_ew(ctx, fn, &a, n, 1, "input", "target");
}

culoss_status culoss_sigmoid_focal(culoss_context *ctx, const culoss_sigmoid_focal_options *o,
                                   int64_t n, culoss_dtype dtype, const void *inputs,
                                   const void *targets, float *loss, void *grad_inputs,
                                   const float *grad_loss) {
  const char *fn = "culoss_sigmoid_focal";
  culoss_sigmoid_focal_options d;
  culoss__ew_args a = {0};
  if (o == NULL) culoss_sigmoid_focal_options_init(&d), o = &d;
  if (!isfinite(o->alpha))
    return CULOSS__BAD("%s: alpha = %g must be finite", fn, (double)o->alpha);
  if (!(o->gamma >= 0.0f && isfinite(o->gamma)))
    return CULOSS__BAD("%s: gamma = %g must be finite and >= 0", fn, (double)o->gamma);
  a.op = CULOSS__EW_SIGMOID_FOCAL, a.reduction = o->reduction, a.dtype = dtype;
  a.x = inputs, a.y = targets, a.a = o->alpha, a.b = o->gamma;
  a.loss = loss, a.grad = grad_inputs, a.grad_loss = grad_loss;
  return run_ew(ctx, fn, &a, n, 1, "inputs", "targets");
}

culoss_status culoss_kl_div(culoss_context *ctx, const culoss_kl_div_options *o, int64_t n,
                            int64_t c, culoss_dtype dtype, const void *input_logprobs,
                            const void *target, float *loss, void *grad_input,
                            const float *grad_loss) {
  const char *fn = "culoss_kl_div";
  culoss_kl_div_options d;
  culoss__ew_args a = {0};
  if (o == NULL) culoss_kl_div_options_init(&d), o = &d;
  if (o->log_target != 0 && o->log_target != 1)
    return CULOSS__BAD("%s: log_target = %d must be 0 or 1", fn, o->log_target);
  a.op = CULOSS__EW_KL, a.reduction = o->reduction, a.dtype = dtype, a.x = input_logprobs;
  a.y = target, a.flag = o->log_target;
  a.loss = loss, a.grad = grad_input, a.grad_loss = grad_loss;
  return run_ew(ctx, fn, &a, n, c, "input_logprobs", "target");
}

void culoss_margin_ranking_options_init(culoss_margin_ranking_options *o) {
  if (o == NULL) return;
  o->reduction = CULOSS_REDUCTION_MEAN;
  o->margin = 0.0f;
}

void culoss_gaussian_nll_options_init(culoss_gaussian_nll_options *o) {
  if (o == NULL) return;
  o->reduction = CULOSS_REDUCTION_MEAN;
  o->full = 0;
  o->eps = 1e-6f;
}

culoss_status culoss_margin_ranking(culoss_context *ctx, const culoss_margin_ranking_options *o,
                                    int64_t n, culoss_dtype dtype, const void *input1,
                                    const void *input2, const void *target, float *loss,
                                    void *grad_input1, void *grad_input2, const float *grad_loss) {
  const char *fn = "culoss_margin_ranking";
  culoss_margin_ranking_options d;
  culoss__ew_args a = {0};
  if (o == NULL) culoss_margin_ranking_options_init(&d), o = &d;
  if (!isfinite(o->margin))
    return CULOSS__BAD("%s: margin = %g must be finite", fn, (double)o->margin);
  a.op = CULOSS__EW_MARGIN_RANKING, a.reduction = o->reduction, a.dtype = dtype;
  a.x = input1, a.x2 = input2, a.y = target, a.a = o->margin;
  a.loss = loss, a.grad = grad_input1, a.grad2 = grad_input2, a.grad_loss = grad_loss;
  return run_ew(ctx, fn, &a, n, 1, "input1", "target");
}

culoss_status culoss_gaussian_nll(culoss_context *ctx, const culoss_gaussian_nll_options *o,
                                  int64_t n, culoss_dtype dtype, const void *input,
                                  const void *target, const void *var, float *loss,
                                  void *grad_input, void *grad_var, const float *grad_loss) {
  const char *fn = "culoss_gaussian_nll";
  culoss_gaussian_nll_options d;
  culoss__ew_args a = {0};
  if (o == NULL) culoss_gaussian_nll_options_init(&d), o = &d;
  if (o->full != 0 && o->full != 1) return CULOSS__BAD("%s: full = %d must be 0 or 1", fn, o->full);
  if (!(o->eps >= 0.0f && isfinite(o->eps)))
    return CULOSS__BAD("%s: eps = %g must be finite and >= 0", fn, (double)o->eps);
  a.op = CULOSS__EW_GAUSSIAN_NLL, a.reduction = o->reduction, a.dtype = dtype;
  a.x = input, a.y = target, a.x2 = var, a.a = o->eps, a.flag = o->full;
  a.loss = loss, a.grad = grad_input, a.grad2 = grad_var, a.grad_loss = grad_loss;
  return run_ew(ctx, fn, &a, n, 1, "input", "target");
}
