/*
 * cuda_emu.h: the device side of culoss's CPU emulator of CUDA, a testing
 * tool for machines without a GPU (tests/emu/README.md).
 *
 * The library's .cu files are compiled as C++ with this header in front
 * (-DCULOSS_CUDA_EMULATOR=ON). Kernels stay unchanged: __global__ functions
 * become plain functions that emu_fibers.cc runs once per thread, each CUDA
 * thread a fiber with its own stack, so that
 *   - threadIdx, blockIdx, blockDim, gridDim are the running fiber's;
 *   - __syncthreads() is a real barrier over the block's threads, and a
 *     thread that exits (or waits at another barrier) while others wait
 *     there is reported as barrier divergence, not hidden;
 *   - __syncwarp and the __shfl_*_sync family are real barriers over the
 *     lanes named in the mask, with the lanes' values exchanged; a lane of
 *     the mask that never arrives, or lanes arriving at different kinds of
 *     warp operation, are reported;
 *   - __shared__ variables are shared by the block's threads (static, one
 *     block at a time), dynamic shared memory is poisoned per block;
 *   - threads run in an order chosen by CULOSS_EMU_SCHEDULE (forward,
 *     reverse, random[:seed]) and switch at every barrier, so a missing
 *     barrier shows up as a different result under another order.
 *
 * Internal to the tests; never part of the installed library.
 */
#ifndef CULOSS_CUDA_EMU_H
#define CULOSS_CUDA_EMU_H

#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <math.h>
#include <stdint.h>
#include <string.h>

#include <functional>
#include <tuple>
#include <type_traits>
#include <utility>

#ifndef CULOSS_CUDA_EMULATOR
#define CULOSS_CUDA_EMULATOR 1
#endif

/* In a host compilation the CUDA headers define __global__, __device__ and
   __shared__ as nothing; shared variables must be one per block. */
#undef __shared__
#define __shared__ static
#ifndef __launch_bounds__
#define __launch_bounds__(...)
#endif

namespace culoss_emu {

/* What the running CUDA thread sees. */
struct thread_view {
  uint3 thread_idx;
  uint3 block_idx;
  dim3 block_dim;
  dim3 grid_dim;
  unsigned char *smem;
  size_t smem_size;
  /* thread-block clusters (a plain launch is a cluster of one) */
  unsigned cluster_rank, cluster_size;
  unsigned char *const *cluster_smem; /* every block's dynamic shared memory, by rank */
};

/* The running fiber's view (set by the scheduler before each switch). */
extern thread_local thread_view *current;

/* Barriers and warp operations (emu_fibers.cc). */
void syncthreads();
void syncwarp(unsigned mask);
/* Deposits this lane's 8 bytes, waits for the lanes of mask, returns the
   8 bytes src_lane deposited (src_lane must be in mask). */
uint64_t shfl_exchange(unsigned mask, uint64_t bits, int src_lane);
int lane_id();
/* cluster.sync(): a barrier over every thread of the cluster's blocks. */
void cluster_sync();
/* cluster.map_shared_rank: addr in this block's dynamic shared memory, the
   same offset in block `rank`'s (checked). */
void *map_shared_rank(const void *addr, unsigned rank);

inline unsigned char *dynamic_smem() { return current->smem; }

/* The traffic counters (emu_traffic.h): on only inside a counting window. */
extern bool traffic_on;
void traffic_add(const void *p, size_t bytes, bool write);
inline void count_global(const void *p, size_t bytes, bool write) {
  if (traffic_on) traffic_add(p, bytes, write);
}

/* Runs or (while the stream is captured) records a kernel. */
cudaError_t submit_kernel(const void *fn, const char *signature, dim3 grid, dim3 block, size_t smem,
                          cudaStream_t stream, std::function<void()> body, unsigned cluster = 1);

template <typename... Params, typename... Args>
cudaError_t launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem,
                   cudaStream_t stream, Args... args) {
  /* arguments are converted to the parameter types and copied at launch,
     as CUDA does */
  std::tuple<std::decay_t<Params>...> params(args...);
  return submit_kernel(reinterpret_cast<const void *>(kernel), __PRETTY_FUNCTION__, grid, block,
                       smem, stream, [kernel, params]() { std::apply(kernel, params); });
}

