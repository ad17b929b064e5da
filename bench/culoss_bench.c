/*
 * culoss-bench: times the fused cross-entropy forward+backward on the GPU and
 * reports achieved bandwidth against the device's copy bandwidth measured in
 * the same run.
 *
 * Cases: fused cross-entropy forward+backward (N in {4096, 16384}, V in
 * {32000, 50257, 128256, 152064, 256000}), every elementwise loss at 10^6 ..
 * 10^9 elements, each in fp32 and bf16, and fused linear + cross-entropy
 * against the unfused baseline (N = 8192, D = 4096, bf16).
 *
 * Method (per case): inputs generated on the device (fresh random values,
 * about 0.1% masked -inf logits), the GPU result validated against the CPU
 * reference on a subsample first (a benchmark of a wrong kernel is
 * worthless), warm-up, then each repeat timed with CUDA events with L2
 * flushed before it (a write over twice its size); median and spread.
 *
 * Bytes counted are the minimum any implementation must move:
 *   cross-entropy: n*v*sizeof(T) read + n*v*sizeof(T) written + 8n (targets)
 *   elementwise:   2*m*sizeof(T) read (input, target) + m*sizeof(T) written
 * GB/s = bytes / median time; %copy = GB/s over the device-to-device copy
 * bandwidth measured in the same run (1 GiB cudaMemcpy, read + write).
 * FLOPs (linear + CE): 6 n d v (forward, grad_hidden, grad_weight GEMMs).
 *
 * Baselines, in the same run: an unfused cross-entropy (log_softmax to fp32
 * log-probabilities, NLL, softmax backward: three kernels) and a naive
 * one-thread-per-element kernel for each elementwise loss (bench/baselines.cu);
 * cuBLAS + culoss_cross_entropy for linear + CE.
 *
 * Without a GPU it says so and runs the CPU reference at small sizes, labelled
 * as CPU timings.
 */
#define _POSIX_C_SOURCE 200809L
#include <unistd.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "culoss.h"
#include "helpers.h"
#include "ew_call.h"
#include "more_losses_call.h"
#include "loss_math.h"
#include "model.h"

#ifdef CULOSS_HAVE_CUDA
#include <cublas_v2.h>
#include <cuda_runtime_api.h>
#endif

typedef struct {
  int quick, csv, json, repeats;
  int tiny;         /* smallest sizes: a check of the tool's GPU path, not a measurement */
  const char *only; /* NULL, "ce", "ew", "more", "lce" or "distill": one family of cases */
} bench_opts;

static int wanted(const bench_opts *bo, const char *family) {
  return bo->only == NULL || strcmp(bo->only, family) == 0;
}

static int cmp_float(const void *a, const void *b) {
  float x = *(const float *)a, y = *(const float *)b;
  return (x > y) - (x < y);
}

static uint64_t rng_state = 0x1234567ull;
static double urand(void) {
  rng_state ^= rng_state << 13, rng_state ^= rng_state >> 7, rng_state ^= rng_state << 17;
  return (double)(rng_state >> 11) * 0x1.0p-53;
}
static double nrand(void) {
  double u = urand(), v = urand();
  return sqrt(-2.0 * log(u + 1e-300)) * cos(6.283185307179586 * v);
}

static const char *dtype_name(culoss_dtype d) {
  return d == CULOSS_F32 ? "f32" : (d == CULOSS_F16 ? "f16" : "bf16");
}

/* Random logits of dtype d for an [n, v] block, with a few -inf (masked)
   entries and large values, as the tests use. */
static void *make_logits(int64_t n, int64_t v, culoss_dtype d) {
  size_t es = d == CULOSS_F32 ? 4 : 2;
  unsigned char *h = malloc((size_t)(n * v) * es);
  if (!h) return NULL;
  for (int64_t i = 0; i < n * v; i++) {
    float x = (float)(2.0 * nrand());
    if (urand() < 1e-3) x = -INFINITY;
    if (d == CULOSS_F32)
      ((float *)h)[i] = x;
    else if (d == CULOSS_F16)
      ((uint16_t *)h)[i] = culoss__f32_to_f16(x);
    else
      ((uint16_t *)h)[i] = culoss__f32_to_bf16(x);
  }
  return h;
}

/* One element of a host array of dtype d, as float. */
static float to_f_host(const void *p, culoss_dtype d, int64_t i) {
  if (d == CULOSS_F32) return ((const float *)p)[i];
  if (d == CULOSS_BF16) return culoss__bf16_to_f32(((const uint16_t *)p)[i]);
  return culoss__f16_to_f32(((const uint16_t *)p)[i]);
}

static int run_cpu(const bench_opts *bo) {
  printf("culoss-bench: no CUDA device (%s).\n", culoss_last_error());
  printf("Running the CPU reference backend at small sizes instead. These are CPU timings of\n"
         "the reference loops, not GPU figures.\n\n");
  culoss_context *ctx;
  if (culoss_create(&ctx, CULOSS_BACKEND_CPU, 0) != CULOSS_OK) return 1;
  const int64_t n = 64, vs[] = {32000, 128256};
  printf("%-8s %6s %8s %5s %12s %10s\n", "backend", "n", "v", "dtype", "time_ms", "GB/s");
  for (int vi = 0; vi < 2; vi++)
    for (int di = 0; di < 2; di++) {
      culoss_dtype d = di ? CULOSS_BF16 : CULOSS_F32;
      int64_t v = vs[vi];
      size_t es = d == CULOSS_F32 ? 4 : 2;
      void *x = make_logits(n, v, d), *g = malloc((size_t)(n * v) * es);
      int64_t *t = malloc((size_t)n * 8);
      float loss;
      for (int64_t i = 0; i < n; i++) t[i] = (int64_t)(urand() * (double)v);
      int reps = bo->quick ? 2 : 5;
      float ms[8];
      for (int r = 0; r < reps; r++) {
        struct timespec a, b;
        clock_gettime(CLOCK_MONOTONIC, &a);
        const culoss_status st =
            culoss_cross_entropy(ctx, NULL, n, v, d, x, v, CULOSS_I64, t, &loss, g, NULL);
        clock_gettime(CLOCK_MONOTONIC, &b);
        if (st != CULOSS_OK) {
          fprintf(stderr, "culoss_cross_entropy (CPU): %s: %s\n", culoss_status_string(st),
                  culoss_last_error());
          return 1;
        }
        ms[r] = (float)((b.tv_sec - a.tv_sec) * 1e3 + (b.tv_nsec - a.tv_nsec) * 1e-6);
      }
      /* the value: the mean of lse - x_t, computed here from the same values */
      double want = 0.0;
      for (int64_t i = 0; i < n; i++) {
        double m = -INFINITY, sum = 0.0;
        for (int64_t j = 0; j < v; j++) m = fmax(m, (double)to_f_host(x, d, i * v + j));
        for (int64_t j = 0; j < v; j++) sum += exp((double)to_f_host(x, d, i * v + j) - m);
        want += m + log(sum) - (double)to_f_host(x, d, i * v + t[i]);
      }
      want /= (double)n;
      if (!(fabs((double)loss - want) <= 1e-5 * fabs(want) + 1e-6)) {
        fprintf(stderr, "CPU smoke check: loss %.9g, expected %.9g\n", (double)loss, want);
        return 1;
      }
      qsort(ms, (size_t)reps, sizeof *ms, cmp_float);
      double bytes = 2.0 * (double)(n * v) * (double)es;
      printf("%-8s %6lld %8lld %5s %12.3f %10.2f   (loss %.4f)\n", "cpu", (long long)n,
             (long long)v, dtype_name(d), ms[reps / 2], bytes / (ms[reps / 2] * 1e-3) / 1e9,
             (double)loss);
      free(x), free(g), free(t);
    }
  culoss_destroy(ctx);
  return 0;
}

#ifdef CULOSS_HAVE_CUDA
#define CK(call)                                                                                   \
  do {                                                                                             \
    cudaError_t e_ = (call);                                                                       \
    if (e_ != cudaSuccess) {                                                                       \
      fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #call, cudaGetErrorString(e_));        \
      return -1;                                                                                   \
    }                                                                                              \
  } while (0)
#define CL(call)                                                                                   \
  do {                                                                                             \
    culoss_status s_ = (call);                                                                     \
    if (s_ != CULOSS_OK) {                                                                         \
      fprintf(stderr, "%s:%d %s: %s: %s\n", __FILE__, __LINE__, #call, culoss_status_string(s_),   \
              culoss_last_error());                                                                \
      return -1;                                                                                   \
    }                                                                                              \
  } while (0)

static void *flush_buf;
static size_t flush_bytes;

/* baselines.cu */
int bench_fill(void *x, void *y, int dtype, int64_t count, uint64_t seed, int op);
int bench_fill_targets(int64_t *t, int64_t n, int64_t c, uint64_t seed);
int bench_ce_unfused(const void *x, int dtype, int64_t n, int64_t v, const int64_t *t, float *lp,
                     float *loss, void *g);
int bench_ew_naive(int op, const void *x, const void *y, int dtype, int64_t m, void *g,
                   float *loss);
int bench_ce_soft_unfused(const void *x, const void *y, int dtype, int64_t n, int64_t v, float *lp,
                          float *row_loss, float *loss, void *g);
int bench_nll_naive(const void *x, int dtype, int64_t n, int64_t v, const int64_t *t, void *g,
                    float *loss);
int bench_mm_naive(const void *x, int dtype, int64_t n, int64_t v, const int64_t *t, void *g,
                   float *row_h, float *loss);
int bench_mlm_naive(const void *x, const int64_t *t, int dtype, int64_t n, int64_t c, void *g,
                    float *loss);
int bench_ew3_naive(int op, const void *x, const void *x2, const void *y, int dtype, int64_t m,
                    void *g, void *g2, float *loss);
int bench_emb_two_pass(int op, const void *a, const void *b, const void *c, const float *y,
                       int dtype, int64_t n, int64_t d, float *stats, void *ga, void *gb, void *gc,
                       float *loss);

static int flush_l2(void) {
  CK(cudaMemsetAsync(flush_buf, (int)(urand() * 255), flush_bytes, 0));
  return 0;
}

