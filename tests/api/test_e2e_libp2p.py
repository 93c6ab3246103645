"""The whole path with real parts: openai SDK -> HTTP shim -> router -> libp2p (127.0.0.1) ->
node serve handler -> real MLX engine on a tiny test model (and real MiniLM for embeddings)."""

from __future__ import annotations

import base64
import json

import numpy as np
import openai
import pytest
import trio

from .netharness import CHAT, EMBED, OFFLINE, network
from .test_http_shape import open_raw_stream

TIMEOUT = 120
MSG = [{"role": "user", "content": "What is the weather like?"}]
CITY = {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}}, "required": ["city"],
        "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "weather now", "parameters": CITY}}]
NO_END = {"0": -100, "2": -100}  # the tiny model's end tokens: keep it generating


def aclient(url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=url, api_key="local", max_retries=0)


async def test_models_chat_streaming_and_completions(tiny_model_dir):
    with trio.fail_after(TIMEOUT):
        async with network(tiny_model_dir, [{}, {}]) as net:
            ids = {n.peer_id for n in net.nodes}
            with openai.OpenAI(base_url=net.url, api_key="local", max_retries=0) as sync:
                models = await trio.to_thread.run_sync(sync.models.list)
                raw = await trio.to_thread.run_sync(lambda: sync.chat.completions.with_raw_response.create(
                    model=CHAT, messages=MSG, max_tokens=12, temperature=0))
            chat_model = next(m for m in models.data if m.id == CHAT)
            assert chat_model.darkbloom["providers"] == 2 and "tools" in chat_model.darkbloom["features"]
            digest = chat_model.darkbloom["digests"][0]
            plain = raw.parse()
            assert raw.headers["x-darkbloom-node"] in ids and raw.headers["x-darkbloom-route"] == "direct"
            assert plain.system_fingerprint == f"fp_{raw.headers['x-darkbloom-node'][-8:]}_{digest.split(':')[-1][:16]}"
            assert plain.choices[0].finish_reason in ("stop", "length")
            assert 0 < plain.usage.completion_tokens <= 12 and plain.usage.prompt_tokens > 5

            async with aclient(net.url) as client:
                stream = await client.chat.completions.create(
                    model=CHAT, messages=MSG, max_tokens=12, temperature=0, stream=True,
                    stream_options={"include_usage": True})
                chunks = [c async for c in stream]
                assert chunks[0].choices[0].delta.role == "assistant"
                streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
                assert streamed == plain.choices[0].message.content  # greedy: same answer either way
                assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
                assert chunks[-2].choices[0].finish_reason == plain.choices[0].finish_reason

                two = await client.chat.completions.create(model=CHAT, messages=MSG, max_tokens=4, n=2, seed=7)
                assert [c.index for c in two.choices] == [0, 1]
                assert two.usage.completion_tokens <= 8

                lp = await client.chat.completions.create(model=CHAT, messages=MSG, max_tokens=4, temperature=0,
                                                          logprobs=True, top_logprobs=2)
                tokens = lp.choices[0].logprobs.content
                assert 1 <= len(tokens) <= 4 and all(len(t.top_logprobs) == 2 for t in tokens)
                assert all(t.logprob <= 0 and t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob for t in tokens)

                text = await client.completions.create(model=CHAT, prompt="Once upon a time", max_tokens=5,
                                                       temperature=0, logprobs=2)
                assert text.object == "text_completion" and text.choices[0].logprobs.tokens
                assert text.usage.completion_tokens <= 5
            assert net.metrics.failovers == 0


async def test_the_sdks_structured_output_helper_parses_a_schema_valid_answer(tiny_model_dir):
    # client.chat.completions.parse sends the pydantic model as a strict json_schema and parses the
    # answer back into it; constrained decoding makes even a random-weight model's answer valid.
    from typing import Literal

    from pydantic import BaseModel

    class Weather(BaseModel):
        city: Literal["Paris", "Rome"]
        sunny: bool

    with trio.fail_after(TIMEOUT):
        async with network(tiny_model_dir, [{}]) as net:
            async with aclient(net.url) as client:
                r = await client.chat.completions.parse(model=CHAT, messages=MSG, response_format=Weather,
                                                        max_tokens=60, temperature=0)
    parsed = r.choices[0].message.parsed
    assert isinstance(parsed, Weather) and parsed.city in ("Paris", "Rome")
    assert r.choices[0].finish_reason == "stop"


