/*
 * info_nce.c: contrastive InfoNCE (CLIP loss) as a composition: the logits
 * z = q k^T / t are linear cross-entropy's (hidden q / t, weight k, class
 * targets 0..n-1), so the n x n matrix exists one block of rows at a time;
 * symmetric adds the transposed direction (hidden k / t, weight q). Around
 * the two culoss_linear_cross_entropy_ex calls, four small steps (prepare
 * the targets and per-row gradient scales, scale by 1/t, add, and finish
 * the loss and the temperature's gradient from each row's loss, lse and
 * entropy) run on the context's backend: loops here for the CPU, kernels in
 * cuda/info_nce.cu. Everything is stream-ordered and allocation-free.
 */
#include <math.h>
#include <string.h>

#include "internal.h"

void culoss_info_nce_options_init(culoss_info_nce_options *o) {
  if (o == NULL) return;
  o->reduction = CULOSS_REDUCTION_MEAN;
  o->symmetric = 0;
  o->temperature = NULL;
  o->grad_temperature = NULL;
}

static size_t round256(size_t b) { return (b + 255) & ~(size_t)255; }

/* The logits block linear CE takes for InfoNCE: the context's (2^28 bytes
   by default, or CULOSS_LINEAR_CE_BLOCK_BYTES), capped at max(n / 8, 1024)
   rows: a square similarity matrix fits the default block whole up to
   n ~ 11600 (bf16), which would make the block-wise form hold nearly all of
   it. */
static int64_t nce_block_bytes(const culoss_context *ctx, int64_t n, culoss_dtype dtype) {
  const int64_t es = (int64_t)culoss__dtype_size(dtype);
  int64_t rows = n / 8 < 1024 ? 1024 : n / 8;
  if (rows > n) rows = n;
  const int64_t cap = rows * n * es;
  return cap > 0 && cap < ctx->lce_block_bytes ? cap : ctx->lce_block_bytes;
}

/* ctx's linear CE block set to InfoNCE's for one call, then restored (a
   context is used by one thread at a time). */
typedef struct {
  culoss_context *ctx;
  int64_t saved;
} block_scope;
static block_scope block_enter(culoss_context *ctx, int64_t n, culoss_dtype dtype) {
  block_scope b;
  b.ctx = ctx, b.saved = ctx->lce_block_bytes;
  ctx->lce_block_bytes = nce_block_bytes(ctx, n, dtype);
  return b;
}
static void block_leave(block_scope b) { b.ctx->lce_block_bytes = b.saved; }

typedef struct {
  size_t hs, tmp, tgt, row_g, rows, lce, total, lce_bytes;
} nce_layout;

static culoss_status plan(culoss_context *ctx, const char *fn, const culoss_info_nce_options *o,
                          int64_t n, int64_t d, culoss_dtype dtype, int with_tmp, nce_layout *L) {
  culoss_linear_ce_options lo;
  culoss_linear_ce_options_init(&lo);
  const size_t es = culoss__dtype_size(dtype), nd = (size_t)n * (size_t)d * es;
  size_t lce = 0;
  if (n > 0) {
    const block_scope b = block_enter(ctx, n, dtype);
    const culoss_status st =
        culoss_linear_cross_entropy_ex_workspace_size(ctx, &lo, n, d, n, dtype, &lce);
    block_leave(b);
    if (st != CULOSS_OK) return st;
  }
  (void)fn;
  L->hs = 0;
  L->tmp = L->hs + round256(nd);
  L->tgt = L->tmp + (with_tmp ? round256(nd) : 0);
  L->row_g = L->tgt + round256((size_t)n * 8);
  L->rows = L->row_g + round256((size_t)n * 4);
  L->lce = L->rows + round256((size_t)n * 4 * 3 * (o->symmetric ? 2 : 1));
  L->lce_bytes = lce;
  L->total = L->lce + round256(lce);
  return CULOSS_OK;
}

static culoss_status check_sizes(culoss_context *ctx, const char *fn,
                                 const culoss_info_nce_options *o, int64_t n, int64_t d,
                                 culoss_dtype dtype) {
  CULOSS__TRY(culoss__check_ctx(ctx, fn));
  CULOSS__TRY(culoss__check_rows(fn, n, d, d));
  CULOSS__TRY(culoss__check_dtype(fn, dtype));
  CULOSS__TRY(culoss__check_reduction(fn, o->reduction, 0));
  if (o->symmetric != 0 && o->symmetric != 1)
    return CULOSS__BAD("%s: symmetric = %d must be 0 or 1", fn, o->symmetric);
  /* n x n logits: n classes of n rows, as linear CE's v */
  if (n > 0 && n > INT64_MAX / 4 / n)
    return CULOSS__BAD("%s: n = %lld: n * n overflows 64-bit byte offsets", fn, (long long)n);
  return CULOSS_OK;
}

