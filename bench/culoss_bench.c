/*
 * culoss-bench: times the fused cross-entropy forward+backward on the GPU and
 * reports achieved bandwidth against the device's copy bandwidth measured in
 * the same run.
 *
 * Method (per case): validate a subsample of rows against the CPU reference
 * first (a benchmark of a wrong kernel is worthless), warm up, then time each
 * repeat with CUDA events, flushing L2 (a write over a buffer twice its size)
 * between repeats; report the median and the spread (min..max).
 *
 * Bytes counted are the minimum any implementation must move: one read of the
 * logits and one write of the gradient (n*v*sizeof(T) each), plus the
 * targets and the loss. Copy bandwidth is a device-to-device cudaMemcpy of
 * 1 GiB counted the same way (bytes read + bytes written).
 *
 * Without a GPU it says so and runs the CPU reference at small sizes, labelled
 * as CPU timings.
 */
#define _POSIX_C_SOURCE 200809L
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "culoss.h"
#include "helpers.h"
#include "ew_call.h"
#include "loss_math.h"

#ifdef CULOSS_HAVE_CUDA
#include <cublas_v2.h>
#include <cuda_runtime_api.h>
#endif

typedef struct {
  int quick, csv, repeats;
} bench_opts;

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
        culoss_cross_entropy(ctx, NULL, n, v, d, x, v, CULOSS_I64, t, &loss, g, NULL);
        clock_gettime(CLOCK_MONOTONIC, &b);
        ms[r] = (float)((b.tv_sec - a.tv_sec) * 1e3 + (b.tv_nsec - a.tv_nsec) * 1e-6);
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
#define CK(call)                                                                   \
  do {                                                                             \
    cudaError_t e_ = (call);                                                       \
    if (e_ != cudaSuccess) {                                                       \
      fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #call, cudaGetErrorString(e_)); \
      return -1;                                                                   \
    }                                                                              \
  } while (0)
#define CL(call)                                                                   \
  do {                                                                             \
    culoss_status s_ = (call);                                                     \
    if (s_ != CULOSS_OK) {                                                         \
      fprintf(stderr, "%s:%d %s: %s: %s\n", __FILE__, __LINE__, #call,            \
              culoss_status_string(s_), culoss_last_error());                      \
      return -1;                                                                   \
    }                                                                              \
  } while (0)

static void *flush_buf;
static size_t flush_bytes;

static int flush_l2(void) {
  CK(cudaMemsetAsync(flush_buf, (int)(urand() * 255), flush_bytes, 0));
  return 0;
}

/* Device copy bandwidth: GB/s counting bytes read + bytes written. */
static double copy_bandwidth(int repeats) {
  const size_t bytes = (size_t)1 << 30;
  void *a, *b;
  cudaEvent_t e0, e1;
  float ms[64];
  if (cudaMalloc(&a, bytes) != cudaSuccess) return -1;
  if (cudaMalloc(&b, bytes) != cudaSuccess) return -1;
  cudaMemset(a, 1, bytes);
  cudaEventCreate(&e0), cudaEventCreate(&e1);
  cudaMemcpy(b, a, bytes, cudaMemcpyDeviceToDevice); /* warm-up */
  for (int r = 0; r < repeats; r++) {
    cudaEventRecord(e0, 0);
    cudaMemcpyAsync(b, a, bytes, cudaMemcpyDeviceToDevice, 0);
    cudaEventRecord(e1, 0);
    cudaEventSynchronize(e1);
    cudaEventElapsedTime(&ms[r], e0, e1);
  }
  qsort(ms, (size_t)repeats, sizeof *ms, cmp_float);
  cudaFree(a), cudaFree(b), cudaEventDestroy(e0), cudaEventDestroy(e1);
  return 2.0 * (double)bytes / (ms[repeats / 2] * 1e-3) / 1e9;
}

