/* ew_call.h: one calling convention for every elementwise loss, so the CPU
   and GPU suites can loop over losses. */
#ifndef CULOSS_TEST_EW_CALL_H
#define CULOSS_TEST_EW_CALL_H

#include "culoss.h"

typedef enum {
  T_BCE_LOGITS,
  T_BCE,
  T_HINGE,
  T_SQ_HINGE,
  T_MSE,
  T_L1,
  T_HUBER,
  T_SMOOTH_L1,
  T_KL,
  T_KL_LOG,
  T_HINGE_EMB,
  T_SOFT_MARGIN,
  T_POISSON,
  T_POISSON_FULL, /* log_input 0, full 1 */
  T_FOCAL,
  T_NUM_OPS
} t_op;

static const char *const t_op_name[T_NUM_OPS] = {"bce_with_logits",
                                                 "bce",
                                                 "hinge",
                                                 "squared_hinge",
                                                 "mse",
                                                 "l1",
                                                 "huber",
                                                 "smooth_l1",
                                                 "kl_div",
                                                 "kl_div(log_target)",
                                                 "hinge_embedding",
                                                 "soft_margin",
                                                 "poisson_nll",
                                                 "poisson_nll(rates, full)",
                                                 "sigmoid_focal"};

typedef struct {
  culoss_reduction red;
  const float *weight, *pos_weight; /* BCE */
  float param;                      /* margin / delta / beta (0 = default) */
} t_opts;

/* n rows of c (flat losses use n*c elements). */
static inline culoss_status ew_call(culoss_context *ctx, t_op op, const t_opts *t, int64_t n,
                                    int64_t c, culoss_dtype dt, const void *x, const void *y,
                                    float *loss, void *grad, const float *gl) {
  switch (op) {
  case T_BCE_LOGITS:
  case T_BCE: {
    culoss_bce_options o;
    culoss_bce_options_init(&o);
    o.reduction = t->red, o.weight = t->weight, o.pos_weight = op == T_BCE ? NULL : t->pos_weight;
    return op == T_BCE ? culoss_bce(ctx, &o, n, c, dt, x, y, loss, grad, gl)
                       : culoss_bce_with_logits(ctx, &o, n, c, dt, x, y, loss, grad, gl);
  }
  case T_HINGE:
  case T_SQ_HINGE: {
    culoss_hinge_options o;
    culoss_hinge_options_init(&o);
    o.reduction = t->red, o.squared = op == T_SQ_HINGE;
    if (t->param != 0) o.margin = t->param;
    return culoss_hinge(ctx, &o, n * c, dt, x, y, loss, grad, gl);
  }
  case T_HINGE_EMB: {
    culoss_hinge_embedding_options o;
    culoss_hinge_embedding_options_init(&o);
    o.reduction = t->red;
    if (t->param != 0) o.margin = t->param;
    return culoss_hinge_embedding(ctx, &o, n * c, dt, x, y, loss, grad, gl);
  }
  case T_SOFT_MARGIN: {
    culoss_soft_margin_options o;
    culoss_soft_margin_options_init(&o);
    o.reduction = t->red;
    return culoss_soft_margin(ctx, &o, n * c, dt, x, y, loss, grad, gl);
  }
  case T_POISSON:
  case T_POISSON_FULL: {
    culoss_poisson_nll_options o;
    culoss_poisson_nll_options_init(&o);
    o.reduction = t->red;
    if (op == T_POISSON_FULL) o.log_input = 0, o.full = 1;
    return culoss_poisson_nll(ctx, &o, n * c, dt, x, y, loss, grad, gl);
  }
  case T_FOCAL: {
    culoss_sigmoid_focal_options o;
    culoss_sigmoid_focal_options_init(&o);
    o.reduction = t->red;
    if (t->param != 0) o.gamma = t->param;
    return culoss_sigmoid_focal(ctx, &o, n * c, dt, x, y, loss, grad, gl);
  }
  case T_KL:
  case T_KL_LOG: {
    culoss_kl_div_options o;
    culoss_kl_div_options_init(&o);
    o.reduction = t->red, o.log_target = op == T_KL_LOG;
    return culoss_kl_div(ctx, &o, n, c, dt, x, y, loss, grad, gl);
  }
  default: {
    culoss_regression_options o;
    culoss_regression_options_init(&o);
    o.reduction = t->red;
    if (t->param != 0) o.delta = o.beta = t->param;
    if (op == T_MSE) return culoss_mse(ctx, &o, n * c, dt, x, y, loss, grad, gl);
    if (op == T_L1) return culoss_l1(ctx, &o, n * c, dt, x, y, loss, grad, gl);
    if (op == T_HUBER) return culoss_huber(ctx, &o, n * c, dt, x, y, loss, grad, gl);
    return culoss_smooth_l1(ctx, &o, n * c, dt, x, y, loss, grad, gl);
  }
  }
}

