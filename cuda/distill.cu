/*
 * distill.cu: distillation between student and teacher logits (generalized
 * JSD, TVD, and the hard cross-entropy term), and its fused linear form.
 *
 * distill_kernel: a block per row pair (grid-stride over rows). Pass 1
 * streams both rows once with 16-byte loads, keeps an online log-sum-exp of
 * t / T and s / T (and of s itself for a hard term at T != 1), and parks
 * the raw rows in shared memory while they fit. One fixed-order block
 * reduction gives the three distributions. Pass 2 takes the rows from
 * shared memory (re-reading the part that did not fit) and sums the row's
 * terms in fp64: the loss, and the row constant the gradient needs
 * (reverse KL: the loss; JSD: KL(Q || M); TVD: the sums of Q by the sign
 * of Q - P, so that g_j - sum Q g = (1/2) sum_k Q_k (sign_j - sign_k) is a
 * sum of same-signed terms).
 * Pass 3 writes the gradient (forward KL's, Q - P, needs no row constant
 * and is written in pass 2). Traffic: one read of s and t and one write of
 * the gradient when 2 v sizeof(T) fits the block's shared memory (bf16
 * V = 56K on an H100); a longer pair, on sm_90, is split over a cluster of
 * 2..8 blocks that each keep their slice (distill_cluster_kernel: bf16
 * V = 450K, fp32 225K read once); past that, or without clusters, the rest
 * of each row or slice is read twice more, from L2 if it stays there
 * (bench/NOTES.md, "Distillation").
 *
 * Every probability is formed from the row maximum in the logits' own
 * units, (x - m) / T rounded once, and the sum kept apart from the top's 1
 * (culoss__lse_state, log1p): confident rows keep fp32 accuracy, and two
 * probabilities near 1 are subtracted as (Q - 1) - (P - 1).
 *
 * Reductions: each block sums its rows' losses in row order into a per-block
 * partial, the shared final kernel sums the partials in order (reduce.cuh);
 * BATCHMEAN's kept-row count comes from a small fixed-grid kernel first, so
 * the gradient is scaled in the same pass. Deterministic, no float atomics.
 * A hard-term label out of range gives a NaN row loss, a zero gradient row
 * and the deferred TARGET_OUT_OF_RANGE flag.
 */
#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <string.h>

#include <cooperative_groups.h>
#include <cub/block/block_reduce.cuh>

#include "backend.h"
#include "dtype.cuh"
#include "gemm.cuh"
#include "launch.cuh"
#include "loss_math.h"
#include "reduce.cuh"

