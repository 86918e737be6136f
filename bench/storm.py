"""Reconnect storm (SPEC §11): an instance dies, its clients come back on another one with
``join {room, since}``; how long until every one of them has everything it missed?

Starts a throwaway redis-server on a free port of 127.0.0.1 and two ``trio-chat serve``
instances on it, A and B (the same way ``run.py`` does, from a copy of ``trio_chat/``), then:

1. ``--rooms`` x ``--members`` clients connect to A and join their room; ``--procs`` client
   processes share them: ``bench/loadgen/storm-clients.mjs`` (Node.js ``ws``, the default) or,
   with ``--clients python``, this script's trio clients (about 3x the CPU per client: too
   much of a 2-core machine to be a fair load generator);
2. one sender per room, connected to B, sends ``--rate`` msg/s into its room (staggered over
   the rooms) and records each ack's id and when it was read; ``--warmup`` s of that;
3. A gets SIGKILL. Every client sees its connection end, connects to B at once (after a
   random delay of up to ``--jitter`` s) and joins its room with ``since`` = the last id it
   saw there; it keeps reading (replay, then live);
4. once every client has rejoined, the senders go on for ``--settle`` s, stop, and after
   ``--drain`` s the clients report what they received.

A client has caught up once it has read the newest message of its room that had been acked
before it wrote its ``join`` (or, with nothing missed, once ``joined`` arrived). **Storm
time** = from the SIGKILL until the last client caught up. Afterwards every client's ids (before
the kill and after the rejoin) must be exactly its room's acked ids, in order: nothing
missing, nothing twice. CPU of B, Redis, the client processes and the senders' process is
read from /proc over the storm window, and what the rest of the machine used meanwhile,
with a timeline (0.5 s bins) that also shows B's kernel accept queue. Before the kill it waits
(at most ``--quiet-max`` s) for the rest of the machine to use < 0.25 cores. Every process it
starts is stopped again by pid (SIGTERM, then SIGKILL), on errors and Ctrl-C too.

Run: .venv/bin/python bench/storm.py [--rooms 200 --members 10 --rate 1 --clients node]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import random
import resource
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import run  # bench/run.py: the process helpers
import trio

from trio_chat.client import ChatClient, open_client

if TYPE_CHECKING:
    from collections.abc import Iterator

CLK_TCK = os.sysconf("SC_CLK_TCK")


def raise_nofile() -> None:
    """As many file descriptors as allowed (2,000 clients in one process need more than 1,024)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, hard), hard))


@contextlib.asynccontextmanager
async def opened(gate: trio.Semaphore, url: str, user_token: str) -> Any:
    """``open_client`` and ``welcome`` with one of ``gate``'s places, given back once open."""
    await gate.acquire()
    held = True
    try:
        async with open_client(url, user_token) as chat:
            gate.release()
            held = False
            yield chat
    finally:
        if held:
            gate.release()


# --- a client process ---------------------------------------------------------------------------


class Lines:
    """Lines from a trio receive stream."""

    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self.stream = stream
        self.buffer = b""

    async def next(self) -> str:
        while b"\n" not in self.buffer:
            data = await self.stream.receive_some(4096)
            if not data:
                raise EOFError
            self.buffer += data
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line.decode()


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


