"""trio-chat vs python-socketio and Node.js Socket.IO under one Node.js load generator, two
instances each.

For every workload and each system in turn: start a throwaway redis-server on a free port of
127.0.0.1, start two server instances on it, run ``bench/loadgen/loadgen.mjs`` (which prints
its results as JSON), stop the servers and Redis, then do the same for the next system.
Prints one markdown table with every system and the ratios of trio-chat to each of the others
(trio-chat / python-socketio, trio-chat / Node.js Socket.IO). The Node.js peer
(``bench/peers/socketio-node/server.mjs``: socket.io 4.8 with @socket.io/redis-adapter) is
driven by the generator's ``--system socketio`` client, like python-socketio.
``--trio-layout`` changes how trio-chat runs: 2x1 (two processes, the default), 1x1 (one
process) or 1x2 (one ``serve --workers 2`` process: two workers sharing a port).

  A  fan-out: 1 room, --subscribers split over both instances, 1 publisher at each rate
  B  many rooms: --rooms x --members, each member sending --member-rate msg/s
  C  idle connections: --connections, each joining its own room (RSS/connection, opens/s)
  D  connection rate: --connect-connections (2,000), --connect-concurrency (100) at a time,
     each opened and then joined to a room of its own, on ONE instance of every system

``--redis cluster`` runs trio-chat on a Redis Cluster instead (3 masters, the
test fixture tests/_redis_cluster.py, ``redis+cluster://`` URL) and reports Redis CPU per node;
its nodes run at ``--cluster-hz`` (10, like the one redis-server) with ``--cluster-replicas``
replicas per master (1; 0 = three bare masters);
``--redis both`` runs every trio-chat pass on one redis-server, then on a cluster, and prints
them side by side.

Everything it starts is stopped again on success, failure, Ctrl-C or SIGTERM (children also
get SIGTERM if this process dies: PR_SET_PDEATHSIG). Server logs stay in a temporary
directory whose path is printed. Standard library only; run with any Python >= 3.11:

  python3 bench/run.py --quick            # ~2 minutes
  python3 bench/run.py                    # the full run
  python3 bench/run.py --profile 800      # also: py-spy on trio-chat during fan-out at 800/s
  python3 bench/run.py --profile-handshakes 8000   # also: py-spy while C opens 8000 connections
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime
import json
import math
import os
import platform
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
LOADGEN = BENCH / "loadgen"
PEERS = BENCH / "peers"
NODE_PEER = PEERS / "socketio-node"
TRIO_PYTHON = Path(os.environ.get("TRIO_CHAT_PYTHON", ROOT / ".venv" / "bin" / "python"))
BENCH_PYTHON = Path(os.environ.get("BENCH_PYTHON", BENCH / ".venv" / "bin" / "python"))
SECRET = "bench-secret-" + "s" * 51  # 64 characters
START_TIMEOUT = 20.0
STOP_TIMEOUT = 15.0
SYSTEMS = {"trio": "trio-chat", "socketio": "python-socketio", "socketio-node": "Node.js Socket.IO"}
#: the short names of the ratio columns (trio-chat / each other system)
RATIO_NAMES = {"socketio": "sio", "socketio-node": "node"}
#: the load generator's client for each system: both Socket.IO peers speak the same protocol
LOADGEN_SYSTEM = {"trio": "trio", "socketio": "socketio", "socketio-node": "socketio"}
#: --trio-layout: trio-chat processes x workers per process (the peers are always 2 x 1)
TRIO_LAYOUTS = {"2x1": (2, 1), "1x1": (1, 1), "1x2": (1, 2)}
LAYOUT_NOTES = {
    "2x1": "two instances, one worker each",
    "1x1": "one instance (the generator gets its URL twice)",
    "1x2": "one `serve --workers 2` process: two workers on one port (SO_REUSEPORT), the "
    "generator gets its URL twice and the kernel spreads the connections",
}
TRIO_LAYOUT: list[str] = ["2x1"]
#: --history-size: TRIO_CHAT_HISTORY_SIZE for the trio-chat instances (None: the server's
#: default, 200); 0 turns history off, so a send is a bare PUBLISH instead of the script
HISTORY_SIZE: list[int | None] = [None]
#: --redis: what the instances of a pass run on: one redis-server, or a Redis Cluster
#: (tests/_redis_cluster.py: 3 masters, 1 replica each)
REDIS_MODES = ("single", "cluster")
REDIS_LABELS = {"single": "one redis-server", "cluster": "Redis Cluster (3 masters + 3 replicas)"}
#: --cluster-hz and --cluster-replicas: the cluster's nodes' hz (the one redis-server runs at
#: Redis's default, 10; the test fixture's default is 100) and replicas per master
CLUSTER_OPTIONS: dict[str, int] = {"hz": 10, "replicas_per_master": 1}


def cluster_label() -> str:
    """E.g. "Redis Cluster (3 masters + 3 replicas, hz 10)"."""
    replicas = CLUSTER_OPTIONS["replicas_per_master"]
    shape = f"3 masters + {3 * replicas} replicas" if replicas else "3 masters, no replicas"
    return f"Redis Cluster ({shape}, hz {CLUSTER_OPTIONS['hz']})"


#: before the measured part of a pass: how long to read the Redis processes' idle CPU
IDLE_SAMPLE_S = 3.0
#: appended to trio-chat's label while the cluster passes' tables are printed
LABEL_REDIS: list[str] = [""]
PR_SET_PDEATHSIG = 1


def token(user: str) -> str:
    """An hour's HS256 token for ``user``, signed with the instances' secret."""
    import jwt  # the bench venv's scripts that never mint one need not have it

    now = int(time.time())
    return jwt.encode({"sub": user, "iat": now, "exp": now + 3600}, SECRET, algorithm="HS256")


def percentile(samples: list[float], q: float) -> float:
    """Nearest rank."""
    ordered = sorted(samples)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


class BenchError(Exception):
    """A server did not start, or the load generator failed."""


# --- processes -------------------------------------------------------------------------------


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


TRIO_ENV: dict[str, str] = {}  # --trio-env KEY=VALUE, for experiments (not in the README run)
#: where `python -m trio_chat` runs: a copy of trio_chat/ taken at the start of the run (other
#: engineers edit trio_chat/ meanwhile; every pass must measure the same code), or the tree
TRIO_SRC: list[Path] = [ROOT]
SOURCE_NOTE: list[str] = [""]


def _children(pid: int) -> set[int]:
    """The child processes of ``pid``, whichever of its threads started them (trio starts
    subprocesses from a worker thread)."""
    found: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            found.update(int(p) for p in (task / "children").read_text().split())
    return found


def _is_worker(pid: int, instance_id: str) -> bool:
    """Whether ``pid`` is still the trio-chat worker ``instance_id`` (not a reused pid)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return instance_id.encode() in argv


