"""The issue's swarm, end to end: real libp2p on 127.0.0.1, real engines, the real node handler and the
real shim (NetworkBackend with the trust layer) driven by the official openai client.

Four nodes advertise the same model and weights digest: an honest one, a flaky one (its engine fails
30% of requests: injected), a slow one (0.5 s before its first event: injected) and a cheating one (it
runs other weights, a tiny model built with another seed, under the honest digest, and reports random
output token ids). The records' claimed speeds put the cheater first, then the flaky and slow nodes,
the honest node last.

Why random ids on top of other weights: a verifying node reports only whether each token is in its
top 100 (node.serve.SCORE_TOP_K), and the tiny random models are nearly uniform over 2048 tokens, so
another tiny model's tokens land in the top 100 too often to be told apart at k=100 (measured: 1 of 8
outside). With exact ranks the other-weights cheater is caught at k=5 (test_swarm_routing.py). Within 50
requests from two concurrent clients: no request fails, the cheater is flagged by a teacher-forced
spot check and quarantined, the flaky node's breaker opens, and the honest node serves the end.
"""

from __future__ import annotations

import dataclasses
import random
from contextlib import AsyncExitStack, aclosing
from functools import partial
from pathlib import Path
from typing import Any

import openai
import trio

from darkbloom.api.app import serve
from darkbloom.metrics import ShimMetrics as Metrics
from darkbloom.api.network import NetworkBackend
from darkbloom.api.trust.breaker import BreakerPolicy
from darkbloom.api.trust.reputation_mix import TrustBook
from darkbloom.api.trust.routing import TrustedRouting
from darkbloom.api.trust.verify import VerifyPolicy
from darkbloom.config import ApiConfig
from darkbloom.errors import EngineFailed
from darkbloom.inference.catalog import model_info
from darkbloom.inference.engine import ChoiceFinished, open_engine
from darkbloom.inference.testmodel import make_test_model
from darkbloom.node.serve import InferenceService, serve_inference
from darkbloom.p2p.testing import swarm
from darkbloom.wire.caps import CapabilityRecord, ModelCap
from darkbloom.wire.infer import PROTOCOL_VERSION

CHAT = "tiny-chat"
TIMEOUT = 300
# The tiny random model is nearly uniform (every logprob near -log 2048): judge by rank only.
TINY_POLICY = VerifyPolicy(top_k=100, max_outside=2, min_mean_logprob=-50.0)


class Wrapped:
    """A real engine with injected behaviour in `generate`; everything else passes through."""

    def __init__(self, engine: Any, *, drop: float = 0.0, delay_s: float = 0.0, lie: bool = False, seed: int = 0) -> None:
        self.engine, self.drop, self.delay_s, self.lie = engine, drop, delay_s, lie
        self.rng = random.Random(seed)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.engine, name)

    async def generate(self, model_id: str, req: Any):
        if self.rng.random() < self.drop:
            raise EngineFailed("injected drop")
        if self.delay_s:
            await trio.sleep(self.delay_s)
        async with aclosing(self.engine.generate(model_id, req)) as events:
            async for event in events:
                if self.lie and isinstance(event, ChoiceFinished):
                    event = dataclasses.replace(event, token_ids=tuple(self.rng.randrange(5, 2040) for _ in event.token_ids))
                yield event


async def run_node(s, model_dir: Path, digest: str, decode_tps: float, *, drop: float = 0.0, delay_s: float = 0.0,
                   lie: bool = False, task_status=trio.TASK_STATUS_IGNORED) -> None:
    async with AsyncExitStack() as stack:
        info = model_info(CHAT, model_dir, "chat")
        engine = await stack.enter_async_context(open_engine([(CHAT, model_dir)], max_concurrent=4, self_benchmark=False))
        engine = Wrapped(engine, drop=drop, delay_s=delay_s, lie=lie, seed=3)
        member = await s.add("node")
        service = InferenceService(engine, digests={CHAT: digest}, embedders={}, identity=member.identity)
        serve_inference(member.net, service)
        cap = ModelCap(id=CHAT, digest=digest, context_length=info.context_length, quantization=info.quantization,
                       features=info.features)
        await member.net.put_record(CapabilityRecord(
            peer_id="", seq=0, issued_at_ms=0, expires_at_ms=0, models=(cap,), decode_tps=decode_tps, max_concurrent=4,
            price_input_per_m=100, price_output_per_m=400, software_version="test", protocol_version=PROTOCOL_VERSION))
        await member.net.provide(CHAT)
        task_status.started(member.peer_id)
        await trio.sleep_forever()