/* Checks `rows` rows of the GPU result against the CPU reference. */
static int validate(int64_t n, int64_t v, culoss_dtype d, const void *hx,
                    const int64_t *ht, const void *d_g, double *max_err) {
  culoss_context *cpu;
  const size_t es = d == CULOSS_F32 ? 4 : 2;
  const int64_t rows[3] = {0, n / 2, n - 1};
  CL(culoss_create(&cpu, CULOSS_BACKEND_CPU, 0));
  void *ref = malloc((size_t)v * es), *got = malloc((size_t)v * es);
  *max_err = 0;
  culoss_cross_entropy_options o;
  culoss_cross_entropy_options_init(&o);
  o.reduction = CULOSS_REDUCTION_SUM; /* gradient of row loss, unscaled */
  for (int k = 0; k < 3; k++) {
    const int64_t i = rows[k];
    float l;
    CL(culoss_cross_entropy(cpu, &o, 1, v, d, (const char *)hx + (size_t)(i * v) * es, v,
                            CULOSS_I64, ht + i, &l, ref, NULL));
    CK(cudaMemcpy(got, (const char *)d_g + (size_t)(i * v) * es, (size_t)v * es,
                  cudaMemcpyDeviceToHost));
    for (int64_t j = 0; j < v; j++) {
      float a, b;
      if (d == CULOSS_F32)
        a = ((float *)got)[j], b = ((float *)ref)[j];
      else if (d == CULOSS_BF16)
        a = culoss__bf16_to_f32(((uint16_t *)got)[j]), b = culoss__bf16_to_f32(((uint16_t *)ref)[j]);
      else
        a = culoss__f16_to_f32(((uint16_t *)got)[j]), b = culoss__f16_to_f32(((uint16_t *)ref)[j]);
      /* The benchmarked call is MEAN over n rows: scale the reference. */
      double e = fabs((double)a * (double)n - (double)b) / (fabs((double)b) + 1e-6);
      if (e > *max_err) *max_err = e;
    }
  }
  free(ref), free(got);
  culoss_destroy(cpu);
  return 0;
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
  cudaEventDestroy(e0), cudaEventDestroy(e1);
  qsort(ms, (size_t)reps, sizeof *ms, cmp_float);
  return 0;
}

/* One result line; returns 1 when the validation failed. */
static int report(const bench_opts *bo, const char *name, int64_t n, int64_t v, culoss_dtype d,
                  const float *ms, double bytes, double copy_bw, double err, double tol) {
  const int reps = bo->repeats;
  const double med = ms[reps / 2], gbs = bytes / (med * 1e-3) / 1e9;
  if (bo->csv)
    printf("%s,%lld,%lld,%s,%.4f,%.4f,%.4f,%.1f,%.1f,%.2e,%s\n", name, (long long)n, (long long)v,
           dtype_name(d), med, (double)ms[0], (double)ms[reps - 1], gbs, 100.0 * gbs / copy_bw,
           err, err <= tol ? "ok" : "MISMATCH");
  else
    printf("%-22s %10lld %7lld %5s %9.4f %9.4f %9.4f %9.1f %7.1f%% %9.1e %s\n", name, (long long)n,
           (long long)v, dtype_name(d), med, (double)ms[0], (double)ms[reps - 1], gbs,
           100.0 * gbs / copy_bw, err, err <= tol ? "ok" : "MISMATCH");
  fflush(stdout);
  return err <= tol ? 0 : 1;
}

typedef struct {
  culoss_context *ctx;
  int64_t n, v;
  culoss_dtype d;
  void *x, *g, *t;
  float *loss;
} ce_state;

static int ce_launch(void *p) {
  ce_state *s = p;
  CL(culoss_cross_entropy(s->ctx, NULL, s->n, s->v, s->d, s->x, s->v, CULOSS_I64, s->t, s->loss,
                          s->g, NULL));
  return 0;
}

