/*
 * emu_cudart.cc: the CUDA runtime API of culoss's CPU emulator of CUDA
 * (emu_internal.h, tests/emu/README.md), with cudart's C ABI: device
 * queries, errors, copies and memsets, streams and their capture into
 * graphs, and events (cudaMalloc and the other memory calls are in
 * emu_memory.cc, cudaFunc*Attribute* in emu_fibers.cc). It also holds the
 * state the emulator's files share: the API lock, the sticky and last
 * errors, and the streams through which work is run or recorded.
 */
#include "emu_internal.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <set>
#include <vector>

/* The opaque handle types of the runtime. */
struct CUstream_st {
  unsigned flags = 0;
  bool capturing = false;
  bool invalidated = false;
  /* A stream joined to another's capture (it waited on an event recorded
     in that capture): its work goes into the origin's graph, and it stops
     capturing when the origin's capture ends. */
  CUstream_st *origin = nullptr;
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
  CUstream_st *capture = nullptr; /* the capture (origin stream) it was recorded into */
};

#pragma GCC visibility push(hidden)
namespace culoss_emu::internal {

std::recursive_mutex g_mutex; /* one API call / kernel at a time */
cudaError_t g_sticky = cudaSuccess;
static thread_local cudaError_t t_last = cudaSuccess;
static thread_local int t_device = 0;
static int g_global_captures = 0; /* streams in a global-mode capture */
static std::set<CUstream_st *> g_streams;
static CUstream_st g_default_stream;
const char *g_kernel = nullptr; /* the running kernel's signature */

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

static CUstream_st *stream_of(cudaStream_t s) {
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
    (st->origin ? st->origin : st)->ops.push_back(std::move(op));
    return cudaSuccess;
  }
  op();
  return cudaSuccess;
}

} // namespace culoss_emu::internal
#pragma GCC visibility pop

/* ==================================================================== */
/* the CUDA runtime API                                                  */
/* ==================================================================== */

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
  case cudaDevAttrClusterLaunch: *value = 1; break;
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
  case cudaErrorStreamCaptureUnsupported: return "operation not permitted when stream is capturing";
  case cudaErrorStreamCaptureInvalidated:
    return "operation failed due to a previous error during capture";
  default: return "emulated CUDA error";
  }
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
  if (s->capturing && !s->origin) g_global_captures--;
  g_streams.erase(s);
  delete s;
  return cudaSuccess;
}

cudaError_t cudaStreamSynchronize(cudaStream_t s) {
  LOCK;
  CUstream_st *st = stream_of(s);
  if (!st) return set_error(cudaErrorInvalidResourceHandle);
  if (capture_forbids("cudaStreamSynchronize")) return set_error(cudaErrorStreamCaptureUnsupported);
  STICKY;
  return cudaSuccess;
}

cudaError_t cudaDeviceSynchronize(void) {
  LOCK;
  if (capture_forbids("cudaDeviceSynchronize")) return set_error(cudaErrorStreamCaptureUnsupported);
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
  if (!st->capturing || st->origin) return set_error(cudaErrorIllegalState);
  st->capturing = false;
  g_global_captures--;
  for (CUstream_st *j : g_streams)
    if (j->origin == st) j->capturing = false, j->origin = nullptr;
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
  CUstream_st *st = stream_of(s);
  e->capture = st && st->capturing ? (st->origin ? st->origin : st) : nullptr;
  return set_error(submit(s, [e]() {
    e->ms = now_ms();
    e->recorded = true;
  }));
}

/* Work on one stream runs synchronously, so every wait is already met;
   checked: the handles, and the sticky error. As in CUDA, a stream that
   waits on an event recorded in another stream's capture joins that
   capture (cudaStreamIsCapturing says so, its work is recorded into it). */
cudaError_t cudaStreamWaitEvent(cudaStream_t s, cudaEvent_t e, unsigned int flags) {
  LOCK;
  if (!e || flags != 0)
    return set_error(!e ? cudaErrorInvalidResourceHandle : cudaErrorInvalidValue);
  CUstream_st *st = stream_of(s);
  if (!st) return set_error(cudaErrorInvalidResourceHandle);
  if (e->capture && (!g_streams.count(e->capture) || !e->capture->capturing))
    e->capture = nullptr; /* that capture has ended: the event holds no capture work now */
  if (e->capture && !st->capturing) {
    if (st == &g_default_stream) return set_error(cudaErrorStreamCaptureImplicit);
    st->capturing = true;
    st->origin = e->capture;
  }
  return set_error(submit(s, []() {}));
}

/* The legacy stream during a global-mode capture answers
   cudaErrorStreamCaptureImplicit, as CUDA does. */
cudaError_t cudaStreamIsCapturing(cudaStream_t s, enum cudaStreamCaptureStatus *status) {
  LOCK;
  CUstream_st *st = stream_of(s);
  if (!st || !status)
    return set_error(!st ? cudaErrorInvalidResourceHandle : cudaErrorInvalidValue);
  if (st == &g_default_stream && g_global_captures > 0)
    return set_error(cudaErrorStreamCaptureImplicit);
  *status = st->capturing ? (st->invalidated ? cudaStreamCaptureStatusInvalidated
                                             : cudaStreamCaptureStatusActive)
                          : cudaStreamCaptureStatusNone;
  return cudaSuccess;
}

cudaError_t cudaEventSynchronize(cudaEvent_t e) {
  LOCK;
  if (!e) return set_error(cudaErrorInvalidResourceHandle);
  if (capture_forbids("cudaEventSynchronize")) return set_error(cudaErrorStreamCaptureUnsupported);
  STICKY;
  return cudaSuccess;
}

cudaError_t cudaEventElapsedTime(float *ms, cudaEvent_t a, cudaEvent_t b) {
  if (!ms || !a || !b) return set_error(cudaErrorInvalidValue);
  if (!a->recorded || !b->recorded) return set_error(cudaErrorInvalidResourceHandle);
  *ms = (float)(b->ms - a->ms);
  return cudaSuccess;
}