@contextlib.contextmanager
def trio_chat_server(
    workdir: Path, redis_url: str, name: str, workers: int = 1
) -> Iterator[tuple[str, list[int]]]:
    """One trio-chat process; with ``workers`` > 1 a supervisor of that many workers (instance
    ids ``<name>-w<n>``) on one fixed port (``--workers`` refuses port 0). Yields its URL and
    the pids whose CPU and RSS count: the process itself, or the supervisor then each worker."""
    env = {
        **os.environ,
        "TRIO_CHAT_AUTH_JWT_SECRET": SECRET,
        "TRIO_CHAT_ADMIN_ENABLED": "false",
        "TRIO_CHAT_LIMITS_SEND_RATE": "100000",
        "TRIO_CHAT_LIMITS_SEND_BURST": "100000",
        "TRIO_CHAT_LIMITS_FRAME_RATE": "100000",
        "TRIO_CHAT_LIMITS_FRAME_BURST": "100000",
        "TRIO_CHAT_LIMITS_MAX_SESSIONS_PER_USER": "100000",
        "TRIO_CHAT_LIMITS_MAX_CONNECTIONS": "100000",
        **({} if HISTORY_SIZE[0] is None else {"TRIO_CHAT_HISTORY_SIZE": str(HISTORY_SIZE[0])}),
        **TRIO_ENV,
    }
    port = free_port() if workers > 1 else 0
    command = [str(TRIO_PYTHON), "-m", "trio_chat", "serve", "--host", "127.0.0.1"]
    command += ["--port", str(port), "--redis-url", redis_url, "--instance-id", name]
    if workers > 1:
        command += ["--workers", str(workers)]
    # one log for the supervisor and its workers (they inherit its stdout and stderr)
    log = workdir / f"{name}.log"
    ids = [f"{name}-w{n}" for n in range(workers)] if workers > 1 else [name]
    worker_pids: dict[int, int] = {}
    try:
        with child(command, log, env=env, cwd=TRIO_SRC[0]) as process:
            found: list[str] = []

            def ready() -> bool:
                text = log.read_text(errors="replace")
                matches = [
                    re.search(rf"instance {re.escape(i)} listening on (ws://\S+)", text)
                    for i in ids
                ]
                if not all(matches):
                    return False
                found.extend(m.group(1) for m in matches if m)
                for n, pid in re.findall(r"worker (\d+) started \(pid (\d+)\)", text):
                    worker_pids[int(n)] = int(pid)  # the last start of each worker counts
                return True

            wait_for(ready, process, name, log)
            if workers > 1:
                children = _children(process.pid)
                if set(worker_pids.values()) != children or len(children) != workers:
                    raise BenchError(
                        f"{name}: workers {worker_pids} in the log, children {children} in /proc"
                    )
            pids = [process.pid] + [worker_pids[n] for n in sorted(worker_pids)]
            yield found[0], pids
    finally:
        # SIGKILL after STOP_TIMEOUT reaches the supervisor only: its workers would live on
        for n, pid in worker_pids.items():
            if _is_worker(pid, ids[n]):
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)


@contextlib.contextmanager
def socketio_server(workdir: Path, redis_url: str, name: str) -> Iterator[tuple[str, list[int]]]:
    env = {**os.environ, "TRIO_CHAT_AUTH_JWT_SECRET": SECRET, "BENCH_REDIS_URL": redis_url}
    port = free_port()
    command = [str(BENCH_PYTHON), "-m", "uvicorn", "--app-dir", str(PEERS), "socketio_server:app"]
    command += ["--host", "127.0.0.1", "--port", str(port), "--loop", "asyncio", "--http", "h11"]
    command += ["--ws", "websockets", "--ws-per-message-deflate", "false", "--lifespan", "off"]
    command += ["--timeout-graceful-shutdown", "5"]
    log = workdir / f"{name}.log"
    with child(command, log, env=env, cwd=ROOT) as process:

        def ready() -> bool:
            return "Uvicorn running on" in log.read_text(errors="replace")

        wait_for(ready, process, name, log)
        yield f"http://127.0.0.1:{port}", [process.pid]


@contextlib.contextmanager
def socketio_node_server(
    workdir: Path, redis_url: str, name: str
) -> Iterator[tuple[str, list[int]]]:
    """One Node.js Socket.IO peer (bench/peers/socketio-node/server.mjs) on a port of its own
    choosing (--port 0); ready once it prints "socketio-node running on http://HOST:PORT"."""
    env = {**os.environ, "TRIO_CHAT_AUTH_JWT_SECRET": SECRET, "BENCH_REDIS_URL": redis_url}
    command = ["node", str(NODE_PEER / "server.mjs"), "--host", "127.0.0.1", "--port", "0"]
    command += ["--name", name]
    log = workdir / f"{name}.log"
    with child(command, log, env=env, cwd=NODE_PEER) as process:
        found: list[str] = []

        def ready() -> bool:
            text = log.read_text(errors="replace")
            match = re.search(r"socketio-node running on (http://127\.0\.0\.1:\d+)", text)
            if match:
                found.append(match.group(1))
            return match is not None

        wait_for(ready, process, name, log)
        yield found[0], [process.pid]


def system_label(system: str) -> str:
    """The system's name in the tables: trio-chat with its layout, e.g. "trio-chat (1x2)", and
    the history size when --history-size gave one ("trio-chat (2x1, history 0)")."""
    if system != "trio":
        return SYSTEMS[system]
    history = "" if HISTORY_SIZE[0] is None else f", history {HISTORY_SIZE[0]}"
    return f"{SYSTEMS[system]} ({TRIO_LAYOUT[0]}{history}{LABEL_REDIS[0]})"


def connections_by_instance(workdir: Path) -> dict[str, int]:
    """Connections each trio-chat instance (worker) accepted, from its ``connected`` lines."""
    counts: Counter[str] = Counter()
    for log in sorted(workdir.glob("trio-*.log")):
        text = log.read_text(errors="replace")
        counts.update(re.findall(r": connected user=\S+ session=\S+ instance=(\S+)", text))
    return dict(sorted(counts.items()))


def log_notes(workdir: Path) -> list[str]:
    """Warnings, errors and exceptions in the server logs, counted by message shape."""
    notes: list[str] = []
    for log in sorted(workdir.glob("*.log")):
        if log.name.startswith("redis"):  # redis.log, a cluster's redis-<port>.log
            continue
        shapes: Counter[str] = Counter()
        for line in log.read_text(errors="replace").splitlines():
            if re.search(r"\b(WARNING|ERROR|CRITICAL)\b", line):
                shape = re.sub(r"^\S+ \S+ ", "", line)  # drop the timestamp
            elif match := re.match(r"^[\s|+]*(\w+(Error|Exception|Exit)\w*: .*)$", line):
                shape = "raised " + match.group(1)
            else:
                continue
            shape = re.sub(r"session[= ]\S+", "session <id>", shape)
            shape = re.sub(r"\b[0-9a-f]{8,}\b|\d+(\.\d+)?", "#", shape)
            shapes[shape[:200]] += 1
        for shape, count in shapes.most_common(6):
            notes.append(f"{log.name}: {count} x {shape}")
    return notes


# --- one pass: one system, one workload --------------------------------------------------------


def loadgen_command(
    system: str, workload: str, urls: list[str], options: dict[str, object]
) -> list[str]:
    client = LOADGEN_SYSTEM[system]
    command = ["node", str(LOADGEN / "loadgen.mjs"), "--system", client, "--workload", workload]
    command += ["--urls", ",".join(urls), "--secret", SECRET]
    for key, value in options.items():
        command += [f"--{key}", str(value)]
    return command


def run_loadgen(command: list[str], timeout: float, workdir: Path) -> dict[str, object]:
    stdout_path = workdir / "loadgen.out"
    with stdout_path.open("wb") as out:
        process = subprocess.Popen(command, stdout=out, cwd=LOADGEN, preexec_fn=_child_setup)
        try:
            code = process.wait(timeout)
        except BaseException:
            process.kill()
            process.wait()
            raise
    text = stdout_path.read_text()
    if code != 0:
        raise BenchError(f"load generator exited {code}; stdout: {text[-2000:]}")
    result: dict[str, object] = json.loads(text.strip().splitlines()[-1])
    return result