async def client_process(config: dict[str, Any]) -> None:
    """Connect every client to A, report READY; after A dies, reconnect each to B and rejoin
    with ``since``; report REJOINED once all have (or gave up); on STOP, write the records."""
    rooms: list[str] = config["rooms"]
    members: int = config["members"]
    records: list[dict[str, Any]] = []
    for room in rooms:
        for m in range(members):
            user = f"{room}-m{m}"
            records.append({"room": room, "user": user, "token": run.token(user), "before": []})
    opening = trio.Semaphore(config["concurrency"])
    counts = {"ready": 0, "rejoined": 0, "failed": 0}
    all_ready = trio.Event()
    all_back = trio.Event()

    def count(key: str) -> None:
        counts[key] += 1
        if counts["ready"] == len(records):
            all_ready.set()
        if counts["rejoined"] + counts["failed"] == len(records):
            all_back.set()

    async def first_visit(record: dict[str, Any], chat: ChatClient) -> None:
        before: list[str] = record["before"]
        try:
            while True:
                frame = await chat.receive()
                if frame.get("type") == "message":
                    before.append(frame["id"])
        except Exception as exc:  # the instance is gone: whatever ended the connection
            record["t_closed"] = time.monotonic()
            record["closed_by"] = type(exc).__name__

    async def one(record: dict[str, Any]) -> None:
        async with opened(opening, config["url_a"], record["token"]) as chat:
            await chat.join(record["room"])
            count("ready")
            await first_visit(record, chat)
        if config["jitter"]:
            await trio.sleep(random.uniform(0, config["jitter"]))
        record["t_reconnect"] = time.monotonic()
        since = record["before"][-1] if record["before"] else None
        record["since"] = since
        after: list[tuple[float, str]] = []
        record["after"] = after
        for attempt in range(1, 51):
            record["attempts"] = attempt
            try:
                async with open_client(config["url_b"], record["token"]) as chat:
                    record["t_join_sent"] = time.monotonic()
                    fields = {"since": since} if since is not None else {}
                    joined = await chat.request("join", room=record["room"], **fields)
                    now = time.monotonic()
                    record["t_joined"] = now
                    record["recovered"] = joined.get("recovered")
                    record["missed"] = joined.get("missed")
                    count("rejoined")
                    while True:
                        frame = await chat.receive()
                        if frame.get("type") == "message":
                            after.append((time.monotonic(), frame["id"]))
            except Exception as exc:
                if "t_joined" in record:  # B went away after the rejoin: not this benchmark
                    record["error_after_join"] = repr(exc)
                    return
                record.setdefault("errors", []).append(repr(exc)[:200])
                await trio.sleep(0.05)
        count("failed")

    stdin = Lines(trio.lowlevel.FdStream(os.dup(0)))
    async with trio.open_nursery() as nursery:
        for record in records:
            nursery.start_soon(one, record)
        with trio.fail_after(config["open_timeout"]):
            await all_ready.wait()
        say(f"READY {len(records)}")
        # bounded, from READY: the warm-up, the wait for quiet, the storm, the rest
        with trio.move_on_after(config["deadline"]):
            await all_back.wait()
        say(f"REJOINED {counts['rejoined']} {counts['failed']}")
        with trio.move_on_after(config["deadline"]):
            while (await stdin.next()) != "STOP":
                pass
        for record in records:
            del record["token"]
        await trio.Path(config["out"]).write_text(json.dumps(records))
        say("DONE")
        nursery.cancel_scope.cancel()


# --- the senders, the clock, the analysis -------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return math.nan
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def machine_busy() -> float:
    ticks = [int(t) for t in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(ticks) - ticks[3] - ticks[4]) / CLK_TCK


def accept_queue(port: int) -> int:
    """Connections waiting in the kernel for ``accept()`` on 127.0.0.1:``port`` (LISTEN)."""
    needle = f"0100007F:{port:04X} 00000000:0000 0A "
    for line in Path("/proc/net/tcp").read_text().splitlines():
        if needle in line:
            return int(line.split()[4].split(":")[1], 16)
    return -1


async def sample_cpu(
    pids: dict[str, int],
    out: list[tuple[float, dict[str, float]]],
    port: int,
    queue: list[tuple[float, int]],
) -> None:
    """Every 0.1 s: the CPU seconds of each of ``pids`` and of the machine, and B's accept
    queue."""
    while True:
        sample = {name: cpu_seconds(pid) for name, pid in pids.items()}
        sample["machine"] = machine_busy()
        now = time.monotonic()
        out.append((now, sample))
        queue.append((now, accept_queue(port)))
        await trio.sleep(0.1)


