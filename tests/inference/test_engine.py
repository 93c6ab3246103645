"""The generation engine on a real (random-weight) llama with a real tokenizer, on MLX CPU."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import aclosing, asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from darkbloom.errors import ContextLengthExceeded, InvalidRequest, ModelNotFound, NoCapacity
from darkbloom.inference.engine import Admitted, ChoiceFinished, Engine, TextDelta, open_engine
from darkbloom.inference.params import GenerationRequest, parse_chat, parse_completion

MODEL = "tiny"
TIMEOUT = 120


@asynccontextmanager
async def engine(model_dir: Path, **kw: Any) -> AsyncIterator[Engine]:
    kw.setdefault("max_concurrent", 4)
    kw.setdefault("max_queue", 8)
    kw.setdefault("self_benchmark", False)
    with trio.fail_after(TIMEOUT):
        async with open_engine([(MODEL, model_dir)], **kw) as eng:
            yield eng


async def run(eng: Engine, req: GenerationRequest) -> dict[str, Any]:
    """Collect a request's events into per-choice text, tokens and finish events."""
    out: dict[str, Any] = {"admitted": None, "text": {}, "deltas": [], "finished": {}}
    async for ev in eng.generate(MODEL, req):
        if isinstance(ev, Admitted):
            out["admitted"] = ev
        elif isinstance(ev, TextDelta):
            out["deltas"].append(ev)
            out["text"][ev.index] = out["text"].get(ev.index, "") + ev.text
        elif isinstance(ev, ChoiceFinished):
            out["finished"][ev.index] = ev
    return out


def chat(content: str = "Tell me a story.", **kw: Any) -> GenerationRequest:
    return parse_chat({"messages": [{"role": "user", "content": content}], "temperature": 0, **kw})


async def test_generates_text_tokens_and_usage(tiny_model_dir: Path) -> None:
    async with engine(tiny_model_dir) as eng:
        r = await run(eng, chat(max_tokens=12))
        assert r["admitted"].prompt_tokens > 5
        fin = r["finished"][0]
        assert fin.finish_reason in ("length", "stop")
        assert fin.completion_tokens == len(fin.token_ids) <= 12
        assert sum(d.tokens for d in r["deltas"]) <= fin.completion_tokens
        assert r["text"][0]  # something was said
        assert eng.load().active == 0 and eng.load().queued == 0


async def test_max_tokens_gives_length(tiny_model_dir: Path) -> None:
    async with engine(tiny_model_dir) as eng:
        # A model that never says EOS: bias it away so the length limit is what stops it.
        r = await run(eng, chat(max_tokens=9, logit_bias={"2": -100, "0": -100}))
        fin = r["finished"][0]
        assert fin.finish_reason == "length" and fin.completion_tokens == 9


async def test_concurrent_greedy_requests_match_sequential_ones(tiny_model_dir: Path) -> None:
    prompts = [f"Question number {i}: what is {i} plus {i}?" for i in range(6)]
    async with engine(tiny_model_dir, max_concurrent=4) as eng:
        alone = [(await run(eng, chat(p, max_tokens=10)))["finished"][0].token_ids for p in prompts]
        together: list[Any] = [None] * len(prompts)

        async def one(i: int) -> None:
            together[i] = (await run(eng, chat(prompts[i], max_tokens=10)))["finished"][0].token_ids

        async with trio.open_nursery() as n:
            for i in range(len(prompts)):
                n.start_soon(one, i)
    assert together == alone


async def test_stop_string_cuts_exactly_even_inside_a_token(tiny_model_dir: Path) -> None:
    async with engine(tiny_model_dir) as eng:
        free = await run(eng, chat(max_tokens=24, logit_bias={"2": -100}))
        text = free["text"][0]
        assert len(text) >= 8
        # A stop string that starts and ends in the middle of the output, whatever the tokens.
        stop = text[3:6]
        cut = await run(eng, chat(max_tokens=24, logit_bias={"2": -100}, stop=[stop, "\u2603never"]))
    assert cut["finished"][0].finish_reason == "stop"
    assert cut["text"][0] == text[: text.index(stop)]
    assert stop not in cut["text"][0]


