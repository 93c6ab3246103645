"""Operator controls from the config reach a running node: price, region, class and max concurrent
requests in its signed capability record (read back from the DHT by another peer) and on its status
page; a pause window covering now pauses it, and a shim's request is refused rather than served."""

from __future__ import annotations

import dataclasses
import datetime as dt

import httpx
import pytest
import trio

from darkbloom.config import Config, LedgerConfig, ModelSpec, NodeConfig
from darkbloom.up import _role_config


def window_around_now() -> str:
    now = dt.datetime.now()
    start, end = now - dt.timedelta(minutes=1), now + dt.timedelta(minutes=30)
    return f"{start:%H:%M}-{end:%H:%M}"  # wraps past midnight when it must


async def test_configured_controls_reach_the_record_the_status_page_and_the_shim(tmp_path, tiny_model_dir):
    from openai import APIStatusError, AsyncOpenAI

    from darkbloom.api.shim import open_shim, shim_dir
    from darkbloom.identity import load_or_create_identity
    from darkbloom.node.daemon import open_node
    from darkbloom.p2p.network import open_network
    from darkbloom.p2p.status import query_status
    from darkbloom.relay.daemon import open_relay

    base = Config(data_dir=str(tmp_path), ledger=LedgerConfig(epoch_s=3600),
                  node=NodeConfig(status_port=0), api=dataclasses.replace(Config().api, port=0, max_attempts=1))
    base = dataclasses.replace(base, relay=dataclasses.replace(base.relay, status_port=0))
    controls = {"status_port": 0, "price_input_per_m": 123_000, "price_output_per_m": 456_000, "region": "eu-west",
                "node_class": "desktop", "max_memory_mb": 64_000, "pause_on_battery": False,
                "pause_windows": (window_around_now(),)}
    with trio.fail_after(240):
        async with open_relay(_role_config(base, tmp_path / "relay", relay={"listen_addrs": ("/ip4/127.0.0.1/tcp/0",)})) as relay:
            boot = relay.addrs
            node_cfg = _role_config(base, tmp_path / "node", p2p={"bootstrap": boot}, node=controls,
                                    inference={"models": (ModelSpec(id="tiny", path=str(tiny_model_dir)),),
                                               "self_benchmark": False, "max_concurrent": 3})
            async with open_node(node_cfg, bootstrap=boot) as node:
                shim_cfg = _role_config(base, tmp_path, p2p={"bootstrap": boot})
                ident = load_or_create_identity(shim_dir(shim_cfg))
                await trio.to_thread.run_sync(lambda: relay.store.deposit(ident.public_key.hex(), 10_000_000, now_ms=0))
                async with open_network(shim_cfg.p2p, ident, role="shim", bootstrap=boot) as net:
                    await net.wait_joined()
                    record = await net.get_record(node.peer_id, fresh=True)
                    assert record is not None
                    assert (record.price_input_per_m, record.price_output_per_m) == (123_000, 456_000)
                    assert (record.region, record.node_class, record.max_concurrent) == ("eu-west", "desktop", 3)
                    live = await query_status(net, node.peer_id)
                    assert live.load.paused and live.load.max_concurrent == 3

                    async with open_shim(shim_cfg, net) as shim, httpx.AsyncClient() as http:
                        status = (await http.get(f"{node.status_url}/status.json")).json()
                        client = AsyncOpenAI(base_url=f"{shim.url}/v1", api_key="local", max_retries=0)
                        with pytest.raises(APIStatusError) as refused:
                            await client.chat.completions.create(
                                model="tiny", max_tokens=4, messages=[{"role": "user", "content": "hello"}])
                        await client.close()
    assert refused.value.status_code == 503
    assert status["paused"] and status["pause_reason"].startswith("inside pause window")
    assert any(line.startswith("Paused by your settings: inside pause window") for line in status["explanations"])
    assert (status["region"], status["node_class"], status["max_concurrent"]) == ("eu-west", "desktop", 3)
    assert (status["price_input_per_m"], status["price_output_per_m"]) == (123_000, 456_000)
    assert status["requests_served"] == 0


def test_operator_flags_map_onto_the_config(tmp_path):
    from darkbloom.cli import _overrides, build_parser
    from darkbloom.config import load_config

    args = build_parser().parse_args(["--data-dir", str(tmp_path), "node", "--price-in", "7", "--price-out", "9",
                                      "--region", "us-east", "--max-concurrent", "2", "--status-port", "0"])
    config = load_config(None, env={}, overrides=_overrides(args))
    assert (config.node.price_input_per_m, config.node.price_output_per_m, config.node.region) == (7, 9, "us-east")
    assert config.inference.max_concurrent == 2 and config.node.status_port == 0


def test_every_control_is_a_config_key_with_its_environment_variable(tmp_path):
    from darkbloom.config import load_config

    toml = tmp_path / "darkbloom.toml"
    toml.write_text('[node]\nmax_memory_mb = 8000\npause_windows = ["22:00-07:00"]\npause_on_battery = false\n'
                    'pause_when_user_active = true\nuser_idle_s = 120\nnode_class = "laptop"\n'
                    '[inference]\nmax_concurrent = 2\n')
    config = load_config(toml, env={"DARKBLOOM_NODE_REGION": "ap-south", "DARKBLOOM_NODE_PRICE_OUTPUT_PER_M": "5"})
    node = config.node
    assert (node.max_memory_mb, node.pause_windows, node.pause_on_battery) == (8000, ("22:00-07:00",), False)
    assert (node.pause_when_user_active, node.user_idle_s, node.node_class) == (True, 120, "laptop")
    assert (node.region, node.price_output_per_m, config.inference.max_concurrent) == ("ap-south", 5, 2)
