"""The network fault layer of ``--netem``: Redis in a network namespace of its own, and
delay, loss and partitions on the link to it (``tc netem`` on a veth pair, or a user-space
forwarder between two TUN devices, run as ``soak.py --_tun-forwarder``)."""

from __future__ import annotations

import fcntl
import heapq
import itertools
import os
import random
import re
import select
import signal
import struct
import subprocess
import sys
import threading
import time
from contextlib import suppress
from typing import TYPE_CHECKING

from .children import Child
from .common import ROOT, SoakError, run_quiet

if TYPE_CHECKING:
    from pathlib import Path

#: the script the TUN forwarder runs in (``--_tun-forwarder``)
SOAK_SCRIPT = ROOT / "bench" / "soak.py"


def _open_tun(name: str) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR)
    fcntl.ioctl(fd, 0x400454CA, struct.pack("16sH", name.encode(), 0x0001 | 0x1000))  # TUNSETIFF
    return fd


def tun_forwarder(ns: str, dev_a: str, dev_b: str, local: str, remote: str) -> int:
    """A user-space netem between two TUN devices: ``dev_a`` here (``local``), ``dev_b`` in the
    namespace ``ns`` (``remote``). Every packet is forwarded after the current delay (kept in
    order per direction), or dropped (loss, partition). Control lines on stdin:
    ``<delay ms> <jitter ms> <loss 0..1> <partition 0|1>``; EOF ends it (and the devices)."""
    fa, fb = _open_tun(dev_a), _open_tun(dev_b)
    run_quiet(["ip", "link", "set", dev_b, "netns", ns])
    run_quiet(["ip", "addr", "add", local, "peer", remote, "dev", dev_a])
    run_quiet(["ip", "link", "set", dev_a, "up"])
    inside = ["ip", "netns", "exec", ns]
    run_quiet([*inside, "ip", "addr", "add", remote, "peer", local, "dev", dev_b])
    run_quiet([*inside, "ip", "link", "set", dev_b, "up"])
    for fd in (fa, fb):
        os.set_blocking(fd, False)
    state = [0.0, 0.0, 0.0, False]

    def control() -> None:
        for line in sys.stdin:
            with suppress(ValueError):
                delay, jitter, loss, partition = line.split()
                state[:] = [
                    float(delay) / 1000,
                    float(jitter) / 1000,
                    float(loss),
                    partition == "1",
                ]
        os._exit(0)

    threading.Thread(target=control, daemon=True).start()
    print("ready", flush=True)
    rng = random.Random()
    queue: list[tuple[float, int, int, bytes]] = []
    last_due = {fa: 0.0, fb: 0.0}
    order = itertools.count()
    while True:
        timeout = max(0.0, queue[0][0] - time.monotonic()) if queue else 1.0
        readable, _, _ = select.select([fa, fb], [], [], timeout)
        now = time.monotonic()
        for fd in readable:
            out = fb if fd == fa else fa
            while True:
                try:
                    packet = os.read(fd, 65536)
                except BlockingIOError:
                    break
                delay, jitter, loss, partition = state
                if partition or (loss and rng.random() < loss):
                    continue
                due = max(last_due[out], now + max(0.0, delay + rng.uniform(-jitter, jitter)))
                last_due[out] = due
                heapq.heappush(queue, (due, next(order), out, packet))
        now = time.monotonic()
        while queue and queue[0][0] <= now:
            _, _, out, packet = heapq.heappop(queue)
            with suppress(OSError):
                os.write(out, packet)