async def test_n_choices_and_seeds(tiny_model_dir: Path) -> None:
    body = {"messages": [{"role": "user", "content": "Pick words."}], "temperature": 1.0, "max_tokens": 8, "seed": 7, "logit_bias": {"2": -100}}
    async with engine(tiny_model_dir) as eng:
        a = await run(eng, parse_chat({**body, "n": 3}))
        b = await run(eng, parse_chat({**body, "n": 3}))
        c = await run(eng, parse_chat({**body, "seed": 8}))
    assert sorted(a["finished"]) == [0, 1, 2]
    ids = [a["finished"][i].token_ids for i in range(3)]
    assert ids == [b["finished"][i].token_ids for i in range(3)]  # same seed, same batch: same output
    assert len(set(ids)) > 1  # choices get different streams
    assert c["finished"][0].token_ids != ids[0]


async def test_logprobs_and_top_logprobs(tiny_model_dir: Path) -> None:
    async with engine(tiny_model_dir) as eng:
        r = await run(eng, chat(max_tokens=6, logprobs=True, top_logprobs=3, logit_bias={"2": -100}))
    lps = [lp for d in r["deltas"] for lp in d.logprobs]
    assert len(lps) == r["finished"][0].completion_tokens
    assert b"".join(lp.bytes_ for lp in lps) == r["text"][0].encode("utf-8")  # exact token bytes
    for lp in lps:
        assert lp.logprob <= 0.0
        assert len(lp.top) == 3
        values = [v for _, v in lp.top]
        assert values == sorted(values, reverse=True)
        assert lp.logprob == pytest.approx(values[0], abs=1e-5)  # greedy picks the top token


async def test_logit_bias_forces_a_token(tiny_model_dir: Path) -> None:
    async with engine(tiny_model_dir) as eng:
        r = await run(eng, chat(max_tokens=5, logit_bias={"300": 100}))
    assert set(r["finished"][0].token_ids) == {300}


async def test_bad_requests_get_typed_errors_and_the_engine_keeps_serving(tiny_model_dir: Path) -> None:
    async with engine(tiny_model_dir) as eng:
        ctx = eng.models[MODEL].context_length
        with pytest.raises(ModelNotFound) as info:
            async for _ in eng.generate("no-such-model", chat()):
                pass
        assert MODEL in str(info.value)
        with pytest.raises(ContextLengthExceeded) as too_long:
            await run(eng, chat("word " * (ctx + 10), max_tokens=5))
        assert too_long.value.context_length == ctx
        with pytest.raises(ContextLengthExceeded):
            await run(eng, chat(max_tokens=ctx))
        with pytest.raises(InvalidRequest) as bias:
            await run(eng, chat(logit_bias={"999999": 1}))
        assert bias.value.param == "logit_bias"
        with pytest.raises(InvalidRequest) as ids:
            await run(eng, parse_completion({"prompt": [1, 2, 10**7]}))
        assert ids.value.param == "prompt"
        r = await run(eng, chat(max_tokens=3))
        assert r["finished"][0].completion_tokens >= 1
        assert eng.load().active == 0


async def test_no_capacity_when_slots_and_queue_are_full(tiny_model_dir: Path) -> None:
    async with engine(tiny_model_dir, max_concurrent=1, max_queue=1) as eng:
        long = chat(max_tokens=400, logit_bias={"2": -100})
        async with aclosing(eng.generate(MODEL, long)) as a, aclosing(eng.generate(MODEL, long)) as b:
            assert isinstance(await a.__anext__(), Admitted)
            assert isinstance(await b.__anext__(), Admitted)
            with pytest.raises(NoCapacity):
                async for _ in eng.generate(MODEL, chat(max_tokens=2)):
                    pass
            with pytest.raises(InvalidRequest) as too_many:
                async for _ in eng.generate(MODEL, parse_chat({"messages": [{"role": "user", "content": "x"}], "n": 2})):
                    pass
            assert too_many.value.param == "n"
        # Both closed: their slots are free again.
        r = await run(eng, chat(max_tokens=2))
        assert r["finished"][0].completion_tokens >= 1


