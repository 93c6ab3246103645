"""Leaving a node (what SIGINT/SIGTERM do): it stops announcing and taking work, lets the request in
flight finish within the grace period, hands its vouchers to the ledger, and only then leaves."""

from __future__ import annotations

import dataclasses

import trio

from darkbloom.config import Config, LedgerConfig, ModelSpec, NodeConfig
from darkbloom.up import _role_config

NO_END = {"0": -100, "2": -100}  # the tiny model's end tokens: it generates up to max_tokens
MAX_TOKENS = 600  # long enough to be still generating when the node is told to stop


async def test_a_stopping_node_finishes_the_request_in_flight_then_submits_and_leaves(tmp_path, tiny_model_dir):
    from openai import AsyncOpenAI

    from darkbloom.api.shim import open_shim, shim_dir
    from darkbloom.identity import load_or_create_identity
    from darkbloom.node.daemon import open_node
    from darkbloom.p2p.network import open_network
    from darkbloom.relay.daemon import open_relay

    base = Config(data_dir=str(tmp_path), ledger=LedgerConfig(epoch_s=3600, voucher_every_tokens=8),
                  node=NodeConfig(status_port=0, grace_period_s=120, pause_on_battery=False),
                  api=dataclasses.replace(Config().api, port=0, max_attempts=1))
    base = dataclasses.replace(base, relay=dataclasses.replace(base.relay, status_port=0))
    finished: dict = {}
    with trio.fail_after(240):
        async with open_relay(_role_config(base, tmp_path / "relay", relay={"listen_addrs": ("/ip4/127.0.0.1/tcp/0",)})) as relay:
            boot = relay.addrs
            shim_cfg = _role_config(base, tmp_path, p2p={"bootstrap": boot})
            ident = load_or_create_identity(shim_dir(shim_cfg))
            await trio.to_thread.run_sync(lambda: relay.store.deposit(ident.public_key.hex(), 10_000_000, now_ms=0))
            node_cfg = _role_config(base, tmp_path / "node", p2p={"bootstrap": boot}, node={"status_port": 0},
                                    inference={"models": (ModelSpec(id="tiny", path=str(tiny_model_dir)),),
                                               "self_benchmark": False})
            async with open_network(shim_cfg.p2p, ident, role="shim", bootstrap=boot) as net, \
                    open_shim(shim_cfg, net) as shim, trio.open_nursery() as nursery:
                client = AsyncOpenAI(base_url=f"{shim.url}/v1", api_key="local", max_retries=0)
                first_token = trio.Event()

                async def ask() -> None:
                    stream = await client.chat.completions.create(
                        model="tiny", max_tokens=MAX_TOKENS, messages=[{"role": "user", "content": "go on"}],
                        stream=True, stream_options={"include_usage": True}, extra_body={"logit_bias": NO_END})
                    async for chunk in stream:
                        if chunk.choices and chunk.choices[0].delta.content:
                            first_token.set()
                        if chunk.choices and chunk.choices[0].finish_reason:
                            finished["reason"] = chunk.choices[0].finish_reason
                        if chunk.usage is not None:
                            finished["tokens"] = chunk.usage.completion_tokens
                    await client.close()

                async with open_node(node_cfg, bootstrap=boot) as node:
                    nursery.start_soon(ask)
                    await first_token.wait()
                    assert node.service.load().active == 1, "the request ended before the node was told to stop"
                # The block's exit is the shutdown: by now the node has drained and submitted.
                assert node.draining and node.paused()
                assert node.stats.served == 1 and node.stats.cancelled == 0 and node.stats.failed == 0
            # the final voucher reached the ledger before the node left
            assert await trio.to_thread.run_sync(relay.store.pending_count) == 1
    assert finished == {"reason": "length", "tokens": MAX_TOKENS}
