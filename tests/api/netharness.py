"""Real nodes for shim tests: libp2p on 127.0.0.1, a real engine per node, the real serve handler.

`async with network(...) as net:` starts one relay, the nodes asked for (each with its own
engine thread on a test model, its capability record and provider entry), a shim peer with a
`NetworkBackend`, and the shim's HTTP app on hypercorn. `net.url` is the openai base URL.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, aclosing, asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import trio

from darkbloom.metrics import ShimMetrics as Metrics
from darkbloom.api.network import NetworkBackend
from darkbloom.config import ApiConfig
from darkbloom.inference.catalog import model_info
from darkbloom.inference.engine import Admitted, ChoiceFinished, open_engine
from darkbloom.node.serve import InferenceService, ServedRequest, open_embedder, serve_inference
from darkbloom.p2p.testing import Member, Swarm, swarm
from darkbloom.wire.caps import CapabilityRecord, ModelCap
from darkbloom.wire.infer import PROTOCOL_VERSION

from .harness import running_shim

CHAT = "tiny-chat"
EMBED = "all-minilm-l6-v2"
OFFLINE = "known-offline-model"


class SpotCheckLog:
    """Collects the shim's spot-check verdicts (`backend.on_spot_check`); `checked` is set by the first."""

    def __init__(self, backend: NetworkBackend) -> None:
        self.verdicts: list[tuple[str, object]] = []
        self.checked = trio.Event()
        backend.on_spot_check = self.record

    def record(self, served_by: str, verdict: object) -> None:
        self.verdicts.append((served_by, verdict))
        self.checked.set()


class HoldingEngine:
    """A real engine whose answers wait after `Admitted` until `release` is set (failover tests)."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.admitted = trio.Event()
        self.release = trio.Event()

    def load(self):
        return self.engine.load()

    async def generate(self, model_id: str, req: Any):
        async with aclosing(self.engine.generate(model_id, req)) as events:
            async for event in events:
                yield event
                if isinstance(event, Admitted):
                    self.admitted.set()
                    await self.release.wait()


class LyingEngine:
    """A real engine whose node then claims other output tokens than it generated (a cheat)."""

    def __init__(self, engine: Any, vocab: int = 2048) -> None:
        self.engine = engine
        self.vocab = vocab

    def load(self):
        return self.engine.load()

    async def prompt_ids(self, model_id: str, req: Any):
        return await self.engine.prompt_ids(model_id, req)

    async def score(self, *args: Any, **kwargs: Any):
        return await self.engine.score(*args, **kwargs)

    async def generate(self, model_id: str, req: Any):
        rng = random.Random(7)
        async with aclosing(self.engine.generate(model_id, req)) as events:
            async for event in events:
                if isinstance(event, ChoiceFinished):
                    event = dataclasses.replace(event, token_ids=tuple(rng.randrange(5, self.vocab - 8)
                                                                       for _ in event.token_ids))
                yield event


@dataclass
class RunningNode:
    member: Member
    service: InferenceService
    engine: Any
    served: list[ServedRequest] = field(default_factory=list)
    served_event: trio.Event = field(default_factory=trio.Event)

    @property
    def peer_id(self) -> str:
        return self.member.peer_id

    def on_served(self, s: ServedRequest) -> None:
        self.served.append(s)
        self.served_event.set()
        self.served_event = trio.Event()

    async def served_with(self, outcome: str, *, after: int = 0) -> ServedRequest:
        """The first request served after the `after`-th one that ended with `outcome`."""
        seen = after
        while True:
            for s in self.served[seen:]:
                if s.outcome == outcome:
                    return s
            seen = len(self.served)
            await self.served_event.wait()

    async def served_nth(self, n: int) -> ServedRequest:
        """The n-th request this node finished serving (1-based), waiting for it if need be."""
        while len(self.served) < n:
            await self.served_event.wait()
        return self.served[n - 1]


@dataclass
class TestNetwork:
    __test__ = False
    swarm: Swarm
    nodes: list[RunningNode]
    backend: NetworkBackend
    metrics: Metrics
    url: str = ""


async def run_node(
    s: Swarm,
    chat_dir: Path | None,
    *,
    embed_dir: Path | None = None,
    decode_tps: float = 100.0,
    max_concurrent: int = 4,
    max_queue: int = 8,
    hold: bool = False,
    lie: bool = False,
    region: str = "",
    reachability: str = "public",
    task_status: trio.TaskStatus[RunningNode] = trio.TASK_STATUS_IGNORED,
) -> None:
    """One node for the life of the swarm's nursery: engine/embedder, libp2p member, record, provider."""
    async with AsyncExitStack() as stack:
        caps = []
        digests: dict[str, str] = {}
        engine: Any = None
        embedders = {}
        if chat_dir is not None:
            info = model_info(CHAT, chat_dir, "chat")
            engine = await stack.enter_async_context(open_engine(
                [(CHAT, chat_dir)], max_concurrent=max_concurrent, max_queue=max_queue, self_benchmark=False))
            if hold:
                engine = HoldingEngine(engine)
            if lie:
                engine = LyingEngine(engine)
            caps.append(ModelCap(id=CHAT, digest=info.digest, context_length=info.context_length,
                                 quantization=info.quantization, features=info.features))
            digests[CHAT] = info.digest
        if embed_dir is not None:
            info = model_info(EMBED, embed_dir, "embedding")
            embedders[EMBED] = await stack.enter_async_context(open_embedder(embed_dir, model_id=EMBED))
            caps.append(ModelCap(id=EMBED, digest=info.digest, context_length=info.context_length,
                                 quantization=info.quantization, features=info.features))
            digests[EMBED] = info.digest
        member = await s.add("node", reachability=reachability)
        node = RunningNode(member=member, service=None, engine=engine)  # type: ignore[arg-type]
        node.service = InferenceService(engine, digests=digests, embedders=embedders, on_served=node.on_served,
                                        identity=member.identity)
        serve_inference(member.net, node.service)
        await member.net.put_record(CapabilityRecord(
            peer_id="", seq=0, issued_at_ms=0, expires_at_ms=0, models=tuple(caps), decode_tps=decode_tps,
            max_concurrent=max_concurrent, region=region, price_input_per_m=100, price_output_per_m=400,
            software_version="test", protocol_version=PROTOCOL_VERSION,
        ))
        for cap in caps:
            await member.net.provide(cap.id)
        task_status.started(node)
        await trio.sleep_forever()


@asynccontextmanager
async def network(
    chat_dir: Path | None,
    node_specs: list[dict[str, Any]],
    *,
    api: dict[str, Any] | None = None,
    trust: Any | None = None,
) -> AsyncIterator[TestNetwork]:
    """Relay + nodes (one per spec: kwargs of `start_node`) + shim peer + HTTP shim."""
    async with swarm(nodes=0, relays=1, clients=0) as s:
        nodes = []
        for spec in node_specs:
            spec = dict(spec)
            chat = spec.pop("chat_dir", chat_dir)
            nodes.append(await s.nursery.start(partial(run_node, s, chat, **spec)))
        shim_member = await s.add("shim")
        cfg = dataclasses.replace(ApiConfig(), **(api or {}))
        backend = NetworkBackend(shim_member.net, cfg, known_models={CHAT, EMBED, OFFLINE}, trust=trust)
        metrics = Metrics()
        net = TestNetwork(swarm=s, nodes=nodes, backend=backend, metrics=metrics)
        async with running_shim(backend, metrics=metrics, **(api or {})) as url:
            net.url = url
            yield net
