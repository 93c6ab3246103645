"""The real relay and node daemons on loopback: the relay probes the node and sends it capability canaries paid from its
canary account (the node requires payment), publishes the table, and the node's status page shows its reputation and the
class the relay derived instead of n/a."""

from __future__ import annotations

import dataclasses

import httpx
import trio

from darkbloom.config import Config, LedgerConfig, ModelSpec, NodeConfig
from darkbloom.up import _role_config


async def test_relay_canaries_a_paying_node_and_the_node_shows_its_reputation(tmp_path, tiny_model_dir):
    from darkbloom.node.daemon import open_node
    from darkbloom.p2p.keys import public_key_from_peer_id
    from darkbloom.relay.daemon import open_relay

    base = Config(data_dir=str(tmp_path), ledger=LedgerConfig(epoch_s=3600), node=NodeConfig(status_port=0),
                  api=dataclasses.replace(Config().api, port=0))
    relay_cfg = _role_config(base, tmp_path / "relay", relay={"listen_addrs": ("/ip4/127.0.0.1/tcp/0",), "status_port": 0,
                                                               "probe_interval_s": 0.0, "canary_interval_s": 0.0})
    with trio.fail_after(240):
        async with open_relay(relay_cfg) as relay:
            boot = relay.addrs
            node_cfg = _role_config(base, tmp_path / "node", p2p={"bootstrap": boot},
                                    inference={"models": (ModelSpec(id="tiny", path=str(tiny_model_dir)),),
                                               "self_benchmark": False})
            async with open_node(node_cfg, bootstrap=boot) as node:
                async with httpx.AsyncClient() as http:
                    before = (await http.get(f"{node.status_url}/status.json")).json()
                # no table fetched yet, or the empty first one: the prior for a node without history
                assert before["reputation"] in (None, 0.5)

                prober = relay.prober
                prober.models = ("tiny",)
                assert node.peer_id in await prober.discover()
                await prober.probe_round()
                await prober.probe_round()  # uptime covers the interval between two probes
                plan = prober.plan([node.peer_id])
                assert plan, "the tiny model advertises canaried features"
                await prober.canary_round()
                key = public_key_from_peer_id(node.peer_id).hex()
                results = relay.trust.observed[key].canaries
                assert set(results) == {f for _, _, f in plan}
                # paid: the relay's canary account opened a lane with the node and has spent from it
                balance, reserved = await relay.ledger.ledger.call(relay.store.balance, relay.ledger_key)
                assert reserved > 0 and balance + reserved <= relay_cfg.relay.canary_budget

                await node._final_submit()
                await relay.ledger.settle_now()  # publishes the table
                await node.refresh_reputation()
                async with httpx.AsyncClient() as http:
                    after = (await http.get(f"{node.status_url}/status.json")).json()
                    page = (await http.get(f"{node.status_url}/")).text
    entry = next(e for e in relay.trust.table.entries if e.node == key)
    assert entry.consumers == 0  # the relay's own canaries do not make a paying consumer
    assert after["reputation"] == entry.score_ppm / 1e6
    assert after["reputation_epoch"] == 1 and after["observed_class"] == "new"
    assert "n/a" not in after["reputation_text"]
    assert f"<td id=reputation>{after['reputation_text']}</td>" in page