/* Device copy bandwidth: GB/s counting bytes read + bytes written. */
static double copy_bandwidth(int repeats, size_t bytes) {
  void *a = NULL, *b = NULL;
  cudaEvent_t e0 = NULL, e1 = NULL;
  float ms[64];
  double gbs = -1.0;
  if (repeats > 64) repeats = 64;
  /* every call checked; any failure gives -1 (reported by the caller) */
  if (cudaMalloc(&a, bytes) != cudaSuccess || cudaMalloc(&b, bytes) != cudaSuccess ||
      cudaMemset(a, 1, bytes) != cudaSuccess || cudaEventCreate(&e0) != cudaSuccess ||
      cudaEventCreate(&e1) != cudaSuccess ||
      cudaMemcpy(b, a, bytes, cudaMemcpyDeviceToDevice) != cudaSuccess) /* warm-up */
    goto done;
  for (int r = 0; r < repeats; r++)
    if (cudaEventRecord(e0, 0) != cudaSuccess ||
        cudaMemcpyAsync(b, a, bytes, cudaMemcpyDeviceToDevice, 0) != cudaSuccess ||
        cudaEventRecord(e1, 0) != cudaSuccess || cudaEventSynchronize(e1) != cudaSuccess ||
        cudaEventElapsedTime(&ms[r], e0, e1) != cudaSuccess)
      goto done;
  qsort(ms, (size_t)repeats, sizeof *ms, cmp_float);
  gbs = 2.0 * (double)bytes / (ms[repeats / 2] * 1e-3) / 1e9;
done:
  if (a) (void)cudaFree(a);
  if (b) (void)cudaFree(b);
  if (e0) (void)cudaEventDestroy(e0);
  if (e1) (void)cudaEventDestroy(e1);
  return gbs;
}

/* Times `launch(state)` with CUDA events: 3 warm-ups, then `reps` repeats
   each after an L2 flush; ms[] receives the sorted times. */
static int time_it(int (*launch)(void *), void *state, int reps, float *ms) {
  cudaEvent_t e0, e1;
  CK(cudaEventCreate(&e0));
  CK(cudaEventCreate(&e1));
  for (int r = 0; r < 3; r++)
    if (launch(state)) return -1;
  for (int r = 0; r < reps; r++) {
    if (flush_l2()) return -1;
    CK(cudaEventRecord(e0, 0));
    if (launch(state)) return -1;
    CK(cudaEventRecord(e1, 0));
    CK(cudaEventSynchronize(e1));
    CK(cudaEventElapsedTime(&ms[r], e0, e1));
  }
  CK(cudaEventDestroy(e0));
  CK(cudaEventDestroy(e1));
  qsort(ms, (size_t)reps, sizeof *ms, cmp_float);
  return 0;
}

/* ---------------------------------------------------------------- results */
typedef struct {
  char name[48];
  int64_t n, v;
  culoss_dtype d;
  float med, min, max, base_med;
  double bytes, gbs, pct, err;
  int ok;
} result_t;

static result_t results[512];
static int nresults, total_cases, case_no;
static double copy_bw;

static void progress(const char *what, int64_t n, int64_t v, culoss_dtype d) {
  case_no++;
  if (isatty(2))
    fprintf(stderr, "\r[%d/%d] %-22s n=%lld v=%lld %s ...        ", case_no, total_cases, what,
            (long long)n, (long long)v, dtype_name(d));
}

static int record(const bench_opts *bo, const char *name, int64_t n, int64_t v, culoss_dtype d,
                  const float *ms, const float *base, double bytes, double err, double tol) {
  result_t *r = &results[nresults < 511 ? nresults++ : 511];
  const int reps = bo->repeats;
  snprintf(r->name, sizeof r->name, "%s", name);
  r->n = n, r->v = v, r->d = d;
  r->med = ms[reps / 2], r->min = ms[0], r->max = ms[reps - 1];
  r->base_med = base ? base[reps / 2] : NAN;
  r->bytes = bytes;
  r->gbs = bytes / (r->med * 1e-3) / 1e9;
  r->pct = 100.0 * r->gbs / copy_bw;
  r->err = err;
  r->ok = err <= tol;
  if (isatty(2)) fprintf(stderr, "\r%80s\r", "");
  if (bo->csv)
    printf("%s,%lld,%lld,%s,%.4f,%.4f,%.4f,%.4f,%.1f,%.1f,%.2e,%s\n", r->name, (long long)n,
           (long long)v, dtype_name(d), r->med, r->min, r->max, r->base_med, r->gbs, r->pct, err,
           r->ok ? "ok" : "MISMATCH");
  else if (!bo->json)
    printf("%-22s %10lld %7lld %5s %8.4f %8.4f %8.4f %8.1f %6.1f%% %9.4f %6.2fx %8.1e %s\n",
           r->name, (long long)n, (long long)v, dtype_name(d), r->med, r->min, r->max, r->gbs,
           r->pct, r->base_med, r->base_med / r->med, err, r->ok ? "ok" : "MISMATCH");
  fflush(stdout);
  return r->ok ? 0 : 1;
}

/* Frees count buffers (NULL entries are fine); -1 on the first failure. */
static int free_all(culoss_context *ctx, void *const *bufs, int count) {
  for (int i = 0; i < count; i++) CL(culoss_free(ctx, bufs[i]));
  return 0;
}

/* Enough free device memory for `bytes` (with a margin)? */
static int fits(size_t bytes) {
  size_t free_b = 0, total_b = 0;
  if (cudaMemGetInfo(&free_b, &total_b) != cudaSuccess) return 0;
  return bytes < free_b / 10 * 9;
}

/* ---------------------------------------------------------------- row losses */
/* The losses over [n, v] rows: cross-entropy with class indices (against the
   unfused three-kernel composition), with soft targets (against the unfused
   four-kernel one), NLL and multi-margin (against one thread per element). */
enum { ROW_CE, ROW_SOFT, ROW_NLL, ROW_MM, ROW_KINDS };
static const char *row_name[ROW_KINDS] = {"cross_entropy fwd+bwd", "ce_soft fwd+bwd", "nll fwd+bwd",
                                          "multi_margin fwd+bwd"};

typedef struct {
  culoss_context *ctx;
  int kind;
  int64_t n, v;
  culoss_dtype d;
  void *x, *y, *g, *t;
  float *loss, *lp, *rowbuf;
  float *rows_host; /* per-row losses of a reduction NONE call, for the check */
} ce_state;

/* |a - b| / |b|, 0 for equal values (infinities included: a -inf target
   logit gives +inf on both sides), infinite for NaN or unequal infinities. */
static double rel_err(double a, double b) {
  if (a == b) return 0.0;
  const double e = fabs(a - b) / (fabs(b) + 1e-6);
  return e == e ? e : INFINITY;
}

/* One of the row losses on context c with reduction red (options otherwise
   PyTorch's defaults). */
static culoss_status row_loss_call(culoss_context *c, int kind, culoss_reduction red, int64_t n,
                                   int64_t v, culoss_dtype d, const void *x, const void *y,
                                   const void *t, float *loss, void *g) {
  culoss_cross_entropy_options o;
  culoss_cross_entropy_options_init(&o);
  o.reduction = red;
  culoss_multi_margin_options mo;
  culoss_multi_margin_options_init(&mo);
  mo.reduction = red;
  switch (kind) {
  case ROW_CE: return culoss_cross_entropy(c, &o, n, v, d, x, v, CULOSS_I64, t, loss, g, NULL);
  case ROW_SOFT: return culoss_cross_entropy_soft(c, &o, n, v, d, x, v, y, loss, g, NULL);
  case ROW_NLL: return culoss_nll(c, &o, n, v, d, x, v, CULOSS_I64, t, loss, g, NULL);
  default: return culoss_multi_margin(c, &mo, n, v, d, x, v, CULOSS_I64, t, loss, g, NULL);
  }
}

/* The per-row losses (reduction NONE, no gradient) into s->rowbuf and then
   s->rows_host, for ce_check. */
static int ce_row_losses(ce_state *s) {
  CL(row_loss_call(s->ctx, s->kind, CULOSS_REDUCTION_NONE, s->n, s->v, s->d, s->x, s->y, s->t,
                   s->rowbuf, NULL));
  CL(culoss_synchronize(s->ctx));
  CL(culoss_download(s->ctx, s->rows_host, s->rowbuf, (size_t)s->n * sizeof(float)));
  return 0;
}

static int ce_launch(void *p) {
  ce_state *s = p;
  CL(row_loss_call(s->ctx, s->kind, CULOSS_REDUCTION_MEAN, s->n, s->v, s->d, s->x, s->y, s->t,
                   s->loss, s->g));
  return 0;
}

static int ce_baseline(void *p) {
  ce_state *s = p;
  const int d = (int)s->d;
  switch (s->kind) {
  case ROW_CE:
    CK((cudaError_t)bench_ce_unfused(s->x, d, s->n, s->v, s->t, s->lp, s->loss, s->g));
    break;
  case ROW_SOFT:
    CK((cudaError_t)bench_ce_soft_unfused(s->x, s->y, d, s->n, s->v, s->lp, s->rowbuf, s->loss,
                                          s->g));
    break;
  case ROW_NLL: CK((cudaError_t)bench_nll_naive(s->x, d, s->n, s->v, s->t, s->g, s->loss)); break;
  default: CK((cudaError_t)bench_mm_naive(s->x, d, s->n, s->v, s->t, s->g, s->rowbuf, s->loss));
  }
  return 0;
}

/* The MEAN loss against the mean of the per-row losses, three rows' losses
   and MEAN gradients against the CPU reference (row SUM / n); returns the
   largest relative error (NaN counts as infinite). */
