/*
 * embedding.cu: the embedding losses (cosine embedding, triplet margin):
 * loss and every input's gradient in one pass over each row; and the
 * multi-label soft margin (mlsm_kernel: one streaming pass, below).
 *
 * A warp owns a row of every input (2 or 3 rows of d features at the same
 * offset). Pass 1 reads the row's 16-byte packs once, keeping them in
 * registers (NPL packs per lane per input: 1, or emb_npl's 64 fp32 values
 * per lane in all, so d up to 1024 for cosine and 512 for triplet), and
 * accumulates the row's sums: <x1, x2>,
 * |x1|^2, |x2|^2 (cosine) or sum |u|^p of the two (three with swap)
 * differences u = x - y + eps (triplet). A butterfly of xor shuffles leaves
 * the same totals, bit for bit, in every lane (fp32 addition commutes), so
 * every lane forms the same coefficients; pass 2 writes the gradients from
 * the registers. Longer rows (NPL = 0) re-read the row in pass 2 (from L2 in
 * practice: a warp's rows were just read), and unaligned views take the
 * scalar NPL = 0 path. Every load of a lane precedes its stores and each
 * element is owned by one lane, so a gradient may overwrite its input.
 * Reduced losses go through the shared deterministic reduction.
 *
 * Traffic: one read of each input (a second one from L2 for NPL = 0), one
 * write of each requested gradient, 4 bytes of target per row (cosine).
 */
#include <cuda_runtime.h>

#include "backend.h"
#include "dtype.cuh"
#include "launch.cuh"
#include "loss_math.h"
#include "reduce.cuh"

