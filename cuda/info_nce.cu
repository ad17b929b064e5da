/*
 * info_nce.cu: InfoNCE's small steps around its linear cross-entropy calls
 * (host/info_nce.c): the targets and per-row gradient scales, the 1/t
 * scaling of an n x d operand (or its addition), and the final loss and
 * temperature gradient. The temperature is read on the device (a learned
 * one needs no host copy); t <= 0 or NaN raises the deferred domain error
 * and makes every scaled value NaN. O(n d) work: the GEMMs dominate.
 */
#include <cuda_runtime.h>

#include "backend.h"
#include "dtype.cuh"
#include "launch.cuh"
#include "loss_math.h"
#include "reduce.cuh"

namespace culoss_dev {
namespace {

constexpr int NCE_THREADS = 256;

__device__ __forceinline__ float temperature_of(const float *t) { return t ? *t : 1.0f; }

__global__ void __launch_bounds__(NCE_THREADS)
    nce_prep_kernel(int64_t n, int64_t *targets, float *row_g, const float *grad_loss,
                    int reduction, int symmetric, const float *temperature,
                    culoss__scratch *scratch) {
  const int64_t tid = (int64_t)blockIdx.x * NCE_THREADS + threadIdx.x;
  if (tid == 0 && !(temperature_of(temperature) > 0.0f))
    atomicOr(&scratch->error_flag, CULOSS__FLAG_DOMAIN);
  const float g0 = grad_loss ? grad_loss[0] : 1.0f, half = symmetric ? 0.5f : 1.0f;
  for (int64_t i = tid; i < n; i += (int64_t)gridDim.x * NCE_THREADS) {
    float g;
    if (reduction == CULOSS_REDUCTION_NONE)
      g = grad_loss ? grad_loss[i] : 1.0f;
    else
      g = reduction == CULOSS_REDUCTION_SUM ? g0 : (float)((double)g0 / (double)n);
    targets[i] = i;
    row_g[i] = half * g;
  }
}

/* out = x / t, or out += x / t (axpy); out may be x. */
template <typename T>
__global__ void __launch_bounds__(NCE_THREADS)
    nce_scale_kernel(int64_t m, const T *x, T *out, const float *temperature, int axpy) {
  const float t = temperature_of(temperature);
  const float inv = t > 0.0f ? 1.0f / t : culoss__nan();
  for (int64_t e = (int64_t)blockIdx.x * NCE_THREADS + threadIdx.x; e < m;
       e += (int64_t)gridDim.x * NCE_THREADS) {
    float v = to_f32(ld_elem(x + e)) * inv;
    if (axpy) v += to_f32(ld_elem(out + e));
    st_elem(out + e, from_f32<T>(v));
  }
}

/* One block: per-row losses (NONE) or their sum / mean, and
   dL/dt = -(1/t) sum_dir sum_i row_g[i] (loss_i - entropy_i), each thread's
   rows summed in a fixed order, then a fixed-order block sum. */
__global__ void __launch_bounds__(NCE_THREADS)
    nce_finish_kernel(int64_t n, int dirs, const float *rows, const float *row_g, int reduction,
                      const float *temperature, float *loss, float *grad_temperature,
                      culoss__scratch *scratch) {
  __shared__ double s_loss, s_gt;
  /* the empty batch runs only this step: its check of the temperature */
  if (threadIdx.x == 0 && n == 0 && !(temperature_of(temperature) > 0.0f))
    atomicOr(&scratch->error_flag, CULOSS__FLAG_DOMAIN);
  double my_loss = 0.0, my_gt = 0.0;
  for (int64_t i = threadIdx.x; i < n; i += NCE_THREADS) {
    double l = 0.0;
    for (int k = 0; k < dirs; k++) {
      const float *r = rows + (int64_t)k * 3 * n;
      l += (double)r[i];
      my_gt += (double)row_g[i] * ((double)r[i] - (double)r[2 * n + i]);
    }
    l /= (double)dirs;
    if (reduction == CULOSS_REDUCTION_NONE)
      loss[i] = (float)l;
    else
      my_loss += l;
  }
  store_block_sum<NCE_THREADS>(my_loss, &s_loss);
  store_block_sum<NCE_THREADS>(my_gt, &s_gt);
  if (threadIdx.x == 0) {
    if (reduction == CULOSS_REDUCTION_SUM) loss[0] = (float)s_loss;
    if (reduction == CULOSS_REDUCTION_MEAN) loss[0] = (float)(s_loss / (double)n);
    if (grad_temperature) {
      const float t = temperature_of(temperature);
      grad_temperature[0] = t > 0.0f ? (float)(-s_gt / (double)t) : culoss__nan();
    }
  }
}

unsigned grid_of(const culoss_context *ctx, int64_t count) {
  return (unsigned)capped_grid(ctx, (count + NCE_THREADS - 1) / NCE_THREADS);
}

} // namespace
} // namespace culoss_dev

using namespace culoss_dev;

extern "C" culoss_status culoss__cuda_nce_step(culoss_context *ctx, const void *args) {
  const culoss__nce_args *a = static_cast<const culoss__nce_args *>(args);
  const cudaStream_t s = (cudaStream_t)ctx->stream;
  const dim3 b(NCE_THREADS);
  cudaError_t e = cudaSuccess;
  switch (a->step) {
  case CULOSS__NCE_PREP:
    e = launch(nce_prep_kernel, dim3(grid_of(ctx, a->n)), b, 0, s, a->n, a->targets, a->row_g,
               a->grad_loss, (int)a->reduction, a->symmetric, a->temperature, ctx->scratch);
    break;
  case CULOSS__NCE_SCALE:
  case CULOSS__NCE_AXPY: {
    const int64_t m = a->n * a->d;
    e = with_dtype(a->dtype, [&](auto t) {
      typedef decltype(t) T;
      return launch(nce_scale_kernel<T>, dim3(grid_of(ctx, m)), b, 0, s, m,
                    static_cast<const T *>(a->x), static_cast<T *>(a->out), a->temperature,
                    (int)(a->step == CULOSS__NCE_AXPY));
    });
    break;
  }
  case CULOSS__NCE_FINISH:
    e = launch(nce_finish_kernel, dim3(1), b, 0, s, a->n, a->symmetric ? 2 : 1, a->rows,
               (const float *)a->row_g, (int)a->reduction, a->temperature, a->loss,
               a->grad_temperature, ctx->scratch);
    break;
  }
  return culoss__cuda_status(e, "launch of an InfoNCE step kernel");
}
