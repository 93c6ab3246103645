"""Running a role: joining the network (bounded wait), and running until SIGINT/SIGTERM (graceful, then forced)."""

from __future__ import annotations

import logging
import signal
from collections.abc import Awaitable, Callable

import trio

__all__ = ["JOIN_WAIT_S", "join_network", "run_until_signal"]

log = logging.getLogger(__name__)

JOIN_WAIT_S = 30.0  # how long a starting role waits for a bootstrap relay before going on alone


async def join_network(net) -> None:
    """Wait (bounded) until a bootstrap peer answered, so announcements and lookups reach the network."""
    with trio.move_on_after(JOIN_WAIT_S) as waited:
        await net.wait_joined()
    if waited.cancelled_caught:
        log.warning("no bootstrap relay answered within %.0f s; going on, and joining in the background", JOIN_WAIT_S)


async def run_until_signal(body: Callable[[trio.Event], Awaitable[None]]) -> int:
    """Run `body(stop)`; `stop` is set on the first SIGINT or SIGTERM. Returns the exit code.

    `body` should leave its context managers when `stop` is set (which runs their graceful
    shutdown); a second signal cancels it outright.
    """
    stop = trio.Event()
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:

            async def watch() -> None:
                async for signum in signals:
                    if not stop.is_set():
                        log.info("%s received: stopping (again to force)", signal.Signals(signum).name)
                        stop.set()
                    else:
                        log.warning("second signal: stopping now")
                        nursery.cancel_scope.cancel()

            nursery.start_soon(watch)
            await body(stop)
            nursery.cancel_scope.cancel()
    return 0