async def test_swarm_end_to_end(tiny_model_dir: Path, tmp_path: Path) -> None:
    other_dir = make_test_model(tmp_path / "other", "tiny", seed=1)
    digest = model_info(CHAT, tiny_model_dir, "chat").digest
    trust = TrustedRouting(
        book=TrustBook(breaker_policy=BreakerPolicy(failures=3, window_s=60.0, base_cooldown_s=60.0)),
        verify_policy=TINY_POLICY, spot_check_probability=0.5, max_attempts=4, rng=random.Random(1),
    )
    verdicts: list[tuple[str, Any]] = []
    served: list[str] = []
    failures: list[BaseException] = []
    flaky_open_at: int | None = None
    with trio.fail_after(TIMEOUT):
        async with swarm(nodes=0, relays=1, clients=0) as s:
            cheat = await s.nursery.start(partial(run_node, s, other_dir, digest, 1000.0, lie=True))
            flaky = await s.nursery.start(partial(run_node, s, tiny_model_dir, digest, 500.0, drop=0.3))
            slow = await s.nursery.start(partial(run_node, s, tiny_model_dir, digest, 200.0, delay_s=0.5))
            honest = await s.nursery.start(partial(run_node, s, tiny_model_dir, digest, 100.0))
            shim = await s.add("shim")
            cfg = ApiConfig(host="127.0.0.1", port=0, spot_check_probability=0.5, max_attempts=4)
            backend = NetworkBackend(shim.net, cfg, known_models={CHAT}, trust=trust)
            backend.on_spot_check = lambda peer, verdict: verdicts.append((peer, verdict))
            async with trio.open_nursery() as http:
                url = await http.start(partial(serve, cfg, backend, metrics=Metrics()))
                async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="local", max_retries=0) as client:
                    counter = iter(range(50))

                    async def user() -> None:
                        nonlocal flaky_open_at
                        for i in counter:
                            try:
                                r = await client.chat.completions.with_raw_response.create(
                                    model=CHAT, max_tokens=8, temperature=0,
                                    messages=[{"role": "user", "content": f"Question {i}: what is {i} plus {i}?"}])
                            except openai.APIError as exc:
                                failures.append(exc)
                                continue
                            served.append(r.headers["x-darkbloom-node"])
                            assert r.parse().choices[0].message.content is not None
                            p = trust.book.peers.get(flaky)
                            if flaky_open_at is None and p is not None and p.breaker.opens > 0:
                                flaky_open_at = len(served)

                    async with trio.open_nursery() as users:
                        for _ in range(2):
                            users.start_soon(user)
                http.cancel_scope.cancel()

    book = trust.book
    names = {cheat: "cheat", flaky: "flaky", slow: "slow", honest: "honest"}
    story = ([names[p] for p in served], [(names.get(p, p), v) for p, v in verdicts][:6])
    assert failures == [] and len(served) == 50, story  # no client request failed
    assert any(p == cheat and v is not None and v.flagged for p, v in verdicts), story  # flagged by verification
    assert book.peers[cheat].local_flags >= 1 and book.peers[honest].local_flags == 0, story
    assert flaky_open_at is not None and book.peers[flaky].stats.errors, story  # circuit-broken
    assert flaky not in served[flaky_open_at + 2 :], story  # (answers already under way may finish)
    last = served[-15:]
    assert cheat not in last and last.count(honest) > len(last) / 2, story  # settled on the honest node
