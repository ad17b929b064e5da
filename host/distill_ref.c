/*
 * distill_ref.c: the CPU reference of the distillation losses (the CPU
 * backend and the oracle of the CUDA kernels), in double, one row at a time
 * (docs/semantics.md section 12; include/culoss.h, "Distillation").
 *
 * Each distribution comes from its row maximum m and rest = the sum of
 * exp((x - m) / T) over every class but the first maximum: the whole sum
 * is 1 + rest, so log p = (x - m) / T - log1p(rest) and the top's
 * p - 1 = -rest / (1 + rest) keep their digits for a confident row (1 + rest
 * rounds rest away below 1e-16 in double). Differences of two probabilities
 * near 1 are formed from their p - 1, and the mixture's log ratios from
 * log P - log Q (log_ratios).
 */
#include <math.h>
#include <stdlib.h>

#include "internal.h"

/* One distribution of a row: maximum, rest, log of the whole sum, the
   first maximum's index, and T. ok = 0: no distribution (all -inf, a NaN
   or a +inf logit): every value is NaN. */
typedef struct {
  double m, rest, lam, T;
  int64_t top;
  int ok;
} dist;

static dist make_dist(int64_t v, const double *x, double T) {
  dist d;
  int has_nan;
  int64_t j;
  d.T = T;
  d.m = culoss__cpu_row_max(v, x, &has_nan);
  d.rest = 0.0, d.top = -1;
  d.ok = !has_nan && d.m > -INFINITY && d.m < INFINITY;
  if (d.ok)
    for (j = 0; j < v; j++) {
      if (x[j] == -INFINITY) continue;
      if (x[j] == d.m && d.top < 0) {
        d.top = j;
        continue;
      }
      d.rest += exp((x[j] - d.m) / T);
    }
  d.lam = d.ok ? log1p(d.rest) : NAN;
  return d;
}

/* p, log p and p - 1 of element j. */
static void prob(const dist *d, const double *x, int64_t j, double *p, double *lp, double *pm1) {
  double z;
  if (!d->ok) {
    *p = *lp = *pm1 = NAN;
    return;
  }
  if (x[j] == -INFINITY) {
    *p = 0.0, *lp = -INFINITY, *pm1 = -1.0;
    return;
  }
  z = (x[j] - d->m) / d->T;
  *lp = z - d->lam;
  *p = exp(z) / (1.0 + d->rest);
  *pm1 = j == d->top ? -d->rest / (1.0 + d->rest) : *p - 1.0;
}

/* q - p, from q - 1 and p - 1 where either is near 1. */
static double pdiff(double q, double qm1, double p, double pm1) {
  return (q > 0.5 || p > 0.5) ? qm1 - pm1 : q - p;
}

/* log(P / M) and log(Q / M), M = beta P + (1 - beta) Q, 0 < beta < 1, from
   r = log P - log Q: -log1p((1 - beta) expm1(-r)) and -log1p(beta expm1(r))
   keep their digits where P and Q are close; for |r| >= 20 log M is the
   two-term log-sum-exp. */
static void log_ratios(double beta, double lp, double lq, double *dpm, double *dqm) {
  const double r = lp - lq;
  double a, b, hi, lo, lm;
  if (fabs(r) < 20.0) {
    *dpm = -log1p((1.0 - beta) * expm1(-r));
    *dqm = -log1p(beta * expm1(r));
    return;
  }
  a = log(beta) + lp, b = log1p(-beta) + lq; /* -inf where the probability is 0 */
  hi = a > b ? a : b, lo = a > b ? b : a;
  lm = (a != a || b != b) ? NAN : hi + log1p(exp(lo - hi));
  *dpm = lp - lm, *dqm = lq - lm;
}

