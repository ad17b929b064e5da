/*
 * cross_entropy.cu: fused softmax cross-entropy (class-index and soft
 * targets) and NLL, forward and backward in one kernel.
 *
 * A group of TPR threads owns one row at a time (one thread for tiny c, 8
 * lanes of a warp or a whole warp for small c, the whole block for large c). Pass 1 streams the row once with 16-byte loads,
 * keeping an online log-sum-exp (max and rescaled sum) plus the sums that
 * label smoothing and soft targets need, and parks the raw row in shared
 * memory when it fits. One fixed-order reduction per row gives lse. Pass 2
 * (only when a gradient is requested) takes the row from shared memory (or
 * re-reads the part that did not fit) and writes the gradient once. The
 * normalised probabilities are never stored: the gradient is formed from
 * the logit and lse in registers, in fp32, and rounded once to the output
 * type, so the target column's p - 1 does not cancel in bf16.
 *
 * Traffic: one read of the logits and one write of the gradient when the
 * row fits in shared memory (c * sizeof(T) up to the per-block limit, about
 * 227 KB on Hopper); otherwise the uncached tail of the row is read twice,
 * the second time mostly from L2.
 *
 * Reductions over rows (SUM, MEAN) are deterministic: each block sums its
 * rows in a fixed order into a per-block partial in the context scratch, and
 * a one-block kernel sums the partials in a fixed order. The grid size
 * depends only on n and c, never on the device, so the result is bitwise
 * reproducible. MEAN's denominator (the sum of target weights) depends only
 * on the targets, so a small kernel computes it first and the fused kernel
 * can scale the gradient in the same pass. No atomics anywhere.
 *
 * A non-ignored target outside [0, c) writes NaN loss and a zero gradient
 * row and raises the context's deferred-error flag: never a device assert.
 */
#include <cuda_runtime.h>

#include <stdlib.h>
#include <string.h>

#include <type_traits>

#include <cub/block/block_reduce.cuh>

#include "../host/internal.h"
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

constexpr int PREP_THREADS = 256;
/* Shared memory kept free for the kernels' static shared memory (CUB temp
   storage, broadcasts); checked against the real figure at init. */
constexpr size_t STATIC_SMEM_RESERVE = 4096;

/* What a row's threads accumulate in pass 1. */
struct row_acc {
  culoss__lse_state lse; /* online max and rescaled sum of exp */
  float sx;              /* sum w_c (m - x_c) (smoothing) or sum w_c y'_c (m - x_c)
                            (soft), m = lse.m: non-negative terms (culoss__sx_term) */
  float sy;              /* the weights of sx: sum w_c, or sum w_c y'_c (soft) */
  float xt;              /* the target logit (index modes; one thread adds it) */
};

struct row_acc_merge {
  __device__ __forceinline__ row_acc operator()(const row_acc &a, const row_acc &b) const {
    row_acc r;
    r.lse = culoss__lse_merge(a.lse, b.lse);
    r.sx = culoss__sx_rebase(a.sx, a.sy, a.lse.m, r.lse.m) +
           culoss__sx_rebase(b.sx, b.sy, b.lse.m, r.lse.m);
    r.sy = a.sy + b.sy;
    r.xt = a.xt + b.xt;
    return r;
  }
};

__device__ __forceinline__ int64_t load_target(const ce_params &p, int64_t row) {
  return p.ttype == CULOSS_I32 ? (int64_t)static_cast<const int32_t *>(p.targets)[row]
                               : static_cast<const int64_t *>(p.targets)[row];
}

__device__ __forceinline__ float class_w(const ce_params &p, int64_t j) {
  return p.class_weight ? p.class_weight[j] : 1.0f;
}

/* b of culoss__ce_grad for index targets: (1-eps) w_y at the target column
   plus (eps/c) w_j; the class weight is only read when smoothing needs it. */
__device__ __forceinline__ float index_b(const ce_params &p, int64_t j, int64_t t, float tw,
                                         int64_t c) {
  float b = j == t ? tw : 0.0f;
  if (p.eps > 0.0f) b += p.eps / (float)c * class_w(p, j);
  return b;
}

