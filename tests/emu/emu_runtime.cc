/*
 * emu_runtime.cc: culoss's CPU emulator of the CUDA runtime and cuBLAS, a
 * testing tool for machines without a GPU (tests/emu/README.md).
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
 */
#include "cuda_emu.h"

#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#if !defined(__x86_64__)
#include <ucontext.h>
#endif
#include <unistd.h>

#include <algorithm>
#include <functional>
#include <map>
#include <mutex>
#include <numeric>
#include <random>
#include <set>
#include <string>
#include <vector>

namespace culoss_emu {
thread_local thread_view *current = nullptr;
} // namespace culoss_emu

/* The opaque handle types of the runtime and cuBLAS. */
struct CUstream_st {
  unsigned flags = 0;
  bool capturing = false;
  bool invalidated = false;
  std::vector<std::function<void()>> ops;
};
struct CUgraph_st {
  std::vector<std::function<void()>> ops;
};
struct CUgraphExec_st {
  std::vector<std::function<void()>> ops;
};
struct CUevent_st {
  double ms = 0.0; /* host time when the stream reached the record */
  bool recorded = false;
};
struct cublasContext {
  cudaStream_t stream = nullptr;
  cublasPointerMode_t pointer_mode = CUBLAS_POINTER_MODE_HOST;
};