def cpu_between(
    samples: list[tuple[float, dict[str, float]]], t0: float, t1: float
) -> dict[str, float]:
    """Cores each process used between t0 and t1 (the samples around them)."""
    first = max((s for s in samples if s[0] <= t0), key=lambda s: s[0], default=samples[0])
    last = min((s for s in samples if s[0] >= t1), key=lambda s: s[0], default=samples[-1])
    wall = last[0] - first[0]
    cores = {k: (last[1][k] - first[1][k]) / wall for k in first[1] if wall > 0}
    ours = sum(v for k, v in cores.items() if k != "machine" and not math.isnan(v))
    cores["other"] = cores["machine"] - ours
    return {k: round(v, 2) for k, v in cores.items()} | {"window_s": round(wall, 2)}


def py_spy(pid: int, seconds: int, target: str) -> subprocess.Popen[bytes]:
    """py-spy (bench/.venv, ``make bench``) recording ``pid``: collapsed stacks by function."""
    command = [str(run.BENCH_PYTHON.parent / "py-spy"), "record", "--pid", str(pid)]
    command += ["--duration", str(seconds), "--format", "raw", "-F", "-o", target]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


async def wait_quiet(samples: list[tuple[float, dict[str, float]]], limit: float) -> float:
    """Wait (at most ``limit`` s) until, over the last second, the processes outside this
    benchmark used < 0.25 cores; returns how long that took (negative: never quiet)."""
    start = time.monotonic()
    while time.monotonic() - start < limit:
        await trio.sleep(1.0)
        now = time.monotonic()
        if cpu_between(samples, now - 1.0, now)["other"] < 0.25:
            return round(time.monotonic() - start, 1)
        print("waiting for quiet: others use >= 0.25 cores", file=sys.stderr)
    return -round(time.monotonic() - start, 1)


def cpu_timeline(
    samples: list[tuple[float, dict[str, float]]], start: float, end: float, step: float = 0.5
) -> list[dict[str, float]]:
    """Cores per process in consecutive ``step``-s bins from ``start`` (relative times)."""
    out = []
    t = start
    while t < end:
        cores = cpu_between(samples, t, t + step)
        out.append(
            {"t": round(t - start, 2), **{k: v for k, v in cores.items() if k != "window_s"}}
        )
        t += step
    return out


class Senders:
    """One sender per room on instance B; acks are recorded per room as (time read, id)."""

    def __init__(self, rooms: list[str]) -> None:
        self.rooms = rooms
        self.acks: dict[str, list[tuple[float, str]]] = {room: [] for room in rooms}
        self.errors: list[str] = []
        self.sent = 0
        self.max_lag = 0.0
        self.stopping = False
        self.all_acked = trio.Event()
        self.all_connected = trio.Event()
        self.clients: dict[str, ChatClient] = {}

    def acked(self) -> int:
        return sum(map(len, self.acks.values()))

    async def connect(self, url: str, room: str, gate: trio.Semaphore) -> None:
        async with opened(gate, url, run.token(f"sender-{room}")) as chat:
            await chat.join(room)
            self.clients[room] = chat
            if len(self.clients) == len(self.rooms):
                self.all_connected.set()
            while True:
                frame = await chat.receive()
                if frame.get("type") == "ack":
                    self.acks[room].append((time.monotonic(), frame["id"]))
                    if self.stopping and self.acked() >= self.sent:
                        self.all_acked.set()
                elif frame.get("type") == "error":
                    self.errors.append(json.dumps(frame))

    async def send_loop(self, rate: float) -> None:
        """Message k to room k mod rooms at start + k / (rate * rooms), until stopped."""
        total = rate * len(self.rooms)
        start = time.monotonic()
        k = 0
        while not self.stopping:
            due = start + k / total
            now = time.monotonic()
            if due > now:
                await trio.sleep(due - now)
            else:
                self.max_lag = max(self.max_lag, now - due)
            room = self.rooms[k % len(self.rooms)]
            frame = {"type": "send", "room": room, "data": {"k": k}}
            await self.clients[room].send_frame(frame)
            self.sent += 1
            k += 1


