"""The shim's HTTP surface through real HTTP with the official openai SDK (sync and async).

The backend here is `FakeEngineBackend`: these tests are about OpenAI wire shape, errors
and cancellation at the HTTP layer; real nodes and a real engine are in test_e2e_*.py.
"""

from __future__ import annotations

import base64
import json
import struct

import httpx
import openai
import pytest
import trio

from darkbloom.metrics import ShimMetrics as Metrics

from .fakes import FAKE_DIGEST, FakeEngineBackend
from .harness import running_shim

MSG = [{"role": "user", "content": "hi"}]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]


def sync_client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url, api_key="local", max_retries=0)


async def test_chat_sync_and_async_non_streaming():
    backend = FakeEngineBackend()
    with trio.fail_after(30):
        async with running_shim(backend) as url:
            with sync_client(url) as client:
                r = await trio.to_thread.run_sync(
                    lambda: client.chat.completions.with_raw_response.create(model="fake-chat", messages=MSG))
            completion = r.parse()
            assert completion.choices[0].message.content == "Hello from the fake engine."
            assert completion.choices[0].finish_reason == "stop"
            assert completion.usage.prompt_tokens == 7 and completion.usage.completion_tokens == 6
            assert completion.system_fingerprint.endswith(FAKE_DIGEST[:16])
            assert r.headers["x-darkbloom-node"] == backend.sessions[0].node_id
            assert r.headers["x-darkbloom-route"] == "direct"
            async with openai.AsyncOpenAI(base_url=url, api_key="local", max_retries=0) as client:
                c2 = await client.chat.completions.create(model="fake-chat", messages=MSG, n=2, max_tokens=2)
            assert [c.message.content for c in c2.choices] == ["Hello from", "Hello from"]
            assert [c.finish_reason for c in c2.choices] == ["length", "length"]
            assert c2.usage.completion_tokens == 4
    # the shim forwards the OpenAI params and keeps its own fields to itself
    assert "stream" not in backend.requests[0].params and backend.requests[0].params["messages"] == MSG


async def test_streaming_with_usage_async_and_sync():
    with trio.fail_after(30):
        async with running_shim(FakeEngineBackend()) as url:
            async with openai.AsyncOpenAI(base_url=url, api_key="local", max_retries=0) as client:
                stream = await client.chat.completions.create(
                    model="fake-chat", messages=MSG, stream=True, stream_options={"include_usage": True})
                chunks = [c async for c in stream]
            assert chunks[0].choices[0].delta.role == "assistant"
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            assert text == "Hello from the fake engine."
            finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
            assert finals == ["stop"]
            assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6
            assert all(c.usage is None for c in chunks[:-1])

            def sync_stream():
                with sync_client(url) as client, \
                        client.completions.create(model="fake-chat", prompt="hi", stream=True) as s:
                    return list(s)

            pieces = await trio.to_thread.run_sync(sync_stream)
            assert "".join(p.choices[0].text for p in pieces) == "Hello from the fake engine."
            assert pieces[-1].choices[0].finish_reason == "stop"


async def test_raw_sse_bytes_match_openai_framing():
    with trio.fail_after(30):
        async with running_shim(FakeEngineBackend()) as url:
            async with httpx.AsyncClient() as http:
                r = await http.post(url + "/chat/completions", json={"model": "fake-chat", "messages": MSG, "stream": True})
    assert r.headers["content-type"].startswith("text/event-stream")
    events = r.text.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    for e in events[:-2]:
        assert e.startswith("data: {") and "\n" not in e
        assert json.loads(e[6:])["object"] == "chat.completion.chunk"


@pytest.mark.parametrize("tool_choice", ["auto", "required", {"type": "function", "function": {"name": "get_weather"}}])
async def test_tool_calls_streamed_and_not(tool_choice):
    backend = FakeEngineBackend()
    with trio.fail_after(30):
        async with running_shim(backend) as url:
            async with openai.AsyncOpenAI(base_url=url, api_key="local", max_retries=0) as client:
                r = await client.chat.completions.create(model="fake-chat", messages=MSG, tools=TOOLS,
                                                         tool_choice=tool_choice)
                stream = await client.chat.completions.create(model="fake-chat", messages=MSG, tools=TOOLS,
                                                              tool_choice=tool_choice, stream=True)
                chunks = [c async for c in stream]
    call = r.choices[0].message.tool_calls[0]
    assert r.choices[0].finish_reason == "tool_calls" and r.choices[0].message.content is None
    assert call.id == "call_0" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    deltas = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert deltas[0].function.name == "get_weather" and deltas[0].index == 0
    assert "".join(d.function.arguments or "" for d in deltas) == '{"city": "Paris"}'
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert backend.requests[0].params["tool_choice"] == tool_choice


