/*
 * vocab_parallel_ref.c: the CPU backend of vocabulary-parallel
 * cross-entropy, in double, written from docs/semantics.md section 1 and
 * the record layout of common/backend.h: each rank's slice statistics, then
 * their merge in rank order (every rank computes the same merge, hence the
 * same loss) and this slice's gradient.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

enum { F_M, F_S, F_SX, F_SY, F_XT, F_WT, F_OWNED, F_U, NF };

static double class_w(const culoss_cross_entropy_options *o, int64_t j) {
  return o->class_weight ? (double)o->class_weight[j] : 1.0;
}

/* One row of this slice, soft-capped, in double. */
static void load_row(const culoss__vp_args *a, int64_t i, double *x) {
  const double cap = a->o.logit_softcap;
  int64_t j;
  for (j = 0; j < a->c_local; j++) {
    const double v = (double)culoss__load_f32(a->x, a->dtype, i * a->ld + j);
    /* soft-capped in float, as the kernels do: the record carries m in
       float, and the maximum's column must compare equal to it */
    x[j] = cap > 0.0 ? (double)(float)(cap * tanh(v / cap)) : v;
  }
}

static void stats(const culoss__vp_args *a, double *x) {
  const culoss_cross_entropy_options *o = &a->o;
  const int64_t c = a->c_local, v0 = a->vp->v_begin;
  float *rec = (float *)a->stats;
  double wr = 0.0;
  int64_t i, j;
  for (i = 0; i < a->n; i++) {
    const int64_t t = culoss__target_at(a->targets, a->ttype, i);
    float *r = rec + i * NF;
    double m = -INFINITY, s = 0.0, sx = 0.0, sy = 0.0, u = 0.0;
    int has_nan = 0;
    load_row(a, i, x);
    m = culoss__cpu_row_max(c, x, &has_nan);
    if (has_nan || m == INFINITY) { /* +inf: exp(inf - inf), NaN as PyTorch's */
      s = NAN;
      if (has_nan) m = NAN;
    } else if (m != -INFINITY) { /* s without the top's 1 (culoss__lse_state) */
      int top = 1;
      for (j = 0; j < c; j++)
        if (x[j] == m && top)
          top = 0;
        else if (x[j] != -INFINITY)
          s += exp(x[j] - m), u += exp(x[j] - m) * (x[j] - m);
    }
    if (o->label_smoothing > 0.0f)
      for (j = 0; j < c; j++) { /* non-negative terms; a -inf logit's is w * inf */
        const double w = class_w(o, j);
        sy += w;
        sx += x[j] == -INFINITY ? w * INFINITY : w * (m - x[j]);
      }
    r[F_M] = (float)m, r[F_S] = (float)s, r[F_SX] = (float)sx, r[F_SY] = (float)sy;
    r[F_XT] = 0.0f, r[F_WT] = 0.0f, r[F_OWNED] = 0.0f, r[F_U] = (float)u;
    if (t != o->ignore_index && t >= v0 && t < v0 + c) {
      r[F_XT] = (float)x[t - v0], r[F_WT] = (float)class_w(o, t - v0), r[F_OWNED] = 1.0f;
    }
  }
  for (j = 0; j < c; j++) wr += class_w(o, j);
  culoss__vp_slice_record(rec + a->n * NF, (float)wr, v0, c);
}

/* Row i's records merged in rank order. */
typedef struct {
  double m, log_s, rest, sx, sy, xt, wt, u_over_s; /* log_s = log1p(rest) */
  int owners;
} merged;

static merged merge(const culoss__vp_args *a, int64_t i) {
  const float *g = (const float *)a->gathered;
  const int64_t stride = (a->n + 1) * NF;
  merged r = {-INFINITY, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0};
  double s = 0.0, u = 0.0; /* s: the sum without the top's 1, as the records */
  int nan = 0, k, top = -1;
  for (k = 0; k < a->vp->ranks; k++) {
    const double m = g[k * stride + i * NF + F_M];
    if (isnan(m) || isnan((double)g[k * stride + i * NF + F_S])) nan = 1;
    if (m > r.m) r.m = m, top = k;
  }
  for (k = 0; k < a->vp->ranks; k++) {
    const float *q = g + k * stride + i * NF;
    const double m = q[F_M], sy = q[F_SY];
    if (m != -INFINITY) { /* u_k relative to m: e^(m - M) (u_k - (M - m) S_k), S_k = 1 + s_k */
      const double sk = 1.0 + (double)q[F_S];
      s += k == top ? (double)q[F_S] : sk * exp(m - r.m);
      u += exp(m - r.m) * ((double)q[F_U] - (r.m - m) * sk);
    }
    r.sx += q[F_SX];
    if (sy != 0.0 && m != r.m) r.sx += m == -INFINITY ? sy * INFINITY : sy * (r.m - m);
    r.sy += sy;
    if (q[F_OWNED] != 0.0f) r.xt = q[F_XT], r.wt = q[F_WT], r.owners++;
  }
  r.rest = s;
  if (top < 0) s -= 1.0; /* every slice empty (all -inf): no top */
  r.log_s = nan ? NAN : log1p(s);
  r.u_over_s = nan ? NAN : u / (1.0 + s);
  if (nan) r.m = NAN;
  return r;
}