def rooms_of(args: argparse.Namespace) -> list[str]:
    return [f"storm-{r:03d}" for r in range(args.rooms)]


@contextlib.contextmanager
def client_processes(
    args: argparse.Namespace, urls: dict[str, str], logs: Path
) -> Iterator[list[tuple[subprocess.Popen[bytes], Path]]]:
    """Start the client processes (from this thread, not from trio's worker threads: their
    PR_SET_PDEATHSIG follows the thread that started them); stop them on the way out."""
    rooms = rooms_of(args)
    procs: list[tuple[subprocess.Popen[bytes], Path]] = []
    try:
        for p in range(args.procs):
            out = logs / f"clients-{p}.json"
            config = {
                "rooms": rooms[p :: args.procs],
                "members": args.members,
                "url_a": urls["A"],
                "url_b": urls["B"],
                "concurrency": 100,
                "jitter": args.jitter,
                "open_timeout": 120,
                "deadline": args.warmup + args.quiet_max + 2 * args.max_seconds + 60,
                "out": str(out),
                "secret": run.SECRET,
            }
            if args.clients == "node":
                command = ["node", str(run.LOADGEN / "storm-clients.mjs"), json.dumps(config)]
            else:
                command = [sys.executable, __file__, "--client-process", json.dumps(config)]
            with (logs / f"clients-{p}.log").open("wb") as log:
                proc = subprocess.Popen(
                    command,
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=log,
                    preexec_fn=run._child_setup,
                )
            procs.append((proc, out))
        yield procs
    finally:
        for proc, _ in procs:
            run.stop(proc, 20)


async def storm(
    args: argparse.Namespace,
    urls: dict[str, str],
    pids: dict[str, int],
    procs: list[tuple[subprocess.Popen[bytes], Path]],
) -> dict[str, Any]:
    rooms = rooms_of(args)
    senders = Senders(rooms)
    samples: list[tuple[float, dict[str, float]]] = []
    queue: list[tuple[float, int]] = []
    marks: dict[str, float] = {}
    lines: list[Lines] = []
    stdins: list[trio.lowlevel.FdStream] = []
    for p, (proc, _) in enumerate(procs):
        assert proc.stdin is not None
        assert proc.stdout is not None
        lines.append(Lines(trio.lowlevel.FdStream(os.dup(proc.stdout.fileno()))))
        stdins.append(trio.lowlevel.FdStream(os.dup(proc.stdin.fileno())))
        pids[f"clients-{p}"] = proc.pid
    pids["senders"] = os.getpid()
    spies: list[subprocess.Popen[bytes]] = []
    async with trio.open_nursery() as nursery:
        try:
            print(f"opening {args.rooms * args.members} clients on A ...", file=sys.stderr)
            with trio.fail_after(150):
                for line in lines:
                    if not (reply := await line.next()).startswith("READY"):
                        raise run.BenchError(f"client process: {reply}")
            gate = trio.Semaphore(50)
            with trio.fail_after(60):
                for room in rooms:
                    nursery.start_soon(senders.connect, urls["B"], room, gate)
                await senders.all_connected.wait()
            port = int(urls["B"].rsplit(":", 1)[1].strip("/"))
            watched = {k: v for k, v in pids.items() if k != "A"}
            nursery.start_soon(sample_cpu, watched, samples, port, queue)
            nursery.start_soon(senders.send_loop, args.rate)
            print(f"senders on B: {args.rate * args.rooms:g} msg/s; warm-up", file=sys.stderr)
            if args.profile:  # B at steady state: the senders and the Pub/Sub traffic
                await trio.sleep(max(0.0, args.warmup - 4))
                spy = py_spy(pids["B"], 3, f"{args.profile}-steady.txt")
                await trio.sleep(4)
                spy.wait(30)
            else:
                await trio.sleep(args.warmup)
            marks["quiet"] = await wait_quiet(samples, args.quiet_max)
            if args.profile:
                spies.append(py_spy(pids["B"], args.profile_seconds, f"{args.profile}-storm.txt"))
                await trio.sleep(0.5)  # py-spy attached
            marks["kill"] = time.monotonic()
            os.kill(pids["A"], signal.SIGKILL)
            print("A killed", file=sys.stderr)
            rejoined = []
            with trio.move_on_after(args.max_seconds):  # if not, the analysis says who is missing
                for line in lines:
                    rejoined.append(await line.next())
            marks["rejoined_reported"] = time.monotonic()
            print(f"clients: {rejoined}", file=sys.stderr)
            await trio.sleep(args.settle)
            senders.stopping = True
            with trio.move_on_after(10):
                await senders.all_acked.wait()
            await trio.sleep(args.drain)
            for stdin in stdins:
                await stdin.send_all(b"STOP\n")
            with trio.fail_after(60):
                for line in lines:
                    while (reply := await line.next()) != "DONE":
                        if not reply.startswith("REJOINED"):  # late, if the storm timed out
                            raise run.BenchError(f"client process: {reply}")
        finally:
            for spy in spies:
                spy.wait(args.profile_seconds + 30)
            for stream in [*stdins, *(line.stream for line in lines)]:
                await stream.aclose()
            nursery.cancel_scope.cancel()
    clients = [c for _, out in procs for c in json.loads(out.read_text())]
    result = analyse(args, clients, senders, samples, marks)
    kill = marks["kill"]
    end = kill + (result["storm_s"] if math.isfinite(result["storm_s"]) else args.max_seconds)
    timeline = cpu_timeline(samples, kill - 1.0, end + 0.5)
    for b in timeline:  # what happened in each bin: B's accept queue, welcomes, joined replies
        t0, t1 = kill - 1.0 + b["t"], kill - 0.5 + b["t"]
        b["B accept q"] = max((n for t, n in queue if t0 <= t < t1), default=-1)
        b["welcomed"] = sum(t0 <= c.get("t_join_sent", -1) < t1 for c in clients)
        b["joined"] = sum(t0 <= c.get("t_joined", -1) < t1 for c in clients)
    result["timeline_from_kill"] = timeline
    result["quiet_wait_s"] = marks["quiet"]
    return result


