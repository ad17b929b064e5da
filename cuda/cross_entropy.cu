/*
 * cross_entropy.cu: fused softmax cross-entropy (class-index and soft
 * targets), forward and backward in one kernel, and NLL, a gather.
 *
 * A group of TPR threads owns one row at a time (a thread for tiny c, 8
 * lanes or a whole warp for small c, the whole block for large c: the shape
 * table below). Pass 1 streams the row once with 16-byte loads, keeping an
 * online log-sum-exp (max and rescaled sum) plus the sums that label
 * smoothing and soft targets need, and parks the raw row in shared memory
 * when it fits. One fixed-order reduction per row gives lse. The gradient
 * pass (only when a gradient is requested) takes the row from shared memory
 * (or re-reads the part that did not fit) and writes the gradient once. The
 * normalised probabilities are never stored: the gradient is formed from the
 * logit and lse in registers, in fp32, and rounded once to the output type,
 * so the target column's p - 1 does not cancel in bf16.
 *
 * Traffic: one read of the logits (and of soft targets' probabilities) and
 * one write of the gradient when the row fits in shared memory (c *
 * sizeof(T), twice that for soft targets, up to the per-block limit, about
 * 227 KB on Hopper). A longer row, on sm_90, is split over a thread-block
 * cluster of 2 to 8 blocks that each keep their slice (ce_cluster_kernel):
 * still one read, up to 8 x 227 KB per row (fp32 V = 450K); past that, or
 * without clusters (older GPUs, CULOSS_CE_CLUSTER=0), the uncached part of
 * each row or slice is read twice, the second time from L2 if it stays
 * there (bench/NOTES.md, "Traffic model").
 *
 * Reductions over rows (SUM, MEAN) are deterministic: each block sums its
 * rows in a fixed order into a per-block partial in the context scratch, and
 * a one-block kernel sums the partials in a fixed order (reduce.cuh). The
 * grid size depends only on n, c (and the context's grid limit and shape
 * knob), never on the device, but for rows split over a cluster: whether
 * they are, and into how many slices, depends on the device's cluster
 * support and shared memory per block (fp32 rounding-level differences
 * between GPUs; bitwise the same run to run on one). MEAN's
 * denominator (the sum of target weights) depends only on the targets, so a
 * small kernel computes it first and the fused kernel can scale the gradient
 * in the same pass. No floating-point atomics (the only atomic is the
 * integer OR of the deferred-error flag).
 *
 * A non-ignored target outside [0, c) writes NaN loss and a zero gradient
 * row and raises the context's deferred-error flag: never a device assert.
 */
#include <cuda_runtime.h>

#include <cooperative_groups.h>
#include <cub/block/block_reduce.cuh>

#include "backend.h"
#include "cross_entropy.cuh"
#include "dtype.cuh"
#include "launch.cuh"
#include "loss_math.h"
#include "reduce.cuh"

/* Sub-warp groups reach warp-wide shuffles from different instructions,
   which PTX allows from sm_70 on. */
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 700
#error "culoss's kernels need sm_70 or newer (set CMAKE_CUDA_ARCHITECTURES accordingly)"
#endif

