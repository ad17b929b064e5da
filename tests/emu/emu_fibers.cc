/*
 * emu_fibers.cc: kernels in culoss's CPU emulator of CUDA (emu_internal.h,
 * tests/emu/README.md): every CUDA thread of a block is a fiber with its own
 * stack; __syncthreads, __syncwarp and shuffles are barriers that switch
 * fibers and report divergence; threads and blocks run in the order
 * CULOSS_EMU_SCHEDULE asks; the launch entry point cuda_emu.h declares
 * validates the configuration, then runs the kernel (or records it while its
 * stream is captured); and cudaFuncGetAttributes and cudaFuncSetAttribute
 * read and set the dynamic shared memory limit it checks.
 */
#include "emu_internal.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#if !defined(__x86_64__)
#include <ucontext.h>
#endif

#include <algorithm>
#include <map>
#include <numeric>
#include <random>
#include <string>
#include <vector>

namespace culoss_emu {
thread_local thread_view *current = nullptr;
} // namespace culoss_emu

/* ------------------------------------------------------------------ */
/* kernels: fibers and barriers                                         */
/* ------------------------------------------------------------------ */

namespace {

using culoss_emu::thread_view;

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
  *--sp = nullptr;                             /* fn's (unused) return address slot */
  *--sp = reinterpret_cast<void *>(fn);        /* popped by ret */
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

enum fiber_state { RUNNABLE, AT_BLOCK_BARRIER, AT_WARP_OP, DONE, FAILED, AT_CLUSTER_BARRIER };
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

struct cluster_run;
struct block_run {
  cluster_run *cluster = nullptr; /* in a cluster launch */
  std::vector<fiber> fibers;
  std::vector<warp> warps;
  int nthreads = 0, at_barrier = 0, done = 0;
  exec_ctx sched;
  fiber *running = nullptr;
  const std::function<void()> *body = nullptr;
  bool failed = false;
};
block_run *g_run = nullptr;

/* The blocks of one cluster, run together: each until all its threads wait
   at the cluster barrier (or exit), then the next, in the schedule's order. */
struct cluster_run {
  std::vector<block_run> blocks;
  std::vector<unsigned char *> smem; /* by rank */
  std::vector<char> exited;          /* by rank: its shared memory is gone */
  size_t smem_bytes = 0;
  int total = 0, at_barrier = 0;
};

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
  case AT_CLUSTER_BARRIER: return "at cluster.sync()";
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
/* A block's fibers and warps fresh for block b (linear index) of the
   grid: rank `rank` of a cluster of K whose dynamic shared memory is
   smem_by_rank (a plain launch: rank 0 of 1), its stacks from stack_base. */
void start_block(block_run &r, uint64_t b, dim3 grid, dim3 block,
                 unsigned char *const *smem_by_rank, size_t smem, unsigned rank, unsigned K,
                 int stack_base) {
  const uint3 bid = {(unsigned)(b % grid.x), (unsigned)((b / grid.x) % grid.y),
                     (unsigned)(b / ((uint64_t)grid.x * grid.y))};
  memset(smem_by_rank[rank], POISON, smem);
  r.at_barrier = r.done = 0;
  r.failed = false;
  for (warp &w : r.warps) {
    w.arrived = w.mask = w.gen = 0;
    w.kind = 0;
  }
  for (int t = 0; t < r.nthreads; t++) {
    fiber &f = r.fibers[(size_t)t];
    init_fiber(f, stack_base + t);
    f.tid = t;
    f.view.thread_idx = {(unsigned)t % block.x, ((unsigned)t / block.x) % block.y,
                         (unsigned)t / (block.x * block.y)};
    f.view.block_idx = bid;
    f.view.block_dim = block;
    f.view.grid_dim = grid;
    f.view.smem = smem_by_rank[rank];
    f.view.smem_size = smem;
    f.view.cluster_rank = rank;
    f.view.cluster_size = K;
    f.view.cluster_smem = smem_by_rank;
  }
}

/* Runs a started block to completion; false on a kernel error (reported). */
bool run_block(block_run &r) {
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

/* Runs one cluster to completion (its fibers initialised); false on a
   kernel error or a deadlock (reported). */
bool run_cluster(cluster_run &c) {
  std::vector<int> idx, bidx;
  const int K = (int)c.blocks.size();
  for (;;) {
    bool progressed = false, all_done = true;
    order(bidx, (size_t)K);
    for (int b : bidx) {
      block_run &r = c.blocks[(size_t)b];
      g_run = &r;
      g_sched_ctx = &r.sched;
      for (bool ran = true; ran;) { /* until every thread of the block waits */
        ran = false;
        order(idx, (size_t)r.nthreads);
        for (int i : idx) {
          fiber &f = r.fibers[(size_t)i];
          if (f.state != RUNNABLE) continue;
          switch_into(r, f);
          ran = progressed = true;
          if (r.failed) return false;
        }
      }
      if (r.done < r.nthreads) {
        all_done = false;
      } else if (!c.exited[(size_t)b]) { /* as on a GPU, an exited block's shared memory is gone */
        c.exited[(size_t)b] = 1;
        memset(c.smem[(size_t)b], POISON, c.smem_bytes);
      }
    }
    if (all_done) return true;
    if (!progressed) {
      report("%s, cluster of %d blocks from block %u: deadlock (barrier divergence)", g_kernel, K,
             c.blocks[0].fibers[0].view.block_idx.x);
      for (int b = 0; b < K; b++) {
        int count[6] = {0, 0, 0, 0, 0, 0};
        for (fiber &f : c.blocks[(size_t)b].fibers) count[f.state]++;
        report("  rank %d: %d threads %s, %d %s, %d %s, %d %s", b, count[AT_CLUSTER_BARRIER],
               state_name(AT_CLUSTER_BARRIER), count[AT_BLOCK_BARRIER],
               state_name(AT_BLOCK_BARRIER), count[AT_WARP_OP], state_name(AT_WARP_OP), count[DONE],
               state_name(DONE));
      }
      return false;
    }
  }
}

struct func_attrs {
  int max_dynamic_smem = 48 << 10;
};
std::map<const void *, func_attrs> g_funcs;

void run_clusters(const char *sig, dim3 grid, dim3 block, size_t smem, unsigned K,
                  const std::function<void()> &body);

void run_kernel(const char *sig, dim3 grid, dim3 block, size_t smem,
                const std::function<void()> &body, unsigned cluster) {
  if (cluster > 1) {
    run_clusters(sig, grid, block, smem, cluster, body);
    return;
  }
  std::lock_guard<std::recursive_mutex> lock(g_mutex);
  if (g_sticky != cudaSuccess) return;
  g_kernel = sig;
  block_run r;
  r.nthreads = (int)(block.x * block.y * block.z);
  r.fibers.resize((size_t)r.nthreads);
  r.warps.resize((size_t)(r.nthreads + 31) / 32);
  r.body = &body;
  traffic_launch();
  unsigned char *dyn16 = smem_acquire(smem);
  if (!dyn16) {
    report("%s: cannot map %zu bytes of dynamic shared memory", sig, smem);
    fault(cudaErrorMemoryAllocation);
    g_kernel = nullptr;
    return;
  }
  const uint64_t nblocks = (uint64_t)grid.x * grid.y * grid.z;
  std::vector<uint64_t> blocks; /* in the schedule's order, like the threads */
  order(blocks, (size_t)nblocks);
  block_run *prev = g_run;
  exec_ctx *prev_sched = g_sched_ctx;
  g_run = &r;
  r.sched.bottom = nullptr; /* the calling thread's stack: learnt at the first switch back */
  r.sched.size = 0;
  g_sched_ctx = &r.sched;
  bool ok = true, redzone = false;
  for (uint64_t b : blocks) {
    start_block(r, b, grid, block, &dyn16, smem, 0, 1, 0);
    if (!run_block(r)) {
      ok = false;
      break;
    }
    if (!smem_redzone_ok()) {
      report("%s, block (%u,%u,%u): write past the end of its %zu bytes of dynamic shared memory",
             sig, r.fibers[0].view.block_idx.x, r.fibers[0].view.block_idx.y,
             r.fibers[0].view.block_idx.z, smem);
      redzone = true;
      break;
    }
  }
  smem_release();
  g_run = prev;
  g_sched_ctx = prev_sched;
  if (!ok) {
    fault(cudaErrorLaunchFailure);
  } else if (redzone) {
    fault(cudaErrorIllegalAddress);
  } else {
    check_canaries(sig);
  }
  g_kernel = nullptr;
}

/* A launch in clusters of K blocks along x: each cluster's blocks get their
   own fibers and dynamic shared memory and run together (run_cluster);
   clusters run one after another, in the schedule's order. */
void run_clusters(const char *sig, dim3 grid, dim3 block, size_t smem, unsigned K,
                  const std::function<void()> &body) {
  std::lock_guard<std::recursive_mutex> lock(g_mutex);
  if (g_sticky != cudaSuccess) return;
  g_kernel = sig;
  traffic_launch();
  const int nthreads = (int)(block.x * block.y * block.z);
  cluster_run c;
  c.blocks.resize(K);
  c.smem.resize(K);
  c.exited.resize(K);
  c.smem_bytes = smem;
  c.total = (int)K * nthreads;
  bool ok = true, redzone = false;
  for (unsigned k = 0; k < K && ok; k++)
    if (!(c.smem[k] = smem_acquire(smem))) ok = false;
  if (!ok) {
    report("%s: cannot map %u x %zu bytes of dynamic shared memory", sig, K, smem);
    smem_release();
    fault(cudaErrorMemoryAllocation);
    g_kernel = nullptr;
    return;
  }
  for (unsigned k = 0; k < K; k++) {
    block_run &r = c.blocks[k];
    r.cluster = &c;
    r.nthreads = nthreads;
    r.fibers.resize((size_t)nthreads);
    r.warps.resize((size_t)(nthreads + 31) / 32);
    r.body = &body;
    r.sched.bottom = nullptr;
    r.sched.size = 0;
  }
  const uint64_t nclusters = (uint64_t)grid.x * grid.y * grid.z / K;
  std::vector<uint64_t> clusters;
  order(clusters, (size_t)nclusters);
  block_run *prev = g_run;
  exec_ctx *prev_sched = g_sched_ctx;
  for (uint64_t cid : clusters) {
    c.at_barrier = 0;
    std::fill(c.exited.begin(), c.exited.end(), 0);
    for (unsigned k = 0; k < K; k++) /* K divides grid.x: one y, z per cluster */
      start_block(c.blocks[k], cid * K + k, grid, block, c.smem.data(), smem, k, K,
                  (int)k * nthreads);
    g_sched_ctx = &c.blocks[0].sched;
    if (!run_cluster(c)) {
      ok = false;
      break;
    }
    if (!smem_redzone_ok()) {
      report("%s, cluster from block %llu: write past the end of a block's %zu bytes of dynamic "
             "shared memory",
             sig, (unsigned long long)(cid * K), smem);
      redzone = true;
      break;
    }
  }
  smem_release();
  g_run = prev;
  g_sched_ctx = prev_sched;
  if (!ok)
    fault(cudaErrorLaunchFailure);
  else if (redzone)
    fault(cudaErrorIllegalAddress);
  else
    check_canaries(sig);
  g_kernel = nullptr;
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

void cluster_sync() {
  block_run &r = *g_run;
  if (!r.cluster) { /* a plain launch is a cluster of one block */
    syncthreads();
    return;
  }
  cluster_run &c = *r.cluster;
  r.running->state = AT_CLUSTER_BARRIER;
  if (++c.at_barrier == c.total) {
    c.at_barrier = 0;
    for (block_run &b : c.blocks)
      for (fiber &o : b.fibers)
        if (o.state == AT_CLUSTER_BARRIER) o.state = RUNNABLE;
  }
  yield_to_scheduler();
}

void *map_shared_rank(const void *addr, unsigned rank) {
  const thread_view *v = current;
  const uintptr_t a = (uintptr_t)addr, base = (uintptr_t)v->smem;
  if (rank >= v->cluster_size)
    kernel_fail("map_shared_rank: rank %u of a cluster of %u blocks", rank, v->cluster_size);
  if (a < base || a > base + v->smem_size)
    kernel_fail("map_shared_rank(%p): not in this block's %zu bytes of dynamic shared memory "
                "(the emulator's static __shared__ variables are one per program: what other "
                "blocks of a cluster read must be in dynamic shared memory)",
                addr, v->smem_size);
  if (g_run->cluster && g_run->cluster->exited[rank])
    kernel_fail("map_shared_rank: block rank %u of the cluster has exited: its shared memory is "
                "gone (a cluster.sync() before exiting keeps it)",
                rank);
  return v->cluster_smem[rank] + (a - base);
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

cudaError_t submit_kernel(const void *fn, const char *signature, dim3 grid, dim3 block, size_t smem,
                          cudaStream_t stream, std::function<void()> body, unsigned cluster) {
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
    report("invalid launch configuration: grid (%u,%u,%u) block (%u,%u,%u) for %s", grid.x, grid.y,
           grid.z, block.x, block.y, block.z, sig.c_str());
    return set_error(cudaErrorInvalidConfiguration);
  }
  const int limit = g_funcs.count(fn) ? g_funcs[fn].max_dynamic_smem : SMEM_DEFAULT;
  if (smem > (size_t)limit) {
    report("%zu bytes of dynamic shared memory, above the kernel's limit %d (set with "
           "cudaFuncSetAttribute) for %s",
           smem, limit, sig.c_str());
    return set_error(cudaErrorInvalidValue);
  }
  if (cluster == 0 || cluster > 8 || grid.x % cluster != 0) {
    report("cluster of %u blocks for a grid of %u along x: not a portable cluster size (1..8) "
           "dividing the grid, for %s",
           cluster, grid.x, sig.c_str());
    return set_error(cudaErrorInvalidClusterSize);
  }
  cudaError_t e = submit(stream, [sig, grid, block, smem, body, cluster]() {
    run_kernel(sig.c_str(), grid, block, smem, body, cluster);
  });
  return set_error(e);
}

} // namespace culoss_emu

/* ==================================================================== */
/* the CUDA runtime API: kernels' attributes                             */
/* ==================================================================== */

cudaError_t cudaFuncGetAttributes(struct cudaFuncAttributes *attr, const void *func) {
  LOCK;
  if (!attr || !func) return set_error(cudaErrorInvalidValue);
  memset(attr, 0, sizeof *attr);
  attr->maxThreadsPerBlock = 1024;
  attr->sharedSizeBytes = 0; /* static shared memory is not measured here */
  attr->maxDynamicSharedSizeBytes =
      g_funcs.count(func) ? g_funcs[func].max_dynamic_smem : SMEM_DEFAULT;
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