async def test_closing_the_iterator_frees_the_slot(tiny_model_dir: Path) -> None:
    async with engine(tiny_model_dir, max_concurrent=1, max_queue=4) as eng:
        worker = eng._worker
        async with aclosing(eng.generate(MODEL, chat(max_tokens=1500, logit_bias={"2": -100}))) as gen:
            seen = 0
            async for ev in gen:
                if isinstance(ev, TextDelta):
                    seen += ev.tokens
                    if seen >= 3:
                        break
        # With one slot, this can only finish if the long request left the batch.
        r = await run(eng, chat(max_tokens=3))
        assert r["finished"][0].completion_tokens >= 1
        assert not worker.jobs and not worker.models[MODEL].running


async def test_cancelling_the_consumer_cancels_the_request(tiny_model_dir: Path) -> None:
    async with engine(tiny_model_dir, max_concurrent=1) as eng:
        started = trio.Event()

        async def consume() -> None:
            async for ev in eng.generate(MODEL, chat(max_tokens=1500, logit_bias={"2": -100})):
                if isinstance(ev, TextDelta):
                    started.set()

        async with trio.open_nursery() as n:
            n.start_soon(consume)
            await started.wait()
            n.cancel_scope.cancel()
        r = await run(eng, chat(max_tokens=3))
        assert r["finished"][0].completion_tokens >= 1
        assert not eng._worker.jobs


async def test_prompt_cache_reuse_gives_the_same_answer(tiny_model_dir: Path) -> None:
    history = [{"role": "system", "content": "You are terse. " * 20}, {"role": "user", "content": "First question?"}]
    async with engine(tiny_model_dir) as eng:
        first = await run(eng, parse_chat({"messages": history, "temperature": 0, "max_tokens": 6}))
        cache = eng._worker.models[MODEL].prompt_cache
        assert len(cache) >= 1
        again = await run(eng, parse_chat({"messages": history, "temperature": 0, "max_tokens": 6}))
        longer = history + [{"role": "assistant", "content": first["text"][0]}, {"role": "user", "content": "And then?"}]
        follow = await run(eng, parse_chat({"messages": longer, "temperature": 0, "max_tokens": 6}))
    async with engine(tiny_model_dir) as fresh:
        follow_fresh = await run(fresh, parse_chat({"messages": longer, "temperature": 0, "max_tokens": 6}))
    assert again["finished"][0].token_ids == first["finished"][0].token_ids
    assert follow["finished"][0].token_ids == follow_fresh["finished"][0].token_ids


async def test_prompt_cache_stays_within_its_byte_bound(tiny_model_dir: Path) -> None:
    def question(i: int) -> GenerationRequest:
        return chat(f"Question number {i}: " + "tell me more " * (4 + i), max_tokens=4)

    async with engine(tiny_model_dir) as eng:
        await run(eng, question(0))
        one_entry = eng._worker.models[MODEL].prompt_cache.nbytes
    assert one_entry > 0
    bound = int(2.5 * one_entry)
    async with engine(tiny_model_dir, prompt_cache_bytes=bound) as eng:
        cache = eng._worker.models[MODEL].prompt_cache
        for i in range(8):
            await run(eng, question(i))
            assert 0 < cache.nbytes <= bound
        assert len(cache) < 8  # older entries were evicted to stay within the bound
    async with engine(tiny_model_dir, prompt_cache_bytes=0) as eng:
        r = await run(eng, question(1))
        assert r["finished"][0].completion_tokens >= 1
        assert eng._worker.models[MODEL].prompt_cache.nbytes == 0


async def test_engine_sets_the_openblas_thread_count(tiny_model_dir: Path) -> None:
    from darkbloom.inference.blas import blas_status, blas_threads, set_blas_threads

    if not blas_status().startswith("loaded"):
        pytest.skip("OpenBLAS is not loaded on this machine")
    set_blas_threads(2)
    try:
        async with engine(tiny_model_dir, blas_threads=1) as eng:
            assert blas_threads() == 1
            r = await run(eng, chat(max_tokens=3))
            assert r["finished"][0].completion_tokens >= 1
    finally:
        set_blas_threads(1)


