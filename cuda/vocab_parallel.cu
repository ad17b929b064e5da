/*
 * vocab_parallel.cu: vocabulary-parallel cross-entropy's two phases on this
 * rank's slice of the classes.
 *
 * Stats: a warp per row streams the slice once (16-byte packs) keeping the
 * online log-sum-exp and, for label smoothing, the non-negative smoothing
 * sums (loss_math.h); a fixed-order warp butterfly merges the lanes, and
 * lane 0 writes the row's 32-byte record (backend.h), with the target's
 * logit and weight where this slice owns the target. Record n, the slice's
 * class-weight sum and width, comes from a one-block kernel.
 *
 * Finish: a small kernel sums MEAN's denominator from the gathered records
 * (the owner's w_t per row, fixed order) and W from the ranks' record n;
 * then a warp per row merges its row's records in rank order (every lane
 * and every rank the same sequence of operations, hence bitwise the same
 * loss on every rank), lane 0 writes the loss, and the warp writes the
 * slice's gradient from the merged statistics (culoss__ce_grad), reading
 * each logit again. Reduced losses go through the shared deterministic
 * reduction. A target outside [0, v_total), or one that no rank (or two)
 * owns, gives NaN loss, a zero gradient row and a deferred error.
 *
 * A warp per row at any width: enough for the slices of a large vocabulary
 * over many rows; not yet the CE kernel's shape table (few rows of a wide
 * slice leave most of the GPU idle).
 */
#include <cuda_runtime.h>

#include "backend.h"
#include "dtype.cuh"
#include "launch.cuh"
#include "loss_math.h"
#include "reduce.cuh"
#include "vocab_parallel.cuh"

namespace culoss_dev {
namespace {

constexpr int VP_THREADS = 256, VP_ROWS = VP_THREADS / 32;
enum { F_M, F_S, F_SX, F_SY, F_XT, F_WT, F_OWNED, F_U, NF };

/* The statistics a record carries, and their merge: lse state plus the
   smoothing sums and the entropy sum u, relative to the running maximum. */
struct vp_acc {
  culoss__lse_state lse;
  float sx, sy, u;
};
__device__ __forceinline__ vp_acc vp_merge(const vp_acc &a, const vp_acc &b) {
  vp_acc r;
  r.lse = culoss__lse_merge(a.lse, b.lse);
  r.sx = culoss__sx_rebase(a.sx, a.sy, a.lse.m, r.lse.m) +
         culoss__sx_rebase(b.sx, b.sy, b.lse.m, r.lse.m);
  r.sy = a.sy + b.sy;
  r.u = culoss__ent_rebase(a.u, culoss__lse_total(a.lse), a.lse.m, r.lse.m) +
        culoss__ent_rebase(b.u, culoss__lse_total(b.lse), b.lse.m, r.lse.m);
  return r;
}

__device__ __forceinline__ float cw_at(const vp_params &p, int64_t j) {
  return p.class_weight ? p.class_weight[j] : 1.0f;
}

/* ---- stats ---- */
template <typename T, int VEC>
__global__ void __launch_bounds__(VP_THREADS) vp_stats_kernel(vp_params p) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t c = p.c, nvec = c / VEC;
  const bool smooth = p.eps > 0.0f;
  for (int64_t row = (int64_t)blockIdx.x * VP_ROWS + warp; row < p.n;
       row += (int64_t)gridDim.x * VP_ROWS) {
    const T *xr = static_cast<const T *>(p.x) + row * p.ld; /* 64-bit offsets */
    vp_acc acc;
    acc.lse = culoss__lse_empty();
    acc.sx = acc.sy = acc.u = 0.0f;
    auto add = [&](float xv, int64_t j) {
      const float x = culoss__softcap(xv, p.cap);
      const float m = fmaxf(acc.lse.m, x);
      acc.u = culoss__ent_rebase(acc.u, culoss__lse_total(acc.lse), acc.lse.m, m) +
              culoss__ent_term(culoss__exp_diff(x, m), x, m);
      if (smooth) {
        const float w = cw_at(p, j);
        acc.sx = culoss__sx_rebase(acc.sx, acc.sy, acc.lse.m, m) + culoss__sx_term(w, x, m);
        acc.sy += w;
      }
      acc.lse = culoss__lse_add(acc.lse, x);
    };
    for (int64_t v = lane; v < nvec; v += 32) {
      const pack<T, VEC> pk = load_pack<T, VEC>(xr + v * VEC);
#pragma unroll
      for (int k = 0; k < VEC; k++) add(to_f32(pk.v[k]), v * VEC + k);
    }
    for (int64_t j = nvec * VEC + lane; j < c; j += 32) add(to_f32(xr[j]), j);
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
      vp_acc o;
      o.lse.m = __shfl_xor_sync(0xffffffffu, acc.lse.m, off);
      o.lse.s = __shfl_xor_sync(0xffffffffu, acc.lse.s, off);
      o.sx = __shfl_xor_sync(0xffffffffu, acc.sx, off);
      o.sy = __shfl_xor_sync(0xffffffffu, acc.sy, off);
      o.u = __shfl_xor_sync(0xffffffffu, acc.u, off);
      acc = vp_merge(acc, o);
    }
    if (lane == 0) {
      const int64_t t = culoss__target_at(p.targets, p.ttype, row);
      float *r = p.stats + (p.row0 + row) * NF;
      const bool owned = t != p.ignore_index && t >= p.v_begin && t < p.v_begin + c;
      r[F_M] = acc.lse.m, r[F_S] = acc.lse.s, r[F_SX] = acc.sx, r[F_SY] = acc.sy;
      r[F_XT] = owned ? culoss__softcap(to_f32(xr[t - p.v_begin]), p.cap) : 0.0f;
      r[F_WT] = owned ? cw_at(p, t - p.v_begin) : 0.0f;
      r[F_OWNED] = owned ? 1.0f : 0.0f;
      r[F_U] = acc.u;
    }
  }
}

