#include "helpers.h"

#include <math.h>
#include <string.h>

#include "loss_math.h"

rng_t rng_seeded(uint64_t seed) {
  rng_t r;
  r.s = seed * 0x9e3779b97f4a7c15ull + 0x632be59bd9b4e019ull;
  return r;
}

uint64_t rng_next(rng_t *r) {
  uint64_t z = (r->s += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

double hash_unit(uint64_t index) {
  uint64_t z = index + 0x9e3779b97f4a7c15ull; /* splitmix64's finaliser */
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  z ^= z >> 31;
  return (double)(z >> 11) * 0x1.0p-52 - 1.0;
}

double rng_uniform(rng_t *r) { return (double)(rng_next(r) >> 11) * 0x1.0p-53; }

double rng_normal(rng_t *r) {
  double u1 = rng_uniform(r), u2 = rng_uniform(r);
  if (u1 < 1e-300) u1 = 1e-300;
  return sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2);
}

int64_t rng_int(rng_t *r, int64_t lo, int64_t hi) {
  return lo + (int64_t)(rng_next(r) % (uint64_t)(hi - lo));
}

void fill_logits(rng_t *r, float *x, int64_t n, int64_t c, int64_t ld, double scale,
                 int with_neg_inf, const int64_t *avoid) {
  for (int64_t i = 0; i < n; i++) {
    float *row = x + i * ld;
    for (int64_t j = 0; j < c; j++) row[j] = (float)(scale * rng_normal(r));
    for (int64_t j = c; j < ld; j++) row[j] = 12345.0f; /* padding, must stay */
    int64_t big = c >= 8 ? 2 : 0;
    for (int64_t k = 0; k < big; k++)
      row[rng_int(r, 0, c)] = (float)((rng_uniform(r) < 0.5 ? -40.0 : 40.0) * scale);
    if (with_neg_inf && c >= 3) {
      int64_t count = 1 + c / 16;
      for (int64_t k = 0; k < count; k++) {
        int64_t j = rng_int(r, 0, c);
        if (avoid && avoid[i] == j) continue;
        row[j] = -INFINITY;
      }
      /* keep one finite logit so the row is not entirely -inf */
      if (avoid == NULL || avoid[i] < 0 || avoid[i] >= c) row[0] = (float)rng_normal(r);
    }
  }
}

void fill_probs(rng_t *r, float *y, int64_t n, int64_t c, int64_t ld) {
  for (int64_t i = 0; i < n; i++) {
    float *row = y + i * ld;
    double s = 0.0;
    for (int64_t j = 0; j < c; j++) {
      double v = (c > 4 && rng_uniform(r) < 0.25) ? 0.0 : exp(2.0 * rng_normal(r));
      row[j] = (float)v;
      s += v;
    }
    if (s == 0.0) {
      row[0] = 1.0f;
      s = 1.0;
    }
    for (int64_t j = 0; j < c; j++) row[j] = (float)(row[j] / s);
    for (int64_t j = c; j < ld; j++) row[j] = 0.5f;
  }
}

size_t dtype_bytes(culoss_dtype dt) { return dt == CULOSS_F32 ? 4u : 2u; }

void pack_dtype(void *dst, const float *src, int64_t count, culoss_dtype dt) {
  for (int64_t i = 0; i < count; i++) {
    if (dt == CULOSS_F32)
      ((float *)dst)[i] = src[i];
    else if (dt == CULOSS_F16)
      ((uint16_t *)dst)[i] = culoss__f32_to_f16(src[i]);
    else
      ((uint16_t *)dst)[i] = culoss__f32_to_bf16(src[i]);
  }
}

void unpack_dtype(float *dst, const void *src, int64_t count, culoss_dtype dt) {
  for (int64_t i = 0; i < count; i++) {
    if (dt == CULOSS_F32)
      dst[i] = ((const float *)src)[i];
    else if (dt == CULOSS_F16)
      dst[i] = culoss__f16_to_f32(((const uint16_t *)src)[i]);
    else
      dst[i] = culoss__bf16_to_f32(((const uint16_t *)src)[i]);
  }
}

void round_through(float *x, int64_t count, culoss_dtype dt) {
  for (int64_t i = 0; i < count; i++) {
    if (dt == CULOSS_F16)
      x[i] = culoss__f16_to_f32(culoss__f32_to_f16(x[i]));
    else if (dt == CULOSS_BF16)
      x[i] = culoss__bf16_to_f32(culoss__f32_to_bf16(x[i]));
  }
}

int close_enough(double a, double b, double atol, double rtol) {
  if (isnan(a) || isnan(b)) return isnan(a) && isnan(b);
  if (isinf(a) || isinf(b)) return a == b;
  return fabs(a - b) <= atol + rtol * fabs(b);
}

double worst_ratio(const float *a, const float *b, int64_t count, double atol, double rtol,
                   int64_t *where) {
  double worst = 0.0;
  int64_t wi = -1;
  for (int64_t i = 0; i < count; i++) {
    double r;
    if (isnan(a[i]) || isnan(b[i]) || isinf(a[i]) || isinf(b[i]))
      r = close_enough(a[i], b[i], 0, 0) ? 0.0 : INFINITY;
    else
      r = fabs((double)a[i] - (double)b[i]) / (atol + rtol * fabs((double)b[i]));
    if (r > worst || wi < 0) {
      worst = r > worst ? r : worst;
      if (r >= worst) wi = i;
    }
  }
  if (where) *where = wi;
  return worst;
}

void poison(void *p, size_t bytes) {
  /* 0x7fbf7fbf: as a float a NaN with an unusual payload; as 16-bit halves
     0x7fbf, a NaN in both fp16 and bf16. */
  uint32_t v = 0x7fbf7fbfu;
  unsigned char *b = (unsigned char *)p;
  for (size_t i = 0; i < bytes; i++) b[i] = ((const unsigned char *)&v)[i % 4];
}

int is_poison_f32(float v) {
  uint32_t u;
  memcpy(&u, &v, sizeof u);
  return u == 0x7fbf7fbfu;
}

uint16_t bf16_bits(float f) { return culoss__f32_to_bf16(f); }