namespace culoss_dev {
namespace {

constexpr int EMB_THREADS = 256;
constexpr int EMB_ROWS = EMB_THREADS / 32;

struct emb_params {
  int64_t n, d, ld;
  const void *x[3];
  const float *target;
  const float *weight; /* multi-label soft margin */
  int weight_per_row;
  float *loss;
  void *grad[3];
  const float *grad_loss;
  float margin, p, eps;
  int swap;
  int reduction;
  divisor_src div;
  culoss__scratch *scratch;
};

/* Sum over the warp, the same value in every lane. */
__device__ __forceinline__ float warp_allsum(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

/* |u|^p, the norm's term. */
__device__ __forceinline__ float norm_term(float u, float p) {
  const float a = fabsf(u);
  return p == 2.0f ? a * a : (p == 1.0f ? a : powf(a, p));
}

/* (sum)^(1/p). */
__device__ __forceinline__ float norm_root(float s, float p) {
  return p == 2.0f ? sqrtf(s) : (p == 1.0f ? s : powf(s, 1.0f / p));
}

/* d |u|_p / d u_j = sign(u_j) |u_j / dist|^(p-1); 0 where dist is 0 (torch's
   norm backward); inv = 1 / dist (0 where dist is 0). */
__device__ __forceinline__ float norm_grad(float u, float dist, float inv, float p) {
  if (p == 2.0f) return u * inv;
  if (dist == 0.0f) return 0.0f;
  const float sg = u > 0.0f ? 1.0f : (u < 0.0f ? -1.0f : 0.0f);
  return p == 1.0f ? sg : sg * powf(fabsf(u) * inv, p - 1.0f);
}

/* A row's coefficients, the same in every lane. */
struct row_coef {
  float a, b1, b2;                    /* cosine: g1 = a v - b1 u, g2 = a u - b2 v */
  float dap, dan, dpn, iap, ian, ipn; /* triplet: distances and their inverses */
  float c, wa, wp;                    /* triplet: scale where active, the tie's weights */
};

template <int OP> struct emb_op { static constexpr int NI = OP == CULOSS__EMB_TRIPLET ? 3 : 2; };

/* Pass 1's sums of one element (v[0..NI-1] its inputs). */
template <int OP>
__device__ __forceinline__ void accumulate(const emb_params &p, const float *v, float *acc) {
  if constexpr (OP == CULOSS__EMB_COSINE) {
    acc[0] += v[0] * v[1];
    acc[1] += v[0] * v[0];
    acc[2] += v[1] * v[1];
  } else {
    acc[0] += norm_term(v[0] - v[1] + p.eps, p.p);
    acc[1] += norm_term(v[0] - v[2] + p.eps, p.p);
    if (p.swap) acc[2] += norm_term(v[1] - v[2] + p.eps, p.p);
  }
}

/* The gradients of one element into g[0..NI-1]. */
template <int OP>
__device__ __forceinline__ void element_grad(const emb_params &p, const row_coef &k, const float *v,
                                             float *g) {
  if constexpr (OP == CULOSS__EMB_COSINE) {
    g[0] = k.a * v[1] - k.b1 * v[0];
    g[1] = k.a * v[0] - k.b2 * v[1];
  } else {
    const float gap = norm_grad(v[0] - v[1] + p.eps, k.dap, k.iap, p.p);
    const float gan = k.wa != 0.0f ? norm_grad(v[0] - v[2] + p.eps, k.dan, k.ian, p.p) : 0.0f;
    const float gpn = k.wp != 0.0f ? norm_grad(v[1] - v[2] + p.eps, k.dpn, k.ipn, p.p) : 0.0f;
    g[0] = k.c * (gap - k.wa * gan);
    g[1] = k.c * (-gap - k.wp * gpn);
    g[2] = k.c * (k.wa * gan + k.wp * gpn);
  }
}

/* The row's loss and coefficients from its sums (s: the gradient scale). */
template <int OP>
__device__ __forceinline__ float row_loss(const emb_params &p, int64_t row, const float *acc,
                                          float s, row_coef &k) {
  if constexpr (OP == CULOSS__EMB_COSINE) {
    const float n1 = acc[1] + 1e-12f, n2 = acc[2] + 1e-12f;
    const float den = sqrtf(n1) * sqrtf(n2), cs = acc[0] / den, y = p.target[row];
    float l = 0.0f, dl = 0.0f;
    if (y == 1.0f) {
      l = 1.0f - cs;
      dl = -1.0f;
    } else if (y == -1.0f) {
      const float z = cs - p.margin;
      l = z > 0.0f || z != z ? z : 0.0f;
      dl = z > 0.0f ? 1.0f : 0.0f;
    }
    k.a = s * dl / den;
    k.b1 = s * dl * cs / n1;
    k.b2 = s * dl * cs / n2;
    return l;
  } else {
    k.dap = norm_root(acc[0], p.p);
    k.dan = norm_root(acc[1], p.p);
    k.dpn = p.swap ? norm_root(acc[2], p.p) : 0.0f;
    k.iap = k.dap == 0.0f ? 0.0f : 1.0f / k.dap;
    k.ian = k.dan == 0.0f ? 0.0f : 1.0f / k.dan;
    k.ipn = k.dpn == 0.0f ? 0.0f : 1.0f / k.dpn;
    float dneg = k.dan;
    k.wa = 1.0f, k.wp = 0.0f;
    if (p.swap) {
      if (k.dpn < k.dan)
        k.wa = 0.0f, k.wp = 1.0f, dneg = k.dpn;
      else if (k.dpn == k.dan)
        k.wa = k.wp = 0.5f; /* torch.minimum's tie */
    }
    const float z = k.dap - dneg + p.margin;
    k.c = z > 0.0f ? s : 0.0f;
    return z > 0.0f || z != z ? z : 0.0f;
  }
}

template <typename T, int OP, int VEC, int NPL>
__global__ void __launch_bounds__(EMB_THREADS) emb_kernel(emb_params p) {
  constexpr int NI = emb_op<OP>::NI;
  constexpr int NC = NPL > 0 ? NPL : 1;
  typedef pack<T, VEC> pack_t;
  const int grp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const bool reduced = p.reduction != CULOSS_REDUCTION_NONE;
  const float red_scale = reduced ? reduced_grad_scale(p.reduction, p.grad_loss, p.div) : 1.0f;
  const int64_t d = p.d, nvec = d / VEC, tail0 = nvec * VEC;
  bool any_grad = false;
#pragma unroll
  for (int q = 0; q < NI; q++) any_grad |= p.grad[q] != nullptr;
  double my_loss = 0.0;

  for (int64_t row = (int64_t)blockIdx.x * EMB_ROWS + grp; row < p.n;
       row += (int64_t)gridDim.x * EMB_ROWS) {
    const int64_t base = row * p.ld; /* 64-bit row offsets */
    const T *xr[NI];
    T *gr[NI];
#pragma unroll
    for (int q = 0; q < NI; q++) {
      xr[q] = static_cast<const T *>(p.x[q]) + base;
      gr[q] = p.grad[q] ? static_cast<T *>(p.grad[q]) + base : nullptr;
    }
    pack_t cache[NI][NC];
    float tailv[NI];
    float acc[3] = {0.0f, 0.0f, 0.0f};
    float v[NI];
    /* ---- pass 1: the row's sums */
    if constexpr (NPL > 0) {
#pragma unroll
      for (int k = 0; k < NPL; k++) {
        const int64_t pv = lane + 32 * k;
        if (pv < nvec) {
#pragma unroll
          for (int q = 0; q < NI; q++) cache[q][k] = load_pack<T, VEC>(xr[q] + pv * VEC);
#pragma unroll
          for (int e = 0; e < VEC; e++) {
#pragma unroll
            for (int q = 0; q < NI; q++) v[q] = to_f32(cache[q][k].v[e]);
            accumulate<OP>(p, v, acc);
          }
        }
      }
      if (tail0 + lane < d) { /* fewer than VEC left: one per lane */
#pragma unroll
        for (int q = 0; q < NI; q++) tailv[q] = to_f32(ld_elem(xr[q] + tail0 + lane));
        accumulate<OP>(p, tailv, acc);
      }
    } else {
      for (int64_t pv = lane; pv < nvec; pv += 32) {
        pack_t xp[NI];
#pragma unroll
        for (int q = 0; q < NI; q++) xp[q] = load_pack<T, VEC>(xr[q] + pv * VEC);
#pragma unroll
        for (int e = 0; e < VEC; e++) {
#pragma unroll
          for (int q = 0; q < NI; q++) v[q] = to_f32(xp[q].v[e]);
          accumulate<OP>(p, v, acc);
        }
      }
      for (int64_t j = tail0 + lane; j < d; j += 32) {
#pragma unroll
        for (int q = 0; q < NI; q++) v[q] = to_f32(ld_elem(xr[q] + j));
        accumulate<OP>(p, v, acc);
      }
    }
#pragma unroll
    for (int q = 0; q < 3; q++) acc[q] = warp_allsum(acc[q]);
    const float s = reduced ? red_scale : (p.grad_loss ? p.grad_loss[row] : 1.0f);
    row_coef k;
    const float l = row_loss<OP>(p, row, acc, s, k);
    if (lane == 0) {
      if (reduced)
        my_loss += l;
      else
        p.loss[row] = l;
    }
    if (!any_grad) continue;
    /* ---- pass 2: the gradients */
    float g[NI];
    if constexpr (NPL > 0) {
#pragma unroll
      for (int kk = 0; kk < NPL; kk++) {
        const int64_t pv = lane + 32 * kk;
        if (pv < nvec) {
          pack_t gp[NI];
#pragma unroll
          for (int e = 0; e < VEC; e++) {
#pragma unroll
            for (int q = 0; q < NI; q++) v[q] = to_f32(cache[q][kk].v[e]);
            element_grad<OP>(p, k, v, g);
#pragma unroll
            for (int q = 0; q < NI; q++) gp[q].v[e] = from_f32<T>(g[q]);
          }
#pragma unroll
          for (int q = 0; q < NI; q++)
            if (gr[q]) store_pack<T, VEC>(gr[q] + pv * VEC, gp[q]);
        }
      }
      if (tail0 + lane < d) {
        element_grad<OP>(p, k, tailv, g);
#pragma unroll
        for (int q = 0; q < NI; q++)
          if (gr[q]) st_elem(gr[q] + tail0 + lane, from_f32<T>(g[q]));
      }
    } else {
      for (int64_t pv = lane; pv < nvec; pv += 32) {
        pack_t xp[NI], gp[NI];
#pragma unroll
        for (int q = 0; q < NI; q++) xp[q] = load_pack<T, VEC>(xr[q] + pv * VEC);
#pragma unroll
        for (int e = 0; e < VEC; e++) {
#pragma unroll
          for (int q = 0; q < NI; q++) v[q] = to_f32(xp[q].v[e]);
          element_grad<OP>(p, k, v, g);
#pragma unroll
          for (int q = 0; q < NI; q++) gp[q].v[e] = from_f32<T>(g[q]);
        }
#pragma unroll
        for (int q = 0; q < NI; q++)
          if (gr[q]) store_pack<T, VEC>(gr[q] + pv * VEC, gp[q]);
      }
      for (int64_t j = tail0 + lane; j < d; j += 32) {
#pragma unroll
        for (int q = 0; q < NI; q++) v[q] = to_f32(ld_elem(xr[q] + j));
        element_grad<OP>(p, k, v, g);
#pragma unroll
        for (int q = 0; q < NI; q++)
          if (gr[q]) st_elem(gr[q] + j, from_f32<T>(g[q]));
      }
    }
  }
  if (reduced)
    store_block_sum<EMB_THREADS>(lane == 0 ? my_loss : 0.0, &p.scratch->partial_loss[blockIdx.x]);
}

/* Multi-label soft margin: the gradient needs no row statistic, so one
   streaming pass writes it (x and y read once, g written once) while the
   warp sums the row's loss terms. */
template <typename T, int VEC>
__global__ void __launch_bounds__(EMB_THREADS) mlsm_kernel(emb_params p) {
  typedef pack<T, VEC> pack_t;
  const int grp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const bool reduced = p.reduction != CULOSS_REDUCTION_NONE;
  const float red_scale = reduced ? reduced_grad_scale(p.reduction, p.grad_loss, p.div) : 1.0f;
  const int64_t d = p.d, nvec = d / VEC, tail0 = nvec * VEC;
  const float inv_c = 1.0f / (float)d;
  double my_loss = 0.0;
  for (int64_t row = (int64_t)blockIdx.x * EMB_ROWS + grp; row < p.n;
       row += (int64_t)gridDim.x * EMB_ROWS) {
    const int64_t base = row * p.ld;
    const T *xr = static_cast<const T *>(p.x[0]) + base;
    const T *yr = static_cast<const T *>(p.x[1]) + base;
    T *gr = p.grad[0] ? static_cast<T *>(p.grad[0]) + base : nullptr;
    const float *wr = p.weight ? p.weight + (p.weight_per_row ? base : 0) : nullptr;
    const float hw = (reduced ? red_scale : (p.grad_loss ? p.grad_loss[row] : 1.0f)) * inv_c;
    float acc = 0.0f;
    /* w (y softplus(-x) + (1 - y) softplus(x)), gradient w (sigmoid(x) - y):
       infinite logits and targets give torch's inf / NaN */
    auto term = [&](float x, float y, int64_t j) -> float {
      const float w = wr ? wr[j] : 1.0f, e = log1pf(expf(-fabsf(x)));
      acc += w * (y * (fmaxf(-x, 0.0f) + e) + (1.0f - y) * (fmaxf(x, 0.0f) + e));
      return hw * (w * (culoss__sigmoid(x) - y));
    };
    for (int64_t pv = lane; pv < nvec; pv += 32) {
      const pack_t xp = load_pack<T, VEC>(xr + pv * VEC), yp = load_pack<T, VEC>(yr + pv * VEC);
      pack_t g;
#pragma unroll
      for (int e = 0; e < VEC; e++)
        g.v[e] = from_f32<T>(term(to_f32(xp.v[e]), to_f32(yp.v[e]), pv * VEC + e));
      if (gr) store_pack<T, VEC>(gr + pv * VEC, g);
    }
    for (int64_t j = tail0 + lane; j < d; j += 32) {
      const float g = term(to_f32(ld_elem(xr + j)), to_f32(ld_elem(yr + j)), j);
      if (gr) st_elem(gr + j, from_f32<T>(g));
    }
    acc = warp_allsum(acc);
    if (lane == 0) {
      if (reduced)
        my_loss += acc * inv_c;
      else
        p.loss[row] = acc * inv_c;
    }
  }
  if (reduced)
    store_block_sum<EMB_THREADS>(lane == 0 ? my_loss : 0.0, &p.scratch->partial_loss[blockIdx.x]);
}

/* Packs per lane the register cache holds: 64 fp32 values per lane in all
   (ptxas keeps the cached packs converted to fp32 between the passes), so
   rows up to 32 * NPL * VEC = 1024 (cosine) or 512 (triplet) features stay
   in registers with no spill (scripts/sass_guard.py checks). */
template <typename T, int OP> constexpr int emb_npl() {
  return 64 / (emb_op<OP>::NI * vec16<T>::value);
}

template <typename T, int OP>
cudaError_t launch_emb(const emb_params &p, bool vec, unsigned grid, cudaStream_t s) {
  constexpr int V = vec16<T>::value, NPL = emb_npl<T, OP>();
  const dim3 g(grid), b(EMB_THREADS);
  if (!vec) return launch(emb_kernel<T, OP, 1, 0>, g, b, 0, s, p);
  const int64_t nvec = p.d / V;
  if (nvec <= 32) return launch(emb_kernel<T, OP, V, 1>, g, b, 0, s, p);
  if (nvec <= 32 * NPL) return launch(emb_kernel<T, OP, V, NPL>, g, b, 0, s, p);
  return launch(emb_kernel<T, OP, V, 0>, g, b, 0, s, p);
}

} // namespace
} // namespace culoss_dev

using namespace culoss_dev;

extern "C" culoss_status culoss__cuda_embedding(culoss_context *ctx, const void *args) {
  const culoss__emb_args *a = static_cast<const culoss__emb_args *>(args);
  const cudaStream_t stream = (cudaStream_t)ctx->stream;
  const size_t es = culoss__dtype_size(a->dtype);
  const int ni = a->op == CULOSS__EMB_TRIPLET ? 3 : 2; /* inputs read */
  emb_params p;
  p.n = a->n;
  p.d = a->d;
  p.ld = a->ld;
  for (int q = 0; q < 3; q++) {
    p.x[q] = q < ni ? a->x[q] : nullptr;
    p.grad[q] = q < ni ? a->grad[q] : nullptr;
  }
  p.target = a->target;
  p.weight = a->weight;
  p.weight_per_row = a->weight_per_row;
  p.loss = a->loss;
  p.grad_loss = a->grad_loss;
  p.margin = a->margin;
  p.p = a->p;
  p.eps = a->eps;
  p.swap = a->swap;
  p.reduction = (int)a->reduction;
  p.div = count_divisor((double)a->n);
  p.scratch = ctx->scratch;
  int64_t grid = 0;
  if (p.n > 0) {
    bool vec = ((p.ld * (int64_t)es) % 16) == 0;
    for (int q = 0; q < 3; q++) vec = vec && aligned16(p.x[q]) && aligned16(p.grad[q]);
    grid = capped_grid(ctx, (p.n + EMB_ROWS - 1) / EMB_ROWS);
    const cudaError_t e = with_dtype(a->dtype, [&](auto t) {
      typedef decltype(t) T;
      if (a->op == CULOSS__EMB_ML_SOFT)
        return vec ? launch(mlsm_kernel<T, vec16<T>::value>, dim3((unsigned)grid),
                            dim3(EMB_THREADS), 0, stream, p)
                   : launch(mlsm_kernel<T, 1>, dim3((unsigned)grid), dim3(EMB_THREADS), 0, stream,
                            p);
      return a->op == CULOSS__EMB_TRIPLET
                 ? launch_emb<T, CULOSS__EMB_TRIPLET>(p, vec, (unsigned)grid, stream)
                 : launch_emb<T, CULOSS__EMB_COSINE>(p, vec, (unsigned)grid, stream);
    });
    if (e != cudaSuccess) return culoss__cuda_status(e, "launch of emb_kernel");
  }
  return culoss__finish_reduction(ctx, (int)grid, p.loss, p.reduction, p.div);
}
