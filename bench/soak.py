"""Chaos soak: chat for minutes or hours under crashes, drains, Redis faults and a bad network,
then prove that nothing acknowledged was lost, nothing came twice and no record leaked.

    python bench/soak.py --minutes N [--instances 3] [--clients 300] [--rooms 30] [--rate R]
                         [--cluster | --netem] [--seed S] [--fault-interval SECONDS] [--keep]
    make soak ARGS="--minutes 30"
    python bench/soak.py --cluster --minutes 5     # on a Redis Cluster, 3 masters + 3 replicas

It starts everything it uses and stops it again, by pid: a redis-server of its own on a free
port (``--save "" --appendonly no``; with ``--netem`` inside a network namespace it creates),
``--instances`` ``trio-chat serve`` processes on it (JSON logs in a work directory), and
``--clients`` WebSocket clients in this process, each a member of one to three of ``--rooms``
rooms (a fifth of the users have two devices). With ``--cluster`` the instances run on a Redis
Cluster instead (``redis+cluster://``): three masters with a replica each, the test fixture's
``RedisCluster`` (tests/_redis_cluster.py, node timeout 1 s), its nodes' files and logs in
``<workdir>/cluster/<port>/``; ``--netem`` is for one Redis only. The clients send ``--rate``
messages per second in all; whenever their socket closes they reconnect, to the less loaded of
two live instances picked at random, and rejoin every room with ``since`` = the last message id
they received there (before any, the ``last`` their first ``joined`` named); they refresh their
short-lived tokens (``--token-ttl``) on ``token_expiring``, and each closes normally and comes
back about once every ``--churn`` seconds, as phones change networks.

Faults, on a schedule drawn from ``--seed`` (one every ``--fault-interval`` seconds, about: 15
by default, less in runs under 3 minutes; the kinds dealt from a shuffled deck, so every kind
comes once before any comes twice):

- ``kill_instance``: SIGKILL an instance, start it again 1-3 s later (a new instance id, as a
  restarted process gets; live instances reap the dead one's sessions);
- ``drain_instance``: SIGTERM (the drain: 1001 to every client), which must exit 0 in time;
  then start it again;
- ``redis_pause``: SIGSTOP redis-server for 2-5 s, then SIGCONT;
- ``redis_restart``: SIGKILL redis-server and start an empty one on the same port;
- ``socket_resets``: reset (TCP RST, no close handshake) the sockets of 5% of the clients;
- ``logout``: ``POST /v1/users/<uid>/logout`` for one user; its clients come back with a new
  token once ``not_before`` has passed;
- ``ban``: ``POST /v1/users/<uid>/ban``, ``unban`` 3-6 s later; its clients come back then;
- with ``--cluster``, instead of the two Redis faults (one at a time, each ending once the
  cluster is ok again on every node):

  - ``master_kill``: SIGKILL a master; its replica is promoted (``failover_s``); 1-3 s later
    the old one restarts (empty) and rejoins as a replica of its replacement;
  - ``master_pause``: SIGSTOP a master for 0.3-0.7 s, under the node timeout: no failover;
  - ``master_stall``: SIGSTOP a master until its replica is promoted, and 0.5-2 s more; on
    SIGCONT it finds itself replaced and becomes a replica;
  - ``shard_loss``: SIGKILL a master and its replica, restart both empty: that shard's keys
    and room streams are gone, as all of them are after ``redis_restart`` on one Redis;

- with ``--netem``, on the link to Redis only: ``net_delay`` (20-80 ms each way, jitter, 8-15 s),
  ``net_loss`` (2-8% of packets each way, 8-15 s) and ``net_partition`` (every packet dropped,
  5 s). ``tc qdisc netem`` on a veth pair when the kernel has it; otherwise (no
  CONFIG_NET_SCH_NETEM) the same faults in a forwarder process between two TUN devices.

The invariant, checked at the end. A client is a member of a room from the moment its first
``joined`` arrived; it stays one through every drop, logout and ban, because it always comes
back and rejoins with ``since``. An acknowledged message (room, id) must reach every member
whose membership began before the sender wrote the ``send`` frame, but the sending client itself
(the server does not echo a message to its own session), exactly once, live or replayed:

- ``lost``: such a delivery that never came and no gap explains;
- ``gaps``: one that never came but lies in a gap the server owned up to: a rejoin that answered
  ``recovered: false`` excuses, for that client and room, the ids after its ``since`` and before
  the first message that followed the ``joined`` (at most the ``joined``'s own time); each is
  charged to the last fault that began before that ``joined`` (``gaps_by_fault``);
- ``lost_unreplicated`` (``--cluster``): Redis replicates asynchronously, so a message the old
  master acknowledged may never reach the replica promoted in its place (or a stalled master
  may run, on SIGCONT, what it had buffered before it learns it was replaced). After each
  failover (``master_kill``, ``master_stall``) the soak reads the room streams of that shard on
  the new master, from 10 s before the fault on; an acknowledged message of that window that
  the stream lacks is counted in ``unreplicated`` (``unreplicated_by_fault``, samples in
  ``unreplicated_samples``), and its deliveries that never came (and no ``recovered: false``
  explains) in ``lost_unreplicated`` (``lost_unreplicated_by_fault``), not in ``lost``;
- ``duplicates``: a (client, message id) received more than once, whether expected or not;
- after the run: every client closes, every instance is stopped with SIGTERM (each must exit 0),
  then one ``session.ttl`` and one ``trio-chat clean`` later no ``ws:*`` key may be left on
  the one Redis, or on any master of the cluster (``masters_checked``) (``leaked_keys``; the
  reaper's own ``ws:reap:<id>`` locks, which expire in 30 s, are counted apart as
  ``reap_locks``), and no instance log may hold a traceback;
- ``unexpected_exits``: an instance, redis-server or cluster node (restarted then) that exited
  when nothing signalled it, or not with 0 after SIGTERM (an instance that cannot reach Redis
  while starting exits 1, as documented; that is retried and counted as ``start_failures``).

Output: a progress line every 10 s, then, as the last line of stdout, one JSON object. Exit
status 0 only when ``lost``, ``duplicates``, ``leaked_keys``, ``unexpected_exits`` and
``tracebacks`` are all 0 (``lost_unreplicated`` may not be: it is reported, charged to its
failover); 1 otherwise; 2 for bad usage (``--cluster`` with ``--netem`` included).
"""

from __future__ import annotations

import argparse
import ctypes
import fcntl
import heapq
import itertools
import json
import math
import os
import random
import re
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter, deque
from contextlib import suppress
from pathlib import Path
from typing import Any

import httpx
import jwt
import trio
import trio.lowlevel
from trio_websocket import ConnectionClosed, ConnectionRejected, HandshakeError

from trio_chat._keys import hash_slot, room_channel
from trio_chat.client import open_client

ROOT = Path(__file__).resolve().parent.parent

SECRET = "soak-secret-" + "s" * 52
ADMIN_KEY = "soak-admin-key"
#: short, so that the end-of-run leak check is quick (the heartbeat runs every second)
SESSION_TTL = 6
INSTANCE_TTL = 3
SHUTDOWN_TIMEOUT = 8
REFRESH_WINDOW = 15
START_TIMEOUT = 30.0
PROGRESS_EVERY = 10.0
#: close codes the server uses on purpose (SPEC §7); the rest are counted as they come
LOGOUT, BANNED, EXPIRED = 4000, 4403, 4401
FAULT_KINDS = [
    "kill_instance",
    "drain_instance",
    "redis_pause",
    "redis_restart",
    "socket_resets",
    "logout",
    "ban",
]
NET_FAULT_KINDS = ["net_delay", "net_loss", "net_partition"]
#: with --cluster, in place of redis_pause and redis_restart
CLUSTER_FAULT_KINDS = ["master_kill", "master_pause", "master_stall", "shard_loss"]
#: a master SIGSTOPped for less than this is not failed over (node timeout 1 s in the fixture)
SHORT_PAUSE = (0.3, 0.7)
FAILOVER_TIMEOUT = 20.0
SETTLE_TIMEOUT = 30.0
#: acked messages this long before a failover began are checked against the promoted replica
UNREPLICATED_LOOKBACK_MS = 10_000

CHILDREN: list[Child] = []
#: the Redis Cluster of a --cluster run (tests/_redis_cluster.py), whose nodes we also stop
CLUSTERS: list[Any] = []


class SoakError(Exception):
    """The soak could not run (not: the invariant failed)."""


def now_ms() -> float:
    """Wall-clock milliseconds: the clock Redis stamps stream ids with (same machine)."""
    return time.time() * 1000


def parse_id(text: str) -> int:
    """A stream id ``<ms>-<seq>`` as one comparable integer."""
    ms, _, seq = text.partition("-")
    return (int(ms) << 32) | int(seq)


def format_id(value: int) -> str:
    return f"{value >> 32}-{value & 0xFFFFFFFF}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def run_quiet(argv: list[str], *, check: bool = True, timeout: float = 20.0) -> str:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    if check and result.returncode != 0:
        raise SoakError(f"{' '.join(argv)}: {result.stderr.strip() or result.returncode}")
    return result.stdout