async def test_tool_choice_none_and_json_mode():
    with trio.fail_after(30):
        async with running_shim(FakeEngineBackend()) as url:
            async with openai.AsyncOpenAI(base_url=url, api_key="local", max_retries=0) as client:
                r = await client.chat.completions.create(model="fake-chat", messages=MSG, tools=TOOLS, tool_choice="none")
                j = await client.chat.completions.create(model="fake-chat", messages=MSG,
                                                         response_format={"type": "json_object"})
    assert r.choices[0].message.tool_calls is None and r.choices[0].message.content
    assert json.loads(j.choices[0].message.content) == {"answer": "yes"}


async def test_embeddings_float_and_base64():
    with trio.fail_after(30):
        async with running_shim(FakeEngineBackend()) as url:
            async with openai.AsyncOpenAI(base_url=url, api_key="local", max_retries=0) as client:
                one = await client.embeddings.create(model="fake-embed", input="abc", encoding_format="float")
                many = await client.embeddings.create(model="fake-embed", input=["a", "bcd"])  # SDK asks base64
            async with httpx.AsyncClient() as http:
                raw = (await http.post(url + "/embeddings", json={"model": "fake-embed", "input": ["a", "bcd"],
                                                                  "encoding_format": "base64"})).json()
    assert one.data[0].embedding == [0.0, 0.5, -0.25, 3.0]
    assert [d.embedding for d in many.data] == [[0.0, 0.5, -0.25, 1.0], [1.0, 0.5, -0.25, 3.0]]
    assert many.usage.prompt_tokens == 6
    assert struct.unpack("<4f", base64.b64decode(raw["data"][1]["embedding"])) == (1.0, 0.5, -0.25, 3.0)


async def test_models_list_and_get():
    with trio.fail_after(30):
        async with running_shim(FakeEngineBackend()) as url:
            with sync_client(url) as client:
                models = await trio.to_thread.run_sync(lambda: client.models.list())
                one = await trio.to_thread.run_sync(lambda: client.models.retrieve("fake-chat"))
                with pytest.raises(openai.NotFoundError) as missing:
                    await trio.to_thread.run_sync(lambda: client.models.retrieve("nope"))
    ids = [m.id for m in models.data]
    assert ids == ["fake-chat", "fake-embed"]
    assert one.owned_by == "darkbloom" and one.darkbloom["providers"] == 2
    assert one.darkbloom["price_output_per_m"] == [400, 500]
    assert missing.value.body["code"] == "model_not_found"


async def test_errors_map_to_sdk_exceptions():
    with trio.fail_after(30):
        async with running_shim(FakeEngineBackend(), max_body_bytes=20_000) as url:
            async with openai.AsyncOpenAI(base_url=url, api_key="local", max_retries=0) as client:
                chat = client.chat.completions
                with pytest.raises(openai.BadRequestError) as bad:
                    await chat.create(model="fake-chat", messages=MSG, temperature=7)
                assert bad.value.body["param"] == "temperature"
                with pytest.raises(openai.BadRequestError) as unsupported:
                    await chat.create(model="fake-chat", messages=MSG, extra_body={"audio": {"voice": "x"}})
                assert unsupported.value.body["param"] == "audio"
                # unknown fields are ignored, as OpenAI does
                ok = await chat.create(model="fake-chat", messages=MSG, extra_body={"no_such_field": 1})
                assert ok.choices[0].message.content
                with pytest.raises(openai.BadRequestError) as extra:
                    await chat.create(model="fake-chat", messages=MSG, extra_body={"darkbloom": {"colour": "red"}})
                assert extra.value.body["param"] == "darkbloom.colour"
                with pytest.raises(openai.NotFoundError) as nf:
                    await chat.create(model="no-such-model", messages=MSG)
                assert nf.value.body["code"] == "model_not_found"
                with pytest.raises(openai.InternalServerError) as offline:
                    await chat.create(model="offline-model", messages=MSG)
                assert offline.value.status_code == 503
                assert "no provider for model offline-model" in offline.value.message
                with pytest.raises(openai.InternalServerError) as busy:
                    await chat.create(model="busy-model", messages=MSG)
                assert busy.value.status_code == 503 and busy.value.response.headers["retry-after"] == "2"
                with pytest.raises(openai.APIStatusError) as big:
                    await chat.create(model="fake-chat", messages=[{"role": "user", "content": "x" * 30_000}])
                assert big.value.status_code == 413
            async with httpx.AsyncClient() as http:
                r = await http.post(url + "/chat/completions", content=b"{not json")
                assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
                r = await http.get(url + "/nowhere")
                assert r.status_code == 404 and "error" in r.json()


async def test_node_failure_after_first_byte_is_an_error_event_not_truncation():
    with trio.fail_after(30):
        async with running_shim(FakeEngineBackend(fail_after=3)) as url:
            async with openai.AsyncOpenAI(base_url=url, api_key="local", max_retries=0) as client:
                stream = await client.chat.completions.create(model="fake-chat", messages=MSG, stream=True)
                got = []
                with pytest.raises(openai.APIError) as failed:
                    async for c in stream:
                        got.append(c)
    assert "".join(c.choices[0].delta.content or "" for c in got) == "Hello from the"
    assert failed.value.body["type"] == "server_error"