static double ce_check(const ce_state *s) {
  culoss_context *cpu;
  const size_t es = s->d == CULOSS_F32 ? 4 : 2, rb = (size_t)s->v * es;
  const int64_t rows[3] = {0, s->n / 2, s->n - 1};
  void *x = malloc(rb), *y = malloc(rb), *g = malloc(rb), *ref = malloc(rb);
  double worst = 0;
  if (culoss_create(&cpu, CULOSS_BACKEND_CPU, 0) != CULOSS_OK) return INFINITY;
  /* the MEAN loss of the checked call against the mean of the per-row losses
     (the GPU's own reduction NONE, whose three rows meet the CPU below) */
  float mean_gpu;
  if (cudaMemcpy(&mean_gpu, s->loss, sizeof mean_gpu, cudaMemcpyDeviceToHost)) return INFINITY;
  double mean_rows = 0.0;
  for (int64_t i = 0; i < s->n; i++) mean_rows += (double)s->rows_host[i];
  mean_rows /= (double)s->n; /* no ignored targets in the bench: D = n */
  /* losses are fp32 from identical inputs in every dtype: their errors are
     scaled so that 1e-4 meets the 16-bit gradient tolerance (2e-2) */
  const double loss_w = s->d == CULOSS_F32 ? 1.0 : 200.0;
  worst = loss_w * rel_err((double)mean_gpu, mean_rows);
  for (int k = 0; k < 3; k++) {
    const int64_t i = rows[k];
    int64_t t;
    float l;
    culoss_status st;
    if (cudaMemcpy(x, (const char *)s->x + (size_t)i * rb, rb, cudaMemcpyDeviceToHost) ||
        cudaMemcpy(g, (const char *)s->g + (size_t)i * rb, rb, cudaMemcpyDeviceToHost) ||
        cudaMemcpy(&t, (const int64_t *)s->t + i, 8, cudaMemcpyDeviceToHost) ||
        (s->y && cudaMemcpy(y, (const char *)s->y + (size_t)i * rb, rb, cudaMemcpyDeviceToHost)))
      return INFINITY;
    st = row_loss_call(cpu, s->kind, CULOSS_REDUCTION_SUM, 1, s->v, s->d, x, y, &t, &l, ref);
    if (st != CULOSS_OK) return INFINITY;
    /* the row's loss (reduction NONE on the GPU) against the CPU's */
    const double le = loss_w * rel_err((double)s->rows_host[i], (double)l);
    if (!(le <= worst)) worst = le;
    /* absolute floors: multi-margin's target column sums the row (1e-4 of
       the largest entry); an fp16 MEAN gradient g / n falls into fp16's
       subnormals, whose step 2^-24 is n 2^-24 at the SUM scale: half a step
       must stay under the 2e-2 tolerance, so the floor is 64 steps */
    double gmax = 0.0;
    for (int64_t j = 0; j < s->v; j++)
      if (fabs((double)to_f_host(ref, s->d, j)) > gmax)
        gmax = fabs((double)to_f_host(ref, s->d, j));
    const double floor_ =
        1e-6 + 1e-4 * gmax + (s->d == CULOSS_F16 ? 64.0 * (double)s->n * 0x1.0p-24 : 0.0);
    for (int64_t j = 0; j < s->v; j++) {
      const double a = (double)to_f_host(g, s->d, j) * (double)s->n, b = to_f_host(ref, s->d, j);
      const double e = fabs(a - b) / (fabs(b) + floor_);
      if (!(e <= worst)) worst = e; /* NaN counts as the worst */
    }
  }
  culoss_destroy(cpu);
  free(x), free(y), free(g), free(ref);
  return worst;
}

static int bench_ce(culoss_context *ctx, const bench_opts *bo, int kind, int64_t n, int64_t v,
                    culoss_dtype d) {
  const size_t es = d == CULOSS_F32 ? 4 : 2, xbytes = (size_t)(n * v) * es;
  const char *name = row_name[kind];
  progress(name, n, v, d);
  const size_t need = (kind == ROW_SOFT ? 3 : 2) * xbytes + (size_t)(n * v) * 4 + (size_t)n * 12;
  if (!fits(need)) {
    if (!bo->json)
      printf("%-22s %10lld %7lld %5s skipped: not enough device memory\n", name, (long long)n,
             (long long)v, dtype_name(d));
    return 0;
  }
  ce_state s = {ctx, kind, n, v, d, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL};
  CL(culoss_malloc(ctx, &s.x, xbytes));
  CL(culoss_malloc(ctx, &s.g, xbytes));
  CL(culoss_malloc(ctx, &s.t, (size_t)n * 8));
  CL(culoss_malloc(ctx, (void **)&s.loss, sizeof(float)));
  CL(culoss_malloc(ctx, (void **)&s.rowbuf, (size_t)n * sizeof(float)));
  if (kind == ROW_CE || kind == ROW_SOFT)
    CL(culoss_malloc(ctx, (void **)&s.lp, (size_t)(n * v) * 4));
  if (kind == ROW_SOFT) {
    CL(culoss_malloc(ctx, &s.y, xbytes));
    CK((cudaError_t)bench_fill(s.x, s.y, (int)d, n * v, 1000 + (uint64_t)v, -4));
  } else {
    CK((cudaError_t)bench_fill(s.x, NULL, (int)d, n * v, 1000 + (uint64_t)v,
                               kind == ROW_MM ? -3 : -1));
  }
  CK((cudaError_t)bench_fill_targets(s.t, n, v, 77));
  s.rows_host = malloc((size_t)n * sizeof(float));
  if (s.rows_host == NULL || ce_row_losses(&s)) return -1;
  if (ce_launch(&s)) return -1;
  CL(culoss_synchronize(ctx));
  const double err = ce_check(&s);
  free(s.rows_host);
  float ms[256], base[256];
  if (time_it(ce_launch, &s, bo->repeats, ms)) return -1;
  if (time_it(ce_baseline, &s, bo->repeats, base)) return -1;
  CL(culoss_synchronize(ctx));
  /* bytes: each input read once, the gradient written once */
  double bytes = 2.0 * (double)xbytes + (double)n * 8; /* CE, multi-margin */
  if (kind == ROW_SOFT) bytes = 3.0 * (double)xbytes;
  if (kind == ROW_NLL) bytes = (double)xbytes + (double)n * (8 + (double)es);
  const int bad = record(bo, name, n, v, d, ms, base, bytes, err, d == CULOSS_F32 ? 1e-3 : 2e-2);
  void *const bufs[] = {s.x, s.g, s.t, s.loss, s.rowbuf, s.lp, s.y};
  if (free_all(ctx, bufs, 7)) return -1;
  return bad;
}

/* ---------------------------------------------------------------- elementwise */
/* bench/baselines.cu's fill_kernel and naive_kernel have a case for each
   t_op of tests/ew_call.h, by number */
_Static_assert(T_NUM_OPS == 15, "extend baselines.cu's fill_kernel and naive_kernel");
typedef struct {
  culoss_context *ctx;
  t_op op;
  t_opts o;
  int64_t m;
  culoss_dtype d;
  void *x, *y, *g;
  float *loss;
} ew_state;

static int ew_launch(void *p) {
  ew_state *s = p;
  CL(ew_call(s->ctx, s->op, &s->o, s->m, 1, s->d, s->x, s->y, s->loss, s->g, NULL));
  return 0;
}

static int ew_baseline(void *p) {
  ew_state *s = p;
  CK((cudaError_t)bench_ew_naive((int)s->op, s->x, s->y, (int)s->d, s->m, s->g, s->loss));
  return 0;
}

/* The gradient over the first and last 2^20 elements against the CPU
   reference, and (up to 10^8 elements) the mean over all of them. */
static double ew_check(const ew_state *s) {
  culoss_context *cpu;
  const size_t es = s->d == CULOSS_F32 ? 4 : 2;
  const int64_t k = s->m < ((int64_t)1 << 20) ? s->m : ((int64_t)1 << 20);
  const float inv_m = (float)(1.0 / (double)s->m);
  t_opts sum = {CULOSS_REDUCTION_SUM, NULL, NULL, 0};
  double worst = 0;
  float loss, ref_loss;
  void *x = malloc((size_t)k * es), *y = malloc((size_t)k * es), *g = malloc((size_t)k * es);
  void *ref = malloc((size_t)k * es);
  if (culoss_create(&cpu, CULOSS_BACKEND_CPU, 0) != CULOSS_OK) return INFINITY;
  for (int part = 0; part < 2; part++) {
    const size_t at = (size_t)(part ? s->m - k : 0) * es;
    if (cudaMemcpy(x, (const char *)s->x + at, (size_t)k * es, cudaMemcpyDeviceToHost) ||
        cudaMemcpy(y, (const char *)s->y + at, (size_t)k * es, cudaMemcpyDeviceToHost) ||
        cudaMemcpy(g, (const char *)s->g + at, (size_t)k * es, cudaMemcpyDeviceToHost) ||
        ew_call(cpu, s->op, &sum, k, 1, s->d, x, y, &ref_loss, ref, &inv_m))
      return INFINITY;
    for (int64_t i = 0; i < k; i++) {
      const double a = to_f_host(g, s->d, i), b = to_f_host(ref, s->d, i);
      /* relative error, floored at 1% of the gradient's scale 1/m: a gradient
         that nearly cancels (sigmoid(x) ~ y) still carries the fp32 rounding
         of its O(1/m) terms */
      const double e = fabs(a - b) / (fabs(b) + 1e-2 * inv_m);
      if (!(e <= worst)) worst = e;
    }
  }
  if (s->m <= 100000000) {
    void *fx = malloc((size_t)s->m * es), *fy = malloc((size_t)s->m * es);
    if (!fx || !fy || cudaMemcpy(fx, s->x, (size_t)s->m * es, cudaMemcpyDeviceToHost) ||
        cudaMemcpy(fy, s->y, (size_t)s->m * es, cudaMemcpyDeviceToHost) ||
        cudaMemcpy(&loss, s->loss, 4, cudaMemcpyDeviceToHost) ||
        ew_call(cpu, s->op, &s->o, s->m, 1, s->d, fx, fy, &ref_loss, NULL, NULL))
      return INFINITY;
    const double e = fabs((double)loss - ref_loss) / (fabs((double)ref_loss) + 1e-30);
    if (!(e <= worst)) worst = e;
    free(fx), free(fy);
  }
  culoss_destroy(cpu);
  free(x), free(y), free(g), free(ref);
  return worst;
}

static int bench_ew(culoss_context *ctx, const bench_opts *bo, t_op op, int64_t m, culoss_dtype d) {
  const size_t es = d == CULOSS_F32 ? 4 : 2, bytes = (size_t)m * es;
  progress(t_op_name[op], m, 1, d);
  if (!fits(3 * bytes)) {
    if (!bo->json)
      printf("%-22s %10lld %7d %5s skipped: not enough device memory\n", t_op_name[op],
             (long long)m, 1, dtype_name(d));
    return 0;
  }
  ew_state s = {ctx, op, {CULOSS_REDUCTION_MEAN, NULL, NULL, 0}, m, d, NULL, NULL, NULL, NULL};
  CL(culoss_malloc(ctx, &s.x, bytes));
  CL(culoss_malloc(ctx, &s.y, bytes));
  CL(culoss_malloc(ctx, &s.g, bytes));
  CL(culoss_malloc(ctx, (void **)&s.loss, sizeof(float)));
  CK((cudaError_t)bench_fill(s.x, s.y, (int)d, m, 99 + (uint64_t)op, (int)op));
  if (ew_launch(&s)) return -1;
  CL(culoss_synchronize(ctx));
  const double err = ew_check(&s);
  float ms[256], base[256];
  if (time_it(ew_launch, &s, bo->repeats, ms)) return -1;
  if (time_it(ew_baseline, &s, bo->repeats, base)) return -1;
  CL(culoss_synchronize(ctx));
  const int bad = record(bo, t_op_name[op], m, 1, d, ms, base, 3.0 * (double)bytes, err,
                         d == CULOSS_F32 ? 1e-4 : 2e-2);
  void *const bufs[] = {s.x, s.y, s.g, s.loss};
  if (free_all(ctx, bufs, 4)) return -1;
  return bad;
}
/* -------------------------------------- margin ranking, Gaussian, embedding */
/* tests/more_losses_call.h's l_kind: margin ranking and Gaussian NLL over m
   elements (d = 1), cosine and triplet over n rows of d. */