/* The divergence of one row and scale * its gradient (into g). */
static double row_divergence(const culoss_distill_options *o, int64_t v, const double *s,
                             const double *t, double scale, double *g) {
  const double T = o->temperature, beta = o->beta;
  const dist P = make_dist(v, t, T), Q = make_dist(v, s, T);
  double acc1 = 0.0, acc2 = 0.0, ap = 0.0, am = 0.0, a0 = 0.0, loss, p, lp, pm1, q, lq, qm1;
  int64_t j;
  const int tvd = o->divergence == CULOSS_DISTILL_TVD;
  const int fkl = !tvd && beta == 0.0f, rkl = !tvd && beta == 1.0f;
  if (!P.ok || !Q.ok) { /* no distribution: a NaN row, loss and gradient */
    if (g)
      for (j = 0; j < v; j++) g[j] = NAN;
    return NAN;
  }
  /* first pass: the row's sums */
  for (j = 0; j < v; j++) {
    prob(&P, t, j, &p, &lp, &pm1);
    prob(&Q, s, j, &q, &lq, &qm1);
    if (tvd) {
      /* TVD's sum_k Q_k sign_k by sign, each a sum of non-negative terms */
      const double dqp = pdiff(q, qm1, p, pm1);
      acc1 += fabs(dqp);
      if (dqp > 0.0)
        ap += q;
      else if (dqp < 0.0)
        am += q;
      else
        a0 += dqp == dqp ? q : dqp;
    } else if (fkl) {
      if (p != 0.0) acc1 += p * (lp - lq);
    } else if (rkl) {
      if (q != 0.0) acc1 += q * (lq - lp);
    } else {
      double dpm, dqm;
      log_ratios(beta, lp, lq, &dpm, &dqm);
      if (p != 0.0) acc1 += p * dpm;
      if (q != 0.0) acc2 += q * dqm;
    }
  }
  loss = tvd ? 0.5 * acc1 : (fkl || rkl) ? acc1 : beta * acc1 + (1.0 - beta) * acc2;
  if (g == NULL) return loss;
  /* second pass: the gradient, (1/T) Q_j (u_j - sum_k Q_k u_k) */
  for (j = 0; j < v; j++) {
    double gj;
    prob(&P, t, j, &p, &lp, &pm1);
    prob(&Q, s, j, &q, &lq, &qm1);
    if (tvd) {
      /* g_j - sum_k Q_k g_k = (1/2) sum_k Q_k (sign_j - sign_k): for sign_j = +1 that is
         2 A- + A0, for -1 -(2 A+ + A0), for 0 A- - A+ (A+-0: the sums of Q by sign), so a
         confident row's top, whose sign the rest nearly cancel, keeps its digits */
      const double dqp = pdiff(q, qm1, p, pm1);
      const double w = dqp > 0.0 ? 2.0 * am + a0 : (dqp < 0.0 ? -(2.0 * ap + a0) : am - ap);
      gj = q * 0.5 * (dqp == dqp ? w : dqp);
    } else if (fkl) {
      gj = pdiff(q, qm1, p, pm1);
    } else if (rkl) {
      gj = q == 0.0 ? 0.0 : q * ((lq - lp) - acc1);
    } else {
      double dpm, dqm;
      log_ratios(beta, lp, lq, &dpm, &dqm);
      gj = q == 0.0 ? 0.0 : (1.0 - beta) * q * (dqm - acc2);
    }
    g[j] += scale * o->weight_soft * gj / T;
  }
  return loss;
}

/* The hard term's cross-entropy options (plain CE when the call has none),
   their W = sum of class weights, and a row of scratch for its gradient. */
typedef struct {
  culoss_cross_entropy_options o;
  double wsum;
  double *g;
} hard_ctx;

static void hard_init(hard_ctx *h, const culoss_distill_options *o, int64_t v, double *scratch) {
  if (o->hard_options != NULL)
    h->o = *o->hard_options;
  else
    culoss_cross_entropy_options_init(&h->o);
  h->wsum = culoss__cpu_ce_wsum(&h->o, v);
  h->g = scratch;
}

/* The hard cross-entropy of one row (culoss_cross_entropy's row: smoothing,
   class weights, z-loss) and scale * weight_hard * its gradient (added to
   g). */