def one_pass(
    system: str,
    workload: str,
    options: dict[str, object],
    timeout: float,
    logs: Path,
    profile: dict[str, object] | None = None,
    trigger: bytes = b"SENDING",
    redis: str = "single",
) -> dict[str, object]:
    tag = "" if redis == "single" else f"-{redis}"
    workdir = Path(tempfile.mkdtemp(prefix=f"{system}-{workload}{tag}-", dir=logs))
    print(
        f"\n== {system_label(system)} on {REDIS_LABELS[redis]}: workload {workload} (logs in "
        f"{workdir})",
        file=sys.stderr,
    )
    if workload == "connect":  # D: one instance of every system (1x2: one with two workers)
        processes, workers = 1, TRIO_LAYOUTS[TRIO_LAYOUT[0]][1] if system == "trio" else 1
    elif system == "trio":
        processes, workers = TRIO_LAYOUTS[TRIO_LAYOUT[0]]
    else:
        processes, workers = 2, 1
    cluster: object = None
    with contextlib.ExitStack() as stack:
        if redis == "cluster":
            redis_url, redis_nodes, cluster = stack.enter_context(redis_cluster(workdir))
            redis_pids = [cast("int", node["pid"]) for node in redis_nodes]
        else:
            redis_url, redis_pid = stack.enter_context(redis_server(workdir))
            redis_nodes = [
                {
                    "label": "redis-server",
                    "role": "single",
                    "pid": redis_pid,
                    "port": int(redis_url.rsplit(":", 1)[1].split("/")[0]),
                }
            ]
            redis_pids = [redis_pid]
        servers = []
        for i in range(1, processes + 1):
            name = f"{system}-{i}"
            if system == "trio":
                server = trio_chat_server(workdir, redis_url, name, workers)
            elif system == "socketio-node":
                server = socketio_node_server(workdir, redis_url, name)
            else:
                server = socketio_server(workdir, redis_url, name)
            servers.append(stack.enter_context(server))
        # one process: the same URL twice, and the kernel spreads the clients over its workers
        urls = [url for url, _ in servers] * (2 // processes)
        pids = [pid for _, group in servers for pid in group]
        # what serves connections (py-spy's targets): not a supervisor
        serving = [pid for _, group in servers for pid in (group[1:] if workers > 1 else group)]
        options = {
            **options,
            "pids": ",".join(map(str, pids)),
            "redis-pid": ",".join(map(str, redis_pids)),
        }
        # the Redis processes' own cost with the instances connected and idle (a cluster's
        # nodes run at --cluster-hz and gossip on the cluster bus; one redis-server at hz 10)
        redis_idle = idle_cpu(redis_pids, IDLE_SAMPLE_S)
        counters_before = [redis_counters(cast("int", n["port"])) for n in redis_nodes]
        command = loadgen_command(system, workload, urls, options)
        if profile is None:
            result = run_loadgen(command, timeout, workdir)
        else:
            result = run_profiled(command, timeout, workdir, serving, profile, trigger)
        # Redis's own counters over the whole load generator run (connecting, joining and the
        # measured window): how many commands came per read, i.e. how well they were batched
        for node, before in zip(redis_nodes, counters_before, strict=True):
            after = redis_counters(cast("int", node["port"]))
            node["counters"] = {k: after[k] - before.get(k, 0) for k in after}
    result["log_notes"] = log_notes(workdir)
    result["logs"] = str(workdir)
    result["redis"] = redis
    if redis == "cluster":
        result["cluster_options"] = dict(CLUSTER_OPTIONS)
    result["redis_nodes"] = redis_nodes  # the order of redis_cpu_each and redis_idle_cpu_each
    result["redis_idle_cpu_each"] = redis_idle
    if redis == "cluster" and workload == "rooms":
        # where B's rooms live: rooms (stream + shard channel chat:room:<room>) per master
        owners = cluster.slot_owner  # type: ignore[attr-defined]
        per_master: Counter[int] = Counter(
            owners[cluster_slot(f"chat:room:room-{i}")]
            for i in range(int(options["rooms"]))  # type: ignore[call-overload]
        )
        for node in redis_nodes:
            if node["role"] == "master":
                node["rooms"] = per_master[cast("int", node["port"])]
    # the order of the generator's server_cpu_each and rss_*_kib lists
    result["server_pids"] = pids
    result["server_labels"] = (
        [tag for _ in servers for tag in ("sup", *(f"w{n}" for n in range(workers)))]
        if workers > 1
        else [""] * len(pids)
    )
    if system == "trio":
        result["trio_layout"] = f"1x{workers}" if workload == "connect" else TRIO_LAYOUT[0]
        result["history_size"] = HISTORY_SIZE[0]
        result["connections_by_instance"] = connections_by_instance(workdir)
    return result


# --- profiling -----------------------------------------------------------------------------------


def _py_spy(pid: int, seconds: int, kind: str, target: str) -> subprocess.Popen[bytes]:
    """``py-spy record`` of ``pid`` for ``seconds`` into ``target`` (format ``kind``), by
    function (-F); idle samples excluded (py-spy's default)."""
    command = [str(BENCH_PYTHON.parent / "py-spy"), "record", "--pid", str(pid), "--duration"]
    command += [str(seconds), "--format", kind, "-F", "-o", target]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _stop_after_opening(procs: list[subprocess.Popen[bytes]], workdir: Path, n: int) -> str:
    """Wait for ``procs`` (py-spy); stop them with SIGINT (they write what they have) once the
    trio-chat logs in ``workdir`` show ``n`` connections of workload C's users idle-*.
    Returns why they stopped."""
    needle = b": connected user=idle-"
    offsets: dict[Path, int] = {}
    seen = 0
    while any(p.poll() is None for p in procs):
        for log in workdir.glob("trio-*.log"):
            with log.open("rb") as source:
                source.seek(offsets.get(log, 0))
                data = source.read()
            whole = data[: data.rfind(b"\n") + 1]  # a line still being written: next time
            offsets[log] = offsets.get(log, 0) + len(whole)
            seen += whole.count(needle)
        if seen >= n:
            for p in procs:
                if p.poll() is None:
                    p.send_signal(signal.SIGINT)
            return "at the end of the opening"
        time.sleep(0.05)
    return "after --profile-seconds"


def run_profiled(
    command: list[str],
    timeout: float,
    workdir: Path,
    pids: list[int],
    profile: dict[str, object],
    trigger: bytes = b"SENDING",
) -> dict[str, object]:
    """Run the load generator and, once it prints ``trigger`` on stderr, py-spy on each of
    ``pids``: --format raw (collapsed stacks, aggregated by function), then a flame graph SVG.
    With profile["opening"] = N (workload C): raw only, from the trigger on, and stopped early
    once the servers have logged the N connections (at most as long as the opening lasts).
    With profile["until"] = a line of the generator's: raw only, stopped when it prints it."""
    seconds = int(profile["seconds"])  # type: ignore[call-overload]
    out = Path(str(profile["out"]))
    opening = int(profile.get("opening", 0))  # type: ignore[call-overload]
    until = cast("bytes | None", profile.get("until"))
    raws = [f"{out}-instance{index}.txt" for index in range(1, len(pids) + 1)]
    procs: list[subprocess.Popen[bytes]] = []
    recorded: dict[str, object] = {}
    started = time.monotonic()  # again when py-spy starts
    stdout_path = workdir / "loadgen.out"
    with stdout_path.open("wb") as sink:
        loadgen = subprocess.Popen(
            command, stdout=sink, stderr=subprocess.PIPE, cwd=LOADGEN, preexec_fn=_child_setup
        )
        try:
            assert loadgen.stderr is not None
            for raw in loadgen.stderr:
                sys.stderr.write(raw.decode(errors="replace"))
                if until and procs and until in raw and not recorded:
                    for p in procs:
                        if p.poll() is None:
                            p.send_signal(signal.SIGINT)
                    for p in procs:
                        p.wait(30)
                    recorded = {
                        "profiled_s": round(time.monotonic() - started, 2),
                        "profile_stopped_at": "when the generator printed "
                        + until.decode(errors="replace"),
                    }
                    continue
                if trigger not in raw or procs:
                    continue
                if not opening and not until:
                    time.sleep(1.0)  # past the first second of the step
                started = time.monotonic()
                procs += [
                    _py_spy(pid, seconds, "raw", path) for pid, path in zip(pids, raws, strict=True)
                ]
                if opening:
                    stop = _stop_after_opening(procs, workdir, opening)
                    for p in procs:
                        p.wait(30)
                    recorded = {
                        "profiled_s": round(time.monotonic() - started, 2),
                        "profile_stopped_at": stop,
                    }
                    print(f"py-spy stopped {stop}: {recorded['profiled_s']} s", file=sys.stderr)
                    continue
                if until:
                    continue
                # A flame graph of the same step, right after the raw profile.
                for p in procs:
                    p.wait(seconds + 30)
                procs += [
                    _py_spy(pid, seconds, "flamegraph", f"{out}-instance{index}.svg")
                    for index, pid in enumerate(pids, start=1)
                ]
            code = loadgen.wait(timeout)
        finally:
            for p in procs:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(seconds + 30)
                if p.poll() is None:
                    p.kill()
                    p.wait()
            if loadgen.poll() is None:
                loadgen.kill()
                loadgen.wait()
    text = stdout_path.read_text()
    if code != 0:
        raise BenchError(f"load generator exited {code}; stdout: {text[-2000:]}")
    result = dict(json.loads(text.strip().splitlines()[-1]))
    # the raw profiles written (a layout with one process profiles one)
    result["profile_files"] = [path for path in raws if Path(path).exists()]
    return result | recorded


def summarize_profile(path: Path, top: int = 25) -> str:
    """Self and total share of samples per function, from py-spy's collapsed stacks."""
    self_counts: Counter[str] = Counter()
    total_counts: Counter[str] = Counter()
    samples = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        samples += count
        frames = [re.sub(r":\d+\)$", ")", frame) for frame in stack.split(";")]
        self_counts[frames[-1]] += count
        for frame in set(frames):
            total_counts[frame] += count
    lines = [f"{path.name}: {samples} samples (py-spy, 100 Hz, idle excluded)", ""]
    lines.append(f"{'self %':>7} {'total %':>8}  function (file)   -- top {top} by self time")
    for frame, count in self_counts.most_common(top):
        share, total = 100 * count / samples, 100 * total_counts[frame] / samples
        lines.append(f"{share:7.1f} {total:8.1f}  {frame}")
    lines += ["", f"{'total %':>8}  function (file)   -- top {top} by total (inclusive) time"]
    for frame, count in total_counts.most_common(top):
        lines.append(f"{100 * count / samples:8.1f}  {frame}")
    return "\n".join(lines) + "\n"


def write_profile_summary(result: dict[str, object], out: str, header: str) -> str:
    """``header`` and the summary of each raw profile of ``result``; also ``out``-summary.txt."""
    files = cast("list[str]", result.get("profile_files") or [])
    text = "\n".join([header, "", *(summarize_profile(Path(path)) for path in files)])
    Path(f"{out}-summary.txt").write_text(text)
    return text


# --- the table -----------------------------------------------------------------------------------


def fmt(value: object, digits: int = 2) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        if value >= 1000 or (value == int(value) and abs(value) >= 100):
            return f"{value:,.0f}"
        return f"{value:.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def ratio(a: object, b: object) -> str:
    if not isinstance(a, (int, float)) or not isinstance(b, (int, float)):
        return "—"
    if b == 0:
        return "—" if a == 0 else "∞"
    return f"{a / b:.2f}"


def cpu_per_delivery(step: dict[str, object]) -> float | None:
    """Server CPU microseconds per delivered message over the measured window (which runs
    from the first send until everything arrived or the drain ended)."""
    cores, wall, received = step.get("server_cpu"), step.get("wall_s"), step.get("received")
    if not all(isinstance(v, (int, float)) for v in (cores, wall, received)) or not received:
        return None
    return round(cores * wall / received * 1e6, 3)  # type: ignore[operator]


def peak(steps: list[dict[str, object]], p99_limit: float) -> object:
    """Highest rate with no loss and p99 under the limit (None when there is none)."""
    good = [
        s["rate"]
        for s in steps
        if s.get("lost") == 0
        and isinstance(s.get("p99_ms"), (int, float))
        and s["p99_ms"] < p99_limit  # type: ignore[operator]
    ]
    return max(good) if good else None  # type: ignore[type-var]


def present(results: dict[str, dict[str, dict[str, object]]]) -> list[str]:
    """The systems with results, in SYSTEMS' order (trio-chat first)."""
    return [s for s in SYSTEMS if results.get(s)]


def first(results: dict[str, dict[str, dict[str, object]]], key: str) -> dict[str, object] | None:
    """Workload ``key``'s result of the first system that has one."""
    for system in SYSTEMS:
        if key in results.get(system, {}):
            return results[system][key]
    return None


def table(results: dict[str, dict[str, dict[str, object]]], p99_limit: float) -> str:
    """One column per system, then trio-chat / each other system (when trio-chat ran)."""
    rows: list[list[str]] = []
    systems = present(results)
    others = [s for s in systems if s != "trio"] if "trio" in systems else []

    def row(label: str, metric: str, key: str | None, get: object, better: str) -> None:
        values = {
            s: get(results[s][key]) if key in results.get(s, {}) else None  # type: ignore[operator]
            for s in systems
        }
        rows.append(
            [
                label,
                f"{metric} ({better})",
                *(fmt(values[s]) for s in systems),
                *(ratio(values["trio"], values[s]) for s in others),
            ]
        )

    if (any_result := first(results, "A")) is not None:
        subs = any_result["steps"][0].get("subscribers")  # type: ignore[index]
        for index, step in enumerate(any_result["steps"]):  # type: ignore[arg-type]
            rate = step["rate"]
            label = f"A fan-out {rate}/s × {subs}"  # noqa: RUF001

            def pick(field: str, i: int = index) -> object:
                return lambda r: r["steps"][i].get(field) if i < len(r["steps"]) else None

            def per_delivery(i: int = index) -> object:
                return lambda r: cpu_per_delivery(r["steps"][i]) if i < len(r["steps"]) else None

            row(label, "delivered msg/s", "A", pick("delivered_per_s"), "↑")
            row(label, "p50 ms", "A", pick("p50_ms"), "↓")
            row(label, "p99 ms", "A", pick("p99_ms"), "↓")
            row(label, "max ms", "A", pick("max_ms"), "↓")
            row(label, "lost msgs", "A", pick("lost"), "↓")
            row(label, "server CPU s/s", "A", pick("server_cpu"), "↓")
            row(label, "server CPU µs/delivery", "A", per_delivery(), "↓")
            row(label, "Redis CPU s/s", "A", pick("redis_cpu"), "↓")
        row(
            f"A peak (0 loss, p99 < {p99_limit:g} ms)",
            "msg/s",
            "A",
            lambda r: peak(r["steps"], p99_limit),
            "↑",
        )
    b_keys = sorted(
        {k for r in results.values() for k in r if k.startswith("B")},
        key=lambda k: -float(k.split("@")[1]) if "@" in k else 0,
    )
    for key in b_keys:
        any_b = cast("dict[str, Any]", first(results, key))
        rate = any_b["member_rate"]
        label = f"B {any_b['rooms']} rooms × {any_b['members']}, {rate}/s each"  # noqa: RUF001
        row(label, "delivered msg/s", key, lambda r: r.get("delivered_per_s"), "↑")
        row(label, "p50 ms", key, lambda r: r.get("p50_ms"), "↓")
        row(label, "p99 ms", key, lambda r: r.get("p99_ms"), "↓")
        row(label, "max ms", key, lambda r: r.get("max_ms"), "↓")
        row(label, "lost msgs", key, lambda r: r.get("lost"), "↓")
        row(label, "server CPU s/s", key, lambda r: r.get("server_cpu"), "↓")
        row(label, "Redis CPU s/s", key, lambda r: r.get("redis_cpu"), "↓")
    if (any_c := first(results, "C")) is not None:
        label = f"C {any_c['connections']:,} idle, {any_c['concurrency']} in flight"
        row(label, "connections opened/s", "C", lambda r: r.get("opened_per_s"), "↑")
        row(label, "open p99 ms", "C", lambda r: r["open_latency"].get("p99_ms"), "↓")
        row(label, "joins/s", "C", lambda r: r.get("joins_per_s"), "↑")
        row(label, "server RSS KiB/conn", "C", lambda r: r.get("kib_per_connection"), "↓")
        row(label, "failed opens", "C", lambda r: r["connections"] - r["connected"], "↓")
    if (any_d := first(results, "D")) is not None:
        label = (
            f"D {any_d['connections']:,} opened + each joined to a new room, one instance, "
            f"{any_d['concurrency']} in flight"
        )
        row(label, "opened and joined/s", "D", lambda r: r.get("opened_joined_per_s"), "↑")
        row(label, "total s", "D", lambda r: r.get("total_s"), "↓")
        row(label, "open p50 ms", "D", lambda r: r["open_latency"].get("p50_ms"), "↓")
        row(label, "open p99 ms", "D", lambda r: r["open_latency"].get("p99_ms"), "↓")
        row(label, "join p50 ms", "D", lambda r: r["join_latency"].get("p50_ms"), "↓")
        row(label, "join p99 ms", "D", lambda r: r["join_latency"].get("p99_ms"), "↓")
        row(label, "server CPU s/s", "D", lambda r: r.get("server_cpu"), "↓")
        row(label, "Redis CPU s/s", "D", lambda r: r.get("redis_cpu"), "↓")
        row(label, "failed", "D", lambda r: r["connections"] - r["joined"], "↓")
    header = [
        "workload",
        "metric (better)",
        *(system_label(s) for s in systems),
        *(f"ratio trio/{RATIO_NAMES[s]}" for s in others),
    ]
    lines = [header, ["---"] * 2 + ["---:"] * (len(header) - 2), *rows]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in lines)


