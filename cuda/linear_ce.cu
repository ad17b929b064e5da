/*
 * linear_ce.cu: fused linear + cross-entropy. The N x V logits are never
 * stored whole: they exist one block of rows at a time in the workspace.
 *
 * Pass A, per block of r rows (r from culoss__lce_plan):
 *   1. logits[r, v] = hidden[r, d] @ weight^T (+ bias)      cuBLAS, fp32 accumulate
 *   2. the fused cross-entropy kernel on the block: per-row loss, softmax
 *      statistics, and the gradient dlogits written over the logits
 *   3. grad_hidden[r, d] = dlogits @ weight                 cuBLAS
 *   4. an fp32 grad_weight (fp32 inputs, or grad_weight_dtype CULOSS_F32):
 *      grad_weight += dlogits^T @ hidden[r]                cuBLAS, fp32 C (beta 1)
 *   5. grad_bias (fp32: the caller's buffer, else an fp32 accumulator) +=
 *      column sums of dlogits, fixed order
 * Pass B, only for a 16-bit grad_weight: it must accumulate in fp32 (bf16
 * accumulation across blocks diverges) but an fp32 [v, d] accumulator would
 * break the workspace bound, so grad_weight is built one vocabulary slice at
 * a time: for each slice, for each row block, recompute that tile of
 * logits, rebuild its gradient from the saved per-row statistics (the same
 * culoss__ce_grad the fused kernel uses) and accumulate dlogits^T @ hidden
 * into an fp32 slice, converted once at the end (added to the old value
 * when accumulating). 6 n d v FLOPs with an fp32 grad_weight, 8 n d v with
 * pass B.
 *
 * The loss is reduced from per-row losses with the shared deterministic
 * reduction, with MEAN's denominator computed once over all n targets, so
 * the result does not depend on the block size. cuBLAS runs on the
 * context's stream with a fixed workspace: the call stays capture-safe.
 */
#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <string.h>

#include <type_traits>

#include "backend.h"
#include "cross_entropy.cuh"
#include "vocab_parallel.cuh"
#include "dtype.cuh"
#include "gemm.cuh"
#include "launch.cuh"
#include "loss_math.h"
#include "reduce.cuh"