namespace culoss_dev {
namespace {

/* ------------------------------------------------------------------------ */
/* The launch shapes of the fused kernel, by row length c: the first row    */
/* whose c_max holds c (or the context's CULOSS_CE_SHAPE). The cuts come    */
/* from lane counts, not yet from measurements (bench/NOTES.md).            */
/* ------------------------------------------------------------------------ */
struct ce_shape {
  int block;     /* threads per block */
  int tpr;       /* threads per row */
  int64_t c_max; /* longest row it takes */
};
constexpr ce_shape CE_SHAPES[] = {
    {256, 1, 16},            /* a thread per row: a warp would leave most lanes idle */
    {256, 8, 128},           /* 8 lanes per row, 4 rows per warp, so every lane has a
                                16-byte pack (PyTorch's persistent softmax does the same) */
    {256, 32, 1024},         /* a warp per row */
    {256, 256, 16384},       /* a 256-thread block per row */
    {1024, 1024, INT64_MAX}, /* a 1024-thread block per row: large vocabularies */
};
constexpr int CE_NSHAPES = (int)(sizeof CE_SHAPES / sizeof CE_SHAPES[0]);

constexpr int PREP_THREADS = 256;
constexpr int NLL_THREADS = 256, NLL_ROWS = NLL_THREADS / 32; /* a warp per row */

/* What a row's threads accumulate in pass 1. */
struct row_acc {
  culoss__lse_state lse; /* online max and rescaled sum of exp */
  float sx;              /* sum w_c (m - x_c) (smoothing) or sum w_c y'_c (m - x_c)
                            (soft), m = lse.m: non-negative terms (culoss__sx_term) */
  float sy;              /* the weights of sx: sum w_c, or sum w_c y'_c (soft) */
  float xt;              /* the target logit (index modes; one thread adds it) */
  float su;              /* sum e^(x_c - m) (x_c - m): the entropy's (culoss__ent_rebase),
                            only when p.ent_out asks for it */
};

struct row_acc_merge {
  __device__ __forceinline__ row_acc operator()(const row_acc &a, const row_acc &b) const {
    row_acc r;
    r.lse = culoss__lse_merge(a.lse, b.lse);
    r.sx = culoss__sx_rebase(a.sx, a.sy, a.lse.m, r.lse.m) +
           culoss__sx_rebase(b.sx, b.sy, b.lse.m, r.lse.m);
    r.sy = a.sy + b.sy;
    r.xt = a.xt + b.xt;
    r.su = culoss__ent_rebase(a.su, culoss__lse_total(a.lse), a.lse.m, r.lse.m) +
           culoss__ent_rebase(b.su, culoss__lse_total(b.lse), b.lse.m, r.lse.m);
    return r;
  }
};

/* The accumulator of a row with no values yet (or of a group without a row). */
__device__ __forceinline__ row_acc empty_acc() {
  row_acc a;
  a.lse = culoss__lse_empty();
  a.sx = a.sy = a.xt = a.su = 0.0f;
  return a;
}

__device__ __forceinline__ float class_w(const ce_params &p, int64_t j) {
  return p.class_weight ? p.class_weight[j] : 1.0f;
}

/* ------------------------------------------------------------------------ */
/* ce_prep_kernel: partial sums of the target weights (D) and of the class  */
/* weights (W), one per block, in a fixed order.                            */
/* ------------------------------------------------------------------------ */
__global__ void __launch_bounds__(PREP_THREADS) ce_prep_kernel(ce_params p, int mode) {
  const int64_t stride = (int64_t)gridDim.x * PREP_THREADS;
  double d = 0.0, w = 0.0;
  if (mode != CULOSS__CE_SOFT) {
    for (int64_t i = (int64_t)blockIdx.x * PREP_THREADS + threadIdx.x; i < p.n; i += stride) {
      const int64_t t = culoss__target_at(p.targets, p.ttype, i);
      /* out-of-range targets count nothing here; the main kernel flags them */
      if (t != p.ignore_index && t >= 0 && t < p.c) d += p.class_weight ? p.class_weight[t] : 1.0;
    }
  }
  if (p.need_wsum)
    for (int64_t j = (int64_t)blockIdx.x * PREP_THREADS + threadIdx.x; j < p.c; j += stride)
      w += p.class_weight[j];
  store_block_sum<PREP_THREADS>(d, &p.scratch->prep_denom[blockIdx.x]);
  store_block_sum<PREP_THREADS>(w, &p.scratch->prep_wsum[blockIdx.x]);
}

/* Reduces a row_acc over the TPR threads of a group; every thread of the
   group gets the same result. For 1 < TPR <= 32 the shuffles and
   __syncwarp are warp-wide: every group of a warp must call run() and
   sync() the same number of times (ce_kernel's row loop guarantees it). */
template <int BLOCK, int TPR> struct group_reduce {
  typedef cub::BlockReduce<row_acc, BLOCK> block_t;
  struct storage {
    typename block_t::TempStorage tmp;
    row_acc result;
  };
  __device__ __forceinline__ static row_acc run(row_acc v, storage &st) {
    if constexpr (TPR == 1) {
      (void)st; /* one thread owns the row: nothing to combine or order */
      return v;
    } else if constexpr (TPR <= 32) {
      static_assert((TPR & (TPR - 1)) == 0, "a sub-warp group is a power of two");
      /* Butterfly over the group's lanes (xor offsets below TPR stay inside
         the group), then the group's first lane's value to all its lanes:
         every lane then uses one bitwise-identical lse (an FMA contraction
         can make a + b and b + a round differently across lanes). */
      row_acc_merge op;
#pragma unroll
      for (int off = TPR / 2; off > 0; off >>= 1) {
        row_acc o;
        o.lse.m = __shfl_xor_sync(0xffffffffu, v.lse.m, off);
        o.lse.s = __shfl_xor_sync(0xffffffffu, v.lse.s, off);
        o.sx = __shfl_xor_sync(0xffffffffu, v.sx, off);
        o.sy = __shfl_xor_sync(0xffffffffu, v.sy, off);
        o.xt = __shfl_xor_sync(0xffffffffu, v.xt, off);
        o.su = __shfl_xor_sync(0xffffffffu, v.su, off);
        v = op(v, o);
      }
      v.lse.m = __shfl_sync(0xffffffffu, v.lse.m, 0, TPR);
      v.lse.s = __shfl_sync(0xffffffffu, v.lse.s, 0, TPR);
      v.sx = __shfl_sync(0xffffffffu, v.sx, 0, TPR);
      v.sy = __shfl_sync(0xffffffffu, v.sy, 0, TPR);
      v.xt = __shfl_sync(0xffffffffu, v.xt, 0, TPR);
      v.su = __shfl_sync(0xffffffffu, v.su, 0, TPR);
      /* Orders this row's pass-1 reads before any lane's pass-2 writes
         (in-place gradient). */
      __syncwarp();
      return v;
    } else {
      static_assert(TPR == BLOCK, "a row is at most a warp, or the whole block");
      row_acc r = block_t(st.tmp).Reduce(v, row_acc_merge());
      if (threadIdx.x == 0) st.result = r; /* valid in thread 0 only: broadcast */
      /* Also orders every thread's pass-1 reads of the row before any
         thread's pass-2 writes: the gradient may overwrite the logits. */
      __syncthreads();
      return st.result;
    }
  }
  __device__ __forceinline__ static void sync() {
    if constexpr (TPR > 1 && TPR <= 32)
      __syncwarp();
    else if constexpr (TPR > 32)
      __syncthreads();
  }
};

/* ------------------------------------------------------------------------ */
/* Pieces of a row, each a contract of its own.                             */
/* ------------------------------------------------------------------------ */

/* The per-call constants: the gradient scale of a reduced loss (g / D, D
   from the prep partials) and W, computed once per block by thread 0 in a
   fixed order (so every block uses bitwise the same values) and broadcast.
   Every thread of the block must call it, once. */
struct call_consts {
  float red_scale, wsum;
};
__device__ __forceinline__ call_consts load_call_consts(const ce_params &p) {
  __shared__ call_consts k;
  if (threadIdx.x == 0) {
    k.red_scale = p.reduction == CULOSS_REDUCTION_NONE
                      ? 1.0f
                      : reduced_grad_scale(p.reduction, p.grad_loss, p.div);
    k.wsum = p.need_wsum ? (float)sum_in_order(p.scratch->prep_wsum, p.prep_blocks) : (float)p.c;
  }
  __syncthreads();
  return k;
}

/* The part of a row one group walks: packs [v0, v1) and, if tail, the
   partial pack at the row's end. A whole row for ce_kernel; a cluster
   block's slice for ce_cluster_kernel. The group's row cache holds the
   slice's packs from v0 on. */
struct row_span {
  int64_t v0, v1;
  bool tail;
};
template <int VEC> __device__ __forceinline__ row_span whole_row(const ce_params &p) {
  return row_span{0, p.c / VEC, true};
}

/* What a group knows of its row before reading it. */
enum row_kind {
  ROW_LIVE, /* a row to compute */
  ROW_SKIP, /* ignored (loss 0) or its target outside [0, c) (NaN loss): zero gradient */
  ROW_NONE  /* past the last row: a sub-warp group keeping its warp's lockstep */
};
struct row_job {
  int64_t row, t;  /* t: the class target (index modes), else -1 */
  float wt, scale; /* w_t (1 without weights); the gradient scale */
  row_kind kind;
  bool bad; /* ROW_SKIP because t is out of range */
};

template <int MODE>
__device__ __forceinline__ row_job begin_row(const ce_params &p, int64_t row, float red_scale) {
  row_job j;
  j.row = row, j.t = -1, j.wt = 1.0f, j.scale = 0.0f, j.kind = ROW_LIVE, j.bad = false;
  if (row >= p.n) {
    j.kind = ROW_NONE;
    return j;
  }
  j.scale =
      p.reduction == CULOSS_REDUCTION_NONE ? (p.grad_loss ? p.grad_loss[row] : 1.0f) : red_scale;
  if constexpr (MODE != CULOSS__CE_SOFT) {
    j.t = culoss__target_at(p.targets, p.ttype, row);
    const bool ignored = j.t == p.ignore_index;
    j.bad = !ignored && (j.t < 0 || j.t >= p.c);
    if (ignored || j.bad)
      j.kind = ROW_SKIP;
    else if (p.class_weight)
      j.wt = p.class_weight[j.t];
  }
  return j;
}

/* A row's loss, by lane 0: to loss[row], or into the block's running sum. */
__device__ __forceinline__ void emit_loss(const ce_params &p, bool per_row, int64_t row, float l,
                                          double &block_sum) {
  if (per_row)
    p.loss[row] = l;
  else
    block_sum += l;
}

/* A ROW_SKIP row: its loss (0, or NaN and the deferred flag), zero
   statistics for linear CE (by the thread that emits) and a zero gradient
   over the span; nothing is read. */
template <typename T, int TPR, int VEC>
__device__ __forceinline__ void skip_row(const ce_params &p, const row_job &job, int lane,
                                         bool emit, bool per_row, double &block_sum, row_span sp) {
  if (emit) {
    if (job.bad) atomicOr(&p.scratch->error_flag, CULOSS__FLAG_TARGET);
    emit_loss(p, per_row, job.row, job.bad ? culoss__nan() : 0.0f, block_sum);
    if (p.lse_out) p.lse_out[job.row] = job.bad ? culoss__nan() : 0.0f;
    if (p.ent_out) p.ent_out[job.row] = job.bad ? culoss__nan() : 0.0f;
    if (p.row_stats) { /* gradient scale 0: linear CE's pass B writes zeros */
      p.row_stats[2 * job.row] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
      p.row_stats[2 * job.row + 1] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    }
  }
  if (p.grad == nullptr) return;
  T *gr = static_cast<T *>(p.grad) + job.row * p.ld;
  const int64_t nvec = p.c / VEC;
  pack<T, VEC> zero;
#pragma unroll
  for (int k = 0; k < VEC; k++) zero.v[k] = from_f32<T>(0.0f);
  for (int64_t v = sp.v0 + lane; v < sp.v1; v += TPR) store_pack<T, VEC>(gr + v * VEC, zero);
  if (sp.tail)
    for (int64_t j = nvec * VEC + lane; j < p.c; j += TPR) st_elem(gr + j, from_f32<T>(0.0f));
}

/* Pass 1 over this lane's share of a ROW_LIVE row: the online log-sum-exp
   of the (soft-capped) logits and, for smoothing or soft targets, sx and sy;
   the packs that fit are parked in the group's row cache for the gradient
   pass. Lane 0 of the group whose span starts the row also takes the
   target logit. */
template <typename T, int MODE, int TPR, int VEC>
__device__ __forceinline__ row_acc pass1(const ce_params &p, const row_job &job, int lane,
                                         pack<T, VEC> *cache, row_span sp) {
  typedef pack<T, VEC> pack_t;
  const int64_t c = p.c, nvec = c / VEC;
  const float eps = p.eps, cap = p.cap;
  const T *xr = static_cast<const T *>(p.x) + job.row * p.ld; /* 64-bit: row * ld > 2^31 */
  const T *yr =
      MODE == CULOSS__CE_SOFT ? static_cast<const T *>(p.probs) + job.row * p.ld : nullptr;
  const bool want_sx = MODE == CULOSS__CE_SOFT || eps > 0.0f;
  const bool want_ent = p.ent_out != nullptr;
  row_acc acc = empty_acc();
#pragma unroll 4
  for (int64_t v = sp.v0 + lane; v < sp.v1; v += TPR) {
    const pack_t pk = load_pack<T, VEC>(xr + v * VEC);
    const int64_t cv = v - sp.v0; /* its slot in the row cache */
    if (cv < p.cache_vecs) cache[cv] = pk;
    float xv[VEC];
    float vmax = -INFINITY;
#pragma unroll
    for (int k = 0; k < VEC; k++) {
      xv[k] = culoss__softcap(to_f32(pk.v[k]), cap);
      vmax = fmaxf(vmax, xv[k]);
    }
    const float m = fmaxf(acc.lse.m, vmax);
    /* A new maximum: the old sum joins s, and the pack's first value at m
       becomes the top (its 1 implicit: culoss__lse_state). */
    bool top = m != acc.lse.m;
    float s = top ? culoss__lse_rescale(acc.lse, m) : acc.lse.s;
    if (want_ent) acc.su = culoss__ent_rebase(acc.su, culoss__lse_total(acc.lse), acc.lse.m, m);
#pragma unroll
    for (int k = 0; k < VEC; k++) {
      const float e = culoss__exp_diff(xv[k], m);
      if (top && xv[k] == m)
        top = false;
      else
        s += e;
      if (want_ent) acc.su += culoss__ent_term(e, xv[k], m);
    }
    if (want_sx) { /* sx follows the running maximum (culoss__sx_rebase) */
      acc.sx = culoss__sx_rebase(acc.sx, acc.sy, acc.lse.m, m);
      if constexpr (MODE == CULOSS__CE_SOFT) {
        const pack_t yk = load_pack<T, VEC>(yr + v * VEC);
        if (cv < p.cache_vecs) cache[p.cache_vecs + cv] = yk; /* after the row's logits */
#pragma unroll
        for (int k = 0; k < VEC; k++) {
          const float wy = culoss__ce_soft_b(class_w(p, v * VEC + k), to_f32(yk.v[k]), eps, c);
          acc.sy += wy;
          if (wy != 0.0f) acc.sx += culoss__sx_term(wy, xv[k], m); /* 0 * -inf: 0 */
        }
      } else {
#pragma unroll
        for (int k = 0; k < VEC; k++) {
          const float w = class_w(p, v * VEC + k);
          acc.sy += w;
          acc.sx += culoss__sx_term(w, xv[k], m);
        }
      }
    }
    acc.lse.m = m;
    acc.lse.s = s;
  }
  for (int64_t j = nvec * VEC + lane; sp.tail && j < c; j += TPR) { /* the partial pack */
    const float xj = culoss__softcap(to_f32(ld_elem(xr + j)), cap);
    const float m = fmaxf(acc.lse.m, xj);
    if (want_sx) acc.sx = culoss__sx_rebase(acc.sx, acc.sy, acc.lse.m, m);
    if (want_ent)
      acc.su = culoss__ent_rebase(acc.su, culoss__lse_total(acc.lse), acc.lse.m, m) +
               culoss__ent_term(culoss__exp_diff(xj, m), xj, m);
    acc.lse = culoss__lse_add(acc.lse, xj);
    if constexpr (MODE == CULOSS__CE_SOFT) {
      const float wy = culoss__ce_soft_b(class_w(p, j), to_f32(ld_elem(yr + j)), eps, c);
      acc.sy += wy;
      if (wy != 0.0f) acc.sx += culoss__sx_term(wy, xj, m);
    } else if (want_sx) {
      const float w = class_w(p, j);
      acc.sy += w;
      acc.sx += culoss__sx_term(w, xj, m);
    }
  }
  if constexpr (MODE == CULOSS__CE_INDEX)
    if (lane == 0 && sp.v0 == 0) acc.xt = culoss__softcap(to_f32(ld_elem(xr + job.t)), cap);
  return acc;
}

/* The per-row constants of culoss__ce_grad. */
struct row_grad {
  float lse_m, log_s; /* lse = m + log_s, kept apart for accuracy with large logits */
  float rest;         /* the state's s: log_s = log1p(rest) (culoss__lse_rest) */
  culoss__ce_coef a;  /* a of culoss__ce_grad */
  float tw;           /* (1-eps) w_t: the target column's extra b */
};

/* A ROW_LIVE row's loss from the reduced accumulator r (lane 0 writes it
   and, for linear CE, what its pass B needs to rebuild the gradient); every
   lane gets the gradient's per-row constants. */
template <int MODE>
__device__ __forceinline__ row_grad finish_row(const ce_params &p, const row_job &job,
                                               const row_acc &r, float wsum, int lane, bool per_row,
                                               double &block_sum) {
  const float eps = p.eps;
  const float lse = culoss__lse_value(r.lse);
  row_grad g;
  g.lse_m = r.lse.m;
  g.log_s = culoss__lse_log_s(r.lse);
  g.rest = culoss__lse_rest(r.lse);
  g.tw = (1.0f - eps) * job.wt;
  g.a.w = MODE == CULOSS__CE_INDEX ? g.tw : r.sy;
  g.a.k = (MODE == CULOSS__CE_INDEX ? eps / (float)p.c * wsum : 0.0f) + 2.0f * p.z * lse;
  if (lane == 0) {
    float l;
    if constexpr (MODE == CULOSS__CE_INDEX) {
      l = g.lse_m == -INFINITY ? g.tw * (lse - r.xt)
                               : culoss__scaled_diff(g.tw, g.lse_m, r.xt) + g.tw * g.log_s;
      /* sum_j w_j (lse - x_j) = sx + W log_s: non-negative terms */
      if (eps > 0.0f) l += eps / (float)p.c * (r.sx + r.sy * g.log_s);
    } else {
      l = r.sx + r.sy * g.log_s;
    }
    l += p.z * lse * lse;
    emit_loss(p, per_row, job.row, l, block_sum);
    if (p.lse_out) p.lse_out[job.row] = lse;
    if (p.ent_out) p.ent_out[job.row] = culoss__ent_value(r.su, r.lse);
    if (p.row_stats) {
      p.row_stats[2 * job.row] = make_float4(g.lse_m, g.log_s, g.a.k, g.tw);
      p.row_stats[2 * job.row + 1] = make_float4(job.scale, g.rest, 0.0f, 0.0f);
    }
  }
  return g;
}

/* The gradient pass over this lane's share of a ROW_LIVE row: written once,
   from the cached packs (or a re-read of the rest). */
template <typename T, int MODE, int TPR, int VEC>
__device__ __forceinline__ void grad_pass(const ce_params &p, const row_job &job, const row_grad &g,
                                          int lane, const pack<T, VEC> *cache, row_span sp) {
  typedef pack<T, VEC> pack_t;
  const int64_t c = p.c, nvec = c / VEC;
  const float eps = p.eps, cap = p.cap;
  const T *xr = static_cast<const T *>(p.x) + job.row * p.ld;
  const T *yr =
      MODE == CULOSS__CE_SOFT ? static_cast<const T *>(p.probs) + job.row * p.ld : nullptr;
  T *gr = static_cast<T *>(p.grad) + job.row * p.ld;
  auto grad_at = [&](float x, float y, int64_t j) -> T {
    const float xs = culoss__softcap(x, cap);
    culoss__ce_coef b;
    if constexpr (MODE == CULOSS__CE_SOFT)
      b = culoss__ce_coef1(culoss__ce_soft_b(class_w(p, j), y, eps, c));
    else
      b = culoss__ce_index_b2(j, job.t, g.tw, eps, c, p.class_weight);
    return from_f32<T>(
        culoss__ce_grad(xs, g.lse_m, g.rest, g.a, b, job.scale, culoss__softcap_grad(xs, cap)));
  };
#pragma unroll 4
  for (int64_t v = sp.v0 + lane; v < sp.v1; v += TPR) {
    const int64_t cv = v - sp.v0;
    const pack_t pk = cv < p.cache_vecs ? cache[cv] : load_pack<T, VEC>(xr + v * VEC);
    const pack_t yk = MODE != CULOSS__CE_SOFT ? pk
                      : cv < p.cache_vecs     ? cache[p.cache_vecs + cv]
                                              : load_pack<T, VEC>(yr + v * VEC);
    pack_t o;
#pragma unroll
    for (int k = 0; k < VEC; k++) o.v[k] = grad_at(to_f32(pk.v[k]), to_f32(yk.v[k]), v * VEC + k);
    store_pack<T, VEC>(gr + v * VEC, o);
  }
  for (int64_t j = nvec * VEC + lane; sp.tail && j < c; j += TPR)
    st_elem(gr + j, grad_at(to_f32(ld_elem(xr + j)),
                            MODE == CULOSS__CE_SOFT ? to_f32(ld_elem(yr + j)) : 0.0f, j));
}

/* ------------------------------------------------------------------------ */
/* ce_kernel: the fused forward + backward.                                 */
/* ------------------------------------------------------------------------ */
template <typename T, int MODE, int BLOCK, int TPR, int VEC>
__global__ void __launch_bounds__(BLOCK) ce_kernel(ce_params p) {
  typedef group_reduce<BLOCK, TPR> greduce;
  __shared__ typename greduce::storage gstore;
  CULOSS_DYNAMIC_SMEM(smem_raw);
  constexpr int ROWS = BLOCK / TPR;
  /* Sub-warp groups share their warp's shuffles, so the groups of a warp
     walk their rows in lockstep: the loop runs while the warp's first row
     exists, and in every iteration every group makes the same warp-wide
     calls (one greduce::run, one greduce::sync) whatever its row's kind. */
  constexpr int GPW = TPR > 1 && TPR < 32 ? 32 / TPR : 1; /* groups per warp */
  const int grp = threadIdx.x / TPR, lane = threadIdx.x % TPR;
  /* the group's row cache: cache_vecs packs of logits (soft targets: then as
     many of probabilities) */
  constexpr int64_t CACHED = MODE == CULOSS__CE_SOFT ? 2 : 1;
  pack<T, VEC> *cache =
      reinterpret_cast<pack<T, VEC> *>(smem_raw) + (int64_t)grp * CACHED * p.cache_vecs;
  const call_consts k = load_call_consts(p);
  const bool per_row = p.reduction == CULOSS_REDUCTION_NONE || p.rows_out;
  double block_sum = 0.0; /* lane 0 of each group: its rows' losses, in row order */

  for (int64_t base = (int64_t)blockIdx.x * ROWS + (grp - grp % GPW); base < p.n;
       base += (int64_t)gridDim.x * ROWS) {
    const row_job job = begin_row<MODE>(p, base + grp % GPW, k.red_scale);
    row_acc acc = empty_acc();
    if (job.kind == ROW_LIVE)
      acc = pass1<T, MODE, TPR, VEC>(p, job, lane, cache, whole_row<VEC>(p));
    else if (job.kind == ROW_SKIP)
      skip_row<T, TPR, VEC>(p, job, lane, lane == 0, per_row, block_sum, whole_row<VEC>(p));
    /* also orders every lane's pass-1 reads before any gradient write: the
       gradient may overwrite the logits */
    const row_acc r = greduce::run(acc, gstore);
    if (job.kind == ROW_LIVE) {
      const row_grad g = finish_row<MODE>(p, job, r, k.wsum, lane, per_row, block_sum);
      if (p.grad) grad_pass<T, MODE, TPR, VEC>(p, job, g, lane, cache, whole_row<VEC>(p));
    }
    greduce::sync(); /* the broadcast slot and TempStorage are reused next row */
  }
  if (!per_row)
    store_block_sum<BLOCK>(lane == 0 ? block_sum : 0.0, &p.scratch->partial_loss[blockIdx.x]);
}

/* ------------------------------------------------------------------------ */
/* ce_cluster_kernel: rows too long for one block's row cache (with a       */
/* gradient), split over a thread-block cluster of K = 2..8 blocks (sm_90). */
/* Block rank r walks packs [r P, (r + 1) P) of the row (P = ceil(packs /   */
/* K); the last rank also the partial pack) and keeps them in its own       */
/* shared memory, so every row is read from DRAM once. Each block reduces   */
/* its slice, parks the result in its shared memory (a slot per row parity) */
/* and, after one cluster barrier, every block merges the K results through */
/* distributed shared memory in rank order: bitwise the same row statistics */
/* in every block, and the same order of merges in every run. Rank 0 writes */
/* the row's loss and statistics; each block writes its slice's gradient.   */
/* One cluster barrier per row: the next row's results go to the other      */
/* slot, and a block can only get two rows ahead once every block has       */
/* passed the barrier between. A last barrier keeps every block's shared    */
/* memory alive until the others have read it.                              */
/* Shared memory: the two slots, then the slice cache (ce_cluster_smem).    */
/* ------------------------------------------------------------------------ */
constexpr int CL_BLOCK = 1024, CL_MAX = 8;
constexpr size_t CL_SLOTS = 2 * ((sizeof(row_acc) + 15) / 16 * 16);

template <typename T, int MODE, int VEC>
__global__ void __launch_bounds__(CL_BLOCK) ce_cluster_kernel(ce_params p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
  __trap(); /* never launched below sm_90: ce_launch_main checks the device */
#else
  namespace cg = cooperative_groups;
  typedef group_reduce<CL_BLOCK, CL_BLOCK> greduce;
  /* used only between two cluster barriers (the emulator's rule) */
  __shared__ typename greduce::storage gstore;
  CULOSS_DYNAMIC_SMEM(smem_raw);
  const cg::cluster_group cluster = cg::this_cluster();
  const unsigned rank = cluster.block_rank(), K = cluster.num_blocks();
  pack<T, VEC> *cache = reinterpret_cast<pack<T, VEC> *>(smem_raw + CL_SLOTS);
  const int lane = threadIdx.x;
  const call_consts k = load_call_consts(p);
  const bool per_row = p.reduction == CULOSS_REDUCTION_NONE || p.rows_out;
  const int64_t nvec = p.c / VEC, per = (nvec + K - 1) / K;
  const row_span sp{(int64_t)rank * per < nvec ? (int64_t)rank * per : nvec,
                    (int64_t)(rank + 1) * per < nvec ? (int64_t)(rank + 1) * per : nvec,
                    rank == K - 1};
  /* rank 0's lane 0 emits the row's loss; the others pass a lane no thread has */
  const int emit_lane = rank == 0 ? lane : -1;
  double block_sum = 0.0;
  int parity = 0;
  for (int64_t row = blockIdx.x / K; row < p.n; row += gridDim.x / K, parity ^= 1) {
    const row_job job = begin_row<MODE>(p, row, k.red_scale);
    row_acc acc = empty_acc();
    if (job.kind == ROW_LIVE)
      acc = pass1<T, MODE, CL_BLOCK, VEC>(p, job, lane, cache, sp);
    else
      skip_row<T, CL_BLOCK, VEC>(p, job, lane, emit_lane == 0, per_row, block_sum, sp);
    const row_acc mine = greduce::run(acc, gstore); /* ends with __syncthreads */
    row_acc *my_slot = reinterpret_cast<row_acc *>(smem_raw + (CL_SLOTS / 2) * parity);
    if (lane == 0) *my_slot = mine;
    cluster.sync(); /* every block's slice result is in its slot */
    if (job.kind == ROW_LIVE) {
      row_acc r = *cluster.map_shared_rank(my_slot, 0);
      const row_acc_merge merge;
      for (unsigned q = 1; q < K; q++) r = merge(r, *cluster.map_shared_rank(my_slot, q));
      const row_grad g = finish_row<MODE>(p, job, r, k.wsum, emit_lane, per_row, block_sum);
      if (p.grad) grad_pass<T, MODE, CL_BLOCK, VEC>(p, job, g, lane, cache, sp);
    }
  }
  cluster.sync(); /* no block's shared memory goes while another reads it */
  if (!per_row)
    store_block_sum<CL_BLOCK>(lane == 0 ? block_sum : 0.0, &p.scratch->partial_loss[blockIdx.x]);
#endif
}

/* ------------------------------------------------------------------------ */
/* nll_kernel: l = -w_y x_y per row and a gradient row that is zero but for */
/* -w_y g at y. A warp per row: lane 0 reads x_y, then (after a __syncwarp: */
/* the gradient may overwrite the row) the warp writes the row once.        */
/* ------------------------------------------------------------------------ */
template <typename T, int VEC>
__global__ void __launch_bounds__(NLL_THREADS) nll_kernel(ce_params p) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const call_consts k = load_call_consts(p);
  const bool per_row = p.reduction == CULOSS_REDUCTION_NONE || p.rows_out;
  const int64_t c = p.c, nvec = c / VEC;
  double block_sum = 0.0;
  for (int64_t row = (int64_t)blockIdx.x * NLL_ROWS + warp; row < p.n;
       row += (int64_t)gridDim.x * NLL_ROWS) {
    const row_job job = begin_row<CULOSS__NLL>(p, row, k.red_scale);
    const T *xr = static_cast<const T *>(p.x) + row * p.ld;
    float l = job.bad ? culoss__nan() : 0.0f;
    if (lane == 0 && job.kind == ROW_LIVE) l = -job.wt * to_f32(ld_elem(xr + job.t));
    __syncwarp();
    if (lane == 0) {
      if (job.bad) atomicOr(&p.scratch->error_flag, CULOSS__FLAG_TARGET);
      emit_loss(p, per_row, row, l, block_sum);
    }
    if (p.grad == nullptr) continue;
    T *gr = static_cast<T *>(p.grad) + row * p.ld;
    const float gt = job.kind == ROW_LIVE ? -job.wt * job.scale : 0.0f;
    for (int64_t v = lane; v < nvec; v += 32) {
      pack<T, VEC> o;
#pragma unroll
      for (int q = 0; q < VEC; q++) o.v[q] = from_f32<T>(v * VEC + q == job.t ? gt : 0.0f);
      store_pack<T, VEC>(gr + v * VEC, o);
    }
    for (int64_t j = nvec * VEC + lane; j < c; j += 32)
      st_elem(gr + j, from_f32<T>(j == job.t ? gt : 0.0f));
  }
  if (!per_row)
    store_block_sum<NLL_THREADS>(lane == 0 ? block_sum : 0.0, &p.scratch->partial_loss[blockIdx.x]);
}

/* ------------------------------------------------------------------------ */
/* dispatch: the one map from (dtype, mode, shape, vector width) to a       */
/* kernel; the launch and the context's attribute set-up both use it.       */
/* ------------------------------------------------------------------------ */
typedef void (*ce_kernel_t)(ce_params);

static_assert(CE_NSHAPES == 5, "ce_kernel_at has one case per row of CE_SHAPES");
template <typename T, int MODE, int VEC> ce_kernel_t ce_kernel_at(int s) {
#define CULOSS_CE_KERNEL(i) ce_kernel<T, MODE, CE_SHAPES[i].block, CE_SHAPES[i].tpr, VEC>
  switch (s) {
  case 0: return CULOSS_CE_KERNEL(0);
  case 1: return CULOSS_CE_KERNEL(1);
  case 2: return CULOSS_CE_KERNEL(2);
  case 3: return CULOSS_CE_KERNEL(3);
  default: return CULOSS_CE_KERNEL(4);
  }
#undef CULOSS_CE_KERNEL
}

/* mode: CULOSS__CE_INDEX or CULOSS__CE_SOFT; vec: 16-byte packs, else one
   element at a time. */
ce_kernel_t select_ce_kernel(int dtype, int mode, int s, bool vec) {
  return with_dtype(dtype, [&](auto t) -> ce_kernel_t {
    typedef decltype(t) T;
    constexpr int V = vec16<T>::value;
    if (mode == CULOSS__CE_SOFT)
      return vec ? ce_kernel_at<T, CULOSS__CE_SOFT, V>(s) : ce_kernel_at<T, CULOSS__CE_SOFT, 1>(s);
    return vec ? ce_kernel_at<T, CULOSS__CE_INDEX, V>(s) : ce_kernel_at<T, CULOSS__CE_INDEX, 1>(s);
  });
}

template <typename T, int MODE, int VEC> ce_kernel_t ce_cluster_kernel_at() {
  return ce_cluster_kernel<T, MODE, VEC>;
}
ce_kernel_t select_ce_cluster_kernel(int dtype, int mode, bool vec) {
  return with_dtype(dtype, [&](auto t) -> ce_kernel_t {
    typedef decltype(t) T;
    constexpr int V = vec16<T>::value;
    if (mode == CULOSS__CE_SOFT)
      return vec ? ce_cluster_kernel_at<T, CULOSS__CE_SOFT, V>()
                 : ce_cluster_kernel_at<T, CULOSS__CE_SOFT, 1>();
    return vec ? ce_cluster_kernel_at<T, CULOSS__CE_INDEX, V>()
               : ce_cluster_kernel_at<T, CULOSS__CE_INDEX, 1>();
  });
}

/* The context's CULOSS_CE_SHAPE (threads per row) if set, else the first
   shape whose c_max holds c. */
int pick_shape(const culoss_context *ctx, int64_t c) {
  for (int s = 0; s < CE_NSHAPES; s++)
    if (ctx->ce_tpr ? CE_SHAPES[s].tpr == ctx->ce_tpr : c <= CE_SHAPES[s].c_max) return s;
  return CE_NSHAPES - 1;
}

} // namespace

