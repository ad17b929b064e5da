"""The one ctypes layer: loads libculoss, declares every C signature once,
turns a status into an exception. Nothing here knows about NumPy or torch.

The library is found through ``$CULOSS_LIBRARY``, then next to this package
(where ``pip install .`` puts it), then in a ``build/`` directory of the
source tree, then on the loader path. cuBLAS (CUDA builds) is found through
the library's RUNPATH in the ``nvidia-cublas`` wheel beside the package
(``site-packages/nvidia/cu13/lib``), never a toolkit path; the CUDA runtime
is linked statically into the installed library.
"""
import ctypes
import ctypes.util
import glob
import os
import sys
import threading

_P = ctypes.c_void_p
_i64 = ctypes.c_int64
_int = ctypes.c_int
_size = ctypes.c_size_t

STATUS_NAMES = {0: "OK", 1: "INVALID_VALUE", 2: "TARGET_OUT_OF_RANGE", 3: "NOT_SUPPORTED",
                4: "NO_DEVICE", 5: "OUT_OF_MEMORY", 6: "CUDA", 7: "CUBLAS", 8: "INTERNAL"}
REDUCTIONS = {"none": 0, "sum": 1, "mean": 2, "batchmean": 3}
F32, F16, BF16 = 0, 1, 2
I32, I64 = 0, 1
BACKEND_CPU, BACKEND_CUDA = 0, 1


def _preload_cublas():
    """Loads libcublas.so.13 from an nvidia-cublas wheel on sys.path, if there
    is one, so a library built elsewhere (CULOSS_LIBRARY) finds it too. The
    installed library's RUNPATH already points there; this is the fallback."""
    for base in sys.path:
        for sub in ("nvidia/cu13/lib", "nvidia/cublas/lib"):
            for name in ("libcublasLt.so.13", "libcublas.so.13"):
                for f in glob.glob(os.path.join(base, sub, name)):
                    try:
                        ctypes.CDLL(f, mode=ctypes.RTLD_GLOBAL)
                    except OSError:
                        pass


def _load():
    here = os.path.dirname(os.path.abspath(__file__))
    cands = []
    if os.environ.get("CULOSS_LIBRARY"):
        cands.append(os.environ["CULOSS_LIBRARY"])
    cands += [os.path.join(here, "libculoss.so"),
              os.path.join(here, "..", "..", "build", "libculoss.so")]
    found = ctypes.util.find_library("culoss")
    if found:
        cands.append(found)
    errors = []
    for c in cands:
        if os.path.sep not in c or os.path.exists(c):
            try:
                return ctypes.CDLL(c), c
            except OSError as e:
                if "cublas" in str(e):
                    _preload_cublas()
                    try:
                        return ctypes.CDLL(c), c
                    except OSError as e2:
                        e = e2
                errors.append(f"{c}: {e}")
        else:
            errors.append(f"{c}: no such file")
    raise OSError("libculoss not found; `pip install .` at the culoss repository root, or set "
                  "CULOSS_LIBRARY to a built libculoss.so. Tried:\n  " + "\n  ".join(errors))


lib, path = _load()
lib.culoss_status_string.restype = ctypes.c_char_p
lib.culoss_status_string.argtypes = [_int]
lib.culoss_last_error.restype = ctypes.c_char_p
lib.culoss_last_error.argtypes = []
lib.culoss_version.restype = _int
lib.culoss_version.argtypes = []

# --------------------------------------------------------------------------- option structs


class CEOptions(ctypes.Structure):
    _fields_ = [("reduction", _int), ("ignore_index", _i64), ("label_smoothing", ctypes.c_float),
                ("class_weight", _P), ("z_loss", ctypes.c_float),
                ("logit_softcap", ctypes.c_float), ("normalizer", _P)]


class BCEOptions(ctypes.Structure):
    _fields_ = [("reduction", _int), ("weight", _P), ("pos_weight", _P)]


class HingeOptions(ctypes.Structure):
    _fields_ = [("reduction", _int), ("margin", ctypes.c_float), ("squared", _int)]


class MultiMarginOptions(ctypes.Structure):
    _fields_ = [("reduction", _int), ("p", _int), ("margin", ctypes.c_float),
                ("class_weight", _P)]