typedef struct {
  culoss_context *ctx;
  l_kind k;
  l_opts o;
  int64_t n, d;
  culoss_dtype dt;
  void *x[3], *g[3];
  float *yt, *stats, *loss;
} more_state;

static int more_launch(void *p) {
  more_state *s = p;
  const void *in[3] = {s->x[0], s->x[1], s->x[2]};
  CL(l_call(s->ctx, s->k, &s->o, s->n, s->d, s->d, s->dt, in, s->yt, s->loss, s->g, NULL));
  return 0;
}

static int more_baseline(void *p) {
  more_state *s = p;
  if (s->k == L_MLSOFT) /* per element: BCE with logits, one thread each (no row sums) */
    CK((cudaError_t)bench_ew_naive(0, s->x[0], s->x[1], (int)s->dt, s->n * s->d, s->g[0], s->loss));
  else if (l_rows(s->k))
    CK((cudaError_t)bench_emb_two_pass(s->k == L_TRIPLET, s->x[0], s->x[1], s->x[2], s->yt,
                                       (int)s->dt, s->n, s->d, s->stats, s->g[0], s->g[1], s->g[2],
                                       s->loss));
  else /* x[2] is the target: (x1, x2, y) and (input, var, target) */
    CK((cudaError_t)bench_ew3_naive(s->k == L_GAUSS, s->x[0], s->x[1], s->x[2], (int)s->dt, s->n,
                                    s->g[0], s->g[1], s->loss));
  return 0;
}

/* The mean loss over everything, and every gradient of the first rows (2^20
   elements at most), against the CPU reference. */
static double more_check(const more_state *s) {
  culoss_context *cpu;
  const size_t es = s->dt == CULOSS_F32 ? 4 : 2, all = (size_t)(s->n * s->d) * es;
  const int ni = l_ninputs(s->k);
  int64_t rows = ((int64_t)1 << 20) / s->d;
  if (rows > s->n) rows = s->n;
  if (rows < 1) rows = 1;
  const size_t part = (size_t)(rows * s->d) * es;
  void *h[3], *g[3], *r[3];
  float *yt = malloc((size_t)s->n * 4), loss, ref_loss, part_loss;
  double worst = 0.0;
  if (culoss_create(&cpu, CULOSS_BACKEND_CPU, 0) != CULOSS_OK) return INFINITY;
  for (int q = 0; q < 3; q++) {
    h[q] = malloc(all), g[q] = malloc(part), r[q] = malloc(part);
    if (!h[q] || !g[q] || !r[q] || cudaMemcpy(h[q], s->x[q], all, cudaMemcpyDeviceToHost))
      return INFINITY;
    if (q < ni && cudaMemcpy(g[q], s->g[q], part, cudaMemcpyDeviceToHost)) return INFINITY;
  }
  if (cudaMemcpy(yt, s->yt, (size_t)s->n * 4, cudaMemcpyDeviceToHost) ||
      cudaMemcpy(&loss, s->loss, 4, cudaMemcpyDeviceToHost))
    return INFINITY;
  const void *in[3] = {h[0], h[1], h[2]};
  void *none[3] = {NULL, NULL, NULL};
  l_opts sum = s->o;
  sum.red = CULOSS_REDUCTION_SUM;
  const float inv_n = (float)(1.0 / (double)s->n);
  if (l_call(cpu, s->k, &s->o, s->n, s->d, s->d, s->dt, in, yt, &ref_loss, none, NULL) ||
      l_call(cpu, s->k, &sum, rows, s->d, s->d, s->dt, in, yt, &part_loss, r, &inv_n))
    return INFINITY;
  worst = fabs((double)loss - ref_loss) / (fabs((double)ref_loss) + 1e-30);
  for (int q = 0; q < ni; q++)
    for (int64_t e = 0; e < rows * s->d; e++) {
      const double a = to_f_host(g[q], s->dt, e), b = to_f_host(r[q], s->dt, e);
      /* floored at 1% of the gradient's scale 1/n: cancelling terms */
      const double err = fabs(a - b) / (fabs(b) + 1e-2 * inv_n);
      if (!(err <= worst)) worst = err;
    }
  culoss_destroy(cpu);
  for (int q = 0; q < 3; q++) free(h[q]), free(g[q]), free(r[q]);
  free(yt);
  return worst;
}

static int bench_more(culoss_context *ctx, const bench_opts *bo, l_kind k, int64_t n, int64_t d,
                      culoss_dtype dt) {
  const size_t es = dt == CULOSS_F32 ? 4 : 2, bytes = (size_t)(n * d) * es;
  const int ni = l_ninputs(k);
  char name[32];
  snprintf(name, sizeof name, "%s fwd+bwd", l_name[k]);
  progress(name, n, d, dt);
  if (!fits(6 * bytes)) {
    if (!bo->json)
      printf("%-22s %10lld %7lld %5s skipped: not enough device memory\n", name, (long long)n,
             (long long)d, dtype_name(dt));
    return 0;
  }
  more_state s;
  memset(&s, 0, sizeof s);
  s.ctx = ctx, s.k = k, s.o = l_defaults(k, CULOSS_REDUCTION_MEAN), s.n = n, s.d = d, s.dt = dt;
  for (int q = 0; q < 3; q++) {
    CL(culoss_malloc(ctx, &s.x[q], bytes));
    if (q < ni) CL(culoss_malloc(ctx, &s.g[q], bytes));
  }
  CL(culoss_malloc(ctx, (void **)&s.yt, (size_t)n * 4));
  CL(culoss_malloc(ctx, (void **)&s.stats, (size_t)n * 12));
  CL(culoss_malloc(ctx, (void **)&s.loss, sizeof(float)));
  /* rows and inputs N(0, 1) (x 3 for the elementwise), hinge +-1 targets,
     var uniform in [0, 1) (clamped at eps); the gradients are scratch here.
     Triplet rows of independent N(0, 1): d(a, p) - d(a, n) ~ N(0, 1), so
     with margin 1 most rows are active, some not */
  const int64_t m = n * d;
  if (k == L_MRANK) {
    CK((cudaError_t)bench_fill(s.x[0], s.x[2], (int)dt, m, 201, 2));
    CK((cudaError_t)bench_fill(s.x[1], s.g[0], (int)dt, m, 202, -3));
  } else if (k == L_GAUSS) {
    CK((cudaError_t)bench_fill(s.x[0], s.x[1], (int)dt, m, 203, 0));
    CK((cudaError_t)bench_fill(s.x[2], s.g[0], (int)dt, m, 204, -3));
  } else if (k == L_MLSOFT) { /* logits 3 N(0, 1), targets uniform in [0, 1) */
    CK((cudaError_t)bench_fill(s.x[0], s.x[1], (int)dt, m, 208, 0));
  } else {
    for (int q = 0; q < ni; q++)
      CK((cudaError_t)bench_fill(s.x[q], s.g[0], (int)dt, m, 205 + (uint64_t)q, -3));
  }
  float *yt = malloc((size_t)n * 4);
  for (int64_t i = 0; i < n; i++) yt[i] = urand() < 0.5 ? 1.0f : -1.0f;
  CL(culoss_upload(ctx, s.yt, yt, (size_t)n * 4));
  free(yt);
  if (more_launch(&s)) return -1;
  CL(culoss_synchronize(ctx));
  const double err = more_check(&s);
  float ms[256], base[256];
  if (time_it(more_launch, &s, bo->repeats, ms)) return -1;
  if (time_it(more_baseline, &s, bo->repeats, base)) return -1;
  CL(culoss_synchronize(ctx));
  const double moved =
      (double)bytes * (k == L_TRIPLET ? 6.0 : (k == L_COSINE ? 4.0 : (k == L_MLSOFT ? 3.0 : 5.0))) +
      (k == L_COSINE ? 4.0 * (double)n : 0.0);
  const int bad = record(bo, name, n, d, dt, ms, base, moved, err, dt == CULOSS_F32 ? 1e-4 : 2e-2);
  void *const bufs[] = {s.x[0], s.x[1], s.x[2], s.g[0], s.g[1], s.g[2], s.yt, s.stats, s.loss};
  if (free_all(ctx, bufs, 9)) return -1;
  return bad;
}

/* ---------------------------------------------------- multi-label margin */
typedef struct {
  culoss_context *ctx;
  int64_t n, c;
  culoss_dtype dt;
  void *x, *g;
  int64_t *t;
  float *loss;
} mlm_state;

static int mlm_launch(void *p) {
  mlm_state *s = p;
  CL(culoss_multilabel_margin(s->ctx, NULL, s->n, s->c, s->dt, s->x, s->c, CULOSS_I64, s->t,
                              s->loss, s->g, NULL));
  return 0;
}

static int mlm_baseline(void *p) {
  mlm_state *s = p;
  CK((cudaError_t)bench_mlm_naive(s->x, s->t, (int)s->dt, s->n, s->c, s->g, s->loss));
  return 0;
}

/* n rows of c scores, each with a list of up to 8 classes (the typical
   multi-label row): the mean loss and the first 64 rows' gradient against
   the CPU reference. Bytes: the scores read once and the gradient written
   once, plus the targets' 8 c bytes per row. */
