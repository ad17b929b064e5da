/*
 * elementwise.cu: BCE (logits and probabilities), binary hinge, MSE, L1,
 * Huber, smooth-L1, KL divergence, hinge embedding, soft margin, Poisson and
 * Gaussian NLL, sigmoid focal and margin ranking: loss and gradient(s) in
 * one streaming pass.
 *
 * Each thread walks 16-byte packs of input and target (grid-stride), evaluates
 * the loss and its derivative per element with the fp32 helpers of
 * loss_math.h, writes the gradient pack once and, for NONE, the per-element
 * loss; for SUM/MEAN/BATCHMEAN it accumulates its losses in double, in a
 * fixed order, and the block's sum goes to the shared deterministic
 * reduction (reduce.cuh). Traffic: one read of input and target (and of the
 * weights, or of the second input x2, when given), one write of each
 * gradient.
 *
 * The gradient scale of a reduced loss (g / m or g / n) is known before the
 * pass, so nothing needs a second pass. Domain errors (a BCE probability
 * outside [0, 1], a hinge target other than +-1) give NaN loss and zero
 * gradient for that element and raise the context's deferred-error flag.
 */
#include <cuda_runtime.h>

#include "backend.h"
#include "dtype.cuh"
#include "launch.cuh"
#include "loss_math.h"
#include "reduce.cuh"

