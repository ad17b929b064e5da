/*
 * multi_margin.cu: multi-class hinge (PyTorch's multi_margin_loss), loss and
 * gradient in one pass over each row.
 *
 * A warp owns a row. Every lane first reads the target score x_y; after a
 * __syncwarp (the gradient may overwrite the row in place) each lane streams
 * its 16-byte packs once, writing h_j = g w_y (p == 1 ? 1 : 2 z_j) / c for
 * every violated margin z_j = margin - x_y + x_j > 0 (0 elsewhere) while
 * summing the loss terms and the h_j. A fixed-order warp reduction gives the
 * row's loss and -sum h_j, which lane 0 writes at the target column last.
 * Reduced losses go through the shared deterministic reduction. The
 * multi-label margin (mlm_kernel) is below.
 */
#include <cuda_runtime.h>

#include "backend.h"
#include "dtype.cuh"
#include "launch.cuh"
#include "loss_math.h"
#include "reduce.cuh"

namespace culoss_dev {
namespace {

constexpr int MM_THREADS = 256;
constexpr int MM_ROWS = MM_THREADS / 32;

struct mm_params {
  int64_t n, c, ld;
  const void *x;
  const void *targets;
  int ttype;
  float *loss;
  void *grad;
  const float *grad_loss;
  const float *class_weight;
  float margin;
  int power;
  int reduction;
  divisor_src div;
  culoss__scratch *scratch;
};

/* Sum over the warp into lane 0, in a fixed order. */
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  return v;
}

/* A row with a target out of range: the deferred error, NaN loss, zero
   gradient. Called by the `count` threads that share the row (rank 0..). */
template <typename T>
__device__ __forceinline__ void bad_row(const mm_params &p, int64_t row, T *gr, int rank, int count,
                                        bool reduced, double &my_loss) {
  if (rank == 0) {
    atomicOr(&p.scratch->error_flag, CULOSS__FLAG_TARGET);
    if (reduced)
      my_loss += culoss__nan();
    else
      p.loss[row] = culoss__nan();
  }
  if (gr)
    for (int64_t j = rank; j < p.c; j += count) gr[j] = from_f32<T>(0.0f);
}

template <typename T, int VEC>
__global__ void __launch_bounds__(MM_THREADS) mm_kernel(mm_params p) {
  typedef pack<T, VEC> pack_t;
  const int grp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const bool reduced = p.reduction != CULOSS_REDUCTION_NONE;
  const float red_scale = reduced ? reduced_grad_scale(p.reduction, p.grad_loss, p.div) : 1.0f;
  const int64_t c = p.c, nvec = c / VEC, tail0 = nvec * VEC;
  const float inv_c = 1.0f / (float)c;
  const T *x = static_cast<const T *>(p.x);
  T *grad = static_cast<T *>(p.grad);
  double my_loss = 0.0;

  for (int64_t row = (int64_t)blockIdx.x * MM_ROWS + grp; row < p.n;
       row += (int64_t)gridDim.x * MM_ROWS) {
    const T *xr = x + row * p.ld; /* 64-bit row offsets */
    T *gr = grad ? grad + row * p.ld : nullptr;
    const int64_t t = culoss__target_at(p.targets, p.ttype, row);
    if (t < 0 || t >= c) {
      bad_row(p, row, gr, lane, 32, reduced, my_loss);
      continue;
    }
    const float wy = p.class_weight ? p.class_weight[t] : 1.0f;
    const float xy = to_f32(xr[t]);
    __syncwarp(); /* every lane holds x_y before any lane writes the row */
    const float s = reduced ? red_scale : (p.grad_loss ? p.grad_loss[row] : 1.0f);
    const float hw = s * wy * inv_c;
    float l = 0.0f, hsum = 0.0f;
    auto term = [&](float xj, int64_t j) -> float {
      if (j == t) return 0.0f; /* written by lane 0 at the end */
      const float z = p.margin - xy + xj;
      if (!(z > 0.0f)) return 0.0f;
      l += p.power == 1 ? z : z * z;
      const float h = hw * (p.power == 1 ? 1.0f : 2.0f * z);
      hsum += h;
      return h;
    };
    for (int64_t v = lane; v < nvec; v += 32) {
      const pack_t xp = load_pack<T, VEC>(xr + v * VEC);
      pack_t g;
#pragma unroll
      for (int k = 0; k < VEC; k++) g.v[k] = from_f32<T>(term(to_f32(xp.v[k]), v * VEC + k));
      if (gr) store_pack<T, VEC>(gr + v * VEC, g);
    }
    for (int64_t j = tail0 + lane; j < c; j += 32) {
      const float h = term(to_f32(xr[j]), j);
      if (gr) gr[j] = from_f32<T>(h);
    }
    l = warp_sum(l);
    hsum = warp_sum(hsum);
    __syncwarp(); /* the placeholder at the target column is written */
    if (lane == 0) {
      if (gr) gr[t] = from_f32<T>(-hsum);
      const float row_loss = wy * l * inv_c;
      if (reduced)
        my_loss += row_loss;
      else
        p.loss[row] = row_loss;
    }
  }
  if (reduced)
    store_block_sum<MM_THREADS>(lane == 0 ? my_loss : 0.0, &p.scratch->partial_loss[blockIdx.x]);
}

/* Multi-label margin: a block per row (grid-stride). The row's target list
   (up to the first -1), the targets' scores, a bit per class and a counter
   per list entry live in dynamic shared memory; each thread takes classes
   j (strided), adds max(0, 1 - x_t + x_j) over the list for a non-target
   j, writes g/c times its active pairs as j's gradient and counts each
   entry's active pairs (shared int atomics: the counts, hence the result,
   do not depend on their order); after a barrier the targets' gradients are
   -g/c times their entries' counts. Every score is read once (the targets'
   in the first step, before any gradient is written: in place is safe). */
template <typename T> __global__ void __launch_bounds__(MM_THREADS) mlm_kernel(mm_params p) {
  CULOSS_DYNAMIC_SMEM(mlm_smem);
  const int64_t c = p.c, nw = (c + 31) / 32;
  uint32_t *mask = reinterpret_cast<uint32_t *>(mlm_smem);
  float *xt = reinterpret_cast<float *>(mask + nw);
  int *list = reinterpret_cast<int *>(xt + c), *cnt = list + c;
  __shared__ int s_k;
  __shared__ double s_sum;
  const bool reduced = p.reduction != CULOSS_REDUCTION_NONE;
  const float red_scale = reduced ? reduced_grad_scale(p.reduction, p.grad_loss, p.div) : 1.0f;
  const float inv_c = 1.0f / (float)c;
  const T *x = static_cast<const T *>(p.x);
  T *grad = static_cast<T *>(p.grad);
  double my_loss = 0.0;
  for (int64_t row = blockIdx.x; row < p.n; row += gridDim.x) {
    const T *xr = x + row * p.ld;
    T *gr = grad ? grad + row * p.ld : nullptr;
    /* the list's length (the first -1) and the entries' range, every entry */
    if (threadIdx.x == 0) s_k = (int)c;
    __syncthreads();
    int first = (int)c, bad = 0;
    for (int64_t j = threadIdx.x; j < c; j += MM_THREADS) {
      const int64_t t = culoss__target_at(p.targets, p.ttype, row * c + j);
      if (t == -1 && j < first) first = (int)j;
      bad |= t < -1 || t >= c;
    }
    if (first < (int)c) atomicMin(&s_k, first);
    bad = __syncthreads_or(bad);
    const int k = s_k;
    if (bad) { /* block-uniform */
      bad_row(p, row, gr, (int)threadIdx.x, MM_THREADS, reduced, my_loss);
      __syncthreads(); /* s_k is rewritten by the next row */
      continue;
    }
    for (int64_t w = threadIdx.x; w < nw; w += MM_THREADS) mask[w] = 0u;
    __syncthreads();
    for (int q = threadIdx.x; q < k; q += MM_THREADS) {
      const int t = (int)culoss__target_at(p.targets, p.ttype, row * c + q);
      list[q] = t;
      xt[q] = to_f32(ld_elem(xr + t));
      cnt[q] = 0;
      atomicOr(&mask[t >> 5], 1u << (t & 31));
    }
    __syncthreads(); /* every target score read before any gradient is written */
    const float hw = (reduced ? red_scale : (p.grad_loss ? p.grad_loss[row] : 1.0f)) * inv_c;
    float l = 0.0f;
    for (int64_t j = threadIdx.x; j < c; j += MM_THREADS) {
      if (mask[j >> 5] >> (j & 31) & 1u) continue;
      const float xj = to_f32(ld_elem(xr + j));
      int active = 0;
      for (int q = 0; q < k; q++) {
        const float z = 1.0f - xt[q] + xj;
        if (z > 0.0f) { /* PyTorch's test: a NaN pair adds nothing */
          l += z;
          active++;
          atomicAdd(&cnt[q], 1);
        }
      }
      if (gr) st_elem(gr + j, from_f32<T>((float)active * hw));
    }
    __syncthreads(); /* the counts are complete */
    if (gr)
      for (int64_t j = threadIdx.x; j < c; j += MM_THREADS) {
        if (!(mask[j >> 5] >> (j & 31) & 1u)) continue;
        int pairs = 0;
        for (int q = 0; q < k; q++) pairs += list[q] == (int)j ? cnt[q] : 0;
        st_elem(gr + j, from_f32<T>(-(float)pairs * hw));
      }
    store_block_sum<MM_THREADS>((double)l, &s_sum); /* ends with a barrier */
    if (threadIdx.x == 0) {
      const float row_loss = (float)(s_sum * (double)inv_c);
      if (reduced)
        my_loss += row_loss;
      else
        p.loss[row] = row_loss;
    }
  }
  if (reduced)
    store_block_sum<MM_THREADS>(threadIdx.x == 0 ? my_loss : 0.0,
                                &p.scratch->partial_loss[blockIdx.x]);
}

/* Dynamic shared memory of mlm_kernel for c classes. */
inline size_t mlm_smem_bytes(int64_t c) { return (size_t)(4 * ((c + 31) / 32) + 12 * c); }

template <typename T>
cudaError_t launch_mm(const mm_params &p, bool vec, unsigned grid, cudaStream_t s) {
  if (vec) return launch(mm_kernel<T, vec16<T>::value>, dim3(grid), dim3(MM_THREADS), 0, s, p);
  return launch(mm_kernel<T, 1>, dim3(grid), dim3(MM_THREADS), 0, s, p);
}

} // namespace
} // namespace culoss_dev

