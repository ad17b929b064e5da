/* test_math.c: the __host__ __device__ math of common/loss_math.h, on the CPU.
   These are the exact functions the kernels call. */
#include <criterion/criterion.h>
#include <math.h>

#include "helpers.h"
#include "loss_math.h"

Test(math, bf16_roundtrip_all_values) {
  for (uint32_t h = 0; h < 65536; h++) {
    float f = culoss__bf16_to_f32((uint16_t)h);
    uint16_t back = culoss__f32_to_bf16(f);
    if (isnan(f))
      cr_assert(isnan(culoss__bf16_to_f32(back)), "bf16 NaN 0x%04x lost", h);
    else
      cr_assert_eq(back, h, "bf16 0x%04x -> %g -> 0x%04x", h, (double)f, back);
  }
}

Test(math, bf16_round_to_nearest_even) {
  /* 1 + 2^-8 is exactly halfway between bf16 1.0 and 1 + 2^-7: ties to even (1.0). */
  cr_assert_eq(culoss__f32_to_bf16(1.0f + 0x1p-8f), 0x3f80);
  /* 1 + 3*2^-8 is halfway between 1+2^-7 (odd) and 1+2^-6: ties to even (up). */
  cr_assert_eq(culoss__f32_to_bf16(1.0f + 3 * 0x1p-8f), 0x3f82);
  cr_assert_eq(culoss__f32_to_bf16(1.0f + 0x1p-8f + 0x1p-20f), 0x3f81); /* above half: up */
  cr_assert_eq(culoss__f32_to_bf16(INFINITY), 0x7f80);
  cr_assert_eq(culoss__f32_to_bf16(-INFINITY), 0xff80);
  cr_assert_eq(culoss__f32_to_bf16(3.4e38f), 0x7f80); /* rounds up past the largest finite */
}

Test(math, f16_roundtrip_all_values) {
  for (uint32_t h = 0; h < 65536; h++) {
    float f = culoss__f16_to_f32((uint16_t)h);
    uint16_t back = culoss__f32_to_f16(f);
    if (isnan(f))
      cr_assert(isnan(culoss__f16_to_f32(back)), "f16 NaN 0x%04x lost", h);
    else
      cr_assert_eq(back, h, "f16 0x%04x -> %g -> 0x%04x", h, (double)f, back);
  }
}

Test(math, f16_known_values) {
  cr_assert_eq(culoss__f16_to_f32(0x3c00), 1.0f);
  cr_assert_eq(culoss__f16_to_f32(0x7bff), 65504.0f);
  cr_assert_eq(culoss__f16_to_f32(0x0001), 0x1p-24f);
  cr_assert_eq(culoss__f16_to_f32(0x8400), -0x1p-14f);
  cr_assert_eq(culoss__f32_to_f16(65519.0f), 0x7bff);        /* below the inf threshold */
  cr_assert_eq(culoss__f32_to_f16(65520.0f), 0x7c00);        /* ties away to inf */
  cr_assert_eq(culoss__f32_to_f16(0x1p-25f), 0x0000);        /* tie: even is 0 */
  cr_assert_eq(culoss__f32_to_f16(3 * 0x1p-26f), 0x0001);    /* above half of 2^-24 */
  cr_assert_eq(culoss__f32_to_f16(3 * 0x1p-25f), 0x0002);    /* tie 1.5 ulp: to even 2 */
  cr_assert_eq(culoss__f32_to_f16(1.0f + 0x1p-11f), 0x3c00); /* tie to even */
  cr_assert_eq(culoss__f32_to_f16(1.0f + 3 * 0x1p-11f), 0x3c02);
  cr_assert_eq(culoss__f32_to_f16(-0.0f), 0x8000);
}

/* Property: the conversion returns the nearest fp16 value (ties to even). */
Test(math, f16_is_nearest_on_random_floats) {
  rng_t r = rng_seeded(7);
  for (int i = 0; i < 200000; i++) {
    float f = (float)(rng_normal(&r) * pow(2.0, rng_int(&r, -26, 17)));
    uint16_t h = culoss__f32_to_f16(f);
    double v = culoss__f16_to_f32(h);
    double err = fabs((double)f - v);
    uint16_t mag = h & 0x7fff;
    if (mag == 0x7c00) { /* inf: only past the overflow threshold */
      cr_assert(fabs((double)f) >= 65520.0, "%g overflowed", (double)f);
      continue;
    }
    uint16_t up = (uint16_t)(h + 1), dn = (uint16_t)(h - 1);
    if ((up & 0x7fff) < 0x7c00)
      cr_assert(err <= fabs((double)f - culoss__f16_to_f32(up)), "%g -> 0x%04x not nearest",
                (double)f, h);
    if (mag != 0)
      cr_assert(err <= fabs((double)f - culoss__f16_to_f32(dn)), "%g -> 0x%04x not nearest",
                (double)f, h);
  }
}