static culoss_status finish(const culoss__vp_args *a, double *x) {
  const culoss_cross_entropy_options *o = &a->o;
  const float *g = (const float *)a->gathered;
  const int64_t stride = (a->n + 1) * NF, c = a->c_local, v0 = a->vp->v_begin;
  const double C = (double)a->vp->v_total, eps = o->label_smoothing, z = o->z_loss;
  const double cap = o->logit_softcap;
  double wsum = 0.0, denom = 0.0, gl = 1.0, total = 0.0;
  int64_t i, j;
  int k;
  for (k = 0; k < a->vp->ranks; k++) wsum += g[k * stride + a->n * NF + 0];
  if (!culoss__vp_slices_tile(g, a->vp->ranks, a->n, a->vp->v_total))
    return CULOSS__BAD("culoss_cross_entropy_vocab_parallel: the ranks' slices do not tile "
                       "[0, v_total = %lld) (they overlap, leave a gap or fall outside)",
                       (long long)a->vp->v_total);
  for (i = 0; i < a->n; i++) { /* MEAN's D, and who owns each target */
    const int64_t t = culoss__target_at(a->targets, a->ttype, i);
    const merged r = merge(a, i);
    if (t == o->ignore_index) continue;
    if (r.owners != 1)
      return CULOSS__BAD("culoss_cross_entropy_vocab_parallel: %d ranks own the target %lld of "
                         "row %lld (the slices overlap or leave a gap)",
                         r.owners, (long long)t, (long long)i);
    denom += r.wt;
  }
  if (o->normalizer) denom = *o->normalizer;
  if (o->reduction != CULOSS_REDUCTION_NONE && a->grad_loss) gl = a->grad_loss[0];
  for (i = 0; i < a->n; i++) {
    const int64_t t = culoss__target_at(a->targets, a->ttype, i);
    const merged r = merge(a, i);
    const double scale =
        o->reduction == CULOSS_REDUCTION_NONE
            ? (a->grad_loss ? (double)a->grad_loss[i] : 1.0)
            : (o->reduction == CULOSS_REDUCTION_SUM ? gl : (denom == 0.0 ? 0.0 : gl / denom));
    double l = 0.0;
    load_row(a, i, x); /* read the whole row before writing: grad may alias it */
    if (t != o->ignore_index) {
      const double lse = r.m + r.log_s, tw = (1.0 - eps) * r.wt;
      const double coef_a = tw + eps / C * wsum + 2.0 * z * lse;
      l = tw * ((r.m - r.xt) + r.log_s);
      if (eps > 0.0) l += eps / C * (r.sx + r.sy * r.log_s);
      l += z * lse * lse;
      if (a->lse) a->lse[i] = (float)lse;
      if (a->entropy) a->entropy[i] = (float)(r.log_s - r.u_over_s);
      if (a->grad)
        for (j = 0; j < c; j++) {
          const double p = x[j] == -INFINITY && !isnan(r.m) ? 0.0 : exp(x[j] - r.m - r.log_s);
          const double b = (v0 + j == t ? tw : 0.0) + eps / C * class_w(o, j);
          const double cg = cap > 0.0 ? 1.0 - (x[j] / cap) * (x[j] / cap) : 1.0;
          /* at the maximum p - 1 = -rest / (1 + rest): no cancellation */
          const double pab = x[j] == r.m && isfinite(r.m) && r.rest < 1.0
                                 ? coef_a * (-r.rest / (1.0 + r.rest)) + (coef_a - b)
                                 : p * coef_a - b;
          culoss__store_f32(a->grad, a->dtype, i * a->ld + j, (float)(scale * pab * cg));
        }
    } else {
      if (a->lse) a->lse[i] = 0.0f;
      if (a->entropy) a->entropy[i] = 0.0f;
      if (a->grad)
        for (j = 0; j < c; j++) culoss__store_f32(a->grad, a->dtype, i * a->ld + j, 0.0f);
    }
    if (o->reduction == CULOSS_REDUCTION_NONE)
      a->loss[i] = (float)l;
    else
      total += l;
  }
  if (o->reduction == CULOSS_REDUCTION_SUM)
    a->loss[0] = (float)total;
  else if (o->reduction == CULOSS_REDUCTION_MEAN)
    a->loss[0] = denom == 0.0 ? NAN : (float)(total / denom);
  return CULOSS_OK;
}

