/*
 * cooperative_groups.h, the CPU emulator's stand-in (tests/emu/README.md):
 * the part culoss's kernels use, thread-block clusters. It comes before the
 * CUDA toolkit's header in an emulator build's include path.
 *   this_cluster().sync()            a barrier over every thread of the
 *                                    cluster's blocks, which run together;
 *   block_rank(), num_blocks()       this block's rank, the cluster's size;
 *   map_shared_rank(addr, rank)      addr in this block's dynamic shared
 *                                    memory, at the same offset in block
 *                                    rank's (checked: the rank, and that addr
 *                                    is dynamic shared memory).
 */
#ifndef CULOSS_EMU_COOPERATIVE_GROUPS_H
#define CULOSS_EMU_COOPERATIVE_GROUPS_H

#include "cuda_emu.h"

namespace cooperative_groups {

struct cluster_group {
  void sync() const { culoss_emu::cluster_sync(); }
  unsigned block_rank() const { return culoss_emu::current->cluster_rank; }
  unsigned num_blocks() const { return culoss_emu::current->cluster_size; }
  template <typename T> T *map_shared_rank(T *addr, unsigned rank) const {
    return static_cast<T *>(culoss_emu::map_shared_rank(addr, rank));
  }
};

inline cluster_group this_cluster() { return cluster_group(); }

} // namespace cooperative_groups

#endif
