"""Running a role until SIGINT/SIGTERM: the first signal starts a graceful stop, a second forces it."""

from __future__ import annotations

import logging
import signal
from collections.abc import Awaitable, Callable

import trio

__all__ = ["run_until_signal"]

log = logging.getLogger(__name__)


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
