/*
 * distill.c: distillation between student and teacher logits (generalized
 * JSD, TVD) and its fused linear form: options, validation, the linear
 * form's workspace plan, dispatch. The CPU reference is distill_ref.c, the
 * kernels cuda/distill.cu.
 */
#include <math.h>
#include <string.h>

#include "internal.h"

void culoss_distill_options_init(culoss_distill_options *o) {
  if (o == NULL) return;
  o->divergence = CULOSS_DISTILL_JSD;
  o->beta = 0.5f;
  o->temperature = 1.0f;
  o->reduction = CULOSS_REDUCTION_BATCHMEAN;
  o->ignore_index = -100;
  o->weight_soft = 1.0f;
  o->weight_hard = 0.0f;
  o->hard_options = NULL;
}

static size_t round256(size_t b) { return (b + 255u) & ~(size_t)255u; }

culoss__ld_layout culoss__ld_plan(int64_t n, int64_t d_s, int64_t v, culoss_dtype dtype,
                                  int64_t block_bytes, int gw_acc) {
  culoss__ld_layout L;
  const size_t es = culoss__dtype_size(dtype);
  int64_t rows = block_bytes / (2 * v * (int64_t)es); /* the budget holds both blocks */
  if (rows < 1) rows = 1;
  if (rows > 32768) rows = 32768;
  if (rows > n) rows = n > 0 ? n : 1;
  L.rows = rows;
  L.off_s = 0;
  L.off_t = round256((size_t)rows * (size_t)v * es);
  L.off_row_loss = L.off_t + round256((size_t)rows * (size_t)v * es);
  L.off_bias_acc = L.off_row_loss + round256((size_t)n * 4u);
  L.off_gw_acc = L.off_bias_acc + round256((size_t)v * 4u);
  L.total = L.off_gw_acc + (gw_acc ? round256((size_t)v * (size_t)d_s * 4u) : 0);
  return L;
}

static culoss_status check_options(const char *fn, const culoss_distill_options *o) {
  if (o->divergence != CULOSS_DISTILL_JSD && o->divergence != CULOSS_DISTILL_TVD)
    return CULOSS__BAD("%s: divergence = %d is neither CULOSS_DISTILL_JSD nor CULOSS_DISTILL_TVD",
                       fn, (int)o->divergence);
  if (!(o->beta >= 0.0f && o->beta <= 1.0f))
    return CULOSS__BAD("%s: beta = %g must be in [0, 1]", fn, (double)o->beta);
  if (!(o->temperature > 0.0f && isfinite(o->temperature)))
    return CULOSS__BAD("%s: temperature = %g must be finite and > 0", fn, (double)o->temperature);
  CULOSS__TRY(culoss__check_reduction(fn, o->reduction, 1));
  if (!isfinite(o->weight_soft) || !isfinite(o->weight_hard))
    return CULOSS__BAD("%s: weight_soft = %g and weight_hard = %g must be finite", fn,
                       (double)o->weight_soft, (double)o->weight_hard);
  if (o->hard_options != NULL) {
    const culoss_cross_entropy_options *h = o->hard_options;
    culoss_cross_entropy_options c = *h;
    c.reduction = CULOSS_REDUCTION_MEAN; /* not read here */
    CULOSS__TRY(culoss__check_ce_options(fn, &c));
    if (h->logit_softcap != 0.0f)
      return culoss__error(CULOSS_ERROR_NOT_SUPPORTED,
                           "%s: hard_options->logit_softcap = %g: a soft cap on the hard term "
                           "alone is not offered (it would change the student's distribution for "
                           "one term only); it must be 0",
                           fn, (double)h->logit_softcap);
    if (h->normalizer != NULL)
      return CULOSS__BAD("%s: hard_options->normalizer is not used here and must be NULL (the "
                         "divergence's reduction applies; SUM with grad_loss gives any divisor)",
                         fn);
  }
  return CULOSS_OK;
}

/* What both forms share: options, label type, loss, labels for the hard
   term; on the CPU the hard term's labels are range-checked. */
static culoss_status check_common(const culoss_context *ctx, const char *fn,
                                  const culoss__distill_args *a) {
  CULOSS__TRY(culoss__check_ctx(ctx, fn));
  CULOSS__TRY(check_options(fn, &a->o));
  CULOSS__TRY(culoss__check_dtype(fn, a->dtype));
  if (a->labels != NULL || a->o.weight_hard != 0.0f)
    CULOSS__TRY(culoss__check_index_type(fn, a->ttype));
  if (a->loss == NULL && !(a->n == 0 && a->o.reduction == CULOSS_REDUCTION_NONE))
    return CULOSS__BAD("%s: loss is NULL", fn);
  if (a->o.weight_hard != 0.0f && a->labels == NULL && a->n > 0)
    return CULOSS__BAD("%s: weight_hard = %g needs labels (labels is NULL)", fn,
                       (double)a->o.weight_hard);
  return CULOSS_OK;
}