class RegressionOptions(ctypes.Structure):
    _fields_ = [("reduction", _int), ("delta", ctypes.c_float), ("beta", ctypes.c_float)]


class KLOptions(ctypes.Structure):
    _fields_ = [("reduction", _int), ("log_target", _int)]


class HingeEmbeddingOptions(ctypes.Structure):
    _fields_ = [("reduction", _int), ("margin", ctypes.c_float)]


class SoftMarginOptions(ctypes.Structure):
    _fields_ = [("reduction", _int)]


class PoissonNLLOptions(ctypes.Structure):
    _fields_ = [("reduction", _int), ("log_input", _int), ("full", _int), ("eps", ctypes.c_float)]


class SigmoidFocalOptions(ctypes.Structure):
    _fields_ = [("reduction", _int), ("alpha", ctypes.c_float), ("gamma", ctypes.c_float)]


class MarginRankingOptions(ctypes.Structure):
    _fields_ = [("reduction", _int), ("margin", ctypes.c_float)]


class GaussianNLLOptions(ctypes.Structure):
    _fields_ = [("reduction", _int), ("full", _int), ("eps", ctypes.c_float)]


class CosineEmbeddingOptions(ctypes.Structure):
    _fields_ = [("reduction", _int), ("margin", ctypes.c_float)]


class TripletMarginOptions(ctypes.Structure):
    _fields_ = [("reduction", _int), ("margin", ctypes.c_float), ("p", ctypes.c_float),
                ("eps", ctypes.c_float), ("swap", _int)]


class InfoNCEOptions(ctypes.Structure):
    _fields_ = [("reduction", _int), ("symmetric", _int), ("temperature", _P),
                ("grad_temperature", _P)]


class MultilabelMarginOptions(ctypes.Structure):
    _fields_ = [("reduction", _int)]


class MultilabelSoftMarginOptions(ctypes.Structure):
    _fields_ = [("reduction", _int), ("weight", _P), ("weight_per_row", _int)]


class DistillOptions(ctypes.Structure):
    _fields_ = [("divergence", _int), ("beta", ctypes.c_float), ("temperature", ctypes.c_float),
                ("reduction", _int), ("ignore_index", _i64), ("weight_soft", ctypes.c_float),
                ("weight_hard", ctypes.c_float), ("hard_options", ctypes.POINTER(CEOptions))]


class LinearCEOptions(ctypes.Structure):
    _fields_ = [("grad_weight_dtype", _int), ("accumulate", _int), ("lse", _P), ("entropy", _P)]


class VocabParallel(ctypes.Structure):
    """culoss_vocab_parallel: this rank's slice of the classes. The CE
    binding runs the collective itself between the two phases (allgather
    NULL); the linear one passes a callback over torch.distributed."""
    _fields_ = [("rank", _int), ("ranks", _int), ("v_begin", _i64), ("v_total", _i64),
                ("allgather", _P), ("user", _P)]


VOCAB_PARALLEL_RECORD_FLOATS = 8  # CULOSS_VOCAB_PARALLEL_RECORD_BYTES / 4

_OPTIONS = {"cross_entropy": CEOptions, "bce": BCEOptions, "hinge": HingeOptions,
            "multi_margin": MultiMarginOptions, "regression": RegressionOptions,
            "kl_div": KLOptions, "linear_ce": LinearCEOptions,
            "hinge_embedding": HingeEmbeddingOptions, "soft_margin": SoftMarginOptions,
            "poisson_nll": PoissonNLLOptions, "sigmoid_focal": SigmoidFocalOptions,
            "margin_ranking": MarginRankingOptions, "gaussian_nll": GaussianNLLOptions,
            "cosine_embedding": CosineEmbeddingOptions, "triplet_margin": TripletMarginOptions,
            "multilabel_soft_margin": MultilabelSoftMarginOptions,
            "multilabel_margin": MultilabelMarginOptions, "info_nce": InfoNCEOptions,
            "distill": DistillOptions}
for _name, _st in _OPTIONS.items():
    getattr(lib, f"culoss_{_name}_options_init").argtypes = [ctypes.POINTER(_st)]
    getattr(lib, f"culoss_{_name}_options_init").restype = None


