"""A throwaway Redis Cluster (3 masters, 3 replicas) of ``redis-server`` processes, for tests.

Like ``_redis_server.RedisServer``: free ports on 127.0.0.1, no persistence, every process
tracked by pid and stopped by pid, and a temporary directory of its own (one subdirectory per
node, holding its ``nodes-<port>.conf`` and its log). Nodes are spoken to over short raw RESP
connections, so the fixture needs nothing but ``redis-server`` and ``redis-cli``.

Timing knobs: ``cluster-node-timeout`` is 1000 ms (a killed master is marked FAIL after about
1 s and its replica is promoted about 1 s later), ``cluster-replica-validity-factor 0`` lets a
replica take over however long its link was down, ``repl-diskless-sync-delay 0`` lets the
replicas sync right away (Redis 7 waits 5 s by default) and straight into memory, and
``repl-ping-replica-period 1`` (and one FLUSHALL at start) moves the replication offsets off 0,
without which CLUSTER SLOTS does not list the replicas. ``start()`` takes about 2.2 s, nearly
all of it Redis's own: a master that just started waits 2 s before it says cluster_state:ok.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

NODE_TIMEOUT_MS = 1000
SLOTS = 16384
_PING_TIMEOUT = 5.0
_CREATE_TIMEOUT = 30.0
_OK_TIMEOUT = 15.0
_CLK_TCK = os.sysconf("SC_CLK_TCK")


class RedisReplyError(Exception):
    """An error reply (``-ERR ...``) of a node."""


def free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports of 127.0.0.1 that nothing listens on right now."""
    with ExitStack() as stack:
        ports = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket())
            sock.bind(("127.0.0.1", 0))
            ports.append(sock.getsockname()[1])
        return ports


def _encode(args: tuple[str | bytes | int, ...]) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg if isinstance(arg, bytes) else str(arg).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


def _read_reply(stream: Any) -> Any:
    """One RESP2 reply: str for simple and bulk strings, int, None, list; errors are returned."""
    line = stream.readline()
    if not line.endswith(b"\r\n"):
        raise ConnectionError("connection closed in the middle of a reply")
    kind, rest = line[:1], line[1:-2]
    if kind == b"+":
        return rest.decode()
    if kind == b"-":
        return RedisReplyError(rest.decode())
    if kind == b":":
        return int(rest)
    if kind == b"$":
        length = int(rest)
        if length < 0:
            return None
        data = stream.read(length + 2)
        return data[:-2].decode()
    if kind == b"*":
        length = int(rest)
        return None if length < 0 else [_read_reply(stream) for _ in range(length)]
    raise ConnectionError(f"unexpected RESP reply {line!r}")


