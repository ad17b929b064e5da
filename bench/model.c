/*
 * model.c: `culoss-bench --model`, the traffic model (bench/NOTES.md,
 * "Traffic model"). A MODEL, not a measurement.
 *
 * In an emulator build (tests/emu) each case runs once through the CUDA
 * backend at a reduced but representative size (whole rows at realistic V;
 * fewer rows), with the emulator counting every global load and store of
 * the big arrays (tests/emu/emu_traffic.h): bytes requested, re-reads
 * included, and distinct 32-byte sectors. Printed per case:
 *   - bytes moved per element (requested), the floor (cross-entropy
 *     forward+backward: one read of the logits and one write of the
 *     gradient, plus the probabilities' read for soft targets; elementwise:
 *     each input read once, the gradient written once) and their ratio;
 *   - the re-read working set: the uncached part of a row that the gradient
 *     pass reads again, times the rows in flight on an H100 (132 SMs; a row
 *     long enough to overflow the shared-memory row cache takes a 1024-thread
 *     block, one per SM), against its 50 MB L2, which the other half of the
 *     traffic streams through at the same time: the re-reads are taken to hit
 *     when twice the set fits;
 *   - the predicted time of a full-size case (16384 rows; 2^28 elements) at
 *     H100_COPY_BW, with the re-reads hitting L2 (DRAM moves the distinct
 *     bytes) and missing it (DRAM moves every requested byte).
 * --check fails (exit 1) if a ratio the design promises is exceeded:
 * cross-entropy forward+backward (class indices and soft targets) at most
 * 1.02x the floor, both where the row fits one block's row cache (V =
 * 32768) and where it is split over a cluster (V = 128256, 256000: the
 * emulator has clusters), elementwise at most 1.01x.
 *
 * Without the emulator there is nothing to count: it says so and returns 2.
 */
#include "model.h"

#include <stdio.h>

#ifndef CULOSS_CUDA_EMULATOR

int culoss_bench_model(int check) {
  (void)check;
  fprintf(stderr, "culoss-bench --model: the traffic model counts the emulator's memory accesses; "
                  "build with -DCULOSS_CUDA_EMULATOR=ON (see bench/NOTES.md)\n");
  return 2;
}

#else

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "culoss.h"
#include "emu_traffic.h"
#include "helpers.h"

/* A documented constant until a GPU measures it: an H100 SXM's
   device-to-device copy bandwidth is about 3.0e12 B/s (read + write, of
   3.35e12 peak). scripts/gpu-check.sh measures the real one. */
#define H100_COPY_BW 3.0e12
#define H100_SMS 132
#define H100_L2 (50.0 * 1024 * 1024)

typedef struct {
  const char *name;
  culoss_dtype dt;
  int64_t n, v;          /* rows x classes (elementwise: n elements, v = 1) */
  double floor;          /* bytes */
  double limit;          /* the ratio --check holds it to; 0: reported only */
  int64_t full;          /* rows (elements) of the full-size prediction */
  int row_cache;         /* a row loss: re-read set and L2 verdict apply */
  double rows_in_flight; /* rows resident at once on an H100 (the re-read set's multiplier) */
} mcase;

static int fail(const char *what, culoss_status st) {
  fprintf(stderr, "culoss-bench --model: %s: %s: %s\n", what, culoss_status_string(st),
          culoss_last_error());
  return 1;
}

