"""A swarm of four real engines behind the trust layer: honest, flaky (drops 30% before the first token),
slow, and cheating (another model under the same digest). Routing settles on the honest node, the cheater
is flagged by teacher-forced spot checks, the flaky node is circuit-broken, and no client request fails.

The engines are real (the project's tiny random-weight model; the cheater runs a tiny model built with
another seed); the network between shim and nodes is not: attempts call the engines directly, and the
flaky and slow behaviours are injected failures/delays, named so. The same scenario over real libp2p
needs the integrated shim (NetworkBackend calling TrustedRouting) and is left to that integration.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from darkbloom.api import router
from darkbloom.api.router import Candidate, RouteHints
from darkbloom.api.trust.breaker import BreakerPolicy
from darkbloom.api.trust.hedge import HedgePolicy
from darkbloom.api.trust.reputation_mix import TrustBook
from darkbloom.api.trust.routing import TrustedRouting
from darkbloom.api.trust.verify import VerifyPolicy, scored_from_token_scores
from darkbloom.errors import InvalidRequest, PeerUnreachable
from darkbloom.inference.engine import ChoiceFinished, TextDelta, open_engine
from darkbloom.inference.params import GenerationRequest, Sampling
from darkbloom.inference.testmodel import make_test_model

MODEL = "tiny"
DIGEST = "d" * 64
# Calibrated for greedy requests on the tiny random model (its honest tokens are argmax, rank 0).
TINY_POLICY = VerifyPolicy(top_k=5, max_outside=1, min_mean_logprob=-100.0, min_tokens=4)


@dataclass
class Session:
    """What an attempt hands back: the first delta is in hand, the rest streams from `events`."""

    peer_id: str
    events: Any
    first: TextDelta

    async def aclose(self) -> None:
        await self.events.aclose()


async def test_swarm_settles_on_the_honest_node(tiny_model_dir: Path, tmp_path: Path) -> None:
    other_model = make_test_model(tmp_path / "other", "tiny", seed=1)  # the cheater's real (different) weights
    drop_rng = random.Random(5)
    with trio.fail_after(300):
        async with (
            open_engine([(MODEL, tiny_model_dir)], max_concurrent=2, self_benchmark=False) as honest,
            open_engine([(MODEL, tiny_model_dir)], max_concurrent=2, self_benchmark=False) as flaky,
            open_engine([(MODEL, tiny_model_dir)], max_concurrent=2, self_benchmark=False) as slow,
            open_engine([(MODEL, other_model)], max_concurrent=2, self_benchmark=False) as cheat,
        ):
            # Ties go to the lowest peer id: the misbehaving peers are named to be tried first.
            engines = {"a-cheat": cheat, "b-flaky": flaky, "c-slow": slow, "d-honest": honest}
            cands = [Candidate(peer_id=p, model=MODEL, digest=DIGEST, decode_tps=100.0, max_concurrent=2) for p in engines]
            load = {p: router.PeerStats() for p in engines}  # the backend's own in-flight counts
            trusted = TrustedRouting(
                book=TrustBook(breaker_policy=BreakerPolicy(failures=3, window_s=60.0, base_cooldown_s=120.0)),
                hedge=HedgePolicy(enabled=True, default_delay_s=2.0),
                verify_policy=TINY_POLICY,
                spot_check_probability=0.5,
                max_attempts=4,
                rng=random.Random(11),
            )
            for eng in engines.values():  # nodes are warm (a real node self-benchmarks at start)
                warm = GenerationRequest(kind="completion", prompt=(1, 2, 3), max_tokens=2, sampling=Sampling(temperature=0.0))
                async for _ in eng.generate(MODEL, warm):
                    pass

            def attempt_for(req: GenerationRequest):
                async def attempt(cand: Candidate) -> Session:
                    load[cand.peer_id].inflight += 1
                    try:
                        if cand.peer_id == "b-flaky" and drop_rng.random() < 0.3:
                            await trio.lowlevel.checkpoint()
                            raise PeerUnreachable(cand.peer_id, "injected drop")  # injected failure
                        if cand.peer_id == "c-slow":
                            await trio.sleep(0.3)  # injected delay: a distant or overloaded machine
                        events = engines[cand.peer_id].generate(MODEL, req)
                        async for ev in events:
                            if isinstance(ev, TextDelta):
                                return Session(cand.peer_id, events, ev)
                        raise PeerUnreachable(cand.peer_id, "ended without output")
                    except BaseException:
                        load[cand.peer_id].inflight -= 1
                        raise

                return attempt

            async def discard(session: Session) -> None:
                load[session.peer_id].inflight -= 1
                await session.aclose()

            winners: list[str] = []
            failed: list[int] = []
            flaky_broken_at: int | None = None  # how many answers had been served when it opened
            hints = RouteHints(model=MODEL)
            counter = iter(range(50))

            async def client() -> None:
                nonlocal flaky_broken_at
                for i in counter:
                    prompt = await honest.tokenize(MODEL, f"Request {i}: the weather in town {i % 7} is")
                    req = GenerationRequest(kind="completion", prompt=tuple(prompt), max_tokens=8, sampling=Sampling(temperature=0.0))
                    now = trio.current_time()
                    stats = trusted.router_stats(engines, now, load)
                    ranked, reason = router.rank(cands, stats, hints, now)
                    order = trusted.order(ranked, (), now)
                    opened = await trusted.open(order, attempt_for(req), discard=discard,
                                                is_final=lambda e: isinstance(e, InvalidRequest), model=MODEL)
                    if opened.candidate is None:
                        failed.append(i)
                        continue
                    session = opened.value
                    output: tuple[int, ...] = ()
                    async for ev in session.events:  # the client reads the rest of the answer
                        if isinstance(ev, ChoiceFinished):
                            output = ev.token_ids
                    await discard(session)
                    peer = opened.candidate.peer_id
                    trusted.finished(peer, trio.current_time(), ttft_s=opened.ttft_s, tokens=len(output))
                    winners.append(peer)
                    if trusted.want_spot_check(eligible=True) and len(output) >= TINY_POLICY.min_tokens:
                        verifier = "c-slow" if peer != "c-slow" else "d-honest"  # same digest, another node
                        scores = await engines[verifier].score(MODEL, prompt, output, top_k=TINY_POLICY.top_k)
                        trusted.judge_spot_check(peer, scored_from_token_scores(scores, TINY_POLICY.top_k), trio.current_time())
                    flaky = trusted.book.peers.get("b-flaky")
                    if flaky_broken_at is None and flaky is not None and flaky.breaker.opens > 0:
                        flaky_broken_at = len(winners)

            async with trio.open_nursery() as nursery:  # three clients at once: load spreads traffic
                for _ in range(3):
                    nursery.start_soon(client)

    book = trusted.book
    snapshot = (winners, book.snapshot(engines, trio.current_time()))
    assert failed == [] and len(winners) == 50  # no client request failed
    assert book.peers["a-cheat"].local_flags >= 1, snapshot  # caught by verification
    assert book.peers["d-honest"].local_flags == 0 and book.peers["d-honest"].checks_passed >= 1
    assert flaky_broken_at is not None and book.peers["b-flaky"].stats.errors["unreachable"] >= 3, snapshot
    assert "b-flaky" not in winners[flaky_broken_at + 2 :], snapshot  # (answers in flight when it opened may finish)
    assert "a-cheat" in winners[:10] and "b-flaky" in winners  # each misbehaving node was really tried
    last = winners[-20:]
    assert "a-cheat" not in last, snapshot  # settled away from the cheater
    assert last.count("d-honest") > len(last) / 2, snapshot  # the honest node serves most
    end = trio.current_time()
    assert book.reputation("d-honest", end) > max(book.reputation(p, end) for p in ("a-cheat", "b-flaky"))
