/*
 * test_emu.cc: the CPU emulator of CUDA catches what it claims to catch
 * (tests/emu/README.md). Each test runs in its own process (Criterion forks),
 * so a sticky emulated fault stays inside its test.
 */
#include "cuda_emu.h"

#include <criterion/criterion.h>
#include <signal.h>
#include <stdlib.h>

#include <cooperative_groups.h>
#include <cub/block/block_reduce.cuh>

#include "launch.cuh"

namespace {

constexpr int B = 128;

/* Block sum through the CUB stand-in: right under every schedule. */
__global__ void block_sum(const float *x, float *out) {
  typedef cub::BlockReduce<float, B> reduce_t;
  __shared__ typename reduce_t::TempStorage tmp;
  const float s = reduce_t(tmp).Sum(x[blockIdx.x * B + threadIdx.x]);
  if (threadIdx.x == 0) out[blockIdx.x] = s;
}

/* Thread 0 reads what the others wrote, with or without the barrier. */
__global__ void neighbour_read(float *out, int with_barrier) {
  __shared__ float buf[B];
  buf[threadIdx.x] = (float)threadIdx.x;
  if (with_barrier) __syncthreads();
  if (threadIdx.x == 0) {
    float s = 0.0f;
    for (int i = 0; i < B; i++) s += buf[i];
    out[0] = s;
  }
  if (!with_barrier) __syncthreads(); /* the next launch's writes come after */
}

/* __syncthreads_or twice in a row: only thread `who` has the predicate in
   the first, nobody in the second; out[t] = 2 * first + second. */
__global__ void syncthreads_or_twice(int who, float *out) {
  const int a = __syncthreads_or((int)threadIdx.x == who);
  const int b = __syncthreads_or(0);
  out[blockIdx.x * B + threadIdx.x] = (float)(2 * a + b);
}

/* __syncthreads reached by half of the block. */
__global__ void divergent_barrier(float *out) {
  if (threadIdx.x < B / 2) __syncthreads();
  out[threadIdx.x] = 1.0f;
}

/* Warp butterfly and shift-down reductions. */
__global__ void warp_sums(const float *x, float *xor_out, float *down_out) {
  float a = x[threadIdx.x], b = a;
  for (int off = 16; off > 0; off >>= 1) a += __shfl_xor_sync(0xffffffffu, a, off);
  for (int off = 16; off > 0; off >>= 1) b += __shfl_down_sync(0xffffffffu, b, off);
  xor_out[threadIdx.x] = a;
  if (threadIdx.x % 32 == 0) down_out[threadIdx.x / 32] = b;
}

/* A shuffle that lane 31 skips. */
__global__ void partial_warp_shuffle(float *out) {
  float v = (float)threadIdx.x;
  if (threadIdx.x % 32 != 31) v = __shfl_xor_sync(0xffffffffu, v, 1);
  out[threadIdx.x] = v;
}

__global__ void write_at(float *p, int64_t i) { p[i] = 1.0f; }

/* Each block of a cluster writes B values into its dynamic shared memory,
   then (after cluster.sync when with_sync) every thread reads its
   neighbour rank's value through map_shared_rank; out gets rank sums. */
__global__ void cluster_ring(float *out, int with_sync, int extra) {
  namespace cg = cooperative_groups;
  cg::cluster_group cl = cg::this_cluster();
  CULOSS_DYNAMIC_SMEM(raw);
  float *mine = reinterpret_cast<float *>(raw);
  const unsigned rank = cl.block_rank(), n = cl.num_blocks();
  mine[threadIdx.x] = (float)(rank * 1000 + threadIdx.x);
  if (with_sync) cl.sync();
  const float *theirs = cl.map_shared_rank(mine, (rank + 1) % (n + (unsigned)extra));
  out[blockIdx.x * B + threadIdx.x] = theirs[threadIdx.x];
  if (with_sync) cl.sync(); /* no block leaves while another reads its memory */
}

/* A cluster.sync() that rank 0 skips. */
__global__ void cluster_divergent(float *out) {
  namespace cg = cooperative_groups;
  if (cg::this_cluster().block_rank() != 0) cg::this_cluster().sync();
  out[blockIdx.x] = 1.0f;
}

/* Thread 0 writes dynamic shared memory at byte offset `at` (a float),
   after every thread has filled the first `fill` bytes. */
__global__ void dynamic_smem_write(float *out, int64_t fill, int64_t at) {
  CULOSS_DYNAMIC_SMEM(raw);
  for (int64_t i = threadIdx.x; i < fill; i += blockDim.x) raw[i] = 1;
  __syncthreads();
  if (threadIdx.x == 0) {
    float v = 2.0f;
    memcpy(raw + at, &v, sizeof v);
    out[blockIdx.x] = (float)raw[0];
  }
}

/* One past the end of a __shared__ array (index from the caller so the
   compiler cannot see it). */
__global__ void shared_overrun(float *out, int i) {
  __shared__ float buf[B];
  buf[threadIdx.x] = 1.0f;
  __syncthreads();
  const float *q = buf; /* through a pointer: UBSan's bounds check cannot see it, ASan can */
  if (threadIdx.x == 0) out[0] = q[i];
}
__global__ void nothing(float *) {}

float *dmalloc(size_t count) {
  void *p = nullptr;
  cr_assert_eq(cudaMalloc(&p, count * sizeof(float)), cudaSuccess);
  return static_cast<float *>(p);
}

float block_sum_once(const char *schedule) {
  setenv("CULOSS_EMU_SCHEDULE", schedule, 1);
  float h[4 * B];
  for (int i = 0; i < 4 * B; i++) h[i] = (float)(i % 7) - 2.5f;
  float *x = dmalloc(4 * B), *o = dmalloc(4);
  cr_assert_eq(cudaMemcpy(x, h, sizeof h, cudaMemcpyHostToDevice), cudaSuccess);
  cr_assert_eq(culoss_dev::launch(block_sum, dim3(4), dim3(B), 0, nullptr, (const float *)x, o),
               cudaSuccess);
  float r[4];
  cr_assert_eq(cudaMemcpy(r, o, sizeof r, cudaMemcpyDeviceToHost), cudaSuccess);
  for (int b = 0; b < 4; b++) {
    float want = 0.0f;
    for (int i = 0; i < B; i++) want += h[b * B + i];
    cr_assert_float_eq(r[b], want, 1e-4f, "%s: block %d: %g vs %g", schedule, b, (double)r[b],
                       (double)want);
  }
  cudaFree(x);
  cudaFree(o);
  return r[0];
}

float neighbour_sum(const char *schedule, int with_barrier) {
  setenv("CULOSS_EMU_SCHEDULE", schedule, 1);
  float *o = dmalloc(1);
  cr_assert_eq(culoss_dev::launch(neighbour_read, dim3(1), dim3(B), 0, nullptr, o, with_barrier),
               cudaSuccess);
  float r;
  cr_assert_eq(cudaMemcpy(&r, o, 4, cudaMemcpyDeviceToHost), cudaSuccess);
  cudaFree(o);
  return r;
}

} // namespace