static int bench_ce(culoss_context *ctx, const bench_opts *bo, int64_t n, int64_t v,
                    culoss_dtype d, double copy_bw) {
  const size_t es = d == CULOSS_F32 ? 4 : 2, xbytes = (size_t)(n * v) * es;
  void *hx = make_logits(n, v, d);
  int64_t *ht = malloc((size_t)n * 8);
  if (!hx || !ht) return -1;
  for (int64_t i = 0; i < n; i++) ht[i] = (int64_t)(urand() * (double)v);
  void *d_x, *d_g, *d_t;
  float *d_loss;
  CL(culoss_malloc(ctx, &d_x, xbytes));
  CL(culoss_malloc(ctx, &d_g, xbytes));
  CL(culoss_malloc(ctx, &d_t, (size_t)n * 8));
  CL(culoss_malloc(ctx, (void **)&d_loss, sizeof(float)));
  CL(culoss_upload(ctx, d_x, hx, xbytes));
  CL(culoss_upload(ctx, d_t, ht, (size_t)n * 8));
  CL(culoss_cross_entropy(ctx, NULL, n, v, d, d_x, v, CULOSS_I64, d_t, d_loss, d_g, NULL));
  CL(culoss_synchronize(ctx));
  double err;
  if (validate(n, v, d, hx, ht, d_g, &err)) return -1;
  const double tol = d == CULOSS_F32 ? 1e-3 : 2e-2;
  float ms[256];
  ce_state st = {ctx, n, v, d, d_x, d_g, d_t, d_loss};
  if (time_it(ce_launch, &st, bo->repeats, ms)) return -1;
  CL(culoss_synchronize(ctx));
  /* minimum traffic: one read of the logits, one write of the gradient, the targets */
  const double bytes = 2.0 * (double)xbytes + (double)n * 8 + 4;
  const int bad = report(bo, "cross_entropy fwd+bwd", n, v, d, ms, bytes, copy_bw, err, tol);
  culoss_free(ctx, d_x), culoss_free(ctx, d_g), culoss_free(ctx, d_t), culoss_free(ctx, d_loss);
  free(hx), free(ht);
  return bad;
}

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

/* Elementwise loss, MEAN with gradient, over m elements. Validation: the
   reduced loss against the CPU reference over all m elements, and the
   gradient at the start and the end of the array. */
static int bench_ew(culoss_context *ctx, const bench_opts *bo, t_op op, int64_t m, culoss_dtype d,
                    double copy_bw) {
  const size_t es = d == CULOSS_F32 ? 4 : 2, bytes = (size_t)m * es;
  rng_t r = rng_seeded(99 + (uint64_t)op);
  const int64_t blk = (int64_t)1 << 20;
  float *xf = malloc((size_t)blk * 4), *yf = malloc((size_t)blk * 4);
  void *xh = malloc(bytes), *yh = malloc(bytes), *gh = malloc((size_t)blk * es);
  void *rg = malloc((size_t)blk * es);
  if (!xf || !yf || !xh || !yh || !gh || !rg) return -1;
  for (int64_t i = 0; i < m; i += blk) { /* fresh random blocks */
    const int64_t k = m - i < blk ? m - i : blk;
    ew_fill(&r, op, xf, yf, k, 0.0);
    pack_dtype((char *)xh + (size_t)i * es, xf, k, d);
    pack_dtype((char *)yh + (size_t)i * es, yf, k, d);
  }
  void *d_x, *d_y, *d_g;
  float *d_loss, loss, ref_loss;
  CL(culoss_malloc(ctx, &d_x, bytes));
  CL(culoss_malloc(ctx, &d_y, bytes));
  CL(culoss_malloc(ctx, &d_g, bytes));
  CL(culoss_malloc(ctx, (void **)&d_loss, sizeof(float)));
  CL(culoss_upload(ctx, d_x, xh, bytes));
  CL(culoss_upload(ctx, d_y, yh, bytes));
  ew_state st = {ctx, (t_op)op, {CULOSS_REDUCTION_MEAN, NULL, NULL, 0}, m, d, d_x, d_y, d_g, d_loss};
  if (ew_launch(&st)) return -1;
  CL(culoss_download(ctx, &loss, d_loss, sizeof loss));
  CL(culoss_synchronize(ctx));
  culoss_context *cpu;
  CL(culoss_create(&cpu, CULOSS_BACKEND_CPU, 0));
  CL(ew_call(cpu, op, &st.o, m, 1, d, xh, yh, &ref_loss, NULL, NULL));
  double err = fabs((double)loss - (double)ref_loss) / (fabs((double)ref_loss) + 1e-30);
  const float inv_m = (float)(1.0 / (double)m);
  t_opts sum = {CULOSS_REDUCTION_SUM, NULL, NULL, 0};
  for (int part = 0; part < 2; part++) {
    const int64_t k = m < blk ? m : blk, at = part ? m - k : 0;
    CL(ew_call(cpu, op, &sum, k, 1, d, (char *)xh + (size_t)at * es, (char *)yh + (size_t)at * es,
               &ref_loss, rg, &inv_m));
    CL(culoss_download(ctx, gh, (char *)d_g + (size_t)at * es, (size_t)k * es));
    float *a = malloc((size_t)k * 4), *b = malloc((size_t)k * 4);
    unpack_dtype(a, gh, k, d);
    unpack_dtype(b, rg, k, d);
    for (int64_t i = 0; i < k; i++) {
      const double e = fabs((double)a[i] - (double)b[i]) / (fabs((double)b[i]) + 1e-6 * inv_m);
      if (e > err) err = e;
    }
    free(a), free(b);
  }
  culoss_destroy(cpu);
  float ms[256];
  if (time_it(ew_launch, &st, bo->repeats, ms)) return -1;
  CL(culoss_synchronize(ctx));
  /* minimum traffic: one read of input and target, one write of the gradient */
  const int bad = report(bo, t_op_name[op], m, 1, d, ms, 3.0 * (double)bytes, copy_bw, err,
                         d == CULOSS_F32 ? 1e-4 : 2e-2);
  culoss_free(ctx, d_x), culoss_free(ctx, d_y), culoss_free(ctx, d_g), culoss_free(ctx, d_loss);
  free(xf), free(yf), free(xh), free(yh), free(gh), free(rg);
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
} lce_state;

