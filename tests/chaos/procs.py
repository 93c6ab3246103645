"""Darkbloom roles as real processes for chaos, retention and soak runs.

`Daemon` starts `python -m darkbloom ...` in its own session with its own environment, copies
every output line to a log file and a queue (read by a thread), and offers `wait_for(regex)`,
`kill()` (SIGKILL, as a crash), `interrupt()` (SIGINT, graceful) and `restart()`.
`write_config` writes a role's darkbloom.toml. Nothing here sleeps to synchronise: readiness
comes from the lines the daemons print or log.
"""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

READY_TIMEOUT_S = 180.0


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without DARKBLOOM_* variables, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DARKBLOOM_")}
    if os.environ.get("CHAOS_PYTHONPATH"):  # diagnosis runs: e.g. a sitecustomize that patches a library
        env["PYTHONPATH"] = os.environ["CHAOS_PYTHONPATH"]
    env.update(extra)
    return env


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(type(value))


def write_config(path: Path, *, models: list[dict[str, str]] = (), **sections: dict[str, Any]) -> Path:
    """A darkbloom.toml with the given sections and `[[inference.models]]` entries."""
    lines: list[str] = []
    for name, values in sections.items():
        lines.append(f"[{name}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in values.items()]
        lines.append("")
    for m in models:
        lines.append("[[inference.models]]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in m.items()]
        lines.append("")
    path.write_text("\n".join(lines))
    return path


class Daemon:
    """One `python -m darkbloom` process (see the module docstring)."""

    def __init__(self, name: str, args: list[str], *, env: dict[str, str], log_dir: Path) -> None:
        self.name = name
        self.args = args
        self.env = env
        self.log_dir = log_dir
        self.starts = 0
        self.proc: subprocess.Popen[str] | None = None
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.output: list[str] = []
        self._pump: threading.Thread | None = None
        self.start()

    @property
    def log_path(self) -> Path:
        return self.log_dir / f"{self.name}.{self.starts}.log"

    def start(self) -> None:
        self.starts += 1
        self.lines = queue.Queue()
        self.output = []
        log = open(self.log_path, "w")  # noqa: SIM115 - closed by the pump thread
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "darkbloom", *self.args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, env=self.env, start_new_session=True,
        )
        self._pump = threading.Thread(target=self._run_pump, args=(self.proc, self.lines, log), daemon=True)
        self._pump.start()

    @staticmethod
    def _run_pump(proc: subprocess.Popen[str], lines: queue.Queue[str | None], log: Any) -> None:
        assert proc.stdout is not None
        with proc.stdout, log:
            for line in proc.stdout:
                log.write(line)
                log.flush()
                lines.put(line)
        lines.put(None)

    def mark(self) -> int:
        """A position in the output read so far, for `wait_for(..., after=mark)`."""
        return len(self.output)

    def wait_for(self, pattern: str, timeout: float = READY_TIMEOUT_S, *, after: int | None = None) -> re.Match[str]:
        """The first output line matching `pattern`: a new one, or one read since `after`
        (AssertionError on exit or timeout)."""
        regex = re.compile(pattern)
        if after is not None:
            for line in self.output[after:]:
                if m := regex.search(line):
                    return m
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"{self.name}: no line matching {pattern!r} within {timeout:.0f}s:\n"
                                     + "".join(self.output[-40:])) from None
            if line is None:
                self.lines.put(None)
                raise AssertionError(f"{self.name} exited before {pattern!r}:\n" + "".join(self.output[-40:]))
            self.output.append(line)
            if m := regex.search(line):
                return m

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def kill(self) -> None:
        """SIGKILL the whole process group: a crash, no cleanup of any kind."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=30)
        if self._pump is not None:
            self._pump.join(timeout=30)

    def interrupt(self, timeout: float = 60) -> int:
        """SIGINT and wait (graceful stop); SIGKILL if it does not stop in time."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self.kill()  # the group: nothing left behind
        return self.proc.returncode

    def restart(self) -> None:
        self.kill()
        self.start()


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True
