"""`darkbloom shim`: run the OpenAI-compatible API shim, or manage its API keys.

    darkbloom shim [--host H] [--port P] [--hosted --tls-cert F --tls-key F] [--require-key]
    darkbloom shim keys create NAME [--account A] [--rpm N] [--tpm N] [--quota-tokens N]
    darkbloom shim keys list
    darkbloom shim keys revoke KEY_ID

The shim joins the network as a DHT client with its own identity (<data dir>/shim/identity.key).
Heavy imports (libp2p, quart) happen inside `run`.
"""

from __future__ import annotations

import argparse
import sys
from datetime import datetime, timezone

from darkbloom.config import Config

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", dest="cfg__api__host", metavar="HOST", help="listen address (default 127.0.0.1)")
    parser.add_argument("--port", dest="cfg__api__port", type=int, metavar="PORT", help="listen port (default 8080)")
    parser.add_argument("--hosted", dest="cfg__api__hosted", action="store_const", const=True,
                        help="public mode: TLS and API keys required; listens on 0.0.0.0 unless --host")
    parser.add_argument("--tls-cert", dest="cfg__api__tls_cert", metavar="FILE", help="TLS certificate (PEM), hosted mode")
    parser.add_argument("--tls-key", dest="cfg__api__tls_key", metavar="FILE", help="TLS private key (PEM), hosted mode")
    parser.add_argument("--require-key", dest="cfg__api__require_api_key", action="store_const", const=True,
                        help="local mode, but callers need an API key")
    sub = parser.add_subparsers(dest="shim_command", metavar="ACTION")
    keys = sub.add_parser("keys", help="create, list or revoke API keys (hosted mode)")
    ks = keys.add_subparsers(dest="keys_command", metavar="ACTION", required=True)
    p = ks.add_parser("create", help="make a key; it is shown once")
    p.add_argument("name", help="a label for the key")
    p.add_argument("--account", default="", help="ledger account it spends from (default: one per key)")
    p.add_argument("--rpm", type=int, default=0, help="requests per minute (0: unlimited)")
    p.add_argument("--tpm", type=int, default=0, help="tokens per minute (0: unlimited)")
    p.add_argument("--quota-tokens", type=int, default=0, help="total tokens allowed (0: unlimited)")
    ks.add_parser("list", help="keys with limits and usage (never the secrets)")
    p = ks.add_parser("revoke", help="revoke a key by id; a running shim refuses it within seconds")
    p.add_argument("key_id")


def run(args: argparse.Namespace, config: Config) -> int:
    if getattr(args, "shim_command", None) == "keys":
        return _keys(args, config)
    import dataclasses

    import trio

    if config.api.hosted and args.cfg__api__host is None and config.api.host == "127.0.0.1":
        # Hosted means public: listen on every interface unless told otherwise.
        config = dataclasses.replace(config, api=dataclasses.replace(config.api, host="0.0.0.0"))
    trio.run(_serve, config)
    return 0


async def _serve(config: Config) -> None:
    from darkbloom.api.shim import open_shim, shim_dir
    from darkbloom.identity import load_or_create_identity
    from darkbloom.p2p.network import open_network
    from darkbloom.runner import join_network, run_until_signal

    identity = load_or_create_identity(shim_dir(config))

    async def body(stop) -> None:
        async with open_network(config.p2p, identity, role="shim") as network:
            await join_network(network)
            async with open_shim(config, network, identity=identity) as shim:
                mode = "hosted" if config.api.hosted else "local"
                sys.stdout.write(f"darkbloom shim ({mode}): OpenAI-compatible API at {shim.url}/v1\n")
                state = "joined the network" if network.joined else "still looking for a bootstrap relay"
                sys.stdout.write(f"darkbloom shim: {state} as {network.peer_id}\n")
                sys.stdout.flush()
                await stop.wait()

    await run_until_signal(body)


def _keys(args: argparse.Namespace, config: Config) -> int:
    from darkbloom.api.keys import KeyStore
    from darkbloom.api.limits import KeyLimits
    from darkbloom.api.shim import shim_dir

    store = KeyStore(shim_dir(config))
    try:
        if args.keys_command == "create":
            for flag in ("rpm", "tpm", "quota_tokens"):
                if getattr(args, flag) < 0:
                    sys.stderr.write(f"darkbloom: error: --{flag.replace('_', '-')} must be >= 0\n")
                    return 2
            full, key = store.create_sync(args.name, account=args.account, limits=KeyLimits(
                requests_per_min=args.rpm, tokens_per_min=args.tpm, quota_tokens=args.quota_tokens))
            sys.stdout.write(f"{full}\n")
            sys.stderr.write(f"key {key.id} created for account {key.account}; store it now, it is not shown again\n")
            return 0
        if args.keys_command == "list":
            keys = store.list_sync()
            if not keys:
                sys.stdout.write("no keys (create one with `darkbloom shim keys create NAME`)\n")
            for k in keys:
                state = "revoked" if k.revoked_at else "active"
                made = datetime.fromtimestamp(k.created_at, timezone.utc).strftime("%Y-%m-%d %H:%M")
                sys.stdout.write(
                    f"{k.id}  {state:7}  {k.name}  account={k.account}  rpm={k.limits.requests_per_min or '-'}"
                    f"  tpm={k.limits.tokens_per_min or '-'}  quota={k.limits.quota_tokens or '-'}"
                    f"  used_tokens={k.used_tokens}  requests={k.requests}  created={made}Z\n")
            return 0
        if store.revoke_sync(args.key_id):
            sys.stdout.write(f"key {args.key_id} revoked\n")
            return 0
        sys.stderr.write(f"darkbloom: error: no active key {args.key_id} (see `darkbloom shim keys list`)\n")
        return 2
    finally:
        store.close()