culoss_status culoss__cpu_vocab_parallel(const culoss__vp_args *a) {
  double *x = (double *)malloc((size_t)(a->c_local > 0 ? a->c_local : 1) * sizeof *x);
  culoss_status st = CULOSS_OK;
  if (x == NULL)
    return culoss__error(CULOSS_ERROR_OUT_OF_MEMORY, "cpu vocab-parallel: no memory for a row");
  if (a->phase == CULOSS__VP_STATS)
    stats(a, x);
  else
    st = finish(a, x);
  free(x);
  return st;
}

/* Vocabulary-parallel linear + CE on the CPU: this slice's logits in double
   (rounded to fp32, the records' precision), the two phases above around
   the caller's all-gather, then the gradients' products in double. */
culoss_status culoss__cpu_linear_vocab_parallel(const culoss__lce_args *a) {
  const int64_t n = a->n, d = a->d, v = a->v;
  const size_t rec = (size_t)(n + 1) * NF;
  float *x = malloc((size_t)(n * v > 0 ? n * v : 1) * sizeof *x);
  float *g = malloc((size_t)(n * v > 0 ? n * v : 1) * sizeof *g);
  float *mine = malloc(rec * sizeof *mine);
  float *all = malloc(rec * (size_t)a->vp->ranks * sizeof *all);
  double *acc = a->grad_weight ? malloc((size_t)(v * d) * sizeof *acc) : NULL;
  culoss__vp_args va;
  culoss_status st = CULOSS_OK;
  int64_t i, j, k;
  if (!x || !g || !mine || !all || (a->grad_weight && !acc)) {
    st = culoss__error(CULOSS_ERROR_OUT_OF_MEMORY, "cpu linear vocab-parallel: out of memory");
    goto done;
  }
  for (i = 0; i < n; i++)
    for (j = 0; j < v; j++) {
      double z = a->bias ? (double)culoss__load_f32(a->bias, a->dtype, j) : 0.0;
      for (k = 0; k < d; k++)
        z += (double)culoss__load_f32(a->hidden, a->dtype, i * d + k) *
             (double)culoss__load_f32(a->weight, a->dtype, j * d + k);
      x[i * v + j] = (float)z;
    }
  memset(&va, 0, sizeof va);
  va.phase = CULOSS__VP_STATS, va.o = a->o, va.vp = a->vp, va.n = n, va.c_local = v, va.ld = v;
  va.dtype = CULOSS_F32, va.ttype = a->ttype, va.x = x, va.targets = a->targets, va.stats = mine;
  if ((st = culoss__cpu_vocab_parallel(&va)) != CULOSS_OK) goto done;
  if (a->vp->allgather(a->vp->user, mine, all, rec * sizeof *mine, NULL) != 0) {
    st = culoss__error(CULOSS_ERROR_INTERNAL,
                       "culoss_linear_cross_entropy_vocab_parallel: vp->allgather returned an "
                       "error");
    goto done;
  }
  va.phase = CULOSS__VP_FINISH, va.stats = NULL, va.gathered = all;
  va.loss = a->loss, va.grad = g, va.grad_loss = a->grad_loss;
  va.lse = a->lse, va.entropy = a->entropy;
  if ((st = culoss__cpu_vocab_parallel(&va)) != CULOSS_OK) goto done;
  if (a->grad_hidden) /* this slice's part of d loss / d hidden */
    for (i = 0; i < n; i++)
      for (k = 0; k < d; k++) {
        double s = 0.0;
        for (j = 0; j < v; j++)
          s += (double)g[i * v + j] * (double)culoss__load_f32(a->weight, a->dtype, j * d + k);
        culoss__store_f32(a->grad_hidden, a->dtype, i * d + k, (float)s);
      }
  if (a->grad_weight) {
    for (j = 0; j < v * d; j++) acc[j] = 0.0;
    for (i = 0; i < n; i++)
      for (j = 0; j < v; j++)
        for (k = 0; k < d; k++)
          acc[j * d + k] +=
              (double)g[i * v + j] * (double)culoss__load_f32(a->hidden, a->dtype, i * d + k);
    culoss__cpu_store_sum(a->grad_weight, a->gw_dtype, acc, v * d, a->accumulate);
  }
  if (a->grad_bias)
    for (j = 0; j < v; j++) {
      double s = a->accumulate ? culoss__load_f32(a->grad_bias, a->gw_dtype, j) : 0.0;
      for (i = 0; i < n; i++) s += g[i * v + j];
      culoss__store_f32(a->grad_bias, a->gw_dtype, j, (float)s);
    }
done:
  free(x), free(g), free(mine), free(all), free(acc);
  return st;
}