static int bench_mlm(culoss_context *ctx, const bench_opts *bo, int64_t n, int64_t c,
                     culoss_dtype dt) {
  const size_t es = dt == CULOSS_F32 ? 4 : 2, bytes = (size_t)(n * c) * es;
  progress("multilabel_margin", n, c, dt);
  if (!fits(2 * bytes + (size_t)(n * c) * 8)) return 0;
  mlm_state s = {ctx, n, c, dt, NULL, NULL, NULL, NULL};
  CL(culoss_malloc(ctx, &s.x, bytes));
  CL(culoss_malloc(ctx, &s.g, bytes));
  CL(culoss_malloc(ctx, (void **)&s.t, (size_t)(n * c) * 8));
  CL(culoss_malloc(ctx, (void **)&s.loss, 4));
  CK((cudaError_t)bench_fill(s.x, s.g, (int)dt, n * c, 301, -3));
  int64_t *t = malloc((size_t)(n * c) * 8);
  for (int64_t i = 0; i < n; i++) {
    const int64_t k = (int64_t)(urand() * 9);
    for (int64_t j = 0; j < c; j++)
      t[i * c + j] = j < k ? (int64_t)(urand() * (double)c) % c : (j == k ? -1 : 0);
  }
  CL(culoss_upload(ctx, s.t, t, (size_t)(n * c) * 8));
  if (mlm_launch(&s)) return -1;
  CL(culoss_synchronize(ctx));
  /* check: the mean, and the first rows' gradient (SUM with g = 1/n) */
  culoss_context *cpu;
  double err = INFINITY;
  const int64_t rows = n < 64 ? n : 64;
  void *xh = malloc(bytes), *gh = malloc((size_t)(rows * c) * es),
       *rh = malloc((size_t)(rows * c) * es);
  float loss, ref, part;
  if (culoss_create(&cpu, CULOSS_BACKEND_CPU, 0) == CULOSS_OK &&
      !cudaMemcpy(xh, s.x, bytes, cudaMemcpyDeviceToHost) &&
      !cudaMemcpy(gh, s.g, (size_t)(rows * c) * es, cudaMemcpyDeviceToHost) &&
      !cudaMemcpy(&loss, s.loss, 4, cudaMemcpyDeviceToHost) &&
      culoss_multilabel_margin(cpu, NULL, n, c, dt, xh, c, CULOSS_I64, t, &ref, NULL, NULL) ==
          CULOSS_OK) {
    culoss_multilabel_margin_options o;
    culoss_multilabel_margin_options_init(&o);
    o.reduction = CULOSS_REDUCTION_SUM;
    const float inv_n = (float)(1.0 / (double)n);
    if (culoss_multilabel_margin(cpu, &o, rows, c, dt, xh, c, CULOSS_I64, t, &part, rh, &inv_n) ==
        CULOSS_OK) {
      err = fabs((double)loss - ref) / (fabs((double)ref) + 1e-30);
      for (int64_t e = 0; e < rows * c; e++) {
        const double a = to_f_host(gh, dt, e), b = to_f_host(rh, dt, e);
        const double r = fabs(a - b) / (fabs(b) + 1e-2 * inv_n / (double)c);
        if (!(r <= err)) err = r;
      }
    }
    culoss_destroy(cpu);
  }
  free(xh), free(gh), free(rh), free(t);
  float ms[256], base[256];
  if (time_it(mlm_launch, &s, bo->repeats, ms)) return -1;
  if (time_it(mlm_baseline, &s, bo->repeats, base)) return -1;
  CL(culoss_synchronize(ctx));
  const int bad =
      record(bo, "multilabel_margin fwd+bwd", n, c, dt, ms, base,
             2.0 * (double)bytes + 8.0 * (double)(n * c), err, dt == CULOSS_F32 ? 1e-4 : 2e-2);
  void *const bufs[] = {s.x, s.g, s.t, s.loss};
  if (free_all(ctx, bufs, 4)) return -1;
  return bad;
}

/* ---------------------------------------------------------------- linear CE */
typedef struct {
  culoss_context *ctx;
  cublasHandle_t h;
  int64_t n, d, v;
  culoss_dtype dt;
  void *hid, *w, *t, *gh, *gw, *ws, *logits;
  size_t ws_bytes;
  float *loss;
  int gw_f32; /* grad_weight_dtype CULOSS_F32 (one pass), else the input's (pass B) */
} lce_state;

static void lce_options(const lce_state *s, culoss_linear_ce_options *lo) {
  culoss_linear_ce_options_init(lo);
  if (s->gw_f32) lo->grad_weight_dtype = CULOSS_F32;
}

static int lce_fused(void *p) {
  lce_state *s = p;
  culoss_linear_ce_options lo;
  lce_options(s, &lo);
  CL(culoss_linear_cross_entropy_ex(s->ctx, NULL, &lo, s->n, s->d, s->v, s->dt, s->hid, s->w, NULL,
                                    CULOSS_I64, s->t, s->loss, s->gh, s->gw, NULL, NULL, s->ws,
                                    s->ws_bytes));
  return 0;
}

/* The three GEMMs of 6 n d v FLOPs: logits, then grad_hidden and
   grad_weight (in grad_weight's dtype) from them; with_ce runs
   culoss_cross_entropy in place on the full logits between them (the
   unfused baseline), without it they are the GEMM floor the fused call is
   measured against. */
static int lce_three_gemms(lce_state *s, int with_ce) {
  const float one = 1.0f, zero = 0.0f;
  const cudaDataType_t ty =
      s->dt == CULOSS_BF16 ? CUDA_R_16BF : (s->dt == CULOSS_F16 ? CUDA_R_16F : CUDA_R_32F);
  if (cublasGemmEx(s->h, CUBLAS_OP_T, CUBLAS_OP_N, (int)s->v, (int)s->n, (int)s->d, &one, s->w, ty,
                   (int)s->d, s->hid, ty, (int)s->d, &zero, s->logits, ty, (int)s->v,
                   CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT) != CUBLAS_STATUS_SUCCESS)
    return -1;
  if (with_ce)
    CL(culoss_cross_entropy(s->ctx, NULL, s->n, s->v, s->dt, s->logits, s->v, CULOSS_I64, s->t,
                            s->loss, s->logits, NULL));
  if (cublasGemmEx(s->h, CUBLAS_OP_N, CUBLAS_OP_N, (int)s->d, (int)s->n, (int)s->v, &one, s->w, ty,
                   (int)s->d, s->logits, ty, (int)s->v, &zero, s->gh, ty, (int)s->d,
                   CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT) != CUBLAS_STATUS_SUCCESS ||
      cublasGemmEx(s->h, CUBLAS_OP_N, CUBLAS_OP_T, (int)s->d, (int)s->v, (int)s->n, &one, s->hid,
                   ty, (int)s->d, s->logits, ty, (int)s->v, &zero, s->gw,
                   s->gw_f32 ? CUDA_R_32F : ty, (int)s->d, CUBLAS_COMPUTE_32F,
                   CUBLAS_GEMM_DEFAULT) != CUBLAS_STATUS_SUCCESS)
    return -1;
  return 0;
}

static int lce_gemms(void *p) { return lce_three_gemms(p, 0); }
static int lce_unfused(void *p) { return lce_three_gemms(p, 1); }

/* Fused linear + CE against the unfused baseline, side by side: time,
   TFLOP/s against the 6 n d v floor, extra device memory (workspace vs the
   n x v logits), and the two results compared. */
/* The fused call against the CPU reference, independently of the library's
   CUDA cross-entropy: the MEAN loss lf against the mean of per-row losses
   (reduction NONE, no gradients), and three rows' losses and grad_hidden rows
   (the fused call's MEAN grad_hidden x n) against the CPU's linear + CE on
   that row. Needs s->ws (the workspace) and s->gh from a fused call; returns
   the largest relative error (NaN: infinite). */
static double lce_check(lce_state *s, float lf) {
  const size_t es = s->dt == CULOSS_F32 ? 4 : 2;
  const int64_t n = s->n, d = s->d, v = s->v, rows[3] = {0, n / 2, n - 1};
  float *d_rows = NULL, *host_rows = malloc((size_t)n * 4);
  void *w = malloc((size_t)(v * d) * es), *h = malloc((size_t)d * es), *gh = malloc((size_t)d * es);
  void *rgh = malloc((size_t)d * es);
  culoss_context *cpu = NULL;
  double worst = INFINITY;
  culoss_cross_entropy_options o;
  culoss_linear_ce_options lo;
  culoss_cross_entropy_options_init(&o);
  o.reduction = CULOSS_REDUCTION_NONE;
  lce_options(s, &lo);
  if (!host_rows || !w || !h || !gh || !rgh || culoss_create(&cpu, CULOSS_BACKEND_CPU, 0) ||
      culoss_malloc(s->ctx, (void **)&d_rows, (size_t)n * 4) ||
      culoss_linear_cross_entropy_ex(s->ctx, &o, &lo, n, d, v, s->dt, s->hid, s->w, NULL,
                                     CULOSS_I64, s->t, d_rows, NULL, NULL, NULL, NULL, s->ws,
                                     s->ws_bytes) ||
      culoss_download(s->ctx, host_rows, d_rows, (size_t)n * 4) ||
      culoss_download(s->ctx, w, s->w, (size_t)(v * d) * es))
    goto done;
  double mean = 0.0;
  for (int64_t i = 0; i < n; i++) mean += (double)host_rows[i];
  worst = rel_err((double)lf, mean / (double)n); /* no ignored targets in the bench */
  o.reduction = CULOSS_REDUCTION_SUM;
  for (int k = 0; k < 3; k++) {
    const int64_t i = rows[k];
    int64_t t;
    float l;
    if (culoss_download(s->ctx, h, (const char *)s->hid + (size_t)(i * d) * es, (size_t)d * es) ||
        culoss_download(s->ctx, gh, (const char *)s->gh + (size_t)(i * d) * es, (size_t)d * es) ||
        culoss_download(s->ctx, &t, (const int64_t *)s->t + i, 8) ||
        culoss_linear_cross_entropy(cpu, &o, 1, d, v, s->dt, h, w, NULL, CULOSS_I64, &t, &l, rgh,
                                    NULL, NULL, NULL, NULL, 0)) {
      worst = INFINITY;
      goto done;
    }
    double e = rel_err((double)host_rows[i], (double)l), num = 0.0, den = 0.0;
    if (!(e <= worst)) worst = e;
    for (int64_t j = 0; j < d; j++) {
      const double a = (double)to_f_host(gh, s->dt, j) * (double)n, b = to_f_host(rgh, s->dt, j);
      num += (a - b) * (a - b), den += b * b;
    }
    e = sqrt(num) / (sqrt(den) + 1e-30);
    if (!(e <= worst)) worst = e;
  }
done:
  culoss_free(s->ctx, d_rows);
  culoss_destroy(cpu);
  free(host_rows), free(w), free(h), free(gh), free(rgh);
  return worst;
}

