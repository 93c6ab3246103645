"""Build MLX's fused CPU kernels for this machine's CPU instead of baseline x86-64.

mlx-cpu compiles the element-wise chains that `mx.compile` fuses (mlx-lm's `swiglu` in every
MLP, for one) by running `g++ -std=c++17 -O3 -Wall -fPIC -shared` found on PATH, and caches
each library under `$TMPDIR/mlx/<version>/cpu`. Without `-march` the compiler targets baseline
x86-64: the kernels run one float at a time and each fused multiply-add is a call into libm
(`__fmaf_fma3` and `simd::exp<float, 1>` were 17 % of a prefill profile).

`use_native_jit()` makes a private temporary directory (`$TMPDIR/darkbloom-mlx-<uid>-<cpu>`,
mode 0700) holding a `g++` that adds `-march=native -ffp-contract=off` before the real compiler, puts it
first on PATH and points TMPDIR at that directory, so MLX's kernel cache for these kernels is
ours alone: it never loads a library another MLX process built with other flags, and never
hands ours to one. The directory name carries a digest of the CPU model, its flags and the
compiler's version. `-ffp-contract=off` forbids multiply-adds the source did not write, so the
results are bitwise those of the stock build (tests/inference/test_cpujit.py checks logits).

Measured (2 cores of an AMD EPYC with AVX-512, 16 prompts of 69 tokens): prefill 1.23-1.31x
faster on the random 20M model and 1.22-1.27x on SmolLM2; mlx-lm's raw `BatchGenerator` at 16
requests of 48 tokens went from 339-422 to 455-470 tokens/s. See docs/BENCHMARKS.md.

It must run before MLX compiles its first kernel; `blas.ensure_blas` calls it before MLX is
imported. macOS needs none of this (Metal kernels), and without a `g++` MLX does not compile
at all, so both leave everything as it was.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

__all__ = ["FLAGS", "use_native_jit", "jit_status", "stock_env"]

log = logging.getLogger(__name__)

FLAGS = ("-march=native", "-ffp-contract=off")

_status = "not checked"
_saved: dict[str, str | None] = {}  # PATH and TMPDIR without our changes


def jit_status() -> str:
    """What `use_native_jit` did, for status pages and benchmarks."""
    return _status


def _cpu_signature(compiler: str) -> str:
    """A short digest of what the kernels are built for: CPU model and flags, compiler version."""
    parts = [sys.platform, os.uname().machine]
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key = line.split(":", 1)[0].strip()
                if key in ("model name", "flags", "Features", "CPU part"):
                    parts.append(line.strip())
                if line.strip() == "":  # the first processor's block is enough
                    break
    except OSError:
        pass
    try:
        out = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30)
        parts.append(out.stdout.splitlines()[0] if out.stdout else "")
    except (OSError, subprocess.SubprocessError):
        parts.append("?")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:12]


def _private_dir(path: Path) -> bool:
    """Make `path` a directory only we can use, or say it is not one (someone else's, a symlink)."""
    try:
        path.mkdir(mode=0o700, exist_ok=True)
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() and stat.S_IMODE(st.st_mode) & 0o077 == 0


def _flags_work(compiler: str) -> bool:
    """Whether the compiler takes our flags (a compiler too old for -march=native would make
    every MLX kernel build fail)."""
    try:
        out = subprocess.run([compiler, *FLAGS, "-std=c++17", "-x", "c++", "-fsyntax-only", "-"],
                             input="int main() { return 0; }\n", capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return False
    return out.returncode == 0


def _private_name(name: str) -> bool:
    """The name of a directory `use_native_jit` makes (for this user)."""
    return name.startswith(f"darkbloom-mlx-{os.getuid()}-")


def _ours(entry: str) -> bool:
    """A PATH entry holding our wrapper (inherited from a darkbloom parent process)."""
    p = Path(entry)
    return p.name == "bin" and _private_name(p.parent.name)


def _runs(program: Path) -> bool:
    try:
        return subprocess.run([str(program), "--version"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def use_native_jit(enabled: bool = True) -> str:
    """Have MLX build its CPU kernels for this CPU (see the module docstring); return what happened.

    "on <dir>", "disabled", "not needed" (not Linux), "no compiler" (MLX will not compile
    either), "flags refused" (the compiler rejects -march=native), "no private directory" or
    "wrapper cannot run".
    Only the first call acts. A process started by one that did this inherits the wrapper and
    the kernel directory and keeps them.
    """
    global _status
    if _status != "not checked":
        return _status
    path = [p for p in os.environ.get("PATH", "").split(os.pathsep) if not _ours(p)]
    tmp = Path(os.environ.get("TMPDIR") or "/tmp")
    inherited = _private_name(tmp.name)
    stock_tmp = str(tmp.parent) if inherited else os.environ.get("TMPDIR")
    if enabled and inherited and _private_dir(tmp) and (tmp / "bin" / "g++").is_file():
        # A parent set this up and checked compiler, flags and wrapper: keep it (saves ~0.1 s of
        # compiler runs in every child process).
        _saved.update(PATH=os.pathsep.join(path), TMPDIR=stock_tmp)
        os.environ["PATH"] = os.pathsep.join([str(tmp / "bin"), *path])
        _status = f"on {tmp}"
        return _status
    if not enabled:
        _status = "disabled"
    elif not sys.platform.startswith("linux"):
        _status = "not needed"
    elif (compiler := shutil.which("g++", path=os.pathsep.join(path))) is None:
        _status = "no compiler"
    elif not _flags_work(compiler):
        _status = "flags refused"
        log.warning("g++ refuses %s; MLX's CPU kernels stay built for baseline x86-64", " ".join(FLAGS))
    else:
        name = f"darkbloom-mlx-{os.getuid()}-{_cpu_signature(compiler)}"
        root = (tmp.parent if inherited else tmp) / name
        bin_dir = root / "bin"
        if not (_private_dir(root) and _private_dir(bin_dir)):
            _status = "no private directory"
            log.warning("cannot use %s as a private directory; MLX's CPU kernels stay generic", root)
            return _status
        wrapper = bin_dir / "g++"
        script = f"#!/bin/sh\nexec '{compiler}' {' '.join(FLAGS)} \"$@\"\n"
        try:
            if not wrapper.exists() or wrapper.read_text() != script:
                staged = bin_dir / f".g++.{os.getpid()}"
                staged.write_text(script)
                staged.chmod(0o700)
                staged.replace(wrapper)
        except OSError as exc:
            _status = "no private directory"
            log.warning("cannot write %s (%s); MLX's CPU kernels stay generic", wrapper, exc)
            return _status
        if not _runs(wrapper):  # e.g. a noexec $TMPDIR: MLX would fail every kernel build
            _status = "wrapper cannot run"
            log.warning("cannot run %s (is %s mounted noexec?); MLX's CPU kernels stay generic", wrapper, root)
            return _status
        _saved.update(PATH=os.pathsep.join(path), TMPDIR=stock_tmp)
        os.environ["PATH"] = os.pathsep.join([str(bin_dir), *path])
        os.environ["TMPDIR"] = str(root)
        _status = f"on {root}"
        log.debug("MLX CPU kernels are built with %s in %s", " ".join(FLAGS), root)
        return _status
    if inherited:  # told not to (or cannot) here, though a parent did: stock kernels, stock cache
        _saved.update(PATH=os.pathsep.join(path), TMPDIR=stock_tmp)
        os.environ["PATH"] = os.pathsep.join(path)
        if stock_tmp is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = stock_tmp
    return _status


def stock_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """`env` (default: this process's) without what `use_native_jit` changed: for starting a
    program, such as a reference server in a benchmark, exactly as it runs elsewhere."""
    out = dict(os.environ if env is None else env)
    out["PATH"] = os.pathsep.join(p for p in out.get("PATH", "").split(os.pathsep) if not _ours(p))
    tmp = out.get("TMPDIR")
    if tmp and _private_name(Path(tmp).name):
        stock = _saved.get("TMPDIR") if _saved else str(Path(tmp).parent)
        if stock is None:
            out.pop("TMPDIR")
        else:
            out["TMPDIR"] = stock
    return out
