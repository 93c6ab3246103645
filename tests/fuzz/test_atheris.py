"""Runs the atheris (libFuzzer, coverage-guided) harness `atheris_wire.py` for a bounded number
of inputs in a subprocess: libFuzzer exits non-zero and prints the input on any crash."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

HARNESS = Path(__file__).with_name("atheris_wire.py")
RUNS = 200_000


def test_atheris_finds_no_crash_in_the_wire_decoders(tmp_path):
    pytest.importorskip("atheris", reason="atheris is in the test extra on Linux only")
    seeds = tmp_path / "corpus"
    seeds.mkdir()
    from darkbloom.wire.codec import encode, encode_frame
    from darkbloom.wire.infer import InferRequest, NodeLoad, StatusReply
    from darkbloom.wire.ledger import EpochQuery

    examples = [InferRequest(request_id="r", kind="chat", model="m", params={"messages": [{"role": "user"}]}),
                StatusReply(version="1", protocol="1.0.0", load=NodeLoad(active=0, queued=0, max_concurrent=1)),
                EpochQuery(epoch=7)]
    for i, msg in enumerate(examples):  # valid encodings give libFuzzer somewhere to start
        (seeds / f"body{i}").write_bytes(encode(msg) + bytes([i]))
        (seeds / f"frame{i}").write_bytes(encode_frame(msg) + bytes([i]))
    before = len(list(seeds.iterdir()))
    proc = subprocess.run(
        [sys.executable, str(HARNESS), f"-atheris_runs={RUNS}", "-max_len=2048", "-seed=1234", str(seeds)],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert f"Done {RUNS} runs" in proc.stderr or f"Done {RUNS} in" in proc.stderr, proc.stderr[-2000:]
    assert len(list(seeds.iterdir())) > before, "libFuzzer found no new coverage: the harness is not reaching the code"