Test(emu, block_reduce_forward) { block_sum_once("forward"); }
Test(emu, block_reduce_reverse) { block_sum_once("reverse"); }
Test(emu, block_reduce_random) { block_sum_once("random:3"); }

Test(emu, barrier_makes_writes_visible_under_any_schedule) {
  cr_assert_float_eq(neighbour_sum("forward", 1), (float)(B * (B - 1) / 2), 0.0f);
}

/* Without the barrier thread 0 runs first under the forward schedule and
   reads the other threads' slots before they are written. */
Test(emu, missing_barrier_is_a_wrong_answer) {
  cr_assert_neq(neighbour_sum("forward", 0), (float)(B * (B - 1) / 2));
}

Test(emu, divergent_syncthreads_is_a_launch_failure) {
  float *o = dmalloc(B);
  cr_assert_eq(culoss_dev::launch(divergent_barrier, dim3(1), dim3(B), 0, nullptr, o),
               cudaSuccess); /* the fault comes at execution, as on a GPU */
  cr_assert_eq(cudaDeviceSynchronize(), cudaErrorLaunchFailure);
  cr_assert_eq(cudaMemset(o, 0, 4), cudaErrorLaunchFailure, "the fault is sticky");
  cudaFree(o); /* freed, though it reports the sticky fault */
}

Test(emu, syncthreads_or_reduces_over_the_block_under_any_schedule) {
  const char *schedules[] = {"forward", "reverse", "random:5"};
  for (int si = 0; si < 3; si++) {
    setenv("CULOSS_EMU_SCHEDULE", schedules[si], 1);
    float *o = dmalloc(2 * B), h[2 * B];
    cr_assert_eq(culoss_dev::launch(syncthreads_or_twice, dim3(2), dim3(B), 0, nullptr, B - 1, o),
                 cudaSuccess);
    cr_assert_eq(cudaMemcpy(h, o, sizeof h, cudaMemcpyDeviceToHost), cudaSuccess);
    for (int t = 0; t < 2 * B; t++)
      cr_assert_float_eq(h[t], 2.0f, 0.0f, "%s thread %d", schedules[si], t);
    cudaFree(o);
  }
}