# --- child processes ---------------------------------------------------------------------------


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


# --- the network fault layer (--netem) ----------------------------------------------------------


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
        argv = [sys.executable, __file__, "--_tun-forwarder", self.ns, self.dev_a, self.dev_b]
        argv += [self.local, self.remote]
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


# --- the ledger: what was sent, acknowledged and delivered ------------------------------------


class Message:
    """One room message id, as seen by the clients: acked by its sender, delivered to some."""

    __slots__ = ("acked", "delivered", "expected", "origin", "sender", "t_send")

    def __init__(self) -> None:
        self.acked = False
        self.sender = -1
        self.t_send = 0.0
        self.expected = 0  # bit c: client c must get it
        self.delivered = 0  # bit c: client c got it
        self.origin: tuple[int, int] | None = None  # (client, n) from the payload


class Gap:
    """Ids of one room a client may never get: after a rejoin's ``recovered: false``."""

    __slots__ = ("cap", "hi", "label", "lo")

    def __init__(self, lo: int, cap: int, label: str) -> None:
        self.lo = lo  # the since of the rejoin (exclusive)
        self.hi: int | None = None  # the first id received after the joined (exclusive)
        self.cap = cap  # ids up to the joined's own time, at most
        self.label = label

    def holds(self, message_id: int) -> bool:
        hi = self.cap if self.hi is None else min(self.hi, self.cap)
        return self.lo < message_id < hi


class ReplicationCheck:
    """One room's stream as the promoted replica held it after a failover (``--cluster``): an
    acknowledged message of that room with an id in ``lo..hi`` that is not in ``present`` was
    stored by the old master only (not replicated, or written by it after it was failed over),
    and is charged to the fault ``label`` (``lost_unreplicated``), not counted as lost."""

    __slots__ = ("hi", "label", "lo", "present")

    def __init__(self, lo: int, hi: int, present: set[int], label: str) -> None:
        self.lo, self.hi, self.present, self.label = lo, hi, present, label

    def misses(self, message_id: int) -> bool:
        return self.lo <= message_id <= self.hi and message_id not in self.present


class Ledger:
    def __init__(self) -> None:
        self.messages: dict[tuple[str, int], Message] = {}
        self.members: dict[str, dict[int, float]] = {}  # room -> client -> member since (ms)
        self.gaps: dict[tuple[int, str], list[Gap]] = {}
        self.replication_checks: dict[str, list[ReplicationCheck]] = {}
        self.sends: dict[tuple[int, int], str] = {}  # (client, n) -> outcome
        #: (client, n) -> (sent, error received (unix ms), instance) of the sends refused
        self.errors_at: dict[tuple[int, int], tuple[float, float, str]] = {}
        self.counts: Counter[str] = Counter()
        self.send_errors: Counter[str] = Counter()
        self.samples: dict[str, list[Any]] = {"duplicates": [], "order": [], "strays": []}

    def _message(self, room: str, message_id: int) -> Message:
        key = (room, message_id)
        message = self.messages.get(key)
        if message is None:
            message = self.messages[key] = Message()
        return message

    def join(self, room: str, client: int, since: float) -> None:
        self.members.setdefault(room, {})[client] = since

    def acked(self, client: int, room: str, message_id: int, t_send: float, n: int) -> None:
        message = self._message(room, message_id)
        if message.acked:
            self.counts["id_collisions"] += 1
        message.acked, message.sender, message.t_send = True, client, t_send
        if message.origin is not None and message.origin != (client, n):
            self.counts["payload_mismatches"] += 1
        mask = 0
        for member, since in self.members.get(room, {}).items():
            if member != client and since < t_send:
                mask |= 1 << member
        message.expected = mask
        self.sends[(client, n)] = "acked"
        self.counts["acked"] += 1

    def deliver(self, client: int, room: str, message_id: int, data: Any, via: str) -> None:
        message = self._message(room, message_id)
        bit = 1 << client
        if message.delivered & bit:
            self.counts["duplicates"] += 1
            if len(self.samples["duplicates"]) < 20:
                self.samples["duplicates"].append(
                    {"client": client, "room": room, "id": format_id(message_id), "via": via}
                )
        message.delivered |= bit
        self.counts[f"delivered_{via}"] += 1
        if message.origin is None and isinstance(data, dict):
            with suppress(KeyError, TypeError, ValueError):
                message.origin = (int(data["c"]), int(data["n"]))
        if message.origin is not None and message.origin[0] == client:
            self.counts["own_replayed"] += 1

    def add_gap(self, client: int, room: str, gap: Gap) -> None:
        self.gaps.setdefault((client, room), []).append(gap)

    def _gap(self, client: int, room: str, message_id: int) -> Gap | None:
        for gap in self.gaps.get((client, room), ()):
            if gap.holds(message_id):
                return gap
        return None

    def add_replication_check(self, room: str, check: ReplicationCheck) -> None:
        self.replication_checks.setdefault(room, []).append(check)

    def _unreplicated(self, room: str, message_id: int) -> str | None:
        for check in self.replication_checks.get(room, ()):
            if check.misses(message_id):
                return check.label
        return None

    def audit(self, *, keep_lost: int = 0) -> dict[str, Any]:
        expected = delivered = extra = lost = gaps = 0
        gaps_by_fault: Counter[str] = Counter()
        unreplicated: Counter[str] = Counter()  # acked messages the promoted replica lacked
        lost_unreplicated: Counter[str] = Counter()  # missing deliveries of those
        unreplicated_samples: list[dict[str, Any]] = []
        lost_list: list[tuple[str, int, int]] = []
        published_after_error = unacked_delivered = 0
        after_error: list[dict[str, Any]] = []
        for (room, message_id), message in self.messages.items():
            if not message.acked:
                extra += message.delivered.bit_count()
                unacked_delivered += 1
                if message.origin is not None:
                    outcome = self.sends.get(message.origin, "")
                    if outcome.startswith("error"):
                        published_after_error += 1
                        sent, refused, instance = self.errors_at[message.origin]
                        after_error.append(
                            {
                                "id": format_id(message_id),
                                "room": room,
                                "error": outcome,
                                "instance": instance,
                                "sent_unix_ms": round(sent),
                                "error_unix_ms": round(refused),
                                "appended_unix_ms": message_id >> 32,
                            }
                        )
                continue
            must = message.expected
            expected += must.bit_count()
            delivered += (must & message.delivered).bit_count()
            extra += (message.delivered & ~must).bit_count()
            missing = must & ~message.delivered
            failover = self._unreplicated(room, message_id)
            if failover is not None:
                unreplicated[failover] += 1
                if len(unreplicated_samples) < 10:
                    unreplicated_samples.append(
                        {
                            "room": room,
                            "id": format_id(message_id),
                            "fault": failover,
                            "from_client": message.sender,
                            "expected": must.bit_count(),
                            "delivered": (must & message.delivered).bit_count(),
                        }
                    )
            while missing:
                low = missing & -missing
                missing ^= low
                client = low.bit_length() - 1
                gap = self._gap(client, room, message_id)
                if gap is not None:
                    gaps += 1
                    gaps_by_fault[gap.label] += 1
                elif failover is not None:
                    lost_unreplicated[failover] += 1
                else:
                    lost += 1
                    if len(lost_list) < keep_lost:
                        lost_list.append((room, message_id, client))
        return {
            "expected_deliveries": expected,
            "delivered": delivered,
            "lost": lost,
            "gaps": gaps,
            "gaps_by_fault": dict(gaps_by_fault),
            "unreplicated": sum(unreplicated.values()),
            "unreplicated_by_fault": dict(unreplicated),
            "lost_unreplicated": sum(lost_unreplicated.values()),
            "lost_unreplicated_by_fault": dict(lost_unreplicated),
            "unreplicated_samples": unreplicated_samples,
            "extra_deliveries": extra,
            "unacked_published": unacked_delivered,
            "published_after_error": published_after_error,
            "published_after_error_samples": after_error[:10],
            "lost_list": lost_list,
        }


# --- clients ----------------------------------------------------------------------------------


class User:
    def __init__(self, name: str) -> None:
        self.name = name
        self.banned = False
        self.unbanned = trio.Event()
        self.unbanned.set()
        self.barrier = 0.0  # no token may be minted before this (unix s): a logout is under way
        self.busy = False  # a logout or ban of this user is in progress
        self.clients: list[Client] = []


class Connection:
    """One WebSocket connection of a client: what it has asked and what it has joined."""

    def __init__(self, chat: Any, slot: Slot, nursery: trio.Nursery) -> None:
        self.chat = chat
        self.slot = slot
        self.nursery = nursery
        self.out, self.out_queue = trio.open_memory_channel[tuple[dict[str, Any], tuple[Any, ...]]](
            1000
        )
        self.refs = itertools.count(1)
        self.pending: dict[int, tuple[Any, ...]] = {}
        self.joined: set[str] = set()
        self.replay_left: dict[str, int] = {}
        self.last: dict[str, int] = {}
        self.open_gaps: dict[str, Gap] = {}
        self.session = str(chat.welcome.get("session_id"))