def options(name, **fields):
    """An options struct initialised by culoss_<name>_options_init, then the
    given fields set."""
    o = _OPTIONS[name]()
    getattr(lib, f"culoss_{name}_options_init")(ctypes.byref(o))
    for k, v in fields.items():
        setattr(o, k, v)
    return o


_SIGS = {
    "culoss_create": [ctypes.POINTER(_P), _int, _int], "culoss_destroy": [_P],
    "culoss_set_stream": [_P, _P], "culoss_synchronize": [_P],
    "culoss_cross_entropy": [_P, _P, _i64, _i64, _int, _P, _i64, _int, _P, _P, _P, _P],
    "culoss_cross_entropy_soft": [_P, _P, _i64, _i64, _int, _P, _i64, _P, _P, _P, _P],
    "culoss_nll": [_P, _P, _i64, _i64, _int, _P, _i64, _int, _P, _P, _P, _P],
    "culoss_bce_with_logits": [_P, _P, _i64, _i64, _int, _P, _P, _P, _P, _P],
    "culoss_bce": [_P, _P, _i64, _i64, _int, _P, _P, _P, _P, _P],
    "culoss_hinge": [_P, _P, _i64, _int, _P, _P, _P, _P, _P],
    "culoss_multi_margin": [_P, _P, _i64, _i64, _int, _P, _i64, _int, _P, _P, _P, _P],
    "culoss_kl_div": [_P, _P, _i64, _i64, _int, _P, _P, _P, _P, _P],
    "culoss_linear_cross_entropy": [_P, _P, _i64, _i64, _i64, _int, _P, _P, _P, _int, _P, _P,
                                    _P, _P, _P, _P, _P, _size],
    "culoss_linear_cross_entropy_workspace_size": [_P, _i64, _i64, _i64, _int,
                                                   ctypes.POINTER(_size)],
    "culoss_linear_cross_entropy_vocab_parallel_workspace_size": [_P, _P, _P, _i64, _i64, _i64,
                                                                  _int, ctypes.POINTER(_size)],
    "culoss_linear_cross_entropy_vocab_parallel": [_P, _P, _P, _P, _i64, _i64, _i64, _int, _P, _P,
                                                   _P, _int, _P, _P, _P, _P, _P, _P, _P, _size],
    "culoss_cross_entropy_vocab_parallel_stats": [_P, _P, _P, _i64, _i64, _int, _P, _i64, _int,
                                                  _P, _P],
    "culoss_cross_entropy_vocab_parallel_finish": [_P, _P, _P, _i64, _i64, _int, _P, _i64,
                                                   _int, _P, _P, _P, _P, _P],
}
for _f in ("mse", "l1", "huber", "smooth_l1", "hinge_embedding", "soft_margin", "poisson_nll",
           "sigmoid_focal"):
    _SIGS[f"culoss_{_f}"] = [_P, _P, _i64, _int, _P, _P, _P, _P, _P]
_SIGS["culoss_margin_ranking"] = [_P, _P, _i64, _int, _P, _P, _P, _P, _P, _P, _P]
_SIGS["culoss_gaussian_nll"] = [_P, _P, _i64, _int, _P, _P, _P, _P, _P, _P, _P]
_SIGS["culoss_cosine_embedding"] = [_P, _P, _i64, _i64, _int, _P, _P, _i64, _P, _P, _P, _P, _P]
_SIGS["culoss_triplet_margin"] = [_P, _P, _i64, _i64, _int, _P, _P, _P, _i64, _P, _P, _P, _P, _P]
_SIGS["culoss_info_nce_workspace_size"] = [_P, _P, _i64, _i64, _int, ctypes.POINTER(_size)]
_SIGS["culoss_info_nce"] = [_P, _P, _i64, _i64, _int, _P, _P, _P, _P, _P, _P, _P, _size]
_SIGS["culoss_multilabel_margin"] = [_P, _P, _i64, _i64, _int, _P, _i64, _int, _P, _P, _P, _P]
_SIGS["culoss_multilabel_soft_margin"] = [_P, _P, _i64, _i64, _int, _P, _P, _i64, _P, _P, _P]
_SIGS["culoss_distill"] = [_P, _P, _i64, _i64, _int, _P, _i64, _P, _i64, _int, _P, _P, _P, _P]
_SIGS["culoss_linear_distill_workspace_size"] = [_P, _P, _i64, _i64, _i64, _i64, _int,
                                                 ctypes.POINTER(_size)]
