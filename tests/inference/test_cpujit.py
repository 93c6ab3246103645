"""MLX's CPU kernels built for this CPU (inference/cpujit.py): same numbers, our own kernel cache, stock env for others."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from darkbloom.inference.cpujit import jit_status, stock_env

needs_gxx = pytest.mark.skipif(
    not sys.platform.startswith("linux") or shutil.which("g++") is None,
    reason="MLX compiles CPU kernels only on Linux with g++ (install g++: scripts/system-deps.sh)",
)

# One prefill and one decode step of a real (random-weight) llama: every MLP runs mlx-lm's
# compiled swiglu, so MLX builds at least one CPU kernel. Prints the JIT status line.
SCRIPT = r"""
import sys
from darkbloom.inference.blas import ensure_blas
from darkbloom.inference.cpujit import jit_status
ensure_blas(native_jit=sys.argv[2] == "native")
import numpy as np
import mlx.core as mx
from mlx_lm import load
from mlx_lm.models.cache import make_prompt_cache
model, _ = load(sys.argv[1])
cache = make_prompt_cache(model)
x = mx.array([[(i * 7 + j * 13) % 1000 + 5 for j in range(24)] for i in range(4)])
first = model(x, cache=cache)
step = model(mx.array([[9]] * 4), cache=cache)
np.save(sys.argv[3], np.concatenate([np.array(first).ravel(), np.array(step).ravel()]))
print(jit_status())
"""


def run_script(model_dir: Path, mode: str, out: Path, tmpdir: Path) -> str:
    env = stock_env()
    env["TMPDIR"] = str(tmpdir)
    tmpdir.mkdir()
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(model_dir), mode, str(out)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip().splitlines()[-1]


def kernels(root: Path) -> list[Path]:
    return sorted(root.glob("**/mlx/*/cpu/*.so"))


@needs_gxx
def test_native_kernels_give_bitwise_the_same_logits_from_a_cache_of_their_own(tiny_model_dir, tmp_path) -> None:
    stock_tmp, native_tmp = tmp_path / "stock", tmp_path / "native"
    assert run_script(tiny_model_dir, "stock", tmp_path / "stock.npy", stock_tmp) == "disabled"
    status = run_script(tiny_model_dir, "native", tmp_path / "native.npy", native_tmp)
    assert status.startswith(f"on {native_tmp}/darkbloom-mlx-{os.getuid()}-"), status
    private = Path(status.removeprefix("on "))

    stock, native = np.load(tmp_path / "stock.npy"), np.load(tmp_path / "native.npy")
    assert stock.size > 0 and np.array_equal(stock, native)  # bitwise: no contraction the source did not write

    # Each build went to its own cache: the stock one to $TMPDIR/mlx, ours to the private dir.
    assert kernels(stock_tmp) and all(private not in k.parents for k in kernels(stock_tmp))
    ours = kernels(private)
    assert ours and set(ours) == set(kernels(native_tmp))
    assert (private.stat().st_mode & 0o077) == 0
    wrapper = (private / "bin" / "g++").read_text()
    assert "-march=native" in wrapper and "-ffp-contract=off" in wrapper


@needs_gxx
def test_native_kernels_use_the_cpu_s_vector_instructions(tiny_model_dir, tmp_path) -> None:
    """What the flags are for: the stock kernels call libm's fmaf for each element, ours do not."""
    objdump = shutil.which("objdump")
    if objdump is None:
        pytest.skip("objdump (binutils) is needed to read the kernels")
    run_script(tiny_model_dir, "stock", tmp_path / "a.npy", tmp_path / "stock")
    run_script(tiny_model_dir, "native", tmp_path / "b.npy", tmp_path / "native")

    def calls_fmaf(lib: Path) -> bool:
        text = subprocess.run([objdump, "-d", str(lib)], capture_output=True, text=True, check=True).stdout
        return "<fmaf@plt>" in text

    stock, native = kernels(tmp_path / "stock"), kernels(tmp_path / "native")
    assert stock and native
    assert any(calls_fmaf(k) for k in stock)
    assert not any(calls_fmaf(k) for k in native)


def test_stock_env_takes_back_only_what_the_jit_setup_changed(monkeypatch) -> None:
    env = stock_env()
    status = jit_status()
    if status.startswith("on "):  # this test process runs with the native kernels (conftest)
        private = status.removeprefix("on ")
        assert os.environ["TMPDIR"] == private
        assert os.environ["PATH"].split(os.pathsep)[0] == f"{private}/bin"
        assert env.get("TMPDIR") != private
        assert f"{private}/bin" not in env["PATH"].split(os.pathsep)
        assert os.environ["PATH"].split(os.pathsep)[1:] == env["PATH"].split(os.pathsep)
    else:
        assert env == dict(os.environ)
    monkeypatch.setenv("DARKBLOOM_SOMETHING", "kept")
    assert stock_env()["DARKBLOOM_SOMETHING"] == "kept"


@needs_gxx
def test_a_child_process_keeps_its_parent_s_kernel_directory(tmp_path) -> None:
    """A darkbloom process started by one with native kernels (a node started by `darkbloom up`,
    a benchmark's roles) uses the same wrapper and kernel cache, and does not nest or repeat them;
    told not to, it goes back to the stock setup."""
    script = ("import os; from darkbloom.inference.cpujit import use_native_jit, stock_env; import sys; "
              "print(use_native_jit(sys.argv[1] == 'on')); print(os.environ['PATH']); print(os.environ.get('TMPDIR', '-')); "
              "print(stock_env().get('TMPDIR', '-'))")
    env = dict(stock_env(), TMPDIR=str(tmp_path))

    def run(mode: str, env: dict[str, str]) -> list[str]:
        done = subprocess.run([sys.executable, "-c", script, mode], env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout.strip().splitlines()

    status, path, tmpdir, stock_tmp = run("on", env)
    assert status.startswith(f"on {tmp_path}/darkbloom-mlx-"), status
    private = status.removeprefix("on ")
    assert tmpdir == private and stock_tmp == str(tmp_path)
    child_env = dict(env, PATH=path, TMPDIR=tmpdir)  # what the parent's children inherit
    status2, path2, tmpdir2, stock_tmp2 = run("on", child_env)
    assert status2 == status and tmpdir2 == private and stock_tmp2 == str(tmp_path)
    assert path2.split(os.pathsep).count(f"{private}/bin") == 1 and path2 == path
    status3, path3, tmpdir3, _ = run("off", child_env)
    assert status3 == "disabled" and tmpdir3 == str(tmp_path) and f"{private}/bin" not in path3.split(os.pathsep)
