/*
 * linear_ce.c: fused linear + cross-entropy, host side: the workspace plan
 * (the documented rule), validation, the CPU reference and dispatch.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

#define BAD(...) culoss__error(CULOSS_ERROR_INVALID_VALUE, __VA_ARGS__)

static size_t round256(size_t b) { return (b + 255u) & ~(size_t)255u; }

/* Bytes of one logits block: 2^28, or $CULOSS_LINEAR_CE_BLOCK_BYTES (a
   tuning and testing knob: small values exercise many blocks and slices). */
static int64_t block_budget(void) {
  const char *e = getenv("CULOSS_LINEAR_CE_BLOCK_BYTES");
  long long b = e ? atoll(e) : 0;
  return b >= 1024 ? (int64_t)b : (int64_t)1 << 28;
}

culoss__lce_layout culoss__lce_plan(int64_t n, int64_t d, int64_t v, culoss_dtype dtype) {
  culoss__lce_layout L;
  const size_t es = culoss__dtype_size(dtype);
  const int64_t budget = block_budget();
  int64_t rows = budget / (v * (int64_t)es);
  if (rows < 1) rows = 1;
  if (rows > 32768) rows = 32768;
  if (rows > n) rows = n > 0 ? n : 1;
  L.rows = rows;
  L.vslice = 0;
  L.off_logits = 0;
  L.off_row_loss = round256((size_t)rows * (size_t)v * es);
  L.off_row_stats = L.off_row_loss + round256((size_t)n * 4u);
  L.off_bias_acc = L.off_row_stats + round256((size_t)n * 32u);
  L.off_gw_acc = L.off_bias_acc + round256((size_t)v * 4u);
  L.total = L.off_gw_acc;
  if (dtype != CULOSS_F32) {
    /* one vocabulary slice of fp32 grad_weight, no larger than the block */
    int64_t vs = (int64_t)(L.off_row_loss / ((size_t)d * 4u));
    if (vs > v) vs = v;
    if (vs < 1) vs = 1;
    L.vslice = vs;
    L.total += round256((size_t)vs * (size_t)d * 4u);
  }
  return L;
}

static culoss_status check_sizes(const char *fn, int64_t n, int64_t d, int64_t v) {
  if (n < 0) return BAD("%s: n = %lld is negative", fn, (long long)n);
  if (d < 1) return BAD("%s: d = %lld must be >= 1", fn, (long long)d);
  if (v < 1) return BAD("%s: v = %lld must be >= 1", fn, (long long)v);
  if (d > INT64_MAX / 4 / v || (n > 0 && d > INT64_MAX / 4 / n))
    return BAD("%s: n, d, v = %lld, %lld, %lld overflow 64-bit byte offsets", fn, (long long)n,
               (long long)d, (long long)v);
  if (n > INT32_MAX || d > INT32_MAX || v > INT32_MAX)
    return culoss__error(CULOSS_ERROR_NOT_SUPPORTED,
                         "%s: n, d and v must each fit cuBLAS's 32-bit dimensions", fn);
  return CULOSS_OK;
}

culoss_status culoss_linear_cross_entropy_workspace_size(culoss_context *ctx, int64_t n, int64_t d,
                                                         int64_t v, culoss_dtype dtype,
                                                         size_t *bytes) {
  const char *fn = "culoss_linear_cross_entropy_workspace_size";
  culoss_status st;
  if ((st = culoss__check_ctx(ctx, fn)) != CULOSS_OK) return st;
  if (bytes == NULL) return BAD("%s: bytes is NULL", fn);
  if ((st = check_sizes(fn, n, d, v)) != CULOSS_OK) return st;
  if ((st = culoss__check_dtype(fn, dtype)) != CULOSS_OK) return st;
  /* the same figure for both backends; the CPU backend does not use it */
  *bytes = culoss__lce_plan(n, d, v, dtype).total;
  return CULOSS_OK;
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
    if (o->reduction == CULOSS_REDUCTION_NONE)
      a->loss[i] = (float)row_loss;
    else
      total += row_loss;
    if (a->grad_hidden)
      for (k = 0; k < d; k++) {
        double s = 0.0;
        for (j = 0; j < v; j++) s += g[j] * (double)culoss__load_f32(a->weight, a->dtype, j * d + k);
        culoss__store_f32(a->grad_hidden, a->dtype, i * d + k, (float)s);
      }
    if (gw)
      for (j = 0; j < v; j++)
        for (k = 0; k < d; k++) gw[j * d + k] += g[j] * h[k];
    if (gb)
      for (j = 0; j < v; j++) gb[j] += g[j];
  }
  if (gw)
    for (j = 0; j < v * d; j++) culoss__store_f32(a->grad_weight, a->dtype, j, (float)gw[j]);
  if (gb)
    for (j = 0; j < v; j++) culoss__store_f32(a->grad_bias, a->dtype, j, (float)gb[j]);
  if (o->reduction == CULOSS_REDUCTION_SUM)
    a->loss[0] = (float)total;
  else if (o->reduction == CULOSS_REDUCTION_MEAN)
    a->loss[0] = denom == 0.0 ? NAN : (float)(total / denom); /* D == 0: NaN, never inf */
  free(x), free(g), free(h), free(gw), free(gb);
  return CULOSS_OK;
}