/* A launch in clusters of `cluster` blocks along x (cudaLaunchKernelEx with
   cudaLaunchAttributeClusterDimension): the blocks of a cluster run
   together, with cluster_sync as their barrier. */
template <typename... Params, typename... Args>
cudaError_t launch_cluster(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem,
                           cudaStream_t stream, unsigned cluster, Args... args) {
  std::tuple<std::decay_t<Params>...> params(args...);
  return submit_kernel(
      reinterpret_cast<const void *>(kernel), __PRETTY_FUNCTION__, grid, block, smem, stream,
      [kernel, params]() { std::apply(kernel, params); }, cluster);
}

template <typename T> inline uint64_t to_bits(T v) {
  static_assert(sizeof(T) <= 8, "shuffles move at most 8 bytes");
  uint64_t b = 0;
  memcpy(&b, &v, sizeof(T));
  return b;
}
template <typename T> inline T from_bits(uint64_t b) {
  T v;
  memcpy(&v, &b, sizeof(T));
  return v;
}

} // namespace culoss_emu

#define threadIdx (culoss_emu::current->thread_idx)
#define blockIdx (culoss_emu::current->block_idx)
#define blockDim (culoss_emu::current->block_dim)
#define gridDim (culoss_emu::current->grid_dim)

inline void __syncthreads() { culoss_emu::syncthreads(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) { culoss_emu::syncwarp(mask); }
/* A barrier that also ORs a predicate over the block. The accumulator is
   one static word: one block runs at a time outside cluster launches (a
   cluster kernel must not call this; none does). The barriers around it
   keep every read of one call before the next call's reset. */
inline int __syncthreads_or(int pred) {
  static int acc;
  culoss_emu::syncthreads();
  if (threadIdx.x == 0 && threadIdx.y == 0 && threadIdx.z == 0) acc = 0;
  culoss_emu::syncthreads();
  if (pred) acc = 1;
  culoss_emu::syncthreads();
  const int r = acc;
  culoss_emu::syncthreads();
  return r;
}

template <typename T> T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
  const int lane = culoss_emu::lane_id();
  const int s = (lane & ~(width - 1)) | (src & (width - 1));
  return culoss_emu::from_bits<T>(culoss_emu::shfl_exchange(mask, culoss_emu::to_bits(v), s));
}
template <typename T> T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  const int lane = culoss_emu::lane_id();
  int s = lane ^ lane_mask;
  if ((s & ~(width - 1)) > (lane & ~(width - 1))) s = lane; /* a later group: own value */
  return culoss_emu::from_bits<T>(culoss_emu::shfl_exchange(mask, culoss_emu::to_bits(v), s));
}
template <typename T> T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  const int lane = culoss_emu::lane_id();
  const int s = (lane & (width - 1)) + (int)delta >= width ? lane : lane + (int)delta;
  return culoss_emu::from_bits<T>(culoss_emu::shfl_exchange(mask, culoss_emu::to_bits(v), s));
}
template <typename T> T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  const int lane = culoss_emu::lane_id();
  const int s = (lane & (width - 1)) < (int)delta ? lane : lane - (int)delta;
  return culoss_emu::from_bits<T>(culoss_emu::shfl_exchange(mask, culoss_emu::to_bits(v), s));
}

/* One block runs at a time and a thread only yields at a barrier: a
   read-modify-write is atomic. */
inline int atomicOr(int *p, int v) {
  const int old = *p;
  *p = old | v;
  return old;
}
inline unsigned atomicOr(unsigned *p, unsigned v) {
  const unsigned old = *p;
  *p = old | v;
  return old;
}
inline int atomicAdd(int *p, int v) {
  const int old = *p;
  *p = old + v;
  return old;
}
inline int atomicMin(int *p, int v) {
  const int old = *p;
  *p = old < v ? old : v;
  return old;
}

/* device math functions glibc lacks */
inline float cospif(float x) { return (float)cos(3.14159265358979323846 * (double)x); }
inline float sinpif(float x) { return (float)sin(3.14159265358979323846 * (double)x); }

inline float atomicAdd(float *p, float v) {
  const float old = *p;
  *p = old + v;
  return old;
}

inline float __int_as_float(int i) { return culoss_emu::from_bits<float>((uint64_t)(uint32_t)i); }
inline int __float_as_int(float f) { return (int)(uint32_t)culoss_emu::to_bits(f); }

#endif /* CULOSS_CUDA_EMU_H */
