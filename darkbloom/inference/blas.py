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

__all__ = ["OPENBLAS_PATHS", "ensure_blas", "blas_status"]

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


def ensure_blas(enabled: bool = True) -> str:
    """Load OpenBLAS globally before the first `import mlx.core`; return what happened.

    Returns "loaded <path>", "not needed" (macOS: MLX uses Accelerate/Metal), "disabled",
    "missing" or "too late" (mlx was already imported, so loading it now would not help).
    Only the first call acts; later calls return the same status.
    """
    global _done, _status
    with _lock:
        if _done:
            return _status
        _done = True
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
                    ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
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
