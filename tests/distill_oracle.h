/* distill_oracle.h: TRL's generalized_jsd_loss and TVD written out plainly
   in long double (64-bit significand), per row, as the tests' independent
   oracle of the distillation losses: log-softmax by max and log of the
   sum, M by its definition, no log1p care. Long double's ~1e-19 keeps it
   accurate to ~1e-7 relative for rows up to ~35 logits apart (e^-35 ~ 6e-16
   over a 1e-19 rounding), which the tests' confident rows stay within. */
#ifndef CULOSS_TEST_DISTILL_ORACLE_H
#define CULOSS_TEST_DISTILL_ORACLE_H

#include <math.h>
#include <stdint.h>

/* log-softmax of x / T into lp[v]; returns 0 when the row has no
   distribution (all -inf). */
static inline int oracle_log_softmax(int64_t v, const float *x, long double T, long double *lp) {
  long double m = -INFINITY, s = 0.0L;
  for (int64_t j = 0; j < v; j++)
    if ((long double)x[j] / T > m) m = (long double)x[j] / T;
  if (m == -INFINITY) return 0;
  for (int64_t j = 0; j < v; j++) s += expl((long double)x[j] / T - m);
  for (int64_t j = 0; j < v; j++) lp[j] = (long double)x[j] / T - m - logl(s);
  return 1;
}

/* One row's divergence (tvd, or generalized JSD(beta)); g (if not NULL)
   gets d loss / d s by the closed form (1/T) Q (u - sum Q u). lp, lq: two
   scratch rows of v. */
static inline long double oracle_row(int tvd, long double beta, long double T, int64_t v,
                                     const float *s, const float *t, long double *lp,
                                     long double *lq, long double *g) {
  long double loss = 0.0L, k = 0.0L;
  oracle_log_softmax(v, t, T, lp);
  oracle_log_softmax(v, s, T, lq);
  for (int64_t j = 0; j < v; j++) {
    const long double P = expl(lp[j]), Q = expl(lq[j]);
    if (tvd) {
      loss += 0.5L * fabsl(P - Q);
      k += Q * 0.5L * (Q > P ? 1.0L : (Q < P ? -1.0L : 0.0L));
    } else if (beta == 0.0L) {
      if (P > 0.0L) loss += P * (lp[j] - lq[j]);
    } else if (beta == 1.0L) {
      if (Q > 0.0L) loss += Q * (lq[j] - lp[j]);
    } else {
      const long double M = beta * P + (1.0L - beta) * Q, lm = logl(M);
      if (P > 0.0L) loss += beta * P * (lp[j] - lm);
      if (Q > 0.0L) {
        loss += (1.0L - beta) * Q * (lq[j] - lm);
        k += (1.0L - beta) * Q * (lq[j] - lm);
      }
    }
  }
  if (!tvd && beta == 1.0L) k = loss + 1.0L; /* sum Q u with u = log Q - log P + 1 */
  if (!tvd && beta == 0.0L) k = -1.0L;       /* u = -P / Q */
  if (g)
    for (int64_t j = 0; j < v; j++) {
      const long double P = expl(lp[j]), Q = expl(lq[j]);
      long double u;
      if (tvd)
        u = 0.5L * (Q > P ? 1.0L : (Q < P ? -1.0L : 0.0L));
      else if (beta == 0.0L)
        u = Q > 0.0L ? -P / Q : 0.0L;
      else if (beta == 1.0L)
        u = lq[j] - lp[j] + 1.0L;
      else
        u = (1.0L - beta) * (lq[j] - logl(beta * P + (1.0L - beta) * Q));
      /* Q = 0 (the student's -inf): no gradient (u may be -inf - -inf there) */
      g[j] = (beta == 0.0L && !tvd) ? (Q - P) / T : (Q == 0.0L ? 0.0L : Q * (u - k) / T);
    }
  return loss;
}

/* The hard term's cross-entropy with label smoothing eps, class weights w
   (NULL: ones) and z-loss z, plainly: lse by max and log of the sum,
     (1 - eps) w_y (lse - s_y) + (eps / v) sum_c w_c (lse - s_c) + z lse^2,
   and its gradient w_y (1 - eps) (p - e_y) + (eps / v) (W p - w) + 2 z lse p
   into g (if not NULL). Finite logits only. */
static inline long double oracle_hard(long double eps, const float *w, long double z, int64_t v,
                                      const float *s, int64_t y, long double *g) {
  long double m = -INFINITY, sum = 0.0L, W = 0.0L, sm = 0.0L;
  for (int64_t j = 0; j < v; j++)
    if ((long double)s[j] > m) m = (long double)s[j];
  for (int64_t j = 0; j < v; j++) sum += expl((long double)s[j] - m);
  const long double lse = m + logl(sum);
  for (int64_t j = 0; j < v; j++) {
    const long double wj = w ? (long double)w[j] : 1.0L;
    W += wj;
    sm += wj * (lse - (long double)s[j]);
  }
  const long double wy = w ? (long double)w[y] : 1.0L;
  if (g)
    for (int64_t j = 0; j < v; j++) {
      const long double p = expl((long double)s[j] - lse), wj = w ? (long double)w[j] : 1.0L;
      g[j] = wy * (1.0L - eps) * (p - (j == y ? 1.0L : 0.0L)) +
             eps / (long double)v * (W * p - wj) + 2.0L * z * lse * p;
    }
  return (1.0L - eps) * wy * (lse - (long double)s[y]) + eps / (long double)v * sm + z * lse * lse;
}

#endif