using namespace culoss_dev;

extern "C" culoss_status culoss__cuda_multi_margin(culoss_context *ctx, const void *args) {
  const culoss__mm_args *a = static_cast<const culoss__mm_args *>(args);
  const cudaStream_t stream = (cudaStream_t)ctx->stream;
  const size_t es = culoss__dtype_size(a->dtype);
  mm_params p;
  p.n = a->n;
  p.c = a->c;
  p.ld = a->ld;
  p.x = a->x;
  p.targets = a->targets;
  p.ttype = (int)a->ttype;
  p.loss = a->loss;
  p.grad = a->grad;
  p.grad_loss = a->grad_loss;
  p.class_weight = a->o.class_weight;
  p.margin = a->o.margin;
  p.power = a->o.p;
  p.reduction = (int)a->o.reduction;
  p.div = count_divisor((double)a->n);
  p.scratch = ctx->scratch;
  int64_t grid = 0;
  if (a->multilabel && p.n > 0) {
    const size_t smem = mlm_smem_bytes(p.c);
    /* the kernel's static shared memory (cub's reduction, two words) is
       well under 1 KiB */
    if (smem + 1024 > ctx->smem_optin)
      return culoss__error(CULOSS_ERROR_INVALID_VALUE,
                           "culoss_multilabel_margin: c = %lld needs %zu bytes of shared memory "
                           "per block on the CUDA backend, more than the device's %zu",
                           (long long)p.c, smem, ctx->smem_optin);
    grid = capped_grid(ctx, p.n);
    const cudaError_t e = with_dtype(a->dtype, [&](auto t) {
      typedef decltype(t) T;
      /* always: the default limit is 48 KiB less the static shared memory
         (cub's storage), and an earlier call's setting must not decide */
      {
        const cudaError_t ea =
            cudaFuncSetAttribute(reinterpret_cast<const void *>(mlm_kernel<T>),
                                 cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
        if (ea != cudaSuccess) return ea;
      }
      return launch(mlm_kernel<T>, dim3((unsigned)grid), dim3(MM_THREADS), smem, stream, p);
    });
    if (e != cudaSuccess) return culoss__cuda_status(e, "launch of mlm_kernel");
  } else if (p.n > 0) {
    const bool vec = aligned16(p.x) && aligned16(p.grad) && ((p.ld * (int64_t)es) % 16) == 0;
    grid = capped_grid(ctx, (p.n + MM_ROWS - 1) / MM_ROWS);
    const cudaError_t e = with_dtype(
        a->dtype, [&](auto t) { return launch_mm<decltype(t)>(p, vec, (unsigned)grid, stream); });
    if (e != cudaSuccess) return culoss__cuda_status(e, "launch of mm_kernel");
  }
  return culoss__finish_reduction(ctx, (int)grid, p.loss, p.reduction, p.div);
}