int ce_kernel_count() { return 3 * 2 * CE_NSHAPES * 2 + 3 * 2 * 2; }

bool ce_kernel_is_cluster(int i) { return i >= 3 * 2 * CE_NSHAPES * 2; }

const void *ce_kernel_address(int i) {
  const bool vec = i % 2 != 0;
  if (i >= 3 * 2 * CE_NSHAPES * 2) { /* the cluster kernels */
    const int j = (i - 3 * 2 * CE_NSHAPES * 2) / 2;
    return reinterpret_cast<const void *>(select_ce_cluster_kernel(j / 2, j % 2, vec));
  }
  const int s = i / 2 % CE_NSHAPES, mode = i / 2 / CE_NSHAPES % 2, dtype = i / 2 / CE_NSHAPES / 2;
  /* the C API, which takes a kernel's address as const void * */
  return reinterpret_cast<const void *>(select_ce_kernel(dtype, mode, s, vec));
}

void ce_fill_params(culoss_context *ctx, const culoss__ce_args *a, ce_params *p) {
  p->n = a->n;
  p->c = a->c;
  p->ld = a->ld;
  p->x = a->x;
  p->targets = a->targets;
  p->probs = a->probs;
  p->loss = a->loss;
  p->grad = a->grad;
  p->grad_loss = a->grad_loss;
  p->class_weight = a->o.class_weight;
  p->normalizer = a->o.normalizer;
  p->ignore_index = a->o.ignore_index;
  p->eps = a->o.label_smoothing;
  p->z = a->o.z_loss;
  p->cap = a->o.logit_softcap;
  p->reduction = (int)a->o.reduction;
  p->ttype = (int)a->ttype;
  p->need_wsum = a->mode == CULOSS__CE_INDEX && p->eps > 0.0f && p->class_weight != nullptr;
  p->prep_blocks = 0;
  p->cache_vecs = 0;
  p->rows_out = 0;
  p->row_stats = nullptr;
  p->lse_out = a->mode == CULOSS__CE_INDEX ? a->lse : nullptr;
  p->ent_out = a->mode == CULOSS__CE_INDEX ? a->entropy : nullptr;
  p->scratch = ctx->scratch;
  p->div.count = a->mode == CULOSS__CE_SOFT ? (double)a->n : 0.0;
  p->div.normalizer = p->normalizer;
  p->div.prep = nullptr;
  p->div.prep_count = 0;
}