culoss_status culoss_linear_cross_entropy(culoss_context *ctx,
                                          const culoss_cross_entropy_options *o, int64_t n,
                                          int64_t d, int64_t v, culoss_dtype dtype,
                                          const void *hidden, const void *weight, const void *bias,
                                          culoss_index_type ttype, const void *targets,
                                          float *loss, void *grad_hidden, void *grad_weight,
                                          void *grad_bias, const float *grad_loss, void *workspace,
                                          size_t workspace_bytes) {
  const char *fn = "culoss_linear_cross_entropy";
  culoss__lce_args a;
  culoss_status st;
  memset(&a, 0, sizeof a);
  if (o != NULL)
    a.o = *o;
  else
    culoss_cross_entropy_options_init(&a.o);
  if ((st = culoss__check_ctx(ctx, fn)) != CULOSS_OK) return st;
  if ((st = check_sizes(fn, n, d, v)) != CULOSS_OK) return st;
  if ((st = culoss__check_dtype(fn, dtype)) != CULOSS_OK) return st;
  if ((st = culoss__check_index_type(fn, ttype)) != CULOSS_OK) return st;
  if ((st = culoss__check_ce_options(fn, &a.o)) != CULOSS_OK) return st;
  if (loss == NULL) return BAD("%s: loss is NULL", fn);
  if (weight == NULL) return BAD("%s: weight is NULL", fn);
  if (n > 0 && hidden == NULL) return BAD("%s: hidden is NULL", fn);
  if (n > 0 && targets == NULL) return BAD("%s: targets is NULL", fn);
  if (grad_bias != NULL && bias == NULL)
    return BAD("%s: grad_bias needs a bias (bias is NULL)", fn);
  if (grad_hidden != NULL && grad_hidden == hidden)
    return BAD("%s: grad_hidden must not alias hidden", fn);
  a.n = n, a.d = d, a.v = v, a.dtype = dtype, a.ttype = ttype;
  a.hidden = hidden, a.weight = weight, a.bias = bias, a.targets = targets, a.loss = loss;
  a.grad_hidden = grad_hidden, a.grad_weight = grad_weight, a.grad_bias = grad_bias;
  a.grad_loss = grad_loss, a.workspace = workspace, a.workspace_bytes = workspace_bytes;
  if (ctx->backend == CULOSS_BACKEND_CPU) {
    st = culoss__check_targets_cpu(fn, targets, ttype, n, v, 1, a.o.ignore_index);
    if (st != CULOSS_OK) return st;
    return culoss__cpu_linear_cross_entropy(&a);
  }
  {
    const size_t need = culoss__lce_plan(n, d, v, dtype).total;
    if (workspace_bytes < need)
      return BAD("%s: workspace_bytes = %zu is less than the %zu bytes "
                 "culoss_linear_cross_entropy_workspace_size gives",
                 fn, workspace_bytes, need);
    if (workspace == NULL) return BAD("%s: workspace is NULL", fn);
  }
  return culoss__dispatch_cuda(ctx, fn, culoss__cuda_linear_cross_entropy, &a);
}
