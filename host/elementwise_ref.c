/*
 * elementwise_ref.c: the CPU reference of the elementwise losses, in double
 * precision, written from docs/semantics.md sections 4-7 independently of
 * the kernels' fp32 helpers in common/loss_math.h (the tests hold the two
 * against each other).
 */
#include <math.h>

#include "internal.h"

/* log(sigmoid(x)) and sigmoid(x) in double, overflow-free. */
static double log_sigmoid(double x) { return fmin(x, 0.0) - log1p(exp(-fabs(x))); }
static double sigmoid(double x) {
  double e = exp(-fabs(x));
  return x >= 0 ? 1.0 / (1.0 + e) : e / (1.0 + e);
}
/* torch's sign: sign(0) = 0 and sign(NaN) = 0 (the L1 subgradient). */
static double sign0(double r) { return r > 0 ? 1.0 : (r < 0 ? -1.0 : 0.0); }

/* Loss of element i and its derivatives with respect to the input (d) and,
   for the ops with a second differentiable input, to x2 (d2). */
static double element(const culoss__ew_args *a, int64_t i, double *d, double *d2) {
  const double x = culoss__load_f32(a->x, a->dtype, i);
  const double y = culoss__load_f32(a->y, a->dtype, i);
  const double w = a->weight ? (double)a->weight[i] : 1.0;
  const double p = (double)a->a;
  double r = x - y, l;
  switch (a->op) {
  case CULOSS__EW_BCE_LOGITS: {
    const double pw = a->pos_weight ? (double)a->pos_weight[i % a->c] : 1.0;
    const double lw = 1.0 + (pw - 1.0) * y;
    *d = w * (lw * sigmoid(x) - pw * y);
    return w * ((1.0 - y) * x - lw * log_sigmoid(x));
  }
  case CULOSS__EW_BCE:
    *d = w * (x - y) / fmax(x * (1.0 - x), 1e-12);
    return -w * (y * fmax(log(x), -100.0) + (1.0 - y) * fmax(log1p(-x), -100.0));
  case CULOSS__EW_HINGE: {
    /* clamp_min(z, 0): NaN stays NaN; torch 2.15 gives subgradient 0 at
       the kink z == 0 and at a NaN z (the mask z > 0 is false) */
    const double z = p - y * x, zp = (z > 0 || isnan(z)) ? z : 0.0;
    if (a->flag) {
      *d = z > 0 ? -2.0 * y * z : 0.0;
      return zp * zp;
    }
    *d = z > 0 ? -y : 0.0;
    return zp;
  }
  case CULOSS__EW_MSE: *d = 2.0 * r; return r * r;
  case CULOSS__EW_L1: *d = sign0(r); return fabs(r);
  case CULOSS__EW_HUBER:
    *d = isnan(r) ? r : fmin(fmax(r, -p), p);
    return fabs(r) < p ? 0.5 * r * r : p * (fabs(r) - 0.5 * p);
  case CULOSS__EW_SMOOTH_L1:
    if (p == 0.0 || fabs(r) >= p) {
      *d = sign0(r);
      return fabs(r) - 0.5 * p;
    }
    *d = r / p;
    return 0.5 * r * r / p;
  case CULOSS__EW_HINGE_EMBEDDING: { /* both terms for a y other than +-1 */
    const double z = p - x;
    *d = (y != -1.0 ? 1.0 : 0.0) - (y != 1.0 && z > 0 ? 1.0 : 0.0);
    return (y != 1.0 ? ((z > 0 || isnan(z)) ? z : 0.0) : 0.0) + (y != -1.0 ? x : 0.0);
  }
  case CULOSS__EW_SOFT_MARGIN: { /* log(1 + e^z), z = -y x, as softplus */
    const double z = -y * x;
    *d = -y * sigmoid(z);
    return fmax(z, 0.0) + log1p(exp(-fabs(z)));
  }
  case CULOSS__EW_POISSON_NLL:
    if (a->flag & 1) {
      *d = exp(x) - y;
      l = exp(x) - y * x;
    } else {
      *d = 1.0 - y / (x + p);
      l = x - y * log(x + p);
    }
    if ((a->flag & 2) && y > 1.0) l += y * log(y) - y + 0.5 * log(2.0 * 3.14159265358979324 * y);
    return l;
  case CULOSS__EW_SIGMOID_FOCAL: { /* torchvision: section 9 */
    const double alpha = p, gamma = (double)a->b, s = sigmoid(x), s1 = sigmoid(-x);
    const double ce = (1.0 - y) * x - log_sigmoid(x);
    const double omp = y * s1 + (1.0 - y) * s; /* 1 - p_t, p_t = s y + (1 - s)(1 - y) */
    const double at = alpha >= 0.0 ? alpha * y + (1.0 - alpha) * (1.0 - y) : 1.0;
    const double pw = gamma == 0.0 ? 1.0 : pow(omp, gamma);
    const double pw1 = gamma == 0.0 || !(omp > 0.0) ? 0.0 : gamma * pow(omp, gamma - 1.0);
    *d = at * ((s - y) * pw - pw1 * (2.0 * y - 1.0) * s * s1 * ce);
    return at * ce * pw;
  }
  case CULOSS__EW_MARGIN_RANKING: { /* clamp_min: 0 at the kink and at NaN */
    const double z = -y * (x - (double)culoss__load_f32(a->x2, a->dtype, i)) + p;
    *d = z > 0 ? -y : 0.0;
    *d2 = -*d;
    return (z > 0 || isnan(z)) ? z : 0.0;
  }
  case CULOSS__EW_GAUSSIAN_NLL: { /* v = max(var, eps), NaN kept */
    const double var = culoss__load_f32(a->x2, a->dtype, i), v = var < p ? p : var;
    *d = r / v;
    *d2 = 0.5 * (1.0 - r * r / v) / v;
    l = 0.5 * (log(v) + r * r / v);
    if (a->flag) l += 0.5 * log(2.0 * 3.14159265358979324);
    return l;
  }
  case CULOSS__EW_KL:
    if (a->flag) {
      const double e = exp(y);
      *d = -e;
      return e * (y - x);
    }
    *d = -y;
    l = (y == 0.0 ? 0.0 : y * log(y)) - y * x;
    return l;
  }
  *d = 0.0;
  return 0.0;
}