culoss_status culoss_info_nce_workspace_size(culoss_context *ctx, const culoss_info_nce_options *o,
                                             int64_t n, int64_t d, culoss_dtype dtype,
                                             size_t *bytes) {
  const char *fn = "culoss_info_nce_workspace_size";
  culoss_info_nce_options def;
  nce_layout L;
  if (o == NULL) culoss_info_nce_options_init(&def), o = &def;
  CULOSS__TRY(check_sizes(ctx, fn, o, n, d, dtype));
  if (bytes == NULL) return CULOSS__BAD("%s: bytes is NULL", fn);
  CULOSS__TRY(plan(ctx, fn, o, n, d, dtype, o->symmetric, &L));
  *bytes = L.total;
  return CULOSS_OK;
}

/* ---- the steps on the CPU backend (the CUDA ones: cuda/info_nce.cu) ---- */

static culoss_status cpu_step(const culoss__nce_args *a) {
  const double t = a->temperature ? (double)a->temperature[0] : 1.0;
  const int64_t n = a->n, m = a->n * a->d;
  switch (a->step) {
  case CULOSS__NCE_PREP: {
    const double g0 = a->grad_loss ? (double)a->grad_loss[0] : 1.0;
    const double half = a->symmetric ? 0.5 : 1.0;
    for (int64_t i = 0; i < n; i++) {
      double g = a->reduction == CULOSS_REDUCTION_NONE
                     ? (a->grad_loss ? (double)a->grad_loss[i] : 1.0)
                     : (a->reduction == CULOSS_REDUCTION_SUM ? g0 : g0 / (double)n);
      a->targets[i] = i;
      a->row_g[i] = (float)(half * g);
    }
    return CULOSS_OK;
  }
  case CULOSS__NCE_SCALE:
  case CULOSS__NCE_AXPY:
    for (int64_t e = 0; e < m; e++) {
      double v = (double)culoss__load_f32(a->x, a->dtype, e) / t;
      if (a->step == CULOSS__NCE_AXPY) v += (double)culoss__load_f32(a->out, a->dtype, e);
      culoss__store_f32(a->out, a->dtype, e, (float)v);
    }
    return CULOSS_OK;
  case CULOSS__NCE_FINISH: {
    const int dirs = a->symmetric ? 2 : 1;
    double total = 0.0, gt = 0.0;
    for (int64_t i = 0; i < n; i++) {
      double l = 0.0;
      for (int k = 0; k < dirs; k++) {
        const float *r = a->rows + (size_t)k * 3 * (size_t)n;
        l += (double)r[i];
        gt += (double)a->row_g[i] * ((double)r[i] - (double)r[2 * n + i]);
      }
      l /= (double)dirs;
      if (a->reduction == CULOSS_REDUCTION_NONE)
        a->loss[i] = (float)l;
      else
        total += l;
    }
    if (a->reduction == CULOSS_REDUCTION_SUM) a->loss[0] = (float)total;
    if (a->reduction == CULOSS_REDUCTION_MEAN) a->loss[0] = (float)(total / (double)n);
    if (a->grad_temperature) a->grad_temperature[0] = (float)(-gt / t);
    return CULOSS_OK;
  }
  }
  return culoss__error(CULOSS_ERROR_INTERNAL, "culoss_info_nce: unknown step %d", (int)a->step);
}

static culoss_status step(culoss_context *ctx, culoss__nce_args *a, culoss__nce_step s) {
  a->step = s;
  if (ctx->backend == CULOSS_BACKEND_CPU) return cpu_step(a);
  return culoss__dispatch_cuda(ctx, "culoss_info_nce", culoss__cuda_nce_step, a);
}

