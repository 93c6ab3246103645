"""No prompt or output retention: a whole `darkbloom -v up` session (relay, two nodes, shim, ledger;
debug logging on) serves canary prompts through every endpoint, stops with Ctrl-C, and then
no file under its data dir, its temp dir, the models dir, the system temp dirs or its log
holds the canary, or the answers it gave.
"""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

import openai
import pytest

from chaos.procs import Daemon, clean_env  # tests/chaos (pytest puts tests/ on sys.path)

pytestmark = pytest.mark.slow

SCAN_LIMIT_BYTES = 64 << 20


def _files(root: Path, since: float | None = None):
    for dirpath, _, names in os.walk(root, onerror=lambda e: None):
        for name in names:
            path = Path(dirpath) / name
            try:
                st = path.lstat()
            except OSError:
                continue
            if not path.is_file() or path.is_symlink() or st.st_size > SCAN_LIMIT_BYTES:
                continue
            if since is not None and st.st_mtime < since:
                continue
            yield path


def _holding(roots: list[tuple[Path, float | None]], needles: list[bytes]) -> list[str]:
    found = []
    for root, since in roots:
        for path in _files(root, since):
            try:
                data = path.read_bytes()
            except OSError:
                continue
            for needle in needles:
                if needle in data:
                    found.append(f"{path}: {needle[:40]!r}")
    return found


def test_a_full_up_session_leaves_no_canary_anywhere(tmp_path, bundled_models_dir):
    canary = f"canary-{uuid.uuid4().hex}-do-not-keep"
    data, tmp, logs = tmp_path / "data", tmp_path / "tmp", tmp_path / "logs"
    for d in (data, tmp, logs):
        d.mkdir()
    started = time.time()
    env = clean_env(TMPDIR=str(tmp), DARKBLOOM_INFERENCE_MODELS_DIR=str(bundled_models_dir),
                    DARKBLOOM_INFERENCE_SELF_BENCHMARK="false")
    up = Daemon("up", ["-v", "--data-dir", str(data), "up", "--port", "0"], env=env, log_dir=logs)
    answers: list[str] = []
    try:
        base_url = up.wait_for(r"base_url: (http://\S+/v1)").group(1)
        up.wait_for(r"Press Ctrl-C to stop")
        client = openai.OpenAI(base_url=base_url, api_key="local", timeout=120, max_retries=0)
        ask = [{"role": "user", "content": f"Remember this code: {canary}. What is the code?"}]
        r = client.chat.completions.create(model="smollm2-135m-instruct", messages=ask, max_tokens=24, temperature=0)
        answers.append(r.choices[0].message.content)
        stream = client.chat.completions.create(model="smollm2-135m-instruct", messages=ask, max_tokens=24, stream=True,
                                                stream_options={"include_usage": True})
        answers.append("".join(c.choices[0].delta.content or "" for c in stream if c.choices))
        c = client.completions.create(model="smollm2-135m-instruct", prompt=f"The secret is {canary} and", max_tokens=16)
        answers.append(c.choices[0].text)
        e = client.embeddings.create(model="all-minilm-l6-v2", input=[canary, f"{canary} again"])
        assert len(e.data) == 2
        j = client.chat.completions.create(model="smollm2-135m-instruct", messages=ask, max_tokens=24,
                                           response_format={"type": "json_object"})
        answers.append(j.choices[0].message.content or "")
        with pytest.raises(openai.BadRequestError):  # the error path must not echo the prompt into logs either
            client.chat.completions.create(model="smollm2-135m-instruct", messages=ask, temperature=99)
        client.close()
    finally:
        code = up.interrupt(timeout=60)
    assert code == 0, "".join(up.output[-30:])
    log_text = up.log_path.read_text()
    assert "DEBUG" in log_text and "chatcmpl-" in log_text  # debug logging was on and requests were logged
    assert any(a.strip() for a in answers)
    needles = [canary.encode(), canary.encode("utf-16-le"), canary[7:23].encode()]
    needles += [a.strip().encode() for a in answers if len(a.strip()) >= 12]  # outputs are private too
    roots = [(data, None), (tmp, None), (logs, None), (bundled_models_dir, started),
             (Path("/tmp"), started), (Path("/dev/shm"), started), (Path.home() / ".cache", started)]
    control = tmp_path / "control"
    control.mkdir()
    (control / "f.bin").write_bytes(b"x" * 100 + canary.encode() + b"y")
    assert _holding([(control, None)], needles), "the scanner must find a planted canary"
    (control / "f.bin").unlink()
    leaks = _holding(roots, needles)
    assert not leaks, "\n".join(leaks)
    assert (data / "up" / "relay").is_dir() and any(_files(data))  # the session did write its state