static int lce_fused(void *p) {
  lce_state *s = p;
  CL(culoss_linear_cross_entropy(s->ctx, NULL, s->n, s->d, s->v, s->dt, s->hid, s->w, NULL,
                                 CULOSS_I64, s->t, s->loss, s->gh, s->gw, NULL, NULL, s->ws,
                                 s->ws_bytes));
  return 0;
}

/* The unfused baseline: full logits from one GEMM, culoss_cross_entropy in
   place, then the two backward GEMMs (fp32 accumulation inside cuBLAS). */
static int lce_unfused(void *p) {
  lce_state *s = p;
  const float one = 1.0f, zero = 0.0f;
  const cudaDataType_t ty = s->dt == CULOSS_BF16 ? CUDA_R_16BF : (s->dt == CULOSS_F16 ? CUDA_R_16F : CUDA_R_32F);
  if (cublasGemmEx(s->h, CUBLAS_OP_T, CUBLAS_OP_N, (int)s->v, (int)s->n, (int)s->d, &one, s->w, ty,
                   (int)s->d, s->hid, ty, (int)s->d, &zero, s->logits, ty, (int)s->v,
                   CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT) != CUBLAS_STATUS_SUCCESS)
    return -1;
  CL(culoss_cross_entropy(s->ctx, NULL, s->n, s->v, s->dt, s->logits, s->v, CULOSS_I64, s->t,
                          s->loss, s->logits, NULL));
  if (cublasGemmEx(s->h, CUBLAS_OP_N, CUBLAS_OP_N, (int)s->d, (int)s->n, (int)s->v, &one, s->w, ty,
                   (int)s->d, s->logits, ty, (int)s->v, &zero, s->gh, ty, (int)s->d,
                   CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT) != CUBLAS_STATUS_SUCCESS)
    return -1;
  if (cublasGemmEx(s->h, CUBLAS_OP_N, CUBLAS_OP_T, (int)s->d, (int)s->v, (int)s->n, &one, s->hid,
                   ty, (int)s->d, s->logits, ty, (int)s->v, &zero, s->gw, ty, (int)s->d,
                   CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT) != CUBLAS_STATUS_SUCCESS)
    return -1;
  return 0;
}

/* Fused linear + CE against the unfused baseline, side by side: time,
   TFLOP/s against the 6 n d v floor, extra device memory (workspace vs the
   n x v logits), and the two results compared. */