static culoss_status check_labels_cpu(const culoss_context *ctx, const char *fn,
                                      const culoss__distill_args *a) {
  if (ctx->backend != CULOSS_BACKEND_CPU || a->o.weight_hard == 0.0f || a->n == 0) return CULOSS_OK;
  return culoss__check_targets_cpu(fn, a->labels, a->ttype, a->n, a->v, 1, a->o.ignore_index);
}

culoss_status culoss_distill(culoss_context *ctx, const culoss_distill_options *o, int64_t n,
                             int64_t v, culoss_dtype dtype, const void *student, int64_t ld_s,
                             const void *teacher, int64_t ld_t, culoss_index_type ttype,
                             const void *labels, float *loss, void *grad_student,
                             const float *grad_loss) {
  static const char fn[] = "culoss_distill";
  culoss__distill_args a;
  memset(&a, 0, sizeof a);
  if (o != NULL)
    a.o = *o;
  else
    culoss_distill_options_init(&a.o);
  a.n = n, a.v = v, a.ld_s = ld_s, a.ld_t = ld_t, a.dtype = dtype, a.ttype = ttype;
  a.s = student, a.t = teacher, a.labels = labels, a.loss = loss, a.grad = grad_student;
  a.grad_loss = grad_loss;
  CULOSS__TRY(check_common(ctx, fn, &a));
  CULOSS__TRY(culoss__check_rows(fn, n, v, ld_s));
  if (ld_t < v)
    return CULOSS__BAD("%s: ld_t = %lld is less than v = %lld", fn, (long long)ld_t, (long long)v);
  CULOSS__TRY(culoss__check_rows(fn, n, v, ld_t));
  if (n > 0 && (student == NULL || teacher == NULL))
    return CULOSS__BAD("%s: %s is NULL", fn, student == NULL ? "student" : "teacher");
  if (grad_student != NULL && grad_student == teacher)
    return CULOSS__BAD("%s: grad_student must not alias the teacher logits", fn);
  CULOSS__TRY(check_labels_cpu(ctx, fn, &a));
  if (ctx->backend == CULOSS_BACKEND_CPU) return culoss__cpu_distill(&a);
  return culoss__dispatch_cuda(ctx, fn, culoss__cuda_distill, &a);
}

/* ------------------------------------------------------- the linear form */

static culoss_status check_linear_sizes(const char *fn, int64_t n, int64_t d_s, int64_t d_t,
                                        int64_t v) {
  int k;
  if (n < 0) return CULOSS__BAD("%s: n = %lld is negative", fn, (long long)n);
  if (v < 1) return CULOSS__BAD("%s: v = %lld must be >= 1", fn, (long long)v);
  for (k = 0; k < 2; k++) {
    const int64_t d = k ? d_t : d_s;
    const char *name = k ? "d_t" : "d_s";
    if (d < 1) return CULOSS__BAD("%s: %s = %lld must be >= 1", fn, name, (long long)d);
    if (d > INT64_MAX / 4 / v || (n > 0 && d > INT64_MAX / 4 / n))
      return CULOSS__BAD("%s: n, %s, v = %lld, %lld, %lld overflow 64-bit byte offsets", fn, name,
                         (long long)n, (long long)d, (long long)v);
    if (d > INT32_MAX)
      return culoss__error(CULOSS_ERROR_NOT_SUPPORTED, "%s: %s must fit cuBLAS's 32-bit dimensions",
                           fn, name);
  }
  if (n > INT32_MAX || v > INT32_MAX)
    return culoss__error(CULOSS_ERROR_NOT_SUPPORTED,
                         "%s: n and v must each fit cuBLAS's 32-bit dimensions", fn);
  if (n > 0 && v > INT64_MAX / 4 / n)
    return CULOSS__BAD("%s: n * v overflows 64-bit byte offsets", fn);
  return CULOSS_OK;
}

static culoss_status linear_options(const char *fn, const culoss_linear_ce_options *lo,
                                    culoss_dtype dtype, culoss_dtype *gw, int *gw_acc) {
  if (!(lo->grad_weight_dtype == CULOSS_DTYPE_INPUT || lo->grad_weight_dtype == dtype ||
        lo->grad_weight_dtype == CULOSS_F32))
    return CULOSS__BAD("%s: grad_weight_dtype = %d is neither the input dtype (%d) nor "
                       "CULOSS_F32",
                       fn, (int)lo->grad_weight_dtype, (int)dtype);
  if (lo->accumulate != 0 && lo->accumulate != 1)
    return CULOSS__BAD("%s: accumulate = %d must be 0 or 1", fn, lo->accumulate);
  if (lo->lse != NULL || lo->entropy != NULL)
    return CULOSS__BAD("%s: the lse and entropy outputs of culoss_linear_ce_options are not "
                       "offered here; they must be NULL",
                       fn);
  *gw = lo->grad_weight_dtype == CULOSS_F32 ? CULOSS_F32 : dtype;
  *gw_acc = *gw != CULOSS_F32;
  return CULOSS_OK;
}

