"""Child processes (started to die with the runner, stopped with SIGTERM then SIGKILL), the
throwaway redis-server or Redis Cluster of a pass, Redis's counters, and CPU readings from
/proc."""

from __future__ import annotations

import contextlib
import ctypes
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    from collections.abc import Iterator


from .settings import (
    CLUSTER_OPTIONS,
    PR_SET_PDEATHSIG,
    ROOT,
    START_TIMEOUT,
    STOP_TIMEOUT,
    BenchError,
)


def _child_setup() -> None:
    """In each child: as many file descriptors as allowed, and die with the runner."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 1 << 20
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, target), hard))
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def stop(process: subprocess.Popen[bytes], timeout: float = STOP_TIMEOUT) -> None:
    """SIGTERM, wait up to ``timeout`` seconds, then SIGKILL."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@contextlib.contextmanager
def child(command: list[str], log: Path, **kwargs: object) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("ab") as sink:
        process = subprocess.Popen(
            command, stdout=sink, stderr=subprocess.STDOUT, preexec_fn=_child_setup, **kwargs
        )
    try:
        yield process
    finally:
        stop(process)


def wait_for(condition: object, process: subprocess.Popen[bytes], what: str, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while not condition():  # type: ignore[operator]
        if process.poll() is not None or time.monotonic() > deadline:
            tail = log.read_text(errors="replace")[-3000:]
            raise BenchError(f"{what} did not start (see {log}):\n{tail}")
        time.sleep(0.02)


@contextlib.contextmanager
def redis_server(workdir: Path) -> Iterator[tuple[str, int]]:
    """A redis-server of our own on a free port of 127.0.0.1, without persistence."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise BenchError("redis-server is not on PATH (make redis-server installs it)")
    port = free_port()
    command = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly"]
    command += ["no", "--dir", str(workdir), "--maxclients", "50000"]
    log = workdir / "redis.log"
    with child(command, log) as process:

        def ready() -> bool:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
                    sock.sendall(b"PING\r\n")
                    return sock.recv(16).startswith(b"+PONG")
            except OSError:
                return False

        wait_for(ready, process, "redis-server", log)
        yield f"redis://127.0.0.1:{port}/0", process.pid


def import_cluster_fixture() -> type:
    """tests/_redis_cluster.py's RedisCluster (standard library only), imported from tests/."""
    tests = str(ROOT / "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)
    from _redis_cluster import RedisCluster

    return cast("type", RedisCluster)


@contextlib.contextmanager
def redis_cluster(workdir: Path) -> Iterator[tuple[str, list[dict[str, object]], Any]]:
    """A Redis Cluster of our own (tests/_redis_cluster.py: 3 masters with CLUSTER_OPTIONS'
    replicas each, every node at its hz, free ports of 127.0.0.1, no persistence, node timeout
    1 s). Yields its ``redis+cluster://`` URL, its nodes (label, role, port, pid; masters in
    port order, each followed by its replicas) and the fixture. The nodes' logs are copied to
    ``workdir`` before it is stopped."""
    fixture = import_cluster_fixture()
    cluster = fixture(workdir / "cluster", **CLUSTER_OPTIONS)
    cluster.start()
    try:
        nodes: list[dict[str, object]] = []
        for n, master in enumerate(sorted(cluster.shards), start=1):
            nodes.append({"label": f"master {n}", "role": "master", "port": master})
            for replica in cluster.shards[master]:
                nodes.append({"label": f"replica {n}", "role": "replica", "port": replica})
        for node in nodes:
            node["pid"] = cluster.pid(node["port"])
            node["slots"] = (
                cluster.slot_owner.count(node["port"]) if node["role"] == "master" else 0
            )
        print(
            f"Redis Cluster up in {cluster.startup_seconds:.1f} s: {cluster.url}; "
            + ", ".join(f"{n['label']} :{n['port']} pid {n['pid']}" for n in nodes),
            file=sys.stderr,
        )
        yield cluster.url, nodes, cluster
    finally:
        with contextlib.suppress(Exception):
            for port in cluster.ports:
                shutil.copy(cluster.node_dir(port) / "redis.log", workdir / f"redis-{port}.log")
        cluster.stop()


#: INFO stats and CLUSTER INFO fields redis_counters() reads
REDIS_COUNTERS = (
    "total_commands_processed",
    "total_reads_processed",
    "total_writes_processed",
    "total_net_input_bytes",
    "total_net_output_bytes",
    "total_net_repl_output_bytes",
    "cluster_stats_messages_sent",
    "cluster_stats_messages_publishshard_sent",
)


def redis_counters(port: int) -> dict[str, int]:
    """Counters of the redis-server on 127.0.0.1:``port`` (INFO stats; CLUSTER INFO too on a
    cluster node), through tests/_redis_cluster.py's one-command RESP client."""
    import_cluster_fixture()
    from _redis_cluster import RedisReplyError, command

    text = command(port, "INFO", "stats")
    with contextlib.suppress(RedisReplyError, OSError):
        text += "\n" + command(port, "CLUSTER", "INFO")
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    return {k: int(fields[k]) for k in REDIS_COUNTERS if k in fields}


def cluster_slot(name: str) -> int:
    """The Redis Cluster slot of a key without a hash tag: CRC16 (XMODEM) modulo 16384."""
    import binascii

    return binascii.crc_hqx(name.encode(), 0) % 16384


def idle_cpu(pids: list[int], seconds: float) -> list[float]:
    """CPU seconds per second each of ``pids`` used over the next ``seconds``."""
    before = [_cpu_seconds(pid) for pid in pids]
    t0 = time.monotonic()
    time.sleep(seconds)
    wall = time.monotonic() - t0
    return [round((_cpu_seconds(pid) - b) / wall, 4) for pid, b in zip(pids, before, strict=True)]


def _cpu_seconds(pid: int) -> float:
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