/* Runs one case with the counters on; *t gets the window's traffic. */
static int run(culoss_context *g, const mcase *k, int kind, culoss_emu_traffic *t) {
  const int64_t m = k->n * k->v;
  const size_t es = dtype_bytes(k->dt), bytes = (size_t)m * es;
  rng_t r = rng_seeded(99 + (uint64_t)m);
  float *x = malloc((size_t)m * 4), *y = malloc((size_t)m * 4);
  int64_t *tg = malloc((size_t)k->n * 8);
  void *xh = malloc(bytes), *yh = malloc(bytes);
  void *dx = NULL, *dy = NULL, *dg = NULL, *dt = NULL, *dl = NULL;
  void *dz = NULL, *dg2 = NULL, *dg3 = NULL, *dyt = NULL; /* the row and 3-input losses' */
  float *yt = malloc((size_t)k->n * 4);
  culoss_status st;
  int rc = 1;
  if (!x || !y || !tg || !xh || !yh || !yt) goto done;
  for (int64_t i = 0; i < k->n; i++) yt[i] = i % 3 ? 1.0f : -1.0f;
  if (kind >= 2) {
    for (int64_t i = 0; i < m; i++) x[i] = (float)rng_normal(&r), y[i] = (float)rng_uniform(&r);
  } else {
    fill_logits(&r, x, k->n, k->v, k->v, 2.0, 1, NULL);
    fill_probs(&r, y, k->n, k->v, k->v);
  }
  for (int64_t i = 0; i < k->n; i++) tg[i] = rng_int(&r, 0, k->v);
  pack_dtype(xh, x, m, k->dt), pack_dtype(yh, y, m, k->dt);
  if ((st = culoss_malloc(g, &dx, bytes)) || (st = culoss_malloc(g, &dy, bytes)) ||
      (st = culoss_malloc(g, &dg, bytes)) || (st = culoss_malloc(g, &dt, (size_t)k->n * 8)) ||
      (st = culoss_malloc(g, &dl, 4)) || (st = culoss_upload(g, dx, xh, bytes)) ||
      (st = culoss_upload(g, dy, yh, bytes)) || (st = culoss_upload(g, dt, tg, (size_t)k->n * 8)) ||
      (st = culoss_synchronize(g))) {
    rc = fail("set-up", st);
    goto done;
  }
  if (kind >= 3 &&
      ((st = culoss_malloc(g, &dz, bytes)) || (st = culoss_malloc(g, &dg2, bytes)) ||
       (st = culoss_malloc(g, &dg3, bytes)) || (st = culoss_malloc(g, &dyt, (size_t)k->n * 4)) ||
       (st = culoss_upload(g, dz, xh, bytes)) ||
       (st = culoss_upload(g, dyt, yt, (size_t)k->n * 4)) || (st = culoss_synchronize(g)))) {
    rc = fail("set-up", st);
    goto done;
  }
  culoss_emu_traffic_begin();
  if (kind == 0 || kind == 1) {
    culoss_cross_entropy_options o;
    culoss_cross_entropy_options_init(&o);
    st =
        kind == 0
            ? culoss_cross_entropy(g, &o, k->n, k->v, k->dt, dx, k->v, CULOSS_I64, dt, dl, dg, NULL)
            : culoss_cross_entropy_soft(g, &o, k->n, k->v, k->dt, dx, k->v, dy, dl, dg, NULL);
  } else if (kind == 2) {
    culoss_regression_options o;
    culoss_regression_options_init(&o);
    st = culoss_mse(g, &o, m, k->dt, dx, dy, dl, dg, NULL);
  } else if (kind == 3) {
    culoss_triplet_margin_options o;
    culoss_triplet_margin_options_init(&o);
    st = culoss_triplet_margin(g, &o, k->n, k->v, k->dt, dx, dy, dz, k->v, dl, dg, dg2, dg3, NULL);
  } else if (kind == 4) {
    culoss_cosine_embedding_options o;
    culoss_cosine_embedding_options_init(&o);
    st = culoss_cosine_embedding(g, &o, k->n, k->v, k->dt, dx, dy, k->v, (const float *)dyt, dl, dg,
                                 dg2, NULL);
  } else if (kind == 6) { /* JSD(0.5): student x, teacher y (any floats are logits) */
    culoss_distill_options o;
    culoss_distill_options_init(&o);
    st = culoss_distill(g, &o, k->n, k->v, k->dt, dx, k->v, dy, k->v, CULOSS_I64, NULL, dl, dg,
                        NULL);
  } else { /* var = y in [0, 1) (clamped at eps) */
    culoss_gaussian_nll_options o;
    culoss_gaussian_nll_options_init(&o);
    st = culoss_gaussian_nll(g, &o, m, k->dt, dx, dz, dy, dl, dg, dg2, NULL);
  }
  if (st == CULOSS_OK) st = culoss_synchronize(g);
  culoss_emu_traffic_end(t);
  if (st != CULOSS_OK) {
    rc = fail(k->name, st);
    goto done;
  }
  rc = 0;
done:
  culoss_free(g, dx), culoss_free(g, dy), culoss_free(g, dg), culoss_free(g, dt);
  culoss_free(g, dl), culoss_free(g, dz), culoss_free(g, dg2), culoss_free(g, dg3);
  culoss_free(g, dyt);
  free(x), free(y), free(tg), free(xh), free(yh), free(yt);
  return rc;
}