static int bench_lce(culoss_context *ctx, const bench_opts *bo, int64_t n, int64_t d, int64_t v,
                     culoss_dtype dt, int gw_f32) {
  const size_t es = dt == CULOSS_F32 ? 4 : 2, gs = gw_f32 ? 4 : es;
  lce_state s = {ctx, NULL, n, d, v, dt, NULL, NULL, NULL, NULL, NULL, NULL, NULL, 0, NULL, gw_f32};
  culoss_linear_ce_options lo;
  lce_options(&s, &lo);
  progress("linear+cross_entropy", n, v, dt);
  if (!fits((size_t)(n * v) * es + (size_t)(v * d) * (es + gs) + (size_t)(2 * n * d) * es +
            ((size_t)1 << 30))) {
    if (!bo->json)
      printf("lin+ce %lld x %lld x %lld: skipped, not enough device memory\n", (long long)n,
             (long long)d, (long long)v);
    return 0;
  }
  if (cublasCreate(&s.h) != CUBLAS_STATUS_SUCCESS) return -1;
  CL(culoss_linear_cross_entropy_ex_workspace_size(ctx, &lo, n, d, v, dt, &s.ws_bytes));
  CL(culoss_malloc(ctx, &s.hid, (size_t)(n * d) * es));
  CL(culoss_malloc(ctx, &s.w, (size_t)(v * d) * es));
  CL(culoss_malloc(ctx, &s.gh, (size_t)(n * d) * es));
  CL(culoss_malloc(ctx, &s.gw, (size_t)(v * d) * gs));
  CL(culoss_malloc(ctx, &s.t, (size_t)n * 8));
  CL(culoss_malloc(ctx, (void **)&s.loss, 4));
  CK((cudaError_t)bench_fill(s.hid, NULL, (int)dt, n * d, 11, -3));
  CK((cudaError_t)bench_fill(s.w, NULL, (int)dt, v * d, 12, -2));
  CK((cudaError_t)bench_fill_targets(s.t, n, v, 13));
  float lf, lu, ms_f[256], ms_u[256], ms_g[256];
  /* fused */
  CL(culoss_malloc(ctx, &s.ws, s.ws_bytes));
  if (lce_fused(&s)) return -1;
  CL(culoss_download(ctx, &lf, s.loss, 4));
  const double cpu_err = lce_check(&s, lf);
  if (time_it(lce_fused, &s, bo->repeats, ms_f)) return -1;
  CL(culoss_free(ctx, s.ws));
  /* unfused baseline */
  const size_t logits_bytes = (size_t)(n * v) * es;
  CL(culoss_malloc(ctx, &s.logits, logits_bytes));
  CK(cudaDeviceSynchronize());
  if (lce_unfused(&s)) return -1;
  CL(culoss_download(ctx, &lu, s.loss, 4));
  if (time_it(lce_unfused, &s, bo->repeats, ms_u)) return -1;
  if (time_it(lce_gemms, &s, bo->repeats, ms_g)) return -1;
  CL(culoss_free(ctx, s.logits));
  CL(culoss_synchronize(ctx));
  const double flops = 6.0 * (double)n * (double)d * (double)v;
  const double tf = ms_f[bo->repeats / 2], tu = ms_u[bo->repeats / 2];
  const double tg = ms_g[bo->repeats / 2];
  /* against the unfused baseline (the same CUDA cross-entropy) and against
     the CPU (an independent reference): the worse of the two */
  double err = rel_err((double)lf, (double)lu);
  if (!(cpu_err <= err)) err = cpu_err;
  const int ok = err <= (dt == CULOSS_F32 ? 1e-4 : 2e-2);
  if (isatty(2)) fprintf(stderr, "\r%80s\r", "");
  if (!bo->json)
    printf("%-8s %6lld %6lld %7lld %5s %4s %9.3f %9.3f %9.3f %7.1f %7.1f %6.2fx %6.2fx %10.1f "
           "%10.1f %6.1f%% %9.1e %s\n",
           "lin+ce", (long long)n, (long long)d, (long long)v, dtype_name(dt),
           gw_f32 ? "f32" : dtype_name(dt), tf, tu, tg, flops / (tf * 1e-3) / 1e12,
           flops / (tu * 1e-3) / 1e12, tf / tu, tf / tg, (double)s.ws_bytes / (1 << 20),
           (double)logits_bytes / (1 << 20), 100.0 * (double)s.ws_bytes / (double)logits_bytes, err,
           ok ? "ok" : "MISMATCH");
  fflush(stdout);
  void *const bufs[] = {s.hid, s.w, s.gh, s.gw, s.t, s.loss};
  if (free_all(ctx, bufs, 6)) return -1;
  if (cublasDestroy(s.h) != CUBLAS_STATUS_SUCCESS) return -1;
  return ok ? 0 : 1;
}

/* ---------------------------------------------------------------- distillation */
/* Generalized JSD / TVD over [n, v] student and teacher logits; bytes: the
   floor, one read of each and one write of the gradient. No in-library
   baseline (compare_torch.py times the torch composite and Liger's). */
typedef struct {
  culoss_context *ctx;
  culoss_distill_options o;
  int64_t n, v;
  culoss_dtype dt;
  void *s, *t, *g;
  float *loss;
} dist_state;

static int dist_launch(void *p) {
  dist_state *s = p;
  CL(culoss_distill(s->ctx, &s->o, s->n, s->v, s->dt, s->s, s->v, s->t, s->v, CULOSS_I64, NULL,
                    s->loss, s->g, NULL));
  return 0;
}

/* The first rows' losses (reduction NONE) against the CPU reference, and
   the reduced loss against their mean over every row; the worst relative
   error. */
static double dist_check(dist_state *s, float reduced) {
  const size_t es = s->dt == CULOSS_F32 ? 4 : 2;
  const int64_t r = s->n < 8 ? s->n : 8;
  culoss_context *cpu = NULL;
  culoss_distill_options o = s->o;
  float *rows = NULL, *hr = malloc((size_t)s->n * 4), cr[8];
  void *hs = malloc((size_t)(r * s->v) * es), *ht = malloc((size_t)(r * s->v) * es);
  double worst = INFINITY, mean = 0.0;
  o.reduction = CULOSS_REDUCTION_NONE;
  if (!hr || !hs || !ht || culoss_create(&cpu, CULOSS_BACKEND_CPU, 0) ||
      culoss_malloc(s->ctx, (void **)&rows, (size_t)s->n * 4) ||
      culoss_distill(s->ctx, &o, s->n, s->v, s->dt, s->s, s->v, s->t, s->v, CULOSS_I64, NULL, rows,
                     NULL, NULL) ||
      culoss_download(s->ctx, hr, rows, (size_t)s->n * 4) ||
      culoss_download(s->ctx, hs, s->s, (size_t)(r * s->v) * es) ||
      culoss_download(s->ctx, ht, s->t, (size_t)(r * s->v) * es) ||
      culoss_distill(cpu, &o, r, s->v, s->dt, hs, s->v, ht, s->v, CULOSS_I64, NULL, cr, NULL, NULL))
    goto done;
  worst = 0.0;
  for (int64_t i = 0; i < r; i++) {
    const double e = rel_err((double)hr[i], (double)cr[i]);
    if (!(e <= worst)) worst = e;
  }
  for (int64_t i = 0; i < s->n; i++) mean += (double)hr[i];
  {
    const double e = rel_err((double)reduced, mean / (double)s->n);
    if (!(e <= worst)) worst = e;
  }
done:
  culoss_free(s->ctx, rows);
  culoss_destroy(cpu);
  free(hr), free(hs), free(ht);
  return worst;
}

static int bench_distill(culoss_context *ctx, const bench_opts *bo, int64_t n, int64_t v,
                         culoss_dtype dt, int tvd, float beta) {
  const size_t es = dt == CULOSS_F32 ? 4 : 2, bytes = (size_t)(n * v) * es;
  char name[40];
  snprintf(name, sizeof name, "%s fwd+bwd", tvd ? "tvd" : (beta == 0.0f ? "kl(P||Q)" : "jsd(0.5)"));
  progress(name, n, v, dt);
  if (!fits(3 * bytes + ((size_t)64 << 20))) {
    if (!bo->json)
      printf("%-22s %10lld %7lld %5s skipped: not enough device memory\n", name, (long long)n,
             (long long)v, dtype_name(dt));
    return 0;
  }
  dist_state s;
  memset(&s, 0, sizeof s);
  s.ctx = ctx, s.n = n, s.v = v, s.dt = dt;
  culoss_distill_options_init(&s.o);
  s.o.divergence = tvd ? CULOSS_DISTILL_TVD : CULOSS_DISTILL_JSD, s.o.beta = beta;
  s.o.temperature = 2.0f;
  CL(culoss_malloc(ctx, &s.s, bytes));
  CL(culoss_malloc(ctx, &s.t, bytes));
  CL(culoss_malloc(ctx, &s.g, bytes));
  CL(culoss_malloc(ctx, (void **)&s.loss, 4));
  /* logits 2 N(0, 1), independent for student and teacher (fill -4) */
  CK((cudaError_t)bench_fill(s.s, NULL, (int)dt, n * v, 301, -4));
  CK((cudaError_t)bench_fill(s.t, NULL, (int)dt, n * v, 302, -4));
  if (dist_launch(&s)) return -1;
  float l;
  CL(culoss_download(ctx, &l, s.loss, 4));
  const double err = dist_check(&s, l);
  float ms[256];
  if (time_it(dist_launch, &s, bo->repeats, ms)) return -1;
  CL(culoss_synchronize(ctx));
  const int bad = record(bo, name, n, v, dt, ms, NULL, 3.0 * (double)bytes, err,
                         dt == CULOSS_F32 ? 1e-4 : 1e-3);
  void *const bufs[] = {s.s, s.t, s.g, s.loss};
  if (free_all(ctx, bufs, 4)) return -1;
  return bad;
}

/* Fused linear + distillation: bf16 hidden [n, d] for student and teacher,
   weights [v, d], against its GEMM floor (the four GEMMs alone on full
   logits: both logits, grad_hidden, an fp32 grad_weight: 8 n d v FLOPs)
   and, for the loss, against the explicit form (the two GEMMs, then
   culoss_distill on the materialised logits). */
typedef struct {
  culoss_context *ctx;
  cublasHandle_t h;
  int64_t n, d, v;
  void *hs, *ws, *ht, *wt, *gh, *gw, *work, *ls, *lt;
  size_t work_bytes;
  float *loss;
} ldist_state;