static int bench_lce(culoss_context *ctx, const bench_opts *bo, int64_t n, int64_t d, int64_t v,
                     culoss_dtype dt) {
  const size_t es = dt == CULOSS_F32 ? 4 : 2;
  lce_state s = {ctx, NULL, n, d, v, dt, NULL, NULL, NULL, NULL, NULL, NULL, NULL, 0, NULL};
  if (cublasCreate(&s.h) != CUBLAS_STATUS_SUCCESS) return -1;
  CL(culoss_linear_cross_entropy_workspace_size(ctx, n, d, v, dt, &s.ws_bytes));
  rng_t r = rng_seeded(5);
  const int64_t blk = (int64_t)1 << 20;
  float *f = malloc((size_t)blk * 4);
  void *hb = malloc((size_t)blk * es);
  int64_t *t = malloc((size_t)n * 8);
  for (int64_t i = 0; i < n; i++) t[i] = rng_int(&r, 0, v);
  CL(culoss_malloc(ctx, &s.hid, (size_t)(n * d) * es));
  CL(culoss_malloc(ctx, &s.w, (size_t)(v * d) * es));
  CL(culoss_malloc(ctx, &s.gh, (size_t)(n * d) * es));
  CL(culoss_malloc(ctx, &s.gw, (size_t)(v * d) * es));
  CL(culoss_malloc(ctx, &s.t, (size_t)n * 8));
  CL(culoss_malloc(ctx, (void **)&s.loss, 4));
  CL(culoss_upload(ctx, s.t, t, (size_t)n * 8));
  void *bufs[2] = {s.hid, s.w};
  const int64_t counts[2] = {n * d, v * d};
  const double scales[2] = {1.0, 1.0 / sqrt((double)d)};
  for (int q = 0; q < 2; q++)
    for (int64_t i = 0; i < counts[q]; i += blk) {
      const int64_t k = counts[q] - i < blk ? counts[q] - i : blk;
      for (int64_t j = 0; j < k; j++) f[j] = (float)(scales[q] * 2.0 * rng_normal(&r));
      pack_dtype(hb, f, k, dt);
      CL(culoss_upload(ctx, (char *)bufs[q] + (size_t)i * es, hb, (size_t)k * es));
    }
  float lf, lu, ms_f[256], ms_u[256];
  /* fused */
  CL(culoss_malloc(ctx, &s.ws, s.ws_bytes));
  if (lce_fused(&s)) return -1;
  CL(culoss_download(ctx, &lf, s.loss, 4));
  if (time_it(lce_fused, &s, bo->repeats, ms_f)) return -1;
  CL(culoss_free(ctx, s.ws));
  /* unfused baseline */
  const size_t logits_bytes = (size_t)(n * v) * es;
  CL(culoss_malloc(ctx, &s.logits, logits_bytes));
  CK(cudaDeviceSynchronize());
  if (lce_unfused(&s)) return -1;
  CL(culoss_download(ctx, &lu, s.loss, 4));
  if (time_it(lce_unfused, &s, bo->repeats, ms_u)) return -1;
  CL(culoss_free(ctx, s.logits));
  CL(culoss_synchronize(ctx));
  const double flops = 6.0 * (double)n * (double)d * (double)v;
  const double tf = ms_f[bo->repeats / 2], tu = ms_u[bo->repeats / 2];
  const double err = fabs((double)lf - (double)lu) / fabs((double)lu);
  const int ok = err <= (dt == CULOSS_F32 ? 1e-4 : 2e-2);
  printf("%-8s %6lld %6lld %7lld %5s %9.3f %9.3f %7.1f %7.1f %6.2fx %10.1f %10.1f %6.1f%% %9.1e %s\n",
         "lin+ce", (long long)n, (long long)d, (long long)v, dtype_name(dt), tf, tu,
         flops / (tf * 1e-3) / 1e12, flops / (tu * 1e-3) / 1e12, tf / tu,
         (double)s.ws_bytes / (1 << 20), (double)logits_bytes / (1 << 20),
         100.0 * (double)s.ws_bytes / (double)logits_bytes, err, ok ? "ok" : "MISMATCH");
  fflush(stdout);
  culoss_free(ctx, s.hid), culoss_free(ctx, s.w), culoss_free(ctx, s.gh), culoss_free(ctx, s.gw);
  culoss_free(ctx, s.t), culoss_free(ctx, s.loss);
  cublasDestroy(s.h);
  free(f), free(hb), free(t);
  return ok ? 0 : 1;
}

