"""Every role's /metrics after real requests: a relay, a node on the tiny model and a shim on
loopback libp2p, the official openai SDK as the client; the series move with the traffic."""

from __future__ import annotations

import dataclasses

import httpx
import trio
from prometheus_client.parser import text_string_to_metric_families

from darkbloom.config import Config, LedgerConfig, ModelSpec, NodeConfig
from darkbloom.up import _role_config

NO_END = {"0": -100, "2": -100}  # the tiny model's end tokens: it generates up to max_tokens


def sample(text: str, name: str, **labels: str) -> float | None:
    """The value of one sample in Prometheus text, None when absent."""
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return None


def total(text: str, name: str, **labels: str) -> float:
    """The sum of every sample of `name` matching `labels` (0 when none)."""
    out = 0.0
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                out += s.value
    return out


FAMILIES = ("darkbloom_requests", "darkbloom_ttft_seconds", "darkbloom_token_latency_seconds", "darkbloom_errors",
            "darkbloom_peers", "darkbloom_relayed_share", "darkbloom_dht_lookups")


async def test_every_role_exposes_the_shared_families_and_they_move(tmp_path, tiny_model_dir):
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
                async with open_network(shim_cfg.p2p, ident, role="shim", bootstrap=boot) as net, \
                        open_shim(shim_cfg, net, known_models={"tiny", "nobody-serves-this"}) as shim, \
                        httpx.AsyncClient() as http:
                    before = (await http.get(f"{node.status_url}/metrics")).text
                    client = AsyncOpenAI(base_url=f"{shim.url}/v1", api_key="local", max_retries=0)
                    reply = await client.chat.completions.create(
                        model="tiny", max_tokens=6, messages=[{"role": "user", "content": "hello"}],
                        extra_body={"logit_bias": NO_END})
                    assert reply.usage.completion_tokens == 6
                    stream = await client.chat.completions.create(
                        model="tiny", max_tokens=12, messages=[{"role": "user", "content": "go on"}], stream=True,
                        extra_body={"logit_bias": NO_END})
                    chunks = [c async for c in stream]
                    assert chunks and chunks[-1].choices[0].finish_reason == "length"
                    try:
                        await client.chat.completions.create(model="nobody-serves-this", max_tokens=2,
                                                             messages=[{"role": "user", "content": "x"}])
                        raise AssertionError("a model nobody serves was answered")
                    except Exception as exc:  # the SDK's 503
                        assert getattr(exc, "status_code", None) == 503, exc
                    await client.close()
                    # A consumer without credit is refused a lane: an error by kind on the relay.
                    from darkbloom.errors import InsufficientFunds
                    from darkbloom.identity import Identity
                    from darkbloom.ledger.client import LedgerClient
                    from darkbloom.wire.ledger import LEDGER_PROTOCOL

                    broke = LedgerClient(await net.open_stream(relay.peer_id, LEDGER_PROTOCOL, addrs=boot),
                                         Identity.generate(), ledger_key=relay.ledger_key)
                    try:
                        await broke.open_lane(node.identity.public_key.hex(), 1000, price_input_per_m=1,
                                              price_output_per_m=1)
                        raise AssertionError("an unfunded account got a lane")
                    except InsufficientFunds:
                        pass
                    finally:
                        await broke.close()
                    await relay.prober.discover()  # the relay's own DHT lookups (its prober's)
                    node_m = (await http.get(f"{node.status_url}/metrics")).text
                    shim_m = (await http.get(f"{shim.url}/metrics")).text
                    relay_m = (await http.get(f"{relay.status_url}/metrics")).text

    for text, role in ((node_m, "node"), (shim_m, "shim"), (relay_m, "relay")):
        declared = {f.name for f in text_string_to_metric_families(text)}
        assert set(FAMILIES) <= declared, (role, set(FAMILIES) - declared)
        assert sample(text, "darkbloom_peers", role=role) >= 1, role

    # node: both requests counted and timed on the node itself
    assert sample(before, "darkbloom_ttft_seconds_count", role="node") == 0
    assert sample(node_m, "darkbloom_requests_total", role="node", kind="chat", outcome="ok") == 2
    assert sample(node_m, "darkbloom_ttft_seconds_count", role="node") == 2
    assert sample(node_m, "darkbloom_token_latency_seconds_count", role="node") >= 6 + 12 - 2 - 2
    assert sample(node_m, "darkbloom_tokens_total", role="node", direction="completion") == 18
    assert total(node_m, "darkbloom_dht_lookups_total", role="node") >= 2  # record and provider entry put
    assert sample(node_m, "darkbloom_routes_total", role="node", route="direct") == 2  # each served stream
    assert sample(node_m, "darkbloom_relayed_share", role="node") == 0.0

    # shim: requests, first tokens, token gaps of the streamed answer, lookups, routes, errors by kind
    assert sample(shim_m, "darkbloom_requests_total", role="shim", kind="chat", outcome="ok") == 2
    assert sample(shim_m, "darkbloom_requests_total", role="shim", kind="chat", outcome="error") == 1
    assert sample(shim_m, "darkbloom_errors_total", role="shim", kind="no_provider") == 1
    assert sample(shim_m, "darkbloom_ttft_seconds_count", role="shim") == 2
    assert sample(shim_m, "darkbloom_token_latency_seconds_count", role="shim") >= 1
    assert sample(shim_m, "darkbloom_dht_lookups_total", role="shim", kind="find_providers", outcome="ok") >= 1
    assert sample(shim_m, "darkbloom_routes_total", role="shim", route="direct") == 2
    assert sample(shim_m, "darkbloom_relayed_share", role="shim") == 0.0

    # relay: ledger requests by kind, a refusal by its kind, its own lookups, settlement and circuit gauges
    assert sample(relay_m, "darkbloom_requests_total", role="relay", kind="open_lane", outcome="ok") >= 1
    assert sample(relay_m, "darkbloom_requests_total", role="relay", kind="open_lane", outcome="error") == 1
    assert sample(relay_m, "darkbloom_errors_total", role="relay", kind="InsufficientFunds") == 1
    assert total(relay_m, "darkbloom_dht_lookups_total", role="relay", kind="get_record") >= 1
    assert sample(relay_m, "darkbloom_settlement_lag_seconds", role="relay") > 0  # no epoch closed yet
    assert sample(relay_m, "darkbloom_relay_circuits_open", role="relay") == 0  # everything here was direct
    assert sample(relay_m, "darkbloom_relay_circuits_started", role="relay") is not None
