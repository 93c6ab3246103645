"""`darkbloom up`: a whole network on 127.0.0.1 in one process, to try Darkbloom.

A relay (DHT bootstrap, circuit relay hop, ledger), a chat node with the bundled SmolLM2, an
embeddings node with the bundled MiniLM, and the OpenAI-compatible shim, each with its own
identity and data dir under `<data dir>/up/`. The shim's ledger account is funded with test
credits on first start. Ctrl-C stops everything cleanly.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import trio

from darkbloom.config import Config, ModelSpec

__all__ = ["LocalNetwork", "add_arguments", "check_ports_free", "fixed_ports", "open_local_network", "run", "try_it_lines"]

log = logging.getLogger(__name__)

CHAT_MODEL = "smollm2-135m-instruct"
EMBEDDING_MODEL = "all-minilm-l6-v2"
TEST_CREDITS = 100_000_000  # micro-credits given to the local user's account on first start
LOOPBACK = ("/ip4/127.0.0.1/tcp/0",)


@dataclass
class LocalNetwork:
    base_dir: Path
    relay: object
    nodes: list
    shim: object
    account: str
    started_in_s: float

    @property
    def base_url(self) -> str:
        return f"{self.shim.url}/v1"  # type: ignore[attr-defined]


def _role_config(config: Config, data_dir: Path, **sections: dict) -> Config:
    """`config` with a role's data dir, loopback networking and the given section overrides."""
    p2p = dataclasses.replace(
        config.p2p, listen_addrs=LOOPBACK, announce_addrs=(), use_bundled_bootstrap=False, reachability="public"
    )
    changes: dict = {"data_dir": str(data_dir), "p2p": p2p}
    for name, values in sections.items():
        changes[name] = dataclasses.replace(changes.get(name, getattr(config, name)), **values)
    return dataclasses.replace(config, **changes)


def _status_port(config: Config, offset: int, default: int) -> int:
    """Fixed ports next to the shim's by default; all ephemeral when the shim's port is 0."""
    return 0 if config.api.port == 0 else default + offset


def fixed_ports(config: Config) -> list[tuple[int, str]]:
    """The fixed ports `darkbloom up` will listen on, with what each is for (none when --port 0)."""
    if config.api.port == 0:
        return []
    return [(config.api.port, "the OpenAI-compatible shim"),
            (_status_port(config, 10, config.relay.status_port), "the relay's status page"),
            (_status_port(config, 0, config.node.status_port), "the chat node's status page"),
            (_status_port(config, 1, config.node.status_port), "the embeddings node's status page")]


def check_ports_free(config: Config) -> None:
    """Fail before loading any model when a fixed port is taken, naming the port and what it was for."""
    import errno
    import socket

    from darkbloom.errors import ConfigError

    for port, purpose in fixed_ports(config):
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers do: TIME_WAIT is no conflict
            try:
                probe.bind((config.api.host, port))
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE:
                    raise
                raise ConfigError(f"port {port} ({purpose}) is already in use on {config.api.host}",
                                  hint="stop the other process (another darkbloom up?), or run `darkbloom up --port 0` "
                                       "to use free ports for every role") from None


