/*
 * cross_entropy_ref.c: the CPU backend of the cross-entropy family, which is
 * also the oracle every GPU result is tested against.
 *
 * Straightforward loops with double accumulation, deliberately independent
 * of the kernels' structure: one row at a time, the maximum first, then the
 * sum of exponentials, then the loss and the gradient from their closed forms
 * (docs/semantics.md sections 1-3 and 9). Arguments arrive validated and class
 * targets already range-checked (host/cross_entropy.c).
 */
#include <math.h>
#include <stdlib.h>

#include "internal.h"

static double class_w(const culoss_cross_entropy_options *o, int64_t j) {
  return o->class_weight ? (double)o->class_weight[j] : 1.0;
}

double culoss__cpu_row_max(int64_t c, const double *x, int *has_nan) {
  double m = -INFINITY;
  int64_t j;
  *has_nan = 0;
  for (j = 0; j < c; j++) {
    if (isnan(x[j]))
      *has_nan = 1;
    else if (x[j] > m)
      m = x[j];
  }
  return m;
}

/* The sum of exp(x_j - m) over a row with finite maximum m, without the
 * first maximum's term (exactly 1): the whole sum is 1 + rest, and
 * log1p(rest) and the maximum's p - 1 = -rest / (1 + rest) keep their
 * digits for a confident row, where 1 + rest rounds rest away (below 1e-16
 * in double: a target logit 37 ahead). u, if not NULL, gets
 * sum_j exp(x_j - m) (x_j - m). */
static double row_rest(int64_t c, const double *x, double m, double *u) {
  double rest = 0.0, uu = 0.0;
  int top = 1;
  int64_t j;
  for (j = 0; j < c; j++) {
    if (x[j] == -INFINITY) continue;
    if (x[j] == m && top) {
      top = 0;
      continue;
    }
    rest += exp(x[j] - m);
    uu += exp(x[j] - m) * (x[j] - m);
  }
  if (u) *u = uu;
  return rest;
}

/* One row's loss and gradient. Everything comes from the maximum m and the
 * sum s = sum_j exp(x_j - m) = 1 + rest, never from exp(x - lse) or lse - x:
 * at |x| >~ 1e11 the double lse = m + log s rounds back to m, which would
 * give every tied class p = 1 and a zero loss. So p_j = exp(x_j - m) / s and
 * lse - x_j = (m - x_j) + log1p(rest), a sum of two non-negative terms (no
 * cancellation; docs/semantics.md section 0). */
double culoss__cpu_ce_row(const culoss_cross_entropy_options *o, int64_t c, const double *x,
                          int64_t t, const double *y, double wsum, double scale, double *g) {
  const double eps = o->label_smoothing, z = o->z_loss;
  double m = -INFINITY, s = 0.0, rest = 0.0, log_s, lse, coef_a, row_loss = 0.0;
  int has_nan = 0;
  int64_t j;
  m = culoss__cpu_row_max(c, x, &has_nan);
  if (has_nan || m == INFINITY) { /* every value of the row comes out NaN */
    s = NAN, rest = NAN;
    if (has_nan) m = NAN;
  } else if (m != -INFINITY) {
    rest = row_rest(c, x, m, NULL);
    s = 1.0 + rest;
  } /* every logit -inf: m = -inf, s = 0, the loss comes out NaN below */
  log_s = m == -INFINITY ? log(s) : log1p(rest);
  lse = m + log_s;
  /* p_j, and p_j a - b with p - 1 = -rest / s at the maximum */
#define CULOSS__P(j) (x[j] == -INFINITY && !has_nan ? 0.0 : exp(x[j] - m) / s)
#define CULOSS__PA_B(j, a, b)                                                                      \
  (x[j] == m && isfinite(m) && rest < 1.0 ? (a) * (-rest / s) + ((a) - (b))                        \
                                          : CULOSS__P(j) * (a) - (b))
#define CULOSS__LSE_MINUS_X(j) ((m - x[j]) + log_s)
  if (y == NULL) { /* class index t */
    const double wt = class_w(o, t);
    row_loss = (1.0 - eps) * wt * CULOSS__LSE_MINUS_X(t);
    if (eps > 0.0) {
      double sw = 0.0; /* as torch, a zero weight on a -inf logit gives 0 * inf = NaN */
      for (j = 0; j < c; j++) sw += class_w(o, j) * CULOSS__LSE_MINUS_X(j);
      row_loss += eps / (double)c * sw;
    }
    /* the smoothing terms only with smoothing: eps = 0 with an infinite
       class weight would make them 0 * inf (the kernels guard them too) */
    coef_a = (1.0 - eps) * wt + (eps > 0.0 ? eps / (double)c * wsum : 0.0) + 2.0 * z * lse;
    for (j = 0; j < c; j++) {
      const double b =
          (j == t ? (1.0 - eps) * wt : 0.0) + (eps > 0.0 ? eps / (double)c * class_w(o, j) : 0.0);
      g[j] = scale * CULOSS__PA_B(j, coef_a, b);
    }
  } else { /* probability targets y */
    double swy = 0.0;
    for (j = 0; j < c; j++) {
      const double wy = class_w(o, j) * ((1.0 - eps) * y[j] + eps / (double)c);
      g[j] = wy; /* keep w_j y'_j for the gradient */
      swy += wy;
      if (wy != 0.0) row_loss += wy * CULOSS__LSE_MINUS_X(j); /* 0 * -inf counts as 0 */
    }
    coef_a = swy + 2.0 * z * lse;
    for (j = 0; j < c; j++) g[j] = scale * CULOSS__PA_B(j, coef_a, g[j]);
  }
#undef CULOSS__P
#undef CULOSS__PA_B
#undef CULOSS__LSE_MINUS_X
  row_loss += z * lse * lse;
  if (o->logit_softcap > 0.0) {
    const double cap = o->logit_softcap;
    for (j = 0; j < c; j++) g[j] *= 1.0 - (x[j] / cap) * (x[j] / cap);
  }
  return row_loss;
}

