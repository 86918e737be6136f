"""Every kind of fault the soak makes, on a schedule drawn from ``--seed``: the table below,
then the schedule (a shuffled deck: every kind once before any twice), and how each kind is
made (``fault_<kind>``). Mixed into the Soak (_soak.runner) as ``Faults``."""

from __future__ import annotations

import math
import signal
import sys
import time
import traceback
from typing import TYPE_CHECKING, Any

import trio
import trio.lowlevel

from trio_chat._store.keys import hash_slot, room_channel

from .common import SHUTDOWN_TIMEOUT, SoakError, now_ms, parse_id
from .ledger import Ledger, ReplicationCheck

if TYPE_CHECKING:
    import argparse
    import random
    from collections import Counter

    from .children import Child
    from .clients import Client, User
    from .netem import Net
    from .runner import Slot


#: every kind of fault: when it is dealt, and what it does. base: in every run (redis_*: on one
#: Redis only; *_instance: with 2 instances or more); --netem, --cluster: with that option.
#: The lists below keep this order, the order the seeded deck is shuffled from.
FAULTS: dict[str, tuple[str, str]] = {
    "kill_instance": ("base", "SIGKILL an instance, start it again 1-3 s later"),
    "drain_instance": ("base", "SIGTERM an instance (the drain: must exit 0), start it again"),
    "redis_pause": ("base", "SIGSTOP redis-server for 2-5 s (one Redis only)"),
    "redis_restart": ("base", "SIGKILL redis-server, start it empty (one Redis only)"),
    "socket_resets": ("base", "TCP RST the sockets of 5% of the clients"),
    "logout": ("base", "log one user out (admin API); it comes back with a new token"),
    "ban": ("base", "ban one user (admin API), unban it 3-6 s later"),
    "net_delay": ("--netem", "20-80 ms each way (with jitter) on the link to Redis, 8-15 s"),
    "net_loss": ("--netem", "2-8% of the packets each way on the link to Redis, 8-15 s"),
    "net_partition": ("--netem", "every packet to and from Redis dropped, 5 s"),
    "master_kill": ("--cluster", "SIGKILL a master: its replica is promoted; restart it empty"),
    "master_pause": ("--cluster", "SIGSTOP a master for 0.3-0.7 s, under the node timeout"),
    "master_stall": ("--cluster", "SIGSTOP a master until its replica is promoted, and more"),
    "shard_loss": ("--cluster", "SIGKILL a master and its replica, restart both empty"),
    "hooks_restart": ("--hooks", "SIGKILL the hooks application, start it again 1-3 s later"),
}
FAULT_KINDS = [kind for kind, (where, _) in FAULTS.items() if where == "base"]
NET_FAULT_KINDS = [kind for kind, (where, _) in FAULTS.items() if where == "--netem"]
HOOKS_FAULT_KINDS = [kind for kind, (where, _) in FAULTS.items() if where == "--hooks"]
#: with --cluster, in place of redis_pause and redis_restart
CLUSTER_FAULT_KINDS = [kind for kind, (where, _) in FAULTS.items() if where == "--cluster"]
#: a master SIGSTOPped for less than this is not failed over (node timeout 1 s in the fixture)
SHORT_PAUSE = (0.3, 0.7)
FAILOVER_TIMEOUT = 20.0
SETTLE_TIMEOUT = 30.0
#: acked messages this long before a failover began are checked against the promoted replica
UNREPLICATED_LOOKBACK_MS = 10_000
#: the faults that may lose what Redis held (read markers among it): Redis restarted empty, a
#: shard lost, a failover (asynchronous replication)
DATA_LOSS_FAULTS = frozenset(
    {"redis_restart", "shard_loss", "master_kill", "master_stall", "master_pause"}
)


class Faults:
    """The faults, as methods of the Soak (_soak.runner): its state and methods they use."""

    args: argparse.Namespace
    duration: float
    traffic_t0: float
    fault_rng: random.Random
    faults: list[dict[str, Any]]
    ending: trio.Event
    ledger: Ledger
    counts: Counter[str]
    slots: list[Slot]
    users: dict[str, User]
    clients: list[Client]
    room_names: list[str]
    redis: Child | None
    redis_lock: trio.Lock
    net: Net | None
    net_lock: trio.Lock
    cluster: Any
    node_busy: set[int]
    hooks_app: Child | None

    if TYPE_CHECKING:

        def clock(self) -> float: ...
        def start_redis(self) -> None: ...
        async def start_hooks_app(self) -> None: ...
        async def redis_up(self, timeout: float = 10.0) -> bool: ...  # noqa: ASYNC109
        async def start_instance(self, slot: Slot) -> bool: ...
        async def admin_post(self, path: str) -> dict[str, Any] | None: ...
        def _unexpected(self, child: Child, code: int | None, why: str) -> None: ...

    def fault_before(self, unix: float) -> str:
        label, latest = "none", -math.inf
        for fault in self.faults:  # (a fault that waited for a lock began when it got it)
            if latest <= fault["unix"] <= unix:
                label, latest = f"{fault['kind']}#{fault['n']}", fault["unix"]
        return label

    def data_loss_between(self, lo: float, hi: float) -> str | None:
        """The label of a fault that may have lost Redis data and ran at some time between the
        unix times ``lo`` and ``hi`` (or None)."""
        for fault in self.faults:
            if fault["kind"] in DATA_LOSS_FAULTS:
                if fault["unix"] <= hi and fault.get("end_unix", math.inf) >= lo:
                    return f"{fault['kind']}#{fault['n']}"
        return None

    async def pause(self, seconds: float) -> None:
        """Sleep, but wake at once when the traffic ends (faults heal then)."""
        with trio.move_on_after(seconds):
            await self.ending.wait()

    async def fault_schedule(self, nursery: trio.Nursery) -> None:
        rng = self.fault_rng
        kinds = FAULT_KINDS + (NET_FAULT_KINDS if self.net is not None else [])
        kinds += HOOKS_FAULT_KINDS if self.args.hooks else []
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
        fault["end_unix"] = time.time()

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

    async def fault_hooks_restart(self) -> str:
        """The application behind the hooks goes away: meanwhile handshakes are refused 503
        and join, send and direct answered ``unavailable`` (refused, never lost)."""
        assert self.hooks_app is not None
        self.hooks_app.signal(signal.SIGKILL)
        await self.hooks_app.wait(5)
        await self.pause(self.fault_rng.uniform(1, 3))
        await self.start_hooks_app()
        return "SIGKILL, started again"

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
