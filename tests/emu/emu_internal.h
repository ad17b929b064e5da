/*
 * emu_internal.h: the private header of culoss's CPU emulator of the CUDA
 * runtime and cuBLAS, a testing tool for machines without a GPU
 * (tests/emu/README.md).
 *
 * It implements the part of cudart and cuBLAS that culoss, its tests and
 * its example call, with the same C ABI, so the library's host code and the
 * GPU test suites link against it unchanged; cuda_emu.h supplies the device
 * side. What it checks that a plain CPU port of the kernels would not:
 *   - kernels: every CUDA thread is a fiber; __syncthreads, __syncwarp and
 *     shuffles are real barriers; barrier divergence, a lane missing from a
 *     warp operation, and mismatched warp operations are errors; threads and
 *     blocks run in the order CULOSS_EMU_SCHEDULE asks (forward, reverse,
 *     random[:seed]); launch configurations are validated as CUDA does
 *     (block size, grid limits, dynamic shared memory above 48 KiB only
 *     after cudaFuncSetAttribute);
 *   - dynamic shared memory is exactly the launch's size, followed by a
 *     canary redzone checked after every block (a write there is
 *     cudaErrorIllegalAddress) and a guard page;
 *   - memory: cudaMalloc returns poisoned memory (0xFF bytes: NaN in every
 *     float format) that ends at a PROT_NONE guard page, with the bytes up to
 *     the 256-byte boundary canary-checked after every kernel and at free; a
 *     fault in a guard page is reported with the allocation it overran;
 *     copies, memsets and GEMM operands must lie inside live allocations;
 *   - streams and graphs: launches, copies and memsets are recorded while a
 *     stream is captured and replayed by cudaGraphLaunch; calls that are
 *     illegal during a global-mode capture (cudaMalloc, cudaFree,
 *     synchronous copies, stream/device synchronisation) fail and invalidate
 *     the capture, as CUDA does;
 *   - errors: a kernel failure is sticky (every later call returns it), as
 *     a device fault is.
 * Everything runs synchronously on the calling thread, one kernel at a time;
 * races between streams, memory-model subtleties and timing are not
 * modelled. cuBLAS GEMMs accumulate in double and round once.
 *
 * The emulator (libculoss_emu_runtime.so) is four files:
 *   - emu_memory.cc: device memory: allocations, guard pages, canaries, the
 *     fault handler, and the cudart calls that allocate and free;
 *   - emu_fibers.cc: fibers, barriers, warp operations, the schedule, and
 *     launching and running kernels (the device side cuda_emu.h declares),
 *     with the cudart calls on kernels' attributes;
 *   - emu_cudart.cc: the rest of the cudart entry points, with the state
 *     they all share (the API lock, the errors) and streams;
 *   - emu_cublas.cc: the cuBLAS entry points.
 * This header declares what more than one of them uses, in
 * culoss_emu::internal: external linkage, but hidden visibility (the
 * pragma around the namespace, here and where the files define its
 * members), so the library still exports only the C ABI entry points and
 * what cuda_emu.h declares.
 */
#ifndef CULOSS_EMU_INTERNAL_H
#define CULOSS_EMU_INTERNAL_H

#include "cuda_emu.h"

#include <stddef.h>
#include <stdint.h>

#include <functional>
#include <mutex>

/* Under AddressSanitizer (an emulator build with -fsanitize=address: kernels
   then get ASan's checks on shared memory, stacks and device allocations)
   every switch is announced, and a stack is unpoisoned before reuse
   (emu_fibers.cc); cudaMalloc hands out ASan's own allocations instead of
   guarded ones (emu_memory.cc). */
#if defined(__SANITIZE_ADDRESS__)
#define EMU_ASAN 1
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif

#pragma GCC visibility push(hidden)
namespace culoss_emu::internal {

/* ---- shared state and errors (emu_cudart.cc) ---- */

extern std::recursive_mutex g_mutex; /* one API call / kernel at a time */
/* The sticky error of a device fault (cudaSuccess while there is none). */
extern cudaError_t g_sticky;
extern const char *g_kernel; /* the running kernel's signature */

/* Prints "culoss CUDA emulator: <message>" on stderr. */
void report(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
/* Returns e, remembered for cudaGetLastError unless it is cudaSuccess. */
cudaError_t set_error(cudaError_t e);
/* A device fault: every later call fails with it. */
void fault(cudaError_t e);
/* True (and the capture invalidated) during a global-mode stream capture,
   in which `what` is not allowed. */
bool capture_forbids(const char *what);
/* Runs op now, or records it while the stream is captured. */
cudaError_t submit(cudaStream_t s, std::function<void()> op);

/* ---- device memory (emu_memory.cc) ---- */

constexpr size_t PAGE = 4096;
constexpr unsigned char POISON = 0xff, CANARY = 0xa5;

/* [p, p + bytes) inside one live allocation. */
bool in_device(const void *p, size_t bytes);
/* Reports (and faults on) every allocation whose canary was overwritten. */
void check_canaries(const char *when);
/* A block's dynamic shared memory: exactly `size` bytes (16-byte aligned)
   followed by a redzone, a write into which smem_redzone_ok reports (for
   every region acquired); farther beyond, a guard page (or, under
   AddressSanitizer, ASan's own poisoning). One region per block running at
   once (one, or a cluster's); smem_release frees them all. nullptr if out
   of memory. */
unsigned char *smem_acquire(size_t size);
/* Counts a launch in the traffic window (emu_traffic.h), if one is open. */
void traffic_launch();
bool smem_redzone_ok();
void smem_release();

/* ---- the emulated device's limits (emu_fibers.cc checks launches) ---- */

constexpr int SM_COUNT = 4;
constexpr int SMEM_OPTIN = 232448; /* an H100's per-block opt-in limit */
constexpr int SMEM_DEFAULT = 48 << 10;

} // namespace culoss_emu::internal
#pragma GCC visibility pop

/* The emulator's files name these unqualified, as when they were one file. */
using namespace culoss_emu::internal;

/* Holds the API lock for the rest of the scope. */
#define LOCK std::lock_guard<std::recursive_mutex> lock_(g_mutex)
/* Returns the sticky error, if there is one. */
#define STICKY                                                                                     \
  do {                                                                                             \
    if (g_sticky != cudaSuccess) return set_error(g_sticky);                                       \
  } while (0)

#endif /* CULOSS_EMU_INTERNAL_H */