namespace culoss_dev {
namespace {

constexpr int DPREP_THREADS = 256;
constexpr size_t DSTATIC_RESERVE = 4096; /* static shared memory beside the row cache */

struct dparams {
  int64_t n, v, ld_s, ld_t;
  const void *s, *t, *labels;
  int ttype;
  int64_t ignore_index;
  float *loss;
  void *grad;
  const float *grad_loss;
  int tvd;
  float beta, T, w_soft, w_hard;
  double inv_t; /* 1 / T */
  float inv_tf; /* the same in fp32 */
  int reduction;
  int rows_out; /* 1: loss[row] for every reduction (linear form: per-row losses) */
  divisor_src div;
  int64_t cache_vecs; /* packs of each row kept in shared memory */
  culoss__scratch *scratch;
  /* the hard term's cross-entropy options (culoss_distill_options.hard_options) */
  const float *cw; /* class weights [v] or NULL */
  float eps, z;    /* label smoothing, z-loss */
  int wsum_blocks; /* > 0: W = the sum of cw from the prep kernel's partials */
};

/* The three online states of a row: a = t / T, b = s / T, h = s (hard). */
struct dstate {
  culoss__lse_state a, b, h;
};

/* culoss__lse_merge of values divided by T > 0, kept in their own units:
   m is the raw maximum, s sums exp((x - m) / T) without the top's 1. The
   argument is (x - m) * (1 / T): no IEEE division (a called subroutine in
   SASS) per element; the extra rounding moves each term by |x - m| / T
   times 2^-24, relative. */
__device__ __forceinline__ culoss__lse_state merge_t(culoss__lse_state a, culoss__lse_state b,
                                                     float inv_t) {
  culoss__lse_state r;
  r.m = fmaxf(a.m, b.m);
  if (r.m == -INFINITY) {
    r.s = a.s + b.s;
    return r;
  }
  const culoss__lse_state top = a.m == r.m ? a : b, o = a.m == r.m ? b : a;
  r.s = top.s + culoss__lse_total(o) * (o.m == -INFINITY ? 0.0f : expf((o.m - r.m) * inv_t));
  return r;
}
__device__ __forceinline__ culoss__lse_state add_t(culoss__lse_state a, float x, float inv_t) {
  culoss__lse_state b;
  b.m = x;
  b.s = x == x ? 0.0f : x;
  return merge_t(a, b, inv_t);
}

struct dstate_merge {
  float inv_t;
  __device__ __forceinline__ dstate operator()(const dstate &x, const dstate &y) const {
    dstate r;
    r.a = merge_t(x.a, y.a, inv_t);
    r.b = merge_t(x.b, y.b, inv_t);
    r.h = culoss__lse_merge(x.h, y.h);
    return r;
  }
};

/* A finished distribution: maximum, rest, lam = log1p(rest) in double
   (NaN: none). */
struct dist {
  float m, rest, inv_total; /* inv_total = 1 / (1 + rest) */
  double lam;
};
__device__ __forceinline__ dist finish(culoss__lse_state st) {
  dist d;
  d.m = st.m;
  d.rest = culoss__lse_rest(st); /* NaN for a +inf maximum */
  d.inv_total = 1.0f / (1.0f + d.rest);
  const bool ok = st.m > -INFINITY && d.rest == d.rest;
  d.lam = ok ? log1p((double)d.rest) : (double)culoss__nan();
  return d;
}

/* p, log p and p - 1 of value x (inv_t = 1 / T). log p is formed in double:
   (x - m) / T - lam, whose terms reach |log p| ~ 100 where the loss and the
   gradient need it to ~1e-8 relative (reverse KL's log Q - log P - l, the
   mixture's log ratios); p itself in fp32 from the rounded argument. */
__device__ __forceinline__ void prob(const dist &d, float x, double inv_t, float &p, double &lp,
                                     float &pm1) {
  if (d.lam != d.lam) {
    p = pm1 = (float)d.lam, lp = d.lam;
    return;
  }
  if (x == -INFINITY) {
    p = 0.0f, lp = -INFINITY, pm1 = -1.0f;
    return;
  }
  const double z = ((double)x - (double)d.m) * inv_t;
  lp = z - d.lam;
  p = expf((float)z) * d.inv_total;
  pm1 = (x == d.m && d.rest < 1.0f) ? -d.rest / (1.0f + d.rest) : p - 1.0f;
}

__device__ __forceinline__ float pdiff(float q, float qm1, float p, float pm1) {
  return (q > 0.5f || p > 0.5f) ? qm1 - pm1 : q - p;
}
/* log(P / M) and log(Q / M), M = beta P + (1 - beta) Q, 0 < beta < 1, from
   r = log P - log Q: -log1p((1 - beta) expm1(-r)) and -log1p(beta expm1(r)),
   accurate where P and Q are close (r small, the loss's terms nearly
   cancelling); for |r| >= 20, log M by its two-term log-sum-exp
   (host/distill_ref.c's). */
__device__ __forceinline__ void log_ratios(float beta, double lp, double lq, double &dpm,
                                           double &dqm) {
  const double r = lp - lq;
  if (fabs(r) < 20.0) {
    dpm = -(double)log1pf((1.0f - beta) * expm1f((float)-r));
    dqm = -(double)log1pf(beta * expm1f((float)r));
    return;
  }
  /* -inf where a probability is 0 */
  const double a = (double)logf(beta) + lp, b = (double)log1pf(-beta) + lq;
  const double hi = fmax(a, b), lo = fmin(a, b);
  if (a != a || b != b) {
    dpm = dqm = (double)culoss__nan();
    return;
  }
  const double lm = hi + (double)log1pf(expf((float)(lo - hi)));
  dpm = lp - lm, dqm = lq - lm;
}

/* The row's constants after pass 1. */
struct drow {
  dist P, Q, H;
  int kind; /* 0 TVD, 1 forward KL, 2 reverse KL, 3 JSD */
};

/* Pass 2's sums of a row (host/distill_ref.c's): a[0] the loss sum (TVD:
   sum |Q - P|; JSD: sum P (log P - log M)); JSD a[1] = sum Q (log Q - log M);
   TVD a[1..3] = the sums of Q where sign(Q - P) is +1, -1, 0 (each of
   non-negative terms: the gradient's row constant without cancellation);
   a[4] the hard term's smoothing sum, sum_c w_c (m - s_c) (non-negative
   terms, m the row maximum of s: culoss__sx_term's form). */
constexpr int DSUMS = 5;
struct dsum {
  double a[DSUMS];
};
struct dsum_add {
  __device__ __forceinline__ dsum operator()(const dsum &x, const dsum &y) const {
    dsum r;
#pragma unroll
    for (int k = 0; k < DSUMS; k++) r.a[k] = x.a[k] + y.a[k];
    return r;
  }
};

/* The hard term's per-row constants: (1 - eps) w_y, the coefficient of p_j
   beyond it ((eps / v) W + 2 z lse), and eps / v. */
struct dhard {
  float cy, a, ev;
};

__device__ __forceinline__ void terms(const dparams &p, const drow &r, float s, float t,
                                      dsum &acc) {
  float P, pm1, Q, qm1;
  double lp, lq;
  prob(r.P, t, p.inv_t, P, lp, pm1);
  prob(r.Q, s, p.inv_t, Q, lq, qm1);
  if (r.kind == 0) {
    const float d = pdiff(Q, qm1, P, pm1);
    /* constant indices (a computed one would put acc in local memory) */
    const double qd = d == d ? (double)Q : (double)d;
    acc.a[0] += (double)fabsf(d);
    acc.a[1] += d > 0.0f ? qd : 0.0;
    acc.a[2] += d < 0.0f ? qd : 0.0;
    acc.a[3] += d > 0.0f || d < 0.0f ? 0.0 : qd; /* 0, or NaN */
  } else if (r.kind == 1) {
    if (P != 0.0f) acc.a[0] += (double)P * (lp - lq);
  } else if (r.kind == 2) {
    if (Q != 0.0f) acc.a[0] += (double)Q * (lq - lp);
  } else {
    double dpm, dqm;
    log_ratios(p.beta, lp, lq, dpm, dqm);
    if (P != 0.0f) acc.a[0] += (double)P * dpm;
    if (Q != 0.0f) acc.a[1] += (double)Q * dqm;
  }
}

/* The row constants of the gradient: TVD k = {2 A- + A0, -(2 A+ + A0),
   A- - A+} by the element's sign; reverse KL k0 = the loss; JSD k0 =
   KL(Q || M). */
struct dconst {
  double k[3];
};

/* The gradient of one element: scale (w_soft g_div / T + w_hard g_hard),
   g_hard = (1 - eps) w_y (p_j - [j = y]) + ((eps / v) W + 2 z lse) p_j
   - (eps / v) w_j (culoss_cross_entropy's, p - 1 at y from the log1p
   form). */
__device__ __forceinline__ float grad_at(const dparams &p, const drow &r, float s, float t,
                                         int64_t j, int64_t y, const dconst &k, const dhard &hd,
                                         float scale) {
  float g = 0.0f;
  if (p.w_soft != 0.0f && (r.P.lam != r.P.lam || r.Q.lam != r.Q.lam)) {
    g = culoss__nan(); /* no distribution (a NaN or +inf logit, or all -inf): a NaN row */
  } else if (p.w_soft != 0.0f) {
    float P, pm1, Q, qm1, gd;
    double lp, lq;
    prob(r.P, t, p.inv_t, P, lp, pm1);
    prob(r.Q, s, p.inv_t, Q, lq, qm1);
    if (r.kind == 0) { /* (1/2) Q_j sum_k Q_k (sign_j - sign_k) */
      const float d = pdiff(Q, qm1, P, pm1);
      gd = d == d ? 0.5f * Q * (float)(d > 0.0f ? k.k[0] : (d < 0.0f ? k.k[1] : k.k[2])) : d;
    } else if (r.kind == 1)
      gd = pdiff(Q, qm1, P, pm1);
    else if (r.kind == 2)
      gd = Q == 0.0f ? 0.0f : Q * (float)((lq - lp) - k.k[0]);
    else {
      double dpm, dqm;
      log_ratios(p.beta, lp, lq, dpm, dqm);
      gd = Q == 0.0f ? 0.0f : (1.0f - p.beta) * Q * (float)(dqm - k.k[0]);
    }
    g = p.w_soft * gd * p.inv_tf;
  }
  if (p.w_hard != 0.0f) {
    float H, hm1;
    double lh;
    prob(r.H, s, 1.0, H, lh, hm1);
    float gh = hd.cy * (j == y ? hm1 : H);
    if (hd.a != 0.0f) gh += hd.a * H;
    if (hd.ev != 0.0f) gh -= hd.ev * (p.cw ? p.cw[j] : 1.0f);
    g += p.w_hard * gh;
  }
  return scale * g;
}

/* Kept-row count of BATCHMEAN with labels (count_rows) and the hard term's
   W = sum of class weights (p.cw with smoothing): one partial of each per
   block, in a fixed order. */
__global__ void __launch_bounds__(DPREP_THREADS) distill_prep_kernel(dparams p, int count_rows) {
  const int64_t stride = (int64_t)gridDim.x * DPREP_THREADS;
  double d = 0.0, w = 0.0;
  if (count_rows)
    for (int64_t i = (int64_t)blockIdx.x * DPREP_THREADS + threadIdx.x; i < p.n; i += stride)
      d += culoss__target_at(p.labels, p.ttype, i) != p.ignore_index ? 1.0 : 0.0;
  if (p.wsum_blocks)
    for (int64_t j = (int64_t)blockIdx.x * DPREP_THREADS + threadIdx.x; j < p.v; j += stride)
      w += (double)p.cw[j];
  store_block_sum<DPREP_THREADS>(d, &p.scratch->prep_denom[blockIdx.x]);
  store_block_sum<DPREP_THREADS>(w, &p.scratch->prep_wsum[blockIdx.x]);
}

/* The cluster form's cross-block pieces. dcl<false>: one block per row (no
   cluster). dcl<true> (sm_90): the cluster's rank and size, its barrier,
   and another block's copy of a shared-memory slot. */
template <bool CL> struct dcl {
  __device__ __forceinline__ unsigned rank() const { return 0; }
  __device__ __forceinline__ unsigned size() const { return 1; }
  __device__ __forceinline__ void sync() const {}
  template <typename X> __device__ __forceinline__ X *at(X *slot, unsigned) const { return slot; }
};
template <> struct dcl<true> {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
  /* never launched below sm_90: the launch checks the context's cluster_launch */
  __device__ __forceinline__ unsigned rank() const {
    __trap();
    return 0;
  }
  __device__ __forceinline__ unsigned size() const {
    __trap();
    return 1;
  }
  __device__ __forceinline__ void sync() const { __trap(); }
  template <typename X> __device__ __forceinline__ X *at(X *slot, unsigned) const {
    __trap();
    return slot;
  }
#else
  __device__ __forceinline__ unsigned rank() const {
    return cooperative_groups::this_cluster().block_rank();
  }
  __device__ __forceinline__ unsigned size() const {
    return cooperative_groups::this_cluster().num_blocks();
  }
  __device__ __forceinline__ void sync() const { cooperative_groups::this_cluster().sync(); }
  template <typename X> __device__ __forceinline__ X *at(X *slot, unsigned q) const {
    return cooperative_groups::this_cluster().map_shared_rank(slot, q);
  }
#endif
};

/* The cluster form's slots, at the start of dynamic shared memory: a row's
   three states and its five sums, each for two row parities (a block can
   run one row ahead of the others, never two: the next barrier waits). */
constexpr size_t DSLOT = 64;
constexpr size_t DCL_SLOTS = 4 * DSLOT;
constexpr int DCL_MAX = 8;
static_assert(sizeof(dstate) <= DSLOT && sizeof(dsum) <= DSLOT, "a slot holds a row's results");

/* One row pair per block (CL false), or per cluster of K blocks (CL true),
   rows grid-strided. Under CL, block rank r owns packs [r P, (r + 1) P) of
   the row (P = ceil(packs / K)) and keeps them in its shared memory, so a
   row of up to K times one block's cache is read from DRAM once. After
   each of the two block reductions, each block parks its result in its
   slot and, after a cluster barrier, every block merges the K results
   through distributed shared memory in rank order: bitwise the same row
   constants in every block. Rank 0 writes the row's loss; every block
   writes its slice's gradient. Static shared memory is only used between
   two cluster barriers (the emulator's blocks of a cluster share it). */
template <typename T, int BLOCK, int VEC, bool CL>
__device__ __forceinline__ void distill_rows(const dparams &p, unsigned char *smem) {
  typedef cub::BlockReduce<dstate, BLOCK> reduce3_t;
  typedef cub::BlockReduce<dsum, BLOCK> reduce4_t;
  __shared__ union {
    typename reduce3_t::TempStorage r3;
    typename reduce4_t::TempStorage r4;
  } tmp;
  __shared__ dstate bc_state;
  __shared__ dsum bc_sum;
  __shared__ float bc_wsum;
  typedef pack<T, VEC> pk;
  pk *cache_s = reinterpret_cast<pk *>(smem + (CL ? DCL_SLOTS : 0));
  pk *cache_t = cache_s + p.cache_vecs;
  const dcl<CL> cl;
  const unsigned rank = cl.rank(), K = cl.size();
  const bool lead = rank == 0; /* writes the row's loss */
  const int64_t npk = p.v / VEC, per = (npk + K - 1) / K;
  const int64_t k0 = (int64_t)rank * per < npk ? (int64_t)rank * per : npk;
  const int64_t k1 = k0 + per < npk ? k0 + per : npk;
  const bool reduced = p.reduction != CULOSS_REDUCTION_NONE;
  const bool partials = reduced && !p.rows_out;
  const float rscale = reduced ? reduced_grad_scale(p.reduction, p.grad_loss, p.div) : 0.0f;
  const bool hard_same = p.T == 1.0f; /* the hard term's distribution is Q's */
  const dstate_merge op{p.inv_tf};
  drow r;
  r.kind = p.tvd ? 0 : (p.beta == 0.0f ? 1 : (p.beta == 1.0f ? 2 : 3));
  double block_loss = 0.0;
  /* the hard term's smoothing: W once per block (every block the same value) */
  const bool smooth = p.w_hard != 0.0f && p.eps > 0.0f;
  if (threadIdx.x == 0)
    bc_wsum = p.wsum_blocks ? (float)sum_in_order(p.scratch->prep_wsum, p.wsum_blocks) : (float)p.v;
  __syncthreads();
  const float wsum = bc_wsum;
  int parity = 0;

  for (int64_t row = blockIdx.x / K; row < p.n; row += gridDim.x / K, parity ^= 1) {
    const T *S = static_cast<const T *>(p.s) + row * p.ld_s;
    const T *Tt = static_cast<const T *>(p.t) + row * p.ld_t;
    T *G = p.grad ? static_cast<T *>(p.grad) + row * p.ld_s : nullptr;
    const int64_t y = p.labels ? culoss__target_at(p.labels, p.ttype, row) : 0;
    const bool ignored = p.labels && y == p.ignore_index;
    const bool bad = !ignored && p.w_hard != 0.0f && (y < 0 || y >= p.v);
    const float scale = reduced ? rscale : (p.grad_loss ? p.grad_loss[row] : 1.0f);
    if (ignored || bad) { /* the same for every block of a cluster: no barrier */
      if (G)
        for (int64_t k = k0 + threadIdx.x; k < k1; k += BLOCK) {
          pk z;
#pragma unroll
          for (int e = 0; e < VEC; e++) z.v[e] = from_f32<T>(0.0f);
          store_pack<T, VEC>(G + k * VEC, z);
        }
      if (threadIdx.x == 0 && lead) {
        if (bad) atomicOr(&p.scratch->error_flag, CULOSS__FLAG_TARGET);
        const float l = bad ? culoss__nan() : 0.0f;
        if (!partials)
          p.loss[row] = l;
        else
          block_loss += (double)l;
      }
      continue;
    }
    /* the hard term's target logit (the loss's thread only), read before any
       block's gradient is written: the reductions' barriers come first */
    const float sy = threadIdx.x == 0 && lead && p.w_hard != 0.0f ? to_f32(ld_elem(S + y)) : 0.0f;

    /* passes 2 and 3: pack k of both rows, from the cache where it is */
    const auto pair_at = [&](int64_t k, pk &vs, pk &vt) {
      const bool c = k - k0 < p.cache_vecs;
      vs = c ? cache_s[k - k0] : load_pack<T, VEC>(S + k * VEC);
      vt = c ? cache_t[k - k0] : load_pack<T, VEC>(Tt + k * VEC);
    };

    /* ---- pass 1: the three distributions ---- */
    dstate st;
    st.a = st.b = st.h = culoss__lse_empty();
    for (int64_t k = k0 + threadIdx.x; k < k1; k += BLOCK) {
      const pk vs = load_pack<T, VEC>(S + k * VEC), vt = load_pack<T, VEC>(Tt + k * VEC);
      if (k - k0 < p.cache_vecs) cache_s[k - k0] = vs, cache_t[k - k0] = vt;
#pragma unroll
      for (int e = 0; e < VEC; e++) {
        const float xs = to_f32(vs.v[e]), xt = to_f32(vt.v[e]);
        st.a = add_t(st.a, xt, p.inv_tf);
        st.b = add_t(st.b, xs, p.inv_tf);
        if (p.w_hard != 0.0f && !hard_same) st.h = culoss__lse_add(st.h, xs);
      }
    }
    {
      const dstate red = reduce3_t(tmp.r3).Reduce(st, op);
      if (threadIdx.x == 0) bc_state = red;
      __syncthreads();
      st = bc_state;
    }
    if (CL) { /* the K slices' states, merged in rank order */
      dstate *slot = reinterpret_cast<dstate *>(smem + DSLOT * (size_t)parity);
      if (threadIdx.x == 0) *slot = st;
      cl.sync();
      st = *cl.at(slot, 0);
      for (unsigned q = 1; q < K; q++) st = op(st, *cl.at(slot, q));
    }
    r.P = finish(st.a);
    r.Q = finish(st.b);
    r.H = hard_same ? r.Q : finish(st.h);
    /* the hard term's constants (culoss_cross_entropy's row, host/cross_entropy_ref.c) */
    const double lse_h = (double)r.H.m + r.H.lam;
    dhard hd{0.0f, 0.0f, 0.0f};
    if (p.w_hard != 0.0f) {
      hd.cy = (1.0f - p.eps) * (p.cw ? p.cw[y] : 1.0f);
      hd.ev = smooth ? p.eps / (float)p.v : 0.0f;
      hd.a = (smooth ? hd.ev * wsum : 0.0f) + (p.z != 0.0f ? 2.0f * p.z * (float)lse_h : 0.0f);
    }

    /* ---- pass 2: the row's sums (forward KL: the gradient too) ---- */
    const bool grad_in_2 = G && (r.kind == 1 || p.w_soft == 0.0f);
    const bool sums = p.w_soft != 0.0f || smooth;
    const dconst k0c = {{0.0, 0.0, 0.0}};
    dsum acc = {{0.0, 0.0, 0.0, 0.0, 0.0}};
    for (int64_t k = k0 + threadIdx.x; k < k1; k += BLOCK) {
      pk vs, vt;
      pair_at(k, vs, vt);
      pk out;
#pragma unroll
      for (int e = 0; e < VEC; e++) {
        const float xs = to_f32(vs.v[e]), xt = to_f32(vt.v[e]);
        if (p.w_soft != 0.0f) terms(p, r, xs, xt, acc);
        if (smooth) { /* w_c (m - s_c): +inf for a -inf logit (NaN at w_c = 0, as torch) */
          const double wc = p.cw ? (double)p.cw[k * VEC + e] : 1.0;
          acc.a[4] += xs == -INFINITY ? wc * INFINITY : wc * ((double)r.H.m - (double)xs);
        }
        if (grad_in_2)
          out.v[e] = from_f32<T>(grad_at(p, r, xs, xt, k * VEC + e, y, k0c, hd, scale));
      }
      if (grad_in_2) store_pack<T, VEC>(G + k * VEC, out);
    }
    if (sums) { /* one fixed-order reduction of the five sums */
      const dsum red = reduce4_t(tmp.r4).Reduce(acc, dsum_add());
      if (threadIdx.x == 0) bc_sum = red;
      __syncthreads();
      acc = bc_sum;
      if (CL) { /* the K slices' sums, added in rank order */
        dsum *slot = reinterpret_cast<dsum *>(smem + DSLOT * (size_t)(2 + parity));
        if (threadIdx.x == 0) *slot = acc;
        cl.sync();
        acc = *cl.at(slot, 0);
        for (unsigned q = 1; q < K; q++) acc = dsum_add()(acc, *cl.at(slot, q));
      }
    }
    double div = 0.0;
    dconst kc = k0c;
    if (p.w_soft != 0.0f) {
      if (r.kind == 0) {
        div = 0.5 * acc.a[0];
        kc.k[0] = 2.0 * acc.a[2] + acc.a[3];
        kc.k[1] = -(2.0 * acc.a[1] + acc.a[3]);
        kc.k[2] = acc.a[2] - acc.a[1];
      } else if (r.kind == 3) {
        div = (double)p.beta * acc.a[0] + (1.0 - (double)p.beta) * acc.a[1];
        kc.k[0] = acc.a[1];
      } else {
        div = acc.a[0];
        kc.k[0] = acc.a[0];
      }
    }

    /* ---- pass 3: the gradient ---- */
    if (G && !grad_in_2)
      for (int64_t k = k0 + threadIdx.x; k < k1; k += BLOCK) {
        pk vs, vt;
        pair_at(k, vs, vt);
        pk out;
#pragma unroll
        for (int e = 0; e < VEC; e++)
          out.v[e] = from_f32<T>(
              grad_at(p, r, to_f32(vs.v[e]), to_f32(vt.v[e]), k * VEC + e, y, kc, hd, scale));
        store_pack<T, VEC>(G + k * VEC, out);
      }

    if (threadIdx.x == 0 && lead) {
      double l = (double)p.w_soft * div;
      if (p.w_hard != 0.0f) { /* lse(s) - s_y = (m - s_y) + log1p(rest) */
        double h = (double)hd.cy * ((double)culoss__scaled_diff(1.0f, r.H.m, sy) + r.H.lam);
        if (smooth) h += (double)p.eps / (double)p.v * (acc.a[4] + (double)wsum * r.H.lam);
        if (p.z != 0.0f) h += (double)p.z * lse_h * lse_h;
        l += (double)p.w_hard * h;
      }
      if (!partials)
        p.loss[row] = (float)l;
      else
        block_loss += l;
    }
    /* the next row's cache writes wait for every thread's reads */
    __syncthreads();
  }
  cl.sync(); /* no block's shared memory goes while another may read it */
  if (partials && threadIdx.x == 0) p.scratch->partial_loss[blockIdx.x] = block_loss;
}

template <typename T, int BLOCK, int VEC>
__global__ void __launch_bounds__(BLOCK) distill_kernel(dparams p) {
  CULOSS_DYNAMIC_SMEM(smem);
  distill_rows<T, BLOCK, VEC, false>(p, smem);
}

/* Rows too long for one block's shared memory, split over a cluster. */
template <typename T, int BLOCK, int VEC>
__global__ void __launch_bounds__(BLOCK) distill_cluster_kernel(dparams p) {
  CULOSS_DYNAMIC_SMEM(smem);
  distill_rows<T, BLOCK, VEC, true>(p, smem);
}

/* The threads of a row's block, by v (not yet tuned on a GPU). Not 1024:
   its 64-register cap spilled the 16-bit pack loops (sm_90 SASS, CUDA 13:
   48/40 bytes at 8 sites in the inner loop); 512 threads get 128. */
inline int block_for(int64_t v) { return v <= 2048 ? 128 : (v <= 16384 ? 256 : 512); }

template <typename T, int BLOCK, int VEC>
culoss_status launch_main_as(culoss_context *ctx, dparams p, cudaStream_t s, int64_t *grid) {
  const size_t per = 2 * sizeof(pack<T, VEC>);
  const size_t avail = ctx->smem_optin > DSTATIC_RESERVE ? ctx->smem_optin - DSTATIC_RESERVE : 0;
  const int64_t npk = p.v / VEC;
  int64_t cv = (int64_t)(avail / per);
  if (cv > npk) cv = npk;
  if (ctx->ce_cache_cap != SIZE_MAX && (size_t)cv * per > ctx->ce_cache_cap)
    cv = (int64_t)(ctx->ce_cache_cap / per);
  /* A row pair too long for one block's cache, on a GPU with clusters
     (sm_90; culoss_cross_entropy's CULOSS_CE_CLUSTER knob): K blocks, each
     caching its 1/K, K as small as holds the pair (2..8; longer pairs
     re-read the rest of each slice). Not when the grid limit is below K. */
  if constexpr (BLOCK == 512) {
    size_t budget = avail > DCL_SLOTS ? avail - DCL_SLOTS : 0;
    if (ctx->ce_cache_cap < budget) budget = ctx->ce_cache_cap;
    const int64_t fit = (int64_t)(budget / per);
    const int64_t K = cluster_blocks(npk, fit, DCL_MAX);
    if (cv < npk && cluster_ok(ctx, K)) {
      const int64_t slice = (npk + K - 1) / K;
      dparams q = p;
      q.cache_vecs = slice < fit ? slice : fit;
      const size_t smem = DCL_SLOTS + (size_t)q.cache_vecs * per;
      void (*k)(dparams) = distill_cluster_kernel<T, BLOCK, VEC>;
      CU_TRY(cudaFuncSetAttribute(reinterpret_cast<const void *>(k),
                                  cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem),
             "cudaFuncSetAttribute(distill_cluster_kernel)");
      *grid = cluster_grid(ctx, K, p.n);
      const cudaError_t e =
          launch_cluster(k, dim3((unsigned)*grid), dim3(BLOCK), smem, s, (unsigned)K, q);
      if (e == cudaSuccess) return CULOSS_OK;
      if (e != cudaErrorLaunchOutOfResources)
        return culoss__cuda_status(e, "launch of distill_cluster_kernel");
      /* K blocks of this much shared memory cannot be resident together
         here (a partitioned GPU): one block per row. Not sticky; cleared. */
      (void)cudaGetLastError();
    }
  }
  p.cache_vecs = cv;
  const size_t smem = (size_t)cv * per;
  void (*k)(dparams) = distill_kernel<T, BLOCK, VEC>;
  CU_TRY(cudaFuncSetAttribute(reinterpret_cast<const void *>(k),
                              cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem),
         "cudaFuncSetAttribute(distill_kernel)");
  *grid = capped_grid(ctx, p.n);
  CU_TRY(launch(k, dim3((unsigned)*grid), dim3(BLOCK), smem, s, p), "launch of distill_kernel");
  return CULOSS_OK;
}

template <typename T, int VEC>
culoss_status launch_main_vec(culoss_context *ctx, const dparams &p, cudaStream_t s,
                              int64_t *grid) {
  const int b = block_for(p.v);
  if (b == 128) return launch_main_as<T, 128, VEC>(ctx, p, s, grid);
  if (b == 256) return launch_main_as<T, 256, VEC>(ctx, p, s, grid);
  return launch_main_as<T, 512, VEC>(ctx, p, s, grid);
}

/* The fused kernel over p.n rows: 16-byte packs when every row start is
   16-byte aligned and v fills whole packs, else one element at a time. */
template <typename T>
culoss_status launch_main(culoss_context *ctx, const dparams &p, cudaStream_t s, int64_t *grid) {
  constexpr int V = vec16<T>::value;
  const bool vec = p.v % V == 0 && p.ld_s % V == 0 && p.ld_t % V == 0 && aligned16(p.s) &&
                   aligned16(p.t) && aligned16(p.grad);
  return vec ? launch_main_vec<T, V>(ctx, p, s, grid) : launch_main_vec<T, 1>(ctx, p, s, grid);
}

dparams fill(culoss_context *ctx, const culoss__distill_args *a) {
  dparams p;
  memset(&p, 0, sizeof p);
  p.n = a->n, p.v = a->v, p.ld_s = a->ld_s, p.ld_t = a->ld_t;
  p.s = a->s, p.t = a->t, p.labels = a->labels, p.ttype = (int)a->ttype;
  p.ignore_index = a->o.ignore_index;
  p.loss = a->loss, p.grad = a->grad, p.grad_loss = a->grad_loss;
  p.tvd = a->o.divergence == CULOSS_DISTILL_TVD;
  p.beta = a->o.beta, p.T = a->o.temperature, p.inv_t = 1.0 / (double)a->o.temperature;
  p.inv_tf = (float)p.inv_t;
  p.w_soft = a->o.weight_soft, p.w_hard = a->o.weight_hard;
  p.reduction = (int)a->o.reduction;
  p.scratch = ctx->scratch;
  p.div = count_divisor(a->o.reduction == CULOSS_REDUCTION_MEAN ? (double)a->n * (double)a->v
                                                                : (double)a->n);
  if (a->o.weight_hard != 0.0f && a->o.hard_options != nullptr) {
    const culoss_cross_entropy_options *h = a->o.hard_options;
    p.cw = h->class_weight, p.eps = h->label_smoothing, p.z = h->z_loss;
  }
  return p;
}

/* First, over all n rows: BATCHMEAN with labels, the kept-row count; the
   hard term's smoothing with class weights, their sum W. */
culoss_status launch_prep(dparams &p, cudaStream_t s) {
  const bool count_rows =
      p.reduction == CULOSS_REDUCTION_BATCHMEAN && p.labels != nullptr && p.n > 0;
  const bool wsum = p.w_hard != 0.0f && p.eps > 0.0f && p.cw != nullptr && p.n > 0;
  if (!count_rows && !wsum) return CULOSS_OK;
  const int64_t rows = count_rows ? p.n : 0, cols = wsum ? p.v : 0;
  const int64_t work = rows > cols ? rows : cols; /* the longer of the two loops */
  int64_t blocks = (work + DPREP_THREADS - 1) / DPREP_THREADS;
  if (blocks > CULOSS_MAX_PREP_BLOCKS) blocks = CULOSS_MAX_PREP_BLOCKS;
  p.wsum_blocks = wsum ? (int)blocks : 0;
  CU_TRY(launch(distill_prep_kernel, dim3((unsigned)blocks), dim3(DPREP_THREADS), 0, s, p,
                (int)count_rows),
         "launch of distill_prep_kernel");
  if (count_rows) {
    p.div.prep = p.scratch->prep_denom;
    p.div.prep_count = (int)blocks;
  }
  return CULOSS_OK;
}

template <typename T> culoss_status run(culoss_context *ctx, const culoss__distill_args *a) {
  const cudaStream_t s = (cudaStream_t)ctx->stream;
  dparams p = fill(ctx, a);
  CL_TRY(launch_prep(p, s));
  int64_t grid = 0;
  if (a->n > 0) CL_TRY(launch_main<T>(ctx, p, s, &grid));
  if (a->o.reduction == CULOSS_REDUCTION_NONE) return CULOSS_OK;
  return culoss__finish_reduction(ctx, a->n > 0 ? (int)grid : 0, a->loss, (int)a->o.reduction,
                                  p.div);
}

/* The linear form: per block of rows, both logits blocks by cuBLAS, the
   fused kernel with the gradient written over the student's block, then
   the gradient GEMMs (cuda/linear_ce.cu's pass A, without pass B: a 16-bit
   grad_weight goes through the fp32 accumulator in the workspace). */
template <typename T> culoss_status run_linear(culoss_context *ctx, const culoss__distill_args *a) {
  const cudaStream_t stream = (cudaStream_t)ctx->stream;
  const cublasHandle_t h = (cublasHandle_t)ctx->cublas;
  const cudaDataType_t ty = cuda_type<T>();
  const int64_t n = a->n, ds = a->d_s, dt = a->d_t, v = a->v;
  const bool reduced = a->o.reduction != CULOSS_REDUCTION_NONE;
  const bool direct = a->gw_dtype == CULOSS_F32;
  const bool want_grad = a->grad_hidden || a->grad_weight || a->grad_bias;
  const size_t tsz = a->ttype == CULOSS_I32 ? 4 : 8;
  const size_t gsz = culoss__dtype_size(a->gw_dtype);
  const culoss__ld_layout L = culoss__ld_plan(n, ds, v, a->dtype, ctx->lce_block_bytes, !direct);
  unsigned char *ws = static_cast<unsigned char *>(a->workspace);
  T *S = reinterpret_cast<T *>(ws + L.off_s);
  T *Tt = reinterpret_cast<T *>(ws + L.off_t);
  float *row_loss = reinterpret_cast<float *>(ws + L.off_row_loss);
  float *bias_acc = reinterpret_cast<float *>(ws + L.off_bias_acc);
  float *gw_acc = reinterpret_cast<float *>(ws + L.off_gw_acc);
  const T *Hs = static_cast<const T *>(a->hs), *Ws = static_cast<const T *>(a->ws);
  const T *Bs = static_cast<const T *>(a->bs);
  const T *Ht = static_cast<const T *>(a->ht), *Wt = static_cast<const T *>(a->wt);
  const T *Bt = static_cast<const T *>(a->bt);
  const char *labels = static_cast<const char *>(a->labels);
  CL_TRY(culoss__cublas_status(cublasSetStream(h, stream), "cublasSetStream"));

  dparams p = fill(ctx, a);
  CL_TRY(launch_prep(p, stream)); /* over all n rows */
  p.rows_out = 1;
  p.ld_s = p.ld_t = v;
  if (n == 0 && !a->accumulate) {
    if (a->grad_weight)
      CU_TRY(cudaMemsetAsync(a->grad_weight, 0, (size_t)(v * ds) * gsz, stream), "cudaMemsetAsync");
    if (a->grad_bias)
      CU_TRY(cudaMemsetAsync(a->grad_bias, 0, (size_t)v * gsz, stream), "cudaMemsetAsync");
  }
  for (int64_t r0 = 0; r0 < n; r0 += L.rows) {
    const int64_t nr = n - r0 < L.rows ? n - r0 : L.rows;
    /* logits (row-major [nr, v]) = column-major [v, nr] = W (v x d) H^T */
    if (Bs)
      CU_TRY(launch(bias_fill_kernel<T>, dim3(blocks_for(v), (unsigned)nr), dim3(LT), 0, stream, S,
                    Bs, v, v),
             "launch of bias_fill_kernel");
    CL_TRY(gemm(h, CUBLAS_OP_T, CUBLAS_OP_N, v, nr, ds, Ws, ty, ds, Hs + r0 * ds, ty, ds,
                Bs ? 1.0f : 0.0f, S, ty, v, "cublasGemmEx(student logits)"));
    if (Bt)
      CU_TRY(launch(bias_fill_kernel<T>, dim3(blocks_for(v), (unsigned)nr), dim3(LT), 0, stream, Tt,
                    Bt, v, v),
             "launch of bias_fill_kernel");
    CL_TRY(gemm(h, CUBLAS_OP_T, CUBLAS_OP_N, v, nr, dt, Wt, ty, dt, Ht + r0 * dt, ty, dt,
                Bt ? 1.0f : 0.0f, Tt, ty, v, "cublasGemmEx(teacher logits)"));
    p.n = nr, p.s = S, p.t = Tt, p.grad = want_grad ? S : nullptr;
    p.labels = labels ? labels + (size_t)r0 * tsz : nullptr;
    p.loss = (reduced ? row_loss : a->loss) + r0;
    p.grad_loss = a->grad_loss && !reduced ? a->grad_loss + r0 : a->grad_loss;
    int64_t grid;
    CL_TRY(launch_main<T>(ctx, p, stream, &grid));
    if (a->grad_hidden) /* grad_hidden [nr, ds] = dlogits [nr, v] @ Ws [v, ds] */
      CL_TRY(gemm(h, CUBLAS_OP_N, CUBLAS_OP_N, ds, nr, v, Ws, ty, ds, S, ty, v, 0.0f,
                  static_cast<T *>(a->grad_hidden) + r0 * ds, ty, ds, "cublasGemmEx(grad_hidden)"));
    if (a->grad_weight) { /* fp32 [v, ds] (+)= dlogits^T @ Hs */
      const bool first = r0 == 0 && (!a->accumulate || !direct);
      CL_TRY(gemm(h, CUBLAS_OP_N, CUBLAS_OP_T, ds, v, nr, Hs + r0 * ds, ty, ds, S, ty, v,
                  first ? 0.0f : 1.0f, direct ? a->grad_weight : (void *)gw_acc, CUDA_R_32F, ds,
                  "cublasGemmEx(grad_weight)"));
    }
    if (a->grad_bias)
      CU_TRY(launch(colsum_kernel<T>, dim3(blocks_for(v)), dim3(LT), 0, stream, S, nr, v, v,
                    direct ? static_cast<float *>(a->grad_bias) : bias_acc,
                    (int)(direct ? (r0 == 0 && !a->accumulate) : r0 == 0)),
             "launch of colsum_kernel");
  }
  if (!direct && n > 0) { /* a 16-bit grad_weight / grad_bias: rounded once */
    if (a->grad_weight)
      CU_TRY(launch(convert_kernel<T>, dim3(blocks_for(v * ds)), dim3(LT), 0, stream,
                    (const float *)gw_acc, static_cast<T *>(a->grad_weight), v * ds, a->accumulate),
             "launch of convert_kernel");
    if (a->grad_bias)
      CU_TRY(launch(convert_kernel<T>, dim3(blocks_for(v)), dim3(LT), 0, stream,
                    (const float *)bias_acc, static_cast<T *>(a->grad_bias), v, a->accumulate),
             "launch of convert_kernel");
  }
  if (!reduced) return CULOSS_OK;
  const int64_t rgrid = capped_grid(ctx, (n + LT - 1) / LT);
  if (n > 0)
    CU_TRY(launch(row_loss_sum_kernel, dim3((unsigned)rgrid), dim3(LT), 0, stream,
                  (const float *)row_loss, n, ctx->scratch->partial_loss),
           "launch of row_loss_sum_kernel");
  return culoss__finish_reduction(ctx, n > 0 ? (int)rgrid : 0, a->loss, (int)a->o.reduction, p.div);
}

} // namespace
} // namespace culoss_dev

using namespace culoss_dev;

extern "C" culoss_status culoss__cuda_distill(culoss_context *ctx, const void *args) {
  const culoss__distill_args *a = static_cast<const culoss__distill_args *>(args);
  return with_dtype(a->dtype, [&](auto t) { return run<decltype(t)>(ctx, a); });
}

extern "C" culoss_status culoss__cuda_linear_distill(culoss_context *ctx, const void *args) {
  const culoss__distill_args *a = static_cast<const culoss__distill_args *>(args);
  return with_dtype(a->dtype, [&](auto t) { return run_linear<decltype(t)>(ctx, a); });
}
