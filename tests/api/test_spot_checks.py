"""Spot checks with real engines over libp2p: another node scores a finished answer's tokens
(teacher-forced, signed); a node that claims other tokens than it generated is flagged and
quarantined, later requests avoid it, and an honest node's answer passes."""

from __future__ import annotations

import openai
import trio

from darkbloom.api.network import spot_checkable
from darkbloom.api.trust.routing import TrustedRouting
from darkbloom.api.trust.verify import VerifyPolicy

from .netharness import CHAT, SpotCheckLog, network

TIMEOUT = 120
MSG = [{"role": "user", "content": "Count to five."}]
# The tiny random model is nearly uniform, so any token's logprob is about -log(2048): judge
# by rank only (greedy tokens are the verifier's argmax; random ones are mostly not in its top 100).
TINY_POLICY = VerifyPolicy(top_k=100, max_outside=2, min_mean_logprob=-50.0)


def test_what_can_be_spot_checked():
    assert spot_checkable({"messages": MSG, "temperature": 0})
    assert spot_checkable({"messages": MSG, "tools": [{}], "tool_choice": "none"})
    # the verifier rebuilds temperature, top_p, top_k, min_p and logit_bias (scoring.SamplingSpec)
    assert spot_checkable({"messages": MSG, "top_p": 0.5, "top_k": 40, "min_p": 0.05, "logit_bias": {"1": 5}})
    for extra in ({"presence_penalty": 1}, {"repetition_penalty": 1.2}, {"response_format": {"type": "json_object"}},
                  {"tools": [{}]}, {"n": 2}):
        assert not spot_checkable({"messages": MSG, **extra})


async def test_an_honest_node_passes_and_a_cheat_is_quarantined(tiny_model_dir):
    trust = TrustedRouting(spot_check_probability=1.0, verify_policy=TINY_POLICY)
    with trio.fail_after(TIMEOUT):
        # The cheat ranks first (fast record); the honest node verifies it, and is verified by it.
        async with network(tiny_model_dir, [{"decode_tps": 1000.0, "lie": True}, {"decode_tps": 10.0},
                                            {"decode_tps": 5.0}], trust=trust) as net:
            cheat, honest, other = net.nodes
            log = SpotCheckLog(net.backend)
            async with openai.AsyncOpenAI(base_url=net.url, api_key="local", max_retries=0) as client:
                first = await client.chat.completions.with_raw_response.create(
                    model=CHAT, messages=MSG, max_tokens=12, temperature=0)
                assert first.headers["x-darkbloom-node"] == cheat.peer_id
                await log.checked.wait()
                served_by, verdict = log.verdicts[0]
                assert served_by == cheat.peer_id and verdict.flagged and verdict.reason == "outside_top_k"
                assert not trust.book.usable(cheat.peer_id, trio.current_time())  # quarantined

                log.checked = trio.Event()
                second = await client.chat.completions.with_raw_response.create(
                    model=CHAT, messages=MSG, max_tokens=12, temperature=0)
                assert second.headers["x-darkbloom-node"] == honest.peer_id  # the cheat is avoided
                await log.checked.wait()
    # the honest answer is verified by the other honest node (never by the quarantined cheat) and passes
    served_by, verdict = log.verdicts[1]
    assert served_by == honest.peer_id and not verdict.flagged and not verdict.inconclusive
    assert [s.kind for s in other.served] == ["score"] and other.served[0].outcome == "done"
    assert not any(s.kind == "score" for s in cheat.served)
    assert trust.book.usable(honest.peer_id, trio.current_time())