static int ldist_fused(void *p) {
  ldist_state *s = p;
  culoss_linear_ce_options lo;
  culoss_linear_ce_options_init(&lo);
  lo.grad_weight_dtype = CULOSS_F32;
  CL(culoss_linear_distill(s->ctx, NULL, &lo, s->n, s->d, s->d, s->v, CULOSS_BF16, s->hs, s->ws,
                           NULL, s->ht, s->wt, NULL, CULOSS_I64, NULL, s->loss, s->gh, s->gw, NULL,
                           NULL, s->work, s->work_bytes));
  return 0;
}

static int ldist_gemm(ldist_state *s, cublasOperation_t ta, cublasOperation_t tb, int64_t m,
                      int64_t nn, int64_t k, const void *A, int64_t lda, const void *B, int64_t ldb,
                      void *C, cudaDataType_t ct, int64_t ldc) {
  const float one = 1.0f, zero = 0.0f;
  return cublasGemmEx(s->h, ta, tb, (int)m, (int)nn, (int)k, &one, A, CUDA_R_16BF, (int)lda, B,
                      CUDA_R_16BF, (int)ldb, &zero, C, ct, (int)ldc, CUBLAS_COMPUTE_32F,
                      CUBLAS_GEMM_DEFAULT) == CUBLAS_STATUS_SUCCESS
             ? 0
             : -1;
}

static int ldist_logits(ldist_state *s) {
  if (ldist_gemm(s, CUBLAS_OP_T, CUBLAS_OP_N, s->v, s->n, s->d, s->ws, s->d, s->hs, s->d, s->ls,
                 CUDA_R_16BF, s->v) ||
      ldist_gemm(s, CUBLAS_OP_T, CUBLAS_OP_N, s->v, s->n, s->d, s->wt, s->d, s->ht, s->d, s->lt,
                 CUDA_R_16BF, s->v))
    return -1;
  return 0;
}

static int ldist_gemms(void *p) {
  ldist_state *s = p;
  if (ldist_logits(s) ||
      ldist_gemm(s, CUBLAS_OP_N, CUBLAS_OP_N, s->d, s->n, s->v, s->ws, s->d, s->ls, s->v, s->gh,
                 CUDA_R_16BF, s->d) ||
      ldist_gemm(s, CUBLAS_OP_N, CUBLAS_OP_T, s->d, s->v, s->n, s->hs, s->d, s->ls, s->v, s->gw,
                 CUDA_R_32F, s->d))
    return -1;
  return 0;
}

static int bench_ldistill(culoss_context *ctx, const bench_opts *bo, int64_t n, int64_t d,
                          int64_t v) {
  ldist_state s;
  memset(&s, 0, sizeof s);
  s.ctx = ctx, s.n = n, s.d = d, s.v = v;
  progress("linear+distill", n, v, CULOSS_BF16);
  const size_t logits = (size_t)(n * v) * 2;
  if (!fits(2 * logits + (size_t)(v * d) * 8 + (size_t)(3 * n * d) * 2 + ((size_t)1 << 30))) {
    if (!bo->json)
      printf("lin+jsd %lld x %lld x %lld: skipped, not enough device memory\n", (long long)n,
             (long long)d, (long long)v);
    return 0;
  }
  culoss_linear_ce_options lo;
  culoss_linear_ce_options_init(&lo);
  lo.grad_weight_dtype = CULOSS_F32;
  if (cublasCreate(&s.h) != CUBLAS_STATUS_SUCCESS) return -1;
  CL(culoss_linear_distill_workspace_size(ctx, &lo, n, d, d, v, CULOSS_BF16, &s.work_bytes));
  CL(culoss_malloc(ctx, &s.hs, (size_t)(n * d) * 2));
  CL(culoss_malloc(ctx, &s.ht, (size_t)(n * d) * 2));
  CL(culoss_malloc(ctx, &s.ws, (size_t)(v * d) * 2));
  CL(culoss_malloc(ctx, &s.wt, (size_t)(v * d) * 2));
  CL(culoss_malloc(ctx, &s.gh, (size_t)(n * d) * 2));
  CL(culoss_malloc(ctx, &s.gw, (size_t)(v * d) * 4));
  CL(culoss_malloc(ctx, (void **)&s.loss, 4));
  CK((cudaError_t)bench_fill(s.hs, NULL, CULOSS_BF16, n * d, 401, -3));
  CK((cudaError_t)bench_fill(s.ht, NULL, CULOSS_BF16, n * d, 402, -3));
  CK((cudaError_t)bench_fill(s.ws, NULL, CULOSS_BF16, v * d, 403, -2));
  CK((cudaError_t)bench_fill(s.wt, NULL, CULOSS_BF16, v * d, 404, -2));
  float lf, le, ms_f[256], ms_g[256];
  CL(culoss_malloc(ctx, &s.work, s.work_bytes));
  if (ldist_fused(&s)) return -1;
  CL(culoss_download(ctx, &lf, s.loss, 4));
  if (time_it(ldist_fused, &s, bo->repeats, ms_f)) return -1;
  CL(culoss_free(ctx, s.work));
  /* the explicit form and the GEMM floor, on full logits */
  CL(culoss_malloc(ctx, &s.ls, logits));
  CL(culoss_malloc(ctx, &s.lt, logits));
  CK(cudaDeviceSynchronize());
  if (ldist_logits(&s)) return -1;
  CL(culoss_distill(ctx, NULL, n, v, CULOSS_BF16, s.ls, v, s.lt, v, CULOSS_I64, NULL, s.loss, NULL,
                    NULL));
  CL(culoss_download(ctx, &le, s.loss, 4));
  if (time_it(ldist_gemms, &s, bo->repeats, ms_g)) return -1;
  CL(culoss_free(ctx, s.ls));
  CL(culoss_free(ctx, s.lt));
  CL(culoss_synchronize(ctx));
  const double flops = 8.0 * (double)n * (double)d * (double)v;
  const double tf = ms_f[bo->repeats / 2], tg = ms_g[bo->repeats / 2];
  const double err = rel_err((double)lf, (double)le);
  const int ok = err <= 1e-3;
  if (isatty(2)) fprintf(stderr, "\r%80s\r", "");
  if (!bo->json)
    printf("%-8s %6lld %6lld %7lld %9.3f %9.3f %7.1f %7.1f %6.2fx %10.1f %10.1f %6.1f%% %9.1e %s\n",
           "lin+jsd", (long long)n, (long long)d, (long long)v, tf, tg, flops / (tf * 1e-3) / 1e12,
           flops / (tg * 1e-3) / 1e12, tf / tg, (double)s.work_bytes / (1 << 20),
           2.0 * (double)logits / (1 << 20), 100.0 * (double)s.work_bytes / (2.0 * (double)logits),
           err, ok ? "ok" : "MISMATCH");
  fflush(stdout);
  void *const bufs[] = {s.hs, s.ht, s.ws, s.wt, s.gh, s.gw, s.loss};
  if (free_all(ctx, bufs, 7)) return -1;
  if (cublasDestroy(s.h) != CUBLAS_STATUS_SUCCESS) return -1;
  return ok ? 0 : 1;
}