Test(emu, warp_shuffles) {
  float h[64], *x = dmalloc(64), *a = dmalloc(64), *d = dmalloc(2);
  for (int i = 0; i < 64; i++) h[i] = (float)(i * i % 11);
  cr_assert_eq(cudaMemcpy(x, h, sizeof h, cudaMemcpyHostToDevice), cudaSuccess);
  cr_assert_eq(culoss_dev::launch(warp_sums, dim3(1), dim3(64), 0, nullptr, (const float *)x, a, d),
               cudaSuccess);
  float ra[64], rd[2];
  cr_assert_eq(cudaMemcpy(ra, a, sizeof ra, cudaMemcpyDeviceToHost), cudaSuccess);
  cr_assert_eq(cudaMemcpy(rd, d, sizeof rd, cudaMemcpyDeviceToHost), cudaSuccess);
  for (int w = 0; w < 2; w++) {
    float want = 0.0f;
    for (int i = 0; i < 32; i++) want += h[w * 32 + i];
    for (int i = 0; i < 32; i++) cr_assert_float_eq(ra[w * 32 + i], want, 0.0f);
    cr_assert_float_eq(rd[w], want, 0.0f);
  }
  cudaFree(x);
  cudaFree(a);
  cudaFree(d);
}

Test(emu, lane_missing_from_a_shuffle_is_a_launch_failure) {
  float *o = dmalloc(32);
  cr_assert_eq(culoss_dev::launch(partial_warp_shuffle, dim3(1), dim3(32), 0, nullptr, o),
               cudaSuccess);
  cr_assert_eq(cudaDeviceSynchronize(), cudaErrorLaunchFailure);
  cudaFree(o);
}

/* Under AddressSanitizer the emulator's allocations are ASan's, and ASan
   itself stops the process at these accesses. */
#if defined(__SANITIZE_ADDRESS__)
#define SKIP_UNDER_ASAN() cr_skip_test("skipped: AddressSanitizer reports this access itself")
#else
#define SKIP_UNDER_ASAN() (void)0
#endif

Test(emu, write_just_past_an_allocation_is_caught) {
  SKIP_UNDER_ASAN();
  float *p = dmalloc(100); /* 400 bytes: the canary covers 400..511 */
  cr_assert_eq(culoss_dev::launch(write_at, dim3(1), dim3(1), 0, nullptr, p, (int64_t)100),
               cudaSuccess);
  cr_assert_eq(cudaDeviceSynchronize(), cudaErrorIllegalAddress);
  cudaFree(p);
}

/* Dynamic shared memory is exactly the launch's size: one float past it
   (at a 16-byte multiple, where a pack-sized slack would hide it, and
   mid-pack for an odd size) fails the launch (the tests below); the last
   float inside is fine, in every block. */
Test(emu, last_float_of_dynamic_shared_memory_is_fine) {
  SKIP_UNDER_ASAN();
  float *o = dmalloc(4);
  const struct {
    size_t bytes;
    int64_t at;
  } inside[] = {{400, 396}, {36, 32}, {4, 0}};
  for (const auto &k : inside) {
    cr_assert_eq(culoss_dev::launch(dynamic_smem_write, dim3(4), dim3(B), k.bytes, nullptr, o,
                                    (int64_t)k.bytes, k.at),
                 cudaSuccess);
    cr_assert_eq(cudaDeviceSynchronize(), cudaSuccess, "%zu bytes, float at %lld", k.bytes,
                 (long long)k.at);
  }
  cudaFree(o);
}

/* Each failing case in its own process: the fault is sticky. */
static void smem_overrun(size_t bytes, int64_t at) {
  float *o = dmalloc(4);
  cr_assert_eq(culoss_dev::launch(dynamic_smem_write, dim3(4), dim3(B), bytes, nullptr, o,
                                  (int64_t)bytes, at),
               cudaSuccess);
  cr_assert_eq(cudaDeviceSynchronize(), cudaErrorIllegalAddress, "%zu bytes, float at %lld", bytes,
               (long long)at);
  cr_assert_eq(cudaGetLastError(), cudaErrorIllegalAddress);
  cudaFree(o);
}
Test(emu, dynamic_smem_one_pack_short) {
  SKIP_UNDER_ASAN();
  smem_overrun(400, 400);
}
Test(emu, dynamic_smem_mid_pack) {
  SKIP_UNDER_ASAN();
  smem_overrun(36, 36);
}
Test(emu, dynamic_smem_none_requested) {
  SKIP_UNDER_ASAN();
  smem_overrun(0, 0);
}

