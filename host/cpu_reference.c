/*
 * cpu_reference.c: the CPU backend, which is also the oracle every GPU result
 * is tested against.
 *
 * Straightforward loops with double accumulation, deliberately independent
 * of the kernels' structure: one row at a time, the maximum first, then the
 * sum of exponentials, then the loss and the gradient from their closed forms
 * (SEMANTICS.md sections 1-3 and 9). Arguments arrive validated and class
 * targets already range-checked (host/cross_entropy.c).
 */
#include <math.h>
#include <stdlib.h>

#include "internal.h"

static double class_w(const culoss__ce_args *a, int64_t j) {
  return a->o.class_weight ? (double)a->o.class_weight[j] : 1.0;
}

/* Denominator of MEAN: *normalizer if given, else n for soft targets, else
   the sum of the target weights of non-ignored rows. */
static double mean_denominator(const culoss__ce_args *a) {
  double d = 0.0;
  int64_t i;
  if (a->o.normalizer) return (double)*a->o.normalizer;
  if (a->mode == CULOSS__CE_SOFT) return (double)a->n;
  for (i = 0; i < a->n; i++) {
    int64_t t = culoss__target_at(a->targets, a->ttype, i);
    if (t != a->o.ignore_index) d += class_w(a, t);
  }
  return d;
}

culoss_status culoss__cpu_cross_entropy(const culoss__ce_args *a) {
  const culoss_cross_entropy_options *o = &a->o;
  const int64_t n = a->n, c = a->c;
  const double eps = o->label_smoothing, z = o->z_loss, cap = o->logit_softcap;
  double total = 0.0, denom = 1.0, wsum = 0.0;
  double *x = NULL, *g = NULL;
  int64_t i, j;

  if (o->reduction == CULOSS_REDUCTION_MEAN) denom = mean_denominator(a);
  if (a->mode == CULOSS__CE_INDEX && eps > 0.0)
    for (j = 0; j < c; j++) wsum += class_w(a, j);

  x = (double *)malloc((size_t)c * sizeof *x);
  g = (double *)malloc((size_t)c * sizeof *g);
  if (x == NULL || g == NULL) {
    free(x);
    free(g);
    return culoss__error(CULOSS_ERROR_OUT_OF_MEMORY, "cpu reference: no memory for a row of %lld",
                         (long long)c);
  }

  for (i = 0; i < n; i++) {
    const int64_t off = i * a->ld; /* 64-bit: n * ld may exceed 2^31 */
    double row_loss = 0.0, scale;
    int64_t t = -1;
    int ignored = 0;

    if (a->mode != CULOSS__CE_SOFT) {
      t = culoss__target_at(a->targets, a->ttype, i);
      ignored = (t == o->ignore_index);
    }
    if (o->reduction == CULOSS_REDUCTION_NONE)
      scale = a->grad_loss ? (double)a->grad_loss[i] : 1.0;
    else {
      double gl = a->grad_loss ? (double)a->grad_loss[0] : 1.0;
      scale = o->reduction == CULOSS_REDUCTION_SUM ? gl : (denom == 0.0 ? 0.0 : gl / denom);
    }

    /* Read the whole row before writing any gradient: grad may alias x. */
    for (j = 0; j < c; j++) {
      double v = (double)culoss__load_f32(a->x, a->dtype, off + j);
      x[j] = cap > 0.0 ? cap * tanh(v / cap) : v;
      g[j] = 0.0;
    }

    if (ignored) {
      row_loss = 0.0;
    } else if (a->mode == CULOSS__NLL) {
      double wt = class_w(a, t);
      row_loss = -wt * x[t];
      g[t] = -wt * scale;
    } else {
      double m = -INFINITY, s = 0.0, lse, coef_a;
      int has_nan = 0;
      for (j = 0; j < c; j++) {
        if (isnan(x[j]))
          has_nan = 1;
        else if (x[j] > m)
          m = x[j];
      }
      if (has_nan) {
        lse = NAN;
      } else if (m == -INFINITY) {
        lse = -INFINITY; /* every logit -inf: the loss comes out NaN below */
      } else {
        for (j = 0; j < c; j++) s += exp(x[j] - m);
        lse = m + log(s);
      }
      if (a->mode == CULOSS__CE_INDEX) {
        double wt = class_w(a, t);
        row_loss = (1.0 - eps) * wt * (lse - x[t]);
        if (eps > 0.0) {
          double swx = 0.0;
          for (j = 0; j < c; j++) swx += class_w(a, j) * x[j];
          row_loss += eps / (double)c * (wsum * lse - swx);
        }
        coef_a = (1.0 - eps) * wt + eps / (double)c * wsum + 2.0 * z * lse;
        for (j = 0; j < c; j++) {
          double p = x[j] == -INFINITY ? 0.0 : exp(x[j] - lse);
          double b = (j == t ? (1.0 - eps) * wt : 0.0) + eps / (double)c * class_w(a, j);
          g[j] = scale * (p * coef_a - b);
        }
      } else { /* soft targets */
        double swy = 0.0, swyx = 0.0;
        for (j = 0; j < c; j++) {
          double y = (1.0 - eps) * (double)culoss__load_f32(a->probs, a->dtype, off + j) +
                     eps / (double)c;
          double wy = class_w(a, j) * y;
          g[j] = wy; /* keep w_j y'_j for the gradient */
          swy += wy;
          if (wy != 0.0) swyx += wy * x[j]; /* 0 * -inf counts as 0 */
        }
        row_loss = swy * lse - swyx;
        coef_a = swy + 2.0 * z * lse;
        for (j = 0; j < c; j++) {
          double p = x[j] == -INFINITY ? 0.0 : exp(x[j] - lse);
          g[j] = scale * (p * coef_a - g[j]);
        }
      }
      row_loss += z * lse * lse;
      if (cap > 0.0)
        for (j = 0; j < c; j++) g[j] *= 1.0 - (x[j] / cap) * (x[j] / cap);
    }

    if (o->reduction == CULOSS_REDUCTION_NONE)
      a->loss[i] = (float)row_loss;
    else
      total += row_loss;
    if (a->grad)
      for (j = 0; j < c; j++) culoss__store_f32(a->grad, a->dtype, off + j, (float)g[j]);
  }

  if (o->reduction == CULOSS_REDUCTION_SUM)
    a->loss[0] = (float)total;
  else if (o->reduction == CULOSS_REDUCTION_MEAN)
    a->loss[0] = (float)(total / denom); /* n == 0 or all ignored: 0/0 = NaN */
  free(x);
  free(g);
  return CULOSS_OK;
}
