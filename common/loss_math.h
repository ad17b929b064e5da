/*
 * loss_math.h: the scalar math shared by the CUDA kernels and the host code.
 *
 * Everything here is a __host__ __device__ function when compiled by nvcc and
 * a plain static inline function when compiled as C11, so the CPU unit tests
 * (tests/test_math.c) exercise exactly the code the kernels run: dtype
 * conversions, target loading, the online log-sum-exp state and its merge
 * rule (including the -inf cases that produce NaN when written naively), the
 * logit soft-cap, the cross-entropy gradient and its target coefficient, and
 * the elementwise losses. The formulas are docs/semantics.md's.
 *
 * Internal header: not installed, names use the culoss__ prefix.
 */
#ifndef CULOSS_LOSS_MATH_H
#define CULOSS_LOSS_MATH_H

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "culoss.h"

#if defined(__CUDACC__)
#define CULOSS_HD __host__ __device__ __forceinline__
#else
#define CULOSS_HD static inline
#endif

#define CULOSS_LN2 0.6931471805599453f

/* ---------------------------------------------------------------------- */
/* bit casts and 16-bit float conversions                                  */
/* ---------------------------------------------------------------------- */

CULOSS_HD uint32_t culoss__f32_bits(float f) {
  uint32_t u;
  memcpy(&u, &f, sizeof u);
  return u;
}

CULOSS_HD float culoss__f32_from_bits(uint32_t u) {
  float f;
  memcpy(&f, &u, sizeof f);
  return f;
}

/* bfloat16 is the upper half of an IEEE binary32. */
CULOSS_HD float culoss__bf16_to_f32(uint16_t h) { return culoss__f32_from_bits((uint32_t)h << 16); }

/* Round to nearest even; NaN stays a (quiet) NaN, +-inf stays +-inf. */
CULOSS_HD uint16_t culoss__f32_to_bf16(float f) {
  uint32_t u = culoss__f32_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x0040u); /* NaN */
  u += 0x7fffu + ((u >> 16) & 1u);
  return (uint16_t)(u >> 16);
}

/* IEEE binary16 -> binary32, exact (subnormals included). */
CULOSS_HD float culoss__f16_to_f32(uint16_t h) {
  uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t man = h & 0x3ffu;
  uint32_t u;
  if (exp == 0x1fu) {
    u = sign | 0x7f800000u | (man << 13); /* inf or NaN (payload kept) */
  } else if (exp != 0) {
    u = sign | ((exp + 112u) << 23) | (man << 13); /* normal: rebias 15 -> 127 */
  } else if (man == 0) {
    u = sign; /* +-0 */
  } else {
    /* subnormal: man * 2^-24, exactly representable in binary32 */
    float f = (float)man * 5.9604644775390625e-8f;
    u = sign | culoss__f32_bits(f);
  }
  return culoss__f32_from_bits(u);
}

/* binary32 -> binary16, round to nearest even, overflow to inf, NaN kept. */
CULOSS_HD uint16_t culoss__f32_to_f16(float f) {
  uint32_t u = culoss__f32_bits(f);
  uint16_t sign = (uint16_t)((u >> 16) & 0x8000u);
  uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return (uint16_t)(sign | 0x7e00u);  /* NaN */
  if (a >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u); /* rounds to >= 65520: inf */
  if (a >= 0x38800000u) {
    /* normal half: rebias and round the 13 dropped bits to nearest even */
    uint32_t r = a - 0x38000000u;
    r += 0xfffu + ((r >> 13) & 1u);
    return (uint16_t)(sign | (r >> 13));
  }
  if (a < 0x33000000u) return sign; /* below half the smallest subnormal: 0 */
  {
    /* subnormal half: value = m * 2^-24 with m = round(|f| * 2^24) (even ties) */
    uint32_t e = a >> 23;                     /* 102..112 */
    uint32_t m = (a & 0x7fffffu) | 0x800000u; /* 24-bit significand */
    uint32_t shift = 126u - e;                /* 14..24 */
    uint32_t q = m >> shift;
    uint32_t rem = m & ((1u << shift) - 1u);
    uint32_t half = 1u << (shift - 1u);
    if (rem > half || (rem == half && (q & 1u))) q++;
    return (uint16_t)(sign | q);
  }
}