culoss_status culoss_linear_distill_workspace_size(culoss_context *ctx,
                                                   const culoss_linear_ce_options *lo, int64_t n,
                                                   int64_t d_s, int64_t d_t, int64_t v,
                                                   culoss_dtype dtype, size_t *bytes) {
  static const char fn[] = "culoss_linear_distill_workspace_size";
  culoss_linear_ce_options dl;
  culoss_dtype gw = dtype;
  int gw_acc = 0;
  if (lo == NULL) culoss_linear_ce_options_init(&dl), lo = &dl;
  CULOSS__TRY(culoss__check_ctx(ctx, fn));
  if (bytes == NULL) return CULOSS__BAD("%s: bytes is NULL", fn);
  CULOSS__TRY(check_linear_sizes(fn, n, d_s, d_t, v));
  CULOSS__TRY(culoss__check_dtype(fn, dtype));
  CULOSS__TRY(linear_options(fn, lo, dtype, &gw, &gw_acc));
  *bytes = culoss__ld_plan(n, d_s, v, dtype, ctx->lce_block_bytes, gw_acc).total;
  return CULOSS_OK;
}

culoss_status culoss_linear_distill(
    culoss_context *ctx, const culoss_distill_options *o, const culoss_linear_ce_options *lo,
    int64_t n, int64_t d_s, int64_t d_t, int64_t v, culoss_dtype dtype, const void *student_hidden,
    const void *student_weight, const void *student_bias, const void *teacher_hidden,
    const void *teacher_weight, const void *teacher_bias, culoss_index_type ttype,
    const void *labels, float *loss, void *grad_hidden, void *grad_weight, void *grad_bias,
    const float *grad_loss, void *workspace, size_t workspace_bytes) {
  static const char fn[] = "culoss_linear_distill";
  culoss__distill_args a;
  culoss_linear_ce_options dl;
  int gw_acc = 0;
  memset(&a, 0, sizeof a);
  if (o != NULL)
    a.o = *o;
  else
    culoss_distill_options_init(&a.o);
  if (lo == NULL) culoss_linear_ce_options_init(&dl), lo = &dl;
  a.n = n, a.v = v, a.ld_s = v, a.ld_t = v, a.dtype = dtype, a.ttype = ttype;
  a.d_s = d_s, a.d_t = d_t;
  a.hs = student_hidden, a.ws = student_weight, a.bs = student_bias;
  a.ht = teacher_hidden, a.wt = teacher_weight, a.bt = teacher_bias;
  a.labels = labels, a.loss = loss, a.grad_loss = grad_loss;
  a.grad_hidden = grad_hidden, a.grad_weight = grad_weight, a.grad_bias = grad_bias;
  a.workspace = workspace, a.workspace_bytes = workspace_bytes;
  CULOSS__TRY(check_common(ctx, fn, &a));
  CULOSS__TRY(check_linear_sizes(fn, n, d_s, d_t, v));
  CULOSS__TRY(linear_options(fn, lo, dtype, &a.gw_dtype, &gw_acc));
  a.accumulate = lo->accumulate;
  if (student_weight == NULL || teacher_weight == NULL)
    return CULOSS__BAD("%s: %s is NULL", fn,
                       student_weight == NULL ? "student_weight" : "teacher_weight");
  if (n > 0 && (student_hidden == NULL || teacher_hidden == NULL))
    return CULOSS__BAD("%s: %s is NULL", fn,
                       student_hidden == NULL ? "student_hidden" : "teacher_hidden");
  if (grad_bias != NULL && student_bias == NULL)
    return CULOSS__BAD("%s: grad_bias needs a student_bias (student_bias is NULL)", fn);
  if (grad_hidden != NULL && (grad_hidden == student_hidden || grad_hidden == teacher_hidden))
    return CULOSS__BAD("%s: grad_hidden must not alias student_hidden or teacher_hidden", fn);
  CULOSS__TRY(check_labels_cpu(ctx, fn, &a));
  if (ctx->backend == CULOSS_BACKEND_CPU) return culoss__cpu_linear_distill(&a);
  {
    const size_t need = culoss__ld_plan(n, d_s, v, dtype, ctx->lce_block_bytes, gw_acc).total;
    if (workspace_bytes < need)
      return CULOSS__BAD("%s: workspace_bytes = %zu is less than the %zu bytes its "
                         "workspace-size query gives",
                         fn, workspace_bytes, need);
    if (workspace == NULL && need > 0) return CULOSS__BAD("%s: workspace is NULL", fn);
  }
  return culoss__dispatch_cuda(ctx, fn, culoss__cuda_linear_distill, &a);
}