def command(port: int, *args: str | bytes | int, timeout: float = 1.0) -> Any:
    """Send one command to 127.0.0.1:``port`` and return its reply (raise on an error reply)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(_encode(args))
        with sock.makefile("rb") as stream:
            reply = _read_reply(stream)
    if isinstance(reply, RedisReplyError):
        raise reply
    return reply


def _info_fields(text: str) -> dict[str, str]:
    return dict(
        line.split(":", 1) for line in text.splitlines() if ":" in line and not line.startswith("#")
    )


class ClusterNode:
    """One line of CLUSTER NODES."""

    def __init__(self, line: str) -> None:
        fields = line.split()
        self.id = fields[0]
        address = fields[1].split("@")[0].split(",")[0]
        self.port = int(address.rsplit(":", 1)[1])
        self.flags = set(fields[2].split(","))
        self.master_id = None if fields[3] == "-" else fields[3]
        self.connected = fields[7] == "connected"
        self.slots: set[int] = set()
        for item in fields[8:]:
            if item.startswith("["):  # a slot being imported or migrated
                continue
            start, _, end = item.partition("-")
            self.slots.update(range(int(start), int(end or start) + 1))

    @property
    def is_master(self) -> bool:
        return "master" in self.flags

    @property
    def failing(self) -> bool:
        return bool(self.flags & {"fail", "fail?", "noaddr", "handshake"})


class RedisCluster:
    """Six ``redis-server`` in cluster mode: 3 masters with one replica each, on 127.0.0.1.

    ``start()`` returns once the cluster is created and ok everywhere. The process methods
    (``kill``, ``pause``, ``resume``, ``restart``) act on one node, by client port, right away;
    ``wait_ok`` and ``wait_for_failover`` wait for the cluster to settle.
    """

    def __init__(
        self,
        directory: Path | None = None,
        *,
        masters: int = 3,
        replicas_per_master: int = 1,
        node_timeout_ms: int = NODE_TIMEOUT_MS,
        hz: int = 100,
    ) -> None:
        self.redis_server = shutil.which("redis-server")
        self.redis_cli = shutil.which("redis-cli")
        if self.redis_server is None or self.redis_cli is None:
            raise FileNotFoundError("redis-server and redis-cli must be on PATH")
        #: removed by ``stop()``, like every node's files in it
        self.directory = directory or Path(tempfile.mkdtemp(prefix="trio-chat-cluster-"))
        self.node_timeout = node_timeout_ms / 1000
        self.replicas_per_master = replicas_per_master
        #: every node's ``--hz`` (100 for the tests; Redis's own default, and one plain
        #: redis-server's, is 10)
        self.hz = hz
        count = masters * (1 + replicas_per_master)
        all_ports = free_ports(2 * count)
        #: client ports; the first ``masters`` of them are the masters redis-cli starts with
        self.ports: list[int] = all_ports[:count]
        self._bus_ports = dict(zip(self.ports, all_ports[count:], strict=True))
        seeds = ",".join(f"127.0.0.1:{port}" for port in self.ports[:masters])
        self.url = f"redis+cluster://{seeds}"
        self._processes: dict[int, subprocess.Popen[bytes] | None] = dict.fromkeys(self.ports)
        self._paused: set[int] = set()
        self.ids: dict[int, str] = {}
        #: slot -> master port, as every node last agreed (set by ``wait_ok``)
        self.slot_owner: list[int] = []
        #: master port -> its replicas' ports, as every node last agreed (set by ``wait_ok``)
        self.shards: dict[int, tuple[int, ...]] = {}
        #: seconds spent in ``start()``
        self.startup_seconds = 0.0

    # -- processes --------------------------------------------------------------------------

    def node_dir(self, port: int) -> Path:
        return self.directory / str(port)

    def log(self, port: int) -> str:
        path = self.node_dir(port) / "redis.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def pid(self, port: int) -> int:
        process = self._processes[port]
        assert process is not None, f"node {port} is not running"
        return process.pid

    def running(self, port: int) -> bool:
        return self._processes[port] is not None

    def live_ports(self) -> list[int]:
        """Ports of the nodes that run and are not paused."""
        return [p for p in self.ports if self.running(p) and p not in self._paused]

    def _spawn(self, port: int) -> None:
        assert self._processes[port] is None, f"node {port} is already running"
        directory = self.node_dir(port)
        directory.mkdir(exist_ok=True)
        assert self.redis_server is not None
        with (directory / "redis.log").open("ab") as log:
            self._processes[port] = subprocess.Popen(
                [
                    self.redis_server,
                    "--port", str(port),
                    "--bind", "127.0.0.1",
                    "--daemonize", "no",
                    "--dir", str(directory),
                    "--save", "",
                    "--appendonly", "no",
                    "--cluster-enabled", "yes",
                    "--cluster-config-file", f"nodes-{port}.conf",
                    "--cluster-port", str(self._bus_ports[port]),
                    "--cluster-node-timeout", str(round(self.node_timeout * 1000)),
                    "--cluster-replica-validity-factor", "0",
                    "--repl-diskless-sync", "yes",
                    "--repl-diskless-sync-delay", "0",
                    "--repl-diskless-load", "on-empty-db",
                    "--repl-ping-replica-period", "1",
                    "--hz", str(self.hz),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )  # fmt: skip

    def _wait_ping(self, ports: list[int]) -> None:
        deadline = time.monotonic() + _PING_TIMEOUT
        waiting = list(ports)
        while waiting:
            port = waiting[0]
            process = self._processes[port]
            assert process is not None
            if process.poll() is not None:
                raise RuntimeError(f"redis-server on port {port} exited:\n{self.log(port)}")
            try:
                if command(port, "PING", timeout=0.5) == "PONG":
                    waiting.pop(0)
                    continue
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not answer PING on {port}:\n{self.log(port)}")
            time.sleep(0.005)

    def start(self) -> None:
        """Start the six nodes, create the cluster and wait until it is ok everywhere."""
        started = time.monotonic()
        self.directory.mkdir(parents=True, exist_ok=True)
        try:
            for port in self.ports:
                self._spawn(port)
            self._wait_ping(self.ports)
            assert self.redis_cli is not None
            create = subprocess.run(
                [
                    self.redis_cli, "--cluster", "create",
                    *(f"127.0.0.1:{port}" for port in self.ports),
                    "--cluster-replicas", str(self.replicas_per_master),
                    "--cluster-yes",
                ],
                capture_output=True,
                timeout=_CREATE_TIMEOUT,
                check=False,
            )  # fmt: skip
            if create.returncode != 0 or b"[OK] All 16384 slots covered" not in create.stdout:
                raise RuntimeError(
                    f"redis-cli --cluster create failed ({create.returncode}):\n"
                    f"{create.stdout.decode(errors='replace')}{create.stderr.decode()}"
                )
            self.ids = {port: command(port, "CLUSTER", "MYID") for port in self.ports}
            self._nudge_replicas()
            self.wait_ok(_OK_TIMEOUT)
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - started

    def _nudge_replicas(self) -> None:
        """Once every replica has synced, move the masters' replication offsets off 0.

        CLUSTER SLOTS (which cluster clients read) leaves out a replica whose replication offset
        is 0, and a fresh master only moves it when it writes, or pings its replicas
        (``repl-ping-replica-period``, at least 1 s): an (empty) FLUSHALL is written to them.
        """
        deadline = time.monotonic() + _OK_TIMEOUT
        masters = set()
        for port in self.ports:
            while True:
                info = _info_fields(command(port, "INFO", "replication"))
                if info["role"] == "master" or info.get("master_link_status") == "up":
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"replica {port} did not sync: {info}")
                time.sleep(0.005)
            if info["role"] == "slave":
                masters.add(int(info["master_port"]))
        for port in masters:
            command(port, "FLUSHALL")

    def kill(self, port: int) -> None:
        """SIGKILL one node (even a paused one) and reap it."""
        process = self._processes[port]
        if process is not None:
            process.kill()
            process.wait()
            self._processes[port] = None
        self._paused.discard(port)

    def pause(self, port: int) -> None:
        """SIGSTOP: the node's ports still accept connections but nothing answers."""
        os.kill(self.pid(port), signal.SIGSTOP)
        self._paused.add(port)

    def resume(self, port: int) -> None:
        """SIGCONT a paused node."""
        os.kill(self.pid(port), signal.SIGCONT)
        self._paused.discard(port)

    def restart(self, port: int) -> None:
        """(Kill and) start the same node again, with its nodes.conf: same id, empty data.

        Returns once it answers PING; it rejoins the cluster on its own (a former master comes
        back as a replica of its replacement), so call ``wait_ok`` to wait for that.
        """
        self.kill(port)
        self._spawn(port)
        self._wait_ping([port])

    def stop(self) -> None:
        """SIGKILL every node by pid and remove the temporary directory."""
        for port in self.ports:
            self.kill(port)
        shutil.rmtree(self.directory, ignore_errors=True)

    def cpu_seconds(self, port: int) -> float:
        """User + system CPU time of one node so far, from /proc/<pid>/stat."""
        with open(f"/proc/{self.pid(port)}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        # fields[0] is the state, field 3; utime and stime are fields 14 and 15
        return (int(fields[11]) + int(fields[12])) / _CLK_TCK

    # -- cluster state ----------------------------------------------------------------------

    def _any_live(self) -> int:
        for port in self.live_ports():
            return port
        raise RuntimeError("no node of the cluster is running")

    def command(self, port: int, *args: str | bytes | int, timeout: float = 1.0) -> Any:
        """One command to one node (raw RESP2 reply, RedisReplyError on an error reply)."""
        return command(port, *args, timeout=timeout)

    def nodes(self, port: int | None = None) -> list[ClusterNode]:
        """CLUSTER NODES as seen by ``port`` (by default any running node)."""
        text = command(self._any_live() if port is None else port, "CLUSTER", "NODES")
        return [ClusterNode(line) for line in text.splitlines() if line.strip()]

    def masters(self) -> list[int]:
        """Ports of the masters that own slots and are not failing (per CLUSTER NODES)."""
        return sorted(n.port for n in self.nodes() if n.is_master and n.slots and not n.failing)

    def replicas(self) -> list[int]:
        """Ports of the replicas that are not failing (per CLUSTER NODES)."""
        return sorted(n.port for n in self.nodes() if "slave" in n.flags and not n.failing)

    def replicas_of(self, master_port: int) -> list[int]:
        master_id = self.ids[master_port]
        return sorted(
            n.port
            for n in self.nodes()
            if "slave" in n.flags and n.master_id == master_id and not n.failing
        )

    def keyslot(self, key: str | bytes) -> int:
        slot: int = command(self._any_live(), "CLUSTER", "KEYSLOT", key)
        return slot

    def slot_map(self, port: int | None = None) -> list[tuple[int, int, int, tuple[int, ...]]]:
        """CLUSTER SLOTS as (first slot, last slot, master port, replica ports), sorted."""
        reply = command(self._any_live() if port is None else port, "CLUSTER", "SLOTS")
        return sorted(
            (start, end, master[1], tuple(sorted(r[1] for r in replicas)))
            for start, end, master, *replicas in reply
        )

    def master_for_key(self, key: str | bytes) -> int:
        """Port of the master that owns ``key``'s slot (CLUSTER KEYSLOT, then CLUSTER SLOTS)."""
        slot = self.keyslot(key)
        for start, end, master, _ in self.slot_map():
            if start <= slot <= end:
                return master
        raise LookupError(f"no node owns slot {slot}")

    def key_for_master(self, master_port: int, prefix: str = "key") -> str:
        """A key ``prefix:<n>`` whose slot ``master_port`` owns (per the last agreed map)."""
        for n in range(100_000):
            key = f"{prefix}:{n}"
            if self.slot_owner[self.keyslot(key)] == master_port:
                return key
        raise LookupError(f"no key of {master_port}")

    def flushall(self) -> None:
        """Delete every key on every master (the replicas follow)."""
        for port in self.masters():
            command(port, "FLUSHALL")

    def migrate_slot(self, slot: int, target_port: int) -> None:
        """Move ``slot`` (and its keys) to the master ``target_port``, as redis-cli reshards."""
        source_port = self.slot_owner[slot]
        source, target = self.ids[source_port], self.ids[target_port]
        command(target_port, "CLUSTER", "SETSLOT", slot, "IMPORTING", source)
        command(source_port, "CLUSTER", "SETSLOT", slot, "MIGRATING", target)
        while keys := command(source_port, "CLUSTER", "GETKEYSINSLOT", slot, 100):
            command(source_port, "MIGRATE", "127.0.0.1", target_port, "", 0, 5000, "KEYS", *keys)
        others = [p for p in self.masters() if p not in (source_port, target_port)]
        for port in [target_port, source_port, *others]:
            command(port, "CLUSTER", "SETSLOT", slot, "NODE", target)

    def _settled(self, ports: list[int]) -> tuple[list[int], dict[int, tuple[int, ...]]] | str:
        """The agreed slot -> master map and master -> replicas if every node of ``ports`` is ok
        and agrees, or why not."""
        maps = {}
        for port in ports:
            try:
                info = _info_fields(command(port, "CLUSTER", "INFO"))
                if info.get("cluster_state") != "ok":
                    return f"{port}: cluster_state:{info.get('cluster_state')}"
                maps[port] = self.slot_map(port)
            except (OSError, RedisReplyError) as error:
                return f"{port}: {error!r}"
        distinct = set(map(tuple, maps.values()))
        if len(distinct) != 1:
            return f"nodes disagree on CLUSTER SLOTS: {maps}"
        owner = [-1] * SLOTS
        shards = {}
        for start, end, master, replicas in distinct.pop():
            owner[start : end + 1] = [master] * (end - start + 1)
            shards[master] = replicas
        if -1 in owner:
            return f"{owner.count(-1)} slots are not covered"
        listed = {port for replicas in shards.values() for port in replicas}
        for port in ports:
            info = _info_fields(command(port, "INFO", "replication"))
            if info.get("role") == "slave":
                if info.get("master_link_status") != "up":
                    return f"{port}: replica link {info.get('master_link_status')}"
                # CLUSTER SLOTS leaves out a replica until it has synced (replication offset 0)
                if port not in listed:
                    return f"replica {port} is not in CLUSTER SLOTS yet"
        return owner, shards

    def wait_ok(self, timeout: float = _OK_TIMEOUT) -> None:
        """Wait until every running node says cluster_state:ok, all agree on CLUSTER SLOTS,
        the 16384 slots are covered and every replica's link to its master is up."""
        deadline = time.monotonic() + timeout
        while True:
            settled = self._settled(self.live_ports())
            if not isinstance(settled, str):
                self.slot_owner, self.shards = settled
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"the cluster did not settle in {timeout} s: {settled}")
            time.sleep(0.02)

    def wait_for_failover(self, old_master_port: int, timeout: float = 10.0) -> int:
        """Wait until the slots of ``old_master_port`` (per the last ``wait_ok``) belong to
        one of its former replicas, on every other running node, with cluster_state:ok there;
        return that new master's port."""
        old_slots = [slot for slot, port in enumerate(self.slot_owner) if port == old_master_port]
        assert old_slots, f"{old_master_port} owned no slot at the last wait_ok"
        former_replicas = self.shards[old_master_port]
        survivors = [p for p in self.live_ports() if p != old_master_port]
        deadline = time.monotonic() + timeout
        while True:
            settled = self._settled(survivors)
            if not isinstance(settled, str):
                owner, shards = settled
                new = {owner[slot] for slot in old_slots}
                if len(new) == 1 and (port := new.pop()) in former_replicas:
                    self.slot_owner, self.shards = owner, shards
                    return port
                settled = f"slots of {old_master_port} on {new}, not on {former_replicas}"
            if time.monotonic() > deadline:
                raise TimeoutError(f"no failover of {old_master_port} in {timeout} s: {settled}")
            time.sleep(0.02)