/* Thread-block clusters: the blocks of a cluster run together; with the
   barrier, every block reads its neighbour's values under any schedule;
   without it, a schedule that runs the reader first reads poison. */
static cudaError_t cluster_ring_once(const char *sched, int with_sync, float *host) {
  setenv("CULOSS_EMU_SCHEDULE", sched, 1);
  float *o = dmalloc(8 * B);
  cr_assert_eq(culoss_dev::launch_cluster(cluster_ring, dim3(8), dim3(B), B * sizeof(float),
                                          nullptr, 4u, o, with_sync, 0),
               cudaSuccess);
  const cudaError_t e = cudaDeviceSynchronize();
  if (e == cudaSuccess)
    cr_assert_eq(cudaMemcpy(host, o, 8 * B * sizeof(float), cudaMemcpyDeviceToHost), cudaSuccess);
  cudaFree(o);
  return e;
}
Test(emu, cluster_blocks_share_dynamic_smem_after_sync) {
  float h[8 * B];
  cr_assert_eq(cluster_ring_once("reverse", 1, h), cudaSuccess);
  for (int b = 0; b < 8; b++)
    for (int t = 0; t < B; t++)
      cr_assert_eq(h[b * B + t], (float)(((b % 4 + 1) % 4) * 1000 + t), "block %d thread %d", b, t);
}
/* Without the barriers, under reverse: rank 3 runs first and reads rank
   0's poison, or a rank reads one that has exited (its shared memory gone):
   a wrong answer or a launch failure, never a silent pass. */
Test(emu, cluster_missing_sync_is_caught) {
  float h[8 * B];
  if (cluster_ring_once("reverse", 0, h) != cudaSuccess) return;
  int wrong = 0;
  for (int b = 0; b < 8; b++)
    for (int t = 0; t < B; t++) wrong += h[b * B + t] != (float)(((b % 4 + 1) % 4) * 1000 + t);
  cr_assert(wrong > 0, "a missing cluster.sync went unnoticed");
}
Test(emu, cluster_rank_out_of_range_is_a_launch_failure) {
  float *o = dmalloc(8 * B);
  cr_assert_eq(culoss_dev::launch_cluster(cluster_ring, dim3(4), dim3(B), B * sizeof(float),
                                          nullptr, 4u, o, 1, 1), /* rank 3 reads rank 4 */
               cudaSuccess);
  cr_assert_eq(cudaDeviceSynchronize(), cudaErrorLaunchFailure);
  cudaFree(o);
}
Test(emu, cluster_divergent_sync_is_a_launch_failure) {
  float *o = dmalloc(8);
  cr_assert_eq(culoss_dev::launch_cluster(cluster_divergent, dim3(4), dim3(B), 0, nullptr, 2u, o),
               cudaSuccess);
  cr_assert_eq(cudaDeviceSynchronize(), cudaErrorLaunchFailure);
  cudaFree(o);
}
Test(emu, cluster_size_is_validated) {
  float *o = dmalloc(8);
  cr_assert_eq(culoss_dev::launch_cluster(cluster_divergent, dim3(6), dim3(B), 0, nullptr, 4u, o),
               cudaErrorInvalidClusterSize, "4 does not divide 6");
  cr_assert_eq(culoss_dev::launch_cluster(cluster_divergent, dim3(16), dim3(B), 0, nullptr, 16u, o),
               cudaErrorInvalidClusterSize, "16 is not portable");
  cudaFree(o);
}

#if !defined(__SANITIZE_ADDRESS__)
Test(emu, dynamic_smem_far_past_hits_the_guard, .signal = SIGSEGV) {
  float *o = dmalloc(4);
  (void)culoss_dev::launch(dynamic_smem_write, dim3(1), dim3(B), (size_t)400, nullptr, o,
                           (int64_t)400, (int64_t)400 + 4096);
}
#endif

#if !defined(__SANITIZE_ADDRESS__)
Test(emu, access_beyond_the_guard_faults, .signal = SIGSEGV) {
  float *p = dmalloc(1024); /* 4096 bytes: the guard page starts right after */
  (void)culoss_dev::launch(write_at, dim3(1), dim3(1), 0, nullptr, p, (int64_t)1024);
}
#endif