/* ---------------------------------------------------------------------- */
/* class targets and the NaN of an uncomputable loss                       */
/* ---------------------------------------------------------------------- */

/* Element i of a class-target array of type ttype (a culoss_index_type). */
CULOSS_HD int64_t culoss__target_at(const void *targets, int ttype, int64_t i) {
  return ttype == CULOSS_I32 ? (int64_t)((const int32_t *)targets)[i]
                             : ((const int64_t *)targets)[i];
}

/* A quiet NaN: the loss of a row or element the kernels cannot compute (a
   class target out of range, an input outside its domain). */
CULOSS_HD float culoss__nan(void) { return culoss__f32_from_bits(0x7fc00000u); }

/* ---------------------------------------------------------------------- */
/* vocabulary-parallel records (common/backend.h)                          */
/* ---------------------------------------------------------------------- */

/* The record after a rank's row records: {W_r, 0, v_begin, c_local, 0, 0}
   with the two integers stored exactly, as int64 in float slots 2-3, 4-5. */
CULOSS_HD void culoss__vp_slice_record(float *r, float wsum, int64_t v_begin, int64_t c_local) {
  int k;
  for (k = 0; k < 8; k++) r[k] = 0.0f;
  r[0] = wsum;
  memcpy(r + 2, &v_begin, sizeof v_begin);
  memcpy(r + 4, &c_local, sizeof c_local);
}
CULOSS_HD int64_t culoss__vp_record_i64(const float *r, int slot) {
  int64_t v;
  memcpy(&v, r + slot, sizeof v);
  return v;
}
/* Whether the ranks' slices (their slice records, rank k's at
   gathered + (k (rec_n + 1) + rec_n) 8) tile [0, v_total) exactly: each
   inside it, pairwise disjoint, widths summing to v_total. */
CULOSS_HD int culoss__vp_slices_tile(const float *gathered, int ranks, int64_t rec_n,
                                     int64_t v_total) {
  int64_t sum = 0;
  int k, q;
  for (k = 0; k < ranks; k++) {
    const float *rk = gathered + ((int64_t)k * (rec_n + 1) + rec_n) * 8;
    const int64_t bk = culoss__vp_record_i64(rk, 2), ck = culoss__vp_record_i64(rk, 4);
    if (ck < 1 || bk < 0 || bk > v_total - ck) return 0;
    sum += ck;
    for (q = 0; q < k; q++) {
      const float *rq = gathered + ((int64_t)q * (rec_n + 1) + rec_n) * 8;
      const int64_t bq = culoss__vp_record_i64(rq, 2), cq = culoss__vp_record_i64(rq, 4);
      if (bk < bq + cq && bq < bk + ck) return 0;
    }
  }
  return sum == v_total;
}

/* ---------------------------------------------------------------------- */
/* online log-sum-exp                                                      */
/* ---------------------------------------------------------------------- */

/* State of a running log-sum-exp over some values: m = their maximum and
   s = the sum of exp(v - m) over every value but one that equals m (the
   "top", whose term is exactly 1 and is kept implicit): the sum of exps is
   1 + s, so log-sum-exp = m + log1p(s). Kept apart, a confident row (all
   others far below the top, s tiny) keeps its digits: in fp32, 1 + s rounds
   s away below 6e-8, and log(1 + s) and the top's p - 1 = -s / (1 + s) would
   lose them; every addition to s is of a positive term (merges included).
   The empty set (or only -inf values) is {-inf, 0}: there is no top, and s
   is the whole (zero) sum. A NaN value makes s NaN. A +inf maximum does
   not (one +inf alone leaves s = 0): its NaN (PyTorch's exp(inf - inf))
   comes from culoss__lse_rest and culoss__lse_log_s, which every reader of
   a finished state must use instead of .s. */