/* --------------------------------------------------------------------- */
/* ce_prep_kernel: partial sums of the target weights (D) and class weights */
/* (W), one per block, in a fixed order.                                  */
/* --------------------------------------------------------------------- */
__global__ void __launch_bounds__(PREP_THREADS) ce_prep_kernel(ce_params p, int mode) {
  const int64_t stride = (int64_t)gridDim.x * PREP_THREADS;
  double d = 0.0, w = 0.0;
  if (mode != CULOSS__CE_SOFT) {
    for (int64_t i = (int64_t)blockIdx.x * PREP_THREADS + threadIdx.x; i < p.n; i += stride) {
      int64_t t = load_target(p, i);
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
        v = op(v, o);
      }
      v.lse.m = __shfl_sync(0xffffffffu, v.lse.m, 0, TPR);
      v.lse.s = __shfl_sync(0xffffffffu, v.lse.s, 0, TPR);
      v.sx = __shfl_sync(0xffffffffu, v.sx, 0, TPR);
      v.sy = __shfl_sync(0xffffffffu, v.sy, 0, TPR);
      v.xt = __shfl_sync(0xffffffffu, v.xt, 0, TPR);
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

/* --------------------------------------------------------------------- */
/* ce_kernel: the fused forward + backward.                               */
/* --------------------------------------------------------------------- */
template <typename T, int MODE, int BLOCK, int TPR, int VEC>
__global__ void __launch_bounds__(BLOCK) ce_kernel(ce_params p) {
  constexpr int ROWS = BLOCK / TPR;
  typedef pack<T, VEC> pack_t;
  typedef group_reduce<BLOCK, TPR> greduce;
  __shared__ typename greduce::storage gstore;
  __shared__ float block_scale[2]; /* gradient scale (SUM/MEAN), W */
  CULOSS_DYNAMIC_SMEM(smem_raw);

  const int grp = threadIdx.x / TPR;
  const int lane = threadIdx.x % TPR;
  const int64_t c = p.c;
  const int64_t nvec = c / VEC;        /* full packs per row */
  const int64_t tail0 = nvec * VEC;    /* first element of the partial pack */
  const float eps = p.eps;
  const float cap = p.cap;
  const T *x = static_cast<const T *>(p.x);
  T *grad = static_cast<T *>(p.grad);
  const T *probs = static_cast<const T *>(p.probs);
  pack_t *cache = reinterpret_cast<pack_t *>(smem_raw) + (int64_t)grp * p.cache_vecs;

  /* Per-call constants, computed by one thread in a fixed order. */
  if (threadIdx.x == 0) {
    block_scale[0] = p.reduction == CULOSS_REDUCTION_NONE
                         ? 1.0f
                         : reduced_grad_scale(p.reduction, p.grad_loss, p.div);
    block_scale[1] = p.need_wsum ? (float)sum_in_order(p.scratch->prep_wsum, p.prep_blocks)
                                 : (float)c;
  }
  __syncthreads();
  const float red_scale = block_scale[0];
  const float wsum = block_scale[1];
  const bool per_row = p.reduction == CULOSS_REDUCTION_NONE || p.rows_out;

  /* Sub-warp groups share their warp's shuffles: the groups of a warp walk
     their rows in lockstep (the loop runs while the warp's first row
     exists), and a group without work (past the last row, an ignored or
     out-of-range target) still makes the warp-wide calls a row makes, in
     the same order with the same shuffle modes and mask. (From sm_70 on,
     shfl.sync and bar.warp.sync may be reached at different instructions;
     the build targets sm_80 and up.) */
  constexpr bool SUBWARP = TPR > 1 && TPR < 32;
  constexpr int GPW = SUBWARP ? 32 / TPR : 1; /* groups per warp */
  auto idle_row = [&]() {
    if constexpr (SUBWARP) {
      if constexpr (MODE == CULOSS__NLL) {
        greduce::sync();
        greduce::sync();
      } else {
        row_acc z;
        z.lse = culoss__lse_empty();
        z.sx = z.sy = z.xt = 0.0f;
        (void)greduce::run(z, gstore);
        greduce::sync();
      }
    }
  };

  double my_loss = 0.0; /* lane 0 of each group: sum of its rows, in row order */
  for (int64_t base = (int64_t)blockIdx.x * ROWS + (grp - grp % GPW); base < p.n;
       base += (int64_t)gridDim.x * ROWS) {
    const int64_t row = base + grp % GPW;
    if (row >= p.n) { /* only a sub-warp group past the last row */
      idle_row();
      continue;
    }
    /* 64-bit offsets: row * ld exceeds 2^31 for large vocabularies. */
    const T *xr = x + row * p.ld;
    T *gr = grad ? grad + row * p.ld : nullptr;
    const T *yr = MODE == CULOSS__CE_SOFT ? probs + row * p.ld : nullptr;
    const float scale = p.reduction == CULOSS_REDUCTION_NONE
                            ? (p.grad_loss ? p.grad_loss[row] : 1.0f)
                            : red_scale;
    int64_t t = -1;
    float wt = 1.0f;
    if constexpr (MODE != CULOSS__CE_SOFT) {
      t = load_target(p, row);
      const bool ignored = t == p.ignore_index;
      const bool bad = !ignored && (t < 0 || t >= c);
      if (ignored || bad) {
        /* Ignored: loss 0, gradient 0, nothing read. Out of range: NaN loss,
           zero gradient, deferred error flag. */
        if (lane == 0) {
          const float l = bad ? __int_as_float(0x7fc00000) : 0.0f;
          if (bad) atomicOr(&p.scratch->error_flag, CULOSS__FLAG_TARGET);
          if (per_row)
            p.loss[row] = l;
          else
            my_loss += l;
          if (p.row_stats) {
            p.row_stats[2 * row] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
            p.row_stats[2 * row + 1] = make_float4(0.0f, 0.0f, 0.0f, 0.0f); /* scale 0 */
          }
        }
        if (gr) {
          pack_t zero;
#pragma unroll
          for (int k = 0; k < VEC; k++) zero.v[k] = from_f32<T>(0.0f);
          for (int64_t v = lane; v < nvec; v += TPR) store_pack<T, VEC>(gr + v * VEC, zero);
          for (int64_t j = tail0 + lane; j < c; j += TPR) gr[j] = from_f32<T>(0.0f);
        }
        idle_row();
        continue;
      }
      if (p.class_weight) wt = p.class_weight[t];
    }

    if constexpr (MODE == CULOSS__NLL) {
      /* Read the target value before anyone writes the (possibly aliased)
         gradient row. */
      float xt = 0.0f;
      if (lane == 0) xt = to_f32(xr[t]);
      greduce::sync();
      if (lane == 0) {
        const float l = -wt * xt;
        if (per_row)
          p.loss[row] = l;
        else
          my_loss += l;
      }
      if (gr) {
        const float gt = -wt * scale;
        for (int64_t v = lane; v < nvec; v += TPR) {
          pack_t o;
#pragma unroll
          for (int k = 0; k < VEC; k++) o.v[k] = from_f32<T>(v * VEC + k == t ? gt : 0.0f);
          store_pack<T, VEC>(gr + v * VEC, o);
        }
        for (int64_t j = tail0 + lane; j < c; j += TPR) gr[j] = from_f32<T>(j == t ? gt : 0.0f);
      }
      greduce::sync(); /* the next row's sync pattern starts clean */
      continue;
    } else {
      /* ---- pass 1: online log-sum-exp and the smoothing / soft sums ---- */
      row_acc acc;
      acc.lse = culoss__lse_empty();
      acc.sx = 0.0f;
      acc.sy = 0.0f;
      acc.xt = 0.0f;
      const bool want_sx = MODE == CULOSS__CE_SOFT || eps > 0.0f;
#pragma unroll 4
      for (int64_t v = lane; v < nvec; v += TPR) {
        pack_t pk = load_pack<T, VEC>(xr + v * VEC);
        if (v < p.cache_vecs) cache[v] = pk;
        float xv[VEC];
        float vmax = -INFINITY;
#pragma unroll
        for (int k = 0; k < VEC; k++) {
          xv[k] = culoss__softcap(to_f32(pk.v[k]), cap);
          vmax = fmaxf(vmax, xv[k]);
        }
        const float m = fmaxf(acc.lse.m, vmax);
        float s = m == acc.lse.m ? acc.lse.s : acc.lse.s * culoss__exp_diff(acc.lse.m, m);
#pragma unroll
        for (int k = 0; k < VEC; k++) s += culoss__exp_diff(xv[k], m);
        if (want_sx) { /* sx follows the running maximum (culoss__sx_rebase) */
          acc.sx = culoss__sx_rebase(acc.sx, acc.sy, acc.lse.m, m);
          if constexpr (MODE == CULOSS__CE_SOFT) {
            pack_t yk = load_pack<T, VEC>(yr + v * VEC);
#pragma unroll
            for (int k = 0; k < VEC; k++) {
              const int64_t j = v * VEC + k;
              const float wy = class_w(p, j) * ((1.0f - eps) * to_f32(yk.v[k]) + eps / (float)c);
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
      for (int64_t j = tail0 + lane; j < c; j += TPR) { /* the partial pack */
        const float xj = culoss__softcap(to_f32(xr[j]), cap);
        const float m = fmaxf(acc.lse.m, xj);
        if (want_sx) acc.sx = culoss__sx_rebase(acc.sx, acc.sy, acc.lse.m, m);
        acc.lse = culoss__lse_add(acc.lse, xj);
        if constexpr (MODE == CULOSS__CE_SOFT) {
          const float wy = class_w(p, j) * ((1.0f - eps) * to_f32(yr[j]) + eps / (float)c);
          acc.sy += wy;
          if (wy != 0.0f) acc.sx += culoss__sx_term(wy, xj, m);
        } else if (want_sx) {
          const float w = class_w(p, j);
          acc.sy += w;
          acc.sx += culoss__sx_term(w, xj, m);
        }
      }
      if constexpr (MODE == CULOSS__CE_INDEX)
        if (lane == 0) acc.xt = culoss__softcap(to_f32(xr[t]), cap);

      const row_acc r = greduce::run(acc, gstore);
      const float lse = culoss__lse_value(r.lse);
      /* lse = m + log_s, kept apart for accuracy with large logits */
      const float lse_m = r.lse.m, log_s = logf(r.lse.s);
      float coef_a;
      if constexpr (MODE == CULOSS__CE_INDEX)
        coef_a = (1.0f - eps) * wt + eps / (float)c * wsum + 2.0f * p.z * lse;
      else
        coef_a = r.sy + 2.0f * p.z * lse;

      if (lane == 0) {
        float l;
        if constexpr (MODE == CULOSS__CE_INDEX) {
          const float a = (1.0f - eps) * wt;
          l = lse_m == -INFINITY ? a * (lse - r.xt)
                                 : culoss__scaled_diff(a, lse_m, r.xt) + a * log_s;
          /* sum_j w_j (lse - x_j) = sx + W log_s: non-negative terms */
          if (eps > 0.0f) l += eps / (float)c * (r.sx + r.sy * log_s);
        } else {
          l = r.sx + r.sy * log_s;
        }
        l += p.z * lse * lse;
        if (per_row)
          p.loss[row] = l;
        else
          my_loss += l;
        /* what fused linear + CE needs to rebuild this row's gradient later */
        if (p.row_stats) {
          p.row_stats[2 * row] = make_float4(lse_m, log_s, coef_a, (1.0f - eps) * wt);
          p.row_stats[2 * row + 1] = make_float4(scale, 0.0f, 0.0f, 0.0f);
        }
      }

      /* ---- pass 2: the gradient, written once ---- */
      if (gr) {
        const float tw = (1.0f - eps) * wt; /* target column's extra term */
#pragma unroll 4
        for (int64_t v = lane; v < nvec; v += TPR) {
          const pack_t pk = v < p.cache_vecs ? cache[v] : load_pack<T, VEC>(xr + v * VEC);
          pack_t yk;
          if constexpr (MODE == CULOSS__CE_SOFT) yk = load_pack<T, VEC>(yr + v * VEC);
          pack_t o;
#pragma unroll
          for (int k = 0; k < VEC; k++) {
            const int64_t j = v * VEC + k;
            const float xs = culoss__softcap(to_f32(pk.v[k]), cap);
            float b;
            if constexpr (MODE == CULOSS__CE_SOFT)
              b = class_w(p, j) * ((1.0f - eps) * to_f32(yk.v[k]) + eps / (float)c);
            else
              b = index_b(p, j, t, tw, c);
            o.v[k] = from_f32<T>(
                culoss__ce_grad(xs, lse_m, log_s, coef_a, b, scale, culoss__softcap_grad(xs, cap)));
          }
          store_pack<T, VEC>(gr + v * VEC, o);
        }
        for (int64_t j = tail0 + lane; j < c; j += TPR) {
          const float xs = culoss__softcap(to_f32(xr[j]), cap);
          float b;
          if constexpr (MODE == CULOSS__CE_SOFT)
            b = class_w(p, j) * ((1.0f - eps) * to_f32(yr[j]) + eps / (float)c);
          else
            b = index_b(p, j, t, tw, c);
          gr[j] = from_f32<T>(
              culoss__ce_grad(xs, lse_m, log_s, coef_a, b, scale, culoss__softcap_grad(xs, cap)));
        }
      }
      /* The broadcast slot and TempStorage are reused by the next row. */
      greduce::sync();
    }
  }

  /* Lane 0 of each group holds its rows' sum; the block sums the groups. */
  if (!per_row)
    store_block_sum<BLOCK>(lane == 0 ? my_loss : 0.0, &p.scratch->partial_loss[blockIdx.x]);
}

/* ---------------------------------------------------------------------- */
/* dispatch                                                               */
/* ---------------------------------------------------------------------- */

/* The launch shapes: a thread per row for tiny rows (a warp would leave
   most lanes idle and keep too few bytes in flight), a warp per row for short
   rows, a 256-thread block per row for medium rows, a 1024-thread block per
   row for large vocabularies. */
enum shape {
  SHAPE_WARP = 0,
  SHAPE_BLOCK256 = 1,
  SHAPE_BLOCK1024 = 2,
  SHAPE_THREAD = 3,
  SHAPE_SUBWARP = 4
};

/* Up to 16 classes a thread per row; up to 128, 8 lanes per row (4 rows per
   warp: a warp per row would leave most lanes without a 16-byte pack, as
   PyTorch's persistent softmax avoids with sub-warp widths); then a warp,
   then a block. The cuts are from lane counts, not yet measured
   (bench/NOTES.md). */
inline shape pick_shape(int64_t c) {
  if (c <= 16) return SHAPE_THREAD;
  if (c <= 128) return SHAPE_SUBWARP;
  if (c <= 1024) return SHAPE_WARP;
  if (c <= 16384) return SHAPE_BLOCK256;
  return SHAPE_BLOCK1024;
}

template <int S> struct shape_dims;
template <> struct shape_dims<SHAPE_THREAD> { static constexpr int block = 256, tpr = 1; };
template <> struct shape_dims<SHAPE_SUBWARP> { static constexpr int block = 256, tpr = 8; };
template <> struct shape_dims<SHAPE_WARP> { static constexpr int block = 256, tpr = 32; };
template <> struct shape_dims<SHAPE_BLOCK256> { static constexpr int block = 256, tpr = 256; };
template <> struct shape_dims<SHAPE_BLOCK1024> { static constexpr int block = 1024, tpr = 1024; };

template <typename T, int MODE, int S, int VEC> constexpr void (*kernel_ptr())(ce_params) {
  return ce_kernel<T, MODE, shape_dims<S>::block, shape_dims<S>::tpr, VEC>;
}

/* Calls f.template operator()<T, MODE, S, VEC>() for every instantiation. */
template <typename F> void for_each_kernel(F &&f);

template <typename T, int MODE, int S, typename F> void for_vec(F &f) {
  f.template operator()<T, MODE, S, vec16<T>::value>();
  f.template operator()<T, MODE, S, 1>();
}
template <typename T, int MODE, typename F> void for_shape(F &f) {
  for_vec<T, MODE, SHAPE_THREAD>(f);
  for_vec<T, MODE, SHAPE_SUBWARP>(f);
  for_vec<T, MODE, SHAPE_WARP>(f);
  for_vec<T, MODE, SHAPE_BLOCK256>(f);
  for_vec<T, MODE, SHAPE_BLOCK1024>(f);
}
template <typename T, typename F> void for_mode(F &f) {
  for_shape<T, CULOSS__CE_INDEX>(f);
  for_shape<T, CULOSS__CE_SOFT>(f);
  for_shape<T, CULOSS__NLL>(f);
}
template <typename F> void for_each_kernel(F &&f) {
  for_mode<float>(f);
  for_mode<__half>(f);
  for_mode<__nv_bfloat16>(f);
}

struct init_visitor {
  size_t smem_optin;
  culoss_status st;
  template <typename T, int MODE, int S, int VEC> void operator()() {
    if (st != CULOSS_OK) return;
    /* the C API, which takes the kernel's address as const void * */
    const void *k = reinterpret_cast<const void *>(kernel_ptr<T, MODE, S, VEC>());
    cudaFuncAttributes attr;
    cudaError_t e = cudaFuncGetAttributes(&attr, k);
    if (e != cudaSuccess) {
      st = culoss__cuda_status(e, "cudaFuncGetAttributes(ce_kernel)");
      return;
    }
    if (attr.sharedSizeBytes > STATIC_SMEM_RESERVE) {
      st = culoss__error(CULOSS_ERROR_INTERNAL,
                         "ce_kernel static shared memory %zu exceeds the reserve %zu",
                         (size_t)attr.sharedSizeBytes, STATIC_SMEM_RESERVE);
      return;
    }
    e = cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             (int)(smem_optin - STATIC_SMEM_RESERVE));
    if (e != cudaSuccess)
      st = culoss__cuda_status(e, "cudaFuncSetAttribute(ce_kernel, MaxDynamicSharedMemorySize)");
  }
};

struct launch_visitor {
  /* inputs */
  int want_mode, want_shape, want_vec, dtype;
  ce_params p;
  int64_t grid;
  size_t smem;
  cudaStream_t stream;
  /* output */
  int launched;
  cudaError_t err;
  template <typename T, int MODE, int S, int VEC> void operator()() {
    if (launched || MODE != want_mode || S != want_shape || VEC != want_vec) return;
    const int dt = sizeof(T) == 4 ? CULOSS_F32
                   : (std::is_same<T, __half>::value ? CULOSS_F16 : CULOSS_BF16);
    if (dt != dtype) return;
    err = launch(kernel_ptr<T, MODE, S, VEC>(), dim3((unsigned)grid), dim3(shape_dims<S>::block),
                 smem, stream, p);
    launched = 1;
  }
};

inline int rows_of(shape s) {
  switch (s) {
  case SHAPE_THREAD: return shape_dims<SHAPE_THREAD>::block / shape_dims<SHAPE_THREAD>::tpr;
  case SHAPE_SUBWARP: return shape_dims<SHAPE_SUBWARP>::block / shape_dims<SHAPE_SUBWARP>::tpr;
  case SHAPE_WARP: return shape_dims<SHAPE_WARP>::block / shape_dims<SHAPE_WARP>::tpr;
  case SHAPE_BLOCK256: return shape_dims<SHAPE_BLOCK256>::block / shape_dims<SHAPE_BLOCK256>::tpr;
  default: return shape_dims<SHAPE_BLOCK1024>::block / shape_dims<SHAPE_BLOCK1024>::tpr;
  }
}

} // namespace
} // namespace culoss_dev

using namespace culoss_dev;

extern "C" culoss_status culoss__cuda_kernels_init(culoss_context *ctx) {
  init_visitor v{ctx->smem_optin, CULOSS_OK};
  if (ctx->smem_optin <= STATIC_SMEM_RESERVE)
    return culoss__error(CULOSS_ERROR_NOT_SUPPORTED, "device shared memory per block too small");
  for_each_kernel(v);
  return v.st;
}

namespace culoss_dev {

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
  const cudaError_t e = launch(ce_prep_kernel, dim3((unsigned)blocks), dim3(PREP_THREADS), 0,
                               stream, *p, mode);
  return e == cudaSuccess ? CULOSS_OK : culoss__cuda_status(e, "launch of ce_prep_kernel");
}

/* Tuning and testing knobs (documented in culoss.h): CULOSS_CE_SHAPE forces
   the launch shape (1, 8, 32, 256 or 1024 threads per row), CULOSS_CE_CACHE_BYTES
   caps the shared memory that keeps rows for pass 2 (0: re-read them). */
static shape shape_for(int64_t c) {
  const char *e = getenv("CULOSS_CE_SHAPE");
  if (e && !strcmp(e, "thread")) return SHAPE_THREAD;
  if (e && !strcmp(e, "8")) return SHAPE_SUBWARP;
  if (e && !strcmp(e, "warp")) return SHAPE_WARP;
  if (e && !strcmp(e, "256")) return SHAPE_BLOCK256;
  if (e && !strcmp(e, "1024")) return SHAPE_BLOCK1024;
  return pick_shape(c);
}

static size_t cache_budget(size_t available) {
  const char *e = getenv("CULOSS_CE_CACHE_BYTES");
  if (e == nullptr || *e == '\0') return available;
  const unsigned long long b = strtoull(e, nullptr, 10);
  return b < available ? (size_t)b : available;
}

culoss_status ce_launch_main(culoss_context *ctx, ce_params &p, int mode, int dtype,
                             int64_t *grid_out, cudaStream_t stream) {
  const size_t esize = culoss__dtype_size((culoss_dtype)dtype);
  const shape s = shape_for(p.c);
  const int vec16n = (int)(16 / esize);
  const bool vec_ok = aligned16(p.x) && aligned16(p.grad) &&
                      (mode != CULOSS__CE_SOFT || aligned16(p.probs)) &&
                      ((p.ld * (int64_t)esize) % 16) == 0;
  const int vec = vec_ok ? vec16n : 1;
  const int rows = rows_of(s);
  const size_t pack_bytes = (size_t)vec * esize;
  /* Rows of the soft and index modes are kept in shared memory for pass 2
     when a gradient is wanted; as much of each row as fits. */
  p.cache_vecs = 0;
  if (p.grad && mode != CULOSS__NLL) {
    const size_t budget = cache_budget(ctx->smem_optin - STATIC_SMEM_RESERVE);
    const int64_t fit = (int64_t)(budget / ((size_t)rows * pack_bytes));
    const int64_t nvec = p.c / vec;
    p.cache_vecs = nvec < fit ? nvec : fit;
  }
  const int64_t grid = capped_grid(ctx, (p.n + rows - 1) / rows);
  *grid_out = grid;
  launch_visitor lv{mode, (int)s, vec, dtype, p, grid,
                    (size_t)p.cache_vecs * rows * pack_bytes, stream, 0, cudaSuccess};
  for_each_kernel(lv);
  if (!lv.launched)
    return culoss__error(CULOSS_ERROR_INTERNAL, "no ce_kernel for mode %d shape %d vec %d", mode,
                         (int)s, vec);
  return lv.err == cudaSuccess ? CULOSS_OK : culoss__cuda_status(lv.err, "launch of ce_kernel");
}

} // namespace culoss_dev

extern "C" culoss_status culoss__cuda_cross_entropy(culoss_context *ctx, const void *args) {
  const culoss__ce_args *a = static_cast<const culoss__ce_args *>(args);
  const cudaStream_t stream = (cudaStream_t)ctx->stream;
  const int mode = (int)a->mode;
  ce_params p0, p;
  ce_fill_params(ctx, a, &p0);
  /* 1. MEAN's denominator and W, when they depend on data. */
  culoss_status st = ce_launch_prep(&p0, &p, mode, stream);
  if (st != CULOSS_OK) return st;
  /* 2. The fused kernel. */
  int64_t grid = 0;
  if (p.n > 0) {
    st = ce_launch_main(ctx, p, mode, (int)a->dtype, &grid, stream);
    if (st != CULOSS_OK) return st;
  }
  /* 3. The reduced loss. */
  return culoss__finish_reduction(ctx, (int)grid, p.loss, p.reduction, p.div);
}
