/*
 * launch.cuh: the one way the library launches a kernel, and the one way a
 * kernel names its dynamic shared memory.
 *
 * launch(kernel, grid, block, smem, stream, args...) enqueues the kernel and
 * returns the launch's cudaError_t (cudaGetLastError), so every launch is
 * checked the same way. Built normally it is a plain <<<>>> launch. Built for
 * the CPU emulator of the CUDA runtime (tests/emu, -DCULOSS_CUDA_EMULATOR=ON,
 * which compiles these .cu files as C++), it hands the kernel to the
 * emulator, which runs every block's threads as fibers with real barriers
 * and warp shuffles. Kernel code itself is the same in both builds.
 */
#ifndef CULOSS_LAUNCH_CUH
#define CULOSS_LAUNCH_CUH

#include <cuda_runtime.h>

#ifdef CULOSS_CUDA_EMULATOR
/* extern __shared__ has no C++ spelling: the emulator hands out the block's
   dynamic shared memory. */
#define CULOSS_DYNAMIC_SMEM(name) unsigned char *const name = culoss_emu::dynamic_smem()
#else
#define CULOSS_DYNAMIC_SMEM(name) extern __shared__ __align__(16) unsigned char name[]
#endif

namespace culoss_dev {

template <typename... Params, typename... Args>
inline cudaError_t launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem,
                          cudaStream_t stream, Args... args) {
#ifdef CULOSS_CUDA_EMULATOR
  return culoss_emu::launch(kernel, grid, block, smem, stream, args...);
#else
  kernel<<<grid, block, smem, stream>>>(args...);
  return cudaGetLastError();
#endif
}

/* The same for a grid of clusters of `cluster` blocks along x (sm_90:
   cudaLaunchKernelEx with the cluster dimension attribute; grid.x must be a
   multiple of it). The emulator runs each cluster's blocks together. */
template <typename... Params, typename... Args>
inline cudaError_t launch_cluster(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem,
                                  cudaStream_t stream, unsigned cluster, Args... args) {
#ifdef CULOSS_CUDA_EMULATOR
  return culoss_emu::launch_cluster(kernel, grid, block, smem, stream, cluster, args...);
#else
  cudaLaunchConfig_t cfg = {};
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = cluster;
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  return cudaLaunchKernelEx(&cfg, kernel, args...);
#endif
}

} // namespace culoss_dev

#endif /* CULOSS_LAUNCH_CUH */
