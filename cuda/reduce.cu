/*
 * reduce.cu: the final step of every reduced loss: loss[0] = the fixed-order
 * sum of the per-block partials, divided by the mean's divisor. One block;
 * A zero divisor gives NaN, as PyTorch's mean of an empty or all-ignored batch.
 */
#include <cuda_runtime.h>

#include "launch.cuh"
#include "reduce.cuh"

namespace culoss_dev {
namespace {

constexpr int FINAL_THREADS = 1024;

__global__ void __launch_bounds__(FINAL_THREADS)
    reduce_final_kernel(const double *partials, int count, float *loss, int reduction,
                        divisor_src div) {
  typedef cub::BlockReduce<double, FINAL_THREADS> reduce_t;
  __shared__ typename reduce_t::TempStorage tmp;
  double s = 0.0;
  for (int i = threadIdx.x; i < count; i += FINAL_THREADS) s += partials[i];
  s = reduce_t(tmp).Sum(s);
  if (threadIdx.x == 0) {
    if (reduction != CULOSS_REDUCTION_SUM) {
      /* D == 0 (an empty or all-ignored batch, or every target on a
         zero-weight class, where label smoothing made the sum positive):
         NaN, as torch's mean of nothing, never +inf */
      const double dv = resolve_divisor(div);
      s = dv == 0.0 ? (double)NAN : s / dv;
    }
    loss[0] = (float)s;
  }
}

} // namespace
} // namespace culoss_dev

culoss_status culoss__finish_reduction(culoss_context *ctx, int partials, float *loss,
                                       int reduction, const culoss_dev::divisor_src &div) {
  if (reduction == CULOSS_REDUCTION_NONE) return CULOSS_OK;
  const cudaError_t e = culoss_dev::launch(
      culoss_dev::reduce_final_kernel, dim3(1), dim3(culoss_dev::FINAL_THREADS), 0,
      (cudaStream_t)ctx->stream, ctx->scratch->partial_loss, partials, loss, reduction, div);
  return e == cudaSuccess ? CULOSS_OK : culoss__cuda_status(e, "launch of reduce_final_kernel");
}
