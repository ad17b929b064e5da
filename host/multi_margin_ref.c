/*
 * multi_margin_ref.c: the CPU reference of the multi-class hinge, in double
 * precision, from docs/semantics.md section 5 (independent of the kernel).
 */
#include <math.h>
#include <stdlib.h>

#include "internal.h"

/* The multi-label margin (targets checked by the caller). */
static culoss_status cpu_multilabel(const culoss__mm_args *a) {
  const int reduced = a->o.reduction != CULOSS_REDUCTION_NONE;
  const int64_t c = a->c;
  double total = 0.0, scale = 1.0;
  char *is_t = calloc((size_t)c, 1);
  double *xs = malloc((size_t)c * sizeof *xs), *g = malloc((size_t)c * sizeof *g);
  if (c > 0 && (!is_t || !xs || !g)) {
    free(is_t), free(xs), free(g);
    return culoss__error(CULOSS_ERROR_OUT_OF_MEMORY, "culoss_multilabel_margin: CPU reference");
  }
  if (reduced) {
    const double gl = a->grad_loss ? (double)a->grad_loss[0] : 1.0;
    scale = a->o.reduction == CULOSS_REDUCTION_SUM ? gl : (a->n == 0 ? 0.0 : gl / (double)a->n);
  }
  for (int64_t i = 0; i < a->n; i++) {
    const int64_t off = i * a->ld;
    const double s = reduced ? scale : (a->grad_loss ? (double)a->grad_loss[i] : 1.0);
    int64_t k = 0;
    while (k < c && culoss__target_at(a->targets, a->ttype, i * c + k) >= 0) k++;
    for (int64_t j = 0; j < c; j++)
      xs[j] = culoss__load_f32(a->x, a->dtype, off + j), g[j] = 0.0, is_t[j] = 0;
    for (int64_t q = 0; q < k; q++) is_t[culoss__target_at(a->targets, a->ttype, i * c + q)] = 1;
    double l = 0.0;
    for (int64_t q = 0; q < k; q++) {
      const int64_t t = culoss__target_at(a->targets, a->ttype, i * c + q);
      for (int64_t j = 0; j < c; j++) {
        if (is_t[j]) continue;
        const double z = 1.0 - xs[t] + xs[j];
        if (z > 0) /* PyTorch's test: a NaN pair adds nothing */
          l += z, g[j] += s / (double)c, g[t] -= s / (double)c;
      }
    }
    if (a->grad)
      for (int64_t j = 0; j < c; j++) culoss__store_f32(a->grad, a->dtype, off + j, (float)g[j]);
    l /= (double)c;
    if (reduced)
      total += l;
    else
      a->loss[i] = (float)l;
  }
  free(is_t), free(xs), free(g);
  if (a->o.reduction == CULOSS_REDUCTION_SUM)
    a->loss[0] = (float)total;
  else if (reduced)
    a->loss[0] = (float)(total / (double)a->n);
  return CULOSS_OK;
}

culoss_status culoss__cpu_multi_margin(const culoss__mm_args *a) {
  if (a->multilabel) return cpu_multilabel(a);
  const int reduced = a->o.reduction != CULOSS_REDUCTION_NONE;
  const double margin = a->o.margin, c = (double)a->c;
  double total = 0.0, scale = 1.0;
  int64_t i, j;
  if (reduced) {
    const double g = a->grad_loss ? (double)a->grad_loss[0] : 1.0;
    scale = a->o.reduction == CULOSS_REDUCTION_SUM ? g : (a->n == 0 ? 0.0 : g / (double)a->n);
  }
  for (i = 0; i < a->n; i++) {
    const int64_t off = i * a->ld, y = culoss__target_at(a->targets, a->ttype, i);
    const double wy = a->o.class_weight ? (double)a->o.class_weight[y] : 1.0;
    const double xy = culoss__load_f32(a->x, a->dtype, off + y);
    const double s = reduced ? scale : (a->grad_loss ? (double)a->grad_loss[i] : 1.0);
    double l = 0.0, hsum = 0.0;
    for (j = 0; j < a->c; j++) {
      double z, h = 0.0;
      if (j == y) continue;
      z = margin - xy + (double)culoss__load_f32(a->x, a->dtype, off + j);
      if (z > 0) {
        l += a->o.p == 1 ? z : z * z;
        h = s * wy * (a->o.p == 1 ? 1.0 : 2.0 * z) / c;
        hsum += h;
      }
      /* x_y was read above, so writing over an aliased row is safe */
      if (a->grad) culoss__store_f32(a->grad, a->dtype, off + j, (float)h);
    }
    if (a->grad) culoss__store_f32(a->grad, a->dtype, off + y, (float)-hsum);
    l *= wy / c;
    if (reduced)
      total += l;
    else
      a->loss[i] = (float)l;
  }
  if (a->o.reduction == CULOSS_REDUCTION_SUM)
    a->loss[0] = (float)total;
  else if (reduced)
    a->loss[0] = (float)(total / (double)a->n);
  return CULOSS_OK;
}