static double lse_ref(const float *v, int k) {
  double m = -INFINITY, s = 0.0;
  for (int i = 0; i < k; i++)
    if (v[i] > m) m = v[i];
  if (m == -INFINITY) return -INFINITY;
  for (int i = 0; i < k; i++) s += exp((double)v[i] - m);
  return m + log(s);
}

Test(math, lse_online_matches_double) {
  rng_t r = rng_seeded(11);
  for (int trial = 0; trial < 1000; trial++) {
    float v[64];
    int k = (int)rng_int(&r, 1, 64);
    for (int i = 0; i < k; i++) v[i] = (float)(rng_normal(&r) * (trial % 2 ? 30.0 : 1.0));
    if (k > 2) v[rng_int(&r, 0, k)] = -INFINITY;
    /* sequential adds */
    culoss__lse_state s = culoss__lse_empty();
    for (int i = 0; i < k; i++) s = culoss__lse_add(s, v[i]);
    /* and a split-merge, as threads of a block do */
    int cut = (int)rng_int(&r, 0, k);
    culoss__lse_state a = culoss__lse_empty(), b = culoss__lse_empty();
    for (int i = 0; i < cut; i++) a = culoss__lse_add(a, v[i]);
    for (int i = cut; i < k; i++) b = culoss__lse_add(b, v[i]);
    double ref = lse_ref(v, k);
    cr_assert(close_enough(culoss__lse_value(s), ref, 1e-5, 1e-6), "seq %g vs %g",
              (double)culoss__lse_value(s), ref);
    cr_assert(close_enough(culoss__lse_value(culoss__lse_merge(a, b)), ref, 1e-5, 1e-6));
  }
}

Test(math, lse_neg_inf_lanes_do_not_make_nan) {
  culoss__lse_state e = culoss__lse_empty();
  culoss__lse_state only_inf = culoss__lse_add(culoss__lse_add(e, -INFINITY), -INFINITY);
  cr_assert(!isnan(only_inf.s), "an all -inf lane must stay empty, not NaN");
  cr_assert_eq(culoss__lse_value(only_inf), -INFINITY);
  /* Merging an empty lane into a real one changes nothing. */
  culoss__lse_state one = culoss__lse_add(e, 2.0f);
  culoss__lse_state m1 = culoss__lse_merge(only_inf, one);
  culoss__lse_state m2 = culoss__lse_merge(one, only_inf);
  cr_assert_float_eq(culoss__lse_value(m1), 2.0f, 1e-6);
  cr_assert_float_eq(culoss__lse_value(m2), 2.0f, 1e-6);
  cr_assert(!isnan(culoss__lse_merge(e, e).s));
}

Test(math, lse_nan_and_pos_inf_propagate) {
  culoss__lse_state s = culoss__lse_add(culoss__lse_add(culoss__lse_empty(), 1.0f), NAN);
  s = culoss__lse_add(s, 3.0f);
  cr_assert(isnan(culoss__lse_value(s)), "NaN in a row makes the row NaN");
  s = culoss__lse_add(culoss__lse_empty(), NAN);
  s = culoss__lse_merge(s, culoss__lse_add(culoss__lse_empty(), -INFINITY));
  cr_assert(isnan(culoss__lse_value(s)), "NaN survives a merge with an empty lane");
  s = culoss__lse_add(culoss__lse_add(culoss__lse_empty(), 1.0f), INFINITY);
  cr_assert(isnan(culoss__lse_value(s)), "+inf gives NaN (inf - inf), as PyTorch");
}

Test(math, softcap_and_its_derivative) {
  const float cap = 30.0f;
  cr_assert_eq(culoss__softcap(1.5f, 0.0f), 1.5f, "cap 0 is off");
  cr_assert_float_eq(culoss__softcap(1000.0f, cap), cap, 1e-4);
  cr_assert_float_eq(culoss__softcap(-1000.0f, cap), -cap, 1e-4);
  cr_assert_float_eq(culoss__softcap(-INFINITY, cap), -cap, 1e-4);
  for (float x = -80.0f; x <= 80.0f; x += 3.7f) {
    double h = 1e-3;
    double fd = (cap * tanh((x + h) / cap) - cap * tanh((x - h) / cap)) / (2 * h);
    float d = culoss__softcap_grad(culoss__softcap(x, cap), cap);
    cr_assert(close_enough(d, fd, 1e-5, 1e-4), "x=%g: %g vs %g", (double)x, (double)d, fd);
  }
  cr_assert_eq(culoss__softcap_grad(5.0f, 0.0f), 1.0f);
}