def _redis_windows(result: dict[str, object], key: str) -> list[tuple[str, dict[str, object]]]:
    """The measured windows of one A or B result, with their labels (C has no per-node CPU)."""
    if key == "A":
        steps = cast("list[dict[str, object]]", result["steps"])
        return [(f"A fan-out {s['rate']}/s × {s.get('subscribers')}", s) for s in steps]  # noqa: RUF001
    if key.startswith("B"):
        label = f"B {result['rooms']} rooms × {result['members']}, {result['member_rate']}/s each"  # noqa: RUF001
        return [(label, result)]
    return []


def redis_comparison(
    single: dict[str, dict[str, object]], cluster: dict[str, dict[str, object]]
) -> str:
    """trio-chat on one redis-server vs on the Redis Cluster, window by window (A, B), and the
    Redis CPU of each cluster node against the one redis-server's."""
    out: list[str] = []
    header = ["window", "metric (better)", REDIS_LABELS["single"], REDIS_LABELS["cluster"]]
    lines = [[*header, "ratio cluster/single"], ["---"] * 2 + ["---:"] * 3]
    nodes_header = ["window", "node", "port", "slots", "B rooms", "CPU s/s", "idle CPU s/s"]
    nodes_header.append("× one redis-server")  # noqa: RUF001
    nodes_header += ["commands (run)", "commands / read", "writes", "shard-publish bus msgs"]
    node_lines = [nodes_header, ["---"] * 3 + ["---:"] * 9]

    def counted(node: dict[str, object]) -> list[str]:
        c = cast("dict[str, int]", node.get("counters") or {})
        reads = c.get("total_reads_processed")
        return [
            fmt(c.get("total_commands_processed")),
            ratio(c.get("total_commands_processed"), reads),
            fmt(c.get("total_writes_processed")),
            fmt(c.get("cluster_stats_messages_publishshard_sent")),
        ]

    verdicts: list[str] = []
    for key in sorted(cluster):
        windows = _redis_windows(cluster[key], key)
        singles = dict(_redis_windows(single[key], key)) if key in single else {}
        for label, window in windows:
            other = singles.get(label, {})
            each = cast("list[float]", window.get("redis_cpu_each") or [])
            nodes = cast("list[dict[str, object]]", cluster[key].get("redis_nodes") or [])
            idle = cast("list[float]", cluster[key].get("redis_idle_cpu_each") or [])
            masters = [v for v, n in zip(each, nodes, strict=False) if n["role"] == "master"]
            replicas = [v for v, n in zip(each, nodes, strict=False) if n["role"] == "replica"]
            derived = {
                "redis_max_master": max(masters) if masters else None,
                "redis_max_replica": max(replicas) if replicas else None,
            }
            metrics = [
                ("delivered msg/s", "delivered_per_s", "↑"),
                ("p50 ms", "p50_ms", "↓"),
                ("p99 ms", "p99_ms", "↓"),
                ("max ms", "max_ms", "↓"),
                ("lost msgs", "lost", "↓"),
                ("server CPU s/s", "server_cpu", "↓"),
                ("Redis CPU s/s, all nodes", "redis_cpu", "↓"),
                ("Redis CPU s/s, busiest master", "redis_max_master", "↓"),
                ("Redis CPU s/s, busiest replica", "redis_max_replica", "↓"),
            ]
            for name, field, better in metrics:
                a: object
                if field in derived:  # one redis-server is the only "master" there
                    a = other.get("redis_cpu") if field == "redis_max_master" else None
                    b = derived[field]
                else:
                    a, b = other.get(field), window.get(field)
                digits = 3 if field.startswith("redis") else 2
                cells = [fmt(a, digits), fmt(b, digits), ratio(b, a)]
                lines.append([label, f"{name} ({better})", *cells])
            reference = other.get("redis_cpu") if other else None
            if key in single:
                for node in cast("list[dict[str, object]]", single[key].get("redis_nodes") or []):
                    idle_single = cast("list[float]", single[key].get("redis_idle_cpu_each") or [])
                    node_lines.append(
                        [
                            label,
                            "one redis-server",
                            str(node.get("port", "")),
                            fmt(16384),
                            "all",
                            fmt(reference, 3),
                            fmt(idle_single[0] if idle_single else None, 3),
                            "1.00",
                            *counted(node),
                        ]
                    )
            rests: list[float | None] = [*idle] if idle else [None] * len(each)
            for node, cpu, rest in zip(nodes, each, rests, strict=False):
                node_lines.append(
                    [
                        label,
                        str(node["label"]),
                        str(node.get("port", "")),
                        fmt(node.get("slots")),
                        fmt(node.get("rooms")) if node["role"] == "master" else "—",
                        fmt(cpu, 3),
                        fmt(rest, 3),
                        ratio(cpu, reference),
                        *counted(node),
                    ]
                )
            if isinstance(reference, (int, float)) and reference and masters:
                worst = max(masters) / reference
                lost = window.get("lost")
                verdicts.append(
                    f"{label}: busiest master {max(masters):.3f} s/s = {worst:.2f} × one "  # noqa: RUF001
                    f"redis-server's {reference:.3f} (target ≤ 0.40: "
                    f"{'met' if worst <= 0.4 else 'NOT met'}), lost {fmt(lost)} on the cluster, "
                    f"{fmt(other.get('lost'))} on one redis-server"
                )
    out.append("\n".join("| " + " | ".join(cells) + " |" for cells in lines))
    out.append(
        "\nRedis CPU per cluster node over each measured window (idle: the 3 s before the load "
        f"generator started, instances connected; one redis-server runs at hz 10, the cluster's "
        f"nodes at hz {CLUSTER_OPTIONS['hz']} with cluster-bus gossip, "
        f"{CLUSTER_OPTIONS['replicas_per_master']} replica(s) per master):\n"
    )
    out.append("\n".join("| " + " | ".join(cells) + " |" for cells in node_lines))
    if verdicts:
        out.append("")
        out.extend(f"- {line}" for line in verdicts)
    return "\n".join(out)