culoss_status culoss_info_nce(culoss_context *ctx, const culoss_info_nce_options *o, int64_t n,
                              int64_t d, culoss_dtype dtype, const void *query, const void *key,
                              float *loss, void *grad_query, void *grad_key, const float *grad_loss,
                              void *workspace, size_t workspace_bytes) {
  const char *fn = "culoss_info_nce";
  culoss_info_nce_options def;
  nce_layout L;
  if (o == NULL) culoss_info_nce_options_init(&def), o = &def;
  CULOSS__TRY(check_sizes(ctx, fn, o, n, d, dtype));
  if (loss == NULL && !(n == 0 && o->reduction == CULOSS_REDUCTION_NONE))
    return CULOSS__BAD("%s: loss is NULL", fn);
  if (n > 0 && (query == NULL || key == NULL))
    return CULOSS__BAD("%s: %s is NULL", fn, query == NULL ? "query" : "key");
  if ((grad_query != NULL && (grad_query == query || grad_query == key)) ||
      (grad_key != NULL && (grad_key == query || grad_key == key)))
    return CULOSS__BAD("%s: a gradient aliases query or key (the inputs are read twice)", fn);
  if (grad_query != NULL && grad_query == grad_key)
    return CULOSS__BAD("%s: grad_query and grad_key are one buffer", fn);
  const int with_tmp = o->symmetric && grad_key != NULL;
  CULOSS__TRY(plan(ctx, fn, o, n, d, dtype, with_tmp, &L));
  if (workspace_bytes < L.total)
    return CULOSS__BAD("%s: workspace_bytes = %zu is less than the %zu bytes "
                       "culoss_info_nce_workspace_size gives",
                       fn, workspace_bytes, L.total);
  if (n > 0 && workspace == NULL) return CULOSS__BAD("%s: workspace is NULL", fn);
  if (ctx->backend == CULOSS_BACKEND_CPU && o->temperature != NULL && !(o->temperature[0] > 0.0f))
    return CULOSS__BAD("%s: temperature = %g must be > 0", fn, (double)o->temperature[0]);
  if (n == 0) { /* nothing to compute: the reduced losses of no pairs */
    culoss__nce_args a;
    memset(&a, 0, sizeof a);
    a.n = 0, a.d = d, a.dtype = dtype, a.reduction = o->reduction, a.symmetric = o->symmetric;
    a.temperature = o->temperature, a.loss = loss, a.grad_temperature = o->grad_temperature;
    if (loss == NULL && o->grad_temperature == NULL) return CULOSS_OK;
    return step(ctx, &a, CULOSS__NCE_FINISH);
  }
  unsigned char *ws = (unsigned char *)workspace;
  void *hs = ws + L.hs, *tmp = with_tmp ? (void *)(ws + L.tmp) : NULL;
  float *rows = (float *)(ws + L.rows);
  culoss__nce_args a;
  memset(&a, 0, sizeof a);
  a.n = n, a.d = d, a.dtype = dtype, a.reduction = o->reduction, a.symmetric = o->symmetric;
  a.temperature = o->temperature, a.targets = (int64_t *)(ws + L.tgt);
  a.row_g = (float *)(ws + L.row_g), a.grad_loss = grad_loss, a.rows = rows;
  a.loss = loss, a.grad_temperature = o->grad_temperature;
  CULOSS__TRY(step(ctx, &a, CULOSS__NCE_PREP));

  culoss_cross_entropy_options ce;
  culoss_cross_entropy_options_init(&ce);
  ce.reduction = CULOSS_REDUCTION_NONE;
  culoss_linear_ce_options lo;
  culoss_linear_ce_options_init(&lo);
  for (int dir = 0; dir < (o->symmetric ? 2 : 1); dir++) {
    /* direction 0: rows q / t over classes k; 1: rows k / t over classes q */
    const void *rows_in = dir == 0 ? query : key, *classes = dir == 0 ? key : query;
    void *g_rows = dir == 0 ? grad_query : tmp, *g_classes = dir == 0 ? grad_key : grad_query;
    float *r = rows + (size_t)dir * 3 * (size_t)n;
    a.x = rows_in, a.out = hs;
    CULOSS__TRY(step(ctx, &a, CULOSS__NCE_SCALE));
    lo.lse = r + n, lo.entropy = r + 2 * n;
    lo.accumulate = dir == 1; /* grad_query gets direction 1's weight gradient added */
    const block_scope b = block_enter(ctx, n, dtype);
    const culoss_status st = culoss_linear_cross_entropy_ex(
        ctx, &ce, &lo, n, d, n, dtype, hs, classes, NULL, CULOSS_I64, a.targets, r, g_rows,
        g_classes, NULL, a.row_g, ws + L.lce, L.lce_bytes);
    block_leave(b);
    CULOSS__TRY(st);
    if (g_rows != NULL) { /* d/d(rows / t) to d/d rows: / t */
      a.x = g_rows, a.out = dir == 0 ? grad_query : grad_key;
      CULOSS__TRY(step(ctx, &a, dir == 0 ? CULOSS__NCE_SCALE : CULOSS__NCE_AXPY));
    }
  }
  return step(ctx, &a, CULOSS__NCE_FINISH);
}