class Client:
    def __init__(self, soak: Soak, index: int, user: User, rooms: list[str]) -> None:
        self.soak = soak
        self.index = index
        self.user = user
        self.rooms = rooms
        #: per room, the highest id received (before any: the ``last`` of the first
        #: ``joined``, or a floor just under its time): what a rejoin sends as ``since``
        self.since: dict[str, int | None] = dict.fromkeys(rooms)
        self.member_since: dict[str, float] = {}
        self.conn: Connection | None = None
        self.scope: trio.CancelScope | None = None
        self.seq = itertools.count(1)
        self.stopping = False
        self.trail: deque[str] = deque(maxlen=40)  # for explaining a loss

    def note(self, text: str) -> None:
        self.trail.append(f"{self.soak.clock():7.2f}s {text}")

    @property
    def ready(self) -> bool:
        conn = self.conn
        return conn is not None and conn.joined >= set(self.rooms) and not conn.pending

    async def run(self) -> None:
        """Connect, serve, reconnect; until :attr:`stopping`. Never raises (but Cancelled)."""
        soak, delay = self.soak, 0.0
        while not self.stopping:
            await soak.gate(self.user)
            if self.stopping:
                break
            slot = soak.pick_slot()
            began = trio.current_time()
            outcome = "?"
            try:
                scope = self.scope = trio.CancelScope()
                with scope:
                    token = soak.mint(self.user.name)
                    async with open_client(slot.url, token, connect_timeout=5) as chat:
                        outcome = await self._serve(chat, slot)
                if scope.cancelled_caught:
                    outcome = "reset"
            except ConnectionRejected as exc:
                outcome = f"http {exc.status_code}"
                soak.counts[f"refused_{exc.status_code}"] += 1
            except ConnectionClosed as exc:
                outcome = f"closed {exc.reason.code if exc.reason else None}"
            except (OSError, HandshakeError, trio.TooSlowError, trio.BrokenResourceError) as exc:
                outcome = type(exc).__name__
                soak.counts["connect_failures"] += 1
            except Exception as exc:  # never let one client end the soak; count it instead
                outcome = f"error {type(exc).__name__}: {exc}"
                soak.counts[f"client_error_{type(exc).__name__}"] += 1
            finally:
                self.scope = None
                self._ended(outcome)
            if self.stopping:
                break
            soak.close_codes[outcome] += 1
            if trio.current_time() - began > 5:
                delay = 0.0
            delay = min(max(delay * 2, 0.05), 2.0)
            await trio.sleep(delay * random.uniform(0.5, 1.0))

    async def _serve(self, chat: Any, slot: Slot) -> str:
        async with trio.open_nursery() as nursery:
            conn = self.conn = Connection(chat, slot, nursery)
            self.soak.counts["connects"] += 1
            self.note(f"connected to {slot.instance_id} session {conn.session[:8]}")
            nursery.start_soon(self._writer, conn)
            for room in self.rooms:
                self._join(conn, room)
            try:
                while True:
                    self._handle(conn, json.loads(await chat.ws.get_message()))
            except ConnectionClosed as exc:
                nursery.cancel_scope.cancel()
                return f"closed {exc.reason.code if exc.reason else None}"
        raise AssertionError("unreachable")

    async def _writer(self, conn: Connection) -> None:
        async for frame, what in conn.out_queue:
            if what[0] == "send":
                _, room, n = what
                conn.pending[frame["ref"]] = ("send", room, n, now_ms())
                self.soak.ledger.sends[(self.index, n)] = "sent"
                self.soak.counts["sent"] += 1
            elif what[0] != "none":
                conn.pending[frame["ref"]] = what
            try:
                await conn.chat.ws.send_message(json.dumps(frame))
            except (ConnectionClosed, trio.BrokenResourceError, trio.ClosedResourceError):
                return  # the reader sees the close

    def _queue(self, conn: Connection, frame: dict[str, Any], what: tuple[Any, ...]) -> bool:
        frame["ref"] = next(conn.refs)
        try:
            conn.out.send_nowait((frame, what))
        except (trio.WouldBlock, trio.ClosedResourceError):
            return False
        return True

    def _join(self, conn: Connection, room: str) -> None:
        since = self.since[room]
        frame: dict[str, Any] = {"type": "join", "room": room}
        if since is not None:
            frame["since"] = format_id(since)
        self._queue(conn, frame, ("join", room, since))

    async def _join_later(self, conn: Connection, room: str) -> None:
        await trio.sleep(random.uniform(0.3, 1.0))
        self._join(conn, room)

    def _refresh(self, conn: Connection) -> None:
        if time.time() >= self.user.barrier:  # else a logout is closing this session anyway
            self._queue(
                conn, {"type": "refresh", "token": self.soak.mint(self.user.name)}, ("refresh",)
            )

    async def _refresh_later(self, conn: Connection) -> None:
        await trio.sleep(random.uniform(1.0, 2.0))
        self._refresh(conn)

    def try_send(self, rng: random.Random) -> bool:
        conn = self.conn
        if conn is None or not conn.joined:
            return False
        room = rng.choice(sorted(conn.joined))
        n = next(self.seq)
        frame = {"type": "send", "room": room, "data": {"c": self.index, "n": n}}
        self.soak.ledger.sends[(self.index, n)] = "queued"
        return self._queue(conn, frame, ("send", room, n))

    def reset(self) -> bool:
        """Drop the socket with a TCP RST (no close handshake), as a dead network would."""
        conn, scope = self.conn, self.scope
        if conn is None or scope is None:
            return False
        with suppress(AttributeError, OSError):
            sock = conn.chat.ws._stream.socket
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        scope.cancel()
        return True

    async def reconnect(self) -> None:
        """Close the connection normally; :meth:`run` connects again."""
        conn = self.conn
        if conn is not None:
            with trio.move_on_after(5), suppress(Exception):
                await conn.chat.ws.aclose(1000, "moving on")

    async def close(self) -> None:
        self.stopping = True
        conn = self.conn
        if conn is not None:
            with trio.move_on_after(5), suppress(Exception):
                await conn.chat.ws.aclose(1000, "soak over")

    def _ended(self, outcome: str) -> None:
        conn, self.conn = self.conn, None
        if conn is None:
            return
        self.note(f"connection ended: {outcome}")
        ledger = self.soak.ledger
        for what in conn.pending.values():
            if what[0] == "send":
                ledger.sends[(self.index, what[2])] = "unknown"
                self.soak.counts["send_unknown"] += 1
        conn.out.close()
        with suppress(trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
            while True:
                _, what = conn.out_queue.receive_nowait()
                if what[0] == "send":
                    ledger.sends[(self.index, what[2])] = "never_sent"

    def _handle(self, conn: Connection, frame: dict[str, Any]) -> None:
        kind = frame.get("type")
        soak, ledger = self.soak, self.soak.ledger
        if kind == "message":
            room, message_id = frame["room"], parse_id(frame["id"])
            via = "live"
            if conn.replay_left.get(room):
                conn.replay_left[room] -= 1
                via = "replay"
            if (gap := conn.open_gaps.pop(room, None)) is not None:
                gap.hi = message_id
            last = conn.last.get(room)
            if last is not None and message_id <= last:
                ledger.counts["order_violations"] += 1
                if len(ledger.samples["order"]) < 20:
                    ledger.samples["order"].append(
                        {
                            "client": self.index,
                            "room": room,
                            "id": frame["id"],
                            "after": format_id(last),
                        }
                    )
            else:
                conn.last[room] = message_id
            if room not in conn.joined:
                ledger.counts["stray_messages"] += 1
            since = self.since.get(room)
            if since is None or message_id > since:
                self.since[room] = message_id
            ledger.deliver(self.index, room, message_id, frame.get("data"), via)
            return
        what = conn.pending.pop(frame.get("ref", -1), None)
        if kind == "ack" and what is not None and what[0] == "send":
            _, room, n, t_send = what
            ledger.acked(self.index, room, parse_id(frame["id"]), t_send, n)
        elif kind == "joined" and what is not None and what[0] == "join":
            _, room, since_sent = what
            conn.joined.add(room)
            joined_at = now_ms()
            if room not in self.member_since:
                self.member_since[room] = joined_at
                ledger.join(room, self.index, joined_at)
                if self.since[room] is None:
                    # the room's last message when joined (every later one reaches us), or,
                    # in an empty room or from a server that does not say, a floor under
                    # every id Redis can give a message sent after this moment
                    last = frame.get("last")
                    self.since[room] = parse_id(last) if last else (int(joined_at) - 1) << 32
            if "recovered" in frame:
                ledger.counts["rejoins"] += 1
                if frame.get("missed"):
                    conn.replay_left[room] = int(frame["missed"])
                if not frame["recovered"]:
                    ledger.counts["recovered_false"] += 1
                    label = soak.fault_before(time.time())
                    gap = Gap(since_sent or 0, (int(joined_at) + 1) << 32, label)
                    ledger.add_gap(self.index, room, gap)
                    conn.open_gaps[room] = gap
                    self.note(
                        f"rejoin {room} since {format_id(since_sent or 0)}: "
                        f"recovered false ({label})"
                    )
        elif kind == "error":
            code = str(frame.get("code"))
            if what is not None and what[0] == "send":
                ledger.sends[(self.index, what[2])] = f"error {code}"
                ledger.errors_at[(self.index, what[2])] = (what[3], now_ms(), conn.slot.instance_id)
                ledger.send_errors[code] += 1
            elif what is not None and what[0] == "join":
                ledger.counts[f"join_error_{code}"] += 1
                conn.nursery.start_soon(self._join_later, conn, what[1])
            elif what is not None and what[0] == "refresh":
                ledger.counts[f"refresh_error_{code}"] += 1
                if code == "unavailable":  # Redis is down: the token is still good, try again
                    conn.nursery.start_soon(self._refresh_later, conn)
            else:
                ledger.counts[f"error_{code}"] += 1
        elif kind == "token_expiring":
            self._refresh(conn)
        elif kind == "refreshed":
            soak.counts["refreshes"] += 1
        elif kind == "logout":
            self.note(f"logout {frame.get('reason')}")
            soak.counts[f"logout_{frame.get('reason')}"] += 1


# --- instances and Redis ----------------------------------------------------------------------


class Slot:
    """One instance position: a fixed port, successive processes (incarnations)."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.port = free_port()
        self.admin_port = free_port()
        self.incarnation = 0
        self.child: Child | None = None
        self.state = "down"  # down, starting, up
        self.lock = trio.Lock()  # one fault at a time on one instance

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/"

    @property
    def admin(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    @property
    def instance_id(self) -> str:
        return f"soak-{self.index + 1}-{self.incarnation}"


class Soak:
    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        self.rate = args.rate if args.rate is not None else max(1.0, args.clients / 10)
        self.duration = args.minutes * 60
        self.structure_rng = random.Random(args.seed)
        self.traffic_rng = random.Random(args.seed + 1)
        self.fault_rng = random.Random(args.seed + 2)
        self.ledger = Ledger()
        self.counts: Counter[str] = Counter()
        self.close_codes: Counter[str] = Counter()
        self.faults: list[dict[str, Any]] = []
        self.unexpected: list[dict[str, Any]] = []
        self.net = Net(args.netem_impl, workdir) if args.netem else None
        self.redis_host = "127.0.0.1"
        self.redis_port = free_port()
        self.redis: Child | None = None
        self.redis_lock = trio.Lock()  # one Redis (or cluster) fault at a time
        self.net_lock = trio.Lock()
        #: --cluster: the RedisCluster (set up in run), and the ports of the nodes whose process
        #: a fault is replacing right now (the monitor leaves those alone)
        self.cluster: Any = None
        self.node_busy: set[int] = set()
        self.slots = [Slot(i) for i in range(args.instances)]
        self.started = time.monotonic()
        self.traffic_started: float | None = None
        self.traffic_t0 = 0.0  # trio clock
        self.ending = trio.Event()
        self.http: httpx.AsyncClient | None = None
        self.rss_start: list[int | None] = []
        self.rss_end: list[int | None] = []
        self.users: dict[str, User] = {}
        self.clients: list[Client] = []
        self._build_population()

    # --- set-up ----------------------------------------------------------------------------

    def _build_population(self) -> None:
        rng, args = self.structure_rng, self.args
        rooms = self.room_names = [f"room-{r:03d}" for r in range(args.rooms)]
        user: User | None = None
        for index in range(args.clients):
            if user is None or index % 5 != 1:  # every fifth user has a second device
                user = User(f"user-{index:04d}")
                self.users[user.name] = user
            count = rng.choices([1, 2, 3], weights=[5, 3, 2])[0]
            mine = [rooms[index % len(rooms)]]  # every room has members
            mine += rng.sample([r for r in rooms if r != mine[0]], min(count - 1, len(rooms) - 1))
            client = Client(self, index, user, mine)
            user.clients.append(client)
            self.clients.append(client)

    @property
    def redis_url(self) -> str:
        if self.cluster is not None:
            return str(self.cluster.url)  # redis+cluster:// and the three first masters
        return f"redis://{self.redis_host}:{self.redis_port}/0"

    def clock(self) -> float:
        base = self.traffic_started if self.traffic_started is not None else self.started
        return time.monotonic() - base

    def instance_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("TRIO_CHAT_")}
        env.update(
            TRIO_CHAT_AUTH_JWT_SECRET=SECRET,
            TRIO_CHAT_ADMIN_API_KEY=ADMIN_KEY,
            TRIO_CHAT_AUTH_REFRESH_WINDOW=str(REFRESH_WINDOW),
            TRIO_CHAT_SESSION_TTL=str(SESSION_TTL),
            TRIO_CHAT_SESSION_INSTANCE_TTL=str(INSTANCE_TTL),
            TRIO_CHAT_SERVER_SHUTDOWN_TIMEOUT=str(SHUTDOWN_TIMEOUT),
            TRIO_CHAT_LIMITS_MAX_SESSIONS_PER_USER="1000",
            TRIO_CHAT_LIMITS_OUTBOUND_QUEUE="4096",
            TRIO_CHAT_LIMITS_FRAME_RATE="1000",
            TRIO_CHAT_LIMITS_FRAME_BURST="2000",
        )
        return env

    def mint(self, user: str) -> str:
        now = int(time.time())
        claims = {"sub": user, "iat": now, "exp": now + self.args.token_ttl}
        return jwt.encode(claims, SECRET, algorithm="HS256")

    def start_redis(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise SoakError("redis-server is not on PATH (`make redis-server` installs it)")
        argv = [binary, "--port", str(self.redis_port), "--bind", self.redis_host]
        argv += ["--save", "", "--appendonly", "no", "--protected-mode", "no"]
        argv += ["--dir", str(self.workdir), "--hz", "100", "--daemonize", "no"]
        if self.net is not None:
            argv = [*self.net.exec_prefix, *argv]
        self.redis = Child("redis", argv, self.workdir / "redis.log")

    async def redis_up(self, timeout: float = 10.0) -> bool:
        with trio.move_on_after(timeout):
            while True:
                try:
                    with trio.fail_after(1):
                        stream = await trio.open_tcp_stream(self.redis_host, self.redis_port)
                        async with stream:
                            await stream.send_all(b"PING\r\n")
                            if (await stream.receive_some(16)).startswith(b"+PONG"):
                                return True
                except (OSError, trio.TooSlowError):
                    pass
                await trio.sleep(0.05)
        return False

    async def start_instance(self, slot: Slot) -> bool:
        """Start the slot's next incarnation and wait until it is ready; retried while it
        exits 1 (Redis unreachable at start, as documented)."""
        deadline = trio.current_time() + START_TIMEOUT * 2
        while trio.current_time() < deadline:
            slot.incarnation += 1
            slot.state = "starting"
            argv = [sys.executable, "-m", "trio_chat", "serve", "--port", str(slot.port)]
            argv += ["--admin-port", str(slot.admin_port), "--redis-url", self.redis_url]
            argv += ["--instance-id", slot.instance_id, "--log-format", "json"]
            child = slot.child = Child(
                slot.instance_id,
                argv,
                self.workdir / f"{slot.instance_id}.log",
                env=self.instance_env(),
            )
            ready_by = trio.current_time() + START_TIMEOUT
            healthy = False
            while trio.current_time() < ready_by:
                if (code := child.exited()) is not None:
                    if code == 1:
                        self.counts["start_failures"] += 1
                    else:
                        self._unexpected(child, code, "exited while starting")
                    child.expected = True
                    break
                status = await self._get(slot, "/readyz")
                if status == 200:
                    slot.state = "up"
                    return True
                healthy = healthy or status == 503
                await trio.sleep(0.1)
            else:
                if healthy:  # running, only not ready (Redis is still faulty): serve anyway
                    slot.state = "up"
                    return True
                child.signal(signal.SIGKILL)
                self._unexpected(child, None, "never became healthy")
            await trio.sleep(1.0)
        slot.state = "down"
        return False

    async def _get(self, slot: Slot, path: str) -> int | None:
        assert self.http is not None
        try:
            return (await self.http.get(slot.admin + path, timeout=2)).status_code
        except httpx.HTTPError:
            return None

    async def admin_post(self, path: str) -> dict[str, Any] | None:
        """POST to the admin API of some live instance; None if none could do it in 15 s."""
        assert self.http is not None
        headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
        with trio.move_on_after(15):
            while True:
                up = [s for s in self.slots if s.state == "up"]
                self.fault_rng.shuffle(up)
                for slot in up:
                    try:
                        response = await self.http.post(
                            slot.admin + path, headers=headers, timeout=5
                        )
                    except httpx.HTTPError:
                        continue
                    if response.status_code == 200:
                        body: dict[str, Any] = response.json()
                        return body
                await trio.sleep(0.5)
        return None

    def pick_slot(self) -> Slot:
        """The less loaded of two live instances picked at random (a load balancer's "power
        of two choices"): a restarted instance fills up again."""
        up = [s for s in self.slots if s.state == "up"] or self.slots
        first, second = self.traffic_rng.choice(up), self.traffic_rng.choice(up)
        return first if self.load(first) <= self.load(second) else second

    def load(self, slot: Slot) -> int:
        return sum(1 for c in self.clients if c.conn is not None and c.conn.slot is slot)

    async def gate(self, user: User) -> None:
        """Wait while the user is banned or a logout of it is under way."""
        while True:
            if user.banned:
                await user.unbanned.wait()
                continue
            wait = user.barrier - time.time()
            if wait <= 0:
                return
            await trio.sleep(min(wait, 1.0))

    # --- watching the processes ------------------------------------------------------------

    def _unexpected(self, child: Child, code: int | None, why: str) -> None:
        self._unexpected_process(child.name, child.pid, code, why)

    def _unexpected_process(self, name: str, pid: int, code: int | None, why: str) -> None:
        self.unexpected.append(
            {"process": name, "pid": pid, "code": code, "why": why, "t": round(self.clock(), 1)}
        )
        print(f"[soak] UNEXPECTED: {name} (pid {pid}) {why}, code {code}", file=sys.stderr)

    async def monitor(self, nursery: trio.Nursery) -> None:
        """Notice processes that die by themselves; restart them, as a supervisor would."""
        while True:
            await trio.sleep(0.2)
            for slot in self.slots:
                child = slot.child
                if slot.state == "up" and child is not None and not child.expected:
                    if (code := child.exited()) is not None:
                        child.expected = True
                        slot.state = "down"
                        self._unexpected(child, code, "exited by itself")
                        nursery.start_soon(self._restart_unexpected, slot)
            redis = self.redis
            if redis is not None and not redis.expected and (code := redis.exited()) is not None:
                redis.expected = True
                self._unexpected(redis, code, "exited by itself")
                async with self.redis_lock:
                    self.start_redis()
                    await self.redis_up()
            cluster = self.cluster
            for port in cluster.ports if cluster is not None else ():
                # the fixture's Popen of the node (None while it is killed on purpose)
                process = cluster._processes.get(port)
                if port in self.node_busy or process is None:
                    continue
                if (code := process.poll()) is not None:
                    self.node_busy.add(port)
                    self._unexpected_process(f"redis-{port}", process.pid, code, "exited by itself")
                    nursery.start_soon(self._restart_node_unexpected, port)

    async def _restart_node_unexpected(self, port: int) -> None:
        async with self.redis_lock:
            try:
                await trio.to_thread.run_sync(self.cluster.restart, port)
            finally:
                self.node_busy.discard(port)
            await self.settled()

    async def _restart_unexpected(self, slot: Slot) -> None:
        async with slot.lock:
            await self.start_instance(slot)

    # --- faults ----------------------------------------------------------------------------

    def fault_before(self, unix: float) -> str:
        label, latest = "none", -math.inf
        for fault in self.faults:  # (a fault that waited for a lock began when it got it)
            if latest <= fault["unix"] <= unix:
                label, latest = f"{fault['kind']}#{fault['n']}", fault["unix"]
        return label

    async def pause(self, seconds: float) -> None:
        """Sleep, but wake at once when the traffic ends (faults heal then)."""
        with trio.move_on_after(seconds):
            await self.ending.wait()

    async def fault_schedule(self, nursery: trio.Nursery) -> None:
        rng = self.fault_rng
        kinds = FAULT_KINDS + (NET_FAULT_KINDS if self.net is not None else [])
        if self.cluster is not None:
            kinds = [k for k in kinds if not k.startswith("redis_")] + CLUSTER_FAULT_KINDS
        if len(self.slots) < 2:
            kinds = [k for k in kinds if k not in ("kill_instance", "drain_instance")]
        deck: list[str] = []
        interval = self.args.fault_interval
        warmup, cooldown = min(5.0, self.duration / 10), min(10.0, self.duration / 6)
        at = warmup - interval / 2
        while True:
            at += interval * rng.uniform(0.7, 1.3)
            if at > self.duration - cooldown:
                return
            await trio.sleep_until(self.traffic_t0 + at)
            if not deck:
                deck = list(kinds)
                rng.shuffle(deck)
            nursery.start_soon(self.run_fault, deck.pop(), len(self.faults) + 1)
            await trio.lowlevel.checkpoint()

    async def run_fault(self, kind: str, n: int) -> None:
        fault: dict[str, Any] = {
            "n": n,
            "kind": kind,
            "t": round(self.clock(), 1),
            "unix": time.time(),
        }
        self.faults.append(fault)
        try:
            make = getattr(self, f"fault_{kind}")
            fault["target"] = await (make(fault) if kind in CLUSTER_FAULT_KINDS else make())
        except Exception as exc:  # a fault that could not be made is recorded, not fatal
            fault["target"] = f"failed: {type(exc).__name__}: {exc}"
            print(f"[soak] fault {kind} failed: {traceback.format_exc()}", file=sys.stderr)
        fault["done"] = round(self.clock(), 1)

    async def _instance_target(self) -> Slot | None:
        with trio.move_on_after(10):
            while True:
                up = [s for s in self.slots if s.state == "up" and not s.lock.locked()]
                if len([s for s in self.slots if s.state == "up"]) >= 2 and up:
                    return self.fault_rng.choice(up)
                await trio.sleep(0.2)
        return None

    async def fault_kill_instance(self) -> str:
        slot = await self._instance_target()
        if slot is None:
            return "skipped: fewer than 2 instances up"
        async with slot.lock:
            assert slot.child is not None
            victim = slot.instance_id
            slot.state = "down"
            slot.child.signal(signal.SIGKILL)
            await slot.child.wait(5)
            await self.pause(self.fault_rng.uniform(1, 3))
            await self.start_instance(slot)
            return f"{victim} -> {slot.instance_id}"

    async def fault_drain_instance(self) -> str:
        slot = await self._instance_target()
        if slot is None:
            return "skipped: fewer than 2 instances up"
        async with slot.lock:
            assert slot.child is not None
            victim, child = slot.instance_id, slot.child
            slot.state = "down"
            child.signal(signal.SIGTERM)
            code = await child.wait(SHUTDOWN_TIMEOUT + 7)
            if code is None:
                child.signal(signal.SIGKILL)
                self._unexpected(child, None, "drain did not finish in time (SIGKILLed)")
            elif code != 0:
                self._unexpected(child, code, "drain did not exit 0")
            await self.pause(self.fault_rng.uniform(0.5, 1.5))
            await self.start_instance(slot)
            return f"{victim} (exit {code}) -> {slot.instance_id}"

    async def fault_redis_pause(self) -> str:
        async with self.redis_lock:
            assert self.redis is not None
            seconds = self.fault_rng.uniform(2, 5)
            self.redis.signal(signal.SIGSTOP, ends_it=False)
            try:
                await self.pause(seconds)
            finally:
                self.redis.signal(signal.SIGCONT, ends_it=False)
            return f"SIGSTOP {seconds:.1f}s"

    async def fault_redis_restart(self) -> str:
        async with self.redis_lock:
            assert self.redis is not None
            self.redis.signal(signal.SIGKILL)
            await self.redis.wait(5)
            await self.pause(self.fault_rng.uniform(0.2, 1.0))
            self.start_redis()
            if not await self.redis_up():
                raise SoakError("redis-server did not come back")
            return "SIGKILL, started empty"

    # --- faults on a Redis Cluster (--cluster) ----------------------------------------------

    async def settled(self) -> None:
        """Wait until the cluster is ok on every running node (fresh ``slot_owner``/``shards``)."""
        await trio.to_thread.run_sync(self.cluster.wait_ok, SETTLE_TIMEOUT)

    async def _node(self, action: str, port: int) -> None:
        """``kill`` or ``restart`` one node (the fixture's methods, in a thread)."""
        self.node_busy.add(port)
        try:
            await trio.to_thread.run_sync(getattr(self.cluster, action), port)
        finally:
            self.node_busy.discard(port)

    async def _cluster_target(self, fault: dict[str, Any]) -> int:
        """A master, picked once the cluster is settled; the fault begins now (not when it was
        scheduled: it may have waited for the one before)."""
        await self.settled()
        port: int = self.fault_rng.choice(sorted(self.cluster.shards))
        fault["scheduled_t"] = fault["t"]
        fault["t"], fault["unix"] = round(self.clock(), 1), time.time()
        return port

    def shard_rooms(self, port: int) -> list[str]:
        """The rooms whose stream (and channel) the master ``port`` owns (as of ``settled``)."""
        owner = self.cluster.slot_owner
        return [r for r in self.room_names if owner[hash_slot(room_channel(r))] == port]

    async def check_replication(
        self, fault: dict[str, Any], master: int, rooms: list[str], began_unix: float
    ) -> str:
        """After a failover: read each room stream of the failed-over shard on its new master,
        and record what it holds from ``UNREPLICATED_LOOKBACK_MS`` before the fault on. The
        audit charges any acknowledged message of that window the stream lacks (the old master
        had not replicated it, or wrote it after it was failed over) to this fault."""
        label = f"{fault['kind']}#{fault['n']}"
        lo_ms = int(began_unix * 1000) - UNREPLICATED_LOOKBACK_MS
        entries = 0
        for room in rooms:
            key = room_channel(room)
            read_at = int(now_ms())  # an id of a later ms was given after this read
            window = await trio.to_thread.run_sync(
                self.cluster.command, master, "XRANGE", key, f"{lo_ms}-0", "+"
            )
            oldest = await trio.to_thread.run_sync(
                self.cluster.command, master, "XRANGE", key, "-", "+", "COUNT", "1"
            )
            floor = lo_ms << 32
            if oldest:  # trimmed (MAXLEN ~): nothing can be said about older ids
                floor = max(floor, parse_id(oldest[0][0]))
            present = {parse_id(entry[0]) for entry in window or ()}
            entries += len(present)
            hi = ((read_at - 1) << 32) | 0xFFFFFFFF
            self.ledger.add_replication_check(room, ReplicationCheck(floor, hi, present, label))
        return f"{len(rooms)} room streams checked on {master}: {entries} entries"

    async def fault_master_kill(self, fault: dict[str, Any]) -> str:
        """SIGKILL a master; its replica takes over; the old one restarts (empty) and rejoins
        as a replica of its replacement."""
        async with self.redis_lock:
            port = await self._cluster_target(fault)
            rooms = self.shard_rooms(port)
            began, killed_at = trio.current_time(), time.time()
            await self._node("kill", port)
            try:
                new = await trio.to_thread.run_sync(
                    self.cluster.wait_for_failover, port, FAILOVER_TIMEOUT
                )
                took = trio.current_time() - began
                checked = await self.check_replication(fault, new, rooms, killed_at)
                await self.pause(self.fault_rng.uniform(1, 3))
            finally:
                with trio.CancelScope(shield=True):
                    await self._node("restart", port)
                    await self.settled()
            fault["failover_s"] = round(took, 2)
            return (
                f"master {port} SIGKILL: replica {new} promoted in {took:.1f}s ({checked}); "
                f"{port} restarted, a replica now"
            )

    async def fault_master_pause(self, fault: dict[str, Any]) -> str:
        """SIGSTOP a master for less than the node timeout: no failover, only a stall."""
        async with self.redis_lock:
            port = await self._cluster_target(fault)
            rooms = self.shard_rooms(port)
            seconds, paused_at = self.fault_rng.uniform(*SHORT_PAUSE), time.time()
            self.cluster.pause(port)
            try:
                await self.pause(seconds)
            finally:
                self.cluster.resume(port)
            await self.settled()
            if port in self.cluster.shards:
                return f"master {port} SIGSTOP {seconds:.2f}s (under the node timeout)"
            # failed over after all (a slow machine): what the old master held may be gone
            if not rooms:
                return f"master {port} SIGSTOP {seconds:.2f}s: failed over anyway (no room there)"
            new: int = self.cluster.slot_owner[hash_slot(room_channel(rooms[0]))]
            checked = await self.check_replication(fault, new, rooms, paused_at)
            return f"master {port} SIGSTOP {seconds:.2f}s: failed over anyway to {new} ({checked})"

    async def fault_master_stall(self, fault: dict[str, Any]) -> str:
        """SIGSTOP a master for longer than the node timeout: its replica is promoted while it
        is stopped; on SIGCONT it finds itself replaced and becomes a replica (whatever it
        still ran from its buffers meanwhile is discarded)."""
        async with self.redis_lock:
            port = await self._cluster_target(fault)
            rooms = self.shard_rooms(port)
            began, paused_at = trio.current_time(), time.time()
            self.cluster.pause(port)
            try:
                new = await trio.to_thread.run_sync(
                    self.cluster.wait_for_failover, port, FAILOVER_TIMEOUT
                )
                took = trio.current_time() - began
                more = self.fault_rng.uniform(0.5, 2.0)
                await self.pause(more)
            finally:
                self.cluster.resume(port)
            stopped = trio.current_time() - began
            with trio.CancelScope(shield=True):
                await self.settled()
            checked = await self.check_replication(fault, new, rooms, paused_at)
            fault["failover_s"] = round(took, 2)
            return (
                f"master {port} SIGSTOP {stopped:.1f}s: replica {new} promoted in {took:.1f}s "
                f"({checked}); {port} resumed, a replica now"
            )

    async def fault_shard_loss(self, fault: dict[str, Any]) -> str:
        """SIGKILL a master and its replica, restart both empty: the shard's data is gone (the
        cluster's "Redis restarted empty"; rejoins in its rooms answer ``recovered: false``)."""
        async with self.redis_lock:
            port = await self._cluster_target(fault)
            nodes = [port, *self.cluster.shards[port]]
            rooms = self.shard_rooms(port)
            for node in nodes:
                await self._node("kill", node)
            try:
                await self.pause(self.fault_rng.uniform(0.5, 1.5))
            finally:
                with trio.CancelScope(shield=True):
                    for node in nodes:
                        await self._node("restart", node)
                    await self.settled()
            return (
                f"master {port} and replica {nodes[1:]} SIGKILL, restarted empty "
                f"({len(rooms)} rooms)"
            )

    async def fault_socket_resets(self) -> str:
        connected = [c for c in self.clients if c.conn is not None]
        count = min(len(connected), max(1, len(self.clients) // 20))
        victims = self.fault_rng.sample(connected, count)
        done = sum(c.reset() for c in victims)
        self.counts["resets"] += done
        return f"{done} clients"

    def _pick_user(self) -> User | None:
        free = [u for u in self.users.values() if not u.busy]
        return self.fault_rng.choice(free) if free else None

    async def fault_logout(self) -> str:
        user = self._pick_user()
        if user is None:
            return "skipped: no user free"
        user.busy = True
        try:
            user.barrier = math.inf  # no new token while the logout is on its way
            reply = await self.admin_post(f"/v1/users/{user.name}/logout")
            # not_before is the logout's second rounded up: tokens from the next second pass
            user.barrier = time.time() + 1.1
            return f"{user.name}: {reply}"
        finally:
            user.barrier = min(user.barrier, time.time() + 1.1)
            user.busy = False

    async def fault_ban(self) -> str:
        user = self._pick_user()
        if user is None:
            return "skipped: no user free"
        user.busy = True
        user.banned = True
        user.unbanned = trio.Event()
        try:
            reply = await self.admin_post(f"/v1/users/{user.name}/ban")
            seconds = self.fault_rng.uniform(3, 6)
            await self.pause(seconds)
            return f"{user.name} for {seconds:.1f}s: {reply}"
        finally:
            with trio.CancelScope(shield=True):
                await self._unban(user)

    async def _unban(self, user: User) -> None:
        with trio.move_on_after(60):
            while await self.admin_post(f"/v1/users/{user.name}/unban") is None:
                await trio.sleep(1)
        user.banned = False
        user.busy = False
        user.unbanned.set()

    async def _net(self, seconds: float, **impairment: Any) -> None:
        assert self.net is not None
        async with self.net_lock:
            await trio.to_thread.run_sync(lambda: self.net.apply(**impairment))
            try:
                await self.pause(seconds)
            finally:
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(self.net.apply)

    async def fault_net_delay(self) -> str:
        delay, seconds = self.fault_rng.uniform(20, 80), self.fault_rng.uniform(8, 15)
        await self._net(seconds, delay_ms=delay, jitter_ms=delay / 4)
        return f"{delay:.0f}ms each way for {seconds:.1f}s"

    async def fault_net_loss(self) -> str:
        loss, seconds = self.fault_rng.uniform(0.02, 0.08), self.fault_rng.uniform(8, 15)
        await self._net(seconds, loss=loss)
        return f"{loss:.1%} each way for {seconds:.1f}s"

    async def fault_net_partition(self) -> str:
        await self._net(5.0, partition=True)
        return "5.0s"

    # --- traffic and progress ----------------------------------------------------------------

    async def sender(self) -> None:
        rng = self.traffic_rng
        due = trio.current_time()
        while not self.ending.is_set():
            due += rng.expovariate(self.rate)
            await trio.sleep_until(due)
            for _ in range(10):
                if rng.choice(self.clients).try_send(rng):
                    break
            else:
                self.counts["send_skipped"] += 1

    async def churn(self) -> None:
        """Ordinary closes (1000) all along, as phones change networks: each client about once
        every ``--churn`` seconds; it comes back at once and rejoins with ``since``."""
        if self.args.churn <= 0:
            return
        rng = random.Random(self.args.seed + 3)
        async with trio.open_nursery() as nursery:
            while not self.ending.is_set():
                await self.pause(rng.expovariate(len(self.clients) / self.args.churn))
                client = rng.choice(self.clients)
                if client.conn is not None and not self.ending.is_set():
                    self.counts["churn_closes"] += 1
                    nursery.start_soon(client.reconnect)

    def progress(self, phase: str) -> None:
        counts, ledger = self.counts, self.ledger
        connected = sum(c.conn is not None for c in self.clients)
        up = sum(s.state == "up" for s in self.slots)
        last = self.faults[-1] if self.faults else None
        deliveries = ledger.counts["delivered_live"] + ledger.counts["delivered_replay"]
        line = (
            f"[soak {self.clock():6.0f}s {phase}] sent={counts['sent']} "
            f"acked={ledger.counts['acked']} "
            f"send_errors={sum(ledger.send_errors.values())} unknown={counts['send_unknown']} "
            f"deliveries={deliveries} dup={ledger.counts['duplicates']} "
            f"connected={connected}/{len(self.clients)} instances_up={up}/{len(self.slots)} "
            f"connects={counts['connects']} faults={len(self.faults)}"
        )
        if last is not None:
            line += f" last={last['kind']}@{last['t']}s"
        print(line, flush=True)

    async def progress_loop(self, phase: list[str]) -> None:
        while True:
            await trio.sleep(PROGRESS_EVERY)
            self.progress(phase[0])

    # --- the run -----------------------------------------------------------------------------

    async def run(self) -> dict[str, Any]:
        result: dict[str, Any] = {}
        phase = ["setup"]
        async with httpx.AsyncClient() as self.http, trio.open_nursery() as root:
            if self.net is not None:
                # on this thread: PR_SET_PDEATHSIG fires when the thread that forked exits
                self.net.setup()
                self.redis_host = self.net.remote
            if self.args.cluster:
                await self.start_cluster()
            else:
                self.start_redis()
                if not await self.redis_up():
                    raise SoakError(f"redis-server did not start: see {self.workdir / 'redis.log'}")
            async with trio.open_nursery() as starting:
                for slot in self.slots:
                    starting.start_soon(self.start_instance, slot)
            if any(s.state != "up" for s in self.slots):
                raise SoakError(f"an instance did not start: see the logs in {self.workdir}")
            root.start_soon(self.monitor, root)
            root.start_soon(self.progress_loop, phase)
            async with trio.open_nursery() as clients:
                for client in self.clients:
                    clients.start_soon(client.run)
                    await trio.sleep(0.01)
                with trio.move_on_after(60):
                    while not all(len(c.member_since) == len(c.rooms) for c in self.clients):
                        await trio.sleep(0.1)
                self.rss_start = [s.child.rss_kib() if s.child else None for s in self.slots]
                phase[0] = "traffic"
                self.traffic_started = time.monotonic()
                self.traffic_t0 = trio.current_time()
                self.progress("start")
                async with trio.open_nursery() as faults:
                    faults.start_soon(self.sender)
                    faults.start_soon(self.churn)
                    faults.start_soon(self.fault_schedule, faults)
                    await trio.sleep(self.duration)
                    self.ending.set()  # the sender stops; running faults heal and return
                phase[0] = "drain"
                await self.heal()
                result["drain_s"] = await self.drain()
                result["clients_ready_at_end"] = sum(c.ready for c in self.clients)
                self.rss_end = [s.child.rss_kib() if s.child else None for s in self.slots]
                phase[0] = "stop"
                async with trio.open_nursery() as closing:
                    for client in self.clients:
                        closing.start_soon(client.close)
                clients.cancel_scope.cancel()
            await self.stop_instances()
            phase[0] = "leak check"
            await trio.sleep(SESSION_TTL + 0.5)
            result["clean"] = await self.clean()
            result["leaks"] = await self.leaks()
            root.cancel_scope.cancel()
        return result

    async def start_cluster(self) -> None:
        """3 masters and 3 replicas (tests/_redis_cluster.py), in ``<workdir>/cluster``."""
        try:
            cluster = redis_cluster_class()(self.workdir / "cluster")
        except FileNotFoundError as exc:
            raise SoakError(f"{exc} (`make redis-server` installs them)") from exc
        CLUSTERS.append(cluster)
        try:
            await trio.to_thread.run_sync(cluster.start)
        except (RuntimeError, TimeoutError, OSError, subprocess.SubprocessError) as exc:
            raise SoakError(f"the Redis Cluster did not start: {exc}") from exc
        self.cluster = cluster

    async def heal(self) -> None:
        """After the traffic: Redis running and answering, the network clean, every instance
        up, nobody banned."""
        if self.redis is not None:
            self.redis.signal(signal.SIGCONT, ends_it=False)
        if self.net is not None:
            await trio.to_thread.run_sync(self.net.apply)
        if self.cluster is not None:
            async with self.redis_lock:
                for port in self.cluster.ports:
                    if not self.cluster.running(port):
                        await self._node("restart", port)
                    elif port not in self.cluster.live_ports():
                        self.cluster.resume(port)
                await self.settled()
        elif not await self.redis_up(20):
            async with self.redis_lock:
                self.start_redis()
                await self.redis_up(20)
        for slot in self.slots:
            if slot.state != "up":
                async with slot.lock:
                    if slot.state != "up":
                        await self.start_instance(slot)
        for user in self.users.values():
            if user.banned:
                await self._unban(user)

    async def drain(self) -> float:
        """Wait until every client is connected, joined everywhere, has its answers, and every
        acknowledged message has arrived (or is a gap); at most ``--drain-timeout``."""
        began = trio.current_time()
        with trio.move_on_after(self.args.drain_timeout):
            while True:
                await trio.sleep(0.5)
                if all(c.ready for c in self.clients):
                    audit = self.ledger.audit()
                    if audit["lost"] == 0:
                        await trio.sleep(1.0)  # and a last second for stragglers (duplicates)
                        break
        return round(trio.current_time() - began, 1)

    async def stop_instances(self) -> None:
        async def stop(slot: Slot) -> None:
            child = slot.child
            if child is None or child.exited() is not None:
                return
            slot.state = "down"
            child.signal(signal.SIGTERM)
            code = await child.wait(SHUTDOWN_TIMEOUT + 7)
            if code is None:
                child.signal(signal.SIGKILL)
                await child.wait(5)
                self._unexpected(child, None, "did not stop within the drain deadline (SIGKILLed)")
            elif code != 0:
                self._unexpected(child, code, "did not exit 0 on SIGTERM")

        async with trio.open_nursery() as nursery:
            for slot in self.slots:
                nursery.start_soon(stop, slot)

    async def clean(self) -> str:
        argv = [sys.executable, "-m", "trio_chat", "clean", "--redis-url", self.redis_url]
        with trio.fail_after(30):
            done = await trio.run_process(
                argv, env=self.instance_env(), capture_stdout=True, capture_stderr=True, check=False
            )
        return (done.stdout + done.stderr).decode().strip()

    async def leaks(self) -> dict[str, Any]:
        """The ``ws:*`` keys left: on the one Redis, or on every master of the cluster."""
        if self.cluster is not None:
            masters = await trio.to_thread.run_sync(self.cluster.masters)
            nodes = [("127.0.0.1", port) for port in masters]
        else:
            nodes = [(self.redis_host, self.redis_port)]
        locks: list[str] = []
        leaked: list[str] = []
        details: list[str] = []
        with trio.fail_after(30):
            for host, port in nodes:
                cli = ["redis-cli", "-h", host, "-p", str(port)]
                keys = await trio.run_process(
                    [*cli, "--scan", "--pattern", "ws:*"], capture_stdout=True
                )
                mine: list[str] = []
                for name in sorted(keys.stdout.decode().split()):
                    (locks if name.startswith("ws:reap:") else mine).append(name)
                leaked += mine
                for name in mine[: max(0, 20 - len(details))]:
                    kind = await trio.run_process([*cli, "type", name], capture_stdout=True)
                    ttl = await trio.run_process([*cli, "ttl", name], capture_stdout=True)
                    where = f"{port}: " if self.cluster is not None else ""
                    details.append(
                        f"{where}{name} ({kind.stdout.decode().strip()}, "
                        f"ttl {ttl.stdout.decode().strip()})"
                    )
        return {
            "leaked": len(leaked),
            "leaked_keys_sample": details,
            "reap_locks": len(locks),
            "masters_checked": [port for _, port in nodes] if self.cluster is not None else None,
        }


def scan_logs(workdir: Path) -> tuple[int, list[str]]:
    """Tracebacks in the instances' logs: lines with a Python traceback or a logged exc_info."""
    count, samples = 0, []
    for log in sorted(workdir.glob("soak-*.log")):
        for line in log.read_text(errors="replace").splitlines():
            if "Traceback" in line or '"exc_info"' in line:
                count += 1
                if len(samples) < 5:
                    try:
                        record = json.loads(line)
                        text = f"{record.get('message')} | {str(record.get('exc_info', ''))[-300:]}"
                    except ValueError:
                        text = line[:300]
                    samples.append(f"{log.name}: {text}")
    return count, samples


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="soak.py",
        description="Chat for minutes or hours under crashes, drains, Redis faults and a bad "
        "network, then check that nothing acknowledged was lost, nothing came twice and no "
        "record leaked.",
        epilog="See the module docstring and bench/README.md.",
    )
    parser.add_argument("--minutes", type=float, required=True, help="traffic and faults, minutes")
    parser.add_argument("--instances", type=int, default=3)
    parser.add_argument("--clients", type=int, default=300)
    parser.add_argument("--rooms", type=int, default=30)
    parser.add_argument(
        "--rate", type=float, help="messages/s from all clients (default clients/10)"
    )
    parser.add_argument(
        "--cluster",
        action="store_true",
        help="a Redis Cluster (3 masters, 3 replicas: tests/_redis_cluster.py), not one Redis",
    )
    parser.add_argument("--netem", action="store_true", help="network faults on the link to Redis")
    parser.add_argument(
        "--netem-impl",
        choices=["auto", "tc", "tun"],
        default="auto",
        help="tc: tc netem on a veth pair; tun: a user-space forwarder; auto: tc when it works",
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--fault-interval",
        type=float,
        help="seconds between faults, about (default: 15, less in runs under 3 minutes)",
    )
    parser.add_argument(
        "--churn", type=float, default=120.0, help="seconds between a client's normal reconnects"
    )
    parser.add_argument("--token-ttl", type=int, default=45, help="seconds a client token lives")
    parser.add_argument("--drain-timeout", type=float, default=30.0)
    parser.add_argument(
        "--keep", action="store_true", help="keep the logs even when the run passes"
    )
    args = parser.parse_args(argv)
    if args.cluster and args.netem:
        parser.error("--netem: on one Redis only, not with --cluster")
    if args.minutes <= 0 or args.clients < 2 or args.rooms < 1 or args.instances < 1:
        parser.error("--minutes must be > 0, --clients >= 2, --rooms >= 1, --instances >= 1")
    if args.clients > 2000:
        parser.error("--clients: at most 2000 (one process holds them all)")
    if args.fault_interval is None:  # a short run still deals every kind of fault
        args.fault_interval = min(15.0, max(4.0, args.minutes * 60 / 13))
    if args.netem and os.geteuid() != 0:
        parser.error("--netem needs root (ip netns, tc)")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--_tun-forwarder"]:
        return tun_forwarder(*argv[1:])
    args = parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="trio-chat-soak-"))
    soak = Soak(args, workdir)
    began = time.monotonic()
    result: dict[str, Any] = {}
    error = None
    budget = args.minutes * 60 + args.drain_timeout + 240  # set-up, drain, stop, leak check

    async def bounded() -> dict[str, Any]:
        with trio.open_signal_receiver(signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:

                async def on_sigterm() -> None:
                    async for _ in signals:
                        raise KeyboardInterrupt

                nursery.start_soon(on_sigterm)
                with trio.fail_after(budget):
                    outcome = await soak.run()
                nursery.cancel_scope.cancel()
                return outcome

    try:
        result = trio.run(bounded)
    except BaseException as exc:  # report whatever stopped the soak, as JSON, after cleaning up
        leaves = _leaves(exc)
        if any(isinstance(leaf, KeyboardInterrupt) for leaf in leaves):
            error = "interrupted"
        else:
            error = "; ".join(f"{type(leaf).__name__}: {leaf}" for leaf in leaves)
            traceback.print_exc()
    finally:
        kill_children()
        if soak.net is not None:
            soak.net.teardown()
    report = build_report(soak, result, error, time.monotonic() - began)
    ok = report["ok"]
    if ok and not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
        report["workdir"] = None
    if not ok and report["lost_samples"]:
        print("[soak] lost deliveries, with the recipient's last events:", file=sys.stderr)
        for sample in report["lost_samples"][:5]:
            print(json.dumps(sample, indent=1), file=sys.stderr)
    print(json.dumps(report, sort_keys=False), flush=True)
    return 0 if ok else 1


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaves(inner)]
    return [exc]


def build_report(
    soak: Soak, result: dict[str, Any], error: str | None, wall: float
) -> dict[str, Any]:
    audit = soak.ledger.audit(keep_lost=50)
    tracebacks, traceback_samples = scan_logs(soak.workdir)
    leaks = result.get("leaks", {})
    lost_samples = []
    for room, message_id, index in audit.pop("lost_list"):
        client = soak.clients[index]
        message = soak.ledger.messages[(room, message_id)]
        lost_samples.append(
            {
                "room": room,
                "id": format_id(message_id),
                "to_client": index,
                "from_client": message.sender,
                "trail": list(client.trail)[-12:],
            }
        )
    kinds = Counter(f["kind"] for f in soak.faults)
    counts, ledger = soak.counts, soak.ledger
    report: dict[str, Any] = {
        "sent": counts["sent"],
        "acked": ledger.counts["acked"],
        "expected_deliveries": audit["expected_deliveries"],
        "delivered": audit["delivered"],
        "lost": audit["lost"],
        "duplicates": ledger.counts["duplicates"],
        "gaps": audit["gaps"],
        "gaps_by_fault": audit["gaps_by_fault"],
        # --cluster: acked messages the promoted replica's stream lacked, and their deliveries
        # that never came (charged to the failover, as gaps are to their fault; not in "lost")
        "unreplicated": audit["unreplicated"],
        "unreplicated_by_fault": audit["unreplicated_by_fault"],
        "lost_unreplicated": audit["lost_unreplicated"],
        "lost_unreplicated_by_fault": audit["lost_unreplicated_by_fault"],
        "leaked_keys": leaks.get("leaked", -1),
        "faults": len(soak.faults),
        "faults_by_kind": dict(kinds),
        "unexpected_exits": len(soak.unexpected),
        "rss_start_kib": soak.rss_start,
        "rss_end_kib": soak.rss_end,
        "tracebacks": tracebacks,
        # the rest: how the run went
        "seed": soak.args.seed,
        "minutes": soak.args.minutes,
        "instances": len(soak.slots),
        "clients": len(soak.clients),
        "rooms": soak.args.rooms,
        "rate": soak.rate,
        "netem": soak.net.impl if soak.net is not None else None,
        "redis": "cluster" if soak.args.cluster else "single",
        "failover_s": [f["failover_s"] for f in soak.faults if "failover_s" in f],
        "fault_failures": sum(str(f.get("target", "")).startswith("failed") for f in soak.faults),
        "wall_s": round(wall, 1),
        "drain_s": result.get("drain_s"),
        "clients_ready_at_end": result.get("clients_ready_at_end"),
        "send_errors": dict(ledger.send_errors),
        "send_unknown": counts["send_unknown"],
        "extra_deliveries": audit["extra_deliveries"],
        "own_replayed": ledger.counts["own_replayed"],
        "unacked_published": audit["unacked_published"],
        "published_after_error": audit["published_after_error"],
        "published_after_error_samples": audit["published_after_error_samples"],
        "delivered_live": ledger.counts["delivered_live"],
        "delivered_replay": ledger.counts["delivered_replay"],
        "rejoins": ledger.counts["rejoins"],
        "recovered_false": ledger.counts["recovered_false"],
        "order_violations": ledger.counts["order_violations"],
        "stray_messages": ledger.counts["stray_messages"],
        "id_collisions": ledger.counts["id_collisions"],
        "payload_mismatches": ledger.counts["payload_mismatches"],
        "connects": counts["connects"],
        "refreshes": counts["refreshes"],
        "resets": counts["resets"],
        "churn_closes": counts["churn_closes"],
        "connect_failures": counts["connect_failures"],
        "start_failures": counts["start_failures"],
        "incarnations": [s.incarnation for s in soak.slots],
        "connection_ends": dict(soak.close_codes.most_common(12)),
        "other": {
            k: v
            for k, v in sorted((counts + ledger.counts).items())
            if k.startswith(
                ("refused_", "logout_", "join_error_", "refresh_error_", "error_", "client_error_")
            )
        },
        "reap_locks": leaks.get("reap_locks"),
        "masters_checked": leaks.get("masters_checked"),
        "unreplicated_samples": audit["unreplicated_samples"],
        "leaked_keys_sample": leaks.get("leaked_keys_sample", []),
        "clean": result.get("clean"),
        "unexpected_exit_details": soak.unexpected,
        "traceback_samples": traceback_samples,
        "duplicate_samples": ledger.samples["duplicates"][:5],
        "order_samples": ledger.samples["order"][:5],
        "lost_samples": lost_samples[:10],
        "fault_log": [{k: v for k, v in f.items() if k != "unix"} for f in soak.faults],
        "error": error,
        "workdir": str(soak.workdir),
    }
    report["ok"] = (
        error is None
        and report["lost"] == 0
        and report["duplicates"] == 0
        and report["leaked_keys"] == 0
        and report["unexpected_exits"] == 0
        and report["tracebacks"] == 0
    )
    return report


if __name__ == "__main__":
    sys.exit(main())