def conditions(results: dict[str, dict[str, dict[str, object]]]) -> str:
    """Per measured window: what else used the machine, and how the generator kept up."""
    header = [
        "window",
        "system",
        "servers CPU s/s (each)",
        "Redis CPU s/s",
        "loadgen CPU s/s",
        "other processes CPU s/s",
        "loadgen loop delay p99/max ms",
        "lost → arrived ≤late s after drain",
        "waited for quiet s",
        "disturbed attempts discarded (other CPU)",
    ]
    rows = []
    keys = sorted({k for r in results.values() for k in r})
    for workload in keys:
        for system in SYSTEMS:
            result = results.get(system, {}).get(workload)
            if not result:
                continue
            parts = result.get("steps") or [result]
            for part in parts:  # type: ignore[union-attr]
                if workload == "A":
                    where = f"A {part['rate']}/s"
                elif workload.startswith("B"):
                    where = f"B {part['member_rate']}/s each"
                elif workload == "D":
                    where = "D opening + joining"
                else:
                    where = "C opening"
                quiet = part.get("quiet") or {}
                if workload.startswith("C"):
                    cpu = [
                        fmt(part.get("open_server_cpu")),
                        fmt(part.get("open_redis_cpu")),
                        fmt(part.get("open_loadgen_cpu")),
                        fmt(part.get("open_other_cpu")),
                    ]
                    delay = "—"
                    late = "—"
                else:
                    values = part.get("server_cpu_each", [])
                    tags = cast("list[str]", result.get("server_labels") or [])
                    if any(tags):  # a supervisor and its workers: say which is which
                        pairs = zip(tags, values, strict=False)
                        each = " / ".join(f"{t} {fmt(v)}" for t, v in pairs)
                    else:
                        each = "/".join(fmt(v) for v in values)
                    cpu = [
                        f"{fmt(part.get('server_cpu'))} ({each})",
                        fmt(part.get("redis_cpu")),
                        fmt(part.get("loadgen_cpu")),
                        fmt(part.get("other_cpu")),
                    ]
                    delay = (
                        f"{fmt(part.get('loadgen_loop_delay_p99_ms'))}/"
                        f"{fmt(part.get('loadgen_loop_delay_max_ms'))}"
                    )
                    late = (
                        f"{fmt(part.get('lost'))} → {fmt(part.get('arrived_late'))}"
                        if part.get("lost")
                        else "0"
                    )
                waited = fmt(quiet.get("waited_s"))
                if quiet.get("quiet") is False:
                    waited += " (not quiet)"
                discarded = (
                    ", ".join(fmt(a.get("other_cpu")) for a in part.get("disturbed_attempts", []))
                    or "—"
                )
                rows.append([where, system_label(system), *cpu, delay, late, waited, discarded])
    lines = [header, ["---"] * len(header), *rows]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in lines)