static int run_gpu(culoss_context *ctx, const bench_opts *bo) {
  struct cudaDeviceProp prop;
  CK(cudaGetDeviceProperties(&prop, 0));
  flush_bytes = (size_t)prop.l2CacheSize * 2;
  CK(cudaMalloc(&flush_buf, flush_bytes));
  copy_bw = copy_bandwidth(bo->quick ? 10 : 30, bo->tiny ? (size_t)64 << 20 : (size_t)1 << 30);
  if (copy_bw <= 0.0) {
    fprintf(stderr, "culoss-bench: measuring the copy bandwidth failed: %s\n",
            cudaGetErrorString(cudaGetLastError()));
    return 1;
  }
  const int64_t ns_full[] = {4096, 16384}, ns_quick[] = {4096}, ns_tiny[] = {64};
  const int64_t vs_full[] = {32000, 50257, 128256, 152064, 256000}, vs_quick[] = {32000, 128256};
  const int64_t vs_tiny[] = {1000, 4099};
  const int64_t ms_full[] = {1000000, 10000000, 100000000, 1000000000},
                ms_quick[] = {1000000, 100000000};
  const int64_t ms_tiny[] = {10007, 100003};
  const int64_t *ns = bo->tiny ? ns_tiny : (bo->quick ? ns_quick : ns_full);
  const int64_t *vs = bo->tiny ? vs_tiny : (bo->quick ? vs_quick : vs_full);
  const int64_t *ms = bo->tiny ? ms_tiny : (bo->quick ? ms_quick : ms_full);
  const int nn = bo->quick || bo->tiny ? 1 : 2, nv = bo->quick || bo->tiny ? 2 : 5;
  const int nm = bo->quick || bo->tiny ? 2 : 4;
  const int nl = bo->quick || bo->tiny ? 1 : 3;
  /* soft targets, NLL, multi-margin: the first n, these v */
  const int64_t rv_full[] = {32000, 128256}, rv_quick[] = {32000}, rv_tiny[] = {1000};
  const int64_t *rv = bo->tiny ? rv_tiny : (bo->quick ? rv_quick : rv_full);
  const int nrv = bo->quick || bo->tiny ? 1 : 2;
  /* every dtype; --quick keeps fp32 and bf16 */
  const culoss_dtype dts_full[] = {CULOSS_F32, CULOSS_F16, CULOSS_BF16};
  const culoss_dtype dts_quick[] = {CULOSS_F32, CULOSS_BF16};
  const culoss_dtype *dts = bo->quick ? dts_quick : dts_full;
  const int nd = bo->quick ? 2 : 3;
  /* margin ranking / Gaussian: the elementwise sizes; cosine / triplet:
     (rows, d) with d in the register cache (1024 cosine, 512 triplet) and
     past it (triplet 1024 bf16: the L2 re-read path; 4096) */
  const int64_t rows_full[][2] = {{65536, 1024}, {65536, 512}, {16384, 4096}};
  const int64_t rows_tiny[][2] = {{1000, 100}};
  const int nr = bo->tiny ? 1 : (bo->quick ? 2 : 3);
  const int64_t(*rws)[2] = bo->tiny ? rows_tiny : rows_full;
  total_cases = (wanted(bo, "ce") ? (nn * nv + (ROW_KINDS - 1) * nrv) * nd : 0) +
                (wanted(bo, "ew") ? nm * T_NUM_OPS * nd : 0) +
                (wanted(bo, "more") ? (2 * nm + 3 * nr + 1) * nd : 0) +
                (wanted(bo, "lce") ? 2 * nl : 0) +
                (wanted(bo, "distill") ? (bo->tiny ? 2 : nl) * 6 + 1 : 0);
  if (bo->csv)
    printf("# device,%s,copy_GBps,%.1f\ncase,n,v,dtype,median_ms,min_ms,max_ms,baseline_ms,GBps,"
           "pct_copy,max_rel_err,check\n",
           prop.name, copy_bw);
  else if (!bo->json) {
    printf("device: %s, %d SMs, L2 %d MiB; measured copy bandwidth %.1f GB/s (read+write)\n",
           prop.name, prop.multiProcessorCount, prop.l2CacheSize >> 20, copy_bw);
    printf("bytes counted: each input read once, each output written once (cross-entropy: "
           "logits + gradient + targets; soft: + targets [n, v]; NLL: gradient + one logit and "
           "target per row). baselines: unfused CE (3 kernels), unfused soft CE (4), one thread "
           "per element (NLL, multi-margin, elementwise)\n");
    printf("%-22s %10s %7s %5s %8s %8s %8s %8s %7s %9s %7s %8s %s\n", "case", "n", "v", "dtype",
           "med_ms", "min_ms", "max_ms", "GB/s", "%copy", "base_ms", "speedup", "max_err", "check");
  }
  int bad = 0, rc;
  for (int ni = 0; ni < (wanted(bo, "ce") ? nn : 0); ni++)
    for (int vi = 0; vi < nv; vi++)
      for (int di = 0; di < nd; di++) {
        if ((rc = bench_ce(ctx, bo, ROW_CE, ns[ni], vs[vi], dts[di])) < 0) return 1;
        bad |= rc;
      }
  for (int kind = ROW_SOFT; kind < (wanted(bo, "ce") ? ROW_KINDS : 0); kind++)
    for (int vi = 0; vi < nrv; vi++)
      for (int di = 0; di < nd; di++) {
        if ((rc = bench_ce(ctx, bo, kind, ns[0], rv[vi], dts[di])) < 0) return 1;
        bad |= rc;
      }
  for (int op = 0; op < (wanted(bo, "ew") ? (int)T_NUM_OPS : 0); op++)
    for (int mi = 0; mi < nm; mi++)
      for (int di = 0; di < nd; di++) {
        if ((rc = bench_ew(ctx, bo, (t_op)op, ms[mi], dts[di])) < 0) return 1;
        bad |= rc;
      }
  for (int k = 0; k < (wanted(bo, "more") ? (int)L_NUM : 0); k++)
    for (int si = 0; si < (l_rows((l_kind)k) ? nr : nm); si++)
      for (int di = 0; di < nd; di++) {
        const int64_t n = l_rows((l_kind)k) ? rws[si][0] : ms[si];
        const int64_t d = l_rows((l_kind)k) ? rws[si][1] : 1;
        if ((rc = bench_more(ctx, bo, (l_kind)k, n, d, dts[di])) < 0) return 1;
        bad |= rc;
      }
  for (int di = 0; di < (wanted(bo, "more") ? nd : 0); di++) {
    if ((rc = bench_mlm(ctx, bo, bo->tiny ? 200 : 65536, bo->tiny ? 100 : 1024, dts[di])) < 0)
      return 1;
    bad |= rc;
  }
  if (!bo->csv && !bo->json && wanted(bo, "lce"))
    printf("\nfused linear + cross-entropy vs unfused (GEMM to full logits, culoss_cross_entropy, "
           "2 GEMMs); gemm_ms: the three GEMMs alone (the 6 n d v floor); TFLOP/s against 6 n d v; "
           "gw: grad_weight's dtype (f32: one pass; 16-bit: 8 n d v by slices); extra memory: "
           "workspace vs n x v logits\n"
           "%-8s %6s %6s %7s %5s %4s %9s %9s %9s %7s %7s %7s %7s %10s %10s %7s %9s %s\n",
           "case", "n", "d", "v", "dtype", "gw", "fused_ms", "unfus_ms", "gemm_ms", "TF/s_f",
           "TF/s_u", "f/unf", "f/gemm", "ws_MiB", "logit_MiB", "mem%", "max_err", "check");
  const int64_t lv[] = {32000, 128256, 256000};
  for (int vi = 0; vi < (wanted(bo, "lce") ? nl : 0); vi++) {
    const int64_t ln = bo->tiny ? 128 : (bo->quick ? 4096 : 8192);
    const int64_t ld = bo->tiny ? 32 : (bo->quick ? 2048 : 4096);
    for (int f32 = 1; f32 >= 0; f32--) {
      if ((rc = bench_lce(ctx, bo, ln, ld, bo->tiny ? 1000 : lv[vi], CULOSS_BF16, f32)) < 0)
        return 1;
      bad |= rc;
    }
  }
  /* distillation: JSD(0.5), forward KL and TVD at the CE vocabularies, fp32 and bf16 */
  const int64_t dv_full[] = {32000, 128256, 256000}, dv_tiny[] = {1000, 4099};
  const culoss_dtype ddt[] = {CULOSS_F32, CULOSS_BF16};
  for (int vi = 0; vi < (wanted(bo, "distill") ? (bo->tiny ? 2 : nl) : 0); vi++)
    for (int di = 0; di < 2; di++)
      for (int k = 0; k < 3; k++) {
        const int64_t v = bo->tiny ? dv_tiny[vi] : dv_full[vi];
        if ((rc = bench_distill(ctx, bo, ns[0], v, ddt[di], k == 2, k == 1 ? 0.0f : 0.5f)) < 0)
          return 1;
        bad |= rc;
      }
  if (!bo->csv && !bo->json && wanted(bo, "distill"))
    printf("\nfused linear + generalized JSD (bf16, fp32 grad_weight) vs its GEMM floor (the two "
           "logits GEMMs, grad_hidden and grad_weight alone on full logits: 8 n d v FLOPs); "
           "extra memory: workspace vs the two n x v logits; max_err: the loss vs the explicit "
           "form (GEMMs, then culoss_distill)\n"
           "%-8s %6s %6s %7s %9s %9s %7s %7s %7s %10s %10s %7s %9s %s\n",
           "case", "n", "d", "v", "fused_ms", "gemm_ms", "TF/s_f", "TF/s_g", "f/gemm", "ws_MiB",
           "logit_MiB", "mem%", "max_err", "check");
  if (wanted(bo, "distill")) {
    if ((rc = bench_ldistill(ctx, bo, bo->tiny ? 128 : (bo->quick ? 4096 : 8192),
                             bo->tiny ? 32 : (bo->quick ? 2048 : 4096), bo->tiny ? 1000 : 128256)) <
        0)
      return 1;
    bad |= rc;
  }
  if (bo->json) {
    printf("{\"device\": \"%s\", \"copy_GBps\": %.1f, \"results\": [\n", prop.name, copy_bw);
    for (int i = 0; i < nresults; i++) {
      const result_t *r = &results[i];
      printf(
          "  {\"case\": \"%s\", \"n\": %lld, \"v\": %lld, \"dtype\": \"%s\", \"median_ms\": %.5f, "
          "\"min_ms\": %.5f, \"max_ms\": %.5f, \"baseline_ms\": %.5f, \"bytes\": %.0f, "
          "\"GBps\": %.2f, \"pct_copy\": %.2f, \"max_rel_err\": %.3e, \"ok\": %s}%s\n",
          r->name, (long long)r->n, (long long)r->v, dtype_name(r->d), r->med, r->min, r->max,
          r->base_med, r->bytes, r->gbs, r->pct, r->err, r->ok ? "true" : "false",
          i + 1 < nresults ? "," : "");
    }
    printf("]}\n");
  }
  CK(cudaFree(flush_buf));
  if (bad) fprintf(stderr, "culoss-bench: a GPU result did not match the CPU reference\n");
  return bad;
}
#endif

int main(int argc, char **argv) {
  bench_opts bo = {0, 0, 0, 50, 0, NULL};
  int model = 0, model_check = 0;
  for (int i = 1; i < argc; i++) {
    if (!strcmp(argv[i], "--quick"))
      bo.quick = 1, bo.repeats = 15;
    else if (!strcmp(argv[i], "--csv"))
      bo.csv = 1;
    else if (!strcmp(argv[i], "--json"))
      bo.json = 1;
    else if (!strcmp(argv[i], "--only") && i + 1 < argc &&
             (!strcmp(argv[i + 1], "ce") || !strcmp(argv[i + 1], "ew") ||
              !strcmp(argv[i + 1], "more") || !strcmp(argv[i + 1], "lce") ||
              !strcmp(argv[i + 1], "distill")))
      bo.only = argv[++i];
    else if (!strcmp(argv[i], "--tiny"))
      bo.tiny = 1, bo.repeats = 3;
    else if (!strcmp(argv[i], "--cpu"))
      bo.repeats = -1;
    else if (!strcmp(argv[i], "--model"))
      model = 1;
    else if (!strcmp(argv[i], "--check"))
      model_check = 1;
    else {
      fprintf(
          stderr,
          "usage: %s [--quick | --tiny] [--csv | --json] [--only ce|ew|more|lce|distill] [--cpu]\n"
          "       %s --model [--check]   (the traffic model; emulator builds)\n",
          argv[0], argv[0]);
      return 2;
    }
  }
  if (model) return culoss_bench_model(model_check);
#ifdef CULOSS_CUDA_EMULATOR
  if (bo.repeats >= 0) {
    printf("culoss-bench built against the CPU emulator of CUDA (tests/emu): it checks the\n"
           "tool's GPU path at --tiny sizes; every time and bandwidth below is a CPU figure of\n"
           "the emulator and says nothing about a GPU.\n\n");
    bo.tiny = 1, bo.repeats = 3;
  }
#endif
  culoss_context *ctx = NULL;
  culoss_status st =
      bo.repeats < 0 ? CULOSS_ERROR_NO_DEVICE : culoss_create(&ctx, CULOSS_BACKEND_CUDA, 0);
  if (bo.repeats < 0) bo.repeats = 5;
  if (st == CULOSS_ERROR_NO_DEVICE) return run_cpu(&bo);
  if (st != CULOSS_OK) {
    fprintf(stderr, "culoss_create: %s: %s\n", culoss_status_string(st), culoss_last_error());
    return 1;
  }
#ifdef CULOSS_HAVE_CUDA
  int rc = run_gpu(ctx, &bo);
  culoss_destroy(ctx);
  return rc;
#else
  culoss_destroy(ctx);
  return 1;
#endif
}