culoss_status culoss__cpu_elementwise(const culoss__ew_args *a) {
  const int reduced = a->reduction != CULOSS_REDUCTION_NONE;
  double total = 0.0, scale = 1.0;
  int64_t i;
  if (reduced) {
    const double g = a->grad_loss ? (double)a->grad_loss[0] : 1.0;
    scale = a->reduction == CULOSS_REDUCTION_SUM ? g : (a->divisor == 0 ? 0.0 : g / a->divisor);
  }
  for (i = 0; i < a->m; i++) {
    double d, d2 = 0.0;
    const double l = element(a, i, &d, &d2); /* reads x[i] before grad[i] is written */
    if (reduced)
      total += l;
    else
      a->loss[i] = (float)l;
    if (a->grad) {
      const double s = reduced ? scale : (a->grad_loss ? (double)a->grad_loss[i] : 1.0);
      culoss__store_f32(a->grad, a->dtype, i, (float)(d * s));
    }
    if (a->grad2) {
      const double s = reduced ? scale : (a->grad_loss ? (double)a->grad_loss[i] : 1.0);
      culoss__store_f32(a->grad2, a->dtype, i, (float)(d2 * s));
    }
  }
  if (a->reduction == CULOSS_REDUCTION_SUM)
    a->loss[0] = (float)total;
  else if (reduced)
    a->loss[0] = (float)(total / a->divisor); /* m == 0: 0/0 = NaN */
  return CULOSS_OK;
}
