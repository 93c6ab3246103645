"""Load OpenBLAS into the process before MLX on Linux, so MLX's CPU matmuls use it.

mlx-cpu links a slow reference BLAS; when Debian's `libopenblas0-pthread` is loaded first with
RTLD_GLOBAL its symbols win and fp32 matmuls run 30-40x faster (see NOTES-mlx.md). Every module
that imports `mlx` calls `ensure_blas()` first. Idempotent; one warning when OpenBLAS is missing.
"""

from __future__ import annotations

import ctypes
import logging
import sys
import threading

from darkbloom.inference.cpujit import use_native_jit

__all__ = ["OPENBLAS_PATHS", "ensure_blas", "blas_status", "set_blas_threads", "blas_threads"]

log = logging.getLogger(__name__)

# Debian/Ubuntu paths of the pthread build (the OpenMP and serial builds also work).
OPENBLAS_PATHS = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
)

_lock = threading.Lock()
_done = False
_status = "not checked"
_lib: ctypes.CDLL | None = None


def ensure_blas(enabled: bool = True, native_jit: bool = True) -> str:
    """Load OpenBLAS globally before the first `import mlx.core`; return what happened.

    With `native_jit`, also have MLX build its fused CPU kernels for this CPU
    (`cpujit.use_native_jit`; its outcome is `cpujit.jit_status()`).

    Returns "loaded <path>", "not needed" (macOS: MLX uses Accelerate/Metal), "disabled",
    "missing" or "too late" (mlx was already imported, so loading it now would not help).
    Only the first call acts; later calls return the same status.
    """
    global _done, _status, _lib
    with _lock:
        if _done:
            return _status
        _done = True
        if "mlx.core" not in sys.modules:  # later, MLX may have compiled kernels already
            use_native_jit(native_jit)
        if not sys.platform.startswith("linux"):
            _status = "not needed"
        elif not enabled:
            _status = "disabled"
        elif "mlx.core" in sys.modules:
            # Someone imported mlx before us: the reference BLAS is already bound.
            _status = "too late"
            log.warning("mlx was imported before OpenBLAS could be loaded; CPU inference will be slow")
        else:
            _status = "missing"
            for path in OPENBLAS_PATHS:
                try:
                    _lib = ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
                except OSError:
                    continue
                _status = f"loaded {path}"
                log.debug("OpenBLAS loaded from %s", path)
                break
            else:
                log.warning(
                    "OpenBLAS not found; MLX falls back to its slow reference BLAS "
                    "(install it: apt-get install libopenblas0-pthread)"
                )
        return _status


def blas_status() -> str:
    """What `ensure_blas` did, for status pages and benchmarks."""
    return _status


def set_blas_threads(n: int) -> int:
    """Set OpenBLAS's thread count for the whole process (n >= 1; 0 leaves it as it is) and
    return the count in effect (0 when OpenBLAS is not loaded).

    Decode steps multiply a few rows by each weight matrix: there OpenBLAS's worker threads cost
    more than they save, and on a busy machine their spin-waiting makes it much worse (measured
    on 2 shared cores, random 20M model: 1 thread 55/117/202 tok/s at 1/4/16 sequences, 2 threads
    36/103/138)."""
    if _lib is None:
        return 0
    if n >= 1:
        _lib.openblas_set_num_threads(ctypes.c_int(n))
    return blas_threads()


def blas_threads() -> int:
    """OpenBLAS's thread count (0 when OpenBLAS is not loaded)."""
    if _lib is None:
        return 0
    try:
        return int(_lib.openblas_get_num_threads())
    except AttributeError:  # a build without the getter
        return 0