int culoss_bench_model(int check) {
  culoss_context *g = NULL;
  culoss_status st = culoss_create(&g, CULOSS_BACKEND_CUDA, 0);
  if (st != CULOSS_OK) return fail("culoss_create", st);
  /* kind 0: CE (class indices) fwd+bwd; 1: CE soft targets; 2: MSE; 3: triplet margin (rows of
     d = v); 4: cosine embedding; 5: Gaussian NLL (three inputs, two gradients); 6: generalized
     JSD (student and teacher logits, the student's gradient) */
  static const struct {
    int kind;
    const char *name;
    culoss_dtype dt;
    int64_t n, v;
    double limit;
  } spec[] = {
      {0, "cross_entropy fwd+bwd", CULOSS_BF16, 32, 32768, 1.02},
      {0, "cross_entropy fwd+bwd", CULOSS_F32, 32, 32768, 1.02},
      /* rows past one block's cache: the cluster path (the emulator has
         clusters; CULOSS_CE_CLUSTER=0 would fail these) */
      {0, "cross_entropy fwd+bwd", CULOSS_BF16, 8, 128256, 1.02},
      {0, "cross_entropy fwd+bwd", CULOSS_F32, 8, 128256, 1.02},
      {0, "cross_entropy fwd+bwd", CULOSS_BF16, 4, 256000, 1.02},
      {0, "cross_entropy fwd+bwd", CULOSS_F32, 4, 256000, 1.02},
      {1, "ce_soft fwd+bwd", CULOSS_BF16, 32, 32768, 1.02},
      {1, "ce_soft fwd+bwd", CULOSS_F32, 8, 128256, 1.02},
      {2, "mse fwd+bwd", CULOSS_BF16, 1 << 20, 1, 1.01},
      {2, "mse fwd+bwd", CULOSS_F32, 1 << 20, 1, 1.01},
      {5, "gaussian_nll fwd+bwd", CULOSS_BF16, 1 << 20, 1, 1.01},
      /* rows in registers: one read of each input, one write of each gradient */
      {3, "triplet fwd+bwd", CULOSS_BF16, 512, 512, 1.01},
      {3, "triplet fwd+bwd", CULOSS_F32, 512, 512, 1.01},
      {4, "cosine fwd+bwd", CULOSS_BF16, 512, 1024, 1.01},
      {4, "cosine fwd+bwd", CULOSS_F32, 512, 1024, 1.01},
      /* past the register cache: a second read (of L2, if the verdict holds); reported */
      {3, "triplet fwd+bwd", CULOSS_BF16, 128, 1024, 0.0},
      {4, "cosine fwd+bwd", CULOSS_F32, 128, 4096, 0.0},
      /* distillation: the row pair in one block's shared memory (2 v sizeof(T) <=
         ~223 KB) or split over a cluster of up to 8 (distill_cluster_kernel): s and t
         read once, the gradient written once; past 8 blocks, re-reads (reported) */
      {6, "jsd fwd+bwd", CULOSS_BF16, 16, 32768, 1.02},
      {6, "jsd fwd+bwd", CULOSS_F32, 16, 16384, 1.02},
      {6, "jsd fwd+bwd", CULOSS_BF16, 8, 128256, 1.02},
      {6, "jsd fwd+bwd", CULOSS_F32, 8, 128256, 1.02},
      {6, "jsd fwd+bwd", CULOSS_BF16, 8, 256000, 1.02},
      {6, "jsd fwd+bwd", CULOSS_F32, 4, 256000, 0.0},
  };
  int bad = 0;
  printf("culoss traffic MODEL (the emulator's counts of global loads and stores, turned into\n"
         "predicted H100 times at an assumed %.1f TB/s copy bandwidth: not a measurement).\n\n",
         H100_COPY_BW / 1e12);
  printf("%-22s %-5s %7s %7s %9s %9s %7s %9s %11s %-12s %10s %10s\n", "case", "dtype", "n", "v",
         "B/elem", "floor", "ratio", "distinct", "reread set", "L2 (50 MB)", "t hit(us)",
         "t miss(us)");
  for (size_t i = 0; i < sizeof spec / sizeof spec[0]; i++) {
    mcase k;
    k.name = spec[i].name, k.dt = spec[i].dt, k.n = spec[i].n, k.v = spec[i].v;
    const int kd = spec[i].kind;
    k.limit = spec[i].limit, k.row_cache = kd != 2 && kd != 5;
    /* CE and distillation: a block per long row, one per SM; embedding: a
       warp per row, about 32 resident warps per SM (registers permitting) */
    const int emb = kd == 3 || kd == 4; /* distillation (6): a block per row, as CE */
    k.rows_in_flight = emb || kd == 5 ? 32.0 * H100_SMS : H100_SMS;
    const double es = (double)dtype_bytes(k.dt), m = (double)(k.n * k.v);
    /* floor: each input read once, each output written once (the cosine
       target's 4 bytes per row included) */
    static const double per_elem[] = {2.0, 3.0, 3.0, 6.0, 4.0, 5.0, 3.0};
    k.floor = m * es * per_elem[kd] + (kd == 4 ? 4.0 * (double)k.n : 0.0);
    k.full = kd == 2 || kd == 5 ? ((int64_t)1 << 28) : (emb ? 65536 : 16384);
    culoss_emu_traffic t;
    if (run(g, &k, spec[i].kind, &t)) {
      culoss_destroy(g);
      return 1;
    }
    const double req = (double)(t.read_bytes + t.write_bytes);
    const double dist = 32.0 * (double)(t.read_sectors + t.write_sectors);
    const double ratio = req / k.floor, dratio = dist / k.floor;
    /* per row: what the gradient pass read again */
    const double reread_row = k.row_cache ? fmax(0.0, req - dist) / (double)k.n : 0.0;
    const double set = reread_row * k.rows_in_flight;
    const int hits = 2.0 * set <= H100_L2;
    const double full_elems = (double)k.full * (double)(k.row_cache ? k.v : 1);
    const double full_floor = k.floor / m * full_elems;
    const double t_hit = dratio * full_floor / H100_COPY_BW * 1e6;
    const double t_miss = ratio * full_floor / H100_COPY_BW * 1e6;
    char verdict[16];
    /* a target logit read again per row is not a re-read pass */
    const int rereads = reread_row > 1e-3 * (double)k.v * es;
    snprintf(verdict, sizeof verdict, "%s",
             !rereads ? "no re-reads" : (hits ? "likely hit" : "likely miss"));
    printf("%-22s %-5s %7lld %7lld %9.3f %9.3f %7.4f %9.4f %9.1fMB %-12s %10.1f %10.1f\n", k.name,
           k.dt == CULOSS_F32 ? "f32" : "bf16", (long long)k.n, (long long)k.v, req / m,
           k.floor / m, ratio, dratio, set / 1e6, verdict, t_hit, t_miss);
    if (check && k.limit > 0.0 && !(ratio <= k.limit)) {
      fprintf(stderr,
              "culoss-bench --model --check: %s %s v=%lld moves %.4fx the floor (limit %.2fx)\n",
              k.name, k.dt == CULOSS_F32 ? "f32" : "bf16", (long long)k.v, ratio, k.limit);
      bad = 1;
    }
  }
  printf("\nratio: requested bytes / floor; distinct: distinct sectors x 32 / floor (what DRAM\n"
         "moves if every re-read hits L2). t hit / t miss: predicted time of the full-size case\n"
         "(CE 16384 rows; embedding 65536 rows; 2^28 elements) with re-reads from L2 / from\n"
         "DRAM. A MODEL.\n");
  culoss_destroy(g);
  return bad;
}

#endif