typedef struct {
  float m;
  float s;
} culoss__lse_state;

CULOSS_HD culoss__lse_state culoss__lse_empty(void) {
  culoss__lse_state e;
  e.m = -INFINITY;
  e.s = 0.0f;
  return e;
}

/* exp(a - b) where b >= a, written so that a == b == -inf gives 0 instead of
   exp(NaN): a tile or lane that saw only -inf (masked classes, padding)
   contributes nothing rather than poisoning the row. */
CULOSS_HD float culoss__exp_diff(float a, float b) { return (a == -INFINITY) ? 0.0f : expf(a - b); }

/* The whole sum of exp(v - m), the top's 1 included. */
CULOSS_HD float culoss__lse_total(culoss__lse_state a) {
  return a.m == -INFINITY ? a.s : 1.0f + a.s;
}

/* s, but NaN for a +inf maximum (its exp(inf - inf)). */
CULOSS_HD float culoss__lse_rest(culoss__lse_state a) {
  return a.m == INFINITY ? culoss__nan() : a.s;
}

/* log of the whole sum, log1p(s). */
CULOSS_HD float culoss__lse_log_s(culoss__lse_state a) {
  return a.m == -INFINITY ? logf(a.s) : log1pf(culoss__lse_rest(a));
}

/* Merge two states; associative and commutative up to rounding, and the
   kernels always merge in a fixed order so results are deterministic. The
   state holding the larger maximum (a on ties) keeps its top; the other's
   whole sum, rescaled, joins s. NaN propagates through s. */
CULOSS_HD culoss__lse_state culoss__lse_merge(culoss__lse_state a, culoss__lse_state b) {
  culoss__lse_state r, t, o;
  r.m = fmaxf(a.m, b.m);
  if (r.m == -INFINITY) {
    r.s = a.s + b.s; /* both empty; keeps a NaN if one was already there */
    return r;
  }
  t = a.m == r.m ? a : b;
  o = a.m == r.m ? b : a;
  r.s = t.s + culoss__lse_total(o) * culoss__exp_diff(o.m, r.m);
  return r;
}

/* The new s when a state's maximum m_old rises to m_new > m_old: its whole
   sum, rescaled (a new value at m_new becomes the top). */
CULOSS_HD float culoss__lse_rescale(culoss__lse_state a, float m_new) {
  return culoss__lse_total(a) * culoss__exp_diff(a.m, m_new);
}

/* w (a - b) for a >= b, finite when the product is: a - b overflows fp32
   only for huge a and b of opposite signs (e.g. +-3.4e38 at the fp16/bf16/fp32
   maximum), where w a - w b adds two terms of one sign (no cancellation). */
CULOSS_HD float culoss__scaled_diff(float w, float a, float b) {
  const float d = a - b;
  return (d == INFINITY && a != INFINITY && b != -INFINITY) ? w * a - w * b : w * d;
}

/* The smoothing / soft-target sum, kept relative to the running maximum m as
   sx = sum_j w_j (m - x_j) with sw = sum_j w_j: every term is >= 0, so the
   loss sum_j w_j (lse - x_j) = sx + sw log_s never cancels (W lse - sum w x
   loses all its digits at large common offsets and gives inf - inf near the
   fp16/bf16 maximum). Moving to a larger maximum adds (m_new - m_old) sw. A
   -inf logit's term is w * inf (+inf, or NaN for w = 0: torch's 0 * -inf). */
CULOSS_HD float culoss__sx_rebase(float sx, float sw, float m_old, float m_new) {
  if (sw == 0.0f || m_new == m_old) return sx;
  return sx + (m_old == -INFINITY ? sw * INFINITY : culoss__scaled_diff(sw, m_new, m_old));
}
CULOSS_HD float culoss__sx_term(float w, float x, float m) {
  return x == -INFINITY ? w * INFINITY : culoss__scaled_diff(w, m, x);
}

