/* more_losses_call.h: one calling convention for the losses with two or
   three differentiable inputs (margin ranking, Gaussian NLL, cosine
   embedding, triplet margin), shared by the CPU and GPU suites, and the
   double-precision magnitudes the GPU suite's tolerances come from. */
#ifndef CULOSS_TEST_MORE_LOSSES_CALL_H
#define CULOSS_TEST_MORE_LOSSES_CALL_H

#include <math.h>

#include "culoss.h"

typedef enum { L_MRANK, L_GAUSS, L_COSINE, L_TRIPLET, L_MLSOFT, L_NUM } l_kind;
static const char *const l_name[L_NUM] = {"margin_ranking", "gaussian_nll", "cosine_embedding",
                                          "triplet_margin", "multilabel_soft_margin"};
/* inputs with a gradient: x[0..ninputs-1]; the rest of x[] are targets */
static inline int l_ninputs(l_kind k) { return k == L_TRIPLET ? 3 : (k == L_MLSOFT ? 1 : 2); }
/* rows of d features (the elementwise two: d = ld = 1) */
static inline int l_rows(l_kind k) { return k == L_COSINE || k == L_TRIPLET || k == L_MLSOFT; }

typedef struct {
  culoss_reduction red;
  float margin;        /* margin ranking, cosine, triplet */
  float p, eps;        /* triplet (p, eps), gaussian (eps) */
  int swap;            /* triplet */
  int full;            /* gaussian */
  const float *weight; /* multi-label soft margin: NULL, [d] or [n, ld] */
  int weight_per_row;
} l_opts;

static inline l_opts l_defaults(l_kind k, culoss_reduction red) {
  l_opts o = {red, 0.0f, 2.0f, 1e-6f, 0, 0, NULL, 0};
  if (k == L_TRIPLET) o.margin = 1.0f;
  return o;
}

/* in[0..2]: margin ranking (x1, x2, target), gaussian (input, var, target),
   cosine (x1, x2), triplet (anchor, positive, negative), multi-label soft
   margin (input, target); ytarget: cosine's fp32 targets. g[k]: in[k]'s
   gradient (k < l_ninputs). */
static inline culoss_status l_call(culoss_context *ctx, l_kind k, const l_opts *t, int64_t n,
                                   int64_t d, int64_t ld, culoss_dtype dt, const void *const in[3],
                                   const float *ytarget, float *loss, void *const g[3],
                                   const float *gl) {
  switch (k) {
  case L_MRANK: {
    culoss_margin_ranking_options o;
    culoss_margin_ranking_options_init(&o);
    o.reduction = t->red, o.margin = t->margin;
    return culoss_margin_ranking(ctx, &o, n, dt, in[0], in[1], in[2], loss, g[0], g[1], gl);
  }
  case L_GAUSS: {
    culoss_gaussian_nll_options o;
    culoss_gaussian_nll_options_init(&o);
    o.reduction = t->red, o.full = t->full, o.eps = t->eps;
    return culoss_gaussian_nll(ctx, &o, n, dt, in[0], in[2], in[1], loss, g[0], g[1], gl);
  }
  case L_COSINE: {
    culoss_cosine_embedding_options o;
    culoss_cosine_embedding_options_init(&o);
    o.reduction = t->red, o.margin = t->margin;
    return culoss_cosine_embedding(ctx, &o, n, d, dt, in[0], in[1], ld, ytarget, loss, g[0], g[1],
                                   gl);
  }
  case L_MLSOFT: {
    culoss_multilabel_soft_margin_options o;
    culoss_multilabel_soft_margin_options_init(&o);
    o.reduction = t->red, o.weight = t->weight, o.weight_per_row = t->weight_per_row;
    return culoss_multilabel_soft_margin(ctx, &o, n, d, dt, in[0], in[1], ld, loss, g[0], gl);
  }
  default: {
    culoss_triplet_margin_options o;
    culoss_triplet_margin_options_init(&o);
    o.reduction = t->red, o.margin = t->margin, o.p = t->p, o.eps = t->eps, o.swap = t->swap;
    return culoss_triplet_margin(ctx, &o, n, d, dt, in[0], in[1], in[2], ld, loss, g[0], g[1], g[2],
                                 gl);
  }
  }
}

/* |u - v + eps|_p over d values (double). */
static inline double l_dist(const float *u, const float *v, int64_t d, double p, double eps) {
  double s = 0.0;
  for (int64_t j = 0; j < d; j++) s += pow(fabs((double)u[j] - (double)v[j] + eps), p);
  return pow(s, 1.0 / p);
}

#endif
