/*
 * culoss_nccl.h: the all-gather of vocabulary-parallel cross-entropy over
 * NCCL. Optional and header-only: include it where nccl.h is and link
 * -lnccl; libculoss itself never links NCCL.
 *
 *   culoss_vocab_parallel vp = {rank, ranks, v_begin, v_total, NULL, NULL};
 *   culoss_vocab_parallel_use_nccl(&vp, comm);   // comm: this rank's ncclComm_t
 *   culoss_cross_entropy_vocab_parallel(ctx, &o, &vp, ...);
 *
 * The call enqueues ncclAllGather on the context's stream between its two
 * phases (capturable in a CUDA graph, as NCCL collectives are). One process
 * (or thread) per GPU: with several GPUs driven from one thread inside
 * ncclGroupStart/End, the grouped collective is issued at ncclGroupEnd,
 * after the call's second phase was enqueued; drive the two phases
 * (culoss_cross_entropy_vocab_parallel_stats / _finish) around the group
 * there instead.
 */
#ifndef CULOSS_NCCL_H
#define CULOSS_NCCL_H

#include <nccl.h>

#include "culoss.h"

/* vp->allgather for a ncclComm_t passed as `user`. */
static inline int culoss_nccl_allgather(void *comm, const void *send, void *recv, size_t bytes,
                                        void *stream) {
  return ncclAllGather(send, recv, bytes, ncclUint8, (ncclComm_t)comm, (cudaStream_t)stream) ==
                 ncclSuccess
             ? 0
             : 1;
}

/* Points vp's collective at `comm` (which must outlive the calls). Returns
   0, or -1 when the communicator's size is not vp->ranks (NCCL would gather
   more records than the workspace holds). */
static inline int culoss_vocab_parallel_use_nccl(culoss_vocab_parallel *vp, ncclComm_t comm) {
  int count = 0;
  if (ncclCommCount(comm, &count) != ncclSuccess || count != vp->ranks) return -1;
  vp->allgather = culoss_nccl_allgather;
  vp->user = (void *)comm;
  return 0;
}

#endif /* CULOSS_NCCL_H */