Test(emu, launch_configuration_is_validated) {
  float *p = dmalloc(1);
  cr_assert_eq(culoss_dev::launch(nothing, dim3(1), dim3(2048), 0, nullptr, p),
               cudaErrorInvalidConfiguration);
  cr_assert_eq(culoss_dev::launch(nothing, dim3(1), dim3(32), 64 << 10, nullptr, p),
               cudaErrorInvalidValue, "over 48 KiB of dynamic shared memory needs the attribute");
  cr_assert_eq(cudaFuncSetAttribute(reinterpret_cast<const void *>(nothing),
                                    cudaFuncAttributeMaxDynamicSharedMemorySize, 64 << 10),
               cudaSuccess);
  cr_assert_eq(culoss_dev::launch(nothing, dim3(1), dim3(32), 64 << 10, nullptr, p), cudaSuccess);
  cudaFree(p);
}

Test(emu, global_capture_forbids_allocation_and_sync) {
  cudaStream_t s;
  cr_assert_eq(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), cudaSuccess);
  float *p = dmalloc(B);
  cr_assert_eq(cudaStreamBeginCapture(s, cudaStreamCaptureModeGlobal), cudaSuccess);
  cr_assert_eq(culoss_dev::launch(write_at, dim3(1), dim3(1), 0, s, p, (int64_t)0), cudaSuccess);
  void *q = nullptr;
  cr_assert_eq(cudaMalloc(&q, 16), cudaErrorStreamCaptureUnsupported);
  cudaGraph_t g = nullptr;
  cr_assert_eq(cudaStreamEndCapture(s, &g), cudaErrorStreamCaptureInvalidated);
  cr_assert_eq(g, nullptr);
  cr_assert_eq(cudaStreamDestroy(s), cudaSuccess);
  cr_assert_eq(cudaFree(p), cudaSuccess);
}

Test(emu, captured_work_runs_at_replay_not_at_capture) {
  cudaStream_t s;
  cr_assert_eq(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), cudaSuccess);
  float *p = dmalloc(1), zero = 0.0f, r = -1.0f;
  cr_assert_eq(cudaMemcpy(p, &zero, 4, cudaMemcpyHostToDevice), cudaSuccess);
  cr_assert_eq(cudaStreamBeginCapture(s, cudaStreamCaptureModeGlobal), cudaSuccess);
  cr_assert_eq(culoss_dev::launch(write_at, dim3(1), dim3(1), 0, s, p, (int64_t)0), cudaSuccess);
  cudaGraph_t g;
  cr_assert_eq(cudaStreamEndCapture(s, &g), cudaSuccess);
  cr_assert_eq(cudaMemcpy(&r, p, 4, cudaMemcpyDeviceToHost), cudaSuccess);
  cr_assert_float_eq(r, 0.0f, 0.0f, "captured, not run");
  cudaGraphExec_t x;
  cr_assert_eq(cudaGraphInstantiate(&x, g, 0), cudaSuccess);
  cr_assert_eq(cudaGraphLaunch(x, s), cudaSuccess);
  cr_assert_eq(cudaStreamSynchronize(s), cudaSuccess);
  cr_assert_eq(cudaMemcpy(&r, p, 4, cudaMemcpyDeviceToHost), cudaSuccess);
  cr_assert_float_eq(r, 1.0f, 0.0f, "run at replay");
  cr_assert_eq(cudaGraphExecDestroy(x), cudaSuccess);
  cr_assert_eq(cudaGraphDestroy(g), cudaSuccess);
  cr_assert_eq(cudaStreamDestroy(s), cudaSuccess);
  cr_assert_eq(cudaFree(p), cudaSuccess);
}

/* An AddressSanitizer build of the emulator checks the kernels' own memory
   accesses: here a read past a __shared__ array ends the process. */
#if defined(__SANITIZE_ADDRESS__)
/* ASan reports by abort() in this program (CI sets the same) */
extern "C" const char *__asan_default_options() { return "abort_on_error=1"; }

Test(emu, shared_memory_overrun_is_caught_by_asan, .signal = SIGABRT) {
  float *o = dmalloc(1);
  (void)culoss_dev::launch(shared_overrun, dim3(1), dim3(B), 0, nullptr, o, B + 4);
}

Test(emu, dynamic_smem_overrun_is_caught_by_asan, .signal = SIGABRT) {
  float *o = dmalloc(1);
  (void)culoss_dev::launch(dynamic_smem_write, dim3(1), dim3(B), (size_t)400, nullptr, o,
                           (int64_t)400, (int64_t)400);
  (void)cudaDeviceSynchronize();
}
#endif