def analyse(
    args: argparse.Namespace,
    clients: list[dict[str, Any]],
    senders: Senders,
    samples: list[tuple[float, dict[str, float]]],
    marks: dict[str, float],
) -> dict[str, Any]:
    kill = marks["kill"]
    # a room's messages in the order of their acks (one sender per room: the order they were
    # published in), so ids are compared by position (history off: ids are opaque)
    acks = {
        room: [(t, i, n) for n, (t, i) in enumerate(rows)] for room, rows in senders.acks.items()
    }
    caught_up: list[float] = []
    joined_at: list[float] = []
    closed_at: list[float] = []
    recovered = {"true": 0, "false": 0, "no since": 0, "not rejoined": 0}
    wrong: list[str] = []
    missed_counts: list[int] = []
    errors = 0
    for c in clients:
        errors += len(c.get("errors", [])) + ("error_after_join" in c)
        if "t_closed" in c:
            closed_at.append(c["t_closed"] - kill)
        if "t_joined" not in c:
            recovered["not rejoined"] += 1
            wrong.append(f"{c['user']}: never rejoined ({c.get('errors', [])[-1:]})")
            continue
        if c["since"] is None:
            recovered["no since"] += 1
        else:
            recovered["true" if c["recovered"] else "false"] += 1
        missed_counts.append(c["missed"] or 0)
        joined_at.append(c["t_joined"] - kill)
        room_acks = acks[c["room"]]
        position = {i: n for _, i, n in room_acks}
        seen = c["before"] + [i for _, i in c["after"]]
        expected = [i for _, i, _ in room_acks]
        if seen != expected:
            missing = len(set(expected) - set(seen))
            twice = len(seen) - len(set(seen))
            in_order = [position.get(i, -1) for i in seen] == sorted(
                position.get(i, -1) for i in seen
            )
            wrong.append(
                f"{c['user']}: {len(seen)} ids seen, {len(expected)} acked; {missing} missing, "
                f"{twice} twice, in order: {in_order}"
            )
        since = position.get(c["since"], -1) if c["since"] else -1
        missed = [n for t, _, n in room_acks if t <= c["t_join_sent"] and n > since]
        if not missed:
            caught_up.append(c["t_joined"] - kill)
            continue
        done = next((t for t, i in c["after"] if position.get(i, -1) >= missed[-1]), None)
        if done is None:
            wrong.append(f"{c['user']}: never got {room_acks[missed[-1]][1]}")
        else:
            caught_up.append(done - kill)
    storm_s = max(caught_up) if caught_up else math.nan
    cpu = cpu_between(samples, kill, kill + storm_s) if caught_up else {}
    return {
        "clients": len(clients),
        "storm_s": round(storm_s, 3),
        "caught_up_s": {q: round(run.percentile(caught_up, q), 3) for q in (50, 90, 99)}
        if caught_up
        else {},
        "all_joined_s": round(max(joined_at), 3) if joined_at else None,
        "joined_p50_s": round(run.percentile(joined_at, 50), 3) if joined_at else None,
        "closed_seen_s": [round(min(closed_at), 3), round(max(closed_at), 3)]
        if closed_at
        else None,
        "recovered": recovered,
        "missed_per_client": {
            "mean": round(sum(missed_counts) / len(missed_counts), 2) if missed_counts else None,
            "max": max(missed_counts, default=None),
        },
        "sent": senders.sent,
        "acked": senders.acked(),
        "sender_errors": senders.errors[:5],
        "sender_max_lag_ms": round(senders.max_lag * 1000, 1),
        "client_errors": errors,
        "wrong": wrong,
        "cpu_during_storm": cpu,
    }


