"""Test helper: one Darkbloom peer in its own process (run inside a network namespace).

    ip netns exec NS .venv/bin/python -m tests.p2p.nat_peer ROLE --listen ADDR [--bootstrap ADDR] ...

Prints one JSON object per line on stdout ("ready", then role events); the NAT test reads
them. Roles: relay, node (announces a model and streams tokens), client (finds the model
through the DHT, streams from the node, reports route, tokens and the hole-punch outcome).
"""

from __future__ import annotations

import argparse
import json
import sys

import trio

from darkbloom.config import P2PConfig
from darkbloom.identity import Identity
from darkbloom.p2p.network import open_network
from darkbloom.wire.caps import CapabilityRecord, ModelCap

TOKENS = "/darkbloom/test-tokens/1.0.0"


def emit(**event: object) -> None:
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


def config(args: argparse.Namespace) -> P2PConfig:
    return P2PConfig(
        listen_addrs=(args.listen,),
        bootstrap=tuple(args.bootstrap),
        use_bundled_bootstrap=False,
        reachability=args.reachability,
        record_ttl_s=120.0,
        announce_interval_s=30.0,
        providers_cache_s=0.0,
        dial_timeout_s=5.0,
        bootstrap_retry_max_s=2.0,
    )


async def tokens(stream) -> None:
    count = int((await stream.read(16)).decode() or "0")
    for i in range(count):
        await stream.write(b"tok%04d " % i)
        await trio.sleep(0.005)


async def main(args: argparse.Namespace) -> None:
    role = {"relay": "relay", "node": "node", "client": "shim"}[args.role]
    async with open_network(config(args), Identity.generate(), role=role) as net:  # type: ignore[arg-type]
        emit(event="ready", peer_id=net.peer_id, addrs=list(net.listen_addrs))
        if args.role == "relay":
            await trio.sleep_forever()
        await net.wait_joined()
        if args.role == "node":
            await net.reachability_known.wait()
            if net.reachability == "relayed":
                await net.relay_ready.wait()
            net.serve(TOKENS, tokens)
            template = CapabilityRecord(peer_id="", seq=0, issued_at_ms=0, expires_at_ms=0,
                                        models=(ModelCap(id=args.model, digest="00", context_length=2048),))
            await net.put_record(template)
            await net.provide(args.model)
            emit(event="announced", reachability=net.reachability, addrs=list(net.announce_addrs))
            await trio.sleep_forever()
        found = []
        with trio.move_on_after(30):
            while not found:
                found = await net.find_providers(args.model, fresh=True)
                if not found:
                    await trio.sleep(0.5)  # the node may not have announced yet
        if not found:
            emit(event="result", ok=False, error="no provider found")
            return
        provider = found[0]
        stream = await net.open_stream(provider.peer_id, TOKENS, addrs=provider.addrs)
        await stream.write(b"%d" % args.count)
        data = b""
        while chunk := await stream.read():
            data += chunk
        punch = None
        with trio.move_on_after(12):
            while provider.peer_id not in net.hole_punch_results:
                await trio.sleep(0.1)
            punch = net.hole_punch_results[provider.peer_id]
        emit(event="result", ok=True, peer_id=provider.peer_id, route=stream.route,
             record_reachability=provider.record.reachability, addrs=list(provider.addrs),
             tokens=data.count(b"tok"), hole_punch=punch)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("role", choices=["relay", "node", "client"])
    parser.add_argument("--listen", required=True)
    parser.add_argument("--bootstrap", action="append", default=[])
    parser.add_argument("--reachability", default="auto")
    parser.add_argument("--model", default="nat-model")
    parser.add_argument("--count", type=int, default=200)
    trio.run(main, parser.parse_args())