void culoss__cpu_put_row_stats(float *lse, float *entropy, int64_t i, int ignored, int64_t c,
                               const double *x) {
  double l = 0.0, e = 0.0;
  if (lse == NULL && entropy == NULL) return;
  if (!ignored) culoss__cpu_row_stats(c, x, &l, &e);
  if (lse) lse[i] = (float)l;
  if (entropy) entropy[i] = (float)e;
}

void culoss__cpu_row_stats(int64_t c, const double *x, double *lse, double *entropy) {
  double m = -INFINITY, rest, u = 0.0;
  int has_nan = 0;
  m = culoss__cpu_row_max(c, x, &has_nan);
  if (has_nan || m == INFINITY) {
    *lse = *entropy = NAN;
    return;
  }
  if (m == -INFINITY) { /* NaN: NaN; every logit -inf: lse -inf, entropy NaN */
    *lse = has_nan ? NAN : -INFINITY;
    *entropy = NAN;
    return;
  }
  /* H = lse - sum_j p_j x_j = log s - sum_j p_j (x_j - m): no cancellation at
     large common offsets; a -inf logit has p = 0 and adds nothing */
  rest = row_rest(c, x, m, &u);
  *lse = m + log1p(rest);
  *entropy = log1p(rest) - u / (1.0 + rest);
}

double culoss__cpu_ce_denominator(const culoss_cross_entropy_options *o, int soft, int64_t n,
                                  const void *targets, culoss_index_type ttype) {
  double d = 0.0;
  int64_t i;
  if (o->normalizer) return (double)*o->normalizer;
  if (soft) return (double)n;
  for (i = 0; i < n; i++) {
    const int64_t t = culoss__target_at(targets, ttype, i);
    if (t != o->ignore_index) d += class_w(o, t);
  }
  return d;
}

double culoss__cpu_ce_scale(const culoss_cross_entropy_options *o, const float *grad_loss,
                            int64_t row, double denom) {
  double gl;
  if (o->reduction == CULOSS_REDUCTION_NONE) return grad_loss ? (double)grad_loss[row] : 1.0;
  gl = grad_loss ? (double)grad_loss[0] : 1.0;
  if (o->reduction == CULOSS_REDUCTION_SUM) return gl;
  return denom == 0.0 ? 0.0 : gl / denom; /* all ignored: zero gradient, as PyTorch */
}

double culoss__cpu_ce_wsum(const culoss_cross_entropy_options *o, int64_t c) {
  double w = 0.0;
  int64_t j;
  for (j = 0; j < c; j++) w += class_w(o, j);
  return w;
}

culoss_status culoss__cpu_cross_entropy(const culoss__ce_args *a) {
  const culoss_cross_entropy_options *o = &a->o;
  const int64_t n = a->n, c = a->c;
  const double cap = o->logit_softcap;
  const int soft = a->mode == CULOSS__CE_SOFT;
  const double denom = o->reduction == CULOSS_REDUCTION_MEAN
                           ? culoss__cpu_ce_denominator(o, soft, n, a->targets, a->ttype)
                           : 1.0;
  const double wsum = culoss__cpu_ce_wsum(o, c);
  double total = 0.0;
  double *x = (double *)malloc((size_t)c * sizeof *x);
  double *g = (double *)malloc((size_t)c * sizeof *g);
  double *y = soft ? (double *)malloc((size_t)c * sizeof *y) : NULL;
  int64_t i, j;

  if (x == NULL || g == NULL || (soft && y == NULL)) {
    free(x), free(g), free(y);
    return culoss__error(CULOSS_ERROR_OUT_OF_MEMORY, "cpu reference: no memory for a row of %lld",
                         (long long)c);
  }
  for (i = 0; i < n; i++) {
    const int64_t off = i * a->ld; /* 64-bit: n * ld may exceed 2^31 */
    const double scale = culoss__cpu_ce_scale(o, a->grad_loss, i, denom);
    const int64_t t = soft ? -1 : culoss__target_at(a->targets, a->ttype, i);
    double row_loss = 0.0;
    /* Read the whole row before writing any gradient: grad may alias x. */
    for (j = 0; j < c; j++) {
      const double v = (double)culoss__load_f32(a->x, a->dtype, off + j);
      x[j] = cap > 0.0 ? cap * tanh(v / cap) : v;
      g[j] = 0.0;
      if (soft) y[j] = (double)culoss__load_f32(a->probs, a->dtype, off + j);
    }
    if (!soft && t == o->ignore_index) {
      row_loss = 0.0; /* ignored: loss 0, gradient 0 */
    } else if (a->mode == CULOSS__NLL) {
      const double wt = class_w(o, t);
      row_loss = -wt * x[t];
      g[t] = -wt * scale;
    } else {
      row_loss = culoss__cpu_ce_row(o, c, x, t, y, wsum, scale, g);
    }
    culoss__cpu_put_row_stats(a->lse, a->entropy, i, t == o->ignore_index, c, x);
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
    /* D == 0 (n == 0, all ignored, or every target on a zero-weight class):
       NaN, as torch, even where the smoothing term made the sum positive */
    a->loss[0] = denom == 0.0 ? NAN : (float)(total / denom);
  free(x), free(g), free(y);
  return CULOSS_OK;
}