async def test_a_list_of_prompts_is_answered_prompt_by_prompt_as_openai_numbers_them(tiny_model_dir):
    prompts = ["Once upon a time", "The weather today", "In the beginning"]
    with trio.fail_after(TIMEOUT):
        async with network(tiny_model_dir, [{}, {}]) as net:
            async with aclient(net.url) as client:
                alone = [await client.completions.create(model=CHAT, prompt=p, max_tokens=6, temperature=0,
                                                         logit_bias=NO_END) for p in prompts]
                raw = await client.completions.with_raw_response.create(
                    model=CHAT, prompt=prompts, n=2, max_tokens=6, temperature=0, logit_bias=NO_END)
                together = raw.parse()
                stream = await client.completions.create(model=CHAT, prompt=prompts, n=2, max_tokens=6, temperature=0,
                                                         logit_bias=NO_END, stream=True,
                                                         stream_options={"include_usage": True})
                chunks = [c async for c in stream]
    # prompt i's j-th answer is choice i*n+j; greedy, so each is what the prompt alone gets
    assert [c.index for c in together.choices] == list(range(6))
    for i, single in enumerate(alone):
        for j in range(2):
            assert together.choices[2 * i + j].text == single.choices[0].text
    assert together.usage.prompt_tokens == sum(a.usage.prompt_tokens for a in alone)
    assert together.usage.completion_tokens == 2 * sum(a.usage.completion_tokens for a in alone)
    assert together.usage.total_tokens == together.usage.prompt_tokens + together.usage.completion_tokens
    nodes = raw.headers["x-darkbloom-node"].split(", ")
    assert nodes and set(nodes) <= {n.peer_id for n in net.nodes} and raw.headers["x-darkbloom-route"] == "direct"
    # streamed: one id, every choice's text and finish, then the summed usage
    assert len({c.id for c in chunks}) == 1
    texts: dict[int, str] = {}
    finished: dict[int, str] = {}
    for c in chunks:
        for choice in c.choices:
            texts[choice.index] = texts.get(choice.index, "") + choice.text
            if choice.finish_reason:
                finished[choice.index] = choice.finish_reason
    assert texts == {c.index: c.text for c in together.choices}
    assert set(finished) == set(range(6))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == together.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == together.usage.prompt_tokens


async def test_tools_json_and_embeddings(tiny_model_dir, minilm_dir):
    with trio.fail_after(TIMEOUT):
        async with network(tiny_model_dir, [{"embed_dir": minilm_dir}]) as net:
            async with aclient(net.url) as client:
                for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
                    r = await client.chat.completions.create(model=CHAT, messages=MSG, tools=TOOLS, tool_choice=choice,
                                                             parallel_tool_calls=False, max_tokens=100, temperature=0)
                    assert r.choices[0].finish_reason == "tool_calls"
                    call = r.choices[0].message.tool_calls[0]
                    assert call.function.name == "get_weather" and call.id
                    assert json.loads(call.function.arguments)["city"] in ("Paris", "Rome")
                stream = await client.chat.completions.create(model=CHAT, messages=MSG, tools=TOOLS, stream=True,
                                                              tool_choice="required", max_tokens=100, temperature=0,
                                                              parallel_tool_calls=False)
                chunks = [c async for c in stream]
                deltas = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
                assert deltas[0].function.name == "get_weather" and deltas[0].index == 0
                args = "".join(d.function.arguments or "" for d in deltas)
                assert json.loads(args)["city"] in ("Paris", "Rome")
                assert chunks[-1].choices[0].finish_reason == "tool_calls"

                none = await client.chat.completions.create(model=CHAT, messages=MSG, tools=TOOLS, tool_choice="none",
                                                            max_tokens=8)
                assert none.choices[0].message.tool_calls is None
                auto = await client.chat.completions.create(model=CHAT, messages=MSG, tools=TOOLS, max_tokens=40)
                calls = auto.choices[0].message.tool_calls or []
                assert all(c.function.name == "get_weather" for c in calls)
                assert (auto.choices[0].finish_reason == "tool_calls") == bool(calls)

                schema = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]}}, "required": ["answer"],
                          "additionalProperties": False}
                j = await client.chat.completions.create(
                    model=CHAT, messages=MSG, max_tokens=30,
                    response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": schema}})
                assert json.loads(j.choices[0].message.content)["answer"] in ("yes", "no")
                obj = await client.chat.completions.create(model=CHAT, messages=MSG, max_tokens=30,
                                                           response_format={"type": "json_object"})
                content = obj.choices[0].message.content
                assert content.lstrip().startswith("{")
                if obj.choices[0].finish_reason == "stop":
                    assert isinstance(json.loads(content), dict)

                texts = ["The cat sits on the mat.", "A feline rests on a rug.", "Stock prices fell sharply."]
                floats = await client.embeddings.create(model=EMBED, input=texts, encoding_format="float")
                b64 = await client.embeddings.create(model=EMBED, input=texts)  # the SDK asks for base64
                one = await client.embeddings.create(model=EMBED, input=texts[0], encoding_format="base64")
    vectors = np.array([d.embedding for d in floats.data], dtype=np.float32)
    assert vectors.shape == (3, 384)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2]  # real semantics, not noise
    assert np.allclose(np.array([d.embedding for d in b64.data]), vectors, atol=1e-6)
    assert np.allclose(np.frombuffer(base64.b64decode(one.data[0].embedding), "<f4"), vectors[0], atol=1e-6)
    assert floats.usage.prompt_tokens > 10