async def test_json_mode_output_follows_the_grammar(tiny_model_dir: Path) -> None:
    from llguidance import LLMatcher

    from darkbloom.inference.constrained import json_grammar

    schema = {"type": "object", "properties": {"n": {"type": "integer"}, "ok": {"type": "boolean"}}, "required": ["n", "ok"], "additionalProperties": False}
    async with engine(tiny_model_dir) as eng:
        r = await run(eng, chat(max_tokens=40, response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}))
        llg = eng._worker._llg(eng._worker.models[MODEL])
    fin = r["finished"][0]
    matcher = LLMatcher(llg, json_grammar(schema), log_level=0)
    eos = set(eng._worker.models[MODEL].eos_ids)
    assert matcher.consume_tokens([t for t in fin.token_ids if t not in eos])
    assert r["text"][0].startswith("{")
    if fin.finish_reason == "stop":
        value = json.loads(r["text"][0])
        assert isinstance(value["n"], int) and isinstance(value["ok"], bool)


async def test_forced_tool_call_follows_the_grammar(tiny_model_dir: Path) -> None:
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8}}, "required": ["city"], "additionalProperties": False}}}]
    async with engine(tiny_model_dir) as eng:
        assert eng.models[MODEL].supports_tools
        r = await run(eng, chat("Weather in Paris?", max_tokens=60, tools=tools, tool_choice="required", parallel_tool_calls=False))
    fin = r["finished"][0]
    calls = [c for d in r["deltas"] for c in d.tool_calls]
    if fin.finish_reason == "tool_calls":
        assert len(calls) == 1 and calls[0]["function"]["name"] == "get_weather"
        assert set(json.loads(calls[0]["function"]["arguments"])) == {"city"}
        assert r["text"].get(0, "") == ""
    else:  # ran out of tokens mid-call: no half call is passed off as a call
        assert fin.finish_reason == "length" and not calls


