"""The processes the soak starts (``Child``: instances, redis-server, the TUN forwarder),
and the last resort that kills every one of them, and the cluster's nodes, at the end."""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
from contextlib import suppress
from pathlib import Path
from typing import Any

import trio

from .common import ROOT

CHILDREN: list[Child] = []
#: the Redis Cluster of a --cluster run (tests/_redis_cluster.py), whose nodes we also stop
CLUSTERS: list[Any] = []


def _die_with_parent() -> None:
    """In the child, before exec: SIGKILL it when this process dies (PR_SET_PDEATHSIG)."""
    ctypes.CDLL(None).prctl(1, signal.SIGKILL)


class Child:
    """A process we started; ``expected`` is set before every signal that may end it."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        log: Path,
        *,
        env: dict[str, str] | None = None,
        pipes: bool = False,
    ) -> None:
        self.name = name
        self.log = log
        self.expected = False
        with log.open("ab") as sink:
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.PIPE if pipes else subprocess.DEVNULL,
                stdout=subprocess.PIPE if pipes else sink,
                stderr=sink,
                env=env,
                preexec_fn=_die_with_parent,
                start_new_session=True,  # a ^C in the terminal is ours to handle, not theirs
            )
        self.pid = self.proc.pid
        CHILDREN.append(self)

    def exited(self) -> int | None:
        return self.proc.poll()

    def signal(self, signum: int, *, ends_it: bool = True) -> None:
        if ends_it:
            self.expected = True
        if self.proc.poll() is None:
            with suppress(ProcessLookupError):
                os.kill(self.pid, signum)

    async def wait(self, timeout: float) -> int | None:
        """The exit status, or None if it is still running after ``timeout`` seconds."""
        with trio.move_on_after(timeout):
            while (code := self.proc.poll()) is None:
                await trio.sleep(0.05)
            return code
        return None

    def rss_kib(self) -> int | None:
        try:
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        except OSError:
            pass
        return None


def kill_children() -> None:
    """Last resort, also on ^C: nothing we started outlives us."""
    for child in CHILDREN:
        if child.proc.poll() is None:
            child.expected = True
            with suppress(ProcessLookupError):
                os.kill(child.pid, signal.SIGCONT)
                os.kill(child.pid, signal.SIGKILL)
    for child in CHILDREN:
        with suppress(subprocess.TimeoutExpired):
            child.proc.wait(5)
    for cluster in CLUSTERS:  # SIGKILL by pid (a paused node too); its files stay, for the logs
        for port in cluster.ports:
            with suppress(OSError, subprocess.TimeoutExpired):
                cluster.kill(port)


def redis_cluster_class() -> Any:
    """The test fixture's RedisCluster (tests/_redis_cluster.py): used, not copied."""
    tests = str(ROOT / "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)
    from _redis_cluster import RedisCluster  # type: ignore[import-not-found]

    return RedisCluster