async def open_raw_stream(url: str, path: str, body: dict) -> trio.SocketStream:
    """POST over a bare socket and read until the first SSE event: a client we can cut off."""
    hostport = url.split("//", 1)[1].split("/", 1)[0]
    host, port = hostport.rsplit(":", 1)
    sock = await trio.open_tcp_stream(host, int(port))
    payload = json.dumps(body).encode()
    await sock.send_all(
        f"POST /v1{path} HTTP/1.1\r\nHost: {hostport}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload
    )
    seen = b""
    while b"data: " not in seen:
        data = await sock.receive_some(4096)
        assert data, "server closed before the first event"
        seen += data
    assert seen.startswith(b"HTTP/1.1 200")
    return sock


async def test_client_disconnect_closes_the_session():
    gate = trio.Event()  # never set: the fake node stalls after its first frame
    backend = FakeEngineBackend(gate=gate)
    metrics = Metrics()
    with trio.fail_after(30):
        async with running_shim(backend, metrics=metrics) as url:
            sock = await open_raw_stream(url, "/chat/completions", {"model": "fake-chat", "messages": MSG, "stream": True})
            assert not backend.sessions[0].closed.is_set()
            await sock.aclose()  # the client goes away mid-stream
            await backend.sessions[0].closed.wait()
            assert metrics.client_disconnects == 1
            async with httpx.AsyncClient() as http:
                text = (await http.get(url.removesuffix("/v1") + "/metrics")).text
    assert 'darkbloom_errors_total{kind="client_disconnect",role="shim"} 1.0' in text


async def test_health_openapi_metrics():
    with trio.fail_after(30):
        async with running_shim(FakeEngineBackend()) as url:
            base = url.removesuffix("/v1")
            async with httpx.AsyncClient() as http:
                health = (await http.get(base + "/health")).json()
                spec = (await http.get(base + "/openapi.json")).json()
                await http.post(url + "/chat/completions", json={"model": "fake-chat", "messages": MSG})
                metrics = (await http.get(base + "/metrics")).text
    assert health["status"] == "ok"
    assert {"/v1/models", "/v1/chat/completions", "/v1/completions", "/v1/embeddings"} <= set(spec["paths"])
    assert 'darkbloom_http_responses_total{endpoint="chat",role="shim",status="200"} 1.0' in metrics
    assert 'darkbloom_requests_total{kind="chat",outcome="ok",role="shim"} 1.0' in metrics
    assert 'darkbloom_model_tokens_total{direction="completion",model="fake-chat",role="shim"} 6.0' in metrics


async def test_a_stalled_node_ends_the_stream_with_an_error_not_a_hang():
    gate = trio.Event()  # never set: the fake node goes quiet after its first frame
    backend = FakeEngineBackend(gate=gate)
    with trio.fail_after(30):
        async with running_shim(backend, first_token_timeout_s=0.5) as url:
            async with openai.AsyncOpenAI(base_url=url, api_key="local", max_retries=0) as client:
                stream = await client.chat.completions.create(model="fake-chat", messages=MSG, stream=True)
                with pytest.raises(openai.APIError) as failed:
                    async for _ in stream:
                        pass
                assert failed.value.body["code"] == "provider_failed"
                # not streamed: nothing reached the client yet, so each stalled node is swapped for
                # another until max_attempts, then a 503 says so
                with pytest.raises(openai.InternalServerError) as gave_up:
                    await client.chat.completions.create(model="fake-chat", messages=MSG)
                assert gave_up.value.status_code == 503 and gave_up.value.body["code"] == "providers_failed"
    assert len(backend.sessions) == 1 + 3
    assert all(s.closed.is_set() for s in backend.sessions)


async def test_a_bug_is_a_500_without_details(caplog):
    class BrokenFakeBackend(FakeEngineBackend):
        async def list_models(self):
            raise RuntimeError("private text that must not leak")

    with trio.fail_after(30):
        async with running_shim(BrokenFakeBackend()) as url:
            async with openai.AsyncOpenAI(base_url=url, api_key="local", max_retries=0) as client:
                with pytest.raises(openai.InternalServerError) as failed:
                    await client.models.list()
    assert failed.value.status_code == 500 and failed.value.body["code"] == "internal_error"
    assert "private text" not in failed.value.message
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "RuntimeError" in logged and "private text" not in logged


async def test_quart_test_client_without_sockets():
    from darkbloom.api.app import create_app

    app = create_app(FakeEngineBackend())
    with trio.fail_after(30):
        async with app.test_app() as test_app:
            client = test_app.test_client()
            r = await client.post("/v1/chat/completions", json={"model": "fake-chat", "messages": MSG, "n": 2})
            body = await r.get_json()
            spec = await (await client.get("/openapi.json")).get_json()
            missing = await client.post("/v1/embeddings", json={"model": "fake-embed"})
    assert r.status_code == 200 and len(body["choices"]) == 2
    assert body["usage"]["completion_tokens"] == 12
    assert spec["openapi"].startswith("3.")
    assert missing.status_code == 400 and (await missing.get_json())["error"]["param"] == "input"