/* Fills valid random inputs for op: x and y of m elements (float). Values
   are kept away from kinks by `gap` so finite differences are meaningful. */
static inline void ew_fill(rng_t *r, t_op op, float *x, float *y, int64_t m, double gap) {
  for (int64_t i = 0; i < m; i++) {
    switch (op) {
    case T_BCE_LOGITS:
      x[i] = (float)(3.0 * rng_normal(r));
      y[i] = (float)rng_uniform(r);
      break;
    case T_BCE:
      x[i] = (float)(0.02 + 0.96 * rng_uniform(r));
      y[i] = (float)rng_uniform(r);
      break;
    case T_HINGE:
    case T_SQ_HINGE: {
      y[i] = rng_uniform(r) < 0.5 ? -1.0f : 1.0f;
      double f;
      do f = 2.0 * rng_normal(r);
      while (fabs(1.0 - y[i] * f) < gap);
      x[i] = (float)f;
      break;
    }
    case T_KL:
      x[i] = (float)(-3.0 * rng_uniform(r) - 0.01);
      y[i] = rng_uniform(r) < 0.2 ? 0.0f : (float)rng_uniform(r);
      break;
    case T_KL_LOG:
      x[i] = (float)(-3.0 * rng_uniform(r) - 0.01);
      y[i] = (float)(-4.0 * rng_uniform(r));
      break;
    case T_HINGE_EMB: { /* +-1, and some 0 (both terms, as PyTorch) */
      const double u = rng_uniform(r);
      y[i] = u < 0.45 ? -1.0f : (u < 0.9 ? 1.0f : 0.0f);
      double f;
      do f = 2.0 * rng_normal(r);
      while (fabs(1.0 - f) < gap);
      x[i] = (float)f;
      break;
    }
    case T_SOFT_MARGIN:
      y[i] = rng_uniform(r) < 0.5 ? -1.0f : 1.0f;
      x[i] = (float)(3.0 * rng_normal(r));
      break;
    case T_POISSON: /* log rates, counts */
      x[i] = (float)(0.8 * rng_normal(r));
      y[i] = (float)rng_int(r, 0, 6);
      break;
    case T_POISSON_FULL: /* rates, counts (the Stirling term where y > 1) */
      x[i] = (float)(0.1 + 5.0 * rng_uniform(r));
      y[i] = (float)rng_int(r, 0, 8);
      break;
    case T_FOCAL: /* logits, labels (a few soft ones) */
      x[i] = (float)(3.0 * rng_normal(r));
      y[i] = rng_uniform(r) < 0.1 ? (float)rng_uniform(r) : (rng_uniform(r) < 0.3 ? 1.0f : 0.0f);
      break;
    default: {
      double d;
      y[i] = (float)rng_normal(r);
      do d = 2.0 * rng_normal(r);
      while (fabs(d) < gap || fabs(fabs(d) - 1.0) < gap);
      x[i] = (float)(y[i] + d);
      break;
    }
    }
  }
}

#endif