Test(math, ce_grad_closed_form) {
  /* logits {1, 2, 3}, target 2: lse = 3 + log(e^-2 + e^-1 + 1). */
  const double log_s = log(exp(-2.0) + exp(-1.0) + 1.0), lse = 3.0 + log_s;
  const float x[3] = {1.0f, 2.0f, 3.0f};
  for (int j = 0; j < 3; j++) {
    double p = exp(x[j] - lse);
    const float rest = (float)(exp(-2.0) + exp(-1.0));
    float g = culoss__ce_grad(x[j], 3.0f, rest, culoss__ce_coef1(1.0f),
                              culoss__ce_coef1(j == 2 ? 1.0f : 0.0f), 0.5f, 1.0f);
    cr_assert(close_enough(g, 0.5 * (p - (j == 2)), 1e-7, 1e-5), "j=%d %g", j, (double)g);
  }
  /* a -inf logit has p = 0 exactly, whatever lse is */
  cr_assert_eq(culoss__ce_grad(-INFINITY, 3.0f, 0.6f, culoss__ce_coef1(1.0f),
                               culoss__ce_coef1(0.0f), 1.0f, 1.0f),
               0.0f);
  cr_assert_eq(culoss__ce_grad(-INFINITY, -INFINITY, 0.0f, culoss__ce_coef1(1.0f),
                               culoss__ce_coef1(0.25f), 2.0f, 1.0f),
               -0.5f);
  /* large logits: with lse split as m + log_s, p keeps fp32 accuracy at 1e4 */
  const float big[3] = {20000.0f, 19999.0f, 19990.0f};
  const double bls = log(1.0 + exp(-1.0) + exp(-10.0));
  for (int j = 0; j < 3; j++) {
    const double p = exp((double)big[j] - 20000.0 - bls);
    const float g = culoss__ce_grad(big[j], 20000.0f, (float)(exp(-1.0) + exp(-10.0)),
                                    culoss__ce_coef1(1.0f), culoss__ce_coef1(0.0f), 1.0f, 1.0f);
    cr_assert(close_enough(g, p, 1e-9, 2e-6), "j=%d: %.9g vs %.9g", j, (double)g, p);
  }
}

/* A confident row, in fp32: the top logit d ahead of k others. Its loss
   log(1 + k e^-d) and its gradient p - 1 = -k e^-d / (1 + k e^-d) keep fp32
   relative accuracy where 1 + s would round s away (d >= 17): online, with
   the values in any order and merged from lanes in any split. */
Test(math, confident_rows_keep_their_digits) {
  for (int d = 2; d <= 60; d += 2)
    for (int k = 1; k <= 5; k += 4)
      for (int pos = 0; pos <= k; pos++) {
        float v[6];
        for (int i = 0; i <= k; i++) v[i] = i == pos ? 5.0f + (float)d : 5.0f;
        culoss__lse_state seq = culoss__lse_empty(), a = culoss__lse_empty(),
                          b = culoss__lse_empty();
        for (int i = 0; i <= k; i++) seq = culoss__lse_add(seq, v[i]);
        for (int i = 0; i <= k; i++) {
          if (i % 2)
            a = culoss__lse_add(a, v[i]);
          else
            b = culoss__lse_add(b, v[i]);
        }
        const double r = k * exp(-(double)d), want_ls = log1p(r), want_g = -r / (1.0 + r);
        const culoss__lse_state sts[3] = {seq, culoss__lse_merge(a, b), culoss__lse_merge(b, a)};
        for (int q = 0; q < 3; q++) {
          const float ls = culoss__lse_log_s(sts[q]);
          const culoss__ce_coef one = culoss__ce_coef1(1.0f), zero = culoss__ce_coef1(0.0f);
          const float g = culoss__ce_grad(v[pos], sts[q].m, sts[q].s, one, one, 1.0f, 1.0f);
          const int other = pos == 0 ? 1 : 0; /* a non-top column: p = e^-d / (1 + r) */
          const float go = culoss__ce_grad(v[other], sts[q].m, sts[q].s, one, zero, 1.0f, 1.0f);
          const double want_go = exp(-(double)d) / (1.0 + r);
          cr_assert(fabs(go - want_go) <= 4e-7 * want_go, "d %d k %d pos %d q %d: %.9g vs %.9g", d,
                    k, pos, q, (double)go, want_go);
          cr_assert_eq(sts[q].m, 5.0f + (float)d);
          cr_assert(fabs(ls - want_ls) <= 4e-7 * want_ls, "d %d k %d pos %d q %d: %.9g vs %.9g", d,
                    k, pos, q, (double)ls, want_ls);
          cr_assert(fabs(g - want_g) <= 4e-7 * fabs(want_g), "d %d k %d pos %d q %d: %.9g vs %.9g",
                    d, k, pos, q, (double)g, want_g);
        }
      }
  /* ties: two values at the maximum, s counts the second */
  culoss__lse_state t = culoss__lse_add(culoss__lse_add(culoss__lse_empty(), 3.0f), 3.0f);
  cr_assert_eq(t.s, 1.0f);
  cr_assert_float_eq(culoss__lse_value(t), 3.0f + (float)log(2.0), 1e-6);
}