def problems(results: dict[str, dict[str, dict[str, object]]]) -> list[str]:
    """Closes, errors and connect failures the generator saw, and server log warnings."""
    out: list[str] = []
    for system, by_workload in results.items():
        for workload, result in by_workload.items():
            parts = result.get("steps") or [result]
            for part in parts:  # type: ignore[union-attr]
                where = f"{system_label(system)} {workload}" + (
                    f" @{part['rate']}/s" if "rate" in part else ""
                )
                for field in ("closes", "errors", "connect_failures", "join_failures"):
                    if part.get(field):
                        out.append(f"{where}: {field} {json.dumps(part[field])}")
                if part.get("stale"):
                    out.append(f"{where}: {part['stale']} stale messages (older step)")
                if part.get("reordered"):
                    out.append(f"{where}: {part['reordered']} out-of-order deliveries")
            for note in result.get("log_notes", []):  # type: ignore[union-attr]
                out.append(f"{system_label(system)} {workload} log: {note}")
    return out


def spread(results: dict[str, dict[str, dict[str, object]]]) -> list[str]:
    """How the connections fell on trio-chat's instances (with workers: how the kernel spread
    them), and in C each process's RSS growth."""
    out: list[str] = []
    for workload, result in results.get("trio", {}).items():
        counts = cast("dict[str, int]", result.get("connections_by_instance") or {})
        total = sum(counts.values())
        line = ", ".join(
            f"{instance} {fmt(n)} ({100 * n / total:.1f}%)" for instance, n in counts.items()
        )
        if workload.startswith("C"):
            before = cast("list[int]", result.get("rss_before_kib") or [])
            after = cast("list[int]", result.get("rss_after_kib") or [])
            tags = cast("list[str]", result.get("server_labels") or [])
            growth = " / ".join(
                f"{t + ' ' if t else ''}{fmt((a - b) / 1024, 1)}"
                for t, b, a in zip(tags, before, after, strict=False)
            )
            line += f"; RSS growth MiB {growth}"
        out.append(f"{system_label('trio')} {workload}: {line or 'none logged'}")
    return out


