/*
 * embedding_ref.c: the CPU reference of the embedding losses, in double
 * precision, from docs/semantics.md section 11 (PyTorch's composites:
 * cosine_embedding_loss, pairwise_distance + clamp_min), independent of the
 * kernel.
 */
#include <math.h>
#include <stdlib.h>

#include "internal.h"

static double ld_at(const culoss__emb_args *a, int k, int64_t e) {
  return (double)culoss__load_f32(a->x[k], a->dtype, e);
}

/* |u - v + eps|_p of row `off` of inputs ku and kv. */
static double dist(const culoss__emb_args *a, int ku, int kv, int64_t off) {
  const double p = a->p, eps = a->eps;
  double s = 0.0;
  for (int64_t j = 0; j < a->d; j++) {
    const double u = fabs(ld_at(a, ku, off + j) - ld_at(a, kv, off + j) + eps);
    s += p == 2.0 ? u * u : (p == 1.0 ? u : pow(u, p));
  }
  return p == 2.0 ? sqrt(s) : (p == 1.0 ? s : pow(s, 1.0 / p));
}

/* d dist / d u_j for u = x_ku - x_kv + eps: sign(u) |u|^(p-1) / dist^(p-1),
   0 where the distance is 0 (torch's norm backward). */
static double ddist(const culoss__emb_args *a, int ku, int kv, int64_t e, double dd) {
  const double p = a->p, u = ld_at(a, ku, e) - ld_at(a, kv, e) + a->eps;
  if (dd == 0.0) return 0.0;
  if (p == 1.0) return u > 0 ? 1.0 : (u < 0 ? -1.0 : 0.0);
  if (p == 2.0) return u / dd;
  return (u > 0 ? 1.0 : (u < 0 ? -1.0 : 0.0)) * pow(fabs(u) / dd, p - 1.0);
}

/* One row: the loss, and the gradients written (scaled by s). The row's
   inputs are read in full before any gradient is written (in-place). */
static double row(const culoss__emb_args *a, int64_t i, double s, double *gbuf) {
  const int64_t off = i * a->ld, d = a->d;
  double l;
  if (a->op == CULOSS__EMB_ML_SOFT) { /* (1/c) sum_j w_j BCE-with-logits(x_j, y_j) */
    l = 0.0;
    for (int64_t j = 0; j < d; j++) {
      const double x = ld_at(a, 0, off + j), y = ld_at(a, 1, off + j);
      const double w = a->weight ? (double)a->weight[a->weight_per_row ? off + j : j] : 1.0;
      const double e = exp(-fabs(x)), sg = x >= 0 ? 1.0 / (1.0 + e) : e / (1.0 + e);
      /* y softplus(-x) + (1 - y) softplus(x): +-inf logits as torch's */
      l += w * (y * (fmax(-x, 0.0) + log1p(e)) + (1.0 - y) * (fmax(x, 0.0) + log1p(e)));
      gbuf[j] = s * w * (sg - y) / (double)d;
    }
    return l / (double)d;
  }
  if (a->op == CULOSS__EMB_COSINE) {
    double dot = 0.0, n1 = 0.0, n2 = 0.0;
    for (int64_t j = 0; j < d; j++) {
      const double u = ld_at(a, 0, off + j), v = ld_at(a, 1, off + j);
      dot += u * v, n1 += u * u, n2 += v * v;
    }
    n1 += 1e-12, n2 += 1e-12;
    const double den = sqrt(n1 * n2), cs = dot / den, y = a->target[i];
    double dl = 0.0; /* dl / dcos */
    if (y == 1.0) {
      l = 1.0 - cs;
      dl = -1.0;
    } else if (y == -1.0) {
      const double z = cs - a->margin;
      l = (z > 0 || isnan(z)) ? z : 0.0;
      dl = z > 0 ? 1.0 : 0.0;
    } else {
      l = 0.0;
    }
    for (int64_t j = 0; j < d; j++) {
      const double u = ld_at(a, 0, off + j), v = ld_at(a, 1, off + j);
      gbuf[j] = s * dl * (v / den - cs * u / n1);
      gbuf[d + j] = s * dl * (u / den - cs * v / n2);
    }
    return l;
  }
  const double dap = dist(a, 0, 1, off), dan = dist(a, 0, 2, off);
  double wa = 1.0, wp = 0.0, dneg = dan, dpn = 0.0;
  if (a->swap) {
    dpn = dist(a, 1, 2, off);
    if (dpn < dan)
      wa = 0.0, wp = 1.0, dneg = dpn;
    else if (dpn == dan)
      wa = wp = 0.5; /* torch.minimum's tie */
  }
  const double z = dap - dneg + a->margin;
  l = (z > 0 || isnan(z)) ? z : 0.0;
  const double c = z > 0 ? s : 0.0;
  for (int64_t j = 0; j < d; j++) {
    const int64_t e = off + j;
    const double gap = ddist(a, 0, 1, e, dap), gan = wa != 0.0 ? ddist(a, 0, 2, e, dan) : 0.0;
    const double gpn = wp != 0.0 ? ddist(a, 1, 2, e, dpn) : 0.0;
    gbuf[j] = c * (gap - wa * gan);
    gbuf[d + j] = c * (-gap - wp * gpn);
    gbuf[2 * d + j] = c * (wa * gan + wp * gpn);
  }
  return l;
}

culoss_status culoss__cpu_embedding(const culoss__emb_args *a) {
  const int reduced = a->reduction != CULOSS_REDUCTION_NONE;
  const int ninputs = a->op == CULOSS__EMB_TRIPLET ? 3 : (a->op == CULOSS__EMB_ML_SOFT ? 1 : 2);
  double total = 0.0, scale = 1.0;
  double *gbuf = NULL;
  if (a->n > 0) {
    gbuf = malloc((size_t)(3 * a->d) * sizeof *gbuf);
    if (gbuf == NULL)
      return culoss__error(
          CULOSS_ERROR_OUT_OF_MEMORY, "culoss_%s: CPU reference row buffer",
          a->op == CULOSS__EMB_COSINE
              ? "cosine_embedding"
              : (a->op == CULOSS__EMB_TRIPLET ? "triplet_margin" : "multilabel_soft_margin"));
  }
  if (reduced) {
    const double g = a->grad_loss ? (double)a->grad_loss[0] : 1.0;
    scale = a->reduction == CULOSS_REDUCTION_SUM ? g : (a->n == 0 ? 0.0 : g / (double)a->n);
  }
  for (int64_t i = 0; i < a->n; i++) {
    const double s = reduced ? scale : (a->grad_loss ? (double)a->grad_loss[i] : 1.0);
    const double l = row(a, i, s, gbuf);
    if (reduced)
      total += l;
    else
      a->loss[i] = (float)l;
    for (int k = 0; k < ninputs; k++)
      if (a->grad[k])
        for (int64_t j = 0; j < a->d; j++)
          culoss__store_f32(a->grad[k], a->dtype, i * a->ld + j, (float)gbuf[k * a->d + j]);
  }
  free(gbuf);
  if (a->reduction == CULOSS_REDUCTION_SUM)
    a->loss[0] = (float)total;
  else if (reduced)
    a->loss[0] = (float)(total / (double)a->n); /* n == 0: 0/0 = NaN */
  return CULOSS_OK;
}