class Net:
    """Redis's own network namespace, and the faults on the link to it."""

    def __init__(self, wanted: str, workdir: Path) -> None:
        self.wanted = wanted
        self.workdir = workdir
        tag = os.getpid() % 100_000
        self.ns = f"trio-chat-soak-{os.getpid()}"
        self.dev_a, self.dev_b = f"tcs{tag}a", f"tcs{tag}b"
        used = set(re.findall(r"10\.201\.(\d+)\.", run_quiet(["ip", "-o", "-4", "addr"])))
        start = tag % 200 + 20
        block = next(
            str(x % 250 + 1) for x in range(start, start + 250) if str(x % 250 + 1) not in used
        )
        self.local, self.remote = f"10.201.{block}.1", f"10.201.{block}.2"
        self.impl: str | None = None
        self.forwarder: Child | None = None

    @property
    def exec_prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.ns]

    def setup(self) -> None:
        run_quiet(["ip", "netns", "add", self.ns])
        run_quiet([*self.exec_prefix, "ip", "link", "set", "lo", "up"])
        if self.wanted in ("auto", "tc"):
            run_quiet(["ip", "link", "add", self.dev_a, "type", "veth", "peer", "name", self.dev_b])
            run_quiet(["ip", "link", "set", self.dev_b, "netns", self.ns])
            run_quiet(["ip", "addr", "add", f"{self.local}/30", "dev", self.dev_a])
            run_quiet(["ip", "link", "set", self.dev_a, "up"])
            run_quiet(
                [*self.exec_prefix, "ip", "addr", "add", f"{self.remote}/30", "dev", self.dev_b]
            )
            run_quiet([*self.exec_prefix, "ip", "link", "set", self.dev_b, "up"])
            probe = ["tc", "qdisc", "add", "dev", self.dev_a, "root", "netem", "delay", "0ms"]
            if subprocess.run(probe, capture_output=True, check=False).returncode == 0:
                run_quiet(["tc", "qdisc", "del", "dev", self.dev_a, "root"])
                self.impl = "tc"
                return
            if self.wanted == "tc":
                raise SoakError("tc netem is not available here (kernel without sch_netem)")
            run_quiet(["ip", "link", "del", self.dev_a], check=False)
        self.impl = "tun"
        argv = [sys.executable, str(SOAK_SCRIPT), "--_tun-forwarder", self.ns]
        argv += [self.dev_a, self.dev_b, self.local, self.remote]
        self.forwarder = Child("netem-tun", argv, self.workdir / "netem-tun.log", pipes=True)
        assert self.forwarder.proc.stdout is not None
        ready, _, _ = select.select([self.forwarder.proc.stdout], [], [], 10)
        if not ready or self.forwarder.proc.stdout.readline().strip() != b"ready":
            raise SoakError(f"the TUN forwarder did not start: see {self.forwarder.log}")

    def apply(
        self, *, delay_ms: float = 0, jitter_ms: float = 0, loss: float = 0, partition: bool = False
    ) -> None:
        """Set the link's impairment (both directions); all zero clears it."""
        if self.impl == "tun":
            assert self.forwarder is not None
            assert self.forwarder.proc.stdin is not None
            line = f"{delay_ms:.1f} {jitter_ms:.1f} {loss:.4f} {int(partition)}\n"
            self.forwarder.proc.stdin.write(line.encode())
            self.forwarder.proc.stdin.flush()
            return
        sides = [[], self.exec_prefix]
        if not (delay_ms or loss or partition):
            for prefix in sides:
                dev = self.dev_a if not prefix else self.dev_b
                run_quiet([*prefix, "tc", "qdisc", "del", "dev", dev, "root"], check=False)
            return
        netem = ["netem"]
        if partition:
            netem += ["loss", "100%"]
        else:
            if delay_ms:
                netem += ["delay", f"{delay_ms:.0f}ms", f"{jitter_ms:.0f}ms"]
            if loss:
                netem += ["loss", f"{loss * 100:.2f}%"]
        for prefix in sides:
            dev = self.dev_a if not prefix else self.dev_b
            run_quiet([*prefix, "tc", "qdisc", "replace", "dev", dev, "root", *netem])

    def teardown(self) -> None:
        """Remove the namespace and the links; safe to call twice, and after a failed setup."""
        if self.forwarder is not None and self.forwarder.exited() is None:
            self.forwarder.signal(signal.SIGKILL)
            with suppress(subprocess.TimeoutExpired):
                self.forwarder.proc.wait(5)
        pids = run_quiet(["ip", "netns", "pids", self.ns], check=False).split()
        for pid in pids:
            with suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGCONT)
                os.kill(int(pid), signal.SIGKILL)
        deadline = time.monotonic() + 5
        while pids and time.monotonic() < deadline:
            pids = run_quiet(["ip", "netns", "pids", self.ns], check=False).split()
            time.sleep(0.05)
        run_quiet(["ip", "netns", "del", self.ns], check=False)
        run_quiet(["ip", "link", "del", self.dev_a], check=False)