def source_digest(root: Path = ROOT) -> str:
    """A digest of trio_chat/*.py under ``root``: the code the servers import."""
    import hashlib

    digest = hashlib.sha256()
    for path in sorted((root / "trio_chat").rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


def snapshot_source(logs: Path) -> str:
    """Copy trio_chat/ to ``logs``/src and run the servers from there; describe the copy."""
    head = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--", "trio_chat"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    ).stdout.strip()
    target = logs / "src"
    shutil.copytree(
        ROOT / "trio_chat", target / "trio_chat", ignore=shutil.ignore_patterns("__pycache__")
    )
    TRIO_SRC[0] = target
    return (
        f"{head}{' + uncommitted changes in trio_chat/' if dirty else ''}, copied to "
        f"{target} (trio_chat/*.py sha256 {source_digest(target)})"
    )


# --- versions -----------------------------------------------------------------------------------


def versions() -> str:
    def output(command: list[str], cwd: Path = ROOT) -> str:
        try:
            return subprocess.run(
                command, capture_output=True, text=True, cwd=cwd, timeout=30
            ).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return "?"

    trio = output(
        [
            str(TRIO_PYTHON),
            "-c",
            "import importlib.metadata as m; print(' '.join(f'{p} {m.version(p)}' for p in "
            "('trio', 'trio-websocket', 'coredis')))",
        ]
    )
    sio = output(
        [
            str(BENCH_PYTHON),
            "-c",
            "import importlib.metadata as m; print(' '.join(f'{p} {m.version(p)}' for p in "
            "('python-socketio', 'python-engineio', 'uvicorn', 'websockets', 'redis')))",
        ]
    )
    node = output(
        [
            "node",
            "-e",
            "console.log(process.version + ' ws ' + "
            "require('./node_modules/ws/package.json').version + ' socket.io-client ' + "
            "require('./node_modules/socket.io-client/package.json').version)",
        ],
        LOADGEN,
    )
    node_peer = output(
        [
            "node",
            "-e",
            "const v = (p) => require('./node_modules/' + p + '/package.json').version; "
            "console.log(['socket.io', 'engine.io', 'ws', '@socket.io/redis-adapter', 'redis', "
            "'@redis/client', 'jsonwebtoken'].map((p) => p + ' ' + v(p)).join(' '))",
        ],
        NODE_PEER,
    )
    redis = output(["redis-server", "--version"]).split(" ")[2:3]
    commit = output(["git", "rev-parse", "--short", "HEAD"])
    return (
        f"nproc {len(os.sched_getaffinity(0))}, Python {platform.python_version()}, "
        f"{platform.platform()}; trio-chat {SOURCE_NOTE[0] or commit} ({trio}); {sio}; "
        f"Node.js Socket.IO peer ({node_peer}); "
        f"redis-server "
        f"{''.join(redis).removeprefix('v=')}; node {node}"
    )


# --- main -----------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="rates 50..400, 3 s each; 200 rooms, 5 s; 1000 idle connections",
    )
    parser.add_argument("--workloads", default="A,B,C,D", help="subset of A,B,C,D (A,B,C,D)")
    parser.add_argument(
        "--systems",
        help="a list of trio, socketio (python-socketio), socketio-node (Node.js Socket.IO) "
        "(default: all three; with --redis cluster or both: trio)",
    )
    parser.add_argument(
        "--redis",
        choices=[*REDIS_MODES, "both"],
        default="single",
        help="what trio-chat runs on: single = one redis-server (the default), cluster = a "
        "Redis Cluster of 3 masters (tests/_redis_cluster.py, --cluster-replicas and "
        "--cluster-hz; Redis CPU per node), both = each trio-chat pass on one, then on the "
        "other, side by side (the Socket.IO peers always run on one redis-server)",
    )
    parser.add_argument(
        "--cluster-hz",
        type=int,
        default=10,
        help="the cluster's nodes' hz (10, Redis's default and the one redis-server's; the test "
        "fixture's own default is 100)",
    )
    parser.add_argument(
        "--cluster-replicas",
        type=int,
        choices=[0, 1],
        default=1,
        help="replicas per master of the cluster (1; 0 = three masters without replicas)",
    )
    parser.add_argument("--rates", help="A: msg/s steps (50,100,200,400,800,1600)")
    parser.add_argument("--duration", type=float, help="A: seconds per rate (10)")
    parser.add_argument("--drain", type=float, default=2.0, help="A/B: seconds after last send (2)")
    parser.add_argument("--subscribers", type=int, default=400, help="A: subscribers (400)")
    parser.add_argument("--rooms", type=int, help="B: rooms (500)")
    parser.add_argument("--members", type=int, default=4, help="B: members per room (4)")
    parser.add_argument(
        "--member-rate", default="1", help="B: msg/s per member; a list runs B once per rate (1)"
    )
    parser.add_argument("--room-duration", type=float, help="B: seconds of sending (10)")
    parser.add_argument("--connections", type=int, help="C: idle connections (5000)")
    parser.add_argument("--concurrency", type=int, default=200, help="opens in flight (200)")
    parser.add_argument(
        "--connect-connections", type=int, default=2000, help="D: connections (2000)"
    )
    parser.add_argument(
        "--connect-concurrency", type=int, default=100, help="D: opens+joins in flight (100)"
    )
    parser.add_argument(
        "--late",
        type=float,
        default=3.0,
        help="A/B: after the drain, how long to keep counting late arrivals (3)",
    )
    parser.add_argument(
        "--quiet-max",
        type=float,
        default=60.0,
        help="before each measured window, wait at most this long for the servers "
        "to be idle and other processes to use < 0.25 cores (60; 0 = don't)",
    )
    parser.add_argument(
        "--retries",
        type=int,
        default=1,
        help="A/B: measure a window again (this many times at most) when other "
        "processes used > 0.4 cores during it (1)",
    )
    parser.add_argument("--p99-limit", type=float, default=250.0, help="A peak: p99 below (250)")
    parser.add_argument(
        "--profile",
        type=int,
        metavar="RATE",
        help="after the comparison: py-spy on both trio-chat instances during a "
        "fan-out step at RATE msg/s",
    )
    parser.add_argument(
        "--profile-seconds",
        type=int,
        default=10,
        help="py-spy seconds: of each --profile recording; at most, of --profile-handshakes (10)",
    )
    parser.add_argument(
        "--profile-out",
        default=str(BENCH / "profile-fanout"),
        help="path prefix of the profile files (bench/profile-fanout)",
    )
    parser.add_argument(
        "--profile-handshakes",
        type=int,
        metavar="N",
        help="after the comparison (and --profile): py-spy on trio-chat while a C pass opens N "
        "connections, --profile-seconds at most and no longer than the opening (8000 take ~7 s "
        "at ~1,200/s)",
    )
    parser.add_argument(
        "--profile-handshakes-out",
        default=str(BENCH / "profile-handshake"),
        help="path prefix of the handshake profile files (bench/profile-handshake)",
    )
    parser.add_argument(
        "--profile-connect",
        type=int,
        metavar="N",
        help="after the rest: py-spy on one trio-chat instance while a D pass opens N "
        "connections and joins each to a new room (--connect-concurrency in flight), from the "
        "start of the opening until the last join",
    )
    parser.add_argument(
        "--profile-connect-out",
        default=str(BENCH / "profile-connect"),
        help="path prefix of the connect profile files (bench/profile-connect)",
    )
    parser.add_argument("--json", help="also write every result to this file")
    parser.add_argument(
        "--no-snapshot",
        dest="snapshot",
        action="store_false",
        help="run trio-chat from the work tree instead of a copy taken at start",
    )
    parser.add_argument(
        "--trio-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra environment for the trio-chat instances (experiments)",
    )
    parser.add_argument(
        "--trio-layout",
        choices=list(TRIO_LAYOUTS),
        default="2x1",
        help="trio-chat processes x workers: 2x1 two instances (the default), 1x1 one, 1x2 "
        "one `serve --workers 2` (the Socket.IO peers always run two instances)",
    )
    parser.add_argument(
        "--history-size",
        type=int,
        metavar="N",
        help="trio-chat's history.size (TRIO_CHAT_HISTORY_SIZE): messages kept per room; 0 = "
        "history off, a send is a bare PUBLISH (default: the server's default, 200)",
    )
    args = parser.parse_args()
    TRIO_LAYOUT[0] = args.trio_layout
    if not 1 <= args.cluster_hz <= 500:
        parser.error("--cluster-hz must be 1..500 (Redis's range)")
    CLUSTER_OPTIONS.update(hz=args.cluster_hz, replicas_per_master=args.cluster_replicas)
    REDIS_LABELS["cluster"] = cluster_label()
    if args.history_size is not None:
        if args.history_size < 0:
            parser.error("--history-size must be >= 0")
        HISTORY_SIZE[0] = args.history_size

    quick = args.quick
    for item in args.trio_env:
        key, sep, value = item.partition("=")
        if not sep or not key.startswith("TRIO_CHAT_"):
            parser.error(f"--trio-env wants TRIO_CHAT_KEY=VALUE, not {item!r}")
        TRIO_ENV[key] = value
    rates = args.rates or ("50,100,200,400" if quick else "50,100,200,400,800,1600")
    duration = args.duration or (3.0 if quick else 10.0)
    rooms = args.rooms or (200 if quick else 500)
    room_duration = args.room_duration or (5.0 if quick else 10.0)
    connections = args.connections or (1000 if quick else 5000)
    common = {
        "concurrency": args.concurrency,
        "quiet-max": args.quiet_max,
        "late": args.late,
        "retries": args.retries,
    }
    plans = {
        "A": (
            "fanout",
            {
                **common,
                "rates": rates,
                "duration": duration,
                "drain": args.drain,
                "subscribers": args.subscribers,
            },
        ),
        "C": ("idle", {**common, "connections": connections}),
        "D": (
            "connect",
            {
                **common,
                "connections": args.connect_connections,
                "concurrency": args.connect_concurrency,
            },
        ),
    }
    for member_rate in str(args.member_rate).split(","):
        plans[f"B@{member_rate}"] = (
            "rooms",
            {
                **common,
                "rooms": rooms,
                "members": args.members,
                "member-rate": member_rate,
                "duration": room_duration,
                "drain": args.drain,
            },
        )
    n_rates = len(rates.split(","))
    budgets = {
        "A": n_rates
        * (1 + args.retries)
        * (duration + args.drain + args.late + args.quiet_max + 60)
        + 60,
        "B": (1 + args.retries) * (room_duration + args.drain + args.late + args.quiet_max) + 240,
        "C": connections / 20 + args.quiet_max + 240,
        "D": args.connect_connections / 20 + args.quiet_max + 240,
    }
    wanted = [w.strip().upper() for w in args.workloads.split(",") if w.strip()]
    redis_modes = list(REDIS_MODES) if args.redis == "both" else [args.redis]
    default_systems = "trio,socketio,socketio-node" if args.redis == "single" else "trio"
    systems = [s.strip() for s in (args.systems or default_systems).split(",") if s.strip()]
    for peer in ("socketio", "socketio-node"):
        if args.redis == "cluster" and peer in systems:
            parser.error(f"--redis cluster: {SYSTEMS[peer]} runs on one redis-server only")
    if args.redis != "single" and (args.profile or args.profile_handshakes or args.profile_connect):
        parser.error("--profile and --profile-handshakes run on one redis-server only")
    for name in wanted:
        if name not in ("A", "B", "C", "D"):
            parser.error(f"unknown workload {name}")
    workloads = [key for name in wanted for key in plans if key.split("@")[0] == name]
    for name in systems:
        if name not in SYSTEMS:
            parser.error(f"unknown system {name}")
    for path in (TRIO_PYTHON, LOADGEN / "node_modules"):
        if not path.exists():
            parser.error(f"{path} is missing: run `make bench` (it installs everything)")
    if "socketio" in systems and not BENCH_PYTHON.exists():
        parser.error(f"{BENCH_PYTHON} is missing: run `make bench`")
    if "socketio-node" in systems and not (NODE_PEER / "node_modules").exists():
        parser.error(f"{NODE_PEER / 'node_modules'} is missing: run `make bench`")

    def on_sigterm(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_sigterm)
    logs = Path(tempfile.mkdtemp(prefix="trio-chat-bench-"))
    digest_at_start = source_digest()
    if args.snapshot:
        SOURCE_NOTE[0] = snapshot_source(logs)
        print(f"trio-chat under test: {SOURCE_NOTE[0]}", file=sys.stderr)
    started = time.monotonic()
    results: dict[str, dict[str, dict[str, object]]] = {
        s: {} for s in systems if "single" in redis_modes or s != "trio"
    }
    cluster_results: dict[str, dict[str, dict[str, object]]] = {"trio": {}}
    failed: list[str] = []
    for name in workloads:
        workload, options = plans[name]
        for system in systems:
            for redis in redis_modes if system == "trio" else ["single"]:
                where = f"{system_label(system)} on {REDIS_LABELS[redis]} {name}"
                try:
                    budget = budgets[name.split("@")[0]]
                    result = one_pass(system, workload, options, budget, logs, redis=redis)
                    (cluster_results if redis == "cluster" else results)[system][name] = result
                except BenchError as exc:
                    failed.append(f"{where}: {exc}")
                    print(f"FAILED: {where}: {exc}", file=sys.stderr)
    profile_text = None
    if args.profile:
        profile_rate = args.profile
        seconds = args.profile_seconds
        options = {
            **common,
            "rates": profile_rate,
            "duration": 2 * seconds + 4,
            "drain": args.drain,
            "subscribers": args.subscribers,
        }
        try:
            result = one_pass(
                "trio",
                "fanout",
                options,
                4 * seconds + args.quiet_max + 120,
                logs,
                profile={"seconds": seconds, "out": args.profile_out},
            )
            results.setdefault("profile", {})["A"] = result
            step = result["steps"][0]  # type: ignore[index]
            profile_text = write_profile_summary(
                result,
                args.profile_out,
                f"{system_label('trio')} fan-out at {profile_rate} msg/s to {args.subscribers} "
                f"subscribers while profiled: delivered {step['received']}/{step['expected']}, p50 "
                f"{step['p50_ms']} ms, p99 {step['p99_ms']} ms, server CPU {step['server_cpu']} "
                f"s/s (each {step['server_cpu_each']}), Redis {step['redis_cpu']}",
            )
        except BenchError as exc:
            failed.append(f"profile: {exc}")
            print(f"FAILED: profile: {exc}", file=sys.stderr)
    profile_result = results.pop("profile", None)

    def profiled(
        name: str,
        workload: str,
        options: dict[str, object],
        profile: dict[str, object],
        trigger: bytes,
        describe: Callable[[dict[str, object]], str],
    ) -> tuple[dict[str, object] | None, str | None]:
        """One more trio-chat pass of ``workload`` under py-spy; its result and summary."""
        n = cast("int", options["connections"])
        try:
            result = one_pass(
                "trio",
                workload,
                options,
                n / 20 + args.quiet_max + 240,
                logs,
                profile=profile,
                trigger=trigger,
            )
            return result, write_profile_summary(result, str(profile["out"]), describe(result))
        except BenchError as exc:
            failed.append(f"{name}: {exc}")
            print(f"FAILED: {name}: {exc}", file=sys.stderr)
            return None, None

    def handshakes(c: dict[str, object]) -> str:
        latency = cast("dict[str, object]", c["open_latency"])
        return (
            f"{system_label('trio')} C: opening {c['connections']:,} idle connections, "
            f"{args.concurrency} in flight, while profiled: opened {c['connected']}/"
            f"{c['connections']} in {c['open_s']} s, {fmt(c['opened_per_s'])}/s (open p50 "
            f"{latency['p50_ms']} ms, p99 {latency['p99_ms']} ms), server CPU "
            f"{c['open_server_cpu']} s/s, Redis {c['open_redis_cpu']}, other processes "
            f"{c['open_other_cpu']}; py-spy ran {c.get('profiled_s')} s from its start (stopped "
            f"{c.get('profile_stopped_at')})"
        )

    def connects(d: dict[str, object]) -> str:
        opens = cast("dict[str, object]", d["open_latency"])
        joins = cast("dict[str, object]", d["join_latency"])
        return (
            f"trio-chat (one instance) D: {d['connections']:,} connections opened and each "
            f"joined to a new room, {args.connect_concurrency} in flight, while profiled: "
            f"{d['joined']} joined in {d['total_s']} s, {fmt(d['opened_joined_per_s'])}/s (open "
            f"p50 {opens['p50_ms']} ms, join p50 {joins['p50_ms']} ms), server CPU "
            f"{d['server_cpu']} s/s, Redis {d['redis_cpu']}; py-spy ran {d.get('profiled_s')} s,"
            f" stopped {d.get('profile_stopped_at')}"
        )

    handshake_result, handshake_text = None, None
    if args.profile_handshakes:
        handshake_result, handshake_text = profiled(
            "profile-handshakes",
            "idle",
            {**common, "connections": args.profile_handshakes},
            {
                "seconds": args.profile_seconds,
                "out": args.profile_handshakes_out,
                "opening": args.profile_handshakes,
            },
            b"idle trio: opening ",
            handshakes,
        )
    connect_result, connect_text = None, None
    if args.profile_connect:
        connect_result, connect_text = profiled(
            "profile-connect",
            "connect",
            {
                **common,
                "connections": args.profile_connect,
                "concurrency": args.connect_concurrency,
            },
            {
                "seconds": max(args.profile_seconds, 60),
                "out": args.profile_connect_out,
                "until": b"all opened and joined",
            },
            b"connections opened and joined,",
            connects,
        )

    elapsed = time.monotonic() - started
    date = datetime.date.today().isoformat()
    mode = "quick" if quick else "full"
    print(f"\n{date}, {mode} run ({' '.join(sys.argv[1:]) or 'defaults'}), {elapsed:.0f} s wall")
    print(versions())
    if "trio" in systems:
        history = (
            "history.size 200 (the server's default)"
            if args.history_size is None
            else f"history.size {args.history_size}"
            + (" (history off: a send is a bare PUBLISH)" if args.history_size == 0 else "")
        )
        print(f"{system_label('trio')}: {LAYOUT_NOTES[args.trio_layout]}; {history}")
    passes = []
    if any(results.values()):
        passes.append(("single", results))
    if cluster_results["trio"]:
        passes.append(("cluster", cluster_results))
    for redis, by_system in passes:
        LABEL_REDIS[0] = "" if redis == "single" else ", Redis Cluster"
        if len(redis_modes) > 1 or redis != "single":
            print(f"\n### On {REDIS_LABELS[redis]}")
        print()
        print(table(by_system, args.p99_limit))
        print("\nConditions of each measured window (CPU in cores: CPU seconds per second):\n")
        print(conditions(by_system))
        if "trio" in systems and TRIO_LAYOUTS[args.trio_layout][1] > 1:
            print("\n(servers CPU each: sup = trio-chat's supervisor, w<n> = its worker n)")
        shares = spread(by_system)
        if shares:
            print("\nConnections accepted per trio-chat instance (its `connected` log lines):")
            for line in shares:
                print(f"- {line}")
        notes = problems(by_system)
        if notes:
            print("\nSeen during the run:")
            for note in notes:
                print(f"- {note}")
    LABEL_REDIS[0] = ""
    if cluster_results["trio"]:
        print(f"\n### {system_label('trio')}: {REDIS_LABELS['single']} vs the cluster")
        print()
        print(redis_comparison(results.get("trio", {}), cluster_results["trio"]))
    if profile_text:
        print(f"\nProfile written to {args.profile_out}-*:\n")
        print(profile_text)
    if handshake_text:
        print(f"\nHandshake profile written to {args.profile_handshakes_out}-*:\n")
        print(handshake_text)
    if connect_text:
        print(f"\nConnect profile written to {args.profile_connect_out}-*:\n")
        print(connect_text)
    print(f"\nServer logs: {logs}")
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "results": results,
                    "cluster_results": cluster_results,
                    "redis": args.redis,
                    "cluster_options": CLUSTER_OPTIONS,
                    "profile": profile_result,
                    "profile_handshakes": handshake_result,
                    "profile_connect": connect_result,
                    "failed": failed,
                    "versions": versions(),
                    "date": date,
                    "quick": quick,
                    "trio_layout": args.trio_layout,
                    "history_size": args.history_size,
                },
                indent=1,
            )
        )
    if not args.snapshot and source_digest() != digest_at_start:
        print(
            "WARNING: trio_chat/*.py changed on disk during the run: passes may have measured "
            "different code",
            file=sys.stderr,
        )
    for failure in failed:
        print(f"FAILED: {failure}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