namespace culoss_dev {
namespace {

constexpr int EW_THREADS = 256;

struct ew_params {
  int64_t m, c;
  const void *x;
  const void *y;
  const float *weight;
  const float *pos_weight;
  const void *x2; /* margin ranking's input2, gaussian's var */
  float *loss;
  void *grad, *grad2;
  const float *grad_loss;
  int reduction;
  float a, b;
  int flag;
  divisor_src div;
  culoss__scratch *scratch;
};

/* The ops with a second differentiable input x2 (and gradient grad2). */
template <int OP> constexpr bool has_x2() {
  return OP == CULOSS__EW_MARGIN_RANKING || OP == CULOSS__EW_GAUSSIAN_NLL;
}

/* One element (index i, column j = i % c): loss, derivatives (d to x, d2 to
   x2), and whether the element is outside the loss's domain. */
template <int OP>
__device__ __forceinline__ float eval(const ew_params &p, float x, float y, float x2, int64_t i,
                                      int64_t j, float *d, float *d2, bool *bad) {
  *bad = false;
  *d2 = 0.0f;
  if constexpr (OP == CULOSS__EW_BCE_LOGITS) {
    const float w = p.weight ? p.weight[i] : 1.0f;
    const float pw = p.pos_weight ? p.pos_weight[j] : 1.0f;
    return culoss__bce_logits(x, y, w, pw, d);
  } else if constexpr (OP == CULOSS__EW_BCE) {
    *bad = !(x >= 0.0f && x <= 1.0f && y >= 0.0f && y <= 1.0f);
    return culoss__bce_prob(x, y, p.weight ? p.weight[i] : 1.0f, d);
  } else if constexpr (OP == CULOSS__EW_HINGE) {
    *bad = y != 1.0f && y != -1.0f;
    return culoss__hinge(x, y, p.a, p.flag, d);
  } else if constexpr (OP == CULOSS__EW_MSE) {
    return culoss__mse(x, y, d);
  } else if constexpr (OP == CULOSS__EW_L1) {
    return culoss__l1(x, y, d);
  } else if constexpr (OP == CULOSS__EW_HUBER) {
    return culoss__huber(x, y, p.a, d);
  } else if constexpr (OP == CULOSS__EW_SMOOTH_L1) {
    return culoss__smooth_l1(x, y, p.a, d);
  } else if constexpr (OP == CULOSS__EW_HINGE_EMBEDDING) {
    return culoss__hinge_embedding(x, y, p.a, d);
  } else if constexpr (OP == CULOSS__EW_SOFT_MARGIN) {
    return culoss__soft_margin(x, y, d);
  } else if constexpr (OP == CULOSS__EW_POISSON_NLL) {
    return culoss__poisson_nll(x, y, p.a, p.flag, d);
  } else if constexpr (OP == CULOSS__EW_SIGMOID_FOCAL) {
    return culoss__sigmoid_focal(x, y, p.a, p.b, d);
  } else if constexpr (OP == CULOSS__EW_MARGIN_RANKING) {
    const float l = culoss__margin_ranking(x, x2, y, p.a, d);
    *d2 = -*d;
    return l;
  } else if constexpr (OP == CULOSS__EW_GAUSSIAN_NLL) {
    *bad = x2 < 0.0f;
    return culoss__gaussian_nll(x, y, x2, p.a, p.flag, d, d2);
  } else {
    return culoss__kl_div(x, y, p.flag, d);
  }
}

template <typename T, int OP, int VEC>
__global__ void __launch_bounds__(EW_THREADS) ew_kernel(ew_params p) {
  typedef pack<T, VEC> pack_t;
  const bool reduced = p.reduction != CULOSS_REDUCTION_NONE;
  const float red_scale = reduced ? reduced_grad_scale(p.reduction, p.grad_loss, p.div) : 1.0f;
  const T *x = static_cast<const T *>(p.x);
  const T *y = static_cast<const T *>(p.y);
  const T *x2 = static_cast<const T *>(p.x2);
  T *grad = static_cast<T *>(p.grad);
  T *grad2 = has_x2<OP>() ? static_cast<T *>(p.grad2) : nullptr;
  const int64_t tid = (int64_t)blockIdx.x * EW_THREADS + threadIdx.x;
  const int64_t stride = (int64_t)gridDim.x * EW_THREADS;
  const int64_t npack = p.m / VEC;
  double acc = 0.0; /* this thread's losses, in its fixed element order */
  bool any_bad = false;

  /* pos_weight's column: one 64-bit modulo per pack, not per element */
  const bool cols = OP == CULOSS__EW_BCE_LOGITS && p.pos_weight != nullptr;
  /* the gradient to x; *g2 the one to x2 */
  auto one = [&](float xv, float yv, float x2v, int64_t i, int64_t j, float *g2) -> float {
    float d, d2;
    bool bad;
    float l = eval<OP>(p, xv, yv, x2v, i, j, &d, &d2, &bad);
    if (bad) {
      any_bad = true;
      l = culoss__nan();
      d = d2 = 0.0f;
    }
    if (reduced)
      acc += (double)l;
    else
      p.loss[i] = l;
    const float s = reduced ? red_scale : (p.grad_loss ? p.grad_loss[i] : 1.0f);
    *g2 = d2 * s;
    return d * s;
  };

  for (int64_t v = tid; v < npack; v += stride) {
    const pack_t xp = load_pack<T, VEC>(x + v * VEC);
    const pack_t yp = load_pack<T, VEC>(y + v * VEC);
    pack_t x2p{};
    if constexpr (has_x2<OP>()) x2p = load_pack<T, VEC>(x2 + v * VEC);
    pack_t g, g2;
    int64_t j = cols ? (v * VEC) % p.c : 0;
#pragma unroll
    for (int k = 0; k < VEC; k++) {
      float h2;
      g.v[k] = from_f32<T>(one(to_f32(xp.v[k]), to_f32(yp.v[k]),
                               has_x2<OP>() ? to_f32(x2p.v[k]) : 0.0f, v * VEC + k, j, &h2));
      g2.v[k] = from_f32<T>(h2);
      if (cols && ++j == p.c) j = 0;
    }
    if (grad) store_pack<T, VEC>(grad + v * VEC, g);
    if (grad2) store_pack<T, VEC>(grad2 + v * VEC, g2);
  }
  for (int64_t i = npack * VEC + tid; i < p.m; i += stride) { /* the partial pack */
    float h2;
    const float gi = one(to_f32(ld_elem(x + i)), to_f32(ld_elem(y + i)),
                         has_x2<OP>() ? to_f32(ld_elem(x2 + i)) : 0.0f, i, cols ? i % p.c : 0, &h2);
    if (grad) st_elem(grad + i, from_f32<T>(gi));
    if (grad2) st_elem(grad2 + i, from_f32<T>(h2));
  }
  if (any_bad) atomicOr(&p.scratch->error_flag, CULOSS__FLAG_DOMAIN);
  if (reduced) store_block_sum<EW_THREADS>(acc, &p.scratch->partial_loss[blockIdx.x]);
}

template <typename T, int OP>
cudaError_t launch_vec(const ew_params &p, bool vec, unsigned grid, cudaStream_t s) {
  if (vec) return launch(ew_kernel<T, OP, vec16<T>::value>, dim3(grid), dim3(EW_THREADS), 0, s, p);
  return launch(ew_kernel<T, OP, 1>, dim3(grid), dim3(EW_THREADS), 0, s, p);
}

template <typename T>
cudaError_t launch_op(int op, const ew_params &p, bool vec, unsigned grid, cudaStream_t s) {
  switch (op) {
  case CULOSS__EW_BCE_LOGITS: return launch_vec<T, CULOSS__EW_BCE_LOGITS>(p, vec, grid, s);
  case CULOSS__EW_BCE: return launch_vec<T, CULOSS__EW_BCE>(p, vec, grid, s);
  case CULOSS__EW_HINGE: return launch_vec<T, CULOSS__EW_HINGE>(p, vec, grid, s);
  case CULOSS__EW_MSE: return launch_vec<T, CULOSS__EW_MSE>(p, vec, grid, s);
  case CULOSS__EW_L1: return launch_vec<T, CULOSS__EW_L1>(p, vec, grid, s);
  case CULOSS__EW_HUBER: return launch_vec<T, CULOSS__EW_HUBER>(p, vec, grid, s);
  case CULOSS__EW_SMOOTH_L1: return launch_vec<T, CULOSS__EW_SMOOTH_L1>(p, vec, grid, s);
  case CULOSS__EW_HINGE_EMBEDDING:
    return launch_vec<T, CULOSS__EW_HINGE_EMBEDDING>(p, vec, grid, s);
  case CULOSS__EW_SOFT_MARGIN: return launch_vec<T, CULOSS__EW_SOFT_MARGIN>(p, vec, grid, s);
  case CULOSS__EW_POISSON_NLL: return launch_vec<T, CULOSS__EW_POISSON_NLL>(p, vec, grid, s);
  case CULOSS__EW_SIGMOID_FOCAL: return launch_vec<T, CULOSS__EW_SIGMOID_FOCAL>(p, vec, grid, s);
  case CULOSS__EW_MARGIN_RANKING: return launch_vec<T, CULOSS__EW_MARGIN_RANKING>(p, vec, grid, s);
  case CULOSS__EW_GAUSSIAN_NLL: return launch_vec<T, CULOSS__EW_GAUSSIAN_NLL>(p, vec, grid, s);
  default: return launch_vec<T, CULOSS__EW_KL>(p, vec, grid, s);
  }
}

} // namespace
} // namespace culoss_dev

