/*
 * linear_ce_ref.c: the CPU reference of fused linear + cross-entropy: the
 * logits of one row at a time in double, then cross_entropy_ref.c's row.
 */
#include <math.h>
#include <stdlib.h>

#include "internal.h"

void culoss__cpu_store_sum(void *dst, culoss_dtype dtype, const double *src, int64_t count,
                           int accumulate) {
  int64_t j;
  for (j = 0; j < count; j++) {
    const double old = accumulate ? culoss__load_f32(dst, dtype, j) : 0.0;
    culoss__store_f32(dst, dtype, j, (float)(old + src[j]));
  }
}

culoss_status culoss__cpu_linear_cross_entropy(const culoss__lce_args *a) {
  const culoss_cross_entropy_options *o = &a->o;
  const int64_t n = a->n, d = a->d, v = a->v;
  const double cap = o->logit_softcap;
  const double denom = o->reduction == CULOSS_REDUCTION_MEAN
                           ? culoss__cpu_ce_denominator(o, 0, n, a->targets, a->ttype)
                           : 1.0;
  const double wsum = culoss__cpu_ce_wsum(o, v);
  double *x = malloc((size_t)v * sizeof *x), *g = malloc((size_t)v * sizeof *g);
  double *h = malloc((size_t)d * sizeof *h);
  double *gw = a->grad_weight ? calloc((size_t)v * (size_t)d, sizeof *gw) : NULL;
  double *gb = a->grad_bias ? calloc((size_t)v, sizeof *gb) : NULL;
  double total = 0.0;
  int64_t i, j, k;
  if (!x || !g || !h || (a->grad_weight && !gw) || (a->grad_bias && !gb)) {
    free(x), free(g), free(h), free(gw), free(gb);
    return culoss__error(CULOSS_ERROR_OUT_OF_MEMORY, "cpu linear cross-entropy: out of memory");
  }
  for (i = 0; i < n; i++) {
    const int64_t t = culoss__target_at(a->targets, a->ttype, i);
    const double scale = culoss__cpu_ce_scale(o, a->grad_loss, i, denom);
    double row_loss = 0.0;
    for (k = 0; k < d; k++) h[k] = culoss__load_f32(a->hidden, a->dtype, i * d + k);
    for (j = 0; j < v; j++) { /* the logits, in double, one row at a time */
      double z = a->bias ? (double)culoss__load_f32(a->bias, a->dtype, j) : 0.0;
      for (k = 0; k < d; k++) z += h[k] * (double)culoss__load_f32(a->weight, a->dtype, j * d + k);
      x[j] = cap > 0.0 ? cap * tanh(z / cap) : z;
      g[j] = 0.0;
    }
    if (t != o->ignore_index) row_loss = culoss__cpu_ce_row(o, v, x, t, NULL, wsum, scale, g);
    culoss__cpu_put_row_stats(a->lse, a->entropy, i, t == o->ignore_index, v, x);
    if (o->reduction == CULOSS_REDUCTION_NONE)
      a->loss[i] = (float)row_loss;
    else
      total += row_loss;
    if (a->grad_hidden)
      for (k = 0; k < d; k++) {
        double s = 0.0;
        for (j = 0; j < v; j++)
          s += g[j] * (double)culoss__load_f32(a->weight, a->dtype, j * d + k);
        culoss__store_f32(a->grad_hidden, a->dtype, i * d + k, (float)s);
      }
    if (gw)
      for (j = 0; j < v; j++)
        for (k = 0; k < d; k++) gw[j * d + k] += g[j] * h[k];
    if (gb)
      for (j = 0; j < v; j++) gb[j] += g[j];
  }
  /* in grad_weight_dtype; accumulate: the old value plus the sum, rounded once */
  if (gw) culoss__cpu_store_sum(a->grad_weight, a->gw_dtype, gw, v * d, a->accumulate);
  if (gb) culoss__cpu_store_sum(a->grad_bias, a->gw_dtype, gb, v, a->accumulate);
  if (o->reduction == CULOSS_REDUCTION_SUM)
    a->loss[0] = (float)total;
  else if (o->reduction == CULOSS_REDUCTION_MEAN)
    a->loss[0] = denom == 0.0 ? NAN : (float)(total / denom); /* D == 0: NaN, never inf */
  free(x), free(g), free(h), free(gw), free(gb);
  return CULOSS_OK;
}
