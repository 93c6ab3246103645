"""The `darkbloom` command: parses arguments and hands each subcommand to its package.

Each subcommand lives in a module with `add_arguments(parser)` and `run(args, config) -> int`;
this file only wires them up and turns errors into one line (the traceback with -v).
"""

from __future__ import annotations

import argparse
import errno
import importlib
import importlib.util
import logging
import os
import sys
import threading
import traceback
from collections.abc import Sequence

from darkbloom import __version__
from darkbloom.errors import DarkbloomError

__all__ = ["main", "console", "SUBCOMMANDS"]

# name -> (module, one-line help). The module may not exist yet; then the command says so.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "up": ("darkbloom.up", "run a relay, two nodes and a shim on 127.0.0.1 (try it)"),
    "node": ("darkbloom.node.commands", "run an operator's node, or show its status"),
    "relay": ("darkbloom.relay.commands", "run a bootstrap relay with the ledger service"),
    "shim": ("darkbloom.api.commands", "run the OpenAI-compatible API shim"),
    "ledger": ("darkbloom.ledger.commands", "deposit, balances, history, payouts, settlement"),
    "models": ("darkbloom.inference.commands", "prepare bundled models, build test models"),
    "crawl": ("darkbloom.sim.crawl_commands", "walk the live DHT and write the topology"),
    "sim": ("darkbloom.sim.commands", "run a network simulation scenario"),
}


def _module_exists(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


def _common_options(*, in_subcommand: bool) -> argparse.ArgumentParser:
    """Options accepted both before and after the subcommand.

    After it, defaults are suppressed so that `darkbloom --config X up` keeps X.
    """
    unset = argparse.SUPPRESS if in_subcommand else None
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", metavar="FILE", default=unset, help="darkbloom.toml to read (default: none, or $DARKBLOOM_CONFIG)")
    common.add_argument("--data-dir", metavar="DIR", default=unset, help="where identity, state and logs live (default: ~/.darkbloom)")
    verbosity = common.add_mutually_exclusive_group()
    verbosity.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS if in_subcommand else 0, help="more logging; tracebacks on errors")
    verbosity.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS if in_subcommand else False, help="warnings and errors only")
    return common


def _share_common_options(parser: argparse.ArgumentParser) -> None:
    """Accept the common options after nested actions too (`darkbloom models prepare -q`)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                known = {opt for a in child._actions for opt in a.option_strings}
                if "--config" not in known:
                    child._add_container_actions(_common_options(in_subcommand=True))
                _share_common_options(child)


def build_parser() -> argparse.ArgumentParser:
    common = _common_options(in_subcommand=False)
    sub_common = _common_options(in_subcommand=True)

    parser = argparse.ArgumentParser(
        prog="darkbloom",
        description="Peer-to-peer inference on Apple Silicon Macs, with an OpenAI-compatible API.",
        parents=[common],
    )
    parser.add_argument("--version", action="version", version=f"darkbloom {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text, parents=[sub_common])
        p.set_defaults(_module=module_name)
        if _module_exists(module_name):
            importlib.import_module(module_name).add_arguments(p)
            _share_common_options(p)
        else:
            p.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
            p.set_defaults(_module=None)
    return parser


def _overrides(args: argparse.Namespace) -> dict:
    """Flags that map onto config keys: `--data-dir` and any `cfg__section__key` dests."""
    out = {}
    if getattr(args, "data_dir", None):
        out["data_dir"] = args.data_dir
    for name, value in vars(args).items():
        if name.startswith("cfg__") and value is not None:
            _, section, key = name.split("__", 2)
            out[f"{section}.{key}"] = value
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    verbose = getattr(args, "verbose", 0)
    from darkbloom import log
    from darkbloom.config import load_config

    try:
        config = load_config(args.config, overrides=_overrides(args))
        if args._module is None:
            print(f"darkbloom {args.command}: not built yet in this version", file=sys.stderr)
            return 2
        level = "DEBUG" if verbose else ("WARNING" if args.quiet else config.log_level)
        log.configure(level)
        module = importlib.import_module(args._module)
        return int(module.run(args, config) or 0)
    except KeyboardInterrupt:
        return 130
    except (DarkbloomError, OSError, BaseExceptionGroup) as exc:
        # Daemons run in trio nurseries, which wrap errors in groups: report the first leaf
        # that is ours to explain; anything else is a bug and keeps its traceback.
        leaf = _explainable(exc)
        if leaf is None:
            raise
        if isinstance(leaf, DarkbloomError):
            return _fail(str(leaf), leaf.hint, verbose)
        if leaf.errno == errno.EADDRINUSE:
            return _fail(f"address already in use: {leaf.strerror or leaf}", "stop the other process or pick another port", verbose)
        where = f" {leaf.filename}" if leaf.filename else ""
        return _fail(f"permission denied{where}", "choose a writable --data-dir or run as a user who may", verbose)


def console() -> None:
    """The process entry point (`darkbloom` and `python -m darkbloom`): `main`, then a hard exit.

    A daemon that loaded MLX can die at the very end of a clean stop with SIGABRT ("terminate
    called without an active exception"): C++ static destructors (MLX's stream threads, the
    BLAS thread pool) run during interpreter teardown, after our work is over. Once `main` has
    returned, everything we own is closed, so the output is flushed, the remaining non-daemon
    threads are joined as Python would, and the process leaves with `os._exit`, skipping that
    teardown. Tests call `main` in-process and are unaffected."""
    code = main()
    for thread in threading.enumerate():
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass  # a closed pipe: nothing more can be said anyway
    os._exit(code)


def _explainable(exc: BaseException) -> DarkbloomError | OSError | None:
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            if (found := _explainable(inner)) is not None:
                return found
        return None
    if isinstance(exc, DarkbloomError):
        return exc
    if isinstance(exc, OSError) and exc.errno in (errno.EADDRINUSE, errno.EACCES, errno.EPERM, errno.EROFS):
        return exc
    return None


def _fail(message: str, hint: str, verbose: int) -> int:
    if verbose:
        traceback.print_exc()
    line = f"darkbloom: error: {message}"
    if hint:
        line += f" ({hint})"
    print(line, file=sys.stderr)
    logging.shutdown()
    return 2