using namespace culoss_dev;

extern "C" culoss_status culoss__cuda_elementwise(culoss_context *ctx, const void *args) {
  const culoss__ew_args *a = static_cast<const culoss__ew_args *>(args);
  const cudaStream_t stream = (cudaStream_t)ctx->stream;
  const int64_t vec_elems = 16 / (int64_t)culoss__dtype_size(a->dtype);
  ew_params p;
  p.m = a->m;
  p.c = a->c;
  p.x = a->x;
  p.y = a->y;
  p.weight = a->weight;
  p.pos_weight = a->pos_weight;
  p.x2 = a->x2;
  p.loss = a->loss;
  p.grad = a->grad;
  p.grad2 = a->grad2;
  p.grad_loss = a->grad_loss;
  p.reduction = (int)a->reduction;
  p.a = a->a;
  p.b = a->b;
  p.flag = a->flag;
  p.div = count_divisor(a->divisor);
  p.scratch = ctx->scratch;

  int64_t grid = 0;
  if (p.m > 0) {
    const bool vec = aligned16(p.x) && aligned16(p.y) && aligned16(p.grad) && aligned16(p.x2) &&
                     aligned16(p.grad2);
    const int64_t packs = vec ? p.m / vec_elems : p.m;
    grid = capped_grid(ctx, (packs + EW_THREADS - 1) / EW_THREADS);
    const cudaError_t e = with_dtype(a->dtype, [&](auto t) {
      return launch_op<decltype(t)>(a->op, p, vec, (unsigned)grid, stream);
    });
    if (e != cudaSuccess) return culoss__cuda_status(e, "launch of ew_kernel");
  }
  return culoss__finish_reduction(ctx, (int)grid, p.loss, p.reduction, p.div);
}