@asynccontextmanager
async def open_local_network(config: Config, *, chat_models: tuple[ModelSpec, ...] | None = None,
                             embedding_models: tuple[ModelSpec, ...] | None = None,
                             progress: Callable[[str, int, int], None] | None = None) -> AsyncIterator[LocalNetwork]:
    from darkbloom.api.shim import open_shim, shim_dir
    from darkbloom.identity import load_or_create_identity
    from darkbloom.node.daemon import open_node
    from darkbloom.p2p.network import open_network
    from darkbloom.relay.daemon import open_relay
    from darkbloom.runner import join_network

    started = time.monotonic()
    base = config.data_path / "up"
    chat_models = chat_models if chat_models is not None else (ModelSpec(id=CHAT_MODEL),)
    embedding_models = embedding_models if embedding_models is not None else (ModelSpec(id=EMBEDDING_MODEL, kind="embedding"),)
    async with AsyncExitStack() as stack:
        relay_cfg = _role_config(config, base / "relay", relay={"listen_addrs": LOOPBACK,
                                                               "status_port": _status_port(config, 10, config.relay.status_port)})
        relay = await stack.enter_async_context(open_relay(relay_cfg))
        bootstrap = relay.addrs
        nodes = []
        for i, (name, models) in enumerate((("node-chat", chat_models), ("node-embed", embedding_models))):
            if not models:
                continue
            node_cfg = _role_config(
                config, base / name,
                p2p={"bootstrap": bootstrap},
                inference={"models": models},
                node={"status_port": _status_port(config, i, config.node.status_port)},
            )
            nodes.append(await stack.enter_async_context(open_node(node_cfg, bootstrap=bootstrap, progress=progress)))
        shim_cfg = _role_config(config, base, p2p={"bootstrap": bootstrap})
        identity = load_or_create_identity(shim_dir(shim_cfg))
        account = identity.public_key.hex()
        balance, reserved = await trio.to_thread.run_sync(relay.store.balance, account)
        if balance == 0 and reserved == 0:
            await trio.to_thread.run_sync(lambda: relay.store.deposit(account, TEST_CREDITS, now_ms=int(time.time() * 1000)))
            log.info("funded the local account %s with %d test micro-credits", account[:16], TEST_CREDITS)
        network = await stack.enter_async_context(open_network(shim_cfg.p2p, identity, role="shim", bootstrap=bootstrap))
        await join_network(network)
        shim = await stack.enter_async_context(open_shim(shim_cfg, network))
        yield LocalNetwork(base, relay, nodes, shim, account, time.monotonic() - started)


def try_it_lines(base_url: str) -> list[str]:
    """What `darkbloom up` prints to try the network: a curl line and a three-line openai SDK example.

    Greedy and bounded (temperature 0, at most 64 tokens): the bundled 135M model wanders at
    OpenAI's default temperature of 1 and would write the default 512 tokens, minutes on a CPU.
    """
    ask = '[{"role": "user", "content": "What is the capital of France?"}]'
    body = f'{{"model": "{CHAT_MODEL}", "messages": {ask}, "temperature": 0, "max_tokens": 64}}'
    return [
        "Try it with curl:",
        f"  curl {base_url}/chat/completions -H 'Content-Type: application/json' -d '{body}'",
        "",
        "Or with the openai SDK (python):",
        "  from openai import OpenAI",
        f'  client = OpenAI(base_url="{base_url}", api_key="local")',
        f'  print(client.chat.completions.create(model="{CHAT_MODEL}", messages={ask}, temperature=0, '
        f"max_tokens=64).choices[0].message.content)",
        "",
    ]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--port", type=int, dest="cfg__api__port", metavar="PORT",
                        help="the shim's port (default 8080; 0 picks free ports for every role)")


def run(args: argparse.Namespace, config: Config) -> int:
    return trio.run(_run, config)


async def _run(config: Config) -> int:
    from darkbloom.runner import run_until_signal

    check_ports_free(config)

    async def body(stop: trio.Event) -> None:
        print("starting a relay, a chat node, an embeddings node and the shim on 127.0.0.1 ...", flush=True)
        from darkbloom.node.commands import startup_bar

        bar = startup_bar()  # model preparation, load and self-benchmark, as `darkbloom node` shows them
        async with open_local_network(config, progress=bar) as net:
            bar.finish()
            url = net.base_url
            print(f"\nDarkbloom is up in {net.started_in_s:.1f} s. OpenAI-compatible base_url: {url}\n", flush=True)
            for line in try_it_lines(url):
                print(line, flush=True)
            for node in net.nodes:
                print(f"node {node.peer_id[-8:]} ({', '.join(m.id for m in node.models)}): status page {node.status_url}",
                      flush=True)
            print(f"relay status and metrics: {net.relay.status_url}", flush=True)
            print("Press Ctrl-C to stop.", flush=True)
            await stop.wait()
            print("stopping ...", flush=True)
        print("stopped.", flush=True)

    return await run_until_signal(body)
