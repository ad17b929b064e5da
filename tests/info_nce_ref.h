/* info_nce_ref.h: an explicit InfoNCE in double for the tests: the whole
   n x n logits z = q k^T / t, the row (and, symmetric, column) softmaxes,
   the loss and every gradient, with no code shared with the library. */
#ifndef CULOSS_TEST_INFO_NCE_REF_H
#define CULOSS_TEST_INFO_NCE_REF_H

#include <math.h>
#include <stdlib.h>

#include "culoss.h"

/* q, k [n, d]; red NONE: loss[n], else loss[0]; gl NULL = 1 ([n] for NONE);
   gq, gk [n, d] and *gt may each be NULL. */
static inline void nce_explicit(int64_t n, int64_t d, const float *q, const float *k, double t,
                                int symmetric, culoss_reduction red, const float *gl, double *loss,
                                double *gq, double *gk, double *gt) {
  double *z = malloc((size_t)(n * n) * sizeof *z), *dz = calloc((size_t)(n * n), sizeof *dz);
  double *l = calloc((size_t)n, sizeof *l);
  for (int64_t i = 0; i < n; i++)
    for (int64_t j = 0; j < n; j++) {
      double s = 0.0;
      for (int64_t e = 0; e < d; e++) s += (double)q[i * d + e] * (double)k[j * d + e];
      z[i * n + j] = s / t;
    }
  const double half = symmetric ? 0.5 : 1.0;
  for (int dir = 0; dir < (symmetric ? 2 : 1); dir++)
    for (int64_t i = 0; i < n; i++) { /* dir 0: row i of z; 1: column i */
#define Z(a) (dir == 0 ? z[i * n + (a)] : z[(a)*n + i])
      double m = -INFINITY, s = 0.0;
      for (int64_t j = 0; j < n; j++) m = fmax(m, Z(j));
      for (int64_t j = 0; j < n; j++) s += exp(Z(j) - m);
      const double lse = m + log(s);
      l[i] += half * (lse - Z(i));
      double w = red == CULOSS_REDUCTION_NONE ? (gl ? gl[i] : 1.0) : (gl ? gl[0] : 1.0);
      if (red == CULOSS_REDUCTION_MEAN) w /= (double)n;
      w *= half;
      for (int64_t j = 0; j < n; j++) {
        const double g = w * (exp(Z(j) - lse) - (j == i ? 1.0 : 0.0));
        if (dir == 0)
          dz[i * n + j] += g;
        else
          dz[j * n + i] += g;
      }
#undef Z
    }
  double total = 0.0;
  for (int64_t i = 0; i < n; i++) {
    if (red == CULOSS_REDUCTION_NONE)
      loss[i] = l[i];
    else
      total += l[i];
  }
  if (red != CULOSS_REDUCTION_NONE) loss[0] = red == CULOSS_REDUCTION_SUM ? total : total / n;
  if (gq)
    for (int64_t i = 0; i < n; i++)
      for (int64_t e = 0; e < d; e++) {
        double s = 0.0;
        for (int64_t j = 0; j < n; j++) s += dz[i * n + j] * (double)k[j * d + e];
        gq[i * d + e] = s / t;
      }
  if (gk)
    for (int64_t j = 0; j < n; j++)
      for (int64_t e = 0; e < d; e++) {
        double s = 0.0;
        for (int64_t i = 0; i < n; i++) s += dz[i * n + j] * (double)q[i * d + e];
        gk[j * d + e] = s / t;
      }
  if (gt) {
    double s = 0.0;
    for (int64_t i = 0; i < n * n; i++) s += dz[i] * z[i];
    *gt = -s / t;
  }
  free(z), free(dz), free(l);
}

#endif
