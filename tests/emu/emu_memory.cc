/*
 * emu_memory.cc: device memory in culoss's CPU emulator of CUDA
 * (emu_internal.h, tests/emu/README.md): the table of live allocations, the
 * range check that copies, memsets and GEMM operands must pass, the canaries
 * between an allocation's end and its guard page, the SIGSEGV handler that
 * reports a guard-page fault with the allocation it overran, and the cudart
 * calls that allocate and free device and pinned host memory.
 */
#include "emu_internal.h"

#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include <map>
#include <unordered_set>
#include <vector>

#include "emu_traffic.h"

/* ------------------------------------------------------------------ */
/* device memory                                                        */
/* ------------------------------------------------------------------ */

namespace {

struct allocation {
  unsigned char *map;
  size_t map_len;
  unsigned char *ptr;
  size_t size, slack; /* bytes between the end and the guard page */
};
std::map<uintptr_t, allocation> g_allocs; /* by ptr */

/* The running launch's dynamic shared memory (smem_acquire): `size` bytes
   at ptr (16-byte aligned), then a canary redzone of the rest of the
   16-byte pack plus SMEM_REDZONE bytes, then (outside AddressSanitizer) a
   PROT_NONE guard page. Under AddressSanitizer the redzone is poisoned
   instead, so ASan reports the access itself. */
constexpr size_t SMEM_REDZONE = 64;
std::vector<allocation> g_smem; /* one per block running (a cluster's blocks) */

const allocation *find_alloc(const void *p) {
  auto it = g_allocs.upper_bound((uintptr_t)p);
  if (it == g_allocs.begin()) return nullptr;
  --it;
  const allocation &a = it->second;
  if ((uintptr_t)p >= (uintptr_t)a.ptr + a.size + a.slack) return nullptr;
  return &a;
}

bool canary_ok(const allocation &a) {
  for (size_t i = 0; i < a.slack; i++)
    if (a.ptr[a.size + i] != CANARY) return false;
  return true;
}

void segv_handler(int sig, siginfo_t *si, void *) {
  const uintptr_t addr = (uintptr_t)si->si_addr;
  for (auto &kv : g_allocs) {
    const allocation &a = kv.second;
    if (addr >= (uintptr_t)a.map && addr < (uintptr_t)a.map + a.map_len) {
      const long off = (long)(addr - (uintptr_t)a.ptr);
      fprintf(stderr,
              "culoss CUDA emulator: invalid access at %p, byte offset %ld of the %zu-byte "
              "allocation at %p (%s)\n",
              (void *)addr, off, a.size, (void *)a.ptr, g_kernel ? g_kernel : "host code");
      break;
    }
  }
  for (const allocation &a : g_smem)
    if (addr >= (uintptr_t)a.map && addr < (uintptr_t)a.map + a.map_len)
      fprintf(stderr,
              "culoss CUDA emulator: invalid access at %p, byte offset %ld of the %zu bytes of "
              "dynamic shared memory (%s)\n",
              (void *)addr, (long)(addr - (uintptr_t)a.ptr), a.size,
              g_kernel ? g_kernel : "host code");
  signal(sig, SIG_DFL); /* the access faults again and the process dies */
}

void install_segv_handler() {
  static bool done = false;
  if (done) return;
  done = true;
  static std::vector<char> alt(1 << 16);
  stack_t ss;
  ss.ss_sp = alt.data();
  ss.ss_size = alt.size();
  ss.ss_flags = 0;
  sigaltstack(&ss, nullptr);
  struct sigaction sa;
  memset(&sa, 0, sizeof sa);
  sa.sa_sigaction = segv_handler;
  sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
  sigaction(SIGSEGV, &sa, nullptr);
}

} // namespace