static double row_hard(const culoss_distill_options *o, const hard_ctx *h, int64_t v,
                       const double *s, int64_t y, double scale, double *g) {
  const double l = culoss__cpu_ce_row(&h->o, v, s, y, NULL, h->wsum, scale * o->weight_hard, h->g);
  int64_t j;
  if (g != NULL)
    for (j = 0; j < v; j++) g[j] += h->g[j];
  return l;
}

/* The reduction's divisor: kept rows (BATCHMEAN), n v (MEAN), 1 (SUM). */
static double divisor(const culoss__distill_args *a) {
  int64_t i, kept = 0;
  if (a->o.reduction == CULOSS_REDUCTION_MEAN) return (double)a->n * (double)a->v;
  if (a->o.reduction != CULOSS_REDUCTION_BATCHMEAN) return 1.0;
  if (a->labels == NULL) return (double)a->n;
  for (i = 0; i < a->n; i++) kept += culoss__target_at(a->labels, a->ttype, i) != a->o.ignore_index;
  return (double)kept;
}

/* One row of logits (already in double) through both terms: returns the
   row's loss; g (if not NULL) gets the row's scaled gradient. */
static double row_loss(const culoss__distill_args *a, const hard_ctx *h, int64_t i, const double *s,
                       const double *t, double scale, double *g) {
  const culoss_distill_options *o = &a->o;
  int64_t j, y = 0;
  double l = 0.0;
  if (g)
    for (j = 0; j < a->v; j++) g[j] = 0.0;
  if (a->labels != NULL) {
    y = culoss__target_at(a->labels, a->ttype, i);
    if (y == o->ignore_index) return 0.0;
  }
  if (o->weight_soft != 0.0f) l += o->weight_soft * row_divergence(o, a->v, s, t, scale, g);
  if (o->weight_hard != 0.0f) l += o->weight_hard * row_hard(o, h, a->v, s, y, scale, g);
  return l;
}

static double row_scale(const culoss__distill_args *a, int64_t i, double D) {
  if (a->o.reduction == CULOSS_REDUCTION_NONE) return a->grad_loss ? a->grad_loss[i] : 1.0;
  {
    const double g = a->grad_loss ? a->grad_loss[0] : 1.0;
    if (a->o.reduction == CULOSS_REDUCTION_SUM) return g;
    return D == 0.0 ? 0.0 : g / D;
  }
}

static void put_loss(const culoss__distill_args *a, double total, double D) {
  if (a->o.reduction == CULOSS_REDUCTION_SUM)
    a->loss[0] = (float)total;
  else if (a->o.reduction != CULOSS_REDUCTION_NONE)
    a->loss[0] = D == 0.0 ? NAN : (float)(total / D);
}

culoss_status culoss__cpu_distill(const culoss__distill_args *a) {
  const int64_t v = a->v;
  const double D = divisor(a);
  double *s = malloc((size_t)v * sizeof *s), *t = malloc((size_t)v * sizeof *t);
  double *g = a->grad ? malloc((size_t)v * sizeof *g) : NULL;
  double *hg = malloc((size_t)v * sizeof *hg);
  double total = 0.0;
  hard_ctx h;
  int64_t i, j;
  if (!s || !t || !hg || (a->grad && !g)) {
    free(s), free(t), free(g), free(hg);
    return culoss__error(CULOSS_ERROR_OUT_OF_MEMORY, "cpu distillation: out of memory");
  }
  hard_init(&h, &a->o, v, hg);
  for (i = 0; i < a->n; i++) {
    double l;
    for (j = 0; j < v; j++) {
      s[j] = culoss__load_f32(a->s, a->dtype, i * a->ld_s + j);
      t[j] = culoss__load_f32(a->t, a->dtype, i * a->ld_t + j);
    }
    l = row_loss(a, &h, i, s, t, row_scale(a, i, D), g);
    if (a->o.reduction == CULOSS_REDUCTION_NONE)
      a->loss[i] = (float)l;
    else
      total += l;
    if (g)
      for (j = 0; j < v; j++) culoss__store_f32(a->grad, a->dtype, i * a->ld_s + j, (float)g[j]);
  }
  put_loss(a, total, D);
  free(s), free(t), free(g), free(hg);
  return CULOSS_OK;
}