/* Record n: the slice's class-weight sum (fixed order) and width. */
__global__ void __launch_bounds__(VP_THREADS) vp_slice_kernel(vp_params p) {
  double w = 0.0;
  for (int64_t j = threadIdx.x; j < p.c; j += VP_THREADS) w += cw_at(p, j);
  store_block_sum<VP_THREADS>(w, &p.scratch->prep_wsum[0]);
  if (threadIdx.x == 0) {
    culoss__vp_slice_record(p.stats + p.rec_n * NF, (float)p.scratch->prep_wsum[0], p.v_begin, p.c);
  }
}

/* ---- finish ---- */

/* Row i's merged records; owners counts the ranks that own its target. */
struct vp_row {
  vp_acc acc;
  float xt, wt;
  int owners;
};
__device__ __forceinline__ vp_row merge_row(const vp_params &p, int64_t row) {
  vp_row r;
  r.acc.lse = culoss__lse_empty();
  r.acc.sx = r.acc.sy = r.acc.u = 0.0f;
  r.xt = 0.0f, r.wt = 1.0f, r.owners = 0;
  for (int k = 0; k < p.ranks; k++) { /* rank order */
    const float *q = p.gathered + ((int64_t)k * (p.rec_n + 1) + p.row0 + row) * NF;
    vp_acc b;
    b.lse.m = q[F_M], b.lse.s = q[F_S], b.sx = q[F_SX], b.sy = q[F_SY], b.u = q[F_U];
    r.acc = vp_merge(r.acc, b);
    if (q[F_OWNED] != 0.0f) r.xt = q[F_XT], r.wt = q[F_WT], r.owners++;
  }
  return r;
}

/* Partial sums of MEAN's D (the owners' w_t, fixed order) and, in block 0,
   W and the slices' total width. */
__global__ void __launch_bounds__(VP_THREADS) vp_prep_kernel(vp_params p) {
  double d = 0.0;
  for (int64_t i = (int64_t)blockIdx.x * VP_THREADS + threadIdx.x; i < p.n;
       i += (int64_t)gridDim.x * VP_THREADS) {
    const int64_t t = culoss__target_at(p.targets, p.ttype, i);
    if (t == p.ignore_index || t < 0 || t >= p.v_total) continue;
    for (int k = 0; k < p.ranks; k++) {
      const float *q = p.gathered + ((int64_t)k * (p.rec_n + 1) + i) * NF;
      if (q[F_OWNED] != 0.0f) d += q[F_WT];
    }
  }
  store_block_sum<VP_THREADS>(d, &p.scratch->prep_denom[blockIdx.x]);
  if (blockIdx.x == 0 && threadIdx.x == 0) {
    double w = 0.0;
    for (int k = 0; k < p.ranks; k++) w += p.gathered[((int64_t)k * (p.rec_n + 1) + p.rec_n) * NF];
    p.scratch->prep_wsum[0] = w;
    if (!culoss__vp_slices_tile(p.gathered, p.ranks, p.rec_n, p.v_total))
      atomicOr(&p.scratch->error_flag, CULOSS__FLAG_SLICES);
  }
}