/* The softmax entropy of a state's values, online: beside {m, s} keep
   u = sum_j e^(x_j - m) (x_j - m); then H = lse - sum_j p_j x_j =
   log s - u / s, with no cancellation at large common offsets. Moving to a
   larger maximum m_new multiplies by e^-(m_new - m) and subtracts
   (m_new - m) s, s the whole sum (culoss__lse_total); a state with no values
   (m = -inf) has u = 0. */
CULOSS_HD float culoss__ent_rebase(float u, float s, float m_old, float m_new) {
  float f;
  if (m_new == m_old || m_old == -INFINITY) return u;
  f = culoss__exp_diff(m_old, m_new);
  return f == 0.0f ? 0.0f : f * (u - (m_new - m_old) * s);
}
/* One value's term of u, given e = exp(x - m): a -inf value adds nothing,
   and neither does one whose x - m overflows (e is 0 there: 0 * -inf). */
CULOSS_HD float culoss__ent_term(float e, float x, float m) {
  return x == -INFINITY || e == 0.0f ? 0.0f : e * (x - m);
}
/* H from u and the state (log1p and 1 + s: see culoss__lse_state). */
CULOSS_HD float culoss__ent_value(float u, culoss__lse_state a) {
  return culoss__lse_log_s(a) - u / culoss__lse_total(a);
}

/* Add one value to a state. */
CULOSS_HD culoss__lse_state culoss__lse_add(culoss__lse_state a, float v) {
  culoss__lse_state b;
  b.m = v;
  b.s = (v == v) ? 0.0f : v; /* v alone is its own top; a NaN value makes s NaN */
  return culoss__lse_merge(a, b);
}

/* log-sum-exp of the state's values: -inf for the empty set. */
CULOSS_HD float culoss__lse_value(culoss__lse_state a) {
  if (a.m == -INFINITY) return (a.s == a.s) ? -INFINITY : a.s;
  return a.m + culoss__lse_log_s(a);
}

/* ---------------------------------------------------------------------- */
/* soft-capping and the cross-entropy gradient                             */
/* ---------------------------------------------------------------------- */

/* x -> cap * tanh(x / cap); cap <= 0 means off. */
CULOSS_HD float culoss__softcap(float x, float cap) {
  return cap > 0.0f ? cap * tanhf(x / cap) : x;
}

/* d/dx of the soft-cap, given the capped value y = cap * tanh(x / cap):
   1 - tanh^2 = 1 - (y / cap)^2. */
CULOSS_HD float culoss__softcap_grad(float y, float cap) {
  float t;
  if (cap <= 0.0f) return 1.0f;
  t = y / cap;
  return 1.0f - t * t;
}

/* A coefficient of culoss__ce_grad in two parts, w + k: the target-weight
   part and the smoothing / z-loss part, so that the top column's
   a - b = (a.w - b.w) + (a.k - b.k) stays exact where the weights cancel. */
typedef struct {
  float w, k;
} culoss__ce_coef;

/* Gradient of one logit of a cross-entropy row, in fp32:
 *   g = scale * (p * a - b) * capgrad,   p = exp(x - m) / (1 + s)
 * from the row maximum m and s, the row's culoss__lse_state sum without its
 * top (culoss__lse_rest): x - m is exact for the large logits that matter,
 * so p keeps fp32 accuracy even when the logits are in the thousands
 * (x - lse would lose the ulp of lse, 1e-3 at 1e4), and for confident rows
 * (exp(x - m - log_s) would lose the ulp of the argument, d 6e-8 relative
 * at x - m = -d). A logit at the maximum has p = 1 / (1 + s): while s < 1 its
 * p a - b is formed as a (p - 1) + (a - b) with p - 1 = -s / (1 + s), so a
 * confident row's target gradient keeps its digits instead of rounding p
 * to 1 (p - 1 = 0 for s < 6e-8 in fp32), and a - b from the parts of a and
 * b, so z-loss's 2 z lse is not lost to (1 + 2 z lse) - 1.
 * The per-row constants are a = a.w + a.k with
 *   a.w = (1-eps) w_y, a.k = (eps/c) W + 2 z lse   (index targets)
 *   a.w = sum_c w_c y'_c, a.k = 2 z lse            (soft targets)
 * and the per-element one is b = b.w + b.k with
 *   b.w = (1-eps) w_y [j == y], b.k = (eps/c) w_j  (index targets)
 *   b.w = w_j y'_j, b.k = 0                        (soft targets).
 * The target column's p*a - b is formed in fp32 before any rounding to the
 * output dtype, so bf16/fp16 gradients do not lose it to cancellation.
 * p of a -inf logit is exactly 0. */
