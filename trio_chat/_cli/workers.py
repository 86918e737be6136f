"""``trio-chat serve --workers N``: N instances on one port, supervised.

Each worker is a ``trio-chat serve`` child process with an instance id of its own
(``<id>-w<n>``) and ``server.reuse_port`` set, so the kernel spreads new connections over all
of them (SO_REUSEPORT). The supervisor restarts a worker that exits on its own (with a capped
backoff), and on SIGTERM/SIGINT passes SIGTERM to every worker, waits for them to drain, and
exits 0 when they all did.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from typing import TYPE_CHECKING

import trio

if TYPE_CHECKING:
    from collections.abc import Sequence

    from .._config import Config

logger = logging.getLogger(__name__)

#: restart delays for a worker that keeps crashing, seconds
_BACKOFF = (0.5, 1.0, 2.0, 5.0, 10.0)
#: a worker that ran this long before exiting was healthy: its backoff starts over
_HEALTHY_RUN = 30.0


def worker_command(config: Config, n: int, argv: Sequence[str]) -> list[str]:
    """Worker ``n``'s command line: the supervisor's own, then the flags that make it one
    worker (the last occurrence of a flag wins): its instance id and admin port, a shared port."""
    command = [sys.executable, "-m", "trio_chat", "serve", *argv, "--workers", "1"]
    command += ["--instance-id", f"{config.server.instance_id}-w{n}"]
    command += ["--port", str(config.server.port)]
    if config.admin.port:
        command += ["--admin-port", str(config.admin.port + n)]
    return command


async def supervise(config: Config, argv: Sequence[str]) -> int:
    """Run ``config.server.workers`` workers of ``trio-chat serve ARGV`` until a signal.

    Returns:
        0 when every worker drained cleanly after SIGTERM/SIGINT, 1 otherwise.
    """
    if config.server.port == 0:
        raise ValueError("--workers needs a fixed server.port: each worker binds the same one")
    stopping = trio.Event()
    codes: dict[int, int] = {}
    # reuse_port has no flag: the environment sets it, above any config file
    env = {**os.environ, "TRIO_CHAT_SERVER_REUSE_PORT": "true"}
    kill_after = config.server.shutdown_timeout + 5
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            for n in range(config.server.workers):
                command = worker_command(config, n, argv)
                nursery.start_soon(_keep_running, n, command, env, kill_after, stopping, codes)
            async for signum in signals:
                logger.info("received %s: stopping the workers", signal.Signals(signum).name)
                stopping.set()
                break
    return 0 if all(code == 0 for code in codes.values()) else 1


async def _keep_running(
    n: int,
    command: list[str],
    env: dict[str, str],
    kill_after: float,
    stopping: trio.Event,
    codes: dict[int, int],
) -> None:
    failures = 0
    while True:
        started = trio.current_time()
        process = await trio.lowlevel.open_process(command, env=env, stdin=subprocess.DEVNULL)
        logger.info("worker %d started (pid %d)", n, process.pid)
        async with trio.open_nursery() as watch:
            watch.start_soon(_terminate_on, stopping, process, kill_after)
            codes[n] = await process.wait()
            watch.cancel_scope.cancel()
        if stopping.is_set():
            logger.info("worker %d stopped with exit code %d", n, codes[n])
            return
        failures = 0 if trio.current_time() - started > _HEALTHY_RUN else failures + 1
        delay = _BACKOFF[min(failures, len(_BACKOFF) - 1)]
        logger.error("worker %d exited with %d; restarting in %.1fs", n, codes[n], delay)
        with trio.move_on_after(delay):
            await stopping.wait()
        if stopping.is_set():
            return


async def _terminate_on(stopping: trio.Event, process: trio.Process, kill_after: float) -> None:
    """SIGTERM once stopping; SIGKILL if the worker has not drained ``kill_after`` later."""
    await stopping.wait()
    process.send_signal(signal.SIGTERM)
    await trio.sleep(kill_after)
    logger.error("worker pid %d did not drain in %.0fs: killing it", process.pid, kill_after)
    process.kill()
