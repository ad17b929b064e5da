/*
 * The CPU emulator's stand-in for cub::BlockReduce (tests/emu/README.md):
 * same interface and contract as CUB's, so the kernels compile unchanged.
 *
 * Contract kept from CUB: every thread of the block calls it, the result is
 * valid in thread 0 only, and TempStorage may not be reused without a
 * __syncthreads() in between. The emulator holds CUB to nothing more: each
 * thread parks its value in the storage, one barrier, thread 0 folds the
 * values in thread order. A caller that reuses the storage too early, or
 * reads the result in another thread, gets a wrong value under some
 * schedule (CULOSS_EMU_SCHEDULE), as it would on a GPU.
 */
#ifndef CULOSS_EMU_CUB_BLOCK_REDUCE_CUH
#define CULOSS_EMU_CUB_BLOCK_REDUCE_CUH

namespace cub {

struct Sum {
  template <typename T> T operator()(const T &a, const T &b) const { return a + b; }
};

template <typename T, int BLOCK_DIM_X, int ALGORITHM = 0, int BLOCK_DIM_Y = 1, int BLOCK_DIM_Z = 1,
          int LEGACY_PTX_ARCH = 0>
class BlockReduce {
  static constexpr int THREADS = BLOCK_DIM_X * BLOCK_DIM_Y * BLOCK_DIM_Z;

public:
  struct TempStorage {
    T values[THREADS];
  };

  explicit BlockReduce(TempStorage &storage) : st_(storage) {}

  template <typename Op> T Reduce(T v, Op op) { return Reduce(v, op, THREADS); }

  template <typename Op> T Reduce(T v, Op op, int num_valid) {
    const int tid = (int)(threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z));
    if (tid >= THREADS) __builtin_trap(); /* launched with more threads than declared */
    st_.values[tid] = v;
    __syncthreads();
    if (tid != 0) return v; /* CUB: the result is valid in thread 0 only */
    T r = st_.values[0];
    for (int i = 1; i < num_valid; i++) r = op(r, st_.values[i]);
    return r;
  }

  T Sum(T v) { return Reduce(v, cub::Sum()); }
  T Sum(T v, int num_valid) { return Reduce(v, cub::Sum(), num_valid); }

private:
  TempStorage &st_;
};

} // namespace cub

#endif