CULOSS_HD float culoss__ce_grad(float x, float m, float s, culoss__ce_coef a, culoss__ce_coef b,
                                float scale, float capgrad) {
  float p;
  if (x == m && m != -INFINITY && s < 1.0f) /* s is NaN for m = +inf */
    return scale * ((a.w + a.k) * (-s / (1.0f + s)) + ((a.w - b.w) + (a.k - b.k))) * capgrad;
  p = (x == -INFINITY) ? 0.0f : expf(x - m) / (1.0f + s);
  return scale * (p * (a.w + a.k) - (b.w + b.k)) * capgrad;
}

/* b of culoss__ce_grad for class-index targets at column j of a row of c
   with target t: w = tw = (1-eps) w_t at the target, k = (eps/c) w_j; the
   class weight (NULL: all ones) is read only when smoothing needs it. */
CULOSS_HD culoss__ce_coef culoss__ce_index_b2(int64_t j, int64_t t, float tw, float eps, int64_t c,
                                              const float *class_weight) {
  culoss__ce_coef b;
  b.w = j == t ? tw : 0.0f;
  b.k = eps > 0.0f ? eps / (float)c * (class_weight ? class_weight[j] : 1.0f) : 0.0f;
  return b;
}
/* Their sum, b. */
CULOSS_HD float culoss__ce_index_b(int64_t j, int64_t t, float tw, float eps, int64_t c,
                                   const float *class_weight) {
  const culoss__ce_coef b = culoss__ce_index_b2(j, t, tw, eps, c, class_weight);
  return b.w + b.k;
}
/* A coefficient with no second part. */
CULOSS_HD culoss__ce_coef culoss__ce_coef1(float w) {
  culoss__ce_coef b;
  b.w = w;
  b.k = 0.0f;
  return b;
}

/* b of culoss__ce_grad for probability targets, and the weight of column
   j's term in the soft loss: w_j y'_j with y'_j = (1-eps) y_j + eps/c. */
CULOSS_HD float culoss__ce_soft_b(float wj, float y, float eps, int64_t c) {
  return wj * ((1.0f - eps) * y + eps / (float)c);
}

/* ---------------------------------------------------------------------- */
/* elementwise losses: value and derivative with respect to the input      */
/* ---------------------------------------------------------------------- */
/* Each returns the loss of one element and stores d(loss)/d(input) in *d,
   both before any reduction scaling. docs/semantics.md sections 4-7. */

/* log(sigmoid(x)) = min(x, 0) - log1p(exp(-|x|)): no overflow for any x. */
CULOSS_HD float culoss__log_sigmoid(float x) { return fminf(x, 0.0f) - log1pf(expf(-fabsf(x))); }

/* sigmoid(x) without overflow: exp of a non-positive number only. */
CULOSS_HD float culoss__sigmoid(float x) {
  float e = expf(-fabsf(x));
  return x >= 0.0f ? 1.0f / (1.0f + e) : e / (1.0f + e);
}

/* BCE with logits, PyTorch's form: w [(1-y) x - (1 + (pw-1) y) logsig(x)].
   An infinite logit gives a NaN loss (0 * inf) but a finite gradient, as in
   PyTorch; |x| = 1000 is finite. */