/* The linear form: each row's logits in double (student and teacher), then
   the row above; the student's gradient through its GEMMs, in double. */
culoss_status culoss__cpu_linear_distill(const culoss__distill_args *a) {
  const int64_t n = a->n, v = a->v, ds = a->d_s, dt = a->d_t;
  const double D = divisor(a);
  const int want_g = a->grad_hidden || a->grad_weight || a->grad_bias;
  double *s = malloc((size_t)v * sizeof *s), *t = malloc((size_t)v * sizeof *t);
  double *g = malloc((size_t)v * sizeof *g), *hg = malloc((size_t)v * sizeof *hg);
  double *hs = malloc((size_t)ds * sizeof *hs), *ht = malloc((size_t)dt * sizeof *ht);
  double *gw = a->grad_weight ? calloc((size_t)v * (size_t)ds, sizeof *gw) : NULL;
  double *gb = a->grad_bias ? calloc((size_t)v, sizeof *gb) : NULL;
  /* the weights in double once: O(v d), never [n, v] */
  double *w_s = malloc((size_t)v * (size_t)ds * sizeof *w_s);
  double *w_t = malloc((size_t)v * (size_t)dt * sizeof *w_t);
  double total = 0.0;
  hard_ctx h;
  int64_t i, j, k;
  if (!s || !t || !g || !hg || !hs || !ht || !w_s || !w_t || (a->grad_weight && !gw) ||
      (a->grad_bias && !gb)) {
    free(s), free(t), free(g), free(hg), free(hs), free(ht), free(gw), free(gb), free(w_s),
        free(w_t);
    return culoss__error(CULOSS_ERROR_OUT_OF_MEMORY, "cpu linear distillation: out of memory");
  }
  hard_init(&h, &a->o, v, hg);
  for (j = 0; j < v * ds; j++) w_s[j] = culoss__load_f32(a->ws, a->dtype, j);
  for (j = 0; j < v * dt; j++) w_t[j] = culoss__load_f32(a->wt, a->dtype, j);
  for (i = 0; i < n; i++) {
    double l;
    for (k = 0; k < ds; k++) hs[k] = culoss__load_f32(a->hs, a->dtype, i * ds + k);
    for (k = 0; k < dt; k++) ht[k] = culoss__load_f32(a->ht, a->dtype, i * dt + k);
    for (j = 0; j < v; j++) {
      double zs = a->bs ? (double)culoss__load_f32(a->bs, a->dtype, j) : 0.0;
      double zt = a->bt ? (double)culoss__load_f32(a->bt, a->dtype, j) : 0.0;
      for (k = 0; k < ds; k++) zs += hs[k] * w_s[j * ds + k];
      for (k = 0; k < dt; k++) zt += ht[k] * w_t[j * dt + k];
      s[j] = zs, t[j] = zt;
    }
    l = row_loss(a, &h, i, s, t, row_scale(a, i, D), want_g ? g : NULL);
    if (a->o.reduction == CULOSS_REDUCTION_NONE)
      a->loss[i] = (float)l;
    else
      total += l;
    if (!want_g) continue;
    if (a->grad_hidden)
      for (k = 0; k < ds; k++) {
        double acc = 0.0;
        for (j = 0; j < v; j++) acc += g[j] * w_s[j * ds + k];
        culoss__store_f32(a->grad_hidden, a->dtype, i * ds + k, (float)acc);
      }
    if (gw)
      for (j = 0; j < v; j++)
        for (k = 0; k < ds; k++) gw[j * ds + k] += g[j] * hs[k];
    if (gb)
      for (j = 0; j < v; j++) gb[j] += g[j];
  }
  if (gw) culoss__cpu_store_sum(a->grad_weight, a->gw_dtype, gw, v * ds, a->accumulate);
  if (gb) culoss__cpu_store_sum(a->grad_bias, a->gw_dtype, gb, v, a->accumulate);
  put_loss(a, total, D);
  free(s), free(t), free(g), free(hg), free(hs), free(ht), free(gw), free(gb), free(w_s), free(w_t);
  return CULOSS_OK;
}
