/* helpers.h: shared test utilities (random inputs, dtype packing, checks). */
#ifndef CULOSS_TEST_HELPERS_H
#define CULOSS_TEST_HELPERS_H

#include <stddef.h>
#include <stdint.h>

#include "culoss.h"

/* Deterministic, seedable generator (splitmix64): fresh inputs per test,
   reproducible on failure. */
typedef struct {
  uint64_t s;
} rng_t;
rng_t rng_seeded(uint64_t seed);
uint64_t rng_next(rng_t *r);
double rng_uniform(rng_t *r);                      /* [0, 1) */
double rng_normal(rng_t *r);                       /* N(0, 1) */
int64_t rng_int(rng_t *r, int64_t lo, int64_t hi); /* [lo, hi) */
/* A value in [-1, 1) from a hash of a 64-bit index: fills that differ at
   every element, so a 32-bit offset that wraps reads a different value. */
double hash_unit(uint64_t index);

/* Logits with structure: N(0, scale) plus, per row, a few large-magnitude
   values (+-40 * scale) and, if with_neg_inf, some -inf entries (never the
   whole row, never at `avoid` column of the row, which may be NULL). */
void fill_logits(rng_t *r, float *x, int64_t n, int64_t c, int64_t ld, double scale,
                 int with_neg_inf, const int64_t *avoid);
/* Random probability rows (softmax of random values, some exact zeros). */
void fill_probs(rng_t *r, float *y, int64_t n, int64_t c, int64_t ld);

size_t dtype_bytes(culoss_dtype dt);
/* Packs float -> dtype storage (round to nearest even) and back. */
void pack_dtype(void *dst, const float *src, int64_t count, culoss_dtype dt);
void unpack_dtype(float *dst, const void *src, int64_t count, culoss_dtype dt);
/* One float to bf16 storage (round to nearest even). */
uint16_t bf16_bits(float f);
/* Rounds a float buffer in place through dtype (so a reference sees exactly
   the values the device sees). */
void round_through(float *x, int64_t count, culoss_dtype dt);

/* |a - b| <= atol + rtol * |b|, with NaN == NaN and inf == inf of the same
   sign. Returns 1 on pass. */
int close_enough(double a, double b, double atol, double rtol);
/* max over i of |a_i - b_i| / (atol + rtol |b_i|) (<= 1 passes); NaN/inf
   mismatches give +inf. *where receives the worst index. */
double worst_ratio(const float *a, const float *b, int64_t count, double atol, double rtol,
                   int64_t *where);

/* A poison value that no kernel computes by accident: a signalling-looking
   NaN pattern for float, 0x7dff (fp16 NaN) / 0x7fbf (bf16 NaN) for 16-bit. */
void poison(void *p, size_t bytes);
int is_poison_f32(float v);

/* GPU test plumbing (tests/gpu_helpers.c): contexts for a suite, device
   buffers whose failures fail the test with the library's text, and the
   visible skip when no device is usable. */
void gpu_open(culoss_context **gpu, culoss_context **cpu); /* *gpu = NULL: no device */
void gpu_close(culoss_context *gpu, culoss_context *cpu);
/* A fresh CUDA context in *gpu (the old one synchronised and destroyed):
   the tuning knobs (CULOSS_CE_SHAPE, ...) are read at culoss_create. */
void gpu_reopen(culoss_context **gpu);
#define REQUIRE_GPU()                                                                              \
  do {                                                                                             \
    if (gpu == NULL) cr_skip_test("skipped: no CUDA device (%s)", culoss_last_error());            \
  } while (0)
void *dev_alloc_(culoss_context *gpu, size_t bytes);
void *dev_from_(culoss_context *gpu, const void *host, size_t bytes);
void dev_poison_(culoss_context *gpu, void *d, size_t bytes);
void to_host_(culoss_context *gpu, void *h, const void *d, size_t bytes);
/* The same on a suite's own `gpu` context. */
#define dev_alloc(bytes) dev_alloc_(gpu, bytes)
#define dev_from(host, bytes) dev_from_(gpu, host, bytes)
#define dev_poison(d, bytes) dev_poison_(gpu, d, bytes)
#define to_host(h, d, bytes) to_host_(gpu, h, d, bytes)
/* CULOSS_TEST_QUICK=1 (set by scripts/gpu-check.sh under compute-sanitizer,
   which slows kernels by orders of magnitude) keeps every code path but
   shrinks the sizes. */
int test_quick(void);
/* Built against the CPU emulator of CUDA (tests/emu) and CULOSS_EMU_BIG is
   unset: the cases past 2^31 elements (4 to 8 GiB, minutes there) skip. */
int test_emulated_small(void);

#endif