CULOSS_HD float culoss__bce_logits(float x, float y, float w, float pw, float *d) {
  const float lw = 1.0f + (pw - 1.0f) * y;
  *d = w * (lw * culoss__sigmoid(x) - pw * y);
  return w * ((1.0f - y) * x - lw * culoss__log_sigmoid(x));
}

/* BCE on probabilities: logs clamped at -100, gradient denominator at 1e-12. */
CULOSS_HD float culoss__bce_prob(float x, float y, float w, float *d) {
  const float lx = fmaxf(logf(x), -100.0f);
  const float l1x = fmaxf(log1pf(-x), -100.0f);
  *d = w * (x - y) / fmaxf(x * (1.0f - x), 1e-12f);
  return -w * (y * lx + (1.0f - y) * l1x);
}

/* Binary hinge max(0, margin - y f) (or its square). At the kink the
   subgradient is 0 (PyTorch 2.15's clamp_min and relu give 0 at equality:
   docs/semantics.md section 0). A NaN score gives a NaN loss (clamp_min(NaN) is
   NaN) and a zero gradient (the mask z > 0 is false). */
CULOSS_HD float culoss__hinge(float f, float y, float margin, int squared, float *d) {
  const float z = margin - y * f;
  const float zp = z > 0.0f || z != z ? z : 0.0f;
  if (squared) {
    *d = z > 0.0f ? -2.0f * y * z : 0.0f;
    return zp * zp;
  }
  *d = z > 0.0f ? -y : 0.0f;
  return zp;
}

CULOSS_HD float culoss__mse(float x, float y, float *d) {
  const float r = x - y;
  *d = 2.0f * r;
  return r * r;
}

/* sign with sign(0) = 0 and sign(NaN) = 0: PyTorch's sign, the L1 subgradient. */
CULOSS_HD float culoss__sign0(float r) { return r > 0.0f ? 1.0f : (r < 0.0f ? -1.0f : 0.0f); }

CULOSS_HD float culoss__l1(float x, float y, float *d) {
  const float r = x - y;
  *d = culoss__sign0(r);
  return fabsf(r);
}

/* Huber(delta > 0): 0.5 r^2 if |r| < delta else delta (|r| - delta/2);
   gradient clamp(r, -delta, delta). */
CULOSS_HD float culoss__huber(float x, float y, float delta, float *d) {
  const float r = x - y, a = fabsf(r);
  *d = fminf(fmaxf(r, -delta), delta);
  if (r != r) *d = r;
  return a < delta ? 0.5f * r * r : delta * (a - 0.5f * delta);
}

/* Smooth L1(beta >= 0): 0.5 r^2 / beta if |r| < beta else |r| - beta/2;
   beta == 0 is exactly L1, gradient 0 at r == 0 included. */
CULOSS_HD float culoss__smooth_l1(float x, float y, float beta, float *d) {
  const float r = x - y, a = fabsf(r);
  if (beta == 0.0f) return culoss__l1(x, y, d);
  if (a < beta) {
    *d = r / beta;
    return 0.5f * r * r / beta;
  }
  *d = r != r ? r : culoss__sign0(r); /* NaN: NaN, as torch's r / beta branch */
  return a - 0.5f * beta;
}

/* KL divergence pointwise, input x = log q:
   log_target == 0: xlogy(t, t) - t x, with 0 log 0 = 0 (t < 0 gives NaN);
   log_target != 0: exp(t) (t - x) (t = -inf gives NaN: 0 * -inf).
   Gradient with respect to x: -t or -exp(t). */
/* Hinge embedding: [y != 1] max(0, margin - x) + [y != -1] x; subgradient
   0 at the kink and at a NaN z (PyTorch 2.15). */
CULOSS_HD float culoss__hinge_embedding(float x, float y, float margin, float *d) {
  const float z = margin - x;
  float l = 0.0f, g = 0.0f;
  if (y != 1.0f) {
    l += z > 0.0f || z != z ? z : 0.0f;
    if (z > 0.0f) g -= 1.0f;
  }
  if (y != -1.0f) {
    l += x;
    g += 1.0f;
  }
  *d = g;
  return l;
}