namespace {

using culoss_emu::thread_view;

std::recursive_mutex g_mutex; /* one API call / kernel at a time */
cudaError_t g_sticky = cudaSuccess;
thread_local cudaError_t t_last = cudaSuccess;
thread_local int t_device = 0;
int g_global_captures = 0; /* streams in a global-mode capture */
std::set<CUstream_st *> g_streams;
CUstream_st g_default_stream;
const char *g_kernel = nullptr; /* the running kernel's signature */

void report(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
void report(const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  fprintf(stderr, "culoss CUDA emulator: ");
  vfprintf(stderr, fmt, ap);
  fprintf(stderr, "\n");
  va_end(ap);
}

cudaError_t set_error(cudaError_t e) {
  if (e != cudaSuccess) t_last = e;
  return e;
}

/* A device fault: every later call fails with it. */
void fault(cudaError_t e) {
  if (g_sticky == cudaSuccess) g_sticky = e;
  t_last = e;
}

/* ------------------------------------------------------------------ */
/* device memory                                                        */
/* ------------------------------------------------------------------ */

constexpr size_t PAGE = 4096;
constexpr unsigned char POISON = 0xff, CANARY = 0xa5;

struct allocation {
  unsigned char *map;
  size_t map_len;
  unsigned char *ptr;
  size_t size, slack; /* bytes between the end and the guard page */
};
std::map<uintptr_t, allocation> g_allocs; /* by ptr */

const allocation *find_alloc(const void *p) {
  auto it = g_allocs.upper_bound((uintptr_t)p);
  if (it == g_allocs.begin()) return nullptr;
  --it;
  const allocation &a = it->second;
  if ((uintptr_t)p >= (uintptr_t)a.ptr + a.size + a.slack) return nullptr;
  return &a;
}

/* [p, p + bytes) inside one live allocation. */
bool in_device(const void *p, size_t bytes) {
  const allocation *a = find_alloc(p);
  return a && (uintptr_t)p + bytes <= (uintptr_t)a->ptr + a->size;
}

bool canary_ok(const allocation &a) {
  for (size_t i = 0; i < a.slack; i++)
    if (a.ptr[a.size + i] != CANARY) return false;
  return true;
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

bool capture_forbids(const char *what) {
  if (g_global_captures == 0) return false;
  report("%s during a global-mode stream capture: not allowed; the capture is invalidated", what);
  for (CUstream_st *s : g_streams)
    if (s->capturing) s->invalidated = true;
  return true;
}

/* ------------------------------------------------------------------ */
/* streams                                                              */
/* ------------------------------------------------------------------ */

CUstream_st *stream_of(cudaStream_t s) {
  if (s == nullptr || s == cudaStreamLegacy || s == cudaStreamPerThread) return &g_default_stream;
  return g_streams.count(s) ? s : nullptr;
}

/* Runs op now, or records it while the stream is captured. */
cudaError_t submit(cudaStream_t s, std::function<void()> op) {
  CUstream_st *st = stream_of(s);
  if (!st) return cudaErrorInvalidResourceHandle;
  if (g_sticky != cudaSuccess) return g_sticky;
  if (st == &g_default_stream && g_global_captures > 0) {
    capture_forbids("work on the legacy default stream");
    return cudaErrorStreamCaptureImplicit;
  }
  if (st->capturing) {
    st->ops.push_back(std::move(op));
    return cudaSuccess;
  }
  op();
  return cudaSuccess;
}

/* ------------------------------------------------------------------ */
/* kernels: fibers and barriers                                         */
/* ------------------------------------------------------------------ */

/* Execution contexts. On x86-64 a six-register switch (no system call:
   glibc's swapcontext saves the signal mask with one per switch, which was
   most of the emulator's time); elsewhere ucontext. */
#if defined(__x86_64__)
extern "C" void culoss_emu_switch(void **save_sp, void *next_sp);
asm(".text\n"
    ".globl culoss_emu_switch\n"
    ".type culoss_emu_switch,@function\n"
    "culoss_emu_switch:\n"
    "  pushq %rbp\n  pushq %rbx\n  pushq %r12\n  pushq %r13\n  pushq %r14\n  pushq %r15\n"
    "  movq %rsp, (%rdi)\n"
    "  movq %rsi, %rsp\n"
    "  popq %r15\n  popq %r14\n  popq %r13\n  popq %r12\n  popq %rbx\n  popq %rbp\n"
    "  ret\n"
    ".size culoss_emu_switch, .-culoss_emu_switch\n");
struct exec_ctx {
  void *sp;
  const void *bottom; /* the stack, for AddressSanitizer's fiber annotations */
  size_t size;
};
/* A fresh context whose first switch enters fn (which must never return). */
void ctx_init(exec_ctx &c, unsigned char *stack, size_t bytes, void (*fn)()) {
  uintptr_t top = ((uintptr_t)stack + bytes) & ~(uintptr_t)15;
  void **sp = reinterpret_cast<void **>(top);
  *--sp = nullptr;                        /* fn's (unused) return address slot */
  *--sp = reinterpret_cast<void *>(fn);   /* popped by ret */
  for (int i = 0; i < 6; i++) *--sp = nullptr; /* rbp rbx r12 r13 r14 r15 */
  c.sp = sp;
  c.bottom = stack;
  c.size = bytes;
}
inline void raw_switch(exec_ctx &from, exec_ctx &to) { culoss_emu_switch(&from.sp, to.sp); }
#else
struct exec_ctx {
  ucontext_t uc;
  const void *bottom;
  size_t size;
};
void ctx_init(exec_ctx &c, unsigned char *stack, size_t bytes, void (*fn)()) {
  getcontext(&c.uc);
  c.uc.uc_stack.ss_sp = stack;
  c.uc.uc_stack.ss_size = bytes;
  c.uc.uc_link = nullptr;
  makecontext(&c.uc, fn, 0);
  c.bottom = stack;
  c.size = bytes;
}
inline void raw_switch(exec_ctx &from, exec_ctx &to) { swapcontext(&from.uc, &to.uc); }
#endif

/* Under AddressSanitizer (an emulator build with -fsanitize=address: kernels
   then get ASan's checks on shared memory, stacks and device allocations)
   every switch is announced, and a stack is unpoisoned before reuse. */
#if defined(__SANITIZE_ADDRESS__)
#define EMU_ASAN 1
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif

exec_ctx *g_sched_ctx = nullptr; /* the scheduler's context (its stack learnt on switch) */

/* Switches from `from` to `to`; `last`: `from` never runs again. */
inline void ctx_switch(exec_ctx &from, exec_ctx &to, bool last = false) {
#ifdef EMU_ASAN
  void *fake = nullptr;
  __sanitizer_start_switch_fiber(last ? nullptr : &fake, to.bottom, to.size);
  raw_switch(from, to);
  const void *b;
  size_t sz;
  __sanitizer_finish_switch_fiber(fake, &b, &sz);
  if (&from != g_sched_ctx && g_sched_ctx) { /* resumed from the scheduler */
    g_sched_ctx->bottom = b;
    g_sched_ctx->size = sz;
  }
#else
  (void)last;
  raw_switch(from, to);
#endif
}

/* The first thing a new fiber runs. */
inline void fiber_started() {
#ifdef EMU_ASAN
  const void *b;
  size_t sz;
  __sanitizer_finish_switch_fiber(nullptr, &b, &sz);
  g_sched_ctx->bottom = b;
  g_sched_ctx->size = sz;
#endif
}

enum fiber_state { RUNNABLE, AT_BLOCK_BARRIER, AT_WARP_OP, DONE, FAILED };
enum warp_kind { WARP_SYNC = 1, WARP_SHFL = 2 };

struct fiber {
  exec_ctx ctx;
  thread_view view;
  fiber_state state;
  int tid;
};

struct warp {
  unsigned arrived, mask, gen;
  int kind;
  uint64_t buf[2][32];
};

struct block_run {
  std::vector<fiber> fibers;
  std::vector<warp> warps;
  int nthreads = 0, at_barrier = 0, done = 0;
  exec_ctx sched;
  fiber *running = nullptr;
  const std::function<void()> *body = nullptr;
  bool failed = false;
};
block_run *g_run = nullptr;

constexpr size_t STACK_BYTES = (size_t)256 << 10;
std::vector<unsigned char *> g_stacks; /* each with a guard page below */

unsigned char *stack_for(int i) {
  while ((int)g_stacks.size() <= i) {
    void *m = mmap(nullptr, STACK_BYTES + PAGE, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (m == MAP_FAILED) {
      report("out of memory for fiber stacks");
      abort();
    }
    mprotect(m, PAGE, PROT_NONE);
    g_stacks.push_back(static_cast<unsigned char *>(m) + PAGE);
  }
  return g_stacks[(size_t)i];
}

void yield_to_scheduler() {
  fiber *f = g_run->running;
  ctx_switch(f->ctx, g_run->sched);
}

[[noreturn]] void kernel_fail(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
void kernel_fail(const char *fmt, ...) {
  fiber *f = g_run->running;
  char msg[512];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(msg, sizeof msg, fmt, ap);
  va_end(ap);
  report("%s, block (%u,%u,%u) thread %d: %s", g_kernel, f->view.block_idx.x, f->view.block_idx.y,
         f->view.block_idx.z, f->tid, msg);
  g_run->failed = true;
  f->state = FAILED;
  ctx_switch(f->ctx, g_run->sched, true);
  abort(); /* never resumed */
}

[[noreturn]] void fiber_entry() {
  fiber_started();
  fiber *f = g_run->running;
  (*g_run->body)();
  f->state = DONE;
  g_run->done++;
  ctx_switch(f->ctx, g_run->sched, true); /* never resumed */
  abort();
}

enum schedule { SCHED_FORWARD, SCHED_REVERSE, SCHED_RANDOM };
struct schedule_cfg {
  schedule kind = SCHED_FORWARD;
  std::mt19937_64 rng;
};
schedule_cfg &sched_cfg() {
  static schedule_cfg cfg;
  static bool init = false;
  if (!init) {
    init = true;
    const char *e = getenv("CULOSS_EMU_SCHEDULE");
    if (e && !strcmp(e, "reverse")) {
      cfg.kind = SCHED_REVERSE;
    } else if (e && !strncmp(e, "random", 6)) {
      cfg.kind = SCHED_RANDOM;
      cfg.rng.seed(e[6] == ':' ? strtoull(e + 7, nullptr, 10) : 12345u);
    } else if (e && *e && strcmp(e, "forward")) {
      report("CULOSS_EMU_SCHEDULE=%s: expected forward, reverse or random[:seed]", e);
      abort();
    }
  }
  return cfg;
}

/* 0..count-1 in the schedule's order (threads of a block, blocks of a grid). */
template <typename I> void order(std::vector<I> &idx, size_t count) {
  idx.resize(count);
  std::iota(idx.begin(), idx.end(), 0);
  schedule_cfg &c = sched_cfg();
  if (c.kind == SCHED_REVERSE)
    std::reverse(idx.begin(), idx.end());
  else if (c.kind == SCHED_RANDOM)
    std::shuffle(idx.begin(), idx.end(), c.rng);
}

const char *state_name(fiber_state s) {
  switch (s) {
  case RUNNABLE: return "runnable";
  case AT_BLOCK_BARRIER: return "at __syncthreads";
  case AT_WARP_OP: return "at a warp operation";
  case DONE: return "exited";
  default: return "failed";
  }
}

/* Runs f until it waits at a barrier, exits or fails (out of line: the
   caller's locals stay clear of a context switch). */
__attribute__((noinline)) void switch_into(block_run &r, fiber &f) {
  r.running = &f;
  culoss_emu::current = &f.view;
  ctx_switch(r.sched, f.ctx);
  culoss_emu::current = nullptr;
  r.running = nullptr;
}

void init_fiber(fiber &f, int i) {
  f.state = RUNNABLE;
#ifdef EMU_ASAN
  __asan_unpoison_memory_region(stack_for(i), STACK_BYTES); /* a previous fiber's frames */
#endif
  ctx_init(f.ctx, stack_for(i), STACK_BYTES, fiber_entry);
}

/* Runs one block to completion; false on a kernel error (reported). */
bool run_block(block_run &r) {
  r.at_barrier = r.done = 0;
  r.failed = false;
  for (warp &w : r.warps) {
    w.arrived = w.mask = w.gen = 0;
    w.kind = 0;
  }
  for (int i = 0; i < r.nthreads; i++) init_fiber(r.fibers[(size_t)i], i);
  std::vector<int> idx;
  while (r.done < r.nthreads) {
    bool progressed = false;
    order(idx, (size_t)r.nthreads);
    for (int i : idx) {
      fiber &f = r.fibers[(size_t)i];
      if (f.state != RUNNABLE) continue;
      switch_into(r, f);
      progressed = true;
      if (r.failed) return false;
    }
    if (!progressed) {
      int count[5] = {0, 0, 0, 0, 0};
      for (fiber &f : r.fibers) count[f.state]++;
      const fiber &f0 = r.fibers[0];
      report("%s, block (%u,%u,%u): deadlock (barrier divergence): %d threads %s, %d %s, %d %s",
             g_kernel, f0.view.block_idx.x, f0.view.block_idx.y, f0.view.block_idx.z,
             count[AT_BLOCK_BARRIER], state_name(AT_BLOCK_BARRIER), count[AT_WARP_OP],
             state_name(AT_WARP_OP), count[DONE], state_name(DONE));
      for (size_t w = 0; w < r.warps.size(); w++)
        if (r.warps[w].arrived)
          report("  warp %zu: lanes %#x of mask %#x arrived", w, r.warps[w].arrived,
                 r.warps[w].mask);
      return false;
    }
  }
  return true;
}

struct func_attrs {
  int max_dynamic_smem = 48 << 10;
};
std::map<const void *, func_attrs> g_funcs;

constexpr int SM_COUNT = 4;
constexpr int SMEM_OPTIN = 232448; /* an H100's per-block opt-in limit */
constexpr int SMEM_DEFAULT = 48 << 10;

void run_kernel(const char *sig, dim3 grid, dim3 block, size_t smem,
                const std::function<void()> &body) {
  std::lock_guard<std::recursive_mutex> lock(g_mutex);
  if (g_sticky != cudaSuccess) return;
  g_kernel = sig;
  block_run r;
  r.nthreads = (int)(block.x * block.y * block.z);
  r.fibers.resize((size_t)r.nthreads);
  r.warps.resize((size_t)(r.nthreads + 31) / 32);
  r.body = &body;
  std::vector<unsigned char> dyn(smem + 16);
  unsigned char *dyn16 = dyn.data() + ((16 - ((uintptr_t)dyn.data() & 15)) & 15);
  const uint64_t nblocks = (uint64_t)grid.x * grid.y * grid.z;
  std::vector<uint64_t> blocks; /* in the schedule's order, like the threads */
  order(blocks, (size_t)nblocks);
  block_run *prev = g_run;
  exec_ctx *prev_sched = g_sched_ctx;
  g_run = &r;
  r.sched.bottom = nullptr; /* the calling thread's stack: learnt at the first switch back */
  r.sched.size = 0;
  g_sched_ctx = &r.sched;
  bool ok = true;
  for (uint64_t b : blocks) {
    const uint3 bid = {(unsigned)(b % grid.x), (unsigned)((b / grid.x) % grid.y),
                       (unsigned)(b / ((uint64_t)grid.x * grid.y))};
    memset(dyn16, POISON, smem);
    for (int t = 0; t < r.nthreads; t++) {
      fiber &f = r.fibers[(size_t)t];
      f.tid = t;
      f.view.thread_idx = {(unsigned)t % block.x, ((unsigned)t / block.x) % block.y,
                           (unsigned)t / (block.x * block.y)};
      f.view.block_idx = bid;
      f.view.block_dim = block;
      f.view.grid_dim = grid;
      f.view.smem = dyn16;
    }
    if (!run_block(r)) {
      ok = false;
      break;
    }
  }
  g_run = prev;
  g_sched_ctx = prev_sched;
  if (!ok) {
    fault(cudaErrorLaunchFailure);
  } else {
    check_canaries(sig);
  }
  g_kernel = nullptr;
}

/* ------------------------------------------------------------------ */
/* cuBLAS GEMM                                                          */
/* ------------------------------------------------------------------ */

float load_elem(const void *p, cudaDataType_t t, size_t i) {
  switch (t) {
  case CUDA_R_16F: return __half2float(static_cast<const __half *>(p)[i]);
  case CUDA_R_16BF: return __bfloat162float(static_cast<const __nv_bfloat16 *>(p)[i]);
  default: return static_cast<const float *>(p)[i];
  }
}
void store_elem(void *p, cudaDataType_t t, size_t i, float v) {
  switch (t) {
  case CUDA_R_16F: static_cast<__half *>(p)[i] = __float2half_rn(v); break;
  case CUDA_R_16BF: static_cast<__nv_bfloat16 *>(p)[i] = __float2bfloat16_rn(v); break;
  default: static_cast<float *>(p)[i] = v; break;
  }
}
size_t type_size(cudaDataType_t t) { return t == CUDA_R_32F ? 4 : 2; }

/* Extent in bytes of a column-major rows x cols matrix with leading dim ld. */
size_t extent(int64_t rows, int64_t cols, int64_t ld, size_t es) {
  if (rows == 0 || cols == 0) return 0;
  return ((size_t)(cols - 1) * (size_t)ld + (size_t)rows) * es;
}

cublasStatus_t gemm(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m, int n,
                    int k, const void *alpha, const void *A, cudaDataType_t at, int lda,
                    const void *B, cudaDataType_t bt, int ldb, const void *beta, void *C,
                    cudaDataType_t ct, int ldc) {
  if (!h) return CUBLAS_STATUS_NOT_INITIALIZED;
  const bool tA = ta != CUBLAS_OP_N, tB = tb != CUBLAS_OP_N;
  const int a_rows = tA ? k : m, a_cols = tA ? m : k;
  const int b_rows = tB ? n : k, b_cols = tB ? k : n;
  if (m < 0 || n < 0 || k < 0 || lda < std::max(1, a_rows) || ldb < std::max(1, b_rows) ||
      ldc < std::max(1, m)) {
    report("cublasGemmEx: invalid sizes m=%d n=%d k=%d lda=%d ldb=%d ldc=%d", m, n, k, lda, ldb,
           ldc);
    return CUBLAS_STATUS_INVALID_VALUE;
  }
  if (m == 0 || n == 0) return CUBLAS_STATUS_SUCCESS;
  if (!in_device(A, extent(a_rows, a_cols, lda, type_size(at))) ||
      !in_device(B, extent(b_rows, b_cols, ldb, type_size(bt))) ||
      !in_device(C, extent(m, n, ldc, type_size(ct)))) {
    report("cublasGemmEx: an operand is not inside a device allocation (m=%d n=%d k=%d)", m, n,
           k);
    fault(cudaErrorIllegalAddress);
    return CUBLAS_STATUS_EXECUTION_FAILED;
  }
  float al, be;
  if (h->pointer_mode == CUBLAS_POINTER_MODE_HOST) {
    al = *static_cast<const float *>(alpha);
    be = *static_cast<const float *>(beta);
  } else {
    al = be = 0.0f; /* read at execution below */
  }
  const cublasPointerMode_t pm = h->pointer_mode;
  cudaError_t e = submit(h->stream, [=]() {
    const float a_ = pm == CUBLAS_POINTER_MODE_HOST ? al : *static_cast<const float *>(alpha);
    const float b_ = pm == CUBLAS_POINTER_MODE_HOST ? be : *static_cast<const float *>(beta);
    /* op(A) as rows and op(B) as columns, both contiguous in l */
    std::vector<float> ar((size_t)m * k), bc((size_t)n * k);
    for (int i = 0; i < m; i++)
      for (int l = 0; l < k; l++)
        ar[(size_t)i * k + l] = load_elem(A, at, tA ? (size_t)i * lda + l : (size_t)l * lda + i);
    for (int j = 0; j < n; j++)
      for (int l = 0; l < k; l++)
        bc[(size_t)j * k + l] = load_elem(B, bt, tB ? (size_t)l * ldb + j : (size_t)j * ldb + l);
    for (int j = 0; j < n; j++)
      for (int i = 0; i < m; i++) {
        const float *a = &ar[(size_t)i * k], *b = &bc[(size_t)j * k];
        /* double, rounded once: cuBLAS's blocked and split-k fp32 sums are
           far closer to that than a naive fp32 loop over a long k */
        double acc_d = 0.0;
        for (int l = 0; l < k; l++) acc_d += (double)a[l] * (double)b[l];
        const float acc = (float)acc_d;
        const size_t ci = (size_t)j * ldc + i;
        /* beta == 0: C is not read (it may hold NaN), as in cuBLAS */
        const float r = b_ == 0.0f ? a_ * acc : a_ * acc + b_ * load_elem(C, ct, ci);
        store_elem(C, ct, ci, r);
      }
    check_canaries("cublasGemmEx");
  });
  if (e != cudaSuccess) return CUBLAS_STATUS_EXECUTION_FAILED;
  return CUBLAS_STATUS_SUCCESS;
}

} // namespace

/* ==================================================================== */
/* device side (cuda_emu.h)                                              */
/* ==================================================================== */

namespace culoss_emu {

int lane_id() { return g_run->running->tid % 32; }

void syncthreads() {
  block_run &r = *g_run;
  fiber *f = r.running;
  f->state = AT_BLOCK_BARRIER;
  if (++r.at_barrier == r.nthreads) {
    r.at_barrier = 0;
    for (fiber &o : r.fibers)
      if (o.state == AT_BLOCK_BARRIER) o.state = RUNNABLE;
  }
  yield_to_scheduler();
}

static uint64_t warp_op(unsigned mask, int kind, uint64_t bits, int src) {
  block_run &r = *g_run;
  fiber *f = r.running;
  const int wi = f->tid / 32, lane = f->tid % 32;
  warp &w = r.warps[(size_t)wi];
  if (!((mask >> lane) & 1u))
    kernel_fail("warp operation with mask %#x called by lane %d, which the mask excludes", mask,
                lane);
  if (kind == WARP_SHFL && (src < 0 || src > 31 || !((mask >> src) & 1u)))
    kernel_fail("shuffle reads lane %d, outside the mask %#x", src, mask);
  if (w.arrived == 0) {
    w.mask = mask;
    w.kind = kind;
  } else if (w.mask != mask || w.kind != kind) {
    kernel_fail("lanes of warp %d reached different warp operations (%s, mask %#x; then %s, "
                "mask %#x)",
                wi, w.kind == WARP_SHFL ? "shuffle" : "__syncwarp", w.mask,
                kind == WARP_SHFL ? "shuffle" : "__syncwarp", mask);
  }
  const unsigned gen = w.gen;
  w.buf[gen & 1u][lane] = bits;
  w.arrived |= 1u << lane;
  f->state = AT_WARP_OP;
  if (w.arrived == w.mask) {
    w.arrived = 0;
    w.gen++;
    for (int l = 0; l < 32; l++)
      if ((w.mask >> l) & 1u) {
        const size_t t = (size_t)wi * 32 + (size_t)l;
        if (t < r.fibers.size() && r.fibers[t].state == AT_WARP_OP) r.fibers[t].state = RUNNABLE;
      }
  }
  yield_to_scheduler();
  /* double buffer: no lane can deposit for gen + 2 before all have read gen */
  return w.buf[gen & 1u][kind == WARP_SHFL ? src : lane];
}

void syncwarp(unsigned mask) { (void)warp_op(mask, WARP_SYNC, 0, 0); }

uint64_t shfl_exchange(unsigned mask, uint64_t bits, int src_lane) {
  return warp_op(mask, WARP_SHFL, bits, src_lane);
}

cudaError_t submit_kernel(const void *fn, const char *signature, dim3 grid, dim3 block,
                          size_t smem, cudaStream_t stream, std::function<void()> body) {
  std::lock_guard<std::recursive_mutex> lock(g_mutex);
  if (g_sticky != cudaSuccess) return set_error(g_sticky);
  /* "kernel(<parameter types>)" from the launch template's signature */
  std::string sig(signature);
  const size_t a = sig.find("Params = {");
  if (a != std::string::npos) {
    const size_t b = sig.find('}', a);
    sig = "kernel(" + sig.substr(a + 10, b == std::string::npos ? std::string::npos : b - a - 10) +
          ")";
  }
  const uint64_t threads = (uint64_t)block.x * block.y * block.z;
  if (threads == 0 || threads > 1024 || block.x > 1024 || block.y > 1024 || block.z > 64 ||
      grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.x > 2147483647u || grid.y > 65535 ||
      grid.z > 65535) {
    report("invalid launch configuration: grid (%u,%u,%u) block (%u,%u,%u) for %s", grid.x,
           grid.y, grid.z, block.x, block.y, block.z, sig.c_str());
    return set_error(cudaErrorInvalidConfiguration);
  }
  const int limit = g_funcs.count(fn) ? g_funcs[fn].max_dynamic_smem : SMEM_DEFAULT;
  if (smem > (size_t)limit) {
    report("%zu bytes of dynamic shared memory, above the kernel's limit %d (set with "
           "cudaFuncSetAttribute) for %s",
           smem, limit, sig.c_str());
    return set_error(cudaErrorInvalidValue);
  }
  cudaError_t e = submit(stream, [sig, grid, block, smem, body]() {
    run_kernel(sig.c_str(), grid, block, smem, body);
  });
  return set_error(e);
}

} // namespace culoss_emu

/* ==================================================================== */
/* the CUDA runtime API                                                  */
/* ==================================================================== */

#define LOCK std::lock_guard<std::recursive_mutex> lock_(g_mutex)
#define STICKY                                               \
  do {                                                       \
    if (g_sticky != cudaSuccess) return set_error(g_sticky); \
  } while (0)

cudaError_t cudaGetDeviceCount(int *count) {
  if (!count) return set_error(cudaErrorInvalidValue);
  /* CULOSS_EMU_DEVICE_COUNT_ERROR=<cudaError_t>: a machine whose CUDA is
     broken (or absent), for the tests of culoss_create's error mapping */
  if (const char *e = getenv("CULOSS_EMU_DEVICE_COUNT_ERROR")) {
    *count = 0;
    return set_error((cudaError_t)atoi(e));
  }
  *count = 1;
  return cudaSuccess;
}

cudaError_t cudaGetDevice(int *device) {
  if (!device) return set_error(cudaErrorInvalidValue);
  *device = t_device;
  return cudaSuccess;
}

cudaError_t cudaSetDevice(int device) {
  if (device != 0) return set_error(cudaErrorInvalidDevice);
  t_device = device;
  return cudaSuccess;
}

cudaError_t cudaDeviceGetAttribute(int *value, enum cudaDeviceAttr attr, int device) {
  if (!value) return set_error(cudaErrorInvalidValue);
  if (device != 0) return set_error(cudaErrorInvalidDevice);
  switch (attr) {
  case cudaDevAttrMultiProcessorCount: *value = SM_COUNT; break;
  case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = SMEM_OPTIN; break;
  case cudaDevAttrMaxSharedMemoryPerBlock: *value = SMEM_DEFAULT; break;
  case cudaDevAttrMaxThreadsPerBlock: *value = 1024; break;
  case cudaDevAttrWarpSize: *value = 32; break;
  case cudaDevAttrComputeCapabilityMajor: *value = 9; break;
  case cudaDevAttrComputeCapabilityMinor: *value = 0; break;
  default: return set_error(cudaErrorInvalidValue);
  }
  return cudaSuccess;
}

cudaError_t cudaGetDeviceProperties(struct cudaDeviceProp *prop, int device) {
  if (!prop) return set_error(cudaErrorInvalidValue);
  if (device != 0) return set_error(cudaErrorInvalidDevice);
  memset(prop, 0, sizeof *prop);
  snprintf(prop->name, sizeof prop->name, "culoss CUDA emulator (CPU, not a GPU)");
  prop->major = 9;
  prop->minor = 0;
  prop->multiProcessorCount = SM_COUNT;
  prop->sharedMemPerBlock = SMEM_DEFAULT;
  prop->sharedMemPerBlockOptin = SMEM_OPTIN;
  prop->maxThreadsPerBlock = 1024;
  prop->warpSize = 32;
  prop->totalGlobalMem = (size_t)16 << 30;
  prop->l2CacheSize = 1 << 20;
  return cudaSuccess;
}

cudaError_t cudaGetLastError(void) {
  const cudaError_t e = g_sticky != cudaSuccess ? g_sticky : t_last;
  t_last = cudaSuccess;
  return e;
}

cudaError_t cudaPeekAtLastError(void) { return g_sticky != cudaSuccess ? g_sticky : t_last; }

const char *cudaGetErrorName(cudaError_t e) {
  switch (e) {
  case cudaSuccess: return "cudaSuccess";
  case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
  case cudaErrorMemoryAllocation: return "cudaErrorMemoryAllocation";
  case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
  case cudaErrorInvalidDevice: return "cudaErrorInvalidDevice";
  case cudaErrorInvalidResourceHandle: return "cudaErrorInvalidResourceHandle";
  case cudaErrorIllegalAddress: return "cudaErrorIllegalAddress";
  case cudaErrorLaunchFailure: return "cudaErrorLaunchFailure";
  case cudaErrorStreamCaptureUnsupported: return "cudaErrorStreamCaptureUnsupported";
  case cudaErrorStreamCaptureInvalidated: return "cudaErrorStreamCaptureInvalidated";
  case cudaErrorStreamCaptureImplicit: return "cudaErrorStreamCaptureImplicit";
  case cudaErrorIllegalState: return "cudaErrorIllegalState";
  case cudaErrorNoDevice: return "cudaErrorNoDevice";
  default: return "cudaErrorUnknown";
  }
}

const char *cudaGetErrorString(cudaError_t e) {
  switch (e) {
  case cudaSuccess: return "no error";
  case cudaErrorInvalidValue: return "invalid argument";
  case cudaErrorMemoryAllocation: return "out of memory";
  case cudaErrorInvalidConfiguration: return "invalid configuration argument";
  case cudaErrorIllegalAddress: return "an illegal memory access was encountered (emulator)";
  case cudaErrorLaunchFailure: return "unspecified launch failure (emulator: see stderr)";
  case cudaErrorStreamCaptureUnsupported:
    return "operation not permitted when stream is capturing";
  case cudaErrorStreamCaptureInvalidated:
    return "operation failed due to a previous error during capture";
  default: return "emulated CUDA error";
  }
}

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

static bool copy_ok(void *dst, const void *src, size_t n, cudaMemcpyKind kind) {
  const bool d_dev = kind == cudaMemcpyHostToDevice || kind == cudaMemcpyDeviceToDevice;
  const bool s_dev = kind == cudaMemcpyDeviceToHost || kind == cudaMemcpyDeviceToDevice;
  if (kind == cudaMemcpyDefault || kind == cudaMemcpyHostToHost) return true;
  if ((d_dev && !in_device(dst, n)) || (s_dev && !in_device(src, n))) {
    report("cudaMemcpy of %zu bytes: the %s range is not inside a device allocation", n,
           (d_dev && !in_device(dst, n)) ? "destination" : "source");
    return false;
  }
  return true;
}

cudaError_t cudaMemcpyAsync(void *dst, const void *src, size_t n, enum cudaMemcpyKind kind,
                            cudaStream_t s) {
  LOCK;
  STICKY;
  if (n == 0) return cudaSuccess;
  if (!copy_ok(dst, src, n, kind)) return set_error(cudaErrorInvalidValue);
  return set_error(submit(s, [=]() { memmove(dst, src, n); }));
}

cudaError_t cudaMemcpy(void *dst, const void *src, size_t n, enum cudaMemcpyKind kind) {
  LOCK;
  STICKY;
  if (capture_forbids("cudaMemcpy (synchronous)"))
    return set_error(cudaErrorStreamCaptureUnsupported);
  if (n == 0) return cudaSuccess;
  if (!copy_ok(dst, src, n, kind)) return set_error(cudaErrorInvalidValue);
  memmove(dst, src, n);
  return cudaSuccess;
}

cudaError_t cudaMemsetAsync(void *dst, int value, size_t n, cudaStream_t s) {
  LOCK;
  STICKY;
  if (n == 0) return cudaSuccess;
  if (!in_device(dst, n)) {
    report("cudaMemset of %zu bytes at %p: not inside a device allocation", n, dst);
    return set_error(cudaErrorInvalidValue);
  }
  return set_error(submit(s, [=]() { memset(dst, value, n); }));
}

cudaError_t cudaMemset(void *dst, int value, size_t n) {
  LOCK;
  if (capture_forbids("cudaMemset (synchronous)"))
    return set_error(cudaErrorStreamCaptureUnsupported);
  return cudaMemsetAsync(dst, value, n, nullptr);
}

cudaError_t cudaStreamCreateWithFlags(cudaStream_t *s, unsigned int flags) {
  LOCK;
  if (!s) return set_error(cudaErrorInvalidValue);
  CUstream_st *st = new CUstream_st;
  st->flags = flags;
  g_streams.insert(st);
  *s = st;
  return cudaSuccess;
}

cudaError_t cudaStreamCreate(cudaStream_t *s) { return cudaStreamCreateWithFlags(s, 0); }

cudaError_t cudaStreamDestroy(cudaStream_t s) {
  LOCK;
  if (!g_streams.count(s)) return set_error(cudaErrorInvalidResourceHandle);
  if (s->capturing) g_global_captures--;
  g_streams.erase(s);
  delete s;
  return cudaSuccess;
}

cudaError_t cudaStreamSynchronize(cudaStream_t s) {
  LOCK;
  CUstream_st *st = stream_of(s);
  if (!st) return set_error(cudaErrorInvalidResourceHandle);
  if (capture_forbids("cudaStreamSynchronize"))
    return set_error(cudaErrorStreamCaptureUnsupported);
  STICKY;
  return cudaSuccess;
}

cudaError_t cudaDeviceSynchronize(void) {
  LOCK;
  if (capture_forbids("cudaDeviceSynchronize"))
    return set_error(cudaErrorStreamCaptureUnsupported);
  STICKY;
  return cudaSuccess;
}

cudaError_t cudaStreamBeginCapture(cudaStream_t s, enum cudaStreamCaptureMode mode) {
  LOCK;
  (void)mode; /* every mode is treated as global: the strictest */
  CUstream_st *st = stream_of(s);
  if (!st) return set_error(cudaErrorInvalidResourceHandle);
  if (st == &g_default_stream) return set_error(cudaErrorStreamCaptureUnsupported);
  if (st->capturing) return set_error(cudaErrorIllegalState);
  st->capturing = true;
  st->invalidated = false;
  st->ops.clear();
  g_global_captures++;
  return cudaSuccess;
}

cudaError_t cudaStreamEndCapture(cudaStream_t s, cudaGraph_t *graph) {
  LOCK;
  CUstream_st *st = stream_of(s);
  if (!st || !graph) return set_error(cudaErrorInvalidValue);
  if (!st->capturing) return set_error(cudaErrorIllegalState);
  st->capturing = false;
  g_global_captures--;
  if (st->invalidated) {
    *graph = nullptr;
    st->ops.clear();
    return set_error(cudaErrorStreamCaptureInvalidated);
  }
  CUgraph_st *g = new CUgraph_st;
  g->ops.swap(st->ops);
  *graph = g;
  return cudaSuccess;
}

cudaError_t cudaGraphInstantiate(cudaGraphExec_t *exec, cudaGraph_t graph,
                                 unsigned long long flags) {
  LOCK;
  (void)flags;
  if (!exec || !graph) return set_error(cudaErrorInvalidValue);
  CUgraphExec_st *x = new CUgraphExec_st;
  x->ops = graph->ops;
  *exec = x;
  return cudaSuccess;
}

cudaError_t cudaGraphLaunch(cudaGraphExec_t exec, cudaStream_t s) {
  LOCK;
  STICKY;
  if (!exec) return set_error(cudaErrorInvalidValue);
  const std::vector<std::function<void()>> *ops = &exec->ops;
  return set_error(submit(s, [ops]() {
    for (const auto &op : *ops) op();
  }));
}

cudaError_t cudaGraphDestroy(cudaGraph_t graph) {
  delete graph;
  return cudaSuccess;
}

cudaError_t cudaGraphExecDestroy(cudaGraphExec_t exec) {
  delete exec;
  return cudaSuccess;
}

cudaError_t cudaFuncGetAttributes(struct cudaFuncAttributes *attr, const void *func) {
  LOCK;
  if (!attr || !func) return set_error(cudaErrorInvalidValue);
  memset(attr, 0, sizeof *attr);
  attr->maxThreadsPerBlock = 1024;
  attr->sharedSizeBytes = 0; /* static shared memory is not measured here */
  attr->maxDynamicSharedSizeBytes = g_funcs.count(func) ? g_funcs[func].max_dynamic_smem
                                                        : SMEM_DEFAULT;
  attr->ptxVersion = 90;
  attr->binaryVersion = 90;
  return cudaSuccess;
}

cudaError_t cudaFuncSetAttribute(const void *func, enum cudaFuncAttribute attr, int value) {
  LOCK;
  if (!func) return set_error(cudaErrorInvalidDeviceFunction);
  if (attr == cudaFuncAttributeMaxDynamicSharedMemorySize) {
    if (value < 0 || value > SMEM_OPTIN) return set_error(cudaErrorInvalidValue);
    g_funcs[func].max_dynamic_smem = value;
  }
  return cudaSuccess;
}

/* Events time host wall clock: the emulator's timings say nothing about a
   GPU. */
static double now_ms() {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec * 1e-6;
}

cudaError_t cudaEventCreate(cudaEvent_t *e) {
  if (!e) return set_error(cudaErrorInvalidValue);
  *e = new CUevent_st;
  return cudaSuccess;
}

cudaError_t cudaEventCreateWithFlags(cudaEvent_t *e, unsigned int flags) {
  (void)flags;
  return cudaEventCreate(e);
}

cudaError_t cudaEventDestroy(cudaEvent_t e) {
  delete e;
  return cudaSuccess;
}

cudaError_t cudaEventRecord(cudaEvent_t e, cudaStream_t s) {
  LOCK;
  if (!e) return set_error(cudaErrorInvalidResourceHandle);
  return set_error(submit(s, [e]() {
    e->ms = now_ms();
    e->recorded = true;
  }));
}

cudaError_t cudaEventSynchronize(cudaEvent_t e) {
  LOCK;
  if (!e) return set_error(cudaErrorInvalidResourceHandle);
  if (capture_forbids("cudaEventSynchronize"))
    return set_error(cudaErrorStreamCaptureUnsupported);
  STICKY;
  return cudaSuccess;
}

cudaError_t cudaEventElapsedTime(float *ms, cudaEvent_t a, cudaEvent_t b) {
  if (!ms || !a || !b) return set_error(cudaErrorInvalidValue);
  if (!a->recorded || !b->recorded) return set_error(cudaErrorInvalidResourceHandle);
  *ms = (float)(b->ms - a->ms);
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

/* ==================================================================== */
/* cuBLAS                                                                */
/* ==================================================================== */

cublasStatus_t cublasCreate(cublasHandle_t *h) {
  if (!h) return CUBLAS_STATUS_INVALID_VALUE;
  *h = new cublasContext;
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasDestroy(cublasHandle_t h) {
  if (!h) return CUBLAS_STATUS_NOT_INITIALIZED;
  delete h;
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasSetStream(cublasHandle_t h, cudaStream_t s) {
  if (!h) return CUBLAS_STATUS_NOT_INITIALIZED;
  h->stream = s;
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasGetStream(cublasHandle_t h, cudaStream_t *s) {
  if (!h) return CUBLAS_STATUS_NOT_INITIALIZED;
  *s = h->stream;
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasSetWorkspace(cublasHandle_t h, void *ws, size_t bytes) {
  LOCK;
  if (!h) return CUBLAS_STATUS_NOT_INITIALIZED;
  if (bytes && !in_device(ws, bytes)) return CUBLAS_STATUS_INVALID_VALUE;
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasSetPointerMode(cublasHandle_t h, cublasPointerMode_t mode) {
  if (!h) return CUBLAS_STATUS_NOT_INITIALIZED;
  h->pointer_mode = mode;
  return CUBLAS_STATUS_SUCCESS;
}

const char *cublasGetStatusName(cublasStatus_t s) {
  switch (s) {
  case CUBLAS_STATUS_SUCCESS: return "CUBLAS_STATUS_SUCCESS";
  case CUBLAS_STATUS_NOT_INITIALIZED: return "CUBLAS_STATUS_NOT_INITIALIZED";
  case CUBLAS_STATUS_INVALID_VALUE: return "CUBLAS_STATUS_INVALID_VALUE";
  case CUBLAS_STATUS_EXECUTION_FAILED: return "CUBLAS_STATUS_EXECUTION_FAILED";
  case CUBLAS_STATUS_NOT_SUPPORTED: return "CUBLAS_STATUS_NOT_SUPPORTED";
  default: return "CUBLAS_STATUS_UNKNOWN";
  }
}

const char *cublasGetStatusString(cublasStatus_t s) {
  return s == CUBLAS_STATUS_SUCCESS ? "success" : "emulated cuBLAS error (see stderr)";
}

cublasStatus_t cublasGemmEx(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m,
                            int n, int k, const void *alpha, const void *A, cudaDataType at,
                            int lda, const void *B, cudaDataType bt, int ldb, const void *beta,
                            void *C, cudaDataType ct, int ldc, cublasComputeType_t compute,
                            cublasGemmAlgo_t algo) {
  LOCK;
  (void)algo;
  if (compute != CUBLAS_COMPUTE_32F && compute != CUBLAS_COMPUTE_32F_FAST_TF32)
    return CUBLAS_STATUS_NOT_SUPPORTED;
  for (cudaDataType t : {at, bt, ct})
    if (t != CUDA_R_32F && t != CUDA_R_16F && t != CUDA_R_16BF) return CUBLAS_STATUS_NOT_SUPPORTED;
  return gemm(h, ta, tb, m, n, k, alpha, A, at, lda, B, bt, ldb, beta, C, ct, ldc);
}

cublasStatus_t cublasSgemm(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m,
                           int n, int k, const float *alpha, const float *A, int lda,
                           const float *B, int ldb, const float *beta, float *C, int ldc) {
  LOCK;
  return gemm(h, ta, tb, m, n, k, alpha, A, CUDA_R_32F, lda, B, CUDA_R_32F, ldb, beta, C,
              CUDA_R_32F, ldc);
}

cublasStatus_t cublasSaxpy(cublasHandle_t h, int n, const float *alpha, const float *x, int incx,
                           float *y, int incy) {
  LOCK;
  if (!h) return CUBLAS_STATUS_NOT_INITIALIZED;
  if (n <= 0) return CUBLAS_STATUS_SUCCESS;
  if (incx == 0 || incy == 0) return CUBLAS_STATUS_INVALID_VALUE;
  const float a = h->pointer_mode == CUBLAS_POINTER_MODE_HOST ? *alpha : 0.0f;
  const bool dev_alpha = h->pointer_mode != CUBLAS_POINTER_MODE_HOST;
  const cudaError_t e = submit(h->stream, [=]() {
    const float al = dev_alpha ? *alpha : a;
    for (int i = 0; i < n; i++) {
      const int64_t xi = incx > 0 ? (int64_t)i * incx : (int64_t)(n - 1 - i) * -incx;
      const int64_t yi = incy > 0 ? (int64_t)i * incy : (int64_t)(n - 1 - i) * -incy;
      y[yi] = fmaf(al, x[xi], y[yi]);
    }
  });
  return e == cudaSuccess ? CUBLAS_STATUS_SUCCESS : CUBLAS_STATUS_EXECUTION_FAILED;
}