def fmt(value: float) -> str:
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rooms", type=int, default=200, help="rooms (200)")
    parser.add_argument("--members", type=int, default=10, help="clients per room (10)")
    parser.add_argument("--rate", type=float, default=1.0, help="msg/s per room (1)")
    parser.add_argument(
        "--clients",
        choices=["node", "python"],
        default="node",
        help="the client processes: bench/loadgen/storm-clients.mjs (Node.js, ws) or this "
        "script's trio clients (trio_chat.client), about 3x the CPU per client (node)",
    )
    parser.add_argument("--procs", type=int, default=1, help="client processes (1)")
    parser.add_argument("--warmup", type=float, default=5.0, help="s of messages first (5)")
    parser.add_argument(
        "--jitter", type=float, default=0.0, help="each client waits up to this many s (0)"
    )
    parser.add_argument("--settle", type=float, default=2.0, help="s of sending after (2)")
    parser.add_argument("--drain", type=float, default=2.0, help="s before the counting (2)")
    parser.add_argument("--max-seconds", type=float, default=60.0, help="storm bound (60)")
    parser.add_argument(
        "--history-size", type=int, help="TRIO_CHAT_HISTORY_SIZE (default: the server's, 200)"
    )
    parser.add_argument(
        "--quiet-max",
        type=float,
        default=60.0,
        help="before the kill, wait at most this long until other processes use < 0.25 cores",
    )
    parser.add_argument(
        "--profile",
        metavar="PREFIX",
        help="py-spy on B: 3 s at steady state before the kill (PREFIX-steady.txt) and "
        "--profile-seconds from 0.5 s before it (PREFIX-storm.txt), with summaries",
    )
    parser.add_argument("--profile-seconds", type=int, default=6, help="of the storm (6)")
    parser.add_argument("--json", help="also write the result to this file")
    parser.add_argument("--client-process", help=argparse.SUPPRESS)
    args = parser.parse_args()
    raise_nofile()
    if args.client_process:
        trio.run(client_process, json.loads(args.client_process))
        return 0
    if args.history_size is not None:
        run.HISTORY_SIZE[0] = args.history_size

    def on_sigterm(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_sigterm)
    logs = Path(tempfile.mkdtemp(prefix="trio-chat-storm-"))
    source = run.snapshot_source(logs)
    print(f"trio-chat under test: {source}; logs in {logs}", file=sys.stderr)
    load_before = os.getloadavg()
    started = time.monotonic()
    try:
        with contextlib.ExitStack() as stack:
            redis_url, redis_pid = stack.enter_context(run.redis_server(logs))
            url_a, pids_a = stack.enter_context(run.trio_chat_server(logs, redis_url, "trio-A"))
            url_b, pids_b = stack.enter_context(run.trio_chat_server(logs, redis_url, "trio-B"))
            pids = {"A": pids_a[0], "B": pids_b[0], "redis": redis_pid}
            urls = {"A": url_a, "B": url_b}
            procs = stack.enter_context(client_processes(args, urls, logs))
            result = trio.run(storm, args, urls, pids, procs)
    except run.BenchError as exc:
        print(f"FAILED: {exc}", file=sys.stderr)
        return 1
    elapsed = time.monotonic() - started
    load_after = os.getloadavg()
    history = run.HISTORY_SIZE[0]
    date = datetime.date.today().isoformat()
    r = result
    print(
        f"\n{date}, reconnect storm: {r['clients']:,} clients in {args.rooms} rooms x "
        f"{args.members} on A, senders on B at {args.rate:g} msg/s per room "
        f"({args.rate * args.rooms:g} msg/s); SIGKILL A after {args.warmup:g} s; "
        f"{args.procs} {args.clients} client processes, jitter {args.jitter:g} s; history.size "
        f"{'200 (default)' if history is None else history}; {elapsed:.0f} s wall\n"
    )
    cu = r["caught_up_s"]
    print(f"storm time (kill → last client caught up): {r['storm_s']} s")
    print(
        f"caught up after the kill, p50 / p90 / p99: {cu.get(50)} / {cu.get(90)} / {cu.get(99)} s"
    )
    print(
        f"joined answered: p50 {r['joined_p50_s']} s, last {r['all_joined_s']} s after the kill; "
        f"clients saw the close {r['closed_seen_s']} s after it"
    )
    print(f"joins: recovered {r['recovered']}; missed per client {r['missed_per_client']}")
    print(
        f"sent {r['sent']}, acked {r['acked']}, sender errors {r['sender_errors']}, sender max lag "
        f"{r['sender_max_lag_ms']} ms; client errors (retried connects) {r['client_errors']}"
    )
    print(f"CPU (cores) from the kill to the end of the storm: {r['cpu_during_storm']}")
    print(f"waited {r['quiet_wait_s']} s for quiet before the kill (negative: it never was)")
    print("Timeline, 0.5 s bins from 1 s before the kill (CPU in cores; B's accept queue: its")
    print("most in a sample; welcome and joined frames the clients read in the bin):")
    names = [k for k in r["timeline_from_kill"][0] if k not in ("t", "machine")]
    print("  t(s)  " + " ".join(f"{n:>10}" for n in names))
    for b in r["timeline_from_kill"]:
        print(f"  {b['t'] - 1.0:5.1f} " + " ".join(f"{fmt(b[n]):>10}" for n in names))
    print(f"clients whose ids differ from the acks: {len(r['wrong'])}")
    if history == 0:
        print("  (history off: nothing vouches for the gap, and what was missed stays missed; the")
        print("  storm time above only counts the clients that had missed nothing)")
    for line in r["wrong"][:10]:
        print(f"  {line}")
    print(
        f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f} (1 min); "
        f"nproc {len(os.sched_getaffinity(0))}, Python {platform.python_version()}; {source}"
    )
    if args.profile:
        for kind in ("steady", "storm"):
            path = Path(f"{args.profile}-{kind}.txt")
            if path.exists():
                Path(f"{args.profile}-{kind}-summary.txt").write_text(run.summarize_profile(path))
                print(f"profile of B ({kind}): {path}, summary {args.profile}-{kind}-summary.txt")
    print(f"Logs: {logs}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), **result}, indent=1))
    return 0 if not r["wrong"] and r["recovered"]["not rejoined"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
