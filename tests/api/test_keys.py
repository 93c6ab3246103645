"""Hosted mode: hashed keys in SQLite, 401/429 through the openai SDK, usage per key, TLS.

The backend is `FakeEngineBackend`: these tests are about keys and limits, not inference.
"""

from __future__ import annotations

import sqlite3
import ssl

import httpx
import openai
import pytest
import trio

from darkbloom.api.keys import KeyAuthenticator, KeyStore
from darkbloom.api.limits import KeyLimits, RateLimiter

from .fakes import FakeEngineBackend
from .harness import running_shim

MSG = [{"role": "user", "content": "hi"}]


class ManualClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_keys_are_stored_hashed_and_verify(tmp_path):
    store = KeyStore(tmp_path)
    full, key = store.create_sync("alice", limits=KeyLimits(requests_per_min=3))
    assert full.startswith(f"dbk-{key.id}-")
    secret = full.split("-", 2)[2]
    raw = sqlite3.connect(tmp_path / "keys.sqlite3").execute("SELECT * FROM api_keys").fetchall()
    assert secret.encode() not in repr(raw).encode() and secret not in repr(raw)
    assert store.verify_sync(full).id == key.id
    assert store.verify_sync(full[:-1] + ("A" if full[-1] != "A" else "B")) is None
    assert store.verify_sync("sk-not-ours") is None
    assert len(key.account) == 64 and key.payer is not None and key.payer.public_key.hex() == key.account
    assert store.revoke_sync(key.id) and not store.revoke_sync(key.id)
    assert store.verify_sync(full) is None
    assert [k.revoked_at is not None for k in store.list_sync()] == [True]
    store.close()


def test_rate_limiter_windows():
    rl = RateLimiter()
    limits = KeyLimits(requests_per_min=2, tokens_per_min=100)
    assert rl.check("k", limits, 10, 0.0) is None
    assert rl.check("k", limits, 10, 1.0) is None
    what, wait = rl.check("k", limits, 10, 2.0)
    assert what == "requests per minute" and wait == pytest.approx(58.0)
    assert rl.check("k", limits, 10, 60.5) is None  # the first request left the window
    rl.spend("k", 95, 61.0)
    what, wait = rl.check("k", limits, 10, 62.0)
    assert what == "tokens per minute" and wait == pytest.approx(59.0)
    assert rl.check("other", limits, 10, 62.0) is None  # per key


async def test_hosted_keys_through_http(tmp_path):
    store = KeyStore(tmp_path)
    good, key = store.create_sync("app", limits=KeyLimits(requests_per_min=2))
    small, small_key = store.create_sync("tiny-quota", limits=KeyLimits(quota_tokens=10))
    clock = ManualClock()
    auth = KeyAuthenticator(store, clock=clock)
    with trio.fail_after(30):
        async with running_shim(FakeEngineBackend(), auth=auth, require_api_key=True) as url:
            async def ask(api_key: str):
                async with openai.AsyncOpenAI(base_url=url, api_key=api_key, max_retries=0) as c:
                    return await c.chat.completions.create(model="fake-chat", messages=MSG)

            async with httpx.AsyncClient() as http:  # the SDK refuses to send no key at all
                missing = await http.get(url + "/models")
            assert missing.status_code == 401 and missing.json()["error"]["code"] == "invalid_api_key"
            with pytest.raises(openai.AuthenticationError):
                await ask(good[:-2] + "xx")
            assert (await ask(good)).usage.total_tokens == 13
            await ask(good)
            with pytest.raises(openai.RateLimitError) as limited:
                await ask(good)
            assert limited.value.body["code"] == "rate_limit_exceeded"
            assert int(limited.value.response.headers["retry-after"]) >= 1
            clock.now += 61
            await ask(good)  # the window moved on

            await ask(small)  # 13 tokens: over the 10-token quota afterwards
            with pytest.raises(openai.RateLimitError) as quota:
                await ask(small)
            assert quota.value.body["code"] == "insufficient_quota"

            store.revoke_sync(key.id)
            clock.now += 11  # past the revocation re-check interval
            with pytest.raises(openai.AuthenticationError):
                await ask(good)
    usage = store.usage_sync(key.id)
    assert usage == {"fake-chat": (3, 21, 18)}
    assert store.usage_sync(small_key.id) == {"fake-chat": (1, 7, 6)}
    store.close()


async def test_hosted_mode_serves_tls(tmp_path):
    cert, keyfile = tmp_path / "cert.pem", tmp_path / "key.pem"
    await trio.run_process(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", str(keyfile), "-out", str(cert), "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1"], capture_stdout=True, capture_stderr=True)
    store = KeyStore(tmp_path / "shim")
    full, _ = store.create_sync("tls")
    context = ssl.create_default_context(cafile=str(cert))
    with trio.fail_after(30):
        async with running_shim(FakeEngineBackend(), auth=KeyAuthenticator(store), hosted=True,
                                tls_cert=str(cert), tls_key=str(keyfile)) as url:
            assert url.startswith("https://")
            async with openai.AsyncOpenAI(base_url=url, api_key=full, max_retries=0,
                                          http_client=openai.DefaultAsyncHttpxClient(verify=context)) as client:
                r = await client.chat.completions.create(model="fake-chat", messages=MSG)
    assert r.choices[0].message.content
    store.close()


async def test_a_list_of_prompts_that_fails_counts_no_usage_for_the_key(tmp_path):
    """/v1/completions with two prompts: the first is answered, the second's node dies (on every
    retry). The client gets an error and no answer, so the key is charged nothing; when both are
    answered, both count."""
    from darkbloom.errors import StreamClosed

    first_done = trio.Event()

    class FakeEngineBackendSecondPromptDies(FakeEngineBackend):
        async def open_session(self, request, hints, *, exclude=frozenset()):
            session = await super().open_session(request, hints, exclude=exclude)
            if "second" not in str(request.params.get("prompt")):
                original = session.receive

                async def receive_then_mark():
                    frame = await original()
                    if frame is None:
                        first_done.set()
                    return frame

                session.receive = receive_then_mark
                return session

            async def die_after_the_first_is_answered():
                await first_done.wait()
                raise StreamClosed(session.node_id, "fake node died")

            session.receive = die_after_the_first_is_answered
            return session

    store = KeyStore(tmp_path)
    secret, key = store.create_sync("app")
    auth = KeyAuthenticator(store, clock=ManualClock())
    with trio.fail_after(30):
        async with running_shim(FakeEngineBackendSecondPromptDies(), auth=auth, require_api_key=True) as url, \
                openai.AsyncOpenAI(base_url=url, api_key=secret, max_retries=0) as client:
            with pytest.raises(openai.APIStatusError) as failed:
                await client.completions.create(model="fake-chat", prompt=["first prompt", "second prompt"])
            assert failed.value.status_code == 503 and failed.value.body["code"] == "providers_failed"
            assert first_done.is_set()  # the first part was answered before the failure
            assert store.usage_sync(key.id) == {}
            ok = await client.completions.create(model="fake-chat", prompt=["first prompt", "another first"])
            assert len(ok.choices) == 2
    assert store.usage_sync(key.id) == {"fake-chat": (1, ok.usage.prompt_tokens, ok.usage.completion_tokens)}
    store.close()