_SIGS["culoss_linear_distill"] = [_P, _P, _P, _i64, _i64, _i64, _i64, _int, _P, _P, _P, _P, _P,
                                  _P, _int, _P, _P, _P, _P, _P, _P, _P, _size]
for _f, _a in _SIGS.items():
    getattr(lib, _f).argtypes = _a
    getattr(lib, _f).restype = _int

# --------------------------------------------------------------------------- errors


class CulossError(RuntimeError):
    """A culoss call failed: ``status`` (int), ``name`` and the library's message."""

    def __init__(self, status, message):
        self.status = status
        self.name = lib.culoss_status_string(status).decode()
        super().__init__(f"{self.name}: {message}")


class CulossValueError(CulossError, ValueError):
    """CULOSS_ERROR_INVALID_VALUE: a bad argument or a domain error in the data."""


class CulossIndexError(CulossError, IndexError):
    """CULOSS_ERROR_TARGET_OUT_OF_RANGE: a class target outside [0, c)."""


def error(status, message=None):
    if message is None:
        message = lib.culoss_last_error().decode()
    cls = {1: CulossValueError, 2: CulossIndexError}.get(status, CulossError)
    return cls(status, message)


def check(status):
    if status != 0:
        raise error(status)


def call(fn, *args):
    """Calls culoss_<fn>(*args) (option structs passed by pointer) and raises
    on a failing status."""
    args = [ctypes.byref(a) if isinstance(a, ctypes.Structure) else a for a in args]
    check(getattr(lib, "culoss_" + fn)(*args))


def version():
    """The linked library's version as (major, minor, patch)."""
    v = lib.culoss_version()
    return (v // 10000, v // 100 % 100, v % 100)


def has_cuda():
    """Whether the loaded library was built with the CUDA backend (a CPU-only
    build answers NO_DEVICE with "this build of culoss has no CUDA backend")."""
    h = _P()
    st = lib.culoss_create(ctypes.byref(h), BACKEND_CUDA, 0)
    if st == 0:
        lib.culoss_destroy(h)
        return True
    return "has no CUDA backend" not in lib.culoss_last_error().decode()

# --------------------------------------------------------------------------- contexts


class Context:
    """A culoss context: ``Context("cpu")`` or ``Context("cuda", device)``."""

    def __init__(self, backend="cpu", device=0):
        self.backend = backend
        self.device = device
        self.h = _P()
        check(lib.culoss_create(ctypes.byref(self.h),
                                BACKEND_CUDA if backend == "cuda" else BACKEND_CPU, device))

    @property
    def _h(self):  # the name the NumPy binding used
        return self.h

    def set_stream(self, stream_ptr):
        check(lib.culoss_set_stream(self.h, stream_ptr))

    def synchronize(self):
        """Waits, then raises deferred errors (e.g. a target outside [0, c))."""
        check(lib.culoss_synchronize(self.h))

    def close(self):
        if self.h:
            lib.culoss_destroy(self.h)
            self.h = _P()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


_tls = threading.local()


def thread_context(kind, device=0, key=None):
    """This thread's context for (kind, device, key): created on first use.
    The CUDA front end keys contexts by stream too (a context's scratch is
    used in stream order, so two streams must not share one)."""
    cache = getattr(_tls, "ctx", None)
    if cache is None:
        cache = _tls.ctx = {}
    k = (kind, device, key)
    ctx = cache.get(k)
    if ctx is None:
        ctx = cache[k] = Context(kind, device)
    return ctx


def has_thread_context(kind, device=0, key=None):
    return (kind, device, key) in getattr(_tls, "ctx", {})


def thread_contexts():
    """The contexts this thread has created (for synchronize)."""
    return list(getattr(_tls, "ctx", {}).values())