static int run_gpu(culoss_context *ctx, const bench_opts *bo) {
  struct cudaDeviceProp prop;
  CK(cudaGetDeviceProperties(&prop, 0));
  flush_bytes = (size_t)prop.l2CacheSize * 2;
  CK(cudaMalloc(&flush_buf, flush_bytes));
  const double bw = copy_bandwidth(bo->quick ? 10 : 30);
  if (bo->csv)
    printf("# device,%s,copy_GBps,%.1f\ncase,n,v,dtype,median_ms,min_ms,max_ms,GBps,pct_copy,"
           "max_rel_err,check\n", prop.name, bw);
  else {
    printf("device: %s, %d SMs, L2 %d MiB; measured copy bandwidth %.1f GB/s (read+write)\n",
           prop.name, prop.multiProcessorCount, prop.l2CacheSize >> 20, bw);
    printf("bytes counted: cross-entropy: one read of the logits + one write of the gradient "
           "(+ targets); elementwise: one read of input and target + one write of the "
           "gradient\n");
    printf("%-22s %10s %7s %5s %9s %9s %9s %9s %8s %9s %s\n", "case", "n", "v", "dtype", "med_ms",
           "min_ms", "max_ms", "GB/s", "%copy", "max_err", "check");
  }
  const int64_t vs_full[] = {32000, 128256, 256000}, vs_quick[] = {32000, 128256};
  const int64_t *vs = bo->quick ? vs_quick : vs_full;
  const int nv = bo->quick ? 2 : 3;
  int bad = 0;
  for (int vi = 0; vi < nv; vi++)
    for (int di = 0; di < 2; di++) {
      int rc = bench_ce(ctx, bo, bo->quick ? 4096 : 8192, vs[vi], di ? CULOSS_BF16 : CULOSS_F32, bw);
      if (rc < 0) return 1;
      bad |= rc;
    }
  const int64_t m = bo->quick ? (int64_t)1 << 24 : (int64_t)1 << 26;
  for (int op = 0; op < T_NUM_OPS; op++)
    for (int di = 0; di < 2; di++) {
      int rc = bench_ew(ctx, bo, (t_op)op, m, di ? CULOSS_BF16 : CULOSS_F32, bw);
      if (rc < 0) return 1;
      bad |= rc;
    }
  if (!bo->csv)
    printf("\nfused linear + cross-entropy vs unfused (GEMM to full logits, culoss_cross_entropy, "
           "2 GEMMs); TFLOP/s against 6 n d v; extra memory: workspace vs n x v logits\n"
           "%-8s %6s %6s %7s %5s %9s %9s %7s %7s %7s %10s %10s %7s %9s %s\n", "case", "n", "d", "v",
           "dtype", "fused_ms", "unfus_ms", "TF/s_f", "TF/s_u", "ratio", "ws_MiB", "logit_MiB",
           "mem%", "loss_err", "check");
  const int64_t lv_full[] = {32000, 128256, 256000};
  for (int vi = 0; vi < (bo->quick ? 1 : 3); vi++) {
    int rc = bench_lce(ctx, bo, bo->quick ? 4096 : 8192, bo->quick ? 2048 : 4096, lv_full[vi],
                       CULOSS_BF16);
    if (rc < 0) return 1;
    bad |= rc;
  }
  cudaFree(flush_buf);
  if (bad) fprintf(stderr, "culoss-bench: a GPU result did not match the CPU reference\n");
  return bad;
}
#endif

int main(int argc, char **argv) {
  bench_opts bo = {0, 0, 50};
  for (int i = 1; i < argc; i++) {
    if (!strcmp(argv[i], "--quick"))
      bo.quick = 1, bo.repeats = 15;
    else if (!strcmp(argv[i], "--csv"))
      bo.csv = 1;
    else if (!strcmp(argv[i], "--cpu"))
      bo.repeats = -1;
    else {
      fprintf(stderr, "usage: %s [--quick] [--csv] [--cpu]\n", argv[0]);
      return 2;
    }
  }
  culoss_context *ctx = NULL;
  culoss_status st = bo.repeats < 0 ? CULOSS_ERROR_NO_DEVICE
                                    : culoss_create(&ctx, CULOSS_BACKEND_CUDA, 0);
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