#pragma GCC visibility push(hidden)
namespace culoss_emu::internal {

/* [p, p + bytes) inside one live allocation. */
bool in_device(const void *p, size_t bytes) {
  const allocation *a = find_alloc(p);
  return a && (uintptr_t)p + bytes <= (uintptr_t)a->ptr + a->size;
}

void check_canaries(const char *when) {
  for (auto &kv : g_allocs)
    if (!canary_ok(kv.second)) {
      report("out-of-bounds write past the end of the %zu-byte allocation at %p (found %s)",
             kv.second.size, (void *)kv.second.ptr, when);
      fault(cudaErrorIllegalAddress);
      memset(kv.second.ptr + kv.second.size, CANARY, kv.second.slack); /* report once */
    }
}

unsigned char *smem_acquire(size_t size) {
  const size_t body = (size + 15) & ~(size_t)15;
  allocation a;
  a.size = size;
  a.slack = body - size + SMEM_REDZONE;
#ifdef EMU_ASAN
  a.map_len = body + SMEM_REDZONE;
  a.map = static_cast<unsigned char *>(aligned_alloc(16, a.map_len));
  if (!a.map) return nullptr;
  a.ptr = a.map;
  __asan_poison_memory_region(a.ptr + size, a.slack);
#else
  install_segv_handler();
  const size_t pages = (body + SMEM_REDZONE + PAGE - 1) & ~(PAGE - 1);
  a.map_len = pages + PAGE;
  void *m = mmap(nullptr, a.map_len, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (m == MAP_FAILED) return nullptr;
  a.map = static_cast<unsigned char *>(m);
  if (mprotect(a.map, pages, PROT_READ | PROT_WRITE) != 0) {
    munmap(m, a.map_len);
    return nullptr;
  }
  a.ptr = a.map + pages - body - SMEM_REDZONE; /* the redzone ends at the guard page */
  memset(a.ptr + size, CANARY, a.slack);
#endif
  g_smem.push_back(a);
  return a.ptr;
}

bool smem_redzone_ok() {
#ifdef EMU_ASAN
  return true; /* ASan has reported (and stopped at) any access there */
#else
  for (const allocation &a : g_smem)
    if (!canary_ok(a)) return false;
  return true;
#endif
}

void smem_release() {
  for (allocation &a : g_smem) {
#ifdef EMU_ASAN
    __asan_unpoison_memory_region(a.map, a.map_len);
    free(a.map);
#else
    munmap(a.map, a.map_len);
#endif
  }
  g_smem.clear();
}

} // namespace culoss_emu::internal
#pragma GCC visibility pop

/* ------------------------------------------------------------------ */
/* traffic counters (emu_traffic.h)                                     */
/* ------------------------------------------------------------------ */

namespace {
culoss_emu_traffic g_traffic;
std::unordered_set<uintptr_t> g_read_sectors, g_write_sectors;
} // namespace

namespace culoss_emu {
bool traffic_on = false;

void traffic_add(const void *p, size_t bytes, bool write) {
  if (bytes == 0) return;
  const uintptr_t a = (uintptr_t)p;
  std::unordered_set<uintptr_t> &set = write ? g_write_sectors : g_read_sectors;
  (write ? g_traffic.write_bytes : g_traffic.read_bytes) += bytes;
  for (uintptr_t s = a >> 5; s <= (a + bytes - 1) >> 5; s++) set.insert(s);
}
} // namespace culoss_emu

#pragma GCC visibility push(hidden)
namespace culoss_emu::internal {
void traffic_launch() {
  if (culoss_emu::traffic_on) g_traffic.launches++;
}
} // namespace culoss_emu::internal
#pragma GCC visibility pop

extern "C" void culoss_emu_traffic_begin(void) {
  LOCK;
  g_traffic = culoss_emu_traffic{};
  g_read_sectors.clear();
  g_write_sectors.clear();
  culoss_emu::traffic_on = true;
}

extern "C" void culoss_emu_traffic_end(culoss_emu_traffic *out) {
  LOCK;
  culoss_emu::traffic_on = false;
  g_traffic.read_sectors = g_read_sectors.size();
  g_traffic.write_sectors = g_write_sectors.size();
  if (out) *out = g_traffic;
}

/* ==================================================================== */
/* the CUDA runtime API: memory                                          */
/* ==================================================================== */

cudaError_t cudaMalloc(void **ptr, size_t size) {
  LOCK;
  if (!ptr) return set_error(cudaErrorInvalidValue);
  STICKY;
  if (capture_forbids("cudaMalloc")) return set_error(cudaErrorStreamCaptureUnsupported);
  if (size == 0) {
    *ptr = nullptr;
    return cudaSuccess;
  }
  const size_t rounded = (size + 255) & ~(size_t)255;
#ifdef EMU_ASAN
  { /* AddressSanitizer's own bounds: the bytes past `size` are poisoned */
    unsigned char *p = static_cast<unsigned char *>(aligned_alloc(256, rounded));
    if (!p) return set_error(cudaErrorMemoryAllocation);
    memset(p, POISON, size);
    __asan_poison_memory_region(p + size, rounded - size);
    allocation a;
    a.map = nullptr; /* malloc'd */
    a.map_len = rounded;
    a.ptr = p;
    a.size = size;
    a.slack = 0;
    g_allocs[(uintptr_t)p] = a;
    *ptr = p;
    return cudaSuccess;
  }
#endif
  install_segv_handler();
  const size_t pages = (rounded + PAGE - 1) & ~(PAGE - 1);
  const size_t map_len = pages + 2 * PAGE;
  void *m = mmap(nullptr, map_len, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (m == MAP_FAILED) return set_error(cudaErrorMemoryAllocation);
  unsigned char *base = static_cast<unsigned char *>(m);
  if (mprotect(base + PAGE, pages, PROT_READ | PROT_WRITE) != 0) {
    munmap(m, map_len);
    return set_error(cudaErrorMemoryAllocation);
  }
  allocation a;
  a.map = base;
  a.map_len = map_len;
  a.ptr = base + PAGE + (pages - rounded); /* 256-byte aligned, ends at the guard */
  a.size = size;
  a.slack = rounded - size;
  memset(a.ptr, POISON, size);
  memset(a.ptr + size, CANARY, a.slack);
  g_allocs[(uintptr_t)a.ptr] = a;
  *ptr = a.ptr;
  return cudaSuccess;
}

cudaError_t cudaFree(void *ptr) {
  LOCK;
  if (ptr == nullptr) return cudaSuccess;
  if (capture_forbids("cudaFree")) return set_error(cudaErrorStreamCaptureUnsupported);
  auto it = g_allocs.find((uintptr_t)ptr);
  if (it == g_allocs.end()) {
    report("cudaFree(%p): not a live allocation", ptr);
    return set_error(cudaErrorInvalidValue);
  }
  if (!canary_ok(it->second)) {
    report("out-of-bounds write past the end of the %zu-byte allocation at %p (found at free)",
           it->second.size, ptr);
    fault(cudaErrorIllegalAddress);
  }
  if (it->second.map) {
    munmap(it->second.map, it->second.map_len);
  } else {
#ifdef EMU_ASAN
    __asan_unpoison_memory_region(it->second.ptr, it->second.map_len);
#endif
    free(it->second.ptr);
  }
  g_allocs.erase(it);
  return g_sticky != cudaSuccess ? set_error(g_sticky) : cudaSuccess;
}

cudaError_t cudaMallocHost(void **ptr, size_t size) {
  LOCK;
  if (!ptr) return set_error(cudaErrorInvalidValue);
  if (capture_forbids("cudaMallocHost")) return set_error(cudaErrorStreamCaptureUnsupported);
  *ptr = malloc(size ? size : 1);
  return *ptr ? cudaSuccess : set_error(cudaErrorMemoryAllocation);
}

cudaError_t cudaFreeHost(void *ptr) {
  LOCK;
  if (capture_forbids("cudaFreeHost")) return set_error(cudaErrorStreamCaptureUnsupported);
  free(ptr);
  return cudaSuccess;
}

cudaError_t cudaMemGetInfo(size_t *free_bytes, size_t *total) {
  LOCK;
  if (!free_bytes || !total) return set_error(cudaErrorInvalidValue);
  size_t used = 0;
  for (auto &kv : g_allocs) used += kv.second.size;
  *total = (size_t)16 << 30;
  *free_bytes = used < *total ? *total - used : 0;
  return cudaSuccess;
}
