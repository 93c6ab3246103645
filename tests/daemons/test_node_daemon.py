"""The node daemon with a real relay and a real shim on loopback: paid requests, voucher
submission, earnings on the status page after an epoch, graceful drain."""

from __future__ import annotations

import dataclasses

import httpx
import trio

from darkbloom.config import Config, LedgerConfig, ModelSpec, NodeConfig
from darkbloom.up import _role_config


async def test_node_earns_after_an_epoch(tmp_path, tiny_model_dir):
    from openai import AsyncOpenAI

    from darkbloom.api.shim import open_shim, shim_dir
    from darkbloom.identity import load_or_create_identity
    from darkbloom.node.daemon import open_node
    from darkbloom.p2p.network import open_network
    from darkbloom.relay.daemon import open_relay

    base = Config(data_dir=str(tmp_path), ledger=LedgerConfig(epoch_s=3600, voucher_every_tokens=8),
                  node=NodeConfig(status_port=0), api=dataclasses.replace(Config().api, port=0))
    base = dataclasses.replace(base, relay=dataclasses.replace(base.relay, status_port=0))
    with trio.fail_after(240):
        async with open_relay(_role_config(base, tmp_path / "relay", relay={"listen_addrs": ("/ip4/127.0.0.1/tcp/0",)})) as relay:
            boot = relay.addrs
            node_cfg = _role_config(base, tmp_path / "node", p2p={"bootstrap": boot},
                                    inference={"models": (ModelSpec(id="tiny", path=str(tiny_model_dir)),),
                                               "self_benchmark": False})
            async with open_node(node_cfg, bootstrap=boot) as node:
                shim_cfg = _role_config(base, tmp_path, p2p={"bootstrap": boot})
                ident = load_or_create_identity(shim_dir(shim_cfg))
                await trio.to_thread.run_sync(lambda: relay.store.deposit(ident.public_key.hex(), 10_000_000, now_ms=0))
                async with open_network(shim_cfg.p2p, ident, role="shim", bootstrap=boot) as net:
                    await net.wait_joined()
                    # open_node returns once the node joined and provided; a fresh lookup finds it.
                    assert [p.peer_id for p in await net.find_providers("tiny", fresh=True)] == [node.peer_id]
                    async with open_shim(shim_cfg, net) as shim:
                        client = AsyncOpenAI(base_url=f"{shim.url}/v1", api_key="local", max_retries=0)
                        reply = await client.chat.completions.create(
                            model="tiny", max_tokens=20, messages=[{"role": "user", "content": "hello"}])
                        await client.close()
                        assert reply.usage.completion_tokens > 0
                # Vouchers are on the node's disk; hand them in and close an epoch.
                await node._final_submit()
                outcome = await relay.ledger.settle_now()
                assert outcome is not None
                await node.refresh_earnings()
                ((epoch, paid),) = node.earnings
                assert paid > 0
                async with httpx.AsyncClient() as http:
                    status = (await http.get(f"{node.status_url}/status.json")).json()
                    metrics = (await http.get(f"{node.status_url}/metrics")).text
                    relay_metrics = (await http.get(f"{relay.status_url}/metrics")).text
                assert 'darkbloom_requests_total{kind="chat",outcome="ok",role="node"} 1.0' in metrics
                assert 'darkbloom_settlement_lag_seconds{role="node"} 0.0' in metrics  # all handed in
                assert 'darkbloom_peers{role="relay"}' in relay_metrics
                assert status["earnings"] == [[epoch, paid]]
                assert status["requests_served"] == 1