template <typename T, int VEC>
__global__ void __launch_bounds__(VP_THREADS) vp_finish_kernel(vp_params p) {
  __shared__ float consts[2];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t c = p.c, nvec = c / VEC;
  const float eps = p.eps, C = (float)p.v_total;
  if (threadIdx.x == 0) { /* once per block, fixed order: every block the same values */
    consts[0] = p.reduction == CULOSS_REDUCTION_NONE
                    ? 1.0f
                    : reduced_grad_scale(p.reduction, p.grad_loss, p.div);
    consts[1] = (float)p.scratch->prep_wsum[0];
  }
  __syncthreads();
  const float red_scale = consts[0], wsum = consts[1];
  const bool per_row = p.reduction == CULOSS_REDUCTION_NONE || p.rows_out;
  double block_sum = 0.0;
  for (int64_t row = (int64_t)blockIdx.x * VP_ROWS + warp; row < p.n;
       row += (int64_t)gridDim.x * VP_ROWS) {
    const int64_t t = culoss__target_at(p.targets, p.ttype, row);
    const bool ignored = t == p.ignore_index;
    const vp_row r = merge_row(p, row);
    const bool bad = !ignored && (t < 0 || t >= p.v_total);
    const bool torn = !ignored && !bad && r.owners != 1; /* overlapping or missing slices */
    const bool live = !ignored && !bad && !torn;
    const float scale =
        p.reduction == CULOSS_REDUCTION_NONE ? (p.grad_loss ? p.grad_loss[row] : 1.0f) : red_scale;
    const float lse = culoss__lse_value(r.acc.lse), m = r.acc.lse.m;
    const float log_s = culoss__lse_log_s(r.acc.lse), rest = culoss__lse_rest(r.acc.lse);
    const float tw = (1.0f - eps) * r.wt;
    const culoss__ce_coef coef_a = {tw, eps / C * wsum + 2.0f * p.z * lse};
    if (lane == 0 && !p.grad_only) {
      float l = 0.0f;
      if (bad || torn) {
        l = culoss__nan();
        atomicOr(&p.scratch->error_flag, bad ? CULOSS__FLAG_TARGET : CULOSS__FLAG_SLICES);
      } else if (live) {
        l = m == -INFINITY ? tw * (lse - r.xt) : culoss__scaled_diff(tw, m, r.xt) + tw * log_s;
        if (eps > 0.0f) l += eps / C * (r.acc.sx + r.acc.sy * log_s);
        l += p.z * lse * lse;
      }
      if (per_row)
        p.loss[row] = l;
      else
        block_sum += l;
      const float none = bad || torn ? culoss__nan() : 0.0f;
      if (p.lse_out) p.lse_out[row] = live ? lse : none;
      if (p.ent_out) p.ent_out[row] = live ? culoss__ent_value(r.acc.u, r.acc.lse) : none;
    }
    if (p.grad == nullptr) continue;
    const T *xr = static_cast<const T *>(p.x) + row * p.ld;
    T *gr = static_cast<T *>(p.grad) + row * p.ld;
    /* each lane reads the logits it then overwrites: in place is safe */
    auto grad_at = [&](float xv, int64_t j) -> T {
      if (!live) return from_f32<T>(0.0f);
      const float xs = culoss__softcap(xv, p.cap);
      culoss__ce_coef b;
      b.w = p.v_begin + p.col0 + j == t ? tw : 0.0f;
      b.k = eps > 0.0f ? eps / C * cw_at(p, p.col0 + j) : 0.0f;
      return from_f32<T>(
          culoss__ce_grad(xs, m, rest, coef_a, b, scale, culoss__softcap_grad(xs, p.cap)));
    };
    for (int64_t v = lane; v < nvec; v += 32) {
      const pack<T, VEC> pk = load_pack<T, VEC>(xr + v * VEC);
      pack<T, VEC> o;
#pragma unroll
      for (int k = 0; k < VEC; k++) o.v[k] = grad_at(to_f32(pk.v[k]), v * VEC + k);
      store_pack<T, VEC>(gr + v * VEC, o);
    }
    for (int64_t j = nvec * VEC + lane; j < c; j += 32) gr[j] = grad_at(to_f32(xr[j]), j);
  }
  if (!per_row && !p.grad_only)
    store_block_sum<VP_THREADS>(lane == 0 ? block_sum : 0.0, &p.scratch->partial_loss[blockIdx.x]);
}

} // namespace

