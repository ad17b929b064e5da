/*
 * context.c: contexts and buffers for both backends.
 *
 * The CUDA backend talks to the CUDA runtime through its C API only
 * (cuda_runtime_api.h), so this file stays C11. Every runtime call is checked
 * and a failure becomes a status with the call's name in culoss_last_error().
 */
#include <dlfcn.h>
#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

/* The live contexts. Every entry point checks its ctx against this list by
   pointer value only (never dereferencing an unknown pointer), so a context
   used after culoss_destroy, or destroyed twice, is an INVALID_VALUE error
   instead of undefined behaviour. (A new context that malloc places at a
   destroyed one's address is indistinguishable from it.) A handful of
   contexts per process is the norm: a list and one mutex suffice. */
static pthread_mutex_t culoss__live_lock = PTHREAD_MUTEX_INITIALIZER;
static culoss_context *culoss__live;

static void live_add(culoss_context *c) {
  pthread_mutex_lock(&culoss__live_lock);
  c->next_live = culoss__live;
  culoss__live = c;
  pthread_mutex_unlock(&culoss__live_lock);
}

/* Removes c; returns 0 if it was not live. */
static int live_remove(culoss_context *c) {
  culoss_context **pp;
  int found = 0;
  pthread_mutex_lock(&culoss__live_lock);
  for (pp = &culoss__live; *pp != NULL; pp = &(*pp)->next_live)
    if (*pp == c) {
      *pp = c->next_live;
      found = 1;
      break;
    }
  pthread_mutex_unlock(&culoss__live_lock);
  return found;
}

culoss_status culoss__check_ctx(const culoss_context *ctx, const char *fn) {
  const culoss_context *c;
  int found = 0;
  if (ctx == NULL) return culoss__error(CULOSS_ERROR_INVALID_VALUE, "%s: ctx is NULL", fn);
  pthread_mutex_lock(&culoss__live_lock);
  for (c = culoss__live; c != NULL && !found; c = c->next_live) found = c == ctx;
  pthread_mutex_unlock(&culoss__live_lock);
  if (!found)
    return culoss__error(CULOSS_ERROR_INVALID_VALUE,
                         "%s: ctx is not a live culoss context (destroyed already?)", fn);
  return CULOSS_OK;
}

#ifdef CULOSS_HAVE_CUDA
#include <cuda_runtime_api.h>
#endif

#define CHECK_CTX(ctx) CULOSS__TRY(culoss__check_ctx((ctx), __func__))

/* A byte count from the environment: all digits, or INVALID_VALUE. */
static culoss_status env_bytes(const char *name, const char *e, unsigned long long *out) {
  char *end = NULL;
  errno = 0;
  *out = strtoull(e, &end, 10);
  if (*e < '0' || *e > '9' || *end != '\0' || errno != 0)
    return CULOSS__BAD("culoss_create: %s = \"%s\" is not a byte count", name, e);
  return CULOSS_OK;
}

/* The tuning knobs (README, "Tuning"), read once, here: no call reads the
   environment (getenv beside another thread's setenv is a data race, and
   linear CE's workspace size must not change between the query and the
   call). Unset or empty: the defaults; anything unrecognised is an error. */
static culoss_status read_tuning(culoss_context *c) {
  static const struct {
    const char *name;
    int tpr;
  } shapes[] = {{"thread", 1}, {"1", 1},     {"8", 8},      {"warp", 32},
                {"32", 32},    {"256", 256}, {"1024", 1024}};
  const char *e = getenv("CULOSS_CE_SHAPE");
  unsigned long long b;
  size_t i;
  c->ce_tpr = 0;
  c->ce_cluster = 1;
  c->ce_cache_cap = SIZE_MAX;
  c->lce_block_bytes = (int64_t)1 << 28;
  if (e != NULL && *e != '\0') {
    for (i = 0; i < sizeof shapes / sizeof shapes[0] && c->ce_tpr == 0; i++)
      if (strcmp(e, shapes[i].name) == 0) c->ce_tpr = shapes[i].tpr;
    if (c->ce_tpr == 0)
      return CULOSS__BAD("culoss_create: CULOSS_CE_SHAPE = \"%s\" is not one of thread (or 1), "
                         "8, warp (or 32), 256, 1024",
                         e);
  }
  e = getenv("CULOSS_CE_CLUSTER");
  if (e != NULL && *e != '\0') {
    if (strcmp(e, "0") != 0 && strcmp(e, "1") != 0)
      return CULOSS__BAD("culoss_create: CULOSS_CE_CLUSTER = \"%s\" is not 0 or 1", e);
    c->ce_cluster = e[0] == '1';
  }
  e = getenv("CULOSS_CE_CACHE_BYTES");
  if (e != NULL && *e != '\0') {
    CULOSS__TRY(env_bytes("CULOSS_CE_CACHE_BYTES", e, &b));
    c->ce_cache_cap = b < SIZE_MAX ? (size_t)b : SIZE_MAX;
  }
  e = getenv("CULOSS_LINEAR_CE_BLOCK_BYTES");
  if (e != NULL && *e != '\0') {
    CULOSS__TRY(env_bytes("CULOSS_LINEAR_CE_BLOCK_BYTES", e, &b));
    if (b < 1024 || b > ((unsigned long long)1 << 40))
      return CULOSS__BAD("culoss_create: CULOSS_LINEAR_CE_BLOCK_BYTES = %llu is outside "
                         "[1024, 2^40]",
                         b);
    c->lce_block_bytes = (int64_t)b;
  }
  return CULOSS_OK;
}

