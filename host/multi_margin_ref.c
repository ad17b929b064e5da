/*
 * multi_margin_ref.c: the CPU reference of the multi-class hinge, in double
 * precision, from docs/semantics.md section 5 (independent of the kernel).
 */
#include "internal.h"

culoss_status culoss__cpu_multi_margin(const culoss__mm_args *a) {
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
