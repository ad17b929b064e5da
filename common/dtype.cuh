/*
 * dtype.cuh: device-side element types, 16-byte packs and conversions.
 *
 * Kernels are templated on the storage type T (float, __half,
 * __nv_bfloat16) and on VEC, the elements per pack. With VEC * sizeof(T) ==
 * 16 a pack is one 128-bit load or store (LDG.128/STG.128); VEC == 1 is the
 * fallback for pointers or row strides that are not 16-byte aligned. Math is
 * always fp32.
 */
#ifndef CULOSS_DTYPE_CUH
#define CULOSS_DTYPE_CUH

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include "culoss.h"

namespace culoss_dev {

/* f(T()) with T the storage type of a culoss_dtype: one place maps the
   runtime dtype to a kernel instantiation. */
template <typename F> inline auto with_dtype(int dtype, F &&f) {
  if (dtype == CULOSS_F16) return f(__half());
  if (dtype == CULOSS_BF16) return f(__nv_bfloat16());
  return f(float());
}

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f32<__half>(float v) {
  return __float2half_rn(v);
}
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

/* VEC elements of T, aligned to their total size so one access is one
   vector instruction. */
template <typename T, int VEC> struct alignas(sizeof(T) * VEC) pack { T v[VEC]; };

/* Elements per 16-byte pack. */
template <typename T> struct vec16 { static constexpr int value = 16 / (int)sizeof(T); };

/* NULL or 16-byte aligned: can take the pack path. */
inline bool aligned16(const void *ptr) { return ptr == nullptr || ((uintptr_t)ptr & 15u) == 0; }

/* Plain (coherent) loads, not ld.global.nc: with an in-place gradient the
   logits are overwritten during the kernel, so they are not read-only. */
/* Global loads and stores of the big arrays (logits, targets' rows,
   gradients) go through these four, so that the emulator's traffic model
   counts them (tests/emu/emu_traffic.h); on a GPU they are plain accesses. */
#if defined(CULOSS_CUDA_EMULATOR)
#define CULOSS__COUNT(p, bytes, write) culoss_emu::count_global(p, bytes, write)
#else
#define CULOSS__COUNT(p, bytes, write) ((void)0)
#endif

template <typename T, int VEC> __device__ __forceinline__ pack<T, VEC> load_pack(const T *p) {
  CULOSS__COUNT(p, sizeof(pack<T, VEC>), false);
  return *reinterpret_cast<const pack<T, VEC> *>(p);
}

template <typename T, int VEC>
__device__ __forceinline__ void store_pack(T *p, const pack<T, VEC> &v) {
  CULOSS__COUNT(p, sizeof(pack<T, VEC>), true);
  *reinterpret_cast<pack<T, VEC> *>(p) = v;
}

/* One element (the partial pack at a row's end, a target's logit). */
template <typename T> __device__ __forceinline__ T ld_elem(const T *p) {
  CULOSS__COUNT(p, sizeof(T), false);
  return *p;
}
template <typename T> __device__ __forceinline__ void st_elem(T *p, T v) {
  CULOSS__COUNT(p, sizeof(T), true);
  *p = v;
}

} // namespace culoss_dev

#endif /* CULOSS_DTYPE_CUH */