#ifdef CULOSS_HAVE_CUDA
#define CUDA_TRY(call)                                                                             \
  do {                                                                                             \
    cudaError_t e_ = (call);                                                                       \
    if (e_ != cudaSuccess) {                                                                       \
      st = culoss__cuda_status(e_, #call);                                                         \
      goto done;                                                                                   \
    }                                                                                              \
  } while (0)

/* Whether stream s is being captured: 1, 0, or -1 with *st set on error.
   The legacy stream during another stream's global-mode capture answers
   cudaErrorStreamCaptureImplicit, not an error of the caller's: counted as
   capturing (and the error cleared, as it is not sticky). */
static int stream_capturing(cudaStream_t s, culoss_status *st) {
  enum cudaStreamCaptureStatus cs = cudaStreamCaptureStatusNone;
  const cudaError_t e = cudaStreamIsCapturing(s, &cs);
  if (e == cudaErrorStreamCaptureImplicit) {
    (void)cudaGetLastError();
    return 1;
  }
  if (e != cudaSuccess) {
    *st = culoss__cuda_status(e, "culoss_set_stream: cudaStreamIsCapturing");
    return -1;
  }
  return cs != cudaStreamCaptureStatusNone;
}

/* culoss_set_stream's switch: the new stream waits (an event recorded on
   the old one) for the context's enqueued work, which uses its scratch, so
   work on the two streams never overlaps on it; nothing waits on the host,
   and recording and waiting are legal in a capture. While either stream is
   captured, nothing is added: a wait would pull the new stream into the
   capture (or an un-captured stream into a graph), and inside a capture the
   caller orders its streams (include/culoss.h). */
static culoss_status switch_stream_cuda(culoss_context *ctx, const void *next_stream) {
  culoss_status st = CULOSS_OK;
  const cudaStream_t old = (cudaStream_t)ctx->stream, next = (cudaStream_t)next_stream;
  int a = stream_capturing(old, &st);
  const int b = stream_capturing(next, &st);
  if (b < 0) return st; /* not a stream */
  if (a < 0) {
    /* The old stream is gone (the caller destroyed it, which the header
       asks not to do before switching away): nothing to wait for, switch. */
    (void)cudaGetLastError();
    st = CULOSS_OK;
    a = 1;
  }
  if (!a && !b) {
    CUDA_TRY(cudaEventRecord((cudaEvent_t)ctx->stream_event, old));
    CUDA_TRY(cudaStreamWaitEvent(next, (cudaEvent_t)ctx->stream_event, 0));
  }
  ctx->stream = (void *)next;
done:
  return st;
}

/* Whether a CUDA driver is installed at all. Without one the runtime says
   "driver version is insufficient", exactly as it does for a driver that is
   too old: only the first is "no device"; the second is a broken setup. */
static int cuda_driver_installed(void) {
  void *h = dlopen("libcuda.so.1", RTLD_LAZY | RTLD_NOLOAD);
  if (h == NULL) h = dlopen("libcuda.so.1", RTLD_LAZY);
  if (h == NULL) return 0;
  dlclose(h);
  return 1;
}

static culoss_status create_cuda(culoss_context *c, int device) {
  culoss_status st = CULOSS_OK;
  int count = 0, prev = 0;
  cudaError_t e = cudaGetDeviceCount(&count);
  if (e != cudaSuccess || count == 0) {
    (void)cudaGetLastError(); /* clear the sticky-free error so later calls start clean */
    /* Only a machine without a device (or without a driver) is "no device";
       any other failure (a driver older than the runtime, a device that
       cannot be initialised) is an error the caller must see, never a skip. */
    if (e == cudaSuccess || e == cudaErrorNoDevice ||
        (e == cudaErrorInsufficientDriver && !cuda_driver_installed()))
      return culoss__error(CULOSS_ERROR_NO_DEVICE, "culoss_create: no usable CUDA device (%s)",
                           e == cudaSuccess         ? "device count is 0"
                           : e == cudaErrorNoDevice ? cudaGetErrorString(e)
                                                    : "no CUDA driver is installed");
    return culoss__error(CULOSS_ERROR_CUDA,
                         "culoss_create: CUDA is present but unusable: cudaGetDeviceCount: %s "
                         "(error %d)",
                         cudaGetErrorString(e), (int)e);
  }
  if (device < 0 || device >= count)
    return culoss__error(CULOSS_ERROR_INVALID_VALUE,
                         "culoss_create: device %d out of range [0, %d)", device, count);
  c->device = device;
  st = culoss__device_enter(c, &prev);
  if (st != CULOSS_OK) return st;
  {
    int smem = 0;
    CUDA_TRY(cudaDeviceGetAttribute(&c->sm_count, cudaDevAttrMultiProcessorCount, device));
    CUDA_TRY(cudaDeviceGetAttribute(&smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
    c->smem_optin = (size_t)smem;
    CUDA_TRY(cudaDeviceGetAttribute(&c->cluster_launch, cudaDevAttrClusterLaunch, device));
  }
  CUDA_TRY(cudaMalloc((void **)&c->scratch, sizeof(culoss__scratch)));
  CUDA_TRY(cudaMemset(c->scratch, 0, sizeof(culoss__scratch)));
  CUDA_TRY(cudaMallocHost((void **)&c->host_flag, sizeof(int)));
  CUDA_TRY(cudaDeviceSynchronize());
  st = culoss__cuda_context_init(c);
done:
  culoss__device_leave(c, prev);
  return st;
}
#endif

culoss_status culoss_create(culoss_context **ctx, culoss_backend backend, int device) {
  culoss_context *c;
  culoss_status st = CULOSS_OK;
  if (ctx == NULL) return culoss__error(CULOSS_ERROR_INVALID_VALUE, "culoss_create: ctx is NULL");
  *ctx = NULL;
  if (backend != CULOSS_BACKEND_CPU && backend != CULOSS_BACKEND_CUDA)
    return culoss__error(CULOSS_ERROR_INVALID_VALUE, "culoss_create: unknown backend %d",
                         (int)backend);
#ifndef CULOSS_HAVE_CUDA
  if (backend == CULOSS_BACKEND_CUDA)
    return culoss__error(CULOSS_ERROR_NO_DEVICE,
                         "culoss_create: this build of culoss has no CUDA backend "
                         "(configured with CULOSS_ENABLE_CUDA=OFF)");
#endif
  c = (culoss_context *)calloc(1, sizeof *c);
  if (c == NULL)
    return culoss__error(CULOSS_ERROR_OUT_OF_MEMORY, "culoss_create: out of host memory");
  c->backend = backend;
  c->device = -1; /* no device touched until the knobs are known to be good */
  if ((st = read_tuning(c)) != CULOSS_OK) {
    free(c);
    return st;
  }
  c->device = backend == CULOSS_BACKEND_CPU ? -1 : device;
#ifdef CULOSS_HAVE_CUDA
  if (backend == CULOSS_BACKEND_CUDA) st = create_cuda(c, device);
#else
  (void)device;
#endif
  if (st != CULOSS_OK) {
    culoss_status keep = st;
    char msg[512];
    strncpy(msg, culoss_last_error(), sizeof msg - 1);
    msg[sizeof msg - 1] = '\0';
    live_add(c); /* so that culoss_destroy releases what was set up */
    culoss_destroy(c);
    return culoss__error(keep, "%s", msg); /* destroy must not hide the cause */
  }
  live_add(c);
  *ctx = c;
  return CULOSS_OK;
}

culoss_status culoss_destroy(culoss_context *ctx) {
  culoss_status st = CULOSS_OK;
  if (ctx == NULL) return CULOSS_OK;
  if (!live_remove(ctx))
    return culoss__error(CULOSS_ERROR_INVALID_VALUE,
                         "culoss_destroy: ctx is not a live culoss context (destroyed twice?)");
#ifdef CULOSS_HAVE_CUDA
  if (ctx->backend == CULOSS_BACKEND_CUDA && ctx->device >= 0) {
    int prev = 0;
    if (culoss__device_enter(ctx, &prev) == CULOSS_OK) {
      cudaError_t e = cudaStreamSynchronize((cudaStream_t)ctx->stream);
      if (e != cudaSuccess) st = culoss__cuda_status(e, "culoss_destroy: cudaStreamSynchronize");
      culoss__cuda_context_release(ctx);
      if (ctx->scratch) (void)cudaFree(ctx->scratch);
      if (ctx->host_flag) (void)cudaFreeHost(ctx->host_flag);
      culoss__device_leave(ctx, prev);
    }
  }
#endif
  free(ctx);
  return st;
}

culoss_status culoss_set_stream(culoss_context *ctx, void *cuda_stream) {
  CHECK_CTX(ctx);
  if (ctx->backend == CULOSS_BACKEND_CPU) {
    if (cuda_stream != NULL)
      return culoss__error(CULOSS_ERROR_NOT_SUPPORTED,
                           "culoss_set_stream: the CPU backend has no streams");
    return CULOSS_OK;
  }
#ifdef CULOSS_HAVE_CUDA
  if (cuda_stream == ctx->stream) return CULOSS_OK;
  return culoss__dispatch_cuda(ctx, "culoss_set_stream", switch_stream_cuda, cuda_stream);
#else
  ctx->stream = cuda_stream;
  return CULOSS_OK;
#endif
}

culoss_status culoss_set_grid_limit(culoss_context *ctx, int64_t max_blocks) {
  CHECK_CTX(ctx);
  if (max_blocks < 0 || max_blocks > CULOSS_MAX_PARTIALS)
    return culoss__error(CULOSS_ERROR_INVALID_VALUE,
                         "culoss_set_grid_limit: max_blocks = %lld is outside [0, %d]",
                         (long long)max_blocks, CULOSS_MAX_PARTIALS);
  ctx->grid_limit = max_blocks;
  return CULOSS_OK;
}

/* The arguments of the CUDA halves below. */
struct malloc_args {
  void **ptr;
  size_t bytes;
};
struct copy_args {
  void *dst;
  const void *src;
  size_t bytes;
  int up;
};

#ifdef CULOSS_HAVE_CUDA
/* The CUDA halves of the calls below, each run by culoss__dispatch_cuda with
   the context's device current. */
static culoss_status sync_cuda(culoss_context *ctx, const void *unused) {
  culoss_status st = CULOSS_OK;
  const cudaStream_t s = (cudaStream_t)ctx->stream;
  const int *flag = ctx->host_flag;
  (void)unused;
  CUDA_TRY(cudaStreamSynchronize(s));
  /* Read and clear the deferred-error flag in stream order. */
  CUDA_TRY(cudaMemcpyAsync(ctx->host_flag, &ctx->scratch->error_flag, sizeof(int),
                           cudaMemcpyDeviceToHost, s));
  CUDA_TRY(cudaMemsetAsync(&ctx->scratch->error_flag, 0, sizeof(int), s));
  CUDA_TRY(cudaStreamSynchronize(s));
  if (*flag & CULOSS__FLAG_TARGET)
    st = culoss__error(CULOSS_ERROR_TARGET_OUT_OF_RANGE,
                       "culoss_synchronize: a kernel met a class target outside [0, c) that was "
                       "not ignore_index (its rows got NaN loss and zero gradient)%s%s",
                       *flag & CULOSS__FLAG_DOMAIN ? "; also an input outside its domain" : "",
                       *flag & CULOSS__FLAG_SLICES
                           ? "; also vocabulary-parallel slices that do not tile v_total"
                           : "");
  else if (*flag & CULOSS__FLAG_SLICES)
    st = culoss__error(CULOSS_ERROR_INVALID_VALUE,
                       "culoss_synchronize: vocabulary-parallel cross-entropy met slices that do "
                       "not cover v_total once (a target owned by no rank or by two, or widths "
                       "that do not add up to v_total); those rows got NaN loss and zero gradient");
  else if (*flag & CULOSS__FLAG_DOMAIN)
    st = culoss__error(CULOSS_ERROR_INVALID_VALUE,
                       "culoss_synchronize: a kernel met an input outside its domain (a BCE "
                       "probability outside [0, 1] or a hinge target other than +-1); those "
                       "elements got NaN loss and zero gradient");
done:
  return st;
}

static culoss_status malloc_cuda(culoss_context *ctx, const void *args) {
  const struct malloc_args *a = (const struct malloc_args *)args;
  culoss_status st = CULOSS_OK;
  (void)ctx;
  CUDA_TRY(cudaMalloc(a->ptr, a->bytes));
done:
  return st;
}

static culoss_status free_cuda(culoss_context *ctx, const void *ptr) {
  culoss_status st = CULOSS_OK;
  (void)ctx;
  CUDA_TRY(cudaFree((void *)ptr));
done:
  return st;
}

static culoss_status copy_cuda(culoss_context *ctx, const void *args) {
  const struct copy_args *a = (const struct copy_args *)args;
  const cudaStream_t s = (cudaStream_t)ctx->stream;
  culoss_status st = CULOSS_OK;
  CUDA_TRY(cudaMemcpyAsync(a->dst, a->src, a->bytes,
                           a->up ? cudaMemcpyHostToDevice : cudaMemcpyDeviceToHost, s));
  CUDA_TRY(cudaStreamSynchronize(s));
done:
  return st;
}
#else
#define sync_cuda NULL
#define malloc_cuda NULL
#define free_cuda NULL
#define copy_cuda NULL
#endif

culoss_status culoss_synchronize(culoss_context *ctx) {
  CHECK_CTX(ctx);
  if (ctx->backend == CULOSS_BACKEND_CPU) return CULOSS_OK;
  return culoss__dispatch_cuda(ctx, "culoss_synchronize", sync_cuda, NULL);
}

culoss_status culoss_malloc(culoss_context *ctx, void **ptr, size_t bytes) {
  CHECK_CTX(ctx);
  if (ptr == NULL) return CULOSS__BAD("culoss_malloc: ptr is NULL");
  *ptr = NULL;
  if (bytes == 0) return CULOSS_OK;
  if (ctx->backend == CULOSS_BACKEND_CPU) {
    void *p = NULL;
    size_t rounded = (bytes + 63u) & ~(size_t)63u;
    if (rounded < bytes || (p = aligned_alloc(64, rounded)) == NULL)
      return culoss__error(CULOSS_ERROR_OUT_OF_MEMORY, "culoss_malloc: %zu bytes of host memory",
                           bytes);
    *ptr = p;
    return CULOSS_OK;
  }
  {
    const struct malloc_args a = {ptr, bytes};
    const culoss_status st = culoss__dispatch_cuda(ctx, "culoss_malloc", malloc_cuda, &a);
    if (st != CULOSS_OK) *ptr = NULL;
    return st;
  }
}

culoss_status culoss_free(culoss_context *ctx, void *ptr) {
  CHECK_CTX(ctx);
  if (ptr == NULL) return CULOSS_OK;
  if (ctx->backend == CULOSS_BACKEND_CPU) {
    free(ptr);
    return CULOSS_OK;
  }
  return culoss__dispatch_cuda(ctx, "culoss_free", free_cuda, ptr);
}

static culoss_status copy(culoss_context *ctx, void *dst, const void *src, size_t bytes, int up) {
  const char *fn = up ? "culoss_upload" : "culoss_download";
  CULOSS__TRY(culoss__check_ctx(ctx, fn));
  if (bytes == 0) return CULOSS_OK;
  if (dst == NULL || src == NULL)
    return CULOSS__BAD("%s: %s is NULL", fn,
                       dst == NULL ? (up ? "dst" : "host_dst") : (up ? "host_src" : "src"));
  if (ctx->backend == CULOSS_BACKEND_CPU) {
    memmove(dst, src, bytes);
    return CULOSS_OK;
  }
  {
    const struct copy_args a = {dst, src, bytes, up};
    return culoss__dispatch_cuda(ctx, fn, copy_cuda, &a);
  }
}

culoss_status culoss_upload(culoss_context *ctx, void *dst, const void *host_src, size_t bytes) {
  return copy(ctx, dst, host_src, bytes, 1);
}

culoss_status culoss_download(culoss_context *ctx, void *host_dst, const void *src, size_t bytes) {
  return copy(ctx, host_dst, src, bytes, 0);
}