/* The fp32 elementwise helpers the kernels call, against the CPU backend's
   independent double-precision reference, on random valid inputs. */
#include "ew_call.h"

static float hd_eval(t_op op, float x, float y, float w, float pw, float param, float *d) {
  switch (op) {
  case T_BCE_LOGITS: return culoss__bce_logits(x, y, w, pw, d);
  case T_BCE: return culoss__bce_prob(x, y, w, d);
  case T_HINGE: return culoss__hinge(x, y, 1.0f, 0, d);
  case T_SQ_HINGE: return culoss__hinge(x, y, 1.0f, 1, d);
  case T_MSE: return culoss__mse(x, y, d);
  case T_L1: return culoss__l1(x, y, d);
  case T_HUBER: return culoss__huber(x, y, param, d);
  case T_SMOOTH_L1: return culoss__smooth_l1(x, y, param, d);
  case T_KL: return culoss__kl_div(x, y, 0, d);
  case T_KL_LOG: return culoss__kl_div(x, y, 1, d);
  case T_HINGE_EMB: return culoss__hinge_embedding(x, y, param != 0 ? param : 1.0f, d);
  case T_SOFT_MARGIN: return culoss__soft_margin(x, y, d);
  case T_POISSON: return culoss__poisson_nll(x, y, 1e-8f, 1, d);
  case T_POISSON_FULL: return culoss__poisson_nll(x, y, 1e-8f, 2, d);
  default: return culoss__sigmoid_focal(x, y, 0.25f, param != 0 ? param : 2.0f, d);
  }
}

Test(math, elementwise_helpers_match_cpu_reference) {
  culoss_context *ctx;
  cr_assert_eq(culoss_create(&ctx, CULOSS_BACKEND_CPU, 0), CULOSS_OK);
  rng_t r = rng_seeded(23);
  enum { M = 2000 };
  static float x[M], y[M], w[M], pw[1], loss[M], g[M];
  for (int op = 0; op < T_NUM_OPS; op++) {
    ew_fill(&r, (t_op)op, x, y, M, 0.0);
    for (int i = 0; i < M; i++) w[i] = (float)(0.5 + rng_uniform(&r));
    pw[0] = 2.5f;
    const float param = op == T_HUBER       ? 0.8f
                        : op == T_SMOOTH_L1 ? 1.2f
                        : op == T_FOCAL     ? 0.7f
                                            : 0.0f;
    t_opts t = {CULOSS_REDUCTION_NONE, op <= T_BCE ? w : NULL, op == T_BCE_LOGITS ? pw : NULL,
                param};
    cr_assert_eq(ew_call(ctx, (t_op)op, &t, M, 1, CULOSS_F32, x, y, loss, g, NULL), CULOSS_OK);
    for (int i = 0; i < M; i++) {
      float d;
      float l = hd_eval((t_op)op, x[i], y[i], op <= T_BCE ? w[i] : 1.0f, pw[0], param, &d);
      cr_assert(close_enough(l, loss[i], 1e-6, 1e-5), "%s: x=%g y=%g loss %.9g vs %.9g",
                t_op_name[op], (double)x[i], (double)y[i], (double)l, (double)loss[i]);
      cr_assert(close_enough(d, g[i], 1e-6, 1e-5), "%s: x=%g y=%g grad %.9g vs %.9g", t_op_name[op],
                (double)x[i], (double)y[i], (double)d, (double)g[i]);
    }
  }
  culoss_destroy(ctx);
}