namespace culoss_dev {
namespace {

/* Pass B: the gradient of a tile [rows, cols] of logits (vocabulary columns
   c0..c0+cols) from the statistics the fused kernel saved for each row. */
template <typename T>
__global__ void __launch_bounds__(LT)
    grad_from_stats_kernel(T *tile, int64_t cols, int64_t ld, int64_t c0, int64_t v,
                           const float4 *stats, const void *targets, int ttype,
                           const float *class_weight, float eps, float cap) {
  const int64_t i = blockIdx.y;
  const float4 st = stats[2 * i]; /* m, log_s, a.k, (1-eps) w_y = a.w */
  const float scale = stats[2 * i + 1].x, rest = stats[2 * i + 1].y;
  const int64_t t = culoss__target_at(targets, ttype, i);
  T *row = tile + i * ld;
  for (int64_t jj = (int64_t)blockIdx.x * LT + threadIdx.x; jj < cols;
       jj += (int64_t)gridDim.x * LT) {
    const int64_t j = c0 + jj;
    float g = 0.0f;
    if (scale != 0.0f) { /* scale 0: ignored or out-of-range row */
      const float xs = culoss__softcap(to_f32(row[jj]), cap);
      const culoss__ce_coef a = {st.w, st.z};
      const culoss__ce_coef b = culoss__ce_index_b2(j, t, st.w, eps, v, class_weight);
      g = culoss__ce_grad(xs, st.x, rest, a, b, scale, culoss__softcap_grad(xs, cap));
    }
    row[jj] = from_f32<T>(g);
  }
}

template <typename T> culoss_status run(culoss_context *ctx, const culoss__lce_args *a) {
  const cudaStream_t stream = (cudaStream_t)ctx->stream;
  const cublasHandle_t h = (cublasHandle_t)ctx->cublas;
  const cudaDataType_t ty = cuda_type<T>();
  const int64_t n = a->n, d = a->d, v = a->v;
  const bool reduced = a->o.reduction != CULOSS_REDUCTION_NONE;
  /* grad_weight and grad_bias in fp32 (grad_weight_dtype F32, or fp32
     inputs): the GEMMs and column sums accumulate straight into them, one
     pass. 16-bit: grad_weight by vocabulary slices (pass B), grad_bias
     through an fp32 accumulator. */
  const bool direct = a->gw_dtype == CULOSS_F32;
  const bool pass_b = !direct && a->grad_weight != nullptr;
  const bool want_grad = a->grad_hidden || a->grad_weight || a->grad_bias;
  const size_t tsz = a->ttype == CULOSS_I32 ? 4 : 8;
  const size_t gsz = culoss__dtype_size(a->gw_dtype);
  const culoss__lce_layout L = culoss__lce_plan(n, d, v, a->dtype, ctx->lce_block_bytes, !direct);
  unsigned char *ws = static_cast<unsigned char *>(a->workspace);
  T *tile = reinterpret_cast<T *>(ws + L.off_logits);
  float *row_loss = reinterpret_cast<float *>(ws + L.off_row_loss);
  float4 *row_stats = reinterpret_cast<float4 *>(ws + L.off_row_stats);
  float *bias_acc = reinterpret_cast<float *>(ws + L.off_bias_acc);
  float *gw_acc = reinterpret_cast<float *>(ws + L.off_gw_acc);
  const T *H = static_cast<const T *>(a->hidden);
  const T *W = static_cast<const T *>(a->weight);
  const T *B = static_cast<const T *>(a->bias);

  CL_TRY(culoss__cublas_status(cublasSetStream(h, stream), "cublasSetStream"));

  /* The cross-entropy kernel's parameters, with MEAN's D over all n rows. */
  culoss__ce_args ca;
  memset(&ca, 0, sizeof ca);
  ca.mode = CULOSS__CE_INDEX;
  ca.o = a->o;
  ca.n = n, ca.c = v, ca.ld = v, ca.dtype = a->dtype, ca.ttype = a->ttype;
  ca.targets = a->targets;
  ce_params p0, p;
  ce_fill_params(ctx, &ca, &p0);
  CL_TRY(ce_launch_prep(&p0, &p, CULOSS__CE_INDEX, stream));
  p.rows_out = 1;

  if (n == 0 &&
      !a->accumulate) { /* nothing to sum: zero gradients (or, accumulating, as they are) */
    if (a->grad_weight)
      CU_TRY(cudaMemsetAsync(a->grad_weight, 0, (size_t)(v * d) * gsz, stream), "cudaMemsetAsync");
    if (a->grad_bias)
      CU_TRY(cudaMemsetAsync(a->grad_bias, 0, (size_t)v * gsz, stream), "cudaMemsetAsync");
  }

  /* ---- pass A: row blocks ---- */
  for (int64_t r0 = 0; r0 < n; r0 += L.rows) {
    const int64_t nr = n - r0 < L.rows ? n - r0 : L.rows;
    const T *Hr = H + r0 * d;
    if (B) {
      CU_TRY(launch(bias_fill_kernel<T>, dim3(blocks_for(v), (unsigned)nr), dim3(LT), 0, stream,
                    tile, B, v, v),
             "launch of bias_fill_kernel");
    }
    /* logits (row-major [nr, v]) = column-major [v, nr] = W (v x d) Hr^T */
    CL_TRY(gemm(h, CUBLAS_OP_T, CUBLAS_OP_N, v, nr, d, W, ty, d, Hr, ty, d, B ? 1.0f : 0.0f, tile,
                ty, v, "cublasGemmEx(logits)"));
    p.n = nr;
    p.x = tile;
    p.grad = want_grad ? tile : nullptr;
    p.targets = static_cast<const char *>(a->targets) + (size_t)r0 * tsz;
    p.loss = (reduced ? row_loss : a->loss) + r0;
    p.grad_loss = a->grad_loss && !reduced ? a->grad_loss + r0 : a->grad_loss;
    p.row_stats = pass_b ? row_stats + 2 * r0 : nullptr;
    p.lse_out = a->lse ? a->lse + r0 : nullptr;
    p.ent_out = a->entropy ? a->entropy + r0 : nullptr;
    int64_t grid;
    CL_TRY(ce_launch_main(ctx, p, CULOSS__CE_INDEX, (int)a->dtype, &grid, stream));
    if (a->grad_hidden) /* grad_hidden [nr, d] = dlogits [nr, v] @ W [v, d] */
      CL_TRY(gemm(h, CUBLAS_OP_N, CUBLAS_OP_N, d, nr, v, W, ty, d, tile, ty, v, 0.0f,
                  static_cast<T *>(a->grad_hidden) + r0 * d, ty, d, "cublasGemmEx(grad_hidden)"));
    /* the first block overwrites unless accumulating; later blocks add */
    const bool first = r0 == 0 && !a->accumulate;
    if (direct && a->grad_weight) /* fp32 grad_weight [v, d] (+)= dlogits^T @ Hr */
      CL_TRY(gemm(h, CUBLAS_OP_N, CUBLAS_OP_T, d, v, nr, Hr, ty, d, tile, ty, v,
                  first ? 0.0f : 1.0f, a->grad_weight, CUDA_R_32F, d, "cublasGemmEx(grad_weight)"));
    if (a->grad_bias) {
      CU_TRY(launch(colsum_kernel<T>, dim3(blocks_for(v)), dim3(LT), 0, stream, tile, nr, v, v,
                    direct ? static_cast<float *>(a->grad_bias) : bias_acc,
                    (int)(direct ? first : r0 == 0)),
             "launch of colsum_kernel");
    }
  }

  /* ---- pass B: grad_weight by vocabulary slices, fp32 accumulation ---- */
  if (pass_b && n > 0) {
    for (int64_t c0 = 0; c0 < v; c0 += L.vslice) {
      const int64_t vc = v - c0 < L.vslice ? v - c0 : L.vslice;
      /* row blocks whose tile [nr, vc] fits the logits block */
      const int64_t rb = (int64_t)(L.off_row_loss / ((size_t)vc * sizeof(T)));
      const int64_t rows_b = rb < 1 ? 1 : (rb > 32768 ? 32768 : rb);
      for (int64_t r0 = 0; r0 < n; r0 += rows_b) {
        const int64_t nr = n - r0 < rows_b ? n - r0 : rows_b;
        const T *Hr = H + r0 * d;
        if (B) {
          CU_TRY(launch(bias_fill_kernel<T>, dim3(blocks_for(vc), (unsigned)nr), dim3(LT), 0,
                        stream, tile, B + c0, vc, vc),
                 "launch of bias_fill_kernel");
        }
        CL_TRY(gemm(h, CUBLAS_OP_T, CUBLAS_OP_N, vc, nr, d, W + c0 * d, ty, d, Hr, ty, d,
                    B ? 1.0f : 0.0f, tile, ty, vc, "cublasGemmEx(logits slice)"));
        CU_TRY(launch(grad_from_stats_kernel<T>, dim3(blocks_for(vc), (unsigned)nr), dim3(LT), 0,
                      stream, tile, vc, vc, c0, v, (const float4 *)(row_stats + 2 * r0),
                      (const void *)(static_cast<const char *>(a->targets) + (size_t)r0 * tsz),
                      (int)a->ttype, a->o.class_weight, a->o.label_smoothing, a->o.logit_softcap),
               "launch of grad_from_stats_kernel");
        CL_TRY(gemm(h, CUBLAS_OP_N, CUBLAS_OP_T, d, vc, nr, Hr, ty, d, tile, ty, vc,
                    r0 == 0 ? 0.0f : 1.0f, gw_acc, CUDA_R_32F, d,
                    "cublasGemmEx(grad_weight slice)"));
      }
      CU_TRY(launch(convert_kernel<T>, dim3(blocks_for(vc * d)), dim3(LT), 0, stream,
                    (const float *)gw_acc, static_cast<T *>(a->grad_weight) + c0 * d, vc * d,
                    a->accumulate),
             "launch of convert_kernel");
    }
  }
  if (a->grad_bias && !direct && n > 0) {
    CU_TRY(launch(convert_kernel<T>, dim3(blocks_for(v)), dim3(LT), 0, stream,
                  (const float *)bias_acc, static_cast<T *>(a->grad_bias), v, a->accumulate),
           "launch of convert_kernel");
  }

  /* ---- the reduced loss from the per-row losses ---- */
  if (!reduced) return CULOSS_OK;
  const int64_t grid = capped_grid(ctx, (n + LT - 1) / LT);
  if (n > 0) {
    CU_TRY(launch(row_loss_sum_kernel, dim3((unsigned)grid), dim3(LT), 0, stream,
                  (const float *)row_loss, n, ctx->scratch->partial_loss),
           "launch of row_loss_sum_kernel");
  }
  return culoss__finish_reduction(ctx, n > 0 ? (int)grid : 0, a->loss, (int)a->o.reduction, p.div);
}

/* Vocabulary-parallel: this rank's weight rows [v_begin, v_begin + v)
   (vocab_parallel.cuh's kernels on each block of logits). Pass 1: each
   block's logits and records; the caller's all-gather; pass 2: each
   block's logits again (unless one block holds every row), the loss and the
   slice's gradient written over them, the gradient GEMMs. grad_weight (if
   any) is fp32 here (host/vocab_parallel.c refuses a 16-bit one). */
template <typename T> culoss_status run_vp(culoss_context *ctx, const culoss__lce_args *a) {
  const cudaStream_t stream = (cudaStream_t)ctx->stream;
  const cublasHandle_t h = (cublasHandle_t)ctx->cublas;
  const cudaDataType_t ty = cuda_type<T>();
  const int64_t n = a->n, d = a->d, v = a->v;
  const bool direct = a->gw_dtype == CULOSS_F32;
  const culoss__lvp_layout LV =
      culoss__lvp_plan(n, d, v, a->dtype, ctx->lce_block_bytes, a->vp->ranks, !direct);
  const culoss__lce_layout &L = LV.lce;
  unsigned char *ws = static_cast<unsigned char *>(a->workspace);
  T *tile = reinterpret_cast<T *>(ws + L.off_logits);
  float *row_loss = reinterpret_cast<float *>(ws + L.off_row_loss);
  float *bias_acc = reinterpret_cast<float *>(ws + L.off_bias_acc);
  float *mine = reinterpret_cast<float *>(ws + LV.off_records);
  float *all = reinterpret_cast<float *>(ws + LV.off_gathered);
  const T *H = static_cast<const T *>(a->hidden);
  const T *W = static_cast<const T *>(a->weight);
  const T *B = static_cast<const T *>(a->bias);
  const bool reduced = a->o.reduction != CULOSS_REDUCTION_NONE;
  const bool want_grad = a->grad_hidden || a->grad_weight || a->grad_bias;
  const bool one_block = L.rows >= n;
  float *gw_acc = reinterpret_cast<float *>(ws + L.off_gw_acc);
  const size_t tsz = a->ttype == CULOSS_I32 ? 4 : 8, gsz = culoss__dtype_size(a->gw_dtype);
  const char *targets = static_cast<const char *>(a->targets);
  CL_TRY(culoss__cublas_status(cublasSetStream(h, stream), "cublasSetStream"));

  culoss__vp_args va;
  memset(&va, 0, sizeof va);
  va.o = a->o, va.vp = a->vp, va.n = n, va.c_local = v, va.ld = v, va.dtype = a->dtype;
  va.ttype = a->ttype, va.targets = a->targets, va.stats = mine, va.gathered = all;
  vp_params p = vp_fill(ctx, &va); /* rec_n = n */
  p.rows_out = 1;
  auto logits = [&](int64_t r0, int64_t nr) -> culoss_status {
    if (B)
      CU_TRY(launch(bias_fill_kernel<T>, dim3(blocks_for(v), (unsigned)nr), dim3(LT), 0, stream,
                    tile, B, v, v),
             "launch of bias_fill_kernel");
    return gemm(h, CUBLAS_OP_T, CUBLAS_OP_N, v, nr, d, W, ty, d, H + r0 * d, ty, d, B ? 1.0f : 0.0f,
                tile, ty, v, "cublasGemmEx(logits)");
  };

  /* ---- pass 1: records ---- */
  for (int64_t r0 = 0; r0 < n; r0 += L.rows) {
    const int64_t nr = n - r0 < L.rows ? n - r0 : L.rows;
    CL_TRY(logits(r0, nr));
    p.n = nr, p.row0 = r0, p.x = tile, p.targets = targets + (size_t)r0 * tsz;
    CL_TRY(vp_launch_stats(ctx, p, (int)a->dtype, stream));
  }
  p.n = n, p.row0 = 0, p.targets = a->targets;
  CL_TRY(vp_launch_slice(p, stream));
  /* ---- the one collective ---- */
  if (a->vp->allgather(a->vp->user, mine, all, (size_t)(n + 1) * CULOSS_VOCAB_PARALLEL_RECORD_BYTES,
                       stream) != 0)
    return culoss__error(CULOSS_ERROR_INTERNAL,
                         "culoss_linear_cross_entropy_vocab_parallel: vp->allgather returned an "
                         "error");
  CL_TRY(vp_launch_prep(p, stream));
  if (n == 0 && !a->accumulate) {
    if (a->grad_weight)
      CU_TRY(cudaMemsetAsync(a->grad_weight, 0, (size_t)(v * d) * gsz, stream), "cudaMemsetAsync");
    if (a->grad_bias)
      CU_TRY(cudaMemsetAsync(a->grad_bias, 0, (size_t)v * gsz, stream), "cudaMemsetAsync");
  }
  /* ---- pass 2: loss and gradients ---- */
  int64_t grid = 0;
  for (int64_t r0 = 0; r0 < n; r0 += L.rows) {
    const int64_t nr = n - r0 < L.rows ? n - r0 : L.rows;
    if (!one_block) CL_TRY(logits(r0, nr));
    p.n = nr, p.row0 = r0, p.x = tile, p.grad = want_grad ? tile : nullptr;
    p.targets = targets + (size_t)r0 * tsz;
    p.loss = (reduced ? row_loss : a->loss) + r0;
    p.grad_loss = a->grad_loss && !reduced ? a->grad_loss + r0 : a->grad_loss;
    p.lse_out = a->lse ? a->lse + r0 : nullptr;
    p.ent_out = a->entropy ? a->entropy + r0 : nullptr;
    CL_TRY(vp_launch_finish(ctx, p, (int)a->dtype, &grid, stream));
    const bool first = r0 == 0 && !a->accumulate;
    if (a->grad_hidden) /* this slice's part of grad_hidden [nr, d] = dlogits @ W */
      CL_TRY(gemm(h, CUBLAS_OP_N, CUBLAS_OP_N, d, nr, v, W, ty, d, tile, ty, v, 0.0f,
                  static_cast<T *>(a->grad_hidden) + r0 * d, ty, d, "cublasGemmEx(grad_hidden)"));
    if (a->grad_weight && direct) /* fp32 grad_weight [v, d] (+)= dlogits^T @ Hr */
      CL_TRY(gemm(h, CUBLAS_OP_N, CUBLAS_OP_T, d, v, nr, H + r0 * d, ty, d, tile, ty, v,
                  first ? 0.0f : 1.0f, a->grad_weight, CUDA_R_32F, d, "cublasGemmEx(grad_weight)"));
    if (a->grad_bias)
      CU_TRY(launch(colsum_kernel<T>, dim3(blocks_for(v)), dim3(LT), 0, stream, tile, nr, v, v,
                    direct ? static_cast<float *>(a->grad_bias) : bias_acc,
                    (int)(direct ? first : r0 == 0)),
             "launch of colsum_kernel");
  }
  if (a->grad_bias && !direct && n > 0)
    CU_TRY(launch(convert_kernel<T>, dim3(blocks_for(v)), dim3(LT), 0, stream,
                  (const float *)bias_acc, static_cast<T *>(a->grad_bias), v, a->accumulate),
           "launch of convert_kernel");
  /* ---- pass B, a 16-bit grad_weight: fp32 sums by vocabulary slices ---- */
  if (a->grad_weight && !direct && n > 0) {
    p.grad_only = 1, p.rows_out = 1, p.lse_out = p.ent_out = nullptr;
    for (int64_t c0 = 0; c0 < v; c0 += L.vslice) {
      const int64_t vc = v - c0 < L.vslice ? v - c0 : L.vslice;
      const int64_t rb = (int64_t)(L.off_row_loss / ((size_t)vc * sizeof(T)));
      const int64_t rows_b = rb < 1 ? 1 : (rb > 32768 ? 32768 : rb);
      for (int64_t r0 = 0; r0 < n; r0 += rows_b) {
        const int64_t nr = n - r0 < rows_b ? n - r0 : rows_b;
        if (B)
          CU_TRY(launch(bias_fill_kernel<T>, dim3(blocks_for(vc), (unsigned)nr), dim3(LT), 0,
                        stream, tile, B + c0, vc, vc),
                 "launch of bias_fill_kernel");
        CL_TRY(gemm(h, CUBLAS_OP_T, CUBLAS_OP_N, vc, nr, d, W + c0 * d, ty, d, H + r0 * d, ty, d,
                    B ? 1.0f : 0.0f, tile, ty, vc, "cublasGemmEx(logits slice)"));
        p.n = nr, p.row0 = r0, p.c = vc, p.ld = vc, p.col0 = c0, p.x = tile, p.grad = tile;
        p.targets = targets + (size_t)r0 * tsz;
        p.grad_loss = a->grad_loss && !reduced ? a->grad_loss + r0 : a->grad_loss;
        CL_TRY(vp_launch_finish(ctx, p, (int)a->dtype, &grid, stream));
        CL_TRY(gemm(h, CUBLAS_OP_N, CUBLAS_OP_T, d, vc, nr, H + r0 * d, ty, d, tile, ty, vc,
                    r0 == 0 ? 0.0f : 1.0f, gw_acc, CUDA_R_32F, d,
                    "cublasGemmEx(grad_weight slice)"));
      }
      CU_TRY(launch(convert_kernel<T>, dim3(blocks_for(vc * d)), dim3(LT), 0, stream,
                    (const float *)gw_acc, static_cast<T *>(a->grad_weight) + c0 * d, vc * d,
                    a->accumulate),
             "launch of convert_kernel");
    }
  }
  if (!reduced) return CULOSS_OK;
  const int64_t rgrid = capped_grid(ctx, (n + LT - 1) / LT);
  if (n > 0)
    CU_TRY(launch(row_loss_sum_kernel, dim3((unsigned)rgrid), dim3(LT), 0, stream,
                  (const float *)row_loss, n, ctx->scratch->partial_loss),
           "launch of row_loss_sum_kernel");
  (void)grid;
  return culoss__finish_reduction(ctx, n > 0 ? (int)rgrid : 0, a->loss, (int)a->o.reduction, p.div);
}

} // namespace
} // namespace culoss_dev

using namespace culoss_dev;

extern "C" culoss_status culoss__cuda_linear_cross_entropy(culoss_context *ctx, const void *args) {
  const culoss__lce_args *a = static_cast<const culoss__lce_args *>(args);
  return with_dtype(a->dtype, [&](auto t) { return run<decltype(t)>(ctx, a); });
}

extern "C" culoss_status culoss__cuda_linear_vocab_parallel(culoss_context *ctx, const void *args) {
  const culoss__lce_args *a = static_cast<const culoss__lce_args *>(args);
  return with_dtype(a->dtype, [&](auto t) { return run_vp<decltype(t)>(ctx, a); });
}