async def test_errors_from_real_nodes(tiny_model_dir):
    with trio.fail_after(TIMEOUT):
        async with network(tiny_model_dir, [{"max_concurrent": 1, "max_queue": 0}]) as net:
            node = net.nodes[0]
            async with aclient(net.url) as client:
                chat = client.chat.completions
                with pytest.raises(openai.NotFoundError) as nf:
                    await chat.create(model="never-heard-of-it", messages=MSG)
                assert nf.value.body["code"] == "model_not_found"
                with pytest.raises(openai.InternalServerError) as offline:
                    await chat.create(model=OFFLINE, messages=MSG)
                assert offline.value.status_code == 503 and f"no provider for model {OFFLINE}" in offline.value.message
                with pytest.raises(openai.InternalServerError) as region:
                    await chat.create(model=CHAT, messages=MSG, extra_body={"darkbloom": {"region": "mars"}})
                assert "region mars" in region.value.message
                with pytest.raises(openai.BadRequestError) as bad:
                    await chat.create(model=CHAT, messages=MSG, top_logprobs=3)  # needs logprobs=true
                assert bad.value.body["param"] == "top_logprobs"
                with pytest.raises(openai.BadRequestError) as ctx:
                    await chat.create(model=CHAT, messages=[{"role": "user", "content": "word " * 5000}])
                assert ctx.value.body["code"] == "context_length_exceeded"

                # one slot, no queue: while it is taken, the only provider is busy -> 503 + Retry-After
                before = len(node.served)
                sock = await open_raw_stream(net.url, "/chat/completions", {
                    "model": CHAT, "messages": MSG, "stream": True, "max_tokens": 3000, "logit_bias": NO_END})
                with pytest.raises(openai.InternalServerError) as busy:
                    await chat.create(model=CHAT, messages=MSG, max_tokens=2)
                assert busy.value.status_code == 503 and "busy" in busy.value.message
                assert int(busy.value.response.headers["retry-after"]) >= 1
                await sock.aclose()  # the client leaves mid-stream: the node's slot is freed
                served = await node.served_with("cancelled", after=before)
                assert served.completion_tokens < 3000
                assert [x.outcome for x in node.served[before:]].count("error:no_capacity") == 1
                ok = await chat.create(model=CHAT, messages=MSG, max_tokens=2)
                assert ok.usage.completion_tokens <= 2
            assert net.metrics.client_disconnects == 1


async def test_failover_when_the_first_node_dies_before_its_first_token(tiny_model_dir):
    with trio.fail_after(TIMEOUT):
        # The first node ranks first (faster record) and holds its answer after admission.
        async with network(tiny_model_dir, [{"decode_tps": 1000.0, "hold": True}, {"decode_tps": 10.0}]) as net:
            first, second = net.nodes
            first_id, second_id = first.peer_id, second.peer_id
            result = {}

            async def ask() -> None:
                async with aclient(net.url) as client:
                    raw = await client.chat.completions.with_raw_response.create(model=CHAT, messages=MSG, max_tokens=6)
                    result["node"] = raw.headers["x-darkbloom-node"]
                    result["completion"] = raw.parse()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(ask)
                await first.engine.admitted.wait()  # the request reached the first node
                await first.member.stop()  # ...which dies before its first token
            assert result["node"] == second_id
            assert result["completion"].choices[0].finish_reason in ("stop", "length")
            assert net.metrics.failovers == 0  # failover happened inside routing, before any byte
            stats = net.backend.stats[first_id]
            assert stats.failures == 1 and net.backend.stats[second_id].successes == 1


async def test_node_dying_mid_stream_ends_with_an_error_event(tiny_model_dir):
    with trio.fail_after(TIMEOUT):
        async with network(tiny_model_dir, [{}]) as net:
            node = net.nodes[0]
            async with aclient(net.url) as client:
                stream = await client.chat.completions.create(model=CHAT, messages=MSG, stream=True, max_tokens=3000,
                                                              extra_body={"logit_bias": NO_END})
                got = 0
                with pytest.raises(openai.APIError) as failed:
                    async for chunk in stream:
                        got += 1
                        if got == 3:
                            await node.member.stop()
            assert failed.value.body["type"] == "server_error"
            assert net.metrics.stream_errors == 1