/* Target loading, the NaN, and the target coefficient b of culoss__ce_grad,
   against their definitions written out here (these helpers are shared by
   the CPU reference and the kernels, so only such a test can see them). */
Test(math, targets_nan_and_target_coefficients) {
  const int32_t t32[3] = {7, -100, 2147483647};
  const int64_t t64[3] = {(int64_t)1 << 40, -1, 3};
  for (int i = 0; i < 3; i++) {
    cr_assert_eq(culoss__target_at(t32, CULOSS_I32, i), (int64_t)t32[i]);
    cr_assert_eq(culoss__target_at(t64, CULOSS_I64, i), t64[i]);
  }
  cr_assert(isnan(culoss__nan()));
  const float w[5] = {0.5f, 2.0f, 0.0f, 1.0f, 3.0f};
  for (int64_t j = 0; j < 5; j++)
    for (int e = 0; e < 3; e++) {
      const float eps = e * 0.25f, tw = (1.0f - eps) * w[1];
      const float want_w = (j == 1 ? tw : 0.0f) + (eps > 0 ? eps / 5.0f * w[j] : 0.0f);
      const float want_1 = (j == 1 ? tw : 0.0f) + (eps > 0 ? eps / 5.0f : 0.0f);
      cr_assert(fabsf(culoss__ce_index_b(j, 1, tw, eps, 5, w) - want_w) <= 1e-7f, "j %d e %d",
                (int)j, e);
      cr_assert(fabsf(culoss__ce_index_b(j, 1, tw, eps, 5, NULL) - want_1) <= 1e-7f);
      const float y = 0.1f * (float)j;
      cr_assert(fabsf(culoss__ce_soft_b(w[j], y, eps, 5) - w[j] * ((1 - eps) * y + eps / 5)) <=
                1e-7f);
    }
  /* no class weight is read without smoothing (NULL would crash if it were) */
  cr_assert_eq(culoss__ce_index_b(3, 3, 0.75f, 0.0f, 5, (const float *)8), 0.75f);
}

/* The online entropy sum u = sum e^(x - m) (x - m), carried the way the
   kernel carries it (values one at a time, states merged in a tree) against
   H = lse - sum p x in double, at small, large-offset and -inf values. */
Test(math, entropy_online_matches_double) {
  rng_t r = rng_seeded(77);
  for (int trial = 0; trial < 200; trial++) {
    const int nv = 1 + (int)rng_int(&r, 0, 300);
    const double off = trial % 3 == 1 ? 1e4 : (trial % 3 == 2 ? -3e3 : 0.0);
    float x[300];
    for (int i = 0; i < nv; i++) {
      x[i] = (float)(off + 3.0 * rng_normal(&r));
      if (trial % 4 == 3 && i % 3 == 0 && i > 0) x[i] = -INFINITY;
    }
    /* four lanes, each online over its values, then merged */
    culoss__lse_state st[4];
    float u[4];
    for (int l = 0; l < 4; l++) st[l] = culoss__lse_empty(), u[l] = 0.0f;
    for (int i = 0; i < nv; i++) {
      const int l = i % 4;
      const float m = fmaxf(st[l].m, x[i]);
      u[l] = culoss__ent_rebase(u[l], culoss__lse_total(st[l]), st[l].m, m) +
             culoss__ent_term(culoss__exp_diff(x[i], m), x[i], m);
      st[l] = culoss__lse_add(st[l], x[i]);
    }
    for (int step = 1; step < 4; step *= 2)
      for (int l = 0; l + step < 4; l += 2 * step) {
        const culoss__lse_state mm = culoss__lse_merge(st[l], st[l + step]);
        u[l] =
            culoss__ent_rebase(u[l], culoss__lse_total(st[l]), st[l].m, mm.m) +
            culoss__ent_rebase(u[l + step], culoss__lse_total(st[l + step]), st[l + step].m, mm.m);
        st[l] = mm;
      }
    double m = -INFINITY, s = 0.0, px = 0.0;
    for (int i = 0; i < nv; i++) m = fmax(m, x[i]);
    for (int i = 0; i < nv; i++)
      if (x[i] != -INFINITY) s += exp((double)x[i] - m), px += exp((double)x[i] - m) * (x[i] - m);
    const double want = log(s) - px / s;
    const float got = culoss__ent_value(u[0], st[0]);
    cr_assert(fabs(got - want) <= 1e-4 + 1e-5 * fabs(want), "trial %d n %d: %.9g vs %.9g", trial,
              nv, (double)got, want);
  }
}