/* Soft margin log(1 + exp(-y x)) as softplus(z), z = -y x: finite for any
   finite z (PyTorch's overflows past z ~ 88.7). */
CULOSS_HD float culoss__soft_margin(float x, float y, float *d) {
  const float z = -y * x;
  *d = -y * culoss__sigmoid(z);
  return fmaxf(z, 0.0f) + log1pf(expf(-fabsf(z)));
}

/* Poisson NLL; flags: 1 log_input, 2 full (the Stirling term where y > 1). */
CULOSS_HD float culoss__poisson_nll(float x, float y, float eps, int flags, float *d) {
  float l;
  if (flags & 1) {
    const float e = expf(x);
    l = e - y * x;
    *d = e - y;
  } else {
    l = x - y * logf(x + eps);
    *d = 1.0f - y / (x + eps);
  }
  if ((flags & 2) && y > 1.0f) l += y * logf(y) - y + 0.5f * logf(6.2831853071795865f * y);
  return l;
}

/* Sigmoid focal loss (torchvision's formula); 1 - p_t from sigmoid(-x)
   directly, and the modulating factor's derivative written so that
   1 - p_t = 0 gives 0 rather than 0 * inf for gamma < 1. */
CULOSS_HD float culoss__sigmoid_focal(float x, float y, float alpha, float gamma, float *d) {
  const float p = culoss__sigmoid(x), q = culoss__sigmoid(-x); /* q = 1 - p */
  const float ce = fmaxf(x, 0.0f) - x * y + log1pf(expf(-fabsf(x)));
  const float omp = y * q + (1.0f - y) * p; /* 1 - p_t */
  const float at = alpha >= 0.0f ? alpha * y + (1.0f - alpha) * (1.0f - y) : 1.0f;
  const float mod = gamma == 0.0f ? 1.0f : powf(omp, gamma);
  const float dmod = gamma == 0.0f || !(omp > 0.0f) ? 0.0f : gamma * powf(omp, gamma - 1.0f);
  /* d(1 - p_t)/dx = (1 - 2y) p q; d ce/dx = p - y */
  *d = at * ((p - y) * mod + ce * dmod * (1.0f - 2.0f * y) * p * q);
  return at * ce * mod;
}

/* Margin ranking max(0, margin - y (x1 - x2)); *d = dl/dx1 (dl/dx2 is
   -*d); subgradient 0 at the kink and at a NaN z (clamp_min). */
CULOSS_HD float culoss__margin_ranking(float x1, float x2, float y, float margin, float *d) {
  const float z = margin - y * (x1 - x2);
  *d = z > 0.0f ? -y : 0.0f;
  return z > 0.0f || z != z ? z : 0.0f;
}

/* Gaussian NLL (log v + r^2 / v) / 2 (+ log(2 pi) / 2), v = max(var, eps)
   with a NaN var kept; *d = dl/dx = r / v, *dv = dl/dvar = (1 - r^2/v)/(2v).
   r^2 / v is formed as r (r / v), which overflows only where the value does
   (v >= eps > 0). */
CULOSS_HD float culoss__gaussian_nll(float x, float y, float var, float eps, int full, float *d,
                                     float *dv) {
  const float v = var < eps ? eps : var, r = x - y, q = r / v, rq = r * q;
  *d = q;
  *dv = 0.5f * (1.0f - rq) / v;
  return 0.5f * (logf(v) + rq) + (full ? 0.918938533204672742f : 0.0f);
}

CULOSS_HD float culoss__kl_div(float x, float t, int log_target, float *d) {
  if (log_target) {
    const float e = expf(t);
    *d = -e;
    return e * (t - x);
  }
  *d = -t;
  return (t == 0.0f ? 0.0f : t * logf(t)) - t * x;
}

#endif /* CULOSS_LOSS_MATH_H */