culoss_status ce_launch_prep(const ce_params *p_in, ce_params *p, int mode, cudaStream_t stream) {
  *p = *p_in;
  const bool need_denom =
      p->reduction == CULOSS_REDUCTION_MEAN && !p->normalizer && mode != CULOSS__CE_SOFT;
  if (!need_denom && !p->need_wsum) return CULOSS_OK;
  int64_t work = need_denom ? p->n : 0;
  if (p->need_wsum && p->c > work) work = p->c;
  int64_t blocks = (work + PREP_THREADS - 1) / PREP_THREADS;
  if (blocks < 1) blocks = 1;
  if (blocks > CULOSS_MAX_PREP_BLOCKS) blocks = CULOSS_MAX_PREP_BLOCKS;
  p->prep_blocks = (int)blocks;
  if (need_denom) {
    p->div.prep = p->scratch->prep_denom;
    p->div.prep_count = (int)blocks;
  }
  const cudaError_t e =
      launch(ce_prep_kernel, dim3((unsigned)blocks), dim3(PREP_THREADS), 0, stream, *p, mode);
  return e == cudaSuccess ? CULOSS_OK : culoss__cuda_status(e, "launch of ce_prep_kernel");
}

culoss_status ce_launch_main(culoss_context *ctx, ce_params &p, int mode, int dtype,
                             int64_t *grid_out, cudaStream_t stream) {
  const size_t esize = culoss__dtype_size((culoss_dtype)dtype);
  const bool vec = aligned16(p.x) && aligned16(p.grad) &&
                   (mode != CULOSS__CE_SOFT || aligned16(p.probs)) &&
                   ((p.ld * (int64_t)esize) % 16) == 0;
  const size_t pack_bytes = vec ? 16 : esize;
  cudaError_t e;
  p.cache_vecs = 0;
  if (mode == CULOSS__NLL) {
    *grid_out = capped_grid(ctx, (p.n + NLL_ROWS - 1) / NLL_ROWS);
    e = with_dtype(dtype, [&](auto t) {
      typedef decltype(t) T;
      return launch(vec ? nll_kernel<T, vec16<T>::value> : nll_kernel<T, 1>,
                    dim3((unsigned)*grid_out), dim3(NLL_THREADS), 0, stream, p);
    });
    return e == cudaSuccess ? CULOSS_OK : culoss__cuda_status(e, "launch of nll_kernel");
  }
  const int s = pick_shape(ctx, p.c);
  const int rows = CE_SHAPES[s].block / CE_SHAPES[s].tpr;
  /* With a gradient, as much of each row as fits stays in shared memory
     for the gradient pass (capped by CULOSS_CE_CACHE_BYTES): its logits and,
     for soft targets, its probabilities too (each pack cached takes both). */
  const size_t cached = mode == CULOSS__CE_SOFT ? 2 : 1;
  if (p.grad) {
    size_t budget = ctx->smem_optin - CE_STATIC_SMEM_RESERVE;
    if (ctx->ce_cache_cap < budget) budget = ctx->ce_cache_cap;
    const int64_t fit = (int64_t)(budget / ((size_t)rows * pack_bytes * cached));
    const int64_t nvec_row = p.c / (int64_t)(pack_bytes / esize);
    p.cache_vecs = nvec_row < fit ? nvec_row : fit;
  }
  /* A row too long for one block's cache, on a GPU with clusters: a cluster
     of K blocks, each caching its 1/K of the row (ce_cluster_kernel); K as
     small as holds the whole row, at most CL_MAX (longer rows re-read the
     rest of each slice). Not when the shape is forced (CULOSS_CE_SHAPE), nor
     when the grid limit (culoss_set_grid_limit) is below K. */
  const int64_t nvec = p.c / (int64_t)(pack_bytes / esize);
  size_t cl_budget = ctx->smem_optin - CE_STATIC_SMEM_RESERVE - CL_SLOTS;
  if (ctx->ce_cache_cap < cl_budget) cl_budget = ctx->ce_cache_cap;
  const int64_t fit = (int64_t)(cl_budget / (pack_bytes * cached));
  const int64_t K = cluster_blocks(nvec, fit, CL_MAX);
  if (p.grad && p.cache_vecs < nvec && s == CE_NSHAPES - 1 && ctx->ce_tpr == 0 &&
      cluster_ok(ctx, K)) {
    const int64_t one_block_cache = p.cache_vecs, per = (nvec + K - 1) / K;
    p.cache_vecs = per < fit ? per : fit;
    *grid_out = cluster_grid(ctx, K, p.n);
    e = launch_cluster(select_ce_cluster_kernel(dtype, mode, vec), dim3((unsigned)*grid_out),
                       dim3(CL_BLOCK), CL_SLOTS + (size_t)p.cache_vecs * pack_bytes * cached,
                       stream, (unsigned)K, p);
    if (e == cudaSuccess) return CULOSS_OK;
    if (e != cudaErrorLaunchOutOfResources)
      return culoss__cuda_status(e, "launch of ce_cluster_kernel");
    /* K blocks of this much shared memory cannot be resident together here
       (a partitioned GPU, say): one block per row instead. A launch's
       configuration error is not sticky; clear it. */
    (void)cudaGetLastError();
    p.cache_vecs = one_block_cache;
  }
  *grid_out = capped_grid(ctx, (p.n + rows - 1) / rows);
  e = launch(select_ce_kernel(dtype, mode, s, vec), dim3((unsigned)*grid_out),
             dim3(CE_SHAPES[s].block), (size_t)p.cache_vecs * rows * pack_bytes * cached, stream,
             p);
  return e == cudaSuccess ? CULOSS_OK : culoss__cuda_status(e, "launch of ce_kernel");
}

} // namespace culoss_dev

extern "C" culoss_status culoss__cuda_cross_entropy(culoss_context *ctx, const void *args) {
  using namespace culoss_dev;
  const culoss__ce_args *a = static_cast<const culoss__ce_args *>(args);
  const cudaStream_t stream = (cudaStream_t)ctx->stream;
  const int mode = (int)a->mode;
  ce_params p0, p;
  ce_fill_params(ctx, a, &p0);
  /* 1. MEAN's denominator and W, when they depend on data. */
  culoss_status st = ce_launch_prep(&p0, &p, mode, stream);
  if (st != CULOSS_OK) return st;
  /* 2. The fused kernel (or NLL's gather). */
  int64_t grid = 0;
  if (p.n > 0) {
    st = ce_launch_main(ctx, p, mode, (int)a->dtype, &grid, stream);
    if (st != CULOSS_OK) return st;
  }
  /* 3. The reduced loss. */
  return culoss__finish_reduction(ctx, (int)grid, p.loss, p.reduction, p.div);
}