vp_params vp_fill(culoss_context *ctx, const culoss__vp_args *a) {
  vp_params p;
  p.n = a->n, p.c = a->c_local, p.ld = a->ld, p.v_begin = a->vp->v_begin;
  p.v_total = a->vp->v_total, p.row0 = 0, p.rec_n = a->n, p.rows_out = 0;
  p.col0 = 0, p.grad_only = 0;
  p.ranks = a->vp->ranks;
  p.x = a->x, p.targets = a->targets, p.ttype = (int)a->ttype;
  p.ignore_index = a->o.ignore_index, p.class_weight = a->o.class_weight;
  p.eps = a->o.label_smoothing, p.z = a->o.z_loss, p.cap = a->o.logit_softcap;
  p.stats = static_cast<float *>(a->stats);
  p.gathered = static_cast<const float *>(a->gathered);
  p.loss = a->loss, p.grad = a->grad, p.grad_loss = a->grad_loss;
  p.lse_out = a->lse, p.ent_out = a->entropy;
  p.reduction = (int)a->o.reduction;
  p.div = count_divisor(0.0);
  p.div.normalizer = a->o.normalizer;
  p.scratch = ctx->scratch;
  return p;
}

static bool vec_ok(const vp_params &p, int dtype) {
  const int64_t es = (int64_t)culoss__dtype_size((culoss_dtype)dtype);
  return aligned16(p.x) && aligned16(p.grad) && (p.ld * es) % 16 == 0;
}

culoss_status vp_launch_stats(culoss_context *ctx, const vp_params &p, int dtype, cudaStream_t s) {
  if (p.n == 0) return CULOSS_OK;
  const bool vec = vec_ok(p, dtype);
  const int64_t grid = capped_grid(ctx, (p.n + VP_ROWS - 1) / VP_ROWS);
  const cudaError_t e = with_dtype(dtype, [&](auto t) {
    typedef decltype(t) T;
    return launch(vec ? vp_stats_kernel<T, vec16<T>::value> : vp_stats_kernel<T, 1>,
                  dim3((unsigned)grid), dim3(VP_THREADS), 0, s, p);
  });
  return e == cudaSuccess ? CULOSS_OK : culoss__cuda_status(e, "launch of vp_stats_kernel");
}

culoss_status vp_launch_slice(const vp_params &p, cudaStream_t s) {
  const cudaError_t e = launch(vp_slice_kernel, dim3(1), dim3(VP_THREADS), 0, s, p);
  return e == cudaSuccess ? CULOSS_OK : culoss__cuda_status(e, "launch of vp_slice_kernel");
}

culoss_status vp_launch_prep(vp_params &p, cudaStream_t s) {
  int64_t prep = (p.rec_n + VP_THREADS - 1) / VP_THREADS;
  if (prep < 1) prep = 1;
  if (prep > CULOSS_MAX_PREP_BLOCKS) prep = CULOSS_MAX_PREP_BLOCKS;
  if (!p.div.normalizer) p.div.prep = p.scratch->prep_denom, p.div.prep_count = (int)prep;
  const cudaError_t e = launch(vp_prep_kernel, dim3((unsigned)prep), dim3(VP_THREADS), 0, s, p);
  return e == cudaSuccess ? CULOSS_OK : culoss__cuda_status(e, "launch of vp_prep_kernel");
}

culoss_status vp_launch_finish(culoss_context *ctx, const vp_params &p, int dtype,
                               int64_t *grid_out, cudaStream_t s) {
  *grid_out = 0;
  if (p.n == 0) return CULOSS_OK;
  const bool vec = vec_ok(p, dtype);
  const int64_t grid = capped_grid(ctx, (p.n + VP_ROWS - 1) / VP_ROWS);
  *grid_out = grid;
  const cudaError_t e = with_dtype(dtype, [&](auto t) {
    typedef decltype(t) T;
    return launch(vec ? vp_finish_kernel<T, vec16<T>::value> : vp_finish_kernel<T, 1>,
                  dim3((unsigned)grid), dim3(VP_THREADS), 0, s, p);
  });
  return e == cudaSuccess ? CULOSS_OK : culoss__cuda_status(e, "launch of vp_finish_kernel");
}

} // namespace culoss_dev

extern "C" culoss_status culoss__cuda_vocab_parallel(culoss_context *ctx, const void *args) {
  using namespace culoss_dev;
  const culoss__vp_args *a = static_cast<const culoss__vp_args *>(args);
  const cudaStream_t s = (cudaStream_t)ctx->stream;
  vp_params p = vp_fill(ctx, a);
  if (a->phase == CULOSS__VP_STATS) {
    const culoss_status st = vp_launch_stats(ctx, p, (int)a->dtype, s);
    return st != CULOSS_OK ? st : vp_launch_slice(p, s);
  }
  culoss_status st = vp_launch_prep(p, s);
  if (st != CULOSS_OK) return st;
  int64_t grid = 0;
  if ((st = vp_launch_finish(ctx, p, (int)a->dtype, &grid, s)) != CULOSS_OK) return st;
  return culoss__finish_reduction(ctx, (int)grid, p.loss, p.reduction, p.div);
}