async def test_score_matches_generation_logprobs(tiny_model_dir: Path) -> None:
    prompt = [5, 17, 230, 41, 99, 7]
    async with engine(tiny_model_dir) as eng:
        r = await run(eng, parse_completion({"prompt": prompt, "temperature": 0, "max_tokens": 6, "logprobs": 1, "logit_bias": {"2": -100}}))
        out = r["finished"][0].token_ids
        # Score without the bias: compare to an unbiased run's logprobs.
        plain = await run(eng, parse_completion({"prompt": prompt, "temperature": 0, "max_tokens": 6, "logprobs": 1}))
        out_plain = plain["finished"][0].token_ids
        scores = await eng.score(MODEL, prompt, out_plain, top_k=1)
        vocab = eng.models[MODEL].vocab_size
        bad = await eng.score(MODEL, prompt, [(t + vocab // 2) % vocab for t in out_plain], top_k=1)
    gen_lps = [lp.logprob for d in plain["deltas"] for lp in d.logprobs]
    assert [s.token_id for s in scores] == list(out_plain)
    assert all(s.in_top_k for s in scores)  # greedy tokens are the top-1 under teacher forcing
    assert [s.logprob for s in scores] == pytest.approx(gen_lps, abs=1e-3)
    assert not all(s.in_top_k for s in bad)
    assert len(out) == 6


async def test_self_benchmark_and_load(tiny_model_dir: Path) -> None:
    async with engine(tiny_model_dir, self_benchmark=True, max_concurrent=3) as eng:
        bench = await eng.benchmark()
        assert bench.prefill_tps > 0 and bench.decode_tps > 0
        assert eng.models[MODEL].bench == bench
        load = eng.load()
        assert (load.active, load.queued, load.max_concurrent) == (0, 0, 3)


async def test_a_missing_model_directory_fails_at_open(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFound):
        async with open_engine([("ghost", tmp_path / "nope")], self_benchmark=False):
            pass


async def test_catalog_model_info_and_prompt_ids(tiny_model_dir: Path) -> None:
    from darkbloom.inference.catalog import model_info

    info = model_info(MODEL, tiny_model_dir, "chat")
    with trio.fail_after(TIMEOUT):
        async with open_engine([info], self_benchmark=False) as eng:
            assert list(eng.models) == [MODEL]
            assert eng.models[MODEL].context_length == info.context_length
            req = chat("Hello there", max_tokens=2)
            ids = await eng.prompt_ids(MODEL, req)
            r = await run(eng, req)
            assert r["admitted"].prompt_tokens == len(ids)
            # The same ids as a completion prompt give the same greedy continuation.
            again = await run(eng, parse_completion({"prompt": ids, "temperature": 0, "max_tokens": 2}))
            assert again["finished"][0].token_ids == r["finished"][0].token_ids


async def test_tools_are_rendered_by_a_template_that_supports_them(tiny_model_dir: Path) -> None:
    tools = [{"type": "function", "function": {"name": "lookup_station", "parameters": {"type": "object", "properties": {}}}}]
    async with engine(tiny_model_dir) as eng:
        tok = eng._worker.models[MODEL].tokenizer
        with_tools = tok.decode(await eng.prompt_ids(MODEL, chat("hi", tools=tools)))
        without = tok.decode(await eng.prompt_ids(MODEL, chat("hi", tools=tools, tool_choice="none")))
    assert "lookup_station" in with_tools and "<tools>" in with_tools
    assert "lookup_station" not in without


async def test_completion_with_a_text_prompt(tiny_model_dir: Path) -> None:
    async with engine(tiny_model_dir) as eng:
        r = await run(eng, parse_completion({"prompt": "Once upon a time", "max_tokens": 4, "temperature": 0}))
    assert r["admitted"].prompt_tokens >= 2
    assert 1 <= r["finished"][0].completion_tokens <= 4


async def test_n_greedy_choices_share_one_prefill_and_agree(tiny_model_dir: Path) -> None:
    async with engine(tiny_model_dir) as fresh:
        one = await run(fresh, chat("A shared prompt for several choices.", max_tokens=8))
    async with engine(tiny_model_dir) as eng:
        many = await run(eng, chat("A shared prompt for several choices.", max_tokens=8, n=3))
        assert len(eng._worker.models[MODEL].prompt_cache) >= 1
    want = one["finished"][0].token_ids
    assert [many["finished"][i].token_ids for i in range(3)] == [want, want, want]
    assert many["admitted"].prompt_tokens == one["admitted"].prompt_tokens


async def test_prompts_and_outputs_never_reach_the_logs(tiny_model_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    import logging

    caplog.set_level(logging.DEBUG)
    canary = "zebra-canary-7731"
    async with engine(tiny_model_dir) as eng:
        r = await run(eng, chat(f"My secret is {canary}.", max_tokens=12, logprobs=True, logit_bias={"2": -100}))
        with pytest.raises(ContextLengthExceeded):
            await run(eng, chat(f"{canary} " * 3000, max_tokens=4))
    output = r["text"][0]
    assert output
    for rec in caplog.records:
        line = rec.getMessage()
        assert canary not in line
        if len(output.strip()) >= 12:  # long enough not to occur in a log line by chance
            assert output not in line
    assert any("done" in rec.getMessage() for rec in caplog.records)  # the engine did log, just not text


async def test_a_closed_engine_refuses_work(tiny_model_dir: Path) -> None:
    from darkbloom.errors import EngineFailed

    async with engine(tiny_model_dir) as eng:
        pass
    with pytest.raises(EngineFailed):
        async for _ in eng.generate(MODEL, chat()):
            pass
    with pytest.raises(EngineFailed):
        await eng.score(MODEL, [1, 2], [3], 1)


async def test_a_failed_decode_step_fails_its_requests_and_the_engine_recovers(tiny_model_dir: Path) -> None:
    from darkbloom.errors import EngineFailed

    async with engine(tiny_model_dir) as eng:
        m = eng._worker.models[MODEL]
        broken = m.generator

        def boom() -> Any:
            raise RuntimeError("simulated MLX failure")

        broken.next = boom  # the engine thread picks this up on its next step
        with pytest.raises(EngineFailed):
            await run(eng, chat(max_tokens=4))
        assert m.generator is not broken  # replaced by a fresh batch generator
        r = await run(eng, chat(max_tokens=3))
        assert r["finished"][0].completion_tokens >= 1
        assert not eng._worker.jobs
